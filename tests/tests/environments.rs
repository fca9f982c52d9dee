//! Environment templates against the real daemons: `sandrunctl env build` from PyPI (small pure
//! Python wheels), a job that imports the template's packages with no network, the lock hash in
//! the signed result, `env rm`, a failed build leaving the previous template untouched, and the
//! installer's uid (never 0). Slot uid ranges from the allocator (`config(..)`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sha2::{Digest, Sha256};

use sandrun_tests::{config, Config, Helper};

/// The build user `sandrunctl env build` downloads as; created here as the package would.
const BUILD_USER: &str = "sandrun-build";

fn ensure_build_user() {
    if nix::unistd::User::from_name(BUILD_USER)
        .ok()
        .flatten()
        .is_some()
    {
        return;
    }
    let out = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home", "--home-dir"])
        .args(["/nonexistent", "--shell", "/usr/sbin/nologin", BUILD_USER])
        .output()
        .expect("run useradd");
    // Exit status 9: created meanwhile by another test.
    assert!(
        out.status.success() || out.status.code() == Some(9),
        "useradd {BUILD_USER}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A root-owned 0755 template directory (what `template_dir` needs).
fn template_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sandrun-templates-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn helper_config(templates: &Path) -> Config {
    config(&format!("template_dir = \"{}\"", templates.display()))
}

fn write_definition(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).expect("write definition");
    path
}

fn env_build(helper: &Helper, templates: &Path, name: &str, from: &Path) -> Output {
    let dir = templates.display().to_string();
    let from = from.display().to_string();
    helper.ctl(&[
        "--json",
        "env",
        "--template-dir",
        &dir,
        "build",
        name,
        "--from",
        &from,
    ])
}

fn json_of(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "no JSON object ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn lock_of(templates: &Path, name: &str) -> (Value, String) {
    let bytes = fs::read(templates.join(name).join("sandrun-lock.json")).expect("lock file");
    let hash = hex::encode(Sha256::digest(&bytes));
    (serde_json::from_slice(&bytes).expect("lock is JSON"), hash)
}

fn package_names(lock: &Value) -> Vec<String> {
    lock["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn given_a_definition_when_built_then_the_lock_lists_hashed_wheels_installed_by_a_non_root_uid() {
    ensure_build_user();
    let templates = template_dir();
    let helper = Helper::start(&helper_config(templates.path()));
    let def = write_definition(helper.dir(), "small.txt", "six==1.17.0\n");
    let out = env_build(&helper, templates.path(), "small", &def);
    assert!(out.status.success(), "{out:?}");
    let summary = json_of(&out);
    let (lock, hash) = lock_of(templates.path(), "small");
    assert_eq!(summary["lock_sha256"], hash, "{summary}");
    assert_eq!(lock["format"], "sandrun-lock/1", "{lock}");
    assert_eq!(package_names(&lock), ["six"], "{lock}");
    let six = &lock["packages"][0];
    assert_eq!(six["version"], "1.17.0", "{lock}");
    assert_eq!(six["sha256"].as_str().map(str::len), Some(64), "{lock}");
    // Recorded from inside the install step (os.getuid()): a slot uid, never root.
    let uid = lock["installer_uid"].as_u64().expect("installer_uid");
    assert_ne!(uid, 0, "{lock}");
    assert!(
        helper.slot_uids().contains(&u32::try_from(uid).unwrap()),
        "{lock}"
    );
    assert!(
        lock["interpreter"]["version"]
            .as_str()
            .unwrap()
            .starts_with("3."),
        "{lock}"
    );
    assert!(templates.path().join("small/six.py").is_file());
    // Nothing of the build is left beside the template.
    let leftovers: Vec<_> = fs::read_dir(templates.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "small")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn given_a_failing_build_then_the_previous_template_is_untouched_and_rm_removes_it() {
    ensure_build_user();
    let templates = template_dir();
    let helper = Helper::start(&helper_config(templates.path()));
    let good = write_definition(helper.dir(), "good.txt", "six==1.17.0\n");
    let out = env_build(&helper, templates.path(), "keep", &good);
    assert!(out.status.success(), "{out:?}");
    let (_, before) = lock_of(templates.path(), "keep");
    let bad = write_definition(
        helper.dir(),
        "bad.txt",
        "six==1.17.0\nsandrun-no-such-package-7f3e9a==1.0\n",
    );
    let out = env_build(&helper, templates.path(), "keep", &bad);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(json_of(&out)["code"], "template_failed", "{out:?}");
    let (_, after) = lock_of(templates.path(), "keep");
    assert_eq!(before, after, "a failed build changed the template");
    let names: Vec<_> = fs::read_dir(templates.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["keep"], "a failed build left something behind");

    let dir = templates.path().display().to_string();
    let listed = helper.ctl(&["--json", "env", "--template-dir", &dir, "list"]);
    assert_eq!(
        json_of(&listed)["templates"][0]["lock_sha256"],
        before,
        "{listed:?}"
    );
    let out = helper.ctl(&["env", "--template-dir", &dir, "rm", "keep"]);
    assert!(out.status.success(), "{out:?}");
    let left: Vec<_> = fs::read_dir(templates.path()).unwrap().collect();
    assert!(left.is_empty(), "rm left {left:?}");
    let out = helper.ctl(&["env", "--template-dir", &dir, "rm", "keep"]);
    assert!(
        !out.status.success(),
        "removing a missing template succeeded: {out:?}"
    );
}
