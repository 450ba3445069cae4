//! `volley serve`'s configuration file (TOML): everything `volley send`'s engine flags
//! set, plus the listeners that take mail in (SMTP submission, HTTP, pickup directory)
//! and their limits. [`ServeConfig::load`] lists every problem in the file, each with
//! its line; flags given to `serve` then replace the file's values
//! ([`ServeConfig::apply`]), and [`ServeConfig::check`] checks the result as a whole.
//!
//! The file is read into a tree of values that keep their byte spans and checked key by
//! key, rather than deserialized straight into structs: serde stops at the first unknown
//! key or wrong type, and an operator fixing a file wants them all at once.

use crate::deliver::config::EngineConfig;
use crate::deliver::dns::DnsConfig;
use crate::deliver::runtime::Driver;
use crate::host::accounts::Group;
use crate::observe::rotation::Rotation;
use crate::policy::retry::RetryPolicy;
use crate::policy::shaping::rules::{parse_per, Rule, Set};
use crate::serve::webhook::{self, Webhook};
use crate::smtp::client::{Timeouts, TlsMode};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The spool when neither the file nor `--spool` names one (as `volley send`).
pub const DEFAULT_SPOOL: &str = "/var/spool/volley";
/// The header that maps a submitted message to a campaign (PowerMTA's is `x-job`).
pub const DEFAULT_CAMPAIGN_HEADER: &str = "X-Campaign-ID";
/// RFC 5322 §2.1.1: a line is at most 998 octets before its CRLF.
pub const RFC5322_LINE_OCTETS_MAX: u64 = 998;

/// A complete configuration file: every key, its default, and what happens at each
/// limit. `volley serve --example` is expected to print it; a test loads it.
pub const EXAMPLE: &str = r#"# volley serve configuration. Every key is shown with its default, except the files
# (users, tokens, tls_cert, tls_key: example paths; unset by default) and the
# [http] and [pickup] tables (off unless present); keys commented out are unset. A
# flag given to `volley serve` replaces the file's value. Relative paths are taken
# from this file's directory. Sizes are bytes (10485760) or a string with a unit
# ("10MiB", "10MB"); durations are strings ("30s", "5m", "1h"). `volley config check
# FILE` lists every problem with its line (it does not open the files named).

# --- Where things are -----------------------------------------------------------
spool = "/var/spool/volley"        # --spool; created if missing
# user = "volley"                  # started as root: bind the listeners and read
                                   # tls_key as root, then run as this user, which must
                                   # own the spool and the log's directory (missing ones
                                   # are made its own). Unset: run as whoever starts it
                                   # (as root, with a warning); set but not root: must
                                   # already be this user
# group = "volley"                 # with user: default the user's primary group
# log = "/var/spool/volley/accounting.jsonl"   # default SPOOL/accounting.jsonl
log_rotate_size = "1GiB"           # rotate the log before it passes this (0: never for
                                   # size; else 64KiB to 1TiB) to LOG.YYYYMMDDTHHMMSSZ,
                                   # then gzip it (LOG.YYYYMMDDTHHMMSSZ.gz)
log_rotate_daily = true            # ...and at the first record of each UTC day
log_keep_days = 30                 # rotated files last written longer ago are deleted
                                   # (0: kept for ever); logrotate's files are never touched
# log_group = "adm"                # the log and rotated files are 0640 in this group, for
                                   # log shippers; default the service user's group
# shards = 2                       # shard threads (1 to 1024); default the number of
                                   # cores. A spool keeps the count it was created with.
driver = "auto"                    # auto | io-uring | epoll (auto: io_uring if it works)
dkim_dir = "/etc/volley/dkim"      # DKIM keys: DIR/DOMAIN/SELECTOR.pem
# shaping = "/etc/volley/shaping.toml"          # your rules, over the shipped ones
# bounce_rules = "/etc/volley/bounce-rules.toml" # your reply classification rules

# --- DNS ------------------------------------------------------------------------
# dns = "127.0.0.1:5353"           # --dns; default the nameservers in /etc/resolv.conf
dns_timeout = "5s"                 # per query (1s to 60s); then the next attempt
dns_attempts = 2                   # (1 to 10); after the last, the site is deferred

# --- Delivery: what `volley send`'s flags set -----------------------------------
smtp_port = 25                     # --smtp-port; the port dialled at the MX
# ehlo_name = "mta1.example.net"   # an FQDN (the sending address's reverse-DNS name) or
                                   # an address literal [192.0.2.1]; default the host name
# These five are the shaping rules' [default], merged over them as --max-conns-per-site
# etc. are; unset, the shaping rules decide (the shipped values are shown):
# max_conns_per_site = 32          # connections per destination over all shards;
                                   # at it, work waits in the site's queue
# max_msgs_per_conn = 1000         # at it, the connection QUITs and another opens
# max_msg_rate = "100/s"           # per destination over all shards (none shipped);
                                   # the next message waits for its slot
# tls = "opportunistic"            # outbound STARTTLS: opportunistic | required | disabled
# tls_verify = false               # verify MX certificates (Mozilla roots, MX name)
mta_sts = true                     # honour MTA-STS (RFC 8461): a policy in enforce mode
                                   # means TLS, verified, to the MX hosts it names, or
                                   # nothing (deferred, class policy); see what a domain
                                   # gets with `volley tls show DOMAIN`
# tls_roots = "/etc/volley/ca.pem" # CAs (PEM) trusted besides the Mozilla roots wherever
                                   # a certificate is verified (a private CA)
# dane = false                     # honour DANE (RFC 7672): an MX host whose DNSSEC-signed
                                   # TLSA records exist gets mail only over TLS with a
                                   # certificate they name; a bogus or failed lookup
                                   # defers the host. Needs a nameserver that returns
                                   # DNSSEC records (volley validates them itself)
# dnssec_trust_anchor = "/etc/volley/root.key"  # DNSKEY records (zone-file lines) to
                                   # validate from instead of the IANA root keys
tls_rpt = true                     # TLS-RPT (RFC 8460): count TLS sessions to domains
                                   # with an MTA-STS policy per UTC day, and send each
                                   # domain its daily report where its _smtp._tls record
                                   # asks (https POST, or a DKIM-signed mail); off with
                                   # mta_sts = false
# tls_rpt_org = "EHLO_NAME"        # the report's organization-name (EHLO_NAME: ehlo_name,
                                   # or the host name)
# tls_rpt_contact = "postmaster@EHLO_NAME"  # the report's contact-info
# tls_rpt_from = "tlsrpt-noreply@EHLO_NAME" # From of mailed reports, signed with every
                                   # key of its domain under dkim_dir (no key: mailto:
                                   # reports fail, https: ones go)
window = 8                         # pipelined transactions per connection (1 to 256);
                                   # at it, no more are sent until one finishes
retry_schedule = "5m,10m,20m,40m,1h,2h,4h"   # --retry-schedule: for every reply class
                                   # without its own; the last delay repeats. Setting
                                   # it drops the shipped per-class schedules below,
                                   # as the flag does.
smtp_connect_timeout = "30s"       # then the next address, host, or the site is deferred
smtp_greeting_timeout = "5m"       # RFC 5321 §4.5.3.2; at any of these the connection
smtp_ehlo_timeout = "5m"           # is dropped and its messages are queued again
smtp_mail_timeout = "5m"
smtp_rcpt_timeout = "5m"
smtp_data_init_timeout = "2m"
smtp_data_done_timeout = "10m"
smtp_rset_timeout = "2m"
smtp_quit_timeout = "30s"
requeues_max = 3                   # (0 to 100) a recipient whose connection broke before
                                   # its reply is queued again this often, not counted as
                                   # an attempt; past it a break counts as a deferral

# --- Spool ----------------------------------------------------------------------
segment_size = "64MiB"             # spool segment file, preallocated (1MiB to 1GiB);
                                   # when full, a new one is started
commit_interval = "10ms"           # outcomes are written (log, then spool) this often
commit_batch_max = 256             # ...or when this many wait (1 to 65536)
sync_interval = "100ms"            # the spool is msynced this often: the power-loss window

# --- The service ----------------------------------------------------------------
shutdown_grace = "30s"             # on SIGTERM the listeners stop accepting; transactions
                                   # in flight and the shards' connections get this long
                                   # (0s to 1h), then are dropped (their messages stay queued)
inbox_max = 10000                  # messages waiting in each shard's injection inbox
                                   # (1 to 1000000; a campaign comes in batches of up to
                                   # 4096 records); SMTP that finds it full waits...
inbox_wait_max = "10s"             # ...this long (0s to 10m), then answers 452 4.3.1;
                                   # a campaign waits 30 s, then HTTP 503 with Retry-After
spool_free_min = "256MiB"          # free space kept on the spool's file system for delivery
                                   # (Done records, the log): below it plus the message,
                                   # injection is refused (452 4.3.1, HTTP 503); 0 to 1TiB
spool_retention = "7d"             # a campaign whose recipients are all final keeps its
                                   # copy in the spool this long, then it is pruned (a
                                   # tombstone stays; the accounting log is kept); 0s to 3650d
users = "/etc/volley/users"        # submission AUTH users: NAME:ARGON2ID-PHC per line
tokens = "/etc/volley/tokens"      # HTTP API tokens (SHA-256), one per line
# admin_group = "volley-admin"     # may use the admin socket (`volley queue`) besides
                                   # root and the user volley runs as: the socket is
                                   # made 0660 and the spool 0710, both this group's;
                                   # unset, the socket is 0600. The group must exist.
tls_cert = "/etc/volley/cert.pem"  # the listeners' certificate chain and key (PEM):
tls_key = "/etc/volley/key.pem"    # both or neither

# Per reply class (see `volley classify`), as --retry-schedule-for CLASS=...:
# these are the shipped ones.
[retry_schedule_for]
throttled = "1m,2m,4m,8m,15m,30m"
mailbox_full = "1h,2h,4h"
blocked = "30m,1h,2h,4h"

# --- SMTP submission listeners (repeat [[submission]] for more) -----------------
[[submission]]
listen = "0.0.0.0:587"             # required; --submission ADDR:PORT replaces them all
tls = "starttls"                   # starttls | implicit (port 465, RFC 8314) | none;
                                   # without tls_cert/tls_key: a self-signed
                                   # certificate made at start, with a warning
auth = "optional"                  # required: every client AUTHs; optional: clients in
                                   # relay_networks may skip it; none: no AUTH, only
                                   # relay_networks may send (others: 554 5.7.1 at RCPT)
auth_over_plaintext = false        # offer AUTH before TLS (only for tls = "none" on a
                                   # trusted network)
relay_networks = ["127.0.0.0/8", "::1/128"]     # who may skip AUTH (auth = optional)
                                   # or send at all (auth = none); no effect (and a
                                   # problem) with auth = required
message_size_max = "10MiB"         # advertised in SIZE; over it, 552 5.3.4 (1KiB to 1GiB)
recipients_max = 1000              # per message (100 to 100000; RFC 5321 §4.5.3.1.8);
                                   # past it, 452 4.5.3 and the client sends the rest again
line_length_max = 998              # octets per DATA line before CRLF (998 to 65536;
                                   # RFC 5322 §2.1.1); a longer line refuses the message
                                   # with 500 5.5.6 after its end (BDAT content: header
                                   # lines only, 998)
connections_max = 500              # open at once (1 to 100000); past it, 421 4.3.2 and close
connections_per_ip_max = 50        # from one client address (Postfix's default); past it, 421 4.7.0
commands_max = 10000               # per connection (10 to 1000000); past it, 421 4.7.0
                                   # and close (the client reconnects)
errors_max = 20                    # error replies per connection (1 to 1000; Postfix's
                                   # smtpd_hard_error_limit); past it, 421 4.7.0 and close
auth_failures_max = 3              # failed AUTH per connection (1 to 100); past it,
                                   # 421 4.7.0 and close
command_timeout = "5m"             # waiting for a command (1s to 1h; RFC 5321 §4.5.3.2.7
                                   # asks servers for at least 5m); then 421 4.4.2 and close
data_timeout = "10m"               # waiting for more content in DATA/BDAT (1s to 1h);
                                   # then 421 4.4.2, close, nothing accepted
hide_client_ip = false             # Received: without the client's name and address
campaign_header = "X-Campaign-ID"  # maps a message to a campaign; removed before sending

# --- HTTP injection API (delete the table to turn it off) -----------------------
[http]
listen = "127.0.0.1:8025"          # --http; needs tokens. No TLS: keep it on loopback or
                                   # behind a proxy that terminates TLS
body_size_max = "256MiB"           # request body (1KiB to 4GiB); over it, 413
connections_max = 64               # injection requests handled at once (1 to 100000);
                                   # past it, 503 with Retry-After
request_timeout = "5m"             # for a request body to arrive (1s to 1h); then 408

# --- Pickup directory (delete the table to turn it off) -------------------------
[pickup]
dir = "/var/spool/volley/pickup"   # --pickup; default SPOOL/pickup. Files moved in
                                   # atomically, envelope in X-Sender: / X-Receiver:
scan_interval = "5s"               # (100ms to 1h)
files_per_scan_max = 1000          # (1 to 1000000); the rest wait for the next scan
message_size_max = "10MiB"         # (1KiB to 1GiB); a larger file is moved to DIR/bad

# --- Event webhooks (repeat [[webhook]] for more; delete to turn off) -------------
# The accounting records POSTed as they are logged: a JSON array of the log's lines.
# At least once: a cursor (SPOOL/webhooks/NAME.cursor) moves after each 2xx.
[[webhook]]
name = "crm"                       # required: a-z, 0-9, '-', '_' (1 to 64); names the
                                   # cursor, the dead letters and the metrics
url = "https://crm.example.com/volley"  # required: http:// or https:// (Mozilla roots)
events = ["Delivery", "TransientFailure", "Bounce", "Expiration"]   # record types
                                   # sent, of Reception, Delivery, TransientFailure,
                                   # Bounce, Expiration, Shaping; default all
batch_size = 100                   # records per POST (1 to 10000)
batch_wait = "1s"                  # ...or fewer once the first waited this (0s to 1m)
timeout = "30s"                    # per POST, connecting included (1s to 10m)
retry_wait_max = "5m"              # failed POSTs are retried after 1s, doubling to
                                   # this (1s to 1h), with jitter, for ever; a batch
                                   # rejected 5 times (3xx, 4xx but 408 and 429) goes
                                   # to SPOOL/webhooks/NAME.dead.jsonl
# bearer_token_file = "/etc/volley/crm.token"   # Authorization: Bearer TOKEN (0600)
hmac_secret_file = "/etc/volley/crm.hmac"       # X-Volley-Signature: sha256=HEX,
                                   # HMAC-SHA256 of the body (0600, 16+ octets)
# ca_file = "/etc/volley/crm-ca.pem"  # https: trust these CAs (PEM) instead of the
                                   # Mozilla roots (a receiver with a private CA)
"#;

/// Outbound shaping keys that set the shaping rules' `[default]`, as send's flags do.
const SHAPING_KEYS: [&str; 5] = [
    "max_conns_per_site",
    "max_msgs_per_conn",
    "max_msg_rate",
    "tls",
    "tls_verify",
];

/// The reply classes a `[retry_schedule_for]` key may name (`volley classify`).
const CLASSES: [&str; 10] = [
    "invalid_recipient",
    "mailbox_full",
    "mailbox_disabled",
    "throttled",
    "blocked",
    "auth_failed",
    "content",
    "policy",
    "transient_other",
    "permanent_other",
];

/// Everything `volley serve` runs with: the engine's settings and the listeners'.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub spool: PathBuf,
    /// The service user to drop to when started as root (`user`); None: stay.
    pub user: Option<String>,
    /// Its group (`group`); None: the user's primary group.
    pub group: Option<String>,
    /// None: SPOOL/accounting.jsonl (see [`ServeConfig::log_path`]).
    pub log: Option<PathBuf>,
    /// `log_rotate_size`, `log_rotate_daily`, `log_keep_days`, `log_group`.
    pub log_rotation: Rotation,
    /// None: the number of cores.
    pub shards: Option<usize>,
    pub driver: Driver,
    /// `dns`, `dns_timeout`, `dns_attempts`.
    pub dns: DnsConfig,
    pub smtp_port: u16,
    /// Honour MTA-STS policies (the engine's `mta_sts`).
    pub mta_sts: bool,
    /// CAs trusted besides webpki-roots' (the engine's `tls_roots`).
    pub tls_roots: Option<PathBuf>,
    /// `tls_rpt`, `tls_rpt_org`, `tls_rpt_contact`, `tls_rpt_from`.
    pub tls_rpt: TlsRpt,
    /// None: the host name (the engine's default, as for `send` without `--ehlo`).
    pub ehlo_name: Option<String>,
    pub dkim_dir: PathBuf,
    pub shaping: Option<PathBuf>,
    /// `max_conns_per_site`, `max_msgs_per_conn`, `max_msg_rate`, `tls`, `tls_verify`,
    /// each remembering its file and line (for `volley shaping show`).
    pub shaping_defaults: Rule,
    pub bounce_rules: Option<PathBuf>,
    pub window: usize,
    /// `retry_schedule` and `[retry_schedule_for]`.
    pub retry: RetryPolicy,
    pub smtp_connect_timeout: Duration,
    pub smtp_timeouts: Timeouts,
    pub requeues_max: u32,
    pub segment_bytes: usize,
    pub commit_interval: Duration,
    pub commit_batch_max: usize,
    pub sync_interval: Duration,
    /// SIGTERM: the listeners' transactions in flight and the shards' connections get
    /// this long (the engine's `shutdown_grace` too).
    pub shutdown_grace: Duration,
    /// Records waiting in one shard's injection inbox.
    pub inbox_max: usize,
    /// How long a listener waits for room in a full inbox before a temporary refusal.
    pub inbox_wait_max: Duration,
    /// Free octets kept on the spool's file system: injection is refused below it.
    pub spool_free_min: u64,
    /// How long a finished campaign instance keeps its copy in the spool
    /// (spool/retention.rs).
    pub spool_retention: Duration,
    /// AUTH users for the submission listeners.
    pub users: Option<PathBuf>,
    /// Tokens for the HTTP API.
    pub tokens: Option<PathBuf>,
    /// Who besides root and the user volley runs as may use the admin socket; the
    /// group is looked up when the file is read.
    pub admin_group: Option<Group>,
    /// The listeners' certificate chain and key (both or neither).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub submission: Vec<Submission>,
    pub http: Option<Http>,
    pub pickup: Option<Pickup>,
    /// `[[webhook]]`: where the accounting records are POSTed.
    pub webhooks: Vec<Webhook>,
    /// The file read, if any (for problems found after flags are applied).
    source: Option<PathBuf>,
    /// Where each key that [`ServeConfig::check`] may cite was set ("submission.0.auth").
    origins: BTreeMap<String, At>,
}

/// TLS reports (RFC 8460; deliver/tls_rpt.rs): counted and sent unless `tls_rpt =
/// false`. Each None: from the host name (`ehlo_name`).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsRpt {
    pub enabled: bool,
    /// `organization-name`; None: the host name.
    pub org: Option<String>,
    /// `contact-info`; None: postmaster@ the host name.
    pub contact: Option<String>,
    /// The From of mailed reports; None: tlsrpt-noreply@ the host name.
    pub from: Option<String>,
}

impl Default for TlsRpt {
    fn default() -> TlsRpt {
        TlsRpt {
            enabled: true,
            org: None,
            contact: None,
            from: None,
        }
    }
}

/// One SMTP submission listener (`[[submission]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub listen: SocketAddr,
    pub tls: ListenerTls,
    pub auth: Auth,
    /// Offer AUTH before TLS is up.
    pub auth_over_plaintext: bool,
    /// Clients that may send without AUTH (auth optional) or at all (auth none).
    pub relay_networks: Vec<IpNet>,
    /// Advertised in SIZE; larger: 552 5.3.4.
    pub message_size_max: u64,
    /// Per message; past it: 452 4.5.3.
    pub recipients_max: u32,
    /// Octets of one content line before CRLF; longer: 554 5.6.0.
    pub line_length_max: u32,
    pub connections_max: u32,
    pub connections_per_ip_max: u32,
    /// Commands per connection; past it: 421 and close.
    pub commands_max: u32,
    /// Error replies per connection; past it: 421 and close.
    pub errors_max: u32,
    /// Failed AUTH attempts per connection; past it: 421 4.7.0 and close.
    pub auth_failures_max: u32,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Received: without the client's name and address.
    pub hide_client_ip: bool,
    /// Maps a message to a campaign; removed before sending.
    pub campaign_header: String,
}

/// TLS on a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerTls {
    /// Offered with STARTTLS (RFC 3207).
    Starttls,
    /// TLS from the first byte (RFC 8314, port 465).
    Implicit,
    /// Never.
    None,
}

/// Whether a submission listener asks for AUTH (RFC 4954).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Every client authenticates.
    Required,
    /// Clients in `relay_networks` may skip it; others authenticate.
    Optional,
    /// No AUTH offered: clients in `relay_networks` send, others are refused (530 5.7.0).
    None,
}

/// The HTTP injection API (`[http]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Http {
    pub listen: SocketAddr,
    /// Larger request bodies: 413.
    pub body_size_max: u64,
    /// Injection requests handled at once; past it, 503 with Retry-After.
    pub connections_max: u32,
    /// How long a request body may take to arrive; then 408.
    pub request_timeout: Duration,
}

/// The pickup directory (`[pickup]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Pickup {
    /// None: SPOOL/pickup (see [`ServeConfig::pickup_dir`]).
    pub dir: Option<PathBuf>,
    pub scan_interval: Duration,
    /// Files taken per scan; the rest wait for the next.
    pub files_per_scan_max: u32,
    /// Larger files are moved to DIR/bad.
    pub message_size_max: u64,
}

/// `volley serve`'s flags: each given one replaces the file's value. `submission`, when
/// not empty, replaces all the file's `[[submission]]` listeners with ones on these
/// addresses that have every default (STARTTLS, AUTH required, relay_networks
/// loopback). `http` and `pickup` turn those on (keeping the file's other keys).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub spool: Option<PathBuf>,
    pub dns: Option<SocketAddr>,
    pub smtp_port: Option<u16>,
    pub submission: Vec<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub users: Option<PathBuf>,
    pub tokens: Option<PathBuf>,
    pub pickup: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// Where a problem is: a line of the file, the file, or a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    Line(PathBuf, usize),
    File(PathBuf),
    Flag(&'static str),
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Line(p, n) => write!(f, "{}:{n}", p.display()),
            At::File(p) => write!(f, "{}", p.display()),
            At::Flag(flag) => f.write_str(flag),
        }
    }
}

/// One problem: `FILE:LINE: key `x`: what is wrong; what to do`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: At,
    /// The key, with its table (`submission.listen`); empty for the file's syntax.
    pub key: String,
    pub msg: String,
}

impl Problem {
    pub fn line(&self) -> Option<usize> {
        match self.at {
            At::Line(_, n) => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.at, self.msg)
        } else {
            write!(f, "{}: key `{}`: {}", self.at, self.key, self.msg)
        }
    }
}

impl ServeConfig {
    /// Every default, for running from flags alone (the engine's are `volley send`'s,
    /// except `shutdown_grace`: a service gets longer to finish).
    pub fn defaults(spool: PathBuf) -> ServeConfig {
        let e = EngineConfig::new(spool.clone());
        ServeConfig {
            spool,
            user: None,
            group: None,
            log: None,
            log_rotation: e.log_rotation,
            shards: None,
            driver: e.driver,
            dns: e.dns,
            smtp_port: e.smtp_port,
            mta_sts: e.mta_sts,
            tls_roots: None,
            tls_rpt: TlsRpt::default(),
            ehlo_name: None,
            dkim_dir: e.dkim_dir,
            shaping: None,
            shaping_defaults: Rule::default(),
            bounce_rules: None,
            window: e.window,
            retry: e.retry,
            smtp_connect_timeout: e.connect_timeout,
            smtp_timeouts: e.timeouts,
            requeues_max: e.requeues_max,
            segment_bytes: e.segment_bytes,
            commit_interval: e.commit_interval,
            commit_batch_max: e.commit_batch_max,
            sync_interval: e.sync_interval,
            shutdown_grace: Duration::from_secs(30),
            inbox_max: 10_000,
            inbox_wait_max: Duration::from_secs(10),
            spool_free_min: 256 << 20,
            spool_retention: crate::spool::retention::SPOOL_RETENTION_DEFAULT,
            users: None,
            tokens: None,
            admin_group: None,
            tls_cert: None,
            tls_key: None,
            submission: Vec::new(),
            http: None,
            pickup: None,
            webhooks: Vec::new(),
            source: None,
            origins: BTreeMap::new(),
        }
    }

    /// Reads and checks a configuration file: every problem in it, each with its line
    /// (a file that is not TOML at all gives one: where its syntax breaks).
    pub fn load(path: &Path) -> Result<ServeConfig, Vec<Problem>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![Problem {
                at: At::File(path.to_path_buf()),
                key: String::new(),
                msg: format!("cannot read it ({e}); give the path of a readable file"),
            }]
        })?;
        ServeConfig::parse(path, &text)
    }

    /// As [`ServeConfig::load`], for text already read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<ServeConfig, Vec<Problem>> {
        let root: Node = toml::from_str(text).map_err(|e| {
            let at = match e.span() {
                Some(s) => At::Line(path.to_path_buf(), line_of(text, s.start)),
                None => At::File(path.to_path_buf()),
            };
            vec![Problem {
                at,
                key: String::new(),
                msg: format!("not valid TOML: {}", e.message().trim_end()),
            }]
        })?;
        let Node::Table(entries) = root else {
            unreachable!("a TOML document is a table")
        };
        let mut doc = Doc::new(path, text);
        let mut cfg = read_all(&mut doc, entries);
        cfg.source = Some(path.to_path_buf());
        cfg.origins = std::mem::take(&mut doc.origins);
        let mut problems = doc.problems;
        if let Err(p) = cfg.check() {
            problems.extend(p);
        }
        problems.sort_by_key(|p| p.line().unwrap_or(0));
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }

    /// The flags replace the file's values (see [`Overrides`]). Run
    /// [`ServeConfig::check`] afterwards: a flag can complete or break what the file set.
    pub fn apply(&mut self, o: Overrides) {
        let flag = |cfg: &mut ServeConfig, key: &str, f: &'static str| {
            cfg.origins.insert(key.to_string(), At::Flag(f));
        };
        if let Some(s) = o.spool {
            self.spool = s;
        }
        if let Some(d) = o.dns {
            self.dns.server = Some(d);
        }
        if let Some(p) = o.smtp_port {
            self.smtp_port = p;
        }
        for (slot, v, key, f) in [
            (&mut self.users, o.users, "users", "--users"),
            (&mut self.tokens, o.tokens, "tokens", "--tokens"),
            (&mut self.tls_cert, o.tls_cert, "tls_cert", "--tls-cert"),
            (&mut self.tls_key, o.tls_key, "tls_key", "--tls-key"),
        ] {
            if let Some(v) = v {
                *slot = Some(v);
                self.origins.insert(key.to_string(), At::Flag(f));
            }
        }
        if !o.submission.is_empty() {
            self.origins.retain(|k, _| !k.starts_with("submission."));
            self.submission = o.submission.into_iter().map(Submission::new).collect();
            for i in 0..self.submission.len() {
                flag(self, &format!("submission.{i}.listen"), "--submission");
            }
        }
        if let Some(addr) = o.http {
            match &mut self.http {
                Some(h) => h.listen = addr,
                None => self.http = Some(Http::new(addr)),
            }
            flag(self, "http.listen", "--http");
        }
        if let Some(dir) = o.pickup {
            self.pickup.get_or_insert_with(Pickup::default).dir = Some(dir);
            flag(self, "pickup.dir", "--pickup");
        }
    }

    /// What no single value shows: a certificate without its key, a listener that needs
    /// a file not given or that nobody could use, two listeners on one address.
    pub fn check(&self) -> Result<(), Vec<Problem>> {
        let mut out = Vec::new();
        self.check_tls_pair(&mut out);
        for (i, s) in self.submission.iter().enumerate() {
            self.check_submission(i, s, &mut out);
        }
        if self.http.is_some() && self.tokens.is_none() {
            out.push(self.problem(
                &["http.listen"],
                "tokens",
                "the HTTP API needs a tokens file, or anyone who reaches it could send mail; set tokens = \"/etc/volley/tokens\" (or --tokens), or remove [http]".into(),
            ));
        }
        self.check_addresses(&mut out);
        self.check_account(&mut out);
        self.check_group_membership(&mut out);
        if out.is_empty() {
            Ok(())
        } else {
            Err(out)
        }
    }

    /// The engine settings, as `volley send` builds them from its flags. The caller
    /// still checks what they point at before starting, as `send` does: the shaping
    /// rules (`EngineConfig::rules`), the bounce rules (`classify::load`) and, without
    /// `ehlo_name`, the host name.
    pub fn engine_config(&self) -> EngineConfig {
        let base = EngineConfig::new(self.spool.clone());
        EngineConfig {
            shards: self.shards.unwrap_or(base.shards),
            driver: self.driver,
            log_path: self.log_path(),
            log_rotation: self.log_rotation.clone(),
            spool_dir: self.spool.clone(),
            dns: self.dns.clone(),
            smtp_port: self.smtp_port,
            ehlo_name: self.ehlo_name.clone().unwrap_or(base.ehlo_name),
            dkim_dir: self.dkim_dir.clone(),
            shaping_file: self.shaping.clone(),
            defaults: self.shaping_defaults.clone(),
            window: self.window,
            retry: self.retry.clone(),
            connect_timeout: self.smtp_connect_timeout,
            timeouts: self.smtp_timeouts,
            segment_bytes: self.segment_bytes,
            commit_interval: self.commit_interval,
            commit_batch_max: self.commit_batch_max,
            sync_interval: self.sync_interval,
            requeues_max: self.requeues_max,
            bounce_rules: self.bounce_rules.clone(),
            shutdown_grace: self.shutdown_grace,
            admin_group: self.admin_group.clone(),
            spool_retention: self.spool_retention,
            mta_sts: self.mta_sts,
            https_port: base.https_port,
            tls_roots: self.tls_roots.clone(),
            tls_rpt: self.tls_rpt.enabled && self.mta_sts,
        }
    }

    /// The accounting log: `log`, or SPOOL/accounting.jsonl.
    pub fn log_path(&self) -> PathBuf {
        self.log
            .clone()
            .unwrap_or_else(|| self.spool.join("accounting.jsonl"))
    }

    /// The pickup directory when `[pickup]` is on: its `dir`, or SPOOL/pickup.
    pub fn pickup_dir(&self) -> Option<PathBuf> {
        let p = self.pickup.as_ref()?;
        Some(p.dir.clone().unwrap_or_else(|| self.spool.join("pickup")))
    }

    /// Where the first of `keys` that was set came from, else the file (or the flags).
    fn origin(&self, keys: &[&str]) -> At {
        keys.iter()
            .find_map(|k| self.origins.get(*k).cloned())
            .unwrap_or_else(|| match &self.source {
                Some(p) => At::File(p.clone()),
                None => At::Flag("volley serve"),
            })
    }

    fn problem(&self, keys: &[&str], key: &str, msg: String) -> Problem {
        Problem {
            at: self.origin(keys),
            key: key.into(),
            msg,
        }
    }

    fn check_tls_pair(&self, out: &mut Vec<Problem>) {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => out.push(self.problem(
                &["tls_cert"],
                "tls_cert",
                "given without tls_key; set both (the private key of this certificate, PEM), or neither".into(),
            )),
            (None, Some(_)) => out.push(self.problem(
                &["tls_key"],
                "tls_key",
                "given without tls_cert; set both (the certificate chain, PEM), or neither"
                    .into(),
            )),
            _ => {}
        }
    }

    fn check_submission(&self, i: usize, s: &Submission, out: &mut Vec<Problem>) {
        let key = |k: &str| format!("submission.{i}.{k}");
        let (listen, auth, nets) = (key("listen"), key("auth"), key("relay_networks"));
        if s.auth == Auth::Required && self.users.is_none() {
            out.push(self.problem(&[&auth, &listen], "submission.auth", format!(
                "\"{}\" on {} needs a users file; set users = \"/etc/volley/users\" (or --users), or auth = \"none\" with relay_networks",
                s.auth.name(), s.listen
            )));
        }
        if s.auth == Auth::Required && s.tls == ListenerTls::None && !s.auth_over_plaintext {
            out.push(self.problem(&[&auth, &listen], "submission.auth", format!(
                "\"{}\" on {} with tls = \"none\": AUTH is only offered after TLS, so it never is; set tls_cert/tls_key and tls = \"starttls\", or auth_over_plaintext = true on a trusted network",
                s.auth.name(), s.listen
            )));
        }
        if s.auth == Auth::None && s.relay_networks.is_empty() {
            out.push(self.problem(&[&nets, &auth, &listen], "submission.relay_networks", format!(
                "empty with auth = \"none\": {} would refuse every client; list the networks that may send, or use auth",
                s.listen
            )));
        }
        if s.auth == Auth::Required && matches!(self.origins.get(&nets), Some(At::Line(..))) {
            out.push(self.problem(&[&nets], "submission.relay_networks",
                "has no effect with auth = \"required\"; set auth = \"optional\" to let these networks send without AUTH, or remove it".into()));
        }
        if s.connections_per_ip_max > s.connections_max {
            out.push(self.problem(
                &[&key("connections_per_ip_max"), &listen],
                "submission.connections_per_ip_max",
                format!(
                    "{} is more than connections_max ({}); make it at most that",
                    s.connections_per_ip_max, s.connections_max
                ),
            ));
        }
    }

    /// `user` and `group` name accounts of this host (a file written for another host
    /// is refused here rather than at the drop); `group` alone is no drop.
    fn check_account(&self, out: &mut Vec<Problem>) {
        use crate::host::privilege::{lookup, PrivilegeError};
        let Some(user) = &self.user else {
            if self.group.is_some() {
                out.push(self.problem(&["group"], "group", "set without user: volley drops to a user and its group, not to a group alone; set user = \"volley\" too, or remove group".into()));
            }
            return;
        };
        match lookup(user, self.group.as_deref()) {
            Ok(_) => {}
            Err(e @ PrivilegeError::NoGroup(_)) => {
                out.push(self.problem(&["group"], "group", e.to_string()))
            }
            Err(e) => out.push(self.problem(&["user"], "user", e.to_string())),
        }
    }

    /// `admin_group` and `log_group`: volley gives the admin socket and the log to
    /// them, which only root or a member may do, so the user volley runs as (`user`,
    /// else whoever runs this) must be in each; otherwise the daemon would run with
    /// no admin socket, or not start.
    fn check_group_membership(&self, out: &mut Vec<Problem>) {
        use crate::host::accounts;
        let runner = match &self.user {
            Some(u) => match accounts::user_named(u) {
                Some((uid, _)) => uid,
                // Named by check_account.
                None => return,
            },
            None => accounts::euid(),
        };
        let both_on_spool = self.admin_group.is_some()
            && self.log_rotation.group.is_some()
            && self.log_path().parent() == Some(self.spool.as_path());
        if both_on_spool {
            // Each would take the spool's group for itself, and one loses its access.
            out.push(self.problem(
                &["log_group"],
                "log_group",
                "with admin_group set, the log must be outside the spool for log_group to reach it (both give the directory to their group); set log = \"/var/log/volley/accounting.jsonl\"".into(),
            ));
        }
        if runner == 0 {
            return;
        }
        let groups = accounts::groups_of(runner);
        let named = [
            ("admin_group", self.admin_group.clone()),
            ("log_group", self.log_rotation.group.clone()),
        ];
        for (key, group) in named {
            let Some(g) = group.filter(|g| !groups.contains(&g.gid)) else {
                continue;
            };
            let who = accounts::describe_user(runner);
            out.push(self.problem(
                &[key],
                key,
                format!(
                    "{who}, whom volley runs as, is not a member of group {}, so volley cannot give {} to it; add it ({}) or remove {key}",
                    g.name,
                    if key == "log_group" { "the log" } else { "the admin socket" },
                    accounts::join_group_fix(&g, runner)
                ),
            ));
        }
    }

    /// Where `key` (a top-level key, or `submission.0.listen`) was set: FILE:LINE, the
    /// file, or the flag; for errors found after the configuration was checked.
    pub fn at(&self, key: &str) -> At {
        self.origin(&[key])
    }

    /// Two listeners whose addresses would collide when bound.
    fn check_addresses(&self, out: &mut Vec<Problem>) {
        let mut seen: Vec<(SocketAddr, String, &str)> = Vec::new();
        let listeners = self
            .submission
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    s.listen,
                    format!("submission.{i}.listen"),
                    "submission.listen",
                )
            })
            .chain(
                self.http
                    .iter()
                    .map(|h| (h.listen, "http.listen".to_string(), "http.listen")),
            );
        for (addr, origin, key) in listeners {
            if let Some((other, o, _)) = seen.iter().find(|(a, _, _)| overlaps(*a, addr)) {
                out.push(self.problem(&[&origin], key, format!(
                    "{addr} collides with {other} (at {}): one address and port can have one listener; give each its own port or address",
                    self.origin(&[o])
                )));
            }
            seen.push((addr, origin, key));
        }
    }
}

/// Whether binding both would fail: the same port on the same address, or on the
/// wildcard address of the family (`[::]` covers IPv4 too, as Linux dual-stack does).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let covers =
        |w: IpAddr, x: IpAddr| w == x || (w.is_unspecified() && (w.is_ipv6() || x.is_ipv4()));
    covers(a.ip(), b.ip()) || covers(b.ip(), a.ip())
}

impl Submission {
    /// A listener on `listen` with every default (what `--submission` makes).
    pub fn new(listen: SocketAddr) -> Submission {
        Submission {
            listen,
            tls: ListenerTls::Starttls,
            auth: Auth::Optional,
            auth_over_plaintext: false,
            relay_networks: IpNet::loopback().to_vec(),
            message_size_max: 10 * 1024 * 1024,
            recipients_max: 1000,
            line_length_max: RFC5322_LINE_OCTETS_MAX as u32,
            connections_max: 500,
            connections_per_ip_max: 50,
            commands_max: 10_000,
            errors_max: 20,
            auth_failures_max: 3,
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(10 * 60),
            hide_client_ip: false,
            campaign_header: DEFAULT_CAMPAIGN_HEADER.into(),
        }
    }
}

impl Http {
    /// The API on `listen` with every default (what `--http` makes).
    pub fn new(listen: SocketAddr) -> Http {
        Http {
            listen,
            body_size_max: 256 * 1024 * 1024,
            connections_max: 64,
            request_timeout: Duration::from_secs(5 * 60),
        }
    }
}

impl Default for Pickup {
    fn default() -> Pickup {
        Pickup {
            dir: None,
            scan_interval: Duration::from_secs(5),
            files_per_scan_max: 1000,
            message_size_max: 10 * 1024 * 1024,
        }
    }
}

impl ListenerTls {
    const NAMES: &'static [(&'static str, ListenerTls)] = &[
        ("starttls", ListenerTls::Starttls),
        ("implicit", ListenerTls::Implicit),
        ("none", ListenerTls::None),
    ];

    pub fn name(self) -> &'static str {
        name_of(ListenerTls::NAMES, self)
    }
}

impl Auth {
    const NAMES: &'static [(&'static str, Auth)] = &[
        ("required", Auth::Required),
        ("optional", Auth::Optional),
        ("none", Auth::None),
    ];

    pub fn name(self) -> &'static str {
        name_of(Auth::NAMES, self)
    }
}

fn name_of<T: PartialEq + Copy>(names: &[(&'static str, T)], v: T) -> &'static str {
    names
        .iter()
        .find(|(_, t)| *t == v)
        .map(|(n, _)| *n)
        .expect("every variant is named")
}

// ---------------------------------------------------------------------------------
// Networks

/// An address block: an address and a prefix length (`10.0.0.0/8`, `2001:db8::/32`).
/// IPv4 addresses seen as IPv4-mapped IPv6 (`::ffff:10.1.2.3`, as a dual-stack socket
/// reports them) are matched as the IPv4 addresses they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a network does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetError {
    #[error(
        "`{0}` is not an address or ADDRESS/PREFIX; write e.g. \"10.0.0.0/8\" or \"2001:db8::/32\""
    )]
    Syntax(String),
    #[error(
        "`{given}`: prefix length {prefix_len} is past IPv{family}'s {max} bits; use 0 to {max}"
    )]
    Prefix {
        given: String,
        prefix_len: u32,
        family: u8,
        max: u8,
    },
    #[error("`{given}` has bits set past its prefix; did you mean \"{net}\"?")]
    HostBits { given: String, net: IpNet },
}

impl IpNet {
    /// `addr/prefix_len`; bits of `addr` past the prefix must be zero.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<IpNet, IpNetError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(IpNetError::Prefix {
                given: format!("{addr}/{prefix_len}"),
                prefix_len: prefix_len.into(),
                family: if addr.is_ipv4() { 4 } else { 6 },
                max,
            });
        }
        let (addr, prefix_len) = match addr {
            // A v4-mapped block is the IPv4 block it maps.
            IpAddr::V6(v6) if prefix_len >= 96 && v6.to_ipv4_mapped().is_some() => (
                IpAddr::V4(v6.to_ipv4_mapped().expect("checked")),
                prefix_len - 96,
            ),
            a => (a, prefix_len),
        };
        let net = IpNet {
            addr: masked(addr, prefix_len),
            prefix_len,
        };
        if net.addr != addr {
            return Err(IpNetError::HostBits {
                given: format!("{addr}/{prefix_len}"),
                net,
            });
        }
        Ok(net)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// 127.0.0.0/8 and ::1/128.
    pub fn loopback() -> [IpNet; 2] {
        [
            IpNet {
                addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
                prefix_len: 8,
            },
            IpNet {
                addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                prefix_len: 128,
            },
        ]
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) => masked(ip, self.prefix_len) == self.addr,
            // An IPv6 block (::/0, ::ffff:0:0/95) may hold the mapped IPv4 address.
            (IpAddr::V6(_), IpAddr::V4(v4)) => {
                masked(IpAddr::V6(v4.to_ipv6_mapped()), self.prefix_len) == self.addr
            }
            (IpAddr::V6(_), IpAddr::V6(_)) => masked(ip, self.prefix_len) == self.addr,
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }
}

/// `addr` with every bit past `prefix_len` cleared (`prefix_len` is in range).
fn masked(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;

    /// `ADDRESS/PREFIX`, or an address alone (/32 or /128).
    fn from_str(s: &str) -> Result<IpNet, IpNetError> {
        let syntax = || IpNetError::Syntax(s.to_string());
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().map_err(|_| syntax())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u32 = match p {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map_err(|_| syntax())?
            }
            Some(_) => return Err(syntax()),
            None => max,
        };
        if prefix_len > max {
            return Err(IpNetError::Prefix {
                given: s.to_string(),
                prefix_len,
                family: if addr.is_ipv4() { 4 } else { 6 },
                max: max as u8,
            });
        }
        IpNet::new(addr, prefix_len as u8).map_err(|e| match e {
            IpNetError::HostBits { net, .. } => IpNetError::HostBits {
                given: s.to_string(),
                net,
            },
            e => e,
        })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

// ---------------------------------------------------------------------------------
// Reading the file: a tree of spanned values, then one key at a time.

/// A TOML value whose parts keep their byte spans.
#[derive(Clone)]
enum Node {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Array(Vec<Sp<Node>>),
    Table(Entries),
}

/// A table's keys and values, in the file's order.
type Entries = Vec<(Sp<String>, Sp<Node>)>;

/// A value and its byte span in the file, when toml knows it.
///
/// Not `toml::Spanned`: toml has no span for a table made by dotted keys
/// (`http.listen = ...`), and `Spanned` then fails the whole file. `Sp` speaks the same
/// protocol (serde_spanned 0.6: asked for the struct below, toml answers a map of its
/// three fields when it knows the span) and takes a plain value otherwise; such a value
/// is given its key's span.
#[derive(Clone)]
struct Sp<T> {
    span: Option<Range<usize>>,
    value: T,
}

const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_FIELDS: &[&str] = &[
    SPANNED_START,
    "$__serde_spanned_private_end",
    "$__serde_spanned_private_value",
];

impl<T> Sp<T> {
    fn span(&self) -> Range<usize> {
        self.span.clone().unwrap_or(0..0)
    }
    fn get_ref(&self) -> &T {
        &self.value
    }
    fn into_inner(self) -> T {
        self.value
    }
}

/// The rest of the span protocol's map, once its first key (the start field) is read.
fn spanned_rest<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    mut map: A,
) -> Result<Sp<T>, A::Error> {
    let start: usize = map.next_value()?;
    let _: Option<String> = map.next_key()?;
    let end: usize = map.next_value()?;
    let _: Option<String> = map.next_key()?;
    let value = map.next_value()?;
    Ok(Sp {
        span: Some(start..end),
        value,
    })
}

/// A table's entries, its first key already read.
fn table_rest<'de, A: MapAccess<'de>>(
    mut key: Option<Sp<String>>,
    mut map: A,
) -> Result<Entries, A::Error> {
    let mut v = Vec::new();
    while let Some(k) = key {
        let mut value: Sp<Node> = map.next_value()?;
        if value.span.is_none() {
            value.span = k.span.clone();
        }
        v.push((k, value));
        key = map.next_key()?;
    }
    Ok(v)
}

impl<'de> Deserialize<'de> for Sp<String> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Sp<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, v: &str) -> Result<Sp<String>, E> {
        Ok(Sp {
            span: None,
            value: v.to_string(),
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Sp<String>, A::Error> {
        let _: Option<String> = map.next_key()?;
        spanned_rest(map)
    }
}

impl<'de> Deserialize<'de> for Sp<Node> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, SpNodeVisitor)
    }
}

/// A node with its span (toml knew it) or without (anything else).
struct SpNodeVisitor;

macro_rules! unspanned {
    ($($f:ident($t:ty)),*) => {$(
        fn $f<E: serde::de::Error>(self, v: $t) -> Result<Sp<Node>, E> {
            Ok(Sp { span: None, value: NodeVisitor.$f(v)? })
        }
    )*};
}

impl<'de> Visitor<'de> for SpNodeVisitor {
    type Value = Sp<Node>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        NodeVisitor.expecting(f)
    }
    unspanned!(
        visit_bool(bool),
        visit_i64(i64),
        visit_u64(u64),
        visit_f64(f64),
        visit_str(&str),
        visit_string(String)
    );
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Sp<Node>, A::Error> {
        Ok(Sp {
            span: None,
            value: NodeVisitor.visit_seq(seq)?,
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Sp<Node>, A::Error> {
        match map.next_key::<Sp<String>>()? {
            Some(k) if k.span.is_none() && k.value == SPANNED_START => spanned_rest(map),
            first => Ok(Sp {
                span: None,
                value: Node::Table(table_rest(first, map)?),
            }),
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, number, boolean, array or table")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Node, E> {
        i64::try_from(v)
            .map(Node::Int)
            .map_err(|_| E::custom("integer too large"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = seq.next_element()? {
            v.push(x);
        }
        Ok(Node::Array(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let first = map.next_key()?;
        table_rest(first, map).map(Node::Table)
    }
}

impl Node {
    /// "a string", "an integer", ... for "found X" in a message.
    fn kind(&self) -> &'static str {
        match self {
            Node::Str(_) => "a string",
            Node::Int(_) => "an integer",
            Node::Float(_) => "a float",
            Node::Bool(_) => "a boolean",
            Node::Array(_) => "an array",
            // toml hands a date to a plain visitor as a table of one private key.
            Node::Table(t) if t.len() == 1 && t[0].0.value.starts_with("$__toml_private") => {
                "a date"
            }
            Node::Table(_) => "a table",
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The file being read and what was found in it.
struct Doc<'a> {
    path: &'a Path,
    text: &'a str,
    /// Relative paths in the file are taken from its directory.
    base: PathBuf,
    problems: Vec<Problem>,
    origins: BTreeMap<String, At>,
    /// Every key asked for, with its table (`submission.listen`): the file's vocabulary,
    /// which the tests find in EXAMPLE.
    #[cfg_attr(not(test), allow(dead_code))]
    known: Vec<String>,
}

impl<'a> Doc<'a> {
    fn new(path: &'a Path, text: &'a str) -> Doc<'a> {
        Doc {
            path,
            text,
            base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            problems: Vec::new(),
            origins: BTreeMap::new(),
            known: Vec::new(),
        }
    }

    fn at(&self, span: &Range<usize>) -> At {
        At::Line(self.path.to_path_buf(), line_of(self.text, span.start))
    }

    fn bad(&mut self, span: &Range<usize>, key: &str, msg: String) {
        let at = self.at(span);
        self.problems.push(Problem {
            at,
            key: key.to_string(),
            msg,
        });
    }
}

/// One table of the file, its keys taken one at a time; what is left is unknown.
struct Table {
    /// "" for the top level, else "submission", "http", ...
    name: &'static str,
    /// Prefix of this table's keys in `Doc::origins` ("submission.0.").
    origin: String,
    entries: Entries,
    used: Vec<bool>,
    asked: Vec<&'static str>,
    span: Range<usize>,
}

type Conv<'c, T> = &'c dyn Fn(&Node) -> Result<T, String>;

impl Table {
    fn new(name: &'static str, origin: String, entries: Entries, span: Range<usize>) -> Table {
        let used = vec![false; entries.len()];
        Table {
            name,
            origin,
            entries,
            used,
            asked: Vec::new(),
            span,
        }
    }

    fn full(&self, key: &str) -> String {
        if self.name.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.name)
        }
    }

    /// The value of `key`, if present; it is then known and no longer unknown.
    fn raw(&mut self, doc: &mut Doc, key: &'static str) -> Option<Sp<Node>> {
        self.asked.push(key);
        doc.known.push(self.full(key));
        let i = self.entries.iter().position(|(k, _)| k.get_ref() == key)?;
        self.used[i] = true;
        Some(self.entries[i].1.clone())
    }

    /// `key` converted, or None (absent, or bad: then the problem is recorded).
    fn get<T>(&mut self, doc: &mut Doc, key: &'static str, conv: Conv<T>) -> Option<T> {
        let v = self.raw(doc, key)?;
        match conv(v.get_ref()) {
            Ok(t) => {
                let at = doc.at(&v.span());
                doc.origins.insert(format!("{}{key}", self.origin), at);
                Some(t)
            }
            Err(msg) => {
                doc.bad(&v.span(), &self.full(key), msg);
                None
            }
        }
    }

    /// As `get`, into `slot` when present and good.
    fn put<T>(&mut self, doc: &mut Doc, key: &'static str, slot: &mut T, conv: Conv<T>) {
        if let Some(v) = self.get(doc, key, conv) {
            *slot = v;
        }
    }

    /// Each key nobody asked for is a problem, with the nearest known key.
    fn finish(self, doc: &mut Doc) {
        for (i, (k, _)) in self.entries.iter().enumerate() {
            if self.used[i] {
                continue;
            }
            let hint = match nearest(k.get_ref(), &self.asked) {
                Some(n) => format!("did you mean `{n}`?"),
                None => {
                    "remove it, or see the README's \"volley serve configuration\" for the keys"
                        .into()
                }
            };
            let place = if self.name.is_empty() {
                "the top level".to_string()
            } else {
                format!("[{}]", self.name)
            };
            doc.bad(
                &k.span(),
                &self.full(k.get_ref()),
                format!("unknown in {place}; {hint}"),
            );
        }
    }
}

/// The known key closest to a misspelt one: the same words in another order
/// (`max_message_size`), at most 2 edits, or one containing the other.
fn nearest<'k>(given: &str, known: &[&'k str]) -> Option<&'k str> {
    let given = given.to_ascii_lowercase().replace('-', "_");
    let words = |k: &str| {
        let mut w: Vec<String> = k.split('_').map(String::from).collect();
        w.sort();
        w
    };
    let given_words = words(&given);
    known
        .iter()
        .map(|k| {
            let d = if words(k) == given_words {
                0
            } else {
                edits(&given, k)
            };
            (d, *k)
        })
        .filter(|(d, k)| *d <= 2 || k.contains(given.as_str()) || given.contains(*k))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance (keys are short).
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != b[j]))
                .min(row[j] + 1)
                .min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

// --- Converters: a node to a typed value, or what is wrong and what to write ------

fn show(n: &Node) -> String {
    match n {
        Node::Str(s) => format!("{s:?}"),
        Node::Int(i) => i.to_string(),
        Node::Float(f) => f.to_string(),
        Node::Bool(b) => b.to_string(),
        Node::Array(_) => "[...]".into(),
        Node::Table(_) => "{...}".into(),
    }
}

fn wrong(n: &Node, want: &str) -> String {
    format!("{} is {}; write {want}", show(n), n.kind())
}

fn string(n: &Node) -> Result<String, String> {
    match n {
        Node::Str(s) => Ok(s.clone()),
        _ => Err(wrong(n, "a string in quotes")),
    }
}

fn boolean(n: &Node) -> Result<bool, String> {
    match n {
        Node::Bool(b) => Ok(*b),
        _ => Err(wrong(n, "true or false")),
    }
}

fn int_in(lo: u64, hi: u64) -> impl Fn(&Node) -> Result<u64, String> {
    move |n| match n {
        Node::Int(i) if (lo as i128..=hi as i128).contains(&i128::from(*i)) => Ok(*i as u64),
        Node::Int(i) => Err(format!("{i} is out of range; use {lo} to {hi}")),
        _ => Err(wrong(n, &format!("an integer from {lo} to {hi}"))),
    }
}

fn u32_in(lo: u32, hi: u32) -> impl Fn(&Node) -> Result<u32, String> {
    let f = int_in(lo.into(), hi.into());
    move |n| f(n).map(|v| v as u32)
}

fn usize_in(lo: usize, hi: usize) -> impl Fn(&Node) -> Result<usize, String> {
    let f = int_in(lo as u64, hi as u64);
    move |n| f(n).map(|v| v as usize)
}

fn show_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn duration_in(lo: Duration, hi: Duration) -> impl Fn(&Node) -> Result<Duration, String> {
    move |n| {
        let range = format!("{} to {}", show_duration(lo), show_duration(hi));
        let s = match n {
            Node::Str(s) => s,
            Node::Int(_) => {
                return Err(wrong(
                    n,
                    &format!(
                        "a duration with its unit in quotes, e.g. \"{}s\" ({range})",
                        show(n)
                    ),
                ))
            }
            _ => {
                return Err(wrong(
                    n,
                    &format!("a duration in quotes, e.g. \"30s\", \"5m\" ({range})"),
                ))
            }
        };
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            format!("{s:?} is not a duration ({e}); write e.g. \"30s\", \"5m\", \"1h\" ({range})")
        })?;
        if d < lo || d > hi {
            return Err(format!("{s:?} is out of range; use {range}"));
        }
        Ok(d)
    }
}

/// Bytes: an integer, or a string with a unit (B, KB/MB/GB in 1000s, KiB/MiB/GiB in 1024s).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "mb" | "m" => 1000 * 1000,
        "gb" | "g" => 1000 * 1000 * 1000,
        "tb" | "t" => 1000 * 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn show_size(n: u64) -> String {
    match n {
        n if n >= 1 << 40 && n % (1 << 40) == 0 => format!("{}TiB", n >> 40),
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => n.to_string(),
    }
}

fn size_in(lo: u64, hi: u64) -> impl Fn(&Node) -> Result<u64, String> {
    move |n| {
        let range = format!("{} to {}", show_size(lo), show_size(hi));
        let v = match n {
            Node::Int(i) if *i >= 0 => *i as u64,
            Node::Str(s) => parse_size(s).ok_or_else(|| {
                format!("{s:?} is not a size; write bytes (10485760) or a number and a unit: \"10MiB\", \"10MB\" ({range})")
            })?,
            _ => return Err(wrong(n, &format!("a size, e.g. \"10MiB\" ({range})"))),
        };
        if v < lo || v > hi {
            return Err(format!("{} is out of range; use {range}", show(n)));
        }
        Ok(v)
    }
}

/// ADDRESS:PORT, port 1 to 65535 (IPv6 in brackets).
fn socket_addr(n: &Node) -> Result<SocketAddr, String> {
    let s = string(n).map_err(|_| wrong(n, "\"ADDRESS:PORT\" in quotes, e.g. \"0.0.0.0:587\""))?;
    match s.trim().parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => Err(format!(
            "{s:?} has port 0 (a random port); give the port, 1 to 65535"
        )),
        Ok(a) => Ok(a),
        Err(_) => Err(match s.trim().rsplit_once(':') {
            Some((host, port))
                if port.bytes().all(|b| b.is_ascii_digit())
                    && !port.is_empty()
                    && host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() =>
            {
                format!("{s:?}: port {port} is out of range; use 1 to 65535")
            }
            _ => format!(
                "{s:?} is not ADDRESS:PORT; write e.g. \"0.0.0.0:587\" or \"[::]:587\" (an IP address, not a name)"
            ),
        }),
    }
}

fn one_of<T: Copy>(names: &'static [(&'static str, T)]) -> impl Fn(&Node) -> Result<T, String> {
    move |n| {
        let list = names
            .iter()
            .map(|(k, _)| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let s = string(n).map_err(|_| wrong(n, &format!("one of {list}")))?;
        names
            .iter()
            .find(|(k, _)| *k == s.trim())
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("{s:?} is not one of {list}; use one of them"))
    }
}

fn path_conv(base: PathBuf) -> impl Fn(&Node) -> Result<PathBuf, String> {
    move |n| match n {
        Node::Str(s) if !s.trim().is_empty() => Ok(base.join(s)),
        Node::Str(_) => Err("empty; give a path, or remove the key".into()),
        _ => Err(wrong(n, "a path in quotes")),
    }
}

/// "5m,10m,20m" or ["5m", "10m", "20m"].
fn schedule(n: &Node) -> Result<Vec<Duration>, String> {
    let text = match n {
        Node::Str(s) => s.clone(),
        Node::Array(a) => a
            .iter()
            .map(|x| string(x.get_ref()))
            .collect::<Result<Vec<_>, _>>()?
            .join(","),
        _ => return Err(wrong(n, "delays in quotes, e.g. \"5m,10m,20m\"")),
    };
    crate::policy::retry::parse_schedule(&text).map_err(|e| {
        format!("{e}; write delays separated by commas, e.g. \"5m,10m,20m\" (the last repeats)")
    })
}

/// A user or group name: not empty, no ':' or whitespace (useradd(8)'s rules are
/// stricter; whether it exists is [`ServeConfig::check`]'s question).
fn account_name(n: &Node) -> Result<String, String> {
    let s = string(n)?;
    if s.is_empty() || s.len() > 256 || s.contains(|c: char| c == ':' || c.is_whitespace()) {
        return Err(format!(
            "{s:?} is not a user or group name; write the name, e.g. \"volley\""
        ));
    }
    Ok(s)
}

fn ehlo(n: &Node) -> Result<String, String> {
    let s = string(n)?;
    crate::message::campaign::check_ehlo_name(&s).map_err(|e| e.to_string())
}

/// A header field name (RFC 5322 §3.6.8: printable ASCII but ':'), at most 64 octets.
fn header_name(n: &Node) -> Result<String, String> {
    let s = string(n)?;
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        return Err(format!(
            "{s:?} is not a header field name; write letters, digits and '-', at most 64, e.g. \"X-Campaign-ID\""
        ));
    }
    Ok(s)
}

// --- The file's sections -----------------------------------------------------------

/// Every key of the file, into the defaults.
fn read_all(doc: &mut Doc, entries: Entries) -> ServeConfig {
    let mut cfg = ServeConfig::defaults(PathBuf::from(DEFAULT_SPOOL));
    let mut top = Table::new("", String::new(), entries, 0..0);
    read_paths(doc, &mut top, &mut cfg);
    read_log(doc, &mut top, &mut cfg.log_rotation);
    read_delivery(doc, &mut top, &mut cfg);
    read_service(doc, &mut top, &mut cfg);
    read_listeners(doc, &mut top, &mut cfg);
    read_webhooks(doc, &mut top, &mut cfg);
    top.finish(doc);
    cfg
}

/// Keys whose value is a path or a place.
fn read_paths(doc: &mut Doc, t: &mut Table, cfg: &mut ServeConfig) {
    let path = path_conv(doc.base.clone());
    t.put(doc, "spool", &mut cfg.spool, &path);
    cfg.user = t.get(doc, "user", &account_name);
    cfg.group = t.get(doc, "group", &account_name);
    for (key, slot) in [
        ("log", &mut cfg.log),
        ("shaping", &mut cfg.shaping),
        ("bounce_rules", &mut cfg.bounce_rules),
        ("tls_roots", &mut cfg.tls_roots),
        ("users", &mut cfg.users),
        ("tokens", &mut cfg.tokens),
        ("tls_cert", &mut cfg.tls_cert),
        ("tls_key", &mut cfg.tls_key),
    ] {
        if let Some(p) = t.get(doc, key, &path) {
            *slot = Some(p);
        }
    }
    t.put(doc, "dkim_dir", &mut cfg.dkim_dir, &path);
    cfg.shards = t.get(doc, "shards", &usize_in(1, 1024));
    t.put(
        doc,
        "driver",
        &mut cfg.driver,
        &one_of(&[
            ("auto", Driver::Auto),
            ("io-uring", Driver::IoUring),
            ("epoll", Driver::Epoll),
        ]),
    );
    cfg.dns.server = t.get(doc, "dns", &socket_addr);
    let s = Duration::from_secs;
    t.put(
        doc,
        "dns_timeout",
        &mut cfg.dns.timeout,
        &duration_in(s(1), s(60)),
    );
    t.put(doc, "dns_attempts", &mut cfg.dns.attempts, &usize_in(1, 10));
}

/// The accounting log's rotation, retention and group.
fn read_log(doc: &mut Doc, t: &mut Table, r: &mut Rotation) {
    use crate::observe::rotation::LOG_ROTATE_SIZE_MIN;
    let size = |n: &Node| {
        match size_in(0, 1 << 40)(n)? {
        0 => Ok(None),
        b if b < LOG_ROTATE_SIZE_MIN => Err(format!(
            "{b} octets is under the {LOG_ROTATE_SIZE_MIN}-octet minimum; write 0 for no rotation by size"
        )),
        b => Ok(Some(b)),
    }
    };
    t.put(doc, "log_rotate_size", &mut r.size_max, &size);
    t.put(doc, "log_rotate_daily", &mut r.daily, &boolean);
    let days = |n: &Node| u32_in(0, 36_500)(n).map(|d| (d > 0).then_some(d));
    t.put(doc, "log_keep_days", &mut r.keep_days, &days);
    r.group = t.get(doc, "log_group", &|n| {
        crate::host::accounts::group(&string(n)?)
    });
}

/// What `volley send`'s flags set: the outbound side.
fn read_delivery(doc: &mut Doc, t: &mut Table, cfg: &mut ServeConfig) {
    t.put(doc, "smtp_port", &mut cfg.smtp_port, &|n| {
        int_in(1, 65535)(n).map(|p| p as u16)
    });
    cfg.ehlo_name = t.get(doc, "ehlo_name", &ehlo);
    t.put(doc, "mta_sts", &mut cfg.mta_sts, &boolean);
    let mut dane = false;
    t.put(doc, "dane", &mut dane, &boolean);
    let path = path_conv(doc.base.clone());
    let anchor = t.get(doc, "dnssec_trust_anchor", &|n: &Node| match dane {
        true => path(n),
        false => Err(
            "DANE is off (dane = false), so it would not be used; set dane = true, or remove it"
                .into(),
        ),
    });
    cfg.dns.dane = dane.then_some(crate::deliver::dns::DaneSettings {
        trust_anchor: anchor,
    });
    t.put(doc, "tls_rpt", &mut cfg.tls_rpt.enabled, &boolean);
    let text = |n: &Node| {
        let v = string(n)?;
        match v.trim().is_empty() || v.contains(['\r', '\n']) {
            true => Err("write a non-empty text on one line".to_string()),
            false => Ok(v),
        }
    };
    cfg.tls_rpt.org = t.get(doc, "tls_rpt_org", &text);
    cfg.tls_rpt.contact = t.get(doc, "tls_rpt_contact", &text);
    cfg.tls_rpt.from = t.get(doc, "tls_rpt_from", &|n: &Node| {
        let v = text(n)?;
        match v.split_once('@') {
            Some((l, d)) if !l.is_empty() && d.contains('.') && !v.contains(['<', '>', ' ']) => {
                Ok(v)
            }
            _ => Err(format!(
                "{v:?} is not an address; write e.g. \"tlsrpt-noreply@mta.example.com\""
            )),
        }
    });
    read_shaping_defaults(doc, t, &mut cfg.shaping_defaults);
    t.put(doc, "window", &mut cfg.window, &usize_in(1, 256));
    read_retry(doc, t, &mut cfg.retry);
    let s = Duration::from_secs;
    let timeout = duration_in(s(1), s(3600));
    t.put(
        doc,
        "smtp_connect_timeout",
        &mut cfg.smtp_connect_timeout,
        &duration_in(s(1), s(600)),
    );
    let to = &mut cfg.smtp_timeouts;
    for (key, slot) in [
        ("smtp_greeting_timeout", &mut to.greeting),
        ("smtp_ehlo_timeout", &mut to.ehlo),
        ("smtp_mail_timeout", &mut to.mail),
        ("smtp_rcpt_timeout", &mut to.rcpt),
        ("smtp_data_init_timeout", &mut to.data),
        ("smtp_data_done_timeout", &mut to.data_end),
        ("smtp_rset_timeout", &mut to.rset),
        ("smtp_quit_timeout", &mut to.quit),
    ] {
        t.put(doc, key, slot, &timeout);
    }
    t.put(doc, "requeues_max", &mut cfg.requeues_max, &u32_in(0, 100));
    // Offsets into a segment are 32-bit; a record bigger than a segment gets one of
    // its own size.
    let segment = size_in(1 << 20, 1 << 30);
    if let Some(b) = t.get(doc, "segment_size", &segment) {
        cfg.segment_bytes = b as usize;
    }
    let ms = Duration::from_millis;
    t.put(
        doc,
        "commit_interval",
        &mut cfg.commit_interval,
        &duration_in(ms(1), s(1)),
    );
    t.put(
        doc,
        "commit_batch_max",
        &mut cfg.commit_batch_max,
        &usize_in(1, 65536),
    );
    t.put(
        doc,
        "sync_interval",
        &mut cfg.sync_interval,
        &duration_in(ms(1), s(60)),
    );
}

/// The five keys that are the shaping rules' `[default]`, as send's flags are; each
/// remembers its line for `volley shaping show`.
fn read_shaping_defaults(doc: &mut Doc, t: &mut Table, d: &mut Rule) {
    fn set<T>(doc: &Doc, t: &Table, key: &str, v: Option<T>) -> Option<Set<T>> {
        let at = doc.origins.get(&format!("{}{key}", t.origin))?;
        v.map(|value| Set {
            value,
            from: at.to_string().into(),
        })
    }
    let [conns, msgs, rate, tls, verify] = SHAPING_KEYS;
    let v = t.get(doc, conns, &u32_in(1, 100_000));
    d.max_connections = set(doc, t, conns, v);
    let v = t.get(doc, msgs, &u32_in(1, 1_000_000));
    d.max_msgs_per_conn = set(doc, t, msgs, v);
    let v = t.get(doc, rate, &|n| parse_per(&string(n)?));
    d.max_msg_rate = set(doc, t, rate, v);
    let v = t.get(
        doc,
        tls,
        &one_of(&[
            ("opportunistic", TlsMode::Opportunistic),
            ("required", TlsMode::Required),
            ("disabled", TlsMode::Disabled),
        ]),
    );
    d.tls = set(doc, t, tls, v);
    let v = t.get(doc, verify, &boolean);
    d.tls_verify = set(doc, t, verify, v);
}

/// `retry_schedule` and `[retry_schedule_for]`, applied as send applies its flags.
fn read_retry(doc: &mut Doc, t: &mut Table, retry: &mut RetryPolicy) {
    if let Some(s) = t.get(doc, "retry_schedule", &schedule) {
        *retry = RetryPolicy::uniform(s);
    }
    let Some(node) = t.raw(doc, "retry_schedule_for") else {
        return;
    };
    let span = node.span();
    let Node::Table(entries) = node.into_inner() else {
        doc.bad(
            &span,
            "retry_schedule_for",
            "write it as a table: [retry_schedule_for] with CLASS = \"DELAY,DELAY,...\" lines"
                .into(),
        );
        return;
    };
    for (k, v) in entries {
        let key = format!("retry_schedule_for.{}", k.get_ref());
        let class: Option<crate::policy::classify::Class> =
            serde_json::from_value(serde_json::Value::String(k.get_ref().clone())).ok();
        let Some(class) = class else {
            let hint = nearest(k.get_ref(), &CLASSES)
                .map_or(String::new(), |n| format!("did you mean `{n}`? "));
            doc.bad(
                &k.span(),
                &key,
                format!(
                    "not a reply class; {hint}the classes are {} (see `volley classify`)",
                    CLASSES.join(", ")
                ),
            );
            continue;
        };
        match schedule(v.get_ref()) {
            Ok(s) => {
                retry.per_class.retain(|(c, _)| *c != class);
                retry.per_class.push((class, s));
            }
            Err(msg) => doc.bad(&v.span(), &key, msg),
        }
    }
}

/// The service's own top-level keys.
fn read_service(doc: &mut Doc, t: &mut Table, cfg: &mut ServeConfig) {
    let s = Duration::from_secs;
    t.put(
        doc,
        "shutdown_grace",
        &mut cfg.shutdown_grace,
        &duration_in(s(0), s(3600)),
    );
    t.put(
        doc,
        "inbox_max",
        &mut cfg.inbox_max,
        &usize_in(1, 1_000_000),
    );
    t.put(
        doc,
        "inbox_wait_max",
        &mut cfg.inbox_wait_max,
        &duration_in(s(0), s(600)),
    );
    t.put(
        doc,
        "spool_free_min",
        &mut cfg.spool_free_min,
        &size_in(0, 1 << 40),
    );
    cfg.admin_group = t.get(doc, "admin_group", &|n| {
        crate::host::accounts::group(&string(n)?)
    });
    t.put(
        doc,
        "spool_retention",
        &mut cfg.spool_retention,
        &duration_in(s(0), crate::spool::retention::SPOOL_RETENTION_MAX),
    );
}

/// `[[submission]]`, `[http]`, `[pickup]`.
fn read_listeners(doc: &mut Doc, t: &mut Table, cfg: &mut ServeConfig) {
    if let Some(node) = t.raw(doc, "submission") {
        let span = node.span();
        match node.into_inner() {
            Node::Array(items) => {
                for item in items {
                    let span = item.span();
                    match item.into_inner() {
                        Node::Table(e) => {
                            if let Some(s) = read_submission(doc, cfg.submission.len(), e, span) {
                                cfg.submission.push(s);
                            }
                        }
                        other => doc.bad(&span, "submission", wrong(&other, "[[submission]] tables")),
                    }
                }
            }
            Node::Table(_) => doc.bad(&span, "submission", "written as [submission]; write [[submission]] (two brackets): there may be several listeners".into()),
            other => doc.bad(&span, "submission", wrong(&other, "[[submission]] tables")),
        }
    }
    if let Some(e) = section(doc, t, "http") {
        cfg.http = Some(read_http(doc, e));
    }
    if let Some(e) = section(doc, t, "pickup") {
        cfg.pickup = Some(read_pickup(doc, e));
    }
}

/// A `[name]` table's entries and span, if present and a table.
fn section(doc: &mut Doc, t: &mut Table, name: &'static str) -> Option<Table> {
    let node = t.raw(doc, name)?;
    let span = node.span();
    match node.into_inner() {
        Node::Table(e) => Some(Table::new(name, format!("{name}."), e, span)),
        other => {
            doc.bad(&span, name, wrong(&other, &format!("a [{name}] table")));
            None
        }
    }
}

fn read_submission(
    doc: &mut Doc,
    index: usize,
    entries: Entries,
    span: Range<usize>,
) -> Option<Submission> {
    let mut t = Table::new("submission", format!("submission.{index}."), entries, span);
    let listen = t.get(doc, "listen", &socket_addr);
    if listen.is_none() {
        // Its other keys are still checked, under a prefix no listener has.
        t.origin = format!("submission.unread{index}.");
        if !t.entries.iter().any(|(k, _)| k.get_ref() == "listen") {
            doc.bad(&t.span, "submission.listen", "missing; every [[submission]] needs listen = \"ADDRESS:PORT\", e.g. \"0.0.0.0:587\"".into());
        }
    }
    let mut s = Submission::new(listen.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 587))));
    t.put(doc, "tls", &mut s.tls, &one_of(ListenerTls::NAMES));
    t.put(doc, "auth", &mut s.auth, &one_of(Auth::NAMES));
    t.put(
        doc,
        "auth_over_plaintext",
        &mut s.auth_over_plaintext,
        &boolean,
    );
    if let Some(n) = t.raw(doc, "relay_networks") {
        let at = doc.at(&n.span());
        if let Some(nets) = read_networks(doc, n) {
            doc.origins
                .insert(format!("{}relay_networks", t.origin), at);
            s.relay_networks = nets;
        }
    }
    read_submission_limits(doc, &mut t, &mut s);
    t.put(doc, "hide_client_ip", &mut s.hide_client_ip, &boolean);
    t.put(doc, "campaign_header", &mut s.campaign_header, &header_name);
    t.finish(doc);
    listen.map(|_| s)
}

/// A submission listener's named limits.
fn read_submission_limits(doc: &mut Doc, t: &mut Table, s: &mut Submission) {
    t.put(
        doc,
        "message_size_max",
        &mut s.message_size_max,
        &size_in(1024, 1 << 30),
    );
    let line_min = RFC5322_LINE_OCTETS_MAX as u32;
    for (key, slot, lo, hi) in [
        // RFC 5321 §4.5.3.1.8: a server must take at least 100 recipients.
        ("recipients_max", &mut s.recipients_max, 100, 100_000),
        ("line_length_max", &mut s.line_length_max, line_min, 65536),
        ("connections_max", &mut s.connections_max, 1, 100_000),
        (
            "connections_per_ip_max",
            &mut s.connections_per_ip_max,
            1,
            100_000,
        ),
        ("commands_max", &mut s.commands_max, 10, 1_000_000),
        ("errors_max", &mut s.errors_max, 1, 1000),
        ("auth_failures_max", &mut s.auth_failures_max, 1, 100),
    ] {
        t.put(doc, key, slot, &u32_in(lo, hi));
    }
    let timeout = duration_in(Duration::from_secs(1), Duration::from_secs(3600));
    t.put(doc, "command_timeout", &mut s.command_timeout, &timeout);
    t.put(doc, "data_timeout", &mut s.data_timeout, &timeout);
}

/// `relay_networks`: each bad entry named with its own line.
fn read_networks(doc: &mut Doc, n: Sp<Node>) -> Option<Vec<IpNet>> {
    let key = "submission.relay_networks";
    let span = n.span();
    let Node::Array(items) = n.into_inner() else {
        doc.bad(
            &span,
            key,
            "write a list: [\"127.0.0.0/8\", \"::1/128\"]".into(),
        );
        return None;
    };
    let mut nets = Vec::new();
    let mut ok = true;
    for item in items {
        let parsed =
            string(item.get_ref()).and_then(|s| s.parse::<IpNet>().map_err(|e| e.to_string()));
        match parsed {
            Ok(net) => nets.push(net),
            Err(msg) => {
                doc.bad(&item.span(), key, msg);
                ok = false;
            }
        }
    }
    ok.then_some(nets)
}

fn read_http(doc: &mut Doc, mut t: Table) -> Http {
    let mut h = Http::new(SocketAddr::from(([127, 0, 0, 1], 8025)));
    t.put(doc, "listen", &mut h.listen, &socket_addr);
    t.put(
        doc,
        "body_size_max",
        &mut h.body_size_max,
        &size_in(1024, 4 << 30),
    );
    t.put(
        doc,
        "connections_max",
        &mut h.connections_max,
        &u32_in(1, 100_000),
    );
    let s = Duration::from_secs;
    t.put(
        doc,
        "request_timeout",
        &mut h.request_timeout,
        &duration_in(s(1), s(3600)),
    );
    t.finish(doc);
    h
}

fn read_pickup(doc: &mut Doc, mut t: Table) -> Pickup {
    let mut p = Pickup {
        dir: t.get(doc, "dir", &path_conv(doc.base.clone())),
        ..Pickup::default()
    };
    t.put(
        doc,
        "scan_interval",
        &mut p.scan_interval,
        &duration_in(Duration::from_millis(100), Duration::from_secs(3600)),
    );
    t.put(
        doc,
        "files_per_scan_max",
        &mut p.files_per_scan_max,
        &u32_in(1, 1_000_000),
    );
    t.put(
        doc,
        "message_size_max",
        &mut p.message_size_max,
        &size_in(1024, 1 << 30),
    );
    t.finish(doc);
    p
}

/// `[[webhook]]` tables; two of one name are a problem (they would share a cursor).
fn read_webhooks(doc: &mut Doc, t: &mut Table, cfg: &mut ServeConfig) {
    let Some(node) = t.raw(doc, "webhook") else {
        return;
    };
    let span = node.span();
    let items = match node.into_inner() {
        Node::Array(items) => items,
        Node::Table(_) => {
            doc.bad(
                &span,
                "webhook",
                "written as [webhook]; write [[webhook]] (two brackets): there may be several"
                    .into(),
            );
            return;
        }
        other => {
            doc.bad(&span, "webhook", wrong(&other, "[[webhook]] tables"));
            return;
        }
    };
    for item in items {
        let span = item.span();
        let Node::Table(e) = item.into_inner() else {
            doc.bad(&span, "webhook", "write [[webhook]] tables".into());
            continue;
        };
        let Some((w, name_span)) = read_webhook(doc, cfg.webhooks.len(), e, span) else {
            continue;
        };
        if cfg.webhooks.iter().any(|o| o.name == w.name) {
            doc.bad(&name_span, "webhook.name", format!(
                "{:?} is the name of another [[webhook]]; give each its own (it names the cursor file)",
                w.name
            ));
            continue;
        }
        cfg.webhooks.push(w);
    }
}

/// One `[[webhook]]`, with the span of its name; None when `name` or `url` is
/// missing or bad (its other keys are still checked).
fn read_webhook(
    doc: &mut Doc,
    index: usize,
    entries: Entries,
    span: Range<usize>,
) -> Option<(Webhook, Range<usize>)> {
    let mut t = Table::new("webhook", format!("webhook.{index}."), entries, span);
    let name_span = t
        .entries
        .iter()
        .find(|(k, _)| k.get_ref() == "name")
        .map(|(_, v)| v.span());
    let name = t.get(doc, "name", &|n| {
        let s = string(n)?;
        webhook::check_name(&s).map(|()| s)
    });
    let url = t.get(doc, "url", &|n| {
        let s = string(n)?;
        webhook::check_url(&s).map(|()| s.trim().to_string())
    });
    for (key, eg) in [
        ("name", "name = \"crm\""),
        ("url", "url = \"https://crm.example.com/volley\""),
    ] {
        if !t.entries.iter().any(|(k, _)| k.get_ref() == key) {
            doc.bad(
                &t.span,
                &format!("webhook.{key}"),
                format!("missing; every [[webhook]] needs {eg}"),
            );
        }
    }
    let mut w = Webhook::new("", "");
    if let Some(n) = t.raw(doc, "events") {
        let at = doc.at(&n.span());
        if let Some(events) = read_events(doc, n) {
            doc.origins.insert(format!("{}events", t.origin), at);
            w.events = Some(events);
        }
    }
    if let Some(b) = t.get(
        doc,
        "batch_size",
        &usize_in(webhook::BATCH_RECORDS_MIN, webhook::BATCH_RECORDS_MAX),
    ) {
        w.batch_size = b;
    }
    t.put(
        doc,
        "batch_wait",
        &mut w.batch_wait,
        &duration_in(Duration::ZERO, webhook::BATCH_WAIT_MAX),
    );
    t.put(
        doc,
        "timeout",
        &mut w.timeout,
        &duration_in(webhook::TIMEOUT_MIN, webhook::TIMEOUT_MAX),
    );
    t.put(
        doc,
        "retry_wait_max",
        &mut w.retry_wait_max,
        &duration_in(webhook::RETRY_WAIT_MAX_MIN, webhook::RETRY_WAIT_MAX_MAX),
    );
    let path = path_conv(doc.base.clone());
    w.bearer_token_file = t.get(doc, "bearer_token_file", &path);
    w.hmac_secret_file = t.get(doc, "hmac_secret_file", &path);
    w.ca_file = t.get(doc, "ca_file", &path);
    t.finish(doc);
    w.name = name?;
    w.url = url?;
    Some((w, name_span.unwrap_or(0..0)))
}

/// `events`: a list of accounting record types, each bad one with its own line.
fn read_events(doc: &mut Doc, n: Sp<Node>) -> Option<Vec<String>> {
    let key = "webhook.events";
    let span = n.span();
    let Node::Array(items) = n.into_inner() else {
        doc.bad(
            &span,
            key,
            "write a list: [\"Delivery\", \"Bounce\"]".into(),
        );
        return None;
    };
    let (mut out, mut ok) = (Vec::new(), true);
    for item in items {
        let checked = string(item.get_ref()).and_then(|s| {
            if webhook::EVENTS.contains(&s.as_str()) {
                return Ok(s);
            }
            let hint = nearest(&s, &webhook::EVENTS)
                .map_or(String::new(), |n| format!("did you mean `{n}`? "));
            Err(format!(
                "{s:?} is not a record type; {hint}the types are {}",
                webhook::EVENTS.join(", ")
            ))
        });
        match checked {
            Ok(s) => out.push(s),
            Err(msg) => {
                doc.bad(&item.span(), key, msg);
                ok = false;
            }
        }
    }
    if ok && out.is_empty() {
        doc.bad(
            &span,
            key,
            "empty: the webhook would send nothing; list record types, or remove events for all"
                .into(),
        );
        ok = false;
    }
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeConfig, Vec<Problem>> {
        ServeConfig::parse(Path::new("/etc/volley/volley.toml"), text)
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Ok(_) => panic!("no problems found in:\n{text}"),
            Err(p) => p,
        }
    }

    /// The (line, key) of each problem, and each printed, for a failing assert to show.
    fn lines_keys(p: &[Problem]) -> Vec<(Option<usize>, String)> {
        for x in p {
            eprintln!("{x}");
        }
        p.iter().map(|x| (x.line(), x.key.clone())).collect()
    }

    const LISTENER_FILES: &str = "users = \"users\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n";

    #[test]
    fn the_example_loads_with_no_problems() {
        if let Err(p) = parse(EXAMPLE) {
            lines_keys(&p);
            panic!("{} problem(s) in EXAMPLE", p.len());
        }
    }

    #[test]
    fn every_key_the_file_may_hold_is_in_the_example() {
        let Node::Table(entries) = toml::from_str(EXAMPLE).unwrap() else {
            unreachable!()
        };
        let mut doc = Doc::new(Path::new("volley.toml"), EXAMPLE);
        read_all(&mut doc, entries);
        let lines: Vec<&str> = EXAMPLE.lines().collect();
        for key in &doc.known {
            let leaf = key.rsplit('.').next().unwrap();
            let written = lines.iter().any(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                l.starts_with(&format!("{leaf} ="))
                    || l.starts_with(&format!("[{leaf}]"))
                    || l.starts_with(&format!("[[{leaf}]]"))
            });
            assert!(written, "{key} is not in EXAMPLE");
        }
        assert!(doc.known.len() > 50, "{:?}", doc.known);
    }

    #[test]
    fn the_example_states_the_defaults() {
        let cfg = parse(EXAMPLE).unwrap();
        let e = cfg.engine_config();
        let d = EngineConfig::new(PathBuf::from(DEFAULT_SPOOL));
        assert_eq!(e.window, d.window);
        assert_eq!(e.segment_bytes, d.segment_bytes);
        assert_eq!(e.commit_interval, d.commit_interval);
        assert_eq!(e.commit_batch_max, d.commit_batch_max);
        assert_eq!(e.sync_interval, d.sync_interval);
        assert_eq!(e.requeues_max, d.requeues_max);
        assert_eq!(e.connect_timeout, d.connect_timeout);
        assert_eq!(format!("{:?}", e.timeouts), format!("{:?}", d.timeouts));
        assert_eq!(format!("{:?}", e.dns), format!("{:?}", d.dns));
        assert_eq!(e.smtp_port, d.smtp_port);
        assert_eq!(e.dkim_dir, d.dkim_dir);
        assert_eq!(e.driver, d.driver);
        assert_eq!(e.log_path, d.log_path);
        assert!(e.defaults.is_empty(), "the shaping keys are commented out");
        // The schedule and the shipped per-class ones, in any order.
        assert_eq!(e.retry.default, d.retry.default);
        let mut got = e.retry.per_class.clone();
        let mut want = d.retry.per_class.clone();
        got.sort_by_key(|(c, _)| c.name());
        want.sort_by_key(|(c, _)| c.name());
        assert_eq!(got, want);
        let serve = ServeConfig::defaults(PathBuf::from(DEFAULT_SPOOL));
        assert_eq!(cfg.shutdown_grace, serve.shutdown_grace);
        assert_eq!(cfg.inbox_max, serve.inbox_max);
        assert_eq!(cfg.inbox_wait_max, serve.inbox_wait_max);
        assert_eq!(cfg.spool_retention, serve.spool_retention);
        assert_eq!(e.spool_retention, d.spool_retention);
        let listen: SocketAddr = "0.0.0.0:587".parse().unwrap();
        assert_eq!(cfg.submission, vec![Submission::new(listen)]);
        assert_eq!(cfg.http, Some(Http::new("127.0.0.1:8025".parse().unwrap())));
        let p = cfg.pickup.clone().unwrap();
        assert_eq!(
            Pickup { dir: None, ..p },
            Pickup::default(),
            "pickup's limits"
        );
        assert_eq!(
            cfg.pickup_dir(),
            Some(PathBuf::from("/var/spool/volley/pickup"))
        );
    }

    #[test]
    fn an_empty_file_is_the_defaults_and_the_engine_config_is_sends() {
        let cfg = parse("").unwrap();
        assert!(cfg.submission.is_empty() && cfg.http.is_none() && cfg.pickup.is_none());
        let e = cfg.engine_config();
        let d = EngineConfig::new(PathBuf::from(DEFAULT_SPOOL));
        assert_eq!(e.spool_dir, d.spool_dir);
        assert_eq!(e.shards, d.shards);
        assert_eq!(e.ehlo_name, d.ehlo_name);
        assert_eq!(e.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn spool_retention_is_a_bounded_duration() {
        assert_eq!(
            parse("spool_retention = \"36h\"\n")
                .unwrap()
                .spool_retention,
            Duration::from_secs(36 * 3600)
        );
        assert_eq!(
            parse("spool_retention = \"0s\"\n")
                .unwrap()
                .engine_config()
                .spool_retention,
            Duration::ZERO
        );
        let p = problems("spool_retention = \"4000d\"\n");
        assert!(
            p[0].to_string()
                .contains("key `spool_retention`: \"4000d\" is out of range"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn a_problem_reads_file_line_key_what_and_what_to_do() {
        let p = problems("\n\nwindow = 0\n");
        assert_eq!(
            p[0].to_string(),
            "/etc/volley/volley.toml:3: key `window`: 0 is out of range; use 1 to 256"
        );
    }

    #[test]
    fn an_unknown_user_or_group_is_named_at_its_line() {
        let p = problems("spool = \"s\"\nuser = \"volley-no-such-user\"\n");
        assert_eq!(lines_keys(&p), vec![(Some(2), "user".to_string())]);
        let text = p[0].to_string();
        assert!(
            text.starts_with("/etc/volley/volley.toml:2: key `user`: no user \"volley-no-such-user\" on this host; create it (useradd"),
            "{text}"
        );
        let p = problems("user = \"root\"\n\ngroup = \"volley-no-such-group\"\n");
        assert_eq!(lines_keys(&p), vec![(Some(3), "group".to_string())]);
        let p = problems("group = \"root\"\n");
        assert_eq!(lines_keys(&p), vec![(Some(1), "group".to_string())]);
        assert!(p[0].msg.contains("set without user"), "{}", p[0]);
        let p = problems("user = \"vol ley\"\n");
        assert_eq!(lines_keys(&p), vec![(Some(1), "user".to_string())]);
        let cfg = parse("\nuser = \"root\"\ngroup = \"root\"\n").unwrap();
        assert_eq!(
            (cfg.user.as_deref(), cfg.group.as_deref()),
            (Some("root"), Some("root"))
        );
        assert_eq!(cfg.at("user").to_string(), "/etc/volley/volley.toml:2");
    }

    #[test]
    fn unknown_keys_are_each_named_with_their_line_and_the_nearest_key() {
        let text = format!(
            "{LISTENER_FILES}tokens = \"t\"\nehlo = \"mta.example.com\"\nfrobnicate = 1\n\n[[submission]]\nlisten = \"0.0.0.0:587\"\nmax_message_size = 10\n\n[http]\nlisen = \"127.0.0.1:8025\"\n[mystery]\nx = 1\n"
        );
        let p = problems(&text);
        assert_eq!(
            lines_keys(&p),
            vec![
                (Some(5), "ehlo".into()),
                (Some(6), "frobnicate".into()),
                (Some(10), "submission.max_message_size".into()),
                (Some(13), "http.lisen".into()),
                (Some(14), "mystery".into()),
            ]
        );
        assert!(p[0].msg.contains("did you mean `ehlo_name`?"), "{}", p[0]);
        assert!(p[2].msg.contains("`message_size_max`"), "{}", p[2]);
        assert!(p[3].msg.contains("`listen`"), "{}", p[3]);
        assert!(p[1].msg.contains("unknown in the top level"), "{}", p[1]);
    }

    #[test]
    fn every_bad_value_is_listed_each_with_its_line() {
        let text = format!(
            r#"{LISTENER_FILES}smtp_port = 70000
shutdown_grace = "5 sekunds"
window = "8"
driver = "io_uring"
ehlo_name = "mta1"
max_msg_rate = "lots"
segment_size = "64 furlongs"

[[submission]]
listen = "0.0.0.0:70000"
relay_networks = [
  "10.0.0.0/33",
  "127.0.0.0/8",
  "10.0.0.1/8",
]
auth = "optional"
recipients_max = 10
hide_client_ip = "yes"
campaign_header = "X Campaign"
"#
        );
        let p = problems(&text);
        assert_eq!(
            lines_keys(&p),
            vec![
                (Some(4), "smtp_port".into()),
                (Some(5), "shutdown_grace".into()),
                (Some(6), "window".into()),
                (Some(7), "driver".into()),
                (Some(8), "ehlo_name".into()),
                (Some(9), "max_msg_rate".into()),
                (Some(10), "segment_size".into()),
                (Some(13), "submission.listen".into()),
                (Some(15), "submission.relay_networks".into()),
                (Some(17), "submission.relay_networks".into()),
                (Some(20), "submission.recipients_max".into()),
                (Some(21), "submission.hide_client_ip".into()),
                (Some(22), "submission.campaign_header".into()),
            ]
        );
        let msg = |i: usize| p[i].msg.as_str();
        assert_eq!(msg(0), "70000 is out of range; use 1 to 65535");
        assert!(
            msg(1).starts_with("\"5 sekunds\" is not a duration"),
            "{}",
            msg(1)
        );
        assert!(msg(2).contains("is a string; write an integer from 1 to 256"));
        assert!(msg(3).contains("\"io-uring\""));
        assert!(msg(7).contains("port 70000 is out of range"), "{}", msg(7));
        assert!(msg(8).contains("use 0 to 32"), "{}", msg(8));
        assert!(msg(9).contains("did you mean \"10.0.0.0/8\""), "{}", msg(9));
    }

    #[test]
    fn unknown_keys_bad_values_and_clashes_in_one_file_are_all_listed() {
        let text = "tls_cert = \"c\"\nwindow = 0\nscan_interval = \"1s\"\n[pickup]\nscan_interval = 2024-01-01\n";
        let p = problems(text);
        assert_eq!(
            lines_keys(&p),
            vec![
                (Some(1), "tls_cert".into()),
                (Some(2), "window".into()),
                (Some(3), "scan_interval".into()),
                (Some(5), "pickup.scan_interval".into()),
            ]
        );
        assert!(p[3].msg.contains("is a date"), "{}", p[3]);
    }

    #[test]
    fn dane_keys_set_the_resolver_and_an_anchor_without_dane_is_named() {
        let cfg = parse("dane = true\ndnssec_trust_anchor = \"/etc/volley/root.key\"\n").unwrap();
        let dane = cfg.engine_config().dns.dane.expect("on");
        assert_eq!(
            dane.trust_anchor.as_deref(),
            Some(std::path::Path::new("/etc/volley/root.key"))
        );
        assert!(
            parse("").unwrap().engine_config().dns.dane.is_none(),
            "off by default"
        );
        let p = problems("dnssec_trust_anchor = \"/etc/volley/root.key\"\n");
        assert_eq!(
            lines_keys(&p),
            vec![(Some(1), "dnssec_trust_anchor".into())]
        );
        assert!(p[0].msg.contains("set dane = true"), "{}", p[0]);
    }

    #[test]
    fn a_toml_syntax_error_is_one_problem_at_its_line() {
        let p = problems("window = 8\nspool = \"/x\n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line(), Some(2));
        assert!(p[0].msg.starts_with("not valid TOML"), "{}", p[0]);
    }

    #[test]
    fn the_log_keys_set_rotation_and_bad_values_are_named_at_their_line() {
        let cfg = parse(
            "log_rotate_size = \"64KiB\"\nlog_rotate_daily = false\nlog_keep_days = 0\nlog_group = \"root\"\n",
        )
        .unwrap();
        let r = cfg.engine_config().log_rotation;
        assert_eq!(r.size_max, Some(64 << 10));
        assert!(!r.daily);
        assert_eq!(r.keep_days, None, "0 keeps them");
        assert_eq!(r.group.as_ref().map(|g| g.name.as_str()), Some("root"));
        assert_eq!(
            parse("log_rotate_size = 0\n")
                .unwrap()
                .log_rotation
                .size_max,
            None
        );
        let p = problems(
            "log_rotate_size = \"1KiB\"\nlog_keep_days = -1\nlog_group = \"no-such-group-volley\"\n",
        );
        assert_eq!(
            lines_keys(&p),
            vec![
                (Some(1), "log_rotate_size".into()),
                (Some(2), "log_keep_days".into()),
                (Some(3), "log_group".into())
            ]
        );
        assert!(
            p[0].msg.contains("write 0 for no rotation by size"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn admin_group_is_looked_up_and_an_unknown_one_named_at_its_line() {
        let cfg = parse("admin_group = \"root\"\n").unwrap();
        assert_eq!(cfg.engine_config().admin_group.map(|g| g.gid), Some(0));
        let p = problems("window = 8\nadmin_group = \"no-such-group-volley\"\n");
        assert_eq!(lines_keys(&p), vec![(Some(2), "admin_group".into())]);
        assert!(
            p[0].msg.contains("groupadd no-such-group-volley"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn tls_cert_without_tls_key_is_named_at_its_line() {
        let p = problems("window = 8\ntls_cert = \"/etc/volley/cert.pem\"\n");
        assert_eq!(lines_keys(&p), vec![(Some(2), "tls_cert".into())]);
        assert!(p[0].msg.contains("without tls_key"));
        let p = problems("tls_key = \"/etc/volley/key.pem\"\n");
        assert_eq!(lines_keys(&p), vec![(Some(1), "tls_key".into())]);
    }

    #[test]
    fn a_submission_listener_with_auth_required_and_no_users_file_is_named() {
        let text = "tls_cert = \"c\"\ntls_key = \"k\"\n[[submission]]\nlisten = \"0.0.0.0:587\"\nauth = \"required\"\n";
        let p = problems(text);
        assert_eq!(lines_keys(&p), vec![(Some(5), "submission.auth".into())]);
        assert!(p[0].msg.contains("needs a users file"), "{}", p[0]);
    }

    #[test]
    fn listeners_nobody_could_use_are_named() {
        let text = format!(
            "{LISTENER_FILES}[[submission]]\nlisten = \"127.0.0.1:25\"\ntls = \"none\"\nauth = \"required\"\n[[submission]]\nlisten = \"127.0.0.1:26\"\nauth = \"none\"\nrelay_networks = []\n[[submission]]\nlisten = \"127.0.0.1:27\"\nauth = \"required\"\nrelay_networks = [\"10.0.0.0/8\"]\n"
        );
        let p = problems(&text);
        assert_eq!(
            lines_keys(&p),
            vec![
                (Some(7), "submission.auth".into()),
                (Some(11), "submission.relay_networks".into()),
                (Some(15), "submission.relay_networks".into()),
            ]
        );
        assert!(p[0].msg.contains("auth_over_plaintext"));
        assert!(p[1].msg.contains("refuse every client"));
        assert!(p[2].msg.contains("no effect"));
    }

    #[test]
    fn two_listeners_on_one_address_are_named_with_both_lines() {
        let text = format!(
            "{LISTENER_FILES}tokens = \"t\"\n[[submission]]\nlisten = \"0.0.0.0:587\"\n[[submission]]\nlisten = \"127.0.0.1:587\"\n[[submission]]\nlisten = \"127.0.0.1:588\"\n[http]\nlisten = \"127.0.0.1:588\"\n"
        );
        let p = problems(&text);
        assert_eq!(
            lines_keys(&p),
            vec![
                (Some(8), "submission.listen".into()),
                (Some(12), "http.listen".into()),
            ]
        );
        assert!(
            p[0].msg
                .contains("collides with 0.0.0.0:587 (at /etc/volley/volley.toml:6)"),
            "{}",
            p[0]
        );
        assert!(
            p[1].msg.contains("at /etc/volley/volley.toml:10"),
            "{}",
            p[1]
        );
    }

    #[test]
    fn the_http_api_without_tokens_is_named() {
        let p = problems("[http]\nlisten = \"127.0.0.1:8025\"\n");
        assert_eq!(lines_keys(&p), vec![(Some(2), "tokens".into())]);
    }

    #[test]
    fn a_submission_table_in_single_brackets_or_without_listen_is_named() {
        let p = problems("[submission]\nlisten = \"0.0.0.0:587\"\n");
        assert!(
            p[0].msg.contains("[[submission]] (two brackets)"),
            "{}",
            p[0]
        );
        let p = problems(&format!("{LISTENER_FILES}[[submission]]\ntls = \"none\"\n"));
        assert_eq!(lines_keys(&p), vec![(Some(4), "submission.listen".into())]);
    }

    #[test]
    fn webhooks_are_read_and_each_problem_named_with_its_line() {
        let cfg = parse("[[webhook]]\nname = \"crm\"\nurl = \"https://crm.example.com/v\"\nevents = [\"Delivery\", \"Bounce\"]\nbatch_size = 5\nbatch_wait = \"0s\"\nhmac_secret_file = \"crm.hmac\"\n[[webhook]]\nname = \"all\"\nurl = \"http://127.0.0.1:9000/\"\n").unwrap();
        let [crm, all] = &cfg.webhooks[..] else {
            panic!("{:?}", cfg.webhooks)
        };
        assert_eq!(
            crm.events.as_deref(),
            Some(&["Delivery".to_string(), "Bounce".to_string()][..])
        );
        assert_eq!((crm.batch_size, crm.batch_wait), (5, Duration::ZERO));
        assert_eq!(
            crm.hmac_secret_file,
            Some(PathBuf::from("/etc/volley/crm.hmac"))
        );
        assert_eq!(all, &Webhook::new("all", "http://127.0.0.1:9000/"));
        let p = problems(
            "[[webhook]]\nname = \"crm\"\nurl = \"ftp://x\"\nevents = [\"Delivry\"]\nbatch_size = 0\n[[webhook]]\nname = \"ok\"\nurl = \"http://a/\"\n[[webhook]]\nname = \"ok\"\nurl = \"http://b/\"\nbearer_token = \"t\"\n[[webhook]]\nurl = \"http://c/\"\n",
        );
        assert_eq!(
            lines_keys(&p),
            vec![
                (Some(3), "webhook.url".into()),
                (Some(4), "webhook.events".into()),
                (Some(5), "webhook.batch_size".into()),
                (Some(10), "webhook.name".into()),
                (Some(12), "webhook.bearer_token".into()),
                (Some(13), "webhook.name".into()),
            ]
        );
        assert!(
            p[1].msg.contains("did you mean `Delivery`?"),
            "{}",
            p[1].msg
        );
        assert!(p[3].msg.contains("another [[webhook]]"), "{}", p[3].msg);
        assert!(
            p[4].msg.contains("did you mean `bearer_token_file`?"),
            "{}",
            p[4].msg
        );
        assert!(
            p[5].msg.contains("missing; every [[webhook]] needs name"),
            "{}",
            p[5].msg
        );
    }

    #[test]
    fn a_webhook_written_as_one_table_is_named() {
        let p = problems("[webhook]\nname = \"crm\"\n");
        assert_eq!(lines_keys(&p), vec![(Some(1), "webhook".into())]);
        assert!(p[0].msg.contains("write [[webhook]]"), "{}", p[0].msg);
    }

    #[test]
    fn relative_paths_are_taken_from_the_files_directory() {
        let cfg = parse("spool = \"spool\"\ndkim_dir = \"/abs/dkim\"\n[pickup]\n").unwrap();
        assert_eq!(cfg.spool, PathBuf::from("/etc/volley/spool"));
        assert_eq!(cfg.dkim_dir, PathBuf::from("/abs/dkim"));
        assert_eq!(
            cfg.log_path(),
            PathBuf::from("/etc/volley/spool/accounting.jsonl")
        );
        assert_eq!(
            cfg.pickup_dir(),
            Some(PathBuf::from("/etc/volley/spool/pickup"))
        );
    }

    #[test]
    fn the_shaping_keys_become_the_rules_default_with_their_lines() {
        let cfg = parse(
            "window = 4\nmax_conns_per_site = 8\nmax_msg_rate = \"100/s\"\ntls = \"required\"\n",
        )
        .unwrap();
        let d = cfg.engine_config().defaults;
        let conns = d.max_connections.unwrap();
        assert_eq!(conns.value, 8);
        assert_eq!(&*conns.from, "/etc/volley/volley.toml:2");
        assert_eq!(d.max_msg_rate.unwrap().value.per_sec(), 100.0);
        assert_eq!(d.tls.unwrap().value, TlsMode::Required);
        assert!(d.max_msgs_per_conn.is_none() && d.tls_verify.is_none());
    }

    #[test]
    fn retry_schedules_apply_as_sends_flags_do() {
        let cfg = parse(
            "retry_schedule = \"1m,2m\"\n[retry_schedule_for]\nthrottled = [\"10s\", \"20s\"]\n",
        )
        .unwrap();
        assert_eq!(
            cfg.retry.default,
            vec![Duration::from_secs(60), Duration::from_secs(120)]
        );
        assert_eq!(
            cfg.retry.per_class,
            vec![(
                crate::policy::classify::Class::Throttled,
                vec![Duration::from_secs(10), Duration::from_secs(20)]
            )]
        );
        let p = problems("[retry_schedule_for]\nthrotled = \"1m\"\nblocked = \"soon\"\n");
        assert_eq!(
            lines_keys(&p),
            vec![
                (Some(2), "retry_schedule_for.throtled".into()),
                (Some(3), "retry_schedule_for.blocked".into()),
            ]
        );
        assert!(p[0].msg.contains("did you mean `throttled`?"));
    }

    #[test]
    fn the_class_list_is_the_classifiers() {
        for c in CLASSES {
            let class: crate::policy::classify::Class =
                serde_json::from_value(serde_json::Value::String(c.into())).unwrap();
            assert_eq!(class.name(), c);
        }
    }

    #[test]
    fn dotted_keys_and_inline_tables_read_as_tables() {
        let cfg = parse("tokens = \"t\"\nhttp.listen = \"127.0.0.1:9000\"\npickup = { scan_interval = \"1s\" }\n").unwrap();
        assert_eq!(cfg.http.unwrap().listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cfg.pickup.unwrap().scan_interval, Duration::from_secs(1));
    }

    #[test]
    fn flags_replace_the_files_values_and_submission_replaces_every_listener() {
        let text = format!(
            "{LISTENER_FILES}smtp_port = 2525\n[[submission]]\nlisten = \"0.0.0.0:587\"\nauth = \"optional\"\n[[submission]]\nlisten = \"0.0.0.0:465\"\ntls = \"implicit\"\n"
        );
        let mut cfg = parse(&text).unwrap();
        let a: SocketAddr = "127.0.0.1:2587".parse().unwrap();
        cfg.apply(Overrides {
            spool: Some("/srv/spool".into()),
            smtp_port: Some(25),
            submission: vec![a],
            pickup: Some("/srv/pickup".into()),
            ..Overrides::default()
        });
        assert_eq!(cfg.smtp_port, 25);
        assert_eq!(cfg.submission, vec![Submission::new(a)]);
        assert_eq!(cfg.log_path(), PathBuf::from("/srv/spool/accounting.jsonl"));
        assert_eq!(cfg.pickup_dir(), Some(PathBuf::from("/srv/pickup")));
        assert_eq!(cfg.users, Some(PathBuf::from("/etc/volley/users")));
        cfg.check().unwrap();
    }

    #[test]
    fn a_flag_made_listener_missing_a_file_is_named_by_its_flag() {
        let mut cfg = ServeConfig::defaults(DEFAULT_SPOOL.into());
        cfg.apply(Overrides {
            submission: vec!["0.0.0.0:587".parse().unwrap()],
            users: Some("/etc/volley/users".into()),
            tls_cert: Some("/etc/volley/cert.pem".into()),
            ..Overrides::default()
        });
        let p = cfg.check().unwrap_err();
        let shown: Vec<String> = p.iter().map(|x| x.to_string()).collect();
        assert_eq!(shown.len(), 1, "{shown:?}");
        assert!(
            shown[0].starts_with("--tls-cert: key `tls_cert`: given without tls_key"),
            "{shown:?}"
        );
    }

    #[test]
    fn networks_hold_their_addresses_and_v4_mapped_ones() {
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(net.contains(ip("10.255.0.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(net.contains(ip("::ffff:10.1.2.3")));
        assert!(!net.contains(ip("::1")));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("192.0.2.1")) && all.contains(ip("::ffff:192.0.2.1")));
        assert!(!all.contains(ip("2001:db8::1")));
        let any6: IpNet = "::/0".parse().unwrap();
        assert!(
            any6.contains(ip("192.0.2.1")),
            "::/0 holds the mapped IPv4 space"
        );
        let mapped: IpNet = "::ffff:192.0.2.0/120".parse().unwrap();
        assert_eq!(mapped.to_string(), "192.0.2.0/24");
        assert!(mapped.contains(ip("192.0.2.9")));
        let host: IpNet = "192.0.2.7".parse().unwrap();
        assert_eq!(host.prefix_len(), 32);
        let [lo4, lo6] = IpNet::loopback();
        assert!(lo4.contains(ip("127.0.0.53")) && lo6.contains(ip("::1")));
    }

    #[test]
    fn bad_networks_say_what_to_write() {
        let err = |s: &str| s.parse::<IpNet>().unwrap_err().to_string();
        assert!(err("10.0.0.0/33").contains("use 0 to 32"));
        assert!(err("::/129").contains("use 0 to 128"));
        assert!(err("10.0.0.1/8").contains("did you mean \"10.0.0.0/8\""));
        assert!(err("10.0.0.0/").contains("not an address"));
        assert!(err("example.com/8").contains("not an address"));
    }

    #[test]
    fn sizes_take_bytes_and_units() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("10MiB"), Some(10 << 20));
        assert_eq!(parse_size("10 MB"), Some(10_000_000));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        // The largest ranges are written in TiB ("0 to 1TiB").
        assert_eq!(parse_size("1TiB"), Some(1 << 40));
        assert_eq!(parse_size("2TB"), Some(2_000_000_000_000));
        assert_eq!(show_size(1 << 40), "1TiB");
        assert_eq!(parse_size("10 furlongs"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(show_size(256 << 20), "256MiB");
    }

    #[test]
    fn wildcard_addresses_collide_with_their_family() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(a("0.0.0.0:587"), a("127.0.0.1:587")));
        assert!(overlaps(a("[::]:587"), a("127.0.0.1:587")));
        assert!(!overlaps(a("0.0.0.0:587"), a("[::1]:587")));
        assert!(!overlaps(a("127.0.0.1:587"), a("127.0.0.2:587")));
        assert!(!overlaps(a("0.0.0.0:587"), a("0.0.0.0:465")));
    }
}
