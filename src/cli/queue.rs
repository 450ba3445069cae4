//! `volley queue`: pauses, resumes, rates and purges sent to a running `send` or
//! `serve` over its admin socket, so delivery is steered without a restart.

use clap::Subcommand;
use std::path::PathBuf;
use volley::deliver::control;

#[derive(Subcommand)]
pub(crate) enum QueueCmd {
    /// Stop sending to TARGET: a domain (gmail.com or domain:gmail.com),
    /// provider:NAME, site:MX, campaign:ID or source:IP. Queued mail waits; nothing
    /// is deferred.
    Pause { target: String },
    /// Undo a pause.
    Resume { target: String },
    /// Set TARGET's total rate ("100/s", "3000/min"), or "unlimited" to lift it.
    Rate { target: String, rate: String },
    /// Bounce every queued recipient of TARGET (campaign:ID, or a domain:
    /// gmail.com or domain:gmail.com), as PowerMTA's `delete` and KumoMTA's admin
    /// bounce do. Each is logged as a Bounce (class policy, stage local, 550 5.7.1
    /// with the reason) and never sent, even after a restart; no DSN is sent.
    /// Recipients in a transaction now are bounced if the receiver defers them.
    /// Prints how many were bounced and how many were in flight.
    Purge {
        target: String,
        /// Why, for the accounting log (at most 256 octets, one line).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Destinations not at their configured limits: back-offs, suspensions, pauses.
    Status,
}

pub(crate) fn run(spool: PathBuf, cmd: QueueCmd) -> anyhow::Result<i32> {
    if let QueueCmd::Pause { target }
    | QueueCmd::Resume { target }
    | QueueCmd::Rate { target, .. }
    | QueueCmd::Purge { target, .. } = &cmd
    {
        control::check_word("the target", target).map_err(|e| anyhow::anyhow!(e))?;
    }
    let mut patience = std::time::Duration::from_secs(10);
    let line = match cmd {
        QueueCmd::Pause { target } => format!("pause {target}"),
        QueueCmd::Resume { target } => format!("resume {target}"),
        QueueCmd::Rate { target, rate } => format!("rate {target} {rate}"),
        QueueCmd::Purge { target, reason } => {
            // The socket waits for every shard's count up to its limit; this waits longer.
            patience = control::PURGE_ANSWER_WAIT + std::time::Duration::from_secs(10);
            match reason {
                Some(r) => {
                    // The socket takes one line: a line break would cut the reason.
                    anyhow::ensure!(
                        !r.chars().any(control::is_unprintable),
                        "--reason has a line break, a control or a direction-changing character; use one line of plain text"
                    );
                    format!("purge {target} {r}")
                }
                None => format!("purge {target}"),
            }
        }
        QueueCmd::Status => "status".into(),
    };
    // Checked here too, so a typo is named before anything is sent.
    control::parse(&line).map_err(|e| anyhow::anyhow!(e))?;
    println!("{}", control::request_waiting(&spool, &line, patience)?);
    Ok(0)
}
