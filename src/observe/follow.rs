//! Following the accounting log as it grows, across its rotations, from a durable
//! [`Cursor`]: the reader behind the webhooks (serve/webhook.rs), which must send
//! every record at least once across restarts and never skip one.
//!
//! A generation (the file in use, or a rotated `LOG.STAMP`, maybe gzipped) is named
//! by the SHA-256 of its first line: the name changes at rotation and the inode at
//! compression, the first line never does. A cursor is that name, the octets of
//! the generation's uncompressed content consumed (whole lines only), and the
//! generation's last-write time when it was opened; the last places the cursor
//! among the generations when its own is gone (deleted by `log_keep_days`).
//! Generations are ordered as rotation.rs orders them: by last write, the file in
//! use last. A file renamed by logrotate is read on until the writer reopens the
//! path (SIGUSR1) and writes there.

use crate::observe::rotation::{self, Generation};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest record line taken whole: a longer one (no record of volley's is near it;
/// a file that is not a log) is handed on cut at this length, which is no JSON.
pub const LINE_OCTETS_MAX: usize = 1 << 20;
/// Times the next generation is looked for again when the log rotated while it
/// was being looked for.
const ADVANCE_ATTEMPTS_MAX: u32 = 10;

/// Where a follower is: after `offset` octets of the generation whose first line
/// hashes to `first_line_sha256`. Stored as JSON in a cursor file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The generation's file name when the cursor was taken (for messages; it
    /// changes at rotation).
    pub file: String,
    /// SHA-256 (lowercase hex) of its first line, without the newline; empty when
    /// nothing of it was read yet (then `offset` is 0).
    pub first_line_sha256: String,
    /// Octets of its uncompressed content consumed: whole lines.
    pub offset: u64,
    /// Its last write (Unix milliseconds) when it was opened: a generation written
    /// this late or later is this one or a newer one.
    pub modified_unix_ms: u64,
}

/// Why the log could not be followed, or a cursor read or written.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("accounting log {}: {err}", path.display())]
    Log { path: PathBuf, err: std::io::Error },
    #[error("cursor {}: cannot read it: {err}; check that the user volley runs as may read it", path.display())]
    CursorRead { path: PathBuf, err: std::io::Error },
    #[error("cursor {}: not a cursor ({err}); delete it to start again from the beginning of the log file in use (records there are sent again)", path.display())]
    CursorSyntax {
        path: PathBuf,
        err: serde_json::Error,
    },
    #[error("cursor {}: cannot write it: {err}; check the free space and that the user volley runs as owns its directory", path.display())]
    CursorWrite { path: PathBuf, err: std::io::Error },
}

impl Cursor {
    /// The cursor stored at `path`; None: there is none. Errors: it cannot be read or
    /// is not a cursor.
    pub fn load(path: &Path) -> Result<Option<Cursor>, FollowError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(FollowError::CursorRead {
                    path: path.into(),
                    err,
                })
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|err| FollowError::CursorSyntax {
                path: path.into(),
                err,
            })
    }

    /// Writes the cursor to `path` durably: a temporary file synced, renamed over
    /// the old one, the directory synced; a crash leaves the old cursor or this one.
    pub fn store(&self, path: &Path) -> Result<(), FollowError> {
        let err = |err| FollowError::CursorWrite {
            path: path.into(),
            err,
        };
        let tmp = PathBuf::from(format!("{}.tmp", path.display()));
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        let text = serde_json::to_vec(self).expect("a cursor serialises");
        f.write_all(&text).map_err(err)?;
        f.write_all(b"\n").map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        rotation::sync_dir(path).map_err(err)
    }
}

/// A reader of the accounting log's record lines, oldest first, that goes on into
/// newer generations and waits at the end of the file in use.
pub struct Follower {
    log: PathBuf,
    gen: Open,
    /// What a cursor taken now says: after the last line handed out.
    at: Cursor,
}

/// The generation being read.
struct Open {
    g: Generation,
    name: String,
    /// Known once its first line is read.
    first_line_sha256: Option<String>,
    /// Octets of whole lines consumed.
    offset: u64,
    /// Its last write when opened.
    modified: SystemTime,
    /// A line still being written (the file in use), kept until its newline comes.
    partial: Vec<u8>,
}

/// What [`Follower::open`] found of the cursor's place, when not the place itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gone {
    /// The cursor's generation (its name then) and the octets sent from it.
    pub file: String,
    pub offset: u64,
    /// The generation reading goes on from.
    pub from: String,
    /// The cursor's generation is there but shorter than its offset (truncated,
    /// as logrotate's copytruncate does): its length; reading goes on from its end.
    pub shorter: Option<u64>,
}

impl Follower {
    /// A follower of the log at `log` from `cursor`: its generation, found by its
    /// first line wherever rotation put it; without a cursor, the beginning of the
    /// file in use. When the cursor's generation is gone, reading goes on from the
    /// oldest generation written since, and [`Gone`] says so (the records after the
    /// cursor in it were not read). Errors: a generation cannot be opened or read.
    pub fn open(
        log: &Path,
        cursor: Option<&Cursor>,
    ) -> Result<(Follower, Option<Gone>), FollowError> {
        let lerr = |err| FollowError::Log {
            path: log.into(),
            err,
        };
        let Some(c) = cursor else {
            let gen = open_at(log, log)?.ok_or_else(|| {
                lerr(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the file in use is missing",
                ))
            })?;
            let at = gen.cursor();
            return Ok((
                Follower {
                    log: log.into(),
                    gen,
                    at,
                },
                None,
            ));
        };
        let candidates = candidates(log).map_err(lerr)?;
        if !c.first_line_sha256.is_empty() {
            if let Some(gen) = find(log, &candidates, c)? {
                let mut f = Follower {
                    log: log.into(),
                    gen,
                    at: c.clone(),
                };
                f.skip_to(c.offset)?;
                let shorter = (f.gen.offset < c.offset).then(|| Gone {
                    file: c.file.clone(),
                    offset: c.offset,
                    from: f.gen.name.clone(),
                    shorter: Some(f.gen.offset),
                });
                return Ok((f, shorter));
            }
        }
        let since = UNIX_EPOCH + Duration::from_millis(c.modified_unix_ms);
        let path = candidates
            .iter()
            .find(|(_, m)| *m >= since)
            .map_or(log, |(p, _)| p.as_path());
        let gen = open_at(log, path)?.ok_or_else(|| {
            lerr(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} went while it was opened; start again", path.display()),
            ))
        })?;
        let gone = (!c.first_line_sha256.is_empty()).then(|| Gone {
            file: c.file.clone(),
            offset: c.offset,
            from: gen.name.clone(),
            shorter: None,
        });
        // Nothing of the new place read yet: a cursor taken now still says the old.
        Ok((
            Follower {
                log: log.into(),
                gen,
                at: c.clone(),
            },
            gone,
        ))
    }

    /// The cursor after the last line handed out.
    pub fn cursor(&self) -> &Cursor {
        &self.at
    }

    /// The next whole record line (without its newline) into `out`, replacing what it
    /// held; false: none yet (the end of the file in use). Errors: a generation
    /// cannot be read, with its path.
    pub fn next_line(&mut self, out: &mut Vec<u8>) -> Result<bool, FollowError> {
        for _ in 0..ADVANCE_ATTEMPTS_MAX {
            if self.read_line(out)? {
                return Ok(true);
            }
            match rotation::identity(&self.log) {
                // The file in use: more comes later.
                Some(id) if id == self.gen.g.id => return Ok(false),
                // Renamed by logrotate, and the writer has not reopened the path
                // yet: it still writes to this file.
                None => return Ok(false),
                Some(_) => {}
            }
            // Rotated, perhaps after the read above: what was written before the
            // rotation is in the file, read it first.
            if self.read_line(out)? {
                return Ok(true);
            }
            if !self.gen.partial.is_empty() {
                // The writer writes one file at a time: once the file in use has
                // content, this file's last line, cut off, stays so (a crash
                // mid-write) and is a line. Until then a write may still end it.
                if std::fs::metadata(&self.log).map_or(0, |m| m.len()) == 0 {
                    return Ok(false);
                }
                out.clear();
                out.append(&mut self.gen.partial);
                let octets = out.len() as u64;
                self.consumed(out, octets);
                return Ok(true);
            }
            if !self.advance()? {
                return Ok(false);
            }
        }
        Ok(false)
    }

    /// Octets on disk not yet read: the rest of the file in use, and every newer
    /// generation's file (a gzipped one's compressed size). An estimate for a gauge.
    pub fn lag_octets(&self) -> u64 {
        let live = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        if rotation::identity(&self.log) == Some(self.gen.g.id) {
            return live.saturating_sub(self.gen.offset);
        }
        let newer: u64 = rotation::rotated_oldest_first(&self.log)
            .unwrap_or_default()
            .iter()
            .filter(|(_, m, id)| *m > self.gen.modified && *id != Some(self.gen.g.id))
            .filter_map(|(p, _, _)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        live + newer
    }

    fn read_line(&mut self, out: &mut Vec<u8>) -> Result<bool, FollowError> {
        let g = &mut self.gen;
        let room = (LINE_OCTETS_MAX - g.partial.len()) as u64;
        (&mut g.g.reader)
            .take(room)
            .read_until(b'\n', &mut g.partial)
            .map_err(|err| FollowError::Log {
                path: g.g.path.clone(),
                err,
            })?;
        let whole = g.partial.last() == Some(&b'\n');
        if !whole && g.partial.len() < LINE_OCTETS_MAX {
            return Ok(false);
        }
        out.clear();
        out.append(&mut g.partial);
        let octets = out.len() as u64;
        if whole {
            out.pop();
        }
        self.consumed(out, octets);
        Ok(true)
    }

    /// `line` (as handed out, no newline), `octets` of the file, was consumed: the
    /// offset and the cursor move.
    fn consumed(&mut self, line: &[u8], octets: u64) {
        let g = &mut self.gen;
        if g.offset == 0 {
            g.first_line_sha256 = Some(sha256_hex(line));
        }
        g.offset += octets;
        self.at = g.cursor();
    }

    /// Reads and drops the first `offset` octets of the generation (whole lines, as
    /// a cursor counts them). A generation shorter than that (truncated by hand)
    /// leaves the follower at its end.
    fn skip_to(&mut self, offset: u64) -> Result<(), FollowError> {
        if self.seek_plain(offset)? {
            return Ok(());
        }
        let mut line = Vec::new();
        while self.gen.offset < offset {
            if !self.read_line(&mut line)? {
                break;
            }
        }
        Ok(())
    }

    /// A plain generation (the file in use, or rotated and not yet gzipped) at least
    /// `offset` long: the reader is moved there at once, not read through (a 1 GiB
    /// file would hold the start up); true when done. Its first line was hashed
    /// when it was found, so the hash is known.
    fn seek_plain(&mut self, offset: u64) -> Result<bool, FollowError> {
        use std::io::{Seek, SeekFrom};
        let g = &mut self.gen;
        if g.g.path.extension().is_some_and(|x| x == "gz") {
            return Ok(false);
        }
        let lerr = |err| FollowError::Log {
            path: g.g.path.clone(),
            err,
        };
        let mut file = std::fs::File::open(&g.g.path).map_err(lerr)?;
        let meta = file.metadata().map_err(lerr)?;
        if (meta.dev(), meta.ino()) != g.g.id || meta.len() < offset {
            // Rotated or compressed since it was found, or shorter: read through.
            return Ok(false);
        }
        file.seek(SeekFrom::Start(offset)).map_err(lerr)?;
        g.g.reader = Box::new(std::io::BufReader::new(file));
        g.first_line_sha256 = Some(self.at.first_line_sha256.clone());
        g.offset = offset;
        self.at = g.cursor();
        Ok(true)
    }

    /// Opens the generation after the one read to its end; false: it is not there
    /// yet. The next one is the file listed after this one, or the file in use; if
    /// the log rotated again meanwhile, the one rotated in between.
    fn advance(&mut self) -> Result<bool, FollowError> {
        let lerr = |err| FollowError::Log {
            path: self.log.clone(),
            err,
        };
        for _ in 0..ADVANCE_ATTEMPTS_MAX {
            let before = self.next_path().map_err(lerr)?;
            let Some(next) = open_at(&self.log, &before)? else {
                continue;
            };
            // A rotation between the listing and the open: the file in use opened
            // may be newer than the one rotated in between.
            if before == self.log && self.next_path().map_err(lerr)? != self.log {
                continue;
            }
            self.gen = next;
            return Ok(true);
        }
        Ok(false)
    }

    /// The path of the generation after this one: the rotated file listed after it
    /// (found by identity, else by first line, else the first written since it was
    /// opened), or the file in use.
    fn next_path(&self) -> std::io::Result<PathBuf> {
        let listed = rotation::rotated_oldest_first(&self.log)?;
        let g = &self.gen;
        let mut at = listed.iter().position(|(_, _, id)| *id == Some(g.g.id));
        if at.is_none() {
            if let Some(h) = &g.first_line_sha256 {
                at = listed
                    .iter()
                    .rposition(|(p, _, _)| first_line_sha256(p).ok().flatten().as_ref() == Some(h));
            }
        }
        let next = match at {
            Some(i) => listed.get(i + 1),
            None => listed.iter().find(|(_, m, _)| *m > g.modified),
        };
        Ok(next.map_or(self.log.clone(), |(p, _, _)| p.clone()))
    }
}

impl Open {
    fn cursor(&self) -> Cursor {
        Cursor {
            file: self.name.clone(),
            first_line_sha256: self.first_line_sha256.clone().unwrap_or_default(),
            offset: self.offset,
            modified_unix_ms: self
                .modified
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

/// Every generation, oldest first, the file in use last, with its last write.
fn candidates(log: &Path) -> std::io::Result<Vec<(PathBuf, SystemTime)>> {
    let mut out: Vec<(PathBuf, SystemTime)> = rotation::rotated_oldest_first(log)?
        .into_iter()
        .map(|(p, m, _)| (p, m))
        .collect();
    if let Ok(m) = std::fs::metadata(log).and_then(|m| m.modified()) {
        out.push((log.to_path_buf(), m));
    }
    Ok(out)
}

/// The cursor's generation opened: the file of its name first (the usual case),
/// then every generation, newest first, by first line.
fn find(
    log: &Path,
    candidates: &[(PathBuf, SystemTime)],
    c: &Cursor,
) -> Result<Option<Open>, FollowError> {
    let named = candidates.iter().filter(|(p, _)| {
        p.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n == c.file || n.strip_suffix(".gz") == Some(c.file.as_str())
        })
    });
    let rest = candidates.iter().rev();
    for (p, _) in named.chain(rest) {
        let hash = first_line_sha256(p).map_err(|err| FollowError::Log {
            path: p.clone(),
            err,
        })?;
        if hash.as_deref() == Some(c.first_line_sha256.as_str()) {
            return open_at(log, p);
        }
    }
    Ok(None)
}

/// The generation at `p` opened at its start; None: gone (deleted for its age).
fn open_at(log: &Path, p: &Path) -> Result<Option<Open>, FollowError> {
    let lerr = |err| FollowError::Log {
        path: p.into(),
        err,
    };
    let Some(g) = rotation::open_generation(p).map_err(lerr)? else {
        return Ok(None);
    };
    let modified = std::fs::metadata(&g.path)
        .and_then(|m| m.modified())
        // Compressed and removed since it was opened: its .gz keeps the time.
        .or_else(|_| {
            std::fs::metadata(format!("{}.gz", g.path.display())).and_then(|m| m.modified())
        })
        .unwrap_or(UNIX_EPOCH);
    let name = g.path.file_name().map_or_else(
        || log.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    // A name for the cursor that outlives compression: without `.gz`.
    let name = name.strip_suffix(".gz").map(String::from).unwrap_or(name);
    Ok(Some(Open {
        g,
        name,
        first_line_sha256: None,
        offset: 0,
        modified,
        partial: Vec::new(),
    }))
}

/// The SHA-256 of the first whole line of the generation at `p`; None: it has none
/// yet, or is gone.
fn first_line_sha256(p: &Path) -> std::io::Result<Option<String>> {
    let Some(g) = rotation::open_generation(p)? else {
        return Ok(None);
    };
    let mut line = Vec::new();
    g.reader
        .take(LINE_OCTETS_MAX as u64)
        .read_until(b'\n', &mut line)?;
    match line.pop() {
        Some(b'\n') => Ok(Some(sha256_hex(&line))),
        _ => Ok(None),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::log::LogWriter;
    use crate::observe::rotation::Rotation;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("volley-follow-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Every line the follower has now, as numbers (`{"n": N}` lines).
    fn drain(f: &mut Follower) -> Vec<u64> {
        let (mut line, mut out) = (Vec::new(), Vec::new());
        for _ in 0..1_000_000 {
            if !f.next_line(&mut line).unwrap() {
                return out;
            }
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            out.push(v["n"].as_u64().unwrap());
        }
        panic!("no end");
    }

    #[test]
    fn a_follower_reads_every_line_once_across_rotations_compression_and_a_restart() {
        let d = dir("rot");
        let log = d.join("acct.jsonl");
        let rotation = Rotation {
            size_max: Some(4096),
            ..Rotation::never()
        };
        let mut w = LogWriter::open(&log, &rotation).unwrap();
        let (mut f, gone) = Follower::open(&log, None).unwrap();
        assert_eq!(gone, None);
        let mut seen = Vec::new();
        let mut cursor_file = None;
        let mut next_after_cursor = 0;
        for n in 0..3000u64 {
            w.push(&serde_json::json!({"n": n, "pad": "x".repeat(40)}));
            if n % 7 == 0 {
                w.flush().unwrap();
            }
            if n % 500 == 0 {
                seen.extend(drain(&mut f));
            }
            if n == 1500 {
                // A restart: a new follower from the stored cursor.
                let c = d.join("hook.cursor");
                f.cursor().store(&c).unwrap();
                cursor_file = Some(c);
                next_after_cursor = seen.len() as u64;
                let stored = Cursor::load(cursor_file.as_ref().unwrap())
                    .unwrap()
                    .unwrap();
                assert_eq!(&stored, f.cursor());
                assert!(stored.offset > 0, "{stored:?}");
                f = Follower::open(&log, Some(&stored)).unwrap().0;
            }
        }
        w.flush().unwrap();
        drop(w);
        seen.extend(drain(&mut f));
        assert_eq!(seen, (0..3000).collect::<Vec<_>>());
        let gz = std::fs::read_dir(&d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".gz")
            })
            .count();
        assert!(gz > 5, "rotated and compressed: {gz}");
        // From the stored cursor again, after everything was compressed: the rest.
        let c = Cursor::load(cursor_file.as_ref().unwrap())
            .unwrap()
            .unwrap();
        let (mut again, gone) = Follower::open(&log, Some(&c)).unwrap();
        assert_eq!(gone, None);
        let rest = drain(&mut again);
        assert_eq!(rest.first(), Some(&next_after_cursor));
        assert_eq!(*rest.last().unwrap(), 2999);
        assert!(
            rest.windows(2).all(|w| w[1] == w[0] + 1),
            "in order, none missing"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_follower_racing_a_writer_that_rotates_gets_every_line_once_in_order() {
        let d = dir("race");
        let log = d.join("acct.jsonl");
        let rotation = Rotation {
            size_max: Some(4096),
            ..Rotation::never()
        };
        let total = 20_000u64;
        let mut w = LogWriter::open(&log, &rotation).unwrap();
        let (mut f, _) = Follower::open(&log, None).unwrap();
        let writer = std::thread::spawn(move || {
            for n in 0..total {
                w.push(&serde_json::json!({"n": n}));
                if n % 3 == 0 {
                    w.flush().unwrap();
                }
            }
            w.flush().unwrap();
        });
        let mut seen = Vec::new();
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while (seen.len() as u64) < total {
            if std::time::Instant::now() >= until {
                let mut names: Vec<String> = std::fs::read_dir(&d)
                    .unwrap()
                    .map(|e| {
                        let e = e.unwrap();
                        let m = e.metadata().unwrap();
                        format!(
                            "{} {} {:?}",
                            e.file_name().to_string_lossy(),
                            m.ino(),
                            m.modified().unwrap()
                        )
                    })
                    .collect();
                names.sort();
                panic!(
                    "{} of {total}; cursor {:?} gen {:?} id {:?}; files {names:#?}",
                    seen.len(),
                    f.cursor(),
                    f.gen.g.path,
                    f.gen.g.id
                );
            }
            seen.extend(drain(&mut f));
        }
        writer.join().unwrap();
        assert_eq!(seen, (0..total).collect::<Vec<_>>());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_logrotate_rename_is_followed_to_the_new_file_after_the_last_writes_to_the_old() {
        let d = dir("logrotate");
        let log = d.join("acct.jsonl");
        let append = |p: &Path, text: &str| {
            let mut f = std::fs::File::options()
                .create(true)
                .append(true)
                .open(p)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        append(&log, "{\"n\":1}\n");
        let (mut f, _) = Follower::open(&log, None).unwrap();
        assert_eq!(drain(&mut f), [1]);
        // logrotate renames it; the writer goes on in the renamed file until its
        // SIGUSR1 reopen, and the new file appears at its next write.
        std::fs::rename(&log, d.join("acct.jsonl.1")).unwrap();
        append(&d.join("acct.jsonl.1"), "{\"n\":2}\n{\"n\":3");
        assert_eq!(drain(&mut f), [2], "a line being written waits");
        append(&d.join("acct.jsonl.1"), "}\n");
        std::thread::sleep(Duration::from_millis(20));
        append(&log, "{\"n\":4}\n");
        assert_eq!(drain(&mut f), [3, 4]);
        // A restart from here finds the new file by its first line.
        let (mut again, gone) = Follower::open(&log, Some(f.cursor())).unwrap();
        assert_eq!(gone, None);
        append(&log, "{\"n\":5}\n");
        assert_eq!(drain(&mut again), [5]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_cursor_whose_generation_is_gone_goes_on_from_the_next_and_says_so() {
        let d = dir("gone");
        let log = d.join("acct.jsonl");
        let old = d.join("acct.jsonl.20261130T100000Z");
        let next = d.join("acct.jsonl.20261130T110000Z");
        std::fs::write(&old, "{\"n\":1}\n{\"n\":2}\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&log, "").unwrap();
        let (mut f, _) = Follower::open(&log, None).unwrap();
        assert!(
            drain(&mut f).is_empty(),
            "a new follower starts in the file in use"
        );
        // A cursor in `old`, after its first line; then `old` is deleted.
        let hash = first_line_sha256(&old).unwrap().unwrap();
        let modified = std::fs::metadata(&old).unwrap().modified().unwrap();
        let c = Cursor {
            file: "acct.jsonl.20261130T100000Z".into(),
            first_line_sha256: hash,
            offset: 8,
            modified_unix_ms: modified.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64,
        };
        assert_eq!(drain(&mut Follower::open(&log, Some(&c)).unwrap().0), [2]);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&next, "{\"n\":3}\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&log, "{\"n\":4}\n").unwrap();
        std::fs::remove_file(&old).unwrap();
        let (mut f, gone) = Follower::open(&log, Some(&c)).unwrap();
        let gone = gone.expect("said");
        assert_eq!(gone.file, "acct.jsonl.20261130T100000Z");
        assert_eq!(gone.from, "acct.jsonl.20261130T110000Z");
        assert_eq!(gone.shorter, None);
        assert_eq!(drain(&mut f), [3, 4]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_cursor_past_the_end_of_its_file_says_the_file_was_truncated() {
        let d = dir("short");
        let log = d.join("acct.jsonl");
        std::fs::write(&log, "{\"n\":1}\n{\"n\":2}\n").unwrap();
        let c = Cursor {
            file: "acct.jsonl".into(),
            first_line_sha256: first_line_sha256(&log).unwrap().unwrap(),
            offset: 9_999,
            modified_unix_ms: 0,
        };
        let (mut f, said) = Follower::open(&log, Some(&c)).unwrap();
        let said = said.expect("the truncation is said");
        assert_eq!((said.shorter, said.offset), (Some(16), 9_999));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"{\"n\":3}\n")
            .unwrap();
        assert_eq!(drain(&mut f), [3], "going on from its end");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
