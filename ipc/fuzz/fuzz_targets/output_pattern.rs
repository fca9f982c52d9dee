//! Fuzz target `output_pattern`: see `ipc/fuzz/src/output_pattern.rs` for the input format and
//! the properties checked. Built with plain `cargo build` it replays files:
//! `output_pattern FILE_OR_DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[path = "../src/output_pattern.rs"]
mod output_pattern;

use output_pattern::check;

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check(data);
});

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    use std::path::PathBuf;
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (mut inputs, mut matched) = (0usize, 0usize);
    for arg in &args {
        let files = if arg.is_dir() {
            match std::fs::read_dir(arg) {
                Ok(entries) => entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file())
                    .collect(),
                Err(e) => {
                    eprintln!("output_pattern: listing {}: {e}", arg.display());
                    return std::process::ExitCode::FAILURE;
                }
            }
        } else {
            vec![arg.clone()]
        };
        for file in files {
            match std::fs::read(&file) {
                Ok(data) => {
                    matched += check(&data);
                    inputs += 1;
                }
                Err(e) => {
                    eprintln!("output_pattern: reading {}: {e}", file.display());
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
    }
    println!("output_pattern: replayed {inputs} input(s), {matched} match(es)");
    std::process::ExitCode::SUCCESS
}
