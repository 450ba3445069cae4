//! DKIM: what volley signs verifies at the receiver. Keys are made with `volley dkim
//! keygen`'s code, published by the bundled test DNS, and the messages the sink kept
//! are verified with mail-auth's verifier over that DNS, and with dkimpy (Debian's
//! python3-dkim, an independent implementation) when it is installed.

mod common;

use common::*;
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use std::path::{Path, PathBuf};
use std::process::Command;
use volley::dkim::{generate, key_path, KeyType};

/// Makes a key for news.test under `dir` and publishes it in the test DNS.
fn publish(env: &Env, dir: &Path, selector: &str, kind: KeyType) -> String {
    let k = generate(kind).unwrap();
    let path = key_path(dir, "news.test", selector);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &k.pem).unwrap();
    // DNS strings are at most 255 octets; a 2048-bit RSA key needs two.
    let strings = k
        .txt
        .as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    env.dns
        .zone
        .write()
        .unwrap()
        .set_txt(&format!("{selector}._domainkey.news.test"), strings);
    k.txt
}

fn kept(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

/// mail-auth's verdicts for `messages`, asking the test DNS for the keys.
fn verify_with_mail_auth(env: &Env, messages: &[(PathBuf, Vec<u8>)]) -> Vec<DkimResult> {
    let mut ns = NameServerConfig::udp(env.dns.addr.ip());
    ns.connections[0].port = env.dns.addr.port();
    let cfg = ResolverConfig::from_parts(None, vec![], vec![ns]);
    let auth = MessageAuthenticator::new(cfg, ResolverOpts::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    messages
        .iter()
        .map(|(_, raw)| {
            let msg = AuthenticatedMessage::parse(raw).expect("a parseable message");
            let out = rt.block_on(auth.verify_dkim(&msg));
            assert_eq!(out.len(), 1, "one signature");
            out[0].result().clone()
        })
        .collect()
}

/// dkimpy's verdicts (key records given directly), or None when it is not installed.
fn verify_with_dkimpy(records: &[(String, String)], files: &[PathBuf]) -> Option<Vec<bool>> {
    const PY: &str = "/usr/bin/python3";
    let ok = Command::new(PY)
        .args(["-c", "import dkim, nacl"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("dkimpy (python3-dkim, python3-nacl) not installed: independent check skipped");
        return None;
    }
    let script = r#"
import dkim, json, sys
recs = json.loads(sys.argv[1])
def dnsfunc(name, timeout=5):
    n = name.decode() if isinstance(name, bytes) else name
    v = recs.get(n.rstrip("."))
    return v.encode() if v else None
for f in sys.argv[2:]:
    print(dkim.verify(open(f, "rb").read(), dnsfunc=dnsfunc))
"#;
    let recs: serde_json::Map<String, serde_json::Value> = records
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let out = Command::new(PY)
        .arg("-c")
        .arg(script)
        .arg(serde_json::Value::Object(recs).to_string())
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l == "True")
            .collect(),
    )
}

#[test]
fn rsa_and_ed25519_signatures_verify_at_the_receiver() {
    let (env, keep) = env_keeping("dkim");
    let keys = env.dir.join("dkim");
    let rsa = publish(&env, &keys, "r2048", KeyType::Rsa);
    let ed = publish(&env, &keys, "ed1", KeyType::Ed25519);
    let rows = |p: &str| -> Vec<String> {
        (0..3)
            .map(|i| format!("{p}{i}@gmail.com,Ann {i}"))
            .collect()
    };
    let a = campaign(
        &env.dir,
        "signed-rsa",
        "dkim_selector = \"r2048\"",
        &rows("r"),
    );
    let b = campaign(&env.dir, "signed-ed", "dkim_selector = \"ed1\"", &rows("e"));
    let mut cfg = env.config();
    cfg.dkim_dir = keys.clone();
    let spool = cfg.spool_dir.clone();
    let lock = volley::ingest::lock_spool(&spool, cfg.shards).unwrap();
    for c in [&a, &b] {
        let c = volley::campaign::Campaign::load(c).unwrap();
        volley::ingest::ingest(&c, &spool, cfg.shards, cfg.segment_bytes).unwrap();
    }
    let instances = std::sync::Arc::new(volley::ingest::load_instances(&spool).unwrap());
    let r = volley::engine::run(
        cfg,
        instances,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        false,
    )
    .unwrap();
    drop(lock);
    assert_eq!(r.delivered, 6);

    let messages = kept(&keep);
    assert_eq!(messages.len(), 6);
    let mut algs = Vec::new();
    for (_, m) in &messages {
        let text = String::from_utf8_lossy(m);
        assert!(text.starts_with("DKIM-Signature: v=1; a="), "{text}");
        assert!(text.contains("c=relaxed/relaxed"));
        assert!(text.contains("d=news.test"));
        algs.push(if text.contains("a=ed25519-sha256") {
            "ed"
        } else {
            "rsa"
        });
    }
    assert_eq!(algs.iter().filter(|a| **a == "ed").count(), 3);
    for v in verify_with_mail_auth(&env, &messages) {
        assert_eq!(v, DkimResult::Pass);
    }
    let files: Vec<PathBuf> = messages.iter().map(|m| m.0.clone()).collect();
    let records = vec![
        ("r2048._domainkey.news.test".to_string(), rsa),
        ("ed1._domainkey.news.test".to_string(), ed),
    ];
    if let Some(verdicts) = verify_with_dkimpy(&records, &files) {
        assert_eq!(verdicts, vec![true; 6], "dkimpy disagrees");
    }

    // A changed body no longer verifies: the check above can fail.
    let (p, m) = &messages[0];
    let tampered = String::from_utf8_lossy(m).replace("Hello", "Hullo");
    assert_ne!(tampered.as_bytes(), &m[..], "the template says Hello");
    let v = verify_with_mail_auth(&env, &[(p.clone(), tampered.into_bytes())]);
    assert_ne!(v[0], DkimResult::Pass);
    let _ = std::fs::remove_dir_all(&keep);
}

fn volley(args: &[&str], stdin: Option<&[u8]>) -> (i32, Vec<u8>, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A command that fails before reading its input closes the pipe: not our error.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or_default());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn keygen_check_and_sign_on_the_command_line() {
    let dir = std::env::temp_dir().join(format!("volley-dkim-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    let c = campaign(&dir, "cli", "dkim = true", &["a@gmail.com,A".into()]);
    // No key yet: check refuses and says how to make one.
    let (code, _, err) = volley(
        &[
            "check",
            c.to_str().unwrap(),
            "--dkim-dir",
            keys.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("no DKIM key for news.test") && err.contains("volley dkim keygen"),
        "{err}"
    );

    let (code, out, err) = volley(
        &[
            "dkim",
            "keygen",
            "--type",
            "ed25519",
            "--domain",
            "News.Test",
            "--selector",
            "s1",
            "--out",
            keys.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let zone = String::from_utf8(out).unwrap();
    assert!(
        zone.starts_with("s1._domainkey.news.test. 3600 IN TXT ( \"v=DKIM1; k=ed25519; p="),
        "{zone}"
    );
    let pem = keys.join("news.test/s1.pem");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&pem).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The same selector again would overwrite a published key.
    let (code, _, err) = volley(
        &[
            "dkim",
            "keygen",
            "--domain",
            "news.test",
            "--selector",
            "s1",
            "--out",
            keys.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("new selector"), "{err}");

    let (code, out, err) = volley(
        &[
            "check",
            c.to_str().unwrap(),
            "--dkim-dir",
            keys.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(String::from_utf8_lossy(&out).contains("DKIM d=news.test s=s1"));

    let msg = b"From: A <a@news.test>\nTo: b@x.test\nSubject: hi\n\nHello\n";
    let (code, signed, err) = volley(
        &[
            "dkim",
            "sign",
            "--key",
            pem.to_str().unwrap(),
            "--domain",
            "news.test",
            "--selector",
            "s1",
        ],
        Some(msg),
    );
    assert_eq!(code, 0, "{err}");
    let text = String::from_utf8(signed.clone()).unwrap();
    assert!(
        text.starts_with("DKIM-Signature: v=1; a=ed25519-sha256;"),
        "{text}"
    );
    assert!(text.ends_with("\r\nHello\r\n"), "LF made CRLF");
    let file = dir.join("signed.eml");
    std::fs::write(&file, &signed).unwrap();
    let txt = zone.split('"').nth(1).unwrap().to_string();
    if let Some(v) = verify_with_dkimpy(&[("s1._domainkey.news.test".into(), txt)], &[file]) {
        assert_eq!(v, vec![true]);
    }
    let (code, _, err) = volley(
        &[
            "dkim",
            "sign",
            "--key",
            "/nonexistent.pem",
            "--domain",
            "news.test",
            "--selector",
            "s1",
        ],
        Some(msg),
    );
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent.pem"), "{err}");
}

#[test]
fn bulk_sender_headers_are_added_signed_and_the_dns_records_printed() {
    let (env, keep) = env_keeping("compliance");
    let keys = env.dir.join("dkim");
    let txt = publish(&env, &keys, "s1", KeyType::Ed25519);
    let c = campaign(
        &env.dir,
        "bulk",
        "dkim = true\nlist_unsubscribe_url = \"https://news.test/u?e={{email}}\"\nlist_unsubscribe_mailto = \"unsub@news.test\"",
        &[
            "ann@gmail.com,Ann".into(),
            "bob@gmail.com,Bob".into(),
            "cy@gmail.com,Cy".into(),
        ],
    );
    // A template without Date and Message-ID (both are added per message), and with
    // no merge field in its body: the body hash is computed once and reused.
    std::fs::write(
        c.join("message.eml"),
        "From: News <news@news.test>\nTo: {{name}} <{{email}}>\nSubject: Hello {{name}}\n\nHi there\n",
    )
    .unwrap();
    let dir = keys.to_str().unwrap();
    let (code, out, err) = volley(&["check", c.to_str().unwrap(), "--dkim-dir", dir], None);
    assert_eq!(code, 0, "{err}");
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("adds List-Unsubscribe, List-Unsubscribe-Post"),
        "{out}"
    );
    assert!(
        out.contains("adds Date and Message-ID to each message"),
        "{out}"
    );

    let mut cfg = env.config();
    cfg.dkim_dir = keys.clone();
    let r = env.send(&c, cfg);
    assert_eq!(r.delivered, 3);
    let messages = kept(&keep);
    let text = messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.1).into_owned())
        .find(|t| t.contains("ann@gmail.com"))
        .unwrap();
    for h in [
        "List-Unsubscribe: <mailto:unsub@news.test>, <https://news.test/u?e=ann@gmail.com>\r\n",
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
        "\r\nDate: ",
        "\r\nMessage-ID: <",
    ] {
        assert!(text.contains(h), "{h:?} missing in\n{text}");
    }
    // Both unsubscribe fields are covered by the signature (RFC 8058 §4).
    let h = text.split("h=").nth(1).unwrap().split(';').next().unwrap();
    let signed: Vec<String> = h
        .split(':')
        .map(|x| x.trim().to_ascii_lowercase())
        .collect();
    for f in [
        "list-unsubscribe",
        "list-unsubscribe-post",
        "date",
        "message-id",
    ] {
        assert!(signed.iter().any(|x| x == f), "{f} not in h={h}");
    }
    assert_eq!(
        verify_with_mail_auth(&env, &messages),
        vec![DkimResult::Pass; 3]
    );

    let (code, out, err) = volley(
        &[
            "dns-records",
            c.to_str().unwrap(),
            "--dkim-dir",
            dir,
            "--ip",
            "192.0.2.7",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("news.test. 3600 IN TXT \"v=spf1 ip4:192.0.2.7 ~all\""),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "s1._domainkey.news.test. 3600 IN TXT ( \"{txt}\" )"
        )),
        "{out}"
    );
    assert!(
        out.contains("_dmarc.news.test. 3600 IN TXT \"v=DMARC1; p=none;"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&keep);
}
