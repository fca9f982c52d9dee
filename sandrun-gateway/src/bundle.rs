//! The normalized upload: validated relative paths, regular files and directories only, with the
//! entry count and total size capped while it is built.
//!
//! Every way of uploading (plain files, tar.gz, zip, the legacy format) ends up as calls to
//! [`BundleBuilder::add_file`] and [`BundleBuilder::add_dir`], so the duplicate, conflict and cap
//! checks live in one place. The helper receives [`Bundle::entries`] followed by the file bytes in
//! the same order.

use std::collections::BTreeMap;

use bytes::Bytes;
use sandrun_ipc::{sanitize_mode, BundleEntry, BundlePath};

use crate::budget::{BudgetFull, SharedReservation};

/// Mode of a plain uploaded file (no mode travels with a multipart part).
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Mode of a directory implied by a file path, or listed without a mode.
pub const DEFAULT_DIR_MODE: u32 = 0o755;

/// One input file of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    pub path: BundlePath,
    /// Permission bits only (see [`normalize_file_mode`]).
    pub mode: u32,
    pub data: Bytes,
}

/// A validated, normalized upload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bundle {
    /// Sorted by path.
    files: Vec<InputFile>,
    /// Explicit and implied directories, sorted by path (so parents come before children).
    dirs: Vec<(BundlePath, u32)>,
}

impl Bundle {
    /// The files, sorted by path.
    pub fn files(&self) -> &[InputFile] {
        &self.files
    }

    /// The file at `path`, if the upload has one.
    pub fn file(&self, path: &str) -> Option<&InputFile> {
        self.files
            .binary_search_by(|f| f.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.files[i])
    }

    /// The entries to send to the helper: directories first (parents before children), then files
    /// in the order of [`Bundle::files`], which is also the order of their bytes on the wire.
    pub fn entries(&self) -> Vec<BundleEntry> {
        let dirs = self.dirs.iter().map(|(path, mode)| BundleEntry::Dir {
            path: path.clone(),
            mode: *mode,
        });
        let files = self.files.iter().map(|f| BundleEntry::File {
            path: f.path.clone(),
            mode: f.mode,
            size: f.data.len() as u64,
        });
        dirs.chain(files).collect()
    }

    /// Sum of the file sizes in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.data.len() as u64).sum()
    }
}

/// Why an entry could not be added to the bundle. Each variant names the path concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BundleError {
    /// The same file path appears twice.
    Duplicate(BundlePath),
    /// A path is needed as a directory (it has children) but is a file.
    FileWhereDirExpected(BundlePath),
    /// A file is added where a directory already exists.
    DirWhereFileExpected(BundlePath),
    /// More files and directories than allowed; names the entry that crossed the cap.
    TooManyEntries { limit: usize, path: BundlePath },
    /// The files add up to more bytes than allowed; names the entry that crossed the cap.
    TooLarge { limit: u64, path: BundlePath },
    /// The gateway's memory budget or the client's share of it cannot hold more.
    Memory(BudgetFull),
}

impl std::fmt::Display for BundleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BundleError::Duplicate(p) => write!(f, "entry {p:?}: duplicate path"),
            BundleError::FileWhereDirExpected(p) => {
                write!(
                    f,
                    "entry {p:?}: is a file but other entries need it as a directory"
                )
            }
            BundleError::DirWhereFileExpected(p) => {
                write!(f, "entry {p:?}: is a directory, it cannot also be a file")
            }
            BundleError::TooManyEntries { limit, path } => {
                write!(
                    f,
                    "entry {path:?}: the upload has more than {limit} entries"
                )
            }
            BundleError::TooLarge { limit, path } => {
                write!(
                    f,
                    "entry {path:?}: the upload's files exceed {limit} bytes in total"
                )
            }
            BundleError::Memory(BudgetFull::Global) => {
                write!(f, "the gateway's memory budget is full")
            }
            BundleError::Memory(BudgetFull::ClientShare) => {
                write!(f, "this client holds its share of the gateway's memory")
            }
            BundleError::Memory(BudgetFull::LargerThanShare) => write!(
                f,
                "the upload expands to more than one client's share of the gateway's memory"
            ),
        }
    }
}

impl std::error::Error for BundleError {}

/// Caps applied while building.
#[derive(Debug, Clone, Copy)]
pub struct BundleCaps {
    /// Files plus directories (explicit or implied).
    pub max_entries: usize,
    /// Sum of file sizes.
    pub max_bytes: u64,
}

/// Builds a [`Bundle`], checking duplicates, file/directory conflicts and caps at every step.
#[derive(Debug)]
pub struct BundleBuilder {
    caps: BundleCaps,
    files: BTreeMap<BundlePath, (u32, Bytes)>,
    dirs: BTreeMap<BundlePath, u32>,
    total: u64,
    /// Where file bytes are charged before they are held; `None` charges nothing (tests).
    charge: Option<SharedReservation>,
    /// Bytes charged ahead ([`BundleBuilder::charge`]) for the next file(s) added.
    precharged: u64,
}

impl BundleBuilder {
    pub fn new(caps: BundleCaps) -> Self {
        BundleBuilder {
            caps,
            files: BTreeMap::new(),
            dirs: BTreeMap::new(),
            total: 0,
            charge: None,
            precharged: 0,
        }
    }

    /// A builder whose files are charged to `charge` before they are held.
    pub fn with_charge(caps: BundleCaps, charge: SharedReservation) -> Self {
        BundleBuilder {
            charge: Some(charge),
            ..BundleBuilder::new(caps)
        }
    }

    /// Charges `bytes` before they are read (a file about to be expanded); the next
    /// [`BundleBuilder::add_file`] calls use this charge instead of charging again.
    pub fn charge(&mut self, bytes: u64) -> Result<(), BundleError> {
        if let Some(charge) = &self.charge {
            charge.try_grow(bytes).map_err(BundleError::Memory)?;
        }
        self.precharged += bytes;
        Ok(())
    }

    /// Counts `bytes` someone else already charged to this upload (a part read whole becoming
    /// one file) as charged ahead for the next file.
    pub fn already_charged(&mut self, bytes: u64) {
        self.precharged += bytes;
    }

    /// Releases `bytes` charged to the upload for something no longer held (an archive's
    /// compressed bytes once it is expanded).
    pub fn release(&self, bytes: u64) {
        if let Some(charge) = &self.charge {
            charge.shrink(bytes);
        }
    }

    /// Bytes still allowed before [`BundleError::TooLarge`].
    pub fn remaining_bytes(&self) -> u64 {
        self.caps.max_bytes.saturating_sub(self.total)
    }

    /// Entries still allowed before [`BundleError::TooManyEntries`].
    pub fn remaining_entries(&self) -> usize {
        self.caps.max_entries.saturating_sub(self.entry_count())
    }

    /// Whether a file exists at `path`.
    pub fn has_file(&self, path: &str) -> bool {
        BundlePath::new(path).is_ok_and(|p| self.files.contains_key(&p))
    }

    /// The bytes of the file at `path`, if any.
    pub fn file_data(&self, path: &str) -> Option<&Bytes> {
        let p = BundlePath::new(path).ok()?;
        self.files.get(&p).map(|(_, data)| data)
    }

    /// Adds a regular file. `mode` is normalized with [`normalize_file_mode`].
    pub fn add_file(
        &mut self,
        path: BundlePath,
        mode: u32,
        data: Bytes,
    ) -> Result<(), BundleError> {
        if self.files.contains_key(&path) {
            return Err(BundleError::Duplicate(path));
        }
        if self.dirs.contains_key(&path) {
            return Err(BundleError::DirWhereFileExpected(path));
        }
        let size = data.len() as u64;
        if size > self.remaining_bytes() {
            return Err(BundleError::TooLarge {
                limit: self.caps.max_bytes,
                path,
            });
        }
        self.add_parents(&path)?;
        self.check_entry_cap(&path)?;
        let ahead = size.min(self.precharged);
        self.charge(size - ahead)?;
        self.precharged -= size;
        self.total += size;
        self.files.insert(path, (normalize_file_mode(mode), data));
        Ok(())
    }

    /// Adds a directory. Listing a directory again (or after a file implied it) only sets its mode.
    pub fn add_dir(&mut self, path: BundlePath, mode: u32) -> Result<(), BundleError> {
        if self.files.contains_key(&path) {
            return Err(BundleError::FileWhereDirExpected(path));
        }
        self.add_parents(&path)?;
        if !self.dirs.contains_key(&path) {
            self.check_entry_cap(&path)?;
        }
        self.dirs.insert(path, normalize_dir_mode(mode));
        Ok(())
    }

    /// When the root holds exactly one directory and nothing else (`tar czf x.tgz project/`, a
    /// browser's folder upload), makes that directory the root: `project/main.py` becomes
    /// `main.py`. Returns the directory lifted, if any. Sizes and charges are unchanged; the
    /// entry count drops by one.
    pub fn lift_single_root_dir(&mut self) -> Option<BundlePath> {
        if self.files.keys().any(|p| p.parent().is_none()) {
            return None;
        }
        let mut roots = self.dirs.keys().filter(|p| p.parent().is_none());
        let root = roots.next()?.clone();
        if roots.next().is_some() {
            return None;
        }
        let below = |p: &BundlePath| -> Option<BundlePath> {
            let rest = p.as_str().strip_prefix(root.as_str())?.strip_prefix('/')?;
            BundlePath::new(rest).ok()
        };
        // Every path below a valid path is itself valid; a path that somehow is not is kept out
        // of the lift by leaving the bundle as it was.
        let files: Option<BTreeMap<_, _>> = self
            .files
            .iter()
            .map(|(p, v)| Some((below(p)?, v.clone())))
            .collect();
        let dirs: Option<BTreeMap<_, _>> = self
            .dirs
            .iter()
            .filter(|(p, _)| **p != root)
            .map(|(p, m)| Some((below(p)?, *m)))
            .collect();
        let (files, dirs) = (files?, dirs?);
        self.files = files;
        self.dirs = dirs;
        Some(root)
    }

    /// Finishes the bundle.
    pub fn build(self) -> Bundle {
        let files = self
            .files
            .into_iter()
            .map(|(path, (mode, data))| InputFile { path, mode, data })
            .collect();
        Bundle {
            files,
            dirs: self.dirs.into_iter().collect(),
        }
    }

    fn entry_count(&self) -> usize {
        self.files.len() + self.dirs.len()
    }

    fn check_entry_cap(&self, path: &BundlePath) -> Result<(), BundleError> {
        if self.entry_count() >= self.caps.max_entries {
            return Err(BundleError::TooManyEntries {
                limit: self.caps.max_entries,
                path: path.clone(),
            });
        }
        Ok(())
    }

    /// Makes every ancestor of `path` a directory, refusing if one of them is a file.
    fn add_parents(&mut self, path: &BundlePath) -> Result<(), BundleError> {
        let mut parent = path.parent();
        while let Some(dir) = parent {
            if self.files.contains_key(&dir) {
                return Err(BundleError::FileWhereDirExpected(dir));
            }
            if self.dirs.contains_key(&dir) {
                // Its own ancestors were added with it.
                return Ok(());
            }
            self.check_entry_cap(&dir)?;
            parent = dir.parent();
            self.dirs.insert(dir, DEFAULT_DIR_MODE);
        }
        Ok(())
    }
}

/// Permission bits only (setuid, setgid and sticky are stripped); the owner can always read and
/// write, so the sandbox can write the file and the job can read it.
pub fn normalize_file_mode(mode: u32) -> u32 {
    sanitize_mode(mode) | 0o600
}

/// Permission bits only; the owner can always list, enter and create entries.
pub fn normalize_dir_mode(mode: u32) -> u32 {
    sanitize_mode(mode) | 0o700
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lift(files: &[&str], dirs: &[&str]) -> (Option<String>, Vec<String>) {
        let mut b = BundleBuilder::new(caps());
        for d in dirs {
            b.add_dir(BundlePath::new(*d).unwrap(), 0o755).unwrap();
        }
        for f in files {
            b.add_file(
                BundlePath::new(*f).unwrap(),
                0o644,
                Bytes::from_static(b"x"),
            )
            .unwrap();
        }
        let lifted = b.lift_single_root_dir().map(|p| p.as_str().to_owned());
        let bundle = b.build();
        let mut paths: Vec<String> = bundle
            .files()
            .iter()
            .map(|f| f.path.as_str().to_owned())
            .collect();
        paths.extend(bundle.dirs.iter().map(|(p, _)| p.as_str().to_owned()));
        paths.sort();
        (lifted, paths)
    }

    #[test]
    fn given_one_top_level_directory_then_it_becomes_the_root() {
        let (lifted, paths) = lift(&["p/job.json", "p/main.py", "p/src/a.py"], &[]);
        assert_eq!(lifted.as_deref(), Some("p"));
        assert_eq!(paths, ["job.json", "main.py", "src", "src/a.py"]);
    }

    #[test]
    fn given_a_root_file_or_two_directories_then_nothing_is_lifted() {
        assert_eq!(lift(&["p/main.py", "x"], &[]).0, None);
        assert_eq!(lift(&["p/main.py", "q/main.py"], &[]).0, None);
        assert_eq!(lift(&["main.py"], &[]).0, None);
        assert_eq!(lift(&[], &[]).0, None);
    }

    fn caps() -> BundleCaps {
        BundleCaps {
            max_entries: 100,
            max_bytes: 1000,
        }
    }

    fn p(s: &str) -> BundlePath {
        BundlePath::new(s).unwrap()
    }

    #[test]
    fn given_nested_files_then_entries_list_parent_dirs_first_then_sorted_files() {
        let mut b = BundleBuilder::new(caps());
        b.add_file(p("src/pkg/b.py"), 0o644, Bytes::from_static(b"b"))
            .unwrap();
        b.add_file(p("main.py"), 0o755, Bytes::from_static(b"m"))
            .unwrap();
        b.add_file(p("src/a.py"), 0o644, Bytes::from_static(b"a"))
            .unwrap();
        let bundle = b.build();
        let names: Vec<String> = bundle
            .entries()
            .iter()
            .map(|e| match e {
                BundleEntry::Dir { path, .. } => format!("d:{path}"),
                BundleEntry::File { path, .. } => format!("f:{path}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "d:src",
                "d:src/pkg",
                "f:main.py",
                "f:src/a.py",
                "f:src/pkg/b.py"
            ]
        );
        assert_eq!(bundle.total_bytes(), 3);
        assert_eq!(bundle.file("src/a.py").unwrap().data.as_ref(), b"a");
    }

    #[test]
    fn given_a_duplicate_path_then_it_is_refused_naming_it() {
        let mut b = BundleBuilder::new(caps());
        b.add_file(p("a.txt"), 0o644, Bytes::new()).unwrap();
        let err = b.add_file(p("a.txt"), 0o644, Bytes::new()).unwrap_err();
        assert_eq!(err, BundleError::Duplicate(p("a.txt")));
        assert!(err.to_string().contains("a.txt"));
    }

    #[test]
    fn given_a_file_where_a_dir_is_expected_then_it_is_refused() {
        let mut b = BundleBuilder::new(caps());
        b.add_file(p("a"), 0o644, Bytes::new()).unwrap();
        assert_eq!(
            b.add_file(p("a/b"), 0o644, Bytes::new()),
            Err(BundleError::FileWhereDirExpected(p("a")))
        );
        assert_eq!(
            b.add_dir(p("a"), 0o755),
            Err(BundleError::FileWhereDirExpected(p("a")))
        );
        b.add_file(p("d/x"), 0o644, Bytes::new()).unwrap();
        assert_eq!(
            b.add_file(p("d"), 0o644, Bytes::new()),
            Err(BundleError::DirWhereFileExpected(p("d")))
        );
    }

    #[test]
    fn given_special_mode_bits_then_they_are_stripped_and_owner_access_kept() {
        let mut b = BundleBuilder::new(caps());
        b.add_file(p("suid"), 0o4755, Bytes::new()).unwrap();
        b.add_file(p("none"), 0o000, Bytes::new()).unwrap();
        b.add_dir(p("sticky"), 0o1777).unwrap();
        let bundle = b.build();
        assert_eq!(bundle.file("suid").unwrap().mode, 0o755);
        assert_eq!(bundle.file("none").unwrap().mode, 0o600);
        assert!(bundle.entries().contains(&BundleEntry::Dir {
            path: p("sticky"),
            mode: 0o777
        }));
    }

    #[test]
    fn given_more_entries_than_the_cap_then_the_entry_crossing_it_is_named() {
        let mut b = BundleBuilder::new(BundleCaps {
            max_entries: 3,
            max_bytes: 1000,
        });
        b.add_file(p("d/a"), 0o644, Bytes::new()).unwrap();
        b.add_file(p("d/b"), 0o644, Bytes::new()).unwrap();
        let err = b.add_file(p("d/c"), 0o644, Bytes::new()).unwrap_err();
        assert_eq!(
            err,
            BundleError::TooManyEntries {
                limit: 3,
                path: p("d/c")
            }
        );
    }

    #[test]
    fn given_files_over_the_byte_cap_then_the_entry_crossing_it_is_named() {
        let mut b = BundleBuilder::new(BundleCaps {
            max_entries: 10,
            max_bytes: 10,
        });
        b.add_file(p("a"), 0o644, Bytes::from(vec![0; 6])).unwrap();
        assert_eq!(b.remaining_bytes(), 4);
        let err = b
            .add_file(p("b"), 0o644, Bytes::from(vec![0; 5]))
            .unwrap_err();
        assert_eq!(
            err,
            BundleError::TooLarge {
                limit: 10,
                path: p("b")
            }
        );
    }
}
