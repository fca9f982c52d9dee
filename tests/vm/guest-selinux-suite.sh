#!/bin/bash
# The SELinux VM run, inside the guest built by `VM_SELINUX=1 tests/vm/build-image.sh` (booted
# with security=selinux, permissive): installs the freshly built .deb with dpkg -i (its postinst
# loads the module and labels what it creates), runs tests/vm/guest-selinux.sh in permissive
# mode, then turns enforcing on and runs it again. The last line is "PASS: ..." only if both
# passed. Started by tests/vm/run.sh (VM_SELINUX=1) from the 9p share.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
share=$(cd "$(dirname "$0")" && pwd)
fail() { echo "FAIL: $*"; exit 1; }
echo "--- kernel $(uname -r), SELinux $(getenforce 2>&1), policy $(sestatus | sed -n 's/^Loaded policy name: *//p')"
systemctl is-active -q auditd || systemctl start auditd || fail "auditd does not start"
dpkg -i "$share/sandrun.deb" || fail "dpkg -i"
echo "--- permissive"
bash "$share/guest-selinux.sh" --expect permissive || fail "the permissive run"
echo "--- enforcing"
setenforce 1
# Restart both daemons so they start under enforcing (socket activation brings them back).
systemctl stop sandrun-gateway.service sandrund.service
bash "$share/guest-selinux.sh" --expect enforcing || fail "the enforcing run"
# Whatever the guest denied to anything of sandrun's while enforcing, beyond the two probes.
setenforce 0
echo "PASS: SELinux module loaded; helper, gateway and jobs in their domains; no AVC for sandrun's own work; a job's socket and key read denied (permissive, then enforcing)"
