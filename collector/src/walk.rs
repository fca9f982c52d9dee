//! Output collection after a job has exited. Everything goes through descriptors relative to the
//! job's `/work` directory fd: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS` and `O_NOFOLLOW | O_NONBLOCK`, and `fstat` must say "regular file".
//! Symlinks, FIFOs, sockets and devices that match a pattern are reported as skipped, never
//! opened (so a FIFO cannot block the helper).
//!
//! A name is checked before any byte of its file is read: one that cannot travel as a
//! [`BundlePath`] is reported as [`SkipKind::InvalidName`] with a printable rendering, and a
//! directory too deep to descend as [`SkipKind::TooDeep`]. Every matched regular file's size
//! counts toward the byte cap whether it is returned or not (so a thousand hard links to one big
//! file count a thousand times).
//!
//! This runs in the output collector K (`sandrun-outputs`, exec'd by the helper): a process of
//! the job's uid in the job's cgroup, confined by Landlock and seccomp ([`crate::confine`]),
//! never in the helper. [`serve`] walks to the end (its own CPU time bounded by
//! [`CollectLimits::budget`]; what is not reached by then is reported once as `TooMany`), then
//! streams the results to the helper as `ipc` frames: `OutputSkipped`, `OutputFile` followed by
//! exactly `size` bytes of `OutputChunk`s, and a final `Done`. The helper checks that stream
//! again (`job::Collection`) and relays it.

use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::Duration;

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, SFlag};
use sandrun_ipc::{
    BundlePath, ErrorCode, IpcError, OutputFileHeader, OutputPattern, PrintablePath, Response,
    SkipKind, MAX_CHUNK_BYTES,
};
use sha2::{Digest, Sha256};

/// Bounds of one collection.
#[derive(Debug, Clone, Copy)]
pub struct CollectLimits {
    /// Directory entries visited at most (this also bounds the entries reported as skipped).
    pub max_visited: usize,
    /// Total bytes of matched regular files, returned or not.
    pub max_total_bytes: u64,
    /// Regular files returned at most; the rest are reported as `TooMany`.
    pub max_files: usize,
    /// The walk's own CPU time (hashing included; sending the files afterwards is not).
    pub budget: Duration,
}

/// Bytes hashed per read, and so between two checks of the budget.
const HASH_READ: usize = 64 * 1024;

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
        path: PrintablePath,
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

/// Walks `/work` (through `workdir`) to the end, or until the budget is spent. Fails, rather
/// than returning an empty walk, when `/work` itself cannot be opened: "no outputs" must mean
/// the job wrote none.
pub fn collect(
    workdir: BorrowedFd<'_>,
    patterns: &[OutputPattern],
    limits: CollectLimits,
) -> Result<Vec<Collected>, String> {
    let mut c = Collector::new(workdir, patterns.to_vec(), limits)?;
    c.run();
    Ok(c.out)
}

/// K's work: collects, then streams every result to `out`. Returns K's exit code: 0 once `Done`
/// is written, else nonzero (the helper treats the missing `Done` as the collection's failure;
/// a walk that cannot start sends an `Error` frame, which fails the job's conversation).
pub fn serve(
    workdir: OwnedFd,
    mut out: impl Write,
    patterns: &[OutputPattern],
    limits: CollectLimits,
) -> i32 {
    let items = match collect(workdir.as_fd(), patterns, limits) {
        Ok(items) => items,
        Err(why) => {
            let msg = Response::Error(IpcError::new(
                ErrorCode::SandboxSetup,
                format!("output collector: {why}"),
            ));
            let _ = send(&mut out, &msg);
            return 1;
        }
    };
    let mut buf = vec![0u8; MAX_CHUNK_BYTES];
    for item in items {
        if send_item(&mut out, workdir.as_fd(), item, &mut buf).is_err() {
            return 2;
        }
    }
    match send(&mut out, &Response::Done) {
        Ok(()) => 0,
        Err(_) => 2,
    }
}

fn send(out: &mut impl Write, msg: &Response) -> std::io::Result<()> {
    let frame = sandrun_ipc::encode(msg).map_err(std::io::Error::other)?;
    out.write_all(&frame)
}

/// Sends one result. A file is re-opened and checked again (the job is dead, so nothing can have
/// changed it; K trusts the descriptor, not its memory of the walk), announced, then sent in
/// chunks. A file that cannot be read to its announced end is an error: the stream ends there.
fn send_item(
    out: &mut impl Write,
    workdir: BorrowedFd<'_>,
    item: Collected,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let (path, size, sha256) = match item {
        Collected::Skipped { path, kind } => {
            return send(out, &Response::OutputSkipped { path, kind })
        }
        Collected::File { path, size, sha256 } => (path, size, sha256),
    };
    let reopened = CString::new(path.as_str())
        .map_err(|_| SkipKind::Unreadable)
        .and_then(|p| open_regular(workdir, &p));
    let mut file = match reopened {
        Ok((file, now)) if now == size => file,
        other => {
            let kind = other.err().unwrap_or(SkipKind::Unreadable);
            let path = PrintablePath::from(&path);
            return send(out, &Response::OutputSkipped { path, kind });
        }
    };
    send(
        out,
        &Response::OutputFile(OutputFileHeader { path, size, sha256 }),
    )?;
    let mut left = size;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(buf.len()).min(buf.len());
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        left -= n as u64;
        send(out, &Response::OutputChunk(buf[..n].to_vec()))?;
    }
    Ok(())
}

/// A directory being listed: its fd, its path relative to `/work` (raw bytes), its depth in
/// components, and the names not visited yet.
struct Frame {
    fd: OwnedFd,
    prefix: Vec<u8>,
    depth: usize,
    names: std::vec::IntoIter<CString>,
}

/// The file being hashed.
struct Hashing {
    file: std::fs::File,
    path: BundlePath,
    size: u64,
    seen: u64,
    hasher: Sha256,
}

/// An output collection in progress.
struct Collector {
    patterns: Vec<OutputPattern>,
    limits: CollectLimits,
    stack: Vec<Frame>,
    hashing: Option<Hashing>,
    visited: usize,
    total: u64,
    files: usize,
    out: Vec<Collected>,
    /// Set once a limit ended the walk early (it is reported once).
    stopped: bool,
    buf: Vec<u8>,
}

impl Collector {
    /// Starts a collection of `/work` (through `workdir`, an `O_PATH` directory fd).
    fn new(
        workdir: BorrowedFd<'_>,
        patterns: Vec<OutputPattern>,
        limits: CollectLimits,
    ) -> Result<Collector, String> {
        let mut c = Collector {
            patterns,
            limits,
            stack: Vec::new(),
            hashing: None,
            visited: 0,
            total: 0,
            files: 0,
            out: Vec::new(),
            stopped: false,
            buf: Vec::new(),
        };
        if !c.patterns.is_empty() {
            let root = open_beneath(workdir, c".", OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(|e| format!("cannot open the work directory: {e}"))?;
            c.push_dir(root, Vec::new(), 0);
        }
        Ok(c)
    }

    /// Walks to the end, or until the budget is spent.
    fn run(&mut self) {
        let start = thread_cpu_time();
        while !self.is_done() {
            if thread_cpu_time().saturating_sub(start) >= self.limits.budget {
                self.stop();
                break;
            }
            if self.hashing.is_some() {
                self.hash_some();
            } else {
                self.next_entry();
            }
        }
    }

    fn is_done(&self) -> bool {
        self.hashing.is_none() && self.stack.is_empty()
    }

    /// Ends the walk early: the file being hashed (if any) is too large for what is left, and
    /// the rest is reported once as `TooMany`.
    fn stop(&mut self) {
        if let Some(h) = self.hashing.take() {
            self.out.push(Collected::Skipped {
                path: PrintablePath::from(&h.path),
                kind: SkipKind::TooLarge,
            });
        }
        let next = self
            .stack
            .last()
            .map(|f| f.prefix.clone())
            .unwrap_or_default();
        self.stack.clear();
        if !self.stopped {
            self.stopped = true;
            let at = if next.is_empty() { b".".to_vec() } else { next };
            self.skip(&at, SkipKind::TooMany);
        }
    }

    fn skip(&mut self, rel: &[u8], kind: SkipKind) {
        self.out.push(Collected::Skipped {
            path: PrintablePath::render(rel),
            kind,
        });
    }

    fn push_dir(&mut self, fd: OwnedFd, prefix: Vec<u8>, depth: usize) {
        let Ok(names) = list_dir(&fd, self.limits.max_visited) else {
            // What it holds cannot be examined: say so rather than drop its matches silently.
            let at = if prefix.is_empty() {
                b".".to_vec()
            } else {
                prefix
            };
            return self.skip(&at, SkipKind::Unreadable);
        };
        self.stack.push(Frame {
            fd,
            prefix,
            depth,
            names: names.into_iter(),
        });
    }

    /// Visits the next directory entry of the walk (depth first, names in byte order).
    fn next_entry(&mut self) {
        let Some(frame) = self.stack.last_mut() else {
            return;
        };
        let Some(name) = frame.names.next() else {
            self.stack.pop();
            return;
        };
        let mut rel = frame.prefix.clone();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let depth = frame.depth + 1;
        let dir = frame.fd.try_clone();
        self.visited += 1;
        if self.visited > self.limits.max_visited {
            self.stack.clear();
            self.stopped = true;
            return self.skip(&rel, SkipKind::TooMany);
        }
        let Ok(dir) = dir else {
            return self.skip(&rel, SkipKind::Unreadable);
        };
        let Ok(st) = fstatat(
            Some(dir.as_raw_fd()),
            name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) else {
            // Its type is unknown: reported if its name is one an output pattern selects.
            if self.matches(&String::from_utf8_lossy(&rel)) {
                self.skip(&rel, SkipKind::Unreadable);
            }
            return;
        };
        self.entry(dir.as_fd(), &name, rel, &st, depth);
    }

    /// One entry `rel` (`depth` components) of `dir`: descend, skip with a reason, or start
    /// hashing. The name is checked, and its bytes counted, before anything is read.
    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        rel: Vec<u8>,
        st: &FileStat,
        depth: usize,
    ) {
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFDIR {
            if depth >= sandrun_ipc::MAX_DEPTH {
                // Its entries would be deeper than any output path may be.
                return self.skip(&rel, SkipKind::TooDeep);
            }
            match open_beneath(dir, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
                Ok(sub) => self.push_dir(sub, rel, depth),
                Err(_) => self.skip(&rel, SkipKind::Unreadable),
            }
            return;
        }
        // Names that cannot travel are matched by what they would be with U+FFFD.
        if !self.matches(&String::from_utf8_lossy(&rel)) {
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
            return self.skip(&rel, k);
        }
        let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
        self.total = self.total.saturating_add(size);
        let Some(path) = std::str::from_utf8(&rel)
            .ok()
            .and_then(|s| BundlePath::new(s).ok())
        else {
            return self.skip(&rel, SkipKind::InvalidName);
        };
        if self.files >= self.limits.max_files {
            return self.skip(&rel, SkipKind::TooMany);
        }
        if self.total > self.limits.max_total_bytes {
            return self.skip(&rel, SkipKind::TooLarge);
        }
        match open_regular(dir, name) {
            // The job is dead, so the file cannot change; a size other than the walk's is a bug.
            Ok((file, now)) if now == size => {
                self.hashing = Some(Hashing {
                    file,
                    path,
                    size,
                    seen: 0,
                    hasher: Sha256::new(),
                });
            }
            Ok(_) => self.skip(&rel, SkipKind::Unreadable),
            Err(k) => self.skip(&rel, k),
        }
    }

    fn matches(&self, rel: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(rel))
    }

    /// Hashes one read's worth of the current file; at its end, records it.
    fn hash_some(&mut self) {
        let Some(h) = self.hashing.as_mut() else {
            return;
        };
        self.buf.resize(HASH_READ, 0);
        match h.file.read(&mut self.buf) {
            Ok(0) => {}
            Ok(n) => {
                h.seen += n as u64;
                h.hasher.update(&self.buf[..n]);
                if h.seen <= h.size {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(_) => {}
        }
        let Some(h) = self.hashing.take() else {
            return;
        };
        if h.seen != h.size {
            self.out.push(Collected::Skipped {
                path: PrintablePath::from(&h.path),
                kind: SkipKind::Unreadable,
            });
            return;
        }
        self.files += 1;
        self.out.push(Collected::File {
            path: h.path,
            size: h.size,
            sha256: h.hasher.finalize().into(),
        });
    }
}

/// CPU time of the calling thread (the collector is single-threaded, so that is its own), which
/// does not grow while other jobs have the CPU.
fn thread_cpu_time() -> Duration {
    use nix::time::{clock_gettime, ClockId};
    // Cannot fail for this clock; if it did, the budget counts as spent.
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::MAX, Duration::from)
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

/// Names in a directory (without `.` and `..`), at most `max` (more could not be visited
/// anyway), sorted for a stable order.
fn list_dir(fd: &OwnedFd, max: usize) -> nix::Result<Vec<CString>> {
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
        if names.len() > max {
            break;
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// The helper's cap for a job's output files (`server::collect::MAX_OUTPUT_FILES`).
    const MAX_OUTPUT_FILES: usize = 1000;

    fn pats(p: &[&str]) -> Vec<OutputPattern> {
        p.iter().map(|s| OutputPattern::new(*s).unwrap()).collect()
    }

    fn limits() -> CollectLimits {
        CollectLimits {
            max_visited: 10_000,
            max_total_bytes: 1 << 20,
            max_files: MAX_OUTPUT_FILES,
            budget: Duration::from_secs(60),
        }
    }

    #[test]
    fn given_more_files_than_max_files_then_the_rest_are_skipped_as_too_many() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..1005 {
            std::fs::write(d.path().join(format!("f{i:04}")), b"x").unwrap();
        }
        let public = run(d.path(), &["*"], limits());
        assert_eq!(files(&public).len(), MAX_OUTPUT_FILES);
        assert_eq!(skipped(&public).len(), 5);
        assert!(skipped(&public)
            .iter()
            .all(|(_, k)| *k == SkipKind::TooMany));
        let build = run(
            d.path(),
            &["*"],
            CollectLimits {
                max_files: 100_000,
                ..limits()
            },
        );
        assert_eq!(files(&build).len(), 1005);
        assert!(skipped(&build).is_empty());
    }

    fn run(dir: &std::path::Path, p: &[&str], l: CollectLimits) -> Vec<Collected> {
        let fd: OwnedFd = std::fs::File::open(dir).unwrap().into();
        collect(fd.as_fd(), &pats(p), l).expect("the test directory opens")
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
            budget: Duration::ZERO,
            ..limits()
        };
        let out = run(d.path(), &["*.txt"], past);
        assert!(files(&out).is_empty());
        assert_eq!(skipped(&out), vec![(".".into(), SkipKind::TooMany)]);
    }

    #[test]
    fn given_names_that_cannot_travel_then_they_are_skipped_by_name_and_nothing_is_read() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        // Every name matches `*`; none may be returned, and each is named in `skipped`.
        for name in [
            &b"a\n1"[..],
            b"star*",
            b"q?",
            b"back\\slash",
            b"tab\tx",
            b"bad\xff",
        ] {
            let p = d.path().join(std::ffi::OsStr::from_bytes(name));
            std::fs::write(&p, b"x").unwrap();
        }
        let deep: std::path::PathBuf = (0..40).map(|_| "d").collect();
        std::fs::create_dir_all(d.path().join(&deep)).unwrap();
        std::fs::write(d.path().join(&deep).join("f"), b"x").unwrap();
        let out = run(d.path(), &["*"], limits());
        assert!(files(&out).is_empty(), "{:?}", files(&out));
        let s = skipped(&out);
        for want in [
            "a\\n1",
            "star*",
            "q?",
            "back\\\\slash",
            "tab\\tx",
            "bad\\xff",
        ] {
            assert!(
                s.contains(&(want.into(), SkipKind::InvalidName)),
                "{want}: {s:?}"
            );
        }
        let at_limit = vec!["d"; sandrun_ipc::MAX_DEPTH].join("/");
        assert!(s.contains(&(at_limit, SkipKind::TooDeep)), "{s:?}");
    }

    #[test]
    fn given_hard_links_to_one_file_then_each_counts_toward_the_cap() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a\n0"), vec![1u8; 400]).unwrap();
        std::fs::hard_link(d.path().join("a\n0"), d.path().join("a\n1")).unwrap();
        std::fs::hard_link(d.path().join("a\n0"), d.path().join("big")).unwrap();
        std::fs::write(d.path().join("small"), b"x").unwrap();
        let l = CollectLimits {
            max_total_bytes: 1000,
            ..limits()
        };
        let out = run(d.path(), &["*"], l);
        // 400 + 400 (not returned) + 400 > 1000: `big` is over the cap, and so is `small`.
        assert!(files(&out).is_empty(), "{:?}", files(&out));
        let s = skipped(&out);
        assert!(s.contains(&("big".into(), SkipKind::TooLarge)), "{s:?}");
        assert!(s.contains(&("small".into(), SkipKind::TooLarge)), "{s:?}");
    }

    #[test]
    fn given_outputs_when_served_then_the_stream_is_header_exact_chunks_skips_and_done() {
        let d = tempfile::tempdir().unwrap();
        let big = vec![5u8; MAX_CHUNK_BYTES + 10];
        std::fs::write(d.path().join("a.bin"), &big).unwrap();
        std::fs::write(d.path().join("b.bin"), b"").unwrap();
        symlink("/etc/passwd", d.path().join("c.bin")).unwrap();
        let fd: OwnedFd = std::fs::File::open(d.path()).unwrap().into();
        let mut out = Vec::new();
        assert_eq!(serve(fd, &mut out, &pats(&["*.bin"]), limits()), 0);
        let mut dec = sandrun_ipc::FrameDecoder::new();
        dec.push(&out);
        let mut msgs = Vec::new();
        while let Some(m) = dec.next_message::<Response>().unwrap() {
            msgs.push(m);
        }
        let header = |m: &Response| match m {
            Response::OutputFile(h) => Some((h.path.to_string(), h.size)),
            _ => None,
        };
        assert_eq!(header(&msgs[0]), Some(("a.bin".into(), big.len() as u64)));
        let (Response::OutputChunk(c1), Response::OutputChunk(c2)) = (&msgs[1], &msgs[2]) else {
            panic!("{msgs:?}")
        };
        assert_eq!([c1.clone(), c2.clone()].concat(), big);
        assert_eq!(header(&msgs[3]), Some(("b.bin".into(), 0)));
        assert!(
            matches!(
                &msgs[4],
                Response::OutputSkipped {
                    kind: SkipKind::Symlink,
                    ..
                }
            ),
            "{:?}",
            msgs[4]
        );
        assert_eq!(msgs[5..], [Response::Done]);
    }

    #[test]
    fn given_a_work_directory_that_cannot_be_opened_when_served_then_an_error_not_an_empty_walk() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("not-a-dir"), b"x").unwrap();
        let fd: OwnedFd = std::fs::File::open(d.path().join("not-a-dir"))
            .unwrap()
            .into();
        let mut out = Vec::new();
        assert_ne!(serve(fd, &mut out, &pats(&["*"]), limits()), 0);
        let mut dec = sandrun_ipc::FrameDecoder::new();
        dec.push(&out);
        let msg = dec.next_message::<Response>().unwrap();
        let Some(Response::Error(e)) = msg else {
            panic!("{msg:?}")
        };
        assert!(
            e.message.contains("cannot open the work directory"),
            "{}",
            e.message
        );
        assert_eq!(dec.next_message::<Response>().unwrap(), None);
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
