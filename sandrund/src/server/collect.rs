//! Output collection after a job has exited. Everything goes through descriptors relative to the
//! job's `/work` directory fd: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS` and `O_NOFOLLOW | O_NONBLOCK`, and `fstat` must say "regular file".
//! Symlinks, FIFOs, sockets and devices that match a pattern are reported as skipped, never
//! opened (so a FIFO cannot block the helper). The walk and the bytes returned are capped.

use std::ffi::{CStr, CString};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, SFlag};
use sandrun_ipc::{BundlePath, OutputPattern, SkipKind};
use sha2::{Digest, Sha256};

/// Most output files returned per job.
pub const MAX_OUTPUT_FILES: usize = 1000;

/// Bounds of one collection.
#[derive(Debug, Clone, Copy)]
pub struct CollectLimits {
    /// Directory entries visited at most.
    pub max_visited: usize,
    /// Total bytes of returned files.
    pub max_total_bytes: u64,
    /// When the walk and the hashing must stop: collection runs in the helper's only thread, so
    /// hostile patterns, deep trees or huge sparse files must not hold it for long. What is not
    /// reached by then is reported once as `TooMany`.
    pub deadline: std::time::Instant,
}

/// Bytes hashed between two deadline checks.
const HASH_SLICE: u64 = 1 << 20;

/// One result of the walk. Files are not kept open (a job may return a thousand of them): the
/// stream re-opens each with [`open_regular`] and checks it again when it is sent.
#[derive(Debug)]
pub enum Collected {
    File {
        path: BundlePath,
        size: u64,
        sha256: [u8; 32],
    },
    Skipped {
        path: BundlePath,
        kind: SkipKind,
    },
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

/// Walks `/work` (through `workdir`, an `O_PATH` directory fd) and returns the matching files and
/// the matching entries that were refused.
pub fn collect(
    workdir: BorrowedFd<'_>,
    patterns: &[OutputPattern],
    limits: CollectLimits,
) -> Vec<Collected> {
    let mut walk = Walk {
        patterns,
        limits,
        visited: 0,
        total: 0,
        files: 0,
        out: Vec::new(),
        out_of_time: false,
    };
    if patterns.is_empty() {
        return walk.out;
    }
    if let Ok(root) = open_beneath(workdir, c".", OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
        walk.dir(root, "", 0);
    }
    walk.out
}

struct Walk<'a> {
    patterns: &'a [OutputPattern],
    limits: CollectLimits,
    visited: usize,
    total: u64,
    files: usize,
    out: Vec<Collected>,
    out_of_time: bool,
}

impl Walk<'_> {
    /// Whether the time budget is spent; the first time, says so once in the results.
    fn expired(&mut self, rel: &str) -> bool {
        if self.out_of_time {
            return true;
        }
        if std::time::Instant::now() < self.limits.deadline {
            return false;
        }
        self.out_of_time = true;
        tracing::warn!("output collection ran out of time; the rest is skipped");
        self.skip(rel, SkipKind::TooMany);
        true
    }

    fn matches(&self, rel: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(rel))
    }

    fn skip(&mut self, rel: &str, kind: SkipKind) {
        if let Ok(path) = BundlePath::new(rel) {
            self.out.push(Collected::Skipped { path, kind });
        }
    }

    fn dir(&mut self, fd: OwnedFd, prefix: &str, depth: usize) {
        if depth >= sandrun_ipc::MAX_DEPTH {
            return;
        }
        let names = match list_dir(&fd) {
            Ok(n) => n,
            Err(_) => return,
        };
        for name in names {
            self.visited += 1;
            if self.visited > self.limits.max_visited {
                return;
            }
            let Ok(name_str) = name.to_str() else {
                continue;
            };
            let rel = if prefix.is_empty() {
                name_str.to_owned()
            } else {
                format!("{prefix}/{name_str}")
            };
            // A path no output may have is not worth matching.
            if rel.len() > sandrun_ipc::MAX_PATH_BYTES || self.expired(&rel) {
                continue;
            }
            let Ok(st) = fstatat(
                Some(fd.as_raw_fd()),
                name.as_c_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) else {
                continue;
            };
            self.entry(fd.as_fd(), &name, &rel, &st, depth);
        }
    }

    fn entry(&mut self, dir: BorrowedFd<'_>, name: &CStr, rel: &str, st: &FileStat, depth: usize) {
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFDIR {
            if let Ok(sub) = open_beneath(dir, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
                self.dir(sub, rel, depth + 1);
            }
            return;
        }
        if !self.matches(rel) {
            return;
        }
        let refused = match kind {
            SFlag::S_IFREG => None,
            SFlag::S_IFLNK => Some(SkipKind::Symlink),
            SFlag::S_IFIFO => Some(SkipKind::Fifo),
            SFlag::S_IFSOCK => Some(SkipKind::Socket),
            _ => Some(SkipKind::Device),
        };
        if let Some(k) = refused {
            return self.skip(rel, k);
        }
        if self.files >= MAX_OUTPUT_FILES {
            return self.skip(rel, SkipKind::TooMany);
        }
        match self.read_file(dir, name) {
            Ok((size, sha256)) => {
                if let Ok(path) = BundlePath::new(rel) {
                    self.files += 1;
                    self.total += size;
                    self.out.push(Collected::File { path, size, sha256 });
                }
            }
            Err(k) => self.skip(rel, k),
        }
    }

    /// Opens a regular file beneath `dir` without following anything, checks it again with
    /// `fstat`, and hashes it. The job is dead, so the file cannot change afterwards.
    fn read_file(&self, dir: BorrowedFd<'_>, name: &CStr) -> Result<(u64, [u8; 32]), SkipKind> {
        let (mut file, size) = open_regular(dir, name)?;
        if self.total.saturating_add(size) > self.limits.max_total_bytes {
            return Err(SkipKind::TooLarge);
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = 0u64;
        let mut next_check = HASH_SLICE;
        loop {
            let n = file.read(&mut buf).map_err(|_| SkipKind::Unreadable)?;
            if n == 0 {
                break;
            }
            seen += n as u64;
            hasher.update(&buf[..n]);
            // A huge (perhaps sparse) file must not hold the loop past the deadline.
            if seen >= next_check {
                next_check += HASH_SLICE;
                if std::time::Instant::now() >= self.limits.deadline {
                    return Err(SkipKind::TooLarge);
                }
            }
        }
        if seen != size {
            return Err(SkipKind::Unreadable);
        }
        Ok((size, hasher.finalize().into()))
    }
}

/// Opens `path` beneath `dir` without following anything and checks with `fstat` that it is a
/// regular file. Returns the file and its size.
pub fn open_regular(dir: BorrowedFd<'_>, path: &CStr) -> Result<(std::fs::File, u64), SkipKind> {
    let fd = open_beneath(dir, path, OFlag::O_RDONLY | OFlag::O_NONBLOCK).map_err(|e| {
        if e == nix::errno::Errno::ELOOP {
            SkipKind::Symlink
        } else {
            SkipKind::Unreadable
        }
    })?;
    let st = fstat(fd.as_raw_fd()).map_err(|_| SkipKind::Unreadable)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(SkipKind::Unreadable);
    }
    let size = u64::try_from(st.st_size).map_err(|_| SkipKind::Unreadable)?;
    Ok((std::fs::File::from(fd), size))
}

/// Names in a directory (without `.` and `..`), sorted for a stable order.
fn list_dir(fd: &OwnedFd) -> nix::Result<Vec<CString>> {
    let dup = fd.try_clone().map_err(|_| nix::errno::Errno::EMFILE)?;
    let mut dir = Dir::from_fd(dup.into_raw_fd())?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        names.push(name.to_owned());
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn pats(p: &[&str]) -> Vec<OutputPattern> {
        p.iter().map(|s| OutputPattern::new(*s).unwrap()).collect()
    }

    fn limits() -> CollectLimits {
        CollectLimits {
            max_visited: 10_000,
            max_total_bytes: 1 << 20,
            deadline: std::time::Instant::now() + std::time::Duration::from_secs(60),
        }
    }

    fn run(dir: &std::path::Path, p: &[&str], l: CollectLimits) -> Vec<Collected> {
        let fd: OwnedFd = std::fs::File::open(dir).unwrap().into();
        collect(fd.as_fd(), &pats(p), l)
    }

    fn files(c: &[Collected]) -> Vec<String> {
        c.iter()
            .filter_map(|c| match c {
                Collected::File { path, .. } => Some(path.to_string()),
                _ => None,
            })
            .collect()
    }

    fn skipped(c: &[Collected]) -> Vec<(String, SkipKind)> {
        c.iter()
            .filter_map(|c| match c {
                Collected::Skipped { path, kind } => Some((path.to_string(), *kind)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn given_matching_files_then_they_are_returned_with_sha256() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("res")).unwrap();
        std::fs::write(d.path().join("res/a.txt"), b"hello").unwrap();
        std::fs::write(d.path().join("b.png"), b"x").unwrap();
        std::fs::write(d.path().join("c.txt"), b"no").unwrap();
        let out = run(d.path(), &["res/", "*.png"], limits());
        assert_eq!(files(&out), vec!["b.png", "res/a.txt"]);
        let Collected::File { sha256, size, .. } = &out[1] else {
            panic!()
        };
        assert_eq!(*size, 5);
        assert_eq!(sha256.to_vec(), Sha256::digest(b"hello").to_vec());
    }

    #[test]
    fn given_symlink_and_fifo_outputs_then_they_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        symlink("/etc/passwd", d.path().join("leak.txt")).unwrap();
        symlink("/etc", d.path().join("etcdir")).unwrap();
        nix::unistd::mkfifo(
            &d.path().join("pipe.txt"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let out = run(d.path(), &["*.txt", "etcdir/", "**"], limits());
        assert!(files(&out).is_empty(), "{:?}", files(&out));
        let s = skipped(&out);
        assert!(s.contains(&("leak.txt".into(), SkipKind::Symlink)), "{s:?}");
        assert!(s.contains(&("pipe.txt".into(), SkipKind::Fifo)), "{s:?}");
        assert!(s.contains(&("etcdir".into(), SkipKind::Symlink)), "{s:?}");
    }

    #[test]
    fn given_outputs_over_the_byte_budget_then_they_are_skipped_as_too_large() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.bin"), vec![0u8; 600]).unwrap();
        std::fs::write(d.path().join("b.bin"), vec![0u8; 600]).unwrap();
        let out = run(
            d.path(),
            &["*.bin"],
            CollectLimits {
                max_visited: 100,
                max_total_bytes: 1000,
                ..limits()
            },
        );
        assert_eq!(files(&out), vec!["a.bin"]);
        assert_eq!(skipped(&out), vec![("b.bin".into(), SkipKind::TooLarge)]);
    }

    #[test]
    fn given_no_time_left_then_the_walk_stops_and_says_so_once() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..5 {
            std::fs::write(d.path().join(format!("{i}.txt")), b"x").unwrap();
        }
        let past = CollectLimits {
            deadline: std::time::Instant::now(),
            ..limits()
        };
        let out = run(d.path(), &["*.txt"], past);
        assert!(files(&out).is_empty());
        assert_eq!(skipped(&out), vec![("0.txt".into(), SkipKind::TooMany)]);
    }

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
