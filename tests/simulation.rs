//! A deterministic simulation: the real SMTP client state machine talks to the real
//! sink server state machine over a simulated network (random splits, latency, drops,
//! stalls, garbage) on a simulated clock. The recipients are scheduled by the shard's
//! own retry code with the clock passed in: the classification and retry decision
//! (`retry::decide`), the wait cut at expiry (`retry::wait_before_retry`), the retry
//! wheel at the shard's tick (`deliver::wheel`), and the expiry test
//! (`retry::is_expired`); every message is admitted by the destination's real
//! limiter (`shaping::admit`, a seeded rate), which sees every reply (`observe`,
//! `on_throttled` on a throttle reply) and the shard's tick. What is not yet the
//! shard's code: the loop that picks due recipients and opens connections (sites,
//! requeue), which this file still models (the shard reads the clock itself there).
//! Besides the delivery invariants below, the rate invariants: no second with more
//! messages than the limiter's rate allows, and none after a throttle back-off with
//! more than its new rate. Thousands of seeds
//! (`VOLLEY_SIM_SEEDS`, default [`SEEDS`]); each checks the invariants: exactly one
//! terminal outcome per recipient, no attempt after a terminal outcome (so no retry of
//! a permanent failure), no attempt before its retry time or past its expiry, every
//! delivery seen by the server, and duplicates only where a connection broke after
//! the server accepted.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};
use volley::deliver::schedule::TICK;
use volley::deliver::wheel::Wheel;
use volley::policy::classify::Class;
use volley::policy::classify::Classifier;
use volley::policy::retry::{
    decide, is_expired, jitter_by, wait_before_retry, Decision, RetryPolicy,
};
use volley::policy::shaping::rules::{parse_per, Rule, Set, Threshold};
use volley::policy::shaping::{self, Limiter};
use volley::smtp::client::{ClientConfig, ClientSession, Event, Timeouts, Transaction};
use volley::smtp::server::{Behaviour, Command, Message, ServerConfig, ServerSession, Verdict};

const SEEDS: u64 = 2000;
/// Compiled once: the rules are the same for every seed.
static CLASSIFIER: std::sync::OnceLock<Classifier> = std::sync::OnceLock::new();
const RECIPIENTS: usize = 12;
/// Recipients per seed of the loaded runs: enough that a back-off's rate, not the
/// connection, is what paces the rest.
const LOADED_RECIPIENTS: usize = 150;
const LOADED_SEEDS: u64 = 100;
const EXPIRE: Duration = Duration::from_secs(4 * 3600);
/// Bounds every loop: a simulation that has not finished by then is a failure.
const STEPS_MAX: usize = 200_000;

#[derive(Clone, Copy)]
struct Faults {
    rcpt_temp: f64,
    rcpt_perm: f64,
    data_temp: f64,
    data_perm: f64,
    drop_in_data: f64,
    /// Per exchange: the server stops answering (the client must time out).
    stall: f64,
    /// Per exchange: the server's bytes are replaced by garbage.
    garbage: f64,
    /// Per exchange: the connection breaks after the server's reply.
    drop: f64,
}

struct SimServer {
    rng: fastrand::Rng,
    f: Faults,
    accepted: HashMap<String, u32>,
}

impl Behaviour for SimServer {
    fn mail_from(&mut self, _: &str) -> Verdict {
        Verdict::Accept
    }
    fn rcpt(&mut self, _: &str, rcpt: &str) -> Verdict {
        let r = self.rng.f64();
        if r < self.f.rcpt_perm {
            Verdict::Reply("550 5.1.1 no such user".into())
        } else if r < self.f.rcpt_perm + self.f.rcpt_temp {
            let texts = [
                "451 4.7.1 greylisted, try again in 60 seconds",
                "452 4.2.2 over quota",
                "421 4.7.28 rate limited",
            ];
            let t = texts[self.rng.usize(..texts.len())];
            if t.starts_with("421") {
                Verdict::ReplyAndClose(t.into())
            } else {
                Verdict::Reply(t.into())
            }
        } else {
            let _ = rcpt;
            Verdict::Accept
        }
    }
    fn data_start(&mut self) -> Verdict {
        if self.rng.f64() < self.f.drop_in_data {
            Verdict::Disconnect
        } else {
            Verdict::Accept
        }
    }
    fn message(&mut self, msg: &Message<'_>) -> Verdict {
        let r = self.rng.f64();
        if r < self.f.data_perm {
            return Verdict::Reply("554 5.7.1 rejected for policy reasons".into());
        }
        if r < self.f.data_perm + self.f.data_temp {
            return Verdict::Reply("451 4.3.0 try again later".into());
        }
        for rc in msg.rcpts {
            *self.accepted.entry(rc.clone()).or_default() += 1;
        }
        Verdict::Accept
    }
    fn delay_ms(&mut self, _: Command) -> u64 {
        0
    }
}

#[derive(Debug, Clone)]
struct Rcpt {
    addr: String,
    attempts: u32,
    /// When the schedule said it may be tried again (the wheel must not return it
    /// earlier).
    next_at: Duration,
    terminal: Option<Decision>,
    /// Transactions aborted after being sent (the server may have accepted them).
    aborts: u32,
}

struct Sim {
    seed: u64,
    rng: fastrand::Rng,
    now: Duration,
    base: Instant,
    sys_base: SystemTime,
    rcpts: Vec<Rcpt>,
    /// The shard's retry wheel, holding recipient indexes.
    retries: Wheel<usize>,
    /// The destination's limiter, at `rate` messages per second.
    limiter: Limiter,
    rate: f64,
    /// When each message was admitted, in order.
    admitted: Vec<Duration>,
    /// Each throttle back-off: when, the rate it set, and how many messages had
    /// been admitted before it.
    backoffs: Vec<(Duration, f64, usize)>,
    /// The last shard tick given to the limiter.
    ticked: Duration,
    classifier: &'static Classifier,
    policy: RetryPolicy,
    server: SimServer,
    window: usize,
    steps: usize,
}

impl Sim {
    fn t(&self) -> Instant {
        self.base + self.now
    }

    fn sys(&self) -> SystemTime {
        self.sys_base + self.now
    }

    /// The shard's ticks up to now, as its tick loop gives them to each limiter.
    fn tick(&mut self) {
        while self.ticked + TICK <= self.now {
            self.ticked += TICK;
            let _ = self.limiter.tick(self.base + self.ticked);
        }
    }

    /// Waits until the limiter admits a message, as the connection does, and counts it.
    fn admit(&mut self) {
        while let Some(at) = shaping::admit(&[&self.limiter], self.t()) {
            self.steps += 1;
            assert!(self.steps < STEPS_MAX, "seed {}: never admitted", self.seed);
            self.now = self.now.max(at - self.base);
            self.tick();
        }
        self.admitted.push(self.now);
    }

    /// Puts recipient `i` in the wheel `wait` from now, as the shard does.
    fn defer(&mut self, i: usize, wait: Duration) {
        self.rcpts[i].next_at = self.now + wait;
        self.retries.insert(self.t() + wait, i);
    }

    fn outcome(&mut self, i: usize, reply: &volley::smtp::reply::Reply) {
        let seed = self.seed;
        let r = &mut self.rcpts[i];
        assert!(
            r.terminal.is_none(),
            "seed {seed}: {} got a reply after its terminal outcome",
            r.addr
        );
        r.attempts += 1;
        let verdict = (!reply.is_positive()).then(|| self.classifier.classify(reply));
        let d = decide(
            reply,
            verdict,
            None,
            &self.policy,
            r.attempts,
            self.sys_base + self.now,
            self.sys_base + EXPIRE,
        );
        match d {
            Decision::Retry(after) => {
                let delay = jitter_by(after, self.rng.f64());
                let wait = wait_before_retry(delay, self.sys(), self.sys_base + EXPIRE);
                self.defer(i, wait);
            }
            _ => self.rcpts[i].terminal = Some(d),
        }
        // The shard's reaction to the reply (Shard::react).
        let throttled = verdict.is_some_and(|v| v.class == Class::Throttled);
        self.limiter.observe(self.t(), throttled);
        if throttled {
            let pace = self.limiter.view(self.t()).rate;
            if let Some(c) = self
                .limiter
                .on_throttled(self.t(), &reply.to_string(), false)
            {
                let rate = c.rate.expect("a rate was set");
                // A cut to the factor (0.5) of the pace it came from, at the least
                // (the limiter's floor is 0.01/s).
                if let Some(p) = pace {
                    assert!(
                        rate <= (0.5 * p * 1.001).max(0.01),
                        "seed {}: a back-off from {p}/s to {rate}/s is no cut to half",
                        self.seed
                    );
                }
                self.backoffs.push((self.now, rate, self.admitted.len()));
            }
        }
        let r = &self.rcpts[i];
        if reply.is_permanent() && verdict.is_some_and(|v| !v.retry) {
            assert_eq!(
                r.terminal,
                Some(Decision::Bounced),
                "seed {seed}: a permanent failure must bounce"
            );
        }
    }

    /// One connection carrying the recipients in `due`.
    fn connection(&mut self, scfg: &ServerConfig, due: Vec<usize>) {
        let cfg = ClientConfig {
            ehlo_name: "sim.test".into(),
            timeouts: Timeouts::default(),
            window: self.window,
            tls: volley::smtp::client::TlsMode::Disabled,
        };
        let mut client = ClientSession::new(cfg, self.t());
        let mut server = ServerSession::new(scfg);
        let mut to_client = server.greeting();
        let mut queue: VecDeque<usize> = due.into();
        let mut inflight: HashMap<u64, usize> = HashMap::new();
        let mut next_id = 0u64;
        let (mut stalled, mut server_closed) = (false, false);
        loop {
            self.steps += 1;
            assert!(
                self.steps < STEPS_MAX,
                "seed {}: simulation did not finish",
                self.seed
            );
            // Server → client, split at random points, after some latency.
            if !to_client.is_empty() && !stalled {
                self.now += Duration::from_millis(self.rng.u64(0..20));
                if self.rng.f64() < self.server.f.garbage {
                    to_client = b"HTTP/1.1 502 Bad Gateway\r\n".to_vec();
                }
                let bytes = std::mem::take(&mut to_client);
                let mut rest = &bytes[..];
                while !rest.is_empty() {
                    let n = self.rng.usize(1..=rest.len());
                    client.receive(&rest[..n], self.t());
                    rest = &rest[n..];
                }
                if server_closed || self.rng.f64() < self.server.f.drop {
                    client.connection_lost("simulated drop");
                }
            }
            while let Some(ev) = client.poll_event() {
                match ev {
                    Event::Ready => {}
                    Event::StartTls => unreachable!("TLS is disabled in the simulation"),
                    Event::TxDone { id, replies } => {
                        let i = inflight.remove(&id).expect("known transaction");
                        assert_eq!(replies.len(), 1);
                        self.outcome(i, &replies[0].1);
                    }
                    Event::TxAborted { id, .. } => {
                        // Put back for the next connection without counting an attempt,
                        // as the shard does; after a few, it counts as a deferral.
                        let i = inflight.remove(&id).expect("known transaction");
                        self.rcpts[i].aborts += 1;
                        if self.rcpts[i].aborts % 4 == 0 {
                            let r = volley::smtp::reply::Reply::new(
                                451,
                                Some("4.4.2"),
                                "connection lost",
                            );
                            self.outcome(i, &r);
                        } else {
                            self.defer(i, Duration::from_secs(1));
                        }
                    }
                    Event::Closed { .. } => {}
                }
            }
            if client.is_closed() {
                // Whatever was not submitted waits for the next connection.
                for i in queue {
                    self.defer(i, Duration::from_secs(1));
                }
                return;
            }
            while client.can_submit() {
                let Some(i) = queue.pop_front() else { break };
                // As connection.rs: the limiter's admission, then the shard's
                // next_batch, where one that outlived its maximum age while it
                // waited expires, unsent.
                self.admit();
                if is_expired(self.sys(), self.sys_base + EXPIRE) {
                    self.rcpts[i].terminal = Some(Decision::Expired);
                    continue;
                }
                let r = &self.rcpts[i];
                assert!(
                    r.terminal.is_none(),
                    "seed {}: attempt after a terminal outcome",
                    self.seed
                );
                assert!(
                    self.now >= r.next_at,
                    "seed {}: attempt before its retry time",
                    self.seed
                );
                assert!(
                    self.now < EXPIRE,
                    "seed {}: attempt past the expiry",
                    self.seed
                );
                next_id += 1;
                inflight.insert(next_id, i);
                let tx = Transaction {
                    id: next_id,
                    from: "b@sim.test".into(),
                    rcpts: vec![r.addr.clone()],
                    content: format!("Subject: {i}\r\n\r\n.hello\r\n").into_bytes(),
                };
                client.submit(tx, self.t());
            }
            if client.is_idle() && client.in_flight() == 0 && queue.is_empty() {
                client.quit(self.t());
            }
            let out = client.take_output();
            if !out.is_empty() {
                let mut rest = &out[..];
                while !rest.is_empty() && !server_closed {
                    let n = self.rng.usize(1..=rest.len());
                    let o = server.feed(&rest[..n], &mut self.server);
                    to_client.extend_from_slice(&o.write);
                    server_closed |= o.close;
                    rest = &rest[n..];
                }
                if self.rng.f64() < self.server.f.stall {
                    stalled = true;
                }
                if server_closed && to_client.is_empty() {
                    client.connection_lost("server closed");
                }
            } else if to_client.is_empty() || stalled {
                // Waiting on a server that says nothing: time passes until the client's timeout.
                let d = client
                    .deadline()
                    .expect("a client waiting on a reply has a deadline");
                self.now = self.now.max(d - self.base);
                client.handle_timeout(self.t());
            }
        }
    }

    fn run(&mut self, scfg: &ServerConfig) {
        loop {
            self.steps += 1;
            assert!(
                self.steps < STEPS_MAX,
                "seed {}: simulation did not finish",
                self.seed
            );
            let open: Vec<usize> = (0..self.rcpts.len())
                .filter(|&i| self.rcpts[i].terminal.is_none())
                .collect();
            if open.is_empty() {
                return;
            }
            self.tick();
            // The retry wheel: what falls due, less what has expired, which ends
            // without another attempt.
            let mut due = Vec::new();
            for i in self.retries.advance(self.t()) {
                if is_expired(self.sys(), self.sys_base + EXPIRE) {
                    self.rcpts[i].terminal = Some(Decision::Expired);
                } else {
                    due.push(i);
                }
            }
            if due.is_empty() {
                // On to the earliest retry time, then tick by tick as the shard does.
                let next = open
                    .iter()
                    .map(|&i| self.rcpts[i].next_at)
                    .min()
                    .expect("open is not empty");
                self.now = self.now.max(next).max(self.now + TICK);
                continue;
            }
            self.connection(scfg, due);
        }
    }
}

/// Runs seed `seed` with `recipients`: recipients delivered, duplicates, throttle
/// back-offs.
fn simulate(seed: u64, recipients: usize) -> (u64, u64, u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut p = |max: f64| rng.f64() * max;
    let f = Faults {
        rcpt_temp: p(0.3),
        rcpt_perm: p(0.1),
        data_temp: p(0.3),
        data_perm: p(0.1),
        drop_in_data: p(0.2),
        stall: p(0.05),
        garbage: p(0.03),
        drop: p(0.05),
    };
    let offer_pipelining = rng.bool();
    let scfg = ServerConfig {
        hostname: "sim-server.test".into(),
        size_max: 1 << 20,
        offer_starttls: false,
        offer_pipelining,
        offer_chunking: offer_pipelining && rng.bool(),
    };
    let base = Instant::now();
    let rate = rng.u32(2..=40);
    let rule = Rule {
        max_msg_rate: Some(Set::cli(parse_per(&format!("{rate}/s")).unwrap())),
        throttle_threshold: Some(Set::cli(Threshold::Count(parse_per("1/1min").unwrap()))),
        throttle_factor: Some(Set::cli(0.5)),
        // Longer than the window the back-off invariant looks at.
        throttle_recover: Some(Set::cli(Duration::from_secs(10))),
        ..Rule::default()
    };
    let mut sim = Sim {
        seed,
        now: Duration::ZERO,
        base,
        retries: Wheel::new(TICK, base),
        limiter: Limiter::new("provider:sim".into(), &rule, 1, 0, base),
        rate: rate as f64,
        admitted: Vec::new(),
        backoffs: Vec::new(),
        ticked: Duration::ZERO,
        sys_base: SystemTime::now(),
        rcpts: (0..recipients)
            .map(|i| Rcpt {
                addr: format!("r{i}@d{}.test", i % 3),
                attempts: 0,
                next_at: Duration::ZERO,
                terminal: None,
                aborts: 0,
            })
            .collect(),
        classifier: CLASSIFIER.get_or_init(Classifier::shipped),
        policy: RetryPolicy::default(),
        server: SimServer {
            rng: fastrand::Rng::with_seed(seed ^ 0x5eed),
            f,
            accepted: HashMap::new(),
        },
        window: rng.usize(1..=8),
        steps: 0,
        rng,
    };
    for i in 0..recipients {
        sim.retries.insert(base, i);
    }
    sim.run(&scfg);
    // The rate invariants, over every one-second window from each admission: the
    // limiter's rate (plus its 5 ms of tolerance and the one that opens the window),
    // and after a back-off the rate it set.
    let most = |rate: f64| (rate * 1.005).floor() as usize + 1;
    let second = Duration::from_secs(1);
    for (k, &from) in sim.admitted.iter().enumerate() {
        let n = sim.admitted[k..]
            .iter()
            .take_while(|&&t| t < from + second)
            .count();
        assert!(
            n <= most(sim.rate),
            "seed {seed}: {n} messages in the second from {from:?} at {}/s",
            sim.rate
        );
    }
    // A back-off holds until a quiet `throttle_recover` (10 s) has passed: over those
    // 10 s (a second back-off only lowers the rate further), its rate bounds them.
    let held = Duration::from_secs(10);
    for &(at, rate, before) in &sim.backoffs {
        let n = sim.admitted[before..]
            .iter()
            .take_while(|&&t| t < at + held)
            .count();
        let bound = (rate * held.as_secs_f64() * 1.005).floor() as usize + 1;
        assert!(
            n <= bound,
            "seed {seed}: {n} messages in the {held:?} after a back-off to {rate}/s at {at:?}: {:?}",
            &sim.admitted[before..(before + n)]
        );
    }
    let mut delivered = 0;
    let mut duplicates = 0;
    for r in &sim.rcpts {
        let accepted = sim.server.accepted.get(&r.addr).copied().unwrap_or(0);
        match r.terminal {
            Some(Decision::Delivered) => {
                delivered += 1;
                assert!(
                    accepted >= 1,
                    "seed {seed}: {} delivered but the server never accepted it",
                    r.addr
                );
            }
            Some(_) => {}
            None => panic!("seed {seed}: {} has no terminal outcome", r.addr),
        }
        // A second acceptance needs a connection that broke after the server said yes.
        let extra = accepted.saturating_sub(1);
        assert!(
            extra <= r.aborts,
            "seed {seed}: {} accepted {accepted} times with {} aborts",
            r.addr,
            r.aborts
        );
        duplicates += extra as u64;
    }
    (delivered, duplicates, sim.backoffs.len() as u64)
}

/// Seeds to run: `VOLLEY_SIM_SEEDS` for a long run, else [`SEEDS`].
fn seeds() -> u64 {
    match std::env::var("VOLLEY_SIM_SEEDS") {
        Ok(n) => n
            .parse()
            .unwrap_or_else(|_| panic!("VOLLEY_SIM_SEEDS={n:?} is not a number of seeds")),
        Err(_) => SEEDS,
    }
}

#[test]
fn thousands_of_seeded_fault_schedules_keep_the_invariants() {
    let seeds = seeds();
    let mut delivered = 0;
    let mut backoffs = 0;
    let mut duplicates = 0;
    for seed in 0..seeds {
        let (d, dup, b) = simulate(seed, RECIPIENTS);
        backoffs += b;
        delivered += d;
        duplicates += dup;
    }
    let total = seeds * RECIPIENTS as u64;
    eprintln!("simulation: {seeds} seeds, {total} recipients, {delivered} delivered, {duplicates} duplicates after broken connections, {backoffs} throttle back-offs");
    assert!(
        backoffs > 0,
        "no seed backed off: the rate invariant after a back-off went untried"
    );
    // The faults are bounded, so most mail gets through in the end.
    assert!(delivered > total / 2, "{delivered} of {total}");
}

/// Fewer seeds, each with enough recipients that the limiter paces the run: a
/// back-off that logged a lower rate but kept sending at the old one breaks the
/// invariant after the back-off (with 12 recipients the run is over too soon).
#[test]
fn loaded_seeds_never_pass_the_limiters_rate_nor_a_back_offs() {
    let mut backoffs = 0;
    for seed in 0..LOADED_SEEDS {
        let (_, _, b) = simulate(1_000_000 + seed, LOADED_RECIPIENTS);
        backoffs += b;
    }
    eprintln!("loaded simulation: {LOADED_SEEDS} seeds of {LOADED_RECIPIENTS} recipients, {backoffs} throttle back-offs");
    assert!(backoffs > LOADED_SEEDS, "{backoffs} back-offs");
}
