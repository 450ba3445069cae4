//! `volley report CAMPAIGN`: what happened to a campaign, read back from the
//! accounting log: final outcomes, and bounces and deferrals by class and by domain.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    pub delivered: u64,
    pub bounced: u64,
    pub expired: u64,
    /// Temporary failures (events; a recipient may have several).
    pub deferrals: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct CampaignReport {
    pub campaign: String,
    /// Recipients with a final outcome in the log.
    pub recipients_final: u64,
    /// Recipients seen only with temporary failures so far.
    pub recipients_pending: u64,
    pub totals: Counts,
    /// Bounces, expirations and deferrals by class.
    pub by_class: BTreeMap<String, Counts>,
    pub by_domain: BTreeMap<String, Counts>,
    /// Log lines that are not JSON objects (reported, not fatal).
    pub unreadable_lines: u64,
}

/// Reads `log` (its rotated generations first, gzipped or not; rotation.rs) and
/// reports on `campaign`. A recipient logged final twice (the duplicates a crash
/// allows) counts once, by its last record. Errors: no log file at all, or one that
/// cannot be read, with its path.
pub fn report(log: &Path, campaign: &str) -> anyhow::Result<CampaignReport> {
    let lines = crate::observe::rotation::lines(log)
        .map_err(|e| anyhow::anyhow!("accounting log {}: {e}", log.display()))?;
    let mut r = CampaignReport {
        campaign: campaign.to_string(),
        ..Default::default()
    };
    let mut last_final: HashMap<String, (String, String, String)> = HashMap::new();
    let mut deferred: HashMap<String, ()> = HashMap::new();
    let mut any = false;
    for line in lines {
        let line = line?;
        any = true;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            r.unreadable_lines += 1;
            continue;
        };
        if v["campaign"] != campaign {
            continue;
        }
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let (kind, rcpt, domain, class) = (s("type"), s("rcpt"), s("domain"), s("class"));
        match kind.as_str() {
            "TransientFailure" => {
                r.totals.deferrals += 1;
                r.by_class.entry(class).or_default().deferrals += 1;
                r.by_domain.entry(domain).or_default().deferrals += 1;
                deferred.insert(rcpt, ());
            }
            "Delivery" | "Bounce" | "Expiration" => {
                last_final.insert(rcpt, (kind, domain, class));
            }
            _ => {}
        }
    }
    anyhow::ensure!(
        any || log.exists(),
        "accounting log {}: no such file, nor rotated generations of it",
        log.display()
    );
    for (rcpt, (kind, domain, class)) in &last_final {
        deferred.remove(rcpt);
        let d = r.by_domain.entry(domain.clone()).or_default();
        match kind.as_str() {
            "Delivery" => {
                r.totals.delivered += 1;
                d.delivered += 1;
            }
            "Bounce" => {
                r.totals.bounced += 1;
                d.bounced += 1;
                r.by_class.entry(class.clone()).or_default().bounced += 1;
            }
            _ => {
                r.totals.expired += 1;
                d.expired += 1;
                r.by_class.entry(class.clone()).or_default().expired += 1;
            }
        }
    }
    r.recipients_final = last_final.len() as u64;
    r.recipients_pending = deferred.len() as u64;
    Ok(r)
}

impl CampaignReport {
    pub fn print(&self, domains_max: usize) {
        let t = &self.totals;
        println!("campaign {}", self.campaign);
        println!(
            "  final {}: delivered {}, bounced {}, expired {}; still being retried {}; deferrals {}",
            self.recipients_final, t.delivered, t.bounced, t.expired, self.recipients_pending, t.deferrals
        );
        println!(
            "\n  {:<18}{:>8}{:>11}{:>11}",
            "by class", "bounced", "expired", "deferrals"
        );
        for (c, n) in &self.by_class {
            println!(
                "  {c:<18}{:>8}{:>11}{:>11}",
                n.bounced, n.expired, n.deferrals
            );
        }
        let mut domains: Vec<_> = self.by_domain.iter().collect();
        domains.sort_by_key(|(d, c)| {
            (
                std::cmp::Reverse(c.delivered + c.bounced + c.expired + c.deferrals),
                d.as_str(),
            )
        });
        let title = format!("by domain (top {domains_max})");
        println!(
            "\n  {title:<32}{:>10}{:>9}{:>9}{:>11}",
            "delivered", "bounced", "expired", "deferrals"
        );
        for (d, n) in domains.iter().take(domains_max) {
            println!(
                "  {d:<32}{:>10}{:>9}{:>9}{:>11}",
                n.delivered, n.bounced, n.expired, n.deferrals
            );
        }
        if domains.len() > domains_max {
            println!(
                "  ... and {} more domains (--json for all)",
                domains.len() - domains_max
            );
        }
        if self.unreadable_lines > 0 {
            println!(
                "\n{} log lines were not JSON and were skipped",
                self.unreadable_lines
            );
        }
    }
}
