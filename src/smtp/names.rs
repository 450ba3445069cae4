//! Names said on the wire: domains (RFC 5321 §4.1.2, RFC 1035 §2.3.4) and EHLO
//! names (RFC 5321 §4.1.1.1). Pure syntax, shared by the campaign checks, the shaping
//! rules' pool sources and the DSNs.

use thiserror::Error;

/// Longest domain name in text form: 255 octets on the wire (RFC 1035 §2.3.4) are
/// 253 characters without the root's dot.
pub const DOMAIN_OCTETS_MAX: usize = 253;
/// Longest label of a domain name (RFC 1035 §2.3.4).
pub const LABEL_OCTETS_MAX: usize = 63;

/// Why a domain (of an address, `from_domain` or an EHLO name) is not one volley
/// sends to or as.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DomainError {
    #[error("empty domain")]
    Empty,
    #[error(
        "domain of {len} octets, over the {DOMAIN_OCTETS_MAX} a domain name can have (RFC 1035)"
    )]
    TooLong { len: usize },
    #[error("domain {0:?} is not ASCII: give its xn-- (A-label) form, as `idn2` prints it")]
    NonAscii(String),
    #[error("domain {0:?} has an empty label (a leading, trailing or doubled dot)")]
    EmptyLabel(String),
    #[error("label of {len} octets, over the {LABEL_OCTETS_MAX} DNS allows (RFC 1035)")]
    LabelTooLong { len: usize },
    #[error("label {0:?} has a character other than letters, digits and hyphens")]
    LabelChar(String),
    #[error("label {0:?} starts or ends with a hyphen")]
    LabelHyphen(String),
    #[error("domain {0:?} has no dot: Internet mail domains have one (example.com)")]
    NoDot(String),
    #[error("domain {0:?} looks like an IP address (its last label is all digits, which no top-level domain is)")]
    Numeric(String),
}

/// Checks a domain name as RFC 5321 §4.1.2 `Domain` has it (letters, digits and
/// inner hyphens in labels of 1 to 63 octets, at most 253 octets), and further: at
/// least one dot (dotless names do not receive Internet mail) and a last label that
/// is not all digits (`192.0.2.1` is an address, not a domain; RFC 3696 §2).
pub fn check_domain(d: &str) -> Result<(), DomainError> {
    if d.is_empty() {
        return Err(DomainError::Empty);
    }
    if !d.is_ascii() {
        return Err(DomainError::NonAscii(d.to_string()));
    }
    if d.len() > DOMAIN_OCTETS_MAX {
        return Err(DomainError::TooLong { len: d.len() });
    }
    for label in d.split('.') {
        if label.is_empty() {
            return Err(DomainError::EmptyLabel(d.to_string()));
        }
        if label.len() > LABEL_OCTETS_MAX {
            return Err(DomainError::LabelTooLong { len: label.len() });
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
        {
            return Err(DomainError::LabelChar(label.to_string()));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(DomainError::LabelHyphen(label.to_string()));
        }
    }
    if !d.contains('.') {
        return Err(DomainError::NoDot(d.to_string()));
    }
    if d.rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|c| c.is_ascii_digit()))
    {
        return Err(DomainError::Numeric(d.to_string()));
    }
    Ok(())
}

/// Why a name is not one to say in EHLO (RFC 5321 §4.1.1.1: the client's fully
/// qualified domain name, or an address literal when it has none).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EhloError {
    #[error("{0:?}: not a fully qualified domain name (no dot); receivers that require one (RFC 5321 §4.1.1.1) refuse every message with 504 5.5.2; give the sending address's reverse-DNS name, e.g. mta1.example.net, or an address literal like [192.0.2.1]")]
    NoDot(String),
    #[error("{0:?} is an IP address: write it as the address literal [{0}] (RFC 5321 §4.1.3)")]
    BareIp(String),
    #[error(
        "{0:?}: not a valid address literal: [192.0.2.1] or [IPv6:2001:db8::1] (RFC 5321 §4.1.3)"
    )]
    BadLiteral(String),
    #[error("{name:?}: not a fully qualified domain name ({why}); give the sending address's reverse-DNS name, e.g. mta1.example.net, or an address literal like [192.0.2.1]")]
    Domain { name: String, why: DomainError },
}

/// Checks an EHLO name: a fully qualified domain name (see [`check_domain`]) or an
/// address literal, `[192.0.2.1]` or `[IPv6:2001:db8::1]`. Returns it as it is to be
/// sent (a trailing dot dropped).
pub fn check_ehlo_name(name: &str) -> Result<String, EhloError> {
    if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        let ok = match inner.get(..5) {
            Some(p) if p.eq_ignore_ascii_case("IPv6:") => {
                inner[5..].parse::<std::net::Ipv6Addr>().is_ok()
            }
            _ => inner.parse::<std::net::Ipv4Addr>().is_ok(),
        };
        return if ok {
            Ok(name.to_string())
        } else {
            Err(EhloError::BadLiteral(name.to_string()))
        };
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(EhloError::BareIp(name.to_string()));
    }
    let d = name.strip_suffix('.').unwrap_or(name);
    match check_domain(d) {
        Ok(()) => Ok(d.to_string()),
        Err(DomainError::NoDot(_)) => Err(EhloError::NoDot(name.to_string())),
        Err(why) => Err(EhloError::Domain {
            name: name.to_string(),
            why,
        }),
    }
}
