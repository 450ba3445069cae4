//! How busy a shard's thread is: the share of wall time it ran on a CPU
//! (getrusage RUSAGE_THREAD) or was ready to run and waited for one (the run
//! delay in /proc/thread-self/schedstat, where the kernel keeps it), smoothed over
//! the shard's ticks. A thread with work every moment reads near 1 whether it had
//! a core to itself or shared one with other processes; a thread waiting on its
//! receivers reads low. Connections on demand (`schedule::Demand`) go by it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// One thread's load, sampled by that thread.
pub struct ThreadLoad {
    /// /proc/thread-self/schedstat, opened on the measured thread (None: the
    /// kernel keeps no schedstat, or it could not be read; then CPU time alone).
    schedstat: Option<File>,
    /// When the last sample was taken, and the thread's CPU time and run delay then.
    last: Option<(Instant, Duration)>,
    /// The smoothed share, 0 to 1.
    share: f64,
}

impl ThreadLoad {
    /// A load of the calling thread, which alone may call `sample`.
    pub fn of_this_thread() -> ThreadLoad {
        ThreadLoad {
            schedstat: File::open("/proc/thread-self/schedstat").ok(),
            last: None,
            share: 0.0,
        }
    }

    /// The share (0 to 1) of wall time the thread ran or waited to run, each
    /// sample weighing half: the first sample reads 0, and a step change shows
    /// within two or three ticks.
    pub fn sample(&mut self, now: Instant) -> f64 {
        let used = thread_cpu_time() + self.run_delay();
        if let Some((at, before)) = self.last {
            let wall = now.saturating_duration_since(at).as_secs_f64();
            if wall > 0.0 {
                let share = (used.saturating_sub(before).as_secs_f64() / wall).min(1.0);
                self.share = (self.share + share) / 2.0;
            }
        }
        self.last = Some((now, used));
        self.share
    }

    /// The thread's time waiting on a run queue: schedstat's second field, in ns.
    fn run_delay(&mut self) -> Duration {
        let mut buf = [0u8; 96];
        let read = self.schedstat.as_ref().map(|f| f.read_at(&mut buf, 0));
        let ns = match read {
            Some(Ok(n)) => std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(|s| s.split_ascii_whitespace().nth(1))
                .and_then(|f| f.parse::<u64>().ok()),
            _ => None,
        };
        if ns.is_none() {
            // Without a reading, each sample would mix CPU with and without delay.
            self.schedstat = None;
        }
        Duration::from_nanos(ns.unwrap_or(0))
    }
}

/// The calling thread's user and system CPU time (getrusage RUSAGE_THREAD).
fn thread_cpu_time() -> Duration {
    // SAFETY: rusage is plain data, which getrusage fills for the calling thread.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples the calling thread every 50 ms for 0.5 s, spinning or sleeping.
    fn load_while(spin: bool) -> f64 {
        let mut load = ThreadLoad::of_this_thread();
        let mut share = load.sample(Instant::now());
        for _ in 0..10 {
            let until = Instant::now() + Duration::from_millis(50);
            if spin {
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
            share = load.sample(Instant::now());
        }
        share
    }

    #[test]
    fn a_spinning_thread_reads_busy_and_a_sleeping_one_idle() {
        let busy = std::thread::spawn(|| load_while(true)).join().unwrap();
        let idle = std::thread::spawn(|| load_while(false)).join().unwrap();
        assert!(busy > 0.9, "a thread spinning every moment read {busy:.2}");
        assert!(idle < 0.1, "a thread asleep read {idle:.2}");
    }
}
