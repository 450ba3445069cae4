//! A shard: one OS thread, one monoio runtime, its own spool, queues, DNS cache and
//! connection pools. Nothing here is shared with other shards; the only atomics are
//! the progress counters, updated once per commit batch.
//!
//! Flow: recovered recipients → per-domain routing (MX lookup, cached with its TTL)
//! → a queue per site (MX host set) → up to N pipelined connections per site →
//! replies → outcomes → group commit (accounting log first, then spool Done records).

mod purge;
mod track;

use purge::PurgeRule;

use crate::deliver::config::EngineConfig;
use crate::deliver::connection;
use crate::deliver::control::{Action, Command, Purged, Status, Target};
use crate::deliver::dane::Dane;
use crate::deliver::dns::MxHost;
use crate::deliver::dns::{Resolver, Route};
use crate::deliver::load::ThreadLoad;
use crate::deliver::mta_sts::Sts;
use crate::deliver::runtime::Driver;
use crate::deliver::schedule::{
    self, unix_ms, Campaigns, Job, Next, Now, Scheduler, Site, Source, StsHeld, StsSite, Take,
    TlsOutcome, TICK,
};
use crate::deliver::tls_rpt::Recorder;
use crate::message::dkim::Signer;
use crate::observe::log::{self, Kind, LogWriter};
use crate::observe::metrics::{self, Board, Outcome, OutcomeKey, RecentBounce, ShardView, Tally};
use crate::policy::classify::{Class, Classifier, Remembering};
use crate::policy::retry::{self, Decision};
use crate::policy::shaping::rules::{Rule, Rules, Set};
use crate::policy::shaping::{self, Change, Limiter};
use crate::smtp::client::Stage;
use crate::smtp::reply::Reply;
use crate::spool::inbox::Inbound;
use crate::spool::ingest::{shard_dir, Instance, Instances};
use crate::spool::{Deferral, LastReply, RecordRef, Spool, Terminal};
use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use std::cell::{Cell, Ref, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Counters the `send` progress bar reads; updated per commit batch.
#[derive(Default)]
pub struct Progress {
    pub delivered: AtomicU64,
    pub bounced: AtomicU64,
    pub expired: AtomicU64,
    /// Temporary failures (events, not recipients).
    pub deferrals: AtomicU64,
    /// Recipients whose transaction a lost connection cut off before any reply,
    /// queued again without counting an attempt.
    pub requeued: AtomicU64,
    /// Recipients this shard recovered from its spool.
    pub recovered: AtomicU64,
    pub done: AtomicBool,
}

/// What a shard hands back when it ends.
pub struct ShardReport {
    /// Queue-to-delivery latency of delivered recipients, milliseconds.
    pub latency_ms: Histogram<u64>,
    pub remaining: u64,
    /// The IO driver the shard ran on (`Auto` resolved).
    pub driver: Driver,
}

/// Who a recipient's record is logged as: the address, its campaign, the sender.
struct Envelope {
    rcpt: String,
    campaign: String,
    sender: String,
}

/// The connection a reply came over, for the log.
pub struct Via<'a> {
    pub mx: &'a str,
    pub ip: SocketAddr,
    /// TLS version and cipher, when STARTTLS was used.
    pub tls: Option<&'a str>,
    /// The pool address the connection came from (None: the host's default).
    pub source: Option<std::net::IpAddr>,
    /// The site's `provider` label (`Site::provider`).
    pub provider: &'a Arc<str>,
}

/// Counts a TLS session over `via` to `domain` under `applied` in its TLS report:
/// successful, or a failure row with the session's details (RFC 8460 §4.3).
fn record_session(
    r: &Recorder,
    domain: &str,
    applied: &crate::policy::tls_rpt::Applied,
    via: &Via,
    outcome: TlsOutcome,
) {
    use crate::policy::tls_rpt::{reason, Failure};
    match outcome {
        Ok(()) => r.success(domain, applied),
        Err((result, why)) => {
            let failure = Failure {
                result_type: result,
                sending_mta_ip: via.source,
                receiving_mx_hostname: Some(via.mx.to_string()),
                receiving_ip: Some(via.ip.ip()),
                failure_reason_code: Some(reason(&why)),
            };
            r.failure(domain, applied, failure);
        }
    }
}

enum DomainState {
    Resolving(Vec<Job>),
    Routed {
        hosts: Rc<[MxHost]>,
        /// Every MX host, whatever a policy allows: where TLS reports may go (RFC
        /// 8460 §5.3.1).
        all: Rc<[MxHost]>,
        /// The domain's site per source pool.
        sites: Vec<(Option<String>, Rc<Site>)>,
        until: Instant,
        /// The MTA-STS policy in force, if any: under enforce, `hosts` are those it
        /// allows, and TLS with a verified certificate is required to them.
        sts: Option<Rc<StsSite>>,
        /// An enforced policy allows none of the MX hosts: mail is deferred with
        /// this reply (TLS reports still go).
        refused: Option<Reply>,
    },
    /// Permanent (null MX, no such domain) or temporary DNS failure, until the TTL ends.
    Failed {
        reply: Reply,
        permanent: bool,
        until: Instant,
    },
}

/// An outcome waiting for the next commit to reach the spool.
enum Pending {
    Done(RecordRef, Terminal),
    Deferred(RecordRef, Deferral),
    /// A DSN to queue (its return path, the message) before the Done records.
    Dsn(String, Vec<u8>),
}

pub struct Shard {
    pub id: usize,
    pub cfg: Arc<EngineConfig>,
    /// The campaign instances this shard runs; `serve` adds to them as campaigns
    /// are acknowledged (see inbox.rs).
    instances: RefCell<BTreeMap<u32, Arc<Instance>>>,
    /// Records appended and synced for instances not yet acknowledged, by instance.
    staged: RefCell<HashMap<u32, Vec<Job>>>,
    /// The submission instance, which DSNs are queued under (dsn.rs); None: the
    /// spool has none (no campaign asked for DSNs).
    submission: Option<u32>,
    /// DSNs queued by the last commits, set going by the next tick.
    fresh: RefCell<Vec<Job>>,
    /// Runs until stopped, taking new work from the inbox (`serve`); otherwise the
    /// shard ends when every recipient it recovered is done (`send`).
    serving: bool,
    /// Replaced when `reloads` has a new generation (SIGHUP).
    classifier: RefCell<Remembering>,
    tls: Arc<rustls::ClientConfig>,
    tls_verified: Arc<rustls::ClientConfig>,
    /// Checks the certificates of sessions under a testing MTA-STS policy, which
    /// go over unverified TLS, for the TLS report.
    tls_check: Arc<rustls::client::WebPkiServerVerifier>,
    tls_rpt: Option<Arc<Recorder>>,
    resolver: Resolver,
    pub spool: RefCell<Spool>,
    log: RefCell<LogWriter>,
    domains: RefCell<HashMap<Rc<str>, DomainState>>,
    sites: RefCell<HashMap<String, Rc<Site>>>,
    pending: RefCell<Vec<Pending>>,
    rules: RefCell<Arc<Rules>>,
    reloads: Arc<Reloads>,
    /// The `reloads` generation this shard runs with.
    reloaded: Cell<u64>,
    warmup: Arc<shaping::warmup::Ledger>,
    leases: Arc<shaping::Leases>,
    limiters: RefCell<HashMap<String, Rc<Limiter>>>,
    /// Operator overrides by target key, applied to limiters made later too.
    overrides: RefCell<HashMap<String, Override>>,
    /// Queues, retries, pauses and operator rates of domains and campaigns: what
    /// goes when (schedule.rs).
    sched: Scheduler,
    control: Receiver<Command>,
    /// Every shard's command channel, for back-offs all shards share.
    peers: Vec<Sender<Command>>,
    signers: RefCell<HashMap<u32, Rc<Signer>>>,
    status: Arc<Status>,
    board: Arc<Board>,
    /// What this shard counted, published to `board` with the status.
    tally: RefCell<Tally>,
    /// Recipients a connection took for a transaction, until their outcome is
    /// recorded or they are put back: by Queue record, their instance and domain.
    /// At most the open connections' windows of transactions' recipients.
    in_flight: RefCell<HashMap<RecordRef, (u32, Rc<str>)>>,
    /// Purges with recipients still in flight when they were applied: such a
    /// recipient that comes back to be retried (or sent again) is bounced instead.
    /// Each is forgotten once none of its target's recipients is in flight.
    purges: RefCell<Vec<PurgeRule>>,
    remaining: Cell<u64>,
    tx_seq: Cell<u64>,
    progress: Arc<Progress>,
    /// Outcomes since the last commit by campaign instance: delivered, bounced,
    /// expired, deferrals (the progress counters are their sums).
    batch: RefCell<HashMap<u32, [u64; 4]>>,
    latency: RefCell<Histogram<u64>>,
    stop: Arc<AtomicBool>,
    /// Every recipient is terminal or `stop` was set: connections finish what is in
    /// flight, QUIT and close (RFC 5321 §4.1.1.10), within `shutdown_grace`.
    closing: Cell<bool>,
}

/// What a shard shares with the engine besides its configuration.
pub struct Links {
    pub classifier: Arc<Classifier>,
    pub rules: Arc<Rules>,
    /// Warm-up sends today, over every run of the day.
    pub warmup: Arc<shaping::warmup::Ledger>,
    /// Connection caps smaller than the shard count, held over all shards.
    pub leases: Arc<shaping::Leases>,
    pub resolver: Resolver,
    /// CA certificates trusted besides webpki-roots' (`--tls-roots`).
    pub tls_roots: Arc<Vec<rustls::pki_types::CertificateDer<'static>>>,
    pub progress: Arc<Progress>,
    pub control: Receiver<Command>,
    pub peers: Vec<Sender<Command>>,
    /// The DKIM key each signing campaign instance uses.
    pub dkim: Arc<HashMap<u32, crate::message::dkim::KeyRef>>,
    pub status: Arc<Status>,
    /// Where the shard publishes its metrics once a second.
    pub board: Arc<Board>,
    /// Counts TLS sessions to domains with an MTA-STS policy (TLS-RPT); None: off.
    pub tls_rpt: Option<Arc<Recorder>>,
    pub stop: Arc<AtomicBool>,
    /// New work while running (`serve`); None: the shard ends when its recovered
    /// recipients are all done.
    pub inbox: Option<tokio::sync::mpsc::Receiver<Inbound>>,
    /// Shaping and bounce rules replaced while running (`serve`'s SIGHUP).
    pub reloads: Arc<Reloads>,
}

/// Shaping and bounce rules published by `volley serve` on SIGHUP. Each shard
/// takes a new generation on its next tick (100 ms), so a new rate applies within
/// a second. Every site's limiters are reconfigured in place (`Limiter::
/// reconfigure`): what they learnt stays (back-offs, suspensions, pacing, open
/// connections). A site keeps the provider it was made with; a change of a
/// provider's MX suffixes applies to sites made after the reload.
#[derive(Default)]
pub struct Reloads {
    generation: AtomicU64,
    current: std::sync::Mutex<Option<(Arc<Rules>, Arc<Classifier>)>>,
}

impl Reloads {
    pub fn publish(&self, rules: Arc<Rules>, classifier: Arc<Classifier>) {
        *self.current.lock().expect("reloads lock") = Some((rules, classifier));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The rules of a generation newer than `seen`, with its number.
    fn newer_than(&self, seen: u64) -> Option<(u64, Arc<Rules>, Arc<Classifier>)> {
        let g = self.generation.load(Ordering::Acquire);
        if g == seen {
            return None;
        }
        let (r, c) = self.current.lock().expect("reloads lock").clone()?;
        Some((g, r, c))
    }
}

/// An operator's pause or rate for a limiter key (or key prefix).
#[derive(Debug, Clone, Default)]
struct Override {
    paused: bool,
    /// This shard's share of the operator's rate; Some(None): unlimited.
    rate: Option<Option<f64>>,
}

/// Runs shard `id` to the end: every recovered recipient terminal, or `stop` set.
pub fn run(
    id: usize,
    cfg: Arc<EngineConfig>,
    instances: Instances,
    links: Links,
) -> anyhow::Result<ShardReport> {
    let Links {
        classifier,
        rules,
        warmup,
        leases,
        resolver,
        tls_roots,
        progress,
        control,
        peers,
        dkim,
        status,
        board,
        tls_rpt,
        stop,
        inbox,
        reloads,
    } = links;
    // Parsed once per shard, not per message.
    let signers = dkim
        .iter()
        .map(|(inst, k)| Ok((*inst, Rc::new(k.load()?))))
        .collect::<Result<HashMap<u32, Rc<Signer>>, String>>()
        .map_err(|e| anyhow::anyhow!("shard {id}: {e}"))?;
    let (spool, recovered) =
        Spool::open(&shard_dir(&cfg.spool_dir, id), cfg.segment_bytes, &|i| {
            instances.contains_key(&i)
        })?;
    if let Some((seg, off)) = recovered.torn_at {
        eprintln!("volley: shard {id}: spool ends with a torn record at segment {seg} offset {off}; recovered what came before");
    }
    let log = LogWriter::open(&cfg.log_path, &cfg.log_rotation)?;
    let job_limits = campaign_limits(instances.values(), &cfg, id);
    let driver = cfg.driver;
    let shard = Rc::new(Shard {
        id,
        instances: RefCell::new(instances.as_ref().clone()),
        staged: RefCell::new(HashMap::new()),
        submission: instances.values().find(|i| i.submission).map(|i| i.no),
        fresh: RefCell::new(Vec::new()),
        serving: inbox.is_some(),
        classifier: RefCell::new(Remembering::new(classifier)),
        tls: crate::deliver::tls::client_config(false, &[]),
        tls_verified: crate::deliver::tls::client_config(true, &tls_roots),
        tls_check: crate::deliver::tls::verifier(&tls_roots),
        tls_rpt,
        resolver,
        spool: RefCell::new(spool),
        log: RefCell::new(log),
        domains: RefCell::new(HashMap::new()),
        sites: RefCell::new(HashMap::new()),
        pending: RefCell::new(Vec::new()),
        rules: RefCell::new(rules),
        reloaded: Cell::new(reloads.generation.load(Ordering::Acquire)),
        reloads,
        warmup,
        leases,
        limiters: RefCell::new(HashMap::new()),
        overrides: RefCell::new(HashMap::new()),
        sched: Scheduler::new(Instant::now(), cfg.window, cfg.requeues_max, job_limits),
        control,
        peers,
        signers: RefCell::new(signers),
        status,
        board,
        tally: RefCell::new(Tally::default()),
        in_flight: RefCell::new(HashMap::new()),
        purges: RefCell::new(Vec::new()),
        remaining: Cell::new(recovered.pending.len() as u64),
        tx_seq: Cell::new(0),
        progress,
        batch: RefCell::new(HashMap::new()),
        latency: RefCell::new(Histogram::new(3).expect("valid")),
        stop,
        closing: Cell::new(false),
        cfg,
    });
    shard
        .progress
        .recovered
        .store(recovered.pending.len() as u64, Ordering::Relaxed);
    // Each with when its retry is due (ms since the epoch) if it was deferred.
    let jobs: Vec<(Job, Option<u64>)> = {
        let spool = shard.spool.borrow();
        let mut interned: HashMap<Vec<u8>, Rc<str>> = HashMap::new();
        recovered
            .pending
            .into_iter()
            .map(|p| {
                let inst = shard.instance(p.instance);
                let email = spool
                    .queue_value(p.rref, inst.email_col)
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
                let (attempts, due, last) = match p.deferral {
                    Some(d) => (d.attempts, Some(d.due_unix_ms), d.last),
                    None => (0, None, None),
                };
                let job = Job {
                    rref: p.rref,
                    instance: p.instance,
                    domain,
                    attempts,
                    requeues: 0,
                    last,
                };
                (job, due)
            })
            .collect()
    };
    let mut per_instance: HashMap<u32, u64> = HashMap::new();
    for (j, _) in &jobs {
        *per_instance.entry(j.instance).or_default() += 1;
    }
    for (no, n) in per_instance {
        shard.instance(no).outcomes.queued(n);
    }
    for inst in shard.instances.borrow().values() {
        inst.outcomes.shard_started();
    }
    let sh = shard.clone();
    let (ran, driver) = crate::deliver::runtime::block_on_reporting(driver, async move {
        let committer = monoio::spawn(commit_loop(sh.clone()));
        let retrier = monoio::spawn(tick_loop(sh.clone()));
        let taker = inbox.map(|rx| monoio::spawn(inbox_loop(sh.clone(), rx)));
        // A recipient deferred before the restart waits out its retry time.
        let now = Now::read();
        let now_ms = unix_ms(now.wall);
        for (job, due_ms) in jobs {
            match due_ms.filter(|&d| d > now_ms) {
                Some(d) => {
                    let at = now.at + Duration::from_millis(d - now_ms);
                    sh.sched.hold_until(at, job);
                }
                None => sh.enqueue_unless_expired(job, now.wall),
            }
        }
        committer.await?;
        retrier.await;
        if let Some(t) = taker {
            t.await;
        }
        sh.close_connections().await;
        // Outcomes of what was in flight when the shard began to close.
        sh.commit(true)?;
        // The last outcomes reach the metrics too.
        let limiters: Vec<Rc<Limiter>> = sh.limiters.borrow().values().cloned().collect();
        let ready = sh.sites.borrow().values().map(|s| s.queued() as u64).sum();
        let retry = sh.sched.waiting() as u64;
        sh.publish_metrics(&limiters, ready, retry, Instant::now());
        anyhow::Ok(())
    })?;
    ran?;
    let latency = shard.latency.borrow().clone();
    Ok(ShardReport {
        latency_ms: latency,
        remaining: shard.remaining.get(),
        driver,
    })
}

impl Shard {
    /// Queues `job` for delivery, or, past its campaign's maximum age at `now`,
    /// expires it without another attempt (a restart after a long stop).
    fn enqueue_unless_expired(self: &Rc<Self>, job: Job, now: SystemTime) {
        if !schedule::is_expired(&**self, &job, now) {
            self.clone().enqueue(job);
            return;
        }
        self.expire(job);
    }

    /// Records `job`'s Expiration: past its campaign's maximum age, without another
    /// attempt.
    fn expire(&self, mut job: Job) {
        // The Expiration reports what the receiver last said, where and when (RFC
        // 3464 §2.3.6), not words of ours; ours only when there was no attempt.
        let (reply, stage, at) = match job.last.take() {
            Some(l) => (
                Reply::new(l.code, l.enhanced.as_deref(), &l.text),
                stage_named(&l.stage),
                Some(UNIX_EPOCH + Duration::from_millis(l.at_unix_ms)),
            ),
            None => (
                Reply::new(
                    451,
                    Some("4.4.7"),
                    "message expired in the queue before any attempt could be made",
                ),
                "local",
                None,
            ),
        };
        // Expiring is not an attempt; recording an outcome counts one.
        job.attempts = job.attempts.saturating_sub(1);
        let how = Attempt {
            stage,
            // Its last reply was taken as temporary (a 552 "too many recipients", a
            // rule that retries a 5xx): past the maximum age it expires, whatever the code.
            permanent: Some(false),
            last_attempt: at,
            ..Attempt::default()
        };
        self.record(&mut job, &reply, how);
    }

    fn finished(&self) -> bool {
        let idle = self.remaining.get() == 0 && self.fresh.borrow().is_empty();
        (idle && !self.serving) || self.stop.load(Ordering::Relaxed)
    }

    /// Campaign instance `no`, which every job's instance is.
    pub fn instance(&self, no: u32) -> Ref<'_, Instance> {
        Ref::map(self.instances.borrow(), |m| &*m[&no])
    }

    /// When the recipient at `rref` was queued: its instance's time, or for a
    /// submitted message the time in its record.
    fn queued_at(&self, inst: &Instance, rref: RecordRef) -> SystemTime {
        if !inst.submission {
            return inst.queued_at;
        }
        let spool = self.spool.borrow();
        let ms = spool
            .queue_value(rref, crate::spool::ingest::SUBMITTED_QUEUED_AT)
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    /// Routes a job: to its site's queue, or to DNS first.
    pub fn enqueue(self: Rc<Self>, job: Job) {
        let now = Instant::now();
        let mut domains = self.domains.borrow_mut();
        match domains.get_mut(&job.domain) {
            Some(DomainState::Resolving(waiting)) => waiting.push(job),
            Some(DomainState::Routed {
                hosts,
                all,
                sites,
                until,
                sts,
                refused,
            }) if *until > now => {
                let inst = self.instance(job.instance);
                let pool = inst
                    .settings
                    .pool
                    .as_ref()
                    .or(self.rules.borrow().default_pool.as_ref())
                    .cloned();
                // Read from the spool only where a policy could hold a report back.
                let report = (sts.is_some() || refused.is_some())
                    && inst.submission
                    && self.is_tls_report(&job);
                drop(inst);
                let pool = pool.as_ref();
                if report {
                    // Delivered despite the domain's policy, uncounted (RFC 8460 §5.3.1).
                    let site =
                        self.site_for(&job.domain, pool.map(String::as_str), all.clone(), None);
                    drop(domains);
                    self.sched.enqueue(&site, job);
                    self.ensure_connections(&site);
                    return;
                }
                if let Some(reply) = refused {
                    let reply = reply.clone();
                    drop(domains);
                    self.outcome(job, &reply, "dns", None, Some(false));
                    return;
                }
                let site = match sites.iter().find(|(p, _)| p.as_ref() == pool) {
                    Some((_, site)) => site.clone(),
                    None => {
                        let site = self.site_for(
                            &job.domain,
                            pool.map(String::as_str),
                            hosts.clone(),
                            sts.clone(),
                        );
                        sites.push((pool.cloned(), site.clone()));
                        site
                    }
                };
                drop(domains);
                self.sched.enqueue(&site, job);
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
                // A routing an MTA-STS policy decided is looked up again soon.
                let sts_until = until.min(Instant::now() + crate::deliver::mta_sts::STS_RECHECK);
                let all: Rc<[MxHost]> = hosts.clone().into();
                let state = match self.sts_hosts(&domain, hosts, &answer.sts, answer.mx_secure) {
                    Ok((hosts, sts)) => DomainState::Routed {
                        hosts: hosts.into(),
                        all,
                        sites: Vec::new(),
                        until: if sts.is_some() { sts_until } else { until },
                        sts,
                        refused: None,
                    },
                    // Each job is deferred as it is routed, but a TLS report.
                    Err(reply) => DomainState::Routed {
                        hosts: Rc::from(Vec::new()),
                        all,
                        sites: Vec::new(),
                        until: sts_until,
                        sts: None,
                        refused: Some(reply),
                    },
                };
                (state, Ok(()))
            }
            Route::NullMx => {
                let why = crate::deliver::explain::dns(
                    &domain,
                    &crate::deliver::explain::DnsProblem::NullMx,
                );
                let why = why.to_string();
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
            Ok(()) => {
                for job in waiting {
                    self.clone().enqueue(job);
                }
            }
            Err((reply, permanent)) => {
                for job in waiting {
                    self.outcome(job, &reply, "dns", None, Some(permanent));
                }
            }
        }
    }

    /// Whether `job` (of the submission instance) is one of volley's own TLS reports.
    fn is_tls_report(&self, job: &Job) -> bool {
        use crate::spool::ingest::{ROUTE_TLS_REPORT, SUBMITTED_ROUTE};
        self.spool.borrow().queue_value(job.rref, SUBMITTED_ROUTE) == Some(ROUTE_TLS_REPORT)
    }

    /// The site for `domain` routed to `hosts`, sent from `pool`: shared by every
    /// domain on the same MX hosts unless the domain has its own rule or an
    /// MTA-STS policy (`sts`): its sessions are the policy's (under enforce, TLS
    /// required and the certificate verified, whatever the rules say) and are
    /// counted for the domain's TLS report.
    fn site_for(
        &self,
        domain: &str,
        pool: Option<&str>,
        hosts: Rc<[MxHost]>,
        sts: Option<Rc<StsSite>>,
    ) -> Rc<Site> {
        let mx = hosts
            .iter()
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let rules = self.rules.borrow().clone();
        let own = rules.domains.get(domain);
        let dane_reported =
            self.tls_rpt.is_some() && hosts.iter().any(|h| !matches!(h.dane, Dane::None));
        let key = format!(
            "{}|{}|{mx}{}{}",
            pool.unwrap_or(""),
            if own.is_some() || sts.is_some() || dane_reported {
                domain
            } else {
                ""
            },
            match &sts {
                Some(p) => format!("|{}", p.key()),
                None => String::new(),
            },
            if dane_reported { "|dane" } else { "" }
        );
        if let Some(site) = self.sites.borrow().get(&key) {
            site.refresh_hosts(&hosts);
            return site.clone();
        }
        let provider = rules.provider_for(hosts.iter().map(|h| h.name.as_str()));
        let dest = match provider {
            Some(p) => format!("provider:{}", p.name),
            None => format!("site:{mx}"),
        };
        let dest_rule = rules.default.merged(provider.map(|p| &p.rule));
        let mut limits = vec![self.limiter(&dest, &dest_rule)];
        if let Some(r) = own.filter(|r| {
            r.max_msg_rate.is_some()
                || r.max_connections.is_some()
                || r.connect_rate.is_some()
                || r.warmup.is_some()
        }) {
            limits.push(self.limiter(&format!("domain:{domain}"), r));
        }
        let sources = pool
            .and_then(|p| rules.pools.get(p))
            .into_iter()
            .flatten()
            .map(|src| {
                let rule = rules.source_rule(src.ip, provider);
                Source {
                    addr: src.clone(),
                    limit: self.limiter(&format!("source:{}>{dest}", src.ip), &rule),
                }
            })
            .collect();
        let mut site = Site::new(
            key.clone(),
            Rc::from(domain),
            hosts,
            rules.effective(domain, provider),
            limits,
            sources,
            self.cfg.window,
        );
        if let Some(p) = provider {
            site.provider = Arc::from(p.name.as_str());
        }
        site.sts = sts;
        site.dane_reported = dane_reported;
        let site = Rc::new(site);
        self.sites.borrow_mut().insert(key, site.clone());
        site
    }

    /// This shard's limiter for `key`, made from `rule` on first use.
    fn limiter(&self, key: &str, rule: &Rule) -> Rc<Limiter> {
        if let Some(l) = self.limiters.borrow().get(key) {
            return l.clone();
        }
        let now = Instant::now();
        let l = Rc::new(
            Limiter::new(key.to_string(), rule, self.cfg.shards, self.id, now)
                .with_ledger(&self.warmup)
                .with_leases(rule, &self.leases),
        );
        for (target, o) in self.overrides.borrow().iter() {
            if key == target
                || key
                    .strip_prefix(target.as_str())
                    .is_some_and(|r| r.starts_with('>'))
            {
                l.set_paused(o.paused);
                if let Some(rate) = o.rate {
                    l.set_rate(rate, now);
                }
            }
        }
        self.limiters
            .borrow_mut()
            .insert(key.to_string(), l.clone());
        l
    }

    /// Opens the connections `site` gets now (`Scheduler::connections_to_open`).
    pub fn ensure_connections(self: &Rc<Self>, site: &Rc<Site>) {
        if self.stop_requested() {
            return;
        }
        let mut rng = fastrand::Rng::new();
        for (source, claim) in
            self.sched
                .connections_to_open(site, &**self, Instant::now(), &mut rng)
        {
            monoio::spawn(connection::run(self.clone(), site.clone(), source, claim));
        }
    }

    /// A connection from `source` to `site` ended.
    pub fn connection_closed(&self, site: &Site, source: Option<usize>) {
        self.sched.connection_closed(site, source);
    }

    /// Shaping's reaction to a reply (`Scheduler::react`): its change logged, a
    /// throttle back-off told to the other shards.
    pub fn react(&self, site: &Site, source: Option<usize>, class: Option<Class>, reply: &Reply) {
        let r = self.sched.react(site, source, class, reply, Instant::now());
        if let Some(key) = r.tell_peers {
            self.tell_peers(Command {
                action: Action::PeerThrottled(format!("shard {}: {reply}", self.id)),
                target: Target::Destination(key),
            });
        }
        if let Some(c) = r.change {
            self.log_change(&c);
        }
    }

    /// Best effort: a peer whose command queue is full misses this back-off and
    /// meets the throttle itself; a shard never waits on another.
    fn tell_peers(&self, cmd: Command) {
        for (i, p) in self.peers.iter().enumerate() {
            if i != self.id {
                let _ = p.try_send(cmd.clone());
            }
        }
    }

    fn log_change(&self, c: &Change) {
        self.log.borrow_mut().push(&log::ShapingRecord {
            kind: "Shaping",
            time: log::now_rfc3339(),
            event: c.event,
            key: &c.key,
            rate_per_s: c.rate,
            connections: c.conns,
            reason: &c.reason,
            shard: self.id,
        });
    }

    /// What a connection on `site` whose messages pass `chain` sends next
    /// (`Scheduler::take`): recipients that outlived their campaign's maximum age
    /// while they waited in the queue (a slow rate, a pause, a suspension) are
    /// expired here, not sent; a batch is in flight until its outcome is recorded.
    pub fn take(&self, site: &Site, chain: &[&Limiter]) -> Next {
        let Take { expired, next } = self.sched.take(site, chain, self, Now::read());
        for job in expired {
            self.expire(job);
        }
        if let Next::Batch(jobs) = &next {
            let mut in_flight = self.in_flight.borrow_mut();
            for j in jobs {
                in_flight.insert(j.rref, (j.instance, j.domain.clone()));
            }
        }
        next
    }

    /// Applies an operator's command (control.rs), or another shard's back-off, on
    /// this shard.
    fn apply(self: &Rc<Self>, cmd: Command) {
        let now = Instant::now();
        let key = cmd.target.key();
        if let Action::PeerThrottled(reason) = &cmd.action {
            let l = self.limiters.borrow().get(&key).cloned();
            if let Some(c) = l.and_then(|l| l.on_throttled(now, reason, true)) {
                self.log_change(&c);
            }
            return;
        }
        if let Action::Track(t) = &cmd.action {
            if let Some(answer) = &t.answer {
                // Room for every shard's answer, as for a purge.
                let _ = answer.try_send(self.track(t));
            }
            return;
        }
        if let Action::Purge(p) = &cmd.action {
            let counts = self.purge(&cmd.target, &p.reason);
            if let Some(answer) = &p.answer {
                // The channel has room for every shard; a gone asker is no error.
                let _ = answer.try_send(counts);
            }
            return;
        }
        match &cmd.target {
            Target::Domain(_) | Target::Campaign(_) => match &cmd.action {
                Action::Pause => self.sched.pause(key),
                Action::Resume => {
                    for job in self.sched.resume(&key) {
                        self.clone().enqueue(job);
                    }
                }
                Action::Rate(rate) => {
                    // As for a destination: the operator's rate (or "unlimited")
                    // replaces the campaign's own, is logged, and shows in the status.
                    let l =
                        Limiter::new(key.clone(), &Rule::default(), self.cfg.shards, self.id, now);
                    let share = rate
                        .as_ref()
                        .map(|r| shaping::share(r.per_sec(), self.cfg.shards, self.id, false));
                    self.log_change(&l.set_rate(share, now));
                    self.sched.set_job_limit(key, l);
                }
                Action::PeerThrottled(_) | Action::Purge(_) | Action::Track(_) => {
                    unreachable!("handled above")
                }
            },
            Target::Destination(_) | Target::Source(_) => {
                let mut overrides = self.overrides.borrow_mut();
                let o = overrides.entry(key).or_default();
                match &cmd.action {
                    Action::Pause => o.paused = true,
                    Action::Resume => o.paused = false,
                    Action::Rate(r) => {
                        o.rate =
                            Some(r.as_ref().map(|r| {
                                shaping::share(r.per_sec(), self.cfg.shards, self.id, false)
                            }))
                    }
                    Action::PeerThrottled(_) | Action::Purge(_) | Action::Track(_) => {
                        unreachable!("handled above")
                    }
                }
                let o = o.clone();
                drop(overrides);
                let matching: Vec<Rc<Limiter>> = self
                    .limiters
                    .borrow()
                    .values()
                    .filter(|l| cmd.target.matches(&l.key))
                    .cloned()
                    .collect();
                for l in matching {
                    let c = match cmd.action {
                        Action::Rate(_) => l.set_rate(o.rate.flatten(), now),
                        _ => l.set_paused(o.paused),
                    };
                    self.log_change(&c);
                }
            }
        }
    }

    /// Once per tick: operator commands, limiter recoveries, connections for sites
    /// their limiters held back, and the live status.
    fn shaping_tick(self: &Rc<Self>, publish: bool) {
        while let Ok(cmd) = self.control.try_recv() {
            self.apply(cmd);
        }
        if let Some((generation, rules, classifier)) = self.reloads.newer_than(self.reloaded.get())
        {
            self.reloaded.set(generation);
            self.reload(rules, classifier);
        }
        let now = Instant::now();
        let limiters: Vec<Rc<Limiter>> = self.limiters.borrow().values().cloned().collect();
        for l in &limiters {
            if let Some(c) = l.tick(now) {
                self.log_change(&c);
            }
        }
        let sites: Vec<Rc<Site>> = self
            .sites
            .borrow()
            .values()
            .filter(|s| s.queued() > 0)
            .cloned()
            .collect();
        for site in &sites {
            if site.conns.get() == 0 {
                // Mail waiting on a rate with no connection (`connections_to_open`)
                // still expires on time.
                for job in self
                    .sched
                    .take_expired_waiting(site, &**self, SystemTime::now())
                {
                    self.expire(job);
                }
            }
            self.ensure_connections(site);
        }
        if publish {
            let mut lines: Vec<String> = limiters.iter().filter_map(|l| l.status(now)).collect();
            self.sched.status(now, &mut lines);
            for site in self.sites.borrow().values() {
                lines.extend(site.window.status(&site.key));
                if site.rcpt_limit.get() != usize::MAX {
                    lines.push(format!(
                        "{} takes at most {} recipients per transaction (its 452 4.5.3)",
                        site.key,
                        site.rcpt_limit.get()
                    ));
                }
            }
            let ready: usize = self.sites.borrow().values().map(|s| s.queued()).sum();
            let waiting = self.sched.waiting();
            if ready + waiting > 0 {
                lines.push(format!(
                    "queue: {ready} recipients ready to send, {waiting} waiting to retry"
                ));
            }
            lines.sort();
            self.status.per_shard.lock().expect("status lock")[self.id] = lines;
            self.publish_metrics(&limiters, ready as u64, waiting as u64, now);
        }
    }

    /// Publishes this shard's counts and state to the metrics board.
    fn publish_metrics(&self, limiters: &[Rc<Limiter>], ready: u64, retry: u64, now: Instant) {
        let mut connections: HashMap<Arc<str>, u64> = HashMap::new();
        let mut windows: HashMap<Arc<str>, usize> = HashMap::new();
        for site in self.sites.borrow().values() {
            *connections.entry(site.provider.clone()).or_default() += site.conns.get() as u64;
            let w = windows.entry(site.provider.clone()).or_insert(usize::MAX);
            *w = (*w).min(site.window.get());
        }
        let (mut keys, mut other) = (Vec::new(), metrics::OtherKeys::default());
        for l in limiters {
            let v = l.view(now);
            match metrics::key_is_named(&v.key) {
                true => keys.push(v),
                false => other.add(&v),
            }
        }
        let spool = self.spool.borrow();
        self.board.publish(
            self.id,
            ShardView {
                tally: self.tally.borrow().clone(),
                ready,
                retry,
                held: self.sched.held.borrow().len() as u64,
                connections: connections.into_iter().collect(),
                windows: windows.into_iter().collect(),
                keys,
                other,
                spool_segments: spool.segment_count() as u64,
                spool_bytes: spool.bytes(),
                busy: self.sched.busy(),
            },
        );
    }

    /// New shaping and bounce rules (see `Reloads`).
    fn reload(self: &Rc<Self>, rules: Arc<Rules>, classifier: Arc<Classifier>) {
        *self.rules.borrow_mut() = rules.clone();
        *self.classifier.borrow_mut() = Remembering::new(classifier);
        let now = Instant::now();
        let sites: Vec<Rc<Site>> = self.sites.borrow().values().cloned().collect();
        for site in &sites {
            let provider = rules.provider_for(site.hosts().iter().map(|h| h.name.as_str()));
            let dest_rule = rules.default.merged(provider.map(|p| &p.rule));
            let mut changes = Vec::new();
            for l in &site.limits {
                let rule = match l.key.strip_prefix("domain:") {
                    Some(d) => rules.domains.get(d).cloned().unwrap_or_default(),
                    None => dest_rule.clone(),
                };
                changes.extend(l.reconfigure(&rule, now));
            }
            for src in &site.sources {
                let rule = rules.source_rule(src.addr.ip, provider);
                changes.extend(src.limit.reconfigure(&rule, now));
            }
            *site.rule.borrow_mut() = rules.effective(&site.domain, provider);
            for c in &changes {
                self.log_change(c);
            }
        }
        eprintln!(
            "volley: shard {}: shaping and bounce rules reloaded",
            self.id
        );
    }

    pub fn next_tx_id(&self) -> u64 {
        let n = self.tx_seq.get();
        self.tx_seq.set(n + 1);
        n
    }

    /// Puts jobs whose connection broke before a reply back at the front of their
    /// queue (or parked run), or defers them once they have been requeued too often.
    pub fn requeue(self: &Rc<Self>, site: &Rc<Site>, jobs: Vec<Job>, why: &str, via: Option<&Via>) {
        let jobs: Vec<Job> = jobs
            .into_iter()
            .filter(|j| !self.purged_on_return(j))
            .collect();
        self.progress
            .requeued
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let reply = Reply::new(451, Some("4.4.2"), why);
        for job in self.sched.requeue(site, jobs) {
            self.outcome(job, &reply, "connect", via, None);
        }
    }

    /// Puts jobs the receiver had no room for (its cap on recipients per transaction
    /// or per session) back at the front of the queue (or parked run), with no
    /// attempt counted. The caller makes sure this cannot loop: it is called after a
    /// transaction that delivered, or from a connection that had delivered and now
    /// closes; a fresh connection's refusal counts an attempt instead.
    pub fn send_again(&self, site: &Site, jobs: Vec<Job>) {
        let jobs = jobs
            .into_iter()
            .filter(|j| !self.purged_on_return(j))
            .collect();
        self.sched.send_again(site, jobs);
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
        let how = Attempt {
            stage,
            via,
            permanent,
            ..Attempt::default()
        };
        self.record(&mut job, reply, how);
    }

    /// The class of a reply that is not a success.
    pub fn classify(&self, reply: &Reply) -> Class {
        self.classifier.borrow().classify(reply).class
    }

    /// Records `reply` for `job`, as `how` came about: the log line, then a Done or
    /// Defer record at the next commit, or a retry. The reply's class, if not a success.
    pub fn record(&self, job: &mut Job, reply: &Reply, how: Attempt) -> Option<Class> {
        let Attempt {
            stage,
            via,
            permanent,
            tx_ms,
            last_attempt,
        } = how;
        self.in_flight.borrow_mut().remove(&job.rref);
        let inst = self.instance(job.instance);
        let expire_at = self.expire_at(job);
        let now_sys = SystemTime::now();
        let queued_ms = now_sys
            .duration_since(self.queued_at(&inst, job.rref))
            .unwrap_or_default()
            .as_millis() as u64;
        job.attempts += 1;
        let class = (!reply.is_positive()).then(|| self.classifier.borrow().classify(reply));
        let decision = retry::decide(
            reply,
            class,
            permanent,
            &self.cfg.retry,
            job.attempts,
            now_sys,
            expire_at,
        );
        let (kind, terminal) = match decision {
            Decision::Delivered => (Kind::Delivery, Some(Terminal::Delivered)),
            Decision::Bounced => (Kind::Bounce, Some(Terminal::Bounced)),
            Decision::Expired => (Kind::Expiration, Some(Terminal::Expired)),
            Decision::Retry(_) => (Kind::TransientFailure, None),
        };
        let Envelope {
            rcpt,
            campaign,
            sender,
        } = self.envelope(&inst, job.rref);
        let text = reply.text.replace('\n', " ");
        let last_attempt = match kind {
            // This reply (the record's own time), unless it reports an earlier one.
            Kind::Expiration => last_attempt.or((stage != "local").then_some(now_sys)),
            _ => None,
        };
        let rec = log::Record {
            last_attempt: last_attempt.map(log::rfc3339),
            kind,
            time: log::rfc3339(now_sys),
            campaign: &campaign,
            rcpt: &rcpt,
            sender: &sender,
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
        };
        self.count(&rec, via);
        self.log.borrow_mut().push(&rec);
        let slot = match terminal {
            Some(Terminal::Delivered) => 0,
            Some(Terminal::Bounced) => 1,
            Some(_) => 2,
            None => 3,
        };
        self.batch.borrow_mut().entry(job.instance).or_default()[slot] += 1;
        match terminal {
            Some(t) => {
                if t == Terminal::Delivered {
                    let _ = self.latency.borrow_mut().record(queued_ms);
                }
                let wants_dsn = match inst.submission {
                    true => campaign != crate::message::dsn::DSN_CAMPAIGN,
                    false => inst.settings.dsn,
                };
                let null_sender = sender.is_empty() || sender == "<>";
                if t != Terminal::Delivered && wants_dsn && !null_sender {
                    // A submitted message's own header goes back with its DSN, so the
                    // sender can tell which message it was (RFC 3462 §2's third part).
                    let spool = self.spool.borrow();
                    let headers = match inst.submission {
                        true => spool
                            .queue_value(job.rref, crate::spool::ingest::SUBMITTED_MESSAGE)
                            .map(crate::message::dsn::header_section),
                        false => None,
                    };
                    let f = crate::message::dsn::Failure {
                        rcpt: &rcpt,
                        return_path: &sender,
                        campaign: &campaign,
                        expired: t == Terminal::Expired,
                        code: reply.code,
                        enhanced: reply.enhanced.as_deref(),
                        reply: &reply.text,
                        arrival: self.queued_at(&inst, job.rref),
                        last_attempt: match t {
                            Terminal::Expired => last_attempt,
                            _ => Some(now_sys),
                        },
                        mta: crate::message::dsn::reporting_name(
                            &self.cfg.ehlo_name,
                            &inst.settings.from_domain,
                        ),
                        original_headers: headers,
                    };
                    let id = format!(
                        "{}.{}.{}.{}",
                        self.id,
                        job.rref.seg,
                        job.rref.off,
                        unix_ms(now_sys)
                    );
                    let m = crate::message::dsn::message(&f, now_sys, &id);
                    drop(spool);
                    self.pending
                        .borrow_mut()
                        .push(Pending::Dsn(sender.clone(), m));
                }
                self.pending.borrow_mut().push(Pending::Done(job.rref, t));
            }
            None => {
                let Decision::Retry(after) = decision else {
                    unreachable!("only a retry is not terminal")
                };
                job.last = Some(Rc::new(LastReply {
                    at_unix_ms: unix_ms(now_sys),
                    code: reply.code,
                    enhanced: reply.enhanced.clone(),
                    text,
                    stage: stage.to_string(),
                }));
                drop(inst);
                // Deferred by the receiver while a purge of it came: the attempt
                // stays logged, and the purge bounces it rather than a retry.
                if !self.purged_on_return(job) {
                    self.schedule_retry(job.clone(), expire_at, after);
                }
            }
        }
        self.commit_when_full();
        class.map(|v| v.class)
    }

    /// Counts the outcome `r` (its accounting record) for the metrics, by the
    /// provider and source of the connection it came over (`via`; without one, the
    /// domain's routing, or `other`); a bounce or expiration is kept for the page.
    pub(super) fn count(&self, r: &log::Record, via: Option<&Via>) {
        let provider = match via {
            Some(v) => Some(v.provider.clone()),
            None => match self.domains.borrow().get(r.domain) {
                Some(DomainState::Routed { sites, .. }) => {
                    sites.first().map(|(_, s)| s.provider.clone())
                }
                _ => None,
            },
        };
        let source = via.and_then(|v| v.source);
        let key = OutcomeKey {
            outcome: match r.kind {
                Kind::Delivery => Outcome::Delivered,
                Kind::Bounce => Outcome::Bounced,
                Kind::Expiration => Outcome::Expired,
                Kind::TransientFailure | Kind::Reception => Outcome::TransientFailure,
            },
            class: r.class.unwrap_or(""),
            provider: provider.unwrap_or_else(|| Arc::from(metrics::OTHER_PROVIDER)),
            source,
        };
        let mut tally = self.tally.borrow_mut();
        tally.outcome(&key, r.tls.is_some(), r.queued_ms as f64 / 1e3);
        if matches!(key.outcome, Outcome::Bounced | Outcome::Expired) {
            tally.bounce(RecentBounce {
                time: r.time.clone(),
                outcome: key.outcome,
                campaign: r.campaign.to_string(),
                rcpt: r.rcpt.to_string(),
                code: r.code,
                enhanced: r.enhanced.map(str::to_string),
                class: key.class,
                reply: r.reply.to_string(),
            });
        }
    }

    /// Counts one finished SMTP transaction of `ms` milliseconds for the metrics.
    pub fn count_transaction(&self, ms: u64) {
        self.tally.borrow_mut().transaction.observe(ms as f64 / 1e3);
    }

    /// Commits when `commit_batch_max` outcomes are waiting.
    fn commit_when_full(&self) {
        if self.pending.borrow().len() >= self.cfg.commit_batch_max {
            if let Err(e) = self.commit(false) {
                // A spool or log that cannot be written: stop rather than deliver unrecorded.
                eprintln!("volley: shard {}: {e:#}; stopping", self.id);
                self.stop.store(true, Ordering::Relaxed);
            }
        }
    }

    /// The recipient at `rref`, with the campaign it counts under and its envelope
    /// sender as the accounting log names them: its instance's, or a submitted
    /// message's own ("<>" for the null sender).
    fn envelope(&self, inst: &Instance, rref: RecordRef) -> Envelope {
        let spool = self.spool.borrow();
        let value = |i| String::from_utf8_lossy(spool.queue_value(rref, i).unwrap_or_default());
        let rcpt = value(inst.email_col).into_owned();
        let (campaign, sender) = match inst.submission {
            true => (
                value(crate::spool::ingest::SUBMITTED_CAMPAIGN).into_owned(),
                match value(crate::spool::ingest::SUBMITTED_SENDER).as_ref() {
                    "" => "<>".to_string(),
                    s => s.to_string(),
                },
            ),
            false => (inst.settings.id.clone(), inst.settings.sender.clone()),
        };
        Envelope {
            rcpt,
            campaign,
            sender,
        }
    }

    /// Defers `job` for `after` (jittered, cut at expiry): the wheel now, its
    /// Defer record at the next commit.
    fn schedule_retry(&self, job: Job, expire_at: SystemTime, after: Duration) {
        let rref = job.rref;
        let record = self
            .sched
            .defer(job, after, fastrand::f64(), expire_at, Now::read());
        self.pending
            .borrow_mut()
            .push(Pending::Deferred(rref, record));
    }

    /// Writes outcomes: log lines first, then Done records (see log.rs for why).
    fn commit(&self, sync: bool) -> anyhow::Result<()> {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        self.log.borrow_mut().flush()?;
        let mut spool = self.spool.borrow_mut();
        self.queue_dsns(&mut spool, &pending)?;
        let mut done = 0;
        for p in &pending {
            match *p {
                Pending::Done(r, t) => {
                    spool.append_done(r, t)?;
                    done += 1;
                }
                Pending::Deferred(r, ref d) => spool.append_defer(r, d)?,
                Pending::Dsn(..) => {}
            }
        }
        if sync {
            spool.sync()?;
            spool.delete_finished()?;
        }
        self.remaining.set(self.remaining.get() - done);
        let p = &self.progress;
        for (no, [d, b, e, t]) in self.batch.borrow_mut().drain() {
            p.delivered.fetch_add(d, Ordering::Relaxed);
            p.bounced.fetch_add(b, Ordering::Relaxed);
            p.expired.fetch_add(e, Ordering::Relaxed);
            p.deferrals.fetch_add(t, Ordering::Relaxed);
            self.instance(no).outcomes.record([d, b, e, t]);
        }
        Ok(())
    }

    /// Appends the batch's DSNs as submitted messages and syncs them, before the
    /// failures' Done records are written (dsn.rs: never a lost DSN).
    fn queue_dsns(&self, spool: &mut Spool, pending: &[Pending]) -> anyhow::Result<()> {
        let dsns = pending.iter().filter_map(|p| match p {
            Pending::Dsn(to, m) => Some((to, m)),
            _ => None,
        });
        let mut jobs = Vec::new();
        let mut scratch = Vec::new();
        let queued_at = unix_ms(SystemTime::now()).to_string();
        for (to, m) in dsns {
            let Some(sub) = self.submission else {
                anyhow::bail!("a DSN to {to} has no submission instance to go in (a volley bug)");
            };
            let q = crate::spool::QueueRecord {
                instance: sub,
                line: 0,
                values: vec![
                    to.as_bytes().to_vec(),
                    Vec::new(),
                    crate::message::dsn::DSN_CAMPAIGN.as_bytes().to_vec(),
                    queued_at.as_bytes().to_vec(),
                    m.clone(),
                ],
            };
            let rref = spool.append_queue(&q, &mut scratch)?;
            jobs.push(new_job(rref, sub, to.as_bytes()));
        }
        if !jobs.is_empty() {
            spool.sync()?;
            self.fresh.borrow_mut().extend(jobs);
        }
        Ok(())
    }

    /// The DKIM signer for campaign instance `instance`, if it signs.
    pub fn signer(&self, instance: u32) -> Option<Rc<Signer>> {
        self.signers.borrow().get(&instance).cloned()
    }

    /// This shard's TLS client settings (shared, so sessions resume per host).
    pub fn tls_config(&self, verify: bool) -> Arc<rustls::ClientConfig> {
        if verify {
            self.tls_verified.clone()
        } else {
            self.tls.clone()
        }
    }

    /// Whether connections should stop taking work and QUIT: the run was stopped,
    /// or this shard has nothing left to send.
    pub fn stop_requested(&self) -> bool {
        self.closing.get() || self.stop.load(Ordering::Relaxed)
    }

    /// Has every connection finish what it has in flight, QUIT and close, waiting
    /// at most `shutdown_grace`; those still open then are dropped with the runtime.
    async fn close_connections(&self) {
        self.closing.set(true);
        let sites: Vec<Rc<Site>> = self.sites.borrow().values().cloned().collect();
        for site in &sites {
            site.idle.wake_all();
        }
        let deadline = Instant::now() + self.cfg.shutdown_grace;
        while sites.iter().any(|s| s.conns.get() > 0) && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Shard {
    /// The MX hosts `domain` may be sent to under its MTA-STS view `sts`, and the
    /// policy its site is under (RFC 8461 §4.1, §5): under enforce only the hosts
    /// its `mx` patterns allow; under testing, or a policy announced but not had
    /// (TLS-RPT on), all of them. Err: none is allowed under enforce, the deferral
    /// every recipient gets (class `policy`: nothing goes in clear or elsewhere),
    /// counted as a `validation-failure` in the domain's TLS report once per lookup.
    fn sts_hosts(
        &self,
        domain: &str,
        hosts: Vec<MxHost>,
        sts: &Sts,
        mx_secure: bool,
    ) -> Result<(Vec<MxHost>, Option<Rc<StsSite>>), Reply> {
        use crate::policy::mta_sts::Mode;
        use crate::policy::tls_rpt::{Applied, Failure, ResultType};
        let reporting = self.tls_rpt.is_some();
        let (held, applied) = match sts {
            Sts::Policy { cached, .. }
                if cached.policy.mode == Mode::Enforce
                    || (cached.policy.mode == Mode::Testing && reporting) =>
            {
                let applied = Applied::sts(&cached.policy);
                (
                    StsHeld::Policy(cached.id.clone(), cached.policy.clone()),
                    applied,
                )
            }
            Sts::Unavailable(no) if no.result.is_some() && reporting => {
                (StsHeld::Unavailable(no.clone()), Applied::sts_unavailable())
            }
            _ => return Ok((hosts, None)),
        };
        let site = Rc::new(StsSite {
            domain: Rc::from(domain),
            held,
            applied,
        });
        let StsHeld::Policy(id, policy) = &site.held else {
            return Ok((hosts, Some(site)));
        };
        if policy.mode == Mode::Testing {
            // Sent as before; each session to a host it does not name is reported.
            return Ok((hosts, Some(site)));
        }
        // A host with DNSSEC-signed, usable TLSA records is DANE's, whatever the
        // policy names (RFC 8461 §2), when the MX records that name it are signed
        // too: a forged MX must not lead past the policy.
        let (allowed, others): (Vec<MxHost>, Vec<MxHost>) = hosts
            .into_iter()
            .partition(|h| policy.allows(&h.name) || (mx_secure && h.dane.authenticates()));
        if !allowed.is_empty() {
            return Ok((allowed, Some(site)));
        }
        let names: Vec<&str> = others.iter().map(|h| h.name.as_str()).collect();
        let why = format!(
            "the MTA-STS policy of {domain} (id {id}, enforce) allows MX {}; none of its MX hosts ({}) matches",
            policy.mx.join(" "),
            names.join(", ")
        );
        if let Some(r) = &self.tls_rpt {
            r.failure(
                domain,
                &site.applied,
                Failure::of(ResultType::ValidationFailure, &why),
            );
        }
        Err(Reply::new(
            451,
            Some("4.7.5"),
            &format!("{why}, so nothing is sent (RFC 8461 §4.1); the domain's MX records or its policy must change"),
        ))
    }

    /// Counts a TLS session over `via` to `site`'s policy domain for its TLS report
    /// (RFC 8460 §4.4), as `StsSite::session` judges `outcome`. Nothing when the
    /// site has no policy or TLS-RPT is off.
    pub fn count_tls_session(&self, site: &Site, via: &Via, outcome: TlsOutcome) {
        let (Some(r), Some(sts)) = (&self.tls_rpt, &site.sts) else {
            return;
        };
        if let Some(outcome) = sts.session(via.mx, outcome) {
            record_session(r, &sts.domain, &sts.applied, via, outcome);
        }
    }

    /// Counts a TLS session over `via` to a host under DANE, whose TLSA records are
    /// `records` (none: they could not be had), for the report of `site`'s domain
    /// (RFC 8460 §4.3, policy type `tlsa`). Nothing when the site does not report
    /// DANE (TLS-RPT off).
    pub fn count_dane_session(
        &self,
        site: &Site,
        via: &Via,
        records: &[crate::deliver::dane::Tlsa],
        outcome: TlsOutcome,
    ) {
        let Some(r) = self.tls_rpt.as_ref().filter(|_| site.dane_reported) else {
            return;
        };
        let records: Vec<String> = records.iter().map(ToString::to_string).collect();
        let applied = crate::policy::tls_rpt::Applied::tlsa(via.mx, &records);
        record_session(r, &site.domain, &applied, via, outcome);
    }

    /// Checks the certificate `conn`'s receiver presented against `host`, as an
    /// enforce policy would have (webpki-roots and `--tls-roots`). Err: why not.
    pub fn check_certificate(
        &self,
        conn: &rustls::ClientConnection,
        host: &str,
    ) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier;
        let certs = conn
            .peer_certificates()
            .filter(|c| !c.is_empty())
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
        })?;
        self.tls_check
            .verify_server_cert(
                &certs[0],
                &certs[1..],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .map(|_| ())
    }
}

impl Campaigns for Shard {
    /// Its instance's expiry, or for a submitted message, its own (the submission
    /// instance lives as long as the spool).
    fn expire_at(&self, job: &Job) -> SystemTime {
        let inst = self.instance(job.instance);
        if !inst.submission {
            return inst.expire_at;
        }
        self.queued_at(&inst, job.rref) + inst.settings.expire_after()
    }

    fn with_id<R>(&self, instance: u32, f: impl FnOnce(&str) -> R) -> R {
        f(&self.instance(instance).settings.id)
    }

    fn rcpts_per_msg(&self, instance: u32) -> usize {
        let inst = self.instance(instance);
        // A submitted message is its own: one per transaction.
        match inst.submission {
            true => 1,
            false => inst.settings.max_rcpt_per_msg as usize,
        }
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

/// Inbox messages handled in one group commit, at most.
const INBOX_BATCH_MAX: usize = 256;

/// Takes new work from the inbox (`serve`) until the shard finishes: each wake-up
/// appends everything waiting, syncs once, and answers (inbox.rs).
async fn inbox_loop(sh: Rc<Shard>, mut rx: tokio::sync::mpsc::Receiver<Inbound>) {
    let mut batch = Vec::new();
    while !sh.finished() {
        // `recv` is cancel-safe: a tick without mail loses nothing.
        match monoio::time::timeout(TICK, rx.recv()).await {
            Ok(Some(m)) => batch.push(m),
            Ok(None) => return,
            Err(_) => continue,
        }
        while batch.len() < INBOX_BATCH_MAX {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        sh.take_in(std::mem::take(&mut batch));
    }
    // Whatever is still waiting is refused, not dropped unanswered.
    rx.close();
    while let Ok(m) = rx.try_recv() {
        if let Inbound::Append { done, .. } = m {
            let _ = done.send(Err("the engine is shutting down".into()));
        }
    }
}

impl Shard {
    /// One group commit of inbox messages: appends every record, syncs once, then
    /// answers each sender and sets the records of running instances going.
    fn take_in(self: &Rc<Self>, batch: Vec<Inbound>) {
        let mut answers = Vec::new();
        let mut taken: Vec<(u32, Vec<Job>)> = Vec::new();
        let mut later = Vec::new();
        let mut spool = self.spool.borrow_mut();
        let mut scratch = Vec::new();
        for m in batch {
            let Inbound::Append {
                instance,
                email_col,
                records,
                done,
            } = m
            else {
                later.push(m);
                continue;
            };
            let mut jobs = Vec::with_capacity(records.len());
            let mut failed = None;
            for q in &records {
                match spool.append_queue(q, &mut scratch) {
                    Ok(rref) => jobs.push(new_job(rref, instance, &q.values[email_col])),
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            match failed {
                None => {
                    answers.push((done, Ok(())));
                    taken.push((instance, jobs));
                }
                Some(e) => {
                    // Nothing half-queued: what went in of this message is abandoned.
                    for j in &jobs {
                        let _ = spool.append_done(j.rref, Terminal::Abandoned);
                    }
                    answers.push((done, Err(e)));
                }
            }
        }
        if let Err(e) = spool.sync() {
            // Not known to be on disk: refused, and never sent.
            let e = e.to_string();
            for (_, jobs) in taken.drain(..) {
                for j in &jobs {
                    let _ = spool.append_done(j.rref, Terminal::Abandoned);
                }
            }
            for a in &mut answers {
                a.1 = Err(e.clone());
            }
        }
        drop(spool);
        for (done, r) in answers {
            let _ = done.send(r);
        }
        for (instance, jobs) in taken {
            if self.instances.borrow().contains_key(&instance) {
                self.start_jobs(jobs);
            } else {
                self.staged
                    .borrow_mut()
                    .entry(instance)
                    .or_default()
                    .extend(jobs);
            }
        }
        for m in later {
            match m {
                Inbound::Activate { instance, dkim } => self.activate(instance, dkim),
                Inbound::Abandon(no) => {
                    let jobs = self.staged.borrow_mut().remove(&no).unwrap_or_default();
                    for j in jobs {
                        self.pending
                            .borrow_mut()
                            .push(Pending::Done(j.rref, Terminal::Abandoned));
                    }
                }
                Inbound::Retire(no) => {
                    // Final on every shard: no job, staged record or uncommitted
                    // outcome refers to it (its outcomes are counted at commit,
                    // which is how the daemon saw it final).
                    self.instances.borrow_mut().remove(&no);
                    self.signers.borrow_mut().remove(&no);
                }
                Inbound::Append { .. } => unreachable!("appended above"),
            }
        }
    }

    /// Runs a newly acknowledged campaign instance: its signer, its own rate, and
    /// the records staged for it.
    fn activate(self: &Rc<Self>, inst: Arc<Instance>, dkim: Option<crate::message::dkim::KeyRef>) {
        let no = inst.no;
        if let Some(k) = dkim {
            match k.load() {
                Ok(signer) => {
                    self.signers.borrow_mut().insert(no, Rc::new(signer));
                }
                Err(e) => {
                    // Checked when it was queued; a key gone since is the operator's
                    // to fix: its mail is held, not sent unsigned.
                    eprintln!(
                        "volley: shard {}: campaign {}: DKIM key: {e}; its mail is held",
                        self.id, inst.settings.id
                    );
                    return;
                }
            }
        }
        self.sched
            .add_job_limits(campaign_limits(std::iter::once(&inst), &self.cfg, self.id));
        self.instances.borrow_mut().insert(no, inst.clone());
        let jobs = self.staged.borrow_mut().remove(&no).unwrap_or_default();
        self.start_jobs(jobs);
        inst.outcomes.shard_started();
    }

    fn start_jobs(self: &Rc<Self>, jobs: Vec<Job>) {
        let n = jobs.len() as u64;
        if let Some(j) = jobs.first() {
            self.instance(j.instance).outcomes.queued(n);
        }
        self.remaining.set(self.remaining.get() + n);
        self.progress.recovered.fetch_add(n, Ordering::Relaxed);
        for job in jobs {
            self.clone().enqueue(job);
        }
    }
}

/// A fresh job for the Queue record at `rref` whose address is `email`.
fn new_job(rref: RecordRef, instance: u32, email: &[u8]) -> Job {
    let at = email.iter().rposition(|&c| c == b'@').map_or(0, |i| i + 1);
    Job {
        rref,
        instance,
        domain: Rc::from(String::from_utf8_lossy(&email[at..]).to_ascii_lowercase()),
        attempts: 0,
        requeues: 0,
        last: None,
    }
}

/// Every 100 ms: due retries, then shaping (commands take effect within a tick).
/// The live status is published once a second.
async fn tick_loop(sh: Rc<Shard>) {
    let mut ticks = 0u64;
    let mut load = ThreadLoad::of_this_thread();
    while !sh.finished() {
        monoio::time::sleep(TICK).await;
        ticks += 1;
        sh.sched.set_busy(load.sample(Instant::now()));
        if sh.stop_requested() {
            for site in sh.sites.borrow().values() {
                site.idle.wake_all();
            }
        }
        sh.shaping_tick(ticks % 10 == 0);
        if ticks % 10 == 0 {
            sh.forget_purges();
        }
        let fresh = std::mem::take(&mut *sh.fresh.borrow_mut());
        sh.start_jobs(fresh);
        let (due, expired) = sh.sched.due(&*sh, Now::read());
        for job in due {
            sh.clone().enqueue(job);
        }
        for job in expired {
            sh.expire(job);
        }
    }
}

/// Each campaign's own `max_msg_rate`, as this shard's share, keyed as the admin
/// socket's `rate campaign:ID` would set it.
fn campaign_limits<'a>(
    instances: impl Iterator<Item = &'a Arc<Instance>>,
    cfg: &EngineConfig,
    id: usize,
) -> HashMap<String, Rc<Limiter>> {
    let now = Instant::now();
    instances
        .filter_map(|inst| {
            let per = shaping::rules::parse_per(inst.settings.max_msg_rate.as_ref()?).ok()?;
            let key = format!("campaign:{}", inst.settings.id);
            let rule = Rule {
                max_msg_rate: Some(Set::cli(per)),
                ..Rule::default()
            };
            let l = Limiter::new(key.clone(), &rule, cfg.shards, id, now);
            Some((key, Rc::new(l)))
        })
        .collect()
}

/// How an outcome came about, besides the reply (see `Shard::record`).
#[derive(Default)]
pub struct Attempt<'a> {
    /// Where the reply came from: dns, connect, mail, rcpt, data, local.
    pub stage: &'static str,
    pub via: Option<&'a Via<'a>>,
    /// Overrides the reply's verdict (DNS answers): Some(true) is permanent.
    pub permanent: Option<bool>,
    /// The SMTP transaction's time, from submitting it to its final reply.
    pub tx_ms: Option<u64>,
    /// An expiration reporting an earlier attempt's reply: when it came.
    pub last_attempt: Option<SystemTime>,
}

/// The static name of a stage read back from a Defer record.
fn stage_named(s: &str) -> &'static str {
    ["dns", "connect", "mail", "rcpt", "data"]
        .into_iter()
        .find(|n| *n == s)
        .unwrap_or("local")
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
