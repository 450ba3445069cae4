//! `volley serve`: owns the spool (flock), runs the shards until SIGTERM, and
//! starts the listeners that feed them. Start-up order: the listeners' sockets
//! bound and the TLS key read, then (as root with `user`) the directories given
//! to the user and privileges dropped; then the lock, the submission instance,
//! the engine, the listeners served, and the readiness line (and sd_notify
//! READY=1). SIGTERM: listeners stop accepting and finish what they
//! hold (at most `shutdown_grace`), then the shards finish their transactions in
//! flight, commit and exit. SIGHUP: users and tokens are read again; a file that
//! no longer loads keeps the old one, and the log says why.

use crate::deliver::config::EngineConfig;
use crate::deliver::control;
use crate::deliver::engine::{self, Serving};
use crate::host::privilege::{self, Account, Plan, Walk};
use crate::message::campaign::Campaign;
use crate::serve::auth::{Tokens, Users};
use crate::serve::config::ServeConfig;
use crate::serve::intake::Intake;
use crate::serve::{http, pickup, submission, tls_reports, webhook};
use crate::spool::inbox::Inboxes;
use crate::spool::ingest::{self, IngestError};
use crate::spool::retention;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// How often the daemon's own `volley queue status` lines (the disk budget) are renewed.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

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
    let held = privileged_start(&cfg, &ecfg)?;
    let lock = ingest::lock_spool(&ecfg.spool_dir, ecfg.shards)?;
    ecfg.shards = lock.shards;
    // The pickup directory keeps the modes its operator gave it: other users drop
    // into it; the log and `volley track`'s index keep theirs, for log_group.
    let keep: Vec<_> = [
        Some(ecfg.log_path.clone()),
        Some(crate::observe::track::index_dir(&ecfg.log_path)),
        cfg.pickup_dir(),
    ]
    .into_iter()
    .flatten()
    .collect();
    crate::host::files::make_spool_private(&ecfg.spool_dir, &keep)?;
    // Opened now, held to the end: a log volley cannot write stops the start here,
    // before READY=1, not the first shard after it.
    let _log = crate::observe::log::AccountingLog::shared(&ecfg.log_path, &ecfg.log_rotation)?;
    // Before the engine: a webhook without a cursor starts at the beginning of the
    // file in use, which then holds what this start logs too.
    let webhooks = webhook::start(&cfg.webhooks, &ecfg.log_path, &ecfg.spool_dir)?;
    let hostname = ecfg.ehlo_name.clone();
    let submission_no = ingest::submission_instance(&ecfg.spool_dir, &hostname)?;
    for t in retention::at_start(
        &ecfg.spool_dir,
        ecfg.shards,
        ecfg.segment_bytes,
        ecfg.spool_retention,
        SystemTime::now(),
    )? {
        said_pruned(&t, &ecfg.log_path);
    }
    let instances = ingest::load_instances(&ecfg.spool_dir)?;
    let (inboxes, receivers) = Inboxes::new(ecfg.shards, cfg.inbox_max);
    let intake = Arc::new(Intake::new(
        inboxes,
        ecfg.spool_dir.clone(),
        submission_no,
        instances.clone(),
        ecfg.dkim_dir.clone(),
        (ecfg.log_path.clone(), ecfg.log_rotation.clone()),
        cfg.spool_free_min,
    ));
    let board = intake.board.clone();
    for (name, stats) in webhooks.stats() {
        webhook::add_metrics(&board, name, stats);
    }
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
    crate::observe::log::reopen_on_sigusr1()?;

    let admin = admin_commands(intake.clone());
    let engine_ready = Arc::new(AtomicBool::new(false));
    let reloads = Arc::new(crate::deliver::shard::Reloads::default());
    let status = Arc::new(control::Status::default());
    let engine = {
        let (ecfg, stop, engine_ready, reloads, status, board) = (
            ecfg.clone(),
            engine_stop.clone(),
            engine_ready.clone(),
            reloads.clone(),
            status.clone(),
            board.clone(),
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
                    status,
                };
                engine::run_with(ecfg, instances, stop, false, Some(serving), Some(board))
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
        if let (Some(bound), Some(tls)) = (held.submission, held.tls) {
            let shared = Arc::new(submission::Shared {
                intake: intake.clone(),
                users: users.clone(),
                tls,
                hostname: hostname.clone(),
                inbox_wait_max: cfg.inbox_wait_max,
                auth_checks: Arc::new(tokio::sync::Semaphore::new(ecfg.shards.max(1))),
                stop: listeners_stop.clone(),
            });
            threads.extend(submission::start(&cfg.submission, bound, shared)?);
            for s in &cfg.submission {
                said.push(format!(
                    "submission on {} (tls {}, auth {})",
                    s.listen,
                    s.tls.name(),
                    s.auth.name()
                ));
            }
        }
        if let (Some(h), Some(listener)) = (&cfg.http, held.http) {
            let api = http::Api {
                body_size_max: h.body_size_max as usize,
                in_flight: tokio::sync::Semaphore::new(h.connections_max as usize),
                request_timeout: h.request_timeout,
                intake: intake.clone(),
                tokens: tokens.clone(),
                staging: ecfg.spool_dir.join("staging"),
            };
            threads.push(http::start(
                listener,
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
        if !cfg.webhooks.is_empty() {
            let names: Vec<&str> = cfg.webhooks.iter().map(|w| w.name.as_str()).collect();
            said.push(format!("webhooks {}", names.join(", ")));
        }
        if ecfg.tls_rpt {
            let (reporting, note) = tls_reports::reporting(&cfg, &hostname)?;
            if let Some(n) = note {
                eprintln!("volley serve: warning: {n}");
            }
            let sender = tls_reports::Sender {
                spool_dir: ecfg.spool_dir.clone(),
                reporting,
                dns: ecfg.dns.clone(),
                intake: intake.clone(),
            };
            threads.push(tls_reports::start(sender, listeners_stop.clone())?);
            said.push("TLS reports".into());
        }
        threads.push(index_refresher(
            ecfg.log_path.clone(),
            listeners_stop.clone(),
        )?);
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

    let mut shown = Instant::now() - STATUS_INTERVAL;
    let housekeeping_every = retention::interval_for(ecfg.spool_retention);
    let mut housekeeping_at = Instant::now() + housekeeping_every;
    while !term.load(Ordering::Relaxed) && !engine.is_finished() {
        if shown.elapsed() >= STATUS_INTERVAL {
            *status.service.lock().expect("status lock") = vec![intake.disk_status()];
            board.sample(
                SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            );
            shown = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() >= housekeeping_at {
            housekeeping_at = Instant::now() + housekeeping_every;
            match intake.housekeeping(ecfg.spool_retention, SystemTime::now()) {
                Ok(pruned) => pruned.iter().for_each(|t| said_pruned(t, &ecfg.log_path)),
                // Tried again at the next round; delivery goes on meanwhile.
                Err(e) => eprintln!("volley serve: spool housekeeping: {e:#}"),
            }
        }
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
    let hooks = webhooks.stats().to_vec();
    webhooks.stop(webhook::STOP_WAIT);
    for (name, s) in hooks {
        let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        eprintln!(
            "volley serve: webhook {name}: posted {} record(s) in {} batch(es), {} failed attempt(s), {} record(s) dead-lettered",
            n(&s.posted_records),
            n(&s.posted_batches),
            n(&s.failures),
            n(&s.dead_lettered_records)
        );
    }
    drop(lock);
    eprintln!(
        "volley serve: stopped; delivered {}, bounced {}, expired {}, {} still queued (kept in the spool)",
        report.delivered, report.bounced, report.expired, report.remaining
    );
    Ok(0)
}

/// Keeps the accounting log's index (`volley track`'s) extended to the log's end,
/// every `INDEX_REFRESH_INTERVAL`, on a thread of its own until `stop`: a lookup
/// then scans at most that long's tail. A failure is said and tried again.
fn index_refresher(
    log: std::path::PathBuf,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use crate::observe::track;
    std::thread::Builder::new()
        .name("track-index".into())
        .spawn(move || {
            let mut at = Instant::now() + track::INDEX_REFRESH_INTERVAL;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if Instant::now() < at {
                    continue;
                }
                if let Err(e) = track::refresh(&log) {
                    eprintln!("volley serve: the accounting log's index (volley track): {e}; tried again in a minute");
                }
                at = Instant::now() + track::INDEX_REFRESH_INTERVAL;
            }
        })
}

/// What is had with root's rights, when the daemon has them, for after the drop:
/// the listeners' sockets and the TLS settings (with the key, which may be root's
/// alone).
struct Held {
    submission: Option<submission::Bound>,
    tls: Option<Arc<rustls::ServerConfig>>,
    http: Option<std::net::TcpListener>,
}

/// Everything done before the spool is opened, in this order: who to run as
/// (`user`), the listeners bound, the TLS certificate and key read, and, started as
/// root with `user`, the directories volley writes given to the user and the
/// privileges dropped (privilege::drop_to). Nothing of the spool, the users and
/// tokens files or the DKIM keys is read before it returns.
fn privileged_start(cfg: &ServeConfig, ecfg: &EngineConfig) -> anyhow::Result<Held> {
    let account = cfg
        .user
        .as_deref()
        .map(|u| privilege::lookup(u, cfg.group.as_deref()))
        .transpose()?;
    let plan = privilege::plan(account, &cfg.at("user").to_string())?;
    if plan == (Plan::StayRoot { asked: false }) {
        eprintln!(
            "volley: warning: running as root; set user = \"volley\" in the configuration to run as a service user once the listeners are bound"
        );
    }
    let mut held = Held {
        submission: None,
        tls: None,
        http: None,
    };
    if !cfg.submission.is_empty() {
        // One socket per listener for each configured shard (or core): how many
        // shards the spool was made with is not known until it is opened, as the user.
        held.submission = Some(submission::bind(&cfg.submission, ecfg.shards)?);
        held.tls = Some(listener_tls(cfg, &ecfg.ehlo_name)?);
    }
    if let Some(h) = &cfg.http {
        held.http = Some(http::bind(h.listen)?);
    }
    if let Plan::Drop(a) = &plan {
        give_dirs(cfg, ecfg, a)?;
        privilege::drop_to(a)?;
        eprintln!(
            "volley serve: listeners bound; running as {} (uid {}, gid {})",
            a.user, a.uid, a.gid
        );
    }
    Ok(held)
}

/// The submission listeners' TLS settings: the configured certificate and key, or
/// a self-signed certificate for `hostname` (with a warning).
fn listener_tls(cfg: &ServeConfig, hostname: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
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
    crate::deliver::tls::server_config(hostname, files)
}

/// The directories volley writes, made the service user's before the drop: the
/// spool (staging and the admin socket are in it), the accounting log's directory
/// and the pickup directory. Missing ones are created; one of another owner is
/// refused with the `chown -R` that fixes it.
fn give_dirs(cfg: &ServeConfig, ecfg: &EngineConfig, a: &Account) -> anyhow::Result<()> {
    let spool = &ecfg.spool_dir;
    let pickup = cfg.pickup_dir();
    // Files in the pickup directory are whoever dropped them's.
    let skip: Vec<_> = pickup.iter().cloned().collect();
    privilege::give_dir(spool, 0o700, a, Walk::Tree(&skip), "spool", "spool")?;
    if let Some(dir) = ecfg.log_path.parent().filter(|d| !d.starts_with(spool)) {
        // 0750: the log is 0640 for a log shipper in the group (host::files::LOG_MODE).
        privilege::give_dir(
            dir,
            0o750,
            a,
            Walk::Tree(&[]),
            "accounting log directory",
            "log",
        )?;
    }
    if let Some(dir) = &pickup {
        privilege::give_dir(
            dir,
            0o700,
            a,
            Walk::DirOnly,
            "pickup directory",
            "pickup.dir",
        )?;
    }
    Ok(())
}

/// One line on stderr per pruned instance.
fn said_pruned(t: &retention::Tombstone, log: &Path) {
    eprintln!(
        "volley serve: pruned campaign {} (instance {}, final since {}) from the spool; its accounting stays in {}",
        t.campaign,
        t.instance,
        t.finished_at,
        log.display()
    );
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
    Arc::new(move |line: &str, peer: &crate::host::peers::Peer| {
        let inject = |dir: &str, new: bool| {
            let shown = Path::new(dir.trim());
            match campaign_for_peer(shown, peer, &intake.spool.join("staging")) {
                Ok(None) => inject_dir(&intake, shown, shown, new),
                Ok(Some(copy)) => {
                    let r = inject_dir(&intake, &copy, shown, new);
                    let _ = std::fs::remove_dir_all(&copy);
                    r
                }
                Err(e) => format!("error: campaign refused, nothing queued: {e}"),
            }
        };
        if let Some(dir) = line.strip_prefix(control::INJECT) {
            return Some(inject(dir, false));
        }
        if let Some(dir) = line.strip_prefix(control::INJECT_NEW) {
            return Some(inject(dir, true));
        }
        let no = line.strip_prefix(control::PROGRESS)?;
        Some(
            match no
                .trim()
                .parse::<u32>()
                .ok()
                .and_then(|n| intake.progress(n))
            {
                Some((c, running)) => {
                    format!(
                        "ok: delivered {} bounced {} expired {} deferrals {} queued {} running {}/{shards}",
                        c.delivered,
                        c.bounced,
                        c.expired,
                        c.deferrals,
                        c.queued,
                        running
                    )
                }
                None => format!("error: no campaign instance {} in this daemon", no.trim()),
            },
        )
    })
}

/// Largest campaign file a member of `admin_group` hands over (a recipients.csv of
/// tens of millions of rows); past it the copy stops and the campaign is refused.
pub const MEMBER_CAMPAIGN_FILE_OCTETS_MAX: u64 = 16 << 30;

/// The campaign directory `dir` as the daemon may read it for `peer`. Root and the
/// service user may name any (they can read it anyway): `dir` itself. A member of
/// `admin_group` gets a private copy under `staging`: each file opened without
/// following a link and checked on the open handle (fstat) to be a regular file of
/// the member's own, so nothing the daemon alone may read is read for it, or quoted
/// back in an error, even if the member swaps a file for a link meanwhile.
/// Errors: what is wrong, with the file.
fn campaign_for_peer(
    dir: &Path,
    peer: &crate::host::peers::Peer,
    staging: &Path,
) -> Result<Option<std::path::PathBuf>, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    if peer.uid == 0 || peer.uid == crate::host::accounts::euid() {
        return Ok(None);
    }
    let who = crate::host::accounts::describe_user(peer.uid);
    let copy = staging.join(format!("member-{}-{:016x}", peer.pid, fastrand::u64(..)));
    std::fs::create_dir_all(&copy).map_err(|e| format!("{}: {e}", copy.display()))?;
    for name in ["campaign.toml", "message.eml", "recipients.csv"] {
        let p = dir.join(name);
        let copied = (|| -> Result<(), String> {
            let f = std::fs::File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&p)
                .map_err(|e| format!("{}: {e} (a link is not followed)", p.display()))?;
            let m = f.metadata().map_err(|e| format!("{}: {e}", p.display()))?;
            if !m.file_type().is_file() || m.uid() != peer.uid {
                return Err(format!(
                    "{} is not a file of {who}'s own: handed over by a member of admin_group, a campaign's files must be theirs (copy them, or hand it over as root)",
                    p.display()
                ));
            }
            let mut out = std::fs::File::create(copy.join(name))
                .map_err(|e| format!("{}: {e}", copy.display()))?;
            let n = std::io::copy(
                &mut std::io::Read::take(f, MEMBER_CAMPAIGN_FILE_OCTETS_MAX + 1),
                &mut out,
            )
            .map_err(|e| format!("{}: {e}", p.display()))?;
            if n > MEMBER_CAMPAIGN_FILE_OCTETS_MAX {
                return Err(format!(
                    "{} is over {MEMBER_CAMPAIGN_FILE_OCTETS_MAX} octets (MEMBER_CAMPAIGN_FILE_OCTETS_MAX)",
                    p.display()
                ));
            }
            Ok(())
        })();
        if let Err(e) = copied {
            let _ = std::fs::remove_dir_all(&copy);
            return Err(e);
        }
    }
    Ok(Some(copy))
}

/// Queues the campaign read from `from`, named `dir` (where the operator has it) in
/// what is said back.
fn inject_dir(intake: &Intake, from: &Path, dir: &Path, new: bool) -> String {
    let campaign = match Campaign::load(from) {
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
        if let Some(t) = intake.pruned_instance_of(&campaign.settings.id) {
            return format!(
                "error: campaign {} was sent already (instance {}, final since {}, pruned from the spool at {}); nothing was queued; --new sends it again",
                t.campaign, t.instance, t.finished_at, t.pruned_at
            );
        }
    }
    match intake.queue_campaign(&campaign) {
        Ok(i) => {
            intake
                .board
                .injected(crate::observe::metrics::Door::Admin, i.recipients);
            format!("ok: queued {} instance {}", i.recipients, i.instance)
        }
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
