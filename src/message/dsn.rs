//! RFC 3464 delivery status notifications: one multipart/report message per failed
//! recipient, to the return path, from the null sender (MAIL FROM:<>, RFC 5321
//! §4.5.5, so a DSN never causes another).
//!
//! Who gets one: submitted messages (RFC 5321 §6.1: a server that took a message
//! must report its failure), and campaigns with `dsn = true` (off by default: a bulk
//! sender's return path is usually a bounce processor that reads the accounting log
//! instead). The shard makes the DSN when it records the bounce or expiration, and
//! queues it as a submitted message in its own spool, synced before the failure's
//! Done record is written: a crash in between leaves the recipient undone and it is
//! tried again, so there is at most a duplicate DSN, never a lost one.

use std::time::SystemTime;

/// Longest receiver reply a DSN quotes: its `Diagnostic-Code:` line must stay under
/// RFC 5322's 998 octets.
pub const DSN_REPLY_OCTETS_MAX: usize = 900;

/// The campaign DSNs are counted under in the log.
pub const DSN_CAMPAIGN: &str = "dsn";

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

/// One recipient that failed for good, as its DSN reports it.
pub struct Failure<'a> {
    /// The recipient (Final-Recipient).
    pub rcpt: &'a str,
    /// Where the DSN goes: the failed message's envelope sender.
    pub return_path: &'a str,
    /// The failed message's campaign, named in the text and X-Volley-Campaign.
    pub campaign: &'a str,
    /// Expired in the queue (5.4.7) rather than refused.
    pub expired: bool,
    /// The receiver's last reply (for an expiration without attempt, volley's own).
    pub code: u16,
    pub enhanced: Option<&'a str>,
    pub reply: &'a str,
    /// When the message was queued (Arrival-Date).
    pub arrival: SystemTime,
    /// The last delivery attempt (Last-Attempt-Date); None: there was none.
    pub last_attempt: Option<SystemTime>,
    /// This host's name in Reporting-MTA and the DSN's From (MAILER-DAEMON@it).
    pub mta: &'a str,
    /// The failed message's header section, returned as a `text/rfc822-headers`
    /// part (RFC 6522 §2, RFC 3462's third part); None: no third part.
    pub original_headers: Option<&'a [u8]>,
}

/// The header section of `message` (CRLF line ends), without the blank line.
pub fn header_section(message: &[u8]) -> &[u8] {
    match memchr::memmem::find(message, b"\r\n\r\n") {
        Some(i) => &message[..i + 2],
        None => message,
    }
}

/// The name a DSN reports from: the EHLO name, or with an address literal there
/// (no domain), the failed campaign's From domain.
pub fn reporting_name<'a>(ehlo: &'a str, from_domain: &'a str) -> &'a str {
    match crate::smtp::names::check_domain(ehlo) {
        Ok(_) => ehlo,
        Err(_) => from_domain,
    }
}

/// The DSN for `f`, ready to send (CRLF line ends). `id` makes its Message-ID unique.
pub fn message(f: &Failure, now: SystemTime, id: &str) -> Vec<u8> {
    let (status, explanation) = if f.expired {
        let why = match f.last_attempt {
            None => "It could not be delivered before the campaign's expire_after passed; no attempt could be made.",
            Some(_) => "It could not be delivered before the campaign's expire_after passed; the receiving server's last answer is below.",
        };
        ("5.4.7".to_string(), why)
    } else {
        let status = match f.enhanced {
            Some(e) if e.starts_with('5') => e.to_string(),
            _ => "5.0.0".into(),
        };
        (status, "It was refused permanently.")
    };
    let reply = cut_reply(
        [
            f.code.to_string(),
            f.enhanced.unwrap_or("").to_string(),
            f.reply.replace(['\r', '\n'], " "),
        ]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" "),
    );
    let last = f.last_attempt.map_or(String::new(), |t| {
        format!("Last-Attempt-Date: {}\n", rfc5322_date(t))
    });
    let text = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{mta}>
To: <{to}>
Subject: Undelivered Mail Returned to Sender
Date: {date}
Message-ID: <dsn.{id}@{mta}>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary=\"volley-dsn\"

This is a MIME-encapsulated message.

--volley-dsn
Content-Type: text/plain; charset=utf-8

Campaign {campaign}: the message to {rcpt} could not be delivered.

{explanation}

The receiving server said: {reply}

--volley-dsn
Content-Type: message/delivery-status

Reporting-MTA: dns; {mta}
X-Volley-Campaign: {campaign}
Arrival-Date: {arrival}

Final-Recipient: rfc822; {rcpt}
Action: failed
Status: {status}
Diagnostic-Code: smtp; {reply}
{last}{original}
--volley-dsn--
",
        mta = f.mta,
        to = f.return_path,
        date = rfc5322_date(now),
        campaign = f.campaign,
        rcpt = f.rcpt,
        arrival = rfc5322_date(f.arrival),
        original = match f.original_headers {
            Some(h) => format!(
                "\n--volley-dsn\nContent-Type: text/rfc822-headers\n\n{}",
                String::from_utf8_lossy(h).replace("\r\n", "\n")
            ),
            None => String::new(),
        },
    );
    text.replace('\n', "\r\n").into_bytes()
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
    use std::time::Duration;

    #[test]
    fn a_dsn_reports_the_failure_with_crlf_line_ends() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_574_555);
        let f = Failure {
            rcpt: "ann@gmail.com",
            return_path: "bounces@news.test",
            campaign: "spring",
            expired: true,
            code: 452,
            enhanced: Some("4.2.2"),
            reply: &"over quota ".repeat(200),
            arrival: t,
            last_attempt: Some(t),
            mta: "mta.volley.test",
            original_headers: Some(b"Subject: spring sale\r\nMessage-ID: <1@x.test>\r\n"),
        };
        let m = String::from_utf8(message(&f, t, "1.2")).unwrap();
        assert!(!m.replace("\r\n", "").contains('\n'), "CRLF only");
        for part in [
            "Status: 5.4.7",
            "Final-Recipient: rfc822; ann@gmail.com",
            "Diagnostic-Code: smtp; 452 4.2.2 over quota",
            "Last-Attempt-Date: Wed, 25 Nov 2026 02:42:35 +0000",
            "Reporting-MTA: dns; mta.volley.test",
            "To: <bounces@news.test>",
            "Content-Type: text/rfc822-headers\r\n\r\nSubject: spring sale\r\nMessage-ID: <1@x.test>\r\n",
        ] {
            assert!(m.contains(part), "{part}: {m}");
        }
        assert!(
            m.lines().all(|l| l.len() <= 998),
            "the reply is cut to fit a line"
        );
    }

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
