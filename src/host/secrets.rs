//! Secrets checked at load, as ssh checks a private key: a DKIM key, the users file,
//! the tokens file or a TLS key that the group or others may access (any of mode
//! [`OTHERS_BITS`]), or that belongs to a user other than the one volley runs as (or
//! root), is refused, with the command that fixes it. Such a file may already have
//! been copied by someone else; using it silently would hide that.
//!
//! `--allow-insecure-modes` (on `send`, `serve` and the other commands that read a
//! key) turns the refusal into a warning: [`allow_insecure_modes`], called once from
//! main. It is a process-wide setting, not a parameter, because the checks sit where
//! each secret is read (the shards' key loading, the daemon's SIGHUP reload, the
//! listeners' TLS setup), several rooms down from the command line; a flag that is
//! per process by nature would otherwise be threaded through every one of those
//! signatures. It starts off, so the library's own users (the tests) get the check.

use crate::host::accounts;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Mode bits that make a secret reachable by the group or others.
pub const OTHERS_BITS: u32 = 0o077;

/// Largest key file (DKIM or TLS) read, in octets: a 16384-bit RSA key in PEM is
/// about 13 KB, a certificate chain is not read through here.
pub const KEY_OCTETS_MAX: u64 = 1 << 20;

/// Distinct files warned about under `--allow-insecure-modes`: each is named once
/// (the shards each load every key), and past this many the rest still warn each time.
const WARNED_PATHS_MAX: usize = 256;

static ALLOW_INSECURE: AtomicBool = AtomicBool::new(false);
static WARNED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// `--allow-insecure-modes`: from now on a secret with open modes or another owner is
/// used, with one warning line per file on stderr, instead of refused.
pub fn allow_insecure_modes() {
    ALLOW_INSECURE.store(true, Ordering::Relaxed);
}

/// What a secret file is, as messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secret {
    DkimKey,
    UsersFile,
    TokensFile,
    TlsKey,
    /// A `[[webhook]]`'s `bearer_token_file`.
    WebhookToken,
    /// A `[[webhook]]`'s `hmac_secret_file`.
    WebhookHmacSecret,
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Secret::DkimKey => "DKIM private key",
            Secret::UsersFile => "users file",
            Secret::TokensFile => "tokens file",
            Secret::TlsKey => "TLS private key",
            Secret::WebhookToken => "webhook bearer token file",
            Secret::WebhookHmacSecret => "webhook HMAC secret file",
        })
    }
}

/// Why a secret was not read. The text names the file, what it is and what to do;
/// it never holds any of the file's content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    // `err`, not `source`: said once here, not again as the cause below it.
    #[error("{what} {}: cannot read it: {err}; check the path and that the user volley runs as may read it", path.display())]
    Read {
        what: Secret,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("{what} {}: not a regular file (a FIFO, device or directory); name the file itself", path.display())]
    NotAFile { what: Secret, path: PathBuf },
    #[error("{what} {}: {octets} octets, over the limit of {max}; is this the right file?", path.display())]
    TooBig {
        what: Secret,
        path: PathBuf,
        octets: u64,
        max: u64,
    },
    #[error(
        "{0}; refused, as ssh refuses such a private key (--allow-insecure-modes uses it anyway)"
    )]
    Insecure(Problem),
}

/// What is wrong with a secret's mode or owner, and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: Secret,
    pub path: PathBuf,
    /// The file's permission bits.
    pub mode: u32,
    /// The file's owner, and the user volley runs as.
    pub owner: u32,
    pub euid: u32,
}

impl Problem {
    fn open_modes(&self) -> bool {
        self.mode & OTHERS_BITS != 0
    }

    fn wrong_owner(&self) -> bool {
        self.owner != self.euid && self.owner != 0
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.path.display();
        let mut fixes = Vec::new();
        write!(f, "{} {p}", self.what)?;
        if self.open_modes() {
            let who = match (self.mode & 0o070 != 0, self.mode & 0o007 != 0) {
                (true, true) => "its group and other users",
                (true, false) => "its group",
                _ => "other users",
            };
            write!(f, " is mode {:04o}: {who} may use it", self.mode)?;
            fixes.push(format!("chmod 600 {p}"));
        }
        if self.wrong_owner() {
            let sep = if self.open_modes() { ", and it" } else { "" };
            write!(
                f,
                "{sep} is owned by {}, not by {} who runs volley (nor root)",
                accounts::describe_user(self.owner),
                accounts::describe_user(self.euid)
            )?;
            let me = accounts::user(self.euid).map_or(self.euid.to_string(), |u| u.0);
            fixes.push(format!("chown {me} {p}"));
        }
        write!(f, "; fix: {}", fixes.join(" && "))
    }
}

/// The problem with a secret of `mode` owned by `owner` when volley runs as `euid`,
/// if there is one: the rule ssh applies to private keys.
pub fn check(what: Secret, path: &Path, mode: u32, owner: u32, euid: u32) -> Option<Problem> {
    let p = Problem {
        what,
        path: path.to_path_buf(),
        mode: mode & 0o7777,
        owner,
        euid,
    };
    (p.open_modes() || p.wrong_owner()).then_some(p)
}

/// Reads the secret at `path` (following a symbolic link, as a Let's Encrypt `live/`
/// key is one), at most `max_octets`, after checking the mode and owner of what was
/// opened (fstat of the open file, so what is checked is what is read).
///
/// Errors: the file cannot be read, is over `max_octets`, or (unless
/// [`allow_insecure_modes`]) its mode or owner fails [`check`].
pub fn read(path: &Path, what: Secret, max_octets: u64) -> Result<Vec<u8>, SecretError> {
    let read_err = |err| SecretError::Read {
        what,
        path: path.to_path_buf(),
        err,
    };
    // O_NONBLOCK: a FIFO put in the file's place must not hang the start or a
    // SIGHUP waiting for a writer; it is refused below, as anything not a file is.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_err)?
    };
    let meta = file.metadata().map_err(read_err)?;
    if !meta.file_type().is_file() {
        return Err(SecretError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    if let Some(problem) = check(what, path, meta.mode(), meta.uid(), accounts::euid()) {
        refuse_or_warn(problem)?;
    }
    if meta.len() > max_octets {
        return Err(SecretError::TooBig {
            what,
            path: path.to_path_buf(),
            octets: meta.len(),
            max: max_octets,
        });
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    file.take(max_octets)
        .read_to_end(&mut out)
        .map_err(read_err)?;
    Ok(out)
}

fn refuse_or_warn(problem: Problem) -> Result<(), SecretError> {
    if !ALLOW_INSECURE.load(Ordering::Relaxed) {
        return Err(SecretError::Insecure(problem));
    }
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.contains(&problem.path) {
        return Ok(());
    }
    if warned.len() < WARNED_PATHS_MAX {
        warned.push(problem.path.clone());
    }
    eprintln!("volley: warning: {problem}; used anyway (--allow-insecure-modes)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn group_or_world_access_and_a_foreign_owner_are_refused_with_the_fix() {
        let p = Path::new("/etc/volley/dkim/news.test/s1.pem");
        assert_eq!(check(Secret::DkimKey, p, 0o100600, 1000, 1000), None);
        assert_eq!(check(Secret::DkimKey, p, 0o400, 0, 1000), None, "root's");
        let e = check(Secret::DkimKey, p, 0o100644, 1000, 1000).unwrap();
        assert_eq!(
            e.to_string(),
            "DKIM private key /etc/volley/dkim/news.test/s1.pem is mode 0644: its group and other users may use it; fix: chmod 600 /etc/volley/dkim/news.test/s1.pem"
        );
        let e = check(Secret::UsersFile, Path::new("/u"), 0o640, 0, 0).unwrap();
        assert!(e.to_string().contains("mode 0640: its group may"), "{e}");
        let e = check(Secret::TokensFile, Path::new("/t"), 0o602, 0, 0).unwrap();
        assert!(e.to_string().contains("other users may"), "{e}");
        let e = check(Secret::TlsKey, Path::new("/k"), 0o600, 4_000_002, 4_000_001).unwrap();
        let text = e.to_string();
        assert!(
            text.starts_with("TLS private key /k is owned by uid 4000002, not by uid 4000001"),
            "{text}"
        );
        assert!(text.ends_with("fix: chown 4000001 /k"), "{text}");
        let e = check(Secret::TlsKey, Path::new("/k"), 0o660, 1, 0).unwrap();
        assert!(
            e.to_string()
                .ends_with("fix: chmod 600 /k && chown root /k"),
            "{e}"
        );
    }

    #[test]
    fn read_refuses_an_open_file_and_reads_a_private_one() {
        let dir = std::env::temp_dir().join(format!("volley-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("key.pem");
        std::fs::write(&f, "s3kr1t").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read(&f, Secret::DkimKey, 100).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(!e.contains("s3kr1t"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read(&f, Secret::DkimKey, 100).unwrap(), b"s3kr1t");
        let e = read(&f, Secret::DkimKey, 3).unwrap_err().to_string();
        assert!(e.contains("6 octets, over the limit of 3"), "{e}");
        let e = read(&dir.join("none"), Secret::TlsKey, 3)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("TLS private key"), "{e}");
        // A FIFO in a secret's place is refused at once, not waited on for a writer.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read(&fifo, Secret::UsersFile, 100).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
