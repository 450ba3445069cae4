//! `[[webhook]]` end to end: a real daemon delivering to the bundled sink, its
//! accounting records POSTed to a receiver written here on loopback that fails on
//! purpose (500s, a connection reset, 503 for a while, a 4xx for good), across a
//! kill -9 and a restart, and across log rotations.

mod common;

use common::daemon::{base_args, write_config, Daemon, VOLLEY};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The HMAC secret the tests' webhooks sign with.
const SECRET: &str = "0123456789abcdef0123456789abcdef";
/// How long every record may take to reach the receiver.
const ARRIVAL_LIMIT: Duration = Duration::from_secs(60);
/// Largest request head the receiver reads.
const HEAD_OCTETS_MAX: usize = 64 << 10;
/// Largest request body the receiver reads.
const BODY_OCTETS_MAX: usize = 16 << 20;

/// One request the receiver got, and what it answered.
#[derive(Clone, Debug)]
struct Got {
    status: u16,
    records: Vec<serde_json::Value>,
    signed: bool,
    content_type: String,
}

/// What the receiver answers next.
#[derive(Default)]
struct Script {
    /// This many 500s first...
    errors: AtomicUsize,
    /// ...then this many connections reset without an answer...
    resets: AtomicUsize,
    /// ...then this status while not 0 (503: a receiver down; 400: one that rejects),
    /// else 200.
    status: AtomicU16,
}

/// An HTTP/1.1 receiver on loopback: one request per connection, each answered as
/// its script says, every request kept.
struct Receiver {
    addr: SocketAddr,
    script: Arc<Script>,
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Receiver {
    fn start(script: Script) -> Receiver {
        Receiver::start_with(script, None)
    }

    /// As `start`, speaking HTTPS with `tls` when given.
    fn start_with(script: Script, tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let r = Receiver {
            addr: listener.local_addr().unwrap(),
            script: Arc::new(script),
            got: Arc::default(),
            stop: Arc::default(),
        };
        let (script, got, stop) = (r.script.clone(), r.got.clone(), r.stop.clone());
        std::thread::spawn(move || {
            // Bounded by the test: its Drop stops it.
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => serve(s, tls.clone(), &script, &got),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        r
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// The records acknowledged (answered 200), in the order they came.
    fn accepted(&self) -> Vec<serde_json::Value> {
        self.got()
            .into_iter()
            .filter(|g| g.status == 200)
            .flat_map(|g| g.records)
            .collect()
    }

    /// Waits (at most ARRIVAL_LIMIT) until every (type, rcpt) in `want` was
    /// acknowledged.
    fn wait_for(&self, want: &HashSet<(String, String)>, d: &Daemon) {
        let until = Instant::now() + ARRIVAL_LIMIT;
        loop {
            let have: HashSet<(String, String)> = self.accepted().iter().map(key).collect();
            let missing: Vec<_> = want.difference(&have).collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < until,
                "{} record(s) never arrived, e.g. {:?}; stderr:\n{}",
                missing.len(),
                &missing[..missing.len().min(3)],
                d.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A record's type and recipient.
fn key(r: &serde_json::Value) -> (String, String) {
    (
        r["type"].as_str().unwrap_or("").to_string(),
        r["rcpt"].as_str().unwrap_or("").to_string(),
    )
}

/// A connection, plain or TLS.
trait Io: Read + Write {}
impl<T: Read + Write> Io for T {}

/// Reads one request from `tcp` (over TLS with `tls`) and answers it as the script
/// says.
fn serve(
    tcp: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    script: &Script,
    got: &Mutex<Vec<Got>>,
) {
    tcp.set_nonblocking(false).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let raw = tcp.try_clone().unwrap();
    let mut s: Box<dyn Io> = match tls {
        Some(c) => Box::new(rustls::StreamOwned::new(
            rustls::ServerConnection::new(c).unwrap(),
            tcp,
        )),
        None => Box::new(tcp),
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        assert!(buf.len() < HEAD_OCTETS_MAX, "request head too long");
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let len: usize = header("content-length").parse().unwrap();
    assert!(len <= BODY_OCTETS_MAX, "{len}");
    while buf.len() < head_end + len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = &buf[head_end..head_end + len];
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let signed = header("x-volley-signature")
        .strip_prefix("sha256=")
        .and_then(|h| {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()
        })
        .is_some_and(|tag| ring::hmac::verify(&key, body, &tag).is_ok());
    let take = |n: &AtomicUsize| {
        n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
            .is_ok()
    };
    let status = if take(&script.errors) {
        500
    } else if take(&script.resets) {
        // RST, not FIN: the client sees its connection reset with no answer.
        socket2::SockRef::from(&raw)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        got.lock().unwrap().push(Got {
            status: 0,
            records: Vec::new(),
            signed,
            content_type: header("content-type"),
        });
        return;
    } else {
        match script.status.load(Ordering::Relaxed) {
            0 => 200,
            s => s,
        }
    };
    let records: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
    got.lock().unwrap().push(Got {
        status,
        records,
        signed,
        content_type: header("content-type"),
    });
    let _ = write!(
        s,
        "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno"
    );
    let _ = s.flush();
}

/// A webhook config: the secret file written 0600 beside it.
fn config(dir: &Path, url: &str, extra: &str) -> String {
    let secret = dir.join("hook.hmac");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    format!(
        "{extra}\n[[webhook]]\nname = \"crm\"\nurl = \"{url}\"\nbatch_size = 10\nbatch_wait = \"200ms\"\nretry_wait_max = \"1s\"\ntimeout = \"5s\"\nhmac_secret_file = \"{}\"\n",
        secret.display()
    )
}

fn start(env: &common::Env, cfg: &Path) -> Daemon {
    let mut args = vec!["--config".into(), cfg.display().to_string()];
    args.extend(base_args(env, &env.dir.join("spool")));
    Daemon::start(&env.dir, &args)
}

/// Hands the campaign to the running daemon and waits for it to finish.
fn hand_over(env: &common::Env, id: &str, n: usize) -> Vec<String> {
    let rcpts: Vec<String> = (0..n).map(|i| format!("{id}{i}@gmail.com")).collect();
    let rows: Vec<String> = rcpts.iter().map(|r| format!("{r},N")).collect();
    let c = common::campaign(&env.dir, id, "", &rows);
    let out = Command::new(VOLLEY)
        .arg("send")
        .arg(&c)
        .args(["--quiet", "--spool"])
        .arg(env.dir.join("spool"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    rcpts
}

/// The (type, rcpt) of every record of type `kind` in the daemon's log, all
/// generations.
fn logged(env: &common::Env, kind: &str) -> HashSet<(String, String)> {
    common::log_lines(&env.dir.join("spool/accounting.jsonl"))
        .iter()
        .filter(|r| r["type"] == kind)
        .map(key)
        .collect()
}

fn want(kinds: &[&str], rcpts: &[String]) -> HashSet<(String, String)> {
    kinds
        .iter()
        .flat_map(|k| rcpts.iter().map(move |r| (k.to_string(), r.clone())))
        .collect()
}

#[test]
fn records_arrive_signed_through_500s_and_a_reset_each_at_least_once() {
    // Some recipients bounce; the webhook wants only the bounces.
    let env = common::env("webhook-flaky", "rcpt_permfail = 0.3");
    let r = Receiver::start(Script {
        errors: AtomicUsize::new(3),
        resets: AtomicUsize::new(1),
        ..Script::default()
    });
    let cfg = write_config(
        &env.dir,
        &config(&env.dir, &r.url(), "")
            .replace("batch_size = 10", "batch_size = 10\nevents = [\"Bounce\"]"),
    );
    let d = start(&env, &cfg);
    hand_over(&env, "flaky", 40);
    let bounced = logged(&env, "Bounce");
    assert!(!bounced.is_empty() && !logged(&env, "Delivery").is_empty());
    r.wait_for(&bounced, &d);
    let got = r.got();
    let statuses: Vec<u16> = got.iter().map(|g| g.status).take(5).collect();
    assert_eq!(
        statuses,
        [500, 500, 500, 0, 200],
        "500s, a reset, then accepted"
    );
    for g in &got {
        assert!(g.signed, "every POST carries a valid X-Volley-Signature");
        assert_eq!(g.content_type, "application/json");
        assert!(g.records.len() <= 10, "batch_size");
        for rec in &g.records {
            assert_eq!(rec["type"], "Bounce", "events: no Delivery records");
        }
    }
    // The failed batch was the one accepted after them: sent again, not skipped.
    assert_eq!(got[0].records, got[4].records);
    let said = d.stop();
    assert!(said.contains("webhook crm: POST of"), "{said}");
    assert!(said.contains("500 X"), "{said}");
    assert!(
        said.contains("delivered after 4 failed attempt(s)"),
        "{said}"
    );
    assert!(
        said.contains("webhook crm: posted ")
            && said.contains("4 failed attempt(s), 0 record(s) dead-lettered"),
        "{said}"
    );
    let cursor = env.dir.join("spool/webhooks/crm.cursor");
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(cursor).unwrap()).unwrap();
    assert!(c["offset"].as_u64().unwrap() > 0, "{c}");
}

#[test]
fn a_kill_9_mid_stream_loses_nothing_and_resends_nothing_acknowledged() {
    let env = common::env("webhook-kill", "");
    let r = Receiver::start(Script::default());
    let cfg = write_config(&env.dir, &config(&env.dir, &r.url(), ""));
    let d = start(&env, &cfg);
    let first = hand_over(&env, "before", 20);
    r.wait_for(&want(&["Delivery"], &first), &d);
    // The receiver goes down; what is logged now waits in the log.
    r.script.status.store(503, Ordering::Relaxed);
    let second = hand_over(&env, "during", 20);
    let acked_before = r.accepted();
    let until = Instant::now() + ARRIVAL_LIMIT;
    while !r.got().iter().any(|g| g.status == 503) {
        assert!(Instant::now() < until, "no POST while down: {}", d.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    d.signal(libc::SIGKILL);
    // Reaped (its spool lock gone with it) before the next start.
    drop(d);
    r.script.status.store(0, Ordering::Relaxed);
    let d = start(&env, &cfg);
    let third = hand_over(&env, "after", 20);
    let all: Vec<String> = first.iter().chain(&second).chain(&third).cloned().collect();
    r.wait_for(&want(&["Delivery"], &all), &d);
    // Acknowledged before the kill: never sent again (the cursor moved after each 2xx,
    // and the kill came while the next batch was refused).
    let acked: HashSet<_> = acked_before.iter().map(key).collect();
    let again: Vec<_> = r.accepted()[acked_before.len()..]
        .iter()
        .map(key)
        .filter(|k| acked.contains(k))
        .collect();
    assert!(again.is_empty(), "sent again: {again:?}");
    let mut times: HashMap<(String, String), usize> = HashMap::new();
    for k in r.accepted().iter().map(key) {
        *times.entry(k).or_default() += 1;
    }
    assert!(times.values().all(|n| *n == 1), "each once: {times:?}");
    d.stop();
}

#[test]
fn a_webhook_behind_the_log_follows_it_through_rotations_and_a_restart() {
    let env = common::env("webhook-rotation", "");
    let r = Receiver::start(Script {
        status: AtomicU16::new(503),
        ..Script::default()
    });
    let cfg = write_config(
        &env.dir,
        &config(&env.dir, &r.url(), "log_rotate_size = \"64KiB\"")
            .replace("batch_size = 10", "batch_size = 50"),
    );
    let d = start(&env, &cfg);
    let rcpts = hand_over(&env, "rot", 1000);
    let spool = env.dir.join("spool");
    let rotated = || {
        std::fs::read_dir(&spool)
            .unwrap()
            .filter(|e| {
                let n = e
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .into_owned();
                n.starts_with("accounting.jsonl.") && n.ends_with(".gz")
            })
            .count()
    };
    let until = Instant::now() + ARRIVAL_LIMIT;
    while rotated() < 3 {
        assert!(
            Instant::now() < until,
            "not rotated and compressed: {}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Stopped while the receiver is down and every record is behind it, in gzipped
    // generations; then the receiver is back and the daemon starts again.
    d.stop();
    r.script.status.store(0, Ordering::Relaxed);
    let d = start(&env, &cfg);
    r.wait_for(&want(&["Delivery"], &rcpts), &d);
    let said = d.stop();
    assert!(!said.contains("is gone"), "{said}");
    let mut times: HashMap<(String, String), usize> = HashMap::new();
    for k in r.accepted().iter().map(key) {
        *times.entry(k).or_default() += 1;
    }
    assert!(times.values().all(|n| *n == 1), "each once");
}

#[test]
fn a_batch_rejected_with_a_4xx_goes_to_the_dead_letter_file_and_the_next_goes_on() {
    let env = common::env("webhook-dead", "");
    let r = Receiver::start(Script {
        status: AtomicU16::new(400),
        ..Script::default()
    });
    // With the HTTP listener, for the webhook's figures in /metrics.
    let (tokens, token) = common::daemon::add_token(&env.dir);
    let api: SocketAddr = format!("127.0.0.1:{}", common::daemon::free_port())
        .parse()
        .unwrap();
    let http = format!(
        "tokens = \"{}\"\n[http]\nlisten = \"{api}\"",
        tokens.display()
    );
    let cfg = write_config(
        &env.dir,
        &config(&env.dir, &r.url(), &http)
            .replace(
                "batch_size = 10",
                "batch_size = 10\nevents = [\"Delivery\"]",
            )
            .replace("\"200ms\"", "\"2s\""),
    );
    let d = start(&env, &cfg);
    let rcpts = hand_over(&env, "dead", 5);
    let dead = env.dir.join("spool/webhooks/crm.dead.jsonl");
    let until = Instant::now() + ARRIVAL_LIMIT;
    let lines = loop {
        let text = std::fs::read_to_string(&dead).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= rcpts.len() {
            break lines;
        }
        assert!(Instant::now() < until, "not dead-lettered: {}", d.stderr());
        std::thread::sleep(Duration::from_millis(50));
    };
    let got: HashSet<_> = lines.iter().map(key).collect();
    assert_eq!(got, want(&["Delivery"], &rcpts));
    let got = r.got();
    assert!(
        !got.is_empty() && got.len() % 5 == 0 && got.iter().all(|g| g.status == 400),
        "each batch rejected five times, then dead-lettered: {got:?}"
    );
    let (code, _, metrics) = common::daemon::http(api, "GET", "/metrics", Some(&token), "");
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metrics.contains("volley_webhook_dead_lettered_records_total{webhook=\"crm\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("volley_webhook_failures_total{webhook=\"crm\"}"),
        "{metrics}"
    );
    let mode = std::fs::metadata(&dead).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // The receiver takes them again: the next records go on, the dead ones stay.
    r.script.status.store(0, Ordering::Relaxed);
    let more = hand_over(&env, "alive", 3);
    r.wait_for(&want(&["Delivery"], &more), &d);
    let said = d.stop();
    assert!(said.contains("rejected 5 times (400 X no)"), "{said}");
    assert!(said.contains(", 5 record(s) dead-lettered"), "{said}");
}

#[test]
fn an_https_receiver_with_a_private_ca_gets_the_records_with_ca_file() {
    let env = common::env("webhook-https", "");
    // A private CA, and the receiver's certificate for 127.0.0.1 signed by it.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let r = Receiver::start_with(Script::default(), Some(Arc::new(tls)));
    let ca_file = env.dir.join("crm-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let url = format!("https://{}/hook", r.addr);
    let cfg = write_config(
        &env.dir,
        &format!(
            "{}ca_file = \"{}\"\n",
            config(&env.dir, &url, ""),
            ca_file.display()
        ),
    );
    let d = start(&env, &cfg);
    let rcpts = hand_over(&env, "tls", 5);
    r.wait_for(&want(&["Delivery"], &rcpts), &d);
    assert!(r.got().iter().all(|g| g.signed && g.status == 200));
    d.stop();
    // Without ca_file the Mozilla roots do not know the CA: the POST fails, and says why.
    let cfg = write_config(&env.dir, &config(&env.dir, &url, ""));
    let d = start(&env, &cfg);
    hand_over(&env, "untrusted", 1);
    let said = d.wait_stderr("attempt 1 failed");
    assert!(said.contains("UnknownIssuer"), "{said}");
    d.stop();
}
