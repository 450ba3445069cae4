//! Kill the engine (SIGKILL) at random points while it delivers, restart it, and
//! check that every recipient reached exactly one terminal outcome, with duplicates
//! only among messages that were in flight, and no more of them than the bound.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use volley_load::gen;

const RECIPIENTS: u64 = 20_000;
const KILLS: usize = 5;

/// Starts `run` [`KILLS`] times and SIGKILLs each run once the sink has accepted
/// `step` more recipients (a seeded draw): by progress, not time, so that on a busy
/// machine or an idle one the kill lands mid-run. With `first_early`, the first run
/// is killed 1–30 ms after it starts instead (start-up and ingest). The kills that
/// landed; fewer than two fails the test.
fn kill_rounds(
    env: &Env,
    run: impl Fn() -> std::process::Child,
    seed: u64,
    step: std::ops::Range<u64>,
    first_early: bool,
) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills = 0;
    for round in 0..KILLS {
        let before = env.sink.summary().counts.rcpts_accepted;
        let mut child = run();
        let t = Instant::now();
        if round == 0 && first_early {
            std::thread::sleep(Duration::from_millis(rng.u64(1..30)));
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
    let kills = kill_rounds(&env, run, 7, 200..3000, false);
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
/// first kill within the first 30 ms (start-up and ingest): after the final run
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
    let kills = kill_rounds(&env, run, 11, 100..400, true);
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
