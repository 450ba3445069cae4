//! The accounting log's generations: when the file in use is rotated, what its
//! rotated files are called, their compression and retention, and reading every
//! generation in order as one log.
//!
//! A rotation renames the file in use to `NAME.YYYYMMDDTHHMMSSZ` (UTC, with `-N`
//! added when that name is taken) under the writers' lock, so no record is written
//! to it afterwards, and opens a new `NAME`. A background thread then gzips it to
//! `NAME.YYYYMMDDTHHMMSSZ.gz` (via `.gz.tmp`, synced, renamed; the plain file is
//! removed last), so at every moment each record is in exactly one complete file
//! or in both a plain file and its finished `.gz`, which readers take once.
//! Rotated files older than `keep_days` are deleted. Files rotated by someone else
//! (logrotate, then SIGUSR1) are read but never compressed or deleted here.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The default size at which the file in use is rotated.
pub const ROTATE_SIZE_DEFAULT: u64 = 1 << 30;
/// The smallest size to rotate at (a few hundred records): smaller would rotate at
/// nearly every batch.
pub const LOG_ROTATE_SIZE_MIN: u64 = 64 << 10;
/// The default number of days rotated files are kept.
pub const KEEP_DAYS_DEFAULT: u32 = 30;
/// Rotated names tried with `-N` when a rotation in the same second took the name.
const NAME_ATTEMPTS_MAX: u32 = 1000;
/// Times a reader lists the generations again when a rotation happened while it
/// listed them and it cannot tell where the file it opened went.
const SNAPSHOT_ATTEMPTS_MAX: u32 = 10;
/// The wait before listing again, times the attempt.
const SNAPSHOT_RETRY_WAIT: Duration = Duration::from_millis(20);
/// Octets of the log per gzip member of a compressed generation (the members of
/// one file read as one stream, RFC 1952 §2.2): `volley track` starts decompressing
/// at the member that holds a record, so it reads at most this much (and a line).
pub const GZIP_MEMBER_OCTETS: usize = 1 << 20;
/// gzip level: 3 keeps a 1 GiB rotation to seconds of one core; JSON lines still
/// shrink about tenfold.
const GZIP_LEVEL: u32 = 3;

/// When the accounting log is rotated and how long rotated files are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate before a write would take the file past this many octets; None: never
    /// for size. A single batch larger than it still goes whole into a new file.
    pub size_max: Option<u64>,
    /// Rotate at the first write of each UTC day.
    pub daily: bool,
    /// Delete rotated files last written more than this many days ago; None: keep.
    pub keep_days: Option<u32>,
    /// The group the log and its rotated files belong to (mode 0640), so a log
    /// shipper in it can read them; None: the owner's.
    pub group: Option<crate::host::accounts::Group>,
}

impl Default for Rotation {
    fn default() -> Rotation {
        Rotation {
            size_max: Some(ROTATE_SIZE_DEFAULT),
            daily: true,
            keep_days: Some(KEEP_DAYS_DEFAULT),
            group: None,
        }
    }
}

impl Rotation {
    /// Never rotated, nothing deleted (an external logrotate rotates it, then SIGUSR1).
    pub fn never() -> Rotation {
        Rotation {
            size_max: None,
            daily: false,
            keep_days: None,
            group: None,
        }
    }

    /// Whether a file of `len` octets, whose first record was written on UTC day
    /// `day`, is rotated before `more` octets are written on day `today`.
    pub fn due(&self, len: u64, more: u64, day: u64, today: u64) -> bool {
        len > 0 && (self.size_max.is_some_and(|m| len + more > m) || (self.daily && day != today))
    }
}

/// Days since 1970-01-01 UTC.
pub fn utc_day(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 86_400
}

/// The name the file in use is renamed to when rotated at `t`: `NAME.YYYYMMDDTHHMMSSZ`,
/// or with `-001`, `-002`, ... when taken. Errors: every name taken (a clock stuck in one second).
pub fn rotated_name(path: &Path, t: SystemTime) -> std::io::Result<PathBuf> {
    let stamp: String = humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    let base = format!("{}.{stamp}", path.display());
    let taken = |p: &str| Path::new(p).exists() || Path::new(&format!("{p}.gz")).exists();
    if !taken(&base) {
        return Ok(base.into());
    }
    (1..NAME_ATTEMPTS_MAX)
        // Zero-padded, so `ls` lists them in the order they were made.
        .map(|n| format!("{base}-{n:03}"))
        .find(|p| !taken(p))
        .map(PathBuf::from)
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "accounting log {}: {NAME_ATTEMPTS_MAX} rotations in one second",
                path.display()
            ))
        })
}

/// Whether `name` is one of this log's own rotated files (`NAME.YYYYMMDDTHHMMSSZ`,
/// maybe `-N`, maybe `.gz`): the files this module compresses and deletes.
fn is_ours(log_name: &str, name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(log_name)
        .and_then(|r| r.strip_prefix('.'))
    else {
        return false;
    };
    let rest = rest.strip_suffix(".gz").unwrap_or(rest);
    let (stamp, n) = rest.split_once('-').unwrap_or((rest, "0"));
    let b = stamp.as_bytes();
    b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
        && !n.is_empty()
        && n.bytes().all(|c| c.is_ascii_digit())
}

/// The rotated files of the log at `path`: names that begin `NAME.` or `NAME-`
/// (volley's own, and logrotate's `NAME.1`, `NAME.2.gz`, `NAME-20261130`), not the
/// half-written `.tmp` ones. With each, whether it is one of volley's own.
fn rotated(path: &Path) -> std::io::Result<Vec<(PathBuf, bool)>> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let Some(log_name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let log = dir.join(log_name);
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let p = dir.join(name);
        if crate::host::files::is_generation_of(&log, &p) && !name.ends_with(".tmp") {
            out.push((p, is_ours(log_name, name)));
        }
    }
    Ok(out)
}

/// Compresses the rotated file `plain` to `plain.gz` (mode and group as the file's,
/// modification time kept, so readers still order it), then removes `plain`.
pub fn compress(plain: &Path) -> std::io::Result<()> {
    let gz = PathBuf::from(format!("{}.gz", plain.display()));
    let tmp = PathBuf::from(format!("{}.gz.tmp", plain.display()));
    let ctx =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", plain.display()));
    let mut src = File::open(plain).map_err(ctx)?;
    let meta = src.metadata().map_err(ctx)?;
    // Made new, never through a link: the name is predictable, and a file or link
    // planted under it (tidy removed the ones it found) makes this fail, not write
    // through it.
    let out = {
        use std::os::unix::fs::OpenOptionsExt;
        File::options()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(ctx)?
    };
    out.set_permissions(meta.permissions()).map_err(ctx)?;
    std::os::unix::fs::fchown(&out, None, Some(meta.gid())).map_err(ctx)?;
    let out = compress_members(&mut src, out).map_err(ctx)?;
    out.set_modified(meta.modified().map_err(ctx)?)
        .map_err(ctx)?;
    out.sync_all().map_err(ctx)?;
    std::fs::rename(&tmp, &gz).map_err(ctx)?;
    sync_dir(plain)?;
    std::fs::remove_file(plain).map_err(ctx)
}

/// Writes `src` to `out` as gzip members of [`GZIP_MEMBER_OCTETS`] each, extended to
/// the end of a line (at least one member, so an empty file makes a valid gzip).
fn compress_members(src: &mut File, mut out: File) -> std::io::Result<File> {
    use std::io::{Read, Write};
    let mut src = BufReader::with_capacity(1 << 16, src);
    let mut buf = Vec::with_capacity(GZIP_MEMBER_OCTETS + 4096);
    let mut first = true;
    loop {
        buf.clear();
        (&mut src)
            .take(GZIP_MEMBER_OCTETS as u64)
            .read_to_end(&mut buf)?;
        if buf.last().is_some_and(|&b| b != b'\n') {
            src.read_until(b'\n', &mut buf)?;
        }
        if buf.is_empty() && !first {
            return Ok(out);
        }
        first = false;
        let mut enc = flate2::write::GzEncoder::new(&mut out, flate2::Compression::new(GZIP_LEVEL));
        enc.write_all(&buf)?;
        enc.finish()?;
    }
}

/// Fsyncs the directory holding `path`, so a rename in it survives a power loss.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => File::open(d)?.sync_all(),
        None => Ok(()),
    }
}

/// Housekeeping of the log at `path` (at open and after each rotation): volley's
/// own rotated files past `keep_days` are deleted; the plain ones left to compress
/// (a compression cut short by a stop or a crash) are returned; their half-written
/// `.gz.tmp` files are removed.
pub fn tidy(path: &Path, rotation: &Rotation, now: SystemTime) -> std::io::Result<Vec<PathBuf>> {
    let cutoff = rotation
        .keep_days
        .map(|d| now - Duration::from_secs(u64::from(d) * 86_400));
    let mut to_compress = Vec::new();
    let (Some(dir), Some(log_name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        return Ok(to_compress);
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(half) = name.strip_suffix(".gz.tmp") {
                if is_ours(log_name, half) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    for (p, ours) in rotated(path)? {
        if !ours {
            continue;
        }
        let modified = std::fs::metadata(&p).and_then(|m| m.modified());
        if let (Some(cutoff), Ok(m)) = (cutoff, &modified) {
            if *m < cutoff {
                std::fs::remove_file(&p)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                continue;
            }
        }
        let is_gz = p.extension().is_some_and(|x| x == "gz");
        let done = Path::new(&format!("{}.gz", p.display())).exists();
        if !is_gz && !done {
            to_compress.push(p);
        } else if !is_gz && done {
            // Compressed, not yet removed: the .gz is complete (it was renamed into place).
            let _ = std::fs::remove_file(&p);
        }
    }
    Ok(to_compress)
}

/// The generation files of the log at `path` as listed now, oldest first (by last
/// write), the file in use last when there is one; a plain rotated file and its
/// finished `.gz` are listed once, as the plain one. Unlike [`lines`] this takes no
/// consistent snapshot: a caller compares the identity of `path` before and after
/// and lists again when it changed. Errors: the directory cannot be listed.
pub fn generations(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut listed: Vec<(PathBuf, SystemTime)> = rotated(path)?
        .into_iter()
        .filter_map(|(p, _)| {
            let m = std::fs::metadata(&p).ok()?;
            m.is_file().then_some(())?;
            Some((p, m.modified().ok()?))
        })
        .collect();
    let plain: std::collections::HashSet<PathBuf> = listed.iter().map(|(p, _)| p.clone()).collect();
    listed.retain(|(p, _)| {
        let s = p.to_string_lossy();
        !s.strip_suffix(".gz")
            .is_some_and(|stem| plain.contains(Path::new(stem)))
    });
    listed.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    let mut out: Vec<PathBuf> = listed.into_iter().map(|(p, _)| p).collect();
    if path.is_file() {
        out.push(path.to_path_buf());
    }
    Ok(out)
}

/// One generation of the log, opened.
pub(crate) struct Generation {
    /// The path it was opened by (`.gz` when it had been compressed meanwhile).
    pub(crate) path: PathBuf,
    /// The opened file's device and inode (fstat, not the path's: the path may have
    /// been rotated since).
    pub(crate) id: (u64, u64),
    /// Its uncompressed content; a plain file's reader sees what is appended later.
    pub(crate) reader: Box<dyn BufRead + Send>,
}

/// The generation at `p` opened (its `.gz` when `p` was compressed since it was
/// listed); None: gone. Errors: it cannot be opened, with its path.
pub(crate) fn open_generation(p: &Path) -> std::io::Result<Option<Generation>> {
    let open = |p: &Path| -> std::io::Result<Option<Generation>> {
        let f = match File::open(p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", p.display()),
                ))
            }
        };
        let meta = f.metadata()?;
        let reader: Box<dyn BufRead + Send> = match p.extension().is_some_and(|x| x == "gz") {
            true => Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(f))),
            false => Box::new(BufReader::new(f)),
        };
        Ok(Some(Generation {
            path: p.to_path_buf(),
            id: (meta.dev(), meta.ino()),
            reader,
        }))
    };
    match open(p)? {
        Some(g) => Ok(Some(g)),
        // Compressed since it was listed.
        None if p.extension().is_none_or(|x| x != "gz") => {
            open(Path::new(&format!("{}.gz", p.display())))
        }
        None => Ok(None),
    }
}

/// The device and inode the path `p` names now.
pub(crate) fn identity(p: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// Every record line of the log at `path`, oldest generation first and the file in
/// use last, each line once even while it is rotated or compressed meanwhile.
/// Generations are ordered by their last write and opened one at a time as they are
/// reached (a log kept for years has thousands); a file's last line that was cut
/// off (a crash mid-write) stays a line of its own. Errors: a file that cannot be
/// read, with its path; a log that kept rotating through [`SNAPSHOT_ATTEMPTS_MAX`]
/// listings.
pub fn lines(path: &Path) -> std::io::Result<impl Iterator<Item = std::io::Result<String>>> {
    let gens = snapshot(path)?;
    Ok(gens.into_iter().flat_map(|g| {
        let g = match g {
            Gen::Open(g) => Ok(Some(g)),
            // Compressed meanwhile: open_generation takes the .gz; deleted for its
            // age meanwhile: nothing.
            Gen::Later(p) => open_generation(&p),
        };
        let lines: Box<dyn Iterator<Item = std::io::Result<String>>> = match g {
            Ok(Some(g)) => {
                let at = g.path;
                Box::new(g.reader.lines().map(move |l| {
                    l.map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", at.display())))
                }))
            }
            Ok(None) => Box::new(std::iter::empty()),
            Err(e) => Box::new(std::iter::once(Err(e))),
        };
        lines
    }))
}

/// A rotated file as listed: its path, last write, and device and inode.
pub type Listed = (PathBuf, SystemTime, Option<(u64, u64)>);

/// The rotated generations of the log at `path` (not the file in use), oldest first
/// by their last write: each once (a plain file and its finished `.gz` hold the same
/// records; the plain one is listed). Errors: the directory cannot be read.
pub fn rotated_oldest_first(path: &Path) -> std::io::Result<Vec<Listed>> {
    let mut listed: Vec<Listed> = rotated(path)?
        .into_iter()
        .filter_map(|(p, _)| {
            // Compressed between the listing and here: the plain file is gone and
            // its .gz (not listed yet) is this generation.
            let (p, m) = match std::fs::metadata(&p) {
                Ok(m) => (p, m),
                Err(_) if p.extension().is_none_or(|x| x != "gz") => {
                    let gz = PathBuf::from(format!("{}.gz", p.display()));
                    let m = std::fs::metadata(&gz).ok()?;
                    (gz, m)
                }
                Err(_) => return None,
            };
            Some((p, m.modified().ok()?, Some((m.dev(), m.ino()))))
        })
        .collect();
    // A .gz listed twice (found both ways): once.
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    listed.dedup_by(|a, b| a.0 == b.0);
    let plain: std::collections::HashSet<PathBuf> =
        listed.iter().map(|(p, _, _)| p.clone()).collect();
    listed.retain(|(p, _, _)| {
        let s = p.to_string_lossy();
        !s.strip_suffix(".gz")
            .is_some_and(|stem| plain.contains(Path::new(stem)))
    });
    listed.sort_by(|a, b| {
        a.1.cmp(&b.1)
            .then_with(|| same_time_order(&a.0).cmp(&same_time_order(&b.0)))
    });
    Ok(listed)
}

/// The order of generations last written in the same clock tick (file times are
/// as coarse as the kernel's tick, and a small `log_rotate_size` rotates faster):
/// by rotated name, `.gz` or not, `LOG.T` before `LOG.T-001` before `LOG.T-002`
/// (a plain name order puts `LOG.T.gz` after `LOG.T-001`).
fn same_time_order(p: &Path) -> (String, u32) {
    let name = p
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    match stem.rsplit_once('-') {
        Some((base, n)) if n.len() == 3 && n.bytes().all(|b| b.is_ascii_digit()) => {
            (base.to_string(), n.parse().unwrap_or(0))
        }
        _ => (stem.to_string(), 0),
    }
}

/// A generation in a snapshot: the file in use, held open, or a rotated one, opened
/// when the reader reaches it.
enum Gen {
    Open(Generation),
    Later(PathBuf),
}

/// The generations, oldest first. The file in use is opened first, then the
/// rotated ones are listed (with their identities), then the path is looked at
/// again:
/// - still the same file: nothing rotated meanwhile; it goes last;
/// - rotated, and its rotated name is among those listed: it goes in that place
///   (read once, through the first handle);
/// - rotated, not listed, and every listed file older than the start: it was
///   rotated after the listing; it goes last;
/// - otherwise (it may be listed already compressed, a different file): listed again
///   after a short wait, at most [`SNAPSHOT_ATTEMPTS_MAX`] times.
fn snapshot(path: &Path) -> std::io::Result<Vec<Gen>> {
    for attempt in 0..SNAPSHOT_ATTEMPTS_MAX {
        let started = SystemTime::now();
        let current = open_generation(path)?;
        let listed = rotated_oldest_first(path)?;
        let all_older = listed.iter().all(|(_, m, _)| *m < started);
        let at = current
            .as_ref()
            .and_then(|c| listed.iter().position(|(_, _, id)| *id == Some(c.id)));
        let mut gens: Vec<Gen> = listed.into_iter().map(|(p, _, _)| Gen::Later(p)).collect();
        let Some(current) = current else {
            return Ok(gens);
        };
        if identity(path) == Some(current.id) || (at.is_none() && all_older) {
            gens.push(Gen::Open(current));
            return Ok(gens);
        }
        if let Some(at) = at {
            gens[at] = Gen::Open(current);
            return Ok(gens);
        }
        std::thread::sleep(SNAPSHOT_RETRY_WAIT * (attempt + 1));
    }
    Err(std::io::Error::other(format!(
        "rotated {SNAPSHOT_ATTEMPTS_MAX} times while it was being read; try again"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("volley-rot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn rotation_is_due_on_size_or_a_new_day_never_for_an_empty_file() {
        let r = Rotation {
            size_max: Some(100),
            daily: true,
            ..Rotation::never()
        };
        assert!(!r.due(0, 1000, 1, 2), "an empty file takes any batch");
        assert!(!r.due(50, 50, 1, 1));
        assert!(r.due(50, 51, 1, 1));
        assert!(r.due(1, 1, 1, 2));
        assert!(!Rotation::never().due(u64::MAX / 2, 1 << 40, 0, 9));
    }

    #[test]
    fn our_rotated_names_are_told_from_logrotates() {
        let n = "accounting.jsonl";
        assert!(is_ours(n, "accounting.jsonl.20261130T194110Z"));
        assert!(is_ours(n, "accounting.jsonl.20261130T194110Z-3.gz"));
        assert!(!is_ours(n, "accounting.jsonl.1"));
        assert!(!is_ours(n, "accounting.jsonl-20261130.gz"));
        assert!(!is_ours(n, "accounting.jsonl.20261130T194110Z-.gz"));
        assert!(!is_ours(n, "other.jsonl.20261130T194110Z"));
        let d = dir("names");
        let p = d.join(n);
        let t = UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let first = rotated_name(&p, t).unwrap();
        assert!(is_ours(n, first.file_name().unwrap().to_str().unwrap()));
        std::fs::write(format!("{}.gz", first.display()), "").unwrap();
        let second = rotated_name(&p, t).unwrap();
        assert_eq!(second, PathBuf::from(format!("{}-001", first.display())));
    }

    #[test]
    fn generations_written_in_the_same_tick_are_listed_in_rotation_order() {
        let d = dir("tick");
        let p = d.join("acct.jsonl");
        let t = SystemTime::now() - Duration::from_secs(60);
        // Rotated within one clock tick: the first already gzipped.
        let names = [
            "acct.jsonl.20261130T231900Z.gz",
            "acct.jsonl.20261130T231900Z-001",
            "acct.jsonl.20261130T231900Z-002.gz",
            "acct.jsonl.20261130T231900Z-010",
        ];
        for n in names.iter().rev() {
            let f = std::fs::File::create(d.join(n)).unwrap();
            f.set_modified(t).unwrap();
        }
        let listed: Vec<String> = rotated_oldest_first(&p)
            .unwrap()
            .into_iter()
            .map(|(p, _, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(listed, names);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn every_generation_is_read_once_in_order_plain_gz_and_logrotates() {
        let d = dir("read");
        let p = d.join("acct.jsonl");
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        // logrotate's, oldest; then ours, compressed; then ours mid-compression
        // (plain and .gz both there); then the file in use.
        let files = [
            ("acct.jsonl.1", "a\nb\n", 0),
            ("acct.jsonl.20261130T100000Z", "c\n", 10),
            ("acct.jsonl.20261130T110000Z", "d\ne\n", 20),
        ];
        for (name, text, secs) in files {
            let f = d.join(name);
            std::fs::write(&f, text).unwrap();
            File::options()
                .write(true)
                .open(&f)
                .unwrap()
                .set_modified(t0 + Duration::from_secs(secs))
                .unwrap();
        }
        compress(&d.join("acct.jsonl.20261130T100000Z")).unwrap();
        assert!(!d.join("acct.jsonl.20261130T100000Z").exists());
        // A .gz next to its plain file, as a compression between rename and remove.
        let plain = d.join("acct.jsonl.20261130T110000Z");
        let copy = d.join("copy");
        std::fs::copy(&plain, &copy).unwrap();
        compress(&copy).unwrap();
        std::fs::rename(d.join("copy.gz"), d.join("acct.jsonl.20261130T110000Z.gz")).unwrap();
        std::fs::write(d.join("acct.jsonl.20261130T120000Z.gz.tmp"), "half").unwrap();
        std::fs::write(&p, "f\n").unwrap();
        let got: Vec<String> = lines(&p).unwrap().map(Result::unwrap).collect();
        assert_eq!(got, ["a", "b", "c", "d", "e", "f"]);
        // tidy: the half-written .tmp goes, the plain twin of a finished .gz goes,
        // logrotate's file stays; nothing is left to compress.
        let left = tidy(&p, &Rotation::default(), SystemTime::now()).unwrap();
        assert!(left.is_empty(), "{left:?}");
        assert!(!d.join("acct.jsonl.20261130T120000Z.gz.tmp").exists());
        assert!(!plain.exists());
        assert!(d.join("acct.jsonl.1").exists());
        let got: Vec<String> = lines(&p).unwrap().map(Result::unwrap).collect();
        assert_eq!(got, ["a", "b", "c", "d", "e", "f"]);
        // Past keep_days ours go; logrotate's are not ours to delete.
        let keep = Rotation {
            keep_days: Some(1),
            ..Rotation::default()
        };
        tidy(
            &p,
            &keep,
            SystemTime::now() + Duration::from_secs(2 * 86_400),
        )
        .unwrap();
        let got: Vec<String> = lines(&p).unwrap().map(Result::unwrap).collect();
        assert_eq!(got, ["a", "b", "f"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
