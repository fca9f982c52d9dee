//! What of output collection stays in the helper: the cap on a job's returned files, and
//! `openat2` beneath a directory fd (for templates' trees). The walk itself runs in the
//! collector executable `sandrun-outputs` (`collector/`), started by `sandbox::collector`; the
//! helper only re-checks its frame stream (`job::Collection`).

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::fcntl::OFlag;

/// Most output files returned per job (a template build job's cap is the helper's
/// `max_build_output_files` instead).
pub const MAX_OUTPUT_FILES: usize = 1000;

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
pub fn open_beneath(dir: BorrowedFd<'_>, path: &CStr, flags: OFlag) -> nix::Result<OwnedFd> {
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
        return Err(nix::errno::Errno::last());
    }
    let fd = i32::try_from(ret).map_err(|_| nix::errno::Errno::EBADF)?;
    // SAFETY: the syscall succeeded and returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::symlink;

    #[test]
    fn given_a_symlinked_directory_in_the_middle_then_openat2_refuses_to_cross_it() {
        let d = tempfile::tempdir().unwrap();
        symlink("/etc", d.path().join("e")).unwrap();
        let fd: OwnedFd = std::fs::File::open(d.path()).unwrap().into();
        let r = open_beneath(fd.as_fd(), c"e/passwd", OFlag::O_RDONLY);
        assert_eq!(r.err(), Some(nix::errno::Errno::ELOOP));
        let r = open_beneath(fd.as_fd(), c"../../etc/passwd", OFlag::O_RDONLY);
        assert_eq!(r.err(), Some(nix::errno::Errno::EXDEV));
    }
}
