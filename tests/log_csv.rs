//! `volley log csv`: a real log, written by a send against the bundled sink (a
//! delivery and a bounce), read back as PowerMTA CSV through the binary and parsed
//! with the csv crate.

mod common;

use common::daemon::volley;

use std::collections::HashMap;

#[test]
fn a_delivery_and_a_bounce_come_out_as_powermta_rows() {
    let env = common::env("logcsv", "");
    let c = common::campaign(
        &env.dir,
        "csv",
        "",
        &["u1@gmail.com,Ann".into(), "permfail.1@gmail.com,Bob".into()],
    );
    let cfg = env.config();
    let log = cfg.log_path.clone();
    let r = env.send(&c, cfg);
    assert_eq!((r.delivered, r.bounced), (1, 1));
    let (code, out, err) = volley(&["log", "csv", "--log", log.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\r\n"), "RFC 4180 line ends");
    let mut rd = csv::Reader::from_reader(out.as_bytes());
    let header: Vec<String> = rd.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header, volley::observe::csv::field_names());
    let rows: Vec<HashMap<String, String>> = rd.deserialize().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2, "{out}");
    let by = |rcpt: &str| rows.iter().find(|r| r["rcpt"] == rcpt).unwrap();
    let d = by("u1@gmail.com");
    assert_eq!(d["type"], "d");
    assert_eq!(d["dsnAction"], "relayed");
    assert!(d["dsnStatus"].starts_with("2."), "{d:?}");
    assert!(d["dsnDiag"].starts_with("smtp;250 "), "{d:?}");
    assert_eq!(d["orig"], "bounces@news.test");
    assert_eq!(
        (d["jobId"].as_str(), d["queue"].as_str()),
        ("csv", "gmail.com")
    );
    assert_eq!(d["dlvType"], "smtp");
    // The sink's addresses are 127.0.0.x.
    let ip = &d["dlvDestinationIp"];
    assert!(ip.starts_with("127.0.0.") && !ip.contains(':'), "{d:?}");
    assert!(d["dsnMta"].ends_with(&format!(".test ({ip})")), "{d:?}");
    assert_eq!(d["bounceCat"], "");
    // 2026-11-30 22:10:07+0000
    let t = &d["timeLogged"];
    assert!(
        t.len() == 24 && &t[10..11] == " " && t.ends_with("+0000"),
        "{t}"
    );
    assert!(d["timeQueued"] <= d["timeLogged"]);
    let b = by("permfail.1@gmail.com");
    assert_eq!(b["type"], "b");
    assert_eq!(b["dsnAction"], "failed");
    assert_eq!(b["dsnStatus"], "5.1.1 (bad destination mailbox address)");
    assert_eq!(b["dsnDiag"], "smtp;550 5.1.1 User unknown");
    assert_eq!(b["bounceCat"], "bad-mailbox");
    for empty in [
        "orcpt",
        "srcType",
        "dlvSourceIp",
        "dlvSize",
        "vmta",
        "envId",
    ] {
        assert_eq!(b[empty], "", "{empty} has no counterpart");
    }

    // A window that ends before the send: the header alone. To a file: the same rows.
    let (code, out, _) = volley(&[
        "log",
        "csv",
        "--log",
        log.to_str().unwrap(),
        "--until",
        "2000-01-01",
    ]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "{out}");
    let file = env.dir.join("acct.csv");
    let (code, _, err) = volley(&[
        "log",
        "csv",
        "--log",
        log.to_str().unwrap(),
        "--since",
        "2000-01-01",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("wrote 2 records"), "{err}");
    assert_eq!(csv::Reader::from_path(&file).unwrap().records().count(), 2);

    let (code, _, err) = volley(&[
        "log",
        "csv",
        "--log",
        log.to_str().unwrap(),
        "--since",
        "soon",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--since \"soon\" is not a time"), "{err}");
    let (code, _, err) = volley(&[
        "log",
        "csv",
        "--log",
        env.dir.join("none").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no such file"), "{err}");
}
