//! What goes when, without IO: a shard's queue per site, the retry wheel, the
//! operator's pauses and rates for domains and campaigns, the connections a site
//! gets, what a connection takes next and when it closes, and the reaction to a
//! throttle or block. Every function is given the time (`Now`) and does no IO, no
//! logging and no spool writes: the shard (shard.rs, connection.rs) reads the clock,
//! does the IO and records outcomes; tests/simulation.rs drives the same functions
//! on a simulated clock over a simulated network.

use crate::deliver::dns::MxHost;
use crate::deliver::pipeline::Window;
use crate::deliver::wheel::Wheel;
use crate::policy::classify::Class;
use crate::policy::retry;
use crate::policy::shaping::rules::{BlockScope, PoolSource, Rule};
use crate::policy::shaping::{self, Change, Claim, Gate, Limiter};
use crate::smtp::client::TlsMode;
use crate::smtp::reply::Reply;
use crate::spool::{Deferral, LastReply, RecordRef};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

/// The shard's clock for retries and shaping: its retry wheel's slot width and the
/// period of its tick (due retries, limiter recoveries, operator commands).
pub const TICK: Duration = Duration::from_millis(100);

/// The time a scheduling step runs at, on both clocks: `at` for waits and pacing,
/// `wall` for what is written down (retry due times, expiry).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub wall: SystemTime,
}

impl Now {
    /// The system's clocks now.
    pub fn read() -> Now {
        Now {
            at: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
    /// The reply of its last attempt, for the Expiration record and its DSN.
    pub last: Option<Rc<LastReply>>,
}

/// What the scheduler needs to know of a recipient's campaign instance: the shard's
/// instances and spool answer it, a simulation its own.
pub trait Campaigns {
    /// When `job` expires: its campaign's maximum age after it was queued.
    fn expire_at(&self, job: &Job) -> SystemTime;
    /// `f` of instance `instance`'s campaign id (the `campaign:ID` of pauses and rates).
    fn with_id<R>(&self, instance: u32, f: impl FnOnce(&str) -> R) -> R;
    /// Recipients per transaction the instance allows (1 for a submitted message).
    fn rcpts_per_msg(&self, instance: u32) -> usize;
}

/// A destination: the MX host set that one or more domains route to, sent to from
/// one source pool (and, for a domain with its own shaping rule, that domain alone).
pub struct Site {
    pub key: String,
    /// The metrics' `provider` label: the provider rule's name, or "other".
    pub provider: Arc<str>,
    /// The MX hosts as last resolved: the names are the key's, the addresses and
    /// DANE's answers are the latest lookup's ([`Site::refresh_hosts`]).
    hosts: RefCell<Rc<[MxHost]>>,
    pub queue: RefCell<VecDeque<Job>>,
    /// Runs of recipients their own domain's or campaign's rate holds back, set
    /// aside so the rest of the queue goes at the destination's rate; served first,
    /// in turn, whenever their rate allows (`Scheduler::take`).
    pub(crate) parked: RefCell<VecDeque<Parked>>,
    pub conns: Cell<usize>,
    /// The domain the site was made for (its rules are looked up by it).
    pub(crate) domain: Rc<str>,
    /// Session settings: default, then provider, then domain rule (replaced on reload).
    pub(crate) rule: RefCell<Rule>,
    /// Destination limiters (provider or MX set, then the domain's own): every
    /// message and connection passes each.
    pub limits: Vec<Rc<Limiter>>,
    /// The pool's source addresses, each with its limiter towards this destination;
    /// empty: the host's default address.
    pub sources: Vec<Source>,
    /// Transactions pipelined per connection; shrinks when the receiver cuts them off.
    pub window: Window,
    /// Connections with nothing to send wait here until the queue has work again.
    pub idle: Idle,
    /// Recipients per transaction the receiver took before answering 452 4.5.3
    /// (usize::MAX until it does): the rest of the site's transactions stay under it.
    pub(crate) rcpt_limit: Cell<usize>,
    /// Connections in a row every host refused for its connection limit.
    pub refusals: Refusals,
    /// The MTA-STS policy of the site's domain, if one is in force (RFC 8461): in
    /// enforce mode TLS is required and the certificate verified (`tls`,
    /// `tls_verify`), whatever the rules say; in either mode the sessions are
    /// counted for TLS-RPT.
    pub sts: Option<Rc<StsSite>>,
    /// The site serves its domain alone so that sessions to its hosts under DANE
    /// count for the domain's TLS report (TLS-RPT on, a host with TLSA records or a
    /// failed DANE lookup).
    pub dane_reported: bool,
    /// What the site's connections showed of a need for more (`connections_to_open`).
    pub demand: Demand,
}

/// A shard this busy, as the share of wall time its thread ran or waited to run
/// (`Scheduler::set_busy`), opens no second or later connection to a site: the
/// same CPU split over more connections carries no more mail, and costs more per
/// message (handshakes, fewer transactions per read and write).
pub const BUSY_RATIO_MAX_FOR_GROWTH: f64 = 0.85;

/// A site's connections on demand, a slow start: on each shard a site with mail
/// gets one connection at once (once some of it may go within half the idle
/// timeout, `Scheduler::connections_to_open`), and more only while they can add
/// throughput:
/// while the open ones' windows are full, the shard has CPU to spare
/// (`BUSY_RATIO_MAX_FOR_GROWTH`) and no rate is the limit (the destination's, or
/// the source's for a connection from it: `Limiter::rate_bound`). They open in
/// steps of a `TICK`, each at most doubling the count; the load is smoothed over
/// two or three ticks, so growth may run a step or two past where it would stop,
/// and a rate counts as the limit at 0.9 of it, so a slow receiver may settle up
/// to a tenth under its rate. A connection that closes (its
/// `max_msgs_per_conn`, a 421) is replaced under the same checks, so a busy
/// shard's sites shrink towards one connection each. A receiver that answers
/// slowly keeps the shard waiting and gets connections up to its cap; a site
/// whose rate is the limit gets those that carry the rate.
#[derive(Default)]
pub struct Demand {
    /// The current growth step: when it began and the connections open then.
    step: Cell<Option<(Instant, usize)>>,
    /// Connections opened in this step.
    opened: Cell<usize>,
}

impl Demand {
    /// Whether one more connection may open at `now`, with `conns` open: the
    /// first always (as far as growth goes: a site with mail is never starved),
    /// the rest at most doubling the count per step.
    fn may_grow(&self, conns: usize, now: Instant) -> bool {
        let base = match self.step.get() {
            Some((began, base)) if now.saturating_duration_since(began) < TICK => base,
            _ => {
                self.step.set(Some((now, conns)));
                self.opened.set(0);
                conns
            }
        };
        conns == 0 || self.opened.get() < base.max(1)
    }

    fn grew(&self) {
        self.opened.set(self.opened.get() + 1);
    }
}

/// The MTA-STS policy a site's sessions are held to (RFC 8461 §5) and reported
/// under (RFC 8460 §4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsSite {
    /// The policy domain: the site's own (a site under a policy serves one domain).
    pub domain: Rc<str>,
    pub held: StsHeld,
    /// The policy as its TLS report names it.
    pub applied: crate::policy::tls_rpt::Applied,
}

/// A TLS session's outcome as a report counts it: Ok when it met the policy, else
/// its result type and reason.
pub type TlsOutcome = Result<(), (crate::policy::tls_rpt::ResultType, String)>;

/// What a domain's MTA-STS record led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StsHeld {
    /// A policy in force (enforce or testing): its record id and the policy.
    Policy(String, crate::policy::mta_sts::Policy),
    /// The record announces a policy that could not be had (none held): sent as
    /// without one, each session reported as this failure (TLS-RPT on only).
    Unavailable(crate::deliver::mta_sts::NoPolicy),
}

impl StsSite {
    /// Whether the policy is in force in enforce mode.
    pub fn enforced(&self) -> bool {
        matches!(&self.held, StsHeld::Policy(_, p) if p.mode == crate::policy::mta_sts::Mode::Enforce)
    }

    /// How a session to `mx` whose TLS came to `outcome` (Ok: met the policy, else
    /// the result type and reason) counts in the domain's report (RFC 8460 §4.3):
    /// under a policy that could not be had, as that failure whatever TLS did (None:
    /// whether there is a policy is not known, so nothing); under a policy, to a
    /// host it does not name (testing sends there), as a `validation-failure`.
    pub fn session(&self, mx: &str, outcome: TlsOutcome) -> Option<TlsOutcome> {
        use crate::policy::tls_rpt::ResultType;
        match &self.held {
            StsHeld::Unavailable(no) => no.result.map(|t| Err((t, no.why.clone()))),
            StsHeld::Policy(_, p) if !p.allows(mx) => Some(Err((
                ResultType::ValidationFailure,
                format!(
                    "{mx} is not one of the policy's MX hosts ({})",
                    p.mx.join(" ")
                ),
            ))),
            StsHeld::Policy(..) => Some(outcome),
        }
    }

    /// What sets its site apart from others on the same MX hosts: the mode and
    /// record id (a new policy makes a new site, so a session is never counted
    /// under the policy before it).
    pub fn key(&self) -> String {
        match &self.held {
            StsHeld::Policy(id, p) => format!("mta-sts {} {id}", p.mode.name()),
            StsHeld::Unavailable(_) => "mta-sts unavailable".into(),
        }
    }
}

/// Recipients of one domain and campaign instance held back by their own rate.
pub(crate) struct Parked {
    pub(crate) domain: Rc<str>,
    pub(crate) instance: u32,
    pub(crate) jobs: VecDeque<Job>,
}

/// A pool's source address and its limiter towards one destination.
pub struct Source {
    pub addr: PoolSource,
    pub limit: Rc<Limiter>,
}

impl Site {
    /// A site `key` for `domain` on `hosts`, with its session `rule`, destination
    /// limiters `limits` (at least one: the first is the destination's), pool
    /// `sources` and a pipelining window of at most `window` transactions. Its
    /// `provider` label is "other" until the caller names one.
    pub fn new(
        key: String,
        domain: Rc<str>,
        hosts: Rc<[MxHost]>,
        rule: Rule,
        limits: Vec<Rc<Limiter>>,
        sources: Vec<Source>,
        window: usize,
    ) -> Site {
        assert!(!limits.is_empty(), "a site has its destination's limiter");
        Site {
            key,
            provider: Arc::from(crate::observe::metrics::OTHER_PROVIDER),
            hosts: RefCell::new(hosts),
            queue: RefCell::new(VecDeque::new()),
            parked: RefCell::new(VecDeque::new()),
            conns: Cell::new(0),
            domain,
            rule: RefCell::new(rule),
            limits,
            sources,
            window: Window::new(window),
            idle: Idle::default(),
            rcpt_limit: Cell::new(usize::MAX),
            refusals: Refusals::default(),
            sts: None,
            dane_reported: false,
            demand: Demand::default(),
        }
    }

    /// The MX hosts, as last resolved.
    pub fn hosts(&self) -> Rc<[MxHost]> {
        self.hosts.borrow().clone()
    }

    /// Takes `hosts`, a later lookup of the site's MX names: new addresses and DANE
    /// answers (a TLSA rollover) apply from the next connection on.
    pub fn refresh_hosts(&self, hosts: &Rc<[MxHost]>) {
        if !Rc::ptr_eq(&self.hosts.borrow(), hosts) {
            *self.hosts.borrow_mut() = hosts.clone();
        }
    }

    pub fn max_msgs_per_conn(&self) -> usize {
        self.rule
            .borrow()
            .max_msgs_per_conn
            .as_ref()
            .map_or(1000, |v| v.value as usize)
    }
    /// Recipients per transaction: the rule's, or fewer once the receiver said so.
    pub fn max_rcpt_per_msg(&self) -> usize {
        self.rule
            .borrow()
            .max_rcpt_per_msg
            .as_ref()
            .map_or(100, |v| v.value as usize)
            .min(self.rcpt_limit.get())
    }
    /// The receiver took only `accepted` (≥ 1) recipients of a transaction before
    /// saying "too many recipients" (RFC 5321 §4.5.3.1.10).
    pub fn learn_rcpt_limit(&self, accepted: usize) {
        assert!(accepted >= 1, "a limit is learned from what was accepted");
        self.rcpt_limit.set(self.rcpt_limit.get().min(accepted));
    }
    pub fn idle_timeout(&self) -> Duration {
        self.rule
            .borrow()
            .idle_timeout
            .as_ref()
            .map_or(Duration::from_secs(5), |v| v.value)
    }
    /// STARTTLS: required under an enforced MTA-STS policy, whatever the rules say
    /// (a reload replaces the rule, never this); else the rule's.
    pub fn tls(&self) -> TlsMode {
        if self.enforced() {
            return TlsMode::Required;
        }
        self.rule
            .borrow()
            .tls
            .as_ref()
            .map_or(TlsMode::Opportunistic, |v| v.value)
    }
    /// Whether an MTA-STS policy in enforce mode holds.
    pub fn enforced(&self) -> bool {
        self.sts.as_ref().is_some_and(|s| s.enforced())
    }
    /// Whether the certificate is verified: always under an enforced MTA-STS policy.
    pub fn tls_verify(&self) -> bool {
        self.enforced()
            || self
                .rule
                .borrow()
                .tls_verify
                .as_ref()
                .is_some_and(|v| v.value)
    }
    /// Recipients waiting to be sent: its queue and its parked runs.
    pub fn queued(&self) -> usize {
        self.queue.borrow().len()
            + self
                .parked
                .borrow()
                .iter()
                .map(|p| p.jobs.len())
                .sum::<usize>()
    }

    /// Takes every recipient waiting to be sent (its queue and parked runs).
    pub fn take_queued(&self) -> Vec<Job> {
        let mut out: Vec<Job> = self.queue.borrow_mut().drain(..).collect();
        for p in self.parked.borrow_mut().drain(..) {
            out.extend(p.jobs);
        }
        out
    }

    /// Takes the waiting recipients `takes` picks, keeping the others in order.
    pub fn take_where(&self, takes: impl Fn(&Job) -> bool) -> Vec<Job> {
        let mut out = Vec::new();
        let mut q = self.queue.borrow_mut();
        let (taken, kept): (VecDeque<Job>, VecDeque<Job>) = q.drain(..).partition(&takes);
        *q = kept;
        out.extend(taken);
        let mut parked = self.parked.borrow_mut();
        for p in parked.iter_mut() {
            let (taken, kept): (VecDeque<Job>, VecDeque<Job>) = p.jobs.drain(..).partition(&takes);
            p.jobs = kept;
            out.extend(taken);
        }
        parked.retain(|p| !p.jobs.is_empty());
        out
    }

    /// Calls `f` with each waiting recipient (its queue, then its parked runs).
    pub fn for_each_queued(&self, mut f: impl FnMut(&Job)) {
        self.queue.borrow().iter().for_each(&mut f);
        for p in self.parked.borrow().iter() {
            p.jobs.iter().for_each(&mut f);
        }
    }

    /// Limiters a message sent from `source` passes.
    pub fn chain(&self, source: Option<usize>) -> Vec<&Limiter> {
        let mut c: Vec<&Limiter> = self.limits.iter().map(|l| &**l).collect();
        if let Some(i) = source {
            c.push(&self.sources[i].limit);
        }
        c
    }
}

/// Connections refused in a row for the receiver's connection limit ("421 too many
/// connections"), and when to try again. Up to CONNECT_REFUSALS_MAX in a row are
/// retried after CONNECT_REFUSAL_BACKOFF, doubling; the next defers the site's queue.
#[derive(Default)]
pub struct Refusals {
    in_a_row: Cell<u32>,
    retry_at: Cell<Option<Instant>>,
}

/// Refusals for a connection limit retried before the site's queue is deferred.
pub const CONNECT_REFUSALS_MAX: u32 = 3;
/// The first wait after such a refusal; each further one doubles it.
pub const CONNECT_REFUSAL_BACKOFF: Duration = Duration::from_millis(500);

impl Refusals {
    /// Counts a refusal at `now`; true (and a time to retry set) while under the
    /// limit, false (and the count reset) when the queue should be deferred instead.
    pub fn again(&self, now: Instant) -> bool {
        let n = self.in_a_row.get() + 1;
        if n > CONNECT_REFUSALS_MAX {
            self.clear();
            return false;
        }
        self.in_a_row.set(n);
        let wait = CONNECT_REFUSAL_BACKOFF * (1 << (n - 1));
        self.retry_at.set(Some(now + wait));
        true
    }

    /// A connection got through.
    pub fn clear(&self) {
        self.in_a_row.set(0);
        self.retry_at.set(None);
    }

    fn waiting(&self, now: Instant) -> bool {
        self.retry_at.get().is_some_and(|t| t > now)
    }
}

/// Where a site's idle connections wait for work. They used to poll the queue every
/// 10 ms: with hundreds of connections that was tens of thousands of wakeups a second
/// while a destination's queue stood empty (waiting on retries, or done).
#[derive(Default)]
pub struct Idle {
    waiting: RefCell<Vec<Waker>>,
    /// Counts wake-ups, so a waiter knows whether one happened since it began.
    wakes: Cell<u64>,
}

impl Idle {
    /// Wakes every waiting connection (called when the queue stops being empty, and
    /// on a stop request so they can quit).
    pub fn wake_all(&self) {
        self.wakes.set(self.wakes.get() + 1);
        for w in self.waiting.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves at the next `wake_all`.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        let seen = self.wakes.get();
        std::future::poll_fn(move |cx| {
            if self.wakes.get() != seen {
                return Poll::Ready(());
            }
            let mut waiting = self.waiting.borrow_mut();
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }

    /// Wake-ups so far (`wait` resolves once this has changed since it began).
    pub fn wakes(&self) -> u64 {
        self.wakes.get()
    }

    /// Puts `job` on `queue`, waking the idle connections if it was empty.
    fn push(&self, queue: &RefCell<VecDeque<Job>>, job: Job, front: bool) {
        let mut q = queue.borrow_mut();
        let was_empty = q.is_empty();
        if front {
            q.push_front(job);
        } else {
            q.push_back(job);
        }
        drop(q);
        if was_empty {
            self.wake_all();
        }
    }
}

/// What a connection takes from its site's queue next (`Scheduler::take`).
pub struct Take {
    /// Recipients at the queue's front past their campaign's maximum age: to be
    /// recorded as expired, never sent.
    pub expired: Vec<Job>,
    pub next: Next,
}

pub enum Next {
    /// One transaction's recipients: one domain, one campaign instance.
    Batch(Vec<Job>),
    /// A limiter holds the next message back until then.
    Paced(Instant),
    /// Nothing to send (an empty queue, or all of it held by a pause).
    Empty,
}

/// What an established connection with nothing in flight does next
/// (`when_idle`).
#[derive(Debug, PartialEq, Eq)]
pub enum IdleStep {
    /// QUIT and close (RFC 5321 §4.1.1.10).
    Quit,
    /// Sleep until then: a limiter paces the next message.
    Sleep(Instant),
    /// Wait for work on the site's queue (`Idle::wait`), at most this long.
    AwaitWork(Duration),
    /// There is work: take it.
    Again,
}

/// What `when_idle` weighs for one connection.
pub struct IdleConn {
    /// Transactions this connection carried, against the site's `max_msgs`.
    pub sent: usize,
    pub max_msgs: usize,
    /// The receiver takes no more recipients on this session.
    pub session_full: bool,
    /// The shard is stopping or has nothing left.
    pub stopping: bool,
    /// A limiter of the connection's chain is over its connection cap (a back-off).
    pub over_cap: bool,
    pub queue_empty: bool,
    /// When a limiter lets the next message go, if one holds it.
    pub paced: Option<Instant>,
    /// Since the connection became idle.
    pub idle_for: Duration,
    pub idle_timeout: Duration,
}

/// An idle connection's next step at `now`: it closes once it has carried its
/// maximum, the session is full, the shard stops, its limiter is over a lowered
/// connection cap, or it has waited `idle_timeout` with nothing it may send.
pub fn when_idle(c: &IdleConn, now: Instant) -> IdleStep {
    let nothing = c.queue_empty || c.paced.is_some();
    if c.sent >= c.max_msgs
        || c.session_full
        || c.stopping
        || c.over_cap
        || (nothing && c.idle_for >= c.idle_timeout)
    {
        return IdleStep::Quit;
    }
    let left = c.idle_timeout.saturating_sub(c.idle_for);
    match c.paced {
        Some(at) => {
            let wait = at.saturating_duration_since(now).min(left);
            IdleStep::Sleep(now + wait.max(Duration::from_millis(1)))
        }
        None if c.queue_empty => IdleStep::AwaitWork(left),
        None => IdleStep::Again,
    }
}

/// A reply's effect on shaping (`Scheduler::react`).
#[derive(Default)]
pub struct Reaction {
    /// A back-off, recovery or suspension to log.
    pub change: Option<Change>,
    /// A throttle back-off every other shard should take too: its limiter's key.
    pub tell_peers: Option<String>,
}

/// A shard's schedule: the retry wheel, the pauses and operator rates of domains and
/// campaigns with the recipients the pauses hold, and its limits on requeues.
pub struct Scheduler {
    /// Deferred recipients until their retry time (or expiry).
    pub(crate) retries: RefCell<Wheel<Job>>,
    /// Paused domains and campaigns (`domain:x`, `campaign:x`).
    paused: RefCell<HashSet<String>>,
    /// Recipients a pause took out of their site's queue.
    pub(crate) held: RefCell<Vec<Job>>,
    /// Operator rates and campaigns' own `max_msg_rate`, by `domain:x` or `campaign:x`.
    job_limits: RefCell<HashMap<String, Rc<Limiter>>>,
    /// Transactions a connection pipelines at most (`--window`).
    window: usize,
    /// Breaks before a reply a recipient is put back for, before one is an attempt.
    requeues_max: u32,
    /// The shard's load (`set_busy`).
    busy: Cell<f64>,
}

impl Scheduler {
    /// A schedule whose wheel starts at `origin`, for connections of `window`
    /// transactions, putting a recipient back up to `requeues_max` times, with the
    /// campaigns' own rates `job_limits`.
    pub fn new(
        origin: Instant,
        window: usize,
        requeues_max: u32,
        job_limits: HashMap<String, Rc<Limiter>>,
    ) -> Scheduler {
        Scheduler {
            retries: RefCell::new(Wheel::new(TICK, origin)),
            paused: RefCell::new(HashSet::new()),
            held: RefCell::new(Vec::new()),
            job_limits: RefCell::new(job_limits),
            window,
            requeues_max,
            busy: Cell::new(0.0),
        }
    }

    /// The shard's load: the share of wall time (0 to 1) its thread ran or waited
    /// to run, lately. At `BUSY_RATIO_MAX_FOR_GROWTH` or over, sites get no
    /// further connections.
    pub fn set_busy(&self, share: f64) {
        self.busy.set(share);
    }

    /// The load last set (`set_busy`).
    pub fn busy(&self) -> f64 {
        self.busy.get()
    }

    /// Puts `job` at the back of `site`'s queue, or of its run if that is parked
    /// (`Site::parked`): it would wait on the same rate there, and in the queue it
    /// would have a connection opened only to set it aside (`connections_to_open`).
    pub fn enqueue(&self, site: &Site, job: Job) {
        if let Some(run) = run_of(&mut site.parked.borrow_mut(), &job) {
            run.jobs.push_back(job);
            return;
        }
        site.idle.push(&site.queue, job, false);
    }

    /// Holds `job` in the retry wheel until `at` (a recovered deferral).
    pub fn hold_until(&self, at: Instant, job: Job) {
        self.retries.borrow_mut().insert(at, job);
    }

    /// Defers `job`: it waits `after`, jittered by `unit` (in [0, 1): ±10%) and cut
    /// short at `expire_at`, in the retry wheel. The Defer record for the spool.
    pub fn defer(
        &self,
        mut job: Job,
        after: Duration,
        unit: f64,
        expire_at: SystemTime,
        now: Now,
    ) -> Deferral {
        let wait = retry::wait_before_retry(retry::jitter_by(after, unit), now.wall, expire_at);
        let record = Deferral {
            attempts: job.attempts,
            due_unix_ms: unix_ms(now.wall + wait),
            last: job.last.clone(),
        };
        job.requeues = 0;
        self.retries.borrow_mut().insert(now.at + wait, job);
        record
    }

    /// The deferred recipients due at `now`: (to queue again, expired). One that
    /// outlived its campaign's maximum age expires without another attempt.
    pub fn due(&self, campaigns: &impl Campaigns, now: Now) -> (Vec<Job>, Vec<Job>) {
        let due = self.retries.borrow_mut().advance(now.at);
        due.into_iter()
            .partition(|j| !retry::is_expired(now.wall, campaigns.expire_at(j)))
    }

    /// Recipients waiting for their retry time.
    pub fn waiting(&self) -> usize {
        self.retries.borrow().len()
    }

    /// What a connection on `site` whose messages pass `chain` sends next at `now`:
    /// up to the site's and the campaign's recipients per message, of one domain and
    /// campaign, not held by a pause. The message is admitted by `chain` and by the
    /// operator's rate for its domain or campaign together, so a limiter that holds it
    /// back spends no other's admission. A run of recipients its own domain's or
    /// campaign's rate holds back is parked beside the queue (`Site::parked`), so a
    /// slow campaign holds back no other to the same destination, and is served
    /// first whenever its rate allows, so it is not starved either. Every recipient
    /// that reaches a front past its campaign's maximum age is returned as expired.
    pub fn take(
        &self,
        site: &Site,
        chain: &[&Limiter],
        campaigns: &impl Campaigns,
        now: Now,
    ) -> Take {
        let mut expired = Vec::new();
        let next = self.next_batch(site, chain, campaigns, now, &mut expired);
        Take { expired, next }
    }

    fn next_batch(
        &self,
        site: &Site,
        chain: &[&Limiter],
        campaigns: &impl Campaigns,
        now: Now,
        expired: &mut Vec<Job>,
    ) -> Next {
        let paused = self.paused.borrow();
        let limits = self.job_limits.borrow();
        let own =
            |domain: &str, instance: u32| own_limits(&paused, &limits, domain, instance, campaigns);
        // The soonest a rate lets a held-back run go.
        let mut earliest: Option<Instant> = None;
        // Parked runs first, in turn: the first its rates let go.
        let mut parked = site.parked.borrow_mut();
        for _ in 0..parked.len() {
            let mut run = parked.pop_front().expect("counted");
            take_expired(&mut run.jobs, campaigns, now.wall, expired);
            let Some(first) = run.jobs.front() else {
                continue;
            };
            let (held, own) = own(&first.domain, first.instance);
            if held {
                self.held.borrow_mut().extend(run.jobs);
                continue;
            }
            if let Some(at) = own.iter().filter_map(|l| l.msg_wait(now.at)).max() {
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
                parked.push_back(run);
                continue;
            }
            let admitting: Vec<&Limiter> = chain
                .iter()
                .copied()
                .chain(own.into_iter().map(|l| &**l))
                .collect();
            if let Some(at) = shaping::admit(&admitting, now.at) {
                parked.push_front(run);
                return Next::Paced(at);
            }
            let jobs = batch(&mut run.jobs, site, campaigns);
            if !run.jobs.is_empty() {
                parked.push_back(run);
            }
            return Next::Batch(jobs);
        }
        let mut q = site.queue.borrow_mut();
        loop {
            take_expired(&mut q, campaigns, now.wall, expired);
            let Some(first) = q.front() else {
                return earliest.map_or(Next::Empty, Next::Paced);
            };
            let (domain, instance) = (first.domain.clone(), first.instance);
            let (held, own) = if paused.is_empty() && limits.is_empty() {
                (false, Vec::new())
            } else {
                own(&domain, instance)
            };
            if held {
                self.held.borrow_mut().push(q.pop_front().expect("front"));
                continue;
            }
            if let Some(at) = own.iter().filter_map(|l| l.msg_wait(now.at)).max() {
                // The run at the front shares these rates: parked whole, beside its
                // earlier ones of the same domain and instance if there are any.
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
                let n = q
                    .iter()
                    .take_while(|j| j.domain == domain && j.instance == instance)
                    .count();
                let run: Vec<Job> = q.drain(..n).collect();
                match parked
                    .iter_mut()
                    .find(|p| p.domain == domain && p.instance == instance)
                {
                    Some(p) => p.jobs.extend(run),
                    None => parked.push_back(Parked {
                        domain,
                        instance,
                        jobs: run.into(),
                    }),
                }
                continue;
            }
            let admitting: Vec<&Limiter> = chain
                .iter()
                .copied()
                .chain(own.into_iter().map(|l| &**l))
                .collect();
            if let Some(at) = shaping::admit(&admitting, now.at) {
                return Next::Paced(at);
            }
            return Next::Batch(batch(&mut q, site, campaigns));
        }
    }

    /// Puts `jobs`, which a broken connection cut off before any reply, back at the
    /// front of `site`'s queue, or of their parked run, without counting an attempt. Those put back more than
    /// `requeues_max` times are returned (their count reset), to be recorded as a
    /// deferral: a receiver that always breaks the connection cannot loop them.
    pub fn requeue(&self, site: &Site, jobs: Vec<Job>) -> Vec<Job> {
        let mut over = Vec::new();
        for mut job in jobs.into_iter().rev() {
            job.requeues += 1;
            if job.requeues > self.requeues_max {
                job.requeues = 0;
                over.push(job);
            } else {
                put_back(site, job);
            }
        }
        over
    }

    /// Puts `jobs` the receiver had no room for (its cap on recipients per
    /// transaction or per session) back at the front of `site`'s queue, or of their
    /// parked run, with no attempt counted. The caller makes sure this cannot loop: it is called after a
    /// transaction that delivered, or from a connection that had delivered and now
    /// closes; a fresh connection's refusal counts an attempt instead.
    pub fn send_again(&self, site: &Site, jobs: Vec<Job>) {
        for job in jobs.into_iter().rev() {
            put_back(site, job);
        }
    }

    /// The connections to open for `site` at `now`, each from the pool source it
    /// names (None: the host's default address): while its queue holds more than its
    /// open connections' windows take and more add throughput (`Demand`), as far as
    /// its limiters allow, and not while a refusal for the receiver's connection
    /// limit is waited out. None while no message may go within half the site's
    /// `idle_timeout` (a slow or spent rate of the destination, the source, or the
    /// parked runs' own domain and campaign): such a connection would only idle
    /// out, and its replacement too. Each comes with a `Claim` on the next message
    /// of the destination's and the source's rates (and of the parked run it is
    /// for), to hold until it sends one, so destinations sharing a rate open as
    /// many as it lets messages go in that time, not one each. Each is counted in
    /// the site and its limiters (`connection_closed` undoes it); `rng` picks
    /// among weighted sources.
    pub fn connections_to_open(
        &self,
        site: &Site,
        campaigns: &impl Campaigns,
        now: Instant,
        rng: &mut fastrand::Rng,
    ) -> Vec<(Option<usize>, Claim)> {
        let mut open = Vec::new();
        if site.refusals.waiting(now) {
            return open;
        }
        let soon = now + site.idle_timeout() / 2;
        loop {
            let conns = site.conns.get();
            // Parked runs wait on their own rate: they need a connection, not more.
            let queued = site.queue.borrow().len() + usize::from(!site.parked.borrow().is_empty());
            if queued == 0 || (conns > 0 && queued <= conns * self.window) {
                return open;
            }
            let busy = conns > 0 && self.busy.get() >= BUSY_RATIO_MAX_FOR_GROWTH;
            if busy || !site.demand.may_grow(conns, now) {
                return open;
            }
            if site
                .limits
                .iter()
                .any(|l| l.connect_gate(now) != Gate::Open)
            {
                return open;
            }
            // The connections open carry the rate: more would only wait on it.
            if conns > 0 && site.limits.iter().any(|l| l.rate_bound(now)) {
                return open;
            }
            if !may_send_by(&site.limits, now, soon) {
                return open;
            }
            let Some(own) = self.run_ready_by(site, campaigns, now, soon) else {
                return open;
            };
            let wanted = |i: usize| {
                let limit = &site.sources[i].limit;
                !(conns > 0 && limit.rate_bound(now)) && may_send_by([limit], now, soon)
            };
            let source = if site.sources.is_empty() {
                None
            } else {
                match pick_source(&site.sources, now, rng, wanted) {
                    Some(i) => Some(i),
                    None => return open,
                }
            };
            let chain = site.chain(source);
            if let Some(full) = chain.iter().position(|l| !l.connected(now)) {
                // Another shard took the last lease of a cap held over all shards.
                for l in &chain[..full] {
                    l.disconnected();
                }
                return open;
            }
            let mut claimed = own;
            claimed.extend(site.limits.iter().cloned());
            claimed.extend(source.map(|i| site.sources[i].limit.clone()));
            site.conns.set(conns + 1);
            site.demand.grew();
            // The message it claims is due within half the idle timeout; a connection
            // not sending it by the whole (a dead host's connect timeout, a tarpit)
            // lets others have it.
            let claim = Claim::on(claimed, now + site.idle_timeout());
            open.push((source, claim));
        }
    }

    /// The own limiters (domain, campaign) of a run of `site`'s recipients that
    /// may go by `soon`, for a new connection to claim: none for a queued one, the
    /// first such parked run's otherwise. None when no run may. A run a pause holds
    /// may, claiming nothing: a connection moves it aside.
    fn run_ready_by(
        &self,
        site: &Site,
        campaigns: &impl Campaigns,
        now: Instant,
        soon: Instant,
    ) -> Option<Vec<Rc<Limiter>>> {
        if !site.queue.borrow().is_empty() {
            return Some(Vec::new());
        }
        let paused = self.paused.borrow();
        let limits = self.job_limits.borrow();
        site.parked.borrow().iter().find_map(|run| {
            let (held, own) = own_limits(&paused, &limits, &run.domain, run.instance, campaigns);
            if held {
                Some(Vec::new())
            } else {
                may_send_by(own.iter().copied(), now, soon)
                    .then(|| own.into_iter().cloned().collect())
            }
        })
    }

    /// Recipients of `site` past their maximum age at the fronts of its queue and
    /// of its parked runs, taken out: those a connection's `take` would expire, for
    /// a site that has none (its mail waits on a rate: `connections_to_open`).
    pub fn take_expired_waiting(
        &self,
        site: &Site,
        campaigns: &impl Campaigns,
        now: SystemTime,
    ) -> Vec<Job> {
        let mut expired = Vec::new();
        take_expired(&mut site.queue.borrow_mut(), campaigns, now, &mut expired);
        let mut parked = site.parked.borrow_mut();
        for run in parked.iter_mut() {
            take_expired(&mut run.jobs, campaigns, now, &mut expired);
        }
        parked.retain(|run| !run.jobs.is_empty());
        expired
    }

    /// A connection from `source` to `site` ended.
    pub fn connection_closed(&self, site: &Site, source: Option<usize>) {
        for l in site.chain(source) {
            l.disconnected();
        }
        site.conns.set(site.conns.get() - 1);
    }

    /// Shaping's view of a reply at `now` over a connection from `source` to
    /// `site`: every reply (`class` None for a success) counts towards a share
    /// threshold; a `throttled` one backs off (with a pool, the source towards this
    /// destination: the receiver's view is of the sending IP), a `blocked` one
    /// suspends (the source when the rule's block scope says so).
    pub fn react(
        &self,
        site: &Site,
        source: Option<usize>,
        class: Option<Class>,
        reply: &Reply,
        now: Instant,
    ) -> Reaction {
        let dest = &site.limits[0];
        let src = source.map(|i| &site.sources[i].limit);
        src.unwrap_or(dest)
            .observe(now, class == Some(Class::Throttled));
        match class {
            Some(Class::Throttled) => {
                let l = src.unwrap_or(dest);
                let change = l.on_throttled(now, &reply.to_string(), false);
                Reaction {
                    tell_peers: change.is_some().then(|| l.key.clone()),
                    change,
                }
            }
            Some(Class::Blocked) => {
                let scope = site.rule.borrow().block_scope.as_ref().map(|s| s.value);
                let l = match (scope, src) {
                    (Some(BlockScope::Source), Some(src)) => src,
                    _ => dest,
                };
                Reaction {
                    change: l.on_blocked(now, &reply.to_string()),
                    tell_peers: None,
                }
            }
            _ => Reaction::default(),
        }
    }

    /// Pauses `key` (`domain:x` or `campaign:x`): its recipients are held as they
    /// reach their queue's front.
    pub fn pause(&self, key: String) {
        self.paused.borrow_mut().insert(key);
    }

    /// Resumes `key`; the held recipients, to be routed again (those of other
    /// pauses are held again).
    pub fn resume(&self, key: &str) -> Vec<Job> {
        self.paused.borrow_mut().remove(key);
        std::mem::take(&mut *self.held.borrow_mut())
    }

    /// Sets the rate limiter of `key` (`domain:x` or `campaign:x`).
    pub fn set_job_limit(&self, key: String, limiter: Limiter) {
        self.job_limits.borrow_mut().insert(key, Rc::new(limiter));
    }

    /// Adds campaigns' own rate limiters (a campaign that starts while running).
    pub fn add_job_limits(&self, limits: HashMap<String, Rc<Limiter>>) {
        self.job_limits.borrow_mut().extend(limits);
    }

    /// Status lines at `now`: operator rates, pauses and what they hold.
    pub fn status(&self, now: Instant, lines: &mut Vec<String>) {
        lines.extend(
            self.job_limits
                .borrow()
                .values()
                .filter_map(|l| l.status(now)),
        );
        for p in self.paused.borrow().iter() {
            lines.push(format!("{p} paused"));
        }
        if !self.held.borrow().is_empty() {
            lines.push(format!(
                "{} recipients held by pauses",
                self.held.borrow().len()
            ));
        }
    }
}

/// Whether `job` has outlived its campaign's maximum age at `now`.
pub fn is_expired(campaigns: &impl Campaigns, job: &Job, now: SystemTime) -> bool {
    retry::is_expired(now, campaigns.expire_at(job))
}

/// Moves the recipients at the front of `q` that are past their campaign's maximum
/// age at `now` to `out`. Every recipient reaches a front before it is sent, and its
/// batch-mates share its instance (and so its age), so the front is enough.
fn take_expired(
    q: &mut VecDeque<Job>,
    campaigns: &impl Campaigns,
    now: SystemTime,
    out: &mut Vec<Job>,
) {
    while q.front().is_some_and(|j| is_expired(campaigns, j, now)) {
        out.push(q.pop_front().expect("front"));
    }
}

/// One transaction's recipients from the front of `q`: its first and those after it
/// of the same domain and instance, up to the campaign's and the site's recipients per
/// message.
fn batch(q: &mut VecDeque<Job>, site: &Site, campaigns: &impl Campaigns) -> Vec<Job> {
    let first = q.pop_front().expect("a front to take");
    let max = campaigns
        .rcpts_per_msg(first.instance)
        .min(site.max_rcpt_per_msg());
    let mut jobs = vec![first];
    while jobs.len() < max {
        match q.front() {
            Some(j) if j.domain == jobs[0].domain && j.instance == jobs[0].instance => {
                jobs.push(q.pop_front().expect("front"))
            }
            _ => break,
        }
    }
    jobs
}

/// Puts `job` back at the front of `site`'s queue, or of its run if that is parked
/// (as `Scheduler::enqueue` does at the back): its place kept, and no connection
/// opened only to set it aside again.
fn put_back(site: &Site, job: Job) {
    if let Some(run) = run_of(&mut site.parked.borrow_mut(), &job) {
        run.jobs.push_front(job);
        return;
    }
    site.idle.push(&site.queue, job, true);
}

/// The parked run `job` belongs to (its domain and instance), if any.
fn run_of<'p>(parked: &'p mut VecDeque<Parked>, job: &Job) -> Option<&'p mut Parked> {
    parked
        .iter_mut()
        .find(|p| p.domain == job.domain && p.instance == job.instance)
}

/// Whether every one of `limits` lets a message no connection was opened for go
/// by `soon` (`Limiter::next_unclaimed`).
fn may_send_by<'l>(
    limits: impl IntoIterator<Item = &'l Rc<Limiter>>,
    now: Instant,
    soon: Instant,
) -> bool {
    limits
        .into_iter()
        .all(|l| l.next_unclaimed(now).is_none_or(|at| at <= soon))
}

/// The limiters of a run's own domain and campaign (`domain:x`, `campaign:x`), and
/// whether a pause holds it.
fn own_limits<'l>(
    paused: &HashSet<String>,
    limits: &'l HashMap<String, Rc<Limiter>>,
    domain: &str,
    instance: u32,
    campaigns: &impl Campaigns,
) -> (bool, Vec<&'l Rc<Limiter>>) {
    let keys = [
        format!("domain:{domain}"),
        campaigns.with_id(instance, |id| format!("campaign:{id}")),
    ];
    let held = keys.iter().any(|k| paused.contains(k));
    let own = keys.iter().filter_map(|k| limits.get(k)).collect();
    (held, own)
}

/// Weighted random choice among the `wanted` sources that may open a connection at
/// `now`.
fn pick_source(
    sources: &[Source],
    now: Instant,
    rng: &mut fastrand::Rng,
    wanted: impl Fn(usize) -> bool,
) -> Option<usize> {
    let open: Vec<(usize, u32)> = sources
        .iter()
        .enumerate()
        .filter(|(i, s)| wanted(*i) && s.limit.connect_gate(now) == Gate::Open)
        .map(|(i, s)| (i, s.addr.weight))
        .collect();
    let total: u32 = open.iter().map(|(_, w)| w).sum();
    if total == 0 {
        return None;
    }
    let mut r = rng.u32(0..total);
    for (i, w) in open {
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::runtime::Driver;

    fn job() -> Job {
        Job {
            rref: RecordRef { seg: 0, off: 0 },
            instance: 0,
            domain: Rc::from("example.test"),
            attempts: 0,
            requeues: 0,
            last: None,
        }
    }

    #[test]
    fn an_idle_connection_waits_until_work_arrives_and_no_longer() {
        crate::deliver::runtime::block_on(Driver::Auto, async {
            let idle = Rc::new(Idle::default());
            let queue = Rc::new(RefCell::new(VecDeque::new()));
            let quiet = monoio::time::timeout(Duration::from_millis(50), idle.wait()).await;
            assert!(quiet.is_err(), "nothing queued: still waiting");
            let waiter = {
                let (idle, queue) = (idle.clone(), queue.clone());
                monoio::spawn(async move {
                    idle.wait().await;
                    queue.borrow().len()
                })
            };
            monoio::time::sleep(Duration::from_millis(20)).await;
            idle.push(&queue, job(), false);
            let seen = monoio::time::timeout(Duration::from_secs(1), waiter).await;
            assert_eq!(seen, Ok(1), "woken by the first job, and it is there");
            // More work on a queue that is not empty wakes nobody: whoever is
            // taking from it is not idle.
            let again = idle.wait();
            idle.push(&queue, job(), true);
            let still = monoio::time::timeout(Duration::from_millis(50), again).await;
            assert!(still.is_err());
        })
        .unwrap();
    }

    /// A shard's schedule and one site with 10,000 recipients queued and `sources`
    /// pool addresses; `rate` is the destination's, or with a pool each source's.
    struct Deep {
        t0: Instant,
        sched: Scheduler,
        site: Site,
        rng: fastrand::Rng,
        /// The connections opened, as `connection::run` holds them.
        open: Vec<(Option<usize>, Claim)>,
    }

    impl Deep {
        fn new(sources: usize, rate: Option<&str>) -> Deep {
            use crate::policy::shaping::rules::{parse_per, Set};
            let t0 = Instant::now();
            let rule = Rule {
                max_msg_rate: rate.map(|r| Set::cli(parse_per(r).unwrap())),
                ..Rule::default()
            };
            let limiter = |key: &str| Rc::new(Limiter::new(key.into(), &rule, 1, 0, t0));
            let destination = if sources == 0 {
                limiter("site:mx")
            } else {
                Rc::new(Limiter::new("site:mx".into(), &Rule::default(), 1, 0, t0))
            };
            let sources = (0..sources)
                .map(|i| Source {
                    addr: PoolSource {
                        ip: std::net::IpAddr::from([127, 0, 0, 2 + i as u8]),
                        ehlo: None,
                        weight: 1,
                    },
                    limit: limiter(&format!("source:{i}")),
                })
                .collect();
            let site = Site::new(
                "|mx".into(),
                Rc::from("example.test"),
                Rc::from(Vec::new()),
                Rule::default(),
                vec![destination],
                sources,
                8,
            );
            site.queue.borrow_mut().extend((0..10_000).map(|_| job()));
            Deep {
                t0,
                sched: Scheduler::new(t0, 8, 3, HashMap::new()),
                site,
                rng: fastrand::Rng::with_seed(1),
                open: Vec::new(),
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        /// The destination's limiter passed a message at each of `times` (ms).
        fn sent(&self, times: impl IntoIterator<Item = u64>) {
            for ms in times {
                self.site.limits[0].take_msg(self.at(ms));
            }
        }

        /// The connections opened `ms` after the start, by source.
        fn open_at(&mut self, ms: u64) -> Vec<Option<usize>> {
            let at = self.at(ms);
            let opened = self
                .sched
                .connections_to_open(&self.site, &ByInstance, at, &mut self.rng);
            let sources = opened.iter().map(|(source, _)| *source).collect();
            self.open.extend(opened);
            sources
        }

        /// Closes the connection opened last, unused: its claims go back.
        fn close_one(&mut self) {
            let (source, _claim) = self.open.pop().expect("a connection open");
            self.sched.connection_closed(&self.site, source);
        }

        /// Closes every connection the site has open.
        fn close_all(&mut self) {
            while !self.open.is_empty() {
                self.close_one();
            }
        }
    }

    /// Instance N is campaign `cN`, which never expires.
    struct ByInstance;

    impl Campaigns for ByInstance {
        fn expire_at(&self, _: &Job) -> SystemTime {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX as u64)
        }
        fn with_id<R>(&self, instance: u32, f: impl FnOnce(&str) -> R) -> R {
            f(&format!("c{instance}"))
        }
        fn rcpts_per_msg(&self, _: u32) -> usize {
            1
        }
    }

    #[test]
    fn no_connection_opens_for_mail_that_cannot_go_before_it_would_idle_out() {
        // One message per 10 s; a connection idles out after 5 s, so it opens at
        // most 2.5 s before the next may go.
        let mut d = Deep::new(0, Some("6/min"));
        assert_eq!(d.open_at(0).len(), 1);
        d.sent([0]);
        d.close_all();
        assert_eq!(d.open_at(100).len(), 0, "the next may go at 10 s");
        assert_eq!(d.open_at(7_400).len(), 0);
        assert_eq!(d.open_at(7_600).len(), 1);
    }

    /// 100 destinations, each with a recipient queued, or parked behind its
    /// campaign's rate when `parked`; `shared` is in every one's chain.
    fn destinations(shared: &Rc<Limiter>, parked: bool, t0: Instant) -> Vec<Site> {
        (0..100)
            .map(|i| {
                let limits = if parked {
                    vec![Rc::new(Limiter::new(
                        format!("site:{i}"),
                        &Rule::default(),
                        1,
                        0,
                        t0,
                    ))]
                } else {
                    vec![shared.clone()]
                };
                let site = Site::new(
                    format!("|mx{i}"),
                    Rc::from("example.test"),
                    Rc::from(Vec::new()),
                    Rule::default(),
                    limits,
                    Vec::new(),
                    8,
                );
                if parked {
                    site.parked.borrow_mut().push_back(Parked {
                        domain: Rc::from(format!("d{i}.test")),
                        instance: 0,
                        jobs: [job()].into(),
                    });
                } else {
                    site.queue.borrow_mut().push_back(job());
                }
                site
            })
            .collect()
    }

    #[test]
    fn destinations_sharing_a_slow_rate_open_connections_for_the_messages_it_passes() {
        use crate::policy::shaping::rules::{parse_per, Set};
        let t0 = Instant::now();
        let rule = Rule {
            max_msg_rate: Some(Set::cli(parse_per("1/s").unwrap())),
            ..Rule::default()
        };
        let mut rng = fastrand::Rng::with_seed(1);
        for parked in [false, true] {
            // A provider's rate in every site's chain, or the campaign's own rate
            // of a run parked at each.
            let shared = Rc::new(Limiter::new("provider:p".into(), &rule, 1, 0, t0));
            let sched = Scheduler::new(t0, 8, 3, HashMap::new());
            if parked {
                sched
                    .job_limits
                    .borrow_mut()
                    .insert("campaign:c0".into(), shared.clone());
            }
            let sites = destinations(&shared, parked, t0);
            // The connections opened, each holding its claims.
            let mut open: Vec<Claim> = Vec::new();
            let opened = |open: &mut Vec<Claim>, ms: u64, rng: &mut fastrand::Rng| -> usize {
                let at = t0 + Duration::from_millis(ms);
                let before = open.len();
                for s in &sites {
                    let new = sched.connections_to_open(s, &ByInstance, at, rng);
                    open.extend(new.into_iter().map(|(_, claim)| claim));
                }
                open.len() - before
            };
            // A connection idles out after 5 s: those opened now are for the messages
            // due within 2.5 s, at 0, 1 and 2 s; not one each.
            assert_eq!(opened(&mut open, 0, &mut rng), 3, "parked: {parked}");
            assert_eq!(opened(&mut open, 100, &mut rng), 0, "parked: {parked}");
            // The first sends its message, and its claim goes: the one at 3 s is
            // within 2.5 s of 600 ms.
            shared.take_msg(t0);
            drop(open.remove(0));
            assert_eq!(opened(&mut open, 600, &mut rng), 1, "parked: {parked}");
            // One closes unused: its message is free for another.
            drop(open.pop());
            assert_eq!(opened(&mut open, 700, &mut rng), 1, "parked: {parked}");
        }
    }

    #[test]
    fn a_source_whose_next_message_is_far_off_gets_no_connection() {
        let mut d = Deep::new(2, Some("6/min"));
        let first = d.open_at(0);
        let spent = first[0].expect("a pool source");
        d.site.sources[spent].limit.take_msg(d.at(0));
        d.close_all();
        assert_eq!(d.open_at(100), [Some(1 - spent)]);
        // While it is open it holds the other source's next message; the one after
        // is 10 s off.
        assert_eq!(d.open_at(200), []);
        // Closed unused, it gives the message back.
        d.close_all();
        assert_eq!(d.open_at(300), [Some(1 - spent)]);
    }

    #[test]
    fn parked_runs_get_a_connection_only_when_their_own_rate_lets_one_go() {
        use crate::policy::shaping::rules::{parse_per, Set};
        let mut d = Deep::new(0, None);
        let rule = Rule {
            max_msg_rate: Some(Set::cli(parse_per("6/min").unwrap())),
            ..Rule::default()
        };
        let campaign = Limiter::new("campaign:c0".into(), &rule, 1, 0, d.t0);
        campaign.take_msg(d.t0);
        d.sched.set_job_limit("campaign:c0".into(), campaign);
        let jobs = d.site.queue.borrow_mut().drain(..).collect();
        d.site.parked.borrow_mut().push_back(Parked {
            domain: Rc::from("example.test"),
            instance: 0,
            jobs,
        });
        assert_eq!(
            d.open_at(100).len(),
            0,
            "the campaign's next may go at 10 s"
        );
        // A recipient of that run (back from a retry, say) joins it, and one cut
        // off by a lost connection goes back to its front.
        d.sched.enqueue(&d.site, job());
        let cut_off = Job {
            attempts: 7,
            ..job()
        };
        assert!(d.sched.requeue(&d.site, vec![cut_off]).is_empty());
        assert!(d.site.queue.borrow().is_empty());
        assert_eq!(d.site.parked.borrow()[0].jobs[0].attempts, 7);
        assert_eq!(d.open_at(150).len(), 0);
        // One of another run may go now.
        let other = Job {
            instance: 1,
            ..job()
        };
        d.sched.enqueue(&d.site, other);
        assert_eq!(d.open_at(200).len(), 1);
        d.site.queue.borrow_mut().clear();
        d.close_all();
        assert_eq!(d.open_at(7_400).len(), 0);
        assert_eq!(d.open_at(7_600).len(), 1);
        d.close_all();
        // Paused, however far off its rate's next: a connection sets it aside.
        d.sched.job_limits.borrow()["campaign:c0"].take_msg(d.at(7_700));
        d.sched.pause("campaign:c0".into());
        assert_eq!(d.open_at(7_800).len(), 1);
        // Claiming nothing of the campaign's: that connection sends none of its
        // messages, and other destinations' runs may have them.
        let limits = d.sched.job_limits.borrow();
        let at = d.at(7_800);
        assert_eq!(
            limits["campaign:c0"].next_unclaimed(at),
            limits["campaign:c0"].msg_wait(at)
        );
    }

    #[test]
    fn connections_grow_in_steps_while_the_windows_are_full() {
        let mut d = Deep::new(0, None);
        assert_eq!(
            d.open_at(0).len(),
            1,
            "a site with mail gets its first at once"
        );
        assert_eq!(d.open_at(50).len(), 0, "and no more within the step");
        // Each step doubles, however deep the queue.
        assert_eq!(d.open_at(100).len(), 1);
        assert_eq!(d.open_at(150).len(), 0);
        assert_eq!(d.open_at(200).len(), 2);
        assert_eq!(d.open_at(300).len(), 4);
        assert_eq!(d.open_at(400).len(), 8);
        assert_eq!(d.site.conns.get(), 16);
        // Until the open windows take what is queued: 16 × 8 = 128.
        d.site.queue.borrow_mut().truncate(130);
        assert_eq!(d.open_at(500).len(), 1);
        assert_eq!(d.open_at(600).len(), 0);
    }

    #[test]
    fn a_busy_shard_opens_no_second_nor_a_replacement() {
        let mut d = Deep::new(0, None);
        d.sched.set_busy(BUSY_RATIO_MAX_FOR_GROWTH);
        assert_eq!(
            d.open_at(0).len(),
            1,
            "a busy shard still opens a site's first"
        );
        assert_eq!(d.open_at(200).len(), 0, "but no second");
        d.sched.set_busy(0.5);
        assert_eq!(d.open_at(300).len(), 1, "CPU to spare: the next step");
        assert_eq!(d.open_at(400).len(), 2);
        d.sched.set_busy(0.9);
        d.close_one();
        assert_eq!(d.open_at(500).len(), 0, "one that closed is not replaced");
        d.close_one();
        d.close_one();
        d.close_one();
        assert_eq!(d.open_at(600).len(), 1, "save the site's only one");
    }

    #[test]
    fn a_site_whose_rate_is_the_limit_opens_no_more() {
        let mut d = Deep::new(0, Some("100/s"));
        assert_eq!(d.open_at(0).len(), 1);
        // The one connection carried 50/s over the last second: the rate is not
        // the limit.
        d.sent((0..=1_000).step_by(20));
        assert_eq!(d.open_at(1_010).len(), 1);
        // Two carried 100/s: it is.
        d.sent((1_010..2_000).step_by(10).chain([2_000]));
        assert_eq!(d.open_at(2_010).len(), 0);
        assert_eq!(d.open_at(2_500).len(), 0);
        // Nothing passed for a second: no longer.
        assert_eq!(d.open_at(3_100).len(), 2);
    }

    #[test]
    fn a_slow_rate_is_the_limit_between_its_messages() {
        let mut d = Deep::new(0, Some("30/min"));
        assert_eq!(d.open_at(0).len(), 1);
        d.sent([0, 2_000, 4_000]);
        // 1.5 s since the last message, of the 2 s between two.
        assert_eq!(d.open_at(5_500).len(), 0);
        // Twice the interval without one: no longer.
        assert_eq!(d.open_at(8_100).len(), 1);
    }

    #[test]
    fn a_rate_is_measured_from_its_first_message() {
        let mut d = Deep::new(0, Some("100/s"));
        assert_eq!(d.open_at(0).len(), 1);
        // The first connection took 400 ms to carry its first message; then it
        // carried the whole rate.
        d.sent((400..500).step_by(10));
        assert_eq!(d.open_at(500).len(), 0, "the rate is the limit");
    }

    #[test]
    fn a_rate_bound_source_holds_its_own_connections_not_the_pools() {
        let mut d = Deep::new(2, Some("100/s"));
        let first = d.open_at(0);
        assert_eq!(first.len(), 1);
        let bound = first[0].expect("a pool source");
        let limiter = d.site.sources[bound].limit.clone();
        let other = Some(1 - bound);
        for ms in [100, 200, 300] {
            // The first source's connection carries its whole rate.
            for sent in (ms - 100..ms).step_by(10) {
                limiter.take_msg(d.at(sent));
            }
            let opened = d.open_at(ms);
            assert!(!opened.is_empty(), "the other source grows at {ms} ms");
            assert!(opened.iter().all(|s| *s == other), "{opened:?} at {ms} ms");
        }
    }

    #[test]
    fn an_idle_connection_quits_sleeps_waits_or_takes_work() {
        let now = Instant::now();
        let idle = |queue_empty, paced, idle_for| IdleConn {
            sent: 3,
            max_msgs: 10,
            session_full: false,
            stopping: false,
            over_cap: false,
            queue_empty,
            paced,
            idle_for: Duration::from_secs(idle_for),
            idle_timeout: Duration::from_secs(5),
        };
        let soon = now + Duration::from_secs(1);
        assert_eq!(
            when_idle(&idle(true, None, 1), now),
            IdleStep::AwaitWork(Duration::from_secs(4))
        );
        assert_eq!(when_idle(&idle(true, None, 5), now), IdleStep::Quit);
        assert_eq!(
            when_idle(&idle(false, Some(soon), 1), now),
            IdleStep::Sleep(soon)
        );
        // A pace beyond the idle time left: it wakes to close, not to send.
        let late = now + Duration::from_secs(60);
        assert_eq!(
            when_idle(&idle(false, Some(late), 2), now),
            IdleStep::Sleep(now + Duration::from_secs(3))
        );
        assert_eq!(when_idle(&idle(false, Some(soon), 5), now), IdleStep::Quit);
        // Work waiting, however long it sat idle (no overflow of the time left).
        assert_eq!(when_idle(&idle(false, None, 1), now), IdleStep::Again);
        assert_eq!(when_idle(&idle(false, None, 9), now), IdleStep::Again);
        for quits in [
            IdleConn {
                sent: 10,
                ..idle(false, None, 0)
            },
            IdleConn {
                session_full: true,
                ..idle(false, None, 0)
            },
            IdleConn {
                stopping: true,
                ..idle(false, None, 0)
            },
            IdleConn {
                over_cap: true,
                ..idle(false, None, 0)
            },
        ] {
            assert_eq!(when_idle(&quits, now), IdleStep::Quit);
        }
    }

    #[test]
    fn a_session_counts_under_its_policy_as_the_report_should_say() {
        use crate::deliver::mta_sts::NoPolicy;
        use crate::policy::mta_sts::{Mode, Policy};
        use crate::policy::tls_rpt::{Applied, ResultType};
        let site = |held| StsSite {
            domain: Rc::from("example.test"),
            held,
            applied: Applied::sts_unavailable(),
        };
        let testing = site(StsHeld::Policy(
            "1".into(),
            Policy {
                mode: Mode::Testing,
                mx: vec!["*.example.test".into()],
                max_age: Duration::from_secs(60),
            },
        ));
        let bad_cert = || Err((ResultType::CertificateExpired, "expired".to_string()));
        assert_eq!(testing.session("mx.example.test", Ok(())), Some(Ok(())));
        assert_eq!(
            testing.session("mx.example.test", bad_cert()),
            Some(bad_cert())
        );
        let elsewhere = testing.session("mx.elsewhere.test", Ok(()));
        assert!(
            matches!(&elsewhere, Some(Err((ResultType::ValidationFailure, why))) if why.contains("mx.elsewhere.test")),
            "{elsewhere:?}"
        );
        let unavailable = site(StsHeld::Unavailable(NoPolicy::invalid("no version")));
        assert_eq!(
            unavailable.session("mx.example.test", Ok(())),
            Some(Err((ResultType::StsPolicyInvalid, "no version".into())))
        );
        let unknown = site(StsHeld::Unavailable(NoPolicy::lookup_failed("SERVFAIL")));
        assert_eq!(unknown.session("mx.example.test", Ok(())), None);
    }

    #[test]
    fn an_enforced_mta_sts_policy_outlasts_any_rule() {
        use crate::policy::shaping::rules::Set;
        let limiter = Rc::new(Limiter::new(
            "site:mx".into(),
            &Rule::default(),
            1,
            0,
            Instant::now(),
        ));
        let rule = Rule {
            tls: Some(Set::cli(TlsMode::Disabled)),
            tls_verify: Some(Set::cli(false)),
            ..Rule::default()
        };
        let mut site = Site::new(
            "|mx".into(),
            Rc::from("example.test"),
            Rc::from(Vec::new()),
            rule.clone(),
            vec![limiter],
            Vec::new(),
            8,
        );
        assert_eq!((site.tls(), site.tls_verify()), (TlsMode::Disabled, false));
        let policy = crate::policy::mta_sts::Policy {
            mode: crate::policy::mta_sts::Mode::Enforce,
            mx: vec!["mx".into()],
            max_age: Duration::from_secs(60),
        };
        site.sts = Some(Rc::new(StsSite {
            domain: Rc::from("example.test"),
            applied: crate::policy::tls_rpt::Applied::sts(&policy),
            held: StsHeld::Policy("1".into(), policy),
        }));
        assert_eq!((site.tls(), site.tls_verify()), (TlsMode::Required, true));
        // A reload (SIGHUP) replaces the rule; the policy still holds.
        *site.rule.borrow_mut() = rule;
        assert_eq!((site.tls(), site.tls_verify()), (TlsMode::Required, true));
    }
}
