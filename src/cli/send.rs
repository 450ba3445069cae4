//! `volley send`: a campaign queued durably and delivered by shards started here; when
//! a running `volley serve` holds the spool, the campaign is handed over to it instead
//! and its progress followed, so one command works with or without the daemon.

use super::{ehlo_name, print_problems, print_warnings, report_compliance};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use volley::deliver::config::EngineConfig;
use volley::deliver::runtime::Driver;
use volley::message::campaign::Campaign;
use volley::policy::shaping::rules::{parse_per, Set};
use volley::spool::ingest::{self, IngestError};

#[derive(Args)]
pub(crate) struct EngineArgs {
    /// Spool directory (created if missing).
    #[arg(long, default_value = "/var/spool/volley")]
    spool: PathBuf,
    /// Accounting log (JSON lines); default SPOOL/accounting.jsonl.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Rotate the accounting log before it passes this size ("1GiB", "64KiB"; 0:
    /// never for size); rotated files are gzipped.
    #[arg(long, default_value = "1GiB")]
    log_rotate_size: String,
    /// Rotate the accounting log at the first record of each UTC day.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    log_rotate_daily: bool,
    /// Delete rotated accounting logs last written more than this many days ago (0: keep them).
    #[arg(long, default_value_t = volley::observe::rotation::KEEP_DAYS_DEFAULT)]
    log_keep_days: u32,
    /// Give the accounting log (mode 0640) to this group, for log shippers.
    #[arg(long)]
    log_group: Option<String>,
    /// Shard threads; default the number of cores. A spool keeps the count it was created with.
    #[arg(long)]
    shards: Option<usize>,
    #[arg(long, value_enum, default_value_t = Driver::Auto)]
    driver: Driver,
    /// Nameserver to ask (ADDR:PORT); default /etc/resolv.conf.
    #[arg(long)]
    dns: Option<std::net::SocketAddr>,
    /// Port of the receiving MTAs.
    #[arg(long, default_value_t = 25)]
    smtp_port: u16,
    /// Name to send in EHLO: a fully qualified domain name (the sending address's
    /// reverse-DNS name) or an address literal like [192.0.2.1] (RFC 5321 §4.1.1.1);
    /// default the host name (localhost.localdomain, with a warning, when it has no dot).
    #[arg(long)]
    ehlo: Option<String>,
    /// DKIM keys: DIR/DOMAIN/SELECTOR.pem (`volley dkim keygen`).
    #[arg(long, default_value = volley::message::dkim::DEFAULT_DIR)]
    dkim_dir: PathBuf,
    /// Traffic shaping rules (TOML), merged over the shipped defaults and tuning/
    /// provider profiles; see `volley shaping check` and `volley shaping show`.
    #[arg(long)]
    shaping: Option<PathBuf>,
    /// Connections per destination over all shards (the rules' [default] max_connections).
    #[arg(long)]
    max_conns_per_site: Option<u32>,
    /// Messages per connection (the rules' [default] max_msgs_per_conn).
    #[arg(long)]
    max_msgs_per_conn: Option<u32>,
    /// Messages per second per destination over all shards, e.g. "100/s", "3000/min"
    /// (the rules' [default] max_msg_rate).
    #[arg(long)]
    max_msg_rate: Option<String>,
    /// Pipelined transactions in flight per connection (CHUNKING servers).
    #[arg(long)]
    window: Option<usize>,
    /// One retry schedule for every reply class, e.g. "5m,10m,20m" (the last delay repeats).
    #[arg(long)]
    retry_schedule: Option<String>,
    /// A schedule for one class, e.g. "throttled=1m,2m,4m" (repeatable; applied after --retry-schedule).
    #[arg(long)]
    retry_schedule_for: Vec<String>,
    /// Your reply classification rules, tried before the shipped ones (see `volley classify`).
    #[arg(long)]
    bounce_rules: Option<PathBuf>,
    /// STARTTLS: opportunistic (when offered), required (never in clear), disabled
    /// (the rules' [default] tls; provider and domain rules may differ).
    #[arg(long, value_enum)]
    tls: Option<volley::smtp::client::TlsMode>,
    /// Verify MX certificates against the Mozilla roots (webpki-roots) and the MX name.
    #[arg(long)]
    tls_verify: bool,
    /// A PEM file of CA certificates trusted besides webpki-roots' wherever a
    /// certificate is verified (MTA-STS policy hosts, --tls-verify, enforced
    /// policies): a private CA.
    #[arg(long, value_name = "FILE")]
    tls_roots: Option<PathBuf>,
    /// Ignore MTA-STS policies (RFC 8461); by default a domain's policy in enforce
    /// mode is honoured (TLS, verified, to the MX hosts it names, or nothing).
    #[arg(long)]
    no_mta_sts: bool,
    /// Honour DANE (RFC 7672): an MX host with DNSSEC-signed TLSA records gets mail
    /// only over TLS with a certificate they name; a bogus or failed lookup defers
    /// the host. Needs a nameserver that returns DNSSEC records.
    #[arg(long)]
    dane: bool,
    /// DNSKEY records (zone-file lines) to validate DNSSEC from instead of the IANA
    /// root keys (a private signed zone). Only with --dane.
    #[arg(long, value_name = "FILE", requires = "dane")]
    dnssec_trust_anchor: Option<PathBuf>,
    /// Count TLS sessions to domains with an MTA-STS policy, and with --dane to MX
    /// hosts with TLSA records, for TLS-RPT (RFC 8460) under SPOOL/tls-rpt, a ledger
    /// per UTC day; a `volley serve` on this spool sends each day's reports once the
    /// day has ended.
    #[arg(long)]
    tls_rpt: bool,
    /// The HTTPS port MTA-STS policies are fetched from (443; the tests' policy
    /// server listens elsewhere).
    #[arg(long, default_value_t = 443, hide = true)]
    mta_sts_port: u16,
    /// A group whose members may use the admin socket (`volley queue`) besides root
    /// and the user running send: the socket is made 0660 and the group's, the spool
    /// 0710. Default: root and that user alone (0600).
    #[arg(long, value_name = "NAME")]
    admin_group: Option<String>,
    /// How long a campaign whose recipients are all final keeps its copy in the
    /// spool ("7d", "12h", "0s"); then, at the next start, the copy is pruned and a
    /// tombstone (campaigns/N/pruned) stays. The accounting log is never touched.
    #[arg(long, default_value = "7d", value_parser = spool_retention)]
    spool_retention: Duration,
}

/// Parses `--spool-retention`: a duration up to `SPOOL_RETENTION_MAX`.
fn spool_retention(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e}; write e.g. \"7d\", \"12h\", \"0s\""))?;
    let max = volley::spool::retention::SPOOL_RETENTION_MAX;
    if d > max {
        return Err(format!(
            "{s:?} is over {} days; use 0s to 3650d",
            max.as_secs() / 86_400
        ));
    }
    Ok(d)
}

impl EngineArgs {
    pub(crate) fn config(self) -> anyhow::Result<EngineConfig> {
        let mut c = EngineConfig::new(self.spool);
        if let Some(l) = self.log {
            c.log_path = l;
        }
        c.log_rotation = volley::observe::rotation::Rotation {
            size_max: match volley::serve::config::parse_size(&self.log_rotate_size) {
                Some(0) => None,
                Some(b) if b >= volley::observe::rotation::LOG_ROTATE_SIZE_MIN => Some(b),
                _ => anyhow::bail!(
                    "--log-rotate-size {:?}: write a size of at least 64KiB (\"1GiB\", \"64KiB\"), or 0 for no rotation by size",
                    self.log_rotate_size
                ),
            },
            daily: self.log_rotate_daily,
            keep_days: (self.log_keep_days > 0).then_some(self.log_keep_days),
            group: self
                .log_group
                .map(|g| volley::host::accounts::group(&g))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--log-group: {e}"))?,
        };
        if let Some(n) = self.shards {
            anyhow::ensure!(n >= 1, "--shards must be at least 1");
            c.shards = n;
        }
        c.driver = self.driver;
        c.spool_retention = self.spool_retention;
        let d = &mut c.defaults;
        d.tls = self.tls.map(Set::cli);
        d.tls_verify = self.tls_verify.then(|| Set::cli(true));
        c.dns.server = self.dns;
        c.dns.dane = self.dane.then_some(volley::deliver::dns::DaneSettings {
            trust_anchor: self.dnssec_trust_anchor,
        });
        c.smtp_port = self.smtp_port;
        c.mta_sts = !self.no_mta_sts;
        anyhow::ensure!(
            !(self.tls_rpt && self.no_mta_sts),
            "--tls-rpt counts sessions under MTA-STS policies: it cannot go with --no-mta-sts"
        );
        c.tls_rpt = self.tls_rpt;
        c.https_port = self.mta_sts_port;
        c.tls_roots = self.tls_roots;
        if let Some(e) = ehlo_name(self.ehlo.as_deref())? {
            c.ehlo_name = e;
        }
        if let Some(n) = self.max_conns_per_site {
            anyhow::ensure!(n >= 1, "--max-conns-per-site must be at least 1");
            c.defaults.max_connections = Some(Set::cli(n));
        }
        if let Some(n) = self.max_msgs_per_conn {
            anyhow::ensure!(n >= 1, "--max-msgs-per-conn must be at least 1");
            c.defaults.max_msgs_per_conn = Some(Set::cli(n));
        }
        if let Some(r) = self.max_msg_rate {
            let r = parse_per(&r).map_err(|e| anyhow::anyhow!("--max-msg-rate: {e}"))?;
            c.defaults.max_msg_rate = Some(Set::cli(r));
        }
        if let Some(g) = &self.admin_group {
            let g = volley::host::accounts::group(g)
                .map_err(|e| anyhow::anyhow!("--admin-group: {e}"))?;
            c.admin_group = Some(g);
        }
        c.shaping_file = self.shaping;
        c.dkim_dir = self.dkim_dir;
        // Checked now, so bad rules stop `send` before anything is queued.
        match c.rules() {
            Ok(_) => {}
            Err(problems) => {
                for p in &problems {
                    eprintln!("{p}");
                }
                anyhow::bail!("{} problem(s) in the shaping rules", problems.len());
            }
        }
        if let Some(n) = self.window {
            anyhow::ensure!((1..=256).contains(&n), "--window must be 1..=256");
            c.window = n;
        }
        if let Some(p) = self.bounce_rules {
            // Checked now, so a bad rule stops `send` before anything is queued.
            volley::policy::classify::load(Some(&p))?;
            c.bounce_rules = Some(p);
        }
        if let Some(s) = self.retry_schedule {
            c.retry = volley::policy::retry::RetryPolicy::uniform(
                volley::policy::retry::parse_schedule(&s)?,
            );
        }
        for s in self.retry_schedule_for {
            let (class, sched) = volley::policy::retry::parse_class_schedule(&s)?;
            c.retry.per_class.retain(|(k, _)| *k != class);
            c.retry.per_class.push((class, sched));
        }
        Ok(c)
    }
}

/// Spool housekeeping at start (spool/retention.rs): instances final for
/// `spool_retention` are pruned, each said on stderr.
fn prune_finished(cfg: &EngineConfig) -> anyhow::Result<()> {
    let pruned = volley::spool::retention::at_start(
        &cfg.spool_dir,
        cfg.shards,
        cfg.segment_bytes,
        cfg.spool_retention,
        std::time::SystemTime::now(),
    )?;
    for t in pruned {
        eprintln!(
            "volley: pruned campaign {} (instance {}, final since {}) from the spool; its accounting stays in {}",
            t.campaign,
            t.instance,
            t.finished_at,
            cfg.log_path.display()
        );
    }
    Ok(())
}

/// Hands the campaign in `dir` to the `volley serve` that holds `spool`, over its
/// admin socket, and follows its progress until every recipient is done (0), or
/// until `max_wait` or a signal (75: the daemon goes on delivering).
fn hand_over(
    dir: &std::path::Path,
    campaign: &Campaign,
    spool: &std::path::Path,
    new: bool,
    max_wait: Option<Duration>,
    quiet: bool,
) -> anyhow::Result<i32> {
    use std::sync::atomic::Ordering;
    let abs = dir
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    use volley::deliver::control::{INJECT, INJECT_NEW};
    let verb = if new { INJECT_NEW } else { INJECT };
    let line = format!("{verb}{}", abs.display());
    let answer =
        match volley::deliver::control::request_waiting(spool, &line, Duration::from_secs(600)) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("{e:#}");
                eprintln!(
                "volley: the volley process holding spool {} refused the campaign; nothing queued",
                spool.display()
            );
                return Ok(1);
            }
        };
    let words: Vec<&str> = answer.split_whitespace().collect();
    let (instance, queued) = match words.as_slice() {
        ["ok:", "queued", n, "instance", m] => (m.parse::<u32>()?, Some(n.parse::<u64>()?)),
        ["ok:", "running", "instance", m] => (m.parse::<u32>()?, None),
        _ => anyhow::bail!("unexpected answer from volley serve: {answer}"),
    };
    match queued {
        Some(n) => println!(
            "queued {n} recipients of campaign {} (instance {instance}) in the running volley serve",
            campaign.settings.id
        ),
        None => eprintln!(
            "volley: campaign {} is already in the running volley serve (instance {instance}); following it (--new queues it again)",
            campaign.settings.id
        ),
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let started = std::time::Instant::now();
    let bar = (!quiet).then(|| {
        let b = indicatif::ProgressBar::new(queued.unwrap_or(0));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} done, {per_sec}, eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    });
    let counts = loop {
        let a = volley::deliver::control::request(
            spool,
            &format!("{}{instance}", volley::deliver::control::PROGRESS),
        )?;
        // "ok: delivered D bounced B expired E deferrals T queued Q running S/N"
        let n: Vec<u64> = a
            .split(|c: char| c.is_whitespace() || c == '/')
            .filter_map(|w| w.parse().ok())
            .collect();
        anyhow::ensure!(
            n.len() == 7,
            "unexpected progress answer from volley serve: {a}"
        );
        if let Some(b) = &bar {
            let done = n[0] + n[1] + n[2];
            b.set_length(done + n[4]);
            b.set_position(done);
            b.set_message(format!(
                "delivered {} bounced {} expired {} deferrals {}",
                n[0], n[1], n[2], n[3]
            ));
        }
        let out_of_time = max_wait.is_some_and(|w| started.elapsed() >= w);
        let all_running = n[5] >= n[6];
        if (all_running && n[4] == 0) || stop.load(Ordering::Relaxed) || out_of_time {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    println!("delivered    {}", counts[0]);
    println!("bounced      {}", counts[1]);
    println!("expired      {}", counts[2]);
    println!("deferrals    {} (temporary failures, retried)", counts[3]);
    println!(
        "still queued {}{}",
        counts[4],
        if counts[4] > 0 {
            " (the running volley serve goes on delivering them)"
        } else {
            ""
        }
    );
    Ok(if counts[4] > 0 { 75 } else { 0 })
}

/// How long `--metrics`' listener gets to close when the send ends.
const METRICS_STOP_WAIT: Duration = Duration::from_secs(2);

/// `volley send`'s own flags (besides the engine's).
#[derive(clap::Args, Debug)]
pub(crate) struct SendOptions {
    /// Queue it as a new campaign instance even if this id is already in the spool.
    #[arg(long)]
    new: bool,
    /// Stop after this long (e.g. "10m"), leaving what is not done in the spool.
    #[arg(long)]
    max_wait: Option<humantime::Duration>,
    /// Write the report as JSON here too.
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Queue the good rows and log each bad one as a local bounce (type Bounce,
    /// stage local, class invalid_recipient 5.1.3 for an address, content 5.6.0
    /// for a row that would make an invalid message) instead of refusing the
    /// whole campaign. A CSV syntax error still refuses it.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Serve Prometheus metrics (GET /metrics: the outcomes, queue, connections,
    /// shaping and spool ones `volley serve` has) on this loopback address while
    /// the send runs, e.g. 127.0.0.1:9101. No token is asked, so it must be
    /// loopback. Ignored (with a warning) when the campaign is handed to a running
    /// `volley serve`, whose /metrics has it.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

pub(crate) fn run(
    dir: &std::path::Path,
    cfg: EngineConfig,
    options: SendOptions,
) -> anyhow::Result<i32> {
    let SendOptions {
        new,
        max_wait,
        report_json,
        quiet,
        skip_bad_rows,
        metrics,
    } = options;
    let max_wait: Option<Duration> = max_wait.map(Into::into);
    let metrics = match metrics {
        Some(addr) => Some((addr, volley::serve::monitor::bind_metrics(addr)?)),
        None => None,
    };
    // A trust anchor or nameserver DANE cannot work with: said before anything is
    // queued, not after.
    volley::deliver::dns::check_dane(&cfg.dns).map_err(|e| e.context("nothing queued"))?;
    let campaign = match Campaign::load(dir) {
        Ok(c) => c,
        Err(problems) => {
            print_problems(dir, &problems);
            eprintln!("volley: campaign refused, nothing queued");
            return Ok(1);
        }
    };
    report_compliance(dir, &campaign);
    print_warnings(dir, &campaign.template_warnings);
    let mut cfg = cfg;
    let lock = match ingest::lock_spool(&cfg.spool_dir, cfg.shards) {
        Ok(l) => l,
        // A running `volley serve` holds it, or it is the service user's and this
        // user may only reach its admin socket (admin_group): the campaign goes to
        // the daemon, which checks it again (its DKIM key too) as the service user.
        Err(e)
            if e.downcast_ref::<ingest::SpoolBusy>().is_some()
                || volley::deliver::control::socket_path(&cfg.spool_dir).exists() =>
        {
            if metrics.is_some() {
                eprintln!("volley: --metrics is ignored: the campaign goes to the running `volley serve`, whose /metrics has it");
            }
            return hand_over(dir, &campaign, &cfg.spool_dir, new, max_wait, quiet)
                .map_err(|h| h.context(e));
        }
        Err(e) => return Err(e),
    };
    if let Err(e) = volley::message::dkim::key_for(&cfg.dkim_dir, &campaign.settings) {
        eprintln!("{}/campaign.toml: {e}", dir.display());
        eprintln!("volley: campaign refused, nothing queued");
        return Ok(1);
    }
    cfg.shards = lock.shards;
    // The log and `volley track`'s index of it keep their modes (0640 and 0750,
    // for log_group).
    let keep = [
        cfg.log_path.clone(),
        volley::observe::track::index_dir(&cfg.log_path),
    ];
    volley::host::files::make_spool_private(&cfg.spool_dir, &keep)?;
    // Opened now, held to the end: a log that cannot be written stops send before
    // anything is queued.
    let _log = volley::observe::log::AccountingLog::shared(&cfg.log_path, &cfg.log_rotation)
        .map_err(|e| anyhow::anyhow!("{e}; nothing queued"))?;
    prune_finished(&cfg).map_err(|e| e.context("the spool could not be read, nothing queued"))?;
    let existing = ingest::load_instances(&cfg.spool_dir)?;
    let sent_before = volley::spool::retention::tombstones(&cfg.spool_dir)
        .into_iter()
        .rfind(|t| t.campaign == campaign.settings.id);
    if let (Some(t), false) = (sent_before, new) {
        if !existing.values().any(|i| i.settings.id == t.campaign) {
            // Without its copy, "resume" would be "send it all again": asked for, not assumed.
            eprintln!(
                "volley: campaign {} was sent already (instance {}, final since {}, pruned from the spool at {}); --new sends it again",
                t.campaign, t.instance, t.finished_at, t.pruned_at
            );
            return Ok(1);
        }
    }
    // Taken from here on, ingest included: a first SIGINT or SIGTERM lets ingest
    // finish (what it queued is durable) and the run then stops at once with 75; a
    // second one ends the process, as an impatient operator expects.
    // A flag of the signals' own arms the second: `stop` is also set by --max-wait,
    // after which a signal must still get a clean stop and its report.
    let stop = Arc::new(AtomicBool::new(false));
    let signalled = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 75, signalled.clone())?;
        signal_hook::flag::register(sig, signalled.clone())?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let mut skipped = 0u64;
    let resumed = existing
        .values()
        .find(|i| i.settings.id == campaign.settings.id)
        .map(|i| i.no);
    match resumed {
        Some(no) if !new => eprintln!(
            "volley: campaign {} is already in the spool (instance {no}); resuming what is left (--new queues it again)",
            campaign.settings.id
        ),
        _ => match ingest::ingest_with(
            &campaign,
            &cfg.spool_dir,
            cfg.shards,
            cfg.segment_bytes,
            &ingest::IngestOptions {
                skip_bad_rows,
                log: Some((cfg.log_path.clone(), cfg.log_rotation.clone())),
            },
        ) {
            Ok(i) => {
                for p in &i.skipped_listed {
                    eprintln!("{}/{p} (skipped)", dir.display());
                }
                if i.skipped as usize > i.skipped_listed.len() {
                    eprintln!("... and {} more", i.skipped as usize - i.skipped_listed.len());
                }
                print_warnings(dir, &i.warnings);
                println!(
                    "queued {} recipients of campaign {} (instance {}) in {:.2} s",
                    i.recipients,
                    campaign.settings.id,
                    i.instance,
                    i.elapsed.as_secs_f64()
                );
                if i.skipped > 0 {
                    println!(
                        "skipped {} bad row(s), logged as local bounces in {}",
                        i.skipped,
                        cfg.log_path.display()
                    );
                }
                skipped = i.skipped;
            }
            Err(IngestError::Problems(problems, total)) => {
                print_problems(dir, &problems);
                if total as usize > problems.len() {
                    eprintln!("... and {} more", total as usize - problems.len());
                }
                eprintln!("volley: campaign refused ({total} bad row(s)), nothing queued{}", if skip_bad_rows { "" } else { "; --skip-bad-rows queues the good rows and logs each bad one as a bounce" });
                return Ok(1);
            }
            Err(IngestError::Other(e)) => return Err(e.context("ingest failed, nothing queued")),
        },
    }
    let instances = Arc::new(ingest::load_instances(&cfg.spool_dir)?);
    volley::observe::log::reopen_on_sigusr1()?;
    if let Some(d) = max_wait {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(d);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let spool = cfg.spool_dir.clone();
    let ran: Vec<u32> = instances
        .values()
        .filter(|i| !i.submission)
        .map(|i| i.no)
        .collect();
    let board = Arc::new(volley::observe::metrics::Board::new(cfg.shards));
    let metrics_stop = Arc::new(AtomicBool::new(false));
    let metrics_thread = match metrics {
        Some((addr, listener)) => Some(volley::serve::monitor::serve_metrics(
            listener,
            addr,
            board.clone(),
            metrics_stop.clone(),
        )?),
        None => None,
    };
    let report = volley::deliver::engine::run_with(cfg, instances, stop, !quiet, None, Some(board));
    // A scraper's open connection must not hold the exit: waited for a moment,
    // then left to the process's end.
    metrics_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = metrics_thread {
        let deadline = std::time::Instant::now() + METRICS_STOP_WAIT;
        while !t.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let report = report?;
    if report.remaining == 0 {
        // Final now, not at the next start: spool_retention counts from here.
        let now = std::time::SystemTime::now();
        for no in ran {
            if let Err(e) = volley::spool::retention::mark_finished(&spool, no, now) {
                eprintln!("volley: campaign instance {no}: {e:#}; it is marked at the next start");
            }
        }
    }
    report.print();
    if skipped > 0 {
        println!("skipped      {skipped} (bad rows of recipients.csv, not queued; logged as local bounces)");
    }
    if let Some(p) = report_json {
        let mut json = serde_json::to_value(&report)?;
        json["skipped"] = skipped.into();
        std::fs::write(&p, serde_json::to_vec_pretty(&json)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    }
    drop(lock);
    Ok(if report.remaining > 0 { 75 } else { 0 })
}
