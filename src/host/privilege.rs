//! Least privilege for `volley serve`, as Postfix's master keeps root only for what
//! needs it. Started as root with `user = "volley"`, the daemon binds its listeners
//! and reads its TLS key as root, gives the directories it writes to the service
//! user, then drops for good: supplementary groups (initgroups), gid, uid, in that
//! order (a process that has given up its uid can no longer change its groups), and
//! checks that setuid(0) now fails. Everything after (the spool, the users and
//! tokens files, DKIM keys) is opened as the user. This module has the steps;
//! `serve::daemon` decides when each runs.
//!
//! The other way, with no root at all, is a daemon started as the user with
//! CAP_NET_BIND_SERVICE (systemd's `AmbientCapabilities=`); [`bind_error`] tells an
//! operator who has neither which one to pick.

use crate::host::accounts;
use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Entries of a directory tree whose owner is checked before the drop (the spool
/// holds segments, campaign copies and a few files: thousands, not millions). Past
/// it the rest is not checked; an entry the user cannot open is then an error
/// naming its path when the daemon reaches it.
pub const TREE_ENTRIES_CHECKED_MAX: usize = 100_000;

/// The service user and group to run as, looked up in the host's user database
/// (/etc/passwd, /etc/group, or whatever NSS serves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The user's name (`user`).
    pub user: String,
    pub uid: libc::uid_t,
    /// The group's name when `group` named one; None: the user's primary group.
    pub group: Option<String>,
    /// `group`'s gid, or the user's primary gid.
    pub gid: libc::gid_t,
}

/// What the daemon does about its user, from who started it and `user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Root, with `user`: bind, read the TLS key, give the directories, drop.
    Drop(Account),
    /// Root without `user` (or with `user = "root"`): stays root; the daemon warns
    /// unless `user` asked for it.
    StayRoot { asked: bool },
    /// Not root: runs as it is (`user`, if set, is who it already runs as).
    AsIs,
}

/// A directory the daemon writes, for [`give_dir`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk<'a> {
    /// Everything under it must be the user's too (the spool; the log's directory),
    /// except these paths (a pickup directory inside the spool, whose files belong
    /// to whoever dropped them).
    Tree(&'a [PathBuf]),
    /// Only the directory itself (a pickup directory other users drop into).
    DirOnly,
}

/// What went wrong taking or dropping privilege: each says what, where and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("no user {0:?} on this host; create it (useradd --system --no-create-home --shell /usr/sbin/nologin {0}) or name an existing one")]
    NoUser(String),
    #[error("no group {0:?} on this host; create it (groupadd --system {0}), name an existing one, or remove `group` to use the user's primary group")]
    NoGroup(String),
    #[error("user = {user:?} ({at}), but volley serve runs as uid {euid} and only root can become another user; start it as root (it drops to {user} after binding) or as {user}, or remove `user`")]
    NotRoot {
        user: String,
        /// Where `user` was set (FILE:LINE).
        at: String,
        euid: libc::uid_t,
    },
    #[error("{what} {}: {err}; root creates it and gives it to the user (under systemd that needs CAP_CHOWN in CapabilityBoundingSet), or create it yourself with `install -d -o USER -g GROUP -m 0700 {}`", path.display(), path.display())]
    Create {
        what: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("{what} {}: {err}; root lists it to check its owner before dropping to the user (under systemd that needs CAP_DAC_READ_SEARCH in CapabilityBoundingSet)", path.display())]
    Inspect {
        what: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error(transparent)]
    Owned(Box<NotOwned>),
    #[error("dropping privileges to {user}: {step} failed: {err} (under systemd this needs CAP_SETUID and CAP_SETGID in CapabilityBoundingSet)")]
    Drop {
        user: String,
        step: &'static str,
        err: io::Error,
    },
    #[error("dropped privileges to {user}, but {what}; refusing to run")]
    StillPrivileged { user: String, what: String },
    #[error("{what} {addr}: {err}{hint}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        err: io::Error,
        /// Empty, or how to get a port below 1024.
        hint: &'static str,
    },
}

/// A directory volley must write, or something in it, that is another user's.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {} is owned by uid {owner}, not {user} (uid {uid}), which volley serve runs as and which must write it; run `{}` as root, or set `{key}` to a directory of {user}'s own", top.display(), path.display(), chown(.user, .group, .top))]
pub struct NotOwned {
    pub what: &'static str,
    /// The config key that names the directory (`spool`, `log`, `pickup.dir`).
    pub key: &'static str,
    pub top: PathBuf,
    /// The first entry found that is not the user's (`top` itself, or under it).
    pub path: PathBuf,
    pub owner: libc::uid_t,
    pub user: String,
    pub group: Option<String>,
    pub uid: libc::uid_t,
}

/// The command that gives `path` and everything under it to the account.
fn chown(user: &str, group: &Option<String>, path: &Path) -> String {
    format!(
        "chown -R {user}:{} {}",
        group.as_deref().unwrap_or(""),
        path.display()
    )
}

/// Looks up `user` and, when given, `group` (else the user's primary group).
/// Errors: [`PrivilegeError::NoUser`], [`PrivilegeError::NoGroup`] (also when the
/// host's user database does not answer).
pub fn lookup(user: &str, group: Option<&str>) -> Result<Account, PrivilegeError> {
    let (uid, primary) =
        accounts::user_named(user).ok_or_else(|| PrivilegeError::NoUser(user.into()))?;
    let gid = match group {
        Some(g) => {
            accounts::group(g)
                .map_err(|_| PrivilegeError::NoGroup(g.into()))?
                .gid
        }
        None => primary,
    };
    Ok(Account {
        user: user.into(),
        uid,
        group: group.map(String::from),
        gid,
    })
}

/// Decides from the effective uid: root drops to `account`, or stays root without
/// one; anyone else runs as is, and must already be `account`'s user. `at` is where
/// `user` was set, for the error.
pub fn plan(account: Option<Account>, at: &str) -> Result<Plan, PrivilegeError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    match account {
        Some(a) if euid == 0 && a.uid == 0 => Ok(Plan::StayRoot { asked: true }),
        Some(a) if euid == 0 => Ok(Plan::Drop(a)),
        None if euid == 0 => Ok(Plan::StayRoot { asked: false }),
        Some(a) if a.uid != euid => Err(PrivilegeError::NotRoot {
            user: a.user,
            at: at.into(),
            euid,
        }),
        _ => Ok(Plan::AsIs),
    }
}

/// A listener's bind failure; when it is EACCES (a port below 1024 without
/// privilege) it says the two ways to get one.
pub fn bind_error(what: &'static str, addr: SocketAddr, err: io::Error) -> PrivilegeError {
    let hint = if err.kind() == io::ErrorKind::PermissionDenied {
        "; ports below 1024 need privilege: start volley serve as root with user = \"volley\" in its configuration (it binds, then runs as that user), or give it CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE)"
    } else {
        ""
    };
    PrivilegeError::Bind {
        what,
        addr,
        err,
        hint,
    }
}

/// Makes `dir` the account's before the drop (called as root): missing levels are
/// created with exactly `mode` (whatever the umask) and given to it; an existing one (and, for
/// [`Walk::Tree`], everything under it, links not followed) must already be its,
/// else [`PrivilegeError::Owned`] with the `chown -R` that fixes it. `what` names
/// the directory in errors ("spool"), `key` the config key that sets it. Returns
/// the directories created.
pub fn give_dir(
    dir: &Path,
    mode: u32,
    a: &Account,
    walk: Walk,
    what: &'static str,
    key: &'static str,
) -> Result<Vec<PathBuf>, PrivilegeError> {
    let made = create_missing(dir, mode, a, what)?;
    if made.iter().any(|m| m == dir) {
        return Ok(made);
    }
    let owned = |path: PathBuf, owner| {
        PrivilegeError::Owned(Box::new(NotOwned {
            what,
            key,
            top: dir.to_path_buf(),
            path,
            owner,
            user: a.user.clone(),
            group: a.group.clone(),
            uid: a.uid,
        }))
    };
    // The directory itself may be a link (/var/spool/volley -> /data/volley).
    let meta = std::fs::metadata(dir).map_err(|err| PrivilegeError::Inspect {
        what,
        path: dir.into(),
        err,
    })?;
    if meta.uid() != a.uid {
        return Err(owned(dir.into(), meta.uid()));
    }
    let Walk::Tree(skip) = walk else {
        return Ok(made);
    };
    let mut todo = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d).map_err(|err| PrivilegeError::Inspect {
            what,
            path: d.clone(),
            err,
        })?;
        for e in entries.flatten() {
            seen += 1;
            if seen > TREE_ENTRIES_CHECKED_MAX {
                return Ok(made);
            }
            let p = e.path();
            if skip.contains(&p) {
                continue;
            }
            // Gone since it was listed: nothing to own.
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.file_type().is_symlink() {
                continue;
            }
            if m.uid() != a.uid {
                return Err(owned(p, m.uid()));
            }
            if m.is_dir() {
                todo.push(p);
            }
        }
    }
    Ok(made)
}

/// Creates the missing levels of `dir` one at a time (not create_dir_all: every
/// level made must be the account's, or it could not reach the last), each with
/// `mode` and given to the account.
fn create_missing(
    dir: &Path,
    mode: u32,
    a: &Account,
    what: &'static str,
) -> Result<Vec<PathBuf>, PrivilegeError> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && std::fs::symlink_metadata(p).is_err())
        .collect();
    let mut made = Vec::new();
    for p in missing.into_iter().rev() {
        let err = |err| PrivilegeError::Create {
            what,
            path: p.into(),
            err,
        };
        match std::fs::DirBuilder::new().mode(mode).create(p) {
            Ok(()) => {}
            // Made by someone else since it was looked at: checked as existing.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(made),
            Err(e) => return Err(err(e)),
        }
        // The umask (077 for every writing command) would take off group bits asked for.
        let given = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .and_then(|()| std::os::unix::fs::lchown(p, Some(a.uid), Some(a.gid)));
        if let Err(e) = given {
            // Not left behind as root's: the next start would refuse it.
            let _ = std::fs::remove_dir(p);
            return Err(err(e));
        }
        made.push(p.to_path_buf());
    }
    Ok(made)
}

/// Drops from root to the account for good: the supplementary groups become the
/// user's (initgroups, with the account's gid), then the real, effective and saved
/// gid, then the uids. Then checks that it holds: setuid(0) fails, every uid and
/// gid is the account's. Call it before any thread is started (glibc changes every
/// thread's ids, but a thread mid-way through a file open would race the change).
pub fn drop_to(a: &Account) -> Result<(), PrivilegeError> {
    let failed = |step: &'static str| PrivilegeError::Drop {
        user: a.user.clone(),
        step,
        err: io::Error::last_os_error(),
    };
    let name = CString::new(a.user.as_str()).map_err(|_| PrivilegeError::NoUser(a.user.clone()))?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    if unsafe { libc::initgroups(name.as_ptr(), a.gid) } != 0 {
        return Err(failed("initgroups (setgroups to the user's groups)"));
    }
    // SAFETY: plain syscalls on integers.
    if unsafe { libc::setresgid(a.gid, a.gid, a.gid) } != 0 {
        return Err(failed("setresgid"));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(a.uid, a.uid, a.uid) } != 0 {
        return Err(failed("setresuid"));
    }
    check_dropped(a)
}

/// After [`drop_to`]: root cannot be had back, and every id is the account's.
fn check_dropped(a: &Account) -> Result<(), PrivilegeError> {
    let still = |what: String| PrivilegeError::StillPrivileged {
        user: a.user.clone(),
        what,
    };
    // SAFETY: plain syscalls; it must fail, and if it does not, we stop right here.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(still("setuid(0) succeeds".into()));
    }
    // SAFETY: as above.
    if unsafe { libc::setgid(0) } == 0 && a.gid != 0 {
        return Err(still("setgid(0) succeeds".into()));
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the pointers are to live locals.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [a.uid; 3] {
        return Err(still(format!("the uids are {r}/{e}/{s}")));
    }
    // SAFETY: as above.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [a.gid; 3] {
        return Err(still(format!("the gids are {r}/{e}/{s}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_and_a_missing_user_or_group_is_named_with_the_fix() {
        let root = lookup("root", None).unwrap();
        assert_eq!((root.uid, root.gid, root.group), (0, 0, None));
        let root = lookup("root", Some("root")).unwrap();
        assert_eq!(root.group.as_deref(), Some("root"));
        let e = lookup("volley-no-such-user", None).unwrap_err().to_string();
        assert!(
            e.contains("no user \"volley-no-such-user\"") && e.contains("useradd --system"),
            "{e}"
        );
        let e = lookup("root", Some("volley-no-such-group"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no group \"volley-no-such-group\"") && e.contains("groupadd"),
            "{e}"
        );
    }

    #[test]
    fn a_privileged_port_refused_says_how_to_get_one() {
        let addr: SocketAddr = "0.0.0.0:25".parse().unwrap();
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        let e = bind_error("submission listener", addr, denied).to_string();
        assert!(
            e.starts_with("submission listener 0.0.0.0:25: Permission denied"),
            "{e}"
        );
        assert!(
            e.contains("user = \"volley\"")
                && e.contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"),
            "{e}"
        );
        let in_use = io::Error::from_raw_os_error(libc::EADDRINUSE);
        let e = bind_error("http listener", addr, in_use).to_string();
        assert!(!e.contains("CAP_NET_BIND_SERVICE"), "{e}");
    }

    #[test]
    fn a_directory_of_another_owner_is_refused_with_the_chown_that_fixes_it() {
        let dir = std::env::temp_dir().join(format!("volley-privilege-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let other = Account {
            user: "someone".into(),
            uid: me.wrapping_add(1),
            group: None,
            gid: 0,
        };
        std::fs::create_dir_all(dir.join("spool/campaigns")).unwrap();
        let e = give_dir(
            &dir.join("spool"),
            0o700,
            &other,
            Walk::Tree(&[]),
            "spool",
            "spool",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!(
                "run `chown -R someone: {}`",
                dir.join("spool").display()
            )),
            "{e}"
        );
        assert!(
            e.contains("set `spool` to a directory of someone's own"),
            "{e}"
        );
        // One of ours, with one entry of another owner inside: that entry is named.
        let mine = Account {
            uid: me,
            ..other.clone()
        };
        assert!(give_dir(
            &dir.join("spool"),
            0o700,
            &mine,
            Walk::Tree(&[]),
            "spool",
            "spool"
        )
        .is_ok());
        if me == 0 {
            std::os::unix::fs::lchown(dir.join("spool/campaigns"), Some(other.uid), None).unwrap();
            let e = give_dir(
                &dir.join("spool"),
                0o700,
                &mine,
                Walk::Tree(&[]),
                "spool",
                "spool",
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!(
                    "{} is owned by uid {}",
                    dir.join("spool/campaigns").display(),
                    other.uid
                )),
                "{e}"
            );
            let skip = [dir.join("spool/campaigns")];
            assert!(give_dir(
                &dir.join("spool"),
                0o700,
                &mine,
                Walk::Tree(&skip),
                "spool",
                "spool"
            )
            .is_ok());
            assert!(give_dir(
                &dir.join("spool"),
                0o700,
                &mine,
                Walk::DirOnly,
                "spool",
                "spool"
            )
            .is_ok());
        }
        // Missing levels are made, each the account's, with the mode asked.
        let deep = dir.join("a/b/c");
        let made = give_dir(&deep, 0o750, &mine, Walk::DirOnly, "log directory", "log").unwrap();
        assert_eq!(made, vec![dir.join("a"), dir.join("a/b"), deep.clone()]);
        for m in &made {
            let meta = std::fs::metadata(m).unwrap();
            assert_eq!((meta.uid(), meta.mode() & 0o777), (me, 0o750));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
