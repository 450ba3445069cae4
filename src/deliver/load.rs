//! How busy a shard's thread is: the share of wall time it ran on a CPU or was
//! ready to run and waited for one, from the two first fields of
//! /proc/thread-self/schedstat (the CPU time getrusage RUSAGE_THREAD reports, in
//! ns, and the run delay), smoothed over the shard's ticks. A thread with work
//! every moment reads near 1 whether it had a core to itself or shared one with
//! other processes; a thread waiting on its receivers reads low. Connections on
//! demand (`schedule::Demand`) go by it.

use std::fs::File;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// One thread's load, sampled by that thread (not `Send`: the file it reads is
/// the thread's own).
pub struct ThreadLoad {
    /// /proc/thread-self/schedstat, opened on the measured thread. None: the
    /// kernel keeps no schedstat (CONFIG_SCHED_INFO), or it could not be read;
    /// the load then reads 0, and holds no connection back.
    schedstat: Option<File>,
    /// When the last sample was taken, and the thread's CPU time and run delay then.
    last: Option<(Instant, Duration)>,
    /// The smoothed share, 0 to 1.
    share: f64,
    not_send: PhantomData<*const ()>,
}

impl ThreadLoad {
    /// A load of the calling thread, which alone may call `sample`.
    pub fn of_this_thread() -> ThreadLoad {
        ThreadLoad {
            schedstat: File::open("/proc/thread-self/schedstat").ok(),
            last: None,
            share: 0.0,
            not_send: PhantomData,
        }
    }

    /// The share (0 to 1) of wall time the thread ran or waited to run, each
    /// sample weighing half: the first sample reads 0, and a step change shows
    /// within two or three ticks.
    pub fn sample(&mut self, now: Instant) -> f64 {
        let Some(used) = self.ran_or_waited() else {
            return 0.0;
        };
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

    /// The thread's time on a CPU plus its time waiting on a run queue: the sum of
    /// schedstat's first two fields, in ns. None (and never asked again) when the
    /// file cannot be read or parsed.
    fn ran_or_waited(&mut self) -> Option<Duration> {
        let mut buf = [0u8; 96];
        let n = self.schedstat.as_ref()?.read_at(&mut buf, 0).ok();
        let ns = n.and_then(|n| {
            let text = std::str::from_utf8(&buf[..n]).ok()?;
            let mut fields = text.split_ascii_whitespace().map(str::parse::<u64>);
            Some(fields.next()?.ok()? + fields.next()?.ok()?)
        });
        if ns.is_none() {
            self.schedstat = None;
        }
        ns.map(Duration::from_nanos)
    }
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
