//! `volley-load bench --scenario dkim`: what TLS and DKIM signing cost volley's
//! delivery rate, measured in one run against the accept-all sink:
//!
//! - plain text, unsigned (the reference);
//! - STARTTLS and Ed25519 signatures (target: at least 0.7x the reference), and
//!   STARTTLS unsigned, which splits that cost between TLS and signing;
//! - RSA-2048 signatures, in clear (target: at least 0.9x of the lower of the
//!   reference and the raw RSA-2048 signing rate of one core × the shard count).
//!
//! Keys come from `volley dkim keygen`; the raw RSA rate is aws-lc-rs's (what volley
//! signs RSA with) on this thread, for two seconds.

use crate::bench::{median, run_volley, volley_binary, write_checks, BenchOptions, Check, Report};
use crate::gen::{self, GenOptions};
use crate::profile::Profile;
use std::process::Command;
use std::time::{Duration, Instant};

const DOMAIN: &str = "news.volley.test";

pub fn run(opts: &BenchOptions) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", opts.out.display()))?;
    let work = std::env::temp_dir().join(format!("volley-bench-dkim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let n = opts.recipients.unwrap_or(100_000);
    let bin = volley_binary(opts)?;
    let keys = work.join("dkim");
    for (sel, kind) in [("ed", "ed25519"), ("rsa", "rsa")] {
        let out = Command::new(&bin)
            .args(["dkim", "keygen", "--type", kind, "--domain", DOMAIN])
            .args([
                "--selector",
                sel,
                "--out",
                keys.to_str().expect("utf-8 path"),
            ])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "volley dkim keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let shards = opts
        .shards
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |c| c.get()));
    let raw_rsa = raw_rsa_per_s(&keys.join(DOMAIN).join("rsa.pem"))?;
    eprintln!("bench: raw RSA-2048 signatures on one core: {raw_rsa:.0}/s");

    let dkim_dir = keys.to_str().expect("utf-8 path").to_string();
    let variants: [(&str, Option<&str>, &str); 4] = [
        ("plain, unsigned", None, "disabled"),
        ("STARTTLS, unsigned", None, "opportunistic"),
        ("STARTTLS + Ed25519", Some("ed"), "opportunistic"),
        ("plain + RSA-2048", Some("rsa"), "disabled"),
    ];
    let mut campaigns = Vec::new();
    for (label, selector, _) in variants {
        let campaign = work.join(label.replace([' ', ',', '+'], "_"));
        gen::write_campaign(
            &campaign,
            &GenOptions {
                recipients: n,
                campaign_id: "dkim-bench".into(),
                dkim_selector: selector.map(str::to_string),
                ..GenOptions::default()
            },
        )?;
        campaigns.push(campaign);
    }
    let rounds = opts.rounds.max(1);
    let mut results = Vec::new();
    // Per round: (Ed25519, RSA, TLS-only) ratios, taken within the round.
    let mut ed_r = Vec::new();
    let mut rsa_r = Vec::new();
    let mut tls_r = Vec::new();
    let mut last = (0.0, 0.0, 0.0, 0.0, 0.0);
    for round in 0..rounds {
        let mut rates = Vec::new();
        for ((label, _, tls), campaign) in variants.iter().zip(&campaigns) {
            eprintln!(
                "bench: {label}, {n} messages, round {} of {rounds}",
                round + 1
            );
            let (mut r, _) = run_volley(
                opts,
                label,
                Profile::load("accept-all")?,
                n,
                campaign,
                &work,
                &["--tls", tls, "--dkim-dir", &dkim_dir],
            )?;
            if rounds > 1 {
                r.note = format!("round {}; {}", round + 1, r.note);
            }
            rates.push(r.msgs_per_s);
            results.push(r);
        }
        let (plain, tls, ed, rsa) = (rates[0], rates[1], rates[2], rates[3]);
        let rsa_bound = plain.min(raw_rsa * shards as f64);
        ed_r.push(ed / plain);
        rsa_r.push(rsa / rsa_bound);
        tls_r.push(tls / plain);
        last = (plain, tls, ed, rsa, rsa_bound);
    }
    let (plain, tls, ed, rsa, rsa_bound) = last;
    // One round: its rates; more: the median ratio and every round's.
    let shown = |ratios: &[f64], a: f64, b: f64| match median(ratios) {
        m if ratios.len() == 1 => format!("{m:.2}x ({a:.0} vs {b:.0} msgs/s)"),
        m => format!(
            "{m:.2}x, median of {} rounds ({})",
            ratios.len(),
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let checks = vec![
        Check {
            what: "STARTTLS + Ed25519 / plain unsigned".into(),
            measured: shown(&ed_r, ed, plain),
            target: "≥ 0.7x".into(),
            pass: median(&ed_r) >= 0.7,
        },
        Check {
            what: format!("RSA-2048 signed / min(plain, raw RSA {raw_rsa:.0}/s × {shards} shards)"),
            measured: shown(&rsa_r, rsa, rsa_bound),
            target: "≥ 0.9x".into(),
            pass: median(&rsa_r) >= 0.9,
        },
        Check {
            what: "STARTTLS unsigned / plain unsigned: what TLS alone costs (information)".into(),
            measured: shown(&tls_r, tls, plain),
            target: "—".into(),
            pass: true,
        },
    ];
    let _ = std::fs::remove_dir_all(&work);
    write_checks(opts, results, checks)
}

/// RSA-2048 PKCS#1 SHA-256 signatures per second on this thread (aws-lc-rs).
fn raw_rsa_per_s(pem: &std::path::Path) -> anyhow::Result<f64> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_file(pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", pem.display()))?;
    let key = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map_err(|e| anyhow::anyhow!("{}: {e}", pem.display()))?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut sig = vec![0; key.public_modulus_len()];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        key.sign(
            &aws_lc_rs::signature::RSA_PKCS1_SHA256,
            &rng,
            b"a DKIM header block",
            &mut sig,
        )
        .map_err(|e| anyhow::anyhow!("RSA sign: {e}"))?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}
