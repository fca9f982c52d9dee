//! sandrund under systemd: socket activation (tested with `systemd-socket-activate`, since PID 1
//! here is not systemd) and the shipped unit files (checked with `systemd-analyze`).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandrun_ipc::blocking::ClientChannel;
use sandrun_ipc::{AdminRequest, AdminResponse, Hello, Request, Response, Role, PROTOCOL_VERSION};
use sandrun_tests::helper::bin_dir;
use sandrun_tests::{ensure_built, require_root};

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Kill the whole process group: systemd-socket-activate execs sandrund in place.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connect_with_retry(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    }
}

#[test]
fn given_socket_activation_then_sandrund_serves_on_the_passed_socket() {
    require_root();
    ensure_built();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("activated.sock");
    let cfg = dir.path().join("sandrund.toml");
    // A slot uid range of its own, held while this helper runs.
    let slots = sandrun_tests::config("");
    std::fs::write(
        &cfg,
        format!(
            "mount_point = \"{}/root\"\n{}",
            dir.path().display(),
            slots.toml()
        ),
    )
    .unwrap();
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let child = Command::new("systemd-socket-activate")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg("-l")
        .arg(&sock)
        .arg(bin_dir().join("sandrund"))
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (package systemd) must be installed");
    let _guard = KillOnDrop(child);

    let stream = connect_with_retry(&sock);
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut ch = ClientChannel::new(stream);
    ch.send(&Request::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Admin,
    }))
    .unwrap();
    assert!(matches!(ch.recv().unwrap(), Response::Hello(_)));
    ch.send(&Request::Admin(AdminRequest::Stats)).unwrap();
    match ch.recv().unwrap() {
        Response::Admin(AdminResponse::Stats(s)) => assert_eq!(s.running, 0),
        other => panic!("expected stats, got {other:?}"),
    }
    // Readiness reached the notify socket once the helper was serving.
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .expect("sandrund sent no sd_notify message");
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(
        msg.lines().any(|l| l == "READY=1"),
        "notify message: {msg:?}"
    );
}

#[test]
fn given_the_shipped_unit_files_then_systemd_analyze_accepts_them() {
    ensure_built();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    // `verify` insists that ExecStart exists: point a copy of the service at the built binary.
    let dir = tempfile::tempdir().unwrap();
    for name in ["sandrund.socket", "sandrund.service"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        let text = text.replace(
            "/usr/bin/sandrund",
            &bin_dir().join("sandrund").to_string_lossy(),
        );
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("sandrund.socket"))
        .arg(dir.path().join("sandrund.service"))
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let relevant: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("sandrund"))
        .filter(|l| !l.contains("Documentation"))
        .collect();
    assert!(
        out.status.success() && relevant.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
