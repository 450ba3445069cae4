//! `volley log`: views of the accounting log for other tools (`log csv`: PowerMTA's
//! accounting CSV), read over every rotated generation.

use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub(crate) enum LogCmd {
    /// Write the accounting records as PowerMTA accounting CSV (header row first,
    /// every generation oldest first): type (d, b, t), timeLogged, timeQueued, orig,
    /// rcpt, dsnAction, dsnStatus, dsnDiag, dsnMta, bounceCat, jobId, queue, ...;
    /// fields volley does not log are empty (README: Accounting log).
    Csv {
        #[command(flatten)]
        log: LogArg,
        /// Records logged at or after this time: 2026-11-30, 2026-11-30 22:00:00
        /// (UTC) or 2026-11-30T22:00:00Z.
        #[arg(long)]
        since: Option<String>,
        /// Records logged before this time (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// Write here (created or replaced, mode 0600) instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

/// Where the accounting log is: `--log`, else the `log` of `--config` (serve's
/// file), else the default.
#[derive(clap::Args)]
pub(crate) struct LogArg {
    /// The accounting log [default: the `log` of --config, else
    /// SPOOL/accounting.jsonl; SPOOL is /var/spool/volley, or track's --spool].
    #[arg(long)]
    pub(crate) log: Option<PathBuf>,
    /// `volley serve`'s configuration file, for its `log` (and `spool`).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
}

impl LogArg {
    /// The log's path and the spool's (`--spool`, else the config's, else the default).
    pub(crate) fn resolve(&self, spool: Option<&Path>) -> anyhow::Result<(PathBuf, PathBuf)> {
        use volley::serve::config::{ServeConfig, DEFAULT_SPOOL};
        let cfg = match &self.config {
            Some(f) => ServeConfig::load(f).map_err(|problems| {
                let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
                anyhow::anyhow!("--config {}:\n{}", f.display(), all.join("\n"))
            })?,
            None => ServeConfig::defaults(DEFAULT_SPOOL.into()),
        };
        let spool = spool.map_or(cfg.spool.clone(), Path::to_path_buf);
        let log = match (&self.log, &self.config) {
            (Some(l), _) => l.clone(),
            (None, Some(_)) => cfg.log_path(),
            // SPOOL/accounting.jsonl, as serve and send default to.
            (None, None) => spool.join("accounting.jsonl"),
        };
        Ok((log, spool))
    }
}

pub(crate) fn run(cmd: LogCmd) -> anyhow::Result<i32> {
    match cmd {
        LogCmd::Csv {
            log,
            since,
            until,
            output,
        } => csv(&log, since.as_deref(), until.as_deref(), output.as_deref()),
    }
}

fn csv(
    log: &LogArg,
    since: Option<&str>,
    until: Option<&str>,
    output: Option<&Path>,
) -> anyhow::Result<i32> {
    use volley::observe::csv::{parse_bound, write, Window};
    let bound = |flag: &str, v: Option<&str>| {
        v.map(parse_bound)
            .transpose()
            .map_err(|e| anyhow::anyhow!("{flag} {e}"))
    };
    let window = Window {
        since: bound("--since", since)?,
        until: bound("--until", until)?,
    };
    let (log, _) = log.resolve(None)?;
    let written = match output {
        Some(p) => {
            let f = std::fs::File::create(p)
                .map_err(|e| anyhow::anyhow!("--output {}: {e}", p.display()))?;
            let n = write(&log, window, std::io::BufWriter::new(f))?;
            eprintln!("volley: wrote {} records to {}", n.rows, p.display());
            n
        }
        None => write(&log, window, std::io::stdout().lock())?,
    };
    if written.unreadable > 0 {
        eprintln!(
            "volley: {} lines of {} were not accounting records and were skipped",
            written.unreadable,
            log.display()
        );
    }
    Ok(0)
}
