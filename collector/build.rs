//! Compiles the output collector's seccomp policy (`COLLECTOR` in `seccomp/src/policy.rs`) into
//! the classic-BPF program the collector embeds (`$OUT_DIR/collector_filter.rs`, included by
//! `src/confine.rs`), so the collector links no libseccomp and compiles nothing when it starts.

fn main() {
    let policy = &sandrun_seccomp::COLLECTOR;
    sandrun_seccomp::build_script(policy, "COLLECTOR_FILTER", "collector_filter.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
