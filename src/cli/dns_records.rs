//! `volley dns-records`: the SPF, DKIM and DMARC records a campaign's domains must
//! publish, in zone-file form, so receivers accept what `send` signs and sends.

use super::print_problems;
use volley::message::campaign::Campaign;
use volley::policy::shaping::rules::{Rule, Rules};

pub(crate) fn run(
    dir: &std::path::Path,
    dkim_dir: &std::path::Path,
    mut ips: Vec<std::net::IpAddr>,
    shaping: Option<&std::path::Path>,
) -> anyhow::Result<i32> {
    let c = match Campaign::load(dir) {
        Ok(c) => c,
        Err(problems) => {
            print_problems(dir, &problems);
            return Ok(1);
        }
    };
    let s = &c.settings;
    if ips.is_empty() {
        let rules = Rules::load(shaping, &Rule::default()).map_err(|p| {
            anyhow::anyhow!(
                "{}",
                p.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        let pool = s.pool.as_ref().or(rules.default_pool.as_ref());
        ips = pool
            .and_then(|p| rules.pools.get(p))
            .map(|list| list.iter().map(|x| x.ip).collect())
            .unwrap_or_default();
    }
    let from = s.from_domain.to_ascii_lowercase();
    println!("; DNS records for campaign {} (From domain {from})", s.id);
    match s.sender.rsplit_once('@') {
        Some((_, sd)) => {
            let mech: Vec<String> = if ips.is_empty() {
                vec!["ip4:SENDING.IP.ADDRESS".into()]
            } else {
                ips.iter()
                    .map(|ip| match ip {
                        std::net::IpAddr::V4(v) => format!("ip4:{v}"),
                        std::net::IpAddr::V6(v) => format!("ip6:{v}"),
                    })
                    .collect()
            };
            println!("; SPF: the envelope sender's domain authorises the sending addresses");
            if ips.is_empty() {
                println!("; (no --ip and no pool: replace the placeholder, or merge with your existing SPF)");
            }
            println!(
                "{}. 3600 IN TXT \"v=spf1 {} ~all\"",
                sd.to_ascii_lowercase(),
                mech.join(" ")
            );
        }
        None => println!("; SPF: the null sender needs none"),
    }
    match volley::message::dkim::key_for(dkim_dir, s) {
        Ok(Some(k)) => {
            for f in &k.keys {
                let txt =
                    volley::message::dkim::public_txt(&f.path).map_err(|e| anyhow::anyhow!(e))?;
                println!("; DKIM: the public half of {}", f.path.display());
                println!(
                    "{}",
                    volley::message::dkim::zone_line(&k.domain, &f.selector, &txt)
                );
            }
        }
        Ok(None) => println!("; DKIM: the campaign is not signed (dkim = false)"),
        Err(e) => println!("; DKIM: {e}"),
    }
    println!("; DMARC: start at p=none with reports, then quarantine/reject once aligned");
    println!(
        "_dmarc.{from}. 3600 IN TXT \"v=DMARC1; p=none; rua=mailto:dmarc-reports@{from}; adkim=r; aspf=r\""
    );
    for w in &c.warnings {
        println!("; warning: {w}");
    }
    Ok(0)
}
