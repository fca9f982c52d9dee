//! A job's `requirements`: installed offline from the operator's wheelhouse inside the job's
//! own sandbox, before its command, and reported back.
//!
//! The helper runs the job's command through [`INSTALL_PY`] (`python3 -I -c INSTALL_PY REQS
//! ARGV...`), so the install runs as the job's uid, under its seccomp filter, Landlock ruleset
//! and cgroup, into its tmpfs, with no network: `pip install --isolated --no-index --find-links
//! /wheelhouse --prefix /tmp/.sandrun-req/prefix`. pip sees the template's packages through
//! `PYTHONPATH=/env`, so a requirement the template satisfies is not installed again. A line with
//! `--hash=sha256:` turns on pip's hash-checking mode for the whole file (every requirement must
//! then pin one). On failure the script writes `/tmp/.sandrun-req/failed` (one line naming the
//! cause) and exits 1 without running the command; on success it writes
//! `/tmp/.sandrun-req/installed` (`name version wheel` per line, from pip's `--report`) and
//! `execve`s the command with the install directory first on `PYTHONPATH`.
//!
//! After the job, [`outcome`] reads those two files from the job's tmpfs (through the `/work`
//! fd, `openat2` without following any link or leaving the tmpfs) and hashes each named wheel
//! **from the wheelhouse itself**, so the hashes reported and signed are those of the
//! operator's files, never numbers the job wrote. The job's own code runs after the install as
//! the same uid and could rewrite the file listing what was installed; it can only name wheels
//! of the wheelhouse that way, and its code is covered by the signed job hash.

use std::ffi::CStr;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::{fstat, SFlag};
use sandrun_ipc::{InstalledPackage, RequirementsReport};
use sha2::{Digest, Sha256};

/// The install step, run inside the sandbox as the job's uid (see the module docs).
pub const INSTALL_PY: &str = r#"import json, os, re, subprocess, sys, urllib.parse
reqs, argv = sys.argv[1], sys.argv[2:]
base = "/tmp/.sandrun-req"
def put(name, text):
    with open(os.path.join(base, name), "w") as f:
        f.write(text)
def fail(msg):
    sys.stderr.write("sandrun: requirements: " + msg + "\n")
    try:
        put("failed", msg[:400] + "\n")
    except OSError:
        pass
    sys.exit(1)
def nospace(text):
    return any(s in text for s in ("No space left on device", "[Errno 28]", "[Errno 27]",
                                   "File too large", "Disk quota exceeded"))
try:
    os.mkdir(base, 0o700)
    put("requirements.txt", reqs)
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--no-index",
           "--find-links", "/wheelhouse", "--prefix", base + "/prefix", "--no-cache-dir",
           "--disable-pip-version-check", "--no-compile", "--no-warn-script-location",
           "--no-input", "--progress-bar", "off", "--report", base + "/report.json",
           "-r", base + "/requirements.txt"]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
except OSError as e:
    if e.errno in (27, 28):
        fail("the job's tmpfs is full (raise limits.tmpfs_mb)")
    fail("could not run pip: " + str(e.strerror))
out = p.stdout.decode("utf-8", "replace")
sys.stderr.write(out)
sys.stderr.flush()
if p.returncode != 0:
    m = re.search(r"No matching distribution found for (\S+)", out)
    h = re.search(r"^\s+(\S+) from file:", out, re.M)
    if nospace(out):
        fail("the job's tmpfs is full (raise limits.tmpfs_mb)")
    if m:
        fail("the wheelhouse has no distribution for " + m.group(1))
    if "DO NOT MATCH THE HASHES" in out:
        fail("a wheel does not match its pinned hash: " + (h.group(1) if h else "see the log"))
    if "Hashes are required" in out:
        fail("when one requirement pins a --hash, every one must (pip's hash-checking mode)")
    if p.returncode < 0:
        fail("pip was killed by signal " + str(-p.returncode))
    fail("pip install failed with exit code " + str(p.returncode) + " (see the job's stderr)")
try:
    with open(base + "/report.json") as f:
        report = json.load(f)
    lines = []
    for item in report.get("install", []):
        md, url = item["metadata"], item["download_info"]["url"]
        if not url.startswith("file:///wheelhouse/"):
            fail(md["name"] + " did not come from the wheelhouse")
        wheel = urllib.parse.unquote(url[len("file:///wheelhouse/"):])
        lines.append(md["name"] + " " + md["version"] + " " + wheel + "\n")
    put("installed", "".join(lines))
except OSError as e:
    if e.errno in (27, 28):
        fail("the job's tmpfs is full (raise limits.tmpfs_mb)")
    fail("could not read pip's report: " + str(e.strerror))
site = None
for root, dirs, _ in os.walk(base + "/prefix"):
    for d in ("site-packages", "dist-packages"):
        if d in dirs:
            site = site or os.path.join(root, d)
env = dict(os.environ)
if site:
    env["PYTHONPATH"] = site + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
try:
    os.execve(argv[0], argv, env)
except OSError as e:
    sys.stderr.write("sandrun: cannot execute " + argv[0] + ": " + str(e.strerror) + "\n")
    sys.exit(127)
"#;

/// The directory of the two result files, relative to the job's `/work`.
const RESULT_DIR: &str = "../tmp/.sandrun-req";
/// Largest result file read.
const MAX_RESULT_BYTES: u64 = 64 * 1024;
/// Largest failure message kept.
const MAX_MESSAGE_CHARS: usize = 300;
/// Most distributions one job's report may name (each a distinct wheel).
const MAX_INSTALLED: usize = 256;

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

/// What the job's requirements came to (see the module docs). `workdir` is the job's `/work`
/// fd; `wheelhouse` the helper's `wheelhouse_dir`.
pub fn outcome(workdir: Option<BorrowedFd<'_>>, wheelhouse: &Path) -> RequirementsReport {
    let failed = |msg: String| RequirementsReport {
        installed: Vec::new(),
        error: Some(msg),
    };
    let Some(workdir) = workdir else {
        return failed("the job's tmpfs was gone before the install was checked".to_owned());
    };
    if let Some(text) = read_result(workdir, c"../tmp/.sandrun-req/failed") {
        return failed(printable(text.lines().next().unwrap_or("")));
    }
    let Some(text) = read_result(workdir, c"../tmp/.sandrun-req/installed") else {
        return failed("the requirements install did not finish".to_owned());
    };
    let mut installed: Vec<InstalledPackage> = Vec::new();
    for line in text.lines() {
        if installed.len() == MAX_INSTALLED {
            return failed(format!("more than {MAX_INSTALLED} distributions installed"));
        }
        match installed_package(line, wheelhouse) {
            // The job wrote this list: one wheel named twice is a lie, not an install (and
            // would only make the helper hash it again).
            Ok(p) if installed.iter().any(|q| q.wheel == p.wheel) => {
                return failed(format!("{RESULT_DIR}/installed names {} twice", p.wheel))
            }
            Ok(p) => installed.push(p),
            Err(msg) => return failed(msg),
        }
    }
    installed.sort_by(|a: &InstalledPackage, b| a.name.cmp(&b.name));
    RequirementsReport {
        installed,
        error: None,
    }
}

/// One `name version wheel` line, with the wheel hashed from the wheelhouse.
fn installed_package(line: &str, wheelhouse: &Path) -> Result<InstalledPackage, String> {
    let bad = || format!("{RESULT_DIR}/installed has a malformed line");
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
    let sha256 = hash_wheel(wheelhouse, wheel)
        .map_err(|e| format!("wheel {wheel} of the wheelhouse cannot be read: {e}"))?;
    Ok(InstalledPackage {
        name: name.to_owned(),
        version: version.to_owned(),
        wheel: wheel.to_owned(),
        sha256,
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

/// SHA-256 of `<wheelhouse>/<wheel>` (a plain name, checked by the caller), a regular file,
/// not through a symlink.
fn hash_wheel(wheelhouse: &Path, wheel: &str) -> std::io::Result<[u8; 32]> {
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
    let cached = HASHES
        .lock()
        .ok()
        .and_then(|m| m.as_ref().and_then(|m| m.get(&key).copied()));
    if let Some(hash) = cached {
        return Ok(hash);
    }
    let mut hasher = Sha256::new();
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    std::io::copy(&mut reader, &mut hasher)?;
    let hash: [u8; 32] = hasher.finalize().into();
    if let Ok(mut m) = HASHES.lock() {
        let m = m.get_or_insert_with(Default::default);
        if m.len() >= MAX_CACHED_HASHES {
            m.clear();
        }
        m.insert(key, hash);
    }
    Ok(hash)
}

const RESOLVE_NO_XDEV: u64 = 0x01;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Reads one result file of the job's tmpfs: `path` from `/work`, never following a link
/// (`RESOLVE_NO_SYMLINKS`) nor leaving the tmpfs (`RESOLVE_NO_XDEV`), a regular file of at most
/// [`MAX_RESULT_BYTES`]. `None` if it is not there or is anything else.
fn read_result(workdir: BorrowedFd<'_>, path: &CStr) -> Option<String> {
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let how = OpenHow {
        flags: u64::from(flags.bits().cast_unsigned()),
        mode: 0,
        resolve: RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `workdir` is a valid borrowed fd, `path` is NUL-terminated and `how` is a live,
    // properly laid out `struct open_how` whose size we pass; the kernel only reads them during
    // the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            workdir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    let fd = i32::try_from(ret).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the syscall succeeded and returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = fstat(fd.as_raw_fd()).ok()?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return None;
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_RESULT_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
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
    use std::os::fd::AsFd;

    fn job_tmpfs() -> (tempfile::TempDir, std::fs::File) {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("work")).expect("work");
        std::fs::create_dir_all(root.path().join("tmp/.sandrun-req")).expect("tmp");
        let work = std::fs::File::open(root.path().join("work")).expect("open work");
        (root, work)
    }

    #[test]
    fn given_an_installed_list_then_wheels_are_hashed_from_the_wheelhouse_and_sorted() {
        let (root, work) = job_tmpfs();
        let wh = tempfile::tempdir().expect("wheelhouse");
        std::fs::write(wh.path().join("b-2.0-py3-none-any.whl"), b"bee").expect("write");
        std::fs::write(wh.path().join("a-1.0-py3-none-any.whl"), b"ay").expect("write");
        std::fs::write(
            root.path().join("tmp/.sandrun-req/installed"),
            "b 2.0 b-2.0-py3-none-any.whl\na 1.0 a-1.0-py3-none-any.whl\n",
        )
        .expect("write");
        let r = outcome(Some(work.as_fd()), wh.path());
        assert_eq!(r.error, None);
        let names: Vec<&str> = r.installed.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            r.installed[1].sha256,
            <[u8; 32]>::from(Sha256::digest(b"bee"))
        );
    }

    #[test]
    fn given_a_failure_file_or_none_or_a_lie_then_the_report_says_so() {
        let (root, work) = job_tmpfs();
        let wh = tempfile::tempdir().expect("wheelhouse");
        let r = outcome(Some(work.as_fd()), wh.path());
        assert_eq!(
            r.error.as_deref(),
            Some("the requirements install did not finish")
        );
        let dir = root.path().join("tmp/.sandrun-req");
        std::fs::write(wh.path().join("a-1-py3-none-any.whl"), b"a").expect("write");
        for line in [
            "a 1 a-1-py3-none-any.whl\na 1 a-1-py3-none-any.whl\n",
            "x 1 ../../etc/passwd.whl",
            "x 1 missing-1-py3-none-any.whl",
            "x 1",
        ] {
            std::fs::write(dir.join("installed"), line).expect("write");
            let r = outcome(Some(work.as_fd()), wh.path());
            assert!(r.error.is_some(), "{line}");
            assert!(r.installed.is_empty());
        }
        std::fs::write(
            dir.join("failed"),
            "the wheelhouse has no distribution for zz\x1b\n",
        )
        .expect("write");
        let r = outcome(Some(work.as_fd()), wh.path());
        assert_eq!(
            r.error.as_deref(),
            Some("the wheelhouse has no distribution for zz")
        );
    }

    #[test]
    fn given_a_symlinked_result_dir_then_nothing_outside_is_read() {
        let (root, work) = job_tmpfs();
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("failed"), "secret\n").expect("write");
        std::fs::remove_dir(root.path().join("tmp/.sandrun-req")).expect("rmdir");
        std::os::unix::fs::symlink(outside.path(), root.path().join("tmp/.sandrun-req"))
            .expect("symlink");
        let r = outcome(Some(work.as_fd()), Path::new("/nonexistent"));
        assert_eq!(
            r.error.as_deref(),
            Some("the requirements install did not finish")
        );
    }
}
