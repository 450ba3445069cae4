//! Randomised fuzzing of what faces the network, on stable Rust (cargo-fuzz needs
//! nightly): one test per target, each a seeded, coverage-blind but structure-aware
//! mutation loop. Inputs are built from a few valid examples, then mutated (bit
//! flips, splices of other examples, CR, LF, NUL, ".", "\r\n.\r\n", "\n.\r\n", very
//! long lines) and fed in random chunks. Each target asserts invariants, not only
//! "no panic".
//!
//! - `VOLLEY_FUZZ_SECS`: seconds per target (default 2, so `cargo test` stays short);
//! - `VOLLEY_FUZZ_SEED`: the run's seed (default fixed); a failure prints it and the
//!   failing case's own seed;
//! - `VOLLEY_FUZZ_CASE`: run that one case only, to reproduce and minimise a failure.
//!
//! Long runs: `VOLLEY_FUZZ_SECS=600 cargo test --test fuzz smtp_server -- --nocapture`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use fastrand::Rng;

use volley::smtp::server::{
    AuthAttempt, Behaviour, Command, Mechanism, Message, Output, ServerConfig, ServerPolicy,
    ServerSession, Verdict, COMMAND_LINE_MAX,
};

const SECS_DEFAULT: u64 = 2;
const SEED_DEFAULT: u64 = 0x766f_6c6c_6579;
/// Largest input a mutation may grow to, so that one case stays quick.
const INPUT_BYTES_MAX: usize = 256 * 1024;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Runs `case` with fresh per-case seeds until the time is up; on a panic prints how
/// to run that case again, then lets the panic fail the test.
fn fuzz(target: &str, mut case: impl FnMut(&mut Rng)) {
    if let Some(seed) = env_u64("VOLLEY_FUZZ_CASE") {
        eprintln!("{target}: one case, VOLLEY_FUZZ_CASE={seed:#x}");
        case(&mut Rng::with_seed(seed));
        return;
    }
    let secs = env_u64("VOLLEY_FUZZ_SECS").unwrap_or(SECS_DEFAULT);
    let seed = env_u64("VOLLEY_FUZZ_SEED").unwrap_or(SEED_DEFAULT);
    let mut master = Rng::with_seed(seed);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut execs = 0u64;
    while Instant::now() < deadline {
        let case_seed = master.u64(..);
        let r = catch_unwind(AssertUnwindSafe(|| case(&mut Rng::with_seed(case_seed))));
        if let Err(p) = r {
            eprintln!(
                "{target}: FAILED at case {execs}: VOLLEY_FUZZ_SEED={seed:#x}, \
                 reproduce with VOLLEY_FUZZ_CASE={case_seed:#x}"
            );
            std::panic::resume_unwind(p);
        }
        execs += 1;
    }
    let s = start.elapsed().as_secs_f64();
    eprintln!(
        "{target}: {execs} cases in {s:.1} s ({:.0}/s), VOLLEY_FUZZ_SEED={seed:#x}",
        execs as f64 / s
    );
}

// ---------------------------------------------------------------------------------
// Mutations

/// Octets that matter to the parsers under test.
const SPECIAL: &[u8] = b"\r\n\0. :<>@=\"\\,;-*\t\x7f\x80\xff";
/// Sequences that matter to them.
const TOKENS: &[&[u8]] = &[
    b"\r",
    b"\n",
    b"\0",
    b".",
    b"\r\n",
    b"\r\n.\r\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\n.\n",
    b"\r.\r",
    b"..",
    b"\r\n\r\n",
    b"\r\n ",
    b"\xc3\xa9",
    b"\xff\xfe",
];

/// Applies 1 to 8 random mutations to `input`, splicing from `others` and inserting
/// `dict` words (the target's own keywords).
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, others: &[&[u8]], dict: &[&[u8]]) {
    for _ in 0..rng.usize(1..=8) {
        let len = input.len();
        let at = rng.usize(..=len);
        match rng.u8(..11) {
            0 if len > 0 => {
                let i = rng.usize(..len);
                input[i] ^= 1 << rng.u8(..8);
            }
            1 if len > 0 => {
                let i = rng.usize(..len);
                input[i] = SPECIAL[rng.usize(..SPECIAL.len())];
            }
            2 => {
                let t = TOKENS[rng.usize(..TOKENS.len())];
                input.splice(at..at, t.iter().copied());
            }
            3 if !dict.is_empty() => {
                let t = dict[rng.usize(..dict.len())];
                input.splice(at..at, t.iter().copied());
            }
            4 if len > 0 => {
                let end = (at + rng.usize(..=64)).min(len);
                input.drain(at.min(end)..end);
            }
            5 if len > 0 => {
                let from = rng.usize(..len);
                let n = rng.usize(..=(len - from).min(256));
                let piece = input[from..from + n].to_vec();
                input.splice(at..at, piece);
            }
            6 if !others.is_empty() => {
                let o = others[rng.usize(..others.len())];
                if !o.is_empty() {
                    let from = rng.usize(..o.len());
                    let n = rng.usize(..=o.len() - from);
                    input.splice(at..at, o[from..from + n].iter().copied());
                }
            }
            7 => {
                // A very long line, of one octet or of random ones.
                let n = *[990, 998, 999, 1000, 1001, 2047, 2048, 2049, 5000, 13000]
                    .get(rng.usize(..10))
                    .unwrap();
                let c = if rng.bool() { b'x' } else { rng.u8(..) };
                input.splice(at..at, std::iter::repeat_n(c, n));
            }
            8 if len > 0 => input.truncate(rng.usize(..len)),
            9 => {
                let t = TOKENS[rng.usize(..TOKENS.len())];
                let n = rng.usize(1..=4);
                for _ in 0..n {
                    input.splice(at..at, t.iter().copied());
                }
            }
            _ => {
                let c = rng.u8(..);
                input.insert(at, c);
            }
        }
    }
    input.truncate(INPUT_BYTES_MAX);
}

/// Random cut points for feeding `input` in pieces: whole, octet by octet, small or
/// large random pieces, or cut right after CR, LF or "." (where line parsers decide).
fn chunks(rng: &mut Rng, input: &[u8]) -> Vec<std::ops::Range<usize>> {
    let len = input.len();
    if rng.u8(..5) == 0 {
        let mut out = Vec::new();
        let mut at = 0;
        for (i, c) in input.iter().enumerate() {
            if matches!(c, b'\r' | b'\n' | b'.') && rng.bool() {
                out.push(at..i + 1);
                at = i + 1;
            }
        }
        if at < len {
            out.push(at..len);
        }
        return out;
    }
    let max = match rng.u8(..4) {
        0 => len.max(1),
        1 => 1,
        2 => 16,
        _ => 4096,
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let n = rng.usize(1..=max).min(len - at);
        out.push(at..at + n);
        at += n;
    }
    out
}

/// `input` as one piece.
fn in_one(input: &[u8]) -> Vec<std::ops::Range<usize>> {
    std::iter::once(0..input.len()).collect()
}

fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(600)]).into_owned();
    if b.len() > 600 {
        format!("{s:?}... ({} octets)", b.len())
    } else {
        format!("{s:?}")
    }
}

// ---------------------------------------------------------------------------------
// Target 1: the SMTP server session

/// A behaviour that decides at random, from its own seed, so that two runs of the
/// same input decide alike; it also keeps the model the invariants are checked against.
struct Fuzzy {
    rng: Rng,
    /// The session should hold an authenticated user (AUTH was accepted since TLS).
    authed: bool,
    may_relay: bool,
    /// The pending decision is an AUTH one.
    pending_auth: bool,
    /// Message content must have CRLF line ends only (no BDAT in this session).
    data_only: bool,
    size_max: usize,
    messages: Vec<Vec<u8>>,
}

impl Fuzzy {
    fn refusal(&mut self) -> Verdict {
        match self.rng.u8(..10) {
            0 => Verdict::ReplyAndClose("421 4.3.2 Going away".into()),
            1 => Verdict::Disconnect,
            2..=5 => Verdict::Reply("451 4.3.0 Try later".into()),
            _ => Verdict::Reply("550 5.7.1 Refused".into()),
        }
    }

    fn mostly_accept(&mut self) -> Verdict {
        if self.rng.u8(..8) == 0 {
            self.refusal()
        } else {
            Verdict::Accept
        }
    }

    /// The decision given later through `resolve`.
    fn decision(&mut self) -> Verdict {
        let v = self.mostly_accept();
        if std::mem::take(&mut self.pending_auth) && v == Verdict::Accept {
            self.authed = true;
        }
        v
    }
}

impl Behaviour for Fuzzy {
    fn mail_from(&mut self, _: &str) -> Verdict {
        self.mostly_accept()
    }
    fn rcpt(&mut self, _: &str, _: &str) -> Verdict {
        self.mostly_accept()
    }
    fn data_start(&mut self) -> Verdict {
        if self.rng.u8(..16) == 0 {
            self.refusal()
        } else {
            Verdict::Accept
        }
    }
    fn message(&mut self, msg: &Message<'_>) -> Verdict {
        assert!(
            self.authed || self.may_relay,
            "a message from a session neither authenticated nor a relay client"
        );
        let content = msg.take_content();
        assert!(
            content.len() <= self.size_max,
            "content over size_max: {}",
            content.len()
        );
        if self.data_only {
            let bare_lf = content
                .iter()
                .enumerate()
                .any(|(i, &c)| c == b'\n' && (i == 0 || content[i - 1] != b'\r'));
            assert!(!bare_lf, "DATA content with a bare LF: {}", show(&content));
            assert!(
                content.is_empty() || content.ends_with(b"\r\n"),
                "DATA content not ending in CRLF: {}",
                show(&content)
            );
        }
        self.messages.push(content);
        match self.rng.u8(..4) {
            0 | 1 => Verdict::Pending,
            _ => self.mostly_accept(),
        }
    }
    fn delay_ms(&mut self, _: Command) -> u64 {
        0
    }
    fn auth(&mut self, _: &AuthAttempt) -> Verdict {
        match self.rng.u8(..6) {
            0 | 1 => {
                self.authed = true;
                Verdict::Accept
            }
            2 => {
                self.pending_auth = true;
                Verdict::Pending
            }
            3 => Verdict::Reply("454 4.7.0 Temporary authentication failure".into()),
            _ => Verdict::Reply("535 5.7.8 Authentication credentials invalid".into()),
        }
    }
}

/// Checks that `write` is whole reply lines, `DDD[ -]text` CRLF with a 2xx to 5xx code,
/// a multi-line reply keeping its code; returns how many replies it ends.
fn check_replies(write: &[u8]) -> usize {
    assert!(
        write.is_empty() || write.ends_with(b"\r\n"),
        "output not ending in CRLF: {}",
        show(write)
    );
    let mut finals = 0;
    let mut open: Option<&[u8]> = None;
    for line in write.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
        let line = line
            .strip_suffix(b"\r")
            .unwrap_or_else(|| panic!("reply line without CRLF in {}", show(write)));
        let ok = line.len() >= 4
            && (b'2'..=b'5').contains(&line[0])
            && line[1..3].iter().all(u8::is_ascii_digit)
            && matches!(line[3], b' ' | b'-')
            && !line.contains(&b'\r');
        assert!(ok, "malformed reply line {} in {}", show(line), show(write));
        if let Some(code) = open {
            assert_eq!(
                code,
                &line[..3],
                "multi-line reply changed code: {}",
                show(write)
            );
        }
        if line[3] == b' ' {
            finals += 1;
            open = None;
        } else {
            open = Some(&line[..3]);
        }
    }
    assert!(
        open.is_none(),
        "multi-line reply left open: {}",
        show(write)
    );
    finals
}

fn b64(s: &str) -> String {
    BASE64.encode(s)
}

/// One flight of client commands (what a client writes before it waits), valid.
fn smtp_flight(rng: &mut Rng, size_max: usize) -> Vec<u8> {
    let mut f = String::new();
    for _ in 0..rng.usize(1..=4) {
        match rng.u8(..16) {
            0 => f.push_str("EHLO client.example\r\n"),
            1 => f.push_str("HELO client.example\r\n"),
            2 => f.push_str(&format!("AUTH PLAIN {}\r\n", b64("\0user\0secret"))),
            3 => f.push_str(&format!("AUTH PLAIN\r\n{}\r\n", b64("user\0user\0secret"))),
            4 => f.push_str(&format!(
                "AUTH LOGIN\r\n{}\r\n{}\r\n",
                b64("user"),
                b64("secret")
            )),
            5 => f.push_str(&format!(
                "AUTH CRAM-MD5\r\n{}\r\n",
                b64("user 0123456789abcdef0123456789abcdef")
            )),
            6 => f.push_str("AUTH LOGIN\r\n*\r\n"),
            7 | 8 => {
                let size = if rng.bool() {
                    format!(" SIZE={}", rng.usize(..size_max * 2))
                } else {
                    String::new()
                };
                f.push_str(&format!("MAIL FROM:<a@example.com>{size}\r\n"));
                for i in 0..rng.usize(1..=3) {
                    f.push_str(&format!("RCPT TO:<r{i}@example.org>\r\n"));
                }
                if rng.bool() {
                    f.push_str("DATA\r\n");
                    f.push_str(&data_content(rng));
                    f.push_str(".\r\n");
                } else {
                    let chunks = rng.usize(1..=3);
                    for c in 0..chunks {
                        let body = data_content(rng);
                        // Sometimes the size does not match what follows.
                        let n = if rng.u8(..8) == 0 {
                            rng.usize(..body.len() + 8)
                        } else {
                            body.len()
                        };
                        let last = if c + 1 == chunks { " LAST" } else { "" };
                        f.push_str(&format!("BDAT {n}{last}\r\n{body}"));
                    }
                }
            }
            9 => f.push_str("RSET\r\n"),
            10 => f.push_str("NOOP\r\n"),
            11 => f.push_str("VRFY user\r\n"),
            12 => f.push_str("QUIT\r\n"),
            13 => f.push_str("STARTTLS\r\n"),
            14 => f.push_str("DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"),
            _ => f.push_str("BDAT 0 LAST\r\n"),
        }
    }
    f.into_bytes()
}

fn data_content(rng: &mut Rng) -> String {
    let mut c = String::from("Subject: test\r\n\r\n");
    for _ in 0..rng.usize(..5) {
        match rng.u8(..5) {
            0 => c.push_str("..stuffed\r\n"),
            1 => c.push_str("..\r\n"),
            2 => c.push_str(&"y".repeat(rng.usize(..1100))),
            _ => c.push_str("body line\r\n"),
        }
        if !c.ends_with("\r\n") {
            c.push_str("\r\n");
        }
    }
    c
}

/// What one run of a session did, for comparing two feedings of the same input.
#[derive(Default)]
struct Transcript {
    write: Vec<u8>,
    events: Vec<String>,
    messages: Vec<Vec<u8>>,
    finals: usize,
}

/// Normalises the CRAM-MD5 challenge, which differs at each exchange.
fn normalise(write: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(write.len());
    for line in write.split_inclusive(|&c| c == b'\n') {
        let fixed = [
            &b"334 \r\n"[..],
            b"334 VXNlcm5hbWU6\r\n",
            b"334 UGFzc3dvcmQ6\r\n",
        ];
        if line.starts_with(b"334 ") && !fixed.contains(&line) {
            out.extend_from_slice(b"334 <challenge>\r\n");
        } else {
            out.extend_from_slice(line);
        }
    }
    out
}

struct SmtpCase {
    cfg: ServerConfig,
    policy: ServerPolicy,
    may_relay: bool,
    behaviour_seed: u64,
    flights: Vec<Vec<u8>>,
}

/// Feeds the flights, each cut by `cut` into the pieces the session gets; when
/// `hold` says so, a pending decision waits for further pieces before `resolve`.
fn run_session(
    c: &SmtpCase,
    mut cut: impl FnMut(&[u8]) -> Vec<std::ops::Range<usize>>,
    mut hold: impl FnMut() -> bool,
) -> Transcript {
    let data_only = !c
        .flights
        .iter()
        .any(|f| f.windows(4).any(|w| w.eq_ignore_ascii_case(b"BDAT")));
    let mut b = Fuzzy {
        rng: Rng::with_seed(c.behaviour_seed),
        authed: false,
        may_relay: c.may_relay,
        pending_auth: false,
        data_only,
        size_max: c.cfg.size_max,
        messages: Vec::new(),
    };
    let mut s = ServerSession::with_policy(&c.cfg, &c.policy);
    s.set_client(c.may_relay);
    let mut t = Transcript::default();
    // Returns whether the flight's remaining pieces are to be dropped (TLS or close).
    let handle = |out: Output, s: &mut ServerSession<'_>, b: &mut Fuzzy, t: &mut Transcript| {
        t.finals += check_replies(&out.write);
        t.write.extend_from_slice(&normalise(&out.write));
        assert_eq!(
            s.authenticated().is_some(),
            b.authed,
            "the session's AUTH state differs from the behaviour's decisions"
        );
        if out.close {
            t.events.push(format!("close after {}", t.write.len()));
            return true;
        }
        if out.start_tls {
            t.events.push(format!("tls after {}", t.write.len()));
            s.tls_started();
            b.authed = false;
            return true;
        }
        false
    };
    'flights: for flight in &c.flights {
        for piece in cut(flight) {
            if s.is_closed() {
                break 'flights;
            }
            let out = s.feed(&flight[piece], &mut b);
            let drop_rest = handle(out, &mut s, &mut b, &mut t);
            while s.is_waiting() && !hold() {
                let v = b.decision();
                let out = s.resolve(v, &mut b);
                if handle(out, &mut s, &mut b, &mut t) {
                    continue 'flights;
                }
            }
            if drop_rest {
                continue 'flights;
            }
        }
        // A client waits for the replies at the end of its flight.
        while s.is_waiting() {
            let v = b.decision();
            let out = s.resolve(v, &mut b);
            if handle(out, &mut s, &mut b, &mut t) {
                continue 'flights;
            }
        }
    }
    t.messages = b.messages;
    t
}

fn smtp_case(rng: &mut Rng) -> SmtpCase {
    let size_max = [100, 1000, 10_000][rng.usize(..3)];
    let mechanisms = [Mechanism::Plain, Mechanism::Login, Mechanism::CramMd5];
    let mut auth: Vec<Mechanism> = mechanisms
        .into_iter()
        .filter(|_| rng.u8(..4) != 0)
        .collect();
    if auth.is_empty() {
        auth.push(Mechanism::Plain);
    }
    let cfg = ServerConfig {
        hostname: "mx.test".into(),
        size_max,
        offer_starttls: rng.u8(..4) != 0,
        offer_pipelining: rng.bool(),
        offer_chunking: rng.bool(),
    };
    let policy = ServerPolicy {
        banner: "ESMTP volley".into(),
        auth,
        auth_before_tls: rng.bool(),
        auth_failures_max: rng.u32(..4),
        relay_needs_auth: true,
        rcpts_max: rng.usize(1..=5),
        commands_max: if rng.bool() { 0 } else { rng.u32(5..60) },
        text_line_max: volley::smtp::server::TEXT_LINE_MAX,
    };
    let mut flights: Vec<Vec<u8>> = Vec::new();
    if rng.u8(..4) != 0 {
        flights.push(b"EHLO client.example\r\n".to_vec());
    }
    for _ in 0..rng.usize(1..=8) {
        flights.push(smtp_flight(rng, size_max));
    }
    // Mutate some flights, splicing from the others.
    let originals = flights.clone();
    let others: Vec<&[u8]> = originals.iter().map(Vec::as_slice).collect();
    let dict: &[&[u8]] = &[
        b"EHLO x\r\n",
        b"MAIL FROM:<a@b.c>\r\n",
        b"RCPT TO:<d@e.f>\r\n",
        b"DATA\r\n",
        b"BDAT 5\r\n",
        b"BDAT 3 LAST\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH LOGIN\r\n",
        b"STARTTLS\r\n",
        b"RSET\r\n",
        b"QUIT\r\n",
        b" SIZE=99999999999999999999",
        b"AGFAAGI=\r\n",
        b"*\r\n",
    ];
    for f in flights.iter_mut() {
        if rng.u8(..3) == 0 {
            mutate(rng, f, &others, dict);
        }
    }
    SmtpCase {
        cfg,
        policy,
        may_relay: rng.u8(..4) == 0,
        behaviour_seed: rng.u64(..),
        flights,
    }
}

/// 10 MB without a line end, in each state that reads lines: the session must
/// neither hang nor keep it, and must answer the next command.
fn smtp_garbage_is_not_buffered() {
    let cfg = ServerConfig {
        hostname: "mx.test".into(),
        size_max: 10_000,
        offer_starttls: true,
        offer_pipelining: true,
        offer_chunking: true,
    };
    let policy = ServerPolicy {
        banner: "ESMTP volley".into(),
        auth: vec![Mechanism::Login],
        auth_before_tls: true,
        auth_failures_max: 0,
        relay_needs_auth: true,
        rcpts_max: 10,
        commands_max: 0,
        text_line_max: volley::smtp::server::TEXT_LINE_MAX,
    };
    let prefixes: [&[u8]; 4] = [
        b"",
        b"EHLO c\r\nAUTH LOGIN\r\n",
        b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n",
        b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nBDAT 99999999\r\n",
    ];
    let garbage = vec![b'g'; 4096];
    for prefix in prefixes {
        let mut times = Vec::new();
        for mb in [1, 10] {
            let mut b = Fuzzy {
                rng: Rng::with_seed(1),
                authed: false,
                may_relay: true,
                pending_auth: false,
                data_only: false,
                size_max: cfg.size_max,
                messages: Vec::new(),
            };
            // Accept every decision, so that the session stays open.
            let mut s = ServerSession::with_policy(&cfg, &policy);
            s.set_client(true);
            let mut out = s.feed(prefix, &mut NeverRefuse(&mut b));
            let start = Instant::now();
            for _ in 0..mb * 256 {
                let o = s.feed(&garbage, &mut NeverRefuse(&mut b));
                out.write.extend_from_slice(&o.write);
            }
            times.push(start.elapsed());
            let o = s.feed(b"\r\n", &mut NeverRefuse(&mut b));
            out.write.extend_from_slice(&o.write);
            check_replies(&out.write);
            assert!(!s.is_closed(), "closed on garbage after {}", show(prefix));
            assert!(
                out.write.len() < 64 * 1024,
                "{} octets of replies to garbage",
                out.write.len()
            );
        }
        eprintln!(
            "smtp_server: 1 MB then 10 MB without a line end after {}: {:?}, {:?}",
            show(prefix),
            times[0],
            times[1]
        );
    }
}

/// Accepts everything, for the garbage check.
struct NeverRefuse<'a>(&'a mut Fuzzy);

impl Behaviour for NeverRefuse<'_> {
    fn mail_from(&mut self, _: &str) -> Verdict {
        Verdict::Accept
    }
    fn rcpt(&mut self, _: &str, _: &str) -> Verdict {
        Verdict::Accept
    }
    fn data_start(&mut self) -> Verdict {
        Verdict::Accept
    }
    fn message(&mut self, m: &Message<'_>) -> Verdict {
        self.0.messages.push(m.take_content());
        Verdict::Accept
    }
    fn delay_ms(&mut self, _: Command) -> u64 {
        0
    }
}

#[test]
fn smtp_server() {
    smtp_garbage_is_not_buffered();
    fuzz("smtp_server", |rng| {
        let c = smtp_case(rng);
        let whole = run_session(&c, in_one, || false);
        let bytes: usize = c.flights.iter().map(Vec::len).sum();
        let lfs: usize = c
            .flights
            .iter()
            .map(|f| f.iter().filter(|&&b| b == b'\n').count())
            .sum();
        // Each reply answers a command line, an AUTH response or an over-long line.
        assert!(
            whole.finals <= lfs + bytes / COMMAND_LINE_MAX + 1,
            "{} replies to {lfs} lines",
            whole.finals
        );
        let mut cut_rng = Rng::with_seed(rng.u64(..));
        let mut hold_rng = Rng::with_seed(rng.u64(..));
        let cut = run_session(&c, |f| chunks(&mut cut_rng, f), || hold_rng.u8(..3) == 0);
        // Where the client's octets are cut must not change what the server does.
        if whole.write != cut.write || whole.events != cut.events || whole.messages != cut.messages
        {
            let at = whole
                .write
                .iter()
                .zip(&cut.write)
                .take_while(|(a, b)| a == b)
                .count();
            let from = at.saturating_sub(200);
            if std::env::var_os("VOLLEY_FUZZ_DUMP").is_some() {
                for f in &c.flights {
                    eprintln!("flight: {:?}", String::from_utf8_lossy(f));
                }
            }
            panic!(
                "feeding in pieces changed the session at reply octet {at}:\nwhole: {}\ncut:   {}\nmessages {} vs {}",
                show(&whole.write[from..(at + 200).min(whole.write.len())]),
                show(&cut.write[from..(at + 200).min(cut.write.len())]),
                whole.messages.len(),
                cut.messages.len(),
            );
        }
    });
}

// ---------------------------------------------------------------------------------
// Target 2: the SMTP reply parser

#[test]
fn smtp_reply() {
    use volley::smtp::reply::{Reply, ReplyError, ReplyParser, REPLY_LINES_MAX};
    const CORPUS: &[&[u8]] = &[
        b"220 mx.example.com ESMTP ready\r\n",
        b"250-mx.example.com greets you\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-STARTTLS\r\n250 CHUNKING\r\n",
        b"421-4.7.28 Gmail has detected\r\n421-4.7.28 an unusual rate\r\n421 4.7.28 of mail.\r\n",
        b"550 5.1.1 <a@b.c>: Recipient address rejected\r\n",
        b"452 4.5.3 Too many recipients\r\n",
        b"354 End data with <CR><LF>.<CR><LF>\r\n",
        b"250 2.0.0 Ok: queued as 12345\n",
        b"554\r\n",
        b"250-\r\n250 \r\n",
    ];
    let dict: &[&[u8]] = &[
        b"250-", b"250 ", b"5.7.1 ", b"4.", b"999 ", b"199 ", b"2.0.0",
    ];
    fuzz("smtp_reply", |rng| {
        let mut input = Vec::new();
        for _ in 0..rng.usize(1..=6) {
            input.extend_from_slice(CORPUS[rng.usize(..CORPUS.len())]);
        }
        if rng.u8(..4) != 0 {
            mutate(rng, &mut input, CORPUS, dict);
        }
        let parse = |pieces: Vec<std::ops::Range<usize>>| {
            let mut p = ReplyParser::default();
            let mut got: Vec<Result<Reply, ReplyError>> = Vec::new();
            'pieces: for r in pieces {
                p.push(&input[r]);
                while let Some(reply) = p.next_reply() {
                    let failed = reply.is_err();
                    got.push(reply);
                    if failed {
                        break 'pieces;
                    }
                }
            }
            got
        };
        let whole = parse(in_one(&input));
        for r in whole.iter().flatten() {
            assert!(
                (200..=599).contains(&r.code),
                "code {} from {}",
                r.code,
                show(&input)
            );
            if let Some(e) = &r.enhanced {
                assert_eq!(
                    e.as_bytes()[0],
                    b'0' + (r.code / 100) as u8,
                    "enhanced class differs from the code"
                );
            }
            assert!(r.text.lines().count() <= REPLY_LINES_MAX);
            let _ = (r.to_string(), r.is_too_many_recipients());
        }
        let cut = parse(chunks(rng, &input));
        assert_eq!(
            whole,
            cut,
            "cutting changed the replies of {}",
            show(&input)
        );
    });
}

// ---------------------------------------------------------------------------------
// Target 3: campaign directories

/// A directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("volley-fuzz-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn line_count(b: &[u8]) -> usize {
    let lfs = b.iter().filter(|&&c| c == b'\n').count();
    lfs + usize::from(!b.is_empty() && !b.ends_with(b"\n"))
}

/// A problem's line, when it has one, is a line of the file it names.
fn check_problem(p: &volley::message::campaign::Problem, files: &[(&str, &[u8])]) {
    let Some(line) = p.line else { return };
    let (_, text) = files
        .iter()
        .find(|(name, _)| *name == p.file)
        .unwrap_or_else(|| panic!("problem names an unknown file: {p}"));
    let lines = line_count(text).max(1);
    assert!(
        (1..=lines).contains(&line),
        "{p}: line {line} of a {lines}-line file {}",
        show(text)
    );
}

#[test]
fn campaign() {
    use volley::message::campaign::Campaign;
    const TOML: &[&[u8]] = &[
        b"id = \"c1\"\nsender = \"bounces@news.test\"\nfrom_domain = \"news.test\"\ndkim = false\n",
        b"id = \"c2\"\nsender = \"b@news.test\"\nfrom_domain = \"news.test\"\ndkim = false\nmax_rcpt_per_msg = 5\ntags = [\"a\", \"b\"]\nexpire_after = \"36h\"\nlist_unsubscribe_url = \"https://news.test/u/{{email}}\"\nlist_unsubscribe_mailto = \"u@news.test\"\nmax_msg_rate = \"100/s\"\ndsn = true\n",
    ];
    const EML: &[&[u8]] = &[
        b"From: News <news@news.test>\nTo: {{name}} <{{email}}>\nSubject: Hello {{name}}\nMessage-ID: <{{email}}.id@news.test>\n\nHi {{name}},\n.a dot line\nbye\n",
        b"From: news@news.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\nDate: Mon, 23 Nov 2026 09:00:00 +0000\r\n\r\nbody {{code}}\r\n",
    ];
    const CSV: &[&[u8]] = &[
        b"email,name,code\na@x.test,Ann,A1\nb@x.test,\"Smith, Bob\",7\n\"q\"\"uote\"\"@x.test\",Cy,3\n",
        b"email,name\r\nc@y.test,Dee\r\nd@y.test,\r\n",
    ];
    let dict: &[&[u8]] = &[
        b"{{name}}",
        b"{{email}}",
        b"{{",
        b"}}",
        b"\"",
        b"= \"",
        b"[",
        b"\nid = \"x\"\n",
        b",",
        b"@",
        b"From: ",
        b"\n\n",
    ];
    let dir = TempDir::new("campaign");
    fuzz("campaign", |rng| {
        let mut files: Vec<Vec<u8>> = [TOML, EML, CSV]
            .iter()
            .map(|c| c[rng.usize(..c.len())].to_vec())
            .collect();
        let all: Vec<&[u8]> = TOML.iter().chain(EML).chain(CSV).copied().collect();
        for f in files.iter_mut() {
            if rng.u8(..3) == 0 {
                mutate(rng, f, &all, dict);
            }
        }
        let names = ["campaign.toml", "message.eml", "recipients.csv"];
        for (name, f) in names.iter().zip(&files) {
            std::fs::write(dir.0.join(name), f).unwrap();
        }
        let named: Vec<(&str, &[u8])> = names
            .iter()
            .copied()
            .zip(files.iter().map(Vec::as_slice))
            .collect();
        let c = match Campaign::load(&dir.0) {
            Ok(c) => c,
            Err(problems) => {
                assert!(!problems.is_empty(), "refused without a problem");
                for p in &problems {
                    check_problem(p, &named);
                }
                return;
            }
        };
        for p in &c.template_warnings {
            check_problem(p, &named);
        }
        let mut bad = Vec::new();
        let streamed = c.recipients(|_| Ok(()), |b| bad.push(b.problem()));
        for p in &bad {
            check_problem(p, &named);
        }
        match streamed {
            Ok(s) => s.warnings.iter().for_each(|p| check_problem(p, &named)),
            Err(p) => check_problem(&p, &named),
        }
    });
}

// ---------------------------------------------------------------------------------
// Target 4: the injection API's JSON

#[test]
fn inject() {
    use serde_json::{json, Value};
    use volley::serve::inject::stage;
    const TEMPLATE: &str = "From: News <news@news.test>\nTo: {{email}}\nSubject: Hello {{name}}\n\nHi {{name}}, your code is {{code}}.\n";
    let good = json!({
        "id": "c1",
        "sender": "bounces@news.test",
        "from_domain": "news.test",
        "dkim": false,
        "template": TEMPLATE,
        "recipients": [
            {"email": "a@x.test", "name": "Ann", "code": "A1"},
            {"email": "b@x.test", "name": "Bob", "code": 7},
            {"email": "c@x.test", "name": "Cy", "code": true},
        ],
    });
    let corpus: Vec<Vec<u8>> = vec![
        serde_json::to_vec(&good).unwrap(),
        serde_json::to_vec_pretty(&good).unwrap(),
    ];
    let others: Vec<&[u8]> = corpus.iter().map(Vec::as_slice).collect();
    let dict: &[&[u8]] = &[
        b"null",
        b"[]",
        b"{}",
        b"\"\"",
        b"1e999",
        b"-0",
        b"\\u0000",
        b"\\n",
        b"\"~1/\":1,",
        b"\"a/b~\":\"x\",",
        b"\"email\":",
        b",",
        b"\"",
        b"{{name}}",
    ];
    let dir = TempDir::new("inject");
    fuzz("inject", |rng| {
        let mut v = good.clone();
        // Structure first: odd values and keys where the body has them.
        for _ in 0..rng.usize(..4) {
            let odd = [
                Value::Null,
                json!([]),
                json!({}),
                json!(""),
                json!(1.5),
                json!("line\nbreak"),
                json!("a,\"b\""),
                json!("\u{0}"),
                json!("x".repeat(70_000)),
                json!({"~": 1, "a/b": 2}),
            ];
            let value = odd[rng.usize(..odd.len())].clone();
            let key = [
                "id",
                "sender",
                "template",
                "recipients",
                "dkim",
                "a~b",
                "x/y",
                "tags",
            ][rng.usize(..8)];
            match rng.u8(..3) {
                0 => v[key] = value,
                1 => {
                    let i = rng.usize(..3);
                    if let Some(r) = v["recipients"].get_mut(i).and_then(Value::as_object_mut) {
                        r.insert(key.to_string(), value);
                    }
                }
                _ => {
                    let r = v["recipients"].as_array_mut();
                    if let Some(r) = r {
                        r.push(json!({"email": format!("{}@x.test", rng.u32(..)), key: value}));
                    }
                }
            }
        }
        let mut body = serde_json::to_vec(&v).unwrap();
        if rng.bool() {
            mutate(rng, &mut body, &others, dict);
        }
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0).unwrap();
        if let Err(problems) = stage(&body, &dir.0) {
            assert!(!problems.is_empty(), "refused without a problem");
            for p in &problems {
                let pointer_ok = p.pointer.is_empty() || p.pointer.starts_with('/');
                // RFC 6901: '~' only as "~0" or "~1".
                let escapes_ok = p
                    .pointer
                    .match_indices('~')
                    .all(|(i, _)| matches!(p.pointer.as_bytes().get(i + 1), Some(b'0' | b'1')));
                assert!(
                    pointer_ok && escapes_ok,
                    "bad pointer {:?} for {}",
                    p.pointer,
                    show(&body)
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------
// Target 5: pickup files and submitted messages

const CAMPAIGN_HEADER: &str = "X-Campaign-ID";

/// The prepared message: CRLF line ends only (and a last one when the input had
/// one), header lines within 998 octets, no campaign header left.
fn check_prepared(input: &[u8], out: &[u8]) {
    check_line_ends(out);
    if input.ends_with(b"\r\n") {
        assert!(out.ends_with(b"\r\n"), "last line end lost: {}", show(out));
    }
    let header_end = memchr_find(out, b"\r\n\r\n").map_or(out.len(), |i| i + 2);
    for line in out[..header_end].split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(line.len() <= 998, "header line of {} octets", line.len());
        if matches!(line.first(), Some(b' ' | b'\t')) {
            continue;
        }
        if let Some(colon) = line.iter().position(|&c| c == b':') {
            let name = line[..colon].trim_ascii_end();
            assert!(
                !name.eq_ignore_ascii_case(CAMPAIGN_HEADER.as_bytes()),
                "campaign header left in {}",
                show(out)
            );
        }
    }
}

/// CR and LF only together, as CRLF.
fn check_line_ends(out: &[u8]) {
    for (i, &c) in out.iter().enumerate() {
        match c {
            b'\r' => assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR in {}", show(out)),
            b'\n' => assert!(i > 0 && out[i - 1] == b'\r', "bare LF in {}", show(out)),
            _ => {}
        }
    }
}

fn memchr_find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn trace_for<'a>(rng: &mut Rng, helo: &'a str) -> volley::serve::submitted::Trace<'a> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    volley::serve::submitted::Trace {
        received_from_helo: helo,
        client_ip: match rng.u8(..3) {
            0 => None,
            1 => Some(IpAddr::V4(Ipv4Addr::from(rng.u32(..)))),
            _ => Some(IpAddr::V6(Ipv6Addr::from(rng.u128(..)))),
        },
        client_rdns: if rng.bool() { Some(helo) } else { None },
        by_host: "mta1.example.com",
        protocol: "ESMTPSA",
        tls: rng.bool().then_some("TLS_AES_256_GCM_SHA384"),
        auth_user: rng.bool().then_some(helo),
        queue_id: "Q1A2B3",
        for_rcpt: rng.bool().then_some("user@example.org"),
        now: std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(rng.u64(..4_000_000_000)),
    }
}

#[test]
fn submitted() {
    use volley::serve::submitted::{parse_pickup, prepare};
    const CORPUS: &[&[u8]] = &[
        b"X-Sender: <bounces@news.example.com>\nX-Receiver: <a@example.org>\nX-Receiver: b@example.org\nFrom: News <news@news.example.com>\nSubject: hi\nX-Campaign-ID: spring\n\nHello\n.\n",
        b"X-Sender: <>\r\nX-Receiver: <\"odd user\"@example.org>\r\nFrom: \"News, weekly\" <News@News.Example.COM>\r\nDate: Mon, 23 Nov 2026 09:00:00 +0000\r\nMessage-ID: <kept@news.example.com>\r\nx-campaign-id:\r\n spring\r\nSubject: hi\r\n\r\nbody\r\n",
        b"From: (comment) group: a@b.example, c@d.example;\r\nX-Campaign-ID : spring \r\nX-CAMPAIGN-ID: spring\r\nSubject: caf\xc3\xa9\r\n\r\n\r\nbody\r\n",
    ];
    let dict: &[&[u8]] = &[
        b"X-Sender: ",
        b"X-Receiver: <",
        b"X-Campaign-ID:",
        b"x-campaign-id :",
        b"\r\n\t",
        b"From: <",
        b"Message-ID: ",
        b"Date: ",
        b"@",
        b"(",
        b")",
        b"\\",
        b"\"",
    ];
    fuzz("submitted", |rng| {
        let mut input = CORPUS[rng.usize(..CORPUS.len())].to_vec();
        if rng.u8(..4) != 0 {
            mutate(rng, &mut input, CORPUS, dict);
        }
        let helo_bytes: Vec<u8> = (0..rng.usize(..300)).map(|_| rng.u8(..)).collect();
        let helo = String::from_utf8_lossy(&helo_bytes).into_owned();
        let trace = trace_for(rng, &helo);
        if let Ok(p) = parse_pickup(&input) {
            assert!(!p.recipients.is_empty());
            check_line_ends(&p.message);
            assert!(p.message.ends_with(b"\r\n"), "{}", show(&p.message));
            if let Ok(prepared) = prepare(&p.message, &trace, CAMPAIGN_HEADER, "fallback.example") {
                check_prepared(&p.message, &prepared.message);
            }
        }
        if let Ok(prepared) = prepare(&input, &trace, CAMPAIGN_HEADER, "fallback.example") {
            check_prepared(&input, &prepared.message);
            if let Some(c) = &prepared.campaign {
                assert!(!c.is_empty() && c.len() <= 64, "campaign value {c:?}");
            }
        }
    });
}
