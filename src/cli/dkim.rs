//! `volley dkim`: keys made where `send --dkim-dir` looks for them, and one message
//! signed with the engine's own signer, so a signature can be checked outside a run.

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum DkimCmd {
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
        #[command(flatten)]
        insecure: super::InsecureModes,
    },
}

impl DkimCmd {
    /// `--allow-insecure-modes` where the command reads a key.
    pub(crate) fn insecure(&self) -> super::InsecureModes {
        match self {
            DkimCmd::Sign { insecure, .. } => *insecure,
            DkimCmd::Keygen { .. } => super::InsecureModes::default(),
        }
    }
}

pub(crate) fn run(cmd: DkimCmd) -> anyhow::Result<i32> {
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
            insecure: _,
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
