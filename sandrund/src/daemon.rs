//! Start-up of the `sandrund` binary: check privileges, clean the process, load the
//! configuration, prepare directories and the socket, compile the seccomp filter, detect cgroups,
//! and hand over to the event loop.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::cgroup;
use crate::config::{Config, DEFAULT_SOCKET};
use crate::sandbox::seccomp::SeccompProgram;
use crate::server::{systemd, Server};
use crate::sys;

/// Why the helper did not start. Each message says what failed; the variant says whose fault
/// it is.
#[derive(Debug)]
#[non_exhaustive]
pub(crate) enum StartupError {
    /// The command line is wrong (or `--help` was asked for): the message is the usage.
    Usage(String),
    /// The operator started the helper without root or without a capability it needs.
    Privileges(String),
    /// The operator's configuration, or the files and directories it names.
    Config(String),
    /// The host lacks something the helper needs (a syscall, cgroup controllers, seccomp).
    Host(String),
    /// The event loop failed after start-up (an I/O error the helper cannot recover from).
    Serving(String),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::Usage(m)
            | StartupError::Privileges(m)
            | StartupError::Config(m)
            | StartupError::Host(m)
            | StartupError::Serving(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for StartupError {}

/// Command-line options. Parsed by hand: two flags do not justify a parser in a root process.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Options {
    pub socket: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

const USAGE: &str = "usage: sandrund [--socket PATH] [--config FILE]";

/// Parses `args` (without the program name).
pub(crate) fn parse_args(args: &[String]) -> Result<Options, StartupError> {
    let mut opts = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| StartupError::Usage(format!("{name} needs a value\n{USAGE}")))
        };
        match a.as_str() {
            "--socket" => opts.socket = Some(value("--socket")?),
            "--config" => opts.config = Some(value("--config")?),
            "-h" | "--help" => return Err(StartupError::Usage(USAGE.to_owned())),
            other => {
                let msg = format!("unknown argument {other:?}\n{USAGE}");
                return Err(StartupError::Usage(msg));
            }
        }
    }
    Ok(opts)
}

/// The helper must run as root with the capabilities its sandbox setup needs.
pub(crate) fn self_check() -> Result<(), StartupError> {
    use caps::{CapSet, Capability};
    if !nix::unistd::geteuid().is_root() {
        let msg = "sandrund must run as root (it creates namespaces, cgroups and mounts)";
        return Err(StartupError::Privileges(msg.into()));
    }
    for cap in [
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_SETUID,
        Capability::CAP_SETGID,
        Capability::CAP_SETPCAP,
        Capability::CAP_KILL,
        Capability::CAP_NET_ADMIN,
        Capability::CAP_CHOWN,
        Capability::CAP_FOWNER,
        Capability::CAP_DAC_OVERRIDE,
        // Each sandbox's /dev/null, zero, full, random and urandom are fresh nodes (mknod).
        Capability::CAP_MKNOD,
    ] {
        if !caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false) {
            return Err(StartupError::Privileges(format!(
                "sandrund lacks {cap} in its effective capability set"
            )));
        }
    }
    Ok(())
}

/// Closes every inherited descriptor except stdio and a systemd-passed socket, clears the
/// environment (keeping only what systemd integration reads), and sets a strict umask.
/// Returns the systemd socket (fd 3), owned, if this process was socket-activated.
pub(crate) fn sanitize_process() -> Result<Option<OwnedFd>, StartupError> {
    let keep_from_systemd = systemd::activation_requested().map_err(cfg_err)?;
    let activated = sys::take_inherited_fds(keep_from_systemd).map_err(|e| {
        StartupError::Host(format!(
            "closing inherited descriptors: {}",
            std::io::Error::from(e)
        ))
    })?;
    let keep = [
        "NOTIFY_SOCKET",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "RUST_LOG",
    ];
    for (k, _) in std::env::vars_os() {
        if !keep.iter().any(|w| k == *w) {
            std::env::remove_var(k);
        }
    }
    std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    restrict_self()?;
    Ok(activated)
}

/// What the helper can take away from itself without hindering its work: it never executes
/// anything, so no exec may ever gain privileges (`NO_NEW_PRIVS`, inherited by every sandbox);
/// and the descriptor soft limit goes up to the hard limit, since each job holds several.
fn restrict_self() -> Result<(), StartupError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let host = StartupError::Host;
    sys::pin_malloc_thresholds(MALLOC_THRESHOLD);
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| host(format!("cannot set NO_NEW_PRIVS: {e}")))?;
    let (_, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| host(format!("getrlimit: {e}")))?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .map_err(|e| host(format!("cannot raise RLIMIT_NOFILE to {hard}: {e}")))
}

/// A start-up failure in what the operator configured.
fn cfg_err(msg: String) -> StartupError {
    StartupError::Config(msg)
}

/// Creates the socket directory and binds the socket with mode 0660 and the gateway's group. The
/// socket is created under umask 0177 so it is never more open than 0600 before the chmod.
fn bind_socket(path: &Path, cfg: &Config) -> Result<UnixListener, StartupError> {
    if let Some(dir) = path.parent() {
        create_public_dirs(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| cfg_err(format!("cannot remove stale socket: {e}")))?,
        Ok(_) => {
            return Err(cfg_err(format!(
                "{} exists and is not a socket",
                path.display()
            )))
        }
        Err(_) => {}
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(|e| cfg_err(format!("cannot bind {}: {e}", path.display())))?;
    let gid = cfg.socket_gid.map(|g| nix::unistd::Gid::from_raw(g.0));
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), gid)
        .map_err(|e| cfg_err(format!("cannot chown {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| cfg_err(format!("cannot chmod {}: {e}", path.display())))?;
    Ok(listener)
}

/// Creates `dir` and its missing parents with mode 0755, whatever the process umask (077 after
/// `sanitize_process`) would make of it.
fn create_public_dirs(dir: &Path) -> Result<(), StartupError> {
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o022));
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir);
    umask(old);
    made.map_err(|e| cfg_err(format!("cannot create {}: {e}", dir.display())))
}

/// The root-owned, private directory that job mount namespaces mount their tmpfs on. Its parents
/// (often the socket's directory, `/run/sandrun`) are created 0755: only the mount point itself
/// is private.
fn prepare_mount_point(path: &Path) -> Result<(), StartupError> {
    if let Some(parent) = path.parent() {
        create_public_dirs(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(cfg_err(format!("cannot create {}: {e}", path.display()))),
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| cfg_err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(cfg_err(format!("{} is not a directory", path.display())));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| cfg_err(e.to_string()))
}

/// The gateway must be able to reach the socket: every directory above it must be searchable
/// by others (or by the socket's group). Fails with a clear message instead of a gateway that
/// gets "permission denied" on every job.
fn check_socket_reachable(path: &Path, cfg: &Config) -> Result<(), StartupError> {
    use std::os::unix::fs::MetadataExt;
    if cfg.gateway_uid.is_none() {
        // Root-only use (sandrunctl): a private directory is fine.
        return Ok(());
    }
    let mut dir = path.parent();
    while let Some(d) = dir {
        let meta = std::fs::metadata(d)
            .map_err(|e| cfg_err(format!("cannot stat {}: {e}", d.display())))?;
        let mode = meta.mode();
        let by_group = cfg.socket_gid.is_some_and(|g| g.0 == meta.gid()) && mode & 0o010 != 0;
        if mode & 0o001 == 0 && !by_group {
            return Err(cfg_err(format!(
                "{} (mode {:o}) is not searchable by the gateway: it could not reach {}",
                d.display(),
                mode & 0o7777,
                path.display()
            )));
        }
        dir = d.parent();
    }
    Ok(())
}

/// Jobs make the helper allocate and free megabyte buffers (output bursts, bundles). glibc raises
/// its mmap threshold after such frees, so later large buffers come from the heap, fragment it
/// and keep the RSS high. Fixed thresholds keep large buffers in their own mappings, returned to
/// the kernel on free, so the helper's RSS stays flat over thousands of jobs.
const MALLOC_THRESHOLD: libc::c_int = 128 * 1024;

/// On cgroup v1 each job's output collector joins the job's cgroup on the job's path; tells the
/// operator when that waits for an RCU grace period, and what removes the wait.
fn warn_if_migrations_wait() {
    match cgroup::migrations_wait_for_rcu() {
        Ok(false) => {}
        Ok(true) => log::warn!(
            "cgroup v1 without favordynmods: every output collector and sandbox waits for an RCU \
             grace period (several ms) to join its cgroup, a collector's on its job's path, and \
             other cgroup changes on the host wait behind it; mount a cgroup hierarchy with \
             favordynmods or boot with cgroup_favordynmods=1 (docs/operations.md, \"cgroup v1 \
             hosts\")"
        ),
        Err(e) => log::warn!("cannot tell whether cgroup migrations wait for RCU: {e}"),
    }
}

/// The whole start-up, then the loop. Returns the process exit code.
pub fn main_with_args(args: &[String]) -> i32 {
    if let Err(e) = crate::logger::init() {
        eprintln!("sandrund: {e}");
        return 1;
    }
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            eprintln!("sandrund: {e}");
            1
        }
    }
}

fn run(args: &[String]) -> Result<(), StartupError> {
    let opts = parse_args(args)?;
    // Everything below forks with raw clones, which is sound only in a single-threaded process.
    let one_thread = crate::sys::SingleThreaded::check().map_err(|e| match e {
        nix::errno::Errno::EBUSY => StartupError::Host(
            "sandrund must be single-threaded to clone its sandboxes, and another thread is \
             running (a preloaded library?)"
                .into(),
        ),
        e => StartupError::Host(format!("cannot count this process's threads: {e}")),
    })?;
    self_check()?;
    let activated = sanitize_process()?;
    let collector = crate::sandbox::collector::open_executable().map_err(StartupError::Host)?;
    let cfg = Config::load(opts.config.as_deref()).map_err(|e| cfg_err(e.to_string()))?;
    prepare_mount_point(&cfg.mount_point)?;
    let cgroups = cgroup::detect().map_err(|e| StartupError::Host(format!("cgroups: {e}")))?;
    match cgroups.cleanup_stale() {
        Ok(0) => {}
        Ok(n) => log::warn!("removed job cgroups left by an earlier helper count={}", n),
        Err(e) => {
            let msg = format!("cannot clean stale job cgroups: {e}");
            return Err(StartupError::Host(msg));
        }
    }
    if matches!(cgroups.layout(), cgroup::CgroupLayout::V1 { .. }) {
        warn_if_migrations_wait();
    }
    let filter = SeccompProgram::job();
    let listener = match systemd::take_activated_listener(activated).map_err(cfg_err)? {
        Some(l) => {
            log::info!("using the socket passed by systemd");
            l
        }
        None => {
            let path = opts.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into());
            let l = bind_socket(&path, &cfg)?;
            check_socket_reachable(&path, &cfg)?;
            log::info!("listening socket={}", path.display());
            l
        }
    };
    log::info!(
        "sandrund ready max_concurrent={} gateway_uid={:?} cgroups={:?}",
        cfg.max_concurrent,
        cfg.gateway_uid.map(|u| u.0),
        cgroups.layout()
    );
    let mut server = Server::new(cfg, listener, cgroups, filter, collector, one_thread)
        .map_err(|e| StartupError::Serving(e.to_string()))?;
    if let Err(e) = systemd::notify("READY=1\nSTATUS=serving") {
        log::warn!("{e}");
    }
    server
        .run()
        .map_err(|e| StartupError::Serving(format!("event loop failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn given_a_default_layout_then_the_socket_directory_stays_searchable() {
        use std::os::unix::fs::MetadataExt;
        // As after sanitize_process.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let run = dir.path().join("run-sandrun");
        prepare_mount_point(&run.join("root")).unwrap();
        assert_eq!(std::fs::metadata(&run).unwrap().mode() & 0o777, 0o755);
        assert_eq!(
            std::fs::metadata(run.join("root")).unwrap().mode() & 0o777,
            0o700
        );
        let cfg = Config::from_text("gateway_user = \"0\"", &crate::config::SystemUsers).unwrap();
        assert!(check_socket_reachable(&run.join("s.sock"), &cfg).is_ok());
        assert!(check_socket_reachable(&run.join("root").join("s.sock"), &cfg).is_err());
        nix::sys::stat::umask(old);
    }

    #[test]
    fn given_flags_then_they_are_parsed() {
        let o = parse_args(&args(&["--socket", "/tmp/s", "--config", "/etc/c.toml"])).unwrap();
        assert_eq!(o.socket, Some("/tmp/s".into()));
        assert_eq!(o.config, Some("/etc/c.toml".into()));
        assert!(parse_args(&args(&["--socket"])).is_err());
        assert!(parse_args(&args(&["--bogus"])).is_err());
    }
}
