//! What the engine counts, for Prometheus (`GET /metrics`) and the status page.
//!
//! The hot path never touches a lock or an atomic for this: each shard counts its
//! outcomes in its own [`Tally`] and publishes a copy of it, with its queue,
//! connections and shaping keys, into the shared [`Board`] once a second (with the
//! `volley queue status` lines). A scrape reads the board, so what it shows is at
//! most a second old; counters only grow, as Prometheus expects.
//!
//! Label cardinality is bounded: `provider` is a shaping rule's provider name or
//! `other` (the long tail of domains), `source` a configured pool address or
//! `default`, `key` a shaping key of a provider, a domain with its own rule, or a
//! source towards a provider (never `site:` keys, one per MX set; those are counted
//! together).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The `provider` label of a destination no provider rule matches.
pub const OTHER_PROVIDER: &str = "other";

/// Recent bounces (and expirations) each shard keeps for the status page.
pub const RECENT_BOUNCES_MAX: usize = 50;

/// Seconds of totals the board keeps for the status page's chart (one sample a second).
pub const HISTORY_SECONDS: usize = 600;

/// Upper bounds of the queue-to-delivery latency histogram, seconds: a fast
/// receiver answers within a second of queueing, a deferred one hours later.
pub const LATENCY_BOUNDS_S: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// Upper bounds of the SMTP transaction time histogram, seconds (MAIL to the last
/// reply of its DATA or BDAT, pipelined).
pub const TRANSACTION_BOUNDS_S: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A recipient's outcome, as the accounting log's record types name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Delivered,
    TransientFailure,
    Bounced,
    Expired,
}

impl Outcome {
    /// The `outcome` label value.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::TransientFailure => "transient_failure",
            Outcome::Bounced => "bounced",
            Outcome::Expired => "expired",
        }
    }
}

/// One counter of `volley_outcomes_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutcomeKey {
    /// Delivered, transient failure, bounced or expired.
    pub outcome: Outcome,
    /// The reply's class (classify/rules.toml); "" for a delivery.
    pub class: &'static str,
    /// A provider rule's name, or [`OTHER_PROVIDER`].
    pub provider: Arc<str>,
    /// The pool address the connection came from; None: the host's default, or no
    /// connection was made.
    pub source: Option<IpAddr>,
}

/// A histogram with fixed upper bounds (seconds), as Prometheus keeps one.
#[derive(Debug, Clone)]
pub struct Buckets {
    bounds: &'static [f64],
    /// One count per bound, and one past the last (+Inf).
    counts: Vec<u64>,
    sum: f64,
}

impl Buckets {
    /// An empty histogram over `bounds` (seconds, ascending; +Inf is added).
    pub fn new(bounds: &'static [f64]) -> Buckets {
        Buckets {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Counts one observation of `seconds`.
    pub fn observe(&mut self, seconds: f64) {
        let i = self.bounds.partition_point(|b| *b < seconds);
        self.counts[i] += 1;
        self.sum += seconds;
    }

    /// Observations counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn add(&mut self, other: &Buckets) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }

    fn encode(&self, mut e: prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().copied())
            .collect();
        e.encode_histogram::<NoLabelSet>(self.sum, self.count(), &buckets, None)
    }
}

/// A bounce or expiration, for the status page's list.
#[derive(Debug, Clone, Serialize)]
pub struct RecentBounce {
    /// RFC 3339 UTC.
    pub time: String,
    /// Bounced or expired.
    pub outcome: Outcome,
    /// The campaign id it counts under.
    pub campaign: String,
    /// The recipient's address.
    pub rcpt: String,
    /// The reply's code (volley's own for a local or DNS outcome).
    pub code: u16,
    /// The reply's enhanced status code (RFC 3463), when it had one.
    pub enhanced: Option<String>,
    /// The reply's class (classify/rules.toml).
    pub class: &'static str,
    /// The reply, cut to [`REPLY_SHOWN_MAX`] octets.
    pub reply: String,
}

/// Octets of a reply kept for the status page.
pub const REPLY_SHOWN_MAX: usize = 240;

/// `reply` cut to [`REPLY_SHOWN_MAX`] octets at a character boundary.
pub fn shown_reply(reply: &str) -> String {
    let mut cut = reply.len().min(REPLY_SHOWN_MAX);
    while !reply.is_char_boundary(cut) {
        cut -= 1;
    }
    reply[..cut].to_string()
}

/// What one shard counts, on its own thread; [`ShardView`] carries a copy out.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Outcomes since start, by counter.
    pub outcomes: HashMap<OutcomeKey, u64>,
    /// Deliveries over TLS, by provider.
    pub delivered_tls: HashMap<Arc<str>, u64>,
    /// Queue-to-delivery latency of deliveries, seconds.
    pub latency: Buckets,
    /// SMTP transactions that ran to their last reply, seconds.
    pub transaction: Buckets,
    /// The last [`RECENT_BOUNCES_MAX`] bounces and expirations, oldest first.
    pub bounces: VecDeque<RecentBounce>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            outcomes: HashMap::new(),
            delivered_tls: HashMap::new(),
            latency: Buckets::new(LATENCY_BOUNDS_S),
            transaction: Buckets::new(TRANSACTION_BOUNDS_S),
            bounces: VecDeque::new(),
        }
    }
}

impl Tally {
    /// Counts one outcome; `tls` when it came over a TLS session. A delivery's
    /// `latency_s` (queue to delivery, seconds) goes to the latency histogram.
    pub fn outcome(&mut self, key: &OutcomeKey, tls: bool, latency_s: f64) {
        if key.outcome == Outcome::Delivered {
            if tls {
                *self.delivered_tls.entry(key.provider.clone()).or_default() += 1;
            }
            self.latency.observe(latency_s);
        }
        match self.outcomes.get_mut(key) {
            Some(n) => *n += 1,
            None => {
                self.outcomes.insert(key.clone(), 1);
            }
        }
    }

    /// Keeps `b` among the last [`RECENT_BOUNCES_MAX`].
    pub fn bounce(&mut self, mut b: RecentBounce) {
        if b.reply.len() > REPLY_SHOWN_MAX {
            b.reply = shown_reply(&b.reply);
        }
        if self.bounces.len() == RECENT_BOUNCES_MAX {
            self.bounces.pop_front();
        }
        self.bounces.push_back(b);
    }
}

/// One shard's state of one shaping key (its limiter), for the status page and the
/// metrics. Rates are messages per second, this shard's share.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyView {
    /// `provider:NAME`, `domain:NAME`, `source:IP>DEST` or `site:MX,...`.
    pub key: String,
    /// The pacing now (after any back-off or operator rate); None: unlimited.
    pub rate: Option<f64>,
    /// The configured share, or the operator's rate; None: unlimited.
    pub configured_rate: Option<f64>,
    /// Messages per second over the last second's window.
    pub measured_rate: Option<f64>,
    /// Connections open for the key on this shard.
    pub connections: usize,
    /// The connection cap now (after any back-off); None: unlimited.
    pub connections_cap: Option<usize>,
    /// A throttle reply cut its rate and connections; not yet recovered.
    pub backed_off: bool,
    /// The backed-off rate over the rate it backed off from (1 when not backed off).
    pub backoff_factor: f64,
    /// Seconds of suspension left (a `blocked` reply), 0 when not suspended.
    pub suspended_s: u64,
    /// An operator paused it (`volley queue pause`).
    pub paused: bool,
    /// Its rate was set by an operator (`volley queue rate`).
    pub operator_rate: bool,
    /// The receiver's reply behind the back-off or suspension in force.
    pub cause: Option<String>,
    /// Its warm-up schedule's progress, when it has one.
    pub warmup: Option<WarmupView>,
}

/// A warm-up schedule's progress on one shard today.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WarmupView {
    /// Day of the schedule, from 1.
    pub day: u32,
    /// Days the schedule has.
    pub days: u32,
    /// This shard's share of today's cap; None once the schedule has run out.
    pub cap_today: Option<u32>,
    /// Messages sent today (UTC) on this shard, earlier runs included.
    pub sent_today: u32,
}

/// What a shard publishes once a second.
#[derive(Debug, Clone, Default)]
pub struct ShardView {
    /// What the shard counted since start.
    pub tally: Tally,
    /// Recipients queued for a destination now.
    pub ready: u64,
    /// Recipients waiting for their retry time.
    pub retry: u64,
    /// Recipients held by an operator's pause of a domain or campaign.
    pub held: u64,
    /// Connections open, by provider label.
    pub connections: Vec<(Arc<str>, u64)>,
    /// The smallest pipelining window among each provider's destinations.
    pub windows: Vec<(Arc<str>, usize)>,
    /// The named keys ([`key_is_named`]): providers, domains with their own rule,
    /// sources towards a provider.
    pub keys: Vec<KeyView>,
    /// Every other key (one per MX set without a provider rule), folded.
    pub other: OtherKeys,
    /// Spool segments the shard holds.
    pub spool_segments: u64,
    /// Octets of those segments on disk.
    pub spool_bytes: u64,
    /// The share of wall time (0 to 1) the shard's thread ran or waited to run,
    /// lately (`deliver::load`); at `BUSY_RATIO_MAX_FOR_GROWTH` it opens no
    /// further connections to a site.
    pub busy: f64,
}

/// The long tail of shaping keys (`site:MX,...` and sources towards them) on one
/// shard, folded so that their number does not grow the metrics or the page.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OtherKeys {
    /// Keys folded in.
    pub keys: u64,
    /// Of them, backed off now.
    pub backed_off: u64,
    /// Of them, suspended now.
    pub suspended: u64,
    /// Messages per second they passed over the last second, together.
    pub measured_rate: f64,
    /// The longest suspension left, seconds.
    pub suspended_s: u64,
    /// One reply behind a back-off or suspension among them.
    pub cause: Option<String>,
}

impl OtherKeys {
    /// Folds one more key in.
    pub fn add(&mut self, v: &KeyView) {
        self.keys += 1;
        self.backed_off += u64::from(v.backed_off);
        self.suspended += u64::from(v.suspended_s > 0);
        self.measured_rate += v.measured_rate.unwrap_or(0.0);
        self.suspended_s = self.suspended_s.max(v.suspended_s);
        if self.cause.is_none() {
            self.cause = v.cause.clone();
        }
    }
}

/// The door injected mail came in by (the `path` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Smtp,
    Http,
    Pickup,
    /// The admin socket's `inject` (`volley send` handing a campaign over).
    Admin,
}

const DOORS: [Door; 4] = [Door::Smtp, Door::Http, Door::Pickup, Door::Admin];

impl Door {
    fn name(self) -> &'static str {
        match self {
            Door::Smtp => "smtp",
            Door::Http => "http",
            Door::Pickup => "pickup",
            Door::Admin => "admin",
        }
    }
}

/// The daemon's own figures, renewed once a second.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceView {
    /// Free octets on the spool's file system (for an unprivileged writer).
    pub spool_free_bytes: u64,
    /// `spool_free_min`: injection is refused below it.
    pub spool_free_min_bytes: u64,
    /// Whether injection is refused now for the disk floor.
    pub injection_refused_now: bool,
    /// Injections refused for the disk floor since start.
    pub injections_refused_disk: u64,
}

/// A figure another part of the process keeps (a webhook's posts and lag), read
/// at each scrape.
pub struct External {
    /// A counter's without `_total`, which the exposition adds.
    pub name: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
    /// A gauge (a level) rather than a counter (a total since start).
    pub gauge: bool,
    /// Its labels (bounded: one series per webhook).
    pub labels: Vec<(&'static str, String)>,
    /// Reads the value at a scrape.
    pub read: Box<dyn Fn() -> u64 + Send + Sync>,
}

/// One second of the chart: totals at that second.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Seconds since the Unix epoch.
    pub unix_s: u64,
    /// Deliveries since start.
    pub delivered: u64,
    /// Bounces and expirations since start.
    pub failed: u64,
    /// Transient failures (attempts) since start.
    pub deferred: u64,
}

/// Everything the metrics and the status page read; shared by the shards, the
/// listeners and the HTTP thread.
pub struct Board {
    shards: Mutex<Vec<ShardView>>,
    injected: [AtomicU64; 4],
    service: Mutex<Option<ServiceView>>,
    history: Mutex<VecDeque<Sample>>,
    external: Mutex<Vec<External>>,
    started: std::time::SystemTime,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Board")
    }
}

impl Board {
    /// A board for `shards` shards, with nothing counted.
    pub fn new(shards: usize) -> Board {
        Board {
            shards: Mutex::new(vec![ShardView::default(); shards]),
            injected: Default::default(),
            service: Mutex::new(None),
            history: Mutex::new(VecDeque::new()),
            external: Mutex::new(Vec::new()),
            started: std::time::SystemTime::now(),
        }
    }

    /// Shard `id`'s state now (it calls this once a second, and when it ends).
    /// Panics: `id` is not below the shard count the board was made for.
    pub fn publish(&self, id: usize, view: ShardView) {
        self.shards.lock().expect("board lock")[id] = view;
    }

    /// `recipients` injected through `door`, once durable.
    pub fn injected(&self, door: Door, recipients: u64) {
        self.injected[door as usize].fetch_add(recipients, Ordering::Relaxed);
    }

    /// The daemon's own figures now.
    pub fn set_service(&self, s: ServiceView) {
        *self.service.lock().expect("board lock") = Some(s);
    }

    /// Shows `e` in `/metrics` from now on.
    pub fn add_external(&self, e: External) {
        self.external.lock().expect("board lock").push(e);
    }

    /// When the board was made (the process's start): every count is since then.
    pub fn started(&self) -> std::time::SystemTime {
        self.started
    }

    /// Every shard's last view, cloned.
    pub fn shards(&self) -> Vec<ShardView> {
        self.shards.lock().expect("board lock").clone()
    }

    /// The daemon's own figures, once it has set them.
    pub fn service(&self) -> Option<ServiceView> {
        self.service.lock().expect("board lock").clone()
    }

    /// Totals by outcome over every shard.
    pub fn totals(&self) -> BTreeMap<Outcome, u64> {
        let mut t = BTreeMap::new();
        for s in self.shards.lock().expect("board lock").iter() {
            for (k, n) in &s.tally.outcomes {
                *t.entry(k.outcome).or_default() += n;
            }
        }
        t
    }

    /// Takes one sample of the totals for the chart (call once a second).
    pub fn sample(&self, unix_s: u64) {
        let t = self.totals();
        let get = |o| t.get(&o).copied().unwrap_or(0);
        let s = Sample {
            unix_s,
            delivered: get(Outcome::Delivered),
            failed: get(Outcome::Bounced) + get(Outcome::Expired),
            deferred: get(Outcome::TransientFailure),
        };
        let mut h = self.history.lock().expect("board lock");
        if h.back().is_some_and(|b| b.unix_s >= unix_s) {
            return;
        }
        if h.len() == HISTORY_SECONDS {
            h.pop_front();
        }
        h.push_back(s);
    }

    /// The samples kept, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.history
            .lock()
            .expect("board lock")
            .iter()
            .copied()
            .collect()
    }

    /// The Prometheus text exposition (OpenMetrics 1.0, `# EOF` last) of everything.
    pub fn encode(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exposition(self.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// The Content-Type of [`Board::encode`]'s text.
pub const EXPOSITION_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a shaping key is shown under its own `key` label (bounded: configured
/// providers, domains and pool sources) rather than counted among the others.
pub fn key_is_named(key: &str) -> bool {
    key.starts_with("provider:")
        || key.starts_with("domain:")
        || (key.starts_with("source:") && key.contains(">provider:"))
}

#[derive(Debug)]
struct Exposition(Arc<Board>);

type Labels = Vec<(&'static str, String)>;

fn family<M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> std::fmt::Result {
    let mut d = e.encode_descriptor(name, help, None, kind)?;
    for (labels, m) in rows {
        m.encode(d.encode_family(&labels)?)?;
    }
    Ok(())
}

fn source_label(s: Option<IpAddr>) -> String {
    s.map_or_else(|| "default".into(), |ip| ip.to_string())
}

impl Collector for Exposition {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let b = &self.0;
        let shards = b.shards();
        let mut outcomes: BTreeMap<&OutcomeKey, u64> = BTreeMap::new();
        let mut tls: BTreeMap<&str, u64> = BTreeMap::new();
        let mut latency = Buckets::new(LATENCY_BOUNDS_S);
        let mut transaction = Buckets::new(TRANSACTION_BOUNDS_S);
        let mut conns: BTreeMap<&str, u64> = BTreeMap::new();
        let mut windows: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &shards {
            for (k, n) in &s.tally.outcomes {
                *outcomes.entry(k).or_default() += n;
            }
            for (p, n) in &s.tally.delivered_tls {
                *tls.entry(p).or_default() += n;
            }
            latency.add(&s.tally.latency);
            transaction.add(&s.tally.transaction);
            for (p, n) in &s.connections {
                *conns.entry(p).or_default() += n;
            }
            for (p, w) in &s.windows {
                let m = windows.entry(p).or_insert(*w);
                *m = (*m).min(*w);
            }
        }
        family(
            &mut e,
            "volley_outcomes",
            "Recipients' outcomes (attempts for transient_failure), by reply class, provider and source address.",
            MetricType::Counter,
            outcomes.iter().map(|(k, n)| {
                (
                    vec![
                        ("outcome", k.outcome.name().to_string()),
                        ("class", k.class.to_string()),
                        ("provider", k.provider.to_string()),
                        ("source", source_label(k.source)),
                    ],
                    ConstCounter::new(*n),
                )
            }),
        )?;
        family(
            &mut e,
            "volley_delivered_tls",
            "Deliveries over a TLS session, by provider (their share of volley_outcomes_total{outcome=\"delivered\"} is the TLS share).",
            MetricType::Counter,
            tls.iter()
                .map(|(p, n)| (vec![("provider", p.to_string())], ConstCounter::new(*n))),
        )?;
        let h = e.encode_descriptor(
            "volley_delivery_latency_seconds",
            "From queueing to delivery, of delivered recipients.",
            None,
            MetricType::Histogram,
        )?;
        latency.encode(h)?;
        let h = e.encode_descriptor(
            "volley_smtp_transaction_seconds",
            "SMTP transactions that ran to their last reply, from submitting MAIL FROM to that reply (one per transaction, whatever its recipients).",
            None,
            MetricType::Histogram,
        )?;
        transaction.encode(h)?;
        family(
            &mut e,
            "volley_queue_recipients",
            "Recipients queued by shard: ready to send, waiting to retry, held by a pause.",
            MetricType::Gauge,
            shards.iter().enumerate().flat_map(|(i, s)| {
                [("ready", s.ready), ("retry", s.retry), ("held", s.held)]
                    .into_iter()
                    .map(move |(state, n)| {
                        (
                            vec![("shard", i.to_string()), ("state", state.to_string())],
                            ConstGauge::new(n as i64),
                        )
                    })
            }),
        )?;
        family(
            &mut e,
            "volley_connections",
            "SMTP connections open, by provider.",
            MetricType::Gauge,
            conns.iter().map(|(p, n)| {
                (
                    vec![("provider", p.to_string())],
                    ConstGauge::new(*n as i64),
                )
            }),
        )?;
        family(
            &mut e,
            "volley_pipeline_window",
            "The smallest pipelining window (transactions in flight per connection) among a provider's destinations.",
            MetricType::Gauge,
            windows
                .iter()
                .map(|(p, w)| (vec![("provider", p.to_string())], ConstGauge::new(*w as i64))),
        )?;
        encode_keys(&mut e, &shards)?;
        family(
            &mut e,
            "volley_spool_bytes",
            "Octets of spool segments on disk, by shard.",
            MetricType::Gauge,
            shards.iter().enumerate().map(|(i, s)| {
                (
                    vec![("shard", i.to_string())],
                    ConstGauge::new(s.spool_bytes as i64),
                )
            }),
        )?;
        family(
            &mut e,
            "volley_shard_busy_ratio",
            &format!(
                "The share of wall time the shard's thread ran or waited to run, lately; at {} it opens no further connections to a destination.",
                crate::deliver::schedule::BUSY_RATIO_MAX_FOR_GROWTH
            ),
            MetricType::Gauge,
            shards
                .iter()
                .enumerate()
                .map(|(i, s)| (vec![("shard", i.to_string())], ConstGauge::new(s.busy))),
        )?;
        family(
            &mut e,
            "volley_spool_segments",
            "Spool segments, by shard.",
            MetricType::Gauge,
            shards.iter().enumerate().map(|(i, s)| {
                (
                    vec![("shard", i.to_string())],
                    ConstGauge::new(s.spool_segments as i64),
                )
            }),
        )?;
        family(
            &mut e,
            "volley_injected_recipients",
            "Recipients taken in, by path: smtp (submission), http (the API), pickup, admin (volley send handing over).",
            MetricType::Counter,
            DOORS.iter().map(|p| {
                (
                    vec![("path", p.name().to_string())],
                    ConstCounter::new(b.injected[*p as usize].load(Ordering::Relaxed)),
                )
            }),
        )?;
        if let Some(s) = b.service() {
            let g = |v: u64| ConstGauge::new(v as i64);
            family(
                &mut e,
                "volley_spool_free_bytes",
                "Free octets on the spool's file system.",
                MetricType::Gauge,
                [(vec![], g(s.spool_free_bytes))],
            )?;
            family(
                &mut e,
                "volley_spool_free_min_bytes",
                "The free space below which injection is refused (spool_free_min).",
                MetricType::Gauge,
                [(vec![], g(s.spool_free_min_bytes))],
            )?;
            family(
                &mut e,
                "volley_injection_refused",
                "1 while injection is refused for the disk floor.",
                MetricType::Gauge,
                [(vec![], g(u64::from(s.injection_refused_now)))],
            )?;
            family(
                &mut e,
                "volley_injections_refused_disk",
                "Injections refused for the disk floor since start.",
                MetricType::Counter,
                [(vec![], ConstCounter::new(s.injections_refused_disk))],
            )?;
        }
        let external = b.external.lock().expect("board lock");
        let mut by_name: BTreeMap<&str, Vec<&External>> = BTreeMap::new();
        for c in external.iter() {
            by_name.entry(c.name).or_default().push(c);
        }
        for (name, cs) in by_name {
            let rows = cs.iter().map(|c| (c.labels.clone(), (c.read)()));
            match cs[0].gauge {
                true => family(
                    &mut e,
                    name,
                    cs[0].help,
                    MetricType::Gauge,
                    rows.map(|(l, v)| (l, ConstGauge::new(v as i64))),
                )?,
                false => family(
                    &mut e,
                    name,
                    cs[0].help,
                    MetricType::Counter,
                    rows.map(|(l, v)| (l, ConstCounter::new(v))),
                )?,
            }
        }
        Ok(())
    }
}

/// The shaping keys' gauges: named keys one by one (summed or worst over shards),
/// the rest counted.
fn encode_keys(e: &mut DescriptorEncoder, shards: &[ShardView]) -> std::fmt::Result {
    #[derive(Default)]
    struct Key {
        rate: Option<f64>,
        measured: f64,
        factor: f64,
        suspended: bool,
        paused: bool,
        warm: Option<(u32, u64, u64)>,
    }
    let mut keys: BTreeMap<&str, Key> = BTreeMap::new();
    let other_backed_off: u64 = shards.iter().map(|s| s.other.backed_off).sum();
    let other_suspended: u64 = shards.iter().map(|s| s.other.suspended).sum();
    for v in shards.iter().flat_map(|s| &s.keys) {
        let k = keys.entry(&v.key).or_insert(Key {
            factor: 1.0,
            ..Key::default()
        });
        k.rate = match (k.rate, v.rate) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        k.measured += v.measured_rate.unwrap_or(0.0);
        k.factor = k.factor.min(v.backoff_factor);
        k.suspended |= v.suspended_s > 0;
        k.paused |= v.paused;
        if let Some(w) = &v.warmup {
            let (day, cap, sent) = k.warm.get_or_insert((w.day, 0, 0));
            *day = (*day).max(w.day);
            *cap += u64::from(w.cap_today.unwrap_or(0));
            *sent += u64::from(w.sent_today);
        }
    }
    let label = |k: &str| vec![("key", k.to_string())];
    family(
        e,
        "volley_shaping_rate_limit_messages_per_second",
        "The message rate a shaping key is paced at now, over every shard (after back-off or an operator's rate); absent: unlimited.",
        MetricType::Gauge,
        keys.iter()
            .filter_map(|(k, v)| v.rate.map(|r| (label(k), ConstGauge::new(r)))),
    )?;
    family(
        e,
        "volley_shaping_sent_messages_per_second",
        "Messages per second a shaping key passed over the last second, over every shard.",
        MetricType::Gauge,
        keys.iter()
            .map(|(k, v)| (label(k), ConstGauge::new(v.measured))),
    )?;
    family(
        e,
        "volley_shaping_backoff_factor",
        "The backed-off rate over the rate it backed off from (1: not backed off), the lowest over shards.",
        MetricType::Gauge,
        keys.iter()
            .map(|(k, v)| (label(k), ConstGauge::new(v.factor))),
    )?;
    family(
        e,
        "volley_shaping_suspended",
        "1 while a shaping key is suspended after blocked replies.",
        MetricType::Gauge,
        keys.iter()
            .map(|(k, v)| (label(k), ConstGauge::new(i64::from(v.suspended)))),
    )?;
    family(
        e,
        "volley_shaping_paused",
        "1 while an operator has paused a shaping key.",
        MetricType::Gauge,
        keys.iter()
            .map(|(k, v)| (label(k), ConstGauge::new(i64::from(v.paused)))),
    )?;
    family(
        e,
        "volley_shaping_other_keys",
        "Shaping keys of destinations without a provider rule (one per MX set, per shard) backed off or suspended now.",
        MetricType::Gauge,
        [
            (
                vec![("state", "backed_off".to_string())],
                ConstGauge::new(other_backed_off as i64),
            ),
            (
                vec![("state", "suspended".to_string())],
                ConstGauge::new(other_suspended as i64),
            ),
        ],
    )?;
    let warm: Vec<_> = keys
        .iter()
        .filter_map(|(k, v)| v.warm.map(|w| (*k, w)))
        .collect();
    family(
        e,
        "volley_warmup_day",
        "The day of a source's warm-up schedule, from 1.",
        MetricType::Gauge,
        warm.iter()
            .map(|(k, (d, _, _))| (label(k), ConstGauge::new(i64::from(*d)))),
    )?;
    family(
        e,
        "volley_warmup_cap_today_messages",
        "Today's warm-up cap (0 once the schedule has run out: no cap).",
        MetricType::Gauge,
        warm.iter()
            .map(|(k, (_, c, _))| (label(k), ConstGauge::new(*c as i64))),
    )?;
    family(
        e,
        "volley_warmup_sent_today_messages",
        "Messages a warm-up key sent today (UTC), earlier runs included.",
        MetricType::Gauge,
        warm.iter()
            .map(|(k, (_, _, s))| (label(k), ConstGauge::new(*s as i64))),
    )
}

/// Seconds of `d`, rounded up (a suspension with 0.2 s left still shows).
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(outcome: Outcome, provider: &str) -> OutcomeKey {
        OutcomeKey {
            outcome,
            class: if outcome == Outcome::Delivered {
                ""
            } else {
                "mailbox_unknown"
            },
            provider: Arc::from(provider),
            source: None,
        }
    }

    #[test]
    fn the_exposition_sums_shards_and_parses_as_openmetrics() {
        let b = Arc::new(Board::new(2));
        for id in 0..2 {
            let mut t = Tally::default();
            t.outcome(&key(Outcome::Delivered, "gmail"), true, 0.3);
            t.outcome(&key(Outcome::Delivered, "gmail"), false, 7200.0);
            t.outcome(&key(Outcome::Bounced, OTHER_PROVIDER), false, 1.0);
            t.transaction.observe(0.01);
            b.publish(
                id,
                ShardView {
                    tally: t,
                    ready: 3,
                    ..ShardView::default()
                },
            );
        }
        b.injected(Door::Http, 5);
        let text = b.encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains(
                "volley_outcomes_total{outcome=\"delivered\",class=\"\",provider=\"gmail\",source=\"default\"} 4"
            ),
            "{text}"
        );
        assert!(
            text.contains("volley_delivered_tls_total{provider=\"gmail\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("volley_delivery_latency_seconds_count 4"),
            "{text}"
        );
        // Cumulative buckets: 2 at or below 0.5 s, all 4 by +Inf.
        assert!(
            text.contains("volley_delivery_latency_seconds_bucket{le=\"0.5\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("volley_delivery_latency_seconds_bucket{le=\"+Inf\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("volley_queue_recipients{shard=\"1\",state=\"ready\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("volley_injected_recipients_total{path=\"http\"} 5"),
            "{text}"
        );
        // Every sample line is NAME{labels} VALUE or NAME VALUE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn long_tail_keys_are_counted_not_labelled() {
        let b = Arc::new(Board::new(1));
        let view = |key: &str| KeyView {
            key: key.into(),
            rate: Some(2.0),
            configured_rate: Some(4.0),
            measured_rate: Some(1.0),
            connections: 1,
            connections_cap: None,
            backed_off: true,
            backoff_factor: 0.5,
            suspended_s: 0,
            paused: false,
            operator_rate: false,
            cause: Some("421 slow down".into()),
            warmup: None,
        };
        b.publish(
            0,
            ShardView {
                keys: vec![view("provider:gmail")],
                other: {
                    let mut o = OtherKeys::default();
                    o.add(&view("site:mx1.a,mx2.a"));
                    o.add(&view("site:mx.b"));
                    o
                },
                ..ShardView::default()
            },
        );
        let text = b.encode();
        assert!(
            text.contains("volley_shaping_backoff_factor{key=\"provider:gmail\"} 0.5"),
            "{text}"
        );
        assert!(!text.contains("site:"), "{text}");
        assert!(
            text.contains("volley_shaping_other_keys{state=\"backed_off\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn history_keeps_one_sample_a_second_and_a_bounded_window() {
        let b = Board::new(1);
        for s in 0..(HISTORY_SECONDS as u64 + 10) {
            b.sample(s);
            b.sample(s);
        }
        let h = b.history();
        assert_eq!(h.len(), HISTORY_SECONDS);
        assert_eq!(h[0].unix_s, 10);
    }
}
