#!/usr/bin/env bash
# Restart time with a large store: builds a data directory holding N blobs (default 1,000,000)
# with `hoard bench-fill`, then times `hoard serve` from exec to the first `/healthz` 200, over
# several clean restarts, and prints each and the median.
#
#   bash benches/restart.sh [N] [RUNS]
set -euo pipefail
N=${1:-1000000}
RUNS=${2:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=$PWD/target/release/hoard
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$BIN" bench-fill --data-dir "$WORK/data" --blobs "$N"
du -sh "$WORK/data/index" | sed 's/^/index size: /'
times=()
for r in $(seq 1 "$RUNS"); do
  # Drop nothing from the page cache: a restart on a live machine finds the journal warm; the
  # first run after the fill is as cold as this script can make it without root-only knobs.
  start=$(date +%s%N)
  HOARD_LOG=info "$BIN" serve --data-dir "$WORK/data" --listen 127.0.0.1:0 2>"$WORK/log" &
  pid=$!
  port=""
  until [ -n "$port" ]; do
    port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$WORK/log" | grep -o '[0-9]*$' || true)
    kill -0 "$pid" 2>/dev/null || { cat "$WORK/log"; exit 1; }
    sleep 0.005
  done
  until curl -fs "http://127.0.0.1:$port/healthz" >/dev/null; do sleep 0.005; done
  end=$(date +%s%N)
  ms=$(( (end - start) / 1000000 ))
  times+=("$ms")
  grep -o 'index loaded.*' "$WORK/log" | head -1
  echo "run $r: ready in ${ms} ms"
  kill -TERM "$pid"
  wait "$pid"
done
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")
echo "restart with $N blobs: median ${median} ms to /healthz 200 (runs: ${times[*]})"
