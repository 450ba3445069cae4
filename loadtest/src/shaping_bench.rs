//! `volley-load bench --scenario shaping`: does volley hold the limits it is given,
//! as the receiver sees them?
//!
//! 1. Caps: per-provider message rates and connection caps against the accept-all
//!    sink; every 10 s window after the first must be within ±5% of the configured
//!    rate, and no second may see more connections than the cap.
//! 2. Back-off: no configured rate, the sink answering 421 above a per-IP rate;
//!    volley must settle under it within 30 s, with under 1% of 421s after that.
//! 3. Cost: CPU per message on the accept-all sink, with rules that never bind
//!    against the shipped defaults, in one run.
//!
//! `--scenario shaping` runs all three; shaping-caps, shaping-backoff, shaping-cost one.

use crate::bench::{run_volley, write_checks, BenchOptions, Check, Report};
use crate::gen::{self, GenOptions};
use crate::profile::Profile;
use crate::sink::Second;
use std::path::Path;

/// (sink provider, recipient domain, list share %, messages/s, connections)
const CAPS: [(&str, &str, f64, f64, u32); 3] = [
    ("google", "gmail.com", 40.0, 1000.0, 8),
    ("yahoo", "yahoo.com", 15.0, 300.0, 4),
    ("microsoft", "outlook.com", 20.0, 500.0, 6),
];
const CAPS_RULES: &str = r#"
[provider.google-sink]
mx_suffixes = ["google.sink.test"]
max_msg_rate = "1000/s"
max_connections = 8
[provider.yahoo-sink]
mx_suffixes = ["yahoodns.sink.test"]
max_msg_rate = "300/s"
max_connections = 4
[provider.microsoft-sink]
mx_suffixes = ["outlook.sink.test"]
max_msg_rate = "500/s"
max_connections = 6
"#;

/// The sink's per-IP rate above which it answers 421 (part 2).
const THRESHOLD: f64 = 2000.0;
const BACKOFF_RULES: &str = r#"
[provider.google-sink]
mx_suffixes = ["google.sink.test"]
throttle_factor = 0.5
throttle_recover = "5s"
"#;

/// Rounds of the cost comparison.
const COST_ROUNDS: usize = 5;

/// Limits so high they never bind: every message still goes through a rate limiter.
const NEVER_BINDING_RULES: &str = r#"
[default]
max_msg_rate = "10000000/s"
connect_rate = "100000/s"
"#;

pub fn run(opts: &BenchOptions) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", opts.out.display()))?;
    let work = std::env::temp_dir().join(format!("volley-bench-shaping-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let scale = opts.recipients.unwrap_or(100_000);
    let mut results = Vec::new();
    let mut checks = Vec::new();

    let part = |name: &str| matches!(opts.scenario.as_str(), "shaping") || opts.scenario == name;

    // 1. Caps.
    if part("shaping-caps") {
        let rules = work.join("caps.toml");
        std::fs::write(&rules, CAPS_RULES)?;
        let campaign = work.join("caps");
        gen::write_campaign(
            &campaign,
            &GenOptions {
                recipients: scale,
                campaign_id: "shaping-caps".into(),
                mix: CAPS.iter().map(|c| (c.1.to_string(), c.2)).collect(),
                ..GenOptions::default()
            },
        )?;
        eprintln!("bench: shaping caps, {scale} messages");
        let (r, s) = send(opts, "accept-all", &campaign, &work, &rules, scale)?;
        results.push(r);
        for (provider, _, _, rate, cap) in CAPS {
            let timeline = &s.per_provider[provider].per_second;
            let w = windows(timeline, 10);
            let worst = w
                .iter()
                .map(|(_, r, _)| (r / rate - 1.0) * 100.0)
                .fold(0.0f64, |a, d| if d.abs() > a.abs() { d } else { a });
            let conns = timeline.iter().map(|s| s.conns_max).max().unwrap_or(0);
            let rates: Vec<String> = w.iter().map(|(_, r, _)| format!("{r:.0}")).collect();
            checks.push(Check {
                what: format!("{provider}: msgs/s per 10 s window after the first"),
                measured: format!(
                    "{} windows [{}], worst {worst:+.1}%",
                    w.len(),
                    rates.join(", ")
                ),
                target: format!("{rate}/s ±5%"),
                pass: !w.is_empty() && worst.abs() <= 5.0,
            });
            checks.push(Check {
                what: format!("{provider}: most connections open at once"),
                measured: conns.to_string(),
                target: format!("≤ {cap}"),
                pass: conns <= cap,
            });
        }
    }

    // 2. Back-off under a receiver's rate limit.
    if part("shaping-backoff") {
        let rules = work.join("backoff.toml");
        std::fs::write(&rules, BACKOFF_RULES)?;
        let campaign = work.join("backoff");
        gen::write_campaign(
            &campaign,
            &GenOptions {
                recipients: scale,
                campaign_id: "shaping-backoff".into(),
                mix: vec![("gmail.com".into(), 100.0)],
                ..GenOptions::default()
            },
        )?;
        let mut p = Profile::load("accept-all")?;
        for prov in p.providers.iter_mut().filter(|p| p.name == "google") {
            prov.behaviour.rate_per_s_per_ip = THRESHOLD;
            prov.behaviour.rate_reply = "421 4.7.28 Gmail has detected an unusual rate of mail originating from your IP address and has rate limited it.".into();
        }
        eprintln!("bench: shaping back-off, {scale} messages, sink 421 above {THRESHOLD}/s");
        let (r, s) = run_volley(
            opts,
            "accept-all + 421 above 2000/s",
            p,
            scale,
            &campaign,
            &work,
            &["--shaping", rules.to_str().expect("utf-8 path")],
        )?;
        results.push(r);
        let t = &s.per_provider["google"].per_second;
        let first = t
            .iter()
            .position(|s| s.messages + s.throttled > 0)
            .unwrap_or(0);
        let settled = settle_point(t, THRESHOLD);
        let (after_ok, after_421) = settled.map_or((0, 0), |at| {
            t[at..]
                .iter()
                .fold((0, 0), |(m, x), s| (m + s.messages, x + s.throttled))
        });
        let share = after_421 as f64 * 100.0 / (after_ok + after_421).max(1) as f64;
        checks.push(Check {
            what: "back-off: seconds until every later 10 s window is under the 421 threshold"
                .into(),
            measured: settled.map_or("never".into(), |at| format!("{} s", at - first)),
            target: "≤ 30 s".into(),
            pass: settled.is_some_and(|at| at - first <= 30),
        });
        checks.push(Check {
            what: "back-off: share of 421 replies after settling".into(),
            measured: format!("{share:.2}% ({after_421} of {})", after_ok + after_421),
            target: "< 1%".into(),
            pass: settled.is_some() && share < 1.0,
        });
        let w = windows(t, 10);
        let rates: Vec<String> = w.iter().map(|(_, r, _)| format!("{r:.0}")).collect();
        checks.push(Check {
            what: "back-off: msgs/s per 10 s window (information)".into(),
            measured: rates.join(", "),
            target: format!("just under {THRESHOLD}"),
            pass: true,
        });
    }

    // 3. Cost per message with limiters that never bind, in the same run.
    if part("shaping-cost") {
        let campaign = work.join("cost");
        gen::write_campaign(
            &campaign,
            &GenOptions {
                recipients: scale,
                campaign_id: "shaping-cost".into(),
                ..GenOptions::default()
            },
        )?;
        let rules = work.join("never.toml");
        std::fs::write(&rules, NEVER_BINDING_RULES)?;
        // Alternating runs, medians: the machine's noise is larger than the effect.
        let never = ["--shaping", rules.to_str().expect("utf-8 path")];
        let variants: [(&str, &[&str]); 2] = [
            ("accept-all, shipped rules", &[]),
            ("accept-all, limits that never bind", &never),
        ];
        let mut cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for round in 0..COST_ROUNDS {
            for (i, (label, extra)) in variants.iter().enumerate() {
                eprintln!("bench: shaping cost ({label}), round {}", round + 1);
                let (r, _) = run_volley(
                    opts,
                    label,
                    Profile::load("accept-all")?,
                    scale,
                    &campaign,
                    &work,
                    extra,
                )?;
                cpu[i].extend(r.cpu_s_per_1000);
                if round == 0 {
                    results.push(r);
                }
            }
        }
        if let (Some(a), Some(b)) = (median(&mut cpu[0]), median(&mut cpu[1])) {
            let extra = (b / a - 1.0) * 100.0;
            checks.push(Check {
                what: format!(
                "CPU per message, a rate limiter on every message vs none (median of {COST_ROUNDS})"
            ),
                measured: format!("{a:.4} vs {b:.4} CPU s / 1000 msgs ({extra:+.1}%)"),
                target: "< +2%".into(),
                pass: extra < 2.0,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    write_checks(opts, results, checks)
}

fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn send(
    opts: &BenchOptions,
    profile: &str,
    campaign: &Path,
    work: &Path,
    rules: &Path,
    n: u64,
) -> anyhow::Result<(crate::bench::Result, crate::sink::Summary)> {
    run_volley(
        opts,
        profile,
        Profile::load(profile)?,
        n,
        campaign,
        work,
        &["--shaping", rules.to_str().expect("utf-8 path")],
    )
}

/// Whole `len`-second windows of a provider's timeline, after the first window and
/// before the backlog ran out (the last two seconds, when shards finish unevenly):
/// (start second, messages per second, most connections).
fn windows(t: &[Second], len: usize) -> Vec<(usize, f64, u32)> {
    let Some(first) = t.iter().position(|s| s.messages > 0) else {
        return Vec::new();
    };
    let last = t.iter().rposition(|s| s.messages > 0).unwrap_or(first);
    let end = last.saturating_sub(2);
    let mut out = Vec::new();
    let mut w = first + len;
    while w + len <= end {
        let win = &t[w..w + len];
        let msgs: u64 = win.iter().map(|s| s.messages).sum();
        let conns = win.iter().map(|s| s.conns_max).max().unwrap_or(0);
        out.push((w, msgs as f64 / len as f64, conns));
        w += len;
    }
    out
}

/// The first second from which every 10 s window (sliding by a second, up to the
/// backlog's end) of what volley offered (accepted or refused with 421) averages
/// under `threshold`.
fn settle_point(t: &[Second], threshold: f64) -> Option<usize> {
    let last = t.iter().rposition(|s| s.messages > 0)?;
    let end = last.saturating_sub(2);
    let over = |w: usize| {
        let offered: u64 = t[w..(w + 10).min(t.len())]
            .iter()
            .map(|s| s.messages + s.throttled)
            .sum();
        offered as f64 / 10.0 > threshold
    };
    let mut settled = None;
    for w in (0..end.saturating_sub(10)).rev() {
        if over(w) {
            break;
        }
        settled = Some(w);
    }
    settled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sec(messages: u64) -> Second {
        Second {
            messages,
            ..Second::default()
        }
    }

    #[test]
    fn windows_skip_the_first_and_the_ragged_end() {
        let mut t = vec![sec(0), sec(50)];
        t.extend(std::iter::repeat_n(sec(100), 40));
        t.push(sec(3));
        let w = windows(&t, 10);
        assert_eq!(w.iter().map(|x| x.0).collect::<Vec<_>>(), vec![11, 21]);
        assert!(w.iter().all(|x| x.1 == 100.0));
    }

    #[test]
    fn settling_is_the_start_of_the_last_run_under_the_threshold() {
        // Refused messages count as offered: a burst of 421s is not "under".
        let mut t: Vec<Second> = vec![
            Second {
                messages: 100,
                throttled: 20_000,
                ..Second::default()
            };
            3
        ];
        t.extend(std::iter::repeat_n(sec(5000), 2));
        t.extend(std::iter::repeat_n(sec(1000), 60));
        let at = settle_point(&t, 2000.0).unwrap();
        assert!((1..=5).contains(&at), "{at}");
        assert_eq!(settle_point(&vec![sec(5000); 60], 2000.0), None);
    }
}
