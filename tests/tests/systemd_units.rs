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

/// The offline exposure level `systemd-analyze security --offline=true` gives a shipped unit
/// (the VM suite, tests/vm/guest.sh, checks the same targets on a real systemd).
fn offline_exposure(unit: &str) -> (f64, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(unit);
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run systemd-analyze ({e}): install the systemd package (packaging/deps.sh)"
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // "→ Overall exposure level for sandrund.service: 3.8 OK 🙂"
    let level = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .and_then(|l| l.rsplit_once(": "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level for {unit}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (level, stdout)
}

#[test]
fn given_the_helper_unit_then_its_offline_exposure_is_at_most_4() {
    let (level, report) = offline_exposure("sandrund.service");
    assert!(
        level <= 4.0,
        "sandrund.service exposure {level} > 4.0:\n{report}"
    );
}

#[test]
fn given_the_gateway_unit_then_its_offline_exposure_is_at_most_1_5() {
    let (level, report) = offline_exposure("sandrun-gateway.service");
    assert!(
        level <= 1.5,
        "sandrun-gateway.service exposure {level} > 1.5:\n{report}"
    );
}

/// The `[Service]` settings of a shipped unit, as (key, value) pairs in file order.
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(unit);
    let text = std::fs::read_to_string(&path).expect("read a shipped unit");
    let mut in_service = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
    }
    out
}

/// The unit's seccomp filters, device policy and IP filter are inherited by every job: the
/// directives that would break jobs (docs/operations.md, "Hardening", says why each is left
/// out) must stay out however much they would lower the score, and the ones jobs rely on must
/// leave them what they need.
#[test]
fn given_the_helper_unit_then_it_keeps_out_what_breaks_jobs() {
    let settings = service_settings("sandrund.service");
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (key, why) in [
        ("PrivateDevices", "it drops CAP_MKNOD: the jobs' /dev nodes"),
        ("ProtectHostname", "each job sets its hostname"),
        ("MemoryDenyWriteExecute", "node's JIT dies under it"),
        (
            "RestrictNamespaces",
            "the helper creates the jobs' namespaces",
        ),
        (
            "PrivateUsers",
            "the helper needs root in the initial user namespace",
        ),
        (
            "ProtectControlGroups",
            "the helper writes its delegated cgroup subtree, read-only under it (systemd 252, VM suite)",
        ),
    ] {
        let v = get(key);
        assert!(
            v.iter().all(|v| matches!(*v, "no" | "false" | "")),
            "sandrund.service sets {key}={v:?}, which breaks jobs: {why}"
        );
    }
    // Every IP allowed must be a loopback one: a job's TCP to its own 127.0.0.1 must work.
    if get("IPAddressDeny").contains(&"any") {
        assert_eq!(
            get("IPAddressAllow"),
            ["localhost"],
            "IPAddressDeny=any needs IPAddressAllow=localhost (jobs use their own loopback)"
        );
    }
    // Jobs get AF_UNIX, AF_INET and AF_INET6 (the helper brings up their loopback over AF_INET).
    let families: Vec<&str> = get("RestrictAddressFamilies")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    for f in ["AF_UNIX", "AF_INET", "AF_INET6"] {
        assert!(
            families.contains(&f),
            "RestrictAddressFamilies={families:?} lacks {f}, which jobs use"
        );
    }
    // The device policy reaches the job cgroups: every device a sandbox gets (mknod'ed, so "m").
    if get("DevicePolicy").contains(&"closed") || get("DevicePolicy").contains(&"strict") {
        let allowed = get("DeviceAllow");
        for dev in ["null", "zero", "full", "random", "urandom"] {
            let want = format!("/dev/{dev} rwm");
            assert!(
                allowed.contains(&want.as_str()),
                "DeviceAllow= lacks {want:?} (DevicePolicy=closed): {allowed:?}"
            );
        }
    }
    // The capabilities: exactly those self_check (sandrund/src/daemon.rs) requires, and CAP_MKNOD.
    let caps: Vec<&str> = get("CapabilityBoundingSet")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    for cap in [
        "CAP_SYS_ADMIN",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_KILL",
        "CAP_NET_ADMIN",
        "CAP_CHOWN",
        "CAP_FOWNER",
        "CAP_DAC_OVERRIDE",
        "CAP_MKNOD",
    ] {
        assert!(
            caps.contains(&cap),
            "CapabilityBoundingSet={caps:?} lacks {cap}"
        );
    }
}
