#!/usr/bin/env bash
# containerd's content API: hoard's socket against a private containerd's own local content
# store, in one run, alternating the order each round: a large blob (1 GiB) written as
# `ctr content ingest` writes it (STAT, 1 MiB WRITEs, COMMIT) and read back, then 5,000 blobs of
# 4 KiB written and read 8 at a time. Prints MB/s, blobs/s and hoard's speed ratio per part.
#   usage: benches/content.sh [ROUNDS] [LARGE_MIB] [SMALL]    (defaults: 3 1024 5000)
#   needs containerd (apt-get install containerd)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
LARGE=${2:-1024}
SMALL=${3:-5000}
command -v containerd >/dev/null || { echo "containerd is missing: apt-get install containerd" >&2; exit 1; }
cargo build --release --quiet
HOARD=target/release/hoard
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/hoard-content-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# hoard with its defaults (disk store, group commit), access log off as a busy farm runs it.
"$HOARD" serve --data-dir "$WORK/hoard" --listen "127.0.0.1:$(free_port)" --access-log false \
  >"$WORK/hoard.log" 2>&1 & pids+=($!)
HOARD_PID=$!
# containerd with its own local content store (CRI and snapshotters it cannot use here off).
mkdir -p "$WORK/containerd"
cat >"$WORK/containerd/config.toml" <<TOML
version = 2
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$WORK/containerd/c.sock"
[ttrpc]
  address = "$WORK/containerd/c.sock.ttrpc"
[debug]
  address = ""
TOML
containerd --config "$WORK/containerd/config.toml" >"$WORK/containerd.log" 2>&1 & pids+=($!)
CTD_PID=$!
for _ in $(seq 200); do [ -S "$WORK/hoard/hoard.sock" ] && [ -S "$WORK/containerd/c.sock" ] && break; sleep 0.05; done
"$HOARD" bench-content --rounds "$ROUNDS" --large-mib "$LARGE" --small "$SMALL" \
  --pid "hoard=$HOARD_PID" --pid "containerd=$CTD_PID" \
  "hoard=$WORK/hoard/hoard.sock" "containerd=$WORK/containerd/c.sock"
# The same work was asked of both: the CPU each server spent on it (user + system).
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$1/stat"; }
echo "server CPU seconds for the whole run: hoard $(cpu "$HOARD_PID"), containerd $(cpu "$CTD_PID")"
