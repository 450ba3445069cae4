//! The command line, one module per `volley` command (its own arguments and the code
//! that runs it), so main.rs holds only the clap tree and the dispatch and a command
//! is found by its name. What several commands share lives here, so that problems,
//! warnings, the EHLO name and the compliance summary are reported one way.

use volley::message::campaign::Campaign;

pub(crate) mod check;
pub(crate) mod classify;
pub(crate) mod config;
pub(crate) mod dkim;
pub(crate) mod dns_records;
pub(crate) mod log;
pub(crate) mod queue;
pub(crate) mod report;
pub(crate) mod send;
pub(crate) mod serve;
pub(crate) mod shaping;
pub(crate) mod tls;
pub(crate) mod token;
pub(crate) mod track;
pub(crate) mod user;

/// `--allow-insecure-modes`, on every command that reads a secret (a DKIM key, the
/// users or tokens file, a TLS key).
#[derive(clap::Args, Clone, Copy, Default)]
pub(crate) struct InsecureModes {
    /// Use a DKIM key, users, tokens or TLS key file that the group or others may
    /// read, or that another user owns, with a warning, instead of refusing it as ssh
    /// refuses such a private key. For tests; fix the file instead (chmod 600).
    #[arg(long)]
    pub(crate) allow_insecure_modes: bool,
}

impl InsecureModes {
    /// Turns the refusal into a warning for the whole process (host/secrets.rs).
    pub(crate) fn apply(self) {
        if self.allow_insecure_modes {
            volley::host::secrets::allow_insecure_modes();
        }
    }
}

pub(super) fn print_problems(
    dir: &std::path::Path,
    problems: &[volley::message::campaign::Problem],
) {
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
pub(super) fn ehlo_name(given: Option<&str>) -> anyhow::Result<Option<String>> {
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
pub(super) fn print_warnings(
    dir: &std::path::Path,
    warnings: &[volley::message::campaign::Problem],
) {
    for w in warnings {
        eprintln!("{}/{}", dir.display(), w.as_warning());
    }
}

/// What the bulk-sender rules added to the campaign, and what they warn about.
pub(super) fn report_compliance(dir: &std::path::Path, c: &Campaign) {
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
