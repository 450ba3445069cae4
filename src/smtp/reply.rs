//! SMTP replies (RFC 5321 §4.2) and enhanced status codes (RFC 3463), parsed from
//! a byte stream that may split a reply anywhere.

use std::fmt;

/// Longest reply line we buffer; RFC 5321 says 512, some receivers send more.
pub const REPLY_LINE_MAX: usize = 4096;
/// Lines in one multi-line reply (EHLO replies are the longest legitimate ones).
pub const REPLY_LINES_MAX: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reply {
    pub code: u16,
    /// `class.subject.detail`, when the first line carries one of the same class.
    pub enhanced: Option<String>,
    /// Text of all lines (enhanced code removed from the first), joined with "\n".
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, enhanced: Option<&str>, text: &str) -> Reply {
        Reply {
            code,
            enhanced: enhanced.map(str::to_string),
            text: text.to_string(),
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The receiver's limit on recipients per transaction, not a verdict on this
    /// recipient: 452 (or the older 552, RFC 5321 §4.5.3.1.10) with X.5.3 (RFC 3463
    /// "too many recipients") or saying so. The recipient goes in another transaction.
    pub fn is_too_many_recipients(&self) -> bool {
        matches!(self.code, 452 | 552)
            && (self.enhanced.as_deref().is_some_and(|e| &e[1..] == ".5.3")
                || self
                    .text
                    .to_ascii_lowercase()
                    .contains("too many recipients"))
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.enhanced {
            Some(e) => write!(f, "{} {} {}", self.code, e, self.text.replace('\n', " ")),
            None => write!(f, "{} {}", self.code, self.text.replace('\n', " ")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    LineTooLong,
    TooManyLines,
    /// Not `ddd[ -]text`, or a continuation with another code.
    Malformed(String),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::LineTooLong => write!(f, "reply line over {REPLY_LINE_MAX} octets"),
            ReplyError::TooManyLines => write!(f, "reply of over {REPLY_LINES_MAX} lines"),
            ReplyError::Malformed(l) => write!(f, "malformed reply line {l:?}"),
        }
    }
}

/// Accumulates reply lines; `next` yields complete replies.
#[derive(Default)]
pub struct ReplyParser {
    buf: Vec<u8>,
    lines: Vec<String>,
    code: u16,
}

impl ReplyParser {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete reply, if buffered.
    pub fn next_reply(&mut self) -> Option<Result<Reply, ReplyError>> {
        let mut consumed = 0;
        let result = loop {
            let rest = &self.buf[consumed..];
            let Some(nl) = rest.iter().position(|&c| c == b'\n') else {
                if rest.len() > REPLY_LINE_MAX {
                    break Some(Err(ReplyError::LineTooLong));
                }
                break None;
            };
            if nl > REPLY_LINE_MAX {
                break Some(Err(ReplyError::LineTooLong));
            }
            // Lenient about a bare LF: some receivers send them, and a reply is not data.
            let line = rest[..nl].strip_suffix(b"\r").unwrap_or(&rest[..nl]);
            let line = String::from_utf8_lossy(line).into_owned();
            consumed += nl + 1;
            let b = line.as_bytes();
            let code_ok = b.len() >= 3
                && b[..3].iter().all(u8::is_ascii_digit)
                && (b'2'..=b'5').contains(&b[0]);
            let sep = b.get(3).copied();
            if !code_ok || !matches!(sep, None | Some(b' ') | Some(b'-')) {
                break Some(Err(ReplyError::Malformed(line)));
            }
            let code: u16 = line[..3].parse().expect("three digits");
            if !self.lines.is_empty() && code != self.code {
                break Some(Err(ReplyError::Malformed(line)));
            }
            self.code = code;
            let text = line.get(4..).unwrap_or("").to_string();
            self.lines.push(text);
            if sep == Some(b'-') {
                if self.lines.len() >= REPLY_LINES_MAX {
                    break Some(Err(ReplyError::TooManyLines));
                }
                continue;
            }
            let lines = std::mem::take(&mut self.lines);
            break Some(Ok(build(code, lines)));
        };
        self.buf.drain(..consumed);
        result
    }
}

fn build(code: u16, mut lines: Vec<String>) -> Reply {
    let mut enhanced = None;
    if let Some(first) = lines.first_mut() {
        if let Some((e, rest)) = split_enhanced(first, code) {
            enhanced = Some(e.to_string());
            *first = rest.to_string();
        }
    }
    // Continuation lines often repeat the enhanced code; it says nothing new.
    if let Some(e) = &enhanced {
        for l in lines.iter_mut().skip(1) {
            if let Some(rest) = l.strip_prefix(e.as_str()) {
                *l = rest.trim_start().to_string();
            }
        }
    }
    Reply {
        code,
        enhanced,
        text: lines.join("\n"),
    }
}

/// `4.7.28 text` → ("4.7.28", "text") when the class matches the reply code's.
fn split_enhanced(text: &str, code: u16) -> Option<(&str, &str)> {
    let end = text.find(' ').unwrap_or(text.len());
    let cand = &text[..end];
    let mut parts = cand.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|c| c.is_ascii_digit())
    };
    if parts.next().is_some() || !digits(class, 1) || !digits(subject, 3) || !digits(detail, 3) {
        return None;
    }
    if class.as_bytes()[0] != b'0' + (code / 100) as u8 {
        return None;
    }
    Some((cand, text[end..].trim_start()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiline_split_anywhere() {
        let raw = b"421-4.7.28 Gmail has detected\r\n421-4.7.28 an unusual rate\r\n421 4.7.28 of mail.\r\n250 ok\r\n";
        for split in 0..raw.len() {
            let mut p = ReplyParser::default();
            p.push(&raw[..split]);
            let mut got = Vec::new();
            while let Some(r) = p.next_reply() {
                got.push(r.unwrap());
            }
            p.push(&raw[split..]);
            while let Some(r) = p.next_reply() {
                got.push(r.unwrap());
            }
            assert_eq!(got.len(), 2, "split at {split}");
            assert_eq!(got[0].code, 421);
            assert_eq!(got[0].enhanced.as_deref(), Some("4.7.28"));
            assert_eq!(got[0].text, "Gmail has detected\nan unusual rate\nof mail.");
            assert_eq!(got[1], Reply::new(250, None, "ok"));
        }
    }

    #[test]
    fn too_many_recipients_in_its_spellings() {
        for (line, yes) in [
            ("452 4.5.3 Too many recipients", true),
            ("452 4.5.3 Error: too many recipients", true),
            ("552 5.5.3 Too many recipients", true),
            ("452 Too many recipients received this session", true),
            ("452 4.2.2 Mailbox full", false),
            ("451 4.5.3 odd", false),
            ("550 5.1.1 no such user", false),
        ] {
            let mut p = ReplyParser::default();
            p.push(format!("{line}\r\n").as_bytes());
            let r = p.next_reply().unwrap().unwrap();
            assert_eq!(r.is_too_many_recipients(), yes, "{line}");
        }
    }

    #[test]
    fn garbage_and_limits() {
        let mut p = ReplyParser::default();
        p.push(b"HTTP/1.1 400 Bad Request\r\n");
        assert!(matches!(
            p.next_reply(),
            Some(Err(ReplyError::Malformed(_)))
        ));
        let mut p = ReplyParser::default();
        p.push(b"250-a\r\n251 b\r\n");
        assert!(matches!(
            p.next_reply(),
            Some(Err(ReplyError::Malformed(_)))
        ));
        let mut p = ReplyParser::default();
        p.push(&vec![b'2'; REPLY_LINE_MAX + 10]);
        assert_eq!(p.next_reply(), Some(Err(ReplyError::LineTooLong)));
        let mut p = ReplyParser::default();
        p.push(b"550 4.1.1 class mismatch is not an enhanced code\r\n");
        let r = p.next_reply().unwrap().unwrap();
        assert_eq!(r.enhanced, None);
    }
}
