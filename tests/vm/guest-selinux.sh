#!/usr/bin/env bash
# The SELinux check, run as root inside a Debian 12 guest booted with SELinux on
# (selinux-basics, selinux-policy-default, auditd; kernel command line `security=selinux
# selinux=1`; the file system labelled), after the freshly built .deb was installed with
# `dpkg -i` (its postinst loads the module) and the sockets are enabled:
#
#   tests/vm/guest-selinux.sh                      # the mode the guest runs in
#   SANDRUN_URL=https://localhost:8443 tests/vm/guest-selinux.sh --expect enforcing
#
# Checks: the module is loaded and the policy can transition under no_new_privs; the files
# are labelled; the helper and the gateway run in their domains; jobs over HTTPS and through
# sandrunctl run in sandrun_job_t, with no AVC denial for any of that work; then that a job's
# IPv4 socket and a job's read of a file labelled as the gateway's key are denied (an AVC,
# and in enforcing mode an error in the job). Prints "selinux: ok: ..." lines; exits 1 on the
# first failure. docs/operations.md#selinux describes the policy.
set -euo pipefail
export LC_ALL=C
expect=
case "${1:-}" in
  --expect) expect=${2:?--expect enforcing|permissive} ;;
  "") ;;
  *) echo "usage: tests/vm/guest-selinux.sh [--expect enforcing|permissive]" >&2; exit 2 ;;
esac
fail() { echo "selinux: FAIL: $*" >&2; exit 1; }
ok() { echo "selinux: ok: $*"; }
url=${SANDRUN_URL:-https://localhost}
ca=/etc/sandrun/tls/cert.pem
[ "$(id -u)" = 0 ] || fail "run as root"
for t in selinuxenabled getenforce semodule compute_av curl python3; do
  command -v "$t" >/dev/null || fail "$t is missing"
done

selinuxenabled || fail "SELinux is not enabled (boot with security=selinux selinux=1)"
mode=$(getenforce)
[ -z "$expect" ] || [ "${mode,,}" = "$expect" ] || fail "mode is $mode, expected $expect"
[ "$(cat /sys/fs/selinux/policy_capabilities/nnp_nosuid_transition)" = 1 ] \
  || fail "policy capability nnp_nosuid_transition is off: jobs cannot enter sandrun_job_t"
semodule -l | grep -x sandrun >/dev/null || fail "module sandrun is not loaded"
ok "SELinux $mode, module sandrun loaded, nnp_nosuid_transition on"

# AVC denials since a point in time (epoch seconds), from the audit log when auditd runs, else
# from the kernel log. The records' own timestamps (msg=audit(EPOCH.ms:serial)) are compared:
# `ausearch -ts` takes its time in the locale's format and matched nothing here, which let
# every denial through.
avcs_since() {
  if systemctl is-active -q auditd; then
    awk -v t="$1" 'match($0, /msg=audit\([0-9]+/) && substr($0, RSTART + 10, RLENGTH - 10) + 0 >= t' \
      /var/log/audit/audit.log | grep -E 'avc: +denied|SELINUX_ERR' || true
  else
    journalctl -k -o cat --since "@$1" 2>/dev/null | grep -E 'avc: +denied|SELINUX_ERR' || true
  fi
}

label_is() { # path type
  local l
  l=$(stat -c %C "$1") || fail "cannot stat $1"
  case "$l" in *":$2:"*) ;; *) fail "$1 is labelled $l, not $2" ;; esac
}
label_is /usr/bin/sandrund sandrund_exec_t
label_is /usr/bin/sandrun-gateway sandrun_gateway_exec_t
label_is /usr/bin/sandrunctl bin_t
label_is /usr/bin/sandrun-outputs sandrun_collect_exec_t
label_is /etc/sandrun sandrun_conf_t
label_is /etc/sandrun/sandrund.toml sandrun_conf_t
label_is /etc/sandrun/worker.key sandrun_key_t
label_is /etc/sandrun/tls/key.pem sandrun_key_t
label_is /var/lib/sandrun sandrun_var_lib_t
label_is /run/sandrun sandrun_runtime_t
label_is /run/sandrun/sandrund.sock sandrund_sock_t
ok "file contexts"

start=$(date +%s)
sleep 1 # AVC timestamps have a one-second resolution

# Socket activation starts both daemons.
for _ in $(seq 100); do curl -fsS --cacert "$ca" "$url/health" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS --cacert "$ca" "$url/health" >/dev/null || fail "gateway not answering on $url"
domain_of() { ps -eo label=,comm= | awk -v c="$1" '$2 == c { print $1; exit }'; }
d=$(domain_of sandrun-gateway)
case "$d" in *:sandrun_gateway_t:*) ;; *) fail "sandrun-gateway runs as '$d'" ;; esac
ok "gateway in sandrun_gateway_t"

# Jobs through sandrunctl: the domain, an interpreter, a shell with a child, /dev/stdout, a file
# in /work, System V IPC and a pipe between processes.
out=$(sandrunctl run -- /bin/cat /proc/self/attr/current | tr -d '\0')
case "$out" in *:sandrun_job_t:*) ;; *) fail "a job runs as '$out'" ;; esac
out=$(sandrunctl run -- /usr/bin/python3 -c 'print(6*7)')
[ "$out" = 42 ] || fail "python3 job: $out"
out=$(sandrunctl run -- /bin/sh -c 'echo a >/work/f; cat /work/f | tr a b >/dev/stdout; ls / >/dev/null')
[ "$out" = b ] || fail "shell job: $out"
out=$(sandrunctl run -- /usr/bin/python3 -c '
import multiprocessing as m, os
with m.Pool(2) as p: print(sum(p.map(abs, [-1, -2])))')
[ "$out" = 3 ] || fail "multiprocessing job: $out"
if command -v node >/dev/null; then
  out=$(sandrunctl run -- "$(command -v node)" -e 'console.log(6*7)')
  [ "$out" = 42 ] || fail "node job: $out"
fi
ok "jobs through sandrunctl run in sandrun_job_t"
# A job's output file comes back through its collector (sandrun-outputs, sandrun_collect_t).
collected=$(mktemp -d -u)
mkdir -p "$collected.in"
got=$(sandrunctl run --input "$collected.in" --output r.txt --out-dir "$collected" \
  -- /bin/sh -c 'echo 42 >/work/r.txt' 2>&1) || fail "job with an output: $got"
[ "$(cat "$collected/r.txt" 2>/dev/null)" = 42 ] || fail "the output collector returned nothing: $got"
rm -rf "$collected" "$collected.in"
ok "a job's output came back through the collector"
d=$(domain_of sandrund)
case "$d" in *:sandrund_t:*) ;; *) fail "sandrund runs as '$d'" ;; esac
d=$(domain_of sandrun-init)
case "$d" in "" | *:sandrund_t:*) ;; *) fail "a sandbox's init runs as '$d'" ;; esac
ok "helper (and its sandboxes' init) in sandrund_t"

# A job over HTTPS.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'print(open("/proc/self/attr/current").read().strip("\\0\\n"))\n' >"$tmp/main.py"
job=$(curl -fsS --cacert "$ca" -F "files=@$tmp/main.py" "$url/submit" \
  | sed -E 's/.*"job_id":"([0-9a-f]{32})".*/\1/')
[ -n "$job" ] || fail "submit"
status=
for _ in $(seq 300); do
  status=$(curl -fsS --cacert "$ca" "$url/status/$job")
  case "$status" in *'"status":"completed"'* | *'"status":"failed"'*) break ;; esac
  sleep 0.2
done
echo "$status" | grep -q '"status":"completed"' || fail "HTTPS job: $status"
curl -fsS --cacert "$ca" "$url/logs/$job" | grep -q 'sandrun_job_t' || fail "HTTPS job not in sandrun_job_t"
ok "a job over HTTPS ran in sandrun_job_t"

sleep 1
denials=$(avcs_since "$start" | grep sandrun || true)
[ -z "$denials" ] || { echo "$denials" >&2; fail "AVC denials during sandrun's own work"; }
ok "no AVC denial for the helper, the gateway or the jobs ($mode)"

# A job may not open a network socket.
probe=$(date +%s)
sleep 1
rc=0
out=$(sandrunctl run -- /usr/bin/python3 -c '
import socket
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    print("created")
except PermissionError as e:
    print("denied", e.errno)' 2>&1) || rc=$?
if [ "${mode,,}" = enforcing ]; then
  [ "$out" = "denied 13" ] || fail "a job's AF_INET socket: $out (status $rc)"
fi
sleep 1
avcs_since "$probe" | grep 'sandrun_job_t' | grep -q 'tcp_socket' \
  || fail "no AVC for a job's AF_INET socket ($out)"
ok "a job's network socket is denied ($out)"

# A job may not read the gateway's key material: the policy says so for the label...
av=$(compute_av system_u:system_r:sandrun_job_t:s0 system_u:object_r:sandrun_key_t:s0 file)
echo "$av" | grep -E '^allowed=' | grep -qw read && fail "policy lets jobs read sandrun_key_t: $av"
ok "policy: sandrun_job_t may not read sandrun_key_t"
# ...and a job that sees such a file cannot read it: a world-readable stand-in (not the real
# key) under /usr, which jobs see through their overlay, labelled like the key. In enforcing
# mode the overlay's check of its mounter (sandrund_t) may be the one that refuses: the VM run
# logs `sandrund_t sandrun_key_t:file getattr` from comm="cat", the job's open then fails.
# A directory of its own per run: overlayfs does not promise to see a lower directory that was
# removed and made again while it is mounted.
probe_dir=/usr/local/share/sandrun-selinux-probe-${mode,,}
mkdir -p "$probe_dir"
trap 'rm -rf "$tmp" "$probe_dir"' EXIT
echo "-----BEGIN PRIVATE KEY----- stand-in" >"$probe_dir/key.pem"
chmod 0644 "$probe_dir/key.pem"
chcon -t sandrun_key_t "$probe_dir/key.pem"
probe=$(date +%s)
sleep 1
rc=0
out=$(sandrunctl run -- /bin/cat "$probe_dir/key.pem" 2>&1) || rc=$?
echo "selinux: a job's cat of $probe_dir/key.pem: status $rc: $out"
if [ "${mode,,}" = enforcing ]; then
  if [ "$rc" = 0 ] || echo "$out" | grep -q 'PRIVATE KEY'; then
    fail "a job read a file labelled sandrun_key_t: $out"
  fi
fi
sleep 1
avcs_since "$probe" | grep -E 'scontext=[^ ]*:(sandrun_job_t|sandrund_t):' \
  | grep 'tcontext=[^ ]*:sandrun_key_t:' | grep -qE 'denied +\{ [^}]*(read|open|getattr)' \
  || { avcs_since "$probe" >&2; fail "no AVC for a job's read of a sandrun_key_t file"; }
rm -rf "$probe_dir"
ok "a job's read of the gateway's key is denied (status $rc)"
# The real key material: not even in a job's view (its /etc is its own tmpfs, /run is not
# there), whatever SELinux says.
for k in /etc/sandrun/tls/key.pem /etc/sandrun/worker.key /run/credentials/sandrun-gateway.service; do
  [ -e "$k" ] || fail "$k does not exist on the host"
  rc=0
  out=$(sandrunctl run -- /bin/ls -l "$k" 2>&1) || rc=$?
  case "$rc:$out" in
    0:*) fail "a job sees $k: $out" ;;
    *"No such file or directory"*) ;;
    *) fail "a job's ls -l $k failed for another reason (status $rc): $out" ;;
  esac
done
ok "the gateway's real key files and credentials are not in a job's view"
echo "selinux: all checks passed ($mode)"
