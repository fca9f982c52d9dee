#!/usr/bin/env bash
# Runs sandrun's benchmark suite (issue 4): builds the release binaries and runs
# `sandrun-bench` as root. It starts its own sandrund and sandrun-gateway --dev (temp socket,
# raised limits, a private cgroup) and prints one Markdown table: median, p99, run count and a
# ratio against a reference measured in the same run, for each figure. See docs/benchmarks.md.
#
#   sudo packaging/bench.sh            # the full suite (a few minutes)
#   sudo packaging/bench.sh --quick    # fewer samples
#   sudo packaging/bench.sh --only 1,7 # some figures
#   sudo packaging/bench.sh --quick --only 8,9  # issue 14: whole process and sandrunctl throughput
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "the benchmark starts the root helper and real sandboxes: run it as root" >&2
  exit 1
fi
# The build dependencies and the reference sandboxes (bubblewrap, crun, firejail).
bash packaging/deps.sh --bench
if ! id sandrun >/dev/null 2>&1; then
  echo "the gateway drops to the user 'sandrun': create it first (useradd --system sandrun)" >&2
  exit 1
fi
# sandrunctl (its own package) is what figures 8 and 9 run as a user would.
cargo build --release --locked -p sandrund -p sandrun-collect -p sandrunctl -p sandrun-gateway -p sandrun-bench
exec target/release/sandrun-bench --bin-dir target/release "$@"
