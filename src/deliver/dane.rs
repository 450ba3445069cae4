//! DANE for SMTP (RFC 7672, with RFC 7671's updates): an MX host's TLSA records,
//! looked up with DNSSEC validation, and the certificate check they make.
//!
//! No downgrade: a host whose address or TLSA lookup fails validation (bogus) or
//! fails outright (SERVFAIL, timeout) is not tried at all, rather than tried without
//! DANE (RFC 7672 §2.2). A host with usable TLSA records gets mail only over
//! STARTTLS with a certificate those records match; its MTA-STS policy, if any, does
//! not apply to it (RFC 8461 §2). Only where DNSSEC proves there is nothing to
//! verify (an insecure zone, no TLSA records) does the host get ordinary TLS.

use crate::deliver::tls;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::fmt;
use std::sync::Arc;

/// Certificate usage 2, DANE-TA: the record names a trust anchor of the chain
/// the server presents (RFC 6698 §2.1.1; RFC 7218's name).
pub const DANE_TA: u8 = 2;
/// Certificate usage 3, DANE-EE: the record names the server's own certificate
/// or key (RFC 6698 §2.1.1; RFC 7218's name).
pub const DANE_EE: u8 = 3;

/// One TLSA record (RFC 6698 §2.1): usage, selector, matching type, data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    /// 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE.
    pub usage: u8,
    /// 0 the full certificate, 1 its SubjectPublicKeyInfo.
    pub selector: u8,
    /// 0 the data itself, 1 its SHA-256, 2 its SHA-512.
    pub matching: u8,
    /// The certificate association data: what `selector` selects, as `matching`
    /// gives it (DER, or a 32- or 64-octet digest).
    pub data: Vec<u8>,
}

impl Tlsa {
    /// Whether SMTP may use it: DANE-TA or DANE-EE, with a known selector and
    /// matching type, and a digest of its type's length. PKIX-TA and PKIX-EE are
    /// unusable for SMTP (RFC 7672 §3.1.3); so is a malformed record (RFC 7671 §4).
    pub fn usable(&self) -> bool {
        let length_ok = match self.matching {
            0 => !self.data.is_empty(),
            1 => self.data.len() == 32,
            2 => self.data.len() == 64,
            _ => false,
        };
        matches!(self.usage, DANE_TA | DANE_EE) && self.selector <= 1 && length_ok
    }

    /// Whether `cert` (DER) is what this record names: the certificate or its
    /// SubjectPublicKeyInfo, itself or hashed (RFC 6698 §2.1.2-2.1.3).
    pub fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let selected: Vec<u8> = match self.selector {
            0 => cert.to_vec(),
            1 => match spki_of(cert) {
                Ok(spki) => spki,
                Err(_) => return false,
            },
            _ => return false,
        };
        let digest = |alg| ring::digest::digest(alg, &selected).as_ref().to_vec();
        let compared = match self.matching {
            0 => selected,
            1 => digest(&ring::digest::SHA256),
            2 => digest(&ring::digest::SHA512),
            _ => return false,
        };
        // Not secret: a plain comparison.
        compared == self.data
    }

    /// The DANE-EE record naming `cert`'s key by its SHA-256 (3 1 1), the form
    /// RFC 7671 §5.1 recommends: it still matches a certificate renewed with the
    /// same key. Errors: the certificate does not parse, as webpki says.
    pub fn dane_ee(cert: &CertificateDer<'_>) -> Result<Tlsa, String> {
        let spki = spki_of(cert)?;
        Ok(Tlsa {
            usage: DANE_EE,
            selector: 1,
            matching: 1,
            data: ring::digest::digest(&ring::digest::SHA256, &spki)
                .as_ref()
                .to_vec(),
        })
    }
}

/// The SubjectPublicKeyInfo of `cert`, DER. Errors: it does not parse.
fn spki_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, String> {
    let anchor = webpki::anchor_from_trusted_cert(cert).map_err(|e| e.to_string())?;
    Ok(webpki::spki_for_anchor(&anchor).as_ref().to_vec())
}

/// As written in a zone file: `3 1 1 0A1B…`.
impl fmt::Display for Tlsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} ", self.usage, self.selector, self.matching)?;
        for b in &self.data {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

/// What DANE asks of one MX host.
#[derive(Debug, Clone, Default)]
pub enum Dane {
    /// No DANE for it: DANE is off, or DNSSEC proves its addresses or its TLSA
    /// records insecure, or that it has none. TLS as the other rules say.
    #[default]
    None,
    /// Secure TLSA records: STARTTLS is required, and the certificate must match a
    /// usable one. With none usable, STARTTLS is still required but the certificate
    /// is not checked (RFC 7672 §2.2, as Postfix's "encrypt").
    Tlsa(Arc<DaneHost>),
    /// The lookup failed validation or did not complete: the host is not tried
    /// (deferred), never tried without DANE. The reason, as a sentence.
    Failed(String),
}

impl Dane {
    /// Whether DANE authenticates the host: it has secure TLSA records and one is
    /// usable.
    pub fn authenticates(&self) -> bool {
        matches!(self, Dane::Tlsa(d) if d.verifies())
    }
}

/// An MX host's secure TLSA records and the TLS settings that check them.
pub struct DaneHost {
    /// The MX host name: the TLSA base domain and the name a DANE-TA chain must
    /// be issued for (RFC 7672 §3.2.2).
    pub host: String,
    /// Every record of the RRset, usable or not, for logs and `tls show`.
    pub records: Vec<Tlsa>,
    /// Client settings whose certificate check is these records' (one per host, so
    /// its session cache gives resumption across connections).
    pub config: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for DaneHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaneHost")
            .field("host", &self.host)
            .field("records", &self.records)
            .finish()
    }
}

impl DaneHost {
    /// The settings for `host` with its secure TLSA RRset `records`.
    pub fn new(host: &str, records: Vec<Tlsa>) -> DaneHost {
        let usable: Vec<Tlsa> = records.iter().filter(|t| t.usable()).cloned().collect();
        let config = if usable.is_empty() {
            tls::client_config(false, &[])
        } else {
            let provider = tls::provider();
            let dane = DaneVerifier {
                host: host.to_string(),
                records: usable,
                provider: provider.clone(),
            };
            let check = Box::new(
                move |ee: &CertificateDer<'_>, chain: &[CertificateDer<'_>], now| {
                    dane.check(ee, chain, now)
                },
            );
            tls::client_config_verified_by(Arc::new(tls::CheckedBy::new(provider, check)))
        };
        DaneHost {
            host: host.to_string(),
            records,
            config,
        }
    }

    /// Whether any record can verify a certificate (else: TLS without a check).
    pub fn verifies(&self) -> bool {
        self.records.iter().any(Tlsa::usable)
    }

    /// The records, as `tls show` and the logs give them: `3 1 1 AB…; 2 0 1 CD…`.
    pub fn describe(&self) -> String {
        let all: Vec<String> = self.records.iter().map(Tlsa::to_string).collect();
        all.join("; ")
    }
}

/// A certificate that matches none of the host's TLSA records (RFC 8460's
/// `tlsa-invalid`).
#[derive(Debug)]
pub struct TlsaMismatch {
    /// The MX host name.
    pub host: String,
    /// How many usable records were tried.
    pub usable: usize,
    /// The record that would name the key presented (`3 1 1 HEX`), to compare
    /// with the published ones; None when the certificate does not parse.
    pub presented: Option<String>,
    /// Why a DANE-TA record that matched a certificate in the chain still failed.
    pub chain: Option<String>,
}

impl fmt::Display for TlsaMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "matches none of the {} usable TLSA records of {} (RFC 7672 §3)",
            self.usable, self.host
        )?;
        if let Some(p) = &self.presented {
            write!(f, "; the key it presented is {p}")?;
        }
        if let Some(why) = &self.chain {
            write!(f, "; the chain to its DANE-TA certificate failed: {why}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TlsaMismatch {}

/// Checks a server's certificate against TLSA records (RFC 7672 §3.1): DANE-EE
/// matches the end-entity certificate, with no name or date check (§3.1.1);
/// DANE-TA matches a certificate of the chain presented, which then must be a
/// valid chain for the MX host name (§3.1.2, §3.2.2). `tls::CheckedBy` checks the
/// handshake signatures as usual.
struct DaneVerifier {
    host: String,
    records: Vec<Tlsa>,
    provider: Arc<CryptoProvider>,
}

impl DaneVerifier {
    /// The check: a DANE-EE record matching the end-entity certificate, or a
    /// DANE-TA record matching a certificate of the chain that then leads to the
    /// end-entity for the MX host name. Err: a [`TlsaMismatch`], with why the
    /// chain failed when one matched.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let ee = self.records.iter().filter(|t| t.usage == DANE_EE);
        if ee.clone().any(|t| t.matches(end_entity)) {
            return Ok(());
        }
        let mut chain = None;
        for t in self.records.iter().filter(|t| t.usage == DANE_TA) {
            for anchor in intermediates.iter().filter(|c| t.matches(c)) {
                match self.chain_to(anchor, end_entity, intermediates, now) {
                    Ok(()) => return Ok(()),
                    Err(why) => chain = Some(why),
                }
            }
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(TlsaMismatch {
                host: self.host.clone(),
                usable: self.records.len(),
                presented: Tlsa::dane_ee(end_entity).ok().map(|t| t.to_string()),
                chain,
            }))),
        ))
    }

    /// The chain from `end_entity` through `intermediates` to `anchor`, valid now
    /// for the MX host name. Errors: rustls's, as a phrase.
    fn chain_to(
        &self,
        anchor: &CertificateDer<'_>,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), String> {
        let anchor = webpki::anchor_from_trusted_cert(anchor).map_err(|e| e.to_string())?;
        let roots = rustls::RootCertStore {
            roots: vec![anchor.to_owned()],
        };
        let name = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| e.to_string())?
        .verify_server_cert(end_entity, intermediates, &name, &[], now)
        .map(|_| ())
        .map_err(|e| e.to_string())
    }
}

/// Whether a TLS error is a certificate that matched no TLSA record.
pub fn is_tlsa_mismatch(e: &rustls::Error) -> bool {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
            o.0.downcast_ref::<TlsaMismatch>().is_some()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(b: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, b)
            .as_ref()
            .to_vec()
    }

    #[test]
    fn a_record_matches_the_certificate_or_its_key_by_each_matching_type() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["mx.example.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().clone();
        let spki = key.public_key_der();
        let rec = |selector, matching, data| Tlsa {
            usage: DANE_EE,
            selector,
            matching,
            data,
        };
        assert!(rec(0, 0, der.to_vec()).matches(&der));
        assert!(rec(0, 1, sha256(&der)).matches(&der));
        let sha512 = ring::digest::digest(&ring::digest::SHA512, &der);
        assert!(rec(0, 2, sha512.as_ref().to_vec()).matches(&der));
        assert!(rec(1, 0, spki.clone()).matches(&der));
        assert!(rec(1, 1, sha256(&spki)).matches(&der));
        // Another key's, a selector or matching type unknown: no match.
        let other = rcgen::KeyPair::generate().unwrap().public_key_der();
        assert!(!rec(1, 1, sha256(&other)).matches(&der));
        assert!(!rec(2, 1, sha256(&spki)).matches(&der));
        assert!(!rec(1, 3, sha256(&spki)).matches(&der));
        assert_eq!(Tlsa::dane_ee(&der).unwrap(), rec(1, 1, sha256(&spki)));
    }

    #[test]
    fn only_dane_usages_with_known_parameters_are_usable() {
        let rec = |usage, selector, matching| Tlsa {
            usage,
            selector,
            matching,
            data: vec![1; 32],
        };
        assert!(rec(3, 1, 1).usable());
        assert!(rec(2, 0, 1).usable());
        assert!(rec(2, 0, 0).usable());
        assert!(!rec(0, 1, 1).usable(), "PKIX-TA");
        assert!(!rec(1, 1, 1).usable(), "PKIX-EE");
        assert!(!rec(3, 2, 1).usable());
        assert!(!rec(3, 1, 3).usable());
        assert!(!rec(3, 1, 2).usable(), "a SHA-512 record of 32 octets");
        assert_eq!(
            rec(3, 1, 1).to_string(),
            format!("3 1 1 {}", "01".repeat(32))
        );
    }
}
