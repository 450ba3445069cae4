//! What every listener hands mail to: queueing a submitted message (SMTP, pickup)
//! or a whole campaign (HTTP, `volley send` handed over) through the running
//! shards' inboxes, answering only once it is durable.

use crate::message::campaign::{Campaign, Problem};
use crate::observe::metrics::{Board, ServiceView};
use crate::spool::inbox::{self, InboxError, Inboxes, APPEND_RECORDS_MAX};
use crate::spool::ingest::{
    self, IngestError, IngestOptions, Ingested, Instance, OutcomeCounts, RecordSink,
};
use crate::spool::QueueRecord;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// How long a campaign ingest waits for room in a full inbox before it gives up
/// (and the campaign is refused with a temporary error, nothing queued).
pub const CAMPAIGN_INBOX_PATIENCE: Duration = Duration::from_secs(30);

/// The campaign a submitted message counts under when it names none.
pub const SUBMISSION_CAMPAIGN: &str = "submission";

/// Counts of instances pruned while running kept for `progress`: a `volley send`
/// following its campaign asks within a second of it ending.
pub const PRUNED_COUNTS_KEPT_MAX: usize = 1024;

/// The daemon's intake: shared by every listener thread.
pub struct Intake {
    /// The running shards' inboxes.
    pub inboxes: Inboxes,
    /// The spool directory (campaign instances are made under it).
    pub spool: PathBuf,
    /// The instance submitted messages are queued under.
    pub submission: u32,
    /// Every instance the daemon runs, for counts by campaign.
    instances: Mutex<BTreeMap<u32, Arc<Instance>>>,
    /// One campaign ingest at a time: instance numbers come from the directory.
    ingesting: Mutex<()>,
    /// The last counts of instances pruned while running, so `progress N` (a
    /// `volley send` following its campaign) still answers; at most
    /// `PRUNED_COUNTS_KEPT_MAX`, the oldest forgotten first.
    pruned_counts: Mutex<BTreeMap<u32, OutcomeCounts>>,
    /// Where a campaign's DKIM keys are looked up.
    pub dkim_dir: PathBuf,
    /// The accounting log and its rotation.
    pub log: (PathBuf, crate::observe::rotation::Rotation),
    /// Free octets kept on the spool's file system for delivery (`spool_free_min`).
    pub free_min: u64,
    /// Injections refused for `free_min` since the daemon started.
    refused_for_disk: AtomicU64,
    /// The metrics board (one view per shard): the shards publish to it, and each
    /// listener counts what it took in, once durable.
    pub board: Arc<Board>,
}

/// A submitted message: envelope and prepared content (serve::submitted).
pub struct Submitted {
    /// "" for the null sender.
    pub sender: String,
    /// The envelope recipients, checked.
    pub recipients: Vec<String>,
    /// From its campaign header; None: counted under `submission`.
    pub campaign: Option<String>,
    /// The message as it is to be sent (CRLF line ends, headers prepared).
    pub message: Vec<u8>,
    /// Volley's own TLS report (serve/tls_reports.rs), routed past the recipient
    /// domain's MTA-STS policy (`ingest::ROUTE_TLS_REPORT`); false for mail taken in.
    pub tls_report: bool,
}

impl Intake {
    /// The intake over `inboxes` for the daemon's `spool`, whose submission
    /// instance is `submission` and which runs `instances` at start.
    pub fn new(
        inboxes: Inboxes,
        spool: PathBuf,
        submission: u32,
        instances: BTreeMap<u32, Arc<Instance>>,
        dkim_dir: PathBuf,
        log: (PathBuf, crate::observe::rotation::Rotation),
        free_min: u64,
    ) -> Intake {
        let board = Arc::new(Board::new(inboxes.shards()));
        Intake {
            inboxes,
            spool,
            submission,
            instances: Mutex::new(instances),
            ingesting: Mutex::new(()),
            pruned_counts: Mutex::new(BTreeMap::new()),
            dkim_dir,
            log,
            free_min,
            refused_for_disk: AtomicU64::new(0),
            board,
        }
    }

    /// The disk budget as `volley queue status` shows it: free and total octets of
    /// the spool's file system, the floor, and the injections refused for it; the
    /// same figures go to the metrics board.
    pub fn disk_status(&self) -> String {
        let gib = |b: u64| match b >= 1 << 30 {
            true => format!("{:.2} GiB", b as f64 / f64::from(1u32 << 30)),
            false => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        };
        let (free, total) = space(&self.spool).unwrap_or((0, 0));
        let refusing = self.free_min > 0 && free < self.free_min;
        self.board.set_service(ServiceView {
            spool_free_bytes: free,
            spool_free_min_bytes: self.free_min,
            injection_refused_now: refusing,
            injections_refused_disk: self.refused_for_disk.load(Ordering::Relaxed),
        });
        format!(
            "spool {}: {} free of {}; injection refused below {} (spool_free_min){}; {} refused since start",
            self.spool.display(),
            gib(free),
            gib(total),
            gib(self.free_min),
            if refusing { ", REFUSING NOW" } else { "" },
            self.refused_for_disk.load(Ordering::Relaxed)
        )
    }

    /// Refuses injection that would leave less than `free_min` octets free on the
    /// spool's file system: what is kept lets delivery go on (Done records, the log).
    pub fn room_for(&self, bytes: u64) -> Result<(), InboxError> {
        if self.free_min == 0 {
            return Ok(());
        }
        let free = space(&self.spool).map_or(u64::MAX, |(free, _)| free);
        match free >= self.free_min.saturating_add(bytes) {
            true => Ok(()),
            false => {
                self.refused_for_disk.fetch_add(1, Ordering::Relaxed);
                Err(InboxError::Disk {
                    free,
                    min: self.free_min,
                })
            }
        }
    }

    /// Queues one submitted message: every recipient on one shard (the first
    /// recipient's), so the message is appended and synced as a whole. The answer
    /// comes once it is durable; `Err` at once when that shard's inbox is full.
    pub fn submit(
        &self,
        m: &Submitted,
    ) -> Result<oneshot::Receiver<Result<(), String>>, InboxError> {
        let size = (m.message.len() * m.recipients.len()) as u64;
        self.room_for(size)?;
        let shard = ingest::shard_of(
            m.recipients.first().map_or("", String::as_str),
            self.inboxes.shards(),
        );
        let queued_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            .to_string();
        let campaign = m.campaign.as_deref().unwrap_or(SUBMISSION_CAMPAIGN);
        let records = m
            .recipients
            .iter()
            .map(|r| {
                let mut values = vec![
                    r.as_bytes().to_vec(),
                    m.sender.as_bytes().to_vec(),
                    campaign.as_bytes().to_vec(),
                    queued_at.as_bytes().to_vec(),
                    m.message.clone(),
                ];
                if m.tls_report {
                    values.push(ingest::ROUTE_TLS_REPORT.to_vec());
                }
                QueueRecord {
                    instance: self.submission,
                    line: 0,
                    values,
                }
            })
            .collect();
        self.inboxes
            .append(shard, self.submission, ingest::SUBMITTED_RCPT, records)
    }

    /// Queues a validated campaign through the shards, then writes its marker and
    /// sets it going: `Ok` only once all of it is durable. On failure nothing of it
    /// is ever sent.
    pub fn queue_campaign(&self, campaign: &Campaign) -> Result<Ingested, IngestError> {
        let _one = self.ingesting.lock().expect("ingest lock");
        self.room_for(0)
            .map_err(|e| IngestError::Other(anyhow::anyhow!(e)))?;
        // A missing key is the campaign's to fix, not a temporary failure.
        let key =
            crate::message::dkim::key_for(&self.dkim_dir, &campaign.settings).map_err(|e| {
                let p = Problem {
                    file: "campaign.toml",
                    line: None,
                    msg: e.to_string(),
                };
                IngestError::Problems(vec![p], 1)
            })?;
        let mut sink = InboxSink {
            inboxes: &self.inboxes,
            email_col: campaign.email_col,
            instance: None,
            spool: &self.spool,
            batches: vec![Vec::new(); self.inboxes.shards()],
            answers: Vec::new(),
        };
        let opts = IngestOptions {
            skip_bad_rows: false,
            log: Some(self.log.clone()),
        };
        let shards = self.inboxes.shards();
        let r = ingest::ingest_into(campaign, &self.spool, shards, &opts, &mut sink);
        let Some(no) = sink.instance else {
            return r;
        };
        let activated = r.and_then(|done| {
            let mut all = ingest::load_instances(&self.spool).map_err(IngestError::Other)?;
            let inst = all.remove(&no).ok_or_else(|| {
                IngestError::Other(anyhow::anyhow!("instance {no} has no marker after ingest"))
            })?;
            self.inboxes.activate(&inst, key.as_ref());
            self.instances.lock().expect("instances").insert(no, inst);
            Ok(done)
        });
        if activated.is_err() {
            self.inboxes.abandon(no);
        }
        activated
    }

    /// The newest instance whose campaign id is `id`.
    pub fn instance_of(&self, id: &str) -> Option<Arc<Instance>> {
        let instances = self.instances.lock().expect("instances");
        instances.values().rfind(|i| i.settings.id == id).cloned()
    }

    /// The last instance of campaign `id` that was sent and pruned from the spool
    /// (spool/retention.rs), when none with that id is in the spool now: queueing it
    /// again would send the whole list again, so that is asked for, not assumed.
    pub fn pruned_instance_of(&self, id: &str) -> Option<crate::spool::retention::Tombstone> {
        if self.instance_of(id).is_some() {
            return None;
        }
        crate::spool::retention::tombstones(&self.spool)
            .into_iter()
            .rfind(|t| t.campaign == id)
    }

    /// Every instance whose campaign id is `id`.
    pub fn instances_of(&self, id: &str) -> Vec<Arc<Instance>> {
        self.instances
            .lock()
            .expect("instances")
            .values()
            .filter(|i| i.settings.id == id)
            .cloned()
            .collect()
    }

    /// Every instance the daemon runs.
    pub fn all_instances(&self) -> BTreeMap<u32, Arc<Instance>> {
        self.instances.lock().expect("instances").clone()
    }

    /// Spool housekeeping (spool/retention.rs) while running: every campaign
    /// instance that every shard runs with nothing queued is final; those final for
    /// `retention` are pruned, then forgotten here and by the shards. Holds the
    /// ingest lock, so no ingest reads an instance directory half pruned.
    pub fn housekeeping(
        &self,
        retention: std::time::Duration,
        now: std::time::SystemTime,
    ) -> anyhow::Result<Vec<crate::spool::retention::Tombstone>> {
        let _one = self.ingesting.lock().expect("ingest lock");
        let shards = self.inboxes.shards() as u64;
        let finals: Vec<Arc<Instance>> = self
            .all_instances()
            .into_values()
            .filter(|i| {
                !i.submission && i.outcomes.shards() == shards && i.outcomes.snapshot().queued == 0
            })
            .collect();
        let pruned = crate::spool::retention::sweep(
            &self.spool,
            finals.iter().map(|i| &**i),
            retention,
            now,
        )?;
        for t in &pruned {
            let gone = self
                .instances
                .lock()
                .expect("instances")
                .remove(&t.instance);
            let mut kept = self.pruned_counts.lock().expect("pruned counts");
            if let Some(i) = gone {
                kept.insert(t.instance, i.outcomes.snapshot());
            }
            while kept.len() > PRUNED_COUNTS_KEPT_MAX {
                kept.pop_first();
            }
            drop(kept);
            self.inboxes.retire(t.instance);
        }
        Ok(pruned)
    }

    /// Instance `no`'s counts since the daemon started and how many shards run it:
    /// a running instance's, or the last of one pruned while running (all shards,
    /// nothing queued).
    pub fn progress(&self, no: u32) -> Option<(OutcomeCounts, u64)> {
        if let Some(i) = self.instance(no) {
            return Some((i.outcomes.snapshot(), i.outcomes.shards()));
        }
        let kept = self.pruned_counts.lock().expect("pruned counts");
        kept.get(&no).map(|c| (*c, self.inboxes.shards() as u64))
    }

    /// Instance `no`, if the daemon runs it.
    pub fn instance(&self, no: u32) -> Option<Arc<Instance>> {
        self.instances.lock().expect("instances").get(&no).cloned()
    }
}

/// Ingest's records, batched per shard into inbox messages.
struct InboxSink<'a> {
    inboxes: &'a Inboxes,
    email_col: usize,
    /// Learnt from the first record: what to abandon if the ingest fails.
    instance: Option<u32>,
    spool: &'a Path,
    batches: Vec<Vec<QueueRecord>>,
    answers: Vec<oneshot::Receiver<Result<(), String>>>,
}

impl InboxSink<'_> {
    fn send(&mut self, shard: usize) -> Result<(), String> {
        let records = std::mem::take(&mut self.batches[shard]);
        let Some(first) = records.first() else {
            return Ok(());
        };
        let instance = first.instance;
        let a = self
            .inboxes
            .append_waiting(
                shard,
                instance,
                self.email_col,
                records,
                CAMPAIGN_INBOX_PATIENCE,
            )
            .map_err(|e| e.to_string())?;
        self.answers.push(a);
        Ok(())
    }
}

impl RecordSink for InboxSink<'_> {
    fn push(&mut self, shard: usize, q: QueueRecord) -> Result<(), String> {
        self.instance.get_or_insert(q.instance);
        self.batches[shard].push(q);
        if self.batches[shard].len() >= APPEND_RECORDS_MAX {
            self.send(shard)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        for shard in 0..self.batches.len() {
            self.send(shard)?;
        }
        for a in self.answers.drain(..) {
            inbox::wait(a).map_err(|e| format!("spool {}: {e}", self.spool.display()))?;
        }
        Ok(())
    }
}

/// Octets available to an unprivileged writer, and the size, of the file system
/// holding `path` (statvfs).
fn space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data, valid all-zero; then a NUL-terminated path and
    // a statvfs we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| {
        (
            st.f_bavail as u64 * st.f_frsize as u64,
            st.f_blocks as u64 * st.f_frsize as u64,
        )
    })
}

/// The problems of a refused campaign, one per line, as `volley check` prints them.
pub fn problems_text(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}
