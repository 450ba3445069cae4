//! DANE for SMTP (RFC 7672) over loopback: the bundled DNS serves its tree signed
//! (its key given as the trust anchor), with TLSA records at chosen MX hosts; the
//! sink presents certificates from a test CA. Cases: DANE-EE and DANE-TA records
//! that match (delivered over TLS), records that do not (deferred, nothing sent in
//! clear), TLSA records that are bogus or whose lookup fails (the host not tried),
//! an insecure zone and a host without TLSA records (ordinary TLS), records all
//! unusable (TLS required, not verified), a receiver without STARTTLS, and DANE
//! over an MTA-STS policy that does not name the host.

mod common;

use common::pki::{ca, issue};
use common::*;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RecordType;
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
    match route_of(dns, anchor, domain) {
        Route::Hosts(h) => h.into_iter().map(|h| (h.name, h.dane)).collect(),
        other => panic!("{domain}: {other:?}"),
    }
}

/// `domain`'s route, looked up with DANE on.
fn route_of(dns: &DnsServer, anchor: &Path, domain: &str) -> Route {
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
    rt.block_on(r.lookup(domain)).route
}

fn tlsa(
    usage: u8,
    selector: u8,
    matching: u8,
    data: Vec<u8>,
) -> hickory_resolver::proto::rr::rdata::TLSA {
    hickory_resolver::proto::rr::rdata::TLSA::new(
        usage.into(),
        selector.into(),
        matching.into(),
        data,
    )
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
            ("bogus-mx.test", "mx.bogus-mx.test"),
            ("bogus-a4.test", "mx.bogus-a4.test"),
            ("forged.test", "mx.forged.test"),
        ] {
            z.set_mx(domain, vec![(10, host.into())]);
            z.set_a(host, sink_ip);
        }
        z.set_tlsa("_25._tcp.mx.bogus.test", vec![tlsa(3, 1, 1, vec![7; 32])]);
        z.set_bogus("_25._tcp.mx.bogus.test");
        z.set_bogus("mx.bogus-a.test");
        z.set_servfail("_25._tcp.mx.servfail.test");
        z.set_unsigned("insecure.test");
        z.set_tlsa(
            "_25._tcp.mx.insecure.test",
            vec![tlsa(3, 1, 1, vec![7; 32])],
        );
        z.set_tlsa(
            "_25._tcp.mx.unusable.test",
            vec![tlsa(1, 1, 1, vec![7; 32])],
        );
        // A bogus MX record set, and a bogus A beside a secure denial of AAAA.
        z.set_bogus_type("bogus-mx.test", RecordType::MX);
        z.set_bogus_type("mx.bogus-a4.test", RecordType::A);
        // "No TLSA records", vouched for by nothing but another zone's unsigned SOA.
        z.set_forged_denial(
            "_25._tcp.mx.forged.test",
            "insecure.test",
            ResponseCode::NoError,
        );
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
    match one("forged.test") {
        Dane::Failed(why) => assert!(
            why.contains("TLSA records of mx.forged.test") && why.contains("bogus"),
            "{why}"
        ),
        other => panic!("forged.test: {other:?}"),
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
    // Neither forged answer is believed: the domain waits (RFC 7672 §2.2.1).
    for domain in ["bogus-mx.test", "bogus-a.test", "bogus-a4.test"] {
        match route_of(&env.dns, &anchor, domain) {
            Route::TempFail(why) => assert!(
                why.contains(domain) && why.contains("failed DNSSEC validation"),
                "{why}"
            ),
            other => panic!("{domain}: {other:?}"),
        }
    }
}

#[test]
fn denials_of_mx_and_addresses_are_believed_only_with_their_proof() {
    let env = env("dane-denials", "");
    let anchor = trust_anchor(&env.dns, &env.dir);
    let sink_ip = env.sink.addrs[0][0].ip();
    {
        let mut z = env.dns.zone.write().unwrap();
        z.set_unsigned("insecure.test");
        // Forged: no NSEC, only the SOA of another (unsigned) zone, or of the name
        // itself, claiming a zone cut there.
        z.set_forged_denial("nodata.test", "insecure.test", ResponseCode::NoError);
        z.set_forged_denial("nxdomain.test", "insecure.test", ResponseCode::NXDomain);
        z.set_forged_denial("selfsoa.test", "selfsoa.test", ResponseCode::NXDomain);
        // With an unsigned record of another name in the answer, which leaves the
        // denial with no authority records at all.
        z.set_forged_denial("appended.test", "insecure.test", ResponseCode::NoError);
        z.set_mx("x.insecure.test", vec![(10, "mx.x.insecure.test".into())]);
        z.set_appended("appended.test", RecordType::MX, "x.insecure.test");
        z.set_mx("forged-a.test", vec![(10, "mx.forged-a.test".into())]);
        z.set_forged_denial("mx.forged-a.test", "insecure.test", ResponseCode::NoError);
        // Genuine: an unsigned zone's own denials, and a signed one's with its NSEC.
        z.set_a("implicit.insecure.test", sink_ip);
    }
    // A forged "no MX" would lead to the implicit MX, a forged NXDOMAIN would
    // bounce, a forged address denial would drop the host: each is a failed
    // lookup instead, and the domain waits (RFC 7672 §2.2.1).
    for domain in [
        "nodata.test",
        "nxdomain.test",
        "selfsoa.test",
        "appended.test",
        "forged-a.test",
    ] {
        match route_of(&env.dns, &anchor, domain) {
            Route::TempFail(why) => {
                assert!(why.contains("failed DNSSEC validation"), "{domain}: {why}")
            }
            other => panic!("{domain}: {other:?}"),
        }
    }
    for domain in ["nothing.test", "nothing.insecure.test"] {
        match route_of(&env.dns, &anchor, domain) {
            Route::NoSuchDomain(why) => assert!(why.contains(domain), "{why}"),
            other => panic!("{domain}: {other:?}"),
        }
    }
    match route_of(&env.dns, &anchor, "implicit.insecure.test") {
        Route::Hosts(h) => {
            assert_eq!(h.len(), 1);
            assert_eq!(h[0].name, "implicit.insecure.test");
            assert_eq!(h[0].addrs, vec![sink_ip]);
            assert!(matches!(h[0].dane, Dane::None), "{:?}", h[0].dane);
        }
        other => panic!("implicit.insecure.test: {other:?}"),
    }
}

#[test]
fn a_nameserver_whose_answers_do_not_validate_is_refused_at_start() {
    // Signed by a key that is not the trust anchor: as a nameserver that strips
    // DNSSEC records would, it would make every lookup bogus and defer all mail.
    let env = env("dane-untrusted", "");
    let stranger = volley_load::dns::start(
        "127.0.0.1:0".parse().unwrap(),
        volley_load::dns::Zone::default(),
    )
    .unwrap();
    let anchor = trust_anchor(&stranger, &env.dir);
    let cfg = DnsConfig {
        server: Some(env.dns.addr),
        timeout: std::time::Duration::from_secs(2),
        attempts: 2,
        dane: Some(DaneSettings {
            trust_anchor: Some(anchor),
        }),
    };
    let e = Resolver::start(&cfg, None).err().expect("refused");
    let e = e.to_string();
    assert!(
        e.contains("DANE needs DNSSEC") && e.contains("bogus") && e.contains("dnssec_trust_anchor"),
        "{e}"
    );
    // A trust anchor file that is not one says so.
    let bad = env.dir.join("not-an-anchor.txt");
    std::fs::write(&bad, "hello\n").unwrap();
    let cfg = DnsConfig {
        dane: Some(DaneSettings {
            trust_anchor: Some(bad.clone()),
        }),
        ..cfg
    };
    let e = Resolver::start(&cfg, None)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains(bad.to_str().unwrap()) && e.contains("DNSKEY"),
        "{e}"
    );
}

/// The sink presenting a chain (a certificate for MX, then its CA's) from a test CA
/// volley does not trust, the test DNS signed, its key the trust anchor.
struct World {
    env: Env,
    anchor: PathBuf,
    /// The sink certificate's SubjectPublicKeyInfo and its CA's certificate (DER).
    leaf_spki: Vec<u8>,
    ca_der: Vec<u8>,
    pki: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pki);
    }
}

fn world(name: &str, starttls: bool) -> World {
    world_for(name, starttls, MX)
}

/// As `world`, the sink's certificate issued for `leaf_host`.
fn world_for(name: &str, starttls: bool, leaf_host: &str) -> World {
    world_behaving(name, starttls, leaf_host, "")
}

/// As `world_for`, the sink's providers with `behaviour` (TOML).
fn world_behaving(name: &str, starttls: bool, leaf_host: &str, behaviour: &str) -> World {
    let pki = std::env::temp_dir().join(format!("volley-test-{name}-pki-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pki);
    std::fs::create_dir_all(&pki).unwrap();
    let ca = ca(&pki, "ca");
    let (cert_file, key_file, cert, key) = issue(&ca, &pki, leaf_host);
    std::fs::write(&cert_file, format!("{}{}", cert.pem(), ca.cert.pem())).unwrap();
    let env = match starttls {
        true => env_with_certificate_behaving(name, behaviour, cert_file, key_file),
        false => env_with(name, behaviour, false),
    };
    let anchor = trust_anchor(&env.dns, &env.dir);
    World {
        anchor,
        leaf_spki: key.public_key_der(),
        ca_der: ca.cert.der().to_vec(),
        env,
        pki,
    }
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

impl World {
    /// The test DNS's zone, to change.
    fn zone(&self) -> std::sync::RwLockWriteGuard<'_, volley_load::dns::Zone> {
        self.env.dns.zone.write().unwrap()
    }

    /// Publishes `records` as the MX host's TLSA RRset.
    fn publish(&self, records: Vec<hickory_resolver::proto::rr::rdata::TLSA>) {
        let mut z = self.zone();
        z.set_tlsa(&format!("_25._tcp.{MX}"), records);
    }

    fn send(&self, id: &str, n: usize, deferred: bool) -> (Vec<serde_json::Value>, u64) {
        let mut cfg = self.env.config();
        cfg.dns.dane = Some(DaneSettings {
            trust_anchor: Some(self.anchor.clone()),
        });
        cfg.tls_rpt = true;
        send_to_gmail(&self.env, cfg, id, n, deferred)
    }

    /// Today's TLS-RPT tallies of gmail.com under DANE: per TLSA RRset (its
    /// records), the successful and failed sessions and the failure rows' result
    /// types.
    fn tallies(&self) -> Vec<(Vec<String>, u64, u64, Vec<String>)> {
        let today = volley::deliver::tls_rpt::date_of(std::time::SystemTime::now());
        let path = self.env.dir.join(format!("spool/tls-rpt/{today}.json"));
        let day: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let policies = day["domains"]["gmail.com"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        policies
            .iter()
            .filter(|p| p[0]["policy_type"] == "tlsa")
            .map(|p| {
                let (applied, t) = (&p[0], &p[1]);
                assert_eq!(applied["mx_host"][0], MX, "{applied}");
                let strings = |v: &serde_json::Value| -> Vec<String> {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s.as_str().unwrap().to_string())
                        .collect()
                };
                let rows = t["failures"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r[0]["result_type"].as_str().unwrap().to_string())
                    .collect();
                (
                    strings(&applied["policy_string"]),
                    t["successful"].as_u64().unwrap(),
                    t["failed"].as_u64().unwrap(),
                    rows,
                )
            })
            .collect()
    }
}

/// `n` deliveries, all over TLS, each `tls` field ending as `how` says (the DANE
/// check made, or "" for none).
fn delivered_over(lines: &[serde_json::Value], n: usize, how: &str) {
    let delivered: Vec<_> = lines.iter().filter(|l| l["type"] == "Delivery").collect();
    assert_eq!(delivered.len(), n, "{lines:#?}");
    for l in delivered {
        let tls = l["tls"].as_str().unwrap_or("");
        assert!(tls.contains("TLS"), "{l}");
        match how {
            "" => assert!(!tls.contains("DANE"), "{l}"),
            how => assert!(tls.ends_with(how), "{l}"),
        }
    }
}

fn delivered_over_tls(lines: &[serde_json::Value], n: usize) {
    delivered_over(lines, n, ", DANE-verified")
}

#[test]
fn dane_ee_and_dane_ta_records_that_match_get_the_mail_over_tls() {
    let w = world("dane-match", true);
    // DANE-EE: the key's SHA-256, no name or CA check (the CA is trusted nowhere).
    w.publish(vec![tlsa(3, 1, 1, sha256(&w.leaf_spki))]);
    let (lines, accepted) = w.send("ee", 3, false);
    assert_eq!(accepted, 3, "{lines:#?}");
    delivered_over_tls(&lines, 3);
    // DANE-TA: the CA's certificate, which the chain must lead to for the MX name.
    w.publish(vec![tlsa(2, 0, 1, sha256(&w.ca_der))]);
    let (lines, accepted) = w.send("ta", 2, false);
    assert_eq!(accepted, 5, "{lines:#?}");
    delivered_over_tls(&lines, 2);
    // One record of several matching is enough.
    w.publish(vec![
        tlsa(3, 1, 1, vec![9; 32]),
        tlsa(3, 0, 2, vec![9; 64]),
        tlsa(3, 1, 0, w.leaf_spki.clone()),
    ]);
    let (lines, accepted) = w.send("some", 1, false);
    assert_eq!(accepted, 6, "{lines:#?}");
    delivered_over_tls(&lines, 1);
    // Each RRset is a policy of its own in the domain's TLS report, every session
    // under it successful.
    let tallies = w.tallies();
    assert_eq!(tallies.len(), 3, "{tallies:?}");
    let ee = format!("3 1 1 {}", hex(&sha256(&w.leaf_spki)));
    let under_ee = tallies.iter().find(|t| t.0 == vec![ee.clone()]).unwrap();
    assert!(under_ee.1 >= 1 && under_ee.2 == 0, "{tallies:?}");
    assert!(tallies.iter().all(|t| t.1 >= 1 && t.2 == 0), "{tallies:?}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02X}")).collect()
}

#[test]
fn a_certificate_no_tlsa_record_names_gets_nothing_in_clear_or_otherwise() {
    // Greetings take 0-50 ms, so connections fail at different times, as they do
    // at a real receiver.
    let staggered = "[latency_ms]\ngreeting = [0, 50]";
    let w = world_behaving("dane-mismatch", true, MX, staggered);
    w.publish(vec![tlsa(3, 1, 1, vec![9; 32]), tlsa(2, 0, 1, vec![9; 32])]);
    let (lines, accepted) = w.send("ee", 400, true);
    assert_eq!(accepted, 0, "{lines:#?}");
    let presented = format!(
        "the key it presented is 3 1 1 {}",
        hex(&sha256(&w.leaf_spki))
    );
    all_deferred_as(&lines, "4.7.5", &[MX, "TLSA", "RFC 7672", &presented]);
    assert!(
        lines
            .iter()
            .all(|l| !l["reply"].as_str().unwrap().contains("tls_verify off")),
        "advice that does not apply under DANE: {lines:#?}"
    );
    // Each refused connection is not replaced at once by another that fails the
    // same way: the destination waits. A storm of handshakes was thousands; each
    // shard may open up to the cap of 32 in turn (67 were seen under load).
    let connections = w.env.sink.summary().counts.connections;
    assert!(connections <= 4 * 32, "{connections} connections");
    // A DANE-TA record of the CA, but the certificate it issued is for another
    // name: the chain must be valid for the MX host name (RFC 7672 §3.2.2).
    let other = world_for("dane-othername", true, "mx.elsewhere.test");
    other.publish(vec![tlsa(2, 0, 1, sha256(&other.ca_der))]);
    let (lines, accepted) = other.send("ta", 1, true);
    assert_eq!(accepted, 0, "{lines:#?}");
    all_deferred_as(&lines, "4.7.5", &[MX, "TLSA", "chain"]);
    // The same certificate named by a DANE-EE record: no name check (§3.1.1).
    other.publish(vec![tlsa(3, 1, 1, sha256(&other.leaf_spki))]);
    let (lines, accepted) = other.send("ee-other", 1, false);
    assert_eq!(accepted, 1, "{lines:#?}");
    // Reported as tlsa-invalid, under the RRset.
    for tallies in [w.tallies(), other.tallies()] {
        let under_ta = tallies
            .iter()
            .filter(|t| t.0[0].starts_with("3 1 1 09") || t.0[0].starts_with("2 0 1"));
        for t in under_ta {
            assert!(t.1 == 0 && t.2 >= 1, "{tallies:?}");
            assert!(t.3.iter().all(|r| r == "tlsa-invalid"), "{tallies:?}");
        }
        assert!(tallies.iter().any(|t| t.2 >= 1), "{tallies:?}");
    }
}

#[test]
fn bogus_or_failed_tlsa_lookups_defer_the_host_and_proven_absence_does_not() {
    let w = world("dane-bogus", true);
    w.publish(vec![tlsa(3, 1, 1, sha256(&w.leaf_spki))]);
    w.zone().set_bogus(&format!("_25._tcp.{MX}"));
    let (lines, accepted) = w.send("bogus", 2, true);
    assert_eq!(accepted, 0, "{lines:#?}");
    all_deferred_as(&lines, "4.7.5", &[MX, "TLSA records", "bogus"]);
    w.zone().set_servfail(&format!("_25._tcp.{MX}"));
    let (lines, accepted) = w.send("servfail", 1, true);
    assert_eq!(accepted, 0, "{lines:#?}");
    all_deferred_as(&lines, "4.7.5", &[MX, "SERVFAIL"]);
    // Both reported as dnssec-invalid, with no records to name.
    let tallies = w.tallies();
    assert_eq!(tallies.len(), 1, "{tallies:?}");
    let (records, ok, failed, rows) = &tallies[0];
    assert!(
        records.is_empty() && *ok == 0 && *failed >= 2,
        "{tallies:?}"
    );
    assert!(rows.iter().all(|r| r == "dnssec-invalid"), "{tallies:?}");
}

#[test]
fn a_host_without_tlsa_records_or_in_an_insecure_zone_gets_ordinary_tls() {
    let w = world("dane-none", true);
    let (lines, accepted) = w.send("none", 2, false);
    assert_eq!(accepted, 2, "{lines:#?}");
    delivered_over(&lines, 2, "");
    // TLSA records that do not match, in a zone DNSSEC proves unsigned: not DANE's.
    {
        let mut z = w.zone();
        z.set_unsigned("sink.test");
    }
    w.publish(vec![tlsa(3, 1, 1, vec![9; 32])]);
    let (lines, accepted) = w.send("insecure", 1, false);
    assert_eq!(accepted, 3, "{lines:#?}");
    delivered_over(&lines, 1, "");
}

#[test]
fn unusable_records_still_require_tls_and_a_dane_host_without_starttls_gets_nothing() {
    let w = world("dane-unusable", true);
    // PKIX-EE only: not usable for SMTP; TLS still required, the certificate unchecked.
    w.publish(vec![tlsa(1, 1, 1, vec![9; 32])]);
    let (lines, accepted) = w.send("unusable", 1, false);
    assert_eq!(accepted, 1, "{lines:#?}");
    delivered_over(&lines, 1, ", DANE (no usable record: unverified)");
    let plain = world("dane-plain", false);
    plain.publish(vec![tlsa(3, 1, 1, vec![9; 32])]);
    let (lines, accepted) = plain.send("plain", 2, true);
    assert_eq!(accepted, 0, "{lines:#?}");
    all_deferred_as(&lines, "4.7.4", &[MX]);
    let tallies = plain.tallies();
    assert!(
        tallies.len() == 1 && tallies[0].3.iter().all(|r| r == "starttls-not-supported"),
        "{tallies:?}"
    );
}

#[test]
fn a_tlsa_rollover_applies_once_the_records_are_looked_up_again() {
    // The records name another key at first: every attempt is deferred. Then the
    // receiver publishes its own; with a 1 s TTL the next lookup brings them, and the
    // site the domain already had must use them, not the hosts it was made with.
    let w = world("dane-rollover", true);
    w.zone().set_ttl(1);
    w.publish(vec![tlsa(3, 1, 1, vec![9; 32])]);
    let zone = w.env.dns.zone.clone();
    let right = tlsa(3, 1, 1, sha256(&w.leaf_spki));
    let rollover = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(3));
        zone.write()
            .unwrap()
            .set_tlsa(&format!("_25._tcp.{MX}"), vec![right]);
    });
    let mut cfg = w.env.config();
    cfg.dns.dane = Some(DaneSettings {
        trust_anchor: Some(w.anchor.clone()),
    });
    cfg.retry =
        volley::policy::retry::RetryPolicy::uniform(vec![std::time::Duration::from_secs(1)]);
    let (lines, accepted) = send_to_gmail(&w.env, cfg, "roll", 3, false);
    rollover.join().unwrap();
    assert_eq!(accepted, 3, "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "TransientFailure"
                && l["reply"].as_str().unwrap().contains("TLSA")),
        "no attempt before the rollover: {lines:#?}"
    );
    delivered_over_tls(&lines, 3);
}

#[test]
fn tls_show_lists_each_mx_hosts_tlsa_records_and_what_they_require() {
    let w = world("dane-show", true);
    w.publish(vec![tlsa(3, 1, 1, sha256(&w.leaf_spki))]);
    let dns = w.env.dns.addr.to_string();
    let anchor = w.anchor.to_str().unwrap();
    let show = |extra: &[&str]| {
        let mut args = vec!["tls", "show", "gmail.com", "--dns", &dns];
        args.extend(extra);
        common::daemon::volley(&args)
    };
    let (code, out, err) = show(&["--dane", "--dnssec-trust-anchor", anchor]);
    assert_eq!(code, 0, "{out}{err}");
    let records = format!("TLSA 3 1 1 {} (DNSSEC secure)", hex(&sha256(&w.leaf_spki)));
    assert!(out.contains(&format!("{MX}: {records}")), "{out}");
    assert!(
        out.contains(&format!(
            "{MX}: TLS required, certificate checked against its TLSA records"
        )),
        "{out}"
    );
    // The record to publish for the sink's certificate is the one that matched.
    let (code, out, err) = common::daemon::volley(&[
        "tls",
        "tlsa",
        "--cert",
        w.pki.join(format!("{MX}.pem")).to_str().unwrap(),
        "--host",
        MX,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.trim(),
        format!(
            "_25._tcp.{MX}. IN TLSA 3 1 1 {}",
            hex(&sha256(&w.leaf_spki))
        )
    );
    let (code, _, err) = common::daemon::volley(&[
        "tls",
        "tlsa",
        "--cert",
        w.pki.join(format!("{MX}.pem")).to_str().unwrap(),
        "--host",
        "bad host!",
    ]);
    assert!(
        code != 0 && err.contains("--host") && err.contains("MX host's name"),
        "{err}"
    );
    // Without --dane it says it did not look.
    let (code, out, err) = show(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("not checked (give --dane)"), "{out}");
    // A failed lookup is shown as the sentence the log would carry.
    w.zone().set_bogus(&format!("_25._tcp.{MX}"));
    let (_, out, _) = show(&["--dane", "--dnssec-trust-anchor", anchor]);
    assert!(
        out.contains(&format!(
            "{MX}: DANE: the TLSA records of {MX} could not be had securely"
        )),
        "{out}"
    );
}

#[test]
fn send_says_a_trust_anchor_it_cannot_use_before_it_queues_anything() {
    let env = env("dane-send-anchor", "");
    let c = campaign(&env.dir, "anchor", "", &["a@gmail.com,Ann".to_string()]);
    let spool = env.dir.join("spool");
    let dns = env.dns.addr.to_string();
    let missing = env.dir.join("missing-anchor.txt");
    let (code, out, err) = common::daemon::volley(&[
        "send",
        c.to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
        "--dns",
        &dns,
        "--dane",
        "--dnssec-trust-anchor",
        missing.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("nothing queued") && err.contains(missing.to_str().unwrap()),
        "{err}"
    );
    assert!(!out.contains("queued 1"), "{out}");
    let instances = volley::spool::ingest::load_instances(&spool).unwrap_or_default();
    assert!(instances.is_empty(), "queued despite the refusal");
}

#[test]
fn records_of_other_names_appended_to_an_answer_are_not_used() {
    // A forger on the path appends another name's records (unsigned, from an
    // insecure zone) to each genuine, signed answer: an MX, an address, a TLSA
    // record. None may reroute the mail, mark the host insecure or replace its
    // records: delivery stays DANE-verified, to the MX asked for.
    let w = world("dane-appended", true);
    w.publish(vec![tlsa(3, 1, 1, sha256(&w.leaf_spki))]);
    {
        let mut z = w.zone();
        z.set_unsigned("insecure.test");
        z.set_mx("d.insecure.test", vec![(0, "mx.insecure.test".into())]);
        z.set_a("mx.insecure.test", "127.0.0.66".parse().unwrap());
        z.set_tlsa(
            "_25._tcp.mx.insecure.test",
            vec![tlsa(3, 1, 1, vec![9; 32])],
        );
        z.set_appended("gmail.com", RecordType::MX, "d.insecure.test");
        z.set_appended(MX, RecordType::A, "mx.insecure.test");
        z.set_appended(
            &format!("_25._tcp.{MX}"),
            RecordType::TLSA,
            "_25._tcp.mx.insecure.test",
        );
    }
    let (lines, accepted) = w.send("appended", 3, false);
    assert_eq!(accepted, 3, "{lines:#?}");
    delivered_over_tls(&lines, 3);
    assert!(
        lines
            .iter()
            .all(|l| l["type"] != "Delivery" || l["mx"] == MX),
        "{lines:#?}"
    );
}

#[test]
fn an_answer_with_a_ttl_of_zero_still_routes_the_mail_waiting_for_it() {
    let w = world("dane-ttl0", true);
    w.publish(vec![tlsa(3, 1, 1, sha256(&w.leaf_spki))]);
    w.zone().set_ttl(0);
    let (lines, accepted) = w.send("dane", 2, false);
    assert_eq!(accepted, 2, "{lines:#?}");
    delivered_over_tls(&lines, 2);
    // Without DANE too.
    let (lines, accepted) = send_to_gmail(&w.env, w.env.config(), "plain", 2, false);
    assert_eq!(accepted, 4, "{lines:#?}");
}
