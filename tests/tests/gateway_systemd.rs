//! sandrun-gateway under systemd: the shipped units (checked with `systemd-analyze verify` and
//! `systemd-analyze security --offline=yes`), and the environment the units give the gateway
//! (a passed TCP listener via `systemd-socket-activate`, `$CREDENTIALS_DIRECTORY`,
//! `$NOTIFY_SOCKET`), since PID 1 here is not systemd.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use sandrun_tests::ensure_built;
use sandrun_tests::helper::{bin_dir, HANG_GUARD};
use sandrun_tests::stack::{ensure_gateway_user, GATEWAY_USER};

const UNITS: [&str; 4] = [
    "sandrund.socket",
    "sandrund.service",
    "sandrun-gateway.socket",
    "sandrun-gateway.service",
];

/// Copies of the shipped units with `ExecStart` pointing at the built binaries (`verify`
/// insists that they exist).
fn units_with_built_binaries() -> tempfile::TempDir {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let dir = tempfile::tempdir().expect("tempdir");
    for name in UNITS {
        let text = fs::read_to_string(shipped.join(name)).expect("read a shipped unit");
        let text = text
            .replace(
                "/usr/bin/sandrun-gateway",
                &bin_dir().join("sandrun-gateway").to_string_lossy(),
            )
            .replace(
                "/usr/bin/sandrund",
                &bin_dir().join("sandrund").to_string_lossy(),
            );
        fs::write(dir.path().join(name), text).expect("write a unit copy");
    }
    dir
}

#[test]
fn given_the_shipped_gateway_units_then_systemd_analyze_verify_accepts_them() {
    ensure_built();
    let dir = units_with_built_binaries();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(UNITS.map(|u| dir.path().join(u)))
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let relevant: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("sandrun"))
        .filter(|l| !l.contains("Documentation"))
        .collect();
    assert!(
        out.status.success() && relevant.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn given_the_gateway_service_then_its_offline_security_exposure_is_at_most_5() {
    ensure_built();
    let dir = units_with_built_binaries();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(dir.path().join("sandrun-gateway.service"))
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"));
    let line = line.unwrap_or_else(|| {
        panic!(
            "no exposure line: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // "→ Overall exposure level for sandrun-gateway.service: 1.2 OK 🙂"
    let level: f64 = line
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the exposure level from {line:?}"));
    assert!(level <= 5.0, "exposure {level} > 5:\n{stdout}");
}

/// Kills the child (and so the gateway that `systemd-socket-activate` became) on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A self-signed certificate for localhost and 127.0.0.1, and its key, both 0600.
fn make_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "2", "-subj", "/CN=localhost"])
        .args([
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl req");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in [&cert, &key] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    (cert, key)
}

/// A directory laid out like systemd's `$CREDENTIALS_DIRECTORY` for the gateway unit.
fn credentials_dir(root: &Path) -> PathBuf {
    let creds = root.join("credentials");
    fs::create_dir(&creds).expect("mkdir credentials");
    make_certificate(&creds);
    let out = Command::new(bin_dir().join("sandrun-gateway"))
        .args(["keygen", "--out"])
        .arg(creds.join("worker.key"))
        .output()
        .expect("run keygen");
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    creds
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    l.local_addr().expect("local addr").port()
}

/// The worker id (public key hex) of a worker key, computed by openssl.
fn openssl_worker_id(key: &Path) -> String {
    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(key)
        .output()
        .expect("run openssl pkey");
    assert!(
        out.status.success(),
        "openssl pkey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    hex::encode(&out.stdout[out.stdout.len().saturating_sub(32)..])
}

/// Starts the gateway the way its units do: listener passed by `systemd-socket-activate`,
/// credentials and notify socket in the environment, no TLS or key flags.
fn start_activated(port: u16, creds: &Path, notify: &Path) -> (KillOnDrop, mpsc::Receiver<String>) {
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg("-E")
        .arg(format!("CREDENTIALS_DIRECTORY={}", creds.display()))
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify.display()))
        .arg(bin_dir().join("sandrun-gateway"))
        .args([
            "--helper-socket",
            "/nonexistent/sandrund.sock",
            "--user",
            GATEWAY_USER,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (package systemd) must be installed");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (KillOnDrop(child), rx)
}

#[test]
fn given_systemds_environment_then_the_gateway_uses_its_socket_credentials_and_notify_socket() {
    sandrun_tests::require_root();
    ensure_built();
    ensure_gateway_user();
    let dir = tempfile::tempdir().expect("tempdir");
    // The gateway sends READY=1 after dropping to GATEWAY_USER: it must reach the socket.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let creds = credentials_dir(dir.path());
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o777)).expect("chmod");
    notify
        .set_read_timeout(Some(HANG_GUARD))
        .expect("set timeout");
    let port = free_port();

    // With socket activation, nothing is listening until the first connection starts the
    // gateway; systemd-socket-activate listens first and starts it on that connection.
    let (_gateway, lines) = start_activated(port, &creds, &notify_path);
    let url = format!("https://localhost:{port}/health");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "60",
            "--retry",
            "20",
            "--retry-connrefused",
            "--cacert",
        ])
        .arg(creds.join("cert.pem"))
        .args(["--resolve", &resolve, &url])
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl /health: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let health: serde_json::Value = serde_json::from_slice(&out.stdout).expect("health JSON");
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(
        health["worker_id_hex"],
        openssl_worker_id(&creds.join("worker.key")),
        "the worker key comes from the credentials directory"
    );

    let listening = lines
        .recv_timeout(HANG_GUARD)
        .expect("the gateway printed its address");
    assert_eq!(
        listening,
        format!("listening on 127.0.0.1:{port}"),
        "it used the passed socket"
    );
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .expect("a notification from the gateway");
    assert_eq!(&buf[..n], b"READY=1\n");
}
