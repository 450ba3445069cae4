//! DKIM signing (RFC 6376; Ed25519 per RFC 8463): relaxed/relaxed, RSA-SHA256 or
//! Ed25519-SHA256, one signature per selector of the From domain (RFC 8463 §4:
//! sign with both an RSA and an Ed25519 key, as receivers that do not know Ed25519
//! ignore that signature).
//!
//! Canonicalisation is volley's own (`canon`); mail-auth makes the DKIM-Signature
//! field. The signing operations are aws-lc-rs's: twice ring's RSA-2048 signing
//! rate on a core (benches/rsa-backends; issue 15), and 1.7x its Ed25519 rate
//! (13.3 against 23.0 µs a signature, `cargo bench --bench hot -- dkim`).
//! Keys live in a directory (`--dkim-dir`, default /etc/volley/dkim) as `DOMAIN/SELECTOR.pem` (PKCS#8 for either type, or PKCS#1
//! "RSA PRIVATE KEY"). `volley dkim keygen` writes them there. Each shard parses
//! the keys it needs once at start; signing is per rendered message, on the shard.

pub mod canon;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, RsaKeyPair};
use mail_auth::common::crypto::{Algorithm, CryptoError, HashContext, HashImpl, Sha256};
use mail_auth::common::headers::{HeaderWriter, Writable, Writer};
use mail_auth::dkim::{Canonicalization, Signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use thiserror::Error;

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

/// Where keys are looked for when `--dkim-dir` is not given.
pub const DEFAULT_DIR: &str = "/etc/volley/dkim";

/// Most signatures on one message: a selector list longer than this is a mistake
/// (two, RSA and Ed25519, is the practice; a key rotation may add a third).
pub const SIGNATURES_MAX: usize = 4;

/// Why a campaign's keys cannot be used. Each says what to do.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("no DKIM key {} for {domain} selector {selector}; make one with `volley dkim keygen --domain {domain} --selector {selector} --out {}`, or set dkim = false", path.display(), dir.display())]
    Missing {
        path: PathBuf,
        dir: PathBuf,
        domain: String,
        selector: String,
    },
    #[error("no DKIM key for {domain} in {}; make one with `volley dkim keygen --domain {domain} --selector SELECTOR --out {}`, or set dkim = false in campaign.toml", domain_dir.display(), dir.display())]
    NoKeys {
        domain_dir: PathBuf,
        dir: PathBuf,
        domain: String,
    },
    #[error("{domain} has {count} DKIM keys in {} ({selectors}), more than the {SIGNATURES_MAX} signatures a message gets; choose with dkim_selector in campaign.toml", domain_dir.display())]
    TooMany {
        domain: String,
        domain_dir: PathBuf,
        count: usize,
        selectors: String,
    },
    #[error("dkim_selector is an empty list; name one selector or more, or leave it out to sign with every key of the domain")]
    NoSelector,
    #[error("dkim_selector names {0:?} twice; each selector signs once")]
    DuplicateSelector(String),
    #[error("dkim_selector lists {0} selectors; at most {SIGNATURES_MAX} signatures per message")]
    TooManySelectors(usize),
    #[error("dkim_headers does not list From; RFC 6376 §5.4 requires From be signed: add it")]
    FromNotSigned,
    #[error("dkim_headers lists {0}; a signature cannot cover DKIM-Signature fields (each selector's would cover the other's): remove it")]
    SignsSignature(String),
    /// Unreadable, too big, or open to others (host/secrets.rs).
    #[error("{0}")]
    Read(#[from] crate::host::secrets::SecretError),
    #[error("{}: not a PEM private key ({reason}); expected PKCS#8 \"PRIVATE KEY\" or PKCS#1 \"RSA PRIVATE KEY\"", path.display())]
    NotPem { path: PathBuf, reason: String },
    #[error("{}: not an RSA or Ed25519 key: {reason}", path.display())]
    NotAKey { path: PathBuf, reason: String },
    #[error("{}: an EC (SEC1) key; DKIM takes RSA or Ed25519", path.display())]
    Ec { path: PathBuf },
    #[error("campaign {campaign}: {source}")]
    Campaign {
        campaign: String,
        source: Box<KeyError>,
    },
}

/// For callers that gather start-up problems as text (the shard) and use `?`.
impl From<KeyError> for String {
    fn from(e: KeyError) -> String {
        e.to_string()
    }
}

/// Why one message was not signed (the engine bounces it locally, never sends it
/// unsigned).
#[derive(Debug, Error)]
pub enum SignError {
    #[error("{0}")]
    Header(#[from] canon::HeaderError),
    #[error("the message has no From: field; DKIM must sign one (RFC 6376 §5.4)")]
    NoFrom,
    #[error("selector {selector}: {reason}")]
    Crypto { selector: String, reason: String },
}

/// `dkim_selector` in campaign.toml: one selector or a list, each signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selectors {
    One(String),
    Many(Vec<String>),
}

/// By hand rather than `untagged`, so a wrong value says what is expected.
impl<'de> serde::Deserialize<'de> for Selectors {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Selectors, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Selectors;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a selector or a list of them, as \"s2026\" or [\"s2026-rsa\", \"s2026-ed\"]",
                )
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Selectors, E> {
                Ok(Selectors::One(s.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Selectors, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(Selectors::Many(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl Selectors {
    /// The selectors, in the order given.
    pub fn as_slice(&self) -> &[String] {
        match self {
            Selectors::One(s) => std::slice::from_ref(s),
            Selectors::Many(v) => v,
        }
    }
}

/// One key file of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    pub selector: String,
    pub path: PathBuf,
}

/// Where a domain's key for `selector` is (or would be).
pub fn key_path(dir: &Path, domain: &str, selector: &str) -> PathBuf {
    dir.join(domain.to_ascii_lowercase())
        .join(format!("{selector}.pem"))
}

/// The key files for `domain` under `dir`: those of `selectors` when given (each
/// must exist), else every `*.pem` of the domain's directory, sorted by selector.
/// Signing with all of them is the point: an operator with `s2026-rsa.pem` and
/// `s2026-ed.pem` wants both signatures (RFC 8463 §4).
pub fn find_keys(
    dir: &Path,
    domain: &str,
    selectors: Option<&[String]>,
) -> Result<Vec<KeyFile>, KeyError> {
    if let Some(list) = selectors {
        if list.is_empty() {
            return Err(KeyError::NoSelector);
        }
        if list.len() > SIGNATURES_MAX {
            return Err(KeyError::TooManySelectors(list.len()));
        }
        let mut out: Vec<KeyFile> = Vec::with_capacity(list.len());
        for s in list {
            if out.iter().any(|k| k.selector == *s) {
                return Err(KeyError::DuplicateSelector(s.clone()));
            }
            let path = key_path(dir, domain, s);
            if !path.is_file() {
                return Err(KeyError::Missing {
                    path,
                    dir: dir.to_path_buf(),
                    domain: domain.to_ascii_lowercase(),
                    selector: s.clone(),
                });
            }
            out.push(KeyFile {
                selector: s.clone(),
                path,
            });
        }
        return Ok(out);
    }
    let domain_dir = dir.join(domain.to_ascii_lowercase());
    let mut keys: Vec<KeyFile> = std::fs::read_dir(&domain_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "pem") && p.is_file())
                .filter_map(|p| {
                    Some(KeyFile {
                        selector: p.file_stem()?.to_str()?.to_string(),
                        path: p,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    keys.sort_by(|a, b| a.selector.cmp(&b.selector));
    match keys.len() {
        0 => Err(KeyError::NoKeys {
            domain_dir,
            dir: dir.to_path_buf(),
            domain: domain.to_ascii_lowercase(),
        }),
        n if n > SIGNATURES_MAX => Err(KeyError::TooMany {
            domain: domain.to_ascii_lowercase(),
            domain_dir,
            count: n,
            selectors: keys
                .iter()
                .map(|k| k.selector.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
        _ => Ok(keys),
    }
}

/// The keys a campaign instance signs with, resolved when the engine starts.
#[derive(Debug, Clone)]
pub struct KeyRef {
    /// d=, lower case.
    pub domain: String,
    /// One signature each, in this order (the last one's field ends up on top).
    pub keys: Vec<KeyFile>,
    /// h=: the header fields to sign, a name listed twice over-signs it.
    pub headers: Vec<String>,
}

impl KeyRef {
    /// Parses every key.
    pub fn load(&self) -> Result<Signer, KeyError> {
        Signer::load(&self.domain, &self.keys, &self.headers)
    }
}

/// The keys of every signing campaign instance (its number and settings), each
/// checked to parse; the first problem names the campaign and what to do.
pub fn keys_for<'a>(
    dir: &Path,
    instances: impl Iterator<Item = (u32, &'a crate::message::campaign::Settings)>,
) -> Result<std::collections::HashMap<u32, KeyRef>, KeyError> {
    let mut out = std::collections::HashMap::new();
    for (no, settings) in instances {
        if let Some(k) = key_for(dir, settings)? {
            out.insert(no, k);
        }
    }
    Ok(out)
}

/// The keys for one campaign's settings (None: it does not sign), checked to parse.
pub fn key_for(
    dir: &Path,
    s: &crate::message::campaign::Settings,
) -> Result<Option<KeyRef>, KeyError> {
    if !s.dkim {
        return Ok(None);
    }
    let in_campaign = |e: KeyError| KeyError::Campaign {
        campaign: s.id.clone(),
        source: Box::new(e),
    };
    let keys = find_keys(
        dir,
        &s.from_domain,
        s.dkim_selector.as_ref().map(Selectors::as_slice),
    )
    .map_err(in_campaign)?;
    let k = KeyRef {
        domain: s.from_domain.to_ascii_lowercase(),
        keys,
        headers: s
            .dkim_headers
            .clone()
            .unwrap_or_else(|| DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect()),
    };
    k.load().map_err(in_campaign)?;
    Ok(Some(k))
}

/// A parsed private key.
enum Key {
    /// 2048 to 8192 bits (aws-lc-rs refuses others, as ring did).
    Rsa(RsaKeyPair),
    /// PKCS#8 v1 or v2 (its public key then checked against the private).
    Ed25519(Ed25519KeyPair),
}

impl Key {
    fn read(path: &Path) -> Result<Key, KeyError> {
        let pem = read_key(path)?;
        let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| KeyError::NotPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let rsa = |parsed: Result<RsaKeyPair, _>| {
            parsed.map(Key::Rsa).map_err(|e| KeyError::NotAKey {
                path: path.to_path_buf(),
                reason: format!("not an RSA key of 2048 to 8192 bits: {e}"),
            })
        };
        match &der {
            PrivateKeyDer::Pkcs8(p8) => {
                match Ed25519KeyPair::from_pkcs8_maybe_unchecked(p8.secret_pkcs8_der()) {
                    Ok(k) => Ok(Key::Ed25519(k)),
                    Err(ed) => RsaKeyPair::from_pkcs8(p8.secret_pkcs8_der())
                        .map(Key::Rsa)
                        .map_err(|e| KeyError::NotAKey {
                            path: path.to_path_buf(),
                            reason: format!("as Ed25519: {ed}; as RSA of 2048 to 8192 bits: {e}"),
                        }),
                }
            }
            PrivateKeyDer::Pkcs1(p1) => rsa(RsaKeyPair::from_der(p1.secret_pkcs1_der())),
            _ => Err(KeyError::Ec {
                path: path.to_path_buf(),
            }),
        }
    }

    fn algorithm_name(&self) -> &'static str {
        match self {
            Key::Rsa(_) => "rsa-sha256",
            Key::Ed25519(_) => "ed25519-sha256",
        }
    }

    fn sign(&self, data: SignedData<'_>) -> mail_auth::Result<Vec<u8>> {
        match self {
            Key::Rsa(k) => {
                let mut input = Vec::with_capacity(512);
                data.write(&mut input);
                let mut signature = vec![0; k.public_modulus_len()];
                // PKCS#1 v1.5 is deterministic: the generator is not drawn from.
                k.sign(
                    &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    &input,
                    &mut signature,
                )
                .map_err(|e| mail_auth::Error::Crypto(CryptoError::Library(e.to_string())))?;
                Ok(signature)
            }
            // Ed25519-SHA256 signs the SHA-256 of the data (RFC 8463 §3).
            Key::Ed25519(k) => {
                let mut hash = Sha256::hasher();
                data.write(&mut hash);
                Ok(k.sign(hash.complete().as_ref()).as_ref().to_vec())
            }
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            Key::Rsa(_) => Algorithm::RsaSha256,
            Key::Ed25519(_) => Algorithm::Ed25519Sha256,
        }
    }
}

/// What a signature signs (RFC 6376 §3.7): the canonical header fields in h= order,
/// then the signature's own field, canonical, with b= empty and no final CRLF.
struct SignedData<'a> {
    headers: &'a [u8],
    signature: &'a Signature,
}

impl Writable for SignedData<'_> {
    fn write(self, writer: &mut impl Writer) {
        writer.write(self.headers);
        // mail-auth writes the field in its relaxed form when not `as_header`.
        self.signature.write(writer, false);
    }
}

struct SelectorKey {
    selector: String,
    key: Key,
}

/// Buffers reused from message to message.
#[derive(Default)]
struct Scratch {
    fields: Vec<canon::Field>,
    headers: Vec<u8>,
}

/// A domain's parsed keys, ready to sign: one DKIM-Signature per key.
pub struct Signer {
    domain: String,
    headers: Vec<String>,
    keys: Vec<SelectorKey>,
    scratch: RefCell<Scratch>,
    /// The body hash of the campaign's fixed body, one slot per form (see `Body`):
    /// a list mixing receivers with and without 8BITMIME hashes each form once.
    last_bh: RefCell<[Option<Vec<u8>>; BODY_FORMS]>,
}

/// The forms of a campaign's fixed body (`Body::Fixed`): as rendered, and converted
/// to 7 bit.
pub const BODY_FORMS: usize = 2;

/// Whether a message's body is one the signer has hashed before (see `Signer::sign`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// Rendered per message (merge fields in the body), or unknown: hashed each time.
    Varies,
    /// The campaign's one body, in one of its forms (0 as rendered, 1 converted to
    /// 7 bit for a receiver without 8BITMIME; below BODY_FORMS): hashed once per
    /// form, then reused.
    Fixed(u8),
}

impl Signer {
    /// Reads and parses every key; `headers` is h= (From must be in it).
    pub fn load<S: AsRef<str>>(
        domain: &str,
        keys: &[KeyFile],
        headers: &[S],
    ) -> Result<Signer, KeyError> {
        assert!(!keys.is_empty(), "a signer has a key");
        if keys.len() > SIGNATURES_MAX {
            return Err(KeyError::TooManySelectors(keys.len()));
        }
        let headers: Vec<String> = headers.iter().map(|h| h.as_ref().to_string()).collect();
        if !headers.iter().any(|h| h.eq_ignore_ascii_case("From")) {
            return Err(KeyError::FromNotSigned);
        }
        if let Some(h) = headers
            .iter()
            .find(|h| h.eq_ignore_ascii_case("DKIM-Signature"))
        {
            return Err(KeyError::SignsSignature(h.clone()));
        }
        let keys = keys
            .iter()
            .map(|k| {
                Ok(SelectorKey {
                    selector: k.selector.clone(),
                    key: Key::read(&k.path)?,
                })
            })
            .collect::<Result<Vec<_>, KeyError>>()?;
        Ok(Signer {
            domain: domain.to_ascii_lowercase(),
            headers,
            keys,
            scratch: RefCell::new(Scratch::default()),
            last_bh: RefCell::new([None, None]),
        })
    }

    /// The algorithm of each key, in signing order ("rsa-sha256", "ed25519-sha256").
    pub fn algorithms(&self) -> Vec<&'static str> {
        self.keys.iter().map(|k| k.key.algorithm_name()).collect()
    }

    /// Signs `message` once per key and returns the DKIM-Signature fields (each
    /// with its CRLF, the last key's first) to put in front of it.
    ///
    /// `message` is first made what goes on the wire (`canon::wire_form`: lone CR
    /// and LF made CRLF, a final CRLF added), so the hash is of the octets sent.
    /// `body`: `Fixed(form)` promises the body is the campaign's one body in that
    /// form, so its hash is computed once and reused (a template without merge fields
    /// in its body); `Varies` hashes it every time. The body hash is computed once
    /// for all keys. Errors: a header line that is not a field, no
    /// From field, or the key's signing failing.
    pub fn sign(&self, message: &mut Vec<u8>, body: Body) -> Result<String, SignError> {
        canon::wire_form(message);
        let mut scratch = self.scratch.borrow_mut();
        let Scratch { fields, headers } = &mut *scratch;
        let body_at = canon::parse_header(message, fields)?;
        let mut last = self.last_bh.borrow_mut();
        let slot = match body {
            Body::Fixed(form) => Some(usize::from(form)),
            Body::Varies => None,
        };
        let bh = match slot.and_then(|i| last[i].clone()) {
            Some(bh) => bh,
            None => {
                let mut hasher = <Sha256 as HashImpl>::hasher();
                canon::relaxed_body(&message[body_at..], &mut |piece| hasher.write(piece));
                let bh = hasher.complete().as_ref().to_vec();
                if let Some(i) = slot {
                    last[i] = Some(bh.clone());
                }
                bh
            }
        };
        let h = self.signed_fields(message, fields, headers)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut out = String::new();
        for k in &self.keys {
            let mut sig = Signature {
                v: 1,
                a: k.key.algorithm(),
                d: self.domain.clone(),
                s: k.selector.clone(),
                bh: bh.clone(),
                h: h.clone(),
                t: now,
                ch: Canonicalization::Relaxed,
                cb: Canonicalization::Relaxed,
                ..Signature::default()
            };
            sig.b = k
                .key
                .sign(SignedData {
                    headers,
                    signature: &sig,
                })
                .map_err(|e| SignError::Crypto {
                    selector: k.selector.clone(),
                    reason: e.to_string(),
                })?;
            // Added later, so on top (RFC 6376 §5.6 prepends).
            out.insert_str(0, &sig.to_header());
        }
        Ok(out)
    }

    /// Writes the canonical fields to sign into `out` and returns h=. Each name of
    /// the configured list is signed as often as the message has it (at least once:
    /// an absent field is signed as absent, RFC 6376 §5.4), once more for every
    /// extra time the list names it (over-signing), instances taken from the bottom
    /// up (§5.4.2).
    fn signed_fields(
        &self,
        message: &[u8],
        fields: &[canon::Field],
        out: &mut Vec<u8>,
    ) -> Result<Vec<String>, SignError> {
        out.clear();
        let name_of = |f: &canon::Field| &message[f.name.0..f.name.1];
        if !fields
            .iter()
            .any(|f| name_of(f).eq_ignore_ascii_case(b"From"))
        {
            return Err(SignError::NoFrom);
        }
        let mut h = Vec::with_capacity(self.headers.len() + 2);
        for (i, name) in self.headers.iter().enumerate() {
            if self.headers[..i]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name))
            {
                continue; // counted with its first mention
            }
            let listed = self
                .headers
                .iter()
                .filter(|n| n.eq_ignore_ascii_case(name))
                .count();
            let mut present = 0;
            for f in fields
                .iter()
                .rev()
                .filter(|f| name_of(f).eq_ignore_ascii_case(name.as_bytes()))
            {
                canon::relaxed_field(name_of(f), &message[f.value.0..f.value.1], out);
                present += 1;
            }
            for _ in 0..present.max(1) + listed - 1 {
                h.push(name.clone());
            }
        }
        Ok(h)
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
            let der = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
                .map_err(|e| e.to_string())?;
            let der = der.as_ref();
            let key = Ed25519KeyPair::from_pkcs8(der).map_err(|e| e.to_string())?;
            Ok(NewKey {
                pem: pem_encode("PRIVATE KEY", der),
                txt: format!(
                    "v=DKIM1; k=ed25519; p={}",
                    base64(key.public_key().as_ref())
                ),
            })
        }
    }
}

/// The PEM of the private key at `path`, refused when others may read it or it is
/// not ours (host/secrets.rs).
fn read_key(path: &Path) -> Result<Vec<u8>, crate::host::secrets::SecretError> {
    use crate::host::secrets::{read, Secret, KEY_OCTETS_MAX};
    read(path, Secret::DkimKey, KEY_OCTETS_MAX)
}

/// The DNS TXT value publishing the public half of the private key at `path`.
pub fn public_txt(path: &Path) -> Result<String, String> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
    let pem = read_key(path).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: not a PEM private key ({e})", path.display()))?;
    let rsa = match &der {
        PrivateKeyDer::Pkcs8(p8) => {
            if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(p8.secret_pkcs8_der()) {
                let public = base64(k.public_key().as_ref());
                return Ok(format!("v=DKIM1; k=ed25519; p={public}"));
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

    /// The unfolded value of `tag` in the first DKIM-Signature field of `fields`.
    fn tag(fields: &str, tag: &str) -> String {
        let first = fields.split("\r\nDKIM-Signature:").next().unwrap();
        first
            .replace(['\r', '\n', '\t', ' '], "")
            .split(';')
            .find_map(|t| t.strip_prefix(&format!("{tag}=")).map(str::to_string))
            .unwrap()
    }

    /// A signer with new keys of `kinds` for news.test, selectors k0, k1...; and
    /// the directory to remove.
    fn signer(name: &str, kinds: &[KeyType], headers: &[&str]) -> (Signer, PathBuf) {
        let dir = std::env::temp_dir().join(format!("volley-dkim-{name}-{}", std::process::id()));
        let mut keys = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let path = key_path(&dir, "news.test", &format!("k{i}"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, generate(*kind).unwrap().pem).unwrap();
            // As `volley dkim keygen` writes it: others may not read a key.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            keys.push(KeyFile {
                selector: format!("k{i}"),
                path,
            });
        }
        (Signer::load("News.Test", &keys, headers).unwrap(), dir)
    }

    fn sign(s: &Signer, msg: &str, body: Body) -> String {
        s.sign(&mut msg.as_bytes().to_vec(), body).unwrap()
    }

    #[test]
    fn a_body_hash_is_reused_only_when_asked() {
        let (s, dir) = signer("reuse", &[KeyType::Ed25519], DEFAULT_HEADERS);
        let a = sign(
            &s,
            "From: a@news.test\r\nTo: x@y.test\r\n\r\nsame\r\n",
            Body::Fixed(0),
        );
        let b = sign(
            &s,
            "From: a@news.test\r\nTo: z@y.test\r\n\r\nsame\r\n",
            Body::Fixed(0),
        );
        assert_eq!(tag(&a, "bh"), tag(&b, "bh"));
        let c = sign(&s, "From: a@news.test\r\n\r\nother\r\n", Body::Varies);
        assert_ne!(tag(&a, "bh"), tag(&c, "bh"));
        // Another form of the body has its own slot: it does not displace the first's.
        let e = sign(&s, "From: a@news.test\r\n\r\nseven\r\n", Body::Fixed(1));
        assert_ne!(tag(&a, "bh"), tag(&e, "bh"));
        let f = sign(&s, "From: a@news.test\r\n\r\nsame\r\n", Body::Fixed(0));
        assert_eq!(tag(&a, "bh"), tag(&f, "bh"));
        // The promise is the contract: a Fixed(0) call reuses form 0's hash.
        let d = sign(&s, "From: a@news.test\r\n\r\nnot same\r\n", Body::Fixed(0));
        assert_eq!(tag(&a, "bh"), tag(&d, "bh"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_issues_body_is_hashed_as_the_rfc_says() {
        use base64::Engine;
        let (s, dir) = signer("issue13", &[KeyType::Ed25519], DEFAULT_HEADERS);
        let mut msg = b"From: a@news.test\n\nHello!\n  \n\n\n".to_vec();
        let fields = s.sign(&mut msg, Body::Varies).unwrap();
        let want = ring::digest::digest(&ring::digest::SHA256, b"Hello!\r\n");
        let want = base64::engine::general_purpose::STANDARD.encode(want.as_ref());
        assert_eq!(tag(&fields, "bh"), want);
        // And the message was made what goes on the wire.
        assert_eq!(msg, b"From: a@news.test\r\n\r\nHello!\r\n  \r\n\r\n\r\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn each_key_signs_once_with_the_last_on_top_and_one_body_hash() {
        let (s, dir) = signer("dual", &[KeyType::Rsa, KeyType::Ed25519], DEFAULT_HEADERS);
        assert_eq!(s.algorithms(), ["rsa-sha256", "ed25519-sha256"]);
        let f = sign(&s, "From: a@news.test\r\n\r\nHi\r\n", Body::Varies);
        let starts: Vec<usize> = f.match_indices("DKIM-Signature:").map(|m| m.0).collect();
        assert_eq!(starts.len(), 2, "{f}");
        let (top, below) = f.split_at(starts[1]);
        assert!(
            top.contains("a=ed25519-sha256") && top.contains("s=k1;"),
            "{top}"
        );
        assert!(
            below.contains("a=rsa-sha256") && below.contains("s=k0;"),
            "{below}"
        );
        assert!(top.contains("d=news.test;"));
        assert_eq!(tag(top, "bh"), tag(below, "bh"));
        // Neither signs DKIM-Signature, and l= is never used.
        assert!(!tag(top, "h").to_ascii_lowercase().contains("dkim"));
        let tags = f.replace(['\r', '\n', '\t', ' '], "");
        assert!(!tags.split(';').any(|t| t.starts_with("l=")), "{f}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn h_lists_every_instance_absent_fields_and_over_signed_ones() {
        let (s, dir) = signer("h", &[KeyType::Ed25519], &["From", "From", "To", "Cc"]);
        let f = sign(
            &s,
            "To: a@x.test\r\nFrom: n@news.test\r\nTO: b@x.test\r\n\r\n",
            Body::Varies,
        );
        // From once and over-signed, both To fields, Cc signed as absent.
        assert_eq!(tag(&f, "h"), "From:From:To:To:Cc");
        let mut scratch = Vec::new();
        let msg = b"To: a@x.test\r\nFrom: n@news.test\r\nTO: b@x.test\r\n\r\n";
        let mut fields = Vec::new();
        canon::parse_header(msg, &mut fields).unwrap();
        s.signed_fields(msg, &fields, &mut scratch).unwrap();
        // Bottom-up: the lower To first (RFC 6376 §5.4.2).
        assert_eq!(
            String::from_utf8(scratch).unwrap(),
            "from:n@news.test\r\nto:b@x.test\r\nto:a@x.test\r\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn messages_and_lists_that_cannot_be_signed_say_why() {
        let (s, dir) = signer("refuse", &[KeyType::Ed25519], DEFAULT_HEADERS);
        let e = s
            .sign(&mut b"To: a@x.test\r\n\r\nbody\r\n".to_vec(), Body::Varies)
            .unwrap_err();
        assert!(matches!(e, SignError::NoFrom), "{e}");
        let e = s
            .sign(
                &mut b"From: a@news.test\r\nbroken\r\n\r\n".to_vec(),
                Body::Varies,
            )
            .unwrap_err();
        assert!(e.to_string().contains("header line 2"), "{e}");
        let keys = [KeyFile {
            selector: "k0".into(),
            path: key_path(&dir, "news.test", "k0"),
        }];
        let e = Signer::load("news.test", &keys, &["To"]).err().unwrap();
        assert!(matches!(e, KeyError::FromNotSigned), "{e}");
        let e = Signer::load("news.test", &keys, &["From", "dkim-signature"])
            .err()
            .unwrap();
        assert!(matches!(e, KeyError::SignsSignature(_)), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_selector_every_key_of_the_domain_signs() {
        let dir = std::env::temp_dir().join(format!("volley-dkim-find-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let e = find_keys(&dir, "news.test", None).unwrap_err();
        assert!(e.to_string().contains("volley dkim keygen"), "{e}");
        for s in ["s2026-rsa", "s2026-ed"] {
            let p = key_path(&dir, "news.test", s);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "").unwrap();
        }
        let sel = |k: Vec<KeyFile>| k.into_iter().map(|k| k.selector).collect::<Vec<_>>();
        assert_eq!(
            sel(find_keys(&dir, "News.Test", None).unwrap()),
            ["s2026-ed", "s2026-rsa"]
        );
        let one = vec!["s2026-rsa".to_string()];
        assert_eq!(sel(find_keys(&dir, "news.test", Some(&one)).unwrap()), one);
        let twice = vec!["s2026-rsa".to_string(), "s2026-rsa".to_string()];
        assert!(matches!(
            find_keys(&dir, "news.test", Some(&twice)),
            Err(KeyError::DuplicateSelector(_))
        ));
        assert!(matches!(
            find_keys(&dir, "news.test", Some(&[])),
            Err(KeyError::NoSelector)
        ));
        let missing = vec!["old".to_string()];
        let e = find_keys(&dir, "news.test", Some(&missing)).unwrap_err();
        assert!(e.to_string().contains("--selector old"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dkim_selector_is_a_string_or_a_list() {
        #[derive(serde::Deserialize)]
        struct T {
            dkim_selector: Selectors,
        }
        let one: T = toml::from_str("dkim_selector = \"s1\"").unwrap();
        assert_eq!(one.dkim_selector.as_slice(), ["s1"]);
        let two: T = toml::from_str("dkim_selector = [\"r\", \"e\"]").unwrap();
        assert_eq!(two.dkim_selector.as_slice(), ["r", "e"]);
        let e = toml::from_str::<T>("dkim_selector = 2026").err().unwrap();
        assert!(
            e.to_string().contains("a selector or a list of them"),
            "{e}"
        );
    }

    #[test]
    fn long_records_are_split_for_dns() {
        let txt = "x".repeat(400);
        let line = zone_line("news.test", "s1", &txt);
        assert!(line.starts_with("s1._domainkey.news.test. 3600 IN TXT ( \""));
        assert_eq!(line.matches('"').count(), 4);
    }
}
