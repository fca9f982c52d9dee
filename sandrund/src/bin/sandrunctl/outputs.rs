//! Writes returned output files under `--out-dir`, never outside it.
//!
//! Every path component is opened relative to the previous directory with `O_NOFOLLOW`, so a
//! symlink planted in the output directory cannot redirect a write. The final file is opened with
//! `O_NOFOLLOW | O_NONBLOCK` (a FIFO cannot block the client) and must be a regular file. Size and
//! sha256 are checked against the header; a file that does not match is removed.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use sandrun_ipc::{BundlePath, OutputFileHeader};
use sha2::{Digest, Sha256};

use crate::error::CtlError;

/// The output directory, held open.
pub(crate) struct OutDir {
    dir: File,
    root: PathBuf,
}

/// One output file being received.
pub(crate) struct OutFile {
    header: OutputFileHeader,
    parent: OwnedFd,
    name: String,
    file: File,
    written: u64,
    hash: Sha256,
}

impl OutDir {
    /// Creates `root` if needed and opens it.
    pub(crate) fn open(root: &Path) -> Result<OutDir, CtlError> {
        let err = |e: std::io::Error| out_err(&root.display().to_string(), &e.to_string());
        fs::create_dir_all(root).map_err(err)?;
        let dir = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(root)
            .map_err(err)?;
        Ok(OutDir {
            dir,
            root: root.to_owned(),
        })
    }

    /// Creates (or truncates) the file for `header`, creating parent directories.
    pub(crate) fn create(&self, header: OutputFileHeader) -> Result<OutFile, CtlError> {
        let shown = header.path.as_str().to_owned();
        let err = |e: Errno| out_err(&shown, &format!("{} ({e})", self.root.display()));
        let comps: Vec<&str> = header.path.components().collect();
        let (name, dirs) = comps
            .split_last()
            .ok_or_else(|| out_err(&shown, "empty path"))?;
        let mut parent = dup_dir(&self.dir).map_err(err)?;
        for comp in dirs {
            parent = open_subdir(&parent, comp).map_err(err)?;
        }
        let file = create_file(&parent, name).map_err(err)?;
        let name = (*name).to_owned();
        Ok(OutFile {
            header,
            parent,
            name,
            file,
            written: 0,
            hash: Sha256::new(),
        })
    }
}

impl OutFile {
    pub(crate) fn path(&self) -> &BundlePath {
        &self.header.path
    }

    /// Whether every announced byte has arrived.
    pub(crate) fn is_complete(&self) -> bool {
        self.written == self.header.size
    }

    /// Appends one chunk; more bytes than announced is an error.
    pub(crate) fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), CtlError> {
        let total = self.written + chunk.len() as u64;
        if total > self.header.size {
            return Err(self.fail("more bytes arrived than the header announced"));
        }
        if let Err(e) = self.file.write_all(chunk) {
            return Err(self.fail(&e.to_string()));
        }
        self.hash.update(chunk);
        self.written = total;
        Ok(())
    }

    /// Checks the sha256 once complete; a mismatch removes the file.
    pub(crate) fn finish(self) -> Result<OutputFileHeader, CtlError> {
        let digest: [u8; 32] = self.hash.clone().finalize().into();
        if digest != self.header.sha256 {
            return Err(self.fail("sha256 does not match the header"));
        }
        Ok(self.header)
    }

    fn fail(&self, reason: &str) -> CtlError {
        // Best effort: a half-written or corrupt output must not look like a good one.
        let _ = nix::unistd::unlinkat(
            Some(self.parent.as_raw_fd()),
            self.name.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        out_err(self.header.path.as_str(), reason)
    }
}

/// Lowercase hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn dup_dir(dir: &File) -> Result<OwnedFd, Errno> {
    let fd = openat(Some(dir.as_raw_fd()), ".", dir_flags(), Mode::empty())?;
    Ok(owned(fd))
}

fn open_subdir(parent: &OwnedFd, name: &str) -> Result<OwnedFd, Errno> {
    match mkdirat(
        Some(parent.as_raw_fd()),
        name,
        Mode::from_bits_truncate(0o755),
    ) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e),
    }
    // O_NOFOLLOW | O_DIRECTORY: a symlink or a non-directory here is refused.
    let fd = openat(
        Some(parent.as_raw_fd()),
        name,
        dir_flags() | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )?;
    Ok(owned(fd))
}

fn create_file(parent: &OwnedFd, name: &str) -> Result<File, Errno> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = openat(
        Some(parent.as_raw_fd()),
        name,
        flags,
        Mode::from_bits_truncate(0o644),
    )?;
    let file = File::from(owned(fd));
    let meta = file
        .metadata()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    if !meta.file_type().is_file() {
        return Err(Errno::EINVAL);
    }
    // Truncate only after the checks: opening with O_TRUNC could truncate a device.
    file.set_len(0)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    Ok(file)
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful openat and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn out_err(path: &str, reason: &str) -> CtlError {
    CtlError::Output {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, data: &[u8]) -> OutputFileHeader {
        OutputFileHeader {
            path: BundlePath::new(path).unwrap(),
            size: data.len() as u64,
            sha256: Sha256::digest(data).into(),
        }
    }

    #[test]
    fn given_nested_output_then_parents_are_created_and_content_verified() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutDir::open(dir.path()).unwrap();
        let mut f = out.create(header("a/b/c.txt", b"xyz")).unwrap();
        f.write_chunk(b"xy").unwrap();
        f.write_chunk(b"z").unwrap();
        assert!(f.is_complete());
        f.finish().unwrap();
        assert_eq!(fs::read(dir.path().join("a/b/c.txt")).unwrap(), b"xyz");
    }

    #[test]
    fn given_symlinked_subdir_in_out_dir_then_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("a")).unwrap();
        let out = OutDir::open(dir.path()).unwrap();
        assert!(out.create(header("a/x", b"1")).is_err());
        assert!(!elsewhere.path().join("x").exists());
    }

    #[test]
    fn given_symlink_at_file_name_then_target_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("out")).unwrap();
        let out = OutDir::open(dir.path()).unwrap();
        assert!(out.create(header("out", b"1")).is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn given_wrong_sha_then_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutDir::open(dir.path()).unwrap();
        let mut h = header("f", b"abc");
        h.sha256 = [0; 32];
        let mut f = out.create(h).unwrap();
        f.write_chunk(b"abc").unwrap();
        assert!(f.finish().is_err());
        assert!(!dir.path().join("f").exists());
    }

    #[test]
    fn given_bytes_then_hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
