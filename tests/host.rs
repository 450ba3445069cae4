//! Running on a shared host, through the binary: what volley writes is private
//! whatever the umask, an existing spool is made private, and the accounting log
//! rotates (by size, or by an external logrotate and SIGUSR1) mid-run without a
//! record lost or repeated, as `volley report` and the log's readers see it.

mod common;

use common::daemon::{base_args, sink_args, volley_under_umask, VOLLEY};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `volley send DIR` with the env's DNS and sink, under `umask`, plus `extra` flags.
fn send(env: &common::Env, dir: &Path, umask: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "send".to_string(),
        dir.display().to_string(),
        "--quiet".into(),
    ];
    args.extend(base_args(env, &env.dir.join("spool")));
    args.extend(["--ehlo", "mta.example.net"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = volley_under_umask(umask).args(&args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every file and directory under `dir` with its mode.
fn modes(dir: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = vec![(dir.to_path_buf(), mode(dir), true)];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let is_dir = e.file_type().unwrap().is_dir();
            out.push((p.clone(), mode(&p), is_dir));
            if is_dir {
                todo.push(p);
            }
        }
    }
    out
}

fn rows(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user{i}@gmail.com,U{i}")).collect()
}

#[test]
fn the_spool_and_log_are_private_under_any_umask() {
    for umask in ["000", "077"] {
        let env = common::env(&format!("host-umask{umask}"), "");
        let c = common::campaign(&env.dir, "modes", "", &rows(20));
        let (code, out, err) = send(&env, &c, umask, &[]);
        assert_eq!(code, 0, "umask {umask}: {out}{err}");
        let spool = env.dir.join("spool");
        let log = spool.join("accounting.jsonl");
        let all = modes(&spool);
        assert!(all.len() > 8, "{all:?}");
        for (p, m, is_dir) in &all {
            let want = match (p == &log, is_dir) {
                (true, _) => 0o640,
                (false, true) => 0o700,
                (false, false) => 0o600,
            };
            assert_eq!(*m, want, "umask {umask}: {} is {m:o}", p.display());
        }
        assert!(all
            .iter()
            .any(|(p, _, _)| p.ends_with("campaigns/1/recipients.csv")));
    }
}

#[test]
fn an_existing_spool_open_to_others_is_made_private_with_a_notice() {
    let env = common::env("host-fix", "");
    let c = common::campaign(&env.dir, "fix", "", &rows(5));
    assert_eq!(send(&env, &c, "077", &[]).0, 0);
    let spool = env.dir.join("spool");
    // As an older volley (or a copy made with cp -r under umask 022) left it.
    for (p, _, is_dir) in modes(&spool) {
        let m = if is_dir { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let c2 = common::campaign(&env.dir, "fix2", "", &rows(5));
    let (code, out, err) = send(&env, &c2, "022", &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("were readable by others; made them private (0600/0700)"),
        "{err}"
    );
    let log = spool.join("accounting.jsonl");
    for (p, m, _) in modes(&spool) {
        if p == log {
            assert_eq!(m, 0o640, "the log keeps its own mode");
        } else {
            assert_eq!(m & 0o077, 0, "{} is {m:o}", p.display());
        }
    }
    // Nothing more to fix: no notice the next time.
    let c3 = common::campaign(&env.dir, "fix3", "", &rows(2));
    let (code, out, err) = send(&env, &c3, "022", &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("made them private"), "{err}");
}

/// Terminal records per recipient over every generation of `log`.
fn finals(log: &Path) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for l in common::log_lines(log) {
        if matches!(
            l["type"].as_str(),
            Some("Delivery" | "Bounce" | "Expiration")
        ) {
            *m.entry(l["rcpt"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    m
}

fn report_delivered(log: &Path, campaign: &str) -> u64 {
    let out = Command::new(VOLLEY)
        .args(["report", campaign, "--json", "--log"])
        .arg(log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["totals"]["delivered"].as_u64().unwrap()
}

#[test]
fn the_log_rotates_by_size_mid_run_and_report_counts_every_recipient_once() {
    let env = common::env("host-rotate", "");
    let n = 3000;
    let c = common::campaign(&env.dir, "rotate", "", &rows(n));
    let (code, _, err) = send(&env, &c, "022", &["--log-rotate-size", "4KiB"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("write a size of at least 64KiB"), "{err}");
    let (code, out, err) = send(&env, &c, "022", &["--log-rotate-size", "64KiB"]);
    assert_eq!(code, 0, "{out}{err}");
    let log = env.dir.join("spool/accounting.jsonl");
    let names: Vec<String> = std::fs::read_dir(log.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("accounting.jsonl."))
        .collect();
    // ~300 octets a record: about 15 rotations, each compressed once the send ends.
    assert!(names.len() >= 8, "{names:?}");
    assert!(
        names.iter().all(|n| n.ends_with(".gz")),
        "every rotated file compressed by the time send exits: {names:?}"
    );
    let f = finals(&log);
    assert_eq!(f.len(), n);
    assert!(f.values().all(|&k| k == 1), "a recipient logged twice");
    assert_eq!(report_delivered(&log, "rotate"), n as u64);
    assert_eq!(env.sink.summary().counts.rcpts_accepted, n as u64);
}

#[test]
fn an_external_logrotate_then_sigusr1_mid_run_loses_and_repeats_nothing() {
    let env = common::env("host-usr1", "");
    let n = 600;
    let c = common::campaign(&env.dir, "usr1", "", &rows(n));
    let spool = env.dir.join("spool");
    let log = spool.join("accounting.jsonl");
    // 100 messages a second: the send lasts about 6 s.
    let mut child = Command::new(VOLLEY)
        .args(["send", c.to_str().unwrap(), "--quiet", "--spool"])
        .arg(&spool)
        .args(sink_args(&env))
        .args(["--ehlo", "mta.example.net", "--max-msg-rate", "100/s"])
        .args(["--log-rotate-size", "0", "--log-rotate-daily", "false"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logged = |p: &Path| {
        std::fs::read_to_string(p)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while logged(&log) < 100 {
        assert!(Instant::now() < deadline, "nothing logged in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // What logrotate does (no copytruncate): rename, then postrotate's signal.
    std::fs::rename(&log, spool.join("accounting.jsonl.1")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) }, 0);
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("reopened (SIGUSR1)"), "{err}");
    let before = logged(&spool.join("accounting.jsonl.1"));
    let after = logged(&log);
    assert!(before >= 100 && after > 0, "{before} then {after}");
    assert_eq!(mode(&log), 0o640);
    let f = finals(&log);
    assert_eq!(f.len(), n);
    assert!(f.values().all(|&k| k == 1), "a recipient logged twice");
    assert_eq!(report_delivered(&log, "usr1"), n as u64);
    assert!(
        spool.join("accounting.jsonl.1").exists(),
        "logrotate's file is logrotate's: never compressed or deleted here"
    );
}

#[test]
fn a_log_volley_cannot_write_stops_serve_before_it_says_ready() {
    let env = common::env("host-badlog", "");
    let spool = env.dir.join("spool");
    // No one may make a directory in /proc, root included.
    let config = env.dir.join("volley.toml");
    std::fs::write(&config, "log = \"/proc/volley-no-such/accounting.jsonl\"\n").unwrap();
    let mut child = Command::new(VOLLEY)
        .arg("serve")
        .args(base_args(&env, &spool))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("volley serve still running with a log it cannot write");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(!stdout.contains("ready"), "said ready first: {stdout}");
    assert!(
        stderr.contains("accounting log /proc/volley-no-such/accounting.jsonl: cannot create its directory /proc/volley-no-such"),
        "{stderr}"
    );
}
