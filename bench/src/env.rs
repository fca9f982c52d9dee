//! The benchmark's environment: its own cgroup (so its helper never touches the job cgroups of
//! another helper running on the same machine), a private `sandrund` and a private
//! `sandrun-gateway --dev`, each with raised limits, all torn down on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A failed step of setting up the environment, naming what failed.
#[derive(Debug)]
pub struct EnvError {
    pub step: &'static str,
    pub detail: String,
}

impl std::fmt::Display for EnvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.step, self.detail)
    }
}

impl std::error::Error for EnvError {}

fn env_err(step: &'static str, detail: impl std::fmt::Display) -> EnvError {
    EnvError {
        step,
        detail: detail.to_string(),
    }
}

/// The cgroup v1 controllers the helper uses; the bench moves itself into a child of its own
/// cgroup in each, so its helper's `sandrun/` subtree is private.
const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];

/// The bench's private cgroup (v1 only; on v2 the helper already moves itself into a leaf of
/// its own cgroup, which is the bench's).
pub struct BenchCgroup {
    dirs: Vec<PathBuf>,
}

impl BenchCgroup {
    /// Moves this process into `<own cgroup>/sandrun-bench-<pid>` in each v1 controller.
    pub fn enter() -> Result<BenchCgroup, EnvError> {
        let text = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| env_err("reading /proc/self/cgroup", e))?;
        let mut dirs = Vec::new();
        for controller in V1_CONTROLLERS {
            let Some(own) = own_cgroup(&text, controller) else {
                continue;
            };
            let mount = Path::new("/sys/fs/cgroup").join(controller);
            if !mount.join("cgroup.procs").exists() {
                continue;
            }
            let dir = mount
                .join(own.trim_start_matches('/'))
                .join(format!("sandrun-bench-{}", std::process::id()));
            if !dirs.contains(&dir) {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| env_err("creating the bench cgroup", e))?;
                std::fs::write(dir.join("cgroup.procs"), "0")
                    .map_err(|e| env_err("entering the bench cgroup", e))?;
                dirs.push(dir);
            }
        }
        Ok(BenchCgroup { dirs })
    }

    /// The bench's cgroup in the `cpuacct` hierarchy, if it made one there.
    pub fn cpuacct(&self) -> Option<crate::machine::CgroupCpu> {
        self.dirs
            .iter()
            .find(|d| d.starts_with("/sys/fs/cgroup/cpuacct"))
            .and_then(|d| crate::machine::CgroupCpu::new(d))
    }
}

impl Drop for BenchCgroup {
    /// Moves back to the parent and removes the bench's cgroups, deepest first (best effort).
    fn drop(&mut self) {
        for dir in &self.dirs {
            if let Some(parent) = dir.parent() {
                let _ = std::fs::write(parent.join("cgroup.procs"), "0");
            }
            remove_tree(dir);
        }
    }
}

fn own_cgroup<'a>(proc_cgroup: &'a str, controller: &str) -> Option<&'a str> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        list.split(',').any(|c| c == controller).then_some(path)
    })
}

/// `rmdir` of every directory below and including `dir`, deepest first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A child process killed (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Daemon {
    pub child: Child,
    pub name: &'static str,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill takes plain integers; the pid is our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Both daemons, their files, and where to reach them.
pub struct Daemons {
    /// The gateway first: it must stop before the helper it talks to.
    pub gateway: Daemon,
    pub helper: Daemon,
    pub socket: PathBuf,
    /// The helper's `template_dir` (root-owned, 0755, in the bench's temp dir; figure 11
    /// builds its `numpy` template there).
    pub template_dir: PathBuf,
    pub gateway_addr: SocketAddr,
    /// PEM of the gateway's `--dev` certificate.
    pub ca_pem: String,
    _dir: tempfile::TempDir,
}

/// Helper jobs at once; the throughput figure runs 16 at a time.
pub const MAX_CONCURRENT: u32 = 16;

fn helper_config(template_dir: &Path) -> String {
    format!(
        "gateway_user = \"sandrun\"\nmax_concurrent = {MAX_CONCURRENT}\nslot_count = 64\n\
         slot_uid_base = 300000\ntemplate_dir = \"{}\"\n",
        template_dir.display()
    )
}

/// The bench is one client (127.0.0.1) measuring throughput, not fairness: it may hold every
/// connection (200 WebSocket subscribers) and every upload slot.
fn gateway_config() -> String {
    format!(
        "max_running = {MAX_CONCURRENT}\nqueue_capacity = 8192\nmax_body_bytes = {body}\n\
         [client_limits]\ncpu_seconds_per_minute = 100000000\nconcurrent_jobs = 100000\n\
         jobs_per_hour = 100000000\n\
         [retention]\nttl_s = 900\nfailed_ttl_s = 900\nmemory_budget_bytes = {budget}\n\
         [http]\nmax_connections = 4096\nmax_connections_per_client = 4096\n\
         [client_shares]\nconnections_percent = 100\nuploads_percent = 100\n",
        body = 200u64 << 20,
        budget = 4u64 << 30,
    )
}

impl Daemons {
    /// Starts `sandrund` and `sandrun-gateway` from `bin_dir` (release builds).
    pub fn start(bin_dir: &Path) -> Result<Daemons, EnvError> {
        let dir = tempfile::Builder::new()
            .prefix("sandrun-bench")
            .tempdir()
            .map_err(|e| env_err("creating the temp dir", e))?;
        // The gateway runs as `sandrun` and must reach the socket inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| env_err("chmod of the temp dir", e))?;
        let socket = dir.path().join("sandrund.sock");
        let template_dir = dir.path().join("templates");
        std::fs::create_dir(&template_dir).map_err(|e| env_err("creating templates/", e))?;
        std::fs::set_permissions(&template_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| env_err("chmod of templates/", e))?;
        let helper = start_helper(bin_dir, dir.path(), &socket, &template_dir)?;
        let ca_path = dir.path().join("gateway-ca.pem");
        let (gateway, gateway_addr) = start_gateway(bin_dir, dir.path(), &socket, &ca_path)?;
        let ca_pem = std::fs::read_to_string(&ca_path)
            .map_err(|e| env_err("reading the gateway's dev certificate", e))?;
        Ok(Daemons {
            gateway,
            helper,
            socket,
            template_dir,
            gateway_addr,
            ca_pem,
            _dir: dir,
        })
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), EnvError> {
    std::fs::write(path, text).map_err(|e| env_err("writing a config file", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| env_err("chmod of a config file", e))
}

fn start_helper(
    bin_dir: &Path,
    dir: &Path,
    socket: &Path,
    template_dir: &Path,
) -> Result<Daemon, EnvError> {
    let config = dir.join("sandrund.toml");
    write_private(&config, &helper_config(template_dir))?;
    let child = Command::new(bin_dir.join("sandrund"))
        .arg("--socket")
        .arg(socket)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| env_err("starting sandrund", e))?;
    let daemon = Daemon {
        child,
        name: "sandrund",
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if Instant::now() > deadline {
            return Err(env_err("waiting for sandrund's socket", socket.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(daemon)
}

fn start_gateway(
    bin_dir: &Path,
    dir: &Path,
    socket: &Path,
    ca_path: &Path,
) -> Result<(Daemon, SocketAddr), EnvError> {
    let config = dir.join("gateway.toml");
    write_private(&config, &gateway_config())?;
    let mut child = Command::new(bin_dir.join("sandrun-gateway"))
        .args(["--dev", "--listen", "127.0.0.1:0"])
        .arg("--dev-cert-out")
        .arg(ca_path)
        .arg("--helper-socket")
        .arg(socket)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| env_err("starting sandrun-gateway", e))?;
    let stdout = child.stdout.take();
    let daemon = Daemon {
        child,
        name: "sandrun-gateway",
    };
    let stdout = stdout.ok_or_else(|| env_err("reading the gateway's stdout", "no pipe"))?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| env_err("reading the gateway's stdout", e))?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| env_err("parsing the gateway's address", line.trim()))?;
    Ok((daemon, addr))
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64), EnvError> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| env_err("reading status", e))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| env_err("parsing status", format!("{path}: no {name}")))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time of a process so far, in milliseconds: its own (user + system) and that of its reaped
/// children (for `sandrund`, the sandboxes it forked).
pub fn cpu_ms(pid: u32) -> Result<(f64, f64), EnvError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| env_err("reading stat", e))?;
    parse_cpu_ms(&text, clock_ticks_per_second())
        .ok_or_else(|| env_err("parsing stat", format!("{path}: no CPU times")))
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf takes a plain integer and reads no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // Display only: tick rates are small integers.
    #[allow(clippy::cast_precision_loss)]
    let ticks = ticks as f64;
    if ticks > 0.0 {
        ticks
    } else {
        100.0
    }
}

/// Fields 14 to 17 of `/proc/<pid>/stat` (utime, stime, cutime, cstime), counted after the
/// command name, which may hold spaces and parentheses.
fn parse_cpu_ms(stat: &str, ticks_per_s: f64) -> Option<(f64, f64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(str::parse::<f64>)
        .collect::<Result<_, _>>()
        .ok()?;
    let ms = |ticks: f64| ticks * 1000.0 / ticks_per_s;
    match fields.as_slice() {
        [utime, stime, cutime, cstime] => Some((ms(utime + stime), ms(cutime + cstime))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_v1_proc_cgroup_then_each_controller_finds_its_line() {
        let text = "4:memory:/a/b\n2:cpu,cpuacct:/\n0::/x\n";
        assert_eq!(own_cgroup(text, "memory"), Some("/a/b"));
        assert_eq!(own_cgroup(text, "cpuacct"), Some("/"));
        assert_eq!(own_cgroup(text, "pids"), None);
    }

    #[test]
    fn given_a_stat_line_with_a_spaced_name_then_cpu_times_are_read_after_it() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 30 20 7 3 20 0 4 0";
        assert_eq!(parse_cpu_ms(stat, 100.0), Some((500.0, 100.0)));
        assert_eq!(parse_cpu_ms("42 (x) S 1", 100.0), None);
    }
}
