//! The whole sandrun stack for one test: a real `sandrund` ([`Helper`]) and a real
//! `sandrun-gateway` in front of it, with real TLS (the gateway's `--dev` certificate, which the
//! clients here trust explicitly) and a worker key made by `sandrun-gateway keygen`.
//!
//! The gateway is started as root and drops to a dedicated unprivileged user ([`GATEWAY_USER`],
//! created once if missing); the helper is configured with that user as `gateway_user`. The
//! gateway reaches the helper through a symlink in the stack's directory, so
//! [`Stack::restart_helper`] can put a fresh helper behind the same socket path, as systemd
//! socket activation would.
//!
//! HTTP goes through `curl` (a real, independent client); the WebSocket client is `tungstenite`
//! over `rustls`, and records when each event arrived.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Once};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rustls::pki_types::ServerName;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

use crate::helper::{bin_dir, Helper, HANG_GUARD};
use crate::slots::Config;

/// The unprivileged user the gateway drops to in tests (and the helper's `gateway_user`).
pub const GATEWAY_USER: &str = "sandrun-test";

/// Gateway settings every stack gets unless the test's own TOML has the same table: quotas high
/// enough for a test that submits many jobs, and failed jobs kept long enough to inspect.
const GATEWAY_DEFAULT_TABLES: [(&str, &str); 2] = [
    (
        "[client_limits]",
        "cpu_seconds_per_minute = 100000\nconcurrent_jobs = 64\njobs_per_hour = 100000\n",
    ),
    ("[retention]", "failed_ttl_s = 3600\n"),
];

/// A running helper and gateway. Dropping it stops both; on a panic their logs are printed.
pub struct Stack {
    gateway: Option<Child>,
    addr: SocketAddr,
    helper: Helper,
    /// Helpers replaced by [`Stack::restart_helper`], kept for their logs and clean-up.
    retired: Vec<Helper>,
    helper_config: Config,
    dir: tempfile::TempDir,
}

/// One HTTP answer, as curl saw it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// The raw response head (status line and headers).
    pub headers: String,
    pub body: Vec<u8>,
}

/// One part of a `multipart/form-data` upload.
#[derive(Debug, Clone)]
pub enum Part {
    /// A `files` part with this filename (it may carry a relative path, `src/util.py`).
    File { filename: String, data: Vec<u8> },
    /// The `manifest` part (a text field, no filename).
    Manifest(String),
    /// The `stdin` part: the job's standard input (sent as a file, so any bytes).
    Stdin(Vec<u8>),
}

impl Part {
    pub fn file(filename: &str, data: impl Into<Vec<u8>>) -> Part {
        Part::File {
            filename: filename.to_owned(),
            data: data.into(),
        }
    }

    pub fn manifest(json: &serde_json::Value) -> Part {
        Part::Manifest(json.to_string())
    }
}

impl HttpResponse {
    /// The body as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

impl Stack {
    /// Starts a helper with `helper_config` (from [`crate::config`]; `gateway_user` is added)
    /// and a gateway with `gateway_config_toml` (top-level keys first; a table given here
    /// replaces the stack's default for it), and waits until both serve. The stack, and every
    /// helper it restarts, holds `helper_config`'s slot uid range.
    pub fn start(helper_config: &Config, gateway_config_toml: &str) -> Stack {
        crate::require_root();
        crate::ensure_built();
        ensure_gateway_user();
        let helper_config =
            helper_config.with_top_level(&format!("gateway_user = \"{GATEWAY_USER}\""));
        let helper = Helper::start(&helper_config);
        let dir = tempfile::Builder::new()
            .prefix("sandrun-stack-")
            .tempdir()
            .expect("tempdir");
        // The gateway, once unprivileged, must traverse this directory to reach the symlink.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut stack = Stack {
            gateway: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            helper,
            retired: Vec::new(),
            helper_config,
            dir,
        };
        stack.point_socket_link_at_helper();
        stack.write_gateway_config(gateway_config_toml);
        stack.keygen();
        stack.spawn_gateway();
        stack
    }

    /// `https://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// The gateway's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn helper(&self) -> &Helper {
        &self.helper
    }

    pub fn helper_mut(&mut self) -> &mut Helper {
        &mut self.helper
    }

    /// The stack's own directory (0755): gateway config, certificate, keys, scratch files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The development certificate the gateway serves (PEM), for clients to trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The worker key (PKCS#8 PEM, 0600) the gateway signs results with.
    pub fn worker_key_path(&self) -> PathBuf {
        self.dir.path().join("worker.key")
    }

    /// Whether `openssl` (not the gateway's own code) verifies `sig` over `msg` with the public
    /// half of the worker key: an independent check of a result signature.
    pub fn openssl_verifies(&self, msg: &[u8], sig: &[u8]) -> bool {
        let scratch = tempfile::tempdir_in(self.dir.path()).expect("openssl scratch dir");
        let pub_pem = scratch.path().join("worker.pub.pem");
        let out = Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(self.worker_key_path())
            .arg("-out")
            .arg(&pub_pem)
            .output()
            .expect("run openssl (package openssl must be installed)");
        assert!(out.status.success(), "openssl pkey: {out:?}");
        let (m, s) = (scratch.path().join("msg"), scratch.path().join("sig"));
        fs::write(&m, msg).expect("write msg");
        fs::write(&s, sig).expect("write sig");
        Command::new("openssl")
            .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
            .arg(&pub_pem)
            .args(["-rawin", "-in"])
            .arg(&m)
            .arg("-sigfile")
            .arg(&s)
            .output()
            .expect("run openssl pkeyutl")
            .status
            .success()
    }

    /// The socket path the gateway was given (a symlink to the current helper's socket).
    pub fn helper_socket_link(&self) -> PathBuf {
        self.dir.path().join("helper.sock")
    }

    /// The gateway's stderr so far.
    pub fn gateway_log(&self) -> String {
        fs::read_to_string(self.gateway_log_path()).unwrap_or_default()
    }

    pub fn gateway_pid(&self) -> i32 {
        let child = self.gateway.as_ref().expect("the gateway is running");
        i32::try_from(child.id()).expect("pid fits in i32")
    }

    /// Whether the gateway process is still alive.
    pub fn gateway_is_alive(&mut self) -> bool {
        self.gateway
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILLs the helper and waits until it is reaped. Its sandboxes are not touched here:
    /// whether they die with it is for the test to check.
    pub fn kill_helper(&mut self) {
        let pid = Pid::from_raw(self.helper.pid());
        let _ = kill(pid, Signal::SIGKILL);
        let deadline = Instant::now() + HANG_GUARD;
        while self.helper.is_alive() {
            assert!(Instant::now() < deadline, "the helper survived SIGKILL");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts a fresh helper with the same configuration (killing the current one first if it
    /// still runs) and points the gateway's socket path at it.
    pub fn restart_helper(&mut self) {
        if self.helper.is_alive() {
            self.kill_helper();
        }
        let fresh = Helper::start(&self.helper_config);
        let old = std::mem::replace(&mut self.helper, fresh);
        self.retired.push(old);
        self.point_socket_link_at_helper();
    }

    /// SIGKILLs the gateway and reaps it.
    pub fn kill_gateway(&mut self) {
        if let Some(mut child) = self.gateway.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs `curl` against the gateway with `args` (after the common TLS and output options)
    /// and returns the answer. `path` is appended to the base URL.
    pub fn curl(&self, args: &[&str], path: &str) -> HttpResponse {
        let scratch = tempfile::tempdir_in(self.dir.path()).expect("curl scratch dir");
        let body = scratch.path().join("body");
        let head = scratch.path().join("head");
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "120", "--cacert"])
            .arg(self.ca_path())
            .arg("-o")
            .arg(&body)
            .arg("-D")
            .arg(&head)
            .args(["-w", "%{http_code}"])
            .args(args)
            .arg(self.url(path))
            .output()
            .expect("run curl (package curl must be installed)");
        self.http_response(&out, &head, &body)
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> HttpResponse {
        self.curl(&[], path)
    }

    /// `GET path`, expecting a JSON answer: returns the status and the JSON.
    pub fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.get(path);
        (r.status, r.json())
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> HttpResponse {
        self.curl(&["-X", "DELETE"], path)
    }

    /// `POST /submit` as `multipart/form-data` with `parts`.
    pub fn submit(&self, parts: &[Part]) -> HttpResponse {
        self.submit_with(&[], parts)
    }

    /// `POST /submit` from the loopback source address `source` (`127.0.0.2`, ...), so the
    /// gateway sees another client: curl binds its socket there (`--interface`).
    pub fn submit_from(&self, source: std::net::Ipv4Addr, parts: &[Part]) -> HttpResponse {
        let source = source.to_string();
        self.submit_with(&["--interface", &source], parts)
    }

    /// `curl` from the loopback source address `source`: as [`Stack::curl`], from another client.
    pub fn curl_from(&self, source: std::net::Ipv4Addr, args: &[&str], path: &str) -> HttpResponse {
        let source = source.to_string();
        let mut all = vec!["--interface", source.as_str()];
        all.extend_from_slice(args);
        self.curl(&all, path)
    }

    /// `POST path` (`/run?wait=1`, ...) as `multipart/form-data` with `parts`.
    pub fn post_parts(&self, path: &str, parts: &[Part]) -> HttpResponse {
        self.post_parts_with(&[], path, parts)
    }

    /// `POST /submit` with `extra` curl arguments first (`--interface`, `-H`, ...).
    pub fn submit_with(&self, extra: &[&str], parts: &[Part]) -> HttpResponse {
        self.post_parts_with(extra, "/submit", parts)
    }

    fn post_parts_with(&self, extra: &[&str], target: &str, parts: &[Part]) -> HttpResponse {
        let files = tempfile::tempdir_in(self.dir.path()).expect("upload scratch dir");
        let mut args: Vec<String> = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let path = files.path().join(i.to_string());
            let field = match part {
                Part::File { filename, data } => {
                    fs::write(&path, data).expect("write upload part");
                    format!("files=@{};filename={filename}", path.display())
                }
                Part::Manifest(json) => {
                    fs::write(&path, json).expect("write manifest part");
                    format!("manifest=<{}", path.display())
                }
                Part::Stdin(data) => {
                    fs::write(&path, data).expect("write stdin part");
                    format!("stdin=@{};filename=stdin", path.display())
                }
            };
            args.push("-F".to_owned());
            args.push(field);
        }
        let mut all: Vec<&str> = extra.to_vec();
        all.extend(args.iter().map(String::as_str));
        self.curl(&all, target)
    }

    /// Submits `parts` and returns the job id; panics unless the gateway accepted the job.
    pub fn submit_ok(&self, parts: &[Part]) -> String {
        let r = self.submit(parts);
        assert_eq!(r.status, 200, "submit refused: {}", r.text());
        let id = r.json()["job_id"].as_str().map(str::to_owned);
        id.unwrap_or_else(|| panic!("no job_id in {}", r.text()))
    }

    /// Polls `/status/{id}` until the job is `completed` or `failed` and returns that status.
    pub fn wait_finished(&self, id: &str) -> serde_json::Value {
        self.wait_status(id, |s| s == "completed" || s == "failed")
    }

    /// Polls `/status/{id}` until `done(status)` holds and returns the whole status.
    pub fn wait_status(&self, id: &str, done: impl Fn(&str) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let (code, status) = self.get_json(&format!("/status/{id}"));
            assert_eq!(code, 200, "GET /status/{id}: {status}");
            if done(status["status"].as_str().unwrap_or_default()) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never reached the state: {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Opens the WebSocket `/ws/{id}` (or any `path`) over TLS.
    pub fn ws(&self, path: &str) -> WsClient {
        WsClient::connect(self.addr, &self.ca_path(), path)
    }

    fn http_response(&self, out: &Output, head: &Path, body: &Path) -> HttpResponse {
        let code = String::from_utf8_lossy(&out.stdout);
        let status = match code.trim().parse::<u16>() {
            Ok(s) if s != 0 => s,
            _ => panic!(
                "curl got no HTTP answer ({}): {}\ngateway log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.gateway_log()
            ),
        };
        HttpResponse {
            status,
            headers: fs::read_to_string(head).unwrap_or_default(),
            body: fs::read(body).unwrap_or_default(),
        }
    }

    fn gateway_log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    fn gateway_config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    /// Atomically (re)points `helper.sock` at the current helper's socket.
    fn point_socket_link_at_helper(&self) {
        let link = self.helper_socket_link();
        let tmp = self.dir.path().join("helper.sock.new");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(self.helper.socket(), &tmp).expect("symlink helper socket");
        fs::rename(&tmp, &link).expect("replace the helper socket link");
    }

    fn write_gateway_config(&self, test_toml: &str) {
        let mut text = format!("{test_toml}\n");
        for (table, body) in GATEWAY_DEFAULT_TABLES {
            if !test_toml.contains(table) {
                text.push_str(&format!("{table}\n{body}"));
            }
        }
        fs::write(self.gateway_config_path(), text).expect("write gateway config");
    }

    fn keygen(&self) {
        let out = Command::new(bin_dir().join("sandrun-gateway"))
            .args(["keygen", "--out"])
            .arg(self.worker_key_path())
            .output()
            .expect("run sandrun-gateway keygen");
        assert!(
            out.status.success(),
            "keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn spawn_gateway(&mut self) {
        let log = fs::File::create(self.gateway_log_path()).expect("create gateway log");
        let mut cmd = Command::new(bin_dir().join("sandrun-gateway"));
        cmd.args(["--dev", "--listen", "127.0.0.1:0", "--user", GATEWAY_USER])
            .arg("--dev-cert-out")
            .arg(self.ca_path())
            .arg("--helper-socket")
            .arg(self.helper_socket_link())
            .arg("--config")
            .arg(self.gateway_config_path())
            .arg("--worker-key")
            .arg(self.worker_key_path())
            .env(
                "RUST_LOG",
                std::env::var("SANDRUN_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().expect("spawn sandrun-gateway");
        let stdout = child.stdout.take().expect("piped stdout");
        self.gateway = Some(child);
        self.addr = self.wait_listening(stdout);
    }

    /// Reads the gateway's stdout until `listening on ADDR`; keeps draining it afterwards.
    fn wait_listening(&mut self, stdout: std::process::ChildStdout) -> SocketAddr {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let (false, Some(addr)) = (sent, line.strip_prefix("listening on ")) {
                    sent = tx.send(addr.trim().to_owned()).is_ok();
                }
            }
        });
        match rx.recv_timeout(HANG_GUARD) {
            Ok(addr) => addr.parse().expect("the gateway printed a socket address"),
            Err(_) => panic!(
                "the gateway never printed `listening on`; log:\n{}",
                self.gateway_log()
            ),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(child) = self.gateway.take() {
            crate::helper::terminate(child);
        }
        if std::thread::panicking() {
            eprintln!("----- sandrun-gateway log -----\n{}", self.gateway_log());
            for (i, old) in self.retired.iter().enumerate() {
                eprintln!("----- retired sandrund #{i} log -----\n{}", old.log());
            }
        }
    }
}

/// One WebSocket text message, parsed as JSON, with the moment it was received.
#[derive(Debug, Clone)]
pub struct WsEvent {
    pub at: Instant,
    pub json: serde_json::Value,
}

impl WsEvent {
    /// The event's `type` field.
    pub fn kind(&self) -> &str {
        self.json["type"].as_str().unwrap_or_default()
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A blocking WebSocket client over TLS that trusts only the gateway's dev certificate.
pub struct WsClient {
    socket: WebSocket<TlsStream>,
}

impl WsClient {
    fn connect(addr: SocketAddr, ca: &Path, path: &str) -> WsClient {
        let tcp = TcpStream::connect(addr).expect("connect to the gateway");
        tcp.set_read_timeout(Some(HANG_GUARD))
            .expect("set read timeout");
        let name = ServerName::try_from("localhost").expect("valid server name");
        let conn = rustls::ClientConnection::new(tls_config(ca), name).expect("TLS client");
        let stream = rustls::StreamOwned::new(conn, tcp);
        let url = format!("wss://localhost:{}{path}", addr.port());
        match tungstenite::client::client(url.as_str(), stream) {
            Ok((socket, _response)) => WsClient { socket },
            Err(e) => panic!("WebSocket handshake to {url} failed: {e}"),
        }
    }

    /// The next text event, or `None` once the server closed the connection.
    pub fn next_event(&mut self) -> Option<WsEvent> {
        loop {
            match self.socket.read() {
                Ok(Message::Text(text)) => {
                    let at = Instant::now();
                    let json = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("WebSocket message is not JSON ({e}): {text}"));
                    return Some(WsEvent { at, json });
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return None
                }
                Err(e) => panic!("WebSocket read failed: {e}"),
            }
        }
    }

    /// Every event until the server closes.
    pub fn collect(mut self) -> Vec<WsEvent> {
        let mut events = Vec::new();
        while let Some(e) = self.next_event() {
            events.push(e);
        }
        events
    }

    /// Sends a ping and returns the next pong's payload (events in between are returned too).
    pub fn ping(&mut self, payload: &[u8]) -> (Vec<u8>, Vec<WsEvent>) {
        self.socket
            .send(Message::Ping(payload.to_vec()))
            .expect("send ping");
        let mut events = Vec::new();
        loop {
            match self.socket.read() {
                Ok(Message::Pong(p)) => return (p, events),
                Ok(Message::Text(text)) => events.push(WsEvent {
                    at: Instant::now(),
                    json: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                }),
                Ok(_) => {}
                Err(e) => panic!("no pong: {e}"),
            }
        }
    }
}

fn tls_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let pem = fs::read(ca).expect("read the dev certificate");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(cert.expect("valid PEM certificate"))
            .expect("add root certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Creates [`GATEWAY_USER`] (system user, own group, no home, no shell) unless it exists.
pub fn ensure_gateway_user() {
    static USER: Once = Once::new();
    USER.call_once(|| {
        if nix::unistd::User::from_name(GATEWAY_USER)
            .ok()
            .flatten()
            .is_some()
        {
            return;
        }
        let out = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", "--shell"])
            .args(["/usr/sbin/nologin", GATEWAY_USER])
            .output()
            .expect("run useradd");
        // Exit status 9: created meanwhile by another test binary.
        let created = out.status.success() || out.status.code() == Some(9);
        assert!(
            created,
            "useradd {GATEWAY_USER}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}
