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

# Whether stdin matches a pattern, reading all of it: `grep -q` stops at
# the first match, and the writer's next write then fails (pipefail).
contains() { local all; all=$(cat); grep -q -e "$1" <<< "$all"; }
# The journal takes a moment to show what was just logged.
journal_has() {
  for _ in $(seq 50); do
    ct journalctl --no-pager -u "$1" | contains "$2" && return 0
    sleep 0.1
  done
  return 1
}
# What `systemctl status` shows (it exits 3 for a unit that is not active).
status_of() { ct systemctl status --no-pager "$1" 2>&1 || true; }
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
check "md5sums shipped and every file matches" sh -c "nsenter -t $leader -a test -s /var/lib/dpkg/info/popupd.md5sums && test -z \"\$(nsenter -t $leader -a dpkg --verify popupd)\""
for f in README.Debian config.md plugins.md protocol.md metrics.md status.md examples/home.yaml examples/popupd-alerts.yml examples/popupd-dashboard.json; do
  check "/usr/share/doc/popupd/$f shipped" ct test -s "/usr/share/doc/popupd/$f"
done
# Every page popupd(8) and popupctl(1) point to is shipped.
missing=$(ct sh -c 'for p in /usr/share/man/man8/popupd*.8.gz /usr/share/man/man1/popupctl*.1.gz; do zcat "$p"; done' \
  | grep -oE 'popup(d|ctl)(\\?-[a-z]+)*\([158]\)' | sed 's/\\//g' | sort -u | while read -r ref; do
      name=${ref%(*}; sec=${ref#*(}; sec=${sec%)}
      ct test -e "/usr/share/man/man$sec/$name.$sec.gz" || echo "$ref"
    done)
[ -z "$missing" ] && echo "   ok: every page the man pages name is shipped ($(ct sh -c 'ls /usr/share/man/man8/popupd* /usr/share/man/man1/popupctl* | wc -l') pages)" || fail "man pages named but not shipped: $missing"

echo "== README.Debian, typed as written"
# The people of the recipe have logins here; a desktop login would start
# their user managers, lingering does it in the container.
ct sh -ec 'for u in alice bob carol; do useradd -m -s /bin/sh "$u"; loginctl enable-linger "$u"; done'
as() { local u=$1; shift; local uid; uid=$(ct id -u "$u"); ct runuser -u "$u" -- env XDG_RUNTIME_DIR=/run/user/$uid DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/$uid/bus "$@"; }
for u in alice bob carol; do
  for _ in $(seq 100); do as "$u" test -S "/run/user/$(ct id -u "$u")/bus" && break; sleep 0.1; done
done
# Lines that start with "# " are root's, "NAME$ " NAME's; indented lines
# under a command belong to it (here-documents). Consecutive commands of one
# person make one step, run with sh -e.
recipe=$cache/recipe-$$
rm -rf "$recipe"; mkdir -p "$recipe"
ct cat /usr/share/doc/popupd/README.Debian | awk -v dir="$recipe" '
  function step(w) { if (w != who) { if (file) close(file); n++; who = w; file = sprintf("%s/%02d.%s", dir, n, w) } inside = 1 }
  /^    # /            { step("root"); print substr($0, 7) >> file; next }
  /^    [a-z]+\$ /     { w = $1; sub(/\$$/, "", w); step(w); l = $0; sub(/^    [a-z]+\$ /, "", l); print l >> file; next }
  /^    / && inside    { print substr($0, 5) >> file; next }
                       { inside = 0 }'
steps=$(ls "$recipe" | wc -l)
[ "$steps" -ge 4 ] || fail "README.Debian: only $steps steps found"
for f in "$recipe"/*; do
  who=${f##*.}
  if [ "$who" = root ]; then ct sh -e < "$f" > "$f.out" 2>&1; else as "$who" sh -e < "$f" > "$f.out" 2>&1; fi \
    || { echo "   as $who:"; sed 's/^/     | /' "$f"; echo "   output:"; sed 's/^/     > /' "$f.out"; fail "README.Debian, step $(basename "$f") failed"; }
done
echo "   ok: $(cat "$recipe"/* | grep -c .) lines in $steps steps ran as root, alice and bob"
as bob popupctl history alice | contains "lunch at noon?" && echo "   ok: bob has alice's message, across two homes" || fail "bob's history"
check "alice's agent config is hers" test "$(ct stat -c %U:%a /home/alice/.config/popupd/agent.yaml)" = alice:600
check "the service reads the server keys" ct runuser -u popupd -- test -r /etc/popupd/pki/home-a.example.org.key
check "the service cannot read the CA key" sh -c "! nsenter -t $leader -a runuser -u popupd -- test -r /etc/popupd/pki/ca.key"
status=$(status_of popupd@home-a)
echo "$status" | contains 'Status: "home home-a.example.org:' && echo "   ok: status line: $(echo "$status" | grep 'Status:' | sed 's/^ *//')" || { echo "$status"; fail "STATUS= line"; }
journal_has popupd@global "home linked: home-b.example.org" && echo "   ok: the journal names the home that linked" || fail "journal names the home"
# popupd status, as root, of the running instances (on their admin sockets).
st=$(ct popupd status --config /etc/popupd/home-a.yaml 2>&1) && echo "$st" | contains "^home home-a.example.org: running" \
  && echo "   ok: popupd status: $(echo "$st" | head -1)" || { echo "$st"; fail "popupd status of popupd@home-a"; }
echo "$st" | contains "home-b.example.org *linked" && echo "   ok: popupd status shows the link to home-b" || { echo "$st"; fail "popupd status: link to home-b"; }
ct popupd status --config /etc/popupd/home-a.yaml --json | contains '"pid": '"$(ct systemctl show -p MainPID --value popupd@home-a)" \
  && echo "   ok: popupd status --json names the service's process" || fail "popupd status --json"
st=$(ct popupd status --config /etc/popupd/global.yaml 2>&1) && echo "$st" | contains "^global .*: running" \
  && echo "   ok: popupd status: $(echo "$st" | head -1)" || { echo "$st"; fail "popupd status of popupd@global"; }
check "the admin socket is for root and the popupd group" test "$(ct sh -c 'stat -c %a:%G /var/lib/popupd/home-a/admin.sock')" = 660:popupd
ct journalctl --no-pager _SYSTEMD_USER_UNIT=popupd-agent.service | contains "plugin loaded: notify" && echo "   ok: the journal names the plugin loaded" \
  || { ct journalctl --no-pager -n 30 _UID="$(ct id -u alice)"; fail "journal names the plugin"; }

echo "== reload"
ct sh -c 'cp /etc/popupd/home-a.yaml /root/home-a.good; printf "log:\n  level: debug\n" >> /etc/popupd/home-a.yaml'
ct systemctl reload popupd@home-a || fail "reload with a good config"
check "active after a good reload" ct systemctl is-active popupd@home-a
journal_has popupd@home-a "config reloaded" && echo "   ok: journal says the config was reloaded" || fail "reload in journal"
pid0=$(ct systemctl show -p MainPID --value popupd@home-a)
ct sh -c 'printf "bogus: 1\n" >> /etc/popupd/home-a.yaml'
if out=$(ct systemctl reload popupd@home-a 2>&1); then fail "systemctl reload with a bad config exited 0"; fi
echo "   ok: systemctl reload with a bad config fails: $(echo "$out" | head -1)"
check "still active after a bad reload" ct systemctl is-active popupd@home-a
check "the same process runs on" test "$(ct systemctl show -p MainPID --value popupd@home-a)" = "$pid0"
status_of popupd@home-a | contains 'home-a.yaml:[0-9]*:[0-9]*: unknown field `bogus`' \
  && echo "   ok: systemctl status shows the reason with file:line" || { status_of popupd@home-a; fail "reason in systemctl status"; }
check "the old config still serves alice" as alice popupctl status
ct cp /root/home-a.good /etc/popupd/home-a.yaml

echo "== failures that last"
if ct systemctl enable --now popupd@typo >/dev/null 2>&1; then fail "enable --now popupd@typo exited 0"; fi
status_of popupd@typo | tail -4 | contains "typo.yaml: cannot read" \
  && echo "   ok: enable --now popupd@typo fails, systemctl status says the file is missing" || { status_of popupd@typo; fail "popupd@typo status"; }
ct systemctl disable popupd@typo >/dev/null 2>&1 || true
ct sh -c 'sed "s/4431/4433/" /etc/popupd/home-a.yaml > /etc/popupd/home-c.yaml'
ct popupd check-config /etc/popupd/home-c.yaml 2>&1 | contains "warning: popupd@home-c may write only /var/lib/popupd/home-c" \
  && echo "   ok: check-config by hand warns that popupd@home-c would refuse data_dir home-a" || fail "check-config warning for home-c"
if ct systemctl start popupd@home-c >/dev/null 2>&1; then fail "popupd@home-c with data_dir home-a started"; fi
status_of popupd@home-c | contains "outside this service's state folder" \
  && echo "   ok: a data_dir the unit may not write is refused before the start" || { status_of popupd@home-c; fail "popupd@home-c status"; }
sleep 2.5
check "a config error is not restarted" test "$(ct systemctl show -p NRestarts --value popupd@home-c)" = 0
# A failure that is not the config's (the port is taken) stops after five
# tries in a minute.
ct sh -c 'sed "s#/var/lib/popupd/global#/var/lib/popupd/global-2#" /etc/popupd/global.yaml > /etc/popupd/global-2.yaml'
ct systemctl start popupd@global-2 >/dev/null 2>&1 || true
for _ in $(seq 60); do
  [ "$(ct systemctl show -p ActiveState --value popupd@global-2)" = failed ] && break
  sleep 0.5
done
check "a lasting failure stops at the start limit" journal_has popupd@global-2 "Start request repeated too quickly"
check "and stays stopped" test "$(ct systemctl show -p ActiveState --value popupd@global-2)" = failed
ct rm -f /etc/popupd/home-c.yaml /etc/popupd/global-2.yaml
t0=$(date +%s%N)
rc=0; out=$(as carol popupctl status 2>&1) || rc=$?
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[ "$rc" = 3 ] && [ "$ms" -lt 2000 ] && echo "$out" | contains "agent.yaml" \
  && echo "   ok: without a config, popupctl says so in $ms ms: $out" || fail "carol's popupctl status: rc $rc in $ms ms: $out"

echo "== upgrade restarts running servers and agents"
pids0=$(for u in global home-a home-b; do ct systemctl show -p MainPID --value "popupd@$u"; done; for u in alice bob; do as "$u" systemctl --user show -p MainPID --value popupd-agent; done)
ct dpkg -i "$pkg" > /dev/null 2>&1 || fail "reinstall"
pids1=$(for u in global home-a home-b; do ct systemctl show -p MainPID --value "popupd@$u"; done; for u in alice bob; do as "$u" systemctl --user show -p MainPID --value popupd-agent; done)
paste <(echo "$pids0") <(echo "$pids1") | awk '$1 == $2 || $2 == 0 { bad = 1 } END { exit bad }' \
  && echo "   ok: global, home-a, home-b, alice's and bob's agent restarted ($(echo $pids0) → $(echo $pids1))" || fail "upgrade did not restart all: $(echo $pids0) → $(echo $pids1)"
for _ in $(seq 100); do as alice popupctl status >/dev/null 2>&1 && break; sleep 0.1; done
check "alice's agent connected after the upgrade" as alice popupctl status

echo "== security exposure (systemd-analyze security)"
for u in popupd@home-a.service popupd@global.service; do
  score=$(ct systemd-analyze security "$u" --no-pager 2>/dev/null | grep 'Overall exposure level' | grep -oE '[0-9]+\.[0-9]+' | head -1)
  echo "   $u: exposure $score (target <= 2.0)"
  awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }' || fail "$u exposure $score is above 2.0"
done
score=$(as alice systemd-analyze security --user popupd-agent.service --no-pager 2>/dev/null | grep 'Overall exposure level' | grep -oE '[0-9]+\.[0-9]+' | head -1)
echo "   popupd-agent.service (--user): exposure $score (target <= 5.0)"
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 5.0) }' || fail "popupd-agent exposure $score is above 5.0"

echo "== stop, remove, purge"
ct systemctl stop popupd@home-a popupd@home-b popupd@global || fail "stop"
rc=0; out=$(ct popupd status --config /etc/popupd/home-a.yaml 2>&1) || rc=$?
[ "$rc" = 1 ] && echo "$out" | contains "not running" && echo "   ok: popupd status of a stopped server: $out" || fail "popupd status when stopped: rc $rc: $out"
check "nothing running after stop" sh -c "! nsenter -t $leader -a systemctl is-active -q popupd@home-a"
warned=$(ct journalctl --no-pager -p warning -u popupd@home-a -u popupd@home-b -u popupd@global | grep -i "lost" || true)
[ -z "$warned" ] && echo "   ok: a clean stop logs no warning of a lost link" || fail "warnings on a clean stop: $warned"
ct sh -c 'echo "my notes" > /etc/popupd/notes.txt'
ct apt-get remove -y -q popupd > /dev/null 2>&1 || fail "apt remove"
for _ in $(seq 20); do ct pgrep -x popupd >/dev/null || break; sleep 0.1; done
check "no popupd process after remove, agents included" sh -c "! nsenter -t $leader -a pgrep -x popupd"
ct apt-get purge -y -q popupd > /dev/null 2>&1 || fail "apt purge"
for f in notes.txt home-a.yaml global.yaml pki/ca.key pki/ca.crt; do
  check "/etc/popupd/$f (the admin's) kept after purge" ct test -e "/etc/popupd/$f"
done
check "/etc/popupd/README (the package's) gone after purge" sh -c "! nsenter -t $leader -a test -e /etc/popupd/README"
check "/var/lib/popupd gone after purge" sh -c "! nsenter -t $leader -a test -e /var/lib/popupd"
check "no unit left after purge" sh -c "! nsenter -t $leader -a test -e /lib/systemd/system/popupd@.service"
check "no enablement link left after purge" sh -c "! nsenter -t $leader -a sh -c 'ls /etc/systemd/system/multi-user.target.wants/popupd@*' "
check "the popupd user stays while its files do" ct getent passwd popupd
echo "PASS: README.Debian's recipe works as written; the package installs, reloads, upgrades, removes and purges as promised"
