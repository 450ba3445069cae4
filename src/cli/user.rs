//! `volley user`: the SMTP AUTH users of `volley serve`, added by a command rather than
//! by hand so that each password is stored as an Argon2id hash in a mode-0600 file.

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum UserCmd {
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

pub(crate) fn run(cmd: UserCmd) -> anyhow::Result<i32> {
    match cmd {
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
    }
}
