//! When to try again after a temporary failure: a schedule per reply class (a
//! throttled receiver is retried sooner and oftener than a full mailbox), the
//! greylisting delay when the receiver names one, and jitter on top.

use crate::policy::classify::{Class, Verdict};
use crate::smtp::reply::Reply;
use std::time::{Duration, SystemTime};

/// A greylisting receiver that names no delay is retried after this long.
pub const GREYLIST_DEFAULT: Duration = Duration::from_secs(300);
/// Never wait longer than this for a greylist, whatever the reply says.
pub const GREYLIST_MAX: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// For classes without their own schedule; the last delay repeats.
    pub default: Vec<Duration>,
    pub per_class: Vec<(Class, Vec<Duration>)>,
}

fn mins(m: &[u64]) -> Vec<Duration> {
    m.iter().map(|m| Duration::from_secs(m * 60)).collect()
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            // The classic MTA schedule.
            default: mins(&[5, 10, 20, 40, 60, 120, 240]),
            per_class: vec![
                // A throttling receiver wants the sender back soon, but not hammering.
                (Class::Throttled, mins(&[1, 2, 4, 8, 15, 30])),
                // Full mailboxes are emptied on a human's time scale.
                (Class::MailboxFull, mins(&[60, 120, 240])),
                (Class::Blocked, mins(&[30, 60, 120, 240])),
            ],
        }
    }
}

impl RetryPolicy {
    /// One schedule for every class.
    pub fn uniform(schedule: Vec<Duration>) -> RetryPolicy {
        assert!(!schedule.is_empty(), "a schedule has at least one delay");
        RetryPolicy {
            default: schedule,
            per_class: Vec::new(),
        }
    }

    /// The delay before the next attempt after `attempts` attempts (≥ 1), before jitter.
    pub fn delay(&self, class: Class, attempts: u32, reply: &Reply) -> Duration {
        if let Some(d) = greylist_delay(reply) {
            return d;
        }
        let sched = self
            .per_class
            .iter()
            .find(|(c, _)| *c == class)
            .map_or(&self.default, |(_, s)| s);
        sched[(attempts.max(1) as usize - 1).min(sched.len() - 1)]
    }
}

/// A greylisting reply's delay ("try again in 300 seconds", "retry in 5 minutes"),
/// plus a margin so the retry lands after the window; the default when none is named.
pub fn greylist_delay(reply: &Reply) -> Option<Duration> {
    let text = reply.text.to_ascii_lowercase();
    if !reply.is_transient() || !(text.contains("greylist") || text.contains("graylist")) {
        return None;
    }
    let words: Vec<&str> = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let named = words.windows(2).find_map(|w| {
        let n: u64 = w[0].parse().ok()?;
        let unit = match w[1] {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            _ => return None,
        };
        Some(Duration::from_secs(n * unit))
    });
    Some(
        named
            .map_or(GREYLIST_DEFAULT, |d| {
                d.mul_f64(1.1).max(Duration::from_secs(1))
            })
            .min(GREYLIST_MAX),
    )
}

/// What happens to a recipient after a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Delivered,
    Bounced,
    Expired,
    /// Try again after this long (before jitter, and never past the expiry).
    Retry(Duration),
}

/// The one place the engine (and the simulation test) decide an outcome: `verdict` is
/// the reply's classification (None for a 2xx); `dns_permanent` overrides it for DNS
/// answers; `attempts` counts this one.
pub fn decide(
    reply: &Reply,
    verdict: Option<Verdict>,
    dns_permanent: Option<bool>,
    policy: &RetryPolicy,
    attempts: u32,
    now: SystemTime,
    expire_at: SystemTime,
) -> Decision {
    let retry = match (dns_permanent, verdict) {
        (Some(p), _) => !p,
        (None, Some(v)) => v.retry,
        (None, None) => return Decision::Delivered,
    };
    if !retry {
        Decision::Bounced
    } else if now >= expire_at {
        Decision::Expired
    } else {
        let class = verdict.map_or(Class::TransientOther, |v| v.class);
        Decision::Retry(policy.delay(class, attempts, reply))
    }
}

/// ±10% so a burst of deferrals does not come back as a burst.
pub fn jitter(d: Duration) -> Duration {
    jitter_by(d, fastrand::f64())
}

/// `jitter` with its random draw `unit` (in [0, 1)) given, for a seeded caller.
pub fn jitter_by(d: Duration, unit: f64) -> Duration {
    d.mul_f64(0.9 + unit * 0.2)
}

/// The wait before a deferred recipient's next attempt at `now`: `delay`, cut
/// short at its campaign's maximum age `expire_at`, where it then expires rather
/// than waiting out a retry that could never be sent.
pub fn wait_before_retry(delay: Duration, now: SystemTime, expire_at: SystemTime) -> Duration {
    delay.min(expire_at.duration_since(now).unwrap_or_default())
}

/// Whether a recipient due at `now` has outlived `expire_at` and expires without
/// another attempt.
pub fn is_expired(now: SystemTime, expire_at: SystemTime) -> bool {
    now >= expire_at
}

/// Parses "throttled=30s,1m" (for --retry-schedule-for).
pub fn parse_class_schedule(s: &str) -> anyhow::Result<(Class, Vec<Duration>)> {
    let (class, sched) = s
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("{s:?}: expected CLASS=DELAY,DELAY,..."))?;
    let class: Class = serde_json::from_value(serde_json::Value::String(class.trim().to_string()))
        .map_err(|_| anyhow::anyhow!("{s:?}: unknown class {class:?} (see volley classify)"))?;
    Ok((class, parse_schedule(sched)?))
}

/// Parses "5m,10m,20m".
pub fn parse_schedule(s: &str) -> anyhow::Result<Vec<Duration>> {
    let v = s
        .split(',')
        .map(|d| {
            humantime::parse_duration(d.trim())
                .map_err(|e| anyhow::anyhow!("retry delay {d:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!v.is_empty(), "empty retry schedule");
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_class_schedules_and_the_last_delay_repeats() {
        let p = RetryPolicy::default();
        let r = Reply::new(421, Some("4.7.28"), "rate limited");
        assert_eq!(p.delay(Class::Throttled, 1, &r), Duration::from_secs(60));
        assert_eq!(p.delay(Class::Throttled, 3, &r), Duration::from_secs(240));
        assert_eq!(p.delay(Class::Throttled, 99, &r), Duration::from_secs(1800));
        let r = Reply::new(451, Some("4.3.0"), "try later");
        assert_eq!(
            p.delay(Class::TransientOther, 1, &r),
            Duration::from_secs(300)
        );
        assert_eq!(
            p.delay(Class::TransientOther, 2, &r),
            Duration::from_secs(600)
        );
        assert_eq!(
            p.delay(Class::MailboxFull, 1, &r),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn greylisting_uses_the_named_delay() {
        let p = RetryPolicy::default();
        let r = Reply::new(
            451,
            Some("4.7.1"),
            "<a@b>: Greylisted, try again in 120 seconds",
        );
        assert_eq!(
            p.delay(Class::TransientOther, 1, &r),
            Duration::from_secs(132)
        );
        let r = Reply::new(
            450,
            None,
            "greylisting in effect, please come back in 5 minutes",
        );
        assert_eq!(greylist_delay(&r), Some(Duration::from_secs(330)));
        let r = Reply::new(450, None, "Greylisted");
        assert_eq!(greylist_delay(&r), Some(GREYLIST_DEFAULT));
        assert_eq!(
            greylist_delay(&Reply::new(550, None, "greylisted")),
            None,
            "a 5xx is not a greylist"
        );
    }

    #[test]
    fn schedules_parse_with_clear_errors() {
        assert_eq!(
            parse_class_schedule("throttled=30s,1m").unwrap(),
            (
                Class::Throttled,
                vec![Duration::from_secs(30), Duration::from_secs(60)]
            )
        );
        assert!(parse_class_schedule("nope=1m")
            .unwrap_err()
            .to_string()
            .contains("unknown class"));
        assert!(parse_schedule("5m,soon")
            .unwrap_err()
            .to_string()
            .contains("\"soon\""));
    }
}
