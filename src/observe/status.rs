//! The status page's view (`GET /api/v1/status`): the board's shard views folded
//! into what an operator reads, one row per provider and per source address.

use crate::observe::metrics::{
    Board, KeyView, Outcome, RecentBounce, Sample, ServiceView, WarmupView, OTHER_PROVIDER,
};
use serde::Serialize;
use std::collections::BTreeMap;

/// Bounces and expirations the page lists, newest first.
pub const BOUNCES_SHOWN_MAX: usize = 25;

/// Everything the status page shows, as JSON.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Shard threads running.
    pub shards: usize,
    /// Recipients by outcome since start (transient_failure: attempts).
    pub totals: BTreeMap<Outcome, u64>,
    /// Recipients queued now.
    pub queue: Queue,
    /// One sample a second, oldest first: [unix seconds, delivered, failed
    /// (bounced + expired), deferred] totals.
    pub history: Vec<[u64; 4]>,
    /// One row per provider, domain with its own rule, and `other`, by name.
    pub providers: Vec<ProviderRow>,
    /// One row per pool source towards a provider.
    pub sources: Vec<SourceRow>,
    /// Campaign instances (submitted mail excepted), by number.
    pub campaigns: Vec<CampaignRow>,
    /// The last [`BOUNCES_SHOWN_MAX`] bounces and expirations, newest first.
    pub bounces: Vec<RecentBounce>,
    /// The disk budget, once the daemon has measured it.
    pub service: Option<ServiceView>,
}

/// Recipients queued, over every shard.
#[derive(Debug, Default, Serialize)]
pub struct Queue {
    /// Ready to send.
    pub ready: u64,
    /// Waiting for their retry time.
    pub retry: u64,
    /// Held by an operator's pause of a domain or campaign.
    pub held: u64,
}

/// A provider (a shaping rule's), or `other` for every destination without one.
#[derive(Debug, Default, Serialize)]
pub struct ProviderRow {
    /// The provider's name, `domain:NAME`, or `other`.
    pub provider: String,
    /// The key the queue buttons act on (`provider:NAME`); None for `other`, which
    /// is many keys.
    pub key: Option<String>,
    /// Messages per second sent over the last second.
    pub rate: f64,
    /// The pacing now (after back-off or an operator's rate); None: unlimited.
    pub limit: Option<f64>,
    /// The configured rate (or the operator's); None: unlimited.
    pub configured: Option<f64>,
    /// Connections open now.
    pub connections: u64,
    /// The connection cap now (after any back-off); None: unlimited.
    pub connections_cap: Option<u64>,
    /// The backed-off rate over the rate it backed off from (1: not backed off).
    pub backoff_factor: f64,
    /// Keys backed off now (several for `other`).
    pub backed_off: u64,
    /// Seconds of suspension left (blocked replies); 0: none.
    pub suspended_s: u64,
    /// Paused by an operator.
    pub paused: bool,
    /// Its rate set by an operator.
    pub operator_rate: bool,
    /// The receiver's reply behind a back-off or suspension in force.
    pub cause: Option<String>,
    /// Deliveries since start.
    pub delivered: u64,
    /// Transient failures (attempts) since start.
    pub deferred: u64,
    /// Bounces and expirations since start.
    pub bounced: u64,
}

/// A pool source address towards one destination.
#[derive(Debug, Serialize)]
pub struct SourceRow {
    /// The pool address.
    pub source: String,
    /// The destination key it sends towards (`provider:NAME`).
    pub destination: String,
    /// Its shaping key (`source:IP>provider:NAME`), the buttons' target.
    pub key: String,
    /// Messages per second it passed over the last second, over every shard.
    pub rate: f64,
    /// Backed off on some shard now.
    pub backed_off: bool,
    /// Seconds of suspension left; 0: none.
    pub suspended_s: u64,
    /// Paused by an operator.
    pub paused: bool,
    /// The receiver's reply behind a back-off or suspension in force.
    pub cause: Option<String>,
    /// Summed over shards (day: the furthest).
    pub warmup: Option<WarmupView>,
}

/// A campaign instance's progress.
#[derive(Debug, Serialize)]
pub struct CampaignRow {
    /// Its id (campaign.toml's `id`).
    pub campaign: String,
    /// The instance number in the spool.
    pub instance: u32,
    /// Recipients queued for it at ingest.
    pub recipients: u64,
    /// Delivered since the daemon started.
    pub delivered: u64,
    /// Bounced since the daemon started.
    pub bounced: u64,
    /// Expired since the daemon started.
    pub expired: u64,
    /// Not yet final: recovered at the daemon's start or taken in since, less
    /// what became final (delivered, bounced, expired count since the start).
    pub queued: u64,
    /// Seconds to the last final outcome at the average rate since it was queued
    /// (or since the start, for a campaign queued before it); None when nothing
    /// is final yet, 0 when done.
    pub eta_s: Option<u64>,
}

/// Seconds until `queued` recipients are final at the rate `done` became final
/// in `elapsed_s`: 0 when nothing is queued, None before anything is final.
pub fn eta_s(queued: u64, done: u64, elapsed_s: f64) -> Option<u64> {
    match (queued, done) {
        (0, _) => Some(0),
        (_, 0) => None,
        (q, d) => Some((q as f64 * elapsed_s / d as f64).ceil() as u64),
    }
}

/// Folds the board into the page's view; `campaigns` come from the daemon.
pub fn status(board: &Board, campaigns: Vec<CampaignRow>) -> Status {
    let shards = board.shards();
    let mut queue = Queue::default();
    let mut bounces: Vec<RecentBounce> = Vec::new();
    let mut providers: BTreeMap<String, ProviderRow> = BTreeMap::new();
    let row = |providers: &mut BTreeMap<String, ProviderRow>, p: &str| {
        let r = providers.entry(p.to_string()).or_default();
        if r.provider.is_empty() {
            r.provider = p.to_string();
            r.backoff_factor = 1.0;
            r.key = (p != OTHER_PROVIDER).then(|| format!("provider:{p}"));
        }
    };
    for s in &shards {
        queue.ready += s.ready;
        queue.retry += s.retry;
        queue.held += s.held;
        bounces.extend(s.tally.bounces.iter().cloned());
        for (k, n) in &s.tally.outcomes {
            row(&mut providers, &k.provider);
            let r = providers.get_mut(&*k.provider).expect("just made");
            match k.outcome {
                Outcome::Delivered => r.delivered += n,
                Outcome::TransientFailure => r.deferred += n,
                Outcome::Bounced | Outcome::Expired => r.bounced += n,
            }
        }
        for (p, n) in &s.connections {
            row(&mut providers, p);
            providers.get_mut(&**p).expect("just made").connections += n;
        }
    }
    let mut sources: BTreeMap<&str, SourceRow> = BTreeMap::new();
    for s in &shards {
        if s.other.keys > 0 {
            row(&mut providers, OTHER_PROVIDER);
            let r = providers.get_mut(OTHER_PROVIDER).expect("just made");
            r.rate += s.other.measured_rate;
            r.backed_off += s.other.backed_off;
            r.suspended_s = r.suspended_s.max(s.other.suspended_s);
            if r.cause.is_none() {
                r.cause = s.other.cause.clone();
            }
        }
    }
    for v in shards.iter().flat_map(|s| &s.keys) {
        if let Some(name) = v.key.strip_prefix("provider:") {
            row(&mut providers, name);
            add_key(providers.get_mut(name).expect("just made"), v);
        } else if v.key.starts_with("domain:") {
            // A domain with its own rule: a row of its own, its key the buttons'.
            let r = providers
                .entry(v.key.clone())
                .or_insert_with(|| ProviderRow {
                    provider: v.key.clone(),
                    key: Some(v.key.clone()),
                    backoff_factor: 1.0,
                    ..ProviderRow::default()
                });
            add_key(r, v);
        } else if let Some((source, dest)) = v
            .key
            .strip_prefix("source:")
            .and_then(|k| k.split_once('>'))
        {
            let s = sources.entry(&v.key).or_insert_with(|| SourceRow {
                source: source.to_string(),
                destination: dest.to_string(),
                key: v.key.clone(),
                rate: 0.0,
                backed_off: false,
                suspended_s: 0,
                paused: false,
                cause: None,
                warmup: None,
            });
            s.rate += v.measured_rate.unwrap_or(0.0);
            s.backed_off |= v.backed_off;
            s.suspended_s = s.suspended_s.max(v.suspended_s);
            s.paused |= v.paused;
            s.cause = s.cause.take().or_else(|| v.cause.clone());
            if let Some(w) = &v.warmup {
                let t = s.warmup.get_or_insert(WarmupView {
                    day: w.day,
                    days: w.days,
                    cap_today: Some(0),
                    sent_today: 0,
                });
                t.day = t.day.max(w.day);
                t.cap_today = t.cap_today.zip(w.cap_today).map(|(a, b)| a + b);
                t.sent_today += w.sent_today;
            }
        }
    }
    bounces.sort_by(|a, b| b.time.cmp(&a.time));
    bounces.truncate(BOUNCES_SHOWN_MAX);
    Status {
        shards: shards.len(),
        totals: board.totals(),
        queue,
        history: board
            .history()
            .iter()
            .map(|s: &Sample| [s.unix_s, s.delivered, s.failed, s.deferred])
            .collect(),
        providers: providers.into_values().collect(),
        sources: sources.into_values().collect(),
        campaigns,
        bounces,
        service: board.service(),
    }
}

/// Adds one shard's view of a provider's key to its row.
fn add_key(r: &mut ProviderRow, v: &KeyView) {
    let sum = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    };
    r.rate += v.measured_rate.unwrap_or(0.0);
    r.limit = sum(r.limit, v.rate);
    r.configured = sum(r.configured, v.configured_rate);
    r.connections_cap = match (r.connections_cap, v.connections_cap) {
        (Some(a), Some(b)) => Some(a + b as u64),
        (a, b) => a.or(b.map(|b| b as u64)),
    };
    r.backoff_factor = r.backoff_factor.min(v.backoff_factor);
    r.backed_off += u64::from(v.backed_off);
    r.suspended_s = r.suspended_s.max(v.suspended_s);
    r.paused |= v.paused;
    r.operator_rate |= v.operator_rate;
    if r.cause.is_none() {
        r.cause = v.cause.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::metrics::{OtherKeys, OutcomeKey, ShardView, Tally};
    use std::sync::Arc;

    fn key(key: &str, rate: f64, backed_off: bool, cause: Option<&str>) -> KeyView {
        KeyView {
            key: key.into(),
            rate: Some(rate),
            configured_rate: Some(10.0),
            measured_rate: Some(rate),
            connections: 2,
            connections_cap: Some(4),
            backed_off,
            backoff_factor: if backed_off { 0.5 } else { 1.0 },
            suspended_s: 0,
            paused: false,
            operator_rate: false,
            cause: cause.map(Into::into),
            warmup: None,
        }
    }

    #[test]
    fn shards_fold_into_provider_and_source_rows() {
        let b = Board::new(2);
        for id in 0..2 {
            let mut t = Tally::default();
            let k = OutcomeKey {
                outcome: Outcome::Delivered,
                class: "",
                provider: Arc::from("gmail"),
                source: None,
            };
            t.outcome(&k, true, 1.0);
            let mut source = key("source:192.0.2.1>provider:gmail", 3.0, false, None);
            source.warmup = Some(WarmupView {
                day: 2,
                days: 30,
                cap_today: Some(50),
                sent_today: 20,
            });
            b.publish(
                id,
                ShardView {
                    tally: t,
                    ready: 5,
                    connections: vec![(Arc::from("gmail"), 2)],
                    keys: vec![
                        // One shard backed off, with the reply that caused it.
                        key(
                            "provider:gmail",
                            5.0,
                            id == 1,
                            (id == 1).then_some("421 4.7.28 slow down"),
                        ),
                        key("domain:example.com", 1.0, false, None),
                        source,
                    ],
                    other: {
                        let mut o = OtherKeys::default();
                        o.add(&key("site:mx.tail.example", 1.0, true, Some("421 busy")));
                        o
                    },
                    ..ShardView::default()
                },
            );
        }
        let s = status(&b, Vec::new());
        assert_eq!(s.queue.ready, 10);
        let gmail = s.providers.iter().find(|p| p.provider == "gmail").unwrap();
        assert_eq!(gmail.key.as_deref(), Some("provider:gmail"));
        assert_eq!((gmail.delivered, gmail.connections), (2, 4));
        assert_eq!(
            (gmail.rate, gmail.limit, gmail.configured),
            (10.0, Some(10.0), Some(20.0))
        );
        assert_eq!((gmail.backed_off, gmail.backoff_factor), (1, 0.5));
        assert_eq!(gmail.cause.as_deref(), Some("421 4.7.28 slow down"));
        let other = s
            .providers
            .iter()
            .find(|p| p.provider == OTHER_PROVIDER)
            .unwrap();
        assert_eq!((other.key.as_deref(), other.backed_off), (None, 2));
        assert_eq!(other.cause.as_deref(), Some("421 busy"));
        let domain = s
            .providers
            .iter()
            .find(|p| p.provider == "domain:example.com")
            .unwrap();
        assert_eq!(
            (domain.key.as_deref(), domain.rate),
            (Some("domain:example.com"), 2.0)
        );
        let src = &s.sources[0];
        assert_eq!(
            (src.source.as_str(), src.destination.as_str()),
            ("192.0.2.1", "provider:gmail")
        );
        let w = src.warmup.as_ref().unwrap();
        assert_eq!((w.day, w.cap_today, w.sent_today), (2, Some(100), 40));
    }
}
