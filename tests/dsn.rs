//! RFC 3464 DSNs: a campaign with `dsn = true` gets one multipart/report per bounced
//! recipient at its return path, from the null sender, through the normal spool and
//! delivery, made when the bounce is recorded; a campaign without it gets none.

mod common;

use common::*;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use volley::spool::ingest;

#[test]
fn bounces_come_back_to_the_return_path_as_dsns() {
    let (env, keep) = env_keeping("dsn");
    // The return path is on a tail domain, which the test DNS routes to the sink.
    let with = campaign(
        &env.dir,
        "with-dsn",
        "dsn = true\nsender = \"bounces@shop7.tail.test\"",
        &[
            "ok1@gmail.com,Ann".into(),
            "permfail1@gmail.com,Bob".into(),
            "permfail2@yahoo.com,Cy".into(),
        ],
    );
    let without = campaign(&env.dir, "no-dsn", "", &["permfail3@gmail.com,Di".into()]);
    // `campaign()` writes its own sender line first; a second `sender` would be a
    // duplicate key, so the first one is dropped here.
    let toml = with.join("campaign.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replacen("sender = \"bounces@news.test\"\n", "", 1),
    )
    .unwrap();

    let cfg = env.config();
    let (spool, log) = (cfg.spool_dir.clone(), cfg.log_path.clone());
    let lock = ingest::lock_spool(&spool, cfg.shards).unwrap();
    for c in [&with, &without] {
        let c = volley::message::campaign::Campaign::load(c).unwrap();
        ingest::ingest(&c, &spool, cfg.shards, cfg.segment_bytes).unwrap();
    }
    let instances = Arc::new(ingest::load_instances(&spool).unwrap());
    let r = volley::deliver::engine::run(
        env.config(),
        instances,
        Arc::new(AtomicBool::new(false)),
        false,
    )
    .unwrap();
    // The DSNs are made as the bounces are recorded and go out in the same run.
    assert_eq!((r.delivered, r.bounced), (1 + 2, 3));
    drop(lock);

    let lines = log_lines(&log);
    let dsn_deliveries: Vec<_> = lines
        .iter()
        .filter(|l| l["type"] == "Delivery" && l["campaign"] == "dsn")
        .collect();
    assert_eq!(dsn_deliveries.len(), 2);
    for d in &dsn_deliveries {
        assert_eq!(d["rcpt"], "bounces@shop7.tail.test");
        assert_eq!(d["sender"], "<>");
    }
    let mut reports: Vec<String> = std::fs::read_dir(&keep)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .filter(|m| m.contains("multipart/report"))
        .collect();
    reports.sort();
    assert_eq!(reports.len(), 2);
    let all = reports.join("\n");
    for rcpt in ["permfail1@gmail.com", "permfail2@yahoo.com"] {
        assert!(
            all.contains(&format!("Final-Recipient: rfc822; {rcpt}")),
            "{all}"
        );
    }
    assert!(
        !all.contains("permfail3@gmail.com"),
        "no DSN for the campaign without dsn"
    );
    let one = &reports[0];
    for part in [
        "Content-Type: multipart/report; report-type=delivery-status; boundary=\"volley-dsn\"",
        "Content-Type: message/delivery-status",
        "Reporting-MTA: dns; test.volley.test",
        "Action: failed",
        "Status: 5.",
        "Diagnostic-Code: smtp; 5",
        "Auto-Submitted: auto-replied",
        "X-Volley-Campaign: with-dsn",
    ] {
        assert!(one.contains(part), "{part:?} missing in\n{one}");
    }
    let _ = std::fs::remove_dir_all(&keep);
}
