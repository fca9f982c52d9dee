//! Fuzz target `multipart_any_type`: see [`sandrun_gateway_fuzz::checks::multipart_any_type`] for the input format and the
//! properties checked. Built with plain `cargo build` it replays files:
//! `multipart_any_type FILE_OR_DIR...` (or bytes on stdin).
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sandrun_gateway_fuzz::checks::multipart_any_type(data);
});

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    sandrun_gateway_fuzz::replay::run(
        "multipart_any_type",
        sandrun_gateway_fuzz::checks::multipart_any_type,
    )
}
