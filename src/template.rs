//! Message templates: an RFC 5322 message with `{{field}}` merge placeholders,
//! parsed once into literal runs and field references, rendered per recipient at
//! send time. Line endings are normalised to CRLF at parse time so rendering is a
//! sequence of copies.

use thiserror::Error;

/// Longest placeholder name; a longer `{{...` is almost certainly a typo.
const FIELD_NAME_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Vec<u8>),
    /// Index into the recipient's merge values (recipients.csv column order).
    Field(usize),
}

#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
    /// Octets of literal text, to size the render buffer.
    literal_len: usize,
    /// A merge field in the body: each recipient's body differs (else they are all
    /// the same, and a DKIM body hash can be computed once).
    body_varies: bool,
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
    #[error("the message has no header/body separator (an empty line)")]
    NoBody,
    #[error("the message has no From: header")]
    NoFrom,
}

impl Template {
    /// Parses `text` against the CSV `columns`. Every problem is returned, each with
    /// its line number, so `volley check` can list them all at once.
    pub fn parse(text: &[u8], columns: &[String]) -> Result<Template, Vec<TemplateError>> {
        let mut errors = Vec::new();
        let mut parts = Vec::new();
        let mut lit = Vec::with_capacity(text.len() + text.len() / 40);
        let mut in_header = true;
        let mut body_varies = false;
        let mut saw_body = false;
        let mut saw_from = false;
        let lines: Vec<&[u8]> = text.split(|&c| c == b'\n').collect();
        let n = lines.len();
        for (idx, raw) in lines.into_iter().enumerate() {
            let line_no = idx + 1;
            // The split leaves one empty piece after a final newline: not a line.
            if idx + 1 == n && raw.is_empty() {
                break;
            }
            let line = raw.strip_suffix(b"\r").unwrap_or(raw);
            if line.len() > 998 {
                errors.push(TemplateError::LineTooLong {
                    line: line_no,
                    len: line.len(),
                });
            }
            if in_header {
                if line.is_empty() {
                    in_header = false;
                    saw_body = true;
                } else if line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"from:") {
                    saw_from = true;
                }
            }
            let mut rest = line;
            while let Some(open) = find(rest, b"{{") {
                lit.extend_from_slice(&rest[..open]);
                let after = &rest[open + 2..];
                let Some(close) = find(after, b"}}") else {
                    errors.push(TemplateError::Unclosed { line: line_no });
                    lit.extend_from_slice(&rest[open..]);
                    rest = &[];
                    break;
                };
                let name = String::from_utf8_lossy(&after[..close]).trim().to_string();
                rest = &after[close + 2..];
                if name.is_empty()
                    || name.len() > FIELD_NAME_MAX
                    || !name
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
                {
                    errors.push(TemplateError::BadName {
                        line: line_no,
                        name,
                    });
                    continue;
                }
                match columns.iter().position(|c| c.eq_ignore_ascii_case(&name)) {
                    Some(i) => {
                        if !lit.is_empty() {
                            parts.push(Part::Literal(std::mem::take(&mut lit)));
                        }
                        parts.push(Part::Field(i));
                        body_varies |= !in_header;
                    }
                    None => errors.push(TemplateError::UnknownField {
                        line: line_no,
                        name,
                        columns: columns.join(", "),
                    }),
                }
            }
            lit.extend_from_slice(rest);
            lit.extend_from_slice(b"\r\n");
        }
        if !saw_body {
            errors.push(TemplateError::NoBody);
        }
        if !saw_from {
            errors.push(TemplateError::NoFrom);
        }
        if !lit.is_empty() {
            parts.push(Part::Literal(lit));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let literal_len = parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.len(),
                Part::Field(_) => 0,
            })
            .sum();
        Ok(Template {
            parts,
            literal_len,
            body_varies,
        })
    }

    /// Whether recipients' bodies differ (a merge field after the header).
    pub fn body_varies(&self) -> bool {
        self.body_varies
    }

    /// Appends the message for one recipient to `out` (CRLF line endings, ending in CRLF).
    pub fn render<S: AsRef<[u8]>>(&self, values: &[S], out: &mut Vec<u8>) {
        out.reserve(self.literal_len + 256);
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.extend_from_slice(l),
                Part::Field(i) => out.extend_from_slice(values[*i].as_ref()),
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
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
}
