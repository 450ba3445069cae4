//! `volley log csv`: the accounting log as PowerMTA accounting CSV (its field names,
//! record types and value formats, PowerMTA User's Guide §"Accounting records"), so
//! tools written for PowerMTA's `acct-*.csv` read volley's records.
//!
//! Record types: Delivery → `d`, Bounce → `b`, Expiration → `b` with bounceCat
//! `message-expired` (PowerMTA logs an expired recipient as a bounce),
//! TransientFailure → `t`, Reception → `r`. Shaping records have no PowerMTA
//! counterpart and are left out. Fields volley does not log are written empty, so
//! the columns stay PowerMTA's default set; README "Accounting log" lists each.

use crate::observe::log::Kind;
use crate::observe::logged::Logged;
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Why the CSV could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    /// The log (a generation of it) could not be read; the message names the file.
    #[error("accounting log {path}: {source}")]
    Log {
        path: String,
        source: std::io::Error,
    },
    /// No log file and no rotated generation of it.
    #[error(
        "accounting log {0}: no such file, nor rotated generations of it; give the log with --log"
    )]
    NoLog(String),
    /// The output could not be written.
    #[error("writing the CSV: {0}")]
    Write(#[from] csv::Error),
}

/// One CSV row, in PowerMTA's default column order for d, b and t records.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Row {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(rename = "timeLogged")]
    pub time_logged: String,
    #[serde(rename = "timeQueued")]
    pub time_queued: String,
    pub orig: String,
    pub rcpt: String,
    pub orcpt: String,
    #[serde(rename = "dsnAction")]
    pub dsn_action: &'static str,
    #[serde(rename = "dsnStatus")]
    pub dsn_status: String,
    #[serde(rename = "dsnDiag")]
    pub dsn_diag: String,
    #[serde(rename = "dsnMta")]
    pub dsn_mta: String,
    #[serde(rename = "bounceCat")]
    pub bounce_cat: &'static str,
    #[serde(rename = "srcType")]
    pub src_type: String,
    #[serde(rename = "srcMta")]
    pub src_mta: String,
    #[serde(rename = "dlvType")]
    pub dlv_type: &'static str,
    #[serde(rename = "dlvSourceIp")]
    pub dlv_source_ip: String,
    #[serde(rename = "dlvDestinationIp")]
    pub dlv_destination_ip: String,
    #[serde(rename = "dlvEsmtpAvailable")]
    pub dlv_esmtp_available: String,
    #[serde(rename = "dlvSize")]
    pub dlv_size: String,
    pub vmta: String,
    #[serde(rename = "jobId")]
    pub job_id: String,
    #[serde(rename = "envId")]
    pub env_id: String,
    pub queue: String,
    #[serde(rename = "vmtaPool")]
    pub vmta_pool: String,
}

/// The records to write: logged at or after `since`, before `until` (None: no
/// bound). A record whose time does not parse is left out when a bound is set.
#[derive(Debug, Default, Clone, Copy)]
pub struct Window {
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
}

impl Window {
    fn holds(&self, l: &Logged) -> bool {
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Some(t) = l.at() else { return false };
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t < u)
    }
}

/// What [`write`] wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Data rows (the header not counted).
    pub rows: u64,
    /// Lines that are neither a recipient event nor a Shaping record (foreign, or
    /// cut off by a crash mid-write): skipped.
    pub unreadable: u64,
}

/// Writes every recipient record of `log` (all generations, oldest first; see
/// rotation.rs) inside `window` to `out` as CSV with a header row, CRLF line ends
/// (RFC 4180, as PowerMTA writes them).
pub fn write(log: &Path, window: Window, out: impl Write) -> Result<Written, CsvError> {
    let at = || log.display().to_string();
    let lines = crate::observe::rotation::lines(log)
        .map_err(|source| CsvError::Log { path: at(), source })?;
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        // Written below, once, even with no row.
        .has_headers(false)
        .from_writer(out);
    let mut n = Written::default();
    let mut any = false;
    // The header is written even when no record matches: an empty export still says
    // what its columns are.
    w.write_record(field_names())?;
    for line in lines {
        let line = line.map_err(|source| CsvError::Log { path: at(), source })?;
        any = true;
        match Logged::parse(&line) {
            Some(l) if window.holds(&l) => {
                w.serialize(row(&l))?;
                n.rows += 1;
            }
            Some(_) => {}
            None if is_shaping(&line) => {}
            None => n.unreadable += 1,
        }
    }
    if !any && !log.exists() {
        return Err(CsvError::NoLog(at()));
    }
    w.flush().map_err(csv::Error::from)?;
    Ok(n)
}

/// The column names, in order.
pub fn field_names() -> [&'static str; 23] {
    [
        "type",
        "timeLogged",
        "timeQueued",
        "orig",
        "rcpt",
        "orcpt",
        "dsnAction",
        "dsnStatus",
        "dsnDiag",
        "dsnMta",
        "bounceCat",
        "srcType",
        "srcMta",
        "dlvType",
        "dlvSourceIp",
        "dlvDestinationIp",
        "dlvEsmtpAvailable",
        "dlvSize",
        "vmta",
        "jobId",
        "envId",
        "queue",
        "vmtaPool",
    ]
}

fn is_shaping(line: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
    }
    serde_json::from_str::<Typed>(line).is_ok_and(|t| t.kind == "Shaping")
}

/// The PowerMTA row of one record.
pub fn row(l: &Logged) -> Row {
    let logged = l.at();
    let queued = logged.and_then(|t| t.checked_sub(Duration::from_millis(l.queued_ms)));
    let status = l
        .enhanced
        .clone()
        .unwrap_or_else(|| format!("{}.0.0", (l.code / 100).clamp(2, 5)));
    let connected = l.mx.is_some();
    Row {
        kind: match l.kind {
            Kind::Delivery => "d",
            Kind::Bounce | Kind::Expiration => "b",
            Kind::TransientFailure => "t",
            Kind::Reception => "r",
        },
        time_logged: logged.map_or_else(|| l.time.clone(), pmta_time),
        time_queued: queued.map(pmta_time).unwrap_or_default(),
        orig: l.sender.clone(),
        rcpt: l.rcpt.clone(),
        dsn_action: match l.kind {
            Kind::Delivery => "relayed",
            Kind::Bounce | Kind::Expiration => "failed",
            Kind::TransientFailure => "delayed",
            Kind::Reception => "",
        },
        dsn_status: match status_text(&status) {
            Some(t) => format!("{status} ({t})"),
            None => status,
        },
        dsn_diag: crate::observe::log::escape_controls(&match &l.enhanced {
            Some(e) => format!("smtp;{} {e} {}", l.code, l.reply),
            None => format!("smtp;{} {}", l.code, l.reply),
        })
        .replace('\n', " "),
        dsn_mta: match (&l.mx, l.mx_addr()) {
            (Some(mx), Some(ip)) => format!("{mx} ({ip})"),
            (Some(mx), None) => mx.clone(),
            _ => String::new(),
        },
        bounce_cat: bounce_category(l),
        dlv_type: if connected { "smtp" } else { "" },
        dlv_destination_ip: l.mx_addr().unwrap_or_default(),
        job_id: l.campaign.clone(),
        queue: l.domain.clone(),
        ..Row::default()
    }
}

/// PowerMTA's time format, `2026-11-30 22:10:07+0000` (seconds, with the zone's
/// offset; volley's are UTC).
pub fn pmta_time(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    format!("{}+0000", s.trim_end_matches('Z').replacen('T', " ", 1))
}

/// PowerMTA's bounce category for a failure, from volley's class (and the stage,
/// where the class alone does not say it); empty for a delivery.
fn bounce_category(l: &Logged) -> &'static str {
    match l.kind {
        Kind::Delivery | Kind::Reception => return "",
        Kind::Expiration => return "message-expired",
        _ => {}
    }
    match (l.class.as_deref(), l.stage.as_str()) {
        (Some("invalid_recipient"), _) => "bad-mailbox",
        (Some("mailbox_full"), _) => "quota-issues",
        (Some("mailbox_disabled"), _) => "inactive-mailbox",
        (Some("blocked"), _) => "spam-related",
        (Some("content"), _) => "content-related",
        (Some("policy" | "auth_failed" | "throttled"), _) => "policy-related",
        (_, "dns") => "bad-domain",
        (_, "connect") => "no-answer-from-host",
        _ => "other",
    }
}

/// RFC 3463's name of an enhanced status code's subject and detail, lowercase, as
/// PowerMTA writes it after the code in dsnStatus (`5.1.1 (bad destination mailbox
/// address)`); None for a code RFC 3463 does not name.
fn status_text(status: &str) -> Option<&'static str> {
    let mut parts = status.splitn(3, '.');
    let class = parts.next()?;
    let rest = (parts.next()?, parts.next()?);
    if class == "2" && rest == ("0", "0") {
        return Some("success");
    }
    Some(match rest {
        ("0", "0") => "undefined status",
        ("1", "0") => "other address status",
        ("1", "1") => "bad destination mailbox address",
        ("1", "2") => "bad destination system address",
        ("1", "3") => "bad destination mailbox address syntax",
        ("1", "4") => "destination mailbox address ambiguous",
        ("1", "5") => "destination address valid",
        ("1", "6") => "destination mailbox has moved, no forwarding address",
        ("1", "7") => "bad sender's mailbox address syntax",
        ("1", "8") => "bad sender's system address",
        ("2", "0") => "other or undefined mailbox status",
        ("2", "1") => "mailbox disabled, not accepting messages",
        ("2", "2") => "mailbox full",
        ("2", "3") => "message length exceeds administrative limit",
        ("2", "4") => "mailing list expansion problem",
        ("3", "0") => "other or undefined mail system status",
        ("3", "1") => "mail system full",
        ("3", "2") => "system not accepting network messages",
        ("3", "3") => "system not capable of selected features",
        ("3", "4") => "message too big for system",
        ("3", "5") => "system incorrectly configured",
        ("4", "0") => "other or undefined network or routing status",
        ("4", "1") => "no answer from host",
        ("4", "2") => "bad connection",
        ("4", "3") => "directory server failure",
        ("4", "4") => "unable to route",
        ("4", "5") => "mail system congestion",
        ("4", "6") => "routing loop detected",
        ("4", "7") => "delivery time expired",
        ("5", "0") => "other or undefined protocol status",
        ("5", "1") => "invalid command",
        ("5", "2") => "syntax error",
        ("5", "3") => "too many recipients",
        ("5", "4") => "invalid command arguments",
        ("5", "5") => "wrong protocol version",
        ("6", "0") => "other or undefined media error",
        ("6", "1") => "media not supported",
        ("6", "2") => "conversion required and prohibited",
        ("6", "3") => "conversion required but not supported",
        ("6", "4") => "conversion with loss performed",
        ("6", "5") => "conversion failed",
        ("7", "0") => "other or undefined security status",
        ("7", "1") => "delivery not authorized, message refused",
        ("7", "2") => "mailing list expansion prohibited",
        ("7", "3") => "security conversion required but not possible",
        ("7", "4") => "security features not supported",
        ("7", "5") => "cryptographic failure",
        ("7", "6") => "cryptographic algorithm not supported",
        ("7", "7") => "message integrity failure",
        _ => return None,
    })
}

/// A time bound as `--since`/`--until` take it: RFC 3339 (`2026-11-30T22:00:00Z`),
/// the same with a space and no zone (UTC), or a date (`2026-11-30`, its midnight
/// UTC). Errors: anything else, saying which forms are taken.
pub fn parse_bound(s: &str) -> Result<SystemTime, String> {
    let t = s.trim();
    let full = if t.len() == 10 {
        format!("{t} 00:00:00")
    } else {
        t.to_string()
    };
    humantime::parse_rfc3339_weak(&full).map_err(|e| {
        format!("{s:?} is not a time ({e}); give 2026-11-30, 2026-11-30 22:00:00 (UTC) or 2026-11-30T22:00:00Z")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(kind: Kind) -> Logged {
        Logged {
            kind,
            time: "2026-11-30T22:10:07.123Z".into(),
            campaign: "spring".into(),
            rcpt: "ann@example.com".into(),
            sender: "b@news.test".into(),
            domain: "example.com".into(),
            mx: Some("mx.example.com".into()),
            ip: Some("192.0.2.1:25".into()),
            code: 550,
            enhanced: Some("5.1.1".into()),
            class: Some("invalid_recipient".into()),
            reply: "User unknown".into(),
            tls: None,
            stage: "rcpt".into(),
            attempt: 1,
            queued_ms: 2000,
            tx_ms: Some(3),
            shard: 0,
            last_attempt: None,
        }
    }

    #[test]
    fn a_bounce_maps_to_powermtas_fields() {
        let r = row(&logged(Kind::Bounce));
        assert_eq!(r.kind, "b");
        assert_eq!(r.time_logged, "2026-11-30 22:10:07+0000");
        assert_eq!(r.time_queued, "2026-11-30 22:10:05+0000");
        assert_eq!(r.dsn_action, "failed");
        assert_eq!(r.dsn_status, "5.1.1 (bad destination mailbox address)");
        assert_eq!(r.dsn_diag, "smtp;550 5.1.1 User unknown");
        assert_eq!(r.dsn_mta, "mx.example.com (192.0.2.1)");
        assert_eq!(r.bounce_cat, "bad-mailbox");
        assert_eq!(
            (r.dlv_type, r.dlv_destination_ip.as_str()),
            ("smtp", "192.0.2.1")
        );
        assert_eq!(
            (r.job_id.as_str(), r.queue.as_str()),
            ("spring", "example.com")
        );
    }

    #[test]
    fn expiry_transient_and_local_records() {
        let mut e = logged(Kind::Expiration);
        e.class = Some("mailbox_full".into());
        let r = row(&e);
        assert_eq!(
            (r.kind, r.dsn_action, r.bounce_cat),
            ("b", "failed", "message-expired")
        );
        let mut t = logged(Kind::TransientFailure);
        (t.code, t.enhanced, t.class) = (451, None, Some("transient_other".into()));
        let r = row(&t);
        assert_eq!(
            (r.kind, r.dsn_action, r.bounce_cat),
            ("t", "delayed", "other")
        );
        assert_eq!(r.dsn_status, "4.0.0 (undefined status)");
        assert_eq!(r.dsn_diag, "smtp;451 User unknown");
        let mut local = logged(Kind::Bounce);
        (local.mx, local.ip, local.class, local.stage) =
            (None, None, Some("permanent_other".into()), "dns".into());
        let r = row(&local);
        assert_eq!(
            (r.dsn_mta.as_str(), r.dlv_type, r.bounce_cat),
            ("", "", "bad-domain")
        );
        let d = row(&logged(Kind::Delivery));
        assert_eq!((d.kind, d.dsn_action, d.bounce_cat), ("d", "relayed", ""));
    }

    #[test]
    fn bounds_take_dates_and_times() {
        let day = parse_bound("2026-11-30").unwrap();
        assert_eq!(pmta_time(day), "2026-11-30 00:00:00+0000");
        assert_eq!(
            parse_bound("2026-11-30T22:00:00Z").unwrap(),
            parse_bound("2026-11-30 22:00:00").unwrap()
        );
        assert!(parse_bound("yesterday").unwrap_err().contains("2026-11-30"));
    }
}
