//! v1, v2 and detection tests against fake cgroup trees in a temporary directory. The fake
//! kernel populates control files on `mkdir`, refuses `rmdir` while `cgroup.procs` lists a
//! process, and refuses to enable controllers in a cgroup that has processes (the v2
//! no-internal-process rule).

#![forbid(unsafe_code)]

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tempfile::TempDir;

use super::*;

const V2_FILES: &[(&str, &str)] = &[
    ("cgroup.controllers", "cpu memory pids\n"),
    ("cgroup.subtree_control", "\n"),
    ("cgroup.procs", ""),
    ("cgroup.events", "populated 0\nfrozen 0\n"),
    ("cgroup.kill", ""),
    ("memory.max", "max\n"),
    ("memory.swap.max", "max\n"),
    ("memory.oom.group", "0\n"),
    ("memory.current", "0\n"),
    ("memory.peak", "0\n"),
    (
        "memory.events",
        "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    ),
    ("pids.max", "max\n"),
    ("pids.events", "max 0\n"),
    ("cpu.max", "max 100000\n"),
    ("cpu.stat", "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"),
];

const V1_FILES: &[(&str, &str)] = &[
    ("cgroup.procs", ""),
    ("memory.limit_in_bytes", "9223372036854771712\n"),
    ("memory.memsw.limit_in_bytes", "9223372036854771712\n"),
    (
        "memory.oom_control",
        "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    ),
    ("memory.swappiness", "60\n"),
    ("memory.usage_in_bytes", "0\n"),
    ("memory.max_usage_in_bytes", "0\n"),
    ("memory.failcnt", "0\n"),
    ("pids.max", "max\n"),
    ("pids.events", "max 0\n"),
    ("cpu.cfs_period_us", "100000\n"),
    ("cpu.cfs_quota_us", "-1\n"),
    ("cpuacct.usage", "0\n"),
];

/// Stands for this process in a fake `cgroup.procs`.
const SELF_PID: &str = "4242\n";

#[derive(Debug)]
struct FakeKernel {
    files: Vec<(&'static str, &'static str)>,
    /// The fake cgroup this process is in (its `cgroup.procs` lists [`SELF_PID`]).
    self_dir: Mutex<Option<PathBuf>>,
}

impl FakeKernel {
    fn new(files: &[(&'static str, &'static str)], without: &[&str]) -> Self {
        let files = files
            .iter()
            .filter(|(name, _)| !without.contains(name))
            .copied()
            .collect();
        FakeKernel {
            files,
            self_dir: Mutex::new(None),
        }
    }

    fn move_self(&self, new_dir: &Path) -> io::Result<()> {
        let mut self_dir = self.self_dir.lock().unwrap();
        if let Some(old) = self_dir.take() {
            fs::write(old.join("cgroup.procs"), "")?;
        }
        fs::write(new_dir.join("cgroup.procs"), SELF_PID)?;
        *self_dir = Some(new_dir.to_owned());
        Ok(())
    }
}

impl CgroupFs for FakeKernel {
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)?;
        for (name, contents) in &self.files {
            fs::write(path.join(name), contents)?;
        }
        Ok(())
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        if !fs::read_to_string(path.join("cgroup.procs"))
            .unwrap_or_default()
            .is_empty()
        {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        for (name, _) in &self.files {
            let _ = fs::remove_file(path.join(name));
        }
        fs::remove_dir(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let dir = path.parent().unwrap();
        let name = path.file_name().unwrap();
        if name == "cgroup.subtree_control" && !read(&dir.join("cgroup.procs")).is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        if name == "cgroup.procs" && value == "0" {
            return self.move_self(dir);
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)?;
        file.write_all(value.as_bytes())
    }
}

struct Fake {
    _tmp: TempDir,
    root: PathBuf,
    kernel: Arc<FakeKernel>,
    host: Host,
}

impl Fake {
    fn new(files: &[(&'static str, &'static str)], without: &[&str], swap: bool) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let swaps = root.join("swaps");
        let mut swaps_text = "Filename\tType\tSize\tUsed\tPriority\n".to_owned();
        if swap {
            swaps_text.push_str("/swapfile\tfile\t1048572\t0\t-2\n");
        }
        fs::write(&swaps, swaps_text).unwrap();
        let kernel = Arc::new(FakeKernel::new(files, without));
        let host = Host {
            fs: kernel.clone(),
            proc_swaps: swaps,
        };
        Fake {
            _tmp: tmp,
            root,
            kernel,
            host,
        }
    }

    /// A directory as the kernel would have it (control files included).
    fn cgroup(&self, rel: &str) -> PathBuf {
        let dir = self.root.join(rel);
        fs::create_dir_all(dir.parent().unwrap()).unwrap();
        self.kernel.mkdir(&dir).unwrap();
        dir
    }

    fn v2(&self) -> (PathBuf, Box<dyn CgroupManager>) {
        let helper = self.cgroup("sys/fs/cgroup/sandrund.service");
        let layout = CgroupLayout::V2 {
            base: helper.join("sandrun"),
        };
        (helper, manager_for(layout, self.host.clone()).unwrap())
    }

    fn v1_layout(&self, shared_cpu: bool) -> CgroupLayout {
        let cpu = if shared_cpu { "cpu,cpuacct" } else { "cpu" };
        let cpuacct = if shared_cpu { "cpu,cpuacct" } else { "cpuacct" };
        CgroupLayout::V1 {
            memory: self.cgroup("memory/helper"),
            pids: self.cgroup("pids/helper"),
            cpu: self.cgroup(&format!("{cpu}/helper")),
            cpuacct: if shared_cpu {
                self.root.join(format!("{cpuacct}/helper"))
            } else {
                self.cgroup(&format!("{cpuacct}/helper"))
            },
        }
    }

    fn v1(&self) -> Box<dyn CgroupManager> {
        manager_for(self.v1_layout(false), self.host.clone()).unwrap()
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap()
}

fn limits() -> CgroupLimits {
    CgroupLimits {
        memory_bytes: 64 << 20,
        pids: 16,
        cpu_quota_us: 50_000,
        cpu_period_us: 100_000,
    }
}

fn job_dirs(fake: &Fake, name: &str) -> Vec<PathBuf> {
    ["memory", "pids", "cpu", "cpuacct", "cpu,cpuacct"]
        .iter()
        .map(|h| fake.root.join(h).join("helper/sandrun").join(name))
        .collect()
}

// ---------------------------------------------------------------- v2

#[test]
fn given_v2_tree_when_manager_created_then_controllers_enabled_in_helper_and_base() {
    let fake = Fake::new(V2_FILES, &[], false);
    let (helper, _manager) = fake.v2();
    assert_eq!(
        read(&helper.join("cgroup.subtree_control")),
        "+memory +pids +cpu"
    );
    assert_eq!(
        read(&helper.join("sandrun/cgroup.subtree_control")),
        "+memory +pids +cpu"
    );
}

#[test]
fn given_v2_helper_with_processes_when_manager_created_then_helper_moves_to_leaf() {
    let fake = Fake::new(V2_FILES, &[], false);
    let helper = fake.cgroup("sys/fs/cgroup/sandrund.service");
    fake.kernel.move_self(&helper).unwrap();
    let layout = CgroupLayout::V2 {
        base: helper.join("sandrun"),
    };
    manager_for(layout, fake.host.clone()).unwrap();
    assert_eq!(read(&helper.join("cgroup.procs")), "");
    assert_eq!(read(&helper.join("helper/cgroup.procs")), SELF_PID);
    assert_eq!(
        read(&helper.join("cgroup.subtree_control")),
        "+memory +pids +cpu"
    );
}

#[test]
fn given_v2_controllers_already_enabled_when_manager_created_then_nothing_rewritten() {
    let fake = Fake::new(V2_FILES, &[], false);
    let helper = fake.cgroup("sys/fs/cgroup/sandrund.service");
    fs::write(helper.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
    fake.kernel.move_self(&helper).unwrap();
    let layout = CgroupLayout::V2 {
        base: helper.join("sandrun"),
    };
    manager_for(layout, fake.host.clone()).unwrap();
    assert_eq!(
        read(&helper.join("cgroup.procs")),
        SELF_PID,
        "the helper was not moved"
    );
}

#[test]
fn given_v2_tree_when_job_created_then_limits_written_exactly() {
    let fake = Fake::new(V2_FILES, &[], false);
    let (helper, manager) = fake.v2();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let dir = helper.join("sandrun/job-1");
    assert_eq!(read(&dir.join("memory.max")), "67108864");
    assert_eq!(read(&dir.join("memory.swap.max")), "0");
    assert_eq!(read(&dir.join("memory.oom.group")), "1");
    assert_eq!(read(&dir.join("pids.max")), "16");
    assert_eq!(read(&dir.join("cpu.max")), "50000 100000");
    assert_eq!(job.join_fds().len(), 1);
    job.remove().unwrap();
    assert!(!dir.exists());
}

#[test]
fn given_v2_job_when_kernel_reports_usage_then_stats_are_parsed() {
    let fake = Fake::new(V2_FILES, &[], false);
    let (helper, manager) = fake.v2();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let dir = helper.join("sandrun/job-1");
    fs::write(
        dir.join("memory.events"),
        "low 0\nhigh 0\nmax 9\noom 3\noom_kill 3\n",
    )
    .unwrap();
    fs::write(
        dir.join("cpu.stat"),
        "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
    )
    .unwrap();
    fs::write(dir.join("pids.events"), "max 2\n").unwrap();
    fs::write(dir.join("memory.current"), "1024\n").unwrap();
    fs::write(dir.join("memory.peak"), "4096\n").unwrap();
    let expected = CgroupStats {
        cpu_ns: 1_500_000,
        memory_current_bytes: 1024,
        memory_peak_bytes: 4096,
        oom_kills: 3,
        pids_max_events: 2,
    };
    assert_eq!(job.stats().unwrap(), expected);
    job.remove().unwrap();
}

#[test]
fn given_v2_without_memory_peak_when_stats_read_then_peak_is_largest_current_seen() {
    let fake = Fake::new(V2_FILES, &["memory.peak"], false);
    let (helper, manager) = fake.v2();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let current = helper.join("sandrun/job-1/memory.current");
    fs::write(&current, "5000\n").unwrap();
    assert_eq!(job.stats().unwrap().memory_peak_bytes, 5000);
    fs::write(&current, "1000\n").unwrap();
    let stats = job.stats().unwrap();
    assert_eq!(
        (stats.memory_current_bytes, stats.memory_peak_bytes),
        (1000, 5000)
    );
    job.remove().unwrap();
}

#[test]
fn given_v2_garbage_in_memory_events_when_stats_read_then_parse_error_names_file() {
    let fake = Fake::new(V2_FILES, &[], false);
    let (helper, manager) = fake.v2();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let events = helper.join("sandrun/job-1/memory.events");
    fs::write(&events, "oom_kill lots\n").unwrap();
    match job.stats() {
        Err(CgroupError::Parse { path, .. }) => assert_eq!(path, events),
        other => panic!("expected a parse error, got {other:?}"),
    }
    job.remove().unwrap();
}

#[test]
fn given_v2_no_swap_max_file_and_host_swap_when_job_created_then_fails_closed_and_no_dir_left() {
    let fake = Fake::new(V2_FILES, &["memory.swap.max"], true);
    let (helper, manager) = fake.v2();
    match manager.create("job-1", &limits()) {
        Err(CgroupError::MissingController { controller, .. }) => {
            assert_eq!(controller, "memory.swap");
        }
        other => panic!("expected MissingController, got {:?}", other.map(|_| ())),
    }
    assert!(!helper.join("sandrun/job-1").exists());
}

#[test]
fn given_v2_no_swap_max_file_and_no_host_swap_when_job_created_then_job_gets_its_limits() {
    let fake = Fake::new(V2_FILES, &["memory.swap.max"], false);
    let (helper, manager) = fake.v2();
    let mut job = manager.create("job-1", &limits()).unwrap();
    assert_eq!(read(&helper.join("sandrun/job-1/memory.max")), "67108864");
    job.remove().unwrap();
}

#[test]
fn given_v2_limit_file_missing_when_job_created_then_error_names_step_and_dir_removed() {
    let fake = Fake::new(V2_FILES, &["cpu.max"], false);
    let (helper, manager) = fake.v2();
    match manager.create("job-1", &limits()) {
        Err(CgroupError::Io { step, path, .. }) => {
            assert_eq!(step, "set cpu quota");
            assert_eq!(path, helper.join("sandrun/job-1/cpu.max"));
        }
        other => panic!("expected an Io error, got {:?}", other.map(|_| ())),
    }
    assert!(!helper.join("sandrun/job-1").exists());
}

#[test]
fn given_v2_job_when_kill_all_then_cgroup_kill_gets_1() {
    let fake = Fake::new(V2_FILES, &[], false);
    let (helper, manager) = fake.v2();
    let mut job = manager.create("job-1", &limits()).unwrap();
    job.kill_all().unwrap();
    assert_eq!(read(&helper.join("sandrun/job-1/cgroup.kill")), "1");
    job.remove().unwrap();
}

#[test]
fn given_v2_job_with_processes_when_removed_then_ebusy_error_and_retry_succeeds() {
    let fake = Fake::new(V2_FILES, &[], false);
    let (helper, manager) = fake.v2();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let dir = helper.join("sandrun/job-1");
    fs::write(dir.join("cgroup.procs"), "777\n").unwrap();
    fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
    assert!(!job.is_empty().unwrap());
    match job.remove() {
        Err(CgroupError::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EBUSY)),
        other => panic!("expected EBUSY, got {other:?}"),
    }
    assert!(dir.exists());
    fs::write(dir.join("cgroup.procs"), "").unwrap();
    fs::write(dir.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
    assert!(job.is_empty().unwrap());
    job.remove().unwrap();
    assert!(!dir.exists());
}

#[test]
fn given_stale_v2_job_dirs_when_cleanup_stale_then_only_job_dirs_are_killed_and_removed() {
    let fake = Fake::new(V2_FILES, &[], false);
    let (helper, manager) = fake.v2();
    for name in ["job-1", "job-2", "keep-me"] {
        fake.cgroup(&format!("sys/fs/cgroup/sandrund.service/sandrun/{name}"));
    }
    assert_eq!(manager.cleanup_stale().unwrap(), 2);
    assert!(!helper.join("sandrun/job-1").exists());
    assert!(!helper.join("sandrun/job-2").exists());
    assert!(helper.join("sandrun/keep-me").exists());
}

#[test]
fn given_names_that_escape_sandrun_when_job_created_then_refused_and_nothing_created() {
    let fake = Fake::new(V2_FILES, &[], false);
    let (helper, manager) = fake.v2();
    for name in ["../escape", "a/b", "..", ""] {
        assert!(matches!(
            manager.create(name, &limits()),
            Err(CgroupError::Invalid { .. })
        ));
    }
    assert!(!helper.join("escape").exists());
    assert!(!helper.join("sandrun/a").exists());
}

// ---------------------------------------------------------------- v1

#[test]
fn given_v1_tree_when_job_created_then_limits_written_in_each_hierarchy() {
    let fake = Fake::new(V1_FILES, &[], false);
    let manager = fake.v1();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let [memory, pids, cpu, cpuacct, _] = job_dirs(&fake, "job-1").try_into().unwrap();
    assert_eq!(read(&memory.join("memory.limit_in_bytes")), "67108864");
    assert_eq!(
        read(&memory.join("memory.memsw.limit_in_bytes")),
        "67108864"
    );
    assert_eq!(read(&memory.join("memory.oom_control")), "0");
    assert_eq!(
        read(&memory.join("memory.swappiness")),
        "60\n",
        "memsw makes it unneeded"
    );
    assert_eq!(read(&pids.join("pids.max")), "16");
    assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "50000");
    assert!(cpuacct.is_dir());
    assert_eq!(job.join_fds().len(), 4);
    job.remove().unwrap();
    for dir in [memory, pids, cpu, cpuacct] {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn given_v1_cpu_and_cpuacct_on_one_mount_when_job_created_then_one_dir_serves_both() {
    let fake = Fake::new(V1_FILES, &[], false);
    let manager = manager_for(fake.v1_layout(true), fake.host.clone()).unwrap();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let shared = fake.root.join("cpu,cpuacct/helper/sandrun/job-1");
    assert_eq!(read(&shared.join("cpu.cfs_quota_us")), "50000");
    assert_eq!(job.join_fds().len(), 3);
    fs::write(shared.join("cpuacct.usage"), "777\n").unwrap();
    assert_eq!(job.stats().unwrap().cpu_ns, 777);
    job.remove().unwrap();
    assert!(!shared.exists());
}

#[test]
fn given_v1_job_when_kernel_reports_usage_then_stats_are_parsed() {
    let fake = Fake::new(V1_FILES, &[], false);
    let manager = fake.v1();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let [memory, pids, _, cpuacct, _] = job_dirs(&fake, "job-1").try_into().unwrap();
    fs::write(cpuacct.join("cpuacct.usage"), "123456789\n").unwrap();
    fs::write(memory.join("memory.usage_in_bytes"), "1000\n").unwrap();
    fs::write(memory.join("memory.max_usage_in_bytes"), "5000\n").unwrap();
    fs::write(
        memory.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    )
    .unwrap();
    fs::write(pids.join("pids.events"), "max 2\n").unwrap();
    let expected = CgroupStats {
        cpu_ns: 123_456_789,
        memory_current_bytes: 1000,
        memory_peak_bytes: 5000,
        oom_kills: 3,
        pids_max_events: 2,
    };
    assert_eq!(job.stats().unwrap(), expected);
    job.remove().unwrap();
}

#[test]
fn given_v1_oom_control_without_oom_kill_line_when_stats_read_then_failcnt_counts_one() {
    let fake = Fake::new(V1_FILES, &[], false);
    let manager = fake.v1();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let memory = fake.root.join("memory/helper/sandrun/job-1");
    fs::write(
        memory.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\n",
    )
    .unwrap();
    assert_eq!(job.stats().unwrap().oom_kills, 0);
    fs::write(memory.join("memory.failcnt"), "7\n").unwrap();
    assert_eq!(job.stats().unwrap().oom_kills, 1);
    job.remove().unwrap();
}

#[test]
fn given_v1_garbage_in_pids_events_when_stats_read_then_parse_error() {
    let fake = Fake::new(V1_FILES, &[], false);
    let manager = fake.v1();
    let mut job = manager.create("job-1", &limits()).unwrap();
    fs::write(
        fake.root.join("pids/helper/sandrun/job-1/pids.events"),
        "max -1\n",
    )
    .unwrap();
    assert!(matches!(job.stats(), Err(CgroupError::Parse { .. })));
    job.remove().unwrap();
}

#[test]
fn given_v1_no_memsw_and_host_swap_when_job_created_then_fails_closed_and_no_dir_left() {
    let fake = Fake::new(V1_FILES, &["memory.memsw.limit_in_bytes"], true);
    let manager = fake.v1();
    match manager.create("job-1", &limits()) {
        Err(CgroupError::MissingController { controller, .. }) => {
            assert_eq!(controller, "memory.memsw");
        }
        other => panic!("expected MissingController, got {:?}", other.map(|_| ())),
    }
    for dir in job_dirs(&fake, "job-1") {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn given_v1_no_memsw_and_no_host_swap_when_job_created_then_swappiness_is_0() {
    let fake = Fake::new(V1_FILES, &["memory.memsw.limit_in_bytes"], false);
    let manager = fake.v1();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let memory = fake.root.join("memory/helper/sandrun/job-1");
    assert_eq!(read(&memory.join("memory.swappiness")), "0");
    assert_eq!(read(&memory.join("memory.limit_in_bytes")), "67108864");
    job.remove().unwrap();
}

#[test]
fn given_v1_last_limit_write_fails_when_job_created_then_every_hierarchy_dir_is_removed() {
    let fake = Fake::new(V1_FILES, &["cpu.cfs_quota_us"], false);
    let manager = fake.v1();
    match manager.create("job-1", &limits()) {
        Err(CgroupError::Io { step, .. }) => assert_eq!(step, "set cpu quota"),
        other => panic!("expected an Io error, got {:?}", other.map(|_| ())),
    }
    for dir in job_dirs(&fake, "job-1") {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn given_existing_job_name_when_created_again_then_refused_and_first_job_kept() {
    let fake = Fake::new(V1_FILES, &[], false);
    let manager = fake.v1();
    let mut job = manager.create("job-1", &limits()).unwrap();
    assert!(matches!(
        manager.create("job-1", &limits()),
        Err(CgroupError::Io { .. })
    ));
    assert!(fake.root.join("memory/helper/sandrun/job-1").is_dir());
    job.remove().unwrap();
}

#[test]
fn given_v1_stale_job_in_some_hierarchies_when_cleanup_stale_then_it_is_removed_everywhere() {
    let fake = Fake::new(V1_FILES, &[], false);
    let manager = fake.v1();
    fake.cgroup("memory/helper/sandrun/job-9");
    fake.cgroup("pids/helper/sandrun/job-9");
    fake.cgroup("pids/helper/sandrun/other");
    assert_eq!(manager.cleanup_stale().unwrap(), 1);
    assert!(!fake.root.join("memory/helper/sandrun/job-9").exists());
    assert!(!fake.root.join("pids/helper/sandrun/job-9").exists());
    assert!(fake.root.join("pids/helper/sandrun/other").exists());
}

// ---------------------------------------------------------------- detection

/// This development machine: v1 controllers, an empty cgroup2 at /sys/fs/cgroup/unified.
const HYBRID_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n5:devices:/\n\
    4:memory:/process_api/5eee\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";
const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

const V2_CGROUP: &str = "0::/system.slice/sandrund.service\n";
const V2_MOUNTINFO: &str = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
";

fn fake_file(root: &Path, rel: &str, contents: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

#[test]
fn given_this_machines_hybrid_layout_when_detected_then_v1_with_the_helpers_cgroups() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fake_file(root, "sys/fs/cgroup/unified/cgroup.controllers", "");
    let layout = detect_from(HYBRID_CGROUP, HYBRID_MOUNTINFO, root).unwrap();
    let expected = CgroupLayout::V1 {
        memory: root.join("sys/fs/cgroup/memory/process_api/5eee"),
        pids: root.join("sys/fs/cgroup/pids"),
        cpu: root.join("sys/fs/cgroup/cpu"),
        cpuacct: root.join("sys/fs/cgroup/cpuacct"),
    };
    assert_eq!(layout, expected);
}

#[test]
fn given_combined_cpu_cpuacct_mount_when_detected_then_both_use_the_same_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let cgroup = "4:memory:/a\n3:pids:/a\n2:cpu,cpuacct:/a\n0::/a\n";
    let mountinfo = "\
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
37 31 0:34 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
";
    let CgroupLayout::V1 { cpu, cpuacct, .. } = detect_from(cgroup, mountinfo, tmp.path()).unwrap()
    else {
        panic!("expected v1");
    };
    assert_eq!(cpu, tmp.path().join("sys/fs/cgroup/cpu,cpuacct/a"));
    assert_eq!(cpu, cpuacct);
}

#[test]
fn given_pure_v2_host_with_controllers_when_detected_then_v2_base_under_helper_cgroup() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let helper = "sys/fs/cgroup/system.slice/sandrund.service";
    fake_file(
        root,
        &format!("{helper}/cgroup.controllers"),
        "cpuset cpu io memory pids\n",
    );
    let layout = detect_from(V2_CGROUP, V2_MOUNTINFO, root).unwrap();
    assert_eq!(
        layout,
        CgroupLayout::V2 {
            base: root.join(helper).join("sandrun")
        }
    );
}

#[test]
fn given_helper_already_in_its_leaf_when_detected_then_base_is_beside_the_leaf() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let helper = "sys/fs/cgroup/system.slice/sandrund.service";
    fake_file(
        root,
        &format!("{helper}/helper/cgroup.controllers"),
        "cpu memory pids\n",
    );
    let cgroup = "0::/system.slice/sandrund.service/helper\n";
    let layout = detect_from(cgroup, V2_MOUNTINFO, root).unwrap();
    assert_eq!(
        layout,
        CgroupLayout::V2 {
            base: root.join(helper).join("sandrun")
        }
    );
}

#[test]
fn given_v2_without_pids_and_no_v1_when_detected_then_missing_controller() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fake_file(
        root,
        "sys/fs/cgroup/system.slice/sandrund.service/cgroup.controllers",
        "cpu memory\n",
    );
    let error = detect_from(V2_CGROUP, V2_MOUNTINFO, root).unwrap_err();
    assert!(matches!(
        error,
        CgroupError::MissingController {
            controller: "memory",
            ..
        }
    ));
}

#[test]
fn given_no_cgroup_mounts_when_detected_then_missing_controller() {
    let tmp = tempfile::tempdir().unwrap();
    let mountinfo = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n";
    let error = detect_from("0::/\n", mountinfo, tmp.path()).unwrap_err();
    assert!(
        matches!(error, CgroupError::MissingController { .. }),
        "{error}"
    );
}

#[test]
fn given_v1_mount_of_another_subtree_when_detected_then_that_mount_is_not_used() {
    let tmp = tempfile::tempdir().unwrap();
    let cgroup = "4:memory:/outside\n3:pids:/c/x\n2:cpu:/c/x\n1:cpuacct:/c/x\n";
    let mountinfo = "\
35 31 0:32 /c /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
36 31 0:33 /c /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
37 31 0:34 /c /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
38 31 0:35 /c /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct
";
    let error = detect_from(cgroup, mountinfo, tmp.path()).unwrap_err();
    assert!(matches!(
        error,
        CgroupError::MissingController {
            controller: "memory",
            ..
        }
    ));
    let cgroup = "4:memory:/c/x\n3:pids:/c/x\n2:cpu:/c/x\n1:cpuacct:/c/x\n";
    let CgroupLayout::V1 { memory, .. } = detect_from(cgroup, mountinfo, tmp.path()).unwrap()
    else {
        panic!("expected v1");
    };
    assert_eq!(memory, tmp.path().join("sys/fs/cgroup/memory/x"));
}

#[test]
fn given_garbage_proc_cgroup_when_detected_then_parse_error() {
    let tmp = tempfile::tempdir().unwrap();
    let error = detect_from("not a cgroup file", HYBRID_MOUNTINFO, tmp.path()).unwrap_err();
    assert!(matches!(error, CgroupError::Parse { .. }));
}

#[test]
fn given_v1_job_when_only_memory_changes_then_only_the_memory_files_are_rewritten() {
    let fake = Fake::new(V1_FILES, &[], false);
    let manager = fake.v1();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let [memory, pids, cpu, _, _] = job_dirs(&fake, "job-1").try_into().unwrap();
    // Markers: a file that is rewritten loses its marker.
    for file in [pids.join("pids.max"), cpu.join("cpu.cfs_quota_us")] {
        fs::write(&file, "untouched").unwrap();
    }
    let raised = CgroupLimits {
        memory_bytes: 256 << 20,
        ..limits()
    };
    job.set_limits(&raised).unwrap();
    assert_eq!(read(&memory.join("memory.limit_in_bytes")), "268435456");
    assert_eq!(
        read(&memory.join("memory.memsw.limit_in_bytes")),
        "268435456"
    );
    assert_eq!(read(&pids.join("pids.max")), "untouched");
    assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "untouched");
    let more_pids = CgroupLimits { pids: 99, ..raised };
    job.set_limits(&more_pids).unwrap();
    assert_eq!(read(&pids.join("pids.max")), "99");
    job.remove().unwrap();
}

#[test]
fn given_v1_job_when_set_limits_gets_a_zero_limit_then_refused_and_nothing_written() {
    let fake = Fake::new(V1_FILES, &[], false);
    let manager = fake.v1();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let memory = job_dirs(&fake, "job-1").swap_remove(0);
    let zero = CgroupLimits {
        memory_bytes: 0,
        ..limits()
    };
    assert!(matches!(
        job.set_limits(&zero),
        Err(CgroupError::Invalid { .. })
    ));
    assert_eq!(read(&memory.join("memory.limit_in_bytes")), "67108864");
    job.remove().unwrap();
}

#[test]
fn given_v2_job_when_set_limits_then_the_new_limits_are_written_and_cpu_ns_read_alone() {
    let fake = Fake::new(V2_FILES, &[], false);
    let (helper, manager) = fake.v2();
    let mut job = manager.create("job-1", &limits()).unwrap();
    let dir = helper.join("sandrun/job-1");
    let new = CgroupLimits {
        memory_bytes: 128 << 20,
        pids: 32,
        cpu_quota_us: 100_000,
        cpu_period_us: 100_000,
    };
    job.set_limits(&new).unwrap();
    assert_eq!(read(&dir.join("memory.max")), "134217728");
    assert_eq!(read(&dir.join("memory.swap.max")), "0");
    assert_eq!(read(&dir.join("pids.max")), "32");
    assert_eq!(read(&dir.join("cpu.max")), "100000 100000");
    fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
    assert_eq!(job.cpu_ns().unwrap(), 1_500_000);
    job.remove().unwrap();
}

#[test]
fn given_v1_stale_job_missing_from_the_pids_hierarchy_when_cleanup_stale_then_the_rest_is_removed()
{
    let fake = Fake::new(V1_FILES, &[], false);
    let manager = fake.v1();
    // A crash (or another helper) removed the pids directory, where processes are listed.
    fake.cgroup("memory/helper/sandrun/job-w2");
    fake.cgroup("cpu/helper/sandrun/job-w2");
    assert_eq!(manager.cleanup_stale().unwrap(), 1);
    assert!(!fake.root.join("memory/helper/sandrun/job-w2").exists());
    assert!(!fake.root.join("cpu/helper/sandrun/job-w2").exists());
}

#[test]
fn given_jobs_of_each_version_then_only_v2_offers_a_directory_to_clone_into() {
    let fake = Fake::new(V2_FILES, &[], false);
    let (_, manager) = fake.v2();
    let mut job = manager.create("job-1", &limits()).unwrap();
    assert!(
        job.clone_into().is_some(),
        "v2 jobs are cloned into their cgroup"
    );
    job.remove().unwrap();
    let fake = Fake::new(V1_FILES, &[], false);
    let mut job = fake.v1().create("job-1", &limits()).unwrap();
    assert!(job.clone_into().is_none(), "v1 has no CLONE_INTO_CGROUP");
    job.remove().unwrap();
}

#[test]
fn given_favordynmods_offered_when_no_cgroup_mount_has_it_then_migrations_wait_for_rcu() {
    let features = "nsdelegate\nfavordynmods\nmemory_localevents\n";
    let line = |fstype: &str, opts: &str| {
        format!(
            "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - {fstype} cgroup {opts}\n"
        )
    };
    let plain = line("cgroup", "rw,memory") + &line("cgroup2", "rw");
    assert!(migrations_wait_for_rcu_in(features, &plain).unwrap());
    for favoured in [
        line("cgroup", "rw,memory,favordynmods"),
        line("cgroup2", "rw,nsdelegate,favordynmods"),
    ] {
        assert!(!migrations_wait_for_rcu_in(features, &(plain.clone() + &favoured)).unwrap());
    }
    // A tmpfs with the word in its options is not a cgroup mount; an older kernel has no choice.
    let other = line("tmpfs", "rw,favordynmods");
    assert!(migrations_wait_for_rcu_in(features, &(plain.clone() + &other)).unwrap());
    assert!(!migrations_wait_for_rcu_in("nsdelegate\n", &plain).unwrap());
}
