#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, and the integration tests that start
# the real daemons and real sandboxes. Must run as root (the sandbox tests need it); CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "the test suite starts the root helper and real sandboxes: run it as root" >&2
  exit 1
fi
bash packaging/deps.sh
# The SELinux module compiles with the reference policy's development Makefile, no warning.
bash selinux/build.sh >/dev/null
# ...links into Debian's full reference policy and keeps its claims (no network for jobs, ...).
bash selinux/link-check.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The integration tests start target/debug/sandrund and friends: build every binary first.
cargo build --workspace --bins --locked
# The harness would otherwise run `cargo build -p sandrund -p sandrunctl` per test binary, which builds ipc
# without the workspace's features and relinks the very binaries other tests are executing
# (seen as ETXTBSY). Everything was just built with the workspace's features.
SANDRUN_TESTS_SKIP_BUILD=1 cargo test --workspace --locked --all-features
# Build the .deb from release binaries, install it, run a job over HTTPS and through sandrunctl,
# purge it and check nothing is left (docs/operations.md). The release build adds ~3 minutes.
bash packaging/install-test.sh
# A bounded smoke run of every fuzz target (docs/security-testing.md#fuzzing).
FUZZ_SECONDS="${FUZZ_SECONDS:-10}" bash packaging/fuzz-smoke.sh
echo "all tests passed"
