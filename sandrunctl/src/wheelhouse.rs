//! `sandrunctl env wheelhouse add | list`: the operator's wheelhouse, the wheels a job's
//! `requirements` may install (the helper's `wheelhouse_dir`, mounted read-only at
//! `/wheelhouse` in such a job).
//!
//! `add FILE` downloads FILE's requirements (pip requirements-file syntax, wheels only) as the
//! unprivileged build user with the host's network, outside any job, exactly as `env build`
//! does (`env::download`: `pip download --only-binary=:all:` into a private directory, then
//! copied root-owned and hashed while copied), into a root-owned `.staging-<rand>` directory
//! (mode 0700) inside the wheelhouse. Each wheel is then moved into place with
//! `renameat2(RENAME_NOREPLACE)`: a job never sees a partial wheel, and an existing file is never
//! replaced. A wheel already there with the same bytes is kept; one with the same name and other
//! bytes fails the whole add before anything is moved.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{renameat2, RenameFlags};
use sandrun_ipc::rules::DEFAULT_WHEELHOUSE_DIR;
use sha2::{Digest, Sha256};

use crate::env::{failed, open_regular};
use crate::error::CtlError;
use crate::outputs::hex;

const STAGING_PREFIX: &str = ".staging-";

/// `sandrunctl env wheelhouse ...`.
#[derive(Debug, clap::Args)]
pub(crate) struct WheelhouseArgs {
    /// The helper's `wheelhouse_dir` (the two must agree).
    #[arg(long, default_value = DEFAULT_WHEELHOUSE_DIR)]
    pub(crate) wheelhouse_dir: PathBuf,
    #[command(subcommand)]
    pub(crate) command: WheelhouseCommand,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum WheelhouseCommand {
    /// Download FILE's requirements (wheels only, as the build user) into the wheelhouse.
    Add { file: PathBuf },
    /// List the wheelhouse's wheels with their sha256.
    List,
}

pub(crate) fn dispatch(args: &WheelhouseArgs, json: bool) -> Result<i32, CtlError> {
    let dir = args.wheelhouse_dir.as_path();
    match &args.command {
        WheelhouseCommand::Add { file } => add(dir, file, json),
        WheelhouseCommand::List => list(dir, json),
    }
}

/// The wheelhouse must be a root-owned directory that only root can write (jobs read it, and
/// the helper hashes its files into signed results); it is created (0755) if missing.
fn check_dir(dir: &Path) -> Result<(), CtlError> {
    let what = dir.display().to_string();
    if !dir.is_absolute() {
        return Err(failed(&what, "the wheelhouse directory must be absolute"));
    }
    if let Err(e) = fs::DirBuilder::new().mode(0o755).create(dir) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(failed(&what, &e.to_string()));
        }
    }
    let meta = fs::symlink_metadata(dir).map_err(|e| failed(&what, &e.to_string()))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(failed(
            &what,
            "the wheelhouse must be a directory owned by root, writable by root only",
        ));
    }
    Ok(())
}

fn add(dir: &Path, file: &Path, json: bool) -> Result<i32, CtlError> {
    check_dir(dir)?;
    let user = crate::env::build_user()?;
    let staging = Staging(dir.join(format!("{STAGING_PREFIX}{}", random_hex()?)));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging.0)
        .map_err(|e| failed(&staging.0.display().to_string(), &e.to_string()))?;
    let wheels = crate::env::download(&user, file, &staging.0)?;
    // Every name first: a conflicting file fails the add before anything is moved.
    let mut fresh = Vec::new();
    for w in &wheels {
        match fs::symlink_metadata(dir.join(&w.file)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh.push(w),
            Err(e) => return Err(failed(&w.file, &e.to_string())),
            Ok(_) if sha256_of(&dir.join(&w.file))? == w.sha256 => {}
            Ok(_) => {
                return Err(failed(
                    &w.file,
                    "the wheelhouse has another file of that name (different sha256); \
                     nothing was added",
                ))
            }
        }
    }
    for w in &fresh {
        let from = staging.0.join(&w.file);
        fs::set_permissions(&from, fs::Permissions::from_mode(0o644))
            .map_err(|e| failed(&w.file, &e.to_string()))?;
        renameat2(
            None,
            &from,
            None,
            &dir.join(&w.file),
            RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| failed(&w.file, &format!("moving into the wheelhouse: {e}")))?;
    }
    drop(staging);
    if json {
        let list: Vec<_> = wheels
            .iter()
            .map(|w| {
                serde_json::json!({
                    "wheel": w.file, "name": w.name, "version": w.version, "sha256": w.sha256,
                    "added": fresh.iter().any(|f| f.file == w.file),
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "wheels": list }));
    } else {
        for w in &wheels {
            let what = if fresh.iter().any(|f| f.file == w.file) {
                "added"
            } else {
                "already there"
            };
            println!("{what}: {} sha256 {}", w.file, w.sha256);
        }
    }
    Ok(0)
}

fn list(dir: &Path, json: bool) -> Result<i32, CtlError> {
    let what = dir.display().to_string();
    let mut wheels = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| failed(&what, &e.to_string()))? {
        let entry = entry.map_err(|e| failed(&what, &e.to_string()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".whl") {
            continue;
        }
        let sha = sha256_of(&entry.path())?;
        wheels.push((name, sha));
    }
    wheels.sort();
    if json {
        let list: Vec<_> = wheels
            .iter()
            .map(|(w, s)| serde_json::json!({"wheel": w, "sha256": s}))
            .collect();
        println!("{}", serde_json::json!({ "wheels": list }));
    } else {
        for (w, s) in &wheels {
            println!("{s}  {w}");
        }
    }
    Ok(0)
}

/// sha256 (hex) of a regular file, not through a symlink.
fn sha256_of(path: &Path) -> Result<String, CtlError> {
    let mut f = open_regular(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)
        .map_err(|e| failed(&path.display().to_string(), &e.to_string()))?;
    Ok(hex(&hasher.finalize()))
}

fn random_hex() -> Result<String, CtlError> {
    let mut b = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| failed("/dev/urandom", &e.to_string()))?;
    Ok(b.iter().map(|b| format!("{b:02x}")).collect())
}

/// The staging directory, removed when dropped (a failed add leaves nothing).
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
