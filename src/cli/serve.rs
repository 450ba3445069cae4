//! `volley serve`: the configuration file and the flags that override it merged into
//! one config, then the daemon (src/serve/) started with it.

use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// The configuration file (TOML; `volley config example` prints one). Without
    /// it, the defaults and the flags below.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Spool directory (overrides the file's `spool`).
    #[arg(long)]
    spool: Option<PathBuf>,
    /// DNS server to ask instead of /etc/resolv.conf's.
    #[arg(long)]
    dns: Option<std::net::SocketAddr>,
    /// The port dialled at the MX (tests: the sink's).
    #[arg(long)]
    smtp_port: Option<u16>,
    /// An SMTP submission listener (repeatable; replaces the file's): STARTTLS, AUTH
    /// optional, relay from loopback without AUTH.
    #[arg(long)]
    submission: Vec<std::net::SocketAddr>,
    /// The HTTP injection API's address (needs --tokens).
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// Users for SMTP AUTH (`volley user add`).
    #[arg(long)]
    users: Option<PathBuf>,
    /// Tokens for the HTTP API (`volley token add`).
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// A pickup directory to take RFC 5322 files with X-Sender/X-Receiver from.
    #[arg(long)]
    pickup: Option<PathBuf>,
    /// The listeners' certificate chain (PEM); default a self-signed one made at start.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM): mode 0600, owned by the user volley runs
    /// as or root (read before the drop when started as root with `user`).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) insecure: super::InsecureModes,
}

pub(crate) fn run(a: ServeArgs) -> anyhow::Result<i32> {
    use volley::serve::config::{Overrides, ServeConfig};
    let mut cfg = match &a.config {
        Some(f) => match ServeConfig::load(f) {
            Ok(c) => c,
            Err(problems) => {
                for p in &problems {
                    eprintln!("{p}");
                }
                eprintln!(
                    "volley: {} problem(s) in {}; nothing started",
                    problems.len(),
                    f.display()
                );
                return Ok(1);
            }
        },
        None => ServeConfig::defaults(volley::serve::config::DEFAULT_SPOOL.into()),
    };
    cfg.apply(Overrides {
        spool: a.spool,
        dns: a.dns,
        smtp_port: a.smtp_port,
        submission: a.submission,
        http: a.http,
        users: a.users,
        tokens: a.tokens,
        pickup: a.pickup,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
    });
    volley::serve::daemon::run(cfg)
}
