//! volley's own failure reasons as sentences an operator can act on: what failed and
//! where, the underlying error in parentheses, then what to do. Delivery and DNS turn
//! their typed errors (io, rustls, webpki, resolver) into a [`Sentence`] here; the
//! text goes into the reply the accounting log records. A receiver's own replies never
//! pass through here: they are logged verbatim.
//!
//! The sentences are also read by the reply classifier (with the code volley gives
//! them), so they stay clear of the words its rules look for ("policy", "permission",
//! "blocked", "too many", ...): a test holds every sentence to the class its code alone
//! would give, except the TLS ones, which must read as `policy` under 4.7.x.

use crate::deliver::dane::TlsaMismatch;
use std::fmt;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

/// A failure reason in three parts, shown as "WHAT (CAUSE); ACTION".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentence {
    /// What failed, naming the host and address when known.
    pub what: String,
    /// The underlying error as its library names it (`CaUsedAsEndEntity`,
    /// `ConnectionRefused, os error 111`), for searching and bug reports.
    pub cause: String,
    /// What the operator, or the receiver's postmaster, can do about it.
    pub action: String,
}

impl fmt::Display for Sentence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}); {}", self.what, self.cause, self.action)
    }
}

fn sentence(
    what: impl Into<String>,
    cause: impl Into<String>,
    action: impl Into<String>,
) -> Sentence {
    Sentence {
        what: what.into(),
        cause: cause.into(),
        action: action.into(),
    }
}

/// The MX host volley was talking to: its name from DNS and the address connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer<'a> {
    pub host: &'a str,
    pub addr: SocketAddr,
}

impl fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]", self.host, self.addr)
    }
}

/// "mx.example.com [192.0.2.1:25]", or "the receiver" where the reason goes into a
/// record that names the host in its own fields.
fn who(peer: Option<Peer>) -> String {
    peer.map_or_else(|| "the receiver".to_string(), |p| p.to_string())
}

/// What volley was doing on the network when the operating system said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Binding the outgoing socket to a source address of the pool.
    Bind(IpAddr),
    /// Opening the TCP connection.
    Connect,
    /// Reading from an open connection.
    Read,
    /// Writing to an open connection.
    Write,
}

/// The TLS settings for the destination, which decide the advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsPolicy {
    /// `tls = "required"`: no clear text; otherwise a failed handshake is retried in clear.
    pub required: bool,
    /// `tls_verify`: the certificate is checked against the Mozilla roots.
    pub verify: bool,
    /// Both come from the domain's MTA-STS policy in enforce mode (RFC 8461), not
    /// from the operator's rules.
    pub mta_sts: bool,
    /// Both come from the MX host's DNSSEC-signed TLSA records (RFC 7672), which
    /// take precedence over MTA-STS.
    pub dane: bool,
}

/// What ended a TLS handshake before it completed.
#[derive(Debug)]
pub enum HandshakeError {
    /// rustls refused what the receiver sent, or the receiver sent an alert.
    Tls(rustls::Error),
    /// The socket failed under the handshake.
    Io(Step, std::io::Error),
    /// The handshake did not finish within this time.
    TimedOut(Duration),
    /// The receiver closed the connection in the middle of it.
    Closed,
}

/// "ConnectionRefused, os error 111": the kind as Rust names it, with the errno.
/// EPERM and EACCES keep their C names: "PermissionDenied" would read to the reply
/// classifier as a receiver's policy refusal.
fn io_cause(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n @ libc::EPERM) => format!("EPERM, os error {n}"),
        Some(n @ libc::EACCES) => format!("EACCES, os error {n}"),
        Some(n) => format!("{:?}, os error {n}", e.kind()),
        None => format!("{:?}: {e}", e.kind()),
    }
}

const RETRY_LATER: &str = "volley tries the next MX host, then retries later";

/// Why a TCP connection to `peer` could not be opened (`step` is Bind or Connect).
pub fn connect_failed(peer: Peer, step: Step, e: &std::io::Error) -> Sentence {
    let port = peer.addr.port();
    let cause = io_cause(e);
    if let Step::Bind(src) = step {
        return match e.kind() {
            ErrorKind::AddrNotAvailable => sentence(
                format!("volley cannot send from the source address {src} to {peer}: it is not an address of this machine"),
                cause,
                "add it to a network interface, or take it out of the pool's sources in the shaping rules",
            ),
            ErrorKind::AddrInUse => sentence(
                format!("volley cannot bind the source address {src} to connect to {peer}: no local port is free on it"),
                cause,
                "lower max_connections for this source or add source addresses to the pool",
            ),
            _ => sentence(
                format!("volley cannot bind the source address {src} to connect to {peer}"),
                cause,
                "check that the address is configured on this machine; volley retries later",
            ),
        };
    }
    let (what, action) = match e.kind() {
        ErrorKind::ConnectionRefused => (
            format!("connection to {peer} refused"),
            format!("nothing listens on port {port} there, or a firewall rejects it; {RETRY_LATER}"),
        ),
        ErrorKind::TimedOut => (
            format!("connection to {peer} timed out"),
            format!("the host is down, a firewall drops the packets, or this network does not let outbound port {port} through (common at cloud providers); {RETRY_LATER}"),
        ),
        ErrorKind::HostUnreachable => (
            format!("{peer} is unreachable"),
            format!("no route to that host from this machine: check its routing, and the MX's address in DNS; {RETRY_LATER}"),
        ),
        ErrorKind::NetworkUnreachable => (
            format!("the network of {peer} is unreachable"),
            format!("this machine has no route to it (an IPv6 address on a host without IPv6?): check its routing; {RETRY_LATER}"),
        ),
        ErrorKind::AddrNotAvailable => (
            format!("no local port is left to connect to {peer}"),
            format!("this machine ran out of ephemeral ports: widen net.ipv4.ip_local_port_range or lower max_connections; {RETRY_LATER}"),
        ),
        ErrorKind::PermissionDenied => (
            format!("this machine's firewall stopped the connection to {peer}"),
            format!("check the local nftables/iptables rules for outbound port {port}; {RETRY_LATER}"),
        ),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => (
            format!("{peer} reset the connection as it was opened"),
            format!("the receiver or a middlebox dropped it; {RETRY_LATER}"),
        ),
        _ => (
            format!("connection to {peer} failed"),
            RETRY_LATER.to_string(),
        ),
    };
    sentence(what, cause, action)
}

/// volley's own connect timeout ran out before the TCP handshake finished.
pub fn connect_timed_out(peer: Peer, after: Duration) -> Sentence {
    sentence(
        format!("connection to {peer} not established within {}", humantime::format_duration(after)),
        "connect_timeout",
        format!("the host is down, a firewall drops the packets, or this network does not let outbound port {} through (common at cloud providers); {RETRY_LATER}", peer.addr.port()),
    )
}

/// Why an established connection broke on a read or a write. A TLS error on the
/// connection (rustls's, wrapped in the io::Error) is worded as one.
pub fn connection_broke(peer: Option<Peer>, step: Step, e: &std::io::Error) -> Sentence {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return tls_failed(peer, tls, None);
    }
    let who = who(peer);
    let doing = match step {
        Step::Write => "while volley was writing",
        _ => "while volley was reading",
    };
    let cause = io_cause(e);
    let again = "volley sends the messages in flight again on a new connection";
    let (what, action) = match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => (
            format!("{who} reset the connection {doing}"),
            format!("the receiver crashed or dropped the session, or a middlebox cut it; {again}"),
        ),
        ErrorKind::BrokenPipe => (
            format!("{who} had closed the connection {doing}"),
            format!("the receiver hung up without a reply; {again}"),
        ),
        ErrorKind::UnexpectedEof => (
            format!("{who} closed the connection in the middle of a reply"),
            again.to_string(),
        ),
        ErrorKind::TimedOut => (
            format!("the connection to {who} stopped answering {doing}"),
            format!("the host went down or the network path broke; {again}"),
        ),
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => (
            format!("{who} became unreachable {doing}"),
            format!("check this machine's routing; {again}"),
        ),
        _ => (
            format!("the connection to {who} failed {doing}"),
            again.to_string(),
        ),
    };
    sentence(what, cause, action)
}

/// Why a TLS handshake with `peer` failed.
pub fn handshake_failed(peer: Peer, e: &HandshakeError, policy: TlsPolicy) -> Sentence {
    match e {
        HandshakeError::Tls(e) => tls_failed(Some(peer), e, Some(policy)),
        HandshakeError::Io(step, e) => {
            let mut s = connection_broke(Some(peer), *step, e);
            s.what.push_str(" during the TLS handshake");
            s.action = after_tls(policy, "the receiver's TLS may be failing");
            s
        }
        HandshakeError::TimedOut(after) => sentence(
            format!(
                "the TLS handshake with {peer} did not finish within {}",
                humantime::format_duration(*after)
            ),
            "timeout",
            after_tls(policy, "the receiver is slow or stalled"),
        ),
        HandshakeError::Closed => sentence(
            format!("{peer} closed the connection during the TLS handshake"),
            "EOF",
            after_tls(
                policy,
                "its TLS software took nothing volley offers (TLS 1.2 and 1.3, ECDHE with AES-GCM or ChaCha20): the receiver must allow one",
            ),
        ),
    }
}

/// The advice after a failed handshake: `fix`, then what volley does next. It names
/// STARTTLS, so the reply classifier files it under `policy` whatever words of the
/// receiver's or a library's the sentence carries ("malformed", "AccessDenied").
fn after_tls(policy: TlsPolicy, fix: &str) -> String {
    if policy.dane {
        format!("{fix}. The MX host's DNSSEC-signed TLSA records require TLS (STARTTLS) with a certificate they name (RFC 7672 §2.2), so volley retries later and never sends in clear or over unverified TLS")
    } else if policy.mta_sts {
        format!("{fix}. The domain's MTA-STS policy (enforce) requires TLS (STARTTLS) with a valid certificate for the MX name (RFC 8461 §4.2), so volley retries later and never sends in clear or over unverified TLS")
    } else if policy.required {
        format!("{fix}. TLS (STARTTLS) is required for this destination, so volley retries later and never sends in clear")
    } else {
        format!("{fix}. volley tries the same host again without STARTTLS")
    }
}

/// A rustls error as a sentence. `policy` is None when TLS failed after the handshake.
pub fn tls_failed(peer: Option<Peer>, e: &rustls::Error, policy: Option<TlsPolicy>) -> Sentence {
    use rustls::Error as E;
    let who = who(peer);
    let (what, cause, fix): (String, String, String) = match e {
        E::InvalidCertificate(c) => {
            let (what, cause, fix) = certificate(c);
            (format!("the certificate of {who} {what}"), cause, fix.to_string())
        }
        E::NoCertificatesPresented => (
            format!("{who} presented no certificate"),
            "NoCertificatesPresented".into(),
            "the receiver's TLS is misconfigured and must serve its certificate".into(),
        ),
        E::AlertReceived(a) => {
            let (what, fix) = alert(*a);
            (format!("{who} ended TLS: {what}"), format!("AlertReceived({a:?})"), fix.into())
        }
        E::PeerIncompatible(p) => (
            format!("{who} and volley have no TLS version, cipher suite or key exchange in common"),
            format!("PeerIncompatible({p:?})"),
            "the receiver must allow TLS 1.2 or 1.3 with ECDHE and AES-GCM or ChaCha20".into(),
        ),
        E::PeerMisbehaved(p) => (
            format!("{who} broke the TLS protocol"),
            format!("PeerMisbehaved({p:?})"),
            "a fault in the receiver's TLS software, or a middlebox altering the session; the receiver must fix it".into(),
        ),
        E::InvalidMessage(m) => (
            format!("{who} sent a TLS message volley cannot parse"),
            match m {
                // Its name would read to the reply classifier as a content refusal.
                rustls::InvalidMessage::InvalidContentType => {
                    "InvalidMessage: unknown TLS record type".into()
                }
                m => format!("InvalidMessage({m:?})"),
            },
            "often a server that agrees to switch to TLS and then does not speak it, or a middlebox in the way".into(),
        ),
        E::InappropriateMessage { got_type, .. } => (
            format!("{who} sent a TLS message out of order"),
            format!("InappropriateMessage({got_type:?})"),
            "a fault in the receiver's TLS software, or a middlebox in the way".into(),
        ),
        E::InappropriateHandshakeMessage { got_type, .. } => (
            format!("{who} sent a TLS handshake message out of order"),
            format!("InappropriateHandshakeMessage({got_type:?})"),
            "a fault in the receiver's TLS software, or a middlebox in the way".into(),
        ),
        E::DecryptError => (
            format!("what {who} sent over TLS failed to decrypt"),
            "DecryptError".into(),
            "the session was corrupted on the way, or the receiver's TLS is faulty".into(),
        ),
        E::PeerSentOversizedRecord => (
            format!("{who} sent an oversized TLS record"),
            "PeerSentOversizedRecord".into(),
            "a fault in the receiver's TLS software".into(),
        ),
        E::FailedToGetCurrentTime => (
            format!("volley could not read the clock to check the certificate of {who}"),
            "FailedToGetCurrentTime".into(),
            "check this machine's clock".into(),
        ),
        E::General(m) => (
            format!("TLS with {who} failed"),
            format!("General: {m}"),
            "see the cause; report it to volley's developers if it is not the receiver's".into(),
        ),
        other => (
            format!("TLS with {who} failed on volley's side"),
            format!("{other:?}"),
            "report this line to volley's developers".into(),
        ),
    };
    let action = match policy {
        None => format!("{fix}. volley sends the messages in flight again on a new connection"),
        Some(p) => {
            let mut a = after_tls(p, &fix);
            if p.verify && !p.mta_sts && !p.dane && matches!(e, E::InvalidCertificate(_)) {
                a.push_str(". With tls_verify off for this destination volley would deliver over unverified TLS");
            }
            a
        }
    };
    Sentence {
        what,
        cause,
        action,
    }
}

/// A certificate failure: what is wrong with it (after "the certificate of HOST"),
/// its name, and who must fix what.
fn certificate(c: &rustls::CertificateError) -> (String, String, &'static str) {
    use rustls::CertificateError as C;
    const CHAIN: &str = "the receiver must fix its certificate chain";
    const RENEW: &str = "the receiver must renew its certificate";
    match c {
        C::Expired => ("has expired".into(), "Expired".into(), RENEW),
        C::ExpiredContext { not_after, .. } => (
            format!("expired on {}", date(*not_after)),
            "Expired".into(),
            RENEW,
        ),
        C::NotValidYet => (
            "is not valid yet".into(),
            "NotValidYet".into(),
            "the certificate starts in the future, or this machine's clock is behind: check both",
        ),
        C::NotValidYetContext { not_before, .. } => (
            format!("is valid only from {}", date(*not_before)),
            "NotValidYet".into(),
            "the certificate starts in the future, or this machine's clock is behind: check both",
        ),
        C::UnknownIssuer => (
            "is not signed by a CA volley trusts, one of the Mozilla roots in webpki-roots".into(),
            "UnknownIssuer".into(),
            "it is self-signed, from a private CA, or served without its intermediate certificates; the receiver must serve a full chain from a public CA",
        ),
        C::BadSignature => (
            "has a signature that does not verify".into(),
            "BadSignature".into(),
            CHAIN,
        ),
        C::NotValidForName => (
            "does not name the MX host".into(),
            "NotValidForName".into(),
            "the certificate does not cover the host name in the MX record; the receiver must fix the certificate or the MX",
        ),
        C::NotValidForNameContext { expected, presented } => (
            format!(
                "is not valid for {} (it names {})",
                expected.to_str(),
                if presented.is_empty() { "no host".to_string() } else { presented.join(", ") }
            ),
            "NotValidForName".into(),
            "the certificate does not cover the host name in the MX record; the receiver must fix the certificate or the MX",
        ),
        C::Revoked => ("has been revoked by its CA".into(), "Revoked".into(), RENEW),
        C::UnhandledCriticalExtension => (
            "has a critical extension volley cannot check".into(),
            "UnhandledCriticalExtension".into(),
            CHAIN,
        ),
        C::ApplicationVerificationFailure => (
            "failed volley's own checks".into(),
            "ApplicationVerificationFailure".into(),
            CHAIN,
        ),
        C::BadEncoding => ("cannot be parsed".into(), "BadEncoding".into(), CHAIN),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => (
            "is not meant for a TLS server".into(),
            "InvalidPurpose".into(),
            "the receiver must use a certificate with the serverAuth extended key usage",
        ),
        C::UnsupportedSignatureAlgorithmContext { .. }
        | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => (
            "is signed with an algorithm volley does not support".into(),
            "UnsupportedSignatureAlgorithm".into(),
            "the receiver must use a certificate signed with RSA, ECDSA or Ed25519 and SHA-2",
        ),
        C::Other(o) if o.0.downcast_ref::<TlsaMismatch>().is_some() => (
            o.to_string(),
            "no TLSA match".into(),
            "the receiver's TLSA records (_25._tcp.HOST) must name the certificate or key it serves, or it must serve the one they name (RFC 7672 §3)",
        ),
        C::Other(o) => match o.0.downcast_ref::<webpki::Error>() {
            Some(w) => webpki_error(w),
            None => ("failed verification".into(), o.to_string(), CHAIN),
        },
        other => ("failed verification".into(), format!("{other:?}"), CHAIN),
    }
}

/// webpki's reasons that rustls passes on as `CertificateError::Other`.
fn webpki_error(w: &webpki::Error) -> (String, String, &'static str) {
    use webpki::Error as W;
    const CHAIN: &str = "the receiver must fix its certificate chain";
    let what = match w {
        W::CaUsedAsEndEntity => "is a CA certificate, not a server certificate",
        W::EndEntityUsedAsCa => "chain uses a server certificate as a CA",
        W::PathLenConstraintViolated | W::NameConstraintViolation => {
            "chain breaks a constraint its CA set"
        }
        W::CertDistrusted => "chain leads to a CA that is no longer trusted",
        W::MaximumPathDepthExceeded
        | W::MaximumPathBuildCallsExceeded
        | W::MaximumSignatureChecksExceeded
        | W::MaximumNameConstraintComparisonsExceeded => {
            "chain is too long or too tangled to check"
        }
        W::UnsupportedCertVersion => "is not an X.509 v3 certificate",
        W::UnsupportedNameType => "names its host in a form volley cannot check",
        _ => "cannot be parsed",
    };
    // webpki's Display is its Debug: the variant's name.
    (what.into(), format!("{w:?}"), CHAIN)
}

/// The date part of a certificate time: "2024-05-01".
fn date(t: rustls::pki_types::UnixTime) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(t.as_secs());
    let mut s = humantime::format_rfc3339_seconds(at).to_string();
    s.truncate("2024-05-01".len());
    s
}

/// An alert the receiver sent: what it says, and who can do what.
fn alert(a: rustls::AlertDescription) -> (&'static str, &'static str) {
    use rustls::AlertDescription as A;
    match a {
        A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity => (
            "it accepts none of the TLS versions or cipher suites volley offers",
            "volley offers TLS 1.2 and 1.3 with ECDHE and AES-GCM or ChaCha20; the receiver must allow one",
        ),
        A::BadCertificate | A::UnknownCA | A::CertificateRequired | A::AccessDenied => (
            "it wants a client certificate, which volley does not send",
            "ask the receiver's postmaster to accept mail without a client certificate",
        ),
        A::UnrecognisedName => (
            "it does not know the host name volley asked for (SNI)",
            "the MX record names a host the receiver does not serve; the receiver must fix it",
        ),
        A::InternalError => (
            "its TLS failed on its side",
            "a fault at the receiver; its postmaster must look at its TLS logs",
        ),
        _ => (
            "it sent a TLS alert",
            "the receiver's TLS logs say why",
        ),
    }
}

/// A DNS answer that gives no host to deliver to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsProblem {
    /// NXDOMAIN.
    NoSuchDomain,
    /// The domain exists but has neither MX nor address records.
    NoRecords,
    /// RFC 7505 null MX: the domain says it accepts no mail.
    NullMx,
    /// MX records whose hosts have no address (each host named).
    MxWithoutAddresses(Vec<String>),
    /// The nameserver answered with an error code (SERVFAIL, REFUSED, ...).
    ServerFailed(String),
    /// No answer in time.
    TimedOut,
    /// An answer that failed DNSSEC validation (DANE's lookups, RFC 4035 §5.5).
    Bogus,
    /// volley's own resolver could not ask (no nameserver, socket error, thread gone).
    ResolverDown(String),
}

/// Why the MX lookup for `domain` gave nothing to deliver to.
pub fn dns(domain: &str, p: &DnsProblem) -> Sentence {
    const LATER: &str = "volley retries later";
    match p {
        DnsProblem::NoSuchDomain => sentence(
            format!("{domain} does not exist in DNS"),
            "NXDOMAIN",
            "the address is misspelt or its domain has lapsed; remove it from the list",
        ),
        DnsProblem::NoRecords => sentence(
            format!("{domain} has neither MX nor A/AAAA records"),
            "no MX, no address",
            "it takes no mail; remove it from the list",
        ),
        DnsProblem::NullMx => sentence(
            format!("{domain} accepts no mail"),
            "null MX, RFC 7505",
            "its owner says so in DNS; remove it from the list",
        ),
        DnsProblem::MxWithoutAddresses(hosts) => sentence(
            format!(
                "no MX host of {domain} has an A or AAAA record (MX: {})",
                hosts.join(", ")
            ),
            "MX hosts without addresses",
            format!("the domain's DNS must give its MX hosts addresses; {LATER}"),
        ),
        DnsProblem::ServerFailed(rcode) => sentence(
            format!("the nameserver failed to answer the DNS lookup for {domain}"),
            rcode.clone(),
            format!("the domain's DNS is broken (its nameservers down or its DNSSEC invalid), or the resolver volley uses is; {LATER}"),
        ),
        DnsProblem::Bogus => sentence(
            format!("the DNS answer for {domain} failed DNSSEC validation"),
            "bogus",
            format!("the domain's DNSSEC is broken (signatures expired, wrong or missing, a denial without its signed NSEC, a DS without its DNSKEY) or the answer was forged on the way; with DANE on volley believes no such answer; {LATER}"),
        ),
        DnsProblem::TimedOut => sentence(
            format!("the DNS lookup for {domain} timed out"),
            "timeout",
            format!("the domain's nameservers or the resolver volley uses (--dns, else /etc/resolv.conf) do not answer; {LATER}"),
        ),
        DnsProblem::ResolverDown(why) => sentence(
            format!("volley's resolver could not look up {domain}"),
            why.clone(),
            format!("check the resolver volley uses (--dns, else /etc/resolv.conf); {LATER}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::classify::Classifier;
    use crate::smtp::reply::Reply;
    use rustls::{AlertDescription, CertificateError, Error as TlsError, OtherError};
    use std::io::Error as IoError;
    use std::sync::Arc;

    const ADDR: &str = "192.0.2.1:25";

    fn peer() -> Peer<'static> {
        Peer {
            host: "mx.example.com",
            addr: ADDR.parse().unwrap(),
        }
    }

    const REQUIRED_VERIFIED: TlsPolicy = TlsPolicy {
        required: true,
        verify: true,
        mta_sts: false,
        dane: false,
    };
    const OPPORTUNISTIC: TlsPolicy = TlsPolicy {
        required: false,
        verify: false,
        mta_sts: false,
        dane: false,
    };

    fn cert(c: CertificateError) -> String {
        tls_failed(
            Some(peer()),
            &TlsError::InvalidCertificate(c),
            Some(REQUIRED_VERIFIED),
        )
        .to_string()
    }

    fn webpki_cert(w: webpki::Error) -> String {
        cert(CertificateError::Other(OtherError(Arc::new(w))))
    }

    fn io(kind: ErrorKind) -> IoError {
        IoError::from(kind)
    }

    /// Every text holds `words`, names the host and never shows a Debug dump of nested types.
    fn says(text: &str, words: &[&str]) {
        for w in words {
            assert!(text.contains(w), "{w:?} missing from {text:?}");
        }
        assert!(!text.contains("Other("), "{text}");
        assert!(!text.contains("OtherError"), "{text}");
    }

    #[test]
    fn a_ca_certificate_as_the_server_certificate() {
        let t = webpki_cert(webpki::Error::CaUsedAsEndEntity);
        assert_eq!(
            t,
            "the certificate of mx.example.com [192.0.2.1:25] is a CA certificate, not a server \
             certificate (CaUsedAsEndEntity); the receiver must fix its certificate chain. TLS \
             (STARTTLS) is required for this destination, so volley retries later and never \
             sends in clear. \
             With tls_verify off for this destination volley would deliver over unverified TLS"
        );
    }

    #[test]
    fn other_webpki_reasons() {
        says(
            &webpki_cert(webpki::Error::EndEntityUsedAsCa),
            &[
                "server certificate as a CA",
                "(EndEntityUsedAsCa)",
                "certificate chain",
            ],
        );
        says(
            &webpki_cert(webpki::Error::PathLenConstraintViolated),
            &["constraint", "(PathLenConstraintViolated)"],
        );
        says(
            &webpki_cert(webpki::Error::NameConstraintViolation),
            &["constraint", "(NameConstraintViolation)"],
        );
        says(
            &webpki_cert(webpki::Error::CertDistrusted),
            &["no longer trusted", "(CertDistrusted)"],
        );
        says(
            &webpki_cert(webpki::Error::MalformedExtensions),
            &["cannot be parsed", "(MalformedExtensions)"],
        );
        // Something that is not webpki's: its own words.
        let odd = CertificateError::Other(OtherError(Arc::new(IoError::other("odd"))));
        says(&cert(odd), &["failed verification (odd)"]);
    }

    #[test]
    fn certificate_errors() {
        let at = |s| rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(s));
        says(
            &cert(CertificateError::Expired),
            &[
                "mx.example.com [192.0.2.1:25]",
                "has expired (Expired)",
                "renew",
            ],
        );
        says(
            &cert(CertificateError::ExpiredContext {
                time: at(1_750_000_000),
                not_after: at(1_700_000_000),
            }),
            &["expired on 2023-11-14 (Expired)", "renew"],
        );
        says(
            &cert(CertificateError::NotValidYet),
            &["is not valid yet (NotValidYet)", "clock"],
        );
        says(
            &cert(CertificateError::NotValidYetContext {
                time: at(1_700_000_000),
                not_before: at(1_750_000_000),
            }),
            &["valid only from 2025-06-15", "clock"],
        );
        says(
            &cert(CertificateError::UnknownIssuer),
            &[
                "not signed by a CA volley trusts",
                "(UnknownIssuer)",
                "intermediate",
                "tls_verify off",
            ],
        );
        says(
            &cert(CertificateError::BadSignature),
            &["(BadSignature)", "chain"],
        );
        says(
            &cert(CertificateError::NotValidForName),
            &["does not name the MX host (NotValidForName)", "MX record"],
        );
        says(
            &cert(CertificateError::NotValidForNameContext {
                expected: rustls::pki_types::ServerName::try_from("mx.example.com").unwrap(),
                presented: vec!["other.example.net".into()],
            }),
            &["is not valid for mx.example.com (it names other.example.net) (NotValidForName)"],
        );
        says(
            &cert(CertificateError::Revoked),
            &["revoked by its CA (Revoked)"],
        );
        says(
            &cert(CertificateError::UnhandledCriticalExtension),
            &["critical extension", "(UnhandledCriticalExtension)"],
        );
        says(
            &cert(CertificateError::ApplicationVerificationFailure),
            &["(ApplicationVerificationFailure)"],
        );
        says(
            &cert(CertificateError::BadEncoding),
            &["cannot be parsed (BadEncoding)"],
        );
        says(&cert(CertificateError::InvalidPurpose), &["serverAuth"]);
    }

    #[test]
    fn the_advice_follows_the_policy() {
        let e = TlsError::AlertReceived(AlertDescription::HandshakeFailure);
        let opp = tls_failed(Some(peer()), &e, Some(OPPORTUNISTIC)).to_string();
        says(&opp, &["again without STARTTLS"]);
        assert!(!opp.contains("tls_verify"), "{opp}");
        let req = tls_failed(Some(peer()), &e, Some(REQUIRED_VERIFIED)).to_string();
        says(&req, &["never sends in clear"]);
        // Only a certificate failure is helped by not verifying.
        assert!(!req.contains("tls_verify"), "{req}");
        let after = tls_failed(None, &e, None).to_string();
        says(&after, &["the receiver ended TLS", "new connection"]);
    }

    #[test]
    fn protocol_errors() {
        let t = |e: TlsError| tls_failed(Some(peer()), &e, Some(OPPORTUNISTIC)).to_string();
        says(
            &t(TlsError::AlertReceived(AlertDescription::HandshakeFailure)),
            &[
                "mx.example.com [192.0.2.1:25] ended TLS",
                "(AlertReceived(HandshakeFailure))",
                "TLS 1.2 and 1.3",
            ],
        );
        says(
            &t(TlsError::AlertReceived(
                AlertDescription::CertificateRequired,
            )),
            &["client certificate"],
        );
        says(
            &t(TlsError::AlertReceived(AlertDescription::InternalError)),
            &["its TLS failed on its side"],
        );
        says(
            &t(TlsError::PeerIncompatible(
                rustls::PeerIncompatible::NoCipherSuitesInCommon,
            )),
            &["in common", "(PeerIncompatible(NoCipherSuitesInCommon))"],
        );
        says(
            &t(TlsError::PeerMisbehaved(
                rustls::PeerMisbehaved::IllegalMiddleboxChangeCipherSpec,
            )),
            &[
                "broke the TLS protocol",
                "(PeerMisbehaved(IllegalMiddleboxChangeCipherSpec))",
            ],
        );
        says(
            &t(TlsError::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType,
            )),
            &[
                "TLS message volley cannot parse",
                "(InvalidMessage: unknown TLS record type)",
            ],
        );
        says(
            &t(TlsError::InappropriateMessage {
                expect_types: vec![rustls::ContentType::Handshake],
                got_type: rustls::ContentType::ApplicationData,
            }),
            &["out of order", "(InappropriateMessage(ApplicationData))"],
        );
        says(
            &t(TlsError::NoCertificatesPresented),
            &["presented no certificate (NoCertificatesPresented)"],
        );
        says(&t(TlsError::DecryptError), &["(DecryptError)"]);
        says(&t(TlsError::General("boom".into())), &["(General: boom)"]);
        says(
            &t(TlsError::HandshakeNotComplete),
            &["volley's side (HandshakeNotComplete)"],
        );
    }

    #[test]
    fn handshake_errors_that_are_not_rustls() {
        let h = |e: HandshakeError| handshake_failed(peer(), &e, OPPORTUNISTIC).to_string();
        says(
            &h(HandshakeError::TimedOut(Duration::from_secs(30))),
            &["TLS handshake with mx.example.com [192.0.2.1:25] did not finish within 30s (timeout)", "without STARTTLS"],
        );
        says(
            &h(HandshakeError::Closed),
            &["closed the connection during the TLS handshake (EOF)"],
        );
        says(
            &h(HandshakeError::Io(Step::Read, io(ErrorKind::ConnectionReset))),
            &["mx.example.com [192.0.2.1:25] reset the connection while volley was reading during the TLS handshake (ConnectionReset"],
        );
    }

    #[test]
    fn connect_errors() {
        let c = |e: IoError| connect_failed(peer(), Step::Connect, &e).to_string();
        says(
            &c(IoError::from_raw_os_error(libc::ECONNREFUSED)),
            &["connection to mx.example.com [192.0.2.1:25] refused (ConnectionRefused, os error 111)", "nothing listens on port 25"],
        );
        says(&c(io(ErrorKind::TimedOut)), &["timed out", "port 25"]);
        says(
            &c(IoError::from_raw_os_error(libc::EHOSTUNREACH)),
            &["is unreachable (HostUnreachable", "routing"],
        );
        says(
            &c(IoError::from_raw_os_error(libc::ENETUNREACH)),
            &["network of", "(NetworkUnreachable", "IPv6"],
        );
        says(
            &c(IoError::from_raw_os_error(libc::EADDRNOTAVAIL)),
            &["ephemeral ports"],
        );
        says(
            &c(IoError::from_raw_os_error(libc::EPERM)),
            &["firewall", "(EPERM, os error 1)"],
        );
        says(
            &c(io(ErrorKind::ConnectionReset)),
            &["reset the connection"],
        );
        says(
            &c(io(ErrorKind::Other)),
            &["connection to mx.example.com [192.0.2.1:25] failed"],
        );
        let src: IpAddr = "203.0.113.7".parse().unwrap();
        let b = |e: IoError| connect_failed(peer(), Step::Bind(src), &e).to_string();
        says(
            &b(IoError::from_raw_os_error(libc::EADDRNOTAVAIL)),
            &[
                "source address 203.0.113.7",
                "not an address of this machine",
                "(AddrNotAvailable",
                "pool",
            ],
        );
        says(
            &b(IoError::from_raw_os_error(libc::EADDRINUSE)),
            &["no local port is free"],
        );
        says(
            &connect_timed_out(peer(), Duration::from_secs(30)).to_string(),
            &["not established within 30s (connect_timeout)"],
        );
    }

    #[test]
    fn a_broken_connection() {
        let b = |s, e: IoError| connection_broke(None, s, &e).to_string();
        says(
            &b(Step::Read, io(ErrorKind::ConnectionReset)),
            &["the receiver reset the connection while volley was reading (ConnectionReset"],
        );
        says(
            &b(Step::Write, io(ErrorKind::BrokenPipe)),
            &["had closed the connection while volley was writing (BrokenPipe"],
        );
        says(
            &b(Step::Read, io(ErrorKind::UnexpectedEof)),
            &["in the middle of a reply (UnexpectedEof"],
        );
        says(
            &b(Step::Read, io(ErrorKind::TimedOut)),
            &["stopped answering"],
        );
        // A TLS failure after the handshake comes wrapped in an io::Error.
        let wrapped = IoError::new(ErrorKind::InvalidData, TlsError::DecryptError);
        says(
            &b(Step::Read, wrapped),
            &["failed to decrypt (DecryptError)"],
        );
    }

    #[test]
    fn dns_problems() {
        let d = |p| dns("example.com", &p).to_string();
        says(
            &d(DnsProblem::NoSuchDomain),
            &["example.com does not exist in DNS (NXDOMAIN)", "remove"],
        );
        says(&d(DnsProblem::NoRecords), &["neither MX nor A/AAAA"]);
        says(
            &d(DnsProblem::NullMx),
            &["accepts no mail (null MX, RFC 7505)"],
        );
        says(
            &d(DnsProblem::MxWithoutAddresses(vec![
                "mx1.example.com".into()
            ])),
            &["no MX host of example.com has an A or AAAA record (MX: mx1.example.com)"],
        );
        says(
            &d(DnsProblem::ServerFailed("SERVFAIL".into())),
            &["(SERVFAIL)", "retries later"],
        );
        says(&d(DnsProblem::TimedOut), &["timed out (timeout)", "--dns"]);
        says(
            &d(DnsProblem::ResolverDown("resolver thread is gone".into())),
            &["(resolver thread is gone)"],
        );
    }

    /// The classifier reads these texts too: none may pull a reply into another class
    /// than its code gives (a TLS failure's 4.7.5 reads as policy).
    #[test]
    fn sentences_do_not_change_the_class() {
        let c = Classifier::shipped();
        let class = |code, enh: &str, text: &str| c.classify(&Reply::new(code, Some(enh), text));
        let mut texts: Vec<(u16, &str, String)> = Vec::new();
        for kind in [
            libc::ECONNREFUSED,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::EADDRNOTAVAIL,
            libc::EPERM,
            libc::ECONNRESET,
            libc::EIO,
        ] {
            let e = IoError::from_raw_os_error(kind);
            texts.push((
                451,
                "4.4.1",
                connect_failed(peer(), Step::Connect, &e).to_string(),
            ));
            let src = "203.0.113.7".parse().unwrap();
            texts.push((
                451,
                "4.4.1",
                connect_failed(peer(), Step::Bind(src), &e).to_string(),
            ));
            texts.push((
                451,
                "4.4.2",
                connection_broke(None, Step::Read, &e).to_string(),
            ));
            texts.push((
                451,
                "4.4.2",
                connection_broke(None, Step::Write, &e).to_string(),
            ));
        }
        texts.push((
            451,
            "4.4.1",
            connect_timed_out(peer(), Duration::from_secs(3)).to_string(),
        ));
        for (code, enh, p) in [
            (550, "5.1.2", DnsProblem::NoSuchDomain),
            (550, "5.1.2", DnsProblem::NoRecords),
            (556, "5.1.10", DnsProblem::NullMx),
            (
                451,
                "4.4.3",
                DnsProblem::MxWithoutAddresses(vec!["mx.example.com".into()]),
            ),
            (451, "4.4.3", DnsProblem::ServerFailed("SERVFAIL".into())),
            (451, "4.4.3", DnsProblem::TimedOut),
            (451, "4.4.3", DnsProblem::ResolverDown("gone".into())),
        ] {
            texts.push((code, enh, dns("example.com", &p).to_string()));
        }
        for (code, enh, t) in &texts {
            assert_eq!(
                class(*code, enh, t),
                class(*code, enh, "x"),
                "{code} {enh} {t}"
            );
        }
        let tls_errors = [
            TlsError::InvalidCertificate(CertificateError::UnknownIssuer),
            TlsError::InvalidCertificate(CertificateError::Expired),
            TlsError::InvalidCertificate(CertificateError::NotValidForName),
            TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                webpki::Error::CaUsedAsEndEntity,
            )))),
            TlsError::AlertReceived(AlertDescription::HandshakeFailure),
            TlsError::AlertReceived(AlertDescription::AccessDenied),
            TlsError::AlertReceived(AlertDescription::UnrecognisedName),
            TlsError::PeerIncompatible(rustls::PeerIncompatible::NoCipherSuitesInCommon),
            TlsError::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
            TlsError::DecryptError,
            TlsError::PeerSentOversizedRecord,
        ];
        for e in &tls_errors {
            for policy in [REQUIRED_VERIFIED, OPPORTUNISTIC] {
                let t = tls_failed(Some(peer()), e, Some(policy)).to_string();
                assert_eq!(class(451, "4.7.5", &t).class.name(), "policy", "{t}");
            }
            let t = tls_failed(None, e, None).to_string();
            // The alert named AccessDenied reads as a refusal by policy, which it is.
            if !matches!(e, TlsError::AlertReceived(AlertDescription::AccessDenied)) {
                assert_eq!(class(451, "4.4.2", &t), class(451, "4.4.2", "x"), "{t}");
            }
        }
    }
}
