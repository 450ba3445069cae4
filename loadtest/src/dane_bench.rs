//! `volley-load bench --scenario dane`: what DANE (RFC 7672) costs volley's
//! delivery, measured in one run against the accept-all sink: the same campaign
//! over opportunistic STARTTLS (the reference), then with `--dane`, every MX host
//! publishing a DANE-EE TLSA record (3 1 1) of the sink's key in the test DNS's
//! signed zone, so each connection validates its host's addresses and TLSA records
//! (once per host per run, then cached) and checks the certificate against them.
//! The order alternates by round; ratios are taken within a round, then their
//! median. Target (issue 17): CPU per message with DANE at most 1.02x the
//! reference's.

use crate::bench::{median, run_volley_on, target_with, write_checks, BenchOptions, Check, Report};
use crate::gen::{self, GenOptions};
use crate::profile::Profile;
use std::path::{Path, PathBuf};

/// The most CPU per message DANE may add, as a ratio to the reference's.
const CPU_RATIO_MAX: f64 = 1.02;

pub fn run(opts: &BenchOptions) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", opts.out.display()))?;
    let work = std::env::temp_dir().join(format!("volley-bench-dane-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let n = opts.recipients.unwrap_or(50_000);
    let campaign = work.join("campaign");
    gen::write_campaign(
        &campaign,
        &GenOptions {
            recipients: n,
            campaign_id: "dane-bench".into(),
            ..GenOptions::default()
        },
    )?;
    let (files, spki) = certificate(&work)?;
    let rounds = opts.rounds.max(1);
    let mut results = Vec::new();
    let (mut cpu_r, mut rate_r) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // (msgs/s, CPU s per 1,000) of the reference, then of DANE.
        let mut got = [(0.0, 0.0); 2];
        let order: [bool; 2] = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for dane in order {
            let label = if dane { "DANE" } else { "opportunistic TLS" };
            eprintln!(
                "bench: {label}, {n} messages, round {} of {rounds}",
                round + 1
            );
            let t = target_with(opts, Profile::load("accept-all")?, Some(files.clone()))?;
            let anchor = work.join("trust-anchor");
            let mut extra = vec!["--tls", "opportunistic"];
            if dane {
                publish(&t.dns, &spki);
                std::fs::write(&anchor, t.dns.trust_anchor())?;
                extra.extend(["--dane", "--dnssec-trust-anchor"]);
                extra.push(anchor.to_str().expect("utf-8 path"));
            }
            let (mut r, _) = run_volley_on(opts, "accept-all", t, n, &campaign, &work, &extra)?;
            anyhow::ensure!(
                r.terminal == n,
                "{label}: {} of {n} delivered; the comparison needs them all",
                r.terminal
            );
            r.note = format!("{label}, round {}", round + 1);
            got[usize::from(dane)] = (r.msgs_per_s, r.cpu_s_per_1000.unwrap_or(f64::NAN));
            results.push(r);
        }
        let [(rate0, cpu0), (rate1, cpu1)] = got;
        cpu_r.push(cpu1 / cpu0);
        rate_r.push(rate1 / rate0);
    }
    let listed = |v: &[f64]| {
        let each: Vec<String> = v.iter().map(|r| format!("{r:.3}")).collect();
        format!(
            "{:.3}x, median of {} rounds ({})",
            median(v),
            v.len(),
            each.join(", ")
        )
    };
    let checks = vec![
        Check {
            what: "CPU per message, DANE / opportunistic TLS".into(),
            measured: listed(&cpu_r),
            target: format!("≤ {CPU_RATIO_MAX}x"),
            pass: median(&cpu_r) <= CPU_RATIO_MAX,
        },
        Check {
            what: "msgs/s, DANE / opportunistic TLS (information)".into(),
            measured: listed(&rate_r),
            target: "—".into(),
            pass: true,
        },
    ];
    let _ = std::fs::remove_dir_all(&work);
    write_checks(opts, results, checks)
}

/// A self-signed certificate for the sink, written as PEM files (the key 0600, as
/// the sink requires): the files and the key's SubjectPublicKeyInfo (DER).
fn certificate(work: &Path) -> anyhow::Result<((PathBuf, PathBuf), Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let ck = rcgen::generate_simple_self_signed(vec!["mx.bench.volley.test".to_string()])?;
    let (cert, key) = (work.join("sink.pem"), work.join("sink.key"));
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.key_pair.serialize_pem())?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    Ok(((cert, key), ck.key_pair.public_key_der()))
}

/// Publishes a DANE-EE record of `spki` (3 1 1: its SHA-256) at every MX host of
/// the sink's profile.
fn publish(dns: &crate::dns::DnsServer, spki: &[u8]) {
    let digest = ring::digest::digest(&ring::digest::SHA256, spki);
    let tlsa =
        hickory_proto::rr::rdata::TLSA::new(3.into(), 1.into(), 1.into(), digest.as_ref().to_vec());
    dns.zone
        .write()
        .expect("zone lock")
        .set_tlsa_at_every_mx(vec![tlsa]);
}
