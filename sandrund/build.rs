//! Compiles the job's seccomp policy (`seccomp/src/policy.rs`, crate `sandrun-seccomp`) into the
//! classic-BPF program the helper embeds (`$OUT_DIR/job_filter.rs`, included by
//! `src/sandbox/seccomp.rs`), so the root helper links no libseccomp and compiles nothing at
//! start-up. Cargo runs this again whenever the policy crate changes.

fn main() {
    sandrun_seccomp::build_script(&sandrun_seccomp::JOB, "JOB_FILTER", "job_filter.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
