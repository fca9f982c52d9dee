//! Environment templates as the helper sees them: the lock file of one template, read through a
//! descriptor of the template's tree (for a job, its own detached read-only clone, so the hash is
//! that of exactly what the job gets at `/env`), and the list of templates for
//! [`sandrun_ipc::Request::ListTemplates`].
//!
//! The helper hashes lock files and relays their bytes; it never parses them (rule 1: root parses
//! no complex format). Every open is `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` with `O_NOFOLLOW | O_NONBLOCK`, `fstat` must say "regular file" (or
//! "directory"), and reads stop at [`MAX_LOCK_BYTES`].

#![forbid(unsafe_code)]

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{fstat, SFlag};
use sandrun_ipc::rules::{
    is_template_name, LOCK_FILE, MAX_LOCK_BYTES, MAX_TEMPLATES, MAX_TEMPLATE_LIST_BYTES,
};
use sandrun_ipc::{TemplateInfo, TemplateLock};
use sha2::{Digest, Sha256};

use crate::sys::open_beneath;

/// Why a template's lock file is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockError {
    /// Absent, or not reachable without a symlink.
    Open(Errno),
    /// Not a regular file.
    NotAFile,
    /// Larger than [`MAX_LOCK_BYTES`].
    TooLarge,
    /// Reading failed.
    Read(Errno),
}

impl LockError {
    /// The errno a setup failure reports for it.
    pub(crate) fn errno(self) -> i32 {
        match self {
            LockError::Open(e) | LockError::Read(e) => e as i32,
            LockError::NotAFile => libc::EINVAL,
            LockError::TooLarge => libc::EFBIG,
        }
    }
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Open(e) => write!(
                f,
                "{LOCK_FILE} cannot be opened ({}): not a template built by sandrunctl env build?",
                e.desc()
            ),
            LockError::NotAFile => write!(f, "{LOCK_FILE} is not a regular file"),
            LockError::TooLarge => write!(f, "{LOCK_FILE} is larger than {MAX_LOCK_BYTES} bytes"),
            LockError::Read(e) => write!(f, "{LOCK_FILE} cannot be read ({})", e.desc()),
        }
    }
}

/// The lock file at the top of the template tree `tree` (a directory fd), with its SHA-256.
pub(crate) fn read_lock(tree: BorrowedFd<'_>) -> Result<TemplateLock, LockError> {
    // Invariant: LOCK_FILE is a constant without NUL bytes.
    let name = CString::new(LOCK_FILE).map_err(|_| LockError::Open(Errno::EINVAL))?;
    let fd =
        open_beneath(tree, &name, OFlag::O_RDONLY | OFlag::O_NONBLOCK).map_err(LockError::Open)?;
    let st = fstat(fd.as_raw_fd()).map_err(LockError::Read)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(LockError::NotAFile);
    }
    if u64::try_from(st.st_size).unwrap_or(u64::MAX) > MAX_LOCK_BYTES as u64 {
        return Err(LockError::TooLarge);
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_LOCK_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| LockError::Read(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    // It grew since the fstat.
    if bytes.len() > MAX_LOCK_BYTES {
        return Err(LockError::TooLarge);
    }
    let sha256 = Sha256::digest(&bytes).into();
    Ok(TemplateLock { sha256, bytes })
}

/// The templates of `template_dir`, sorted by name: plain directories (not symlinks) with a valid
/// name (so `.staging-*`, `.retired-*` and `.build-*` of `sandrunctl env` are not listed), each
/// with its lock if usable. Returns them and how many were left out past [`MAX_TEMPLATES`] or
/// [`MAX_TEMPLATE_LIST_BYTES`]. An unreadable template directory lists nothing.
pub(crate) fn list(template_dir: &Path) -> (Vec<TemplateInfo>, u32) {
    // std opens with O_CLOEXEC; a directory opens read-only like any file.
    let dir = match std::fs::File::open(template_dir) {
        Ok(f) => OwnedFd::from(f),
        Err(e) => {
            log::warn!(
                "template directory cannot be opened dir={} error={}",
                template_dir.display(),
                e
            );
            return (Vec::new(), 0);
        }
    };
    let mut names: Vec<String> = match std::fs::read_dir(template_dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_template_name(n))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut omitted = 0u32;
    for name in names {
        if out.len() >= MAX_TEMPLATES {
            omitted = omitted.saturating_add(1);
            continue;
        }
        let lock = open_template(dir.as_fd(), &name).and_then(|t| read_lock(t.as_fd()).ok());
        let size = lock.as_ref().map_or(0, |l| l.bytes.len());
        if bytes + size > MAX_TEMPLATE_LIST_BYTES {
            omitted = omitted.saturating_add(1);
            continue;
        }
        bytes += size;
        out.push(TemplateInfo { name, lock });
    }
    (out, omitted)
}

/// The directory `name` right below `dir`, not through a symlink.
fn open_template(dir: BorrowedFd<'_>, name: &str) -> Option<OwnedFd> {
    let c = CString::new(name).ok()?;
    let fd = open_beneath(
        dir,
        &c,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NONBLOCK,
    )
    .ok()?;
    Some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock_of(dir: &Path) -> Result<TemplateLock, LockError> {
        let fd = OwnedFd::from(std::fs::File::open(dir).unwrap());
        read_lock(fd.as_fd())
    }

    #[test]
    fn given_a_lock_file_then_its_bytes_and_sha256_are_returned() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(LOCK_FILE), b"{\"format\":1}\n").unwrap();
        let lock = lock_of(t.path()).unwrap();
        assert_eq!(lock.bytes, b"{\"format\":1}\n");
        assert_eq!(
            lock.sha256.to_vec(),
            Sha256::digest(b"{\"format\":1}\n").to_vec()
        );
    }

    #[test]
    fn given_no_lock_a_symlinked_one_a_directory_or_a_huge_one_then_each_is_refused() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(lock_of(t.path()), Err(LockError::Open(Errno::ENOENT)));
        std::fs::write(t.path().join("real.json"), b"{}").unwrap();
        std::os::unix::fs::symlink("real.json", t.path().join(LOCK_FILE)).unwrap();
        assert!(matches!(lock_of(t.path()), Err(LockError::Open(_))));
        std::fs::remove_file(t.path().join(LOCK_FILE)).unwrap();
        std::fs::create_dir(t.path().join(LOCK_FILE)).unwrap();
        assert_eq!(lock_of(t.path()), Err(LockError::NotAFile));
        std::fs::remove_dir(t.path().join(LOCK_FILE)).unwrap();
        std::fs::write(t.path().join(LOCK_FILE), vec![b' '; MAX_LOCK_BYTES + 1]).unwrap();
        assert_eq!(lock_of(t.path()), Err(LockError::TooLarge));
    }

    #[test]
    fn given_a_template_directory_then_only_named_directories_are_listed_with_their_locks() {
        let t = tempfile::tempdir().unwrap();
        for d in ["b", "a", ".staging-a-1", "no-lock"] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        std::fs::write(t.path().join("a").join(LOCK_FILE), b"A").unwrap();
        std::fs::write(t.path().join("b").join(LOCK_FILE), b"B").unwrap();
        std::fs::write(t.path().join("file"), b"x").unwrap();
        std::os::unix::fs::symlink(t.path().join("a"), t.path().join("link")).unwrap();
        let (list, omitted) = list(t.path());
        let names: Vec<&str> = list.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "no-lock"]);
        assert_eq!(omitted, 0);
        assert_eq!(list[0].lock.as_ref().unwrap().bytes, b"A");
        assert!(list[2].lock.is_none());
    }
}
