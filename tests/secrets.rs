//! Secrets on the host, through the binary: a key others may read is refused (and
//! used with a warning under --allow-insecure-modes); a password, an API token or a
//! line of a private key never shows in any output, log or accounting record, whatever
//! the daemon is put through; the admin socket answers root, the service user and its
//! admin_group alone, checked with a throwaway user made by the test.

mod common;

use common::daemon::{free_port, http, sink_args, write_config, Client, Daemon, VOLLEY};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn volley(args: &[&str]) -> Output {
    Command::new(VOLLEY).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `volley dkim keygen` of selector s1 for news.test into `keys`, with `extra`
/// flags; it must succeed.
fn keygen(keys: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "dkim",
        "keygen",
        "--domain",
        "news.test",
        "--selector",
        "s1",
        "--out",
        keys.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = volley(&args);
    assert!(o.status.success(), "{}", text(&o));
    o
}

fn base64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Every `volley ... --help`, found by walking the "Commands:" lists (depth at most 3).
fn every_help() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    while let Some(path) = todo.pop() {
        assert!(
            path.len() <= 3 && out.len() < 200,
            "the command tree is bounded"
        );
        let mut args = path.clone();
        args.push("--help".into());
        let o = Command::new(VOLLEY).args(&args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        let t = text(&o);
        let mut in_commands = false;
        for line in t.lines() {
            if line.starts_with("Commands:") {
                in_commands = true;
                continue;
            }
            if in_commands {
                match line.split_whitespace().next() {
                    Some(c) if line.starts_with("  ") && c != "help" => {
                        let mut p = path.clone();
                        p.push(c.to_string());
                        todo.push(p);
                    }
                    Some(_) if line.starts_with("  ") => {}
                    _ => in_commands = false,
                }
            }
        }
        out.push((args.join(" "), t));
    }
    out
}

#[test]
fn a_key_others_may_read_is_refused_with_the_chmod_unless_allowed() {
    let dir = std::env::temp_dir().join(format!("volley-secrets-modes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("dkim");
    keygen(&keys, &["--type", "ed25519"]);
    let pem = keys.join("news.test/s1.pem");
    let sign = |extra: &[&str]| {
        let mut c = Command::new(VOLLEY)
            .args([
                "dkim",
                "sign",
                "--domain",
                "news.test",
                "--selector",
                "s1",
                "--key",
            ])
            .arg(&pem)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A refused key ends the command before it reads its input: a broken pipe
        // here is that, and the exit status and stderr below say the rest.
        let _ = c
            .stdin
            .take()
            .unwrap()
            .write_all(b"From: a@news.test\r\nTo: b@x.test\r\nSubject: s\r\n\r\nhi\r\n");
        c.wait_with_output().unwrap()
    };
    assert!(sign(&[]).status.success(), "keygen writes 0600: it passes");
    std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = sign(&[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let want = format!(
        "DKIM private key {0} is mode 0644: its group and other users may use it; fix: chmod 600 {0}",
        pem.display()
    );
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("--allow-insecure-modes"), "{err}");
    let o = sign(&["--allow-insecure-modes"]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(
        err.matches("volley: warning: DKIM private key").count(),
        1,
        "{err}"
    );
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("DKIM-Signature:"));
    // `check` reads the key as `send` does.
    let campaign = common::campaign(&dir, "spring", "dkim = true", &["ann@gmail.com,Ann".into()]);
    let check = |extra: &[&str]| {
        let mut args = vec![
            "check",
            campaign.to_str().unwrap(),
            "--ehlo",
            "mta.news.test",
            "--dkim-dir",
            keys.to_str().unwrap(),
        ];
        args.extend(extra);
        volley(&args)
    };
    let o = check(&[]);
    assert!(!o.status.success());
    assert!(text(&o).contains(&want), "{}", text(&o));
    let o = check(&["--allow-insecure-modes"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("volley: warning: DKIM private key"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_password_token_or_key_line_shows_in_any_output_or_log() {
    let env = common::env("secrets-leak", "");
    let spool = env.dir.join("spool");
    let (users, tokens, keys) = (
        env.dir.join("users"),
        env.dir.join("tokens"),
        env.dir.join("dkim"),
    );
    let password = format!("pw-{}-Quartz", fastrand::u64(..));
    let mut outputs: Vec<(String, String)> = Vec::new();

    let mut c = Command::new(VOLLEY)
        .args(["user", "add", "alice", "--cram-md5", "--users"])
        .arg(&users)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(c.stdin.take().unwrap(), "{password}").unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    outputs.push(("user add".into(), text(&o)));
    let o = volley(&["token", "add", "ops", "--tokens", tokens.to_str().unwrap()]);
    let token = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(token.starts_with("vly_"), "{}", text(&o));
    // The token is shown once, on stdout, by `token add`: its stderr is checked.
    outputs.push((
        "token add stderr".into(),
        String::from_utf8_lossy(&o.stderr).into(),
    ));
    let o = keygen(&keys, &[]);
    outputs.push(("dkim keygen".into(), text(&o)));
    let dkim_line = std::fs::read_to_string(keys.join("news.test/s1.pem"))
        .unwrap()
        .lines()
        .nth(3)
        .unwrap()
        .to_string();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["mta.news.test".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (env.dir.join("cert.pem"), env.dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tls_line = key.serialize_pem().lines().nth(1).unwrap().to_string();
    let secrets = [
        ("the password", password.clone()),
        ("the CRAM-MD5 secret", base64(&password)),
        ("the token", token.clone()),
        ("a DKIM key line", dkim_line),
        ("a TLS key line", tls_line),
    ];

    let (smtp_port, http_port) = (free_port(), free_port());
    let cfg = write_config(
        &env.dir,
        &format!(
            "spool = \"{}\"\ndkim_dir = \"{}\"\nusers = \"{}\"\ntokens = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
             ehlo_name = \"mta.news.test\"\n[[submission]]\nlisten = \"127.0.0.1:{smtp_port}\"\ntls = \"none\"\nauth = \"required\"\nauth_over_plaintext = true\n\
             [http]\nlisten = \"127.0.0.1:{http_port}\"\n",
            spool.display(),
            keys.display(),
            users.display(),
            tokens.display(),
            cert_file.display(),
            key_file.display()
        ),
    );
    let o = volley(&["config", "check", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    outputs.push(("config check".into(), text(&o)));
    outputs.push((
        "config example".into(),
        text(&volley(&["config", "example"])),
    ));
    outputs.extend(every_help());

    let mut args = vec!["--config".into(), cfg.display().to_string()];
    args.extend(sink_args(&env));
    let d = Daemon::start_under_umask(&env.dir, "022", &args);
    // SMTP AUTH: good and bad passwords, PLAIN and LOGIN.
    let (mut c, greeting) = Client::connect(format!("127.0.0.1:{smtp_port}").parse().unwrap());
    assert!(greeting.starts_with("220"));
    c.cmd("EHLO app.test");
    let bad = base64(&format!("\0alice\0{password}x"));
    assert!(c.cmd(&format!("AUTH PLAIN {bad}")).starts_with("535"));
    assert!(c.cmd("AUTH LOGIN").starts_with("334"));
    assert!(c.cmd(&base64("alice")).starts_with("334"));
    assert!(c.cmd(&base64(&format!("x{password}"))).starts_with("535"));
    let good = base64(&format!("\0alice\0{password}"));
    let reply = c.cmd(&format!("AUTH PLAIN {good}"));
    assert!(reply.starts_with("235"), "{reply}");
    assert!(c.cmd("MAIL FROM:<app@news.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<ann@gmail.com>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let reply = c.cmd("From: app@news.test\r\nTo: ann@gmail.com\r\nSubject: hi\r\n\r\nhello\r\n.");
    assert!(reply.starts_with("250"), "{reply}");
    c.cmd("QUIT");
    // HTTP: a good and a bad token; the campaign is signed with the DKIM key.
    let addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let body = "{\"id\":\"spring\",\"sender\":\"bounces@news.test\",\"from_domain\":\"news.test\",\"dkim\":true,\
        \"template\":\"From: news@news.test\\nTo: {{email}}\\nSubject: Hi\\n\\nHello\\n\",\
        \"recipients\":[{\"email\":\"bob@gmail.com\"}]}";
    let bad_token = format!("{token}x");
    let (status, head, body_out) = http(addr, "POST", "/api/v1/inject", Some(&bad_token), body);
    let resp = format!("{head}\r\n\r\n{body_out}");
    assert_eq!(status, 401, "{resp}");
    outputs.push(("http bad token".into(), resp));
    let (status, head, body_out) = http(addr, "POST", "/api/v1/inject", Some(&token), body);
    let resp = format!("{head}\r\n\r\n{body_out}");
    assert!((200..300).contains(&status), "{resp}");
    outputs.push(("http good token".into(), resp));
    let log = spool.join("accounting.jsonl");
    for rcpt in ["ann@gmail.com", "bob@gmail.com"] {
        d.wait_terminal(&log, rcpt);
    }
    // A users file broken by hand, a password in each bad line, then one others may
    // read: SIGHUP refuses both, saying why, and keeps the old users.
    let good_users = std::fs::read_to_string(&users).unwrap();
    std::fs::write(
        &users,
        format!("{good_users}carol:{password}\n{password}\ndave {password}:$argon2id$v=19$x\nerin:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA:cram-md5={password}\n"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    d.wait_stderr("users not reloaded");
    std::fs::write(&users, &good_users).unwrap();
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o644)).unwrap();
    d.signal(libc::SIGHUP);
    let err = d.wait_stderr("chmod 600");
    assert!(
        err.contains(&format!("users file {} is mode 0644", users.display())),
        "{err}"
    );
    outputs.push(("serve stderr".into(), d.stop()));
    outputs.push((
        "accounting log".into(),
        std::fs::read_to_string(&log).unwrap(),
    ));
    assert!(outputs.len() > 20, "every output was gathered");

    for (what, secret) in &secrets {
        assert!(
            secret.len() >= 16,
            "{what} is long enough to be found only as itself"
        );
        for (source, out) in &outputs {
            assert!(
                !out.contains(secret.as_str()),
                "{what} shows in {source}:\n{out}"
            );
        }
    }
}

/// A throwaway user and group made for the admin socket test; deleted when dropped,
/// whether the test passed or not.
struct Account {
    user: String,
    group: String,
    uid: u32,
    gid: u32,
    admin_gid: u32,
}

impl Drop for Account {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.user).output();
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

impl Account {
    /// The user (in a new group of its own and, as a supplementary group, in
    /// `GROUP`), or why not.
    fn make() -> Result<Account, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root; making a user needs it".into());
        }
        if Command::new("useradd").arg("--help").output().is_err() {
            return Err("no useradd (Debian's passwd package)".into());
        }
        let tag = format!("{:x}", std::process::id() ^ fastrand::u32(..0xffff));
        let (user, group) = (format!("volley-t-{tag}"), format!("volley-tadm-{tag}"));
        let o = Command::new("groupadd")
            .args(["--system", &group])
            .output()
            .unwrap();
        if !o.status.success() {
            return Err(format!("groupadd: {}", text(&o)));
        }
        let o = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                "-G",
                &group,
                &user,
            ])
            .output()
            .unwrap();
        let id = |flag: &str, name: &str| -> u32 {
            let o = Command::new("id").args([flag, name]).output().unwrap();
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .unwrap_or(u32::MAX)
        };
        let mut a = Account {
            uid: id("-u", &user),
            gid: id("-g", &user),
            admin_gid: 0,
            user,
            group,
        };
        if !o.status.success() {
            return Err(format!("useradd: {}", text(&o)));
        }
        let o = Command::new("getent")
            .args(["group", &a.group])
            .output()
            .unwrap();
        let admin_gid = String::from_utf8_lossy(&o.stdout)
            .split(':')
            .nth(2)
            .and_then(|g| g.parse().ok())
            .ok_or("getent group: no gid")?;
        a.admin_gid = admin_gid;
        Ok(a)
    }

    /// `volley queue status --spool SPOOL` run as this user with group `gid` (and
    /// no supplementary groups: std drops them when it sets the uid).
    fn queue_status(&self, spool: &Path, gid: u32) -> Output {
        Command::new(VOLLEY)
            .args(["queue", "--spool"])
            .arg(spool)
            .arg("status")
            .uid(self.uid)
            .gid(gid)
            .output()
            .unwrap()
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn the_admin_socket_answers_root_the_service_user_and_its_group_alone() {
    let account = match Account::make() {
        Ok(a) => a,
        Err(why) => {
            common::skipped(&why);
            return;
        }
    };
    let dir = std::env::temp_dir().join(format!("volley-admin-sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The test's directory is the user's to pass through; the spool is volley's.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let spool = dir.join("spool");
    let sock = spool.join("admin.sock");
    // No listener and no mail: the admin socket is all this daemon is for.
    let args = |extra: &[String]| {
        let mut a = vec![
            "--spool".to_string(),
            spool.display().to_string(),
            "--dns".into(),
            "127.0.0.1:9".into(),
        ];
        a.extend_from_slice(extra);
        a
    };

    // Under umask 000 the spool and the socket are still private.
    let d = Daemon::start_under_umask(&dir, "000", &args(&[]));
    assert_eq!(mode(&spool), 0o700);
    assert_eq!(mode(&sock), 0o600);
    let o = volley(&["queue", "--spool", spool.to_str().unwrap(), "status"]);
    assert!(o.status.success(), "root may: {}", text(&o));
    // First layer: the spool is 0700, the user cannot reach the socket at all.
    let o = account.queue_status(&spool, account.gid);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("add your user to admin_group"), "{err}");
    assert!(
        err.contains("root (uid 0), who owns"),
        "the spool's owner is named: {err}"
    );
    // Second layer: with the spool and the socket opened by mistake, the peer check
    // still refuses, with one line, and the daemon logs it.
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = account.queue_status(&spool, account.gid);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let who = format!(
        "{} (uid {}) may not use this admin socket; it is for root",
        account.user, account.uid
    );
    assert!(err.contains(&who), "{err}");
    assert!(err.contains("set admin_group"), "{err}");
    let log = d.wait_stderr("admin socket: refused");
    assert!(
        log.contains(&format!("refused {} (uid {})", account.user, account.uid)),
        "{log}"
    );
    // A pause sent by the refused user is not applied.
    let o = Command::new(VOLLEY)
        .args(["queue", "--spool"])
        .arg(&spool)
        .args(["pause", "gmail.com"])
        .uid(account.uid)
        .gid(account.gid)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    let o = volley(&["queue", "--spool", spool.to_str().unwrap(), "status"]);
    assert!(
        !text(&o).contains("paused"),
        "nothing applied: {}",
        text(&o)
    );
    d.stop();

    // With admin_group: the socket is 0660 and the group's, the spool 0710; a member
    // gets in by its primary group and by its supplementary groups.
    let cfg = write_config(&dir, &format!("admin_group = \"{}\"\n", account.group));
    let o = volley(&["config", "check", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let d = Daemon::start_under_umask(
        &dir,
        "000",
        &args(&["--config".into(), cfg.display().to_string()]),
    );
    assert_eq!(mode(&sock), 0o660);
    assert_eq!(std::fs::metadata(&sock).unwrap().gid(), account.admin_gid);
    assert_eq!(mode(&spool), 0o710);
    assert_eq!(std::fs::metadata(&spool).unwrap().gid(), account.admin_gid);
    let o = account.queue_status(&spool, account.admin_gid);
    assert!(
        o.status.success(),
        "the group's primary member: {}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("ok"),
        "{}",
        text(&o)
    );
    let o = account.queue_status(&spool, account.gid);
    assert!(
        !o.status.success(),
        "not in the group without its supplementary groups"
    );
    match Command::new("setpriv")
        .args([
            "--reuid",
            &account.uid.to_string(),
            "--regid",
            &account.gid.to_string(),
            "--init-groups",
            VOLLEY,
            "queue",
            "--spool",
        ])
        .arg(&spool)
        .arg("status")
        .output()
    {
        Ok(o) => assert!(o.status.success(), "a supplementary member: {}", text(&o)),
        Err(e) => common::skipped(&format!("the supplementary-group case: no setpriv: {e}")),
    }
    let o = volley(&["queue", "--spool", spool.to_str().unwrap(), "status"]);
    assert!(o.status.success(), "root still may: {}", text(&o));

    // A member hands a campaign of its own over with `volley send` (it cannot lock
    // the spool, but reaches the socket).
    let camp = common::campaign(&dir, "member", "", &["m1@gmail.com,M".into()]);
    let chown =
        |p: &Path| std::os::unix::fs::lchown(p, Some(account.uid), Some(account.gid)).unwrap();
    for f in ["", "campaign.toml", "message.eml", "recipients.csv"] {
        chown(&camp.join(f));
    }
    let o = Command::new(VOLLEY)
        .arg("send")
        .arg(&camp)
        .args(["--quiet", "--max-wait", "1s", "--spool"])
        .arg(&spool)
        .uid(account.uid)
        .gid(account.admin_gid)
        .output()
        .unwrap();
    assert!(
        text(&o).contains("in the running volley serve"),
        "a member's send is handed over: {}",
        text(&o)
    );
    // But not one whose files are links to what only the daemon may read: it would
    // read them for the member, and quote their first line in its refusal.
    let secret = dir.join("only-the-daemon.csv");
    std::fs::write(&secret, "email-header-secret-line\nx@gmail.com\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::remove_file(camp.join("recipients.csv")).unwrap();
    std::os::unix::fs::symlink(&secret, camp.join("recipients.csv")).unwrap();
    chown(&camp.join("recipients.csv"));
    let ask = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?}); s.sendall(b'inject-new {}\\n'); print(s.makefile().read())",
        sock.display().to_string(),
        camp.display()
    );
    let o = Command::new("python3")
        .args(["-c", &ask])
        .uid(account.uid)
        .gid(account.admin_gid)
        .output()
        .unwrap();
    let said = text(&o);
    assert!(said.contains("a link is not followed"), "{said}");
    assert!(!said.contains("email-header-secret-line"), "{said}");

    // Clients that connect and say nothing do not hold the socket up for others:
    // each connection has its own thread, up to ADMIN_CONNECTIONS_MAX.
    let idle: Vec<std::os::unix::net::UnixStream> = (0..12)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    let o = volley(&["queue", "--spool", spool.to_str().unwrap(), "status"]);
    assert!(
        o.status.success(),
        "status with 12 idle clients: {}",
        text(&o)
    );
    drop(idle);
    d.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}
