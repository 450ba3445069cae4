//! DKIM canonicalisation, relaxed (RFC 6376 §3.4.2 headers, §3.4.4 body), owned by
//! volley: mail-auth 0.13.3 hashes a body that ends in a whitespace-only line with
//! that line kept (`Hello!\n  \n` as `Hello!\r\n\r\n`); its header code drops a
//! form feed as if whitespace and does not match a field written `Name :` to its
//! name (RFC 6376 §3.4.2 makes only SP and HTAB whitespace, and deletes WSP before
//! the colon).
//!
//! Pure functions over a message in memory: no IO, no allocation per line. Line
//! ends are CRLF only; `wire_form` makes any message so before it is signed, so
//! what is hashed is what the SMTP client sends.

use memchr::{memchr, memchr2, memchr_iter, memmem};
use thiserror::Error;

/// A message that cannot be signed as it stands.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    /// A header line with no `name:` and not a continuation; receivers would split
    /// the header from the body somewhere else than the signer did.
    #[error("header line {line} is neither a `Name: value` field nor a folded continuation (a merge value with a line break in a header?)")]
    NotAField { line: usize },
    /// The first header line starts with whitespace: a continuation of nothing.
    #[error("the message starts with whitespace: header line 1 continues no field")]
    LeadingContinuation,
}

/// One header field of a message: offsets into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// The name, without any whitespace before the colon.
    pub name: (usize, usize),
    /// From after the colon to before the field's final CRLF (folds included).
    pub value: (usize, usize),
}

/// Makes `message` what goes on the wire: every lone CR or LF becomes CRLF (RFC
/// 5322 §2.3 allows no other), and it ends in CRLF (the SMTP client adds one
/// otherwise, RFC 5321 §4.1.1.4). Leaves a message that needs neither untouched,
/// without copying it. Receivers differ on what a lone CR or LF is (mail-auth takes
/// a lone LF for a line end and drops a lone CR; dkimpy keeps a CR), so none is sent.
pub fn wire_form(message: &mut Vec<u8>) {
    let lfs = memchr_iter(b'\n', message).count();
    let crs = memchr_iter(b'\r', message).count();
    let paired =
        crs == lfs && memchr_iter(b'\n', message).all(|i| i > 0 && message[i - 1] == b'\r');
    if !paired {
        let mut out = Vec::with_capacity(message.len() + message.len() / 32 + 2);
        let mut i = 0;
        while i < message.len() {
            match memchr2(b'\r', b'\n', &message[i..]) {
                None => {
                    out.extend_from_slice(&message[i..]);
                    break;
                }
                Some(at) => {
                    out.extend_from_slice(&message[i..i + at]);
                    out.extend_from_slice(b"\r\n");
                    let j = i + at;
                    i = if message[j] == b'\r' && message.get(j + 1) == Some(&b'\n') {
                        j + 2
                    } else {
                        j + 1
                    };
                }
            }
        }
        *message = out;
    }
    if !message.is_empty() && !message.ends_with(b"\r\n") {
        message.extend_from_slice(b"\r\n");
    }
}

/// Splits the header of a CRLF-only message into `fields` (cleared first) and
/// returns where the body starts: after the first empty line, or the message's end
/// when it has none (an absent body, which canonicalises as an empty one).
pub fn parse_header(message: &[u8], fields: &mut Vec<Field>) -> Result<usize, HeaderError> {
    fields.clear();
    let mut at = 0;
    let mut line_no = 0;
    while at < message.len() {
        line_no += 1;
        let end = match memchr(b'\n', &message[at..]) {
            Some(i) => at + i + 1,
            None => message.len(),
        };
        let line = &message[at..end];
        let text = line
            .strip_suffix(b"\r\n")
            .or_else(|| line.strip_suffix(b"\n"))
            .unwrap_or(line);
        if text.is_empty() {
            return Ok(end);
        }
        if matches!(text[0], b' ' | b'\t') {
            let last = fields.last_mut().ok_or(HeaderError::LeadingContinuation)?;
            last.value.1 = at + text.len();
        } else {
            let colon = memchr(b':', text).ok_or(HeaderError::NotAField { line: line_no })?;
            let mut name_end = colon;
            while name_end > 0 && matches!(text[name_end - 1], b' ' | b'\t') {
                name_end -= 1;
            }
            // RFC 5322 §3.6.8: a name is printable US-ASCII but for the colon.
            if name_end == 0 || !text[..name_end].iter().all(|c| (0x21..=0x7e).contains(c)) {
                return Err(HeaderError::NotAField { line: line_no });
            }
            fields.push(Field {
                name: (at, at + name_end),
                value: (at + colon + 1, at + text.len()),
            });
        }
        at = end;
    }
    Ok(message.len())
}

/// Appends the relaxed form of one header field (RFC 6376 §3.4.2) to `out`: the
/// name in lower case, a colon, the value unfolded with each run of SP and HTAB
/// made one SP and none at either end, then CRLF.
pub fn relaxed_field(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    out.push(b':');
    let mut space = false;
    let mut started = false;
    let mut i = 0;
    while i < value.len() {
        let c = value[i];
        if c == b'\r' && value.get(i + 1) == Some(&b'\n') {
            // Unfold: the CRLF goes; the WSP after it is a run like any other.
            i += 2;
            continue;
        }
        if c == b' ' || c == b'\t' {
            space = started;
        } else {
            if space {
                out.push(b' ');
                space = false;
            }
            out.push(c);
            started = true;
        }
        i += 1;
    }
    out.extend_from_slice(b"\r\n");
}

/// Hands the relaxed canonical form of `body` (RFC 6376 §3.4.4) to `emit` in
/// pieces, without building it: each line loses its trailing SP and HTAB and has
/// its runs of them made one SP, then the empty lines at the end go, and a body
/// with any text left ends in one CRLF. An empty result is the empty string (not
/// CRLF as for "simple"). Lines end at CRLF only.
///
/// A body already canonical but for its trailing empty lines (what templates render
/// to) is handed over in one piece.
pub fn relaxed_body(body: &[u8], emit: &mut impl FnMut(&[u8])) {
    // Only a tab or two WSP in a row need work inside a line; with neither in the
    // whole body (the usual case), lines are only trimmed at their ends.
    let inner = memchr(b'\t', body).is_some() || memmem::find(body, b"  ").is_some();
    // The verbatim run not yet handed over, and where its text ends (before the
    // CRLF owed for its last line).
    let mut run: Option<usize> = None;
    let mut run_end = 0;
    // Line ends owed before the next text: held back, as they may be trailing.
    let mut owed = 0usize;
    let mut any = false;
    let mut at = 0;
    while at < body.len() {
        let (end, next) = line_end(body, at);
        let mut trimmed = end;
        while trimmed > at && matches!(body[trimmed - 1], b' ' | b'\t') {
            trimmed -= 1;
        }
        if trimmed == at {
            owed += 1;
            at = next;
            continue;
        }
        // Only CRLFs since the run's text (its line end and empty lines): go on.
        let continues = run.is_some() && run_end + 2 * owed == at;
        if !continues {
            if let Some(start) = run {
                emit(&body[start..run_end]);
            }
            emit_crlfs(owed, emit);
            run = Some(at);
        }
        if inner {
            let mut start = run.expect("set above");
            let mut i = at;
            while let Some(w) = memchr2(b' ', b'\t', &body[i..trimmed]) {
                let a = i + w;
                let mut b = a + 1;
                while matches!(body[b], b' ' | b'\t') {
                    b += 1;
                }
                if b - a > 1 || body[a] == b'\t' {
                    emit(&body[start..a]);
                    emit(b" ");
                    start = b;
                }
                i = b;
            }
            run = Some(start);
        }
        run_end = trimmed;
        owed = 1;
        any = true;
        at = next;
    }
    if let Some(start) = run {
        emit(&body[start..run_end]);
    }
    if any {
        emit(b"\r\n");
    }
}

/// The end of the line starting at `at` (before its CRLF) and where the next starts.
fn line_end(body: &[u8], at: usize) -> (usize, usize) {
    let mut from = at;
    while let Some(i) = memchr(b'\n', &body[from..]) {
        let lf = from + i;
        if lf > at && body[lf - 1] == b'\r' {
            return (lf - 1, lf + 1);
        }
        // A lone LF is an ordinary octet of the line.
        from = lf + 1;
    }
    (body.len(), body.len())
}

fn emit_crlfs(n: usize, emit: &mut impl FnMut(&[u8])) {
    const CRLFS: &[u8] = b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n";
    let mut left = n;
    while left > 0 {
        let take = left.min(CRLFS.len() / 2);
        emit(&CRLFS[..take * 2]);
        left -= take;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relaxed(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        relaxed_body(body, &mut |piece| out.extend_from_slice(piece));
        out
    }

    /// RFC 6376 §3.4.4 read literally, by lines: the reference `relaxed_body` must
    /// agree with for every body.
    fn reference(body: &[u8]) -> Vec<u8> {
        let text = body.strip_suffix(b"\r\n").unwrap_or(body);
        let mut lines: Vec<Vec<u8>> = Vec::new();
        for line in split_crlf(text) {
            let mut l = Vec::new();
            for &c in line {
                let wsp = c == b' ' || c == b'\t';
                if !(wsp && l.last() == Some(&b' ')) {
                    l.push(if wsp { b' ' } else { c });
                }
            }
            while l.last() == Some(&b' ') {
                l.pop();
            }
            lines.push(l);
        }
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
            .iter()
            .flat_map(|l| [&l[..], b"\r\n"].concat())
            .collect()
    }

    fn split_crlf(text: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            out.push(&rest[..i]);
            rest = &rest[i + 2..];
        }
        out.push(rest);
        out
    }

    #[test]
    fn the_issues_body_loses_its_whitespace_only_line() {
        assert_eq!(relaxed(b"Hello!\r\n  \r\n\r\n\r\n"), b"Hello!\r\n");
        assert_eq!(relaxed(b"Hello!\r\n\t\r\n"), b"Hello!\r\n");
        // Inside the body the line stays, emptied.
        assert_eq!(relaxed(b"a\r\n \t \r\nb\r\n"), b"a\r\n\r\nb\r\n");
    }

    #[test]
    fn empty_bodies_and_missing_line_ends() {
        // Relaxed: an empty body is the empty string (RFC 6376 §3.4.4, errata 1384).
        assert_eq!(relaxed(b""), b"");
        assert_eq!(relaxed(b"\r\n\r\n"), b"");
        assert_eq!(relaxed(b"  \r\n\t"), b"");
        // Text without a final CRLF gets one.
        assert_eq!(relaxed(b"a  b "), b"a b\r\n");
        assert_eq!(relaxed(b" lead\r\n"), b" lead\r\n");
        // Lone CR and LF are octets of the line, not line ends.
        assert_eq!(relaxed(b"a \rb\nc \r\n"), b"a \rb\nc\r\n");
    }

    #[test]
    fn canonical_bodies_are_handed_over_in_one_piece() {
        let mut pieces = 0;
        relaxed_body(b"Hi Ann,\r\n\r\none two\r\n\r\n\r\n", &mut |_| pieces += 1);
        assert_eq!(pieces, 2, "the text, then its final CRLF");
    }

    #[test]
    fn relaxed_body_agrees_with_the_rfc_read_literally() {
        // Every body of up to 6 octets over this alphabet: exhaustive, not sampled.
        const ALPHABET: &[u8] = b" \t\r\nx";
        let mut body = Vec::new();
        for len in 0..=6u32 {
            for mut n in 0..ALPHABET.len().pow(len) {
                body.clear();
                for _ in 0..len {
                    body.push(ALPHABET[n % ALPHABET.len()]);
                    n /= ALPHABET.len();
                }
                assert_eq!(relaxed(&body), reference(&body), "{body:?}");
            }
        }
    }

    fn field(line: &str) -> String {
        let mut fields = Vec::new();
        let msg = format!("{line}\r\n\r\n");
        parse_header(msg.as_bytes(), &mut fields).unwrap();
        let f = fields[0];
        let mut out = Vec::new();
        let m = msg.as_bytes();
        relaxed_field(&m[f.name.0..f.name.1], &m[f.value.0..f.value.1], &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn header_fields_per_rfc_6376_3_4_2() {
        // The RFC's own example (§3.4.6).
        assert_eq!(field("A: X"), "a:X\r\n");
        assert_eq!(field("B : Y\t\r\n\tZ  "), "b:Y Z\r\n");
        assert_eq!(field("SUBJect: AbC"), "subject:AbC\r\n");
        assert_eq!(field("X-Empty:"), "x-empty:\r\n");
        assert_eq!(field("X-Empty: \t "), "x-empty:\r\n");
        assert_eq!(field("Subject: a\r\n b\r\n\t \tc"), "subject:a b c\r\n");
        // Only SP and HTAB are WSP: a form feed is kept.
        assert_eq!(field("X: a\x0cb \x0c"), "x:a\x0cb \x0c\r\n");
    }

    #[test]
    fn the_header_ends_at_the_first_empty_line_and_every_line_is_a_field() {
        let mut f = Vec::new();
        let m = b"From: a\r\nSubject: x\r\n y\r\n\r\nbody\r\n";
        assert_eq!(parse_header(m, &mut f), Ok(m.len() - 6));
        assert_eq!(f.len(), 2);
        assert_eq!(&m[f[1].value.0..f[1].value.1], b" x\r\n y");
        // No empty line: all header, an absent body.
        assert_eq!(parse_header(b"From: a\r\n", &mut f), Ok(9));
        assert_eq!(
            parse_header(b"From: a\r\nnot a field\r\n\r\nx", &mut f),
            Err(HeaderError::NotAField { line: 2 })
        );
        assert_eq!(
            parse_header(b"From: a\r\n: no name\r\n\r\n", &mut f),
            Err(HeaderError::NotAField { line: 2 })
        );
        assert_eq!(
            parse_header(b" From: a\r\n\r\n", &mut f),
            Err(HeaderError::LeadingContinuation)
        );
    }

    #[test]
    fn the_wire_form_has_crlf_only_and_a_final_crlf() {
        for (raw, wire) in [
            (&b"a\nb\rc\r\nd"[..], &b"a\r\nb\r\nc\r\nd\r\n"[..]),
            (b"\r\r\n\n", b"\r\n\r\n\r\n"),
            (b"a\r\n", b"a\r\n"),
            (b"", b""),
        ] {
            let mut m = raw.to_vec();
            wire_form(&mut m);
            assert_eq!(m, wire, "{raw:?}");
        }
    }
}
