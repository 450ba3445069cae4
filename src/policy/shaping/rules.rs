//! Shaping rules: what volley may send to whom, read from TOML layers merged in order
//! (shipped defaults, the tuning/ provider profiles, the operator's file, then the
//! command line's defaults). Every value remembers the file and line it came from, so
//! `volley shaping show` can say why a limit is what it is.
//!
//! Sections: `[default]`, `[provider.NAME]` (matched by MX host suffix: every domain
//! hosted by Google shares Google's budget), `[domain."example.com"]`, `[source."IP"]`
//! and `[source."IP".provider.NAME]` (one source address towards one provider), and
//! `[pool.NAME]` (source addresses with EHLO names and weights).

use crate::smtp::client::TlsMode;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

const SHIPPED_DEFAULTS: &str = include_str!("defaults.toml");
const SHIPPED_PROVIDERS: &str = include_str!("../../../tuning/providers.toml");

/// A value and where it was set ("tuning/providers.toml:12", "command line").
#[derive(Debug, Clone)]
pub struct Set<T> {
    pub value: T,
    pub from: Arc<str>,
}

impl<T> Set<T> {
    pub fn cli(value: T) -> Set<T> {
        Set {
            value,
            from: "command line".into(),
        }
    }
}

/// "N per duration": `100/s`, `3000/min`, `50000/h`, `3/10min`.
#[derive(Debug, Clone, PartialEq)]
pub struct Per {
    pub count: f64,
    pub window: Duration,
}

impl Per {
    pub fn per_sec(&self) -> f64 {
        self.count / self.window.as_secs_f64()
    }
}

impl fmt::Display for Per {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.count,
            humantime::format_duration(self.window)
        )
    }
}

pub fn parse_per(s: &str) -> Result<Per, String> {
    let (n, w) = s.split_once('/').ok_or_else(|| {
        format!("`{s}` is not a rate: write COUNT/WINDOW, e.g. 100/s, 3000/min, 3/10min")
    })?;
    let count: f64 = n
        .trim()
        .parse()
        .ok()
        .filter(|c: &f64| c.is_finite() && *c > 0.0)
        .ok_or_else(|| format!("`{n}` in `{s}` is not a positive number"))?;
    let w = w.trim();
    // A bare unit ("s", "min", "h", "d") means one of it.
    let window = if w.starts_with(|c: char| c.is_ascii_digit()) {
        humantime::parse_duration(w)
    } else {
        humantime::parse_duration(&format!("1{w}"))
    }
    .map_err(|e| format!("`{w}` in `{s}` is not a duration ({e}); use s, min, h or d"))?;
    if window.is_zero() {
        return Err(format!("`{s}` has a zero window"));
    }
    Ok(Per { count, window })
}

/// When throttle replies trigger a back-off.
#[derive(Debug, Clone, PartialEq)]
pub enum Threshold {
    /// This many within the window: `"3/10min"`.
    Count(Per),
    /// This share of the replies over the last `SHARE_WINDOW_S` seconds, beyond
    /// statistical doubt (the 95% lower bound; at least `SHARE_MIN_REPLIES`): `"5%"`.
    /// At bulk rates a receiver's occasional throttle-worded reply is noise; a limit
    /// being hit is most replies.
    Share(f64),
}

pub const SHARE_WINDOW_S: usize = 10;
pub const SHARE_MIN_REPLIES: u32 = 50;

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Count(p) => write!(f, "{p}"),
            Threshold::Share(s) => write!(f, "{}% of replies", s * 100.0),
        }
    }
}

pub fn parse_threshold(s: &str) -> Result<Threshold, String> {
    match s.trim().strip_suffix('%') {
        Some(p) => match p.trim().parse::<f64>() {
            Ok(v) if v > 0.0 && v <= 100.0 => Ok(Threshold::Share(v / 100.0)),
            _ => Err(format!("`{s}`: a share is 0% < P <= 100%, e.g. \"5%\"")),
        },
        None => parse_per(s).map(Threshold::Count),
    }
}

/// What a `blocked` reaction suspends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockScope {
    /// The destination (provider or site) for every source address.
    Destination,
    /// Only the source address the block reply came to.
    Source,
}

/// Per-day message caps for a new source address, counted per provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Warmup {
    /// Day 1 of the schedule, in days since 1970-01-01 (UTC).
    pub start_day: i64,
    /// Messages per provider on day 1, 2, ...; none after the last day.
    pub per_day: Vec<u32>,
}

impl Warmup {
    /// Today's cap (day 1's before the schedule starts), or None once it has run out.
    pub fn cap_on(&self, day: i64) -> Option<u32> {
        let i = (day - self.start_day).max(0) as usize;
        self.per_day.get(i).copied()
    }
}

macro_rules! rule_fields {
    ($m:ident) => {
        $m!(max_connections, u32);
        $m!(max_msg_rate, Per);
        $m!(connect_rate, Per);
        $m!(max_msgs_per_conn, u32);
        $m!(max_rcpt_per_msg, u32);
        $m!(idle_timeout, Duration);
        $m!(tls, TlsMode);
        $m!(tls_verify, bool);
        $m!(throttle_threshold, Threshold);
        $m!(throttle_factor, f64);
        $m!(throttle_recover, Duration);
        $m!(block_threshold, Per);
        $m!(block_suspend, Duration);
        $m!(block_scope, BlockScope);
        $m!(warmup, Warmup);
    };
}

/// One section's values; unset fields fall through to the section below it.
#[derive(Debug, Clone, Default)]
pub struct Rule {
    pub max_connections: Option<Set<u32>>,
    pub max_msg_rate: Option<Set<Per>>,
    pub connect_rate: Option<Set<Per>>,
    pub max_msgs_per_conn: Option<Set<u32>>,
    pub max_rcpt_per_msg: Option<Set<u32>>,
    pub idle_timeout: Option<Set<Duration>>,
    pub tls: Option<Set<TlsMode>>,
    pub tls_verify: Option<Set<bool>>,
    pub throttle_threshold: Option<Set<Threshold>>,
    pub throttle_factor: Option<Set<f64>>,
    pub throttle_recover: Option<Set<Duration>>,
    pub block_threshold: Option<Set<Per>>,
    pub block_suspend: Option<Set<Duration>>,
    pub block_scope: Option<Set<BlockScope>>,
    pub warmup: Option<Set<Warmup>>,
}

impl Rule {
    /// Values set in `over` replace this rule's.
    pub fn merge(&mut self, over: &Rule) {
        macro_rules! m {
            ($f:ident, $t:ty) => {
                if over.$f.is_some() {
                    self.$f = over.$f.clone();
                }
            };
        }
        rule_fields!(m);
    }

    pub fn merged(&self, over: Option<&Rule>) -> Rule {
        let mut r = self.clone();
        if let Some(o) = over {
            r.merge(o);
        }
        r
    }

    /// (key, value, where it was set) for every value set, in a fixed order.
    pub fn entries(&self) -> Vec<(&'static str, String, Arc<str>)> {
        let mut out = Vec::new();
        macro_rules! e {
            ($f:ident, $t:ty) => {
                if let Some(s) = &self.$f {
                    out.push((stringify!($f), show_value(&s.value), s.from.clone()));
                }
            };
        }
        rule_fields!(e);
        out
    }

    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }
}

trait ShowValue {
    fn show(&self) -> String;
}
impl ShowValue for u32 {
    fn show(&self) -> String {
        self.to_string()
    }
}
impl ShowValue for f64 {
    fn show(&self) -> String {
        self.to_string()
    }
}
impl ShowValue for bool {
    fn show(&self) -> String {
        self.to_string()
    }
}
impl ShowValue for Per {
    fn show(&self) -> String {
        format!("{self} ({:.3}/s)", self.per_sec())
    }
}
impl ShowValue for Threshold {
    fn show(&self) -> String {
        self.to_string()
    }
}
impl ShowValue for Duration {
    fn show(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
}
impl ShowValue for TlsMode {
    fn show(&self) -> String {
        format!("{self:?}").to_lowercase()
    }
}
impl ShowValue for BlockScope {
    fn show(&self) -> String {
        format!("{self:?}").to_lowercase()
    }
}
impl ShowValue for Warmup {
    fn show(&self) -> String {
        format!("from day {} per day {:?}", self.start_day, self.per_day)
    }
}
fn show_value<T: ShowValue>(v: &T) -> String {
    v.show()
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    /// MX host name suffixes, lowercase, without a leading dot.
    pub suffixes: Vec<String>,
    pub rule: Rule,
}

#[derive(Debug, Clone)]
pub struct PoolSource {
    pub ip: IpAddr,
    pub ehlo: Option<String>,
    pub weight: u32,
}

#[derive(Debug, Clone, Default)]
pub struct SourceRules {
    pub rule: Rule,
    pub providers: HashMap<String, Rule>,
}

/// Every layer merged: what the engine runs with.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub default: Rule,
    pub providers: Vec<Provider>,
    pub domains: HashMap<String, Rule>,
    pub sources: HashMap<IpAddr, SourceRules>,
    pub pools: HashMap<String, Vec<PoolSource>>,
    /// The pool of campaigns that name none (`default_pool = "NAME"` at the top).
    pub default_pool: Option<String>,
    /// The layers in merge order, for `shaping show`.
    pub layers: Vec<String>,
}

/// A bad value in a rules file, with where it is.
#[derive(Debug, Clone)]
pub struct Problem {
    pub at: String,
    pub msg: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.msg)
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SectionSpec {
    mx_suffixes: Option<Spanned<Vec<String>>>,
    max_connections: Option<Spanned<u32>>,
    max_msg_rate: Option<Spanned<String>>,
    connect_rate: Option<Spanned<String>>,
    max_msgs_per_conn: Option<Spanned<u32>>,
    max_rcpt_per_msg: Option<Spanned<u32>>,
    idle_timeout: Option<Spanned<String>>,
    tls: Option<Spanned<String>>,
    tls_verify: Option<Spanned<bool>>,
    throttle_threshold: Option<Spanned<String>>,
    throttle_factor: Option<Spanned<f64>>,
    throttle_recover: Option<Spanned<String>>,
    block_threshold: Option<Spanned<String>>,
    block_suspend: Option<Spanned<String>>,
    block_scope: Option<Spanned<String>>,
    warmup_start: Option<Spanned<String>>,
    warmup: Option<Spanned<Vec<u32>>>,
    /// Only under `[source."IP"]`.
    provider: Option<BTreeMap<String, SectionSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSourceSpec {
    ip: Spanned<String>,
    ehlo: Option<Spanned<String>>,
    weight: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSpec {
    sources: Vec<PoolSourceSpec>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    default: Option<SectionSpec>,
    #[serde(default)]
    provider: BTreeMap<String, SectionSpec>,
    #[serde(default)]
    domain: BTreeMap<String, SectionSpec>,
    #[serde(default)]
    source: BTreeMap<String, SectionSpec>,
    #[serde(default)]
    pool: BTreeMap<String, PoolSpec>,
    default_pool: Option<Spanned<String>>,
}

/// One file, parsed and checked on its own.
struct Layer {
    default: Rule,
    providers: Vec<Provider>,
    domains: Vec<(String, Rule)>,
    sources: Vec<(IpAddr, SourceRules)>,
    pools: Vec<(String, Vec<PoolSource>)>,
    default_pool: Option<(String, String)>,
}

struct Ctx<'a> {
    name: &'a str,
    text: &'a str,
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn at(&self, span: std::ops::Range<usize>) -> String {
        let line = self.text[..span.start.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1;
        format!("{}:{line}", self.name)
    }

    fn bad(&mut self, span: std::ops::Range<usize>, key: &str, msg: String) {
        let at = self.at(span);
        self.problems.push(Problem {
            at,
            msg: format!("{key}: {msg}"),
        });
    }

    fn set<T>(&self, span: std::ops::Range<usize>, value: T) -> Set<T> {
        Set {
            value,
            from: self.at(span).into(),
        }
    }

    /// Converts one checked value, or records why it is bad.
    fn conv<S, T>(
        &mut self,
        key: &str,
        v: &Option<Spanned<S>>,
        f: impl Fn(&S) -> Result<T, String>,
    ) -> Option<Set<T>> {
        let v = v.as_ref()?;
        match f(v.get_ref()) {
            Ok(t) => Some(self.set(v.span(), t)),
            Err(msg) => {
                self.bad(v.span(), key, msg);
                None
            }
        }
    }

    fn rule(&mut self, s: &SectionSpec) -> Rule {
        let positive = |n: &u32| {
            if *n == 0 {
                Err("must be at least 1".to_string())
            } else {
                Ok(*n)
            }
        };
        let duration = |d: &String| {
            humantime::parse_duration(d).map_err(|e| format!("`{d}` is not a duration ({e})"))
        };
        let per = |p: &String| parse_per(p);
        let warmup = match (&s.warmup, &s.warmup_start) {
            (Some(w), Some(start)) => {
                let day = parse_day(start.get_ref());
                match day {
                    Ok(d) if !w.get_ref().is_empty() && !w.get_ref().contains(&0) => {
                        Some(self.set(
                            w.span(),
                            Warmup {
                                start_day: d,
                                per_day: w.get_ref().clone(),
                            },
                        ))
                    }
                    Ok(_) => {
                        self.bad(
                            w.span(),
                            "warmup",
                            "give at least one day's cap, each at least 1".into(),
                        );
                        None
                    }
                    Err(msg) => {
                        self.bad(start.span(), "warmup_start", msg);
                        None
                    }
                }
            }
            (Some(w), None) => {
                self.bad(
                    w.span(),
                    "warmup",
                    "needs warmup_start = \"YYYY-MM-DD\" (day 1 of the schedule)".into(),
                );
                None
            }
            (None, Some(start)) => {
                self.bad(
                    start.span(),
                    "warmup_start",
                    "set without warmup = [day 1 cap, day 2 cap, ...]".into(),
                );
                None
            }
            (None, None) => None,
        };
        Rule {
            max_connections: self.conv("max_connections", &s.max_connections, positive),
            max_msg_rate: self.conv("max_msg_rate", &s.max_msg_rate, per),
            connect_rate: self.conv("connect_rate", &s.connect_rate, per),
            max_msgs_per_conn: self.conv("max_msgs_per_conn", &s.max_msgs_per_conn, positive),
            max_rcpt_per_msg: self.conv("max_rcpt_per_msg", &s.max_rcpt_per_msg, positive),
            idle_timeout: self.conv("idle_timeout", &s.idle_timeout, duration),
            tls: self.conv("tls", &s.tls, |t| match t.as_str() {
                "opportunistic" => Ok(TlsMode::Opportunistic),
                "required" => Ok(TlsMode::Required),
                "disabled" => Ok(TlsMode::Disabled),
                _ => Err(format!(
                    "`{t}`: use \"opportunistic\", \"required\" or \"disabled\""
                )),
            }),
            tls_verify: self.conv("tls_verify", &s.tls_verify, |b| Ok(*b)),
            throttle_threshold: self.conv("throttle_threshold", &s.throttle_threshold, |t| {
                parse_threshold(t)
            }),
            throttle_factor: self.conv("throttle_factor", &s.throttle_factor, |f| {
                if *f > 0.0 && *f < 1.0 {
                    Ok(*f)
                } else {
                    Err(format!("{f}: must be between 0 and 1 (0.5 halves)"))
                }
            }),
            throttle_recover: self.conv("throttle_recover", &s.throttle_recover, duration),
            block_threshold: self.conv("block_threshold", &s.block_threshold, per),
            block_suspend: self.conv("block_suspend", &s.block_suspend, duration),
            block_scope: self.conv("block_scope", &s.block_scope, |t| match t.as_str() {
                "destination" => Ok(BlockScope::Destination),
                "source" => Ok(BlockScope::Source),
                _ => Err(format!("`{t}`: use \"destination\" or \"source\"")),
            }),
            warmup,
        }
    }

    /// Keys that only make sense in some sections.
    fn only_in(&mut self, s: &SectionSpec, provider_section: bool, source_section: bool) {
        if let (Some(m), false) = (&s.mx_suffixes, provider_section) {
            self.bad(
                m.span(),
                "mx_suffixes",
                "only a [provider.NAME] section matches MX hosts".into(),
            );
        }
        if s.provider.is_some() && !source_section {
            self.problems.push(Problem {
                at: self.name.to_string(),
                msg: "a `provider` table is only allowed under [source.\"IP\"]".into(),
            });
        }
    }
}

/// "YYYY-MM-DD" → days since 1970-01-01.
pub fn parse_day(s: &str) -> Result<i64, String> {
    let bad = || format!("`{s}` is not a date; write YYYY-MM-DD");
    let mut it = s.trim().splitn(3, '-');
    let (y, m, d) = (
        it.next()
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or_else(bad)?,
        it.next()
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or_else(bad)?,
        it.next()
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or_else(bad)?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok(era * 146097 + doe - 719468)
}

fn parse_layer(name: &str, text: &str) -> Result<Layer, Vec<Problem>> {
    let spec: FileSpec = toml::from_str(text).map_err(|e| {
        let at = match e.span() {
            Some(span) => Ctx {
                name,
                text,
                problems: vec![],
            }
            .at(span),
            None => name.to_string(),
        };
        vec![Problem {
            at,
            msg: e.message().to_string(),
        }]
    })?;
    let mut cx = Ctx {
        name,
        text,
        problems: Vec::new(),
    };
    let default = match &spec.default {
        Some(s) => {
            cx.only_in(s, false, false);
            cx.rule(s)
        }
        None => Rule::default(),
    };
    let mut providers = Vec::new();
    for (pname, s) in &spec.provider {
        cx.only_in(s, true, false);
        // The name is a `volley queue` target (provider:NAME, one word) and a
        // metrics label: letters, digits and . _ - alone.
        let word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if pname.is_empty() || !pname.chars().all(word) {
            let at = s.mx_suffixes.as_ref().map_or(0..0, |m| m.span());
            cx.bad(
                at,
                "provider",
                format!("the provider name {pname:?} is not one word of letters, digits, '.', '_' and '-'; it is what `volley queue pause provider:NAME` and the metrics' provider label name, so rename the [provider.NAME] table"),
            );
        }
        let suffixes: Vec<String> = s
            .mx_suffixes
            .as_ref()
            .map(|m| {
                m.get_ref()
                    .iter()
                    .map(|x| x.trim().trim_start_matches('.').to_ascii_lowercase())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(m) = &s.mx_suffixes {
            if suffixes.iter().any(|x| x.is_empty() || !x.contains('.')) {
                cx.bad(
                    m.span(),
                    "mx_suffixes",
                    "each suffix needs at least two labels, e.g. \"google.com\"".into(),
                );
            }
        }
        let rule = cx.rule(s);
        providers.push(Provider {
            name: pname.clone(),
            suffixes,
            rule,
        });
    }
    let mut domains = Vec::new();
    for (d, s) in &spec.domain {
        cx.only_in(s, false, false);
        let rule = cx.rule(s);
        domains.push((d.trim_end_matches('.').to_ascii_lowercase(), rule));
    }
    let mut sources = Vec::new();
    for (ip, s) in &spec.source {
        cx.only_in(s, false, true);
        let rule = cx.rule(s);
        let mut per = HashMap::new();
        for (pname, ps) in s.provider.iter().flatten() {
            cx.only_in(ps, false, false);
            per.insert(pname.clone(), cx.rule(ps));
        }
        match ip.parse::<IpAddr>() {
            Ok(addr) => sources.push((
                addr,
                SourceRules {
                    rule,
                    providers: per,
                },
            )),
            Err(_) => cx.problems.push(Problem {
                at: name.to_string(),
                msg: format!("[source.\"{ip}\"]: `{ip}` is not an IP address"),
            }),
        }
    }
    let mut pools = Vec::new();
    for (pname, p) in &spec.pool {
        let mut list = Vec::new();
        for s in &p.sources {
            let weight = match &s.weight {
                Some(w) if *w.get_ref() == 0 => {
                    cx.bad(w.span(), "weight", "must be at least 1".into());
                    1
                }
                Some(w) => *w.get_ref(),
                None => 1,
            };
            // Held to `--ehlo`'s rule: an FQDN or an address literal (RFC 5321 §4.1.1.1).
            let ehlo = s.ehlo.as_ref().and_then(|e| {
                match crate::smtp::names::check_ehlo_name(e.get_ref()) {
                    Ok(n) if n == *e.get_ref() => Some(n),
                    Ok(n) => {
                        cx.bad(
                            e.span(),
                            "ehlo",
                            format!("write {n:?}, without the final dot"),
                        );
                        None
                    }
                    Err(err) => {
                        cx.bad(e.span(), "ehlo", err.to_string());
                        None
                    }
                }
            });
            match s.ip.get_ref().parse::<IpAddr>() {
                Ok(ip) => list.push(PoolSource { ip, ehlo, weight }),
                Err(_) => cx.bad(
                    s.ip.span(),
                    "ip",
                    format!("`{}` is not an IP address", s.ip.get_ref()),
                ),
            }
        }
        if list.is_empty() {
            cx.problems.push(Problem {
                at: name.to_string(),
                msg: format!("[pool.{pname}] has no usable source address"),
            });
        }
        pools.push((pname.clone(), list));
    }
    let default_pool = spec
        .default_pool
        .as_ref()
        .map(|p| (p.get_ref().clone(), cx.at(p.span())));
    if cx.problems.is_empty() {
        Ok(Layer {
            default,
            providers,
            domains,
            sources,
            pools,
            default_pool,
        })
    } else {
        Err(cx.problems)
    }
}

/// Checks one rules file on its own (`volley shaping check`).
pub fn check_file(path: &Path) -> Result<(), Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Problem {
            at: path.display().to_string(),
            msg: format!("cannot read: {e}"),
        }]
    })?;
    parse_layer(&path.display().to_string(), &text).map(|_| ())
}

impl Rules {
    /// Shipped defaults, tuning/ profiles, the operator's file, then `cli` over `[default]`.
    pub fn load(operator: Option<&Path>, cli: &Rule) -> Result<Rules, Vec<Problem>> {
        let mut rules = Rules::default();
        rules.add(
            "shipped defaults (src/shaping/defaults.toml)",
            SHIPPED_DEFAULTS,
        )?;
        rules.add("tuning/providers.toml", SHIPPED_PROVIDERS)?;
        if let Some(p) = operator {
            let text = std::fs::read_to_string(p).map_err(|e| {
                vec![Problem {
                    at: p.display().to_string(),
                    msg: format!("cannot read the shaping rules: {e}"),
                }]
            })?;
            rules.add(&p.display().to_string(), &text)?;
        }
        if !cli.is_empty() {
            rules.default.merge(cli);
            rules.layers.push("command line".into());
        }
        Ok(rules)
    }

    /// Merges one more layer over what is there.
    pub fn add(&mut self, name: &str, text: &str) -> Result<(), Vec<Problem>> {
        let layer = parse_layer(name, text)?;
        self.default.merge(&layer.default);
        for p in layer.providers {
            match self.providers.iter_mut().find(|q| q.name == p.name) {
                Some(q) => {
                    if !p.suffixes.is_empty() {
                        q.suffixes = p.suffixes;
                    }
                    q.rule.merge(&p.rule);
                }
                None => self.providers.push(p),
            }
        }
        for (d, r) in layer.domains {
            self.domains.entry(d).or_default().merge(&r);
        }
        for (ip, s) in layer.sources {
            let e = self.sources.entry(ip).or_default();
            e.rule.merge(&s.rule);
            for (p, r) in s.providers {
                e.providers.entry(p).or_default().merge(&r);
            }
        }
        for (name, list) in layer.pools {
            self.pools.insert(name, list);
        }
        if let Some((pool, at)) = layer.default_pool {
            if !self.pools.contains_key(&pool) {
                return Err(vec![Problem {
                    at,
                    msg: format!(
                        "default_pool: no [pool.{pool}] is defined in this or an earlier layer"
                    ),
                }]);
            }
            self.default_pool = Some(pool);
        }
        self.layers.push(name.to_string());
        Ok(())
    }

    /// The provider whose MX suffix matches one of `mx_hosts` (in preference order);
    /// the longest matching suffix wins.
    pub fn provider_for<'a>(
        &self,
        mx_hosts: impl IntoIterator<Item = &'a str>,
    ) -> Option<&Provider> {
        for host in mx_hosts {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            let best = self
                .providers
                .iter()
                .flat_map(|p| p.suffixes.iter().map(move |s| (p, s)))
                .filter(|(_, s)| host == **s || host.ends_with(&format!(".{s}")))
                .max_by_key(|(_, s)| s.len());
            if let Some((p, _)) = best {
                return Some(p);
            }
        }
        None
    }

    /// The rule a session to `domain` (routed to `provider`) runs with:
    /// default, then provider, then domain.
    pub fn effective(&self, domain: &str, provider: Option<&Provider>) -> Rule {
        self.default
            .merged(provider.map(|p| &p.rule))
            .merged(self.domains.get(domain))
    }

    /// The rule one source address runs with towards one provider (or an unnamed
    /// site): its own limits, and the destination's reactions to throttle and block
    /// replies unless its own sections set them (the receiver throttles per sending IP,
    /// so the source is where a back-off lands).
    pub fn source_rule(&self, ip: IpAddr, provider: Option<&Provider>) -> Rule {
        let dest = self.default.merged(provider.map(|p| &p.rule));
        let mut rule = Rule {
            throttle_threshold: dest.throttle_threshold,
            throttle_factor: dest.throttle_factor,
            throttle_recover: dest.throttle_recover,
            block_threshold: dest.block_threshold,
            block_suspend: dest.block_suspend,
            block_scope: dest.block_scope,
            ..Rule::default()
        };
        if let Some(s) = self.sources.get(&ip) {
            rule.merge(&s.rule);
            if let Some(own) = provider.and_then(|p| s.providers.get(&p.name)) {
                rule.merge(own);
            }
        }
        rule
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units() {
        assert_eq!(parse_per("100/s").unwrap().per_sec(), 100.0);
        assert_eq!(parse_per("3000/min").unwrap().per_sec(), 50.0);
        assert_eq!(parse_per("3600/h").unwrap().per_sec(), 1.0);
        let t = parse_per("3/10min").unwrap();
        assert_eq!((t.count, t.window), (3.0, Duration::from_secs(600)));
        assert!(parse_per("fast").is_err());
        assert!(parse_per("0/s").is_err());
        assert!(parse_per("5/fortnightish").is_err());
    }

    #[test]
    fn days_count_from_the_epoch() {
        assert_eq!(parse_day("1970-01-01"), Ok(0));
        assert_eq!(parse_day("2026-11-25"), Ok(20782));
        assert!(parse_day("2026-13-01").is_err());
    }

    #[test]
    fn every_bad_value_is_named_with_its_line() {
        let text = "[default]\nmax_connections = 0\n\n[provider.x]\nmx_suffixes = [\"x.test\"]\nmax_msg_rate = \"lots\"\ntls = \"maybe\"\n";
        let errs = parse_layer("r.toml", text).err().unwrap();
        let shown: Vec<String> = errs.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown.len(), 3, "{shown:?}");
        assert!(
            shown[0].starts_with("r.toml:2: max_connections"),
            "{shown:?}"
        );
        assert!(shown[1].starts_with("r.toml:6: max_msg_rate"), "{shown:?}");
        assert!(shown[2].starts_with("r.toml:7: tls"), "{shown:?}");
    }

    #[test]
    fn a_provider_name_must_be_one_word() {
        let text = "[provider.\"e\\\"vil x\"]\nmx_suffixes = [\"x.test\"]\n";
        let errs = parse_layer("r.toml", text).err().unwrap();
        assert!(errs[0].msg.contains("not one word"), "{errs:?}");
        assert!(parse_layer(
            "r.toml",
            "[provider.google-sink_2]\nmx_suffixes = [\"x.test\"]\n"
        )
        .is_ok());
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let errs = parse_layer("r.toml", "[provider.x]\n\nmax_conections = 3\n")
            .err()
            .unwrap();
        assert!(errs[0].at == "r.toml:3", "{errs:?}");
        assert!(errs[0].msg.contains("max_conections"), "{errs:?}");
    }

    #[test]
    fn a_default_pool_must_be_defined() {
        let mut r = Rules::default();
        let e = r.add("a.toml", "default_pool = \"warm\"\n").unwrap_err();
        assert_eq!(e[0].at, "a.toml:1");
        assert!(e[0].msg.contains("[pool.warm]"), "{e:?}");
        r.add(
            "b.toml",
            "default_pool = \"warm\"\n[pool.warm]\nsources = [{ ip = \"127.0.0.2\" }]\n",
        )
        .unwrap();
        assert_eq!(r.default_pool.as_deref(), Some("warm"));
    }

    #[test]
    fn layers_merge_and_remember_where_values_came_from() {
        let mut r = Rules::load(None, &Rule::default()).unwrap();
        r.add(
            "ops.toml",
            "[provider.google]\nmax_connections = 7\n[domain.\"gmail.com\"]\nmax_msg_rate = \"10/s\"\n",
        )
        .unwrap();
        let g = r
            .provider_for(["alt1.gmail-smtp-in.l.google.com."])
            .unwrap();
        assert_eq!(g.name, "google");
        let e = r.effective("gmail.com", Some(g));
        let conns = e.max_connections.unwrap();
        assert_eq!((conns.value, &*conns.from), (7, "ops.toml:2"));
        assert_eq!(e.max_msg_rate.unwrap().value.per_sec(), 10.0);
        // Not overridden: still the tuning profile's value and line.
        assert!(e
            .throttle_threshold
            .unwrap()
            .from
            .starts_with("tuning/providers.toml:"));
        assert!(r.provider_for(["mx.example.org"]).is_none());
    }

    #[test]
    fn a_source_reacts_as_its_destination_unless_it_says_otherwise() {
        let mut r = Rules::load(None, &Rule::default()).unwrap();
        r.add(
            "ops.toml",
            "[default]\nthrottle_threshold = \"15%\"\n\
             [source.\"127.0.0.2\"]\nmax_msg_rate = \"5/s\"\n\
             [source.\"127.0.0.2\".provider.x]\nthrottle_threshold = \"2/1min\"\n\
             [provider.x]\nmx_suffixes = [\"x.test\"]\n",
        )
        .unwrap();
        let ip = "127.0.0.2".parse().unwrap();
        let other = r.source_rule("127.0.0.3".parse().unwrap(), None);
        let t = other.throttle_threshold.unwrap();
        assert_eq!((t.value, &*t.from), (Threshold::Share(0.15), "ops.toml:2"));
        assert!(other.max_msg_rate.is_none() && other.block_threshold.is_some());
        let own = r.source_rule(ip, None);
        assert_eq!(own.max_msg_rate.unwrap().value.per_sec(), 5.0);
        let x = r.provider_for(["mx.x.test"]);
        let t = r.source_rule(ip, x).throttle_threshold.unwrap();
        assert_eq!(&*t.from, "ops.toml:6");
    }
}
