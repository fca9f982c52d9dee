//! The helper's configuration: a root-owned TOML file with the maxima it will ever grant, who may
//! talk to it, the uid range of job slots, the interpreter allow-list and the template directory.
//! Every key has a built-in default, so the helper runs with no file at all.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sandrun_ipc::GrantedLimits;
use serde::Deserialize;

use crate::ids::{GroupId, UserId};

pub use sandrun_ipc::rules::DEFAULT_SOCKET;
use sandrun_ipc::rules::{DEFAULT_TEMPLATE_DIR, DEFAULT_WHEELHOUSE_DIR};

/// The built-in `[maxima]`: the most the helper grants any job.
pub const BUILTIN_MAXIMA: GrantedLimits = GrantedLimits {
    wall_ms: 3_600_000,
    memory_bytes: 2 << 30,
    cpu_ms: 3_600_000,
    pids: 256,
    output_bytes: 64 << 20,
    tmpfs_bytes: 1 << 30,
    file_count: 100_000,
};

/// The built-in `[defaults]`: what a job that asks for nothing gets.
pub const BUILTIN_DEFAULTS: GrantedLimits = GrantedLimits {
    wall_ms: 300_000,
    memory_bytes: 512 << 20,
    cpu_ms: 60_000,
    pids: 64,
    output_bytes: 8 << 20,
    tmpfs_bytes: 256 << 20,
    file_count: 10_000,
};

/// Prepared sandboxes kept by default: a preparation can take 20 ms when the kernel is slow to
/// migrate a task into a cgroup (v1), so a few are kept for jobs arriving back to back.
pub const DEFAULT_WARM_SANDBOXES: u32 = 4;
/// Each prepared sandbox holds a process, a tmpfs, a network namespace and a cgroup.
pub const MAX_WARM_SANDBOXES: u32 = 32;
/// How long a sandbox may take, by default, from its job order to the job's `execve` before the
/// helper gives up on it (the job fails with `sandbox_setup`, `Protocol`/`ETIMEDOUT`).
pub const DEFAULT_START_TIMEOUT_S: u32 = 60;
/// The longest start timeout an operator may set.
pub const MAX_START_TIMEOUT_S: u32 = 600;
/// Default cap on one job's standard input (`JobSpec::stdin_bytes`): 16 MiB, above the gateway's
/// own default of 1 MiB so that the gateway's cap is the one clients meet.
pub const DEFAULT_MAX_STDIN_BYTES: u64 = 16 << 20;
/// Default cap on the output files a template build job (`JobSpec::build`, root's `sandrunctl
/// env build` only) returns: a numpy tree has thousands. Public jobs keep 1000.
pub const DEFAULT_MAX_BUILD_OUTPUT_FILES: u32 = 100_000;
/// The most an operator may set (the helper relays, and the collector visits, that many).
pub const MAX_BUILD_OUTPUT_FILES: u32 = 1_000_000;

/// The file as written; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway_user: Option<String>,
    gateway_group: Option<String>,
    admin_group: Option<String>,
    max_concurrent: Option<u32>,
    warm_sandboxes: Option<u32>,
    start_timeout_s: Option<u32>,
    slot_uid_base: Option<u32>,
    slot_count: Option<u32>,
    mount_point: Option<PathBuf>,
    template_dir: Option<PathBuf>,
    wheelhouse_dir: Option<PathBuf>,
    max_stdin_bytes: Option<u64>,
    max_build_output_files: Option<u32>,
    maxima: Option<GrantedLimits>,
    defaults: Option<GrantedLimits>,
    interpreters: Option<BTreeMap<String, PathBuf>>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Peers with this uid may submit jobs (root always may). `None`: only root.
    pub gateway_uid: Option<UserId>,
    /// Group owning the socket. `None`: root's group.
    pub socket_gid: Option<GroupId>,
    /// Members of this group may send admin requests (root always may).
    pub admin_gid: Option<GroupId>,
    pub max_concurrent: u32,
    /// Sandboxes kept prepared ahead of jobs (namespaces, cgroup, root skeleton), each used for
    /// one job; 0 prepares every sandbox when its job arrives.
    pub warm_sandboxes: u32,
    /// Seconds a sandbox has from its job order to the job's `execve` (1 to 600).
    pub start_timeout_s: u32,
    pub slot_uid_base: u32,
    pub slot_count: u32,
    pub mount_point: PathBuf,
    pub template_dir: PathBuf,
    /// The operator's wheelhouse: wheels a job's `requirements` may install, mounted read-only
    /// at `/wheelhouse` for such a job (`sandrunctl env wheelhouse add` fills it).
    pub wheelhouse_dir: PathBuf,
    /// The most bytes of standard input a job may have (they also count against its tmpfs).
    pub max_stdin_bytes: u64,
    /// The most output files a template build job returns (public jobs: 1000).
    pub max_build_output_files: u32,
    pub maxima: GrantedLimits,
    /// Already clamped to `maxima`.
    pub defaults: GrantedLimits,
    /// Name → absolute path inside the sandbox.
    pub interpreters: BTreeMap<String, PathBuf>,
}

/// A configuration problem: always the operator's to fix.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be opened, examined or read (`step`: "open", "stat" or "read").
    Io {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Someone other than root could have written the file (or it is not a plain file).
    Untrusted {
        path: PathBuf,
        problem: &'static str,
    },
    /// Not TOML, an unknown key, a value of the wrong type.
    Parse(toml::de::Error),
    /// `key` names a user or group the system does not know.
    UnknownName { key: &'static str, name: String },
    /// A value outside what the helper accepts; the message names the key and the rule.
    Invalid(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "configuration error: ")?;
        match self {
            Self::Io { step, path, source } => {
                write!(f, "cannot {step} {}: {source}", path.display())
            }
            Self::Untrusted { path, problem } => write!(f, "{} {problem}", path.display()),
            Self::Parse(e) => write!(f, "{e}"),
            Self::UnknownName { key, name } => write!(f, "{key} {name:?} not found"),
            Self::Invalid(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Parse(e) => Some(e),
            Self::Untrusted { .. } | Self::UnknownName { .. } | Self::Invalid(_) => None,
        }
    }
}

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

impl Config {
    /// Loads `path`, which must be a regular file owned by root and not writable by group or
    /// others. `None` gives the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let raw = match path {
            None => RawConfig::default(),
            // The packaged unit always passes `--config /etc/sandrun/sandrund.toml`, and every
            // key is optional: an absent file means the built-in defaults (said in the log, so
            // a typo in the path is visible), never a refusal to start.
            Some(p) => match read_trusted(p)? {
                Some(text) => parse_raw(&text)?,
                None => {
                    log::info!(
                        "no configuration file: built-in defaults path={}",
                        p.display()
                    );
                    RawConfig::default()
                }
            },
        };
        Config::from_raw(raw, &SystemUsers)
    }

    /// Parses configuration text with a user database (tests pass a fake one).
    #[cfg(test)]
    pub fn from_text(text: &str, users: &dyn UserDb) -> Result<Config, ConfigError> {
        Config::from_raw(parse_raw(text)?, users)
    }

    fn from_raw(raw: RawConfig, users: &dyn UserDb) -> Result<Config, ConfigError> {
        let gateway = match raw.gateway_user {
            Some(name) => named("gateway_user", &name, users.user(&name))?,
            None => users.user("sandrun"),
        };
        let socket_gid = match raw.gateway_group {
            Some(name) => named("gateway_group", &name, users.group(&name))?,
            None => gateway.map(|(_, gid)| gid),
        };
        let admin_gid = match raw.admin_group {
            Some(name) => named("admin_group", &name, users.group(&name))?,
            None => users.group("sandrun-admin"),
        };
        let maxima = raw.maxima.unwrap_or(BUILTIN_MAXIMA);
        let defaults = raw.defaults.unwrap_or(BUILTIN_DEFAULTS).min(&maxima);
        let max_concurrent = raw.max_concurrent.unwrap_or(8);
        let warm_sandboxes = raw.warm_sandboxes.unwrap_or(DEFAULT_WARM_SANDBOXES);
        let slot_count = raw.slot_count.unwrap_or(64);
        let slot_uid_base = raw.slot_uid_base.unwrap_or(200_000);
        let interpreters = raw.interpreters.unwrap_or_else(default_interpreters);
        let cfg = Config {
            gateway_uid: gateway.map(|(uid, _)| uid),
            socket_gid,
            admin_gid,
            max_concurrent,
            warm_sandboxes,
            start_timeout_s: raw.start_timeout_s.unwrap_or(DEFAULT_START_TIMEOUT_S),
            slot_uid_base,
            slot_count,
            mount_point: raw
                .mount_point
                .unwrap_or_else(|| "/run/sandrun/root".into()),
            template_dir: raw
                .template_dir
                .unwrap_or_else(|| DEFAULT_TEMPLATE_DIR.into()),
            wheelhouse_dir: raw
                .wheelhouse_dir
                .unwrap_or_else(|| DEFAULT_WHEELHOUSE_DIR.into()),
            max_stdin_bytes: raw.max_stdin_bytes.unwrap_or(DEFAULT_MAX_STDIN_BYTES),
            max_build_output_files: raw
                .max_build_output_files
                .unwrap_or(DEFAULT_MAX_BUILD_OUTPUT_FILES),
            maxima,
            defaults,
            interpreters,
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.max_concurrent == 0 {
            return Err(err("max_concurrent must be at least 1"));
        }
        if self.warm_sandboxes > MAX_WARM_SANDBOXES {
            return Err(err(format!(
                "warm_sandboxes must be at most {MAX_WARM_SANDBOXES}"
            )));
        }
        if !(1..=MAX_START_TIMEOUT_S).contains(&self.start_timeout_s) {
            return Err(err(format!(
                "start_timeout_s must be between 1 and {MAX_START_TIMEOUT_S}"
            )));
        }
        if self.slot_count < self.max_concurrent {
            return Err(err("slot_count must be at least max_concurrent"));
        }
        if self.slot_uid_base < 1000 || self.slot_uid_base.checked_add(self.slot_count).is_none() {
            return Err(err(
                "slot_uid_base must be >= 1000 and the slot range must fit in u32",
            ));
        }
        if self
            .gateway_uid
            .is_some_and(|u| self.slot_range_contains(u.0))
        {
            return Err(err("the gateway uid lies inside the job slot uid range"));
        }
        let m = &self.maxima;
        if m.wall_ms == 0 || m.memory_bytes < (16 << 20) || m.cpu_ms == 0 || m.pids < 4 {
            return Err(err(
                "maxima too small: wall_ms, cpu_ms > 0, memory >= 16 MiB, pids >= 4",
            ));
        }
        if m.tmpfs_bytes < (1 << 20) || m.file_count < 64 || m.output_bytes == 0 {
            return Err(err(
                "maxima too small: tmpfs >= 1 MiB, file_count >= 64, output > 0",
            ));
        }
        if !(1000..=MAX_BUILD_OUTPUT_FILES).contains(&self.max_build_output_files) {
            return Err(err(format!(
                "max_build_output_files must be between 1000 and {MAX_BUILD_OUTPUT_FILES}"
            )));
        }
        for (name, path) in &self.interpreters {
            if name.is_empty() || name.contains('/') || !path.is_absolute() {
                return Err(err(format!(
                    "interpreter {name:?} must map a bare name to an absolute path"
                )));
            }
        }
        if !self.mount_point.is_absolute()
            || !self.template_dir.is_absolute()
            || !self.wheelhouse_dir.is_absolute()
        {
            return Err(err(
                "mount_point, template_dir and wheelhouse_dir must be absolute",
            ));
        }
        Ok(())
    }

    /// Whether `uid` belongs to a job slot.
    pub fn slot_range_contains(&self, uid: u32) -> bool {
        uid >= self.slot_uid_base && uid - self.slot_uid_base < self.slot_count
    }
}

/// A user or group the file names: it must exist (a built-in name may not; then only root).
fn named<T>(key: &'static str, name: &str, found: Option<T>) -> Result<Option<T>, ConfigError> {
    found.map(Some).ok_or_else(|| ConfigError::UnknownName {
        key,
        name: name.to_owned(),
    })
}

fn parse_raw(text: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(ConfigError::Parse)
}

fn default_interpreters() -> BTreeMap<String, PathBuf> {
    [
        ("python3", "/usr/bin/python3"),
        ("python", "/usr/bin/python3"),
        ("node", "/usr/bin/node"),
        ("bash", "/usr/bin/bash"),
        ("sh", "/usr/bin/sh"),
    ]
    .into_iter()
    .map(|(n, p)| (n.to_owned(), PathBuf::from(p)))
    .collect()
}

/// The text of the configuration file at `path`, or `None` if nothing at all is there. The
/// file is opened without following a symlink (a symlink, dangling or not, is "not a regular
/// file") and checked through its descriptor: a regular file owned by root and not writable by
/// group or others, so what is read is what was checked.
fn read_trusted(path: &Path) -> Result<Option<String>, ConfigError> {
    use std::os::unix::fs::OpenOptionsExt;
    let untrusted = |problem| ConfigError::Untrusted {
        path: path.to_owned(),
        problem,
    };
    let io = |step| {
        move |source| ConfigError::Io {
            step,
            path: path.to_owned(),
            source,
        }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        // Not following a link, not blocking on a FIFO, never becoming a controlling terminal:
        // what is opened is checked through this descriptor before a byte is read.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(untrusted("is not a regular file"))
        }
        Err(e) => return Err(io("open")(e)),
    };
    let meta = file.metadata().map_err(io("stat"))?;
    if !meta.file_type().is_file() {
        return Err(untrusted("is not a regular file"));
    }
    if meta.uid() != 0 {
        return Err(untrusted("must be owned by root"));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted("must not be writable by group or others"));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(io("read"))?;
    Ok(Some(text))
}

/// User and group lookups (the real one reads the system databases through libc).
pub trait UserDb {
    /// uid and primary gid of a user name or numeric uid.
    fn user(&self, name: &str) -> Option<(UserId, GroupId)>;
    /// gid of a group name or numeric gid.
    fn group(&self, name: &str) -> Option<GroupId>;
}

/// The system's user database.
pub struct SystemUsers;

impl UserDb for SystemUsers {
    fn user(&self, name: &str) -> Option<(UserId, GroupId)> {
        if let Ok(uid) = name.parse::<u32>() {
            let u = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten();
            return Some((UserId(uid), GroupId(u.map_or(uid, |u| u.gid.as_raw()))));
        }
        let u = nix::unistd::User::from_name(name).ok().flatten()?;
        Some((UserId(u.uid.as_raw()), GroupId(u.gid.as_raw())))
    }

    fn group(&self, name: &str) -> Option<GroupId> {
        if let Ok(gid) = name.parse::<u32>() {
            return Some(GroupId(gid));
        }
        let g = nix::unistd::Group::from_name(name).ok().flatten()?;
        Some(GroupId(g.gid.as_raw()))
    }
}

/// Whether `uid` is a member of `gid` (primary or supplementary), per the system databases.
pub fn user_in_group(uid: u32, gid: GroupId) -> bool {
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return false;
    };
    if user.gid.as_raw() == gid.0 {
        return true;
    }
    let Ok(name) = CString::new(user.name.clone()) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .map(|groups| groups.iter().any(|g| g.as_raw() == gid.0))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    struct FakeUsers;

    impl UserDb for FakeUsers {
        fn user(&self, name: &str) -> Option<(UserId, GroupId)> {
            (name == "sandrun" || name == "gw").then_some((UserId(999), GroupId(998)))
        }
        fn group(&self, name: &str) -> Option<GroupId> {
            match name {
                "sandrun" => Some(GroupId(998)),
                "sandrun-admin" => Some(GroupId(997)),
                _ => None,
            }
        }
    }

    #[test]
    fn given_no_file_then_builtin_defaults_apply() {
        let c = Config::from_text("", &FakeUsers).unwrap();
        assert_eq!(c.gateway_uid, Some(UserId(999)));
        assert_eq!(c.socket_gid, Some(GroupId(998)));
        assert_eq!(c.admin_gid, Some(GroupId(997)));
        assert_eq!(c.maxima, BUILTIN_MAXIMA);
        assert_eq!(c.interpreters["python3"], PathBuf::from("/usr/bin/python3"));
    }

    #[test]
    fn given_a_config_path_with_nothing_there_then_the_builtin_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::load(Some(&dir.path().join("sandrund.toml"))).unwrap();
        assert_eq!(c.maxima, BUILTIN_MAXIMA);
    }

    #[test]
    fn given_an_empty_root_owned_config_file_then_the_builtin_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandrund.toml");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.maxima, BUILTIN_MAXIMA);
    }

    #[test]
    fn given_a_dangling_symlink_as_config_then_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandrund.toml");
        std::os::unix::fs::symlink(dir.path().join("gone"), &path).unwrap();
        let e = Config::load(Some(&path)).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    /// The packaged example (packaging/etc/sandrund.toml) with every `# key = value` line and
    /// every `# [table]` line uncommented: it must parse with deny_unknown_fields (so a renamed or
    /// removed key fails here) and give exactly the built-in values it claims to show.
    #[test]
    fn given_the_packaged_example_uncommented_then_it_parses_to_the_builtin_defaults() {
        let text = include_str!("../../packaging/etc/sandrund.toml");
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(uncommented.contains("[maxima]"), "{uncommented}");
        let example = Config::from_text(&uncommented, &FakeUsers).unwrap();
        let builtin = Config::from_text("", &FakeUsers).unwrap();
        assert_eq!(format!("{example:?}"), format!("{builtin:?}"));
    }

    #[test]
    fn given_a_start_timeout_then_it_must_be_between_1_and_600_seconds() {
        let c = Config::from_text("start_timeout_s = 5", &FakeUsers).unwrap();
        assert_eq!(c.start_timeout_s, 5);
        assert_eq!(
            Config::from_text("", &FakeUsers).unwrap().start_timeout_s,
            60
        );
        for bad in ["start_timeout_s = 0", "start_timeout_s = 601"] {
            let e = Config::from_text(bad, &FakeUsers).unwrap_err();
            assert!(e.to_string().contains("start_timeout_s"), "{bad}: {e}");
        }
    }

    #[test]
    fn given_unknown_keys_then_the_file_is_refused() {
        let e = Config::from_text("max_concurent = 3", &FakeUsers).unwrap_err();
        assert!(e.to_string().contains("max_concurent"), "{e}");
        assert!(Config::from_text("[maxima]\nwall_ms = 1\nbogus = 2", &FakeUsers).is_err());
    }

    #[test]
    fn given_defaults_above_maxima_then_defaults_are_clamped() {
        let text = "[maxima]\nwall_ms = 1000\nmemory_bytes = 33554432\ncpu_ms = 500\npids = 8\n\
                    output_bytes = 100\ntmpfs_bytes = 2097152\nfile_count = 100\n";
        let c = Config::from_text(text, &FakeUsers).unwrap();
        assert_eq!(c.defaults.wall_ms, 1000);
        assert_eq!(c.defaults.memory_bytes, 32 << 20);
        assert_eq!(c.defaults.pids, 8);
    }

    #[test]
    fn given_an_explicit_missing_user_then_it_is_an_error() {
        assert!(Config::from_text("gateway_user = \"nobody-here\"", &FakeUsers).is_err());
    }

    #[test]
    fn given_gateway_uid_inside_slot_range_then_it_is_refused() {
        let e = Config::from_text("slot_uid_base = 990\nslot_count = 20", &FakeUsers);
        assert!(e.is_err());
        let e = Config::from_text(
            "slot_uid_base = 1000\nslot_count = 8\nmax_concurrent = 9",
            &FakeUsers,
        );
        assert!(e.is_err());
    }

    #[test]
    fn given_relative_interpreter_path_then_it_is_refused() {
        assert!(Config::from_text("[interpreters]\npy = \"python3\"", &FakeUsers).is_err());
    }

    #[test]
    fn given_a_group_writable_config_file_then_it_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(read_trusted(&p).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        if nix::unistd::geteuid().is_root() {
            assert!(read_trusted(&p).is_ok());
        }
    }
}
