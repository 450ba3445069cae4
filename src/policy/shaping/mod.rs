//! Traffic shaping at run time: one `Limiter` per limited key per shard, holding this
//! shard's share of the configured limit (DESIGN.md §2), so what the receiver sees
//! over all shards is what was configured.
//!
//! A key is a destination (`provider:NAME`, or `site:MX,MX` when no provider matches),
//! a domain with its own rule (`domain:NAME`), or one source address towards one
//! destination (`source:IP>provider:NAME`). A message must pass every limiter of its
//! chain; a connection counts against each of them.

pub mod rules;
pub mod warmup;

use crate::observe::metrics::{ceil_secs, KeyView, WarmupView};
use rules::{Per, Rule, Threshold, SHARE_MIN_REPLIES, SHARE_WINDOW_S};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// After a back-off, throttle replies this soon after it are answers to messages
/// already in flight when it happened, not news: they do not back off again.
const BACKOFF_HOLD: Duration = Duration::from_secs(2);
/// Each recovery step after a quiet period raises the rate by this factor, up to
/// `NEAR_CEILING` of the ceiling: the last rate that ran a whole quiet period without
/// a throttle, or the rate the throttle came at if lower. Past that the rate holds,
/// and rises by `PROBE_STEP` only after `PROBE_QUIET` quiet periods: quick back to
/// what worked, slow towards what did not (a receiver's burst allowance hides an
/// overshoot for tens of seconds, so a fast probe overshoots long before a 421).
const RECOVER_STEP: f64 = 1.25;
const NEAR_CEILING: f64 = 0.9;
const PROBE_STEP: f64 = 1.025;
const PROBE_QUIET: u32 = 5;
/// The window over which the sending rate is measured, for backing off an
/// unconfigured destination from the rate it was actually sent at.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// How often a limiter whose warm-up day is spent looks again for the next day.
const WARMUP_SPENT_RECHECK: Duration = Duration::from_secs(60);
/// A limiter whose last `RATE_WINDOW` passed at least this share of its message
/// rate is the limit (`Limiter::rate_bound`): more connections would not carry
/// more.
pub const RATE_BOUND_SHARE: f64 = 0.9;
/// A backed-off rate is never set below this many messages per second per shard.
const MIN_RATE: f64 = 0.01;

/// Generic cell rate algorithm: one theoretical arrival time per key, so the cost is
/// O(1) per message and pacing is smooth (at most `tolerance` of burst).
#[derive(Debug, Clone)]
pub struct Gcra {
    interval: Duration,
    tolerance: Duration,
    tat: Instant,
}

impl Gcra {
    /// `per_sec` events per second; bursts of at most a few milliseconds' worth
    /// (timers are not finer than that), never a whole second's.
    pub fn new(per_sec: f64, now: Instant) -> Gcra {
        Gcra {
            interval: Duration::from_secs_f64(1.0 / per_sec.max(MIN_RATE)),
            tolerance: Duration::from_millis(5),
            tat: now,
        }
    }

    /// None when an event may happen now, else when it may.
    pub fn wait(&self, now: Instant) -> Option<Instant> {
        let allowed_at = self.tat.checked_sub(self.tolerance).unwrap_or(self.tat);
        (allowed_at > now).then_some(allowed_at)
    }

    pub fn take(&mut self, now: Instant) {
        self.tat = self.tat.max(now) + self.interval;
    }

    pub fn per_sec(&self) -> f64 {
        1.0 / self.interval.as_secs_f64()
    }

    /// A new rate, keeping the schedule: the next event is due when it was, or one
    /// new interval from now if that is sooner (a raised rate applies at once).
    fn set_per_sec(&mut self, per_sec: f64, now: Instant) {
        self.interval = Duration::from_secs_f64(1.0 / per_sec.max(MIN_RATE));
        self.tat = self.tat.min(now + self.interval);
    }
}

/// Whether a connection may be opened now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Not before this instant (rate, suspension, pause).
    At(Instant),
    /// At the connection cap: when one closes.
    Full,
}

/// Something that changed a limiter, for the accounting log and the live status.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub event: &'static str,
    pub key: String,
    /// This shard's rate after the change, messages per second (None: unlimited).
    pub rate: Option<f64>,
    /// This shard's connection cap after the change (None: unlimited).
    pub conns: Option<usize>,
    pub reason: String,
}

/// The reactions a rule configures, resolved.
#[derive(Debug, Clone)]
struct Reactions {
    throttle_threshold: Threshold,
    throttle_factor: f64,
    throttle_recover: Duration,
    block_threshold: Per,
    block_suspend: Duration,
}

#[derive(Debug)]
struct State {
    /// Configured share (None: unlimited); a control command may replace it.
    rate: Option<f64>,
    /// `rate` was set by the operator at run time (shown in the status).
    operator_rate: bool,
    conns_cap: usize,
    /// After a throttle: the reduced rate (None: the rate was never measured nor
    /// limited) and connection cap, until recovered.
    backoff: Option<(Option<f64>, usize)>,
    /// See `NEAR_CEILING`.
    ceiling: Option<f64>,
    /// The last rate that ran a quiet period through without a throttle.
    good: Option<f64>,
    /// Connections open when the last back-off came: without a configured cap, what
    /// the back-off's connection cap climbs back to.
    open_at_throttle: usize,
    msg: Option<Gcra>,
    connect: Option<Gcra>,
    conns: usize,
    throttles: VecDeque<Instant>,
    /// (replies, throttle replies) per second over the last `SHARE_WINDOW_S`.
    replies: [(u32, u32); SHARE_WINDOW_S],
    replies_second: u64,
    blocks: VecDeque<Instant>,
    backed_off_at: Option<Instant>,
    last_throttle: Option<Instant>,
    suspended_until: Option<Instant>,
    /// The reply behind the current back-off or suspension, for the status page.
    cause: Option<String>,
    paused: bool,
    win_start: Instant,
    win_count: u32,
    /// When the last message passed (None: none yet), for the rate shown.
    last_msg: Option<Instant>,
    /// Until when each connection opened for a message of this limiter's, that
    /// has not sent it yet, holds its claim (`Claim`).
    claims: Vec<Instant>,
    observed: f64,
    warm: Option<Warm>,
    /// (shards, this shard's id): each day's cap is shared like every limit.
    shard_of: (usize, usize),
}

/// A warm-up schedule's count for this shard.
#[derive(Debug)]
struct Warm {
    schedule: rules::Warmup,
    /// The day `left` counts for (i64::MIN before the first message).
    day: i64,
    /// This shard's messages left on `day`: its share of the day's cap less what
    /// earlier runs sent that day.
    left: u32,
    /// This shard's share of `day`'s cap (u32::MAX once the schedule has run out).
    share: u32,
}

pub struct Limiter {
    pub key: String,
    /// Replaced by `reconfigure` (SIGHUP).
    reactions: RefCell<Reactions>,
    state: RefCell<State>,
    /// Where a warm-up limiter counts what it sends, across runs.
    ledger: Option<Arc<warmup::Ledger>>,
    /// A connection cap smaller than the shard count, held over all shards.
    lease: Option<Arc<Lease>>,
}

/// A connection's claim on the next message of each of its limiters
/// (`Limiter::next_unclaimed`), from its opening until it sends its first message,
/// finds nothing to send, or closes, and at most until a deadline: dropping it
/// gives the claims back, and one past its deadline counts no more, so a
/// connection that failed, or is slow to connect, holds no message from another.
pub struct Claim {
    limiters: Vec<Rc<Limiter>>,
    until: Instant,
}

impl Claim {
    /// Claims the next message of each of `limiters` until `until` (those without
    /// a rate too: a rate set later counts the claim).
    pub fn on(limiters: Vec<Rc<Limiter>>, until: Instant) -> Claim {
        for l in &limiters {
            l.state.borrow_mut().claims.push(until);
        }
        Claim { limiters, until }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        for l in &self.limiters {
            let claims = &mut l.state.borrow_mut().claims;
            if let Some(i) = claims.iter().position(|u| *u == self.until) {
                claims.swap_remove(i);
            }
        }
    }
}

/// Connections to one key open over every shard, for a cap smaller than the shard
/// count: a share per shard would round up to one each (a receiver that allows one
/// connection per client would see one per shard). A shard takes a lease to open a
/// connection and gives it back at close, so the cap passes between shards. One
/// atomic per connection opened or closed, never per message.
#[derive(Debug)]
pub struct Lease {
    cap: usize,
    open: std::sync::atomic::AtomicUsize,
}

/// The leases of one run, by limiter key; every shard's limiter for a key shares one.
#[derive(Debug, Default)]
pub struct Leases(std::sync::Mutex<std::collections::HashMap<String, Arc<Lease>>>);

impl Leases {
    fn get(&self, key: &str, cap: usize) -> Arc<Lease> {
        let mut m = self.0.lock().expect("leases lock");
        m.entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(Lease {
                    cap,
                    open: Default::default(),
                })
            })
            .clone()
    }
}

impl Lease {
    /// Takes one of the cap's connections; false when all are taken.
    fn take(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .is_ok()
    }
    fn give_back(&self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
    fn full(&self) -> bool {
        self.open.load(std::sync::atomic::Ordering::Acquire) >= self.cap
    }
}

/// This shard's share of a limit `total` over `shards`: rates split evenly; integral
/// limits (connections, daily caps) spread so the shares add up, at least 1 each.
pub fn share(total: f64, shards: usize, id: usize, integral: bool) -> f64 {
    let n = shards.max(1) as f64;
    if !integral {
        return total / n;
    }
    let base = (total / n).floor();
    let extra = if (id as f64) < total - base * n {
        1.0
    } else {
        0.0
    };
    (base + extra).max(1.0)
}

/// Shard `id`'s whole share of `total` items over `shards`, the shares adding up to
/// `total` exactly (a day's warm-up cap must not grow by one per shard).
fn exact_share(total: u64, shards: usize, id: usize) -> u64 {
    let n = shards.max(1) as u64;
    total / n + u64::from((id as u64) < total % n)
}

impl Limiter {
    /// A limiter for `key` holding shard `id`'s share of `rule` over `shards`.
    pub fn new(key: String, rule: &Rule, shards: usize, id: usize, now: Instant) -> Limiter {
        let rate = rule
            .max_msg_rate
            .as_ref()
            .map(|r| share(r.value.per_sec(), shards, id, false));
        let conns_cap = rule.max_connections.as_ref().map_or(usize::MAX, |c| {
            share(c.value as f64, shards, id, true) as usize
        });
        let per = |s: &str| rules::parse_per(s).expect("a valid constant");
        let reactions = Reactions {
            throttle_threshold: rule
                .throttle_threshold
                .as_ref()
                .map_or(Threshold::Share(0.01), |s| s.value.clone()),
            throttle_factor: rule.throttle_factor.as_ref().map_or(0.5, |s| s.value),
            throttle_recover: rule
                .throttle_recover
                .as_ref()
                .map_or(Duration::from_secs(60), |s| s.value),
            block_threshold: rule
                .block_threshold
                .as_ref()
                .map_or_else(|| per("3/10min"), |s| s.value.clone()),
            block_suspend: rule
                .block_suspend
                .as_ref()
                .map_or(Duration::from_secs(1800), |s| s.value),
        };
        let connect = rule
            .connect_rate
            .as_ref()
            .map(|r| Gcra::new(share(r.value.per_sec(), shards, id, false), now));
        Limiter {
            key,
            reactions: RefCell::new(reactions),
            state: RefCell::new(State {
                rate,
                operator_rate: false,
                conns_cap,
                backoff: None,
                ceiling: None,
                good: None,
                open_at_throttle: 0,
                msg: rate.map(|r| Gcra::new(r, now)),
                connect,
                conns: 0,
                throttles: VecDeque::new(),
                replies: [(0, 0); SHARE_WINDOW_S],
                replies_second: 0,
                blocks: VecDeque::new(),
                backed_off_at: None,
                last_throttle: None,
                suspended_until: None,
                cause: None,
                paused: false,
                win_start: now,
                win_count: 0,
                last_msg: None,
                claims: Vec::new(),
                observed: 0.0,
                warm: rule.warmup.as_ref().map(|w| Warm {
                    schedule: w.value.clone(),
                    day: i64::MIN,
                    left: 0,
                    share: 0,
                }),
                shard_of: (shards, id),
            }),
            ledger: None,
            lease: None,
        }
    }

    /// Holds `rule`'s connection cap over all shards through `leases` when it is
    /// smaller than the shard count (see `Lease`); otherwise each shard keeps its share.
    pub fn with_leases(mut self, rule: &Rule, leases: &Leases) -> Limiter {
        let s = self.state.get_mut();
        let shards = s.shard_of.0;
        if let Some(total) = rule.max_connections.as_ref().map(|c| c.value as usize) {
            if total < shards {
                s.conns_cap = total;
                self.lease = Some(leases.get(&self.key, total));
            }
        }
        self
    }

    /// Counts a warm-up limiter's messages in `ledger`, and takes off its daily share
    /// what earlier runs sent today.
    pub fn with_ledger(mut self, ledger: &Arc<warmup::Ledger>) -> Limiter {
        if self.state.get_mut().warm.is_some() {
            self.ledger = Some(ledger.clone());
        }
        self
    }

    /// Current connection cap (after any back-off).
    fn cap(s: &State) -> usize {
        s.backoff.map_or(s.conns_cap, |(_, c)| c.min(s.conns_cap))
    }

    /// A pause or suspension holding this key. Only `tick` ends a suspension, so
    /// its end is always logged (at most a tick late).
    fn blocked_until(s: &State, now: Instant) -> Option<Instant> {
        if s.paused {
            return Some(now + Duration::from_millis(100));
        }
        s.suspended_until
            .map(|u| u.max(now + Duration::from_millis(10)))
    }

    pub fn connect_gate(&self, now: Instant) -> Gate {
        let s = self.state.borrow();
        if let Some(u) = Self::blocked_until(&s, now) {
            return Gate::At(u);
        }
        if s.conns >= Self::cap(&s) || self.lease.as_ref().is_some_and(|l| l.full()) {
            return Gate::Full;
        }
        match s.connect.as_ref().and_then(|g| g.wait(now)) {
            Some(at) => Gate::At(at),
            None => Gate::Open,
        }
    }

    /// Counts a connection opened after `connect_gate` said Open. False (and nothing
    /// counted) when another shard took the last lease in between.
    #[must_use]
    pub fn connected(&self, now: Instant) -> bool {
        if self.lease.as_ref().is_some_and(|l| !l.take()) {
            return false;
        }
        let mut s = self.state.borrow_mut();
        s.conns += 1;
        if let Some(g) = s.connect.as_mut() {
            g.take(now);
        }
        true
    }

    pub fn disconnected(&self) {
        let mut s = self.state.borrow_mut();
        if s.conns > 0 {
            if let Some(l) = &self.lease {
                l.give_back();
            }
        }
        s.conns = s.conns.saturating_sub(1);
    }

    /// Whether a connection over the current cap (after a back-off) should close.
    pub fn over_cap(&self) -> bool {
        let s = self.state.borrow();
        s.conns > Self::cap(&s)
    }

    /// None when one message may be sent now; else when to ask again.
    pub fn msg_wait(&self, now: Instant) -> Option<Instant> {
        let mut s = self.state.borrow_mut();
        if let Some(u) = Self::blocked_until(&s, now) {
            return Some(u);
        }
        let (shards, id) = s.shard_of;
        if let Some(w) = s.warm.as_mut() {
            let today = today();
            if w.day != today {
                w.day = today;
                let before = self
                    .ledger
                    .as_ref()
                    .map_or(0, |l| l.sent_before(&self.key, today));
                w.share = w
                    .schedule
                    .cap_on(today)
                    .map_or(u32::MAX, |cap| exact_share(cap as u64, shards, id) as u32);
                w.left = w.schedule.cap_on(today).map_or(u32::MAX, |cap| {
                    exact_share((cap as u64).saturating_sub(before), shards, id) as u32
                });
            }
            if w.left == 0 {
                return Some(now + WARMUP_SPENT_RECHECK);
            }
        }
        s.msg.as_ref().and_then(|g| g.wait(now))
    }

    /// When a connection opened at `now` could send its first message: the
    /// message this limiter lets go after one for each connection that holds a
    /// `Claim` on it, at the current rate. None: at once. Many destinations sharing
    /// a slow rate (a provider's, a campaign's) open connections for the messages
    /// it will pass, not one each to wait on it.
    pub fn next_unclaimed(&self, now: Instant) -> Option<Instant> {
        let wait = self.msg_wait(now);
        let s = self.state.borrow();
        let held = s.claims.iter().filter(|until| **until > now).count() as u32;
        let by_rate = match (s.msg.as_ref(), held) {
            (Some(g), n @ 1..) => Some(wait.unwrap_or(now) + g.interval * n),
            _ => wait,
        };
        // A warm-up day whose messages left are all claimed is as good as spent
        // (and the rate may say later still).
        if s.warm.as_ref().is_some_and(|w| held > 0 && w.left <= held) {
            let spent = now + WARMUP_SPENT_RECHECK;
            return Some(by_rate.map_or(spent, |at| at.max(spent)));
        }
        by_rate
    }

    pub fn take_msg(&self, now: Instant) {
        let mut s = self.state.borrow_mut();
        if let Some(g) = s.msg.as_mut() {
            g.take(now);
        }
        if let Some(w) = s.warm.as_mut() {
            w.left = w.left.saturating_sub(1);
            if let Some(l) = &self.ledger {
                l.add(&self.key, w.day);
            }
        }
        match s.last_msg {
            // The first window begins with the first message, not with the limiter:
            // a destination whose first connection took a while is not measured
            // as slow.
            None => s.win_start = now,
            // So does the first after a quiet spell, and the window the spell cut
            // short goes unmeasured: a pause is not sending slowly, and the last
            // full window's rate stands until this one closes.
            Some(last) if now.duration_since(last) > RATE_WINDOW => {
                s.win_start = now;
                s.win_count = 0;
            }
            Some(_) => {}
        }
        if now.duration_since(s.win_start) >= RATE_WINDOW {
            let secs = now.duration_since(s.win_start).as_secs_f64();
            s.observed = s.win_count as f64 / secs;
            s.win_start = now;
            s.win_count = 0;
        }
        s.win_count += 1;
        s.last_msg = Some(now);
    }

    /// Whether the message rate is what holds traffic back at `now`: a rate is set
    /// and the last `RATE_WINDOW` passed at least `RATE_BOUND_SHARE` of it. A rate
    /// slower than one message a second counts as passing until twice its interval
    /// has gone by without a message.
    pub fn rate_bound(&self, now: Instant) -> bool {
        let s = self.state.borrow();
        let Some(g) = s.msg.as_ref() else {
            return false;
        };
        let quiet = RATE_WINDOW.max(g.interval * 2);
        let idle = s.last_msg.is_none_or(|t| now.duration_since(t) > quiet);
        !idle && Self::measured(&s, now).is_some_and(|m| m >= RATE_BOUND_SHARE * g.per_sec())
    }

    /// Messages per second over the last full window, or the current one so far
    /// (at least 50 ms of it, so a first burst does not read as infinite).
    fn measured(s: &State, now: Instant) -> Option<f64> {
        let current = now.duration_since(s.win_start).as_secs_f64().max(0.05);
        if s.observed > 0.0 {
            Some(s.observed)
        } else if s.win_count > 0 {
            Some(s.win_count as f64 / current)
        } else {
            None
        }
    }

    fn change(&self, s: &State, event: &'static str, reason: String) -> Change {
        Change {
            event,
            key: self.key.clone(),
            rate: s.msg.as_ref().map(Gcra::per_sec),
            conns: Some(Self::cap(s)).filter(|c| *c != usize::MAX),
            reason,
        }
    }

    /// Counts one reply for a share threshold (`"1%"`); call before `on_throttled`.
    pub fn observe(&self, now: Instant, throttled: bool) {
        let mut s = self.state.borrow_mut();
        let second = since_origin_s(now);
        let stale = second
            .saturating_sub(s.replies_second)
            .min(SHARE_WINDOW_S as u64);
        for i in 1..=stale {
            let idx = ((s.replies_second + i) as usize) % SHARE_WINDOW_S;
            s.replies[idx] = (0, 0);
        }
        s.replies_second = second;
        let b = &mut s.replies[(second as usize) % SHARE_WINDOW_S];
        b.0 += 1;
        b.1 += u32::from(throttled);
    }

    /// A `throttled` reply for this key: past the threshold, cut the rate and the
    /// connection cap by the configured factor.
    ///
    /// `peer`: another shard backed off this key. The receiver's limit is usually
    /// per sending IP, shared by every shard, so the shards back off together and
    /// keep equal shares; the threshold was counted where the replies came.
    pub fn on_throttled(&self, now: Instant, reply: &str, peer: bool) -> Option<Change> {
        let r = self.reactions.borrow();
        let mut s = self.state.borrow_mut();
        s.last_throttle = Some(now);
        if s.backed_off_at
            .is_some_and(|t| now.duration_since(t) < BACKOFF_HOLD)
        {
            return None;
        }
        let past = match &r.throttle_threshold {
            Threshold::Count(t) => past_threshold(&mut s.throttles, t, now),
            Threshold::Share(share) => {
                let (total, throttled) = s
                    .replies
                    .iter()
                    .fold((0, 0), |(a, b), (t, x)| (a + t, b + x));
                total >= SHARE_MIN_REPLIES && wilson_lower(throttled, total) >= *share
            }
        };
        if !peer && !past {
            return None;
        }
        s.throttles.clear();
        // Back off from the rate actually sent at when it is known: a limit the
        // sender was not reaching says nothing about what the receiver takes.
        let limit = s.msg.as_ref().map(Gcra::per_sec);
        let sending = match (Self::measured(&s, now), limit) {
            (Some(m), Some(l)) => Some(m.min(l)),
            (m, l) => m.or(l),
        };
        let rate = sending.map(|v| (v * r.throttle_factor).max(MIN_RATE));
        s.good = s.good.filter(|g| sending.is_some_and(|v| *g < v));
        s.ceiling = match (sending, s.good) {
            (Some(v), Some(g)) => Some(v.min(g)),
            (v, _) => v,
        };
        let open = s.conns.min(Self::cap(&s));
        s.open_at_throttle = open;
        let conns = ((open as f64 * r.throttle_factor).floor() as usize).max(1);
        s.backoff = Some((rate, conns));
        if rate.is_some() {
            repace(&mut s.msg, rate, now);
        }
        s.backed_off_at = Some(now);
        s.cause = Some(reply.to_string());
        Some(self.change(&s, "throttled", reply.to_string()))
    }

    /// A `blocked` reply: past the threshold, suspend this key for the configured time.
    pub fn on_blocked(&self, now: Instant, reply: &str) -> Option<Change> {
        let r = self.reactions.borrow();
        let mut s = self.state.borrow_mut();
        if !past_threshold(&mut s.blocks, &r.block_threshold, now) {
            return None;
        }
        s.blocks.clear();
        s.suspended_until = Some(now + r.block_suspend);
        s.cause = Some(reply.to_string());
        Some(self.change(
            &s,
            "suspended",
            format!(
                "for {}: {reply}",
                humantime::format_duration(r.block_suspend)
            ),
        ))
    }

    /// Time passing: a suspension ends; after a quiet period a back-off steps back up.
    pub fn tick(&self, now: Instant) -> Option<Change> {
        let mut s = self.state.borrow_mut();
        if s.suspended_until.is_some_and(|u| u <= now) {
            s.suspended_until = None;
            if s.backoff.is_none() {
                s.cause = None;
            }
            return Some(self.change(&s, "resumed", "suspension over".into()));
        }
        let (rate, conns) = s.backoff?;
        let quiet = self.reactions.borrow().throttle_recover;
        let near = s.ceiling.map(|c| c * NEAR_CEILING);
        let probing = matches!((rate, near), (Some(r), Some(n)) if r >= n * 0.999);
        let wait = if probing { quiet * PROBE_QUIET } else { quiet };
        let since = s.last_throttle.max(s.backed_off_at).unwrap_or(now);
        if now.duration_since(since) < wait {
            return None;
        }
        s.backed_off_at = Some(now);
        s.good = rate.or(s.good);
        let configured = s.rate;
        let up = rate.map(|r| match near {
            Some(near) if !probing => (r * RECOVER_STEP).min(near),
            _ => r * PROBE_STEP,
        });
        let conns = conns
            .saturating_add(1)
            .max((conns as f64 * RECOVER_STEP) as usize);
        let rate_back = match (up, configured) {
            (None, _) => true,
            (Some(u), Some(c)) => u >= c,
            (Some(_), None) => false,
        };
        // Without a configured connection cap the back-off's cap climbs back to what
        // was open when the throttle came, not towards usize::MAX (which kept a
        // recovered destination "backed off" for hundreds of quiet periods, and
        // overflowed).
        let conns_back = match s.conns_cap {
            usize::MAX => conns >= s.open_at_throttle,
            cap => conns >= cap,
        };
        if rate_back && conns_back {
            s.backoff = None;
            if s.suspended_until.is_none() {
                s.cause = None;
            }
            repace(&mut s.msg, configured, now);
            return Some(self.change(&s, "recovered", "back to the configured limits".into()));
        }
        // An unconfigured destination stays paced at the rate that last worked,
        // raised a step at a time: a throttle reply is the only news of its limit.
        let up = match (up, configured) {
            (Some(u), Some(c)) => Some(u.min(c)),
            (u, _) => u,
        };
        s.backoff = Some((up, conns.min(s.conns_cap)));
        if up.is_some() {
            repace(&mut s.msg, up, now);
        }
        Some(self.change(
            &s,
            "ramped",
            format!("quiet for {}", humantime::format_duration(quiet)),
        ))
    }

    pub fn set_paused(&self, paused: bool) -> Change {
        let mut s = self.state.borrow_mut();
        s.paused = paused;
        let ev = if paused { "paused" } else { "unpaused" };
        self.change(&s, ev, "operator".into())
    }

    /// Replaces the configured rate share (operator control); clears a back-off.
    pub fn set_rate(&self, per_sec: Option<f64>, now: Instant) -> Change {
        let mut s = self.state.borrow_mut();
        s.rate = per_sec;
        s.operator_rate = true;
        s.backoff = None;
        s.cause = s.suspended_until.and(s.cause.take());
        repace(&mut s.msg, per_sec, now);
        self.change(&s, "rate", "operator".into())
    }

    /// New rules for this key (SIGHUP): its configured rate, connection cap,
    /// reactions and warm-up schedule are replaced; what it has learnt stays (a
    /// back-off, a suspension, the pacing of the next message, the connections open),
    /// and so does an operator's rate or pause. A lease (a cap below the shard count)
    /// keeps the cap it started with. The change, when there is one.
    pub fn reconfigure(&self, rule: &Rule, now: Instant) -> Option<Change> {
        let (shards, id) = self.state.borrow().shard_of;
        let fresh = Limiter::new(self.key.clone(), rule, shards, id, now);
        *self.reactions.borrow_mut() = fresh.reactions.into_inner();
        let f = fresh.state.into_inner();
        let mut s = self.state.borrow_mut();
        let changed = s.rate != f.rate || (self.lease.is_none() && s.conns_cap != f.conns_cap);
        if !s.operator_rate {
            s.rate = f.rate;
            // Under a back-off its own pacing goes on; it recovers towards the new rate.
            if s.backoff.is_none() {
                repace(&mut s.msg, f.rate, now);
            }
        }
        if self.lease.is_none() {
            s.conns_cap = f.conns_cap;
        }
        s.connect = match (s.connect.take(), f.connect) {
            (Some(mut g), Some(n)) => {
                g.set_per_sec(n.per_sec(), now);
                Some(g)
            }
            (_, n) => n,
        };
        match (&mut s.warm, f.warm) {
            (Some(w), Some(n)) => w.schedule = n.schedule,
            (w, n) => *w = n,
        }
        changed.then(|| self.change(&s, "reconfigured", "shaping rules reloaded".into()))
    }

    /// This shard's state of the key, for metrics and the status page.
    pub fn view(&self, now: Instant) -> KeyView {
        let s = self.state.borrow();
        let pacing = s.msg.as_ref().map(Gcra::per_sec);
        let backoff_factor = match s.backoff {
            None => 1.0,
            Some((r, c)) => {
                let from = s.rate.or(s.ceiling);
                match (r, from) {
                    (Some(r), Some(f)) if f > 0.0 => (r / f).min(1.0),
                    _ => c as f64 / s.conns_cap.max(1) as f64,
                }
            }
        };
        // A key gone idle (paused, no work) keeps its last window's rate until
        // the next message: with nothing passed for a window, it shows 0.
        let idle = s
            .last_msg
            .is_none_or(|t| now.duration_since(t) > RATE_WINDOW);
        let measured = match idle {
            true => Some(0.0),
            false => Self::measured(&s, now),
        };
        KeyView {
            key: self.key.clone(),
            rate: pacing,
            configured_rate: s.rate,
            measured_rate: measured,
            connections: s.conns,
            connections_cap: Some(Self::cap(&s)).filter(|c| *c != usize::MAX),
            backed_off: s.backoff.is_some(),
            backoff_factor,
            suspended_s: s
                .suspended_until
                .filter(|u| *u > now)
                .map_or(0, |u| ceil_secs(u.duration_since(now))),
            paused: s.paused,
            operator_rate: s.operator_rate,
            cause: s.cause.as_deref().map(crate::observe::metrics::shown_reply),
            warmup: s.warm.as_ref().filter(|w| w.day != i64::MIN).map(|w| {
                let day = (w.day - w.schedule.start_day).max(0) as u32 + 1;
                WarmupView {
                    day,
                    days: w.schedule.per_day.len() as u32,
                    cap_today: (w.share != u32::MAX).then_some(w.share),
                    sent_today: w.share.saturating_sub(w.left),
                }
            }),
        }
    }

    /// One line for the live status.
    pub fn status(&self, now: Instant) -> Option<String> {
        let s = self.state.borrow();
        let mut parts = Vec::new();
        if s.paused {
            parts.push("paused".to_string());
        }
        if let Some(u) = s.suspended_until.filter(|u| *u > now) {
            parts.push(format!("suspended {}s", u.duration_since(now).as_secs()));
        }
        if s.operator_rate {
            parts.push(match s.rate {
                Some(r) => format!("rate {r:.1}/s set by operator"),
                None => "unlimited, set by operator".into(),
            });
        }
        if let Some((r, c)) = s.backoff {
            let rate = r.map_or("unmeasured rate".into(), |r| format!("{r:.1}/s"));
            parts.push(format!("backed off to {rate}, {c} conns"));
        }
        (!parts.is_empty()).then(|| format!("{} {}", self.key, parts.join(", ")))
    }
}

/// `volley shaping show`: the merged rule for `domain` routed to `mx`, each value with
/// the layer and line it came from.
pub fn show(
    rules: &rules::Rules,
    domain: &str,
    mx: &[String],
    source: Option<std::net::IpAddr>,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let provider = rules.provider_for(mx.iter().map(String::as_str));
    let _ = writeln!(out, "domain    {domain}");
    let _ = writeln!(out, "mx        {}", mx.join(", "));
    let (key, how) = match provider {
        Some(p) => (
            format!("provider:{}", p.name),
            format!("MX suffix {}", p.suffixes.join(" | ")),
        ),
        None => (
            format!("site:{}", mx.join(",")),
            "no provider's MX suffix matches".into(),
        ),
    };
    let _ = writeln!(out, "budget    {key} ({how})");
    let _ = writeln!(out, "layers    {}", rules.layers.join(" < "));
    let _ = writeln!(out, "\neffective rule (limits are totals over all shards):");
    let rule = rules.effective(domain, provider);
    for (k, v, from) in rule.entries() {
        let _ = writeln!(out, "  {k:<20} {v:<28} {from}");
    }
    if rules.domains.contains_key(domain) {
        let _ = writeln!(
            out,
            "\n{domain} has its own rule: its limits apply on top of {key}'s, not instead."
        );
    }
    if let Some(ip) = source {
        let _ = writeln!(out, "\nsource {ip} towards {key}:");
        for (k, v, from) in rules.source_rule(ip, provider).entries() {
            let _ = writeln!(out, "  {k:<20} {v:<28} {from}");
        }
    }
    out
}

/// Counts an event; true when the threshold's count is reached within its window.
fn past_threshold(events: &mut VecDeque<Instant>, t: &Per, now: Instant) -> bool {
    while events
        .front()
        .is_some_and(|e| now.duration_since(*e) > t.window)
    {
        events.pop_front();
    }
    events.push_back(now);
    events.len() as f64 >= t.count
}

/// The lower bound of the 95% Wilson interval for a share `x` of `n`: "at least this
/// share, beyond reasonable doubt". Three throttles in twenty replies is noise at a 15%
/// threshold; three hundred in two thousand is not.
fn wilson_lower(x: u32, n: u32) -> f64 {
    const Z: f64 = 1.96;
    let (x, n) = (x as f64, n as f64);
    let p = x / n;
    let z2 = Z * Z;
    (p + z2 / (2.0 * n) - Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt()) / (1.0 + z2 / n)
}

/// Whole seconds on a process-wide monotonic clock.
fn since_origin_s(now: Instant) -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    now.saturating_duration_since(*ORIGIN.get_or_init(Instant::now))
        .as_secs()
}

fn today() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| (d.as_secs() / 86_400) as i64)
}

/// Paces `msg` at `rate` from `now` on (None: unpaced), keeping its schedule: the
/// next message is due when it was, or one new interval from now if that is sooner.
/// A fresh GCRA instead would let one go at once, right after one the old rate had
/// just let through (the simulation found a second back-off passing more than
/// either rate allows).
fn repace(msg: &mut Option<Gcra>, rate: Option<f64>, now: Instant) {
    *msg = match (msg.take(), rate) {
        (Some(mut g), Some(r)) => {
            g.set_per_sec(r, now);
            Some(g)
        }
        (None, Some(r)) => Some(Gcra::new(r, now)),
        (_, None) => None,
    };
}

/// Whether every limiter of `chain` lets a message go now; if so, counts it in each.
pub fn admit(chain: &[&Limiter], now: Instant) -> Option<Instant> {
    let wait = chain.iter().filter_map(|l| l.msg_wait(now)).max();
    if wait.is_none() {
        for l in chain {
            l.take_msg(now);
        }
    }
    wait
}

#[cfg(test)]
mod tests {
    use super::*;
    use rules::Set;

    fn rule(rate: &str, conns: u32) -> Rule {
        Rule {
            max_msg_rate: Some(Set::cli(rules::parse_per(rate).unwrap())),
            max_connections: Some(Set::cli(conns)),
            throttle_threshold: Some(Set::cli(Threshold::Count(
                rules::parse_per("2/1min").unwrap(),
            ))),
            throttle_recover: Some(Set::cli(Duration::from_secs(10))),
            ..Rule::default()
        }
    }

    #[test]
    fn a_share_threshold_ignores_small_samples_and_noise() {
        assert!(wilson_lower(3, 20) < 0.15, "3 of 20 is not proof of 15%");
        assert!(wilson_lower(50, 1000) < 0.06, "5% noise stays under 6%");
        assert!(wilson_lower(9, 10) > 0.5, "a limit being hit shows at once");
        assert!(wilson_lower(300, 1000) > 0.25);
    }

    #[test]
    fn shares_add_up_to_the_limit() {
        let total: f64 = (0..3).map(|i| share(10.0, 3, i, true)).sum();
        assert_eq!(total, 10.0);
        assert_eq!(share(1.0, 4, 3, true), 1.0, "at least one each");
        assert_eq!(share(100.0, 4, 0, false), 25.0);
    }

    #[test]
    fn gcra_paces_evenly_without_a_start_of_second_burst() {
        let t0 = Instant::now();
        let mut g = Gcra::new(100.0, t0);
        let mut now = t0;
        let mut sent = 0;
        // Simulate a sender asking every 100 µs for one second.
        while now < t0 + Duration::from_secs(1) {
            if g.wait(now).is_none() {
                g.take(now);
                sent += 1;
            }
            now += Duration::from_micros(100);
        }
        assert!((100..=102).contains(&sent), "{sent}");
        // In the first 100 ms: about 10, not a second's worth.
        let mut g = Gcra::new(100.0, t0);
        let mut first = 0;
        let mut now = t0;
        while now < t0 + Duration::from_millis(100) {
            if g.wait(now).is_none() {
                g.take(now);
                first += 1;
            }
            now += Duration::from_micros(100);
        }
        assert!((10..=12).contains(&first), "{first}");
    }

    /// Found by the simulation: with a rate and no connection cap, a back-off
    /// recovers once the rate is back (it used to climb the connection count towards
    /// usize::MAX first, and overflowed).
    #[test]
    fn without_a_connection_cap_the_rate_decides_recovery() {
        let t0 = Instant::now();
        let rule = Rule {
            max_msg_rate: Some(Set::cli(rules::parse_per("10/s").unwrap())),
            throttle_threshold: Some(Set::cli(Threshold::Count(
                rules::parse_per("1/1min").unwrap(),
            ))),
            throttle_recover: Some(Set::cli(Duration::from_secs(10))),
            ..Rule::default()
        };
        let l = Limiter::new("provider:x".into(), &rule, 1, 0, t0);
        let c = l
            .on_throttled(t0, "421 4.7.28", false)
            .expect("past 1/1min");
        assert_eq!(c.event, "throttled");
        let mut now = t0;
        let mut events = Vec::new();
        for _ in 0..100 {
            now += Duration::from_secs(11);
            if let Some(c) = l.tick(now) {
                events.push(c.event);
                if c.event == "recovered" {
                    break;
                }
            }
        }
        assert_eq!(events.last(), Some(&"recovered"), "{events:?}");
        assert!(
            events.len() < 10,
            "{} quiet periods to recover",
            events.len()
        );
        assert!(!l.view(now).backed_off);

        // No rate either: 8 open at the throttle, cut to 4; the cap climbs back to 8
        // a step per quiet period, not to unlimited at the first one.
        let rule = Rule {
            max_msg_rate: None,
            ..rule
        };
        let l = Limiter::new("provider:y".into(), &rule, 1, 0, t0);
        for _ in 0..8 {
            assert!(l.connected(t0));
        }
        let c = l
            .on_throttled(t0, "421 4.7.28", false)
            .expect("past 1/1min");
        assert_eq!(c.conns, Some(4));
        let mut now = t0;
        let mut caps = Vec::new();
        for _ in 0..100 {
            now += Duration::from_secs(11);
            if let Some(c) = l.tick(now) {
                caps.push((c.event, c.conns));
                if c.event == "recovered" {
                    break;
                }
            }
        }
        assert_eq!(caps.first(), Some(&("ramped", Some(5))), "{caps:?}");
        assert_eq!(caps.last().map(|c| c.0), Some("recovered"), "{caps:?}");
        assert!(caps.len() <= 5, "{caps:?}");
    }

    #[test]
    fn throttle_halves_then_recovers_after_quiet() {
        let t0 = Instant::now();
        let l = Limiter::new("provider:x".into(), &rule("100/s", 8), 1, 0, t0);
        for _ in 0..8 {
            assert!(l.connected(t0));
        }
        assert!(
            l.on_throttled(t0, "421", false).is_none(),
            "below the threshold"
        );
        let c = l
            .on_throttled(t0, "421", false)
            .expect("second one crosses 2/1min");
        assert_eq!((c.event, c.conns), ("throttled", Some(4)));
        assert!((c.rate.unwrap() - 50.0).abs() < 0.01, "{c:?}");
        assert!(l.over_cap(), "8 open, cap now 4");
        let v = l.view(t0);
        assert!(
            v.backed_off && (v.backoff_factor - 0.5).abs() < 1e-9,
            "{v:?}"
        );
        assert_eq!((v.connections, v.connections_cap), (8, Some(4)));
        assert_eq!(v.cause.as_deref(), Some("421"), "the reply behind it shows");
        // Replies to messages already in flight do not halve again.
        assert!(l
            .on_throttled(t0 + Duration::from_secs(1), "421", false)
            .is_none());
        assert!(l
            .on_throttled(t0 + Duration::from_secs(1), "421", false)
            .is_none());
        assert!(
            l.tick(t0 + Duration::from_secs(5)).is_none(),
            "not quiet long enough"
        );
        // Quickly back to 90% of where the throttle came (three 10 s steps), then
        // up in small steps five quiet periods apart.
        let mut rates = Vec::new();
        let mut now = t0;
        for _ in 0..60 {
            now += Duration::from_secs(11);
            if let Some(c) = l.tick(now) {
                rates.push((now.duration_since(t0).as_secs(), c.rate.unwrap().round()));
                if c.event == "recovered" {
                    break;
                }
                assert_eq!(c.event, "ramped");
            }
        }
        assert_eq!(&rates[..3], &[(11, 63.0), (22, 78.0), (33, 90.0)]);
        assert_eq!(rates[3].0, 33 + 55, "{rates:?}");
        assert_eq!(rates.last().unwrap().1, 100.0, "{rates:?}");
        let v = l.view(now);
        assert!(
            !v.backed_off && v.backoff_factor == 1.0 && v.cause.is_none(),
            "{v:?}"
        );
    }

    #[test]
    fn blocked_suspends_for_the_configured_time() {
        let t0 = Instant::now();
        let mut r = rule("100/s", 4);
        r.block_threshold = Some(Set::cli(rules::parse_per("1/1min").unwrap()));
        r.block_suspend = Some(Set::cli(Duration::from_secs(30)));
        let l = Limiter::new("provider:x".into(), &r, 1, 0, t0);
        assert_eq!(l.on_blocked(t0, "554 blocked").unwrap().event, "suspended");
        let v = l.view(t0 + Duration::from_millis(500));
        assert_eq!(
            (v.suspended_s, v.cause.as_deref()),
            (30, Some("554 blocked"))
        );
        assert_eq!(l.connect_gate(t0), Gate::At(t0 + Duration::from_secs(30)));
        assert!(l.msg_wait(t0).is_some());
        assert_eq!(
            l.tick(t0 + Duration::from_secs(31)).unwrap().event,
            "resumed"
        );
        assert_eq!(l.connect_gate(t0 + Duration::from_secs(31)), Gate::Open);
        let v = l.view(t0 + Duration::from_secs(31));
        assert_eq!((v.suspended_s, v.cause), (0, None));
    }

    #[test]
    fn each_claim_puts_a_new_connections_message_an_interval_later() {
        let t0 = Instant::now();
        let l = Rc::new(Limiter::new(
            "provider:p".into(),
            &rule("1/min", 100),
            1,
            0,
            t0,
        ));
        assert_eq!(l.next_unclaimed(t0), None);
        let first = Claim::on(vec![l.clone()], t0 + Duration::from_secs(300));
        let _second = Claim::on(vec![l.clone()], t0 + Duration::from_secs(300));
        assert_eq!(l.next_unclaimed(t0), Some(t0 + Duration::from_secs(120)));
        // The first sends its message: the second's is the rate's next, and a new
        // connection's the one after.
        l.take_msg(t0);
        drop(first);
        let next = l.msg_wait(t0).expect("paced");
        assert_eq!(l.next_unclaimed(t0), Some(next + Duration::from_secs(60)));
        // Claims count intervals of the current rate: an operator's faster one
        // frees their messages sooner.
        let later = t0 + Duration::from_secs(1);
        l.set_rate(Some(1.0), later);
        let next = l.msg_wait(later).expect("paced");
        assert!(next <= later + Duration::from_secs(1));
        assert_eq!(l.next_unclaimed(later), Some(next + Duration::from_secs(1)));
        // A claim past its deadline counts no more.
        let _slow = Claim::on(vec![l.clone()], later + Duration::from_secs(1));
        let much_later = later + Duration::from_secs(2);
        let next = l.msg_wait(much_later);
        assert_eq!(
            l.next_unclaimed(much_later),
            Some(next.unwrap_or(much_later) + Duration::from_secs(1))
        );
        // A limiter without a rate: no wait, claims or not.
        let free = Rc::new(Limiter::new("site:mx".into(), &Rule::default(), 1, 0, t0));
        let _claim = Claim::on(vec![free.clone()], t0 + Duration::from_secs(300));
        assert_eq!(free.next_unclaimed(t0), None);
    }

    #[test]
    fn a_quiet_spell_is_not_measured_as_sending_slowly() {
        let t0 = Instant::now();
        let l = Limiter::new("site:mx".into(), &Rule::default(), 1, 0, t0);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for ms in (0..=1_000).step_by(10) {
            l.take_msg(at(ms));
        }
        // Five quiet seconds, then one message: what it was sending at stands.
        l.take_msg(at(6_000));
        let rate = l.view(at(6_010)).measured_rate.expect("measured");
        assert!((99.0..=101.0).contains(&rate), "{rate}/s");
    }

    #[test]
    fn a_warm_up_days_last_messages_once_claimed_open_no_more_connections() {
        let t0 = Instant::now();
        let r = Rule {
            warmup: Some(Set::cli(rules::Warmup {
                start_day: today(),
                per_day: vec![2],
            })),
            ..Rule::default()
        };
        let l = Rc::new(Limiter::new("source:a>provider:x".into(), &r, 1, 0, t0));
        let until = t0 + Duration::from_secs(5);
        let first = Claim::on(vec![l.clone()], until);
        assert_eq!(
            l.next_unclaimed(t0),
            None,
            "one of the day's two is unclaimed"
        );
        let _second = Claim::on(vec![l.clone()], until);
        assert!(l.next_unclaimed(t0).is_some(), "both are claimed");
        drop(first);
        assert_eq!(l.next_unclaimed(t0), None);
        // With a rate slower than the day's recheck, the rate's answer stands.
        let slow = Rule {
            max_msg_rate: Some(Set::cli(rules::parse_per("50/h").unwrap())),
            ..r
        };
        let l = Rc::new(Limiter::new("source:b>provider:x".into(), &slow, 1, 0, t0));
        let _both = [
            Claim::on(vec![l.clone()], until),
            Claim::on(vec![l.clone()], until),
        ];
        // 72 s apart: the two claims put a third connection's message 144 s off.
        assert!(l.next_unclaimed(t0) >= Some(t0 + Duration::from_secs(140)));
    }

    #[test]
    fn warmup_caps_a_day_per_shard_share() {
        let t0 = Instant::now();
        let r = Rule {
            warmup: Some(Set::cli(rules::Warmup {
                start_day: today(),
                per_day: vec![10, 1000],
            })),
            ..Rule::default()
        };
        // Two shards: this one may send half of day 1's 10.
        let l = Limiter::new("source:a>provider:x".into(), &r, 2, 0, t0);
        let mut sent = 0;
        while admit(&[&l], t0).is_none() {
            sent += 1;
            assert!(sent <= 5, "past the day's share");
        }
        assert_eq!(sent, 5);
    }

    #[test]
    fn a_connection_cap_below_the_shard_count_passes_between_shards() {
        let t0 = Instant::now();
        let r = rule("1000/s", 1);
        let leases = Leases::default();
        let a = Limiter::new("site:mx".into(), &r, 2, 0, t0).with_leases(&r, &leases);
        let b = Limiter::new("site:mx".into(), &r, 2, 1, t0).with_leases(&r, &leases);
        assert!(a.connected(t0));
        assert_eq!(
            b.connect_gate(t0),
            Gate::Full,
            "one connection over both shards"
        );
        assert!(!b.connected(t0), "the lease is taken even past the gate");
        a.disconnected();
        assert_eq!(b.connect_gate(t0), Gate::Open);
        assert!(b.connected(t0));
        assert_eq!(a.connect_gate(t0), Gate::Full);
        // A cap of at least the shard count is split into shares, with no lease.
        let r4 = rule("1000/s", 4);
        let c = Limiter::new("site:other".into(), &r4, 2, 0, t0).with_leases(&r4, &leases);
        assert!(c.connected(t0) && c.connected(t0));
        assert_eq!(c.connect_gate(t0), Gate::Full, "its share is 2 of 4");
    }

    #[test]
    fn connect_rate_and_connection_cap_gate_new_connections() {
        let t0 = Instant::now();
        let mut r = rule("1000/s", 2);
        r.connect_rate = Some(Set::cli(rules::parse_per("1/s").unwrap()));
        let l = Limiter::new("provider:x".into(), &r, 1, 0, t0);
        assert_eq!(l.connect_gate(t0), Gate::Open);
        assert!(l.connected(t0));
        assert!(matches!(l.connect_gate(t0), Gate::At(at) if at > t0 + Duration::from_millis(900)));
        let t1 = t0 + Duration::from_secs(1);
        assert!(l.connected(t1));
        assert_eq!(l.connect_gate(t1 + Duration::from_secs(5)), Gate::Full);
        l.disconnected();
        assert_eq!(l.connect_gate(t1 + Duration::from_secs(5)), Gate::Open);
    }

    #[test]
    fn a_chain_admits_only_when_every_limiter_does() {
        let t0 = Instant::now();
        let fast = Limiter::new("a".into(), &rule("1000/s", 4), 1, 0, t0);
        let slow = Limiter::new("b".into(), &rule("1/s", 4), 1, 0, t0);
        assert!(admit(&[&fast, &slow], t0).is_none());
        let at = admit(&[&fast, &slow], t0).expect("the slow one holds it");
        assert!(at > t0 + Duration::from_millis(900));
        slow.set_paused(true);
        assert!(admit(&[&fast], t0 + Duration::from_secs(5)).is_none());
        assert!(admit(&[&slow], t0 + Duration::from_secs(5)).is_some());
    }
}
