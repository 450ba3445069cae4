//! Starting and watching the shards: the resolver thread, one thread per shard, a
//! progress bar, and the report when every recipient is done (or `stop` is set).

use crate::deliver::config::EngineConfig;
use crate::deliver::control::{self, Command, Status};
use crate::deliver::dns::Resolver;
use crate::deliver::shard::{self, Progress};
use crate::policy::shaping::rules::Rules;
use crate::spool::ingest::Instances;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Recipients the shards found queued when they started.
    pub recipients: u64,
    pub delivered: u64,
    pub bounced: u64,
    pub expired: u64,
    /// Temporary failures seen (a recipient may have several).
    pub deferrals: u64,
    /// Recipients sent again after a lost connection cut their transaction off.
    pub requeued: u64,
    /// Recipients still queued when the run ended (stopped early).
    pub remaining: u64,
    pub elapsed_s: f64,
    /// Delivered recipients per second of the run.
    pub delivered_per_s: f64,
    /// From queueing to delivery, milliseconds.
    pub latency_ms_p50: u64,
    pub latency_ms_p90: u64,
    pub latency_ms_p99: u64,
    pub latency_ms_max: u64,
    /// The IO driver the shards ran on: `io-uring`, `epoll`, `mixed` (under
    /// `--driver auto`, when some shards could not set up io_uring), or `none` when
    /// no shard ended cleanly (the run's error says why).
    pub driver: String,
}

impl Report {
    pub fn print(&self) {
        println!("recipients   {}", self.recipients);
        println!("delivered    {}", self.delivered);
        println!("bounced      {}", self.bounced);
        println!("expired      {}", self.expired);
        if self.remaining > 0 {
            println!(
                "still queued {} (kept in the spool with their retry times; send the campaign again to go on)",
                self.remaining
            );
        } else {
            println!("still queued 0");
        }
        println!(
            "deferrals    {} (temporary failures, retried)",
            self.deferrals
        );
        println!(
            "requeued     {} (cut off by a lost connection before a reply, sent again)",
            self.requeued
        );
        println!(
            "elapsed      {:.2} s, {:.0} delivered/s, {} driver",
            self.elapsed_s, self.delivered_per_s, self.driver
        );
        println!(
            "latency      queue→delivery p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            self.latency_ms_p50, self.latency_ms_p90, self.latency_ms_p99, self.latency_ms_max
        );
    }
}

/// The shaping rules for this run; every pool a campaign names must exist.
pub fn load_rules(cfg: &EngineConfig, instances: &Instances) -> anyhow::Result<Rules> {
    let rules = cfg.rules().map_err(|problems| {
        let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        anyhow::anyhow!("shaping rules:\n{}", list.join("\n"))
    })?;
    for inst in instances.values() {
        if let Some(pool) = &inst.settings.pool {
            anyhow::ensure!(
                rules.pools.contains_key(pool),
                "campaign {} sends from pool `{pool}`, which no shaping file defines; \
                 add [pool.{pool}] to the --shaping file or remove `pool` from the campaign",
                inst.settings.id
            );
        }
    }
    Ok(rules)
}

/// What `volley serve` adds to a run: it goes on until `stop`, taking new work.
pub struct Serving {
    /// One inbox per shard (inbox.rs).
    pub inboxes: Vec<tokio::sync::mpsc::Receiver<crate::spool::inbox::Inbound>>,
    /// Admin socket commands of the daemon's own (`inject`, `progress`).
    pub admin: control::Extra,
    /// Set once the admin socket is bound and every shard thread is started.
    pub ready: Arc<AtomicBool>,
    /// Where SIGHUP publishes new shaping and bounce rules.
    pub reloads: Arc<shard::Reloads>,
    /// The status `volley queue status` shows; the daemon adds its own lines.
    pub status: Arc<Status>,
}

/// Runs every shard until its recipients are all terminal or `stop` is set.
pub fn run(
    cfg: EngineConfig,
    instances: Instances,
    stop: Arc<AtomicBool>,
    show_progress: bool,
) -> anyhow::Result<Report> {
    run_with(cfg, instances, stop, show_progress, None, None)
}

/// As [`run`]; with `serving`, the shards run until `stop` alone, taking new work.
/// With `board`, the shards publish their metrics there (one view per shard,
/// `cfg.shards` of them) once a second.
pub fn run_with(
    cfg: EngineConfig,
    instances: Instances,
    stop: Arc<AtomicBool>,
    show_progress: bool,
    serving: Option<Serving>,
    board: Option<Arc<crate::observe::metrics::Board>>,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    // DSNs go out as submitted messages (dsn.rs): a spool whose campaigns ask for
    // them gets a submission instance. The caller holds the spool lock.
    let wants_dsn = instances.values().any(|i| i.settings.dsn);
    let instances = match wants_dsn && !instances.values().any(|i| i.submission) {
        true => {
            crate::spool::ingest::submission_instance(&cfg.spool_dir, &cfg.ehlo_name)?;
            Arc::new(crate::spool::ingest::load_instances(&cfg.spool_dir)?)
        }
        false => instances,
    };
    let rules = Arc::new(load_rules(&cfg, &instances)?);
    let warmup = Arc::new(crate::policy::shaping::warmup::Ledger::load(
        &cfg.spool_dir,
    )?);
    let leases = Arc::new(crate::policy::shaping::Leases::default());
    let dkim = Arc::new(
        crate::message::dkim::keys_for(
            &cfg.dkim_dir,
            instances.values().map(|i| (i.no, &i.settings)),
        )
        .map_err(|e| anyhow::anyhow!(e))?,
    );
    let tls_roots = match &cfg.tls_roots {
        Some(path) => crate::deliver::tls::read_roots(path)
            .map_err(|why| anyhow::anyhow!("--tls-roots {}: {why}", path.display()))?,
        None => Vec::new(),
    };
    let tls_roots = Arc::new(tls_roots);
    let sts = cfg.mta_sts.then(|| crate::deliver::mta_sts::StsSettings {
        cache_dir: Some(cfg.spool_dir.join("mta-sts")),
        https_port: cfg.https_port,
        tls: crate::deliver::tls::client_config(true, &tls_roots),
    });
    let tls_rpt = match cfg.tls_rpt && cfg.mta_sts {
        true => Some(Arc::new(crate::deliver::tls_rpt::Recorder::open(
            &cfg.spool_dir,
        )?)),
        false => None,
    };
    let cfg = Arc::new(cfg);
    let resolver = Resolver::start(&cfg.dns, sts)?;
    let classifier = Arc::new(crate::policy::classify::load(cfg.bounce_rules.as_deref())?);
    let status = serving
        .as_ref()
        .map_or_else(Default::default, |s| s.status.clone());
    *status.per_shard.lock().expect("status lock") = vec![Vec::new(); cfg.shards];
    let board = board.unwrap_or_else(|| Arc::new(crate::observe::metrics::Board::new(cfg.shards)));
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..cfg.shards)
        .map(|_| crossbeam_channel::bounded::<Command>(control::COMMANDS_QUEUED_MAX))
        .unzip();
    let admin_stop = Arc::new(AtomicBool::new(false));
    let (mut inboxes, extra, ready, reloads) = match serving {
        Some(s) => (
            s.inboxes.into_iter().map(Some).collect(),
            Some(s.admin),
            Some(s.ready),
            s.reloads,
        ),
        None => (Vec::new(), None, None, Arc::default()),
    };
    inboxes.resize_with(cfg.shards, || None);
    // Without the socket (a spool path over the 108-octet limit, a read-only spool)
    // the run goes on: control is a convenience, delivery is the job.
    let admin = control::serve(
        control::socket_path(&cfg.spool_dir),
        crate::host::peers::AdminAccess::new(cfg.admin_group.clone()),
        senders.clone(),
        status.clone(),
        admin_stop.clone(),
        extra,
    )
    .map_err(|e| eprintln!("volley: {e}; `volley queue` will not reach this run"))
    .ok();
    let progress: Vec<Arc<Progress>> = (0..cfg.shards)
        .map(|_| Arc::new(Progress::default()))
        .collect();
    let mut handles = Vec::new();
    for (((id, p), control), inbox) in progress.iter().enumerate().zip(receivers).zip(inboxes) {
        let (cfg, inst, stop) = (cfg.clone(), instances.clone(), stop.clone());
        let links = shard::Links {
            classifier: classifier.clone(),
            rules: rules.clone(),
            warmup: warmup.clone(),
            leases: leases.clone(),
            resolver: resolver.clone(),
            tls_roots: tls_roots.clone(),
            progress: p.clone(),
            control,
            peers: senders.clone(),
            dkim: dkim.clone(),
            status: status.clone(),
            board: board.clone(),
            tls_rpt: tls_rpt.clone(),
            stop: stop.clone(),
            inbox,
            reloads: reloads.clone(),
        };
        let done = p.clone();
        let h = std::thread::Builder::new()
            .name(format!("shard-{id}"))
            .spawn(move || {
                let r = shard::run(id, cfg, inst, links);
                if r.is_err() {
                    // One shard failing stops the rest: better a clean stop than a partial run.
                    stop.store(true, Ordering::Relaxed);
                }
                done.done.store(true, Ordering::Relaxed);
                r
            })?;
        handles.push(h);
    }
    if let Some(r) = &ready {
        r.store(true, Ordering::Relaxed);
    }
    let bar = show_progress.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} done, {per_sec}, eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    });
    let sum = |f: fn(&Progress) -> u64| progress.iter().map(|p| f(p)).sum::<u64>();
    let save_ledgers = || {
        if let Err(e) = warmup.save() {
            eprintln!(
                "volley: {}: {e}; today's warm-up counts may be lost",
                cfg.spool_dir.join("warmup.tsv").display()
            );
        }
        if let Some(Err(e)) = tls_rpt.as_ref().map(|r| r.save()) {
            eprintln!(
                "volley: {}: {e}; today's TLS-RPT counts may be lost",
                cfg.spool_dir.join(crate::deliver::tls_rpt::DIR).display()
            );
        }
    };
    let mut ticks = 0u32;
    while !progress.iter().all(|p| p.done.load(Ordering::Relaxed)) {
        std::thread::sleep(Duration::from_millis(100));
        ticks += 1;
        if ticks % 10 == 0 {
            save_ledgers();
        }
        if let Some(b) = &bar {
            b.set_length(sum(|p| p.recovered.load(Ordering::Relaxed)));
            let (d, bo, e) = (
                sum(|p| p.delivered.load(Ordering::Relaxed)),
                sum(|p| p.bounced.load(Ordering::Relaxed)),
                sum(|p| p.expired.load(Ordering::Relaxed)),
            );
            b.set_position(d + bo + e);
            let shaping = status.lines();
            b.set_message(format!(
                "delivered {d} bounced {bo} expired {e} deferrals {}{}{}",
                sum(|p| p.deferrals.load(Ordering::Relaxed)),
                if shaping.is_empty() { "" } else { "\n" },
                shaping.join("\n")
            ));
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    admin_stop.store(true, Ordering::Relaxed);
    if let Some(a) = admin {
        let _ = a.join();
    }
    let mut latency = Histogram::<u64>::new(3).expect("valid");
    let mut remaining = 0;
    let mut drivers = Vec::new();
    let mut errors = Vec::new();
    for (id, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(r)) => {
                latency.add(&r.latency_ms).expect("same bounds");
                remaining += r.remaining;
                drivers.push(r.driver);
            }
            Ok(Err(e)) => errors.push(format!("shard {id}: {e:#}")),
            Err(_) => errors.push(format!("shard {id}: panicked")),
        }
    }
    save_ledgers();
    anyhow::ensure!(errors.is_empty(), "{}", errors.join("; "));
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = sum(|p| p.delivered.load(Ordering::Relaxed));
    Ok(Report {
        recipients: sum(|p| p.recovered.load(Ordering::Relaxed)),
        delivered,
        bounced: sum(|p| p.bounced.load(Ordering::Relaxed)),
        expired: sum(|p| p.expired.load(Ordering::Relaxed)),
        deferrals: sum(|p| p.deferrals.load(Ordering::Relaxed)),
        requeued: sum(|p| p.requeued.load(Ordering::Relaxed)),
        remaining,
        elapsed_s: elapsed,
        delivered_per_s: delivered as f64 / elapsed.max(1e-9),
        latency_ms_p50: latency.value_at_quantile(0.5),
        latency_ms_p90: latency.value_at_quantile(0.9),
        latency_ms_p99: latency.value_at_quantile(0.99),
        latency_ms_max: latency.max(),
        driver: match drivers.first() {
            Some(d) if drivers.iter().all(|x| x == d) => d.to_string(),
            Some(_) => "mixed".into(),
            None => "none".into(),
        },
    })
}
