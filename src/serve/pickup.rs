//! The pickup directory (PowerMTA's habit): applications move RFC 5322 files with
//! `X-Sender:` / `X-Receiver:` envelope fields into it, and each is queued as a
//! submitted message (serve::submitted). A file is removed only once its message is
//! durable in the spool; a file that cannot be read as a message moves to `bad/`
//! with a `.why` file beside it saying what is wrong.
//!
//! Files are found with inotify (a file closed after writing, or moved in) and by a
//! scan every `scan_interval` as a fallback (inotify queue overflow, files that
//! were there at start). Names starting with `.` or ending in `.tmp` are skipped:
//! write the file under such a name and rename it in when it is complete. A file
//! written in place is taken only once it has not changed for `PICKUP_SETTLE` (a
//! writer that pauses longer than that mid-file still loses the rest: rename).
//! Symbolic links and directories are never read.

use crate::observe::metrics::Door;
use crate::serve::intake::{Intake, Submitted};
use crate::serve::submitted::{self, Trace};
use crate::spool::inbox;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long a file must have been left alone before it is taken.
pub const PICKUP_SETTLE: Duration = Duration::from_secs(2);

/// What the pickup thread needs.
pub struct Pickup {
    /// The directory watched.
    pub dir: PathBuf,
    /// How often it is read whatever inotify says.
    pub scan_interval: Duration,
    /// Where messages go.
    pub intake: Arc<Intake>,
    /// This host's name, for the Received field.
    pub hostname: String,
    /// The header naming a message's campaign (taken out before sending).
    pub campaign_header: String,
    /// Files queued per scan before the directory is read again (`files_per_scan_max`).
    pub files_per_scan_max: usize,
    /// Largest file read (`message_size_max`); bigger ones move to `bad/`.
    pub message_size_max: u64,
}

/// Watches `p.dir` until `stop`.
pub fn start(p: Pickup, stop: Arc<AtomicBool>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let bad = p.dir.join("bad");
    std::fs::create_dir_all(&bad).map_err(|e| anyhow::anyhow!("pickup {}: {e}", bad.display()))?;
    let watch = Watch::new(&p.dir);
    if let Err(e) = &watch {
        eprintln!(
            "volley: pickup {}: inotify: {e}; scanning every {:?} instead",
            p.dir.display(),
            p.scan_interval
        );
    }
    let watch = watch.ok();
    Ok(std::thread::Builder::new()
        .name("pickup".into())
        .spawn(move || {
            let mut said = None;
            while !stop.load(Ordering::Relaxed) {
                // A full inbox or a file still settling: soon. Anything else that
                // keeps a file (the disk floor, a file volley may not read): at the
                // next scan, not ten times a second.
                let wait = match scan(&p, &stop, &mut said) {
                    Next::Soon => PICKUP_RETRY_SOON,
                    Next::Scan => p.scan_interval,
                };
                match &watch {
                    Some(w) => w.wait(wait, &stop),
                    None => sleep_unless_stopped(wait, &stop),
                }
            }
        })?)
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let until = std::time::Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// When a file left in the directory is tried again: after a full inbox or while a
/// file settles.
pub const PICKUP_RETRY_SOON: Duration = Duration::from_millis(100);

/// When the pickup thread looks again.
enum Next {
    Soon,
    Scan,
}

/// Queues every complete file in the directory, and says when to look again. A file
/// kept for later is said on stderr once for each reason (`said` is the last said).
fn scan(p: &Pickup, stop: &AtomicBool, said: &mut Option<(PathBuf, String)>) -> Next {
    let Ok(entries) = std::fs::read_dir(&p.dir) else {
        return Next::Scan;
    };
    let now = SystemTime::now();
    let mut unsettled = false;
    let mut names: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| {
            let settled = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= PICKUP_SETTLE);
            unsettled |= !settled;
            settled
        })
        .map(|e| e.path())
        .filter(|path| {
            let n = path.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            !n.starts_with('.') && !n.ends_with(".tmp")
        })
        .take(p.files_per_scan_max)
        .collect();
    names.sort();
    for path in names {
        if stop.load(Ordering::Relaxed) {
            return Next::Scan;
        }
        match queue_file(p, &path) {
            Ok(()) => {
                if let Err(e) = std::fs::remove_file(&path) {
                    // Queued, but still there: it would be queued again.
                    eprintln!(
                        "volley: pickup {}: queued, but cannot remove it ({e}); remove it by hand or it is sent twice",
                        path.display()
                    );
                }
            }
            Err(Refused::Later(e, soon)) => {
                let this = Some((path.clone(), e));
                if *said != this {
                    if let Some((path, e)) = &this {
                        eprintln!(
                            "volley: pickup {}: not queued now ({e}); kept, and tried again {}",
                            path.display(),
                            if soon { "shortly" } else { "at the next scan" }
                        );
                    }
                    *said = this;
                }
                return if soon { Next::Soon } else { Next::Scan };
            }
            Err(Refused::Bad(why)) => set_aside(&p.dir, &path, &why),
        }
    }
    if let Ok(d) = std::fs::File::open(&p.dir) {
        let _ = d.sync_all();
    }
    // A file still settling is looked at again soon, not at the next scan.
    match unsettled {
        true => Next::Soon,
        false => Next::Scan,
    }
}

enum Refused {
    /// Temporary: the file stays; tried again soon (a full inbox) or at the next scan.
    Later(String, bool),
    /// The file is wrong: it moves to bad/.
    Bad(String),
}

fn queue_file(p: &Pickup, path: &Path) -> Result<(), Refused> {
    let len = std::fs::metadata(path)
        .map_err(|e| Refused::Later(e.to_string(), false))?
        .len();
    if len > p.message_size_max {
        return Err(Refused::Bad(format!(
            "the file is {len} octets, over the pickup's message_size_max of {} octets; raise it or send the message over SMTP",
            p.message_size_max
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Refused::Later(e.to_string(), false))?;
    let file = submitted::parse_pickup(&bytes).map_err(|e| Refused::Bad(e.to_string()))?;
    let queue_id = format!("{:016X}", fastrand::u64(..));
    let trace = Trace {
        received_from_helo: "",
        client_ip: None,
        client_rdns: None,
        by_host: &p.hostname,
        protocol: "local",
        tls: None,
        auth_user: None,
        queue_id: &queue_id,
        for_rcpt: (file.recipients.len() == 1).then(|| file.recipients[0].as_str()),
        now: SystemTime::now(),
    };
    let prepared = submitted::prepare(&file.message, &trace, &p.campaign_header, &p.hostname)
        .map_err(|e| Refused::Bad(e.to_string()))?;
    let recipients = file.recipients.len() as u64;
    let answer = p
        .intake
        .submit(&Submitted {
            sender: file.sender,
            recipients: file.recipients,
            campaign: prepared.campaign,
            message: prepared.message,
            tls_report: false,
        })
        .map_err(|e| {
            let soon = matches!(e, inbox::InboxError::Full(..));
            Refused::Later(e.to_string(), soon)
        })?;
    inbox::wait(answer).map_err(|e| Refused::Later(e.to_string(), false))?;
    p.intake.board.injected(Door::Pickup, recipients);
    Ok(())
}

/// Moves a refused file to bad/ with NAME.why beside it.
fn set_aside(dir: &Path, path: &Path, why: &str) {
    let name = path.file_name().expect("a file in the directory");
    let to = dir.join("bad").join(name);
    let mut why_path = to.clone().into_os_string();
    why_path.push(".why");
    let text = format!("{}: {why}\n", path.display());
    eprintln!(
        "volley: pickup {}: refused: {why}; moved to {}",
        path.display(),
        to.display()
    );
    if let Err(e) = std::fs::write(&why_path, text).and_then(|_| std::fs::rename(path, &to)) {
        eprintln!(
            "volley: pickup {}: cannot move it to bad/: {e}",
            path.display()
        );
    }
}

/// An inotify watch on the directory: files closed after writing or moved in.
struct Watch {
    fd: OwnedFd,
}

impl Watch {
    fn new(dir: &Path) -> std::io::Result<Watch> {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain syscall; the descriptor is owned from here on.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: valid descriptor and NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(
                fd.as_raw_fd(),
                path.as_ptr(),
                libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO,
            )
        };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Watch { fd })
    }

    /// Waits for an event or `timeout`, then drains the events (the scan that
    /// follows reads the directory itself).
    fn wait(&self, timeout: Duration, stop: &AtomicBool) {
        let until = std::time::Instant::now() + timeout;
        while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; at most 100 ms so `stop` is seen.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n > 0 {
                let mut buf = [0u8; 4096];
                // SAFETY: reads into a buffer we own, of its length.
                while unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
                    > 0
                {}
                return;
            }
        }
    }
}
