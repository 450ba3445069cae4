//! STARTTLS outbound against the bundled sink (self-signed certificate).

mod common;

use common::*;
use std::time::Duration;
use volley::policy::shaping::rules::Set;
use volley::smtp::client::TlsMode;

fn run(
    name: &str,
    starttls: bool,
    mode: TlsMode,
    verify: bool,
) -> (volley::deliver::engine::Report, Vec<serde_json::Value>, u64) {
    run_in(env_with(name, "", starttls), name, mode, verify)
}

fn run_in(
    env: Env,
    name: &str,
    mode: TlsMode,
    verify: bool,
) -> (volley::deliver::engine::Report, Vec<serde_json::Value>, u64) {
    let c = campaign(
        &env.dir,
        name,
        "expire_after = \"2s\"",
        &["a@gmail.com,Ann".into(), "b@shop3.tail.test,Bob".into()],
    );
    let mut cfg = env.config();
    cfg.defaults.tls = Some(Set::cli(mode));
    cfg.defaults.tls_verify = Some(Set::cli(verify));
    cfg.retry = volley::policy::retry::RetryPolicy::uniform(vec![Duration::from_millis(500)]);
    let log = cfg.log_path.clone();
    let r = env.send(&c, cfg);
    (r, log_lines(&log), env.sink.summary().counts.rcpts_accepted)
}

#[test]
fn opportunistic_uses_tls_and_logs_it() {
    let (r, lines, accepted) = run("tls-opp", true, TlsMode::Opportunistic, false);
    assert_eq!((r.delivered, accepted), (2, 2));
    for l in &lines {
        // The sink's rustls takes the client's order, and volley puts AES-128 first.
        assert!(
            l["tls"]
                .as_str()
                .unwrap()
                .starts_with("TLSv1_3 TLS13_AES_128_GCM_SHA256"),
            "{l}"
        );
    }
}

#[test]
fn opportunistic_without_starttls_sends_in_clear() {
    let (r, lines, _) = run("tls-clear", false, TlsMode::Opportunistic, false);
    assert_eq!(r.delivered, 2);
    assert!(lines.iter().all(|l| l.get("tls").is_none()));
}

#[test]
fn required_without_starttls_is_deferred_as_policy_never_sent_in_clear() {
    let (r, lines, accepted) = run("tls-req", false, TlsMode::Required, false);
    assert_eq!((r.delivered, r.expired, accepted), (0, 2, 0));
    let d: Vec<_> = lines
        .iter()
        .filter(|l| l["type"] == "TransientFailure")
        .collect();
    assert!(!d.is_empty());
    for l in d {
        assert_eq!(l["class"], "policy", "{l}");
        assert!(
            l["reply"]
                .as_str()
                .unwrap()
                .contains("does not offer STARTTLS"),
            "{l}"
        );
    }
}

#[test]
fn required_and_verified_fails_on_a_self_signed_certificate() {
    let (r, lines, accepted) = run("tls-verify", true, TlsMode::Required, true);
    assert_eq!((r.delivered, accepted), (0, 0));
    let l = lines
        .iter()
        .find(|l| l["type"] == "TransientFailure")
        .expect("a deferral");
    assert_eq!(l["class"], "policy", "{l}");
    assert!(
        l["reply"]
            .as_str()
            .unwrap()
            .contains("is not signed by a CA volley trusts"),
        "{l}"
    );
}

/// A receiver that serves a CA certificate as its own: the log says so in words, with
/// the host and what to do, not as rustls's nested Debug names.
#[test]
fn a_ca_certificate_as_the_server_certificate_is_explained_in_the_log() {
    let mx = "gmail-smtp-in.l.google.sink.test";
    let dir = std::env::temp_dir().join(format!("volley-test-tls-ca-pem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![mx.to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    // A key others may read is refused at load (host/secrets.rs).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let env = env_with_certificate("tls-ca-cert", cert_file, key_file, None);
    let (r, lines, accepted) = run_in(env, "tls-ca-cert", TlsMode::Required, true);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!((r.delivered, accepted), (0, 0));
    let l = lines
        .iter()
        .find(|l| l["type"] == "TransientFailure" && l["domain"] == "gmail.com")
        .expect("a deferral");
    assert_eq!(l["class"], "policy", "{l}");
    let reply = l["reply"].as_str().unwrap();
    for words in [
        mx,
        "is a CA certificate, not a server certificate (CaUsedAsEndEntity)",
        "the receiver must fix its certificate chain",
        "With tls_verify off for this destination",
    ] {
        assert!(reply.contains(words), "{words:?} not in {reply:?}");
    }
    assert!(!reply.contains("Other(OtherError("), "{reply}");
}

#[test]
fn a_reconnection_resumes_the_tls_session() {
    let env = env("tls-resume", "");
    let rows: Vec<String> = (0..6).map(|i| format!("u{i}@gmail.com,Ann")).collect();
    let c = campaign(&env.dir, "tls-resume", "", &rows);
    let mut cfg = env.config();
    cfg.shards = 1;
    // One message per connection, one connection at a time: six handshakes in a row.
    cfg.defaults.max_msgs_per_conn = Some(Set::cli(1));
    cfg.defaults.max_connections = Some(Set::cli(1));
    let log = cfg.log_path.clone();
    let r = env.send(&c, cfg);
    assert_eq!(r.delivered, 6);
    let tls: Vec<String> = log_lines(&log)
        .iter()
        .map(|l| l["tls"].as_str().unwrap().to_string())
        .collect();
    let resumed = tls.iter().filter(|t| t.ends_with(" resumed")).count();
    assert!(
        !tls[0].ends_with(" resumed"),
        "the first is a full handshake: {tls:?}"
    );
    assert!(resumed >= 4, "later connections resume: {tls:?}");
}
