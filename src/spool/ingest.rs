//! Ingest: a validated campaign becomes a campaign instance in the spool — its
//! template stored once under `campaigns/<n>/`, each recipient a Queue record in
//! the shard its address hashes to — and is acknowledged only once all of that is
//! on disk, by the `queued` marker. Records of an instance without the marker are
//! abandoned at the next start: nothing is ever half-queued.

use crate::message::campaign::{BadRow, Campaign, Problem, Settings, ERRORS_LISTED_MAX};
use crate::message::template::Template;
use crate::observe::log::{self, Kind, LogWriter};
use crate::spool::{QueueRecord, Spool};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The spool's own settings, fixed when it is created.
#[derive(Debug, Serialize, Deserialize)]
struct SpoolMeta {
    shards: usize,
    /// Random, made with the spool: part of every Message-ID volley adds, so two
    /// spools (two hosts, or one host's spool made anew) never repeat one (RFC 5322
    /// §3.6.4). Spools made before it get one when next opened.
    #[serde(default)]
    message_id_token: Option<String>,
}

/// A new spool's Message-ID token: 64 random bits in base 36.
fn new_message_id_token() -> String {
    let mut n = fastrand::u64(..);
    let mut s = String::new();
    while n > 0 {
        let d = (n % 36) as u8;
        s.push(char::from(if d < 10 { b'0' + d } else { b'a' + d - 10 }));
        n /= 36;
    }
    s
}

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    recipients: u64,
    queued_at_unix_ms: u64,
    /// Bad rows skipped (`--skip-bad-rows`) and logged as local bounces.
    #[serde(default)]
    skipped: u64,
}

/// Longest reply text of a skipped row's local bounce record: the row's line and
/// why, cut here (a bad address can be a whole 64 KiB row).
pub const SKIPPED_REPLY_OCTETS_MAX: usize = 512;

/// Skipped rows' records written to the instance's skipped.jsonl in one go.
const SKIPPED_BATCH_ROWS: u64 = 1024;

/// How to queue a campaign.
#[derive(Debug, Default, Clone)]
pub struct IngestOptions {
    /// Queue the good rows and log each bad one as a local bounce (type Bounce, stage
    /// `local`) instead of refusing the whole campaign. A CSV syntax error still
    /// refuses it: the rows after it cannot be trusted.
    pub skip_bad_rows: bool,
    /// The accounting log the skipped rows' bounces are appended to (needed with
    /// `skip_bad_rows`), and its rotation.
    pub log: Option<(PathBuf, crate::observe::rotation::Rotation)>,
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
    /// The left part of this instance's Message-IDs, before the recipient's shard
    /// and spool location: the spool's random token, the instance number and when
    /// it was queued (see `message_id`).
    pub message_id_prefix: String,
    /// The submission instance of `volley serve`: each Queue record is a whole
    /// message an application handed in, with its own envelope sender, campaign
    /// and queue time (the SUBMITTED_* values), not a row of a template.
    pub submission: bool,
    /// Its recipients by outcome, as this process has seen them (serve's API).
    pub outcomes: Outcomes,
}

/// An instance's recipients by outcome; the shards add to it per commit batch.
#[derive(Default)]
pub struct Outcomes {
    delivered: AtomicU64,
    bounced: AtomicU64,
    expired: AtomicU64,
    /// Temporary failures (events, not recipients).
    deferrals: AtomicU64,
    /// Recipients in a shard's queue or retry wheel now.
    queued: AtomicU64,
    /// Shards running this instance: once it is every shard, `queued` is complete.
    shards: AtomicU64,
}

/// A snapshot of [`Outcomes`].
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct OutcomeCounts {
    pub delivered: u64,
    pub bounced: u64,
    pub expired: u64,
    pub deferrals: u64,
    pub queued: u64,
}

impl OutcomeCounts {
    pub fn add(&mut self, o: &OutcomeCounts) {
        self.delivered += o.delivered;
        self.bounced += o.bounced;
        self.expired += o.expired;
        self.deferrals += o.deferrals;
        self.queued += o.queued;
    }
}

impl Outcomes {
    /// `n` more recipients queued (recovered or taken in).
    pub fn queued(&self, n: u64) {
        self.queued.fetch_add(n, Ordering::Relaxed);
    }

    /// One more shard runs this instance, its recipients counted in `queued`.
    pub fn shard_started(&self) {
        self.shards.fetch_add(1, Ordering::Relaxed);
    }

    /// Shards running this instance.
    pub fn shards(&self) -> u64 {
        self.shards.load(Ordering::Relaxed)
    }

    /// One commit batch: delivered, bounced, expired, deferrals.
    pub fn record(&self, [d, b, e, t]: [u64; 4]) {
        self.delivered.fetch_add(d, Ordering::Relaxed);
        self.bounced.fetch_add(b, Ordering::Relaxed);
        self.expired.fetch_add(e, Ordering::Relaxed);
        self.deferrals.fetch_add(t, Ordering::Relaxed);
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(d + b + e))
            });
    }

    pub fn snapshot(&self) -> OutcomeCounts {
        OutcomeCounts {
            delivered: self.delivered.load(Ordering::Relaxed),
            bounced: self.bounced.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            deferrals: self.deferrals.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
        }
    }
}

/// Values of a submitted message's Queue record, in order.
pub const SUBMITTED_RCPT: usize = 0;
/// The envelope sender ("" for the null sender).
pub const SUBMITTED_SENDER: usize = 1;
/// The campaign it is counted under (its campaign header, or `submission`).
pub const SUBMITTED_CAMPAIGN: usize = 2;
/// When it was taken in, ms since the epoch: its expiry counts from here.
pub const SUBMITTED_QUEUED_AT: usize = 3;
/// The message itself, as it is to be sent (headers already prepared).
pub const SUBMITTED_MESSAGE: usize = 4;
/// How it is routed, when not as every message: [`ROUTE_TLS_REPORT`] for volley's
/// own TLS reports. Only volley sets it (records taken in have five values).
pub const SUBMITTED_ROUTE: usize = 5;
/// A TLS report (RFC 8460 §5.3.1): delivered despite the recipient domain's
/// MTA-STS policy (to any of its MX hosts, TLS as the rules say), its session not
/// counted in the next report.
pub const ROUTE_TLS_REPORT: &[u8] = b"tls-report";
/// The columns of the submission instance's recipients.csv header.
pub const SUBMITTED_COLUMNS: [&str; 5] = ["email", "sender", "campaign", "queued_at_ms", "message"];
/// The file that marks an instance directory as the submission instance.
pub const SUBMISSION_MARKER: &str = "submission";

impl Instance {
    /// The Message-ID volley adds for the recipient at `rref` on `shard` (without
    /// angle brackets): unique over shards, instances and spools (RFC 5322 §3.6.4),
    /// and the same for every attempt, before and after a restart.
    pub fn message_id(&self, shard: usize, rref: crate::spool::RecordRef) -> String {
        format!(
            "{}.{shard}.{}.{}@{}",
            self.message_id_prefix, rref.seg, rref.off, self.settings.from_domain
        )
    }
}

pub type Instances = Arc<BTreeMap<u32, Arc<Instance>>>;

/// The spool is locked by another process (a running `volley send` or `serve`).
#[derive(Debug, thiserror::Error)]
#[error("spool {} is in use by another volley process; stop it or use another --spool", .0.display())]
pub struct SpoolBusy(pub PathBuf);

/// Holds the spool directory for this process alone (flock); released on drop.
pub struct SpoolLock {
    _file: File,
    pub shards: usize,
}

/// Locks the spool and fixes its shard count (a spool keeps the count it was created with).
pub fn lock_spool(dir: &Path, shards: usize) -> anyhow::Result<SpoolLock> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("spool {}: {e}", dir.display()))?;
    crate::host::files::check_own_dir(dir, "spool")?;
    // Not followed, not truncated: a link planted here must not take a write.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join("LOCK"))
        .map_err(|e| anyhow::anyhow!("spool {}: LOCK: {e}", dir.display()))?;
    // SAFETY: plain syscall on a valid, owned descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(SpoolBusy(dir.to_path_buf()).into());
    }
    let meta_path = dir.join("spool.toml");
    let shards = match std::fs::read_to_string(&meta_path) {
        Ok(t) => {
            let mut m: SpoolMeta =
                toml::from_str(&t).map_err(|e| anyhow::anyhow!("{}: {e}", meta_path.display()))?;
            if m.message_id_token.is_none() {
                m.message_id_token = Some(new_message_id_token());
                write_durably(&meta_path, toml::to_string(&m)?.as_bytes())?;
            }
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
            let m = SpoolMeta {
                shards,
                message_id_token: Some(new_message_id_token()),
            };
            write_durably(&meta_path, toml::to_string(&m)?.as_bytes())?;
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
pub fn load_instances(spool: &Path) -> anyhow::Result<BTreeMap<u32, Arc<Instance>>> {
    let mut out = BTreeMap::new();
    let meta_path = spool.join("spool.toml");
    // lock_spool wrote it, with a token; a spool it never saw has no instances.
    let token = std::fs::read_to_string(&meta_path)
        .ok()
        .map(|t| toml::from_str::<SpoolMeta>(&t))
        .transpose()
        .map_err(|e| anyhow::anyhow!("{}: {e}", meta_path.display()))?
        .and_then(|m| m.message_id_token);
    let dir = campaigns_dir(spool);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let Some(no) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        // Pruned (retention.rs): its number stays taken, its copy is gone.
        if p.join(crate::spool::retention::TOMBSTONE).exists() {
            continue;
        }
        let Ok(marker) = std::fs::read_to_string(p.join("queued")) else {
            continue;
        };
        let marker: Marker = serde_json::from_str(&marker)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.join("queued").display()))?;
        // Without it, two spools' Message-IDs could repeat.
        let token = token.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no message_id_token; open the spool with `volley send` (it adds one) first",
                meta_path.display()
            )
        })?;
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
            Arc::new(Instance {
                no,
                email_col: campaign.email_col,
                add_date: campaign.add_date,
                add_message_id: campaign.add_message_id,
                template: campaign.template,
                settings: campaign.settings,
                recipients: marker.recipients,
                queued_at,
                expire_at,
                message_id_prefix: format!("{}.{no}.{token}", marker.queued_at_unix_ms),
                submission: p.join(SUBMISSION_MARKER).exists(),
                outcomes: Outcomes::default(),
            }),
        );
    }
    Ok(out)
}

pub struct Ingested {
    pub instance: u32,
    /// Recipients queued.
    pub recipients: u64,
    /// Bad rows skipped and logged as local bounces (`skip_bad_rows`).
    pub skipped: u64,
    /// Skipped rows' problems, at most ERRORS_LISTED_MAX.
    pub skipped_listed: Vec<Problem>,
    /// Per template line: rows that make long lines or raw non-ASCII headers.
    pub warnings: Vec<Problem>,
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
    ingest_with(
        campaign,
        spool,
        shards,
        segment_bytes,
        &IngestOptions::default(),
    )
}

/// Where ingest puts a campaign's Queue records: straight into the shard spools
/// (`send`, nothing running), or through the running shards' inboxes (`serve`).
pub trait RecordSink {
    /// Takes one record for `shard`; an error stops the ingest.
    fn push(&mut self, shard: usize, q: QueueRecord) -> Result<(), String>;
    /// Makes everything pushed durable.
    fn finish(&mut self) -> Result<(), String>;
}

/// The shard spools themselves, opened by this process (which holds the lock).
struct Spools {
    spools: Vec<Spool>,
    scratch: Vec<u8>,
}

impl RecordSink for Spools {
    fn push(&mut self, shard: usize, q: QueueRecord) -> Result<(), String> {
        self.spools[shard]
            .append_queue(&q, &mut self.scratch)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn finish(&mut self) -> Result<(), String> {
        for sp in &mut self.spools {
            sp.sync().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// As [`ingest`], with `opts`: with `skip_bad_rows`, the bad rows' local bounces
/// are written to the instance's `skipped.jsonl` as they come, and appended to the
/// accounting log (and synced) just before the `queued` marker: a crash in between
/// logs them twice when the campaign is sent again, never loses them.
pub fn ingest_with(
    campaign: &Campaign,
    spool: &Path,
    shards: usize,
    segment_bytes: usize,
    opts: &IngestOptions,
) -> Result<Ingested, IngestError> {
    let existing = load_instances(spool).map_err(IngestError::Other)?;
    let mut spools = Vec::with_capacity(shards);
    for s in 0..shards {
        let (sp, _) = Spool::open(&shard_dir(spool, s), segment_bytes, &|i| {
            existing.contains_key(&i)
        })
        .map_err(|e| IngestError::Other(e.into()))?;
        spools.push(sp);
    }
    let mut sink = Spools {
        spools,
        scratch: Vec::with_capacity(1024),
    };
    ingest_into(campaign, spool, shards, opts, &mut sink)
}

/// As [`ingest_with`], the records going to `sink`. The instance directory is
/// made first and its `queued` marker written last, after `sink.finish`.
pub fn ingest_into(
    campaign: &Campaign,
    spool: &Path,
    shards: usize,
    opts: &IngestOptions,
    sink: &mut dyn RecordSink,
) -> Result<Ingested, IngestError> {
    let started = std::time::Instant::now();
    let cdir = campaigns_dir(spool);
    let no = next_instance_no(&cdir);
    let idir = cdir.join(no.to_string());
    std::fs::create_dir_all(&idir)
        .map_err(|e| IngestError::Other(anyhow::anyhow!("{}: {e}", idir.display())))?;
    for f in ["campaign.toml", "message.eml"] {
        copy_durably(&campaign.dir.join(f), &idir.join(f)).map_err(IngestError::Other)?;
    }
    // The stored header is all the instance needs of recipients.csv.
    let header = campaign.columns.join(",") + "\n";
    write_durably(&idir.join("recipients.csv"), header.as_bytes()).map_err(IngestError::Other)?;

    let skip_log = match (opts.skip_bad_rows, &opts.log) {
        (true, Some(_)) => Some(
            LogWriter::file(&idir.join("skipped.jsonl"))
                .map_err(|e| IngestError::Other(e.into()))?,
        ),
        (true, None) => {
            return Err(IngestError::Other(anyhow::anyhow!(
                "skipping bad rows needs an accounting log to record them in"
            )))
        }
        (false, _) => None,
    };
    let skip_log = std::cell::RefCell::new(skip_log);
    let mut problems = Vec::new();
    let mut skipped_listed = Vec::new();
    let bad_rows = std::cell::Cell::new(0u64);
    let skipped = std::cell::Cell::new(0u64);
    let log_failed = std::cell::RefCell::new(None);
    let mut count = 0u64;
    let streamed = campaign
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
                sink.push(shard_of(&row.email, shards), q)?;
                count += 1;
                Ok(())
            },
            |b| {
                let mut log = skip_log.borrow_mut();
                match log.as_mut() {
                    Some(log) if b.error.skippable() => {
                        skipped.set(skipped.get() + 1);
                        let mut r = log_skipped(log, campaign, shards, &b);
                        // Bounded memory for a list of mostly bad rows.
                        if r.is_ok() && skipped.get() % SKIPPED_BATCH_ROWS == 0 {
                            r = log.flush();
                        }
                        if let Err(e) = r {
                            log_failed.borrow_mut().get_or_insert(e);
                        }
                        if skipped_listed.len() < ERRORS_LISTED_MAX {
                            skipped_listed.push(b.problem());
                        }
                    }
                    _ => {
                        bad_rows.set(bad_rows.get() + 1);
                        if problems.len() < ERRORS_LISTED_MAX {
                            problems.push(b.problem());
                        }
                    }
                }
            },
        )
        .map_err(|p| IngestError::Problems(vec![p], 1))?;
    if bad_rows.get() > 0 {
        return Err(IngestError::Problems(problems, bad_rows.get()));
    }
    if let Some(e) = log_failed.into_inner() {
        return Err(IngestError::Other(e.into()));
    }
    if count == 0 {
        let msg = if skipped.get() > 0 {
            format!(
                "no good rows: all {} were skipped; fix the rows listed above",
                skipped.get()
            )
        } else {
            "no recipients".into()
        };
        return Err(IngestError::Problems(
            vec![Problem {
                file: "recipients.csv",
                line: None,
                msg,
            }],
            1,
        ));
    }
    sink.finish()
        .map_err(|e| IngestError::Other(anyhow::anyhow!(e)))?;
    let queued_at_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    if let (Some(mut skip), Some((log, rotation))) = (skip_log.into_inner(), &opts.log) {
        skip.flush().map_err(|e| IngestError::Other(e.into()))?;
        append_synced(&idir.join("skipped.jsonl"), log, rotation).map_err(IngestError::Other)?;
    }
    let marker = serde_json::to_vec(&Marker {
        recipients: count,
        queued_at_unix_ms,
        skipped: skipped.get(),
    })
    .expect("serialises");
    write_durably(&idir.join("queued"), &marker).map_err(IngestError::Other)?;
    Ok(Ingested {
        instance: no,
        recipients: count,
        skipped: skipped.get(),
        skipped_listed,
        warnings: streamed.warnings,
        elapsed: started.elapsed(),
    })
}

/// The submission instance of `volley serve` (whole messages as records): the one
/// the spool has, or a new one made now for `hostname`. Messages expire
/// `SUBMITTED_EXPIRE_AFTER` after they were taken in.
pub fn submission_instance(spool: &Path, hostname: &str) -> anyhow::Result<u32> {
    if let Some(i) = load_instances(spool)?.values().find(|i| i.submission) {
        return Ok(i.no);
    }
    let cdir = campaigns_dir(spool);
    let no = next_instance_no(&cdir);
    let idir = cdir.join(no.to_string());
    std::fs::create_dir_all(&idir).map_err(|e| anyhow::anyhow!("{}: {e}", idir.display()))?;
    // An address literal for EHLO is no domain for the instance's settings.
    let hostname = match crate::smtp::names::check_domain(hostname) {
        Ok(_) => hostname,
        Err(_) => "localhost.localdomain",
    };
    let settings = format!(
        "id = \"submission\"\nsender = \"postmaster@{hostname}\"\nfrom_domain = \"{hostname}\"\n\
         expire_after = \"{SUBMITTED_EXPIRE_AFTER}\"\ndkim = false\n"
    );
    write_durably(&idir.join("campaign.toml"), settings.as_bytes())?;
    // Never rendered: each record carries its own message.
    let template = format!(
        "From: postmaster@{hostname}\r\nSubject: volley submission instance\r\n\r\nEach message is in its spool record.\r\n"
    );
    write_durably(&idir.join("message.eml"), template.as_bytes())?;
    write_durably(
        &idir.join("recipients.csv"),
        (SUBMITTED_COLUMNS.join(",") + "\n").as_bytes(),
    )?;
    write_durably(&idir.join(SUBMISSION_MARKER), b"")?;
    let marker = serde_json::to_vec(&Marker {
        recipients: 0,
        queued_at_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        skipped: 0,
    })?;
    write_durably(&idir.join("queued"), &marker)?;
    Ok(no)
}

/// Bad rows skipped at ingest of the instance in `idir`, from its `queued` marker.
pub(crate) fn skipped_of(idir: &Path) -> anyhow::Result<u64> {
    let path = idir.join("queued");
    let text =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let m: Marker =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(m.skipped)
}

/// The number a new instance directory under `cdir` gets: one past the highest
/// there, whether or not its ingest finished, and pruned ones too (their
/// directories stay, with a tombstone): a number is never used twice.
fn next_instance_no(cdir: &Path) -> u32 {
    std::fs::read_dir(cdir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
        + 1
}

/// How long a submitted message is retried before it expires.
pub const SUBMITTED_EXPIRE_AFTER: &str = "5d";

/// One skipped row as a local bounce record (the accounting log's own type).
fn log_skipped(
    log: &mut LogWriter,
    campaign: &Campaign,
    shards: usize,
    b: &BadRow,
) -> std::io::Result<()> {
    let mut reply = b.problem().to_string();
    if reply.len() > SKIPPED_REPLY_OCTETS_MAX {
        let mut end = SKIPPED_REPLY_OCTETS_MAX;
        while !reply.is_char_boundary(end) {
            end -= 1;
        }
        reply.truncate(end);
    }
    let domain = b
        .rcpt
        .rsplit_once('@')
        .map_or(String::new(), |(_, d)| d.to_ascii_lowercase());
    log.push(&log::Record {
        kind: Kind::Bounce,
        time: log::now_rfc3339(),
        campaign: &campaign.settings.id,
        rcpt: &b.rcpt,
        sender: &campaign.settings.sender,
        domain: &domain,
        mx: None,
        ip: None,
        code: b.error.code(),
        enhanced: Some(b.error.enhanced()),
        class: Some(b.error.class().name()),
        reply: &reply,
        tls: None,
        stage: "local",
        attempt: 0,
        queued_ms: 0,
        tx_ms: None,
        shard: shard_of(&b.rcpt, shards),
        last_attempt: None,
    });
    Ok(())
}

/// Appends `from` to the accounting log `log` and syncs it.
fn append_synced(
    from: &Path,
    log: &Path,
    rotation: &crate::observe::rotation::Rotation,
) -> anyhow::Result<()> {
    let mut src =
        std::fs::File::open(from).map_err(|e| anyhow::anyhow!("{}: {e}", from.display()))?;
    crate::observe::log::AccountingLog::shared(log, rotation)?.append_synced(&mut src)?;
    Ok(())
}

/// Why a campaign was not queued.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Bad rows: the listed problems and the total count.
    #[error("{1} bad row(s)")]
    Problems(Vec<Problem>, u64),
    /// The spool or the log could not be written.
    #[error(transparent)]
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
