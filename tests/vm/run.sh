#!/usr/bin/env bash
# The VM suite: boots a Debian 12 guest (systemd PID 1, pure cgroup v2) under QEMU, installs the
# freshly built .deb there with dpkg -i and runs tests/vm/guest.sh in it (docs/operations.md,
# "VM suite"). Exits 0 only if the guest wrote its PASS marker.
#
#   bash tests/vm/run.sh                 # builds the .deb (release build) and the image if needed
#   SKIP_BUILD=1 bash tests/vm/run.sh    # reuse target/release, only repackage it
#   VM_DEB=target/package/sandrun_*.deb bash tests/vm/run.sh
#                                        # install this .deb, build nothing (CI: packaging/test.sh
#                                        # passes the one install-test.sh built)
#   VM_TIMEOUT=1200 bash tests/vm/run.sh # seconds for boot + suite (default 900)
#   VM_SELINUX=1 bash tests/vm/run.sh    # the SELinux run: the SELinux image variant, booted
#                                        # with security=selinux, runs guest-selinux-suite.sh
#
# QEMU runs with TCG, not KVM: /dev/kvm on these machines is PVM, under which a stock Debian
# kernel never finishes booting. Needs root (the image build), qemu-system-x86, mmdebstrap and
# e2fsprogs (packaging/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "vm: run as root" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "vm: qemu-system-x86_64 is missing (packaging/deps.sh)" >&2; exit 1; }
timeout_s=${VM_TIMEOUT:-900}
t0=$(date +%s)

selinux=${VM_SELINUX:-0}
image=$(VM_SELINUX=$selinux bash tests/vm/build-image.sh | tail -n1)
t_image=$(($(date +%s) - t0))
echo "vm: image $image (${t_image}s)"
t_pkg=$(date +%s)
if [ -n "${VM_DEB:-}" ]; then
  deb=$VM_DEB
  [ -f "$deb" ] || { echo "vm: VM_DEB=$deb is not a file" >&2; exit 1; }
else
  deb=$(bash packaging/package.sh | tail -n1)
  [ -f "$deb" ] || { echo "vm: packaging/package.sh made no .deb" >&2; exit 1; }
fi
t_pkg=$(($(date +%s) - t_pkg))
echo "vm: package $deb (${t_pkg}s)"

share=target/vm/share
rm -rf "$share"
mkdir -p "$share"
cp "$deb" "$share/sandrun.deb"
# The image's runner starts $share/guest.sh.
kernel_lsm=
if [ "$selinux" = 1 ]; then
  cp tests/vm/guest-selinux-suite.sh "$share/guest.sh"
  cp tests/vm/guest-selinux.sh "$share/guest-selinux.sh"
  kernel_lsm=" security=selinux selinux=1"
else
  cp tests/vm/guest.sh "$share/guest.sh"
fi
console=target/vm/console.log

t_boot=$(date +%s)
rc=0
# snapshot=on: every boot starts from the clean image, nothing is written back to it.
timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
  -accel tcg,thread=multi -cpu max -smp "${VM_CPUS:-2}" -m "${VM_MEMORY:-2048}" \
  -nographic -monitor none -serial stdio -nic none -no-reboot \
  -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 panic=-1 quiet$kernel_lsm" \
  -drive "file=$image/rootfs.ext4,if=virtio,format=raw,snapshot=on" \
  -virtfs "local,path=$share,mount_tag=share,security_model=passthrough,id=share" \
  </dev/null >"$console" 2>&1 || rc=$?
t_vm=$(($(date +%s) - t_boot))

echo "vm: ---- guest log ($share/guest.log)"
if [ -f "$share/guest.log" ]; then
  cat "$share/guest.log"
else
  echo "vm: the guest wrote no log; the serial console ($console):"
  tail -n 80 "$console"
fi
echo "vm: ----"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "vm: FAIL: the VM did not finish within ${timeout_s}s (serial console: $console)" >&2
  exit 1
fi
started=$(sed -n 's/.*sandrun-vm: guest.sh starting at \([0-9.]*\)s.*/\1/p' "$console" | head -n1)
echo "vm: times: image ${t_image}s (its build took $(cat "$image/build-seconds" 2>/dev/null || echo '?')s)," \
  "package ${t_pkg}s, VM ${t_vm}s (guest.sh started at ${started:-?}s of guest uptime), total $(($(date +%s) - t0))s"
[ -f "$share/scores.txt" ] && sed 's/^/vm: score (unit, exposure, target): /' "$share/scores.txt"
if [ "$(cat "$share/guest.rc" 2>/dev/null)" = 0 ] && tail -n1 "$share/guest.log" | grep -q '^PASS: '; then
  echo "vm: PASS"
  exit 0
fi
echo "vm: FAIL: guest.sh exited $(cat "$share/guest.rc" 2>/dev/null || echo '(none)'), qemu $rc (journal: $share/journal.txt)" >&2
exit 1
