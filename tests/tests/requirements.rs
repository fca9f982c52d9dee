//! Per-job `requirements` installed offline from the operator's wheelhouse (issue 12), against
//! the real daemons. The wheelhouse is built here from tiny hand-made pure-Python wheels, so
//! nothing depends on PyPI: a job installing one of two wheels and importing it, the installed
//! set in `/status` and in the signature (verified with openssl), a missing distribution and a
//! wrong pinned hash failing with reason `requirements`, an install that fills the job's tmpfs,
//! a requirement the template already provides not being installed again, a helper without a
//! wheelhouse refusing, bad requirement lines refused with a 400, and a job that cannot change
//! what the install step reports (rewriting its files afterwards, writing to fd 3, shadowing
//! pip or planting a `sitecustomize.py` for it). Slot uid ranges from the
//! allocator (`config(..)`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use sandrun_ipc::{ErrorCode, ExitReason};
use sandrun_tests::archive;
use sandrun_tests::host::ensure_build_user;
use sandrun_tests::signature::result_message;
use sandrun_tests::stack::{Part, Stack};
use sandrun_tests::{config, Helper, Job};

/// A pure-Python wheel `name-version-py3-none-any.whl` with `name/__init__.py` (setting
/// `V = version`) and `extra` files, with a correct RECORD. Returns its file name and bytes.
fn wheel(name: &str, version: &str, extra: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let info = format!("{name}-{version}.dist-info");
    let init = format!("V = '{version}'\n");
    let metadata = format!("Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n");
    let wheel_meta = "Wheel-Version: 1.0\nGenerator: sandrun-tests\nRoot-Is-Purelib: true\n\
                      Tag: py3-none-any\n";
    let mut files: Vec<(String, Vec<u8>)> = vec![
        (format!("{name}/__init__.py"), init.into_bytes()),
        (format!("{info}/METADATA"), metadata.into_bytes()),
        (format!("{info}/WHEEL"), wheel_meta.as_bytes().to_vec()),
    ];
    for (path, data) in extra {
        files.push(((*path).to_owned(), data.to_vec()));
    }
    let mut record = String::new();
    for (path, data) in &files {
        let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(data));
        record.push_str(&format!("{path},sha256={digest},{}\n", data.len()));
    }
    record.push_str(&format!("{info}/RECORD,,\n"));
    files.push((format!("{info}/RECORD"), record.into_bytes()));
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    (
        format!("{name}-{version}-py3-none-any.whl"),
        archive::zip(&refs),
    )
}

/// A root-owned 0755 wheelhouse with `alpha` 1.0 and `beta` 2.0; returns it and alpha's
/// wheel's file name and sha256.
fn wheelhouse() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::Builder::new()
        .prefix("sandrun-wheelhouse-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut alpha = None;
    for (name, version) in [("alpha", "1.0"), ("beta", "2.0")] {
        let (file, bytes) = wheel(name, version, &[]);
        fs::write(dir.path().join(&file), &bytes).expect("write wheel");
        if name == "alpha" {
            alpha = Some((file, hex::encode(Sha256::digest(&bytes))));
        }
    }
    let (file, sha) = alpha.expect("alpha");
    (dir, file, sha)
}

fn stack_with(wheelhouse: &Path) -> Stack {
    let cfg = config(&format!("wheelhouse_dir = \"{}\"", wheelhouse.display()));
    Stack::start(&cfg, "")
}

const IMPORT_ALPHA: &str = "import alpha\nprint('alpha', alpha.V)\n\
                            try:\n    import beta\n    print('beta too')\n\
                            except ImportError:\n    print('no beta')\n";

/// The signed message of `docs/signatures.md`, format 3 without a template, from `/status`.
fn signed_message_v3(status: &Value) -> String {
    let installed = status["requirements"]["installed"]
        .as_array()
        .expect("installed");
    let mut lines: Vec<String> = installed
        .iter()
        .map(|p| {
            format!(
                "requirement={} {}=={}\n",
                p["sha256"].as_str().expect("sha256"),
                p["name"].as_str().expect("name"),
                p["version"].as_str().expect("version")
            )
        })
        .collect();
    lines.sort();
    let result = if status["requirements"]["error"].is_null() {
        "installed"
    } else {
        "failed"
    };
    let format_lines = format!(
        "requirements={}\n{}requirements_result={result}\n",
        installed.len(),
        lines.concat()
    );
    result_message(status, "sandrun-result-v3", &format_lines)
}

fn submit_with_requirements(stack: &Stack, code: &str, requirements: Value) -> String {
    stack.submit_ok(&[
        Part::file("main.py", code),
        Part::manifest(&json!({"entrypoint": "main.py", "requirements": requirements})),
    ])
}

/// What the helper's exit report says the job's requirements came to, parsed as the gateway
/// parses it (the helper relays the install step's record unread).
fn requirements(outcome: &sandrun_tests::Outcome) -> sandrun_gateway::requirements::Outcome {
    let record = (outcome.report().requirements.as_ref())
        .unwrap_or_else(|| panic!("no requirements record: {}", outcome.describe()));
    sandrun_gateway::requirements::parse(record)
}

/// The cause a job that ended with reason `requirements` reports (panics on any other reason).
fn requirements_error(outcome: &sandrun_tests::Outcome) -> String {
    let parsed = requirements(outcome);
    assert_eq!(
        parsed.reason(outcome.report().reason),
        ExitReason::Requirements,
        "{}",
        outcome.describe()
    );
    parsed.report.error.unwrap_or_default()
}

#[test]
fn given_a_wheelhouse_when_a_job_requires_one_wheel_then_it_imports_it_and_the_signed_result_lists_it(
) {
    let (wh, alpha_wheel, alpha_sha) = wheelhouse();
    let stack = stack_with(wh.path());
    let id = submit_with_requirements(&stack, IMPORT_ALPHA, json!(["alpha==1.0"]));
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(status["status"], "completed", "{status}\n{logs}");
    assert_eq!(logs["stdout"], "alpha 1.0\nno beta\n", "{logs}");
    assert_eq!(
        status["requirements"],
        json!({"installed": [{"name": "alpha", "version": "1.0", "wheel": alpha_wheel,
                              "sha256": alpha_sha}], "error": null}),
        "{status}"
    );
    assert_eq!(
        status["worker_metadata"]["signature_format"], "sandrun-result-v3",
        "{status}"
    );
    let sig = base64::engine::general_purpose::STANDARD
        .decode(
            status["worker_metadata"]["signature"]
                .as_str()
                .expect("signature"),
        )
        .expect("base64");
    let msg = signed_message_v3(&status);
    assert!(
        stack.openssl_verifies(msg.as_bytes(), &sig),
        "signature refused:\n{msg}"
    );
    // Another wheel hash in the message: the signature no longer verifies.
    let forged = msg.replace(&alpha_sha, &"0".repeat(64));
    assert_ne!(forged, msg);
    assert!(!stack.openssl_verifies(forged.as_bytes(), &sig));

    // The job's installed files counted against its own tmpfs and are gone with it: a job
    // without requirements sees neither the wheelhouse nor alpha.
    let id = stack.submit_ok(&[Part::file(
        "main.py",
        "import os, importlib.util\nprint(os.path.exists('/wheelhouse'), \
         importlib.util.find_spec('alpha') is None)\n",
    )]);
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(logs["stdout"], "False True\n", "{logs}");
    assert_eq!(status["requirements"], Value::Null, "{status}");
    assert_eq!(
        status["worker_metadata"]["signature_format"], "sandrun-result-v1",
        "{status}"
    );
}

#[test]
fn given_a_requirement_the_wheelhouse_lacks_or_a_wrong_hash_then_the_job_fails_with_reason_requirements_before_its_code_runs(
) {
    let (wh, _, alpha_sha) = wheelhouse();
    let stack = stack_with(wh.path());
    let code = "print('the job ran')\n";

    let id = submit_with_requirements(&stack, code, json!(["alpha", "sandrun-no-such-pkg"]));
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(status["reason"], "requirements", "{status}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(message.contains("sandrun-no-such-pkg"), "{status}");
    assert_eq!(logs["stdout"], "", "the job's code ran: {logs}");
    // The signed result says the install failed: its bytes are not those of a job whose
    // template had every requirement and whose command exited 1.
    assert_eq!(status["execution_metadata"]["exit_code"], 1, "{status}");
    let sig = base64::engine::general_purpose::STANDARD
        .decode(
            status["worker_metadata"]["signature"]
                .as_str()
                .expect("signature"),
        )
        .expect("base64");
    let msg = signed_message_v3(&status);
    assert!(
        msg.contains("\nrequirements=0\nrequirements_result=failed\nexit_code=1\n"),
        "{msg}"
    );
    assert!(
        stack.openssl_verifies(msg.as_bytes(), &sig),
        "signature refused:\n{msg}"
    );
    let as_if_ran = msg.replace(
        "requirements_result=failed",
        "requirements_result=installed",
    );
    assert!(!stack.openssl_verifies(as_if_ran.as_bytes(), &sig));

    let wrong = format!("alpha==1.0 --hash=sha256:{}", "0".repeat(64));
    let id = submit_with_requirements(&stack, code, json!([wrong]));
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(status["reason"], "requirements", "{status}\n{logs}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(message.contains("hash"), "{status}");
    assert_eq!(logs["stdout"], "", "the job's code ran: {logs}");

    // The right hash installs (pip's hash-checking mode is on for the file).
    let right = format!("alpha==1.0 --hash=sha256:{alpha_sha}");
    let id = submit_with_requirements(&stack, IMPORT_ALPHA, json!(right));
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(status["status"], "completed", "{status}\n{logs}");
    assert_eq!(logs["stdout"], "alpha 1.0\nno beta\n", "{logs}");
}

#[test]
fn given_bad_requirement_lines_then_submit_is_a_400_naming_the_entry() {
    let (wh, _, _) = wheelhouse();
    let stack = stack_with(wh.path());
    for bad in [
        "-e .",
        "--index-url https://pypi.org/simple",
        "alpha @ https://example.com/alpha.whl",
        "-r /etc/passwd",
        "./alpha-1.0-py3-none-any.whl",
    ] {
        let r = stack.submit(&[
            Part::file("main.py", "print(1)\n"),
            Part::manifest(&json!({"entrypoint": "main.py", "requirements": ["alpha", bad]})),
        ]);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.starts_with("manifest.requirements[1]:"), "{error}");
    }
}

/// An empty root-owned 0755 template directory.
fn templates_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sandrun-templates-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// A helper with `wheelhouse` and `templates`.
fn helper_with(wheelhouse: &Path, templates: &Path) -> Helper {
    Helper::start(&config(&format!(
        "wheelhouse_dir = \"{}\"\ntemplate_dir = \"{}\"",
        wheelhouse.display(),
        templates.display()
    )))
}

/// A template directory with one handmade template `tpl` providing `beta` 2.0 (installed flat,
/// with its dist-info, as `env build` lays a template out).
fn template_with_beta() -> tempfile::TempDir {
    let dir = templates_dir();
    let tpl = dir.path().join("tpl");
    fs::create_dir_all(tpl.join("beta")).expect("mkdir");
    fs::create_dir_all(tpl.join("beta-2.0.dist-info")).expect("mkdir");
    fs::write(tpl.join("beta/__init__.py"), "V = 'template'\n").expect("write");
    fs::write(
        tpl.join("beta-2.0.dist-info/METADATA"),
        "Metadata-Version: 2.1\nName: beta\nVersion: 2.0\n",
    )
    .expect("write");
    fs::write(tpl.join("sandrun-lock.json"), "{}\n").expect("write");
    for d in ["", "beta", "beta-2.0.dist-info"] {
        fs::set_permissions(tpl.join(d), fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    dir
}

#[test]
fn given_a_template_providing_a_requirement_then_only_the_others_are_installed() {
    let (wh, _, _) = wheelhouse();
    let templates = template_with_beta();
    let helper = helper_with(wh.path(), templates.path());
    let mut job = Job::new(&["python3", "main.py"]).file(
        "main.py",
        0o644,
        b"import alpha, beta\nprint(alpha.V, beta.V)\n",
    );
    job.spec.template = Some("tpl".into());
    job.spec.requirements = vec!["alpha".into(), "beta==2.0".into()];
    let outcome = helper.run(&job);
    let report = outcome.report();
    assert_eq!(report.reason, ExitReason::None, "{}", outcome.describe());
    assert_eq!(
        String::from_utf8_lossy(&outcome.stdout),
        "1.0 template\n",
        "{}",
        outcome.describe()
    );
    let parsed = requirements(&outcome);
    assert_eq!(parsed.report.error, None, "{}", outcome.describe());
    let names: Vec<&str> = parsed
        .report
        .installed
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["alpha"], "{}", outcome.describe());
}

#[test]
fn given_an_install_larger_than_the_jobs_tmpfs_then_it_fails_with_reason_requirements_naming_the_tmpfs(
) {
    let (wh, _, _) = wheelhouse();
    // 6 MiB that do not compress: the wheel is small enough to read, its install is not.
    let mut noise = vec![0u8; 6 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in noise.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let (file, bytes) = wheel("big", "1.0", &[("big/blob.bin", &noise)]);
    fs::write(wh.path().join(file), bytes).expect("write wheel");
    let helper = Helper::start(&config(&format!(
        "wheelhouse_dir = \"{}\"",
        wh.path().display()
    )));
    let mut job = Job::new(&["python3", "-c", "print('the job ran')"])
        .limits(|l| l.tmpfs_bytes = Some(4 << 20));
    job.spec.requirements = vec!["big".into()];
    let outcome = helper.run(&job);
    let error = requirements_error(&outcome);
    assert!(error.contains("tmpfs"), "{error}: {}", outcome.describe());
    assert!(outcome.stdout.is_empty(), "{}", outcome.describe());
}

#[test]
fn given_a_helper_without_a_wheelhouse_then_a_job_with_requirements_is_refused_naming_them() {
    let helper = Helper::start(&config(
        "wheelhouse_dir = \"/nonexistent/sandrun-wheelhouse\"",
    ));
    let mut job = Job::new(&["python3", "-c", "print(1)"]);
    job.spec.requirements = vec!["alpha".into()];
    let outcome = helper.run(&job);
    let error = outcome.error.as_ref().expect("refused");
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error:?}");
    assert!(
        error.message.starts_with("requirements") && error.message.contains("wheelhouse"),
        "{error:?}"
    );
    // A bad line is refused by the helper too, whatever the gateway checked.
    let mut job = Job::new(&["python3", "-c", "print(1)"]);
    job.spec.requirements = vec!["--index-url=https://evil".into()];
    let outcome = helper.run(&job);
    let error = outcome.error.as_ref().expect("refused");
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error:?}");
}

#[test]
fn given_wheelhouse_add_from_pypi_then_the_wheel_is_listed_with_its_hash_and_a_job_installs_it() {
    ensure_build_user();
    let (wh, _, _) = wheelhouse();
    let stack = stack_with(wh.path());
    let def = stack.dir().join("wheels.txt");
    fs::write(&def, "six==1.17.0\n").expect("write requirements");
    let dir = wh.path().display().to_string();
    let def = def.display().to_string();
    let add = |args: &[&str]| {
        let mut all = vec!["--json", "env", "wheelhouse", "--wheelhouse-dir", &dir];
        all.extend_from_slice(args);
        let out = stack.helper().ctl(&all);
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str::<Value>(text.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    let added = add(&["add", &def]);
    let six = &added["wheels"][0];
    assert_eq!(six["name"], "six", "{added}");
    assert_eq!(six["added"], true, "{added}");
    let wheel = six["wheel"].as_str().expect("wheel").to_owned();
    let bytes = fs::read(wh.path().join(&wheel)).expect("the wheel is in the wheelhouse");
    assert_eq!(
        six["sha256"],
        hex::encode(Sha256::digest(&bytes)),
        "{added}"
    );
    let mode = fs::metadata(wh.path().join(&wheel))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    // Nothing of the download is left beside the wheels.
    let hidden: Vec<_> = fs::read_dir(wh.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
    // Again: the same bytes are already there, nothing changes.
    let again = add(&["add", &def]);
    assert_eq!(again["wheels"][0]["added"], false, "{again}");
    let listed = add(&["list"]);
    assert!(
        listed["wheels"]
            .as_array()
            .expect("wheels")
            .iter()
            .any(|w| w["wheel"] == wheel.as_str() && w["sha256"] == six["sha256"]),
        "{listed}"
    );

    let id = submit_with_requirements(
        &stack,
        "import six\nprint(six.__version__)\n",
        json!(["six==1.17.0"]),
    );
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(status["status"], "completed", "{status}\n{logs}");
    assert_eq!(logs["stdout"], "1.17.0\n", "{logs}");
    assert_eq!(
        status["requirements"]["installed"][0]["sha256"], six["sha256"],
        "{status}"
    );
}

#[test]
fn given_a_gateway_whose_helper_has_no_wheelhouse_then_a_job_with_requirements_fails_with_reason_requirements(
) {
    let cfg = config("wheelhouse_dir = \"/nonexistent/sandrun-wheelhouse\"");
    let stack = Stack::start(&cfg, "");
    let id = submit_with_requirements(&stack, "print('the job ran')\n", json!(["alpha"]));
    let status = stack.wait_finished(&id);
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(status["reason"], "requirements", "{status}");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("wheelhouse")),
        "{status}"
    );
    // A job without requirements is not affected, nor is one that merely ships a
    // requirements.txt (it is an ordinary file unless the manifest lists requirements).
    let id = stack.submit_ok(&[
        Part::file(
            "main.py",
            "print(open('requirements.txt').read().strip())\n",
        ),
        Part::file("requirements.txt", "numpy==1.26.4\n"),
    ]);
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(status["status"], "completed", "{status}\n{logs}");
    assert_eq!(logs["stdout"], "numpy==1.26.4\n", "{logs}");
    assert_eq!(status["requirements"], Value::Null, "{status}");
}

#[test]
fn given_an_install_larger_than_the_jobs_memory_then_it_fails_with_reason_memory_limit() {
    let (wh, _, _) = wheelhouse();
    let helper = Helper::start(&config(&format!(
        "wheelhouse_dir = \"{}\"",
        wh.path().display()
    )));
    // pip alone needs several times this; the install is charged to the job's own cgroup.
    let mut job = Job::new(&["python3", "-c", "print('the job ran')"])
        .limits(|l| l.memory_bytes = Some(12 << 20));
    job.spec.requirements = vec!["alpha".into()];
    let outcome = helper.run(&job);
    let report = outcome.report();
    assert_eq!(
        report.reason,
        ExitReason::MemoryLimit,
        "{}",
        outcome.describe()
    );
    assert!(outcome.stdout.is_empty(), "{}", outcome.describe());
    assert!(report.requirements.is_some(), "{}", outcome.describe());
}

#[test]
fn given_requirements_true_then_the_uploads_requirements_txt_is_installed() {
    let (wh, _, alpha_sha) = wheelhouse();
    let stack = stack_with(wh.path());
    let id = stack.submit_ok(&[
        Part::file("main.py", IMPORT_ALPHA),
        Part::file("requirements.txt", "# pinned\nalpha==1.0\n"),
        Part::manifest(&json!({"entrypoint": "main.py", "requirements": true})),
    ]);
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(status["status"], "completed", "{status}\n{logs}");
    assert_eq!(logs["stdout"], "alpha 1.0\nno beta\n", "{logs}");
    assert_eq!(
        status["requirements"]["installed"][0]["sha256"], alpha_sha,
        "{status}"
    );
    let r = stack.submit(&[
        Part::file("main.py", IMPORT_ALPHA),
        Part::manifest(&json!({"entrypoint": "main.py", "requirements": true})),
    ]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("requirements.txt"), "{}", r.text());
}

#[test]
fn given_the_most_and_longest_requirement_lines_then_the_install_step_still_starts() {
    let (wh, _, _) = wheelhouse();
    let helper = Helper::start(&config(&format!(
        "wheelhouse_dir = \"{}\"",
        wh.path().display()
    )));
    let hashes = format!(" --hash=sha256:{}", "0".repeat(64)).repeat(12);
    let lines: Vec<String> = (0..sandrun_ipc::rules::MAX_REQUIREMENTS)
        .map(|i| format!("pkg{i:04}==1.0{hashes}"))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l.len() > 900 && l.len() <= sandrun_ipc::rules::MAX_REQUIREMENT_BYTES));
    let mut job = Job::new(&["python3", "-c", "print('the job ran')"]);
    job.spec.requirements = lines;
    let outcome = helper.run(&job);
    // pip ran (and found none of them): not a sandbox setup failure (E2BIG at execve).
    let error = requirements_error(&outcome);
    assert!(error.contains("pkg0000"), "{error}: {}", outcome.describe());
}

/// The job's own code runs after the install as the same uid: it rewrites the files the install
/// step leaves in `/tmp/.sandrun-req` (claiming beta too, or a failure) and tries the fd the
/// install step reported on. The result and its signature still say exactly what pip installed.
#[test]
fn given_a_job_that_rewrites_the_install_record_then_the_signed_result_lists_what_pip_installed() {
    let (wh, alpha_wheel, alpha_sha) = wheelhouse();
    let stack = stack_with(wh.path());
    let probe = "import errno, os\n\
                 try:\n    os.write(3, b'installed\\nbeta 2.0 beta-2.0-py3-none-any.whl\\nend\\n')\n    \
                 print('fd 3 written')\n\
                 except OSError as e:\n    print('fd 3', errno.errorcode[e.errno])\n\
                 def is_open(fd):\n    try:\n        os.fstat(fd)\n        return True\n    \
                 except OSError:\n        return False\n\
                 print('open', [fd for fd in range(3, 1024) if is_open(fd)])\n\
                 os.makedirs('/tmp/.sandrun-req', exist_ok=True)\n";
    let forge_installed = format!(
        "{probe}with open('/tmp/.sandrun-req/installed', 'w') as f:\n    \
         f.write('alpha 1.0 {alpha_wheel}\\nbeta 2.0 beta-2.0-py3-none-any.whl\\n')\n\
         print('rewrote')\n"
    );
    let forge_failed = format!(
        "{probe}with open('/tmp/.sandrun-req/failed', 'w') as f:\n    \
         f.write('a forged failure\\n')\n\
         print('rewrote')\n"
    );
    for code in [forge_installed, forge_failed] {
        let id = submit_with_requirements(&stack, &code, json!(["alpha"]));
        let status = stack.wait_finished(&id);
        let (_, logs) = stack.get_json(&format!("/logs/{id}"));
        assert_eq!(logs["stdout"], "fd 3 EBADF\nopen []\nrewrote\n", "{logs}");
        assert_eq!(status["status"], "completed", "{status}\n{logs}");
        assert_ne!(status["reason"], "requirements", "{status}");
        assert_eq!(
            status["requirements"],
            json!({"installed": [{"name": "alpha", "version": "1.0", "wheel": alpha_wheel,
                                  "sha256": alpha_sha}], "error": null}),
            "{status}"
        );
        let sig = base64::engine::general_purpose::STANDARD
            .decode(
                status["worker_metadata"]["signature"]
                    .as_str()
                    .expect("signature"),
            )
            .expect("base64");
        let msg = signed_message_v3(&status);
        assert!(msg.contains("requirements=1\n"), "{msg}");
        assert!(
            stack.openssl_verifies(msg.as_bytes(), &sig),
            "signature refused:\n{msg}"
        );
    }
}

/// The job's files and variables must not run inside the install: a `pip` package in `/work`
/// (pip runs as `python -m pip`, which would put its working directory first on `sys.path`)
/// and `PYTHONPATH=/work` with a `sitecustomize.py`, each of which would otherwise write pip's
/// report itself and so choose what the signed result lists.
#[test]
fn given_job_files_shadowing_pip_or_a_sitecustomize_then_the_install_runs_the_real_pip() {
    let (wh, alpha_wheel, alpha_sha) = wheelhouse();
    let stack = stack_with(wh.path());
    let fake_report = "import json\n\
                       def forge():\n    \
                       with open('/tmp/.sandrun-req/report.json', 'w') as f:\n        \
                       json.dump({'install': [{'metadata': {'name': 'beta', 'version': '2.0'}, \
                       'download_info': {'url': 'file:///wheelhouse/beta-2.0-py3-none-any.whl'}}]}, f)\n";
    let pip_main = format!("{fake_report}forge()\n");
    let sitecustomize = format!("{fake_report}import atexit, sys\natexit.register(forge)\n");
    let id = stack.submit_ok(&[
        Part::file("main.py", IMPORT_ALPHA),
        Part::file("pip/__init__.py", ""),
        Part::file("pip/__main__.py", pip_main),
        Part::file("sitecustomize.py", sitecustomize),
        Part::manifest(&json!({"entrypoint": "main.py", "requirements": ["alpha"],
                               "env": {"PYTHONPATH": "/work"}})),
    ]);
    let status = stack.wait_finished(&id);
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(status["status"], "completed", "{status}\n{logs}");
    assert_eq!(logs["stdout"], "alpha 1.0\nno beta\n", "{logs}");
    assert_eq!(
        status["requirements"],
        json!({"installed": [{"name": "alpha", "version": "1.0", "wheel": alpha_wheel,
                              "sha256": alpha_sha}], "error": null}),
        "{status}"
    );
}

#[test]
fn given_a_wheelhouse_wheel_that_is_a_symlink_then_the_install_step_refuses_it_before_the_job_runs()
{
    // The install step hashes each wheel pip installed from `/wheelhouse` itself, opened
    // without following links: a wheel that is a link (here to a file in a hidden directory of
    // the wheelhouse, which pip follows and installs) is never attested, and the command does
    // not run.
    let (wh, _, _) = wheelhouse();
    let store = wh.path().join(".store");
    fs::create_dir(&store).expect("mkdir");
    fs::set_permissions(&store, fs::Permissions::from_mode(0o755)).expect("chmod");
    let (file, bytes) = wheel("gamma", "3.0", &[]);
    fs::write(store.join("gamma.zip"), &bytes).expect("write wheel");
    std::os::unix::fs::symlink(".store/gamma.zip", wh.path().join(&file)).expect("symlink");
    let helper = Helper::start(&config(&format!(
        "wheelhouse_dir = \"{}\"",
        wh.path().display()
    )));
    let mut job = Job::new(&["python3", "-c", "print('the job ran')"]);
    job.spec.requirements = vec!["gamma".into()];
    let outcome = helper.run(&job);
    let error = requirements_error(&outcome);
    assert!(outcome.stdout.is_empty(), "{}", outcome.describe());
    assert_eq!(
        error,
        format!("wheel {file} of the wheelhouse cannot be read: Too many levels of symbolic links"),
        "{}",
        outcome.describe()
    );
    assert!(requirements(&outcome).report.installed.is_empty());
}

/// A template whose `sitecustomize.py` runs inside pip (pip gets `PYTHONPATH=/env`) and leaves a
/// daemon behind (holding none of pip's descriptors, so pip's end does not wait for it) that,
/// for 6 s, tries to reopen the install step's record pipe through `/proc/<pid>/fd/3`, bumping
/// a counter in `/tmp/.evil-beat` every 10 ms, then drains what it got and writes a forged record
/// (alpha 9.9 with a zero hash) into it, while the job's command runs.
fn template_with_a_record_thief() -> tempfile::TempDir {
    let dir = templates_dir();
    let tpl = dir.path().join("evil");
    fs::create_dir_all(&tpl).expect("mkdir");
    let thief = r#"import os, time
if os.environ.get("HOME") == "/tmp/.sandrun-req" and os.fork() == 0:
    os.setsid()
    os.closerange(0, 4096)
    for fd in (0, 1, 2):
        os.open("/dev/null", os.O_RDWR)
    if os.fork() == 0:
        stolen, end, beat = {}, time.time() + 6, 0
        while time.time() < end:
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) in (1, os.getpid()) or pid in stolen:
                    continue
                try:
                    # The install step (its argv is `python3 -I -c <script>`), not pip's pipes.
                    if b"\0-I\0-c\0" not in open("/proc/%s/cmdline" % pid, "rb").read():
                        continue
                    if os.readlink("/proc/%s/fd/3" % pid).startswith("pipe:"):
                        stolen[pid] = os.open("/proc/%s/fd/3" % pid, os.O_RDWR | os.O_NONBLOCK)
                except OSError:
                    pass
            beat += 1
            with open("/tmp/.evil-beat", "w") as f:
                f.write(str(beat))
            time.sleep(0.01)
        for fd in stolen.values():
            try:
                os.read(fd, 65536)
            except OSError:
                pass
            os.write(fd, b"installed\nalpha 9.9 alpha-1.0-py3-none-any.whl " + b"0" * 64 + b"\nend\n")
    os._exit(0)
"#;
    fs::write(tpl.join("sitecustomize.py"), thief).expect("write");
    fs::write(tpl.join("sandrun-lock.json"), "{}\n").expect("write");
    fs::set_permissions(&tpl, fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

#[test]
fn given_a_template_module_that_leaves_a_process_to_steal_the_record_pipe_then_the_report_is_what_pip_installed(
) {
    // Three layers stop it: the record pipe was made by root (its inode is root's, mode 0600, so
    // reopening it through /proc is EACCES for the job's uid); the install step is
    // non-dumpable until it closes fd 3 (its /proc/<pid>/fd is root's); and it kills whatever
    // pip left running before it hashes and writes. The last is what this test sees: the thief
    // is gone before the job's command starts (it fails without the `kill(-1)`: the counter
    // goes on), and the signed list is what pip installed.
    let (wh, _, alpha_sha) = wheelhouse();
    let templates = template_with_a_record_thief();
    let helper = helper_with(wh.path(), templates.path());
    let code = "import time\nbeat = lambda: open('/tmp/.evil-beat').read()\n\
                a = beat(); time.sleep(1); b = beat()\n\
                print('the thief is', 'alive' if a != b else 'gone')\ntime.sleep(6)\n";
    let mut job = Job::new(&["python3", "-I", "-c", code]);
    job.spec.template = Some("evil".into());
    job.spec.requirements = vec!["alpha".into()];
    let outcome = helper.run(&job);
    assert_eq!(
        String::from_utf8_lossy(&outcome.stdout),
        "the thief is gone\n",
        "{}",
        outcome.describe()
    );
    let parsed = requirements(&outcome);
    assert_eq!(parsed.report.error, None, "{}", outcome.describe());
    let installed: Vec<(String, String, String)> = (parsed.report.installed.iter())
        .map(|p| (p.name.clone(), p.version.clone(), hex::encode(p.sha256)))
        .collect();
    assert_eq!(
        installed,
        [("alpha".to_owned(), "1.0".to_owned(), alpha_sha)],
        "{}",
        outcome.describe()
    );
}
