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
    let mut cfg = env.config();
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
    let mut rng = fastrand::Rng::with_seed(7);
    let mut kills = 0;
    for _ in 0..KILLS {
        let before = env.sink.summary().counts.rcpts_accepted;
        let mut child = run();
        // Kill once it has delivered something (or after a bounded wait).
        let wait_for = rng.u64(200..1500);
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(wait_for)
            || env.sink.summary().counts.rcpts_accepted == before
        {
            if child.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(30) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
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
