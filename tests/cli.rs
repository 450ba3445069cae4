//! The command line: on bad input every problem named with file:line, a non-zero
//! exit, and nothing queued; a send stopped early says what is left and resumes.

mod common;

use std::process::Command;

fn volley(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("volley-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn check_lists_every_problem_with_file_and_line() {
    let d = tmp("bad");
    let rows: Vec<String> = vec![
        "ok@a.test,Ann".into(),
        "not-an-address,Bob".into(),
        "x@b.test".into(),
        "y@c.test,\"Multi\nLine\"".into(),
    ];
    let c = common::campaign(&d, "bad", "", &rows);
    std::fs::write(
        c.join("message.eml"),
        "From: a@news.test\nSubject: {{nope}}\n\nHi {{name}}\n",
    )
    .unwrap();
    let (code, _, err) = volley(&["check", c.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "message.eml:2: unknown merge field {{nope}}; recipients.csv has columns: email, name"
        ),
        "{err}"
    );
    std::fs::write(
        c.join("message.eml"),
        "From: a@news.test\nSubject: hi\n\nHi {{name}}\n",
    )
    .unwrap();
    let (code, _, err) = volley(&["check", c.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("recipients.csv:3: invalid address \"not-an-address\": missing @"),
        "{err}"
    );
    assert!(
        err.contains("recipients.csv:4: 1 fields, the header has 2"),
        "{err}"
    );
    assert!(
        err.contains("recipients.csv:5: field name contains a line break"),
        "{err}"
    );
    assert!(err.contains("3 bad row(s) of 4"), "{err}");

    // send refuses the same campaign and queues nothing.
    let spool = d.join("spool");
    let (code, _, err) = volley(&[
        "send",
        c.to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nothing queued"), "{err}");
    let acked = std::fs::read_dir(spool.join("campaigns"))
        .map(|it| {
            it.flatten()
                .filter(|e| e.path().join("queued").exists())
                .count()
        })
        .unwrap_or(0);
    assert_eq!(acked, 0);
}

#[test]
fn missing_files_and_bad_settings() {
    let d = tmp("missing");
    let (code, _, err) = volley(&["check", d.to_str().unwrap()]);
    assert_eq!(code, 1);
    for f in [
        "campaign.toml: cannot read",
        "recipients.csv: cannot open",
        "message.eml: cannot read",
    ] {
        assert!(err.contains(f), "{f} not in {err}");
    }
    let c = common::campaign(
        &d,
        "s",
        "expire_after = \"soon\"\nmax_rcpt_per_msg = 0",
        &["a@b.test,A".into()],
    );
    let (code, _, err) = volley(&["check", c.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("campaign.toml:4: expire_after \"soon\""),
        "{err}"
    );
    assert!(
        err.contains("campaign.toml:5: max_rcpt_per_msg must be 1..=1000"),
        "{err}"
    );
    std::fs::write(
        c.join("campaign.toml"),
        "id = \"x\"\nsender = \"b@news.test\"\nfrom_domain = \"news.test\"\ncolour = \"red\"\n",
    )
    .unwrap();
    let (_, _, err) = volley(&["check", c.to_str().unwrap()]);
    assert!(
        err.contains("campaign.toml:4: unknown field `colour`"),
        "{err}"
    );
}

#[test]
fn an_unreadable_spool_is_a_clear_error() {
    let d = tmp("spool");
    let c = common::campaign(&d, "ok", "", &["a@b.test,A".into()]);
    let spool = d.join("spool");
    std::fs::create_dir_all(spool.join("shard-0")).unwrap();
    std::fs::write(
        spool.join("shard-0").join("seg-00000001.vspool"),
        b"garbage, not a segment",
    )
    .unwrap();
    let (code, _, err) = volley(&[
        "send",
        c.to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
        "--quiet",
        "--shards",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("not a volley spool segment"), "{err}");
    assert!(err.contains("nothing queued"), "{err}");
}

#[test]
fn classify_reads_replies_and_writes_json_lines() {
    use std::io::Write;
    use std::process::Stdio;
    let d = tmp("classify");
    let rules = d.join("mine.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"acme\"\nmatch = 'acme overloaded'\nclass = \"throttled\"\nretry = true\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["classify", "--bounce-rules", rules.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred\n554 5.7.1 acme overloaded\n550 5.1.1 no such user\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(
        (lines[0]["code"].as_u64(), lines[0]["enhanced"].as_str()),
        (Some(421), Some("4.7.0"))
    );
    assert_eq!(
        (lines[0]["class"].as_str(), lines[0]["retry"].as_bool()),
        (Some("throttled"), Some(true))
    );
    assert_eq!(
        (
            lines[1]["class"].as_str(),
            lines[1]["retry"].as_bool(),
            lines[1]["rule"].as_str()
        ),
        (Some("throttled"), Some(true), Some("acme"))
    );
    assert_eq!(
        (lines[2]["class"].as_str(), lines[2]["retry"].as_bool()),
        (Some("invalid_recipient"), Some(false))
    );

    std::fs::write(
        &rules,
        "[[rule]]\nname = \"broken\"\nmatch = '(['\nclass = \"policy\"\n",
    )
    .unwrap();
    let (code, _, err) = volley(&["classify", "--bounce-rules", rules.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("rule 1 (\"broken\"): bad regex"), "{err}");
}

#[test]
fn a_send_stopped_early_exits_75_and_sending_again_goes_on() {
    let env = common::env("cli-resume", "");
    let c = common::campaign(
        &env.dir,
        "resume",
        "expire_after = \"4s\"",
        &["tempfail.1@gmail.com,Ann".into(), "u1@gmail.com,Bob".into()],
    );
    let spool = env.dir.join("spool");
    let (dns, port) = (env.dns.addr.to_string(), env.sink.port().to_string());
    let send = || {
        volley(&[
            "send",
            c.to_str().unwrap(),
            "--quiet",
            "--spool",
            spool.to_str().unwrap(),
            "--dns",
            &dns,
            "--smtp-port",
            &port,
            "--retry-schedule",
            "30s",
            "--max-wait",
            "2s",
        ])
    };
    let (code, out, err) = send();
    assert_eq!(code, 75, "{out}{err}");
    assert!(
        out.contains("still queued 1 (kept in the spool with their retry times"),
        "{out}"
    );
    // The deferral waits for its retry time, which the 4 s maximum age cuts short.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (code, out, err) = send();
    assert!(err.contains("resuming what is left"), "{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("expired      1"), "{out}");
    assert_eq!(env.sink.summary().counts.rcpt_tempfail, 1);
}
