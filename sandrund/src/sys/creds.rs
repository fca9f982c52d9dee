//! Credentials and self-restriction: ids, capability sets, `prctl`, the Landlock ABI.
//!
//! The id changes are raw syscalls on purpose: C is a single-threaded process created by a raw
//! `clone`, so libc's "change the ids of every thread" machinery (which walks a thread list
//! copied from the helper) must not run there.

use nix::errno::Errno;

use super::{check, errno};

const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// One of the two `__user_cap_data_struct`s of capability version 3.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct CapData {
    pub effective: u32,
    pub permitted: u32,
    pub inheritable: u32,
}

/// `setgroups(0, NULL)`: no supplementary groups.
pub(crate) fn drop_groups() -> Result<(), Errno> {
    let zero: libc::c_long = 0;
    // SAFETY: setgroups(0, NULL) reads no memory. The raw syscall changes only this thread's
    // groups, which is the whole process in C (see the module doc).
    check(unsafe { libc::syscall(libc::SYS_setgroups, zero, zero, zero) }).map(drop)
}

/// `setresgid(gid, gid, gid)`, this thread only (see the module doc).
pub(crate) fn set_all_gids(gid: libc::gid_t) -> Result<(), Errno> {
    let g = libc::c_long::from(gid);
    // SAFETY: setresgid takes integers only and reads no memory.
    check(unsafe { libc::syscall(libc::SYS_setresgid, g, g, g) }).map(drop)
}

/// `setresuid(uid, uid, uid)`, this thread only (see the module doc).
pub(crate) fn set_all_uids(uid: libc::uid_t) -> Result<(), Errno> {
    let u = libc::c_long::from(uid);
    // SAFETY: setresuid takes integers only and reads no memory.
    check(unsafe { libc::syscall(libc::SYS_setresuid, u, u, u) }).map(drop)
}

/// `capset` of the calling thread to empty effective, permitted and inheritable sets.
pub(crate) fn clear_capability_sets() -> Result<(), Errno> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and the two-element data array have the layout capset(2) expects for
    // _LINUX_CAPABILITY_VERSION_3; both outlive the call.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) }).map(drop)
}

/// `capget` of the calling thread: its effective, permitted and inheritable sets.
pub(crate) fn capability_sets() -> Result<[CapData; 2], Errno> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and the two-element data array have the layout capget(2) expects for
    // _LINUX_CAPABILITY_VERSION_3; both outlive the call.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) })?;
    Ok(data)
}

/// The `prctl` operations the helper uses. Each takes integer arguments only, so the one
/// `unsafe` call below cannot be handed an option whose arguments are pointers.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Prctl {
    /// `PR_CAPBSET_DROP`: remove a capability from the bounding set.
    DropBounding(libc::c_ulong),
    /// `PR_CAPBSET_READ`: 1 if the capability is in the bounding set, else 0.
    ReadBounding(libc::c_ulong),
    /// `PR_CAP_AMBIENT_CLEAR_ALL`.
    ClearAmbient,
    /// `PR_CAP_AMBIENT_IS_SET`: 1 if the capability is ambient, else 0.
    IsAmbient(libc::c_ulong),
    /// `PR_SET_NO_NEW_PRIVS` to 1 (it cannot be unset).
    NoNewPrivs,
    /// `PR_SET_DUMPABLE` to 0.
    NotDumpable,
    /// `PR_SET_PDEATHSIG` to SIGKILL.
    KillOnParentDeath,
}

impl Prctl {
    fn args(self) -> (libc::c_int, libc::c_ulong, libc::c_ulong) {
        // The constants are small non-negative numbers; `as` cannot truncate them.
        let ambient = libc::PR_CAP_AMBIENT;
        match self {
            Prctl::DropBounding(cap) => (libc::PR_CAPBSET_DROP, cap, 0),
            Prctl::ReadBounding(cap) => (libc::PR_CAPBSET_READ, cap, 0),
            Prctl::ClearAmbient => (ambient, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0),
            Prctl::IsAmbient(cap) => (ambient, libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong, cap),
            Prctl::NoNewPrivs => (libc::PR_SET_NO_NEW_PRIVS, 1, 0),
            Prctl::NotDumpable => (libc::PR_SET_DUMPABLE, 0, 0),
            Prctl::KillOnParentDeath => (libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0),
        }
    }
}

/// One `prctl` operation; its non-negative result.
pub(crate) fn prctl(op: Prctl) -> Result<libc::c_int, Errno> {
    let (option, arg2, arg3) = op.args();
    let zero: libc::c_ulong = 0;
    // SAFETY: every `Prctl` variant maps to an option whose arguments are integers (no pointer
    // is passed, so no memory is read or written); the unused arguments are 0 as prctl(2) asks.
    let ret = unsafe { libc::prctl(option, arg2, arg3, zero, zero) };
    if ret < 0 {
        return Err(errno());
    }
    Ok(ret)
}

/// The running kernel's Landlock ABI version (`landlock_create_ruleset` with
/// `LANDLOCK_CREATE_RULESET_VERSION`); an errno if the kernel has no Landlock.
pub(crate) fn landlock_abi_version() -> Result<i32, Errno> {
    // SAFETY: with a null attribute pointer, size 0 and LANDLOCK_CREATE_RULESET_VERSION, the
    // kernel reads no memory and returns the ABI version (or -1 with errno).
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if version < 1 {
        return Err(errno());
    }
    Ok(i32::try_from(version).unwrap_or(i32::MAX))
}
