//! Engine settings. Every limit has a name, a default and a documented effect at the
//! limit (README, "Limits").

use crate::dns::DnsConfig;
use crate::retry::RetryPolicy;
use crate::smtp::client::Timeouts;
use crate::smtp::client::TlsMode;
use std::path::PathBuf;
use std::time::Duration;
use volley_load::runtime::Driver;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Shard threads; recipients are spread over them by a hash of the address.
    pub shards: usize,
    pub driver: Driver,
    pub spool_dir: PathBuf,
    pub log_path: PathBuf,
    pub dns: DnsConfig,
    /// Port of the receiving MTAs (25; the bundled sink uses another for tests).
    pub smtp_port: u16,
    pub ehlo_name: String,
    /// Connections per destination site (MX set), over all shards. Each shard holds
    /// its share, at least one. More work waits in the site's queue.
    pub max_conns_per_site: usize,
    /// Messages per connection before it is closed and a new one opened.
    pub max_msgs_per_conn: usize,
    /// Transactions in flight per connection when the server offers CHUNKING.
    pub window: usize,
    /// Delays before retries after a temporary failure, per reply class.
    pub retry: RetryPolicy,
    /// An idle connection waits this long for more work before QUIT.
    pub idle_timeout: Duration,
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
    /// STARTTLS outbound.
    pub tls: TlsMode,
    /// Verify MX certificates (against webpki-roots, for the MX host name).
    pub tls_verify: bool,
}

impl EngineConfig {
    pub fn new(spool_dir: PathBuf) -> EngineConfig {
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
        EngineConfig {
            shards,
            driver: Driver::Auto,
            log_path: spool_dir.join("accounting.jsonl"),
            spool_dir,
            dns: DnsConfig::default(),
            smtp_port: 25,
            ehlo_name: hostname(),
            max_conns_per_site: 32,
            max_msgs_per_conn: 1000,
            window: 8,
            retry: RetryPolicy::default(),
            idle_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
            timeouts: Timeouts::default(),
            segment_bytes: 64 * 1024 * 1024,
            commit_interval: Duration::from_millis(10),
            commit_batch_max: 256,
            sync_interval: Duration::from_millis(100),
            requeues_max: 3,
            bounce_rules: None,
            tls: TlsMode::Opportunistic,
            tls_verify: false,
        }
    }

    /// This shard's share of a per-site connection limit.
    pub fn conns_per_site_per_shard(&self) -> usize {
        (self.max_conns_per_site / self.shards.max(1)).max(1)
    }

    /// Messages that may be accepted by receivers but not yet recorded as done when
    /// the process dies: what a crash can duplicate.
    pub fn in_flight_bound(&self, sites: usize) -> usize {
        sites * self.conns_per_site_per_shard() * self.shards * self.window
            + self.commit_batch_max * self.shards
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| s.contains('.'))
        .unwrap_or_else(|| "localhost.localdomain".into())
}
