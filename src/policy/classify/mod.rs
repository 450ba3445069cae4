//! Reading replies the way a postmaster would: a pure function from an SMTP reply to
//! whether to retry and a class. Rules are data (rules.toml, plus an operator's file
//! tried first), checked when loaded; what no rule matches is classified by its
//! enhanced status code (RFC 3463), then by its basic code.

use crate::smtp::reply::Reply;
use regex::RegexSet;

#[cfg(test)]
mod accuracy;
mod input;
pub use input::{parse_logged, InputError};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

pub const SHIPPED_RULES: &str = include_str!("rules.toml");
/// Rules per file; a longer file is almost certainly a mistake.
pub const RULES_MAX: usize = 10_000;

/// The shipped rules, after an operator's file when one is given.
pub fn load(operator: Option<&std::path::Path>) -> anyhow::Result<Classifier> {
    match operator {
        None => Ok(Classifier::shipped()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("--bounce-rules {}: {e}", p.display()))?;
            let origin = p.display().to_string();
            Classifier::load(&[
                (origin.as_str(), text.as_str()),
                ("built-in rules", SHIPPED_RULES),
            ])
            .map_err(anyhow::Error::msg)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    InvalidRecipient,
    MailboxFull,
    MailboxDisabled,
    Throttled,
    Blocked,
    AuthFailed,
    Content,
    Policy,
    TransientOther,
    PermanentOther,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::InvalidRecipient => "invalid_recipient",
            Class::MailboxFull => "mailbox_full",
            Class::MailboxDisabled => "mailbox_disabled",
            Class::Throttled => "throttled",
            Class::Blocked => "blocked",
            Class::AuthFailed => "auth_failed",
            Class::Content => "content",
            Class::Policy => "policy",
            Class::TransientOther => "transient_other",
            Class::PermanentOther => "permanent_other",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub retry: bool,
    pub class: Class,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    #[serde(rename = "match")]
    pattern: String,
    class: Class,
    retry: Option<bool>,
}

struct Rule {
    name: String,
    class: Class,
    retry: Option<bool>,
}

/// The compiled rules, in order.
pub struct Classifier {
    set: RegexSet,
    rules: Vec<Rule>,
}

impl Classifier {
    /// The shipped rules only.
    pub fn shipped() -> Classifier {
        Classifier::load(&[("built-in rules", SHIPPED_RULES)])
            .expect("the shipped rules are tested")
    }

    /// Rules from several files, earlier files first; each error names the file and rule.
    pub fn load(files: &[(&str, &str)]) -> Result<Classifier, String> {
        let mut patterns = Vec::new();
        let mut rules = Vec::new();
        for (origin, text) in files {
            let f: RuleFile = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
            if f.rule.len() > RULES_MAX {
                return Err(format!(
                    "{origin}: {} rules, over the {RULES_MAX} limit",
                    f.rule.len()
                ));
            }
            for (i, r) in f.rule.into_iter().enumerate() {
                if let Err(e) = regex::Regex::new(&r.pattern) {
                    return Err(format!(
                        "{origin}: rule {} ({:?}): bad regex: {e}",
                        i + 1,
                        r.name
                    ));
                }
                patterns.push(r.pattern);
                rules.push(Rule {
                    name: r.name,
                    class: r.class,
                    retry: r.retry,
                });
            }
        }
        let set = RegexSet::new(&patterns).map_err(|e| format!("rules: {e}"))?;
        Ok(Classifier { set, rules })
    }

    /// The line rules match against: "CODE ENHANCED TEXT", lines joined with spaces.
    pub fn subject(reply: &Reply) -> String {
        let text = reply.text.replace('\n', " ");
        match &reply.enhanced {
            Some(e) => format!("{} {e} {text}", reply.code),
            None => format!("{} {text}", reply.code),
        }
    }

    /// Classifies a non-2xx reply (a 2xx is not a failure and gets no class).
    pub fn classify(&self, reply: &Reply) -> Verdict {
        self.classify_named(reply).0
    }

    /// As `classify`, with the name of the rule that decided (None: by code).
    pub fn classify_named(&self, reply: &Reply) -> (Verdict, Option<&str>) {
        // A 5yz is not repeated (RFC 5321 §4.2.1), save "too many recipients", which
        // clients treat as temporary even as a 552 (§4.5.3.1.10).
        let by_code = !reply.is_permanent() || reply.is_too_many_recipients();
        if let Some(i) = self.set.matches(&Self::subject(reply)).iter().next() {
            let r = &self.rules[i];
            return (
                Verdict {
                    retry: r.retry.unwrap_or(by_code),
                    class: r.class,
                },
                Some(&r.name),
            );
        }
        (
            Verdict {
                retry: by_code,
                class: by_enhanced(reply).unwrap_or(if by_code {
                    Class::TransientOther
                } else {
                    Class::PermanentOther
                }),
            },
            None,
        )
    }
}

/// Verdicts a `Remembering` classifier keeps, at most; when full, all are let go.
pub const VERDICTS_KEPT_MAX: usize = 4_096;

/// Replies with more text than this (octets) are classified each time, never
/// kept: so what is kept stays about `VERDICTS_KEPT_MAX` × this (4 MiB) per shard,
/// whatever a receiver answers.
pub const VERDICT_REPLY_KEPT_BYTES_MAX: usize = 1_024;

/// A classifier that keeps its verdicts by reply: receivers repeat their failure
/// replies word for word, and matching a reply against every rule's pattern costs
/// about a µs (more while the regex engine's lazy DFA is still being built),
/// against ~80 ns for a kept one (`cargo bench --bench hot -- classify`). One per shard, so no lock; a reload makes a new one. Replies
/// that differ per message (a recipient's address, a queue id) each take a place,
/// bounded by `VERDICTS_KEPT_MAX` and `VERDICT_REPLY_KEPT_BYTES_MAX`.
pub struct Remembering {
    classifier: Arc<Classifier>,
    kept: RefCell<HashMap<Reply, Verdict>>,
}

impl Remembering {
    pub fn new(classifier: Arc<Classifier>) -> Remembering {
        Remembering {
            classifier,
            kept: RefCell::new(HashMap::new()),
        }
    }

    /// As `Classifier::classify`, from what was kept when the reply was seen before.
    pub fn classify(&self, reply: &Reply) -> Verdict {
        if let Some(v) = self.kept.borrow().get(reply) {
            return *v;
        }
        let v = self.classifier.classify(reply);
        if reply.text.len() > VERDICT_REPLY_KEPT_BYTES_MAX {
            return v;
        }
        let mut kept = self.kept.borrow_mut();
        if kept.len() >= VERDICTS_KEPT_MAX {
            kept.clear();
        }
        kept.insert(reply.clone(), v);
        v
    }
}

/// RFC 3463 subjects and details, for replies no rule names.
fn by_enhanced(reply: &Reply) -> Option<Class> {
    let e = reply.enhanced.as_deref()?;
    let mut parts = e.split('.').skip(1);
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    let transient = reply.is_transient();
    Some(match (subject, detail) {
        // Addressing: bad mailbox, bad system, bad syntax, ambiguous, moved, null MX.
        (1, 1..=4 | 6 | 10) => Class::InvalidRecipient,
        // The sender's address (X.1.7 syntax, X.1.8 system): the receiver refuses the
        // sender, not the recipient.
        (1, 7 | 8) => Class::Policy,
        (2, 1) => Class::MailboxDisabled,
        (2, 2) => Class::MailboxFull,
        (2, 3) | (3, 4) | (6, _) => Class::Content,
        // Unable to route: the recipient's domain cannot be reached as addressed.
        (4, 4) => Class::InvalidRecipient,
        (7, 1) => Class::Policy,
        // RFC 4954 (X.7.8), RFC 7372 (X.7.20..X.7.27: DKIM, SPF, reverse DNS, several
        // checks), and Microsoft's X.7.509/515 for DMARC.
        (7, 7 | 8 | 20..=27 | 509 | 515) => Class::AuthFailed,
        // X.7.13 user account disabled; X.7.17/18 mailbox or domain owner changed (RRVS).
        (7, 13) => Class::MailboxDisabled,
        (7, 17 | 18) => Class::InvalidRecipient,
        (7, _) => Class::Policy,
        _ if transient => Class::TransientOther,
        _ => Class::PermanentOther,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Reply {
        let mut p = crate::smtp::reply::ReplyParser::default();
        p.push(format!("{line}\r\n").as_bytes());
        p.next_reply().unwrap().unwrap()
    }

    #[test]
    fn remembered_verdicts_are_the_classifiers_and_bounded() {
        let c = Arc::new(Classifier::shipped());
        let r = Remembering::new(c.clone());
        let replies = [
            "421 4.7.28 Gmail has detected an unusual rate of mail originating from your IP address",
            "550 5.1.1 The email account that you tried to reach does not exist",
            "451 4.7.500 Server busy. Please try again later from [127.0.0.1]. (S77719)",
            "452 4.5.3 Too many recipients",
            "554 no reason given",
            // The same text with and without its enhanced code is two replies.
            "451 Please try again later",
            "451 4.3.2 Please try again later",
        ];
        for _ in 0..2 {
            for line in replies {
                let reply = parse(line);
                assert_eq!(r.classify(&reply), c.classify(&reply), "{line}");
            }
        }
        assert_eq!(r.kept.borrow().len(), replies.len(), "each kept once");
        for i in 0..=VERDICTS_KEPT_MAX {
            let reply = parse(&format!("550 5.1.1 <user{i}@example.test>: unknown"));
            assert_eq!(r.classify(&reply).class, Class::InvalidRecipient);
        }
        assert!(r.kept.borrow().len() <= VERDICTS_KEPT_MAX);
        let long = parse(&format!(
            "550 5.1.1 {}",
            "x".repeat(VERDICT_REPLY_KEPT_BYTES_MAX + 1)
        ));
        let before = r.kept.borrow().len();
        assert_eq!(r.classify(&long), c.classify(&long));
        assert_eq!(r.kept.borrow().len(), before, "a long reply is not kept");
    }

    #[test]
    fn providers_real_replies() {
        let c = Classifier::shipped();
        let cases = [
            ("421 4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from your IP address.", Class::Throttled, true),
            ("550 5.1.1 The email account that you tried to reach does not exist.", Class::InvalidRecipient, false),
            ("452 4.2.2 The email account that you tried to reach is over quota.", Class::MailboxFull, true),
            ("550 5.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy.", Class::AuthFailed, false),
            ("421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints", Class::Throttled, true),
            ("554 5.7.9 Message not accepted for policy reasons. See https://senders.yahooinc.com/error-codes", Class::Policy, false),
            ("553 5.7.1 [BL21] Connections will not be accepted from 192.0.2.1, because the ip is in Spamhaus's list", Class::Blocked, false),
            ("451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719)", Class::Throttled, true),
            ("550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).", Class::Blocked, false),
            ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", Class::InvalidRecipient, false),
            ("421 4.7.0 [CS01] Message rejected due to local policy.", Class::Policy, true),
            ("421 4.7.0 Too many connections, try again later (mxgmx116)", Class::Throttled, true),
            ("421 mwinf5c10 ME Service refuse. Veuillez essayer plus tard. OFR_999 [999]", Class::Throttled, true),
            ("554 5.7.1 resimta-po-01v.sys.comcast.net comcast 192.0.2.1 found on one or more DNSBLs, see BL000010", Class::Blocked, false),
            ("550 Envelope blocked - User Entry - https://community.mimecast.com", Class::Blocked, false),
            ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using Barracuda Reputation", Class::Blocked, false),
            ("552 5.2.2 Mailbox full", Class::MailboxFull, false),
            ("451 4.7.1 Greylisted, try again in 300 seconds", Class::TransientOther, true),
            ("550 5.2.1 The email account that you tried to reach is disabled.", Class::MailboxDisabled, false),
        ];
        for (line, class, retry) in cases {
            let v = c.classify(&parse(line));
            assert_eq!((v.class, v.retry), (class, retry), "{line}");
        }
    }

    #[test]
    fn enhanced_then_basic_code_when_no_rule_matches() {
        let c = Classifier::shipped();
        assert_eq!(
            c.classify(&parse("550 5.1.2 host unknown")).class,
            Class::InvalidRecipient
        );
        assert_eq!(
            c.classify(&parse("554 5.3.4 message too big")).class,
            Class::Content
        );
        assert_eq!(
            c.classify(&parse("451 4.4.1 no answer from host")),
            Verdict {
                retry: true,
                class: Class::TransientOther
            }
        );
        assert_eq!(
            c.classify(&parse("554 go away")),
            Verdict {
                retry: false,
                class: Class::PermanentOther
            }
        );
        assert_eq!(
            c.classify(&parse("450 not now")),
            Verdict {
                retry: true,
                class: Class::TransientOther
            }
        );
    }

    /// RFC 5321 §4.2.1: a 5yz reply is not repeated, a 4yz one may be. The shipped rules
    /// leave retry to the code; an operator's file may opt in.
    #[test]
    fn shipped_rules_never_override_the_codes_retry() {
        let f: RuleFile = toml::from_str(SHIPPED_RULES).unwrap();
        for r in &f.rule {
            assert_eq!(r.retry, None, "shipped rule {} sets retry", r.name);
        }
        let c = Classifier::shipped();
        for line in [
            "552 5.2.2 Mailbox full",
            "550 5.2.2 <a@b>... Mailbox Full",
            "552 over quota",
        ] {
            assert!(!c.classify(&parse(line)).retry, "{line}");
        }
        for line in [
            "452 4.2.2 over quota",
            "421 4.7.0 [TS03] permanently deferred",
            // RFC 5321 §4.5.3.1.10: temporary even as a 552.
            "552 5.5.3 Too many recipients",
            "552 Too many recipients for this session",
        ] {
            assert!(c.classify(&parse(line)).retry, "{line}");
        }
    }

    #[test]
    fn replies_that_blame_the_sending_host_are_about_the_sender() {
        let c = Classifier::shipped();
        for line in [
            "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname",
            "450 4.7.1 Client host rejected: cannot find your reverse hostname, [192.0.2.1]",
            "550 5.7.25 The IP address sending this message does not have a PTR record setup",
        ] {
            assert_eq!(c.classify(&parse(line)).class, Class::AuthFailed, "{line}");
        }
    }

    #[test]
    fn operator_rules_come_first_and_bad_rules_are_named() {
        let mine = "[[rule]]\nname = \"acme-soft\"\nmatch = '^554 .*acme busy'\nclass = \"throttled\"\nretry = true\n";
        let c = Classifier::load(&[("mine.toml", mine), ("built-in", SHIPPED_RULES)]).unwrap();
        let (v, name) = c.classify_named(&parse("554 5.7.1 acme busy, policy"));
        assert_eq!(
            (v.class, v.retry, name),
            (Class::Throttled, true, Some("acme-soft"))
        );
        let bad = "[[rule]]\nname = \"broken\"\nmatch = '(unclosed'\nclass = \"policy\"\n";
        let e = Classifier::load(&[("bad.toml", bad)]).err().unwrap();
        assert!(
            e.starts_with("bad.toml: rule 1 (\"broken\"): bad regex"),
            "{e}"
        );
        let bad = "[[rule]]\nname = \"x\"\nmatch = 'x'\nclass = \"nope\"\n";
        assert!(Classifier::load(&[("bad.toml", bad)])
            .err()
            .unwrap()
            .contains("unknown variant"));
    }
}
