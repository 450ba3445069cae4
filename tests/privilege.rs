//! `volley serve` started as root with `user =`: it binds a port below 1024, drops
//! to the service user for good, and everything it writes is that user's alone; a
//! second user can read none of it. A spool of another owner is refused with the
//! `chown -R` that fixes it; the ways to get a low port without root are named.
//! Needs root (to create throwaway users with useradd); otherwise SKIPPED.

mod common;

use common::daemon::{sink_args, write_config_as, Client, Daemon, READY_LIMIT, VOLLEY};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a refused start gets to exit: as long as a good one gets to say it is ready.
const START_LIMIT: Duration = READY_LIMIT;

/// A throwaway system user (and its group), deleted when dropped, even when the
/// test fails.
struct TempUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// useradd and userdel lock /etc/passwd and fail rather than wait: the tests,
/// which run in parallel, take turns, and retry a busy lock a few times.
static USERDB: std::sync::Mutex<()> = std::sync::Mutex::new(());
const USERDB_ATTEMPTS: usize = 5;

/// Runs useradd/userdel `args` until it succeeds or USERDB_ATTEMPTS have failed.
fn userdb(program: &str, args: &[&str]) -> std::process::Output {
    let _turn = USERDB.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = None;
    for _ in 0..USERDB_ATTEMPTS {
        let o = Command::new(program).args(args).output().expect("runs");
        if o.status.success() {
            return o;
        }
        out = Some(o);
        std::thread::sleep(Duration::from_millis(200));
    }
    out.expect("at least one attempt")
}

impl TempUser {
    fn create(prefix: &str) -> TempUser {
        // Unique per run: the pid and a random part (useradd's limit is 32 characters).
        let name = format!(
            "{prefix}-{}{:04}",
            std::process::id() % 10_000,
            fastrand::u32(..10_000)
        );
        let out = userdb(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ],
        );
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let a = volley::host::privilege::lookup(&name, None).expect("the user just made");
        TempUser {
            name,
            uid: a.uid,
            gid: a.gid,
        }
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = userdb("userdel", &[&self.name]);
    }
}

/// `volley serve --config CONFIG` pointed at the test's sink and DNS.
fn serve(config: &Path, env: &common::Env) -> Command {
    let mut c = Command::new(VOLLEY);
    c.arg("serve")
        .arg("--config")
        .arg(config)
        .args(sink_args(env));
    c
}

/// Runs a start that must fail: its exit status and stderr, killed past START_LIMIT.
fn refused(mut cmd: Command) -> (Option<i32>, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + START_LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

/// A loopback port below 1024 in `range` that is free now (up to 50 tried). Each
/// test has its own range: the daemons bind with SO_REUSEPORT, so two of them (both
/// root's) could share a port and take each other's connections.
fn low_port(range: std::ops::Range<u16>) -> u16 {
    let len = range.end - range.start;
    let first = fastrand::u16(0..len);
    (0..50u16)
        .map(|i| range.start + (first + i * 7) % len)
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap_or_else(|| panic!("no free port in {range:?}"))
}

/// Writes `text` as `dir`/`name`, readable by the second user, who runs some of these.
fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = write_config_as(dir, name, text);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

fn listener(port: u16) -> String {
    listener_tls(port, "none")
}

/// A submission listener on loopback `port` where loopback relays without AUTH.
fn listener_tls(port: u16, tls: &str) -> String {
    format!(
        "[[submission]]\nlisten = \"127.0.0.1:{port}\"\ntls = \"{tls}\"\nauth = \"none\"\nrelay_networks = [\"127.0.0.0/8\"]\n"
    )
}

/// A self-signed certificate and its key in `dir`, both root's alone (0600).
fn root_only_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["mta.volley.test".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    for (p, pem) in [(&cert, ck.cert.pem()), (&key, ck.key_pair.serialize_pem())] {
        std::fs::write(p, pem).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    (cert, key)
}

/// `Uid:`/`Gid:` (real, effective, saved, fs), `Groups:`, `CapEff:` of a process.
fn status_field(pid: u32, field: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line[field.len() + 1..]
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// What each test here starts from: a service user, a second user and the test's
/// sink and DNS (named `name`); None, after saying it skipped ("needs root to
/// `why`"), when not root.
fn as_root_with_two_users(name: &str, why: &str) -> Option<(TempUser, TempUser, common::Env)> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        common::skipped(&format!("needs root to {why}"));
        return None;
    }
    let service = TempUser::create("volley-t");
    let other = TempUser::create("volley-o");
    Some((service, other, common::env(name, "")))
}

/// Submits one message over SMTP (no STARTTLS: loopback may send in the clear);
/// the EHLO reply and the final reply.
fn submit(addr: SocketAddr, rcpt: &str) -> (String, String) {
    let (mut c, greeting) = Client::connect(addr);
    assert!(greeting.starts_with("220 "));
    let mut replies = Vec::new();
    for cmd in [
        "EHLO app.test\r\n".to_string(),
        "MAIL FROM:<app@news.test>\r\n".into(),
        format!("RCPT TO:<{rcpt}>\r\n"),
        "DATA\r\n".into(),
        format!("From: app@news.test\r\nTo: {rcpt}\r\nSubject: low port\r\n\r\nhello\r\n.\r\n"),
    ] {
        c.send(&cmd);
        let last = c.reply();
        assert!(
            last.starts_with('2') || last.starts_with('3'),
            "{cmd:?}: {last}"
        );
        replies.push(last);
    }
    c.send("QUIT\r\n");
    let last = replies.pop().unwrap();
    (replies.remove(0), last)
}

/// Every entry under `dir`: (path, metadata), links not followed.
fn tree(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = vec![(dir.to_path_buf(), std::fs::symlink_metadata(dir).unwrap())];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), m));
        }
    }
    out
}

/// Runs `program args` as `user` (uid, gid, no supplementary groups); its stderr,
/// asserting it failed.
fn fails_as(user: &TempUser, program: &str, args: &[&Path]) -> String {
    let out = Command::new(program)
        .args(args)
        .uid(user.uid)
        .gid(user.gid)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "{program} {args:?} as {} succeeded",
        user.name
    );
    err
}

#[test]
fn started_as_root_it_binds_a_low_port_then_runs_as_the_service_user_alone() {
    let Some((service, other, env)) = as_root_with_two_users(
        "privilege",
        "create throwaway users and bind a port below 1024",
    ) else {
        return;
    };
    // Missing: volley makes it, as root, and gives it to the service user.
    let spool = PathBuf::from(format!("/tmp/volley-priv-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&spool);
    let port = low_port(600..800);
    // Read as root before the drop: the service user could not.
    let (cert, key) = root_only_certificate(&env.dir);
    let config = write_config(
        &env.dir,
        "volley.toml",
        &format!(
            "spool = \"{}\"\nuser = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{}",
            spool.display(),
            service.name,
            cert.display(),
            key.display(),
            listener_tls(port, "starttls")
        ),
    );
    let d = Daemon::spawn(&env.dir, serve(&config, &env));
    let pid = d.pid();
    let (uid, gid) = (service.uid.to_string(), service.gid.to_string());
    assert_eq!(
        status_field(pid, "Uid"),
        vec![uid.as_str(); 4],
        "real, effective, saved, fs"
    );
    assert_eq!(status_field(pid, "Gid"), vec![gid.as_str(); 4]);
    assert_eq!(
        status_field(pid, "Groups"),
        vec![gid.as_str()],
        "no supplementary root group"
    );
    assert_eq!(status_field(pid, "CapEff"), vec!["0000000000000000"]);
    assert_eq!(status_field(pid, "CapPrm"), vec!["0000000000000000"]);
    assert!(
        d.stderr().contains(&format!("running as {}", service.name)),
        "{}",
        d.stderr()
    );

    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (ehlo, r) = submit(addr, "ann@gmail.com");
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let err = fails_as(&service, "cat", &[&key]);
    assert!(
        err.contains("Permission denied"),
        "the key is root's alone: {err}"
    );
    // Delivered too: the shards run as the user.
    let log = spool.join("accounting.jsonl");
    d.wait_terminal(&log, "ann@gmail.com");

    // Everything in the spool is the service user's: directories 0700, files 0600,
    // sockets private; the accounting log at most 0640 (host::files::LOG_MODE: group
    // read, for a log shipper in the service user's group).
    let entries = tree(&spool);
    assert!(entries.len() > 5, "{entries:?}");
    for (p, m) in &entries {
        assert_eq!(
            (m.uid(), m.gid()),
            (service.uid, service.gid),
            "{}",
            p.display()
        );
        let mode = m.mode() & 0o7777;
        let want = if m.is_dir() {
            0o700
        } else if p == &log || m.file_type().is_socket() {
            mode & 0o740
        } else {
            0o600
        };
        assert_eq!(mode, want, "{} is {mode:o}", p.display());
    }
    // The second user can neither list the spool nor read what is in it.
    let err = fails_as(&other, "ls", &[&spool]);
    assert!(err.contains("Permission denied"), "{err}");
    let err = fails_as(&other, "cat", &[&spool.join("spool.toml")]);
    assert!(err.contains("Permission denied"), "{err}");
    drop(d);
    std::fs::remove_dir_all(&spool).unwrap();
}

#[test]
fn a_spool_of_another_owner_is_refused_with_the_chown_that_fixes_it() {
    let Some((service, other, env)) =
        as_root_with_two_users("privilege-owner", "create throwaway users")
    else {
        return;
    };
    let spool = env.dir.join("spool");
    std::fs::create_dir(&spool).unwrap();
    std::os::unix::fs::chown(&spool, Some(other.uid), Some(other.gid)).unwrap();
    let config = write_config(
        &env.dir,
        "volley.toml",
        &format!(
            "spool = \"{}\"\nuser = \"{}\"\n{}",
            spool.display(),
            service.name,
            listener(low_port(800..900))
        ),
    );
    let (status, err) = refused(serve(&config, &env));
    assert_eq!(status, Some(1), "{err}");
    let fix = format!(
        "run `chown -R {}: {}` as root",
        service.name,
        spool.display()
    );
    assert!(err.contains(&fix), "{err}");
    assert!(
        err.contains(&format!("owned by uid {}", other.uid)),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "nothing written in it"
    );
}

#[test]
fn without_root_the_ways_to_a_low_port_and_to_the_user_are_named() {
    let Some((service, other, env)) =
        as_root_with_two_users("privilege-unprivileged", "create throwaway users")
    else {
        return;
    };
    // Reachable by the other user: the test's directory is the test's (umask 022 or not).
    std::fs::set_permissions(&env.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let spool = env.dir.join("spool");
    let port = low_port(900..1000);

    // Root without `user`: a warning, then (here) the bind fails on a port in use.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let config = write_config(
        &env.dir,
        "root.toml",
        &format!(
            "spool = \"{}\"\n{}",
            spool.display(),
            listener(taken.local_addr().unwrap().port())
        ),
    );
    let (status, err) = refused(serve(&config, &env));
    assert_eq!(status, Some(1), "{err}");
    assert!(
        err.contains("warning: running as root; set user = \"volley\""),
        "{err}"
    );
    assert!(err.contains("Address already in use"), "{err}");

    // Not root, a port below 1024: both ways to get one are said.
    let config = write_config(
        &env.dir,
        "low.toml",
        &format!("spool = \"{}\"\n{}", spool.display(), listener(port)),
    );
    let mut cmd = serve(&config, &env);
    cmd.uid(other.uid).gid(other.gid);
    let (status, err) = refused(cmd);
    assert_eq!(status, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "submission listener 127.0.0.1:{port}: Permission denied"
        )),
        "{err}"
    );
    assert!(
        err.contains("start volley serve as root with user = \"volley\""),
        "{err}"
    );
    assert!(
        err.contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"),
        "{err}"
    );

    // Not root, `user` naming someone else: refused, with where `user` is set.
    let config = write_config(
        &env.dir,
        "user.toml",
        &format!(
            "spool = \"{}\"\n\nuser = \"{}\"\n",
            spool.display(),
            service.name
        ),
    );
    let mut cmd = serve(&config, &env);
    cmd.uid(other.uid).gid(other.gid);
    let (status, err) = refused(cmd);
    assert_eq!(status, Some(1), "{err}");
    let want = format!(
        "user = \"{}\" ({}:3), but volley serve runs as uid {}",
        service.name,
        config.display(),
        other.uid
    );
    assert!(err.contains(&want), "{err}");
    assert!(!spool.exists(), "nothing made before refusing");
}
