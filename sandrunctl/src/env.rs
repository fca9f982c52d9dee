//! `sandrunctl env build | list | show | rm`: environment templates.
//!
//! A build has two steps, and root runs neither installer:
//! 1. **Download** as the unprivileged build user (`sandrun-build`), outside any job, with the
//!    host's network: `python3 -m pip download --only-binary=:all:` into a private directory.
//!    Wheels only, so no package's build code runs. The wheels are then copied into a
//!    root-owned input directory, hashed while copied (these hashes go into the lock).
//!    `npm:` lines go the same way: as the build user, `npm install --package-lock-only
//!    --ignore-scripts` resolves a `package-lock.json` (name, version, registry integrity of every
//!    package) and `npm ci --ignore-scripts` fills a private npm cache with the tarballs; no
//!    package script runs. The lock and the cache's `_cacache` tree are copied root-owned into the
//!    input (directories and regular files only).
//! 2. **Install** offline, in an ordinary job sandbox of the helper (per-slot uid, no network):
//!    `pip install --no-index --find-links /work/wheels --target /work/env`, then `npm ci
//!    --offline --ignore-scripts --no-bin-links --cache /work/npm/cache --prefix /work/env` (npm
//!    checks every tarball against the lock's integrity). The job is a template build
//!    (`JobSpec::build`): it may return up to the helper's `max_build_output_files` files, not
//!    1000. The tree comes back
//!    through the job-output path into `<template_dir>/.staging-NAME-<rand>`, gets its lock file
//!    (`sandrun-lock.json`) and is published with `renameat2(RENAME_EXCHANGE)` (or
//!    `RENAME_NOREPLACE` for a new name). A failed build removes its staging and changes nothing.
//!
//! A replaced or removed template is renamed to `.retired-NAME-<rand>` (new jobs no longer find
//! it; a running job's mount still shows it, because renaming does not change its files) and is
//! deleted only when the helper reports no running job.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{renameat2, OFlag, RenameFlags};
use nix::unistd::User;
use sandrun_ipc::rules::DEFAULT_TEMPLATE_DIR;
use sandrun_ipc::{AdminRequest, AdminResponse};
use sha2::{Digest, Sha256};

use crate::cli::RunArgs;
use crate::error::CtlError;

/// The unprivileged user that downloads packages.
pub(crate) const BUILD_USER: &str = "sandrun-build";
/// The lock file at the top of every template.
pub(crate) use sandrun_ipc::rules::LOCK_FILE;
/// The lock format's version string.
const LOCK_FORMAT: &str = "sandrun-lock/1";
/// The interpreter whose wheels are downloaded and that installs them (the sandbox's).
const PYTHON: &str = "/usr/bin/python3";
/// npm (Debian's `npm`, which runs on `/usr/bin/node`): resolves and fetches as the build user,
/// installs offline in the sandbox.
const NPM: &str = "/usr/bin/npm";
/// The node that runs npm and the template's jobs (recorded in the lock).
const NODE: &str = "/usr/bin/node";
/// Most entries copied from the npm cache into the build input.
const MAX_NPM_CACHE_FILES: usize = 200_000;
/// Largest `package.json` / `package-lock.json` read back from the build user's directory.
const MAX_NPM_LOCK_BYTES: u64 = 16 << 20;
/// Largest definition file read.
const MAX_DEFINITION_BYTES: u64 = 1 << 20;
/// Name prefixes of the entries `env` itself keeps in the template directory.
const STAGING_PREFIX: &str = ".staging-";
const BUILD_PREFIX: &str = ".build-";
const RETIRED_PREFIX: &str = ".retired-";

/// The install step, run inside the sandbox as the job's uid. pip's own output goes to stderr so
/// that `sandrunctl --json` prints one object on stdout.
const INSTALL_PY: &str = r#"import os, shutil, subprocess, sys
def run(cmd, env):
    r = subprocess.run(cmd, stdout=sys.stderr, env=env)
    if r.returncode != 0:
        sys.exit(r.returncode)
os.makedirs("/work/env", exist_ok=True)
if any(n.endswith(".whl") for n in os.listdir("/work/wheels")):
    run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", "/work/wheels",
         "--target", "/work/env", "--no-cache-dir", "--disable-pip-version-check",
         "--no-compile", "-r", "/work/requirements.txt"], dict(os.environ, PIP_NO_INPUT="1"))
node = None
if os.path.isdir("/work/npm"):
    for f in ("package.json", "package-lock.json"):
        shutil.copyfile("/work/npm/" + f, "/work/env/" + f)
    os.makedirs("/tmp/npm-home", exist_ok=True)
    env = dict(os.environ, HOME="/tmp/npm-home", npm_config_update_notifier="false")
    run(["npm", "ci", "--offline", "--ignore-scripts", "--no-bin-links", "--no-audit",
         "--no-fund", "--cache", "/work/npm/cache", "--prefix", "/work/env"], env)
    node = subprocess.run(["node", "--version"], capture_output=True, text=True,
                          check=True).stdout.strip().lstrip("v")
files = 0
for d, dirs, names in os.walk("/work/env"):
    for n in dirs + names:
        if os.path.islink(os.path.join(d, n)):
            sys.exit(f"the installed tree has a symbolic link: {os.path.join(d, n)}")
    files += len(names)
v = sys.version_info
with open("/work/build-info.txt", "w") as out:
    out.write(f"uid={os.getuid()}\npython={v.major}.{v.minor}.{v.micro}\nfiles={files}\n")
    if node is not None:
        out.write(f"node={node}\n")
"#;

/// `sandrunctl env ...`.
#[derive(Debug, clap::Args)]
pub(crate) struct EnvArgs {
    /// The helper's `template_dir` (the two must agree).
    #[arg(long, global = true, default_value = DEFAULT_TEMPLATE_DIR)]
    pub(crate) template_dir: PathBuf,
    #[command(subcommand)]
    pub(crate) command: EnvCommand,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum EnvCommand {
    /// Build (or rebuild) template NAME from a definition file and publish it atomically.
    Build {
        name: String,
        /// Python requirements, in pip's requirements-file syntax, and `npm: <name>[@<range>]`
        /// lines.
        #[arg(long)]
        from: PathBuf,
        /// Wall-clock and CPU limit of the offline install job, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
        /// Memory limit of the offline install job, in MiB.
        #[arg(long, default_value_t = 1024)]
        memory_mb: u64,
    },
    /// List templates with their lock hashes.
    List,
    /// Show a template's lock file.
    Show { name: String },
    /// Remove a template (deleted once no job is running; new jobs no longer find it at once).
    Rm { name: String },
    /// The wheelhouse jobs install their `requirements` from: add, list.
    Wheelhouse(crate::wheelhouse::WheelhouseArgs),
}

/// Runs one `env` subcommand.
pub(crate) fn dispatch(socket: &Path, args: &EnvArgs, json: bool) -> Result<i32, CtlError> {
    let dir = args.template_dir.as_path();
    match &args.command {
        EnvCommand::Build {
            name,
            from,
            timeout_s,
            memory_mb,
        } => {
            let b = BuildArgs {
                name,
                from,
                template_dir: dir,
                timeout_s: *timeout_s,
                memory_mb: *memory_mb,
            };
            build(socket, &b, json)
        }
        EnvCommand::List => list(dir, json),
        EnvCommand::Show { name } => show(dir, name, json),
        EnvCommand::Rm { name } => rm(socket, dir, name, json),
        EnvCommand::Wheelhouse(args) => crate::wheelhouse::dispatch(args, json),
    }
}

/// What `env build` was asked for.
pub(crate) struct BuildArgs<'a> {
    pub(crate) name: &'a str,
    pub(crate) from: &'a Path,
    pub(crate) template_dir: &'a Path,
    pub(crate) timeout_s: u64,
    pub(crate) memory_mb: u64,
}

/// `env build NAME --from FILE`.
pub(crate) fn build(socket: &Path, args: &BuildArgs<'_>, json: bool) -> Result<i32, CtlError> {
    check_name(args.name)?;
    let def = Definition::read(args.from)?;
    let user = build_user()?;
    let dir = args.template_dir;
    check_template_dir(dir)?;
    let tag = format!("{}-{}", args.name, random_hex()?);
    let build_dir = Scratch(dir.join(format!("{BUILD_PREFIX}{tag}")));
    let staging = Scratch(dir.join(format!("{STAGING_PREFIX}{tag}")));
    let input = build_dir.0.join("input");
    mkdir(&build_dir.0, 0o700)?;
    mkdir(&input, 0o755)?;
    mkdir(&input.join("wheels"), 0o755)?;
    write_file(&input.join("requirements.txt"), def.python.as_bytes())?;
    write_file(&input.join("install.py"), INSTALL_PY.as_bytes())?;
    let wheels = if def.has_python {
        download(
            &user,
            &input.join("requirements.txt"),
            &input.join("wheels"),
        )?
    } else {
        Vec::new()
    };
    let npm = if def.npm.is_empty() {
        Vec::new()
    } else {
        mkdir(&input.join("npm"), 0o755)?;
        download_npm(&user, &def.npm, &input.join("npm"))?
    };
    let info = install(socket, args, &input, &staging.0)?;
    if !npm.is_empty() && info.node.is_none() {
        return Err(failed(
            args.name,
            "the install step did not report node's version",
        ));
    }
    let tree = staging.0.join("env");
    check_installed(&tree, &wheels, &npm, info.files)?;
    let lock = Lock {
        name: args.name,
        def: &def,
        info: &info,
        wheels: &wheels,
        npm: &npm,
        downloader_uid: user.uid.as_raw(),
    }
    .render();
    write_file(&tree.join(LOCK_FILE), &lock)?;
    fix_modes(&tree, true)?;
    let lock_hash = hex(&Sha256::digest(&lock));
    let retired = publish(dir, args.name, &tree)?;
    drop((staging, build_dir));
    let kept = purge_retired(socket, dir, retired.is_some());
    if json {
        let obj = serde_json::json!({
            "name": args.name, "lock_sha256": lock_hash, "packages": wheels.len(),
            "npm_packages": npm.len(), "installer_uid": info.uid, "interpreter": info.python,
            "node": info.node, "retired_kept": kept,
        });
        println!("{obj}");
    } else {
        println!(
            "built {} ({} packages, {} npm packages, python {}, installer uid {}): lock sha256 \
             {lock_hash}",
            args.name,
            wheels.len(),
            npm.len(),
            info.python,
            info.uid
        );
    }
    Ok(0)
}

/// `env list`: every template with its lock hash.
pub(crate) fn list(template_dir: &Path, json: bool) -> Result<i32, CtlError> {
    let names = template_names(template_dir)?;
    let rows: Vec<_> = names
        .iter()
        .map(|n| {
            let hash = read_lock(&template_dir.join(n)).map(|b| hex(&Sha256::digest(&b)));
            (n, hash)
        })
        .collect();
    if json {
        let list: Vec<_> = rows
            .iter()
            .map(|(n, h)| serde_json::json!({"name": n, "lock_sha256": h}))
            .collect();
        println!("{}", serde_json::json!({ "templates": list }));
    } else {
        for (n, h) in &rows {
            println!("{n}\t{}", h.as_deref().unwrap_or("(no lock file)"));
        }
    }
    Ok(0)
}

/// `env show NAME`: the template's lock file.
pub(crate) fn show(template_dir: &Path, name: &str, json: bool) -> Result<i32, CtlError> {
    check_name(name)?;
    let lock = read_lock(&template_dir.join(name)).ok_or_else(|| {
        failed(
            name,
            "no such template, or it has no readable sandrun-lock.json",
        )
    })?;
    let hash = hex(&Sha256::digest(&lock));
    let parsed: serde_json::Value = serde_json::from_slice(&lock)
        .map_err(|e| failed(name, &format!("sandrun-lock.json: {e}")))?;
    if json {
        println!(
            "{}",
            serde_json::json!({"name": name, "lock_sha256": hash, "lock": parsed})
        );
    } else {
        println!("{name}: lock sha256 {hash}");
        println!(
            "{}",
            serde_json::to_string_pretty(&parsed).unwrap_or_default()
        );
    }
    Ok(0)
}

/// `env rm NAME`: retires the template at once, deletes it once no job runs.
pub(crate) fn rm(
    socket: &Path,
    template_dir: &Path,
    name: &str,
    json: bool,
) -> Result<i32, CtlError> {
    check_name(name)?;
    let path = template_dir.join(name);
    match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => {}
        _ => return Err(failed(name, "no such template")),
    }
    let retired = template_dir.join(format!("{RETIRED_PREFIX}{name}-{}", random_hex()?));
    fs::rename(&path, &retired).map_err(|e| failed(name, &format!("retiring: {e}")))?;
    let kept = purge_retired(socket, template_dir, true);
    if json {
        println!(
            "{}",
            serde_json::json!({"removed": name, "retired_kept": kept})
        );
    } else if kept > 0 {
        println!("removed {name}; jobs are running, so {kept} retired tree(s) are kept until the next env rm or build");
    } else {
        println!("removed {name}");
    }
    Ok(0)
}

/// The parsed definition file.
struct Definition {
    /// The Python requirements, as pip's requirements-file syntax (passed to pip as they are).
    python: String,
    /// Whether `python` holds any requirement (a definition may be npm-only).
    has_python: bool,
    /// The `npm:` lines' specs, `[@scope/]name[@range]`, checked by [`check_npm_spec`].
    npm: Vec<String>,
    sha256: String,
}

impl Definition {
    fn read(path: &Path) -> Result<Definition, CtlError> {
        let io = |source| CtlError::InputIo {
            path: path.to_owned(),
            source,
        };
        let mut bytes = Vec::new();
        fs::File::open(path)
            .map_err(io)?
            .take(MAX_DEFINITION_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let input = |reason: &str| CtlError::Input {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        if bytes.len() as u64 > MAX_DEFINITION_BYTES {
            return Err(input("the definition is larger than 1 MiB"));
        }
        let text = String::from_utf8(bytes).map_err(|_| input("the definition is not UTF-8"))?;
        let mut python = String::new();
        let mut has_python = false;
        let mut npm = Vec::new();
        for line in text.lines() {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("npm:") {
                let spec = rest.split('#').next().unwrap_or_default().trim();
                check_npm_spec(spec).map_err(|e| input(&format!("npm: {spec:?}: {e}")))?;
                npm.push(spec.to_owned());
                // pip reads the same file: the line becomes a comment there.
                python.push_str("# ");
                python.push_str(line);
                python.push('\n');
                continue;
            }
            if t.starts_with("-e") || t.starts_with("--editable") {
                return Err(input("editable requirements cannot go into a template"));
            }
            has_python |= !t.is_empty() && !t.starts_with('#');
            python.push_str(line);
            python.push('\n');
        }
        if !has_python && npm.is_empty() {
            return Err(input("the definition lists no requirement"));
        }
        let sha256 = hex(&Sha256::digest(text.as_bytes()));
        Ok(Definition {
            python,
            has_python,
            npm,
            sha256,
        })
    }
}

/// An npm registry spec: `[@scope/]name[@range]`. Names use npm's characters (lower-case
/// letters, digits, `-._~`, not starting with `.`, `_` or `-`), the range those of semver ranges and
/// dist-tags (`^~<>=*|+.-`, letters, digits). No `:` or extra `/`, so no URL, git, file or alias
/// spec (those fetch from elsewhere or run `prepare` scripts), and no leading `-` (no option).
fn check_npm_spec(spec: &str) -> Result<(), &'static str> {
    let (scope, rest) = match spec.strip_prefix('@') {
        Some(s) => {
            let (scope, rest) = s.split_once('/').ok_or("a scoped name is @scope/name")?;
            (Some(scope), rest)
        }
        None => (None, spec),
    };
    let (name, range) = match rest.split_once('@') {
        Some((n, r)) => (n, Some(r)),
        None => (rest, None),
    };
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 214
            && !n.starts_with(['.', '_', '-'])
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._~".contains(&b))
    };
    if !scope.is_none_or(name_ok) || !name_ok(name) {
        return Err("not a registry package name ([@scope/]name, lower-case, no URL or path)");
    }
    if let Some(r) = range {
        let ok = !r.is_empty()
            && r.len() <= 128
            && r.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"^~<>=*|+.-".contains(&b));
        if !ok {
            return Err("the version range after @ may hold letters, digits and ^~<>=*|+.- only");
        }
    }
    Ok(())
}

/// One downloaded wheel.
pub(crate) struct Wheel {
    pub(crate) file: String,
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) sha256: String,
}

/// One npm package of the resolved `package-lock.json`.
struct NpmPackage {
    /// Where it is installed below the template (`node_modules/a`, `node_modules/a/node_modules/b`).
    path: String,
    name: String,
    version: String,
    /// The registry's Subresource Integrity string (`sha512-<base64>`); `npm ci` checks every
    /// tarball against it.
    integrity: String,
    resolved: String,
}

/// What the install step reported from inside the sandbox.
struct BuildInfo {
    uid: u32,
    python: String,
    /// node's version, when the definition had npm packages.
    node: Option<String>,
    files: u64,
}

struct Lock<'a> {
    name: &'a str,
    def: &'a Definition,
    info: &'a BuildInfo,
    wheels: &'a [Wheel],
    npm: &'a [NpmPackage],
    /// The build user's uid, which pip and npm ran as (checked on the files they wrote).
    downloader_uid: u32,
}

impl Lock<'_> {
    fn render(&self) -> Vec<u8> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let packages: Vec<_> = self
            .wheels
            .iter()
            .map(|w| {
                serde_json::json!({"name": w.name, "version": w.version, "wheel": w.file,
                                   "sha256": w.sha256})
            })
            .collect();
        let npm: Vec<_> = self
            .npm
            .iter()
            .map(|p| {
                serde_json::json!({"name": p.name, "version": p.version, "path": p.path,
                                   "integrity": p.integrity, "resolved": p.resolved})
            })
            .collect();
        let node = self
            .info
            .node
            .as_ref()
            .map(|v| serde_json::json!({"name": "node", "path": NODE, "version": v}));
        let lock = serde_json::json!({
            "format": LOCK_FORMAT,
            "name": self.name,
            "built_at": rfc3339(now),
            "built_at_unix": now,
            "interpreter": {"name": "python3", "path": PYTHON, "version": self.info.python},
            "installer_uid": self.info.uid,
            "downloader_uid": self.downloader_uid,
            "definition_sha256": self.def.sha256,
            "packages": packages,
            "node": node,
            "npm": npm,
        });
        let mut text = serde_json::to_vec_pretty(&lock).unwrap_or_default();
        text.push(b'\n');
        text
    }
}

/// The build user's uid and gid; refused if absent or root.
pub(crate) fn build_user() -> Result<User, CtlError> {
    let missing = || {
        failed(
            BUILD_USER,
            "the build user does not exist (the package creates it; by hand: \
             useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
             sandrun-build)",
        )
    };
    let user = User::from_name(BUILD_USER)
        .map_err(|e| failed(BUILD_USER, &format!("looking up the build user: {e}")))?
        .ok_or_else(missing)?;
    if user.uid.is_root() || user.gid.as_raw() == 0 {
        return Err(failed(
            BUILD_USER,
            "the build user must not be uid or gid 0",
        ));
    }
    Ok(user)
}

/// Step 1: `pip download` as the build user into a private directory, then copies and hashes
/// the wheels into `wheels_out` (root-owned).
pub(crate) fn download(
    user: &User,
    requirements: &Path,
    wheels_out: &Path,
) -> Result<Vec<Wheel>, CtlError> {
    let private = nix::unistd::mkdtemp("/tmp/sandrun-build-XXXXXX")
        .map_err(|e| failed(BUILD_USER, &format!("mkdtemp: {e}")))?;
    let private = Scratch(private);
    nix::unistd::chown(&private.0, Some(user.uid), Some(user.gid))
        .map_err(|e| failed(BUILD_USER, &format!("chown: {e}")))?;
    let reqs = private.0.join("requirements.txt");
    fs::copy(requirements, &reqs).map_err(|e| failed(BUILD_USER, &format!("copy: {e}")))?;
    let dest = private.0.join("wheels");
    let mut pip = Command::new(PYTHON);
    pip.args([
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--no-cache-dir",
    ])
    .args(["--disable-pip-version-check", "--no-input", "-d"])
    .arg(&dest)
    .arg("-r")
    .arg(&reqs);
    run_as_build_user(pip, user, &private.0, "pip download", "pip download")?;
    copy_wheels(&dest, wheels_out, user.uid.as_raw())
}

/// Copies each `*.whl` (regular files only, not following links, written by `owner`: pip ran as
/// the build user) and hashes the copied bytes.
fn copy_wheels(from: &Path, to: &Path, owner: u32) -> Result<Vec<Wheel>, CtlError> {
    let err = |what: &str, e: &dyn std::fmt::Display| failed("wheels", &format!("{what}: {e}"));
    let mut wheels = Vec::new();
    for entry in fs::read_dir(from).map_err(|e| err("reading downloads", &e))? {
        let entry = entry.map_err(|e| err("reading downloads", &e))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some((name, version)) = wheel_name(&file) else {
            return Err(failed(
                &file,
                "pip download left a file that is not a wheel",
            ));
        };
        let mut src = fs::OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
            .open(entry.path())
            .map_err(|e| err(&file, &e))?;
        let meta = src.metadata().map_err(|e| err(&file, &e))?;
        if !meta.is_file() {
            return Err(failed(&file, "not a regular file"));
        }
        if meta.uid() != owner {
            return Err(failed(&file, "not written by the build user"));
        }
        let mut dst = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(to.join(&file))
            .map_err(|e| err(&file, &e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = src.read(&mut buf).map_err(|e| err(&file, &e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            dst.write_all(&buf[..n]).map_err(|e| err(&file, &e))?;
        }
        wheels.push(Wheel {
            file,
            name,
            version,
            sha256: hex(&hasher.finalize()),
        });
    }
    if wheels.is_empty() {
        return Err(failed("wheels", "pip download fetched nothing"));
    }
    wheels.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(wheels)
}

/// `name-version(-build)?-py-abi-platform.whl` → (name, version).
fn wheel_name(file: &str) -> Option<(String, String)> {
    let stem = file.strip_suffix(".whl")?;
    let parts: Vec<&str> = stem.split('-').collect();
    if !(5..=6).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    Some((parts[0].to_owned(), parts[1].to_owned()))
}

/// Step 1 for `npm:` lines, as the build user: resolves a `package-lock.json` and fills a
/// private npm cache with every tarball (scripts disabled), then copies `package.json`,
/// `package-lock.json` and the cache's `_cacache` into `out` (root-owned) and reads the lock.
fn download_npm(user: &User, specs: &[String], out: &Path) -> Result<Vec<NpmPackage>, CtlError> {
    let private = nix::unistd::mkdtemp("/tmp/sandrun-build-npm-XXXXXX")
        .map_err(|e| failed(BUILD_USER, &format!("mkdtemp: {e}")))?;
    let private = Scratch(private);
    let manifest = private.0.join("package.json");
    write_file(
        &manifest,
        br#"{"name": "sandrun-template", "version": "0.0.0", "private": true}"#,
    )?;
    for p in [&private.0, &manifest] {
        nix::unistd::chown(p, Some(user.uid), Some(user.gid))
            .map_err(|e| failed(BUILD_USER, &format!("chown: {e}")))?;
    }
    let cache = private.0.join("cache");
    let common = [
        "--ignore-scripts",
        "--no-audit",
        "--no-fund",
        "--no-update-notifier",
        "--loglevel=warn",
    ];
    let resolve: Vec<&str> = ["install", "--package-lock-only"]
        .into_iter()
        .chain(common)
        .chain(specs.iter().map(String::as_str))
        .collect();
    npm_as_build_user(user, &private.0, &cache, &resolve)?;
    let fetch: Vec<&str> = ["ci", "--no-bin-links"].into_iter().chain(common).collect();
    npm_as_build_user(user, &private.0, &cache, &fetch)?;
    // npm wrote the lock as the build user (the uid the lock file records as `downloader_uid`).
    let written = open_regular(&private.0.join("package-lock.json"))?
        .metadata()
        .map_err(|e| failed("package-lock.json", &e.to_string()))?;
    if written.uid() != user.uid.as_raw() {
        return Err(failed(
            "package-lock.json",
            "not written by the build user; nothing was changed",
        ));
    }
    for f in ["package.json", "package-lock.json"] {
        copy_regular(&private.0.join(f), &out.join(f), MAX_NPM_LOCK_BYTES)?;
    }
    let mut copied = 0;
    mkdir(&out.join("cache"), 0o755)?;
    copy_tree(
        &cache.join("_cacache"),
        &out.join("cache").join("_cacache"),
        0,
        &mut copied,
    )?;
    let mut text = Vec::new();
    fs::File::open(out.join("package-lock.json"))
        .and_then(|f| f.take(MAX_NPM_LOCK_BYTES).read_to_end(&mut text))
        .map_err(|e| failed("package-lock.json", &e.to_string()))?;
    npm_packages(&text)
}

/// Runs `npm ARGS` as the build user in `dir`, its cache at `cache`, with the host's network.
fn npm_as_build_user(user: &User, dir: &Path, cache: &Path, args: &[&str]) -> Result<(), CtlError> {
    let mut npm = Command::new(NPM);
    npm.args(args).arg("--cache").arg(cache);
    run_as_build_user(npm, user, dir, NPM, &format!("npm {}", args[0]))
}

/// Runs `cmd` as the build user with `dir` as its working and home directory, a clean
/// environment and the host's network; its stdout goes to stderr (so `--json` prints one
/// object). `start` and `what` name it in the errors.
fn run_as_build_user(
    mut cmd: Command,
    user: &User,
    dir: &Path,
    start: &str,
    what: &str,
) -> Result<(), CtlError> {
    let status = cmd
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir)
        .env("LANG", "C.UTF-8")
        .current_dir(dir)
        // std sets the gid, then (because a uid is set and no groups are given) drops every
        // supplementary group with setgroups(0), then sets the uid.
        .gid(user.gid.as_raw())
        .uid(user.uid.as_raw())
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| failed(BUILD_USER, &format!("starting {start}: {e}")))?;
    if !status.success() {
        return Err(failed(
            BUILD_USER,
            &format!("{what} failed ({status}); nothing was changed"),
        ));
    }
    Ok(())
}

/// Opens a regular file without following links (and without blocking on a FIFO).
pub(crate) fn open_regular(path: &Path) -> Result<fs::File, CtlError> {
    let what = path.display().to_string();
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(path)
        .map_err(|e| failed(&what, &e.to_string()))?;
    if !file
        .metadata()
        .map_err(|e| failed(&what, &e.to_string()))?
        .is_file()
    {
        return Err(failed(&what, "not a regular file"));
    }
    Ok(file)
}

/// Copies one regular file of at most `max` bytes (the copy is root's, 0644).
fn copy_regular(from: &Path, to: &Path, max: u64) -> Result<(), CtlError> {
    let what = from.display().to_string();
    let src = open_regular(from)?;
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(to)
        .map_err(|e| failed(&to.display().to_string(), &e.to_string()))?;
    let n = std::io::copy(&mut src.take(max + 1), &mut dst)
        .map_err(|e| failed(&what, &e.to_string()))?;
    if n > max {
        return Err(failed(&what, &format!("larger than {max} bytes")));
    }
    Ok(())
}

/// Copies the build user's npm cache tree: directories and regular files only (anything else
/// fails the build), at most [`MAX_NPM_CACHE_FILES`] entries, 32 levels.
fn copy_tree(from: &Path, to: &Path, depth: usize, copied: &mut usize) -> Result<(), CtlError> {
    let what = from.display().to_string();
    if depth > 32 {
        return Err(failed(&what, "the npm cache is nested too deep"));
    }
    mkdir(to, 0o755)?;
    for entry in fs::read_dir(from).map_err(|e| failed(&what, &e.to_string()))? {
        let entry = entry.map_err(|e| failed(&what, &e.to_string()))?;
        *copied += 1;
        if *copied > MAX_NPM_CACHE_FILES {
            return Err(failed(&what, "the npm cache has too many entries"));
        }
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = fs::symlink_metadata(&src).map_err(|e| failed(&what, &e.to_string()))?;
        if meta.is_dir() {
            copy_tree(&src, &dst, depth + 1, copied)?;
        } else if meta.is_file() {
            copy_regular(&src, &dst, u64::MAX - 1)?;
        } else {
            return Err(failed(
                &src.display().to_string(),
                "the npm cache holds something other than files and directories",
            ));
        }
    }
    Ok(())
}

/// The packages of a `package-lock.json` (lockfileVersion 2 or 3: its `packages` map). Every
/// one must come from the registry with a sha512, sha384 or sha256 integrity.
fn npm_packages(lock: &[u8]) -> Result<Vec<NpmPackage>, CtlError> {
    let bad = |why: &str| failed("package-lock.json", why);
    let json: serde_json::Value =
        serde_json::from_slice(lock).map_err(|e| bad(&format!("not JSON: {e}")))?;
    let map = json["packages"]
        .as_object()
        .ok_or_else(|| bad("no `packages` map (npm 7 or later writes one)"))?;
    let mut out = Vec::new();
    for (path, p) in map {
        if path.is_empty() {
            continue;
        }
        let name = path
            .rsplit_once("node_modules/")
            .map(|(_, n)| n)
            .filter(|_| path.starts_with("node_modules/"))
            .ok_or_else(|| bad(&format!("{path:?} is not below node_modules")))?;
        let parts_ok = path
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
        let has_range = name.get(1..).is_some_and(|r| r.contains('@'));
        if !parts_ok || has_range || check_npm_spec(name).is_err() {
            return Err(bad(&format!("{path:?} is not a package path")));
        }
        let field = |k: &str| p[k].as_str().map(str::to_owned);
        if p["link"].as_bool() == Some(true) {
            return Err(bad(&format!("{path:?} is a link, not a registry package")));
        }
        let integrity = field("integrity")
            .filter(|i| {
                ["sha512-", "sha384-", "sha256-"]
                    .iter()
                    .any(|a| i.starts_with(a))
            })
            .ok_or_else(|| {
                bad(&format!(
                    "{path:?} has no sha512/sha384/sha256 integrity (not from the registry?)"
                ))
            })?;
        out.push(NpmPackage {
            path: path.clone(),
            name: name.to_owned(),
            version: field("version").ok_or_else(|| bad(&format!("{path:?} has no version")))?,
            integrity,
            resolved: field("resolved").unwrap_or_default(),
        });
    }
    if out.is_empty() {
        return Err(bad("npm resolved no package"));
    }
    Ok(out)
}

/// Step 2: the offline install in a job sandbox; the tree lands in `staging/env`.
fn install(
    socket: &Path,
    args: &BuildArgs<'_>,
    input: &Path,
    staging: &Path,
) -> Result<BuildInfo, CtlError> {
    let run = RunArgs {
        memory_mb: Some(args.memory_mb),
        timeout_s: Some(args.timeout_s),
        cpu_s: Some(args.timeout_s),
        pids: None,
        input: Some(input.to_owned()),
        outputs: vec!["env/".to_owned(), "build-info.txt".to_owned()],
        out_dir: Some(staging.to_owned()),
        stdin: None,
        env: Vec::new(),
        argv: vec!["python3".to_owned(), "install.py".to_owned()],
        build: true,
    };
    let code = crate::run::run(socket, &run, false)?;
    if code != 0 {
        return Err(failed(
            args.name,
            &format!("the offline install exited with {code}; nothing was changed"),
        ));
    }
    let info_path = staging.join("build-info.txt");
    let mut text = String::new();
    fs::File::open(&info_path)
        .and_then(|f| f.take(4096).read_to_string(&mut text))
        .map_err(|e| failed(args.name, &format!("build-info.txt: {e}")))?;
    let _ = fs::remove_file(&info_path);
    let kv: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let bad = || failed(args.name, "the install step's build-info.txt is malformed");
    let info = BuildInfo {
        uid: kv.get("uid").and_then(|v| v.parse().ok()).ok_or_else(bad)?,
        python: (*kv.get("python").ok_or_else(bad)?).to_owned(),
        node: kv.get("node").map(|v| (*v).to_owned()),
        files: kv
            .get("files")
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?,
    };
    let is_version = |v: &str| {
        v.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    let version_ok = is_version(&info.python) && info.node.as_deref().is_none_or(is_version);
    if !version_ok || info.uid == 0 {
        return Err(bad());
    }
    Ok(info)
}

/// Every file the install step made came back, and every wheel and npm package was installed.
fn check_installed(
    tree: &Path,
    wheels: &[Wheel],
    npm: &[NpmPackage],
    files: u64,
) -> Result<(), CtlError> {
    let got = count_files(tree)?;
    if got != files {
        return Err(failed(
            "install",
            &format!(
                "the template has {files} files but {got} came back (a build job returns at \
                 most the helper's max_build_output_files, 100000 by default, hashed within \
                 20 s of CPU time); nothing was changed"
            ),
        ));
    }
    for p in npm {
        if !tree.join(&p.path).join("package.json").is_file() {
            return Err(failed(&p.path, "resolved but not installed"));
        }
    }
    let dist_infos: Vec<String> = fs::read_dir(tree)
        .map_err(|e| failed("install", &e.to_string()))?
        .filter_map(|e| e.ok())
        .map(|e| normalise(&e.file_name().to_string_lossy()))
        .collect();
    for w in wheels {
        let want = normalise(&format!("{}-{}.dist-info", w.name, w.version));
        if !dist_infos.contains(&want) {
            return Err(failed(&w.file, "downloaded but not installed"));
        }
    }
    Ok(())
}

fn normalise(s: &str) -> String {
    s.to_ascii_lowercase().replace(['-', '.'], "_")
}

fn count_files(dir: &Path) -> Result<u64, CtlError> {
    let mut n = 0;
    for entry in fs::read_dir(dir).map_err(|e| failed("install", &e.to_string()))? {
        let entry = entry.map_err(|e| failed("install", &e.to_string()))?;
        let meta = entry
            .metadata()
            .map_err(|e| failed("install", &e.to_string()))?;
        if meta.is_dir() {
            n += count_files(&entry.path())?;
        } else {
            n += 1;
        }
    }
    Ok(n)
}

/// Directories 0755, files 0644, files directly in `bin/` 0755 (console scripts). The tree was
/// written by `sandrunctl` itself (directories and regular files only).
fn fix_modes(dir: &Path, top: bool) -> Result<(), CtlError> {
    let err = |e: std::io::Error| failed("modes", &e.to_string());
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(err)?;
    let is_bin = dir.file_name().is_some_and(|n| n == "bin");
    for entry in fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let meta = fs::symlink_metadata(entry.path()).map_err(err)?;
        if meta.is_dir() {
            fix_modes(&entry.path(), false)?;
        } else if meta.is_file() {
            let mode = if is_bin && !top { 0o755 } else { 0o644 };
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode)).map_err(err)?;
        } else {
            return Err(failed(
                "modes",
                "the template holds something other than files",
            ));
        }
    }
    Ok(())
}

/// Moves `tree` to `dir/name`: exchanged with the previous template (which is then retired),
/// or renamed without replacing for a new name. Returns the retired path, if any.
fn publish(dir: &Path, name: &str, tree: &Path) -> Result<Option<PathBuf>, CtlError> {
    let target = dir.join(name);
    let flags = match fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => RenameFlags::RENAME_EXCHANGE,
        Ok(_) => {
            return Err(failed(
                name,
                "exists and is not a directory; nothing was changed",
            ))
        }
        Err(_) => RenameFlags::RENAME_NOREPLACE,
    };
    renameat2(None, tree, None, &target, flags)
        .map_err(|e| failed(name, &format!("publishing: {e}; nothing was changed")))?;
    if flags != RenameFlags::RENAME_EXCHANGE {
        return Ok(None);
    }
    let retired = dir.join(format!("{RETIRED_PREFIX}{name}-{}", random_hex()?));
    fs::rename(tree, &retired).map_err(|e| failed(name, &format!("retiring: {e}")))?;
    Ok(Some(retired))
}

/// Deletes every retired tree if the helper reports no running job; returns how many are kept.
fn purge_retired(socket: &Path, dir: &Path, any: bool) -> usize {
    let retired: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(RETIRED_PREFIX))
        .map(|e| e.path())
        .collect();
    if !any && retired.is_empty() {
        return 0;
    }
    let idle = matches!(
        crate::admin::request(socket, AdminRequest::List),
        Ok(AdminResponse::List(jobs)) if jobs.is_empty()
    );
    if !idle {
        return retired.len();
    }
    retired
        .iter()
        .filter(|p| fs::remove_dir_all(p).is_err())
        .count()
}

/// Template names: plain directories whose names a job may ask for.
fn template_names(dir: &Path) -> Result<Vec<String>, CtlError> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|source| CtlError::InputIo {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| check_name(n).is_ok())
        .collect();
    names.sort();
    Ok(names)
}

/// The lock file of the template at `path`, if it is a regular file of at most 1 MiB.
fn read_lock(path: &Path) -> Option<Vec<u8>> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(path.join(LOCK_FILE))
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(1 << 20).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The helper's rule for template names (`[A-Za-z0-9._-]`, 1 to 64 bytes, no leading dot).
fn check_name(name: &str) -> Result<(), CtlError> {
    if sandrun_ipc::rules::is_template_name(name) {
        Ok(())
    } else {
        Err(failed(
            name,
            "not a valid template name ([A-Za-z0-9._-], no leading dot, at most 64)",
        ))
    }
}

/// The template directory must be a root-owned directory not writable by group or others.
fn check_template_dir(dir: &Path) -> Result<(), CtlError> {
    let meta = fs::symlink_metadata(dir).map_err(|source| CtlError::InputIo {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(CtlError::Input {
            path: dir.to_owned(),
            reason: "the template directory must be a directory owned by root, not writable \
                     by group or others"
                .into(),
        });
    }
    Ok(())
}

fn mkdir(path: &Path, mode: u32) -> Result<(), CtlError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(|e| failed(&path.display().to_string(), &e.to_string()))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CtlError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| failed(&path.display().to_string(), &e.to_string()))
}

fn random_hex() -> Result<String, CtlError> {
    let mut b = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| failed("/dev/urandom", &e.to_string()))?;
    Ok(hex(&b))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (the civil-from-days algorithm).
fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub(crate) fn failed(what: &str, reason: &str) -> CtlError {
    CtlError::Template {
        what: what.to_owned(),
        reason: reason.to_owned(),
    }
}

/// A directory removed when dropped (staging and build directories: a failed build leaves
/// nothing; after publishing, the staging directory is empty).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_wheel_file_names_then_name_and_version_are_read() {
        assert_eq!(
            wheel_name("six-1.17.0-py2.py3-none-any.whl"),
            Some(("six".into(), "1.17.0".into()))
        );
        assert_eq!(
            wheel_name("numpy-2.0.0-1-cp311-cp311-manylinux_2_17_x86_64.whl"),
            Some(("numpy".into(), "2.0.0".into()))
        );
        assert_eq!(wheel_name("six-1.17.0.tar.gz"), None);
        assert_eq!(wheel_name("bad.whl"), None);
    }

    #[test]
    fn given_unix_times_then_rfc3339_is_the_civil_date() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_212_800), "2026-12-02T12:00:00Z");
    }

    #[test]
    fn given_npm_specs_then_only_registry_names_and_ranges_pass() {
        for ok in [
            "left-pad",
            "left-pad@1.3.0",
            "@types/node@^20.1",
            "a.b_c~d@>=1.0.0<2",
            "x@latest",
        ] {
            assert!(check_npm_spec(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-g",
            "--global",
            "Left-Pad",
            ".hidden",
            "git+https://x/y.git",
            "github:a/b",
            "file:../x",
            "./local",
            "a/b",
            "@scope",
            "@/x",
            "x@",
            "x@1 || 2",
            "x@$(id)",
            "alias@npm:left-pad",
        ] {
            assert!(check_npm_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn given_a_definition_with_npm_lines_then_they_are_split_from_the_pip_requirements() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("def.txt");
        fs::write(&p, "six==1.17.0\nnpm: left-pad@1.3.0  # tiny\n").unwrap();
        let def = Definition::read(&p).unwrap();
        assert_eq!(def.npm, ["left-pad@1.3.0"]);
        assert!(def.has_python);
        assert!(
            !def.python.lines().any(|l| l.starts_with("npm:")),
            "{}",
            def.python
        );
        fs::write(&p, "# only npm\nnpm: left-pad\n").unwrap();
        let def = Definition::read(&p).unwrap();
        assert!(!def.has_python && def.npm == ["left-pad"]);
        fs::write(&p, "npm: git+https://example.com/x.git\n").unwrap();
        assert!(Definition::read(&p).is_err());
    }

    #[test]
    fn given_package_locks_then_registry_packages_are_read_and_others_refused() {
        let lock = br#"{"lockfileVersion": 3, "packages": {
            "": {"name": "sandrun-template"},
            "node_modules/left-pad": {"version": "1.3.0",
                "resolved": "https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz",
                "integrity": "sha512-XI5MPzVNApjAyhQzphX8BkmKsKUxD4LdyK24iZeQEeLFrDHnZrJpSbsJsJJZvx68Cf3aJ5kdVs2fEx7ATYHeXHRW=="},
            "node_modules/@s/a/node_modules/b": {"version": "2.0.0", "integrity": "sha256-AAAA"}}}"#;
        let p = npm_packages(lock).unwrap();
        let names: Vec<_> = p
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str()))
            .collect();
        assert_eq!(names, [("b", "2.0.0"), ("left-pad", "1.3.0")]);
        for bad in [
            r#"{"packages": {"node_modules/x": {"version": "1", "integrity": "sha1-AAAA"}}}"#,
            r#"{"packages": {"node_modules/x": {"version": "1"}}}"#,
            r#"{"packages": {"node_modules/x": {"link": true, "integrity": "sha512-A"}}}"#,
            r#"{"packages": {"../x": {"version": "1", "integrity": "sha512-A"}}}"#,
            r#"{"packages": {"node_modules/../../x": {"version": "1", "integrity": "sha512-A"}}}"#,
            r#"{"packages": {"": {}}}"#,
            r#"{"lockfileVersion": 1}"#,
        ] {
            assert!(npm_packages(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn given_template_names_then_the_helpers_rule_applies() {
        assert!(check_name("data-science").is_ok());
        for bad in ["", ".staging-x", "a/b", "..", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
