#!/usr/bin/env bash
# Installs the Debian packages sandrun needs to build, run and test. Idempotent; needs root.
set -euo pipefail
pkgs=(
  build-essential pkg-config libseccomp-dev libsystemd-dev   # build: libseccomp and systemd crates
  python3 nodejs bash coreutils                               # interpreters the sandbox offers
  iproute2 procps util-linux systemd openssl curl             # tests: ip, ps, mount, socket activation, signature checks
  python3-requests tar                                        # tests: the original Sandrun clients (tests/compat)
  rpm                                                         # packaging: rpmbuild for packaging/rpm/rpm.sh
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
