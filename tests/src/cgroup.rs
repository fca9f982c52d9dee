//! A child cgroup per test helper, in every hierarchy the sandbox uses, so that helpers started
//! by parallel tests create their job cgroups in separate subtrees and leak checks see only
//! their own jobs.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// Controllers the sandbox needs (cgroup v1) or the unified hierarchy (v2).
const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];

/// The helper's own cgroup directories, one per hierarchy.
#[derive(Debug)]
pub struct TestCgroup {
    dirs: Vec<PathBuf>,
}

impl TestCgroup {
    /// Creates `name` under this process's cgroup in each relevant hierarchy.
    pub fn create(name: &str) -> io::Result<TestCgroup> {
        let mut dirs = Vec::new();
        for parent in own_cgroup_dirs()? {
            let dir = parent.join(name);
            fs::create_dir(&dir)
                .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", dir.display())))?;
            dirs.push(dir);
        }
        Ok(TestCgroup { dirs })
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Opens every `cgroup.procs` for writing; a child writes `0` to each to join.
    pub fn open_procs(&self) -> io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))?;
                Ok(OwnedFd::from(file))
            })
            .collect()
    }

    /// Every job cgroup directory below the test cgroups (see [`job_dirs_below`]).
    pub fn job_dirs(&self) -> Vec<PathBuf> {
        job_dirs_below(&self.dirs)
    }

    /// How many idle warm sandboxes the helper keeps (their distinct cgroup names).
    pub fn idle_warm_count(&self) -> usize {
        let mut names: Vec<std::ffi::OsString> = (self.idle_warm_dirs().iter())
            .filter_map(|d| d.file_name().map(ToOwned::to_owned))
            .collect();
        names.sort();
        names.dedup();
        names.len()
    }

    /// The cgroup directories of the helper's idle warm sandboxes (see [`is_idle_warm`]).
    pub fn idle_warm_dirs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in &self.dirs {
            collect(d, &mut out, &|p: &Path| is_idle_warm(p));
        }
        out
    }

    /// Kills whatever is left and removes the directories, deepest first. Best effort: it runs in
    /// `Drop` after the test's own checks.
    pub fn remove(&self) {
        for d in &self.dirs {
            remove_tree(d);
        }
    }
}

/// Joins the cgroups whose `cgroup.procs` descriptors are `fds`. Only async-signal-safe calls:
/// this runs in a forked child before exec.
pub fn join_in_child(fds: &[RawFd]) -> io::Result<()> {
    for fd in fds {
        // SAFETY: `fd` is an open descriptor inherited from the parent; the buffer is a static
        // one-byte string.
        let n = unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Raw descriptors of `fds`, for [`join_in_child`].
pub fn raw_fds(fds: &[OwnedFd]) -> Vec<RawFd> {
    fds.iter().map(AsRawFd::as_raw_fd).collect()
}

/// This process's cgroup directory in each hierarchy that has a needed controller (v1) and in
/// the unified hierarchy (v2) if it is mounted.
fn own_cgroup_dirs() -> io::Result<Vec<PathBuf>> {
    let cgroups = fs::read_to_string("/proc/self/cgroup")?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mut dirs = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let mount = if ctrls.is_empty() {
            find_mount(&mountinfo, |fstype, _| fstype == "cgroup2")
        } else if ctrls.split(',').any(|c| V1_CONTROLLERS.contains(&c)) {
            find_mount(&mountinfo, |fstype, opts| {
                fstype == "cgroup" && opts.split(',').any(|o| ctrls.split(',').any(|c| c == o))
            })
        } else {
            None
        };
        if let Some((mount_point, root)) = mount {
            let rel = path
                .strip_prefix(root.as_str())
                .unwrap_or(path)
                .trim_start_matches('/');
            let dir = Path::new(&mount_point).join(rel);
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    Ok(dirs)
}

/// (mount point, root) of the first mount whose filesystem type and super options match.
fn find_mount(mountinfo: &str, want: impl Fn(&str, &str) -> bool) -> Option<(String, String)> {
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rfields: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let (Some(fstype), Some(opts)) = (rfields.first(), rfields.get(2)) else {
            continue;
        };
        if want(fstype, opts) {
            return Some(((*point).to_owned(), (*root).to_owned()));
        }
    }
    None
}

/// Every directory below `roots` whose name starts with `job-`, except the cgroups of idle warm
/// sandboxes: those are the helper's prepared sandboxes, which it keeps by design (at most
/// `warm_sandboxes` of them). A warm sandbox that ran a job is not idle, so a job's leftover
/// cgroup is always listed.
pub fn job_dirs_below(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for root in roots {
        collect(root, &mut out, &|p: &Path| {
            name_starts_with(p, "job-") && !is_idle_warm(p)
        });
    }
    out
}

/// Whether `dir` is the cgroup of a warm sandbox that has not been given a job yet: named
/// `job-w<n>`, and its only process is the sandbox's init still running as root (an init drops
/// to the job's uid as soon as it gets a job, and its cgroup is removed when the job ends).
pub fn is_idle_warm(dir: &Path) -> bool {
    if !name_starts_with(dir, "job-w") {
        return false;
    }
    let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
        return false;
    };
    let pids: Vec<&str> = procs.split_whitespace().collect();
    let [pid] = pids.as_slice() else {
        return false;
    };
    crate::host::runs_as_root(pid)
}

fn name_starts_with(dir: &Path, prefix: &str) -> bool {
    dir.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>, wanted: &dyn Fn(&Path) -> bool) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let path = e.path();
            if wanted(&path) {
                out.push(path.clone());
            }
            collect(&path, out, wanted);
        }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    eprintln!("sandrun-tests: could not remove cgroup {}", dir.display());
}
