//! `volley track ADDRESS` and `GET /api/v1/track`: where one recipient is. The live
//! part comes from the running shards over the admin socket (`track ADDRESS
//! [CAMPAIGN]`, control.rs), or, when no process runs the spool, from the spool read
//! directly (spool/peek.rs); the history comes from the accounting log, every
//! generation, through its index (observe/track.rs).

use crate::deliver::control::{self, TrackAnswer};
use crate::observe::log::Kind;
use crate::observe::logged::Logged;
use crate::spool::peek::Queued;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything known about one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracked {
    /// The address asked about (as given).
    pub rcpt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// Its state per campaign, from the spool first, else its last final record.
    pub status: Vec<Status>,
    /// Where the live part came from: `daemon` (the admin socket), `spool` (read
    /// directly: no process runs it; `spool: there is none at PATH`), or
    /// `unknown: WHY`.
    pub live: String,
    /// What the spool holds of it.
    pub queued: Vec<Queued>,
    /// Its accounting records, oldest first.
    pub events: Vec<Logged>,
}

/// One campaign's state of the recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub campaign: String,
    /// `queued`, `delivered`, `bounced`, `expired`, or `deferred` (the log's last
    /// record is a deferral and the spool was not read).
    pub state: String,
    /// One sentence: where it waits, or what ended it.
    pub detail: String,
}

impl Tracked {
    /// Whether anything at all is known.
    pub fn found(&self) -> bool {
        !self.status.is_empty()
    }
}

/// Why tracking failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("`{0}` is not an address (local@domain); give one recipient")]
    NotAnAddress(String),
    #[error(transparent)]
    Log(#[from] crate::observe::track::TrackError),
}

/// Where `rcpt` (any case) is, in `campaign` when given: the spool at `spool`
/// (through its running process, or read directly) and the log at `log`. A log that
/// does not exist yet is no error (nothing was logged). Errors: not an address;
/// the log cannot be read.
pub fn track(
    spool: &Path,
    log: &Path,
    rcpt: &str,
    campaign: Option<&str>,
) -> Result<Tracked, TrackError> {
    let bad = || TrackError::NotAnAddress(rcpt.to_string());
    if !is_trackable(rcpt)
        || campaign.is_some_and(|c| control::check_word("the campaign", c).is_err())
    {
        return Err(bad());
    }
    let (live, queued) = live(spool, rcpt, campaign);
    let events = match crate::observe::track::lookup(log, rcpt, campaign) {
        Ok(f) => f.events,
        Err(crate::observe::track::TrackError::NoLog(_)) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    Ok(Tracked {
        rcpt: rcpt.to_string(),
        campaign: campaign.map(str::to_string),
        status: status(&queued, &events),
        live,
        queued,
        events,
    })
}

/// Whether `rcpt` is looked up: LOCAL@DOMAIN, not `<...>` (a Message-ID's form),
/// nothing unprintable. A quoted local part may hold a space (`"a b"@example.com`,
/// RFC 5321 §4.1.2): the log is searched for it as it is; only the admin socket's
/// line needs one word, so the spool is then read directly (`live`).
fn is_trackable(rcpt: &str) -> bool {
    rcpt.rsplit_once('@')
        .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
        && !rcpt.starts_with('<')
        && !rcpt.chars().any(control::is_unprintable)
}

/// The spool's part: asked of the running process, else read directly.
fn live(spool: &Path, rcpt: &str, campaign: Option<&str>) -> (String, Vec<Queued>) {
    let line = match campaign {
        Some(c) => format!("track {rcpt} {c}"),
        None => format!("track {rcpt}"),
    };
    let patience = control::TRACK_ANSWER_WAIT + std::time::Duration::from_secs(5);
    if !spool.is_dir() {
        return (
            format!("spool: there is none at {}", spool.display()),
            Vec::new(),
        );
    }
    let one_word = control::check_word("the address", rcpt).is_ok();
    let asked = match one_word && control::socket_path(spool).exists() {
        true => Some(control::request_waiting(spool, &line, patience)),
        false => None,
    };
    match asked {
        Some(Ok(answer)) => {
            let parsed = answer
                .strip_prefix("ok: ")
                .and_then(|j| serde_json::from_str::<TrackAnswer>(j).ok());
            match parsed {
                Some(a) if a.answered == a.shards => ("daemon".into(), a.queued),
                Some(a) => (
                    format!(
                        "daemon ({} of {} shards answered within {} s; the others' recipients are not listed)",
                        a.answered,
                        a.shards,
                        control::TRACK_ANSWER_WAIT.as_secs()
                    ),
                    a.queued,
                ),
                None => (format!("unknown: the admin socket answered {answer:?}"), Vec::new()),
            }
        }
        // No socket, or one left by a process that is gone: the spool itself.
        asked => match crate::spool::peek::find_unlocked(spool, rcpt, campaign) {
            Ok(Some(q)) => ("spool".into(), q),
            Ok(None) => (
                format!(
                    "unknown: a process holds the spool {} but its admin socket did not answer{}",
                    spool.display(),
                    match asked {
                        Some(Err(e)) => format!(" ({e:#})"),
                        _ => String::new(),
                    }
                ),
                Vec::new(),
            ),
            Err(e) => (
                format!("unknown: spool {}: {e:#}", spool.display()),
                Vec::new(),
            ),
        },
    }
}

/// Each campaign's state: queued when the spool holds it, else its last final
/// record, else (only deferrals logged) deferred.
fn status(queued: &[Queued], events: &[Logged]) -> Vec<Status> {
    let mut campaigns: Vec<&str> = queued
        .iter()
        .map(|q| q.campaign.as_str())
        .chain(events.iter().map(|e| e.campaign.as_str()))
        .collect();
    campaigns.sort_unstable();
    campaigns.dedup();
    campaigns
        .into_iter()
        .map(|c| {
            if let Some(q) = queued.iter().find(|q| q.campaign == c) {
                return Status {
                    campaign: c.into(),
                    state: "queued".into(),
                    detail: queued_detail(q),
                };
            }
            let mine: Vec<&Logged> = events.iter().filter(|e| e.campaign == c).collect();
            let last = mine
                .iter()
                .rev()
                .find(|e| e.kind != Kind::TransientFailure)
                .or(mine.last())
                .expect("a campaign listed has a record");
            let state = match last.kind {
                Kind::Delivery => "delivered",
                Kind::Bounce => "bounced",
                Kind::Expiration => "expired",
                Kind::TransientFailure => "deferred",
                Kind::Reception => "received",
            };
            Status {
                campaign: c.into(),
                state: state.into(),
                detail: event_detail(state, last),
            }
        })
        .collect()
}

fn queued_detail(q: &Queued) -> String {
    let mut s = match q.state.as_str() {
        "waiting" | "spooled" if q.retry_at.is_some() => format!(
            "queued in shard {}, waiting for retry until {}",
            q.shard,
            q.retry_at.as_deref().unwrap_or_default()
        ),
        "ready" => format!("queued in shard {}, ready to send", q.shard),
        "paused" => format!("queued in shard {}, held by a pause", q.shard),
        "resolving" => format!("queued in shard {}, waiting for its MX lookup", q.shard),
        "in_flight" => format!("in a transaction now on shard {}", q.shard),
        _ => format!("queued in shard {}, not yet attempted", q.shard),
    };
    if let (Some(n), Some(l)) = (q.attempts.filter(|n| *n > 0), &q.last) {
        s.push_str(&format!(
            " after attempt {n} with reply {} {}{}",
            l.code,
            l.enhanced
                .as_deref()
                .map_or(String::new(), |e| format!("{e} ")),
            l.reply
        ));
    }
    s
}

fn event_detail(state: &str, e: &Logged) -> String {
    let mut s = format!(
        "{state} at {} (attempt {}): {} {}{}",
        e.time,
        e.attempt,
        e.code,
        e.enhanced
            .as_deref()
            .map_or(String::new(), |x| format!("{x} ")),
        e.reply
    );
    if let Some(c) = &e.class {
        s.push_str(&format!("; class {c}"));
    }
    match (&e.mx, &e.ip) {
        (Some(mx), Some(ip)) => s.push_str(&format!("; mx {mx} [{ip}]")),
        (Some(mx), None) => s.push_str(&format!("; mx {mx}")),
        _ => s.push_str(&format!("; stage {}", e.stage)),
    }
    s
}

impl Tracked {
    /// The human answer: the state per campaign first, then every record, oldest
    /// first, one line each.
    pub fn text(&self) -> String {
        let mut out = format!("{} (queue read from: {})\n", self.rcpt, self.live);
        for s in &self.status {
            out.push_str(&format!("  campaign {}: {}\n", s.campaign, s.detail));
        }
        if !self.events.is_empty() {
            out.push_str("records, oldest first:\n");
        }
        for e in &self.events {
            let via = match (&e.mx, &e.ip) {
                (Some(mx), Some(ip)) => format!("{mx} [{ip}]"),
                _ => format!("({})", e.stage),
            };
            out.push_str(&format!(
                "  {}  {:<16} {} {:<7} attempt {:<3} {via}  {}: {}\n",
                e.time,
                kind_name(e.kind),
                e.code,
                e.enhanced.as_deref().unwrap_or("-"),
                e.attempt,
                e.campaign,
                e.reply
            ));
        }
        crate::observe::log::escape_controls(&out).into_owned()
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Reception => "Reception",
        Kind::Delivery => "Delivery",
        Kind::TransientFailure => "TransientFailure",
        Kind::Bounce => "Bounce",
        Kind::Expiration => "Expiration",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_that_were_sent_to_are_trackable_and_nothing_else() {
        for a in [
            "ann@gmail.com",
            "Ann@Gmail.COM",
            "\"tempfail x\"@gmail.com",
            "jörg@bücher.de",
        ] {
            assert!(is_trackable(a), "{a}");
        }
        for a in [
            "<ann@gmail.com>",
            "ann",
            "@gmail.com",
            "ann@",
            "ann@gmail.com\u{200f}",
            "a\nb@c.d",
        ] {
            assert!(!is_trackable(a), "{a:?}");
        }
    }
}
