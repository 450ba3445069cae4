use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use volley::deliver::runtime::Driver;
use volley_load::profile::{Part, Profile};
use volley_load::{bench, dns, gen, sink};

/// volley's load tool: a sink that behaves like real receivers, a campaign
/// generator, a test DNS server and a bench. Everything listens on loopback only.
#[derive(Parser)]
#[command(name = "volley-load", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole path on loopback: bundled sink + DNS, a generated campaign, volley's engine, the report.
    Demo {
        #[arg(long, default_value_t = 100_000)]
        recipients: u64,
        /// Sink profile: accept-all, realistic, or a TOML file.
        #[arg(long, default_value = "accept-all")]
        profile: String,
        #[arg(long)]
        shards: Option<usize>,
        #[arg(long, default_value_t = 1)]
        sink_threads: usize,
        #[arg(long, value_enum, default_value_t = Driver::Auto)]
        driver: Driver,
        /// Keep the demo's campaign, spool and accounting log.
        #[arg(long)]
        keep: bool,
    },
    /// Run the ESMTP sink until interrupted; SIGUSR1 writes the summary, exit writes it too.
    Sink {
        /// Profile: accept-all, realistic, or a TOML file (see loadtest/profiles/).
        #[arg(long, default_value = "accept-all")]
        profile: String,
        /// Switch a part of the profile off (repeatable).
        #[arg(long, value_enum)]
        without: Vec<Part>,
        /// Serve every provider on this port instead of the profile's (0 = any free port).
        #[arg(long)]
        port: Option<u16>,
        /// Threads (one runtime each); defaults to the number of cores.
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, value_enum, default_value_t = Driver::Auto)]
        driver: Driver,
        /// Keep every accepted message as a .eml file in this directory.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// PEM certificate chain for STARTTLS (default: a self-signed one made at start).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert (readable by its owner alone).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Where the JSON summary goes on SIGUSR1 and at exit.
        #[arg(long, default_value = "sink-summary.json")]
        summary: PathBuf,
        /// Print live counters to stderr this often (0 = never).
        #[arg(long, default_value_t = 1)]
        stats_interval_s: u64,
        /// Write the test DNS's trust anchor (its root DNSKEY) to FILE and publish a
        /// DANE-EE TLSA record (3 1 1) of --tls-cert's key at every MX host, for
        /// `volley send --dane --dnssec-trust-anchor FILE`.
        #[arg(long, value_name = "FILE", requires_all = ["dns", "tls_cert"])]
        dane_anchor: Option<PathBuf>,
        /// Also serve the test DNS on this address, routing the profile's domains here.
        #[arg(long)]
        dns: Option<SocketAddr>,
    },
    /// Write a campaign directory (campaign.toml, message.eml, recipients.csv).
    Gen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        recipients: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Approximate body size in KiB.
        #[arg(long, default_value_t = 10)]
        body_kb: usize,
        /// Named domains and percentages, e.g. gmail.com=30,yahoo.com=12; the rest goes to the tail.
        #[arg(long)]
        mix: Option<String>,
        #[arg(long, default_value_t = 3000)]
        tail_domains: u64,
        #[arg(long, default_value = "gen")]
        campaign_id: String,
        /// Recipients the sink always defers (tempfail.N@), per thousand.
        #[arg(long, default_value_t = 0)]
        tempfail_per_mille: u32,
        /// Recipients the sink always rejects (permfail.N@), per thousand.
        #[arg(long, default_value_t = 0)]
        permfail_per_mille: u32,
        /// Sign with volley's DKIM key for news.volley.test and this selector
        /// (`volley dkim keygen --domain news.volley.test`); default unsigned.
        #[arg(long)]
        dkim_selector: Option<String>,
        /// Also write this many ready-made pickup .eml files into DIR.
        #[arg(long, value_names = ["DIR", "COUNT"], num_args = 2)]
        pickup: Option<Vec<String>>,
    },
    /// Run a scenario end to end against volley, smtp-source and Postfix; prints and writes JSON + Markdown.
    Bench {
        /// smoke (2,000 messages), accept-all (100,000), realistic (100,000, volley only),
        /// shaping (volley's rate/connection caps and 421 back-off as the sink sees them),
        /// dkim (TLS and DKIM signing against the plain rate), dane (opportunistic
        /// STARTTLS against --dane with a signed TLSA record at every MX host; 50,000),
        /// submission (durable intake over SMTP: volley serve against Postfix's smtpd,
        /// both fed by smtp-source -s 50 -l 10000; 100,000 messages),
        /// or sink (volley-load sink against Postfix's smtp-sink, both driven by smtp-source).
        #[arg(long, default_value = "smoke")]
        scenario: String,
        /// Override the scenario's message count.
        #[arg(long)]
        recipients: Option<u64>,
        /// Systems to run, comma-separated (default: the scenario's).
        #[arg(long, value_enum, value_delimiter = ',')]
        systems: Option<Vec<bench::System>>,
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// The volley binary (default: next to this one, built if missing).
        #[arg(long)]
        volley: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        sink_threads: usize,
        /// volley's shard count (default: cores).
        #[arg(long)]
        shards: Option<usize>,
        /// Sink profile for the scenario's non-accept-all runs (a name or a TOML file).
        #[arg(long)]
        profile: Option<String>,
        /// Shaping rules for volley's runs on the non-accept-all profile
        /// (`volley send --shaping`), e.g. source pools for per-IP limits.
        #[arg(long)]
        shaping: Option<PathBuf>,
        /// Switch a part of the non-accept-all profile off (repeatable): what is
        /// left shows what that part costs.
        #[arg(long, value_enum)]
        without: Vec<Part>,
        /// Give the accept-all runs the same --shaping: both under one configuration.
        #[arg(long, requires = "shaping")]
        shaping_accept_all: bool,
        /// Repeat the scenario's runs this many times, alternating, and report the
        /// median ratio (smoke, accept-all, realistic, dkim and submission; the
        /// machine is noisy).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Do not count system calls and io_uring submissions: counting them puts
        /// every system call on the machine on the kernel's traced path, a few tens of
        /// ns each, which the CPU columns then include.
        #[arg(long)]
        no_syscall_count: bool,
        /// volley's accept-all run once per value, comma-separated: starttls, plain
        /// (`--tls disabled`). Ratios are to the first.
        #[arg(long, value_enum, value_delimiter = ',')]
        tls: Vec<bench::TlsColumn>,
        /// volley's accept-all run once per driver, comma-separated: io-uring, epoll,
        /// auto (each with every --tls value). Ratios are to the first.
        #[arg(long, value_enum, value_delimiter = ',')]
        driver: Vec<volley::deliver::runtime::Driver>,
        /// An earlier volley binary to run too, first, with every --tls and --driver
        /// value: each ratio is then this build's over the baseline's.
        #[arg(long, value_name = "PATH")]
        baseline: Option<PathBuf>,
    },
    /// Serve the test DNS for a profile's domains (and the edge-case domains) until interrupted.
    Dns {
        #[arg(long, default_value = "127.0.0.1:5353")]
        listen: SocketAddr,
        #[arg(long, default_value = "accept-all")]
        profile: String,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("volley-load: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Sink {
            profile,
            without,
            port,
            threads,
            driver,
            keep,
            tls_cert,
            tls_key,
            summary,
            stats_interval_s,
            dns,
            dane_anchor,
        } => {
            let dane_record = match (&dane_anchor, &tls_cert) {
                (Some(_), Some(cert)) => Some(dane_record(cert)?),
                _ => None,
            };
            let mut profile = Profile::load(&profile)?;
            for w in without {
                profile.without(w);
            }
            if let Some(p) = port {
                profile.set_port(p);
            }
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let sink = sink::Sink::start(sink::SinkOptions {
                profile,
                threads,
                driver,
                keep,
                tls_files: tls_cert.zip(tls_key),
            })?;
            for (p, addrs) in sink.profile().providers.iter().zip(&sink.addrs) {
                eprintln!(
                    "sink: {} on {}",
                    p.name,
                    addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if let Some(addr) = dns {
                let server =
                    dns::start(addr, dns::Zone::from_profile(sink.profile(), &sink.addrs))?;
                eprintln!("sink: test DNS on {}", server.addr);
                if let (Some(file), Some(record)) = (&dane_anchor, dane_record) {
                    publish_dane(&server, file, record)?;
                }
            }
            serve_until_signal(&sink, &summary, stats_interval_s)
        }
        Cmd::Demo {
            recipients,
            profile,
            shards,
            sink_threads,
            driver,
            keep,
        } => volley_load::demo::run(volley_load::demo::DemoOptions {
            recipients,
            profile,
            shards,
            sink_threads,
            driver,
            keep,
        }),
        Cmd::Gen {
            out,
            recipients,
            seed,
            body_kb,
            mix,
            tail_domains,
            campaign_id,
            tempfail_per_mille,
            permfail_per_mille,
            dkim_selector,
            pickup,
        } => {
            let mut opts = gen::GenOptions {
                recipients,
                seed,
                body_bytes: body_kb * 1024,
                tail_domains,
                campaign_id,
                tempfail_per_mille,
                permfail_per_mille,
                dkim_selector,
                ..gen::GenOptions::default()
            };
            if let Some(m) = mix {
                opts.mix = gen::parse_mix(&m)?;
            }
            let g = gen::write_campaign(&out, &opts)?;
            eprintln!(
                "gen: {} recipients over {} domains in {}",
                g.recipients,
                g.per_domain.len(),
                out.display()
            );
            if let Some(p) = pickup {
                let count: u64 = p[1]
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--pickup COUNT {:?} is not a number", p[1]))?;
                gen::write_pickup(std::path::Path::new(&p[0]), &opts, count)?;
                eprintln!("gen: {count} pickup files in {}", p[0]);
            }
            Ok(())
        }
        Cmd::Bench {
            scenario,
            recipients,
            systems,
            out,
            volley,
            sink_threads,
            shards,
            profile,
            shaping,
            without,
            shaping_accept_all,
            rounds,
            no_syscall_count,
            tls,
            driver,
            baseline,
        } => {
            if scenario == "sink" {
                let md =
                    bench::sink_comparison(recipients.unwrap_or(200_000), 10_000, sink_threads)?;
                println!("{md}");
                std::fs::create_dir_all(&out)?;
                std::fs::write(out.join("sink.md"), md)?;
                return Ok(());
            }
            bench::run(&bench::BenchOptions {
                scenario,
                recipients,
                systems,
                out,
                volley,
                sink_threads,
                shards,
                profile,
                shaping,
                without,
                shaping_accept_all,
                rounds,
                syscall_count: !no_syscall_count,
                tls,
                drivers: driver,
                baseline,
            })?;
            Ok(())
        }
        Cmd::Dns { listen, profile } => {
            let profile = Profile::load(&profile)?;
            let addrs: Vec<Vec<SocketAddr>> =
                profile.providers.iter().map(|p| p.listen.clone()).collect();
            let server = dns::start(listen, dns::Zone::from_profile(&profile, &addrs))?;
            eprintln!("dns: serving on {} (UDP and TCP)", server.addr);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

/// Prints live counters, writes the summary on SIGUSR1, and once more on SIGINT/SIGTERM before exiting.
fn serve_until_signal(
    sink: &sink::Sink,
    path: &std::path::Path,
    interval_s: u64,
) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1])?;
    let write = |why: &str| -> anyhow::Result<()> {
        let s = sink.summary();
        std::fs::write(path, serde_json::to_vec_pretty(&s)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        eprintln!("sink: summary written to {} ({why})", path.display());
        Ok(())
    };
    let mut last = 0u64;
    loop {
        for sig in signals.pending() {
            if sig == SIGUSR1 {
                write("SIGUSR1")?;
            } else {
                return write("exit");
            }
        }
        std::thread::sleep(Duration::from_millis(if interval_s == 0 {
            200
        } else {
            1000.min(interval_s * 1000)
        }));
        if interval_s > 0 {
            let s = sink.summary();
            let c = &s.counts;
            eprintln!(
                "sink: {:>8.0}s accepted {} (+{}/s) tempfail {} permfail {} dup {} corrupt {} conns {}",
                s.uptime_s,
                c.rcpts_accepted,
                c.rcpts_accepted - last,
                c.rcpt_tempfail + c.data_tempfail + c.rate_421 + c.conn_cap_421 + c.greylisted,
                c.rcpt_permfail + c.data_permfail,
                c.duplicates,
                c.corrupt,
                c.connections
            );
            last = c.rcpts_accepted;
        }
    }
}

/// The DANE-EE record of the first certificate in the PEM file `cert`. Errors: the
/// file is unreadable or holds no certificate that parses.
fn dane_record(cert: &std::path::Path) -> anyhow::Result<volley::deliver::dane::Tlsa> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(cert)
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))?;
    volley::deliver::dane::Tlsa::dane_ee(&der)
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))
}

/// Publishes `record` at `_25._tcp.HOST` for every MX host of the test DNS and
/// writes its trust anchor to `file`.
fn publish_dane(
    server: &dns::DnsServer,
    file: &std::path::Path,
    record: volley::deliver::dane::Tlsa,
) -> anyhow::Result<()> {
    std::fs::write(file, server.trust_anchor())
        .map_err(|e| anyhow::anyhow!("--dane-anchor {}: {e}", file.display()))?;
    let tlsa = hickory_proto::rr::rdata::TLSA::new(
        record.usage.into(),
        record.selector.into(),
        record.matching.into(),
        record.data.clone(),
    );
    let hosts = server
        .zone
        .write()
        .expect("zone lock")
        .set_tlsa_at_every_mx(vec![tlsa]);
    eprintln!(
        "sink: TLSA {record} at {hosts} MX hosts; trust anchor in {}",
        file.display()
    );
    Ok(())
}
