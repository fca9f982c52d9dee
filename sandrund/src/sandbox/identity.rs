//! C's irrevocable switch from root to the job's uid and gid, with no capabilities left in any
//! set, `NO_NEW_PRIVS`, and not dumpable. The id changes are raw syscalls (see `sys::creds`).

#![forbid(unsafe_code)]

use nix::unistd::{geteuid, getgroups, getresgid, getresuid};

use nix::errno::Errno;

use super::{fail, SetupError, SetupStep};
use crate::ids::{GroupId, UserId};
use crate::sys::{self, prctl, Prctl};

/// Highest capability number probed; the kernel answers `EINVAL` past its last one.
const CAP_PROBE_LIMIT: libc::c_ulong = 64;

/// Drops from root to `uid`/`gid` for good. Precondition: effective uid 0, and neither id is 0.
pub(super) fn drop_privileges(uid: UserId, gid: GroupId) -> Result<(), SetupError> {
    if !geteuid().is_root() {
        return Err(fail(SetupStep::SetUid, Errno::EPERM, "init is not root"));
    }
    if uid.0 == 0 || gid.0 == 0 {
        return Err(fail(
            SetupStep::SetUid,
            Errno::EINVAL,
            "job ids must not be 0",
        ));
    }
    drop_bounding_and_ambient()?;
    sys::drop_groups().map_err(|e| fail(SetupStep::DropGroups, e, "setgroups([])"))?;
    sys::set_all_gids(gid.0).map_err(|e| fail(SetupStep::SetGid, e, "setresgid"))?;
    sys::set_all_uids(uid.0).map_err(|e| fail(SetupStep::SetUid, e, "setresuid"))?;
    sys::clear_capability_sets().map_err(|e| fail(SetupStep::DropCapabilities, e, "capset(0)"))?;
    verify_ids(uid, gid)?;
    verify_no_capabilities()?;
    harden_process()
}

fn drop_bounding_and_ambient() -> Result<(), SetupError> {
    let step = SetupStep::DropCapabilities;
    for cap in 0..CAP_PROBE_LIMIT {
        match prctl(Prctl::DropBounding(cap)) {
            Ok(_) => {}
            Err(Errno::EINVAL) => break,
            Err(e) => return Err(fail(step, e, "PR_CAPBSET_DROP")),
        }
    }
    prctl(Prctl::ClearAmbient).map_err(|e| fail(step, e, "ambient clear"))?;
    Ok(())
}

fn verify_ids(uid: UserId, gid: GroupId) -> Result<(), SetupError> {
    let u = getresuid().map_err(|e| fail(SetupStep::SetUid, e, "getresuid"))?;
    if [u.real, u.effective, u.saved]
        .iter()
        .any(|id| id.as_raw() != uid.0)
    {
        return Err(fail(
            SetupStep::SetUid,
            Errno::EPERM,
            "uid not fully changed",
        ));
    }
    let g = getresgid().map_err(|e| fail(SetupStep::SetGid, e, "getresgid"))?;
    if [g.real, g.effective, g.saved]
        .iter()
        .any(|id| id.as_raw() != gid.0)
    {
        return Err(fail(
            SetupStep::SetGid,
            Errno::EPERM,
            "gid not fully changed",
        ));
    }
    let groups = getgroups().map_err(|e| fail(SetupStep::DropGroups, e, "getgroups"))?;
    if !groups.is_empty() {
        return Err(fail(SetupStep::DropGroups, Errno::EPERM, "groups remain"));
    }
    Ok(())
}

/// Postcondition of the drop: effective, permitted, inheritable, ambient and bounding sets are
/// all empty, as the kernel reports them.
fn verify_no_capabilities() -> Result<(), SetupError> {
    let step = SetupStep::DropCapabilities;
    let data = sys::capability_sets().map_err(|e| fail(step, e, "capget"))?;
    if data
        .iter()
        .any(|d| d.effective | d.permitted | d.inheritable != 0)
    {
        return Err(fail(step, Errno::EPERM, "capabilities remain"));
    }
    for cap in 0..CAP_PROBE_LIMIT {
        let bounding = prctl(Prctl::ReadBounding(cap));
        let ambient = prctl(Prctl::IsAmbient(cap));
        match (bounding, ambient) {
            (Err(Errno::EINVAL), _) => return Ok(()),
            (Ok(0), Ok(0)) => {}
            (Ok(_), Ok(_)) => return Err(fail(step, Errno::EPERM, "capability remains")),
            (Err(e), _) | (_, Err(e)) => return Err(fail(step, e, "capability probe")),
        }
    }
    Ok(())
}

/// `NO_NEW_PRIVS`, not dumpable (the job, which has the same uid, cannot ptrace or read C's
/// memory), and SIGKILL when the helper dies. All three must come after the id change, which
/// resets the latter two.
fn harden_process() -> Result<(), SetupError> {
    let step = SetupStep::NoNewPrivs;
    prctl(Prctl::NoNewPrivs).map_err(|e| fail(step, e, "PR_SET_NO_NEW_PRIVS"))?;
    prctl(Prctl::NotDumpable).map_err(|e| fail(step, e, "PR_SET_DUMPABLE"))?;
    prctl(Prctl::KillOnParentDeath).map_err(|e| fail(step, e, "PR_SET_PDEATHSIG"))?;
    Ok(())
}
