//! Connection-level attacks on a real stack (real `sandrund`, real `sandrun-gateway`, real TLS):
//! WebSockets that try to escape the per-client connection cap, one address taking every upload
//! slot, a body dripped a byte at a time, and connections that stay idle in each phase of their
//! life (before TLS, after TLS, between HTTP/1.1 requests, HTTP/2 with no open stream). Each
//! test gives its gateway small timeouts and checks what the gateway did on the wire.
//! Each test has its own stack (`config(..)`, from the allocator).

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use sandrun_tests::config;
use sandrun_tests::hostile::{tcp_from, tls_client_config, tls_over, TlsStream};
use sandrun_tests::stack::{Part, Stack};

const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const BYSTANDER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// What a closing connection may take beyond its timeout (timer granularity, a loaded machine).
const SLACK: Duration = Duration::from_secs(2);
/// The longest any test here waits for the gateway to act.
const GIVE_UP: Duration = Duration::from_secs(15);

fn stack(gateway: &str) -> Stack {
    Stack::start(&config(""), gateway)
}

/// A `/bin/sh` job running `script`.
fn sh_job(script: &str) -> Vec<Part> {
    let manifest = json!({"entrypoint": "run.sh", "interpreter": "sh", "timeout": 120});
    vec![Part::file("run.sh", script), Part::manifest(&manifest)]
}

/// A TLS connection from `source` with the handshake completed (ALPN `alpn` if not empty).
fn tls_from(stack: &Stack, source: Ipv4Addr, alpn: &[&[u8]]) -> TlsStream {
    let mut config = (*tls_client_config(&stack.ca_path())).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tcp_from(source, stack.addr()).expect("connect to the gateway");
    tcp.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("set read timeout");
    let mut tls = tls_over(&Arc::new(config), tcp).expect("TLS client");
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .expect("TLS handshake with the gateway");
    }
    tls
}

/// What a read on a connection found.
enum Read1 {
    Data(Vec<u8>),
    Nothing,
    Closed,
}

fn read_some(stream: &mut impl Read) -> Read1 {
    let mut buf = [0u8; 16 * 1024];
    match stream.read(&mut buf) {
        Ok(0) => Read1::Closed,
        Ok(n) => Read1::Data(buf[..n].to_vec()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Read1::Nothing
        }
        Err(_) => Read1::Closed,
    }
}

/// Reads until the peer closes (or [`GIVE_UP`]); returns how long that took, or `None`.
fn time_until_closed(stream: &mut impl Read) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < GIVE_UP {
        if let Read1::Closed = read_some(stream) {
            return Some(started.elapsed());
        }
    }
    None
}

fn assert_closed_within(took: Option<Duration>, timeout: Duration, what: &str) {
    let Some(took) = took else {
        panic!("{what}: still open after {GIVE_UP:?} (timeout {timeout:?})");
    };
    eprintln!("{what}: closed after {took:?} (timeout {timeout:?})");
    assert!(
        took + Duration::from_millis(500) >= timeout,
        "{what}: closed after {took:?}, before its timeout {timeout:?}"
    );
    assert!(
        took <= timeout + SLACK,
        "{what}: closed after {took:?}, timeout {timeout:?}"
    );
}

// ---- WebSockets and the per-client connection cap ----

type Ws = tungstenite::WebSocket<TlsStream>;

fn ws_from(stack: &Stack, source: Ipv4Addr, path: &str) -> Result<Ws, String> {
    let tls = tls_client_config(&stack.ca_path());
    let tcp = tcp_from(source, stack.addr()).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let stream = tls_over(&tls, tcp).map_err(|e| e.to_string())?;
    let url = format!("wss://localhost:{}{path}", stack.addr().port());
    tungstenite::client::client(url.as_str(), stream)
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

/// The first event a WebSocket subscriber gets (the job's status).
fn first_event(ws: &mut Ws) -> Value {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(text)) => {
                return serde_json::from_str(&text).unwrap_or(Value::Null)
            }
            Ok(_) => {}
            Err(e) => panic!("WebSocket read failed: {e}"),
        }
    }
}

const WS_CAP: usize = 32;

#[test]
fn given_45_websocket_upgrades_from_one_address_then_at_most_the_per_client_cap_succeed_and_another_address_still_connects(
) {
    // The cap is min(max_connections_per_client, 25 % of max_connections) = 32.
    let stack = stack("[http]\nmax_connections = 128\nmax_connections_per_client = 32\n");
    let id = stack.submit_ok(&sh_job("sleep 60"));
    let path = format!("/ws/{id}");
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..45 {
        match ws_from(&stack, ATTACKER, &path) {
            Ok(ws) => open.push(ws),
            Err(e) => refused.push(e),
        }
    }
    eprintln!(
        "websockets from one address: {} upgraded, {} refused (first: {:?})",
        open.len(),
        refused.len(),
        refused.first()
    );
    assert!(
        open.len() <= WS_CAP,
        "{} of 45 upgrades from one address succeeded against a cap of {WS_CAP}",
        open.len()
    );
    assert_eq!(open.len(), WS_CAP, "the cap itself must be usable");
    // The sockets that made it really are live subscriptions.
    for ws in open.iter_mut().take(3) {
        assert_eq!(first_event(ws)["type"], "status");
    }
    let mut other = ws_from(&stack, BYSTANDER, &path).expect("another address connects");
    assert_eq!(first_event(&mut other)["type"], "status");
    let health = stack.curl_from(BYSTANDER, &[], "/health");
    assert_eq!(health.status, 200, "{}", health.text());
}

// ---- upload slots ----

/// The head (and first body bytes) of an upload that never finishes.
fn slow_upload_head() -> Vec<u8> {
    b"POST /submit HTTP/1.1\r\nHost: localhost\r\n\
      Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n--b\r\n"
        .to_vec()
}

fn status_of(answer: &[u8]) -> u16 {
    sandrun_tests::hostile::http_status(answer)
}

fn json_of(answer: &[u8]) -> Value {
    let Some(start) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Value::Null;
    };
    serde_json::from_slice(&answer[start + 4..]).unwrap_or(Value::Null)
}

#[test]
fn given_32_slow_uploads_from_one_address_then_another_address_still_uploads_at_once() {
    // Defaults: 32 upload slots, 25 % (8) per client, 10 s wait for a slot.
    let stack = stack("");
    let mut uploads: Vec<(TlsStream, Vec<u8>)> = (0..32)
        .map(|_| {
            let mut s = tls_from(&stack, ATTACKER, &[]);
            s.write_all(&slow_upload_head()).expect("send the head");
            s.flush().expect("flush");
            (s, Vec::new())
        })
        .collect();
    // Those past the client's share are refused at once; the others hold their slot.
    let started = Instant::now();
    let answered = |u: &[(TlsStream, Vec<u8>)]| u.iter().filter(|(_, a)| !a.is_empty()).count();
    while answered(&uploads) < 24 && started.elapsed() < Duration::from_secs(5) {
        for (s, answer) in &mut uploads {
            if answer.is_empty() {
                if let Read1::Data(d) = read_some(s) {
                    answer.extend_from_slice(&d);
                }
            }
        }
    }
    let refusals: Vec<(u16, Value)> = uploads
        .iter()
        .filter(|(_, a)| !a.is_empty())
        .map(|(_, a)| (status_of(a), json_of(a)))
        .collect();
    eprintln!(
        "slow uploads: {} of 32 answered after {:?}: {:?}",
        refusals.len(),
        started.elapsed(),
        refusals.first()
    );
    assert_eq!(
        refusals.len(),
        24,
        "the attacker's uploads past its share of 8"
    );
    for (status, body) in &refusals {
        assert_eq!(*status, 429, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("upload"),
            "the error names the cause: {body}"
        );
    }
    let submitted = Instant::now();
    let r = stack.submit_from(BYSTANDER, &sh_job("echo bystander"));
    eprintln!(
        "bystander upload answered {} after {:?}",
        r.status,
        submitted.elapsed()
    );
    assert_eq!(r.status, 200, "the bystander's upload: {}", r.text());
    let id = r.json()["job_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(stack.wait_finished(&id)["status"], "completed");
    drop(uploads);
}

/// Reads from `s` until an answer has a status line and a complete head, or the peer closes.
fn answer_head(s: &mut TlsStream) -> Vec<u8> {
    let started = Instant::now();
    let mut answer = Vec::new();
    while started.elapsed() < GIVE_UP && !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match read_some(s) {
            Read1::Data(d) => answer.extend_from_slice(&d),
            Read1::Nothing => {}
            Read1::Closed => break,
        }
    }
    answer
}

/// A request refused before its body is read (past the client's upload share, a declared length
/// over the limit) is answered without the gateway reading the body: a client that waits for
/// `100 Continue` gets the refusal itself, never the go-ahead to send a body that will be thrown
/// away, and the connection is closed after it. (Before, the gateway read up to 64 KiB of the
/// body for up to a second before it answered, and asking for it sent `100 Continue`.)
#[test]
fn given_uploads_refused_before_their_body_then_the_answer_comes_without_reading_the_body() {
    let stack = stack("");
    // The attacker holds its share of 8 upload slots.
    let mut held: Vec<TlsStream> = (0..8)
        .map(|_| {
            let mut s = tls_from(&stack, ATTACKER, &[]);
            s.write_all(&slow_upload_head()).expect("send the head");
            s.flush().expect("flush");
            s
        })
        .collect();
    // The slots are taken when the heads arrive: wait until the gateway counts all eight.
    let counted = sandrun_tests::hostile::eventually(GIVE_UP, || {
        let text = stack.get("/metrics").text();
        text.lines()
            .any(|l| l.starts_with("sandrun_gateway_uploads_in_progress 8"))
    });
    assert!(
        counted,
        "eight uploads in progress:\n{}",
        stack.get("/metrics").text()
    );
    let over_share = b"POST /submit HTTP/1.1\r\nHost: localhost\r\n\
          Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\
          Expect: 100-continue\r\n\r\n";
    let too_long = b"POST /submit HTTP/1.1\r\nHost: localhost\r\n\
          Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000000\r\n\
          Expect: 100-continue\r\n\r\n";
    for (what, head, want) in [
        ("past the upload share", &over_share[..], 429),
        ("declared length over the limit", &too_long[..], 413),
    ] {
        let mut s = tls_from(&stack, ATTACKER, &[]);
        let sent = Instant::now();
        s.write_all(head).expect("send the head");
        s.flush().expect("flush");
        let answer = answer_head(&mut s);
        eprintln!(
            "{what}: {:?} after {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)]),
            sent.elapsed()
        );
        assert!(
            !answer.starts_with(b"HTTP/1.1 100"),
            "{what}: the gateway asked for the body of a refused upload"
        );
        assert_eq!(
            status_of(&answer),
            want,
            "{what}: {}",
            String::from_utf8_lossy(&answer)
        );
        let closed = time_until_closed(&mut s);
        assert!(
            closed.is_some_and(|d| d <= SLACK),
            "{what}: the connection stayed open {closed:?} after the refusal"
        );
    }
    held.clear();
    let health = stack.curl_from(BYSTANDER, &[], "/health");
    assert_eq!(health.status, 200);
}

#[test]
fn given_a_body_dripped_one_byte_at_a_time_then_it_is_cut_off_with_408_after_the_grace_period() {
    let grace = Duration::from_millis(1000);
    let stack = stack("[http]\nmin_body_bytes_per_s = 1024\nbody_rate_grace_ms = 1000\n");
    let mut s = tls_from(&stack, ATTACKER, &[]);
    s.write_all(&slow_upload_head()).expect("send the head");
    let started = Instant::now();
    let mut answer = Vec::new();
    // One byte every 250 ms: far below the minimum rate, far above the 30 s idle timeout.
    while answer.is_empty() && started.elapsed() < GIVE_UP {
        let _ = s.write_all(b"x").and_then(|()| s.flush());
        let until = Instant::now() + Duration::from_millis(250);
        while answer.is_empty() && Instant::now() < until {
            match read_some(&mut s) {
                Read1::Data(d) => answer.extend_from_slice(&d),
                Read1::Nothing => {}
                Read1::Closed => break,
            }
        }
    }
    let took = started.elapsed();
    eprintln!(
        "drip: answered after {took:?}: {}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(status_of(&answer), 408, "the drip's answer");
    let error = json_of(&answer)["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("slow"), "the error names the cause: {error}");
    assert!(
        took <= grace + SLACK,
        "cut off after {took:?} (grace {grace:?})"
    );
    let closed = time_until_closed(&mut s);
    assert!(
        closed.is_some_and(|d| d <= SLACK),
        "the connection stayed open {closed:?} after the 408"
    );
    // Others are served.
    let id = stack.submit_ok(&sh_job("echo ok"));
    assert_eq!(stack.wait_finished(&id)["status"], "completed");
}

// ---- idle connections ----

#[test]
fn given_connections_that_stay_silent_before_and_after_tls_then_each_is_closed_within_its_timeout()
{
    let handshake = Duration::from_millis(1000);
    let first_request = Duration::from_millis(1500);
    let stack = stack("[http]\ntls_handshake_timeout_ms = 1000\nfirst_request_timeout_ms = 1500\n");
    // TCP only: the TLS handshake never starts.
    let mut tcp = tcp_from(ATTACKER, stack.addr()).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("set read timeout");
    assert_closed_within(time_until_closed(&mut tcp), handshake, "no TLS handshake");
    // TLS completed, then nothing.
    let mut tls = tls_from(&stack, ATTACKER, &[]);
    assert_closed_within(
        time_until_closed(&mut tls),
        first_request,
        "TLS, then no request",
    );
    let health = stack.curl_from(BYSTANDER, &[], "/health");
    assert_eq!(health.status, 200);
}

/// Plain HTTP on the TLS port (served to loopback in `--dev`) keeps the phase timeouts: a
/// connection that sends part of a head and stops is closed at the head timeout, one that sends
/// nothing at the handshake timeout (its first byte decides TLS or plain).
#[test]
fn given_plain_http_connections_that_stall_then_each_is_closed_within_its_timeout() {
    let handshake = Duration::from_millis(1000);
    let header = Duration::from_millis(1500);
    let stack = stack("[http]\ntls_handshake_timeout_ms = 1000\nheader_timeout_ms = 1500\n");
    let mut silent = tcp_from(ATTACKER, stack.addr()).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("set read timeout");
    assert_closed_within(time_until_closed(&mut silent), handshake, "no first byte");
    let mut partial = tcp_from(ATTACKER, stack.addr()).expect("connect");
    partial
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("set read timeout");
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .expect("send part of a head");
    assert_closed_within(
        time_until_closed(&mut partial),
        header,
        "plain HTTP, half a head",
    );
    let health = stack.curl_from(BYSTANDER, &[], "/health");
    assert_eq!(health.status, 200);
}

/// Reads one complete HTTP/1.1 answer with a `Content-Length` from `s`.
fn read_answer(s: &mut TlsStream) -> Vec<u8> {
    let started = Instant::now();
    let mut answer = Vec::new();
    while started.elapsed() < GIVE_UP {
        if let Some(head_end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..head_end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if answer.len() >= head_end + 4 + length {
                return answer;
            }
        }
        match read_some(s) {
            Read1::Data(d) => answer.extend_from_slice(&d),
            Read1::Nothing => {}
            Read1::Closed => break,
        }
    }
    panic!("no complete answer: {:?}", String::from_utf8_lossy(&answer));
}

#[test]
fn given_an_idle_keep_alive_connection_then_it_is_closed_within_the_keep_alive_timeout() {
    let keep_alive = Duration::from_millis(1500);
    let stack = stack("[http]\nkeep_alive_timeout_ms = 1500\n");
    let mut s = tls_from(&stack, ATTACKER, &[]);
    let request = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n";
    s.write_all(request).expect("first request");
    assert_eq!(status_of(&read_answer(&mut s)), 200);
    // Within the timeout the connection serves the next request, and the timer starts again.
    std::thread::sleep(keep_alive / 2);
    s.write_all(request).expect("second request");
    assert_eq!(status_of(&read_answer(&mut s)), 200);
    assert_closed_within(time_until_closed(&mut s), keep_alive, "idle keep-alive");
}

// ---- HTTP/2 ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const ACK: u8 = 1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `GET /health` on stream 1 (HPACK: indexed `:method GET`, `:scheme https`, literal `:path`
/// and `:authority` without indexing).
fn get_health_headers() -> Vec<u8> {
    let mut block = vec![0x82, 0x87, 0x04, 7];
    block.extend_from_slice(b"/health");
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"localhost");
    frame(1, 0x4 | 0x1, 1, &block)
}

/// One parsed frame: type, flags, stream, payload.
type Frame = (u8, u8, u32, Vec<u8>);

/// An HTTP/2 client that answers SETTINGS and PINGs, and pings the server itself.
struct H2 {
    s: TlsStream,
    buf: Vec<u8>,
}

impl H2 {
    fn connect(stack: &Stack) -> H2 {
        let mut s = tls_from(stack, ATTACKER, &[b"h2"]);
        assert_eq!(s.conn.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
        s.write_all(PREFACE).expect("preface");
        s.write_all(&frame(SETTINGS, 0, 0, &[])).expect("SETTINGS");
        s.flush().expect("flush");
        H2 { s, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes).and_then(|()| self.s.flush());
    }

    /// The next frame, answering SETTINGS and PING on the way; `None` once closed.
    fn next_frame(&mut self, deadline: Instant) -> Option<Frame> {
        let mut last_ping = Instant::now();
        loop {
            if self.buf.len() >= 9 {
                let len = usize::from(self.buf[0]) << 16
                    | usize::from(self.buf[1]) << 8
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let (kind, flags) = (self.buf[3], self.buf[4]);
                    let stream = u32::from_be_bytes([
                        self.buf[5] & 0x7f,
                        self.buf[6],
                        self.buf[7],
                        self.buf[8],
                    ]);
                    let payload = self.buf[9..9 + len].to_vec();
                    self.buf.drain(..9 + len);
                    if kind == SETTINGS && flags & ACK == 0 {
                        self.send(&frame(SETTINGS, ACK, 0, &[]));
                    }
                    if kind == PING && flags & ACK == 0 {
                        self.send(&frame(PING, ACK, 0, &payload));
                    }
                    return Some((kind, flags, stream, payload));
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            // Traffic the whole time: the client pings too.
            if last_ping.elapsed() > Duration::from_millis(200) {
                self.send(&frame(PING, 0, 0, b"sandrun!"));
                last_ping = Instant::now();
            }
            match read_some(&mut self.s) {
                Read1::Data(d) => self.buf.extend_from_slice(&d),
                Read1::Nothing => {}
                Read1::Closed => return None,
            }
        }
    }

    /// Waits for GOAWAY: how long it took and its error code; then checks the server closes.
    fn wait_goaway(&mut self) -> (Duration, u32) {
        let started = Instant::now();
        let deadline = started + GIVE_UP;
        loop {
            let Some((kind, _, _, payload)) = self.next_frame(deadline) else {
                panic!(
                    "closed or timed out after {:?} without GOAWAY",
                    started.elapsed()
                );
            };
            if kind == GOAWAY && payload.len() >= 8 {
                let took = started.elapsed();
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                // The server closes soon after (it may send its final GOAWAY first).
                while self.next_frame(Instant::now() + SLACK).is_some() {}
                assert!(
                    started.elapsed() <= took + SLACK + SLACK,
                    "the connection stayed open {:?} after GOAWAY",
                    started.elapsed() - took
                );
                return (took, code);
            }
        }
    }
}

#[test]
fn given_http2_connections_with_no_open_stream_then_each_gets_goaway_within_its_timeout_despite_pings(
) {
    let first_request = Duration::from_millis(1500);
    let idle = Duration::from_millis(2000);
    let stack = stack("[http]\nfirst_request_timeout_ms = 1500\nhttp2_idle_timeout_ms = 2000\n");
    // Preface and SETTINGS only, then PINGs both ways.
    let mut h2 = H2::connect(&stack);
    let (took, code) = h2.wait_goaway();
    assert_eq!(code, 0, "GOAWAY with NO_ERROR");
    assert_closed_within(Some(took), first_request, "HTTP/2 with no stream");
    // One request, then no open stream.
    let mut h2 = H2::connect(&stack);
    h2.send(&get_health_headers());
    let deadline = Instant::now() + GIVE_UP;
    loop {
        let (kind, flags, stream, _) = h2.next_frame(deadline).expect("an answer on stream 1");
        // DATA or HEADERS with END_STREAM ends the response.
        if stream == 1 && (kind == 0 || kind == 1) && flags & 0x1 != 0 {
            break;
        }
    }
    let (took, code) = h2.wait_goaway();
    assert_eq!(code, 0, "GOAWAY with NO_ERROR");
    assert_closed_within(Some(took), idle, "HTTP/2 idle after a request");
}

/// Reads frames until the server closes (or [`GIVE_UP`]): the frames seen, and how long the
/// server took to close.
fn frames_until_closed(s: &mut impl Read) -> (Vec<Frame>, Option<Duration>) {
    let started = Instant::now();
    let (mut buf, mut frames) = (Vec::new(), Vec::new());
    while started.elapsed() < GIVE_UP {
        match read_some(s) {
            Read1::Data(d) => buf.extend_from_slice(&d),
            Read1::Nothing => continue,
            Read1::Closed => return (frames, Some(started.elapsed())),
        }
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[5] & 0x7f, buf[6], buf[7], buf[8]]);
            frames.push((buf[3], buf[4], stream, buf[9..9 + len].to_vec()));
            buf.drain(..9 + len);
        }
    }
    (frames, None)
}

/// HTTP/2 spoken on a connection that did not negotiate it (TLS without ALPN, TLS with ALPN
/// `http/1.1`, plain HTTP on loopback in `--dev`) would be timed by the HTTP/1.1 phase clock:
/// the gateway refuses it, closing the connection at once without serving its request, and an
/// HTTP/1.1 request on a connection that negotiated `h2` is refused the same way.
#[test]
fn given_http2_without_alpn_h2_then_the_connection_is_closed_unserved_within_the_http2_idle_timeout(
) {
    // A header timeout far above the HTTP/2 idle timeout: the HTTP/1.1 clock would keep the
    // connection past the idle timeout, and the bound below would fail.
    let idle = Duration::from_millis(2000);
    let stack = stack("[http]\nheader_timeout_ms = 12000\nhttp2_idle_timeout_ms = 2000\n");
    let mut request = PREFACE.to_vec();
    request.extend_from_slice(&frame(SETTINGS, 0, 0, &[]));
    request.extend_from_slice(&get_health_headers());
    let open = |case: &str| -> Box<dyn ReadWrite> {
        match case {
            "TLS without ALPN" => Box::new(tls_from(&stack, ATTACKER, &[])),
            "TLS with ALPN http/1.1" => Box::new(tls_from(&stack, ATTACKER, &[b"http/1.1"])),
            _ => {
                let tcp = tcp_from(ATTACKER, stack.addr()).expect("connect");
                tcp.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("set read timeout");
                Box::new(tcp)
            }
        }
    };
    for what in [
        "TLS without ALPN",
        "TLS with ALPN http/1.1",
        "plain HTTP (h2c prior knowledge)",
    ] {
        let mut s = open(what);
        s.write_all(&request)
            .expect("preface, SETTINGS and a request");
        s.flush().expect("flush");
        let (frames, took) = frames_until_closed(&mut s);
        let kinds: Vec<u8> = frames.iter().map(|f| f.0).collect();
        eprintln!("HTTP/2 over {what}: closed after {took:?}, frame types {kinds:?}");
        let answered = frames
            .iter()
            .any(|(kind, _, stream, _)| *kind == 1 && *stream == 1);
        assert!(!answered, "{what}: the HTTP/2 request was served");
        let took = took.unwrap_or_else(|| panic!("{what}: still open after {GIVE_UP:?}"));
        assert!(
            took <= idle,
            "{what}: closed after {took:?}, idle timeout {idle:?}"
        );
    }
    // HTTP/1.1 after ALPN h2.
    let mut s = tls_from(&stack, ATTACKER, &[b"h2"]);
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("an HTTP/1.1 request");
    let mut answer = Vec::new();
    let started = Instant::now();
    let took = loop {
        match read_some(&mut s) {
            Read1::Data(d) => answer.extend_from_slice(&d),
            Read1::Nothing if started.elapsed() < GIVE_UP => {}
            Read1::Nothing => break None,
            Read1::Closed => break Some(started.elapsed()),
        }
    };
    eprintln!("HTTP/1.1 after ALPN h2: closed after {took:?}, answer {answer:?}");
    assert!(
        !answer.starts_with(b"HTTP/1.1"),
        "HTTP/1.1 was served after ALPN h2"
    );
    assert!(took.is_some_and(|t| t <= idle), "closed after {took:?}");
    // Negotiated protocols are still served.
    let mut h2 = H2::connect(&stack);
    h2.send(&get_health_headers());
    let deadline = Instant::now() + GIVE_UP;
    loop {
        let (kind, _, stream, _) = h2.next_frame(deadline).expect("an answer on stream 1");
        if stream == 1 && kind == 1 {
            break;
        }
    }
    let health = stack.curl_from(BYSTANDER, &[], "/health");
    assert_eq!(health.status, 200);
}

/// A byte stream both ways (TLS or plain TCP).
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
