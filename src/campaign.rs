//! Campaign directories: `campaign.toml` (settings), `message.eml` (the template)
//! and `recipients.csv` (address + merge columns). Loading validates everything and
//! reports every problem as `file:line: what, and what to do`.

use crate::template::Template;
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Recipient rows reported one by one; past this, `check` summarises the rest.
pub const ERRORS_LISTED_MAX: usize = 1000;
/// Longest CSV row we take (one recipient's merge values).
pub const ROW_BYTES_MAX: usize = 64 * 1024;
/// Longest message template.
pub const TEMPLATE_BYTES_MAX: usize = 10 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Campaign id: letters, digits, `-`, `_`, `.`; names the campaign in the log.
    pub id: String,
    /// Envelope sender (MAIL FROM, the return path bounces go to).
    pub sender: String,
    /// The domain of the From: header (DKIM d= and DMARC alignment).
    pub from_domain: String,
    /// Give up on a recipient this long after queueing (humantime: "2d", "36h").
    #[serde(default = "default_expire_after")]
    pub expire_after: String,
    /// Recipients of the same domain per transaction. 1 for merged marketing mail:
    /// every recipient's copy differs.
    #[serde(default = "default_rcpt_per_msg")]
    pub max_rcpt_per_msg: u32,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Sign with the From domain's DKIM key (`--dkim-dir`); false sends unsigned.
    #[serde(default = "default_dkim")]
    pub dkim: bool,
    /// Which of the From domain's keys to sign with, when it has several.
    #[serde(default)]
    pub dkim_selector: Option<String>,
    /// Header fields to sign, instead of `dkim::DEFAULT_HEADERS`.
    #[serde(default)]
    pub dkim_headers: Option<Vec<String>>,
    /// One-click unsubscribe (RFC 8058): an https URL, merge fields allowed
    /// (`https://news.example/u/{{email}}`). Adds List-Unsubscribe and
    /// List-Unsubscribe-Post when the template has none.
    #[serde(default)]
    pub list_unsubscribe_url: Option<String>,
    /// An address for List-Unsubscribe's mailto: target.
    #[serde(default)]
    pub list_unsubscribe_mailto: Option<String>,
    /// This campaign's own rate cap over all shards ("100/s", "5000/h"), on top of
    /// the shaping rules'.
    #[serde(default)]
    pub max_msg_rate: Option<String>,
    /// Send an RFC 3464 DSN to `sender` for each bounced or expired recipient.
    #[serde(default)]
    pub dsn: bool,
    /// The source address pool (`[pool.NAME]` in the shaping rules) to send from;
    /// none: the host's default address and EHLO name.
    #[serde(default)]
    pub pool: Option<String>,
}

fn default_expire_after() -> String {
    "2d".into()
}
fn default_dkim() -> bool {
    true
}
fn default_rcpt_per_msg() -> u32 {
    1
}

impl Settings {
    pub fn expire_after(&self) -> Duration {
        humantime::parse_duration(&self.expire_after).expect("validated at load")
    }
}

/// One problem found in a campaign, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: &'static str,
    pub line: Option<usize>,
    pub msg: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file, self.msg),
            None => write!(f, "{}: {}", self.file, self.msg),
        }
    }
}

/// A campaign whose settings and template are valid (recipients are checked as
/// they stream by, see [`Campaign::recipients`]).
pub struct Campaign {
    pub dir: PathBuf,
    pub settings: Settings,
    pub template_text: Vec<u8>,
    pub template: Template,
    /// recipients.csv header, in order.
    pub columns: Vec<String>,
    /// Index of the `email` column.
    pub email_col: usize,
    /// What the bulk-sender rules added or warn about (compliance.rs).
    pub added_headers: Vec<&'static str>,
    pub add_date: bool,
    pub add_message_id: bool,
    pub warnings: Vec<String>,
}

/// A valid recipient row.
pub struct Row {
    pub line: u32,
    /// The address, lowercased domain.
    pub email: String,
    pub values: Vec<Vec<u8>>,
}

impl Campaign {
    /// Loads settings, header and template. Returns every problem found in them.
    pub fn load(dir: &Path) -> Result<Campaign, Vec<Problem>> {
        let mut problems = Vec::new();
        let settings = load_settings(dir, &mut problems);
        let columns = load_header(dir, &mut problems);
        let template_text = match read_limited(&dir.join("message.eml"), TEMPLATE_BYTES_MAX) {
            Ok(t) => Some(t),
            Err(msg) => {
                problems.push(Problem {
                    file: "message.eml",
                    line: None,
                    msg,
                });
                None
            }
        };
        let (Some(settings), Some(columns), Some(template_text)) =
            (settings, columns, template_text)
        else {
            return Err(problems);
        };
        let email_col = columns.iter().position(|c| c.eq_ignore_ascii_case("email"));
        if email_col.is_none() {
            problems.push(Problem {
                file: "recipients.csv",
                line: Some(1),
                msg: format!(
                    "no \"email\" column (header is: {}); name the address column email",
                    columns.join(",")
                ),
            });
        }
        if let Some(u) = &settings.list_unsubscribe_url {
            if !u.starts_with("https://") {
                problems.push(Problem {
                    file: "campaign.toml",
                    line: None,
                    msg: format!("list_unsubscribe_url {u:?}: one-click unsubscribe needs an https:// URL (RFC 8058)"),
                });
            }
        }
        if let Some(r) = &settings.max_msg_rate {
            if let Err(e) = crate::shaping::rules::parse_per(r) {
                problems.push(Problem {
                    file: "campaign.toml",
                    line: None,
                    msg: format!("max_msg_rate: {e}"),
                });
            }
        }
        if let Some(m) = &settings.list_unsubscribe_mailto {
            if normalise_address(m).is_err() {
                problems.push(Problem {
                    file: "campaign.toml",
                    line: None,
                    msg: format!("list_unsubscribe_mailto {m:?}: give an address, e.g. unsubscribe@news.example"),
                });
            }
        }
        let done = crate::compliance::complete(&template_text, &settings);
        // Added fields come first: the template's line numbers move by their count.
        let shift = done.added.len();
        let template = match Template::parse(&done.text, &columns) {
            Ok(t) => Some(t),
            Err(errs) => {
                problems.extend(errs.into_iter().map(|e| {
                    let (line, msg) = split_line(&e.to_string());
                    Problem {
                        file: "message.eml",
                        line: line.map(|l| l.saturating_sub(shift).max(1)),
                        msg,
                    }
                }));
                None
            }
        };
        match (template, email_col, problems.is_empty()) {
            (Some(template), Some(email_col), true) => Ok(Campaign {
                dir: dir.to_path_buf(),
                settings,
                template_text,
                template,
                columns,
                email_col,
                added_headers: done.added,
                add_date: done.add_date,
                add_message_id: done.add_message_id,
                warnings: done.warnings,
            }),
            _ => Err(problems),
        }
    }

    /// Streams the recipient rows: valid ones to `ok`, problems to `bad`. Returns the
    /// number of rows read.
    pub fn recipients(
        &self,
        mut ok: impl FnMut(Row) -> Result<(), String>,
        mut bad: impl FnMut(Problem),
    ) -> Result<u64, Problem> {
        let path = self.dir.join("recipients.csv");
        let file = std::fs::File::open(&path).map_err(|e| Problem {
            file: "recipients.csv",
            line: None,
            msg: format!("cannot open: {e}"),
        })?;
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(std::io::BufReader::with_capacity(1 << 20, file));
        let mut rec = csv::ByteRecord::new();
        let mut rows = 0u64;
        loop {
            match rdr.read_byte_record(&mut rec) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    let line = e.position().map(|p| p.line() as usize);
                    bad(Problem {
                        file: "recipients.csv",
                        line,
                        msg: format!("unreadable CSV: {e}; fix the quoting"),
                    });
                    // A CSV syntax error desynchronises the rest of the file.
                    return Ok(rows);
                }
            }
            rows += 1;
            let line = rec.position().map_or(0, |p| p.line()) as u32;
            match self.check_row(&rec, line) {
                Ok(row) => {
                    if let Err(msg) = ok(row) {
                        return Err(Problem {
                            file: "recipients.csv",
                            line: Some(line as usize),
                            msg,
                        });
                    }
                }
                Err(msg) => bad(Problem {
                    file: "recipients.csv",
                    line: Some(line as usize),
                    msg,
                }),
            }
        }
        Ok(rows)
    }

    fn check_row(&self, rec: &csv::ByteRecord, line: u32) -> Result<Row, String> {
        if rec.len() != self.columns.len() {
            return Err(format!(
                "{} fields, the header has {}",
                rec.len(),
                self.columns.len()
            ));
        }
        let size: usize = rec.iter().map(<[u8]>::len).sum();
        if size > ROW_BYTES_MAX {
            return Err(format!(
                "row of {size} octets is over the {ROW_BYTES_MAX} limit"
            ));
        }
        for (i, v) in rec.iter().enumerate() {
            if v.iter().any(|&c| c == b'\r' || c == b'\n') {
                return Err(format!(
                    "field {} contains a line break; merge values must be one line (a break would inject headers)",
                    self.columns[i]
                ));
            }
            if std::str::from_utf8(v).is_err() {
                return Err(format!("field {} is not valid UTF-8", self.columns[i]));
            }
        }
        let raw = std::str::from_utf8(&rec[self.email_col])
            .expect("checked above")
            .trim();
        let email =
            normalise_address(raw).map_err(|why| format!("invalid address {raw:?}: {why}"))?;
        let mut values: Vec<Vec<u8>> = rec.iter().map(<[u8]>::to_vec).collect();
        values[self.email_col] = email.clone().into_bytes();
        Ok(Row {
            line,
            email,
            values,
        })
    }
}

fn load_settings(dir: &Path, problems: &mut Vec<Problem>) -> Option<Settings> {
    let file = "campaign.toml";
    let text = match read_limited(&dir.join(file), 1 << 20) {
        Ok(t) => t,
        Err(msg) => {
            problems.push(Problem {
                file,
                line: None,
                msg,
            });
            return None;
        }
    };
    let text = String::from_utf8_lossy(&text).into_owned();
    let s: Settings = match toml::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
            problems.push(Problem {
                file,
                line,
                msg: e.message().to_string(),
            });
            return None;
        }
    };
    let line_of = |key: &str| {
        text.lines()
            .position(|l| l.trim_start().starts_with(key))
            .map(|i| i + 1)
    };
    let before = problems.len();
    if s.id.is_empty()
        || s.id.len() > 64
        || !s
            .id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
    {
        problems.push(Problem {
            file,
            line: line_of("id"),
            msg: format!(
                "id {:?}: use 1 to 64 letters, digits, '-', '_' or '.'",
                s.id
            ),
        });
    }
    // "<>" is the null reverse-path (RFC 5321 §4.5.5): notifications, never bounced to.
    let sender = match s.sender.as_str() {
        "<>" => Ok(String::new()),
        other => normalise_address(other),
    };
    if let Err(why) = sender {
        problems.push(Problem {
            file,
            line: line_of("sender"),
            msg: format!("sender {:?}: {why}", s.sender),
        });
    }
    if let Err(why) = check_domain(&s.from_domain) {
        problems.push(Problem {
            file,
            line: line_of("from_domain"),
            msg: format!("from_domain {:?}: {why}", s.from_domain),
        });
    }
    match humantime::parse_duration(&s.expire_after) {
        Ok(d) if d >= Duration::from_secs(1) => {}
        Ok(_) => problems.push(Problem {
            file,
            line: line_of("expire_after"),
            msg: "expire_after must be at least 1s".into(),
        }),
        Err(e) => problems.push(Problem {
            file,
            line: line_of("expire_after"),
            msg: format!(
                "expire_after {:?}: {e} (examples: \"2d\", \"36h\", \"90m\")",
                s.expire_after
            ),
        }),
    }
    if !(1..=1000).contains(&s.max_rcpt_per_msg) {
        problems.push(Problem {
            file,
            line: line_of("max_rcpt_per_msg"),
            msg: "max_rcpt_per_msg must be 1..=1000".into(),
        });
    }
    (problems.len() == before).then_some(s)
}

fn load_header(dir: &Path, problems: &mut Vec<Problem>) -> Option<Vec<String>> {
    let file = "recipients.csv";
    let f = match std::fs::File::open(dir.join(file)) {
        Ok(f) => f,
        Err(e) => {
            problems.push(Problem {
                file,
                line: None,
                msg: format!("cannot open: {e}"),
            });
            return None;
        }
    };
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).from_reader(f);
    match rdr.headers() {
        Ok(h) if !(h.is_empty() || h.len() == 1 && h[0].is_empty()) => {
            let cols: Vec<String> = h.iter().map(|c| c.trim().to_string()).collect();
            for (i, c) in cols.iter().enumerate() {
                if cols[..i].iter().any(|p| p.eq_ignore_ascii_case(c)) {
                    problems.push(Problem {
                        file,
                        line: Some(1),
                        msg: format!("column {c:?} appears twice"),
                    });
                    return None;
                }
            }
            Some(cols)
        }
        Ok(_) => {
            problems.push(Problem {
                file,
                line: Some(1),
                msg: "empty file: the first line must be the column header".into(),
            });
            None
        }
        Err(e) => {
            problems.push(Problem {
                file,
                line: Some(1),
                msg: format!("unreadable header: {e}"),
            });
            None
        }
    }
}

fn read_limited(path: &Path, max: usize) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() as usize > max {
        return Err(format!("{} octets, over the {max} limit", meta.len()));
    }
    std::fs::read(path).map_err(|e| format!("cannot read: {e}"))
}

fn split_line(s: &str) -> (Option<usize>, String) {
    if let Some(rest) = s.strip_prefix("line ") {
        if let Some((n, msg)) = rest.split_once(": ") {
            if let Ok(n) = n.parse() {
                return (Some(n), msg.to_string());
            }
        }
    }
    (None, s.to_string())
}

/// Checks an address (RFC 5321 `Mailbox`, ASCII only for now) and lowercases its
/// domain; the local part's case is the receiver's business.
pub fn normalise_address(a: &str) -> Result<String, &'static str> {
    if a.len() > 254 {
        return Err("longer than 254 octets");
    }
    if !a.is_ascii() {
        return Err("non-ASCII addresses need SMTPUTF8, which volley does not send yet");
    }
    let (local, domain) = a.rsplit_once('@').ok_or("missing @")?;
    if local.is_empty() || local.len() > 64 {
        return Err("local part must be 1 to 64 octets");
    }
    if local
        .bytes()
        .any(|c| c <= b' ' || c == b'<' || c == b'>' || c == b'@' || c == b',' || c == 0x7f)
    {
        return Err("local part has a space, control character or one of <>@,");
    }
    check_domain(domain)?;
    Ok(format!("{local}@{}", domain.to_ascii_lowercase()))
}

fn check_domain(d: &str) -> Result<(), &'static str> {
    if d.is_empty() || d.len() > 253 {
        return Err("domain must be 1 to 253 octets");
    }
    if !d.contains('.') {
        return Err("domain has no dot");
    }
    for label in d.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("domain has an empty or over-long label");
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err("domain labels are letters, digits and inner hyphens");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            normalise_address("Ann@Example.COM").unwrap(),
            "Ann@example.com"
        );
        assert!(normalise_address("no-at").is_err());
        assert!(normalise_address("a@b").is_err());
        assert!(normalise_address("a b@c.de").is_err());
        assert!(normalise_address("a@-x.de").is_err());
        assert!(normalise_address("ä@x.de").is_err());
    }
}
