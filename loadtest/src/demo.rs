//! `volley-load demo`: the whole path on loopback with nothing to set up. The bundled
//! sink and test DNS start in-process, a campaign is generated, sent through a
//! fresh spool, and the engine's report is checked against what the sink saw.

use crate::{dns, gen, profile::Profile, sink};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use volley::deliver::config::EngineConfig;
use volley::message::campaign::Campaign;
use volley::spool::ingest;

pub struct DemoOptions {
    pub recipients: u64,
    pub profile: String,
    pub shards: Option<usize>,
    pub sink_threads: usize,
    pub driver: volley::deliver::runtime::Driver,
    /// Keep the work directory (campaign, spool, log) instead of deleting it.
    pub keep: bool,
}

pub fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("volley-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let mut profile = Profile::load(&opts.profile)?;
    profile.set_port(0);
    let sink = sink::Sink::start(sink::SinkOptions {
        profile,
        threads: opts.sink_threads,
        driver: opts.driver,
        keep: None,
        tls_files: None,
    })?;
    let dns = dns::start(
        "127.0.0.1:0".parse().expect("valid"),
        dns::Zone::from_profile(sink.profile(), &sink.addrs),
    )?;
    println!(
        "demo: sink on 127.0.0.10-15 port {}, test DNS on {}",
        sink.port(),
        dns.addr
    );

    let campaign_dir = work.join("campaign");
    let g = gen::write_campaign(
        &campaign_dir,
        &gen::GenOptions {
            recipients: opts.recipients,
            campaign_id: "demo".into(),
            ..gen::GenOptions::default()
        },
    )?;
    println!(
        "demo: generated {} recipients over {} domains in {}",
        g.recipients,
        g.per_domain.len(),
        campaign_dir.display()
    );

    let mut cfg = EngineConfig::new(work.join("spool"));
    if let Some(n) = opts.shards {
        cfg.shards = n;
    }
    cfg.driver = opts.driver;
    cfg.dns.server = Some(dns.addr);
    cfg.smtp_port = sink.port();
    cfg.ehlo_name = "demo.volley.test".into();
    // A demo should end in seconds: short retries instead of the per-class schedules.
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(2),
        std::time::Duration::from_secs(4),
    ]);
    let campaign = Campaign::load(&campaign_dir)
        .map_err(|p| anyhow::anyhow!("generated campaign is invalid: {p:?}"))?;
    let lock = ingest::lock_spool(&cfg.spool_dir, cfg.shards)?;
    cfg.shards = lock.shards;
    let ing = ingest::ingest(&campaign, &cfg.spool_dir, cfg.shards, cfg.segment_bytes)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    println!(
        "demo: queued {} recipients durably in {:.2} s",
        ing.recipients,
        ing.elapsed.as_secs_f64()
    );
    let instances = Arc::new(ingest::load_instances(&cfg.spool_dir)?);
    sink.reset_latency_origin();
    let log_path: PathBuf = cfg.log_path.clone();
    let report =
        volley::deliver::engine::run(cfg, instances, Arc::new(AtomicBool::new(false)), true)?;
    report.print();
    let s = sink.summary();
    println!(
        "sink         accepted {} recipients, {} duplicates, {} corrupt, {} without integrity header",
        s.counts.rcpts_accepted, s.counts.duplicates, s.counts.corrupt, s.counts.no_integrity
    );
    println!("accounting   {}", log_path.display());
    anyhow::ensure!(
        s.counts.corrupt == 0,
        "the sink found {} corrupt messages",
        s.counts.corrupt
    );
    anyhow::ensure!(
        s.counts.rcpts_accepted >= report.delivered,
        "the engine reports {} delivered but the sink accepted {}",
        report.delivered,
        s.counts.rcpts_accepted
    );
    drop(lock);
    if opts.keep {
        println!("demo: kept {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}
