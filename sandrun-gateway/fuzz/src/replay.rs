//! Replays corpus files through a check, for the plain (non-libFuzzer) build of each target.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A target's check: `Ok` accepted, `Err` refused; a broken property panics.
pub type Check = fn(&[u8]) -> Result<(), String>;

/// Feeds every file named on the command line (directories: every file inside) to `check`, or
/// stdin when there are no arguments, and prints how many inputs were accepted and refused.
pub fn run(target: &str, check: Check) -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.is_empty() {
        let mut data = Vec::new();
        if let Err(e) = std::io::stdin().read_to_end(&mut data) {
            eprintln!("{target}: reading stdin: {e}");
            return ExitCode::FAILURE;
        }
        match check(&data) {
            Ok(()) => println!("stdin: accepted"),
            Err(e) => println!("stdin: refused: {e}"),
        }
        return ExitCode::SUCCESS;
    }
    let (mut accepted, mut refused) = (0usize, 0usize);
    for arg in &args {
        let files = match files_of(arg) {
            Ok(files) => files,
            Err(e) => {
                eprintln!("{target}: listing {}: {e}", arg.display());
                return ExitCode::FAILURE;
            }
        };
        for file in files {
            let data = match std::fs::read(&file) {
                Ok(data) => data,
                Err(e) => {
                    eprintln!("{target}: reading {}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            match check(&data) {
                Ok(()) => accepted += 1,
                Err(_) => refused += 1,
            }
        }
    }
    println!(
        "{target}: replayed {} input(s): {accepted} accepted, {refused} refused",
        accepted + refused
    );
    ExitCode::SUCCESS
}

/// `path` itself, or the regular files directly inside it, sorted.
pub fn files_of(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}
