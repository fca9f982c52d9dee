//! Real cgroup v1 tests: they need root and the v1 memory, pids, cpu and cpuacct hierarchies
//! (this development machine and CI). Each test works under its own subtree
//! `<this process's cgroup>/sandrun-test-<pid>-<n>` in every hierarchy, so it cannot touch job
//! cgroups of a helper running on the same host, and removes that subtree at the end.
//!
//! Children are forked from the multi-threaded test harness, so after `fork` they only make raw
//! system calls (no allocation, no locks) until `_exit`.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::common::{self, SANDRUN_DIR};
use super::*;

/// One real test at a time: they share the CPUs and the hierarchies' parent directories.
static SERIAL: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);
const MIB: u64 = 1 << 20;
/// Exit code of the fork-bomb child when `fork` failed, as the pids limit requires.
const FORK_REFUSED: i32 = 42;

fn limits() -> CgroupLimits {
    CgroupLimits {
        memory_bytes: 64 * MIB,
        pids: 16,
        cpu_quota_us: 50_000,
        cpu_period_us: 100_000,
    }
}

/// An isolated subtree in each v1 hierarchy and a manager whose "helper cgroup" is that subtree.
struct TestTree {
    _serial: MutexGuard<'static, ()>,
    roots: Vec<PathBuf>,
    pids_root: PathBuf,
    layout: CgroupLayout,
    host: Host,
    manager: Box<dyn CgroupManager>,
}

impl TestTree {
    fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates real cgroups and needs root (run the tests as root, as CI does)"
        );
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let proc_cgroup = read_proc(Path::new("/proc/self/cgroup")).unwrap();
        let mountinfo = read_proc(Path::new("/proc/self/mountinfo")).unwrap();
        let CgroupLayout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
        } = detect_from(&proc_cgroup, &mountinfo, Path::new("/")).unwrap()
        else {
            panic!("these tests target cgroup v1 (the CI machine); this host was detected as v2");
        };
        let tag = format!(
            "sandrun-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let layout = CgroupLayout::V1 {
            memory: memory.join(&tag),
            pids: pids.join(&tag),
            cpu: cpu.join(&tag),
            cpuacct: cpuacct.join(&tag),
        };
        let CgroupLayout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
        } = &layout
        else {
            unreachable!()
        };
        let mut roots: Vec<PathBuf> = Vec::new();
        for dir in [memory, pids, cpu, cpuacct] {
            if !roots.contains(dir) {
                std::fs::create_dir(dir).unwrap();
                roots.push(dir.clone());
            }
        }
        let host = Host::real();
        let manager = manager_for(layout.clone(), host.clone()).unwrap();
        TestTree {
            _serial: serial,
            roots,
            pids_root: pids.clone(),
            layout,
            host,
            manager,
        }
    }

    fn job_name(&self) -> String {
        format!(
            "test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        )
    }

    /// The job's directory in the hierarchy whose helper directory is `root`.
    fn dir(&self, root: &Path, name: &str) -> PathBuf {
        root.join(SANDRUN_DIR).join(name)
    }

    fn hierarchy(&self, controller: &str) -> &Path {
        let CgroupLayout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
        } = &self.layout
        else {
            unreachable!()
        };
        match controller {
            "memory" => memory,
            "pids" => pids,
            "cpu" => cpu,
            _ => cpuacct,
        }
    }
}

impl Drop for TestTree {
    /// Kills and removes whatever a failed test left, then the subtree itself.
    fn drop(&mut self) {
        let sandrun = self.pids_root.join(SANDRUN_DIR);
        let leftovers = self.host.fs.subdirs(&sandrun).unwrap_or_default();
        for name in &leftovers {
            let _ = common::kill_by_procs(&self.host, &sandrun.join(name).join("cgroup.procs"));
        }
        for root in &self.roots {
            for name in &leftovers {
                let _ = std::fs::remove_dir(root.join(SANDRUN_DIR).join(name));
            }
            let _ = std::fs::remove_dir(root.join(SANDRUN_DIR));
            if let Err(e) = std::fs::remove_dir(root) {
                eprintln!("cannot remove test cgroup {}: {e}", root.display());
            }
        }
    }
}

/// Forks a child that joins `job` through its join fds (as the sandbox child does), tells the
/// parent, then runs `work` and exits with its result.
fn spawn_in(job: &dyn JobCgroup, work: fn() -> i32) -> Pid {
    let join: Vec<RawFd> = job.join_fds().iter().map(AsRawFd::as_raw_fd).collect();
    let (ready_read, ready_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    // SAFETY: the child only makes raw system calls (write, mmap, fork, pause, clock_gettime)
    // and ends in _exit; it never allocates or takes a lock the other threads may hold.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            for fd in &join {
                // SAFETY: fd is an open cgroup.procs descriptor inherited from the parent;
                // the buffer is a 1-byte static.
                if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
                    // SAFETY: _exit is always safe to call.
                    unsafe { libc::_exit(101) };
                }
            }
            // SAFETY: writes one byte from a static buffer to the pipe we own.
            unsafe { libc::write(ready_write.as_raw_fd(), b"x".as_ptr().cast(), 1) };
            let code = work();
            // SAFETY: _exit is always safe to call.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(ready_write);
            let mut byte = [0u8; 1];
            let n = nix::unistd::read(ready_read.as_fd().as_raw_fd(), &mut byte).unwrap();
            assert_eq!(n, 1, "child {child} died before joining its cgroup");
            child
        }
    }
}

fn idle() -> i32 {
    loop {
        // SAFETY: pause has no arguments and only returns on a signal.
        unsafe { libc::pause() };
    }
}

fn allocate_200_mib() -> i32 {
    let len = 200 << 20;
    // SAFETY: an anonymous private mapping; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return 102;
    }
    for offset in (0..len).step_by(4096) {
        // SAFETY: offset < len, inside the writable mapping created above.
        unsafe { std::ptr::write_volatile(base.cast::<u8>().add(offset), 1) };
    }
    0
}

fn fork_100_times() -> i32 {
    for _ in 0..100 {
        // SAFETY: raw fork in a single-threaded child; the grandchild only pauses.
        match unsafe { libc::fork() } {
            -1 => return FORK_REFUSED,
            0 => {
                idle();
            }
            _ => {}
        }
    }
    0
}

fn burn_300_ms_cpu() -> i32 {
    burn_cpu(300_000_000)
}

fn burn_20_ms_cpu() -> i32 {
    burn_cpu(20_000_000)
}

/// Spins until this process has used `cpu_ns` of CPU time.
fn burn_cpu(cpu_ns: i64) -> i32 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut spins: u64 = 0;
    loop {
        spins = std::hint::black_box(spins.wrapping_add(1));
        // SAFETY: `now` is a valid timespec to write.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
        if now.tv_sec * 1_000_000_000 + now.tv_nsec >= cpu_ns {
            return 0;
        }
    }
}

fn wait_status(child: Pid) -> WaitStatus {
    waitpid(child, None).unwrap()
}

fn read_file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn procs_list(dir: &Path) -> Vec<i32> {
    parse::parse_pids(&read_file(&dir.join("cgroup.procs")), dir).unwrap()
}

#[test]
fn given_child_in_new_job_when_killed_then_limits_read_back_child_listed_and_dirs_removed() {
    let tree = TestTree::new();
    let name = tree.job_name();
    let mut job = tree.manager.create(&name, &limits()).unwrap();
    let memory = tree.dir(tree.hierarchy("memory"), &name);
    assert_eq!(
        read_file(&memory.join("memory.limit_in_bytes")).trim(),
        "67108864"
    );
    assert_eq!(
        read_file(&memory.join("memory.memsw.limit_in_bytes")).trim(),
        "67108864"
    );
    let pids = tree.dir(tree.hierarchy("pids"), &name);
    assert_eq!(read_file(&pids.join("pids.max")).trim(), "16");

    let child = spawn_in(job.as_ref(), idle);
    for controller in ["memory", "pids", "cpu", "cpuacct"] {
        let dir = tree.dir(tree.hierarchy(controller), &name);
        assert_eq!(
            procs_list(&dir),
            vec![child.as_raw()],
            "{controller} hierarchy"
        );
    }
    job.kill_all().unwrap();
    assert_eq!(
        wait_status(child),
        WaitStatus::Signaled(child, Signal::SIGKILL, false)
    );
    assert!(job.is_empty().unwrap());
    job.remove().unwrap();
    for root in &tree.roots {
        assert!(
            !tree.dir(root, &name).exists(),
            "{} left behind",
            root.display()
        );
    }
}

#[test]
fn given_job_with_live_process_when_removed_then_ebusy_and_retry_after_kill_succeeds() {
    let tree = TestTree::new();
    let name = tree.job_name();
    let mut job = tree.manager.create(&name, &limits()).unwrap();
    let child = spawn_in(job.as_ref(), idle);
    match job.remove() {
        Err(CgroupError::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EBUSY)),
        other => panic!("expected EBUSY, got {other:?}"),
    }
    assert!(tree.dir(tree.hierarchy("pids"), &name).exists());
    job.kill_all().unwrap();
    assert_eq!(
        wait_status(child),
        WaitStatus::Signaled(child, Signal::SIGKILL, false)
    );
    job.remove().unwrap();
}

#[test]
fn given_child_allocating_200_mib_in_64_mib_job_then_it_is_oom_killed_and_counted() {
    let tree = TestTree::new();
    let mut job = tree.manager.create(&tree.job_name(), &limits()).unwrap();
    let stats = allocate_200_mib_and_be_oom_killed(job.as_ref());
    assert!(stats.memory_peak_bytes >= 32 * MIB, "{stats:?}");
    job.remove().unwrap();
}

/// Runs a child allocating 200 MiB in `job` (64 MiB): it must die of SIGKILL, counted as an OOM
/// kill, with the peak under the limit. Returns the job's figures.
fn allocate_200_mib_and_be_oom_killed(job: &dyn JobCgroup) -> CgroupStats {
    let child = spawn_in(job, allocate_200_mib);
    assert_eq!(
        wait_status(child),
        WaitStatus::Signaled(child, Signal::SIGKILL, false)
    );
    let stats = job.stats().unwrap();
    assert!(stats.oom_kills >= 1, "{stats:?}");
    assert!(stats.memory_peak_bytes <= 64 * MIB, "{stats:?}");
    stats
}

#[test]
fn given_child_forking_100_times_in_16_pid_job_then_fork_fails_and_kill_all_gets_the_rest() {
    let tree = TestTree::new();
    let mut job = tree.manager.create(&tree.job_name(), &limits()).unwrap();
    let child = spawn_in(job.as_ref(), fork_100_times);
    assert_eq!(wait_status(child), WaitStatus::Exited(child, FORK_REFUSED));
    assert!(job.stats().unwrap().pids_max_events >= 1);
    assert!(
        !job.is_empty().unwrap(),
        "the orphaned grandchildren are still in the job"
    );
    job.kill_all().unwrap();
    assert!(job.is_empty().unwrap());
    job.remove().unwrap();
}

#[test]
fn given_busy_child_then_cpu_ns_grows_by_at_least_the_cpu_it_used() {
    let tree = TestTree::new();
    let mut job = tree.manager.create(&tree.job_name(), &limits()).unwrap();
    let before = job.stats().unwrap().cpu_ns;
    let child = spawn_in(job.as_ref(), burn_300_ms_cpu);
    assert_eq!(wait_status(child), WaitStatus::Exited(child, 0));
    let after = job.stats().unwrap().cpu_ns;
    assert!(
        after >= before + 250_000_000,
        "cpu_ns went from {before} to {after}"
    );
    job.remove().unwrap();
}

/// With 1 ms of CPU per 100 ms period, a child that needs 20 ms is throttled unless the host
/// gives it less than 1 % of a CPU: the quota, not the host's load, limits it.
#[test]
fn given_busy_child_in_1_percent_cpu_job_then_the_quota_throttles_it() {
    let tree = TestTree::new();
    let name = tree.job_name();
    let one_percent = CgroupLimits {
        cpu_quota_us: 1_000,
        cpu_period_us: 100_000,
        ..limits()
    };
    let mut job = tree.manager.create(&name, &one_percent).unwrap();
    let cpu = tree.dir(tree.hierarchy("cpu"), &name);
    assert_eq!(read_file(&cpu.join("cpu.cfs_quota_us")).trim(), "1000");
    assert_eq!(read_file(&cpu.join("cpu.cfs_period_us")).trim(), "100000");
    let child = spawn_in(job.as_ref(), burn_20_ms_cpu);
    assert_eq!(wait_status(child), WaitStatus::Exited(child, 0));
    let cpu_stat = read_file(&cpu.join("cpu.stat"));
    let throttled = parse::keyed_u64(&cpu_stat, "nr_throttled", Path::new("cpu.stat")).unwrap();
    assert!(throttled >= Some(1), "cpu.stat: {cpu_stat}");
    job.remove().unwrap();
}

#[test]
fn given_stale_job_with_process_when_cleanup_stale_then_it_is_killed_and_removed() {
    let tree = TestTree::new();
    let job = tree.manager.create("job-1", &limits()).unwrap();
    let child = spawn_in(job.as_ref(), idle);
    drop(job);
    let restarted = manager_for(
        tree.layout.clone(),
        Host {
            fs: Arc::new(RealFs),
            ..tree.host.clone()
        },
    )
    .unwrap();
    assert_eq!(restarted.cleanup_stale().unwrap(), 1);
    assert_eq!(
        wait_status(child),
        WaitStatus::Signaled(child, Signal::SIGKILL, false)
    );
    for root in &tree.roots {
        assert!(
            !tree.dir(root, "job-1").exists(),
            "{} left behind",
            root.display()
        );
    }
}

#[test]
fn given_a_job_when_its_memory_is_raised_then_cut_then_the_kernel_holds_each_value() {
    let tree = TestTree::new();
    let name = tree.job_name();
    let mut job = tree.manager.create(&name, &limits()).unwrap();
    let memory = tree.dir(tree.hierarchy("memory"), &name);
    let read_limits = || {
        (
            read_file(&memory.join("memory.limit_in_bytes")),
            read_file(&memory.join("memory.memsw.limit_in_bytes")),
        )
    };
    // A raise must write memsw first (the kernel refuses memory > memsw)...
    let raised = CgroupLimits {
        memory_bytes: 512 * MIB,
        pids: 64,
        ..limits()
    };
    job.set_limits(&raised).unwrap();
    let want = format!("{}\n", 512 * MIB);
    assert_eq!(read_limits(), (want.clone(), want));
    let pids = tree.dir(tree.hierarchy("pids"), &name);
    assert_eq!(read_file(&pids.join("pids.max")).trim(), "64");
    // ...and a cut must write memory first (the kernel refuses memsw < memory).
    let cut = CgroupLimits {
        memory_bytes: 32 * MIB,
        ..limits()
    };
    job.set_limits(&cut).unwrap();
    let want = format!("{}\n", 32 * MIB);
    assert_eq!(read_limits(), (want.clone(), want));
    assert_eq!(read_file(&pids.join("pids.max")).trim(), "16");
    job.remove().unwrap();
}

#[test]
fn given_a_job_cut_to_64_mib_after_creation_when_a_child_allocates_200_mib_then_it_is_oom_killed() {
    let tree = TestTree::new();
    let generous = CgroupLimits {
        memory_bytes: 1024 * MIB,
        ..limits()
    };
    let mut job = tree.manager.create(&tree.job_name(), &generous).unwrap();
    job.set_limits(&limits()).unwrap();
    let stats = allocate_200_mib_and_be_oom_killed(job.as_ref());
    assert_eq!(job.cpu_ns().unwrap(), stats.cpu_ns);
    job.remove().unwrap();
}
