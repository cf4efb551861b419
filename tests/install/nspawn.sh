#!/usr/bin/env bash
# Installs the popupd package the way an administrator would, on a real
# Debian 12 booted with systemd in a container, and checks what systemd and
# apt promise. Usage: tests/install/nspawn.sh PACKAGE.deb
#
# The Debian rootfs is made once with debootstrap and cached under
# target/nspawn (POPUPD_NSPAWN_CACHE); every run boots a fresh copy with
# its own private network. Prints figures (install time, security scores)
# and exits non-zero at the first broken promise.
set -euo pipefail
deb=$(realpath "$1")
top=$(cd "$(dirname "$0")/../.." && pwd)
cache=${POPUPD_NSPAWN_CACHE:-$top/target/nspawn}
base=$cache/bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$cache"

if [ ! -e "$base/.complete" ]; then
  echo "== debootstrap Debian 12 into $base (once; cached)"
  rm -rf "$base"
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,dbus-user-session,libpam-systemd,procps \
    bookworm "$base" "$mirror" > "$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log"; exit 1; }
  touch "$base/.complete"
fi

root=$cache/run-$$
machine=popupd-test-$$
log=$cache/boot-$$.log
cleanup() {
  if [ -n "${leader:-}" ]; then
    nsenter -t "$leader" -a systemctl poweroff >/dev/null 2>&1 || true
    for _ in $(seq 50); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.2; done
  fi
  kill "${nspawn:-}" 2>/dev/null || true
  wait "${nspawn:-}" 2>/dev/null || true
  rm -rf "$root"
}
trap cleanup EXIT
cp -a "$base" "$root"
cp "$deb" "$root/root/"
pkg=/root/$(basename "$deb")

echo "== boot"
systemd-nspawn -D "$root" -b --register=no --keep-unit --private-network -M "$machine" > "$log" 2>&1 &
nspawn=$!
# The container's PID 1 is the child of systemd-nspawn that runs systemd.
# nspawn first forks an intermediate child that sets up namespaces and
# exits, so a child that is not (yet) systemd is not the leader.
leader=
for _ in $(seq 200); do
  for pid in $(pgrep -P "$nspawn" || true); do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd ] && leader=$pid
  done
  [ -n "$leader" ] && break
  sleep 0.1
done
[ -n "$leader" ] || { cat "$log"; echo "container did not start"; exit 1; }
ct() { nsenter -t "$leader" -a "$@"; }
state=
for _ in $(seq 150); do
  state=$(ct systemctl is-system-running 2>/dev/null || true)
  case "$state" in running|degraded) break ;; esac
  sleep 0.2
done
echo "   system is $state"
case "$state" in running|degraded) ;; *) cat "$log"; echo "FAIL: the container did not boot"; exit 1 ;; esac

# The journal takes a moment to show what was just logged.
journal_has() {
  for _ in $(seq 50); do
    ct journalctl --no-pager -u "$1" | grep -q "$2" && return 0
    sleep 0.1
  done
  return 1
}
fail() { echo "FAIL: $*"; ct journalctl --no-pager -n 60 -u 'popupd@*' 2>/dev/null || true; exit 1; }
check() { local what=$1; shift; "$@" >/dev/null 2>&1 && echo "   ok: $what" || fail "$what"; }

echo "== apt install ./$(basename "$deb")"
t0=$(date +%s.%N)
ct apt-get install -y -q "$pkg" > "$cache/apt-$$.log" 2>&1 || { cat "$cache/apt-$$.log"; fail "apt install"; }
t1=$(date +%s.%N)
printf '   installed in %.1f s; package %s KiB\n' "$(echo "$t1 - $t0" | bc 2>/dev/null || echo 0)" "$(( $(stat -c %s "$deb") / 1024 ))"
check "nothing enabled by install" test -z "$(ct systemctl list-units --no-legend 'popupd@*' 2>/dev/null)"
check "system user popupd" ct getent passwd popupd
for u in /lib/systemd/system/popupd@.service /usr/lib/systemd/user/popupd-agent.service; do
  check "systemd-analyze verify $(basename "$u")" ct systemd-analyze verify --man=no "$u"
done

echo "== configure a global server and a home"
ct sh -ec '
  popupd ca init --dir /etc/popupd/pki >/dev/null
  popupd ca issue global.test --dir /etc/popupd/pki >/dev/null
  popupd ca issue home.test --dir /etc/popupd/pki >/dev/null
  chgrp popupd /etc/popupd/pki/*.key && chmod 640 /etc/popupd/pki/*.key
  cat > /etc/popupd/global.yaml <<EOC
global:
  name: global.test
  listen: 127.0.0.1:4430
  cert: pki/global.test.crt
  key: pki/global.test.key
  ca: pki/ca.crt
  data_dir: /var/lib/popupd/global
EOC
  cat > /etc/popupd/home.yaml <<EOC
home:
  name: home.test
  listen: 127.0.0.1:4431
  cert: pki/home.test.crt
  key: pki/home.test.key
  ca: pki/ca.crt
  data_dir: /var/lib/popupd/home
  global: { name: global.test, address: "127.0.0.1:4430" }
EOC
'
ct systemctl enable --now popupd@global.service popupd@home.service >/dev/null 2>&1 || fail "enable --now"
check "popupd@global active" ct systemctl is-active popupd@global
check "popupd@home active" ct systemctl is-active popupd@home
status=$(ct systemctl status popupd@home --no-pager 2>&1 || true)
echo "$status" | grep -q 'Status: "home home.test:' && echo "   ok: status line: $(echo "$status" | grep 'Status:' | sed 's/^ *//')" || { echo "$status"; fail "STATUS= line"; }

echo "== reload"
ct sh -c 'printf "log:\n  level: debug\n" >> /etc/popupd/home.yaml'
ct systemctl reload popupd@home || fail "reload with a good config"
check "active after a good reload" ct systemctl is-active popupd@home
journal_has popupd@home "config reloaded" && echo "   ok: journal says the config was reloaded" || fail "reload in journal"
ct sh -c 'cp /etc/popupd/home.yaml /root/home.good; printf "  colour: blue\n" >> /etc/popupd/global.yaml; printf "bogus: 1\n" >> /etc/popupd/home.yaml'
ct systemctl reload popupd@home || true
check "still active after a bad reload" ct systemctl is-active popupd@home
journal_has popupd@home "reload refused" && echo "   ok: journal says why the reload was refused" || fail "refused reload in journal"
ct sh -c 'cp /root/home.good /etc/popupd/home.yaml; sed -i "/colour/d" /etc/popupd/global.yaml'
check "journalctl -u shows the logs" journal_has popupd@home "home listening"

echo "== upgrade restarts running servers"
pid0=$(ct systemctl show -p MainPID --value popupd@home)
ct dpkg -i "$pkg" > /dev/null 2>&1 || fail "reinstall"
pid1=$(ct systemctl show -p MainPID --value popupd@home)
[ "$pid0" != "$pid1" ] && [ "$pid1" != 0 ] && echo "   ok: popupd@home restarted ($pid0 → $pid1)" || fail "upgrade did not restart popupd@home"
check "active after upgrade" ct systemctl is-active popupd@home

echo "== two people, agents as user services"
ct sh -ec '
  for u in alice bob; do
    useradd -m -s /bin/sh "$u"
    install -d -o "$u" -g "$u" "/home/$u/.config/popupd"
    cp /etc/popupd/pki/ca.crt "/home/$u/.config/popupd/ca.crt"
    popupd user add "$u" -c /etc/popupd/home.yaml --agent-config "/home/$u/.config/popupd/agent.yaml" --ca ca.crt 2>/dev/null
    chown -R "$u:$u" "/home/$u/.config"
    loginctl enable-linger "$u"
  done
'
as() { local u=$1; shift; local uid; uid=$(ct id -u "$u"); ct runuser -u "$u" -- env XDG_RUNTIME_DIR=/run/user/$uid DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/$uid/bus "$@"; }
for u in alice bob; do
  for _ in $(seq 100); do as "$u" systemctl --user is-system-running >/dev/null 2>&1 && break; as "$u" test -S "/run/user/$(ct id -u $u)/bus" && break; sleep 0.1; done
done
as bob systemctl --user enable --now popupd-agent >/dev/null 2>&1 || fail "bob: systemctl --user enable --now popupd-agent"
# alice's agent starts by D-Bus activation, on her first popupctl call.
for _ in $(seq 100); do as bob popupctl status >/dev/null 2>&1 && break; sleep 0.1; done
check "bob's agent connected" as bob popupctl status
for _ in $(seq 100); do as alice popupctl status >/dev/null 2>&1 && break; sleep 0.2; done
check "alice's agent started by D-Bus activation and connected" as alice popupctl status
as alice popupctl send --wait delivered --timeout 20s bob "hello from a packaged install" >/dev/null || fail "alice → bob delivered"
as bob popupctl history alice | grep -q "hello from a packaged install" && echo "   ok: bob has alice's message" || fail "bob's history"

echo "== security exposure (systemd-analyze security)"
for u in popupd@home.service popupd@global.service; do
  score=$(ct systemd-analyze security "$u" --no-pager 2>/dev/null | grep 'Overall exposure level' | grep -oE '[0-9]+\.[0-9]+' | head -1)
  echo "   $u: exposure $score (target <= 2.0)"
  awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }' || fail "$u exposure $score is above 2.0"
done

echo "== stop, remove, purge"
ct systemctl stop popupd@home popupd@global || fail "stop"
check "nothing running after stop" sh -c "! nsenter -t $leader -a systemctl is-active -q popupd@home"
for u in alice bob; do as "$u" systemctl --user stop popupd-agent >/dev/null 2>&1 || true; done
ct apt-get remove -y -q popupd > /dev/null 2>&1 || fail "apt remove"
check "no popupd process after remove" sh -c "! nsenter -t $leader -a pgrep -x popupd"
ct apt-get purge -y -q popupd > /dev/null 2>&1 || fail "apt purge"
check "/etc/popupd gone after purge" sh -c "! nsenter -t $leader -a test -e /etc/popupd"
check "/var/lib/popupd gone after purge" sh -c "! nsenter -t $leader -a test -e /var/lib/popupd"
check "system user gone after purge" sh -c "! nsenter -t $leader -a getent passwd popupd"
check "no unit left after purge" sh -c "! nsenter -t $leader -a test -e /lib/systemd/system/popupd@.service"
echo "PASS: package installs, runs, reloads, talks, and leaves nothing behind"
