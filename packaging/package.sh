#!/usr/bin/env bash
# Builds sandrun's Debian package from release binaries: one command, no hand step.
#
#   packaging/package.sh            # -> target/package/sandrun_<version>_<arch>.deb
#   SKIP_BUILD=1 packaging/package.sh   # reuse target/release (CI builds it once)
#
# Also writes target/package/sandrun.files, the package's file list (the RPM, when it exists,
# must hold the same list; see docs/operations.md). Needs dpkg-deb (Debian's dpkg), and make and
# selinux-policy-dev for the SELinux module (selinux/build.sh; it fails on any warning).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
out=target/package
stage=$out/root
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --locked -p sandrund -p sandrun-collect -p sandrunctl -p sandrun-gateway --bins
fi
rm -rf "$stage"
mkdir -p "$stage/DEBIAN"
inst() { install -D -m "$1" "$2" "$stage/$3"; }
for b in sandrund sandrunctl sandrun-gateway; do
  inst 0755 "target/release/$b" "usr/bin/$b"
  strip --strip-unneeded "$stage/usr/bin/$b"
  inst 0644 "packaging/man/$b.8" "usr/share/man/man8/$b.8"
  gzip -9n "$stage/usr/share/man/man8/$b.8"
done
# The output collector sandrund execs for each job (it looks for it next to its own binary and
# refuses to start unless it is a root-owned file no group or other user can write).
inst 0755 target/release/sandrun-outputs usr/bin/sandrun-outputs
strip --strip-unneeded "$stage/usr/bin/sandrun-outputs"
for u in systemd/*.service systemd/*.socket; do
  inst 0644 "$u" "lib/systemd/system/$(basename "$u")"
done
inst 0644 packaging/sysusers.conf usr/lib/sysusers.d/sandrun.conf
inst 0644 packaging/tmpfiles.conf usr/lib/tmpfiles.d/sandrun.conf
inst 0644 packaging/etc/sandrund.toml etc/sandrun/sandrund.toml
inst 0644 packaging/etc/gateway.toml etc/sandrun/gateway.toml
# The SELinux policy module (loaded by postinst when SELinux is enabled) and its interface
# for other modules.
bash selinux/build.sh "$out/selinux" >/dev/null
inst 0644 "$out/selinux/sandrun.pp" usr/share/selinux/packages/sandrun.pp
inst 0644 selinux/sandrun.if usr/share/selinux/devel/include/contrib/sandrun.if
for e in packaging/environments/*.txt; do
  inst 0644 "$e" "usr/share/sandrun/environments/$(basename "$e")"
done
doc=usr/share/doc/sandrun
inst 0644 README.md "$doc/README.md"
inst 0644 SECURITY.md "$doc/SECURITY.md"
for d in docs/*.md; do inst 0644 "$d" "$doc/$(basename "$d")"; done
cat >"$stage/$doc/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: sandrun
License: $(sed -n 's/^license = "\(.*\)"/\1/p' Cargo.toml | head -n1)
COPY
for s in postinst prerm postrm; do install -m 0755 "packaging/deb/$s" "$stage/DEBIAN/$s"; done
printf '/etc/sandrun/sandrund.toml\n/etc/sandrun/gateway.toml\n' >"$stage/DEBIAN/conffiles"
depends=$(dpkg-shlibdeps -O --ignore-missing-info -e "$stage/usr/bin/sandrund" \
  -e "$stage/usr/bin/sandrun-gateway" -e "$stage/usr/bin/sandrunctl" \
  -e "$stage/usr/bin/sandrun-outputs" 2>/dev/null \
  | sed -n 's/^shlibs:Depends=//p' || true)
[ -n "$depends" ] || depends="libc6, libgcc-s1"
cat >"$stage/DEBIAN/control" <<CONTROL
Package: sandrun
Version: $version
Architecture: $arch
Maintainer: sandrun developers <sandrun@localhost>
Section: admin
Priority: optional
Depends: $depends, passwd, openssl
Recommends: python3, python3-pip, nodejs, npm, systemd
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Description: anonymous batch jobs in Linux sandboxes, over HTTPS
 sandrun-gateway (unprivileged HTTPS front end) hands validated jobs to sandrund (root helper
 that runs each in namespaces, cgroups, Landlock and seccomp); sandrunctl administers it.
CONTROL
deb="$out/sandrun_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\.||' | sort) >"$out/sandrun.files"
echo "$deb"
