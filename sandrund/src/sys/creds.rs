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

/// `prctl` with up to two integer arguments.
pub(crate) fn prctl(
    option: libc::c_int,
    arg2: libc::c_ulong,
    arg3: libc::c_ulong,
) -> Result<libc::c_int, Errno> {
    let zero: libc::c_ulong = 0;
    // SAFETY: the options used with this wrapper take integer arguments only.
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
