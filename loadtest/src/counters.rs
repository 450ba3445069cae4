//! Kernel counts of what a benched child process does, for the bench's per-message
//! columns: system calls entered and io_uring requests submitted, over all its
//! threads, from exec to exit. They are perf tracepoint counters
//! (`raw_syscalls:sys_enter`, `io_uring:io_uring_submit_req`; perf_event_open(2))
//! opened in the child between fork and exec, inherited by every thread it starts
//! and enabled by the exec, so nothing the child does escapes them and nothing of
//! the bench's is counted. The bench takes copies of the counters' descriptors with
//! pidfd_getfd(2) and reads them once the child has exited.
//!
//! They need tracefs (`/sys/kernel/tracing`) for the tracepoints' ids and the right
//! to open them (root, or `perf_event_paranoid` ≤ -1); without them the columns say
//! n/a and [`Tracepoints::find`] says why. While the syscall counter is open every
//! task on the machine enters system calls by the kernel's traced path: a few tens
//! of ns more each, which the CPU columns include (`--no-syscall-count` leaves it out).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Where the tracepoint ids are: tracefs, or its old place under debugfs.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// The descriptors the counters get in the child (above any it opens itself at start).
const CHILD_FDS: [RawFd; 2] = [1021, 1022];

/// `struct perf_event_attr` up to `config1` (`PERF_ATTR_SIZE_VER0`, 64 bytes), the
/// fields a counting tracepoint needs; linux/perf_event.h.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
const FLAG_DISABLED: u64 = 1 << 0;
const FLAG_INHERIT: u64 = 1 << 1;
const FLAG_ENABLE_ON_EXEC: u64 = 1 << 12;

/// The tracepoint ids to count; found once per bench.
#[derive(Clone, Copy, Debug)]
pub struct Tracepoints {
    syscalls: u64,
    /// None on a kernel without io_uring's tracepoints.
    uring_submits: Option<u64>,
}

impl Tracepoints {
    /// The ids from tracefs. Errors: tracefs is not mounted (with the command that
    /// mounts it), or the syscall tracepoint is missing.
    pub fn find() -> Result<Tracepoints, String> {
        let id = |event: &str| {
            TRACEFS.iter().find_map(|root| {
                std::fs::read_to_string(format!("{root}/events/{event}/id"))
                    .ok()?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        };
        let syscalls = id("raw_syscalls/sys_enter").ok_or_else(|| {
            "syscall counts need tracefs, which is not mounted here (as root: mount -t tracefs nodev /sys/kernel/tracing)".to_string()
        })?;
        Ok(Tracepoints {
            syscalls,
            uring_submits: id("io_uring/io_uring_submit_req"),
        })
    }

    /// Makes `cmd`'s child open the counters just before it execs. A counter the
    /// kernel refuses is left out; the child runs regardless.
    pub fn attach(self, cmd: &mut Command) {
        let attrs = [Some(self.syscalls), self.uring_submits].map(|id| {
            id.map(|config| PerfEventAttr {
                kind: PERF_TYPE_TRACEPOINT,
                size: std::mem::size_of::<PerfEventAttr>() as u32,
                config,
                flags: FLAG_DISABLED | FLAG_INHERIT | FLAG_ENABLE_ON_EXEC,
                ..PerfEventAttr::default()
            })
        });
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe system calls on memory it owns (the attrs copied in);
        // it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for (attr, fd) in attrs.iter().zip(CHILD_FDS) {
                    let Some(attr) = attr else { continue };
                    // pid 0, cpu -1: this process (and, inherited, its threads) on any CPU.
                    let got = libc::syscall(
                        libc::SYS_perf_event_open,
                        attr as *const PerfEventAttr,
                        0,
                        -1,
                        -1,
                        0,
                    ) as RawFd;
                    if got >= 0 && got != fd {
                        libc::dup2(got, fd);
                        libc::close(got);
                    }
                }
                Ok(())
            });
        }
    }
}

/// The counters of one child, held by the bench.
pub struct Counters {
    syscalls: Option<OwnedFd>,
    uring_submits: Option<OwnedFd>,
}

impl Counters {
    /// Copies of the counters the child `pid` opened (see [`Tracepoints::attach`]);
    /// call right after spawn. A counter that cannot be had is None.
    pub fn of(pid: u32) -> Counters {
        // SAFETY: plain syscalls; a returned descriptor is new and ours alone.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
        if pidfd < 0 {
            return Counters {
                syscalls: None,
                uring_submits: None,
            };
        }
        // SAFETY: pidfd was just opened and is owned here.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let take = |fd: RawFd| {
            use std::os::fd::AsRawFd;
            // SAFETY: as above.
            let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
            // SAFETY: a new descriptor, owned here.
            (got >= 0).then(|| unsafe { OwnedFd::from_raw_fd(got as RawFd) })
        };
        Counters {
            syscalls: take(CHILD_FDS[0]),
            uring_submits: take(CHILD_FDS[1]),
        }
    }

    /// (system calls, io_uring requests submitted) so far; read once the child has
    /// exited for its whole life (an exited thread's count joins its process's).
    pub fn read(&self) -> (Option<u64>, Option<u64>) {
        let read = |fd: &Option<OwnedFd>| {
            use std::os::fd::AsRawFd;
            let fd = fd.as_ref()?;
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a u64 we own from a descriptor we own.
            let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            (n == 8).then_some(v)
        };
        (read(&self.syscalls), read(&self.uring_submits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_childs_system_calls_are_counted_over_its_whole_life_and_no_others() {
        let tp = match Tracepoints::find() {
            Ok(tp) => tp,
            Err(why) => {
                // .ci/run mounts tracefs; elsewhere the bench prints n/a.
                eprintln!("SKIPPED: {why}");
                return;
            }
        };
        // dd with 1-byte blocks: a read and a write per byte, so 20,000 calls
        // beyond its start-up and exit (a few dozen more). It reads a pipe, so it
        // waits for this test to take its counters: an exited child's descriptors
        // cannot be had.
        let mut cmd = Command::new("dd");
        cmd.args(["of=/dev/null", "bs=1", "count=10000"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        tp.attach(&mut cmd);
        let mut child = cmd.spawn().expect("dd");
        let counters = Counters::of(child.id());
        // This process's own calls while dd runs must not be counted.
        for _ in 0..5_000 {
            let _ = std::fs::metadata("/");
        }
        let mut stdin = child.stdin.take().expect("piped");
        std::io::Write::write_all(&mut stdin, &[0; 10_000]).expect("dd reads");
        drop(stdin);
        assert!(child.wait().expect("wait").success());
        let (syscalls, submits) = counters.read();
        let syscalls = syscalls.expect("the syscall counter opened as root");
        assert!(
            (20_000..20_500).contains(&syscalls),
            "dd made {syscalls} system calls; expected 20,000 and its start-up"
        );
        if tp.uring_submits.is_some() {
            assert_eq!(submits, Some(0), "dd submits nothing to io_uring");
        }
    }
}
