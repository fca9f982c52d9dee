//! `sandrun-bench`: the benchmark suite of issues 4 and 14. Run it as root through
//! `packaging/bench.sh`; it starts its own release `sandrund` and `sandrun-gateway --dev`, with
//! raised limits, in a private cgroup, and prints one Markdown table: for every figure the
//! median, the p90, the p99, the run count and the ratio against a reference measured in the
//! same run. Figures 11 and 12 (issue 9) are a normal client's latency under a slowloris and a
//! trivial job's under four attackers collecting hard links. Figures 8 and 9 (issue 14) run the real `sandrunctl` binary as a user does, next
//! to bubblewrap, crun and firejail; a tool that is missing is listed as skipped. Figure 13
//! (issue 12) builds a `numpy` template and times a job importing it.
//!
//! It measures only; nothing here is part of the test suite, and no test asserts a time.
//!
//! ```text
//! sandrun-bench [--quick] [--only FIGURES] [--bin-dir DIR]
//! ```
//! `--quick` takes fewer samples (for development); `--only 1,7` runs some figures; `--bin-dir`
//! is where `sandrund` and `sandrun-gateway` are (default: next to this binary).

mod collection;
mod env;
mod gateway;
mod hostile;
mod https;
mod machine;
mod numpy;
mod process;
mod spawn;
mod stats;

use std::path::PathBuf;
use std::time::Instant;

use stats::Row;

/// A failure of the bench itself (a figure that cannot be measured), naming what failed.
#[derive(Debug)]
pub enum BenchError {
    Io {
        step: &'static str,
        source: std::io::Error,
    },
    Job(String),
    Env(env::EnvError),
}

impl BenchError {
    pub fn io(step: &'static str, source: std::io::Error) -> BenchError {
        BenchError::Io { step, source }
    }

    pub fn job(detail: String) -> BenchError {
        BenchError::Job(detail)
    }
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchError::Io { step, source } => write!(f, "{step}: {source}"),
            BenchError::Job(detail) => write!(f, "{detail}"),
            BenchError::Env(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for BenchError {}

impl From<env::EnvError> for BenchError {
    fn from(e: env::EnvError) -> Self {
        BenchError::Env(e)
    }
}

/// Sample counts.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub spawn_runs: usize,
    pub scaling_runs: usize,
    pub e2e_runs: usize,
    pub throughput_jobs: usize,
    pub log_jobs: usize,
    pub upload_runs: usize,
    pub subscribers: usize,
    /// Rounds of figure 8 (one `/bin/true` per tool each).
    pub whole_runs: usize,
    /// `sh` jobs per tool and concurrency in figure 9, and in how many batches per tool.
    pub ctl_jobs: usize,
    pub ctl_batches: usize,
}

const FULL: Sizes = Sizes {
    spawn_runs: 300,
    scaling_runs: 160,
    e2e_runs: 100,
    throughput_jobs: 2000,
    log_jobs: 3,
    upload_runs: 5,
    subscribers: 200,
    whole_runs: 200,
    ctl_jobs: 1000,
    ctl_batches: 4,
};

const QUICK: Sizes = Sizes {
    spawn_runs: 60,
    scaling_runs: 40,
    e2e_runs: 20,
    throughput_jobs: 300,
    log_jobs: 1,
    upload_runs: 2,
    subscribers: 200,
    whole_runs: 40,
    ctl_jobs: 200,
    ctl_batches: 2,
};

struct Options {
    sizes: Sizes,
    only: Option<Vec<u32>>,
    bin_dir: PathBuf,
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        sizes: FULL,
        only: None,
        bin_dir: std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("target/release")),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.sizes = QUICK,
            "--only" => {
                let list = args.next().ok_or("--only needs a list like 1,7")?;
                let figs = list
                    .split(',')
                    .map(|f| f.trim().parse::<u32>().map_err(|e| format!("--only: {e}")))
                    .collect::<Result<_, _>>()?;
                opts.only = Some(figs);
            }
            "--bin-dir" => opts.bin_dir = args.next().ok_or("--bin-dir needs a path")?.into(),
            other => {
                return Err(format!(
                    "unknown argument {other:?}\nusage: sandrun-bench [--quick] [--only 1,2,...] [--bin-dir DIR]"
                ))
            }
        }
    }
    Ok(opts)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sandrun-bench: {e}");
            std::process::exit(2);
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("sandrun-bench: run as root (it starts sandrund); use packaging/bench.sh");
        std::process::exit(2);
    }
    let load_before = machine::load_average();
    let result = run(&opts);
    let load = format!(
        "load average (1, 5, 15 min) before the run: {load_before}; after: {}",
        machine::load_average()
    );
    match result {
        Ok(rows) => println!("\n{}\n{load}", stats::render(&rows)),
        Err(e) => {
            println!("{load}");
            eprintln!("sandrun-bench: {e}");
            std::process::exit(1);
        }
    }
}

fn run(opts: &Options) -> Result<Vec<Row>, BenchError> {
    let cgroup = env::BenchCgroup::enter()?;
    let cpuacct = cgroup.cpuacct();
    let daemons = env::Daemons::start(&opts.bin_dir)?;
    let wanted = |n: u32| match &opts.only {
        Some(list) => list.contains(&n),
        None => true,
    };
    let sizes = opts.sizes;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    let mut step = |n: u32, name: &str, f: &mut dyn FnMut() -> Result<Vec<Row>, BenchError>| {
        if !wanted(n) {
            return Ok::<(), BenchError>(());
        }
        let started = Instant::now();
        eprintln!(
            "sandrun-bench: figure {n}: {name} (load {})",
            machine::load_average()
        );
        let mut got = match f() {
            Ok(rows) => rows,
            Err(e) => {
                // One figure that cannot be measured does not hide the others.
                eprintln!("sandrun-bench: figure {n} ({name}) failed: {e}");
                failed.push(n);
                return Ok(());
            }
        };
        eprintln!(
            "  ({:.1} s)\n{}",
            started.elapsed().as_secs_f64(),
            stats::render(&got)
        );
        rows.append(&mut got);
        Ok(())
    };
    step(6, "idle footprint", &mut || gateway::figure_idle(&daemons))?;
    step(1, "spawn", &mut || {
        spawn::figure_spawn(&daemons.socket, sizes.spawn_runs)
    })?;
    step(10, "outputs", &mut || {
        spawn::figure_outputs(&daemons.socket, sizes.spawn_runs)
    })?;
    step(12, "collection under attack", &mut || {
        collection::figure_collection(&daemons.socket, sizes.e2e_runs * 2)
    })?;
    step(7, "scaling", &mut || {
        spawn::figure_scaling(&daemons.socket, sizes.scaling_runs)
    })?;
    step(13, "numpy template", &mut || {
        numpy::figure_numpy(&opts.bin_dir, &daemons, sizes.e2e_runs)
    })?;
    if wanted(8) || wanted(9) {
        // sandrunctl and bubblewrap must run; if they cannot, both figures fail (and say why),
        // the others still run.
        let runner =
            process::Runner::new(&opts.bin_dir, &daemons.socket).map_err(|e| e.to_string());
        step(8, "whole process", &mut || match &runner {
            Ok(r) => process::figure_whole_process(r, cpuacct.as_ref(), sizes.whole_runs),
            Err(e) => Err(BenchError::job(e.clone())),
        })?;
        step(9, "throughput through sandrunctl", &mut || match &runner {
            Ok(r) => process::figure_ctl_throughput(
                r,
                cpuacct.as_ref(),
                sizes.ctl_jobs,
                sizes.ctl_batches,
            ),
            Err(e) => Err(BenchError::job(e.clone())),
        })?;
    }
    let rt = tokio::runtime::Runtime::new().map_err(|e| BenchError::io("tokio runtime", e))?;
    let client = https::Client::new(daemons.gateway_addr, &daemons.ca_pem)?;
    step(5, "upload", &mut || {
        rt.block_on(gateway::figure_upload(&client, &daemons, sizes.upload_runs))
    })?;
    step(2, "end to end", &mut || {
        rt.block_on(gateway::figure_e2e(&client, sizes.e2e_runs))
    })?;
    step(4, "log latency", &mut || {
        rt.block_on(gateway::figure_log_latency(&client, sizes.log_jobs))
    })?;
    step(3, "throughput", &mut || {
        rt.block_on(gateway::figure_throughput(
            &client,
            &daemons,
            sizes.throughput_jobs,
        ))
    })?;
    step(11, "slowloris", &mut || {
        rt.block_on(hostile::figure_slowloris(&client, sizes.e2e_runs))
    })?;
    step(6, "subscribers", &mut || {
        rt.block_on(gateway::figure_subscribers(
            &client,
            &daemons,
            sizes.subscribers,
        ))
    })?;
    if !failed.is_empty() {
        println!("\n{}", stats::render(&rows));
        return Err(BenchError::job(format!("figures {failed:?} failed")));
    }
    Ok(rows)
}

/// A count as a float, for rates and per-job figures.
pub fn usize_as_f64(n: usize) -> f64 {
    // Display only: counts are far below 2^53.
    #[allow(clippy::cast_precision_loss)]
    let x = n as f64;
    x
}
