//! A sans-IO ESMTP server session: bytes in, replies out, decisions asked of a
//! [`Behaviour`]. The sink's IO loop is thin glue around it, which is what lets the
//! bad-input cases (bare LF, smuggling, oversize lines, BDAT mismatches) be tested
//! without sockets.

use std::fmt::Write as _;

/// Longest command line we accept, CRLF included. RFC 5321 says 512; real servers
/// take more, and we only need to stop unbounded buffering.
pub const COMMAND_LINE_MAX: usize = 2048;
/// Longest text line in DATA, CRLF included (RFC 5321 §4.5.3.1.6).
pub const TEXT_LINE_MAX: usize = 1000;
/// Recipients per transaction (RFC 5321 §4.5.3.1.8 asks servers to take at least 100).
pub const RCPTS_PER_MESSAGE_MAX: usize = 1000;

/// What the sink decides for one step of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Reply with this full reply line (code, enhanced code, text; no CRLF).
    Reply(String),
    /// Reply with this line, then close the connection (a 421).
    ReplyAndClose(String),
    /// Drop the connection without a word (a receiver that dies mid-transaction).
    Disconnect,
}

/// A message the client finished sending.
pub struct Message<'a> {
    pub from: &'a str,
    pub rcpts: &'a [String],
    /// The content with dot-stuffing removed, CRLF line endings as sent.
    pub content: &'a [u8],
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

/// The receiver's policy: the sink's profile implements it.
pub trait Behaviour {
    fn mail_from(&mut self, from: &str) -> Verdict;
    fn rcpt(&mut self, from: &str, rcpt: &str) -> Verdict;
    /// Called when DATA/BDAT starts; a `Disconnect` here drops the connection
    /// part-way through the content.
    fn data_start(&mut self) -> Verdict;
    fn message(&mut self, msg: &Message<'_>) -> Verdict;
    fn delay_ms(&mut self, cmd: Command) -> u64;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Discarding a command line that was too long, until its LF.
    SkipLine,
    Closed,
}

pub struct ServerConfig {
    pub hostname: String,
    pub size_max: usize,
    pub offer_starttls: bool,
    /// Offer PIPELINING and CHUNKING (off: an old-fashioned receiver).
    pub offer_pipelining: bool,
    pub offer_chunking: bool,
}

pub struct ServerSession<'c> {
    cfg: &'c ServerConfig,
    state: State,
    input: Vec<u8>,
    tls_active: bool,
    esmtp: bool,
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
}

impl<'c> ServerSession<'c> {
    pub fn new(cfg: &'c ServerConfig) -> Self {
        ServerSession {
            cfg,
            state: State::Fresh,
            input: Vec::new(),
            tls_active: false,
            esmtp: false,
            from: String::new(),
            rcpts: Vec::new(),
            content: Vec::new(),
            content_error: None,
            bdat_used: false,
            skip_state: State::Fresh,
            data_after_crlf: true,
        }
    }

    pub fn greeting(&self) -> Vec<u8> {
        format!("220 {} ESMTP volley-load sink\r\n", self.cfg.hostname).into_bytes()
    }

    /// Called by the IO loop once the TLS handshake is done: RFC 3207 says
    /// everything learnt before is forgotten.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.state = State::Fresh;
        self.input.clear();
        self.reset_transaction();
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Feed bytes read from the client; returns what to write.
    pub fn feed(&mut self, bytes: &[u8], b: &mut dyn Behaviour) -> Output {
        let mut out = Output::default();
        self.input.extend_from_slice(bytes);
        let mut pos = 0;
        while pos < self.input.len() && !out.close && !out.start_tls {
            match self.state {
                State::Closed => break,
                State::Data => {
                    let Some(n) = self.take_data_line(pos, &mut out, b) else {
                        break;
                    };
                    pos += n;
                }
                State::Bdat { remaining, last } => {
                    let n = remaining.min(self.input.len() - pos);
                    if self.content_error.is_none() {
                        if self.content.len() + n > self.cfg.size_max {
                            self.content_error = Some("552 5.3.4 Message size exceeds fixed limit");
                        } else {
                            self.content.extend_from_slice(&self.input[pos..pos + n]);
                        }
                    }
                    pos += n;
                    let remaining = remaining - n;
                    if remaining > 0 {
                        self.state = State::Bdat { remaining, last };
                    } else {
                        self.state = State::Mail;
                        self.chunk_done(last, &mut out, b);
                    }
                }
                State::SkipLine => match find_lf(&self.input[pos..]) {
                    Some(i) => {
                        pos += i + 1;
                        self.state = self.skip_state;
                    }
                    None => pos = self.input.len(),
                },
                _ => match find_lf(&self.input[pos..]) {
                    Some(i) => {
                        let line_end = pos + i + 1;
                        if line_end - pos > COMMAND_LINE_MAX {
                            reply(&mut out, "500 5.5.2 Line too long");
                        } else if i == 0 || self.input[pos + i - 1] != b'\r' {
                            // A bare LF as a command terminator is how SMTP smuggling starts.
                            reply(&mut out, "500 5.5.2 Bare LF in command; lines end in CRLF");
                        } else {
                            let line = self.input[pos..pos + i - 1].to_vec();
                            self.command(&line, &mut out, b);
                        }
                        pos = line_end;
                    }
                    None => {
                        if self.input.len() - pos > COMMAND_LINE_MAX {
                            reply(&mut out, "500 5.5.2 Line too long");
                            self.skip_state = self.state;
                            self.state = State::SkipLine;
                            pos = self.input.len();
                        }
                        break;
                    }
                },
            }
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
        out
    }

    fn reset_transaction(&mut self) {
        self.from.clear();
        self.rcpts.clear();
        // Released, not cleared: see `feed`.
        self.content = Vec::new();
        self.content_error = None;
        self.bdat_used = false;
        if !matches!(self.state, State::Fresh | State::Closed) {
            self.state = State::Ready;
        }
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
            "EHLO" | "HELO" => {
                if arg.is_empty() {
                    reply(out, "501 5.5.4 Syntax: EHLO hostname");
                    return;
                }
                out.delay_ms += b.delay_ms(Command::Ehlo);
                self.esmtp = verb.eq_ignore_ascii_case("EHLO");
                self.state = State::Ready;
                self.reset_transaction();
                if self.esmtp {
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
                    if self.cfg.offer_chunking {
                        r.push_str("250-CHUNKING\r\n");
                    }
                    r.push_str("250 HELP\r\n");
                    out.write.extend_from_slice(r.as_bytes());
                } else {
                    reply(out, &format!("250 {}", self.cfg.hostname));
                }
            }
            "STARTTLS" => {
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
            "MAIL" => {
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
                    match size.parse::<usize>() {
                        Ok(n) if n > self.cfg.size_max => {
                            return reply(out, "552 5.3.4 Message size exceeds fixed limit");
                        }
                        Ok(_) => {}
                        Err(_) => return reply(out, "501 5.5.4 Bad SIZE parameter"),
                    }
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
            "RCPT" => {
                if self.state != State::Mail {
                    return reply(out, "503 5.5.1 Need MAIL command");
                }
                let Some(addr) = path_arg(arg, "TO:") else {
                    return reply(out, "501 5.5.4 Syntax: RCPT TO:<address>");
                };
                if addr.is_empty() || !addr.contains('@') {
                    return reply(out, "501 5.1.3 Bad recipient address syntax");
                }
                if self.rcpts.len() >= RCPTS_PER_MESSAGE_MAX {
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
            "DATA" => {
                if !arg.is_empty() {
                    return reply(out, "501 5.5.4 Syntax: DATA");
                }
                if self.state != State::Mail || self.bdat_used {
                    return reply(out, "503 5.5.1 Bad sequence of commands");
                }
                if self.rcpts.is_empty() {
                    return reply(out, "554 5.5.1 No valid recipients");
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
            "BDAT" => self.bdat(arg, out, b),
            "RSET" => {
                self.reset_transaction();
                reply(out, "250 2.0.0 Ok");
            }
            "NOOP" => reply(out, "250 2.0.0 Ok"),
            "QUIT" => {
                reply(out, "221 2.0.0 Bye");
                out.close = true;
                self.state = State::Closed;
            }
            "VRFY" => reply(out, "252 2.0.0 Cannot VRFY user"),
            "" => reply(out, "500 5.5.2 Empty command"),
            _ => reply(out, "502 5.5.2 Command not recognized"),
        }
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
            out.close = true;
            self.state = State::Closed;
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
            if let Verdict::Disconnect = b.data_start() {
                out.close = true;
                self.state = State::Closed;
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
                content: &self.content,
            };
            match b.message(&msg) {
                Verdict::Accept => reply(out, "250 2.0.0 Ok: queued"),
                v => self.apply(v, out),
            }
        }
        if !out.close {
            self.state = State::Ready;
        }
        self.reset_transaction();
    }

    /// Takes one line of DATA content from `input[pos..]`; returns octets consumed, or
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
            if rest.len() > TEXT_LINE_MAX {
                self.content_error
                    .get_or_insert("500 5.5.6 Line too long (over 1000 octets)");
                // Keep the last octet: it may be the CR of this line's CRLF.
                return Some(rest.len() - 1);
            }
            return None;
        };
        let line_len = i + 1;
        let crlf = i > 0 && rest[i - 1] == b'\r';
        if !crlf {
            // Bare LF: never an end of data (smuggling guard), and refused at the end.
            self.content_error
                .get_or_insert("550 5.6.11 Bare LF in message content; lines must end in CRLF");
        } else if self.data_after_crlf && &rest[..line_len] == b".\r\n" {
            self.finish_message(out, b);
            return Some(line_len);
        }
        self.data_after_crlf = crlf;
        if line_len > TEXT_LINE_MAX {
            self.content_error
                .get_or_insert("500 5.5.6 Line too long (over 1000 octets)");
        }
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

    fn apply(&mut self, v: Verdict, out: &mut Output) {
        match v {
            Verdict::Accept => reply(out, "250 2.0.0 Ok"),
            Verdict::Reply(r) => reply(out, &r),
            Verdict::ReplyAndClose(r) => {
                reply(out, &r);
                out.close = true;
                self.state = State::Closed;
            }
            Verdict::Disconnect => {
                // Replies to earlier pipelined commands were sent before the "crash".
                out.close = true;
                self.state = State::Closed;
            }
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
    if arg.len() < key.len() || !arg[..key.len()].eq_ignore_ascii_case(key) {
        return None;
    }
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
