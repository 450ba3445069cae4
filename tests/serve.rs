//! `volley serve` end to end, through the binary: mail taken in over SMTP
//! submission (our own client and Debian's swaks), the HTTP API, the pickup
//! directory and `volley send` handing over, while the daemon delivers to the
//! bundled sink; relay protection, AUTH failures, SIGKILL after a 250, SIGTERM,
//! SIGHUP. Everything on loopback.

mod common;

use common::daemon::{add_token, base_args, free_port, http, write_config, Client, Daemon, VOLLEY};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn add_user(users: &Path, name: &str, password: &str) {
    let mut c = Command::new(VOLLEY)
        .args(["user", "add", name, "--users"])
        .arg(users)
        .arg("--cram-md5")
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(c.stdin.take().unwrap(), "{password}").unwrap();
    assert!(c.wait().unwrap().success());
}

#[test]
fn submitted_mail_is_delivered_with_a_received_field_and_without_its_campaign_header() {
    let (env, keep) = common::env_keeping("serve-submit");
    let spool = env.dir.join("spool");
    let port = free_port();
    let mut args = base_args(&env, &spool);
    args.extend(["--submission".into(), format!("127.0.0.1:{port}")]);
    let d = Daemon::start(&env.dir, &args);
    let (mut c, greeting) = Client::connect(format!("127.0.0.1:{port}").parse().unwrap());
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(c.cmd("EHLO app.test").contains("STARTTLS"));
    // Loopback is a relay network: no AUTH needed. Pipelined, as clients do.
    c.send("MAIL FROM:<app@news.test>\r\nRCPT TO:<ann@gmail.com>\r\nDATA\r\n");
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("354"));
    c.send("From: app@news.test\r\nTo: ann@gmail.com\r\nSubject: hi\r\nX-Campaign-ID: welcome\r\n\r\nhello\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0"), "{r}");
    c.cmd("QUIT");
    let t = d.wait_terminal(&spool.join("accounting.jsonl"), "ann@gmail.com");
    assert_eq!(t["type"], "Delivery");
    assert_eq!(
        t["campaign"], "welcome",
        "the campaign header names the campaign"
    );
    assert_eq!(t["sender"], "app@news.test");
    let kept: Vec<String> = std::fs::read_dir(&keep)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert_eq!(kept.len(), 1);
    let m = &kept[0];
    assert!(m.contains("Received: from app.test"), "{m}");
    assert!(m.contains("[127.0.0.1]"), "{m}");
    assert!(
        !m.contains("X-Campaign-ID"),
        "the consumed header is removed: {m}"
    );
    assert!(m.contains("Message-ID: <"), "a Message-ID is added: {m}");
}

#[test]
fn the_listener_is_no_open_relay() {
    let env = common::env("serve-relay", "");
    let spool = env.dir.join("spool");
    let users = env.dir.join("users");
    add_user(&users, "alice", "s3cret");
    let (p_required, p_foreign) = (free_port(), free_port());
    // One listener needs AUTH of everyone; on the other, loopback is not a relay
    // network and AUTH is not offered in clear: nobody here may send.
    let cfg = format!(
        "users = \"{}\"\n[[submission]]\nlisten = \"127.0.0.1:{p_required}\"\nauth = \"required\"\n\
         [[submission]]\nlisten = \"127.0.0.1:{p_foreign}\"\ntls = \"none\"\nauth = \"optional\"\nrelay_networks = [\"10.0.0.0/8\"]\n",
        users.display()
    );
    let cfg = write_config(&env.dir, &cfg);
    let mut args = base_args(&env, &spool);
    args.extend(["--config".into(), cfg.display().to_string()]);
    let _d = Daemon::start(&env.dir, &args);

    let (mut c, _) = Client::connect(format!("127.0.0.1:{p_required}").parse().unwrap());
    c.cmd("EHLO app.test");
    c.send("MAIL FROM:<app@news.test>\r\nRCPT TO:<victim1@gmail.com>\r\nDATA\r\n");
    let mail = c.reply();
    assert!(mail.starts_with("530 5.7.0"), "{mail}");
    let rcpt = c.reply();
    assert!(rcpt.starts_with('5'), "{rcpt}");
    let data = c.reply();
    // Whatever DATA gets, the content that follows is never a message.
    if data.starts_with("354") {
        c.send("Subject: spam\r\n\r\nspam\r\n.\r\n");
        assert!(c.reply().starts_with('5'));
    }
    assert!(c.cmd("QUIT").starts_with("221"));

    let (mut c, _) = Client::connect(format!("127.0.0.1:{p_foreign}").parse().unwrap());
    let ehlo = c.cmd("EHLO app.test");
    assert!(!ehlo.contains("AUTH"), "no AUTH in clear: {ehlo}");
    assert!(c.cmd("MAIL FROM:<app@news.test>").starts_with("250"));
    let rcpt = c.cmd("RCPT TO:<victim2@gmail.com>");
    assert!(rcpt.starts_with("554 5.7.1"), "{rcpt}");
    c.send("BDAT 6 LAST\r\nspam\r\n");
    assert!(c.reply().starts_with('5'));
    assert!(c.cmd("QUIT").starts_with("221"));

    // Nothing of either was queued: a second later the log has no record of them.
    std::thread::sleep(Duration::from_millis(500));
    let log = std::fs::read_to_string(spool.join("accounting.jsonl")).unwrap_or_default();
    assert!(!log.contains("victim"), "{log}");
    assert_eq!(env.sink.rcpts_terminal(), 0);
}

#[test]
fn swaks_authenticates_with_each_mechanism_over_starttls_and_implicit_tls() {
    if Command::new("swaks").arg("--version").output().is_err() {
        common::skipped("swaks is not installed (apt-get install swaks); .ci/run installs it");
        return;
    }
    let env = common::env("serve-swaks", "");
    let spool = env.dir.join("spool");
    let users = env.dir.join("users");
    add_user(&users, "alice", "s3cret");
    let (p_starttls, p_implicit) = (free_port(), free_port());
    let cfg = format!(
        "users = \"{}\"\n[[submission]]\nlisten = \"127.0.0.1:{p_starttls}\"\nauth = \"required\"\n\
         [[submission]]\nlisten = \"127.0.0.1:{p_implicit}\"\ntls = \"implicit\"\nauth = \"required\"\n",
        users.display()
    );
    let cfg = write_config(&env.dir, &cfg);
    let mut args = base_args(&env, &spool);
    args.extend(["--config".into(), cfg.display().to_string()]);
    let d = Daemon::start(&env.dir, &args);
    let swaks = |port: u16, tls: &str, mech: &str, password: &str, to: &str| {
        let out = Command::new("swaks")
            .args(["--server", &format!("127.0.0.1:{port}"), tls])
            .args([
                "--auth",
                mech,
                "--auth-user",
                "alice",
                "--auth-password",
                password,
            ])
            .args(["--from", "app@news.test", "--to", to, "--timeout", "20"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut sent = Vec::new();
    for (port, tls) in [(p_starttls, "--tls"), (p_implicit, "--tls-on-connect")] {
        for mech in ["PLAIN", "LOGIN", "CRAM-MD5"] {
            let to = format!("{}-{}@gmail.com", mech.to_lowercase(), &tls[2..]);
            let out = swaks(port, tls, mech, "s3cret", &to);
            assert!(out.contains("235 2.7.0"), "{mech} {tls}:\n{out}");
            assert!(out.contains("250 2.0.0 Ok: queued"), "{mech} {tls}:\n{out}");
            sent.push(to);
        }
    }
    let out = swaks(p_starttls, "--tls", "PLAIN", "wrong", "nobody@gmail.com");
    assert!(out.contains("535 5.7.8"), "{out}");
    for to in &sent {
        assert_eq!(
            d.wait_terminal(&spool.join("accounting.jsonl"), to)["type"],
            "Delivery"
        );
    }
}

#[test]
fn http_injection_queues_a_campaign_and_reports_its_counts() {
    let env = common::env("serve-http", "");
    let spool = env.dir.join("spool");
    let (tokens, token) = add_token(&env.dir);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut args = base_args(&env, &spool);
    args.extend([
        "--http".into(),
        addr.to_string(),
        "--tokens".into(),
        tokens.display().to_string(),
    ]);
    let _d = Daemon::start(&env.dir, &args);

    let recipients: Vec<String> = (0..50)
        .map(|i| format!("{{\"email\":\"user{i}@gmail.com\",\"name\":\"U{i}\"}}"))
        .collect();
    let body = format!(
        "{{\"id\":\"spring\",\"sender\":\"bounces@news.test\",\"from_domain\":\"news.test\",\"dkim\":false,\
          \"template\":\"From: news@news.test\\nTo: {{{{email}}}}\\nSubject: Hi {{{{name}}}}\\n\\nHello\\n\",\
          \"recipients\":[{}]}}",
        recipients.join(",")
    );
    let (status, _, _) = http(addr, "POST", "/api/v1/inject", None, &body);
    assert_eq!(status, 401, "no token, no injection");
    // The token is checked before the body is read: a huge announced body from a
    // client without a token is answered at once.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "POST /api/v1/inject HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer bogus\r\nContent-Length: 200000000\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head[9..12], b"401");
    let (status, _, _) = http(addr, "POST", "/api/v1/inject", Some("vly_wrong"), &body);
    assert_eq!(status, 401);
    let (status, _, resp) = http(addr, "POST", "/api/v1/inject", Some(&token), &body);
    assert_eq!(status, 202, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["queued"], 50);
    assert_eq!(v["campaign"], "spring");
    // The same id again (a client retrying): refused, unless it asks for a new one.
    let (status, _, resp) = http(addr, "POST", "/api/v1/inject", Some(&token), &body);
    assert_eq!(status, 409, "{resp}");

    let bad = r#"{"id":"bad","sender":"bounces@news.test","from_domain":"news.test","dkim":false,"template":"From: news@news.test\nSubject: s\n\nhi\n","recipients":[{"email":"ok@gmail.com"},{"email":"not an address"}]}"#;
    let (status, _, resp) = http(addr, "POST", "/api/v1/inject", Some(&token), bad);
    assert_eq!(status, 400, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    let pointers: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pointer"].as_str().unwrap())
        .collect();
    assert!(
        pointers.iter().any(|p| p.starts_with("/recipients/1")),
        "{resp}"
    );

    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, resp) = http(addr, "GET", "/api/v1/campaigns/spring", Some(&token), "");
        assert_eq!(status, 200, "{resp}");
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
        if v["outcomes"]["delivered"] == 50 {
            assert_eq!(v["queued"], 0);
            break;
        }
        assert!(Instant::now() < until, "not all delivered: {resp}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, _, _) = http(addr, "GET", "/api/v1/campaigns/nosuch", Some(&token), "");
    assert_eq!(status, 404);
    assert!(!common::log_lines(&spool.join("accounting.jsonl"))
        .iter()
        .any(|l| l["campaign"] == "bad"));
}

#[test]
fn pickup_files_are_queued_and_bad_ones_set_aside() {
    let env = common::env("serve-pickup", "");
    let spool = env.dir.join("spool");
    let pickup = env.dir.join("pickup");
    let mut args = base_args(&env, &spool);
    args.extend(["--pickup".into(), pickup.display().to_string()]);
    let d = Daemon::start(&env.dir, &args);
    let good = "X-Sender: <app@news.test>\nX-Receiver: <pia@gmail.com>\nX-Receiver: <pat@yahoo.com>\nFrom: app@news.test\nSubject: picked\n\nbody\n";
    std::fs::write(pickup.join(".good.tmp"), good).unwrap();
    std::fs::rename(pickup.join(".good.tmp"), pickup.join("good.eml")).unwrap();
    std::fs::write(
        pickup.join("bad.eml"),
        "From: app@news.test\n\nno envelope\n",
    )
    .unwrap();
    let log = spool.join("accounting.jsonl");
    assert_eq!(d.wait_terminal(&log, "pia@gmail.com")["type"], "Delivery");
    assert_eq!(d.wait_terminal(&log, "pat@yahoo.com")["type"], "Delivery");
    let until = Instant::now() + Duration::from_secs(10);
    while pickup.join("good.eml").exists() || !pickup.join("bad/bad.eml").exists() {
        assert!(Instant::now() < until, "pickup files not handled");
        std::thread::sleep(Duration::from_millis(50));
    }
    let why = std::fs::read_to_string(pickup.join("bad/bad.eml.why")).unwrap();
    assert!(why.contains("X-Sender"), "{why}");
}

#[test]
fn send_hands_its_campaign_to_a_running_serve() {
    let env = common::env("serve-send", "");
    let spool = env.dir.join("spool");
    let _d = Daemon::start(&env.dir, &base_args(&env, &spool));
    let rows: Vec<String> = (0..40).map(|i| format!("s{i}@gmail.com,S{i}")).collect();
    let dir = common::campaign(&env.dir, "handed", "", &rows);
    let out = Command::new(VOLLEY)
        .arg("send")
        .arg(&dir)
        .args([
            "--spool",
            &spool.display().to_string(),
            "--quiet",
            "--ehlo",
            "test.volley.test",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("queued 40 recipients"), "{stdout}");
    assert!(stdout.contains("delivered    40"), "{stdout}");
    assert_eq!(env.sink.rcpts_terminal(), 40);
}

#[test]
fn a_message_acknowledged_before_a_sigkill_is_delivered_after_restart() {
    let env = common::env("serve-kill", "");
    let spool = env.dir.join("spool");
    // The first daemon's MX is a port that takes connections and never greets:
    // the message is in flight, not delivered, when the daemon is killed.
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_port = mute.local_addr().unwrap().port();
    let port = free_port();
    let mut args = base_args(&env, &spool);
    args[5] = mute_port.to_string();
    args.extend(["--submission".into(), format!("127.0.0.1:{port}")]);
    let mut d = Daemon::start(&env.dir, &args);
    let (mut c, _) = Client::connect(format!("127.0.0.1:{port}").parse().unwrap());
    c.cmd("EHLO app.test");
    assert!(c.cmd("MAIL FROM:<app@news.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<kim@gmail.com>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send("Subject: durable\r\n\r\nsurvives a kill\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("250 "), "{r}");
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(10)).unwrap_or_default();
    assert_eq!(env.sink.rcpts_terminal(), 0);
    drop(d);

    let mut args = base_args(&env, &spool);
    args.extend(["--submission".into(), format!("127.0.0.1:{}", free_port())]);
    let d = Daemon::start(&env.dir, &args);
    let t = d.wait_terminal(&spool.join("accounting.jsonl"), "kim@gmail.com");
    assert_eq!(t["type"], "Delivery");
    drop(mute);
}

#[test]
fn sigterm_stops_taking_mail_and_exits_0_and_sighup_reloads_users() {
    let env = common::env("serve-signals", "");
    let spool = env.dir.join("spool");
    let users = env.dir.join("users");
    add_user(&users, "alice", "first");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = format!(
        "users = \"{}\"\n[[submission]]\nlisten = \"{addr}\"\ntls = \"none\"\nauth = \"required\"\nauth_over_plaintext = true\n",
        users.display()
    );
    let cfg = write_config(&env.dir, &cfg);
    let mut args = base_args(&env, &spool);
    args.extend(["--config".into(), cfg.display().to_string()]);
    let mut d = Daemon::start(&env.dir, &args);
    // AUTH PLAIN for bob with password "second": \0bob\0second.
    let bob = "AUTH PLAIN AGJvYgBzZWNvbmQ=";
    let (mut c, _) = Client::connect(addr);
    c.cmd("EHLO app.test");
    assert!(c.cmd(bob).starts_with("535"), "bob is not a user yet");
    add_user(&users, "bob", "second");
    d.signal(libc::SIGHUP);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let (mut c, _) = Client::connect(addr);
        c.cmd("EHLO app.test");
        if c.cmd(bob).starts_with("235") {
            break;
        }
        assert!(
            Instant::now() < until,
            "SIGHUP did not reload the users:\n{}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // An idle session is told the service is going, and the daemon exits 0.
    let (mut idle, _) = Client::connect(addr);
    idle.cmd("EHLO app.test");
    d.signal(libc::SIGTERM);
    let bye = idle.reply();
    assert!(bye.starts_with("421 4.3.2"), "{bye}");
    assert_eq!(
        d.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        d.stderr()
    );
    assert!(TcpStream::connect(addr).is_err(), "the listener is closed");
}

#[test]
fn config_check_names_each_bad_key_with_its_line() {
    let dir = std::env::temp_dir().join(format!("volley-config-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = write_config(
        &dir,
        "shards = 2\nwindoww = 8\n[[submission]]\nlisten = \"127.0.0.1:70000\"\nrelay_networks = [\"10.0.0.0/33\"]\n",
    );
    let out = Command::new(VOLLEY)
        .args(["config", "check"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let f = cfg.display().to_string();
    assert!(text.contains(&format!("{f}:2: key `windoww`")), "{text}");
    assert!(text.contains(&format!("{f}:4:")), "{text}");
    assert!(text.contains(&format!("{f}:5:")), "{text}");
    let example = Command::new(VOLLEY)
        .args(["config", "example"])
        .output()
        .unwrap();
    let ex = write_config(&dir, &String::from_utf8(example.stdout).unwrap());
    let out = Command::new(VOLLEY)
        .args(["config", "check"])
        .arg(&ex)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sighup_applies_a_new_rate_within_a_second() {
    let env = common::env("serve-hup-rate", "");
    let spool = env.dir.join("spool");
    let shaping = env.dir.join("shaping.toml");
    std::fs::write(
        &shaping,
        "[domain.\"gmail.com\"]\nmax_msg_rate = \"1/min\"\n",
    )
    .unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = format!(
        "shaping = \"{}\"\n[[submission]]\nlisten = \"{addr}\"\ntls = \"none\"\nauth = \"none\"\n",
        shaping.display()
    );
    let cfg = write_config(&env.dir, &cfg);
    let mut args = base_args(&env, &spool);
    args.extend(["--config".into(), cfg.display().to_string()]);
    let d = Daemon::start(&env.dir, &args);
    let (mut c, _) = Client::connect(addr);
    c.cmd("EHLO app.test");
    for i in 0..6 {
        assert!(c.cmd("MAIL FROM:<app@news.test>").starts_with("250"));
        assert!(c
            .cmd(&format!("RCPT TO:<r{i}@gmail.com>"))
            .starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send("Subject: rate\r\n\r\nx\r\n.\r\n");
        assert!(c.reply().starts_with("250"));
    }
    // At one a minute (split over two shards) at most one per shard goes now.
    std::thread::sleep(Duration::from_millis(1500));
    let before = env.sink.rcpts_terminal();
    assert!(before <= 2, "{before} delivered at 1/min");
    // A reload that changes nothing lets nothing more through: the pacing stays.
    d.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(1500));
    let after = env.sink.rcpts_terminal();
    assert_eq!(
        after, before,
        "a reload without changes let mail past the rate"
    );
    std::fs::write(
        &shaping,
        "[domain.\"gmail.com\"]\nmax_msg_rate = \"1000/s\"\n",
    )
    .unwrap();
    let hup = Instant::now();
    d.signal(libc::SIGHUP);
    while env.sink.rcpts_terminal() < 6 {
        assert!(
            hup.elapsed() < Duration::from_secs(5),
            "{} of 6 delivered after the reload:\n{}",
            env.sink.rcpts_terminal(),
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Said once the rules are published, which may come after the deliveries they allow.
    d.wait_stderr("shaping and bounce rules reloaded");
}

#[test]
fn a_submitted_message_that_bounces_comes_back_to_its_sender_as_a_dsn() {
    let (env, keep) = common::env_keeping("serve-dsn");
    let spool = env.dir.join("spool");
    let port = free_port();
    let mut args = base_args(&env, &spool);
    args.extend(["--submission".into(), format!("127.0.0.1:{port}")]);
    let d = Daemon::start(&env.dir, &args);
    let (mut c, _) = Client::connect(format!("127.0.0.1:{port}").parse().unwrap());
    c.cmd("EHLO app.test");
    // The sink refuses permfail* for good; the sender is on a domain it serves.
    assert!(c.cmd("MAIL FROM:<app@shop7.tail.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<permfail9@gmail.com>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send("From: app@shop7.tail.test\r\nSubject: doomed\r\n\r\nx\r\n.\r\n");
    assert!(c.reply().starts_with("250"));
    let log = spool.join("accounting.jsonl");
    assert_eq!(
        d.wait_terminal(&log, "permfail9@gmail.com")["type"],
        "Bounce"
    );
    let dsn = d.wait_terminal(&log, "app@shop7.tail.test");
    assert_eq!(dsn["type"], "Delivery");
    assert_eq!(dsn["campaign"], "dsn");
    assert_eq!(dsn["sender"], "<>", "a DSN goes from the null sender");
    let report: String = std::fs::read_dir(&keep)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .filter(|m| m.contains("multipart/report"))
        .collect();
    assert!(
        report.contains("Final-Recipient: rfc822; permfail9@gmail.com"),
        "{report}"
    );
    assert!(report.contains("Action: failed"), "{report}");
    assert!(
        report.contains("Content-Type: text/rfc822-headers") && report.contains("Subject: doomed"),
        "the failed message's header comes back: {report}"
    );
    let _ = std::fs::remove_dir_all(&keep);
}

#[test]
fn the_listeners_limits_answer_as_configured() {
    let env = common::env("serve-limits", "");
    let spool = env.dir.join("spool");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = format!(
        "[[submission]]\nlisten = \"{addr}\"\ntls = \"none\"\nauth = \"none\"\n\
         message_size_max = \"1KiB\"\nrecipients_max = 100\nconnections_per_ip_max = 2\n\
         command_timeout = \"1s\"\n"
    );
    let cfg = write_config(&env.dir, &cfg);
    let mut args = base_args(&env, &spool);
    args.extend(["--config".into(), cfg.display().to_string()]);
    let _d = Daemon::start(&env.dir, &args);

    let (mut c, _) = Client::connect(addr);
    let ehlo = c.cmd("EHLO app.test");
    assert!(ehlo.contains("SIZE 1024"), "{ehlo}");
    let r = c.cmd("MAIL FROM:<app@news.test> SIZE=5000");
    assert!(r.starts_with("552 5.3.4"), "{r}");
    assert!(c.cmd("MAIL FROM:<app@news.test>").starts_with("250"));
    for i in 0..100 {
        assert!(c
            .cmd(&format!("RCPT TO:<l{i}@gmail.com>"))
            .starts_with("250"));
    }
    let r = c.cmd("RCPT TO:<l100@gmail.com>");
    assert!(r.starts_with("452 4.5.3"), "{r}");
    assert!(c.cmd("DATA").starts_with("354"));
    let line = format!("{}\r\n", "x".repeat(98));
    c.send(&format!("Subject: big\r\n\r\n{}.\r\n", line.repeat(20)));
    let r = c.reply();
    assert!(r.starts_with("552 5.3.4"), "{r}");

    // Two connections from this address are the limit; the third is refused.
    let (_c2, g2) = Client::connect(addr);
    assert!(g2.starts_with("220"), "{g2}");
    let (_c3, g3) = Client::connect(addr);
    assert!(g3.starts_with("421 4.7.0"), "{g3}");

    // An idle session gets the command timeout, then is closed.
    let r = c.reply();
    assert!(r.starts_with("421 4.4.2"), "{r}");
    drop(_c2);
    // A client trickling a command a byte at a time gets no more than the command
    // timeout for the whole of it (slowloris).
    // (The closed connections' slots are freed as the listener sees them go.)
    let until = Instant::now() + Duration::from_secs(5);
    let mut slow = loop {
        let (c, greeting) = Client::connect(addr);
        if greeting.starts_with("220") {
            break c;
        }
        assert!(Instant::now() < until, "no slot freed: {greeting}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let started = Instant::now();
    for b in "NOOP NOOP NOOP NOOP NOOP NOOP".bytes() {
        if slow.try_send(&[b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let r = slow.reply();
    assert!(r.starts_with("421 4.4.2"), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        env.sink.rcpts_terminal(),
        0,
        "nothing over a limit was queued"
    );
}

#[test]
fn smuggled_and_bare_lf_content_never_becomes_a_second_message() {
    let env = common::env("serve-smuggle", "");
    let spool = env.dir.join("spool");
    let port = free_port();
    let mut args = base_args(&env, &spool);
    args.extend(["--submission".into(), format!("127.0.0.1:{port}")]);
    let _d = Daemon::start(&env.dir, &args);
    let (mut c, _) = Client::connect(format!("127.0.0.1:{port}").parse().unwrap());
    c.cmd("EHLO app.test");
    for end in ["\n.\r\n", "\r\n.\n", "\n.\n", "\r.\r\n"] {
        assert!(c.cmd("MAIL FROM:<app@news.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<outer@gmail.com>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        // After the fake end, a whole smuggled transaction.
        c.send(&format!(
            "Subject: outer\r\n\r\nhi{end}MAIL FROM:<evil@news.test>\r\nRCPT TO:<smuggled@gmail.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
        ));
        let r = c.reply();
        // One reply for the one message: refused for its bare line ends, never a
        // 250 for a second one.
        assert!(r.starts_with("5") || r.starts_with("250"), "{end:?}: {r}");
        let more = c.cmd("NOOP");
        assert!(
            more.starts_with("250 "),
            "{end:?}: no pending replies: {more}"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let log = std::fs::read_to_string(spool.join("accounting.jsonl")).unwrap_or_default();
    assert!(!log.contains("smuggled@"), "{log}");
}

#[test]
fn a_full_spool_refuses_injection_with_452_while_delivery_goes_on() {
    let env = common::env_with(
        "serve-diskfull",
        "latency_ms = { greeting = [1500, 1500] }",
        true,
    );
    // A small file system of our own for the spool (root only; skipped without).
    let fs = env.dir.join("fs");
    std::fs::create_dir_all(&fs).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&fs)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        common::skipped("cannot mount a tmpfs here (not root?); the disk-full test did not run");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(fs.clone());
    let spool = fs.join("spool");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = format!(
        "segment_size = \"1MiB\"\nspool_free_min = \"8MiB\"\n[[submission]]\nlisten = \"{addr}\"\ntls = \"none\"\nauth = \"none\"\n"
    );
    let cfg = write_config(&env.dir, &cfg);
    let mut args = base_args(&env, &spool);
    args.extend(["--config".into(), cfg.display().to_string()]);
    let d = Daemon::start(&env.dir, &args);
    let send = |c: &mut Client, rcpt: &str| {
        assert!(c.cmd("MAIL FROM:<app@news.test>").starts_with("250"));
        assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send("Subject: space\r\n\r\nx\r\n.\r\n");
        c.reply()
    };
    let (mut c, _) = Client::connect(addr);
    c.cmd("EHLO app.test");
    // Taken while there is room; its delivery waits on the receiver's slow greeting.
    assert!(send(&mut c, "early@gmail.com").starts_with("250"));
    // Then the file system fills up to under the reserve.
    let filler = fs.join("filler");
    let free = {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&fs)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    std::fs::write(&filler, vec![0u8; (free - 6 * 1024 * 1024) as usize]).unwrap();
    let r = send(&mut c, "late@gmail.com");
    assert!(r.starts_with("452 4.3.1"), "{r}");
    // The operator sees it: `volley queue status` shows the budget and the refusal
    // (its lines are renewed every second).
    let status = || {
        let out = Command::new(VOLLEY)
            .args(["queue", "--spool"])
            .arg(&spool)
            .arg("status")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut shown = status();
    while !shown.contains("1 refused since start") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        shown = status();
    }
    assert!(
        shown.contains(
            "injection refused below 8.0 MiB (spool_free_min), REFUSING NOW; 1 refused since start"
        ),
        "{shown}"
    );
    // Delivery goes on: what was taken is delivered and recorded.
    let t = d.wait_terminal(&spool.join("accounting.jsonl"), "early@gmail.com");
    assert_eq!(t["type"], "Delivery");
    // Room again: taken again.
    std::fs::remove_file(&filler).unwrap();
    assert!(send(&mut c, "again@gmail.com").starts_with("250"));
    assert_eq!(
        d.wait_terminal(&spool.join("accounting.jsonl"), "again@gmail.com")["type"],
        "Delivery"
    );
}

#[test]
fn line_length_and_the_apis_request_timeout_follow_the_config() {
    let env = common::env("serve-lines", "");
    let spool = env.dir.join("spool");
    let (tokens, token) = add_token(&env.dir);
    let (port, http_port) = (free_port(), free_port());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let http_addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let cfg = format!(
        "tokens = \"{}\"\n[[submission]]\nlisten = \"{addr}\"\ntls = \"none\"\nauth = \"none\"\n\
         line_length_max = 2000\n[http]\nlisten = \"{http_addr}\"\nrequest_timeout = \"1s\"\n",
        tokens.display()
    );
    let cfg = write_config(&env.dir, &cfg);
    let mut args = base_args(&env, &spool);
    args.extend(["--config".into(), cfg.display().to_string()]);
    let _d = Daemon::start(&env.dir, &args);
    let (mut c, _) = Client::connect(addr);
    c.cmd("EHLO app.test");
    for (len, ok) in [(1500, true), (2100, false)] {
        assert!(c.cmd("MAIL FROM:<app@news.test>").starts_with("250"));
        assert!(c
            .cmd(&format!("RCPT TO:<len{len}@gmail.com>"))
            .starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(&format!(
            "Subject: long\r\n\r\n{}\r\n.\r\n",
            "y".repeat(len)
        ));
        let r = c.reply();
        match ok {
            true => assert!(r.starts_with("250"), "{len}: {r}"),
            false => assert!(r.starts_with("500 5.5.6"), "{len}: {r}"),
        }
    }
    // A request body that stalls gets 408 after request_timeout.
    let mut s = TcpStream::connect(http_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /api/v1/inject HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n{{\"id\""
    )
    .unwrap();
    let started = Instant::now();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head[9..12], b"408");
    assert!(started.elapsed() < Duration::from_secs(5));
}
