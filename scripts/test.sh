#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Debian packages) when
# missing, builds the workspace once, and runs every test against it.
#   scripts/test.sh            # everything
#   scripts/test.sh -- NAME    # only tests matching NAME
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v dbus-daemon >/dev/null || need+=(dbus)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
# The popup test: a real notification server under a virtual X display.
command -v dunst >/dev/null || need+=(dunst)
command -v Xvfb >/dev/null || need+=(xvfb)
command -v import >/dev/null || need+=(imagemagick)
command -v zenity >/dev/null || need+=(zenity)
command -v xdotool >/dev/null || need+=(xdotool)
# The metrics test: promtool checks the scrape and the alert rules, and a
# real Prometheus scrapes a home (both come in Debian's prometheus). Only
# the programs are wanted: it is installed without its recommends, its
# service neither started nor enabled (see below).
quiet=()
command -v prometheus >/dev/null || quiet+=(prometheus)
# Homes on PostgreSQL (tests/tests/postgres.rs and the store's unit tests):
# each test starts its own server from Debian's PostgreSQL 15 programs in a
# temporary folder, so the package's own cluster service stays off, as
# prometheus's does.
[ -x /usr/lib/postgresql/15/bin/postgres ] || quiet+=(postgresql)
# Homes on several nodes (tests/tests/cluster.rs): each test starts its own
# NATS server on loopback; the package's service stays off.
command -v nats-server >/dev/null || quiet+=(nats-server)
# The package installation test boots Debian 12 in a container (root only).
if [ "$(id -u)" = 0 ]; then
  command -v systemd-nspawn >/dev/null || need+=(systemd-container)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v lintian >/dev/null || need+=(lintian)
fi
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
if [ ${#need[@]} -gt 0 ] || [ ${#quiet[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] || command -v sudo >/dev/null; then
    echo "installing ${need[*]} ${quiet[*]}"
    as_root apt-get update -qq
    if [ ${#need[@]} -gt 0 ]; then
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    if [ ${#quiet[@]} -gt 0 ]; then
      # policy-rc.d (Debian's switch for maintainer scripts) keeps the
      # package's service from starting; then it is disabled for boot too.
      made_policy=
      if [ ! -e /usr/sbin/policy-rc.d ]; then
        as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
        made_policy=1
      fi
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${quiet[@]}" >/dev/null
      if [ -n "$made_policy" ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
      if command -v systemctl >/dev/null; then
        as_root systemctl disable "${quiet[@]}" >/dev/null 2>&1 || true
        as_root systemctl stop "${quiet[@]}" >/dev/null 2>&1 || true
      fi
    fi
  else
    echo "missing ${need[*]} ${quiet[*]}: install them (apt install ${need[*]} ${quiet[*]}) or run as root" >&2
  fi
fi

# Style and lints first: they are quick, and CI keeps them at zero.
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all --check
else
  echo "skipped: cargo fmt --check: rustfmt is not installed (rustup component add rustfmt)"
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --locked -- -D warnings
else
  echo "skipped: cargo clippy: clippy is not installed (rustup component add clippy)"
fi

# One build shared by every test: the end-to-end tests run these binaries.
# --all-targets: binaries, plugins, the plugin fixtures (examples) and the
# tests in one build with one feature set, which `cargo test` then reuses.
cargo build --workspace --locked --all-targets
cargo test --workspace --locked "$@"

# A short smoke of every fuzz target (docs/fuzzing.md), when cargo-fuzz and
# the nightly toolchain are here; fuzz.sh says "skipped: ..." otherwise.
if [ $# -eq 0 ]; then
  scripts/fuzz.sh --time 10
fi
