//! Faults a receiver throws, each survived: a server that never greets, stalls at a
//! command, answers garbage, or splits replies across reads; DNS that never answers.
//! Nothing hangs, nothing is lost, every recipient reaches one terminal outcome.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::time::Duration;
use volley::policy::shaping::rules::Set;
use volley::smtp::client::Timeouts;

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    NoGreeting,
    /// Never answer this command (upper-case verb).
    StallAt(&'static str),
    /// Answer this command with something that is not SMTP.
    GarbageAt(&'static str),
    /// Behave, but write every reply one byte at a time, with multi-line replies.
    Split,
    /// Refuse at greeting with a 421.
    Greet421,
}

/// A scripted receiver on `ip`:`port`, one thread per connection, bounded by the test's life.
fn scripted(ip: &str, port: u16, fault: Fault) {
    let l = TcpListener::bind((ip, port)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve(s, fault));
        }
    });
}

fn serve(s: TcpStream, fault: Fault) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let say = |w: &mut TcpStream, text: &str| {
        if fault == Fault::Split {
            for b in text.as_bytes() {
                let _ = w.write_all(&[*b]);
                let _ = w.flush();
                std::thread::sleep(Duration::from_micros(50));
            }
        } else {
            let _ = w.write_all(text.as_bytes());
        }
    };
    if fault == Fault::NoGreeting {
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
        return;
    }
    if fault == Fault::Greet421 {
        say(&mut w, "421 4.7.0 Too busy, try another MX\r\n");
        return;
    }
    say(&mut w, "220-scripted.test ESMTP\r\n220 at your service\r\n");
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        if fault == Fault::StallAt(static_verb(&verb)) {
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
            return;
        }
        if fault == Fault::GarbageAt(static_verb(&verb)) {
            say(&mut w, "HTTP/1.1 400 Bad Request\r\n");
            continue;
        }
        match verb.as_str() {
            "EHLO" => say(
                &mut w,
                "250-scripted.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SIZE 1000000\r\n",
            ),
            "MAIL" => say(&mut w, "250-2.1.0 sender\r\n250 2.1.0 ok\r\n"),
            "RCPT" | "RSET" | "NOOP" => say(&mut w, "250 2.1.5 ok\r\n"),
            "BDAT" => {
                let n: usize = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let mut chunk = vec![0; n];
                if r.read_exact(&mut chunk).is_err() {
                    return;
                }
                say(&mut w, "250-2.0.0 queued\r\n250 2.0.0 as 42\r\n");
            }
            "QUIT" => {
                say(&mut w, "221 2.0.0 bye\r\n");
                return;
            }
            _ => say(&mut w, "502 5.5.2 what\r\n"),
        }
    }
}

fn static_verb(v: &str) -> &'static str {
    match v {
        "EHLO" => "EHLO",
        "MAIL" => "MAIL",
        "RCPT" => "RCPT",
        "BDAT" => "BDAT",
        _ => "",
    }
}

/// Routes `domain` to a scripted server on `ip` (the sink's port) and sends one recipient.
fn run_fault(name: &str, ip: &str, fault: Fault) -> Vec<serde_json::Value> {
    let env = env(name, "");
    scripted(ip, env.sink.port(), fault);
    let domain = format!("{name}.fault.test");
    let host = format!("mx.{domain}");
    {
        let mut z = env.dns.zone.write().unwrap();
        z.set_mx(&domain, vec![(10, host.clone())]);
        z.set_a(&host, ip.parse::<IpAddr>().unwrap());
    }
    let c = campaign(
        &env.dir,
        name,
        "expire_after = \"3s\"",
        &[format!("a@{domain},Ann"), "b@gmail.com,Bob".into()],
    );
    let mut cfg = env.config();
    let t = Duration::from_millis(400);
    cfg.timeouts = Timeouts {
        greeting: t,
        ehlo: t,
        mail: t,
        rcpt: t,
        data: t,
        data_end: t,
        rset: t,
        quit: t,
    };
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(300)]);
    cfg.defaults.idle_timeout = Some(Set::cli(Duration::from_millis(200)));
    cfg.requeues_max = 1;
    let log = cfg.log_path.clone();
    let started = std::time::Instant::now();
    let r = env.send(&c, cfg);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{name}: took {:?}",
        started.elapsed()
    );
    assert_eq!(r.remaining, 0, "{name}");
    let lines = log_lines(&log);
    let t = terminal_by_rcpt(&lines);
    assert_eq!(t.len(), 2, "{name}: {t:?}");
    assert!(
        t.values().all(|v| v.len() == 1),
        "{name}: one terminal outcome each"
    );
    assert_eq!(
        t["b@gmail.com"][0]["type"], "Delivery",
        "{name}: other destinations unaffected"
    );
    lines
        .into_iter()
        .filter(|l| l["rcpt"] == format!("a@{domain}"))
        .collect()
}

fn expired_with(lines: &[serde_json::Value], reason: &str) {
    assert_eq!(lines.last().unwrap()["type"], "Expiration", "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "TransientFailure"
                && l["reply"].as_str().unwrap().contains(reason)),
        "no deferral mentioning {reason:?}: {lines:?}"
    );
}

#[test]
fn server_that_never_greets() {
    let lines = run_fault("nogreet", "127.0.0.41", Fault::NoGreeting);
    expired_with(&lines, "timeout waiting for the greeting");
}

#[test]
fn stall_at_mail_rcpt_and_content() {
    for (name, ip, verb) in [
        ("stallmail", "127.0.0.42", "MAIL"),
        ("stallrcpt", "127.0.0.43", "RCPT"),
        ("stallbdat", "127.0.0.44", "BDAT"),
    ] {
        let lines = run_fault(name, ip, Fault::StallAt(verb));
        expired_with(&lines, "timeout waiting for the");
    }
}

#[test]
fn stall_at_ehlo_tries_as_a_failed_host() {
    let lines = run_fault("stallehlo", "127.0.0.45", Fault::StallAt("EHLO"));
    expired_with(&lines, "timeout waiting for the reply to Extended HELLO");
}

#[test]
fn garbage_replies() {
    let lines = run_fault("garbage", "127.0.0.46", Fault::GarbageAt("MAIL"));
    expired_with(&lines, "protocol error: malformed reply line");
}

#[test]
fn multiline_replies_split_across_reads_still_deliver() {
    let lines = run_fault("split", "127.0.0.47", Fault::Split);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "Delivery");
    assert_eq!(lines[0]["reply"], "queued as 42");
}

#[test]
fn dns_that_never_answers() {
    let env = env("dnstimeout", "");
    let c = campaign(
        &env.dir,
        "dnst",
        "expire_after = \"2s\"",
        &["a@timeout.edge.test,Ann".into()],
    );
    let mut cfg = env.config();
    // A short timeout of its own: the timeout is what this test is about.
    cfg.dns.timeout = Duration::from_millis(300);
    cfg.dns.attempts = 1;
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(300)]);
    let log = cfg.log_path.clone();
    let r = env.send(&c, cfg);
    assert_eq!((r.expired, r.remaining), (1, 0));
    let lines = log_lines(&log);
    let deferral = lines
        .iter()
        .find(|l| l["type"] == "TransientFailure")
        .unwrap_or_else(|| panic!("no deferral: {lines:?}"));
    assert_eq!(
        (deferral["stage"].as_str(), deferral["enhanced"].as_str()),
        (Some("dns"), Some("4.4.3")),
        "{deferral}"
    );
    assert!(
        deferral["reply"].as_str().unwrap().contains("timed out"),
        "not a timeout: {deferral}"
    );
}

#[test]
fn a_421_at_greeting_moves_on_to_the_next_mx() {
    let env = env("greet421", "");
    scripted("127.0.0.48", env.sink.port(), Fault::Greet421);
    {
        let mut z = env.dns.zone.write().unwrap();
        z.set_mx(
            "busy.fault.test",
            vec![
                (10, "mx1.busy.fault.test".into()),
                (20, "mx.tail.sink.test".into()),
            ],
        );
        z.set_a("mx1.busy.fault.test", "127.0.0.48".parse().unwrap());
    }
    let c = campaign(&env.dir, "greet421", "", &["a@busy.fault.test,Ann".into()]);
    let cfg = env.config();
    let log = cfg.log_path.clone();
    let r = env.send(&c, cfg);
    assert_eq!(r.delivered, 1);
    let lines = log_lines(&log);
    assert_eq!(
        lines.len(),
        1,
        "no deferral: the second MX took it at once: {lines:?}"
    );
    assert_eq!(lines[0]["mx"], "mx.tail.sink.test");
}
