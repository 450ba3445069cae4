//! Replies as operators find them: one line from a log, a DSN or a bounce, with the
//! reply's own lines joined by spaces and wrapped in what the reporting MTA added.
//!
//! Accepted, for example:
//! - `550-5.1.1 The email account ... 550-5.1.1 ... 550 5.1.1 https://...` (a multi-line
//!   reply joined, each line keeping its code prefix, RFC 5321 §4.2.1);
//! - `Diagnostic-Code: smtp; 550 ...` and `smtp;550 ...` (RFC 3464 §2.3.6; PowerMTA's
//!   and KumoMTA's dsnDiag fields carry the same form);
//! - Postfix `host mx.example[192.0.2.1] said: 550 ... (in reply to RCPT TO command)`;
//! - Exim `SMTP error from remote mail server after RCPT TO:<a@b>: host X [ip]: 550 ...`;
//! - qmail `Remote host said: 550 ...`, Sendmail `<<< 550 ...` and `(reason: 550 ...)`;
//! - any of these in quotes.
//!
//! The reply starts at the first three-digit code (2xx to 5xx) that stands alone; what
//! comes before it is the wrapper and is dropped.

use crate::smtp::reply::{Reply, ReplyParser, REPLY_LINE_MAX};
use std::fmt;

/// Why a line could not be read as a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputError {
    /// No reply code (a three-digit 2xx..5xx standing alone) anywhere in the line.
    NoReplyCode,
    /// The reply is longer than a reply line may be ([`REPLY_LINE_MAX`] octets).
    TooLong,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputError::NoReplyCode => {
                f.write_str("no SMTP reply code (2xx to 5xx) found in the line")
            }
            InputError::TooLong => write!(f, "reply over {REPLY_LINE_MAX} octets"),
        }
    }
}

impl std::error::Error for InputError {}

/// Reads one line as found in a log or a DSN into the reply it carries: the code, the
/// enhanced status code when the first line has one (RFC 3463), and the text with the
/// continuation lines' repeated code prefixes and Postfix's "(in reply to ... command)"
/// removed. Errors: [`InputError`].
pub fn parse_logged(line: &str) -> Result<Reply, InputError> {
    let start = code_start(line).ok_or(InputError::NoReplyCode)?;
    let code = &line[start..start + 3];
    let rest = trim_wrapper_end(line[start + 3..].trim_start_matches(['-', ' ']));
    let text = strip_repeated_prefixes(rest, code);
    let joined = format!("{code} {text}");
    if joined.len() > REPLY_LINE_MAX {
        return Err(InputError::TooLong);
    }
    let mut p = ReplyParser::default();
    p.push(joined.as_bytes());
    p.push(b"\r\n");
    match p.next_reply() {
        Some(Ok(r)) => Ok(r),
        // The line was built as "ddd text" from a valid code, so the parser accepts it.
        _ => unreachable!("a line of the form \"ddd text\" parses"),
    }
}

/// Where the reply code starts: three digits, the first 2 to 5, at the start or after a
/// separator a wrapper uses (space, ';', ':', a quote, '(' or '['), and followed by
/// a space, '-' or the end. So "192.0.2.1", "SIZE=1543" and "<123@x>" are passed over.
fn code_start(line: &str) -> Option<usize> {
    let b = line.as_bytes();
    (0..b.len().saturating_sub(2)).find(|&i| {
        let before_ok =
            i == 0 || matches!(b[i - 1], b' ' | b';' | b':' | b'"' | b'\'' | b'(' | b'[');
        let after_ok = matches!(b.get(i + 3), None | Some(b' ') | Some(b'-'));
        before_ok
            && after_ok
            && (b'2'..=b'5').contains(&b[i])
            && b[i + 1].is_ascii_digit()
            && b[i + 2].is_ascii_digit()
    })
}

/// Drops what MTAs append after the reply: Postfix's "(in reply to X command)" (and the
/// ')' of a log line's "status=...(...)"), and a closing quote.
fn trim_wrapper_end(s: &str) -> &str {
    let mut s = s.trim_end();
    loop {
        let before = s;
        if let Some(i) = s.rfind("(in reply to ") {
            if s[i..].trim_end_matches(')').ends_with("command") {
                s = s[..i].trim_end();
            }
        }
        s = s.trim_end_matches(['"', '\'']).trim_end();
        // A wrapper's closing ')' ("(reason: 550 ...)", "status=bounced (host ...)").
        if s.ends_with(')') && s.matches('(').count() < s.matches(')').count() {
            s = s[..s.len() - 1].trim_end();
        }
        if s == before {
            return s;
        }
    }
}

/// A joined multi-line reply repeats "550-5.1.1 " or "550 " on every line; inside the
/// text those prefixes are noise for the rules. Only the reply's own code is removed, so
/// an embedded reply of another code ("... <421 4.4.2 Connection timed out>") stays.
fn strip_repeated_prefixes(text: &str, code: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // After a bare "550" inside the text, an enhanced code is part of the same prefix.
    let mut after_bare_code = false;
    for word in text.split(' ') {
        let prefix_rest = word
            .strip_prefix(code)
            .filter(|r| r.is_empty() || r.starts_with('-'));
        match prefix_rest {
            Some("") => after_bare_code = true,
            Some(r) => {
                after_bare_code = false;
                let r = r.trim_start_matches('-');
                if !is_enhanced(r) {
                    push_word(&mut out, r);
                }
            }
            None if after_bare_code && is_enhanced(word) => after_bare_code = false,
            None => {
                after_bare_code = false;
                push_word(&mut out, word);
            }
        }
    }
    out
}

fn push_word(out: &mut String, w: &str) {
    if w.is_empty() {
        return;
    }
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(w);
}

/// "5.1.1", "4.7.650": class.subject.detail (RFC 3463 §2).
fn is_enhanced(w: &str) -> bool {
    let mut parts = w.split('.');
    let ok = |p: Option<&str>, max: usize| {
        p.is_some_and(|p| !p.is_empty() && p.len() <= max && p.bytes().all(|c| c.is_ascii_digit()))
    };
    ok(parts.next(), 1) && ok(parts.next(), 3) && ok(parts.next(), 3) && parts.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(line: &str) -> (u16, Option<String>, String) {
        let r = parse_logged(line).unwrap();
        (r.code, r.enhanced, r.text)
    }

    #[test]
    fn joined_multi_line_reply_keeps_one_code() {
        let (code, enh, text) = read("550-5.1.1 The email account that you tried to reach does not exist. Please try 550-5.1.1 double-checking the recipient's email address for typos or 550 5.1.1 unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser - gsmtp");
        assert_eq!((code, enh.as_deref()), (550, Some("5.1.1")));
        assert_eq!(text, "The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser - gsmtp");
    }

    #[test]
    fn wrappers_of_dsns_and_logs_are_dropped() {
        let cases = [
            "Diagnostic-Code: smtp; 550 5.1.1 user unknown",
            "smtp;550 5.1.1 user unknown",
            "\"smtp; 550 5.1.1 user unknown\"",
            "host mx.example.com[192.0.2.1] said: 550 5.1.1 user unknown (in reply to RCPT TO command)",
            "status=bounced (host mx.example.com[192.0.2.1] said: 550 5.1.1 user unknown (in reply to RCPT TO command))",
            "SMTP error from remote mail server after RCPT TO:<a123@example.com>: host mx.example.com [192.0.2.1]: 550 5.1.1 user unknown",
            "Remote host said: 550 5.1.1 user unknown",
            "<<< 550 5.1.1 user unknown",
            "(reason: 550 5.1.1 user unknown)",
        ];
        for line in cases {
            assert_eq!(
                read(line),
                (550, Some("5.1.1".to_string()), "user unknown".to_string()),
                "{line}"
            );
        }
    }

    #[test]
    fn embedded_reply_of_another_code_stays_in_the_text() {
        let (code, _, text) = read("Diagnostic-Code: smtp; 554 4.4.7 Message expired: unable to deliver in 840 minutes.<421 4.4.2 Connection timed out>");
        assert_eq!(code, 554);
        assert!(text.ends_with("<421 4.4.2 Connection timed out>"), "{text}");
    }

    #[test]
    fn lines_without_a_reply_code_are_refused() {
        assert_eq!(
            parse_logged(
                "Diagnostic-Code: X-Postfix; connect to host[192.0.2.1]:25: Connection timed out"
            ),
            Err(InputError::NoReplyCode)
        );
        assert_eq!(parse_logged(""), Err(InputError::NoReplyCode));
        assert_eq!(
            parse_logged(&format!("550 {}", "x".repeat(REPLY_LINE_MAX))),
            Err(InputError::TooLong)
        );
    }
}
