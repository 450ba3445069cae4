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
use volley::policy::shaping::rules::Set;

/// How the scripted receiver behaves.
#[derive(Clone)]
struct Quirks {
    /// Close a connection with `421 4.4.2` after this long without a command.
    idle_close: Option<Duration>,
    /// Recipients taken per transaction; the rest get `cap_reply`.
    rcpt_cap: Option<usize>,
    /// Recipients taken per connection, over its transactions; the rest get `cap_reply`.
    session_rcpt_cap: Option<usize>,
    /// What a recipient over a cap gets.
    cap_reply: &'static str,
    /// Answer EHLO, then at once `421 4.7.0 Too many connections` and close.
    close_after_ehlo: bool,
    /// Connections open at once from everyone; more get `421 4.7.0` at the greeting.
    conn_cap: Option<usize>,
    /// How long a closed connection still counts against `conn_cap` (Exim frees the
    /// slot when it reaps the child process).
    release_delay: Duration,
    pipelining: bool,
    chunking: bool,
    eightbitmime: bool,
    smtputf8: bool,
    /// Recipients whose local part starts with this get `550 5.1.1`.
    refuse_rcpt_prefix: &'static str,
    /// Recipients whose local part starts with this get `452 4.2.2 Mailbox full`.
    full_rcpt_prefix: &'static str,
    /// Answer every MAIL with `550 5.7.1`.
    refuse_mail: bool,
    /// Answer `451 4.3.0` after the content of a transaction the first time each
    /// of its recipients is seen (the content is still recorded).
    tempfail_first_data: bool,
}

impl Default for Quirks {
    fn default() -> Self {
        Quirks {
            idle_close: None,
            rcpt_cap: None,
            session_rcpt_cap: None,
            cap_reply: "452 4.5.3 Error: too many recipients",
            close_after_ehlo: false,
            conn_cap: None,
            release_delay: Duration::ZERO,
            pipelining: true,
            chunking: true,
            eightbitmime: true,
            smtputf8: false,
            refuse_rcpt_prefix: "nobody",
            full_rcpt_prefix: "full",
            refuse_mail: false,
            tempfail_first_data: false,
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
    /// Recipients whose transactions reached the end of the content.
    rcpts_seen: Mutex<std::collections::HashSet<String>>,
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

    /// RCPT commands per MAIL, in order.
    fn rcpts_per_transaction(&self) -> Vec<usize> {
        let mut per = Vec::new();
        for c in self.commands() {
            if c.starts_with("MAIL") {
                per.push(0);
            } else if c.starts_with("RCPT") {
                *per.last_mut().unwrap() += 1;
            }
        }
        per
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
    let mut session_accepted = 0;
    let mut accepted = 0;
    let mut tx_rcpts: Vec<String> = Vec::new();
    // The reply after a transaction's content, recording it.
    let end_of_content = |msg: Vec<u8>, tx_rcpts: &[String]| -> &'static str {
        seen.messages.lock().unwrap().push(msg);
        let mut known = seen.rcpts_seen.lock().unwrap();
        let first = tx_rcpts.iter().any(|r| known.insert(r.clone()));
        if q.tempfail_first_data && first {
            "451 4.3.0 try again later\r\n"
        } else {
            "250 2.0.0 queued\r\n"
        }
    };
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
                if q.close_after_ehlo {
                    say(&mut w, "421 4.7.0 Too many connections from your host\r\n");
                    return false;
                }
            }
            "MAIL" if q.refuse_mail => say(&mut w, "550 5.7.1 sender refused\r\n"),
            "MAIL" => {
                rcpts = 0;
                accepted = 0;
                tx_rcpts.clear();
                say(&mut w, "250 2.1.0 ok\r\n");
            }
            "RCPT" => {
                rcpts += 1;
                let addr = line.split_once('<').map_or("", |(_, a)| a);
                if addr.starts_with(q.refuse_rcpt_prefix) {
                    say(&mut w, "550 5.1.1 no such user\r\n");
                } else if addr.starts_with(q.full_rcpt_prefix) {
                    // As a multi-line reply can be: over 998 octets once joined.
                    let pad = "x".repeat(400);
                    say(
                        &mut w,
                        &format!(
                            "452-4.2.2 The account is over quota {pad}\r\n\
                             452-4.2.2 See https://support.example/quota {pad}\r\n\
                             452 4.2.2 Mailbox full\r\n"
                        ),
                    );
                } else if q.rcpt_cap.is_some_and(|cap| rcpts > cap)
                    || q.session_rcpt_cap
                        .is_some_and(|cap| session_accepted >= cap)
                {
                    say(&mut w, &format!("{}\r\n", q.cap_reply));
                } else {
                    accepted += 1;
                    session_accepted += 1;
                    tx_rcpts.push(addr.trim_end_matches('>').to_string());
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
                say(&mut w, end_of_content(msg, &tx_rcpts));
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
                    say(&mut w, end_of_content(chunk, &tx_rcpts));
                }
            }
            "QUIT" => {
                seen.conns.lock().unwrap()[idx].1 = true;
                if q.release_delay.is_zero() {
                    seen.open.fetch_sub(1, Ordering::SeqCst);
                    say(&mut w, "221 2.0.0 bye\r\n");
                } else {
                    // The client is gone before its slot is free.
                    say(&mut w, "221 2.0.0 bye\r\n");
                    drop(w);
                    std::thread::sleep(q.release_delay);
                    seen.open.fetch_sub(1, Ordering::SeqCst);
                }
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
    let rcpts_per_tx = seen.rcpts_per_transaction();
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

/// The Message-ID header fields of `messages`, in order.
fn message_ids(messages: &[Vec<u8>]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            String::from_utf8_lossy(m)
                .lines()
                .find_map(|l| l.strip_prefix("Message-ID: ").map(str::to_string))
                .expect("volley adds a Message-ID")
        })
        .collect()
}

#[test]
fn message_ids_are_unique_over_shards_and_spools_and_kept_across_retries() {
    let env = env("msgid", "");
    let q = Quirks {
        tempfail_first_data: true,
        ..Quirks::default()
    };
    let seen = route(&env, "ids.quirk.test", "127.0.0.68", q);
    let rows: Vec<String> = (0..40)
        .map(|i| format!("r{i}@ids.quirk.test,R{i}"))
        .collect();
    let c = campaign(&env.dir, "msgid", "", &rows);
    // No Message-ID of the template's own: volley adds one per recipient.
    std::fs::write(
        c.join("message.eml"),
        "From: news@news.test\nTo: {{email}}\nSubject: hi {{name}}\n\nHello\n",
    )
    .unwrap();
    let run = |spool: &str| -> Vec<String> {
        seen.messages.lock().unwrap().clear();
        seen.rcpts_seen.lock().unwrap().clear();
        let mut cfg = env.config();
        cfg.shards = 2;
        cfg.spool_dir = env.dir.join(spool);
        cfg.log_path = cfg.spool_dir.join("accounting.jsonl");
        cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(200)]);
        let r = env.send_for(Some(&c), cfg, Some(Duration::from_secs(20)));
        assert_eq!((r.delivered, r.remaining), (40, 0));
        message_ids(&seen.messages.lock().unwrap())
    };
    let first = run("spool-a");
    assert_eq!(first.len(), 80, "each recipient refused once, then taken");
    let distinct: std::collections::HashSet<&String> = first.iter().collect();
    assert_eq!(
        distinct.len(),
        40,
        "one id per recipient over both shards, the same on its retry: {first:?}"
    );
    let second = run("spool-b");
    let again: std::collections::HashSet<&String> = second.iter().collect();
    assert!(
        distinct.is_disjoint(&again),
        "the same rows from a fresh spool get new ids: {first:?} {second:?}"
    );
}

/// An Expiration and its DSN report the receiver's last answer, its class and when
/// it came (RFC 3464 §2.3.6), also when the expiry falls while volley is down.
#[test]
fn an_expiration_keeps_the_receivers_last_reply_across_a_restart() {
    let (env, keep) = env_keeping("lastreply");
    let seen = route(&env, "full.quirk.test", "127.0.0.69", Quirks::default());
    // The return path is on a tail domain, which the test DNS routes to the sink.
    let c = campaign(
        &env.dir,
        "lastreply",
        "expire_after = \"3s\"\ndsn = true\nsender = \"bounces@shop7.tail.test\"",
        &["full1@full.quirk.test,F".to_string()],
    );
    let toml = c.join("campaign.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replacen("sender = \"bounces@news.test\"\n", "", 1),
    )
    .unwrap();
    let mut cfg = env.config();
    // An address literal for EHLO: the DSN reports from the campaign's From domain.
    cfg.ehlo_name = "[192.0.2.1]".into();
    cfg.shards = 1;
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(400)]);
    let log = cfg.log_path.clone();
    // Deferred a few times, then stopped before the expiry...
    let r = env.send_for(Some(&c), cfg.clone(), Some(Duration::from_millis(1500)));
    assert_eq!(r.remaining, 1);
    // ...and resumed after it: the recipient expires without another attempt.
    std::thread::sleep(Duration::from_millis(2000));
    let attempts_before = seen
        .commands()
        .iter()
        .filter(|c| c.starts_with("RCPT"))
        .count();
    let r = env.send_for(None, cfg, Some(Duration::from_secs(20)));
    // The expiration, and its DSN delivered in the same run.
    assert_eq!((r.expired, r.delivered, r.remaining), (1, 1, 0));
    let dsn_rows: String = std::fs::read_dir(&keep)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .filter(|m| m.contains("multipart/report"))
        .collect();
    // An address literal for EHLO is no From domain: the campaign's stands in.
    assert!(
        dsn_rows.contains("Reporting-MTA: dns; news.test"),
        "{dsn_rows}"
    );
    assert!(dsn_rows.contains("Status: 5.4.7"), "{dsn_rows}");
    let lines = log_lines(&log);
    let deferred: Vec<_> = lines
        .iter()
        .filter(|l| l["type"] == "TransientFailure")
        .collect();
    assert!(deferred.len() >= 2, "{lines:#?}");
    let last_deferral = deferred.last().unwrap();
    let exp = lines
        .iter()
        .find(|l| l["type"] == "Expiration")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(exp["code"], 452, "{exp}");
    assert_eq!(exp["enhanced"], "4.2.2", "{exp}");
    assert_eq!(exp["class"], "mailbox_full", "{exp}");
    assert_eq!(exp["stage"], "rcpt", "{exp}");
    let reply = exp["reply"].as_str().unwrap();
    assert!(
        reply.starts_with("The account is over quota") && reply.ends_with("Mailbox full"),
        "{exp}"
    );
    assert_eq!(
        exp["last_attempt"], last_deferral["time"],
        "the last attempt's time, not the expiry's: {exp}"
    );
    assert_eq!(
        seen.commands()
            .iter()
            .filter(|c| c.starts_with("RCPT"))
            .count(),
        attempts_before,
        "no attempt after the expiry"
    );
    assert!(
        dsn_rows.contains("452 4.2.2 The account is over quota"),
        "{dsn_rows}"
    );
    let last = humantime::parse_rfc3339(last_deferral["time"].as_str().unwrap()).unwrap();
    assert!(
        dsn_rows.contains(&format!(
            "Last-Attempt-Date: {}",
            volley::message::dsn::rfc5322_date(last)
        )),
        "Last-Attempt-Date is the last attempt's: {dsn_rows}"
    );
    let _ = std::fs::remove_dir_all(&keep);
}

/// RFC 6152 §3: 8-bit content never goes raw to a receiver without 8BITMIME; it is
/// converted to 7 bit (quoted-printable for text) before signing, and a receiver
/// that offers 8BITMIME gets it as it is, with BODY=8BITMIME. UTF-8 header fields go
/// raw only with SMTPUTF8 (RFC 6531), else as RFC 2047 encoded-words.
#[test]
fn eight_bit_content_is_converted_for_a_receiver_without_8bitmime() {
    let env = env("eightbit", "");
    let seven = Quirks {
        eightbitmime: false,
        ..Quirks::default()
    };
    let seen7 = route(&env, "seven.quirk.test", "127.0.0.70", seven);
    let seen8 = route(&env, "eight.quirk.test", "127.0.0.71", Quirks::default());
    let utf8 = Quirks {
        smtputf8: true,
        ..Quirks::default()
    };
    let seen_utf8 = route(&env, "utf8.quirk.test", "127.0.0.72", utf8);
    let rows = vec![
        "a@seven.quirk.test,Zoë".to_string(),
        "b@eight.quirk.test,Zoë".to_string(),
        "c@utf8.quirk.test,Zoë".to_string(),
    ];
    let c = campaign(&env.dir, "eightbit", "", &rows);
    let body = "Grüße aus Köln, {{name}}! Ça va? 日本語\n";
    std::fs::write(
        c.join("message.eml"),
        format!(
            "From: News Café <news@news.test>\nTo: {{{{email}}}}\nSubject: Grüße {{{{name}}}}\nMIME-Version: 1.0\n\
             Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{body}"
        ),
    )
    .unwrap();
    let mut cfg = env.config();
    cfg.shards = 1;
    let log = cfg.log_path.clone();
    let r = env.send(&c, cfg);
    assert_eq!(r.delivered, 3, "{:#?}", log_lines(&log));
    settle(&seen7);
    settle(&seen8);
    settle(&seen_utf8);
    let got7 = seen7.messages.lock().unwrap()[0].clone();
    assert!(got7.is_ascii(), "{}", String::from_utf8_lossy(&got7));
    let text7 = String::from_utf8(got7).unwrap();
    assert!(
        text7.contains("Content-Transfer-Encoding: quoted-printable"),
        "{text7}"
    );
    assert!(
        text7.contains("Gr=C3=BC=C3=9Fe aus K=C3=B6ln, Zo=C3=AB!"),
        "{text7}"
    );
    // Without SMTPUTF8, header fields in RFC 2047 encoded-words (RFC 6532 needs it).
    assert!(
        text7.contains("Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe_Zo=C3=AB?="),
        "{text7}"
    );
    assert!(
        text7.contains("From: News =?UTF-8?Q?Caf=C3=A9?= <news@news.test>"),
        "{text7}"
    );
    let mail7 = seen7
        .commands()
        .into_iter()
        .find(|c| c.starts_with("MAIL"))
        .unwrap();
    assert!(!mail7.contains("BODY="), "{mail7}");
    let got8 = String::from_utf8(seen8.messages.lock().unwrap()[0].clone()).unwrap();
    assert!(got8.contains("Grüße aus Köln, Zoë!"), "{got8}");
    assert!(got8.contains("Subject: =?UTF-8?"), "{got8}");
    let mail8 = seen8
        .commands()
        .into_iter()
        .find(|c| c.starts_with("MAIL"))
        .unwrap();
    assert!(mail8.ends_with("BODY=8BITMIME"), "{mail8}");
    // With SMTPUTF8 the header fields go as they are, and MAIL says so.
    let got = String::from_utf8(seen_utf8.messages.lock().unwrap()[0].clone()).unwrap();
    assert!(got.contains("Subject: Grüße Zoë"), "{got}");
    let mail = seen_utf8
        .commands()
        .into_iter()
        .find(|c| c.starts_with("MAIL"))
        .unwrap();
    assert!(mail.ends_with("BODY=8BITMIME SMTPUTF8"), "{mail}");
}

/// A receiver that refuses the session right after EHLO (an unsolicited 421, its
/// connection limit) is a failed connection, as a refusal at the greeting: retried on
/// the schedule, not reconnected to in a loop.
#[test]
fn a_421_right_after_ehlo_is_a_refused_connection_not_an_idle_close() {
    let env = env("ehlo421", "");
    let q = Quirks {
        close_after_ehlo: true,
        ..Quirks::default()
    };
    let seen = route(&env, "storm.quirk.test", "127.0.0.73", q);
    let c = campaign(
        &env.dir,
        "ehlo421",
        "expire_after = \"5s\"",
        &["a@storm.quirk.test,A".to_string()],
    );
    let mut cfg = env.config();
    cfg.shards = 1;
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(500)]);
    let log = cfg.log_path.clone();
    let r = env.send_for(Some(&c), cfg, Some(Duration::from_secs(20)));
    assert_eq!((r.expired, r.remaining), (1, 0));
    settle(&seen);
    let conns = seen.conns.lock().unwrap().len();
    // Refusals for the connection limit are tried again after 0.5, 1 and 2 s, then the
    // queue is deferred (0.5 s here) and it starts over: a dozen in 5 s, not thousands.
    assert!(conns <= 12, "{conns} connections in 5 s");
    let lines = log_lines(&log);
    assert!(
        // At "mail" when the client's MAIL crossed the 421 on the wire: then it is
        // that command's answer, an attempt all the same.
        deferrals(&lines)
            .iter()
            .all(|l| (l["stage"] == "connect" || l["stage"] == "mail")
                && l["reply"]
                    .as_str()
                    .unwrap()
                    .contains("Too many connections")),
        "{lines:#?}"
    );
    assert!(!deferrals(&lines).is_empty());
}

/// RFC 5321 §4.5.3.1.10: "too many recipients" is temporary even as a 552, and a cap
/// per session sends the rest on a new connection at once.
#[test]
fn too_many_recipients_is_never_a_bounce_and_a_per_session_cap_opens_a_new_connection() {
    let env = env("sesscap", "");
    let per_session = Quirks {
        session_rcpt_cap: Some(2),
        cap_reply: "552 5.5.3 Too many recipients for this session",
        ..Quirks::default()
    };
    let seen = route(&env, "sess.quirk.test", "127.0.0.74", per_session);
    let none = Quirks {
        rcpt_cap: Some(0),
        cap_reply: "552 5.5.3 Too many recipients",
        ..Quirks::default()
    };
    route(&env, "none.quirk.test", "127.0.0.75", none);
    let mut rows: Vec<String> = (0..6)
        .map(|i| format!("r{i}@sess.quirk.test,R{i}"))
        .collect();
    rows.push("z@none.quirk.test,Z".into());
    let c = campaign(&env.dir, "sesscap", "expire_after = \"2s\"", &rows);
    let mut cfg = env.config();
    cfg.shards = 1;
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(500)]);
    let log = cfg.log_path.clone();
    let r = env.send_for(Some(&c), cfg, Some(Duration::from_secs(20)));
    let lines = log_lines(&log);
    assert_eq!((r.delivered, r.bounced, r.expired), (6, 0, 1), "{lines:#?}");
    let sess: Vec<_> = lines
        .iter()
        .filter(|l| l["domain"] == "sess.quirk.test")
        .collect();
    assert!(
        sess.iter()
            .all(|l| l["type"] == "Delivery" && l["attempt"] == 1),
        "the session's cap costs no attempt: {sess:#?}"
    );
    settle(&seen);
    assert!(seen.conns.lock().unwrap().len() >= 3);
    let z = terminal_by_rcpt(&lines)["z@none.quirk.test"].clone();
    assert_eq!(z[0]["type"], "Expiration", "retried, never bounced: {z:?}");
}

/// A cap per session met part-way through a transaction is not learned as a cap
/// per transaction (it would shrink to one recipient per transaction for good).
#[test]
fn a_per_session_cap_does_not_shrink_the_transactions() {
    let env = env("sesscap5", "");
    let q = Quirks {
        session_rcpt_cap: Some(5),
        ..Quirks::default()
    };
    let seen = route(&env, "five.quirk.test", "127.0.0.76", q);
    let rows: Vec<String> = (0..12)
        .map(|i| format!("r{i}@five.quirk.test,R{i}"))
        .collect();
    let c = campaign(&env.dir, "sesscap5", "max_rcpt_per_msg = 3", &rows);
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
    assert_eq!((r.delivered, r.remaining), (12, 0), "{lines:#?}");
    assert!(deferrals(&lines).is_empty(), "{lines:#?}");
    settle(&seen);
    let per_tx = seen.rcpts_per_transaction();
    let ones = per_tx.iter().filter(|&&n| n == 1).count();
    assert!(ones <= 1, "transactions of one recipient: {per_tx:?}");
}

/// A receiver that still counts a closed connection for a moment (Exim until it reaps
/// the child) refuses the next one with "too many connections": retried shortly, not
/// deferred with the whole queue.
#[test]
fn a_connection_limit_that_frees_late_is_retried_not_deferred() {
    let env = env("latefree", "");
    let q = Quirks {
        conn_cap: Some(1),
        release_delay: Duration::from_millis(300),
        ..Quirks::default()
    };
    let seen = route(&env, "late.quirk.test", "127.0.0.77", q);
    let rows: Vec<String> = (0..12)
        .map(|i| format!("r{i}@late.quirk.test,R{i}"))
        .collect();
    let c = campaign(&env.dir, "latefree", "", &rows);
    let mut cfg = env.config();
    cfg.shards = 2;
    cfg.defaults.max_connections = Some(Set::cli(1));
    cfg.defaults.max_msgs_per_conn = Some(Set::cli(2));
    let log = cfg.log_path.clone();
    let r = env.send_for(Some(&c), cfg, Some(Duration::from_secs(30)));
    let lines = log_lines(&log);
    assert_eq!((r.delivered, r.remaining), (12, 0), "{lines:#?}");
    assert!(deferrals(&lines).is_empty(), "{lines:#?}");
    assert!(
        seen.refused_for_cap.load(Ordering::SeqCst) > 0,
        "the receiver did refuse: the test tests the retry"
    );
}
