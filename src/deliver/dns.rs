//! MX resolution on its own thread: hickory-resolver needs tokio, the shards run
//! monoio. Shards send a domain over a channel and await a oneshot answer; each
//! shard caches answers until their TTL runs out. With MTA-STS on, each answer also
//! carries the domain's policy (mta_sts.rs: its TXT record looked up alongside the
//! MX, its policy fetched on a blocking thread of this runtime when new). With DANE
//! on, each MX host's addresses and TLSA records are looked up again with a
//! validating resolver (dane.rs says what the answers mean).

use crate::deliver::dane::{Dane, DaneHost, Tlsa};
use crate::deliver::explain::{self, DnsProblem};
use crate::deliver::mta_sts::{self, NoPolicy, Policies, Record, Step, Sts, StsSettings};
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::dnssec::TrustAnchors;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{self as dns_rr, RData, RecordType};
use hickory_resolver::TokioResolver;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

mod stub;
use stub::Stub;

/// Lookups in progress at once on the resolver thread.
const LOOKUPS_IN_FLIGHT_MAX: usize = 256;
/// How long a temporary failure is cached, so a dead DNS is not hammered.
pub const TEMPFAIL_CACHE: Duration = Duration::from_secs(30);
/// The shortest an answer is held, whatever its TTL (0 included).
pub const ANSWER_HELD_MIN: Duration = Duration::from_secs(5);
/// The longest a DANE answer is held when its records give no shorter TTL.
const ANSWER_HELD_MAX: Duration = Duration::from_secs(86_400);

#[derive(Debug, Clone)]
pub struct MxHost {
    pub name: String,
    pub preference: u16,
    pub addrs: Vec<IpAddr>,
    /// What DANE asks of this host (`Dane::None` with DANE off).
    pub dane: Dane,
}

#[derive(Debug, Clone)]
pub enum Route {
    /// Hosts in the order to try them (preference order, equal ones shuffled).
    Hosts(Vec<MxHost>),
    /// RFC 7505: the domain accepts no mail.
    NullMx,
    /// NXDOMAIN, or neither MX nor address records.
    NoSuchDomain(String),
    /// SERVFAIL, timeout, MX hosts without addresses: try again later.
    TempFail(String),
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub route: Route,
    pub valid_until: Instant,
    /// The domain's MTA-STS policy (`Sts::None` when MTA-STS is off).
    pub sts: Sts,
    /// The MX records were DNSSEC-secure (DANE on): a host under DANE may then
    /// override the MTA-STS policy's `mx` patterns (RFC 8461 §2), which a forged
    /// MX record must not.
    pub mx_secure: bool,
}

struct Request {
    domain: String,
    reply: oneshot::Sender<Answer>,
}

/// A handle to the resolver thread; cheap to clone, one per shard.
#[derive(Clone)]
pub struct Resolver {
    tx: mpsc::UnboundedSender<Request>,
}

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Nameserver to ask (the bundled test DNS in tests and demo); None = /etc/resolv.conf.
    pub server: Option<SocketAddr>,
    pub timeout: Duration,
    pub attempts: usize,
    /// DANE (RFC 7672): None is off.
    pub dane: Option<DaneSettings>,
}

/// DANE's DNSSEC settings.
#[derive(Debug, Clone, Default)]
pub struct DaneSettings {
    /// A file of DNSKEY records in zone-file form to trust instead of the IANA root
    /// zone's keys (a private signed zone, the tests' DNS). None: the root's.
    pub trust_anchor: Option<std::path::PathBuf>,
}

impl DaneSettings {
    /// The trust anchors to validate with: the root zone's keys. Errors: the file
    /// is unreadable, or holds no DNSKEY record of the root zone hickory can read.
    pub fn anchors(&self) -> anyhow::Result<Arc<TrustAnchors>> {
        let Some(path) = &self.trust_anchor else {
            return Ok(Arc::new(TrustAnchors::default()));
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "DNSSEC trust anchor {}: cannot read it: {e}",
                path.display()
            )
        })?;
        let anchors: TrustAnchors = text.parse().map_err(|e| {
            anyhow::anyhow!(
                "DNSSEC trust anchor {}: not DNSKEY records ({e}); give the root's DNSKEY records as a zone file writes them (\". 3600 IN DNSKEY 257 3 15 BASE64\")",
                path.display()
            )
        })?;
        anyhow::ensure!(
            !anchors.is_empty(),
            "DNSSEC trust anchor {}: no DNSKEY record of the root zone (\".\") in it; validation starts at the root, so give the root's DNSKEY records (a private tree must be signed as the root)",
            path.display()
        );
        Ok(Arc::new(anchors))
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            server: None,
            timeout: Duration::from_secs(5),
            attempts: 2,
            dane: None,
        }
    }
}

/// With DANE on, whether it can work: the trust anchor file reads and the
/// nameserver's answers validate (what [`Resolver::start`] checks, for a command
/// to say before it queues anything). Errors: as `start`'s.
pub fn check_dane(cfg: &DnsConfig) -> anyhow::Result<()> {
    let Some(d) = &cfg.dane else {
        return Ok(());
    };
    let (config, opts) = settings(cfg)?;
    probe(&config, &opts, &d.anchors()?, d)
}

impl Resolver {
    /// Starts the resolver thread asking `cfg`'s nameserver; with `sts`, MTA-STS
    /// policies are looked up and fetched with each MX lookup. Errors: no
    /// nameserver given and /etc/resolv.conf unreadable, the thread not started.
    pub fn start(cfg: &DnsConfig, sts: Option<StsSettings>) -> anyhow::Result<Resolver> {
        let (config, opts) = settings(cfg)?;
        let anchors = cfg.dane.as_ref().map(DaneSettings::anchors).transpose()?;
        if let (Some(a), Some(d)) = (&anchors, &cfg.dane) {
            probe(&config, &opts, a, d)?;
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        std::thread::Builder::new()
            .name("volley-dns".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let hosts = hickory_resolver::Hosts::from_system().unwrap_or_default();
                    let resolver = Arc::new(Stub::new(&config, &opts, hosts));
                    let validator =
                        match anchors.map(|a| Validator::new(config, opts, a)).transpose() {
                            Ok(v) => v.map(Arc::new),
                            Err(e) => {
                                // Every request is answered with the reason (lookup's `failed`).
                                eprintln!("volley: the resolver could not start: {e}");
                                return;
                            }
                        };
                    let policies = sts.map(|s| Arc::new(Policies::new(s)));
                    let permits = Arc::new(tokio::sync::Semaphore::new(LOOKUPS_IN_FLIGHT_MAX));
                    while let Some(req) = rx.recv().await {
                        let r = resolver.clone();
                        let v = validator.clone();
                        let policies = policies.clone();
                        let permit = permits.clone().acquire_owned().await.expect("never closed");
                        tokio::spawn(async move {
                            let (mut answer, sts) = match &policies {
                                Some(p) => {
                                    tokio::join!(
                                        resolve(&r, v.as_deref(), &req.domain),
                                        sts_of(&r, p, &req.domain)
                                    )
                                }
                                None => (resolve(&r, v.as_deref(), &req.domain).await, Sts::None),
                            };
                            answer.sts = sts;
                            let _ = req.reply.send(answer);
                            drop(permit);
                        });
                    }
                });
            })?;
        Ok(Resolver { tx })
    }

    pub async fn lookup(&self, domain: &str) -> Answer {
        let (reply, rx) = oneshot::channel();
        let failed = |why: &str| Answer {
            route: Route::TempFail(
                explain::dns(domain, &DnsProblem::ResolverDown(why.into())).to_string(),
            ),
            valid_until: Instant::now() + TEMPFAIL_CACHE,
            sts: Sts::None,
            mx_secure: false,
        };
        if self
            .tx
            .send(Request {
                domain: domain.to_string(),
                reply,
            })
            .is_err()
        {
            return failed("resolver thread is gone");
        }
        let mut answer = rx
            .await
            .unwrap_or_else(|_| failed("resolver dropped the request"));
        // A TTL of 0 (or one run out on the way) must still route the jobs that
        // waited for this answer: taken as out of date, it sent them to look up
        // again, and again, without end.
        answer.valid_until = answer.valid_until.max(Instant::now() + ANSWER_HELD_MIN);
        answer
    }
}

/// The nameserver and options of `cfg`: its server, or /etc/resolv.conf's; names
/// are absolute, and hickory's own cache is off (the stub keeps answers, and the
/// validating resolver sets its own). Errors: no server given and
/// /etc/resolv.conf unreadable.
fn settings(cfg: &DnsConfig) -> anyhow::Result<(ResolverConfig, ResolverOpts)> {
    let (config, mut opts) = match cfg.server {
        Some(addr) => {
            let mut server = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut server.connections {
                c.port = addr.port();
            }
            (
                ResolverConfig::from_parts(None, vec![], vec![server]),
                ResolverOpts::default(),
            )
        }
        None => hickory_resolver::system_conf::read_system_conf().map_err(|e| {
            anyhow::anyhow!("cannot read /etc/resolv.conf: {e}; give --dns ADDR:PORT")
        })?,
    };
    opts.timeout = cfg.timeout;
    opts.attempts = cfg.attempts;
    // Names are absolute: never append search domains to a recipient's domain.
    opts.ndots = 0;
    opts.cache_size = 0;
    Ok((config, opts))
}

fn build(config: ResolverConfig, opts: ResolverOpts) -> Result<TokioResolver, NetError> {
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
}

/// Answers the validating resolver keeps (its own cache, by TTL).
const VALIDATING_CACHE_ENTRIES: u64 = 4096;
/// MX hosts whose DANE answers are kept; when full, the next new one clears them
/// (each is asked again on its next lookup).
const DANE_HOSTS_MAX: usize = 10_000;

/// One MX host's DANE answer as last had: whether its addresses were secure, the
/// answer, until when it holds.
type Held = Option<(bool, Dane, Instant)>;

/// DANE's lookups: a resolver that validates every answer from the trust anchors
/// down (RFC 4035 §5), and each MX host's last DANE answer. Domains on one host
/// (thousands, at a hosting provider) ask once per TTL, one at a time, instead of
/// each at once; and a host's TLS settings are reused while its records are
/// unchanged, so every domain on it shares one session cache (settings made anew
/// per lookup would make each connection a full handshake).
struct Validator {
    resolver: TokioResolver,
    hosts: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<Held>>>>,
}

impl Validator {
    /// The resolver caches, unlike the other: a validation asks for each zone's
    /// DNSKEY and DS records, which would otherwise be asked again for every host.
    fn new(
        config: ResolverConfig,
        mut opts: ResolverOpts,
        anchors: Arc<TrustAnchors>,
    ) -> Result<Validator, NetError> {
        opts.cache_size = VALIDATING_CACHE_ENTRIES;
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .with_trust_anchor(anchors)
            .build()?;
        Ok(Validator {
            resolver,
            hosts: Default::default(),
        })
    }

    /// What DANE asks of MX host `host` whose addresses were (or were not) all
    /// DNSSEC-secure ([`tlsa_of`]), and until when the answer holds: the last
    /// answer while it holds, else looked up (once for all who ask meanwhile).
    async fn dane_of(&self, host: &str, addresses_secure: bool) -> (Dane, Instant) {
        let slot = {
            let mut hosts = self.hosts.lock().expect("not poisoned");
            if hosts.len() >= DANE_HOSTS_MAX && !hosts.contains_key(host) {
                hosts.clear();
            }
            hosts.entry(host.to_string()).or_default().clone()
        };
        let mut held = slot.lock().await;
        let kept = match held.take() {
            Some((secure, dane, until)) if secure == addresses_secure && until > Instant::now() => {
                *held = Some((secure, dane.clone(), until));
                return (dane, until);
            }
            Some((_, Dane::Tlsa(kept), _)) => Some(kept),
            _ => None,
        };
        let (dane, until) = match tlsa_of(&self.resolver, host, addresses_secure).await {
            (Ok(Some(records)), until) => {
                let settings = match kept.filter(|k| k.records == records) {
                    Some(kept) => kept,
                    None => Arc::new(DaneHost::new(host, records)),
                };
                (Dane::Tlsa(settings), until)
            }
            (Ok(None), until) => (Dane::None, until),
            (Err(why), _) => (Dane::Failed(why), Instant::now() + TEMPFAIL_CACHE),
        };
        *held = Some((addresses_secure, dane.clone(), until));
        (dane, until)
    }
}

/// Checks that validation works through this nameserver: the root zone's DNSKEY
/// RRset must come back signed by a trust anchor. A nameserver that strips DNSSEC
/// records would make every MX lookup bogus and defer all mail. Errors: what came
/// back instead, and what to do.
fn probe(
    config: &ResolverConfig,
    opts: &ResolverOpts,
    anchors: &Arc<TrustAnchors>,
    dane: &DaneSettings,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let v = rt.block_on(async { Validator::new(config.clone(), opts.clone(), anchors.clone()) })?;
    let answer = rt.block_on(v.resolver.lookup(".", RecordType::DNSKEY));
    let why = match answer {
        Ok(l) if Answering::of(l.answers(), ".", &[RecordType::DNSKEY]).secure() => return Ok(()),
        Ok(_) => "the root zone's DNSKEY records came back unsigned".to_string(),
        Err(NetError::Dns(DnsError::DnssecBogus)) => {
            "the root zone's DNSKEY records did not validate against the trust anchor (bogus)"
                .to_string()
        }
        Err(e) => explain::dns(".", &lookup_failed(&e)).to_string(),
    };
    let anchor = match &dane.trust_anchor {
        Some(p) => format!("the trust anchor in {}", p.display()),
        None => "the IANA root keys built in".to_string(),
    };
    let server = config
        .name_servers()
        .first()
        .map_or("the nameserver".to_string(), |s| {
            format!("nameserver {}", s.ip)
        });
    anyhow::bail!(
        "DANE needs DNSSEC, and {why} (asked {server}, validated with {anchor}): use a nameserver that returns DNSSEC records (the DO bit), give the root keys its answers are signed with (--dnssec-trust-anchor, serve's dnssec_trust_anchor), or run without DANE (no --dane; serve: dane = false)"
    )
}

/// MX host `host`'s TLSA records, from validated lookups, and until when the
/// answer holds (its records' TTLs). They count only when the host's addresses are
/// secure (RFC 7672 §2.2.2) and the records are too; Ok(None): no DANE (insecure
/// addresses or records, or none, proven by a signed NSEC or NSEC3). Err: a lookup
/// failed validation or did not complete, or its denial was not signed, as a
/// sentence: the host is not tried, never tried without DANE (§2.2: no downgrade).
async fn tlsa_of(
    v: &TokioResolver,
    host: &str,
    addresses_secure: bool,
) -> (Result<Option<Vec<Tlsa>>, String>, Instant) {
    let failed = |what: &str, e: &NetError| {
        let why = match e {
            // An unproven denial among them (Asker::lookup).
            NetError::Dns(DnsError::DnssecBogus) => "failed DNSSEC validation (bogus)".to_string(),
            e => explain::dns(host, &lookup_failed(e)).to_string(),
        };
        format!(
            "DANE: the {what} of {host} could not be had securely: {why}; the host is not tried until it can (RFC 7672 §2.2)"
        )
    };
    // Bounded by the MX and address answers' TTLs where the caller takes the least.
    let until = Instant::now() + ANSWER_HELD_MAX;
    if !addresses_secure {
        return (Ok(None), until);
    }
    let fqdn = format!("{}.", host.trim_end_matches('.'));
    let name = format!("_25._tcp.{fqdn}");
    let lookup = Asker::Validating(v).lookup(&name, RecordType::TLSA).await;
    let answering = lookup
        .as_ref()
        .map(|l| Answering::of(l.answers(), &name, &[RecordType::TLSA]));
    match answering {
        Ok(a) if a.secure() => {
            let records: Vec<Tlsa> = a
                .records
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TLSA(t) => Some(Tlsa {
                        usage: t.cert_usage.into(),
                        selector: t.selector.into(),
                        matching: t.matching.into(),
                        data: t.cert_data.clone(),
                    }),
                    _ => None,
                })
                .collect();
            let held = lookup.map_or(until, |l| until.min(l.valid_until()));
            (Ok(Some(records)), held)
        }
        // Records in a zone DNSSEC proves unsigned (a zone cut below the host).
        Ok(a) if !a.records.is_empty() => {
            let held = lookup.map_or(until, |l| until.min(l.valid_until()));
            (Ok(None), held)
        }
        // Only records of other names: not an answer to the question.
        Ok(_) => {
            let why = format!(
                "DANE: the TLSA answer for {host} holds no record of {name}, only others'; the host is not tried until it can be had (RFC 7672 §2.2)"
            );
            (Err(why), until)
        }
        // Proven (Asker::lookup made an unproven one bogus): no TLSA records.
        Err(e) if no_records(e).is_some() => (Ok(None), until),
        Err(e) => (Err(failed("TLSA records", e)), until),
    }
}

/// A host's addresses, until when they hold, and whether every record was
/// DNSSEC-secure (only a validating resolver says so).
struct Addresses {
    ips: Vec<IpAddr>,
    until: Instant,
    secure: bool,
}

/// Who asks the nameserver: the stub resolver, or under DANE hickory's
/// validating resolver.
#[derive(Clone, Copy)]
enum Asker<'a> {
    Stub(&'a Stub),
    Validating(&'a TokioResolver),
}

impl Asker<'_> {
    /// `fqdn`'s records of `rtype`. Errors: the lookup's, as [`Stub::lookup`];
    /// under DANE a denial nothing proves is a bogus answer
    /// ([`unproven_as_bogus`]), for every lookup DANE makes.
    async fn lookup(self, fqdn: &str, rtype: RecordType) -> Result<Lookup, NetError> {
        match self {
            Asker::Stub(s) => s.lookup(fqdn, rtype).await,
            Asker::Validating(r) => r.lookup(fqdn, rtype).await.map_err(unproven_as_bogus),
        }
    }

    /// Whether this is DANE's validating resolver (answers may be secure).
    fn validating(self) -> bool {
        matches!(self, Asker::Validating(_))
    }
}

/// The addresses of `host`, A and AAAA asked at once. Under DANE (a validating
/// `asker`) a failure of either is the host's, so a bogus A is not hidden behind
/// an AAAA denial, and a denial is believed only with its proof
/// ([`proven_denial`]); without DANE, one that fails is passed over when the
/// other has addresses. Errors: when there is no address at all, a failed lookup
/// before a "no records" one.
async fn addresses(asker: Asker<'_>, host: &str) -> Result<Addresses, NetError> {
    let fqdn = format!("{}.", host.trim_end_matches('.'));
    let dane = asker.validating();
    let (a, aaaa) = tokio::join!(
        asker.lookup(&fqdn, RecordType::A),
        asker.lookup(&fqdn, RecordType::AAAA)
    );
    let mut found = Addresses {
        ips: Vec::new(),
        until: Instant::now() + ANSWER_HELD_MAX,
        secure: dane,
    };
    let (mut failed, mut denial) = (None, None);
    for answer in [a, aaaa] {
        let l = match answer {
            Ok(l) => l,
            Err(e) if no_records(&e).is_some() => {
                denial.get_or_insert(e);
                continue;
            }
            Err(e) if dane => return Err(e),
            Err(e) => {
                failed.get_or_insert(e);
                continue;
            }
        };
        found.until = found.until.min(l.valid_until());
        let answering = Answering::of(l.answers(), &fqdn, &[RecordType::A, RecordType::AAAA]);
        found.secure &= answering.secure();
        found.ips.extend(answering.ips());
    }
    match (found.ips.is_empty(), failed.or(denial)) {
        (true, Some(e)) => Err(e),
        _ => Ok(found),
    }
}

/// Whether the validating resolver's "no such records" answer may be believed: it
/// carries a DNSSEC-secure NSEC or NSEC3 (RFC 4035 §5.4), or it is from a zone
/// proved unsigned that holds the name asked: an SOA whose owner encloses the name
/// (RFC 2308 §3), and no authority record of a zone that does not. hickory passes
/// an unsigned denial whose every authority record is insecure, whatever zone they
/// are of (a forger's, with the SOA of some unsigned zone), and one whose answer
/// section holds only records of other names arrives with no authority records.
fn proven_denial(n: &NoRecords) -> bool {
    let name = n.query.name();
    let authorities = n.authorities.iter().flat_map(|a| a.iter());
    let signed = authorities.clone().any(|r| {
        matches!(r.record_type(), RecordType::NSEC | RecordType::NSEC3) && r.proof.is_secure()
    });
    let enclosing_soa = n.soa.as_ref().is_some_and(|soa| soa.name.zone_of(name))
        || authorities
            .clone()
            .any(|r| r.record_type() == RecordType::SOA && r.name.zone_of(name));
    matches!(
        n.response_code,
        ResponseCode::NXDomain | ResponseCode::NoError
    ) && (signed || (enclosing_soa && authorities.clone().all(|r| r.name.zone_of(name))))
}

/// `e` as DANE's lookups must take it: a denial nothing proves is a bogus answer
/// (RFC 4033 §5: signatures missing where the zone is signed), never "no records".
fn unproven_as_bogus(e: NetError) -> NetError {
    match no_records(&e) {
        Some(n) if !proven_denial(n) => NetError::Dns(DnsError::DnssecBogus),
        _ => e,
    }
}

/// CNAMEs followed from the name asked to the records' owner at most.
const CNAME_HOPS_MAX: usize = 8;

/// The part of an answer that answers the name asked (RFC 1034 §3.6.2, §4.3.2):
/// the CNAME chain from it and the records of the types asked owned by the chain's
/// end. Records of other names are left out: a forger on the path can append them
/// to a genuine, signed answer, and hickory passes them on.
struct Answering<'a> {
    chain: Vec<&'a dns_rr::Record>,
    records: Vec<&'a dns_rr::Record>,
}

impl<'a> Answering<'a> {
    fn of(answers: &'a [dns_rr::Record], name: &str, types: &[RecordType]) -> Answering<'a> {
        let owned_by = |r: &dns_rr::Record, owner: &str| {
            r.name
                .to_ascii()
                .trim_end_matches('.')
                .eq_ignore_ascii_case(owner.trim_end_matches('.'))
        };
        // Records' owners read in A-labels: a UTF-8 name asked is compared so too.
        let mut owner =
            dns_rr::Name::from_utf8(name).map_or_else(|_| name.to_string(), |n| n.to_ascii());
        let mut chain = Vec::new();
        while chain.len() < CNAME_HOPS_MAX {
            let Some(cname) = answers
                .iter()
                .find(|r| owned_by(r, &owner) && r.record_type() == RecordType::CNAME)
            else {
                break;
            };
            let RData::CNAME(target) = &cname.data else {
                break;
            };
            owner = target.0.to_ascii();
            chain.push(cname);
        }
        let records = answers
            .iter()
            .filter(|r| types.contains(&r.record_type()) && owned_by(r, &owner))
            .collect();
        Answering { chain, records }
    }

    /// Whether there are records and every one, the chain's too, is DNSSEC-secure.
    fn secure(&self) -> bool {
        !self.records.is_empty()
            && self
                .chain
                .iter()
                .chain(&self.records)
                .all(|r| r.proof.is_secure())
    }

    /// The addresses among the records.
    fn ips(&self) -> Vec<IpAddr> {
        self.records
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }
}

/// The addresses of `host` in an address lookup's answer.
fn ips_of(l: &hickory_resolver::lookup::Lookup, host: &str) -> Vec<IpAddr> {
    Answering::of(l.answers(), host, &[RecordType::A, RecordType::AAAA]).ips()
}

/// The texts of `name`'s TXT records in an answer, one per record: a record's
/// strings are one text (RFC 7208 §3.3's rule, RFC 8461 §3.1, RFC 8460 §3).
fn texts(txt: &hickory_resolver::lookup::Lookup, name: &str) -> Vec<String> {
    Answering::of(txt.answers(), name, &[RecordType::TXT])
        .records
        .into_iter()
        .filter_map(|rec| match &rec.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s))
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect()
}

/// Lookups for work off the shards (TLS-RPT's `_smtp._tls` records and report
/// hosts), each a blocking call on a runtime of its own.
pub struct BlockingResolver {
    rt: tokio::runtime::Runtime,
    resolver: TokioResolver,
}

impl BlockingResolver {
    /// A resolver asking `cfg`'s nameserver. Errors: as [`Resolver::start`].
    pub fn new(cfg: &DnsConfig) -> anyhow::Result<BlockingResolver> {
        let (config, opts) = settings(cfg)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let resolver = rt.block_on(async { build(config, opts) })?;
        Ok(BlockingResolver { rt, resolver })
    }

    /// The TXT texts at `name` (none: NXDOMAIN or no TXT). Errors: the lookup
    /// failed (SERVFAIL, timeout), as a sentence.
    pub fn txt(&self, name: &str) -> Result<Vec<String>, String> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.rt.block_on(self.resolver.txt_lookup(fqdn.as_str())) {
            Ok(txt) => Ok(texts(&txt, &fqdn)),
            Err(e)
                if no_records(&e).is_some_and(|n| {
                    matches!(
                        n.response_code,
                        ResponseCode::NXDomain | ResponseCode::NoError
                    )
                }) =>
            {
                Ok(Vec::new())
            }
            Err(e) => Err(explain::dns(name, &lookup_failed(&e)).to_string()),
        }
    }

    /// The addresses of `host`. Errors: none, or the lookup failed, as a sentence.
    pub fn ips(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.rt.block_on(self.resolver.lookup_ip(fqdn.as_str())) {
            Ok(ips) => Ok(ips_of(ips.as_lookup(), &fqdn)),
            Err(e) => Err(explain::dns(host, &lookup_failed(&e)).to_string()),
        }
    }
}

/// `domain`'s route: its MX hosts with their addresses, or why none. With DANE
/// (`v`), every lookup is the validating resolver's: a bogus MX or address answer,
/// or a denial of them nothing proves, is a failed lookup, never believed (RFC 7672
/// §2.2.1): a forged "no MX" would otherwise lead to the implicit MX, and a forged
/// NXDOMAIN bounce the mail. Each host gets its DANE answer.
async fn resolve(stub: &Stub, v: Option<&Validator>, domain: &str) -> Answer {
    let asker = v.map_or(Asker::Stub(stub), |v| Asker::Validating(&v.resolver));
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let now = Instant::now();
    match asker.lookup(&fqdn, RecordType::MX).await {
        Ok(mx) => {
            let valid_until = mx.valid_until();
            let answering = Answering::of(mx.answers(), &fqdn, &[RecordType::MX]);
            let mx_secure = v.is_some() && answering.secure();
            let mut recs: Vec<(u16, String)> = answering
                .records
                .iter()
                .filter_map(|rec| match &rec.data {
                    RData::MX(m) => Some((
                        m.preference,
                        m.exchange
                            .to_ascii()
                            .trim_end_matches('.')
                            .to_ascii_lowercase(),
                    )),
                    _ => None,
                })
                .collect();
            if recs.len() == 1 && recs[0].1.is_empty() {
                return Answer {
                    route: Route::NullMx,
                    valid_until,
                    sts: Sts::None,
                    mx_secure: false,
                };
            }
            recs.retain(|(_, h)| !h.is_empty());
            // Equal preferences in random order (RFC 5321 §5.1) spread load over them.
            fastrand::shuffle(&mut recs);
            recs.sort_by_key(|(p, _)| *p);
            let mut hosts = Vec::new();
            let mut valid_until = valid_until;
            let names: Vec<String> = recs.iter().map(|(_, h)| h.clone()).collect();
            // The first host whose address lookup failed (not "none"), and why.
            let mut failed = None;
            for (preference, name) in recs {
                let found = match addresses(asker, &name).await {
                    Ok(found) => found,
                    Err(e) => {
                        if no_records(&e).is_none() && failed.is_none() {
                            failed = Some(explain::dns(&name, &lookup_failed(&e)).to_string());
                        }
                        continue;
                    }
                };
                valid_until = valid_until.min(found.until);
                let dane = match v {
                    Some(v) => {
                        let (dane, until) = v.dane_of(&name, found.secure).await;
                        valid_until = valid_until.min(until);
                        dane
                    }
                    None => Dane::None,
                };
                hosts.push(MxHost {
                    name,
                    preference,
                    addrs: found.ips,
                    dane,
                });
            }
            if hosts.is_empty() {
                let why = failed.map_or_else(
                    || explain::dns(domain, &DnsProblem::MxWithoutAddresses(names)).to_string(),
                    |why| format!("no MX host of {domain} could be resolved: {why}"),
                );
                return Answer {
                    route: Route::TempFail(why),
                    valid_until: now + TEMPFAIL_CACHE,
                    sts: Sts::None,
                    mx_secure: false,
                };
            }
            Answer {
                route: Route::Hosts(hosts),
                valid_until,
                sts: Sts::None,
                mx_secure,
            }
        }
        Err(e) => match no_records(&e) {
            Some(NoRecords {
                response_code: ResponseCode::NXDomain,
                negative_ttl,
                ..
            }) => Answer {
                route: Route::NoSuchDomain(
                    explain::dns(domain, &DnsProblem::NoSuchDomain).to_string(),
                ),
                valid_until: now + Duration::from_secs(negative_ttl.unwrap_or(300).into()),
                sts: Sts::None,
                mx_secure: false,
            },
            Some(NoRecords {
                response_code: ResponseCode::NoError,
                ..
            }) => implicit_mx(asker, v, domain, &fqdn).await,
            _ => Answer {
                route: Route::TempFail(explain::dns(domain, &lookup_failed(&e)).to_string()),
                valid_until: now + TEMPFAIL_CACHE,
                sts: Sts::None,
                mx_secure: false,
            },
        },
    }
}

/// The "no records" answer an error carries (NXDOMAIN, or NOERROR with none of the
/// type asked for), if it is one.
fn no_records(e: &NetError) -> Option<&NoRecords> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(n)) => Some(n),
        _ => None,
    }
}

/// A failed lookup that says nothing about the domain itself: the DNS answered with
/// an error code, did not answer, or could not be asked.
fn lookup_failed(e: &NetError) -> DnsProblem {
    let code = |c: &ResponseCode| DnsProblem::ServerFailed(format!("{c:?}").to_uppercase());
    match e {
        NetError::Dns(DnsError::NoRecordsFound(n)) => code(&n.response_code),
        NetError::Dns(DnsError::ResponseCode(c)) => code(c),
        NetError::Timeout => DnsProblem::TimedOut,
        NetError::Dns(DnsError::DnssecBogus) => DnsProblem::Bogus,
        NetError::NoConnections => {
            DnsProblem::ResolverDown("no nameserver could be reached".into())
        }
        _ => DnsProblem::ResolverDown(e.to_string()),
    }
}

/// No MX records: the domain's own address is the implicit MX (RFC 5321 §5.1).
async fn implicit_mx(asker: Asker<'_>, v: Option<&Validator>, domain: &str, fqdn: &str) -> Answer {
    let now = Instant::now();
    match addresses(asker, fqdn).await {
        Ok(found) => {
            let (dane, until) = match v {
                Some(v) => v.dane_of(domain, found.secure).await,
                None => (Dane::None, found.until),
            };
            Answer {
                valid_until: found.until.min(until),
                route: Route::Hosts(vec![MxHost {
                    name: domain.to_string(),
                    preference: 0,
                    addrs: found.ips,
                    dane,
                }]),
                sts: Sts::None,
                mx_secure: false,
            }
        }
        Err(e) => match no_records(&e) {
            Some(NoRecords {
                response_code: ResponseCode::NXDomain | ResponseCode::NoError,
                ..
            }) => Answer {
                route: Route::NoSuchDomain(
                    explain::dns(domain, &DnsProblem::NoRecords).to_string(),
                ),
                valid_until: now + Duration::from_secs(300),
                sts: Sts::None,
                mx_secure: false,
            },
            _ => Answer {
                route: Route::TempFail(explain::dns(domain, &lookup_failed(&e)).to_string()),
                valid_until: now + TEMPFAIL_CACHE,
                sts: Sts::None,
                mx_secure: false,
            },
        },
    }
}

/// The MTA-STS policy in force for `domain`: its `_mta-sts` TXT record, and when
/// its id is new, the policy fetched (mta-sts.DOMAIN resolved here, the HTTPS
/// request on a blocking thread).
async fn sts_of(stub: &Stub, policies: &Arc<Policies>, domain: &str) -> Sts {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let gate = policies.gate(&domain);
    let _one_at_a_time = gate.lock().await;
    if policies.known_absent(&domain, Instant::now()) {
        return Sts::None;
    }
    // Until when "no record" may be believed: the answer's TTL, or the negative one.
    let mut absent_until = None;
    let name = format!("_mta-sts.{domain}.");
    let record = match stub.lookup(&name, RecordType::TXT).await {
        Ok(txt) => {
            absent_until = Some(txt.valid_until());
            Record::Texts(texts(&txt, &format!("_mta-sts.{domain}")))
        }
        Err(e) => match no_records(&e) {
            Some(
                n @ NoRecords {
                    response_code: ResponseCode::NXDomain | ResponseCode::NoError,
                    ..
                },
            ) => {
                let ttl = n.negative_ttl.map_or(mta_sts::ABSENT_TTL_DEFAULT, |t| {
                    Duration::from_secs(t.into())
                });
                absent_until = Some(Instant::now() + ttl);
                Record::Texts(Vec::new())
            }
            _ => Record::Failed(
                explain::dns(&format!("_mta-sts.{domain}"), &lookup_failed(&e)).to_string(),
            ),
        },
    };
    let id = match policies.begin(&domain, record, SystemTime::now()) {
        Step::Done(Sts::None) => {
            if let Some(until) = absent_until {
                policies.note_absent(&domain, until);
            }
            return Sts::None;
        }
        Step::Done(sts) => return sts,
        Step::Fetch(id) => id,
    };
    let host = format!("mta-sts.{domain}");
    let body = match addresses(Asker::Stub(stub), &host).await {
        Ok(found) => {
            let addrs = found.ips;
            let (p, d) = (policies.clone(), domain.clone());
            tokio::task::spawn_blocking(move || mta_sts::fetch(&d, &addrs, p.settings()))
                .await
                .unwrap_or_else(|e| Err(NoPolicy::fetch_error(format!("the fetch failed: {e}"))))
        }
        Err(e) => Err(NoPolicy::fetch_error(
            explain::dns(&host, &lookup_failed(&e)).to_string(),
        )),
    };
    policies.fetched(&domain, id, body, SystemTime::now())
}
