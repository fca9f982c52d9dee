#!/usr/bin/env bash
# Builds sandrun and starts it on its embedded defaults: the root helper sandrund, and the
# unprivileged HTTPS gateway with a self-signed certificate (dev mode). Prints the URL and a curl
# example, then stays in the foreground; Ctrl-C stops both daemons. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "sandrun's helper must run as root: run this script with sudo" >&2
  exit 1
fi
bash packaging/deps.sh
cargo build --release --locked --bins
bin=target/release

# The gateway runs as the unprivileged user "sandrun"; the helper only accepts jobs from it.
if ! id -u sandrun >/dev/null 2>&1; then
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sandrun
fi
getent group sandrun-admin >/dev/null || groupadd --system sandrun-admin

socket=/run/sandrun/sandrund.sock
listen=${SANDRUN_LISTEN:-127.0.0.1:8443}
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# sandrund execs $bin/sandrun-outputs (next to it) as each job's output collector; it refuses to
# start if that file is not root's or is writable by group or others.
"$bin/sandrund" --socket "$socket" &
pids+=($!)
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.05; done
[ -S "$socket" ] || { echo "sandrund did not start" >&2; exit 1; }

if [ -x "$bin/sandrun-gateway" ]; then
  # The development certificate is made at each start; clients trust it through this file.
  cert=/run/sandrun/quickstart-cert.pem
  "$bin/sandrun-gateway" --dev --dev-cert-out "$cert" --listen "$listen" --helper-socket "$socket" &
  pids+=($!)
  for _ in $(seq 100); do
    [ -s "$cert" ] && curl -s --cacert "$cert" "https://$listen/health" >/dev/null 2>&1 && break
    sleep 0.1
  done
  cat <<MSG

sandrun is running at https://$listen/
Its certificate is self-signed, made at this start, and written to $cert.
In this development mode the same port also serves plain http://$listen/ to this machine
(loopback only), so the original Sandrun clients' default http://localhost:8443 works as is.
Trust the certificate:
  curl:    --cacert $cert (as below)
  Python:  requests.get(url, verify="$cert"), or for any program using requests:
           export REQUESTS_CA_BUNDLE=$cert   (ssl/urllib/aiohttp: export SSL_CERT_FILE=$cert)
  browser: import $cert as a trusted certificate (Firefox: Settings > Certificates >
           Authorities > Import; Chromium: certutil -d sql:\$HOME/.pki/nssdb -A -t P,, -n sandrun -i $cert),
           or open http://$listen/ on this machine
  system:  sudo cp $cert /usr/local/share/ca-certificates/sandrun-quickstart.crt && sudo update-ca-certificates
  echo 'print("hello from the sandbox")' > main.py
  curl --cacert $cert -F files=@main.py https://$listen/submit
  curl --cacert $cert https://$listen/status/JOB_ID ; curl --cacert $cert https://$listen/logs/JOB_ID
One-shot sandbox without HTTP:
  sudo $bin/sandrunctl run -- /usr/bin/python3 -c 'print(6*7)'
Ctrl-C stops both daemons.
MSG
else
  cat <<MSG

sandrund is running on $socket (the HTTPS gateway is not built yet).
  sudo $bin/sandrunctl run -- /usr/bin/python3 -c 'print(6*7)'
Ctrl-C stops it.
MSG
fi
wait -n "${pids[@]}"
