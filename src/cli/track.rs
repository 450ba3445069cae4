//! `volley track ADDRESS`: where one recipient is. Queued (asked of the running
//! `serve` or `send` over the admin socket, or read from a spool no process runs) or
//! final, with every accounting record of it, oldest first.

use crate::cli::log::LogArg;
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct TrackArgs {
    /// The recipient's address (any case). A Message-ID is not taken: the log's
    /// records do not carry one (README: volley track).
    address: String,
    /// Only this campaign's records and queue entries.
    #[arg(long)]
    campaign: Option<String>,
    /// The spool [default: /var/spool/volley, or the `spool` of --config].
    #[arg(long)]
    spool: Option<PathBuf>,
    #[command(flatten)]
    log: LogArg,
    /// Print the answer as JSON (the HTTP API's GET /api/v1/track gives the same).
    #[arg(long)]
    json: bool,
}

/// Exit status of a bad usage, as clap's.
const USAGE_EXIT: i32 = 2;

/// Exit 0 when something is known of the address, 1 when nothing is, 2 when what
/// was given is not an address.
pub(crate) fn run(a: TrackArgs) -> anyhow::Result<i32> {
    use volley::deliver::track::{track, TrackError};
    if a.address.starts_with('<') && a.address.ends_with('>') && !a.address.contains(' ') {
        eprintln!(
            "volley: {} looks like a Message-ID; track takes a recipient's address (the accounting log's records carry no Message-ID)",
            a.address
        );
        return Ok(USAGE_EXIT);
    }
    let (log, spool) = a.log.resolve(a.spool.as_deref())?;
    let t = match track(&spool, &log, &a.address, a.campaign.as_deref()) {
        Ok(t) => t,
        Err(e @ TrackError::NotAnAddress(_)) => {
            eprintln!("volley: {e}");
            return Ok(USAGE_EXIT);
        }
        Err(e) => return Err(e.into()),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else if t.found() {
        print!("{}", t.text());
    }
    if !t.found() {
        eprintln!(
            "volley: nothing is known about {}{}: not queued in {} ({}) and not in the accounting log {}",
            a.address,
            a.campaign
                .as_deref()
                .map_or(String::new(), |c| format!(" in campaign {c}")),
            spool.display(),
            t.live,
            log.display()
        );
        return Ok(1);
    }
    Ok(0)
}
