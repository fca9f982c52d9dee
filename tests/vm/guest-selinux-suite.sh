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
# The audit log goes to the share whatever the outcome (target/vm/share/audit.log on the host).
# Permissive again first: the image's runner writes the results to the (unlabelled) 9p share.
trap 'setenforce 0 2>/dev/null; cp /var/log/audit/audit.log "$share/audit.log" 2>/dev/null || true' EXIT
echo "--- kernel $(uname -r), SELinux $(getenforce 2>&1), policy $(sestatus | sed -n 's/^Loaded policy name: *//p')"
systemctl is-active -q auditd || systemctl start auditd || fail "auditd does not start"
dpkg -i "$share/sandrun.deb" || fail "dpkg -i"
t_all=$(date +%s)
echo "--- permissive"
bash "$share/guest-selinux.sh" --expect permissive || fail "the permissive run"
echo "--- enforcing"
t_enf=$(date +%s)
setenforce 1
# Restart both daemons so they start under enforcing (socket activation brings them back).
systemctl stop sandrun-gateway.service sandrund.service
bash "$share/guest-selinux.sh" --expect enforcing || fail "the enforcing run"
# Stopping them while enforcing: the helper's cleanup of its sandboxes and cgroups.
systemctl stop sandrun-gateway.service sandrund.service
sleep 1
[ "$(getenforce)" = Enforcing ] || fail "the mode changed during the enforcing run: $(getenforce)"
setenforce 0
echo "--- enforcing took $(($(date +%s) - t_enf))s"
# Every AVC of the whole run (install excluded) that names a sandrun type, beyond what the two
# probes provoke: a job's inet socket, and a read of the sandrun_key_t stand-in (by the job, or
# by the helper as the overlay's mounter).
all=$(awk -v t="$t_all" 'match($0, /msg=audit\([0-9]+/) && substr($0, RSTART + 10, RLENGTH - 10) + 0 >= t' \
  /var/log/audit/audit.log | grep -E 'avc: +denied|SELINUX_ERR' | grep sandrun || true)
probes='scontext=[^ ]*:sandrun_job_t:[^ ]* tcontext=[^ ]*:sandrun_job_t:[^ ]* tclass=tcp_socket'
probes+='|scontext=[^ ]*:(sandrun_job_t|sandrund_t):[^ ]* tcontext=[^ ]*:sandrun_key_t:[^ ]* tclass=file'
left=$(echo "$all" | grep -vE "$probes" | grep . || true)
echo "--- AVC denials naming sandrun types in the whole run: $(echo "$all" | grep -c . || true)," \
  "of them the probes' $(echo "$all" | grep -cE "$probes" || true)"
[ -z "$left" ] || { echo "$left"; fail "AVC denials for sandrun's own work"; }
echo "PASS: SELinux module loaded; helper, gateway and jobs in their domains; no AVC for sandrun's own work; a job's socket and key read denied (permissive, then enforcing)"
