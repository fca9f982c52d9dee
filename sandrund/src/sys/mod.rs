//! The helper's foreign-function interface: every raw syscall and `unsafe` block of the root
//! code lives here, each in a small safe function whose `// SAFETY:` comment names the
//! invariant; every other module file carries `#![forbid(unsafe_code)]`.
//!
//! Failures are [`Errno`] (`Copy`, allocation-free), so the wrappers can be used in the
//! sandbox's init C and job process J after `clone`. A wrapper that allocates says so; J calls
//! none of those after its seccomp filter is installed.

mod creds;
mod fd;
mod mount;
mod net;
mod process;

pub(crate) use creds::*;
pub(crate) use fd::*;
pub(crate) use mount::*;
pub(crate) use net::*;
pub(crate) use process::*;

use nix::errno::Errno;

/// The calling thread's errno after a failed libc call.
pub(crate) fn errno() -> Errno {
    Errno::last()
}

/// A raw syscall's return value: the errno if it is negative.
fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret < 0 {
        return Err(errno());
    }
    Ok(ret)
}
