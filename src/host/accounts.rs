//! The host's accounts, as the C library sees them (/etc/passwd, /etc/group, or NSS):
//! a user's name, a group by name, a user's groups. What the secrets check names in
//! its fixes and what the admin socket's peer check asks.

use std::ffi::{CStr, CString};

/// Largest buffer the `get*_r` lookups grow to, in octets: a group with thousands of
/// members needs a few hundred KiB; past this the entry is treated as absent.
const LOOKUP_BUFFER_OCTETS_MAX: usize = 1 << 20;

/// Most groups [`groups_of`] returns for a user: Linux's NGROUPS_MAX.
pub const GROUPS_MAX: usize = 65_536;

/// A group of the host: its name and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Runs a `get*_r` lookup with a buffer that doubles on ERANGE, up to
/// [`LOOKUP_BUFFER_OCTETS_MAX`]; `call` returns the lookup's status and whether an
/// entry was found.
fn with_buffer<T>(mut call: impl FnMut(&mut [libc::c_char]) -> (i32, Option<T>)) -> Option<T> {
    let mut len = 4096;
    while len <= LOOKUP_BUFFER_OCTETS_MAX {
        let mut buf = vec![0 as libc::c_char; len];
        match call(&mut buf) {
            (libc::ERANGE, _) => len *= 2,
            (0, found) => return found,
            _ => return None,
        }
    }
    None
}

/// The name and primary group of user `uid`, or None when the host has no such user.
pub fn user(uid: u32) -> Option<(String, u32)> {
    with_buffer(|buf| {
        // SAFETY: passwd is plain data; getpwuid_r writes it and the strings it points
        // to into `buf`, whose length it is given, and sets `out` to &pw or null.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
        if rc != 0 || out.is_null() {
            return (rc, None);
        }
        // SAFETY: pw_name points into `buf`, NUL-terminated, alive for this closure.
        let name = unsafe { CStr::from_ptr(pw.pw_name) };
        (0, Some((name.to_string_lossy().into_owned(), pw.pw_gid)))
    })
}

/// The uid and primary gid of the user called `name`, or None when the host has no
/// such user (or its user database does not answer).
pub fn user_named(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    with_buffer(|buf| {
        // SAFETY: as in `user`: getpwnam_r fills `pw` and `buf` (its length given).
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc =
            unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
        (rc, (!out.is_null()).then_some((pw.pw_uid, pw.pw_gid)))
    })
}

/// How to make user `uid` (the one volley runs as) a member of group `g`, for the
/// errors that need it (volley gives the admin socket or the log to a group, which
/// only root or a member may): `usermod -aG GROUP NAME`, with the user's name when
/// the host has one.
pub fn join_group_fix(g: &Group, uid: u32) -> String {
    let name = user(uid).map_or_else(|| "USER".to_string(), |(n, _)| n);
    format!("usermod -aG {} {name}, then start volley again", g.name)
}

/// `NAME (uid N)`, or `uid N` when the host has no name for it: how messages name a user.
pub fn describe_user(uid: u32) -> String {
    match user(uid) {
        Some((name, _)) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// The group called `name`. Errors: no such group (the text says how to make one),
/// or a name with a NUL.
pub fn group(name: &str) -> Result<Group, String> {
    let c =
        CString::new(name).map_err(|_| format!("group `{}` holds a NUL", name.escape_debug()))?;
    let found = with_buffer(|buf| {
        // SAFETY: as in `user`: getgrnam_r fills `gr` and `buf` (its length given).
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        let rc =
            unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
        if rc != 0 || out.is_null() {
            return (rc, None);
        }
        (0, Some(gr.gr_gid))
    });
    match found {
        Some(gid) => Ok(Group {
            name: name.to_string(),
            gid,
        }),
        None => Err(format!(
            "no group `{name}` on this host; make it (groupadd {name}) or name another"
        )),
    }
}

/// Every group user `uid` is in: its primary group and its supplementary groups
/// (getgrouplist(3)), at most [`GROUPS_MAX`]. Empty when the host has no such user.
pub fn groups_of(uid: u32) -> Vec<u32> {
    let Some((name, primary)) = user(uid) else {
        return Vec::new();
    };
    let Ok(c) = CString::new(name) else {
        return vec![primary];
    };
    let mut len: i32 = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; len as usize];
        let mut n = len;
        // SAFETY: `groups` has room for `n` ids; getgrouplist writes at most that many
        // and sets `n` to how many there are (or are needed, when it returns -1).
        let rc = unsafe { libc::getgrouplist(c.as_ptr(), primary, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        if n <= len || n as usize > GROUPS_MAX {
            return vec![primary];
        }
        len = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_its_group_are_found() {
        assert_eq!(user(0).map(|u| u.0), Some("root".to_string()));
        assert_eq!(describe_user(0), "root (uid 0)");
        assert_eq!(group("root").unwrap().gid, 0);
        assert!(groups_of(0).contains(&0));
        let e = group("no-such-group-volley").unwrap_err();
        assert!(e.contains("groupadd no-such-group-volley"), "{e}");
        assert!(user(u32::MAX - 7).is_none());
        assert_eq!(describe_user(u32::MAX - 7), format!("uid {}", u32::MAX - 7));
    }
}
