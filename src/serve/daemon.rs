//! `volley serve`: owns the spool (flock), runs the shards until SIGTERM, and
//! starts the listeners that feed them. Start-up order: lock, the submission
//! instance, the engine, then the listeners, then the readiness line (and
//! sd_notify READY=1). SIGTERM: listeners stop accepting and finish what they
//! hold (at most `shutdown_grace`), then the shards finish their transactions in
//! flight, commit and exit. SIGHUP: users and tokens are read again; a file that
//! no longer loads keeps the old one, and the log says why.

use crate::deliver::control;
use crate::deliver::engine::{self, Serving};
use crate::message::campaign::Campaign;
use crate::serve::auth::{Tokens, Users};
use crate::serve::config::ServeConfig;
use crate::serve::intake::Intake;
use crate::serve::{http, pickup, submission};
use crate::spool::inbox::Inboxes;
use crate::spool::ingest::{self, IngestError};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Runs the daemon until SIGTERM/SIGINT; the exit status.
pub fn run(cfg: ServeConfig) -> anyhow::Result<i32> {
    if let Err(problems) = cfg.check() {
        for p in &problems {
            eprintln!("{p}");
        }
        anyhow::bail!(
            "the configuration has {} problem(s); nothing started",
            problems.len()
        );
    }
    let mut ecfg = cfg.engine_config();
    let lock = ingest::lock_spool(&ecfg.spool_dir, ecfg.shards)?;
    ecfg.shards = lock.shards;
    let hostname = ecfg.ehlo_name.clone();
    let submission_no = ingest::submission_instance(&ecfg.spool_dir, &hostname)?;
    let instances = ingest::load_instances(&ecfg.spool_dir)?;
    let (inboxes, receivers) = Inboxes::new(ecfg.shards, cfg.inbox_max);
    let intake = Arc::new(Intake::new(
        inboxes,
        ecfg.spool_dir.clone(),
        submission_no,
        instances.clone(),
        ecfg.dkim_dir.clone(),
        ecfg.log_path.clone(),
        cfg.spool_free_min,
    ));
    let users = Arc::new(RwLock::new(load_users(cfg.users.as_deref())?));
    let tokens = Arc::new(RwLock::new(load_tokens(cfg.tokens.as_deref())?));

    let engine_stop = Arc::new(AtomicBool::new(false));
    let listeners_stop = Arc::new(AtomicBool::new(false));
    let (term, hup) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, term.clone())?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;

    let admin = admin_commands(intake.clone());
    let engine_ready = Arc::new(AtomicBool::new(false));
    let reloads = Arc::new(crate::deliver::shard::Reloads::default());
    let engine = {
        let (ecfg, stop, engine_ready, reloads) = (
            ecfg.clone(),
            engine_stop.clone(),
            engine_ready.clone(),
            reloads.clone(),
        );
        let instances = Arc::new(instances);
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let serving = Serving {
                    inboxes: receivers,
                    admin,
                    ready: engine_ready,
                    reloads,
                };
                engine::run_with(ecfg, instances, stop, false, Some(serving))
            })?
    };

    // The admin socket answers before the readiness line does.
    while !engine_ready.load(Ordering::Relaxed) && !engine.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    if engine.is_finished() {
        return match engine.join() {
            Ok(Err(e)) => Err(e.context("the engine did not start")),
            _ => Err(anyhow::anyhow!("the engine did not start")),
        };
    }
    let mut threads = Vec::new();
    let mut said = Vec::new();
    let started = (|| -> anyhow::Result<()> {
        if !cfg.submission.is_empty() {
            let files = cfg.tls_cert.as_deref().zip(cfg.tls_key.as_deref());
            let any_tls = cfg
                .submission
                .iter()
                .any(|s| s.tls != crate::serve::config::ListenerTls::None);
            if files.is_none() && any_tls {
                eprintln!(
                    "volley: warning: no tls_cert/tls_key: the submission listeners use a self-signed certificate for {hostname}, which clients that verify refuse"
                );
            }
            let shared = Arc::new(submission::Shared {
                intake: intake.clone(),
                users: users.clone(),
                tls: crate::deliver::tls::server_config(&hostname, files)?,
                hostname: hostname.clone(),
                inbox_wait_max: cfg.inbox_wait_max,
                auth_checks: Arc::new(tokio::sync::Semaphore::new(ecfg.shards.max(1))),
                stop: listeners_stop.clone(),
            });
            threads.extend(submission::start(&cfg.submission, shared, ecfg.shards)?);
            for s in &cfg.submission {
                said.push(format!(
                    "submission on {} (tls {}, auth {})",
                    s.listen,
                    s.tls.name(),
                    s.auth.name()
                ));
            }
        }
        if let Some(h) = &cfg.http {
            let api = http::Api {
                body_size_max: h.body_size_max as usize,
                in_flight: tokio::sync::Semaphore::new(h.connections_max as usize),
                request_timeout: h.request_timeout,
                intake: intake.clone(),
                tokens: tokens.clone(),
                staging: ecfg.spool_dir.join("staging"),
            };
            threads.push(http::start(
                h.listen,
                h.body_size_max as usize,
                api,
                listeners_stop.clone(),
            )?);
            said.push(format!("http on {}", h.listen));
        }
        if let (Some(dir), Some(p)) = (cfg.pickup_dir(), &cfg.pickup) {
            let pk = pickup::Pickup {
                dir: dir.clone(),
                scan_interval: p.scan_interval,
                intake: intake.clone(),
                hostname: hostname.clone(),
                campaign_header: crate::serve::config::DEFAULT_CAMPAIGN_HEADER.into(),
                files_per_scan_max: p.files_per_scan_max as usize,
                message_size_max: p.message_size_max,
            };
            threads.push(pickup::start(pk, listeners_stop.clone())?);
            said.push(format!("pickup from {}", dir.display()));
        }
        Ok(())
    })();
    if let Err(e) = started {
        listeners_stop.store(true, Ordering::Relaxed);
        engine_stop.store(true, Ordering::Relaxed);
        let _ = engine.join();
        return Err(e);
    }
    println!(
        "volley serve: ready; spool {} ({} shards); {}",
        ecfg.spool_dir.display(),
        ecfg.shards,
        if said.is_empty() {
            "no listeners (delivering what the spool holds)".to_string()
        } else {
            said.join(", ")
        }
    );
    notify_systemd("READY=1");

    while !term.load(Ordering::Relaxed) && !engine.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        if hup.swap(false, Ordering::Relaxed) {
            reload(&cfg, &users, &tokens);
            reload_rules(&cfg, &intake, &reloads);
        }
    }
    notify_systemd("STOPPING=1");
    eprintln!("volley serve: stopping: listeners first, then the shards");
    listeners_stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + cfg.shutdown_grace;
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
    engine_stop.store(true, Ordering::Relaxed);
    let report = engine
        .join()
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))??;
    drop(lock);
    eprintln!(
        "volley serve: stopped; delivered {}, bounced {}, expired {}, {} still queued (kept in the spool)",
        report.delivered, report.bounced, report.expired, report.remaining
    );
    Ok(0)
}

fn load_users(path: Option<&Path>) -> anyhow::Result<Option<Users>> {
    path.map(|p| Users::load(p).map_err(|problems| anyhow::anyhow!("{}", problems.join("\n"))))
        .transpose()
}

fn load_tokens(path: Option<&Path>) -> anyhow::Result<Tokens> {
    match path {
        Some(p) => Tokens::load(p).map_err(|problems| anyhow::anyhow!("{}", problems.join("\n"))),
        None => Ok(Tokens::default()),
    }
}

/// SIGHUP: the shaping and bounce rules read again and published to the shards;
/// rules that fail to load keep the old ones, and the log says why.
fn reload_rules(cfg: &ServeConfig, intake: &Intake, reloads: &crate::deliver::shard::Reloads) {
    let ecfg = cfg.engine_config();
    let instances = Arc::new(intake.all_instances());
    let loaded = engine::load_rules(&ecfg, &instances).and_then(|rules| {
        let classifier = crate::policy::classify::load(ecfg.bounce_rules.as_deref())?;
        Ok((rules, classifier))
    });
    match loaded {
        Ok((rules, classifier)) => {
            reloads.publish(Arc::new(rules), Arc::new(classifier));
            eprintln!("volley serve: SIGHUP: shaping and bounce rules reloaded");
        }
        Err(e) => eprintln!(
            "volley serve: SIGHUP: shaping and bounce rules not reloaded, the old ones stay: {e:#}"
        ),
    }
}

/// SIGHUP: users and tokens read again; a file that fails keeps the old one.
fn reload(cfg: &ServeConfig, users: &RwLock<Option<Users>>, tokens: &RwLock<Tokens>) {
    match load_users(cfg.users.as_deref()) {
        Ok(u) => {
            *users.write().expect("users lock") = u;
            eprintln!("volley serve: SIGHUP: users reloaded");
        }
        Err(e) => eprintln!("volley serve: SIGHUP: users not reloaded, the old ones stay: {e}"),
    }
    match load_tokens(cfg.tokens.as_deref()) {
        Ok(t) => {
            *tokens.write().expect("tokens lock") = t;
            eprintln!("volley serve: SIGHUP: tokens reloaded");
        }
        Err(e) => eprintln!("volley serve: SIGHUP: tokens not reloaded, the old ones stay: {e}"),
    }
}

/// The daemon's admin socket commands beyond the shards':
/// - `inject DIR`: queue the campaign directory DIR (`volley send` handing over);
///   answers `ok: queued N instance M` once durable, or `ok: running instance M`
///   when a campaign with its id is already in the spool (send resumes, as it does
///   without a daemon); `inject-new DIR` queues it again all the same;
/// - `progress M`: instance M's counts, `ok: delivered D bounced B expired E
///   deferrals T queued Q running S/N` (S of the N shards run it: until S = N,
///   Q is not yet complete). Counts are since the daemon started.
fn admin_commands(intake: Arc<Intake>) -> control::Extra {
    let shards = intake.inboxes.shards();
    Arc::new(move |line: &str| {
        if let Some(dir) = line.strip_prefix("inject ") {
            return Some(inject_dir(&intake, Path::new(dir.trim()), false));
        }
        if let Some(dir) = line.strip_prefix("inject-new ") {
            return Some(inject_dir(&intake, Path::new(dir.trim()), true));
        }
        let no = line.strip_prefix("progress ")?;
        Some(
            match no
                .trim()
                .parse::<u32>()
                .ok()
                .and_then(|n| intake.instance(n))
            {
                Some(i) => {
                    let c = i.outcomes.snapshot();
                    format!(
                        "ok: delivered {} bounced {} expired {} deferrals {} queued {} running {}/{shards}",
                        c.delivered,
                        c.bounced,
                        c.expired,
                        c.deferrals,
                        c.queued,
                        i.outcomes.shards()
                    )
                }
                None => format!("error: no campaign instance {} in this daemon", no.trim()),
            },
        )
    })
}

fn inject_dir(intake: &Intake, dir: &Path, new: bool) -> String {
    let campaign = match Campaign::load(dir) {
        Ok(c) => c,
        Err(problems) => {
            let list: Vec<String> = problems
                .iter()
                .map(|p| format!("{}/{p}", dir.display()))
                .collect();
            return format!(
                "error: campaign refused, nothing queued:\n{}",
                list.join("\n")
            );
        }
    };
    if !new {
        if let Some(i) = intake.instance_of(&campaign.settings.id) {
            return format!("ok: running instance {}", i.no);
        }
    }
    match intake.queue_campaign(&campaign) {
        Ok(i) => format!("ok: queued {} instance {}", i.recipients, i.instance),
        Err(IngestError::Problems(problems, total)) => {
            let list: Vec<String> = problems
                .iter()
                .map(|p| format!("{}/{p}", dir.display()))
                .collect();
            format!(
                "error: campaign refused ({total} bad row(s)), nothing queued:\n{}",
                list.join("\n")
            )
        }
        Err(IngestError::Other(e)) => format!("error: not queued: {e:#}"),
    }
}

/// Tells systemd (Type=notify) how the service is doing; nothing without
/// NOTIFY_SOCKET.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let r = match bytes.strip_prefix(b"@") {
        // An abstract socket name.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = r {
        eprintln!("volley serve: sd_notify {state}: {e}");
    }
}
