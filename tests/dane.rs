//! DANE for SMTP (RFC 7672) over loopback: the bundled DNS serves its tree signed
//! (its key given as the trust anchor), with TLSA records at chosen MX hosts; the
//! sink presents certificates from a test CA. Cases: DANE-EE and DANE-TA records
//! that match (delivered over TLS), records that do not (deferred, nothing sent in
//! clear), TLSA records that are bogus or whose lookup fails (the host not tried),
//! an insecure zone and a host without TLSA records (ordinary TLS), records all
//! unusable (TLS required, not verified), a receiver without STARTTLS, and DANE
//! over an MTA-STS policy that does not name the host.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use volley::deliver::dane::Dane;
use volley::deliver::dns::{DaneSettings, DnsConfig, Resolver, Route};
use volley_load::dns::DnsServer;

/// The sink's Google MX: gmail.com routes to it.
const MX: &str = "gmail-smtp-in.l.google.sink.test";

fn trust_anchor(dns: &DnsServer, dir: &Path) -> PathBuf {
    let path = dir.join("trust-anchor.txt");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&path, dns.trust_anchor()).unwrap();
    path
}

/// What DANE makes of `domain`'s MX hosts: (host, Dane) in order.
fn dane_of(dns: &DnsServer, anchor: &Path, domain: &str) -> Vec<(String, Dane)> {
    let cfg = DnsConfig {
        server: Some(dns.addr),
        timeout: std::time::Duration::from_secs(2),
        attempts: 2,
        dane: Some(DaneSettings {
            trust_anchor: Some(anchor.to_path_buf()),
        }),
    };
    let r = Resolver::start(&cfg, None).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = rt.block_on(r.lookup(domain));
    match answer.route {
        Route::Hosts(h) => h.into_iter().map(|h| (h.name, h.dane)).collect(),
        other => panic!("{domain}: {other:?}"),
    }
}

fn tlsa(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> hickory_resolver::proto::rr::rdata::TLSA {
    hickory_resolver::proto::rr::rdata::TLSA::new(usage.into(), selector.into(), matching.into(), data)
}

#[test]
fn validated_lookups_tell_secure_insecure_bogus_and_failed_tlsa_apart() {
    let env = env("dane-lookups", "");
    let anchor = trust_anchor(&env.dns, &env.dir);
    let sink_ip = env.sink.addrs[0][0].ip();
    {
        let mut z = env.dns.zone.write().unwrap();
        z.set_tlsa(&format!("_25._tcp.{MX}"), vec![tlsa(3, 1, 1, vec![7; 32])]);
        for (domain, host) in [
            ("bogus.test", "mx.bogus.test"),
            ("bogus-a.test", "mx.bogus-a.test"),
            ("servfail.test", "mx.servfail.test"),
            ("plain.test", "mx.plain.test"),
            ("d.insecure.test", "mx.insecure.test"),
            ("unusable.test", "mx.unusable.test"),
        ] {
            z.set_mx(domain, vec![(10, host.into())]);
            z.set_a(host, sink_ip);
        }
        z.set_tlsa("_25._tcp.mx.bogus.test", vec![tlsa(3, 1, 1, vec![7; 32])]);
        z.set_bogus("_25._tcp.mx.bogus.test");
        z.set_bogus("mx.bogus-a.test");
        z.set_servfail("_25._tcp.mx.servfail.test");
        z.set_unsigned("insecure.test");
        z.set_tlsa("_25._tcp.mx.insecure.test", vec![tlsa(3, 1, 1, vec![7; 32])]);
        z.set_tlsa("_25._tcp.mx.unusable.test", vec![tlsa(1, 1, 1, vec![7; 32])]);
    }
    let one = |domain: &str| {
        let mut hosts = dane_of(&env.dns, &anchor, domain);
        assert_eq!(hosts.len(), 1, "{domain}: {hosts:?}");
        hosts.remove(0).1
    };
    match one("gmail.com") {
        Dane::Tlsa(h) => {
            assert_eq!(h.host, MX);
            assert_eq!(h.describe(), format!("3 1 1 {}", "07".repeat(32)));
            assert!(h.verifies());
        }
        other => panic!("gmail.com: {other:?}"),
    }
    match one("bogus.test") {
        Dane::Failed(why) => assert!(
            why.contains("TLSA records of mx.bogus.test") && why.contains("bogus"),
            "{why}"
        ),
        other => panic!("bogus.test: {other:?}"),
    }
    match one("bogus-a.test") {
        Dane::Failed(why) => assert!(
            why.contains("address records of mx.bogus-a.test") && why.contains("bogus"),
            "{why}"
        ),
        other => panic!("bogus-a.test: {other:?}"),
    }
    match one("servfail.test") {
        Dane::Failed(why) => assert!(why.contains("SERVFAIL"), "{why}"),
        other => panic!("servfail.test: {other:?}"),
    }
    assert!(matches!(one("plain.test"), Dane::None));
    assert!(matches!(one("d.insecure.test"), Dane::None));
    match one("unusable.test") {
        Dane::Tlsa(h) => assert!(!h.verifies()),
        other => panic!("unusable.test: {other:?}"),
    }
}

#[test]
fn answers_signed_by_a_key_not_trusted_are_not_believed() {
    let env = env("dane-untrusted", "");
    let stranger = volley_load::dns::start(
        "127.0.0.1:0".parse().unwrap(),
        volley_load::dns::Zone::default(),
    )
    .unwrap();
    let anchor = trust_anchor(&stranger, &env.dir);
    env.dns
        .zone
        .write()
        .unwrap()
        .set_tlsa(&format!("_25._tcp.{MX}"), vec![tlsa(3, 1, 1, vec![7; 32])]);
    let hosts = dane_of(&env.dns, &anchor, "gmail.com");
    match &hosts[0].1 {
        Dane::Failed(why) => assert!(why.contains("bogus"), "{why}"),
        other => panic!("{other:?}"),
    }
}
