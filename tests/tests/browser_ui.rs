//! The web UI in a real browser: Debian's `chromium`, driven headless by `playwright-core`
//! (`tests/browser/ui.mjs`), against two real stacks (helper + gateway): one with the test
//! defaults, one whose client may submit a single job per hour (to see a 429 in the page).
//! The script runs each scenario in the page as a user would and fails on any console error;
//! a failing scenario leaves a screenshot in `target/browser-screenshots/`. `docs/web-ui.md`
//! says how to run it by hand.
//!
//! Needs `chromium`, `node` and `npm` (packaging/deps.sh installs them); `npm ci` installs the
//! pinned playwright-core from `tests/browser/package-lock.json` (from the npm cache when it
//! has it).

use std::path::{Path, PathBuf};
use std::process::Command;

use sandrun_tests::config;
use sandrun_tests::stack::Stack;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn browser_dir() -> PathBuf {
    workspace().join("tests").join("browser")
}

/// `npm ci` in tests/browser: exactly the locked playwright-core, offline when cached.
fn npm_ci() {
    let out = Command::new("npm")
        .args([
            "ci",
            "--prefer-offline",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ])
        .current_dir(browser_dir())
        .output()
        .expect("run npm (packaging/deps.sh installs it)");
    assert!(
        out.status.success(),
        "npm ci failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn given_a_browser_then_the_ui_runs_streams_uploads_cancels_downloads_verifies_and_fits_a_phone() {
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run packaging/deps.sh"
    );
    npm_ci();
    let stack = Stack::start(&config(""), "");
    // The quota stack keeps the default limits except one job per hour.
    let quota = Stack::start(
        &config(""),
        "[client_limits]\ncpu_seconds_per_minute = 1000\nconcurrent_jobs = 4\njobs_per_hour = 1\n",
    );
    let shots = workspace().join("target").join("browser-screenshots");
    let out = Command::new("node")
        .arg("ui.mjs")
        .current_dir(browser_dir())
        .env("SANDRUN_URL", stack.url(""))
        .env("SANDRUN_QUOTA_URL", quota.url(""))
        .env("SCREENSHOT_DIR", &shots)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "browser scenarios failed (screenshots in {}):\n{stdout}{stderr}",
        shots.display()
    );
    let summary: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("the script's last line is its JSON summary");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["passed"], 8, "every scenario ran: {summary}");
}

#[test]
fn given_accept_headers_then_browsers_get_the_ui_and_api_clients_keep_the_json() {
    let stack = Stack::start(&config(""), "");
    // An API client (curl's `Accept: */*`) gets the JSON service description, marked as varying.
    let api = stack.get("/");
    assert_eq!(api.status, 200);
    assert!(api.json()["worker_id"].is_string(), "{}", api.text());
    assert_eq!(api.header("vary").as_deref(), Some("Accept"));
    // A browser's Accept gets the page, with a strict policy and no inline code.
    let accept = "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    let page = stack.curl(&["-H", accept], "/");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("vary").as_deref(), Some("Accept"));
    assert!(page.text().contains("<title>sandrun</title>"));
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert_eq!(
        page.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    // The same page at /ui/, its assets with their types, /ui redirects, unknown files are 404.
    assert_eq!(stack.get("/ui/").body, page.body);
    let js = stack.get("/ui/app.js");
    assert_eq!(
        js.header("content-type").as_deref(),
        Some("text/javascript; charset=utf-8")
    );
    let css = stack.get("/ui/app.css");
    assert_eq!(
        css.header("content-type").as_deref(),
        Some("text/css; charset=utf-8")
    );
    assert_eq!(stack.get("/ui").status, 301);
    let missing = stack.get("/ui/nope.js");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "file not found");
    // Revalidation: the ETag answers 304 without a body.
    let etag = js.header("etag").expect("an ETag");
    let again = stack.curl(&["-H", &format!("If-None-Match: {etag}")], "/ui/app.js");
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    assert_eq!(js.header("cache-control").as_deref(), Some("no-cache"));
}
