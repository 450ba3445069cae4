//! What `volley serve` does to one message an application hands it (SMTP submission
//! or a pickup file) before the message is queued: read a pickup file's envelope,
//! then check the message's line ends and header, stamp a Received field, take the
//! campaign header out and add the Date and Message-ID a submission server may add
//! (RFC 6409 §8).
//!
//! Why it is here and shaped like this: the listeners are IO glue; every decision
//! about the octets of a submitted message lives in these pure functions, so they can
//! be tested and fuzzed without a socket or a directory, and the SMTP listener and
//! the pickup scanner cannot drift apart. Nothing here reads the clock (the caller
//! passes `now`) or the network.
//!
//! Errors are operating errors (an application sent something wrong): each says
//! what, where (the line) and what to do, for the SMTP reply or the pickup log.

use crate::message::campaign::{normalise_address, AddressError};
use crate::message::mime::header::{comment_end, fields};
use crate::smtp::names::check_domain;
use memchr::memmem;
use std::collections::HashSet;
use std::net::IpAddr;
use std::time::SystemTime;
use thiserror::Error;

/// Longest line of a header section without its CRLF (RFC 5322 §2.1.1: "MUST be no
/// more than 998 characters"); longer ones are refused rather than folded for the
/// sender, because where to fold a field is the author's choice.
pub const LINE_OCTETS_MAX: usize = 998;
/// Most X-Receiver fields in one pickup file. RFC 5321 §4.5.3.1.8 only asks a server
/// to take 100 recipients per transaction; a pickup file is local, so more are
/// allowed, but not unbounded: beyond this the application should write more files.
pub const PICKUP_RECIPIENTS_MAX: usize = 1000;
/// Longest campaign header value, matching the campaign ids of `campaign.toml`.
pub const CAMPAIGN_OCTETS_MAX: usize = 64;
/// The Received field is folded to keep its lines within this many characters
/// (RFC 5322 §2.1.1: "SHOULD be no more than 78 characters").
pub const RECEIVED_COLUMNS_MAX: usize = 78;
/// Octets kept of each name a client chose (HELO, reverse DNS, user) in the Received
/// field, so that one clause stays well within [`LINE_OCTETS_MAX`].
pub const RECEIVED_ITEM_OCTETS_MAX: usize = 255;
/// Octets of a refused value shown in an error message.
const SHOWN_OCTETS_MAX: usize = 80;

/// A pickup file read: its envelope and the message to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pickup {
    /// The envelope sender (MAIL FROM) as [`normalise_address`] returns it; `""` for
    /// the null sender `<>` (RFC 5321 §4.5.5).
    pub sender: String,
    /// The envelope recipients, normalised, each once, in the file's order.
    pub recipients: Vec<String>,
    /// The message without its X-Sender and X-Receiver fields, every line ending in
    /// CRLF (RFC 5322 §2.1), the last one too.
    pub message: Vec<u8>,
}

/// Why a pickup file is refused. Line numbers count the file's lines from 1.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PickupError {
    #[error("the file is empty: a pickup file is an RFC 5322 message with `X-Sender: <address>` and `X-Receiver: <address>` header fields at its top")]
    Empty,
    #[error("line {line}: a NUL octet; a message is text (RFC 5322 §2.3, RFC 5321 §4.5.2): send binary content MIME-encoded (base64)")]
    Nul { line: usize },
    #[error("line {line}: a CR that does not end the line; lines end in LF or CRLF, a lone CR is not allowed in a message (RFC 5322 §2.3)")]
    BareCr { line: usize },
    #[error("line {line}: a header line of {len} octets, over the {LINE_OCTETS_MAX} RFC 5322 §2.1.1 allows; fold the field (a line break followed by a space)")]
    LineTooLong { line: usize, len: usize },
    #[error("no empty line between the header and the body in the file's {lines} lines (RFC 5322 §2.1); add one after the header fields (a file cut short looks like this too)")]
    NoSeparator { lines: usize },
    #[error("no X-Sender: put `X-Sender: <bounces@example.com>` (or `X-Sender: <>` for the null sender) at the top of the header")]
    NoSender,
    #[error("line {line}: a second X-Sender (the first is on line {first}); a message has one envelope sender: keep one")]
    TwoSenders { first: usize, line: usize },
    #[error("no X-Receiver: put one `X-Receiver: <user@example.com>` per recipient at the top of the header")]
    NoReceiver,
    #[error("line {line}: more than {PICKUP_RECIPIENTS_MAX} X-Receiver fields; split the recipients over several files")]
    TooManyRecipients { line: usize },
    #[error("line {line}: {field} {addr:?}: {why}")]
    BadAddress {
        line: usize,
        field: &'static str,
        addr: String,
        why: AddressError,
    },
    #[error("line {line}: {field} after the message's own header fields; put X-Sender and X-Receiver first, so that none is left in the message for its recipients to see")]
    EnvelopeNotAtTop { line: usize, field: &'static str },
}

const X_SENDER: &str = "X-Sender";
const X_RECEIVER: &str = "X-Receiver";

/// Reads a pickup file: an RFC 5322 message whose envelope is given in one
/// `X-Sender` and one or more `X-Receiver` fields at the top of its header
/// (PowerMTA's convention, what `volley-load gen --pickup` writes). The values may be
/// bare (`user@example.com`) or in angle brackets; `X-Sender: <>` is the null sender.
/// Those fields are taken out of the message; lines ending in LF or CRLF all end in
/// CRLF afterwards. A recipient given twice is kept once (it would get two copies).
pub fn parse_pickup(file: &[u8]) -> Result<Pickup, PickupError> {
    if file.is_empty() {
        return Err(PickupError::Empty);
    }
    let text = to_crlf(file)?;
    // Normalising kept every line where it was, so line numbers are the file's.
    let header_len = match header_section_len(&text) {
        Some(n) => n,
        None => {
            let lines = memmem::find_iter(&text, b"\r\n").count();
            return Err(PickupError::NoSeparator { lines });
        }
    };
    let header = &text[..header_len];
    if let Some((line, len)) = long_line(header) {
        return Err(PickupError::LineTooLong { line, len });
    }
    let mut sender: Option<(usize, String)> = None;
    let mut recipients = Vec::new();
    let mut seen = HashSet::new();
    let mut envelope_len = 0;
    let mut at_top = true;
    let mut line = 1;
    for f in fields(header) {
        let here = line;
        line += memmem::find_iter(f.raw, b"\r\n").count();
        let field = if f.is(X_SENDER) {
            X_SENDER
        } else if f.is(X_RECEIVER) {
            X_RECEIVER
        } else {
            at_top = false;
            continue;
        };
        if !at_top {
            return Err(PickupError::EnvelopeNotAtTop { line: here, field });
        }
        envelope_len += f.raw.len();
        let value = String::from_utf8_lossy(&f.value()).into_owned();
        let addr = value.strip_prefix('<').and_then(|v| v.strip_suffix('>'));
        let addr = addr.unwrap_or(&value).trim();
        if field == X_SENDER {
            if let Some((first, _)) = sender {
                return Err(PickupError::TwoSenders { first, line: here });
            }
            let normal = if addr.is_empty() {
                String::new()
            } else {
                checked(addr, here, field)?
            };
            sender = Some((here, normal));
        } else {
            if recipients.len() == PICKUP_RECIPIENTS_MAX {
                return Err(PickupError::TooManyRecipients { line: here });
            }
            let normal = checked(addr, here, field)?;
            if seen.insert(normal.clone()) {
                recipients.push(normal);
            }
        }
    }
    let (_, sender) = sender.ok_or(PickupError::NoSender)?;
    if recipients.is_empty() {
        return Err(PickupError::NoReceiver);
    }
    Ok(Pickup {
        sender,
        recipients,
        message: text[envelope_len..].to_vec(),
    })
}

fn checked(addr: &str, line: usize, field: &'static str) -> Result<String, PickupError> {
    normalise_address(addr).map_err(|why| PickupError::BadAddress {
        line,
        field,
        addr: shown(addr.as_bytes()),
        why,
    })
}

/// The file with every line ending in CRLF (one added after a last line without an
/// end), refusing NUL and a CR inside a line.
fn to_crlf(file: &[u8]) -> Result<Vec<u8>, PickupError> {
    // Most files are LF-only: room for one more octet per 40-octet line.
    let mut out = Vec::with_capacity(file.len() + file.len() / 40 + 2);
    for (i, raw) in file.split_inclusive(|&b| b == b'\n').enumerate() {
        let line = raw.strip_suffix(b"\n").unwrap_or(raw);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if memchr::memchr(0, line).is_some() {
            return Err(PickupError::Nul { line: i + 1 });
        }
        if memchr::memchr(b'\r', line).is_some() {
            return Err(PickupError::BareCr { line: i + 1 });
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    Ok(out)
}

/// Length of the header section of CRLF text, with the CRLF of its last line but not
/// the empty line; None when there is no empty line.
fn header_section_len(text: &[u8]) -> Option<usize> {
    if text.starts_with(b"\r\n") {
        return Some(0);
    }
    memmem::find(text, b"\r\n\r\n").map(|i| i + 2)
}

/// The first line (number, octets without CRLF) of a header section that is over
/// [`LINE_OCTETS_MAX`].
fn long_line(header: &[u8]) -> Option<(usize, usize)> {
    header
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l).len()))
        .find(|&(_, len)| len > LINE_OCTETS_MAX)
}

fn shown(v: &[u8]) -> String {
    let s = String::from_utf8_lossy(&v[..v.len().min(SHOWN_OCTETS_MAX)]).into_owned();
    if v.len() > SHOWN_OCTETS_MAX {
        format!("{s}...")
    } else {
        s
    }
}

/// How a message came in, for its Received field (RFC 5321 §4.4).
#[derive(Debug, Clone)]
pub struct Trace<'a> {
    /// The name the client gave in EHLO/HELO; `""` leaves the `from` clause out (the
    /// pickup directory has no client).
    pub received_from_helo: &'a str,
    /// The client's address; None hides the client: its reverse DNS name is then left
    /// out too (RFC 5321 §4.4 TCP-info is an address literal, with a name only
    /// beside it).
    pub client_ip: Option<IpAddr>,
    /// The client address's reverse DNS name, when it has one that resolves back.
    pub client_rdns: Option<&'a str>,
    /// This host's name, as in its greeting.
    pub by_host: &'a str,
    /// RFC 3848's protocol name: ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA (both);
    /// `local` for the pickup directory.
    pub protocol: &'a str,
    /// The TLS cipher suite's IANA name (TLS_AES_256_GCM_SHA384), shown in RFC 8314
    /// §4.3's `tls` clause.
    pub tls: Option<&'a str>,
    /// The authenticated user, shown in a comment; None keeps login names out of
    /// mail that recipients read (as Postfix does by default).
    pub auth_user: Option<&'a str>,
    /// The queue id, unique on this host: the `id` clause, and the left part of an
    /// added Message-ID.
    pub queue_id: &'a str,
    /// The recipient for the `for` clause: give it only when there is exactly one,
    /// so that recipients do not learn of each other (RFC 5321 §7.2).
    pub for_rcpt: Option<&'a str>,
    pub now: SystemTime,
}

/// A message ready to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Received first, then any added Date and Message-ID, then the message's own
    /// header without the campaign header, then its body, untouched.
    pub message: Vec<u8>,
    /// The campaign header's value, trimmed; None when the message had none.
    pub campaign: Option<String>,
    /// The domain of the From field's (first) address, lowercased; None when there
    /// is no From or its address has no valid domain.
    pub from_domain: Option<String>,
    /// Some octet is over 127: delivery needs 8BITMIME (RFC 6152) or a conversion.
    pub has_8bit: bool,
}

/// Why a submitted message is refused. Line numbers count the message's lines from 1.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IntakeError {
    #[error("line {line}: a bare LF (a line end without CR); RFC 5321 §2.3.8 allows line ends only as CRLF: send every line end as CRLF")]
    BareLf { line: usize },
    #[error("line {line}: a bare CR (not followed by LF); RFC 5321 §2.3.8 allows CR only in a CRLF line end: remove it")]
    BareCr { line: usize },
    #[error("no empty line between the header and the body (RFC 5322 §2.1); add one after the header fields")]
    NoSeparator,
    #[error("line {line}: a header line of {len} octets, over the {LINE_OCTETS_MAX} RFC 5322 §2.1.1 allows; fold the field (CRLF followed by a space)")]
    LineTooLong { line: usize, len: usize },
    #[error("line {line}: {text:?} is not a header field: a name of printable ASCII, then a colon (RFC 5322 §2.2); a body needs an empty line before it")]
    NotAField { line: usize, text: String },
    #[error("line {line}: {name} {value:?}: {why}")]
    BadCampaign {
        line: usize,
        name: String,
        value: String,
        why: &'static str,
    },
    #[error("line {line}: a second {name} {second:?} that differs from the first, {first:?}; a message belongs to one campaign: send one")]
    TwoCampaigns {
        line: usize,
        name: String,
        first: String,
        second: String,
    },
}

/// Prepares a submitted message (CRLF line ends, as SMTP DATA delivers it after
/// dot-unstuffing, or [`Pickup::message`]) for the queue:
///
/// - refuses bare CR and LF (RFC 5321 §2.3.8), a header without an empty line after
///   it, header lines without a colon or over 998 octets (RFC 5322 §2.1.1, §2.2);
/// - takes every `campaign_header` field out (any case; its value unfolded and
///   trimmed must be 1 to [`CAMPAIGN_OCTETS_MAX`] printable ASCII characters, and
///   the same in each copy) and returns its value: it is volley's to read, not the
///   recipient's;
/// - prepends a Received field (RFC 5321 §4.4, RFC 5322 §3.6.7);
/// - adds Date and Message-ID when missing, as RFC 6409 §8.1 and §8.3 let a
///   submission server do (RFC 5322 §3.6 requires Date; Message-ID is what
///   receivers and DKIM replay checks expect); the Message-ID's domain is the From
///   address's, else `from_domain_fallback` (a valid domain, from the config).
///
/// The body is never read except for `has_8bit`.
pub fn prepare(
    message: &[u8],
    intake: &Trace,
    campaign_header: &str,
    from_domain_fallback: &str,
) -> Result<Prepared, IntakeError> {
    assert!(
        !campaign_header.is_empty() && campaign_header.bytes().all(is_ftext),
        "the campaign header name is checked with the config"
    );
    debug_assert!(check_domain(from_domain_fallback).is_ok());
    check_line_ends(message)?;
    let header_len = header_section_len(message).ok_or(IntakeError::NoSeparator)?;
    let (header, rest) = message.split_at(header_len);
    check_header_lines(header)?;

    let mut kept: Vec<&[u8]> = Vec::new();
    let mut campaign: Option<String> = None;
    let mut from_domain = None;
    let mut seen_from = false;
    let (mut has_date, mut has_message_id) = (false, false);
    let mut line = 1;
    for f in fields(header) {
        let here = line;
        line += memmem::find_iter(f.raw, b"\r\n").count();
        if f.is(campaign_header) {
            let value = campaign_value(&f.value(), here, campaign_header)?;
            match &campaign {
                Some(first) if *first != value => {
                    return Err(IntakeError::TwoCampaigns {
                        line: here,
                        name: campaign_header.to_string(),
                        first: first.clone(),
                        second: value,
                    })
                }
                _ => campaign = Some(value),
            }
            continue;
        }
        if f.is("From") && !seen_from {
            // RFC 5322 §3.6 allows one From; a second one is not this function's to judge.
            seen_from = true;
            from_domain = first_address_domain(&f.value());
        }
        has_date |= f.is("Date");
        has_message_id |= f.is("Message-ID");
        kept.push(f.raw);
    }

    let mut out = Vec::with_capacity(message.len() + 512);
    out.extend_from_slice(received(intake).as_bytes());
    if !has_date {
        let date = crate::message::dsn::rfc5322_date(intake.now);
        out.extend_from_slice(format!("Date: {date}\r\n").as_bytes());
    }
    if !has_message_id {
        let domain = from_domain.as_deref().unwrap_or(from_domain_fallback);
        let id = message_id(intake, domain);
        out.extend_from_slice(format!("Message-ID: <{id}>\r\n").as_bytes());
    }
    for raw in kept {
        out.extend_from_slice(raw);
    }
    out.extend_from_slice(rest);
    Ok(Prepared {
        message: out,
        campaign,
        from_domain,
        has_8bit: message.iter().any(|&b| b > 127),
    })
}

/// RFC 5321 §2.3.8: CR and LF only together, as CRLF. Accepting a bare LF is what
/// SMTP smuggling (2023) exploits, and a receiver further on may refuse it.
fn check_line_ends(message: &[u8]) -> Result<(), IntakeError> {
    let mut line = 1;
    for i in memchr::memchr2_iter(b'\r', b'\n', message) {
        if message[i] == b'\r' {
            if message.get(i + 1) != Some(&b'\n') {
                return Err(IntakeError::BareCr { line });
            }
        } else if i == 0 || message[i - 1] != b'\r' {
            return Err(IntakeError::BareLf { line });
        } else {
            line += 1;
        }
    }
    Ok(())
}

/// Each line of the header section is a field's first line (`name:`) or a
/// continuation (starting with SP or HTAB) of the one before, and not too long.
fn check_header_lines(header: &[u8]) -> Result<(), IntakeError> {
    let lines = header.strip_suffix(b"\r\n").unwrap_or(header);
    if lines.is_empty() {
        return Ok(());
    }
    for (i, l) in lines.split(|&b| b == b'\n').enumerate() {
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        let line = i + 1;
        if l.len() > LINE_OCTETS_MAX {
            return Err(IntakeError::LineTooLong { line, len: l.len() });
        }
        if i > 0 && matches!(l.first(), Some(b' ' | b'\t')) {
            continue;
        }
        let named = memchr::memchr(b':', l).is_some_and(|colon| {
            // RFC 5322 §4.5.8 (obsolete syntax) allows white space before the colon.
            let name = l[..colon].trim_ascii_end();
            !name.is_empty() && name.iter().all(|&c| is_ftext(c))
        });
        if !named {
            return Err(IntakeError::NotAField {
                line,
                text: shown(l),
            });
        }
    }
    Ok(())
}

/// RFC 5322 §3.6.8 ftext: a field name's characters.
fn is_ftext(c: u8) -> bool {
    (33..=126).contains(&c) && c != b':'
}

fn campaign_value(value: &[u8], line: usize, name: &str) -> Result<String, IntakeError> {
    let why = if value.is_empty() {
        Some("empty; give the campaign's id, or leave the field out")
    } else if value.len() > CAMPAIGN_OCTETS_MAX {
        Some("over 64 characters; use a shorter campaign id")
    } else if !value.iter().all(|&c| (0x20..=0x7e).contains(&c)) {
        Some("not printable ASCII; use letters, digits and -_. in a campaign id")
    } else {
        None
    };
    match why {
        Some(why) => Err(IntakeError::BadCampaign {
            line,
            name: name.to_string(),
            value: shown(value),
            why,
        }),
        // Printable ASCII, so this is the text itself.
        None => Ok(String::from_utf8_lossy(value).into_owned()),
    }
}

/// The lowercased domain of the first address of an unfolded address-list value
/// (RFC 5322 §3.4): the `<addr-spec>` when there is one, else the bare addr-spec;
/// comments and quoted strings (display names, quoted local parts) skipped.
fn first_address_domain(v: &[u8]) -> Option<String> {
    let mut plain = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'"' => {
                i += 1;
                while i < v.len() && v[i] != b'"' {
                    i += if v[i] == b'\\' { 2 } else { 1 };
                }
                // The quoted text cannot hold the domain; keep the local part's place.
                plain.push(b'q');
            }
            b'(' => {
                i = comment_end(v, i)?;
                plain.push(b' ');
                continue;
            }
            b'<' => {
                let end = i + memchr::memchr(b'>', &v[i..])?;
                return domain_of(&v[i + 1..end]);
            }
            // A group's display name ends at ':'; the first mailbox at ',' or ';'.
            b':' => plain.clear(),
            b',' | b';' => break,
            c => plain.push(c),
        }
        i += 1;
    }
    domain_of(&plain)
}

fn domain_of(addr: &[u8]) -> Option<String> {
    let at = memchr::memrchr(b'@', addr)?;
    let d = std::str::from_utf8(&addr[at + 1..]).ok()?.trim();
    let d = d.strip_suffix('.').unwrap_or(d);
    check_domain(d).ok()?;
    Some(d.to_ascii_lowercase())
}

/// `left@domain` for an added Message-ID (RFC 5322 §3.6.4): the queue id is unique
/// on this host, the time and host name make it unique across hosts and restarts.
fn message_id(intake: &Trace, domain: &str) -> String {
    let secs = intake
        .now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let atom = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!(
        "{}.{secs:x}.{}@{domain}",
        atom(intake.queue_id),
        atom(intake.by_host)
    )
}

/// The Received field (RFC 5321 §4.4 `Stamp`: from, by, with, id, for, then the
/// registered `tls` clause, `;` and the date), folded before a clause that would pass
/// [`RECEIVED_COLUMNS_MAX`].
fn received(intake: &Trace) -> String {
    let mut clauses: Vec<String> = Vec::new();
    let helo = clean(intake.received_from_helo);
    if !helo.is_empty() {
        clauses.push(format!("from {helo}"));
        if let Some(ip) = intake.client_ip {
            let literal = match ip {
                IpAddr::V4(a) => format!("[{a}]"),
                IpAddr::V6(a) => format!("[IPv6:{a}]"),
            };
            clauses.push(match intake.client_rdns.map(clean) {
                Some(name) if !name.is_empty() => format!("({name} {literal})"),
                _ => format!("({literal})"),
            });
        }
    }
    clauses.push(format!("by {}", clean(intake.by_host)));
    clauses.push(format!("with {}", clean(intake.protocol)));
    if let Some(user) = intake.auth_user {
        clauses.push(format!("(authenticated as {})", clean(user)));
    }
    clauses.push(format!("id {}", clean(intake.queue_id)));
    if let Some(rcpt) = intake.for_rcpt {
        clauses.push(format!("for <{}>", clean(rcpt)));
    }
    if let Some(tls) = intake.tls {
        clauses.push(format!("tls {}", clean(tls)));
    }
    if let Some(last) = clauses.last_mut() {
        last.push(';');
    }
    clauses.push(crate::message::dsn::rfc5322_date(intake.now));
    fold("Received:", &clauses)
}

/// A name from outside (a client's HELO, a user name) made safe for the Received
/// field: visible ASCII without the characters that end a comment or the clause
/// list (`( ) \ ;`), each other one as `_`, and at most [`RECEIVED_ITEM_OCTETS_MAX`]
/// octets. The trace is for people to read; exact octets of odd names are not worth
/// a field that does not parse.
fn clean(s: &str) -> String {
    s.chars()
        .take(RECEIVED_ITEM_OCTETS_MAX)
        .map(|c| match c {
            '(' | ')' | '\\' | ';' => '_',
            c if c.is_ascii_graphic() => c,
            _ => '_',
        })
        .collect()
}

/// `name` and the clauses on one line, a new line (CRLF HTAB, RFC 5322 §2.2.3) before
/// each clause that would pass [`RECEIVED_COLUMNS_MAX`]; ends in CRLF.
fn fold(name: &str, clauses: &[String]) -> String {
    let mut out = String::from(name);
    let mut column = name.len();
    for c in clauses {
        if column + 1 + c.len() > RECEIVED_COLUMNS_MAX && column > name.len() {
            out.push_str("\r\n\t");
            column = 1;
        } else {
            out.push(' ');
            column += 1;
        }
        out.push_str(c);
        column += c.len();
    }
    out.push_str("\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn err(file: &str) -> PickupError {
        parse_pickup(file.as_bytes()).unwrap_err()
    }

    const BODY: &str = "From: News <news@news.example.com>\nSubject: hi\n\nHello\n";

    #[test]
    fn a_pickup_file_with_lf_line_ends_is_read_and_normalised_to_crlf() {
        let f = format!("X-Sender: bounces@news.example.com\nX-Receiver: user@Example.COM\n{BODY}");
        let p = parse_pickup(f.as_bytes()).unwrap();
        assert_eq!(p.sender, "bounces@news.example.com");
        assert_eq!(p.recipients, ["user@example.com"]);
        assert_eq!(
            p.message,
            b"From: News <news@news.example.com>\r\nSubject: hi\r\n\r\nHello\r\n"
        );
    }

    #[test]
    fn a_pickup_file_with_crlf_line_ends_reads_the_same_as_with_lf() {
        let lf = format!(
            "X-Sender: <b@x.example>\nX-Receiver: <a@y.example>\nX-Receiver: c@y.example\n{BODY}"
        );
        let crlf = lf.replace('\n', "\r\n");
        let (a, b) = (
            parse_pickup(lf.as_bytes()).unwrap(),
            parse_pickup(crlf.as_bytes()).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.recipients, ["a@y.example", "c@y.example"]);
    }

    #[test]
    fn a_last_line_without_an_end_gets_a_crlf() {
        let p =
            parse_pickup(b"X-Sender: <>\nX-Receiver: a@y.example\nSubject: x\n\nno end").unwrap();
        assert!(p.message.ends_with(b"\r\n\r\nno end\r\n"));
    }

    #[test]
    fn what_volley_load_writes_is_accepted() {
        let f = "X-Sender: bounces@news.volley.test\nX-Receiver: user7@gmail.com\nFrom: \"Volley News\" <news@news.volley.test>\nTo: Ann <user7@gmail.com>\n\nbody\n";
        let p = parse_pickup(f.as_bytes()).unwrap();
        assert_eq!(p.sender, "bounces@news.volley.test");
        assert_eq!(p.recipients, ["user7@gmail.com"]);
        assert!(p.message.starts_with(b"From: \"Volley News\""));
    }

    #[test]
    fn x_sender_empty_angle_brackets_is_the_null_sender() {
        let p = parse_pickup(format!("X-Sender: <>\nX-Receiver: a@y.example\n{BODY}").as_bytes())
            .unwrap();
        assert_eq!(p.sender, "");
    }

    #[test]
    fn recipients_with_quoted_local_parts_are_kept_quoted_and_given_twice_kept_once() {
        let f = format!("X-Sender: b@x.example\nX-Receiver: <\"odd user\"@y.example>\nX-Receiver: \"plain\"@y.example\nX-Receiver: \"odd user\"@Y.example\n{BODY}");
        let p = parse_pickup(f.as_bytes()).unwrap();
        assert_eq!(p.recipients, ["\"odd user\"@y.example", "plain@y.example"]);
    }

    #[test]
    fn an_empty_file_is_refused() {
        assert_eq!(err(""), PickupError::Empty);
    }

    #[test]
    fn a_file_without_x_sender_is_refused() {
        assert_eq!(
            err(&format!("X-Receiver: a@y.example\n{BODY}")),
            PickupError::NoSender
        );
    }

    #[test]
    fn a_second_x_sender_is_refused_with_both_lines() {
        let e = err(&format!(
            "X-Sender: a@x.example\nX-Receiver: a@y.example\nX-Sender: b@x.example\n{BODY}"
        ));
        assert_eq!(e, PickupError::TwoSenders { first: 1, line: 3 });
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    #[test]
    fn a_file_without_x_receiver_is_refused() {
        assert_eq!(
            err(&format!("X-Sender: a@x.example\n{BODY}")),
            PickupError::NoReceiver
        );
    }

    #[test]
    fn a_bad_address_is_refused_with_its_line_and_the_reason() {
        let e = err(&format!(
            "X-Sender: a@x.example\nX-Receiver: a@y.example\nX-Receiver: a..b@y.example\n{BODY}"
        ));
        match &e {
            PickupError::BadAddress {
                line: 3,
                field: "X-Receiver",
                why: AddressError::LocalDots,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string()
                .starts_with("line 3: X-Receiver \"a..b@y.example\""),
            "{e}"
        );
        let e = err(&format!(
            "X-Sender: nobody\nX-Receiver: a@y.example\n{BODY}"
        ));
        assert!(
            matches!(
                e,
                PickupError::BadAddress {
                    line: 1,
                    field: "X-Sender",
                    why: AddressError::MissingAt,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn an_envelope_field_below_the_message_header_is_refused() {
        let e = err("X-Sender: a@x.example\nX-Receiver: a@y.example\nSubject: x\nX-Receiver: b@y.example\n\nbody\n");
        assert_eq!(
            e,
            PickupError::EnvelopeNotAtTop {
                line: 4,
                field: "X-Receiver"
            }
        );
    }

    #[test]
    fn a_file_without_an_empty_line_after_the_header_is_refused() {
        let e = err("X-Sender: a@x.example\nX-Receiver: a@y.example\nSubject: x\n");
        assert_eq!(e, PickupError::NoSeparator { lines: 3 });
    }

    #[test]
    fn a_header_line_over_998_octets_is_refused_with_its_line() {
        let long = format!("Subject: {}", "x".repeat(990));
        let e = err(&format!(
            "X-Sender: a@x.example\nX-Receiver: a@y.example\n{long}\n\nbody\n"
        ));
        assert_eq!(e, PickupError::LineTooLong { line: 3, len: 999 });
        // The body is not the header: long lines there are not this check's business.
        let ok = format!("X-Sender: a@x.example\nX-Receiver: a@y.example\n\n{long}\n");
        assert!(parse_pickup(ok.as_bytes()).is_ok());
    }

    #[test]
    fn a_nul_octet_is_refused_with_its_line() {
        let e = err(&format!(
            "X-Sender: a@x.example\nX-Receiver: a@y.example\n{BODY}bin\0ary\n"
        ));
        assert_eq!(e, PickupError::Nul { line: 7 });
    }

    #[test]
    fn a_cr_inside_a_line_is_refused_with_its_line() {
        let e = err("X-Sender: a@x.example\r\nX-Receiver: a@y.example\r\nSubject: a\rb\r\n\r\n");
        assert_eq!(e, PickupError::BareCr { line: 3 });
    }

    #[test]
    fn more_recipients_than_the_limit_are_refused() {
        let mut f = String::from("X-Sender: a@x.example\n");
        for i in 0..=PICKUP_RECIPIENTS_MAX {
            f.push_str(&format!("X-Receiver: u{i}@y.example\n"));
        }
        f.push_str(BODY);
        assert_eq!(
            err(&f),
            PickupError::TooManyRecipients {
                line: PICKUP_RECIPIENTS_MAX + 2
            }
        );
    }

    fn intake(ip: Option<IpAddr>) -> Trace<'static> {
        Trace {
            received_from_helo: "app1.example.net",
            client_ip: ip,
            client_rdns: Some("app1.example.net"),
            by_host: "mta1.example.com",
            protocol: "ESMTPSA",
            tls: Some("TLS_AES_256_GCM_SHA384"),
            auth_user: None,
            queue_id: "Q1A2B3",
            for_rcpt: Some("user@example.org"),
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_574_555),
        }
    }

    const IP: Option<IpAddr> = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));

    fn prep(m: &str) -> Prepared {
        prepare(
            m.as_bytes(),
            &intake(IP),
            "X-Campaign-ID",
            "fallback.example.com",
        )
        .unwrap()
    }

    fn text(p: &Prepared) -> &str {
        std::str::from_utf8(&p.message).unwrap()
    }

    const MSG: &str = "From: \"News, weekly\" <News@News.Example.COM>\r\nDate: Mon, 23 Nov 2026 09:00:00 +0000\r\nMessage-ID: <kept@news.example.com>\r\nSubject: hi\r\n\r\nbody\r\n";

    #[test]
    fn prepare_adds_a_folded_received_field_with_the_client_ip() {
        let p = prep(MSG);
        let t = text(&p);
        assert!(
            t.starts_with(
                "Received: from app1.example.net (app1.example.net [192.0.2.7])\r\n\
             \tby mta1.example.com with ESMTPSA id Q1A2B3 for <user@example.org>\r\n\
             \ttls TLS_AES_256_GCM_SHA384; Wed, 25 Nov 2026 02:42:35 +0000\r\nFrom: "
            ),
            "{t}"
        );
        for line in t.split("\r\n") {
            assert!(line.len() <= RECEIVED_COLUMNS_MAX, "{line}");
        }
    }

    #[test]
    fn prepare_leaves_the_client_out_of_received_when_it_is_hidden() {
        let p = prepare(
            MSG.as_bytes(),
            &intake(None),
            "X-Campaign-ID",
            "f.example.com",
        )
        .unwrap();
        let t = text(&p);
        assert!(
            t.starts_with("Received: from app1.example.net by mta1.example.com"),
            "{t}"
        );
        assert!(!t.contains("192.0.2.7") && !t.contains("(app1"), "{t}");
    }

    #[test]
    fn an_ipv6_client_is_an_ipv6_address_literal_and_odd_names_are_made_safe() {
        let mut i = intake("2001:db8::1".parse().ok());
        i.received_from_helo = "evil (x); \r\nBcc: all";
        i.auth_user = Some("ann");
        let p = prepare(MSG.as_bytes(), &i, "X-Campaign-ID", "f.example.com").unwrap();
        let t = text(&p);
        assert!(t.contains("from evil__x___"), "{t}");
        assert!(t.contains("[IPv6:2001:db8::1]"), "{t}");
        assert!(t.contains("(authenticated as ann)"), "{t}");
        assert!(!t.contains("\nBcc"), "{t}");
    }

    #[test]
    fn pickup_mail_has_no_from_clause() {
        let mut i = intake(None);
        i.received_from_helo = "";
        i.protocol = "local";
        i.tls = None;
        i.for_rcpt = None;
        let p = prepare(MSG.as_bytes(), &i, "X-Campaign-ID", "f.example.com").unwrap();
        assert!(
            text(&p).starts_with("Received: by mta1.example.com with local id Q1A2B3;"),
            "{}",
            text(&p)
        );
    }

    #[test]
    fn prepare_removes_a_folded_campaign_header_and_a_second_copy() {
        let m = "x-campaign-id:\r\n  spring-2026 \r\nFrom: a@x.example\r\nX-Campaign-ID: spring-2026\r\nSubject: s\r\n\r\nbody\r\n";
        let p = prep(m);
        assert_eq!(p.campaign.as_deref(), Some("spring-2026"));
        assert!(
            !text(&p).to_ascii_lowercase().contains("campaign"),
            "{}",
            text(&p)
        );
        assert!(text(&p).contains("From: a@x.example\r\nSubject: s\r\n\r\nbody\r\n"));
    }

    #[test]
    fn two_different_campaign_values_are_refused() {
        let m = "X-Campaign-ID: a\r\nX-Campaign-ID: b\r\n\r\n";
        let e = prepare(m.as_bytes(), &intake(IP), "X-Campaign-ID", "f.example.com").unwrap_err();
        assert!(
            matches!(e, IntakeError::TwoCampaigns { line: 2, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn an_empty_long_or_non_ascii_campaign_value_is_refused() {
        for (v, why) in [
            ("", "empty"),
            (&"c".repeat(65)[..], "over 64"),
            ("ca\u{e9}", "not printable"),
        ] {
            let m = format!("Subject: s\r\nX-Campaign-ID: {v}\r\n\r\n");
            let e =
                prepare(m.as_bytes(), &intake(IP), "X-Campaign-ID", "f.example.com").unwrap_err();
            assert!(
                matches!(e, IntakeError::BadCampaign { line: 2, .. }),
                "{e:?}"
            );
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    #[test]
    fn a_campaign_header_line_in_the_body_is_left_alone() {
        let m = "From: a@x.example\r\nSubject: s\r\n\r\nX-Campaign-ID: no\r\n";
        let p = prep(m);
        assert_eq!(p.campaign, None);
        assert!(text(&p).ends_with("\r\n\r\nX-Campaign-ID: no\r\n"));
    }

    #[test]
    fn prepare_keeps_an_existing_message_id_and_date() {
        let p = prep(MSG);
        let t = text(&p);
        assert_eq!(t.matches("Message-ID:").count(), 1);
        assert_eq!(t.matches("\r\nDate:").count(), 1);
        assert!(t.contains("Message-ID: <kept@news.example.com>\r\n"));
        assert_eq!(p.from_domain.as_deref(), Some("news.example.com"));
        assert!(!p.has_8bit);
    }

    #[test]
    fn prepare_adds_a_message_id_in_the_from_domain_and_a_date_when_missing() {
        let p =
            prep("Subject: s\r\nfrom: (the team) \"a@b\" <x@Mail.Example.ORG.>\r\n\r\nbody\r\n");
        let t = text(&p);
        assert_eq!(p.from_domain.as_deref(), Some("mail.example.org"));
        assert!(t.contains("\r\nDate: Wed, 25 Nov 2026 02:42:35 +0000\r\nMessage-ID: <Q1A2B3.6b064b1b.mta1_example_com@mail.example.org>\r\nSubject: s\r\n"), "{t}");
    }

    #[test]
    fn without_a_from_address_the_message_id_uses_the_fallback_domain() {
        let p = prep("Subject: s\r\n\r\n");
        assert_eq!(p.from_domain, None);
        assert!(text(&p).contains("@fallback.example.com>\r\n"));
        // A bare addr-spec and a group are read too.
        assert_eq!(
            first_address_domain(b"a@b.example.com"),
            Some("b.example.com".into())
        );
        assert_eq!(
            first_address_domain(b"team: a@c.example.com, b@d.example.com;"),
            Some("c.example.com".into())
        );
    }

    #[test]
    fn prepare_refuses_a_bare_lf_naming_rfc_5321() {
        let e = prepare(
            b"Subject: s\r\n\r\nline\nnext\r\n",
            &intake(IP),
            "X-Campaign-ID",
            "f.example.com",
        )
        .unwrap_err();
        assert_eq!(e, IntakeError::BareLf { line: 3 });
        assert!(e.to_string().contains("RFC 5321 §2.3.8"), "{e}");
        let e = prepare(
            b"Subject: s\r\n\r\nline\rnext\r\n",
            &intake(IP),
            "X-Campaign-ID",
            "f.example.com",
        )
        .unwrap_err();
        assert_eq!(e, IntakeError::BareCr { line: 3 });
    }

    #[test]
    fn prepare_refuses_a_missing_separator_and_a_line_without_a_colon() {
        let go = |m: &str| prepare(m.as_bytes(), &intake(IP), "X-Campaign-ID", "f.example.com");
        assert_eq!(go("Subject: s\r\n"), Err(IntakeError::NoSeparator));
        let e = go("Subject: s\r\nthis is body text\r\n\r\nx\r\n").unwrap_err();
        assert!(matches!(e, IntakeError::NotAField { line: 2, .. }), "{e:?}");
        let e = go(" folded: first\r\n\r\n").unwrap_err();
        assert!(matches!(e, IntakeError::NotAField { line: 1, .. }), "{e:?}");
    }

    #[test]
    fn eight_bit_content_is_reported() {
        assert!(prep("Subject: s\r\n\r\ncaf\u{e9}\r\n").has_8bit);
    }

    #[test]
    fn a_pickup_message_prepares_cleanly() {
        let f = "X-Sender: b@x.example\nX-Receiver: a@y.example\nFrom: n@news.example.com\nX-Campaign-ID: c1\n\nhi\n";
        let p = parse_pickup(f.as_bytes()).unwrap();
        let q = prepare(&p.message, &intake(None), "X-Campaign-ID", "f.example.com").unwrap();
        assert_eq!(q.campaign.as_deref(), Some("c1"));
        assert!(text(&q).ends_with("From: n@news.example.com\r\n\r\nhi\r\n"));
    }
}
