//! The real binary, started as root: it binds, then runs as the unprivileged user with no
//! supplementary groups and no capabilities, and still serves HTTPS. Requires root (CI runs as
//! root); panics otherwise instead of skipping.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use hyper::{Method, StatusCode};

fn require_root() {
    sandrun_test_support::require_root("it starts the gateway as root to check the privilege drop");
}

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

fn start(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sandrun-gateway"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap();
    line.split_once(':')
        .unwrap()
        .1
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn given_root_start_then_gateway_runs_as_nobody_without_groups_or_capabilities() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("dev.pem");
    let mut child = start(&[
        "--dev",
        "--dev-cert-out",
        cert.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--user",
        "nobody",
        "--helper-socket",
        "/nonexistent.sock",
    ]);
    let stdout = child.stdout.take().unwrap();
    let pid = child.id();
    let guard = Gateway(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();

    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    assert_eq!(status_field(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(status_field(pid, "Gid"), format!("{gid} {gid} {gid} {gid}"));
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");

    let pem = std::fs::read(&cert).unwrap();
    let ca = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    let tls = support::tls_connect(addr, ca).await;
    let reply = support::send(
        tls,
        support::build(Method::GET, "/health", &[], Default::default()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["status"], "healthy");
    drop(guard);
}

#[test]
fn given_root_start_and_missing_user_then_gateway_refuses_to_run() {
    require_root();
    let output = Command::new(env!("CARGO_BIN_EXE_sandrun-gateway"))
        .args([
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--user",
            "no-such-user-sandrun-test",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-such-user-sandrun-test"), "{stderr}");
    assert!(output.stdout.is_empty(), "it never started listening");
}
