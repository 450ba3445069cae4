//! `volley send` as an operator runs it, through the binary against the bundled sink
//! and DNS on loopback: steered by `volley queue pause|resume|rate` while it runs,
//! its spool refused to a second process, stopped by SIGINT and SIGTERM (exit 75,
//! `--report-json` saying what is left), resumed by the next run with nothing sent
//! twice, and `--new` sending it all again.

mod common;

use common::daemon::{base_args, volley, Run, VOLLEY};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROWS: usize = 300;
/// How long any wait below may take before the test fails.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// `volley send DIR` started in the background with `extra` flags.
fn send(env: &common::Env, spool: &Path, dir: &Path, extra: &[&str]) -> Run {
    Run(Some(
        Command::new(VOLLEY)
            .arg("send")
            .arg(dir)
            .arg("--quiet")
            .args(base_args(env, spool))
            .args(["--ehlo", "test.volley.test", "--shards", "2"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ))
}

/// Waits for `child` to exit; its code (-1 for a signal), stdout and stderr.
fn finish(mut run: Run) -> (i32, String, String) {
    let mut child = run.0.take().expect("running");
    let until = Instant::now() + WAIT_LIMIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            panic!("volley send did not end within {WAIT_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn accepted(env: &common::Env) -> u64 {
    env.sink.summary().counts.rcpts_accepted
}

/// Waits until the sink has accepted more than `n` recipients; how many it has.
fn accepted_past(env: &common::Env, n: u64, why: &str) -> u64 {
    let until = Instant::now() + WAIT_LIMIT;
    loop {
        let a = accepted(env);
        if a > n {
            return a;
        }
        assert!(Instant::now() < until, "{why}: still {a} accepted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the sink's count has not moved for `quiet`; that count.
fn settled(env: &common::Env, quiet: Duration) -> u64 {
    let until = Instant::now() + WAIT_LIMIT;
    let (mut last, mut since) = (accepted(env), Instant::now());
    while since.elapsed() < quiet {
        assert!(Instant::now() < until, "the sink never settled");
        std::thread::sleep(Duration::from_millis(20));
        let a = accepted(env);
        if a != last {
            (last, since) = (a, Instant::now());
        }
    }
    last
}

/// `volley queue --spool SPOOL ARGS`: its answer, which must be a success.
fn queue(spool: &Path, args: &[&str]) -> String {
    let mut all = vec!["queue", "--spool", spool.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = volley(&all);
    assert_eq!(code, 0, "volley queue {args:?}: {out}{err}");
    out
}

/// Polls `volley queue status` (each shard publishes it once a second) until
/// `want` holds; the status that did.
fn status_until(spool: &Path, why: &str, want: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + WAIT_LIMIT;
    loop {
        let status = queue(spool, &["status"]);
        if want(&status) {
            return status;
        }
        assert!(Instant::now() < until, "{why}: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn report_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_running_send_is_steered_stopped_by_signals_resumed_and_sent_anew() {
    let env = common::env("send-run", "");
    let spool = env.dir.join("spool");
    let log = spool.join("accounting.jsonl");
    let rows: Vec<String> = (0..ROWS).map(|i| format!("u{i}@gmail.com,Ann")).collect();
    let c = common::campaign(&env.dir, "spring", "", &rows);
    let (r1, r2) = (env.dir.join("r1.json"), env.dir.join("r2.json"));
    let paced = ["--max-msg-rate", "20/s"];

    // Run 1, paced: paused and resumed through the binary.
    let run = send(
        &env,
        &spool,
        &c,
        &[&paced[..], &["--report-json", r1.to_str().unwrap()]].concat(),
    );
    accepted_past(&env, 5, "the first deliveries");
    assert!(queue(&spool, &["pause", "gmail.com"]).starts_with("ok"));
    let held = settled(&env, Duration::from_millis(1500));
    assert!(
        (held as usize) < ROWS,
        "everything went before the pause took"
    );
    status_until(&spool, "the pause is not in the status", |s| {
        s.contains("domain:gmail.com paused")
    });
    assert!(queue(&spool, &["resume", "gmail.com"]).starts_with("ok"));
    let resumed = accepted_past(&env, held, "deliveries after resume");
    status_until(&spool, "the pause is still in the status", |s| {
        !s.contains("paused")
    });
    assert!(queue(&spool, &["rate", "campaign:spring", "10/s"]).starts_with("ok"));
    status_until(&spool, "the operator's rate is not in the status", |s| {
        s.contains("campaign:spring") && s.contains("operator")
    });

    // A second process on the busy spool: refused, and told who holds it.
    let other = common::campaign(&env.dir, "autumn", "", &rows[..3]);
    let (code, _, err) = finish(send(&env, &spool, &other, &[]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by volley process"), "{err}");
    assert!(
        err.contains("(a `volley send`, not a `volley serve`)"),
        "{err}"
    );
    assert!(err.contains("nothing queued"), "{err}");
    let instances = volley::spool::ingest::load_instances(&spool).unwrap();
    assert!(
        instances.values().all(|i| i.settings.id != "autumn"),
        "the refused campaign is in the spool"
    );

    // SIGINT: a clean stop with 75, the rest left in the spool and said so.
    run.signal(libc::SIGINT);
    let (code, out, err) = finish(run);
    assert_eq!(code, 75, "{out}{err}");
    assert!(out.contains("still queued"), "{out}");
    let j = report_json(&r1);
    let left = j["remaining"].as_u64().unwrap();
    assert!(left > 0, "{j}");
    assert!(j["delivered"].as_u64().unwrap() >= resumed, "{j}");
    assert_eq!(j["delivered"].as_u64().unwrap() + left, ROWS as u64, "{j}");

    // Run 2 goes on where run 1 stopped; SIGTERM stops it the same way.
    let run = send(
        &env,
        &spool,
        &c,
        &[&paced[..], &["--report-json", r2.to_str().unwrap()]].concat(),
    );
    let before = accepted(&env);
    accepted_past(&env, before + 3, "the resumed run's deliveries");
    run.signal(libc::SIGTERM);
    let (code, out, err) = finish(run);
    assert_eq!(code, 75, "{out}{err}");
    let j = report_json(&r2);
    assert_eq!(
        j["recipients"].as_u64(),
        Some(left),
        "it took what was left: {j}"
    );
    assert!(j["remaining"].as_u64().unwrap() > 0, "{j}");

    // Run 3, unpaced, finishes: every recipient delivered once in all.
    let (code, out, err) = finish(send(&env, &spool, &c, &[]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("resuming what is left"), "{err}");
    let lines = common::log_lines(&log);
    let t = common::terminal_by_rcpt(&lines);
    assert_eq!(t.len(), ROWS);
    for (rcpt, recs) in &t {
        assert_eq!(recs.len(), 1, "{rcpt}: {recs:?}");
        assert_eq!(recs[0]["type"], "Delivery", "{rcpt}");
    }
    assert_eq!(settled(&env, Duration::from_millis(300)), ROWS as u64);
    assert_eq!(
        env.sink.summary().counts.duplicates,
        0,
        "a clean stop sent something twice"
    );

    // Sent again as it is: nothing to do. With --new: a new instance, all of it.
    let (code, out, err) = finish(send(&env, &spool, &c, &[]));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        accepted(&env),
        ROWS as u64,
        "a finished campaign went again"
    );
    let (code, out, err) = finish(send(&env, &spool, &c, &["--new"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("queued {ROWS} recipients")), "{out}");
    assert!(out.contains(&format!("delivered    {ROWS}")), "{out}");
    // The sink counts a recipient it has seen before as a duplicate.
    assert_eq!(env.sink.summary().counts.duplicates, ROWS as u64);
}

/// A signal while `send` ingests: ingest finishes (what it queued is durable and
/// acknowledged), then the run stops at once with 75, and the next run resumes it.
#[test]
fn a_signal_during_ingest_lets_it_finish_then_stops_with_75() {
    const N: u64 = 150_000;
    let env = common::env("send-ingest-signal", "");
    let spool = env.dir.join("spool");
    let dir = env.dir.join("big");
    volley_load::gen::write_campaign(
        &dir,
        &volley_load::gen::GenOptions {
            recipients: N,
            campaign_id: "big".into(),
            body_bytes: 512,
            ..Default::default()
        },
    )
    .unwrap();
    let run = send(&env, &spool, &dir, &["--max-msg-rate", "50/s"]);
    // Ingest has begun once the instance's directory exists, and not ended while it
    // has no `queued` marker.
    let idir = spool.join("campaigns").join("1");
    let until = Instant::now() + WAIT_LIMIT;
    while !idir.exists() {
        assert!(Instant::now() < until, "ingest never began");
        std::thread::sleep(Duration::from_millis(2));
    }
    let mid_ingest = !idir.join("queued").exists();
    run.signal(libc::SIGTERM);
    let (code, out, err) = finish(run);
    assert_eq!(code, 75, "{out}{err}");
    assert!(
        out.contains(&format!("queued {N} recipients")),
        "{out}{err}"
    );
    assert!(out.contains("still queued"), "{out}");
    assert!(idir.join("queued").exists(), "acknowledged");
    eprintln!("signal during ingest: landed mid-ingest: {mid_ingest}");
    // The next run resumes it, queueing nothing twice.
    let run = send(&env, &spool, &dir, &["--max-wait", "1s"]);
    let (code, out, err) = finish(run);
    assert_eq!(code, 75, "{out}{err}");
    assert!(err.contains("resuming what is left"), "{err}");
}

/// A second signal ends `send` at once (the first asked for a clean stop, which an
/// impatient operator does not wait for): exit 75 with no report, and, as after a
/// crash, the next run delivers everything, sending again at most what was not yet
/// committed.
#[test]
fn a_second_signal_ends_send_at_once_and_the_next_run_loses_nothing() {
    // Replies to the data come late, so the clean stop waits for them (in flight).
    let env = common::env(
        "send-second-signal",
        "latency_ms = { data_end = [800, 1000] }",
    );
    let spool = env.dir.join("spool");
    const N: usize = 100;
    let rows: Vec<String> = (0..N).map(|i| format!("u{i}@gmail.com,Ann")).collect();
    let c = common::campaign(&env.dir, "twice", "", &rows);
    let report = env.dir.join("report.json");
    let run = send(
        &env,
        &spool,
        &c,
        &["--report-json", report.to_str().unwrap()],
    );
    accepted_past(&env, 10, "the first deliveries");
    // Signals sent back to back may arrive as one (a pending signal is a bit, not
    // a count): signal until the process is gone; the first one handled asks for
    // the clean stop, the next ends it.
    let mut run = run;
    let until = Instant::now() + WAIT_LIMIT;
    let mut signals = 0;
    while run.0.as_mut().unwrap().try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < until,
            "volley send outlived {signals} signals"
        );
        run.signal(libc::SIGTERM);
        signals += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, err) = finish(run);
    let first = accepted(&env);
    assert_eq!(code, 75, "{out}{err}");
    // The clean stop's report never came: the process ended before it.
    assert!(!out.contains("still queued"), "{out}");
    assert!(
        !report.exists(),
        "a report was written: it did not end at once"
    );
    let (code, out, err) = finish(send(&env, &spool, &c, &[]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("resuming what is left"), "{err}");
    assert_eq!(
        settled(&env, Duration::from_millis(300)),
        N as u64,
        "every recipient reached the sink: {out}{err}"
    );
    // Sent twice at most what the first run had sent when it ended.
    let twice = env.sink.summary().counts.duplicates;
    assert!(
        twice <= first,
        "{twice} sent twice, {first} sent before the end"
    );
    let lines = common::log_lines(&spool.join("accounting.jsonl"));
    let t = common::terminal_by_rcpt(&lines);
    assert_eq!(t.len(), N, "every recipient has its outcome in the log");
}
