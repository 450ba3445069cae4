use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use volley::deliver::config::EngineConfig;
use volley::deliver::runtime::Driver;
use volley::message::campaign::Campaign;
use volley::policy::shaping::rules::{parse_per, Rule, Rules, Set};
use volley::spool::ingest::{self, IngestError};

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
        /// Queue it as a new campaign instance even if this id is already in the spool.
        #[arg(long)]
        new: bool,
        /// Stop after this long (e.g. "10m"), leaving what is not done in the spool.
        #[arg(long)]
        max_wait: Option<humantime::Duration>,
        /// Write the report as JSON here too.
        #[arg(long)]
        report_json: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Queue the good rows and log each bad one as a local bounce (type Bounce,
        /// stage local, class invalid_recipient 5.1.3 for an address, content 5.6.0
        /// for a row that would make an invalid message) instead of refusing the
        /// whole campaign. A CSV syntax error still refuses it.
        #[arg(long)]
        skip_bad_rows: bool,
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
    /// Traffic shaping rules: check a file, or show the merged rule for a domain.
    Shaping {
        #[command(subcommand)]
        cmd: ShapingCmd,
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

#[derive(Subcommand)]
enum DkimCmd {
    /// Make a key: writes OUT/DOMAIN/SELECTOR.pem (the private key, mode 0600) and
    /// OUT/DOMAIN/SELECTOR.txt, and prints the DNS TXT record to publish.
    Keygen {
        #[arg(long = "type", value_enum, default_value_t = volley::message::dkim::KeyType::Rsa)]
        kind: volley::message::dkim::KeyType,
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        /// The key directory (`send --dkim-dir`).
        #[arg(long, default_value = volley::message::dkim::DEFAULT_DIR)]
        out: PathBuf,
    },
    /// Sign one message from stdin to stdout exactly as the engine does (relaxed/relaxed,
    /// the default header list); lone CR and LF are made CRLF first. Give --key and
    /// --selector once per signature (RSA and Ed25519 both, as receivers that do not
    /// know Ed25519 ignore that one): `--key r.pem --selector r --key e.pem --selector e`.
    Sign {
        /// A private key (PEM); repeat for more signatures, in the order of --selector.
        #[arg(long, required = true)]
        key: Vec<PathBuf>,
        #[arg(long)]
        domain: String,
        /// The selector of each --key, in the same order.
        #[arg(long, required = true)]
        selector: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ShapingCmd {
    /// Validate a rules file; names each bad key or value with its line.
    Check { file: PathBuf },
    /// The effective rule for DOMAIN after every layer is merged, with where each
    /// value came from. The provider is found from the domain's MX hosts.
    Show {
        domain: String,
        /// Your rules file, as given to `send --shaping`.
        #[arg(long)]
        shaping: Option<PathBuf>,
        /// MX host names to match providers by, instead of looking them up.
        #[arg(long)]
        mx: Vec<String>,
        /// Nameserver for the MX lookup (ADDR:PORT); default /etc/resolv.conf.
        #[arg(long)]
        dns: Option<std::net::SocketAddr>,
        /// A source address, to show its limits towards this destination too.
        #[arg(long)]
        source: Option<std::net::IpAddr>,
    },
}

#[derive(Args)]
struct ServeArgs {
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
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Check a `volley serve` configuration file: every bad key or value with its line.
    Check { file: PathBuf },
    /// Print a complete, commented configuration file with every default.
    Example,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add (or replace) a user for SMTP AUTH; the password is read from stdin and
    /// stored as an Argon2id hash. The file is made mode 0600.
    Add {
        name: String,
        #[arg(long)]
        users: PathBuf,
        /// Also store what CRAM-MD5 needs: the password itself, base64 (anyone who
        /// can read the file can then log in as this user).
        #[arg(long)]
        cram_md5: bool,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a new HTTP API token for NAME: printed once, only its SHA-256 is stored.
    /// Making one again for NAME revokes the old one.
    Add {
        name: String,
        #[arg(long)]
        tokens: PathBuf,
    },
}

#[derive(Subcommand)]
enum QueueCmd {
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

#[derive(Args)]
struct EngineArgs {
    /// Spool directory (created if missing).
    #[arg(long, default_value = "/var/spool/volley")]
    spool: PathBuf,
    /// Accounting log (JSON lines); default SPOOL/accounting.jsonl.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Shard threads; default the number of cores. A spool keeps the count it was created with.
    #[arg(long)]
    shards: Option<usize>,
    #[arg(long, value_enum, default_value_t = Driver::Auto)]
    driver: Driver,
    /// Nameserver to ask (ADDR:PORT); default /etc/resolv.conf.
    #[arg(long)]
    dns: Option<std::net::SocketAddr>,
    /// Port of the receiving MTAs.
    #[arg(long, default_value_t = 25)]
    smtp_port: u16,
    /// Name to send in EHLO: a fully qualified domain name (the sending address's
    /// reverse-DNS name) or an address literal like [192.0.2.1] (RFC 5321 §4.1.1.1);
    /// default the host name (localhost.localdomain, with a warning, when it has no dot).
    #[arg(long)]
    ehlo: Option<String>,
    /// DKIM keys: DIR/DOMAIN/SELECTOR.pem (`volley dkim keygen`).
    #[arg(long, default_value = volley::message::dkim::DEFAULT_DIR)]
    dkim_dir: PathBuf,
    /// Traffic shaping rules (TOML), merged over the shipped defaults and tuning/
    /// provider profiles; see `volley shaping check` and `volley shaping show`.
    #[arg(long)]
    shaping: Option<PathBuf>,
    /// Connections per destination over all shards (the rules' [default] max_connections).
    #[arg(long)]
    max_conns_per_site: Option<u32>,
    /// Messages per connection (the rules' [default] max_msgs_per_conn).
    #[arg(long)]
    max_msgs_per_conn: Option<u32>,
    /// Messages per second per destination over all shards, e.g. "100/s", "3000/min"
    /// (the rules' [default] max_msg_rate).
    #[arg(long)]
    max_msg_rate: Option<String>,
    /// Pipelined transactions in flight per connection (CHUNKING servers).
    #[arg(long)]
    window: Option<usize>,
    /// One retry schedule for every reply class, e.g. "5m,10m,20m" (the last delay repeats).
    #[arg(long)]
    retry_schedule: Option<String>,
    /// A schedule for one class, e.g. "throttled=1m,2m,4m" (repeatable; applied after --retry-schedule).
    #[arg(long)]
    retry_schedule_for: Vec<String>,
    /// Your reply classification rules, tried before the shipped ones (see `volley classify`).
    #[arg(long)]
    bounce_rules: Option<PathBuf>,
    /// STARTTLS: opportunistic (when offered), required (never in clear), disabled
    /// (the rules' [default] tls; provider and domain rules may differ).
    #[arg(long, value_enum)]
    tls: Option<volley::smtp::client::TlsMode>,
    /// Verify MX certificates against the Mozilla roots (webpki-roots) and the MX name.
    #[arg(long)]
    tls_verify: bool,
}

impl EngineArgs {
    fn config(self) -> anyhow::Result<EngineConfig> {
        let mut c = EngineConfig::new(self.spool);
        if let Some(l) = self.log {
            c.log_path = l;
        }
        if let Some(n) = self.shards {
            anyhow::ensure!(n >= 1, "--shards must be at least 1");
            c.shards = n;
        }
        c.driver = self.driver;
        let d = &mut c.defaults;
        d.tls = self.tls.map(Set::cli);
        d.tls_verify = self.tls_verify.then(|| Set::cli(true));
        c.dns.server = self.dns;
        c.smtp_port = self.smtp_port;
        if let Some(e) = ehlo_name(self.ehlo.as_deref())? {
            c.ehlo_name = e;
        }
        if let Some(n) = self.max_conns_per_site {
            anyhow::ensure!(n >= 1, "--max-conns-per-site must be at least 1");
            c.defaults.max_connections = Some(Set::cli(n));
        }
        if let Some(n) = self.max_msgs_per_conn {
            anyhow::ensure!(n >= 1, "--max-msgs-per-conn must be at least 1");
            c.defaults.max_msgs_per_conn = Some(Set::cli(n));
        }
        if let Some(r) = self.max_msg_rate {
            let r = parse_per(&r).map_err(|e| anyhow::anyhow!("--max-msg-rate: {e}"))?;
            c.defaults.max_msg_rate = Some(Set::cli(r));
        }
        c.shaping_file = self.shaping;
        c.dkim_dir = self.dkim_dir;
        // Checked now, so bad rules stop `send` before anything is queued.
        match c.rules() {
            Ok(_) => {}
            Err(problems) => {
                for p in &problems {
                    eprintln!("{p}");
                }
                anyhow::bail!("{} problem(s) in the shaping rules", problems.len());
            }
        }
        if let Some(n) = self.window {
            anyhow::ensure!((1..=256).contains(&n), "--window must be 1..=256");
            c.window = n;
        }
        if let Some(p) = self.bounce_rules {
            // Checked now, so a bad rule stops `send` before anything is queued.
            volley::policy::classify::load(Some(&p))?;
            c.bounce_rules = Some(p);
        }
        if let Some(s) = self.retry_schedule {
            c.retry = volley::policy::retry::RetryPolicy::uniform(
                volley::policy::retry::parse_schedule(&s)?,
            );
        }
        for s in self.retry_schedule_for {
            let (class, sched) = volley::policy::retry::parse_class_schedule(&s)?;
            c.retry.per_class.retain(|(k, _)| *k != class);
            c.retry.per_class.push((class, sched));
        }
        Ok(c)
    }
}

fn main() {
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("volley: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Cmd::Check {
            dir,
            dkim_dir,
            ehlo,
            skip_bad_rows,
        } => check(&dir, &dkim_dir, ehlo.as_deref(), skip_bad_rows),
        Cmd::Dkim { cmd } => dkim(cmd),
        Cmd::DnsRecords {
            dir,
            dkim_dir,
            ip,
            shaping,
        } => dns_records(&dir, &dkim_dir, ip, shaping.as_deref()),
        Cmd::Send {
            dir,
            engine,
            new,
            max_wait,
            report_json,
            quiet,
            skip_bad_rows,
        } => send(
            &dir,
            engine.config()?,
            new,
            max_wait.map(Into::into),
            report_json,
            quiet,
            skip_bad_rows,
        ),
        Cmd::Report {
            campaign,
            log,
            json,
            domains,
        } => {
            let r = volley::observe::report::report(&log, &campaign)?;
            if r.recipients_final + r.recipients_pending == 0 {
                eprintln!(
                    "volley: campaign {campaign} has no records in {}",
                    log.display()
                );
                return Ok(1);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                r.print(domains);
            }
            Ok(0)
        }
        Cmd::Classify { bounce_rules } => classify(bounce_rules.as_deref()),
        Cmd::Shaping { cmd } => shaping(cmd),
        Cmd::Serve(a) => {
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
        Cmd::Config { cmd } => match cmd {
            ConfigCmd::Check { file } => {
                let checked = volley::serve::config::ServeConfig::load(&file)
                    .and_then(|c| c.check().map(|()| c));
                match checked {
                    Ok(_) => {
                        println!("{}: ok", file.display());
                        Ok(0)
                    }
                    Err(problems) => {
                        for p in &problems {
                            println!("{p}");
                        }
                        Ok(1)
                    }
                }
            }
            ConfigCmd::Example => {
                print!("{}", volley::serve::config::EXAMPLE);
                Ok(0)
            }
        },
        Cmd::User { cmd } => match cmd {
            UserCmd::Add {
                name,
                users,
                cram_md5,
            } => {
                let mut password = String::new();
                std::io::stdin().read_line(&mut password)?;
                let password = password.trim_end_matches(['\r', '\n']);
                volley::serve::auth::add_user(&users, &name, password, cram_md5)?;
                eprintln!("user {name} saved in {}", users.display());
                Ok(0)
            }
        },
        Cmd::Token { cmd } => match cmd {
            TokenCmd::Add { name, tokens } => {
                let token = volley::serve::auth::add_token(&tokens, &name)?;
                eprintln!(
                    "token {name} saved (as its SHA-256) in {}; it is shown once:",
                    tokens.display()
                );
                println!("{token}");
                Ok(0)
            }
        },
        Cmd::Queue { spool, cmd } => {
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
    }
}

fn shaping(cmd: ShapingCmd) -> anyhow::Result<i32> {
    match cmd {
        ShapingCmd::Check { file } => match volley::policy::shaping::rules::check_file(&file) {
            Ok(()) => {
                println!("{}: ok", file.display());
                Ok(0)
            }
            Err(problems) => {
                for p in &problems {
                    eprintln!("{p}");
                }
                eprintln!("volley: {} problem(s)", problems.len());
                Ok(1)
            }
        },
        ShapingCmd::Show {
            domain,
            shaping,
            mx,
            dns,
            source,
        } => {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            let rules = match Rules::load(shaping.as_deref(), &Rule::default()) {
                Ok(r) => r,
                Err(problems) => {
                    for p in &problems {
                        eprintln!("{p}");
                    }
                    return Ok(1);
                }
            };
            let mx = if mx.is_empty() {
                lookup_mx(&domain, dns)?
            } else {
                mx
            };
            print!(
                "{}",
                volley::policy::shaping::show(&rules, &domain, &mx, source)
            );
            Ok(0)
        }
    }
}

/// The MX host names of `domain`, in the order volley would try them.
fn lookup_mx(domain: &str, server: Option<std::net::SocketAddr>) -> anyhow::Result<Vec<String>> {
    let cfg = volley::deliver::dns::DnsConfig {
        server,
        ..Default::default()
    };
    let resolver = volley::deliver::dns::Resolver::start(&cfg)?;
    let answer =
        volley::deliver::runtime::block_on(
            Driver::Auto,
            async move { resolver.lookup(domain).await },
        )?;
    match answer.route {
        volley::deliver::dns::Route::Hosts(h) => Ok(h.into_iter().map(|h| h.name).collect()),
        volley::deliver::dns::Route::NullMx => {
            anyhow::bail!("{domain} has a null MX: it takes no mail")
        }
        volley::deliver::dns::Route::NoSuchDomain(why)
        | volley::deliver::dns::Route::TempFail(why) => {
            anyhow::bail!("MX lookup for {domain}: {why}; give the hosts with --mx")
        }
    }
}

fn classify(rules: Option<&std::path::Path>) -> anyhow::Result<i32> {
    use std::io::{BufRead, Write};
    let c = volley::policy::classify::load(rules)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        // As found in logs and DSNs: wrappers dropped, a joined multi-line reply read whole.
        let v = match volley::policy::classify::parse_logged(line) {
            Ok(r) if r.is_positive() => serde_json::json!({
                "reply": line, "code": r.code, "enhanced": r.enhanced, "retry": false, "class": null, "rule": null
            }),
            Ok(r) => {
                let (v, rule) = c.classify_named(&r);
                serde_json::json!({
                    "reply": line, "code": r.code, "enhanced": r.enhanced, "retry": v.retry, "class": v.class, "rule": rule
                })
            }
            Err(e) => serde_json::json!({ "reply": line, "error": e.to_string() }),
        };
        serde_json::to_writer(&mut out, &v)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(0)
}

fn print_problems(dir: &std::path::Path, problems: &[volley::message::campaign::Problem]) {
    for p in problems {
        eprintln!("{}/{p}", dir.display());
    }
}

/// The host name, as the kernel has it ("" when it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The EHLO name `--ehlo` gives, checked (RFC 5321 §4.1.1.1: an FQDN or an address
/// literal); None without it: the engine's default, the host name, which is checked
/// too, with a warning when it has no dot (the default is then localhost.localdomain).
fn ehlo_name(given: Option<&str>) -> anyhow::Result<Option<String>> {
    if let Some(e) = given {
        let name = volley::message::campaign::check_ehlo_name(e)
            .map_err(|err| anyhow::anyhow!("--ehlo {err}"))?;
        return Ok(Some(name));
    }
    let host = host_name();
    match volley::message::campaign::default_ehlo_warning(&host) {
        Some(w) => eprintln!("volley: warning: {w}"),
        None => {
            volley::message::campaign::check_ehlo_name(&host).map_err(|err| {
                anyhow::anyhow!("no --ehlo given, and the host name is not an EHLO name: {err}")
            })?;
        }
    }
    Ok(None)
}

/// Warnings with their file and line, under the campaign directory.
fn print_warnings(dir: &std::path::Path, warnings: &[volley::message::campaign::Problem]) {
    for w in warnings {
        eprintln!("{}/{}", dir.display(), w.as_warning());
    }
}

fn check(
    dir: &std::path::Path,
    dkim_dir: &std::path::Path,
    ehlo: Option<&str>,
    skip_bad_rows: bool,
) -> anyhow::Result<i32> {
    let ehlo_ok = match ehlo_name(ehlo) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("volley: {e:#}");
            false
        }
    };
    let c = match Campaign::load(dir) {
        Ok(c) => c,
        Err(problems) => {
            print_problems(dir, &problems);
            eprintln!(
                "volley: {} problem(s); nothing was checked past them",
                problems.len()
            );
            return Ok(1);
        }
    };
    let signing = match volley::message::dkim::key_for(dkim_dir, &c.settings) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{}/campaign.toml: {e}", dir.display());
            return Ok(1);
        }
    };
    let (mut bad, mut skipped, mut good) = (0u64, 0u64, 0u64);
    let streamed = c
        .recipients(
            |_| {
                good += 1;
                Ok(())
            },
            |b| {
                if skip_bad_rows && b.error.skippable() {
                    skipped += 1;
                } else {
                    bad += 1;
                }
                if (bad + skipped) as usize <= volley::message::campaign::ERRORS_LISTED_MAX {
                    eprintln!("{}/{}", dir.display(), b.problem());
                }
            },
        )
        .map_err(|p| anyhow::anyhow!("{}/{p}", dir.display()))?;
    let rows = streamed.rows;
    if (bad + skipped) as usize > volley::message::campaign::ERRORS_LISTED_MAX {
        eprintln!(
            "... and {} more",
            (bad + skipped) as usize - volley::message::campaign::ERRORS_LISTED_MAX
        );
    }
    print_warnings(dir, &c.template_warnings);
    print_warnings(dir, &streamed.warnings);
    if bad > 0 || good == 0 {
        if rows == 0 {
            eprintln!("{}/recipients.csv: no recipients", dir.display());
        }
        eprintln!(
            "volley: campaign {} has {} bad row(s) of {rows}",
            c.settings.id,
            bad + skipped
        );
        return Ok(1);
    }
    if !ehlo_ok {
        return Ok(1);
    }
    report_compliance(dir, &c);
    if skipped > 0 {
        println!(
            "campaign {}: {skipped} bad row(s) would be skipped (--skip-bad-rows), each logged as a local bounce",
            c.settings.id
        );
    }
    match signing {
        Some(k) => println!(
            "campaign {}: ok, {good} recipients, DKIM d={} {}",
            c.settings.id,
            k.domain,
            k.keys
                .iter()
                .map(|f| format!("s={} ({})", f.selector, f.path.display()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => println!(
            "campaign {}: ok, {good} recipients, not DKIM-signed (dkim = false)",
            c.settings.id
        ),
    }
    Ok(0)
}

fn dns_records(
    dir: &std::path::Path,
    dkim_dir: &std::path::Path,
    mut ips: Vec<std::net::IpAddr>,
    shaping: Option<&std::path::Path>,
) -> anyhow::Result<i32> {
    let c = match Campaign::load(dir) {
        Ok(c) => c,
        Err(problems) => {
            print_problems(dir, &problems);
            return Ok(1);
        }
    };
    let s = &c.settings;
    if ips.is_empty() {
        let rules = Rules::load(shaping, &Rule::default()).map_err(|p| {
            anyhow::anyhow!(
                "{}",
                p.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        let pool = s.pool.as_ref().or(rules.default_pool.as_ref());
        ips = pool
            .and_then(|p| rules.pools.get(p))
            .map(|list| list.iter().map(|x| x.ip).collect())
            .unwrap_or_default();
    }
    let from = s.from_domain.to_ascii_lowercase();
    println!("; DNS records for campaign {} (From domain {from})", s.id);
    match s.sender.rsplit_once('@') {
        Some((_, sd)) => {
            let mech: Vec<String> = if ips.is_empty() {
                vec!["ip4:SENDING.IP.ADDRESS".into()]
            } else {
                ips.iter()
                    .map(|ip| match ip {
                        std::net::IpAddr::V4(v) => format!("ip4:{v}"),
                        std::net::IpAddr::V6(v) => format!("ip6:{v}"),
                    })
                    .collect()
            };
            println!("; SPF: the envelope sender's domain authorises the sending addresses");
            if ips.is_empty() {
                println!("; (no --ip and no pool: replace the placeholder, or merge with your existing SPF)");
            }
            println!(
                "{}. 3600 IN TXT \"v=spf1 {} ~all\"",
                sd.to_ascii_lowercase(),
                mech.join(" ")
            );
        }
        None => println!("; SPF: the null sender needs none"),
    }
    match volley::message::dkim::key_for(dkim_dir, s) {
        Ok(Some(k)) => {
            for f in &k.keys {
                let txt =
                    volley::message::dkim::public_txt(&f.path).map_err(|e| anyhow::anyhow!(e))?;
                println!("; DKIM: the public half of {}", f.path.display());
                println!(
                    "{}",
                    volley::message::dkim::zone_line(&k.domain, &f.selector, &txt)
                );
            }
        }
        Ok(None) => println!("; DKIM: the campaign is not signed (dkim = false)"),
        Err(e) => println!("; DKIM: {e}"),
    }
    println!("; DMARC: start at p=none with reports, then quarantine/reject once aligned");
    println!(
        "_dmarc.{from}. 3600 IN TXT \"v=DMARC1; p=none; rua=mailto:dmarc-reports@{from}; adkim=r; aspf=r\""
    );
    for w in &c.warnings {
        println!("; warning: {w}");
    }
    Ok(0)
}

/// What the bulk-sender rules added to the campaign, and what they warn about.
fn report_compliance(dir: &std::path::Path, c: &Campaign) {
    if !c.added_headers.is_empty() {
        println!(
            "campaign {}: adds {} (from campaign.toml)",
            c.settings.id,
            c.added_headers.join(", ")
        );
    }
    let per_message: Vec<&str> = [(c.add_date, "Date"), (c.add_message_id, "Message-ID")]
        .into_iter()
        .filter_map(|(on, h)| on.then_some(h))
        .collect();
    if !per_message.is_empty() {
        println!(
            "campaign {}: adds {} to each message (the template has none)",
            c.settings.id,
            per_message.join(" and ")
        );
    }
    for w in &c.warnings {
        eprintln!("{}: warning: {w}", dir.display());
    }
}

fn dkim(cmd: DkimCmd) -> anyhow::Result<i32> {
    use std::io::{Read, Write};
    match cmd {
        DkimCmd::Keygen {
            kind,
            domain,
            selector,
            out,
        } => {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            anyhow::ensure!(
                !selector.is_empty()
                    && selector
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
                "--selector {selector:?}: use letters, digits, '-' and '_'"
            );
            let path = volley::message::dkim::key_path(&out, &domain, &selector);
            anyhow::ensure!(
                !path.exists(),
                "{} exists; a new key needs a new selector (publish it, then switch)",
                path.display()
            );
            let key = volley::message::dkim::generate(kind).map_err(|e| anyhow::anyhow!(e))?;
            let dir = path.parent().expect("a file in a directory");
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            {
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                f.write_all(key.pem.as_bytes())?;
                f.sync_all()?;
            }
            let zone = volley::message::dkim::zone_line(&domain, &selector, &key.txt);
            std::fs::write(path.with_extension("txt"), format!("{zone}\n"))?;
            eprintln!("wrote {}; publish:", path.display());
            println!("{zone}");
            Ok(0)
        }
        DkimCmd::Sign {
            key,
            domain,
            selector,
        } => {
            anyhow::ensure!(
                key.len() == selector.len(),
                "{} --key and {} --selector: give one --selector for each --key, in the same order",
                key.len(),
                selector.len()
            );
            let keys: Vec<volley::message::dkim::KeyFile> = key
                .into_iter()
                .zip(selector)
                .map(|(path, selector)| volley::message::dkim::KeyFile { selector, path })
                .collect();
            let signer = volley::message::dkim::Signer::load(
                &domain,
                &keys,
                volley::message::dkim::DEFAULT_HEADERS,
            )?;
            let mut msg = Vec::new();
            std::io::stdin().read_to_end(&mut msg)?;
            let header = signer
                .sign(&mut msg, volley::message::dkim::Body::Varies)
                .map_err(|e| anyhow::anyhow!("stdin: {e}; nothing signed"))?;
            let mut out = std::io::stdout().lock();
            out.write_all(header.as_bytes())?;
            out.write_all(&msg)?;
            out.flush()?;
            Ok(0)
        }
    }
}

/// Hands the campaign in `dir` to the `volley serve` that holds `spool`, over its
/// admin socket, and follows its progress until every recipient is done (0), or
/// until `max_wait` or a signal (75: the daemon goes on delivering).
fn hand_over(
    dir: &std::path::Path,
    campaign: &Campaign,
    spool: &std::path::Path,
    new: bool,
    max_wait: Option<Duration>,
    quiet: bool,
) -> anyhow::Result<i32> {
    use std::sync::atomic::Ordering;
    let abs = dir
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let verb = if new { "inject-new" } else { "inject" };
    let line = format!("{verb} {}", abs.display());
    let answer =
        match volley::deliver::control::request_waiting(spool, &line, Duration::from_secs(600)) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("{e:#}");
                eprintln!("volley: the running volley serve refused the campaign; nothing queued");
                return Ok(1);
            }
        };
    let words: Vec<&str> = answer.split_whitespace().collect();
    let (instance, queued) = match words.as_slice() {
        ["ok:", "queued", n, "instance", m] => (m.parse::<u32>()?, Some(n.parse::<u64>()?)),
        ["ok:", "running", "instance", m] => (m.parse::<u32>()?, None),
        _ => anyhow::bail!("unexpected answer from volley serve: {answer}"),
    };
    match queued {
        Some(n) => println!(
            "queued {n} recipients of campaign {} (instance {instance}) in the running volley serve",
            campaign.settings.id
        ),
        None => eprintln!(
            "volley: campaign {} is already in the running volley serve (instance {instance}); following it (--new queues it again)",
            campaign.settings.id
        ),
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let started = std::time::Instant::now();
    let bar = (!quiet).then(|| {
        let b = indicatif::ProgressBar::new(queued.unwrap_or(0));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} done, {per_sec}, eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    });
    let counts = loop {
        let a = volley::deliver::control::request(spool, &format!("progress {instance}"))?;
        // "ok: delivered D bounced B expired E deferrals T queued Q running S/N"
        let n: Vec<u64> = a
            .split(|c: char| c.is_whitespace() || c == '/')
            .filter_map(|w| w.parse().ok())
            .collect();
        anyhow::ensure!(
            n.len() == 7,
            "unexpected progress answer from volley serve: {a}"
        );
        if let Some(b) = &bar {
            let done = n[0] + n[1] + n[2];
            b.set_length(done + n[4]);
            b.set_position(done);
            b.set_message(format!(
                "delivered {} bounced {} expired {} deferrals {}",
                n[0], n[1], n[2], n[3]
            ));
        }
        let out_of_time = max_wait.is_some_and(|w| started.elapsed() >= w);
        let all_running = n[5] >= n[6];
        if (all_running && n[4] == 0) || stop.load(Ordering::Relaxed) || out_of_time {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    println!("delivered    {}", counts[0]);
    println!("bounced      {}", counts[1]);
    println!("expired      {}", counts[2]);
    println!("deferrals    {} (temporary failures, retried)", counts[3]);
    println!(
        "still queued {}{}",
        counts[4],
        if counts[4] > 0 {
            " (the running volley serve goes on delivering them)"
        } else {
            ""
        }
    );
    Ok(if counts[4] > 0 { 75 } else { 0 })
}

fn send(
    dir: &std::path::Path,
    cfg: EngineConfig,
    new: bool,
    max_wait: Option<Duration>,
    report_json: Option<PathBuf>,
    quiet: bool,
    skip_bad_rows: bool,
) -> anyhow::Result<i32> {
    let campaign = match Campaign::load(dir) {
        Ok(c) => c,
        Err(problems) => {
            print_problems(dir, &problems);
            eprintln!("volley: campaign refused, nothing queued");
            return Ok(1);
        }
    };
    report_compliance(dir, &campaign);
    print_warnings(dir, &campaign.template_warnings);
    if let Err(e) = volley::message::dkim::key_for(&cfg.dkim_dir, &campaign.settings) {
        eprintln!("{}/campaign.toml: {e}", dir.display());
        eprintln!("volley: campaign refused, nothing queued");
        return Ok(1);
    }
    let mut cfg = cfg;
    let lock = match ingest::lock_spool(&cfg.spool_dir, cfg.shards) {
        Ok(l) => l,
        Err(e) if e.downcast_ref::<ingest::SpoolBusy>().is_some() => {
            // A running `volley serve` holds it: the campaign goes to the daemon.
            return hand_over(dir, &campaign, &cfg.spool_dir, new, max_wait, quiet)
                .map_err(|h| h.context(e));
        }
        Err(e) => return Err(e),
    };
    cfg.shards = lock.shards;
    let existing = ingest::load_instances(&cfg.spool_dir)?;
    let mut skipped = 0u64;
    let resumed = existing
        .values()
        .find(|i| i.settings.id == campaign.settings.id)
        .map(|i| i.no);
    match resumed {
        Some(no) if !new => eprintln!(
            "volley: campaign {} is already in the spool (instance {no}); resuming what is left (--new queues it again)",
            campaign.settings.id
        ),
        _ => match ingest::ingest_with(
            &campaign,
            &cfg.spool_dir,
            cfg.shards,
            cfg.segment_bytes,
            &ingest::IngestOptions {
                skip_bad_rows,
                log: Some(cfg.log_path.clone()),
            },
        ) {
            Ok(i) => {
                for p in &i.skipped_listed {
                    eprintln!("{}/{p} (skipped)", dir.display());
                }
                if i.skipped as usize > i.skipped_listed.len() {
                    eprintln!("... and {} more", i.skipped as usize - i.skipped_listed.len());
                }
                print_warnings(dir, &i.warnings);
                println!(
                    "queued {} recipients of campaign {} (instance {}) in {:.2} s",
                    i.recipients,
                    campaign.settings.id,
                    i.instance,
                    i.elapsed.as_secs_f64()
                );
                if i.skipped > 0 {
                    println!(
                        "skipped {} bad row(s), logged as local bounces in {}",
                        i.skipped,
                        cfg.log_path.display()
                    );
                }
                skipped = i.skipped;
            }
            Err(IngestError::Problems(problems, total)) => {
                print_problems(dir, &problems);
                if total as usize > problems.len() {
                    eprintln!("... and {} more", total as usize - problems.len());
                }
                eprintln!("volley: campaign refused ({total} bad row(s)), nothing queued{}", if skip_bad_rows { "" } else { "; --skip-bad-rows queues the good rows and logs each bad one as a bounce" });
                return Ok(1);
            }
            Err(IngestError::Other(e)) => return Err(e.context("ingest failed, nothing queued")),
        },
    }
    let instances = Arc::new(ingest::load_instances(&cfg.spool_dir)?);
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    if let Some(d) = max_wait {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(d);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let report = volley::deliver::engine::run(cfg, instances, stop, !quiet)?;
    report.print();
    if skipped > 0 {
        println!("skipped      {skipped} (bad rows of recipients.csv, not queued; logged as local bounces)");
    }
    if let Some(p) = report_json {
        let mut json = serde_json::to_value(&report)?;
        json["skipped"] = skipped.into();
        std::fs::write(&p, serde_json::to_vec_pretty(&json)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    }
    drop(lock);
    Ok(if report.remaining > 0 { 75 } else { 0 })
}
