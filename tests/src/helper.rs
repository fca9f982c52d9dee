//! Starting and stopping a real `sandrund` for one test.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cgroup::{self, TestCgroup};
use crate::slots::{Config, SlotLease};

/// The value of `SANDRUN_TEST_SECRET` in every helper's environment; a job must never see it.
pub const SECRET_ENV: (&str, &str) = ("SANDRUN_TEST_SECRET", "do-not-leak-7c1e9f");

/// Upper bound on how long start-up or a single read may take before the test is declared hung.
/// This is a hang guard, not an assertion about speed.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

/// A running `sandrund`, killed and reaped on drop. Its stderr goes to a log file that is printed
/// when the test panics.
pub struct Helper {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    cgroup: TestCgroup,
    slot_uid_base: u32,
    slot_count: u32,
    /// Keeps the slot uid range this helper runs jobs under from being handed to another test
    /// until the helper is gone (dropped after [`Drop::drop`] has killed it).
    _slots: Arc<SlotLease>,
}

impl Helper {
    /// Writes `config`'s TOML (root-owned, 0600; `mount_point` added under the test's temporary
    /// directory unless given), starts the helper in its own cgroup and waits until its socket
    /// accepts connections. The helper holds `config`'s slot uid range while it lives.
    pub fn start(config: &Config) -> Helper {
        Helper::start_under(&[], config)
    }

    /// Like [`Helper::start`], with the helper run as `WRAPPER... sandrund ARGS` (for example
    /// under `sandrun-deny-syscalls`, see [`deny_syscalls_binary`]).
    pub fn start_under(wrapper: &[&std::ffi::OsStr], config: &Config) -> Helper {
        let slots = config.lease();
        let config_toml = config.toml();
        crate::require_root();
        ensure_built();
        let dir = tempfile::Builder::new()
            .prefix("sandrun-test-")
            .tempdir()
            .expect("tempdir");
        // Other uids (protocol tests) must reach the socket; its own mode still guards it.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
        let config = full_config(dir.path(), config_toml);
        let config_path = dir.path().join("sandrund.toml");
        write_private(&config_path, &config);
        let cgroup = TestCgroup::create(&unique_name()).expect("create the helper's cgroup");
        let socket = dir.path().join("s.sock");
        let log = dir.path().join("sandrund.log");
        let mut helper = Helper {
            child: None,
            socket,
            log,
            cgroup,
            slot_uid_base: toml_u32(&config, "slot_uid_base").unwrap_or(200_000),
            slot_count: toml_u32(&config, "slot_count").unwrap_or(64),
            _slots: slots,
            dir,
        };
        helper.spawn(wrapper, &config_path);
        helper.wait_ready();
        helper
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The test's temporary directory (0755, root-owned).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The helper's host pid.
    pub fn pid(&self) -> i32 {
        let child = self.child.as_ref().expect("helper is running");
        i32::try_from(child.id()).expect("pid fits in i32")
    }

    /// The slot uids this helper may use.
    pub fn slot_uids(&self) -> std::ops::Range<u32> {
        self.slot_uid_base..self.slot_uid_base + self.slot_count
    }

    pub fn cgroup(&self) -> &TestCgroup {
        &self.cgroup
    }

    /// The helper's stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the helper process is still alive.
    pub fn is_alive(&mut self) -> bool {
        let child = self.child.as_mut().expect("helper was started");
        matches!(child.try_wait(), Ok(None))
    }

    /// Runs `sandrunctl --socket <socket> ARGS` and returns its output.
    pub fn ctl(&self, args: &[&str]) -> Output {
        crate::retry_while_busy("run sandrunctl", || self.ctl_command(args).output())
    }

    /// A `sandrunctl` command for this helper, to customise (uid, current dir) before running.
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.ctl_binary());
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd
    }

    /// A copy of `sandrunctl` that any uid can execute (the build tree may not be reachable).
    fn ctl_binary(&self) -> PathBuf {
        let copy = self.dir.path().join("sandrunctl");
        if !copy.exists() {
            // A hard link opens nothing for writing, so no concurrent fork can make the binary
            // "busy" (ETXTBSY); copy only across file systems.
            let original = bin_dir().join("sandrunctl");
            if fs::hard_link(&original, &copy).is_err() {
                fs::copy(&original, &copy).expect("copy sandrunctl");
                fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod");
            }
        }
        copy
    }

    fn spawn(&mut self, wrapper: &[&std::ffi::OsStr], config_path: &Path) {
        let log = fs::File::create(&self.log).expect("create helper log");
        let procs = self.cgroup.open_procs().expect("open cgroup.procs");
        let raw = cgroup::raw_fds(&procs);
        let helper = bin_dir().join("sandrund");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(helper);
                cmd
            }
            None => Command::new(helper),
        };
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(config_path)
            .env(SECRET_ENV.0, SECRET_ENV.1)
            .env(
                "RUST_LOG",
                std::env::var("SANDRUN_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: the closure only calls write(2) on inherited descriptors (async-signal-safe)
        // and does not allocate.
        unsafe { cmd.pre_exec(move || cgroup::join_in_child(&raw)) };
        self.child = Some(cmd.spawn().expect("spawn sandrund"));
        drop(procs);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if !self.is_alive() {
                panic!("sandrund exited during start-up; its log:\n{}", self.log());
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sandrund never accepted; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Stops a daemon the way systemd would: SIGTERM, up to 10 s to finish, then SIGKILL; reaped.
pub fn terminate(mut child: Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child);
        }
        if std::thread::panicking() {
            eprintln!(
                "----- sandrund log ({}) -----\n{}",
                self.log.display(),
                self.log()
            );
        }
        self.cgroup.remove();
        detach_leftover_mounts(self.dir.path());
    }
}

/// Lazily unmounts anything a helper left mounted under the test directory, deepest first, so
/// that removing the directory cannot reach into a mount. A leak check fails before this runs.
fn detach_leftover_mounts(dir: &Path) {
    let needle = dir.display().to_string();
    let mut points: Vec<String> = crate::host::mounts_mentioning(&needle)
        .iter()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|p| p.starts_with(&needle))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        eprintln!("sandrun-tests: detaching leftover mount {p}");
        let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// `target/debug` (or the profile directory the tests were built in).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test binary> -> target/debug
    let deps = exe.parent().expect("test binary has a directory");
    if deps.ends_with("deps") {
        deps.parent().expect("deps has a parent").to_owned()
    } else {
        deps.to_owned()
    }
}

/// The probe binary, built with this package.
pub fn probe_binary() -> PathBuf {
    bin_dir().join("sandrun-probe")
}

/// `sandrun-deny-syscalls`, built with this package.
pub fn deny_syscalls_binary() -> PathBuf {
    bin_dir().join("sandrun-deny-syscalls")
}

/// Builds every daemon binary the tests start (`sandrund`, `sandrunctl`, `sandrun-gateway`)
/// once per test binary, then checks they are all there: this package cannot depend on another
/// package's binaries. Set `SANDRUN_TESTS_SKIP_BUILD=1` to use what is there (a missing binary
/// still fails the test, naming it).
pub fn ensure_built() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        if std::env::var_os("SANDRUN_TESTS_SKIP_BUILD").is_none() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let out = Command::new(cargo)
                .args([
                    "build",
                    "-p",
                    "sandrund",
                    "-p",
                    "sandrunctl",
                    "-p",
                    "sandrun-gateway",
                    "-p",
                    "sandrun-collect",
                    "--bins",
                ])
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .output()
                .expect("run cargo build -p sandrund -p sandrun-collect -p sandrunctl -p sandrun-gateway");
            assert!(
                out.status.success(),
                "cargo build -p sandrund -p sandrun-collect -p sandrunctl -p sandrun-gateway failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for bin in [
            "sandrund",
            "sandrun-outputs",
            "sandrunctl",
            "sandrun-gateway",
            "sandrun-probe",
        ] {
            let path = bin_dir().join(bin);
            assert!(
                path.exists(),
                "{} is missing: run `cargo build --workspace --bins`",
                path.display()
            );
        }
    });
}

fn full_config(dir: &Path, config: &str) -> String {
    if config.contains("mount_point") {
        return config.to_owned();
    }
    format!("mount_point = \"{}\"\n{config}", dir.join("root").display())
}

fn write_private(path: &Path, text: &str) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("create config file");
    f.write_all(text.as_bytes()).expect("write config file");
}

/// The value of a top-level `key = N` line.
fn toml_u32(config: &str, key: &str) -> Option<u32> {
    config.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "sandrun-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
