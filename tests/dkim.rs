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
use volley::message::dkim::{generate, key_path, KeyType};

/// Makes a key for news.test under `dir` and publishes it in the test DNS.
fn publish(env: &Env, dir: &Path, selector: &str, kind: KeyType) -> String {
    let k = generate(kind).unwrap();
    let path = key_path(dir, "news.test", selector);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_0600(&path, &k.pem);
    publish_txt(env, selector, &k.txt);
    k.txt
}

/// Publishes `txt` as news.test's key record for `selector` in the test DNS.
fn publish_txt(env: &Env, selector: &str, txt: &str) {
    // DNS strings are at most 255 octets; a 2048-bit RSA key needs two.
    let strings = txt
        .as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    env.dns
        .zone
        .write()
        .unwrap()
        .set_txt(&format!("{selector}._domainkey.news.test"), strings);
}

/// Writes a key as `volley dkim keygen` does, mode 0600: a key others may read is
/// refused at load.
fn write_0600(path: &Path, pem: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, pem).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
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

/// mail-auth's verdicts for `messages` (one per message: its only signature's),
/// asking the test DNS for the keys.
fn verify_with_mail_auth(env: &Env, messages: &[(PathBuf, Vec<u8>)]) -> Vec<DkimResult> {
    verify_all_with_mail_auth(env, messages)
        .into_iter()
        .map(|mut v| {
            assert_eq!(v.len(), 1, "one signature");
            v.remove(0)
        })
        .collect()
}

/// mail-auth's verdict on every signature of each of `messages`, top one first.
fn verify_all_with_mail_auth(env: &Env, messages: &[(PathBuf, Vec<u8>)]) -> Vec<Vec<DkimResult>> {
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
            out.iter().map(|o| o.result().clone()).collect()
        })
        .collect()
}

/// dkimpy's verdicts (key records given directly), one per file: whether all its
/// signatures (at least one) verify. None when dkimpy is not installed.
fn verify_with_dkimpy(records: &[(String, String)], files: &[PathBuf]) -> Option<Vec<bool>> {
    Some(
        verify_all_with_dkimpy(records, files)?
            .into_iter()
            .map(|v| !v.is_empty() && v.iter().all(|ok| *ok))
            .collect(),
    )
}

/// dkimpy's verdict on every signature of each file, top one first; one python
/// run for all of them. None when dkimpy is not installed.
fn verify_all_with_dkimpy(
    records: &[(String, String)],
    files: &[PathBuf],
) -> Option<Vec<Vec<bool>>> {
    const PY: &str = "/usr/bin/python3";
    let ok = Command::new(PY)
        .args(["-c", "import dkim, nacl"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skipped("dkimpy is not installed (apt-get install python3-dkim python3-nacl; .ci/run installs it): signatures checked with mail-auth alone");
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
    d = dkim.DKIM(open(f, "rb").read())
    n = sum(1 for h in d.headers if h[0].lower() == b"dkim-signature")
    print(" ".join(str(d.verify(idx=i, dnsfunc=dnsfunc)) for i in range(n)))
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
            .map(|l| l.split_whitespace().map(|v| v == "True").collect())
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
    let lock = volley::spool::ingest::lock_spool(&spool, cfg.shards).unwrap();
    for c in [&a, &b] {
        let c = volley::message::campaign::Campaign::load(c).unwrap();
        volley::spool::ingest::ingest(&c, &spool, cfg.shards, cfg.segment_bytes).unwrap();
    }
    let instances = std::sync::Arc::new(volley::spool::ingest::load_instances(&spool).unwrap());
    let r = volley::deliver::engine::run(
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

/// RFC 8463 §4 dual signing over the real path: a campaign with no selector signs
/// with every key of its domain, one with a list with those; each message carries
/// an RSA and an Ed25519 signature, over one body hash, and both verify.
#[test]
fn a_campaign_signs_with_rsa_and_ed25519_and_both_verify() {
    let (env, keep) = env_keeping("dkim-dual");
    let keys = env.dir.join("dkim");
    let rsa = publish(&env, &keys, "s2026-rsa", KeyType::Rsa);
    let ed = publish(&env, &keys, "s2026-ed", KeyType::Ed25519);
    let rows = |p: &str| -> Vec<String> {
        (0..2)
            .map(|i| format!("{p}{i}@gmail.com,Ann {i}"))
            .collect()
    };
    let all = campaign(&env.dir, "every-key", "dkim = true", &rows("a"));
    let listed = campaign(
        &env.dir,
        "listed",
        "dkim_selector = [\"s2026-rsa\", \"s2026-ed\"]",
        &rows("l"),
    );
    // The issue's body shape, rendered by the engine: a whitespace-only line last.
    std::fs::write(
        listed.join("message.eml"),
        "From: News <news@news.test>\nTo: {{name}} <{{email}}>\nSubject: Dual {{name}}\n\nHello {{name}}!\n  \n\n\n",
    )
    .unwrap();
    let dir = keys.to_str().unwrap();
    let (code, out, err) = volley(&["check", all.to_str().unwrap(), "--dkim-dir", dir], None);
    assert_eq!(code, 0, "{err}");
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("DKIM d=news.test s=s2026-ed (") && out.contains(", s=s2026-rsa ("),
        "{out}"
    );
    let mut cfg = env.config();
    cfg.dkim_dir = keys.clone();
    let spool = cfg.spool_dir.clone();
    let lock = volley::spool::ingest::lock_spool(&spool, cfg.shards).unwrap();
    for c in [&all, &listed] {
        let c = volley::message::campaign::Campaign::load(c).unwrap();
        volley::spool::ingest::ingest(&c, &spool, cfg.shards, cfg.segment_bytes).unwrap();
    }
    let instances = std::sync::Arc::new(volley::spool::ingest::load_instances(&spool).unwrap());
    let r = volley::deliver::engine::run(
        cfg,
        instances,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        false,
    )
    .unwrap();
    drop(lock);
    assert_eq!(r.delivered, 4);

    let messages = kept(&keep);
    assert_eq!(messages.len(), 4);
    for (_, m) in &messages {
        let text = String::from_utf8_lossy(m);
        let sigs: Vec<&str> = text
            .split("\r\n")
            .filter(|l| l.starts_with("DKIM-Signature:"))
            .collect();
        assert_eq!(sigs.len(), 2, "{text}");
        // The selector listed (or sorted) last signed last, so is on top.
        let on_top = if text.contains("Subject: Dual") {
            "ed"
        } else {
            "rsa"
        };
        assert!(sigs[0].contains(&format!("s=s2026-{on_top};")), "{text}");
        // One body hash for both.
        let bh = |sig: &str| sig.split("bh=").nth(1).map(|t| t[..10].to_string());
        let all_text = text.replace("\r\n\t", "");
        let fields: Vec<&str> = all_text
            .split("\r\n")
            .filter(|l| l.starts_with("DKIM-Signature:"))
            .collect();
        assert_eq!(bh(fields[0]), bh(fields[1]), "{text}");
        // Signed as the RFC says, whitespace-only line and all.
        use base64::Engine;
        let body = &m[body_start(m)..];
        let want = ring::digest::digest(&ring::digest::SHA256, &rfc_relaxed_body(body));
        let want = base64::engine::general_purpose::STANDARD.encode(want.as_ref());
        assert_eq!(dkim_tag(m, "bh"), want);
    }
    // mail-auth over the test DNS: its relaxed body code keeps a trailing
    // whitespace-only line (see the property test), so each message goes to it
    // with the body in RFC canonical form, which verifies iff the signature is right.
    let canonical: Vec<(PathBuf, Vec<u8>)> = messages
        .iter()
        .map(|(p, m)| (p.clone(), in_canonical_form(m)))
        .collect();
    for v in verify_all_with_mail_auth(&env, &canonical) {
        assert_eq!(v, vec![DkimResult::Pass; 2]);
    }
    let files: Vec<PathBuf> = messages.iter().map(|m| m.0.clone()).collect();
    let records = vec![
        ("s2026-rsa._domainkey.news.test".to_string(), rsa),
        ("s2026-ed._domainkey.news.test".to_string(), ed),
    ];
    if let Some(v) = verify_all_with_dkimpy(&records, &files) {
        assert_eq!(v, vec![vec![true, true]; 4], "dkimpy");
    }
    // Tampering breaks both: the checks above can fail.
    let (p, m) = &canonical[0];
    let tampered = String::from_utf8_lossy(m).replace("news@news.test>", "newz@news.test>");
    assert_ne!(tampered.as_bytes(), &m[..]);
    let v = verify_all_with_mail_auth(&env, &[(p.clone(), tampered.into_bytes())]);
    assert!(v[0].iter().all(|r| *r != DkimResult::Pass), "{v:?}");
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
    if let Some(v) = verify_with_dkimpy(&[("s1._domainkey.news.test".into(), txt.clone())], &[file])
    {
        assert_eq!(v, vec![true]);
    }

    // Two signatures: --key/--selector given twice, RSA and Ed25519 (RFC 8463 §4).
    let (code, out, err) = volley(
        &[
            "dkim",
            "keygen",
            "--domain",
            "news.test",
            "--selector",
            "r1",
            "--out",
            keys.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let rsa_txt = String::from_utf8(out)
        .unwrap()
        .split('"')
        .skip(1)
        .step_by(2)
        .collect::<String>();
    let r1 = keys.join("news.test/r1.pem");
    let both = [
        "dkim",
        "sign",
        "--domain",
        "news.test",
        "--key",
        pem.to_str().unwrap(),
        "--selector",
        "s1",
        "--key",
        r1.to_str().unwrap(),
        "--selector",
        "r1",
    ];
    // A message with the issue's body: a whitespace-only line before the last.
    let (code, signed, err) = volley(
        &both,
        Some(b"From: a@news.test\nSubject: x\n\nHello!\n  \n\n\n"),
    );
    assert_eq!(code, 0, "{err}");
    let text = String::from_utf8(signed.clone()).unwrap();
    assert_eq!(text.matches("DKIM-Signature:").count(), 2, "{text}");
    assert!(
        text.starts_with("DKIM-Signature: v=1; a=rsa-sha256; s=r1;"),
        "the later key's on top: {text}"
    );
    let records = [
        ("s1._domainkey.news.test".to_string(), txt.clone()),
        ("r1._domainkey.news.test".to_string(), rsa_txt),
    ];
    let mail_auth = MemVerifier::new(&records);
    assert_eq!(
        mail_auth.verdicts(&in_canonical_form(&signed)),
        vec![DkimResult::Pass; 2]
    );
    // mail-auth 0.13.3's verifier keeps the whitespace-only line, as its signer
    // did (issue 13). When this fails it no longer does: verify `signed` directly.
    assert_eq!(
        mail_auth.verdicts(&signed),
        vec![
            DkimResult::Neutral(mail_auth::Error::Dkim(
                mail_auth::dkim::DkimError::FailedBodyHashMatch
            ));
            2
        ],
        "mail-auth's relaxed body canonicalisation changed"
    );
    let file = dir.join("signed-twice.eml");
    std::fs::write(&file, &signed).unwrap();
    if let Some(v) = verify_all_with_dkimpy(&records, &[file]) {
        assert_eq!(v, vec![vec![true, true]], "dkimpy");
    }
    let (code, _, err) = volley(&both[..both.len() - 2], Some(b"From: a@news.test\n\nx\n"));
    assert_eq!(code, 1);
    assert!(err.contains("give one --selector for each --key"), "{err}");

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

/// README, DKIM: "Signed by default: From (twice, so a second From cannot be added),
/// To, Subject, Date, Message-ID, Reply-To, Cc, List-Unsubscribe,
/// List-Unsubscribe-Post, MIME-Version, Content-Type, Content-Transfer-Encoding;
/// ... those absent are signed as absent, so they cannot be added either." A
/// campaign with the default list (no dkim_headers), as the receiver got it: h= is
/// that list with From first, twice; the message verifies as received, and no
/// longer once a From is added above the signed one, or once any listed field it
/// lacks is added, at mail-auth and at dkimpy.
#[test]
fn the_default_list_oversigns_from_and_signs_absent_fields_so_none_can_be_added() {
    const README_LIST: &[&str] = &[
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "reply-to",
        "cc",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    ];
    let (env, keep) = env_keeping("dkim-oversign");
    let keys = env.dir.join("dkim");
    let txt = publish(&env, &keys, "s1", KeyType::Ed25519);
    let c = campaign(
        &env.dir,
        "oversign",
        "dkim = true",
        &["ann@gmail.com,Ann".into()],
    );
    let mut cfg = env.config();
    cfg.dkim_dir = keys;
    assert_eq!(env.send(&c, cfg).delivered, 1);
    let messages = kept(&keep);
    assert_eq!(messages.len(), 1);
    let received = &messages[0].1;

    let h = dkim_tag(received, "h").to_ascii_lowercase();
    assert!(
        h.starts_with("from:from:"),
        "From is not over-signed: h={h}"
    );
    let mut signed: Vec<&str> = h.split(':').skip(1).collect();
    signed.sort_unstable();
    let mut want = README_LIST.to_vec();
    want.sort_unstable();
    assert_eq!(signed, want, "h={h}");

    let names = header_names(received);
    let absent: Vec<&str> = README_LIST
        .iter()
        .copied()
        .filter(|n| !names.contains(*n))
        .collect();
    assert!(absent.contains(&"reply-to"), "{absent:?}");
    // Added on top: a verifier takes a name's instances from the bottom up (RFC
    // 6376 §5.4.2), so a From added above the signed one passes unless From is
    // signed once more than the message has it.
    let mut cases = vec![
        ("as received".to_string(), received.clone()),
        (
            "a second From".to_string(),
            [&b"From: Mallory <mallory@evil.test>\r\n"[..], received].concat(),
        ),
    ];
    for name in &absent {
        let value = match *name {
            "list-unsubscribe" => "<mailto:mallory@evil.test>",
            "list-unsubscribe-post" => "List-Unsubscribe=One-Click",
            "mime-version" => "1.0",
            "content-type" => "text/plain; charset=utf-8",
            "content-transfer-encoding" => "8bit",
            _ => "Mallory <mallory@evil.test>",
        };
        let field = format!("{name}: {value}\r\n");
        cases.push((
            format!("an added {name}"),
            [field.as_bytes(), received].concat(),
        ));
    }
    let files: Vec<(PathBuf, Vec<u8>)> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, m))| (env.dir.join(format!("case-{i}.eml")), m.clone()))
        .collect();
    let verdicts = |passed: Vec<bool>| -> Vec<(&str, bool)> {
        cases.iter().map(|c| c.0.as_str()).zip(passed).collect()
    };
    let want = verdicts(cases.iter().map(|c| c.0 == "as received").collect());
    let mail_auth = verify_with_mail_auth(&env, &files);
    assert_eq!(
        verdicts(mail_auth.iter().map(|v| *v == DkimResult::Pass).collect()),
        want,
        "mail-auth: {mail_auth:?}"
    );
    for (p, m) in &files {
        std::fs::write(p, m).unwrap();
    }
    let paths: Vec<PathBuf> = files.into_iter().map(|f| f.0).collect();
    // dkimpy checks one From more than h= lists (its fix of Debian bug 644046), so
    // an added From fails there even without over-signing: mail-auth's verdict
    // above is the one that shows From over-signed.
    if let Some(v) = verify_with_dkimpy(&[("s1._domainkey.news.test".into(), txt)], &paths) {
        assert_eq!(verdicts(v), want, "dkimpy");
    }
    let _ = std::fs::remove_dir_all(&keep);
}

/// The names of the header fields of `wire`, in lower case.
fn header_names(wire: &[u8]) -> std::collections::HashSet<String> {
    String::from_utf8_lossy(&wire[..body_start(wire)])
        .split("\r\n")
        .filter(|l| !l.starts_with([' ', '\t']))
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_ascii_lowercase())
        .collect()
}

/// The DKIM TXT text `volley dns-records` prints for campaign `c`'s selector
/// `selector` of news.test, its quoted strings joined.
fn printed_record(c: &Path, keys: &Path, selector: &str) -> String {
    let (code, out, err) = volley(
        &[
            "dns-records",
            c.to_str().unwrap(),
            "--dkim-dir",
            keys.to_str().unwrap(),
            "--ip",
            "192.0.2.7",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let out = String::from_utf8(out).unwrap();
    let start = format!("{selector}._domainkey.news.test. 3600 IN TXT (");
    let line = out
        .lines()
        .find(|l| l.starts_with(&start))
        .unwrap_or_else(|| panic!("no DKIM record in\n{out}"));
    line.split('"').skip(1).step_by(2).collect()
}

/// README, DKIM: "PKCS#8 or PKCS#1 PEM accepted". An RSA key written as PKCS#1
/// ("BEGIN RSA PRIVATE KEY", what `openssl genrsa` and older tools write), mode
/// 0600: `volley dns-records` prints its public half, and a campaign signs with it
/// and the signatures verify at mail-auth and at dkimpy.
#[test]
fn a_pkcs1_rsa_key_signs_a_campaign_and_its_record_is_printed() {
    use base64::Engine;
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    let (env, keep) = env_keeping("dkim-pkcs1");
    let keys = env.dir.join("dkim");
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let pem = key.to_pkcs1_pem(LineEnding::LF).unwrap();
    assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
    let path = key_path(&keys, "news.test", "p1");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_0600(&path, &pem);
    let public = key.to_public_key().to_public_key_der().unwrap();
    let txt = format!(
        "v=DKIM1; k=rsa; p={}",
        base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
    );
    publish_txt(&env, "p1", &txt);
    let c = campaign(
        &env.dir,
        "pkcs1",
        "dkim_selector = \"p1\"",
        &["ann@gmail.com,Ann".into(), "bob@gmail.com,Bob".into()],
    );

    assert_eq!(printed_record(&c, &keys, "p1"), txt);

    let mut cfg = env.config();
    cfg.dkim_dir = keys;
    assert_eq!(env.send(&c, cfg).delivered, 2);
    let messages = kept(&keep);
    assert_eq!(messages.len(), 2);
    for (_, m) in &messages {
        assert!(
            m.starts_with(b"DKIM-Signature: v=1; a=rsa-sha256; s=p1;"),
            "{}",
            String::from_utf8_lossy(m)
        );
    }
    assert_eq!(
        verify_with_mail_auth(&env, &messages),
        vec![DkimResult::Pass; 2]
    );
    let files: Vec<PathBuf> = messages.iter().map(|m| m.0.clone()).collect();
    if let Some(v) = verify_with_dkimpy(&[("p1._domainkey.news.test".into(), txt)], &files) {
        assert_eq!(v, vec![true; 2], "dkimpy");
    }
    let _ = std::fs::remove_dir_all(&keep);
}

/// README, DKIM: "A message that cannot be signed is bounced locally (5.7.0), never
/// sent unsigned." What volley takes in is checked so that it can be signed (a
/// merge value from recipients.csv or the inject API cannot hold a line break, every
/// template header line is a field and one is From), so the way to such a message
/// is the spool itself: a Queue record appended after a normal ingest, as a spool
/// another version wrote could hold, whose name value has a line break that makes
/// a rendered header line no field. That recipient is bounced locally with 554
/// 5.7.0 and nothing for it reaches the receiver; the campaign's others are
/// delivered, signed.
#[test]
fn a_message_that_cannot_be_signed_is_bounced_5_7_0_and_never_sent_unsigned() {
    use volley::spool::{ingest, QueueRecord, Spool};
    let (env, keep) = env_keeping("dkim-unsignable");
    let keys = env.dir.join("dkim");
    publish(&env, &keys, "s1", KeyType::Ed25519);
    let c = campaign(
        &env.dir,
        "unsignable",
        "dkim = true",
        &["ann@gmail.com,Ann".into(), "bob@gmail.com,Bob".into()],
    );
    let mut cfg = env.config();
    cfg.dkim_dir = keys;
    let (log, spool) = (cfg.log_path.clone(), cfg.spool_dir.clone());
    {
        let _lock = ingest::lock_spool(&spool, cfg.shards).unwrap();
        let loaded = volley::message::campaign::Campaign::load(&c).unwrap();
        ingest::ingest(&loaded, &spool, cfg.shards, cfg.segment_bytes).unwrap();
        let instances = ingest::load_instances(&spool).unwrap();
        let inst = instances
            .values()
            .find(|i| i.settings.id == "unsignable")
            .unwrap();
        let shard = ingest::shard_of("eve@gmail.com", cfg.shards);
        let (mut sp, _) = Spool::open(&ingest::shard_dir(&spool, shard), cfg.segment_bytes, &|i| {
            instances.contains_key(&i)
        })
        .unwrap();
        let mut values = vec![b"Eve\nnot a field".to_vec(); 2];
        values[inst.email_col] = b"eve@gmail.com".to_vec();
        let q = QueueRecord {
            instance: inst.no,
            line: 4,
            values,
        };
        sp.append_queue(&q, &mut Vec::new()).unwrap();
        sp.sync().unwrap();
    }
    let r = env.send_for(None, cfg, None);
    assert_eq!((r.delivered, r.bounced, r.remaining), (2, 1, 0));

    let by = terminal_by_rcpt(&log_lines(&log));
    let eve = &by["eve@gmail.com"];
    assert_eq!(eve.len(), 1, "{eve:?}");
    let b = &eve[0];
    assert_eq!(
        (
            b["type"].as_str(),
            b["stage"].as_str(),
            b["code"].as_u64(),
            b["enhanced"].as_str(),
            b["class"].as_str(),
        ),
        (
            Some("Bounce"),
            Some("local"),
            Some(554),
            Some("5.7.0"),
            // The classifier reads "DKIM" in the reply: sender authentication.
            Some("auth_failed")
        ),
        "{b}"
    );
    let reply = b["reply"].as_str().unwrap();
    assert!(
        reply.contains("DKIM signing failed") && reply.contains("not sent unsigned"),
        "{b}"
    );
    for rcpt in ["ann@gmail.com", "bob@gmail.com"] {
        let d = &by[rcpt];
        assert_eq!(
            (d.len(), d[0]["type"].as_str()),
            (1, Some("Delivery")),
            "{d:?}"
        );
    }
    // Nothing for Eve reached the receiver, signed or not.
    assert_eq!(env.sink.summary().counts.rcpts_accepted, 2);
    let messages = kept(&keep);
    assert_eq!(messages.len(), 2);
    for (_, m) in &messages {
        let text = String::from_utf8_lossy(m);
        assert!(!text.contains("eve@gmail.com"), "{text}");
    }
    assert_eq!(
        verify_with_mail_auth(&env, &messages),
        vec![DkimResult::Pass; 2]
    );
    let _ = std::fs::remove_dir_all(&keep);
}

// ---------------------------------------------------------------------------------
// Property test: random messages signed by volley verify everywhere.

/// The TXT records the property test's mail-auth verifier reads instead of DNS.
struct Records(std::collections::HashMap<Box<str>, mail_auth::Txt>);

impl mail_auth::ResolverCache<Box<str>, mail_auth::Txt> for Records {
    fn get<Q>(&self, name: &Q) -> Option<mail_auth::Txt>
    where
        Box<str>: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.get(name).cloned()
    }
    fn remove<Q>(&self, name: &Q) -> Option<mail_auth::Txt>
    where
        Box<str>: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.get(name).cloned()
    }
    fn insert(&self, _: Box<str>, _: mail_auth::Txt, _: std::time::Instant) {}
}

/// mail-auth's verifier with the key records in memory: no DNS.
struct MemVerifier {
    records: Records,
    auth: MessageAuthenticator,
    rt: tokio::runtime::Runtime,
}

impl MemVerifier {
    fn new(records: &[(String, String)]) -> MemVerifier {
        MemVerifier {
            records: Records::new(records),
            // No name server: a key not in `records` fails to resolve.
            auth: MessageAuthenticator::new(
                ResolverConfig::from_parts(None, vec![], vec![]),
                ResolverOpts::default(),
            )
            .unwrap(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// The verdict on each signature of `message`, top one first.
    fn verdicts(&self, message: &[u8]) -> Vec<DkimResult> {
        let msg = AuthenticatedMessage::parse(message).expect("a parseable message");
        let params = mail_auth::Parameters::new(&msg).with_txt_cache(&self.records);
        let out = self.rt.block_on(self.auth.verify_dkim(params));
        out.iter().map(|o| o.result().clone()).collect()
    }
}

impl Records {
    fn new(records: &[(String, String)]) -> Records {
        use mail_auth::common::parse::TxtRecordParser;
        use mail_auth::common::verify::DomainKey;
        Records(
            records
                .iter()
                .map(|(name, txt)| {
                    let key = DomainKey::parse(txt.as_bytes()).expect("a DKIM key record");
                    (
                        format!("{name}.").into_boxed_str(),
                        mail_auth::Txt::from(key),
                    )
                })
                .collect(),
        )
    }
}

/// RFC 6376 §3.4.4 read literally, written apart from volley's code: lines end in
/// CRLF only (a lone CR or LF is an ordinary octet), each line loses its trailing
/// WSP and has its runs of WSP made one SP, then the empty lines at the end go, and
/// a non-empty body ends in CRLF.
fn rfc_relaxed_body(body: &[u8]) -> Vec<u8> {
    let text = body.strip_suffix(b"\r\n").unwrap_or(body);
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut rest = text;
    loop {
        let (line, next) = match rest.windows(2).position(|w| w == b"\r\n") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        let mut out = Vec::new();
        for &c in line {
            let wsp = c == b' ' || c == b'\t';
            if !(wsp && out.last() == Some(&b' ')) {
                out.push(if wsp { b' ' } else { c });
            }
        }
        while out.last() == Some(&b' ') {
            out.pop();
        }
        lines.push(out);
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(&l);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `wire` with its body in RFC 6376 relaxed canonical form: a correct
/// canonicaliser leaves that body as it is, so a verifier whose own relaxed body
/// code is wrong for some bodies (mail-auth 0.13.3's) still checks the signature
/// and bh= of the original.
fn in_canonical_form(wire: &[u8]) -> Vec<u8> {
    let at = body_start(wire);
    [&wire[..at], &rfc_relaxed_body(&wire[at..])[..]].concat()
}

/// Where the body of a message on the wire starts (after the first empty line);
/// the message's length when it has none.
fn body_start(wire: &[u8]) -> usize {
    if wire.starts_with(b"\r\n") {
        return 2;
    }
    wire.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(wire.len(), |i| i + 4)
}

/// The value of `tag` in the first DKIM-Signature field of `wire`, unfolded.
fn dkim_tag(wire: &[u8], tag: &str) -> String {
    let text = String::from_utf8_lossy(wire);
    let field = text
        .split("\r\n")
        .fold((String::new(), false), |(mut acc, inside), line| {
            if line.starts_with("DKIM-Signature:") && acc.is_empty() {
                (line.to_string(), true)
            } else if inside && line.starts_with([' ', '\t']) {
                acc.push_str(line);
                (acc, true)
            } else {
                (acc, false)
            }
        })
        .0;
    field
        .split(';')
        .map(|t| t.trim())
        .find_map(|t| t.strip_prefix(&format!("{tag}=")).map(str::to_string))
        .unwrap_or_default()
        .replace([' ', '\t'], "")
}

/// What the SMTP client puts on the wire for `content` (dot-stuffed, ending in CRLF)
/// and the receiver stores once it has undone the stuffing.
fn through_the_wire(content: &[u8]) -> Vec<u8> {
    let mut stuffed = Vec::new();
    volley::smtp::client::dot_stuff(content, &mut stuffed);
    let mut out = Vec::with_capacity(stuffed.len());
    let mut at_line_start = true;
    for (i, &c) in stuffed.iter().enumerate() {
        let unstuff = at_line_start && c == b'.' && stuffed.get(i + 1) == Some(&b'.');
        if !unstuff {
            out.push(c);
        }
        at_line_start = !unstuff && c == b'\n';
    }
    out
}

/// Random words, with single spaces or runs of spaces and tabs between them.
fn words(rng: &mut fastrand::Rng, max: usize) -> Vec<u8> {
    const WORDS: &[&str] = &["Hello", "a", "x.y", "Ann", "--", "é", "=3D", ":", "{}", "."];
    let mut out = Vec::new();
    for i in 0..rng.usize(1..=max) {
        if i > 0 {
            out.extend_from_slice(wsp(rng, 8));
        }
        out.extend_from_slice(WORDS[rng.usize(..WORDS.len())].as_bytes());
    }
    out
}

/// Whitespace between words: mostly one space, sometimes a run of spaces and tabs.
fn wsp(rng: &mut fastrand::Rng, one_in: u32) -> &'static [u8] {
    const RUNS: &[&[u8]] = &[b"  ", b"\t", b" \t", b"\t\t ", b"   "];
    if rng.u32(..one_in) == 0 {
        RUNS[rng.usize(..RUNS.len())]
    } else {
        b" "
    }
}

/// A message with headers folded, duplicated, empty and with trailing whitespace,
/// and a body with whitespace-only lines, trailing whitespace, lone CRs and LFs,
/// dot-led lines, no final line end, or no text at all.
fn random_message(rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut m = Vec::new();
    // One message in eight has lone LFs for line ends and lone CRs and LFs in its
    // body (from a merge value, say); the others are CRLF throughout.
    let sloppy = rng.u32(..8) == 0;
    let eol = |rng: &mut fastrand::Rng| -> &'static [u8] {
        if sloppy && rng.u32(..3) == 0 {
            b"\n"
        } else {
            b"\r\n"
        }
    };
    let field = |rng: &mut fastrand::Rng, m: &mut Vec<u8>, name: &str| {
        m.extend_from_slice(name.as_bytes());
        m.push(b':');
        if rng.u32(..8) != 0 {
            m.extend_from_slice(wsp(rng, 4));
            m.extend_from_slice(&words(rng, 6));
        }
        for _ in 0..rng.usize(..3).saturating_sub(1) {
            // Folded: a line end and whitespace, then more words.
            m.extend_from_slice(b"\r\n");
            m.extend_from_slice(if rng.bool() { b" " } else { b"\t" });
            m.extend_from_slice(wsp(rng, 3));
            m.extend_from_slice(&words(rng, 4));
        }
        if rng.u32(..5) == 0 {
            m.extend_from_slice(wsp(rng, 1));
        }
        m.extend_from_slice(eol(rng));
    };
    let mut names = vec!["From", "To", "Subject", "Date", "Message-ID", "X-Mailer"];
    for extra in ["Cc", "Subject", "X-Empty", "Reply-To", "List-Unsubscribe"] {
        if rng.u32(..3) == 0 {
            names.push(extra);
        }
    }
    rng.shuffle(&mut names);
    for name in names {
        let name = match rng.u32(..6) {
            0 => name.to_ascii_uppercase(),
            1 => name.to_ascii_lowercase(),
            _ => name.to_string(),
        };
        field(rng, &mut m, &name);
    }
    m.extend_from_slice(b"\r\n");
    if rng.u32(..12) == 0 {
        return m; // an empty body
    }
    let lines = rng.usize(..8);
    for i in 0..lines {
        let line: Vec<u8> = match rng.u32(..10) {
            0 => Vec::new(),
            1 => wsp(rng, 1).to_vec(),
            2 => [b".", &words(rng, 4)[..]].concat(),
            3 => [wsp(rng, 2), &words(rng, 6)[..]].concat(),
            _ => words(rng, 12),
        };
        m.extend_from_slice(&line);
        if rng.u32(..5) == 0 {
            m.extend_from_slice(wsp(rng, 1));
        }
        if sloppy && rng.u32(..4) == 0 {
            m.extend_from_slice(if rng.bool() { b"\rx" } else { b"\ny" });
        }
        if i + 1 < lines || rng.u32(..6) != 0 {
            m.extend_from_slice(eol(rng));
        }
    }
    // Trailing lines that are empty or whitespace only: the issue's case.
    for _ in 0..rng.usize(..4) {
        if rng.bool() {
            m.extend_from_slice(wsp(rng, 1));
        }
        m.extend_from_slice(eol(rng));
    }
    m
}

/// The property: whatever the message, volley's signature verifies at mail-auth
/// and at dkimpy, and its bh= is the RFC's relaxed body hash of what goes on the
/// wire. VOLLEY_DKIM_SEED picks another seed; VOLLEY_DKIM_MESSAGES another count.
#[test]
fn random_messages_signed_by_volley_verify_at_mail_auth_and_dkimpy() {
    use base64::Engine;
    let seed: u64 = std::env::var("VOLLEY_DKIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_130);
    let count: usize = std::env::var("VOLLEY_DKIM_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    eprintln!("property seed {seed} ({count} messages; VOLLEY_DKIM_SEED=... to repeat)");
    let mut rng = fastrand::Rng::with_seed(seed);

    let dir = std::env::temp_dir().join(format!("volley-dkim-prop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut records = Vec::new();
    let mut keys = Vec::new();
    for (selector, kind) in [("ed", KeyType::Ed25519), ("rsa", KeyType::Rsa)] {
        let k = generate(kind).unwrap();
        let path = key_path(&dir, "news.test", selector);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        write_0600(&path, &k.pem);
        records.push((format!("{selector}._domainkey.news.test"), k.txt));
        keys.push(volley::message::dkim::KeyFile {
            selector: selector.into(),
            path,
        });
    }
    let load = |keys: &[volley::message::dkim::KeyFile]| {
        volley::message::dkim::Signer::load(
            "news.test",
            keys,
            volley::message::dkim::DEFAULT_HEADERS,
        )
        .unwrap()
    };
    // Ed25519 alone, and both keys (RSA is slow to sign: one message in eight).
    let signers = [load(&keys[..1]), load(&keys)];

    let mut wires = Vec::with_capacity(count);
    let mut raws = Vec::with_capacity(count);
    for i in 0..count {
        let raw = random_message(&mut rng);
        let signer = &signers[usize::from(i % 8 == 0)];
        let mut message = raw.clone();
        let header = signer
            .sign(&mut message, volley::message::dkim::Body::Varies)
            .unwrap_or_else(|e| {
                panic!("seed {seed} #{i}: {e}\n{:?}", String::from_utf8_lossy(&raw))
            });
        let mut content = header.into_bytes();
        content.extend_from_slice(&message);
        // What was signed is what is sent: the SMTP client changes nothing.
        let wire = through_the_wire(&content);
        assert_eq!(
            wire, content,
            "seed {seed} #{i}: the client changed the signed message"
        );
        wires.push(wire);
        raws.push(raw);
    }

    let mut failures: Vec<(usize, String)> = Vec::new();
    // 1. Only CRLF on the wire (verifiers read a lone CR or LF each their own way),
    // and bh= is the hash of the RFC's canonical form of the body on the wire.
    for (i, wire) in wires.iter().enumerate() {
        let lone = wire.iter().enumerate().any(|(j, &c)| {
            (c == b'\r' && wire.get(j + 1) != Some(&b'\n'))
                || (c == b'\n' && (j == 0 || wire[j - 1] != b'\r'))
        });
        if lone {
            failures.push((i, "lone CR or LF: on the wire".into()));
        }
        let want = ring::digest::digest(
            &ring::digest::SHA256,
            &rfc_relaxed_body(&wire[body_start(wire)..]),
        );
        let want = base64::engine::general_purpose::STANDARD.encode(want.as_ref());
        if dkim_tag(wire, "bh") != want {
            failures.push((i, format!("bh=: not the RFC 6376 relaxed body hash {want}")));
        }
    }

    // 2. mail-auth's verifier, keys from memory. Its own relaxed body code is wrong
    // for some bodies (a whitespace-only line before the trailing empty lines), so
    // each message is also verified with its body replaced by the RFC's canonical
    // form of it, which every correct canonicaliser leaves as it is: that checks the
    // header signature and bh= with mail-auth's code, whatever its body bug.
    let verifier = MemVerifier::new(&records);
    let mut mail_auth_body_defect = 0;
    for (i, wire) in wires.iter().enumerate() {
        let body = &wire[body_start(wire)..];
        let canonical = in_canonical_form(wire);
        let mut theirs = Vec::new();
        use mail_auth::common::headers::Writable;
        mail_auth::dkim::Canonicalization::Relaxed
            .canonical_body(body, 0)
            .write(&mut theirs);
        let v = verifier.verdicts(&canonical);
        if v.is_empty() || v.iter().any(|r| *r != DkimResult::Pass) {
            failures.push((i, format!("mail-auth (canonical body): {v:?}")));
        }
        if theirs == rfc_relaxed_body(body) {
            let v = verifier.verdicts(wire);
            if v.is_empty() || v.iter().any(|r| *r != DkimResult::Pass) {
                failures.push((i, format!("mail-auth: {v:?}")));
            }
        } else {
            mail_auth_body_defect += 1;
        }
    }
    eprintln!(
        "{mail_auth_body_defect} of {count} bodies canonicalised by mail-auth 0.13.3 unlike RFC 6376 §3.4.4 (verified through their canonical form)"
    );

    // 3. dkimpy, all messages in one run.
    let files: Vec<PathBuf> = wires
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let p = dir.join(format!("{i:05}.eml"));
            std::fs::write(&p, w).unwrap();
            p
        })
        .collect();
    if let Some(verdicts) = verify_with_dkimpy(&records, &files) {
        for (i, ok) in verdicts.into_iter().enumerate() {
            if !ok {
                failures.push((i, "dkimpy: fail".into()));
            }
        }
    }

    if !failures.is_empty() {
        let mut msgs: Vec<usize> = failures.iter().map(|f| f.0).collect();
        msgs.sort_unstable();
        msgs.dedup();
        let crlf_only = msgs
            .iter()
            .filter(|i| {
                !raws[**i].iter().enumerate().any(|(j, &c)| {
                    (c == b'\r' && raws[**i].get(j + 1) != Some(&b'\n'))
                        || (c == b'\n' && (j == 0 || raws[**i][j - 1] != b'\r'))
                })
            })
            .count();
        let mut kinds: Vec<(String, usize)> = Vec::new();
        for (_, why) in &failures {
            let kind = why.split(':').next().unwrap_or_default().to_string();
            match kinds.iter_mut().find(|k| k.0 == kind) {
                Some(k) => k.1 += 1,
                None => kinds.push((kind, 1)),
            }
        }
        let mut report = format!(
            "seed {seed}: {} of {count} messages fail ({crlf_only} of them CRLF-only); failed checks: {kinds:?}; first ones:\n",
            msgs.len(),
        );
        for (i, why) in failures.iter().take(6) {
            report.push_str(&format!(
                "#{i}: {why}\n  raw:  {:?}\n  wire: {:?}\n",
                String::from_utf8_lossy(&raws[*i]),
                String::from_utf8_lossy(&wires[*i])
            ));
        }
        panic!("{report}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An Ed25519 key as `openssl genpkey` writes it (PKCS#8 v1, no public key in it),
/// mode 0600: `volley dns-records` prints its public half, and a campaign signs
/// with it and the signatures verify at mail-auth and at dkimpy.
#[test]
fn an_openssl_ed25519_key_signs_a_campaign_and_its_record_is_printed() {
    let (env, keep) = env_keeping("dkim-openssl-ed25519");
    let keys = env.dir.join("dkim");
    let path = key_path(&keys, "news.test", "ed");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let made = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519"])
        .output();
    let pem = match made {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap(),
        other => {
            eprintln!("SKIPPED: openssl genpkey is not available here: {other:?}");
            return;
        }
    };
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    write_0600(&path, &pem);
    let c = campaign(
        &env.dir,
        "openssl-ed",
        "dkim_selector = \"ed\"",
        &["ann@gmail.com,Ann".into()],
    );
    let txt = printed_record(&c, &keys, "ed");
    assert!(txt.starts_with("v=DKIM1; k=ed25519; p="), "{txt}");
    publish_txt(&env, "ed", &txt);

    let mut cfg = env.config();
    cfg.dkim_dir = keys;
    assert_eq!(env.send(&c, cfg).delivered, 1);
    let messages = kept(&keep);
    assert_eq!(messages.len(), 1);
    assert!(
        messages[0]
            .1
            .starts_with(b"DKIM-Signature: v=1; a=ed25519-sha256; s=ed;"),
        "{}",
        String::from_utf8_lossy(&messages[0].1)
    );
    assert_eq!(
        verify_with_mail_auth(&env, &messages),
        vec![DkimResult::Pass]
    );
    let files: Vec<PathBuf> = messages.iter().map(|m| m.0.clone()).collect();
    if let Some(v) = verify_with_dkimpy(&[("ed._domainkey.news.test".into(), txt)], &files) {
        assert_eq!(v, vec![true], "dkimpy");
    }
    let _ = std::fs::remove_dir_all(&keep);
}
