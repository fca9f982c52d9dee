//! Environment templates against the real daemons: `sandrunctl env build` from PyPI (small pure
//! Python wheels), a job that imports the template's packages with no network, the lock hash in
//! the signed result, `env rm`, a failed build leaving the previous template untouched, and the
//! installer's uid (never 0). Slot uid ranges from the allocator (`config(..)`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use sha2::{Digest, Sha256};

use sandrun_ipc::ErrorCode;
use sandrun_tests::host::{ensure_build_user, BUILD_USER};
use sandrun_tests::signature::result_message;
use sandrun_tests::stack::{Part, Stack};
use sandrun_tests::{config, Config, Helper, Job};

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
    // pip download ran as the build user (the wheels it wrote are its), never root.
    let build_uid = nix::unistd::User::from_name(BUILD_USER)
        .unwrap()
        .expect("build user")
        .uid
        .as_raw();
    assert_eq!(lock["downloader_uid"], build_uid, "{lock}");
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

/// The signed message of `docs/signatures.md` (format 2: a job with a template), rebuilt from
/// `/status` alone.
fn signed_message_v2(status: &Value) -> String {
    let lines = format!(
        "environment={}\nenvironment_lock={}\n",
        status["environment"].as_str().expect("environment"),
        status["environment_lock"]
            .as_str()
            .expect("environment_lock"),
    );
    result_message(status, "sandrun-result-v2", &lines)
}

/// A stack whose helper uses `templates`, with template `small` (six 1.17.0) built in it.
fn stack_with_small(templates: &Path, extra: &str) -> (Stack, String) {
    ensure_build_user();
    let cfg = config(&format!(
        "template_dir = \"{}\"\n{extra}",
        templates.display()
    ));
    let stack = Stack::start(&cfg, "");
    let def = write_definition(stack.dir(), "small.txt", "six==1.17.0\n");
    let out = env_build(stack.helper(), templates, "small", &def);
    assert!(out.status.success(), "{out:?}");
    let (_, hash) = lock_of(templates, "small");
    (stack, hash)
}

const IMPORT_SIX: &str = "import os, six\nprint(six.__version__)\nprint(six.__file__)\n\
                          print(os.environ['PYTHONPATH'])\n";

#[test]
fn given_a_built_template_when_a_job_names_it_then_it_imports_its_packages_and_the_signed_result_carries_the_lock_hash(
) {
    let templates = template_dir();
    let (stack, hash) = stack_with_small(templates.path(), "");

    let (code, envs) = stack.get_json("/environments");
    assert_eq!(code, 200, "{envs}");
    assert_eq!(envs["environments"], serde_json::json!(["small"]), "{envs}");
    let small = &envs["details"][0];
    assert_eq!(small["name"], "small", "{envs}");
    assert_eq!(small["lock_sha256"], hash, "{envs}");
    assert_eq!(small["packages"][0]["name"], "six", "{envs}");
    assert_eq!(small["packages"][0]["version"], "1.17.0", "{envs}");
    assert_eq!(small["interpreter"]["name"], "python3", "{envs}");
    assert!(
        small["interpreter"]["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "{envs}"
    );

    // The job's code is unchanged: no sys.path edits, no network.
    let id = stack.submit_ok(&[
        Part::file("main.py", IMPORT_SIX),
        Part::manifest(&serde_json::json!({"entrypoint": "main.py", "environment": "small"})),
    ]);
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(status["status"], "completed", "{status}\n{logs}");
    assert_eq!(logs["stdout"], "1.17.0\n/env/six.py\n/env\n", "{logs}");
    assert_eq!(status["environment"], "small", "{status}");
    assert_eq!(status["environment_lock"], hash, "{status}");
    assert_eq!(
        status["worker_metadata"]["signature_format"], "sandrun-result-v2",
        "{status}"
    );

    use base64::Engine as _;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(
            status["worker_metadata"]["signature"]
                .as_str()
                .expect("signature"),
        )
        .expect("base64");
    let msg = signed_message_v2(&status).into_bytes();
    assert!(
        stack.openssl_verifies(&msg, &sig),
        "signature refused:\n{}",
        String::from_utf8_lossy(&msg)
    );
    // Another lock hash in the message: the signature no longer verifies.
    let text = String::from_utf8(msg).expect("utf-8");
    let forged = text.replace(&hash, &"0".repeat(64));
    assert_ne!(forged, text);
    assert!(!stack.openssl_verifies(forged.as_bytes(), &sig));

    // A job without the template does not see it (and is signed as format 1).
    let id = stack.submit_ok(&[Part::file(
        "main.py",
        "import os\nprint(os.path.exists('/env'), os.environ.get('PYTHONPATH'))\n",
    )]);
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(logs["stdout"], "False None\n", "{logs}");
    assert_eq!(status["environment_lock"], Value::Null, "{status}");
    assert_eq!(
        status["worker_metadata"]["signature_format"], "sandrun-result-v1",
        "{status}"
    );
}

#[test]
fn given_an_absent_template_or_an_override_of_its_variables_then_submit_is_a_400_naming_the_field()
{
    let templates = template_dir();
    let (stack, _) = stack_with_small(templates.path(), "");
    let absent = stack.submit(&[
        Part::file("main.py", IMPORT_SIX),
        Part::manifest(&serde_json::json!({"entrypoint": "main.py", "environment": "absent"})),
    ]);
    assert_eq!(absent.status, 400, "{}", absent.text());
    let error = absent.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.starts_with("manifest.environment:") && error.contains("absent"),
        "{error}"
    );
    let override_ = stack.submit(&[
        Part::file("main.py", IMPORT_SIX),
        Part::manifest(&serde_json::json!({
            "entrypoint": "main.py", "environment": "small", "env": {"PYTHONPATH": "/tmp"}
        })),
    ]);
    assert_eq!(override_.status, 400, "{}", override_.text());
    assert!(
        override_.text().contains("manifest.env.PYTHONPATH"),
        "{}",
        override_.text()
    );
}

#[test]
fn given_a_template_removed_after_submit_then_the_job_fails_with_reason_environment() {
    let templates = template_dir();
    // One sandbox at a time: the second job waits in the gateway's queue for the first.
    let (stack, _) = stack_with_small(templates.path(), "max_concurrent = 1");
    let blocker = stack.submit_ok(&[Part::file("main.py", "import time\ntime.sleep(600)\n")]);
    stack.wait_status(&blocker, |s| s == "running");
    let queued = stack.submit_ok(&[
        Part::file("main.py", IMPORT_SIX),
        Part::manifest(&serde_json::json!({"entrypoint": "main.py", "environment": "small"})),
    ]);
    let dir = templates.path().display().to_string();
    let out = stack
        .helper()
        .ctl(&["env", "--template-dir", &dir, "rm", "small"]);
    assert!(out.status.success(), "{out:?}");
    let deleted = stack.delete(&format!("/jobs/{blocker}"));
    assert!(deleted.status < 300, "{}", deleted.text());
    let status = stack.wait_finished(&queued);
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(status["reason"], "environment", "{status}");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("small")),
        "{status}"
    );
}

#[test]
fn given_a_helper_request_with_a_missing_template_then_it_is_refused_with_template_missing() {
    let templates = template_dir();
    let helper = Helper::start(&helper_config(templates.path()));
    let mut job = Job::new(&["python3", "-c", "print(1)"]);
    job.spec.template = Some("absent".into());
    let outcome = helper.run(&job);
    let error = outcome.error.as_ref().expect("refused");
    assert_eq!(error.code, ErrorCode::TemplateMissing, "{error:?}");
}

/// A template with one tiny npm package from the registry (`npm:` line, no Python requirement).
const NPM_DEFINITION: &str = "# npm only\nnpm: left-pad@1.3.0\n";

const REQUIRE_LEFT_PAD: &str = "const lp = require('left-pad');\n\
    console.log(lp('7', 3, '0'));\n\
    console.log(require.resolve('left-pad'));\n\
    console.log(process.env.NODE_PATH);\n";

#[test]
fn given_an_npm_line_when_built_then_a_node_job_requires_it_offline_and_the_lock_and_environments_list_it(
) {
    ensure_build_user();
    let templates = template_dir();
    let cfg = config(&format!(
        "template_dir = \"{}\"",
        templates.path().display()
    ));
    let stack = Stack::start(&cfg, "");
    let def = write_definition(stack.dir(), "js.txt", NPM_DEFINITION);
    let out = env_build(stack.helper(), templates.path(), "js", &def);
    assert!(out.status.success(), "{out:?}");
    let summary = json_of(&out);
    assert_eq!(summary["npm_packages"], 1, "{summary}");
    let (lock, hash) = lock_of(templates.path(), "js");
    assert_eq!(summary["lock_sha256"], hash, "{summary}");
    assert_eq!(package_names(&lock), Vec::<String>::new(), "{lock}");
    let npm = lock["npm"].as_array().expect("npm");
    assert_eq!(npm.len(), 1, "{lock}");
    assert_eq!(npm[0]["name"], "left-pad", "{lock}");
    assert_eq!(npm[0]["version"], "1.3.0", "{lock}");
    assert_eq!(npm[0]["path"], "node_modules/left-pad", "{lock}");
    assert!(
        npm[0]["integrity"]
            .as_str()
            .is_some_and(|i| i.starts_with("sha512-")),
        "{lock}"
    );
    assert!(
        lock["node"]["version"]
            .as_str()
            .is_some_and(|v| v.split('.').count() == 3),
        "{lock}"
    );
    // npm resolved and fetched as the build user (sandrunctl checks the owner of the files npm
    // wrote) ...
    let build_uid = nix::unistd::User::from_name(BUILD_USER)
        .unwrap()
        .expect("build user")
        .uid
        .as_raw();
    assert_eq!(lock["downloader_uid"], build_uid, "{lock}");
    assert_ne!(build_uid, 0);
    // ... and npm ci ran inside the install job, which recorded its own uid: a slot uid.
    let uid = lock["installer_uid"].as_u64().expect("installer_uid");
    assert_ne!(uid, 0, "{lock}");
    assert!(
        stack
            .helper()
            .slot_uids()
            .contains(&u32::try_from(uid).unwrap()),
        "{lock}"
    );
    let installed = templates.path().join("js/node_modules/left-pad/index.js");
    assert!(installed.is_file(), "{installed:?}");
    // Nothing of the build (npm cache, package lock copies) is left beside the template.
    let names: Vec<_> = fs::read_dir(templates.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["js"], "{names:?}");

    let (code, envs) = stack.get_json("/environments");
    assert_eq!(code, 200, "{envs}");
    let js = &envs["details"][0];
    assert_eq!(js["npm"][0]["name"], "left-pad", "{envs}");
    assert_eq!(js["npm"][0]["version"], "1.3.0", "{envs}");
    assert_eq!(js["npm"][0]["integrity"], npm[0]["integrity"], "{envs}");
    assert_eq!(js["node"]["version"], lock["node"]["version"], "{envs}");
    // GET / names the templates a job may use now, and the allow-list as configured.
    let (code, info) = stack.get_json("/");
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["environments"], serde_json::json!(["js"]), "{info}");
    assert_eq!(
        info["environments_allowed"],
        serde_json::json!([]),
        "{info}"
    );

    // The job has no network: the package comes from the read-only template.
    let id = stack.submit_ok(&[
        Part::file("main.js", REQUIRE_LEFT_PAD),
        Part::manifest(&serde_json::json!({"entrypoint": "main.js", "environment": "js"})),
    ]);
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(status["status"], "completed", "{status}\n{logs}");
    assert_eq!(
        logs["stdout"], "007\n/env/node_modules/left-pad/index.js\n/env/node_modules\n",
        "{logs}"
    );
    assert_eq!(status["environment_lock"], hash, "{status}");
}

#[test]
fn given_a_build_job_then_it_returns_more_than_1000_files_and_an_ordinary_job_does_not() {
    let templates = template_dir();
    let helper = Helper::start(&helper_config(templates.path()));
    let make = "import os\nos.mkdir('t')\nfor i in range(1500):\n    open(f't/{i}', 'w').close()\n";
    let job = |build: bool| {
        let mut job = Job::new(&["python3", "-c", make]).output("t/");
        job.spec.build = build;
        helper.run(&job)
    };
    let counts = |o: &sandrun_tests::Outcome| {
        format!("{} returned, {} skipped", o.outputs.len(), o.skipped.len())
    };
    let public = job(false);
    assert_eq!(public.report().exit_code, Some(0), "{}", counts(&public));
    assert_eq!(public.outputs.len(), 1000, "{}", counts(&public));
    assert_eq!(public.skipped.len(), 500, "{}", counts(&public));
    assert!(public
        .skipped
        .iter()
        .all(|(_, k)| *k == sandrun_ipc::SkipKind::TooMany));
    // Root's connection (these tests run as root, and the helper has no root gateway).
    let build = job(true);
    assert_eq!(build.report().exit_code, Some(0), "{}", counts(&build));
    assert_eq!(build.outputs.len(), 1500, "{}", counts(&build));
    assert!(build.skipped.is_empty(), "{}", counts(&build));
}

/// The shipped `data-science` definition (numpy, pandas, matplotlib: more files than the 1000
/// an ordinary job may return) builds whole through the build job's own cap. Ignored by
/// default: it downloads about 60 MB of wheels (`cargo test ... -- --ignored`).
#[test]
#[ignore = "downloads the data-science wheels (network, about a minute)"]
fn given_the_shipped_data_science_definition_then_it_builds_with_more_than_1000_files() {
    ensure_build_user();
    let templates = template_dir();
    let helper = Helper::start(&helper_config(templates.path()));
    let def =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/environments/data-science.txt");
    let out = env_build(&helper, templates.path(), "data-science", &def);
    assert!(out.status.success(), "{out:?}");
    fn count(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                if e.file_type().unwrap().is_dir() {
                    count(&e.path())
                } else {
                    1
                }
            })
            .sum()
    }
    let files = count(&templates.path().join("data-science"));
    assert!(files > 1000, "{files} files");
    let (lock, _) = lock_of(templates.path(), "data-science");
    let names = package_names(&lock);
    for p in ["numpy", "pandas", "matplotlib"] {
        assert!(names.iter().any(|n| n == p), "{names:?}");
    }
    println!("data-science: {files} files, {} packages", names.len());
}
