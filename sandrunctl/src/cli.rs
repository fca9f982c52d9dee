//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sandrun_ipc::rules::DEFAULT_SOCKET;

use crate::error::CtlError;

#[derive(Debug, Parser)]
#[command(
    name = "sandrunctl",
    version,
    about = "Local client of the sandrun root helper"
)]
pub(crate) struct Cli {
    /// Path of sandrund's Unix socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    pub(crate) socket: PathBuf,
    /// Print one JSON object instead of human-readable text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// List running sandboxes.
    Ps,
    /// Kill a running job (reason `cancelled`).
    Kill {
        /// The job id shown by `ps`.
        id: u64,
    },
    /// Show helper-wide counters.
    Stats,
    /// Refuse new jobs from now on; running jobs finish.
    Drain,
    /// Run one job in a sandbox and wait for it.
    Run(RunArgs),
    /// Environment templates: build, list, show, rm.
    Env(crate::env::EnvArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// Memory limit in MiB.
    #[arg(long)]
    pub(crate) memory_mb: Option<u64>,
    /// Wall-clock timeout in seconds.
    #[arg(long)]
    pub(crate) timeout_s: Option<u64>,
    /// CPU time limit in seconds.
    #[arg(long)]
    pub(crate) cpu_s: Option<u64>,
    /// Maximum number of tasks alive at once.
    #[arg(long)]
    pub(crate) pids: Option<u32>,
    /// A directory whose contents become the job's work directory.
    #[arg(long)]
    pub(crate) input: Option<PathBuf>,
    /// A pattern of files to return after the job exits (repeatable).
    #[arg(long = "output")]
    pub(crate) outputs: Vec<String>,
    /// Where returned files are written: a directory that does not exist yet or is empty
    /// (default: a new `./sandrun-<job>/`). Nothing existing is ever overwritten.
    #[arg(long)]
    pub(crate) out_dir: Option<PathBuf>,
    /// A file whose bytes are the job's standard input, or `-` for this command's own stdin
    /// (read to its end before the job is submitted). Without it the job's stdin is
    /// `/dev/null`. The helper's `max_stdin_bytes` caps it.
    #[arg(long)]
    pub(crate) stdin: Option<PathBuf>,
    /// An extra environment variable, `KEY=VALUE` (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub(crate) env: Vec<(String, String)>,
    /// The program and its arguments (an interpreter name or an absolute path in the sandbox).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) argv: Vec<String>,
    /// A template build (`env build` only, never a command-line flag): more output files.
    #[arg(skip)]
    pub(crate) build: bool,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Runs the chosen command and returns the process exit code.
pub(crate) fn dispatch(cli: &Cli) -> Result<i32, CtlError> {
    match &cli.command {
        Command::Ps => crate::admin::ps(&cli.socket, cli.json),
        Command::Kill { id } => crate::admin::kill(&cli.socket, *id, cli.json),
        Command::Stats => crate::admin::stats(&cli.socket, cli.json),
        Command::Drain => crate::admin::drain(&cli.socket, cli.json),
        Command::Run(args) => crate::run::run(&cli.socket, args, cli.json),
        Command::Env(args) => crate::env::dispatch(&cli.socket, args, cli.json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_env_without_equals_then_it_is_refused() {
        assert!(parse_env("NOEQUALS").is_err());
        assert!(parse_env("=v").is_err());
        assert_eq!(parse_env("K=a=b"), Ok(("K".to_owned(), "a=b".to_owned())));
    }

    #[test]
    fn given_run_with_dashes_then_argv_keeps_them() {
        let cli = Cli::parse_from([
            "sandrunctl",
            "run",
            "--pids",
            "3",
            "--",
            "/bin/sh",
            "-c",
            "x",
        ]);
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.argv, ["/bin/sh", "-c", "x"]);
        assert_eq!(args.pids, Some(3));
        assert_eq!(args.stdin, None);
    }

    #[test]
    fn given_stdin_dash_then_it_is_kept_as_the_path() {
        let cli = Cli::parse_from(["sandrunctl", "run", "--stdin", "-", "/bin/cat"]);
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.stdin, Some(PathBuf::from("-")));
        assert_eq!(args.argv, ["/bin/cat"]);
    }

    #[test]
    fn given_global_json_after_subcommand_then_it_is_set() {
        let cli = Cli::parse_from(["sandrunctl", "ps", "--json"]);
        assert!(cli.json);
    }
}
