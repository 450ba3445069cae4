//! MX resolution on its own thread: hickory-resolver needs tokio, the shards run
//! monoio. Shards send a domain over a channel and await a oneshot answer; each
//! shard caches answers until their TTL runs out.

use crate::deliver::explain::{self, DnsProblem};
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::error::{ResolveError, ResolveErrorKind};
use hickory_resolver::proto::error::ProtoErrorKind;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::TokioAsyncResolver;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Lookups in progress at once on the resolver thread.
const LOOKUPS_IN_FLIGHT_MAX: usize = 256;
/// How long a temporary failure is cached, so a dead DNS is not hammered.
pub const TEMPFAIL_CACHE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct MxHost {
    pub name: String,
    pub preference: u16,
    pub addrs: Vec<IpAddr>,
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
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            server: None,
            timeout: Duration::from_secs(5),
            attempts: 2,
        }
    }
}

impl Resolver {
    pub fn start(cfg: &DnsConfig) -> anyhow::Result<Resolver> {
        let (config, mut opts) = match cfg.server {
            Some(addr) => (
                ResolverConfig::from_parts(
                    None,
                    vec![],
                    NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
                ),
                ResolverOpts::default(),
            ),
            None => hickory_resolver::system_conf::read_system_conf().map_err(|e| {
                anyhow::anyhow!("cannot read /etc/resolv.conf: {e}; give --dns ADDR:PORT")
            })?,
        };
        opts.timeout = cfg.timeout;
        opts.attempts = cfg.attempts;
        // Names are absolute: never append search domains to a recipient's domain.
        opts.ndots = 0;
        opts.cache_size = 0;
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        std::thread::Builder::new()
            .name("volley-dns".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let resolver = Arc::new(TokioAsyncResolver::tokio(config, opts));
                    let permits = Arc::new(tokio::sync::Semaphore::new(LOOKUPS_IN_FLIGHT_MAX));
                    while let Some(req) = rx.recv().await {
                        let r = resolver.clone();
                        let permit = permits.clone().acquire_owned().await.expect("never closed");
                        tokio::spawn(async move {
                            let answer = resolve(&r, &req.domain).await;
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
        rx.await
            .unwrap_or_else(|_| failed("resolver dropped the request"))
    }
}

async fn resolve(r: &TokioAsyncResolver, domain: &str) -> Answer {
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let now = Instant::now();
    match r.mx_lookup(fqdn.as_str()).await {
        Ok(mx) => {
            let valid_until = mx.valid_until();
            let mut recs: Vec<(u16, String)> = mx
                .iter()
                .map(|m| {
                    (
                        m.preference(),
                        m.exchange()
                            .to_ascii()
                            .trim_end_matches('.')
                            .to_ascii_lowercase(),
                    )
                })
                .collect();
            if recs.len() == 1 && recs[0].1.is_empty() {
                return Answer {
                    route: Route::NullMx,
                    valid_until,
                };
            }
            recs.retain(|(_, h)| !h.is_empty());
            // Equal preferences in random order (RFC 5321 §5.1) spread load over them.
            fastrand::shuffle(&mut recs);
            recs.sort_by_key(|(p, _)| *p);
            let mut hosts = Vec::new();
            let mut valid_until = valid_until;
            let names: Vec<String> = recs.iter().map(|(_, h)| h.clone()).collect();
            for (preference, name) in recs {
                let addrs = match r.lookup_ip(format!("{name}.").as_str()).await {
                    Ok(ips) => {
                        valid_until = valid_until.min(ips.valid_until());
                        ips.iter().collect()
                    }
                    Err(_) => Vec::new(),
                };
                if !addrs.is_empty() {
                    hosts.push(MxHost {
                        name,
                        preference,
                        addrs,
                    });
                }
            }
            if hosts.is_empty() {
                return Answer {
                    route: Route::TempFail(
                        explain::dns(domain, &DnsProblem::MxWithoutAddresses(names)).to_string(),
                    ),
                    valid_until: now + TEMPFAIL_CACHE,
                };
            }
            Answer {
                route: Route::Hosts(hosts),
                valid_until,
            }
        }
        Err(e) => match e.kind() {
            ResolveErrorKind::NoRecordsFound {
                response_code: ResponseCode::NXDomain,
                negative_ttl,
                ..
            } => Answer {
                route: Route::NoSuchDomain(
                    explain::dns(domain, &DnsProblem::NoSuchDomain).to_string(),
                ),
                valid_until: now + Duration::from_secs(negative_ttl.unwrap_or(300).into()),
            },
            ResolveErrorKind::NoRecordsFound {
                response_code: ResponseCode::NoError,
                ..
            } => implicit_mx(r, domain, &fqdn).await,
            _ => Answer {
                route: Route::TempFail(explain::dns(domain, &lookup_failed(&e)).to_string()),
                valid_until: now + TEMPFAIL_CACHE,
            },
        },
    }
}

/// A failed lookup that says nothing about the domain itself: the DNS answered with
/// an error code, did not answer, or could not be asked.
fn lookup_failed(e: &ResolveError) -> DnsProblem {
    match e.kind() {
        ResolveErrorKind::NoRecordsFound { response_code, .. } => {
            DnsProblem::ServerFailed(format!("{response_code:?}").to_uppercase())
        }
        ResolveErrorKind::Timeout => DnsProblem::TimedOut,
        ResolveErrorKind::Proto(p) if matches!(p.kind(), ProtoErrorKind::Timeout) => {
            DnsProblem::TimedOut
        }
        ResolveErrorKind::NoConnections => {
            DnsProblem::ResolverDown("no nameserver could be reached".into())
        }
        _ => DnsProblem::ResolverDown(e.to_string()),
    }
}

/// No MX records: the domain's own address is the implicit MX (RFC 5321 §5.1).
async fn implicit_mx(r: &TokioAsyncResolver, domain: &str, fqdn: &str) -> Answer {
    let now = Instant::now();
    match r.lookup_ip(fqdn).await {
        Ok(ips) => Answer {
            valid_until: ips.valid_until(),
            route: Route::Hosts(vec![MxHost {
                name: domain.to_string(),
                preference: 0,
                addrs: ips.iter().collect(),
            }]),
        },
        Err(e) => match e.kind() {
            ResolveErrorKind::NoRecordsFound {
                response_code: ResponseCode::NXDomain | ResponseCode::NoError,
                ..
            } => Answer {
                route: Route::NoSuchDomain(
                    explain::dns(domain, &DnsProblem::NoRecords).to_string(),
                ),
                valid_until: now + Duration::from_secs(300),
            },
            _ => Answer {
                route: Route::TempFail(explain::dns(domain, &lookup_failed(&e)).to_string()),
                valid_until: now + TEMPFAIL_CACHE,
            },
        },
    }
}
