//! The test DNS answered by hickory-resolver, as the engine will ask it.

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::error::ResolveErrorKind;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::TokioAsyncResolver;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use volley_load::dns::{self, Zone};
use volley_load::profile::Profile;

fn resolver(addr: SocketAddr) -> TokioAsyncResolver {
    let cfg = ResolverConfig::from_parts(
        None,
        vec![],
        NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
    );
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_millis(500);
    opts.attempts = 1;
    opts.cache_size = 0;
    TokioAsyncResolver::tokio(cfg, opts)
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
        let mx = r.mx_lookup("gmail.com.").await.unwrap();
        let hosts: Vec<String> = mx.iter().map(|m| m.exchange().to_ascii()).collect();
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
        let mx = r.mx_lookup("shop17.tail.test.").await.unwrap();
        assert_eq!(
            mx.iter().next().unwrap().exchange().to_ascii(),
            "mx.tail.sink.test."
        );
        // Null MX: one record, preference 0, exchange ".".
        let mx = r
            .mx_lookup(format!("{}.", dns::NULL_MX).as_str())
            .await
            .unwrap();
        let recs: Vec<_> = mx
            .iter()
            .map(|m| (m.preference(), m.exchange().to_ascii()))
            .collect();
        assert_eq!(recs, vec![(0, ".".to_string())]);
        // Fallback: the dead host first, a live one second.
        let mx = r
            .mx_lookup(format!("{}.", dns::FALLBACK).as_str())
            .await
            .unwrap();
        let mut recs: Vec<_> = mx
            .iter()
            .map(|m| (m.preference(), m.exchange().to_ascii()))
            .collect();
        recs.sort();
        assert_eq!(recs[0], (10, format!("{}.", dns::DEAD_MX_HOST)));
        assert_eq!(recs[1], (20, "mx.tail.sink.test.".to_string()));
        // No MX but an address: NOERROR with no MX records, then an A record.
        let e = r
            .mx_lookup(format!("{}.", dns::NO_MX).as_str())
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.kind(),
                ResolveErrorKind::NoRecordsFound {
                    response_code: ResponseCode::NoError,
                    ..
                }
            ),
            "{e}"
        );
        assert!(r
            .lookup_ip(format!("{}.", dns::NO_MX).as_str())
            .await
            .is_ok());
        let e = r
            .mx_lookup(format!("{}.", dns::NXDOMAIN).as_str())
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.kind(),
                ResolveErrorKind::NoRecordsFound {
                    response_code: ResponseCode::NXDomain,
                    ..
                }
            ),
            "{e}"
        );
        let e = r
            .mx_lookup(format!("{}.", dns::SERVFAIL).as_str())
            .await
            .unwrap_err();
        assert!(
            !matches!(
                e.kind(),
                ResolveErrorKind::NoRecordsFound {
                    response_code: ResponseCode::NoError,
                    ..
                }
            ),
            "{e}"
        );
        let e = r
            .mx_lookup(format!("{}.", dns::TIMEOUT).as_str())
            .await
            .unwrap_err();
        assert!(matches!(e.kind(), ResolveErrorKind::Timeout), "{e}");
        let txt = r.txt_lookup("sel._domainkey.news.test.").await.unwrap();
        assert_eq!(txt.iter().next().unwrap().to_string(), "v=DKIM1; p=abc");
    });
}
