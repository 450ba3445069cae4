//! The campaign generator: a campaign directory (campaign.toml, message.eml,
//! recipients.csv) with a realistic domain mix and body size, deterministic for a
//! seed, and optionally ready-made pickup files.
//!
//! Every recipient row carries the integrity digest of the body as that recipient
//! will receive it, so the sink checks the engine's rendering end to end.

use crate::integrity::{Digest, HEADER};
use std::io::Write;
use std::path::Path;

/// The default mix: the big providers' share of a typical consumer list, the rest
/// spread over a long tail of small domains (percent of recipients).
pub const DEFAULT_MIX: &[(&str, f64)] = &[
    ("gmail.com", 30.0),
    ("yahoo.com", 9.0),
    ("aol.com", 3.0),
    ("outlook.com", 5.0),
    ("hotmail.com", 5.0),
    ("icloud.com", 4.0),
    ("gmx.de", 2.0),
    ("web.de", 2.0),
];

#[derive(Debug, Clone)]
pub struct GenOptions {
    pub recipients: u64,
    pub seed: u64,
    /// Approximate body size in octets (text + HTML parts).
    pub body_bytes: usize,
    /// Named domains and their percentage; what remains goes to the tail.
    pub mix: Vec<(String, f64)>,
    /// Number of tail domains (`shopN.tail.test`), picked with a Zipf-like skew.
    pub tail_domains: u64,
    pub campaign_id: String,
    /// Recipients whose local part makes the sink fail them every time, per thousand.
    pub tempfail_per_mille: u32,
    pub permfail_per_mille: u32,
    /// DKIM selector to sign with (volley's key for news.volley.test); None: unsigned.
    pub dkim_selector: Option<String>,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            recipients: 10_000,
            seed: 1,
            body_bytes: 10 * 1024,
            mix: DEFAULT_MIX
                .iter()
                .map(|(d, p)| (d.to_string(), *p))
                .collect(),
            tail_domains: 3000,
            campaign_id: "gen".into(),
            tempfail_per_mille: 0,
            permfail_per_mille: 0,
            dkim_selector: None,
        }
    }
}

/// Parses `gmail.com=30,yahoo.com=12` into a mix.
pub fn parse_mix(s: &str) -> anyhow::Result<Vec<(String, f64)>> {
    let mut mix = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (d, p) = part
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--mix entry {part:?}: expected domain=percent"))?;
        let p: f64 = p
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--mix entry {part:?}: {p:?} is not a number"))?;
        anyhow::ensure!(
            (0.0..=100.0).contains(&p),
            "--mix entry {part:?}: percent out of 0..100"
        );
        mix.push((d.trim().to_ascii_lowercase(), p));
    }
    let total: f64 = mix.iter().map(|(_, p)| p).sum();
    anyhow::ensure!(total <= 100.0, "--mix adds up to {total}%, more than 100");
    Ok(mix)
}

const FIRST_NAMES: &[&str] = &[
    "Ann", "Bruno", "Chloé", "Dmitri", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi",
    "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Viktor",
    "Wen", "Yusuf", "Zoe",
];

const WORDS: &[&str] = &[
    "spring",
    "offer",
    "collection",
    "discover",
    "members",
    "exclusive",
    "delivery",
    "free",
    "week",
    "new",
    "store",
    "favourites",
    "season",
    "limited",
    "today",
    "style",
    "garden",
    "travel",
    "reading",
    "morning",
    "coffee",
    "update",
    "account",
    "points",
    "reward",
    "early",
    "access",
    "preview",
    "city",
    "weekend",
];

/// The template's merge fields, in recipients.csv column order.
pub const COLUMNS: &[&str] = &["email", "first_name", "id", "integrity"];

pub struct Generated {
    pub recipients: u64,
    pub per_domain: std::collections::BTreeMap<String, u64>,
}

struct Template {
    head: String,
    /// Body parts alternate literal / first_name, starting and ending with a literal.
    body_parts: Vec<String>,
}

fn template(opts: &GenOptions, rng: &mut fastrand::Rng) -> Template {
    let from_domain = "news.volley.test";
    let head = format!(
        "From: \"Volley News\" <news@{from_domain}>\n\
         To: {{{{first_name}}}} <{{{{email}}}}>\n\
         Subject: {{{{first_name}}}}, your spring selection is here\n\
         Date: Mon, 23 Nov 2026 09:00:00 +0000\n\
         Message-ID: <{{{{id}}}}.{}@{from_domain}>\n\
         MIME-Version: 1.0\n\
         {HEADER}: {{{{integrity}}}}\n\
         Content-Type: multipart/alternative; boundary=\"=_volley_alt\"\n\n",
        opts.campaign_id
    );
    let half = opts.body_bytes / 2;
    let mut text = String::new();
    while text.len() < half {
        let mut line = String::new();
        while line.len() < 70 {
            line.push_str(WORDS[rng.usize(..WORDS.len())]);
            line.push(' ');
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    // A line starting with "." exercises dot-stuffing on every message.
    let text = format!("{text}.and a line that starts with a dot\n");
    let html: String = text
        .lines()
        .map(|l| format!("<p>{l}</p>\n"))
        .collect::<String>()
        .chars()
        .take(half.max(1))
        .collect();
    let body_parts = vec![
        "--=_volley_alt\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nHello ".to_string(),
        format!(",\n\n{text}\n--=_volley_alt\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n<html><body><h1>Hello "),
        format!("</h1>\n{}\n</body></html>\n--=_volley_alt--\n", html.trim_end()),
    ];
    Template { head, body_parts }
}

/// Writes `dir/{campaign.toml,message.eml,recipients.csv}`.
pub fn write_campaign(dir: &Path, opts: &GenOptions) -> anyhow::Result<Generated> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let t = template(opts, &mut rng);
    std::fs::write(
        dir.join("campaign.toml"),
        format!(
            "# Generated by volley-load gen (seed {}).\nid = \"{}\"\nsender = \"bounces@news.volley.test\"\nfrom_domain = \"news.volley.test\"\n{}",
            opts.seed,
            opts.campaign_id,
            match &opts.dkim_selector {
                Some(s) => format!("dkim_selector = \"{s}\"\n"),
                None => "dkim = false\n".into(),
            }
        ),
    )?;
    let body_template = t.body_parts.join("{{first_name}}");
    std::fs::write(
        dir.join("message.eml"),
        format!("{}{}", t.head, body_template),
    )?;
    let f = std::fs::File::create(dir.join("recipients.csv"))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    writeln!(w, "{}", COLUMNS.join(","))?;
    let picker = DomainPicker::new(opts);
    let mut per_domain = std::collections::BTreeMap::new();
    for i in 0..opts.recipients {
        let domain = picker.pick(&mut rng);
        let name = FIRST_NAMES[rng.usize(..FIRST_NAMES.len())];
        let local = local_part(opts, &mut rng, i);
        let digest = body_digest(&t, name);
        writeln!(w, "{local}@{domain},{name},{i},{}", digest.header_value())?;
        *per_domain.entry(domain).or_insert(0) += 1;
    }
    w.flush()?;
    Ok(Generated {
        recipients: opts.recipients,
        per_domain,
    })
}

/// Writes `count` ready-made messages for a pickup directory, with the envelope in
/// X-Sender / X-Receiver headers (the PowerMTA convention).
pub fn write_pickup(dir: &Path, opts: &GenOptions, count: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let t = template(opts, &mut rng);
    let picker = DomainPicker::new(opts);
    for i in 0..count {
        let domain = picker.pick(&mut rng);
        let name = FIRST_NAMES[rng.usize(..FIRST_NAMES.len())];
        let email = format!("{}@{domain}", local_part(opts, &mut rng, i));
        let digest = body_digest(&t, name);
        let head = t
            .head
            .replace("{{first_name}}", name)
            .replace("{{email}}", &email)
            .replace("{{id}}", &i.to_string())
            .replace("{{integrity}}", &digest.header_value());
        let msg = format!(
            "X-Sender: bounces@news.volley.test\nX-Receiver: {email}\n{head}{}",
            t.body_parts.join(name)
        );
        // Written under a dot name and renamed, so a pickup scanner never sees half a file.
        let tmp = dir.join(format!(".{i:08}.eml.tmp"));
        std::fs::write(&tmp, msg)?;
        std::fs::rename(&tmp, dir.join(format!("{i:08}.eml")))?;
    }
    Ok(())
}

fn local_part(opts: &GenOptions, rng: &mut fastrand::Rng, i: u64) -> String {
    let r = rng.u32(..1000);
    if r < opts.tempfail_per_mille {
        format!("tempfail.{i}")
    } else if r < opts.tempfail_per_mille + opts.permfail_per_mille {
        format!("permfail.{i}")
    } else {
        format!("user{i}")
    }
}

fn body_digest(t: &Template, name: &str) -> Digest {
    Digest::of(t.body_parts.join(name).as_bytes())
}

struct DomainPicker {
    /// Cumulative percentages of the named domains.
    named: Vec<(String, f64)>,
    tail: u64,
}

impl DomainPicker {
    fn new(opts: &GenOptions) -> Self {
        let mut acc = 0.0;
        let named = opts
            .mix
            .iter()
            .map(|(d, p)| {
                acc += p;
                (d.clone(), acc)
            })
            .collect();
        DomainPicker {
            named,
            tail: opts.tail_domains.max(1),
        }
    }

    fn pick(&self, rng: &mut fastrand::Rng) -> String {
        let r = rng.f64() * 100.0;
        if let Some((d, _)) = self.named.iter().find(|(_, c)| r < *c) {
            return d.clone();
        }
        // Skewed: the square of a uniform puts more weight on low-numbered domains.
        let u = rng.f64();
        let n = ((u * u) * self.tail as f64) as u64;
        format!("shop{n}.tail.test")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_campaign_and_mix_is_roughly_right() {
        let a = tempdir("gen-a");
        let b = tempdir("gen-b");
        let opts = GenOptions {
            recipients: 20_000,
            ..GenOptions::default()
        };
        let ga = write_campaign(&a, &opts).unwrap();
        write_campaign(&b, &opts).unwrap();
        for f in ["campaign.toml", "message.eml", "recipients.csv"] {
            assert_eq!(
                std::fs::read(a.join(f)).unwrap(),
                std::fs::read(b.join(f)).unwrap(),
                "{f}"
            );
        }
        let gmail = ga.per_domain["gmail.com"] as f64 / 20_000.0;
        assert!((0.27..0.33).contains(&gmail), "gmail share {gmail}");
        let tail: u64 = ga
            .per_domain
            .iter()
            .filter(|(d, _)| d.ends_with(".tail.test"))
            .map(|(_, n)| n)
            .sum();
        assert!(tail > 6_000, "tail {tail}");
        let size = std::fs::metadata(a.join("message.eml")).unwrap().len();
        assert!((9_000..13_000).contains(&size), "template size {size}");
    }

    fn tempdir(name: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("volley-load-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }
}
