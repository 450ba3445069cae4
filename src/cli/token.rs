//! `volley token`: the HTTP API tokens of `volley serve`; a token is shown once and
//! only its hash is stored, so the file alone does not let anyone in.

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum TokenCmd {
    /// Make a new HTTP API token for NAME: printed once, only its SHA-256 is stored.
    /// Making one again for NAME revokes the old one.
    Add {
        name: String,
        #[arg(long)]
        tokens: PathBuf,
        /// What it may do, comma-separated: inject (queue campaigns, read their
        /// counts), read (the status, metrics and tracking, which name recipients),
        /// control (pause, resume, rates). Default: all three.
        #[arg(long, value_name = "SCOPES", value_parser = volley::serve::auth::parse_scopes)]
        scope: Option<volley::serve::auth::Scopes>,
    },
}

pub(crate) fn run(cmd: TokenCmd) -> anyhow::Result<i32> {
    match cmd {
        TokenCmd::Add {
            name,
            tokens,
            scope,
        } => {
            let token = volley::serve::auth::add_token(&tokens, &name, scope)?;
            eprintln!(
                "token {name} saved (as its SHA-256) in {}; it is shown once:",
                tokens.display()
            );
            println!("{token}");
            Ok(0)
        }
    }
}
