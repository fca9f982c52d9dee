#!/usr/bin/env bash
# Builds the VM suite's guest: a minimal Debian 12 (bookworm) from Debian's own packages, with
# systemd as PID 1, pure cgroup v2, apt + dpkg (the suite installs and purges the .deb), and what
# the package depends on. No mount and no loop device: mmdebstrap writes a directory and
# `mkfs.ext4 -d` turns it into a disk image; the kernel and initrd are copied out for -kernel/-initrd.
#
#   bash tests/vm/build-image.sh               # prints the image directory (target/vm/image-<hash>)
#   VM_SELINUX=1 bash tests/vm/build-image.sh  # the SELinux variant (target/vm/image-selinux-<hash>):
#                                              # selinux-basics, the default policy, auditd, the
#                                              # tree labelled, SELinux permissive at boot
#
# The image is cached under target/vm/ keyed by this script's hash: a rerun with an unchanged
# script prints the cached directory at once. Needs root, mmdebstrap, e2fsprogs and apt access to
# deb.debian.org (packaging/deps.sh installs the tools).
set -euo pipefail

# Run by mmdebstrap (--customize-hook) with the finished tree as $2: the guest's configuration.
customize() {
  local r=$1
  echo sandrun-vm >"$r/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 sandrun-vm\n::1 localhost ip6-localhost\n' >"$r/etc/hosts"
  printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$r/etc/fstab"
  # The initramfs must find the virtio disk; 9p is there too so the share mounts early if asked.
  printf '%s\n' virtio_pci virtio_blk ext4 9p 9pnet_virtio >>"$r/etc/initramfs-tools/modules"
  chroot "$r" update-initramfs -u -k all >/dev/null
  # The console is for results: no login prompt, no password needed (the guest has no network).
  passwd --root "$r" -d root >/dev/null
  systemctl --root "$r" mask serial-getty@ttyS0.service getty@tty1.service \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    systemd-timesyncd.service man-db.timer >/dev/null 2>&1 || true
  install -d "$r/mnt/share"
  # The runner: mounts the 9p share run.sh provides, runs its guest.sh as root with output to
  # the share and the serial console, records the exit status, and powers the machine off.
  cat >"$r/usr/local/sbin/sandrun-vm-run" <<'RUN'
#!/bin/bash
set -u
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /mnt/share || {
  echo "sandrun-vm: cannot mount the 9p share" >/dev/ttyS0
  systemctl poweroff --no-block
  exit 1
}
cd /mnt/share
echo "sandrun-vm: guest.sh starting at $(cut -d' ' -f1 /proc/uptime)s of uptime" >/dev/ttyS0
bash /mnt/share/guest.sh 2>&1 | tee /mnt/share/guest.log >/dev/ttyS0
echo "${PIPESTATUS[0]}" >/mnt/share/guest.rc
journalctl -b --no-pager >/mnt/share/journal.txt 2>&1 || true
sync
echo "sandrun-vm: guest.sh exited $(cat /mnt/share/guest.rc); powering off" >/dev/ttyS0
systemctl poweroff --no-block
RUN
  chmod 0755 "$r/usr/local/sbin/sandrun-vm-run"
  cat >"$r/etc/systemd/system/sandrun-vm-run.service" <<'UNIT'
[Unit]
Description=sandrun VM suite: run guest.sh from the 9p share, then power off
After=multi-user.target
Wants=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/sandrun-vm-run
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
UNIT
  systemctl --root "$r" enable sandrun-vm-run.service >/dev/null 2>&1
  rm -f "$r/etc/machine-id" && : >"$r/etc/machine-id"
  if [ "${VM_SELINUX:-0}" = 1 ]; then
    # Permissive at boot: the guest's script turns enforcing on for its own checks, so a denial
    # of the minimal system's boot cannot hide the result.
    sed -i 's/^SELINUX=.*/SELINUX=permissive/; s/^SELINUXTYPE=.*/SELINUXTYPE=default/' \
      "$r/etc/selinux/config"
    # Label the tree now (the kernel here has no SELinux, but root may write the xattrs, and
    # mkfs.ext4 -d copies them): no relabelling boot.
    setfiles -r "$r" "$r/etc/selinux/default/contexts/files/file_contexts" "$r" 2>&1 \
      | grep -v 'Read-only file system\|ignoring' >&2 || true
    python3 -c 'import os, sys; os.getxattr(sys.argv[1], "security.selinux")' "$r/usr/bin/bash" \
      || { echo "build-image: setfiles left /usr/bin/bash unlabelled" >&2; exit 1; }
  fi
  apt-get -o RootDir="$r" clean 2>/dev/null || rm -rf "$r/var/cache/apt/archives/"*.deb
}
if [ "${1:-}" = --customize ]; then
  customize "$2"
  exit 0
fi

cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "build-image: run as root (mmdebstrap root mode)" >&2; exit 1; }
for t in mmdebstrap mkfs.ext4; do
  command -v "$t" >/dev/null || { echo "build-image: $t is missing (packaging/deps.sh)" >&2; exit 1; }
done
selinux=${VM_SELINUX:-0}
variant=image
[ "$selinux" = 1 ] && variant=image-selinux
hash=$(sha256sum "$0" | cut -c1-16)
out=target/vm/$variant-$hash
if [ -f "$out/done" ]; then
  echo "$out"
  exit 0
fi
rm -rf "$out" "$out.tmp"
mkdir -p "$out.tmp"
root=$out.tmp/root
start=$(date +%s)

# What the guest needs: systemd as PID 1 and a bootable kernel; the package's Depends (from
# packaging/package.sh: the shared libraries' packages, passwd, openssl) and Recommends (python3);
# the suite's tools (curl, procps, mount, util-linux's findmnt, kmod for 9p); nodejs, the other
# interpreter jobs get, whose JIT is why the helper's unit has no MemoryDenyWriteExecute=.
pkgs=(
  systemd systemd-sysv udev kmod dbus linux-image-amd64 initramfs-tools
  passwd openssl libgcc-s1 libc6 libssl3 libsystemd0
  python3 nodejs curl ca-certificates procps mount util-linux
)
if [ "$selinux" = 1 ]; then
  # The SELinux run (tests/vm/guest-selinux.sh): policy, tools, audit log.
  pkgs+=(selinux-basics selinux-policy-default selinux-utils policycoreutils auditd)
  command -v setfiles >/dev/null || { echo "build-image: setfiles is missing (policycoreutils)" >&2; exit 1; }
fi
include=$(IFS=,; echo "${pkgs[*]}")

# --variant=apt: the Essential set plus apt, so the guest has apt and dpkg for `dpkg -i` and
# `apt purge`. No Recommends: the guest holds only what is named here and what it depends on.
mmdebstrap --variant=apt --components=main --include="$include" \
  --aptopt='APT::Install-Recommends "false"' \
  --customize-hook="VM_SELINUX=$selinux bash '$PWD/tests/vm/build-image.sh' --customize \"\$1\"" \
  bookworm "$root" \
  "deb http://deb.debian.org/debian bookworm main" \
  "deb http://deb.debian.org/debian bookworm-updates main" \
  "deb http://deb.debian.org/debian-security bookworm-security main" >&2

# The disk: a sparse ext4 file made from the tree, no mount needed. Room for the .deb and jobs.
cp -L "$root"/boot/vmlinuz-* "$out.tmp/vmlinuz"
cp -L "$root"/boot/initrd.img-* "$out.tmp/initrd.img"
du -sh "$root" >&2
mkfs.ext4 -q -F -L sandrun-vm -d "$root" "$out.tmp/rootfs.ext4" 2G
rm -rf "$root"
echo "$(($(date +%s) - start))" >"$out.tmp/build-seconds"
: >"$out.tmp/done"
mv "$out.tmp" "$out"
# Only the current image of each variant is kept (each is a 2 GB sparse file).
for old in target/vm/$variant-*; do
  [ "$old" = "$out" ] && continue
  [ "$variant" = image ] && case "$old" in target/vm/image-selinux-*) continue ;; esac
  rm -rf "$old"
done
echo "build-image: built $out in $(cat "$out/build-seconds")s" >&2
echo "$out"
