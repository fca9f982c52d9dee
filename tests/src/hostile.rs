//! Shared checks for the hostile-world tests (`tests/hostile_*.rs`, `faults.rs`, `soak.rs`): what
//! must hold after an attack or a crash. Every helper here looks at the host from outside, the
//! way an operator would: `/proc`, the cgroup tree, mountinfo, `/proc/meminfo`.

use std::fs;
use std::io::Write as _;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandrun_ipc::{AdminRequest, AdminResponse, Response, Stats};

use crate::host::{processes_with_uids, runs_as_root, status_field};
use crate::Helper;

/// Live (not zombie) host processes whose real or effective uid is in `uids`.
pub fn live_processes_with_uids(uids: &Range<u32>) -> Vec<(i32, u32, String)> {
    processes_with_uids(uids)
        .into_iter()
        .filter(|(pid, _, _)| !is_zombie_or_gone(*pid))
        .collect()
}

fn is_zombie_or_gone(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    matches!(state, Some('Z') | None)
}

/// Polls `check` every 10 ms until it returns `true` or `deadline` passes; returns the last
/// answer. Used for "gone within 1 s" assertions: the deadline is the assertion.
pub fn eventually(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= end {
            return check();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The helper's `stats` answer (as root, over the admin role).
pub fn helper_stats(helper: &Helper) -> Stats {
    match helper.admin(AdminRequest::Stats) {
        Response::Admin(AdminResponse::Stats(s)) => s,
        other => panic!("stats: unexpected answer {other:?}"),
    }
}

/// Finished jobs by reason name, from the helper's stats.
pub fn finished_by_reason(stats: &Stats) -> Vec<(&'static str, u64)> {
    stats
        .jobs_by_reason
        .iter()
        .map(|(r, n)| (r.as_str(), *n))
        .collect()
}

/// Peak resident set size (`VmHWM`) of `pid` in KiB.
pub fn vm_hwm_kib(pid: i32) -> u64 {
    status_kib(pid, "VmHWM")
}

/// A `... kB` field of `/proc/<pid>/status`. Panics when the process is gone or the field is
/// missing: a reading of 0 would pass every "memory stayed bounded" check.
pub fn status_kib(pid: i32, key: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    kib_field(&status, key).unwrap_or_else(|| panic!("no {key} in {path}:\n{status}"))
}

/// `Shmem` of `/proc/meminfo` in KiB: tmpfs pages (job roots live there). Panics when it cannot
/// be read, as [`status_kib`] does.
pub fn host_shmem_kib() -> u64 {
    let meminfo = fs::read_to_string("/proc/meminfo")
        .unwrap_or_else(|e| panic!("cannot read /proc/meminfo: {e}"));
    kib_field(&meminfo, "Shmem").unwrap_or_else(|| panic!("no Shmem in /proc/meminfo"))
}

/// The number of a `key: N kB` line.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Whether `pid` is an idle warm sandbox init: a child of a helper named `sandrun-init` (C, a
/// fork of the helper, renames itself first thing)
/// still running as root. An init drops to its job's uid as soon as it
/// gets a job, so a sandbox that ran a job never counts as idle.
pub fn is_idle_warm_init(pid: &str) -> bool {
    let named = |pid: &str, name: &str| status_field(pid, "Name").is_some_and(|n| n == name);
    named(pid, INIT_NAME)
        && runs_as_root(pid)
        && status_field(pid, "PPid").is_some_and(|parent| named(&parent, "sandrund"))
}

/// The name a sandbox's init (a fork of the helper) gives itself at once, so that the job does
/// not see the helper's command line as `/proc/1/cmdline`.
pub const INIT_NAME: &str = "sandrun-init";

/// Mount points in any mount namespace (every process's mountinfo) whose line mentions
/// `needle`, as "pid: line". A sandbox that outlived its job shows up here; the helper's idle
/// warm sandboxes, which it keeps by design, do not.
pub fn mounts_anywhere_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if is_idle_warm_init(pid) {
            continue;
        }
        let Ok(text) = fs::read_to_string(e.path().join("mountinfo")) else {
            continue;
        };
        out.extend(
            text.lines()
                .filter(|l| l.contains(needle))
                .map(|l| format!("{pid}: {l}")),
        );
    }
    out.sort();
    out.dedup_by(|a, b| a.split_once(": ").map(|x| x.1) == b.split_once(": ").map(|x| x.1));
    out
}

/// Job cgroups (`job-*`) left below any of `roots`.
pub fn job_cgroups_below(roots: &[PathBuf]) -> Vec<PathBuf> {
    crate::cgroup::job_dirs_below(roots)
}

/// How many idle warm sandboxes helper `helper` holds (its children that [`is_idle_warm_init`]).
pub fn idle_warm_inits_of(helper: i32) -> usize {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    let parent = helper.to_string();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| status_field(pid, "PPid").is_some_and(|p| p == parent))
        .filter(|pid| is_idle_warm_init(pid))
        .count()
}

/// Waits (up to 30 s) until helper `pid` holds `warm` idle warm sandboxes, then returns its
/// settled descriptor count ([`settled_fd_count`]). Each warm sandbox holds descriptors in the
/// helper, so a count taken while the pool is refilling (slow on a loaded machine) is lower
/// than the helper's idle count and a later, full pool would look like a leak.
pub fn fd_count_with_full_pool(pid: i32, warm: usize) -> usize {
    let full = eventually(Duration::from_secs(30), || idle_warm_inits_of(pid) == warm);
    assert!(
        full,
        "helper {pid} holds {} idle warm sandboxes, not {warm}",
        idle_warm_inits_of(pid)
    );
    settled_fd_count(pid)
}

/// The lowest of a few samples of `pid`'s descriptor count (a connection being closed right
/// now is not a leak).
pub fn settled_fd_count(pid: i32) -> usize {
    (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            crate::host::fd_count(pid)
        })
        .min()
        .unwrap_or(0)
}

/// Samples until `pid`'s descriptor count is at most `bound` (a leak never gets there) or two
/// seconds passed; returns the last count.
pub fn fd_count_once_at_most(pid: i32, bound: usize) -> usize {
    let mut n = crate::host::fd_count(pid);
    let _ = eventually(Duration::from_secs(2), || {
        n = crate::host::fd_count(pid);
        n <= bound
    });
    n
}

/// Deterministic pseudo-random bytes, for payloads that must not compress.
pub use sandrun_test_support::noise;

/// A TLS stream to the gateway, opened by [`tls_connect`].
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TCP connection to `addr` from the loopback address `source` (127.0.0.0/8 is all local, so
/// a test can be several "clients" with their own per-IP quotas).
pub fn tcp_from(
    source: std::net::Ipv4Addr,
    addr: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    tcp_from_with(source, addr, nix::sys::socket::SockFlag::empty())
}

/// Like [`tcp_from`], but non-blocking from the start: `connect` does not wait for the server
/// (an attacker opening hundreds of connections does not wait for each one).
pub fn tcp_from_nonblocking(
    source: std::net::Ipv4Addr,
    addr: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    tcp_from_with(source, addr, nix::sys::socket::SockFlag::SOCK_NONBLOCK)
}

fn tcp_from_with(
    source: std::net::Ipv4Addr,
    addr: std::net::SocketAddr,
    flags: nix::sys::socket::SockFlag,
) -> std::io::Result<std::net::TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let std::net::SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::other(
            "the gateway listens on IPv4 in tests",
        ));
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | flags,
        None,
    )?;
    let [a, b, c, d] = source.octets();
    bind(fd.as_raw_fd(), &SockaddrIn::new(a, b, c, d, 0))?;
    match connect(fd.as_raw_fd(), &SockaddrIn::from(v4)) {
        Err(nix::errno::Errno::EINPROGRESS) if flags.contains(SockFlag::SOCK_NONBLOCK) => {}
        other => other?,
    }
    Ok(std::net::TcpStream::from(fd))
}

/// A TLS client configuration trusting only the PEM certificate at `ca`.
pub fn tls_client_config(ca: &std::path::Path) -> std::sync::Arc<rustls::ClientConfig> {
    let pem = fs::read(ca).expect("read the gateway's dev certificate");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(cert.expect("valid PEM certificate"))
            .expect("add root certificate");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// Opens TLS to the gateway at `addr` from `source`, without completing the handshake (it
/// completes on first use, or with [`TlsStream`]'s `conn.complete_io`).
pub fn tls_connect(
    config: &std::sync::Arc<rustls::ClientConfig>,
    source: std::net::Ipv4Addr,
    addr: std::net::SocketAddr,
) -> std::io::Result<TlsStream> {
    tls_over(config, tcp_from(source, addr)?)
}

/// TLS (handshake not started) over an existing TCP stream.
pub fn tls_over(
    config: &std::sync::Arc<rustls::ClientConfig>,
    tcp: std::net::TcpStream,
) -> std::io::Result<TlsStream> {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("valid server name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::clone(config), name)
        .map_err(std::io::Error::other)?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// Sends `request` (a complete HTTP/1.1 request, which should say `Connection: close`) and
/// reads the answer until the server closes. Reading goes on while writing, and writing stops
/// once an answer arrives: a server that refuses a request early (413, 431) and closes must not
/// make the client lose that answer to a reset. Returns the status code (0 if none arrived) and
/// the raw answer.
pub fn raw_https(
    config: &std::sync::Arc<rustls::ClientConfig>,
    source: std::net::Ipv4Addr,
    addr: std::net::SocketAddr,
    request: &[u8],
) -> (u16, Vec<u8>) {
    let Ok(mut s) = tls_connect(config, source, addr) else {
        return (0, Vec::new());
    };
    if s.sock.set_nonblocking(true).is_err() {
        return (0, Vec::new());
    }
    let deadline = Instant::now() + crate::helper::HANG_GUARD;
    let (mut written, mut answer) = (0, Vec::new());
    while Instant::now() < deadline {
        if answer.is_empty() && written < request.len() {
            written += s.conn.writer().write(&request[written..]).unwrap_or(0);
        }
        let wrote = pump_tls_writes(&mut s);
        match pump_tls_reads(&mut s, &mut answer) {
            Pumped::Closed => break,
            Pumped::Progress => {}
            Pumped::Idle if wrote => {}
            Pumped::Idle => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    (http_status(&answer), answer)
}

enum Pumped {
    Progress,
    Idle,
    Closed,
}

fn pump_tls_writes(s: &mut TlsStream) -> bool {
    let mut any = false;
    while s.conn.wants_write() {
        match s.conn.write_tls(&mut s.sock) {
            Ok(n) if n > 0 => any = true,
            _ => break,
        }
    }
    any
}

fn pump_tls_reads(s: &mut TlsStream, answer: &mut Vec<u8>) -> Pumped {
    use std::io::Read;
    let got = match s.conn.read_tls(&mut s.sock) {
        Ok(0) => return Pumped::Closed,
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(_) => return Pumped::Closed,
    };
    if s.conn.process_new_packets().is_err() {
        return Pumped::Closed;
    }
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.conn.reader().read(&mut buf) {
            Ok(0) => return Pumped::Closed,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return Pumped::Closed,
        }
    }
    if got > 0 {
        Pumped::Progress
    } else {
        Pumped::Idle
    }
}

/// The status code of a raw HTTP/1.1 answer, or 0.
pub fn http_status(answer: &[u8]) -> u16 {
    let head = String::from_utf8_lossy(&answer[..answer.len().min(64)]);
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3)?.parse().ok())
        .unwrap_or(0)
}
