//! Criterion benches for the per-message hot paths: reply parsing and
//! classification, spool append,
//! template rendering, the client session's transaction round, the shaping
//! admission every message passes, DKIM signing, gzip of a rotated log, and one
//! message's whole send path (render, sign, submit, seal into TLS records).

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::time::Instant;
use volley::message::template::Template;
use volley::smtp::client::{ClientConfig, ClientSession, Timeouts, Transaction};
use volley::smtp::reply::ReplyParser;
use volley::spool::{QueueRecord, Spool};

fn reply_parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply");
    let single = b"250 2.0.0 Ok: queued as 4Xk2Lq0bQnz9vBC\r\n";
    let multi = b"421-4.7.28 Gmail has detected an unusual rate of unsolicited mail originating\r\n421-4.7.28 from your IP address. To protect our users from spam, mail sent from\r\n421 4.7.28 your IP address has been rate limited. https://support.google.com/mail\r\n";
    for (name, bytes) in [
        ("single_line", &single[..]),
        ("gmail_421_multiline", &multi[..]),
    ] {
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            let mut p = ReplyParser::default();
            b.iter(|| {
                p.push(black_box(bytes));
                black_box(p.next_reply().unwrap().unwrap());
            })
        });
    }
    g.finish();
}

/// A provider's throttle reply classified by the rules' regex set, and by a
/// shard's remembering classifier that has seen it before.
fn reply_classification(c: &mut Criterion) {
    use std::sync::Arc;
    use volley::policy::classify::{Classifier, Remembering};
    let mut g = c.benchmark_group("classify");
    let reply = volley::smtp::reply::Reply::new(
        421,
        Some("4.7.28"),
        "Gmail has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been rate limited. https://support.google.com/mail/?p=UnsolicitedRateLimitError",
    );
    let rules = Arc::new(Classifier::shipped());
    g.throughput(Throughput::Elements(1));
    g.bench_function("gmail_421_rules", |b| {
        b.iter(|| black_box(rules.classify(black_box(&reply))))
    });
    let remembering = Remembering::new(rules.clone());
    g.bench_function("gmail_421_remembered", |b| {
        b.iter(|| black_box(remembering.classify(black_box(&reply))))
    });
    g.finish();
}

fn spool_append(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("volley-bench-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut spool, _) = Spool::open(&dir, 256 << 20, &|_| true).unwrap();
    let rec = QueueRecord {
        instance: 1,
        line: 42,
        values: vec![
            b"user123456@gmail.com".to_vec(),
            b"Ann".to_vec(),
            b"123456".to_vec(),
            b"crc32c=0badf00d len=10240".to_vec(),
        ],
    };
    let mut scratch = Vec::new();
    let mut g = c.benchmark_group("spool");
    g.throughput(Throughput::Elements(1));
    g.bench_function("append_queue_record", |b| {
        b.iter(|| black_box(spool.append_queue(black_box(&rec), &mut scratch).unwrap()));
    });
    g.bench_function("append_1000_then_msync", |b| {
        b.iter_batched(
            || (),
            |_| {
                for _ in 0..1000 {
                    spool.append_queue(&rec, &mut scratch).unwrap();
                }
                spool.sync().unwrap();
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The generator's 10 KB template, its text, and one recipient's values; made in
/// `dir` (the caller removes it).
fn generated_template(dir: &std::path::Path) -> (Template, Vec<u8>, [&'static str; 4]) {
    volley_load::gen::write_campaign(
        dir,
        &volley_load::gen::GenOptions {
            recipients: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let text = std::fs::read(dir.join("message.eml")).unwrap();
    let cols: Vec<String> = volley_load::gen::COLUMNS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let t = Template::parse(&text, &cols).unwrap();
    let values = ["user1@gmail.com", "Ann", "1", "crc32c=0badf00d len=10240"];
    (t, text, values)
}

/// A new DKIM key of `kind` in `dir` as selector `name`, private to its owner (a
/// key others may read is refused at load, host/secrets.rs).
fn dkim_key(
    dir: &std::path::Path,
    name: &str,
    kind: volley::message::dkim::KeyType,
) -> volley::message::dkim::KeyFile {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, volley::message::dkim::generate(kind).unwrap().pem).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    volley::message::dkim::KeyFile {
        selector: name.to_string(),
        path,
    }
}

fn template_render(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("volley-bench-tpl-{}", std::process::id()));
    let (t, text, values) = generated_template(&dir);
    let mut out = Vec::with_capacity(16 * 1024);
    let mut g = c.benchmark_group("template");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("render_10k_message", |b| {
        b.iter(|| {
            out.clear();
            t.render(black_box(&values), &mut out);
            black_box(out.len())
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn client_transaction(c: &mut Criterion) {
    let now = Instant::now();
    let cfg = ClientConfig {
        ehlo_name: "bench.test".into(),
        timeouts: Timeouts::default(),
        window: 8,
        tls: volley::smtp::client::TlsMode::Disabled,
    };
    let content = vec![b'x'; 10 * 1024];
    let mut g = c.benchmark_group("client");
    g.throughput(Throughput::Elements(1));
    g.bench_function("bdat_transaction_round", |b| {
        let mut s = ClientSession::new(cfg.clone(), now);
        s.receive(b"220 hi\r\n", now);
        s.take_output();
        s.receive(b"250-x\r\n250-PIPELINING\r\n250 CHUNKING\r\n", now);
        while s.poll_event().is_some() {}
        let mut id = 0;
        b.iter(|| {
            id += 1;
            s.submit(
                Transaction {
                    id,
                    from: "b@s.test".into(),
                    rcpts: vec!["a@gmail.com".into()],
                    content: content.clone(),
                },
                now,
            );
            black_box(s.take_output());
            s.receive(b"250 ok\r\n250 ok\r\n250 ok\r\n", now);
            black_box(s.poll_event());
        })
    });
    g.finish();
}

/// One message through a destination's and a source's limiter, as the delivery loop
/// does: unlimited (the shipped defaults) and with rates set (GCRA on both).
fn shaping_admit(c: &mut Criterion) {
    use volley::policy::shaping::rules::{parse_per, Rule, Set};
    use volley::policy::shaping::{admit, Limiter};
    let mut g = c.benchmark_group("shaping");
    g.throughput(Throughput::Elements(1));
    let now = Instant::now();
    let open = Rule::default();
    let limited = Rule {
        max_msg_rate: Some(Set::cli(parse_per("1000000000/s").unwrap())),
        ..Rule::default()
    };
    for (name, rule) in [("admit_unlimited", &open), ("admit_two_gcra", &limited)] {
        let dest = Limiter::new("provider:x".into(), rule, 1, 0, now);
        let src = Limiter::new("source:a>provider:x".into(), rule, 1, 0, now);
        g.bench_function(name, |b| {
            b.iter(|| black_box(admit(&[&dest, &src], Instant::now())))
        });
    }
    g.finish();
}

/// Signing a 10 KB message as the engine does, with each key type and with both (one
/// body hash, two signatures); a body that needs canonicalising (tabs, runs of
/// spaces, trailing whitespace); and the raw RSA-2048 signature alone, the bound for
/// RSA-signed delivery.
fn dkim_sign(c: &mut Criterion) {
    use volley::message::dkim::{KeyType, Signer, DEFAULT_HEADERS};
    let mut g = c.benchmark_group("dkim");
    g.throughput(Throughput::Elements(1));
    let dir = std::env::temp_dir().join(format!("volley-bench-dkim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let head = b"From: News <news@news.test>\r\nTo: Ann <ann@gmail.com>\r\nSubject: Hello\r\nDate: Wed, 25 Nov 2026 02:42:35 +0000\r\nMessage-ID: <1@news.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n";
    let body = |line: &[u8]| {
        let mut msg = head.to_vec();
        while msg.len() < 10 * 1024 {
            msg.extend_from_slice(line);
        }
        msg
    };
    let msg = body(b"A line of a marketing message body, as long as most of them are.\r\n");
    let ragged = body(b"A line\tof a  marketing message body,   as long as most of them are. \r\n");
    let rsa = dkim_key(&dir, "rsa2048", KeyType::Rsa);
    let ed = dkim_key(&dir, "ed25519", KeyType::Ed25519);
    for (name, keys, m) in [
        ("sign_10k_rsa2048", vec![rsa.clone()], &msg),
        ("sign_10k_ed25519", vec![ed.clone()], &msg),
        (
            "sign_10k_rsa2048_and_ed25519",
            vec![rsa.clone(), ed.clone()],
            &msg,
        ),
        ("sign_10k_ed25519_ragged_body", vec![ed.clone()], &ragged),
    ] {
        let signer = Signer::load("news.test", &keys, DEFAULT_HEADERS).unwrap();
        // Signing makes the message its wire form in place: sign a copy each time,
        // as the engine signs each rendered message.
        let mut work = m.clone();
        g.bench_function(name, |b| {
            b.iter(|| {
                work.clear();
                work.extend_from_slice(m);
                black_box(
                    signer
                        .sign(black_box(&mut work), volley::message::dkim::Body::Varies)
                        .unwrap(),
                )
            })
        });
    }
    // The RSA operation alone (aws-lc-rs, as the signer uses it): what a core can
    // sign at most.
    let pem = std::fs::read(&rsa.path).unwrap();
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(&pem).unwrap();
    let key = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut sig = vec![0; key.public_modulus_len()];
    g.bench_function("raw_rsa2048_signature", |b| {
        b.iter(|| {
            key.sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &rng,
                black_box(b"x"),
                &mut sig,
            )
            .unwrap()
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// gzip of a rotated accounting log (observe/rotation.rs): 16 MiB of records with
/// the variety of a real run (addresses, MX hosts, replies with queue ids, times).
fn log_rotation(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("volley-bench-gzip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("src.jsonl");
    let mut text = String::new();
    let mut rng = fastrand::Rng::with_seed(7);
    let domains = [
        "gmail.com",
        "yahoo.com",
        "outlook.com",
        "web.de",
        "orange.fr",
    ];
    while text.len() < 16 << 20 {
        let d = domains[rng.usize(..domains.len())];
        let r = volley::observe::log::Record {
            kind: volley::observe::log::Kind::Delivery,
            time: format!(
                "2026-11-30T{:02}:{:02}:{:02}.{:03}Z",
                rng.u8(..24),
                rng.u8(..60),
                rng.u8(..60),
                rng.u16(..1000)
            ),
            campaign: "spring-sale",
            rcpt: &format!(
                "{}{}@{d}",
                ["ann", "bob", "li", "kim"][rng.usize(..4)],
                rng.u32(..10_000_000)
            ),
            sender: "bounces@news.example",
            domain: d,
            mx: Some(&format!("mx{}.{d}", rng.u8(..4))),
            ip: Some(format!("192.0.2.{}:25", rng.u8(1..255))),
            code: 250,
            enhanced: Some("2.0.0"),
            class: None,
            reply: &format!("OK {:016x} - gsmtp", rng.u64(..)),
            tls: Some("TLSv1_3 TLS13_AES_128_GCM_SHA256"),
            stage: "data",
            attempt: 1,
            queued_ms: rng.u64(..600_000),
            tx_ms: Some(rng.u64(..200)),
            shard: rng.usize(..8),
            last_attempt: None,
        };
        text.push_str(&serde_json::to_string(&r).unwrap());
        text.push('\n');
    }
    std::fs::write(&src, &text).unwrap();
    let mut g = c.benchmark_group("log_rotation");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.sample_size(10);
    g.bench_function("gzip_16MiB_rotated_log", |b| {
        b.iter_batched(
            || {
                let p = dir.join("acct.jsonl.20261130T000000Z");
                let _ = std::fs::remove_file(dir.join("acct.jsonl.20261130T000000Z.gz"));
                std::fs::copy(&src, &p).unwrap();
                p
            },
            |p| volley::observe::rotation::compress(&p).unwrap(),
            BatchSize::PerIteration,
        );
    });
    g.finish();
    // Not there when a filter left the bench out.
    if let Ok(gz) = std::fs::metadata(dir.join("acct.jsonl.20261130T000000Z.gz")) {
        let gz = gz.len();
        eprintln!(
            "log_rotation: {} octets gzip to {gz} ({:.1}x)",
            text.len(),
            text.len() as f64 / gz as f64
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the metrics cost per outcome on the hot path: the shard's tally of one
/// delivery (its counter by provider and source, TLS, the latency histogram) and
/// one bounce (kept for the status page), and a shard's once-a-second publish.
fn metrics_tally(c: &mut Criterion) {
    use std::sync::Arc;
    use volley::observe::metrics::{Board, Outcome, OutcomeKey, RecentBounce, ShardView, Tally};
    let providers: Vec<Arc<str>> = ["google", "yahoo", "microsoft", "other"]
        .into_iter()
        .map(Arc::from)
        .collect();
    let mut g = c.benchmark_group("metrics");
    let mut tally = Tally::default();
    let mut i = 0usize;
    g.bench_function("delivery counted", |b| {
        b.iter(|| {
            i += 1;
            let key = OutcomeKey {
                outcome: Outcome::Delivered,
                class: "",
                provider: providers[i % providers.len()].clone(),
                source: None,
            };
            tally.outcome(black_box(&key), true, 0.8);
        })
    });
    g.bench_function("bounce counted and kept", |b| {
        b.iter(|| {
            let key = OutcomeKey {
                outcome: Outcome::Bounced,
                class: "invalid_recipient",
                provider: providers[0].clone(),
                source: None,
            };
            tally.outcome(&key, true, 0.8);
            tally.bounce(RecentBounce {
                time: "2026-11-30T22:10:07.123Z".into(),
                outcome: Outcome::Bounced,
                campaign: "spring".into(),
                rcpt: "someone@gmail.com".into(),
                code: 550,
                enhanced: Some("5.1.1".into()),
                class: key.class,
                reply: "5.1.1 The email account that you tried to reach does not exist.".into(),
            });
        })
    });
    let board = Board::new(2);
    g.bench_function("publish (once a second per shard)", |b| {
        b.iter(|| {
            board.publish(
                0,
                ShardView {
                    tally: tally.clone(),
                    ..ShardView::default()
                },
            )
        })
    });
    g.finish();
}

/// The send path of one message, as a shard runs it for a connection in TLS:
/// the template rendered, DKIM-signed (or not), the transaction submitted to the
/// client session, and its output sealed into TLS 1.3 records (AES-128-GCM) by
/// the engine's own `seal`, into a buffer kept from one message to the next. The
/// records are not decrypted: only the sending side is measured.
fn outbound_path(c: &mut Criterion) {
    use volley::message::dkim::{Body, KeyType, Signer, DEFAULT_HEADERS};
    let dir = std::env::temp_dir().join(format!("volley-bench-out-{}", std::process::id()));
    let (template, _, values) = generated_template(&dir);
    let key = dkim_key(&dir, "ed25519", KeyType::Ed25519);
    let signer = Signer::load("news.test", &[key], DEFAULT_HEADERS).unwrap();

    let mut g = c.benchmark_group("outbound");
    g.throughput(Throughput::Elements(1));
    for (name, signer) in [
        ("render_submit_seal_10k", None),
        ("render_sign_ed25519_submit_seal_10k", Some(&signer)),
    ] {
        let (mut tls, _server) = tls_pair();
        let now = Instant::now();
        let mut s = ClientSession::new(
            ClientConfig {
                ehlo_name: "bench.test".into(),
                timeouts: Timeouts::default(),
                window: 8,
                tls: volley::smtp::client::TlsMode::Disabled,
            },
            now,
        );
        s.receive(b"220 hi\r\n", now);
        s.take_output();
        s.receive(b"250-x\r\n250-PIPELINING\r\n250 CHUNKING\r\n", now);
        while s.poll_event().is_some() {}
        let mut wire = Vec::new();
        let mut id = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                id += 1;
                let mut content = Vec::with_capacity(12 * 1024);
                template.render(black_box(&values), &mut content);
                if let Some(signer) = signer {
                    let header = signer.sign(&mut content, Body::Varies).unwrap();
                    content.splice(0..0, header.into_bytes());
                }
                s.submit(
                    Transaction {
                        id,
                        from: "news@news.test".into(),
                        rcpts: vec!["user1@gmail.com".into()],
                        content,
                    },
                    now,
                );
                wire.clear();
                volley::deliver::tls::seal(&mut tls, &s.take_output(), &mut wire).unwrap();
                black_box(wire.len());
                s.receive(b"250 ok\r\n250 ok\r\n250 ok\r\n", now);
                black_box(s.poll_event());
            })
        });
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client connection in TLS 1.3 with the engine's settings, its handshake done
/// in memory with a rustls server holding a self-signed certificate.
fn tls_pair() -> (rustls::ClientConnection, rustls::ServerConnection) {
    let cert = rcgen::generate_simple_self_signed(vec!["mx.bench.test".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let server_cfg = rustls::ServerConfig::builder_with_provider(volley::deliver::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("mx.bench.test").unwrap();
    let mut client =
        rustls::ClientConnection::new(volley::deliver::tls::client_config(false, &[]), name)
            .unwrap();
    client.set_buffer_limit(None);
    let mut server = rustls::ServerConnection::new(std::sync::Arc::new(server_cfg)).unwrap();
    // Bounded: a TLS 1.3 handshake takes two flights each way.
    for _ in 0..8 {
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
        let mut bytes = Vec::new();
        client.write_tls(&mut bytes).unwrap();
        server.read_tls(&mut &bytes[..]).unwrap();
        server.process_new_packets().unwrap();
        bytes.clear();
        server.write_tls(&mut bytes).unwrap();
        client.read_tls(&mut &bytes[..]).unwrap();
        client.process_new_packets().unwrap();
    }
    assert!(!client.is_handshaking(), "the in-memory handshake finished");
    (client, server)
}

criterion_group!(
    benches,
    log_rotation,
    metrics_tally,
    reply_parsing,
    reply_classification,
    spool_append,
    template_render,
    client_transaction,
    shaping_admit,
    dkim_sign,
    outbound_path
);
criterion_main!(benches);
