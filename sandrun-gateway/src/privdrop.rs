//! Dropping root: the gateway may be started as root only to bind a privileged port. Right after
//! binding it becomes the unprivileged `sandrun` user, for good, before any untrusted byte is read.

use nix::errno::Errno;
use nix::unistd::{self, Gid, Uid, User};

/// Failure to become the unprivileged user. The gateway refuses to run when this happens.
#[derive(Debug)]
#[non_exhaustive]
pub enum PrivDropError {
    Lookup {
        user: String,
        source: Errno,
    },
    NoSuchUser {
        user: String,
    },
    UserIsRoot {
        user: String,
    },
    SetGroups(Errno),
    SetGid {
        gid: u32,
        source: Errno,
    },
    SetUid {
        uid: u32,
        source: Errno,
    },
    /// After dropping, the process could still become root again.
    Regained,
}

impl std::fmt::Display for PrivDropError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrivDropError::Lookup { user, source } => write!(f, "looking up user {user}: {source}"),
            PrivDropError::NoSuchUser { user } => write!(
                f,
                "started as root but user {user:?} does not exist; create it or start unprivileged"
            ),
            PrivDropError::UserIsRoot { user } => write!(f, "user {user:?} has uid 0"),
            PrivDropError::SetGroups(e) => write!(f, "clearing supplementary groups: {e}"),
            PrivDropError::SetGid { gid, source } => write!(f, "setting gid {gid}: {source}"),
            PrivDropError::SetUid { uid, source } => write!(f, "setting uid {uid}: {source}"),
            PrivDropError::Regained => {
                write!(f, "privileges could be regained after dropping them")
            }
        }
    }
}

impl std::error::Error for PrivDropError {}

/// If running as root, becomes `user` irrevocably and returns its ids; otherwise does nothing.
/// Must run before any other thread exists.
pub fn drop_privileges_if_root(user: &str) -> Result<Option<(Uid, Gid)>, PrivDropError> {
    if !unistd::geteuid().is_root() {
        return Ok(None);
    }
    let account = User::from_name(user)
        .map_err(|source| PrivDropError::Lookup {
            user: user.to_owned(),
            source,
        })?
        .ok_or_else(|| PrivDropError::NoSuchUser {
            user: user.to_owned(),
        })?;
    if account.uid.is_root() {
        return Err(PrivDropError::UserIsRoot {
            user: user.to_owned(),
        });
    }
    irrevocably_drop_privileges(account.uid, account.gid)?;
    Ok(Some((account.uid, account.gid)))
}

/// Clears supplementary groups, sets real, effective and saved gid then uid, and checks that
/// root cannot be regained. Precondition: the effective uid is 0 and `uid` is not 0.
fn irrevocably_drop_privileges(uid: Uid, gid: Gid) -> Result<(), PrivDropError> {
    assert!(
        unistd::geteuid().is_root() && !uid.is_root(),
        "precondition: root dropping to non-root"
    );
    unistd::setgroups(&[]).map_err(PrivDropError::SetGroups)?;
    unistd::setresgid(gid, gid, gid).map_err(|source| PrivDropError::SetGid {
        gid: gid.as_raw(),
        source,
    })?;
    unistd::setresuid(uid, uid, uid).map_err(|source| PrivDropError::SetUid {
        uid: uid.as_raw(),
        source,
    })?;
    let regained = unistd::setuid(Uid::from_raw(0)).is_ok()
        || unistd::setgid(Gid::from_raw(0)).is_ok()
        || unistd::geteuid() != uid
        || unistd::getegid() != gid
        || !unistd::getgroups().is_ok_and(|g| g.is_empty());
    if regained {
        return Err(PrivDropError::Regained);
    }
    Ok(())
}
