//! `sandrunctl`: the local client of `sandrund`.
//!
//! Admin commands (`ps`, `kill`, `stats`, `drain`) use [`sandrun_ipc::Role::Admin`]; `run` submits
//! a one-shot job as [`sandrun_ipc::Role::Submitter`], streams its output and writes its output
//! files. `--json` prints machine-readable results for programs and AI agents.
//!
//! Exit status: the job's exit code (or 128 + signal) for `run`; 0 for successful admin commands;
//! [`error::EXIT_CLIENT_ERROR`] (125) when the helper refuses the request or the client fails.

mod admin;
mod bundle;
mod cli;
mod conn;
mod env;
mod error;
mod outputs;
mod run;
mod wheelhouse;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let code = match cli::dispatch(&cli) {
        Ok(code) => code,
        Err(e) => e.report(cli.json),
    };
    std::process::exit(code);
}
