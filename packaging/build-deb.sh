#!/usr/bin/env bash
# Builds target/debian/popupd_VERSION_ARCH.deb from the workspace.
#
# dpkg-deb rather than cargo-deb: it is Debian's own tool, already on every
# Debian machine, so CI needs no extra crate to compile; this script is the
# whole install recipe, in one place, and lintian checks its result.
#   packaging/build-deb.sh            # release build, then the package
#   PROFILE=debug packaging/build-deb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
if [ -n "${SKIP_BUILD:-}" ]; then
  : # the caller built target/$profile already
elif [ "$profile" = release ]; then
  cargo build --release --locked -p popupd -p popupd-ipc -p popupd-notify -p popupd-exec -p popupd-autoreply
else
  cargo build --locked -p popupd -p popupd-ipc -p popupd-notify -p popupd-exec -p popupd-autoreply
fi
bin=target/$profile
stage=target/debian/popupd_${version}_${arch}
rm -rf "$stage"
d() { install -d -m 0755 "$stage/$1"; }
f() { install -D -m "${3:-0644}" "$1" "$stage/$2"; }

f "$bin/popupd" usr/bin/popupd 0755
f "$bin/popupctl" usr/bin/popupctl 0755
strip --strip-unneeded "$stage/usr/bin/popupd" "$stage/usr/bin/popupctl"
d usr/lib/popupd/plugins
f "$bin/libpopupd_notify.so" usr/lib/popupd/plugins/notify.so
f "$bin/libpopupd_exec.so" usr/lib/popupd/plugins/exec.so
f "$bin/libpopupd_autoreply.so" usr/lib/popupd/plugins/autoreply.so
strip --strip-unneeded "$stage/usr/lib/popupd/plugins/"*.so
f packaging/systemd/popupd@.service lib/systemd/system/popupd@.service
f packaging/systemd/popupd-agent.service usr/lib/systemd/user/popupd-agent.service
f packaging/dbus/org.popupd.Agent1.service usr/share/dbus-1/services/org.popupd.Agent1.service
f ipc/org.popupd.Agent1.xml usr/share/dbus-1/interfaces/org.popupd.Agent1.xml
f packaging/debian/sysusers.conf usr/lib/sysusers.d/popupd.conf
f packaging/debian/README.etc etc/popupd/README

# A page per command and per subcommand (popupd-user-add.8, popupctl-send.1:
# the names popupd.8 and popupctl.1 list), generated from the clap
# definitions, and the config reference.
man=$(mktemp -d)
"$bin/popupd" manpage --dir "$man/man8"
"$bin/popupctl" manpage --dir "$man/man1"
install -D -m 0644 packaging/man/popupd.yaml.5 "$man/man5/popupd.yaml.5"
for page in "$man"/man*/*; do
  sec=$(basename "$(dirname "$page")")
  d "usr/share/man/$sec"
  gzip -9n < "$page" > "$stage/usr/share/man/$sec/$(basename "$page").gz"
done
rm -rf "$man"

for b in popupd popupctl; do
  d usr/share/bash-completion/completions
  "$bin/$b" completions bash > "$stage/usr/share/bash-completion/completions/$b"
  d usr/share/zsh/vendor-completions
  "$bin/$b" completions zsh > "$stage/usr/share/zsh/vendor-completions/_$b"
  d usr/share/fish/vendor_completions.d
  "$bin/$b" completions fish > "$stage/usr/share/fish/vendor_completions.d/$b.fish"
done

doc=usr/share/doc/popupd
f packaging/debian/copyright "$doc/copyright"
f README.md "$doc/README.md"
f packaging/debian/README.Debian "$doc/README.Debian"
# The references that error hints and README.Debian point to.
for m in config.md plugins.md protocol.md metrics.md status.md; do f "docs/$m" "$doc/$m"; done
for e in packaging/examples/*.yaml packaging/examples/popupd-alerts.yml packaging/examples/popupd-dashboard.json; do
  f "$e" "$doc/examples/$(basename "$e")"
done
d "$doc"
{
  echo "popupd ($version) unstable; urgency=medium"
  echo
  echo "  * Built from the popupd workspace."
  echo
  echo " -- popupd maintainers <popupd@example.invalid>  $(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n > "$stage/$doc/changelog.gz"

d DEBIAN
for s in postinst prerm postrm; do f "packaging/debian/$s" "DEBIAN/$s" 0755; done
echo /etc/popupd/README > "$stage/DEBIAN/conffiles"
# md5sums of every file but the conffiles (dpkg keeps those itself), as
# dh_md5sums writes it: `debsums popupd` and `dpkg --verify` check them.
(cd "$stage" && find . -type f ! -path ./DEBIAN/\* ! -path ./etc/\* -printf '%P\n' | LC_ALL=C sort | xargs md5sum) > "$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/md5sums"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: popupd
Version: $version
Architecture: $arch
Maintainer: popupd maintainers <popupd@example.invalid>
Installed-Size: $size
Depends: libc6 (>= 2.34), libgcc-s1 (>= 4.2), systemd (>= 249), init-system-helpers (>= 1.65)
Recommends: dbus-user-session
Suggests: zenity, dunst | notification-daemon
Section: net
Priority: optional
Homepage: https://example.invalid/popupd
Description: immediate popup messaging for Linux desktops
 A message sent to a person pops up on their screen at once, and they
 answer straight back. It works behind firewalls that let nothing in: each
 desktop keeps a back connection open to its home server.
 .
 This package holds the popupd daemon (agent, home server and global
 directory server, chosen by config), the popupctl command line, systemd
 units for the servers (popupd@NAME) and a user unit for the agent.
CONTROL
find "$stage" -type d -exec chmod 0755 {} +
mkdir -p target/debian
dpkg-deb --root-owner-group -Zxz --build "$stage" "target/debian/popupd_${version}_${arch}.deb" >/dev/null
echo "target/debian/popupd_${version}_${arch}.deb"
