//! `volley tls show DOMAIN`: the TLS a delivery to a domain gets, and why: the
//! shaping rules' `tls` and `tls_verify` with where each came from, and the domain's
//! MTA-STS policy looked up and fetched now (and the one a spool keeps), with the MX
//! hosts it allows, and with `--dane` each MX host's TLSA records and their DNSSEC
//! status. Writes nothing.

use clap::Subcommand;
use std::path::PathBuf;
use volley::deliver::dane::Dane;
use volley::deliver::dns::{DaneSettings, DnsConfig, MxHost, Resolver, Route};
use volley::deliver::mta_sts::{self, Cached, Sts, StsSettings};
use volley::deliver::runtime::Driver;
use volley::policy::mta_sts::Mode;

#[derive(Subcommand)]
pub(crate) enum TlsCmd {
    /// The effective TLS policy for DOMAIN and its sources: shaping rules and
    /// MTA-STS (record id, mode, mx patterns, max_age, when fetched or cached), and
    /// with --dane each MX host's TLSA records (RFC 7672).
    Show(ShowArgs),
    /// The DANE TLSA record (RFC 7672) to publish for an MX host that serves the
    /// certificate in FILE: DANE-EE, its key's SHA-256 (3 1 1), as a zone file line.
    Tlsa {
        /// The host's PEM certificate (the first of a chain).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// The MX host name the record is for.
        #[arg(long)]
        host: String,
    },
}

/// `volley tls show`'s arguments.
#[derive(clap::Args)]
pub(crate) struct ShowArgs {
    /// The recipient domain.
    domain: String,
    /// Your rules file, as given to `send --shaping`.
    #[arg(long)]
    shaping: Option<PathBuf>,
    /// Nameserver (ADDR:PORT); default /etc/resolv.conf.
    #[arg(long)]
    dns: Option<std::net::SocketAddr>,
    /// CA certificates trusted besides webpki-roots' (as `send --tls-roots`).
    #[arg(long, value_name = "FILE")]
    tls_roots: Option<PathBuf>,
    /// A spool whose cached MTA-STS policy to show too (read, never written).
    #[arg(long)]
    spool: Option<PathBuf>,
    /// The HTTPS port of the policy host (443).
    #[arg(long, default_value_t = 443, hide = true)]
    mta_sts_port: u16,
    /// Look up each MX host's TLSA records with DNSSEC validation (as `send --dane`).
    #[arg(long)]
    dane: bool,
    /// DNSKEY records to validate from instead of the IANA root keys (as `send
    /// --dnssec-trust-anchor`).
    #[arg(long, value_name = "FILE", requires = "dane")]
    dnssec_trust_anchor: Option<PathBuf>,
}

pub(crate) fn run(cmd: TlsCmd) -> anyhow::Result<i32> {
    match cmd {
        TlsCmd::Show(args) => show(args),
        TlsCmd::Tlsa { cert, host } => tlsa(&cert, &host),
    }
}

/// What a delivery to the domain gets, printed.
fn show(args: ShowArgs) -> anyhow::Result<i32> {
    let ShowArgs {
        domain,
        shaping,
        dns,
        tls_roots,
        spool,
        mta_sts_port,
        dane,
        dnssec_trust_anchor,
    } = args;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let Some(rules) = super::shaping::rules_or_say(shaping.as_deref()) else {
        return Ok(1);
    };
    let roots = match &tls_roots {
        Some(p) => volley::deliver::tls::read_roots(p)
            .map_err(|why| anyhow::anyhow!("--tls-roots {}: {why}", p.display()))?,
        None => Vec::new(),
    };
    let settings = StsSettings {
        cache_dir: None,
        https_port: mta_sts_port,
        tls: volley::deliver::tls::client_config(true, &roots),
    };
    let resolver = Resolver::start(
        &DnsConfig {
            server: dns,
            dane: dane.then_some(DaneSettings {
                trust_anchor: dnssec_trust_anchor,
            }),
            ..Default::default()
        },
        Some(settings),
    )?;
    let d = domain.clone();
    let answer =
        volley::deliver::runtime::block_on(Driver::Auto, async move { resolver.lookup(&d).await })?;
    let mx: Vec<MxHost> = match &answer.route {
        Route::Hosts(h) => h.clone(),
        Route::NullMx => anyhow::bail!("{domain} has a null MX: it takes no mail"),
        Route::NoSuchDomain(why) | Route::TempFail(why) => anyhow::bail!("{why}"),
    };
    let hosts: Vec<String> = mx.iter().map(|h| h.name.clone()).collect();
    println!("domain          {domain}");
    println!("MX              {}", hosts.join(", "));
    let provider = rules.provider_for(hosts.iter().map(String::as_str));
    let rule = rules.effective(&domain, provider);
    let (tls, tls_from) = rule
        .tls
        .as_ref()
        .map_or(("opportunistic".to_string(), "default".to_string()), |s| {
            (format!("{:?}", s.value).to_lowercase(), s.from.to_string())
        });
    let (verify, verify_from) = rule
        .tls_verify
        .as_ref()
        .map_or((false, "default".to_string()), |s| {
            (s.value, s.from.to_string())
        });
    println!("shaping rules   tls {tls} ({tls_from}), tls_verify {verify} ({verify_from})");
    let spool_cached = spool
        .as_ref()
        .map(|dir| mta_sts::read_cached(&dir.join("mta-sts"), &domain));
    // The policy in force: the one fetched now, or else the spool's while it is valid
    // (a daemon keeps it over a failed fetch).
    let now = std::time::SystemTime::now();
    let in_force: Option<&Cached> = answer.sts.policy().or_else(|| {
        spool_cached
            .as_ref()
            .and_then(Option::as_ref)
            .filter(|c| c.valid_at(now))
    });
    match &answer.sts {
        Sts::None => println!("MTA-STS         none (no _mta-sts record)"),
        Sts::Unavailable(why) => println!("MTA-STS         none fetched now: {why}"),
        Sts::Policy { cached, note } => {
            println!("MTA-STS         {}", describe(cached));
            println!(
                "                fetched now from https://mta-sts.{domain}/.well-known/mta-sts.txt"
            );
            if let Some(n) = note {
                println!("                {n}");
            }
        }
    }
    if let Some(c) = &spool_cached {
        match c {
            Some(c) => println!(
                "spool's cache   {} ({})",
                describe(c),
                if c.valid_at(now) { "valid" } else { "expired" }
            ),
            None => println!("spool's cache   no policy of {domain}"),
        }
    }
    let enforced = in_force.map(|c| {
        let allowed: Vec<&str> = hosts
            .iter()
            .filter(|h| c.policy.allows(h))
            .map(String::as_str)
            .collect();
        println!(
            "MX it allows    {} (policy id {})",
            if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            },
            c.id
        );
        (c.policy.mode == Mode::Enforce).then_some(allowed)
    });
    let mut label = "DANE           ";
    for h in &mx {
        let what = match (&h.dane, dane) {
            (_, false) => "not checked (give --dane)".to_string(),
            (Dane::Tlsa(d), true) => format!("TLSA {} (DNSSEC secure)", d.describe()),
            (Dane::None, true) => {
                "none (no TLSA records, or its zone is not DNSSEC-signed)".to_string()
            }
            (Dane::Failed(why), true) => why.clone(),
        };
        println!("{label} {}: {what}", h.name);
        label = "               ";
    }
    for h in &mx {
        if let Dane::Tlsa(d) = &h.dane {
            println!(
                "in effect       {}: TLS required, {} (DANE, before MTA-STS)",
                h.name,
                if d.verifies() {
                    "certificate checked against its TLSA records"
                } else {
                    "certificate not checked (no usable TLSA record)"
                }
            );
        }
    }
    // The lines above cover the hosts under DANE; this one the others.
    let others: Vec<&str> = mx
        .iter()
        .filter(|h| !matches!(h.dane, Dane::Tlsa(_)))
        .map(|h| h.name.as_str())
        .collect();
    if others.is_empty() {
        return Ok(0);
    }
    if others.len() < mx.len() {
        println!("other hosts     {}:", others.join(", "));
    }
    match enforced.flatten() {
        Some(allowed) if allowed.is_empty() => println!(
            "in effect       nothing is sent: no MX host matches the enforced policy (deferred, class policy)"
        ),
        Some(allowed) => println!(
            "in effect       TLS required, certificate verified for the MX name, to {} only (MTA-STS enforce)",
            allowed.join(", ")
        ),
        None => println!(
            "in effect       tls {tls}, certificate {} (shaping rules)",
            if verify { "verified" } else { "not verified" }
        ),
    }
    Ok(0)
}

/// Prints the DANE-EE record for `host` serving the certificate in `cert`.
/// Errors: the file is unreadable or its first certificate does not parse.
fn tlsa(cert: &std::path::Path, host: &str) -> anyhow::Result<i32> {
    use rustls::pki_types::pem::PemObject;
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    volley::smtp::names::check_domain(&host).map_err(|e| {
        anyhow::anyhow!("--host {host:?}: {e}; give the MX host's name, e.g. mx1.example.com")
    })?;
    let der = rustls::pki_types::CertificateDer::from_pem_file(cert).map_err(|e| {
        anyhow::anyhow!(
            "--cert {}: no PEM certificate in it ({e}); give the certificate the host serves (BEGIN CERTIFICATE), not its key",
            cert.display()
        )
    })?;
    let record = volley::deliver::dane::Tlsa::dane_ee(&der)
        .map_err(|e| anyhow::anyhow!("--cert {}: {e}", cert.display()))?;
    println!("_25._tcp.{host}. IN TLSA {record}");
    Ok(0)
}

fn describe(c: &Cached) -> String {
    format!(
        "id {}, {}; fetched {}",
        c.id,
        c.policy,
        humantime::format_rfc3339_seconds(c.fetched_at)
    )
}
