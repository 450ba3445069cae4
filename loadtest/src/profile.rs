//! Receiver profiles: which simulated providers the sink plays, where they listen,
//! which domains the test DNS routes to them, and how each behaves.
//!
//! A profile is TOML. Two ship embedded: `accept-all` (the throughput reference) and
//! `realistic` (latency, the providers' real failure texts, throttling). Any other
//! name is read as a file path.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;

pub const ACCEPT_ALL: &str = include_str!("../profiles/accept-all.toml");
pub const REALISTIC: &str = include_str!("../profiles/realistic.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(default)]
    pub sink: SinkSettings,
    #[serde(rename = "provider")]
    pub providers: Vec<Provider>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkSettings {
    /// Name in the greeting and EHLO reply, and the subject of the generated certificate.
    pub hostname: String,
    /// Largest message accepted (advertised in SIZE), octets.
    pub size_max: usize,
    /// Offer STARTTLS (certificate generated at start unless files are given).
    pub starttls: bool,
    /// A client that says nothing for this long is disconnected.
    pub timeout_s_idle: u64,
}

impl Default for SinkSettings {
    fn default() -> Self {
        SinkSettings {
            hostname: "sink.volley.test".into(),
            size_max: 50 * 1024 * 1024,
            starttls: true,
            timeout_s_idle: 300,
        }
    }
}

/// A simulated mailbox provider: its addresses, its domains and its temper.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    /// Addresses the sink listens on for this provider (loopback only).
    pub listen: Vec<SocketAddr>,
    /// Domains whose MX points at this provider.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Every domain ending in one of these (e.g. "tail.test") also routes here.
    #[serde(default)]
    pub domain_suffixes: Vec<String>,
    /// MX host name the test DNS hands out for this provider's domains.
    pub mx_host: String,
    #[serde(default)]
    pub behaviour: Behaviour,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Behaviour {
    pub latency_ms: Latency,
    /// Probability that a RCPT gets a temporary / permanent failure.
    pub rcpt_tempfail: f64,
    pub rcpt_permfail: f64,
    /// Probability that a finished message gets a temporary / permanent failure.
    pub data_tempfail: f64,
    pub data_permfail: f64,
    pub rcpt_tempfail_replies: Vec<String>,
    pub rcpt_permfail_replies: Vec<String>,
    pub data_tempfail_replies: Vec<String>,
    pub data_permfail_replies: Vec<String>,
    /// Probability that the connection is dropped once message content starts.
    pub disconnect_in_data: f64,
    /// Concurrent connections per client IP; the excess gets `conn_cap_reply` at greeting. 0 = none.
    pub max_conns_per_ip: u32,
    pub conn_cap_reply: String,
    /// Messages per second per client IP above which MAIL gets `rate_reply` and the
    /// connection is closed. 0 = no limit.
    pub rate_per_s_per_ip: f64,
    pub rate_reply: String,
    /// Greylisting: the first attempt of each (client IP, sender, recipient) is refused
    /// with 451 until this many seconds have passed. 0 = off.
    pub greylist_s: u64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            latency_ms: Latency::default(),
            rcpt_tempfail: 0.0,
            rcpt_permfail: 0.0,
            data_tempfail: 0.0,
            data_permfail: 0.0,
            rcpt_tempfail_replies: vec!["450 4.2.1 Mailbox temporarily unavailable".into()],
            rcpt_permfail_replies: vec!["550 5.1.1 User unknown".into()],
            data_tempfail_replies: vec!["451 4.3.0 Temporary local problem, try again later".into()],
            data_permfail_replies: vec!["554 5.7.1 Message rejected for policy reasons".into()],
            disconnect_in_data: 0.0,
            max_conns_per_ip: 0,
            conn_cap_reply: "421 4.7.0 Too many concurrent connections from your IP".into(),
            rate_per_s_per_ip: 0.0,
            rate_reply: "421 4.7.0 Rate limit exceeded, try again later".into(),
            greylist_s: 0,
        }
    }
}

/// A part of a profile that can be switched off (`--without`), to see what it costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Every reply latency (the greeting's too).
    Latency,
    /// Every failure, throttle, connection cap and greylisting; latency stays.
    Failures,
}

impl Profile {
    pub fn without(&mut self, part: Part) {
        for p in &mut self.providers {
            let b = &mut p.behaviour;
            *b = match part {
                Part::Latency => Behaviour {
                    latency_ms: Latency::default(),
                    ..b.clone()
                },
                Part::Failures => Behaviour {
                    latency_ms: b.latency_ms,
                    ..Behaviour::default()
                },
            };
        }
    }
}

/// Reply latency per command: uniform between the two bounds, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Latency {
    pub greeting: [u64; 2],
    pub ehlo: [u64; 2],
    pub mail: [u64; 2],
    pub rcpt: [u64; 2],
    pub data: [u64; 2],
    pub data_end: [u64; 2],
}

impl Profile {
    /// `accept-all`, `realistic`, or a path to a TOML file.
    pub fn load(name: &str) -> anyhow::Result<Profile> {
        let (text, origin) = match name {
            "accept-all" => (
                ACCEPT_ALL.to_string(),
                "built-in profile accept-all".to_string(),
            ),
            "realistic" => (
                REALISTIC.to_string(),
                "built-in profile realistic".to_string(),
            ),
            path => {
                let text = std::fs::read_to_string(Path::new(path)).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read profile {path}: {e} (use accept-all, realistic, or a TOML file path)"
                    )
                })?;
                (text, path.to_string())
            }
        };
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))
    }

    pub fn parse(text: &str) -> anyhow::Result<Profile> {
        let p: Profile = toml::from_str(text)?;
        p.validate()?;
        Ok(p)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.providers.is_empty(), "no [[provider]] defined");
        for p in &self.providers {
            anyhow::ensure!(!p.listen.is_empty(), "provider {}: listen is empty", p.name);
            for a in &p.listen {
                anyhow::ensure!(
                    a.ip().is_loopback(),
                    "provider {}: listen address {a} is not loopback; the sink only serves 127.0.0.0/8 and ::1",
                    p.name
                );
            }
            let b = &p.behaviour;
            for (what, v) in [
                ("rcpt_tempfail", b.rcpt_tempfail),
                ("rcpt_permfail", b.rcpt_permfail),
                ("data_tempfail", b.data_tempfail),
                ("data_permfail", b.data_permfail),
                ("disconnect_in_data", b.disconnect_in_data),
            ] {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&v),
                    "provider {}: {what} = {v} is not a probability in 0..1",
                    p.name
                );
            }
            for (what, list, first) in [
                ("rcpt_tempfail_replies", &b.rcpt_tempfail_replies, '4'),
                ("rcpt_permfail_replies", &b.rcpt_permfail_replies, '5'),
                ("data_tempfail_replies", &b.data_tempfail_replies, '4'),
                ("data_permfail_replies", &b.data_permfail_replies, '5'),
            ] {
                anyhow::ensure!(!list.is_empty(), "provider {}: {what} is empty", p.name);
                for r in list {
                    anyhow::ensure!(
                        r.len() > 4
                            && r.starts_with(first)
                            && r.as_bytes()[..3].iter().all(u8::is_ascii_digit),
                        "provider {}: {what} entry {r:?} must start with a {first}xx code",
                        p.name
                    );
                }
            }
            let l = b.latency_ms;
            for (what, [lo, hi]) in [
                ("greeting", l.greeting),
                ("ehlo", l.ehlo),
                ("mail", l.mail),
                ("rcpt", l.rcpt),
                ("data", l.data),
                ("data_end", l.data_end),
            ] {
                anyhow::ensure!(
                    lo <= hi,
                    "provider {}: latency_ms.{what} = [{lo}, {hi}]: low bound above high",
                    p.name
                );
            }
        }
        Ok(())
    }

    /// The provider a domain routes to: an exact domain first, then the longest suffix.
    pub fn provider_for_domain(&self, domain: &str) -> Option<usize> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if let Some(i) = self
            .providers
            .iter()
            .position(|p| p.domains.iter().any(|d| d.eq_ignore_ascii_case(&domain)))
        {
            return Some(i);
        }
        self.providers
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.domain_suffixes.iter().map(move |s| (i, s)))
            .filter(|(_, s)| domain.ends_with(&format!(".{}", s.to_ascii_lowercase())))
            .max_by_key(|(_, s)| s.len())
            .map(|(i, _)| i)
    }

    /// Rewrites every listen port (tests pass 0 to get free ports, then share one).
    pub fn set_port(&mut self, port: u16) {
        for p in &mut self.providers {
            for a in &mut p.listen {
                a.set_port(port);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_switches_off_one_part_and_keeps_the_other() {
        let full = Profile::load("realistic").unwrap();
        let mut no_latency = full.clone();
        no_latency.without(Part::Latency);
        let mut no_failures = full.clone();
        no_failures.without(Part::Failures);
        for ((f, l), x) in full
            .providers
            .iter()
            .zip(&no_latency.providers)
            .zip(&no_failures.providers)
        {
            let (f, l, x) = (&f.behaviour, &l.behaviour, &x.behaviour);
            assert_eq!(
                l.latency_ms.data_end,
                [0, 0],
                "{}",
                f.latency_ms.data_end[1]
            );
            assert_eq!(l.rcpt_tempfail, f.rcpt_tempfail);
            assert_eq!(l.max_conns_per_ip, f.max_conns_per_ip);
            assert_eq!(x.latency_ms.data_end, f.latency_ms.data_end);
            assert_eq!(
                (x.rcpt_tempfail, x.data_tempfail, x.rate_per_s_per_ip),
                (0.0, 0.0, 0.0)
            );
            assert_eq!(x.max_conns_per_ip, 0);
        }
        assert!(full.providers[0].behaviour.latency_ms.data_end[1] > 0);
    }
}
