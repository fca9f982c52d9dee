#!/usr/bin/env bash
# Builds the RPM from the tree packaging/package.sh staged for the .deb (same binaries, same
# files, same maintainer scripts, the same SELinux module in /usr/share/selinux/packages), then
# checks that its file list equals the .deb's.
#
#   packaging/package.sh && packaging/rpm/rpm.sh   # -> target/package/sandrun-<v>-1.<arch>.rpm
#
# Needs rpmbuild (Debian package `rpm`, installed by packaging/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$PWD/target/package
stage=$out/root
[ -f "$stage/DEBIAN/control" ] || { echo "run packaging/package.sh first" >&2; exit 1; }
version=$(sed -n 's/^Version: //p' "$stage/DEBIAN/control")
top=$out/rpmbuild
rm -rf "$top"
mkdir -p "$top"/{SPECS,RPMS,BUILD,BUILDROOT}
spec=$top/SPECS/sandrun.spec
{
  cat <<SPEC
Name: sandrun
Version: $version
Release: 1
Summary: anonymous batch jobs in Linux sandboxes, over HTTPS
License: $(sed -n 's/^License: //p' "$stage/usr/share/doc/sandrun/copyright")
Requires: shadow-utils, openssl
%description
sandrun-gateway (unprivileged HTTPS front end) hands validated jobs to sandrund (root helper
that runs each in namespaces, cgroups, Landlock and seccomp); sandrunctl administers it.
%install
cp -a "$stage/." %{buildroot}/
rm -rf %{buildroot}/DEBIAN
%post
set -- configure
SPEC
  sed '1d' packaging/deb/postinst
  echo '%preun'
  echo 'if [ "$1" = 0 ]; then set -- remove'
  sed '1d;/^set -e$/d;/^exit 0$/d' packaging/deb/prerm
  echo 'fi'
  echo '%postun'
  echo 'if [ "$1" = 0 ]; then set -- purge; else set -- upgrade; fi'
  sed '1d' packaging/deb/postrm
  echo '%files'
  while read -r f; do
    case "$f" in
      /etc/*) echo "%config(noreplace) $f" ;;
      *) echo "$f" ;;
    esac
  done <"$out/sandrun.files"
} >"$spec"
rpmbuild -bb --quiet --define "_topdir $top" --define "_build_id_links none" \
  --define "__strip /bin/true" --define "debug_package %{nil}" \
  --define "__os_install_post %{nil}" "$spec"
rpm=$(find "$top/RPMS" -name '*.rpm' | head -n1)
cp "$rpm" "$out/"
rpm -qlp "$rpm" | sort >"$out/sandrun.rpm.files"
# The .deb's regular files, read from the built package itself (not from the staging list).
deb=$(ls "$out"/sandrun_"$version"_*.deb | head -n1)
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $6}' | sed 's|^\.||' | sort >"$out/sandrun.deb.files"
if ! diff -u "$out/sandrun.deb.files" "$out/sandrun.rpm.files"; then
  echo "rpm: the RPM's file list differs from the .deb's" >&2
  exit 1
fi
echo "$out/$(basename "$rpm")"
