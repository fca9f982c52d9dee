//! C's irrevocable switch from root to the job's uid and gid, with no capabilities left in any
//! set, `NO_NEW_PRIVS`, and not dumpable.
//!
//! The id changes use raw syscalls on purpose: C is a single-threaded process created by a raw
//! `clone`, so libc's "change the ids of every thread" machinery (which walks a thread list
//! copied from the helper) must not run there.

use nix::unistd::{geteuid, getgroups, getresgid, getresuid};

use super::sys::{errno, fail, prctl};
use super::{SetupError, SetupStep};
use crate::ids::{GroupId, UserId};

/// Highest capability number probed; the kernel answers `EINVAL` past its last one.
const CAP_PROBE_LIMIT: libc::c_ulong = 64;
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops from root to `uid`/`gid` for good. Precondition: effective uid 0, and neither id is 0.
pub(super) fn drop_privileges(uid: UserId, gid: GroupId) -> Result<(), SetupError> {
    if !geteuid().is_root() {
        return Err(fail(SetupStep::SetUid, libc::EPERM, "init is not root"));
    }
    if uid.0 == 0 || gid.0 == 0 {
        return Err(fail(
            SetupStep::SetUid,
            libc::EINVAL,
            "job ids must not be 0",
        ));
    }
    drop_bounding_and_ambient()?;
    set_ids(
        SetupStep::DropGroups,
        "setgroups([])",
        libc::SYS_setgroups,
        0,
        0,
    )?;
    let g = libc::c_long::from(gid.0);
    set_ids(SetupStep::SetGid, "setresgid", libc::SYS_setresgid, g, g)?;
    let u = libc::c_long::from(uid.0);
    set_ids(SetupStep::SetUid, "setresuid", libc::SYS_setresuid, u, u)?;
    clear_capability_sets()?;
    verify_ids(uid, gid)?;
    verify_no_capabilities()?;
    harden_process()
}

fn drop_bounding_and_ambient() -> Result<(), SetupError> {
    let step = SetupStep::DropCapabilities;
    for cap in 0..CAP_PROBE_LIMIT {
        match prctl(libc::PR_CAPBSET_DROP, cap, 0) {
            Ok(_) => {}
            Err(libc::EINVAL) => break,
            Err(e) => return Err(fail(step, e, "PR_CAPBSET_DROP")),
        }
    }
    let clear = libc::c_ulong::try_from(libc::PR_CAP_AMBIENT_CLEAR_ALL).unwrap_or(4);
    prctl(libc::PR_CAP_AMBIENT, clear, 0).map_err(|e| fail(step, e, "ambient clear"))?;
    Ok(())
}

/// `setgroups(0, NULL)` when `nr` is `SYS_setgroups`, else `setres[ug]id(a, a, a)`.
fn set_ids(
    step: SetupStep,
    what: &str,
    nr: libc::c_long,
    a: libc::c_long,
    b: libc::c_long,
) -> Result<(), SetupError> {
    // SAFETY: setgroups(0, NULL) reads no memory; setresuid/setresgid take integers only.
    // Raw syscalls change only this thread's credentials, which is the whole process here
    // (see the module doc).
    let ret = unsafe { libc::syscall(nr, a, b, b) };
    if ret < 0 {
        return Err(fail(step, errno(), what));
    }
    Ok(())
}

fn clear_capability_sets() -> Result<(), SetupError> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and the two-element data array have the layout capset(2) expects for
    // _LINUX_CAPABILITY_VERSION_3; both outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if ret < 0 {
        return Err(fail(SetupStep::DropCapabilities, errno(), "capset(0)"));
    }
    Ok(())
}

fn verify_ids(uid: UserId, gid: GroupId) -> Result<(), SetupError> {
    let u = getresuid().map_err(|e| fail(SetupStep::SetUid, e as i32, "getresuid"))?;
    if [u.real, u.effective, u.saved]
        .iter()
        .any(|id| id.as_raw() != uid.0)
    {
        return Err(fail(
            SetupStep::SetUid,
            libc::EPERM,
            "uid not fully changed",
        ));
    }
    let g = getresgid().map_err(|e| fail(SetupStep::SetGid, e as i32, "getresgid"))?;
    if [g.real, g.effective, g.saved]
        .iter()
        .any(|id| id.as_raw() != gid.0)
    {
        return Err(fail(
            SetupStep::SetGid,
            libc::EPERM,
            "gid not fully changed",
        ));
    }
    let groups = getgroups().map_err(|e| fail(SetupStep::DropGroups, e as i32, "getgroups"))?;
    if !groups.is_empty() {
        return Err(fail(SetupStep::DropGroups, libc::EPERM, "groups remain"));
    }
    Ok(())
}

/// Postcondition of the drop: effective, permitted, inheritable, ambient and bounding sets are
/// all empty, as the kernel reports them.
fn verify_no_capabilities() -> Result<(), SetupError> {
    let step = SetupStep::DropCapabilities;
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and the two-element data array have the layout capget(2) expects for
    // _LINUX_CAPABILITY_VERSION_3; both outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if ret < 0 {
        return Err(fail(step, errno(), "capget"));
    }
    if data
        .iter()
        .any(|d| d.effective | d.permitted | d.inheritable != 0)
    {
        return Err(fail(step, libc::EPERM, "capabilities remain"));
    }
    let is_set = libc::c_ulong::try_from(libc::PR_CAP_AMBIENT_IS_SET).unwrap_or(1);
    for cap in 0..CAP_PROBE_LIMIT {
        let bounding = prctl(libc::PR_CAPBSET_READ, cap, 0);
        let ambient = prctl(libc::PR_CAP_AMBIENT, is_set, cap);
        match (bounding, ambient) {
            (Err(libc::EINVAL), _) => return Ok(()),
            (Ok(0), Ok(0)) => {}
            (Ok(_), Ok(_)) => return Err(fail(step, libc::EPERM, "capability remains")),
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
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map_err(|e| fail(step, e, "PR_SET_NO_NEW_PRIVS"))?;
    prctl(libc::PR_SET_DUMPABLE, 0, 0).map_err(|e| fail(step, e, "PR_SET_DUMPABLE"))?;
    let kill = libc::c_ulong::try_from(libc::SIGKILL).unwrap_or(9);
    prctl(libc::PR_SET_PDEATHSIG, kill, 0).map_err(|e| fail(step, e, "PR_SET_PDEATHSIG"))?;
    Ok(())
}
