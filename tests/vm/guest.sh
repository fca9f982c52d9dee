#!/bin/bash
# The VM suite's checks, run as root inside the Debian 12 guest (systemd PID 1, pure cgroup v2)
# by the image's sandrun-vm-run.service, from the 9p share that tests/vm/run.sh fills with the
# freshly built .deb (sandrun.deb) and this script. Fails at the first broken check, printing
# each check as it goes; the last line is "PASS: ..." only if every check passed.
#
# Every wait is bounded (wait_for); no check asserts how long something took.
set -Eeuo pipefail
trap 'fail "line $LINENO: \"$BASH_COMMAND\" failed"' ERR
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
share=$(cd "$(dirname "$0")" && pwd)
deb=$share/sandrun.deb
cert=/etc/sandrun/tls/cert.pem
url=https://localhost
tmp=$(mktemp -d)
# Slot uids of the packaged configuration (slot_uid_base = 200000, slot_count = 64).
slot_lo=200000
slot_hi=200064
# The helper's delegated subtree: job cgroups are <unit cgroup>/sandrun/job-*.
cg_unit=/sys/fs/cgroup/system.slice/sandrund.service
cg_jobs=$cg_unit/sandrun
score_failures=()
t0=$(date +%s)

step() { echo "--- [$(($(date +%s) - t0))s] $*"; }
ok() { echo "ok: $*"; }
fail() {
  echo "FAIL: $*"
  echo "--- sandrund journal (last 60 lines)"
  journalctl -b -u sandrund.service -u sandrund.socket --no-pager -n 60 2>&1 || true
  echo "--- sandrun-gateway journal (last 40 lines)"
  journalctl -b -u sandrun-gateway.service -u sandrun-gateway.socket --no-pager -n 40 2>&1 || true
  exit 1
}
# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_for() {
  local secs=$1 what=$2
  shift 2
  local end=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || fail "waited ${secs}s for: $what"
    sleep 0.2
  done
}
is_active() { [ "$(systemctl is-active "$1" 2>/dev/null)" = active ]; }
is_inactive() { [ "$(systemctl is-active "$1" 2>/dev/null)" != active ]; }
main_pid() { systemctl show -p MainPID --value sandrund.service; }
# Processes running as a slot uid (a job's), one "pid uid comm" per line.
slot_procs() { ps -e -o pid=,uid=,comm= | awk -v lo=$slot_lo -v hi=$slot_hi '$2 >= lo && $2 < hi'; }
# Job cgroups that are not the warm pool's (job-w<n>, prepared sandboxes waiting for a job).
job_cgroups() { find "$cg_jobs" -mindepth 1 -maxdepth 1 -type d -name 'job-*' ! -name 'job-w*' 2>/dev/null || true; }
warm_cgroups() { find "$cg_jobs" -mindepth 1 -maxdepth 1 -type d -name 'job-w*' 2>/dev/null | wc -l; }
no_slot_procs() { [ -z "$(slot_procs)" ]; }
no_job_cgroups() { [ -z "$(job_cgroups)" ]; }
# sandrunctl run --json ...: prints the report; the exit code is the job's, so it is ignored here.
ctl_json() { sandrunctl --json run "$@" 2>"$tmp/ctl.err" || true; }
json() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(d'"$1"')'; }
# The system's state that an install and purge must leave as it was.
snapshot() {
  {
    # (useradd and groupadd keep a backup of each file they change: /etc/passwd- and the like.)
    find /etc /usr /opt /srv /var/lib -xdev \
      \( -path /var/lib/dpkg -o -path /var/lib/apt -o -path /var/lib/systemd/timers \
      -o -path /var/lib/systemd/catalog -o -path /var/lib/systemd/random-seed \
      -o -path /var/lib/systemd/coredump -o -path /etc/ld.so.cache \
      -o -path /var/lib/dhcp -o -path /var/lib/private -o -path /var/lib/systemd/pstore \) -prune \
      -o -print | grep -Ev '^/etc/(passwd|group|shadow|gshadow)-$'
    # dpkg's own records of sandrun (its info files and status entry) must go too.
    ls /var/lib/dpkg/info | sed 's|^|dpkg-info:|'
    dpkg-query -W -f='dpkg-status:${Package} ${Status}\n' | grep -v 'not-installed' || true
    getent passwd | cut -d: -f1 | sed 's/^/user:/'
    getent group | cut -d: -f1 | sed 's/^/group:/'
    systemctl list-unit-files --no-legend --no-pager | awk '{print "unit-file:" $1 " " $2}'
    systemctl list-units --all --no-legend --no-pager --plain | awk '{print "unit:" $1}' | grep -i sandrun || true
    { find /run/sandrun /sys/fs/cgroup -maxdepth 3 -name '*sandrun*' 2>/dev/null || true; } | sed 's/^/runtime:/'
    findmnt -rn -o TARGET | sed 's/^/mount:/'
  } | sort -u
}

step "the guest: systemd as PID 1, pure cgroup v2"
[ "$(cat /proc/1/comm)" = systemd ] || fail "PID 1 is $(cat /proc/1/comm), not systemd"
[ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] || fail "/sys/fs/cgroup is not cgroup2"
[ -z "$(findmnt -rn -t cgroup)" ] || fail "a cgroup v1 hierarchy is mounted: $(findmnt -rn -t cgroup)"
for c in memory pids cpu; do
  grep -qw "$c" /sys/fs/cgroup/cgroup.controllers || fail "controller $c missing on cgroup v2"
done
ok "systemd $(systemctl --version | head -n1 | cut -d' ' -f2), kernel $(uname -r), cgroup2 with $(cat /sys/fs/cgroup/cgroup.controllers)"
[ -f "$deb" ] || fail "no $deb in the share"

step "snapshot before install"
snapshot >"$tmp/before"
ok "$(wc -l <"$tmp/before") entries"

step "dpkg -i (no other step)"
if ! dpkg -i "$deb" >"$tmp/dpkg.log" 2>&1; then
  cat "$tmp/dpkg.log"
  fail "dpkg -i $deb"
fi
sed 's/^/  dpkg: /' "$tmp/dpkg.log"
ok "installed $(dpkg-query -W -f='${Package} ${Version}' sandrun)"

step "sockets enabled and listening; no service started by the install"
for s in sandrund.socket sandrun-gateway.socket; do
  [ "$(systemctl is-enabled "$s")" = enabled ] || fail "$s is $(systemctl is-enabled "$s"), not enabled"
  is_active "$s" || fail "$s is $(systemctl is-active "$s"), not active"
done
[ -S /run/sandrun/sandrund.sock ] || fail "no /run/sandrun/sandrund.sock"
[ "$(stat -c '%U:%G %a' /run/sandrun/sandrund.sock)" = "root:sandrun 660" ] \
  || fail "helper socket is $(stat -c '%U:%G %a' /run/sandrun/sandrund.sock)"
is_inactive sandrund.service || fail "the install started sandrund.service"
is_inactive sandrun-gateway.service || fail "the install started sandrun-gateway.service"
for u in sandrund.service sandrun-gateway.service; do
  [ "$(systemctl show -p Type --value "$u")" = notify ] || fail "$u is not Type=notify"
done
ok "both sockets enabled and active, both services inactive (Type=notify)"

step "socket activation: the first HTTPS connection starts the gateway"
code=$(curl -sS -o "$tmp/root.html" -w '%{http_code}' --cacert "$cert" --max-time 60 "$url/") \
  || fail "curl --cacert $cert $url/ failed"
[ "$code" = 200 ] || fail "GET / answered $code"
wait_for 30 "sandrun-gateway.service active" is_active sandrun-gateway.service
[ "$(systemctl show -p NRestarts --value sandrun-gateway.service)" = 0 ] || fail "the gateway restarted"
ok "GET $url/ = 200, verified against $cert; sandrun-gateway.service active after READY=1"
curl -fsS --cacert "$cert" "$url/health" >/dev/null || fail "GET /health"

step "hello job over HTTPS (the first job starts the helper through its socket)"
echo 'print("hello from the vm")' >"$tmp/main.py"
resp=$(curl -fsS --cacert "$cert" -F "files=@$tmp/main.py" "$url/submit") || fail "submit"
job=$(echo "$resp" | json '["job_id"]') || fail "submit answered: $resp"
job_done() {
  status=$(curl -fsS --cacert "$cert" "$url/status/$1") || return 1
  echo "$status" >"$tmp/status"
  case "$status" in *'"status":"completed"'* | *'"status":"failed"'*) return 0 ;; esac
  return 1
}
wait_for 120 "job $job finished" job_done "$job"
grep -q '"status":"completed"' "$tmp/status" || fail "job $job: $(cat "$tmp/status")"
curl -fsS --cacert "$cert" "$url/logs/$job" | grep -q 'hello from the vm' || fail "job output"
is_active sandrund.service || fail "sandrund.service is not active after a job"
ok "job $job completed with its output; sandrund.service active (socket-activated, READY=1)"

step "hello job through sandrunctl"
out=$(sandrunctl run -- /usr/bin/python3 -c 'print(6*7)') || fail "sandrunctl run: $out"
[ "$out" = 42 ] || fail "sandrunctl run printed: $out"
ok "sandrunctl run printed 42"
# A job's output file comes back through its collector (sandrun-outputs in the job's cgroup).
collected=$(mktemp -d -u)
mkdir -p "$collected.in"
got=$(sandrunctl run --input "$collected.in" --output r.txt --out-dir "$collected" \
  -- /bin/sh -c 'echo 42 >/work/r.txt' 2>&1) || fail "job with an output: $got"
[ "$(cat "$collected/r.txt" 2>/dev/null)" = 42 ] || fail "the output collector returned nothing: $got"
rm -rf "$collected" "$collected.in"
ok "a job's output file came back through the collector"
# The helper's mounts (it has its own mount namespace: PrivateTmp=, ProtectSystem=) with no job.
helper_mounts() { nsenter -t "$(main_pid)" -m findmnt -rn -o TARGET | sort; }
helper_mounts >"$tmp/mounts.idle"

step "limits end with their reasons"
limit() { # limit REASON DESCRIPTION sandrunctl-run-args...
  local want=$1 what=$2
  shift 2
  local rep reason
  rep=$(ctl_json "$@")
  reason=$(echo "$rep" | json '["reason"]' 2>/dev/null) || fail "$what: no report: $rep $(cat "$tmp/ctl.err")"
  [ "$reason" = "$want" ] || fail "$what: reason $reason, expected $want: $rep"
  ok "$what: reason $reason (exit_code $(echo "$rep" | json '["exit_code"]'), signal $(echo "$rep" | json '["signal"]'))"
}
limit memory_limit "256 MiB written under --memory-mb 64" --memory-mb 64 -- /usr/bin/python3 -c \
  'b = b"x" * (256 << 20); print(len(b))'
limit pids_limit "forking 64 under --pids 8" --pids 8 -- /usr/bin/python3 -c '
import os, time
for _ in range(64):
    if os.fork() == 0:
        time.sleep(30)
        os._exit(0)
'
limit cpu_limit "a busy loop under --cpu-s 1" --cpu-s 1 --timeout-s 120 -- /usr/bin/python3 -c \
  'while True: pass'
limit timeout "sleep 60 under --timeout-s 2" --timeout-s 2 -- /usr/bin/python3 -c \
  'import time; time.sleep(60)'

step "jobs of every kind run under the hardened unit"
# The unit's seccomp filters (system calls, socket families), its device policy and IP filter are
# inherited by every job (docs/operations.md, "Hardening"): each kind of job a user runs is
# checked here, so a directive that breaks one fails the suite.
# run_ok EXPECTED DESCRIPTION sandrunctl-run-args...: the job exits 0 and prints EXPECTED.
run_ok() {
  local want=$1 what=$2 out
  shift 2
  out=$(sandrunctl run "$@" 2>"$tmp/run.err") || fail "$what: sandrunctl run exited $?: $out $(cat "$tmp/run.err")"
  [ "$out" = "$want" ] || fail "$what: printed '$out', expected '$want' ($(cat "$tmp/run.err"))"
  ok "$what: $out"
}
run_ok "tcp4 ok tcp6 ok udp ok" "TCP and UDP on the job's own 127.0.0.1 and ::1" -- /usr/bin/python3 -c '
import socket, threading
def echo(fam, host):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.bind((host, 0)); s.listen(1)
    t = threading.Thread(target=lambda: (lambda c: (c[0].sendall(c[0].recv(16)), c[0].close()))(s.accept()))
    t.start()
    c = socket.create_connection((host, s.getsockname()[1]), timeout=20)
    c.sendall(b"ok"); r = c.recv(16).decode(); c.close(); t.join()
    return r
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); v.sendto(b"ok", u.getsockname())
print("tcp4", echo(socket.AF_INET, "127.0.0.1"), "tcp6", echo(socket.AF_INET6, "::1"), "udp", u.recv(16).decode())
'
run_ok "pool 285 threads 8 pipe ok" "multiprocessing, threads and a subprocess" -- /usr/bin/python3 -c '
import multiprocessing as mp, threading, subprocess
def sq(x): return x * x
if __name__ == "__main__":
    with mp.Pool(2) as p: s = sum(p.map(sq, range(10)))
    ts = [threading.Thread(target=lambda: None) for _ in range(8)]
    [t.start() for t in ts]; [t.join() for t in ts]
    out = subprocess.run(["/bin/sh", "-c", "echo ok"], capture_output=True, text=True).stdout.strip()
    print("pool", s, "threads", len(ts), "pipe", out)
'
run_ok "null zero urandom full-ENOSPC" "the job's devices (DeviceAllow=)" -- /usr/bin/python3 -c '
import errno
open("/dev/null", "w").write("x")
assert open("/dev/zero", "rb").read(4) == bytes(4)
assert len(open("/dev/urandom", "rb").read(16)) == 16 and len(open("/dev/random", "rb").read(1)) == 1
try:
    f = open("/dev/full", "wb", buffering=0); f.write(b"x"); print("full wrote")
except OSError as e:
    assert e.errno == errno.ENOSPC, e
print("null zero urandom full-ENOSPC")
'
run_ok "sandrun 42" "bash with its own hostname" -- /usr/bin/bash -c 'echo "$HOSTNAME $((6 * 7))"'
# The image has nodejs (tests/vm/build-image.sh): a missing node is a broken image, not a skip.
[ -x /usr/bin/node ] || fail "no /usr/bin/node in the guest (build-image.sh installs nodejs)"
# A JIT (why the unit has no MemoryDenyWriteExecute=), worker threads and a child process.
run_ok "node 42 worker 7 child ok" "node with its JIT, a worker and a child" -- /usr/bin/node -e '
const { Worker } = require("worker_threads");
const { execFileSync } = require("child_process");
let s = 0; for (let i = 0; i < 3e6; i++) s = (s + i) % 1000003;
const w = new Worker("require(\"worker_threads\").parentPort.postMessage(7)", { eval: true });
w.on("message", (m) => {
  const c = execFileSync("/bin/sh", ["-c", "echo ok"]).toString().trim();
  console.log("node", 6 * 7, "worker", m, "child", c);
  w.terminate();
});
'

step "a double-forked daemon is gone after its job"
rep=$(ctl_json -- /usr/bin/python3 -c '
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(300)
        os._exit(0)
    os._exit(0)
time.sleep(0.5)
print("parent exits")
')
[ "$(echo "$rep" | json '["exit_code"]')" = 0 ] || fail "daemon job: $rep"
wait_for 30 "no slot-uid process" no_slot_procs
ok "the job exited 0 and no slot-uid process is left"

# A sleeping job in the background (its report in $tmp/<marker>.json, its sandrunctl's pid in
# $sleeper) and, from the host, its process and cgroup: the job has its own cgroup namespace,
# so only the host's /proc/<pid>/cgroup names the cgroup it really is in.
start_sleeper() { # start_sleeper MARKER sandrunctl-run-args...
  local m=$1
  shift
  sandrunctl --json run "$@" -- /usr/bin/python3 -c "import time; time.sleep(90) # $m" \
    >"$tmp/$m.json" 2>&1 &
  sleeper=$!
}
# The job's process (its sandrunctl has the same command line, but not a slot uid).
job_proc() {
  local p
  for p in $(pgrep -f "time.sleep\(90\) # $1"); do
    [ "$(stat -c %u "/proc/$p")" -ge $slot_lo ] && echo "$p" && return 0
  done
  return 1
}
host_cgroup() { echo "/sys/fs/cgroup$(sed -n 's/^0:://p' "/proc/$1/cgroup")"; }
# Cancels the only running job and checks that it ended with reason cancelled.
cancel_sleeper() { # cancel_sleeper MARKER
  local id reason
  sandrunctl ps >"$tmp/ps" || fail "sandrunctl ps"
  id=$(awk 'NR > 1 {print $1}' "$tmp/ps" | head -n1)
  [ -n "$id" ] || fail "sandrunctl ps lists no job: $(cat "$tmp/ps")"
  sandrunctl kill "$id" >/dev/null || fail "sandrunctl kill $id"
  wait "$sleeper" || true
  reason=$(json '["reason"]' <"$tmp/$1.json") || fail "job $1: $(cat "$tmp/$1.json")"
  [ "$reason" = cancelled ] || fail "the killed job $1 ended with $reason"
  ok "sandrunctl kill $id: reason cancelled"
}
clone3_fallbacks() {
  sandrunctl --json stats | python3 -c 'import re,sys; m=re.search(r"\"clone3_fallbacks\":\s*(\d+)", sys.stdin.read()); print(m.group(1) if m else "absent")'
}

step "a long job's cgroup files are as configured; clone3 with CLONE_INTO_CGROUP used"
start_sleeper long --memory-mb 100 --pids 10 --timeout-s 120
wait_for 60 "the long job running" job_proc long
p=$(job_proc long)
dir=$(host_cgroup "$p")
[[ $dir == "$cg_jobs"/job-* ]] || fail "the long job (pid $p) is in $dir, not a job cgroup of $cg_jobs"
grep -qx "$p" "$dir/cgroup.procs" || fail "pid $p not in $dir/cgroup.procs"
ok "the job's process $p is in $dir"
check_file() { # check_file FILE EXPECTED
  local got
  got=$(cat "$dir/$1")
  [ "$got" = "$2" ] || fail "$dir/$1 is '$got', expected '$2'"
  ok "$(basename "$dir")/$1 = $got"
}
check_file memory.max $((100 << 20))
check_file pids.max 10
check_file cpu.max "100000 100000"
check_file memory.swap.max 0
check_file memory.oom.group 1
n=$(clone3_fallbacks)
case "$n" in
  0) ok "admin stats: clone3_fallbacks = 0: the sandbox was made by clone3 with CLONE_INTO_CGROUP" ;;
  absent) fail "the admin stats have no clone3_fallbacks counter: cannot tell whether clone3 with CLONE_INTO_CGROUP made the sandbox" ;;
  *) fail "the helper fell back from clone3 $n times" ;;
esac
! journalctl -b -u sandrund.service --no-pager | grep -i 'clone3' | grep -iq 'fall' \
  || fail "the helper logged a clone3 fallback"
cancel_sleeper long

step "nothing left after the jobs (cgroups, slot-uid processes, mounts)"
wait_for 30 "no job cgroup left" no_job_cgroups
wait_for 30 "no slot-uid process" no_slot_procs
helper_mounts >"$tmp/mounts.after"
diff "$tmp/mounts.idle" "$tmp/mounts.after" || fail "the helper's mounts changed across the jobs"
[ "$(warm_cgroups)" -le 4 ] || fail "$(warm_cgroups) warm sandboxes, more than warm_sandboxes = 4"
ok "no job cgroup (only $(warm_cgroups) warm ones), no slot-uid process, the helper's $(wc -l <"$tmp/mounts.idle") mounts unchanged"

step "kill -9 of sandrund mid-job: the job fails cleanly, systemd restarts the helper"
old=$(main_pid)
restarts=$(systemctl show -p NRestarts --value sandrund.service)
printf 'import time\ntime.sleep(60)\nprint("should not print")\n' >"$tmp/main.py"
resp=$(curl -fsS --cacert "$cert" -F "files=@$tmp/main.py" "$url/submit") || fail "submit"
hjob=$(echo "$resp" | json '["job_id"]')
sandrunctl --json run --timeout-s 120 -- /usr/bin/python3 -c 'import time; time.sleep(60)' \
  >"$tmp/killed.json" 2>"$tmp/killed.err" &
ctl=$!
two_running() { [ "$(sandrunctl ps | awk 'NR > 1' | wc -l)" -ge 2 ]; }
wait_for 60 "both jobs running" two_running
kill -9 "$old"
ctl_rc=0
wait "$ctl" || ctl_rc=$?
[ "$ctl_rc" != 0 ] || fail "sandrunctl exited 0 though its helper was killed: $(cat "$tmp/killed.json")"
ok "sandrunctl exited $ctl_rc: $(cat "$tmp/killed.err" "$tmp/killed.json" | tr '\n' ' ')"
restarted() { p=$(main_pid); [ "$p" != 0 ] && [ "$p" != "$old" ] && is_active sandrund.service; }
wait_for 60 "sandrund.service restarted" restarted
ok "sandrund restarted (pid $old -> $(main_pid), NRestarts $restarts -> $(systemctl show -p NRestarts --value sandrund.service))"
wait_for 180 "HTTPS job $hjob finished" job_done "$hjob"
# docs/api.md: a helper connection that fails after the helper took the job is reason internal.
st=$(json '["status"], d.get("reason")' <"$tmp/status")
[ "$st" = "failed internal" ] || fail "the HTTPS job ended '$st', not failed/internal: $(cat "$tmp/status")"
ok "the HTTPS job failed cleanly (reason internal): $(cat "$tmp/status")"
wait_for 30 "no slot-uid process" no_slot_procs
out=$(sandrunctl run -- /usr/bin/python3 -c 'print(6*7)') || fail "the next job: $out"
[ "$out" = 42 ] || fail "the next job printed: $out"
job_done_ok() { job_done "$1" && grep -q '"status":"completed"' "$tmp/status"; }
echo 'print("after the restart")' >"$tmp/main.py"
resp=$(curl -fsS --cacert "$cert" -F "files=@$tmp/main.py" "$url/submit") || fail "submit"
wait_for 120 "the next HTTPS job" job_done_ok "$(echo "$resp" | json '["job_id"]')"
ok "the next jobs ran (sandrunctl and HTTPS)"

step "clone3 answered with ENOSYS: the helper falls back to clone + cgroup.procs"
# >>> clone3-ENOSYS fallback check (issue 10). The helper runs under a seccomp filter that
# answers clone3 with ENOSYS, as systemd's RestrictNamespaces= and older container runtimes do:
# the tests crate's sandrun-no-clone3 wrapper if the package has it, otherwise systemd's own
# filter in a drop-in. The helper counts its fallbacks (clone3_fallbacks in its stats); without
# the counter the check cannot tell a fallback from clone3, so it fails rather than pass unseen.
if ! sandrunctl --json stats | grep -q clone3_fallbacks; then
  fail "the helper's stats have no clone3_fallbacks counter: the clone3-ENOSYS fallback cannot be checked"
else
  mkdir -p /run/systemd/system/sandrund.service.d
  if command -v sandrun-no-clone3 >/dev/null; then
    printf '[Service]\nExecStart=\nExecStart=%s /usr/bin/sandrund --config /etc/sandrun/sandrund.toml\n' \
      "$(command -v sandrun-no-clone3)" >/run/systemd/system/sandrund.service.d/no-clone3.conf
    how="sandrun-no-clone3"
  else
    printf '[Service]\nSystemCallFilter=~clone3:ENOSYS\n' >/run/systemd/system/sandrund.service.d/no-clone3.conf
    how="SystemCallFilter=~clone3:ENOSYS"
  fi
  systemctl daemon-reload
  systemctl restart sandrund.service
  start_sleeper noclone3 --timeout-s 120
  wait_for 60 "a job under $how running" job_proc noclone3
  p=$(job_proc noclone3)
  dir=$(host_cgroup "$p")
  [[ $dir == "$cg_jobs"/job-* ]] || fail "under $how the job (pid $p) is in $dir"
  grep -qx "$p" "$dir/cgroup.procs" || fail "pid $p not in $dir/cgroup.procs"
  n=$(clone3_fallbacks)
  [ "$n" -ge 1 ] || fail "under $how clone3_fallbacks is $n"
  cancel_sleeper noclone3
  cg=$dir
  journalctl -b -u sandrund.service --no-pager | grep -i clone3 | tail -n 3 || true
  rm -f /run/systemd/system/sandrund.service.d/no-clone3.conf
  systemctl daemon-reload
  systemctl restart sandrund.service
  ok "under $how the job ran in $cg; clone3_fallbacks = $n"
fi
# <<< clone3-ENOSYS fallback check

step "systemctl stop: nothing left"
systemctl stop sandrun-gateway.service sandrund.service
wait_for 30 "sandrund.service inactive" is_inactive sandrund.service
no_unit_cgroup() { [ ! -e "$cg_unit" ]; }
wait_for 30 "$cg_unit removed" no_unit_cgroup
no_init() { ! pgrep -x sandrun-init; }
wait_for 30 "no sandrun-init process" no_init
no_slot_procs || fail "slot-uid processes after stop: $(slot_procs)"
! pgrep -x sandrund >/dev/null || fail "a sandrund still runs"
! findmnt -rn -o TARGET | grep -q '^/run/sandrun' || fail "mounts left: $(findmnt -rn | grep /run/sandrun)"
is_active sandrund.socket || fail "sandrund.socket stopped with the service"
ok "services stopped: no helper cgroup, no sandrun-init, no slot-uid process, no mount; sockets still listening"

step "systemd-analyze security (targets: gateway <= 1.5, helper <= 4.0)"
score() { # score UNIT TARGET
  local line s
  line=$(systemd-analyze security --no-pager "$1" | grep 'Overall exposure level')
  s=$(echo "$line" | sed -E 's/.*: ([0-9]+\.[0-9]+).*/\1/')
  echo "score: $1 $s (target <= $2): $line"
  echo "$1 $s $2" >>"$share/scores.txt"
  if python3 -c "import sys; sys.exit(0 if float('$s') <= float('$2') else 1)"; then
    ok "$1 exposure $s <= $2"
  else
    echo "ABOVE TARGET: $1 exposure $s > $2"
    score_failures+=("$1 $s > $2")
  fi
}
: >"$share/scores.txt"
score sandrun-gateway.service 1.5
score sandrund.service 4.0

step "apt purge sandrun leaves nothing behind"
apt-get purge -y sandrun >"$tmp/purge.log" 2>&1 || { cat "$tmp/purge.log"; fail "apt purge sandrun"; }
snapshot >"$tmp/after"
if ! diff "$tmp/before" "$tmp/after" >"$tmp/diff"; then
  cat "$tmp/diff"
  fail "the system after purge differs from before install (< before, > after)"
fi
ok "files, dpkg records, users, groups, unit files, units, runtime dirs, cgroups and mounts as before the install"

echo "--- done in $(($(date +%s) - t0))s"
if [ "${#score_failures[@]}" -gt 0 ]; then
  for s in "${score_failures[@]}"; do echo "FAIL: exposure above target: $s"; done
  exit 1
fi
echo "PASS: every check of the VM suite passed"
