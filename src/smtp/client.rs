//! The SMTP client session as a state machine: replies in, commands out, the
//! current time passed in. The shard's IO loop writes what `take_output` returns,
//! feeds what it reads to `receive`, and calls `handle_timeout` at `deadline`.
//!
//! Transactions are pipelined (RFC 2920) when the server offers PIPELINING: MAIL,
//! every RCPT and DATA in one write; with CHUNKING (RFC 3030) the content goes in
//! the same write as `BDAT <n> LAST`, so several transactions can be in flight on
//! one connection with no round trip between them (the window).

use super::reply::{Reply, ReplyParser};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// RFC 5321 §4.5.3.2 timeouts, and ours for the commands it does not name.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub greeting: Duration,
    pub ehlo: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    pub data: Duration,
    pub data_end: Duration,
    pub rset: Duration,
    pub quit: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(n * 60);
        Timeouts {
            greeting: m(5),
            ehlo: m(5),
            mail: m(5),
            rcpt: m(5),
            data: m(2),
            data_end: m(10),
            rset: m(2),
            quit: Duration::from_secs(30),
        }
    }
}

/// Whether to use STARTTLS (RFC 3207).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TlsMode {
    /// Never, even when offered.
    Disabled,
    /// When offered; in clear otherwise.
    #[default]
    Opportunistic,
    /// Never send in clear: a server without STARTTLS is a failure.
    Required,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub ehlo_name: String,
    pub timeouts: Timeouts,
    /// Transactions in flight on one connection when the server offers CHUNKING.
    pub window: usize,
    pub tls: TlsMode,
}

/// One message to one or more recipients.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// The caller's handle, returned in the events.
    pub id: u64,
    pub from: String,
    pub rcpts: Vec<String>,
    /// The rendered message, CRLF line endings, ending in CRLF.
    pub content: Vec<u8>,
}

/// Where in the transaction a recipient's final reply came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Mail,
    Rcpt,
    Data,
    /// Decided here without sending (e.g. over the server's SIZE).
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The session is established; transactions can be submitted.
    Ready,
    /// The server said 220 to STARTTLS: do the TLS handshake, then call `tls_established`.
    StartTls,
    /// A transaction is over; one reply per recipient, in order.
    TxDone {
        id: u64,
        replies: Vec<(Stage, Reply)>,
    },
    /// The connection ended before this transaction's outcome was known.
    TxAborted { id: u64, reason: String },
    /// The connection is finished; `error` says why when it was not a clean QUIT.
    Closed {
        error: Option<String>,
        greeting: Option<Reply>,
        /// Closed because TLS was required and could not be had.
        tls_refused: bool,
        /// The 421 with which the receiver closed a connection that sat idle (read
        /// before or as the first reply after its reuse): it judged no message, but
        /// shaping still hears of it.
        idle_close: Option<Reply>,
        /// The 421 with which the receiver closed a session that had carried nothing
        /// and had not sat idle (right after EHLO): a refusal, as at the greeting.
        refused: Option<Reply>,
    },
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Caps {
    pub pipelining: bool,
    pub chunking: bool,
    pub eightbitmime: bool,
    pub starttls: bool,
    pub smtputf8: bool,
    /// SIZE limit; 0 = none announced.
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Rset,
    Mail(u64),
    Rcpt(u64, usize),
    /// 354 to DATA.
    Data(u64),
    /// The reply after the content (end of DATA or BDAT LAST).
    DataEnd(u64),
    Quit,
}

/// What the reply answers, as an operator reads it in the log: "the reply to RCPT TO".
impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expect::Greeting => "greeting",
            Expect::Ehlo => "reply to Extended HELLO",
            Expect::Helo => "reply to HELLO",
            Expect::StartTls => "reply to STARTTLS",
            Expect::Rset => "reply to RSET",
            Expect::Mail(_) => "reply to MAIL FROM",
            Expect::Rcpt(..) => "reply to RCPT TO",
            Expect::Data(_) => "reply to DATA",
            Expect::DataEnd(_) => "reply to the end of the message data",
            Expect::Quit => "reply to QUIT",
        })
    }
}

struct TxState {
    tx: Transaction,
    mail: Option<Reply>,
    rcpt: Vec<Option<Reply>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    Ehlo,
    /// Waiting for the IO layer's TLS handshake.
    Handshake,
    Ready,
    Quitting,
    Closed,
}

pub struct ClientSession {
    cfg: ClientConfig,
    phase: Phase,
    caps: Caps,
    parser: ReplyParser,
    /// What to write, in order, in the pieces it was made in (none empty).
    out: Vec<Vec<u8>>,
    /// Replies awaited, in the order the commands went out.
    expect: VecDeque<Expect>,
    /// Commands not yet written (without PIPELINING they go one at a time).
    queued: VecDeque<(Vec<u8>, Expect)>,
    txs: VecDeque<TxState>,
    events: VecDeque<Event>,
    deadline: Option<Instant>,
    /// The last transaction may have left the server in a transaction: RSET first.
    needs_rset: bool,
    greeting: Option<Reply>,
    tls_active: bool,
    tls_refused: bool,
    /// Transactions finished on this connection.
    finished_txs: u64,
    /// When the last reply arrived (or the session began).
    last_reply_at: Instant,
    /// The transaction that reused this connection after it sat idle: a 421 as its
    /// first reply is the receiver's idle close, not a verdict on the message.
    reused_by: Option<u64>,
    idle_close: Option<Reply>,
    refused: Option<Reply>,
    /// Why the session is quitting when it could carry no mail (see `quit_with`).
    quit_reason: Option<String>,
}

/// A connection that waited this long since its last reply counts as reused by
/// the next transaction, even before it carried one (pacing can hold the first).
pub const IDLE_REUSE_MIN: Duration = Duration::from_secs(1);

/// The octets of `RCPT TO:<>` and its line end around an address.
const RCPT_FRAME: usize = "RCPT TO:<>\r\n".len();

fn push_rcpt(out: &mut Vec<u8>, rcpt: &str) {
    out.extend_from_slice(b"RCPT TO:<");
    out.extend_from_slice(rcpt.as_bytes());
    out.extend_from_slice(b">\r\n");
}

impl ClientSession {
    pub fn new(cfg: ClientConfig, now: Instant) -> Self {
        let mut s = ClientSession {
            cfg,
            phase: Phase::Greeting,
            caps: Caps::default(),
            parser: ReplyParser::default(),
            out: Vec::new(),
            expect: VecDeque::new(),
            queued: VecDeque::new(),
            txs: VecDeque::new(),
            events: VecDeque::new(),
            deadline: None,
            needs_rset: false,
            greeting: None,
            tls_active: false,
            tls_refused: false,
            finished_txs: 0,
            last_reply_at: now,
            reused_by: None,
            idle_close: None,
            refused: None,
            quit_reason: None,
        };
        s.expect.push_back(Expect::Greeting);
        s.arm(now);
        s
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// The IO layer finished the TLS handshake: say EHLO again and forget what the
    /// server offered in clear (RFC 3207 §4.2).
    pub fn tls_established(&mut self, now: Instant) {
        assert_eq!(
            self.phase,
            Phase::Handshake,
            "tls_established only after Event::StartTls"
        );
        self.tls_active = true;
        self.caps = Caps::default();
        self.phase = Phase::Ehlo;
        self.queue(
            format!("EHLO {}\r\n", self.cfg.ehlo_name).into_bytes(),
            Expect::Ehlo,
        );
        self.flush(now);
    }

    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Transactions submitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.txs.len()
    }

    /// Transactions in flight from now on (CHUNKING servers); ones already in
    /// flight over it finish first.
    pub fn set_window(&mut self, n: usize) {
        self.cfg.window = n;
    }

    /// Whether `submit` would be taken now.
    pub fn can_submit(&self) -> bool {
        if self.phase != Phase::Ready {
            return false;
        }
        let window = if self.caps.pipelining && self.caps.chunking {
            self.cfg.window.max(1)
        } else {
            1
        };
        self.txs.len() < window
    }

    /// Nothing in flight and nothing to write: the connection is idle.
    pub fn is_idle(&self) -> bool {
        self.expect.is_empty() && self.queued.is_empty() && self.out.is_empty()
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes to write now, in order, as the pieces they were made in (a
    /// transaction's commands and its content apart, so the content is never
    /// copied to join them); none is empty, and there are none when there is
    /// nothing to write.
    pub fn take_output(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.out)
    }

    pub fn submit(&mut self, tx: Transaction, now: Instant) {
        assert!(self.can_submit(), "submit called when can_submit is false");
        assert!(
            !tx.rcpts.is_empty(),
            "a transaction has at least one recipient"
        );
        let size = tx.content.len() as u64;
        // is_ascii goes a word at a time; a byte loop here was 8% of the CPU.
        let eight_bit = !tx.content.is_ascii();
        let utf8_addrs = !tx.from.is_ascii() || tx.rcpts.iter().any(|r| !r.is_ascii());
        if let Some(r) = self.refusal(&tx, size, eight_bit, utf8_addrs) {
            self.events.push_back(Event::TxDone {
                id: tx.id,
                replies: tx.rcpts.iter().map(|_| (Stage::Local, r.clone())).collect(),
            });
            return;
        }
        let id = tx.id;
        if self.is_idle()
            && self.txs.is_empty()
            && (self.finished_txs > 0 || now.duration_since(self.last_reply_at) >= IDLE_REUSE_MIN)
        {
            self.reused_by = Some(id);
        }
        if self.needs_rset || !self.txs.is_empty() {
            // A transaction still in flight may fail and leave the server mid-transaction.
            self.queue(b"RSET\r\n".to_vec(), Expect::Rset);
            self.needs_rset = false;
        }
        let mut tx = tx;
        let mut mail = format!("MAIL FROM:<{}>", tx.from);
        if self.caps.size > 0 {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if eight_bit {
            // refusal() made sure the server offers 8BITMIME (RFC 6152 §3).
            mail.push_str(" BODY=8BITMIME");
        }
        if self.caps.smtputf8 && (utf8_addrs || !header_section(&tx.content).is_ascii()) {
            // RFC 6531 §3.4: UTF-8 addresses or header fields (RFC 6532).
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");
        // With CHUNKING the content goes with BDAT and is not needed after; with DATA
        // it waits in the transaction for the 354.
        let (last_cmd, content, last) = if self.caps.chunking {
            let content = std::mem::take(&mut tx.content);
            (
                format!("BDAT {size} LAST\r\n"),
                content,
                Expect::DataEnd(id),
            )
        } else {
            ("DATA\r\n".to_string(), Vec::new(), Expect::Data(id))
        };
        if self.caps.pipelining {
            // The commands in one buffer built at its final size; the content after
            // them as it is (BDAT's, or nothing for DATA), not copied to join them.
            let rcpt_bytes: usize = tx.rcpts.iter().map(|r| r.len() + RCPT_FRAME).sum();
            let mut batch = Vec::with_capacity(mail.len() + rcpt_bytes + last_cmd.len());
            batch.extend_from_slice(mail.as_bytes());
            for r in &tx.rcpts {
                push_rcpt(&mut batch, r);
            }
            batch.extend_from_slice(last_cmd.as_bytes());
            self.queue(batch, Expect::Mail(id));
            for i in 0..tx.rcpts.len() {
                self.queue(Vec::new(), Expect::Rcpt(id, i));
            }
            self.queue(content, last);
        } else {
            self.queue(mail.into_bytes(), Expect::Mail(id));
            for (i, r) in tx.rcpts.iter().enumerate() {
                let mut cmd = Vec::with_capacity(r.len() + RCPT_FRAME);
                push_rcpt(&mut cmd, r);
                self.queue(cmd, Expect::Rcpt(id, i));
            }
            let mut cmd = last_cmd.into_bytes();
            cmd.extend_from_slice(&content);
            self.queue(cmd, last);
        }
        let n = tx.rcpts.len();
        self.txs.push_back(TxState {
            tx,
            mail: None,
            rcpt: vec![None; n],
        });
        self.flush(now);
    }

    /// Why `tx` cannot go to this server as it is, decided before anything is sent:
    /// over its SIZE (RFC 1870), 8-bit content to a server without 8BITMIME (RFC 6152
    /// §3: the caller converts to 7 bit before signing; what reaches here could not
    /// be), or a UTF-8 address to a server without SMTPUTF8 (RFC 6531 §3.2).
    fn refusal(
        &self,
        tx: &Transaction,
        size: u64,
        eight_bit: bool,
        utf8_addrs: bool,
    ) -> Option<Reply> {
        if self.caps.size > 0 && size > self.caps.size {
            return Some(Reply::new(
                552,
                Some("5.3.4"),
                &format!(
                    "message of {size} octets is over the server's SIZE limit of {}",
                    self.caps.size
                ),
            ));
        }
        if eight_bit && !self.caps.eightbitmime {
            return Some(Reply::new(
                554,
                Some("5.6.3"),
                "the message has 8-bit content that could not be converted to 7 bit, and the \
                 receiver does not offer 8BITMIME (RFC 6152); not sent",
            ));
        }
        if utf8_addrs && !self.caps.smtputf8 {
            let addr = std::iter::once(&tx.from)
                .chain(&tx.rcpts)
                .find(|a| !a.is_ascii())
                .expect("one is not ASCII");
            return Some(Reply::new(
                553,
                Some("5.6.7"),
                &format!(
                    "the address {addr} is not ASCII and the receiver does not offer SMTPUTF8 \
                     (RFC 6531); not sent"
                ),
            ));
        }
        None
    }

    /// Ends the session politely.
    pub fn quit(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Closed | Phase::Quitting) {
            return;
        }
        self.phase = Phase::Quitting;
        self.queue(b"QUIT\r\n".to_vec(), Expect::Quit);
        self.flush(now);
    }

    /// Ends a session that can carry no mail (greeting or EHLO refused, TLS required
    /// and not to be had) with QUIT, as every session ends (RFC 5321 §4.1.1.10; §3.1
    /// for a 554 greeting); once the server answers or closes, it is closed with `error`.
    fn quit_with(&mut self, error: String, now: Instant) {
        self.quit_reason = Some(error);
        self.quit(now);
    }

    /// The server closed the connection (read returned 0) or it broke.
    pub fn connection_lost(&mut self, why: &str) {
        if self.phase == Phase::Quitting && self.txs.is_empty() {
            let reason = self.quit_reason.take();
            self.close(reason);
        } else {
            self.close(Some(format!("connection lost: {why}")));
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(d) = self.deadline {
            if now >= d {
                let what = self
                    .expect
                    .front()
                    .map_or("reply".to_string(), |e| e.to_string());
                // A session quitting for a reason of its own keeps that reason.
                let reason = self.quit_reason.take().unwrap_or_else(|| {
                    format!(
                        "timeout waiting for the {what} (timeouts of RFC 5321 §4.5.3.2); the \
                         receiver is slow or stalled: volley tries again later, on another MX \
                         host if there is one"
                    )
                });
                self.close(Some(reason));
            }
        }
    }

    pub fn receive(&mut self, bytes: &[u8], now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
        self.parser.push(bytes);
        while let Some(r) = self.parser.next_reply() {
            match r {
                Ok(reply) => self.on_reply(reply, now),
                Err(e) => {
                    self.close(Some(format!("protocol error: {e}")));
                    return;
                }
            }
            if self.phase == Phase::Closed {
                return;
            }
        }
        self.flush(now);
    }

    fn queue(&mut self, bytes: Vec<u8>, e: Expect) {
        self.queued.push_back((bytes, e));
    }

    /// Moves queued commands to the output as far as the rules allow.
    fn flush(&mut self, now: Instant) {
        let was_idle = self.expect.is_empty();
        while let Some(&(_, e)) = self.queued.front() {
            if self.expect.is_empty() && self.skip_doomed(e) {
                continue;
            }
            let waiting = !self.expect.is_empty();
            // Without PIPELINING one command at a time; with it, nothing may follow
            // DATA until its 354, and QUIT goes alone.
            if waiting && (!self.caps.pipelining || matches!(e, Expect::Quit)) {
                break;
            }
            if self.expect.iter().any(|x| matches!(x, Expect::Data(_))) {
                break;
            }
            let (bytes, e) = self.queued.pop_front().expect("front exists");
            if !bytes.is_empty() {
                self.out.push(bytes);
            }
            self.expect.push_back(e);
        }
        if was_idle && !self.expect.is_empty() {
            self.arm(now);
        }
        if self.expect.is_empty() {
            self.deadline = None;
        }
    }

    /// Without PIPELINING each command waits for the reply before it, so a command
    /// whose transaction is already lost is not sent: no RCPT after a refused MAIL
    /// or after "too many recipients" (the rest take that reply), no DATA or BDAT
    /// after every RCPT was refused (RFC 5321 §3.3: DATA would only earn a 503).
    /// Drops `e` from the queue and finishes its transaction if so.
    fn skip_doomed(&mut self, e: Expect) -> bool {
        let (Expect::Rcpt(id, _) | Expect::Data(id) | Expect::DataEnd(id)) = e else {
            return false;
        };
        let Some(t) = self.txs.iter_mut().find(|t| t.tx.id == id) else {
            return false;
        };
        if let Expect::Rcpt(_, i) = e {
            // Out of recipients for this transaction: the rest would get the same
            // 452, one round trip each; they take it without asking.
            let full = t.rcpt.iter().flatten().find(|r| r.is_too_many_recipients());
            if let Some(full) = full.cloned() {
                t.rcpt[i] = Some(full);
                self.queued.pop_front();
                return true;
            }
        }
        let mail_refused = t.mail.as_ref().filter(|m| !m.is_positive()).cloned();
        let last_cmd = !matches!(e, Expect::Rcpt(..));
        let every_rcpt_refused = last_cmd
            && t.rcpt
                .iter()
                .all(|r| r.as_ref().is_some_and(|r| !r.is_positive()));
        let verdict = match (mail_refused, every_rcpt_refused) {
            (Some(m), _) => m,
            (None, true) => t
                .rcpt
                .last()
                .cloned()
                .flatten()
                .expect("every RCPT answered"),
            (None, false) => return false,
        };
        self.queued.pop_front();
        if last_cmd {
            // The server is left mid-transaction (or refused MAIL): RSET before the next.
            self.needs_rset = true;
            self.finish_tx(id, &verdict, Stage::Rcpt);
        }
        true
    }

    fn arm(&mut self, now: Instant) {
        let t = &self.cfg.timeouts;
        let d = match self.expect.front() {
            Some(Expect::Greeting) => t.greeting,
            Some(Expect::Ehlo | Expect::Helo | Expect::StartTls) => t.ehlo,
            Some(Expect::Rset) => t.rset,
            Some(Expect::Mail(_)) => t.mail,
            Some(Expect::Rcpt(..)) => t.rcpt,
            Some(Expect::Data(_)) => t.data,
            Some(Expect::DataEnd(_)) => t.data_end,
            Some(Expect::Quit) => t.quit,
            None => {
                self.deadline = None;
                return;
            }
        };
        self.deadline = Some(now + d);
    }

    fn tx_mut(&mut self, id: u64) -> &mut TxState {
        self.txs
            .iter_mut()
            .find(|t| t.tx.id == id)
            .expect("reply for a transaction in flight")
    }

    fn on_reply(&mut self, reply: Reply, now: Instant) {
        let sat_idle =
            self.finished_txs > 0 || now.duration_since(self.last_reply_at) >= IDLE_REUSE_MIN;
        self.last_reply_at = now;
        let reused_by = self.reused_by.take();
        let Some(e) = self.expect.pop_front() else {
            if reply.code == 421 && sat_idle {
                // RFC 5321 §3.8: a receiver may close an idle connection with a 421.
                self.close_idle(reply);
            } else if reply.code == 421 {
                // Right after EHLO, before any mail: the receiver refuses the session
                // (a connection limit, most often); reconnecting at once would storm it.
                let why = format!("the receiver closed the session before any mail: {reply}");
                self.refused = Some(reply);
                self.close(Some(why));
            } else {
                self.close(Some(format!(
                    "unexpected reply with nothing outstanding: {reply}"
                )));
            }
            return;
        };
        self.arm(now);
        // 421: the server is shutting the channel (RFC 5321 §3.8). Whatever it answered
        // gets the 421; everything behind it is aborted. As the first reply after the
        // connection sat idle, it is the receiver's idle timeout, older than the
        // command: every transaction goes again on a new connection, no attempt counted.
        let closing = reply.code == 421;
        // A 4.7.x is a throttle or policy verdict on this sender, not an idle timeout.
        let policy = reply
            .enhanced
            .as_deref()
            .is_some_and(|e| e.starts_with("4.7."));
        if closing && !policy && reused_by.is_some() && matches!(e, Expect::Mail(_) | Expect::Rset)
        {
            self.close_idle(reply);
            return;
        }
        let closing_reason = closing.then(|| format!("server closing: {reply}"));
        match e {
            Expect::Greeting => {
                if reply.code == 220 {
                    self.greeting = Some(reply);
                    self.phase = Phase::Ehlo;
                    let cmd = format!("EHLO {}\r\n", self.cfg.ehlo_name).into_bytes();
                    self.queue(cmd, Expect::Ehlo);
                } else {
                    let err = format!("greeting refused: {reply}");
                    self.greeting = Some(reply);
                    if closing {
                        self.close(Some(err));
                    } else {
                        self.quit_with(err, now);
                    }
                }
            }
            Expect::Ehlo => {
                if reply.code == 250 {
                    self.caps = parse_caps(&reply.text);
                    if !self.tls_active && self.cfg.tls != TlsMode::Disabled && self.caps.starttls {
                        self.queue(b"STARTTLS\r\n".to_vec(), Expect::StartTls);
                    } else if !self.tls_active && self.cfg.tls == TlsMode::Required {
                        self.tls_refused = true;
                        let why = "TLS is required and the server does not offer STARTTLS";
                        self.quit_with(why.into(), now);
                    } else {
                        self.ready();
                    }
                } else if reply.is_permanent() {
                    self.queue(
                        format!("HELO {}\r\n", self.cfg.ehlo_name).into_bytes(),
                        Expect::Helo,
                    );
                } else if closing {
                    self.close(Some(format!("Extended HELLO refused: {reply}")));
                } else {
                    self.quit_with(format!("Extended HELLO refused: {reply}"), now);
                }
            }
            Expect::StartTls => {
                if reply.code == 220 {
                    self.phase = Phase::Handshake;
                    // RFC 3207: anything the server sent after the 220 predates TLS; drop it.
                    self.parser = ReplyParser::default();
                    self.events.push_back(Event::StartTls);
                } else if self.cfg.tls == TlsMode::Required {
                    self.tls_refused = true;
                    let why = format!("TLS is required and STARTTLS was refused: {reply}");
                    if closing {
                        self.close(Some(why));
                    } else {
                        self.quit_with(why, now);
                    }
                } else {
                    self.ready();
                }
            }
            Expect::Helo => {
                if reply.code == 250 && self.cfg.tls == TlsMode::Required {
                    self.tls_refused = true;
                    let why = "TLS is required and the server refused Extended HELLO, so offers no STARTTLS";
                    self.quit_with(why.into(), now);
                    return;
                }
                if reply.code == 250 {
                    self.caps = Caps::default();
                    self.ready();
                } else if closing {
                    self.close(Some(format!("HELLO refused: {reply}")));
                } else {
                    self.quit_with(format!("HELLO refused: {reply}"), now);
                }
            }
            Expect::Rset => {}
            Expect::Mail(id) => {
                self.tx_mut(id).mail = Some(reply);
                if closing {
                    self.finish_tx_with(id, Stage::Mail);
                }
            }
            Expect::Rcpt(id, i) => {
                self.tx_mut(id).rcpt[i] = Some(reply);
                if closing {
                    self.finish_tx_with(id, Stage::Rcpt);
                }
            }
            Expect::Data(id) => {
                if reply.code == 354 {
                    let t = self.tx_mut(id);
                    let any = t.mail.as_ref().is_some_and(Reply::is_positive)
                        && t.rcpt
                            .iter()
                            .any(|r| r.as_ref().is_some_and(Reply::is_positive));
                    let mut body = Vec::new();
                    if any {
                        dot_stuff(&t.tx.content, &mut body);
                    }
                    // With no recipient accepted (a server that 354s anyway), send an empty message.
                    body.extend_from_slice(b".\r\n");
                    self.out.push(body);
                    self.expect.push_front(Expect::DataEnd(id));
                    self.arm(now);
                } else {
                    self.finish_tx(id, &reply, Stage::Data);
                    self.needs_rset = true;
                }
            }
            Expect::DataEnd(id) => {
                if !reply.is_positive() {
                    self.needs_rset = true;
                }
                self.finish_tx(id, &reply, Stage::Data);
            }
            Expect::Quit => {
                let reason = self.quit_reason.take();
                self.close(reason);
                return;
            }
        }
        if let Some(why) = closing_reason {
            self.close(Some(why));
        }
    }

    /// The receiver closed the connection while it sat idle (its 421 read before the
    /// connection was reused, or as the first reply after): nothing it answered was a
    /// verdict, so every transaction in flight is aborted, to go again elsewhere.
    fn close_idle(&mut self, reply: Reply) {
        let why = format!("the receiver closed the idle connection: {reply}");
        self.idle_close = Some(reply);
        self.close(Some(why));
    }

    fn ready(&mut self) {
        self.phase = Phase::Ready;
        self.events.push_back(Event::Ready);
    }

    /// The final reply for `id` is `data`: each recipient gets the first failure on
    /// its path (MAIL, then its RCPT), else `data`.
    fn finish_tx(&mut self, id: u64, data: &Reply, stage: Stage) {
        let Some(pos) = self.txs.iter().position(|t| t.tx.id == id) else {
            return;
        };
        let t = self.txs.remove(pos).expect("position valid");
        self.finished_txs += 1;
        let replies = t
            .rcpt
            .into_iter()
            .map(|r| match (&t.mail, r) {
                (Some(m), _) if !m.is_positive() => (Stage::Mail, m.clone()),
                (_, Some(r)) if !r.is_positive() => (Stage::Rcpt, r),
                _ => (stage, data.clone()),
            })
            .collect();
        self.events.push_back(Event::TxDone { id, replies });
        // Drop the remaining expectations of this transaction (after a refused DATA).
        self.expect.retain(|e| !matches!(e, Expect::Mail(x) | Expect::Rcpt(x, _) | Expect::Data(x) | Expect::DataEnd(x) if *x == id));
    }

    /// A 421 arrived at `stage` of `id`: recipients without a reply yet get the 421.
    fn finish_tx_with(&mut self, id: u64, stage: Stage) {
        let t = self.tx_mut(id);
        let r421 = match stage {
            Stage::Mail => t.mail.clone(),
            _ => t
                .rcpt
                .iter()
                .rev()
                .flatten()
                .find(|r| r.code == 421)
                .cloned(),
        }
        .expect("the 421 was just stored");
        for r in t.rcpt.iter_mut() {
            if r.is_none() {
                *r = Some(r421.clone());
            }
        }
        self.finish_tx(id, &r421, stage);
    }

    fn close(&mut self, error: Option<String>) {
        if self.phase == Phase::Closed {
            return;
        }
        let reason = error.clone().unwrap_or_else(|| "connection closed".into());
        for t in std::mem::take(&mut self.txs) {
            self.events.push_back(Event::TxAborted {
                id: t.tx.id,
                reason: reason.clone(),
            });
        }
        self.phase = Phase::Closed;
        self.expect.clear();
        self.queued.clear();
        self.deadline = None;
        self.events.push_back(Event::Closed {
            error,
            greeting: self.greeting.take(),
            tls_refused: self.tls_refused,
            idle_close: self.idle_close.take(),
            refused: self.refused.take(),
        });
    }
}

/// The header section of a rendered message: up to the first empty line.
fn header_section(content: &[u8]) -> &[u8] {
    memchr::memmem::find(content, b"\r\n\r\n").map_or(content, |end| &content[..end])
}

fn parse_caps(ehlo_text: &str) -> Caps {
    let mut c = Caps::default();
    // The first line is the greeting name; keywords follow, one per line.
    for line in ehlo_text.lines().skip(1) {
        let mut words = line.split_ascii_whitespace();
        let Some(kw) = words.next() else { continue };
        match kw.to_ascii_uppercase().as_str() {
            "PIPELINING" => c.pipelining = true,
            "CHUNKING" => c.chunking = true,
            "8BITMIME" => c.eightbitmime = true,
            "STARTTLS" => c.starttls = true,
            "SMTPUTF8" => c.smtputf8 = true,
            "SIZE" => c.size = words.next().and_then(|n| n.parse().ok()).unwrap_or(0),
            _ => {}
        }
    }
    c
}

/// Copies `content` with every line that starts with "." doubled (RFC 5321 §4.5.2),
/// making sure it ends in CRLF.
pub fn dot_stuff(content: &[u8], out: &mut Vec<u8>) {
    out.reserve(content.len() + 64);
    let mut at_line_start = true;
    let mut start = 0;
    for (i, &c) in content.iter().enumerate() {
        if at_line_start && c == b'.' {
            out.extend_from_slice(&content[start..i]);
            out.push(b'.');
            start = i;
        }
        at_line_start = c == b'\n';
    }
    out.extend_from_slice(&content[start..]);
    if !content.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ClientConfig {
        ClientConfig {
            ehlo_name: "me.test".into(),
            timeouts: Timeouts::default(),
            window: 4,
            tls: TlsMode::Opportunistic,
        }
    }

    fn tx(id: u64, rcpts: &[&str]) -> Transaction {
        Transaction {
            id,
            from: "b@s.test".into(),
            rcpts: rcpts.iter().map(|s| s.to_string()).collect(),
            content: b"Subject: x\r\n\r\n.dot\r\nbody\r\n".to_vec(),
        }
    }

    fn out(s: &mut ClientSession) -> String {
        String::from_utf8(s.take_output().concat()).unwrap()
    }

    fn events(s: &mut ClientSession) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn established(ehlo: &str) -> (ClientSession, Instant) {
        let now = Instant::now();
        let mut s = ClientSession::new(cfg(), now);
        assert_eq!(out(&mut s), "");
        s.receive(b"220 hi\r\n", now);
        assert_eq!(out(&mut s), "EHLO me.test\r\n");
        s.receive(ehlo.as_bytes(), now);
        assert_eq!(events(&mut s), vec![Event::Ready]);
        (s, now)
    }

    #[test]
    fn pipelined_data_with_partial_rejection() {
        let (mut s, now) = established("250-x\r\n250-PIPELINING\r\n250 SIZE 1000\r\n");
        s.submit(tx(7, &["a@d.test", "b@d.test"]), now);
        assert_eq!(
            out(&mut s),
            "MAIL FROM:<b@s.test> SIZE=26\r\nRCPT TO:<a@d.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n"
        );
        s.receive(
            b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n354 go\r\n",
            now,
        );
        assert_eq!(out(&mut s), "Subject: x\r\n\r\n..dot\r\nbody\r\n.\r\n");
        s.receive(b"250 2.0.0 queued\r\n", now);
        let ev = events(&mut s);
        let Event::TxDone { id: 7, replies } = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            replies[0],
            (Stage::Data, Reply::new(250, Some("2.0.0"), "queued"))
        );
        assert_eq!(
            replies[1],
            (Stage::Rcpt, Reply::new(550, Some("5.1.1"), "no such user"))
        );
        assert!(s.is_idle());
    }

    #[test]
    fn chunking_window_and_421_aborts_the_rest() {
        let (mut s, now) = established("250-x\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
        s.submit(tx(1, &["a@d.test"]), now);
        s.submit(tx(2, &["b@d.test"]), now);
        s.submit(tx(3, &["c@d.test"]), now);
        let o = out(&mut s);
        assert!(o.starts_with("MAIL FROM:<b@s.test>\r\nRCPT TO:<a@d.test>\r\nBDAT 26 LAST\r\nSubject: x\r\n\r\n.dot\r\n"));
        assert_eq!(
            o.matches("RSET").count(),
            2,
            "RSET before each transaction behind one in flight"
        );
        s.receive(b"250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n", now);
        s.receive(b"250 ok\r\n421 4.7.28 rate limited\r\n", now);
        let ev = events(&mut s);
        assert!(matches!(&ev[0], Event::TxDone { id: 1, replies } if replies[0].1.code == 250));
        assert!(matches!(&ev[1], Event::TxDone { id: 2, replies } if replies[0].1.code == 421));
        assert!(matches!(&ev[2], Event::TxAborted { id: 3, .. }));
        assert!(matches!(&ev[3], Event::Closed { error: Some(_), .. }));
    }

    #[test]
    fn no_pipelining_one_command_at_a_time_and_helo_fallback() {
        let now = Instant::now();
        let mut s = ClientSession::new(cfg(), now);
        s.receive(b"220 old\r\n", now);
        out(&mut s);
        s.receive(b"502 what\r\n", now);
        assert_eq!(out(&mut s), "HELO me.test\r\n");
        s.receive(b"250 hi\r\n", now);
        assert_eq!(events(&mut s), vec![Event::Ready]);
        s.submit(tx(1, &["a@d.test"]), now);
        assert_eq!(out(&mut s), "MAIL FROM:<b@s.test>\r\n");
        s.receive(b"250 ok\r\n", now);
        assert_eq!(out(&mut s), "RCPT TO:<a@d.test>\r\n");
        s.receive(b"250 ok\r\n", now);
        assert_eq!(out(&mut s), "DATA\r\n");
        s.receive(b"451 4.3.0 later\r\n", now);
        let ev = events(&mut s);
        assert!(
            matches!(&ev[0], Event::TxDone { id: 1, replies } if replies[0] == (Stage::Data, Reply::new(451, Some("4.3.0"), "later")))
        );
        s.submit(tx(2, &["a@d.test"]), now);
        assert_eq!(out(&mut s), "RSET\r\n");
    }

    #[test]
    fn timeouts_and_greeting_refusal() {
        let now = Instant::now();
        let mut s = ClientSession::new(cfg(), now);
        let d = s.deadline().unwrap();
        assert_eq!(d - now, Duration::from_secs(300));
        s.handle_timeout(d);
        assert!(matches!(
            events(&mut s)[0],
            Event::Closed { error: Some(_), .. }
        ));
        let mut s = ClientSession::new(cfg(), now);
        s.receive(b"554 5.7.1 go away\r\n", now);
        assert_eq!(out(&mut s), "QUIT\r\n");
        s.receive(b"221 bye\r\n", now);
        let ev = events(&mut s);
        assert!(matches!(&ev[0], Event::Closed { greeting: Some(r), .. } if r.code == 554));
    }

    #[test]
    fn size_limit_is_checked_before_sending() {
        let (mut s, now) = established("250-x\r\n250 SIZE 10\r\n");
        s.submit(tx(1, &["a@d.test"]), now);
        assert_eq!(out(&mut s), "");
        let ev = events(&mut s);
        assert!(
            matches!(&ev[0], Event::TxDone { replies, .. } if replies[0].0 == Stage::Local && replies[0].1.code == 552)
        );
    }

    #[test]
    fn starttls_then_ehlo_again_and_required_refuses_clear() {
        let (mut s, now) = (ClientSession::new(cfg(), Instant::now()), Instant::now());
        s.receive(b"220 hi\r\n", now);
        out(&mut s);
        s.receive(b"250-x\r\n250-STARTTLS\r\n250 PIPELINING\r\n", now);
        assert_eq!(out(&mut s), "STARTTLS\r\n");
        s.receive(
            b"220 go ahead\r\n250 injected before the handshake\r\n",
            now,
        );
        assert_eq!(events(&mut s), vec![Event::StartTls]);
        s.tls_established(now);
        assert_eq!(out(&mut s), "EHLO me.test\r\n");
        s.receive(b"250-x\r\n250 PIPELINING\r\n", now);
        assert_eq!(events(&mut s), vec![Event::Ready]);
        assert!(s.tls_active());

        let mut c = cfg();
        c.tls = TlsMode::Required;
        let mut s = ClientSession::new(c, now);
        s.receive(b"220 hi\r\n", now);
        assert_eq!(out(&mut s), "EHLO me.test\r\n");
        s.receive(b"250 x\r\n", now);
        assert_eq!(
            out(&mut s),
            "QUIT\r\n",
            "no mail in clear; the session ends politely"
        );
        assert_eq!(events(&mut s), vec![]);
        s.receive(b"221 bye\r\n", now);
        let ev = events(&mut s);
        assert!(
            matches!(
                &ev[0],
                Event::Closed {
                    tls_refused: true,
                    error: Some(e),
                    ..
                } if e.contains("does not offer STARTTLS")
            ),
            "{ev:?}"
        );
    }

    #[test]
    fn without_pipelining_no_rcpt_follows_too_many_recipients() {
        let (mut s, now) = established("250-x\r\n250 SIZE 1000\r\n");
        s.submit(tx(1, &["a@d.test", "b@d.test", "c@d.test"]), now);
        assert_eq!(out(&mut s), "MAIL FROM:<b@s.test> SIZE=26\r\n");
        s.receive(b"250 ok\r\n", now);
        assert_eq!(out(&mut s), "RCPT TO:<a@d.test>\r\n");
        s.receive(b"250 ok\r\n", now);
        assert_eq!(out(&mut s), "RCPT TO:<b@d.test>\r\n");
        s.receive(b"452 4.5.3 Too many recipients\r\n", now);
        assert_eq!(out(&mut s), "DATA\r\n", "c takes b's 452 without asking");
        s.receive(b"354 go\r\n", now);
        out(&mut s);
        s.receive(b"250 2.0.0 queued\r\n", now);
        let ev = events(&mut s);
        let Event::TxDone { replies, .. } = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(replies[0].1.code, 250);
        assert!(replies[1..]
            .iter()
            .all(|(st, r)| *st == Stage::Rcpt && r.is_too_many_recipients()));
    }

    #[test]
    fn a_session_that_can_carry_no_mail_still_ends_with_quit() {
        let now = Instant::now();
        // A 554 greeting (RFC 5321 §3.1), then EHLO and HELO both refused.
        let mut s = ClientSession::new(cfg(), now);
        s.receive(b"554 5.7.1 no mail from you\r\n", now);
        assert_eq!(out(&mut s), "QUIT\r\n");
        s.connection_lost("closed by the server");
        let ev = events(&mut s);
        assert!(
            matches!(&ev[0], Event::Closed { error: Some(e), .. } if e.contains("greeting refused: 554")),
            "{ev:?}"
        );
        let mut s = ClientSession::new(cfg(), now);
        s.receive(b"220 hi\r\n", now);
        out(&mut s);
        s.receive(b"550 no EHLO\r\n", now);
        assert_eq!(out(&mut s), "HELO me.test\r\n");
        s.receive(b"550 5.7.1 no HELO either\r\n", now);
        assert_eq!(out(&mut s), "QUIT\r\n");
        s.receive(b"221 bye\r\n", now);
        let ev = events(&mut s);
        assert!(
            matches!(&ev[0], Event::Closed { error: Some(e), .. } if e.contains("HELLO refused: 550 5.7.1")),
            "{ev:?}"
        );
        // A 421 greeting closes the channel itself: nothing to say.
        let mut s = ClientSession::new(cfg(), now);
        s.receive(b"421 4.7.0 busy\r\n", now);
        assert_eq!(out(&mut s), "");
        assert!(matches!(events(&mut s)[0], Event::Closed { .. }));
    }

    #[test]
    fn dot_stuffing() {
        let mut o = Vec::new();
        dot_stuff(b".a\r\nb.\r\n.\r\n..c", &mut o);
        assert_eq!(o, b"..a\r\nb.\r\n..\r\n...c\r\n");
    }

    /// The reason a session gives for carrying no mail becomes the deferral's text, and
    /// the classifier reads texts: volley's own words must not pull a deferral into
    /// another class than its code gives (RFC 5321 names HELO and EHLO, and so do the
    /// receivers' replies about the client's HELO name, which are `auth_failed`).
    #[test]
    fn the_reasons_a_session_gives_do_not_change_the_class() {
        use crate::policy::classify::Classifier;
        let now = Instant::now();
        let required = || ClientConfig {
            tls: TlsMode::Required,
            ..cfg()
        };
        // (config, the server's replies in order, whether to time out at the end)
        let cases: [(ClientConfig, &[&str], bool); 7] = [
            (cfg(), &["220 hi"], true),
            (cfg(), &["220 hi", "502 what"], true),
            (cfg(), &["220 hi", "450 busy"], false),
            (cfg(), &["220 hi", "502 what", "550 no"], false),
            (required(), &["220 hi", "250 x"], false),
            (required(), &["220 hi", "502 what", "250 x"], false),
            (
                required(),
                &["220 hi", "250-x\r\n250 STARTTLS", "454 4.7.0 later"],
                false,
            ),
        ];
        let c = Classifier::shipped();
        for (config, replies, time_out) in cases {
            let mut s = ClientSession::new(config, now);
            for r in replies {
                s.receive(format!("{r}\r\n").as_bytes(), now);
                out(&mut s);
            }
            if time_out {
                s.handle_timeout(s.deadline().unwrap());
            } else {
                s.receive(b"221 bye\r\n", now);
            }
            let ev = events(&mut s);
            let Some(Event::Closed {
                error: Some(why),
                tls_refused,
                ..
            }) = ev.last()
            else {
                panic!("{replies:?}: {ev:?}")
            };
            // As connection.rs defers a session that carried no mail.
            let enhanced = if *tls_refused { "4.7.4" } else { "4.4.2" };
            let class = |text: &str| c.classify(&Reply::new(451, Some(enhanced), text)).class;
            assert_eq!(class(why), class("x"), "{why}");
        }
    }
}
