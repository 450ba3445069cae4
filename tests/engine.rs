//! The engine end to end against the bundled sink and test DNS on loopback.

mod common;

use common::*;
use std::time::Duration;
use volley::deliver::runtime::Driver;
use volley_load::gen;

fn generated(env: &Env, n: u64) -> std::path::PathBuf {
    let d = env.dir.join("gen");
    gen::write_campaign(
        &d,
        &gen::GenOptions {
            recipients: n,
            campaign_id: "gen".into(),
            body_bytes: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    d
}

fn delivers_everything_once(driver: Driver, name: &str) {
    let env = env(name, "");
    let dir = generated(&env, 600);
    let mut cfg = env.config();
    cfg.driver = driver;
    let log = cfg.log_path.clone();
    let spool = cfg.spool_dir.clone();
    let r = env.send(&dir, cfg);
    assert_eq!(
        (r.recipients, r.delivered, r.bounced, r.remaining),
        (600, 600, 0, 0)
    );
    // The driver that ran, not the one asked for: `auto` resolves to io_uring where
    // the kernel gives it (a forced io_uring that is not there fails above).
    let ran = match driver {
        Driver::Auto if io_uring_here() => "io-uring",
        Driver::Auto | Driver::Epoll => "epoll",
        Driver::IoUring => "io-uring",
    };
    assert_eq!(r.driver, ran);
    let s = env.sink.summary();
    assert_eq!(s.counts.rcpts_accepted, 600);
    assert_eq!(
        (s.counts.corrupt, s.counts.duplicates, s.counts.no_integrity),
        (0, 0, 0),
        "rendering checked by the sink"
    );
    let lines = log_lines(&log);
    let t = terminal_by_rcpt(&lines);
    assert_eq!(t.len(), 600);
    for (rcpt, recs) in &t {
        assert_eq!(recs.len(), 1, "{rcpt}");
        let r = &recs[0];
        assert_eq!(r["type"], "Delivery");
        assert_eq!(r["code"], 250);
        assert_eq!(r["campaign"], "gen");
        assert!(r["mx"].as_str().unwrap().ends_with(".sink.test"));
        assert!(r["ip"].as_str().unwrap().starts_with("127.0.0.1"));
    }
    // Google's domains went to Google's address, the tail to the tail's.
    let gmail = lines.iter().find(|l| l["domain"] == "gmail.com").unwrap();
    assert_eq!(gmail["mx"], "gmail-smtp-in.l.google.sink.test");
    // Many messages per connection: far fewer connections than messages.
    assert!(
        s.counts.connections < 150,
        "{} connections for 600 messages",
        s.counts.connections
    );
    // Every segment but the open one is deleted once done.
    for shard in 0..2 {
        let segs = std::fs::read_dir(spool.join(format!("shard-{shard}")))
            .unwrap()
            .count();
        assert_eq!(segs, 1, "shard {shard}");
    }
}

/// Whether this kernel (and its seccomp filter) lets a monoio io_uring runtime start.
fn io_uring_here() -> bool {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .build()
        .is_ok()
}

#[test]
fn delivers_everything_once_auto() {
    delivers_everything_once(Driver::Auto, "auto");
}

/// io_uring forced: on a host without it this fails, and should (the engine's
/// main path would otherwise go untested without a word), unless the run says it
/// has none: `VOLLEY_TEST_NO_IO_URING=1` (a container whose seccomp profile blocks
/// io_uring) turns the failure into a visible skip, and only where io_uring is
/// indeed missing.
#[test]
fn delivers_everything_once_io_uring() {
    if std::env::var_os("VOLLEY_TEST_NO_IO_URING").is_some() && !io_uring_here() {
        common::skipped("io_uring cannot start here and VOLLEY_TEST_NO_IO_URING is set");
        return;
    }
    delivers_everything_once(Driver::IoUring, "uring");
}

#[test]
fn delivers_everything_once_epoll() {
    delivers_everything_once(Driver::Epoll, "epoll");
}

#[test]
fn dns_edge_cases_bounces_and_expiry() {
    let env = env("edges", "");
    let rows: Vec<String> = [
        "a@null-mx.edge.test",
        "b@nxdomain.edge.test",
        "c@fallback.edge.test",
        "d@no-mx.edge.test",
        "permfail.1@gmail.com",
        "tempfail.1@gmail.com",
        "e@servfail.edge.test",
        "f@yahoo.com",
    ]
    .iter()
    .map(|a| format!("{a},Ann"))
    .collect();
    let c = campaign(&env.dir, "edges", "expire_after = \"3s\"", &rows);
    let mut cfg = env.config();
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(700)]);
    let log = cfg.log_path.clone();
    let r = env.send(&c, cfg);
    assert_eq!(
        (r.delivered, r.bounced, r.expired, r.remaining),
        (3, 3, 2, 0),
        "{r:?}"
    );
    let t = terminal_by_rcpt(&log_lines(&log));
    let one = |rcpt: &str| {
        let recs = &t[rcpt];
        assert_eq!(recs.len(), 1, "{rcpt}: {recs:?}");
        recs[0].clone()
    };
    let r = one("a@null-mx.edge.test");
    assert_eq!(
        (
            r["type"].as_str(),
            r["enhanced"].as_str(),
            r["stage"].as_str()
        ),
        (Some("Bounce"), Some("5.1.10"), Some("dns"))
    );
    let r = one("b@nxdomain.edge.test");
    assert_eq!(
        (r["type"].as_str(), r["enhanced"].as_str()),
        (Some("Bounce"), Some("5.1.2"))
    );
    let r = one("c@fallback.edge.test");
    assert_eq!(
        (r["type"].as_str(), r["mx"].as_str()),
        (Some("Delivery"), Some("mx.tail.sink.test")),
        "second MX after the dead first"
    );
    assert_eq!(one("d@no-mx.edge.test")["type"], "Delivery", "implicit MX");
    assert_eq!(one("f@yahoo.com")["type"], "Delivery");
    let r = one("permfail.1@gmail.com");
    assert_eq!(
        (r["type"].as_str(), r["code"].as_u64(), r["stage"].as_str()),
        (Some("Bounce"), Some(550), Some("rcpt"))
    );
    assert_eq!(r["class"], "invalid_recipient");
    assert_eq!(one("a@null-mx.edge.test")["class"], "invalid_recipient");
    assert_eq!(one("tempfail.1@gmail.com")["type"], "Expiration");
    assert_eq!(one("e@servfail.edge.test")["type"], "Expiration");
    // Expired because the nameserver said SERVFAIL, not for a timeout or a refused
    // connection: every deferral of it says so.
    let servfails: Vec<_> = log_lines(&log)
        .into_iter()
        .filter(|l| l["type"] == "TransientFailure" && l["rcpt"] == "e@servfail.edge.test")
        .collect();
    assert!(!servfails.is_empty());
    for l in &servfails {
        assert_eq!(
            (
                l["stage"].as_str(),
                l["code"].as_u64(),
                l["enhanced"].as_str()
            ),
            (Some("dns"), Some(451), Some("4.4.3")),
            "{l}"
        );
        assert!(l["reply"].as_str().unwrap().contains("(SERVFAIL)"), "{l}");
    }
    let rep = volley::observe::report::report(&log, "edges").unwrap();
    assert_eq!(
        (rep.totals.delivered, rep.totals.bounced, rep.totals.expired),
        (3, 3, 2)
    );
    assert_eq!(
        rep.by_class["invalid_recipient"].bounced, 3,
        "{:?}",
        rep.by_class
    );
    assert_eq!(rep.by_domain["gmail.com"].bounced, 1);
    assert_eq!((rep.recipients_final, rep.recipients_pending), (8, 0));
    let deferrals = log_lines(&log)
        .iter()
        .filter(|l| l["type"] == "TransientFailure" && l["rcpt"] == "tempfail.1@gmail.com")
        .count();
    assert!(deferrals >= 2, "retried before expiring: {deferrals}");
}

#[test]
fn a_deferral_keeps_its_retry_time_and_attempt_count_across_a_restart() {
    let env = env("restart", "");
    let rows = [
        "tempfail.1@gmail.com,Ann".to_string(),
        "u1@gmail.com,Bob".into(),
    ];
    let c = campaign(&env.dir, "restart", "expire_after = \"8s\"", &rows);
    let cfg = || {
        let mut cfg = env.config();
        cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_secs(6)]);
        cfg
    };
    let log = cfg().log_path;
    // Stopped 2 s in, with the deferral due about 6 s after the first attempt.
    let r = env.send_for(Some(&c), cfg(), Some(Duration::from_secs(2)));
    assert_eq!((r.delivered, r.remaining), (1, 1), "{r:?}");
    // The next run must wait it out, then count on from attempt 1; its status says so.
    let spool = cfg().spool_dir;
    let status = std::thread::spawn(move || {
        let waiting = |s: &str| s.contains("0 recipients ready to send, 1 waiting to retry");
        let mut last = String::new();
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(50));
            match volley::deliver::control::request(&spool, "status") {
                Ok(s) if waiting(&s) => return s,
                Ok(s) => last = s,
                Err(e) => last = e.to_string(),
            }
        }
        last
    });
    let r = env.send_for(None, cfg(), None);
    let status = status.join().unwrap();
    assert!(status.contains("1 waiting to retry"), "{status}");
    assert_eq!((r.expired, r.remaining), (1, 0), "{r:?}");
    let attempts: Vec<(u64, f64)> = log_lines(&log)
        .iter()
        .filter(|l| l["type"] == "TransientFailure" && l["rcpt"] == "tempfail.1@gmail.com")
        .map(|l| {
            let t = log_time(l["time"].as_str().unwrap());
            (l["attempt"].as_u64().unwrap(), t)
        })
        .collect();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!((attempts[0].0, attempts[1].0), (1, 2), "{attempts:?}");
    let gap = attempts[1].1 - attempts[0].1;
    assert!(
        gap >= 5.4,
        "retried {gap:.1} s after the first attempt, not after the 6 s (±10%) it was given"
    );
    assert_eq!(env.sink.summary().counts.rcpt_tempfail, 2);
}

#[test]
fn a_recipient_past_its_maximum_age_at_restart_expires_without_another_attempt() {
    let env = env("restart-expired", "");
    let rows = ["tempfail.1@gmail.com,Ann".to_string()];
    let c = campaign(&env.dir, "late", "expire_after = \"3s\"", &rows);
    let cfg = || {
        let mut cfg = env.config();
        cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_secs(30)]);
        cfg
    };
    let r = env.send_for(Some(&c), cfg(), Some(Duration::from_secs(2)));
    assert_eq!(
        (r.remaining, env.sink.summary().counts.rcpt_tempfail),
        (1, 1)
    );
    // Down past the 3 s maximum age: the restart expires it and sends nothing.
    std::thread::sleep(Duration::from_millis(1500));
    let r = env.send_for(None, cfg(), None);
    assert_eq!((r.expired, r.remaining), (1, 0), "{r:?}");
    assert_eq!(
        env.sink.summary().counts.rcpt_tempfail,
        1,
        "attempted after expiry"
    );
    let log = log_lines(&cfg().log_path);
    let last = log
        .iter()
        .rfind(|l| l["rcpt"] == "tempfail.1@gmail.com")
        .unwrap();
    // It reports the receiver's last answer, from before the restart, not words of ours.
    let deferral = log
        .iter()
        .find(|l| l["type"] == "TransientFailure")
        .unwrap();
    assert_eq!(
        (last["type"].as_str(), last["stage"].as_str()),
        (Some("Expiration"), Some("rcpt")),
        "{last}"
    );
    assert_eq!(last["reply"], deferral["reply"], "{last}");
    assert_eq!(last["last_attempt"], deferral["time"], "{last}");
}

/// The log's RFC 3339 time stamp, in seconds since the epoch.
fn log_time(t: &str) -> f64 {
    let t = humantime::parse_rfc3339(t).unwrap();
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn mid_transaction_disconnects_and_421s_lose_nothing() {
    let env = env(
        "faults",
        "disconnect_in_data = 0.05\ndata_tempfail = 0.05\ndata_tempfail_replies = [\"421 4.7.28 rate limited\"]\nrcpt_permfail = 0.02",
    );
    let dir = generated(&env, 400);
    let mut cfg = env.config();
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(200)]);
    let log = cfg.log_path.clone();
    let r = env.send(&dir, cfg);
    assert_eq!(r.remaining, 0);
    assert_eq!(r.delivered + r.bounced + r.expired, 400, "{r:?}");
    let t = terminal_by_rcpt(&log_lines(&log));
    assert_eq!(t.len(), 400);
    assert!(
        t.values().all(|v| v.len() == 1),
        "one terminal outcome each"
    );
    let s = env.sink.summary();
    assert_eq!(s.counts.duplicates, 0);
    assert_eq!(s.counts.rcpts_accepted, r.delivered);
    assert!(
        s.counts.disconnects_in_data > 0 && s.counts.data_tempfail > 0,
        "the faults happened: {:?}",
        s.counts
    );
}

#[test]
fn recipients_of_one_domain_share_a_transaction_up_to_the_limit() {
    let env = env("multi", "");
    let rows: Vec<String> = (0..10)
        .map(|i| format!("u{i}@gmail.com,Ann"))
        .chain(std::iter::once("x@yahoo.com,Bob".into()))
        .collect();
    let c = campaign(&env.dir, "multi", "max_rcpt_per_msg = 4", &rows);
    let mut cfg = env.config();
    cfg.shards = 1;
    let r = env.send(&c, cfg);
    assert_eq!(r.delivered, 11);
    let s = env.sink.summary();
    assert_eq!(s.counts.rcpts_accepted, 11);
    // 10 gmail recipients in transactions of at most 4 (4+4+2), yahoo alone.
    assert_eq!(s.counts.messages_accepted, 4, "{:?}", s.counts);
}

#[test]
fn greylisting_is_retried_after_the_named_delay() {
    let env = env("grey", "greylist_s = 1");
    let rows: Vec<String> = ["a@gmail.com", "b@yahoo.com", "c@shop1.tail.test"]
        .iter()
        .map(|a| format!("{a},Ann"))
        .collect();
    let c = campaign(&env.dir, "grey", "", &rows);
    let cfg = env.config();
    let log = cfg.log_path.clone();
    let t = std::time::Instant::now();
    let r = env.send(&c, cfg);
    assert_eq!(r.delivered, 3);
    // The default schedule's first retry is 5 minutes; the greylist said 1 second.
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let lines = log_lines(&log);
    let deferred: Vec<_> = lines
        .iter()
        .filter(|l| l["type"] == "TransientFailure")
        .collect();
    assert_eq!(deferred.len(), 3, "{lines:?}");
    assert!(deferred
        .iter()
        .all(|l| l["class"] == "transient_other" && l["code"] == 451));
}

#[test]
fn a_receiver_that_closes_connections_gets_fewer_transactions_pipelined() {
    let env = env(
        "window",
        // A closing 421 that is no throttle reply: this is about the window, and
        // throttle back-offs would slow the run down to their floor.
        "data_tempfail = 0.05\ndata_tempfail_replies = [\"421 4.3.0 Temporary server error, closing\"]\n\
         latency_ms = { data_end = [1, 3] }",
    );
    let dir = generated(&env, 3000);
    let mut cfg = env.config();
    cfg.shards = 1;
    cfg.window = 8;
    // Few connections, so each has a full window pipelined when the 421 comes.
    cfg.defaults.max_connections = Some(volley::policy::shaping::rules::Set::cli(2));
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(200)]);
    let log = cfg.log_path.clone();
    let r = env.send(&dir, cfg);
    assert_eq!(r.delivered, 3000, "{r:?}");
    let s = env.sink.summary();
    assert_eq!(s.counts.duplicates, 0);
    let t = terminal_by_rcpt(&log_lines(&log));
    assert!(
        t.values().all(|v| v.len() == 1),
        "one terminal outcome each"
    );
    // Each closing 421 cuts off what was pipelined behind it. With the window held
    // at 8 that was 4.4 transactions each (683 for 156); halving it on every
    // cut-off keeps it near 2, and the loss under one each.
    let closes = s.counts.data_tempfail;
    assert!(
        closes > 50,
        "the receiver closed connections: {:?}",
        s.counts
    );
    eprintln!("closing 421s {closes}, requeued {}", r.requeued);
    assert!(
        r.requeued <= 2 * closes,
        "{} transactions cut off by {closes} closing 421s",
        r.requeued
    );
}
