//! Outbound TLS settings: rustls with ring, TLS 1.2 and 1.3 only, one client config
//! per shard so its session cache gives resumption to every connection to a host.
//!
//! Opportunistic TLS (RFC 7435) does not verify certificates: most MX certificates
//! would fail, and an unverified TLS session still beats clear text. With `verify`
//! (a rule's `tls_verify`, an MTA-STS policy in enforce mode), the MX host name is
//! checked against the Mozilla roots shipped by webpki-roots (not the system store, so
//! behaviour does not depend on the host's ca-certificates) and the operator's own
//! (`--tls-roots`, for a private CA and for tests). An MX host with DANE TLSA
//! records gets settings of its own, checked against those records (dane.rs).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;

/// The client settings: certificates verified (webpki-roots and `extra_roots`) or not.
pub fn client_config(
    verify: bool,
    extra_roots: &[CertificateDer<'static>],
) -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3");
    let cfg = if verify {
        builder
            .with_root_certificates(roots(extra_roots))
            .with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CheckedBy::any(provider)))
            .with_no_client_auth()
    };
    Arc::new(cfg)
}

/// The client settings with `verifier` as the certificate check (DANE's, dane.rs).
pub fn client_config_verified_by(
    verifier: Arc<dyn ServerCertVerifier>,
) -> Arc<rustls::ClientConfig> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(cfg)
}

/// Seals `plain` (pieces of the session's output, in order) into TLS records
/// appended to `wire`. rustls's vectored write fills each record (up to 16 KiB,
/// RFC 8446 §5.1) from several pieces, so they are never joined first: the
/// encryption is the one copy. `conn` must have no buffer limit
/// (`set_buffer_limit(None)`, as the engine's connections have): with one, rustls
/// would take part and this would fail. Errors: rustls's (an earlier fatal TLS
/// error), or `WriteZero` when it takes nothing.
pub fn seal(
    conn: &mut rustls::ClientConnection,
    plain: &[Vec<u8>],
    wire: &mut Vec<u8>,
) -> std::io::Result<()> {
    use std::io::{IoSlice, Write};
    let mut slices: Vec<IoSlice> = plain.iter().map(|p| IoSlice::new(p)).collect();
    let mut left = &mut slices[..];
    while !left.is_empty() {
        match conn.writer().write_vectored(left)? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => IoSlice::advance_slices(&mut left, n),
        }
    }
    while conn.wants_write() {
        conn.write_tls(wire)?;
    }
    Ok(())
}

/// ring, its AES-128-GCM suites first.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first, as Go and BoringSSL order it; receivers' TLS (OpenSSL's by
    // default, rustls's) takes the client's order. The AES-256 suites' SHA-384 key
    // schedule has no x86 instructions; with AES-256's extra rounds it cost volley 12%
    // more CPU at one message per connection, and the receiver 14%.
    provider
        .cipher_suites
        .sort_by_key(|s| !is_aes128_gcm(s.suite()));
    Arc::new(provider)
}

/// A certificate check against webpki-roots and `extra_roots`, the one verified
/// sessions make, for use after a handshake that did not verify.
pub fn verifier(
    extra_roots: &[CertificateDer<'static>],
) -> Arc<rustls::client::WebPkiServerVerifier> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(extra_roots)),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("webpki-roots are valid trust anchors")
}

/// The Mozilla roots of webpki-roots and `extra`.
pub fn roots(extra: &[CertificateDer<'static>]) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Each was checked when the file was read.
    let _ = roots.add_parsable_certificates(extra.iter().cloned());
    roots
}

/// The certificates of a PEM file of CA certificates (`--tls-roots`, a webhook's
/// `ca_file`). Errors, as a phrase: unreadable, a certificate rustls refuses as a
/// trust anchor, or no certificate in it.
pub fn read_roots(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| e.to_string())? {
        let cert = cert.map_err(|e| e.to_string())?;
        let mut check = rustls::RootCertStore::empty();
        check
            .add(cert.clone())
            .map_err(|e| format!("a certificate in it is refused ({e})"))?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certs)
}

fn is_aes128_gcm(s: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as C;
    matches!(
        s,
        C::TLS13_AES_128_GCM_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

/// A certificate check of volley's own, given the end-entity certificate, the
/// intermediates the server sent and the time; Err: why the certificate is refused.
pub type CertificateCheck = dyn Fn(&CertificateDer<'_>, &[CertificateDer<'_>], UnixTime) -> Result<(), rustls::Error>
    + Send
    + Sync;

/// A verifier making volley's own certificate check (none under opportunistic TLS,
/// the TLSA records' under DANE) while checking the handshake signatures as usual,
/// so the session is encrypted to whoever holds the key the server presented.
pub struct CheckedBy {
    provider: Arc<CryptoProvider>,
    check: Box<CertificateCheck>,
}

impl CheckedBy {
    /// A verifier whose certificate check is `check`.
    pub fn new(provider: Arc<CryptoProvider>, check: Box<CertificateCheck>) -> CheckedBy {
        CheckedBy { provider, check }
    }

    /// A verifier that accepts any certificate.
    fn any(provider: Arc<CryptoProvider>) -> CheckedBy {
        CheckedBy::new(provider, Box::new(|_, _, _| Ok(())))
    }
}

impl std::fmt::Debug for CheckedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckedBy(volley's own certificate check)")
    }
}

impl ServerCertVerifier for CheckedBy {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        (self.check)(end_entity, intermediates, now).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(msg, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(msg, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS settings for a listener (the submission listeners, the load tool's sink):
/// the PEM certificate chain and key in `files`, or without them a self-signed
/// certificate for `hostname` made now (clients that verify will refuse it).
/// Errors name the file that could not be read; a key the group or others may read,
/// or that another user owns, is refused (host/secrets.rs).
pub fn server_config(
    hostname: &str,
    files: Option<(&std::path::Path, &std::path::Path)>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let (certs, key) = match files {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("tls_cert {}: {e}", cert.display()))?;
            anyhow::ensure!(
                !certs.is_empty(),
                "tls_cert {}: no certificate in it; give the PEM certificate chain",
                cert.display()
            );
            // Refused when others may read it, as ssh refuses such a key (host/secrets.rs).
            let pem = crate::host::secrets::read(
                key,
                crate::host::secrets::Secret::TlsKey,
                crate::host::secrets::KEY_OCTETS_MAX,
            )?;
            let key = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| anyhow::anyhow!("tls_key {}: {e}", key.display()))?;
            (certs, key)
        }
        None => {
            let ck = rcgen::generate_simple_self_signed(vec![hostname.to_string()])?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
            (vec![ck.cert.der().clone()], key)
        }
    };
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| anyhow::anyhow!("tls_cert / tls_key: {e}"))?;
    Ok(Arc::new(cfg))
}
