//! A job's `requirements`: installed offline from the operator's wheelhouse inside the job's
//! own sandbox, before its command, and reported back.
//!
//! The helper runs the job's command through [`INSTALL_PY`] (the script
//! `install_requirements.py` beside this file: `python3 -I -c INSTALL_PY REQS ARGV...`), so the install runs as the job's uid, under its seccomp filter, Landlock ruleset
//! and cgroup, into its tmpfs, with no network: `pip install --isolated --no-index --find-links
//! /wheelhouse --prefix /tmp/.sandrun-req/prefix`. pip sees the template's packages through
//! `PYTHONPATH=/env`, so a requirement the template satisfies is not installed again. A line with
//! `--hash=sha256:` turns on pip's hash-checking mode for the whole file (every requirement must
//! then pin one).
//!
//! The script reports on fd 3, the write end of a pipe the helper made for this job alone
//! (sent with `Go`; C gives it to J only, at fd 3 without close-on-exec, and keeps no copy; the
//! helper closed its own copy once sent). It writes one record there: `installed`, then `name
//! version wheel` per line (from pip's `--report`), or `failed <cause>`, then `end`, at most
//! 60000 bytes (so the write never blocks on the pipe's 64 KiB), and closes it. On failure it
//! exits 1 without running the command; on success it `execve`s the command with the install
//! directory first on `PYTHONPATH`. The job's own code therefore starts with no way to add to
//! or change the record (fd 3 is `EBADF` for it), and what it writes in `/tmp/.sandrun-req`
//! counts for nothing. No code of the job runs while fd 3 is open: the script itself runs with
//! `-I`, and pip (a `subprocess.run`, which closes fds other than 0-2) runs with a fixed
//! environment (none of the job's variables, `PYTHONPATH=/env` only with a template) and
//! `/tmp/.sandrun-req` as its working directory (so `python -m pip` cannot pick up a `pip` of
//! the job's `/work`).
//!
//! After the job, [`outcome`] reads the record from the helper's read end (non-blocking, at
//! most 64 KiB; missing, cut short or malformed: "the requirements install did not finish")
//! and hashes each named wheel **from the wheelhouse itself**, so the hashes reported and
//! signed are those of the operator's files. The helper's loop is single-threaded (it forks
//! with raw `clone`), so the hashing is cooperative: [`begin`] reads the record and opens the
//! wheels, [`Hashing::step`] hashes at most a budget (4 MiB per job per turn of the loop, see
//! `Job::requirements_hashed`), and the job is reported once every wheel is hashed; other jobs
//! are served between the steps. Hashes are cached per file identity, so only a wheel's first
//! use costs this.

#![forbid(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use sandrun_ipc::{InstalledPackage, RequirementsReport};
use sha2::{Digest, Sha256};

/// The install step, run inside the sandbox as the job's uid (see the module docs). Python, in
/// its own file so that it reads (and is syntax-checked by the tests) as the job code it is.
pub const INSTALL_PY: &str = include_str!("install_requirements.py");

/// Largest record read.
const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Largest failure message kept.
const MAX_MESSAGE_CHARS: usize = 300;
/// Most distributions one job's report may name (each a distinct wheel).
const MAX_INSTALLED: usize = 256;
/// What the helper says when the record is missing, cut short or malformed.
const NOT_FINISHED: &str = "the requirements install did not finish";

/// The job's argv, run through the install step: `python -I -c INSTALL_PY REQS ARGV...`.
pub fn wrap_argv(python: &str, requirements: &[String], argv: Vec<String>) -> Vec<String> {
    let mut text = requirements.join("\n");
    text.push('\n');
    let mut out = vec![
        python.to_owned(),
        "-I".to_owned(),
        "-c".to_owned(),
        INSTALL_PY.to_owned(),
        text,
    ];
    out.extend(argv);
    out
}

/// What the job's requirements came to: the report, and whether the install step finished and
/// handed over to the command.
#[derive(Debug)]
pub struct Outcome {
    pub report: RequirementsReport,
    /// The record is a complete `installed` one: the install succeeded and the script then
    /// `execve`d the job's command. An error in the report is then the helper's (a wheel it
    /// cannot hash, a list it refuses), not the install's: the job's reason is `internal`, not
    /// `requirements` ("the command did not run").
    pub command_ran: bool,
}

/// What the job's requirements came to (see the module docs), from the read end of the job's
/// record pipe (non-blocking; every write end is closed once the job has ended). `wheelhouse`
/// is the helper's `wheelhouse_dir`.
///
/// Hashes the wheels at once: the helper's loop uses [`begin`] and [`Hashing::step`] instead.
pub fn outcome(record: BorrowedFd<'_>, wheelhouse: &Path) -> Outcome {
    let mut hashing = begin(record, wheelhouse);
    loop {
        if let Some(done) = hashing.step(usize::MAX) {
            return done;
        }
    }
}

/// Reads the record and opens (but does not read) the wheels it names: cheap, on the loop.
/// The hashing itself is done by [`Hashing::step`], a bounded amount at a time, so that a
/// first use of large wheels never holds up the helper's other jobs.
pub fn begin(record: BorrowedFd<'_>, wheelhouse: &Path) -> Hashing {
    let outcome = match read_record(record) {
        Ok(text) => parse_record(&text, wheelhouse),
        Err(msg) => Outcome {
            report: failed(msg),
            command_ran: false,
        },
    };
    let pending = if outcome.report.error.is_none() {
        outcome
            .report
            .installed
            .iter()
            .map(|p| p.wheel.clone())
            .collect()
    } else {
        Vec::new()
    };
    Hashing {
        outcome,
        wheelhouse: wheelhouse.to_owned(),
        pending,
        next: 0,
        current: None,
    }
}

/// A report whose wheels are being hashed (see [`begin`]).
pub struct Hashing {
    outcome: Outcome,
    wheelhouse: std::path::PathBuf,
    /// The wheels of `outcome.report.installed`, in that order; `next` is the first not
    /// finished.
    pending: Vec<String>,
    next: usize,
    /// The wheel being read: its file, identity and hash so far.
    current: Option<(std::fs::File, FileKey, Sha256)>,
}

impl Hashing {
    /// Hashes at most about `budget` bytes (one read of up to 1 MiB past it at most); the
    /// outcome once every wheel is hashed, or at the first that cannot be read.
    pub fn step(&mut self, budget: usize) -> Option<Outcome> {
        let mut spent = 0usize;
        while self.next < self.pending.len() {
            if spent >= budget {
                return None;
            }
            match self.advance(budget - spent) {
                Ok(n) => spent = spent.saturating_add(n),
                Err(e) => {
                    let wheel = &self.pending[self.next];
                    return Some(Outcome {
                        report: failed(format!(
                            "wheel {wheel} of the wheelhouse cannot be read: {e}"
                        )),
                        command_ran: self.outcome.command_ran,
                    });
                }
            }
        }
        let mut done = Outcome {
            report: RequirementsReport {
                installed: std::mem::take(&mut self.outcome.report.installed),
                error: self.outcome.report.error.take(),
            },
            command_ran: self.outcome.command_ran,
        };
        done.report
            .installed
            .sort_by(|a: &InstalledPackage, b| a.name.cmp(&b.name));
        Some(done)
    }

    /// Reads up to `budget` bytes (at least one chunk) of the current wheel, opening it first,
    /// and finishes it at its end; returns the bytes read.
    fn advance(&mut self, budget: usize) -> std::io::Result<usize> {
        use std::io::Read;
        const CHUNK: usize = 1 << 20;
        let (mut file, key, mut hasher) = match self.current.take() {
            Some(c) => c,
            None => {
                let (file, key) = open_wheel(&self.wheelhouse, &self.pending[self.next])?;
                if let Some(hash) = cached(&key) {
                    self.outcome.report.installed[self.next].sha256 = hash;
                    self.next += 1;
                    return Ok(0);
                }
                (file, key, Sha256::new())
            }
        };
        let mut buf = vec![0u8; CHUNK.min(budget.max(1 << 16))];
        let mut read = 0usize;
        loop {
            let n = match file.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                let hash: [u8; 32] = hasher.finalize().into();
                remember(key, hash);
                self.outcome.report.installed[self.next].sha256 = hash;
                self.next += 1;
                return Ok(read);
            }
            hasher.update(&buf[..n]);
            read += n;
            if read >= budget {
                self.current = Some((file, key, hasher));
                return Ok(read);
            }
        }
    }
}

fn failed(msg: String) -> RequirementsReport {
    RequirementsReport {
        installed: Vec::new(),
        error: Some(msg),
    }
}

/// Everything in the pipe, up to [`MAX_RECORD_BYTES`], without blocking.
fn read_record(fd: BorrowedFd<'_>) -> Result<String, String> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) | Err(nix::errno::Errno::EAGAIN) => break,
            Ok(n) => {
                bytes.extend_from_slice(&buf[..n]);
                if bytes.len() > MAX_RECORD_BYTES {
                    return Err(format!(
                        "the install step's record is longer than {MAX_RECORD_BYTES} bytes"
                    ));
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("the install step's record cannot be read: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `installed` then `name version wheel` lines, or one `failed MESSAGE` line, then `end`.
/// Anything else (nothing written, cut short by a kill) is [`NOT_FINISHED`].
fn parse_record(text: &str, wheelhouse: &Path) -> Outcome {
    let not_run = |report| Outcome {
        report,
        command_ran: false,
    };
    let Some(body) = text.strip_suffix("end\n") else {
        return not_run(failed(NOT_FINISHED.to_owned()));
    };
    let mut lines = body.lines();
    let first = lines.next().unwrap_or("");
    if let Some(msg) = first.strip_prefix("failed ") {
        if lines.next().is_some() {
            return not_run(failed(NOT_FINISHED.to_owned()));
        }
        return not_run(failed(printable(msg)));
    }
    if first != "installed" {
        return not_run(failed(NOT_FINISHED.to_owned()));
    }
    Outcome {
        report: installed_list(lines, wheelhouse),
        command_ran: true,
    }
}

/// The `name version wheel` lines of a complete `installed` record, each wheel hashed.
fn installed_list<'a>(
    lines: impl Iterator<Item = &'a str>,
    wheelhouse: &Path,
) -> RequirementsReport {
    let mut installed: Vec<InstalledPackage> = Vec::new();
    for line in lines {
        if installed.len() == MAX_INSTALLED {
            return failed(format!("more than {MAX_INSTALLED} distributions installed"));
        }
        match installed_package(line, wheelhouse) {
            // pip installs a distribution once: one wheel named twice is not an install (and
            // would only make the helper hash it again).
            Ok(p) if installed.iter().any(|q| q.wheel == p.wheel) => {
                return failed(format!("the install step named {} twice", p.wheel))
            }
            Ok(p) => installed.push(p),
            Err(msg) => return failed(msg),
        }
    }
    RequirementsReport {
        installed,
        error: None,
    }
}

/// One `name version wheel` line (its hash still to be computed from the wheelhouse).
fn installed_package(line: &str, wheelhouse: &Path) -> Result<InstalledPackage, String> {
    let bad = || "the install step's record has a malformed line".to_owned();
    let mut words = line.split(' ');
    let (Some(name), Some(version), Some(wheel), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(bad());
    };
    let word_ok = |w: &str, extra: &str| {
        !w.is_empty()
            && w.len() <= 200
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c) || extra.contains(c))
    };
    if !word_ok(name, "") || !word_ok(version, "+!") || !word_ok(wheel, "+!") {
        return Err(bad());
    }
    if !wheel.ends_with(".whl") || wheel.starts_with('.') {
        return Err(bad());
    }
    // Opened now (cheap), so a wheel that is not there fails here; hashed by `Hashing::step`.
    open_wheel(wheelhouse, wheel)
        .map_err(|e| format!("wheel {wheel} of the wheelhouse cannot be read: {e}"))?;
    Ok(InstalledPackage {
        name: name.to_owned(),
        version: version.to_owned(),
        wheel: wheel.to_owned(),
        sha256: [0; 32],
    })
}

/// The identity of a wheelhouse file as `fstat` sees it: a file replaced or changed in any way
/// (new inode, other size, new mtime or ctime) is hashed again.
type FileKey = (u64, u64, i64, i64, i64, i64, i64);

/// Hashes of wheelhouse files already read, so that jobs installing the same wheels do not make
/// the helper's loop read them again (bounded: cleared when full).
static HASHES: std::sync::Mutex<Option<std::collections::HashMap<FileKey, [u8; 32]>>> =
    std::sync::Mutex::new(None);
const MAX_CACHED_HASHES: usize = 4096;

/// `<wheelhouse>/<wheel>` (a plain name, checked by the caller), a regular file, not through a
/// symlink, opened for reading, with its identity.
fn open_wheel(wheelhouse: &Path, wheel: &str) -> std::io::Result<(std::fs::File, FileKey)> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(wheelhouse.join(wheel))?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let key: FileKey = (
        meta.dev(),
        meta.ino(),
        i64::try_from(meta.size()).unwrap_or(i64::MAX),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    );
    Ok((file, key))
}

fn cached(key: &FileKey) -> Option<[u8; 32]> {
    HASHES
        .lock()
        .ok()
        .and_then(|m| m.as_ref().and_then(|m| m.get(key).copied()))
}

fn remember(key: FileKey, hash: [u8; 32]) {
    if let Ok(mut m) = HASHES.lock() {
        let m = m.get_or_insert_with(Default::default);
        if m.len() >= MAX_CACHED_HASHES {
            m.clear();
        }
        m.insert(key, hash);
    }
}

/// Printable ASCII only, bounded.
fn printable(s: &str) -> String {
    let s: String = s
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if s.is_empty() {
        "the requirements install failed".to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};

    #[test]
    fn given_the_install_script_then_python3_compiles_it() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        // Debian 12, where the tests and CI run, has python3: a missing one is a failure here,
        // never a skip. `compile` is py_compile's check, without writing a `__pycache__`.
        let mut child = Command::new("python3")
            .args(["-I", "-c"])
            .arg("import sys; compile(sys.stdin.read(), 'install_requirements.py', 'exec')")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 must be installed to check install_requirements.py");
        let mut stdin = child.stdin.take().expect("stdin piped");
        stdin
            .write_all(INSTALL_PY.as_bytes())
            .expect("write the script");
        drop(stdin);
        let out = child.wait_with_output().expect("wait for python3");
        assert!(
            out.status.success(),
            "install_requirements.py does not compile: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The read end of a pipe holding `record`, its write end closed (as after the job).
    fn record(text: &str) -> OwnedFd {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        nix::unistd::write(&w, text.as_bytes()).expect("write");
        drop(w);
        nix::fcntl::fcntl(
            r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .expect("O_NONBLOCK");
        r
    }

    #[test]
    fn given_an_installed_record_then_wheels_are_hashed_from_the_wheelhouse_and_sorted() {
        let wh = tempfile::tempdir().expect("wheelhouse");
        std::fs::write(wh.path().join("b-2.0-py3-none-any.whl"), b"bee").expect("write");
        std::fs::write(wh.path().join("a-1.0-py3-none-any.whl"), b"ay").expect("write");
        let fd =
            record("installed\nb 2.0 b-2.0-py3-none-any.whl\na 1.0 a-1.0-py3-none-any.whl\nend\n");
        let got = outcome(fd.as_fd(), wh.path());
        assert!(got.command_ran);
        let r = got.report;
        assert_eq!(r.error, None);
        let names: Vec<&str> = r.installed.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            r.installed[1].sha256,
            <[u8; 32]>::from(Sha256::digest(b"bee"))
        );
        let r = outcome(record("installed\nend\n").as_fd(), wh.path()).report;
        assert_eq!((r.error, r.installed.len()), (None, 0));
    }

    #[test]
    fn given_a_large_wheel_then_each_step_hashes_at_most_its_budget_and_the_hash_is_the_whole_files(
    ) {
        let wh = tempfile::tempdir().expect("wheelhouse");
        // 5 MiB + 3 bytes, distinct contents (not in the cache from another test).
        let big: Vec<u8> = (0..(5 << 20) + 3u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
            .collect();
        std::fs::write(wh.path().join("big-1-py3-none-any.whl"), &big).expect("write");
        std::fs::write(wh.path().join("a-1-py3-none-any.whl"), b"small").expect("write");
        let fd = record("installed\nbig 1 big-1-py3-none-any.whl\na 1 a-1-py3-none-any.whl\nend\n");
        let mut hashing = begin(fd.as_fd(), wh.path());
        let mut steps = 0;
        let done = loop {
            steps += 1;
            assert!(steps < 100, "no end");
            if let Some(done) = hashing.step(1 << 20) {
                break done;
            }
        };
        // 1 MiB a step: at least five steps before the end, never all at once.
        assert!(steps >= 5, "{steps} steps");
        assert!(done.command_ran);
        assert_eq!(done.report.error, None);
        let names: Vec<&str> = done
            .report
            .installed
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["a", "big"]);
        assert_eq!(
            done.report.installed[1].sha256,
            <[u8; 32]>::from(Sha256::digest(&big))
        );
        assert_eq!(
            done.report.installed[0].sha256,
            <[u8; 32]>::from(Sha256::digest(b"small"))
        );
        // Hashed once: the next job's report comes from the cache in one step.
        let fd = record("installed\nbig 1 big-1-py3-none-any.whl\nend\n");
        let again = begin(fd.as_fd(), wh.path()).step(1).expect("cached");
        assert_eq!(
            again.report.installed[0].sha256,
            done.report.installed[1].sha256
        );
        // A wheel removed after the record was read: an error naming it, the command ran.
        let fd = record("installed\na 1 a-1-py3-none-any.whl\nend\n");
        let mut hashing = begin(fd.as_fd(), wh.path());
        std::fs::remove_file(wh.path().join("a-1-py3-none-any.whl")).expect("rm");
        let gone = hashing.step(usize::MAX).expect("done");
        assert!(gone.command_ran);
        assert!(gone
            .report
            .error
            .is_some_and(|e| e.contains("a-1-py3-none-any.whl")));
    }

    #[test]
    fn given_a_failure_record_or_none_or_a_bad_one_then_the_report_says_so() {
        let wh = tempfile::tempdir().expect("wheelhouse");
        std::fs::write(wh.path().join("a-1-py3-none-any.whl"), b"a").expect("write");
        // (record, error, whether the command ran: only after a complete `installed` record)
        for (text, want, ran) in [
            ("", NOT_FINISHED, false),
            // Cut short (the install step was killed while writing it).
            ("installed\na 1 a-1-py3-none-any.whl\n", NOT_FINISHED, false),
            ("something\nend\n", NOT_FINISHED, false),
            ("failed x\ninstalled\nend\n", NOT_FINISHED, false),
            (
                "installed\na 1 a-1-py3-none-any.whl\na 1 a-1-py3-none-any.whl\nend\n",
                "the install step named a-1-py3-none-any.whl twice",
                true,
            ),
            (
                "installed\nx 1 ../../etc/passwd.whl\nend\n",
                "the install step's record has a malformed line",
                true,
            ),
            (
                "installed\nx 1\nend\n",
                "the install step's record has a malformed line",
                true,
            ),
            (
                "failed the wheelhouse has no distribution for zz\x1b\nend\n",
                "the wheelhouse has no distribution for zz",
                false,
            ),
        ] {
            let got = outcome(record(text).as_fd(), wh.path());
            assert_eq!(got.report.error.as_deref(), Some(want), "{text:?}");
            assert_eq!(got.command_ran, ran, "{text:?}");
            assert!(got.report.installed.is_empty());
        }
        // The install succeeded (the command ran) but a wheel cannot be re-read: an error, and
        // the command did run.
        let got = outcome(
            record("installed\nx 1 missing-1-py3-none-any.whl\nend\n").as_fd(),
            wh.path(),
        );
        assert!(got.command_ran);
        assert!(got
            .report
            .error
            .is_some_and(|e| e.contains("missing-1-py3-none-any.whl")));
    }

    #[test]
    fn given_an_oversized_record_or_an_open_writer_then_the_read_never_blocks_nor_grows() {
        let wh = Path::new("/nonexistent");
        // A writer still open and nothing written: EAGAIN, not a hang.
        let (r, _w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).expect("pipe");
        let got = outcome(r.as_fd(), wh).report;
        assert_eq!(got.error.as_deref(), Some(NOT_FINISHED));
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).expect("pipe");
        nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 17))
            .expect("F_SETPIPE_SZ");
        let big = vec![b'x'; MAX_RECORD_BYTES + 1];
        assert_eq!(nix::unistd::write(&w, &big).expect("write"), big.len());
        let got = outcome(r.as_fd(), wh);
        assert!(!got.command_ran);
        assert!(got.report.error.is_some_and(|e| e.contains("longer than")));
    }
}
