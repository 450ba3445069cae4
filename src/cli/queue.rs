//! `volley queue`: pauses, resumes and rates sent to a running `send` or `serve` over
//! its admin socket, so delivery is steered without a restart.

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum QueueCmd {
    /// Stop sending to TARGET: a domain (gmail.com), provider:NAME, site:MX,
    /// campaign:ID or source:IP. Queued mail waits; nothing is deferred.
    Pause { target: String },
    /// Undo a pause.
    Resume { target: String },
    /// Set TARGET's total rate ("100/s", "3000/min"), or "unlimited" to lift it.
    Rate { target: String, rate: String },
    /// Destinations not at their configured limits: back-offs, suspensions, pauses.
    Status,
}

pub(crate) fn run(spool: PathBuf, cmd: QueueCmd) -> anyhow::Result<i32> {
    let line = match cmd {
        QueueCmd::Pause { target } => format!("pause {target}"),
        QueueCmd::Resume { target } => format!("resume {target}"),
        QueueCmd::Rate { target, rate } => format!("rate {target} {rate}"),
        QueueCmd::Status => "status".into(),
    };
    // Checked here too, so a typo is named before anything is sent.
    volley::deliver::control::parse(&line).map_err(|e| anyhow::anyhow!(e))?;
    println!("{}", volley::deliver::control::request(&spool, &line)?);
    Ok(0)
}
