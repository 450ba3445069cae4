//! Message templates: an RFC 5322 message with `{{field}}` merge placeholders,
//! parsed once into literal runs and field references, rendered per recipient at
//! send time. Line endings are normalised to CRLF at parse time so rendering is a
//! sequence of copies.
//!
//! Parsing also records the shape of every line that carries a merge field (its
//! fixed octets and its fields) and every header field that does, so
//! [`Template::check_values`] can tell whether one row's values make a message RFC
//! 5322 forbids — a line over 998 octets, a control character in a header, an address
//! field that no longer parses — from the values' lengths and a render of those few
//! header fields only, without rendering the body (a 1M-row list is checked in the
//! time it takes to read it).

use std::collections::BTreeMap;
use thiserror::Error;

/// Longest placeholder name; a longer `{{...` is almost certainly a typo.
const FIELD_NAME_MAX: usize = 64;
/// Longest line of a message, without its CRLF (RFC 5322 §2.1.1; RFC 5321 §4.5.3.1.6's
/// 1000 with the CRLF). A longer line, in the template or after merging, is refused.
pub const LINE_OCTETS_MAX: usize = 998;
/// Lines longer than this (and at most [`LINE_OCTETS_MAX`]) are a warning: some
/// receivers and relays rewrap long lines, which breaks the DKIM body hash. RFC 5322
/// §2.1.1 recommends 78, which HTML bodies rarely keep; 900 warns only near the limit.
pub const LINE_OCTETS_WARN: usize = 900;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Vec<u8>),
    /// Index into the recipient's merge values (recipients.csv column order).
    Field(usize),
}

/// A template line that carries merge fields: its length is `fixed` plus the lengths
/// of the values of `fields` (a field may appear more than once).
#[derive(Debug, Clone)]
struct LineShape {
    /// 1-based line number in the parsed text.
    line: usize,
    /// Literal octets on the line, without the CRLF.
    fixed: usize,
    fields: Vec<usize>,
}

/// How a header field's value is checked per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderKind {
    /// From, To, Cc, ... (RFC 5322 §3.6.2, §3.6.3): the rendered value must parse as
    /// an address list.
    Address,
    /// List-Unsubscribe and friends (RFC 2369): every `<...>` must hold a URI.
    Uri,
    /// Anything else: unstructured text.
    Text,
}

/// A header field with merge fields in it.
#[derive(Debug, Clone)]
struct HeaderShape {
    /// Line of the field's first line.
    line: usize,
    /// The field name as written ("To").
    name: String,
    kind: HeaderKind,
    /// The value (after the colon, continuation lines joined with CRLF), for
    /// rendering just this field.
    parts: Vec<Part>,
    fields: Vec<usize>,
    /// An address field's mailboxes with plain values merged: a row's values must
    /// not change the count (a `"` or `,` in a display name would add an address).
    mailboxes: Option<usize>,
}

/// Something in the template that is allowed but may hurt delivery (see
/// [`Template::warnings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateWarning {
    /// 1-based line in the parsed text.
    pub line: usize,
    pub msg: String,
}

/// A parsed template: literal runs and merge fields, plus the line and header shapes
/// the per-row checks need.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
    /// Octets of literal text, to size the render buffer.
    literal_len: usize,
    /// A merge field in the body: each recipient's body differs (else they are all
    /// the same, and a DKIM body hash can be computed once).
    body_varies: bool,
    /// recipients.csv's columns, to name fields in problems.
    columns: Vec<String>,
    lines: Vec<LineShape>,
    headers: Vec<HeaderShape>,
    warnings: Vec<TemplateWarning>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error(
        "line {line}: unknown merge field {{{{{name}}}}}; recipients.csv has columns: {columns}"
    )]
    UnknownField {
        line: usize,
        name: String,
        columns: String,
    },
    #[error("line {line}: unclosed placeholder: \"{{{{\" without \"}}}}\" on the same line")]
    Unclosed { line: usize },
    #[error("line {line}: placeholder name {name:?} is not a column name (letters, digits, _ and - only, at most 64)")]
    BadName { line: usize, name: String },
    #[error("line {line}: {len} octets, over the 998 that RFC 5322 allows per line; wrap it")]
    LineTooLong { line: usize, len: usize },
    #[error("line {line}: a bare CR (a carriage return not followed by a line feed), which RFC 5322 does not allow; remove it")]
    BareCr { line: usize },
    #[error("line {line}: a NUL byte, which RFC 5322 does not allow in a message; remove it")]
    Nul { line: usize },
    #[error("line {line}: a control character ({byte:#04x}) in a header field; header text is printable characters, spaces and tabs (RFC 5322 §3.2); remove it")]
    HeaderControl { line: usize, byte: u8 },
    #[error("line {line}: a merge field before the colon of a header line: its value could start a new header field (header injection); put placeholders after \"Name:\"")]
    FieldInName { line: usize },
    #[error("line {line}: not a header field (Name: value) nor a continuation (a line starting with a space or tab); the header ends at the first empty line")]
    NotAHeader { line: usize },
    #[error("line {line}: the {name} field is not a valid address list ({why})")]
    AddressHeader {
        line: usize,
        name: String,
        why: &'static str,
    },
    #[error("the message has no header/body separator (an empty line)")]
    NoBody,
    #[error("the message has no From: header")]
    NoFrom,
}

/// Why one row's values would make the message invalid (see [`Template::check_values`]).
/// `line` is the template line (in the parsed text) the problem is on.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RenderError {
    #[error("would be {len} octets with this row's {fields}, over the {LINE_OCTETS_MAX} RFC 5322 allows per line; shorten the value or break the template line")]
    LineTooLong {
        line: usize,
        len: usize,
        /// "link (1200 octets)", one per merge field on the line.
        fields: String,
    },
    #[error("field {field} has the control character {byte:#04x}, which a header field cannot carry; header text is printable characters, spaces and tabs (RFC 5322 §3.2)")]
    HeaderControl {
        line: usize,
        field: String,
        byte: u8,
    },
    #[error("the {header} field with this row's values is not a valid address list ({why}); put display names in quotes in the template (\"{{{{name}}}}\") or fix the value")]
    AddressHeader {
        line: usize,
        header: String,
        why: &'static str,
    },
    #[error("the {header} field with this row's values has {c:?} inside <...>, which a URI cannot carry (volley does not percent-encode merge values); use a column that holds a URL-safe token")]
    Uri {
        line: usize,
        header: String,
        c: char,
    },
}

impl RenderError {
    /// The template line (in the parsed text) the problem is on.
    pub fn line(&self) -> usize {
        match self {
            RenderError::LineTooLong { line, .. }
            | RenderError::HeaderControl { line, .. }
            | RenderError::AddressHeader { line, .. }
            | RenderError::Uri { line, .. } => *line,
        }
    }
}

/// Rows whose values make a template line long, or put raw non-ASCII in a header:
/// allowed, but worth a warning, aggregated per template line (a list of a million
/// rows gets one line per template line, not a million).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RenderNotes {
    /// Template line → rows whose rendering of it is over [`LINE_OCTETS_WARN`].
    pub long: BTreeMap<usize, NoteCount>,
    /// Template line of a header field → rows that put non-ASCII octets in it, and
    /// the field's name.
    pub non_ascii: BTreeMap<usize, (String, NoteCount)>,
}

/// How often a note was made, the range of lengths seen, and its first row.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NoteCount {
    pub rows: u64,
    /// recipients.csv line of the first row.
    pub first_row: u32,
    /// Shortest and longest rendered line (octets; 0 for non-ASCII notes).
    pub min: usize,
    pub max: usize,
}

impl NoteCount {
    fn add(&mut self, row: u32, len: usize) {
        if self.rows == 0 {
            self.first_row = row;
            self.min = len;
        }
        self.rows += 1;
        self.min = self.min.min(len);
        self.max = self.max.max(len);
    }
}

/// Header fields whose value is an address list (RFC 5322 §3.6.2, §3.6.3, §3.6.6;
/// RFC 8098 §2.1), lower case.
pub(crate) const ADDRESS_FIELDS: &[&str] = &[
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "resent-bcc",
    "disposition-notification-to",
];
/// Header fields whose value is a list of `<URI>` (RFC 2369, RFC 8058).
const URI_FIELDS: &[&str] = &[
    "list-unsubscribe",
    "list-subscribe",
    "list-help",
    "list-post",
    "list-owner",
    "list-archive",
];

/// One run of a template line: literal text, or a merge field.
enum Piece<'a> {
    Lit(&'a [u8]),
    Field(usize),
}

/// The header field being read while parsing.
struct OpenField {
    line: usize,
    name: String,
    parts: Vec<Part>,
    fields: Vec<usize>,
    non_ascii_warned: bool,
}

/// What `Template::parse` builds up, line by line.
struct Builder<'c> {
    columns: &'c [String],
    errors: Vec<TemplateError>,
    warnings: Vec<TemplateWarning>,
    parts: Vec<Part>,
    lit: Vec<u8>,
    lines: Vec<LineShape>,
    headers: Vec<HeaderShape>,
    field: Option<OpenField>,
    in_header: bool,
    saw_body: bool,
    saw_from: bool,
    body_varies: bool,
}

impl Template {
    /// Parses `text` against the CSV `columns`. Every problem is returned, each with
    /// its line number, so `volley check` can list them all at once.
    pub fn parse(text: &[u8], columns: &[String]) -> Result<Template, Vec<TemplateError>> {
        let mut b = Builder {
            columns,
            errors: Vec::new(),
            warnings: Vec::new(),
            parts: Vec::new(),
            lit: Vec::with_capacity(text.len() + text.len() / 40),
            lines: Vec::new(),
            headers: Vec::new(),
            field: None,
            in_header: true,
            saw_body: false,
            saw_from: false,
            body_varies: false,
        };
        let lines: Vec<&[u8]> = text.split(|&c| c == b'\n').collect();
        let n = lines.len();
        for (idx, raw) in lines.into_iter().enumerate() {
            // The split leaves one empty piece after a final newline: not a line.
            if idx + 1 == n && raw.is_empty() {
                break;
            }
            b.line(idx + 1, raw.strip_suffix(b"\r").unwrap_or(raw));
        }
        b.close_field();
        if !b.saw_body {
            b.errors.push(TemplateError::NoBody);
        }
        if !b.saw_from {
            b.errors.push(TemplateError::NoFrom);
        }
        if !b.lit.is_empty() {
            b.parts.push(Part::Literal(std::mem::take(&mut b.lit)));
        }
        if !b.errors.is_empty() {
            return Err(b.errors);
        }
        let literal_len = b
            .parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.len(),
                Part::Field(_) => 0,
            })
            .sum();
        Ok(Template {
            parts: b.parts,
            literal_len,
            body_varies: b.body_varies,
            columns: columns.to_vec(),
            lines: b.lines,
            headers: b.headers,
            warnings: b.warnings,
        })
    }

    /// Whether recipients' bodies differ (a merge field after the header).
    pub fn body_varies(&self) -> bool {
        self.body_varies
    }

    /// What is allowed but may hurt delivery: lines over [`LINE_OCTETS_WARN`], raw
    /// non-ASCII in a header field (it needs SMTPUTF8 or RFC 2047 encoding).
    pub fn warnings(&self) -> &[TemplateWarning] {
        &self.warnings
    }

    /// Appends the message for one recipient to `out` (CRLF line endings, ending in CRLF).
    pub fn render<S: AsRef<[u8]>>(&self, values: &[S], out: &mut Vec<u8>) {
        out.reserve(self.literal_len + 256);
        render_parts(&self.parts, values, out);
    }

    /// Checks that one row's `values` (recipients.csv column order, each already
    /// free of CR, LF and NUL: [`crate::message::campaign`] checks that for every column)
    /// make a message RFC 5322 allows: no line over [`LINE_OCTETS_MAX`] octets, no
    /// control character in a header field, address fields that still parse (RFC
    /// 5322 §3.4), URIs in List-* fields without spaces or quotes. Lines over
    /// [`LINE_OCTETS_WARN`] and non-ASCII in headers are added to `notes` under the
    /// row's recipients.csv line `row`, when the row is otherwise fine. Costs a sum
    /// per merged line and a render of the merged address and URI fields; the body is
    /// never rendered. `scratch` is reused between rows.
    pub fn check_values<S: AsRef<[u8]>>(
        &self,
        values: &[S],
        row: u32,
        scratch: &mut Vec<u8>,
        notes: &mut RenderNotes,
    ) -> Result<(), RenderError> {
        let line_len = |l: &LineShape| {
            l.fixed
                + l.fields
                    .iter()
                    .map(|&f| values[f].as_ref().len())
                    .sum::<usize>()
        };
        for l in &self.lines {
            let len = line_len(l);
            if len > LINE_OCTETS_MAX {
                let fields: Vec<String> = dedup(&l.fields)
                    .map(|f| format!("{} ({} octets)", self.columns[f], values[f].as_ref().len()))
                    .collect();
                return Err(RenderError::LineTooLong {
                    line: l.line,
                    len,
                    fields: fields.join(", "),
                });
            }
        }
        for h in &self.headers {
            self.check_header(h, values, scratch)?;
        }
        for l in &self.lines {
            let len = line_len(l);
            if len > LINE_OCTETS_WARN {
                notes.long.entry(l.line).or_default().add(row, len);
            }
        }
        for h in &self.headers {
            if h.fields
                .iter()
                .any(|&f| values[f].as_ref().iter().any(|&c| c >= 0x80))
            {
                notes
                    .non_ascii
                    .entry(h.line)
                    .or_insert_with(|| (h.name.clone(), NoteCount::default()))
                    .1
                    .add(row, 0);
            }
        }
        Ok(())
    }

    fn check_header<S: AsRef<[u8]>>(
        &self,
        h: &HeaderShape,
        values: &[S],
        scratch: &mut Vec<u8>,
    ) -> Result<(), RenderError> {
        for &f in &h.fields {
            if let Some(&byte) = values[f].as_ref().iter().find(|&&c| is_header_control(c)) {
                return Err(RenderError::HeaderControl {
                    line: h.line,
                    field: self.columns[f].clone(),
                    byte,
                });
            }
        }
        if h.kind == HeaderKind::Text {
            return Ok(());
        }
        scratch.clear();
        render_parts(&h.parts, values, scratch);
        match h.kind {
            HeaderKind::Address => {
                let bad = |why| RenderError::AddressHeader {
                    line: h.line,
                    header: h.name.clone(),
                    why,
                };
                let n = check_address_list(scratch, may_be_empty(&h.name)).map_err(bad)?;
                match h.mailboxes {
                    Some(want) if n != want => Err(bad(
                        "a merge value changes how many addresses it holds (a quote, comma or <> in a display name?)",
                    )),
                    _ => Ok(()),
                }
            }
            HeaderKind::Uri => check_uris(scratch).map_err(|c| RenderError::Uri {
                line: h.line,
                header: h.name.clone(),
                c,
            }),
            HeaderKind::Text => Ok(()),
        }
    }
}

fn render_parts<S: AsRef<[u8]>>(parts: &[Part], values: &[S], out: &mut Vec<u8>) {
    for p in parts {
        match p {
            Part::Literal(l) => out.extend_from_slice(l),
            Part::Field(i) => out.extend_from_slice(values[*i].as_ref()),
        }
    }
}

/// Each field once, in order of first appearance.
fn dedup(fields: &[usize]) -> impl Iterator<Item = usize> + '_ {
    fields
        .iter()
        .enumerate()
        .filter(|(i, f)| !fields[..*i].contains(f))
        .map(|(_, &f)| f)
}

/// A byte a header field's text may not carry: controls other than HTAB (RFC 5322
/// §3.2.5, §3.2.2; the obsolete syntax that allowed them must not be generated).
fn is_header_control(c: u8) -> bool {
    (c < 0x20 && c != b'\t') || c == 0x7f
}

/// Bcc may be empty (RFC 5322 §3.6.3); other address fields may not.
fn may_be_empty(name: &str) -> bool {
    name.eq_ignore_ascii_case("bcc") || name.eq_ignore_ascii_case("resent-bcc")
}

impl Builder<'_> {
    fn line(&mut self, line_no: usize, line: &[u8]) {
        if line.contains(&b'\r') {
            self.errors.push(TemplateError::BareCr { line: line_no });
        }
        if line.contains(&0) {
            self.errors.push(TemplateError::Nul { line: line_no });
        }
        let before = self.errors.len();
        let pieces = self.pieces(line_no, line);
        // A bad placeholder is reported once, not again as a bad header line.
        let bad_placeholder = self.errors.len() > before;
        let fixed: usize = pieces
            .iter()
            .map(|p| match p {
                Piece::Lit(l) => l.len(),
                Piece::Field(_) => 0,
            })
            .sum();
        let has_fields = pieces.iter().any(|p| matches!(p, Piece::Field(_)));
        let len = if has_fields { fixed } else { line.len() };
        if len > LINE_OCTETS_MAX {
            self.errors
                .push(TemplateError::LineTooLong { line: line_no, len });
        } else if len > LINE_OCTETS_WARN && !has_fields {
            self.warnings.push(TemplateWarning {
                line: line_no,
                msg: format!(
                    "{len} octets, over {LINE_OCTETS_WARN}: some receivers rewrap long lines, which breaks the DKIM signature; wrap it (RFC 5322 recommends 78)"
                ),
            });
        }
        if self.in_header {
            self.header_line(line_no, line, &pieces, bad_placeholder);
        } else {
            self.body_varies |= has_fields;
        }
        if has_fields {
            self.lines.push(LineShape {
                line: line_no,
                fixed,
                fields: pieces
                    .iter()
                    .filter_map(|p| match p {
                        Piece::Field(f) => Some(*f),
                        Piece::Lit(_) => None,
                    })
                    .collect(),
            });
        }
        for p in &pieces {
            match p {
                Piece::Lit(l) => self.lit.extend_from_slice(l),
                Piece::Field(f) => {
                    if !self.lit.is_empty() {
                        self.parts
                            .push(Part::Literal(std::mem::take(&mut self.lit)));
                    }
                    self.parts.push(Part::Field(*f));
                }
            }
        }
        self.lit.extend_from_slice(b"\r\n");
    }

    /// Splits a line into literal runs and merge fields, recording bad placeholders.
    fn pieces<'a>(&mut self, line_no: usize, line: &'a [u8]) -> Vec<Piece<'a>> {
        let mut out = Vec::new();
        let mut rest = line;
        while let Some(open) = find(rest, b"{{") {
            if open > 0 {
                out.push(Piece::Lit(&rest[..open]));
            }
            let after = &rest[open + 2..];
            let Some(close) = find(after, b"}}") else {
                self.errors.push(TemplateError::Unclosed { line: line_no });
                out.push(Piece::Lit(&rest[open..]));
                return out;
            };
            let name = String::from_utf8_lossy(&after[..close]).trim().to_string();
            rest = &after[close + 2..];
            if name.is_empty()
                || name.len() > FIELD_NAME_MAX
                || !name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
            {
                self.errors.push(TemplateError::BadName {
                    line: line_no,
                    name,
                });
                continue;
            }
            match self
                .columns
                .iter()
                .position(|c| c.eq_ignore_ascii_case(&name))
            {
                Some(i) => out.push(Piece::Field(i)),
                None => self.errors.push(TemplateError::UnknownField {
                    line: line_no,
                    name,
                    columns: self.columns.join(", "),
                }),
            }
        }
        if !rest.is_empty() {
            out.push(Piece::Lit(rest));
        }
        out
    }

    /// A line of the header section: a new field, a continuation, or the empty line
    /// that ends the header.
    fn header_line(
        &mut self,
        line_no: usize,
        line: &[u8],
        pieces: &[Piece<'_>],
        bad_placeholder: bool,
    ) {
        if line.is_empty() {
            self.close_field();
            self.in_header = false;
            self.saw_body = true;
            return;
        }
        if let Some(&byte) = line
            .iter()
            .find(|&&c| is_header_control(c) && c != 0 && c != b'\r')
        {
            self.errors.push(TemplateError::HeaderControl {
                line: line_no,
                byte,
            });
        }
        let value: &[Piece<'_>] = if line[0] == b' ' || line[0] == b'\t' {
            let Some(f) = self.field.as_mut() else {
                if !bad_placeholder {
                    self.errors
                        .push(TemplateError::NotAHeader { line: line_no });
                }
                return;
            };
            f.parts.push(Part::Literal(b"\r\n".to_vec()));
            pieces
        } else {
            self.close_field();
            let colon = match pieces.first() {
                Some(Piece::Lit(first)) => first.iter().position(|&c| c == b':'),
                _ => None,
            };
            let (Some(Piece::Lit(first)), Some(colon)) = (pieces.first(), colon) else {
                if !bad_placeholder {
                    self.errors.push(
                        if pieces.len() > 1 || !matches!(pieces.first(), Some(Piece::Lit(_))) {
                            TemplateError::FieldInName { line: line_no }
                        } else {
                            TemplateError::NotAHeader { line: line_no }
                        },
                    );
                }
                return;
            };
            let name = trim_end_wsp(&first[..colon]);
            if name.is_empty() || !name.iter().all(|&c| (33..=126).contains(&c)) {
                self.errors
                    .push(TemplateError::NotAHeader { line: line_no });
                return;
            }
            let name = String::from_utf8_lossy(name).into_owned();
            self.saw_from |= name.eq_ignore_ascii_case("from");
            let mut parts = Vec::new();
            if colon + 1 < first.len() {
                parts.push(Part::Literal(first[colon + 1..].to_vec()));
            }
            self.field = Some(OpenField {
                line: line_no,
                name,
                parts,
                fields: Vec::new(),
                non_ascii_warned: false,
            });
            &pieces[1..]
        };
        let f = self.field.as_mut().expect("opened or continued above");
        for p in value {
            match p {
                Piece::Lit(l) => f.parts.push(Part::Literal(l.to_vec())),
                Piece::Field(i) => {
                    f.parts.push(Part::Field(*i));
                    f.fields.push(*i);
                }
            }
        }
        if !f.non_ascii_warned && line.iter().any(|&c| c >= 0x80) {
            f.non_ascii_warned = true;
            self.warnings.push(TemplateWarning {
                line: line_no,
                msg: format!(
                    "raw non-ASCII in the {} header: it goes as it is to receivers that offer SMTPUTF8 (RFC 6531) and as RFC 2047 encoded-words to the others, which works for Subject, display names and other free text but not in addresses, Message-ID or List-* fields (those recipients then fail with 5.6.9)",
                    f.name
                ),
            });
        }
    }

    /// Ends the header field being read: one with merge fields is kept for the
    /// per-row checks; a fixed address field is checked now.
    fn close_field(&mut self) {
        let Some(f) = self.field.take() else {
            return;
        };
        let lower = f.name.to_ascii_lowercase();
        let kind = if ADDRESS_FIELDS.contains(&lower.as_str()) {
            HeaderKind::Address
        } else if URI_FIELDS.contains(&lower.as_str()) {
            HeaderKind::Uri
        } else {
            HeaderKind::Text
        };
        if !f.fields.is_empty() {
            let mailboxes = (kind == HeaderKind::Address).then(|| {
                // Plain stand-ins: an address for the email column, a word elsewhere.
                let plain: Vec<&[u8]> = self
                    .columns
                    .iter()
                    .map(|c| match c.eq_ignore_ascii_case("email") {
                        true => b"a@b.example".as_slice(),
                        false => b"x".as_slice(),
                    })
                    .collect();
                let mut text = Vec::new();
                render_parts(&f.parts, &plain, &mut text);
                check_address_list(&text, may_be_empty(&f.name)).ok()
            });
            self.headers.push(HeaderShape {
                line: f.line,
                name: f.name,
                kind,
                parts: f.parts,
                fields: f.fields,
                mailboxes: mailboxes.flatten(),
            });
            return;
        }
        if kind == HeaderKind::Address {
            let mut text = Vec::new();
            render_parts::<&[u8]>(&f.parts, &[], &mut text);
            if let Err(why) = check_address_list(&text, may_be_empty(&f.name)) {
                self.errors.push(TemplateError::AddressHeader {
                    line: f.line,
                    name: f.name,
                    why,
                });
            }
        }
    }
}

fn trim_end_wsp(s: &[u8]) -> &[u8] {
    let end = s
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(0, |i| i + 1);
    &s[..end]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Characters a URI may hold (RFC 3986 §2: unreserved, reserved and `%`).
fn is_uri_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~:/?#[]@!$&'()*+,;=%".contains(c)
}

/// Every `<...>` of a List-* field holds URI characters only; returns the first
/// character that is not one.
fn check_uris(v: &[u8]) -> Result<(), char> {
    let mut inside = false;
    for c in String::from_utf8_lossy(v).chars() {
        match c {
            '<' if !inside => inside = true,
            '>' if inside => inside = false,
            c if inside && !is_uri_char(c) => return Err(c),
            _ => {}
        }
    }
    Ok(())
}

/// A lexical token of an address field (RFC 5322 §3.2): comments and folding white
/// space are dropped, remembered only as `space_before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Atom,
    Quoted,
    DomainLiteral,
    Special(u8),
}

#[derive(Debug, Clone, Copy)]
struct Token {
    tok: Tok,
    space_before: bool,
}

/// atext (RFC 5322 §3.2.3), with octets over 127 allowed as RFC 6532 does (raw
/// non-ASCII is warned about separately).
fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c) || c >= 0x80
}

fn tokenize(v: &[u8]) -> Result<Vec<Token>, &'static str> {
    let mut out = Vec::with_capacity(16);
    let (mut i, mut space) = (0, false);
    while i < v.len() {
        let c = v[i];
        let tok = match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                space = true;
                i += 1;
                continue;
            }
            b'(' => {
                i = skip_comment(v, i)?;
                space = true;
                continue;
            }
            b'"' => {
                i = skip_quoted(v, i)?;
                Tok::Quoted
            }
            b'[' => {
                i = skip_literal(v, i)?;
                Tok::DomainLiteral
            }
            b'<' | b'>' | b':' | b';' | b'@' | b',' | b'.' => {
                i += 1;
                Tok::Special(c)
            }
            _ if is_atext(c) => {
                while i < v.len() && is_atext(v[i]) {
                    i += 1;
                }
                Tok::Atom
            }
            b')' => return Err("a ')' without its '('"),
            b']' => return Err("a ']' without its '['"),
            b'\\' => return Err("a backslash outside quotes"),
            _ => return Err("a control character"),
        };
        out.push(Token {
            tok,
            space_before: space,
        });
        space = false;
    }
    Ok(out)
}

fn skip_comment(v: &[u8], i: usize) -> Result<usize, &'static str> {
    crate::message::mime::header::comment_end(v, i).ok_or("an unclosed comment '('")
}

fn skip_quoted(v: &[u8], mut i: usize) -> Result<usize, &'static str> {
    i += 1;
    while i < v.len() {
        match v[i] {
            b'\\' => i += 2,
            b'"' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err("an unclosed quoted string")
}

fn skip_literal(v: &[u8], mut i: usize) -> Result<usize, &'static str> {
    i += 1;
    while i < v.len() {
        match v[i] {
            b']' => return Ok(i + 1),
            b'[' | b'\\' => return Err("a '[' or backslash inside a domain literal"),
            _ => i += 1,
        }
    }
    Err("an unclosed domain literal '['")
}

/// Checks an address-list (RFC 5322 §3.4): mailboxes (`addr-spec` or
/// `[display-name] <addr-spec>`) and groups (`name: mailbox, ...;`), separated by
/// commas. Display names may use the obsolete `.` (`John Q. Public`), which is
/// common; addresses must be modern: a dot-atom or one quoted string before the @.
/// Returns how many mailboxes it holds.
pub fn check_address_list(v: &[u8], may_be_empty: bool) -> Result<usize, &'static str> {
    let t = tokenize(v)?;
    if t.is_empty() {
        return if may_be_empty {
            Ok(0)
        } else {
            Err("no address")
        };
    }
    let mut i = 0;
    loop {
        i = address(&t, i, true)?;
        match tok_at(&t, i) {
            // Each mailbox has its @ outside quotes and comments (the tokens).
            None => return Ok(t.iter().filter(|x| x.tok == Tok::Special(b'@')).count()),
            Some(Tok::Special(b',')) => i += 1,
            Some(_) => return Err("something after an address that is not a comma"),
        }
    }
}

fn tok_at(t: &[Token], i: usize) -> Option<Tok> {
    t.get(i).map(|x| x.tok)
}

fn address(t: &[Token], start: usize, groups: bool) -> Result<usize, &'static str> {
    let mut j = start;
    while let Some(x) = tok_at(t, j) {
        match x {
            Tok::Atom | Tok::Quoted => j += 1,
            Tok::Special(b'.') if j > start => j += 1,
            _ => break,
        }
    }
    match tok_at(t, j) {
        Some(Tok::Special(b'<')) => angle_addr(t, j),
        Some(Tok::Special(b':')) if groups && j > start => group(t, j + 1),
        Some(Tok::Special(b'@')) if j > start => addr_spec(t, start, j),
        _ if j == start => Err("an empty address, or one of <>:;@,. out of place"),
        _ => Err("a display name without an <address> after it (a comma or other special character in a name needs quotes)"),
    }
}

fn angle_addr(t: &[Token], lt: usize) -> Result<usize, &'static str> {
    let mut k = lt + 1;
    while matches!(
        tok_at(t, k),
        Some(Tok::Atom | Tok::Quoted | Tok::Special(b'.'))
    ) {
        k += 1;
    }
    if k == lt + 1 || tok_at(t, k) != Some(Tok::Special(b'@')) {
        return Err("an <address> that is not local-part@domain");
    }
    let end = addr_spec(t, lt + 1, k)?;
    match tok_at(t, end) {
        Some(Tok::Special(b'>')) => Ok(end + 1),
        _ => Err("an <address> without its closing '>'"),
    }
}

fn group(t: &[Token], mut k: usize) -> Result<usize, &'static str> {
    if tok_at(t, k) == Some(Tok::Special(b';')) {
        return Ok(k + 1);
    }
    loop {
        k = address(t, k, false)?;
        match tok_at(t, k) {
            Some(Tok::Special(b';')) => return Ok(k + 1),
            Some(Tok::Special(b',')) => k += 1,
            _ => return Err("a group without its closing ';'"),
        }
    }
}

/// `local@domain` with the local part in `t[start..at]` and `t[at]` the @.
fn addr_spec(t: &[Token], start: usize, at: usize) -> Result<usize, &'static str> {
    let local = &t[start..at];
    let quoted = matches!(
        local,
        [Token {
            tok: Tok::Quoted,
            ..
        }]
    );
    if !quoted && !is_dot_atom(local) {
        return Err("a local part that is neither a dot-atom nor one quoted string");
    }
    let d = at + 1;
    if tok_at(t, d) == Some(Tok::DomainLiteral) {
        return Ok(d + 1);
    }
    let mut j = d;
    while j < t.len() && t[j].tok == Tok::Atom && (j == d || !t[j].space_before) {
        j += 1;
        match t.get(j) {
            Some(x) if x.tok == Tok::Special(b'.') && !x.space_before => j += 1,
            _ => return Ok(j),
        }
    }
    Err("an @ without a domain after it")
}

fn is_dot_atom(l: &[Token]) -> bool {
    l.len() % 2 == 1
        && l.iter().enumerate().all(|(k, x)| {
            (k == 0 || !x.space_before)
                && if k % 2 == 0 {
                    x.tok == Tok::Atom
                } else {
                    x.tok == Tok::Special(b'.')
                }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn renders_fields_and_normalises_line_endings() {
        let t = Template::parse(
            b"From: a@b\nTo: {{email}}\n\nHi {{ first_name }}!\n",
            &cols(&["email", "first_name"]),
        )
        .unwrap();
        let mut out = Vec::new();
        t.render(&["x@y.test", "Ann"], &mut out);
        assert_eq!(out, b"From: a@b\r\nTo: x@y.test\r\n\r\nHi Ann!\r\n");
    }

    #[test]
    fn reports_every_error_with_its_line() {
        let errs = Template::parse(
            b"Subject: {{nope}}\n{{bad name}}\n{{open\n",
            &cols(&["email"]),
        )
        .unwrap_err();
        assert!(
            matches!(&errs[0], TemplateError::UnknownField { line: 1, name, .. } if name == "nope")
        );
        assert!(matches!(&errs[1], TemplateError::BadName { line: 2, .. }));
        assert!(matches!(&errs[2], TemplateError::Unclosed { line: 3 }));
        assert!(errs.contains(&TemplateError::NoBody));
        assert!(errs.contains(&TemplateError::NoFrom));
    }

    fn check(t: &Template, values: &[&str]) -> Result<RenderNotes, RenderError> {
        let mut notes = RenderNotes::default();
        t.check_values(values, 2, &mut Vec::new(), &mut notes)
            .map(|()| notes)
    }

    #[test]
    fn a_value_that_makes_a_line_too_long_is_refused_with_its_fields() {
        let t = Template::parse(
            b"From: a@b.test\nTo: {{email}}\n\nReset it here: {{link}} {{link}}\n",
            &cols(&["email", "link"]),
        )
        .unwrap();
        assert!(check(&t, &["x@y.test", &"a".repeat(491)]).is_ok());
        assert_eq!(
            check(&t, &["x@y.test", &"a".repeat(492)]).unwrap_err(),
            RenderError::LineTooLong {
                line: 4,
                len: 1000,
                fields: "link (492 octets)".into()
            }
        );
    }

    #[test]
    fn line_lengths_from_the_shapes_match_the_rendered_message() {
        let t = Template::parse(
            b"From: {{name}} <{{email}}>\nSubject: {{name}}{{name}}\n\n{{name}} and {{email}}\n{{name}}\nfixed\n",
            &cols(&["email", "name"]),
        )
        .unwrap();
        for n in [0usize, 1, 7, 300, 450, 470, 500] {
            let name = "n".repeat(n);
            let values = ["x@y.test", name.as_str()];
            let mut out = Vec::new();
            t.render(&values, &mut out);
            let longest = out
                .split(|&c| c == b'\n')
                .map(|l| l.strip_suffix(b"\r").unwrap_or(l).len())
                .max()
                .unwrap();
            let notes = check(&t, &values);
            match notes {
                Ok(notes) => {
                    assert!(longest <= LINE_OCTETS_MAX, "{n}");
                    let noted = notes.long.values().map(|c| c.max).max();
                    let want = (longest > LINE_OCTETS_WARN).then_some(longest);
                    assert_eq!(noted, want, "{n}");
                }
                Err(RenderError::LineTooLong { len, .. }) => assert_eq!(len, longest, "{n}"),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn a_placeholder_may_not_start_a_header_field() {
        for (text, line) in [
            (&b"From: a@b.test\n{{x}}\n\nbody\n"[..], 2),
            (b"From: a@b.test\nX-{{x}}: y\n\nbody\n", 2),
            (b"{{x}}From: a@b.test\n\nbody\n", 1),
        ] {
            let errs = Template::parse(text, &cols(&["x"])).unwrap_err();
            assert!(
                errs.contains(&TemplateError::FieldInName { line }),
                "{errs:?}"
            );
        }
        // After the colon, and on a continuation line, a value is only text.
        Template::parse(
            b"From: a@b.test\nSubject: {{x}}\n {{x}}\n\nbody\n",
            &cols(&["x"]),
        )
        .unwrap();
    }

    #[test]
    fn malformed_template_lines_are_refused() {
        let errs = Template::parse(
            b"From: a@b.test\n folded\nSubject hello\nX-A: a\rb\nX-B: \x1b\nTo: a, b@c.test\n\nbo\0dy\n",
            &cols(&["x"]),
        )
        .unwrap_err();
        for e in [
            TemplateError::NotAHeader { line: 3 },
            TemplateError::BareCr { line: 4 },
            TemplateError::HeaderControl {
                line: 5,
                byte: 0x1b,
            },
            TemplateError::Nul { line: 8 },
        ] {
            assert!(errs.contains(&e), "{e:?} not in {errs:?}");
        }
        assert!(
            errs.iter()
                .any(|e| matches!(e, TemplateError::AddressHeader { line: 6, .. })),
            "{errs:?}"
        );
        let errs =
            Template::parse(b" folded\nFrom: a@b.test\n\nbody\n", &cols(&["x"])).unwrap_err();
        assert_eq!(errs, vec![TemplateError::NotAHeader { line: 1 }]);
    }

    #[test]
    fn address_lists_follow_rfc_5322() {
        for ok in [
            "a@b",
            "a@b.test",
            "Ann <a@b.test>",
            "\"Smith, John\" <a@b.test>",
            "Ann \"Q\" Lee <a@b.test>",
            "John Q. Public <a@b.test>",
            "a@b.test (Ann), <c@d.test>",
            "\"odd user\"@b.test",
            "Ann <\"odd user\"@b.test>",
            "a@[192.0.2.1]",
            "undisclosed-recipients:;",
            "friends: a@b.test, Ann <c@d.test>;, e@f.test",
            "Zoë <a@b.test>",
            "Ann\r\n <a@b.test>",
        ] {
            check_address_list(ok.as_bytes(), false).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "Smith, John <a@b.test>",
            "Ann <evil@x.test> <a@b.test>",
            "a..b@c.test",
            ".a@c.test",
            "a@",
            "a@b.",
            "<a@b.test",
            "Ann",
            "a b@c.test",
            "a@b .test",
            "\"unclosed <a@b.test>",
            "(unclosed a@b.test",
            "a@b.test\x1b",
            "Ann <>",
            "Ann <a@b.test>;",
        ] {
            assert!(
                check_address_list(bad.as_bytes(), false).is_err(),
                "{bad:?} passed"
            );
        }
        assert!(check_address_list(b"", true).is_ok());
    }

    #[test]
    fn a_merge_value_cannot_add_an_address_to_a_field() {
        let t = Template::parse(
            b"From: n@b.test\nTo: \"{{name}}\" <{{email}}>\nCc: {{email}}\n\nHi\n",
            &cols(&["email", "name"]),
        )
        .unwrap();
        assert!(
            check(&t, &["a@c.test", "Smith, John"]).is_ok(),
            "quoted: fine"
        );
        assert!(check(&t, &["\"odd user\"@c.test", "Ann"]).is_ok());
        for (email, name) in [
            // Out of the quotes and into a second mailbox.
            ("a@c.test", "Bob\" <evil@evil.test>, \"x"),
            ("a@c.test", "Bob\" <evil@evil.test>; \"x"),
            // An address column that holds two.
            ("a@c.test, evil@evil.test", "Ann"),
        ] {
            assert!(
                matches!(
                    check(&t, &[email, name]),
                    Err(RenderError::AddressHeader { .. })
                ),
                "{email:?} {name:?} passed"
            );
        }
        assert_eq!(
            check_address_list(b"\"a@b\" <c@d.test>, e@f.test", false),
            Ok(2)
        );
    }

    #[test]
    fn merged_header_fields_are_checked_per_row() {
        let t = Template::parse(
            b"From: News <n@b.test>\nTo: {{name}} <{{email}}>\nSubject: Hi {{name}}\nList-Unsubscribe: <https://b.test/u/{{email}}>\n\n{{name}}\n",
            &cols(&["email", "name"]),
        )
        .unwrap();
        let notes = check(&t, &["a@c.test", "Zoë"]).unwrap();
        assert_eq!(
            notes.non_ascii.keys().copied().collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(matches!(
            check(&t, &["a@c.test", "Smith, John"]),
            Err(RenderError::AddressHeader { line: 2, .. })
        ));
        assert_eq!(
            check(&t, &["a@c.test", "a\x1bb"]).unwrap_err(),
            RenderError::HeaderControl {
                line: 2,
                field: "name".into(),
                byte: 0x1b
            }
        );
        assert_eq!(
            check(&t, &["\"odd user\"@c.test", "Ann"]).unwrap_err(),
            RenderError::Uri {
                line: 4,
                header: "List-Unsubscribe".into(),
                c: '"'
            }
        );
        // A lone "." in the body is fine: the SMTP client dot-stuffs it.
        check(&t, &["a@c.test", "."]).unwrap_err();
        let body_only = Template::parse(b"From: n@b.test\n\n{{name}}\n", &cols(&["name"])).unwrap();
        check(&body_only, &["."]).unwrap();
    }

    #[test]
    fn long_and_non_ascii_template_lines_are_warnings() {
        let text = format!(
            "From: n@b.test\nSubject: Grüße\n\n{}\n{}\n",
            "a".repeat(901),
            "b".repeat(900)
        );
        let t = Template::parse(text.as_bytes(), &cols(&["x"])).unwrap();
        let lines: Vec<usize> = t.warnings().iter().map(|w| w.line).collect();
        assert_eq!(lines, vec![2, 4], "{:?}", t.warnings());
    }
}
