#!/usr/bin/env bash
# Benchmarks hoard against a peer registry (Debian's docker-registry, distribution 2.8) in the
# same run: each round runs each part of `hoard bench` against both, alternating which goes
# first, then prints per-measurement ratios (hoard / peer), peak RSS, one core's sha256 speed,
# and hoard with durability = "sync" against the disk's own `dd conv=fsync` speed.
#   usage: benches/compare.sh [ROUNDS] [SCALE]      (defaults: 2 rounds, full scale)
#   PARTS="medium small": only those parts (default: large medium small manifest)
#   WARM_MB=N: memory recycled before each server's large and medium part (default 3200, what the
#   large part writes; 0: off)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
SCALE=${2:-1}
WARM_MB=${WARM_MB:-3200}
command -v docker-registry >/dev/null || { echo "docker-registry missing: apt-get install docker-registry" >&2; exit 1; }
cargo build --release --quiet
HOARD=target/release/hoard
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/hoard-bench.XXXXXX")
OUT="$WORK/results.jsonl"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "not ready: $1" >&2; exit 1; }

HPORT=$(free_port)
"$HOARD" serve --listen "127.0.0.1:$HPORT" --data-dir "$WORK/hoard" 2>"$WORK/hoard.log" &
HPID=$!; pids+=("$HPID")
PPORT=$(free_port)
cat > "$WORK/peer.yml" <<YML
version: 0.1
log: {level: error}
storage:
  filesystem: {rootdirectory: $WORK/peer}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$PPORT, secret: bench-only-secret}
YML
docker-registry serve "$WORK/peer.yml" >"$WORK/peer.log" 2>&1 &
PPID_=$!; pids+=("$PPID_")
wait_http "http://127.0.0.1:$HPORT/v2/"
wait_http "http://127.0.0.1:$PPORT/v2/"

# Each measurement starts from the same state for both servers:
# - a quiet disk: what the previous part left to write back (hoard's group commit acknowledges
#   before it flushes; the peer fsyncs each blob) is flushed first, so it is not charged to
#   whichever server happens to run next;
# - recycled memory: on a VM whose memory the host backs lazily (or takes back through free page
#   reporting), the first write to a page the guest has not used for a while costs microseconds,
#   and writing a new file through the page cache runs at a third of its speed on recycled
#   memory. A machine whose page cache is full, as a cache server's is after its first hour,
#   never pays that. So before each server writes its large and medium blobs, a file as large as
#   what the part writes is written and deleted, instead of one server paying for the other's
#   growth. (Touching anonymous memory instead does not help: measured, the page cache did not
#   reuse it.) The `sync` after it waits for whatever of that file was already being written.
settle() {
  case $1 in
    large|medium)
      if [ "$WARM_MB" -gt 0 ]; then
        dd if=/dev/zero of="$WORK/warm.bin" bs=1M count="$WARM_MB" status=none
        rm -f "$WORK/warm.bin"
      fi ;;
  esac
  sync
}

# Each kind of measurement runs against both servers back to back, so both meet the machine in
# the same state (a shared host's load changes within a minute); who goes first alternates.
n=0
for r in $(seq "$ROUNDS"); do
  for part in ${PARTS:-large medium small manifest}; do
    n=$((n + 1))
    if [ $((n % 2)) -eq 1 ]; then order="hoard peer"; else order="peer hoard"; fi
    for who in $order; do
      port=$HPORT; [ "$who" = peer ] && port=$PPORT
      echo "round $r: $part: $who" >&2
      settle "$part"
      "$HOARD" bench --url "http://127.0.0.1:$port" --label "$who" --scale "$SCALE" --only "$part" >> "$OUT"
    done
  done
done
rss() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
# Uploads that waited for the disk because the group commit was over two intervals behind.
held=$(curl -sf "http://127.0.0.1:$HPORT/" | sed -n 's/.*(\([0-9]*\) writes have waited.*/\1/p')
echo "{\"label\":\"machine\",\"name\":\"hoard_writes_held_for_disk\",\"value\":${held:-0},\"unit\":\"\"}" >> "$OUT"
echo "{\"label\":\"hoard\",\"name\":\"peak_rss_kB\",\"value\":$(rss $HPID),\"unit\":\"kB\"}" >> "$OUT"
echo "{\"label\":\"peer\",\"name\":\"peak_rss_kB\",\"value\":$(rss $PPID_),\"unit\":\"kB\"}" >> "$OUT"
echo "{\"label\":\"machine\",\"name\":\"sha256_one_core_MBps\",\"value\":$("$HOARD" bench-sha256),\"unit\":\"MB/s\"}" >> "$OUT"

# durability = "sync" against the disk's own fsynced sequential write speed, same filesystem
# (with the large part only).
if [[ " ${PARTS:-large} " == *" large "* ]]; then
SPORT=$(free_port)
"$HOARD" serve --listen "127.0.0.1:$SPORT" --data-dir "$WORK/hoard-sync" --durability sync 2>"$WORK/hoard-sync.log" &
pids+=("$!")
wait_http "http://127.0.0.1:$SPORT/v2/"
settle large
"$HOARD" bench --url "http://127.0.0.1:$SPORT" --label hoard-sync --only large >> "$OUT"
# The best of three, like the pushes it is compared with.
dd_mbps=0
for _ in 1 2 3; do
  settle large
  dd_out=$(dd if=/dev/zero of="$WORK/dd.bin" bs=1M count=1024 conv=fsync 2>&1 | tail -1)
  rm -f "$WORK/dd.bin"
  dd_mbps=$(python3 -c 'import re,sys; m=re.search(r"([0-9.]+) bytes.*copied, ([0-9.]+) s", sys.argv[1]); print(max(int(sys.argv[2]), round(float(m.group(1))/float(m.group(2))/1e6)))' "$dd_out" "$dd_mbps")
done
echo "{\"label\":\"machine\",\"name\":\"dd_fsync_MBps\",\"value\":$dd_mbps,\"unit\":\"MB/s\"}" >> "$OUT"
# The device itself, bypassing the page cache: what a push that writes past direct_io_above with
# O_DIRECT can reach at most (cloud volumes are often capped well below the page cache's speed).
direct_out=$(dd if=/dev/zero of="$WORK/dd.bin" bs=4M count=256 oflag=direct 2>&1 | tail -1)
rm -f "$WORK/dd.bin"
direct_mbps=$(python3 -c 'import re,sys; m=re.search(r"([0-9.]+) bytes.*copied, ([0-9.]+) s", sys.argv[1]); print(round(float(m.group(1))/float(m.group(2))/1e6))' "$direct_out")
echo "{\"label\":\"machine\",\"name\":\"dd_direct_MBps\",\"value\":$direct_mbps,\"unit\":\"MB/s\"}" >> "$OUT"
fi

python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r["label"], r["name"]), []).append(r["value"])
med = {k: statistics.median(v) for k, v in by.items()}
names = sorted({n for (l, n) in med if l == "hoard"})
print(f"{'measurement':28} {'hoard':>12} {'peer':>12} {'ratio':>8}   per round (hoard / peer)")
for n in names:
    h, p = med.get(("hoard", n)), med.get(("peer", n))
    if p:
        ratio = h / p
        if n == "peak_rss_kB":
            ratio = p / h  # higher is better: how many times smaller hoard's peak RSS is
        rounds = " ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(by[("hoard", n)], by[("peer", n)]))
        print(f"{n:28} {h:12.1f} {p:12.1f} {ratio:7.2f}x   {rounds if len(by[('hoard', n)]) > 1 else ''}")
sha = med[("machine", "sha256_one_core_MBps")]
print(f"{'sha256 one core (MB/s)':28} {sha:12.1f}")
if ("hoard-sync", "push_1GiB_MBps") in med:
    dd = med[("machine", "dd_fsync_MBps")]
    big = med[("hoard", "push_1GiB_MBps")]
    sync_big = med[("hoard-sync", "push_1GiB_MBps")]
    print(f"{'1 GiB push / sha256 core':28} {big / sha:12.2f}")
    print(f"{'dd conv=fsync (MB/s)':28} {dd:12.1f}")
    print(f"{'sync 1 GiB push (MB/s)':28} {sync_big:12.1f}  ({sync_big / dd:.2f} of dd)")
    print(f"{'dd oflag=direct (MB/s)':28} {med[('machine', 'dd_direct_MBps')]:12.1f}")
print(f"{'writes held for the disk':28} {med[('machine', 'hoard_writes_held_for_disk')]:12.0f}  (hoard, group commit over 2 intervals behind)")
print("(peak_rss_kB ratio = peer / hoard)")
# CPU the hypervisor gave to other guests during each measurement: on a shared VM a round with
# seconds of steal measured the neighbours, not the registry.
steal = {}
for r in rows:
    if "steal_s" in r:
        steal.setdefault((r["label"], r["name"]), []).append(r["steal_s"])
worst = max((v for vs in steal.values() for v in vs), default=0)
print(f"CPU steal during measurements: at most {worst:.2f} s", end="")
if worst >= 0.5:
    print("; per round (hoard / peer):")
    for n in names:
        h, p = steal.get(("hoard", n), []), steal.get(("peer", n), [])
        if h and p:
            print(f"  {n:26} " + " ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(h, p)))
else:
    print()
PY
