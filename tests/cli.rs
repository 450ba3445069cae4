//! The command line: on bad input every problem named with file:line, a non-zero
//! exit, and nothing queued; a send stopped early says what is left and resumes.

mod common;

use common::daemon::volley;

use std::process::Command;

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
    assert_eq!(acked_instances(&spool), 0);
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

/// A campaign directory with its own template and recipients.csv (header line first).
fn campaign_with(
    name: &str,
    extra_settings: &str,
    template: &str,
    csv: &str,
) -> std::path::PathBuf {
    let d = tmp(name);
    let c = common::campaign(&d, name, extra_settings, &[]);
    std::fs::write(c.join("message.eml"), template).unwrap();
    std::fs::write(c.join("recipients.csv"), csv).unwrap();
    c
}

/// Campaign instances with their `queued` marker in `spool`: 0 when there is no
/// `campaigns` directory (nothing was ever queued); any other read error fails the
/// test rather than reading as "nothing queued".
fn acked_instances(spool: &std::path::Path) -> usize {
    match std::fs::read_dir(spool.join("campaigns")) {
        Ok(it) => it
            .map(|e| e.unwrap())
            .filter(|e| e.path().join("queued").exists())
            .count(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => panic!("{}: {e}", spool.join("campaigns").display()),
    }
}

const RESET_TEMPLATE: &str =
    "From: News <news@news.test>\nTo: {{email}}\nSubject: Reset\n\nHi {{name}},\nReset it here: {{link}}\n";

#[test]
fn a_merged_line_over_998_octets_is_refused_by_check_and_send() {
    let link = format!("https://news.test/r/{}", "a".repeat(1200 - 20));
    let c = campaign_with(
        "longline",
        "",
        RESET_TEMPLATE,
        &format!("email,name,link\nok@a.test,Ann,https://news.test/r/1\nlong@a.test,Bob,{link}\n"),
    );
    let (code, _, err) = volley(&["check", c.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("recipients.csv:3: message.eml:6 would be 1215 octets with this row's link (1200 octets), over the 998 RFC 5322 allows per line"),
        "{err}"
    );
    assert!(err.contains("1 bad row(s) of 2"), "{err}");
    let spool = c.join("spool");
    let (code, _, err) = volley(&[
        "send",
        c.to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
        "--quiet",
        "--ehlo",
        "mta.news.test",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("recipients.csv:3: message.eml:6 would be 1215 octets"),
        "{err}"
    );
    assert!(err.contains("nothing queued"), "{err}");
    assert_eq!(acked_instances(&spool), 0);
}

#[test]
fn lines_over_900_octets_are_a_warning_naming_the_line() {
    let link = format!("https://news.test/r/{}", "a".repeat(900 - 20));
    let template = format!(
        "From: News <news@news.test>\nTo: {{{{email}}}}\nSubject: Reset\n\nHi {{{{name}}}},\nReset it here: {{{{link}}}}\n{}\n",
        "b".repeat(950)
    );
    let c = campaign_with(
        "warnline",
        "",
        &template,
        &format!("email,name,link\nok@a.test,Ann,https://news.test/r/1\nlong@a.test,Bob,{link}\nlong2@a.test,Cy,{link}x\n"),
    );
    let (code, out, err) = volley(&["check", c.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok, 3 recipients"), "{out}");
    assert!(
        err.contains("message.eml:7: warning: 950 octets, over 900"),
        "{err}"
    );
    assert!(
        err.contains("message.eml:6: warning: 2 row(s) make this line 915 to 916 octets (first recipients.csv:3), over 900"),
        "{err}"
    );
}

#[test]
fn merge_values_cannot_smuggle_bytes_or_addresses_into_the_message() {
    let c = campaign_with(
        "smuggle",
        "",
        "From: News <news@news.test>\nTo: {{name}} <{{email}}>\nSubject: Hello {{name}}\n\n{{line}}\nbye\n",
        "email,name,line\n\
         a@a.test,Ann,.\n\
         b@a.test,\"Smith, John\",x\n\
         c@a.test,Esc\x1bape,x\n\
         d@a.test,Dee,\"a\0b\"\n\
         e@a.test,\"Ann \"\"Q\"\" Lee\",x\n\
         f@a.test,Ann <evil@x.test>,x\n\
         g@a.test,John Q. Public,x\n",
    );
    let (code, _, err) = volley(&["check", c.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("recipients.csv:3: message.eml:2: the To field with this row's values is not a valid address list"),
        "{err}"
    );
    assert!(
        err.contains("recipients.csv:4: field name has the control character 0x1b, which a header field (message.eml:2) cannot carry"),
        "{err}"
    );
    assert!(
        err.contains("recipients.csv:5: field line contains a NUL byte"),
        "{err}"
    );
    assert!(
        err.contains("recipients.csv:7: message.eml:2: the To field with this row's values is not a valid address list"),
        "{err}"
    );
    // A lone "." (dot-stuffed on the wire), a quoted display name and an obsolete but
    // common "Q." are fine.
    for line in [2, 6, 8] {
        assert!(!err.contains(&format!("recipients.csv:{line}:")), "{err}");
    }
    assert!(err.contains("4 bad row(s) of 7"), "{err}");
}

#[test]
fn a_template_cannot_let_a_value_start_a_header_field() {
    let c = campaign_with(
        "inject",
        "",
        "From: a@news.test\n{{extra}}\nX-{{email}}: y\nSubject hello\nSubject: a\rb\n\nbody\0\n",
        "email,extra\na@a.test,Bcc: evil@x.test\n",
    );
    let (code, _, err) = volley(&["check", c.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    for want in [
        "message.eml:2: a merge field before the colon of a header line",
        "message.eml:3: a merge field before the colon of a header line",
        "message.eml:4: not a header field (Name: value) nor a continuation",
        "message.eml:5: a bare CR",
        "message.eml:7: a NUL byte",
    ] {
        assert!(err.contains(want), "{want} not in {err}");
    }
}

#[test]
fn raw_non_ascii_in_a_header_is_a_warning() {
    let c = campaign_with(
        "utf8hdr",
        "",
        "From: News <news@news.test>\nTo: {{name}} <{{email}}>\nSubject: Grüße\n\nHi {{name}}\n",
        "email,name\na@a.test,Ann\nb@a.test,Zoë\nc@a.test,Zoë\n",
    );
    let (code, out, err) = volley(&["check", c.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok, 3 recipients"), "{out}");
    assert!(
        err.contains("message.eml:3: warning: raw non-ASCII in the Subject header"),
        "{err}"
    );
    assert!(
        err.contains("message.eml:2: warning: 2 row(s) put raw non-ASCII in the To header (first recipients.csv:3)"),
        "{err}"
    );
}

#[test]
fn check_accepts_every_rfc5321_address_form() {
    let good = [
        "ann+tag@a.test".to_string(),
        "o'brien@a.test".into(),
        "a/b=c!d#e$f%g&h*i?j^k_l`m{n|o}p~q@a.test".into(),
        "ANN@A.TEST".into(),
        "trailing@a.test.".into(),
        "x@xn--bcher-kva.example".into(),
        format!("x@{}.test", "a".repeat(63)),
        format!("{}@a.test", "a".repeat(64)),
        // 64 + 1 + 189 = 254 octets, the most a path of 256 with its <> can hold.
        format!(
            "{}@{}.{}.{}.test",
            "a".repeat(64),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(56)
        ),
        "\"\"\"odd user\"\"@a.test\"".into(),
        "\"\"\"a@b\"\"@a.test\"".into(),
        "\"\"\"a\\\"\"b\"\"@a.test\"".into(),
    ];
    let rows: Vec<String> = good.iter().map(|a| format!("{a},Ann")).collect();
    let d = tmp("goodaddr");
    let c = common::campaign(&d, "goodaddr", "", &rows);
    let (code, out, err) = volley(&["check", c.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("ok, {} recipients", good.len())),
        "{out}"
    );
}

#[test]
fn check_refuses_malformed_addresses_with_the_reason() {
    let bad = [
        ("a..b@a.test", "a leading, trailing or doubled dot"),
        (".a@a.test", "a leading, trailing or doubled dot"),
        ("a.@a.test", "a leading, trailing or doubled dot"),
        (
            "a(b)@a.test",
            "'(' is allowed in a local part only inside quotes",
        ),
        ("a@x-.test", "label \"x-\" starts or ends with a hyphen"),
        ("a@b..test", "an empty label"),
        ("a@localhost", "no dot"),
        ("a@192.0.2.1", "looks like an IP address"),
        (
            "user@[192.0.2.1]",
            "volley does not deliver to address literals",
        ),
        ("\"\"\"unclosed@a.test\"", "unclosed quoted string"),
        ("\"\"\"a\"\"b@a.test\"", "after the closing quote"),
    ];
    let long_local = format!("{}@a.test", "a".repeat(65));
    let long_label = format!("x@{}.test", "a".repeat(64));
    let long_addr = format!(
        "{}@{}.{}.{}.test",
        "a".repeat(64),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(57)
    );
    let mut rows: Vec<String> = bad.iter().map(|(a, _)| format!("{a},Ann")).collect();
    for a in [&long_local, &long_label, &long_addr] {
        rows.push(format!("{a},Ann"));
    }
    let d = tmp("badaddr");
    let c = common::campaign(&d, "badaddr", "", &rows);
    let (code, _, err) = volley(&["check", c.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    for (i, (_, why)) in bad.iter().enumerate() {
        let line = format!("recipients.csv:{}: invalid address", i + 2);
        let hit = err.lines().find(|l| l.contains(&line));
        assert!(
            hit.is_some_and(|l| l.contains(why)),
            "{line}: {why} not in {err}"
        );
    }
    for (n, why) in [
        (bad.len() + 2, "local part of 65 octets, over the 64"),
        (bad.len() + 3, "label of 64 octets, over the 63"),
        (bad.len() + 4, "255 octets, over the 254"),
    ] {
        let line = format!("recipients.csv:{n}: invalid address");
        let hit = err.lines().find(|l| l.contains(&line));
        assert!(
            hit.is_some_and(|l| l.contains(why)),
            "{line}: {why} not in {err}"
        );
    }
    assert!(
        err.contains(&format!("{} bad row(s)", bad.len() + 3)),
        "{err}"
    );
}

#[test]
fn quoted_local_parts_are_sent_quoted() {
    let env = common::env("cli-quoted", "");
    let c = common::campaign(
        &env.dir,
        "quoted",
        "",
        &[
            "\"\"\"odd user\"\"@gmail.com\",Odd".into(),
            "\"\"\"ann\"\"@gmail.com\",Ann".into(),
        ],
    );
    let spool = env.dir.join("spool");
    let log = env.dir.join("log.jsonl");
    let (code, out, err) = volley(&[
        "send",
        c.to_str().unwrap(),
        "--quiet",
        "--spool",
        spool.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--dns",
        &env.dns.addr.to_string(),
        "--smtp-port",
        &env.sink.port().to_string(),
        "--ehlo",
        "mta.news.test",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let lines = common::log_lines(&log);
    let by = common::terminal_by_rcpt(&lines);
    // Written as given, quotes and all; a quoted string that needs no quotes loses them
    // (RFC 5321 §4.1.2: a sender should not quote what a dot-string can say).
    assert_eq!(
        by["\"odd user\"@gmail.com"][0]["type"], "Delivery",
        "{lines:?}"
    );
    assert_eq!(by["ann@gmail.com"][0]["type"], "Delivery", "{lines:?}");
    assert_eq!(env.sink.summary().counts.rcpts_accepted, 2);
}

#[test]
fn skip_bad_rows_queues_the_good_ones_and_logs_each_skipped_row() {
    let env = common::env("cli-skip", "");
    let c = common::campaign(
        &env.dir,
        "skip",
        "",
        &[
            "u1@gmail.com,Ann".into(),
            "a..b@gmail.com,Bob".into(),
            "u2@gmail.com,\"Smith, John\"".into(),
        ],
    );
    let dir = c.to_str().unwrap();
    let (code, out, err) = volley(&["check", dir, "--skip-bad-rows"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("recipients.csv:3: invalid address \"a..b@gmail.com\""),
        "{err}"
    );
    assert!(out.contains("campaign skip: ok, 1 recipients"), "{out}");
    assert!(
        out.contains("campaign skip: 2 bad row(s) would be skipped"),
        "{out}"
    );

    let spool = env.dir.join("spool");
    let log = env.dir.join("log.jsonl");
    let (code, out, err) = volley(&[
        "send",
        dir,
        "--skip-bad-rows",
        "--quiet",
        "--spool",
        spool.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--dns",
        &env.dns.addr.to_string(),
        "--smtp-port",
        &env.sink.port().to_string(),
        "--ehlo",
        "mta.news.test",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("queued 1 recipients of campaign skip"),
        "{out}"
    );
    assert!(out.contains("skipped      2 (bad rows"), "{out}");
    let lines = common::log_lines(&log);
    let by = common::terminal_by_rcpt(&lines);
    assert_eq!(by["u1@gmail.com"][0]["type"], "Delivery");
    let b = &by["a..b@gmail.com"][0];
    assert_eq!(
        (
            b["type"].as_str(),
            b["stage"].as_str(),
            b["class"].as_str(),
            b["enhanced"].as_str()
        ),
        (
            Some("Bounce"),
            Some("local"),
            Some("invalid_recipient"),
            Some("5.1.3")
        ),
        "{b}"
    );
    assert!(
        b["reply"]
            .as_str()
            .unwrap()
            .starts_with("recipients.csv:3: invalid address"),
        "{b}"
    );
    let b = &by["u2@gmail.com"][0];
    assert_eq!(
        (
            b["type"].as_str(),
            b["stage"].as_str(),
            b["class"].as_str(),
            b["enhanced"].as_str()
        ),
        (
            Some("Bounce"),
            Some("local"),
            Some("content"),
            Some("5.6.0")
        ),
        "{b}"
    );
    assert!(
        b["reply"]
            .as_str()
            .unwrap()
            .starts_with("recipients.csv:4: message.eml:2"),
        "{b}"
    );
    let (code, out, _) = volley(&["report", "skip", "--log", log.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            r["totals"]["delivered"].as_u64(),
            r["totals"]["bounced"].as_u64()
        ),
        (Some(1), Some(2)),
        "{r}"
    );
}

#[test]
fn send_refuses_an_ehlo_name_that_is_not_an_fqdn() {
    let d = tmp("ehlo");
    let c = common::campaign(&d, "ehlo", "", &["a@b.test,A".into()]);
    let spool = d.join("spool");
    let send = |ehlo: &str, extra: &[&str]| {
        let mut args = vec![
            "send",
            c.to_str().unwrap(),
            "--spool",
            spool.to_str().unwrap(),
            "--quiet",
            "--max-wait",
            "1s",
            "--dns",
            "127.0.0.1:9",
            "--ehlo",
            ehlo,
        ];
        args.extend_from_slice(extra);
        volley(&args)
    };
    let (code, _, err) = send("mta1", &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--ehlo \"mta1\": not a fully qualified domain name (no dot)"),
        "{err}"
    );
    assert!(
        err.contains("e.g. mta1.example.net, or an address literal like [192.0.2.1]"),
        "{err}"
    );
    let (code, _, err) = send("192.0.2.1", &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("write it as the address literal [192.0.2.1]"),
        "{err}"
    );
    assert_eq!(acked_instances(&spool), 0);

    // A pool's per-source EHLO names are held to the same rule.
    let rules = d.join("shaping.toml");
    std::fs::write(
        &rules,
        "[pool.p]\nsources = [{ ip = \"127.0.0.1\", ehlo = \"mta7\" }]\n",
    )
    .unwrap();
    let (code, _, err) = send("mta.news.test", &["--shaping", rules.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("shaping.toml:2: ehlo: \"mta7\": not a fully qualified domain name"),
        "the file and line of the name: {err}"
    );
    assert_eq!(acked_instances(&spool), 0);
    // `shaping check` says the same.
    let (code, _, err) = volley(&["shaping", "check", rules.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("shaping.toml:2: ehlo: \"mta7\""), "{err}");

    // check takes --ehlo too, and an address literal is fine.
    let (code, _, err) = volley(&["check", c.to_str().unwrap(), "--ehlo", "mta1"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--ehlo \"mta1\": not a fully qualified domain name"),
        "{err}"
    );
    let (code, out, err) = volley(&["check", c.to_str().unwrap(), "--ehlo", "[192.0.2.1]"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn check_says_when_the_default_ehlo_name_is_not_the_host_name() {
    let d = tmp("ehlo-default");
    let c = common::campaign(&d, "ehlodef", "", &["a@b.test,A".into()]);
    let (code, out, err) = volley(&["check", c.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim();
    if host.contains('.') {
        assert!(!err.contains("EHLO"), "{err}");
    } else {
        assert!(
            err.contains(&format!("warning: the host name {host:?} has no dot, so send would say EHLO localhost.localdomain")),
            "{err}"
        );
    }
}

/// `volley report ID --log FILE` as an operator reads it (README, Commands: "a
/// campaign's outcomes by class and by domain, from the log"), after a send with two
/// deliveries, a bounce and an expiry: the totals line, the by-class and the
/// by-domain tables say what the accounting log says, and `--domains 1` lists the
/// busiest domain and says how many more there are.
#[test]
fn report_prints_totals_classes_and_domains_as_the_log_has_them() {
    let env = common::env("cli-report", "");
    let rows: Vec<String> = [
        "u1@gmail.com",
        "u2@yahoo.com",
        "permfail.1@gmail.com",
        "tempfail.1@gmail.com",
    ]
    .iter()
    .map(|a| format!("{a},Ann"))
    .collect();
    let c = common::campaign(&env.dir, "outcomes", "expire_after = \"3s\"", &rows);
    let spool = env.dir.join("spool");
    let log = env.dir.join("log.jsonl");
    let mut args = vec![
        "send".to_string(),
        c.display().to_string(),
        "--quiet".into(),
        "--log".into(),
        log.display().to_string(),
        "--ehlo".into(),
        "mta.news.test".into(),
        "--retry-schedule".into(),
        "700ms".into(),
    ];
    args.extend(common::daemon::base_args(&env, &spool));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = volley(&args);
    assert_eq!(code, 0, "{out}{err}");

    // What the log says, read here without the report's code.
    let lines = common::log_lines(&log);
    let of = |kind: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["type"] == kind).collect()
    };
    let (bounces, expiries, deferrals) = (of("Bounce"), of("Expiration"), of("TransientFailure"));
    assert_eq!(
        (of("Delivery").len(), bounces.len(), expiries.len()),
        (2, 1, 1),
        "{lines:?}"
    );
    let n = deferrals.len();
    assert!(n >= 2, "retried before it expired: {lines:?}");
    let bounce_class = bounces[0]["class"].as_str().unwrap();
    // The expiry is filed by the receiver's last reply, the one each deferral had.
    let expiry_class = expiries[0]["class"].as_str().unwrap();
    assert!(
        deferrals.iter().all(|d| d["class"] == expiry_class),
        "{lines:?}"
    );
    assert_ne!(bounce_class, expiry_class);

    let report = |extra: &[&str]| -> Vec<Vec<String>> {
        let mut a = vec!["report", "outcomes", "--log", log.to_str().unwrap()];
        a.extend_from_slice(extra);
        let (code, out, err) = volley(&a);
        assert_eq!(code, 0, "{out}{err}");
        // Compared word by word: the columns' widths are for the eye.
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    };
    let words = |s: &str| -> Vec<String> { s.split_whitespace().map(str::to_string).collect() };
    let mut classes = [
        format!("{bounce_class} 1 0 0"),
        format!("{expiry_class} 0 1 {n}"),
    ];
    classes.sort();
    let want: Vec<Vec<String>> = [
        "campaign outcomes".to_string(),
        format!("final 4: delivered 2, bounced 1, expired 1; still being retried 0; deferrals {n}"),
        "by class bounced expired deferrals".into(),
        classes[0].clone(),
        classes[1].clone(),
        "by domain (top 20) delivered bounced expired deferrals".into(),
        format!("gmail.com 1 1 1 {n}"),
        "yahoo.com 1 0 0 0".into(),
    ]
    .iter()
    .map(|l| words(l))
    .collect();
    assert_eq!(report(&[]), want);

    let top1 = report(&["--domains", "1"]);
    assert_eq!(
        top1[5..],
        [
            words("by domain (top 1) delivered bounced expired deferrals"),
            words(&format!("gmail.com 1 1 1 {n}")),
            words("... and 1 more domains (--json for all)"),
        ]
    );
}
