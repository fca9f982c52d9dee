//! File access to a cgroup tree behind a small trait, so the v1 and v2 code runs unchanged against
//! a fake tree in tests. The fake only has to do what the kernel does on `mkdir` (create the
//! control files) and `rmdir` (refuse while processes remain); reads and writes are plain file
//! I/O in both.

#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::parse;
use super::CgroupError;

/// Largest cgroup file read (`cgroup.procs` of a job is bounded by `pids.max`).
const MAX_READ_BYTES: u64 = 1 << 20;

/// File operations on a cgroup tree. The provided methods are the real ones; a test fake
/// overrides `mkdir` and `rmdir` to behave like the kernel.
pub trait CgroupFs: fmt::Debug + Send + Sync {
    /// Creates one cgroup directory (the kernel populates its control files).
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    /// Removes one cgroup directory; fails with `EBUSY` while processes remain.
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }

    /// Reads a whole control file (at most 1 MiB).
    fn read(&self, path: &Path) -> io::Result<String> {
        let file = open_nofollow(OpenOptions::new().read(true), path)?;
        let mut text = String::new();
        file.take(MAX_READ_BYTES + 1).read_to_string(&mut text)?;
        if u64::try_from(text.len()).unwrap_or(u64::MAX) > MAX_READ_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "file larger than 1 MiB",
            ));
        }
        Ok(text)
    }

    /// Writes a value to an existing control file in one `write(2)`; never creates the file.
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let mut file = open_nofollow(OpenOptions::new().write(true).truncate(true), path)?;
        let written = file.write(value.as_bytes())?;
        if written != value.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to cgroup file",
            ));
        }
        Ok(())
    }

    /// Whether a control file or directory exists.
    fn exists(&self, path: &Path) -> io::Result<bool> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Names of the subdirectories of `path` (child cgroups).
    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(names)
    }

    /// Opens `cgroup.procs` `O_WRONLY|O_CLOEXEC` for a child to join the cgroup later.
    fn open_join(&self, path: &Path) -> io::Result<OwnedFd> {
        // std opens every file with O_CLOEXEC.
        open_nofollow(OpenOptions::new().write(true), path).map(OwnedFd::from)
    }

    /// Opens a cgroup directory `O_RDONLY|O_DIRECTORY|O_CLOEXEC`, for `clone3`'s
    /// `CLONE_INTO_CGROUP`.
    fn open_dir(&self, path: &Path) -> io::Result<OwnedFd> {
        let mut options = OpenOptions::new();
        options.read(true).custom_flags(libc::O_DIRECTORY);
        open_nofollow(&mut options, path).map(OwnedFd::from)
    }
}

/// The real cgroup filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl CgroupFs for RealFs {}

/// What the cgroup code needs from the host: the cgroup filesystem and where `/proc/swaps` is.
#[derive(Debug, Clone)]
pub struct Host {
    pub fs: Arc<dyn CgroupFs>,
    pub proc_swaps: PathBuf,
}

impl Host {
    /// The running kernel.
    pub fn real() -> Self {
        Host {
            fs: Arc::new(RealFs),
            proc_swaps: PathBuf::from("/proc/swaps"),
        }
    }

    /// Whether the host has swap. An unreadable `/proc/swaps` counts as swap (fail closed).
    pub(crate) fn swap_present(&self) -> bool {
        match self.fs.read(&self.proc_swaps) {
            Ok(text) => parse::swaps_present(&text),
            Err(e) => {
                log::warn!(
                    "cannot read swap areas; assuming swap is present path={} error={}",
                    self.proc_swaps.display(),
                    e
                );
                true
            }
        }
    }

    pub(crate) fn read(&self, step: &'static str, path: &Path) -> Result<String, CgroupError> {
        self.fs
            .read(path)
            .map_err(|source| io_error(step, path, source))
    }

    pub(crate) fn read_u64(&self, step: &'static str, path: &Path) -> Result<u64, CgroupError> {
        parse::parse_u64(&self.read(step, path)?, path)
    }

    /// Reads `key` from a flat keyed file; a missing key is a parse error.
    pub(crate) fn read_key(
        &self,
        step: &'static str,
        path: &Path,
        key: &str,
    ) -> Result<u64, CgroupError> {
        parse::keyed_u64(&self.read(step, path)?, key, path)?.ok_or_else(|| CgroupError::Parse {
            path: path.to_owned(),
            detail: format!("key {key} missing"),
        })
    }

    pub(crate) fn write(
        &self,
        step: &'static str,
        path: &Path,
        value: &str,
    ) -> Result<(), CgroupError> {
        self.fs
            .write(path, value)
            .map_err(|source| io_error(step, path, source))
    }

    pub(crate) fn exists(&self, step: &'static str, path: &Path) -> Result<bool, CgroupError> {
        self.fs
            .exists(path)
            .map_err(|source| io_error(step, path, source))
    }

    pub(crate) fn pids(&self, step: &'static str, path: &Path) -> Result<Vec<i32>, CgroupError> {
        parse::parse_pids(&self.read(step, path)?, path)
    }

    /// Creates `path` unless it exists already (the shared `sandrun/` parent).
    pub(crate) fn ensure_dir(&self, path: &Path) -> Result<(), CgroupError> {
        match self.fs.mkdir(path) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                Err(io_error("create sandrun parent cgroup", path, e))
            }
            _ => Ok(()),
        }
    }
}

pub(crate) fn io_error(step: &'static str, path: &Path, source: io::Error) -> CgroupError {
    CgroupError::Io {
        step,
        path: path.to_owned(),
        source,
    }
}

fn open_nofollow(options: &mut OpenOptions, path: &Path) -> io::Result<File> {
    options.custom_flags(libc::O_NOFOLLOW).open(path)
}
