//! The test DNS answered by hickory-resolver, as the engine will ask it.

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use volley_load::dns::{self, Zone};
use volley_load::profile::Profile;

fn resolver(addr: SocketAddr) -> TokioResolver {
    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
    for c in &mut server.connections {
        c.port = addr.port();
    }
    let cfg = ResolverConfig::from_parts(None, vec![], vec![server]);
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_millis(500);
    opts.attempts = 1;
    opts.cache_size = 0;
    TokioResolver::builder_with_config(cfg, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .unwrap()
}

/// The MX records of a lookup: (preference, exchange).
fn mx(l: &Lookup) -> Vec<(u16, String)> {
    l.answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
            _ => None,
        })
        .collect()
}

/// The response code of a "no records" error, if it is one.
fn no_records(e: &NetError) -> Option<ResponseCode> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords { response_code, .. })) => {
            Some(*response_code)
        }
        _ => None,
    }
}

#[test]
fn routes_providers_and_serves_edge_cases() {
    let profile = Profile::load("accept-all").unwrap();
    let addrs: Vec<Vec<SocketAddr>> = profile.providers.iter().map(|p| p.listen.clone()).collect();
    let server = dns::start(
        "127.0.0.1:0".parse().unwrap(),
        Zone::from_profile(&profile, &addrs),
    )
    .unwrap();
    server
        .zone
        .write()
        .unwrap()
        .set_txt("sel._domainkey.news.test", vec!["v=DKIM1; p=abc".into()]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = resolver(server.addr);
        let l = r.mx_lookup("gmail.com.").await.unwrap();
        let hosts: Vec<String> = mx(&l).into_iter().map(|(_, h)| h).collect();
        assert_eq!(hosts, ["gmail-smtp-in.l.google.sink.test."]);
        let ip = r
            .lookup_ip("gmail-smtp-in.l.google.sink.test.")
            .await
            .unwrap();
        assert_eq!(
            ip.iter().collect::<Vec<_>>(),
            vec!["127.0.0.10".parse::<IpAddr>().unwrap()]
        );
        // The long tail routes by suffix.
        let l = r.mx_lookup("shop17.tail.test.").await.unwrap();
        assert_eq!(mx(&l)[0].1, "mx.tail.sink.test.");
        // Null MX: one record, preference 0, exchange ".".
        let l = r
            .mx_lookup(format!("{}.", dns::NULL_MX).as_str())
            .await
            .unwrap();
        assert_eq!(mx(&l), vec![(0, ".".to_string())]);
        // Fallback: the dead host first, a live one second.
        let l = r
            .mx_lookup(format!("{}.", dns::FALLBACK).as_str())
            .await
            .unwrap();
        let mut recs = mx(&l);
        recs.sort();
        assert_eq!(recs[0], (10, format!("{}.", dns::DEAD_MX_HOST)));
        assert_eq!(recs[1], (20, "mx.tail.sink.test.".to_string()));
        // No MX but an address: NOERROR with no MX records, then an A record.
        let e = r
            .mx_lookup(format!("{}.", dns::NO_MX).as_str())
            .await
            .unwrap_err();
        assert_eq!(no_records(&e), Some(ResponseCode::NoError), "{e}");
        assert!(r
            .lookup_ip(format!("{}.", dns::NO_MX).as_str())
            .await
            .is_ok());
        let e = r
            .mx_lookup(format!("{}.", dns::NXDOMAIN).as_str())
            .await
            .unwrap_err();
        assert_eq!(no_records(&e), Some(ResponseCode::NXDomain), "{e}");
        let e = r
            .mx_lookup(format!("{}.", dns::SERVFAIL).as_str())
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))
            ),
            "{e}"
        );
        let e = r
            .mx_lookup(format!("{}.", dns::TIMEOUT).as_str())
            .await
            .unwrap_err();
        assert!(matches!(e, NetError::Timeout), "{e}");
        let txt = r.txt_lookup("sel._domainkey.news.test.").await.unwrap();
        let text = match &txt.answers()[0].data {
            RData::TXT(t) => t.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(text, "v=DKIM1; p=abc");
    });
}

/// `volley-load sink`, killed when the test ends.
struct Sink(std::process::Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_sink_publishes_its_keys_tlsa_record_signed_with_the_anchor_it_writes() {
    use std::io::BufRead;
    let dir = std::env::temp_dir().join(format!("volley-load-dane-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["mx.sink.test".to_string()]).unwrap();
    let (cert, key, anchor) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("anchor"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A port free now for the DNS (UDP and TCP are bound by the sink).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dns_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut sink = Sink(
        std::process::Command::new(env!("CARGO_BIN_EXE_volley-load"))
            .args([
                "sink",
                "--port",
                "0",
                "--threads",
                "1",
                "--stats-interval-s",
                "0",
            ])
            .args(["--dns", &dns_addr.to_string()])
            .args(["--tls-cert", cert.to_str().unwrap()])
            .args(["--tls-key", key.to_str().unwrap()])
            .args(["--dane-anchor", anchor.to_str().unwrap()])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = sink.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let digest = ring::digest::digest(&ring::digest::SHA256, &ck.key_pair.public_key_der());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    let mut seen = Vec::new();
    let line = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.contains("TLSA") => break l,
            Ok(l) => seen.push(l),
            Err(_) => panic!("no TLSA line from the sink: {seen:?}"),
        }
    };
    assert!(line.contains(&format!("TLSA 3 1 1 {hex} at ")), "{line}");
    // A validating resolver with the anchor written finds the record secure.
    let anchors: hickory_resolver::proto::dnssec::TrustAnchors =
        std::fs::read_to_string(&anchor).unwrap().parse().unwrap();
    let mut server = NameServerConfig::udp_and_tcp(dns_addr.ip());
    for c in &mut server.connections {
        c.port = dns_addr.port();
    }
    let cfg = ResolverConfig::from_parts(None, vec![], vec![server]);
    let r = TokioResolver::builder_with_config(cfg, TokioRuntimeProvider::default())
        .with_trust_anchor(std::sync::Arc::new(anchors))
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let name = "_25._tcp.gmail-smtp-in.l.google.sink.test.";
    let l = rt
        .block_on(r.lookup(name, hickory_resolver::proto::rr::RecordType::TLSA))
        .unwrap();
    let tlsa: Vec<_> = l
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::TLSA(t) => Some((r.proof.is_secure(), t.cert_data.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(tlsa, vec![(true, digest.as_ref().to_vec())]);
    let _ = std::fs::remove_dir_all(&dir);
}
