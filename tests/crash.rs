//! Kill the engine (SIGKILL) at random points while it delivers, restart it, and
//! check that every recipient reached exactly one terminal outcome, with duplicates
//! only among messages that were in flight, and no more of them than the bound; and
//! that a kill forgets at most the last second of the warm-up ledger.

mod common;

use common::daemon::Run;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use volley_load::gen;

const RECIPIENTS: u64 = 20_000;
const KILLS: usize = 5;

/// Starts `run` [`KILLS`] times and SIGKILLs each run once the sink has accepted
/// `step` more recipients (a seeded draw): by progress, not time, so that on a busy
/// machine or an idle one the kill lands mid-run. With `first_in_ingest` (the
/// campaign instance's directory), the first run is killed within 3 ms of that
/// directory appearing instead: during ingest, or just after. The kills that landed;
/// fewer than two fails the test.
fn kill_rounds(
    env: &Env,
    run: impl Fn() -> std::process::Child,
    seed: u64,
    step: std::ops::Range<u64>,
    first_in_ingest: Option<&Path>,
) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills = 0;
    for round in 0..KILLS {
        let before = env.sink.summary().counts.rcpts_accepted;
        let mut child = run();
        let t = Instant::now();
        if let (0, Some(instance)) = (round, first_in_ingest) {
            // Once ingest has begun (the instance's directory exists), within 3 ms:
            // during ingest, or just after it (reported).
            while !instance.exists()
                && child.try_wait().unwrap().is_none()
                && t.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_micros(rng.u64(0..3000)));
            let mid = !instance.join("queued").exists();
            eprintln!("crash test: the first kill landed during ingest: {mid}");
        } else {
            let target = before + rng.u64(step.clone());
            while env.sink.summary().counts.rcpts_accepted < target
                && child.try_wait().unwrap().is_none()
                && t.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(
        kills >= 2,
        "the kills must land while it runs (only {kills} did)"
    );
    kills
}

#[test]
fn sigkill_during_delivery_loses_nothing() {
    // Receiver latency stretches the run so the kills land mid-delivery.
    let env = env("crash", "latency_ms = { data_end = [1, 6] }");
    let dir = env.dir.join("gen");
    gen::write_campaign(
        &dir,
        &gen::GenOptions {
            recipients: RECIPIENTS,
            campaign_id: "crash".into(),
            body_bytes: 2048,
            ..Default::default()
        },
    )
    .unwrap();
    // Few connections and a small window: slow enough that the kills land mid-run.
    // The bound below follows the binary's own group-commit settings (its defaults:
    // `send` takes no commit flags), with this test's window and connections.
    let mut cfg = volley::deliver::config::EngineConfig::new(env.dir.join("spool"));
    cfg.shards = 2;
    let conns = 4;
    cfg.window = 2;
    let spool = cfg.spool_dir.clone();
    let log = cfg.log_path.clone();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_volley"))
            .args(["send", dir.to_str().unwrap(), "--quiet", "--shards", "2"])
            .args(["--spool", spool.to_str().unwrap()])
            .args([
                "--dns",
                &env.dns.addr.to_string(),
                "--smtp-port",
                &env.sink.port().to_string(),
            ])
            .args(["--ehlo", "crash.volley.test", "--retry-schedule", "1s"])
            .args([
                "--max-conns-per-site",
                &conns.to_string(),
                "--window",
                &cfg.window.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let kills = kill_rounds(&env, run, 7, 200..3000, None);
    let out = run().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "final run: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let s = env.sink.summary();
    let t = terminal_by_rcpt(&log_lines(&log));
    assert_eq!(
        t.len() as u64,
        RECIPIENTS,
        "every recipient has a terminal outcome in the log"
    );
    assert_eq!(
        s.counts.rcpts_accepted, RECIPIENTS,
        "every recipient reached the sink"
    );
    assert_eq!(s.counts.corrupt, 0);
    let duplicated_in_log = t.values().filter(|v| v.len() > 1).count() as u64;
    // What can be in flight at a kill: the windows of every open connection plus the
    // outcomes not yet committed (sites = the generated campaign's MX hosts).
    let bound = (cfg.in_flight_bound(6, conns) * kills) as u64;
    assert!(
        s.counts.duplicates <= bound,
        "sink saw {} duplicates, bound {bound}",
        s.counts.duplicates
    );
    assert!(
        duplicated_in_log <= bound,
        "{duplicated_in_log} recipients logged twice, bound {bound}"
    );
    assert!(t
        .values()
        .all(|v| v.iter().all(|r| r["type"] == "Delivery")));
    eprintln!("crash test: {kills} kills, {} sink duplicates, {duplicated_in_log} duplicated log outcomes, bound {bound}", s.counts.duplicates);
}

/// SIGKILL while bounces are recorded and their DSNs queued (`dsn = true`), the
/// first kill during ingest (where a segment being made once left a spool the next
/// run refused): after the final run
/// every bounced recipient has at least one DSN at the return path, and none more
/// than one per kill beyond the first.
#[test]
fn sigkill_while_dsns_are_queued_loses_no_dsn() {
    const N: u64 = 3_000;
    let keep =
        std::env::temp_dir().join(format!("volley-test-crash-dsn-keep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&keep);
    std::fs::create_dir_all(&keep).unwrap();
    let env = env_full(
        "crash-dsn",
        "latency_ms = { data_end = [1, 6] }",
        true,
        Some(keep.clone()),
    );
    let dir = env.dir.join("gen");
    gen::write_campaign(
        &dir,
        &gen::GenOptions {
            recipients: N,
            campaign_id: "crash-dsn".into(),
            body_bytes: 1024,
            permfail_per_mille: 100,
            ..Default::default()
        },
    )
    .unwrap();
    // DSNs to a return path on a tail domain, which the test DNS routes to the sink.
    let toml = dir.join("campaign.toml");
    let text = std::fs::read_to_string(&toml).unwrap().replacen(
        "sender = \"bounces@news.volley.test\"",
        "sender = \"bounces@shop7.tail.test\"\ndsn = true",
        1,
    );
    std::fs::write(&toml, text).unwrap();
    let spool = env.dir.join("spool");
    let log = spool.join("accounting.jsonl");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_volley"))
            .args(["send", dir.to_str().unwrap(), "--quiet", "--shards", "2"])
            .args(["--spool", spool.to_str().unwrap()])
            .args(common::daemon::sink_args(&env))
            .args(["--ehlo", "crash.volley.test", "--retry-schedule", "1s"])
            .args(["--max-conns-per-site", "4", "--window", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let instance = spool.join("campaigns").join("1");
    let kills = kill_rounds(&env, run, 11, 100..400, Some(&instance));
    let out = run().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "final run: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let lines = log_lines(&log);
    let t = terminal_by_rcpt(&lines);
    let bounced: Vec<&String> = t
        .iter()
        .filter(|(_, v)| {
            v.iter()
                .any(|r| r["type"] == "Bounce" && r["campaign"] == "crash-dsn")
        })
        .map(|(rcpt, _)| rcpt)
        .collect();
    assert!(bounced.len() > 100, "only {} bounces", bounced.len());
    // DSNs per bounced recipient, from the messages the sink kept.
    let mut dsns: std::collections::HashMap<String, usize> = Default::default();
    for e in std::fs::read_dir(&keep).unwrap() {
        let m = std::fs::read_to_string(e.unwrap().path()).unwrap();
        if !m.contains("multipart/report") {
            continue;
        }
        for l in m.lines() {
            if let Some(rcpt) = l.strip_prefix("Final-Recipient: rfc822; ") {
                *dsns.entry(rcpt.trim().to_string()).or_default() += 1;
            }
        }
    }
    for rcpt in &bounced {
        let n = dsns.get(rcpt.as_str()).copied().unwrap_or(0);
        assert!(n >= 1, "{rcpt} bounced and no DSN reached the return path");
        assert!(n <= 1 + kills, "{rcpt}: {n} DSNs after {kills} kills");
    }
    assert_eq!(
        dsns.len(),
        bounced.len(),
        "a DSN for a recipient that did not bounce"
    );
    eprintln!(
        "crash dsn test: {kills} kills, {} bounces, {} DSNs",
        bounced.len(),
        dsns.values().sum::<usize>()
    );
    let _ = std::fs::remove_dir_all(&keep);
}

/// README, Traffic shaping: the warm-up counts are "written each second and at the
/// end of a run (a crash forgets at most the last second)". A paced warm-up send is
/// SIGKILLed mid-run; the ledger it left must be short of what the receiver accepted
/// by at most one second's worth, and a second run the same day, its cap set to the
/// ledger's count + 10, sends exactly 10 more.
#[test]
fn a_sigkill_forgets_at_most_the_last_second_of_warm_up_counts() {
    const RATE: u64 = 50;
    const CONNS: u64 = 2;
    const WINDOW: u64 = 2;
    let env = env("crash-warmup", "");
    let today = &humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..10];
    // The sink's Google MX is mx.google.sink.test: a provider of the test's own.
    let key = "source:127.0.0.2>provider:google-sink";
    let rows: Vec<String> = (0..1000).map(|i| format!("u{i}@gmail.com,Ann")).collect();
    let c = campaign(&env.dir, "warm", "pool = \"new\"", &rows);
    let shaping = env.dir.join("shaping.toml");
    let write_shaping = |cap: u64| {
        let text = format!(
            "[pool.new]\nsources = [{{ ip = \"127.0.0.2\" }}]\n\n\
             [source.\"127.0.0.2\"]\nwarmup_start = \"{today}\"\nwarmup = [{cap}]\n\n\
             [provider.google-sink]\nmx_suffixes = [\"google.sink.test\"]\nmax_msg_rate = \"{RATE}/s\"\nmax_connections = {CONNS}\n"
        );
        std::fs::write(&shaping, text).unwrap();
    };
    let spool = env.dir.join("spool");
    let send = |extra: &[&str]| {
        Run(Some(
            Command::new(env!("CARGO_BIN_EXE_volley"))
                .args(["send", c.to_str().unwrap(), "--quiet", "--shards", "1"])
                .args(common::daemon::base_args(&env, &spool))
                .args(["--ehlo", "crash.volley.test", "--shaping"])
                .arg(&shaping)
                .args(["--window", &WINDOW.to_string()])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    };
    // What the receiver took, a message sent again after the kill included: every
    // send counts towards the day's cap. (Every recipient here is at the sink's Google.)
    let accepted = || {
        let c = env.sink.summary().counts;
        c.rcpts_accepted + c.duplicates
    };
    // The sink's count once no transaction has ended for 300 ms (bounded).
    let settled = || {
        let (mut last, mut since) = (accepted(), Instant::now());
        let until = Instant::now() + Duration::from_secs(10);
        while since.elapsed() < Duration::from_millis(300) {
            assert!(Instant::now() < until, "the sink never settled");
            std::thread::sleep(Duration::from_millis(20));
            if accepted() != last {
                (last, since) = (accepted(), Instant::now());
            }
        }
        last
    };
    let ledger = || -> (u64, String) {
        let text = std::fs::read_to_string(spool.join("warmup.tsv")).unwrap_or_default();
        let n = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{today}\t{key}\t")))
            .map_or(0, |n| n.parse().unwrap());
        (n, text)
    };

    // Run 1: a day's cap far off, paced at RATE; SIGKILL once ~2.5 s have gone out.
    write_shaping(100_000);
    let mut run = send(&[]);
    let t = Instant::now();
    while accepted() < RATE * 5 / 2 {
        let child = run.0.as_mut().unwrap();
        assert!(
            child.try_wait().unwrap().is_none(),
            "run 1 ended before the kill"
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "only {} accepted",
            accepted()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut child = run.0.take().unwrap();
    // SIGKILL: no end-of-run save.
    child.kill().unwrap();
    let killed_at = std::time::SystemTime::now();
    child.wait().unwrap();
    let sent = settled();
    let (counted, text) = ledger();
    // When the ledger was last written before the kill.
    let saved_at = std::fs::metadata(spool.join("warmup.tsv"))
        .and_then(|m| m.modified())
        .expect("the ledger was written during the run");
    let age = killed_at.duration_since(saved_at).unwrap_or_default();
    let ips: Vec<String> = env
        .sink
        .summary()
        .connections_per_client_ip
        .into_keys()
        .collect();
    assert_eq!(ips, ["127.0.0.2"], "not sent from the warm-up source");
    // Counted at admission: the ledger may hold what was in flight and never accepted.
    assert!(
        counted <= sent + CONNS * WINDOW,
        "ledger {counted}, the receiver accepted {sent}: {text}"
    );
    // Written each second: its last save came within the second before the kill (and
    // a quarter second of a busy machine's lateness).
    assert!(
        age <= Duration::from_millis(1250),
        "the ledger was last written {age:?} before the kill"
    );
    // What it forgot was admitted after that save: at most the pace over that time,
    // and one message that opens it.
    let since_save = (RATE as f64 * (age.as_secs_f64() + 0.1)).ceil() as u64 + 1;
    assert!(
        sent.saturating_sub(counted) <= since_save,
        "the receiver accepted {sent}, the ledger kept {counted}, saved {age:?} before the kill: it forgot more than what came after its last save ({text:?})"
    );

    // Run 2, the same day, with a cap 10 over what the ledger kept: 10 more, no more.
    write_shaping(counted + 10);
    let mut run = send(&["--max-wait", "3s"]);
    let t = Instant::now();
    while run.0.as_mut().unwrap().try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "run 2 did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run.0.take().unwrap().wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let more = settled() - sent;
    assert_eq!(
        more, 10,
        "run 2 sent {more} under a cap 10 over the ledger's {counted}"
    );
    assert_eq!(ledger().0, counted + 10, "{}", ledger().1);
    eprintln!(
        "crash warm-up test: accepted {sent}, ledger {counted} at the kill, then {more} more"
    );
}
