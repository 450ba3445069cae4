//! TLS-RPT (RFC 8460) for the engine: the shards count each TLS session to a domain
//! with an MTA-STS policy in a [`Recorder`], kept under the spool as one ledger per
//! UTC day (`SPOOL/tls-rpt/YYYY-MM-DD.json`, written durably once a second by the
//! engine, so a crash forgets at most the last second's sessions). Once a day has
//! ended (and [`SEND_AFTER_DAY_END`] more), [`send_due`] sends each domain's report
//! where its `_smtp._tls` record asks: POSTed to an `https:` URI (§5.4), or queued as
//! a DKIM-signed message to a `mailto:` one (§5.3). Every send is written to
//! `SPOOL/tls-rpt/sent.tsv` (and synced) before it is made, so a report is never sent
//! twice, whatever crashes; one that failed is tried again after a growing wait
//! ([`RETRY_FIRST_AFTER`], four times longer each time), at most [`ATTEMPTS_MAX`]
//! times.

use crate::deliver::dns::BlockingResolver;
use crate::policy::tls_rpt::{file_name, report_id, rua_of, Applied, Day, Failure, Organization};
use crate::policy::tls_rpt::{ResultType, Rua};
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The ledger directory under the spool.
pub const DIR: &str = "tls-rpt";
/// How long a report POST may take (RFC 8460 §5.4 leaves it to the sender).
pub const POST_TIMEOUT: Duration = Duration::from_secs(30);
/// Tries per report and destination; a report still refused after them is given
/// up (a line says so).
pub const ATTEMPTS_MAX: u32 = 5;
/// The wait after a report's first refusal; each next wait is four times longer
/// (10 min, 40 min, 2 h 40 min, 10 h 40 min: the last try about 14 h after the first).
pub const RETRY_FIRST_AFTER: Duration = Duration::from_secs(600);
/// Days a ledger waits for its reports: a domain whose `_smtp._tls` lookups keep
/// failing is given up after this many days, and a day older than this (a ledger
/// `send --tls-rpt` wrote with no serve to send it) is not reported (RFC 8460 §4.1
/// reports are daily). Less than [`KEEP_DAYS`], so no day still open loses its
/// `sent.tsv` lines.
pub const DAYS_KEPT_MAX: u64 = 7;
/// How long after its end a day's reports are sent: the engine writes a day's last
/// counts within a second of midnight; this leaves room for a slow disk or a stall.
pub const SEND_AFTER_DAY_END: Duration = Duration::from_secs(600);
/// Days a finished ledger (`DAY.json.done`) and its lines in `sent.tsv` are kept,
/// for an operator who wants to see what was sent.
pub const KEEP_DAYS: u64 = 31;

/// The UTC day of `t`, `YYYY-MM-DD`.
pub fn date_of(t: SystemTime) -> String {
    humantime::format_rfc3339(t).to_string()[..10].to_string()
}

/// The result type of a certificate that rustls refused (RFC 8460 §4.3.1).
pub fn result_of_certificate(e: &rustls::Error) -> ResultType {
    use rustls::CertificateError as C;
    if crate::deliver::dane::is_tlsa_mismatch(e) {
        return ResultType::TlsaInvalid;
    }
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                ResultType::CertificateHostMismatch
            }
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => ResultType::CertificateExpired,
            C::UnknownIssuer | C::BadSignature | C::Revoked => ResultType::CertificateNotTrusted,
            _ => ResultType::ValidationFailure,
        },
        _ => ResultType::ValidationFailure,
    }
}

/// Today's counts, and the days that ended and are not written yet.
struct Ledger {
    day: Day,
    ended: Vec<Day>,
}

/// Today's sessions, counted by every shard.
pub struct Recorder {
    dir: PathBuf,
    ledger: Mutex<Ledger>,
    changed: AtomicBool,
    /// One writer at a time: a day's file is never written from a stale copy.
    writer: Mutex<()>,
}

impl Recorder {
    /// The recorder for the spool at `spool_dir`: today's ledger read back if a run
    /// today wrote one (one that does not read is moved aside to `DAY.json.bad`
    /// with a notice, and the day counted afresh). Errors: the directory cannot be
    /// made.
    pub fn open(spool_dir: &Path) -> anyhow::Result<Recorder> {
        let dir = spool_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        let today = date_of(SystemTime::now());
        let day = match read_day(&dir, &today) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("volley: {e}; moved aside, today's TLS-RPT counts start afresh");
                set_aside(&dir, &today);
                None
            }
        };
        Ok(Recorder {
            dir,
            ledger: Mutex::new(Ledger {
                day: day.unwrap_or_else(|| Day::new(today)),
                ended: Vec::new(),
            }),
            changed: AtomicBool::new(false),
            writer: Mutex::new(()),
        })
    }

    /// Counts a session to `domain` that met `policy`.
    pub fn success(&self, domain: &str, policy: &Applied) {
        self.count(None, |d| d.success(domain, policy));
    }

    /// Counts a session to `domain` that failed `policy`, as `failure`.
    pub fn failure(&self, domain: &str, policy: &Applied, failure: Failure) {
        self.count(None, |d| d.failure(domain, policy, failure));
    }

    /// Runs `f` on the current day's counts, after starting the day of `at` (None:
    /// the clock, read under the lock, so shards counting at midnight agree).
    fn count(&self, at: Option<SystemTime>, f: impl FnOnce(&mut Day)) {
        let mut l = self.ledger.lock().expect("tls-rpt lock");
        Self::roll(&mut l, at.unwrap_or_else(SystemTime::now));
        f(&mut l.day);
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Starts the day of `now` if it is later than the current one, setting the
    /// current one aside to be written (a clock stepped back counts on in the
    /// later day). True when it did.
    fn roll(l: &mut Ledger, now: SystemTime) -> bool {
        let today = date_of(now);
        if today <= l.day.date {
            return false;
        }
        let ended = std::mem::replace(&mut l.day, Day::new(today));
        l.ended.push(ended);
        true
    }

    /// Writes the counts durably if they changed since the last save: the days that
    /// ended (first), then the current one. Called once a second; it also starts a
    /// new day at midnight, so a day's last counts are on disk within a second of
    /// its end. On an error what was not written is kept for the next save.
    pub fn save(&self) -> std::io::Result<()> {
        self.save_at(SystemTime::now())
    }

    fn save_at(&self, now: SystemTime) -> std::io::Result<()> {
        let _one = self.writer.lock().expect("tls-rpt writer lock");
        let (ended, day) = {
            let mut l = self.ledger.lock().expect("tls-rpt lock");
            let rolled = Self::roll(&mut l, now);
            if !self.changed.swap(false, Ordering::Relaxed) && !rolled {
                return Ok(());
            }
            (std::mem::take(&mut l.ended), l.day.clone())
        };
        let mut written = 0;
        let result = ended.iter().chain([&day]).try_for_each(|d| {
            if !d.domains.is_empty() || d.not_counted > 0 {
                let json = serde_json::to_vec(d).map_err(std::io::Error::other)?;
                crate::spool::ingest::write_durably(&day_file(&self.dir, &d.date), &json)
                    .map_err(std::io::Error::other)?;
            }
            written += 1;
            Ok(())
        });
        if result.is_err() {
            let mut l = self.ledger.lock().expect("tls-rpt lock");
            let unwritten: Vec<Day> = ended.into_iter().skip(written).collect();
            l.ended.splice(0..0, unwritten);
            self.changed.store(true, Ordering::Relaxed);
        }
        result
    }
}

fn day_file(dir: &Path, date: &str) -> PathBuf {
    dir.join(format!("{date}.json"))
}

/// Moves a ledger that does not read to `DAY.json.bad`.
fn set_aside(dir: &Path, date: &str) {
    let path = day_file(dir, date);
    if let Err(e) = std::fs::rename(&path, path.with_extension("json.bad")) {
        eprintln!("volley: {}: cannot move it aside: {e}", path.display());
    }
}

/// The ledger of `date`, if there is one. Errors name the file.
fn read_day(dir: &Path, date: &str) -> anyhow::Result<Option<Day>> {
    let path = day_file(dir, date);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}: not a TLS-RPT ledger ({e})", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// How reports are sent: who reports, from which address, signed how, and where
/// the report hosts' names are resolved.
pub struct Reporting {
    pub org: Organization,
    /// The From of mailed reports (the DKIM `d=` is its domain).
    pub from: String,
    /// Signs mailed reports (RFC 8460 §5.3 asks for DKIM); None: a `mailto:` URI
    /// is not sent to (each day's report to it fails, with a line saying why, until
    /// the attempts run out).
    pub signer: Option<crate::message::dkim::Signer>,
    /// Verifies report hosts' certificates (webpki-roots and `--tls-roots`).
    pub tls: Arc<rustls::ClientConfig>,
}

/// The header fields a mailed report's signature covers: the default list and the
/// two RFC 8460 §5.3 asks to be signed.
pub fn signed_headers() -> Vec<&'static str> {
    let mut h = crate::message::dkim::DEFAULT_HEADERS.to_vec();
    h.extend(["TLS-Report-Domain", "TLS-Report-Submitter"]);
    h
}

/// Queues a mailed report: `message` (CRLF, signed) from `from` to `to`, durably.
pub trait Mailer {
    /// Errors: the message could not be queued, as a phrase.
    fn queue(&self, from: &str, to: &str, message: Vec<u8>) -> Result<(), String>;
}

/// What a pass of [`send_due`] did, a line each, for the log.
pub type Lines = Vec<String>;

/// Sends the reports of every day that ended [`SEND_AFTER_DAY_END`] before `now`
/// and is not done: for each domain of a day's ledger, its `_smtp._tls` record
/// looked up (a failed lookup is tried at the next pass, for [`DAYS_KEPT_MAX`]
/// days), then its report sent to each URI not sent to yet. A day whose every
/// domain is done is renamed `.done`; a ledger that does not read, `.bad`. Stops
/// between domains once `stop` is set. Errors: the directory or `sent.tsv` cannot
/// be read or written.
pub fn send_due(
    spool_dir: &Path,
    now: SystemTime,
    r: &Reporting,
    dns: &BlockingResolver,
    mailer: &dyn Mailer,
    stop: &AtomicBool,
) -> anyhow::Result<Lines> {
    let dir = spool_dir.join(DIR);
    let mut lines = Vec::new();
    let due_before = date_of(now - SEND_AFTER_DAY_END);
    let today = date_of(now);
    let names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(lines),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", dir.display())),
    };
    for done in names.iter().filter_map(|n| n.strip_suffix(".json.done")) {
        if days_between(done, &today) > KEEP_DAYS {
            let path = dir.join(format!("{done}.json.done"));
            if let Err(e) = std::fs::remove_file(&path) {
                lines.push(format!("{}: not removed: {e}", path.display()));
            }
        }
    }
    let mut days: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".json"))
        .filter(|d| d.len() == 10 && *d < due_before.as_str())
        .collect();
    days.sort();
    let mut sent = Sent::open(&dir, &today)?;
    for date in days {
        let day = match read_day(&dir, date) {
            Ok(Some(day)) => day,
            Ok(None) => continue,
            Err(e) => {
                lines.push(format!("{e}; moved aside, its reports are not sent"));
                set_aside(&dir, date);
                continue;
            }
        };
        let age = days_between(date, &today);
        let mut all_done = true;
        for domain in day.domains.keys() {
            if stop.load(Ordering::Relaxed) {
                return Ok(lines);
            }
            let finished = (date.to_string(), domain.clone(), FINISHED.to_string());
            if sent.state(&finished) == State::Done {
                continue;
            }
            if age > DAYS_KEPT_MAX {
                lines.push(format!(
                    "{date} {domain}: not reported: the day is over {DAYS_KEPT_MAX} days old"
                ));
                continue;
            }
            let s = Send {
                day: &day,
                domain,
                now,
            };
            let done = s.report(r, dns, mailer, &mut sent, age == DAYS_KEPT_MAX);
            lines.extend(done.lines);
            if !done.finished {
                all_done = false;
            } else if let Err(e) = sent.write(&finished, State::Done, now) {
                lines.push(format!("{date} {domain}: {e}"));
            }
        }
        if all_done {
            let from = day_file(&dir, date);
            std::fs::rename(&from, from.with_extension("json.done"))
                .map_err(|e| anyhow::anyhow!("{}: {e}", from.display()))?;
        }
    }
    Ok(lines)
}

struct Outcome {
    /// Nothing more will be tried for this domain and day.
    finished: bool,
    lines: Lines,
}

/// One domain's report for one day.
struct Send<'a> {
    day: &'a Day,
    domain: &'a str,
    now: SystemTime,
}

impl Send<'_> {
    fn report(
        &self,
        r: &Reporting,
        dns: &BlockingResolver,
        mailer: &dyn Mailer,
        sent: &mut Sent,
        give_up: bool,
    ) -> Outcome {
        let (date, domain) = (&self.day.date, self.domain);
        let mut lines = Vec::new();
        let finish = |line: Option<String>, finished: bool| Outcome {
            finished,
            lines: line.into_iter().collect(),
        };
        let uris = match dns.txt(&format!("_smtp._tls.{domain}")).map(|t| rua_of(&t)) {
            Ok(Ok(uris)) if uris.is_empty() => return finish(None, true),
            Ok(Ok(uris)) => uris,
            // A bad record is the domain's to fix; nothing can be sent for the day.
            Ok(Err(why)) => {
                return finish(Some(format!("{date} {domain}: not reported: {why}")), true)
            }
            Err(why) => {
                let next = if give_up {
                    "given up"
                } else {
                    "tried again later"
                };
                let line = format!("{date} {domain}: _smtp._tls not looked up ({why}); {next}");
                return finish(Some(line), give_up);
            }
        };
        let Some(json) = self.day.report(domain, &r.org) else {
            return finish(None, true);
        };
        let gz = gzip(&json);
        let mut finished = true;
        for uri in uris {
            let target = match &uri {
                Rua::Mailto(a) => format!("mailto:{a}"),
                Rua::Https(u) => u.clone(),
            };
            let key = (date.clone(), domain.to_string(), target.clone());
            let failures = sent.refusals(&key);
            match sent.state(&key) {
                State::Begun | State::Done => continue,
                State::Failed(_) if failures >= ATTEMPTS_MAX => continue,
                State::Failed(at) => {
                    let wait = RETRY_FIRST_AFTER * 4u32.pow(failures.saturating_sub(1).min(8));
                    if at.checked_add(wait).is_some_and(|due| self.now < due) {
                        finished = false;
                        continue;
                    }
                }
                State::None => {}
            }
            if let Err(e) = sent.write(&key, State::Begun, self.now) {
                lines.push(format!("{date} {domain} {target}: not sent: {e}"));
                finished = false;
                continue;
            }
            let result = match &uri {
                Rua::Https(url) => post(url, &gz, r, dns),
                Rua::Mailto(to) => self
                    .mail(to, &gz, r)
                    .and_then(|m| mailer.queue(&r.from, to, m)),
            };
            let (state, line) = match result {
                Ok(()) => {
                    let how = match uri {
                        Rua::Https(_) => "posted to",
                        Rua::Mailto(_) => "queued for",
                    };
                    (
                        State::Done,
                        format!("{date} {domain}: report {how} {target}"),
                    )
                }
                Err(why) => {
                    let n = failures + 1;
                    let last = n >= ATTEMPTS_MAX;
                    finished &= last;
                    let what = if last {
                        "given up"
                    } else {
                        "tried again later"
                    };
                    (
                        State::Failed(self.now),
                        format!("{date} {domain}: report to {target} failed ({why}); attempt {n} of {ATTEMPTS_MAX}, {what}"),
                    )
                }
            };
            if let Err(e) = sent.write(&key, state, self.now) {
                // Its begun line stands: counted as sent, never tried again.
                lines.push(format!("{date} {domain} {target}: {e}; counted as sent"));
            }
            lines.push(line);
        }
        Outcome { finished, lines }
    }

    /// The report as a message (RFC 8460 §5.3): multipart/report of type tlsrpt, a
    /// short text and the gzipped report as `application/tlsrpt+gzip`, with the
    /// TLS-Report-Domain and TLS-Report-Submitter fields, DKIM-signed. Errors: no
    /// key to sign with, an address the queue would not take, signing failed.
    fn mail(&self, to: &str, gz: &[u8], r: &Reporting) -> Result<Vec<u8>, String> {
        let (day, domain) = (self.day, self.domain);
        let Some(signer) = &r.signer else {
            return Err(format!(
                "no DKIM key for {} (RFC 8460 §5.3: mailed reports are signed); give tls_rpt_from's domain a key under dkim_dir",
                r.from.rsplit_once('@').map_or("", |(_, d)| d)
            ));
        };
        crate::message::campaign::normalise_address(to).map_err(|e| format!("{to}: {e}"))?;
        let submitter = &r.org.submitter;
        let begin = humantime::parse_rfc3339(&format!("{}T00:00:00Z", day.date))
            .map_err(|e| e.to_string())?
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let end = begin + 86_399;
        let id = report_id(&day.date, domain, submitter);
        let stamp = self
            .now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let boundary = format!("tlsrpt-{begin}-{stamp}");
        let text = format!(
            "From: {from}\r\n\
             To: {to}\r\n\
             Date: {date}\r\n\
             Subject: Report Domain: {domain} Submitter: {submitter} Report-ID: <{id}>\r\n\
             Message-ID: <{stamp}.{date_id}.{domain}@{submitter}>\r\n\
             TLS-Report-Domain: {domain}\r\n\
             TLS-Report-Submitter: {submitter}\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n \
             boundary=\"{boundary}\"\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\
             \r\n\
             This is an aggregate TLS report (RFC 8460) from {submitter} for {domain},\r\n\
             {date_id} UTC.\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Type: application/tlsrpt+gzip\r\n\
             Content-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment;\r\n \
             filename=\"{file}\"\r\n\
             \r\n",
            from = r.from,
            date = crate::message::dsn::rfc5322_date(self.now),
            date_id = day.date,
            file = file_name(submitter, domain, begin, end),
        );
        let mut message = text.into_bytes();
        crate::message::mime::seven_bit::base64_lines(gz, &mut message);
        message.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let header = signer
            .sign(&mut message, crate::message::dkim::Body::Varies)
            .map_err(|e| format!("DKIM signing failed: {e}"))?;
        let mut signed = header.into_bytes();
        signed.extend_from_slice(&message);
        Ok(signed)
    }
}

/// Days from `a` to `b` (`YYYY-MM-DD`), 0 when either does not parse.
fn days_between(a: &str, b: &str) -> u64 {
    let t = |d: &str| humantime::parse_rfc3339(&format!("{d}T00:00:00Z")).ok();
    match (t(a), t(b)) {
        (Some(a), Some(b)) => b.duration_since(a).map_or(0, |d| d.as_secs() / 86_400),
        _ => 0,
    }
}

fn gzip(json: &serde_json::Value) -> Vec<u8> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(json.to_string().as_bytes())
        .and_then(|()| z.finish())
        .expect("gzip into memory")
}

/// POSTs a report (RFC 8460 §5.4): `application/tlsrpt+gzip`, a certificate valid
/// for the URI's host, no redirect followed, any 2xx taken as received.
fn post(url: &str, gz: &[u8], r: &Reporting, dns: &BlockingResolver) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    let ips: Vec<IpAddr> = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => vec![ip.into()],
        Some(url::Host::Ipv6(ip)) => vec![ip.into()],
        Some(url::Host::Domain(host)) => dns.ips(host)?,
        None => return Err(format!("{url}: no host")),
    };
    let addrs: Vec<SocketAddr> = ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    let agent = crate::deliver::mta_sts::pinned_agent(r.tls.clone(), POST_TIMEOUT, addrs);
    match agent
        .post(url)
        .set("Content-Type", "application/tlsrpt+gzip")
        .send_bytes(gz)
    {
        Ok(resp) if (200..300).contains(&resp.status()) => Ok(()),
        Ok(resp) => Err(format!("HTTP {}", resp.status())),
        Err(ureq::Error::Status(code, _)) => Err(format!("HTTP {code}")),
        Err(ureq::Error::Transport(t)) => Err(crate::deliver::mta_sts::transport_failed(&t)),
    }
}

/// Where a report stands for one day, domain and URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    None,
    /// Written before the send: with no later line, a crash cut it off, and it
    /// counts as sent.
    Begun,
    Done,
    /// Refused, the last time then (how often: `Sent::refusals`).
    Failed(SystemTime),
}

type Key = (String, String, String);

/// The target of a `sent.tsv` line that says a domain's report for the day is
/// finished (every URI sent to, or given up): the domain is not looked up again.
const FINISHED: &str = "*";

/// Where each report of each day went: `sent.tsv`, a line per step
/// (`date \t domain \t target \t begun|done|failed \t unix seconds`), the last of a
/// key deciding. Lines of days older than [`KEEP_DAYS`] are dropped when it is read.
struct Sent {
    file: std::fs::File,
    path: PathBuf,
    states: HashMap<Key, State>,
    /// Refusals so far per key, over every attempt.
    refusals: HashMap<Key, u32>,
}

impl Sent {
    fn open(dir: &Path, today: &str) -> anyhow::Result<Sent> {
        let path = dir.join("sent.tsv");
        let ctx = |e: std::io::Error| anyhow::anyhow!("{}: {e}", path.display());
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(ctx(e)),
        };
        let mut states = HashMap::new();
        let mut refusals: HashMap<Key, u32> = HashMap::new();
        let mut kept = String::new();
        // A line a crash cut short has fewer fields: skipped (its send was not begun).
        for l in text.lines() {
            let f: Vec<&str> = l.split('\t').collect();
            let [date, domain, target, state, at] = f[..] else {
                continue;
            };
            if days_between(date, today) > KEEP_DAYS {
                continue;
            }
            kept.push_str(l);
            kept.push('\n');
            let at = UNIX_EPOCH
                .checked_add(Duration::from_secs(at.parse().unwrap_or(0)))
                .unwrap_or(UNIX_EPOCH);
            let key = (date.to_string(), domain.to_string(), target.to_string());
            let s = match state {
                "begun" => State::Begun,
                "done" => State::Done,
                "failed" => {
                    *refusals.entry(key.clone()).or_default() += 1;
                    State::Failed(at)
                }
                _ => continue,
            };
            // A begun send followed by a failed line was refused, not cut off.
            states.insert(key, s);
        }
        if kept != text {
            crate::spool::ingest::write_durably(&path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(ctx)?;
        Ok(Sent {
            file,
            path,
            states,
            refusals,
        })
    }

    fn state(&self, key: &Key) -> State {
        *self.states.get(key).unwrap_or(&State::None)
    }

    /// How often the report to `key`'s target was refused.
    fn refusals(&self, key: &Key) -> u32 {
        self.refusals.get(key).copied().unwrap_or(0)
    }

    /// Appends a step and syncs it. Errors name the file.
    fn write(&mut self, key: &Key, state: State, now: SystemTime) -> Result<(), String> {
        let word = match state {
            State::Begun => "begun",
            State::Done => "done",
            State::Failed(..) => "failed",
            State::None => return Ok(()),
        };
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (date, domain, target) = key;
        // Each field was checked to hold no tab or line end (rua_of, the ledger's
        // domains); a line is one record.
        let line = format!("{date}\t{domain}\t{target}\t{word}\t{secs}\n");
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        if let State::Failed(_) = state {
            *self.refusals.entry(key.clone()).or_default() += 1;
        }
        self.states.insert(key.clone(), state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::mta_sts::{Mode, Policy};

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("volley-tlsrpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn key(date: &str, target: &str) -> Key {
        (date.into(), "example.com".into(), target.into())
    }

    #[test]
    fn sent_tsv_says_what_was_begun_done_and_refused_across_restarts() {
        let dir = temp("sent");
        let today = "2026-12-01";
        let t = UNIX_EPOCH + Duration::from_secs(1_796_083_200);
        let mut s = Sent::open(&dir, today).unwrap();
        let (a, b) = (
            key("2026-11-30", "https://a.example/"),
            key("2026-11-30", "mailto:b@x.example"),
        );
        s.write(&a, State::Begun, t).unwrap();
        for _ in 0..2 {
            s.write(&b, State::Begun, t).unwrap();
            s.write(&b, State::Failed(t), t).unwrap();
        }
        // A crash mid-write leaves a torn line; a line of a day long gone is dropped.
        let path = dir.join("sent.tsv");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"2026-10-01\texample.com\thttps://old.example/\tdone\t1\n")
            .unwrap();
        f.write_all(b"2026-11-30\texample.com\thttps://c.exa")
            .unwrap();
        drop(f);
        let s = Sent::open(&dir, today).unwrap();
        assert_eq!(s.state(&a), State::Begun, "cut off mid-send counts as sent");
        assert_eq!((s.state(&b), s.refusals(&b)), (State::Failed(t), 2));
        assert_eq!(
            s.state(&key("2026-10-01", "https://old.example/")),
            State::None
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with("failed\t1796083200\n") && !text.contains("old.example"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_day_that_ends_is_written_whole_and_a_bad_ledger_is_moved_aside() {
        let spool = temp("recorder");
        let dir = spool.join(DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let today = date_of(SystemTime::now());
        std::fs::write(day_file(&dir, &today), "{not json").unwrap();
        let r = Recorder::open(&spool).unwrap();
        assert!(dir.join(format!("{today}.json.bad")).exists());
        let policy = Applied::sts(&Policy {
            mode: Mode::Enforce,
            mx: vec!["mx.example.com".into()],
            max_age: Duration::from_secs(86_400),
        });
        // A day far ahead, then sessions late on it and just after its midnight; a
        // shard that read the clock a moment earlier counts in the later day.
        let late = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(date_of(late), "2099-12-31");
        r.count(Some(late), |d| d.success("example.com", &policy));
        r.count(Some(late), |d| d.success("example.com", &policy));
        let next = late + Duration::from_secs(2);
        r.count(Some(next), |d| d.success("example.org", &policy));
        r.count(Some(late), |d| d.success("example.net", &policy));
        r.save_at(next).unwrap();
        let ended = read_day(&dir, "2099-12-31")
            .unwrap()
            .expect("the ended day");
        assert_eq!(ended.domains["example.com"][0].1.successful, 2);
        assert_eq!(ended.domains.len(), 1, "{ended:?}");
        let new = read_day(&dir, "2100-01-01").unwrap().expect("the new day");
        assert_eq!(new.domains.len(), 2, "{new:?}");
        // Nothing changed: nothing is written.
        std::fs::remove_file(day_file(&dir, "2100-01-01")).unwrap();
        r.save_at(next).unwrap();
        assert!(!day_file(&dir, "2100-01-01").exists());
        let _ = std::fs::remove_dir_all(&spool);
    }
}
