//! The accounting log: one JSON line per event, in the record types KumoMTA
//! operators know (Reception, Delivery, TransientFailure, Bounce, Expiration), plus
//! Shaping records for changes to a destination's limits.
//!
//! Every shard appends to the same file opened with O_APPEND, one write per batch
//! of whole lines, so lines never interleave. A shard writes its batch before it
//! appends the matching Done records to its spool: after a crash the log may hold
//! an outcome twice (the recipient is sent again), never miss one.

use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    Reception,
    Delivery,
    TransientFailure,
    Bounce,
    Expiration,
}

#[derive(Debug, Serialize)]
pub struct Record<'a> {
    #[serde(rename = "type")]
    pub kind: Kind,
    /// RFC 3339 UTC, milliseconds.
    pub time: String,
    pub campaign: &'a str,
    pub rcpt: &'a str,
    pub sender: &'a str,
    pub domain: &'a str,
    /// MX host name and address:port the reply came from, when a connection was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mx: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    pub code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<&'a str>,
    /// The reply's class (classify/rules.toml) for anything but a delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
    pub reply: &'a str,
    /// TLS version and cipher suite, when the session used STARTTLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<&'a str>,
    /// Where the reply came from: connect, mail, rcpt, data, local, dns.
    pub stage: &'static str,
    pub attempt: u32,
    /// From queueing to this event.
    pub queued_ms: u64,
    /// The SMTP transaction, from submitting it to its final reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_ms: Option<u64>,
    pub shard: usize,
    /// An Expiration's last real attempt (RFC 3339), whose reply, class and stage the
    /// record carries; absent when no attempt was ever made (then 451 4.4.7, local).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<String>,
}

/// A shaping change (back-off, recovery, suspension, operator control) for one key
/// on one shard: `{"type": "Shaping", "event": "throttled", "key": "provider:google", ...}`.
#[derive(Debug, Serialize)]
pub struct ShapingRecord<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    /// throttled, ramped, recovered, suspended, resumed, paused, unpaused, rate.
    pub event: &'static str,
    pub key: &'a str,
    /// This shard's message rate after the change (absent: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<f64>,
    /// This shard's connection cap after the change (absent: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    pub reason: &'a str,
    pub shard: usize,
}

pub struct LogWriter {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
}

impl LogWriter {
    pub fn open(path: &Path) -> std::io::Result<LogWriter> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(LogWriter {
            path: path.to_path_buf(),
            file,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    pub fn push(&mut self, r: &impl Serialize) {
        serde_json::to_writer(&mut self.buf, r).expect("serialising to memory does not fail");
        self.buf.push(b'\n');
    }

    /// Writes the batch in one call.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self.file.write_all(&self.buf);
        self.buf.clear();
        r.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("accounting log {}: {e}", self.path.display()),
            )
        })
    }
}

pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// `t` as RFC 3339 UTC with milliseconds, the log's time format.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
