//! DKIM signing (RFC 6376; Ed25519 per RFC 8463) with mail-auth: relaxed/relaxed,
//! RSA-SHA256 or Ed25519-SHA256, one key per From domain and selector.
//!
//! Keys live in a directory (`--dkim-dir`, default /etc/volley/dkim) as
//! `DOMAIN/SELECTOR.pem` (PKCS#8 for either type, or PKCS#1 "RSA PRIVATE KEY").
//! `volley dkim keygen` writes them there. Each shard parses the keys it needs once
//! at start; signing is per rendered message, on the shard.

use mail_auth::common::crypto::{
    Algorithm, Ed25519Key, HashContext, HashImpl, HashOutput, RsaKey, Sha256, SigningKey,
};
use mail_auth::common::headers::{HeaderWriter, Writable, Writer};
use mail_auth::dkim::{DkimSigner, Done};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Signed by default: what a receiver shows or acts on, and the one-click
/// unsubscribe pair (RFC 8058 requires they be signed). From is listed twice
/// (over-signed) so that a second From cannot be added without breaking the signature.
pub const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "Cc",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

pub const DEFAULT_DIR: &str = "/etc/volley/dkim";

/// Where a domain's key for `selector` is (or would be).
pub fn key_path(dir: &Path, domain: &str, selector: &str) -> PathBuf {
    dir.join(domain.to_ascii_lowercase())
        .join(format!("{selector}.pem"))
}

/// The key file for `domain`: `selector`'s if given, else the domain's only key.
/// Errors say what is missing and what to do.
pub fn find_key(
    dir: &Path,
    domain: &str,
    selector: Option<&str>,
) -> Result<(String, PathBuf), String> {
    if let Some(s) = selector {
        let p = key_path(dir, domain, s);
        return if p.is_file() {
            Ok((s.to_string(), p))
        } else {
            Err(format!(
                "no DKIM key {} for {domain} selector {s}; make one with `volley dkim keygen --domain {domain} --selector {s} --out {}`, or set dkim = false",
                p.display(),
                dir.display()
            ))
        };
    }
    let ddir = dir.join(domain.to_ascii_lowercase());
    let mut keys: Vec<(String, PathBuf)> = std::fs::read_dir(&ddir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "pem"))
                .filter_map(|p| Some((p.file_stem()?.to_str()?.to_string(), p)))
                .collect()
        })
        .unwrap_or_default();
    keys.sort();
    match keys.len() {
        1 => Ok(keys.remove(0)),
        0 => Err(format!(
            "no DKIM key for {domain} in {}; make one with `volley dkim keygen --domain {domain} --selector SELECTOR --out {}`, or set dkim = false in campaign.toml",
            ddir.display(),
            dir.display()
        )),
        _ => Err(format!(
            "{domain} has {} DKIM keys in {} ({}); choose one with dkim_selector in campaign.toml",
            keys.len(),
            ddir.display(),
            keys.iter().map(|k| k.0.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Where a campaign instance's key is, resolved when the engine starts.
#[derive(Debug, Clone)]
pub struct KeyRef {
    pub domain: String,
    pub selector: String,
    pub path: PathBuf,
    pub headers: Vec<String>,
}

impl KeyRef {
    pub fn load(&self) -> Result<Signer, String> {
        let headers: Vec<&str> = self.headers.iter().map(String::as_str).collect();
        Signer::load(&self.path, &self.domain, &self.selector, &headers)
    }
}

/// The key of every signing campaign instance, each checked to parse; the first
/// problem names the campaign and what to do.
pub fn keys_for(
    dir: &Path,
    instances: &crate::ingest::Instances,
) -> Result<std::collections::HashMap<u32, KeyRef>, String> {
    let mut out = std::collections::HashMap::new();
    for (no, inst) in instances.iter() {
        let s = &inst.settings;
        if let Some(k) = key_for(dir, s)? {
            out.insert(*no, k);
        }
    }
    Ok(out)
}

/// The key for one campaign's settings (None: it does not sign), checked to parse.
pub fn key_for(dir: &Path, s: &crate::campaign::Settings) -> Result<Option<KeyRef>, String> {
    if !s.dkim {
        return Ok(None);
    }
    let (selector, path) = find_key(dir, &s.from_domain, s.dkim_selector.as_deref())
        .map_err(|e| format!("campaign {}: {e}", s.id))?;
    let k = KeyRef {
        domain: s.from_domain.to_ascii_lowercase(),
        selector,
        path,
        headers: s
            .dkim_headers
            .clone()
            .unwrap_or_else(|| DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect()),
    };
    k.load().map_err(|e| format!("campaign {}: {e}", s.id))?;
    Ok(Some(k))
}

/// A key that hands back a body hash computed before mail-auth asks for it: the last
/// one, when the caller knows the body is the one it signed last (a template without
/// merge fields in its body), or one `relaxed_body_hash` made without canonicalising.
struct BodyHashCache<K> {
    key: K,
    reuse: Rc<Cell<bool>>,
    last: Rc<RefCell<Option<HashOutput>>>,
}

impl<K: SigningKey> SigningKey for BodyHashCache<K> {
    type Hasher = K::Hasher;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.key.sign(input)
    }

    /// mail-auth calls this for the canonical body only.
    fn hash(&self, data: impl Writable) -> HashOutput {
        if self.reuse.get() {
            if let Some(h) = self.last.borrow().as_ref() {
                return h.clone();
            }
        }
        let h = self.key.hash(data);
        *self.last.borrow_mut() = Some(h.clone());
        h
    }

    fn algorithm(&self) -> Algorithm {
        self.key.algorithm()
    }
}

/// The relaxed body hash (RFC 6376 §3.4.4) of a message whose body is already in
/// relaxed form but for trailing empty lines, hashed as it lies: what a rendered
/// campaign message almost always is. None for anything else (a tab, two spaces
/// running, a space before a line end, a bare CR or LF anywhere, a header line
/// without a colon), which mail-auth then canonicalises: where it and this would
/// find the body at different offsets, or canonicalise differently, this says None.
fn relaxed_body_hash(message: &[u8]) -> Option<HashOutput> {
    use memchr::{memchr, memchr_iter, memmem};
    let mut lfs = 0;
    for i in memchr_iter(b'\n', message) {
        if i == 0 || message[i - 1] != b'\r' {
            return None;
        }
        lfs += 1;
    }
    if memchr_iter(b'\r', message).count() != lfs {
        return None;
    }
    let split = memmem::find(message, b"\r\n\r\n")?;
    for (i, line) in message[..split + 2]
        .split_inclusive(|&b| b == b'\n')
        .enumerate()
    {
        let continuation = i > 0 && matches!(line[0], b' ' | b'\t');
        if !continuation && memchr(b':', line).is_none() {
            return None;
        }
    }
    let body = &message[split + 4..];
    if memchr(b'\t', body).is_some()
        || memmem::find(body, b"  ").is_some()
        || memmem::find(body, b" \r\n").is_some()
    {
        return None;
    }
    let mut end = body.len();
    while body[..end].ends_with(b"\r\n") {
        end -= 2;
    }
    let text = &body[..end];
    if text.ends_with(b" ") {
        return None;
    }
    let mut h = <Sha256 as HashImpl>::hasher();
    if !text.is_empty() {
        h.write(text);
        h.write(b"\r\n");
    }
    Some(h.complete())
}

fn cached<K>(
    key: K,
    reuse: &Rc<Cell<bool>>,
    last: &Rc<RefCell<Option<HashOutput>>>,
) -> BodyHashCache<K> {
    BodyHashCache {
        key,
        reuse: reuse.clone(),
        last: last.clone(),
    }
}

enum Inner {
    Rsa(DkimSigner<BodyHashCache<RsaKey<Sha256>>, Done>),
    Ed25519(DkimSigner<BodyHashCache<Ed25519Key>, Done>),
}

/// A parsed key for one domain and selector, ready to sign.
pub struct Signer {
    inner: Inner,
    reuse: Rc<Cell<bool>>,
    last: Rc<RefCell<Option<HashOutput>>>,
    pub algorithm: &'static str,
}

impl Signer {
    /// Reads and parses the PEM key at `path`.
    pub fn load(
        path: &Path,
        domain: &str,
        selector: &str,
        headers: &[&str],
    ) -> Result<Signer, String> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            format!(
                "{}: not a PEM private key ({e}); expected PKCS#8 \"PRIVATE KEY\" or PKCS#1 \"RSA PRIVATE KEY\"",
                path.display()
            )
        })?;
        let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
        let reuse = Rc::new(Cell::new(false));
        let last = Rc::new(RefCell::new(None));
        let rsa = |der: PrivateKeyDer<'static>| {
            RsaKey::<Sha256>::from_key_der(der)
                .map_err(|e| format!("{}: not an RSA or Ed25519 key: {e}", path.display()))
        };
        let inner = match &der {
            PrivateKeyDer::Pkcs8(p8) => {
                match Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der()) {
                    Ok(k) => Inner::Ed25519(
                        DkimSigner::from_key(cached(k, &reuse, &last))
                            .domain(domain)
                            .selector(selector)
                            .headers(headers),
                    ),
                    Err(_) => Inner::Rsa(
                        DkimSigner::from_key(cached(rsa(der.clone_key())?, &reuse, &last))
                            .domain(domain)
                            .selector(selector)
                            .headers(headers),
                    ),
                }
            }
            PrivateKeyDer::Pkcs1(_) => Inner::Rsa(
                DkimSigner::from_key(cached(rsa(der.clone_key())?, &reuse, &last))
                    .domain(domain)
                    .selector(selector)
                    .headers(headers),
            ),
            _ => {
                return Err(format!(
                    "{}: an EC (SEC1) key; DKIM takes RSA or Ed25519",
                    path.display()
                ))
            }
        };
        let algorithm = match inner {
            Inner::Rsa(_) => "rsa-sha256",
            Inner::Ed25519(_) => "ed25519-sha256",
        };
        Ok(Signer {
            inner,
            reuse,
            last,
            algorithm,
        })
    }

    /// The DKIM-Signature header field (with its CRLF) for `message`, which must use
    /// CRLF line ends; put it in front of the message. `same_body`: the body is the
    /// one this signer signed last, so its hash is reused.
    pub fn sign(&self, message: &[u8], same_body: bool) -> Result<String, String> {
        let known = same_body && self.last.borrow().is_some();
        if !known {
            if let Some(h) = relaxed_body_hash(message) {
                *self.last.borrow_mut() = Some(h);
                self.reuse.set(true);
                return self.sign_inner(message);
            }
        }
        self.reuse.set(known);
        self.sign_inner(message)
    }

    fn sign_inner(&self, message: &[u8]) -> Result<String, String> {
        let sig = match &self.inner {
            Inner::Rsa(s) => s.sign(message),
            Inner::Ed25519(s) => s.sign(message),
        };
        sig.map(|s| s.to_header()).map_err(|e| e.to_string())
    }
}

/// Key types `volley dkim keygen` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyType {
    /// RSA 2048 bits: what every verifier knows.
    Rsa,
    /// Ed25519 (RFC 8463): small and fast, not yet verified everywhere; sign with both.
    Ed25519,
}

/// A new key: the PEM to keep and the DNS TXT record's value to publish.
pub struct NewKey {
    pub pem: String,
    pub txt: String,
}

pub fn generate(kind: KeyType) -> Result<NewKey, String> {
    match kind {
        KeyType::Rsa => {
            use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| e.to_string())?;
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| e.to_string())?
                .to_string();
            let public = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| e.to_string())?;
            Ok(NewKey {
                pem,
                txt: format!("v=DKIM1; k=rsa; p={}", base64(public.as_bytes())),
            })
        }
        KeyType::Ed25519 => {
            let der = Ed25519Key::generate_pkcs8().map_err(|e| e.to_string())?;
            let key = Ed25519Key::from_pkcs8_der(&der).map_err(|e| e.to_string())?;
            Ok(NewKey {
                pem: pem_encode("PRIVATE KEY", &der),
                txt: format!("v=DKIM1; k=ed25519; p={}", base64(&key.public_key())),
            })
        }
    }
}

/// The DNS TXT value publishing the public half of the private key at `path`.
pub fn public_txt(path: &Path) -> Result<String, String> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: not a PEM private key ({e})", path.display()))?;
    let rsa = match &der {
        PrivateKeyDer::Pkcs8(p8) => {
            if let Ok(k) = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der()) {
                return Ok(format!("v=DKIM1; k=ed25519; p={}", base64(&k.public_key())));
            }
            rsa::RsaPrivateKey::from_pkcs8_der(p8.secret_pkcs8_der()).map_err(|e| e.to_string())
        }
        PrivateKeyDer::Pkcs1(p1) => {
            rsa::RsaPrivateKey::from_pkcs1_der(p1.secret_pkcs1_der()).map_err(|e| e.to_string())
        }
        _ => Err("not an RSA or Ed25519 key".to_string()),
    }
    .map_err(|e| format!("{}: {e}", path.display()))?;
    let public = rsa
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| e.to_string())?;
    Ok(format!("v=DKIM1; k=rsa; p={}", base64(public.as_bytes())))
}

/// `raw` with every bare LF made CRLF (messages on the wire, and as signed).
pub fn crlf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 40);
    for (i, &b) in raw.iter().enumerate() {
        if b == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// The TXT record in zone-file form, split into strings of at most 255 octets.
pub fn zone_line(domain: &str, selector: &str, txt: &str) -> String {
    let parts: Vec<String> = txt
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{domain}. 3600 IN TXT ( {} )",
        parts.join(" ")
    )
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bh(header: &str) -> String {
        header
            .split("bh=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string()
    }

    /// A signer with a new Ed25519 key for news.test, and the directory to remove.
    fn ed25519_signer(tag: &str) -> (Signer, PathBuf) {
        let dir = std::env::temp_dir().join(format!("volley-dkim-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.pem");
        std::fs::write(&path, generate(KeyType::Ed25519).unwrap().pem).unwrap();
        let s = Signer::load(&path, "news.test", "s1", DEFAULT_HEADERS).unwrap();
        (s, dir)
    }

    #[test]
    fn a_body_hash_is_reused_only_when_asked() {
        let (s, dir) = ed25519_signer("unit");
        let a = s
            .sign(b"From: a@news.test\r\nTo: x@y.test\r\n\r\nsame\r\n", false)
            .unwrap();
        let b = s
            .sign(b"From: a@news.test\r\nTo: z@y.test\r\n\r\nsame\r\n", true)
            .unwrap();
        assert_eq!(bh(&a), bh(&b));
        let c = s
            .sign(b"From: a@news.test\r\n\r\nother\r\n", false)
            .unwrap();
        assert_ne!(bh(&a), bh(&c));
        // Reusing after `c` hands back `c`'s hash: the caller's promise is the contract.
        let d = s.sign(b"From: a@news.test\r\n\r\nsame\r\n", true).unwrap();
        assert_eq!(bh(&c), bh(&d));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// RFC 6376 §3.4.4 read literally, for CRLF bodies: the reference the fast path
    /// and mail-auth must both agree with.
    fn reference_relaxed(body: &str) -> Vec<u8> {
        let mut lines: Vec<String> = body
            .strip_suffix("\r\n")
            .unwrap_or(body)
            .split("\r\n")
            .map(|l| {
                // Runs of WSP become one SP, then WSP at the end of the line goes.
                let mut out = String::new();
                for c in l.chars() {
                    let wsp = c == ' ' || c == '\t';
                    if !(wsp && out.ends_with(' ')) {
                        out.push(if wsp { ' ' } else { c });
                    }
                }
                out.trim_end_matches(' ').to_string()
            })
            .collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
            .iter()
            .flat_map(|l| [l.as_str(), "\r\n"])
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn the_body_hash_fast_path_agrees_with_the_rfc_and_declines_what_it_cannot_hash() {
        use base64::Engine;
        let (s, dir) = ed25519_signer("fast");
        let head = "From: a@news.test\r\nSubject: a long\r\n folded subject\r\n\r\n";
        let fast = [
            "Hello Ann,\r\n\r\nA line.\r\n",
            "trailing empty lines\r\n\r\n\r\n\r\n",
            "no final line end",
            "",
            "\r\n\r\n",
            " a leading space stays one\r\n",
            "..dot-led line\r\n.\r\n",
        ];
        let slow = [
            "a\ttab\r\n",
            "two  spaces\r\n",
            "a trailing space \r\nnext\r\n",
            "trailing space at the end ",
            "  \r\n\r\nx\r\n",
        ];
        for (body, expect_fast) in fast
            .iter()
            .map(|b| (b, true))
            .chain(slow.iter().map(|b| (b, false)))
        {
            let msg = format!("{head}{body}");
            assert_eq!(
                relaxed_body_hash(msg.as_bytes()).is_some(),
                expect_fast,
                "{body:?}"
            );
            let want = ring::digest::digest(&ring::digest::SHA256, &reference_relaxed(body));
            let want = base64::engine::general_purpose::STANDARD.encode(want.as_ref());
            let header = s.sign(msg.as_bytes(), false).unwrap();
            assert_eq!(
                bh(&header).replace([' ', '\t', '\r', '\n'], ""),
                want,
                "{body:?}"
            );
        }
        // Bare line ends, and a header line without a colon, go to mail-auth.
        for msg in [
            "From: a@news.test\r\n\r\nbare\nLF\r\n",
            "From: a@news.test\nTo: b@x.test\r\n\r\nbody\r\n",
            "From: a@news.test\r\nnot a header\r\n\r\nbody\r\n",
            "From: a@news.test\r\nno body",
        ] {
            assert!(relaxed_body_hash(msg.as_bytes()).is_none(), "{msg:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn long_records_are_split_for_dns() {
        let txt = "x".repeat(400);
        let line = zone_line("news.test", "s1", &txt);
        assert!(line.starts_with("s1._domainkey.news.test. 3600 IN TXT ( \""));
        assert_eq!(line.matches('"').count(), 4);
    }
}
