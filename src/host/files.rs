//! Private by default. The spool holds every recipient of every campaign (addresses
//! and merge values) and whole submitted messages; the accounting log holds every
//! recipient and every reply. Like Postfix's queue, they are the service user's
//! alone: volley's writing commands run with umask [`UMASK`], so every file they
//! create is 0600 and every directory 0700, and an existing spool is made private
//! when it is opened. The accounting log is the one exception, [`LOG_MODE`], so a
//! log shipper in a configured group can read it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The umask of `send`, `serve` and the other commands that write: nothing for the
/// group or others.
pub const UMASK: libc::mode_t = 0o077;

/// The accounting log and its rotated files: owner read-write, group read.
pub const LOG_MODE: u32 = 0o640;

/// Sets the process umask to [`UMASK`]; called once at start, before any file is made.
pub fn private_umask() {
    // SAFETY: umask only swaps the process's file mode mask.
    unsafe { libc::umask(UMASK) };
}

/// Why a directory volley writes into is refused ([`check_own_dir`]); each says
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{what} {}: {source}", dir.display())]
    Unreadable {
        what: String,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {} is a symbolic link; name the directory itself (readlink -f {})", dir.display(), dir.display())]
    Link { what: String, dir: PathBuf },
    /// Another user's: volley may not write in it (it may still reach a daemon's
    /// admin socket there).
    #[error("{what} {} belongs to {owner}, not to {me} who runs volley; {fix}", dir.display())]
    NotOwner {
        what: String,
        dir: PathBuf,
        owner: String,
        me: String,
        /// Run as the owner, or (a directory of volley's own) take it over; a shared
        /// one (/var/log, /tmp) is never to be taken: use a directory of its own.
        fix: String,
    },
    #[error("{what} {} is mode {mode:04o}: others may write in it and plant links where volley writes; chmod go-w {}, or use a directory of volley's own", dir.display(), dir.display())]
    Writable {
        what: String,
        dir: PathBuf,
        mode: u32,
    },
}

/// Replaces `path` with `contents` whole: written to `PATH.tmp`, then renamed over
/// it, so a reader or a crash sees the old file or the new one, never half of one.
/// Errors: the write or the rename failed.
pub fn replace_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// Checks a directory volley writes into (the spool, the accounting log's), as sshd's
/// StrictModes checks a home: it must belong to the user volley runs as and be
/// writable by nobody else. Otherwise that owner, or anyone who may write there,
/// could plant a link where volley creates a file, and a volley run as root would
/// write, truncate or chmod whatever the link names. `what` names it in the error.
/// Errors: [`DirError`], each with its fix.
pub fn check_own_dir(dir: &Path, what: &str) -> Result<(), DirError> {
    use crate::host::accounts::{describe_user, euid, user};
    let what = what.to_string();
    let meta = std::fs::symlink_metadata(dir).map_err(|source| DirError::Unreadable {
        what: what.clone(),
        dir: dir.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(DirError::Link {
            what,
            dir: dir.to_path_buf(),
        });
    }
    let me = euid();
    if meta.uid() != me {
        let owner_name = user(meta.uid()).map_or(meta.uid().to_string(), |(n, _)| n);
        let me_name = user(me).map_or(me.to_string(), |(n, _)| n);
        // Root's (/var/log, /tmp, a parent of many things) is never to be taken
        // over; another user's may be, or used as that user.
        let fix = match meta.uid() == 0 {
            true => format!("use a directory of its own (install -d -o {me_name} -m 0750 {}/volley)", dir.display()),
            false => format!("run volley as {owner_name} (sudo -u {owner_name} volley ...), or take it over (chown -R {me_name} {})", dir.display()),
        };
        return Err(DirError::NotOwner {
            what,
            dir: dir.to_path_buf(),
            owner: describe_user(meta.uid()),
            me: describe_user(me),
            fix,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(DirError::Writable {
            what,
            dir: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// What [`make_private`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fixed {
    /// Files and directories whose group and other bits were taken away.
    pub entries: usize,
}

/// Takes the group and other permission bits off `dir` and everything under it
/// (a directory whose only such bit is the group's search bit is left as it is),
/// except the paths in `keep` (the accounting log, which has its own mode; a pickup
/// directory other users drop into). Symbolic links are not followed. Errors: the
/// first directory that cannot be read or entry that cannot be changed, with its path.
pub fn make_private(dir: &Path, keep: &[PathBuf]) -> anyhow::Result<Fixed> {
    let mut fixed = Fixed::default();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        if keep.iter().any(|k| k == &p || is_generation_of(k, &p)) {
            continue;
        }
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            // Gone since it was listed (a finished segment, a staged file).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => anyhow::bail!("{}: {e}", p.display()),
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        // A directory's group search bit alone is left: it lets the group reach a
        // name whose own mode admits it and lists nothing. The admin socket's
        // admin_group needs it on the spool (host/peers.rs); every file stays 0600.
        let open_bits = if meta.is_dir() { 0o067 } else { 0o077 };
        if meta.mode() & open_bits != 0 {
            let mode = meta.mode() & 0o7700;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(|e| {
                anyhow::anyhow!(
                    "{}: cannot make it private (chmod go-rwx): {e}",
                    p.display()
                )
            })?;
            fixed.entries += 1;
        }
        if meta.is_dir() {
            let entries =
                std::fs::read_dir(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            todo.extend(entries.flatten().map(|e| e.path()));
        }
    }
    Ok(fixed)
}

/// Whether `p` is a rotated generation of the file `k` (`K.…` or `K-…` beside it:
/// the accounting log's own and logrotate's): kept with `k`'s mode here, read with
/// it by observe/rotation.rs.
pub fn is_generation_of(k: &Path, p: &Path) -> bool {
    let (Some(kn), Some(pn)) = (k.file_name(), p.file_name()) else {
        return false;
    };
    let (kn, pn) = (kn.as_encoded_bytes(), pn.as_encoded_bytes());
    k.parent() == p.parent()
        && pn.len() > kn.len() + 1
        && pn.starts_with(kn)
        && matches!(pn[kn.len()], b'.' | b'-')
}

/// Makes the spool at `dir` private, saying so in one line when anything was open
/// to others (a spool made by an older volley, or copied in with other modes).
pub fn make_spool_private(dir: &Path, keep: &[PathBuf]) -> anyhow::Result<()> {
    let fixed = make_private(dir, keep)?;
    if fixed.entries > 0 {
        eprintln!(
            "volley: spool {}: {} file(s) and directories were readable by others; made them private (0600/0700)",
            dir.display(),
            fixed.entries
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn an_open_spool_is_made_private_except_what_is_kept() {
        let dir = std::env::temp_dir().join(format!("volley-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("campaigns/1")).unwrap();
        std::fs::create_dir_all(dir.join("pickup")).unwrap();
        for (p, m) in [
            ("campaigns/1/recipients.csv", 0o644),
            ("spool.toml", 0o666),
            ("accounting.jsonl", 0o640),
            ("accounting.jsonl.20261130T000000Z.gz", 0o640),
            ("private", 0o600),
        ] {
            std::fs::write(dir.join(p), "x").unwrap();
            std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(m)).unwrap();
        }
        for d in ["", "campaigns", "campaigns/1", "pickup"] {
            std::fs::set_permissions(dir.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::os::unix::fs::symlink("/etc/hostname", dir.join("link")).unwrap();
        let keep = [dir.join("accounting.jsonl"), dir.join("pickup")];
        std::fs::create_dir_all(dir.join("reach")).unwrap();
        std::fs::set_permissions(dir.join("reach"), std::fs::Permissions::from_mode(0o710))
            .unwrap();
        let fixed = make_private(&dir, &keep).unwrap();
        // The spool, campaigns, campaigns/1, recipients.csv and spool.toml.
        assert_eq!(fixed.entries, 5);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("campaigns/1")), 0o700);
        assert_eq!(mode(&dir.join("campaigns/1/recipients.csv")), 0o600);
        assert_eq!(mode(&dir.join("spool.toml")), 0o600);
        assert_eq!(mode(&dir.join("private")), 0o600);
        assert_eq!(
            mode(&dir.join("reach")),
            0o710,
            "group search alone is kept"
        );
        assert_eq!(mode(&dir.join("accounting.jsonl")), 0o640, "kept");
        assert_eq!(
            mode(&dir.join("accounting.jsonl.20261130T000000Z.gz")),
            0o640,
            "a rotated generation of the log is kept too"
        );
        assert_eq!(mode(&dir.join("pickup")), 0o755, "kept");
        assert_ne!(
            mode(Path::new("/etc/hostname")) & 0o044,
            0,
            "a link is not followed"
        );
        assert_eq!(
            make_private(&dir, &keep).unwrap().entries,
            0,
            "nothing twice"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
