#!/usr/bin/env bash
# Links the compiled module into Debian's full reference policy, without touching this host's
# SELinux store, and checks the policy's security claims on the result.
#
#   selinux/link-check.sh       # after selinux/build.sh (target/selinux/sandrun.pp)
#
# Compiling (selinux/build.sh) cannot tell whether every type and attribute the module
# requires exists, whether a neverallow is violated or whether the file contexts are valid:
# linking can. The policy is Debian's selinux-policy-default, downloaded with apt-get and
# unpacked (not installed) into target/selinux/policy; its store is built once under
# target/selinux/policy/root (about a minute) and the module installed into it with
# `semodule -p` (about 20 s). Needs semodule (policycoreutils), sesearch and seinfo (setools),
# apt-get; all installed by packaging/deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "selinux link-check: FAIL: $*" >&2; exit 1; }
pp=$PWD/target/selinux/sandrun.pp
[ -s "$pp" ] || fail "no $pp: run selinux/build.sh first"
for t in semodule sesearch seinfo apt-get dpkg-deb; do command -v "$t" >/dev/null || fail "$t missing"; done
base=$PWD/target/selinux/policy
root=$base/root
store_ok=$base/.store-built
if [ ! -f "$store_ok" ]; then
  rm -rf "$base"
  mkdir -p "$base"
  (cd "$base" && apt-get download -q selinux-policy-default >/dev/null 2>&1) \
    || fail "apt-get download selinux-policy-default"
  dpkg-deb -x "$base"/selinux-policy-default_*.deb "$root"
  mkdir -p "$root/var/lib/selinux/default"
  args=()
  for m in "$root"/usr/share/selinux/default/*.pp.bz2; do args+=(-i "$m"); done
  semodule -p "$root" -s default -n -X 100 "${args[@]}" >"$base/store.log" 2>&1 \
    || { cat "$base/store.log" >&2; fail "building the reference policy store"; }
  touch "$store_ok"
fi
semodule -p "$root" -s default -n -i "$pp" >"$base/link.log" 2>&1 \
  || { cat "$base/link.log" >&2; fail "the module does not link into the reference policy"; }
policy=$(find "$root/etc/selinux/default/policy" -name "policy.*" | head -n1)
fc=$root/etc/selinux/default/contexts/files/file_contexts
echo "selinux link-check: linked into $(basename "$base"/selinux-policy-default_*.deb .deb)"

# (Each query's output is taken whole before grep -q reads it: piped, grep -q's early exit
# could kill the writer with SIGPIPE, and pipefail would turn a match into a failure.)
grep -qw nnp_nosuid_transition <<<"$(seinfo "$policy" --polcap)" || fail "policy capability nnp_nosuid_transition is off"
# Jobs enter sandrun_job_t at the execve of a program, and the helper runs nothing itself.
for t in bin_t shell_exec_t sandrun_job_file_t sandrun_template_t; do
  grep -q 'sandrun_job_t;' <<<"$(sesearch "$policy" -T -s sandrund_t -t "$t" -c process)" \
    || fail "no transition to sandrun_job_t on $t"
done
[ -z "$(sesearch "$policy" -A -s sandrund_t -c file -p execute_no_trans)" ] \
  || fail "sandrund_t may run programs in its own domain"
# No network for jobs unless the boolean says so: every inet-socket create is conditional.
for c in tcp_socket udp_socket rawip_socket sctp_socket icmp_socket packet_socket netlink_route_socket; do
  bad=$(sesearch "$policy" -A -s sandrun_job_t -c "$c" -p create | grep -v 'sandrun_job_use_inet' || true)
  [ -z "$bad" ] || fail "jobs may create $c sockets: $bad"
done
# Nothing of the key material, the credentials, the configuration or the helper's socket for
# jobs; the key only for systemd, read.
for t in sandrun_key_t ramfs_t sandrun_conf_t sandrund_sock_t sandrun_var_lib_t; do
  bad=$(sesearch "$policy" -A -s sandrun_job_t -t "$t" || true)
  [ -z "$bad" ] || fail "jobs have access to $t: $bad"
done
[ -z "$(sesearch "$policy" -A -s sandrun_gateway_t -t sandrun_key_t)" ] || fail "the gateway reads the key files directly"
[ -z "$(sesearch "$policy" -A -s sandrund_t -t sandrun_key_t)" ] || fail "the helper may read the gateway's keys"
# The gateway connects to nothing but the helper.
[ -z "$(sesearch "$policy" -A -s sandrun_gateway_t -p name_connect)" ] || fail "the gateway may connect out"
grep -q . <<<"$(sesearch "$policy" -A -s sandrun_gateway_t -t sandrund_t -c unix_stream_socket -p connectto)" \
  || fail "the gateway may not connect to the helper"
# The file contexts made it in.
for p in /usr/bin/sandrund /usr/bin/sandrun-gateway /run/sandrun /etc/sandrun/tls /var/lib/sandrun/templates; do
  grep -q "^${p//./\\.}" "$fc" || fail "no file context for $p"
done
echo "selinux link-check: ok"
