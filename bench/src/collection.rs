//! Figure 12 (issue 9, item 7): a trivial job's latency while four attackers collect hard links,
//! against the same four attackers with output patterns that match nothing (their CPU use alone,
//! no collection) and against no attackers at all, measured in the same run. The target
//! is an absolute p99 below 50 ms under the collecting attackers.
//!
//! The test `tests/tests/collection.rs` keeps the behaviour (every trivial job completes while
//! the attackers collect); how long they take is measured here.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandrun_ipc::blocking::ClientChannel;
use sandrun_ipc::{JobSpec, OutputPattern, Request, Response};

use crate::spawn::{connect_submitter, recv, send};
use crate::stats::{Row, Summary};
use crate::BenchError;

/// The attacker of `tests/tests/collection.rs`.
const ATTACKER: &str = sandrun_test_support::HARD_LINK_ATTACKER;

const ATTACKERS: usize = 4;
/// Time the attackers have to reach their first collection before the measurement.
const RAMP: Duration = Duration::from_secs(3);

/// Figure 12: `runs` trivial jobs (`/bin/echo hi`, Submit → Done) with no attacker, then under
/// four attackers that do not collect, then under four that collect.
pub fn figure_collection(socket: &Path, runs: usize) -> Result<Vec<Row>, BenchError> {
    for _ in 0..5 {
        trivial(socket)?;
    }
    let mut alone = Vec::with_capacity(runs);
    for _ in 0..runs {
        alone.push(trivial(socket)?);
    }
    let (control, control_attacks) = under_attackers(socket, false, runs)?;
    let (collecting, attacks) = under_attackers(socket, true, runs)?;
    eprintln!(
        "  attacker jobs finished during the measurement: {control_attacks} (no collection), \
         {attacks} (collecting)"
    );
    let (alone, control, collecting) = (
        Summary::of_ms(&alone),
        Summary::of_ms(&control),
        Summary::of_ms(&collecting),
    );
    let row = |what: &str, value: Summary, reference: (&str, Summary), target: String| Row {
        figure: "12 collection".into(),
        what: what.into(),
        unit: "ms",
        value,
        reference: Some((reference.0.into(), reference.1)),
        target,
    };
    Ok(vec![
        row(
            "trivial job, 4 attackers collecting hard links",
            collecting,
            ("same attackers, collecting nothing", control),
            format!("p99 < 50 ms (here {:.0} ms)", collecting.p99),
        ),
        row(
            "trivial job, 4 attackers collecting nothing",
            control,
            ("no attacker", alone),
            String::new(),
        ),
    ])
}

/// Runs `runs` trivial jobs while four attacker threads run the attacker in a loop; the
/// latencies and how many attacker jobs finished meanwhile.
fn under_attackers(
    socket: &Path,
    collect: bool,
    runs: usize,
) -> Result<(Vec<Duration>, u32), BenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicU32::new(0));
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|_| {
            let (socket, stop, finished) = (socket.to_owned(), stop.clone(), finished.clone());
            std::thread::spawn(move || -> Result<(), BenchError> {
                while !stop.load(Ordering::Relaxed) {
                    attack(&socket, collect)?;
                    finished.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(RAMP);
    let before = finished.load(Ordering::Relaxed);
    let mut samples = Vec::with_capacity(runs);
    let measured = (0..runs).try_for_each(|_| {
        samples.push(trivial(socket)?);
        Ok::<(), BenchError>(())
    });
    let attacks = finished.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join()
            .map_err(|_| BenchError::job("an attacker thread panicked".into()))??;
    }
    measured?;
    Ok((samples, attacks))
}

/// One trivial job, `Submit` sent → `Done` received.
fn trivial(socket: &Path) -> Result<Duration, BenchError> {
    let spec = sandrun_test_support::job_spec(&["/bin/echo", "hi"], "bench-trivial");
    run(socket, spec)
}

/// One attacker job; with `collect` false its pattern matches nothing.
fn attack(socket: &Path, collect: bool) -> Result<Duration, BenchError> {
    let mut spec = sandrun_test_support::job_spec(&["/usr/bin/python3", "-c", ATTACKER], "bench");
    let pattern = if collect { "*" } else { "no-such-output" };
    spec.outputs =
        vec![OutputPattern::new(pattern).map_err(|e| BenchError::job(format!("pattern: {e}")))?];
    spec.limits.wall_ms = Some(60_000);
    run(socket, spec)
}

fn run(socket: &Path, spec: JobSpec) -> Result<Duration, BenchError> {
    let mut ch: ClientChannel<UnixStream> = connect_submitter(socket)?;
    let started = Instant::now();
    send(&mut ch, &Request::Submit(Box::new(spec)))?;
    send(&mut ch, &Request::BundleEnd)?;
    loop {
        match recv(&mut ch)? {
            Response::Exited(r) if r.exit_code != Some(0) => {
                return Err(BenchError::job(format!("job ended: {r:?}")))
            }
            Response::Done => return Ok(started.elapsed()),
            Response::Error(e) => return Err(BenchError::job(format!("helper: {e}"))),
            _ => {}
        }
    }
}
