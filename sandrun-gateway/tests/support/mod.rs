//! Test support: a real gateway on 127.0.0.1:0 with real TLS (the --dev certificate), a fake
//! `sandrund` speaking the real protocol, an HTTPS client and a WebSocket client.
//!
//! The fake helper "runs" a job by interpreting its entrypoint file as a tiny script, one command
//! per line: `out TEXT`, `err TEXT`, `sleep MS`, `exit N`, `reason NAME`, `cpu MS`,
//! `file PATH CONTENT`, `skip PATH`, `cat` (the job's stdin to stdout), `drop` (close the
//! connection mid-job). Like `sandrund`, it
//! gives its verdict on a `Submit` before the bundle: `Accepted`, or the next of the refusals a
//! test queued with [`FakeHelper::refuse_next`].

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use sandrun_gateway::config::Config;
use sandrun_gateway::server;
use sandrun_gateway::signing::WorkerKey;
use sandrun_gateway::state::AppState;
use sandrun_ipc::tokio_adapter::AsyncChannel;
use sandrun_ipc::{
    BundleEntry, BundlePath, ErrorCode, ExitReason, ExitReport, GrantedLimits, Hello, IpcError,
    JobId, JobSpec, OutputFileHeader, Request as IpcRequest, Response as IpcResponse, Role,
    SkipKind, PROTOCOL_VERSION,
};
use sha2::{Digest, Sha256};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// What the fake helper saw.
#[derive(Debug, Default)]
pub struct HelperLog {
    pub specs: Vec<JobSpec>,
    /// Labels of jobs whose connection the gateway closed before `Done` (cancel).
    pub closed_early: Vec<String>,
    refusals: VecDeque<Refusal>,
}

/// How the fake helper turns a `Submit` down.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    /// Answers this error and closes, as `sandrund` does when it is busy or draining.
    Error(ErrorCode),
    /// Closes without an answer, as a helper that dies or restarts does.
    Close,
}

pub struct FakeHelper {
    pub socket: PathBuf,
    pub log: Arc<Mutex<HelperLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeHelper {
    pub async fn start(dir: &std::path::Path) -> FakeHelper {
        let socket = dir.join("sandrund.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let log = Arc::new(Mutex::new(HelperLog::default()));
        let shared = Arc::clone(&log);
        let task = tokio::spawn(async move {
            let mut next_id = 1;
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_job(stream, Arc::clone(&shared), next_id));
                next_id += 1;
            }
        });
        FakeHelper { socket, log, task }
    }

    /// Kills the helper: no more connections are accepted (existing ones finish).
    pub fn stop_accepting(&self) {
        self.task.abort();
    }

    /// Turns the next submissions down, one refusal each, in order.
    pub fn refuse_next(&self, refusals: impl IntoIterator<Item = Refusal>) {
        self.log.lock().unwrap().refusals.extend(refusals);
    }

    /// Specs of every `Submit` seen, refused or not.
    pub fn specs(&self) -> Vec<JobSpec> {
        self.log.lock().unwrap().specs.clone()
    }

    pub fn closed_early(&self) -> Vec<String> {
        self.log.lock().unwrap().closed_early.clone()
    }
}

type HelperChannel = AsyncChannel<IpcResponse, IpcRequest, UnixStream>;

/// The lock file of the fake helper's one template, `fake-env`.
pub const FAKE_LOCK: &[u8] = br#"{"format":"sandrun-lock/1","interpreter":{"name":"python3","version":"3.11.2"},"packages":[{"name":"six","version":"1.17.0","sha256":"ab"}]}"#;

fn fake_template() -> sandrun_ipc::TemplateInfo {
    use sha2::Digest;
    sandrun_ipc::TemplateInfo {
        name: "fake-env".into(),
        lock: Some(sandrun_ipc::TemplateLock {
            sha256: sha2::Sha256::digest(FAKE_LOCK).into(),
            bytes: FAKE_LOCK.to_vec(),
        }),
    }
}

async fn serve_job(stream: UnixStream, log: Arc<Mutex<HelperLog>>, id: u64) {
    let mut ch: HelperChannel = AsyncChannel::new(stream);
    let Ok(IpcRequest::Hello(_)) = ch.recv().await else {
        return;
    };
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Submitter,
    };
    ch.send(&IpcResponse::Hello(hello)).await.unwrap();
    let spec = match ch.recv().await {
        Ok(IpcRequest::Submit(spec)) => spec,
        Ok(IpcRequest::ListTemplates) => {
            let _ = ch.send(&IpcResponse::Template(fake_template())).await;
            let _ = ch.send(&IpcResponse::TemplatesEnd { omitted: 0 }).await;
            return;
        }
        _ => return,
    };
    log.lock().unwrap().specs.push((*spec).clone());
    let refusal = log.lock().unwrap().refusals.pop_front();
    match refusal {
        Some(Refusal::Error(code)) => {
            let _ = ch
                .send(&IpcResponse::Error(IpcError::new(
                    code,
                    "refused by the fake",
                )))
                .await;
            return;
        }
        Some(Refusal::Close) => return,
        None => {}
    }
    let limits = GrantedLimits {
        wall_ms: 1000,
        memory_bytes: 1 << 20,
        cpu_ms: 1000,
        pids: 8,
        output_bytes: 1 << 20,
        tmpfs_bytes: 1 << 20,
        file_count: 100,
    };
    let accepted = IpcResponse::Accepted {
        job_id: JobId(id),
        limits,
    };
    if ch.send(&accepted).await.is_err() {
        return;
    }
    let mut bundle = Vec::new();
    loop {
        match ch.recv().await {
            Ok(IpcRequest::BundleChunk(c)) => bundle.extend_from_slice(&c),
            Ok(IpcRequest::BundleEnd) => break,
            _ => return,
        }
    }
    let declared: u64 = spec
        .bundle
        .iter()
        .map(|e| match e {
            BundleEntry::File { size, .. } => *size,
            BundleEntry::Dir { .. } => 0,
        })
        .sum();
    assert_eq!(
        declared + spec.stdin_bytes,
        bundle.len() as u64,
        "bundle bytes match the declared sizes and the stdin"
    );
    let script = entrypoint_text(&spec, &bundle);
    let stdin = bundle.split_off(usize::try_from(declared).unwrap());
    let label = spec.label.clone();
    let finished = run_script(&mut ch, &script, &stdin).await;
    if !finished {
        log.lock().unwrap().closed_early.push(label);
    }
}

fn entrypoint_text(spec: &JobSpec, bundle: &[u8]) -> String {
    // argv = [interpreter, entrypoint, args...]
    let entry = spec.argv.get(1).cloned().unwrap_or_default();
    let mut offset = 0usize;
    for e in &spec.bundle {
        if let BundleEntry::File { path, size, .. } = e {
            let size = usize::try_from(*size).unwrap();
            if path.as_str() == entry {
                return String::from_utf8_lossy(&bundle[offset..offset + size]).into_owned();
            }
            offset += size;
        }
    }
    String::new()
}

/// Returns false if the gateway closed the connection before the job finished.
async fn run_script(ch: &mut HelperChannel, script: &str, stdin: &[u8]) -> bool {
    if ch
        .send(&IpcResponse::Started { spawn_us: 1500 })
        .await
        .is_err()
    {
        return false;
    }
    let mut report = ExitReport {
        exit_code: Some(0),
        signal: None,
        reason: ExitReason::None,
        cpu_ms: 5,
        wall_ms: 10,
        memory_peak_bytes: 3 << 20,
        stdout_truncated: false,
        stderr_truncated: false,
        template_lock: None,
        requirements: None,
    };
    let mut tail: Vec<IpcResponse> = Vec::new();
    for line in script.lines() {
        let (cmd, rest) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        let msg = match cmd {
            "out" => Some(IpcResponse::Stdout(format!("{rest}\n").into_bytes())),
            "err" => Some(IpcResponse::Stderr(format!("{rest}\n").into_bytes())),
            // Raw bytes, given in hex, with no newline: `outhex f09f` sends two bytes.
            "outhex" => Some(IpcResponse::Stdout(hex::decode(rest).unwrap())),
            "errhex" => Some(IpcResponse::Stderr(hex::decode(rest).unwrap())),
            "cat" => Some(IpcResponse::Stdout(stdin.to_vec())),
            "sleep" => {
                let ms: u64 = rest.parse().unwrap();
                // Notice a closed connection while "running".
                if sleep_or_closed(ch, Duration::from_millis(ms)).await {
                    return false;
                }
                None
            }
            "exit" => {
                report.exit_code = Some(rest.parse().unwrap());
                None
            }
            "cpu" => {
                report.cpu_ms = rest.parse().unwrap();
                None
            }
            "reason" => {
                report.reason = *ExitReason::ALL.iter().find(|r| r.as_str() == rest).unwrap();
                report.exit_code = None;
                report.signal = Some(9);
                None
            }
            "file" => {
                let (path, content) = rest.split_once(' ').unwrap_or((rest, ""));
                let data = content.as_bytes().to_vec();
                tail.push(IpcResponse::OutputFile(OutputFileHeader {
                    path: BundlePath::new(path).unwrap(),
                    size: data.len() as u64,
                    sha256: Sha256::digest(&data).into(),
                }));
                tail.push(IpcResponse::OutputChunk(data));
                None
            }
            "skip" => {
                let path = BundlePath::new(rest).unwrap();
                tail.push(IpcResponse::OutputSkipped {
                    path: (&path).into(),
                    kind: SkipKind::Symlink,
                });
                None
            }
            "drop" => return true,
            _ => None,
        };
        if let Some(msg) = msg {
            if ch.send(&msg).await.is_err() {
                return false;
            }
        }
    }
    let mut all = vec![IpcResponse::Exited(report)];
    all.extend(tail);
    all.push(IpcResponse::Done);
    for msg in all {
        if ch.send(&msg).await.is_err() {
            return false;
        }
    }
    true
}

/// Sleeps; returns true if the peer closed the connection (or sent Cancel) meanwhile.
async fn sleep_or_closed(ch: &mut HelperChannel, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        _ = ch.recv() => true,
    }
}

/// A running gateway.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub ca: CertificateDer<'static>,
    pub ca_pem: String,
    pub helper: FakeHelper,
    pub state: Arc<AppState>,
    pub dir: tempfile::TempDir,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        TestGateway::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let helper = FakeHelper::start(dir.path()).await;
        let mut config = Config {
            helper_socket: helper.socket.clone(),
            ..Config::default()
        };
        adjust(&mut config);
        let dev = server::tls::dangerous_dev_cert().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = AppState::new(config, WorkerKey::generate());
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(server::run(
            listener,
            dev.config,
            Arc::clone(&state),
            shutdown,
        ));
        TestGateway {
            addr,
            ca: dev.cert_der,
            ca_pem: dev.cert_pem,
            helper,
            state,
            dir,
            stop,
            task,
        }
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    pub async fn tls(&self) -> TlsStream<TcpStream> {
        tls_connect(self.addr, self.ca.clone()).await
    }

    /// One request on a fresh connection.
    pub async fn request(&self, req: Request<Full<Bytes>>) -> Reply {
        send(self.tls().await, req).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(build(Method::GET, path, &[], Bytes::new()))
            .await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.request(build(Method::DELETE, path, &[], Bytes::new()))
            .await
    }

    /// Submits a multipart body; returns the reply.
    pub async fn submit(&self, form: &Multipart) -> Reply {
        self.post_form("/submit", form).await
    }

    /// POSTs a multipart body to `path` (`/run?wait=5`); returns the reply.
    pub async fn post_form(&self, path: &str, form: &Multipart) -> Reply {
        let ct = format!("multipart/form-data; boundary={}", form.boundary);
        let headers = [("content-type", ct.as_str())];
        self.request(build(Method::POST, path, &headers, form.body()))
            .await
    }

    /// Submits a single `main.py` with this fake-helper script; returns the job id.
    pub async fn submit_script(&self, script: &str) -> String {
        let reply = self.submit(&Multipart::script(script)).await;
        assert_eq!(reply.status, StatusCode::OK, "submit: {}", reply.text());
        reply.json()["job_id"].as_str().unwrap().to_owned()
    }

    /// Polls `/status` until the job is `running` (it left the queue for the helper); panics
    /// after 10 s, so a test never goes on from a state it did not reach.
    pub async fn wait_running(&self, id: &str) {
        for _ in 0..500 {
            if self.get(&format!("/status/{id}")).await.json()["status"] == "running" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("job {id} never started running");
    }

    /// Polls `/status` until the job is finished (completed or failed).
    pub async fn wait_finished(&self, id: &str) -> serde_json::Value {
        for _ in 0..500 {
            let status = self.get(&format!("/status/{id}")).await.json();
            if matches!(status["status"].as_str(), Some("completed" | "failed")) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("job {id} did not finish");
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

/// A TLS connection to `addr` that trusts only `ca` (the gateway's dev certificate).
pub async fn tls_connect(addr: SocketAddr, ca: CertificateDer<'static>) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Sends one request over an established TLS connection.
pub async fn send(tls: TlsStream<TcpStream>, req: Request<Full<Bytes>>) -> Reply {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

pub fn build(
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Full::new(body)).unwrap()
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("invalid JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an error reply: the status and a JSON `{"error": ...}` body.
    pub fn assert_error(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        let json = self.json();
        json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {json}"))
            .to_owned()
    }
}

/// A multipart/form-data body built by hand.
pub struct Multipart {
    pub boundary: String,
    parts: Vec<(String, Option<String>, Vec<u8>)>,
}

impl Multipart {
    pub fn new() -> Multipart {
        Multipart {
            boundary: "sandrunTestBoundary7MA4YWxk".to_owned(),
            parts: Vec::new(),
        }
    }

    pub fn file(mut self, filename: &str, data: &[u8]) -> Multipart {
        self.parts
            .push(("files".into(), Some(filename.into()), data.to_vec()));
        self
    }

    pub fn manifest(mut self, json: &str) -> Multipart {
        self.parts
            .push(("manifest".into(), None, json.as_bytes().to_vec()));
        self
    }

    /// A `stdin` part: the job's standard input.
    pub fn stdin(mut self, data: &[u8]) -> Multipart {
        self.parts.push(("stdin".into(), None, data.to_vec()));
        self
    }

    /// `main.py` holding a fake-helper script, with `outputs: ["**"]`.
    pub fn script(script: &str) -> Multipart {
        Multipart::new()
            .file("main.py", script.as_bytes())
            .manifest(r#"{"entrypoint": "main.py", "outputs": ["**"]}"#)
    }

    pub fn body(&self) -> Bytes {
        let mut out = Vec::new();
        for (name, filename, data) in &self.parts {
            out.extend_from_slice(format!("--{}\r\n", self.boundary).as_bytes());
            let disposition = match filename {
                Some(f) => format!("form-data; name=\"{name}\"; filename=\"{f}\""),
                None => format!("form-data; name=\"{name}\""),
            };
            out.extend_from_slice(format!("Content-Disposition: {disposition}\r\n").as_bytes());
            out.extend_from_slice(b"Content-Type: application/octet-stream\r\n\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{}--\r\n", self.boundary).as_bytes());
        Bytes::from(out)
    }
}

/// Opens a WebSocket to `path` over TLS.
pub async fn websocket(
    gw: &TestGateway,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>> {
    let url = format!("wss://localhost:{}{path}", gw.addr.port());
    let (ws, response) = tokio_tungstenite::client_async(url, gw.tls().await)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Reads WebSocket text events until the server closes; returns them as JSON.
pub async fn read_events(
    ws: &mut tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
) -> Vec<serde_json::Value> {
    use futures_util::StreamExt;
    let mut events = Vec::new();
    while let Some(msg) = ws.next().await {
        match msg.unwrap() {
            tokio_tungstenite::tungstenite::Message::Text(t) => {
                events.push(serde_json::from_str(&t).unwrap())
            }
            tokio_tungstenite::tungstenite::Message::Close(_) => break,
            _ => {}
        }
    }
    events
}

/// Archives of plain files, built once for every suite (`sandrun-test-support`).
// Not every test binary that includes this module uses both.
#[allow(unused_imports)]
pub use sandrun_test_support::archive::{tar_gz, zip};
