//! Writes the job's input bundle into `/work`, as the job's uid, after isolation is in place.
//! Every path is walked one component at a time with `openat(O_NOFOLLOW)` relative to the work
//! directory fd, so nothing is ever followed out of it even if a path were not the validated
//! `BundlePath` it claims to be. Errors name the entry by index, never by name or contents.

#![forbid(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{fchmod, mkdirat, Mode};
use sandrun_ipc::{sanitize_mode, BundleEntry, BundlePath};

use super::{fail, SetupError, SetupStep};
use crate::sys::{self, write_all};

/// Creates every entry under `work` in order, files with their contents taken in order from
/// `data`, which must hold exactly the sum of the file sizes.
pub(super) fn write_bundle(
    work: RawFd,
    entries: &[BundleEntry],
    data: &[u8],
) -> Result<(), SetupError> {
    let mut offset = 0usize;
    let mut dirs = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let err = |e: Errno| fail(SetupStep::WriteBundle, e, format!("bundle entry {index}"));
        match entry {
            BundleEntry::Dir { path, mode } => {
                make_dir(work, path).map_err(err)?;
                dirs.push((path, *mode, index));
            }
            BundleEntry::File { path, mode, size } => {
                let size = usize::try_from(*size).map_err(|_| err(Errno::EFBIG))?;
                let end = offset.checked_add(size).ok_or_else(|| err(Errno::EINVAL))?;
                let contents = data.get(offset..end).ok_or_else(|| err(Errno::EINVAL))?;
                write_file(work, path, contents, *mode).map_err(err)?;
                offset = end;
            }
        }
    }
    if offset != data.len() {
        let detail = "bundle data longer than its files";
        return Err(fail(SetupStep::WriteBundle, Errno::EINVAL, detail));
    }
    // Directories get their final modes last, deepest (latest) first, so a read-only
    // directory does not stop the entries below it from being written.
    for (path, mode, index) in dirs.into_iter().rev() {
        set_dir_mode(work, path, mode)
            .map_err(|e| fail(SetupStep::WriteBundle, e, format!("bundle entry {index}")))?;
    }
    Ok(())
}

/// Opens the directory `rel` (empty: `work` itself) below `work` without following symlinks,
/// as an `O_PATH` fd, for `fchdir`.
pub(super) fn open_workdir(work: RawFd, rel: &str) -> Result<OwnedFd, SetupError> {
    let step = SetupStep::WorkDir;
    if rel.is_empty() {
        return sys::relocate_from(work, 0).map_err(|e| fail(step, e, "/work"));
    }
    let path = BundlePath::new(rel).map_err(|_| fail(step, Errno::EINVAL, "workdir"))?;
    let mut dir = sys::relocate_from(work, 0).map_err(|e| fail(step, e, "/work"))?;
    for name in path.components() {
        dir = open_dir(dir.as_raw_fd(), name).map_err(|e| fail(step, e, "workdir"))?;
    }
    Ok(dir)
}

fn make_dir(work: RawFd, path: &BundlePath) -> Result<(), Errno> {
    let (parent, name) = open_parent(work, path)?;
    mkdirat(
        Some(parent.as_raw_fd()),
        name,
        Mode::from_bits_truncate(0o700),
    )
}

fn write_file(work: RawFd, path: &BundlePath, contents: &[u8], mode: u32) -> Result<(), Errno> {
    let (parent, name) = open_parent(work, path)?;
    let flags =
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY | OFlag::O_CLOEXEC;
    let file = sys::openat(
        parent.as_raw_fd(),
        name,
        flags,
        Mode::from_bits_truncate(0o600),
    )?;
    write_all(file.as_raw_fd(), contents)?;
    fchmod(file.as_raw_fd(), mode_bits(mode))
}

fn set_dir_mode(work: RawFd, path: &BundlePath, mode: u32) -> Result<(), Errno> {
    let (parent, name) = open_parent(work, path)?;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = sys::openat(parent.as_raw_fd(), name, flags, Mode::empty())?;
    fchmod(dir.as_raw_fd(), mode_bits(mode))
}

/// Only permission bits survive: setuid, setgid and sticky are stripped.
fn mode_bits(mode: u32) -> Mode {
    Mode::from_bits_truncate(sanitize_mode(mode))
}

/// Walks every component of `path` but the last, returning the parent directory and the last
/// component.
fn open_parent(work: RawFd, path: &BundlePath) -> Result<(OwnedFd, &str), Errno> {
    let mut parts: Vec<&str> = path.components().collect();
    let name = parts.pop().ok_or(Errno::EINVAL)?;
    check_component(name)?;
    let mut dir = sys::relocate_from(work, 0)?;
    for part in parts {
        dir = open_dir(dir.as_raw_fd(), part)?;
    }
    Ok((dir, name))
}

fn open_dir(dir: RawFd, name: &str) -> Result<OwnedFd, Errno> {
    check_component(name)?;
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    sys::openat(dir, name, flags, Mode::empty())
}

/// Defence in depth: a component is one plain name.
fn check_component(name: &str) -> Result<(), Errno> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_dot_dot_or_slash_component_then_it_is_refused() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert_eq!(check_component(bad), Err(Errno::EINVAL), "{bad:?}");
        }
        assert_eq!(check_component("main.py"), Ok(()));
    }

    #[test]
    fn given_setuid_setgid_sticky_mode_then_only_permission_bits_remain() {
        assert_eq!(mode_bits(0o7755).bits(), 0o755);
    }
}
