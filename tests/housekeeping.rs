//! Spool housekeeping end to end, through the binary against the bundled sink on
//! loopback: `volley queue purge` sent to a running `volley send` (a campaign
//! waiting for retries, a domain beside another, recipients in flight), and
//! retention pruning finished campaigns at `send`'s start and in `volley serve`.

mod common;

use common::daemon::{add_token, base_args, free_port, http, write_config, Daemon, VOLLEY};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `volley ARGS`; exit code, stdout, stderr.
fn volley(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(VOLLEY).args(args).output().unwrap();
    said(out)
}

fn said(out: Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The flags that point `volley send` at the test's spool, sink and DNS.
fn send_args(env: &common::Env, spool: &Path) -> Vec<String> {
    let mut args = vec!["--quiet".to_string()];
    args.extend(base_args(env, spool));
    args.extend(["--ehlo", "test.volley.test", "--shards", "2"].map(String::from));
    args
}

/// `volley send DIR` started in the background with `extra` flags.
fn send_in_background(env: &common::Env, spool: &Path, dir: &Path, extra: &[&str]) -> Child {
    Command::new(VOLLEY)
        .arg("send")
        .arg(dir)
        .args(send_args(env, spool))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (at most 30 s) for a background `send` to exit; its code and output.
fn finish(mut child: Child) -> (i32, String, String) {
    let until = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            let (_, out, err) = said(child.wait_with_output().unwrap());
            panic!("volley send did not finish after the purge:\n{out}{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    said(child.wait_with_output().unwrap())
}

/// Waits (at most 30 s) until the log at `log` satisfies `done`.
fn wait_log(log: &Path, what: &str, done: impl Fn(&[serde_json::Value]) -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if done(&common::log_lines(log)) {
            return;
        }
        assert!(
            Instant::now() < until,
            "never saw {what} in {}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count(lines: &[serde_json::Value], kind: &str) -> usize {
    lines.iter().filter(|l| l["type"] == kind).count()
}

/// `volley queue purge ARGS` against `spool`; the answer line.
fn purge(spool: &Path, args: &[&str]) -> String {
    let mut all = vec!["queue", "--spool", spool.to_str().unwrap(), "purge"];
    all.extend_from_slice(args);
    let (code, out, err) = volley(&all);
    assert_eq!(code, 0, "{out}{err}");
    out
}

/// Every record of `rcpt`, in log order.
fn of<'a>(lines: &'a [serde_json::Value], rcpt: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["rcpt"] == rcpt).collect()
}

/// Asserts `r` is a purge's bounce carrying `reason`.
fn assert_purged(r: &serde_json::Value, reason: &str) {
    assert_eq!(r["type"], "Bounce", "{r}");
    assert_eq!(r["class"], "policy", "{r}");
    assert_eq!(r["stage"], "local", "{r}");
    assert_eq!(
        (r["code"].as_u64(), r["enhanced"].as_str()),
        (Some(550), Some("5.7.1")),
        "{r}"
    );
    let text = r["reply"].as_str().unwrap();
    assert!(
        text.contains("purged from the queue by the operator"),
        "{r}"
    );
    assert!(text.ends_with(reason), "{r}");
}

/// Recipients still pending in `spool` (recovery of each shard's segments).
fn pending_in(spool: &Path) -> usize {
    let instances = volley::spool::ingest::load_instances(spool).unwrap();
    (0..2)
        .map(|s| {
            let dir = volley::spool::ingest::shard_dir(spool, s);
            let (_, r) =
                volley::spool::Spool::open(&dir, 64 << 20, &|i| instances.contains_key(&i))
                    .unwrap();
            r.pending.len()
        })
        .sum()
}

#[test]
fn purging_a_campaign_bounces_what_waits_for_retry_once_and_a_restart_sends_nothing() {
    let env = common::env("purge-campaign", "");
    let spool = env.dir.join("spool");
    let log = spool.join("accounting.jsonl");
    let mut rows: Vec<String> = (0..10)
        .map(|i| format!("tempfail.{i}@gmail.com,T{i}"))
        .collect();
    rows.extend((0..10).map(|i| format!("u{i}@yahoo.com,U{i}")));
    let c = common::campaign(&env.dir, "spring", "", &rows);
    // The deferred wait an hour in the retry wheel: only the purge ends this run.
    let send = send_in_background(&env, &spool, &c, &["--retry-schedule", "1h"]);
    wait_log(&log, "10 deliveries and 10 deferrals", |l| {
        count(l, "Delivery") == 10 && count(l, "TransientFailure") == 10
    });
    let answer = purge(
        &spool,
        &["campaign:spring", "--reason", "list bought by mistake"],
    );
    assert!(
        answer.starts_with("ok: campaign:spring purged: 10 recipients bounced, 0 in flight"),
        "{answer}"
    );
    assert!(answer.contains("on 2 of 2 shards"), "{answer}");
    let (code, out, err) = finish(send);
    assert_eq!(code, 0, "nothing left after the purge:\n{out}{err}");
    // The run's report adds up: the purged count as bounced.
    assert!(out.contains("recipients   20"), "{out}");
    assert!(out.contains("delivered    10"), "{out}");
    assert!(out.contains("bounced      10"), "{out}");
    assert!(out.contains("still queued 0"), "{out}");
    let lines = common::log_lines(&log);
    for i in 0..10 {
        let rcpt = format!("tempfail.{i}@gmail.com");
        let recs = of(&lines, &rcpt);
        let finals: Vec<_> = recs
            .iter()
            .filter(|r| r["type"] != "TransientFailure")
            .collect();
        assert_eq!(finals.len(), 1, "one final record for {rcpt}: {recs:?}");
        assert_purged(finals[0], "list bought by mistake");
        assert_eq!(finals[0]["campaign"], "spring");
        assert_eq!(finals[0]["attempt"], 1, "a purge is not an attempt");
    }
    let events: Vec<_> = lines
        .iter()
        .filter(|l| l["type"] == "Shaping" && l["event"] == "purged")
        .collect();
    assert_eq!(events.len(), 2, "one operator event per shard: {events:?}");
    assert!(events.iter().all(|e| e["key"] == "campaign:spring"));
    let purged: u64 = events
        .iter()
        .map(|e| {
            let r = e["reason"].as_str().unwrap();
            r.split_whitespace().nth(2).unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(purged, 10, "{events:?}");
    assert_eq!(pending_in(&spool), 0, "nothing stays in the spool");
    // `volley report` reads the same story from the log.
    let (code, out, err) = volley(&["report", "spring", "--json", "--log", log.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["recipients_final"], 20, "{r}");
    assert_eq!(r["by_class"]["policy"]["bounced"], 10, "{r}");
    // A restart sends nothing of it.
    let before = env.sink.summary().counts;
    let mut again = vec!["send".to_string(), c.display().to_string()];
    again.extend(send_args(&env, &spool));
    let again: Vec<&str> = again.iter().map(String::as_str).collect();
    let (code, out, err) = volley(&again);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("recipients   0"), "{out}");
    let after = env.sink.summary().counts;
    assert_eq!(
        (after.rcpts_accepted, after.rcpt_tempfail),
        (before.rcpts_accepted, before.rcpt_tempfail),
        "nothing sent after the purge"
    );
    assert_eq!(common::log_lines(&log).len(), lines.len());
}

#[test]
fn purging_a_domain_leaves_the_other_domains_to_their_retries() {
    let env = common::env("purge-domain", "");
    let spool = env.dir.join("spool");
    let log = spool.join("accounting.jsonl");
    let mut rows: Vec<String> = (0..5)
        .map(|i| format!("tempfail.{i}@gmail.com,G{i}"))
        .collect();
    rows.extend((0..5).map(|i| format!("tempfail.{i}@yahoo.com,Y{i}")));
    let c = common::campaign(&env.dir, "both", "expire_after = \"6s\"", &rows);
    let send = send_in_background(&env, &spool, &c, &["--retry-schedule", "1s"]);
    wait_log(&log, "a deferral of each", |l| {
        count(l, "TransientFailure") >= 10
    });
    let answer = purge(
        &spool,
        &["domain:gmail.com", "--reason", "gmail asked us to stop"],
    );
    assert!(
        answer.starts_with("ok: domain:gmail.com purged: "),
        "{answer}"
    );
    let (code, out, err) = finish(send);
    assert_eq!(code, 0, "{out}{err}");
    let lines = common::log_lines(&log);
    for i in 0..5 {
        let gmail = format!("tempfail.{i}@gmail.com");
        let finals: Vec<_> = of(&lines, &gmail)
            .into_iter()
            .filter(|r| r["type"] != "TransientFailure")
            .collect();
        assert_eq!(finals.len(), 1, "{gmail}: {finals:?}");
        assert_purged(finals[0], "gmail asked us to stop");
        // Yahoo's went on being retried after the purge, to their expiry.
        let yahoo = format!("tempfail.{i}@yahoo.com");
        let recs = of(&lines, &yahoo);
        assert!(
            recs.iter().all(|r| r["class"] != "policy"),
            "{yahoo} not purged: {recs:?}"
        );
        assert_eq!(recs.last().unwrap()["type"], "Expiration", "{recs:?}");
        let tries = recs
            .iter()
            .filter(|r| r["type"] == "TransientFailure")
            .count();
        assert!(tries >= 3, "{yahoo} retried after the purge: {recs:?}");
    }
    // What the answer counted is what the log holds.
    let n: u64 = answer.split_whitespace().nth(3).unwrap().parse().unwrap();
    let in_flight: u64 = answer.split_whitespace().nth(6).unwrap().parse().unwrap();
    assert_eq!(n + in_flight, 5, "{answer}");
    assert!(out.contains("bounced      5"), "{out}");
    assert!(out.contains("expired      5"), "{out}");
    assert_eq!(pending_in(&spool), 0);
}

#[test]
fn recipients_in_flight_at_a_purge_are_bounced_when_the_receiver_defers_them() {
    // Every message is answered 3 s after its data, with a temporary failure.
    let env = common::env(
        "purge-in-flight",
        "data_tempfail = 1.0\nlatency_ms = { data_end = [3000, 3000] }",
    );
    let spool = env.dir.join("spool");
    let log = spool.join("accounting.jsonl");
    let rows: Vec<String> = (0..4).map(|i| format!("f{i}@gmail.com,F{i}")).collect();
    let c = common::campaign(&env.dir, "flight", "", &rows);
    let send = send_in_background(&env, &spool, &c, &["--retry-schedule", "1h"]);
    let until = Instant::now() + Duration::from_secs(20);
    while env.sink.summary().counts.connections == 0 {
        assert!(Instant::now() < until, "no connection to the sink");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Well inside the 3 s the sink takes to answer.
    std::thread::sleep(Duration::from_millis(700));
    assert!(common::log_lines(&log).is_empty(), "nothing answered yet");
    let answer = purge(&spool, &["campaign:flight"]);
    assert!(
        answer.starts_with("ok: campaign:flight purged: 0 recipients bounced, 4 in flight"),
        "{answer}"
    );
    let (code, out, err) = finish(send);
    assert_eq!(code, 0, "{out}{err}");
    let lines = common::log_lines(&log);
    for i in 0..4 {
        let rcpt = format!("f{i}@gmail.com");
        let recs = of(&lines, &rcpt);
        let kinds: Vec<&str> = recs.iter().map(|r| r["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["TransientFailure", "Bounce"], "{recs:?}");
        assert_purged(recs[1], "no reason given");
    }
    assert_eq!(env.sink.summary().counts.messages_accepted, 0);
    assert_eq!(pending_in(&spool), 0);
}

#[test]
fn a_purge_of_what_is_not_a_campaign_or_domain_is_refused_before_sending() {
    let dir = std::env::temp_dir().join(format!("volley-purge-refused-{}", std::process::id()));
    // Refused by the command line, before anything reaches a socket: its stderr.
    let refused = |args: &[&str]| {
        let mut all = vec!["queue", "--spool", dir.to_str().unwrap(), "purge"];
        all.extend(args);
        let (code, _, err) = volley(&all);
        assert_eq!(code, 1, "{args:?}: {err}");
        err
    };
    let err = refused(&["provider:google"]);
    assert!(err.contains("purge takes campaign:ID or a domain"), "{err}");
    let err = refused(&["gmail.com", "--reason", "two\nlines"]);
    assert!(err.contains("--reason has a line break"), "{err}");
    // A reason that reads differently from what it holds (U+202E) is refused too.
    let err = refused(&["gmail.com", "--reason", "list \u{202e}txt.exe"]);
    assert!(err.contains("direction-changing character"), "{err}");
    // The socket's line is split at whitespace: a target with a space would turn its
    // tail into the reason (and purge the whole campaign with it).
    for target in ["campaign:p1 extra words", "gmail.com\tx", "campaign:"] {
        let err = refused(&[target]);
        assert!(
            err.contains("has a space or a control character") || err.contains("names nothing"),
            "{target:?}: {err}"
        );
    }
}

/// The files of instance `no`'s directory, sorted.
fn files_of(spool: &Path, no: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(spool.join("campaigns").join(no.to_string()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `volley send` of `dir` to the end with `extra` flags; code, stdout, stderr.
fn send(env: &common::Env, spool: &Path, dir: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["send".to_string(), dir.display().to_string()];
    args.extend(send_args(env, spool));
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    volley(&args)
}

#[test]
fn a_finished_campaign_is_pruned_after_its_retention_and_an_unfinished_one_never() {
    let env = common::env("retention", "");
    let spool = env.dir.join("spool");
    let log = spool.join("accounting.jsonl");
    let rows: Vec<String> = (0..6).map(|i| format!("a{i}@gmail.com,A{i}")).collect();
    let a = common::campaign(&env.dir, "autumn", "", &rows);
    let (code, out, err) = send(&env, &spool, &a, &["--spool-retention", "0s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("(instance 1)"), "{out}");
    // Marked final when its send ends, so the retention counts from then.
    let finished_at = std::fs::read_to_string(spool.join("campaigns/1/finished")).unwrap();
    assert!(finished_at.contains("finished_at_unix_ms"), "{finished_at}");
    // Unfinished: a deferral left waiting when the run stops.
    let b = common::campaign(
        &env.dir,
        "winter",
        "",
        &["tempfail.1@gmail.com,W".to_string()],
    );
    let (code, out, err) = send(
        &env,
        &spool,
        &b,
        &[
            "--spool-retention",
            "0s",
            "--retry-schedule",
            "1h",
            "--max-wait",
            "2s",
        ],
    );
    assert_eq!(code, 75, "{out}{err}");
    // That start found autumn final and, with no retention, pruned it.
    assert!(err.contains("pruned campaign autumn (instance 1"), "{err}");
    assert_eq!(files_of(&spool, 1), ["pruned"]);
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(spool.join("campaigns/1/pruned")).unwrap())
            .unwrap();
    assert_eq!(
        (t["instance"].as_u64(), t["campaign"].as_str()),
        (Some(1), Some("autumn"))
    );
    assert_eq!(t["recipients"], 6);
    assert!(
        t["finished_at"].as_str().is_some() && t["pruned_at"].as_str().is_some(),
        "{t}"
    );
    // The next campaign gets a new number; the unfinished one keeps its copy, unmarked.
    let c = common::campaign(&env.dir, "spring", "", &["s1@yahoo.com,S".to_string()]);
    let (code, out, err) = send(
        &env,
        &spool,
        &c,
        &["--spool-retention", "0s", "--max-wait", "4s"],
    );
    assert_eq!(code, 75, "winter is still pending: {out}{err}");
    assert!(out.contains("campaign spring (instance 3)"), "{out}");
    assert!(!err.contains("pruned campaign winter"), "{err}");
    let winter = files_of(&spool, 2);
    assert!(winter.contains(&"recipients.csv".to_string()), "{winter:?}");
    assert!(!winter.contains(&"finished".to_string()) && !winter.contains(&"pruned".to_string()));
    // Spring finished in that run: pruned at the next start, after its retention.
    assert!(!files_of(&spool, 3).contains(&"finished".to_string()));
    let (code, _, err) = send(
        &env,
        &spool,
        &b,
        &["--spool-retention", "1h", "--max-wait", "1s"],
    );
    assert_eq!(code, 75, "{err}");
    assert!(
        files_of(&spool, 3).contains(&"finished".to_string()),
        "marked, kept an hour"
    );
    // The accounting log still has autumn.
    let (code, out, err) = volley(&["report", "autumn", "--json", "--log", log.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["totals"]["delivered"], 6, "{r}");
    // Sending autumn again is asked for, not assumed.
    let (code, _, err) = send(&env, &spool, &a, &["--spool-retention", "0s"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("campaign autumn was sent already (instance 1"),
        "{err}"
    );
    assert!(err.contains("--new sends it again"), "{err}");
    assert_eq!(
        env.sink.summary().counts.rcpts_accepted,
        7,
        "autumn's 6 and spring's 1, once"
    );
}

#[test]
fn serve_prunes_a_campaign_once_it_is_final_and_goes_on_taking_new_ones() {
    let env = common::env("retention-serve", "");
    let spool = env.dir.join("spool");
    let (tokens, token) = add_token(&env.dir);
    let api: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(
        &env.dir,
        &format!(
            "spool_retention = \"1s\"\ntokens = \"{}\"\n[http]\nlisten = \"{api}\"\n",
            tokens.display()
        ),
    );
    let mut args = vec!["--config".into(), config.display().to_string()];
    args.extend(base_args(&env, &spool));
    let d = Daemon::start(&env.dir, &args);
    let rows: Vec<String> = (0..20).map(|i| format!("h{i}@gmail.com,H{i}")).collect();
    let c = common::campaign(&env.dir, "handed", "", &rows);
    let hand_over = |new: bool| {
        let mut args = vec![
            "send",
            c.to_str().unwrap(),
            "--quiet",
            "--spool",
            spool.to_str().unwrap(),
        ];
        if new {
            args.push("--new");
        }
        volley(&args)
    };
    let (code, out, err) = hand_over(false);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("delivered    20"), "{out}");
    let no: u32 = out
        .split("(instance ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    let until = Instant::now() + Duration::from_secs(15);
    while files_of(&spool, no) != ["pruned"] {
        assert!(
            Instant::now() < until,
            "not pruned: {:?}",
            files_of(&spool, no)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The line comes after the tombstone is written: waited for, not read at once.
    d.wait_stderr(&format!("pruned campaign handed (instance {no}"));
    // Sent already: handing the same id again (a retried script, a client that timed
    // out) would send the whole list again, so it is refused, over the admin socket
    // and the API alike, unless asked for.
    let (code, out, err) = hand_over(false);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!(
            "campaign handed was sent already (instance {no}, final since"
        )),
        "{err}"
    );
    let body = r#"{"id":"handed","sender":"bounces@news.test","from_domain":"news.test","dkim":false,"template":"From: news@news.test\nSubject: s\n\nhi\n","recipients":[{"email":"h1@gmail.com"}]}"#;
    let (status, _, resp) = http(api, "POST", "/api/v1/inject", Some(&token), body);
    assert_eq!(status, 409, "{resp}");
    assert!(resp.contains("was sent already"), "{resp}");
    assert_eq!(env.sink.summary().counts.rcpts_accepted, 20);
    // Asked for: a new instance, which the shards that dropped the old one deliver.
    let (code, out, err) = hand_over(true);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains(&format!("(instance {no})")), "{out}");
    // The sink counts the second delivery of the same addresses as duplicates.
    let counts = env.sink.summary().counts;
    assert_eq!((counts.rcpts_accepted, counts.duplicates), (20, 20));
}
