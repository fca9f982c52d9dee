//! Compiles the job's seccomp policy (`seccomp/src/policy.rs`, crate `sandrun-seccomp`) into the
//! classic-BPF program the helper embeds (`$OUT_DIR/job-filter.bpf`, read by
//! `src/sandbox/seccomp.rs`), so the root helper links no libseccomp and compiles nothing at
//! start-up. Cargo runs this again whenever the policy crate changes.

use std::path::PathBuf;

fn main() {
    // The compiler emits the program for the architecture it runs on (libseccomp's native
    // one): building sandrund for another one would embed a filter for the wrong syscall table.
    let target_arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let target_width = std::env::var("CARGO_CFG_TARGET_POINTER_WIDTH").unwrap_or_default();
    let host_width = (8 * std::mem::size_of::<usize>()).to_string();
    if target_arch != std::env::consts::ARCH || target_width != host_width {
        panic!(
            "sandrund embeds a seccomp filter compiled for the build host ({} {host_width}-bit); \
             building it for {target_arch} {target_width}-bit (cross-compiling) is not supported",
            std::env::consts::ARCH
        );
    }
    if let Err(e) = sandrun_seccomp::pin_api_level() {
        panic!("{e}");
    }
    let program = match sandrun_seccomp::compile(&sandrun_seccomp::JOB) {
        Ok(program) => program,
        Err(e) => panic!("the job's seccomp policy does not compile: {e}"),
    };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let path = out.join("job-filter.bpf");
    if let Err(e) = std::fs::write(&path, program) {
        panic!("write {}: {e}", path.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
}
