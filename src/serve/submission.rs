//! The SMTP submission listeners (RFC 6409; implicit TLS per RFC 8314): IO glue
//! around the sans-IO server session (smtp::server), on one thread per shard, each
//! a current-thread tokio runtime with its own SO_REUSEPORT socket per listener. A
//! message gets its 250 only once the owning shard has synced it (serve::intake);
//! passwords are checked on the blocking pool.
//!
//! Limits at the connection (the session holds the rest): `connections_max` (then
//! `421 4.3.2`), `connections_per_ip_max` (then `421 4.7.0`), `command_timeout` and
//! `data_timeout` (then `421 4.4.2`, which is what defeats slowloris: a client gets
//! no more time than that per read, however little it sends).

use crate::host::privilege::{self, PrivilegeError};
use crate::observe::metrics::Door;
use crate::serve::auth::Users;
use crate::serve::config::{Auth, ListenerTls, Submission};
use crate::serve::intake::{Intake, Submitted};
use crate::serve::submitted::{self, Trace};
use crate::smtp::server::{
    AuthAttempt, Behaviour, Command, Mechanism, Message, Output, ServerConfig, ServerPolicy,
    ServerSession, Verdict,
};
use crate::spool::inbox::InboxError;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// What every listener shares.
pub struct Shared {
    /// Where messages go.
    pub intake: Arc<Intake>,
    /// Replaced on SIGHUP.
    pub users: Arc<RwLock<Option<Users>>>,
    /// STARTTLS and implicit TLS settings.
    pub tls: Arc<rustls::ServerConfig>,
    /// This host's name: the greeting, EHLO, Received.
    pub hostname: String,
    /// How long a message waits for room in a full inbox before `452 4.3.1`.
    pub inbox_wait_max: Duration,
    /// Password checks running at once (Argon2 takes ~19 MiB and tens of ms each):
    /// more wait their turn, so a flood of AUTH attempts costs time, not memory.
    pub auth_checks: Arc<tokio::sync::Semaphore>,
    /// Set on SIGTERM: stop accepting; idle sessions are told 421 and closed.
    pub stop: Arc<AtomicBool>,
}

/// One listener: its settings and its open connections by client address.
struct Listener {
    cfg: Submission,
    server: ServerConfig,
    policy: ServerPolicy,
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// The listeners' sockets, bound before the daemon drops privilege (a port below
/// 1024 cannot be bound after): for each thread, one SO_REUSEPORT socket per
/// listener, in the listeners' order.
pub struct Bound(Vec<Vec<std::net::TcpListener>>);

/// Binds every listener `threads` times (so a port that cannot be had is an error
/// at start; EACCES says how to get a port below 1024).
pub fn bind(listeners: &[Submission], threads: usize) -> Result<Bound, PrivilegeError> {
    let mut per_thread = Vec::new();
    for _ in 0..threads.max(1) {
        let mut bound = Vec::new();
        for l in listeners {
            let s = crate::deliver::runtime::bind_reuseport(l.listen, 1024)
                .map_err(|e| privilege::bind_error("submission listener", l.listen, e))?;
            bound.push(s);
        }
        per_thread.push(bound);
    }
    Ok(Bound(per_thread))
}

/// Serves `listeners` on the sockets [`bind`] made for them, one thread per set
/// (the kernel spreads connections over them), until `shared.stop` and every
/// session has ended.
pub fn start(
    listeners: &[Submission],
    bound: Bound,
    shared: Arc<Shared>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut settings = Vec::new();
    for l in listeners {
        // AUTH only with users to check it against (a reload keeps the offer).
        let (offer_auth, cram) = match shared.users.read().expect("users lock").as_ref() {
            Some(u) => (l.auth != Auth::None, u.any_cram_md5()),
            None => (false, false),
        };
        let mut auth = Vec::new();
        if offer_auth {
            auth.extend([Mechanism::Plain, Mechanism::Login]);
            if cram {
                auth.push(Mechanism::CramMd5);
            }
        }
        let server = ServerConfig {
            hostname: shared.hostname.clone(),
            size_max: l.message_size_max as usize,
            offer_starttls: l.tls == ListenerTls::Starttls,
            offer_pipelining: true,
            offer_chunking: true,
        };
        let policy = ServerPolicy {
            banner: "ESMTP volley".into(),
            auth,
            auth_before_tls: l.auth_over_plaintext,
            auth_failures_max: l.auth_failures_max,
            relay_needs_auth: true,
            rcpts_max: l.recipients_max as usize,
            commands_max: l.commands_max,
            // The config counts octets before CRLF (RFC 5322 §2.1.1's 998).
            text_line_max: l.line_length_max as usize + 2,
        };
        let listener = Arc::new(Listener {
            cfg: l.clone(),
            server,
            policy,
            open: Mutex::new(HashMap::new()),
        });
        settings.push(listener);
    }
    let per_thread: Vec<Vec<(std::net::TcpListener, Arc<Listener>)>> = bound
        .0
        .into_iter()
        .map(|sockets| sockets.into_iter().zip(settings.iter().cloned()).collect())
        .collect();
    let mut handles = Vec::new();
    for (i, bound) in per_thread.into_iter().enumerate() {
        let shared = shared.clone();
        let h = std::thread::Builder::new()
            .name(format!("submission-{i}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let mut accepting = Vec::new();
                    for (s, l) in bound {
                        let s = tokio::net::TcpListener::from_std(s).expect("listener registers");
                        accepting.push(tokio::task::spawn_local(accept_loop(s, l, shared.clone())));
                    }
                    for a in accepting {
                        let _ = a.await;
                    }
                });
                // Sessions still open here had their grace: the runtime drops them.
            })?;
        handles.push(h);
    }
    Ok(handles)
}

async fn accept_loop(s: tokio::net::TcpListener, l: Arc<Listener>, shared: Arc<Shared>) {
    let mut sessions = tokio::task::JoinSet::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let accepted = tokio::time::timeout(Duration::from_millis(100), s.accept()).await;
        let Ok(Ok((stream, peer))) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (l, shared) = (l.clone(), shared.clone());
        sessions.spawn_local(async move {
            let ip = peer.ip();
            let refused = admit(&l, ip);
            if let Some(why) = refused {
                let mut stream = stream;
                let _ = stream.write_all(why.as_bytes()).await;
                return;
            }
            connection(stream, peer, &l, &shared).await;
            let mut open = l.open.lock().expect("open lock");
            if let Some(n) = open.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&ip);
                }
            }
        });
        // Finished sessions are reaped as we go, not kept until the end.
        while sessions.try_join_next().is_some() {}
    }
    drop(s);
    while sessions.join_next().await.is_some() {}
}

/// Counts a new connection from `ip`, or says why it is refused.
fn admit(l: &Listener, ip: IpAddr) -> Option<&'static str> {
    let mut open = l.open.lock().expect("open lock");
    let total: u32 = open.values().sum();
    if total >= l.cfg.connections_max {
        return Some("421 4.3.2 Too many connections; try again later\r\n");
    }
    let n = open.entry(ip).or_default();
    if *n >= l.cfg.connections_per_ip_max {
        return Some("421 4.7.0 Too many connections from your address; try again later\r\n");
    }
    *n += 1;
    None
}

/// Work a session is waiting on (the session answered `Pending`).
enum Work {
    /// A message as the client sent it: envelope and content.
    Message(String, Vec<String>, Vec<u8>),
    Auth(AuthAttempt),
}

/// The listener's side of the session: the decisions, and the work they leave.
struct Conn<'a> {
    peer: SocketAddr,
    l: &'a Listener,
    shared: &'a Shared,
    tls: Option<String>,
    work: Option<Work>,
}

impl Behaviour for Conn<'_> {
    fn mail_from(&mut self, from: &str) -> Verdict {
        match check_address(from, true) {
            Ok(()) => Verdict::Accept,
            Err(why) => Verdict::Reply(format!("553 5.1.7 Bad sender address: {why}")),
        }
    }

    fn rcpt(&mut self, _from: &str, rcpt: &str) -> Verdict {
        match check_address(rcpt, false) {
            Ok(()) => Verdict::Accept,
            Err(why) => Verdict::Reply(format!("553 5.1.3 Bad recipient address: {why}")),
        }
    }

    fn data_start(&mut self) -> Verdict {
        if self.shared.stop.load(Ordering::Relaxed) {
            return Verdict::ReplyAndClose(
                "421 4.3.2 Service shutting down; try again later".into(),
            );
        }
        Verdict::Accept
    }

    fn message(&mut self, msg: &Message<'_>) -> Verdict {
        let (from, rcpts) = (msg.from.to_string(), msg.rcpts.to_vec());
        self.work = Some(Work::Message(from, rcpts, msg.take_content()));
        Verdict::Pending
    }

    fn auth(&mut self, a: &AuthAttempt) -> Verdict {
        self.work = Some(Work::Auth(a.clone()));
        Verdict::Pending
    }

    fn delay_ms(&mut self, _cmd: Command) -> u64 {
        0
    }
}

/// An envelope address as the session hands it over (angle brackets removed).
fn check_address(a: &str, may_be_null: bool) -> Result<(), String> {
    if a.is_empty() {
        return match may_be_null {
            true => Ok(()),
            false => Err("empty".into()),
        };
    }
    crate::message::campaign::normalise_address(a)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A client's stream before and after STARTTLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

async fn connection(stream: TcpStream, peer: SocketAddr, l: &Listener, shared: &Shared) {
    let mut session = ServerSession::with_policy(&l.server, &l.policy);
    let may_relay =
        l.cfg.auth != Auth::Required && l.cfg.relay_networks.iter().any(|n| n.contains(peer.ip()));
    session.set_client(may_relay);
    let mut conn = Conn {
        peer,
        l,
        shared,
        tls: None,
        work: None,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.clone());
    let mut io = match l.cfg.tls {
        ListenerTls::Implicit => {
            let hs = tokio::time::timeout(l.cfg.command_timeout, acceptor.accept(stream)).await;
            match hs {
                Ok(Ok(t)) => {
                    conn.tls = cipher_name(&t);
                    session.tls_started();
                    Stream::Tls(Box::new(t))
                }
                _ => return,
            }
        }
        _ => Stream::Plain(stream),
    };
    // A client that talks before the greeting is not speaking SMTP (RFC 5321
    // §4.3.1); spam tools do it to save a round trip.
    if let Stream::Plain(s) = &io {
        let mut one = [0u8; 1];
        if matches!(s.try_read(&mut one), Ok(n) if n > 0) {
            let out = session.early_talker();
            let _ = write_out(&mut io, &out).await;
            return;
        }
    }
    if write_all(&mut io, &session.greeting()).await.is_err() {
        return;
    }
    // One read's worth; a message spans many reads.
    let mut buf = vec![0u8; 16 * 1024];
    // A whole command (or a whole message's content) must arrive within its timeout,
    // however it trickles in: a byte now and then does not keep a slot (slowloris).
    let limit = |s: &ServerSession<'_>| match s.in_content() {
        true => l.cfg.data_timeout,
        false => l.cfg.command_timeout,
    };
    let mut deadline = tokio::time::Instant::now() + limit(&session);
    let mut errors = 0u32;
    loop {
        let n = match read(&mut io, &mut buf, deadline, &shared.stop).await {
            Ok(0) | Err(ReadEnd::Closed) => return,
            Ok(n) => n,
            Err(ReadEnd::Timeout) => {
                let _ = write_all(&mut io, b"421 4.4.2 Timeout; closing the connection\r\n").await;
                return;
            }
            Err(ReadEnd::Stopping) => {
                let _ = write_all(
                    &mut io,
                    b"421 4.3.2 Service shutting down; try again later\r\n",
                )
                .await;
                return;
            }
        };
        let was_content = session.in_content();
        let mut out = session.feed(&buf[..n], &mut conn);
        if !out.write.is_empty() || session.in_content() != was_content {
            deadline = tokio::time::Instant::now() + limit(&session);
        }
        loop {
            if write_out(&mut io, &out).await.is_err() {
                return;
            }
            if out.close {
                return;
            }
            // Postfix's smtpd_hard_error_limit: a client that keeps getting refusals
            // is probing or broken; it does not get to go on.
            errors += count_errors(&out.write);
            if errors > l.cfg.errors_max {
                let _ = write_all(
                    &mut io,
                    b"421 4.7.0 Too many errors; closing the connection\r\n",
                )
                .await;
                return;
            }
            if out.start_tls {
                let Stream::Plain(s) = io else {
                    return;
                };
                match tokio::time::timeout(l.cfg.command_timeout, acceptor.accept(s)).await {
                    Ok(Ok(t)) => {
                        conn.tls = cipher_name(&t);
                        session.tls_started();
                        io = Stream::Tls(Box::new(t));
                    }
                    _ => return,
                }
            }
            if !session.is_waiting() {
                break;
            }
            let verdict = match conn.work.take() {
                Some(Work::Message(from, rcpts, content)) => {
                    match prepare(&session, &conn, from, rcpts, &content) {
                        Ok(m) => queue(&shared.intake, m, shared.inbox_wait_max).await,
                        Err(refused) => refused,
                    }
                }
                Some(Work::Auth(a)) => verify(shared, a).await,
                None => Verdict::Reply("451 4.3.0 Internal error; try again".into()),
            };
            out = session.resolve(verdict, &mut conn);
        }
    }
}

/// The message as it is queued: Received field, campaign header taken out, Date
/// and Message-ID added when missing (serve::submitted), or the reply refusing it.
fn prepare(
    session: &ServerSession<'_>,
    conn: &Conn<'_>,
    sender: String,
    recipients: Vec<String>,
    content: &[u8],
) -> Result<Submitted, Verdict> {
    let queue_id = format!("{:016X}", fastrand::u64(..));
    let (helo, esmtp) = session.helo();
    let user = session.authenticated();
    // RFC 3848's protocol names: S for TLS, A for AUTH.
    let protocol = format!(
        "{}{}{}",
        if esmtp { "ESMTP" } else { "SMTP" },
        if conn.tls.is_some() { "S" } else { "" },
        if user.is_some() { "A" } else { "" },
    );
    let trace = Trace {
        received_from_helo: helo,
        client_ip: (!conn.l.cfg.hide_client_ip).then_some(conn.peer.ip()),
        client_rdns: None,
        by_host: &conn.shared.hostname,
        protocol: &protocol,
        tls: conn.tls.as_deref(),
        auth_user: None,
        queue_id: &queue_id,
        for_rcpt: (recipients.len() == 1).then(|| recipients[0].as_str()),
        now: SystemTime::now(),
    };
    let prepared = submitted::prepare(
        content,
        &trace,
        &conn.l.cfg.campaign_header,
        &conn.shared.hostname,
    )
    .map_err(|e| Verdict::Reply(format!("554 5.6.0 {e}; the message was not queued")))?;
    Ok(Submitted {
        sender,
        recipients,
        campaign: prepared.campaign,
        message: prepared.message,
        tls_report: false,
    })
}

/// Error replies (4xx, 5xx) among `replies`, CRLF-separated final lines.
fn count_errors(replies: &[u8]) -> u32 {
    replies
        .split(|&b| b == b'\n')
        .filter(|l| l.len() > 3 && l[3] == b' ' && matches!(l[0], b'4' | b'5'))
        .count() as u32
}

/// Queues a message and waits until it is durable: the reply to its DATA/BDAT. A
/// full inbox is tried again for up to `wait_max`, then refused for now.
async fn queue(intake: &Intake, m: Submitted, wait_max: Duration) -> Verdict {
    let deadline = tokio::time::Instant::now() + wait_max;
    let answer = loop {
        match intake.submit(&m) {
            Ok(a) => break a,
            Err(InboxError::Full(..)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e @ (InboxError::Full(..) | InboxError::Disk { .. })) => {
                return Verdict::Reply(format!("452 4.3.1 Insufficient system storage: {e}"))
            }
            Err(e) => return Verdict::Reply(format!("421 4.3.2 {e}")),
        }
    };
    match answer.await {
        Ok(Ok(())) => {
            intake
                .board
                .injected(Door::Smtp, m.recipients.len() as u64);
            Verdict::Reply("250 2.0.0 Ok: queued".into())
        }
        Ok(Err(e)) => Verdict::Reply(format!(
            "452 4.3.1 Insufficient system storage: the spool could not take the message ({e}); try again later"
        )),
        Err(_) => Verdict::Reply("421 4.3.2 Service shutting down; try again later".into()),
    }
}

/// Checks a password on the blocking pool (Argon2 takes tens of milliseconds), at
/// most `auth_checks` at once.
async fn verify(shared: &Shared, a: AuthAttempt) -> Verdict {
    let Ok(_turn) = shared.auth_checks.acquire().await else {
        return Verdict::Reply("454 4.7.0 Temporary authentication failure".into());
    };
    let users = shared.users.clone();
    let ok = tokio::task::spawn_blocking(move || {
        let guard = users.read().expect("users lock");
        let Some(u) = guard.as_ref() else {
            return false;
        };
        match &a {
            AuthAttempt::Plain { user, password } | AuthAttempt::Login { user, password } => {
                u.verify_plain(user, password)
            }
            AuthAttempt::CramMd5 {
                user,
                challenge,
                digest_hex,
            } => u.verify_cram_md5(user, challenge, digest_hex),
        }
    })
    .await
    .unwrap_or(false);
    match ok {
        true => Verdict::Accept,
        false => Verdict::Reply("535 5.7.8 Authentication credentials invalid".into()),
    }
}

fn cipher_name(t: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<String> {
    let c = t.get_ref().1;
    let suite = c.negotiated_cipher_suite()?;
    Some(format!("{:?}", suite.suite()))
}

enum ReadEnd {
    Closed,
    Timeout,
    Stopping,
}

/// Reads what the client sent, waiting until `deadline` at most; an idle session
/// ends when the service stops.
async fn read(
    io: &mut Stream,
    buf: &mut [u8],
    deadline: tokio::time::Instant,
    stop: &AtomicBool,
) -> Result<usize, ReadEnd> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(ReadEnd::Stopping);
        }
        let slice = Duration::from_millis(100)
            .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let r = match io {
            Stream::Plain(s) => tokio::time::timeout(slice, s.read(buf)).await,
            Stream::Tls(s) => tokio::time::timeout(slice, s.read(buf)).await,
        };
        match r {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(_)) => return Err(ReadEnd::Closed),
            Err(_) if tokio::time::Instant::now() >= deadline => return Err(ReadEnd::Timeout),
            Err(_) => continue,
        }
    }
}

async fn write_out(io: &mut Stream, out: &Output) -> std::io::Result<()> {
    if out.write.is_empty() {
        return Ok(());
    }
    write_all(io, &out.write).await
}

async fn write_all(io: &mut Stream, b: &[u8]) -> std::io::Result<()> {
    match io {
        Stream::Plain(s) => write_flush(s, b).await,
        Stream::Tls(s) => write_flush(&mut **s, b).await,
    }
}

async fn write_flush<S: AsyncWrite + AsyncRead + Unpin>(
    s: &mut S,
    b: &[u8],
) -> std::io::Result<()> {
    s.write_all(b).await?;
    s.flush().await
}
