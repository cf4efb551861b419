#!/usr/bin/env bash
# The main job: a whole popupd network on loopback (CA, global server, two
# homes, agents for alice and bob on private D-Bus buses). Prints what to
# type in a second terminal; Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v dbus-daemon >/dev/null; then
  echo "the demo needs dbus-daemon: sudo apt install dbus" >&2
  exit 1
fi
# The same debug build the tests use: quick to make, fast enough for a demo.
cargo build --workspace --locked
exec target/debug/popupd demo "$@"
