mod cli;

use clap::{Parser, Subcommand};
use cli::config::ConfigCmd;
use cli::dkim::DkimCmd;
use cli::log::LogCmd;
use cli::queue::QueueCmd;
use cli::send::EngineArgs;
use cli::serve::ServeArgs;
use cli::shaping::ShapingCmd;
use cli::token::TokenCmd;
use cli::track::TrackArgs;
use cli::user::UserCmd;
use cli::InsecureModes;
use std::path::PathBuf;

/// volley: a bulk email sending engine. Validates campaigns, spools them durably,
/// and delivers them over pipelined SMTP, thread-per-core.
#[derive(Parser)]
#[command(name = "volley", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate a campaign directory; lists every problem as file:line. Also checks
    /// that its From domain has a DKIM key (unless the campaign sets dkim = false).
    Check {
        /// Directory with campaign.toml, message.eml and recipients.csv.
        dir: PathBuf,
        /// DKIM keys: DIR/DOMAIN/SELECTOR.pem.
        #[arg(long, default_value = volley::message::dkim::DEFAULT_DIR)]
        dkim_dir: PathBuf,
        /// The EHLO name `send --ehlo` would be given: checked to be a fully qualified
        /// domain name or an address literal. Without it, check says when the host
        /// name (send's default) is not one.
        #[arg(long)]
        ehlo: Option<String>,
        /// List the bad rows `send --skip-bad-rows` would skip, and exit 0 when the
        /// rows are all that is wrong.
        #[arg(long)]
        skip_bad_rows: bool,
        #[command(flatten)]
        insecure: InsecureModes,
    },
    /// The DNS records a campaign's domains must publish, in zone-file form: SPF for
    /// the envelope sender's domain, the DKIM key, DMARC for the From domain.
    DnsRecords {
        dir: PathBuf,
        #[arg(long, default_value = volley::message::dkim::DEFAULT_DIR)]
        dkim_dir: PathBuf,
        /// Sending addresses for SPF (repeatable); default the campaign's pool in
        /// --shaping, else a placeholder to fill in.
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        #[arg(long)]
        shaping: Option<PathBuf>,
        #[command(flatten)]
        insecure: InsecureModes,
    },
    /// DKIM keys and signatures.
    Dkim {
        #[command(subcommand)]
        cmd: DkimCmd,
    },
    /// Queue a campaign durably and deliver it; prints a report at the end. Sending the
    /// same campaign id again resumes what is left of it in the spool.
    Send {
        dir: PathBuf,
        #[command(flatten)]
        engine: Box<EngineArgs>,
        #[command(flatten)]
        options: cli::send::SendOptions,
        #[command(flatten)]
        insecure: InsecureModes,
    },
    /// Classify SMTP replies, one per line on stdin, as the engine does: one JSON object
    /// per line out ({"reply","code","enhanced","retry","class","rule"}). A line may be a
    /// multi-line reply joined with spaces ("550-5.1.1 ... 550 5.1.1 ...") or a reply as a
    /// log or DSN shows it ("Diagnostic-Code: smtp; 550 ...", Postfix "host X said: 550
    /// ...", Exim "SMTP error from remote mail server after ...: 550 ...").
    Classify {
        /// Your rules (TOML, same format as src/classify/rules.toml), tried before the shipped ones.
        #[arg(long)]
        bounce_rules: Option<PathBuf>,
    },
    /// What happened to a campaign, from the accounting log: outcomes by class and by domain.
    Report {
        /// Campaign id (campaign.toml's id).
        campaign: String,
        /// The accounting log.
        #[arg(long, default_value = "/var/spool/volley/accounting.jsonl")]
        log: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Domains listed in the table.
        #[arg(long, default_value_t = 20)]
        domains: usize,
    },
    /// Where one recipient is: queued (shard, retry time, last reply) or delivered,
    /// bounced or expired (reply, class, MX), with every accounting record of it.
    /// Exit 0 when found, 1 when nothing is known of it.
    Track(TrackArgs),
    /// Views of the accounting log for other tools: `log csv`, PowerMTA's CSV.
    Log {
        #[command(subcommand)]
        cmd: LogCmd,
    },
    /// Traffic shaping rules: check a file, or show the merged rule for a domain.
    Shaping {
        #[command(subcommand)]
        cmd: ShapingCmd,
    },
    /// TLS towards a domain: `tls show`, the effective policy (shaping rules,
    /// MTA-STS, DANE) and where it came from; `tls tlsa`, a DANE record to publish.
    Tls {
        #[command(subcommand)]
        cmd: cli::tls::TlsCmd,
    },
    /// The MTA as a service: SMTP submission, HTTP API and pickup directory feeding
    /// the shards, until SIGTERM (SIGHUP reloads shaping and bounce rules, users and
    /// tokens).
    Serve(ServeArgs),
    /// The `volley serve` configuration file.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// SMTP AUTH users of `volley serve`.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// HTTP API tokens of `volley serve`.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Control a running `volley send` or `serve` over its admin socket
    /// (SPOOL/admin.sock): takes effect within a second, without a restart.
    Queue {
        /// The spool of the running `volley send`.
        #[arg(long, default_value = "/var/spool/volley")]
        spool: PathBuf,
        #[command(subcommand)]
        cmd: QueueCmd,
    },
}

fn main() {
    // Everything volley writes is private unless it says otherwise (host/files.rs).
    volley::host::files::private_umask();
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("volley: {e:#}");
            std::process::exit(1);
        }
    }
}

/// `--allow-insecure-modes` of the commands that read secrets.
fn insecure_modes(cmd: &Cmd) -> InsecureModes {
    match cmd {
        Cmd::Check { insecure, .. }
        | Cmd::DnsRecords { insecure, .. }
        | Cmd::Send { insecure, .. } => *insecure,
        Cmd::Serve(a) => a.insecure,
        Cmd::Dkim { cmd } => cmd.insecure(),
        _ => InsecureModes::default(),
    }
}

/// For the commands that only print: a reader that goes away (`| head`) ends the
/// command quietly, as it ends cat, rather than with a panic on the next write.
/// Not for send or serve, whose sockets must not raise SIGPIPE.
fn quiet_on_closed_pipe() {
    // SAFETY: restores the default disposition of one signal, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    insecure_modes(&cli.cmd).apply();
    if matches!(
        cli.cmd,
        Cmd::Report { .. }
            | Cmd::Log { .. }
            | Cmd::Track(_)
            | Cmd::Classify { .. }
            | Cmd::Check { .. }
            | Cmd::DnsRecords { .. }
    ) {
        quiet_on_closed_pipe();
    }
    match cli.cmd {
        Cmd::Check {
            dir,
            dkim_dir,
            ehlo,
            skip_bad_rows,
            insecure: _,
        } => cli::check::run(&dir, &dkim_dir, ehlo.as_deref(), skip_bad_rows),
        Cmd::Dkim { cmd } => cli::dkim::run(cmd),
        Cmd::DnsRecords {
            dir,
            dkim_dir,
            ip,
            shaping,
            insecure: _,
        } => cli::dns_records::run(&dir, &dkim_dir, ip, shaping.as_deref()),
        Cmd::Send {
            dir,
            engine,
            options,
            insecure: _,
        } => cli::send::run(&dir, engine.config()?, options),
        Cmd::Report {
            campaign,
            log,
            json,
            domains,
        } => cli::report::run(campaign, log, json, domains),
        Cmd::Log { cmd } => cli::log::run(cmd),
        Cmd::Track(a) => cli::track::run(a),
        Cmd::Classify { bounce_rules } => cli::classify::run(bounce_rules.as_deref()),
        Cmd::Shaping { cmd } => cli::shaping::run(cmd),
        Cmd::Tls { cmd } => cli::tls::run(cmd),
        Cmd::Serve(a) => cli::serve::run(a),
        Cmd::Config { cmd } => cli::config::run(cmd),
        Cmd::User { cmd } => cli::user::run(cmd),
        Cmd::Token { cmd } => cli::token::run(cmd),
        Cmd::Queue { spool, cmd } => cli::queue::run(spool, cmd),
    }
}
