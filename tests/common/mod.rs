//! What the engine tests share: the bundled sink and test DNS started in-process on
//! loopback, campaign directories written on the fly, the accounting log read back.

#![allow(dead_code)]

pub mod browser;
pub mod daemon;
pub mod pki;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use volley::deliver::config::EngineConfig;
use volley::deliver::engine::Report;
use volley::{message::campaign::Campaign, spool::ingest};
use volley_load::dns::{self, DnsServer, Zone};
use volley_load::profile::Profile;
use volley_load::sink::{Sink, SinkOptions};

pub struct Env {
    pub sink: Sink,
    pub dns: DnsServer,
    pub dir: PathBuf,
}

/// The work directory (spools of 64 MiB segments among it) goes with the test; a
/// failed test keeps it to look at.
impl Drop for Env {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A sink (the accept-all profile's providers, with `behaviour` for all of them) and
/// the test DNS routing to it.
pub fn env(name: &str, behaviour: &str) -> Env {
    env_with(name, behaviour, true)
}

/// As `env`, choosing whether the sink offers STARTTLS.
pub fn env_with(name: &str, behaviour: &str, starttls: bool) -> Env {
    env_full(name, behaviour, starttls, None)
}

/// As `env` (STARTTLS offered), with the sink keeping every message it accepts as a
/// .eml file in the returned directory, made empty first.
pub fn env_keeping(name: &str) -> (Env, PathBuf) {
    let keep = std::env::temp_dir().join(format!("volley-{name}-keep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&keep);
    std::fs::create_dir_all(&keep).unwrap();
    (env_full(name, "", true, Some(keep.clone())), keep)
}

/// As `env_with`; the sink keeps every message it accepts in `keep` as a .eml file.
pub fn env_full(name: &str, behaviour: &str, starttls: bool, keep: Option<PathBuf>) -> Env {
    start_env(name, behaviour, starttls, keep, None)
}

/// As `env` (STARTTLS offered), the sink serving this PEM certificate chain and key;
/// with `keep`, it keeps every message it accepts there as a .eml file.
pub fn env_with_certificate(name: &str, cert: PathBuf, key: PathBuf, keep: Option<PathBuf>) -> Env {
    start_env(name, "", true, keep, Some((cert, key)))
}

/// As `env_with_certificate`, every provider with `behaviour` (TOML).
pub fn env_with_certificate_behaving(
    name: &str,
    behaviour: &str,
    cert: PathBuf,
    key: PathBuf,
) -> Env {
    start_env(name, behaviour, true, None, Some((cert, key)))
}

fn start_env(
    name: &str,
    behaviour: &str,
    starttls: bool,
    keep: Option<PathBuf>,
    tls_files: Option<(PathBuf, PathBuf)>,
) -> Env {
    let mut profile = Profile::load("accept-all").unwrap();
    profile.sink.starttls = starttls;
    if !behaviour.is_empty() {
        let b: toml::Value = toml::from_str(behaviour).unwrap();
        let b: volley_load::profile::Behaviour = b.try_into().unwrap();
        for p in &mut profile.providers {
            p.behaviour = b.clone();
        }
    }
    profile.set_port(0);
    // The port picked for the first address is then bound on the others, where a
    // parallel test's socket can hold it: pick again (bounded).
    let mut attempts = 0;
    let sink = loop {
        attempts += 1;
        let started = Sink::start(SinkOptions {
            profile: profile.clone(),
            threads: 1,
            driver: Default::default(),
            keep: keep.clone(),
            tls_files: tls_files.clone(),
        });
        match started {
            Ok(sink) => break sink,
            Err(e) if attempts < 5 && e.to_string().contains("cannot listen") => continue,
            Err(e) => panic!("sink: {e:#}"),
        }
    };
    let dns = dns::start(
        "127.0.0.1:0".parse().unwrap(),
        Zone::from_profile(sink.profile(), &sink.addrs),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("volley-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Env { sink, dns, dir }
}

impl Env {
    pub fn config(&self) -> EngineConfig {
        let mut c = EngineConfig::new(self.dir.join("spool"));
        c.shards = 2;
        c.dns.server = Some(self.dns.addr);
        // The test DNS answers on loopback in well under a millisecond; the margin is
        // for two busy CPU hogs, since a lookup that times out is cached as failed for
        // longer than most tests' expiry (dns.rs TEMPFAIL_CACHE).
        c.dns.timeout = std::time::Duration::from_secs(2);
        c.dns.attempts = 2;
        c.smtp_port = self.sink.port();
        c.ehlo_name = "test.volley.test".into();
        c.connect_timeout = std::time::Duration::from_secs(2);
        c
    }

    /// Ingests and sends `campaign` to the end with `cfg`.
    pub fn send(&self, campaign: &Path, cfg: EngineConfig) -> Report {
        self.send_for(Some(campaign), cfg, None)
    }

    /// Ingests `campaign` (unless None: what is in the spool goes on) and sends with
    /// `cfg`, to the end or until `stop_after`, as `send --max-wait` does.
    pub fn send_for(
        &self,
        campaign: Option<&Path>,
        cfg: EngineConfig,
        stop_after: Option<std::time::Duration>,
    ) -> Report {
        let lock = ingest::lock_spool(&cfg.spool_dir, cfg.shards).unwrap();
        if let Some(campaign) = campaign {
            let c = Campaign::load(campaign).unwrap_or_else(|p| panic!("{p:?}"));
            ingest::ingest(&c, &cfg.spool_dir, cfg.shards, cfg.segment_bytes).unwrap();
        }
        let instances = Arc::new(ingest::load_instances(&cfg.spool_dir).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(d) = stop_after {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(d);
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            });
        }
        let r = volley::deliver::engine::run(cfg, instances, stop, false).unwrap();
        drop(lock);
        r
    }
}

/// Says on stderr that the running test skipped a check, and why: "SKIPPED NAME: why",
/// NAME being the test's (the harness runs each test on a thread of that name).
/// Written to the stderr handle itself, past the harness's capture (which hides a
/// passing test's `println!` and `eprintln!`), so a skip shows in `cargo test`'s output.
pub fn skipped(why: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// A small campaign: `rows` are recipients.csv lines after the header `email,name`.
pub fn campaign(dir: &Path, id: &str, extra_settings: &str, rows: &[String]) -> PathBuf {
    let d = dir.join(format!("campaign-{id}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("campaign.toml"),
        format!(
            "id = \"{id}\"\nsender = \"bounces@news.test\"\nfrom_domain = \"news.test\"\n{extra_settings}\n{}",
            // Unsigned unless the test is about signing (last, so tests' line numbers hold).
            if extra_settings.contains("dkim") { "" } else { "dkim = false\n" }
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("message.eml"),
        "From: News <news@news.test>\nTo: {{name}} <{{email}}>\nSubject: Hello {{name}}\nMessage-ID: <{{email}}.id@news.test>\n\nHi {{name}},\n.a dot line\nbye\n",
    )
    .unwrap();
    let mut csv = String::from("email,name\n");
    for r in rows {
        csv.push_str(r);
        csv.push('\n');
    }
    std::fs::write(d.join("recipients.csv"), csv).unwrap();
    d
}

/// The accounting log as JSON values, every rotated generation first (a run that
/// crosses midnight UTC rotates it).
pub fn log_lines(path: &Path) -> Vec<serde_json::Value> {
    volley::observe::rotation::lines(path)
        .unwrap()
        .map(|l| {
            let l = l.unwrap();
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}"))
        })
        .collect()
}

/// Terminal records per recipient.
pub fn terminal_by_rcpt(lines: &[serde_json::Value]) -> HashMap<String, Vec<serde_json::Value>> {
    let mut m: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for l in lines {
        if matches!(
            l["type"].as_str(),
            Some("Delivery" | "Bounce" | "Expiration")
        ) {
            m.entry(l["rcpt"].as_str().unwrap().to_string())
                .or_default()
                .push(l.clone());
        }
    }
    m
}

/// How long a send to gmail.com runs at most ([`send_to_gmail`]); one not ended by
/// then is stopped (the assertions then fail).
pub const SEND_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends `n` recipients at gmail.com as campaign `id` with `cfg`, to the end: the
/// log's records of that campaign and the sink's accepted count after it. A
/// campaign that is to be `deferred` expires after 2 s, so the run ends and leaves
/// nothing queued for the next.
pub fn send_to_gmail(
    env: &Env,
    cfg: EngineConfig,
    id: &str,
    n: usize,
    deferred: bool,
) -> (Vec<serde_json::Value>, u64) {
    let rows: Vec<String> = (0..n).map(|i| format!("{id}{i}@gmail.com,Ann")).collect();
    let settings = if deferred {
        "expire_after = \"2s\""
    } else {
        ""
    };
    let c = campaign(&env.dir, id, settings, &rows);
    let log = cfg.log_path.clone();
    env.send_for(Some(&c), cfg, Some(SEND_LIMIT));
    let lines = log_lines(&log)
        .into_iter()
        .filter(|l| l["campaign"] == id)
        .collect();
    (lines, env.sink.summary().counts.rcpts_accepted)
}

/// As `all_deferred`, with the enhanced status code `enhanced`.
pub fn all_deferred_as(lines: &[serde_json::Value], enhanced: &str, words: &[&str]) {
    assert!(
        lines.iter().all(|l| l["type"] != "Delivery"),
        "delivered: {lines:#?}"
    );
    let deferrals: Vec<_> = lines
        .iter()
        .filter(|l| l["type"] == "TransientFailure")
        .collect();
    assert!(!deferrals.is_empty(), "no deferral: {lines:#?}");
    for l in deferrals {
        assert_eq!(l["class"], "policy", "{l}");
        assert_eq!(l["enhanced"], enhanced, "{l}");
        let reply = l["reply"].as_str().unwrap();
        for w in words {
            assert!(reply.contains(w), "{w:?} not in {reply:?}");
        }
    }
}
