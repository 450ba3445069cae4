//! The test DNS server: authoritative answers that route every generated domain to
//! its provider's sink address, plus the edge cases a sender must handle. Runs on its
//! own thread with a current-thread tokio runtime, so tests can start it in-process
//! next to the sink.
//!
//! It serves the whole tree as one DNSSEC-signed root zone (RFC 4033-4035): to a
//! query with the DO bit, each answer comes with its RRSIG, made with the server's
//! own Ed25519 key, and an empty answer with an NSEC at the name asked ("black lies",
//! minimally covering, so nothing needs sorting). A validating resolver given
//! [`DnsServer::trust_anchor`] finds every name secure, except: names under a zone
//! made [`Zone::set_unsigned`] (an insecure delegation: NS at its apex, no DS), names
//! made [`Zone::set_bogus`] (their signatures broken) and names made
//! [`Zone::set_servfail`]. Queries without DO get plain answers, as before.

use crate::profile::Profile;
use hickory_proto::dnssec::crypto::Ed25519SigningKey;
use hickory_proto::dnssec::rdata::{DNSSECRData, DNSKEY, NSEC, RRSIG};
use hickory_proto::dnssec::{DnssecSigner, SigningKey};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{MX, NS, SOA, TLSA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordSet, RecordType};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub const TTL_S: u32 = 300;

/// Edge-case domains every zone serves (see README): no MX but an A record, null MX,
/// NXDOMAIN, SERVFAIL, no answer at all, and a first MX that refuses connections.
pub const NO_MX: &str = "no-mx.edge.test";
pub const NULL_MX: &str = "null-mx.edge.test";
pub const NXDOMAIN: &str = "nxdomain.edge.test";
pub const SERVFAIL: &str = "servfail.edge.test";
pub const TIMEOUT: &str = "timeout.edge.test";
pub const FALLBACK: &str = "fallback.edge.test";
/// The first MX of FALLBACK: an address where nothing listens.
pub const DEAD_MX_HOST: &str = "dead-mx.edge.test";
pub const DEAD_MX_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 254);

/// What the server answers. Shared and writable, so a test can publish a TXT
/// record (a DKIM key, say) after start.
#[derive(Debug, Default)]
pub struct Zone {
    /// Exact domain → MX (preference, host); an empty host is the null MX.
    mx: HashMap<String, Vec<(u16, String)>>,
    /// Suffix → MX host, for the long tail of generated domains.
    mx_suffix: Vec<(String, String)>,
    a: HashMap<String, IpAddr>,
    txt: HashMap<String, Vec<String>>,
    /// TLSA records (RFC 6698) by owner, e.g. `_25._tcp.mx.example.test`.
    tlsa: HashMap<String, Vec<TLSA>>,
    /// Apexes of zones served unsigned, each an insecure delegation from the root.
    unsigned: Vec<String>,
    /// Names whose signatures are broken, of one type or (None) all: a validator
    /// finds them bogus.
    bogus: HashMap<String, Option<RecordType>>,
    /// Names answered SERVFAIL, whatever the type asked.
    servfail: HashSet<String>,
    /// Names denied as an attacker would: no data (NOERROR) or NXDOMAIN, with no
    /// NSEC but the unsigned SOA of the zone given (which proves nothing of the name).
    forged_denial: HashMap<String, (String, ResponseCode)>,
    /// The TTL of every answer but the root's DNSKEY; None: [`TTL_S`].
    ttl: Option<u32>,
    /// Answers to which a forger appends another name's records of the type asked:
    /// (name asked, type) → the other name.
    appended: HashMap<(String, RecordType), String>,
}

impl Zone {
    /// Routes each provider's domains to its MX host and the host to its first listen
    /// address (`addrs` are the sink's actual addresses, per provider), plus the edge cases.
    pub fn from_profile(profile: &Profile, addrs: &[Vec<SocketAddr>]) -> Zone {
        let mut z = Zone::default();
        let mut tail_host = None;
        for (p, a) in profile.providers.iter().zip(addrs) {
            let host = p.mx_host.to_ascii_lowercase();
            for d in &p.domains {
                z.mx.insert(d.to_ascii_lowercase(), vec![(10, host.clone())]);
            }
            for s in &p.domain_suffixes {
                z.mx_suffix
                    .push((format!(".{}", s.to_ascii_lowercase()), host.clone()));
            }
            if let Some(a) = a.first() {
                z.a.insert(host.clone(), a.ip());
                if !p.domain_suffixes.is_empty() {
                    tail_host = Some((host.clone(), a.ip()));
                }
            }
        }
        // Longest suffix first, so a more specific suffix wins.
        z.mx_suffix.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let (tail_host, tail_ip) =
            tail_host.unwrap_or_else(|| (String::new(), IpAddr::V4(Ipv4Addr::LOCALHOST)));
        z.a.insert(NO_MX.into(), tail_ip);
        z.mx.insert(NULL_MX.into(), vec![(0, String::new())]);
        z.a.insert(DEAD_MX_HOST.into(), IpAddr::V4(DEAD_MX_IP));
        z.mx.insert(
            FALLBACK.into(),
            vec![(10, DEAD_MX_HOST.into()), (20, tail_host)],
        );
        z
    }

    pub fn set_mx(&mut self, domain: &str, mx: Vec<(u16, String)>) {
        self.mx.insert(domain.to_ascii_lowercase(), mx);
    }

    pub fn set_a(&mut self, host: &str, ip: IpAddr) {
        self.a.insert(host.to_ascii_lowercase(), ip);
    }

    pub fn set_txt(&mut self, name: &str, text: Vec<String>) {
        self.txt.insert(name.to_ascii_lowercase(), text);
    }

    /// Gives every answer (but the root's DNSKEY) a TTL of `secs`, for a test of
    /// what changes when records do.
    pub fn set_ttl(&mut self, secs: u32) {
        self.ttl = Some(secs);
    }

    /// Publishes `records` at `_25._tcp.HOST` for every MX host; how many hosts.
    pub fn set_tlsa_at_every_mx(&mut self, records: Vec<TLSA>) -> usize {
        let hosts = self.mx_hosts();
        for host in &hosts {
            self.set_tlsa(&format!("_25._tcp.{host}"), records.clone());
        }
        hosts.len()
    }

    /// Every MX host name the zone routes to, sorted (not the null MX's).
    fn mx_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .mx
            .values()
            .flatten()
            .map(|(_, h)| h.clone())
            .chain(self.mx_suffix.iter().map(|(_, h)| h.clone()))
            .filter(|h| !h.is_empty())
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Publishes TLSA records at `name` (`_25._tcp.HOST` for an MX host, RFC 7672).
    pub fn set_tlsa(&mut self, name: &str, records: Vec<TLSA>) {
        self.tlsa.insert(name.to_ascii_lowercase(), records);
    }

    /// Serves `zone` and the names under it unsigned, delegated without a DS: a
    /// validator proves them insecure.
    pub fn set_unsigned(&mut self, zone: &str) {
        self.unsigned.push(zone.to_ascii_lowercase());
    }

    /// Breaks the signatures of `name`'s records, denials included: a validator
    /// finds them bogus.
    pub fn set_bogus(&mut self, name: &str) {
        self.bogus.insert(name.to_ascii_lowercase(), None);
    }

    /// Breaks the signatures of `name`'s records of type `rtype` alone (its other
    /// answers stay secure, an AAAA denial beside a bogus A, say).
    pub fn set_bogus_type(&mut self, name: &str, rtype: RecordType) {
        self.bogus.insert(name.to_ascii_lowercase(), Some(rtype));
    }

    /// Denies every record at `name` with `rcode` (NOERROR: no data; NXDOMAIN: no
    /// such name) and no NSEC, only an unsigned SOA of `zone`: one made
    /// [`Zone::set_unsigned`], or any other name (`name` itself, claiming a zone cut
    /// there). A forged denial a validator must not take as proof.
    pub fn set_forged_denial(&mut self, name: &str, zone: &str, rcode: ResponseCode) {
        self.forged_denial.insert(
            name.to_ascii_lowercase(),
            (zone.to_ascii_lowercase(), rcode),
        );
    }

    /// Appends to the answer for `name`'s records of `rtype` the records of that
    /// type of `other` (signed as `other`'s zone is, or not), as a forger on the
    /// path may: a resolver must use only the records of the name it asked for.
    /// A forged denial of `name` ([`Zone::set_forged_denial`]) carries them unsigned.
    pub fn set_appended(&mut self, name: &str, rtype: RecordType, other: &str) {
        self.appended.insert(
            (name.to_ascii_lowercase(), rtype),
            other.to_ascii_lowercase(),
        );
    }

    /// Answers every query for `name` with SERVFAIL.
    pub fn set_servfail(&mut self, name: &str) {
        self.servfail.insert(name.to_ascii_lowercase());
    }

    fn mx_of(&self, name: &str) -> Option<Vec<(u16, String)>> {
        if let Some(mx) = self.mx.get(name) {
            return Some(mx.clone());
        }
        self.mx_suffix
            .iter()
            .find(|(s, _)| name.ends_with(s.as_str()))
            .map(|(_, h)| vec![(10, h.clone())])
    }

    fn exists(&self, name: &str) -> bool {
        self.mx_of(name).is_some()
            || self.a.contains_key(name)
            || self.txt.contains_key(name)
            || self.tlsa.contains_key(name)
            || self.unsigned.iter().any(|z| z == name)
    }

    /// The other name whose records of `qtype` a forger appends to `qname`'s answer
    /// ([`Zone::set_appended`]), and those records; None when nothing is appended.
    fn appended_to(&self, qname: &str, qtype: RecordType) -> Option<(&str, Vec<Record>)> {
        let other = self.appended.get(&(qname.to_string(), qtype))?;
        let other_name = Name::from_str(&format!("{other}.")).ok()?;
        Some((other, answer(self, other, qtype, &other_name)))
    }

    /// The unsigned zone `name` is in, if any.
    fn unsigned_zone(&self, name: &str) -> Option<&str> {
        self.unsigned
            .iter()
            .find(|z| name == z.as_str() || name.ends_with(&format!(".{z}")))
            .map(String::as_str)
    }

    /// The types at `name`, for an NSEC's type bit map.
    fn types_at(&self, name: &str) -> Vec<RecordType> {
        let mut types = Vec::new();
        if self.mx_of(name).is_some() {
            types.push(RecordType::MX);
        }
        match self.a.get(name) {
            Some(IpAddr::V4(_)) => types.push(RecordType::A),
            Some(IpAddr::V6(_)) => types.push(RecordType::AAAA),
            None => {}
        }
        if self.txt.contains_key(name) {
            types.push(RecordType::TXT);
        }
        if self.tlsa.contains_key(name) {
            types.push(RecordType::TLSA);
        }
        if self.unsigned.iter().any(|z| z == name) {
            types.push(RecordType::NS);
        }
        types
    }
}

/// How long the test zone's signatures are valid from an hour before they are made.
const SIGNATURE_VALIDITY: Duration = Duration::from_secs(2 * 86_400);

/// The key the whole tree is signed with: the root zone's only DNSKEY, a key-signing
/// and zone-signing key in one (flags 257, algorithm 15, Ed25519).
struct Signer {
    signer: DnssecSigner,
    dnskey: DNSKEY,
}

impl Signer {
    fn new() -> anyhow::Result<Signer> {
        let der = Ed25519SigningKey::generate_pkcs8()?;
        let key = Ed25519SigningKey::from_pkcs8(&der)?;
        let dnskey = DNSKEY::new(true, true, false, key.to_public_key()?);
        let signer = DnssecSigner::new(
            dnskey.clone(),
            Box::new(key),
            Name::root(),
            SIGNATURE_VALIDITY,
        );
        Ok(Signer { signer, dnskey })
    }

    fn dnskey_record(&self) -> Record {
        Record::from_rdata(
            Name::root(),
            TTL_S,
            RData::DNSSEC(DNSSECRData::DNSKEY(self.dnskey.clone())),
        )
    }

    /// The RRSIG over `records`, one RRset; with `broken`, its signature corrupted.
    fn sign(&self, records: &[Record], broken: bool) -> Option<Record> {
        let first = records.first()?;
        let mut set = RecordSet::with_ttl(first.name.clone(), first.record_type(), first.ttl);
        set.set_records(records.to_vec());
        let inception = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        let mut rrsig = RRSIG::from_rrset(&set, DNSClass::IN, inception, &self.signer).ok()?;
        if broken {
            let mut sig = rrsig.sig().to_vec();
            sig[0] ^= 0xff;
            rrsig = RRSIG::from_sig(rrsig.input().clone(), sig);
        }
        Some(Record::from_rdata(
            first.name.clone(),
            first.ttl,
            RData::DNSSEC(DNSSECRData::RRSIG(rrsig)),
        ))
    }
}

pub struct DnsServer {
    pub addr: SocketAddr,
    pub zone: Arc<RwLock<Zone>>,
    signer: Arc<Signer>,
}

impl DnsServer {
    /// The trust anchor for this server's signed answers: its root DNSKEY as one
    /// zone-file line (`. 300 IN DNSKEY 257 3 15 BASE64`), the form hickory's
    /// `TrustAnchors` and volley's `--dnssec-trust-anchor` read (RFC 4033 §3.1).
    pub fn trust_anchor(&self) -> String {
        format!("{}\n", self.signer.dnskey_record())
    }
}

/// Starts serving `zone` on `addr` (UDP and TCP; port 0 picks a free port), signed
/// with a key made now.
pub fn start(addr: SocketAddr, zone: Zone) -> anyhow::Result<DnsServer> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "the test DNS serves loopback only, not {addr}"
    );
    let (udp, tcp) = bind_pair(addr)?;
    let addr = udp.local_addr()?;
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    let zone = Arc::new(RwLock::new(zone));
    let signer = Arc::new(Signer::new()?);
    let handler = Arc::new(Handler {
        zone: zone.clone(),
        signer: signer.clone(),
    });
    std::thread::Builder::new()
        .name("test-dns".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(serve(udp, tcp, handler));
        })?;
    Ok(DnsServer { addr, zone, signer })
}

/// Answers on both sockets until the process ends.
async fn serve(udp: std::net::UdpSocket, tcp: std::net::TcpListener, handler: Arc<Handler>) {
    let udp = Arc::new(tokio::net::UdpSocket::from_std(udp).expect("udp socket"));
    let tcp = tokio::net::TcpListener::from_std(tcp).expect("tcp listener");
    let h = handler.clone();
    tokio::spawn(async move {
        loop {
            match tcp.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_tcp(stream, h.clone()));
                }
                Err(e) => {
                    eprintln!("volley-load dns: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = match udp.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                eprintln!("volley-load dns: receive: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (query, h, u) = (buf[..n].to_vec(), handler.clone(), udp.clone());
        tokio::spawn(async move {
            if let Some(reply) = h.respond(&query, true).await {
                if let Err(e) = u.send_to(&reply, peer).await {
                    eprintln!("volley-load dns: cannot send response: {e}");
                }
            }
        });
    }
}

/// How long a TCP connection may sit between queries.
const TCP_IDLE: Duration = Duration::from_secs(5);

/// Length-prefixed queries on one TCP connection (RFC 1035 §4.2.2), until EOF or
/// TCP_IDLE.
async fn serve_tcp(mut stream: tokio::net::TcpStream, handler: Arc<Handler>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        let Some(reply) = handler.respond(&query, false).await else {
            return;
        };
        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// UDP and TCP on the same port. With port 0 the UDP port picked may be taken for
/// TCP: try again with another, a bounded number of times.
fn bind_pair(addr: SocketAddr) -> anyhow::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    const TRIES: usize = 20;
    for _ in 0..TRIES {
        let udp = std::net::UdpSocket::bind(addr)
            .map_err(|e| anyhow::anyhow!("dns: cannot bind UDP {addr}: {e}"))?;
        let bound = udp.local_addr()?;
        match std::net::TcpListener::bind(bound) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() != 0 => anyhow::bail!("dns: cannot bind TCP {bound}: {e}"),
            Err(_) => continue,
        }
    }
    anyhow::bail!(
        "dns: no port free for both UDP and TCP on {} after {TRIES} tries",
        addr.ip()
    )
}

struct Handler {
    zone: Arc<RwLock<Zone>>,
    signer: Arc<Signer>,
}

impl Handler {
    /// The response to the query in `bytes`, encoded; None for no response at all
    /// (undecodable, or the TIMEOUT name). Over UDP, a response longer than the
    /// client takes is sent truncated (TC), for it to ask again over TCP.
    async fn respond(&self, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
        let request = Message::from_vec(bytes).ok()?;
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.authoritative = true;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        let dnssec_ok = request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        let max_payload = request
            .edns
            .as_ref()
            .map_or(512, |e| e.max_payload().max(512));
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            edns.set_dnssec_ok(dnssec_ok);
            response.set_edns(edns);
        }
        let query = match (
            request.metadata.message_type,
            request.metadata.op_code,
            request.queries.first(),
        ) {
            (MessageType::Query, OpCode::Query, Some(q)) => q.clone(),
            _ => {
                response.metadata.response_code = ResponseCode::NotImp;
                return encode(&response, udp, max_payload);
            }
        };
        response.add_query(query.clone());
        let qname = query
            .name()
            .to_string()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if qname == TIMEOUT {
            // Never answer: the resolver must time out. Bounded so the task ends.
            tokio::time::sleep(Duration::from_secs(120)).await;
            return None;
        }
        {
            let zone = self.zone.read().unwrap();
            if qname == SERVFAIL || zone.servfail.contains(&qname) {
                response.metadata.response_code = ResponseCode::ServFail;
            } else if let Some((apex, rcode)) = zone.forged_denial.get(&qname) {
                response.metadata.response_code = *rcode;
                response.add_authorities(soa(apex));
                // With the unsigned records of another name appended, if asked.
                if let Some((_, forged)) = zone.appended_to(&qname, query.query_type()) {
                    response.add_answers(forged);
                }
            } else {
                self.fill(
                    &zone,
                    &mut response,
                    &qname,
                    query.query_type(),
                    query.name(),
                    dnssec_ok,
                );
            }
        }
        encode(&response, udp, max_payload)
    }

    /// The answer to `qname` `qtype`, signed when the client asked (DO) and the name
    /// is in the signed tree.
    fn fill(
        &self,
        zone: &Zone,
        response: &mut Message,
        qname: &str,
        qtype: RecordType,
        name: &Name,
        dnssec_ok: bool,
    ) {
        // A DS at an unsigned zone's apex is the parent's, signed: it proves the
        // delegation insecure (RFC 4035 §5.2).
        let parent_side =
            qtype == RecordType::DS && zone.unsigned.iter().any(|z| z.as_str() == qname);
        let signed = dnssec_ok && (parent_side || zone.unsigned_zone(qname).is_none());
        let records = match qtype {
            _ if parent_side => Vec::new(),
            RecordType::DNSKEY if qname.is_empty() => vec![self.signer.dnskey_record()],
            _ => answer(zone, qname, qtype, name),
        };
        if records.is_empty() && !signed && !qname.is_empty() {
            // An unsigned negative answer carries its zone's SOA (RFC 2308 §3).
            if let Some(apex) = zone.unsigned_zone(qname) {
                response.add_authorities(soa(apex));
            }
            if !zone.exists(qname) {
                response.metadata.response_code = ResponseCode::NXDomain;
                return;
            }
        }
        let broken = zone
            .bogus
            .get(qname)
            .is_some_and(|t| t.is_none_or(|t| t == qtype));
        if signed && records.is_empty() {
            // No data: an NSEC at the name asked lists what is there (a name that
            // does not exist gets one too, listing nothing: a "black lie").
            let types = if parent_side {
                vec![RecordType::NS]
            } else {
                zone.types_at(qname)
            };
            let next = name
                .prepend_label(
                    hickory_proto::rr::domain::Label::from_raw_bytes(&[0]).expect("a label"),
                )
                .unwrap_or_else(|_| name.clone());
            let nsec = Record::from_rdata(
                name.clone(),
                zone.ttl.unwrap_or(TTL_S),
                RData::DNSSEC(DNSSECRData::NSEC(NSEC::new_cover_self(next, types))),
            );
            let sig = self.signer.sign(std::slice::from_ref(&nsec), broken);
            response.add_authority(nsec);
            response.add_authorities(sig);
            return;
        }
        let sig = match signed {
            true => self.signer.sign(&records, broken),
            false => None,
        };
        response.add_answers(records);
        response.add_answers(sig);
        if let Some((other, forged)) = zone.appended_to(qname, qtype) {
            let sig = match dnssec_ok && zone.unsigned_zone(other).is_none() {
                true => self.signer.sign(&forged, false),
                false => None,
            };
            response.add_answers(forged);
            response.add_answers(sig);
        }
    }
}

/// The SOA record of zone `apex`, unsigned.
fn soa(apex: &str) -> Option<Record> {
    let name = Name::from_str(&format!("{apex}.")).ok()?;
    let mname = Name::from_str(&format!("ns.{apex}.")).ok()?;
    let rname = Name::from_str(&format!("hostmaster.{apex}.")).ok()?;
    let soa = SOA::new(mname, rname, 1, 3600, 600, 86_400, TTL_S);
    Some(Record::from_rdata(name, TTL_S, RData::SOA(soa)))
}

/// The message's wire form; over UDP one longer than `max_payload` is sent
/// truncated instead.
fn encode(msg: &Message, udp: bool, max_payload: u16) -> Option<Vec<u8>> {
    let bytes = match msg.to_vec() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("volley-load dns: cannot encode a response: {e}");
            return None;
        }
    };
    if udp && bytes.len() > usize::from(max_payload) {
        return msg.truncate().to_vec().ok();
    }
    Some(bytes)
}

fn answer(zone: &Zone, qname: &str, qtype: RecordType, name: &Name) -> Vec<Record> {
    let mut out = Vec::new();
    let record = |data| Record::from_rdata(name.clone(), zone.ttl.unwrap_or(TTL_S), data);
    match qtype {
        RecordType::MX => {
            for (pref, host) in zone.mx_of(qname).unwrap_or_default() {
                let exchange = if host.is_empty() {
                    Name::root()
                } else {
                    Name::from_str(&format!("{host}.")).unwrap_or_else(|_| Name::root())
                };
                out.push(record(RData::MX(MX::new(pref, exchange))));
            }
        }
        RecordType::A => {
            if let Some(IpAddr::V4(ip)) = zone.a.get(qname) {
                out.push(record(RData::A((*ip).into())));
            }
        }
        RecordType::AAAA => {
            if let Some(IpAddr::V6(ip)) = zone.a.get(qname) {
                out.push(record(RData::AAAA((*ip).into())));
            }
        }
        RecordType::TXT => {
            if let Some(t) = zone.txt.get(qname) {
                out.push(record(RData::TXT(TXT::new(t.clone()))));
            }
        }
        RecordType::TLSA => {
            for t in zone.tlsa.get(qname).into_iter().flatten() {
                out.push(record(RData::TLSA(t.clone())));
            }
        }
        RecordType::NS if zone.unsigned.iter().any(|z| z.as_str() == qname) => {
            if let Ok(ns) = Name::from_str(&format!("ns.{qname}.")) {
                out.push(record(RData::NS(NS(ns))));
            }
        }
        _ => {}
    }
    out
}
