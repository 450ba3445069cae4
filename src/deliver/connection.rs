//! The IO glue for one outbound connection: connect to the site's hosts in order,
//! then feed the sans-IO client session with the site's queued work, writing what
//! it says to write and reading what the server says, until the queue is drained,
//! the connection has carried its maximum, or the server goes away. After STARTTLS
//! the same loop runs the bytes through rustls (itself sans-IO) on the way.

use crate::deliver::dane::Dane;
use crate::deliver::dns::MxHost;
use crate::deliver::explain::{self, HandshakeError, Peer, Step, TlsPolicy};
use crate::deliver::schedule::{when_idle, IdleConn, IdleStep, Job, Next, Site, TlsOutcome};
use crate::deliver::shard::{stage_name, Attempt, Shard, Via};
use crate::deliver::tls_rpt::result_of_certificate;
use crate::message::dkim::Body;
use crate::policy::shaping::Claim;
use crate::policy::tls_rpt::ResultType;
use crate::smtp::client::{Caps, ClientConfig, ClientSession, Event, Stage, TlsMode, Transaction};
use crate::smtp::reply::Reply;
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller,
};
use monoio::net::TcpStream;
use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Read buffer per connection: replies are small, even pipelined.
const READ_BUF_BYTES: usize = 16 * 1024;

/// Why a session never got to carry mail; the reply the site's queue is deferred with.
struct Failure {
    reply: Reply,
    /// A TLS handshake failed under opportunistic TLS: the same host may take it in clear.
    retry_in_clear: bool,
}

fn failure(code: u16, enhanced: &str, why: String) -> Failure {
    Failure {
        reply: Reply::new(code, Some(enhanced), &why),
        retry_in_clear: false,
    }
}

/// A connection task for `site` from pool source `source` (None: the host's default
/// address); the shard spawned it and counted it in the site's limiters.
pub async fn run(shard: Rc<Shard>, site: Rc<Site>, source: Option<usize>, claim: Claim) {
    // Held until the first message goes (`session`), or given back below.
    let mut claim = Some(claim);
    let port = shard.cfg.smtp_port;
    let hosts = site.hosts();
    let targets: Vec<(&MxHost, SocketAddr)> = hosts
        .iter()
        .flat_map(|h| {
            h.addrs
                .iter()
                .map(move |ip| (h, SocketAddr::new(*ip, port)))
        })
        .collect();
    let mut last = failure(451, "4.4.1", "no address to connect to".into());
    let mut delivered_any = false;
    let from = source.map(|i| &site.sources[i].addr);
    'targets: for (mx, addr) in targets {
        let host = mx.name.as_str();
        let mut tls = site.tls();
        match &mx.dane {
            // Not tried without DANE's answer (RFC 7672 §2.2); the next host may do.
            Dane::Failed(why) => {
                let via = Via {
                    mx: host,
                    ip: addr,
                    tls: None,
                    source: source.map(|i| site.sources[i].addr.ip),
                    provider: &site.provider,
                };
                let outcome = Err((ResultType::DnssecInvalid, why.clone()));
                shard.count_dane_session(&site, &via, &[], outcome);
                last = failure(451, "4.7.5", why.clone());
                continue 'targets;
            }
            Dane::Tlsa(_) => tls = TlsMode::Required,
            Dane::None => {}
        }
        // At most twice per address: once as configured, once in clear after a failed
        // opportunistic handshake.
        for _ in 0..2 {
            let stream = match monoio::time::timeout(
                shard.cfg.connect_timeout,
                connect(addr, from.map(|f| f.ip)),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err((step, e))) => {
                    let why = explain::connect_failed(Peer { host, addr }, step, &e);
                    last = failure(451, "4.4.1", why.to_string());
                    continue 'targets;
                }
                Err(_) => {
                    let why =
                        explain::connect_timed_out(Peer { host, addr }, shard.cfg.connect_timeout);
                    last = failure(451, "4.4.1", why.to_string());
                    continue 'targets;
                }
            };
            let _ = stream.set_nodelay(true);
            match session(&shard, &site, source, &mut claim, stream, (mx, addr), tls).await {
                Ok(()) => {
                    delivered_any = true;
                    break 'targets;
                }
                Err(f) => {
                    let again = f.retry_in_clear;
                    if f.reply.code != 0 && !f.reply.is_positive() {
                        // "421 too many connections" at the greeting is news for shaping too.
                        let class = shard.classify(&f.reply);
                        shard.react(&site, source, Some(class), &f.reply);
                    }
                    last = f;
                    if !again {
                        // Refused at greeting or EHLO, or TLS policy: the next host may do (RFC 5321 §5.1).
                        continue 'targets;
                    }
                    tls = TlsMode::Disabled;
                }
            }
        }
    }
    drop(claim);
    shard.connection_closed(&site, source);
    if delivered_any {
        site.refusals.clear();
    } else if site.conns.get() > 0 {
        // Every host failed this connection; those still open will show whether
        // the destination works. A replacement now would fail the same way at
        // once, and its replacement too: under a TLS policy a refused certificate
        // fails in a millisecond, and that was thousands of handshakes a second.
        return;
    } else if !(refused_for_connections(&shard, &last) && site.refusals.again(Instant::now())) {
        // Unless "too many connections": the receiver may still count a connection
        // that just closed (Exim frees its slot when it reaps the child); it is
        // tried again shortly rather than the whole queue deferred for a minute.
        // Every host failed: the whole destination waits, not message by message.
        let jobs = site.take_queued();
        let text = format!(
            "no MX host took the mail; the last failure: {}",
            last.reply.text
        );
        let reply = Reply { text, ..last.reply };
        for job in jobs {
            shard.outcome(job, &reply, "connect", None, None);
        }
    }
    shard.ensure_connections(&site);
}

/// Whether the receiver turned the connection away for its connection limit (a
/// `throttled` refusal at the greeting or right after EHLO), not for the mail.
fn refused_for_connections(shard: &Shard, f: &Failure) -> bool {
    f.reply.code != 0 && shard.classify(&f.reply) == crate::policy::classify::Class::Throttled
}

/// Connects to `addr`, from `source` when given. Binding first with
/// IP_BIND_ADDRESS_NO_PORT leaves the port choice to connect(), so one source address
/// can hold a connection per (destination, port) pair, not one per local port.
/// An error says which step failed: binding the source address or connecting.
async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<TcpStream, (Step, std::io::Error)> {
    let connecting = |e| (Step::Connect, e);
    let Some(src) = source else {
        return TcpStream::connect_addr(addr).await.map_err(connecting);
    };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(connecting)?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the size given.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(&SocketAddr::new(src, 0).into())
        .map_err(|e| (Step::Bind(src), e))?;
    sock.set_nonblocking(true).map_err(connecting)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(connecting(e)),
    }
    let stream = TcpStream::from_std(sock.into()).map_err(connecting)?;
    stream.writable(false).await.map_err(connecting)?;
    let fd = borrowed_fd(&stream);
    if let Some(e) = socket2::SockRef::from(&fd)
        .take_error()
        .map_err(connecting)?
    {
        return Err(connecting(e));
    }
    Ok(stream)
}

/// The stream's descriptor, for socket options monoio does not offer.
fn borrowed_fd(stream: &TcpStream) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: the descriptor stays open as long as `stream`, and the borrow is tied
    // to `stream`'s lifetime.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(stream)) }
}

/// Whether the receiver wrote to (or closed) a connection we were not reading: a
/// non-blocking peek: one syscall per reuse after an idle spell (under pacing, each
/// message comes after one).
fn peer_spoke(stream: &TcpStream) -> bool {
    let fd = borrowed_fd(stream);
    let mut byte = [std::mem::MaybeUninit::uninit()];
    // Ok(0) is EOF, Ok(1) a reply waiting; WouldBlock is silence. Another error
    // (a reset) shows on the next read as well.
    socket2::SockRef::from(&fd)
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        .is_ok()
}

/// The largest buffer of TLS records kept for a connection's next write: one
/// pipelined batch of a few messages. A larger one (a window of big messages) is
/// let go after its write rather than held for the connection's life.
const WIRE_KEPT_MAX: usize = 256 * 1024;

/// The bytes on the wire: in clear, or through a rustls client connection with
/// the buffer its records are written to, kept from one write to the next.
enum Link {
    Plain,
    Tls(Box<rustls::ClientConnection>, Vec<u8>),
}

impl Link {
    /// Writes the session's output pieces `plain`, in order: in clear as they are
    /// ([`write_pieces`]), or as TLS records made across them ([`seal`]).
    /// Errors: the write's, or rustls's (an earlier fatal TLS error).
    ///
    /// [`seal`]: crate::deliver::tls::seal
    async fn send(&mut self, stream: &mut TcpStream, plain: Vec<Vec<u8>>) -> std::io::Result<()> {
        let (c, kept) = match self {
            Link::Plain => return write_pieces(stream, plain).await,
            Link::Tls(c, kept) => (c, kept),
        };
        let mut wire = std::mem::take(kept);
        crate::deliver::tls::seal(c, &plain, &mut wire)?;
        let mut written = Ok(());
        if !wire.is_empty() {
            let (w, back) = stream.write_all(wire).await;
            (written, wire) = (w.map(|_| ()), back);
        }
        if wire.capacity() <= WIRE_KEPT_MAX {
            wire.clear();
            *kept = wire;
        }
        written
    }

    /// Bytes read from the wire → plaintext for the session (possibly none yet).
    /// Also writes what TLS itself needs to send (alerts, key updates).
    async fn open(&mut self, stream: &mut TcpStream, wire: &[u8]) -> std::io::Result<Vec<u8>> {
        let Link::Tls(c, _) = self else {
            return Ok(wire.to_vec());
        };
        let mut rd = wire;
        while !rd.is_empty() {
            c.read_tls(&mut rd)?;
            c.process_new_packets()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
        let mut plain = Vec::new();
        match c.reader().read_to_end(&mut plain) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        self.send(stream, Vec::new()).await?;
        Ok(plain)
    }
}

/// The pieces one `writev` takes at most (Linux's IOV_MAX); more go in the next.
const PIECES_PER_WRITE_MAX: usize = 1024;

/// Writes `pieces` in order, a `writev` at a time, each of what is left after the
/// last: monoio's `write_vectored_all` (0.2.4) mishandles a short write, sending
/// a piece's start again and reading past the pieces. Errors: the write's, or
/// `WriteZero` when the socket takes nothing.
async fn write_pieces(stream: &mut TcpStream, mut pieces: Vec<Vec<u8>>) -> std::io::Result<()> {
    while !pieces.is_empty() {
        let later = pieces.split_off(pieces.len().min(PIECES_PER_WRITE_MAX));
        let (written, back) = stream.writev(monoio::buf::VecBuf::from(pieces)).await;
        pieces = back.into();
        pieces.extend(later);
        let mut n = match written? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => n,
        };
        let mut whole = 0;
        while whole < pieces.len() && n >= pieces[whole].len() {
            n -= pieces[whole].len();
            whole += 1;
        }
        pieces.drain(..whole);
        if let Some(first) = pieces.first_mut() {
            // A short write ends inside this piece: the rest of it goes next.
            first.drain(..n);
        }
    }
    Ok(())
}

/// Reads what arrives within `wait`; None when nothing did. Waking for pacing makes
/// this time out often, so the read is cancelled and then awaited, never dropped:
/// under io_uring a dropped read may already have taken bytes off the socket.
async fn read_within(
    stream: &mut TcpStream,
    buf: Vec<u8>,
    wait: Duration,
) -> (Option<std::io::Result<usize>>, Vec<u8>) {
    let canceller = Canceller::new();
    let mut read = std::pin::pin!(stream.cancelable_read(buf, canceller.handle()));
    let (res, buf) = match monoio::time::timeout(wait, read.as_mut()).await {
        Ok(done) => return (Some(done.0), done.1),
        Err(_) => {
            canceller.cancel();
            read.await
        }
    };
    match res {
        Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => (None, buf),
        other => (Some(other), buf),
    }
}

/// Runs the TLS handshake on `stream` within `timeout`.
async fn handshake(
    stream: &mut TcpStream,
    mut conn: rustls::ClientConnection,
    timeout: Duration,
) -> Result<Link, HandshakeError> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(READ_BUF_BYTES);
    while conn.is_handshaking() {
        let mut wire = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wire)
                .map_err(|e| HandshakeError::Io(Step::Write, e))?;
        }
        if !wire.is_empty() {
            stream
                .write_all(wire)
                .await
                .0
                .map_err(|e| HandshakeError::Io(Step::Write, e))?;
        }
        if !conn.is_handshaking() {
            break;
        }
        buf.clear();
        let left = deadline.saturating_duration_since(Instant::now());
        let (res, b) = monoio::time::timeout(left, stream.read(buf))
            .await
            .map_err(|_| HandshakeError::TimedOut(timeout))?;
        buf = b;
        match res {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(_) => {}
            Err(e) => return Err(HandshakeError::Io(Step::Read, e)),
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            conn.read_tls(&mut rd)
                .map_err(|e| HandshakeError::Io(Step::Read, e))?;
            if let Err(e) = conn.process_new_packets() {
                // Tell the server why, as TLS expects, then give up.
                let mut alert = Vec::new();
                let _ = conn.write_tls(&mut alert);
                let _ = stream.write_all(alert).await;
                return Err(HandshakeError::Tls(e));
            }
        }
    }
    Ok(Link::Tls(Box::new(conn), Vec::new()))
}

fn tls_summary(link: &Link) -> Option<String> {
    let Link::Tls(c, _) = link else { return None };
    let version = c
        .protocol_version()
        .map_or("?".into(), |v| format!("{v:?}"));
    let cipher = c
        .negotiated_cipher_suite()
        .map_or("?".into(), |s| format!("{:?}", s.suite()));
    // A resumed session skipped the certificate and its signature: worth knowing
    // when a receiver's handshakes are slow or its certificate changes.
    let resumed = match c.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => " resumed",
        _ => "",
    };
    Some(format!("{version} {cipher}{resumed}"))
}

/// A session without TLS where a policy asked for it (RFC 8460 §4.3.1).
const STARTTLS_MISSING: ResultType = ResultType::StarttlsNotSupported;

/// Runs one SMTP session. Ok when it was established (whatever happened to the
/// messages); Err with the reason when it never got past greeting, EHLO or TLS.
async fn session(
    shard: &Rc<Shard>,
    site: &Rc<Site>,
    source: Option<usize>,
    claim: &mut Option<Claim>,
    mut stream: TcpStream,
    (mx, addr): (&MxHost, SocketAddr),
    tls: TlsMode,
) -> Result<(), Failure> {
    let cfg = &shard.cfg;
    let host = mx.name.as_str();
    // A host with TLSA records is DANE's: its certificate check is theirs, and the
    // domain's MTA-STS policy does not apply to it (RFC 8461 §2).
    let dane = match &mx.dane {
        // Unusable records authenticate nothing: an enforced policy's check stays.
        Dane::Tlsa(d) if d.verifies() || !site.enforced() => Some(d),
        _ => None,
    };
    // Where the session counts for TLS-RPT: under DANE, or the domain's policy.
    let count = |via: &Via, outcome: TlsOutcome| match dane {
        Some(d) => shard.count_dane_session(site, via, &d.records, outcome),
        None => shard.count_tls_session(site, via, outcome),
    };
    let ehlo_name = source
        .and_then(|i| site.sources[i].addr.ehlo.clone())
        .unwrap_or_else(|| cfg.ehlo_name.clone());
    let client_cfg = ClientConfig {
        ehlo_name,
        timeouts: cfg.timeouts,
        window: cfg.window,
        tls,
    };
    let mut s = ClientSession::new(client_cfg, Instant::now());
    let mut link = Link::Plain;
    let mut tls_info: Option<String> = None;
    let mut inflight: HashMap<u64, (Vec<Job>, Instant)> = HashMap::new();
    let mut established = false;
    let mut sent = 0usize;
    let mut idle_since: Option<Instant> = None;
    let mut write_error: Option<String> = None;
    let mut buf = Vec::with_capacity(READ_BUF_BYTES);
    let (max_msgs, idle_timeout) = (site.max_msgs_per_conn(), site.idle_timeout());
    let chain = site.chain(source);
    // Transactions this connection lost to the server closing it (see pipeline.rs).
    let mut cut_off = 0;
    let mut caps = RcptCaps::default();
    loop {
        // A connection that sat idle may have been closed by the receiver (a 421 or
        // EOF we were not reading): look before reusing it, and read that instead.
        let idle = established && s.is_idle() && s.in_flight() == 0;
        let closed_meanwhile = idle && idle_since.is_some() && peer_spoke(&stream);
        // Fill the window from the site's queue, as fast as its limiters allow; not
        // once the shard is stopping (what is in flight finishes, then QUIT).
        let mut paced: Option<Instant> = None;
        s.set_window(site.window.get());
        while established
            && !closed_meanwhile
            && !caps.session_full
            && !shard.stop_requested()
            && s.can_submit()
            && sent < max_msgs
        {
            let jobs = match shard.take(site, &chain) {
                Next::Batch(jobs) => {
                    // The message this connection was opened for goes now.
                    claim.take();
                    jobs
                }
                // Nothing for it: the message it claimed went on another.
                Next::Empty => {
                    claim.take();
                    break;
                }
                Next::Paced(at) => {
                    paced = Some(at);
                    break;
                }
            };
            let tx = match build_tx(shard, &jobs, s.caps()) {
                Ok(tx) => tx,
                Err(r) => {
                    for job in jobs {
                        shard.outcome(job, &r, "local", None, Some(true));
                    }
                    continue;
                }
            };
            inflight.insert(tx.id, (jobs, Instant::now()));
            s.submit(tx, Instant::now());
            sent += 1;
        }
        if closed_meanwhile {
            // Fall through to the read below.
        } else if established && s.is_idle() && s.in_flight() == 0 {
            let now = Instant::now();
            let since = *idle_since.get_or_insert(now);
            let idle = IdleConn {
                sent,
                max_msgs,
                session_full: caps.session_full,
                stopping: shard.stop_requested(),
                // Over the connection cap after a back-off: this one gives way.
                over_cap: chain.iter().any(|l| l.over_cap()),
                queue_empty: site.queued() == 0,
                paced,
                idle_for: now.saturating_duration_since(since),
                idle_timeout,
            };
            match when_idle(&idle, now) {
                IdleStep::Quit => s.quit(now),
                IdleStep::Sleep(until) => {
                    monoio::time::sleep(until.saturating_duration_since(now)).await;
                    continue;
                }
                IdleStep::AwaitWork(at_most) => {
                    let _ = monoio::time::timeout(at_most, site.idle.wait()).await;
                    continue;
                }
                IdleStep::Again => continue,
            }
        } else {
            idle_since = None;
        }
        let out = s.take_output();
        if !out.is_empty() && write_error.is_none() {
            // The server may have closed after replying (a 421): read those replies
            // before calling the connection lost, or accepted messages look aborted.
            write_error = link
                .send(&mut stream, out)
                .await
                .err()
                .map(|e| explain::connection_broke(None, Step::Write, &e).to_string());
        }
        if !s.is_closed() {
            let now = Instant::now();
            // Wake for the session's deadline, or sooner when pacing allows the next message.
            let wait = s
                .deadline()
                .into_iter()
                .chain(paced)
                .min()
                .map_or(Duration::from_secs(60), |d| {
                    d.saturating_duration_since(now)
                });
            buf.clear();
            let (res, b) = read_within(&mut stream, buf, wait).await;
            buf = b;
            match res {
                Some(Ok(0)) => {
                    s.connection_lost(write_error.as_deref().unwrap_or("closed by the server"));
                }
                Some(Ok(_)) => match link.open(&mut stream, &buf).await {
                    Ok(plain) => s.receive(&plain, Instant::now()),
                    // A rustls error inside is worded as TLS's; else a write of TLS's own.
                    Err(e) => s.connection_lost(
                        &explain::connection_broke(None, Step::Write, &e).to_string(),
                    ),
                },
                Some(Err(e)) => {
                    s.connection_lost(&explain::connection_broke(None, Step::Read, &e).to_string())
                }
                None => s.handle_timeout(Instant::now()),
            }
        }
        while let Some(ev) = s.poll_event() {
            let via = Via {
                mx: host,
                ip: addr,
                tls: tls_info.as_deref(),
                source: source.map(|i| site.sources[i].addr.ip),
                provider: &site.provider,
            };
            match ev {
                Event::Ready => {
                    established = true;
                    // A testing policy's receiver without STARTTLS gets the mail in
                    // clear, and the domain hears of it (RFC 8460 §4.3.1).
                    if tls_info.is_none() && tls != TlsMode::Disabled {
                        let why = "no STARTTLS offered".to_string();
                        count(&via, Err((STARTTLS_MISSING, why)));
                    }
                }
                Event::StartTls => {
                    let name = rustls::pki_types::ServerName::try_from(host.to_string())
                        .unwrap_or_else(|_| {
                            rustls::pki_types::ServerName::IpAddress(addr.ip().into())
                        });
                    let peer = Peer { host, addr };
                    let policy = TlsPolicy {
                        required: tls == TlsMode::Required,
                        verify: dane.map_or(site.tls_verify(), |d| d.verifies()),
                        mta_sts: site.enforced() && dane.is_none(),
                        dane: dane.is_some(),
                    };
                    let config = match dane {
                        Some(d) => d.config.clone(),
                        None => shard.tls_config(site.tls_verify()),
                    };
                    let conn = rustls::ClientConnection::new(config, name).map_err(|e| {
                        let why = explain::tls_failed(Some(peer), &e, Some(policy));
                        failure(451, "4.7.5", why.to_string())
                    })?;
                    let mut conn = conn;
                    // The session's own window bounds what is written; rustls must not
                    // refuse a pipelined batch over its default 64 KiB.
                    conn.set_buffer_limit(None);
                    match handshake(&mut stream, conn, cfg.timeouts.ehlo).await {
                        Ok(l) => {
                            // Verified already under enforce and DANE; checked here
                            // under testing.
                            let checked = match (site.enforced() || dane.is_some(), &l) {
                                (false, Link::Tls(c, _)) if site.sts.is_some() => {
                                    shard.check_certificate(c, host)
                                }
                                _ => Ok(()),
                            };
                            let outcome =
                                checked.map_err(|e| (result_of_certificate(&e), e.to_string()));
                            count(&via, outcome);
                            link = l;
                            // The log says when DANE checked the certificate.
                            tls_info = tls_summary(&link).map(|t| match dane {
                                Some(d) if d.verifies() => format!("{t}, DANE-verified"),
                                Some(_) => format!("{t}, DANE (no usable record: unverified)"),
                                None => t,
                            });
                            s.tls_established(Instant::now());
                        }
                        Err(e) => {
                            let said = explain::handshake_failed(peer, &e, policy);
                            let result = match &e {
                                HandshakeError::Tls(e) => result_of_certificate(e),
                                _ => ResultType::ValidationFailure,
                            };
                            count(&via, Err((result, said.what.clone())));
                            let why = said.to_string();
                            // Required TLS is a policy failure; opportunistic TLS tries again in clear.
                            return Err(Failure {
                                reply: Reply::new(451, Some("4.7.5"), &why),
                                retry_in_clear: tls == TlsMode::Opportunistic,
                            });
                        }
                    }
                }
                Event::TxDone { id, replies } => {
                    let (jobs, started) = inflight
                        .remove(&id)
                        .expect("events name transactions in flight");
                    let tx_ms = Some(started.elapsed().as_millis() as u64);
                    site.window.answered();
                    if let Some(ms) = tx_ms {
                        shard.count_transaction(ms);
                    }
                    let done = Done { via: &via, tx_ms };
                    transaction_done(shard, site, source, done, jobs, replies, &mut caps);
                }
                Event::TxAborted { id, reason } => {
                    let (jobs, _) = inflight
                        .remove(&id)
                        .expect("events name transactions in flight");
                    cut_off += 1;
                    shard.requeue(site, jobs, &reason, Some(&via));
                }
                Event::Closed {
                    error,
                    tls_refused,
                    idle_close,
                    refused,
                    ..
                } => {
                    if let Some(reply) = refused {
                        // Counted as a failed connection, as a refusal at the greeting.
                        return Err(Failure {
                            reply,
                            retry_in_clear: false,
                        });
                    }
                    if let Some(r) = idle_close {
                        // Not a verdict on a message, but a receiver that closes
                        // idle connections with "too many connections" is throttling.
                        let class = shard.classify(&r);
                        shard.react(site, source, Some(class), &r);
                    } else {
                        site.window.cut_off(cut_off);
                    }
                    if tls_refused {
                        let why = error.unwrap_or_default();
                        count(&via, Err((STARTTLS_MISSING, why.clone())));
                        return Err(failure(451, "4.7.4", format!("{host} [{addr}]: {why}")));
                    }
                    if !established {
                        let why =
                            error.unwrap_or_else(|| "closed before the Extended HELLO".into());
                        return Err(failure(451, "4.4.2", format!("{host} [{addr}]: {why}")));
                    }
                    return Ok(());
                }
            }
        }
    }
}

/// What a connection has learned of its receiver's recipient caps.
#[derive(Default)]
struct RcptCaps {
    /// Transactions this connection delivered to at least one recipient.
    carried: usize,
    /// The receiver takes no more recipients on this session: take no more work.
    session_full: bool,
}

/// Where a finished transaction's replies came from.
struct Done<'a> {
    via: &'a Via<'a>,
    tx_ms: Option<u64>,
}

/// Records a finished transaction's replies, one per job. "Too many recipients"
/// (RFC 5321 §4.5.3.1.10) is the receiver's cap, never a verdict on the recipient:
/// - on a connection's first transaction, with some recipients taken, it is a cap per
///   transaction: the site keeps to what was taken, the rest go at once;
/// - on a connection that carried mail before, it is a cap per session: the
///   connection takes no more work and the rest go at once on a new one;
/// - with none taken on a fresh connection, they are deferred (temporary, even a 552).
///
/// Each case delivers at least one recipient or counts an attempt, so none loops.
fn transaction_done(
    shard: &Rc<Shard>,
    site: &Rc<Site>,
    source: Option<usize>,
    done: Done,
    jobs: Vec<Job>,
    replies: Vec<(Stage, Reply)>,
    caps: &mut RcptCaps,
) {
    let accepted = replies
        .iter()
        .filter(|(st, _)| matches!(st, Stage::Data))
        .count();
    let per_session = caps.carried > 0;
    let send_again = per_session || accepted > 0;
    let mut over_cap = Vec::new();
    for (mut job, (stage, reply)) in jobs.into_iter().zip(replies) {
        let too_many = stage == Stage::Rcpt && reply.is_too_many_recipients();
        if too_many && send_again {
            over_cap.push(job);
            continue;
        }
        let how = Attempt {
            stage: stage_name(stage),
            via: Some(done.via),
            tx_ms: done.tx_ms,
            permanent: too_many.then_some(false),
            ..Attempt::default()
        };
        let class = shard.record(&mut job, &reply, how);
        shard.react(site, source, class, &reply);
    }
    if accepted > 0 {
        caps.carried += 1;
    }
    if !over_cap.is_empty() {
        if per_session {
            caps.session_full = true;
        } else {
            site.learn_rcpt_limit(accepted);
        }
        shard.send_again(site, over_cap);
    }
}

/// Renders the message for the first job's merge values, addressed to every job, for
/// a receiver that offers `caps`: header fields RFC 2047-encoded when it lacks
/// SMTPUTF8, the body converted to 7 bit when it lacks 8BITMIME (RFC 6152 §3), then
/// DKIM-signed when its campaign signs, so the signature covers what is sent.
/// Err: the local failure the jobs get (not convertible, or not signable: never sent
/// unsigned behind the operator's back).
fn build_tx(shard: &Shard, jobs: &[Job], caps: Caps) -> Result<Transaction, Reply> {
    let inst = shard.instance(jobs[0].instance);
    let spool = shard.spool.borrow();
    // Recovery read every one of these records; the mapping cannot have changed since.
    let first = spool
        .read_queue(jobs[0].rref)
        .expect("a recovered record reads back");
    let mut body = Vec::new();
    if inst.submission {
        // Prepared when it was taken in (serve::submitted): sent as it is.
        body.extend_from_slice(&first.values[crate::spool::ingest::SUBMITTED_MESSAGE]);
    } else if inst.add_date || inst.add_message_id {
        let h = crate::message::compliance::per_message_headers(
            inst.add_date,
            inst.add_message_id
                .then(|| inst.message_id(shard.id, jobs[0].rref)),
        );
        body.extend_from_slice(h.as_bytes());
    }
    if !inst.submission {
        inst.template.render(&first.values, &mut body);
    }
    if !caps.smtputf8 {
        // RFC 6532 header fields need SMTPUTF8; without it, RFC 2047 encoded-words.
        match crate::message::mime::encode_headers(&body) {
            Ok(None) => {}
            Ok(Some(encoded)) => body = encoded,
            Err(e) => {
                let why = format!("{e} (the receiver does not offer SMTPUTF8); not sent");
                return Err(Reply::new(554, Some("5.6.9"), &why));
            }
        }
    }
    let mut form = Body::Fixed(0);
    if !caps.eightbitmime {
        match crate::message::mime::to_seven_bit(&body) {
            Ok(None) => {}
            Ok(Some(seven_bit)) => {
                body = seven_bit;
                form = Body::Fixed(1);
            }
            Err(e) => {
                let why = format!("{e} (the receiver does not offer 8BITMIME); not sent");
                return Err(Reply::new(554, Some("5.6.3"), &why));
            }
        }
    }
    if inst.submission || inst.template.body_varies() {
        form = Body::Varies;
    }
    let content = match shard.signer(jobs[0].instance) {
        Some(signer) => {
            let header = signer.sign(&mut body, form).map_err(|e| {
                let why = format!("DKIM signing failed: {e}; not sent unsigned");
                Reply::new(554, Some("5.7.0"), &why)
            })?;
            let mut content = Vec::with_capacity(header.len() + body.len());
            content.extend_from_slice(header.as_bytes());
            content.extend_from_slice(&body);
            content
        }
        None => body,
    };
    let rcpts = jobs
        .iter()
        .map(|j| {
            let v = spool
                .queue_value(j.rref, inst.email_col)
                .expect("a recovered record reads back");
            String::from_utf8_lossy(v).into_owned()
        })
        .collect();
    Ok(Transaction {
        id: shard.next_tx_id(),
        from: match inst.submission {
            true => String::from_utf8_lossy(&first.values[crate::spool::ingest::SUBMITTED_SENDER])
                .into_owned(),
            false => match inst.settings.sender.as_str() {
                "<>" => String::new(),
                s => s.to_string(),
            },
        },
        rcpts,
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::runtime::{block_on, Driver};
    use std::io::Read;

    /// Pieces written in clear over a socket whose send buffer is small and whose
    /// reader is slow, so that writes come back short, and more of them than one
    /// writev takes: the reader gets every byte once, in order, on both drivers.
    #[test]
    fn pieces_written_in_clear_arrive_whole_in_order_through_short_writes() {
        // More pieces than one writev takes (PIECES_PER_WRITE_MAX).
        let pieces: Vec<Vec<u8>> = (0..1500u32)
            .map(|i| {
                let len = 100 + (i as usize * 37) % 900;
                (0..len).map(|j| (i as usize * 7 + j) as u8).collect()
            })
            .collect();
        let expected: Vec<u8> = pieces.concat();
        for driver in [Driver::IoUring, Driver::Epoll] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let total = expected.len();
            let reader = std::thread::spawn(move || {
                let (mut conn, _) = listener.accept().unwrap();
                let mut got = Vec::with_capacity(total);
                let mut buf = [0u8; 1024];
                // Bounded: the whole, or the writer's end of the connection.
                while got.len() < total {
                    std::thread::sleep(Duration::from_micros(200));
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                got
            });
            let sent = pieces.clone();
            let result = block_on(driver, async move {
                let mut stream = TcpStream::connect(addr).await?;
                socket2::SockRef::from(&borrowed_fd(&stream)).set_send_buffer_size(4096)?;
                Link::Plain.send(&mut stream, sent).await
            });
            let result = match result {
                Err(e) if driver == Driver::IoUring => {
                    eprintln!("SKIPPED io_uring: {e}");
                    let _ = std::net::TcpStream::connect(addr);
                    let _ = reader.join();
                    continue;
                }
                other => other.unwrap(),
            };
            result.unwrap();
            let got = reader.join().unwrap();
            assert_eq!(got.len(), expected.len(), "{driver:?}");
            assert!(got == expected, "{driver:?}: the bytes differ");
        }
    }
}
