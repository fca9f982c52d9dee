//! Fuzz target `archive_targz`: see [`sandrun_gateway_fuzz::checks::archive_targz`] for the input format and the
//! properties checked. Built with plain `cargo build` it replays files:
//! `archive_targz FILE_OR_DIR...` (or bytes on stdin).
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sandrun_gateway_fuzz::checks::archive_targz(data);
});

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    sandrun_gateway_fuzz::replay::run("archive_targz", sandrun_gateway_fuzz::checks::archive_targz)
}
