//! RFC 3464 delivery status notifications, for campaigns that ask for them
//! (`dsn = true`; off by default: a bulk sender's return path is usually a bounce
//! processor that reads the accounting log instead).
//!
//! After a run, the Bounce and Expiration records of those campaigns that no DSN has
//! been made for yet are turned into a campaign of their own: one multipart/report
//! message per failed recipient, to the campaign's return path, from the null sender
//! (MAIL FROM:<>, RFC 5321 §4.5.5, so a DSN never causes another). It is queued
//! through the normal ingest, so it is as durable as any campaign and is sent by the
//! same engine. How far the log has been read is kept in SPOOL/dsn/log-offset,
//! written after the DSN campaign is queued: a crash in between makes a DSN twice,
//! never loses one.

use crate::campaign::Campaign;
use crate::ingest::{self, write_durably};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The DSN template; every value in it is a merge field of the DSN campaign.
const TEMPLATE: &str = "From: Mail Delivery System <MAILER-DAEMON@{{mta}}>
To: <{{email}}>
Subject: Undelivered Mail Returned to Sender
Date: {{date}}
Message-ID: <{{msgid}}@{{mta}}>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary=\"volley-dsn\"

This is a MIME-encapsulated message.

--volley-dsn
Content-Type: text/plain; charset=utf-8

Campaign {{campaign}}: the message to {{rcpt}} could not be delivered.

{{explanation}}

The receiving server said: {{reply}}

--volley-dsn
Content-Type: message/delivery-status

Reporting-MTA: dns; {{mta}}
X-Volley-Campaign: {{campaign}}
Arrival-Date: {{arrival}}

Final-Recipient: rfc822; {{rcpt}}
Action: failed
Status: {{status}}
Diagnostic-Code: smtp; {{reply}}
Last-Attempt-Date: {{last_attempt}}

--volley-dsn--
";

/// Longest receiver reply a DSN quotes: its `Diagnostic-Code:` line must stay under
/// RFC 5322's 998 octets, or the DSN campaign itself would be refused at ingest.
pub const DSN_REPLY_OCTETS_MAX: usize = 900;

/// `reply` cut to DSN_REPLY_OCTETS_MAX octets at a character boundary, marked "...".
fn cut_reply(mut reply: String) -> String {
    if reply.len() > DSN_REPLY_OCTETS_MAX {
        let mut cut = DSN_REPLY_OCTETS_MAX - 3;
        while !reply.is_char_boundary(cut) {
            cut -= 1;
        }
        reply.truncate(cut);
        reply.push_str("...");
    }
    reply
}

/// Queues DSNs for the new Bounce and Expiration records of campaigns with `dsn = true`
/// in `log`; returns how many. `mta` names this host in them.
pub fn queue(
    spool: &Path,
    log: &Path,
    instances: &ingest::Instances,
    shards: usize,
    segment_bytes: usize,
    mta: &str,
) -> anyhow::Result<u64> {
    let wanted: HashSet<&str> = instances
        .values()
        .filter(|i| i.settings.dsn && i.settings.sender != "<>")
        .map(|i| i.settings.id.as_str())
        .collect();
    if wanted.is_empty() {
        return Ok(0);
    }
    // The DSNs' From domain must be a domain: with an address literal for EHLO
    // (`[192.0.2.1]`), the first such campaign's From domain stands in.
    // The DSNs come from MAILER-DAEMON at this host's name; with an address literal
    // for EHLO (`[192.0.2.1]`), which is no domain, each campaign's From domain.
    let host_is_domain = crate::smtp::names::check_domain(mta).is_ok();
    let from_domain: HashMap<&str, &str> = instances
        .values()
        .map(|i| (i.settings.id.as_str(), i.settings.from_domain.as_str()))
        .collect();
    let dir = spool.join("dsn");
    std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let offset_file = dir.join("log-offset");
    let from: u64 = std::fs::read_to_string(&offset_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let mut f = match std::fs::File::open(log) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => anyhow::bail!("{}: {e}", log.display()),
    };
    f.seek(SeekFrom::Start(from))?;
    let mut reader = std::io::BufReader::new(f);
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let id = format!("dsn-{stamp}");
    // One DSN campaign per sending name (one unless EHLO is an address literal).
    let mut batches: BTreeMap<String, csv::Writer<Vec<u8>>> = BTreeMap::new();
    const COLUMNS: [&str; 11] = [
        "email",
        "rcpt",
        "campaign",
        "status",
        "reply",
        "explanation",
        "arrival",
        "last_attempt",
        "date",
        "msgid",
        "mta",
    ];
    let (mut read, mut n) = (from, 0u64);
    let mut line = Vec::new();
    let now = rfc5322_date(SystemTime::now());
    loop {
        line.clear();
        let got = reader.by_ref().take(1 << 20).read_until(b'\n', &mut line)?;
        // Only whole lines: a shard may be mid-write of the last one.
        if got == 0 || line.last() != Some(&b'\n') {
            break;
        }
        read += got as u64;
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
            continue;
        };
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let (kind, campaign) = (s("type"), s("campaign"));
        if !matches!(kind.as_str(), "Bounce" | "Expiration") || !wanted.contains(campaign.as_str())
        {
            continue;
        }
        let sender = s("sender");
        if sender.is_empty() || sender == "<>" {
            continue;
        }
        let code = v["code"].as_u64().unwrap_or(0);
        let (status, explanation) = if kind == "Expiration" {
            let why = if s("last_attempt").is_empty() {
                "It could not be delivered before the campaign's expire_after passed; no \
                 attempt could be made."
            } else {
                "It could not be delivered before the campaign's expire_after passed; the \
                 receiving server's last answer is below."
            };
            ("5.4.7".to_string(), why)
        } else {
            let enhanced = s("enhanced");
            let status = if enhanced.starts_with('5') {
                enhanced
            } else {
                "5.0.0".into()
            };
            (status, "It was refused permanently.")
        };
        let time = humantime::parse_rfc3339(&s("time")).unwrap_or_else(|_| SystemTime::now());
        let arrival = time - Duration::from_millis(v["queued_ms"].as_u64().unwrap_or(0));
        // An Expiration names its last real attempt (RFC 3464 §2.3.6); a bounce is one.
        let last = humantime::parse_rfc3339(&s("last_attempt")).unwrap_or(time);
        n += 1;
        let mta = match host_is_domain {
            true => mta,
            false => from_domain.get(campaign.as_str()).copied().unwrap_or(mta),
        };
        let csv = match batches.entry(mta.to_string()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let mut w = csv::Writer::from_writer(Vec::new());
                w.write_record(COLUMNS)?;
                e.insert(w)
            }
        };
        csv.write_record([
            sender.as_str(),
            &s("rcpt"),
            &campaign,
            &status,
            &cut_reply(
                [code.to_string(), s("enhanced"), s("reply")]
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            explanation,
            &rfc5322_date(arrival),
            &rfc5322_date(last),
            &now,
            &format!("{id}.{n}"),
            mta,
        ])?;
    }
    let several = batches.len() > 1;
    for (k, (mta, csv)) in batches.into_iter().enumerate() {
        let id = if several {
            format!("{id}-{k}")
        } else {
            id.clone()
        };
        let rows = csv.into_inner()?;
        queue_campaign(
            &dir.join(&id),
            &id,
            &mta,
            &rows,
            spool,
            shards,
            segment_bytes,
        )?;
    }
    write_durably(&offset_file, read.to_string().as_bytes())?;
    Ok(n)
}

/// Writes and queues the DSN campaign `id` from `mta` with its `rows` (CSV, header
/// first) in `cdir`. Errors: the files cannot be written, or it does not load (a bug).
fn queue_campaign(
    cdir: &Path,
    id: &str,
    mta: &str,
    rows: &[u8],
    spool: &Path,
    shards: usize,
    segment_bytes: usize,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(cdir)?;
    write_durably(
        &cdir.join("campaign.toml"),
        format!(
            "# Delivery status notifications made by volley; sent from the null sender.\n\
             id = \"{id}\"\nsender = \"<>\"\nfrom_domain = \"{mta}\"\nexpire_after = \"5d\"\n\
             # This host's own notices: no DKIM key is expected for its name.\ndkim = false\n"
        )
        .as_bytes(),
    )?;
    write_durably(&cdir.join("message.eml"), TEMPLATE.as_bytes())?;
    write_durably(&cdir.join("recipients.csv"), rows)?;
    let campaign = Campaign::load(cdir)
        .map_err(|p| anyhow::anyhow!("DSN campaign {}: {p:?} (a volley bug)", cdir.display()))?;
    ingest::ingest(&campaign, spool, shards, segment_bytes).map_err(|e| match e {
        ingest::IngestError::Problems(p, _) => {
            anyhow::anyhow!("DSN campaign {}: {p:?}", cdir.display())
        }
        ingest::IngestError::Other(e) => e,
    })?;
    Ok(())
}

/// "Wed, 25 Nov 2026 02:42:35 +0000"
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {d} {} {y} {:02}:{:02}:{:02} +0000",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc5322() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_574_555);
        assert_eq!(rfc5322_date(t), "Wed, 25 Nov 2026 02:42:35 +0000");
        assert_eq!(
            rfc5322_date(SystemTime::UNIX_EPOCH),
            "Thu, 1 Jan 1970 00:00:00 +0000"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }
}
