//! File descriptors: opening, duplicating, closing, reading and writing, receiving fds over a
//! socket, and mapping a sealed memfd.

use std::ffi::CStr;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::stat::{fstat, Mode};

use super::{check, errno};

/// `open(path, flags, mode)`, owning the new fd.
pub(crate) fn open<P: ?Sized + nix::NixPath>(
    path: &P,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let raw = nix::fcntl::open(path, flags, mode)?;
    // SAFETY: open just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `openat(dir, path, flags, mode)`, owning the new fd.
pub(crate) fn openat<P: ?Sized + nix::NixPath>(
    dir: RawFd,
    path: &P,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let raw = nix::fcntl::openat(Some(dir), path, flags, mode)?;
    // SAFETY: openat just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Duplicates `fd` to a new close-on-exec fd numbered 3 or more.
pub(crate) fn relocate(fd: RawFd) -> Result<OwnedFd, Errno> {
    relocate_from(fd, 3)
}

/// Duplicates `fd` to a new close-on-exec fd numbered `lowest` or more.
pub(crate) fn relocate_from(fd: RawFd, lowest: RawFd) -> Result<OwnedFd, Errno> {
    // SAFETY: F_DUPFD_CLOEXEC only reads fd and returns a new fd or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, lowest) };
    if new < 0 {
        return Err(errno());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Closes every fd of the process except those in `keep`, with `close_range` (Linux 5.9+).
/// Fails with `ENOSYS` on older kernels rather than leaving fds open. Only for a process that
/// never returns to code holding the closed fds (a forked child). Allocates (the sorted list).
pub(crate) fn close_all_except(keep: &[RawFd]) -> Result<(), Errno> {
    let mut keep: Vec<u32> = keep
        .iter()
        .map(|&fd| u32::try_from(fd).map_err(|_| Errno::EBADF))
        .collect::<Result<_, _>>()?;
    keep.sort_unstable();
    keep.dedup();
    let mut first = 0u32;
    for fd in keep {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd.saturating_add(1);
    }
    close_range(first, u32::MAX)
}

fn close_range(first: u32, last: u32) -> Result<(), Errno> {
    // SAFETY: close_range only closes fds of this process; no Rust object in this (forked,
    // never returning) process will use or close the fds in the range again.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) }).map(drop)
}

/// At the helper's start, first thing in `main`: closes every inherited descriptor above stdio,
/// except fd 3 when `keep_fd3` (the socket systemd passes), which it returns owned. Works only
/// once per process (later calls are `EBADF`): before it, no Rust object of this process refers
/// to any descriptor above 2, so fd 3, if open, is the inherited one and has no other owner.
pub(crate) fn take_inherited_fds(keep_fd3: bool) -> Result<Option<OwnedFd>, Errno> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(Errno::EBADF);
    }
    let first: u32 = if keep_fd3 { 4 } else { 3 };
    // SAFETY: close_range only closes descriptors; this runs once, before anything in this
    // process opened a descriptor of its own above stdio (the function's contract, enforced
    // once by TAKEN), so no Rust object owns any descriptor in the range.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) })?;
    if !keep_fd3 {
        return Ok(None);
    }
    // SAFETY: fcntl(F_GETFD) takes an integer and reads no memory; EBADF if fd 3 is not open.
    if unsafe { libc::fcntl(3, libc::F_GETFD) } < 0 {
        return Err(errno());
    }
    // SAFETY: fd 3 is open (just checked) and was inherited: nothing in this process opened or
    // adopted it before (TAKEN makes this the first and only adoption), so it is owned once.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(3) }))
}

/// Writes all of `buf`, retrying on `EINTR` and short writes.
pub(crate) fn write_all(fd: RawFd, mut buf: &[u8]) -> Result<(), Errno> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice of buf.len() bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = errno();
            if e == Errno::EINTR {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).map_err(|_| Errno::EIO)?;
        if n == 0 {
            return Err(Errno::EIO);
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Reads into `buf` until it is full or end of file; returns the number of bytes read.
pub(crate) fn read_full(fd: RawFd, buf: &mut [u8]) -> Result<usize, Errno> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: rest is a valid writable slice of rest.len() bytes.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        if n < 0 {
            let e = errno();
            if e == Errno::EINTR {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).map_err(|_| Errno::EIO)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// What one [`recv_with_fds`] got.
pub(crate) struct Received {
    pub bytes: usize,
    /// The fds attached with `SCM_RIGHTS`, close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The data or the control message did not fit.
    pub truncated: bool,
}

/// One `recvmsg(sock, buf)` with `MSG_CMSG_CLOEXEC` (plus `flags`), taking ownership of the
/// fds it carries. `cmsg` is a buffer from `nix::cmsg_space!`. The error names the call.
pub(crate) fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
    cmsg: &mut Vec<u8>,
    flags: MsgFlags,
) -> Result<Received, (Errno, &'static str)> {
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let flags = flags | MsgFlags::MSG_CMSG_CLOEXEC;
    let r = recvmsg::<()>(sock, &mut iov, Some(cmsg), flags)
        .map_err(|e| (e, "recvmsg on the control channel"))?;
    let mut fds = Vec::new();
    for c in r.cmsgs().map_err(|e| (e, "control message fds"))? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel installed this fd in our table for this message; nothing
                // else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let truncated = r
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    Ok(Received {
        bytes: r.bytes,
        fds,
        truncated,
    })
}

/// A read-only mapping of a whole memfd (a job order) sealed against writes and size changes;
/// unmapped on drop.
pub(crate) struct SealedMap {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

impl SealedMap {
    /// Maps `fd` after checking that it carries the seals that make it immutable. The error
    /// names what failed.
    pub(crate) fn new(fd: &OwnedFd) -> Result<SealedMap, (Errno, &'static str)> {
        let seals =
            fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(|e| (e, "job order seals"))?;
        let needed = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
        if !SealFlag::from_bits_truncate(seals).contains(needed) {
            return Err((Errno::EPERM, "job order is not sealed"));
        }
        let size = fstat(fd.as_raw_fd()).map_err(|e| (e, "job order size"))?;
        let len = usize::try_from(size.st_size).map_err(|_| (Errno::EFBIG, "size"))?;
        let nonzero = NonZeroUsize::new(len).ok_or((Errno::EINVAL, "empty"))?;
        // SAFETY: a fresh private read-only mapping of a whole file; the kernel picks the
        // address, so no existing memory is affected.
        let ptr = unsafe {
            mmap(
                None,
                nonzero,
                ProtFlags::PROT_READ,
                MapFlags::MAP_PRIVATE,
                fd,
                0,
            )
        }
        .map_err(|e| (e, "map the job order"))?;
        Ok(SealedMap { ptr, len })
    }

    /// The mapped bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live PROT_READ mapping of exactly `len` bytes until drop; the
        // memfd's seals (checked in `new`) forbid writes and size changes, so the bytes cannot
        // change or vanish under the slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for SealedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this address and length, and no slice
        // from `bytes` outlives `self` (it borrows it).
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}

/// How many bytes are waiting to be read on `fd` (a pipe or socket): `ioctl(FIONREAD)`.
pub(crate) fn bytes_readable(fd: BorrowedFd<'_>) -> Result<usize, Errno> {
    let mut n: libc::c_int = 0;
    // SAFETY: fd is an open descriptor for the borrow's lifetime; FIONREAD writes one c_int to
    // `n`, which is valid and writable.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
        return Err(errno());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// `dup2(from, to)` in a process about to exec (the output collector K): `to` is a fixed
/// number the next program expects, and whatever was at `to` is closed by the kernel, so the
/// caller must own no Rust object for `to` (K's objects are all above it, see `relocate_from`).
pub(crate) fn dup_onto(from: RawFd, to: RawFd) -> Result<(), Errno> {
    // SAFETY: dup2 takes two integers and touches only the descriptor table.
    if unsafe { libc::dup2(from, to) } != to {
        return Err(errno());
    }
    Ok(())
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, path, flags, RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS)`.
pub(crate) fn open_beneath(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: OFlag,
) -> Result<OwnedFd, Errno> {
    let how = OpenHow {
        flags: u64::from(
            (flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .bits()
                .cast_unsigned(),
        ),
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `dir` is a valid borrowed fd, `path` is NUL-terminated and `how` is a live, properly
    // laid out `struct open_how` whose size we pass; the kernel only reads them during the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if ret < 0 {
        return Err(errno());
    }
    let fd = i32::try_from(ret).map_err(|_| Errno::EBADF)?;
    // SAFETY: the syscall succeeded and returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod open_beneath_tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::symlink;

    #[test]
    fn given_a_symlinked_directory_in_the_middle_then_openat2_refuses_to_cross_it() {
        let d = tempfile::tempdir().unwrap();
        symlink("/etc", d.path().join("e")).unwrap();
        let fd: OwnedFd = std::fs::File::open(d.path()).unwrap().into();
        let r = open_beneath(fd.as_fd(), c"e/passwd", OFlag::O_RDONLY);
        assert_eq!(r.err(), Some(Errno::ELOOP));
        let r = open_beneath(fd.as_fd(), c"../../etc/passwd", OFlag::O_RDONLY);
        assert_eq!(r.err(), Some(Errno::EXDEV));
    }
}
