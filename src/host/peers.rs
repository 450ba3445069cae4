//! Who may use the admin socket (`SPOOL/admin.sock`): root, the user volley runs as,
//! and the members of the configured admin group (`admin_group` in serve's file,
//! `--admin-group` for `send`), as Postfix lets only root and its own user reach its
//! queue manager. Two layers: the socket is 0600 (0660 and the group's with an admin
//! group, the spool directory then 0710 so the group can reach the socket and list
//! nothing), and every connection's peer is checked with SO_PEERCRED, so a socket
//! left reachable by a mistaken chmod still answers no one else.

use crate::host::accounts::{self, Group};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The process at the other end of a Unix socket, as the kernel saw it when it
/// connected (SO_PEERCRED, unix(7)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// The credentials of `conn`'s peer. Errors: getsockopt's.
pub fn peer_of(conn: &UnixStream) -> std::io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a ucred and `len` its size, as SO_PEERCRED writes; the fd is
    // open for the duration of the call (borrowed from `conn`).
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Who may use an admin socket: root, `euid` (the user volley runs as) and, when
/// given, the members of `group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminAccess {
    pub euid: u32,
    pub group: Option<Group>,
}

impl AdminAccess {
    /// For this process: its effective uid, and `group` if one is configured.
    pub fn new(group: Option<Group>) -> AdminAccess {
        AdminAccess {
            euid: accounts::euid(),
            group,
        }
    }

    /// Whether `peer` may use the socket; the peer user's supplementary groups are
    /// looked up (getgrouplist) only when the cheaper checks fail.
    pub fn allows(&self, peer: &Peer) -> bool {
        self.allows_with(peer, accounts::groups_of)
    }

    /// [`AdminAccess::allows`] with the group lookup given, for tests.
    pub fn allows_with(&self, peer: &Peer, groups_of: impl FnOnce(u32) -> Vec<u32>) -> bool {
        if peer.uid == 0 || peer.uid == self.euid {
            return true;
        }
        match &self.group {
            Some(g) => peer.gid == g.gid || groups_of(peer.uid).contains(&g.gid),
            None => false,
        }
    }

    /// Who may use the socket, in words: "root, volley (uid 999), the user volley
    /// runs as, and the members of group volley-admin".
    pub fn who(&self) -> String {
        let me = accounts::describe_user(self.euid);
        let mut who = match self.euid {
            0 => "root, the user volley runs as".to_string(),
            _ => format!("root and {me}, the user volley runs as"),
        };
        match &self.group {
            Some(g) => who.push_str(&format!(", and the members of group {}", g.name)),
            None => who.push_str(" (no admin_group is set)"),
        }
        who
    }

    /// The one line a refused peer gets (after `error: `): who it is, who may, and
    /// what to do.
    pub fn refusal(&self, peer: &Peer) -> String {
        let fix = match &self.group {
            Some(g) => format!("run the command as one of them, or add the user to group {} (usermod -aG {} USER; it takes effect at the next login)", g.name, g.name),
            None => "run the command as one of them (sudo -u USER volley queue ...), or set admin_group (serve's config; --admin-group for send) and add the user to that group".to_string(),
        };
        format!(
            "{} may not use this admin socket; it is for {}: {fix}",
            accounts::describe_user(peer.uid),
            self.who()
        )
    }

    /// Gives the socket at `socket` its modes: 0600; with a group, 0660 and that
    /// group, and its directory (the spool) the group too with mode 0710, so members
    /// reach the socket by name and can list or read nothing else. Without a group, a
    /// directory left at 0710 by an earlier admin_group goes back to 0700.
    ///
    /// Errors: chmod or chown failing, with the path and what to do (to give a file
    /// to a group, the process must be root or in that group).
    pub fn set_modes(&self, socket: &Path) -> std::io::Result<()> {
        let dir = socket.parent().unwrap_or(Path::new("."));
        let chmod = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(|e| {
                std::io::Error::new(e.kind(), format!("{}: chmod {mode:o}: {e}", p.display()))
            })
        };
        let dir_mode = std::fs::metadata(dir)?.mode() & 0o7777;
        let Some(g) = &self.group else {
            chmod(socket, 0o600)?;
            if dir_mode & 0o077 == 0o010 {
                chmod(dir, dir_mode & !0o077)?;
            }
            return Ok(());
        };
        let chgrp = |p: &Path| {
            std::os::unix::fs::chown(p, None, Some(g.gid)).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "{}: cannot give it to admin_group {} (chgrp): {e}; the user volley runs as must be root or a member of it: {}",
                        p.display(),
                        g.name,
                        crate::host::accounts::join_group_fix(g, crate::host::accounts::euid())
                    ),
                )
            })
        };
        chgrp(socket)?;
        chmod(socket, 0o660)?;
        chgrp(dir)?;
        chmod(dir, (dir_mode & 0o7700) | 0o010)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const PEER: Peer = Peer {
        pid: 1,
        uid: 1001,
        gid: 1001,
    };

    #[test]
    fn root_the_service_user_and_the_group_may_others_not() {
        let group = Group {
            name: "volley-admin".into(),
            gid: 2000,
        };
        let alone = AdminAccess {
            euid: 999,
            group: None,
        };
        let none = |_| Vec::new();
        assert!(alone.allows_with(&Peer { uid: 0, ..PEER }, none));
        assert!(alone.allows_with(&Peer { uid: 999, ..PEER }, none));
        assert!(!alone.allows_with(&PEER, |_| vec![2000]), "no group set");
        let with = AdminAccess {
            euid: 999,
            group: Some(group),
        };
        assert!(!with.allows_with(&PEER, |_| vec![1001, 27]));
        assert!(with.allows_with(&Peer { gid: 2000, ..PEER }, none));
        assert!(
            with.allows_with(&PEER, |_| vec![1001, 2000]),
            "supplementary"
        );
        let r = with.refusal(&Peer {
            uid: 4_000_001,
            ..PEER
        });
        assert!(
            r.starts_with("uid 4000001 may not use this admin socket; it is for root and "),
            "{r}"
        );
        assert!(r.contains("members of group volley-admin"), "{r}");
        assert!(r.contains("usermod -aG volley-admin USER"), "{r}");
        assert!(alone.refusal(&PEER).contains("set admin_group"));
    }

    #[test]
    fn the_peer_is_who_connected() {
        let dir = std::env::temp_dir().join(format!("volley-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let _c = UnixStream::connect(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        let p = peer_of(&s).unwrap();
        assert_eq!(p.uid, accounts::euid());
        assert_eq!(p.pid, std::process::id() as i32);
        // As bound under umask 000: every bit set.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        AdminAccess::new(None).set_modes(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
