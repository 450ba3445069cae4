//! RSA-2048 PKCS#1 v1.5 SHA-256 signatures per second on one core, ring against
//! aws-lc-rs, over the same PKCS#8 key and a 512-byte input (the size of a DKIM
//! signed-header block). Five rounds alternating which goes first, 3 s each; prints
//! each round and the medians.
//!
//! ```sh
//! openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -outform DER -out /tmp/rsa.der
//! cargo run --release --manifest-path benches/rsa-backends/Cargo.toml -- /tmp/rsa.der
//! ```

use std::time::{Duration, Instant};

const ROUNDS: usize = 5;
const PER_RUN: Duration = Duration::from_secs(3);

fn rate(mut sign: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < PER_RUN {
        for _ in 0..50 {
            sign();
        }
        n += 50;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: rsa-backends KEY.der (PKCS#8, RSA-2048)");
    let der = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let input = [0x5au8; 512];

    let ring_key = ring::signature::RsaKeyPair::from_pkcs8(&der).expect("ring: PKCS#8 RSA key");
    let ring_rng = ring::rand::SystemRandom::new();
    let mut ring_sig = vec![0u8; ring_key.public().modulus_len()];
    let aws_key =
        aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&der).expect("aws-lc-rs: PKCS#8 RSA key");
    let aws_rng = aws_lc_rs::rand::SystemRandom::new();
    let mut aws_sig = vec![0u8; aws_key.public_modulus_len()];

    let (mut ring_r, mut aws_r, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let mut run_ring = || {
            rate(|| {
                ring_key
                    .sign(&ring::signature::RSA_PKCS1_SHA256, &ring_rng, &input, &mut ring_sig)
                    .expect("ring sign")
            })
        };
        let mut run_aws = || {
            rate(|| {
                aws_key
                    .sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &aws_rng, &input, &mut aws_sig)
                    .expect("aws-lc-rs sign")
            })
        };
        let (r, a) = if round % 2 == 0 {
            let r = run_ring();
            (r, run_aws())
        } else {
            let a = run_aws();
            (run_ring(), a)
        };
        println!("round {}: ring {r:.0}/s, aws-lc-rs {a:.0}/s, ratio {:.2}", round + 1, a / r);
        ring_r.push(r);
        aws_r.push(a);
        ratio.push(a / r);
    }
    println!(
        "medians of {ROUNDS}: ring {:.0}/s, aws-lc-rs {:.0}/s, aws-lc-rs / ring {:.2}x",
        median(&mut ring_r),
        median(&mut aws_r),
        median(&mut ratio)
    );
}
