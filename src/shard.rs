//! A shard: one OS thread, one monoio runtime, its own spool, queues, DNS cache and
//! connection pools. Nothing here is shared with other shards; the only atomics are
//! the progress counters, updated once per commit batch.
//!
//! Flow: recovered recipients → per-domain routing (MX lookup, cached with its TTL)
//! → a queue per site (MX host set) → up to N pipelined connections per site →
//! replies → outcomes → group commit (accounting log first, then spool Done records).

use crate::classify::Classifier;
use crate::config::EngineConfig;
use crate::delivery;
use crate::dns::{Resolver, Route};
use crate::ingest::{shard_dir, Instances};
use crate::log::{self, Kind, LogWriter};
use crate::retry::{self, Decision};
use crate::smtp::client::Stage;
use crate::smtp::reply::Reply;
use crate::spool::{RecordRef, Spool, Terminal};
use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Counters the `send` progress bar reads; updated per commit batch.
#[derive(Default)]
pub struct Progress {
    pub delivered: AtomicU64,
    pub bounced: AtomicU64,
    pub expired: AtomicU64,
    /// Temporary failures (events, not recipients).
    pub deferrals: AtomicU64,
    /// Recipients this shard recovered from its spool.
    pub recovered: AtomicU64,
    pub done: AtomicBool,
}

/// What a shard hands back when it ends.
pub struct ShardReport {
    /// Queue-to-delivery latency of delivered recipients, milliseconds.
    pub latency_ms: Histogram<u64>,
    pub remaining: u64,
}

/// One recipient on its way.
#[derive(Debug, Clone)]
pub struct Job {
    pub rref: RecordRef,
    pub instance: u32,
    pub domain: Rc<str>,
    pub attempts: u32,
    /// Connection breaks before a reply; see `EngineConfig::requeues_max`.
    pub requeues: u32,
}

/// The connection a reply came over, for the log.
pub struct Via<'a> {
    pub mx: &'a str,
    pub ip: SocketAddr,
    /// TLS version and cipher, when STARTTLS was used.
    pub tls: Option<&'a str>,
}

/// A destination: the MX host set that one or more domains route to.
pub struct Site {
    pub key: String,
    pub hosts: Vec<crate::dns::MxHost>,
    pub queue: RefCell<VecDeque<Job>>,
    pub conns: Cell<usize>,
}

enum DomainState {
    Resolving(Vec<Job>),
    Routed {
        site: Rc<Site>,
        until: Instant,
    },
    /// Permanent (null MX, no such domain) or temporary DNS failure, until the TTL ends.
    Failed {
        reply: Reply,
        permanent: bool,
        until: Instant,
    },
}

struct Pending {
    rref: RecordRef,
    terminal: Terminal,
}

pub struct Shard {
    pub id: usize,
    pub cfg: Arc<EngineConfig>,
    pub instances: Instances,
    classifier: Arc<Classifier>,
    tls: Arc<rustls::ClientConfig>,
    resolver: Resolver,
    pub spool: RefCell<Spool>,
    log: RefCell<LogWriter>,
    domains: RefCell<HashMap<Rc<str>, DomainState>>,
    sites: RefCell<HashMap<String, Rc<Site>>>,
    pending: RefCell<Vec<Pending>>,
    retries: RefCell<BinaryHeap<Reverse<(Instant, u64)>>>,
    retry_jobs: RefCell<HashMap<u64, Job>>,
    retry_seq: Cell<u64>,
    remaining: Cell<u64>,
    tx_seq: Cell<u64>,
    progress: Arc<Progress>,
    batch: RefCell<[u64; 4]>,
    latency: RefCell<Histogram<u64>>,
    stop: Arc<AtomicBool>,
}

/// Runs shard `id` to the end: every recovered recipient terminal, or `stop` set.
pub fn run(
    id: usize,
    cfg: Arc<EngineConfig>,
    instances: Instances,
    classifier: Arc<Classifier>,
    resolver: Resolver,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<ShardReport> {
    let (spool, recovered) =
        Spool::open(&shard_dir(&cfg.spool_dir, id), cfg.segment_bytes, &|i| {
            instances.contains_key(&i)
        })?;
    if let Some((seg, off)) = recovered.torn_at {
        eprintln!("volley: shard {id}: spool ends with a torn record at segment {seg} offset {off}; recovered what came before");
    }
    let log = LogWriter::open(&cfg.log_path)?;
    let driver = cfg.driver;
    let shard = Rc::new(Shard {
        id,
        instances,
        classifier,
        tls: crate::tls::client_config(cfg.tls_verify),
        resolver,
        spool: RefCell::new(spool),
        log: RefCell::new(log),
        domains: RefCell::new(HashMap::new()),
        sites: RefCell::new(HashMap::new()),
        pending: RefCell::new(Vec::new()),
        retries: RefCell::new(BinaryHeap::new()),
        retry_jobs: RefCell::new(HashMap::new()),
        retry_seq: Cell::new(0),
        remaining: Cell::new(recovered.pending.len() as u64),
        tx_seq: Cell::new(0),
        progress,
        batch: RefCell::new([0; 4]),
        latency: RefCell::new(Histogram::new(3).expect("valid")),
        stop,
        cfg,
    });
    shard
        .progress
        .recovered
        .store(recovered.pending.len() as u64, Ordering::Relaxed);
    let jobs: Vec<Job> = {
        let spool = shard.spool.borrow();
        let mut interned: HashMap<Vec<u8>, Rc<str>> = HashMap::new();
        recovered
            .pending
            .into_iter()
            .map(|(rref, instance)| {
                let inst = &shard.instances[&instance];
                let email = spool
                    .queue_value(rref, inst.email_col)
                    .expect("recovery checked the record");
                let at = email.iter().rposition(|&c| c == b'@').map_or(0, |i| i + 1);
                let domain = match interned.get(&email[at..]) {
                    Some(d) => d.clone(),
                    None => {
                        let d: Rc<str> = Rc::from(String::from_utf8_lossy(&email[at..]).as_ref());
                        interned.insert(email[at..].to_vec(), d.clone());
                        d
                    }
                };
                Job {
                    rref,
                    instance,
                    domain,
                    attempts: 0,
                    requeues: 0,
                }
            })
            .collect()
    };
    let sh = shard.clone();
    volley_load::runtime::block_on(driver, async move {
        let committer = monoio::spawn(commit_loop(sh.clone()));
        let retrier = monoio::spawn(retry_loop(sh.clone()));
        for job in jobs {
            sh.clone().enqueue(job);
        }
        committer.await?;
        retrier.await;
        anyhow::Ok(())
    })??;
    let latency = shard.latency.borrow().clone();
    Ok(ShardReport {
        latency_ms: latency,
        remaining: shard.remaining.get(),
    })
}

impl Shard {
    fn finished(&self) -> bool {
        self.remaining.get() == 0 || self.stop.load(Ordering::Relaxed)
    }

    /// Routes a job: to its site's queue, or to DNS first.
    pub fn enqueue(self: Rc<Self>, job: Job) {
        let now = Instant::now();
        let mut domains = self.domains.borrow_mut();
        match domains.get_mut(&job.domain) {
            Some(DomainState::Resolving(waiting)) => waiting.push(job),
            Some(DomainState::Routed { site, until }) if *until > now => {
                let site = site.clone();
                drop(domains);
                site.queue.borrow_mut().push_back(job);
                self.ensure_connections(&site);
            }
            Some(DomainState::Failed {
                reply,
                permanent,
                until,
            }) if *until > now => {
                let (reply, permanent) = (reply.clone(), *permanent);
                drop(domains);
                self.outcome(job, &reply, "dns", None, Some(permanent));
            }
            _ => {
                let domain = job.domain.clone();
                domains.insert(domain.clone(), DomainState::Resolving(vec![job]));
                drop(domains);
                monoio::spawn(self.resolve(domain));
            }
        }
    }

    async fn resolve(self: Rc<Self>, domain: Rc<str>) {
        let answer = self.resolver.lookup(&domain).await;
        let until = answer.valid_until;
        let failed = |code, enhanced, why: &str, permanent| {
            (Reply::new(code, Some(enhanced), why), permanent)
        };
        let (state, route) = match answer.route {
            Route::Hosts(hosts) => {
                let key = hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(",");
                let site = self
                    .sites
                    .borrow_mut()
                    .entry(key.clone())
                    .or_insert_with(|| {
                        Rc::new(Site {
                            key,
                            hosts,
                            queue: RefCell::new(VecDeque::new()),
                            conns: Cell::new(0),
                        })
                    })
                    .clone();
                (
                    DomainState::Routed {
                        site: site.clone(),
                        until,
                    },
                    Ok(site),
                )
            }
            Route::NullMx => {
                let why = format!("{domain} accepts no mail (null MX, RFC 7505)");
                let f = failed(556, "5.1.10", &why, true);
                (
                    DomainState::Failed {
                        reply: f.0.clone(),
                        permanent: true,
                        until,
                    },
                    Err(f),
                )
            }
            Route::NoSuchDomain(why) => {
                let f = failed(550, "5.1.2", &why, true);
                (
                    DomainState::Failed {
                        reply: f.0.clone(),
                        permanent: true,
                        until,
                    },
                    Err(f),
                )
            }
            Route::TempFail(why) => {
                let f = failed(451, "4.4.3", &why, false);
                (
                    DomainState::Failed {
                        reply: f.0.clone(),
                        permanent: false,
                        until,
                    },
                    Err(f),
                )
            }
        };
        let waiting = match self.domains.borrow_mut().insert(domain.clone(), state) {
            Some(DomainState::Resolving(w)) => w,
            _ => Vec::new(),
        };
        match route {
            Ok(site) => {
                site.queue.borrow_mut().extend(waiting);
                self.ensure_connections(&site);
            }
            Err((reply, permanent)) => {
                for job in waiting {
                    self.outcome(job, &reply, "dns", None, Some(permanent));
                }
            }
        }
    }

    /// Opens connections for a site while it has more queued work than its open
    /// connections are taking, up to this shard's share of the limit.
    pub fn ensure_connections(self: &Rc<Self>, site: &Rc<Site>) {
        let max = self.cfg.conns_per_site_per_shard();
        loop {
            let conns = site.conns.get();
            let queued = site.queue.borrow().len();
            if queued == 0 || conns >= max || (conns > 0 && queued <= conns * self.cfg.window) {
                return;
            }
            site.conns.set(conns + 1);
            monoio::spawn(delivery::connection(self.clone(), site.clone()));
        }
    }

    pub fn next_tx_id(&self) -> u64 {
        let n = self.tx_seq.get();
        self.tx_seq.set(n + 1);
        n
    }

    /// Puts jobs whose connection broke before a reply back at the front of their
    /// queue, or defers them once they have been requeued too often.
    pub fn requeue(self: &Rc<Self>, site: &Rc<Site>, jobs: Vec<Job>, why: &str, via: Option<&Via>) {
        let reply = Reply::new(451, Some("4.4.2"), why);
        for mut job in jobs.into_iter().rev() {
            job.requeues += 1;
            if job.requeues > self.cfg.requeues_max {
                job.requeues = 0;
                self.outcome(job, &reply, "connect", via, None);
            } else {
                site.queue.borrow_mut().push_front(job);
            }
        }
    }

    /// Records one recipient's reply. `permanent` overrides the reply code's class
    /// (DNS answers); otherwise 2xx delivered, 5xx bounced, 4xx deferred.
    pub fn outcome(
        &self,
        mut job: Job,
        reply: &Reply,
        stage: &'static str,
        via: Option<&Via>,
        permanent: Option<bool>,
    ) {
        self.outcome_timed(&mut job, reply, stage, via, permanent, None);
    }

    pub fn outcome_timed(
        &self,
        job: &mut Job,
        reply: &Reply,
        stage: &'static str,
        via: Option<&Via>,
        permanent: Option<bool>,
        tx_ms: Option<u64>,
    ) {
        let inst = &self.instances[&job.instance];
        let now_sys = SystemTime::now();
        let queued_ms = now_sys
            .duration_since(inst.queued_at)
            .unwrap_or_default()
            .as_millis() as u64;
        job.attempts += 1;
        let class = (!reply.is_positive()).then(|| self.classifier.classify(reply));
        let decision = retry::decide(
            reply,
            class,
            permanent,
            &self.cfg.retry,
            job.attempts,
            now_sys,
            inst.expire_at,
        );
        let (kind, terminal) = match decision {
            Decision::Delivered => (Kind::Delivery, Some(Terminal::Delivered)),
            Decision::Bounced => (Kind::Bounce, Some(Terminal::Bounced)),
            Decision::Expired => (Kind::Expiration, Some(Terminal::Expired)),
            Decision::Retry(_) => (Kind::TransientFailure, None),
        };
        let spool = self.spool.borrow();
        let rcpt = String::from_utf8_lossy(
            spool
                .queue_value(job.rref, inst.email_col)
                .unwrap_or_default(),
        )
        .into_owned();
        drop(spool);
        let text = reply.text.replace('\n', " ");
        self.log.borrow_mut().push(&log::Record {
            kind,
            time: log::now_rfc3339(),
            campaign: &inst.settings.id,
            rcpt: &rcpt,
            sender: &inst.settings.sender,
            domain: &job.domain,
            mx: via.map(|v| v.mx),
            ip: via.map(|v| v.ip.to_string()),
            tls: via.and_then(|v| v.tls),
            code: reply.code,
            enhanced: reply.enhanced.as_deref(),
            class: class.map(|v| v.class.name()),
            reply: &text,
            stage,
            attempt: job.attempts,
            queued_ms,
            tx_ms,
            shard: self.id,
        });
        let mut b = self.batch.borrow_mut();
        match terminal {
            Some(t) => {
                match t {
                    Terminal::Delivered => {
                        b[0] += 1;
                        let _ = self.latency.borrow_mut().record(queued_ms);
                    }
                    Terminal::Bounced => b[1] += 1,
                    _ => b[2] += 1,
                }
                self.pending.borrow_mut().push(Pending {
                    rref: job.rref,
                    terminal: t,
                });
            }
            None => {
                b[3] += 1;
                let Decision::Retry(after) = decision else {
                    unreachable!("only a retry is not terminal")
                };
                self.schedule_retry(job.clone(), inst.expire_at, after);
            }
        }
        drop(b);
        if self.pending.borrow().len() >= self.cfg.commit_batch_max {
            if let Err(e) = self.commit(false) {
                // A spool or log that cannot be written: stop rather than deliver unrecorded.
                eprintln!("volley: shard {}: {e:#}; stopping", self.id);
                self.stop.store(true, Ordering::Relaxed);
            }
        }
    }

    fn schedule_retry(&self, mut job: Job, expire_at: SystemTime, after: Duration) {
        let delay = retry::jitter(after);
        let until_expiry = expire_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let at = Instant::now() + delay.min(until_expiry);
        job.requeues = 0;
        let seq = self.retry_seq.get();
        self.retry_seq.set(seq + 1);
        self.retry_jobs.borrow_mut().insert(seq, job);
        self.retries.borrow_mut().push(Reverse((at, seq)));
    }

    /// Writes outcomes: log lines first, then Done records (see log.rs for why).
    fn commit(&self, sync: bool) -> anyhow::Result<()> {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        self.log.borrow_mut().flush()?;
        let mut spool = self.spool.borrow_mut();
        for p in &pending {
            spool.append_done(p.rref, p.terminal)?;
        }
        if sync {
            spool.sync()?;
            spool.delete_finished()?;
        }
        self.remaining
            .set(self.remaining.get() - pending.len() as u64);
        let mut b = self.batch.borrow_mut();
        let p = &self.progress;
        p.delivered.fetch_add(b[0], Ordering::Relaxed);
        p.bounced.fetch_add(b[1], Ordering::Relaxed);
        p.expired.fetch_add(b[2], Ordering::Relaxed);
        p.deferrals.fetch_add(b[3], Ordering::Relaxed);
        *b = [0; 4];
        Ok(())
    }

    /// This shard's TLS client settings (shared, so sessions resume per host).
    pub fn tls_config(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

async fn commit_loop(sh: Rc<Shard>) -> anyhow::Result<()> {
    let mut last_sync = Instant::now();
    loop {
        monoio::time::sleep(sh.cfg.commit_interval).await;
        let sync = last_sync.elapsed() >= sh.cfg.sync_interval;
        sh.commit(sync)?;
        if sync {
            last_sync = Instant::now();
        }
        if sh.finished() {
            sh.commit(true)?;
            sh.progress.done.store(true, Ordering::Relaxed);
            return Ok(());
        }
    }
}

async fn retry_loop(sh: Rc<Shard>) {
    const TICK: Duration = Duration::from_millis(100);
    while !sh.finished() {
        monoio::time::sleep(TICK).await;
        let now = Instant::now();
        loop {
            let due = {
                let mut heap = sh.retries.borrow_mut();
                match heap.peek() {
                    Some(Reverse((at, _))) if *at <= now => heap.pop().map(|Reverse((_, seq))| seq),
                    _ => None,
                }
            };
            let Some(seq) = due else { break };
            let Some(mut job) = sh.retry_jobs.borrow_mut().remove(&seq) else {
                continue;
            };
            let inst = &sh.instances[&job.instance];
            if SystemTime::now() >= inst.expire_at {
                let r = Reply::new(
                    451,
                    Some("4.4.7"),
                    "message expired in the queue before it could be delivered",
                );
                job.attempts = job.attempts.saturating_sub(1);
                sh.outcome(job, &r, "local", None, None);
            } else {
                sh.clone().enqueue(job);
            }
        }
    }
}

/// Stage names for the log.
pub fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::Connect => "connect",
        Stage::Mail => "mail",
        Stage::Rcpt => "rcpt",
        Stage::Data => "data",
        Stage::Local => "local",
    }
}
