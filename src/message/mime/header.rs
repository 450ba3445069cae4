//! Reading an entity's header section (RFC 5322 §2.2, RFC 2045 §5.1): where it ends,
//! its fields with their folded lines, and Content-Type with its parameters. Lenient
//! where being lenient cannot change the meaning, strict where it could (a multipart
//! whose parameters do not parse is reported, not guessed at).

use memchr::memmem;

/// Splits an entity at the empty line after its header section: (header section with
/// the CRLF of its last line, body). An entity that starts with CRLF has no header
/// fields; one without an empty line is all header and no body (RFC 5322 §3.5).
pub(crate) fn split(entity: &[u8]) -> (&[u8], &[u8]) {
    if entity.starts_with(b"\r\n") {
        return (&[], &entity[2..]);
    }
    match memmem::find(entity, b"\r\n\r\n") {
        Some(i) => (&entity[..i + 2], &entity[i + 4..]),
        None => (entity, &[]),
    }
}

/// One header field as written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field<'a> {
    /// The octets before the colon (the whole first line when there is no colon).
    pub(crate) name: &'a [u8],
    /// Every line of the field, CRLFs included, as it appears in the message.
    pub(crate) raw: &'a [u8],
}

impl Field<'_> {
    /// Whether this is the field `name` (field names are case-insensitive, RFC 5322 §1.2.2).
    pub(crate) fn is(&self, name: &str) -> bool {
        self.name
            .trim_ascii_end()
            .eq_ignore_ascii_case(name.as_bytes())
    }

    /// The value after the colon, unfolded (RFC 5322 §2.2.3: a CRLF before white
    /// space is removed), without surrounding white space.
    pub(crate) fn value(&self) -> Vec<u8> {
        let after = match memchr::memchr(b':', self.raw) {
            Some(i) => &self.raw[i + 1..],
            None => &[][..],
        };
        let mut v = Vec::with_capacity(after.len());
        let mut rest = after;
        while let Some(i) = memmem::find(rest, b"\r\n") {
            v.extend_from_slice(&rest[..i]);
            rest = &rest[i + 2..];
        }
        v.extend_from_slice(rest);
        v.trim_ascii().to_vec()
    }

    /// The name for messages to an operator.
    pub(crate) fn display_name(&self) -> String {
        // A continuation line at the start of a section has no name; show its start.
        let name = match self.name.trim_ascii() {
            [] => self.raw.trim_ascii(),
            name => name,
        };
        String::from_utf8_lossy(&name[..name.len().min(40)]).into_owned()
    }
}

/// The fields of a header section from [`split`]. A continuation line (starting with
/// SP or HTAB) belongs to the field before it; one at the very start is a field of
/// its own with an empty name.
pub(crate) fn fields(header: &[u8]) -> Vec<Field<'_>> {
    // (start of the field, end of its name, end of its last line)
    let mut spans: Vec<(usize, usize, usize)> = Vec::new();
    let mut start = 0;
    while start < header.len() {
        let end = match memmem::find(&header[start..], b"\r\n") {
            Some(i) => start + i + 2,
            None => header.len(),
        };
        let line = &header[start..end];
        let continues = matches!(line[0], b' ' | b'\t');
        match spans.last_mut() {
            Some(span) if continues => span.2 = end,
            _ => {
                let name_len = match memchr::memchr(b':', line) {
                    Some(i) => i,
                    None if continues => 0,
                    None => line.trim_ascii_end().len(),
                };
                spans.push((start, start + name_len, end));
            }
        }
        start = end;
    }
    spans
        .into_iter()
        .map(|(start, name_end, end)| Field {
            name: &header[start..name_end],
            raw: &header[start..end],
        })
        .collect()
}

/// A parsed Content-Type (RFC 2045 §5.1): type and subtype lowercased, parameters
/// with lowercased names and their values unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContentType {
    pub(crate) kind: String,
    pub(crate) subtype: String,
    pub(crate) params: Vec<(String, Vec<u8>)>,
    /// The parameter list stopped at something that is not `; name=value`: `params`
    /// holds those before it.
    pub(crate) params_malformed: bool,
}

impl ContentType {
    /// The value of parameter `name` (lowercase), the first if it is given twice.
    /// RFC 2231 continuations (`name*0=`) are not joined.
    pub(crate) fn param(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Parses an unfolded Content-Type value; `None` when there is no `type/subtype`
/// (RFC 2045 §5.2 then has the entity read as text/plain).
pub(crate) fn content_type(value: &[u8]) -> Option<ContentType> {
    let v = strip_comments(value);
    let mut p = Cursor { s: &v, i: 0 };
    p.skip_ws();
    let kind = p.token()?;
    p.skip_ws();
    if !p.eat(b'/') {
        return None;
    }
    p.skip_ws();
    let subtype = p.token()?;
    let mut ct = ContentType {
        kind: kind.to_ascii_lowercase(),
        subtype: subtype.to_ascii_lowercase(),
        params: Vec::new(),
        params_malformed: false,
    };
    loop {
        p.skip_ws();
        if p.at_end() {
            break;
        }
        if !p.eat(b';') {
            ct.params_malformed = true;
            break;
        }
        p.skip_ws();
        if p.at_end() {
            break; // a trailing ';' is common and harmless
        }
        match p.param() {
            Some((n, val)) => ct.params.push((n.to_ascii_lowercase(), val)),
            None => {
                ct.params_malformed = true;
                break;
            }
        }
    }
    Some(ct)
}

/// The end (just after its `)`) of the RFC 5322 §3.2.2 comment opening at
/// `b[start]`, nested comments and quoted pairs in it; None when it is not closed.
pub(crate) fn comment_end(b: &[u8], start: usize) -> Option<usize> {
    let (mut i, mut depth) = (start, 0usize);
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The value with RFC 5322 comments (parenthesised, nestable, outside quoted strings)
/// replaced by a space.
fn strip_comments(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    for &c in value {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            b'\\' if quoted || depth > 0 => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            b'"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            b'(' if !quoted => {
                if depth == 0 {
                    out.push(b' ');
                }
                depth += 1;
            }
            b')' if !quoted && depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }

    fn skip_ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t') {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.s.get(self.i) == Some(&c);
        self.i += usize::from(hit);
        hit
    }

    /// An RFC 2045 §5.1 token: printable ASCII but tspecials, as a str.
    fn token(&mut self) -> Option<&'a str> {
        let start = self.i;
        while self.i < self.s.len() && is_token_char(self.s[self.i]) {
            self.i += 1;
        }
        let t: &'a [u8] = &self.s[start..self.i];
        (!t.is_empty()).then(|| std::str::from_utf8(t).expect("token octets are ASCII"))
    }

    /// `attribute "=" value`, value a token or a quoted-string (RFC 5322 §3.2.4).
    fn param(&mut self) -> Option<(String, Vec<u8>)> {
        let name = self.token()?.to_string();
        self.skip_ws();
        if !self.eat(b'=') {
            return None;
        }
        self.skip_ws();
        if !self.eat(b'"') {
            return Some((name, self.token()?.as_bytes().to_vec()));
        }
        let mut val = Vec::new();
        while self.i < self.s.len() {
            let c = self.s[self.i];
            self.i += 1;
            match c {
                b'"' => return Some((name, val)),
                b'\\' if self.i < self.s.len() => {
                    val.push(self.s[self.i]);
                    self.i += 1;
                }
                _ => val.push(c),
            }
        }
        None // no closing quote
    }
}

fn is_token_char(c: u8) -> bool {
    c.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?=".contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(v: &str) -> ContentType {
        content_type(v.as_bytes()).unwrap()
    }

    #[test]
    fn content_type_parameters_quoted_or_not_any_case() {
        let c = ct("Multipart/Mixed; BOUNDARY=\"a b\\\"c\"; charset=utf-8");
        assert_eq!(
            (c.kind.as_str(), c.subtype.as_str()),
            ("multipart", "mixed")
        );
        assert_eq!(c.param("boundary"), Some(&b"a b\"c"[..]));
        assert_eq!(c.param("charset"), Some(&b"utf-8"[..]));
        assert!(!c.params_malformed);
        let c = ct("text/plain (a comment; x=y) ; format=flowed;");
        assert_eq!(c.param("format"), Some(&b"flowed"[..]));
        assert_eq!(c.param("x"), None);
        assert!(ct("text/plain; charset").params_malformed);
        assert!(ct("text/plain; b=\"open").params_malformed);
        assert!(content_type(b"text").is_none());
        assert!(content_type(b"").is_none());
    }

    #[test]
    fn fields_keep_folded_lines_together() {
        let h = b"Subject: a\r\n b\r\nContent-Type: multipart/mixed;\r\n\tboundary=x\r\n";
        let f = fields(h);
        assert_eq!(f.len(), 2);
        assert!(f[1].is("content-type"));
        assert_eq!(f[1].value(), b"multipart/mixed;\tboundary=x");
        assert_eq!(f[0].raw, b"Subject: a\r\n b\r\n");
        assert_eq!(split(b"A: b\r\n\r\nbody"), (&b"A: b\r\n"[..], &b"body"[..]));
        assert_eq!(split(b"\r\nbody"), (&b""[..], &b"body"[..]));
        assert_eq!(split(b"A: b\r\n"), (&b"A: b\r\n"[..], &b""[..]));
    }
}
