//! Figure 13 (issue 12): a job importing numpy from an environment template, submit to exit,
//! against the same import run directly on the host with `PYTHONPATH` at the template's tree,
//! the same pair with `OPENBLAS_NUM_THREADS=1` on both sides (what the template mount costs,
//! without OpenBLAS's start-up threads meeting the job's 1-CPU quota), and a template-less
//! trivial Python job against its direct run, all interleaved in one run.
//!
//! The template is built once per run with the real `sandrunctl env build` into the bench
//! helper's `template_dir` (it needs the network for `pip download`, and the build user
//! `sandrun-build`); if that fails the figure is one line saying why, never a number.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandrun_ipc::{Request, Response};

use crate::env::Daemons;
use crate::spawn::{connect_submitter, recv, send};
use crate::stats::{Row, Summary};
use crate::BenchError;

const FIGURE: &str = "13 numpy template";
/// The shipped templates' numpy (packaging/environments/).
const DEFINITION: &str = "numpy==1.26.4\n";
const IMPORT: &str = "import numpy";
const TRIVIAL: &str = "pass";
/// The spawn figure's budget (figure 1's target: p99 < 10 ms), the bound the issue sets on what
/// a read-only template mount may add to a job.
const SPAWN_BUDGET_MS: f64 = 10.0;
/// OpenBLAS starts one thread per CPU when numpy is imported. In a job those threads share the
/// job's 1-CPU quota (`cpu.max` / `cfs_quota_us`) and get throttled, which a direct run on the
/// host is not: the pair with the variable set to 1 measures what the template mount costs.
const BLAS_THREADS: &str = "OPENBLAS_NUM_THREADS";

/// Builds the template, then times the six kinds of sample, interleaved.
pub fn figure_numpy(
    bin_dir: &Path,
    daemons: &Daemons,
    runs: usize,
) -> Result<Vec<Row>, BenchError> {
    let built = Instant::now();
    if let Err(reason) = build_template(bin_dir, daemons) {
        return Ok(vec![Row::skipped(
            FIGURE,
            "python3 -c 'import numpy', environment numpy, Submit → Exited",
            "ms",
            &reason,
        )]);
    }
    let tree = daemons.template_dir.join("numpy");
    eprintln!(
        "  numpy template built in {:.1} s: {} files",
        built.elapsed().as_secs_f64(),
        count_files(&tree)
    );
    let socket = &daemons.socket;
    let one = [(BLAS_THREADS.to_owned(), "1".to_owned())];
    for _ in 0..3 {
        job(socket, IMPORT, true, &[])?;
        direct(IMPORT, Some(&tree), &[])?;
        job(socket, IMPORT, true, &one)?;
        direct(IMPORT, Some(&tree), &one)?;
        job(socket, TRIVIAL, false, &[])?;
        direct(TRIVIAL, None, &[])?;
    }
    let mut samples: [Vec<Duration>; 6] = Default::default();
    for _ in 0..runs {
        samples[0].push(job(socket, IMPORT, true, &[])?);
        samples[1].push(direct(IMPORT, Some(&tree), &[])?);
        samples[2].push(job(socket, IMPORT, true, &one)?);
        samples[3].push(direct(IMPORT, Some(&tree), &one)?);
        samples[4].push(job(socket, TRIVIAL, false, &[])?);
        samples[5].push(direct(TRIVIAL, None, &[])?);
    }
    let [tj, td, oj, od, pj, pd] = samples.map(|s| Summary::of_ms(&s));
    let numpy_overhead = tj.median - td.median;
    let one_overhead = oj.median - od.median;
    let trivial_overhead = pj.median - pd.median;
    let verdict = if one_overhead <= SPAWN_BUDGET_MS {
        "within"
    } else {
        "over"
    };
    Ok(vec![
        Row {
            figure: FIGURE.into(),
            what: format!(
                "python3 -c 'import numpy', environment numpy, {BLAS_THREADS}=1, Submit → Exited"
            ),
            unit: "ms",
            value: oj,
            reference: Some((
                "same import and variable, direct, PYTHONPATH=template".into(),
                od,
            )),
            target: format!(
                "overhead p50 ≤ {SPAWN_BUDGET_MS} ms (spawn budget): {one_overhead:.1} ms, \
                 {verdict}"
            ),
        },
        Row {
            figure: FIGURE.into(),
            what: "python3 -c 'import numpy', environment numpy, Submit → Exited".into(),
            unit: "ms",
            value: tj,
            reference: Some(("same import, direct, PYTHONPATH=template".into(), td)),
            target: format!(
                "overhead p50 {numpy_overhead:.1} ms (OpenBLAS's start-up threads against the \
                 job's 1-CPU quota; the direct run has none)"
            ),
        },
        Row {
            figure: FIGURE.into(),
            what: "python3 -c 'pass', no template, Submit → Exited".into(),
            unit: "ms",
            value: pj,
            reference: Some(("python3 -c 'pass', direct".into(), pd)),
            target: format!(
                "overhead p50 {trivial_overhead:.1} ms (the template adds {:.1} ms)",
                one_overhead - trivial_overhead
            ),
        },
    ])
}

/// `sandrunctl env build numpy` into the bench helper's template directory; the reason if it
/// fails (no network, no build user, no wheel for this Python).
fn build_template(bin_dir: &Path, daemons: &Daemons) -> Result<(), String> {
    let def = daemons.template_dir.with_file_name("numpy.txt");
    std::fs::write(&def, DEFINITION).map_err(|e| format!("writing {}: {e}", def.display()))?;
    let out = Command::new(bin_dir.join("sandrunctl"))
        .arg("--socket")
        .arg(&daemons.socket)
        .args(["--json", "env", "--template-dir"])
        .arg(&daemons.template_dir)
        .args(["build", "numpy", "--from"])
        .arg(&def)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running sandrunctl: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let last: Vec<&str> = text.lines().rev().take(3).collect();
    Err(format!(
        "sandrunctl env build numpy failed (network for pip download and the user sandrun-build \
         are needed): {}",
        last.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

/// One helper job `python3 -c CODE` (with the `numpy` template or none): `Submit` sent →
/// `Exited` received, as figure 1 times it, with `env` added to the job's environment.
fn job(
    socket: &Path,
    code: &str,
    template: bool,
    env: &[(String, String)],
) -> Result<Duration, BenchError> {
    let mut ch = connect_submitter(socket)?;
    let mut spec = sandrun_test_support::job_spec(&["python3", "-c", code], "bench-numpy");
    spec.env = env.to_vec();
    if template {
        spec.template = Some("numpy".into());
    }
    let requested = Instant::now();
    send(&mut ch, &Request::Submit(Box::new(spec)))?;
    send(&mut ch, &Request::BundleEnd)?;
    let elapsed = loop {
        match recv(&mut ch)? {
            Response::Exited(r) if r.exit_code == Some(0) => break requested.elapsed(),
            Response::Exited(r) => {
                return Err(BenchError::job(format!("python3 -c {code:?}: {r:?}")))
            }
            Response::Error(e) => return Err(BenchError::job(format!("helper: {e}"))),
            _ => {}
        }
    };
    while !matches!(recv(&mut ch)?, Response::Done) {}
    Ok(elapsed)
}

/// `/usr/bin/python3 -c CODE` on the host, start → exit, with `PYTHONPATH` at `tree` if given
/// and `env` added.
fn direct(
    code: &str,
    tree: Option<&Path>,
    env: &[(String, String)],
) -> Result<Duration, BenchError> {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", code])
        .env_remove("PYTHONPATH")
        .env_remove(BLAS_THREADS)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(t) = tree {
        cmd.env("PYTHONPATH", t);
    }
    let started = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| BenchError::io("running python3 directly", e))?;
    let elapsed = started.elapsed();
    if !status.success() {
        return Err(BenchError::job(format!(
            "python3 -c {code:?} directly: {status}"
        )));
    }
    Ok(elapsed)
}

/// Regular files below `dir` (for the log line: a numpy tree is past the 1000 files an ordinary
/// job may return, which is why builds have their own cap).
fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(t) if t.is_file() => 1,
            _ => 0,
        })
        .sum()
}
