#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, and the integration tests that start
# the real daemons and real sandboxes. Must run as root (the sandbox tests need it); CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "the test suite starts the root helper and real sandboxes: run it as root" >&2
  exit 1
fi
# Elapsed seconds per phase, printed as each ends and summed up at the end.
t_start=$(date +%s)
t_phase=$t_start
times=()
phase() {
  local now
  now=$(date +%s)
  times+=("$1 $((now - t_phase))s")
  echo "test.sh: phase '$1' took $((now - t_phase))s"
  t_phase=$now
}
bash packaging/deps.sh
phase deps
# The SELinux module compiles with the reference policy's development Makefile, no warning.
bash selinux/build.sh >/dev/null
# ...links into Debian's full reference policy and keeps its claims (no network for jobs, ...).
bash selinux/link-check.sh
phase selinux
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The root helper's size (issue 13, docs/sandrund.md): both numbers in the log, and a red run if
# its dependency tree grows past 40 crates (the line count is still over its own target).
bash packaging/root-size.sh --check-crates
phase fmt+clippy
# The integration tests start target/debug/sandrund and friends: build every binary first.
cargo build --workspace --bins --locked
phase build
# The harness would otherwise run `cargo build -p sandrund -p sandrunctl` per test binary, which builds ipc
# without the workspace's features and relinks the very binaries other tests are executing
# (seen as ETXTBSY). Everything was just built with the workspace's features.
SANDRUN_TESTS_SKIP_BUILD=1 cargo test --workspace --locked --all-features --exclude sandrund
# The root helper's own unit tests clone sandboxes with the raw `clone` the helper uses, which
# skips libc's fork handlers: with one test thread the only other thread, libtest's main, is
# blocked waiting, so none can hold a lock (stderr, malloc) the clone then needs
# (`SingleThreaded::assume` refuses more). It costs nothing measurable (about 4 s either way).
cargo test -p sandrund --locked -- --test-threads=1
phase cargo-test
# Build the .deb from release binaries, install it, run a job over HTTPS and through sandrunctl,
# purge it and check nothing is left (docs/operations.md). The release build adds ~3 minutes.
bash packaging/install-test.sh
phase install-test
# A bounded smoke run of every fuzz target (docs/security-testing.md#fuzzing).
FUZZ_SECONDS="${FUZZ_SECONDS:-10}" bash packaging/fuzz-smoke.sh
phase fuzz-smoke
# The VM suite (tests/vm/, docs/operations.md "VM suite"): a Debian 12 guest with systemd as PID 1
# and cgroup v2 under QEMU installs the .deb install-test.sh just built (VM_DEB: no second build),
# runs the job suite under the hardened units and checks their exposure scores. Last with
# vm-selinux, alone: each uses both cores. Its image is built from Debian's packages when
# target/vm has none (~5 min).
VM_DEB=$(ls target/package/sandrun_*.deb) bash tests/vm/run.sh
phase vm-suite
# The SELinux run (docs/operations.md, "SELinux"): the image variant with Debian's reference
# policy and auditd, booted with security=selinux; the same .deb loads the module, and
# guest-selinux-suite.sh runs the job suite permissive, then enforcing, with no AVC for sandrun's
# own work, and checks that a job's network socket and its read of a key-labelled file are
# denied. Its image is built when target/vm has none (~8 min here under load), the run ~3-4 min.
VM_SELINUX=1 VM_DEB=$(ls target/package/sandrun_*.deb) bash tests/vm/run.sh
phase vm-selinux
echo "test.sh: times: ${times[*]}, total $(($(date +%s) - t_start))s"
echo "all tests passed"
