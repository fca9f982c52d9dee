//! Writes returned output files into a directory `sandrunctl` creates, and never over anything.
//!
//! `sandrunctl` runs as root and every name in an `OutputFile` header comes from a job, so:
//! - the output directory is new (`./sandrun-<job>/` by default) or an `--out-dir` that is absent
//!   or empty; a symlink, a non-directory or a non-empty directory is refused before the job is
//!   submitted ([`EXIT_OUT_DIR_REFUSED`](crate::error::EXIT_OUT_DIR_REFUSED)), and the directory
//!   is made (or checked again) only once the helper has accepted the job;
//! - files are written into a private staging directory inside it (mode 0700), each created with
//!   `openat(O_CREAT | O_EXCL | O_NOFOLLOW)` relative to its parent's descriptor, directories with
//!   `mkdirat` and `O_NOFOLLOW | O_DIRECTORY` opens, so no name can reach outside it or reuse a
//!   file; a file must be selected by one of the `--output` patterns;
//! - size and sha256 are checked against the header;
//! - only after the job's last file has been verified are the staged entries moved into place
//!   with `renameat2(RENAME_NOREPLACE)`. Any error before or during that removes everything
//!   written (and the directory, if `sandrunctl` created it): nothing is left half-written.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, renameat2, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{faccessat, unlinkat, AccessFlags, UnlinkatFlags};
use sandrun_ipc::{BundlePath, JobId, OutputFileHeader, OutputPattern};
use sha2::{Digest, Sha256};

use crate::error::CtlError;

/// Name prefix of the staging directory inside the output directory.
pub(crate) const STAGING_PREFIX: &str = ".sandrun-partial-";
/// How many names `sandrun-<job>`, `sandrun-<job>.2`, ... are tried for the default directory
/// (job ids restart at 1 with the helper, so an earlier run may hold the first name).
const DEFAULT_NAME_TRIES: u32 = 100;

/// Where a job's output files go, decided before the job is submitted.
pub(crate) enum Outputs {
    /// No `--output` pattern: nothing is written and no directory is made.
    NotAsked,
    /// A new `./sandrun-<job>/`, made once the helper has assigned the job's id.
    Default(Vec<OutputPattern>),
    /// `--out-dir`, checked before the job is submitted and made (or checked again) once the
    /// helper has accepted it, so a job refused or interrupted before that leaves nothing.
    Given(PathBuf, Vec<OutputPattern>),
    /// The directory, made or checked empty, with its staging directory.
    Ready(OutDir),
}

impl Outputs {
    /// Checks the output directory before the job is submitted; creates nothing yet.
    pub(crate) fn plan(
        out_dir: Option<&Path>,
        patterns: Vec<OutputPattern>,
    ) -> Result<Outputs, CtlError> {
        if patterns.is_empty() {
            return Ok(Outputs::NotAsked);
        }
        match out_dir {
            Some(path) => {
                inspect(path)?;
                Ok(Outputs::Given(path.to_owned(), patterns))
            }
            None => {
                check_cwd_writable()?;
                Ok(Outputs::Default(patterns))
            }
        }
    }

    /// Makes the directory once the helper has accepted (and named) the job.
    pub(crate) fn accepted(&mut self, job: JobId) -> Result<(), CtlError> {
        let dir = match self {
            Outputs::Default(patterns) => OutDir::new_default(job, std::mem::take(patterns))?,
            Outputs::Given(path, patterns) => OutDir::given(path, std::mem::take(patterns))?,
            Outputs::NotAsked | Outputs::Ready(_) => return Ok(()),
        };
        *self = Outputs::Ready(dir);
        Ok(())
    }

    /// The directory files are written to, once it exists.
    pub(crate) fn dir(&mut self) -> Option<&mut OutDir> {
        match self {
            Outputs::Ready(dir) => Some(dir),
            Outputs::NotAsked | Outputs::Default(_) | Outputs::Given(..) => None,
        }
    }

    /// Whether any output was asked for.
    pub(crate) fn asked(&self) -> bool {
        !matches!(self, Outputs::NotAsked)
    }

    /// Moves every staged file into place; returns the directory's path, if there is one.
    pub(crate) fn commit(self) -> Result<Option<PathBuf>, CtlError> {
        match self {
            Outputs::Ready(dir) => dir.commit().map(Some),
            Outputs::NotAsked | Outputs::Default(_) | Outputs::Given(..) => Ok(None),
        }
    }
}

/// The output directory and its private staging directory, both held open. Dropped without
/// [`OutDir::commit`], it removes everything it wrote.
pub(crate) struct OutDir {
    /// The directory that contains `dir`, and `dir`'s name in it.
    parent: OwnedFd,
    name: CString,
    /// Whether `sandrunctl` created `dir` (then a failure removes it too).
    created: bool,
    dir: OwnedFd,
    path: PathBuf,
    staging: OwnedFd,
    staging_name: CString,
    /// First components of the files staged so far, in order: what `commit` moves.
    top_level: Vec<String>,
    patterns: Vec<OutputPattern>,
    committed: bool,
}

/// One output file being received into the staging directory.
pub(crate) struct OutFile {
    header: OutputFileHeader,
    file: File,
    written: u64,
    hash: Sha256,
}

impl OutDir {
    /// `--out-dir PATH`: created if absent, used if it is an empty directory, refused otherwise.
    pub(crate) fn given(path: &Path, patterns: Vec<OutputPattern>) -> Result<OutDir, CtlError> {
        let (parent, name, existing) = inspect(path)?;
        let (dir, created) = match existing {
            Some(dir) => (dir, false),
            None => {
                mkdirat(
                    Some(parent.as_raw_fd()),
                    name.as_c_str(),
                    Mode::from_bits_truncate(0o755),
                )
                .map_err(|e| out_dir_err(path, &format!("cannot create it ({e})")))?;
                (Self::open_target(&parent, &name, true, path)?, true)
            }
        };
        Self::with_staging(parent, name, created, dir, path.to_owned(), patterns)
    }

    /// The default: a new `sandrun-<job>` (or `sandrun-<job>.N`) in the current directory.
    fn new_default(job: JobId, patterns: Vec<OutputPattern>) -> Result<OutDir, CtlError> {
        let cwd = Path::new(".");
        let parent = open_dir(None, cwd, false)
            .map_err(|e| out_dir_err(cwd, &format!("cannot open it ({e})")))?;
        for n in 1..=DEFAULT_NAME_TRIES {
            let shown = match n {
                1 => format!("sandrun-{job}"),
                n => format!("sandrun-{job}.{n}"),
            };
            let path = PathBuf::from(&shown);
            // The name holds only ASCII digits, letters, '-' and '.'.
            let name = CString::new(shown).map_err(|_| out_dir_err(&path, "invalid name"))?;
            match mkdirat(
                Some(parent.as_raw_fd()),
                name.as_c_str(),
                Mode::from_bits_truncate(0o755),
            ) {
                Ok(()) => {
                    let dir = Self::open_target(&parent, &name, true, &path)?;
                    return Self::with_staging(parent, name, true, dir, path, patterns);
                }
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(out_dir_err(&path, &format!("cannot create it ({e})"))),
            }
        }
        Err(out_dir_err(
            Path::new(&format!("sandrun-{job}")),
            &format!("it and {} numbered variants exist", DEFAULT_NAME_TRIES - 1),
        ))
    }

    fn open_target(
        parent: &OwnedFd,
        name: &CString,
        created: bool,
        path: &Path,
    ) -> Result<OwnedFd, CtlError> {
        open_dir(Some(parent), name.as_c_str(), true).map_err(|e| {
            if created {
                let _ = unlinkat(
                    Some(parent.as_raw_fd()),
                    name.as_c_str(),
                    UnlinkatFlags::RemoveDir,
                );
            }
            out_dir_err(path, &format!("cannot open it ({e})"))
        })
    }

    fn with_staging(
        parent: OwnedFd,
        name: CString,
        created: bool,
        dir: OwnedFd,
        path: PathBuf,
        patterns: Vec<OutputPattern>,
    ) -> Result<OutDir, CtlError> {
        let fail = |e: Errno, parent: &OwnedFd, name: &CString| {
            if created {
                let _ = unlinkat(
                    Some(parent.as_raw_fd()),
                    name.as_c_str(),
                    UnlinkatFlags::RemoveDir,
                );
            }
            out_dir_err(&path, &format!("cannot create its staging directory ({e})"))
        };
        let staging_name = format!("{STAGING_PREFIX}{}", std::process::id());
        // The prefix and a number hold no NUL.
        let staging_name =
            CString::new(staging_name).map_err(|_| fail(Errno::EINVAL, &parent, &name))?;
        if let Err(e) = mkdirat(
            Some(dir.as_raw_fd()),
            staging_name.as_c_str(),
            Mode::from_bits_truncate(0o700),
        ) {
            return Err(fail(e, &parent, &name));
        }
        let staging = match open_dir(Some(&dir), staging_name.as_c_str(), true) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = unlinkat(
                    Some(dir.as_raw_fd()),
                    staging_name.as_c_str(),
                    UnlinkatFlags::RemoveDir,
                );
                return Err(fail(e, &parent, &name));
            }
        };
        Ok(OutDir {
            parent,
            name,
            created,
            dir,
            path,
            staging,
            staging_name,
            top_level: Vec::new(),
            patterns,
            committed: false,
        })
    }

    /// Creates the staged file for `header` (never an existing one), creating parent
    /// directories; the path must be selected by one of the `--output` patterns.
    pub(crate) fn create(&mut self, header: OutputFileHeader) -> Result<OutFile, CtlError> {
        let shown = header.path.as_str().to_owned();
        if !self.patterns.iter().any(|p| p.matches(&shown)) {
            return Err(out_err(&shown, "no --output pattern selects this file"));
        }
        let comps: Vec<&str> = header.path.components().collect();
        if let Some(bad) = comps.iter().find(|c| !is_plain_name(c)) {
            return Err(out_err(&shown, &format!("unsafe path component {bad:?}")));
        }
        let (file_name, dirs) = comps
            .split_last()
            .ok_or_else(|| out_err(&shown, "empty path"))?;
        let err = |e: Errno| out_err(&shown, &format!("{} ({e})", self.path.display()));
        let top = comps[0].to_owned();
        let mut parent: Option<OwnedFd> = None;
        for comp in dirs {
            let at = parent.as_ref().unwrap_or(&self.staging);
            parent = Some(open_subdir(at, comp).map_err(err)?);
        }
        let at = parent.as_ref().unwrap_or(&self.staging);
        let file = create_new_file(at, file_name).map_err(err)?;
        if !self.top_level.contains(&top) {
            self.top_level.push(top);
        }
        Ok(OutFile {
            header,
            file,
            written: 0,
            hash: Sha256::new(),
        })
    }

    /// Moves the staged entries into the directory without replacing anything; on any failure
    /// the entries already moved go back and everything is removed.
    fn commit(mut self) -> Result<PathBuf, CtlError> {
        let mut moved: Vec<&str> = Vec::new();
        for top in &self.top_level {
            let res = renameat2(
                Some(self.staging.as_raw_fd()),
                top.as_str(),
                Some(self.dir.as_raw_fd()),
                top.as_str(),
                RenameFlags::RENAME_NOREPLACE,
            );
            if let Err(e) = res {
                for back in moved.iter().rev() {
                    // Best effort: the staging directory is private, so nothing holds the name.
                    let _ = renameat2(
                        Some(self.dir.as_raw_fd()),
                        *back,
                        Some(self.staging.as_raw_fd()),
                        *back,
                        RenameFlags::RENAME_NOREPLACE,
                    );
                }
                return Err(out_dir_err(
                    &self.path,
                    &format!("cannot move {top} into place ({e}); nothing was written"),
                ));
            }
            moved.push(top);
        }
        self.committed = true;
        let _ = unlinkat(
            Some(self.dir.as_raw_fd()),
            self.staging_name.as_c_str(),
            UnlinkatFlags::RemoveDir,
        );
        Ok(std::mem::take(&mut self.path))
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Best effort: everything below the staging directory was created by this process.
        let _ = remove_tree(&self.dir, &self.staging_name, 0);
        if self.created {
            let _ = unlinkat(
                Some(self.parent.as_raw_fd()),
                self.name.as_c_str(),
                UnlinkatFlags::RemoveDir,
            );
        }
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

    /// Checks the sha256 once complete. (A failure is cleaned up with the staging directory.)
    pub(crate) fn finish(self) -> Result<OutputFileHeader, CtlError> {
        let digest: [u8; 32] = self.hash.clone().finalize().into();
        if digest != self.header.sha256 {
            return Err(self.fail("sha256 does not match the header"));
        }
        Ok(self.header)
    }

    fn fail(&self, reason: &str) -> CtlError {
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

/// Checks `--out-dir PATH` without creating anything: returns its parent, its name and, if it
/// exists, the empty directory (held open); refuses anything else.
fn inspect(path: &Path) -> Result<(OwnedFd, CString, Option<OwnedFd>), CtlError> {
    let refused = |reason: &str| out_dir_err(path, reason);
    let name = path
        .file_name()
        .ok_or_else(|| refused("name a directory (not '.', '..' or '/')"))?;
    let name = CString::new(name.as_encoded_bytes())
        .map_err(|_| refused("the name contains a NUL byte"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = open_dir(None, parent, false)
        .map_err(|e| refused(&format!("cannot open its parent directory ({e})")))?;
    match fstatat(
        Some(parent.as_raw_fd()),
        name.as_c_str(),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Err(Errno::ENOENT) => {
            faccessat(
                Some(parent.as_raw_fd()),
                ".",
                AccessFlags::W_OK | AccessFlags::X_OK,
                AtFlags::empty(),
            )
            .map_err(|e| refused(&format!("its parent directory is not writable ({e})")))?;
            Ok((parent, name, None))
        }
        Err(e) => Err(refused(&e.to_string())),
        Ok(st) => {
            check_existing(st.st_mode).map_err(refused)?;
            let dir = open_dir(Some(&parent), name.as_c_str(), true)
                .map_err(|e| refused(&format!("cannot open it ({e})")))?;
            if !is_empty(&dir).map_err(|e| refused(&e.to_string()))? {
                return Err(refused(
                    "is not empty (sandrunctl never overwrites: name a new or empty directory)",
                ));
            }
            Ok((parent, name, Some(dir)))
        }
    }
}

/// Refuses an existing out dir that is not a real directory (a symlink is refused, not followed).
fn check_existing(mode: libc::mode_t) -> Result<(), &'static str> {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => Ok(()),
        SFlag::S_IFLNK => Err("is a symlink (sandrunctl does not follow it)"),
        _ => Err("exists and is not a directory"),
    }
}

/// The default directory is made in the current one: refuse before the job runs if it cannot be.
fn check_cwd_writable() -> Result<(), CtlError> {
    let cwd = Path::new(".");
    faccessat(
        None,
        cwd,
        AccessFlags::W_OK | AccessFlags::X_OK,
        AtFlags::empty(),
    )
    .map_err(|e| {
        out_dir_err(
            cwd,
            &format!("the current directory is not writable ({e}); give --out-dir"),
        )
    })
}

/// A component `openat` resolves inside its directory only.
fn is_plain_name(c: &str) -> bool {
    !c.is_empty() && c != "." && c != ".." && !c.contains(['/', '\0'])
}

fn is_empty(dir: &OwnedFd) -> Result<bool, Errno> {
    let mut d = Dir::openat(Some(dir.as_raw_fd()), ".", dir_flags(), Mode::empty())?;
    for entry in d.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            return Ok(false);
        }
    }
    Ok(true)
}

fn open_dir<P: ?Sized + nix::NixPath>(
    at: Option<&OwnedFd>,
    path: &P,
    no_follow: bool,
) -> Result<OwnedFd, Errno> {
    let mut flags = dir_flags();
    if no_follow {
        flags |= OFlag::O_NOFOLLOW;
    }
    let fd = openat(at.map(AsRawFd::as_raw_fd), path, flags, Mode::empty())?;
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
    open_dir(Some(parent), name, true)
}

fn create_new_file(parent: &OwnedFd, name: &str) -> Result<File, Errno> {
    // O_EXCL: a new regular file or nothing; with O_CREAT it also refuses a symlink at the name.
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(
        Some(parent.as_raw_fd()),
        name,
        flags,
        Mode::from_bits_truncate(0o644),
    )?;
    Ok(File::from(owned(fd)))
}

/// Removes `name` under `parent` and everything below it, never following a symlink. The depth
/// bound is the protocol's path depth; the staging tree cannot be deeper.
fn remove_tree(parent: &OwnedFd, name: &CString, depth: usize) -> Result<(), Errno> {
    if depth > sandrun_ipc::MAX_DEPTH {
        return Err(Errno::ELOOP);
    }
    let dir = open_dir(Some(parent), name.as_c_str(), true)?;
    let mut entries = Vec::new();
    {
        let mut d = Dir::openat(Some(dir.as_raw_fd()), ".", dir_flags(), Mode::empty())?;
        for entry in d.iter() {
            let entry = entry?;
            let n = entry.file_name();
            if n.to_bytes() != b"." && n.to_bytes() != b".." {
                entries.push(n.to_owned());
            }
        }
    }
    for entry in &entries {
        match unlinkat(
            Some(dir.as_raw_fd()),
            entry.as_c_str(),
            UnlinkatFlags::NoRemoveDir,
        ) {
            Err(Errno::EISDIR) => remove_tree(&dir, entry, depth + 1)?,
            other => other?,
        }
    }
    unlinkat(
        Some(parent.as_raw_fd()),
        name.as_c_str(),
        UnlinkatFlags::RemoveDir,
    )
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

fn out_dir_err(path: &Path, reason: &str) -> CtlError {
    CtlError::OutDir {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn header(path: &str, data: &[u8]) -> OutputFileHeader {
        OutputFileHeader {
            path: BundlePath::new(path).unwrap(),
            size: data.len() as u64,
            sha256: Sha256::digest(data).into(),
        }
    }

    fn all() -> Vec<OutputPattern> {
        vec![
            OutputPattern::new("**").unwrap(),
            OutputPattern::new("*").unwrap(),
        ]
    }

    fn write(out: &mut OutDir, path: &str, data: &[u8]) -> Result<(), CtlError> {
        let mut f = out.create(header(path, data))?;
        f.write_chunk(data)?;
        assert!(f.is_complete());
        f.finish().map(drop)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn given_nested_outputs_then_they_appear_only_after_commit_with_their_content() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("out");
        let mut out = OutDir::given(&root, all()).unwrap();
        write(&mut out, "a/b/c.txt", b"xyz").unwrap();
        write(&mut out, "top.txt", b"1").unwrap();
        assert!(!root.join("a").exists(), "visible before commit");
        assert_eq!(out.commit().unwrap(), root);
        assert_eq!(fs::read(root.join("a/b/c.txt")).unwrap(), b"xyz");
        assert_eq!(names(&root), ["a", "top.txt"]);
    }

    #[test]
    fn given_existing_non_empty_dir_or_symlink_or_file_then_out_dir_is_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let full = tmp.path().join("full");
        fs::create_dir(&full).unwrap();
        fs::write(full.join("victim.txt"), b"keep").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), &link).unwrap();
        let file = tmp.path().join("file");
        fs::write(&file, b"f").unwrap();
        for p in [&full, &link, &file, Path::new("."), Path::new("/")] {
            let e = OutDir::given(p, all()).err().expect("refused");
            assert_eq!(e.code(), "out_dir_refused", "{p:?}: {e}");
        }
        assert_eq!(names(&full), ["victim.txt"]);
        assert!(!tmp.path().join("elsewhere").exists());
    }

    #[test]
    fn given_existing_empty_dir_then_it_is_used_and_left_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let out = OutDir::given(tmp.path(), all()).unwrap();
        assert_eq!(out.commit().unwrap(), tmp.path());
        assert!(tmp.path().is_dir());
        assert!(names(tmp.path()).is_empty());
    }

    #[test]
    fn given_an_error_midway_then_nothing_remains_and_the_created_dir_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("out");
        let mut out = OutDir::given(&root, all()).unwrap();
        write(&mut out, "good.txt", b"fine").unwrap();
        // A file where a directory is needed, then the same file twice.
        write(&mut out, "a", b"1").unwrap();
        assert!(write(&mut out, "a/b", b"2").is_err());
        assert!(write(&mut out, "good.txt", b"again").is_err());
        drop(out);
        assert!(!root.exists(), "{:?}", names(tmp.path()));
    }

    #[test]
    fn given_an_error_in_an_existing_empty_dir_then_it_is_left_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let mut out = OutDir::given(tmp.path(), all()).unwrap();
        write(&mut out, "d/x", b"x").unwrap();
        let mut h = header("y", b"abc");
        h.sha256 = [0; 32];
        let mut f = out.create(h).unwrap();
        f.write_chunk(b"abc").unwrap();
        assert!(f.finish().is_err());
        drop(out);
        assert!(names(tmp.path()).is_empty());
    }

    #[test]
    fn given_a_name_planted_during_the_job_then_commit_moves_nothing_and_overwrites_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("out");
        let mut out = OutDir::given(&root, all()).unwrap();
        write(&mut out, "a.txt", b"new").unwrap();
        write(&mut out, "b.txt", b"new").unwrap();
        fs::write(root.join("b.txt"), b"planted").unwrap();
        let e = out.commit().expect_err("refused");
        assert_eq!(e.code(), "out_dir_refused", "{e}");
        assert_eq!(fs::read(root.join("b.txt")).unwrap(), b"planted");
        assert_eq!(names(&root), ["b.txt"]);
    }

    #[test]
    fn given_a_path_no_pattern_selects_then_it_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let pats = vec![OutputPattern::new("*.txt").unwrap()];
        let mut out = OutDir::given(&tmp.path().join("o"), pats).unwrap();
        assert!(write(&mut out, "x.txt", b"1").is_ok());
        assert!(write(&mut out, ".ssh/authorized_keys", b"k").is_err());
    }

    #[test]
    fn given_an_out_dir_then_planning_creates_nothing_and_acceptance_creates_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("o");
        let mut plan = Outputs::plan(Some(&root), all()).unwrap();
        assert!(!root.exists(), "created before the job was accepted");
        plan.accepted(JobId(7)).unwrap();
        assert!(plan.dir().is_some());
        assert_eq!(plan.commit().unwrap(), Some(root.clone()));
        assert!(names(&root).is_empty());
        let e = Outputs::plan(Some(tmp.path()), all())
            .err()
            .expect("refused");
        assert_eq!(e.code(), "out_dir_refused", "{e}");
        assert!(matches!(
            Outputs::plan(Some(&root), vec![]),
            Ok(Outputs::NotAsked)
        ));
    }

    #[test]
    fn given_bytes_then_hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
