#!/usr/bin/env bash
# Installs the freshly built .deb on this machine and proves it works with no hand step, then
# purges it and proves nothing is left. Run as root on Debian 12 (CI: packaging/test.sh).
# systemd need not be PID 1: the daemons are then started here as the units start them (same
# binaries, same --config, the gateway's TLS material and worker key handed over the way
# LoadCredential= does, through $CREDENTIALS_DIRECTORY), on a private socket and port.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "install-test: run as root" >&2; exit 1; }
fail() { echo "install-test: FAIL: $*" >&2; exit 1; }
ok() { echo "install-test: ok: $*"; }
if dpkg-query -W -f='${Status}' sandrun 2>/dev/null | grep -q installed; then
  fail "sandrun is already installed; purge it first"
fi
deb=$(bash packaging/package.sh | tail -n1)
files=target/package/sandrun.files
# The RPM from the same tree; rpm.sh fails if its file list is not the .deb's.
bash packaging/rpm/rpm.sh >/dev/null
echo "install-test: ok: the RPM holds the same $(wc -l <"$files") files as the .deb"
had_user=no; getent passwd sandrun >/dev/null && had_user=yes
had_admin=no; getent group sandrun-admin >/dev/null && had_admin=yes

tmp=$(mktemp -d)
chmod 0755 "$tmp" # the gateway (user sandrun) must reach the helper's socket in it
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
  # A failed run must not leave the package on the machine.
  if dpkg-query -W -f='${Status}' sandrun 2>/dev/null | grep -q installed; then
    DEBIAN_FRONTEND=noninteractive dpkg --purge sandrun >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; fail "dpkg -i"; }
ok "dpkg -i $deb"

while read -r f; do [ -f "$f" ] || fail "missing $f"; done <"$files"
ok "all $(wc -l <"$files") files installed"
[ "$(stat -c '%U %a' /usr/bin/sandrun-outputs)" = "root 755" ] \
  || fail "/usr/bin/sandrun-outputs is $(stat -c '%U %a' /usr/bin/sandrun-outputs)"
ok "the output collector /usr/bin/sandrun-outputs is root's, mode 755"
id sandrun >/dev/null || fail "no user sandrun"
getent group sandrun-admin >/dev/null || fail "no group sandrun-admin"
ok "user sandrun, groups sandrun and sandrun-admin"
[ "$(stat -c %a /etc/sandrun/worker.key)" = 600 ] || fail "worker.key mode"
[ "$(stat -c %a /etc/sandrun/tls/key.pem)" = 600 ] || fail "tls key mode"
subject=$(openssl x509 -in /etc/sandrun/tls/cert.pem -noout -subject)
echo "$subject" | grep -Eq 'CN = sandrun .* [0-9a-f]{16}' || fail "certificate subject: $subject"
openssl x509 -in /etc/sandrun/tls/cert.pem -noout -ext subjectKeyIdentifier | grep -q ':' \
  || fail "no subject key identifier"
openssl x509 -in /etc/sandrun/tls/cert.pem -noout -ext subjectAltName | grep -q localhost \
  || fail "certificate is not for localhost"
ok "worker key and self-signed certificate ($subject)"
man -w sandrund sandrun-gateway sandrunctl >/dev/null 2>&1 || [ -f /usr/share/man/man8/sandrund.8.gz ] \
  || fail "man pages"
# The SELinux module: loaded and the files labelled when SELinux runs here, left alone otherwise.
selinux=no
if command -v selinuxenabled >/dev/null 2>&1 && selinuxenabled; then selinux=yes; fi
if [ "$selinux" = yes ]; then
  semodule -l | grep -x sandrun >/dev/null || fail "SELinux is enabled and the module is not loaded"
  label=$(stat -c %C /usr/bin/sandrund)
  case "$label" in *:sandrund_exec_t:*) ;; *) fail "/usr/bin/sandrund is labelled $label" ;; esac
  label=$(stat -c %C /usr/bin/sandrun-outputs)
  case "$label" in *:sandrun_collect_exec_t:*) ;; *) fail "/usr/bin/sandrun-outputs is labelled $label" ;; esac
  label=$(stat -c %C /etc/sandrun/tls/key.pem)
  case "$label" in *:sandrun_key_t:*) ;; *) fail "/etc/sandrun/tls/key.pem is labelled $label" ;; esac
  ok "SELinux module loaded, files labelled"
else
  ! grep -q '^selinux-module:' /var/lib/sandrun/.created || fail "postinst loaded a module without SELinux"
  ok "SELinux is not enabled here: the module is shipped, not loaded"
fi

# The helper, as sandrund.service starts it (the packaged config holds only comments).
sock=$tmp/sandrund.sock
/usr/bin/sandrund --config /etc/sandrun/sandrund.toml --socket "$sock" >"$tmp/sandrund.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$tmp/sandrund.log"; fail "sandrund did not start"; }
ok "sandrund started on the packaged config"

# The gateway, as sandrun-gateway.service starts it: credentials from LoadCredential=.
creds=$tmp/credentials
install -d -m 0700 "$creds"
cp /etc/sandrun/tls/cert.pem /etc/sandrun/tls/key.pem /etc/sandrun/worker.key "$creds/"
port=$((20000 + RANDOM % 20000))
CREDENTIALS_DIRECTORY=$creds /usr/bin/sandrun-gateway --helper-socket "$sock" \
  --listen "127.0.0.1:$port" >"$tmp/gateway.log" 2>&1 &
pids+=($!)
url=https://localhost:$port
for _ in $(seq 100); do curl -fsS --cacert /etc/sandrun/tls/cert.pem "$url/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS --cacert /etc/sandrun/tls/cert.pem "$url/health" >/dev/null \
  || { cat "$tmp/gateway.log"; fail "gateway not answering on $url"; }
kill -0 "${pids[0]}" 2>/dev/null || { cat "$tmp/sandrund.log"; fail "sandrund exited"; }
ok "gateway answers on $url, verified against the packaged certificate"

echo 'print("hello from the package")' >"$tmp/main.py"
job=$(curl -fsS --cacert /etc/sandrun/tls/cert.pem -F "files=@$tmp/main.py" "$url/submit" \
  | sed -E 's/.*"job_id":"([0-9a-f]{32})".*/\1/')
[ -n "$job" ] || fail "submit"
status=
for _ in $(seq 300); do
  status=$(curl -fsS --cacert /etc/sandrun/tls/cert.pem "$url/status/$job")
  case "$status" in *'"status":"completed"'* | *'"status":"failed"'*) break ;; esac
  sleep 0.1
done
echo "$status" | grep -q '"status":"completed"' || { cat "$tmp/sandrund.log"; fail "job: $status"; }
curl -fsS --cacert /etc/sandrun/tls/cert.pem "$url/logs/$job" | grep -q 'hello from the package' \
  || fail "job output"
ok "a job ran over HTTPS ($job)"
out=$(/usr/bin/sandrunctl --socket "$sock" run -- /usr/bin/python3 -c 'print(6*7)')
echo "$out" | grep -qx 42 || fail "sandrunctl run: $out"
ok "a job ran through sandrunctl"
# Its output comes back through the collector (sandrund execs /usr/bin/sandrun-outputs).
mkdir "$tmp/in"
got=$tmp/collected
/usr/bin/sandrunctl --socket "$sock" run --input "$tmp/in" --output 'r.txt' --out-dir "$got" \
  -- /usr/bin/python3 -c 'open("r.txt", "w").write("42\n")' >"$tmp/collect.log" 2>&1 \
  || { cat "$tmp/collect.log" "$tmp/sandrund.log"; fail "sandrunctl run --output"; }
[ "$(cat "$got/r.txt" 2>/dev/null)" = 42 ] || { cat "$tmp/collect.log"; fail "collected output"; }
ok "a job's output file came back through the packaged collector"

for p in "${pids[@]}"; do kill -TERM "$p"; done
wait 2>/dev/null || true
pids=()

# The unit always passes --config: with nothing at that path the helper must still start.
mv /etc/sandrun/sandrund.toml "$tmp/sandrund.toml.saved"
sock2=$tmp/sandrund2.sock
/usr/bin/sandrund --config /etc/sandrun/sandrund.toml --socket "$sock2" >"$tmp/sandrund2.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$sock2" ] && break; sleep 0.1; done
out=$(/usr/bin/sandrunctl --socket "$sock2" run -- /usr/bin/python3 -c 'print(6*7)' 2>&1) || true
echo "$out" | grep -qx 42 || { cat "$tmp/sandrund2.log"; fail "sandrund without its config file: $out"; }
kill -TERM "${pids[0]}"
wait 2>/dev/null || true
pids=()
mv "$tmp/sandrund.toml.saved" /etc/sandrun/sandrund.toml
ok "sandrund runs jobs with no file at /etc/sandrun/sandrund.toml"

DEBIAN_FRONTEND=noninteractive dpkg --purge sandrun >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; fail "dpkg --purge"; }
while read -r f; do [ ! -e "$f" ] || fail "left after purge: $f"; done <"$files"
for d in /etc/sandrun /var/lib/sandrun /usr/share/doc/sandrun; do
  [ ! -e "$d" ] || fail "left after purge: $d"
done
if [ "$had_user" = no ]; then ! getent passwd sandrun >/dev/null || fail "user sandrun left"; fi
if [ "$had_user" = yes ]; then getent passwd sandrun >/dev/null || fail "purge removed a user it did not create"; fi
if [ "$had_admin" = no ]; then ! getent group sandrun-admin >/dev/null || fail "group sandrun-admin left"; fi
dpkg-query -W sandrun >/dev/null 2>&1 && fail "dpkg still knows sandrun"
if [ "$selinux" = yes ]; then ! semodule -l | grep -x sandrun >/dev/null || fail "SELinux module left after purge"; fi
ok "purge left nothing (user sandrun existed before: $had_user)"
