//! What the tests of `volley serve` share: a daemon started through the binary and
//! waited for until it says it is ready, the flags that point it at the test's sink
//! and DNS, a plain SMTP client and an HTTP request on loopback, and the waits on
//! its accounting log and stderr, each bounded in time.

// Each test binary uses a part of this (serve.rs all of it, host.rs only the flags).
#![allow(dead_code)]

use super::Env;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The volley binary cargo built for these tests.
pub const VOLLEY: &str = env!("CARGO_BIN_EXE_volley");

/// How long a daemon gets to print its readiness line.
pub const READY_LIMIT: Duration = Duration::from_secs(30);

/// How long a terminal record of a recipient may take to reach the accounting log.
pub const TERMINAL_LIMIT: Duration = Duration::from_secs(30);

/// How long a line may take to show in a daemon's stderr.
pub const STDERR_LIMIT: Duration = Duration::from_secs(10);

/// How long a daemon gets to exit after `stop`'s SIGTERM.
pub const STOP_LIMIT: Duration = Duration::from_secs(20);

/// How long the SMTP client waits for a reply line.
pub const SMTP_REPLY_LIMIT: Duration = Duration::from_secs(20);

/// How long an HTTP request waits for its response.
pub const HTTP_LIMIT: Duration = Duration::from_secs(30);

/// A tokens file DIR/tokens with one API token, `ops`, made by `volley token add`:
/// the file and the token.
pub fn add_token(dir: &Path) -> (PathBuf, String) {
    let tokens = dir.join("tokens");
    let out = Command::new(VOLLEY)
        .args(["token", "add", "ops", "--tokens"])
        .arg(&tokens)
        .output()
        .unwrap();
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("vly_"), "{token}");
    (tokens, token)
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The flags that point a daemon (or `volley send`) at the test's sink and DNS.
pub fn sink_args(env: &Env) -> Vec<String> {
    vec![
        "--dns".into(),
        env.dns.addr.to_string(),
        "--smtp-port".into(),
        env.sink.port().to_string(),
    ]
}

/// `--spool SPOOL` and the flags of `sink_args`, in that order (index 5 is the port).
pub fn base_args(env: &Env, spool: &Path) -> Vec<String> {
    let mut args = vec!["--spool".into(), spool.display().to_string()];
    args.extend(sink_args(env));
    args
}

/// `volley ARGS` run to its end: exit code (-1 for a signal), stdout, stderr.
pub fn volley(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(VOLLEY).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `volley` run by `sh` after `umask UMASK` (std's Command cannot set one); the
/// caller adds volley's arguments.
pub fn volley_under_umask(umask: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
        .arg(VOLLEY);
    c
}

/// Writes `text` as `dir`/volley.toml; its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    write_config_as(dir, "volley.toml", text)
}

/// Writes `text` as `dir`/`name`; its path.
pub fn write_config_as(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Calls `probe` every `every` until it gives a value, at most `limit`; past that,
/// panics with what `why` says.
pub fn wait_for<T>(
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
    why: impl Fn() -> String,
) -> T {
    let until = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < until, "{}", why());
        std::thread::sleep(every);
    }
}

/// A running `volley serve`, killed when dropped; its stderr goes to a file in the
/// test's directory.
pub struct Daemon {
    child: Child,
    stderr: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `volley serve ARGS`, its stderr in `dir`, and waits (at most
    /// READY_LIMIT) for its readiness line.
    pub fn start(dir: &Path, args: &[String]) -> Daemon {
        let mut c = Command::new(VOLLEY);
        c.arg("serve").args(args);
        Daemon::spawn(dir, c)
    }

    /// As `start`, under `umask` (through `sh`, see `volley_under_umask`).
    pub fn start_under_umask(dir: &Path, umask: &str, args: &[String]) -> Daemon {
        let mut c = volley_under_umask(umask);
        c.arg("serve").args(args);
        Daemon::spawn(dir, c)
    }

    /// Runs `serve` (a `volley serve` command line, as the caller built it) as `start`
    /// does.
    pub fn spawn(dir: &Path, mut serve: Command) -> Daemon {
        let stderr = dir.join(format!("serve-{}.stderr", fastrand::u32(..)));
        let mut child = serve
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("volley serve: ready") {
                    let _ = tx.send(());
                }
            }
        });
        let d = Daemon { child, stderr };
        if rx.recv_timeout(READY_LIMIT).is_err() {
            panic!(
                "volley serve did not say it was ready; stderr:\n{}",
                d.stderr()
            );
        }
        d
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal `sig` (libc::SIGHUP, ...) to the daemon.
    pub fn signal(&self, sig: i32) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits at most `limit` for the daemon to exit; its status code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM, then waits at most STOP_LIMIT for the exit; the whole stderr.
    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        self.wait_exit(STOP_LIMIT);
        self.stderr()
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (at most STDERR_LIMIT) until stderr holds `what`; the whole stderr.
    pub fn wait_stderr(&self, what: &str) -> String {
        wait_for(
            STDERR_LIMIT,
            Duration::from_millis(50),
            || Some(self.stderr()).filter(|s| s.contains(what)),
            || format!("no `{what}` in stderr:\n{}", self.stderr()),
        )
    }

    /// Waits (at most TERMINAL_LIMIT) until the accounting log at `log` has a
    /// terminal record for `rcpt`; the first. A failure shows the daemon's stderr.
    pub fn wait_terminal(&self, log: &Path, rcpt: &str) -> serde_json::Value {
        wait_for(
            TERMINAL_LIMIT,
            Duration::from_millis(50),
            || {
                let lines = super::log_lines(log);
                super::terminal_by_rcpt(&lines)
                    .remove(rcpt)
                    .map(|t| t[0].clone())
            },
            || {
                format!(
                    "no outcome for {rcpt} in {}; stderr:\n{}",
                    log.display(),
                    self.stderr()
                )
            },
        )
    }
}

/// A plain SMTP client that reads whole (multi-line) replies.
pub struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    /// Connects to `addr`; the client and the server's greeting.
    pub fn connect(addr: SocketAddr) -> (Client, String) {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(SMTP_REPLY_LIMIT)).unwrap();
        let mut c = Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let greeting = c.reply();
        (c, greeting)
    }

    /// The next whole reply (RFC 5321 §4.2.1: lines with `-` after the code go on);
    /// what was read when the server closes.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap() == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    /// Writes `bytes` as they are (pipelined commands, message content).
    pub fn send(&mut self, bytes: &str) {
        self.w.write_all(bytes.as_bytes()).unwrap();
    }

    /// Writes `bytes` as they are; the error, for a test that expects the server to
    /// close the connection.
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.w.write_all(bytes)
    }

    /// Writes `line` with its CRLF; the whole reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n"));
        self.reply()
    }
}

/// One HTTP/1.1 request over a fresh connection, with a bearer `token` if given;
/// (status, head, body), the head without the blank line that ends it.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(HTTP_LIMIT)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (status, head.to_string(), body.to_string())
}

/// A background `volley` process (a `send`), killed if the test fails before it
/// ends: an orphan would hold the spool, and every descriptor the test harness had
/// (a build lock among them).
pub struct Run(pub Option<Child>);

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Run {
    /// Sends signal `sig` (libc::SIGINT, ...) to the process.
    pub fn signal(&self, sig: i32) {
        let pid = self.0.as_ref().expect("running").id() as i32;
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(pid, sig) };
    }
}
