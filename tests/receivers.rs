//! Receivers that behave like real ones in the ways that catch a sender out: an idle
//! timeout that closes with 421, a cap on recipients per transaction, a cap of one
//! connection per client, no PIPELINING, no 8BITMIME. Each is a scripted server on
//! loopback that records every command it is sent, so the tests assert what went on
//! the wire, not only what the accounting log says.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use volley::shaping::rules::Set;

/// How the scripted receiver behaves.
#[derive(Clone)]
struct Quirks {
    /// Close a connection with `421 4.4.2` after this long without a command.
    idle_close: Option<Duration>,
    /// Recipients taken per transaction; the rest get `452 4.5.3`.
    rcpt_cap: Option<usize>,
    /// Connections open at once from everyone; more get `421 4.7.0` at the greeting.
    conn_cap: Option<usize>,
    pipelining: bool,
    chunking: bool,
    eightbitmime: bool,
    smtputf8: bool,
    /// Recipients whose local part starts with this get `550 5.1.1`.
    refuse_rcpt_prefix: &'static str,
    /// Answer every MAIL with `550 5.7.1`.
    refuse_mail: bool,
}

impl Default for Quirks {
    fn default() -> Self {
        Quirks {
            idle_close: None,
            rcpt_cap: None,
            conn_cap: None,
            pipelining: true,
            chunking: true,
            eightbitmime: true,
            smtputf8: false,
            refuse_rcpt_prefix: "nobody",
            refuse_mail: false,
        }
    }
}

/// What the receiver saw: every command line per connection, the messages it took,
/// and the most connections it had open at once.
#[derive(Default)]
struct Seen {
    /// One entry per connection, in the order they were accepted: the command lines
    /// (without CRLF), and whether the connection ended after a QUIT.
    conns: Mutex<Vec<(Vec<String>, bool)>>,
    messages: Mutex<Vec<Vec<u8>>>,
    open: AtomicUsize,
    open_max: AtomicUsize,
    refused_for_cap: AtomicUsize,
}

impl Seen {
    fn commands(&self) -> Vec<String> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(c, _)| c.clone())
            .collect()
    }
}

/// Starts the receiver on `ip`:`port`; threads end with the test process.
fn receiver(ip: &str, port: u16, q: Quirks) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let l = TcpListener::bind((ip, port)).unwrap();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (q, seen) = (q.clone(), s2.clone());
            let idx = {
                let mut c = seen.conns.lock().unwrap();
                c.push((Vec::new(), false));
                c.len() - 1
            };
            std::thread::spawn(move || {
                let open = seen.open.fetch_add(1, Ordering::SeqCst) + 1;
                if q.conn_cap.is_some_and(|cap| open > cap) {
                    seen.refused_for_cap.fetch_add(1, Ordering::SeqCst);
                    let mut w = s;
                    let _ = w.write_all(b"421 4.7.0 Too many connections from your host\r\n");
                    seen.open.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                seen.open_max.fetch_max(open, Ordering::SeqCst);
                if !serve(s, &q, &seen, idx) {
                    seen.open.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    });
    seen
}

/// Serves one connection; true when it ended with a QUIT, counted as closed before
/// the 221 (the client may connect again as soon as it reads it).
fn serve(s: TcpStream, q: &Quirks, seen: &Seen, idx: usize) -> bool {
    let limit = q.idle_close.unwrap_or(Duration::from_secs(20));
    s.set_read_timeout(Some(limit)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let say = |w: &mut TcpStream, text: &str| {
        let _ = w.write_all(text.as_bytes());
    };
    let record = |line: &str| seen.conns.lock().unwrap()[idx].0.push(line.to_string());
    say(&mut w, "220 quirky.test ESMTP\r\n");
    let mut rcpts = 0;
    let mut accepted = 0;
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(_) => {
                // The idle timeout: say so and close, as Postfix and Exim do.
                say(&mut w, "421 4.4.2 quirky.test Error: timeout exceeded\r\n");
                return false;
            }
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        record(&line);
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => {
                let mut caps = vec!["quirky.test", "SIZE 10000000"];
                for (on, kw) in [
                    (q.pipelining, "PIPELINING"),
                    (q.chunking, "CHUNKING"),
                    (q.eightbitmime, "8BITMIME"),
                    (q.smtputf8, "SMTPUTF8"),
                ] {
                    if on {
                        caps.push(kw);
                    }
                }
                let n = caps.len();
                let mut reply = String::new();
                for (i, c) in caps.iter().enumerate() {
                    let sep = if i + 1 == n { ' ' } else { '-' };
                    reply.push_str(&format!("250{sep}{c}\r\n"));
                }
                say(&mut w, &reply);
            }
            "MAIL" if q.refuse_mail => say(&mut w, "550 5.7.1 sender refused\r\n"),
            "MAIL" => {
                rcpts = 0;
                accepted = 0;
                say(&mut w, "250 2.1.0 ok\r\n");
            }
            "RCPT" => {
                rcpts += 1;
                let addr = line.split_once('<').map_or("", |(_, a)| a);
                if addr.starts_with(q.refuse_rcpt_prefix) {
                    say(&mut w, "550 5.1.1 no such user\r\n");
                } else if q.rcpt_cap.is_some_and(|cap| rcpts > cap) {
                    say(&mut w, "452 4.5.3 Error: too many recipients\r\n");
                } else {
                    accepted += 1;
                    say(&mut w, "250 2.1.5 ok\r\n");
                }
            }
            "RSET" | "NOOP" => say(&mut w, "250 2.0.0 ok\r\n"),
            "DATA" if accepted == 0 => say(&mut w, "503 5.5.1 Error: no valid recipients\r\n"),
            "DATA" => {
                say(&mut w, "354 go ahead\r\n");
                let mut msg = Vec::new();
                loop {
                    let mut l = Vec::new();
                    if r.read_until(b'\n', &mut l).unwrap_or(0) == 0 {
                        return false;
                    }
                    if l == b".\r\n" {
                        break;
                    }
                    let l = l.strip_prefix(b".").unwrap_or(&l);
                    msg.extend_from_slice(l);
                }
                seen.messages.lock().unwrap().push(msg);
                say(&mut w, "250 2.0.0 queued\r\n");
            }
            "BDAT" => {
                let n: usize = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let mut chunk = vec![0; n];
                if r.read_exact(&mut chunk).is_err() {
                    return false;
                }
                if accepted == 0 {
                    say(&mut w, "503 5.5.1 Error: no valid recipients\r\n");
                } else {
                    seen.messages.lock().unwrap().push(chunk);
                    say(&mut w, "250 2.0.0 queued\r\n");
                }
            }
            "QUIT" => {
                seen.conns.lock().unwrap()[idx].1 = true;
                seen.open.fetch_sub(1, Ordering::SeqCst);
                say(&mut w, "221 2.0.0 bye\r\n");
                return true;
            }
            _ => say(&mut w, "502 5.5.2 what\r\n"),
        }
    }
}

/// Routes `domain` to the receiver on `ip` (the sink's port); returns what it saw.
fn route(env: &Env, domain: &str, ip: &str, q: Quirks) -> Arc<Seen> {
    let seen = receiver(ip, env.sink.port(), q);
    let host = format!("mx.{domain}");
    let mut z = env.dns.zone.write().unwrap();
    z.set_mx(domain, vec![(10, host.clone())]);
    z.set_a(&host, ip.parse::<IpAddr>().unwrap());
    seen
}

/// Waits (bounded) for the receiver's connection threads to see their clients go.
fn settle(seen: &Seen) {
    let until = Instant::now() + Duration::from_secs(5);
    while seen.open.load(Ordering::SeqCst) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn deferrals(lines: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["type"] == "TransientFailure")
        .collect()
}

#[test]
fn a_connection_the_receiver_closed_while_idle_is_not_a_failed_attempt() {
    let env = env("idle421", "");
    let q = Quirks {
        idle_close: Some(Duration::from_millis(500)),
        ..Quirks::default()
    };
    let seen = route(&env, "idle.quirk.test", "127.0.0.61", q);
    let rows: Vec<String> = (0..3)
        .map(|i| format!("r{i}@idle.quirk.test,R{i}"))
        .collect();
    let c = campaign(&env.dir, "idle421", "max_msg_rate = \"1/s\"", &rows);
    let mut cfg = env.config();
    cfg.shards = 1;
    cfg.defaults.idle_timeout = Some(Set::cli(Duration::from_secs(10)));
    let log = cfg.log_path.clone();
    let r = env.send_for(Some(&c), cfg, Some(Duration::from_secs(20)));
    let lines = log_lines(&log);
    assert_eq!((r.delivered, r.remaining), (3, 0), "{lines:#?}");
    assert!(deferrals(&lines).is_empty(), "{lines:#?}");
    for l in &lines {
        assert_eq!(
            l["attempt"], 1,
            "no attempt counted for the idle close: {l}"
        );
    }
    settle(&seen);
    let conns = seen.conns.lock().unwrap();
    assert!(
        conns.len() >= 2,
        "the receiver closed idle connections, so new ones were opened: {conns:?}"
    );
}

#[test]
fn recipients_over_the_receivers_per_transaction_cap_go_at_once_in_the_next() {
    let env = env("rcptcap", "");
    let q = Quirks {
        rcpt_cap: Some(2),
        ..Quirks::default()
    };
    let seen = route(&env, "cap.quirk.test", "127.0.0.62", q);
    let rows: Vec<String> = (0..7)
        .map(|i| format!("r{i}@cap.quirk.test,R{i}"))
        .collect();
    // One message to many recipients: every copy the same.
    let c = campaign(&env.dir, "rcptcap", "max_rcpt_per_msg = 5", &rows);
    std::fs::write(
        c.join("message.eml"),
        "From: news@news.test\nSubject: same for all\n\nHello all\n",
    )
    .unwrap();
    let mut cfg = env.config();
    cfg.shards = 1;
    let log = cfg.log_path.clone();
    let r = env.send_for(Some(&c), cfg, Some(Duration::from_secs(20)));
    let lines = log_lines(&log);
    assert_eq!((r.delivered, r.remaining), (7, 0), "{lines:#?}");
    assert!(
        deferrals(&lines).is_empty(),
        "no five-minute wait: {lines:#?}"
    );
    let rcpts_per_tx: Vec<usize> = {
        let cmds = seen.commands();
        let mut per = Vec::new();
        for c in cmds {
            if c.starts_with("MAIL") {
                per.push(0);
            } else if c.starts_with("RCPT") {
                *per.last_mut().unwrap() += 1;
            }
        }
        per
    };
    assert_eq!(
        rcpts_per_tx[0], 5,
        "the first transaction tries the campaign's 5: {rcpts_per_tx:?}"
    );
    assert!(
        rcpts_per_tx[1..].iter().all(|&n| n <= 2),
        "then the learned 2 per transaction: {rcpts_per_tx:?}"
    );
}

#[test]
fn every_session_ends_with_quit_when_the_run_ends() {
    let env = env("quit", "");
    let seen = route(&env, "quit.quirk.test", "127.0.0.63", Quirks::default());
    let rows: Vec<String> = (0..20)
        .map(|i| format!("r{i}@quit.quirk.test,R{i}"))
        .collect();
    let c = campaign(&env.dir, "quit", "", &rows);
    let mut cfg = env.config();
    // Longer than the run: the sessions are still open when the last reply is in.
    cfg.defaults.idle_timeout = Some(Set::cli(Duration::from_secs(30)));
    let r = env.send(&c, cfg);
    assert_eq!(r.delivered, 20);
    settle(&seen);
    let conns = seen.conns.lock().unwrap();
    assert!(!conns.is_empty());
    for (cmds, quit) in conns.iter() {
        assert!(quit, "a session dropped without QUIT: {cmds:?}");
    }
}

#[test]
fn sessions_end_with_quit_when_the_run_is_stopped() {
    let env = env("quitstop", "");
    let q = Quirks {
        refuse_rcpt_prefix: "never-",
        ..Quirks::default()
    };
    let seen = route(&env, "stop.quirk.test", "127.0.0.64", q);
    // A tempfail keeps the run going until it is stopped.
    let rows = vec![
        "a@stop.quirk.test,A".to_string(),
        "tempfail@gmail.com,T".to_string(),
    ];
    let c = campaign(&env.dir, "quitstop", "", &rows);
    let mut cfg = env.config();
    cfg.defaults.idle_timeout = Some(Set::cli(Duration::from_secs(30)));
    let r = env.send_for(Some(&c), cfg, Some(Duration::from_millis(1500)));
    assert_eq!((r.delivered, r.remaining), (1, 1));
    settle(&seen);
    let conns = seen.conns.lock().unwrap();
    assert!(!conns.is_empty());
    for (cmds, quit) in conns.iter() {
        assert!(quit, "a session dropped without QUIT on stop: {cmds:?}");
    }
}

#[test]
fn without_pipelining_no_command_follows_a_refusal_that_dooms_it() {
    let env = env("nopipe", "");
    let q = Quirks {
        pipelining: false,
        chunking: false,
        ..Quirks::default()
    };
    let seen = route(&env, "nopipe.quirk.test", "127.0.0.65", q);
    let refusing = Quirks {
        pipelining: false,
        chunking: false,
        refuse_mail: true,
        ..Quirks::default()
    };
    let seen_mail = route(&env, "nomail.quirk.test", "127.0.0.66", refusing);
    let rows = vec![
        "nobody1@nopipe.quirk.test,A".to_string(),
        "ok@nopipe.quirk.test,B".to_string(),
        "x@nomail.quirk.test,C".to_string(),
    ];
    let c = campaign(&env.dir, "nopipe", "", &rows);
    let mut cfg = env.config();
    cfg.shards = 1;
    let log = cfg.log_path.clone();
    let r = env.send(&c, cfg);
    assert_eq!((r.delivered, r.bounced), (1, 2));
    let lines = log_lines(&log);
    let by = terminal_by_rcpt(&lines);
    assert_eq!(by["nobody1@nopipe.quirk.test"][0]["stage"], "rcpt");
    assert_eq!(by["nobody1@nopipe.quirk.test"][0]["code"], 550);
    assert_eq!(by["x@nomail.quirk.test"][0]["stage"], "mail");
    settle(&seen);
    settle(&seen_mail);
    // Each transaction in its own session order: MAIL, RCPT, then DATA only when a
    // RCPT was taken.
    let cmds = seen.commands();
    let data = cmds.iter().filter(|c| *c == "DATA").count();
    assert_eq!(
        data, 1,
        "DATA only for the transaction with a recipient: {cmds:?}"
    );
    let cmds = seen_mail.commands();
    assert!(
        !cmds.iter().any(|c| c.starts_with("RCPT") || c == "DATA"),
        "nothing after a refused MAIL: {cmds:?}"
    );
}

#[test]
fn a_connection_cap_below_the_shard_count_holds_over_all_shards() {
    let env = env("onecon", "");
    let q = Quirks {
        conn_cap: Some(1),
        pipelining: false,
        chunking: false,
        ..Quirks::default()
    };
    let seen = route(&env, "one.quirk.test", "127.0.0.67", q);
    // Enough recipients that both shards have some.
    let rows: Vec<String> = (0..12)
        .map(|i| format!("r{i}@one.quirk.test,R{i}"))
        .collect();
    let c = campaign(&env.dir, "onecon", "", &rows);
    let mut cfg = env.config();
    cfg.shards = 2;
    cfg.defaults.max_connections = Some(Set::cli(1));
    cfg.defaults.idle_timeout = Some(Set::cli(Duration::from_millis(200)));
    let log = cfg.log_path.clone();
    let r = env.send_for(Some(&c), cfg, Some(Duration::from_secs(20)));
    let lines = log_lines(&log);
    assert_eq!((r.delivered, r.remaining), (12, 0), "{lines:#?}");
    assert!(deferrals(&lines).is_empty(), "{lines:#?}");
    let shards: std::collections::HashSet<u64> =
        lines.iter().filter_map(|l| l["shard"].as_u64()).collect();
    assert_eq!(shards.len(), 2, "both shards delivered");
    assert_eq!(seen.refused_for_cap.load(Ordering::SeqCst), 0);
    assert_eq!(seen.open_max.load(Ordering::SeqCst), 1);
}
