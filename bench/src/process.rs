//! Figures 8 (whole process) and 9 (throughput through `sandrunctl`): what a user sees who
//! runs a sandbox from a shell, next to the sandboxes they would pick instead, all measured in
//! the same run.
//!
//! Every sample is a fork+exec of the real binary (`std::process::Command`, stdin and stdout
//! `/dev/null`), timed from the spawn to the exit being reaped. Figure 8 interleaves one sample
//! of every tool per round (the order rotating from round to round), then measures the CPU each
//! tool costs per job in batches of its own. Figure 9 runs `sh -c 'exit 0'` jobs on 2, 8 and 16
//! threads, `sandrunctl` and bubblewrap in alternating batches, counting errors.
//!
//! CPU per job is read two ways over each batch: the whole machine's busy time from `/proc/stat`
//! (everything: the helper, the sandbox processes, kernel workers such as the network namespace
//! teardown, but also any other work on the machine), and the bench cgroup's `cpuacct.usage`
//! (the bench, its helper and every process either starts, but no kernel worker).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::env::Daemon;
use crate::machine::{self, CgroupCpu, CpuSpent};
use crate::spawn::BWRAP_ARGS;
use crate::stats::{Row, Summary};
use crate::{usize_as_f64, BenchError};

/// The sandboxes compared. Bubblewrap is the reference of every ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Sandrunctl,
    Bwrap,
    Crun,
    Firejail,
    ForkExec,
}

impl Tool {
    fn label(self) -> &'static str {
        match self {
            Tool::Sandrunctl => "sandrunctl run --",
            Tool::Bwrap => "bwrap --unshare-all, ro /usr, tmpfs, proc, dev",
            Tool::Crun => "crun run, OCI bundle (ro bind /usr; pid/net/ipc/uts/mnt ns)",
            Tool::Firejail => "firejail --noprofile --net=none --private-dev --private-tmp",
            Tool::ForkExec => "plain fork+exec (no sandbox)",
        }
    }
}

/// Firejail's options: no profile, no network, a private `/dev` and `/tmp`, no capabilities,
/// no new privileges, its default seccomp filter.
const FIREJAIL_ARGS: [&str; 8] = [
    "--quiet",
    "--noprofile",
    "--net=none",
    "--private-dev",
    "--private-tmp",
    "--caps.drop=all",
    "--nonewprivs",
    "--seccomp",
];

const TRUE: [&str; 1] = ["/bin/true"];
const SH_EXIT: [&str; 3] = ["/bin/sh", "-c", "exit 0"];

/// How each tool is started, and which could not be (with the reason).
pub struct Runner {
    sandrunctl: PathBuf,
    socket: PathBuf,
    crun: Result<Crun, String>,
    firejail: Result<(), String>,
}

impl Runner {
    /// Finds the tools and checks each runs `/bin/true` once; `sandrunctl` and bubblewrap must.
    pub fn new(bin_dir: &Path, socket: &Path) -> Result<Runner, BenchError> {
        let mut runner = Runner {
            sandrunctl: bin_dir.join("sandrunctl"),
            socket: socket.to_path_buf(),
            crun: Err("not set up yet".into()),
            firejail: Ok(()),
        };
        for tool in [Tool::Sandrunctl, Tool::Bwrap] {
            runner.run_once(tool, &TRUE).map_err(|e| {
                BenchError::job(format!("{} cannot run /bin/true: {e}", tool.label()))
            })?;
        }
        runner.crun = Crun::set_up();
        if runner.crun.is_ok() {
            if let Err(e) = runner.run_once(Tool::Crun, &TRUE) {
                runner.crun = Err(format!("crun run failed here: {e}"));
            }
        }
        runner.firejail = match runner.run_once(Tool::Firejail, &TRUE) {
            Ok(_) => Ok(()),
            Err(e) => Err(not_installed_or(e, "firejail")),
        };
        Ok(runner)
    }

    /// Why `tool` is not measured in this run, if it is not.
    fn unavailable(&self, tool: Tool) -> Option<&str> {
        match tool {
            Tool::Crun => self.crun.as_ref().err().map(String::as_str),
            Tool::Firejail => self.firejail.as_ref().err().map(String::as_str),
            Tool::Sandrunctl | Tool::Bwrap | Tool::ForkExec => None,
        }
    }

    fn command(&self, tool: Tool, argv: &[&str]) -> Result<Command, BenchError> {
        let cmd = match tool {
            Tool::Sandrunctl => {
                let mut c = Command::new(&self.sandrunctl);
                c.arg("--socket").arg(&self.socket).args(["run", "--"]);
                c.args(argv);
                c
            }
            Tool::Bwrap => {
                let mut c = Command::new("bwrap");
                c.args(BWRAP_ARGS).args(argv);
                c
            }
            Tool::Crun => match &self.crun {
                Ok(crun) => crun.command(argv)?,
                Err(e) => return Err(BenchError::job(format!("crun: {e}"))),
            },
            Tool::Firejail => {
                let mut c = Command::new("firejail");
                c.args(FIREJAIL_ARGS).args(argv);
                c
            }
            Tool::ForkExec => {
                let (program, args) = argv
                    .split_first()
                    .ok_or_else(|| BenchError::job("empty argv".into()))?;
                let mut c = Command::new(program);
                c.args(args);
                c
            }
        };
        Ok(cmd)
    }

    /// One job, from the spawn of the tool's process to its exit being reaped.
    fn run_once(&self, tool: Tool, argv: &[&str]) -> Result<Duration, BenchError> {
        let mut cmd = self.command(tool, argv)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        let started = Instant::now();
        let status = cmd
            .status()
            .map_err(|e| BenchError::io("starting a sandbox", e))?;
        let elapsed = started.elapsed();
        if !status.success() {
            return Err(BenchError::job(format!(
                "{} {argv:?} exited with {status}",
                tool.label()
            )));
        }
        Ok(elapsed)
    }
}

fn not_installed_or(e: BenchError, package: &str) -> String {
    match e {
        BenchError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            format!("not installed (Debian package {package}; packaging/deps.sh --bench)")
        }
        other => format!("fails here: {other}"),
    }
}

/// crun's OCI bundle: a read-only root of empty mount points and the usual symlinks, `/usr`
/// bind-mounted read-only, fresh `/proc`, tmpfs `/dev` and `/tmp`, new pid, network, ipc, uts
/// and mount namespaces, no capabilities, `noNewPrivileges`; crun's default cgroup manager
/// (cgroupfs: a cgroup per container, removed at its exit).
struct Crun {
    bundle: tempfile::TempDir,
    /// crun refuses to run on a "hybrid" cgroup layout (v1 controllers plus a cgroup2 mount
    /// with a controller enabled, as on this development VM). Then it runs in a mount
    /// namespace of its own where the cgroup2 mount is detached, held by this process.
    mount_ns: Option<(OwnedFd, Daemon)>,
    next_id: AtomicUsize,
}

/// The cgroup2 mount of a hybrid layout.
const UNIFIED: &str = "/sys/fs/cgroup/unified";

impl Crun {
    fn set_up() -> Result<Crun, String> {
        match Command::new("crun")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => return Err(format!("crun --version exited with {s}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err("not installed (Debian package crun; packaging/deps.sh --bench)".into())
            }
            Err(e) => return Err(format!("crun --version: {e}")),
        }
        let bundle = tempfile::Builder::new()
            .prefix("sandrun-bench-crun")
            .tempdir()
            .map_err(|e| format!("bundle directory: {e}"))?;
        let rootfs = bundle.path().join("rootfs");
        for dir in ["usr", "proc", "dev", "tmp"] {
            std::fs::create_dir_all(rootfs.join(dir)).map_err(|e| format!("rootfs: {e}"))?;
        }
        for (link, target) in [
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("bin", "usr/bin"),
        ] {
            std::os::unix::fs::symlink(target, rootfs.join(link))
                .map_err(|e| format!("rootfs: {e}"))?;
        }
        let config = oci_config(&TRUE);
        std::fs::write(bundle.path().join("config.json"), config.to_string())
            .map_err(|e| format!("config.json: {e}"))?;
        let mount_ns = if hybrid_cgroups() {
            Some(private_mount_ns_without_unified()?)
        } else {
            None
        };
        Ok(Crun {
            bundle,
            mount_ns,
            next_id: AtomicUsize::new(0),
        })
    }

    fn command(&self, argv: &[&str]) -> Result<Command, BenchError> {
        if argv != TRUE {
            return Err(BenchError::job(format!(
                "the crun bundle runs /bin/true, not {argv:?}"
            )));
        }
        let id = format!(
            "sandrun-bench-{}-{}",
            std::process::id(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = Command::new("crun");
        c.arg("run").arg("--bundle").arg(self.bundle.path()).arg(id);
        if let Some((ns, _)) = &self.mount_ns {
            let fd = ns.as_raw_fd();
            // SAFETY: the closure runs in the forked child before exec and makes one system
            // call (async-signal-safe, no allocation). `fd` belongs to `self.mount_ns`, which
            // outlives the spawn, and is still open in the child when the call runs (it is
            // close-on-exec, so crun itself does not inherit it).
            unsafe {
                c.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNS) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        Ok(c)
    }
}

/// The OCI runtime configuration of the crun bundle, running `argv`.
fn oci_config(argv: &[&str]) -> serde_json::Value {
    let none: [&str; 0] = [];
    serde_json::json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": argv,
            "env": ["PATH=/usr/bin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": none, "effective": none, "inheritable": none,
                "permitted": none, "ambient": none
            },
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "bench",
        "mounts": [
            {"destination": "/usr", "type": "bind", "source": "/usr",
             "options": ["rbind", "ro", "nosuid", "nodev"]},
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755", "size=1m"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}
            ]
        }
    })
}

/// Whether `/sys/fs/cgroup/unified` is a cgroup2 mount with a controller enabled next to v1
/// controllers: the layout crun refuses.
fn hybrid_cgroups() -> bool {
    std::fs::read_to_string(Path::new(UNIFIED).join("cgroup.controllers"))
        .is_ok_and(|c| !c.trim().is_empty())
        && Path::new("/sys/fs/cgroup/cpuacct").exists()
}

/// A `sleep` holding a private mount namespace in which the cgroup2 mount is detached (the
/// host's mounts are untouched), and a descriptor of that namespace for `setns`.
fn private_mount_ns_without_unified() -> Result<(OwnedFd, Daemon), String> {
    let mut cmd = Command::new("sleep");
    cmd.arg("1000000").stdin(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and makes only system calls
    // (async-signal-safe) on static, NUL-terminated strings; it allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::umount2(c"/sys/fs/cgroup/unified".as_ptr(), libc::MNT_DETACH) == 0;
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("private mount namespace for crun: {e}"))?;
    let holder = Daemon {
        child,
        name: "crun mount namespace",
    };
    let ns = std::fs::File::open(format!("/proc/{}/ns/mnt", holder.pid()))
        .map_err(|e| format!("opening the mount namespace for crun: {e}"))?;
    Ok((OwnedFd::from(ns), holder))
}

/// The tools of figure 8 in this run, and the lines for those skipped.
fn whole_process_tools(runner: &Runner) -> (Vec<Tool>, Vec<Row>) {
    let mut tools = Vec::new();
    let mut skipped = Vec::new();
    for tool in [
        Tool::Sandrunctl,
        Tool::Bwrap,
        Tool::Crun,
        Tool::Firejail,
        Tool::ForkExec,
    ] {
        match runner.unavailable(tool) {
            None => tools.push(tool),
            Some(reason) => skipped.push(Row::skipped(
                FIG8,
                &format!("{} /bin/true", tool.label()),
                "ms",
                reason,
            )),
        }
    }
    skipped.push(Row::skipped(
        FIG8,
        "isolate --run /bin/true",
        "ms",
        "isolate is not packaged by Debian",
    ));
    (tools, skipped)
}

const FIG8: &str = "8 whole process";
const FIG9: &str = "9 sandrunctl throughput";

/// Machine CPU busy while the bench does nothing, in per cent of all CPUs, over `window`.
fn background_busy(window: Duration) -> Result<Row, BenchError> {
    let before = machine::machine_busy_ms()?;
    let started = Instant::now();
    std::thread::sleep(window);
    let busy = machine::machine_busy_ms()? - before;
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let percent = 100.0 * busy / (wall_ms * usize_as_f64(cpus));
    Ok(Row {
        figure: String::new(),
        what: format!(
            "machine busy while the bench idles ({:.0} s; load {})",
            window.as_secs_f64(),
            machine::load_average()
        ),
        unit: "% of CPUs",
        value: Summary::single(percent, 1),
        reference: None,
        target: "other work on the machine: /proc/stat CPU counts it too".into(),
    })
}

/// Figure 8: `runs` rounds of one `/bin/true` per tool (rotating order), then CPU batches.
pub fn figure_whole_process(
    runner: &Runner,
    cgroup: Option<&CgroupCpu>,
    runs: usize,
) -> Result<Vec<Row>, BenchError> {
    let (tools, skipped) = whole_process_tools(runner);
    let mut background = background_busy(Duration::from_secs(1))?;
    background.figure = FIG8.into();
    for _ in 0..5 {
        for &tool in &tools {
            runner.run_once(tool, &TRUE)?;
        }
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); tools.len()];
    for round in 0..runs {
        for k in 0..tools.len() {
            let i = (k + round) % tools.len();
            samples[i].push(runner.run_once(tools[i], &TRUE)?);
        }
    }
    // CPU: per tool, two batches of its own, the tools alternating.
    let batch = (runs / 2).max(10);
    let mut cpu = vec![CpuSpent::default(); tools.len()];
    for _ in 0..2 {
        for (i, &tool) in tools.iter().enumerate() {
            let ((), spent) = machine::measure(cgroup, batch, || {
                (0..batch).try_for_each(|_| runner.run_once(tool, &TRUE).map(drop))
            })?;
            cpu[i].add(spent);
        }
    }
    let at = |t: Tool| tools.iter().position(|&x| x == t);
    let bwrap = at(Tool::Bwrap).ok_or_else(|| BenchError::job("no bwrap".into()))?;
    let reference = Summary::of_ms(&samples[bwrap]);
    let bwrap_cpu = cpu[bwrap];
    let mut rows = Vec::new();
    for (i, &tool) in tools.iter().enumerate() {
        let value = Summary::of_ms(&samples[i]);
        let target = if tool == Tool::Sandrunctl {
            format!(
                "p50 ≤ 0.5 × bwrap, p90 ≤ 1.5 × own p50 (here p90 = {:.2} × p50)",
                value.p90 / value.median
            )
        } else {
            String::new()
        };
        rows.push(Row {
            figure: FIG8.into(),
            what: format!("{} /bin/true, spawn → exit", tool.label()),
            unit: "ms",
            value,
            reference: Some(("bwrap, same run".into(), reference)),
            target,
        });
    }
    rows.extend(skipped);
    for (i, &tool) in tools.iter().enumerate() {
        rows.push(Row {
            figure: FIG8.into(),
            what: format!("machine CPU per job (/proc/stat), {}", tool.label()),
            unit: "ms",
            value: Summary::single(cpu[i].machine_per_job(), cpu[i].jobs),
            reference: Some((
                "bwrap".into(),
                Summary::single(bwrap_cpu.machine_per_job(), bwrap_cpu.jobs),
            )),
            target: if tool == Tool::Sandrunctl {
                "≤ 3.5 ms".into()
            } else {
                String::new()
            },
        });
    }
    for tool in [Tool::Sandrunctl, Tool::Bwrap] {
        let Some(i) = at(tool) else { continue };
        if let (Some(ms), Some(bw)) = (cpu[i].cgroup_per_job(), bwrap_cpu.cgroup_per_job()) {
            rows.push(Row {
                figure: FIG8.into(),
                what: format!(
                    "bench cgroup CPU per job (cpuacct; no kernel workers), {}",
                    tool.label()
                ),
                unit: "ms",
                value: Summary::single(ms, cpu[i].jobs),
                reference: Some(("bwrap".into(), Summary::single(bw, bwrap_cpu.jobs))),
                target: String::new(),
            });
        }
    }
    rows.push(background);
    Ok(rows)
}

/// What one batch of figure 9 got.
struct Batch {
    elapsed: Duration,
    latencies: Vec<Duration>,
    errors: usize,
}

/// `jobs` runs of `sh -c 'exit 0'` through `tool` on `level` threads; failures are counted
/// (the first three printed), not fatal.
fn batch(runner: &Runner, tool: Tool, level: usize, jobs: usize) -> Batch {
    let next = AtomicUsize::new(0);
    let errors = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(jobs));
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..level {
            s.spawn(|| {
                let mut mine = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < jobs {
                    match runner.run_once(tool, &SH_EXIT) {
                        Ok(d) => mine.push(d),
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("  {} error: {e}", tool.label());
                            }
                        }
                    }
                }
                if let Ok(mut all) = latencies.lock() {
                    all.extend(mine);
                }
            });
        }
    });
    Batch {
        elapsed: started.elapsed(),
        latencies: latencies.into_inner().unwrap_or_default(),
        errors: errors.into_inner(),
    }
}

/// Everything measured of one tool at one concurrency.
#[derive(Default)]
struct Totals {
    elapsed: Duration,
    latencies: Vec<Duration>,
    errors: usize,
    jobs: usize,
    cpu: CpuSpent,
    /// Jobs per second of each batch, for the spread.
    batch_rates: Vec<f64>,
}

impl Totals {
    /// "41–71": the slowest and the fastest batch.
    fn spread(&self) -> String {
        let min = self
            .batch_rates
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let max = self.batch_rates.iter().copied().fold(0.0, f64::max);
        format!("{min:.0}–{max:.0}")
    }

    fn rate(&self) -> f64 {
        usize_as_f64(self.jobs - self.errors.min(self.jobs)) / self.elapsed.as_secs_f64()
    }
}

/// Figure 9: `jobs` `sh -c 'exit 0'` per tool at concurrency 2, 8 and 16, in `batches` batches
/// per tool, `sandrunctl` and bubblewrap alternating (AB, BA, AB, ...).
pub fn figure_ctl_throughput(
    runner: &Runner,
    cgroup: Option<&CgroupCpu>,
    jobs: usize,
    batches: usize,
) -> Result<Vec<Row>, BenchError> {
    let mut background = background_busy(Duration::from_secs(1))?;
    background.figure = FIG9.into();
    let mut rows = Vec::new();
    for level in [2usize, 8, 16] {
        let mut ours = Totals::default();
        let mut bwrap = Totals::default();
        let batches = batches.max(1);
        let half = jobs.div_ceil(batches);
        for round in 0..batches {
            let order = if round % 2 == 0 {
                [Tool::Sandrunctl, Tool::Bwrap]
            } else {
                [Tool::Bwrap, Tool::Sandrunctl]
            };
            for tool in order {
                let (b, spent) = machine::measure::<_, BenchError>(cgroup, half, || {
                    Ok(batch(runner, tool, level, half))
                })?;
                let t = if tool == Tool::Sandrunctl {
                    &mut ours
                } else {
                    &mut bwrap
                };
                let batch_rate = usize_as_f64(half) / b.elapsed.as_secs_f64();
                eprintln!(
                    "  c={level} {}: {batch_rate:.0} jobs/s, {} errors",
                    tool.label(),
                    b.errors
                );
                t.batch_rates.push(batch_rate);
                t.elapsed += b.elapsed;
                t.latencies.extend(b.latencies);
                t.errors += b.errors;
                t.jobs += half;
                t.cpu.add(spent);
            }
        }
        let counts = format!(
            "errors: {}, bwrap {}; batches {} jobs/s, bwrap {}",
            ours.errors,
            bwrap.errors,
            ours.spread(),
            bwrap.spread()
        );
        let target = if level == 16 {
            format!("≥ 1.5 × bwrap, 0 errors ({counts})")
        } else {
            counts
        };
        rows.push(Row {
            figure: FIG9.into(),
            what: format!(
                "{} sh -c 'exit 0', concurrency {level}",
                Tool::Sandrunctl.label()
            ),
            unit: "jobs/s",
            value: Summary::single(ours.rate(), ours.jobs),
            reference: Some((
                "bwrap, same concurrency".into(),
                Summary::single(bwrap.rate(), bwrap.jobs),
            )),
            target,
        });
        rows.push(Row {
            figure: FIG9.into(),
            what: format!("latency per job, concurrency {level}"),
            unit: "ms",
            value: Summary::of_ms(&ours.latencies),
            reference: Some(("bwrap".into(), Summary::of_ms(&bwrap.latencies))),
            target: String::new(),
        });
        rows.push(Row {
            figure: FIG9.into(),
            what: format!("machine CPU per job (/proc/stat), concurrency {level}"),
            unit: "ms",
            value: Summary::single(ours.cpu.machine_per_job(), ours.jobs),
            reference: Some((
                "bwrap".into(),
                Summary::single(bwrap.cpu.machine_per_job(), bwrap.jobs),
            )),
            target: if level == 16 {
                "≤ 3.5 ms".into()
            } else {
                String::new()
            },
        });
        if let (Some(ms), Some(bw)) = (ours.cpu.cgroup_per_job(), bwrap.cpu.cgroup_per_job()) {
            rows.push(Row {
                figure: FIG9.into(),
                what: format!("bench cgroup CPU per job (cpuacct), concurrency {level}"),
                unit: "ms",
                value: Summary::single(ms, ours.jobs),
                reference: Some(("bwrap".into(), Summary::single(bw, bwrap.jobs))),
                target: String::new(),
            });
        }
    }
    rows.push(background);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_tool_that_is_not_installed_then_the_skip_names_its_package() {
        let missing = BenchError::io(
            "starting a sandbox",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        let reason = not_installed_or(missing, "firejail");
        assert!(
            reason.starts_with("not installed (Debian package firejail"),
            "{reason}"
        );
        let failed = not_installed_or(BenchError::job("exited with 1".into()), "firejail");
        assert_eq!(failed, "fails here: exited with 1");
    }

    #[test]
    fn given_argv_then_the_oci_config_runs_it_read_only_without_capabilities() {
        let c = oci_config(&TRUE);
        assert_eq!(c["process"]["args"], serde_json::json!(["/bin/true"]));
        assert_eq!(c["root"]["readonly"], true);
        assert_eq!(c["process"]["noNewPrivileges"], true);
        assert_eq!(
            c["process"]["capabilities"]["bounding"],
            serde_json::json!([])
        );
        let ns: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .map(|a| a.iter().filter_map(|n| n["type"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(ns, ["pid", "network", "ipc", "uts", "mount"]);
    }
}
