//! `volley shaping`: a rules file validated on its own, and the merged rule for one
//! domain with where each value came from, so a limit can be explained before a send.

use clap::Subcommand;
use std::path::PathBuf;
use volley::deliver::runtime::Driver;
use volley::policy::shaping::rules::{Rule, Rules};

#[derive(Subcommand)]
pub(crate) enum ShapingCmd {
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

pub(crate) fn run(cmd: ShapingCmd) -> anyhow::Result<i32> {
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
            let Some(rules) = rules_or_say(shaping.as_deref()) else {
                return Ok(1);
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

/// The shaping rules with the operator's file `shaping`, as a send merges them;
/// None after printing each problem with its file and line.
pub(crate) fn rules_or_say(shaping: Option<&std::path::Path>) -> Option<Rules> {
    match Rules::load(shaping, &Rule::default()) {
        Ok(r) => Some(r),
        Err(problems) => {
            for p in &problems {
                eprintln!("{p}");
            }
            None
        }
    }
}

/// The MX host names of `domain`, in the order volley would try them.
fn lookup_mx(domain: &str, server: Option<std::net::SocketAddr>) -> anyhow::Result<Vec<String>> {
    let cfg = volley::deliver::dns::DnsConfig {
        server,
        ..Default::default()
    };
    let resolver = volley::deliver::dns::Resolver::start(&cfg, None)?;
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
