//! Campaign directories: `campaign.toml` (settings), `message.eml` (the template)
//! and `recipients.csv` (address + merge columns). Loading validates everything and
//! reports every problem as `file:line: what, and what to do`.

use crate::message::template::{RenderError, RenderNotes, Template, LINE_OCTETS_WARN};
use crate::policy::classify::Class;
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

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
    /// Which of the From domain's keys sign: a selector or a list of them, one
    /// signature each; none: every key in the domain's directory.
    #[serde(default)]
    pub dkim_selector: Option<crate::message::dkim::Selectors>,
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

impl Problem {
    /// `file:line: warning: msg`, for what is allowed but may hurt delivery.
    pub fn as_warning(&self) -> String {
        match self.line {
            Some(l) => format!("{}:{l}: warning: {}", self.file, self.msg),
            None => format!("{}: warning: {}", self.file, self.msg),
        }
    }
}

/// Why a recipient row is refused. Every row is checked as it would be sent: its
/// address, its values, and the message its values make of the template.
#[derive(Debug, Error)]
pub enum RowError {
    /// The CSV cannot be read on from here (not skippable: the rest is out of step).
    #[error("unreadable CSV: {0}; fix the quoting")]
    Csv(String),
    #[error("{got} fields, the header has {want}; quote fields that hold a comma (\"Smith, John\") or fix the row")]
    FieldCount { got: usize, want: usize },
    #[error("row of {size} octets is over the {ROW_BYTES_MAX} limit; shorten its merge values (a missing closing quote makes one row of many)")]
    TooBig { size: usize },
    #[error("invalid address {raw:?}: {why}")]
    Address { raw: String, why: AddressError },
    #[error("field {field} contains a line break; merge values must be one line (a break would inject headers)")]
    LineBreak { field: String },
    #[error(
        "field {field} contains a NUL byte, which RFC 5322 allows nowhere in a message; remove it"
    )]
    Nul { field: String },
    #[error("field {field} is not valid UTF-8; export the list as UTF-8")]
    NotUtf8 { field: String },
    /// The message this row's values make is not valid RFC 5322; `at` is the
    /// template line ("message.eml:6").
    #[error("{}", render_msg(at, error))]
    Render { at: String, error: RenderError },
}

fn render_msg(at: &str, e: &RenderError) -> String {
    match e {
        RenderError::LineTooLong { .. } => format!("{at} {e}"),
        RenderError::HeaderControl { field, byte, .. } => format!(
            "field {field} has the control character {byte:#04x}, which a header field ({at}) cannot carry; header text is printable characters, spaces and tabs (RFC 5322 §3.2)"
        ),
        _ => format!("{at}: {e}"),
    }
}

impl RowError {
    /// Whether `--skip-bad-rows` may skip the row. A CSV syntax error cannot be
    /// skipped: the rows after it cannot be trusted.
    pub fn skippable(&self) -> bool {
        !matches!(self, RowError::Csv(_))
    }

    /// The enhanced status code (RFC 3463) of the local bounce a skipped row gets:
    /// 5.1.3 bad address syntax, 5.3.4 too big, 5.6.0 a message that would be invalid.
    pub fn enhanced(&self) -> &'static str {
        match self {
            RowError::Address { .. } => "5.1.3",
            RowError::TooBig { .. } => "5.3.4",
            _ => "5.6.0",
        }
    }

    /// The SMTP reply code that goes with [`RowError::enhanced`].
    pub fn code(&self) -> u16 {
        match self {
            RowError::Address { .. } => 553,
            _ => 554,
        }
    }

    /// The reply class of the local bounce: `invalid_recipient` for an address,
    /// `content` for the rest.
    pub fn class(&self) -> Class {
        match self {
            RowError::Address { .. } => Class::InvalidRecipient,
            _ => Class::Content,
        }
    }
}

/// A refused recipient row, as [`Campaign::recipients`] reports it.
#[derive(Debug)]
pub struct BadRow {
    /// recipients.csv line (None when the CSV reader cannot say).
    pub line: Option<usize>,
    /// The row's address as written, control characters replaced by `?`, at most
    /// [`SKIPPED_RCPT_OCTETS_MAX`] octets ("" when the row has no email field).
    pub rcpt: String,
    pub error: RowError,
}

impl BadRow {
    /// The row's problem, `recipients.csv:LINE: why`.
    pub fn problem(&self) -> Problem {
        Problem {
            file: "recipients.csv",
            line: self.line,
            msg: self.error.to_string(),
        }
    }
}

/// What streaming the rows found besides the rows themselves.
#[derive(Debug, Default)]
pub struct Streamed {
    /// Rows read (good and bad).
    pub rows: u64,
    /// Allowed but worth saying, one per template line: lines over
    /// [`LINE_OCTETS_WARN`] octets, raw non-ASCII in a header field.
    pub warnings: Vec<Problem>,
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
    /// The template's own warnings (long lines, raw non-ASCII in a header), each
    /// with its message.eml line.
    pub template_warnings: Vec<Problem>,
    /// Header lines added in front of the template (List-Unsubscribe...): the
    /// parsed template's line numbers are message.eml's plus this.
    pub added_lines: usize,
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
            if let Err(e) = crate::policy::shaping::rules::parse_per(r) {
                problems.push(Problem {
                    file: "campaign.toml",
                    line: None,
                    msg: format!("max_msg_rate: {e}"),
                });
            }
        }
        if let Some(m) = &settings.list_unsubscribe_mailto {
            match normalise_address(m) {
                Err(why) => problems.push(Problem {
                    file: "campaign.toml",
                    line: None,
                    msg: format!("list_unsubscribe_mailto {m:?}: {why}; give an address, e.g. unsubscribe@news.example"),
                }),
                // A mailto: URI would need the quotes and spaces percent-encoded.
                Ok(a) if a.starts_with('"') => problems.push(Problem {
                    file: "campaign.toml",
                    line: None,
                    msg: format!("list_unsubscribe_mailto {m:?}: a quoted local part cannot go in a mailto: URI as it is; use an address without quotes"),
                }),
                Ok(_) => {}
            }
        }
        let done = crate::message::compliance::complete(&template_text, &settings);
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
                template_warnings: template
                    .warnings()
                    .iter()
                    .map(|w| Problem {
                        file: if w.line > shift {
                            "message.eml"
                        } else {
                            "campaign.toml"
                        },
                        line: (w.line > shift).then(|| w.line - shift),
                        msg: w.msg.clone(),
                    })
                    .collect(),
                added_lines: shift,
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

    /// Streams the recipient rows: valid ones to `ok`, refused ones to `bad`. Each
    /// row is checked as it would be sent: its address (see [`normalise_address`]),
    /// its values (one line, no NUL, UTF-8) and the message they make of the
    /// template ([`Template::check_values`]). A CSV syntax error is reported to `bad`
    /// and ends the stream (the rest cannot be trusted). Err when `ok` fails.
    pub fn recipients(
        &self,
        mut ok: impl FnMut(Row) -> Result<(), String>,
        mut bad: impl FnMut(BadRow),
    ) -> Result<Streamed, Problem> {
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
        let mut streamed = Streamed::default();
        let mut notes = RenderNotes::default();
        let mut scratch = Vec::with_capacity(1024);
        loop {
            match rdr.read_byte_record(&mut rec) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    bad(BadRow {
                        line: e.position().map(|p| p.line() as usize),
                        rcpt: String::new(),
                        error: RowError::Csv(e.to_string()),
                    });
                    break;
                }
            }
            streamed.rows += 1;
            let line = rec.position().map_or(0, |p| p.line()) as u32;
            match self.check_row(&rec, line, &mut scratch, &mut notes) {
                Ok(row) => {
                    if let Err(msg) = ok(row) {
                        return Err(Problem {
                            file: "recipients.csv",
                            line: Some(line as usize),
                            msg,
                        });
                    }
                }
                Err(error) => bad(BadRow {
                    line: Some(line as usize),
                    rcpt: rec.get(self.email_col).map(shown_rcpt).unwrap_or_default(),
                    error,
                }),
            }
        }
        streamed.warnings = self.note_warnings(&notes);
        Ok(streamed)
    }

    fn check_row(
        &self,
        rec: &csv::ByteRecord,
        line: u32,
        scratch: &mut Vec<u8>,
        notes: &mut RenderNotes,
    ) -> Result<Row, RowError> {
        if rec.len() != self.columns.len() {
            return Err(RowError::FieldCount {
                got: rec.len(),
                want: self.columns.len(),
            });
        }
        let size: usize = rec.iter().map(<[u8]>::len).sum();
        if size > ROW_BYTES_MAX {
            return Err(RowError::TooBig { size });
        }
        // The address first: a bad one makes the row an invalid recipient, whatever
        // else is wrong with it.
        let raw = String::from_utf8_lossy(&rec[self.email_col]);
        let raw = raw.trim();
        let email = normalise_address(raw).map_err(|why| RowError::Address {
            raw: raw.to_string(),
            why,
        })?;
        for (i, v) in rec.iter().enumerate() {
            let field = || self.columns[i].clone();
            if i == self.email_col {
                continue;
            }
            if v.iter().any(|&c| c == b'\r' || c == b'\n') {
                return Err(RowError::LineBreak { field: field() });
            }
            if v.contains(&0) {
                return Err(RowError::Nul { field: field() });
            }
            if std::str::from_utf8(v).is_err() {
                return Err(RowError::NotUtf8 { field: field() });
            }
        }
        let mut values: Vec<Vec<u8>> = rec.iter().map(<[u8]>::to_vec).collect();
        values[self.email_col] = email.clone().into_bytes();
        self.template
            .check_values(&values, line, scratch, notes)
            .map_err(|error| RowError::Render {
                at: self.template_at(error.line()),
                error,
            })?;
        Ok(Row {
            line,
            email,
            values,
        })
    }

    /// Where a line of the parsed template came from: message.eml, or the
    /// List-Unsubscribe field added from campaign.toml.
    fn template_at(&self, line: usize) -> String {
        if line > self.added_lines {
            format!("message.eml:{}", line - self.added_lines)
        } else {
            "campaign.toml's list_unsubscribe_url (the List-Unsubscribe field volley adds)".into()
        }
    }

    /// The warnings the rows' notes add up to, one per template line.
    fn note_warnings(&self, notes: &RenderNotes) -> Vec<Problem> {
        let at = |line: usize| {
            if line > self.added_lines {
                ("message.eml", Some(line - self.added_lines))
            } else {
                ("campaign.toml", None)
            }
        };
        let mut out = Vec::new();
        for (&line, c) in &notes.long {
            let (file, line) = at(line);
            let range = if c.min == c.max {
                c.max.to_string()
            } else {
                format!("{} to {}", c.min, c.max)
            };
            out.push(Problem {
                file,
                line,
                msg: format!(
                    "{} row(s) make this line {range} octets (first recipients.csv:{}), over {LINE_OCTETS_WARN}: some receivers rewrap long lines, which breaks the DKIM signature; keep merged lines shorter",
                    c.rows, c.first_row
                ),
            });
        }
        for (&line, (name, c)) in &notes.non_ascii {
            let (file, line) = at(line);
            out.push(Problem {
                file,
                line,
                msg: format!(
                    "{} row(s) put raw non-ASCII in the {name} header (first recipients.csv:{}): it goes as it is to receivers that offer SMTPUTF8 (RFC 6531) and as RFC 2047 encoded-words to the others, which works for Subject, display names and other free text but not in addresses, Message-ID or List-* fields (those recipients then fail with 5.6.9)",
                    c.rows, c.first_row
                ),
            });
        }
        out
    }
}

/// A bad row's address as the log and the reply text show it: control characters
/// replaced, at most [`SKIPPED_RCPT_OCTETS_MAX`] octets.
fn shown_rcpt(raw: &[u8]) -> String {
    let mut s: String = String::from_utf8_lossy(raw)
        .trim()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.len() > SKIPPED_RCPT_OCTETS_MAX {
        let mut end = SKIPPED_RCPT_OCTETS_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
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
    let mut s: Settings = match toml::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            // toml puts an error found at the end of the file (an unclosed `[`) past
            // its last line end, on a line the file does not have: name the last
            // line with text instead.
            let at = |start: usize| start.min(text.trim_end().len());
            let line = e
                .span()
                .map(|s| text[..at(s.start)].matches('\n').count() + 1);
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
    match sender {
        // MAIL FROM carries the normalised form (no trailing dot, lowercased domain).
        Ok(a) if !a.is_empty() => s.sender = a,
        Ok(_) => {}
        Err(why) => problems.push(Problem {
            file,
            line: line_of("sender"),
            msg: format!("sender {:?}: {why}", s.sender),
        }),
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

/// Longest local part (before the @), RFC 5321 §4.5.3.1.1.
pub const LOCAL_PART_OCTETS_MAX: usize = 64;
/// Longest address: a path is at most 256 octets with its angle brackets (RFC 5321
/// §4.5.3.1.3), so the address inside is at most 254.
pub const ADDRESS_OCTETS_MAX: usize = 254;
pub use crate::smtp::names::{
    check_domain, check_ehlo_name, DomainError, EhloError, DOMAIN_OCTETS_MAX, LABEL_OCTETS_MAX,
};

/// Octets of a bad row's raw address kept in its local bounce record and reply text.
pub const SKIPPED_RCPT_OCTETS_MAX: usize = 320;

/// Why a recipient, sender or unsubscribe address is refused (RFC 5321 §4.1.2:
/// `Mailbox = Local-part "@" ( Domain / address-literal )`, `Local-part =
/// Dot-string / Quoted-string`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    #[error("missing @")]
    MissingAt,
    #[error("{len} octets, over the {ADDRESS_OCTETS_MAX} an address can have (RFC 5321 §4.5.3.1.3: a path of 256 with its <>)")]
    TooLong { len: usize },
    #[error("empty local part (before the @)")]
    LocalEmpty,
    #[error(
        "local part of {len} octets, over the {LOCAL_PART_OCTETS_MAX} RFC 5321 §4.5.3.1.1 allows"
    )]
    LocalTooLong { len: usize },
    #[error("the local part has a leading, trailing or doubled dot; RFC 5321 allows that only quoted (\"a..b\"@example.com)")]
    LocalDots,
    #[error("{0:?} is allowed in a local part only inside quotes (\"...\"@example.com, RFC 5321 §4.1.2); in recipients.csv the quotes are doubled inside a quoted field: \"\"\"odd user\"\"@example.com\"")]
    LocalChar(char),
    #[error("an unclosed quoted string in the local part")]
    Unclosed,
    #[error("text after the closing quote of the local part; the @ must follow it")]
    AfterQuote,
    #[error("a control character (addresses are printable ASCII, RFC 5321 §4.1.2)")]
    Control,
    #[error("a non-ASCII local part needs SMTPUTF8 (RFC 6531); volley does not take UTF-8 addresses yet: ask the recipient for an ASCII one")]
    NonAsciiLocal,
    #[error("{0} is an address literal: valid in RFC 5321, but volley does not deliver to address literals (bulk mail goes to a domain's MX); give the domain")]
    AddressLiteral(String),
    #[error(transparent)]
    Domain(#[from] DomainError),
}

/// atext (RFC 5321 §4.1.2, RFC 5322 §3.2.3): what a dot-string's atoms are made of.
fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c)
}

fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(is_atext))
}

/// Checks an address (RFC 5321 `Mailbox`, ASCII only for now) and returns the form
/// it is sent in: the domain lowercased and without a trailing dot (`example.com.`
/// is the same domain, but RFC 5321 has no trailing dot), a quoted local part
/// unquoted when a dot-string says the same (RFC 5321 §4.1.2: a sender should not
/// quote what need not be) and otherwise quoted with only `"` and `\` escaped.
/// The local part's case is the receiver's business. Address literals
/// (`user@[192.0.2.1]`) are refused: see [`AddressError::AddressLiteral`].
pub fn normalise_address(a: &str) -> Result<String, AddressError> {
    if a.bytes().any(|c| c < 0x20 || c == 0x7f) {
        return Err(AddressError::Control);
    }
    let (local, domain) = if let Some(q) = a.strip_prefix('"') {
        let (content, rest) = split_quoted(q)?;
        let domain = rest.strip_prefix('@').ok_or(if rest.is_empty() {
            AddressError::MissingAt
        } else {
            AddressError::AfterQuote
        })?;
        (canonical_quoted(&content)?, domain)
    } else {
        let (local, domain) = a.rsplit_once('@').ok_or(AddressError::MissingAt)?;
        check_dot_string(local)?;
        (local.to_string(), domain)
    };
    if domain.starts_with('[') {
        return Err(AddressError::AddressLiteral(domain.to_string()));
    }
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    check_domain(domain)?;
    if local.len() > LOCAL_PART_OCTETS_MAX {
        return Err(AddressError::LocalTooLong { len: local.len() });
    }
    let out = format!("{local}@{}", domain.to_ascii_lowercase());
    if out.len() > ADDRESS_OCTETS_MAX {
        return Err(AddressError::TooLong { len: out.len() });
    }
    Ok(out)
}

/// The content of a quoted string (after its opening quote), unescaped, and what
/// follows the closing quote.
fn split_quoted(q: &str) -> Result<(String, &str), AddressError> {
    let mut content = String::new();
    let mut chars = q.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((content, &q[i + 1..])),
            '\\' => content.push(chars.next().ok_or(AddressError::Unclosed)?.1),
            c => content.push(c),
        }
    }
    Err(AddressError::Unclosed)
}

fn canonical_quoted(content: &str) -> Result<String, AddressError> {
    if !content.is_ascii() {
        return Err(AddressError::NonAsciiLocal);
    }
    if is_dot_string(content) {
        return Ok(content.to_string());
    }
    let mut q = String::with_capacity(content.len() + 4);
    q.push('"');
    for c in content.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    Ok(q)
}

fn check_dot_string(local: &str) -> Result<(), AddressError> {
    if local.is_empty() {
        return Err(AddressError::LocalEmpty);
    }
    if !local.is_ascii() {
        return Err(AddressError::NonAsciiLocal);
    }
    if let Some(c) = local.bytes().find(|&c| c != b'.' && !is_atext(c)) {
        return Err(AddressError::LocalChar(c as char));
    }
    if !is_dot_string(local) {
        return Err(AddressError::LocalDots);
    }
    Ok(())
}

/// What `check` and `send` say when no `--ehlo` is given and the host name (read
/// from the kernel) is not a fully qualified domain name: volley then says EHLO
/// `localhost.localdomain` (see [`crate::deliver::config::EngineConfig::new`]), which passes a
/// receiver's FQDN syntax check but not one against DNS. None when the host name has
/// a dot (it is sent as it is, and checked like `--ehlo`).
pub fn default_ehlo_warning(hostname: &str) -> Option<String> {
    if hostname.contains('.') {
        return None;
    }
    Some(format!(
        "the host name {hostname:?} has no dot, so send would say EHLO localhost.localdomain, which receivers that check the EHLO name against DNS distrust; pass --ehlo with the sending address's reverse-DNS name (e.g. mta1.example.net)"
    ))
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
        assert_eq!(normalise_address("no-at"), Err(AddressError::MissingAt));
        assert!(matches!(
            normalise_address("a@b"),
            Err(AddressError::Domain(DomainError::NoDot(_)))
        ));
        assert_eq!(
            normalise_address("a b@c.de"),
            Err(AddressError::LocalChar(' '))
        );
        assert!(matches!(
            normalise_address("a@-x.de"),
            Err(AddressError::Domain(DomainError::LabelHyphen(_)))
        ));
        assert_eq!(
            normalise_address("ä@x.de"),
            Err(AddressError::NonAsciiLocal)
        );
        assert!(matches!(
            normalise_address("a@bücher.de"),
            Err(AddressError::Domain(DomainError::NonAscii(_)))
        ));
    }

    #[test]
    fn every_rfc_5321_mailbox_form_is_accepted_and_sent_as_it_should_be() {
        for (given, sent) in [
            ("ann+tag@a.test", "ann+tag@a.test"),
            ("o'brien@a.test", "o'brien@a.test"),
            ("!#$%&'*+-/=?^_`{|}~@a.test", "!#$%&'*+-/=?^_`{|}~@a.test"),
            ("ANN@A.TEST", "ANN@a.test"),
            ("trailing@a.test.", "trailing@a.test"),
            ("x@xn--bcher-kva.example", "x@xn--bcher-kva.example"),
            ("\"odd user\"@a.test", "\"odd user\"@a.test"),
            ("\"a@b\"@a.test", "\"a@b\"@a.test"),
            ("\"a..b\"@a.test", "\"a..b\"@a.test"),
            // Needless quotes and escapes go (RFC 5321 §4.1.2); needed ones stay.
            ("\"ann\"@a.test", "ann@a.test"),
            ("\"\\a\"@a.test", "a@a.test"),
            ("\"a\\\"b\"@a.test", "\"a\\\"b\"@a.test"),
            ("\"\"@a.test", "\"\"@a.test"),
        ] {
            assert_eq!(normalise_address(given).as_deref(), Ok(sent), "{given}");
        }
    }

    #[test]
    fn every_limit_is_held_at_its_octet() {
        let at = |local: usize, domain: &str| format!("{}@{domain}", "a".repeat(local));
        assert!(normalise_address(&at(64, "a.test")).is_ok());
        assert_eq!(
            normalise_address(&at(65, "a.test")),
            Err(AddressError::LocalTooLong { len: 65 })
        );
        // A quoted local part counts with its quotes, as it goes on the wire.
        let quoted = format!("\"{} \"@a.test", "a".repeat(62));
        assert_eq!(
            normalise_address(&quoted),
            Err(AddressError::LocalTooLong { len: 65 })
        );
        let label63 = format!("{}.test", "b".repeat(63));
        assert!(normalise_address(&at(1, &label63)).is_ok());
        let label64 = format!("{}.test", "b".repeat(64));
        assert_eq!(
            normalise_address(&at(1, &label64)),
            Err(AddressError::Domain(DomainError::LabelTooLong { len: 64 }))
        );
        let d189 = format!(
            "{}.{}.{}.test",
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(56)
        );
        assert_eq!(d189.len(), 189);
        assert_eq!(normalise_address(&at(64, &d189)).unwrap().len(), 254);
        let d190 = format!(
            "{}.{}.{}.test",
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(57)
        );
        assert_eq!(
            normalise_address(&at(64, &d190)),
            Err(AddressError::TooLong { len: 255 })
        );
        let d254 = format!(
            "{}.{}.{}.{}",
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
            "e".repeat(62)
        );
        assert_eq!(check_domain(&d254), Err(DomainError::TooLong { len: 254 }));
    }

    #[test]
    fn malformed_addresses_are_refused_with_the_reason() {
        use AddressError as A;
        use DomainError as D;
        for (given, why) in [
            ("a..b@a.test", A::LocalDots),
            (".a@a.test", A::LocalDots),
            ("a.@a.test", A::LocalDots),
            ("@a.test", A::LocalEmpty),
            ("a(b)@a.test", A::LocalChar('(')),
            ("a\"b@a.test", A::LocalChar('"')),
            ("a\\b@a.test", A::LocalChar('\\')),
            ("\"unclosed@a.test", A::Unclosed),
            ("\"a\"b@a.test", A::AfterQuote),
            ("\"a\"", A::MissingAt),
            ("a\tb@a.test", A::Control),
            ("a@[192.0.2.1]", A::AddressLiteral("[192.0.2.1]".into())),
            ("a@x-.test", A::Domain(D::LabelHyphen("x-".into()))),
            ("a@b..test", A::Domain(D::EmptyLabel("b..test".into()))),
            ("a@.b.test", A::Domain(D::EmptyLabel(".b.test".into()))),
            ("a@b.test..", A::Domain(D::EmptyLabel("b.test.".into()))),
            ("a@b_c.test", A::Domain(D::LabelChar("b_c".into()))),
            ("a@localhost", A::Domain(D::NoDot("localhost".into()))),
            ("a@192.0.2.1", A::Domain(D::Numeric("192.0.2.1".into()))),
            ("a@", A::Domain(D::Empty)),
        ] {
            assert_eq!(normalise_address(given), Err(why), "{given}");
        }
    }

    #[test]
    fn ehlo_names_are_fqdns_or_address_literals() {
        for (given, sent) in [
            ("mta1.example.net", "mta1.example.net"),
            ("mta1.example.net.", "mta1.example.net"),
            ("[192.0.2.1]", "[192.0.2.1]"),
            ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        ] {
            assert_eq!(check_ehlo_name(given).as_deref(), Ok(sent), "{given}");
        }
        assert_eq!(
            check_ehlo_name("mta1"),
            Err(EhloError::NoDot("mta1".into()))
        );
        assert_eq!(
            check_ehlo_name("192.0.2.1"),
            Err(EhloError::BareIp("192.0.2.1".into()))
        );
        assert_eq!(
            check_ehlo_name("2001:db8::1"),
            Err(EhloError::BareIp("2001:db8::1".into()))
        );
        for bad in ["[192.0.2]", "[2001:db8::1]", "[IPv6:x]", "[]"] {
            assert_eq!(check_ehlo_name(bad), Err(EhloError::BadLiteral(bad.into())));
        }
        assert!(matches!(
            check_ehlo_name("mta_1.example.net"),
            Err(EhloError::Domain { .. })
        ));
        assert!(default_ehlo_warning("mta1")
            .unwrap()
            .contains("EHLO localhost.localdomain"));
        assert_eq!(default_ehlo_warning("mta1.example.net"), None);
    }

    #[test]
    fn a_toml_error_at_the_end_of_the_file_names_its_last_line() {
        let dir = std::env::temp_dir().join(format!("volley-campaign-eof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("campaign.toml"),
            "id = \"c1\"\nsender = \"b@news.test\"\nfrom_domain = \"news.test\"\ndkim = [ false\n\n",
        )
        .unwrap();
        let mut problems = Vec::new();
        let settings = load_settings(&dir, &mut problems);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(settings.is_none());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, Some(4), "{}", problems[0]);
    }

    #[test]
    fn a_skipped_row_says_what_kind_of_bounce_it_is() {
        let addr = RowError::Address {
            raw: "a..b@x.test".into(),
            why: AddressError::LocalDots,
        };
        assert_eq!(
            (addr.code(), addr.enhanced(), addr.class().name()),
            (553, "5.1.3", "invalid_recipient")
        );
        let nul = RowError::Nul {
            field: "name".into(),
        };
        assert_eq!(
            (nul.code(), nul.enhanced(), nul.class().name()),
            (554, "5.6.0", "content")
        );
        assert!(!RowError::Csv("x".into()).skippable());
        assert_eq!(shown_rcpt(b" a\nb@x.test "), "a?b@x.test");
        assert_eq!(shown_rcpt("é".repeat(200).as_bytes()).len(), 320);
    }
}
