#!/usr/bin/env bash
# A replica restarted on a bucket of many blobs: fills an S3 server's bucket with N blobs
# (default 100,000, in tagged manifests of 100 layers) with `hoard bench-fill-s3`, then starts
# replicas on it and times exec -> the first pull by tag answered 200, for a brand-new replica
# (empty cache) and for one restarted on its own cache. Also reports how long its first full
# re-listing of the bucket took (reads never wait for it).
#   usage: benches/replica-restart.sh [N] [RUNS]
#   needs an S3 server: the test command's venv (target/peers/venv) or moto_server on PATH
set -euo pipefail
N=${1:-100000}
RUNS=${2:-3}
cd "$(dirname "$0")/.."
MOTO=target/peers/venv/bin/moto_server
[ -x "$MOTO" ] || MOTO=$(command -v moto_server) || { echo "no S3 server: run scripts/test-all.sh once, or pip install 'moto[server]'" >&2; exit 1; }
cargo build --release --quiet
BIN=$PWD/target/release/hoard
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/hoard-restart.XXXXXX")
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
SPORT=$(free_port)
"$MOTO" -H 127.0.0.1 -p "$SPORT" >"$WORK/s3.log" 2>&1 & pids+=($!)
S3="http://127.0.0.1:$SPORT"
for _ in $(seq 200); do curl -s -o /dev/null "$S3/" && break; sleep 0.05; done
curl -sf -X PUT "$S3/big" >/dev/null
"$BIN" bench-fill-s3 --endpoint "$S3" --bucket big --prefix hoard/ --blobs "$N"
export HOARD_STORE_TYPE=s3 HOARD_STORE_BUCKET=big HOARD_STORE_PREFIX=hoard/ HOARD_STORE_ENDPOINT="$S3" \
  HOARD_STORE_PATH_STYLE=true HOARD_STORE_REGION=us-east-1 HOARD_STORE_ACCESS_KEY_ID=bench \
  HOARD_STORE_SECRET_ACCESS_KEY=bench HOARD_ACCESS_LOG=false
last=$(( (N + 99) / 100 - 1 ))
run() { # data dir -> ms to the first pull by tag
  local start end port pid
  start=$(date +%s%N)
  HOARD_LOG=info "$BIN" serve --data-dir "$1" --listen 127.0.0.1:0 >"$1.log" 2>&1 &
  pid=$!
  port=""
  until [ -n "$port" ]; do
    port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$1.log" 2>/dev/null | grep -o '[0-9]*$' || true)
    kill -0 "$pid" 2>/dev/null || { cat "$1.log"; exit 1; }
    sleep 0.005
  done
  until curl -fs -o /dev/null "http://127.0.0.1:$port/v2/fill/r$((last / 100))/manifests/t$last"; do sleep 0.005; done
  end=$(date +%s%N)
  echo "$(( (end - start) / 1000000 )) $pid $port"
}
# Stops a replica and waits until it is gone (it was started in a subshell: not ours to wait for).
stop() { kill -TERM "$1"; while kill -0 "$1" 2>/dev/null; do sleep 0.05; done; }
fresh=(); again=()
for r in $(seq "$RUNS"); do
  rm -rf "$WORK/d$r"
  read -r ms pid port < <(run "$WORK/d$r")
  fresh+=("$ms")
  # Wait for its first full re-listing, then stop it cleanly and start it again on its cache.
  until curl -s "http://127.0.0.1:$port/" | grep -q '^bucket re-listings: [1-9]'; do sleep 0.2; done
  listing=$(curl -s "http://127.0.0.1:$port/" | grep '^bucket re-listings')
  stop "$pid"
  read -r ms pid port < <(run "$WORK/d$r")
  again+=("$ms")
  stop "$pid"
  echo "run $r: new replica served in ${fresh[-1]} ms, restarted in ${again[-1]} ms; $listing"
done
med() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
echo "bucket of $N blobs: median $(med "${fresh[@]}") ms from exec to a pull by tag for a new replica, $(med "${again[@]}") ms restarted on its cache"
