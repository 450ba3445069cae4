//! Ingest: a validated campaign becomes a campaign instance in the spool — its
//! template stored once under `campaigns/<n>/`, each recipient a Queue record in
//! the shard its address hashes to — and is acknowledged only once all of that is
//! on disk, by the `queued` marker. Records of an instance without the marker are
//! abandoned at the next start: nothing is ever half-queued.

use crate::campaign::{Campaign, Problem, Settings, ERRORS_LISTED_MAX};
use crate::spool::{QueueRecord, Spool};
use crate::template::Template;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The spool's own settings, fixed when it is created.
#[derive(Debug, Serialize, Deserialize)]
struct SpoolMeta {
    shards: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    recipients: u64,
    queued_at_unix_ms: u64,
}

/// An acknowledged campaign instance, as the shards need it.
pub struct Instance {
    pub no: u32,
    pub settings: Settings,
    pub template: Template,
    pub email_col: usize,
    pub recipients: u64,
    pub queued_at: SystemTime,
    pub expire_at: SystemTime,
    /// Date / Message-ID to add per message (the template has none).
    pub add_date: bool,
    pub add_message_id: bool,
}

pub type Instances = Arc<BTreeMap<u32, Instance>>;

/// Holds the spool directory for this process alone (flock); released on drop.
pub struct SpoolLock {
    _file: File,
    pub shards: usize,
}

/// Locks the spool and fixes its shard count (a spool keeps the count it was created with).
pub fn lock_spool(dir: &Path, shards: usize) -> anyhow::Result<SpoolLock> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("spool {}: {e}", dir.display()))?;
    let file = File::create(dir.join("LOCK"))
        .map_err(|e| anyhow::anyhow!("spool {}: {e}", dir.display()))?;
    // SAFETY: plain syscall on a valid, owned descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "spool {} is in use by another volley process; stop it or use another --spool",
            dir.display()
        );
    }
    let meta_path = dir.join("spool.toml");
    let shards = match std::fs::read_to_string(&meta_path) {
        Ok(t) => {
            let m: SpoolMeta =
                toml::from_str(&t).map_err(|e| anyhow::anyhow!("{}: {e}", meta_path.display()))?;
            if m.shards != shards {
                eprintln!(
                    "volley: spool {} was created with {} shards; using {}",
                    dir.display(),
                    m.shards,
                    m.shards
                );
            }
            m.shards
        }
        Err(_) => {
            write_durably(
                &meta_path,
                toml::to_string(&SpoolMeta { shards })?.as_bytes(),
            )?;
            shards
        }
    };
    anyhow::ensure!(
        shards >= 1,
        "{}: shards must be at least 1",
        meta_path.display()
    );
    Ok(SpoolLock {
        _file: file,
        shards,
    })
}

pub fn shard_dir(spool: &Path, shard: usize) -> PathBuf {
    spool.join(format!("shard-{shard}"))
}

/// Which shard a recipient belongs to: stable across runs and versions.
pub fn shard_of(email: &str, shards: usize) -> usize {
    (crc32c::crc32c(email.to_ascii_lowercase().as_bytes()) as usize) % shards
}

fn campaigns_dir(spool: &Path) -> PathBuf {
    spool.join("campaigns")
}

/// Every acknowledged instance in the spool.
pub fn load_instances(spool: &Path) -> anyhow::Result<BTreeMap<u32, Instance>> {
    let mut out = BTreeMap::new();
    let dir = campaigns_dir(spool);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let Some(no) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        let Ok(marker) = std::fs::read_to_string(p.join("queued")) else {
            continue;
        };
        let marker: Marker = serde_json::from_str(&marker)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.join("queued").display()))?;
        let campaign = Campaign::load(&p).map_err(|probs| {
            anyhow::anyhow!(
                "spooled campaign {} no longer loads: {}",
                p.display(),
                probs
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        let queued_at = UNIX_EPOCH + Duration::from_millis(marker.queued_at_unix_ms);
        let expire_at = queued_at + campaign.settings.expire_after();
        out.insert(
            no,
            Instance {
                no,
                email_col: campaign.email_col,
                add_date: campaign.add_date,
                add_message_id: campaign.add_message_id,
                template: campaign.template,
                settings: campaign.settings,
                recipients: marker.recipients,
                queued_at,
                expire_at,
            },
        );
    }
    Ok(out)
}

pub struct Ingested {
    pub instance: u32,
    pub recipients: u64,
    pub elapsed: Duration,
}

/// Queues a validated campaign. Any bad row aborts the whole ingest (nothing is
/// acknowledged) and every problem is returned, at most ERRORS_LISTED_MAX listed.
pub fn ingest(
    campaign: &Campaign,
    spool: &Path,
    shards: usize,
    segment_bytes: usize,
) -> Result<Ingested, IngestError> {
    let started = std::time::Instant::now();
    let existing = load_instances(spool).map_err(IngestError::Other)?;
    let cdir = campaigns_dir(spool);
    let used: Vec<u32> = std::fs::read_dir(&cdir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let no = used.iter().copied().max().unwrap_or(0) + 1;
    let idir = cdir.join(no.to_string());
    std::fs::create_dir_all(&idir)
        .map_err(|e| IngestError::Other(anyhow::anyhow!("{}: {e}", idir.display())))?;
    for f in ["campaign.toml", "message.eml"] {
        copy_durably(&campaign.dir.join(f), &idir.join(f)).map_err(IngestError::Other)?;
    }
    // The stored header is all the instance needs of recipients.csv.
    let header = campaign.columns.join(",") + "\n";
    write_durably(&idir.join("recipients.csv"), header.as_bytes()).map_err(IngestError::Other)?;

    let mut spools = Vec::with_capacity(shards);
    for s in 0..shards {
        let (sp, _) = Spool::open(&shard_dir(spool, s), segment_bytes, &|i| {
            existing.contains_key(&i)
        })
        .map_err(|e| IngestError::Other(e.into()))?;
        spools.push(sp);
    }
    let mut problems = Vec::new();
    let bad_rows = std::cell::Cell::new(0u64);
    let mut scratch = Vec::with_capacity(1024);
    let mut count = 0u64;
    let rows = campaign
        .recipients(
            |row| {
                if bad_rows.get() > 0 {
                    // Already failing: keep validating, stop writing.
                    return Ok(());
                }
                let q = QueueRecord {
                    instance: no,
                    line: row.line,
                    values: row.values,
                };
                spools[shard_of(&row.email, shards)]
                    .append_queue(&q, &mut scratch)
                    .map_err(|e| e.to_string())?;
                count += 1;
                Ok(())
            },
            |p| {
                bad_rows.set(bad_rows.get() + 1);
                if problems.len() < ERRORS_LISTED_MAX {
                    problems.push(p);
                }
            },
        )
        .map_err(|p| IngestError::Problems(vec![p], 1))?;
    if bad_rows.get() > 0 {
        return Err(IngestError::Problems(problems, bad_rows.get()));
    }
    if rows == 0 {
        return Err(IngestError::Problems(
            vec![Problem {
                file: "recipients.csv",
                line: None,
                msg: "no recipients".into(),
            }],
            1,
        ));
    }
    for sp in &mut spools {
        sp.sync().map_err(|e| IngestError::Other(e.into()))?;
    }
    let queued_at_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    let marker = serde_json::to_vec(&Marker {
        recipients: count,
        queued_at_unix_ms,
    })
    .expect("serialises");
    write_durably(&idir.join("queued"), &marker).map_err(IngestError::Other)?;
    Ok(Ingested {
        instance: no,
        recipients: count,
        elapsed: started.elapsed(),
    })
}

#[derive(Debug)]
pub enum IngestError {
    /// Bad rows: the listed problems and the total count.
    Problems(Vec<Problem>, u64),
    Other(anyhow::Error),
}

/// Writes via a temporary file, fsyncs it, renames it into place and fsyncs the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let ctx = |e: std::io::Error| anyhow::anyhow!("{}: {e}", path.display());
    let mut f = File::create(&tmp).map_err(ctx)?;
    f.write_all(bytes).map_err(ctx)?;
    f.sync_all().map_err(ctx)?;
    std::fs::rename(&tmp, path).map_err(ctx)?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(ctx)?;
    }
    Ok(())
}

fn copy_durably(from: &Path, to: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(from).map_err(|e| anyhow::anyhow!("{}: {e}", from.display()))?;
    write_durably(to, &bytes)
}
