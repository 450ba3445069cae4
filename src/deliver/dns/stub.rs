//! The stub resolver (RFC 1034 §5.3.1) for the lookups every receiving domain
//! needs when DANE is off: MX, A, AAAA and TXT, asked of the recursive nameservers
//! configured. hickory-resolver's client cost ~50 µs of CPU per query on this
//! path (its futures stack, a socket bound and its port checked per query, a
//! cache layer in front), which on a campaign to ~3,000 domains was ~30% of
//! `volley send`'s CPU. This one sends each query from a socket of its own,
//! connected to the nameserver (the kernel picks a random source port and takes
//! datagrams from that address alone), and reads the answer with hickory-proto's
//! wire format. Answers are kept by TTL and shared by the lookups waiting for
//! them: thousands of domains name the same few MX hosts, whose addresses are
//! then asked once. Addresses in /etc/hosts come first, as with hickory's
//! resolver (an operator may pin an MX host there). DANE's lookups stay with
//! hickory's validating resolver.

use super::{Answering, ANSWER_HELD_MAX};
use hickory_resolver::config::{ResolverConfig, ResolverOpts};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::Hosts;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The UDP payload size offered with EDNS(0) (RFC 6891 §6.2.5), DNS Flag Day
/// 2020's 1,232 octets: a longer answer comes truncated and is asked over TCP.
const UDP_PAYLOAD_BYTES_MAX: u16 = 1232;
/// Queries out at once: a campaign's first seconds ask for thousands of domains,
/// and a burst beyond what the nameserver's socket buffer holds is dropped
/// there, each drop costing a timeout.
const QUERIES_IN_FLIGHT_MAX: usize = 128;
/// Answers kept (by name and type); when full, those run out go, and if that
/// leaves more than three quarters, all.
const ANSWERS_KEPT_MAX: usize = 10_000;
/// The receive buffer: above [`UDP_PAYLOAD_BYTES_MAX`], so a server that sends
/// more than it was offered is mostly read whole; a datagram that fills it may
/// have been cut, and is asked again over TCP.
const DATAGRAM_BYTES_MAX: usize = 4096;

/// One answer, asked once for all who want it meanwhile, and until when it holds.
type Slot = Arc<tokio::sync::OnceCell<(Result<Lookup, NetError>, Instant)>>;

/// The nameservers to ask, in order, how long and how often; the answers kept.
pub(super) struct Stub {
    servers: Vec<SocketAddr>,
    /// The server that answered last, asked first: a dead first server costs
    /// one timeout, not one per query.
    answering: std::sync::atomic::AtomicUsize,
    timeout: Duration,
    attempts: usize,
    in_flight: tokio::sync::Semaphore,
    answers: Mutex<HashMap<(String, RecordType), Slot>>,
    /// The hosts file's addresses, answered before the nameservers are asked.
    hosts: Hosts,
}

impl Stub {
    /// Asks `config`'s nameservers (their UDP port; TCP on the same port) with
    /// `opts`' timeout per query and attempts (rounds over the servers), after
    /// `hosts` (the system's: [`Hosts::from_system`]) for addresses.
    pub(super) fn new(config: &ResolverConfig, opts: &ResolverOpts, hosts: Hosts) -> Stub {
        let mut servers = Vec::new();
        for s in config.name_servers() {
            let addr = SocketAddr::new(s.ip, s.connections.first().map_or(53, |c| c.port));
            if !servers.contains(&addr) {
                servers.push(addr);
            }
        }
        Stub {
            servers,
            answering: Default::default(),
            timeout: opts.timeout,
            attempts: opts.attempts.max(1),
            in_flight: tokio::sync::Semaphore::new(QUERIES_IN_FLIGHT_MAX),
            answers: Mutex::default(),
            hosts,
        }
    }

    /// `name`'s records of `rtype` (`name` absolute, UTF-8 names as A-labels),
    /// held until the least TTL among them: the answer kept while it holds (a
    /// "no records" one by its negative TTL; a failure only for the lookups that
    /// waited for it), else asked ([`Stub::ask`]). Errors: as `ask`'s.
    pub(super) async fn lookup(&self, name: &str, rtype: RecordType) -> Result<Lookup, NetError> {
        let name = Name::from_utf8(name)
            .map_err(|e| NetError::from(format!("{name}: not a domain name: {e}")))?;
        if let Some(pinned) = self
            .hosts
            .lookup_static_host(&Query::query(name.clone(), rtype))
        {
            return Ok(pinned);
        }
        // By the A-label form, so a name's spellings share one answer.
        let key = (name.to_ascii().to_ascii_lowercase(), rtype);
        loop {
            let slot = {
                let mut kept = self.answers.lock().expect("not poisoned");
                if kept.len() >= ANSWERS_KEPT_MAX && !kept.contains_key(&key) {
                    let now = Instant::now();
                    kept.retain(|_, s| s.get().is_none_or(|(_, until)| *until > now));
                    if kept.len() >= ANSWERS_KEPT_MAX / 4 * 3 {
                        kept.clear();
                    }
                }
                kept.entry(key.clone()).or_default().clone()
            };
            let asked_before = slot.initialized();
            let (answer, until) = slot
                .get_or_init(|| async {
                    let answer = self.ask(&name, rtype).await;
                    let until = held_until(&answer);
                    (answer, until)
                })
                .await;
            let now = Instant::now();
            if !asked_before {
                return answer.clone();
            }
            if *until > now {
                return counted_down(answer, *until, now);
            }
            // Run out: asked again, in a slot of its own.
            let mut kept = self.answers.lock().expect("not poisoned");
            if kept.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                kept.remove(&key);
            }
        }
    }

    /// `name`'s records of `rtype`, asked of the nameservers, the one that
    /// answered last first. A server that answers with an error code (SERVFAIL,
    /// REFUSED) is passed over for the next, as a stub resolver does (RFC 1034
    /// §5.3.3); while one of them did not answer at all, another round is made, up
    /// to `attempts`. At most attempts × servers × 2 timeouts (UDP, then TCP).
    /// Errors, worded as hickory's resolver words them so that both read alike:
    /// `NoRecordsFound` for NXDOMAIN or no records of the type (the negative TTL
    /// from the SOA in the authority section, RFC 2308 §5); `ResponseCode` when a
    /// server answered with an error code and none with an answer; `Timeout` or
    /// `Io` when none answered; `NoConnections` with no server.
    async fn ask(&self, name: &Name, rtype: RecordType) -> Result<Lookup, NetError> {
        use std::sync::atomic::Ordering::Relaxed;
        let query = Query::query(name.clone(), rtype);
        let (mut failed, mut silent) = (None, None);
        let first = self.answering.load(Relaxed);
        for _ in 0..self.attempts {
            silent = None;
            for i in (0..self.servers.len()).map(|i| (first + i) % self.servers.len()) {
                match self.exchange(self.servers[i], &query).await {
                    Ok(reply) => match reply.metadata.response_code {
                        ResponseCode::NoError | ResponseCode::NXDomain => {
                            self.answering.store(i, Relaxed);
                            return answer(query, reply);
                        }
                        code => failed = Some(NetError::Dns(DnsError::ResponseCode(code))),
                    },
                    Err(e) => silent = Some(e),
                }
            }
            // Only silence (or a socket error) is worth another round.
            if silent.is_none() {
                break;
            }
        }
        Err(failed.or(silent).unwrap_or(NetError::NoConnections))
    }

    /// One query to `server`: over UDP, and again over TCP when the answer came
    /// truncated (RFC 1035 §4.2.1, RFC 7766 §5), each within the timeout.
    async fn exchange(&self, server: SocketAddr, query: &Query) -> Result<Message, NetError> {
        let mut msg = Message::query();
        msg.metadata.recursion_desired = true;
        msg.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_PAYLOAD_BYTES_MAX);
        msg.set_edns(edns);
        let bytes = msg
            .to_vec()
            .map_err(|e| NetError::from(format!("cannot encode the query: {e}")))?;
        let id = msg.metadata.id;
        let _permit = self.in_flight.acquire().await.expect("never closed");
        let reply = tokio::time::timeout(self.timeout, udp(server, &bytes, id, query))
            .await
            .map_err(|_| NetError::Timeout)??;
        if !reply.metadata.truncation {
            return Ok(reply);
        }
        tokio::time::timeout(self.timeout, tcp(server, &bytes, id, query))
            .await
            .map_err(|_| NetError::Timeout)?
    }
}

/// The query over UDP; the first datagram that answers it. Any other (another
/// query's, late, or forged) is dropped and the wait goes on (RFC 5452 §9.1).
async fn udp(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
) -> Result<Message, NetError> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(bytes).await?;
    let mut buf = vec![0; DATAGRAM_BYTES_MAX];
    loop {
        let n = socket.recv(&mut buf).await?;
        if n == buf.len() {
            // Perhaps cut: taken as truncated, so asked again over TCP.
            let mut cut = Message::response(id, OpCode::Query);
            cut.metadata.truncation = true;
            return Ok(cut);
        }
        if let Some(reply) = reply_to(&buf[..n], id, query) {
            return Ok(reply);
        }
    }
}

/// The query over TCP, two-octet length first (RFC 1035 §4.2.2). The connection
/// is this query's alone, so its one answer must be the answer.
async fn tcp(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
) -> Result<Message, NetError> {
    let mut stream = TcpStream::connect(server).await?;
    let len = u16::try_from(bytes.len())
        .map_err(|_| NetError::from("the query is longer than TCP's 65,535 octets"))?;
    let mut framed = Vec::with_capacity(2 + bytes.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    reply_to(&buf, id, query).ok_or_else(|| {
        NetError::from(format!(
            "{server} answered the query for {} over TCP with something else",
            query.name()
        ))
    })
}

/// `wire` read as the reply to query `id` for `query`: a response to a standard
/// query, with that ID and that one question. None: anything else.
fn reply_to(wire: &[u8], id: u16, query: &Query) -> Option<Message> {
    let m = Message::from_vec(wire).ok()?;
    let ours = m.metadata.id == id
        && m.metadata.message_type == MessageType::Response
        && m.metadata.op_code == OpCode::Query
        && m.queries.len() == 1
        && m.queries[0] == *query;
    ours.then_some(m)
}

/// Until when `answer` may be kept: its records' TTL; a "no records" one's
/// negative TTL; a failure not at all.
fn held_until(answer: &Result<Lookup, NetError>) -> Instant {
    let now = Instant::now();
    match answer {
        Ok(l) => l.valid_until(),
        Err(NetError::Dns(DnsError::NoRecordsFound(n))) => {
            now + Duration::from_secs(n.negative_ttl.unwrap_or(0).into()).min(ANSWER_HELD_MAX)
        }
        Err(_) => now,
    }
}

/// A kept `answer` as given out at `now`: a "no records" one with the negative
/// TTL left until `until`, so its holders do not hold it for the whole TTL again.
fn counted_down(
    answer: &Result<Lookup, NetError>,
    until: Instant,
    now: Instant,
) -> Result<Lookup, NetError> {
    match answer {
        Err(NetError::Dns(DnsError::NoRecordsFound(n))) => {
            let mut n = n.clone();
            let left = until.saturating_duration_since(now).as_secs();
            n.negative_ttl = Some(u32::try_from(left).unwrap_or(u32::MAX));
            Err(NetError::Dns(DnsError::NoRecordsFound(n)))
        }
        other => other.clone(),
    }
}

/// The lookup a NOERROR or NXDOMAIN reply makes: its answer records when any of
/// the type asked is the name's (through its CNAME chain), else "no records": a
/// chain that ends in nothing of the type (the recursive resolver followed it) or
/// records of other names only.
fn answer(query: Query, reply: Message) -> Result<Lookup, NetError> {
    let code = reply.metadata.response_code;
    let name = query.name().to_ascii();
    if code == ResponseCode::NoError
        && !Answering::of(&reply.answers, &name, &[query.query_type()])
            .records
            .is_empty()
    {
        let ttl = reply.answers.iter().map(|r| r.ttl).min().unwrap_or(0);
        let until = Instant::now() + Duration::from_secs(ttl.into()).min(ANSWER_HELD_MAX);
        return Ok(Lookup::new_with_deadline(query, reply.answers, until));
    }
    let negative_ttl = reply.authorities.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
        _ => None,
    });
    let mut none = NoRecords::new(query, code);
    none.negative_ttl = negative_ttl;
    none.authorities = Some(reply.authorities.into());
    Err(NetError::Dns(DnsError::NoRecordsFound(none)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::config::NameServerConfig;
    use hickory_resolver::proto::rr::rdata::{A, SOA};
    use hickory_resolver::proto::rr::Record;
    use std::io::{Read, Write};
    use std::str::FromStr;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// What a fake nameserver sends back for one query: datagrams over UDP (or
    /// none), and the answer over TCP.
    type Behaviour = dyn Fn(&Message) -> (Vec<Message>, Option<Message>) + Send + Sync;

    /// A nameserver on loopback, UDP and TCP on one port, answering as
    /// `behaviour` says, counting the queries it gets; stops when dropped.
    struct Fake {
        addr: SocketAddr,
        queries: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn fake(behaviour: Arc<Behaviour>) -> Fake {
        let (udp, tcp) = (0..20)
            .find_map(|_| {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
                let tcp = std::net::TcpListener::bind(udp.local_addr().ok()?).ok()?;
                Some((udp, tcp))
            })
            .expect("a port free for UDP and TCP");
        let addr = udp.local_addr().unwrap();
        let (queries, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let tick = Some(Duration::from_millis(50));
        udp.set_read_timeout(tick).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let (q, s) = (queries.clone(), stop.clone());
        std::thread::spawn(move || {
            // Bounded: the test drops the fake, or a minute passes.
            let end = Instant::now() + Duration::from_secs(60);
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    q.fetch_add(1, Ordering::Relaxed);
                    let query = Message::from_vec(&buf[..n]).unwrap();
                    for reply in behaviour(&query).0 {
                        udp.send_to(&reply.to_vec().unwrap(), from).unwrap();
                    }
                }
                if let Ok((mut conn, _)) = tcp.accept() {
                    conn.set_nonblocking(false).unwrap();
                    let mut len = [0u8; 2];
                    conn.read_exact(&mut len).unwrap();
                    let mut query = vec![0; usize::from(u16::from_be_bytes(len))];
                    conn.read_exact(&mut query).unwrap();
                    let query = Message::from_vec(&query).unwrap();
                    if let Some(reply) = behaviour(&query).1 {
                        let bytes = reply.to_vec().unwrap();
                        conn.write_all(&(bytes.len() as u16).to_be_bytes()).unwrap();
                        conn.write_all(&bytes).unwrap();
                    }
                }
            }
        });
        Fake {
            addr,
            queries,
            stop,
        }
    }

    fn stub(servers: &[SocketAddr], timeout: Duration) -> Stub {
        let config = ResolverConfig::from_parts(
            None,
            vec![],
            servers
                .iter()
                .map(|s| {
                    let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                    for c in &mut ns.connections {
                        c.port = s.port();
                    }
                    ns
                })
                .collect::<Vec<_>>(),
        );
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        opts.attempts = 2;
        Stub::new(&config, &opts, Hosts::default())
    }

    /// The reply to `q` with `answers`, code `code`, and an SOA (TTL 600,
    /// minimum 60) when there are none.
    fn reply(q: &Message, code: ResponseCode, answers: Vec<Record>) -> Message {
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.metadata.response_code = code;
        r.add_queries(q.queries.clone());
        if answers.is_empty() {
            let zone = Name::from_str("example.test.").unwrap();
            let soa = SOA::new(zone.clone(), zone.clone(), 1, 3600, 600, 86_400, 60);
            r.add_authority(Record::from_rdata(zone, 600, RData::SOA(soa)));
        }
        r.add_answers(answers);
        r
    }

    fn a(q: &Message, octet: u8) -> Record {
        Record::from_rdata(
            q.queries[0].name().clone(),
            300,
            RData::A(A::new(192, 0, 2, octet)),
        )
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn ips(l: &Lookup) -> Vec<String> {
        l.answers().iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn datagrams_that_do_not_answer_the_query_are_dropped_and_the_answer_taken() {
        let server = fake(Arc::new(|q: &Message| {
            let mut wrong_id = reply(q, ResponseCode::NoError, vec![a(q, 66)]);
            wrong_id.metadata.id = q.metadata.id.wrapping_add(1);
            let mut other_name = reply(q, ResponseCode::NoError, vec![]);
            other_name.queries = vec![Query::query(
                Name::from_str("other.test.").unwrap(),
                RecordType::A,
            )];
            other_name.add_answer(Record::from_rdata(
                Name::from_str("other.test.").unwrap(),
                300,
                RData::A(A::new(192, 0, 2, 67)),
            ));
            let mut a_query = reply(q, ResponseCode::NoError, vec![a(q, 68)]);
            a_query.metadata.message_type = MessageType::Query;
            let right = reply(q, ResponseCode::NoError, vec![a(q, 1)]);
            (vec![wrong_id, other_name, a_query, right], None)
        }));
        let s = stub(&[server.addr], Duration::from_secs(5));
        let l = run(s.lookup("mx.example.test.", RecordType::A)).unwrap();
        assert_eq!(ips(&l), ["192.0.2.1"]);
    }

    #[test]
    fn a_truncated_answer_is_asked_again_over_tcp() {
        let server = fake(Arc::new(|q: &Message| {
            let mut cut = reply(q, ResponseCode::NoError, vec![]);
            cut.metadata.truncation = true;
            let whole = reply(q, ResponseCode::NoError, (1..=3).map(|i| a(q, i)).collect());
            (vec![cut], Some(whole))
        }));
        let s = stub(&[server.addr], Duration::from_secs(5));
        let l = run(s.lookup("mx.example.test.", RecordType::A)).unwrap();
        assert_eq!(ips(&l), ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
    }

    #[test]
    fn a_server_that_fails_or_is_silent_is_passed_over_for_the_next() {
        let servfail = fake(Arc::new(|q: &Message| {
            (vec![reply(q, ResponseCode::ServFail, vec![])], None)
        }));
        let silent = fake(Arc::new(|_: &Message| (vec![], None)));
        let good = fake(Arc::new(|q: &Message| {
            (vec![reply(q, ResponseCode::NoError, vec![a(q, 9)])], None)
        }));
        let s = stub(
            &[servfail.addr, silent.addr, good.addr],
            Duration::from_millis(300),
        );
        let l = run(s.lookup("mx.example.test.", RecordType::A)).unwrap();
        assert_eq!(ips(&l), ["192.0.2.9"]);
        // With no server answering: SERVFAIL is said at once, silence after each
        // round of attempts.
        let s = stub(&[servfail.addr], Duration::from_millis(300));
        match run(s.lookup("mx.example.test.", RecordType::A)) {
            Err(NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))) => {}
            other => panic!("{other:?}"),
        }
        let before = silent.queries.load(Ordering::Relaxed);
        let s = stub(&[silent.addr], Duration::from_millis(300));
        assert!(matches!(
            run(s.lookup("mx.example.test.", RecordType::A)),
            Err(NetError::Timeout)
        ));
        assert_eq!(
            silent.queries.load(Ordering::Relaxed) - before,
            2,
            "attempts"
        );
    }

    #[test]
    fn an_answer_is_the_names_own_records_through_its_cname_chain() {
        let server = fake(Arc::new(|q: &Message| {
            let name = q.queries[0].name().clone();
            let target = Name::from_str("target.example.test.").unwrap();
            let cname = Record::from_rdata(
                name.clone(),
                300,
                RData::CNAME(hickory_resolver::proto::rr::rdata::CNAME(target.clone())),
            );
            let of_target = Record::from_rdata(target, 300, RData::A(A::new(192, 0, 2, 7)));
            let answers = match name.to_ascii().as_str() {
                "alias.example.test." => vec![cname, of_target],
                "dangling.example.test." => vec![cname],
                // Only another name's records: no answer to the question.
                _ => vec![of_target],
            };
            (vec![reply(q, ResponseCode::NoError, answers)], None)
        }));
        let s = stub(&[server.addr], Duration::from_secs(5));
        let l = run(s.lookup("alias.example.test.", RecordType::A)).unwrap();
        assert_eq!(
            super::super::Answering::of(l.answers(), "alias.example.test.", &[RecordType::A]).ips(),
            ["192.0.2.7".parse::<std::net::IpAddr>().unwrap()]
        );
        for name in ["dangling.example.test.", "other.example.test."] {
            match run(s.lookup(name, RecordType::A)) {
                Err(NetError::Dns(DnsError::NoRecordsFound(n))) => {
                    assert_eq!(n.response_code, ResponseCode::NoError, "{name}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_datagram_that_fills_the_buffer_is_asked_again_over_tcp() {
        let server = fake(Arc::new(|q: &Message| {
            // Over the buffer: TXT strings past what the stub reads from a datagram.
            let long = Record::from_rdata(
                q.queries[0].name().clone(),
                300,
                RData::TXT(hickory_resolver::proto::rr::rdata::TXT::new(vec![
                    "x".repeat(250);
                    20
                ])),
            );
            let over = reply(q, ResponseCode::NoError, vec![long.clone()]);
            let short = Record::from_rdata(
                q.queries[0].name().clone(),
                300,
                RData::TXT(hickory_resolver::proto::rr::rdata::TXT::new(vec![
                    "whole".into()
                ])),
            );
            (
                vec![over],
                Some(reply(q, ResponseCode::NoError, vec![short])),
            )
        }));
        let s = stub(&[server.addr], Duration::from_secs(5));
        let l = run(s.lookup("txt.example.test.", RecordType::TXT)).unwrap();
        assert_eq!(ips(&l), ["whole"]);
    }

    #[test]
    fn the_hosts_files_addresses_come_before_the_nameservers() {
        let server = fake(Arc::new(|q: &Message| {
            (vec![reply(q, ResponseCode::NoError, vec![a(q, 4)])], None)
        }));
        let mut s = stub(&[server.addr], Duration::from_secs(5));
        let mut hosts = Hosts::default();
        hosts
            .read_hosts_conf("192.0.2.99 mx.pinned.test\n".as_bytes())
            .unwrap();
        s.hosts = hosts;
        let l = run(s.lookup("mx.pinned.test.", RecordType::A)).unwrap();
        assert_eq!(ips(&l), ["192.0.2.99"]);
        assert_eq!(server.queries.load(Ordering::Relaxed), 0);
        // Not in it: the nameserver is asked.
        let l = run(s.lookup("mx.other.test.", RecordType::A)).unwrap();
        assert_eq!(ips(&l), ["192.0.2.4"]);
        assert_eq!(server.queries.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_server_that_answered_last_is_asked_first() {
        let silent = fake(Arc::new(|_: &Message| (vec![], None)));
        let good = fake(Arc::new(|q: &Message| {
            (vec![reply(q, ResponseCode::NoError, vec![a(q, 3)])], None)
        }));
        let s = stub(&[silent.addr, good.addr], Duration::from_millis(300));
        run(async {
            for i in 0..3 {
                let name = format!("host{i}.example.test.");
                assert_eq!(
                    ips(&s.lookup(&name, RecordType::A).await.unwrap()),
                    ["192.0.2.3"]
                );
            }
        });
        assert_eq!(silent.queries.load(Ordering::Relaxed), 1);
        assert_eq!(good.queries.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn answers_and_denials_are_kept_by_their_ttl_and_shared_by_those_waiting() {
        let server = fake(Arc::new(|q: &Message| {
            let name = q.queries[0].name().to_ascii();
            let r = match name.as_str() {
                "nx.example.test." => reply(q, ResponseCode::NXDomain, vec![]),
                "nodata.example.test." => reply(q, ResponseCode::NoError, vec![]),
                _ => reply(q, ResponseCode::NoError, vec![a(q, 5)]),
            };
            (vec![r], None)
        }));
        let s = stub(&[server.addr], Duration::from_secs(5));
        run(async {
            // Lookups at once of one host: one query.
            let host = "mx.example.test.";
            let at_once = tokio::join!(
                s.lookup(host, RecordType::A),
                s.lookup(host, RecordType::A),
                s.lookup(host, RecordType::A),
                s.lookup(host, RecordType::A)
            );
            for l in [at_once.0, at_once.1, at_once.2, at_once.3] {
                assert_eq!(ips(&l.unwrap()), ["192.0.2.5"]);
            }
            for name in ["nx.example.test.", "nodata.example.test."] {
                for _ in 0..3 {
                    match s.lookup(name, RecordType::A).await {
                        Err(NetError::Dns(DnsError::NoRecordsFound(n))) => {
                            // The SOA's TTL 600 and minimum 60: the least (RFC 2308 §5),
                            // counted down when given out again (to 59 within a second).
                            let ttl = n.negative_ttl.unwrap_or(0);
                            assert!((59..=60).contains(&ttl), "{name}: {ttl}");
                            let code = match name {
                                "nx.example.test." => ResponseCode::NXDomain,
                                _ => ResponseCode::NoError,
                            };
                            assert_eq!(n.response_code, code);
                        }
                        other => panic!("{name}: {other:?}"),
                    }
                }
            }
            // The name in another case is the same name.
            s.lookup("MX.Example.TEST.", RecordType::A).await.unwrap();
            // A denial given out later has less of its negative TTL left.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            match s.lookup("nx.example.test.", RecordType::A).await {
                Err(NetError::Dns(DnsError::NoRecordsFound(n))) => {
                    assert!(n.negative_ttl.is_some_and(|t| t <= 58), "{n:?}")
                }
                other => panic!("{other:?}"),
            }
        });
        assert_eq!(server.queries.load(Ordering::Relaxed), 3);
    }
}
