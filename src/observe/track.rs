//! `volley track`'s side of the accounting log: every record of one recipient, from
//! every generation, found through an index rather than a scan, so an answer on a
//! 10-million-line log takes milliseconds.
//!
//! **The index** lives in `.NAME.idx/` beside the log `NAME` (hidden, and not a
//! `NAME.` name, which readers would take for a rotated generation). It is made of
//! runs: immutable files, each covering one byte range of one generation file
//! (identified by device and inode, so a rotation's rename keeps its runs), holding
//! `(hash64(lowercased rcpt), position)` entries sorted, in blocks of
//! [`BLOCK_ENTRIES`] with a fence (each block's first hash and CRC-32C) in front:
//! a lookup reads the header, the fence and the one or two blocks its hash can be
//! in, and checks the CRC of each. A run also keeps a fingerprint (CRC-32C of the
//! first and last 4 KiB of the range it covers), so a file replaced under a reused
//! inode, truncated or rewritten is noticed and its runs rebuilt.
//!
//! The file in use grows: its runs chain from offset 0 to the end of the last
//! line indexed, and a lookup scans the rest (the tail). A tail over
//! [`TAIL_SCAN_MAX`] is indexed first (a new run); past [`RUNS_MAX`] runs a file's
//! runs are merged into one. A gzipped generation is indexed by offsets into its
//! decompressed stream, with a table of its gzip members (rotation.rs writes one
//! per [`crate::observe::rotation::GZIP_MEMBER_OCTETS`]): a hit is read by
//! decompressing from the start of its member, at most about a mebibyte. (A
//! one-member gzip from logrotate is read from its start: correct, slower.)
//!
//! Nothing in an index is trusted: every hit is read back and its rcpt compared,
//! and a run that fails a check (header, CRC, fingerprint, a gap or overlap in a
//! file's chain) is deleted and rebuilt. Runs of files no longer among the
//! generations are deleted. When the index directory cannot be written (a reader
//! in `log_group`), whatever is not indexed is scanned, and [`Found::scanned`] says
//! how much.

use crate::observe::logged::Logged;
use memchr::memmem;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Entries per block: a lookup reads one or two blocks (64 KiB each) per run.
pub const BLOCK_ENTRIES: usize = 4096;
/// Octets at the end of the file in use that a lookup scans rather than indexes
/// first: a small tail costs less to scan than a run costs to write.
pub const TAIL_SCAN_MAX: u64 = 1 << 20;
/// Runs one file may have before they are merged into one.
pub const RUNS_MAX: usize = 8;
/// Longest line a hit is read back with; a longer one is not a record volley wrote.
pub const LINE_OCTETS_MAX: usize = 1 << 20;
/// Age past which a run's .tmp file is a stopped lookup's, not one being written.
const TMP_ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);
/// Times the generations are listed again when the log was rotated during a lookup.
const ATTEMPTS_MAX: u32 = 5;
/// The fingerprint's reach at each end of a run's range.
const FINGERPRINT_OCTETS: u64 = 4096;
const MAGIC: &[u8; 8] = b"VLYTRK01";
const HEADER_OCTETS: usize = 96;
const ENTRY_OCTETS: usize = 16;
const FENCE_OCTETS: usize = 16;
const MEMBER_OCTETS: usize = 16;

/// Why a lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// A generation could not be read.
    #[error("accounting log {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// No log and no rotated generation of it.
    #[error("accounting log {0}: no such file, nor rotated generations of it; give the log with --log (or --config)")]
    NoLog(String),
    /// The generations kept changing under the lookup.
    #[error("accounting log {0}: rotated {ATTEMPTS_MAX} times during the lookup; try again")]
    Rotating(String),
}

/// What a lookup found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Found {
    /// The recipient's records, oldest first (by their time; equal lines once).
    pub events: Vec<Logged>,
    /// Octets read by scanning rather than through the index (the tail of the file
    /// in use, or everything when the index could not be written).
    pub scanned: u64,
    /// Runs written by this lookup (the first lookup on a log builds its index).
    pub runs_built: usize,
}

/// The index key of an address: FNV-1a 64 of its lowercase form (stable across
/// runs and builds, unlike std's hasher).
pub fn key(rcpt: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    if rcpt.is_ascii() {
        rcpt.bytes().for_each(|b| eat(b.to_ascii_lowercase()));
    } else {
        rcpt.to_lowercase().bytes().for_each(eat);
    }
    h
}

/// The rcpt of a log line, read without parsing the whole line (the index builder
/// reads millions); None for a line without one (a Shaping record, a foreign line).
fn rcpt_of(line: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    const KEY: &[u8] = b"\"rcpt\":\"";
    // Inside a JSON string every quote is escaped, so this is the key itself.
    let at = memmem::find(line, KEY)? + KEY.len();
    let len = memchr::memchr(b'"', &line[at..])?;
    let raw = &line[at..at + len];
    if !raw.contains(&b'\\') {
        return std::str::from_utf8(raw)
            .ok()
            .map(std::borrow::Cow::Borrowed);
    }
    // An escape: the string is read properly.
    #[derive(serde::Deserialize)]
    struct R {
        rcpt: String,
    }
    serde_json::from_slice::<R>(line)
        .ok()
        .map(|r| std::borrow::Cow::Owned(r.rcpt))
}

/// Every record of `rcpt` (any case) in the log at `log`, of `campaign` when given,
/// building or extending the index as needed. Errors: a generation that cannot be
/// read; no log at all; a log that kept rotating.
pub fn lookup(log: &Path, rcpt: &str, campaign: Option<&str>) -> Result<Found, TrackError> {
    let at = || log.display().to_string();
    for _ in 0..ATTEMPTS_MAX {
        let before = identity_of(log);
        let gens = crate::observe::rotation::generations(log)
            .map_err(|source| TrackError::Read { path: at(), source })?;
        if gens.is_empty() {
            return Err(TrackError::NoLog(at()));
        }
        let index = IndexDir::open(log);
        let mut found = Found::default();
        let mut raced = false;
        let want = rcpt.to_lowercase();
        let h = key(rcpt);
        for g in &gens {
            match lookup_generation(g, &index, h, &want, &mut found) {
                Ok(()) => {}
                // Compressed or deleted since it was listed: list again. A run that
                // failed its CRC was deleted: the next attempt rebuilds it.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData
                    ) =>
                {
                    raced = true
                }
                Err(source) => {
                    return Err(TrackError::Read {
                        path: g.display().to_string(),
                        source,
                    })
                }
            }
        }
        if raced || identity_of(log) != before {
            continue;
        }
        if let Some(ix) = &index {
            ix.forget_others(&gens);
        }
        if let Some(c) = campaign {
            found.events.retain(|e| e.campaign == c);
        }
        found.events.sort_by(|a, b| a.time.cmp(&b.time));
        found.events.dedup();
        return Ok(found);
    }
    Err(TrackError::Rotating(at()))
}

/// Extends the index of every generation of the log at `log` to its end, as a
/// lookup does on its way (`volley serve` calls this every
/// [`INDEX_REFRESH_INTERVAL`], so a lookup finds the index warm). Errors: as
/// [`lookup`]'s.
pub fn refresh(log: &Path) -> Result<(), TrackError> {
    lookup(log, "", None).map(|_| ())
}

/// How often `volley serve` extends the log's index ([`refresh`]).
pub const INDEX_REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

fn identity_of(p: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// One generation: its runs checked (rebuilt when bad, extended when the tail is
/// long), their hits read back, the tail scanned.
fn lookup_generation(
    path: &Path,
    index: &Option<IndexDir>,
    h: u64,
    want: &str,
    found: &mut Found,
) -> std::io::Result<()> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    let gz = path.extension().is_some_and(|x| x == "gz");
    let src = Source {
        file: &file,
        id: (meta.dev(), meta.ino()),
        size: meta.len(),
        gz,
    };
    let (runs, covered) = match index {
        Some(ix) => ix.runs_for(&src, &mut found.runs_built)?,
        None => (Vec::new(), 0),
    };
    let mut hits: Vec<u64> = Vec::new();
    for r in &runs {
        hits.extend(r.find(h)?);
    }
    let take = |line: &[u8], found: &mut Found| {
        if let Some(l) = std::str::from_utf8(line).ok().and_then(Logged::parse) {
            if l.rcpt.to_lowercase() == want {
                found.events.push(l);
            }
        }
    };
    hits.sort_unstable();
    hits.dedup();
    let members = runs.first().map(|r| r.members.clone()).unwrap_or_default();
    read_lines_at(&src, &members, &hits, |line| take(line, found))?;
    // The tail: what no run covers.
    let end = if gz { u64::MAX } else { src.size };
    if covered < end {
        found.scanned += scan(&src, covered, |_, line| {
            if rcpt_of(line).is_some_and(|r| r.to_lowercase() == want) {
                take(line, found);
            }
        })?;
    }
    Ok(())
}

/// An opened generation file.
struct Source<'a> {
    file: &'a File,
    id: (u64, u64),
    size: u64,
    gz: bool,
}

/// Calls `line` with each complete line (its offset, its bytes without the newline)
/// from `from` on: file offsets in a plain file, decompressed ones in a gzip (whose
/// scan starts at 0). A last line without its newline is left out of a plain file
/// (it may be half written) and kept in a gzip (complete by construction).
/// Returns the octets read; `members` of a gzip are its (decompressed start,
/// compressed start) pairs, filled when given.
fn scan_lines(
    src: &Source,
    from: u64,
    mut members: Option<&mut Vec<(u64, u64)>>,
    mut line: impl FnMut(u64, &[u8]),
) -> std::io::Result<(u64, u64)> {
    let mut f = src.file;
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_at = from;
    let mut chunk = vec![0u8; 1 << 20];
    let mut feed = |buf: &[u8], pos: &mut u64, line: &mut dyn FnMut(u64, &[u8])| {
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', buf) {
            if pending.is_empty() {
                line(*pos + start as u64, &buf[start..nl]);
            } else {
                pending.extend_from_slice(&buf[start..nl]);
                line(pending_at, &pending);
                pending.clear();
            }
            start = nl + 1;
        }
        if start < buf.len() {
            if pending.is_empty() {
                pending_at = *pos + start as u64;
            }
            pending.extend_from_slice(&buf[start..]);
        }
        *pos += buf.len() as u64;
    };
    if !src.gz {
        f.seek(SeekFrom::Start(from))?;
        let mut pos = from;
        loop {
            let n = f.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            feed(&chunk[..n], &mut pos, &mut line);
        }
        // Complete lines only: the end of the last newline.
        return Ok((pos - from, pos - pending.len() as u64));
    }
    f.seek(SeekFrom::Start(0))?;
    let mut counted = Counted {
        inner: BufReader::with_capacity(1 << 16, f),
        pos: 0,
    };
    let mut dpos = 0u64;
    loop {
        if counted.fill_buf()?.is_empty() {
            break;
        }
        if let Some(m) = members.as_deref_mut() {
            m.push((dpos, counted.pos));
        }
        let mut dec = flate2::bufread::GzDecoder::new(&mut counted);
        loop {
            let n = dec.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            feed(&chunk[..n], &mut dpos, &mut line);
        }
    }
    if !pending.is_empty() {
        line(pending_at, &pending);
    }
    Ok((src.size, dpos))
}

/// Scans from `from` to the end, calling `line` for each; the octets read.
fn scan(src: &Source, from: u64, line: impl FnMut(u64, &[u8])) -> std::io::Result<u64> {
    scan_lines(src, from, None, line).map(|(read, _)| read)
}

/// A BufRead that counts what its reader consumed: the compressed offset where the
/// next gzip member starts.
struct Counted<R> {
    inner: R,
    pos: u64,
}

impl<R: BufRead> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Counted<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.pos += n as u64;
        self.inner.consume(n);
    }
}

/// Reads the lines starting at `offsets` (sorted) and calls `line` with each. A
/// gzip is decompressed from the member holding each offset (or, for the next
/// offset ahead in the same stream, from where the last read stopped).
fn read_lines_at(
    src: &Source,
    members: &[(u64, u64)],
    offsets: &[u64],
    mut line: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut buf = Vec::new();
    if !src.gz {
        for &off in offsets {
            buf.clear();
            read_line_plain(src.file, off, &mut buf)?;
            line(&buf);
        }
        return Ok(());
    }
    let mut stream: Option<(u64, Box<dyn BufRead>)> = None;
    for &off in offsets {
        let m = members
            .partition_point(|&(d, _)| d <= off)
            .saturating_sub(1);
        let (dstart, cstart) = members.get(m).copied().unwrap_or((0, 0));
        // Going on in the open stream beats a new one unless a member start lies
        // between (then the new one starts nearer).
        let reuse = matches!(&stream, Some((pos, _)) if *pos <= off && *pos >= dstart);
        if !reuse {
            let mut f = src.file.try_clone()?;
            f.seek(SeekFrom::Start(cstart))?;
            let dec = flate2::bufread::MultiGzDecoder::new(BufReader::new(f));
            stream = Some((dstart, Box::new(BufReader::new(dec))));
        }
        let (pos, r) = stream.as_mut().expect("opened above");
        std::io::copy(&mut r.take(off - *pos), &mut std::io::sink())?;
        buf.clear();
        let n = r.take(LINE_OCTETS_MAX as u64).read_until(b'\n', &mut buf)?;
        *pos = off + n as u64;
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        line(&buf);
    }
    Ok(())
}

fn read_line_plain(f: &File, off: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    let mut at = off;
    while buf.len() < LINE_OCTETS_MAX {
        let n = f.read_at(&mut chunk, at)?;
        if n == 0 {
            return Ok(());
        }
        if let Some(nl) = memchr::memchr(b'\n', &chunk[..n]) {
            buf.extend_from_slice(&chunk[..nl]);
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        at += n as u64;
    }
    Ok(())
}

/// The index directory of one log.
struct IndexDir {
    dir: PathBuf,
    /// Whether runs can be written here (a `log_group` member reads the runs the
    /// service user made, and scans what they do not cover).
    writable: bool,
    /// The log's owner (given to what is made here when root makes it) and group
    /// (given whenever the maker may: it is in that group).
    owner: (Option<u32>, Option<u32>),
}

/// One run, checked: its fence and members in memory, its entries on disk.
struct Run {
    path: PathBuf,
    file: File,
    start: u64,
    end: u64,
    entries: u64,
    /// (first hash, CRC-32C) of each block.
    fence: Vec<(u64, u32)>,
    members: Vec<(u64, u64)>,
}

/// The path of the index directory of the log at `log`: `.NAME.idx` beside it.
pub fn index_dir(log: &Path) -> PathBuf {
    let name = log
        .file_name()
        .map_or("log".into(), |n| n.to_string_lossy().into_owned());
    log.with_file_name(format!(".{name}.idx"))
}

impl IndexDir {
    /// The directory, made when missing (0750, the log's group; the log's owner when
    /// made by root); None when it is missing and cannot be made.
    fn open(log: &Path) -> Option<IndexDir> {
        use std::os::unix::fs::PermissionsExt;
        let dir = index_dir(log);
        let meta = std::fs::metadata(log).ok();
        let root = crate::host::accounts::euid() == 0;
        let owner = (
            meta.as_ref().map(|m| m.uid()).filter(|_| root),
            meta.as_ref().map(|m| m.gid()),
        );
        if !dir.is_dir() {
            std::fs::create_dir(&dir).ok()?;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750));
            let _ = std::os::unix::fs::chown(&dir, owner.0, owner.1);
        }
        let probe = dir.join(format!(".probe-{}", std::process::id()));
        let writable = File::create(&probe).is_ok();
        let _ = std::fs::remove_file(&probe);
        Some(IndexDir {
            dir,
            writable,
            owner,
        })
    }

    fn prefix(id: (u64, u64)) -> String {
        format!("{}-{}.", id.0, id.1)
    }

    /// The checked runs of `src`, chained from 0, and the offset they cover to;
    /// extended over a long tail, merged past [`RUNS_MAX`], rebuilt when any is bad.
    fn runs_for(&self, src: &Source, built: &mut usize) -> std::io::Result<(Vec<Run>, u64)> {
        let mut runs = self.load_runs(src);
        let chained = runs
            .iter()
            .enumerate()
            .all(|(i, r)| r.start == if i == 0 { 0 } else { runs[i - 1].end })
            && runs.iter().all(|r| r.end <= src.size)
            && (!src.gz || runs.iter().all(|r| r.end == src.size));
        if !chained {
            for r in runs.drain(..) {
                let _ = std::fs::remove_file(&r.path);
            }
        }
        let covered = runs.last().map_or(0, |r| r.end);
        let todo = if src.gz {
            (runs.is_empty()).then_some(0)
        } else {
            (src.size - covered > TAIL_SCAN_MAX).then_some(covered)
        };
        if let Some(from) = todo.filter(|_| self.writable) {
            match self.build(src, from) {
                Ok(r) => {
                    *built += 1;
                    runs.push(r);
                }
                // A run that cannot be written: the rest is scanned.
                Err(e) if is_write_error(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if runs.len() > RUNS_MAX && self.writable {
            if let Ok(r) = self.merge(src, &runs) {
                let old = std::mem::replace(&mut runs, vec![r]);
                for o in old {
                    let _ = std::fs::remove_file(&o.path);
                }
                *built += 1;
            }
        }
        let covered = match (src.gz, runs.last()) {
            (true, Some(_)) => u64::MAX,
            (_, r) => r.map_or(0, |r| r.end),
        };
        Ok((runs, covered))
    }

    /// The runs of `src` on disk that pass their checks, by start; bad ones deleted.
    fn load_runs(&self, src: &Source) -> Vec<Run> {
        let prefix = IndexDir::prefix(src.id);
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut runs = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&prefix) || !name.ends_with(".run") {
                continue;
            }
            match Run::open(&e.path(), src) {
                Some(r) => runs.push(r),
                None => {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        runs.sort_by_key(|r| r.start);
        runs
    }

    /// Indexes `src` from `from` to its last complete line (a gzip: all of it) as a
    /// new run.
    fn build(&self, src: &Source, from: u64) -> std::io::Result<Run> {
        let mut entries: Vec<(u64, u64)> = Vec::new();
        let mut members = Vec::new();
        let (_, end_line) = scan_lines(src, from, Some(&mut members), |off, line| {
            if let Some(r) = rcpt_of(line) {
                entries.push((key(&r), off));
            }
        })?;
        let end = if src.gz { src.size } else { end_line };
        entries.sort_unstable();
        self.write_run(src, from, end, &entries, &members)
    }

    /// One run over everything `runs` cover, from their entries.
    fn merge(&self, src: &Source, runs: &[Run]) -> std::io::Result<Run> {
        let mut entries = Vec::new();
        for r in runs {
            entries.extend(r.all_entries()?);
        }
        entries.sort_unstable();
        let end = runs.last().map_or(0, |r| r.end);
        self.write_run(src, 0, end, &entries, &[])
    }

    fn write_run(
        &self,
        src: &Source,
        start: u64,
        end: u64,
        entries: &[(u64, u64)],
        members: &[(u64, u64)],
    ) -> std::io::Result<Run> {
        let name = format!("{}{start:016x}-{end:016x}.run", IndexDir::prefix(src.id));
        let path = self.dir.join(&name);
        // Per process: two lookups may build the same run at once (the last rename wins).
        let tmp = self.dir.join(format!("{name}.{}.tmp", std::process::id()));
        let mut fence_bytes = Vec::new();
        let mut body = Vec::with_capacity(entries.len() * ENTRY_OCTETS);
        for block in entries.chunks(BLOCK_ENTRIES) {
            let from = body.len();
            for (h, p) in block {
                body.extend_from_slice(&h.to_le_bytes());
                body.extend_from_slice(&p.to_le_bytes());
            }
            fence_bytes.extend_from_slice(&block[0].0.to_le_bytes());
            fence_bytes.extend_from_slice(&crc32c::crc32c(&body[from..]).to_le_bytes());
            fence_bytes.extend_from_slice(&[0; 4]);
        }
        let mut member_bytes = Vec::new();
        for (d, c) in members {
            member_bytes.extend_from_slice(&d.to_le_bytes());
            member_bytes.extend_from_slice(&c.to_le_bytes());
        }
        let (head, tail) = fingerprint(src, start, end)?;
        let mut h = Vec::with_capacity(HEADER_OCTETS);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&u32::from(src.gz).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        for v in [
            src.id.0,
            src.id.1,
            start,
            end,
            entries.len() as u64,
            (fence_bytes.len() / FENCE_OCTETS) as u64,
            members.len() as u64,
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        for v in [
            head,
            tail,
            crc32c::crc32c(&fence_bytes),
            crc32c::crc32c(&member_bytes),
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h.extend_from_slice(&crc32c::crc32c(&h).to_le_bytes());
        h.resize(HEADER_OCTETS, 0);
        {
            let mut f = File::create(&tmp)?;
            self.give(&f);
            let mut w = std::io::BufWriter::new(&mut f);
            w.write_all(&h)?;
            w.write_all(&fence_bytes)?;
            w.write_all(&member_bytes)?;
            w.write_all(&body)?;
            w.flush()?;
        }
        std::fs::rename(&tmp, &path)?;
        Run::open(&path, src)
            .ok_or_else(|| std::io::Error::other(format!("{}: does not read back", path.display())))
    }

    /// Mode 0640 and the log's group (and owner, when root writes it).
    fn give(&self, f: &File) {
        use std::os::unix::fs::PermissionsExt;
        let _ = f.set_permissions(std::fs::Permissions::from_mode(
            crate::host::files::LOG_MODE,
        ));
        let _ = std::os::unix::fs::fchown(f, self.owner.0, self.owner.1);
    }

    /// Deletes the runs of files not among `gens`, and .tmp files left by a lookup
    /// that stopped (older than [`TMP_ABANDONED_AFTER`]: a younger one may be another
    /// lookup's, being written).
    fn forget_others(&self, gens: &[PathBuf]) {
        let live: Vec<String> = gens
            .iter()
            .filter_map(|g| identity_of(g))
            .map(IndexDir::prefix)
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let abandoned = name.ends_with(".tmp")
                && e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() > TMP_ABANDONED_AFTER);
            let orphan = !live.iter().any(|p| name.starts_with(p)) && !name.ends_with(".tmp");
            if abandoned || orphan {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn is_write_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        PermissionDenied | ReadOnlyFilesystem | StorageFull | QuotaExceeded
    )
}

/// CRC-32C of the first and last [`FINGERPRINT_OCTETS`] of `start..end` of `src`.
fn fingerprint(src: &Source, start: u64, end: u64) -> std::io::Result<(u32, u32)> {
    let read = |from: u64, to: u64| -> std::io::Result<u32> {
        let mut buf = vec![0u8; (to - from) as usize];
        src.file.read_exact_at(&mut buf, from)?;
        Ok(crc32c::crc32c(&buf))
    };
    let head_end = end.min(start + FINGERPRINT_OCTETS);
    let tail_start = end.saturating_sub(FINGERPRINT_OCTETS).max(start);
    Ok((read(start, head_end)?, read(tail_start, end)?))
}

impl Run {
    /// The run at `path` for `src`, or None when any check fails.
    fn open(path: &Path, src: &Source) -> Option<Run> {
        let file = File::open(path).ok()?;
        let mut h = [0u8; HEADER_OCTETS];
        file.read_exact_at(&mut h, 0).ok()?;
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        if &h[..8] != MAGIC || u32_at(72 + 16) != crc32c::crc32c(&h[..88]) {
            return None;
        }
        let (dev, ino, start, end) = (u64_at(16), u64_at(24), u64_at(32), u64_at(40));
        let (entries, blocks, members) = (u64_at(48), u64_at(56), u64_at(64));
        let (head, tail, fence_crc, members_crc) = (u32_at(72), u32_at(76), u32_at(80), u32_at(84));
        let len = file.metadata().ok()?.len();
        let expect = HEADER_OCTETS as u64
            + blocks * FENCE_OCTETS as u64
            + members * MEMBER_OCTETS as u64
            + entries * ENTRY_OCTETS as u64;
        if (dev, ino) != src.id
            || (u32_at(8) == 1) != src.gz
            || end > src.size
            || start > end
            || len != expect
            || blocks != entries.div_ceil(BLOCK_ENTRIES as u64)
            || fingerprint(src, start, end).ok()? != (head, tail)
        {
            return None;
        }
        let mut fence_bytes = vec![0u8; blocks as usize * FENCE_OCTETS];
        file.read_exact_at(&mut fence_bytes, HEADER_OCTETS as u64)
            .ok()?;
        let mut member_bytes = vec![0u8; members as usize * MEMBER_OCTETS];
        file.read_exact_at(
            &mut member_bytes,
            (HEADER_OCTETS + fence_bytes.len()) as u64,
        )
        .ok()?;
        if crc32c::crc32c(&fence_bytes) != fence_crc || crc32c::crc32c(&member_bytes) != members_crc
        {
            return None;
        }
        let pair = |b: &[u8]| {
            (
                u64::from_le_bytes(b[..8].try_into().unwrap()),
                u64::from_le_bytes(b[8..16].try_into().unwrap()),
            )
        };
        Some(Run {
            path: path.to_path_buf(),
            file,
            start,
            end,
            entries,
            fence: fence_bytes
                .chunks(FENCE_OCTETS)
                .map(|b| {
                    let (h, c) = pair(b);
                    (h, c as u32)
                })
                .collect(),
            members: member_bytes.chunks(MEMBER_OCTETS).map(pair).collect(),
        })
    }

    fn entries_at(&self) -> u64 {
        (HEADER_OCTETS + self.fence.len() * FENCE_OCTETS + self.members.len() * MEMBER_OCTETS)
            as u64
    }

    /// Block `i`'s entries, its CRC checked. Errors: a CRC mismatch (InvalidData).
    fn block(&self, i: usize) -> std::io::Result<Vec<(u64, u64)>> {
        let n = (self.entries as usize - i * BLOCK_ENTRIES).min(BLOCK_ENTRIES);
        let mut b = vec![0u8; n * ENTRY_OCTETS];
        self.file.read_exact_at(
            &mut b,
            self.entries_at() + (i * BLOCK_ENTRIES * ENTRY_OCTETS) as u64,
        )?;
        if crc32c::crc32c(&b) != self.fence[i].1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: block {i} fails its CRC", self.path.display()),
            ));
        }
        Ok(b.chunks(ENTRY_OCTETS)
            .map(|e| {
                (
                    u64::from_le_bytes(e[..8].try_into().unwrap()),
                    u64::from_le_bytes(e[8..].try_into().unwrap()),
                )
            })
            .collect())
    }

    /// The positions of entries with hash `h`.
    fn find_checked(&self, h: u64) -> std::io::Result<Vec<u64>> {
        // Blocks whose range can hold h: from the last starting below it through
        // the last starting at it (equal hashes may span blocks).
        let first = self.fence.partition_point(|f| f.0 < h).saturating_sub(1);
        let last = self.fence.partition_point(|f| f.0 <= h);
        let mut out = Vec::new();
        for i in first..last.max(first + 1).min(self.fence.len()) {
            out.extend(self.block(i)?.into_iter().filter(|e| e.0 == h).map(|e| e.1));
        }
        Ok(out)
    }

    /// As `find_checked`; a run whose block fails its CRC is deleted and the lookup
    /// fails with InvalidData, so the caller can rebuild.
    fn find(&self, h: u64) -> std::io::Result<Vec<u64>> {
        self.find_checked(h).inspect_err(|_| {
            let _ = std::fs::remove_file(&self.path);
        })
    }

    fn all_entries(&self) -> std::io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::with_capacity(self.entries as usize);
        for i in 0..self.fence.len() {
            out.extend(self.block(i)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::log::{Kind, Record};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("volley-track-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `n` records, recipient `r{i % rcpts}@example.com` (every 7th in capitals),
    /// with a Shaping record now and then.
    fn lines(from: usize, n: usize, rcpts: usize) -> String {
        let mut out = String::new();
        for i in from..from + n {
            let rcpt = match i % 7 {
                0 => format!("R{}@EXAMPLE.com", i % rcpts),
                _ => format!("r{}@example.com", i % rcpts),
            };
            let r = Record {
                kind: Kind::TransientFailure,
                time: format!(
                    "2026-11-30T10:{:02}:{:02}.{:03}Z",
                    i / 60_000 % 60,
                    i / 1000 % 60,
                    i % 1000
                ),
                campaign: "c",
                rcpt: &rcpt,
                sender: "b@news.test",
                domain: "example.com",
                mx: Some("mx.example.com"),
                ip: Some("192.0.2.1:25".into()),
                code: 450,
                enhanced: Some("4.2.1"),
                class: Some("transient_other"),
                reply: &format!("try later \"{i}\""),
                tls: None,
                stage: "rcpt",
                attempt: i as u32,
                queued_ms: 1,
                tx_ms: None,
                shard: 0,
                last_attempt: None,
            };
            out.push_str(&serde_json::to_string(&r).unwrap());
            out.push('\n');
            if i % 100 == 0 {
                out.push_str("{\"type\":\"Shaping\",\"time\":\"x\",\"event\":\"throttled\",\"key\":\"k\",\"reason\":\"r\",\"shard\":0}\n");
            }
        }
        out
    }

    fn attempts(f: &Found) -> Vec<u32> {
        let mut a: Vec<u32> = f.events.iter().map(|e| e.attempt).collect();
        a.sort_unstable();
        a
    }

    fn append(p: &Path, text: &str) {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(p)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    #[test]
    fn hits_come_from_every_generation_in_any_case_and_survive_growth() {
        let d = dir("gens");
        let log = d.join("acct.jsonl");
        // ~3 MiB per generation: past TAIL_SCAN_MAX, so the file in use gets runs.
        let per = 12_000;
        std::fs::write(d.join("acct.jsonl.20261130T100000Z"), lines(0, per, 500)).unwrap();
        std::fs::write(d.join("acct.jsonl.20261130T110000Z"), lines(per, per, 500)).unwrap();
        crate::observe::rotation::compress(&d.join("acct.jsonl.20261130T110000Z")).unwrap();
        std::fs::write(&log, lines(2 * per, per, 500)).unwrap();
        // The rotated files are older than the one in use.
        for (n, age) in [
            ("acct.jsonl.20261130T100000Z", 200),
            ("acct.jsonl.20261130T110000Z.gz", 100),
        ] {
            File::options()
                .write(true)
                .open(d.join(n))
                .unwrap()
                .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(age))
                .unwrap();
        }
        let want: Vec<u32> = (0..3 * per as u32).filter(|i| i % 500 == 7).collect();
        let first = lookup(&log, "R7@Example.COM", None).unwrap();
        assert_eq!(attempts(&first), want);
        assert_eq!(first.runs_built, 3, "one run per generation");
        assert!(first.events.windows(2).all(|w| w[0].time <= w[1].time));
        let warm = lookup(&log, "r7@example.com", None).unwrap();
        assert_eq!(attempts(&warm), want);
        assert_eq!(
            (warm.runs_built, warm.scanned),
            (0, 0),
            "all from the index"
        );
        assert!(lookup(&log, "r7@example.com", Some("other"))
            .unwrap()
            .events
            .is_empty());
        assert!(lookup(&log, "nobody@example.com", None)
            .unwrap()
            .events
            .is_empty());

        // The log grows: a short tail is scanned, a long one indexed as a new run.
        append(&log, &lines(3 * per, 10, 500));
        let grown = lookup(&log, "r7@example.com", None).unwrap();
        assert!(grown.scanned > 0 && grown.runs_built == 0);
        let want: Vec<u32> = (0..(3 * per + 10) as u32)
            .filter(|i| i % 500 == 7)
            .collect();
        assert_eq!(attempts(&grown), want, "36007 is in the tail");
        append(&log, &lines(3 * per + 10, per, 500));
        let grown = lookup(&log, "r7@example.com", None).unwrap();
        assert_eq!(grown.runs_built, 1);
        let want: Vec<u32> = (0..(4 * per + 10) as u32)
            .filter(|i| i % 500 == 7)
            .collect();
        assert_eq!(attempts(&grown), want);

        // Rotated (renamed): its runs go with it; a new file in use starts empty.
        std::fs::rename(&log, d.join("acct.jsonl.20261130T120000Z")).unwrap();
        std::fs::write(&log, lines(5 * per, 3, 500)).unwrap();
        let rotated = lookup(&log, "r7@example.com", None).unwrap();
        assert_eq!(attempts(&rotated), want);
        assert_eq!(rotated.runs_built, 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_corrupt_or_stale_index_is_rebuilt_never_believed() {
        let d = dir("corrupt");
        let log = d.join("acct.jsonl");
        std::fs::write(&log, lines(0, 20_000, 300)).unwrap();
        let want: Vec<u32> = (0..20_000).filter(|i| i % 300 == 5).collect();
        assert_eq!(
            attempts(&lookup(&log, "r5@example.com", None).unwrap()),
            want
        );
        let run = std::fs::read_dir(index_dir(&log))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "run"))
            .unwrap();
        // Every block's bytes flipped in turn would be slow; flip the whole body.
        let mut bytes = std::fs::read(&run).unwrap();
        let n = bytes.len();
        for b in &mut bytes[n - 20_000..] {
            *b ^= 0x55;
        }
        std::fs::write(&run, &bytes).unwrap();
        let again = lookup(&log, "r5@example.com", None).unwrap();
        assert_eq!(attempts(&again), want);
        assert_eq!(again.runs_built, 1, "rebuilt");
        // A header that lies (a garbage file under a run's name) is dropped.
        std::fs::write(&run, b"not a run").unwrap();
        assert_eq!(
            attempts(&lookup(&log, "r5@example.com", None).unwrap()),
            want
        );
        // The file replaced by another of other content: its fingerprint differs.
        std::fs::write(&log, lines(100_000, 20_000, 300)).unwrap();
        let want: Vec<u32> = (100_000..120_000).filter(|i| i % 300 == 5).collect();
        assert_eq!(
            attempts(&lookup(&log, "r5@example.com", None).unwrap()),
            want
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn many_runs_are_merged_and_a_half_line_waits() {
        let d = dir("merge");
        let log = d.join("acct.jsonl");
        let per = 5_000; // over 1 MiB each
        let mut total = 0;
        for _ in 0..RUNS_MAX + 1 {
            append(&log, &lines(total, per, 1000));
            total += per;
            lookup(&log, "r1@example.com", None).unwrap();
        }
        let runs = std::fs::read_dir(index_dir(&log)).unwrap().count();
        assert_eq!(runs, 1, "merged");
        // A line being written (no newline yet) is not a record yet.
        append(&log, &lines(total, 1, 1).trim_end()[..100]);
        let want: Vec<u32> = (0..total as u32).filter(|i| i % 1000 == 1).collect();
        assert_eq!(
            attempts(&lookup(&log, "r1@example.com", None).unwrap()),
            want
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_key_and_the_rcpt_reader_agree_with_serde() {
        assert_eq!(key("Ann@Example.COM"), key("ann@example.com"));
        assert_eq!(key("Ünï@x.test"), key("ünï@x.test"));
        assert_ne!(key("a@x.test"), key("b@x.test"));
        let line =
            br#"{"type":"Bounce","time":"t","campaign":"c\"q","rcpt":"a\u0041@x.test","code":5}"#;
        assert_eq!(rcpt_of(line).unwrap(), "aA@x.test");
        assert_eq!(rcpt_of(br#"{"type":"Shaping"}"#), None);
    }
}
