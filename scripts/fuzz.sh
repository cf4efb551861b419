#!/usr/bin/env bash
# Fuzzes the parsers that read input from outside the process (fuzz/,
# docs/fuzzing.md) with cargo-fuzz (libFuzzer) on the nightly toolchain.
#
#   scripts/fuzz.sh                          # every target, 60 s each
#   scripts/fuzz.sh --time 20 config proxy   # two targets, 20 s each
#   scripts/fuzz.sh --runs 10000000 config   # 10 million runs (at most 4 h)
#
# Options:
#   --runs N        stop a target after N runs
#   --time SECONDS  stop a target after SECONDS (default 60; with --runs
#                   alone, 14400: every run is bounded in time)
#   --sanitizer S   address (default), leak, memory, thread or none
#   --list          print the targets and exit
#
# Reads the committed seeds in fuzz/corpus/TARGET and adds what it finds to
# fuzz/grown/TARGET (or $FUZZ_GROWN/TARGET), which is not committed. A crash
# is written to fuzz/artifacts/TARGET/; the script then says how to replay
# and minimize it, and exits 1. Prints, per target: runs, exec/s, result.
# Without cargo-fuzz or the nightly toolchain it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(agent_frames peer_frames global_frames config plugin_event proxy)
runs=""
time=""
sanitizer=address
targets=()
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="${2:?--runs needs a number}"; shift 2 ;;
    --time) time="${2:?--time needs a number of seconds}"; shift 2 ;;
    --sanitizer) sanitizer="${2:?--sanitizer needs a name}"; shift 2 ;;
    --list) printf '%s\n' "${ALL[@]}"; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
for n in $runs $time; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz.sh: $n is not a positive number" >&2; exit 2; }
done
if [ -z "$time" ]; then
  if [ -n "$runs" ]; then time=14400; else time=60; fi
fi
[ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
for t in "${targets[@]}"; do
  [[ " ${ALL[*]} " == *" $t "* ]] || { echo "fuzz.sh: no target $t (targets: ${ALL[*]})" >&2; exit 2; }
done

if ! cargo +nightly --version >/dev/null 2>&1 || ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "skipped: cargo-fuzz or the nightly toolchain is not installed"
  exit 0
fi

grown="${FUZZ_GROWN:-fuzz/grown}"
logs="$(mktemp -d "${TMPDIR:-/tmp}/popupd-fuzz.XXXXXX")"
trap 'rm -rf "$logs"' EXIT

# One build of every target first (bounded: a cold build takes minutes).
echo "building the fuzz targets (sanitizer: $sanitizer)"
if ! timeout --kill-after=30 3600 cargo +nightly fuzz build -s "$sanitizer" >"$logs/build" 2>&1; then
  tail -n 40 "$logs/build"
  echo "fuzz.sh: the fuzz targets did not build" >&2
  exit 1
fi

failed=0
summary=()
for t in "${targets[@]}"; do
  mkdir -p "$grown/$t" "fuzz/artifacts/$t"
  args=(-max_total_time="$time" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
  [ -z "$runs" ] || args+=(-runs="$runs")
  echo "== $t: ${runs:+$runs runs or }${time} s"
  set +e
  # libFuzzer stops itself after max_total_time; the outer bound only
  # catches what would keep it from getting there.
  timeout --kill-after=30 $((time + 300)) \
    cargo +nightly fuzz run -s "$sanitizer" "$t" "$grown/$t" "fuzz/corpus/$t" -- "${args[@]}" \
    >"$logs/$t" 2>&1
  rc=$?
  set -e
  n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t" | tail -n 1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t" | tail -n 1)
  artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$logs/$t" | tail -n 1)
  if [ $rc -eq 0 ]; then
    result="no crash"
  elif [ -n "$artifact" ]; then
    result="CRASH: $artifact"
    failed=1
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    result="STOPPED: ran past its time bound"
    failed=1
  else
    result="FAILED (exit $rc)"
    failed=1
  fi
  printf '%s: runs %s, exec/s %s, %s\n' "$t" "${n:-?}" "${speed:-?}" "$result"
  summary+=("$(printf '%-14s %12s %8s  %s' "$t" "${n:-?}" "${speed:-?}" "$result")")
  if [ $rc -ne 0 ]; then
    # What libFuzzer said about it: the panic or sanitizer report.
    grep -v '^#[0-9]' "$logs/$t" | tail -n 60
    if [ -n "$artifact" ]; then
      echo "replay:   cargo +nightly fuzz run -s $sanitizer $t $artifact"
      echo "minimize: cargo +nightly fuzz tmin -s $sanitizer $t $artifact"
    fi
  fi
done

echo
printf '%-14s %12s %8s  %s\n' target runs exec/s result
printf '%s\n' "${summary[@]}"
exit $failed
