//! File descriptors: opening, duplicating, closing, reading and writing, receiving fds over a
//! socket, and mapping a sealed memfd.

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

/// Closes every inherited fd from `first` on, at the helper's start: the process is
/// single-threaded and no Rust object refers to an fd that high yet.
pub(crate) fn close_inherited_from(first: u32) -> Result<(), Errno> {
    // SAFETY: close_range only closes descriptors; the caller runs first thing in `main`,
    // before anything opened an fd of its own above `first` (stdio and a systemd socket,
    // which are kept, are below).
    check(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) }).map(drop)
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

/// Takes ownership of descriptor `raw`, inherited from whoever started this process (systemd's
/// socket activation passes fd 3). Each descriptor can be adopted once: a second call for the
/// same number, or a number this process already owns elsewhere (any below 3), is `EBADF`, so
/// no two owners can close it.
pub(crate) fn adopt_inherited(raw: RawFd) -> Result<OwnedFd, Errno> {
    static ADOPTED: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());
    let mut adopted = ADOPTED.lock().map_err(|_| Errno::EBADF)?;
    if raw < 3 || adopted.contains(&raw) {
        return Err(Errno::EBADF);
    }
    // F_GETFD fails with EBADF if `raw` is not open.
    // SAFETY: fcntl(F_GETFD) takes an integer and reads no memory.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(errno());
    }
    adopted.push(raw);
    // SAFETY: `raw` is open (checked above), and was passed to this process at start; the list
    // makes this the only place that ever takes ownership of it, so it is owned exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;

    use super::*;

    #[test]
    fn given_an_inherited_fd_then_it_is_adopted_once_and_stdio_or_a_closed_number_never() {
        let raw = std::fs::File::open("/dev/null")
            .expect("open /dev/null")
            .into_raw_fd();
        let owned = adopt_inherited(raw).expect("an open fd is adopted");
        assert_eq!(owned.as_raw_fd(), raw);
        assert_eq!(
            adopt_inherited(raw).err(),
            Some(Errno::EBADF),
            "adopted twice"
        );
        assert_eq!(
            adopt_inherited(1).err(),
            Some(Errno::EBADF),
            "stdout adopted"
        );
        let closed = std::fs::File::open("/dev/null")
            .expect("open")
            .into_raw_fd();
        drop(adopt_inherited(closed).expect("adopt"));
        // Closed now (the OwnedFd dropped it): a fresh number it may get again is refused too,
        // because it was adopted once; an fd number never opened is EBADF from fcntl.
        assert_eq!(adopt_inherited(closed).err(), Some(Errno::EBADF));
        assert_eq!(adopt_inherited(1_000_000).err(), Some(Errno::EBADF));
    }
}
