//! The accounting log: one JSON line per event, in the record types KumoMTA
//! operators know (Reception, Delivery, TransientFailure, Bounce, Expiration), plus
//! Shaping records for changes to a destination's limits.
//!
//! Every shard appends to the same file through one [`AccountingLog`] per process,
//! one write per batch of whole lines, so lines never interleave and rotation
//! (rotation.rs) never splits or loses one. A shard writes its batch before it
//! appends the matching Done records to its spool: after a crash the log may hold
//! an outcome twice (the recipient is sent again), never miss one.

use crate::host::accounts::Group;
use crate::host::files::LOG_MODE;
use crate::observe::rotation::{self, Rotation};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Kind {
    Reception,
    Delivery,
    TransientFailure,
    Bounce,
    Expiration,
}

#[derive(Debug, Serialize)]
pub struct Record<'a> {
    #[serde(rename = "type")]
    pub kind: Kind,
    /// RFC 3339 UTC, milliseconds.
    pub time: String,
    pub campaign: &'a str,
    pub rcpt: &'a str,
    pub sender: &'a str,
    pub domain: &'a str,
    /// MX host name and address:port the reply came from, when a connection was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mx: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    pub code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<&'a str>,
    /// The reply's class (classify/rules.toml) for anything but a delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
    pub reply: &'a str,
    /// TLS version and cipher suite, when the session used STARTTLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<&'a str>,
    /// Where the reply came from: connect, mail, rcpt, data, local, dns.
    pub stage: &'static str,
    pub attempt: u32,
    /// From queueing to this event.
    pub queued_ms: u64,
    /// The SMTP transaction, from submitting it to its final reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_ms: Option<u64>,
    pub shard: usize,
    /// An Expiration's last real attempt (RFC 3339), whose reply, class and stage the
    /// record carries; absent when no attempt was ever made (then 451 4.4.7, local).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<String>,
}

/// A shaping change (back-off, recovery, suspension, operator control) for one key
/// on one shard: `{"type": "Shaping", "event": "throttled", "key": "provider:google", ...}`.
#[derive(Debug, Serialize)]
pub struct ShapingRecord<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    /// throttled, ramped, recovered, suspended, resumed, paused, unpaused, rate,
    /// purged (an operator's purge: its counts and reason in `reason`).
    pub event: &'static str,
    pub key: &'a str,
    /// This shard's message rate after the change (absent: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<f64>,
    /// This shard's connection cap after the change (absent: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    pub reason: &'a str,
    pub shard: usize,
}

/// Batches of records, written in one call each: to the accounting log (each shard
/// has its own writer; all share the log's [`AccountingLog`]), or to a plain file of
/// records (ingest's `skipped.jsonl`).
pub struct LogWriter {
    out: Out,
    buf: Vec<u8>,
}

enum Out {
    Log(Arc<AccountingLog>),
    File(PathBuf, File),
}

impl LogWriter {
    /// A writer to the accounting log at `path`, rotated as `rotation` says (see
    /// [`AccountingLog::shared`]). Errors: the file or its directory cannot be made.
    pub fn open(path: &Path, rotation: &Rotation) -> std::io::Result<LogWriter> {
        Ok(LogWriter {
            out: Out::Log(AccountingLog::shared(path, rotation)?),
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// A writer of records to the plain file `path` (created, appended to; never
    /// rotated), with the process's private mode.
    pub fn file(path: &Path) -> std::io::Result<LogWriter> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(LogWriter {
            out: Out::File(path.to_path_buf(), file),
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    pub fn push(&mut self, r: &impl Serialize) {
        serde_json::to_writer(&mut self.buf, r).expect("serialising to memory does not fail");
        self.buf.push(b'\n');
    }

    /// Writes the batch in one call.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = match &mut self.out {
            Out::Log(log) => log.write(&self.buf),
            Out::File(path, f) => f
                .write_all(&self.buf)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        self.buf.clear();
        r
    }
}

/// The accounting log of one path, one per process: every writer's batches go
/// through its lock, which is where rotation is decided, so no record is written to
/// a file after it was rotated (see rotation.rs). The file is mode 0640, given to
/// `rotation.group` when set.
pub struct AccountingLog {
    path: PathBuf,
    rotation: Rotation,
    group: Option<Group>,
    open: Mutex<Open>,
    /// The [`REOPENS`] count this log last reopened at.
    reopened: AtomicU64,
    /// The Unix second of the last "reopened" line.
    reopen_said: AtomicU64,
    /// Rotated files to gzip; closed on drop.
    compress: Option<crossbeam_channel::Sender<PathBuf>>,
    compressor: Option<std::thread::JoinHandle<()>>,
}

struct Open {
    file: File,
    len: u64,
    /// UTC day of the file's first record (its last write's, for a file found).
    day: u64,
}

/// Rotated files waiting for the compressor; past it a rotation leaves its file
/// plain until the compressor's next tidy takes it.
pub const COMPRESS_QUEUED_MAX: usize = 16;

/// SIGUSR1s so far ([`reopen_on_sigusr1`]); each log reopens its path at its next write
/// when this moved.
static REOPENS: AtomicU64 = AtomicU64::new(0);

/// Every log open in this process, by path: one lock per file.
static OPEN_LOGS: Mutex<Vec<(PathBuf, Weak<AccountingLog>)>> = Mutex::new(Vec::new());

/// Makes SIGUSR1 ask every accounting log of this process to reopen its path at its
/// next write, for an external logrotate that renamed it (its `postrotate` sends it).
/// Errors: the handler cannot be installed.
pub fn reopen_on_sigusr1() -> std::io::Result<()> {
    // SAFETY: the handler does one atomic add, which is async-signal-safe.
    unsafe {
        signal_hook::low_level::register(signal_hook::consts::SIGUSR1, || {
            REOPENS.fetch_add(1, Ordering::Relaxed);
        })
    }
    .map(|_| ())
}

impl AccountingLog {
    /// The log at `path` open in this process, or opened now with `rotation` (a log
    /// already open keeps the rotation it was opened with). Errors: the directory or
    /// file cannot be made, its mode or group cannot be set, another process writes it.
    pub fn shared(path: &Path, rotation: &Rotation) -> std::io::Result<Arc<AccountingLog>> {
        // One name per file: `x/a.jsonl` and `./x/a.jsonl` are one log.
        let key = match (path.parent(), path.file_name()) {
            (Some(d), Some(n)) => {
                let d = if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                };
                d.canonicalize().map_or(path.to_path_buf(), |d| d.join(n))
            }
            _ => path.to_path_buf(),
        };
        let mut open = OPEN_LOGS.lock().expect("open logs lock");
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(log) = open
            .iter()
            .find(|(p, _)| *p == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(log);
        }
        let log = Arc::new(AccountingLog::open(path, rotation)?);
        open.push((key, Arc::downgrade(&log)));
        Ok(log)
    }

    fn open(path: &Path, rotation: &Rotation) -> std::io::Result<AccountingLog> {
        let ctx = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("accounting log {}: {e}", path.display()))
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                ctx(std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create its directory {}: {e}; create it for the user volley runs as (install -d -o USER -m 0750 {})",
                        dir.display(),
                        dir.display()
                    ),
                ))
            })?;
        }
        crate::host::files::check_own_dir(
            dir.unwrap_or(Path::new(".")),
            "the accounting log's directory",
        )
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("{e:#}")))?;
        let group = rotation.group.clone();
        if let (Some(dir), Some(g)) = (dir, &group) {
            share_dir(dir, g).map_err(ctx)?;
        }
        let open = open_file(path, group.as_ref()).map_err(ctx)?;
        let (tx, rx) = crossbeam_channel::bounded::<PathBuf>(COMPRESS_QUEUED_MAX);
        let (p, r) = (path.to_path_buf(), rotation.clone());
        let compressor = std::thread::Builder::new()
            .name("log-compress".into())
            .spawn(move || compress_loop(&p, &r, rx))
            .map_err(ctx)?;
        Ok(AccountingLog {
            path: path.to_path_buf(),
            rotation: rotation.clone(),
            group,
            open: Mutex::new(open),
            reopened: AtomicU64::new(REOPENS.load(Ordering::Relaxed)),
            reopen_said: AtomicU64::new(0),
            compress: Some(tx),
            compressor: Some(compressor),
        })
    }

    /// Writes `bytes` (whole lines) in one call, rotating first when due or
    /// reopening when asked. Errors carry the log's path.
    pub fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut open = self.open.lock().expect("log lock");
        self.before_write(&mut open, bytes.len() as u64)?;
        let r = open.file.write_all(bytes);
        open.len += bytes.len() as u64;
        r.map_err(|e| self.err(e))
    }

    /// Appends everything `from` holds and syncs it (ingest's skipped rows, streamed:
    /// a list with a million bad rows makes hundreds of MB).
    pub fn append_synced(&self, from: &mut impl std::io::Read) -> std::io::Result<()> {
        let mut open = self.open.lock().expect("log lock");
        self.before_write(&mut open, 0)?;
        let n = std::io::copy(from, &mut open.file).map_err(|e| self.err(e))?;
        open.len += n;
        open.file.sync_data().map_err(|e| self.err(e))
    }

    fn err(&self, e: std::io::Error) -> std::io::Error {
        std::io::Error::new(
            e.kind(),
            format!("accounting log {}: {e}", self.path.display()),
        )
    }

    fn before_write(&self, open: &mut Open, more: u64) -> std::io::Result<()> {
        let asked = REOPENS.load(Ordering::Relaxed);
        if self.reopened.load(Ordering::Relaxed) != asked {
            // Marked done only once it is: a failed reopen is tried again at the next
            // write, not forgotten while records go on into the renamed file. The
            // old file's lock goes first: without a rename the path is that file.
            // SAFETY: flock on the descriptor `open` owns.
            unsafe { libc::flock(open.file.as_raw_fd(), libc::LOCK_UN) };
            *open = open_file(&self.path, self.group.as_ref()).map_err(|e| {
                // SAFETY: as above; taking back the lock it had.
                unsafe { libc::flock(open.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                self.err(e)
            })?;
            self.reopened.store(asked, Ordering::Relaxed);
            // At most a line a second, however many signals come.
            let second = SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if self.reopen_said.swap(second, Ordering::Relaxed) != second {
                eprintln!(
                    "volley: accounting log {} reopened (SIGUSR1)",
                    self.path.display()
                );
            }
        }
        let now = SystemTime::now();
        if open.len == 0 {
            // A file opened empty and first written on a later day is that day's.
            open.day = rotation::utc_day(now);
        }
        if self
            .rotation
            .due(open.len, more, open.day, rotation::utc_day(now))
        {
            self.rotate(open, now)?;
        }
        Ok(())
    }

    /// Renames the file in use to its rotated name and opens a new one, then hands
    /// the rotated file to the compressor.
    fn rotate(&self, open: &mut Open, now: SystemTime) -> std::io::Result<()> {
        // The rotated file is complete on disk before anything reads it as rotated.
        open.file.sync_data().map_err(|e| self.err(e))?;
        let to = rotation::rotated_name(&self.path, now)?;
        std::fs::rename(&self.path, &to).map_err(|e| self.err(e))?;
        *open = open_file(&self.path, self.group.as_ref()).map_err(|e| self.err(e))?;
        rotation::sync_dir(&self.path).map_err(|e| self.err(e))?;
        if let Some(tx) = &self.compress {
            // Full: the compressor's next tidy finds it plain and takes it then.
            let _ = tx.try_send(to);
        }
        Ok(())
    }
}

impl Drop for AccountingLog {
    /// Lets the compressor finish the file it is on (a file it did not get to stays
    /// plain, and is compressed when the log is next opened).
    fn drop(&mut self) {
        drop(self.compress.take());
        if let Some(t) = self.compressor.take() {
            let _ = t.join();
        }
    }
}

/// With `log_group`, the log's directory is made searchable by that group (g+x,
/// and the group's, when volley owns it), or a log shipper in it could not reach
/// the 0640 log: a spool keeps 0710, a directory of its own 0750. A directory of
/// someone else's is left as its owner made it.
fn share_dir(dir: &Path, g: &Group) -> std::io::Result<()> {
    let meta = std::fs::metadata(dir)?;
    if meta.uid() != crate::host::accounts::euid() {
        return Ok(());
    }
    let given_to_another = meta.gid() != g.gid && meta.permissions().mode() & 0o070 != 0;
    if given_to_another {
        // The operator's (or admin_group's): not taken from them.
        return Ok(());
    }
    if meta.gid() != g.gid {
        std::os::unix::fs::chown(dir, None, Some(g.gid)).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot give its directory {} to group {} (log_group): {e}; the user volley runs as must be a member: {}",
                    dir.display(),
                    g.name,
                    crate::host::accounts::join_group_fix(g, crate::host::accounts::euid())
                ),
            )
        })?;
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o010 == 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o010))?;
    }
    Ok(())
}

/// Opens (creating) the log file for appending, mode 0640, in `group`.
fn open_file(path: &Path, group: Option<&Group>) -> std::io::Result<Open> {
    use std::os::unix::fs::OpenOptionsExt;
    // A link is not followed (ELOOP): whoever planted it would get the records, and
    // the chmod below would land on the file it names.
    // Read too: a record a crash cut short is found from the end (cut_torn_tail).
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // One writer process per log: another rotating it on its own would go on writing
    // into a file this one had rotated, compressed and removed.
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "another volley process writes this log; give each process (each spool) its own --log or `log`",
        ));
    }
    cut_torn_tail(&file, path)?;
    let meta = file.metadata()?;
    let me = crate::host::accounts::euid();
    if meta.uid() != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "it belongs to {}, not to {} who runs volley, who would write every recipient into it; chown it, or use another log",
                crate::host::accounts::describe_user(meta.uid()),
                crate::host::accounts::describe_user(me)
            ),
        ));
    }
    if meta.permissions().mode() & 0o7777 != LOG_MODE {
        file.set_permissions(std::fs::Permissions::from_mode(LOG_MODE))
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot make it mode 0640: {e}")))?;
    }
    if let Some(g) = group.filter(|g| g.gid != meta.gid()) {
        std::os::unix::fs::fchown(&file, None, Some(g.gid)).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot give it to group {} (log_group): {e}; the user volley runs as ({}) must be a member: {}",
                    g.name,
                    crate::host::accounts::describe_user(crate::host::accounts::euid()),
                    crate::host::accounts::join_group_fix(g, crate::host::accounts::euid())
                ),
            )
        })?;
    }
    let day = match meta.len() {
        0 => rotation::utc_day(SystemTime::now()),
        _ => rotation::utc_day(meta.modified()?),
    };
    Ok(Open {
        file,
        len: meta.len(),
        day,
    })
}

/// Cuts what follows the last line end of the log at `path`: a record a crash cut
/// short while it was written. It was never committed (log lines are written before
/// the spool's Done records), so its recipient is tried again and logged whole; left
/// in place, the next record would be appended to it and both be unreadable. Called
/// by the one writer (the flock is held). Errors: the file cannot be read or cut.
fn cut_torn_tail(file: &File, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.read_exact_at(part, start)?;
        if let Some(i) = part.iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        file.set_len(end)?;
        file.sync_data()?;
        eprintln!(
            "volley: accounting log {}: its last {} octets were a record cut short by a crash (never committed: it is logged again when its recipient is); removed",
            path.display(),
            len - end
        );
    }
    Ok(())
}

/// The compressor thread: tidies at start (leftovers compressed, old files
/// deleted), then compresses each rotated file it is sent and tidies again.
fn compress_loop(path: &Path, rotation: &Rotation, rx: crossbeam_channel::Receiver<PathBuf>) {
    let tidy = || match rotation::tidy(path, rotation, SystemTime::now()) {
        Ok(left) => left,
        Err(e) => {
            eprintln!(
                "volley: accounting log {}: housekeeping: {e}",
                path.display()
            );
            Vec::new()
        }
    };
    let mut todo = tidy();
    loop {
        for p in todo.drain(..) {
            // A tidy before it came off the channel may have compressed it already.
            if !p.exists() {
                continue;
            }
            if let Err(e) = rotation::compress(&p) {
                eprintln!("volley: accounting log: compressing {e}; left uncompressed");
            }
        }
        match rx.recv() {
            Ok(p) => {
                let left: Vec<PathBuf> = tidy().into_iter().filter(|q| *q != p).collect();
                todo.push(p);
                todo.extend(left);
            }
            Err(_) => return,
        }
    }
}

/// `s` with every control character but tab and line feed (a receiver's reply may
/// carry ESC, BEL, backspace: terminal escapes) written as `\u{1b}`, for output
/// an operator reads in a terminal (`volley track`, `volley log csv`).
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() && c != '\t' && c != '\n') {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c.is_control() && c != '\t' && c != '\n' {
            true => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            false => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// `t` as RFC 3339 UTC with milliseconds, the log's time format.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_a_terminal() {
        assert_eq!(escape_controls("550 5.1.1 no\tsuch"), "550 5.1.1 no\tsuch");
        assert_eq!(
            escape_controls("550 \u{1b}]0;PWNED\u{7}\u{1b}[2J a\u{8}X\n"),
            "550 \\u{1b}]0;PWNED\\u{7}\\u{1b}[2J a\\u{8}X\n"
        );
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writers_on_threads_rotate_without_losing_or_repeating_a_line() {
        let dir = std::env::temp_dir().join(format!("volley-logrot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("acct.jsonl");
        let rotation = Rotation {
            size_max: Some(4096),
            ..Rotation::never()
        };
        let (threads, batches, per_batch) = (4, 200, 5);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (path, rotation) = (&path, &rotation);
                s.spawn(move || {
                    let mut w = LogWriter::open(path, rotation).unwrap();
                    for b in 0..batches {
                        for i in 0..per_batch {
                            w.push(&serde_json::json!({"t": t, "n": b * per_batch + i}));
                        }
                        w.flush().unwrap();
                    }
                });
            }
        });
        // Every writer dropped: the compressor finished what it was given.
        let mut seen = std::collections::HashSet::new();
        for l in rotation::lines(&path).unwrap() {
            let v: serde_json::Value = serde_json::from_str(&l.unwrap()).unwrap();
            assert!(seen.insert((v["t"].as_u64().unwrap(), v["n"].as_u64().unwrap())));
        }
        assert_eq!(seen.len(), threads * batches * per_batch);
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let gz = names.iter().filter(|n| n.ends_with(".gz")).count();
        assert!(gz >= 10, "rotated and compressed: {names:?}");
        for n in &names {
            let mode = std::fs::metadata(dir.join(n)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, LOG_MODE, "{n}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A record a SIGKILL cut short is removed at the next open; the next record
    /// starts on its own line (it was glued to the torn one, and both were lost).
    #[test]
    fn a_record_cut_short_by_a_crash_is_removed_at_open() {
        let dir = std::env::temp_dir().join(format!("volley-logtorn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("acct.jsonl");
        std::fs::write(&path, "{\"n\":1}\n{\"n\":2,\"rcpt\":\"user12@").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(LOG_MODE)).unwrap();
        let mut w = LogWriter::open(&path, &Rotation::never()).unwrap();
        w.push(&serde_json::json!({"n": 3}));
        w.flush().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"n\":1}\n{\"n\":3}\n"
        );
        drop(w);
        // Only a torn line: the whole file goes; a whole last line stays.
        std::fs::write(&path, "{\"n\":").unwrap();
        drop(LogWriter::open(&path, &Rotation::never()).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        std::fs::write(&path, "{\"n\":1}\n").unwrap();
        drop(LogWriter::open(&path, &Rotation::never()).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":1}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reopen_after_an_external_rename_starts_a_new_file() {
        let dir = std::env::temp_dir().join(format!("volley-logreopen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("acct.jsonl");
        let mut w = LogWriter::open(&path, &Rotation::never()).unwrap();
        w.push(&serde_json::json!({"n": 1}));
        w.flush().unwrap();
        std::fs::rename(&path, dir.join("acct.jsonl.1")).unwrap();
        w.push(&serde_json::json!({"n": 2}));
        w.flush().unwrap();
        assert!(
            !path.exists(),
            "without the signal the renamed file is written"
        );
        REOPENS.fetch_add(1, Ordering::Relaxed);
        w.push(&serde_json::json!({"n": 3}));
        w.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":3}\n");
        let all: Vec<String> = rotation::lines(&path)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(all, ["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
        // A signal with no rename reopens the same file (its lock let go first).
        REOPENS.fetch_add(1, Ordering::Relaxed);
        w.push(&serde_json::json!({"n": 4}));
        w.flush().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"n\":3}\n{\"n\":4}\n"
        );
        // A second writer process's open of it is refused (its lock is held here).
        let held = open_file(&path, None).err().expect("refused");
        assert!(
            held.to_string().contains("another volley process"),
            "{held}"
        );
        drop(w);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
