//! Engine settings. Every limit has a name, a default and a documented effect at the
//! limit (README, "Limits").

use crate::deliver::dns::DnsConfig;
use crate::deliver::runtime::Driver;
use crate::policy::retry::RetryPolicy;
use crate::policy::shaping::rules::{Problem, Rule, Rules};
use crate::smtp::client::Timeouts;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Shard threads; recipients are spread over them by a hash of the address.
    pub shards: usize,
    pub driver: Driver,
    pub spool_dir: PathBuf,
    pub log_path: PathBuf,
    /// When the accounting log is rotated, how long rotated files are kept, its group.
    pub log_rotation: crate::observe::rotation::Rotation,
    pub dns: DnsConfig,
    /// Port of the receiving MTAs (25; the bundled sink uses another for tests).
    pub smtp_port: u16,
    pub ehlo_name: String,
    /// DKIM keys: DIR/DOMAIN/SELECTOR.pem (see dkim.rs).
    pub dkim_dir: PathBuf,
    /// The operator's shaping rules (`--shaping`), merged over the shipped ones.
    pub shaping_file: Option<PathBuf>,
    /// Command-line values for the rules' `[default]` section, merged last
    /// (`--max-conns-per-site`, `--tls`, ...). Limits per destination live there.
    pub defaults: Rule,
    /// Transactions in flight per connection when the server offers CHUNKING.
    pub window: usize,
    /// Delays before retries after a temporary failure, per reply class.
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
    pub timeouts: Timeouts,
    /// Size of a spool segment file (preallocated).
    pub segment_bytes: usize,
    /// Outcomes are written (log, then spool) at least this often...
    pub commit_interval: Duration,
    /// ...or when this many are waiting.
    pub commit_batch_max: usize,
    /// The spool is msynced this often (power-loss window for outcomes).
    pub sync_interval: Duration,
    /// Times a recipient may be put back in the queue because its connection broke
    /// before a reply (not counted as attempts); past it, a break counts as a deferral.
    pub requeues_max: u32,
    /// An operator's classification rules, tried before the shipped ones.
    pub bounce_rules: Option<PathBuf>,
    /// When a shard is done (or stopped), how long its connections get to finish
    /// what is in flight and QUIT before they are dropped.
    pub shutdown_grace: Duration,
    /// Who besides root and the user volley runs as may use the admin socket
    /// (`--admin-group`, serve's `admin_group`); None: no one.
    pub admin_group: Option<crate::host::accounts::Group>,
    /// How long a campaign instance whose recipients are all final keeps its copy
    /// in the spool before it is pruned (spool/retention.rs); its accounting stays.
    pub spool_retention: Duration,
    /// Honour MTA-STS policies (RFC 8461): on unless `--no-mta-sts` (mta_sts.rs).
    pub mta_sts: bool,
    /// The HTTPS port of `mta-sts.DOMAIN` policy hosts: 443 (another in tests).
    pub https_port: u16,
    /// CA certificates trusted besides webpki-roots' when a certificate is verified
    /// (an MTA-STS policy host, an MX under `tls_verify` or an enforced policy): a PEM
    /// file (`--tls-roots`), for a private CA and for tests.
    pub tls_roots: Option<PathBuf>,
    /// Count TLS sessions to domains with an MTA-STS policy for TLS-RPT (RFC 8460;
    /// tls_rpt.rs): off in `send` unless `--tls-rpt`, on in `serve`. Needs `mta_sts`.
    pub tls_rpt: bool,
}

impl EngineConfig {
    pub fn new(spool_dir: PathBuf) -> EngineConfig {
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
        EngineConfig {
            shards,
            driver: Driver::Auto,
            log_path: spool_dir.join("accounting.jsonl"),
            log_rotation: Default::default(),
            spool_dir,
            dns: DnsConfig::default(),
            smtp_port: 25,
            ehlo_name: hostname(),
            dkim_dir: PathBuf::from(crate::message::dkim::DEFAULT_DIR),
            shaping_file: None,
            defaults: Rule::default(),
            window: 8,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            timeouts: Timeouts::default(),
            segment_bytes: 64 * 1024 * 1024,
            commit_interval: Duration::from_millis(10),
            commit_batch_max: 256,
            sync_interval: Duration::from_millis(100),
            requeues_max: 3,
            bounce_rules: None,
            shutdown_grace: Duration::from_secs(5),
            admin_group: None,
            spool_retention: crate::spool::retention::SPOOL_RETENTION_DEFAULT,
            mta_sts: true,
            https_port: 443,
            tls_roots: None,
            tls_rpt: false,
        }
    }

    /// The shaping rules this configuration runs with.
    pub fn rules(&self) -> Result<Rules, Vec<Problem>> {
        Rules::load(self.shaping_file.as_deref(), &self.defaults)
    }

    /// Messages that may be accepted by receivers but not yet recorded as done when
    /// the process dies (what a crash can duplicate), with `conns_per_site`
    /// connections to each of `sites` (each shard holds at least one).
    pub fn in_flight_bound(&self, sites: usize, conns_per_site: usize) -> usize {
        sites * conns_per_site.max(self.shards) * self.window + self.commit_batch_max * self.shards
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| s.contains('.'))
        .unwrap_or_else(|| "localhost.localdomain".into())
}
