//! The HTTPS side of the bench: TLS connections that trust only the gateway's `--dev`
//! certificate, keep-alive HTTP/1.1 connections (hyper), WebSockets (tungstenite) and a
//! hand-built multipart body.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::BenchError;

pub type WebSocket = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

/// Connects to the gateway.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    connector: TlsConnector,
}

impl Client {
    /// A client that trusts exactly the certificate(s) in `ca_pem`.
    pub fn new(addr: SocketAddr, ca_pem: &str) -> Result<Client, BenchError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| BenchError::io("parsing the dev certificate", e))?;
            roots
                .add(cert)
                .map_err(|e| BenchError::job(format!("adding the dev certificate: {e}")))?;
        }
        let config = client_config(roots)?;
        Ok(Client {
            addr,
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// A fresh TLS connection.
    pub async fn tls(&self) -> Result<TlsStream<TcpStream>, BenchError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| BenchError::io("TCP connect", e))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("localhost")
            .map_err(|e| BenchError::job(format!("server name: {e}")))?;
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| BenchError::io("TLS handshake", e))
    }

    /// A keep-alive HTTP/1.1 connection.
    pub async fn conn(&self) -> Result<Conn, BenchError> {
        let tls = self.tls().await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| BenchError::job(format!("HTTP handshake: {e}")))?;
        tokio::spawn(conn);
        Ok(Conn { sender })
    }

    /// A WebSocket to `path` (for example `/ws/<id>`).
    pub async fn websocket(&self, path: &str) -> Result<WebSocket, BenchError> {
        let url = format!("wss://localhost:{}{path}", self.addr.port());
        let (ws, _) = tokio_tungstenite::client_async(url, self.tls().await?)
            .await
            .map_err(|e| BenchError::job(format!("WebSocket upgrade: {e}")))?;
        Ok(ws)
    }
}

/// TLS 1.3 and 1.2 with ring, offering HTTP/1.1 only.
pub fn client_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, BenchError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BenchError::job(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// One keep-alive connection; requests go one after the other.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), BenchError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if let Some(ct) = content_type {
            builder = builder.header("content-type", ct);
        }
        let req = builder
            .body(Full::new(body))
            .map_err(|e| BenchError::job(format!("building a request: {e}")))?;
        self.sender
            .ready()
            .await
            .map_err(|e| BenchError::job(format!("connection not ready: {e}")))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| BenchError::job(format!("{path}: {e}")))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| BenchError::job(format!("{path} body: {e}")))?
            .to_bytes();
        Ok((status, body))
    }

    pub async fn get(&mut self, path: &str) -> Result<(StatusCode, Bytes), BenchError> {
        self.request(Method::GET, path, None, Bytes::new()).await
    }

    /// `POST /submit`; returns the job id.
    pub async fn submit(&mut self, form: &Multipart) -> Result<String, BenchError> {
        let ct = form.content_type();
        let (status, body) = self
            .request(Method::POST, "/submit", Some(&ct), form.body())
            .await?;
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body);
            return Err(BenchError::job(format!("submit: {status} {text}")));
        }
        let json: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| BenchError::job(format!("submit answer: {e}")))?;
        json["job_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| BenchError::job(format!("submit answer without job_id: {json}")))
    }

    /// `DELETE /jobs/<id>` (cancels a running job, deletes a finished one).
    pub async fn delete(&mut self, id: &str) -> Result<(), BenchError> {
        let path = format!("/jobs/{id}");
        let (status, body) = self
            .request(Method::DELETE, &path, None, Bytes::new())
            .await?;
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body);
            return Err(BenchError::job(format!("delete: {status} {text}")));
        }
        Ok(())
    }
}

/// Reads WebSocket events until `{"type":"exit"}`; returns the exit event. `on_event` sees
/// every event first.
pub async fn wait_exit(
    ws: &mut WebSocket,
    mut on_event: impl FnMut(&serde_json::Value),
) -> Result<serde_json::Value, BenchError> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    while let Some(msg) = ws.next().await {
        let msg = msg.map_err(|e| BenchError::job(format!("WebSocket: {e}")))?;
        let Message::Text(text) = msg else { continue };
        let event: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| BenchError::job(format!("WebSocket event: {e}")))?;
        on_event(&event);
        if event["type"] == "exit" {
            return Ok(event);
        }
    }
    Err(BenchError::job("WebSocket closed before exit".to_owned()))
}

/// A `multipart/form-data` body: `files` parts and an optional `manifest` part.
pub struct Multipart {
    boundary: &'static str,
    body: Bytes,
}

impl Multipart {
    pub fn new(files: &[(&str, &[u8])], manifest: Option<&str>) -> Multipart {
        let boundary = "sandrunBenchBoundary4f2c9a";
        let size: usize = files.iter().map(|(_, d)| d.len() + 200).sum();
        let mut out = Vec::with_capacity(size + 512);
        for (name, data) in files {
            out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            out.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            );
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        if let Some(m) = manifest {
            out.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n\
                     {m}\r\n"
                )
                .as_bytes(),
            );
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        Multipart {
            boundary,
            body: Bytes::from(out),
        }
    }

    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// The body (a cheap clone of shared bytes).
    pub fn body(&self) -> Bytes {
        self.body.clone()
    }

    pub fn len(&self) -> usize {
        self.body.len()
    }
}
