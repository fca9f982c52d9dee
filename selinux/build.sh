#!/usr/bin/env bash
# Compiles sandrun's SELinux policy module with the reference policy's development Makefile
# and fails on any warning.
#
#   selinux/build.sh            # -> target/selinux/sandrun.pp
#   selinux/build.sh OUT_DIR    # -> OUT_DIR/sandrun.pp
#
# Needs make and the reference policy's headers (Debian: selinux-policy-dev; Fedora:
# selinux-policy-devel), both installed by packaging/deps.sh. The sources are compiled in a
# scratch copy, so the tree gets no tmp/ and no .pp.
set -euo pipefail
cd "$(dirname "$0")/.."
makefile=${SELINUX_DEVEL_MAKEFILE:-/usr/share/selinux/devel/Makefile}
out=${1:-target/selinux}
[ -f "$makefile" ] || { echo "selinux: $makefile missing: install selinux-policy-dev (packaging/deps.sh)" >&2; exit 1; }
command -v make >/dev/null || { echo "selinux: make missing (packaging/deps.sh)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp selinux/sandrun.te selinux/sandrun.if selinux/sandrun.fc "$work/"
if ! (cd "$work" && make -f "$makefile" sandrun.pp) >"$work/build.log" 2>&1; then
  cat "$work/build.log" >&2
  echo "selinux: the module did not compile" >&2
  exit 1
fi
# checkmodule, m4 and the interface macros (refpolicywarn: deprecated or misused interfaces)
# all say "warning"; a clean build says nothing of the kind.
if grep -qi 'warn' "$work/build.log"; then
  cat "$work/build.log" >&2
  echo "selinux: the module compiled with warnings" >&2
  exit 1
fi
[ -s "$work/sandrun.pp" ] || { echo "selinux: no sandrun.pp" >&2; exit 1; }
mkdir -p "$out"
install -m 0644 "$work/sandrun.pp" "$out/sandrun.pp"
echo "$out/sandrun.pp"
