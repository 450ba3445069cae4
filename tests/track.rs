//! `volley track`: a send against the bundled sink that delivers one recipient,
//! bounces one and defers one; then track answers each through the binary, from the
//! spool read directly (no process runs it) and from a running daemon over its
//! admin socket and its HTTP API.

mod common;

use common::daemon::volley;

use common::daemon::{add_token, base_args, free_port, http, wait_for, write_config, Daemon};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// `volley track RCPT --json` on `spool` and `log`: the exit code and the answer.
fn track_json(spool: &Path, log: &Path, rcpt: &str) -> (i32, serde_json::Value) {
    let (code, out, err) = volley(&[
        "track",
        rcpt,
        "--spool",
        spool.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--json",
    ]);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    (code, v)
}

const ROWS: [&str; 3] = [
    "u1@gmail.com,Ann",
    "permfail.1@gmail.com,Bob",
    "tempfail.1@gmail.com,Cid",
];

#[test]
fn track_answers_delivered_bounced_and_queued_from_the_log_and_the_spool() {
    let env = common::env("track-spool", "");
    let rows: Vec<String> = ROWS.iter().map(|r| r.to_string()).collect();
    let c = common::campaign(&env.dir, "tr", "", &rows);
    let mut cfg = env.config();
    cfg.retry.default = vec![Duration::from_secs(3600)];
    cfg.retry.per_class.clear();
    let (spool, log) = (cfg.spool_dir.clone(), cfg.log_path.clone());
    // Stopped once the deferral is logged: it stays in the spool for its retry.
    let r = env.send_for(Some(&c), cfg, Some(Duration::from_secs(2)));
    assert_eq!((r.delivered, r.bounced), (1, 1));

    let (code, v) = track_json(&spool, &log, "U1@Gmail.com");
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["status"][0]["state"], "delivered", "{v}");
    assert_eq!(v["events"][0]["type"], "Delivery");
    assert_eq!(v["live"], "spool");

    let (code, v) = track_json(&spool, &log, "permfail.1@gmail.com");
    assert_eq!(code, 0);
    let s = &v["status"][0];
    assert_eq!(
        (s["campaign"].as_str(), s["state"].as_str()),
        (Some("tr"), Some("bounced"))
    );
    let detail = s["detail"].as_str().unwrap();
    assert!(detail.contains("550 5.1.1 User unknown"), "{detail}");
    assert!(detail.contains("class invalid_recipient"), "{detail}");
    assert!(detail.contains("mx "), "{detail}");

    let (code, v) = track_json(&spool, &log, "tempfail.1@gmail.com");
    assert_eq!(code, 0);
    let s = &v["status"][0];
    assert_eq!(s["state"], "queued", "{v}");
    let detail = s["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("queued in shard ") && detail.contains("waiting for retry until "),
        "{detail}"
    );
    assert!(
        detail.contains("after attempt 1 with reply 450 4.2.1"),
        "{detail}"
    );
    assert_eq!(v["events"][0]["type"], "TransientFailure");
    assert_eq!(v["queued"][0]["attempts"], 1);

    // The text answer: the state, then one line per record.
    let (code, out, _) = volley(&[
        "track",
        "tempfail.1@gmail.com",
        "--spool",
        spool.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("campaign tr: queued in shard"), "{out}");
    assert!(out.contains("TransientFailure"), "{out}");

    // A campaign it is not in, an unknown address: exit 1, saying so.
    let (code, out, err) = volley(&[
        "track",
        "u1@gmail.com",
        "--campaign",
        "other",
        "--spool",
        spool.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("nothing is known about u1@gmail.com in campaign other"),
        "{err}"
    );
    let (code, _, _) = volley(&[
        "track",
        "nobody@gmail.com",
        "--spool",
        spool.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    // Bad usage, exit 2: no address, not an address, a Message-ID.
    let (code, _, _) = volley(&["track"]);
    assert_eq!(code, 2);
    let (code, _, err) = volley(&["track", "nobody", "--log", log.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("is not an address"), "{err}");
    let (code, _, err) = volley(&["track", "<x@y.test>", "--log", log.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("Message-ID"), "{err}");
}

#[test]
fn a_running_daemon_answers_track_over_its_admin_socket_and_http() {
    let env = common::env("track-daemon", "");
    let spool = env.dir.join("spool");
    let log = spool.join("accounting.jsonl");
    let (tokens, token) = add_token(&env.dir);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = write_config(&env.dir, "retry_schedule = \"1h\"\n");
    let mut args = base_args(&env, &spool);
    args.extend([
        "--config".into(),
        cfg.display().to_string(),
        "--http".into(),
        addr.to_string(),
        "--tokens".into(),
        tokens.display().to_string(),
    ]);
    let d = Daemon::start(&env.dir, &args);
    let recipients: Vec<String> = ROWS
        .iter()
        .map(|r| format!("{{\"email\":\"{}\"}}", r.split(',').next().unwrap()))
        .collect();
    let body = format!(
        "{{\"id\":\"live\",\"sender\":\"bounces@news.test\",\"from_domain\":\"news.test\",\"dkim\":false,\
          \"template\":\"From: news@news.test\\nTo: {{{{email}}}}\\nSubject: Hi\\n\\nHello\\n\",\
          \"recipients\":[{}]}}",
        recipients.join(",")
    );
    let (status, _, resp) = http(addr, "POST", "/api/v1/inject", Some(&token), &body);
    assert_eq!(status, 202, "{resp}");
    d.wait_terminal(&log, "u1@gmail.com");
    d.wait_terminal(&log, "permfail.1@gmail.com");
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            common::log_lines(&log)
                .iter()
                .any(|l| l["type"] == "TransientFailure")
                .then_some(())
        },
        || "no deferral logged".into(),
    );

    // The admin socket: the shards say where the deferred one waits.
    let (code, v) = track_json(&spool, &log, "TempFail.1@gmail.com");
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["live"], "daemon", "{v}");
    let q = &v["queued"][0];
    assert_eq!(
        (q["state"].as_str(), q["attempts"].as_u64()),
        (Some("waiting"), Some(1)),
        "{v}"
    );
    assert_eq!(q["last"]["code"], 450, "{v}");
    assert!(q["retry_at"].as_str().is_some(), "{v}");
    let cli_answer = v;

    // The HTTP API gives the same answer (the retry time may be read a tick apart).
    let (status, _, resp) = http(
        addr,
        "GET",
        "/api/v1/track?rcpt=TempFail.1%40gmail.com",
        Some(&token),
        "",
    );
    assert_eq!(status, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["status"], cli_answer["status"], "{resp}");
    assert_eq!(v["events"], cli_answer["events"]);
    assert_eq!(v["queued"][0]["state"], "waiting");
    let (status, _, resp) = http(
        addr,
        "GET",
        "/api/v1/track?rcpt=permfail.1%40gmail.com&campaign=live",
        Some(&token),
        "",
    );
    assert_eq!(status, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["status"][0]["state"], "bounced", "{resp}");
    let (status, _, resp) = http(
        addr,
        "GET",
        "/api/v1/track?rcpt=nobody%40gmail.com",
        Some(&token),
        "",
    );
    assert_eq!(status, 404, "{resp}");
    let (status, _, _) = http(addr, "GET", "/api/v1/track?rcpt=nobody", Some(&token), "");
    assert_eq!(status, 400);
    let (status, _, _) = http(addr, "GET", "/api/v1/track?rcpt=u1%40gmail.com", None, "");
    assert_eq!(status, 401, "the token is needed");
    drop(d);
}
