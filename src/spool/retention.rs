//! Spool housekeeping: a campaign instance whose recipients are all final is pruned
//! once `spool_retention` has passed since it became final. Its copy under
//! `SPOOL/campaigns/N/` (recipients.csv, message.eml, campaign.toml, skipped.jsonl,
//! markers) goes; the accounting log is not touched, so `volley report` still
//! counts it. A small tombstone, `campaigns/N/pruned`, stays: the directory keeps
//! instance number N taken (`next_instance_no`), and an operator can see what was
//! pruned and when.
//!
//! When an instance became final is recorded by a `finished` marker, written
//! durably the first time a run sees it with nothing pending: at start, after
//! recovery (`at_start`), and in `volley serve` when its last recipient is done
//! (`sweep`, from the daemon's periodic housekeeping). A marker found on an
//! instance that recovery shows has pending recipients (a crash lost the Done
//! records after the marker was written) is removed: the instance runs again.
//!
//! Pruning order, so a crash at any point leaves a state the next start finishes
//! or tolerates: the tombstone is written (durably) first, then every other file
//! of the directory is removed. `load_instances` skips a directory with a
//! tombstone, and `at_start` removes whatever a pruning cut short left beside it.
//! The instance's Queue records are all done, so its segments are deleted as
//! usual (`Spool::delete_finished`); a Done record of a pruned instance in a
//! segment still kept is harmless: recovery counts it and moves on. The
//! submission instance (`volley serve`'s) is never pruned.

use crate::spool::ingest::{self, Instance};
use crate::spool::Spool;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a finished instance's copy is kept by default: 7 days, time to look
/// at a campaign's message and list after it ends.
pub const SPOOL_RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 86_400);

/// The longest retention the configuration takes: ten years.
pub const SPOOL_RETENTION_MAX: Duration = Duration::from_secs(3650 * 86_400);

/// How often `volley serve` looks for instances to mark finished or prune: every
/// minute, or every retention period when that is shorter (at least every second).
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(60);

/// The marker file: when the instance became final.
pub const FINISHED_MARKER: &str = "finished";

/// The tombstone file of a pruned instance.
pub const TOMBSTONE: &str = "pruned";

#[derive(Debug, Serialize, Deserialize)]
struct Finished {
    finished_at_unix_ms: u64,
}

/// What stays of a pruned instance (`campaigns/N/pruned`, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The instance number, never used again in this spool.
    pub instance: u32,
    /// Its campaign id.
    pub campaign: String,
    /// Recipients queued, and bad rows skipped at ingest.
    pub recipients: u64,
    pub skipped: u64,
    /// RFC 3339 UTC: when it was queued, became final, and was pruned.
    pub queued_at: String,
    pub finished_at: String,
    pub pruned_at: String,
}

/// The interval `volley serve` runs its housekeeping at, for `retention`.
pub fn interval_for(retention: Duration) -> Duration {
    HOUSEKEEPING_INTERVAL.min(retention.max(Duration::from_secs(1)))
}

fn instance_dir(spool: &Path, no: u32) -> PathBuf {
    spool.join("campaigns").join(no.to_string())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// When instance `no` became final, if that is recorded.
pub fn finished_at(spool: &Path, no: u32) -> Option<SystemTime> {
    let text = std::fs::read_to_string(instance_dir(spool, no).join(FINISHED_MARKER)).ok()?;
    let f: Finished = serde_json::from_str(&text).ok()?;
    Some(UNIX_EPOCH + Duration::from_millis(f.finished_at_unix_ms))
}

/// Records (durably) that instance `no` is final as of `now`, unless it already
/// is; when it became final.
pub fn mark_finished(spool: &Path, no: u32, now: SystemTime) -> anyhow::Result<SystemTime> {
    if let Some(t) = finished_at(spool, no) {
        return Ok(t);
    }
    let f = Finished {
        finished_at_unix_ms: unix_ms(now),
    };
    let path = instance_dir(spool, no).join(FINISHED_MARKER);
    ingest::write_durably(&path, &serde_json::to_vec(&f)?)?;
    Ok(now)
}

/// Every tombstone in the spool, by instance number.
pub fn tombstones(spool: &Path) -> Vec<Tombstone> {
    let Ok(entries) = std::fs::read_dir(spool.join("campaigns")) else {
        return Vec::new();
    };
    let mut out: Vec<Tombstone> = entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join(TOMBSTONE)).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect();
    out.sort_by_key(|t| t.instance);
    out
}

/// Prunes `inst`, final since `finished`: the tombstone first, then every other
/// file of its directory.
pub fn prune(
    spool: &Path,
    inst: &Instance,
    finished: SystemTime,
    now: SystemTime,
) -> anyhow::Result<Tombstone> {
    assert!(!inst.submission, "the submission instance is never pruned");
    let dir = instance_dir(spool, inst.no);
    let t = Tombstone {
        instance: inst.no,
        campaign: inst.settings.id.clone(),
        recipients: inst.recipients,
        skipped: ingest::skipped_of(&dir)?,
        queued_at: crate::observe::log::rfc3339(inst.queued_at),
        finished_at: crate::observe::log::rfc3339(finished),
        pruned_at: crate::observe::log::rfc3339(now),
    };
    ingest::write_durably(&dir.join(TOMBSTONE), &serde_json::to_vec_pretty(&t)?)?;
    remove_beside_tombstone(&dir)?;
    Ok(t)
}

/// Removes every entry of a pruned instance's directory but its tombstone.
fn remove_beside_tombstone(dir: &Path) -> anyhow::Result<usize> {
    let ctx = |e: std::io::Error| anyhow::anyhow!("pruning {}: {e}", dir.display());
    let mut n = 0;
    for e in std::fs::read_dir(dir).map_err(ctx)?.flatten() {
        if e.file_name() == TOMBSTONE {
            continue;
        }
        let p = e.path();
        match e.file_type().map_err(ctx)?.is_dir() {
            true => std::fs::remove_dir_all(&p).map_err(ctx)?,
            false => std::fs::remove_file(&p).map_err(ctx)?,
        }
        n += 1;
    }
    if n > 0 {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(ctx)?;
    }
    Ok(n)
}

/// Marks each of `finals` (instances with nothing pending, not the submission
/// instance) finished if it is not yet, and prunes those final for `retention`
/// by `now`.
pub fn sweep<'a>(
    spool: &Path,
    finals: impl IntoIterator<Item = &'a Instance>,
    retention: Duration,
    now: SystemTime,
) -> anyhow::Result<Vec<Tombstone>> {
    let mut pruned = Vec::new();
    for inst in finals {
        let dir = instance_dir(spool, inst.no);
        if inst.submission || dir.join(TOMBSTONE).exists() {
            continue;
        }
        // One instance that cannot be pruned (a file it cannot remove) must not stop
        // the others, nor the start: it is said, and tried again at the next pass.
        let one = mark_finished(spool, inst.no, now).and_then(|finished| {
            match finished + retention <= now {
                true => prune(spool, inst, finished, now).map(Some),
                false => Ok(None),
            }
        });
        match one {
            Ok(Some(t)) => pruned.push(t),
            Ok(None) => {}
            Err(e) => eprintln!(
                "volley: spool {}: campaign instance {} not pruned: {e:#}; tried again at the next pass",
                spool.display(),
                inst.no
            ),
        }
    }
    Ok(pruned)
}

/// Housekeeping at start, under the spool lock and before the shards run:
/// finishes prunings a crash cut short, recovers every shard's spool to count
/// each instance's pending recipients (the shards recover again when they start),
/// marks the final instances finished (and unmarks any that are not), and prunes
/// those final for `retention`. The tombstones of what it pruned.
pub fn at_start(
    spool: &Path,
    shards: usize,
    segment_bytes: usize,
    retention: Duration,
    now: SystemTime,
) -> anyhow::Result<Vec<Tombstone>> {
    for e in std::fs::read_dir(spool.join("campaigns"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.path().join(TOMBSTONE).exists() {
            remove_beside_tombstone(&e.path())?;
        }
    }
    let instances = ingest::load_instances(spool)?;
    let mut pending: HashMap<u32, u64> = HashMap::new();
    for s in 0..shards {
        let (_, recovered) = Spool::open(&ingest::shard_dir(spool, s), segment_bytes, &|i| {
            instances.contains_key(&i)
        })?;
        for p in recovered.pending {
            *pending.entry(p.instance).or_default() += 1;
        }
    }
    let mut finals = Vec::new();
    for inst in instances.values().filter(|i| !i.submission) {
        if pending.get(&inst.no).copied().unwrap_or(0) == 0 {
            finals.push(&**inst);
            continue;
        }
        let marker = instance_dir(spool, inst.no).join(FINISHED_MARKER);
        if marker.exists() {
            // Written before a crash lost the Done records it stood for.
            std::fs::remove_file(&marker)
                .map_err(|e| anyhow::anyhow!("{}: {e}", marker.display()))?;
        }
    }
    sweep(spool, finals, retention, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("volley-retention-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A one-recipient campaign queued in `spool`; its instance number.
    fn queue(spool: &Path, id: &str) -> u32 {
        let c = spool.join(format!("src-{id}"));
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(
            c.join("campaign.toml"),
            format!(
                "id = \"{id}\"\nsender = \"b@x.test\"\nfrom_domain = \"x.test\"\ndkim = false\n"
            ),
        )
        .unwrap();
        std::fs::write(
            c.join("message.eml"),
            "From: a@x.test\nTo: <{{email}}>\nSubject: hi\n\nHi {{name}}\n",
        )
        .unwrap();
        std::fs::write(c.join("recipients.csv"), "email,name\nu@y.test,U\n").unwrap();
        let campaign = crate::message::campaign::Campaign::load(&c).unwrap_or_else(|p| {
            panic!("{p:?}");
        });
        ingest::lock_spool(spool, 1).unwrap();
        ingest::ingest(&campaign, spool, 1, 1 << 20)
            .unwrap()
            .instance
    }

    #[test]
    fn a_final_instance_is_marked_then_pruned_and_an_unfinished_one_never() {
        let d = spool("prune");
        let a = queue(&d, "a");
        let t0 = SystemTime::now();
        // Pending: not marked, not pruned, whatever the retention.
        assert!(at_start(&d, 1, 1 << 20, Duration::ZERO, t0)
            .unwrap()
            .is_empty());
        assert_eq!(finished_at(&d, a), None);
        // Its recipient done.
        {
            let insts = ingest::load_instances(&d).unwrap();
            let (mut s, r) = Spool::open(&ingest::shard_dir(&d, 0), 1 << 20, &|i| {
                insts.contains_key(&i)
            })
            .unwrap();
            s.append_done(r.pending[0].rref, crate::spool::Terminal::Delivered)
                .unwrap();
            s.sync().unwrap();
        }
        let day = Duration::from_secs(86_400);
        assert!(at_start(&d, 1, 1 << 20, day, t0).unwrap().is_empty());
        let marked = finished_at(&d, a).expect("marked finished");
        // A later run keeps the first time it was seen final.
        assert!(at_start(&d, 1, 1 << 20, day, t0 + day / 2)
            .unwrap()
            .is_empty());
        assert_eq!(finished_at(&d, a), Some(marked));
        let pruned = at_start(&d, 1, 1 << 20, day, t0 + day).unwrap();
        assert_eq!(pruned.len(), 1);
        assert_eq!((pruned[0].instance, pruned[0].campaign.as_str()), (a, "a"));
        assert_eq!(pruned[0].recipients, 1);
        let idir = d.join("campaigns").join(a.to_string());
        let left: Vec<_> = std::fs::read_dir(&idir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(TOMBSTONE)]);
        assert!(ingest::load_instances(&d).unwrap().is_empty());
        assert_eq!(tombstones(&d), pruned);
        // The number stays taken.
        let b = queue(&d, "a");
        assert!(b > a);
    }

    #[test]
    fn a_pruning_cut_short_is_finished_at_the_next_start_and_a_stale_marker_goes() {
        let d = spool("crash");
        let a = queue(&d, "a");
        let idir = d.join("campaigns").join(a.to_string());
        // A marker written before a crash lost the Done records: the instance runs.
        std::fs::write(idir.join(FINISHED_MARKER), r#"{"finished_at_unix_ms":1}"#).unwrap();
        assert!(at_start(&d, 1, 1 << 20, Duration::ZERO, SystemTime::now())
            .unwrap()
            .is_empty());
        assert!(!idir.join(FINISHED_MARKER).exists());
        assert_eq!(ingest::load_instances(&d).unwrap().len(), 1);
        // A tombstone with the copy still beside it: skipped, then cleaned up.
        std::fs::write(idir.join(TOMBSTONE), "{}").unwrap();
        assert!(ingest::load_instances(&d).unwrap().is_empty());
        at_start(&d, 1, 1 << 20, Duration::ZERO, SystemTime::now()).unwrap();
        assert!(!idir.join("recipients.csv").exists());
        assert!(!idir.join("queued").exists());
        assert!(idir.join(TOMBSTONE).exists());
    }
}
