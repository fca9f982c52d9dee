#!/usr/bin/env bash
# Runs sandrun's benchmark suite (issue 4): builds the release binaries and runs
# `sandrun-bench` as root. It starts its own sandrund and sandrun-gateway --dev (temp socket,
# raised limits, a private cgroup) and prints one Markdown table: median, p99, run count and a
# ratio against a reference measured in the same run, for each figure. See docs/benchmarks.md.
#
#   sudo packaging/bench.sh            # the full suite (a few minutes)
#   sudo packaging/bench.sh --quick    # fewer samples
#   sudo packaging/bench.sh --only 1,7 # some figures
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "the benchmark starts the root helper and real sandboxes: run it as root" >&2
  exit 1
fi
bash packaging/deps.sh
# The reference sandbox of figures 1, 3 and 7.
if ! command -v bwrap >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq bubblewrap >/dev/null
fi
if ! id sandrun >/dev/null 2>&1; then
  echo "the gateway drops to the user 'sandrun': create it first (useradd --system sandrun)" >&2
  exit 1
fi
cargo build --release --locked -p sandrund -p sandrun-gateway -p sandrun-bench
exec target/release/sandrun-bench --bin-dir target/release "$@"
