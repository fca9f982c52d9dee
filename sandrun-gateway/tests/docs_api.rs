//! Runs every `sh` example of `docs/api.md`, in order, in one bash shell, with curl against a real
//! gateway: the documentation cannot drift from the code.

mod support;

use support::TestGateway;

fn shell_blocks(markdown: &str) -> String {
    let mut script = String::new();
    let mut inside = false;
    for line in markdown.lines() {
        match (inside, line.trim_end()) {
            (false, "```sh") => inside = true,
            (true, "```") => {
                inside = false;
                script.push('\n');
            }
            (true, _) => {
                script.push_str(line);
                script.push('\n');
            }
            _ => {}
        }
    }
    script
}

#[tokio::test]
async fn given_api_doc_examples_when_run_with_curl_then_every_one_succeeds() {
    let curl = std::process::Command::new("curl").arg("--version").output();
    assert!(
        curl.is_ok_and(|o| o.status.success()),
        "curl is needed to run the docs examples"
    );
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md")).unwrap();
    let script = shell_blocks(&doc);
    assert!(
        script.matches("curl").count() >= 15,
        "the examples cover the endpoints"
    );
    let gw = TestGateway::start().await;
    let ca = gw.dir.path().join("ca.pem");
    std::fs::write(&ca, &gw.ca_pem).unwrap();
    let output = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("GW", gw.url())
        .env("CA", &ca)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "docs examples failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains(r#""status":"completed""#), "{stdout}");
    assert!(stdout.contains(r#""action":"#), "{stdout}");
    assert!(stdout.contains(r#"{"error":"job not found"}"#), "{stdout}");
    assert!(
        stdout.contains(r#"{"error":"method not allowed"}"#),
        "{stdout}"
    );
    let specs = gw.helper.specs();
    assert!(specs.iter().any(|s| s.bundle.iter().any(|e| matches!(e,
        sandrun_ipc::BundleEntry::File { path, .. } if path.as_str() == "lib/util.py"))));
    gw.shutdown().await;
}
