//! Conversion of a rendered message to 7 bit for a receiver whose EHLO lacks
//! 8BITMIME (RFC 6152 §3: "convert the message to 7 bit ... or return a permanent
//! failure"). Every leaf MIME part whose body has 8-bit octets is re-encoded —
//! quoted-printable for text, base64 for anything else — and nothing else changes:
//! 7-bit parts, boundaries, preamble and epilogue are copied as they are. Runs before
//! DKIM signing, because it changes the body the signature covers.
//!
//! What cannot be converted is refused with an [`Unconvertible`] that tells the
//! operator what to change: raw 8-bit octets in a header field (that needs RFC 2047
//! encoded-words, a separate step not done here, or SMTPUTF8), a part already
//! declared base64 or quoted-printable that still holds 8-bit octets, a multipart
//! whose structure does not parse. Never guessed at: a malformed message is refused
//! whole rather than sent half-converted.

use super::header::{self, ContentType, Field};
use base64::Engine;
use memchr::memmem;
use std::fmt;
use thiserror::Error;

/// Most multipart and message/rfc822 levels inside one another that are converted;
/// a deeper entity is refused ([`Unconvertible::TooDeep`]). Bounds the recursion
/// and the rescans (each level scans its body once for its delimiters). Real mail
/// uses 3 or 4 (mixed > related > alternative).
pub const NESTING_DEPTH_MAX: usize = 16;
/// Longest quoted-printable line in characters, a soft line break's `=` included,
/// the CRLF not (RFC 2045 §6.7 rule 5).
pub const QP_LINE_CHARS_MAX: usize = 76;
/// Characters per line of base64 output, CRLF not counted (RFC 2045 §6.8: at most 76).
pub const BASE64_LINE_CHARS: usize = 76;
/// Longest multipart boundary parameter (RFC 2046 §5.1.1: 1 to 70 characters); a
/// longer or empty one is refused.
pub const BOUNDARY_OCTETS_MAX: usize = 70;

/// Where in a message an entity is: empty for the message itself, else the part
/// numbers from the top, 1-based, as IMAP numbers them (RFC 3501 §6.4.5): `[2, 1]`
/// is the first part of the second part. The parts of an encapsulated message
/// (message/rfc822) continue its part's number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartPath(pub Vec<u32>);

impl fmt::Display for PartPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((first, rest)) = self.0.split_first() else {
            return f.write_str("the message");
        };
        write!(f, "MIME part {first}")?;
        rest.iter().try_for_each(|n| write!(f, ".{n}"))
    }
}

/// Why a message with 8-bit octets cannot be converted to 7 bit. Each reads as a
/// sentence naming the part ([`PartPath`]) and what to change; the caller fails the
/// recipients permanently with it (RFC 6152 §3, enhanced status 5.6.3).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Unconvertible {
    /// A header field has raw 8-bit octets: body encodings do not apply to headers,
    /// and RFC 2047 encoding of header fields is not done here.
    #[error(
        "header field {name} of {part} has raw 8-bit octets, which no body encoding can \
         fix; encode it with RFC 2047 in the template, or send only to receivers that \
         offer 8BITMIME and SMTPUTF8"
    )]
    Header { part: PartPath, name: String },
    /// A part declared base64 or quoted-printable holds 8-bit octets, which those
    /// encodings never produce (RFC 2045 §6.7, §6.8): it is malformed.
    #[error(
        "{part} is declared Content-Transfer-Encoding {encoding} but holds raw 8-bit \
         octets, which that encoding never produces; fix the part's encoding in the \
         template"
    )]
    EncodedButEightBit { part: PartPath, encoding: String },
    /// A part with 8-bit octets has a Content-Transfer-Encoding this module does not
    /// know (an x-token, RFC 2045 §6.3), so its octets cannot be interpreted.
    #[error(
        "{part} has Content-Transfer-Encoding {encoding}, which volley cannot re-encode; \
         use 8bit, quoted-printable or base64 in the template"
    )]
    UnknownEncoding { part: PartPath, encoding: String },
    /// Text with 8-bit octets and no Content-Type, that is not UTF-8: its charset
    /// cannot be declared (RFC 2045 §5.2's default, us-ascii, is wrong for it).
    #[error(
        "{part} has 8-bit text without a Content-Type, and the text is not UTF-8, so its \
         charset is unknown; declare a Content-Type with the charset in the template"
    )]
    UnknownCharset { part: PartPath },
    /// A multipart entity whose parts cannot be found.
    #[error("{part} is {content_type} but {fault}; fix the MIME structure in the template")]
    Multipart {
        part: PartPath,
        /// "multipart/alternative"
        content_type: String,
        fault: MultipartFault,
    },
    /// 8-bit octets in a multipart's preamble or epilogue (RFC 2046 §5.1.1), which
    /// belong to no part and so have no encoding.
    #[error(
        "{part} has raw 8-bit octets in its multipart preamble or epilogue, outside any \
         part, where no encoding applies; remove them from the template"
    )]
    OutsideParts { part: PartPath },
    /// Multiparts or encapsulated messages nested deeper than [`NESTING_DEPTH_MAX`].
    #[error(
        "{part} is nested more than {NESTING_DEPTH_MAX} multipart or message levels \
         deep, more than volley converts; flatten the MIME structure in the template"
    )]
    TooDeep { part: PartPath },
    /// A message/* part other than rfc822 and the RFC 6532 global types with 8-bit
    /// octets: RFC 2046 §5.2 allows only 7bit, 8bit or binary for it, so it can
    /// neither be base64-encoded nor recursed into.
    #[error(
        "{part} is message/{subtype} with raw 8-bit octets, which may not be re-encoded \
         (RFC 2046 §5.2); make it 7-bit in the template"
    )]
    Message { part: PartPath, subtype: String },
}

/// What is wrong with a multipart entity's structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultipartFault {
    /// No `boundary` parameter, or a parameter list that does not parse before it.
    NoBoundary,
    /// A boundary of this many octets: 0 or over [`BOUNDARY_OCTETS_MAX`].
    BoundaryLength(usize),
    /// No line of the body is `--boundary`.
    NoDelimiter,
    /// Parts, but no close delimiter `--boundary--` after them.
    NoClose,
}

impl fmt::Display for MultipartFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoBoundary => f.write_str("has no boundary parameter that parses"),
            Self::BoundaryLength(n) => write!(
                f,
                "its boundary is {n} octets long (RFC 2046 §5.1.1: 1 to {BOUNDARY_OCTETS_MAX})"
            ),
            Self::NoDelimiter => f.write_str("no line of its body is the boundary delimiter"),
            Self::NoClose => f.write_str("its body has no close delimiter (--boundary--)"),
        }
    }
}

/// Converts `message` for a receiver without 8BITMIME (RFC 6152 §3).
///
/// `message` is a rendered RFC 5322 message with CRLF line endings: header section,
/// empty line, body. Returns:
/// - `Ok(None)` when it is already 7 bit (all octets ASCII; one word-at-a-time scan);
/// - `Ok(Some(converted))` otherwise: every leaf part whose body has 8-bit octets
///   re-encoded, quoted-printable (RFC 2045 §6.7) when it is text/* or has no or an
///   unparseable Content-Type (RFC 2045 §5.2 reads those as text/plain), base64
///   (RFC 2045 §6.8) when it is anything else, and its Content-Transfer-Encoding
///   replaced (or added). Decoding a part gives back its octets exactly, bare CR and
///   LF included. A multipart or message/rfc822 entity that declared 8bit or binary
///   is relabelled 7bit. The message gets `MIME-Version: 1.0` if it lacked one, and
///   a part with 8-bit text but no Content-Type gets `Content-Type: text/plain;
///   charset=utf-8` if its text is UTF-8. Everything else is copied octet for octet.
///   The result is ASCII, and its lines are no longer than the input's 7-bit lines
///   or [`QP_LINE_CHARS_MAX`] + CRLF;
/// - `Err` when it cannot be converted (see [`Unconvertible`]).
///
/// message/rfc822 parts are recursed into (their body is a message, converted the
/// same way), since RFC 2046 §5.2.1 forbids encoding them as a whole; message/global
/// (RFC 6532 §3.5) is base64-encoded like any other non-text part; other message/*
/// subtypes with 8-bit octets are refused. Parts of a multipart/digest without a
/// Content-Type are message/rfc822 (RFC 2046 §5.1.5).
///
/// Headers are not converted: raw 8-bit octets in any header field, of the message
/// or of a part, are [`Unconvertible::Header`]. RFC 2047 encoding of header fields
/// is a separate step.
pub fn to_seven_bit(message: &[u8]) -> Result<Option<Vec<u8>>, Unconvertible> {
    if message.is_ascii() {
        return Ok(None);
    }
    // Quoted-printable triples each 8-bit octet; a quarter more fits mostly-ASCII text.
    let mut out = Vec::with_capacity(message.len() + message.len() / 4 + 128);
    Walk {
        path: Vec::new(),
        depth: 0,
        out: &mut out,
    }
    .entity(message, Implicit::TextPlain, true)?;
    assert!(out.is_ascii(), "the conversion left 8-bit octets");
    Ok(Some(out))
}

/// The type of an entity without a Content-Type field.
#[derive(Debug, Clone, Copy)]
enum Implicit {
    /// RFC 2045 §5.2.
    TextPlain,
    /// A part of a multipart/digest (RFC 2046 §5.1.5).
    MessageRfc822,
}

/// How a leaf part's body is re-encoded.
#[derive(Debug, Clone, Copy)]
enum Target {
    QuotedPrintable,
    Base64,
}

/// A walk down a message's entity tree, appending the converted message to `out`.
struct Walk<'o> {
    /// The entity being converted (see [`PartPath`]).
    path: Vec<u32>,
    /// Multipart and message/rfc822 levels entered.
    depth: usize,
    out: &'o mut Vec<u8>,
}

impl Walk<'_> {
    fn part(&self) -> PartPath {
        PartPath(self.path.clone())
    }

    /// Appends `entity` (header section, empty line, body) converted; `is_message`
    /// when it is a message (the top one or an encapsulated one), which must say
    /// MIME-Version when it uses MIME (RFC 2045 §4).
    fn entity(
        &mut self,
        entity: &[u8],
        implicit: Implicit,
        is_message: bool,
    ) -> Result<(), Unconvertible> {
        if entity.is_ascii() {
            self.out.extend_from_slice(entity);
            return Ok(());
        }
        let (head, body) = header::split(entity);
        let fields = header::fields(head);
        if let Some(f) = fields.iter().find(|f| !f.raw.is_ascii()) {
            return Err(Unconvertible::Header {
                part: self.part(),
                name: f.display_name(),
            });
        }
        // Not ASCII, and the header is: there is a body, after an empty line.
        debug_assert!(head.is_empty() || head.ends_with(b"\r\n"));
        let mut added: Vec<&'static [u8]> = Vec::new();
        if is_message && !fields.iter().any(|f| f.is("MIME-Version")) {
            added.push(b"MIME-Version: 1.0\r\n");
        }
        let encoding = fields
            .iter()
            .find(|f| f.is("Content-Transfer-Encoding"))
            .map(|f| encoding_name(&f.value()));
        self.check_encoding(encoding.as_deref())?;
        let ct = fields
            .iter()
            .find(|f| f.is("Content-Type"))
            .map(|f| header::content_type(&f.value()));
        let encoding = encoding.as_deref();
        match shape(ct, implicit, body) {
            Shape::Multipart(ct) => {
                self.header(&fields, &added, composite_encoding(encoding));
                self.multipart(body, &ct)
            }
            Shape::Encapsulated => self.encapsulated(&fields, body, &added, encoding),
            Shape::Leaf(target) => {
                self.leaf(&fields, body, &added, target);
                Ok(())
            }
            Shape::Utf8Text => {
                added.push(b"Content-Type: text/plain; charset=utf-8\r\n");
                self.leaf(&fields, body, &added, Target::QuotedPrintable);
                Ok(())
            }
            Shape::UnknownCharset => Err(Unconvertible::UnknownCharset { part: self.part() }),
            Shape::Message(subtype) => Err(Unconvertible::Message {
                part: self.part(),
                subtype,
            }),
        }
    }

    /// 7bit, 8bit and binary can be re-encoded (the last two are what 8-bit octets
    /// should be labelled; a mislabelled 7bit is re-encoded too).
    fn check_encoding(&self, encoding: Option<&str>) -> Result<(), Unconvertible> {
        match encoding {
            None | Some("7bit" | "8bit" | "binary") => Ok(()),
            Some(e @ ("base64" | "quoted-printable")) => Err(Unconvertible::EncodedButEightBit {
                part: self.part(),
                encoding: e.to_string(),
            }),
            Some(e) => Err(Unconvertible::UnknownEncoding {
                part: self.part(),
                encoding: e.to_string(),
            }),
        }
    }

    fn leaf(&mut self, fields: &[Field<'_>], body: &[u8], added: &[&[u8]], target: Target) {
        let name = match target {
            Target::QuotedPrintable => "quoted-printable",
            Target::Base64 => "base64",
        };
        self.header(fields, added, Some(name));
        match target {
            Target::QuotedPrintable => quoted_printable(body, self.out),
            Target::Base64 => base64_lines(body, self.out),
        }
    }

    /// A message/rfc822 body: a message of its own, converted the same way.
    fn encapsulated(
        &mut self,
        fields: &[Field<'_>],
        body: &[u8],
        added: &[&[u8]],
        encoding: Option<&str>,
    ) -> Result<(), Unconvertible> {
        self.header(fields, added, composite_encoding(encoding));
        self.enter()?;
        self.entity(body, Implicit::TextPlain, true)?;
        self.depth -= 1;
        Ok(())
    }

    fn enter(&mut self) -> Result<(), Unconvertible> {
        if self.depth == NESTING_DEPTH_MAX {
            return Err(Unconvertible::TooDeep { part: self.part() });
        }
        self.depth += 1;
        Ok(())
    }

    /// Appends the header section and the empty line after it: `fields` as they are,
    /// but when `encoding` is given, the first Content-Transfer-Encoding set to it and
    /// any others dropped (or one added after `added` when there is none).
    fn header(&mut self, fields: &[Field<'_>], added: &[&[u8]], encoding: Option<&str>) {
        let cte = |e: &str| format!("Content-Transfer-Encoding: {e}\r\n");
        let mut replaced = false;
        for f in fields {
            match encoding {
                Some(e) if f.is("Content-Transfer-Encoding") => {
                    if !replaced {
                        self.out.extend_from_slice(cte(e).as_bytes());
                    }
                    replaced = true;
                }
                _ => self.out.extend_from_slice(f.raw),
            }
        }
        added.iter().for_each(|a| self.out.extend_from_slice(a));
        if let (Some(e), false) = (encoding, replaced) {
            self.out.extend_from_slice(cte(e).as_bytes());
        }
        self.out.extend_from_slice(b"\r\n");
    }

    /// Appends a multipart body: preamble, delimiters and epilogue as they are, each
    /// part converted (RFC 2046 §5.1.1).
    fn multipart(&mut self, body: &[u8], ct: &ContentType) -> Result<(), Unconvertible> {
        let fault = |fault| Unconvertible::Multipart {
            part: self.part(),
            content_type: format!("multipart/{}", ct.subtype),
            fault,
        };
        let boundary = ct
            .param("boundary")
            .ok_or_else(|| fault(MultipartFault::NoBoundary))?;
        if boundary.is_empty() || boundary.len() > BOUNDARY_OCTETS_MAX {
            return Err(fault(MultipartFault::BoundaryLength(boundary.len())));
        }
        let delims = delimiters(body, boundary);
        match delims.last() {
            None => return Err(fault(MultipartFault::NoDelimiter)),
            Some(d) if !d.close => return Err(fault(MultipartFault::NoClose)),
            Some(_) => {}
        }
        let (first, last) = (delims[0], delims[delims.len() - 1]);
        if !body[..first.start].is_ascii() || !body[last.end..].is_ascii() {
            return Err(Unconvertible::OutsideParts { part: self.part() });
        }
        let implicit = match ct.subtype.as_str() {
            "digest" => Implicit::MessageRfc822,
            _ => Implicit::TextPlain,
        };
        self.enter()?;
        let mut copied = 0;
        for (n, pair) in (1..).zip(delims.windows(2)) {
            let start = pair[0].end;
            // The CRLF before a delimiter line belongs to the delimiter (RFC 2046
            // §5.1.1); with an empty part it is also the end of the previous one.
            let end = pair[1].start.saturating_sub(2).max(start);
            self.out.extend_from_slice(&body[copied..start]);
            self.path.push(n);
            self.entity(&body[start..end], implicit, false)?;
            self.path.pop();
            copied = end;
        }
        self.out.extend_from_slice(&body[copied..]);
        self.depth -= 1;
        Ok(())
    }
}

/// What an entity with 8-bit octets in its body is, for its conversion.
#[derive(Debug)]
enum Shape {
    Multipart(ContentType),
    /// message/rfc822: a message of its own.
    Encapsulated,
    Leaf(Target),
    /// No Content-Type, text that is UTF-8.
    Utf8Text,
    /// No Content-Type, text that is not UTF-8.
    UnknownCharset,
    /// A message/* subtype that may not be re-encoded.
    Message(String),
}

/// Reads an entity's Content-Type: `ct` is `None` without the field, `Some(None)`
/// with one that does not parse (RFC 2045 §5.2: read as text/plain).
fn shape(ct: Option<Option<ContentType>>, implicit: Implicit, body: &[u8]) -> Shape {
    let ct = match (ct, implicit) {
        (None, Implicit::MessageRfc822) => return Shape::Encapsulated,
        (None, Implicit::TextPlain) if std::str::from_utf8(body).is_ok() => return Shape::Utf8Text,
        (None, Implicit::TextPlain) => return Shape::UnknownCharset,
        (Some(None), _) => return Shape::Leaf(Target::QuotedPrintable),
        (Some(Some(ct)), _) => ct,
    };
    match (ct.kind.as_str(), ct.subtype.as_str()) {
        ("multipart", _) => Shape::Multipart(ct),
        ("message", "rfc822") => Shape::Encapsulated,
        // RFC 6532 §3.5 (and RFC 6533 for the other global types): they may be encoded.
        ("message", sub) if !sub.starts_with("global") => Shape::Message(sub.to_string()),
        ("text", _) => Shape::Leaf(Target::QuotedPrintable),
        _ => Shape::Leaf(Target::Base64),
    }
}

/// A composite entity's new Content-Transfer-Encoding: 7bit once its parts are, if
/// it said 8bit or binary (RFC 2045 §6.4 allows it only 7bit, 8bit or binary).
fn composite_encoding(encoding: Option<&str>) -> Option<&'static str> {
    matches!(encoding, Some("8bit" | "binary")).then_some("7bit")
}

/// The mechanism of a Content-Transfer-Encoding value, lowercased, without a comment
/// or anything after white space.
fn encoding_name(value: &[u8]) -> String {
    let end = value
        .iter()
        .position(|c| matches!(c, b' ' | b'\t' | b'(' | b';'))
        .unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).to_ascii_lowercase()
}

/// A boundary delimiter line: `start` is its first octet (after the CRLF before it),
/// `end` is after its CRLF (or the end of the body).
#[derive(Debug, Clone, Copy)]
struct Delimiter {
    start: usize,
    end: usize,
    close: bool,
}

/// The delimiter lines of a multipart body up to and including the first close
/// delimiter. A line is one when it is `--boundary`, then `--` for the close one,
/// then only spaces and tabs (RFC 2046 §5.1.1's transport padding); a line that
/// merely starts with it (`--boundaryX`) is not.
fn delimiters(body: &[u8], boundary: &[u8]) -> Vec<Delimiter> {
    let mut pattern = Vec::with_capacity(boundary.len() + 4);
    pattern.extend_from_slice(b"\r\n--");
    pattern.extend_from_slice(boundary);
    let dash_boundary = &pattern[2..];
    let at_start = body.starts_with(dash_boundary).then_some(0);
    let after_crlf = memmem::find_iter(body, &pattern).map(|i| i + 2);
    let mut out = Vec::new();
    for start in at_start.into_iter().chain(after_crlf) {
        let mut i = start + dash_boundary.len();
        let close = body[i..].starts_with(b"--");
        i += if close { 2 } else { 0 };
        while i < body.len() && matches!(body[i], b' ' | b'\t') {
            i += 1;
        }
        let end = if i == body.len() {
            i
        } else if body[i..].starts_with(b"\r\n") {
            i + 2
        } else {
            continue;
        };
        out.push(Delimiter { start, end, close });
        if close {
            break;
        }
    }
    out
}

/// Appends `body` quoted-printable encoded (RFC 2045 §6.7). Each CRLF stays a hard
/// line break; every other octet outside printable ASCII, `=`, and a space or tab
/// ending a line becomes `=XX`; lines over [`QP_LINE_CHARS_MAX`] get soft breaks. A
/// line's leading `.` and the `F` of a leading `From ` are encoded too (RFC 2049 §3),
/// so relays that dot-stuff badly or write mbox files leave the text alone.
fn quoted_printable(body: &[u8], out: &mut Vec<u8>) {
    let mut rest = body;
    loop {
        match memmem::find(rest, b"\r\n") {
            Some(i) => {
                quoted_printable_line(&rest[..i], out);
                out.extend_from_slice(b"\r\n");
                rest = &rest[i + 2..];
            }
            None => {
                quoted_printable_line(rest, out);
                return;
            }
        }
    }
}

/// One hard line, without its CRLF.
fn quoted_printable_line(line: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut col = 0;
    for (i, &c) in line.iter().enumerate() {
        let last = i + 1 == line.len();
        let literal_here = |col: usize| match c {
            b'.' | b'F' if col == 0 => c == b'F' && !line[i..].starts_with(b"From "),
            b' ' | b'\t' => !last,
            b'=' => false,
            _ => c.is_ascii_graphic(),
        };
        let width = if literal_here(col) { 1 } else { 3 };
        // A line that goes on needs room for the soft break's '='.
        let room = if last {
            QP_LINE_CHARS_MAX
        } else {
            QP_LINE_CHARS_MAX - 1
        };
        if col + width > room {
            out.extend_from_slice(b"=\r\n");
            col = 0;
        }
        if literal_here(col) {
            out.push(c);
            col += 1;
        } else {
            out.extend_from_slice(&[b'=', HEX[usize::from(c >> 4)], HEX[usize::from(c & 15)]]);
            col += 3;
        }
    }
}

/// Appends `body` base64 encoded (RFC 2045 §6.8) in lines of [`BASE64_LINE_CHARS`],
/// ending in CRLF if `body` did (so a message that ended in CRLF still does).
pub fn base64_lines(body: &[u8], out: &mut Vec<u8>) {
    let text = base64::engine::general_purpose::STANDARD.encode(body);
    for (i, line) in text.as_bytes().chunks(BASE64_LINE_CHARS).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(line);
    }
    if body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    /// Splits at CRLF; a final segment without one is a line too (possibly empty).
    fn lines(s: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(i) = memmem::find(rest, b"\r\n") {
            out.push(&rest[..i]);
            rest = &rest[i + 2..];
        }
        out.push(rest);
        out
    }

    /// A strict decoder: only `=XX` with upper-case hex, soft breaks, and literal
    /// printable ASCII, space and tab, never at the end of a line.
    fn qp_decode(s: &[u8]) -> Vec<u8> {
        let hex = |c: u8| match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'F' => c - b'A' + 10,
            _ => panic!("bad hex digit {c:#x}"),
        };
        let all = lines(s);
        let mut out = Vec::new();
        for (n, line) in all.iter().enumerate() {
            assert!(line.len() <= QP_LINE_CHARS_MAX, "QP line of {}", line.len());
            assert!(!line.ends_with(b" ") && !line.ends_with(b"\t"));
            let (text, soft) = match line.strip_suffix(b"=") {
                Some(t) => (t, true),
                None => (*line, false),
            };
            let mut i = 0;
            while i < text.len() {
                if text[i] == b'=' {
                    out.push(hex(text[i + 1]) << 4 | hex(text[i + 2]));
                    i += 3;
                } else {
                    assert!(text[i].is_ascii_graphic() || matches!(text[i], b' ' | b'\t'));
                    out.push(text[i]);
                    i += 1;
                }
            }
            if !soft && n + 1 < all.len() {
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }

    fn b64_decode(s: &[u8]) -> Vec<u8> {
        for l in lines(s) {
            assert!(l.len() <= BASE64_LINE_CHARS);
        }
        let text: Vec<u8> = s
            .iter()
            .copied()
            .filter(|&c| c != b'\r' && c != b'\n')
            .collect();
        B64.decode(text).unwrap()
    }

    fn split(entity: &[u8]) -> (&[u8], &[u8]) {
        let i = memmem::find(entity, b"\r\n\r\n").expect("a header section");
        (&entity[..i + 2], &entity[i + 4..])
    }

    /// The values of header field `name` in `head` (no folding in these tests).
    fn values<'a>(head: &'a [u8], name: &str) -> Vec<&'a [u8]> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        lines(head)
            .into_iter()
            .filter(|l| l.to_ascii_lowercase().starts_with(prefix.as_bytes()))
            .map(|l| l[prefix.len()..].trim_ascii())
            .collect()
    }

    /// The decoded body of an entity, after checking it has one encoding.
    fn decoded(entity: &[u8]) -> Vec<u8> {
        let (head, body) = split(entity);
        match values(head, "Content-Transfer-Encoding")[..] {
            [b"quoted-printable"] => qp_decode(body),
            [b"base64"] => b64_decode(body),
            ref other => panic!("encodings {other:?}"),
        }
    }

    /// (preamble, parts, epilogue) by the test's own reading of RFC 2046 §5.1.1.
    fn parts(body: &[u8], boundary: &str) -> (Vec<u8>, Vec<Vec<u8>>, Vec<u8>) {
        // Every delimiter has a CRLF before it, the first too when there is no preamble.
        let body = [&b"\r\n"[..], body].concat();
        let delim = format!("\r\n--{boundary}");
        let mut pieces: Vec<&[u8]> = Vec::new();
        let mut rest = &body[..];
        while let Some(i) = memmem::find(rest, delim.as_bytes()) {
            pieces.push(&rest[..i]);
            rest = &rest[i + delim.len()..];
        }
        // Each piece after the first starts with the rest of its delimiter line.
        let after_line = |p: &[u8]| p[memmem::find(p, b"\r\n").unwrap() + 2..].to_vec();
        assert!(rest.starts_with(b"--"), "ends with a close delimiter");
        let parts = pieces[1..].iter().map(|p| after_line(p)).collect();
        let preamble = pieces[0].get(2..).unwrap_or_default().to_vec();
        (preamble, parts, after_line(rest))
    }

    const HEAD: &str = "From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\
        MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
        Content-Transfer-Encoding: 8bit\r\n";

    #[test]
    fn seven_bit_message_is_left_alone() {
        let m = format!("{HEAD}\r\nplain ASCII\r\n");
        assert_eq!(to_seven_bit(m.as_bytes()), Ok(None));
    }

    #[test]
    fn utf8_text_becomes_quoted_printable_that_decodes_back() {
        let body = format!(
            "Grüße aus Köln =) \r\n{}\r\n.\r\nFrom here\r\n\tindented tab\t\r\nend",
            "ünïcödé ".repeat(40)
        );
        let m = format!("{HEAD}\r\n{body}\r\n");
        let out = to_seven_bit(m.as_bytes()).unwrap().unwrap();
        assert!(out.is_ascii());
        let (head, enc) = split(&out);
        assert_eq!(
            head,
            HEAD.replace("8bit", "quoted-printable").as_bytes(),
            "only the encoding changes"
        );
        for l in lines(enc) {
            assert!(l.len() + 2 <= 78, "{}", String::from_utf8_lossy(l));
        }
        assert_eq!(qp_decode(enc), format!("{body}\r\n").as_bytes());
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.contains("\r\n=2E\r\n=46rom here\r\n"), "{text}");
        assert!(text.contains("=3D)=20\r\n"), "{text}");
    }

    fn alternative() -> (String, [String; 5]) {
        let pieces = [
            "This is a multi-part message in MIME format.\r\n".to_string(),
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
             Prix : 10 €, déjà payé.\r\n"
                .to_string(),
            "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
             <p>Prix : 10 €</p>"
                .to_string(),
            "Content-Type: text/plain; charset=us-ascii\r\n\r\nPlain ASCII, left alone."
                .to_string(),
            "epilogue\r\n".to_string(),
        ];
        // The Content-Type is folded, its parameter name upper case, the value quoted.
        let m = format!(
            "From: a@example.com\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/alternative;\r\n\tBOUNDARY=\"=_b0und ary\"\r\n\r\n\
             {}--=_b0und ary\r\n{}\r\n--=_b0und ary\r\n{}\r\n--=_b0und ary  \r\n{}\r\n\
             --=_b0und ary--\r\n{}",
            pieces[0], pieces[1], pieces[2], pieces[3], pieces[4]
        );
        (m, pieces)
    }

    #[test]
    fn multipart_only_the_8bit_parts_change() {
        let (m, pieces) = alternative();
        let out = to_seven_bit(m.as_bytes()).unwrap().unwrap();
        assert!(out.is_ascii());
        let (head, body) = split(&out);
        assert_eq!(head, split(m.as_bytes()).0);
        let (preamble, got, epilogue) = parts(body, "=_b0und ary");
        assert_eq!(preamble, pieces[0].trim_end().as_bytes());
        assert_eq!(epilogue, pieces[4].as_bytes());
        assert_eq!(got.len(), 3);
        for (i, part) in got[..2].iter().enumerate() {
            let want = split(pieces[i + 1].as_bytes()).1;
            assert_eq!(decoded(part), want);
        }
        assert_eq!(got[2], pieces[3].as_bytes());
        // The transport padding after the third delimiter is kept.
        assert!(memmem::find(&out, b"--=_b0und ary  \r\n").is_some());
    }

    #[test]
    fn non_text_part_becomes_base64() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut m = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
            --b\r\nContent-Type: application/octet-stream\r\n\
            Content-Transfer-Encoding: binary\r\n\r\n"
            .to_vec();
        m.extend_from_slice(&data);
        m.extend_from_slice(b"\r\n--b--\r\n");
        let out = to_seven_bit(&m).unwrap().unwrap();
        let (_, body) = split(&out);
        let (_, got, _) = parts(body, "b");
        assert_eq!(decoded(&got[0]), data);
        // At the top, the body's last CRLF is encoded and the message still ends in one.
        let top = b"MIME-Version: 1.0\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n";
        let out = to_seven_bit(top).unwrap().unwrap();
        assert!(out.ends_with(b"\r\n"));
        assert_eq!(decoded(&out), b"\x89PNG\r\n");
    }

    #[test]
    fn message_without_content_type_is_declared_utf8_text_if_it_is() {
        let out = to_seven_bit("Subject: x\r\n\r\nnaïve\r\n".as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(
            out,
            b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
              Content-Transfer-Encoding: quoted-printable\r\n\r\nna=C3=AFve\r\n"
        );
        let latin1 = b"Subject: x\r\n\r\nna\xefve\r\n";
        let e = to_seven_bit(latin1).unwrap_err();
        assert_eq!(
            e,
            Unconvertible::UnknownCharset {
                part: PartPath::default()
            }
        );
        assert!(e
            .to_string()
            .starts_with("the message has 8-bit text without"));
    }

    #[test]
    fn raw_8bit_header_is_refused_with_its_name() {
        let m = "Subject: Grüße\r\nContent-Type: text/plain\r\n\r\nbody ü\r\n";
        let e = to_seven_bit(m.as_bytes()).unwrap_err();
        assert_eq!(
            e,
            Unconvertible::Header {
                part: PartPath::default(),
                name: "Subject".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "header field Subject of the message has raw 8-bit octets, which no body \
             encoding can fix; encode it with RFC 2047 in the template, or send only to \
             receivers that offer 8BITMIME and SMTPUTF8"
        );
        let (m, _) = alternative();
        let m = m.replace("text/html;", "text/html; name=\"prix-€.html\";");
        let e = to_seven_bit(m.as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string().split(',').next().unwrap(),
            "header field Content-Type of MIME part 2 has raw 8-bit octets"
        );
    }

    #[test]
    fn encoded_parts_with_8bit_octets_are_malformed() {
        for (cte, want) in [
            ("base64", "is declared Content-Transfer-Encoding base64"),
            (
                "Quoted-Printable",
                "is declared Content-Transfer-Encoding quoted-printable",
            ),
            ("x-uuencode", "has Content-Transfer-Encoding x-uuencode"),
        ] {
            let m =
                format!("Content-Type: text/plain\r\nContent-Transfer-Encoding: {cte}\r\n\r\nü");
            let e = to_seven_bit(m.as_bytes()).unwrap_err().to_string();
            assert!(e.starts_with(&format!("the message {want}")), "{e}");
        }
    }

    fn multipart_error(m: &str) -> Unconvertible {
        to_seven_bit(m.as_bytes()).unwrap_err()
    }

    #[test]
    fn malformed_multiparts_are_refused() {
        let fault = |f| Unconvertible::Multipart {
            part: PartPath::default(),
            content_type: "multipart/mixed".into(),
            fault: f,
        };
        let head = "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n";
        let part = "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nü";
        let unterminated = format!("{head}{part}\r\n");
        assert_eq!(
            multipart_error(&unterminated),
            fault(MultipartFault::NoClose)
        );
        let missing = format!("{head}--bX\r\nü\r\n--bX--\r\n");
        assert_eq!(
            multipart_error(&missing),
            fault(MultipartFault::NoDelimiter)
        );
        let no_param =
            format!("Content-Type: multipart/mixed; charset=x\r\n\r\n{part}\r\n--b--\r\n");
        assert_eq!(
            multipart_error(&no_param),
            fault(MultipartFault::NoBoundary)
        );
        let bad_params =
            format!("Content-Type: multipart/mixed; boundary\r\n\r\n{part}\r\n--b--\r\n");
        assert_eq!(
            multipart_error(&bad_params),
            fault(MultipartFault::NoBoundary)
        );
        let long = "x".repeat(BOUNDARY_OCTETS_MAX + 1);
        let too_long = format!(
            "Content-Type: multipart/mixed; boundary={long}\r\n\r\n--{long}\r\nü\r\n--{long}--\r\n"
        );
        assert_eq!(
            multipart_error(&too_long),
            fault(MultipartFault::BoundaryLength(71))
        );
        let preamble = format!("{head}préambule\r\n{part}\r\n--b--\r\n");
        assert_eq!(
            multipart_error(&preamble),
            Unconvertible::OutsideParts {
                part: PartPath::default()
            }
        );
        let epilogue = format!("{head}{part}\r\n--b--\r\nfin ü\r\n");
        assert_eq!(
            multipart_error(&epilogue),
            Unconvertible::OutsideParts {
                part: PartPath::default()
            }
        );
        let e = multipart_error(&unterminated).to_string();
        assert_eq!(
            e,
            "the message is multipart/mixed but its body has no close delimiter \
             (--boundary--); fix the MIME structure in the template"
        );
    }

    /// `depth` multiparts inside one another around one 8-bit text part.
    fn nested(depth: usize) -> String {
        let mut m = "Content-Type: text/plain; charset=utf-8\r\n\r\nü".to_string();
        for d in 0..depth {
            m = format!(
                "Content-Type: multipart/mixed; boundary=b{d}\r\n\r\n--b{d}\r\n{m}\r\n--b{d}--"
            );
        }
        m
    }

    #[test]
    fn nesting_is_converted_to_the_limit_and_refused_past_it() {
        let out = to_seven_bit(nested(NESTING_DEPTH_MAX).as_bytes())
            .unwrap()
            .unwrap();
        assert!(memmem::find(&out, b"\r\n\r\n=C3=BC\r\n--b0--\r\n").is_some());
        let e = to_seven_bit(nested(NESTING_DEPTH_MAX + 1).as_bytes()).unwrap_err();
        let path = PartPath(vec![1; NESTING_DEPTH_MAX]);
        assert_eq!(e, Unconvertible::TooDeep { part: path });
        assert!(e
            .to_string()
            .starts_with("MIME part 1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1 is nested more than 16"));
    }

    #[test]
    fn encapsulated_messages_are_converted_inside() {
        let m = "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
                 --b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
                 Subject: fwd\r\n\r\nvoilà\r\n--b--\r\n";
        let out = to_seven_bit(m.as_bytes()).unwrap().unwrap();
        let want = "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
                 --b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\n\
                 Subject: fwd\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Transfer-Encoding: quoted-printable\r\n\r\nvoil=C3=A0\r\n--b--\r\n";
        assert_eq!(String::from_utf8(out).unwrap(), want);
        let status = m.replace("message/rfc822", "message/delivery-status");
        let e = to_seven_bit(status.as_bytes()).unwrap_err();
        assert_eq!(
            e,
            Unconvertible::Message {
                part: PartPath(vec![1]),
                subtype: "delivery-status".into()
            }
        );
    }

    /// A random body: lines of 0 to 2000 octets with 8-bit octets, control characters,
    /// `=`, spaces and tabs before the CRLF, leading `.`, `From ` and `=`.
    fn random_body(rng: &mut fastrand::Rng) -> Vec<u8> {
        let mut b = Vec::new();
        let n = rng.usize(0..10);
        for i in 0..n {
            match rng.u8(0..6) {
                0 => b.push(b'.'),
                1 => b.extend_from_slice(b"From "),
                2 => b.push(b'='),
                _ => {}
            }
            let len = if rng.u8(0..4) == 0 {
                rng.usize(0..=2000)
            } else {
                rng.usize(0..100)
            };
            for _ in 0..len {
                b.push(match rng.u8(0..10) {
                    0..=4 => rng.u8(0x20..0x7f),
                    5 => rng.u8(0x80..=0xff),
                    6 => b' ',
                    7 => b'\t',
                    8 => b'=',
                    _ => rng.u8(..),
                });
            }
            match rng.u8(0..4) {
                0 => b.push(b' '),
                1 => b.push(b'\t'),
                _ => {}
            }
            if i + 1 < n || rng.bool() {
                b.extend_from_slice(b"\r\n");
            }
        }
        b
    }

    #[test]
    fn random_bodies_convert_and_decode_back() {
        let seed = std::env::var("VOLLEY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        // Shown with the failure, should to_seven_bit panic.
        eprintln!("seed {seed}");
        let mut rng = fastrand::Rng::with_seed(seed);
        for case in 0..3000 {
            let why = format!("seed {seed} (VOLLEY_TEST_SEED), case {case}");
            let text = random_body(&mut rng);
            let data = random_body(&mut rng);
            let multipart = rng.bool();
            let mut m = Vec::new();
            if multipart {
                m.extend_from_slice(
                    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"=_b\"\r\n\
                      \r\n--=_b\r\n",
                );
                m.extend_from_slice(
                    HEAD.split_once("MIME-Version: 1.0\r\n")
                        .unwrap()
                        .1
                        .as_bytes(),
                );
                m.extend_from_slice(b"\r\n");
                m.extend_from_slice(&text);
                m.extend_from_slice(b"\r\n--=_b\r\nContent-Type: application/pdf\r\n\r\n");
                m.extend_from_slice(&data);
                m.extend_from_slice(b"\r\n--=_b--\r\n");
            } else {
                m.extend_from_slice(HEAD.as_bytes());
                m.extend_from_slice(b"\r\n");
                m.extend_from_slice(&text);
            }
            let Some(out) = to_seven_bit(&m).unwrap_or_else(|e| panic!("{why}: {e}")) else {
                assert!(m.is_ascii(), "{why}");
                continue;
            };
            assert!(out.is_ascii(), "{why}");
            assert!(lines(&out).iter().all(|l| l.len() <= 998), "{why}");
            let (_, body) = split(&out);
            let (text_part, data_part) = if multipart {
                let (_, got, _) = parts(body, "=_b");
                assert_eq!(got.len(), 2, "{why}");
                (got[0].clone(), Some(got[1].clone()))
            } else {
                (out.clone(), None)
            };
            let plain = |p: &[u8]| split(p).1.to_vec();
            let got_text = if text.is_ascii() && multipart {
                plain(&text_part)
            } else {
                decoded(&text_part)
            };
            assert_eq!(got_text, text, "{why}");
            if let Some(p) = data_part {
                let got_data = if data.is_ascii() {
                    plain(&p)
                } else {
                    decoded(&p)
                };
                assert_eq!(got_data, data, "{why}");
            }
        }
    }

    #[test]
    fn damaged_messages_never_panic_nor_come_out_8bit() {
        let seed = fastrand::u64(..);
        eprintln!("seed {seed}");
        let mut rng = fastrand::Rng::with_seed(seed);
        let (m, _) = alternative();
        let m = m.into_bytes();
        for case in 0..3000 {
            let mut d = m.clone();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(0..d.len());
                match rng.u8(0..3) {
                    0 => d.truncate(i),
                    1 => d[i] = rng.u8(..),
                    _ => {
                        d.remove(i);
                    }
                }
                if d.is_empty() {
                    break;
                }
            }
            if let Ok(Some(out)) = to_seven_bit(&d) {
                assert!(out.is_ascii(), "seed {seed}, case {case}");
            }
        }
    }
}
