//! `POST /api/v1/inject`: a JSON body turned into a campaign directory and
//! validated exactly as `volley check DIR` validates one, with every problem
//! pointed back into the body (RFC 6901 JSON pointers).
//!
//! The body is one object: campaign.toml's keys (`id`, `sender`, `from_domain`,
//! ... whatever [`crate::message::campaign::Settings`] takes), `template` (message.eml's
//! text, `{{field}}` merge fields and all) and `recipients` (an array of objects,
//! each with `email` and its merge values). [`stage`] writes the three files into
//! the caller's staging directory and runs the loader `check` runs
//! ([`Campaign::load`], then [`Campaign::recipients`]): there is one validator, so
//! the API cannot take what `check` refuses, nor refuse what it takes.
//!
//! How the files are made, and how their problems map back:
//! - campaign.toml: one `key = value` line per settings key, in body order (the
//!   value as a one-line TOML inline value), so line N is the Nth key: a problem
//!   on line N is at `/key`. A problem without a line that names a key first
//!   (`max_msg_rate: ...`) is at that key; toml's "missing field `k`" at `/k`.
//! - message.eml: `template` as it is; a problem on line N is at `/template`,
//!   saying "line N of the template".
//! - recipients.csv: header `email,<other keys in first-seen order>`, one row per
//!   recipient (the csv crate's writer quotes commas, quotes and line breaks). A
//!   key a recipient lacks is an empty value, as an empty CSV cell: a CSV row
//!   cannot be missing a column, and `check`'s field-count rule exists to catch
//!   unquoted commas, which JSON cannot have. A row's problem is at
//!   `/recipients/I`, or `/recipients/I/KEY` when it names the column (the
//!   address: `/email`). Rows are found by recorded line (a value with a line
//!   break makes a row span lines), not by `line - 2`.
//! - A merge value is a string; numbers and `true`/`false` are taken as their
//!   JSON text. `null`, arrays and objects are refused at their pointer, as are
//!   a recipient that is not an object, one without `email`, a key given twice,
//!   and `template` that is not a string. Those recipients are left out of the
//!   CSV and the rest are still checked, so one response lists every problem (at
//!   most [`ERRORS_LISTED_MAX`], then "... and N more", as `check`).
//! - Malformed JSON stops the reading: one problem "body line L column C: ...",
//!   at the recipient (or top-level key) being read when it broke.
//!
//! What `check` does besides and this does not: the DKIM key lookup
//! (`dkim::key_for` needs the server's `--dkim-dir`) and the EHLO name; the
//! caller does those. Like `check`, settings are deserialised first and toml
//! stops at its first error, so only one of those is listed at a time; and
//! when the settings, template or header are refused the rows are not checked
//! ("nothing was checked past them"). A problem the loader finds at a place the
//! body's reading already refused (a null `id`, then toml's "missing field
//! `id`") is not listed twice; with no recipient at all the template's merge
//! fields are taken as the columns, so they are not each listed as unknown.

use crate::message::campaign::{BadRow, Campaign, Problem, RowError, ERRORS_LISTED_MAX};
use crate::message::template::{RenderError, Template, TemplateError};
use serde::de::{self, DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::fs::File;
use std::path::Path;

/// One problem with an injected body: where (an RFC 6901 pointer into the body,
/// "" for the whole of it) and why, with what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiProblem {
    /// An RFC 6901 JSON pointer into the body ("" for the body as a whole).
    pub pointer: String,
    /// What is wrong there and what to do.
    pub why: String,
}

/// A body staged as a valid campaign directory (the staging `dir` given to
/// [`stage`], which the caller ingests and then deletes).
pub struct Staged {
    /// The campaign, loaded from the staging directory.
    pub campaign: Campaign,
    /// Recipients that passed every check (all of them: any bad one refuses the body).
    pub recipients: u64,
    /// What `check` warns about (long merged lines, raw non-ASCII in a header, the
    /// bulk-sender rules), pointed back into the body.
    pub warnings: Vec<ApiProblem>,
}

/// The CSV writer's buffer: rows go to the file in runs of this size.
const CSV_BUFFER_BYTES: usize = 1 << 20;

/// Writes `body` as a campaign directory in `dir` and validates it as `volley
/// check` does. Err holds every problem found (at most [`ERRORS_LISTED_MAX`] and
/// a count of the rest); a failure to write `dir` is one problem at "".
pub fn stage(body: &[u8], dir: &Path) -> Result<Staged, Vec<ApiProblem>> {
    let (layout, mut problems) = materialise(body, dir)?;
    let campaign = match Campaign::load(dir) {
        Ok(c) => c,
        Err(found) => {
            for p in &found {
                problems.echo(layout.problem(p));
            }
            return Err(problems.finish());
        }
    };
    let mut good = 0u64;
    let streamed = campaign.recipients(
        |_| {
            good += 1;
            Ok(())
        },
        |b| problems.add(layout.bad_row(&b)),
    );
    let warnings = match streamed {
        Ok(s) => {
            // check's "no recipients", when the body gave none (refused ones are listed).
            if s.rows == 0 && layout.recipients_given == 0 {
                problems.echo(ApiProblem {
                    pointer: "/recipients".into(),
                    why: "no recipients; give at least one".into(),
                });
            }
            layout.warnings(&campaign, &s.warnings)
        }
        Err(p) => {
            problems.add(layout.problem(&p));
            Vec::new()
        }
    };
    if !problems.is_empty() {
        return Err(problems.finish());
    }
    Ok(Staged {
        campaign,
        recipients: good,
        warnings,
    })
}

/// The problem list, bounded as `check`'s.
#[derive(Default)]
struct Problems {
    listed: Vec<ApiProblem>,
    more: u64,
    /// Pointers of the body's own problems (beyond single recipients), so the
    /// loader's echo of one (a null `id` makes "missing field `id`") is not listed
    /// twice.
    json: HashSet<String>,
}

impl Problems {
    fn add(&mut self, p: ApiProblem) {
        if self.listed.len() < ERRORS_LISTED_MAX {
            self.listed.push(p);
        } else {
            self.more += 1;
        }
    }

    /// A problem of the body itself (its shape, found while reading it).
    fn body(&mut self, pointer: String, why: String) {
        if !pointer.starts_with("/recipients/") || self.listed.len() < ERRORS_LISTED_MAX {
            self.json.insert(pointer.clone());
        }
        self.add(ApiProblem { pointer, why });
    }

    /// A problem the loader found: dropped when the body's reading already
    /// reported that place.
    fn echo(&mut self, p: ApiProblem) {
        if !self.json.contains(&p.pointer) {
            self.add(p);
        }
    }

    fn is_empty(&self) -> bool {
        self.listed.is_empty() && self.more == 0
    }

    fn finish(mut self) -> Vec<ApiProblem> {
        if self.more > 0 {
            self.listed.push(ApiProblem {
                pointer: String::new(),
                why: format!("... and {} more", self.more),
            });
        }
        self.listed
    }
}

/// An RFC 6901 reference token: `~` and `/` escaped.
fn token(key: &str) -> Cow<'_, str> {
    if key.contains(['~', '/']) {
        Cow::Owned(key.replace('~', "~0").replace('/', "~1"))
    } else {
        Cow::Borrowed(key)
    }
}

fn server_side(e: impl fmt::Display) -> Vec<ApiProblem> {
    vec![ApiProblem {
        pointer: String::new(),
        why: format!("the server could not stage the campaign: {e}; this is not the request's fault, try again"),
    }]
}

/// Reads the body and writes the three files. Ok: where everything went, and the
/// body's own problems (the loader still runs, to list the rest). Err: the body
/// could not be read to its end (malformed JSON), or the files not written.
fn materialise(body: &[u8], dir: &Path) -> Result<(Layout, Problems), Vec<ApiProblem>> {
    let file = File::create(dir.join("recipients.csv")).map_err(server_side)?;
    let mut st = Stage {
        dir,
        problems: Problems::default(),
        cursor: Cursor::Root,
        settings: Vec::new(),
        seen: HashSet::new(),
        template: None,
        rows: Rows::new(file),
        io_error: None,
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let read = Body { st: &mut st }
        .deserialize(&mut de)
        .and_then(|()| de.end());
    if let Some(e) = st.io_error.take() {
        return Err(server_side(e));
    }
    if let Err(e) = read {
        let mut problems = st.problems;
        problems.add(malformed(&e, &st.cursor));
        return Err(problems.finish());
    }
    for (key, why) in [
        (
            "template",
            "no template: give the message (RFC 5322 text with {{field}} merge fields) as a string",
        ),
        (
            "recipients",
            "no recipients: give an array of objects, each with \"email\" and its merge values",
        ),
    ] {
        if !st.seen.contains(key) {
            st.problems.body(format!("/{key}"), why.into());
        }
    }
    if st.rows.given == 0 {
        // No recipient, no columns: take the template's merge fields as the
        // columns, so its check does not list each as unknown on top of the
        // problem with the recipients.
        for name in st.template.as_deref().map(merge_fields).unwrap_or_default() {
            st.rows.add_column(&name, 0);
        }
    }
    let keys = write_settings(dir, &st.settings, &mut st.problems).map_err(server_side)?;
    let recipients_given = st.rows.given;
    let rows = st.rows.finish(dir).map_err(server_side)?;
    Ok((
        Layout {
            keys,
            rows,
            recipients_given,
        },
        st.problems,
    ))
}

/// The merge fields `template` names, as the template parser finds them.
fn merge_fields(template: &str) -> Vec<String> {
    let columns = ["email".to_string()];
    match Template::parse(template.as_bytes(), &columns) {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .into_iter()
            .filter_map(|e| match e {
                TemplateError::UnknownField { name, .. } => Some(name),
                _ => None,
            })
            .collect(),
    }
}

/// A serde_json error as a problem: where the reading was, and the line and column.
fn malformed(e: &serde_json::Error, at: &Cursor) -> ApiProblem {
    let text = e.to_string();
    let why = if e.line() == 0 {
        text
    } else {
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let what = text.strip_suffix(&suffix).unwrap_or(&text);
        format!(
            "body line {} column {}: {what}; the body must be one JSON object",
            e.line(),
            e.column()
        )
    };
    ApiProblem {
        pointer: at.to_string(),
        why,
    }
}

/// Where the reading is, for a malformed body's pointer.
enum Cursor {
    Root,
    Key(String),
    Recipient(u64),
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cursor::Root => Ok(()),
            Cursor::Key(k) => write!(f, "/{}", token(k)),
            Cursor::Recipient(i) => write!(f, "/recipients/{i}"),
        }
    }
}

/// What reading the body gathers and writes as it goes.
struct Stage<'a> {
    dir: &'a Path,
    problems: Problems,
    cursor: Cursor,
    /// campaign.toml's keys and values, in body order.
    settings: Vec<(String, Value)>,
    /// Top-level keys read so far.
    seen: HashSet<String>,
    /// The template, when it is a string.
    template: Option<String>,
    rows: Rows,
    /// A write into the staging directory failed (the body may be fine).
    io_error: Option<String>,
}

impl Stage<'_> {
    fn template(&mut self, v: Value) {
        let Value::String(text) = v else {
            self.problems.body(
                "/template".into(),
                format!(
                    "{} where the template goes: give the message (RFC 5322 text with {{{{field}}}} merge fields) as one string",
                    kind(&v)
                ),
            );
            return;
        };
        if let Err(e) = std::fs::write(self.dir.join("message.eml"), &text) {
            self.io_error = Some(format!("message.eml: {e}"));
        }
        self.template = Some(text);
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "true or false",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The top-level object.
struct Body<'s, 'a> {
    st: &'s mut Stage<'a>,
}

impl<'de> DeserializeSeed<'de> for Body<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Body<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of campaign.toml's keys, \"template\" and \"recipients\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let st = self.st;
        while let Some(key) = map.next_key::<String>()? {
            st.cursor = Cursor::Key(key.clone());
            if !st.seen.insert(key.clone()) {
                st.problems.body(
                    format!("/{}", token(&key)),
                    format!("{key:?} is given twice; give it once"),
                );
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            match key.as_str() {
                "recipients" => map.next_value_seed(Recipients { st: &mut *st })?,
                "template" => st.template(map.next_value()?),
                _ => st.settings.push((key, map.next_value()?)),
            }
            st.cursor = Cursor::Root;
        }
        Ok(())
    }
}

/// Visitor methods for the scalar JSON kinds a visitor does not take: each calls
/// `self.refused(kind)`, which records the problem, and the reading goes on.
macro_rules! refuse_scalars {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            self.refused("true or false");
            Ok(())
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            self.refused("a number");
            Ok(())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            self.refused("a number");
            Ok(())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            self.refused("a number");
            Ok(())
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            self.refused("a string");
            Ok(())
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            self.refused("null");
            Ok(())
        }
    };
}

/// The `recipients` array, streamed: each recipient becomes a CSV row as it is
/// read, so a million of them never sit in memory as JSON values.
struct Recipients<'s, 'a> {
    st: &'s mut Stage<'a>,
}

impl Recipients<'_, '_> {
    fn refused(self, kind: &str) {
        self.st.problems.body(
            "/recipients".into(),
            format!("{kind} where the recipients go: give an array of objects, each with \"email\" and its merge values"),
        );
    }
}

impl<'de> DeserializeSeed<'de> for Recipients<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Recipients<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of recipient objects")
    }

    refuse_scalars!();

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        IgnoredAny.visit_map(map)?;
        self.refused("an object");
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let st = self.st;
        loop {
            let index = st.rows.given;
            st.cursor = Cursor::Recipient(index);
            if seq
                .next_element_seed(Recipient {
                    st: &mut *st,
                    index,
                })?
                .is_none()
            {
                return Ok(());
            }
            st.rows.given += 1;
        }
    }
}

/// One recipient object: its values go into the row buffer, then to the CSV.
struct Recipient<'s, 'a> {
    st: &'s mut Stage<'a>,
    index: u64,
}

impl Recipient<'_, '_> {
    fn refused(self, kind: &str) {
        self.st.problems.body(
            format!("/recipients/{}", self.index),
            format!("{kind} where a recipient goes: each recipient is an object with \"email\" and its merge values"),
        );
    }
}

impl<'de> DeserializeSeed<'de> for Recipient<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Recipient<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a recipient object")
    }

    refuse_scalars!();

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        IgnoredAny.visit_seq(seq)?;
        self.refused("an array");
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (st, index) = (self.st, self.index);
        let rows = &mut st.rows;
        rows.generation += 1;
        let mut refused = false;
        let mut position = 0;
        while let Some(key) = map.next_key_seed(Key)? {
            let col = rows.column(&key, position, index);
            position += 1;
            if rows.stamp[col] == rows.generation {
                st.problems.body(
                    format!("/recipients/{index}/{}", token(&key)),
                    format!("{key:?} is given twice in this recipient; give it once"),
                );
                map.next_value::<IgnoredAny>()?;
                refused = true;
                continue;
            }
            rows.stamp[col] = rows.generation;
            let slot = &mut rows.values[col];
            slot.clear();
            if let Err(kind) = map.next_value_seed(MergeValue { slot })? {
                st.problems.body(
                    format!("/recipients/{index}/{}", token(&key)),
                    format!("{kind} as a merge value: give a string (numbers and true/false are taken as their text)"),
                );
                refused = true;
            }
        }
        if rows.stamp[EMAIL_COL] != rows.generation {
            st.problems.body(
                format!("/recipients/{index}/email"),
                "no \"email\": every recipient needs its address".into(),
            );
            refused = true;
        }
        if !refused {
            if let Err(e) = rows.write(index) {
                return Err(A::Error::custom(
                    st.io_error.insert(format!("recipients.csv: {e}")),
                ));
            }
        }
        Ok(())
    }
}

/// A recipient's key, borrowed from the body when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a merge field name")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s))
    }
}

/// One merge value, written into its column's slot. Ok(Err(kind)) when it is
/// not a string, number or boolean (consumed, so the reading goes on).
struct MergeValue<'a> {
    slot: &'a mut String,
}

impl<'de> DeserializeSeed<'de> for MergeValue<'_> {
    type Value = Result<(), &'static str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MergeValue<'_> {
    type Value = Result<(), &'static str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a merge value (a string)")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        self.slot.push_str(s);
        Ok(Ok(()))
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
        self.slot.push_str(if b { "true" } else { "false" });
        Ok(Ok(()))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        write!(self.slot, "{n}").expect("a String takes any write");
        Ok(Ok(()))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        write!(self.slot, "{n}").expect("a String takes any write");
        Ok(Ok(()))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Self::Value, E> {
        // serde_json's own text for it ("1.5", "1e20"): JSON has no NaN or infinity.
        let n = serde_json::Number::from_f64(n).expect("JSON numbers are finite");
        write!(self.slot, "{n}").expect("a String takes any write");
        Ok(Ok(()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Err("null"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq)?;
        Ok(Err("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map)?;
        Ok(Err("an object"))
    }
}

/// recipients.csv's `email` column: always the first.
const EMAIL_COL: usize = 0;

/// recipients.csv as it is written: the columns so far, one row's values, and
/// where each row starts.
struct Rows {
    wtr: csv::Writer<File>,
    /// Column names (the recipients' keys), first-seen order, `email` first.
    names: Vec<String>,
    index: HashMap<String, usize>,
    /// The recipient each column was first seen in.
    first_seen: Vec<u64>,
    /// The row being read: a value per column, valid where `stamp` is `generation`.
    values: Vec<String>,
    stamp: Vec<u64>,
    generation: u64,
    /// The previous recipient's columns in its key order: recipients usually give
    /// their keys in the same order, and a string compare is cheaper than a hash.
    order: Vec<usize>,
    /// Columns in the header once it is written (with the first row).
    header_cols: Option<usize>,
    /// Lines written after the header.
    line_rel: u64,
    /// Where runs of one-line rows start: (line after the header, recipient).
    runs: Vec<(u64, u64)>,
    /// Recipients read (good or not).
    given: u64,
}

impl Rows {
    fn new(file: File) -> Rows {
        // csv::Writer buffers itself: a BufWriter under it would copy every byte
        // twice. Flexible: rows written before a new column appeared are shorter
        // until `finish` pads them.
        let wtr = csv::WriterBuilder::new()
            .buffer_capacity(CSV_BUFFER_BYTES)
            .flexible(true)
            .from_writer(file);
        Rows {
            wtr,
            names: vec!["email".into()],
            index: HashMap::from([("email".to_string(), EMAIL_COL)]),
            first_seen: vec![0],
            values: vec![String::new()],
            stamp: vec![0],
            generation: 0,
            order: Vec::new(),
            header_cols: None,
            line_rel: 0,
            runs: Vec::new(),
            given: 0,
        }
    }

    /// The column of the `position`th key of recipient `index`, added if new.
    fn column(&mut self, key: &str, position: usize, index: u64) -> usize {
        if let Some(&c) = self.order.get(position) {
            if self.names[c] == key {
                return c;
            }
        }
        let c = self.add_column(key, index);
        if position < self.order.len() {
            self.order[position] = c;
        } else {
            self.order.push(c);
        }
        c
    }

    /// The column named `key`, added (as first seen in recipient `index`) if new.
    fn add_column(&mut self, key: &str, index: u64) -> usize {
        if let Some(&c) = self.index.get(key) {
            return c;
        }
        let c = self.names.len();
        self.names.push(key.to_string());
        self.index.insert(key.to_string(), c);
        self.first_seen.push(index);
        self.values.push(String::new());
        self.stamp.push(0);
        c
    }

    /// Writes the row read (the header first, with the first row).
    fn write(&mut self, index: u64) -> csv::Result<()> {
        if self.header_cols.is_none() {
            self.wtr.write_record(&self.names)?;
            self.header_cols = Some(self.names.len());
        }
        let generation = self.generation;
        let mut breaks = 0;
        for (c, v) in self.values.iter().enumerate() {
            let v = if self.stamp[c] == generation {
                v.as_bytes()
            } else {
                b""
            };
            breaks += memchr::memchr_iter(b'\n', v).count() as u64;
            self.wtr.write_field(v)?;
        }
        self.wtr.write_record(None::<&[u8]>)?;
        let in_run = self
            .runs
            .last()
            .is_some_and(|&(line, first)| self.line_rel - line == index - first);
        if !in_run {
            self.runs.push((self.line_rel, index));
        }
        self.line_rel += 1 + breaks;
        Ok(())
    }

    /// Ends the file: the header alone when no row was written; every row padded
    /// to the final columns when a column first appeared after the first row.
    fn finish(mut self, dir: &Path) -> std::io::Result<RowsLayout> {
        match self.header_cols {
            None => self.wtr.write_record(&self.names)?,
            Some(n) if n < self.names.len() => {
                self.wtr.flush()?;
                pad_rows(&dir.join("recipients.csv"), &self.names)?;
            }
            Some(_) => {}
        }
        self.wtr.flush()?;
        let header_lines = 1 + self
            .names
            .iter()
            .map(|n| memchr::memchr_iter(b'\n', n.as_bytes()).count() as u64)
            .sum::<u64>();
        Ok(RowsLayout {
            names: self.names,
            first_seen: self.first_seen,
            header_lines,
            runs: self.runs,
        })
    }
}

/// Rewrites recipients.csv with the final header and every row as long: the
/// slow path, for bodies whose later recipients bring new keys.
fn pad_rows(path: &Path, names: &[String]) -> std::io::Result<()> {
    let padded = path.with_extension("csv.padded");
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_path(path)?;
    let mut wtr = csv::WriterBuilder::new()
        .buffer_capacity(CSV_BUFFER_BYTES)
        .from_path(&padded)?;
    wtr.write_record(names)?;
    let mut rec = csv::ByteRecord::new();
    while rdr.read_byte_record(&mut rec)? {
        for _ in rec.len()..names.len() {
            rec.push_field(b"");
        }
        wtr.write_byte_record(&rec)?;
    }
    wtr.flush()?;
    std::fs::rename(&padded, path)
}

/// Writes campaign.toml, one key per line; returns the keys in line order.
/// A null (TOML has none) is refused at its pointer and its key left out.
fn write_settings(
    dir: &Path,
    settings: &[(String, Value)],
    problems: &mut Problems,
) -> std::io::Result<Vec<String>> {
    let mut text = String::new();
    let mut keys = Vec::new();
    for (key, value) in settings {
        let mut line = String::new();
        toml_key(key, &mut line);
        line.push_str(" = ");
        match toml_inline(value, &mut line) {
            Ok(()) => {
                text.push_str(&line);
                text.push('\n');
                keys.push(key.clone());
            }
            Err(at) => problems.body(
                format!("/{}{at}", token(key)),
                "null: campaign.toml has no null; leave the key out for its default".into(),
            ),
        }
    }
    std::fs::write(dir.join("campaign.toml"), text)?;
    Ok(keys)
}

fn toml_key(key: &str, out: &mut String) {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
    if bare {
        out.push_str(key);
    } else {
        toml_string(key, out);
    }
}

/// A TOML basic string on one line. JSON's escapes (\" \\ \n \r \t \b \f \uXXXX)
/// are all TOML's too; TOML also wants DEL escaped, which JSON leaves raw.
fn toml_string(s: &str, out: &mut String) {
    let json = serde_json::to_string(s).expect("a string always serialises");
    out.push_str(&json.replace('\u{7f}', "\\u007F"));
}

/// `v` as a one-line TOML inline value (so campaign.toml's line N stays the Nth
/// key). Err: the pointer, below the key, of a null.
fn toml_inline(v: &Value, out: &mut String) -> Result<(), String> {
    match v {
        Value::Null => return Err(String::new()),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        // serde_json's text is TOML's: "7", "-3", "1.5", "1e20". Past i64 toml
        // refuses it, as it would in a campaign.toml.
        Value::Number(n) => write!(out, "{n}").expect("a String takes any write"),
        Value::String(s) => toml_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                toml_inline(item, out).map_err(|at| format!("/{i}{at}"))?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                out.push_str(if i > 0 { ", " } else { " " });
                toml_key(k, out);
                out.push_str(" = ");
                toml_inline(item, out).map_err(|at| format!("/{}{at}", token(k)))?;
            }
            out.push_str(if map.is_empty() { "}" } else { " }" });
        }
    }
    Ok(())
}

/// Where recipients.csv's columns and rows came from.
struct RowsLayout {
    names: Vec<String>,
    first_seen: Vec<u64>,
    /// Lines the header takes (a key with a line break takes more than one).
    header_lines: u64,
    runs: Vec<(u64, u64)>,
}

/// Where each part of the staged directory came from in the body.
struct Layout {
    /// campaign.toml's keys: line N is `keys[N - 1]`.
    keys: Vec<String>,
    rows: RowsLayout,
    /// Recipients in the body (good or not).
    recipients_given: u64,
}

impl Layout {
    /// The recipient whose row starts on recipients.csv line `line`.
    fn recipient(&self, line: usize) -> Option<u64> {
        let rel = (line as u64).checked_sub(self.rows.header_lines + 1)?;
        let runs = &self.rows.runs;
        let (start, first) = runs[..runs.partition_point(|&(start, _)| start <= rel)]
            .last()
            .copied()?;
        Some(first + (rel - start))
    }

    fn recipient_pointer(&self, line: Option<usize>) -> String {
        match line.and_then(|l| self.recipient(l)) {
            Some(i) => format!("/recipients/{i}"),
            None => "/recipients".into(),
        }
    }

    /// A settings problem's key: its line's, or the key the message opens with.
    fn settings_pointer(&self, p: &Problem) -> String {
        if let Some(rest) = p.msg.strip_prefix("missing field `") {
            if let Some((key, _)) = rest.split_once('`') {
                return format!("/{}", token(key));
            }
        }
        if let Some(key) = p.line.and_then(|l| self.keys.get(l.checked_sub(1)?)) {
            return format!("/{}", token(key));
        }
        self.keys
            .iter()
            .filter(|k| {
                p.msg
                    .strip_prefix(k.as_str())
                    .is_some_and(|rest| rest.starts_with([' ', ':']))
            })
            .max_by_key(|k| k.len())
            .map_or_else(String::new, |k| format!("/{}", token(k)))
    }

    /// recipients.csv's header problem (a column given twice, as `load_header`
    /// finds it): at the recipient that brought the second one.
    fn header_pointer(&self) -> String {
        let trimmed: Vec<&str> = self.rows.names.iter().map(|n| n.trim()).collect();
        (0..trimmed.len())
            .find(|&j| {
                trimmed[..j]
                    .iter()
                    .any(|p| p.eq_ignore_ascii_case(trimmed[j]))
            })
            .map_or_else(
                || "/recipients".into(),
                |j| {
                    format!(
                        "/recipients/{}/{}",
                        self.rows.first_seen[j],
                        token(&self.rows.names[j])
                    )
                },
            )
    }

    /// A loader problem (campaign.toml, message.eml, recipients.csv) in body terms.
    fn problem(&self, p: &Problem) -> ApiProblem {
        let why = self.rewrite(&p.msg);
        match p.file {
            "campaign.toml" => ApiProblem {
                pointer: self.settings_pointer(p),
                why,
            },
            "message.eml" => ApiProblem {
                pointer: "/template".into(),
                why: match p.line {
                    Some(l) => format!("line {l} of the template: {why}"),
                    None => why,
                },
            },
            "recipients.csv" if p.line == Some(1) => ApiProblem {
                pointer: self.header_pointer(),
                why,
            },
            "recipients.csv" => ApiProblem {
                pointer: self.recipient_pointer(p.line),
                why,
            },
            _ => ApiProblem {
                pointer: String::new(),
                why,
            },
        }
    }

    /// A refused row: at its recipient, and at the key when the problem names
    /// its column.
    fn bad_row(&self, b: &BadRow) -> ApiProblem {
        let mut pointer = self.recipient_pointer(b.line);
        let column = match &b.error {
            RowError::Address { .. } => Some("email"),
            RowError::LineBreak { field }
            | RowError::Nul { field }
            | RowError::NotUtf8 { field }
            | RowError::Render {
                error: RenderError::HeaderControl { field, .. },
                ..
            } => Some(field.as_str()),
            _ => None,
        };
        // The loader names columns trimmed; the pointer wants the key as given.
        let key = column.and_then(|c| self.rows.names.iter().find(|n| n.trim() == c));
        if let (Some(key), true) = (key, pointer != "/recipients") {
            pointer.push('/');
            pointer.push_str(&token(key));
        }
        ApiProblem {
            pointer,
            why: self.rewrite(&b.error.to_string()),
        }
    }

    /// The loader's warnings, and the bulk-sender rules' (about the campaign as a
    /// whole), in body terms.
    fn warnings(&self, c: &Campaign, streamed: &[Problem]) -> Vec<ApiProblem> {
        let mut out: Vec<ApiProblem> = c
            .template_warnings
            .iter()
            .chain(streamed)
            .map(|w| self.problem(w))
            .collect();
        out.extend(c.warnings.iter().map(|w| ApiProblem {
            pointer: String::new(),
            why: w.clone(),
        }));
        out
    }

    /// The loader's `message.eml:N` and `recipients.csv:N` in body terms.
    fn rewrite(&self, msg: &str) -> String {
        let mut out = String::with_capacity(msg.len() + 16);
        let mut rest = msg;
        loop {
            let next = [("message.eml:", true), ("recipients.csv:", false)]
                .into_iter()
                .filter_map(|(tag, tmpl)| rest.find(tag).map(|at| (at, tag, tmpl)))
                .min_by_key(|&(at, _, _)| at);
            let Some((at, tag, tmpl)) = next else { break };
            let after = &rest[at + tag.len()..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            out.push_str(&rest[..at]);
            match after[..digits].parse::<usize>() {
                Ok(n) if tmpl => write!(out, "line {n} of the template"),
                Ok(n) => write!(out, "{}", self.recipient_pointer(Some(n))),
                Err(_) => write!(out, "{tag}"),
            }
            .expect("a String takes any write");
            rest = &after[digits..];
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    /// A staging directory, removed when the test ends.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let d =
                std::env::temp_dir().join(format!("volley-inject-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const TEMPLATE: &str = "From: News <news@news.test>\nTo: {{email}}\nSubject: Hello {{name}}\n\nHi {{name}}, your code is {{code}}.\n";

    fn body(recipients: Value) -> Value {
        json!({
            "id": "c1",
            "sender": "bounces@news.test",
            "from_domain": "news.test",
            "dkim": false,
            "template": TEMPLATE,
            "recipients": recipients,
        })
    }

    fn three() -> Value {
        json!([
            {"email": "a@x.test", "name": "Ann", "code": "A1"},
            {"email": "b@x.test", "name": "Bob", "code": 7},
            {"email": "c@x.test", "name": "Cy", "code": true},
        ])
    }

    fn stage_json(name: &str, v: &Value) -> (Dir, Result<Staged, Vec<ApiProblem>>) {
        let d = Dir::new(name);
        let r = stage(&serde_json::to_vec(v).unwrap(), &d.0);
        (d, r)
    }

    fn problems(name: &str, v: &Value) -> Vec<ApiProblem> {
        match stage_json(name, v).1 {
            Ok(_) => panic!("{name}: staged, expected problems"),
            Err(p) => p,
        }
    }

    fn pointers(p: &[ApiProblem]) -> Vec<&str> {
        p.iter().map(|p| p.pointer.as_str()).collect()
    }

    /// Each good row's values, rendered through the template.
    fn rendered(c: &Campaign) -> Vec<String> {
        let mut out = Vec::new();
        c.recipients(
            |row| {
                let mut m = Vec::new();
                c.template.render(&row.values, &mut m);
                out.push(String::from_utf8(m).unwrap());
                Ok(())
            },
            |b| panic!("bad row {}", b.problem()),
        )
        .unwrap();
        out
    }

    #[test]
    fn a_good_body_stages_and_loads_with_the_right_count_and_columns() {
        // The first recipient lacks "code": the header grows after the first row.
        let mut r = three();
        r[0].as_object_mut().unwrap().remove("code");
        let (_d, staged) = stage_json("good", &body(r));
        let s = staged.unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(s.recipients, 3);
        assert_eq!(s.campaign.columns, ["email", "name", "code"]);
        assert_eq!(s.campaign.settings.id, "c1");
        let msgs = rendered(&s.campaign);
        assert!(
            msgs[0].contains("Hi Ann, your code is .\r\n"),
            "{}",
            msgs[0]
        );
        assert!(msgs[1].contains("your code is 7."));
        assert!(msgs[2].contains("your code is true."));
    }

    #[test]
    fn a_bad_from_domain_is_pointed_at_from_domain() {
        let mut b = body(three());
        b["from_domain"] = json!("no-dot");
        let p = problems("from-domain", &b);
        assert_eq!(pointers(&p), ["/from_domain"], "{p:?}");
        assert!(p[0].why.contains("\"no-dot\""), "{p:?}");
    }

    #[test]
    fn a_bad_email_in_recipient_3_is_pointed_at_its_email() {
        let mut r = three();
        r.as_array_mut()
            .unwrap()
            .push(json!({"email": "d..e@x.test", "name": "Di", "code": "D"}));
        let p = problems("bad-email", &body(r));
        assert_eq!(pointers(&p), ["/recipients/3/email"], "{p:?}");
        assert!(p[0].why.contains("doubled dot"), "{p:?}");
    }

    #[test]
    fn a_template_with_an_unknown_merge_field_is_pointed_at_the_template() {
        let mut b = body(three());
        b["template"] = json!(format!("{TEMPLATE}Yours, {{{{signature}}}}\n"));
        let p = problems("unknown-field", &b);
        assert_eq!(pointers(&p), ["/template"], "{p:?}");
        assert!(
            p[0].why
                .starts_with("line 6 of the template: unknown merge field {{signature}}"),
            "{p:?}"
        );
    }

    #[test]
    fn a_template_that_is_not_a_string_is_refused_at_template_once() {
        let mut b = body(three());
        b["template"] = json!(["From: a@b.test"]);
        let p = problems("template-type", &b);
        assert_eq!(pointers(&p), ["/template"], "{p:?}");
        assert!(
            p[0].why.starts_with("an array where the template goes"),
            "{p:?}"
        );
    }

    #[test]
    fn malformed_json_names_the_line_and_column_and_the_recipient_being_read() {
        let text = "{\"id\": \"c1\",\n \"recipients\": [\n  {\"email\": \"a@x.test\"},\n  {\"email\" \"b@x.test\"}\n]}";
        let d = Dir::new("malformed");
        let p = stage(text.as_bytes(), &d.0).err().unwrap();
        assert_eq!(pointers(&p), ["/recipients/1"], "{p:?}");
        assert!(
            p[0].why.starts_with("body line 4 column 12: expected `:`"),
            "{p:?}"
        );
    }

    #[test]
    fn a_body_that_is_not_an_object_is_refused_at_its_first_character() {
        let d = Dir::new("not-object");
        let p = stage(b"[1, 2]", &d.0).err().unwrap();
        assert_eq!(pointers(&p), [""], "{p:?}");
        assert!(
            p[0].why
                .starts_with("body line 1 column 1: invalid type: sequence"),
            "{p:?}"
        );
    }

    #[test]
    fn a_recipient_that_is_not_an_object_is_refused_and_the_rest_still_checked() {
        let r = json!([
            {"email": "a@x.test", "name": "Ann", "code": "A"},
            "b@x.test",
            {"name": "No address", "code": "C"},
            {"email": "d@x.test", "name": null, "code": "D"},
            {"email": "e@@x.test", "name": "Ed", "code": "E"},
        ]);
        let p = problems("not-object", &body(r));
        assert_eq!(
            pointers(&p),
            [
                "/recipients/1",
                "/recipients/2/email",
                "/recipients/3/name",
                "/recipients/4/email"
            ],
            "{p:?}"
        );
        assert!(
            p[0].why.starts_with("a string where a recipient goes"),
            "{p:?}"
        );
        assert!(p[2].why.starts_with("null as a merge value"), "{p:?}");
    }

    #[test]
    fn recipients_that_are_not_an_array_are_refused_at_recipients() {
        let p = problems("not-array", &body(json!({"email": "a@x.test"})));
        assert_eq!(pointers(&p), ["/recipients"], "{p:?}");
        assert!(
            p[0].why.starts_with("an object where the recipients go"),
            "{p:?}"
        );
        let p = problems("empty", &body(json!([])));
        assert_eq!(pointers(&p), ["/recipients"], "{p:?}");
        assert_eq!(p[0].why, "no recipients; give at least one");
    }

    #[test]
    fn an_unknown_top_level_key_is_refused_at_its_pointer() {
        let mut b = body(three());
        b["colour"] = json!("red");
        let p = problems("unknown-key", &b);
        assert_eq!(pointers(&p), ["/colour"], "{p:?}");
        assert!(p[0].why.starts_with("unknown field `colour`"), "{p:?}");
    }

    #[test]
    fn a_setting_of_the_wrong_type_or_null_is_refused_at_its_key_once() {
        let mut b = body(three());
        b["dkim"] = json!("yes");
        let p = problems("wrong-type", &b);
        assert_eq!(pointers(&p), ["/dkim"], "{p:?}");
        let mut b = body(three());
        b["id"] = Value::Null;
        let p = problems("null-id", &b);
        assert_eq!(pointers(&p), ["/id"], "{p:?}");
        assert!(
            p[0].why.starts_with("null: campaign.toml has no null"),
            "{p:?}"
        );
        let mut b = body(three());
        b["max_msg_rate"] = json!("fast");
        let p = problems("rate", &b);
        assert_eq!(pointers(&p), ["/max_msg_rate"], "{p:?}");
    }

    #[test]
    fn commas_and_quotes_in_merge_values_survive_the_csv_round_trip() {
        let r = json!([
            {"email": "a@x.test", "name": "Smith, \"Jo\"", "code": "x,y\"z"},
            {"email": "\"odd user\"@x.test", "name": "", "code": "  spaced  "},
        ]);
        let (_d, staged) = stage_json("round-trip", &body(r));
        let s = staged.unwrap_or_else(|p| panic!("{p:?}"));
        let msgs = rendered(&s.campaign);
        assert!(
            msgs[0].contains("Subject: Hello Smith, \"Jo\"\r\n"),
            "{}",
            msgs[0]
        );
        assert!(msgs[0].contains("Hi Smith, \"Jo\", your code is x,y\"z.\r\n"));
        assert!(
            msgs[1].contains("To: \"odd user\"@x.test\r\n"),
            "{}",
            msgs[1]
        );
        assert!(msgs[1].contains("your code is   spaced  .\r\n"));
    }

    #[test]
    fn a_line_break_in_a_value_is_refused_at_its_key_and_later_rows_keep_their_pointers() {
        let r = json!([
            {"email": "a@x.test", "name": "two\nlines", "code": "A"},
            {"email": "b@x.test", "name": "Bob", "code": "B"},
            {"email": "bad", "name": "Cy", "code": "C"},
        ]);
        let p = problems("line-break", &body(r));
        assert_eq!(
            pointers(&p),
            ["/recipients/0/name", "/recipients/2/email"],
            "{p:?}"
        );
    }

    #[test]
    fn a_merged_line_too_long_names_the_template_line_not_the_file() {
        let r = json!([{"email": "a@x.test", "name": "n".repeat(1000), "code": "A"}]);
        let p = problems("long", &body(r));
        assert_eq!(pointers(&p), ["/recipients/0"], "{p:?}");
        assert!(
            p[0].why.starts_with("line 3 of the template would be"),
            "{p:?}"
        );
    }

    #[test]
    fn keys_given_twice_are_refused_where_they_are() {
        let text =
            br#"{"id": "c1", "id": "c2", "sender": "b@news.test", "from_domain": "news.test",
            "template": "From: n@news.test\n\nHi\n",
            "recipients": [{"email": "a@x.test", "email": "b@x.test"}, {"email": "c@x.test"}]}"#;
        let d = Dir::new("twice");
        let p = stage(text, &d.0).err().unwrap();
        assert_eq!(pointers(&p), ["/id", "/recipients/0/email"], "{p:?}");
        let r = json!([{"email": "a@x.test", "name": "A", "code": "A", "Email": "b@x.test"}]);
        let p = problems("twice-column", &body(r));
        assert_eq!(pointers(&p), ["/recipients/0/Email"], "{p:?}");
    }

    #[test]
    fn a_long_merged_line_is_a_warning_that_names_the_template_line_and_recipient() {
        let r = json!([
            {"email": "a@x.test", "name": "A", "code": "A"},
            {"email": "b@x.test", "name": "B", "code": "c".repeat(950)},
        ]);
        let (_d, staged) = stage_json("warning", &body(r));
        let s = staged.unwrap_or_else(|p| panic!("{p:?}"));
        let long: Vec<&ApiProblem> = s
            .warnings
            .iter()
            .filter(|w| w.why.contains("over 900"))
            .collect();
        assert_eq!(long.len(), 1, "{:?}", s.warnings);
        assert_eq!(long[0].pointer, "/template");
        assert!(
            long[0].why.starts_with("line 5 of the template: 1 row(s)")
                && long[0].why.contains("(first /recipients/1)"),
            "{long:?}"
        );
    }

    #[test]
    fn settings_values_are_written_as_toml_one_line_each() {
        let mut line = String::new();
        let v = json!({"a b": [1, 2.5, "x\ny\u{7f}\"", true, {"k": []}], "c": {}});
        toml_inline(&v, &mut line).unwrap();
        assert!(!line.contains('\n'));
        let back: toml::Table = toml::from_str(&format!("v = {line}")).unwrap();
        let back = serde_json::to_value(&back["v"]).unwrap();
        assert_eq!(back, v);
        let mut key = String::new();
        toml_key("odd\nkey", &mut key);
        assert_eq!(key, "\"odd\\nkey\"");
    }

    #[test]
    fn twenty_thousand_recipients_stage_and_count() {
        let r: Vec<Value> = (0..20_000)
            .map(|i| json!({"email": format!("u{i}@x.test"), "name": format!("N{i}"), "code": i}))
            .collect();
        let (_d, staged) = stage_json("many", &body(Value::Array(r)));
        let s = staged.unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(s.recipients, 20_000);
    }
}
