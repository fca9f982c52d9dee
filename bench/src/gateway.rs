//! Figures 2 to 6, through the gateway over HTTPS: end to end, throughput, log latency,
//! upload, footprint. Each has a reference measured in the same run.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;

use crate::env::{cpu_ms, rss_kib, Daemons};
use crate::https::{wait_exit, Client, Conn, Multipart};
use crate::spawn::BWRAP_ARGS;
use crate::stats::{Row, Summary};
use crate::{usize_as_f64, BenchError};

const HELLO_PY: &str = "print(\"hi\")\n";
const PYTHON: &str = "/usr/bin/python3";
/// Prints the wall-clock time (ns) 50 times, 10 ms apart, after giving the client time to
/// subscribe.
const TICKER_PY: &str = "import time\ntime.sleep(0.3)\nfor _ in range(50):\n    \
                         print(time.time_ns(), flush=True)\n    time.sleep(0.01)\n";
const UPLOAD_BYTES: usize = 100 << 20;
const MIB: f64 = 1024.0 * 1024.0;
/// Concurrency of the throughput figure.
const CLIENTS: usize = 16;

fn python_form(script: &str) -> Multipart {
    Multipart::new(
        &[("main.py", script.as_bytes())],
        Some(r#"{"entrypoint":"main.py"}"#),
    )
}

/// Submits, waits for the exit over a WebSocket, checks the job completed; returns the id.
async fn run_job(client: &Client, conn: &mut Conn, form: &Multipart) -> Result<String, BenchError> {
    let id = conn.submit(form).await?;
    let mut ws = client.websocket(&format!("/ws/{id}")).await?;
    let exit = wait_exit(&mut ws, |_| {}).await?;
    if exit["status"] != "completed" {
        return Err(BenchError::job(format!("job {id} ended: {exit}")));
    }
    Ok(id)
}

/// Figure 6 (first half): idle RSS of both daemons, against a `sleep` process's.
pub fn figure_idle(d: &Daemons) -> Result<Vec<Row>, BenchError> {
    let mut sleeper = Command::new("sleep")
        .arg("30")
        .spawn()
        .map_err(|e| BenchError::io("starting sleep", e))?;
    std::thread::sleep(Duration::from_millis(100));
    let floor = rss_kib(sleeper.id());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let floor = Summary::of(&[kib_as_mib(floor?.0)]);
    let mut rows = Vec::new();
    for (daemon, target) in [(&d.helper, "≤ 8 MiB"), (&d.gateway, "≤ 20 MiB")] {
        let mut samples = Vec::new();
        for _ in 0..20 {
            samples.push(kib_as_mib(rss_kib(daemon.pid())?.0));
            std::thread::sleep(Duration::from_millis(10));
        }
        rows.push(Row {
            figure: "6 footprint".into(),
            what: format!("{} idle VmRSS", daemon.name),
            unit: "MiB",
            value: Summary::of(&samples),
            reference: Some(("sleep(1) VmRSS".into(), floor)),
            target: target.into(),
        });
    }
    Ok(rows)
}

fn kib_as_mib(kib: u64) -> f64 {
    // Display only: precision is irrelevant below 2^53 KiB.
    #[allow(clippy::cast_precision_loss)]
    let mib = kib as f64 / 1024.0;
    mib
}

/// Figure 2: submit a one-line Python job, wait by WebSocket, fetch its logs; against the same
/// `python3 -c` run directly. Samples are interleaved.
pub async fn figure_e2e(client: &Client, runs: usize) -> Result<Vec<Row>, BenchError> {
    let mut conn = client.conn().await?;
    let form = python_form(HELLO_PY);
    for _ in 0..3 {
        e2e_once(client, &mut conn, &form).await?;
    }
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let started = Instant::now();
        let id = e2e_once(client, &mut conn, &form).await?;
        ours.push(started.elapsed());
        conn.delete(&id).await?;
        bare.push(python_direct()?);
    }
    let (ours, bare) = (Summary::of_ms(&ours), Summary::of_ms(&bare));
    Ok(vec![Row {
        figure: "2 end to end".into(),
        what: "submit → WebSocket exit → GET /logs".into(),
        unit: "ms",
        value: ours,
        reference: Some(("python3 -c, direct".into(), bare)),
        target: format!(
            "overhead p50 ≤ 10 ms (here {:.1} ms)",
            ours.median - bare.median
        ),
    }])
}

async fn e2e_once(
    client: &Client,
    conn: &mut Conn,
    form: &Multipart,
) -> Result<String, BenchError> {
    let id = run_job(client, conn, form).await?;
    let (status, body) = conn.get(&format!("/logs/{id}")).await?;
    let logs: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| BenchError::job(format!("logs of {id} ({status}): {e}")))?;
    if logs["stdout"] != "hi\n" {
        return Err(BenchError::job(format!("logs of {id}: {logs}")));
    }
    Ok(id)
}

fn python_direct() -> Result<Duration, BenchError> {
    let started = Instant::now();
    let out = Command::new(PYTHON)
        .args(["-c", HELLO_PY])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BenchError::io("running python3", e))?;
    let elapsed = started.elapsed();
    if out.stdout != b"hi\n" {
        return Err(BenchError::job("python3 -c printed something else".into()));
    }
    Ok(elapsed)
}

/// Figure 3: `jobs` trivial `sh` jobs over HTTPS by 16 keep-alive clients; against bubblewrap
/// running the same `sh` with 16 threads. Also the CPU time each daemon spent per job.
pub async fn figure_throughput(
    client: &Client,
    daemons: &Daemons,
    jobs: usize,
) -> Result<Vec<Row>, BenchError> {
    let cpu_before = DaemonCpu::read(daemons)?;
    let form = Arc::new(Multipart::new(
        &[("run.sh", b"exit 0\n")],
        Some(r#"{"entrypoint":"run.sh","interpreter":"sh"}"#),
    ));
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(jobs)));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, form, next) = (client.clone(), Arc::clone(&form), Arc::clone(&next));
        let (latencies, errors) = (Arc::clone(&latencies), Arc::clone(&errors));
        tasks.push(tokio::spawn(async move {
            let mut conn = client.conn().await?;
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                let t = Instant::now();
                match run_job(&client, &mut conn, &form).await {
                    Ok(id) => {
                        push(&latencies, t.elapsed());
                        conn.delete(&id).await?;
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("  throughput error: {e}");
                        }
                    }
                }
            }
            Ok::<(), BenchError>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| BenchError::job(format!("throughput task: {e}")))??;
    }
    let rate = rate(jobs, started.elapsed());
    let cpu = DaemonCpu::read(daemons)?.per_job_since(&cpu_before, jobs);
    let reference = bwrap_rate(jobs / 5)?;
    let lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    let errors = errors.load(Ordering::Relaxed);
    Ok(vec![
        Row {
            figure: "3 throughput".into(),
            what: format!("jobs/s, {jobs} sh jobs, concurrency {CLIENTS}"),
            unit: "jobs/s",
            value: Summary::single(rate, jobs),
            reference: Some((
                format!("bwrap sh, {CLIENTS} threads"),
                Summary::single(reference, jobs / 5),
            )),
            target: format!("≥ 200 jobs/s, 0 errors (errors: {errors})"),
        },
        Row {
            figure: "3 throughput".into(),
            what: "latency per job under load".into(),
            unit: "ms",
            value: Summary::of_ms(&lat),
            reference: None,
            target: String::new(),
        },
        cpu.row("sandrun-gateway CPU (user + system) per job", cpu.gateway),
        cpu.row("sandrund CPU per job (its own)", cpu.helper),
        cpu.row(
            "sandbox processes' CPU per job (reaped by sandrund)",
            cpu.sandboxes,
        ),
    ])
}

/// CPU milliseconds of the daemons: the gateway's, the helper's own, and the sandboxes' it reaped.
#[derive(Debug, Clone, Copy)]
struct DaemonCpu {
    gateway: f64,
    helper: f64,
    sandboxes: f64,
}

impl DaemonCpu {
    fn read(daemons: &Daemons) -> Result<DaemonCpu, BenchError> {
        let (gateway, _) = cpu_ms(daemons.gateway.pid())?;
        let (helper, sandboxes) = cpu_ms(daemons.helper.pid())?;
        Ok(DaemonCpu {
            gateway,
            helper,
            sandboxes,
        })
    }

    fn per_job_since(&self, before: &DaemonCpu, jobs: usize) -> DaemonCpu {
        let n = usize_as_f64(jobs.max(1));
        DaemonCpu {
            gateway: (self.gateway - before.gateway) / n,
            helper: (self.helper - before.helper) / n,
            sandboxes: (self.sandboxes - before.sandboxes) / n,
        }
    }

    fn row(&self, what: &str, ms: f64) -> Row {
        Row {
            figure: "3 throughput".into(),
            what: what.into(),
            unit: "ms",
            value: Summary::single(ms, 1),
            reference: None,
            target: String::new(),
        }
    }
}

fn push(samples: &Mutex<Vec<Duration>>, d: Duration) {
    if let Ok(mut v) = samples.lock() {
        v.push(d);
    }
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    // Display only: counts are far below 2^53.
    #[allow(clippy::cast_precision_loss)]
    let n = n as f64;
    n / elapsed.as_secs_f64()
}

/// Jobs per second of `bwrap ... /bin/sh -c 'exit 0'` on 16 threads.
fn bwrap_rate(jobs: usize) -> Result<f64, BenchError> {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|_| {
                s.spawn(|| {
                    while next.fetch_add(1, Ordering::Relaxed) < jobs {
                        let status = Command::new("bwrap")
                            .args(BWRAP_ARGS)
                            .args(["/bin/sh", "-c", "exit 0"])
                            .stdin(Stdio::null())
                            .status()
                            .map_err(|e| BenchError::io("bwrap", e))?;
                        if !status.success() {
                            return Err(BenchError::job(format!("bwrap sh: {status}")));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| BenchError::job("bwrap thread panicked".into()))??;
        }
        Ok::<(), BenchError>(())
    })?;
    Ok(rate(jobs, started.elapsed()))
}

/// Figure 4: a job prints the wall-clock time 50 times; the WebSocket client subtracts it from
/// its own clock at reception. Reference: the same script run directly, read through a pipe.
pub async fn figure_log_latency(client: &Client, jobs: usize) -> Result<Vec<Row>, BenchError> {
    let mut conn = client.conn().await?;
    let form = python_form(TICKER_PY);
    let mut ours = Vec::new();
    for _ in 0..jobs {
        let id = conn.submit(&form).await?;
        let mut ws = client.websocket(&format!("/ws/{id}")).await?;
        let exit = wait_exit(&mut ws, |event| {
            if event["type"] == "stdout" {
                if let Some(data) = event["data"].as_str() {
                    ours.extend(latencies_of(data));
                }
            }
        })
        .await?;
        if exit["status"] != "completed" {
            return Err(BenchError::job(format!("log job ended: {exit}")));
        }
        conn.delete(&id).await?;
    }
    let mut direct = Vec::new();
    for _ in 0..jobs {
        direct.extend(ticker_direct()?);
    }
    Ok(vec![Row {
        figure: "4 log latency".into(),
        what: "line written → WebSocket message".into(),
        unit: "ms",
        value: Summary::of(&ours),
        reference: Some(("same script, read from a pipe".into(), Summary::of(&direct))),
        target: "p50 ≤ 5 ms".into(),
    }])
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

/// Milliseconds between each timestamp line in `data` and now.
fn latencies_of(data: &str) -> Vec<f64> {
    let now = now_ns();
    data.lines()
        .filter_map(|l| l.trim().parse::<i128>().ok())
        .map(|t| ns_as_ms(now - t))
        .collect()
}

fn ns_as_ms(ns: i128) -> f64 {
    // Display only: the differences are small.
    #[allow(clippy::cast_precision_loss)]
    let ms = ns as f64 / 1e6;
    ms
}

fn ticker_direct() -> Result<Vec<f64>, BenchError> {
    let mut child = Command::new(PYTHON)
        .args(["-c", TICKER_PY])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::io("running python3", e))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::job("python3 without stdout pipe".into()))?;
    let mut out = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| BenchError::io("reading python3", e))?;
        out.extend(latencies_of(&line));
    }
    let _ = child.wait();
    Ok(out)
}

/// A tar.gz of `main.py` and about 100 MiB of random (incompressible) data, about 100 MiB
/// compressed.
fn upload_archive() -> Result<Vec<u8>, BenchError> {
    let mut data = vec![0u8; UPLOAD_BYTES - (64 << 10)];
    rand::thread_rng().fill_bytes(&mut data);
    // gzip's default level, as `tar czf` writes it: for incompressible data it emits stored
    // blocks. (The fastest level of the zlib-rs backend writes static-Huffman blocks instead,
    // which no usual tool produces and which cost a full inflate.)
    Ok(sandrun_test_support::archive::tar_gz(&[
        ("main.py", b"pass\n"),
        ("data.bin", &data),
    ]))
}

/// Figure 5: a ~100 MiB multipart tar.gz upload (request start → `job_id`), and the gateway's
/// peak RSS; against the same bytes through a bare TLS connection on loopback.
pub async fn figure_upload(
    client: &Client,
    daemons: &Daemons,
    runs: usize,
) -> Result<Vec<Row>, BenchError> {
    let archive = upload_archive()?;
    let form = Multipart::new(
        &[("job.tar.gz", &archive)],
        Some(r#"{"entrypoint":"main.py"}"#),
    );
    drop(archive);
    let size_mib = usize_as_f64(form.len()) / MIB;
    let mut ours = Vec::new();
    for _ in 0..runs {
        let mut conn = client.conn().await?;
        let started = Instant::now();
        let id = conn.submit(&form).await?;
        ours.push(size_mib / started.elapsed().as_secs_f64());
        let mut ws = client.websocket(&format!("/ws/{id}")).await?;
        wait_exit(&mut ws, |_| {}).await?;
        conn.delete(&id).await?;
    }
    let peak = kib_as_mib(rss_kib(daemons.gateway.pid())?.1);
    let mut reference = Vec::new();
    for _ in 0..runs {
        reference.push(size_mib / tls_sink_time(&form.body()).await?.as_secs_f64());
    }
    Ok(vec![
        Row {
            figure: "5 upload".into(),
            what: format!("{size_mib:.0} MiB multipart tar.gz → job_id"),
            unit: "MiB/s",
            value: Summary::of(&ours),
            reference: Some((
                "same bytes, bare TLS loopback".into(),
                Summary::of(&reference),
            )),
            target: "≥ 200 MiB/s".into(),
        },
        Row {
            figure: "5 upload".into(),
            what: "gateway peak RSS (VmHWM) after the uploads".into(),
            unit: "MiB",
            value: Summary::of(&[peak]),
            reference: Some(("upload size".into(), Summary::of(&[size_mib]))),
            target: "≤ 2.5 × upload".into(),
        },
    ])
}

/// Time to push `body` through a TLS connection to a local sink that reads it all and answers
/// one byte: the floor for any HTTPS upload on this machine.
async fn tls_sink_time(body: &[u8]) -> Result<Duration, BenchError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .map_err(|e| BenchError::job(format!("sink certificate: {e}")))?;
    let cert_der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_no_client_auth()
                .with_single_cert(vec![cert_der.clone()], key)
        })
        .map_err(|e| BenchError::job(format!("sink TLS config: {e}")))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| BenchError::io("sink bind", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::io("sink address", e))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let expected = body.len();
    let sink = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0;
        while got < expected {
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        tls.write_all(b"k").await?;
        tls.flush().await
    });
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(cert_der)
        .map_err(|e| BenchError::job(format!("sink root: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(crate::https::client_config(roots)?));
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| BenchError::io("sink connect", e))?;
    let name = rustls::pki_types::ServerName::try_from("localhost")
        .map_err(|e| BenchError::job(format!("sink name: {e}")))?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| BenchError::io("sink TLS", e))?;
    tls.write_all(body)
        .await
        .map_err(|e| BenchError::io("sink write", e))?;
    tls.flush()
        .await
        .map_err(|e| BenchError::io("sink flush", e))?;
    let mut ack = [0u8; 1];
    tls.read_exact(&mut ack)
        .await
        .map_err(|e| BenchError::io("sink answer", e))?;
    let elapsed = started.elapsed();
    sink.await
        .map_err(|e| BenchError::job(format!("sink task: {e}")))?
        .map_err(|e| BenchError::io("sink", e))?;
    Ok(elapsed)
}

/// Figure 6 (second half): the gateway's RSS with `n` WebSocket subscribers on one running
/// job, against its RSS just before they connect.
pub async fn figure_subscribers(
    client: &Client,
    daemons: &Daemons,
    n: usize,
) -> Result<Vec<Row>, BenchError> {
    let pid = daemons.gateway.pid();
    let before = sample_rss(pid).await?;
    let mut conn = client.conn().await?;
    let id = conn
        .submit(&python_form("import time\ntime.sleep(60)\n"))
        .await?;
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let mut ws = client.websocket(&format!("/ws/{id}")).await?;
        first_event(&mut ws).await?;
        sockets.push(ws);
    }
    let during = sample_rss(pid).await?;
    // A keep-alive connection idle for longer than the gateway's header timeout is closed.
    client.conn().await?.delete(&id).await?;
    drop(sockets);
    let _ = std::io::stderr().flush();
    Ok(vec![Row {
        figure: "6 footprint".into(),
        what: format!("sandrun-gateway VmRSS, {n} WebSocket subscribers"),
        unit: "MiB",
        value: Summary::of(&during),
        reference: Some(("gateway just before".into(), Summary::of(&before))),
        target: String::new(),
    }])
}

async fn first_event(ws: &mut crate::https::WebSocket) -> Result<(), BenchError> {
    use futures_util::StreamExt;
    match ws.next().await {
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(BenchError::job(format!("subscriber: {e}"))),
        None => Err(BenchError::job("subscriber closed at once".into())),
    }
}

async fn sample_rss(pid: u32) -> Result<Vec<f64>, BenchError> {
    let mut v = Vec::new();
    for _ in 0..10 {
        v.push(kib_as_mib(rss_kib(pid)?.0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(v)
}
