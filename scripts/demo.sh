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
cargo build --workspace --release --locked
exec target/release/popupd demo "$@"
