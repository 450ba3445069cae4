//! MTA-STS policies for the shards (RFC 8461 §3, §5), found on the resolver thread
//! with each MX lookup: the `_mta-sts` TXT record; a policy whose id is new is
//! fetched over HTTPS (a certificate valid for mta-sts.DOMAIN, no redirects, at most
//! [`POLICY_OCTETS_MAX`], within [`FETCH_TIMEOUT`], served as text/plain), then kept
//! in memory and under the spool (`mta-sts/DOMAIN`) until its `max_age` ends.
//!
//! No downgrade by a failed fetch: while a cached policy is valid it stays in force
//! whatever the record or the fetch says (§5.1), and a new id whose fetch fails
//! keeps the old policy. With no valid cached policy, a record whose policy cannot be
//! had means no policy (§3.3: delivery goes on as before); the reason is kept for
//! `volley tls show` and the log.

use crate::host::files::replace_file;
use crate::policy::mta_sts::{announcing, parse_policy, Policy, POLICY_OCTETS_MAX};
use crate::policy::tls_rpt::ResultType;
use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a policy fetch may take, connection and body included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed fetch, how long the same record id is not fetched again (the
/// failure stands meanwhile): a policy host that hangs costs one fetch per id per
/// period, not one per MX lookup.
pub const FETCH_AGAIN_AFTER: Duration = Duration::from_secs(300);
/// How long a policy in force is used before it is fetched again with an unchanged
/// id (or half its `max_age`, if sooner); a failed refresh keeps it.
pub const REFRESH_AFTER: Duration = Duration::from_secs(86_400);

/// How long "no `_mta-sts` record" is believed when the answer gives no negative
/// TTL; [`ABSENT_TTL_MAX`] caps any TTL given.
pub const ABSENT_TTL_DEFAULT: Duration = Duration::from_secs(300);
/// The longest "no `_mta-sts` record" is believed, whatever the TTL: a domain that
/// publishes a policy is heard within the hour.
pub const ABSENT_TTL_MAX: Duration = Duration::from_secs(3600);

/// The longest a shard keeps a routing decided by an MTA-STS policy (an enforced
/// site, or "no MX matches") before it looks the policy up again, whatever the MX
/// TTL: a domain that fixes its policy is heard within minutes (RFC 8461 §5: check
/// for a new policy before a failure is final).
pub const STS_RECHECK: Duration = Duration::from_secs(300);

/// Where and how policies are fetched and kept.
#[derive(Clone)]
pub struct StsSettings {
    /// Cached policies, one file per domain (`SPOOL/mta-sts`); None: in memory only
    /// (`volley tls show`, which writes nothing).
    pub cache_dir: Option<PathBuf>,
    /// The HTTPS port of `mta-sts.DOMAIN`: 443 (another in tests).
    pub https_port: u16,
    /// Verifies the policy host's certificate (webpki-roots and `--tls-roots`).
    pub tls: Arc<rustls::ClientConfig>,
}

/// A policy in force, with the record id it was fetched for and when.
#[derive(Debug, Clone)]
pub struct Cached {
    pub id: String,
    pub policy: Policy,
    pub fetched_at: SystemTime,
}

impl Cached {
    /// Whether its `max_age` has not run out at `now`.
    pub fn valid_at(&self, now: SystemTime) -> bool {
        now < self.fetched_at + self.policy.max_age
    }

    /// Whether it is due to be fetched again at `now`, its id unchanged: after
    /// [`REFRESH_AFTER`] or half its `max_age`, so a policy in force is renewed long
    /// before it could lapse (RFC 8461 §5.1: a policy that expires while its host is
    /// unreachable would leave the domain unprotected).
    pub fn due_for_refresh(&self, now: SystemTime) -> bool {
        let age = now.duration_since(self.fetched_at).unwrap_or_default();
        age >= REFRESH_AFTER.min(self.policy.max_age / 2)
    }
}

/// The MTA-STS view of a domain at one lookup.
#[derive(Debug, Clone)]
pub enum Sts {
    /// No policy: no `_mta-sts` record and none cached.
    None,
    /// A policy in force; `note` says when it is a cached one kept over a record or
    /// fetch that failed.
    Policy {
        cached: Cached,
        note: Option<String>,
    },
    /// A record announces a policy that could not be had and none is cached: no
    /// policy in force (RFC 8461 §3.3), for this reason.
    Unavailable(NoPolicy),
}

/// Why a domain's policy could not be had, and the TLS-RPT result type that says
/// so (RFC 8460 §4.3.2.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoPolicy {
    /// None: the `_mta-sts` lookup itself failed, so whether the domain has a
    /// policy is not known (nothing is reported).
    pub result: Option<ResultType>,
    pub why: String,
}

impl NoPolicy {
    /// The policy could not be fetched (`sts-policy-fetch-error`).
    pub fn fetch_error(why: impl Into<String>) -> NoPolicy {
        NoPolicy {
            result: Some(ResultType::StsPolicyFetchError),
            why: why.into(),
        }
    }

    /// The record or the policy is not valid (`sts-policy-invalid`).
    pub fn invalid(why: impl Into<String>) -> NoPolicy {
        NoPolicy {
            result: Some(ResultType::StsPolicyInvalid),
            why: why.into(),
        }
    }

    /// The `_mta-sts` lookup failed (SERVFAIL, timeout).
    pub fn lookup_failed(why: impl Into<String>) -> NoPolicy {
        NoPolicy {
            result: None,
            why: why.into(),
        }
    }
}

impl std::fmt::Display for NoPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

impl Sts {
    /// The policy in force, if any.
    pub fn policy(&self) -> Option<&Cached> {
        match self {
            Sts::Policy { cached, .. } => Some(cached),
            _ => None,
        }
    }
}

/// What a TXT lookup of `_mta-sts.DOMAIN` gave.
pub enum Record {
    /// The TXT records there (none: NXDOMAIN or no TXT).
    Texts(Vec<String>),
    /// The lookup failed (SERVFAIL, timeout): nothing is known.
    Failed(String),
}

/// The policies found so far, by domain, in memory and on disk.
pub struct Policies {
    settings: StsSettings,
    memory: Mutex<HashMap<String, Cached>>,
    /// One lookup at a time per domain, so shards asking together fetch a new
    /// policy once (one entry per domain seen, as the shards' DNS caches hold).
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The last failed fetch per domain: its record id, when, and why.
    failed: Mutex<HashMap<String, (String, SystemTime, NoPolicy)>>,
    /// Domains with no `_mta-sts` record and no policy held, until when that is
    /// believed: every shard's MX lookup of such a domain costs one TXT query, not
    /// one each.
    absent: Mutex<HashMap<String, Instant>>,
}

impl Policies {
    pub fn new(settings: StsSettings) -> Policies {
        Policies {
            settings,
            memory: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            absent: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `domain` is known to have no record and no policy at `now`.
    pub fn known_absent(&self, domain: &str, now: Instant) -> bool {
        let mut absent = self.absent.lock().expect("policies lock");
        match absent.get(domain) {
            Some(until) if *until > now => true,
            Some(_) => {
                absent.remove(domain);
                false
            }
            None => false,
        }
    }

    /// `domain` has no record and no policy, believed until `until` (at most
    /// [`ABSENT_TTL_MAX`] from now).
    pub fn note_absent(&self, domain: &str, until: Instant) {
        let until = until.min(Instant::now() + ABSENT_TTL_MAX);
        self.absent
            .lock()
            .expect("policies lock")
            .insert(domain.to_string(), until);
    }

    /// The gate a lookup of `domain` holds while it decides and fetches.
    pub fn gate(&self, domain: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.gates
            .lock()
            .expect("policies lock")
            .entry(domain.to_string())
            .or_default()
            .clone()
    }

    /// The settings the policies are fetched with.
    pub fn settings(&self) -> &StsSettings {
        &self.settings
    }

    /// The cached policy of `domain` still valid at `now`: from memory, or from the
    /// spool after a restart.
    pub fn cached(&self, domain: &str, now: SystemTime) -> Option<Cached> {
        let mut memory = self.memory.lock().expect("policies lock");
        if let Some(c) = memory.get(domain).filter(|c| c.valid_at(now)) {
            return Some(c.clone());
        }
        let c = read_cached(self.settings.cache_dir.as_deref()?, domain)?;
        if !c.valid_at(now) {
            return None;
        }
        memory.insert(domain.to_string(), c.clone());
        Some(c)
    }

    /// Keeps `c` for `domain`, on disk too (a failed write costs a refetch after a
    /// restart, nothing more).
    pub fn keep(&self, domain: &str, c: Cached, body: &[u8]) {
        if let Some(dir) = &self.settings.cache_dir {
            write_cached(dir, domain, &c, body);
        }
        self.memory
            .lock()
            .expect("policies lock")
            .insert(domain.to_string(), c);
    }

    /// The policy in force for `domain` given its `_mta-sts` `record` at `now`, or
    /// the id whose policy must be fetched first (then [`Policies::fetched`]).
    pub fn begin(&self, domain: &str, record: Record, now: SystemTime) -> Step {
        let cached = self.cached(domain, now);
        let kept = |cached: Cached, why: NoPolicy| Sts::Policy {
            cached,
            note: Some(format!("{why}; the cached policy stays in force")),
        };
        let found = match record {
            Record::Failed(why) => Err(NoPolicy::lookup_failed(format!(
                "the _mta-sts lookup failed ({why})"
            ))),
            Record::Texts(texts) => {
                announcing(&texts).map_err(|e| NoPolicy::invalid(e.to_string()))
            }
        };
        Step::Done(match (found, cached) {
            (Ok(Some(id)), Some(c)) if c.id == id && !c.due_for_refresh(now) => Sts::Policy {
                cached: c,
                note: None,
            },
            (Ok(Some(id)), cached) => match self.recent_failure(domain, &id, now) {
                None => return Step::Fetch(id),
                Some(why) => match cached {
                    Some(c) => kept(c, why),
                    None => Sts::Unavailable(why),
                },
            },
            (Ok(None), Some(c)) => kept(c, NoPolicy::fetch_error("no _mta-sts record now")),
            (Ok(None), None) => Sts::None,
            (Err(why), Some(c)) => kept(c, why),
            (Err(why), None) => Sts::Unavailable(why),
        })
    }

    /// The policy in force for `domain` once the policy of record id `id` was
    /// fetched (`body`, or why not) at `now`: the new one when it parses, else the
    /// cached one while it is valid, else none.
    pub fn fetched(
        &self,
        domain: &str,
        id: String,
        body: Result<Vec<u8>, NoPolicy>,
        now: SystemTime,
    ) -> Sts {
        let parsed = body.and_then(|body| {
            parse_policy(&body)
                .map(|policy| (policy, body))
                .map_err(|e| NoPolicy::invalid(e.to_string()))
        });
        match parsed {
            Ok((policy, body)) => {
                self.failed.lock().expect("policies lock").remove(domain);
                let c = Cached {
                    id,
                    policy,
                    fetched_at: now,
                };
                self.keep(domain, c.clone(), &body);
                Sts::Policy {
                    cached: c,
                    note: None,
                }
            }
            Err(NoPolicy { result, why }) => {
                let why = NoPolicy {
                    result,
                    why: format!("the policy for id {id} could not be had: {why}"),
                };
                self.failed
                    .lock()
                    .expect("policies lock")
                    .insert(domain.to_string(), (id, now, why.clone()));
                match self.cached(domain, now) {
                    Some(c) => Sts::Policy {
                        cached: c,
                        note: Some(format!("{why}; the cached policy stays in force")),
                    },
                    None => Sts::Unavailable(why),
                }
            }
        }
    }
}

impl Policies {
    /// Why the fetch of `domain`'s policy `id` failed, if it did less than
    /// [`FETCH_AGAIN_AFTER`] before `now`.
    fn recent_failure(&self, domain: &str, id: &str, now: SystemTime) -> Option<NoPolicy> {
        let failed = self.failed.lock().expect("policies lock");
        let (fid, at, why) = failed.get(domain)?;
        let recent = now.duration_since(*at).unwrap_or_default() < FETCH_AGAIN_AFTER;
        (fid == id && recent).then(|| NoPolicy {
            result: why.result,
            why: format!(
                "{why} (at {}; not fetched again for {} s)",
                humantime::format_rfc3339_seconds(*at),
                FETCH_AGAIN_AFTER.as_secs()
            ),
        })
    }
}

/// What `Policies::begin` found.
pub enum Step {
    Done(Sts),
    /// The record's id is not the cached policy's: fetch this id's policy.
    Fetch(String),
}

/// Fetches `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` from `addrs` (the policy
/// host's addresses, resolved by the caller's DNS). Blocking. Errors, as a phrase: a
/// transport or certificate failure, a status other than 200 (a redirect is not
/// followed, RFC 8461 §3.3), another media type than text/plain, a body over
/// [`POLICY_OCTETS_MAX`].
pub fn fetch(domain: &str, addrs: &[IpAddr], settings: &StsSettings) -> Result<Vec<u8>, NoPolicy> {
    fetch_policy(domain, addrs, settings).map_err(|(result, why)| NoPolicy {
        result: Some(result),
        why,
    })
}

fn fetch_policy(
    domain: &str,
    addrs: &[IpAddr],
    settings: &StsSettings,
) -> Result<Vec<u8>, (ResultType, String)> {
    let failed = |why: String| (ResultType::StsPolicyFetchError, why);
    let host = format!("mta-sts.{domain}");
    if addrs.is_empty() {
        return Err(failed(format!("{host} has no address")));
    }
    let port = settings.https_port;
    let to: Vec<SocketAddr> = addrs.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
    let agent = pinned_agent(settings.tls.clone(), FETCH_TIMEOUT, to);
    let url = match port {
        443 => format!("https://{host}/.well-known/mta-sts.txt"),
        p => format!("https://{host}:{p}/.well-known/mta-sts.txt"),
    };
    let response = match agent.get(&url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            return Err(failed(format!("{url} answered {code} {}", r.status_text())))
        }
        Err(ureq::Error::Transport(t)) => {
            // A certificate the policy host cannot prove is its own (RFC 8460 §4.3.2.1).
            let result = match certificate_refused(&t) {
                true => ResultType::StsWebpkiInvalid,
                false => ResultType::StsPolicyFetchError,
            };
            return Err((result, format!("{url}: {}", transport_failed(&t))));
        }
    };
    match response.status() {
        200 => {}
        code @ 300..=399 => {
            return Err(failed(format!(
                "{url} answered {code}, a redirect, which is not followed (RFC 8461 §3.3)"
            )))
        }
        code => {
            return Err(failed(format!(
                "{url} answered {code} {}",
                response.status_text()
            )))
        }
    }
    // The media type without parameters, case aside; a missing header is no
    // text/plain (ureq's content_type() would say it is).
    let media = response.header("content-type").map(|v| {
        v.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    });
    if media.as_deref() != Some("text/plain") {
        return Err(failed(format!(
            "{url} is served as {}, not text/plain (RFC 8461 §3.2)",
            media.as_deref().unwrap_or("no Content-Type")
        )));
    }
    let mut body = Vec::new();
    response
        .into_reader()
        .take(POLICY_OCTETS_MAX as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| failed(format!("{url}: reading the policy: {e}")))?;
    if body.len() > POLICY_OCTETS_MAX {
        return Err((
            ResultType::StsPolicyInvalid,
            format!("{url} is over {POLICY_OCTETS_MAX} octets"),
        ));
    }
    Ok(body)
}

/// A blocking HTTPS client that connects only to `addrs` (resolved by volley's own
/// DNS, not the system's), verifies with `tls`, follows no redirect and gives up
/// after `timeout`, connection and body included.
pub fn pinned_agent(
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    addrs: Vec<SocketAddr>,
) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .tls_config(tls)
        .redirects(0)
        .timeout(timeout)
        .resolver(move |_: &str| Ok(addrs.clone()))
        .build()
}

/// Whether a transport failure is rustls refusing the server's certificate.
fn certificate_refused(t: &ureq::Transport) -> bool {
    let mut cause = std::error::Error::source(t);
    while let Some(c) = cause {
        if let Some(rustls::Error::InvalidCertificate(_)) = c.downcast_ref::<rustls::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Why an HTTP request got no answer, in words: the kind, ureq's message and the
/// cause (a certificate's fault, say), without the URL, which the caller's sentence
/// names already.
pub fn transport_failed(t: &ureq::Transport) -> String {
    let mut why = t.kind().to_string();
    if let Some(m) = t.message() {
        why = format!("{why}: {m}");
    }
    if let Some(s) = std::error::Error::source(t) {
        why = format!("{why} ({s})");
    }
    why
}

/// The file a domain's policy is kept in; None for a name that could not be a file
/// name safely (it is then kept in memory only).
fn cache_file(dir: &std::path::Path, domain: &str) -> Option<PathBuf> {
    let ok = !domain.is_empty()
        && !domain.starts_with('.')
        && !domain.contains("..")
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    ok.then(|| dir.join(domain))
}

/// The file: `id ID`, `fetched UNIX_SECONDS`, then the policy as it was served.
fn write_cached(dir: &std::path::Path, domain: &str, c: &Cached, body: &[u8]) {
    let Some(path) = cache_file(dir, domain) else {
        return;
    };
    let secs = c
        .fetched_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut text = format!("id {}\nfetched {secs}\n", c.id).into_bytes();
    text.extend_from_slice(body);
    if let Err(e) = std::fs::create_dir_all(dir).and_then(|_| replace_file(&path, &text)) {
        eprintln!(
            "volley: MTA-STS: cannot keep the policy of {domain} in {}: {e}",
            path.display()
        );
    }
}

/// The policy kept for `domain` in `dir` (a spool's `mta-sts`), parsed again as if
/// it had just been fetched, valid or not; None when there is none or it does not
/// read back.
pub fn read_cached(dir: &std::path::Path, domain: &str) -> Option<Cached> {
    let text = std::fs::read(cache_file(dir, domain)?).ok()?;
    let mut parts = text.splitn(3, |&b| b == b'\n');
    let id = std::str::from_utf8(parts.next()?)
        .ok()?
        .strip_prefix("id ")?;
    let secs: u64 = std::str::from_utf8(parts.next()?)
        .ok()?
        .strip_prefix("fetched ")?
        .parse()
        .ok()?;
    let policy = parse_policy(parts.next()?).ok()?;
    Some(Cached {
        id: id.to_string(),
        policy,
        fetched_at: UNIX_EPOCH + Duration::from_secs(secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies(dir: &std::path::Path) -> Policies {
        Policies::new(StsSettings {
            cache_dir: Some(dir.to_path_buf()),
            https_port: 443,
            tls: crate::deliver::tls::client_config(true, &[]),
        })
    }

    const ENFORCE: &[u8] = b"version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 3600\n";
    const TESTING: &[u8] = b"version: STSv1\nmode: testing\nmx: mx.example.test\nmax_age: 3600\n";

    fn record(id: &str) -> Record {
        Record::Texts(vec![format!("v=STSv1; id={id}")])
    }

    /// As the resolver thread does: begin, and fetch when told to.
    fn decide(
        p: &Policies,
        d: &str,
        r: Record,
        now: SystemTime,
        fetch: impl FnOnce() -> Result<Vec<u8>, String>,
    ) -> Sts {
        match p.begin(d, r, now) {
            Step::Done(s) => s,
            Step::Fetch(id) => p.fetched(d, id, fetch().map_err(NoPolicy::fetch_error), now),
        }
    }

    #[test]
    fn a_cached_policy_outlives_failures_and_a_new_id_replaces_it() {
        let dir = std::env::temp_dir().join(format!("volley-sts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = policies(&dir);
        let t0 = SystemTime::now();
        let d = "example.test";
        // No record, nothing cached: no policy.
        assert!(matches!(
            decide(&p, d, Record::Texts(vec![]), t0, || unreachable!()),
            Sts::None
        ));
        // A record whose fetch fails, nothing cached: no policy, and why.
        let s = decide(&p, d, record("a0"), t0, || Err("refused".into()));
        assert!(
            matches!(&s, Sts::Unavailable(why) if why.why.contains("refused")),
            "{s:?}"
        );
        // Fetched and kept.
        let s = decide(&p, d, record("a1"), t0, || Ok(ENFORCE.to_vec()));
        assert_eq!(s.policy().unwrap().id, "a1");
        // The same id: the cache, no fetch.
        let s = decide(&p, d, record("a1"), t0, || unreachable!());
        assert!(matches!(&s, Sts::Policy { note: None, .. }));
        // Every failure keeps the cached policy in force, saying why.
        for (r, fetch) in [
            (Record::Failed("SERVFAIL".into()), None),
            (Record::Texts(vec![]), None),
            (
                Record::Texts(vec!["v=STSv1; id=a1".into(), "v=STSv1; id=a2".into()]),
                None,
            ),
            (record("a2"), Some("timed out")),
            (record("a3"), Some("")),
        ] {
            let s = decide(&p, d, r, t0, || match fetch {
                Some("") => Ok(b"not a policy".to_vec()),
                Some(why) => Err(why.to_string()),
                None => unreachable!("no fetch"),
            });
            match s {
                Sts::Policy {
                    cached,
                    note: Some(why),
                } => {
                    assert_eq!(cached.id, "a1");
                    assert!(why.contains("stays in force"), "{why}");
                }
                other => panic!("{other:?}"),
            }
        }
        // A new id that fetches replaces it; after a restart it is read back from disk.
        let s = decide(&p, d, record("b2"), t0, || Ok(TESTING.to_vec()));
        assert_eq!(s.policy().unwrap().id, "b2");
        let again = policies(&dir);
        let c = again.cached(d, t0).expect("kept on disk");
        assert_eq!(
            (c.id.as_str(), c.policy.mode),
            ("b2", crate::policy::mta_sts::Mode::Testing)
        );
        // Past its max_age it is gone: a failed fetch then means no policy.
        let later = t0 + Duration::from_secs(3601);
        assert!(again.cached(d, later).is_none());
        let s = decide(&again, d, record("b2"), later, || Err("refused".into()));
        assert!(matches!(s, Sts::Unavailable(_)), "{s:?}");
        // A failed id is not fetched again for FETCH_AGAIN_AFTER; then it is.
        let s = decide(&again, d, record("c3"), later, || Err("hangs".into()));
        assert!(matches!(s, Sts::Unavailable(_)));
        let s = decide(&again, d, record("c3"), later, || {
            unreachable!("fetched again")
        });
        assert!(
            matches!(&s, Sts::Unavailable(why) if why.why.contains("not fetched again")),
            "{s:?}"
        );
        let s = decide(&again, d, record("c3"), later + FETCH_AGAIN_AFTER, || {
            Ok(ENFORCE.to_vec())
        });
        assert_eq!(s.policy().unwrap().id, "c3");
        // Half its max_age on, a policy in force is fetched again, the id unchanged; a
        // failed refresh keeps it, a good one renews it.
        let renewed = decide(
            &again,
            d,
            record("c3"),
            later + FETCH_AGAIN_AFTER,
            || unreachable!(),
        );
        assert!(
            matches!(&renewed, Sts::Policy { note: None, .. }),
            "{renewed:?}"
        );
        let half = later + FETCH_AGAIN_AFTER + Duration::from_secs(1800);
        let s = decide(&again, d, record("c3"), half, || Err("down".into()));
        assert!(
            matches!(&s, Sts::Policy { note: Some(why), .. } if why.contains("down")),
            "{s:?}"
        );
        let s = decide(&again, d, record("c3"), half + FETCH_AGAIN_AFTER, || {
            Ok(TESTING.to_vec())
        });
        assert_eq!(s.policy().unwrap().fetched_at, half + FETCH_AGAIN_AFTER);
        // A name that is no safe file name is kept in memory only.
        assert!(cache_file(&dir, "../etc").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
