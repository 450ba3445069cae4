//! Where a recipient waits in the spool, for `volley track`: the shape of the answer
//! (the running shards give the same through the admin socket), and the spool read
//! directly, read-only, when no process runs it.

use super::{queue_value, read_frame, record_ref, Frame, LastReply, DEFER_BYTES, FRAME_BYTES};
use super::{KIND_DEFER, KIND_DONE, KIND_QUEUE, MAGIC, SEG_HEADER_BYTES};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

/// One recipient not yet final: where it waits, and what its last attempt got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    pub shard: usize,
    pub campaign: String,
    pub rcpt: String,
    /// `ready` (in its destination's queue), `paused` (held by a pause),
    /// `resolving` (waiting on DNS), `waiting` (for its retry time), `in_flight` (in
    /// a transaction now), or, read from a spool no process runs, `spooled`.
    pub state: String,
    /// When it is next tried (RFC 3339), while `waiting` (or `spooled` after a
    /// deferral).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
    /// Attempts so far; None when not known (in flight: the shard holds no job then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// The reply of its last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<LastSeen>,
}

/// The reply of a recipient's last attempt, as the spool's Defer record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastSeen {
    /// RFC 3339, milliseconds.
    pub time: String,
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<String>,
    /// At most [`super::DEFER_REPLY_TEXT_MAX`] octets.
    pub reply: String,
    pub stage: String,
}

impl From<&LastReply> for LastSeen {
    fn from(l: &LastReply) -> LastSeen {
        LastSeen {
            time: crate::observe::log::rfc3339(UNIX_EPOCH + Duration::from_millis(l.at_unix_ms)),
            code: l.code,
            enhanced: l.enhanced.clone(),
            reply: l.text.clone(),
            stage: l.stage.clone(),
        }
    }
}

/// Whether `want` (lowercase) is `rcpt`.
pub fn same_rcpt(rcpt: &str, want: &str) -> bool {
    rcpt.eq_ignore_ascii_case(want) || rcpt.to_lowercase() == want
}

/// The recipients `rcpt` (any case) of `campaign` (any, when None) still queued in
/// the spool at `spool`, read from its segments without writing anything: for a
/// spool no process runs (the caller holds its lock). Errors: the campaigns cannot
/// be loaded, a segment cannot be read.
pub fn find(spool: &Path, rcpt: &str, campaign: Option<&str>) -> anyhow::Result<Vec<Queued>> {
    let instances = super::ingest::load_instances(spool)?;
    let want = rcpt.to_lowercase();
    let mut out = Vec::new();
    for shard in 0.. {
        let dir = super::ingest::shard_dir(spool, shard);
        if !dir.is_dir() {
            break;
        }
        for (payload, deferral) in pending(&dir)? {
            let Some(instance) = payload.get(1..5) else {
                continue;
            };
            let instance = u32::from_le_bytes(instance.try_into().expect("4 octets"));
            let Some(inst) = instances.get(&instance) else {
                continue;
            };
            let value = |i| String::from_utf8_lossy(queue_value(&payload, i).unwrap_or_default());
            let addr = value(inst.email_col);
            if !same_rcpt(&addr, &want) {
                continue;
            }
            let c = match inst.submission {
                true => value(super::ingest::SUBMITTED_CAMPAIGN).into_owned(),
                false => inst.settings.id.clone(),
            };
            if campaign.is_some_and(|w| w != c) {
                continue;
            }
            out.push(Queued {
                shard,
                campaign: c,
                rcpt: addr.into_owned(),
                state: "spooled".into(),
                retry_at: deferral
                    .as_ref()
                    .map(|d| crate::observe::log::rfc3339(UNIX_EPOCH + Duration::from_millis(d.1))),
                attempts: Some(deferral.as_ref().map_or(0, |d| d.0)),
                last: deferral.and_then(|d| d.2).map(|l| LastSeen::from(&l)),
            });
        }
    }
    Ok(out)
}

/// As [`find`] for a spool no process runs: None when one holds its lock (ask
/// that process). The lock is taken (shared, never waited for) while the segments
/// are read, so no process starts on the spool meanwhile; nothing is created or
/// written. A spool never used (no LOCK) holds no one. Errors: as [`find`].
pub fn find_unlocked(
    spool: &Path,
    rcpt: &str,
    campaign: Option<&str>,
) -> anyhow::Result<Option<Vec<Queued>>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(spool.join("LOCK"));
    let lock = match lock {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(Vec::new())),
        Err(e) => anyhow::bail!("{}: {e}", spool.join("LOCK").display()),
    };
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
        return Ok(None);
    }
    find(spool, rcpt, campaign).map(Some)
}

/// A pending Queue record's payload with its last deferral: attempts, due (Unix
/// ms), last reply.
type Pending = (Vec<u8>, Option<(u32, u64, Option<LastReply>)>);

/// The Queue records of one shard's segments that have no Done record, each with
/// its last Defer record. Segments are read whole, never mapped or written; a torn
/// record ends its segment, as recovery does.
fn pending(dir: &Path) -> anyhow::Result<Vec<Pending>> {
    let mut segs: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .filter_map(|e| {
            let e = e.ok()?;
            let n = e.file_name().into_string().ok()?;
            let no = n
                .strip_prefix("seg-")?
                .strip_suffix(".vspool")?
                .parse()
                .ok()?;
            Some((no, e.path()))
        })
        .collect();
    segs.sort_unstable();
    let mut queue: Vec<(super::RecordRef, Vec<u8>)> = Vec::new();
    let mut done = std::collections::HashSet::new();
    let mut deferred = HashMap::new();
    for (no, path) in segs {
        let map = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if map.len() < SEG_HEADER_BYTES || &map[..8] != MAGIC {
            anyhow::bail!("{}: not a volley spool segment", path.display());
        }
        let mut off = SEG_HEADER_BYTES;
        while let Frame::Record(payload) = read_frame(&map, off) {
            let here = super::RecordRef {
                seg: no,
                off: off as u32,
            };
            match payload.first() {
                Some(&KIND_QUEUE) => queue.push((here, payload.to_vec())),
                Some(&KIND_DONE) if payload.len() == 10 => {
                    done.insert(record_ref(payload));
                }
                Some(&KIND_DEFER) if payload.len() >= DEFER_BYTES => {
                    let attempts = u32::from_le_bytes(payload[9..13].try_into().expect("4"));
                    let due = u64::from_le_bytes(payload[13..21].try_into().expect("8"));
                    let last = LastReply::decode(&payload[DEFER_BYTES..]);
                    deferred.insert(record_ref(payload), (attempts, due, last));
                }
                _ => break,
            }
            off += FRAME_BYTES + payload.len();
        }
    }
    Ok(queue
        .into_iter()
        .filter(|(r, _)| !done.contains(r))
        .map(|(r, p)| {
            let d = deferred.remove(&r);
            (p, d)
        })
        .collect())
}
