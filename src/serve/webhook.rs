//! Event webhooks (`[[webhook]]`): each follows the accounting log from its own
//! durable cursor (observe/follow.rs) on a thread of its own and POSTs the records
//! it wants, in batches, as a JSON array of the log's lines, unchanged.
//!
//! Delivery is at least once: the cursor (`SPOOL/webhooks/NAME.cursor`) moves only
//! after a 2xx, so a crash between a POST and the cursor's write sends that batch
//! again, and nothing is ever skipped. A failed POST (no connection, a timeout, 5xx,
//! 408, 429) is retried with exponential backoff and jitter, from
//! [`RETRY_WAIT_FIRST`] doubling to `retry_wait_max`, for as long as it takes: a
//! receiver down for an hour gets every record once it is back. A batch the receiver
//! rejects (3xx, any other 4xx) [`REJECTED_ATTEMPTS_MAX`] times is written to
//! `SPOOL/webhooks/NAME.dead.jsonl` (one record a line) and counted as dead-lettered,
//! and the webhook goes on with the next.
//!
//! The HTTP client is ureq 2 (blocking, so a plain thread per webhook; rustls on ring
//! with the Mozilla roots of webpki-roots, or the CAs of `ca_file`, all built already
//! for the rest of volley).

use crate::host::secrets::{self, Secret, SecretError};
use crate::observe::follow::{Cursor, FollowError, Follower, Gone};
use crate::observe::metrics::{Board, External};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The accounting record types a webhook may ask for (`events`), as the log's
/// `type` field names them (observe/log.rs).
pub const EVENTS: [&str; 6] = [
    "Reception",
    "Delivery",
    "TransientFailure",
    "Bounce",
    "Expiration",
    "Shaping",
];
/// Records per POST unless `batch_size` says otherwise.
pub const BATCH_RECORDS_DEFAULT: usize = 100;
/// The smallest `batch_size`.
pub const BATCH_RECORDS_MIN: usize = 1;
/// The largest `batch_size`: a record line is about 500 octets, so a POST stays
/// under a few MB, which receivers take.
pub const BATCH_RECORDS_MAX: usize = 10_000;
/// Octets of records in one POST past which the batch goes at once, however few
/// records it has: a batch of long lines stays a body receivers take (and memory
/// stays bounded).
pub const BATCH_OCTETS_MAX: usize = 8 << 20;
/// How long a batch waits to fill before it goes with fewer records (`batch_wait`).
pub const BATCH_WAIT_DEFAULT: Duration = Duration::from_secs(1);
/// The longest `batch_wait`.
pub const BATCH_WAIT_MAX: Duration = Duration::from_secs(60);
/// How long one POST may take, connecting included (`timeout`); then it is retried.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// The shortest and longest `timeout`.
pub const TIMEOUT_MIN: Duration = Duration::from_secs(1);
pub const TIMEOUT_MAX: Duration = Duration::from_secs(600);
/// The wait before the first retry of a failed POST; each retry doubles it.
pub const RETRY_WAIT_FIRST: Duration = Duration::from_secs(1);
/// Where the doubling stops unless `retry_wait_max` says otherwise.
pub const RETRY_WAIT_MAX_DEFAULT: Duration = Duration::from_secs(300);
/// The shortest and longest `retry_wait_max`.
pub const RETRY_WAIT_MAX_MIN: Duration = Duration::from_secs(1);
pub const RETRY_WAIT_MAX_MAX: Duration = Duration::from_secs(3600);
/// Rejections (3xx, 4xx but 408 and 429) of one batch before it is dead-lettered: a
/// receiver being redeployed may reject for a moment.
pub const REJECTED_ATTEMPTS_MAX: u32 = 5;
/// The largest token or secret file read.
pub const SECRET_OCTETS_MAX: u64 = 4096;
/// The shortest HMAC secret taken (RFC 2104 §3: at least the hash's output length
/// is recommended; 16 octets is the floor here).
pub const HMAC_SECRET_OCTETS_MIN: usize = 16;
/// The longest webhook `name`.
pub const NAME_OCTETS_MAX: usize = 64;
/// How long a stopping daemon waits for its webhooks' POSTs in flight; past it, a
/// batch not yet acknowledged is sent again at the next start.
pub const STOP_WAIT: Duration = Duration::from_secs(5);
/// How often the log is looked at for more when the webhook has caught up.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often `lag_octets` is measured.
const LAG_INTERVAL: Duration = Duration::from_secs(1);
/// Octets of a response read (for its reason, and to keep the connection); the rest
/// is dropped with the connection.
const RESPONSE_OCTETS_MAX: u64 = 64 << 10;
/// Characters of a failed response's body quoted on stderr.
const REASON_CHARS_MAX: usize = 200;
/// Lines a webhook says about the log's unreadable lines or errors before it only
/// counts them (a log it cannot read fills stderr otherwise).
const SAID_MAX: u64 = 100;

/// One `[[webhook]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// Names its cursor and dead-letter files and its metrics: `[a-z0-9_-]`, at most
    /// [`NAME_OCTETS_MAX`].
    pub name: String,
    /// `http://` or `https://`.
    pub url: String,
    /// Record types sent ([`EVENTS`]); None: all, including types added later.
    pub events: Option<Vec<String>>,
    /// Records per POST.
    pub batch_size: usize,
    /// How long a batch waits to fill.
    pub batch_wait: Duration,
    /// Per POST, connecting included.
    pub timeout: Duration,
    /// The cap of the retry backoff.
    pub retry_wait_max: Duration,
    /// `Authorization: Bearer TOKEN`, the token read from this file (a secret: 0600).
    pub bearer_token_file: Option<PathBuf>,
    /// `X-Volley-Signature: sha256=HEX`, HMAC-SHA256 of the body with this file's
    /// content as the key (a secret: 0600).
    pub hmac_secret_file: Option<PathBuf>,
    /// CA certificates (PEM) an https receiver's certificate must chain to, instead
    /// of the Mozilla roots: a receiver with a private CA.
    pub ca_file: Option<PathBuf>,
}

impl Webhook {
    /// A webhook of every record to `url`, with every default.
    pub fn new(name: &str, url: &str) -> Webhook {
        Webhook {
            name: name.into(),
            url: url.into(),
            events: None,
            batch_size: BATCH_RECORDS_DEFAULT,
            batch_wait: BATCH_WAIT_DEFAULT,
            timeout: TIMEOUT_DEFAULT,
            retry_wait_max: RETRY_WAIT_MAX_DEFAULT,
            bearer_token_file: None,
            hmac_secret_file: None,
            ca_file: None,
        }
    }
}

/// Why a `name` or `url` is not taken; the config file's problems quote it.
pub fn check_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= NAME_OCTETS_MAX
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{s:?} is not a webhook name; write 1 to {NAME_OCTETS_MAX} of a-z, 0-9, '-' and '_', e.g. \"crm\" (it names the cursor file and the metrics)"
        )),
    }
}

/// `http://HOST...` or `https://HOST...`.
pub fn check_url(s: &str) -> Result<(), String> {
    match url::Url::parse(s.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(u) => Err(format!(
            "{s:?}: the scheme is {:?}, or there is no host; write an http:// or https:// URL, e.g. \"https://crm.example.com/volley\"",
            u.scheme()
        )),
        Err(e) => Err(format!(
            "{s:?} is not a URL ({e}); write e.g. \"https://crm.example.com/volley\""
        )),
    }
}

/// One webhook's counters, for the metrics (`volley_webhook_*{webhook="NAME"}`).
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Records acknowledged by a 2xx (a batch sent again after a crash counts again).
    pub posted_records: AtomicU64,
    /// POSTs acknowledged by a 2xx.
    pub posted_batches: AtomicU64,
    /// POSTs that failed: no connection, a timeout, or a status other than 2xx.
    pub failures: AtomicU64,
    /// Records written to the dead-letter file after [`REJECTED_ATTEMPTS_MAX`]
    /// rejections.
    pub dead_lettered_records: AtomicU64,
    /// Batches written to the dead-letter file.
    pub dead_lettered_batches: AtomicU64,
    /// Octets of the log on disk not yet read (a gauge; a gzipped generation counts
    /// its compressed size): how far behind the webhook is.
    pub lag_octets: AtomicU64,
}

/// A webhook's figure for the metrics: name, help, whether a gauge, the field.
type Figure = (
    &'static str,
    &'static str,
    bool,
    fn(&WebhookStats) -> &AtomicU64,
);

const FIGURES: [Figure; 6] = [
    ("volley_webhook_posted_records", "Records a webhook's receiver acknowledged with a 2xx (again after a crash re-send).", false, |s| &s.posted_records),
    ("volley_webhook_posted_batches", "POSTs a webhook's receiver acknowledged with a 2xx.", false, |s| &s.posted_batches),
    ("volley_webhook_failures", "A webhook's POSTs that failed: no connection, a timeout, or not 2xx.", false, |s| &s.failures),
    ("volley_webhook_dead_lettered_records", "Records written to a webhook's dead-letter file.", false, |s| &s.dead_lettered_records),
    ("volley_webhook_dead_lettered_batches", "Batches written to a webhook's dead-letter file.", false, |s| &s.dead_lettered_batches),
    ("volley_webhook_lag_octets", "Octets of the accounting log on disk a webhook has not read yet (gzipped files at their compressed size).", true, |s| &s.lag_octets),
];

/// Shows webhook `name`'s figures in `/metrics` (`volley_webhook_*{webhook="NAME"}`).
pub fn add_metrics(board: &Board, name: &str, stats: &Arc<WebhookStats>) {
    for (metric, help, gauge, field) in FIGURES {
        let s = stats.clone();
        board.add_external(External {
            name: metric,
            help,
            gauge,
            labels: vec![("webhook", name.to_string())],
            read: Box::new(move || field(&s).load(Ordering::Relaxed)),
        });
    }
}

/// Why the webhooks did not start. Each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook {name}: {err}")]
    Secret { name: String, err: SecretError },
    #[error("webhook {name}: bearer_token_file {}: not one token of visible ASCII on one line; write the token alone in it", path.display())]
    BadToken { name: String, path: PathBuf },
    #[error("webhook {name}: hmac_secret_file {}: {octets} octets, under the minimum of {HMAC_SECRET_OCTETS_MIN}; write a longer random secret (openssl rand -hex 32)", path.display())]
    ShortSecret {
        name: String,
        path: PathBuf,
        octets: usize,
    },
    #[error("webhook {name}: ca_file {}: {why}; give the PEM certificates of the CA that signed the receiver's certificate", path.display())]
    Ca {
        name: String,
        path: PathBuf,
        why: String,
    },
    #[error("webhook {name}: {err}")]
    Follow { name: String, err: FollowError },
    #[error("webhook {name}: {}: {err}; the spool must be writable by the user volley runs as", path.display())]
    Dir {
        name: String,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("webhook {name}: cannot start its thread: {err}")]
    Thread { name: String, err: std::io::Error },
}

/// The running webhooks.
pub struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    stats: Vec<(String, Arc<WebhookStats>)>,
}

/// The webhooks' directory in the spool: cursors and dead letters.
pub fn dir(spool: &Path) -> PathBuf {
    spool.join("webhooks")
}

/// Starts one thread per webhook, following the log at `log` from its cursor under
/// `SPOOL/webhooks` (a webhook without one starts at the beginning of the file in
/// use). Its secrets are read here, so a bad one stops the start. A cursor whose
/// generation was deleted (log_keep_days) is said on stderr. Errors: a secret, the
/// cursor or the log cannot be read, the directory cannot be made.
pub fn start(hooks: &[Webhook], log: &Path, spool: &Path) -> Result<Running, WebhookError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut prepared = Vec::new();
    for h in hooks {
        prepared.push(prepare(h, log, spool, stop.clone())?);
    }
    let mut running = Running {
        stop,
        threads: Vec::new(),
        stats: Vec::new(),
    };
    for (poster, follower) in prepared {
        let name = poster.hook.name.clone();
        running.stats.push((name.clone(), poster.stats.clone()));
        let t = std::thread::Builder::new()
            .name(format!("webhook-{name}"))
            .spawn(move || poster.run(follower))
            .map_err(|err| WebhookError::Thread {
                name: name.clone(),
                err,
            });
        match t {
            Ok(t) => running.threads.push(t),
            Err(e) => {
                running.stop(Duration::ZERO);
                return Err(e);
            }
        }
    }
    Ok(running)
}

impl Running {
    /// Each webhook's name and counters.
    pub fn stats(&self) -> &[(String, Arc<WebhookStats>)] {
        &self.stats
    }

    /// Stops the webhooks: a POST in flight finishes (at most its `timeout`) and its
    /// cursor is written if it was acknowledged; the threads that ended within
    /// `wait` are joined. Records not yet acknowledged are sent at the next start.
    pub fn stop(mut self, wait: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let until = Instant::now() + wait;
        for t in std::mem::take(&mut self.threads) {
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Running {
    /// A start that failed after the webhooks started stops them (not waited for).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A webhook ready to run: its secrets read, its cursor found in the log.
fn prepare(
    h: &Webhook,
    log: &Path,
    spool: &Path,
    stop: Arc<AtomicBool>,
) -> Result<(Poster, Follower), WebhookError> {
    let name = || h.name.clone();
    let (bearer, hmac) = read_auth(h)?;
    let dir = dir(spool);
    std::fs::create_dir_all(&dir).map_err(|err| WebhookError::Dir {
        name: name(),
        path: dir.clone(),
        err,
    })?;
    let cursor_path = dir.join(format!("{}.cursor", h.name));
    let follow = |err| WebhookError::Follow { name: name(), err };
    let cursor = Cursor::load(&cursor_path).map_err(follow)?;
    let (follower, gone) = Follower::open(log, cursor.as_ref()).map_err(follow)?;
    if cursor.is_none() {
        // Where a new webhook starts, kept before anything is sent: a restart before
        // its first 2xx, after the log rotated, must not start in a newer file.
        follower.cursor().store(&cursor_path).map_err(follow)?;
    }
    match gone {
        Some(g @ Gone { shorter: Some(len), .. }) => eprintln!(
            "volley serve: webhook {}: the log file its cursor is in ({}) is {len} octets, shorter than the {} octets sent from it: it was truncated (logrotate's copytruncate is not supported); records written to it since may not be sent; going on from its end",
            h.name, g.file, g.offset
        ),
        Some(g) => eprintln!(
            "volley serve: webhook {}: the log file its cursor was in ({}, {} octets sent) is gone (log_keep_days, or removed): the records after that in it, if any, were not sent; going on from {}",
            h.name, g.file, g.offset, g.from
        ),
        None => {}
    }
    let mut agent = ureq::AgentBuilder::new();
    if let Some(ca) = &h.ca_file {
        agent = agent.tls_config(tls_trusting(ca).map_err(|why| WebhookError::Ca {
            name: name(),
            path: ca.clone(),
            why,
        })?);
    }
    let agent = agent
        .timeout(h.timeout)
        // A redirect is a wrong URL: a rejection, not a POST turned into a GET.
        .redirects(0)
        .user_agent(concat!("volley/", env!("CARGO_PKG_VERSION")))
        .build();
    let poster = Poster {
        hook: h.clone(),
        agent,
        bearer,
        hmac,
        dead_path: dir.join(format!("{}.dead.jsonl", h.name)),
        cursor_path,
        stats: Arc::new(WebhookStats::default()),
        stop,
        said: 0,
    };
    Ok((poster, follower))
}

/// The Authorization header's value and the HMAC key, from their files.
fn read_auth(h: &Webhook) -> Result<(Option<String>, Option<ring::hmac::Key>), WebhookError> {
    let name = || h.name.clone();
    let secret = |path: &Path, what| {
        secrets::read(path, what, SECRET_OCTETS_MAX)
            .map_err(|err| WebhookError::Secret { name: name(), err })
    };
    let bearer = match &h.bearer_token_file {
        Some(p) => {
            let text = secret(p, Secret::WebhookToken)?;
            let token = std::str::from_utf8(&text).unwrap_or("").trim();
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(WebhookError::BadToken {
                    name: name(),
                    path: p.clone(),
                });
            }
            Some(format!("Bearer {token}"))
        }
        None => None,
    };
    let hmac = match &h.hmac_secret_file {
        Some(p) => {
            let mut key = secret(p, Secret::WebhookHmacSecret)?;
            // The newline an editor or `echo` ends the file with is not the secret's.
            while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                key.pop();
            }
            if key.len() < HMAC_SECRET_OCTETS_MIN {
                return Err(WebhookError::ShortSecret {
                    name: name(),
                    path: p.clone(),
                    octets: key.len(),
                });
            }
            Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key))
        }
        None => None,
    };
    Ok((bearer, hmac))
}

/// A TLS client configuration (rustls on ring, as the rest of volley) trusting the
/// CA certificates in the PEM file `ca` alone. Errors: why the file gives none.
fn tls_trusting(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(crate::deliver::tls::read_roots(ca)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One webhook's thread: batches from the follower, POSTed until acknowledged.
struct Poster {
    hook: Webhook,
    agent: ureq::Agent,
    /// The Authorization header's value.
    bearer: Option<String>,
    hmac: Option<ring::hmac::Key>,
    cursor_path: PathBuf,
    dead_path: PathBuf,
    stats: Arc<WebhookStats>,
    stop: Arc<AtomicBool>,
    /// Lines said about the log so far (bounded by [`SAID_MAX`]).
    said: u64,
}

/// Why a POST was not acknowledged.
struct Failed {
    reason: String,
    /// 3xx or 4xx but 408 and 429: counted toward dead-lettering.
    rejected: bool,
    /// The receiver's Retry-After, in seconds.
    retry_after: Option<Duration>,
}

/// Only the `type` of a record line: the rest is sent as it is.
#[derive(serde::Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
}

impl Poster {
    fn run(mut self, mut f: Follower) {
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut octets = 0;
        let mut first_at = Instant::now();
        let mut saved = f.cursor().clone();
        let mut lag_at = Instant::now() - LAG_INTERVAL;
        let mut line = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            if lag_at.elapsed() >= LAG_INTERVAL {
                lag_at = Instant::now();
                self.stats
                    .lag_octets
                    .store(f.lag_octets(), Ordering::Relaxed);
            }
            let more = match f.next_line(&mut line) {
                Ok(more) => more,
                Err(e) => {
                    self.say(&format!("reading the log: {e}; trying again"));
                    self.sleep(POLL_INTERVAL * 10);
                    continue;
                }
            };
            if more && self.wanted(&line) {
                if batch.is_empty() {
                    first_at = Instant::now();
                }
                octets += line.len();
                batch.push(line.clone());
            }
            let due = batch.len() >= self.hook.batch_size
                || octets >= BATCH_OCTETS_MAX
                || (!batch.is_empty() && first_at.elapsed() >= self.hook.batch_wait);
            if due {
                let at = f.cursor().clone();
                if !self.deliver(&batch, &f) {
                    // Stopped before it was acknowledged: sent again at the next start.
                    return;
                }
                batch.clear();
                octets = 0;
                self.save(&at);
                saved = at;
            } else if !more {
                if batch.is_empty() && *f.cursor() != saved {
                    // Only records this webhook does not want since the last save.
                    saved = f.cursor().clone();
                    self.save(&saved);
                }
                self.sleep(POLL_INTERVAL);
            }
        }
        if batch.is_empty() && *f.cursor() != saved {
            self.save(f.cursor());
        }
    }

    /// Whether the line is a record of a type this webhook sends; a line that is
    /// no JSON record (a crash cut it) is said and skipped.
    fn wanted(&mut self, line: &[u8]) -> bool {
        match serde_json::from_slice::<Head>(line) {
            Ok(h) => self
                .hook
                .events
                .as_ref()
                .is_none_or(|e| e.contains(&h.kind)),
            Err(e) => {
                let shown = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
                self.say(&format!(
                    "a log line that is no record ({e}) skipped: {shown:?}"
                ));
                false
            }
        }
    }

    /// POSTs the batch until it is acknowledged or dead-lettered (true), or the
    /// webhook is stopped (false). While it fails, the lag (what `f` has not read,
    /// and the batch) is renewed before each wait: it grows while the receiver is
    /// down.
    fn deliver(&mut self, batch: &[Vec<u8>], f: &Follower) -> bool {
        let mut body = Vec::with_capacity(batch.iter().map(|l| l.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (i, l) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(l);
        }
        body.push(b']');
        let n = batch.len() as u64;
        let (mut attempt, mut rejected) = (0u32, 0u32);
        // Unbounded in count by design (a receiver down for a day gets everything
        // when it is back); each turn waits at least a second, and a stop ends it.
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            let failed = match self.post(&body) {
                Ok(()) => {
                    self.stats.posted_records.fetch_add(n, Ordering::Relaxed);
                    self.stats.posted_batches.fetch_add(1, Ordering::Relaxed);
                    if attempt > 0 {
                        eprintln!(
                            "volley serve: webhook {}: delivered after {} failed attempt(s)",
                            self.hook.name, attempt
                        );
                    }
                    return true;
                }
                Err(f) => f,
            };
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            self.stats
                .lag_octets
                .store(f.lag_octets() + body.len() as u64, Ordering::Relaxed);
            rejected += u32::from(failed.rejected);
            if rejected >= REJECTED_ATTEMPTS_MAX {
                match self.dead_letter(batch) {
                    Ok(()) => {
                        eprintln!(
                            "volley serve: webhook {}: {} record(s) rejected {rejected} times ({}); written to {} and counted as dead-lettered",
                            self.hook.name, n, failed.reason, self.dead_path.display()
                        );
                        return true;
                    }
                    Err(e) => eprintln!(
                        "volley serve: webhook {}: cannot write the dead-letter file {}: {e}; the batch is kept and tried again",
                        self.hook.name,
                        self.dead_path.display()
                    ),
                }
            }
            let wait = backoff(attempt, self.hook.retry_wait_max)
                .max(failed.retry_after.unwrap_or_default())
                .min(self.hook.retry_wait_max);
            eprintln!(
                "volley serve: webhook {}: POST of {n} record(s) to {}: {}; attempt {} failed, the next in {}",
                self.hook.name,
                self.hook.url,
                failed.reason,
                attempt + 1,
                humantime::format_duration(Duration::from_millis(wait.as_millis() as u64))
            );
            if !self.sleep(wait) {
                return false;
            }
            attempt = attempt.saturating_add(1);
        }
    }

    fn post(&self, body: &[u8]) -> Result<(), Failed> {
        let mut req = self
            .agent
            .post(&self.hook.url)
            .set("Content-Type", "application/json");
        if let Some(b) = &self.bearer {
            req = req.set("Authorization", b);
        }
        if let Some(k) = &self.hmac {
            req = req.set("X-Volley-Signature", &signature(k, body));
        }
        let (status, resp) = match req.send_bytes(body) {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(code, r)) => (code, r),
            Err(ureq::Error::Transport(t)) => {
                let mut reason = crate::deliver::mta_sts::transport_failed(&t);
                if reason.contains("UnknownIssuer") && self.hook.ca_file.is_none() {
                    reason.push_str("; a receiver whose CA is private needs ca_file");
                }
                return Err(Failed {
                    reason,
                    rejected: false,
                    retry_after: None,
                });
            }
        };
        let retry_after = resp
            .header("Retry-After")
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let status_text = resp.status_text().to_string();
        let mut text = Vec::new();
        let _ = resp
            .into_reader()
            .take(RESPONSE_OCTETS_MAX)
            .read_to_end(&mut text);
        if (200..300).contains(&status) {
            return Ok(());
        }
        let said: String = String::from_utf8_lossy(&text)
            .chars()
            .take(REASON_CHARS_MAX)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        Err(Failed {
            reason: format!("{status} {status_text} {}", said.trim())
                .trim_end()
                .to_string(),
            rejected: (300..500).contains(&status) && status != 408 && status != 429,
            retry_after,
        })
    }

    /// Appends the batch, one record a line, to the dead-letter file, synced.
    fn dead_letter(&self, batch: &[Vec<u8>]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::File::options()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(&self.dead_path)?;
        let mut text = Vec::new();
        // A batch a crash cut short ends without a line end: the next starts on a new
        // line, or its first record would be glued to the torn one and both be lost.
        let len = f.metadata()?.len();
        let mut last = [0u8];
        if len > 0 && f.read_exact_at(&mut last, len - 1).is_ok() && last[0] != b'\n' {
            text.push(b'\n');
        }
        for l in batch {
            text.extend_from_slice(l);
            text.push(b'\n');
        }
        f.write_all(&text)?;
        f.sync_data()?;
        self.stats
            .dead_lettered_records
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.stats
            .dead_lettered_batches
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the cursor; a failure is said (the records are sent again after a
    /// restart: at least once still holds).
    fn save(&mut self, c: &Cursor) {
        if let Err(e) = c.store(&self.cursor_path) {
            self.say(&e.to_string());
        }
    }

    /// One line on stderr, at most [`SAID_MAX`] of them.
    fn say(&mut self, what: &str) {
        self.said += 1;
        if self.said <= SAID_MAX {
            eprintln!("volley serve: webhook {}: {what}", self.hook.name);
        }
        if self.said == SAID_MAX {
            eprintln!(
                "volley serve: webhook {}: {SAID_MAX} such lines said; no more",
                self.hook.name
            );
        }
    }

    /// Sleeps `d` in short steps; false: stopped meanwhile.
    fn sleep(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(POLL_INTERVAL.min(until - Instant::now()));
        }
        !self.stop.load(Ordering::Relaxed)
    }
}

/// The wait before retry `attempt` (0: the first): [`RETRY_WAIT_FIRST`] doubled each
/// time up to `max`, times a random 0.75 to 1.25 (so webhooks failing together do not
/// retry together), at most `max`.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let doubled = RETRY_WAIT_FIRST.saturating_mul(1u32 << attempt.min(20));
    doubled
        .min(max)
        .mul_f64(0.75 + fastrand::f64() * 0.5)
        .min(max)
}

/// The `X-Volley-Signature` value of `body`: `sha256=` and the lowercase hex of its
/// HMAC-SHA256 (RFC 2104) under the webhook's secret.
pub fn signature(key: &ring::hmac::Key, body: &[u8]) -> String {
    let tag = ring::hmac::sign(key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_second_to_the_cap_with_jitter() {
        let cap = Duration::from_secs(300);
        for attempt in 0..40 {
            let want = (1u64 << attempt.min(20)).min(300) as f64;
            let got = backoff(attempt, cap).as_secs_f64();
            assert!(
                got >= want * 0.75 - 1e-9 && got <= (want * 1.25).min(300.0),
                "{attempt}: {got}"
            );
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_in_hex() {
        // RFC 4231 test case 2.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            signature(&key, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn secrets_are_checked_and_bad_ones_named_with_their_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("volley-webhook-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let mut h = Webhook::new("crm", "https://crm.example.com/");
        h.bearer_token_file = Some(write("token", "s3kr1t-token\n", 0o600));
        h.hmac_secret_file = Some(write("hmac", "0123456789abcdef\n", 0o600));
        let (bearer, hmac) = read_auth(&h).unwrap();
        assert_eq!(bearer.as_deref(), Some("Bearer s3kr1t-token"));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"0123456789abcdef");
        assert_eq!(
            signature(&hmac.unwrap(), b"x"),
            signature(&key, b"x"),
            "the newline is not the key's"
        );
        h.hmac_secret_file = Some(write("short", "0123456789\n", 0o600));
        let e = read_auth(&h).err().unwrap().to_string();
        assert!(
            e.contains("short: 10 octets, under the minimum of 16"),
            "{e}"
        );
        h.hmac_secret_file = None;
        h.bearer_token_file = Some(write("spaced", "two words\n", 0o600));
        let e = read_auth(&h).err().unwrap().to_string();
        assert!(e.contains("spaced: not one token"), "{e}");
        h.bearer_token_file = Some(write("open", "t\n", 0o644));
        let e = read_auth(&h).err().unwrap().to_string();
        assert!(
            e.contains("webhook bearer token file") && e.contains("chmod 600"),
            "{e}"
        );
        assert!(!e.contains("s3kr1t"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_and_urls_are_checked() {
        assert!(check_name("crm-2_x").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("CRM").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_url("https://crm.example.com/volley").is_ok());
        assert!(check_url("http://127.0.0.1:8080/").is_ok());
        assert!(check_url("ftp://x/").unwrap_err().contains("http://"));
        assert!(check_url("crm.example.com")
            .unwrap_err()
            .contains("not a URL"));
    }
}
