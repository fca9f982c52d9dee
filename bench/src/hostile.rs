//! Figure 11: a normal client's latency while the gateway is under attack, against the same
//! client's latency with no attack, measured in the same run. The attack is a slowloris: 500
//! TLS connections that each send their request head one byte at a time and never finish it;
//! a connection the gateway closes (its header timeout) is opened again, so the attack lasts as
//! long as the measurement.
//!
//! This replaces the time bound the test `hostile_api.rs` once asserted (2 s): timing belongs
//! here, where the figure is a ratio against its own reference, not in a test that flakes when
//! the machine is busy.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::https::{wait_exit, Client, Multipart};
use crate::stats::{Row, Summary};
use crate::BenchError;

/// Slowloris sockets held open during the measurement.
const SLOWLORIS_SOCKETS: usize = 500;
/// Time between two bytes of one slowloris head.
const DRIP: Duration = Duration::from_millis(100);
/// Time the attack has to open its sockets before the measurement starts.
const RAMP: Duration = Duration::from_secs(3);

/// Figure 11: a trivial `sh` job, from a new HTTPS connection (submit, then its exit over a
/// WebSocket), `runs` times with no attack, then `runs` times with 500 slowloris sockets open.
pub async fn figure_slowloris(client: &Client, runs: usize) -> Result<Vec<Row>, BenchError> {
    let form = Multipart::new(
        &[("run.sh", b"echo ok\n")],
        Some(r#"{"entrypoint":"run.sh","interpreter":"sh"}"#),
    );
    for _ in 0..3 {
        normal_job(client, &form).await?;
    }
    let mut quiet = Vec::with_capacity(runs);
    for _ in 0..runs {
        quiet.push(normal_job(client, &form).await?);
    }
    let attack = Slowloris::start(client);
    tokio::time::sleep(RAMP).await;
    let open_at_start = attack.open.load(Ordering::Relaxed);
    let mut attacked = Vec::with_capacity(runs);
    let measured = async {
        for _ in 0..runs {
            attacked.push(normal_job(client, &form).await?);
        }
        Ok::<(), BenchError>(())
    }
    .await;
    let open_at_end = attack.open.load(Ordering::Relaxed);
    let reopened = attack.reopened.load(Ordering::Relaxed);
    attack.stop();
    measured?;
    eprintln!(
        "  slowloris sockets open: {open_at_start} at the start, {open_at_end} at the end; \
         {reopened} reopened after the gateway closed them"
    );
    let (value, reference) = (Summary::of_ms(&attacked), Summary::of_ms(&quiet));
    Ok(vec![Row {
        figure: "11 slowloris".into(),
        what: format!(
            "trivial sh job from a new connection, {open_at_start} slowloris sockets open"
        ),
        unit: "ms",
        value,
        reference: Some(("same client, no attack".into(), reference)),
        target: "p99 ≤ 2 s (the bound the test once asserted)".into(),
    }])
}

/// One job from a new connection: submit, wait for its exit; its latency.
async fn normal_job(client: &Client, form: &Multipart) -> Result<Duration, BenchError> {
    let started = Instant::now();
    let mut conn = client.conn().await?;
    let id = conn.submit(form).await?;
    let mut ws = client.websocket(&format!("/ws/{id}")).await?;
    let exit = wait_exit(&mut ws, |_| {}).await?;
    let elapsed = started.elapsed();
    if exit["status"] != "completed" {
        return Err(BenchError::job(format!("job {id} ended: {exit}")));
    }
    conn.delete(&id).await?;
    Ok(elapsed)
}

/// The attacking tasks, and how many of their sockets are open.
struct Slowloris {
    stop: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    reopened: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Slowloris {
    fn start(client: &Client) -> Slowloris {
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let reopened = Arc::new(AtomicUsize::new(0));
        let tasks = (0..SLOWLORIS_SOCKETS)
            .map(|_| {
                let (client, stop) = (client.clone(), Arc::clone(&stop));
                let (open, reopened) = (Arc::clone(&open), Arc::clone(&reopened));
                tokio::spawn(async move {
                    let mut first = true;
                    while !stop.load(Ordering::Relaxed) {
                        if !first {
                            reopened.fetch_add(1, Ordering::Relaxed);
                        }
                        first = false;
                        let Ok(tls) = client.tls().await else {
                            tokio::time::sleep(DRIP).await;
                            continue;
                        };
                        open.fetch_add(1, Ordering::Relaxed);
                        drip(tls, &stop).await;
                        open.fetch_sub(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Slowloris {
            stop,
            open,
            reopened,
            tasks,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Sends a request head one byte at a time, never ending it, until a write fails (the gateway
/// closed the connection) or the attack stops.
async fn drip<S: tokio::io::AsyncWrite + Unpin>(mut stream: S, stop: &AtomicBool) {
    let head = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
    let mut sent = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let byte = head.get(sent).copied().unwrap_or(b'a');
        if stream.write_all(&[byte]).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        sent += 1;
        tokio::time::sleep(DRIP).await;
    }
}
