#!/usr/bin/env bash
# Installs the Debian packages sandrun needs to build, run and test. Idempotent; needs root.
#
#   packaging/deps.sh          # build, run and test (what CI's packaging/test.sh uses)
#   packaging/deps.sh --bench  # also the sandboxes the benchmark compares against
#                              # (packaging/bench.sh passes it; CI does not)
set -euo pipefail
bench=0
for arg in "$@"; do
  case "$arg" in
    --bench) bench=1 ;;
    *) echo "usage: packaging/deps.sh [--bench]" >&2; exit 2 ;;
  esac
done
pkgs=(
  build-essential pkg-config libseccomp-dev libsystemd-dev   # build: the seccomp filters (compiled by build scripts) and systemd crates
  python3 nodejs bash coreutils                               # interpreters the sandbox offers
  python3-pip                                                 # sandrunctl env build (download as sandrun-build, install in a job)
  chromium                                                    # browser tests of the web UI (tests/browser/)
  iproute2 procps util-linux systemd openssl curl             # tests: ip, ps, mount, socket activation, signature checks
  python3-requests tar                                        # tests: the original Sandrun clients (tests/compat)
  rpm                                                         # packaging: rpmbuild for packaging/rpm/rpm.sh
  make selinux-policy-dev                                     # packaging: the SELinux module (selinux/build.sh)
  policycoreutils setools                                     # tests: semodule, sesearch (selinux/link-check.sh)
  qemu-system-x86 mmdebstrap e2fsprogs debian-archive-keyring # the VM suite (tests/vm/): guest image and QEMU
)
if [ "$bench" = 1 ]; then
  # The reference sandboxes of sandrun-bench (figures 1, 3, 7, 8, 9); isolate is not in Debian.
  pkgs+=(bubblewrap crun firejail)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm for the browser tests' playwright-core and for `sandrunctl env build`'s `npm:` lines
# (tests/tests/environments.rs builds an npm template). A nodejs that ships its own npm (NodeSource's)
# conflicts with Debian's npm package, so it is only installed when no npm is there.
command -v npm >/dev/null 2>&1 || missing+=(npm)
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
