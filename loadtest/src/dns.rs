//! The test DNS server: authoritative answers (hickory-server) that route every
//! generated domain to its provider's sink address, plus the edge cases a sender
//! must handle. Runs on its own thread with a current-thread tokio runtime, so tests
//! can start it in-process next to the sink.

use crate::profile::Profile;
use hickory_proto::op::{Header, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{MX, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::ServerFuture;
use std::collections::HashMap;
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
        self.mx_of(name).is_some() || self.a.contains_key(name) || self.txt.contains_key(name)
    }
}

pub struct DnsServer {
    pub addr: SocketAddr,
    pub zone: Arc<RwLock<Zone>>,
}

/// Starts serving `zone` on `addr` (UDP and TCP; port 0 picks a free port).
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
    let handler = Handler { zone: zone.clone() };
    std::thread::Builder::new()
        .name("test-dns".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let mut server = ServerFuture::new(handler);
                server.register_socket(tokio::net::UdpSocket::from_std(udp).expect("udp socket"));
                server.register_listener(
                    tokio::net::TcpListener::from_std(tcp).expect("tcp listener"),
                    Duration::from_secs(5),
                );
                if let Err(e) = server.block_until_done().await {
                    eprintln!("volley-load dns: {e}");
                }
            });
        })?;
    Ok(DnsServer { addr, zone })
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
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let info = request.request_info();
        let mut header = Header::response_from_request(info.header);
        header.set_authoritative(true);
        if info.header.message_type() != MessageType::Query
            || info.header.op_code() != OpCode::Query
        {
            let msg = builder.error_msg(info.header, ResponseCode::NotImp);
            return response
                .send_response(msg)
                .await
                .unwrap_or_else(send_failed);
        }
        let qname = info
            .query
            .name()
            .to_string()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let qtype = info.query.query_type();
        if qname == TIMEOUT {
            // Never answer: the resolver must time out. Bounded so the task ends.
            tokio::time::sleep(Duration::from_secs(120)).await;
            return ResponseInfo::from(header);
        }
        if qname == SERVFAIL {
            let msg = builder.error_msg(info.header, ResponseCode::ServFail);
            return response
                .send_response(msg)
                .await
                .unwrap_or_else(send_failed);
        }
        let name = Name::from(info.query.name().clone());
        let records = {
            let zone = self.zone.read().unwrap();
            zone.exists(&qname)
                .then(|| answer(&zone, &qname, qtype, &name))
        };
        let Some(records) = records else {
            header.set_response_code(ResponseCode::NXDomain);
            let msg = builder.build_no_records(header);
            return response
                .send_response(msg)
                .await
                .unwrap_or_else(send_failed);
        };
        let msg = builder.build(header, records.iter(), &[], &[], &[]);
        response
            .send_response(msg)
            .await
            .unwrap_or_else(send_failed)
    }
}

fn answer(zone: &Zone, qname: &str, qtype: RecordType, name: &Name) -> Vec<Record> {
    let mut out = Vec::new();
    match qtype {
        RecordType::MX => {
            for (pref, host) in zone.mx_of(qname).unwrap_or_default() {
                let exchange = if host.is_empty() {
                    Name::root()
                } else {
                    Name::from_str(&format!("{host}.")).unwrap_or_else(|_| Name::root())
                };
                out.push(Record::from_rdata(
                    name.clone(),
                    TTL_S,
                    RData::MX(MX::new(pref, exchange)),
                ));
            }
        }
        RecordType::A => {
            if let Some(IpAddr::V4(ip)) = zone.a.get(qname) {
                out.push(Record::from_rdata(
                    name.clone(),
                    TTL_S,
                    RData::A((*ip).into()),
                ));
            }
        }
        RecordType::AAAA => {
            if let Some(IpAddr::V6(ip)) = zone.a.get(qname) {
                out.push(Record::from_rdata(
                    name.clone(),
                    TTL_S,
                    RData::AAAA((*ip).into()),
                ));
            }
        }
        RecordType::TXT => {
            if let Some(t) = zone.txt.get(qname) {
                out.push(Record::from_rdata(
                    name.clone(),
                    TTL_S,
                    RData::TXT(TXT::new(t.clone())),
                ));
            }
        }
        _ => {}
    }
    out
}

fn send_failed(e: std::io::Error) -> ResponseInfo {
    eprintln!("volley-load dns: cannot send response: {e}");
    let mut h = Header::new();
    h.set_response_code(ResponseCode::ServFail);
    ResponseInfo::from(h)
}
