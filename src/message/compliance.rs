//! The large receivers' bulk-sender rules (Gmail and Yahoo since 2024, Microsoft since
//! 2025), checked by `volley check` and applied by `send`: one-click unsubscribe
//! (RFC 8058) added from the campaign's settings, Date and Message-ID added per message
//! when the template has none, and warnings for what only the operator can fix
//! (no unsubscribe at all, an envelope sender not aligned with the From domain).

use crate::message::campaign::Settings;

/// A template completed with the headers the settings call for.
pub struct Completed {
    pub text: Vec<u8>,
    /// Header fields added to the template (for `check` to say so).
    pub added: Vec<&'static str>,
    /// The template has no Date: one is added to each message when it is sent.
    pub add_date: bool,
    /// The template has no Message-ID: each message gets a unique one when sent.
    pub add_message_id: bool,
    pub warnings: Vec<String>,
}

/// The lowercased names of the header fields of `text` (up to the empty line).
fn header_names(text: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            continue;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            names.push(
                String::from_utf8_lossy(&line[..colon])
                    .trim()
                    .to_ascii_lowercase(),
            );
        }
    }
    names
}

pub fn complete(template: &[u8], s: &Settings) -> Completed {
    let names = header_names(template);
    let has = |n: &str| names.iter().any(|x| x == n);
    let eol: &[u8] = if template.windows(2).any(|w| w == b"\r\n") {
        b"\r\n"
    } else {
        b"\n"
    };
    let mut extra: Vec<u8> = Vec::new();
    let mut added = Vec::new();
    let mut warnings = Vec::new();
    if !has("list-unsubscribe") {
        let mut targets = Vec::new();
        if let Some(m) = &s.list_unsubscribe_mailto {
            targets.push(format!("<mailto:{m}>"));
        }
        if let Some(u) = &s.list_unsubscribe_url {
            targets.push(format!("<{u}>"));
        }
        if targets.is_empty() {
            warnings.push(
                "no List-Unsubscribe: Gmail, Yahoo and Microsoft require one-click unsubscribe \
                 (RFC 8058) from bulk senders; set list_unsubscribe_url (https) in campaign.toml"
                    .into(),
            );
        } else {
            extra.extend_from_slice(format!("List-Unsubscribe: {}", targets.join(", ")).as_bytes());
            extra.extend_from_slice(eol);
            added.push("List-Unsubscribe");
        }
    }
    let https = s.list_unsubscribe_url.is_some() || {
        // The template's own List-Unsubscribe may carry an https target.
        String::from_utf8_lossy(template)
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .any(|l| {
                l.to_ascii_lowercase().starts_with("list-unsubscribe:") && l.contains("<https://")
            })
    };
    if !has("list-unsubscribe-post") {
        if https {
            extra.extend_from_slice(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click");
            extra.extend_from_slice(eol);
            added.push("List-Unsubscribe-Post");
        } else if has("list-unsubscribe") || s.list_unsubscribe_mailto.is_some() {
            warnings.push(
                "List-Unsubscribe has no https target, so no one-click List-Unsubscribe-Post \
                 can be added (RFC 8058); set list_unsubscribe_url"
                    .into(),
            );
        }
    }
    if let Some(w) = alignment(&s.sender, &s.from_domain) {
        warnings.push(w);
    }
    // New fields go first: the template's own stay as they are.
    let mut text = extra;
    text.extend_from_slice(template);
    Completed {
        text,
        added,
        add_date: !has("date"),
        add_message_id: !has("message-id"),
        warnings,
    }
}

/// A warning when the envelope sender's domain and the From domain do not align in
/// DMARC's relaxed sense (one a subdomain of the other, or the same).
fn alignment(sender: &str, from_domain: &str) -> Option<String> {
    if sender == "<>" {
        return None;
    }
    let sd = sender.rsplit_once('@')?.1.to_ascii_lowercase();
    let fd = from_domain.to_ascii_lowercase();
    let aligned = sd == fd || sd.ends_with(&format!(".{fd}")) || fd.ends_with(&format!(".{sd}"));
    (!aligned).then(|| {
        format!(
            "the envelope sender's domain {sd} is not aligned with the From domain {fd}: SPF \
             then cannot pass DMARC for this mail; use a return path under {fd}"
        )
    })
}

/// "Date: ...\r\nMessage-ID: <...>\r\n" for the fields a template lacks:
/// `message_id` (`left@domain`, no brackets) when it lacks one.
pub fn per_message_headers(add_date: bool, message_id: Option<String>) -> String {
    let mut h = String::new();
    if add_date {
        h.push_str(&format!(
            "Date: {}\r\n",
            crate::message::dsn::rfc5322_date(std::time::SystemTime::now())
        ));
    }
    if let Some(id) = message_id {
        h.push_str(&format!("Message-ID: <{id}>\r\n"));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &str) -> Settings {
        toml::from_str(&format!(
            "id = \"c\"\nsender = \"bounces@mail.news.test\"\nfrom_domain = \"news.test\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn one_click_unsubscribe_is_added_from_the_settings() {
        let t = b"From: a@news.test\r\nSubject: x\r\n\r\nbody\r\n";
        let c = complete(
            t,
            &settings("list_unsubscribe_url = \"https://news.test/u/{{email}}\"\nlist_unsubscribe_mailto = \"u@news.test\""),
        );
        let text = String::from_utf8(c.text).unwrap();
        assert!(text.starts_with(
            "List-Unsubscribe: <mailto:u@news.test>, <https://news.test/u/{{email}}>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nFrom:"
        ), "{text}");
        assert_eq!(c.added, vec!["List-Unsubscribe", "List-Unsubscribe-Post"]);
        assert!(c.add_date && c.add_message_id);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn what_cannot_be_added_is_warned_about() {
        let t = b"From: a@news.test\nDate: x\nMessage-ID: <1@x>\n\nbody\n";
        let c = complete(t, &settings(""));
        assert!(c.added.is_empty() && !c.add_date && !c.add_message_id);
        assert!(
            c.warnings[0].contains("no List-Unsubscribe"),
            "{:?}",
            c.warnings
        );
        let mut s = settings("");
        s.sender = "bounces@esp.example".into();
        let c = complete(t, &s);
        assert!(
            c.warnings.iter().any(|w| w.contains("not aligned")),
            "{:?}",
            c.warnings
        );
        // A template with its own https List-Unsubscribe gets only the Post field.
        let t = b"From: a@news.test\nList-Unsubscribe: <https://news.test/u>\n\nbody\n";
        let c = complete(t, &settings(""));
        assert_eq!(c.added, vec!["List-Unsubscribe-Post"]);
    }
}
