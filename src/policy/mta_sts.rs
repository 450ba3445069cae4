//! MTA-STS (RFC 8461): the `_mta-sts` TXT record that announces a policy, the policy
//! file a domain serves over HTTPS, and which MX hosts a policy allows. Pure parsing
//! and matching; the lookup, fetch and cache are deliver/mta_sts.rs.

use std::fmt;
use std::time::Duration;

/// The longest `max_age` a policy may give: one year (RFC 8461 §3.2).
pub const MAX_AGE_MAX: Duration = Duration::from_secs(31_557_600);
/// The longest policy file read; RFC 8461 §3.3 asks senders to cap it, and real
/// policies are a few hundred octets.
pub const POLICY_OCTETS_MAX: usize = 64 * 1024;
/// The longest `id` of a TXT record: 1 to 32 letters and digits (RFC 8461 §3.1).
pub const ID_CHARS_MAX: usize = 32;

/// What a policy asks of senders (RFC 8461 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver only over TLS with a valid certificate to an MX host the policy names.
    Enforce,
    /// Deliver as before; report failures (TLS-RPT, RFC 8460).
    Testing,
    /// No policy in force.
    None,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A parsed policy file (RFC 8461 §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// MX host patterns, lowercase: `mx.example.com` or `*.example.com`.
    pub mx: Vec<String>,
    /// How long the policy may be cached, at most [`MAX_AGE_MAX`].
    pub max_age: Duration,
}

/// What is wrong with a `_mta-sts` TXT record or a policy file; each says what and
/// where (the RFC's section), for the log and `volley tls show`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    #[error("the _mta-sts TXT record {0} (RFC 8461 §3.1)")]
    Record(String),
    #[error("the policy file {0} (RFC 8461 §3.2)")]
    Policy(String),
}

/// The `id` of a `_mta-sts` TXT record: `v=STSv1; id=20160831085700Z;` (RFC 8461
/// §3.1). `v=STSv1` comes first; other fields are ignored; spaces around `;` and `=`
/// are allowed. Errors: no version, another version, no id or one that is not 1–32
/// letters and digits.
pub fn parse_record(txt: &str) -> Result<String, StsError> {
    let bad = |what: &str| StsError::Record(what.to_string());
    let mut fields = txt
        .split(';')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| f.split_once('=').map(|(k, v)| (k.trim(), v.trim())));
    match fields.next() {
        Some(Some(("v", "STSv1"))) => {}
        Some(Some(("v", v))) => return Err(bad(&format!("has version {v:?}, not STSv1"))),
        _ => return Err(bad("does not begin with v=STSv1")),
    }
    let mut id = None;
    for f in fields {
        match f {
            Some(("id", v)) if id.is_none() => id = Some(v),
            Some(("id", _)) => return Err(bad("has two ids")),
            Some(_) => {}
            None => return Err(bad("has a field that is not key=value")),
        }
    }
    let id = id.ok_or_else(|| bad("has no id"))?;
    if id.is_empty() || id.len() > ID_CHARS_MAX || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(bad(&format!(
            "id {id:?} is not 1 to {ID_CHARS_MAX} letters and digits"
        )));
    }
    Ok(id.to_string())
}

/// Which of a domain's TXT records at `_mta-sts` announce a policy: those beginning
/// `v=STSv1`. Exactly one must (RFC 8461 §3.1: several mean no policy is announced).
pub fn announcing(records: &[String]) -> Result<Option<String>, StsError> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.trim_start().starts_with("v=STSv1"))
        .collect();
    match sts.as_slice() {
        [] => Ok(None),
        [one] => parse_record(one).map(Some),
        _ => Err(StsError::Record(format!(
            "set has {} records beginning v=STSv1; exactly one is allowed",
            sts.len()
        ))),
    }
}

/// Parses a policy file: `key: value` lines ending in CRLF or LF; `version: STSv1`,
/// `mode`, `max_age` (seconds, at most a year: longer is cut to [`MAX_AGE_MAX`]) and,
/// unless the mode is `none`, at least one `mx`. Unknown keys are ignored (§3.2).
/// Errors: over [`POLICY_OCTETS_MAX`], not UTF-8, a missing or bad field.
pub fn parse_policy(body: &[u8]) -> Result<Policy, StsError> {
    let bad = |what: String| StsError::Policy(what);
    if body.len() > POLICY_OCTETS_MAX {
        return Err(bad(format!("is over {POLICY_OCTETS_MAX} octets")));
    }
    let text = std::str::from_utf8(body).map_err(|_| bad("is not UTF-8".into()))?;
    let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(bad(format!("line {} has no `key: value`", n + 1)));
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "version" => version = Some(value.to_string()),
            "mode" => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => {
                        return Err(bad(format!(
                            "mode {other:?} is not enforce, testing or none"
                        )))
                    }
                })
            }
            "max_age" => {
                let secs: u64 = value
                    .parse()
                    .ok()
                    .filter(|_| value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| bad(format!("max_age {value:?} is not a number of seconds")))?;
                max_age = Some(Duration::from_secs(secs).min(MAX_AGE_MAX));
            }
            "mx" => {
                let pattern = value.to_ascii_lowercase();
                if !is_mx_pattern(&pattern) {
                    return Err(bad(format!("mx {value:?} is not a host name or *.domain")));
                }
                mx.push(pattern);
            }
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err(bad(match version {
            Some(v) => format!("has version {v:?}, not STSv1"),
            None => "has no version".into(),
        }));
    }
    let mode = mode.ok_or_else(|| bad("has no mode".into()))?;
    let max_age = max_age.ok_or_else(|| bad("has no max_age".into()))?;
    if mx.is_empty() && mode != Mode::None {
        return Err(bad(format!("is {} with no mx", mode.name())));
    }
    Ok(Policy { mode, mx, max_age })
}

/// A host name of letters, digits, hyphens and dots, or `*.` and one.
fn is_mx_pattern(p: &str) -> bool {
    let name = p.strip_prefix("*.").unwrap_or(p);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Policy {
    /// Whether the policy allows MX host `host` (RFC 8461 §4.1): the same name, or
    /// for `*.example.com` a name with exactly one more label on the left. Case and a
    /// trailing dot do not matter.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(parent) => host
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == parent),
            None => *p == host,
        })
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mode {}, mx {}, max_age {} s",
            self.mode.name(),
            self.mx.join(" "),
            self.max_age.as_secs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_give_their_id_and_bad_ones_say_what_is_wrong() {
        assert_eq!(
            parse_record("v=STSv1; id=20160831085700Z;").unwrap(),
            "20160831085700Z"
        );
        assert_eq!(parse_record(" v = STSv1 ;id=abc ; ext=1").unwrap(), "abc");
        for (txt, why) in [
            ("id=1; v=STSv1", "does not begin"),
            ("v=STSv2; id=1", "STSv2"),
            ("v=STSv1;", "no id"),
            ("v=STSv1; id=", "letters and digits"),
            ("v=STSv1; id=a-b", "letters and digits"),
            (
                "v=STSv1; id=123456789012345678901234567890123",
                "letters and digits",
            ),
            ("v=STSv1; id=1; id=2", "two ids"),
            ("v=STSv1; junk", "not key=value"),
        ] {
            let e = parse_record(txt).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("§3.1"), "{txt}: {e}");
        }
        assert_eq!(announcing(&["v=spf1 -all".into()]).unwrap(), None);
        assert_eq!(
            announcing(&["v=spf1 -all".into(), "v=STSv1; id=x1".into()]).unwrap(),
            Some("x1".into())
        );
        let two = ["v=STSv1; id=a".to_string(), "v=STSv1; id=b".to_string()];
        assert!(announcing(&two)
            .unwrap_err()
            .to_string()
            .contains("exactly one"));
    }

    #[test]
    fn policies_parse_with_either_line_ending_and_bad_ones_are_refused() {
        let p = parse_policy(
            b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.NET\r\nmax_age: 604800\r\nfuture: x\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, ["mail.example.com", "*.example.net"]);
        assert_eq!(p.max_age, Duration::from_secs(604_800));
        let lf = parse_policy(b"version: STSv1\nmode: testing\nmx: a.b\nmax_age: 86400\n").unwrap();
        assert_eq!(lf.mode, Mode::Testing);
        let none = parse_policy(b"version: STSv1\nmode: none\nmax_age: 1\n").unwrap();
        assert_eq!(none.mode, Mode::None);
        let long = parse_policy(b"version: STSv1\nmode: none\nmax_age: 9999999999\n").unwrap();
        assert_eq!(long.max_age, MAX_AGE_MAX);
        for (body, why) in [
            (&b"mode: enforce\nmx: a.b\nmax_age: 1\n"[..], "no version"),
            (
                b"version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n",
                "STSv2",
            ),
            (b"version: STSv1\nmx: a.b\nmax_age: 1\n", "no mode"),
            (
                b"version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n",
                "strict",
            ),
            (b"version: STSv1\nmode: enforce\nmx: a.b\n", "no max_age"),
            (
                b"version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n",
                "max_age",
            ),
            (b"version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
            (
                b"version: STSv1\nmode: enforce\nmx: a b\nmax_age: 1\n",
                "host name",
            ),
            (
                b"version: STSv1\nmode: enforce\nmx: *.\nmax_age: 1\n",
                "host name",
            ),
            (b"<html>nope</html>\n", "key: value"),
            (b"version: STSv1\xff\n", "UTF-8"),
        ] {
            let e = parse_policy(body).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("§3.2"), "{e}");
        }
        let big = vec![b'#'; POLICY_OCTETS_MAX + 1];
        assert!(parse_policy(&big)
            .unwrap_err()
            .to_string()
            .contains("octets"));
    }

    #[test]
    fn a_wildcard_allows_one_label_and_no_more() {
        let p = Policy {
            mode: Mode::Enforce,
            mx: vec!["mail.example.com".into(), "*.example.net".into()],
            max_age: Duration::from_secs(60),
        };
        assert!(p.allows("mail.example.com"));
        assert!(p.allows("MAIL.Example.com."));
        assert!(p.allows("mx1.example.net"));
        assert!(!p.allows("example.net"));
        assert!(!p.allows("a.mx1.example.net"));
        assert!(!p.allows("mx1.example.net.evil.test"));
        assert!(!p.allows("xmail.example.com"));
        assert!(!p.allows("other.example.com"));
    }
}
