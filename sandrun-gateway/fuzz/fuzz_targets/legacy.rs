//! Fuzz target `legacy`: see [`sandrun_gateway_fuzz::checks::legacy`] for the input format and the
//! properties checked. Built with plain `cargo build` it replays files:
//! `legacy FILE_OR_DIR...` (or bytes on stdin).
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sandrun_gateway_fuzz::checks::legacy(data);
});

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    sandrun_gateway_fuzz::replay::run("legacy", sandrun_gateway_fuzz::checks::legacy)
}
