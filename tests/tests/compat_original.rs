//! The original Sandrun's clients against the real stack (real `sandrund`, real gateway), as
//! they speak: the requests each one sends and the fields each one reads, written by us from the
//! original project's Python client and CLI, `curl_examples.sh`, both web frontends (browser
//! requests with `Origin`, CORS preflights), its MCP server's legacy upload, and its trusted-pool
//! coordinator. The Python clients are reproduced with python3-requests
//! (`tests/compat/original_clients.py`); the shell and browser ones with curl.
//!
//! Each test starts its own stack with its own slot uid range (`config(..)`, from the allocator).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use sandrun_tests::config;
use sandrun_tests::helper::bin_dir;
use sandrun_tests::stack::{Part, Stack, GATEWAY_USER};

fn stack() -> Stack {
    Stack::start(&config(""), "")
}

/// The original clients' default URL form, on the test's port: plain `http://localhost`.
fn plain_url(stack: &Stack, path: &str) -> String {
    format!("http://localhost:{}{path}", stack.addr().port())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("compat/original_clients.py")
}

/// Runs one mode of the Python driver and returns what the client saw.
fn python(args: &[&str], env: &[(&str, &Path)]) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg(script()).args(args);
    // Only what the test gives: no CA bundle from the machine's environment.
    for k in [
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .expect("run python3 (packages python3, python3-requests)");
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the driver prints JSON")
}

/// `curl -s` as the examples and a browser would send it (no `--cacert` on plain HTTP).
fn curl(args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-D", "-", "-o", "/dev/stderr"])
        .args(args)
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl {args:?}: {}", text(&out.stderr));
    let head = text(&out.stdout);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    (status, head.to_ascii_lowercase(), text(&out.stderr))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Polls `/status` over plain HTTP until the job has finished.
fn wait_plain(stack: &Stack, id: &str) -> Value {
    for _ in 0..2400 {
        let (_, _, body) = curl(&[&plain_url(stack, &format!("/status/{id}"))]);
        let status = json_of(&body);
        if matches!(status["status"].as_str(), Some("completed" | "failed")) {
            return status;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("job {id} never finished");
}

/// `tar -czf OUT -C DIR NAMES...`, as `curl_examples.sh` builds its uploads.
fn tar_czf(out: &Path, dir: &Path, names: &[&str]) {
    let status = Command::new("tar")
        .arg("-czf")
        .arg(out)
        .arg("-C")
        .arg(dir)
        .args(names)
        .status()
        .expect("run tar");
    assert!(status.success());
}

fn write(dir: &Path, name: &str, data: &str) {
    std::fs::write(dir.join(name), data).expect("write a job file");
}

#[test]
fn given_the_python_client_on_its_default_http_url_in_dev_mode_then_every_call_works() {
    let stack = stack();
    let seen = python(&["python-client", &plain_url(&stack, "")], &[]);
    assert_eq!(seen["test_connection"], true, "{seen}");
    assert_eq!(seen["quick_status"], "completed", "{seen}");
    assert_eq!(seen["quick_stdout"], "hello from the python client\n");
    assert_eq!(seen["dir_status"], "completed", "{seen}");
    assert_eq!(seen["dir_stdout"], "processed ['test-input']\n");
    assert_eq!(seen["dir_files"], json!(["result.json"]));
    assert_eq!(seen["downloaded"], json!({"args": ["test-input"]}));
    for key in [
        "used",
        "limit",
        "available",
        "active_jobs",
        "can_submit",
        "reason",
    ] {
        assert!(!seen["your_quota"][key].is_null(), "{key}: {seen}");
    }
    assert!(seen["templates"].is_array(), "{seen}");
}

#[test]
fn given_the_python_client_over_https_then_the_dev_certificate_is_trusted_by_verify_or_the_bundle_variable(
) {
    let stack = stack();
    let https = stack.url("").replace("127.0.0.1", "localhost");
    let ca = stack.ca_path();
    // `verify=<the certificate>` ...
    let seen = python(&["python-client", &https], &[("COMPAT_VERIFY", &ca)]);
    assert_eq!(seen["test_connection"], true, "{seen}");
    // ... or REQUESTS_CA_BUNDLE, as the quickstart prints.
    let seen = python(&["python-client", &https], &[("REQUESTS_CA_BUNDLE", &ca)]);
    assert_eq!(seen["dir_files"], json!(["result.json"]), "{seen}");
}

#[test]
fn given_the_mcp_servers_legacy_upload_of_non_ascii_code_then_it_runs_as_written() {
    let stack = stack();
    let seen = python(&["mcp", &plain_url(&stack, "")], &[]);
    assert_eq!(seen["submit_status"], 200, "{seen}");
    assert_eq!(seen["status"], "completed", "{seen}");
    assert_eq!(seen["stdout"], "héllo wörld ✓ — naïve café\n3\n", "{seen}");
    assert!(seen["cpu_seconds"].is_number(), "{seen}");
}

/// Every example of `curl_examples.sh`, on its default plain `http://` URL.
#[test]
fn given_the_curl_examples_on_plain_http_in_dev_mode_then_each_one_works() {
    let stack = stack();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (code, _, body) = curl(&[&plain_url(&stack, "")]);
    assert_eq!((code, &json_of(&body)["service"]), (200, &json!("sandrun")));

    let submit = |archive: &Path, manifest: &str| -> String {
        let file = format!("files=@{}", archive.display());
        let manifest = format!("manifest={manifest}");
        let (code, _, body) = curl(&[
            "-X",
            "POST",
            &plain_url(&stack, "/submit"),
            "-F",
            &file,
            "-F",
            &manifest,
        ]);
        assert_eq!(code, 200, "{body}");
        json_of(&body)["job_id"].as_str().unwrap().to_owned()
    };
    let logs = |id: &str| json_of(&curl(&[&plain_url(&stack, &format!("/logs/{id}"))]).2);

    // 1: quick Python code.
    write(
        d,
        "hello.py",
        "print('Hello from Sandrun!')\nopen('output.txt','w').write('ok')\n",
    );
    tar_czf(&d.join("simple_job.tar.gz"), d, &["hello.py"]);
    let id = submit(
        &d.join("simple_job.tar.gz"),
        r#"{"entrypoint":"hello.py","interpreter":"python3"}"#,
    );
    assert_eq!(wait_plain(&stack, &id)["status"], "completed");
    assert_eq!(logs(&id)["stdout"], "Hello from Sandrun!\n");
    let (code, _, body) = curl(&[&plain_url(&stack, &format!("/outputs/{id}"))]);
    assert_eq!(code, 200);
    assert!(json_of(&body)["files"].is_array());

    // 2: arguments in a multi-line manifest.
    write(d, "args_example.py", "import sys\nprint(sys.argv[1:])\n");
    tar_czf(&d.join("args_job.tar.gz"), d, &["args_example.py"]);
    let id = submit(
        &d.join("args_job.tar.gz"),
        "{\n  \"entrypoint\":\"args_example.py\",\n  \"interpreter\":\"python3\",\n  \
         \"args\":[\"--input\",\"data.csv\",\"--output\",\"results.json\"]\n}",
    );
    wait_plain(&stack, &id);
    assert_eq!(
        logs(&id)["stdout"],
        "['--input', 'data.csv', '--output', 'results.json']\n"
    );

    // 3: a data job: `tar -C data_job .` with a job.json, plus a manifest part.
    let job = d.join("data_job");
    std::fs::create_dir(&job).unwrap();
    write(
        &job,
        "processor.py",
        "import json\nopen('output.csv','w').write('id,value\\n1,100\\n')\n\
         json.dump({'total': 100}, open('stats.json','w'))\nprint('Processing complete')\n",
    );
    write(
        &job,
        "job.json",
        r#"{"entrypoint":"processor.py","interpreter":"python3","outputs":["*.csv","*.json"],"timeout":60,"memory_mb":256}"#,
    );
    tar_czf(&d.join("data_job.tar.gz"), &job, &["."]);
    let id = submit(
        &d.join("data_job.tar.gz"),
        r#"{"entrypoint":"processor.py","interpreter":"python3","outputs":["*.csv","*.json"]}"#,
    );
    assert_eq!(wait_plain(&stack, &id)["status"], "completed");
    let listed = json_of(&curl(&[&plain_url(&stack, &format!("/outputs/{id}"))]).2);
    let mut names: Vec<&str> = listed["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["output.csv", "stats.json"], "{listed}");

    // 4: a bash script.
    write(d, "system_info.sh", "#!/bin/bash\necho bash works\n");
    tar_czf(&d.join("bash_job.tar.gz"), d, &["system_info.sh"]);
    let id = submit(
        &d.join("bash_job.tar.gz"),
        r#"{"entrypoint":"system_info.sh","interpreter":"bash"}"#,
    );
    wait_plain(&stack, &id);
    assert_eq!(logs(&id)["stdout"], "bash works\n");

    // 5: an error: stdout, stderr and the exit code are all reported.
    write(
        d,
        "error_example.py",
        "import sys\nprint('to stdout')\nprint('Error!', file=sys.stderr)\nsys.exit(1)\n",
    );
    tar_czf(&d.join("error_job.tar.gz"), d, &["error_example.py"]);
    let id = submit(
        &d.join("error_job.tar.gz"),
        r#"{"entrypoint":"error_example.py","interpreter":"python3"}"#,
    );
    let status = wait_plain(&stack, &id);
    assert_eq!(status["execution_metadata"]["exit_code"], 1, "{status}");
    let l = logs(&id);
    assert_eq!(
        (l["stdout"].as_str(), l["stderr"].as_str()),
        (Some("to stdout\n"), Some("Error!\n"))
    );
}

/// What a browser does for the original frontends (another origin): a preflight for anything
/// that is not a simple request, then requests with `Origin`, whose answers it hands to the page
/// only with `Access-Control-Allow-Origin`.
#[test]
fn given_the_web_frontends_requests_from_another_origin_then_preflights_and_answers_allow_them() {
    let stack = stack();
    let origin = "Origin: http://localhost:8000";
    let (code, head, _) = curl(&[
        "-X",
        "OPTIONS",
        "-H",
        origin,
        "-H",
        "Access-Control-Request-Method: POST",
        "-H",
        "Access-Control-Request-Headers: content-type",
        &plain_url(&stack, "/submit"),
    ]);
    assert_eq!(code, 204, "{head}");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(
        head.contains("access-control-allow-methods: get, post, delete, options"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers: content-type"),
        "{head}"
    );
    assert!(head.contains("access-control-max-age: "), "{head}");
    // The Test button.
    let (_, head, body) = curl(&["-H", origin, &plain_url(&stack, "/")]);
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert_eq!(json_of(&body)["service"], "sandrun");

    // integrations/web-frontend quick code: a legacy body in a `files` part named job.tar.gz,
    // Size in bytes (Blob.size).
    let dir = tempfile::tempdir().unwrap();
    let code = "print('from the browser')\n";
    let legacy = format!("----Tar\nPath: main.py\nSize: {}\n\n{code}", code.len());
    std::fs::write(dir.path().join("job.tar.gz"), legacy).unwrap();
    let file = format!(
        "files=@{};type=application/x-tar",
        dir.path().join("job.tar.gz").display()
    );
    let (status, head, body) = curl(&[
        "-H",
        origin,
        "-F",
        &file,
        "-F",
        r#"manifest={"entrypoint":"main.py","interpreter":"python3"}"#,
        &plain_url(&stack, "/submit"),
    ]);
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    let id = json_of(&body)["job_id"].as_str().unwrap().to_owned();
    let finished = wait_plain(&stack, &id);
    // app.js reads these top-level metrics, frontend/index.html reads `metrics`.
    assert!(finished["cpu_seconds"].is_number(), "{finished}");
    assert!(finished["memory_bytes"].is_number(), "{finished}");
    assert!(finished["wall_time"].is_number(), "{finished}");
    assert!(finished["metrics"].is_object(), "{finished}");
    for path in [
        format!("/status/{id}"),
        format!("/logs/{id}"),
        format!("/outputs/{id}"),
    ] {
        let (code, head, _) = curl(&["-H", origin, &plain_url(&stack, &path)]);
        assert_eq!(code, 200, "{path}");
        assert!(
            head.contains("access-control-allow-origin: *"),
            "{path}: {head}"
        );
        assert!(
            head.contains("access-control-expose-headers: "),
            "{path}: {head}"
        );
    }
    let l = json_of(&curl(&[&plain_url(&stack, &format!("/logs/{id}"))]).2);
    assert_eq!(l["stdout"], "from the browser\n");

    // frontend/index.html: a dropped folder, one `files` part per file named by its
    // webkitRelativePath, and a manifest naming the entry point inside the folder.
    let project = dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    write(
        &project,
        "main.py",
        "import json\njson.dump(open('data.txt').read(), open('r.json','w'))\n",
    );
    write(&project, "data.txt", "folder data");
    let parts = [
        Part::file(
            "project/main.py",
            std::fs::read(project.join("main.py")).unwrap(),
        ),
        Part::file("project/data.txt", b"folder data".to_vec()),
        Part::manifest(&json!({
            "entrypoint": "main.py", "interpreter": "python3", "args": [], "outputs": ["*.json"]
        })),
    ];
    let id = stack.submit_ok(&parts);
    assert_eq!(stack.wait_finished(&id)["status"], "completed");
    let r = stack.get(&format!("/download/{id}/r.json"));
    assert_eq!((r.status, r.text()), (200, "\"folder data\"".to_owned()));
}

/// The trusted-pool coordinator with two workers: one client that trusts both development
/// certificates at once, checks each `/health` against the configured (base64) worker id, and
/// submits to both.
#[test]
fn given_two_dev_gateways_trusted_together_then_the_coordinator_reaches_both() {
    let (a, b) = (stack(), stack());
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("workers.pem");
    let mut pem = std::fs::read(a.ca_path()).unwrap();
    pem.extend(std::fs::read(b.ca_path()).unwrap());
    std::fs::write(&bundle, pem).unwrap();
    let urls = [&a, &b].map(|s| s.url("").replace("127.0.0.1", "localhost"));
    let ids = [&a, &b].map(|s| worker_id_base64(&s.worker_key_path()));
    let seen = python(
        &["coordinator", &urls.join(","), &ids.join(",")],
        &[("COMPAT_VERIFY", &bundle)],
    );
    for h in seen["health"].as_array().unwrap() {
        assert_eq!(
            h,
            &json!({"status": 200, "matches": true, "value": "healthy"}),
            "{seen}"
        );
    }
    for job in seen["jobs"].as_array().unwrap() {
        let want = json!({"submit_status": 200, "status": "completed", "output_status": 200,
                          "output": "pool"});
        assert_eq!(job, &want, "{seen}");
    }
    // curl (OpenSSL) with the same bundle reaches the second one too.
    let out = Command::new("curl")
        .args(["-fsS", "--cacert"])
        .arg(&bundle)
        .arg(format!("{}/health", urls[1]))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The worker id as the original reported it: the raw public key in base64.
fn worker_id_base64(key: &Path) -> String {
    use base64::Engine as _;
    let out: Output = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(key)
        .output()
        .expect("run openssl pkey");
    assert!(out.status.success());
    let raw = &out.stdout[out.stdout.len() - 32..];
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// Outside `--dev`, plain HTTP on the port is answered in HTTP, never with TLS bytes: a
/// redirect to https:// for GET, a 400 that says to use https:// for a POST.
#[test]
fn given_plain_http_to_a_production_gateway_then_it_is_told_to_use_https() {
    sandrun_tests::require_root();
    sandrun_tests::ensure_built();
    sandrun_tests::stack::ensure_gateway_user();
    let dir = tempfile::tempdir().unwrap();
    let gw = bin_dir().join("sandrun-gateway");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new(&gw)
        .args(["cert", "--name", "localhost", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(&gw)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--user",
            GATEWAY_USER,
        ])
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--helper-socket")
        .arg(dir.path().join("no-helper.sock"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("localhost:{port}");
    let mut up = false;
    for _ in 0..200 {
        let probe = Command::new("curl")
            .args(["-fsS", "--cacert"])
            .arg(&cert)
            .arg(format!("https://{base}/health"))
            .output()
            .unwrap();
        if probe.status.success() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let checks = std::panic::catch_unwind(|| {
        assert!(up, "the gateway never served https");
        let (code, head, body) = curl(&[&format!("http://{base}/status/abc?x=1")]);
        assert_eq!(code, 308, "{head}");
        assert!(
            head.contains(&format!("location: https://{base}/status/abc?x=1")),
            "{head}"
        );
        assert!(json_of(&body)["error"]
            .as_str()
            .unwrap()
            .contains("https://"));
        let (code, _, body) = curl(&["-X", "POST", "-F", "a=b", &format!("http://{base}/submit")]);
        assert_eq!(code, 400, "{body}");
        assert!(
            json_of(&body)["error"]
                .as_str()
                .unwrap()
                .contains("https://"),
            "{body}"
        );
        // curl -L follows the redirect to the API.
        let out = Command::new("curl")
            .args(["-fsSL", "--cacert"])
            .arg(&cert)
            .arg(format!("http://{base}/health"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(json_of(&text(&out.stdout))["status"], "healthy");
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
}
