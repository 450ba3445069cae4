//! A record of the accounting log as read back: the owned twin of
//! [`crate::observe::log::Record`] (same field names, so a line the writer made
//! always parses), for readers that need typed fields (`volley log csv`,
//! `volley track`). Shaping records and foreign lines do not parse as one.

use crate::observe::log::Kind;
use serde::{Deserialize, Serialize};

/// One recipient event as logged (see [`crate::observe::log::Record`] for each
/// field's meaning). Fields the writer may leave out default to empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logged {
    #[serde(rename = "type")]
    pub kind: Kind,
    /// RFC 3339 UTC, milliseconds.
    pub time: String,
    pub campaign: String,
    pub rcpt: String,
    #[serde(default)]
    pub sender: String,
    #[serde(default)]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx: Option<String>,
    /// The MX's address:port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default)]
    pub reply: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    #[serde(default)]
    pub stage: String,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub queued_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_ms: Option<u64>,
    #[serde(default)]
    pub shard: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<String>,
}

impl Logged {
    /// The record on `line`, or None for a line that is not a recipient event (a
    /// Shaping record, a foreign or cut-off line).
    pub fn parse(line: &str) -> Option<Logged> {
        serde_json::from_str(line).ok()
    }

    /// The record's time, None when it is not RFC 3339.
    pub fn at(&self) -> Option<std::time::SystemTime> {
        humantime::parse_rfc3339(&self.time).ok()
    }

    /// The MX's address without its port (`192.0.2.1:25` → `192.0.2.1`,
    /// `[2001:db8::1]:25` → `2001:db8::1`).
    pub fn mx_addr(&self) -> Option<String> {
        let ip = self.ip.as_deref()?;
        Some(match ip.parse::<std::net::SocketAddr>() {
            Ok(a) => a.ip().to_string(),
            Err(_) => ip.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::log::Record;

    #[test]
    fn a_written_record_reads_back_and_shaping_does_not() {
        let r = Record {
            kind: Kind::Bounce,
            time: "2026-11-30T22:10:07.123Z".into(),
            campaign: "spring",
            rcpt: "Ann@Example.com",
            sender: "b@news.test",
            domain: "example.com",
            mx: Some("mx.example.com"),
            ip: Some("[2001:db8::1]:25".into()),
            code: 550,
            enhanced: Some("5.1.1"),
            class: Some("invalid_recipient"),
            reply: "no \"such\" user",
            tls: None,
            stage: "rcpt",
            attempt: 2,
            queued_ms: 1500,
            tx_ms: Some(3),
            shard: 1,
            last_attempt: None,
        };
        let l = Logged::parse(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(l.kind, Kind::Bounce);
        assert_eq!(l.reply, "no \"such\" user");
        assert_eq!(l.mx_addr().as_deref(), Some("2001:db8::1"));
        assert_eq!(l.attempt, 2);
        let shaping =
            r#"{"type":"Shaping","time":"x","event":"throttled","key":"k","reason":"r","shard":0}"#;
        assert!(Logged::parse(shaping).is_none());
    }
}
