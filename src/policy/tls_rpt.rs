//! SMTP TLS Reporting (RFC 8460): what each TLS session to a domain with an MTA-STS
//! policy, or to an MX host with DANE TLSA records, came to, counted per policy domain and UTC day, the `_smtp._tls` record
//! that says where the domain wants its report, and the aggregate report (§4) built
//! from a day's counts. Pure data; the counting in the shards, the ledger on disk and
//! the sending are deliver/tls_rpt.rs.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Policy domains counted per UTC day; sessions to more domains than this on one day
/// are not counted (the day's ledger says how many were left out). A bulk host sends
/// to a few thousand domains with a policy in a day.
pub const DOMAINS_PER_DAY_MAX: usize = 100_000;
/// Distinct failure rows (result type, MX, addresses) kept per policy per day; more
/// are added to the summary's failure count only (§4.4 allows a summary alone).
pub const FAILURE_ROWS_MAX: usize = 100;
/// The most report URIs taken from a `_smtp._tls` record; the rest are ignored.
pub const RUA_MAX: usize = 8;
/// The longest `failure-reason-code` a report carries, in characters.
pub const REASON_CHARS_MAX: usize = 200;
/// The longest report address taken from a record (RFC 5321 §4.5.3.1.3's path).
pub const MAILTO_OCTETS_MAX: usize = 254;

/// The result types of RFC 8460 §4.3 that volley can meet (`dane-required` is for
/// a sender that demands DANE of every host; volley does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResultType {
    /// The MX did not offer STARTTLS, or refused it (§4.3.1).
    StarttlsNotSupported,
    /// The certificate is not valid for the MX host name (§4.3.1).
    CertificateHostMismatch,
    /// The certificate has expired, or is not valid yet (§4.3.1).
    CertificateExpired,
    /// The certificate does not chain to a trusted root (§4.3.1).
    CertificateNotTrusted,
    /// Any other failure to validate what the policy requires, such as an MX host
    /// that no `mx` pattern of the policy allows (§4.3.3).
    ValidationFailure,
    /// The policy could not be fetched (§4.3.2.1).
    StsPolicyFetchError,
    /// The policy fetched is not a valid policy (§4.3.2.1).
    StsPolicyInvalid,
    /// The policy host's certificate was not valid (§4.3.2.1).
    StsWebpkiInvalid,
    /// The certificate matched none of the host's TLSA records (§4.3.2.2).
    TlsaInvalid,
    /// No valid TLSA records could be had: the lookup was bogus or failed
    /// (§4.3.2.2).
    DnssecInvalid,
}

/// The kind of policy a session was under (§4.3 `policy-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyType {
    /// An MTA-STS policy (RFC 8461), or one its record announced.
    Sts,
    /// An MX host's DANE TLSA records (RFC 7672).
    Tlsa,
    /// No policy (RFC 8460 §4.3 `no-policy-found`).
    NoPolicyFound,
}

/// The policy a session was evaluated against (§4.3 `policy`): its type, its text
/// as lines (`policy-string`) and the MX patterns it names (`mx-host`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Applied {
    pub policy_type: PolicyType,
    /// The policy's text, a line each (empty when none could be had).
    pub policy_string: Vec<String>,
    /// The policy's MX patterns (`mx.example.com`, `*.example.net`).
    pub mx_host: Vec<String>,
}

impl Applied {
    /// An MTA-STS policy, written as the policy file's lines (RFC 8461 §3.2).
    pub fn sts(p: &crate::policy::mta_sts::Policy) -> Applied {
        let mut lines = vec![
            "version: STSv1".to_string(),
            format!("mode: {}", p.mode.name()),
        ];
        lines.extend(p.mx.iter().map(|m| format!("mx: {m}")));
        lines.push(format!("max_age: {}", p.max_age.as_secs()));
        Applied {
            policy_type: PolicyType::Sts,
            policy_string: lines,
            mx_host: p.mx.clone(),
        }
    }

    /// MX host `host`'s TLSA records, each as a zone file writes it (`3 1 1 AB…`);
    /// none when they could not be had.
    pub fn tlsa(host: &str, records: &[String]) -> Applied {
        Applied {
            policy_type: PolicyType::Tlsa,
            policy_string: records.to_vec(),
            mx_host: vec![host.to_string()],
        }
    }

    /// A policy announced by the domain's `_mta-sts` record that could not be had.
    pub fn sts_unavailable() -> Applied {
        Applied {
            policy_type: PolicyType::Sts,
            policy_string: Vec::new(),
            mx_host: Vec::new(),
        }
    }
}

/// One failed session (§4.3 `failure-details`, less its count).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Failure {
    pub result_type: ResultType,
    /// The address volley sent from, when it chose one (a pool's source).
    pub sending_mta_ip: Option<IpAddr>,
    /// The MX host the session was with; None when there was no session.
    pub receiving_mx_hostname: Option<String>,
    /// Its address.
    pub receiving_ip: Option<IpAddr>,
    /// Volley's own words for it, at most [`REASON_CHARS_MAX`] characters (§4.3
    /// `failure-reason-code`).
    pub failure_reason_code: Option<String>,
}

impl Failure {
    /// A failure of type `result` with no session details, for `why`.
    pub fn of(result: ResultType, why: &str) -> Failure {
        Failure {
            result_type: result,
            sending_mta_ip: None,
            receiving_mx_hostname: None,
            receiving_ip: None,
            failure_reason_code: Some(reason(why)),
        }
    }
}

/// `why` cut to [`REASON_CHARS_MAX`] characters.
pub fn reason(why: &str) -> String {
    why.chars().take(REASON_CHARS_MAX).collect()
}

/// The sessions under one policy of one domain on one day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub successful: u64,
    pub failed: u64,
    /// At most [`FAILURE_ROWS_MAX`] rows, each with its count.
    pub failures: Vec<(Failure, u64)>,
}

impl Tally {
    /// Adds `n` sessions to `failure`'s row; past [`FAILURE_ROWS_MAX`] rows a new
    /// one is counted in the summary only.
    fn add_row(&mut self, failure: Failure, n: u64) {
        if let Some(i) = self.failures.iter().position(|(f, _)| *f == failure) {
            self.failures[i].1 += n;
        } else if self.failures.len() < FAILURE_ROWS_MAX {
            self.failures.push((failure, n));
        }
    }
}

/// One UTC day's counts, by policy domain, then by the policy applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Day {
    /// `YYYY-MM-DD`, UTC.
    pub date: String,
    pub domains: BTreeMap<String, Vec<(Applied, Tally)>>,
    /// Sessions not counted because the day had [`DOMAINS_PER_DAY_MAX`] domains.
    pub not_counted: u64,
}

impl Day {
    /// An empty day `date` (`YYYY-MM-DD`).
    pub fn new(date: String) -> Day {
        Day {
            date,
            ..Day::default()
        }
    }

    /// The tally of `domain` under `policy`; None when the day is full.
    fn tally(&mut self, domain: &str, policy: &Applied) -> Option<&mut Tally> {
        if !self.domains.contains_key(domain) && self.domains.len() >= DOMAINS_PER_DAY_MAX {
            self.not_counted += 1;
            return None;
        }
        let policies = self.domains.entry(domain.to_string()).or_default();
        let i = match policies.iter().position(|(p, _)| p == policy) {
            Some(i) => i,
            None => {
                policies.push((policy.clone(), Tally::default()));
                policies.len() - 1
            }
        };
        Some(&mut policies[i].1)
    }

    /// Counts a session to `domain` under `policy` that met it.
    pub fn success(&mut self, domain: &str, policy: &Applied) {
        if let Some(t) = self.tally(domain, policy) {
            t.successful += 1;
        }
    }

    /// Counts a session to `domain` under `policy` that failed it, as `failure`.
    pub fn failure(&mut self, domain: &str, policy: &Applied, failure: Failure) {
        let Some(t) = self.tally(domain, policy) else {
            return;
        };
        t.failed += 1;
        t.add_row(failure, 1);
    }

    /// The aggregate report of `domain` for this day (RFC 8460 §4.3, §4.4), or None
    /// when no session to it was counted.
    pub fn report(&self, domain: &str, org: &Organization) -> Option<serde_json::Value> {
        use serde_json::json;
        let policies = self.domains.get(domain)?;
        let policies: Vec<serde_json::Value> = policies
            .iter()
            .map(|(p, t)| {
                let details: Vec<serde_json::Value> = t
                    .failures
                    .iter()
                    .map(|(f, n)| {
                        let mut d = json!({
                            "result-type": f.result_type,
                            "failed-session-count": n,
                        });
                        let o = d.as_object_mut().expect("an object");
                        if let Some(ip) = f.sending_mta_ip {
                            o.insert("sending-mta-ip".into(), json!(ip.to_string()));
                        }
                        if let Some(mx) = &f.receiving_mx_hostname {
                            o.insert("receiving-mx-hostname".into(), json!(mx));
                        }
                        if let Some(ip) = f.receiving_ip {
                            o.insert("receiving-ip".into(), json!(ip.to_string()));
                        }
                        if let Some(why) = &f.failure_reason_code {
                            o.insert("failure-reason-code".into(), json!(why));
                        }
                        d
                    })
                    .collect();
                let mut policy = json!({
                    "policy-type": p.policy_type,
                    "policy-domain": domain,
                });
                let o = policy.as_object_mut().expect("an object");
                if !p.policy_string.is_empty() {
                    o.insert("policy-string".into(), json!(p.policy_string));
                }
                if !p.mx_host.is_empty() {
                    o.insert("mx-host".into(), json!(p.mx_host));
                }
                json!({
                    "policy": policy,
                    "summary": {
                        "total-successful-session-count": t.successful,
                        "total-failure-session-count": t.failed,
                    },
                    "failure-details": details,
                })
            })
            .collect();
        Some(json!({
            "organization-name": org.name,
            "date-range": {
                "start-datetime": format!("{}T00:00:00Z", self.date),
                "end-datetime": format!("{}T23:59:59Z", self.date),
            },
            "contact-info": org.contact_info,
            "report-id": report_id(&self.date, domain, &org.submitter),
            "policies": policies,
        }))
    }
}

/// Who reports (§4.3 `organization-name`, `contact-info`; §5.3 the submitter).
#[derive(Debug, Clone)]
pub struct Organization {
    pub name: String,
    /// An address or URL the domain may write to about the report.
    pub contact_info: String,
    /// The host name of the reporting MTA (`TLS-Report-Submitter`).
    pub submitter: String,
}

/// The report's id: unique per day, domain and submitter, and the same each time it
/// is built, so a receiver can tell a duplicate (§4.3 `report-id`).
pub fn report_id(date: &str, domain: &str, submitter: &str) -> String {
    format!("{date}.{domain}@{submitter}")
}

/// The file name of a report (§5.1): `submitter!domain!begin!end.json.gz`, the times
/// in seconds since the epoch.
pub fn file_name(submitter: &str, domain: &str, begin: u64, end: u64) -> String {
    format!("{submitter}!{domain}!{begin}!{end}.json.gz")
}

/// Where a domain wants its reports (§3 `rua`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rua {
    /// An address; the report goes as a DKIM-signed message (§5.3).
    Mailto(String),
    /// A URL; the report is POSTed to it (§5.4).
    Https(String),
}

/// The report URIs of a domain's `_smtp._tls` TXT records (§3): the one record
/// that begins `v=TLSRPTv1;` (none, or more than one: no reporting), its `rua`
/// split at commas, `mailto:` and `https:` URIs kept (others ignored, as the RFC
/// allows), at most [`RUA_MAX`]. Errors: the record has no `rua`, or none usable.
pub fn rua_of(records: &[String]) -> Result<Vec<Rua>, String> {
    let ours: Vec<&String> = records
        .iter()
        .filter(|r| r.trim_start().starts_with("v=TLSRPTv1"))
        .collect();
    let record = match ours.as_slice() {
        [] => return Ok(Vec::new()),
        [one] => one,
        _ => {
            return Err(format!(
                "{} records begin v=TLSRPTv1; exactly one is allowed (RFC 8460 §3)",
                ours.len()
            ))
        }
    };
    let mut fields = record.split(';').map(str::trim);
    if fields.next() != Some("v=TLSRPTv1") {
        return Err(format!(
            "`{record}` does not begin with `v=TLSRPTv1;` (RFC 8460 §3)"
        ));
    }
    let rua = fields
        .filter_map(|f| f.split_once('='))
        .find(|(k, _)| k.trim() == "rua")
        .map(|(_, v)| v.trim())
        .ok_or_else(|| format!("`{record}` has no rua= (RFC 8460 §3)"))?;
    let uris: Vec<Rua> = rua
        .split(',')
        .map(str::trim)
        .filter_map(|u| {
            // A URI with a control character or a space is refused whole: it
            // would end in a header field or a ledger line (RFC 8460 §3 URIs have
            // none).
            if u.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return None;
            }
            if let Some(addr) = strip_scheme(u, "mailto:") {
                let addr = percent_decoded(addr.split('?').next().unwrap_or(addr));
                is_mailbox(&addr).then_some(Rua::Mailto(addr))
            } else {
                strip_scheme(u, "https:").map(|_| Rua::Https(u.to_string()))
            }
        })
        .take(RUA_MAX)
        .collect();
    if uris.is_empty() {
        return Err(format!(
            "`{record}` names no mailto: or https: URI volley can use (RFC 8460 §3)"
        ));
    }
    Ok(uris)
}

/// A plain `local@domain` address: printable ASCII without spaces, quotes,
/// brackets or separators, one `@`, at most [`MAILTO_OCTETS_MAX`] octets.
fn is_mailbox(a: &str) -> bool {
    let Some((local, domain)) = a.split_once('@') else {
        return false;
    };
    a.len() <= MAILTO_OCTETS_MAX
        && !local.is_empty()
        && domain.contains('.')
        && !domain.contains('@')
        && a.bytes()
            .all(|b| b.is_ascii_graphic() && !b"<>()[]\\,;:\"".contains(&b))
}

fn strip_scheme<'a>(uri: &'a str, scheme: &str) -> Option<&'a str> {
    let head = uri.get(..scheme.len())?;
    head.eq_ignore_ascii_case(scheme)
        .then(|| &uri[scheme.len()..])
}

/// `%XX` escapes decoded (a comma in a URI is written `%2C`, RFC 8460 §3).
fn percent_decoded(s: &str) -> String {
    form_urlencoded::parse(format!("a={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map_or_else(|| s.to_string(), |(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::mta_sts::{Mode, Policy};
    use std::time::Duration;

    fn policy() -> Applied {
        Applied::sts(&Policy {
            mode: Mode::Enforce,
            mx: vec!["mx1.example.com".into(), "*.example.net".into()],
            max_age: Duration::from_secs(86_400),
        })
    }

    fn failure(t: ResultType, mx: &str) -> Failure {
        Failure {
            result_type: t,
            sending_mta_ip: None,
            receiving_mx_hostname: Some(mx.into()),
            receiving_ip: Some("192.0.2.1".parse().unwrap()),
            failure_reason_code: None,
        }
    }

    #[test]
    fn sessions_add_up_per_domain_and_policy_and_failures_per_row() {
        let mut d = Day::new("2026-12-01".into());
        let p = policy();
        d.success("example.com", &p);
        d.success("example.com", &p);
        d.failure(
            "example.com",
            &p,
            failure(ResultType::CertificateExpired, "mx1.example.com"),
        );
        d.failure(
            "example.com",
            &p,
            failure(ResultType::CertificateExpired, "mx1.example.com"),
        );
        d.failure(
            "example.com",
            &p,
            failure(ResultType::StarttlsNotSupported, "mx1.example.com"),
        );
        let t = &d.domains["example.com"][0].1;
        assert_eq!((t.successful, t.failed), (2, 3));
        assert_eq!(t.failures.len(), 2);
        assert_eq!(t.failures[0].1, 2);
    }

    #[test]
    fn the_report_has_the_rfc_8460_fields() {
        let mut d = Day::new("2026-12-01".into());
        d.success("example.com", &policy());
        d.failure(
            "example.com",
            &policy(),
            failure(ResultType::CertificateHostMismatch, "mx1.example.com"),
        );
        let org = Organization {
            name: "Sender Org".into(),
            contact_info: "postmaster@sender.example".into(),
            submitter: "mta.sender.example".into(),
        };
        let r = d.report("example.com", &org).unwrap();
        assert_eq!(r["date-range"]["start-datetime"], "2026-12-01T00:00:00Z");
        assert_eq!(r["date-range"]["end-datetime"], "2026-12-01T23:59:59Z");
        assert_eq!(r["report-id"], "2026-12-01.example.com@mta.sender.example");
        let p = &r["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "sts");
        assert_eq!(p["policy"]["policy-string"][1], "mode: enforce");
        assert_eq!(p["policy"]["mx-host"][1], "*.example.net");
        assert_eq!(p["summary"]["total-successful-session-count"], 1);
        assert_eq!(p["summary"]["total-failure-session-count"], 1);
        let f = &p["failure-details"][0];
        assert_eq!(f["result-type"], "certificate-host-mismatch");
        assert_eq!(f["receiving-ip"], "192.0.2.1");
        assert_eq!(f["failed-session-count"], 1);
        assert!(d.report("other.example", &org).is_none());
    }

    #[test]
    fn a_full_day_counts_no_new_domain_and_says_so() {
        let mut d = Day::new("2026-12-01".into());
        for i in 0..DOMAINS_PER_DAY_MAX {
            d.success(&format!("d{i}.example"), &policy());
        }
        d.success("one-too-many.example", &policy());
        d.success("d0.example", &policy());
        assert_eq!(d.not_counted, 1);
        assert_eq!(d.domains["d0.example"][0].1.successful, 2);
    }

    #[test]
    fn the_record_gives_its_mailto_and_https_uris() {
        let r = |s: &str| rua_of(&[s.to_string()]);
        assert_eq!(
            r("v=TLSRPTv1; rua=mailto:tls%2Breports@example.com,https://r.example.com/v1").unwrap(),
            vec![
                Rua::Mailto("tls+reports@example.com".into()),
                Rua::Https("https://r.example.com/v1".into())
            ]
        );
        assert_eq!(
            r("v=TLSRPTv1;rua=MAILTO:a@example.com").unwrap(),
            vec![Rua::Mailto("a@example.com".into())]
        );
        assert!(rua_of(&["v=spf1 -all".into()]).unwrap().is_empty());
        let e = r("v=TLSRPTv1; rua=http://insecure.example").unwrap_err();
        assert!(e.contains("no mailto: or https:"), "{e}");
        assert!(r("v=TLSRPTv1;").unwrap_err().contains("no rua="));
        let two = vec!["v=TLSRPTv1; rua=mailto:a@x.example".to_string(); 2];
        assert!(rua_of(&two).unwrap_err().contains("exactly one"));
        // What would end in a header field or a ledger line is refused.
        for bad in [
            "mailto:a@x.example%0D%0ABcc:b@y.example",
            "mailto:a@x.example%09x",
            "mailto:\"a b\"@x.example",
            "mailto:a<b>@x.example",
            "mailto:a@x.example\tdone",
            "https://r.example/a\r\nb",
            "https://r.example/a b",
        ] {
            let e = r(&format!("v=TLSRPTv1; rua={bad}")).unwrap_err();
            assert!(e.contains("no mailto: or https:"), "{bad}: {e}");
        }
    }
}
