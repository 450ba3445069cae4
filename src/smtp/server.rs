//! A sans-IO ESMTP server session: bytes in, replies out, decisions asked of a
//! [`Behaviour`]. Two IO loops drive it, each thin glue: the load tool's sink, and
//! `volley serve`'s submission listener (RFC 6409). The sink runs with
//! [`ServerPolicy::sink`] (no AUTH, anyone may send, no session limits); the listener
//! adds through its own [`ServerPolicy`] what a submission server needs: AUTH
//! (RFC 4954: PLAIN, LOGIN, CRAM-MD5), relay protection and per-session limits.
//!
//! The IO loop's part, in order:
//! 1. write [`ServerSession::greeting`], or the output of
//!    [`ServerSession::early_talker`] if the client wrote before the greeting was sent;
//! 2. [`ServerSession::feed`] what the client sends and act on each [`Output`]: sleep
//!    `delay_ms`, write `write`, then upgrade to TLS and call
//!    [`ServerSession::tls_started`] on `start_tls`, or close on `close`;
//! 3. when a decision takes time (a spool commit, a password hash) the behaviour says
//!    [`Verdict::Pending`]: the session stops ([`ServerSession::is_waiting`]), keeps
//!    what the client pipelined meanwhile, and goes on when the loop hands it the
//!    decision through [`ServerSession::resolve`]. Until then the loop should stop
//!    reading, so that TCP holds a pipelining client back rather than this buffer.
//!
//! No sockets and no clock (but for the CRAM-MD5 challenge, see
//! [`cram_md5_challenge`]), which is what lets the bad-input cases (bare LF, smuggling,
//! oversize lines, BDAT mismatches, pipelining past a refusal) be tested as calls.

use std::cell::{Ref, RefCell};
use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// Longest command line we accept, CRLF included. RFC 5321 says 512; real servers
/// take more, and we only need to stop unbounded buffering.
pub const COMMAND_LINE_MAX: usize = 2048;
/// Longest text line in DATA, CRLF included (RFC 5321 §4.5.3.1.6).
pub const TEXT_LINE_MAX: usize = 1000;
/// Recipients per transaction, the sink's `rcpts_max` (RFC 5321 §4.5.3.1.8 asks
/// servers to take at least 100).
pub const RCPTS_PER_MESSAGE_MAX: usize = 1000;
/// Longest client response inside an AUTH exchange, CRLF included: RFC 4954 §4 names
/// 12288 octets as enough for deployed mechanisms. Longer gets
/// `500 5.5.6 Authentication exchange line is too long` and ends the exchange.
pub const AUTH_LINE_MAX: usize = 12288;

/// RFC 4954 §6: the credentials were refused.
const AUTH_INVALID: &str = "535 5.7.8 Authentication credentials invalid";
/// RFC 4954 §4: a response that is not base64.
const UNDECODABLE: &str = "501 5.5.2 Cannot decode response";
const PENDING_ELSEWHERE: &str =
    "Verdict::Pending is for Behaviour::message and Behaviour::auth only";

/// What the behaviour decides for one step of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Reply with this full reply line (code, enhanced code, text; no CRLF).
    Reply(String),
    /// Reply with this line, then close the connection (a 421).
    ReplyAndClose(String),
    /// Drop the connection without a word (a receiver that dies mid-transaction).
    Disconnect,
    /// Decided later, through [`ServerSession::resolve`]: the message is not yet
    /// durable, the password not yet checked. Only [`Behaviour::message`] and
    /// [`Behaviour::auth`] may say it; from any other step it is a bug, and panics.
    Pending,
}

/// A message the client finished sending.
pub struct Message<'a> {
    pub from: &'a str,
    pub rcpts: &'a [String],
    /// Owned and in a cell: a behaviour that reads the content borrows it, one that
    /// hands it to another thread (the spool writer) takes it; neither copies.
    content: RefCell<Vec<u8>>,
}

impl Message<'_> {
    /// The content with dot-stuffing removed, CRLF line endings as sent.
    pub fn content(&self) -> Ref<'_, [u8]> {
        Ref::map(self.content.borrow(), Vec::as_slice)
    }

    /// Moves the content out without a copy; [`Message::content`] is empty after.
    /// Panics while a borrow from [`Message::content`] is alive.
    pub fn take_content(&self) -> Vec<u8> {
        std::mem::take(&mut *self.content.borrow_mut())
    }
}

/// A SASL mechanism a listener may offer (RFC 4954).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616: `[authzid] NUL user NUL password` in one response.
    Plain,
    /// The de facto LOGIN (draft-murchison-sasl-login): user, then password, each
    /// after its own prompt.
    Login,
    /// RFC 2195: the user and an HMAC-MD5 of the server's challenge keyed with the
    /// password, so the password never crosses the wire.
    CramMd5,
}

impl Mechanism {
    /// The name said in EHLO and in the AUTH command.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::CramMd5 => "CRAM-MD5",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [Mechanism::Plain, Mechanism::Login, Mechanism::CramMd5]
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(name))
    }
}

/// The credentials of one AUTH exchange, decoded; [`Behaviour::auth`] checks them.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthAttempt {
    Plain {
        user: String,
        password: String,
    },
    Login {
        user: String,
        password: String,
    },
    /// Accept when `digest_hex` is the HMAC-MD5 of `challenge` keyed with the user's
    /// password (RFC 2195 §2). Lowercase hex, 32 digits (the session checked the form).
    CramMd5 {
        user: String,
        challenge: String,
        digest_hex: String,
    },
}

impl AuthAttempt {
    pub fn mechanism(&self) -> Mechanism {
        match self {
            AuthAttempt::Plain { .. } => Mechanism::Plain,
            AuthAttempt::Login { .. } => Mechanism::Login,
            AuthAttempt::CramMd5 { .. } => Mechanism::CramMd5,
        }
    }

    pub fn user(&self) -> &str {
        match self {
            AuthAttempt::Plain { user, .. }
            | AuthAttempt::Login { user, .. }
            | AuthAttempt::CramMd5 { user, .. } => user,
        }
    }

    fn into_user(self) -> String {
        match self {
            AuthAttempt::Plain { user, .. }
            | AuthAttempt::Login { user, .. }
            | AuthAttempt::CramMd5 { user, .. } => user,
        }
    }
}

/// Without the secret, so that an attempt can be logged.
impl fmt::Debug for AuthAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthAttempt")
            .field("mechanism", &self.mechanism())
            .field("user", &self.user())
            .finish_non_exhaustive()
    }
}

/// The commands whose replies a profile may delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Ehlo,
    Mail,
    Rcpt,
    Data,
    /// The reply after the message content (end of DATA or BDAT LAST).
    DataEnd,
    Other,
}

/// The receiver's policy: the sink's profile and the submission listener implement it.
pub trait Behaviour {
    fn mail_from(&mut self, from: &str) -> Verdict;
    fn rcpt(&mut self, from: &str, rcpt: &str) -> Verdict;
    /// Called when DATA/BDAT starts; a `Disconnect` here drops the connection
    /// part-way through the content.
    fn data_start(&mut self) -> Verdict;
    /// The finished message. `Accept` is answered `250`, which hands responsibility
    /// for the message to us (RFC 5321 §6.1): a listener says `Pending` until the
    /// message is durable in the spool.
    fn message(&mut self, msg: &Message<'_>) -> Verdict;
    fn delay_ms(&mut self, cmd: Command) -> u64;
    /// Checks one AUTH exchange's credentials: `Accept` authenticates the session
    /// (`235`), `Reply` refuses (RFC 4954 §6 suggests `535 5.7.8`, or `454 4.7.0` for a
    /// temporary failure) and counts towards `auth_failures_max`; `Pending` while a
    /// password hash is checked elsewhere. Receivers that offer no AUTH never get here.
    fn auth(&mut self, _attempt: &AuthAttempt) -> Verdict {
        Verdict::Reply(AUTH_INVALID.to_string())
    }
}

/// What the IO loop must do after feeding bytes in.
#[derive(Debug, Default)]
pub struct Output {
    /// Replies to write, in order.
    pub write: Vec<u8>,
    /// Sleep this long before writing (simulated receiver latency).
    pub delay_ms: u64,
    /// After writing, upgrade to TLS (the 220 to STARTTLS is in `write`).
    pub start_tls: bool,
    /// After writing, close the connection.
    pub close: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Before EHLO/HELO.
    Fresh,
    /// Greeted, no transaction.
    Ready,
    /// MAIL accepted.
    Mail,
    /// Reading DATA content.
    Data,
    /// Reading `remaining` octets of a BDAT chunk.
    Bdat {
        remaining: usize,
        last: bool,
    },
    /// Inside an AUTH exchange, waiting for the client's next response line.
    Auth(Exchange),
    /// Discarding a command line that was too long, until its LF.
    SkipLine,
    Closed,
}

/// The client response an AUTH exchange waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Exchange {
    /// PLAIN's one response, after an empty challenge.
    Plain,
    LoginUser,
    LoginPassword {
        user: String,
    },
    CramMd5 {
        challenge: String,
    },
}

/// The step whose decision the behaviour gives later.
enum Waiting {
    Message,
    /// The user to record once the attempt is accepted.
    Auth {
        user: String,
    },
}

/// What the server offers on the wire; the same for the sink and the listener.
pub struct ServerConfig {
    pub hostname: String,
    /// Largest message (RFC 1870 SIZE): a larger `SIZE=` at MAIL or a larger content
    /// gets `552 5.3.4 Message size exceeds fixed limit`.
    pub size_max: usize,
    pub offer_starttls: bool,
    /// Offer PIPELINING and CHUNKING (off: an old-fashioned receiver).
    pub offer_pipelining: bool,
    pub offer_chunking: bool,
}

/// Who may send through this server and how much one session may ask: what a
/// submission listener (RFC 6409) adds to the sink. Kept beside [`ServerConfig`] so
/// that the sink and the simulation, which build that one, need not know of it.
#[derive(Debug, Clone)]
pub struct ServerPolicy {
    /// Said after the hostname in the 220 greeting.
    pub banner: String,
    /// AUTH mechanisms offered, in this order in EHLO. Empty: no AUTH, and the AUTH
    /// command is unknown (`502 5.5.2 Command not recognized`).
    pub auth: Vec<Mechanism>,
    /// Offer and accept AUTH before TLS. Off by default, as RFC 4954 §4 and RFC 4616
    /// §6 ask for passwords: until TLS is active AUTH is not advertised and gets
    /// `538 5.7.11 Encryption required for requested authentication mechanism`.
    pub auth_before_tls: bool,
    /// AUTH exchanges per session that may end without success (refused, malformed,
    /// cancelled); the next such ending gets `421 4.7.0 Too many authentication
    /// failures` and the session closes. 0: no limit.
    pub auth_failures_max: u32,
    /// Mail only from authenticated clients and from those the IO loop says may relay
    /// ([`ServerSession::set_client`]). Any other client's MAIL gets
    /// `530 5.7.0 Authentication required` when AUTH can be used now, `530 5.7.0
    /// Must issue a STARTTLS command first` when it can after STARTTLS, else its
    /// RCPTs get `554 5.7.1 Relay access denied`.
    pub relay_needs_auth: bool,
    /// Recipients per transaction; the next gets `452 4.5.3 Too many recipients`.
    pub rcpts_max: usize,
    /// Command lines per session (AUTH responses and content do not count); the next
    /// gets `421 4.7.0 Too many commands` and the session closes. 0: no limit.
    pub commands_max: u32,
    /// Longest DATA content line, CRLF included (at least `TEXT_LINE_MAX`): a longer
    /// one refuses the message with `500 5.5.6 Line too long` after its end.
    pub text_line_max: usize,
}

impl ServerPolicy {
    /// The sink's: an open receiver with no AUTH and no session limits.
    pub fn sink() -> Self {
        ServerPolicy {
            banner: "ESMTP volley-load sink".to_string(),
            auth: Vec::new(),
            auth_before_tls: false,
            auth_failures_max: 0,
            relay_needs_auth: false,
            rcpts_max: RCPTS_PER_MESSAGE_MAX,
            commands_max: 0,
            text_line_max: TEXT_LINE_MAX,
        }
    }
}

/// The server side of one SMTP connection; the module doc says how to drive it.
pub struct ServerSession<'c> {
    cfg: &'c ServerConfig,
    policy: &'c ServerPolicy,
    state: State,
    input: Vec<u8>,
    tls_active: bool,
    esmtp: bool,
    /// The name the client gave in its last EHLO/HELO (for the Received field).
    helo: String,
    from: String,
    rcpts: Vec<String>,
    content: Vec<u8>,
    /// Set when the current message broke a rule; the reply is sent once the
    /// client finishes sending it, so the stream stays in sync.
    content_error: Option<&'static str>,
    /// BDAT chunks were used in this transaction (DATA is then out of order).
    bdat_used: bool,
    /// The state to return to once an over-long command line has been skipped.
    skip_state: State,
    /// The previous DATA line ended in CRLF: only then can "." CRLF end the data
    /// (a "." after a bare LF is the SMTP smuggling pattern).
    data_after_crlf: bool,
    /// The client's address is one the listener lets relay ([`Self::set_client`]).
    may_relay: bool,
    /// Who AUTH proved the client to be.
    user: Option<String>,
    /// AUTH exchanges that ended without success, for `auth_failures_max`.
    auth_failures: u32,
    /// Command lines so far, for `commands_max`.
    commands: u32,
    /// A decision the behaviour gives later; input is held until then.
    waiting: Option<Waiting>,
}

impl<'c> ServerSession<'c> {
    /// A session with the sink's policy ([`ServerPolicy::sink`]).
    pub fn new(cfg: &'c ServerConfig) -> Self {
        static SINK: OnceLock<ServerPolicy> = OnceLock::new();
        Self::with_policy(cfg, SINK.get_or_init(ServerPolicy::sink))
    }

    /// A session under `policy`: the submission listener's.
    pub fn with_policy(cfg: &'c ServerConfig, policy: &'c ServerPolicy) -> Self {
        ServerSession {
            cfg,
            policy,
            state: State::Fresh,
            input: Vec::new(),
            tls_active: false,
            esmtp: false,
            helo: String::new(),
            from: String::new(),
            rcpts: Vec::new(),
            content: Vec::new(),
            content_error: None,
            bdat_used: false,
            skip_state: State::Fresh,
            data_after_crlf: true,
            may_relay: false,
            user: None,
            auth_failures: 0,
            commands: 0,
            waiting: None,
        }
    }

    pub fn greeting(&self) -> Vec<u8> {
        format!("220 {} {}\r\n", self.cfg.hostname, self.policy.banner).into_bytes()
    }

    /// For a client that wrote before the greeting was sent. RFC 5321 §3.1 has the
    /// client wait for it; talking first is a spam engine's shortcut (Postfix's
    /// postscreen calls it pregreet), so the session refuses and closes.
    pub fn early_talker(&mut self) -> Output {
        let mut out = Output::default();
        reply(
            &mut out,
            "554 5.5.0 Protocol error: commands sent before the greeting",
        );
        self.close(&mut out);
        out
    }

    /// Whether the client's address may relay without AUTH (the listener's relay
    /// networks); matters only with [`ServerPolicy::relay_needs_auth`].
    pub fn set_client(&mut self, may_relay: bool) {
        self.may_relay = may_relay;
    }

    /// Called by the IO loop once the TLS handshake is done: RFC 3207 §4.2 says
    /// everything learnt before is forgotten, an identity from AUTH included.
    pub fn tls_started(&mut self) {
        assert!(
            self.waiting.is_none(),
            "STARTTLS is answered only when no decision is pending"
        );
        self.tls_active = true;
        self.state = State::Fresh;
        self.input.clear();
        self.user = None;
        self.reset_transaction();
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Reading message content (DATA or BDAT): the listener's data timeout applies,
    /// not its command timeout.
    pub fn in_content(&self) -> bool {
        matches!(self.state, State::Data | State::Bdat { .. })
    }

    /// A step's decision is [`Verdict::Pending`]: call [`Self::resolve`] with it.
    pub fn is_waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// The user AUTH authenticated, if any.
    /// The name the client gave in EHLO or HELO ("" before it), and whether it was EHLO.
    pub fn helo(&self) -> (&str, bool) {
        (&self.helo, self.esmtp)
    }

    pub fn authenticated(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Feed bytes read from the client; returns what to write. While
    /// [`Self::is_waiting`], the bytes are only kept and nothing is returned.
    pub fn feed(&mut self, bytes: &[u8], b: &mut dyn Behaviour) -> Output {
        let mut out = Output::default();
        self.input.extend_from_slice(bytes);
        self.process(&mut out, b);
        out
    }

    /// Gives the decision the behaviour said was [`Verdict::Pending`]: writes that
    /// step's reply, then goes on with the input kept meanwhile.
    pub fn resolve(&mut self, v: Verdict, b: &mut dyn Behaviour) -> Output {
        let waiting = self
            .waiting
            .take()
            .expect("resolve is called only while is_waiting");
        assert!(v != Verdict::Pending, "resolve takes the decision itself");
        let mut out = Output::default();
        match waiting {
            Waiting::Message => self.message_verdict(v, &mut out),
            Waiting::Auth { user } => self.auth_verdict(v, user, &mut out),
        }
        self.process(&mut out, b);
        out
    }

    /// Handles the buffered input until it runs out, the session closes or starts
    /// TLS, or a decision is pending.
    fn process(&mut self, out: &mut Output, b: &mut dyn Behaviour) {
        let mut pos = 0;
        while pos < self.input.len() && !out.close && !out.start_tls && self.waiting.is_none() {
            let taken = match self.state {
                State::Closed => break,
                State::Data => self.take_data_line(pos, out, b),
                State::Bdat { remaining, last } => {
                    Some(self.take_bdat(pos, remaining, last, out, b))
                }
                State::SkipLine => Some(self.skip_line(pos)),
                _ => self.take_command_line(pos, out, b),
            };
            let Some(n) = taken else { break };
            pos += n;
        }
        if pos == self.input.len() {
            // Hand the buffer back to the allocator rather than keep it per connection:
            // with hundreds of connections, per-connection buffers are cold in cache and
            // the next connection's read reuses this one while it is warm.
            self.input = Vec::new();
        } else {
            self.input.drain(..pos);
        }
        if out.start_tls {
            // Bytes pipelined after STARTTLS are an injection attempt (CVE-2011-0411).
            self.input.clear();
        }
    }

    /// Takes one command line, or one AUTH response line, from `input[pos..]`;
    /// returns octets consumed, or None when no complete line is buffered yet.
    fn take_command_line(
        &mut self,
        pos: usize,
        out: &mut Output,
        b: &mut dyn Behaviour,
    ) -> Option<usize> {
        let in_auth = matches!(self.state, State::Auth(_));
        let max = if in_auth {
            AUTH_LINE_MAX
        } else {
            COMMAND_LINE_MAX
        };
        let rest = &self.input[pos..];
        let (len, complete) = match find_lf(rest) {
            Some(i) => (i + 1, true),
            None if rest.len() > max => (rest.len(), false),
            None => return None,
        };
        // A bare LF as a command terminator is how SMTP smuggling starts.
        let bare_lf = complete && (len < 2 || rest[len - 2] != b'\r');
        // A CR inside the line would be echoed (EHLO's greeting) as a broken reply line.
        let bare_cr = complete && !bare_lf && rest[..len - 2].contains(&b'\r');
        if !in_auth && self.over_commands_max(out) {
            return Some(len);
        }
        let refusal = if len > max && in_auth {
            Some("500 5.5.6 Authentication exchange line is too long")
        } else if len > max {
            Some("500 5.5.2 Line too long")
        } else if bare_lf {
            Some("500 5.5.2 Bare LF in command; lines end in CRLF")
        } else if bare_cr {
            Some("500 5.5.2 Bare CR in command; CR only in the CRLF that ends a line")
        } else {
            None
        };
        match refusal {
            Some(r) if in_auth => self.auth_failed(out, r),
            Some(r) => reply(out, r),
            None => {
                let line = self.input[pos..pos + len - 2].to_vec();
                if in_auth {
                    self.auth_response(&line, out, b);
                } else {
                    self.command(&line, out, b);
                }
            }
        }
        if !complete && !out.close {
            self.skip_state = self.state.clone();
            self.state = State::SkipLine;
        }
        Some(len)
    }

    /// Counts a command line; past `commands_max` the session ends.
    fn over_commands_max(&mut self, out: &mut Output) -> bool {
        self.commands = self.commands.saturating_add(1);
        let max = self.policy.commands_max;
        if max == 0 || self.commands <= max {
            return false;
        }
        reply(out, "421 4.7.0 Too many commands");
        self.close(out);
        true
    }

    fn skip_line(&mut self, pos: usize) -> usize {
        match find_lf(&self.input[pos..]) {
            Some(i) => {
                self.state = self.skip_state.clone();
                i + 1
            }
            None => self.input.len() - pos,
        }
    }

    /// Takes up to `remaining` octets of a BDAT chunk from `input[pos..]`; returns
    /// octets consumed.
    fn take_bdat(
        &mut self,
        pos: usize,
        remaining: usize,
        last: bool,
        out: &mut Output,
        b: &mut dyn Behaviour,
    ) -> usize {
        let n = remaining.min(self.input.len() - pos);
        if self.content_error.is_none() {
            if self.content.len() + n > self.cfg.size_max {
                self.content_error = Some("552 5.3.4 Message size exceeds fixed limit");
            } else {
                self.content.extend_from_slice(&self.input[pos..pos + n]);
            }
        }
        let remaining = remaining - n;
        if remaining > 0 {
            self.state = State::Bdat { remaining, last };
        } else {
            self.state = State::Mail;
            self.chunk_done(last, out, b);
        }
        n
    }

    fn reset_transaction(&mut self) {
        self.from.clear();
        self.rcpts.clear();
        // Released, not cleared: see `process`.
        self.content = Vec::new();
        self.content_error = None;
        self.bdat_used = false;
        if !matches!(self.state, State::Fresh | State::Closed) {
            self.state = State::Ready;
        }
    }

    fn close(&mut self, out: &mut Output) {
        out.close = true;
        self.state = State::Closed;
    }

    /// AUTH can be used now: offered, and TLS is active or not asked for.
    fn auth_usable(&self) -> bool {
        !self.policy.auth.is_empty() && (self.tls_active || self.policy.auth_before_tls)
    }

    /// The policy wants AUTH or a relay address, and the client has neither.
    fn relay_barred(&self) -> bool {
        self.policy.relay_needs_auth && !self.may_relay && self.user.is_none()
    }

    fn command(&mut self, line: &[u8], out: &mut Output, b: &mut dyn Behaviour) {
        let Ok(line) = std::str::from_utf8(line) else {
            reply(out, "500 5.5.2 Command is not valid UTF-8");
            return;
        };
        let (verb, arg) = match line.find(' ') {
            Some(i) => (&line[..i], line[i + 1..].trim()),
            None => (line, ""),
        };
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" | "HELO" => self.ehlo(verb, arg, out, b),
            "STARTTLS" => self.starttls(arg, out),
            "AUTH" if !self.policy.auth.is_empty() => self.auth(arg, out, b),
            "MAIL" => self.mail(arg, out, b),
            "RCPT" => self.rcpt(arg, out, b),
            "DATA" => self.data(arg, out, b),
            "BDAT" => self.bdat(arg, out, b),
            "RSET" => {
                self.reset_transaction();
                reply(out, "250 2.0.0 Ok");
            }
            "NOOP" => reply(out, "250 2.0.0 Ok"),
            "QUIT" => {
                reply(out, "221 2.0.0 Bye");
                self.close(out);
            }
            "VRFY" => reply(out, "252 2.0.0 Cannot VRFY user"),
            "" => reply(out, "500 5.5.2 Empty command"),
            _ => reply(out, "502 5.5.2 Command not recognized"),
        }
    }

    fn ehlo(&mut self, verb: &str, arg: &str, out: &mut Output, b: &mut dyn Behaviour) {
        if arg.is_empty() {
            return reply(out, "501 5.5.4 Syntax: EHLO hostname");
        }
        out.delay_ms += b.delay_ms(Command::Ehlo);
        self.esmtp = verb.eq_ignore_ascii_case("EHLO");
        self.helo = arg.to_string();
        self.state = State::Ready;
        self.reset_transaction();
        if !self.esmtp {
            return reply(out, &format!("250 {}", self.cfg.hostname));
        }
        let mut r = String::new();
        let _ = write!(r, "250-{} greets {}\r\n", self.cfg.hostname, arg);
        if self.cfg.offer_pipelining {
            r.push_str("250-PIPELINING\r\n");
        }
        let _ = write!(r, "250-SIZE {}\r\n", self.cfg.size_max);
        r.push_str("250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n");
        if self.cfg.offer_starttls && !self.tls_active {
            r.push_str("250-STARTTLS\r\n");
        }
        if self.auth_usable() {
            r.push_str("250-AUTH");
            for m in &self.policy.auth {
                r.push(' ');
                r.push_str(m.name());
            }
            r.push_str("\r\n");
        }
        if self.cfg.offer_chunking {
            r.push_str("250-CHUNKING\r\n");
        }
        r.push_str("250 HELP\r\n");
        out.write.extend_from_slice(r.as_bytes());
    }

    fn starttls(&mut self, arg: &str, out: &mut Output) {
        if !self.cfg.offer_starttls || self.tls_active {
            reply(out, "502 5.5.1 STARTTLS not available");
        } else if !arg.is_empty() {
            reply(out, "501 5.5.4 Syntax: STARTTLS");
        } else if self.state == State::Fresh {
            reply(out, "503 5.5.1 Send EHLO first");
        } else {
            reply(out, "220 2.0.0 Ready to start TLS");
            out.start_tls = true;
        }
    }

    fn mail(&mut self, arg: &str, out: &mut Output, b: &mut dyn Behaviour) {
        if self.state == State::Fresh {
            return reply(out, "503 5.5.1 Send EHLO/HELO first");
        }
        if self.state == State::Mail {
            return reply(out, "503 5.5.1 Nested MAIL command");
        }
        let Some(addr) = path_arg(arg, "FROM:") else {
            return reply(out, "501 5.5.4 Syntax: MAIL FROM:<address>");
        };
        if let Some(size) = param(arg, "SIZE") {
            // RFC 1870 §6: refuse at MAIL what would be refused after the content.
            match size.parse::<usize>() {
                Ok(n) if n > self.cfg.size_max => {
                    return reply(out, "552 5.3.4 Message size exceeds fixed limit");
                }
                Ok(_) => {}
                Err(_) => return reply(out, "501 5.5.4 Bad SIZE parameter"),
            }
        }
        if self.relay_barred() && self.auth_usable() {
            // RFC 4954 §6: the client can fix this with AUTH, so say so before it
            // sends recipients.
            return reply(out, "530 5.7.0 Authentication required");
        }
        if self.relay_barred()
            && !self.policy.auth.is_empty()
            && self.cfg.offer_starttls
            && !self.tls_active
        {
            // AUTH is there after STARTTLS: the client can fix this too (Postfix's
            // words for the same case).
            return reply(out, "530 5.7.0 Must issue a STARTTLS command first");
        }
        out.delay_ms += b.delay_ms(Command::Mail);
        match b.mail_from(addr) {
            Verdict::Accept => {
                self.from = addr.to_string();
                self.state = State::Mail;
                reply(out, "250 2.1.0 Ok");
            }
            v => self.apply(v, out),
        }
    }

    fn rcpt(&mut self, arg: &str, out: &mut Output, b: &mut dyn Behaviour) {
        if self.state != State::Mail {
            return reply(out, "503 5.5.1 Need MAIL command");
        }
        let Some(addr) = path_arg(arg, "TO:") else {
            return reply(out, "501 5.5.4 Syntax: RCPT TO:<address>");
        };
        if addr.is_empty() || !addr.contains('@') {
            return reply(out, "501 5.1.3 Bad recipient address syntax");
        }
        if self.relay_barred() {
            // AUTH cannot help now (not offered, or not before TLS): a plain refusal.
            return reply(out, "554 5.7.1 Relay access denied");
        }
        if self.rcpts.len() >= self.policy.rcpts_max {
            return reply(out, "452 4.5.3 Too many recipients");
        }
        out.delay_ms += b.delay_ms(Command::Rcpt);
        match b.rcpt(&self.from, addr) {
            Verdict::Accept => {
                self.rcpts.push(addr.to_string());
                reply(out, "250 2.1.5 Ok");
            }
            v => self.apply(v, out),
        }
    }

    fn data(&mut self, arg: &str, out: &mut Output, b: &mut dyn Behaviour) {
        if !arg.is_empty() {
            return reply(out, "501 5.5.4 Syntax: DATA");
        }
        let refusal = if self.state != State::Mail || self.bdat_used {
            Some("503 5.5.1 Bad sequence of commands")
        } else if self.rcpts.is_empty() {
            Some("554 5.5.1 No valid recipients")
        } else {
            None
        };
        if let Some(r) = refusal {
            if (self.relay_barred() || self.policy.relay_needs_auth) && self.state != State::Fresh {
                // A client pipelining past its refused MAIL or RCPTs would have its
                // content read as commands (a body line `RCPT TO:` would join the
                // open transaction). RFC 5321 §4.1.1.4 lets the server answer 354 here
                // and RFC 2920 §3.1 has clients expect it: take the content and
                // discard it, and refuse after its end. The sink keeps the plain
                // refusal, as most receivers answer.
                self.content_error = Some(r);
                self.state = State::Data;
                self.data_after_crlf = true;
                return reply(out, "354 End data with <CR><LF>.<CR><LF>");
            }
            return reply(out, r);
        }
        out.delay_ms += b.delay_ms(Command::Data);
        match b.data_start() {
            Verdict::Accept => {
                self.state = State::Data;
                reply(out, "354 End data with <CR><LF>.<CR><LF>");
            }
            v => self.apply(v, out),
        }
        self.data_after_crlf = true;
    }

    fn bdat(&mut self, arg: &str, out: &mut Output, b: &mut dyn Behaviour) {
        let mut parts = arg.split_ascii_whitespace();
        let size = parts.next().and_then(|s| s.parse::<usize>().ok());
        let last = match parts.next() {
            None => false,
            Some(p) if p.eq_ignore_ascii_case("LAST") => true,
            Some(_) => {
                reply(out, "501 5.5.4 Syntax: BDAT size [LAST]");
                return;
            }
        };
        let Some(size) = size.filter(|_| parts.next().is_none()) else {
            // The chunk size is unknown, so the stream cannot be resynchronised.
            reply(out, "501 5.5.4 Syntax: BDAT size [LAST]; closing");
            self.close(out);
            return;
        };
        // A chunk must be consumed even when refused, or its bytes would be read as commands.
        let refusal = if self.state != State::Mail {
            Some("503 5.5.1 Need MAIL command")
        } else if self.rcpts.is_empty() {
            Some("554 5.5.1 No valid recipients")
        } else {
            None
        };
        if let Some(r) = refusal {
            self.content_error = Some(r);
            self.state = State::Bdat {
                remaining: size,
                last: true,
            };
            if size == 0 {
                self.state = State::Mail;
                self.chunk_done(true, out, b);
            }
            return;
        }
        if !self.bdat_used {
            self.bdat_used = true;
            let v = b.data_start();
            assert!(v != Verdict::Pending, "{PENDING_ELSEWHERE}");
            if v == Verdict::Disconnect {
                self.close(out);
                return;
            }
        }
        self.state = State::Bdat {
            remaining: size,
            last,
        };
        if size == 0 {
            self.state = State::Mail;
            self.chunk_done(last, out, b);
        }
    }

    fn chunk_done(&mut self, last: bool, out: &mut Output, b: &mut dyn Behaviour) {
        if !last {
            if let Some(e) = self.content_error {
                if e.starts_with("503") || e.starts_with("554") {
                    reply(out, e);
                    self.reset_transaction();
                    return;
                }
            }
            reply(out, "250 2.0.0 Chunk received");
            return;
        }
        self.finish_message(out, b);
    }

    fn finish_message(&mut self, out: &mut Output, b: &mut dyn Behaviour) {
        if let Some(e) = self.content_error {
            reply(out, e);
        } else {
            out.delay_ms += b.delay_ms(Command::DataEnd);
            let msg = Message {
                from: &self.from,
                rcpts: &self.rcpts,
                content: RefCell::new(std::mem::take(&mut self.content)),
            };
            let verdict = b.message(&msg);
            drop(msg);
            if verdict == Verdict::Pending {
                // The transaction is over for the client; only its reply waits.
                self.waiting = Some(Waiting::Message);
            } else {
                self.message_verdict(verdict, out);
            }
        }
        if !out.close {
            self.state = State::Ready;
        }
        self.reset_transaction();
    }

    fn message_verdict(&mut self, v: Verdict, out: &mut Output) {
        match v {
            Verdict::Accept => reply(out, "250 2.0.0 Ok: queued"),
            v => self.apply(v, out),
        }
    }

    /// Takes one line of DATA content from `input[pos..]`; returns octets consumed, or
    fn line_too_long(&self) -> &'static str {
        match self.policy.text_line_max == TEXT_LINE_MAX {
            true => "500 5.5.6 Line too long (over 1000 octets)",
            false => "500 5.5.6 Line too long (over this server's line_length_max)",
        }
    }

    /// None when no complete line is buffered yet.
    fn take_data_line(
        &mut self,
        pos: usize,
        out: &mut Output,
        b: &mut dyn Behaviour,
    ) -> Option<usize> {
        let rest = &self.input[pos..];
        let Some(i) = find_lf(rest) else {
            // Keep at most one over-long line's worth buffered; flag it and drop the excess.
            if rest.len() > self.policy.text_line_max {
                self.content_error.get_or_insert(self.line_too_long());
                // Keep the last octet: it may be the CR of this line's CRLF.
                // What follows is the rest of this line, so it cannot be the "."
                // CRLF that ends the data, whatever octets it starts with.
                self.data_after_crlf = false;
                return Some(rest.len() - 1);
            }
            return None;
        };
        let line_len = i + 1;
        let crlf = i > 0 && rest[i - 1] == b'\r';
        // Length first: a long line fed in pieces is flagged before its end is seen,
        // and the reply must not depend on where the client's writes were cut.
        if line_len > self.policy.text_line_max {
            self.content_error.get_or_insert(self.line_too_long());
        }
        if !crlf {
            // Bare LF: never an end of data (smuggling guard), and refused at the end.
            self.content_error
                .get_or_insert("550 5.6.11 Bare LF in message content; lines must end in CRLF");
        } else if self.data_after_crlf && &rest[..line_len] == b".\r\n" {
            self.finish_message(out, b);
            return Some(line_len);
        }
        self.data_after_crlf = crlf;
        if self.content_error.is_none() {
            let line = &self.input[pos..pos + line_len];
            let body = if line.first() == Some(&b'.') {
                &line[1..]
            } else {
                line
            };
            if self.content.len() + body.len() > self.cfg.size_max {
                self.content_error = Some("552 5.3.4 Message size exceeds fixed limit");
            } else {
                self.content.extend_from_slice(body);
            }
        }
        Some(line_len)
    }

    /// AUTH (RFC 4954 §4): once per session, outside a transaction, with a mechanism
    /// offered, over TLS unless the policy says otherwise.
    fn auth(&mut self, arg: &str, out: &mut Output, b: &mut dyn Behaviour) {
        let mut parts = arg.split_ascii_whitespace();
        let (Some(name), initial, None) = (parts.next(), parts.next(), parts.next()) else {
            return reply(out, "501 5.5.4 Syntax: AUTH mechanism [initial-response]");
        };
        if self.state == State::Fresh || !self.esmtp {
            return reply(out, "503 5.5.1 Send EHLO first");
        }
        if self.user.is_some() {
            return reply(out, "503 5.5.1 Already authenticated");
        }
        if self.state == State::Mail {
            return reply(
                out,
                "503 5.5.1 AUTH not permitted during a mail transaction",
            );
        }
        let Some(mechanism) = Mechanism::from_name(name).filter(|m| self.policy.auth.contains(m))
        else {
            return reply(out, "504 5.5.4 Unrecognized authentication mechanism");
        };
        if !self.auth_usable() {
            return reply(
                out,
                "538 5.7.11 Encryption required for requested authentication mechanism",
            );
        }
        match (mechanism, initial) {
            (Mechanism::Plain, Some(r)) => self.plain(r.as_bytes(), out, b),
            (Mechanism::Plain, None) => self.challenge("", Exchange::Plain, out),
            (Mechanism::Login, Some(r)) => self.login_user(r.as_bytes(), out),
            (Mechanism::Login, None) => self.challenge("Username:", Exchange::LoginUser, out),
            // The server speaks first in CRAM-MD5 (RFC 2195 §2).
            (Mechanism::CramMd5, Some(_)) => {
                self.auth_failed(out, "501 5.5.2 CRAM-MD5 takes no initial response")
            }
            (Mechanism::CramMd5, None) => {
                let challenge = cram_md5_challenge(&self.cfg.hostname);
                let text = challenge.clone();
                self.challenge(&text, Exchange::CramMd5 { challenge }, out);
            }
        }
    }

    /// Sends a 334 with `text` in base64 and waits for the client's response.
    fn challenge(&mut self, text: &str, next: Exchange, out: &mut Output) {
        reply(out, &format!("334 {}", BASE64.encode(text)));
        self.state = State::Auth(next);
    }

    /// One response line inside an AUTH exchange; `*` cancels (RFC 4954 §4).
    fn auth_response(&mut self, line: &[u8], out: &mut Output, b: &mut dyn Behaviour) {
        let State::Auth(exchange) = std::mem::replace(&mut self.state, State::Ready) else {
            unreachable!("auth_response is called inside an AUTH exchange only");
        };
        if line == b"*" {
            return self.auth_failed(out, "501 5.0.0 Authentication cancelled");
        }
        match exchange {
            Exchange::Plain => self.plain(line, out, b),
            Exchange::LoginUser => self.login_user(line, out),
            Exchange::LoginPassword { user } => match decode_login(line) {
                Ok(password) => self.attempt(AuthAttempt::Login { user, password }, out, b),
                Err(r) => self.auth_failed(out, r),
            },
            Exchange::CramMd5 { challenge } => match decode_cram_md5(line) {
                Ok((user, digest_hex)) => self.attempt(
                    AuthAttempt::CramMd5 {
                        user,
                        challenge,
                        digest_hex,
                    },
                    out,
                    b,
                ),
                Err(r) => self.auth_failed(out, r),
            },
        }
    }

    fn plain(&mut self, response: &[u8], out: &mut Output, b: &mut dyn Behaviour) {
        match decode_plain(response) {
            Ok((user, password)) => self.attempt(AuthAttempt::Plain { user, password }, out, b),
            Err(r) => self.auth_failed(out, r),
        }
    }

    fn login_user(&mut self, response: &[u8], out: &mut Output) {
        match decode_login(response) {
            Ok(user) => self.challenge("Password:", Exchange::LoginPassword { user }, out),
            Err(r) => self.auth_failed(out, r),
        }
    }

    fn attempt(&mut self, attempt: AuthAttempt, out: &mut Output, b: &mut dyn Behaviour) {
        let verdict = b.auth(&attempt);
        let user = attempt.into_user();
        if verdict == Verdict::Pending {
            self.waiting = Some(Waiting::Auth { user });
        } else {
            self.auth_verdict(verdict, user, out);
        }
    }

    fn auth_verdict(&mut self, v: Verdict, user: String, out: &mut Output) {
        match v {
            Verdict::Accept => {
                self.user = Some(user);
                reply(out, "235 2.7.0 Authentication successful");
            }
            Verdict::Reply(r) => self.auth_failed(out, &r),
            v => self.apply(v, out),
        }
    }

    /// Ends an AUTH exchange without success: `refusal`, or past `auth_failures_max`
    /// a 421 and the end of the session, so passwords cannot be tried without end.
    fn auth_failed(&mut self, out: &mut Output, refusal: &str) {
        self.state = State::Ready;
        self.auth_failures = self.auth_failures.saturating_add(1);
        let max = self.policy.auth_failures_max;
        if max > 0 && self.auth_failures > max {
            reply(out, "421 4.7.0 Too many authentication failures");
            self.close(out);
        } else {
            reply(out, refusal);
        }
    }

    fn apply(&mut self, v: Verdict, out: &mut Output) {
        match v {
            Verdict::Accept => reply(out, "250 2.0.0 Ok"),
            Verdict::Reply(r) => reply(out, &r),
            Verdict::ReplyAndClose(r) => {
                reply(out, &r);
                self.close(out);
            }
            Verdict::Disconnect => {
                // Replies to earlier pipelined commands were sent before the "crash".
                self.close(out);
            }
            Verdict::Pending => panic!("{PENDING_ELSEWHERE}"),
        }
    }
}

fn reply(out: &mut Output, line: &str) {
    out.write.extend_from_slice(line.as_bytes());
    out.write.extend_from_slice(b"\r\n");
}

fn find_lf(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// `FROM:<a@b> SIZE=10` → `a@b`. Accepts the common `FROM: <a@b>` variant.
fn path_arg<'a>(arg: &'a str, key: &str) -> Option<&'a str> {
    // `get`, not indexing: a client's UTF-8 may put a char across the key's end.
    arg.get(..key.len())
        .filter(|k| k.eq_ignore_ascii_case(key))?;
    let rest = arg[key.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some(&rest[..end])
}

fn param<'a>(arg: &'a str, name: &str) -> Option<&'a str> {
    arg.split_ascii_whitespace().skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.eq_ignore_ascii_case(name).then_some(v)
    })
}

/// An AUTH response decoded from base64 to text: PLAIN and LOGIN carry UTF-8
/// (RFC 4616 §2), CRAM-MD5 ASCII.
fn decode_text(response: &[u8]) -> Option<String> {
    String::from_utf8(BASE64.decode(response).ok()?).ok()
}

/// One LOGIN response, the user or the password: neither may be empty.
fn decode_login(response: &[u8]) -> Result<String, &'static str> {
    match decode_text(response) {
        Some(text) if text.is_empty() => Err("501 5.5.2 Empty LOGIN response"),
        Some(text) => Ok(text),
        None => Err(UNDECODABLE),
    }
}

/// RFC 4616 §2: `[authzid] NUL authcid NUL passwd` → (user, password). An authzid
/// other than the user's own would be acting for someone else, which we do not offer.
fn decode_plain(response: &[u8]) -> Result<(String, String), &'static str> {
    const MALFORMED: &str = "501 5.5.2 Malformed PLAIN response";
    let text = decode_text(response).ok_or(UNDECODABLE)?;
    let mut parts = text.split('\0');
    let (Some(authzid), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(MALFORMED);
    };
    if user.is_empty() || password.is_empty() {
        return Err(MALFORMED);
    }
    if !authzid.is_empty() && authzid != user {
        return Err("535 5.7.8 Authorization identity must be empty or the user's own");
    }
    Ok((user.to_string(), password.to_string()))
}

/// RFC 2195 §2: `user SP digest`, the digest 32 hex digits → (user, lowercase digest).
fn decode_cram_md5(response: &[u8]) -> Result<(String, String), &'static str> {
    let text = decode_text(response).ok_or(UNDECODABLE)?;
    match text.rsplit_once(' ') {
        Some((user, digest))
            if !user.is_empty()
                && digest.len() == 32
                && digest.bytes().all(|c| c.is_ascii_hexdigit()) =>
        {
            Ok((user.to_string(), digest.to_ascii_lowercase()))
        }
        _ => Err("501 5.5.2 Malformed CRAM-MD5 response"),
    }
}

/// RFC 2195 §2: a challenge in msg-id form, `<random.unixtime@hostname>`, new for each
/// exchange so that a digest seen once cannot be replayed. The one place the session
/// reads the clock: only the challenge's uniqueness depends on it, never a decision.
fn cram_md5_challenge(hostname: &str) -> String {
    let unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("<{}.{unix_s}@{hostname}>", fastrand::u64(..))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};

    const PASSWORD: &str = "secret";

    /// Accepts every address; accepts the password [`PASSWORD`]; keeps what reaches it.
    #[derive(Default)]
    struct Recorder {
        messages: Vec<(String, Vec<String>, Vec<u8>)>,
        attempts: Vec<AuthAttempt>,
        /// Say `Pending` for messages and AUTH, as the listener does.
        pending: bool,
    }

    impl Behaviour for Recorder {
        fn mail_from(&mut self, _: &str) -> Verdict {
            Verdict::Accept
        }
        fn rcpt(&mut self, _: &str, _: &str) -> Verdict {
            Verdict::Accept
        }
        fn data_start(&mut self) -> Verdict {
            Verdict::Accept
        }
        fn message(&mut self, msg: &Message<'_>) -> Verdict {
            let content = msg.take_content();
            self.messages
                .push((msg.from.to_string(), msg.rcpts.to_vec(), content));
            if self.pending {
                Verdict::Pending
            } else {
                Verdict::Accept
            }
        }
        fn delay_ms(&mut self, _: Command) -> u64 {
            0
        }
        fn auth(&mut self, a: &AuthAttempt) -> Verdict {
            self.attempts.push(a.clone());
            let ok = match a {
                AuthAttempt::Plain { password, .. } | AuthAttempt::Login { password, .. } => {
                    password == PASSWORD
                }
                AuthAttempt::CramMd5 {
                    challenge,
                    digest_hex,
                    ..
                } => *digest_hex == cram_md5_digest(PASSWORD, challenge),
            };
            if self.pending {
                Verdict::Pending
            } else if ok {
                Verdict::Accept
            } else {
                Verdict::Reply(AUTH_INVALID.to_string())
            }
        }
    }

    fn cram_md5_digest(password: &str, challenge: &str) -> String {
        let mut mac = Hmac::<md5::Md5>::new_from_slice(password.as_bytes()).unwrap();
        mac.update(challenge.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn config() -> ServerConfig {
        ServerConfig {
            hostname: "mx.test".into(),
            size_max: 1000,
            offer_starttls: true,
            offer_pipelining: true,
            offer_chunking: true,
        }
    }

    /// A submission listener's: all mechanisms, over TLS only, relay needs AUTH.
    fn submission() -> ServerPolicy {
        ServerPolicy {
            banner: "ESMTP volley".into(),
            auth: vec![Mechanism::Plain, Mechanism::Login, Mechanism::CramMd5],
            auth_before_tls: false,
            auth_failures_max: 0,
            relay_needs_auth: true,
            rcpts_max: RCPTS_PER_MESSAGE_MAX,
            commands_max: 0,
            text_line_max: TEXT_LINE_MAX,
        }
    }

    fn talk(s: &mut ServerSession<'_>, b: &mut Recorder, input: &str) -> String {
        String::from_utf8(s.feed(input.as_bytes(), b).write).unwrap()
    }

    /// A session past TLS and EHLO, where a submission client says AUTH.
    fn after_tls<'c>(
        cfg: &'c ServerConfig,
        policy: &'c ServerPolicy,
        b: &mut Recorder,
    ) -> ServerSession<'c> {
        let mut s = ServerSession::with_policy(cfg, policy);
        s.tls_started();
        let ehlo = talk(&mut s, b, "EHLO client.test\r\n");
        assert!(ehlo.ends_with("250 HELP\r\n"), "{ehlo}");
        s
    }

    fn b64(s: &str) -> String {
        BASE64.encode(s)
    }

    #[test]
    fn the_sink_policy_offers_no_auth_and_keeps_its_banner() {
        let cfg = config();
        let mut b = Recorder::default();
        let mut s = ServerSession::new(&cfg);
        assert_eq!(s.greeting(), b"220 mx.test ESMTP volley-load sink\r\n");
        s.tls_started();
        let ehlo = talk(&mut s, &mut b, "EHLO c.test\r\n");
        assert!(!ehlo.contains("AUTH"), "{ehlo}");
        let r = talk(&mut s, &mut b, &format!("AUTH PLAIN {}\r\n", b64("\0u\0p")));
        assert_eq!(r, "502 5.5.2 Command not recognized\r\n");
        assert!(b.attempts.is_empty());
    }

    #[test]
    fn a_cr_inside_a_command_line_is_refused_not_echoed() {
        let cfg = config();
        let mut b = Recorder::default();
        let mut s = ServerSession::new(&cfg);
        let r = talk(&mut s, &mut b, "EHLO c\rRSET\r\nNOOP\r\n");
        assert_eq!(
            r,
            "500 5.5.2 Bare CR in command; CR only in the CRLF that ends a line\r\n250 2.0.0 Ok\r\n"
        );
    }

    #[test]
    fn a_multibyte_char_across_the_end_of_from_is_a_syntax_error_not_a_panic() {
        let cfg = config();
        let mut b = Recorder::default();
        let mut s = ServerSession::new(&cfg);
        let r = talk(
            &mut s,
            &mut b,
            "EHLO c\r\nMAIL \u{e9}\u{e9}\u{e9}FROM:<a@b.c>\r\n",
        );
        assert!(
            r.ends_with("\r\n501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
            "{r}"
        );
        let r = talk(
            &mut s,
            &mut b,
            "MAIL FROM:<a@b.c>\r\nRCPT \u{e9}\u{e9}TO:<a@b.c>\r\n",
        );
        assert_eq!(r, "250 2.1.0 Ok\r\n501 5.5.4 Syntax: RCPT TO:<address>\r\n");
    }

    /// What the session writes for `input` fed in two pieces, cut at `cut`.
    fn fed_in_two(input: &[u8], cut: usize) -> Vec<u8> {
        let cfg = config();
        let mut b = Recorder::default();
        let mut s = ServerSession::new(&cfg);
        let mut write = s.feed(&input[..cut], &mut b).write;
        write.extend(s.feed(&input[cut..], &mut b).write);
        write
    }

    #[test]
    fn a_long_data_line_ending_in_a_bare_lf_gets_one_refusal_however_it_is_cut() {
        let mut input = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n".to_vec();
        let data = input.len();
        input.extend(vec![b'x'; 1200]);
        input.extend(b"\n\r\n.\r\n");
        let whole = fed_in_two(&input, input.len());
        assert!(
            whole.ends_with(b"500 5.5.6 Line too long (over 1000 octets)\r\n"),
            "{}",
            String::from_utf8_lossy(&whole)
        );
        assert_eq!(fed_in_two(&input, data + 1100), whole);
    }

    #[test]
    fn a_long_data_line_ending_in_a_dot_does_not_end_the_data_when_cut_after_the_dot() {
        let mut input = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n".to_vec();
        input.extend(vec![b'x'; 1200]);
        input.push(b'.');
        let dot_end = input.len();
        // Smuggled: read as commands if the data ended at the dot.
        input.extend(b"\r\nRSET\r\n.\r\n");
        let whole = fed_in_two(&input, input.len());
        assert!(
            whole.ends_with(b"354 End data with <CR><LF>.<CR><LF>\r\n500 5.5.6 Line too long (over 1000 octets)\r\n"),
            "{}",
            String::from_utf8_lossy(&whole)
        );
        assert_eq!(
            String::from_utf8_lossy(&fed_in_two(&input, dot_end)),
            String::from_utf8_lossy(&whole)
        );
    }

    #[test]
    fn the_greeting_says_the_configured_banner() {
        let (cfg, policy) = (config(), submission());
        let s = ServerSession::with_policy(&cfg, &policy);
        assert_eq!(s.greeting(), b"220 mx.test ESMTP volley\r\n");
    }

    #[test]
    fn auth_before_tls_is_not_advertised_and_gets_538() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = ServerSession::with_policy(&cfg, &policy);
        let ehlo = talk(&mut s, &mut b, "EHLO c.test\r\n");
        assert!(!ehlo.contains("AUTH"), "{ehlo}");
        let r = talk(
            &mut s,
            &mut b,
            &format!("AUTH PLAIN {}\r\n", b64("\0u\0secret")),
        );
        assert_eq!(
            r,
            "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
        );
        assert!(b.attempts.is_empty());
        assert_eq!(s.authenticated(), None);
    }

    #[test]
    fn auth_is_advertised_after_tls_or_before_it_when_allowed() {
        let cfg = config();
        let mut b = Recorder::default();
        let policy = ServerPolicy {
            auth: vec![Mechanism::CramMd5, Mechanism::Plain],
            ..submission()
        };
        let mut s = after_tls(&cfg, &policy, &mut b);
        let ehlo = talk(&mut s, &mut b, "EHLO c.test\r\n");
        assert!(ehlo.contains("250-AUTH CRAM-MD5 PLAIN\r\n"), "{ehlo}");
        let early = ServerPolicy {
            auth_before_tls: true,
            ..submission()
        };
        let mut s = ServerSession::with_policy(&cfg, &early);
        let ehlo = talk(&mut s, &mut b, "EHLO c.test\r\n");
        assert!(ehlo.contains("250-AUTH PLAIN LOGIN CRAM-MD5\r\n"), "{ehlo}");
        let r = talk(
            &mut s,
            &mut b,
            &format!("AUTH PLAIN {}\r\n", b64("\0u\0secret")),
        );
        assert_eq!(r, "235 2.7.0 Authentication successful\r\n");
    }

    #[test]
    fn plain_with_an_initial_response_authenticates() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        let r = talk(
            &mut s,
            &mut b,
            &format!("AUTH PLAIN {}\r\n", b64("alice\0alice\0secret")),
        );
        assert_eq!(r, "235 2.7.0 Authentication successful\r\n");
        assert_eq!(s.authenticated(), Some("alice"));
        assert_eq!(
            b.attempts,
            [AuthAttempt::Plain {
                user: "alice".into(),
                password: "secret".into()
            }]
        );
    }

    #[test]
    fn plain_without_an_initial_response_gets_an_empty_challenge() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        assert_eq!(talk(&mut s, &mut b, "auth plain\r\n"), "334 \r\n");
        let r = talk(&mut s, &mut b, &format!("{}\r\n", b64("\0alice\0secret")));
        assert_eq!(r, "235 2.7.0 Authentication successful\r\n");
        assert_eq!(s.authenticated(), Some("alice"));
    }

    #[test]
    fn plain_with_a_wrong_password_gets_535_and_stays_unauthenticated() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        let r = talk(
            &mut s,
            &mut b,
            &format!("AUTH PLAIN {}\r\n", b64("\0alice\0guess")),
        );
        assert_eq!(r, "535 5.7.8 Authentication credentials invalid\r\n");
        assert_eq!(s.authenticated(), None);
        // The exchange is over: the session takes commands again.
        assert_eq!(talk(&mut s, &mut b, "NOOP\r\n"), "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn plain_for_another_authzid_is_refused_without_asking_the_behaviour() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        let r = talk(
            &mut s,
            &mut b,
            &format!("AUTH PLAIN {}\r\n", b64("bob\0alice\0secret")),
        );
        assert!(r.starts_with("535 5.7.8 "), "{r}");
        assert!(b.attempts.is_empty());
        assert_eq!(s.authenticated(), None);
    }

    #[test]
    fn bad_base64_and_malformed_or_empty_responses_get_501_5_5_2() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        let r = talk(&mut s, &mut b, "AUTH PLAIN not*base64\r\n");
        assert_eq!(r, "501 5.5.2 Cannot decode response\r\n");
        let r = talk(
            &mut s,
            &mut b,
            &format!("AUTH PLAIN {}\r\n", b64("alice\0secret")),
        );
        assert_eq!(r, "501 5.5.2 Malformed PLAIN response\r\n");
        let r = talk(
            &mut s,
            &mut b,
            &format!("AUTH PLAIN {}\r\n", b64("\0alice\0")),
        );
        assert_eq!(r, "501 5.5.2 Malformed PLAIN response\r\n");
        assert_eq!(
            talk(&mut s, &mut b, "AUTH LOGIN\r\n"),
            "334 VXNlcm5hbWU6\r\n"
        );
        assert_eq!(
            talk(&mut s, &mut b, "%%%\r\n"),
            "501 5.5.2 Cannot decode response\r\n"
        );
        talk(&mut s, &mut b, "AUTH LOGIN\r\n");
        assert_eq!(
            talk(&mut s, &mut b, "\r\n"),
            "501 5.5.2 Empty LOGIN response\r\n"
        );
        assert!(b.attempts.is_empty());
    }

    #[test]
    fn login_asks_for_the_user_then_the_password() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        assert_eq!(
            talk(&mut s, &mut b, "AUTH LOGIN\r\n"),
            "334 VXNlcm5hbWU6\r\n"
        );
        let r = talk(&mut s, &mut b, &format!("{}\r\n", b64("alice")));
        assert_eq!(r, "334 UGFzc3dvcmQ6\r\n");
        let r = talk(&mut s, &mut b, &format!("{}\r\n", b64("secret")));
        assert_eq!(r, "235 2.7.0 Authentication successful\r\n");
        assert_eq!(s.authenticated(), Some("alice"));
    }

    #[test]
    fn login_with_the_user_as_initial_response_and_a_wrong_password_gets_535() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        let r = talk(&mut s, &mut b, &format!("AUTH LOGIN {}\r\n", b64("alice")));
        assert_eq!(r, "334 UGFzc3dvcmQ6\r\n");
        let r = talk(&mut s, &mut b, &format!("{}\r\n", b64("guess")));
        assert_eq!(r, "535 5.7.8 Authentication credentials invalid\r\n");
        assert_eq!(
            b.attempts,
            [AuthAttempt::Login {
                user: "alice".into(),
                password: "guess".into()
            }]
        );
        assert_eq!(s.authenticated(), None);
    }

    /// The challenge the 334 carries, decoded.
    fn cram_challenge(r: &str) -> String {
        let text = r.strip_prefix("334 ").unwrap().trim_end();
        String::from_utf8(BASE64.decode(text).unwrap()).unwrap()
    }

    #[test]
    fn cram_md5_hands_the_challenge_and_the_digest_to_the_behaviour() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        let challenge = cram_challenge(&talk(&mut s, &mut b, "AUTH CRAM-MD5\r\n"));
        let (random_time, host) = challenge
            .strip_prefix('<')
            .and_then(|c| c.strip_suffix('>'))
            .and_then(|c| c.split_once('@'))
            .unwrap();
        let (random, time) = random_time.split_once('.').unwrap();
        assert!(random.parse::<u64>().is_ok() && time.parse::<u64>().is_ok());
        assert_eq!(host, "mx.test");
        let digest = cram_md5_digest(PASSWORD, &challenge).to_ascii_uppercase();
        let r = talk(
            &mut s,
            &mut b,
            &format!("{}\r\n", b64(&format!("alice {digest}"))),
        );
        assert_eq!(r, "235 2.7.0 Authentication successful\r\n");
        assert_eq!(s.authenticated(), Some("alice"));
        let AuthAttempt::CramMd5 { digest_hex, .. } = &b.attempts[0] else {
            panic!("{:?}", b.attempts);
        };
        assert_eq!(*digest_hex, digest.to_ascii_lowercase());
    }

    #[test]
    fn cram_md5_with_a_wrong_or_malformed_digest_is_refused() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        let challenge = cram_challenge(&talk(&mut s, &mut b, "AUTH CRAM-MD5\r\n"));
        let digest = cram_md5_digest("guess", &challenge);
        let r = talk(
            &mut s,
            &mut b,
            &format!("{}\r\n", b64(&format!("alice {digest}"))),
        );
        assert_eq!(r, "535 5.7.8 Authentication credentials invalid\r\n");
        talk(&mut s, &mut b, "AUTH CRAM-MD5\r\n");
        let r = talk(&mut s, &mut b, &format!("{}\r\n", b64("alice 1234")));
        assert_eq!(r, "501 5.5.2 Malformed CRAM-MD5 response\r\n");
        let r = talk(
            &mut s,
            &mut b,
            &format!("AUTH CRAM-MD5 {}\r\n", b64("alice")),
        );
        assert_eq!(r, "501 5.5.2 CRAM-MD5 takes no initial response\r\n");
        assert_eq!(b.attempts.len(), 1);
        assert_eq!(s.authenticated(), None);
    }

    #[test]
    fn a_star_cancels_the_exchange() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        talk(&mut s, &mut b, "AUTH LOGIN\r\n");
        talk(&mut s, &mut b, &format!("{}\r\n", b64("alice")));
        assert_eq!(
            talk(&mut s, &mut b, "*\r\n"),
            "501 5.0.0 Authentication cancelled\r\n"
        );
        assert!(b.attempts.is_empty());
        assert_eq!(talk(&mut s, &mut b, "NOOP\r\n"), "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn unknown_or_unoffered_mechanisms_get_504() {
        let cfg = config();
        let policy = ServerPolicy {
            auth: vec![Mechanism::Plain],
            ..submission()
        };
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        for cmd in ["AUTH LOGIN\r\n", "AUTH GSSAPI\r\n"] {
            assert_eq!(
                talk(&mut s, &mut b, cmd),
                "504 5.5.4 Unrecognized authentication mechanism\r\n"
            );
        }
    }

    #[test]
    fn auth_twice_or_inside_a_transaction_gets_503() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        let plain = format!("AUTH PLAIN {}\r\n", b64("\0alice\0secret"));
        talk(&mut s, &mut b, &plain);
        assert_eq!(
            talk(&mut s, &mut b, &plain),
            "503 5.5.1 Already authenticated\r\n"
        );
        let mut s = ServerSession::with_policy(&cfg, &policy);
        s.tls_started();
        s.set_client(true);
        talk(&mut s, &mut b, "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\n");
        assert_eq!(
            talk(&mut s, &mut b, &plain),
            "503 5.5.1 AUTH not permitted during a mail transaction\r\n"
        );
        assert_eq!(b.attempts.len(), 1);
    }

    #[test]
    fn too_many_auth_failures_close_the_session() {
        let cfg = config();
        let policy = ServerPolicy {
            auth_failures_max: 2,
            ..submission()
        };
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        let wrong = format!("AUTH PLAIN {}\r\n", b64("\0alice\0guess"));
        for _ in 0..2 {
            assert!(talk(&mut s, &mut b, &wrong).starts_with("535 "));
        }
        let out = s.feed(format!("{wrong}NOOP\r\n").as_bytes(), &mut b);
        assert_eq!(out.write, b"421 4.7.0 Too many authentication failures\r\n");
        assert!(out.close && s.is_closed());
    }

    #[test]
    fn auth_lines_may_exceed_a_command_line_but_not_auth_line_max() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        let long_user = "u".repeat(COMMAND_LINE_MAX * 2);
        talk(&mut s, &mut b, "AUTH PLAIN\r\n");
        let r = talk(
            &mut s,
            &mut b,
            &format!("{}\r\n", b64(&format!("\0{long_user}\0x"))),
        );
        assert_eq!(r, "535 5.7.8 Authentication credentials invalid\r\n");
        talk(&mut s, &mut b, "AUTH PLAIN\r\n");
        let r = talk(&mut s, &mut b, &"A".repeat(AUTH_LINE_MAX + 1));
        assert_eq!(r, "500 5.5.6 Authentication exchange line is too long\r\n");
        // The rest of that line is skipped, not read as a command.
        assert_eq!(talk(&mut s, &mut b, "AAAA\r\nNOOP\r\n"), "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn without_auth_mail_gets_530_and_nothing_pipelined_after_it_is_delivered() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        // The BDAT chunk is a command line to the letter: it must go by its size.
        let r = talk(
            &mut s,
            &mut b,
            "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n\
             Subject: hi\r\n\r\nRCPT TO:<c@y.test>\r\n.\r\n\
             BDAT 22 LAST\r\nMAIL FROM:<a@x.test>\r\nNOOP\r\n",
        );
        assert_eq!(
            r,
            "530 5.7.0 Authentication required\r\n\
             503 5.5.1 Need MAIL command\r\n\
             354 End data with <CR><LF>.<CR><LF>\r\n\
             503 5.5.1 Bad sequence of commands\r\n\
             503 5.5.1 Need MAIL command\r\n\
             250 2.0.0 Ok\r\n"
        );
        assert!(b.messages.is_empty());
    }

    #[test]
    fn without_usable_auth_rcpt_gets_554_and_nothing_is_delivered() {
        let (mut cfg, policy) = (config(), submission());
        // No STARTTLS, so AUTH (only after TLS) can never help: the refusal comes at RCPT.
        cfg.offer_starttls = false;
        let mut b = Recorder::default();
        let mut s = ServerSession::with_policy(&cfg, &policy);
        let r = talk(
            &mut s,
            &mut b,
            "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n\
             MAIL FROM:<a@x.test>\r\n.\r\n\
             MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 8 LAST\r\nQUIT\r\n\r\nNOOP\r\n",
        );
        let replies: Vec<&str> = r.lines().filter(|l| !l.starts_with("250-")).collect();
        assert_eq!(
            replies,
            [
                "250 HELP",
                "250 2.1.0 Ok",
                "554 5.7.1 Relay access denied",
                "354 End data with <CR><LF>.<CR><LF>",
                "554 5.5.1 No valid recipients",
                "250 2.1.0 Ok",
                "554 5.7.1 Relay access denied",
                "554 5.5.1 No valid recipients",
                "250 2.0.0 Ok",
            ]
        );
        assert!(b.messages.is_empty());
        assert!(!s.is_closed());
    }

    #[test]
    fn a_body_pipelined_after_every_recipient_was_refused_is_never_read_as_commands() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = after_tls(&cfg, &policy, &mut b);
        s.set_client(true);
        let r = talk(
            &mut s,
            &mut b,
            "MAIL FROM:<a@x.test>\r\nRCPT TO:<nobody>\r\nDATA\r\nSubject: x\r\n\r\n\
             RCPT TO:<victim@y.test>\r\nDATA\r\nowned\r\n.\r\nNOOP\r\n",
        );
        let replies: Vec<&str> = r.lines().collect();
        assert_eq!(
            replies,
            [
                "250 2.1.0 Ok",
                "501 5.1.3 Bad recipient address syntax",
                "354 End data with <CR><LF>.<CR><LF>",
                "554 5.5.1 No valid recipients",
                "250 2.0.0 Ok",
            ]
        );
        assert!(b.messages.is_empty());
    }

    #[test]
    fn before_starttls_mail_is_told_to_start_tls_when_auth_comes_after_it() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let mut s = ServerSession::with_policy(&cfg, &policy);
        let r = talk(
            &mut s,
            &mut b,
            "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n",
        );
        let replies: Vec<&str> = r.lines().filter(|l| !l.starts_with("250-")).collect();
        assert_eq!(
            replies,
            [
                "250 HELP",
                "530 5.7.0 Must issue a STARTTLS command first",
                "503 5.5.1 Need MAIL command",
            ]
        );
        assert!(b.messages.is_empty());
    }

    #[test]
    fn relay_networks_and_authenticated_clients_may_send() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder::default();
        let tx = "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 4 LAST\r\nhi\r\n";
        let mut s = after_tls(&cfg, &policy, &mut b);
        s.set_client(true);
        assert!(talk(&mut s, &mut b, tx).ends_with("250 2.0.0 Ok: queued\r\n"));
        let mut s = after_tls(&cfg, &policy, &mut b);
        talk(
            &mut s,
            &mut b,
            &format!("AUTH PLAIN {}\r\n", b64("\0alice\0secret")),
        );
        assert!(talk(&mut s, &mut b, tx).ends_with("250 2.0.0 Ok: queued\r\n"));
        assert_eq!(b.messages.len(), 2);
        assert_eq!(b.messages[1].2, b"hi\r\n");
    }

    #[test]
    fn a_pending_auth_holds_pipelined_commands_until_resolved() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder {
            pending: true,
            ..Recorder::default()
        };
        let mut s = after_tls(&cfg, &policy, &mut b);
        let plain = format!(
            "AUTH PLAIN {}\r\nMAIL FROM:<a@x.test>\r\n",
            b64("\0alice\0secret")
        );
        assert_eq!(talk(&mut s, &mut b, &plain), "");
        assert!(s.is_waiting());
        assert_eq!(talk(&mut s, &mut b, "RCPT TO:<b@y.test>\r\n"), "");
        let out = s.resolve(Verdict::Accept, &mut b);
        assert_eq!(
            String::from_utf8(out.write).unwrap(),
            "235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
        );
        assert!(!s.is_waiting());
        assert_eq!(s.authenticated(), Some("alice"));
    }

    #[test]
    fn a_pending_auth_refused_leaves_the_pipelined_mail_unauthenticated() {
        let (cfg, policy) = (config(), submission());
        let mut b = Recorder {
            pending: true,
            ..Recorder::default()
        };
        let mut s = after_tls(&cfg, &policy, &mut b);
        let plain = format!(
            "AUTH PLAIN {}\r\nMAIL FROM:<a@x.test>\r\n",
            b64("\0alice\0guess")
        );
        assert_eq!(talk(&mut s, &mut b, &plain), "");
        let out = s.resolve(Verdict::Reply(AUTH_INVALID.into()), &mut b);
        assert_eq!(
            String::from_utf8(out.write).unwrap(),
            "535 5.7.8 Authentication credentials invalid\r\n530 5.7.0 Authentication required\r\n"
        );
        assert_eq!(s.authenticated(), None);
    }

    #[test]
    fn a_pending_message_holds_the_next_transaction_until_resolved() {
        let cfg = config();
        let policy = ServerPolicy::sink();
        let mut b = Recorder {
            pending: true,
            ..Recorder::default()
        };
        let mut s = ServerSession::with_policy(&cfg, &policy);
        let r = talk(
            &mut s,
            &mut b,
            "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n",
        );
        assert!(
            r.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"),
            "{r}"
        );
        let r = talk(
            &mut s,
            &mut b,
            "..dot\r\n.\r\nMAIL FROM:<c@x.test>\r\nRCPT TO:<d@y.test>\r\nBDAT 3 LAST\r\nyo\n",
        );
        assert_eq!(r, "");
        assert!(s.is_waiting());
        assert_eq!(b.messages[0].2, b".dot\r\n");
        let out = s.resolve(Verdict::Accept, &mut b);
        assert_eq!(
            String::from_utf8(out.write).unwrap(),
            "250 2.0.0 Ok: queued\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
        );
        // The second message, from the held input, is pending in its turn.
        assert!(s.is_waiting());
        assert_eq!(b.messages[1].2, b"yo\n");
        let out = s.resolve(
            Verdict::ReplyAndClose("421 4.3.0 spool full".into()),
            &mut b,
        );
        assert_eq!(out.write, b"421 4.3.0 spool full\r\n");
        assert!(out.close && s.is_closed());
    }

    #[test]
    #[should_panic(expected = "Verdict::Pending is for Behaviour::message and Behaviour::auth")]
    fn pending_from_any_other_step_is_a_bug() {
        struct PendingMail;
        impl Behaviour for PendingMail {
            fn mail_from(&mut self, _: &str) -> Verdict {
                Verdict::Pending
            }
            fn rcpt(&mut self, _: &str, _: &str) -> Verdict {
                Verdict::Accept
            }
            fn data_start(&mut self) -> Verdict {
                Verdict::Accept
            }
            fn message(&mut self, _: &Message<'_>) -> Verdict {
                Verdict::Accept
            }
            fn delay_ms(&mut self, _: Command) -> u64 {
                0
            }
        }
        let cfg = config();
        let mut s = ServerSession::new(&cfg);
        s.feed(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\n", &mut PendingMail);
    }

    #[test]
    fn the_recipient_past_rcpts_max_gets_452() {
        let cfg = config();
        let policy = ServerPolicy {
            rcpts_max: 2,
            ..ServerPolicy::sink()
        };
        let mut b = Recorder::default();
        let mut s = ServerSession::with_policy(&cfg, &policy);
        let r = talk(
            &mut s,
            &mut b,
            "HELO c.test\r\nMAIL FROM:<>\r\n\
             RCPT TO:<1@y.test>\r\nRCPT TO:<2@y.test>\r\nRCPT TO:<3@y.test>\r\n",
        );
        assert!(
            r.ends_with("250 2.1.5 Ok\r\n452 4.5.3 Too many recipients\r\n"),
            "{r}"
        );
    }

    #[test]
    fn the_command_past_commands_max_gets_421_and_closes() {
        let cfg = config();
        let policy = ServerPolicy {
            commands_max: 3,
            ..ServerPolicy::sink()
        };
        let mut b = Recorder::default();
        let mut s = ServerSession::with_policy(&cfg, &policy);
        let out = s.feed(b"NOOP\r\nNOOP\r\nbogus\r\nNOOP\r\nNOOP\r\n", &mut b);
        assert_eq!(
            String::from_utf8(out.write).unwrap(),
            "250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n502 5.5.2 Command not recognized\r\n\
             421 4.7.0 Too many commands\r\n"
        );
        assert!(out.close && s.is_closed());
    }

    #[test]
    fn a_size_at_mail_over_size_max_gets_552() {
        let cfg = config();
        let mut b = Recorder::default();
        let mut s = ServerSession::new(&cfg);
        let r = talk(
            &mut s,
            &mut b,
            "HELO c.test\r\nMAIL FROM:<a@x.test> SIZE=1001\r\nMAIL FROM:<a@x.test> SIZE=1000\r\n",
        );
        assert_eq!(
            r,
            "250 mx.test\r\n552 5.3.4 Message size exceeds fixed limit\r\n250 2.1.0 Ok\r\n"
        );
    }

    #[test]
    fn an_early_talker_gets_554_and_is_closed() {
        let cfg = config();
        let mut b = Recorder::default();
        let mut s = ServerSession::new(&cfg);
        let out = s.early_talker();
        assert_eq!(
            out.write,
            b"554 5.5.0 Protocol error: commands sent before the greeting\r\n"
        );
        assert!(out.close && s.is_closed());
        assert!(s.feed(b"EHLO c.test\r\n", &mut b).write.is_empty());
    }

    #[test]
    fn an_auth_attempt_prints_without_its_password() {
        let a = AuthAttempt::Plain {
            user: "alice".into(),
            password: "secret".into(),
        };
        let printed = format!("{a:?}");
        assert!(
            printed.contains("alice") && !printed.contains("secret"),
            "{printed}"
        );
    }
}
