//! TLS-RPT (RFC 8460) for the engine: the shards count each TLS session to a domain
//! with an MTA-STS policy in a [`Recorder`], kept under the spool as one ledger per
//! UTC day (`SPOOL/tls-rpt/YYYY-MM-DD.json`, saved once a second by the engine, so a
//! crash forgets at most the last second's sessions). Once a day has ended,
//! [`send_due`] sends each domain's report where its `_smtp._tls` record asks: POSTed
//! to an `https:` URI (§5.4), or queued as a DKIM-signed message to a `mailto:` one
//! (§5.3). Every send is written to `SPOOL/tls-rpt/sent.tsv` (and synced) before it
//! is made, so a report is never sent twice, whatever crashes; one that failed is
//! tried again, at most [`ATTEMPTS_MAX`] times.

use crate::deliver::dns::BlockingResolver;
use crate::policy::tls_rpt::{file_name, rua_of, Applied, Day, Failure, Organization, Rua};
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The ledger directory under the spool.
pub const DIR: &str = "tls-rpt";
/// How long a report POST may take (RFC 8460 §5.4 leaves it to the sender).
pub const POST_TIMEOUT: Duration = Duration::from_secs(30);
/// Tries per report and destination; a report still refused after them is given
/// up (written to `sent.tsv` as such).
pub const ATTEMPTS_MAX: u32 = 3;
/// Days a ledger waits for its reports: one whose `_smtp._tls` lookups keep failing
/// is given up after this many days (RFC 8460 §4.1 reports are daily).
pub const DAYS_KEPT_MAX: u64 = 7;

/// The UTC day of `t`, `YYYY-MM-DD`.
pub fn date_of(t: SystemTime) -> String {
    humantime::format_rfc3339(t).to_string()[..10].to_string()
}

/// Today's sessions, counted by every shard.
pub struct Recorder {
    dir: PathBuf,
    day: Mutex<Day>,
    changed: AtomicBool,
}

impl Recorder {
    /// The recorder for the spool at `spool_dir`: today's ledger read back if a run
    /// today wrote one. Errors: the directory cannot be made, or the ledger cannot
    /// be read (it names the file; move it away to start the day afresh).
    pub fn open(spool_dir: &Path) -> anyhow::Result<Recorder> {
        let dir = spool_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        let today = date_of(SystemTime::now());
        let day = read_day(&dir, &today)?.unwrap_or_else(|| Day::new(today));
        Ok(Recorder {
            dir,
            day: Mutex::new(day),
            changed: AtomicBool::new(false),
        })
    }

    /// Counts a session to `domain` that met `policy`.
    pub fn success(&self, domain: &str, policy: &Applied) {
        self.with_today(|d| d.success(domain, policy));
    }

    /// Counts a session to `domain` that failed `policy`, as `failure`.
    pub fn failure(&self, domain: &str, policy: &Applied, failure: Failure) {
        self.with_today(|d| d.failure(domain, policy, failure));
    }

    /// Runs `f` on today's counts; a new day first writes the last one out.
    fn with_today(&self, f: impl FnOnce(&mut Day)) {
        let today = date_of(SystemTime::now());
        let mut day = self.day.lock().expect("tls-rpt lock");
        if day.date != today {
            let ended = std::mem::replace(&mut *day, Day::new(today));
            if let Err(e) = write_day(&self.dir, &ended) {
                eprintln!(
                    "volley: {}: {e}; the TLS report of {} is lost",
                    self.dir.display(),
                    ended.date
                );
            }
        }
        f(&mut day);
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Writes today's counts if they changed since the last save.
    pub fn save(&self) -> std::io::Result<()> {
        if !self.changed.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let day = self.day.lock().expect("tls-rpt lock").clone();
        write_day(&self.dir, &day)
    }
}

fn day_file(dir: &Path, date: &str) -> PathBuf {
    dir.join(format!("{date}.json"))
}

fn write_day(dir: &Path, day: &Day) -> std::io::Result<()> {
    let json = serde_json::to_vec(day).map_err(std::io::Error::other)?;
    crate::host::files::replace_file(&day_file(dir, &day.date), &json)
}

/// The ledger of `date`, if there is one. Errors name the file.
fn read_day(dir: &Path, date: &str) -> anyhow::Result<Option<Day>> {
    let path = day_file(dir, date);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a TLS-RPT ledger ({e}); move it away to count the day afresh",
                path.display()
            )
        }),
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
    /// Signs mailed reports (RFC 8460 §5.3 asks for DKIM); None: reports go only to
    /// `https:` URIs, and `mailto:` ones are skipped with a line saying why.
    pub signer: Option<crate::message::dkim::Signer>,
    /// Verifies report hosts' certificates (webpki-roots and `--tls-roots`).
    pub tls: Arc<rustls::ClientConfig>,
}

/// Queues a mailed report: `message` (CRLF, signed) from `from` to `to`, durably.
pub trait Mailer {
    /// Errors: the message could not be queued, as a phrase.
    fn queue(&self, from: &str, to: &str, message: Vec<u8>) -> Result<(), String>;
}

/// What a pass of [`send_due`] did, a line each, for the log.
pub type Lines = Vec<String>;

/// Sends the reports of every day before `today` not sent yet: for each domain of
/// a day's ledger, its `_smtp._tls` record looked up (a failed lookup is tried at
/// the next pass, for [`DAYS_KEPT_MAX`] days), then its report sent to each URI.
/// A day whose every domain is done is renamed `.done`.
pub fn send_due(
    spool_dir: &Path,
    today: &str,
    r: &Reporting,
    dns: &BlockingResolver,
    mailer: &dyn Mailer,
) -> anyhow::Result<Lines> {
    let dir = spool_dir.join(DIR);
    let mut lines = Vec::new();
    let mut days: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| Some(n.strip_suffix(".json")?.to_string()))
            .filter(|d| d.len() == 10 && d.as_str() < today)
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(lines),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", dir.display())),
    };
    days.sort();
    let mut sent = Sent::open(&dir)?;
    for date in days {
        let Some(day) = read_day(&dir, &date)? else {
            continue;
        };
        let give_up = days_between(&date, today) > DAYS_KEPT_MAX;
        let mut all_done = true;
        for domain in day.domains.keys() {
            let done = report_domain(&day, domain, r, dns, mailer, &mut sent, give_up);
            all_done &= done.finished;
            lines.extend(done.lines);
        }
        if all_done {
            let from = day_file(&dir, &date);
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

fn report_domain(
    day: &Day,
    domain: &str,
    r: &Reporting,
    dns: &BlockingResolver,
    mailer: &dyn Mailer,
    sent: &mut Sent,
    give_up: bool,
) -> Outcome {
    let date = &day.date;
    let mut lines = Vec::new();
    let uris = match dns.txt(&format!("_smtp._tls.{domain}")).map(|t| rua_of(&t)) {
        Ok(Ok(uris)) => uris,
        Ok(Err(why)) => {
            // A bad record is the domain's to fix; nothing can be sent for the day.
            lines.push(format!("{date} {domain}: not reported: {why}"));
            return Outcome {
                finished: true,
                lines,
            };
        }
        Err(why) => {
            lines.push(format!(
                "{date} {domain}: _smtp._tls not looked up ({why}){}",
                if give_up {
                    "; given up"
                } else {
                    "; tried again later"
                }
            ));
            return Outcome {
                finished: give_up,
                lines,
            };
        }
    };
    let Some(json) = day.report(domain, &r.org) else {
        return Outcome {
            finished: true,
            lines,
        };
    };
    let mut finished = true;
    for uri in uris {
        let target = match &uri {
            Rua::Mailto(a) => format!("mailto:{a}"),
            Rua::Https(u) => u.clone(),
        };
        match sent.state(date, domain, &target) {
            State::Begun | State::Done => continue,
            State::Failed(n) if n >= ATTEMPTS_MAX => continue,
            _ => {}
        }
        if let Err(e) = sent.write(date, domain, &target, "begun") {
            lines.push(format!("{date} {domain} {target}: not sent: {e}"));
            finished = false;
            continue;
        }
        let gz = gzip(&json);
        let result = match &uri {
            Rua::Https(url) => post(url, &gz, r, dns),
            Rua::Mailto(to) => match &r.signer {
                None => Err(format!(
                    "no DKIM key for {} (RFC 8460 §5.3: mailed reports are signed); give the From domain a key under dkim_dir",
                    domain_of(&r.from)
                )),
                Some(signer) => {
                    mail(day, domain, to, &gz, r, signer).and_then(|m| mailer.queue(&r.from, to, m))
                }
            },
        };
        let (state, line) = match result {
            Ok(()) => {
                let how = match uri {
                    Rua::Https(_) => "posted to",
                    Rua::Mailto(_) => "queued for",
                };
                ("done", format!("{date} {domain}: report {how} {target}"))
            }
            Err(why) => {
                let n = sent.failures(date, domain, &target) + 1;
                let last = n >= ATTEMPTS_MAX;
                finished &= last;
                let what = if last {
                    "given up"
                } else {
                    "tried again later"
                };
                (
                    "failed",
                    format!("{date} {domain}: report to {target} failed ({why}); attempt {n} of {ATTEMPTS_MAX}, {what}"),
                )
            }
        };
        if let Err(e) = sent.write(date, domain, &target, state) {
            lines.push(format!("{date} {domain} {target}: {e}"));
        }
        lines.push(line);
    }
    Outcome { finished, lines }
}

/// Days from `a` to `b` (`YYYY-MM-DD`), 0 when either does not parse.
fn days_between(a: &str, b: &str) -> u64 {
    let t = |d: &str| humantime::parse_rfc3339(&format!("{d}T00:00:00Z")).ok();
    match (t(a), t(b)) {
        (Some(a), Some(b)) => b.duration_since(a).map_or(0, |d| d.as_secs() / 86_400),
        _ => 0,
    }
}

fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map_or(addr, |(_, d)| d)
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
    let host = parsed.host_str().ok_or("no host in the URI")?.to_string();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => dns
            .ips(&host)?
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect(),
    };
    let agent = ureq::AgentBuilder::new()
        .tls_config(r.tls.clone())
        .redirects(0)
        .timeout(POST_TIMEOUT)
        .resolver(move |_: &str| Ok(addrs.clone()))
        .build();
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

/// The report as a message (RFC 8460 §5.3): multipart/report of type tlsrpt, a
/// short text and the gzipped report as `application/tlsrpt+gzip`, with the
/// TLS-Report-Domain and TLS-Report-Submitter fields, DKIM-signed by `signer`.
fn mail(
    day: &Day,
    domain: &str,
    to: &str,
    gz: &[u8],
    r: &Reporting,
    signer: &crate::message::dkim::Signer,
) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let submitter = &r.org.submitter;
    let begin = humantime::parse_rfc3339(&format!("{}T00:00:00Z", day.date))
        .map_err(|e| e.to_string())?
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let end = begin + 86_399;
    let id = crate::policy::tls_rpt::report_id(&day.date, domain, submitter);
    let boundary = format!("tlsrpt-{begin}-{}", fastrand::u64(..));
    let b64 = base64::engine::general_purpose::STANDARD.encode(gz);
    let mut wrapped = String::new();
    for chunk in b64.as_bytes().chunks(76) {
        wrapped.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        wrapped.push_str("\r\n");
    }
    let now = SystemTime::now();
    let text = format!(
        "From: {from}\r\n\
         To: {to}\r\n\
         Date: {date}\r\n\
         Subject: Report Domain: {domain} Submitter: {submitter} Report-ID: <{id}>\r\n\
         Message-ID: <{id}.{stamp}@{submitter}>\r\n\
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
         {day} UTC.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: application/tlsrpt+gzip\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment;\r\n \
         filename=\"{file}\"\r\n\
         \r\n\
         {wrapped}\
         --{boundary}--\r\n",
        from = r.from,
        date = crate::message::dsn::rfc5322_date(now),
        stamp = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()),
        day = day.date,
        file = file_name(submitter, domain, begin, end),
    );
    let mut message = text.into_bytes();
    let header = signer
        .sign(&mut message, crate::message::dkim::Body::Varies)
        .map_err(|e| format!("DKIM signing failed: {e}"))?;
    let mut signed = header.into_bytes();
    signed.extend_from_slice(&message);
    Ok(signed)
}

/// Where each report of each day went: `sent.tsv`, a line per step
/// (`date \t domain \t target \t begun|done|failed`), the last of a key
/// deciding. Synced before a report is sent: `begun` with no later line (a crash
/// mid-send) counts as sent.
struct Sent {
    file: std::fs::File,
    path: PathBuf,
    last: HashMap<(String, String, String), State>,
    failed: HashMap<(String, String, String), u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    None,
    Begun,
    Done,
    Failed(u32),
}

impl Sent {
    fn open(dir: &Path) -> anyhow::Result<Sent> {
        let path = dir.join("sent.tsv");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        let mut last = HashMap::new();
        let mut failed: HashMap<_, u32> = HashMap::new();
        // A line a crash cut short has fewer fields: skipped (its send was not begun).
        for l in text.lines() {
            let f: Vec<&str> = l.split('\t').collect();
            let [date, domain, target, state] = f[..] else {
                continue;
            };
            let key = (date.to_string(), domain.to_string(), target.to_string());
            let s = match state {
                "begun" => State::Begun,
                "done" => State::Done,
                "failed" => {
                    let n = failed.entry(key.clone()).or_default();
                    *n += 1;
                    State::Failed(*n)
                }
                _ => continue,
            };
            last.insert(key, s);
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if !text.is_empty() && !text.ends_with('\n') {
            // The next line must not be glued to the torn one.
            file.write_all(b"\n")
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        Ok(Sent {
            file,
            path,
            last,
            failed,
        })
    }

    fn key(date: &str, domain: &str, target: &str) -> (String, String, String) {
        (date.into(), domain.into(), target.into())
    }

    fn state(&self, date: &str, domain: &str, target: &str) -> State {
        *self
            .last
            .get(&Sent::key(date, domain, target))
            .unwrap_or(&State::None)
    }

    fn failures(&self, date: &str, domain: &str, target: &str) -> u32 {
        *self
            .failed
            .get(&Sent::key(date, domain, target))
            .unwrap_or(&0)
    }

    /// Appends a step and syncs it. Errors name the file.
    fn write(&mut self, date: &str, domain: &str, target: &str, state: &str) -> Result<(), String> {
        let line = format!("{date}\t{domain}\t{target}\t{state}\n");
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let key = Sent::key(date, domain, target);
        let s = match state {
            "begun" => State::Begun,
            "done" => State::Done,
            _ => {
                let n = self.failed.entry(key.clone()).or_default();
                *n += 1;
                State::Failed(*n)
            }
        };
        self.last.insert(key, s);
        Ok(())
    }
}
