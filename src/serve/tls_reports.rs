//! The daemon's TLS-RPT sender (RFC 8460 §4.1): a thread that, at start and every
//! [`CHECK_EVERY`], sends the reports of the UTC days that have ended
//! (deliver/tls_rpt.rs), mailed reports through the daemon's own queue.

use crate::deliver::dns::{BlockingResolver, DnsConfig};
use crate::deliver::tls_rpt::{self, Mailer, Reporting};
use crate::serve::intake::{Intake, Submitted};
use crate::spool::inbox;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How often the sender looks for a day whose reports are due: a day's reports go
/// out within this long of its end (RFC 8460 §4.1 asks for them within a day).
pub const CHECK_EVERY: Duration = Duration::from_secs(600);

/// The campaign mailed reports are counted under in the log.
pub const TLS_RPT_CAMPAIGN: &str = "tls-rpt";

impl Mailer for Intake {
    /// Queued as a submitted message, answered once durable.
    fn queue(&self, from: &str, to: &str, message: Vec<u8>) -> Result<(), String> {
        let answer = self
            .submit(&Submitted {
                sender: from.to_string(),
                recipients: vec![to.to_string()],
                campaign: Some(TLS_RPT_CAMPAIGN.into()),
                message,
                tls_report: true,
            })
            .map_err(|e| e.to_string())?;
        inbox::wait(answer).map_err(|e| e.to_string())
    }
}

/// What the sender needs: where the ledgers are, who reports, the DNS to ask.
pub struct Sender {
    pub spool_dir: PathBuf,
    pub reporting: Reporting,
    pub dns: DnsConfig,
    pub intake: Arc<Intake>,
}

/// Starts the sender thread; it stops when `stop` is set. Errors: the thread or its
/// resolver could not start.
pub fn start(s: Sender, stop: Arc<AtomicBool>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    Ok(std::thread::Builder::new()
        .name("tls-rpt".into())
        .spawn(move || {
            let dns = match BlockingResolver::new(&s.dns) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!(
                        "volley serve: tls-rpt: no resolver ({e:#}); no TLS reports are sent"
                    );
                    return;
                }
            };
            while !stop.load(Ordering::Relaxed) {
                let now = SystemTime::now();
                match tls_rpt::send_due(&s.spool_dir, now, &s.reporting, &dns, &*s.intake, &stop) {
                    Ok(lines) => lines
                        .iter()
                        .for_each(|l| eprintln!("volley serve: tls-rpt: {l}")),
                    Err(e) => eprintln!(
                        "volley serve: tls-rpt: {e:#}; tried again in {} s",
                        CHECK_EVERY.as_secs()
                    ),
                }
                let until = Instant::now() + CHECK_EVERY;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })?)
}

/// How reports are sent, from the configuration: `tls_rpt_org`, `tls_rpt_contact`
/// and `tls_rpt_from` (each defaulting from `hostname`), the From domain's DKIM keys
/// under `dkim_dir` (none: mailed reports are skipped, said in the second value),
/// and report hosts verified against webpki-roots and `tls_roots`. Errors: a key
/// that is there but cannot be used, or `tls_roots` unreadable.
pub fn reporting(
    cfg: &crate::serve::config::ServeConfig,
    hostname: &str,
) -> anyhow::Result<(Reporting, Option<String>)> {
    use crate::message::dkim::{find_keys, KeyError, Signer};
    use crate::policy::tls_rpt::Organization;
    let t = &cfg.tls_rpt;
    let from = t
        .from
        .clone()
        .unwrap_or_else(|| format!("tlsrpt-noreply@{hostname}"));
    let domain = from.rsplit_once('@').map_or("", |(_, d)| d).to_string();
    let (signer, note) = match find_keys(&cfg.dkim_dir, &domain, None) {
        Ok(keys) => {
            let signer = Signer::load(&domain, &keys, &tls_rpt::signed_headers())?;
            (Some(signer), None)
        }
        Err(e @ KeyError::NoKeys { .. }) => (
            None,
            Some(format!(
                "TLS reports go to https: URIs only, not mailto: ones ({e}; tls_rpt_from is {from})"
            )),
        ),
        Err(e) => anyhow::bail!("tls_rpt_from {from}: {e}"),
    };
    let roots = match &cfg.tls_roots {
        Some(p) => crate::deliver::tls::read_roots(p)
            .map_err(|why| anyhow::anyhow!("tls_roots {}: {why}", p.display()))?,
        None => Vec::new(),
    };
    let reporting = Reporting {
        org: Organization {
            name: t.org.clone().unwrap_or_else(|| hostname.to_string()),
            contact_info: t
                .contact
                .clone()
                .unwrap_or_else(|| format!("postmaster@{hostname}")),
            submitter: hostname.to_string(),
        },
        from,
        signer,
        tls: crate::deliver::tls::client_config(true, &roots),
    };
    Ok((reporting, note))
}
