//! What README's TLS section promises, against scripted receivers on loopback that
//! record every command they are sent before TLS: `--tls required` never sends in
//! clear (a host without STARTTLS, one that refuses it, a HELO-only host, a failed
//! handshake are deferrals of class `policy`, 4.7.4 / 4.7.5), opportunistic TLS retries
//! a failed handshake once in clear on the same host, and tuning/providers.toml's
//! `tls = "required"` for Google applies with no `--tls` given.
//!
//! The receivers never speak TLS, so every command they record went in clear: a MAIL,
//! RCPT, DATA or BDAT among them under `required` is mail sent in clear.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use volley::policy::shaping::rules::Set;
use volley::smtp::client::TlsMode;

/// What the scripted receiver does about TLS.
#[derive(Clone, Copy, PartialEq)]
enum Tls {
    /// EHLO lists no STARTTLS.
    NotOffered,
    /// EHLO lists STARTTLS; STARTTLS gets `454 4.7.0 TLS not available` (RFC 3207 §4).
    Refused,
    /// `502` to EHLO, `250` to HELO: an RFC 821 server, no extensions at all.
    HeloOnly,
    /// STARTTLS gets `220`; the ClientHello is answered with bytes that are not TLS
    /// (a broken middlebox), then the connection closes.
    BrokenHandshake,
}

/// Every command line each connection sent, in the order the connections came.
#[derive(Default)]
struct Seen {
    conns: Mutex<Vec<Vec<String>>>,
}

/// Commands that carry mail.
const MAIL_VERBS: [&str; 4] = ["MAIL", "RCPT", "DATA", "BDAT"];

impl Seen {
    fn conns(&self) -> Vec<Vec<String>> {
        self.conns.lock().unwrap().clone()
    }

    /// Command lines, over every connection, whose verb is one of `verbs`.
    fn with_verbs(&self, verbs: &[&str]) -> Vec<String> {
        self.conns()
            .into_iter()
            .flatten()
            .filter(|l| verbs.contains(&verb(l).as_str()))
            .collect()
    }
}

fn verb(line: &str) -> String {
    line.split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

/// Starts the receiver on `ip`:`port`; its threads end with the test process.
fn receiver(ip: &str, port: u16, tls: Tls) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let l = TcpListener::bind((ip, port)).unwrap();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let seen = s2.clone();
            let idx = {
                let mut c = seen.conns.lock().unwrap();
                c.push(Vec::new());
                c.len() - 1
            };
            std::thread::spawn(move || serve(s, tls, &seen, idx));
        }
    });
    seen
}

fn serve(s: TcpStream, tls: Tls, seen: &Seen, idx: usize) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let say = |w: &mut TcpStream, text: &str| {
        let _ = w.write_all(text.as_bytes());
    };
    say(&mut w, "220 scripted.test ESMTP\r\n");
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        seen.conns.lock().unwrap()[idx].push(line.clone());
        match verb(&line).as_str() {
            "EHLO" if tls == Tls::HeloOnly => say(&mut w, "502 5.5.2 command not recognized\r\n"),
            "EHLO" if tls == Tls::NotOffered => say(
                &mut w,
                "250-scripted.test\r\n250-PIPELINING\r\n250 SIZE 10000000\r\n",
            ),
            "EHLO" => say(
                &mut w,
                "250-scripted.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 SIZE 10000000\r\n",
            ),
            "HELO" => say(&mut w, "250 scripted.test\r\n"),
            "STARTTLS" if tls == Tls::BrokenHandshake => {
                say(&mut w, "220 2.0.0 Ready to start TLS\r\n");
                // Wait for the ClientHello so the client reads the garbage as the
                // server's first TLS record, not as part of the 220.
                let mut hello = [0u8; 512];
                let _ = r.read(&mut hello);
                say(&mut w, "HTTP/1.1 400 Bad Request\r\n\r\n");
                return;
            }
            "STARTTLS" => say(&mut w, "454 4.7.0 TLS not available\r\n"),
            "MAIL" | "RCPT" | "RSET" | "NOOP" => say(&mut w, "250 2.0.0 ok\r\n"),
            "DATA" => {
                say(&mut w, "354 go ahead\r\n");
                loop {
                    let mut l = Vec::new();
                    if r.read_until(b'\n', &mut l).unwrap_or(0) == 0 {
                        return;
                    }
                    if l == b".\r\n" {
                        break;
                    }
                }
                say(&mut w, "250 2.0.0 queued\r\n");
            }
            "QUIT" => {
                say(&mut w, "221 2.0.0 bye\r\n");
                return;
            }
            _ => say(&mut w, "502 5.5.2 command not recognized\r\n"),
        }
    }
}

/// Routes `domain` through MX `host` to `ip` (the sink's port, where the receiver listens).
fn route(env: &Env, domain: &str, host: &str, ip: &str) {
    let mut z = env.dns.zone.write().unwrap();
    z.set_mx(domain, vec![(10, host.to_string())]);
    z.set_a(host, ip.parse::<IpAddr>().unwrap());
}

/// Sends `a@DOMAIN` (the scripted receiver on `ip`, behaving as `tls`) and
/// `b@shop3.tail.test` (the sink, which offers STARTTLS) under `mode`, one shard.
/// Returns the report, the log's lines for `a@DOMAIN`, and what the receiver saw.
fn run(
    name: &str,
    ip: &str,
    tls: Tls,
    mode: TlsMode,
) -> (
    volley::deliver::engine::Report,
    Vec<serde_json::Value>,
    Arc<Seen>,
) {
    let env = env(name, "");
    let seen = receiver(ip, env.sink.port(), tls);
    let domain = format!("{name}.tls.test");
    route(&env, &domain, &format!("mx.{domain}"), ip);
    let c = campaign(
        &env.dir,
        name,
        "expire_after = \"4s\"",
        &[format!("a@{domain},Ann"), "b@shop3.tail.test,Bob".into()],
    );
    let mut cfg = env.config();
    // One shard: the connections to the receiver come one after another.
    cfg.shards = 1;
    cfg.defaults.tls = Some(Set::cli(mode));
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(500)]);
    let log = cfg.log_path.clone();
    let r = env.send(&c, cfg);
    let lines = log_lines(&log);
    let t = terminal_by_rcpt(&lines);
    assert_eq!(
        t["b@shop3.tail.test"][0]["type"], "Delivery",
        "{name}: the other destination is unaffected: {lines:?}"
    );
    let mine = lines
        .into_iter()
        .filter(|l| l["rcpt"] == format!("a@{domain}"))
        .collect();
    (r, mine, seen)
}

/// Under `required`: the receiver was sent no mail command at all, each connection
/// saw `expect` (its command verbs in order), and `a@` was deferred, every deferral
/// and the expiry of class `policy` with `enhanced`.
fn never_in_clear(
    lines: &[serde_json::Value],
    seen: &Seen,
    enhanced: &str,
    reason: &str,
    expect: &[&str],
) {
    // The wire first: what the receiver was sent is the claim.
    assert_eq!(
        seen.with_verbs(&MAIL_VERBS),
        Vec::<String>::new(),
        "mail sent in clear"
    );
    let conns = seen.conns();
    assert!(!conns.is_empty(), "the receiver was never tried");
    for c in &conns {
        let verbs: Vec<String> = c.iter().map(|l| verb(l)).collect();
        assert_eq!(verbs, expect, "{conns:?}");
    }
    let deferrals: Vec<_> = lines
        .iter()
        .filter(|l| l["type"] == "TransientFailure")
        .collect();
    assert!(!deferrals.is_empty(), "{lines:?}");
    for l in deferrals {
        assert_eq!(l["class"], "policy", "{l}");
        assert_eq!(l["code"], 451, "{l}");
        assert_eq!(l["enhanced"], enhanced, "{l}");
        assert!(l["reply"].as_str().unwrap().contains(reason), "{l}");
    }
    // The expiry carries the last attempt's reply and class.
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "Expiration", "{lines:?}");
    assert_eq!(
        (&last["class"], &last["enhanced"]),
        (&"policy".into(), &enhanced.into()),
        "{last}"
    );
}

#[test]
fn required_and_starttls_refused_is_a_policy_deferral_with_nothing_sent() {
    let (r, lines, seen) = run("refused", "127.0.0.81", Tls::Refused, TlsMode::Required);
    // A session that can carry no mail ends with QUIT (README, connection handling).
    never_in_clear(
        &lines,
        &seen,
        "4.7.4",
        "TLS is required and STARTTLS was refused: 454 4.7.0 TLS not available",
        &["EHLO", "STARTTLS", "QUIT"],
    );
    assert_eq!((r.delivered, r.expired), (1, 1));
}

#[test]
fn required_and_helo_only_is_a_policy_deferral_with_nothing_sent() {
    let (r, lines, seen) = run("heloonly", "127.0.0.82", Tls::HeloOnly, TlsMode::Required);
    never_in_clear(
        &lines,
        &seen,
        "4.7.4",
        "TLS is required and the server refused Extended HELLO, so offers no STARTTLS",
        &["EHLO", "HELO", "QUIT"],
    );
    assert_eq!((r.delivered, r.expired), (1, 1));
}

#[test]
fn required_and_no_starttls_offered_is_a_policy_deferral_with_nothing_sent() {
    let (r, lines, seen) = run(
        "nostarttls",
        "127.0.0.83",
        Tls::NotOffered,
        TlsMode::Required,
    );
    never_in_clear(
        &lines,
        &seen,
        "4.7.4",
        "TLS is required and the server does not offer STARTTLS",
        &["EHLO", "QUIT"],
    );
    assert_eq!((r.delivered, r.expired), (1, 1));
}

#[test]
fn required_and_a_failed_handshake_is_a_policy_deferral_never_retried_in_clear() {
    let (r, lines, seen) = run(
        "brokenreq",
        "127.0.0.84",
        Tls::BrokenHandshake,
        TlsMode::Required,
    );
    // The receiver closes after the garbage: no QUIT.
    never_in_clear(
        &lines,
        &seen,
        "4.7.5",
        "TLS (STARTTLS) is required for this destination",
        &["EHLO", "STARTTLS"],
    );
    assert_eq!((r.delivered, r.expired), (1, 1));
}

#[test]
fn opportunistic_retries_a_failed_handshake_once_in_clear() {
    let (r, lines, seen) = run(
        "brokenopp",
        "127.0.0.85",
        Tls::BrokenHandshake,
        TlsMode::Opportunistic,
    );
    let conns = seen.conns();
    assert_eq!(conns.len(), 2, "{conns:?}");
    let verbs = |c: &[String]| c.iter().map(|l| verb(l)).collect::<Vec<_>>();
    assert_eq!(verbs(&conns[0]), ["EHLO", "STARTTLS"], "{conns:?}");
    // The second connection does not try STARTTLS again, though it is offered.
    assert_eq!(
        verbs(&conns[1]),
        ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"],
        "{conns:?}"
    );
    assert_eq!((r.delivered, r.expired), (2, 0));
    // Delivered once, with no deferral before it, and logged as sent in clear.
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "Delivery", "{lines:?}");
    assert!(lines[0].get("tls").is_none(), "{}", lines[0]);
}

/// tuning/providers.toml (compiled in) says `tls = "required"` for MX hosts under
/// google.com; no `--tls` is given. gmail.com's MX, under google.com, offers no
/// STARTTLS: nothing goes to it. The same receiver as the MX of a domain no provider
/// rule names takes its mail in clear (opportunistic, the shipped default).
#[test]
fn providers_toml_requires_tls_for_google_with_no_tls_flag() {
    let env = env("tls-providers", "");
    let ip = "127.0.0.86";
    let seen = receiver(ip, env.sink.port(), Tls::NotOffered);
    route(&env, "gmail.com", "gmail-smtp-in.l.google.com", ip);
    route(&env, "plain.tls.test", "mx.plain.tls.test", ip);
    let c = campaign(
        &env.dir,
        "tls-providers",
        "expire_after = \"4s\"",
        &["a@gmail.com,Ann".into(), "b@plain.tls.test,Bob".into()],
    );
    let mut cfg = env.config();
    cfg.shards = 1;
    assert!(cfg.defaults.tls.is_none() && cfg.shaping_file.is_none());
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(500)]);
    let log = cfg.log_path.clone();
    let r = env.send(&c, cfg);
    // One transaction, plain.tls.test's; gmail.com's connections said EHLO and QUIT.
    let rcpts = seen.with_verbs(&["RCPT"]);
    assert_eq!(rcpts.len(), 1, "gmail.com in clear: {rcpts:?}");
    assert!(rcpts[0].contains("<b@plain.tls.test>"), "{rcpts:?}");
    assert_eq!(seen.with_verbs(&MAIL_VERBS).len(), 3, "MAIL, RCPT, DATA");
    let conns = seen.conns();
    let idle = conns.iter().filter(|c| c.len() == 2).count();
    assert!(idle >= 1, "gmail.com was tried: {conns:?}");
    let lines = log_lines(&log);
    let t = terminal_by_rcpt(&lines);
    assert_eq!(t["b@plain.tls.test"][0]["type"], "Delivery", "{lines:?}");
    let gmail: Vec<_> = lines
        .iter()
        .filter(|l| l["rcpt"] == "a@gmail.com")
        .collect();
    assert_eq!(gmail.last().unwrap()["type"], "Expiration", "{gmail:?}");
    for l in &gmail {
        assert_eq!(l["class"], "policy", "{l}");
        assert_eq!(l["enhanced"], "4.7.4", "{l}");
        let reply = l["reply"].as_str().unwrap();
        assert!(reply.contains("gmail-smtp-in.l.google.com"), "{l}");
        assert!(reply.contains("does not offer STARTTLS"), "{l}");
    }
    assert_eq!((r.delivered, r.expired), (1, 1));
}
