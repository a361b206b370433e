#!/usr/bin/env bash
# hoard on S3 and tiered, against hoard on disk and against the S3 server itself driven by a
# plain SDK client (the same 16 MiB blobs PUT and GET directly, and 256 MiB blobs as multipart
# uploads with hoard's part size and parallelism), in one run, alternating the order each round. Prints MB/s per store and the ratios the targets name, and S3 requests per
# pushed and pulled blob (from the status pages' per-operation counters).
#   usage: benches/s3.sh [ROUNDS] [SCALE]     (defaults: 2 rounds, full scale)
#   needs an S3 server: the test command's venv (target/peers/venv) or moto_server on PATH
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
SCALE=${2:-1}
MOTO=target/peers/venv/bin/moto_server
[ -x "$MOTO" ] || MOTO=$(command -v moto_server) || { echo "no S3 server: run scripts/test-all.sh once, or pip install 'moto[server]'" >&2; exit 1; }
cargo build --release --quiet
HOARD=target/release/hoard
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/hoard-s3-bench.XXXXXX")
OUT="$WORK/results.jsonl"
pids=()
cleanup() {
  for p in "${pids[@]}" $(cat "$WORK/pids" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done; echo "not ready: $1" >&2; exit 1; }

SPORT=$(free_port)
"$MOTO" -H 127.0.0.1 -p "$SPORT" >"$WORK/s3.log" 2>&1 & pids+=($!)
S3="http://127.0.0.1:$SPORT"
wait_http "$S3/"
for b in direct s3 tiered; do curl -sf -X PUT "$S3/bench-$b" >/dev/null; done

start() { # name, extra env...
  local name=$1; shift
  local port; port=$(free_port)
  env "$@" HOARD_ACCESS_LOG=false "$HOARD" serve --listen "127.0.0.1:$port" --data-dir "$WORK/$name" >/dev/null 2>"$WORK/$name.log" &
  echo $! >>"$WORK/pids"   # (started inside $(...): the parent's array would not see it)
  wait_http "http://127.0.0.1:$port/readyz"
  for _ in $(seq 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")" = 200 ] && break; sleep 0.1; done
  echo "$port"
}
common=(HOARD_STORE_ENDPOINT="$S3" HOARD_STORE_PATH_STYLE=true HOARD_STORE_REGION=us-east-1 HOARD_STORE_ACCESS_KEY_ID=bench HOARD_STORE_SECRET_ACCESS_KEY=bench)
slow=(HOARD_STORE_SLOW_ENDPOINT="$S3" HOARD_STORE_SLOW_PATH_STYLE=true HOARD_STORE_SLOW_REGION=us-east-1 HOARD_STORE_SLOW_ACCESS_KEY_ID=bench HOARD_STORE_SLOW_SECRET_ACCESS_KEY=bench)
P_DISK=$(start disk)
P_S3=$(start s3 HOARD_STORE_TYPE=s3 HOARD_STORE_BUCKET=bench-s3 "${common[@]}")
P_TIER=$(start tiered HOARD_STORE_TYPE=tiered HOARD_STORE_FAST_MAX_SIZE=8GiB HOARD_STORE_SLOW_BUCKET=bench-tiered "${slow[@]}")

ops() { # port -> "PutObject GetObject total": requests made on clients' behalf (objects of kinds
         # blob, upload, tag, record, link, catalog, claim; the background's heartbeats, lease,
         # announcements, access records and re-listings left out)
  curl -s "http://127.0.0.1:$1/" | python3 -c '
import sys
client = {"blob", "upload", "tag", "record", "link", "catalog", "claim"}
put = get = tot = 0
for l in sys.stdin:
    if not l.startswith("s3 kind ") or ":" not in l:
        continue
    what, v = l[len("s3 kind "):].rsplit(":", 1)
    op, kind = what.strip().split(" ", 1)
    if kind not in client or op.startswith("List"):
        continue
    n = int(v)
    tot += n
    put += n if op == "PutObject" else 0
    get += n if op == "GetObject" else 0
print(put, get, tot)'
}

run_part() { # label port
  case $1 in
    direct) "$HOARD" bench-s3 --endpoint "$S3" --bucket bench-direct --label direct --only medium,big --scale "$SCALE" >>"$OUT" ;;
    *) "$HOARD" bench --url "http://127.0.0.1:$2" --label "$1" --only medium,big --scale "$SCALE" >>"$OUT" ;;
  esac
}

for r in $(seq "$ROUNDS"); do
  order=(disk s3 tiered direct)
  [ $((r % 2)) -eq 0 ] && order=(direct tiered s3 disk)
  for who in "${order[@]}"; do
    case $who in disk) p=$P_DISK;; s3) p=$P_S3;; tiered) p=$P_TIER;; direct) p=0;; esac
    echo "round $r: $who" >&2
    run_part "$who" "$p"
  done
done

# S3 requests per small blob: pushes of 4 KiB blobs, then pulls (bench's small part).
for who in s3 tiered; do
  case $who in s3) p=$P_S3;; tiered) p=$P_TIER;; esac
  read -r put0 get0 tot0 < <(ops "$p")
  "$HOARD" bench --url "http://127.0.0.1:$p" --label "$who-small" --only small --scale 0.1 >>"$OUT"
  read -r put1 get1 tot1 < <(ops "$p")
  echo "{\"label\": \"$who\", \"name\": \"s3_requests_small_part\", \"put\": $((put1-put0)), \"get\": $((get1-get0)), \"total\": $((tot1-tot0))}" >>"$OUT"
done

# A second replica on the S3 hoard's bucket: a manifest pushed through the first, then HEADed
# and pulled by tag 50 times through the second (S3 requests per HEAD and per GET by tag).
P_S3B=$(start s3b HOARD_STORE_TYPE=s3 HOARD_STORE_BUCKET=bench-s3 "${common[@]}")
cfg='{"bench":"replica"}'
cd_=$(printf '%s' "$cfg" | sha256sum | cut -d' ' -f1)
curl -sf -X POST --data-binary "$cfg" "http://127.0.0.1:$P_S3/v2/rep/blobs/uploads/?digest=sha256:$cd_" >/dev/null
man="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.buildkit.cacheconfig.v0\",\"digest\":\"sha256:$cd_\",\"size\":${#cfg}},\"layers\":[]}"
curl -sf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary "$man" "http://127.0.0.1:$P_S3/v2/rep/manifests/cache" >/dev/null
curl -sf -o /dev/null "http://127.0.0.1:$P_S3B/v2/rep/manifests/cache"   # first sight: fills its cache
for method in HEAD GET; do
  read -r _ _ tot0 < <(ops "$P_S3B")
  for _ in $(seq 50); do
    if [ "$method" = HEAD ]; then curl -sf -I -o /dev/null "http://127.0.0.1:$P_S3B/v2/rep/manifests/cache"
    else curl -sf -o /dev/null "http://127.0.0.1:$P_S3B/v2/rep/manifests/cache"; fi
  done
  read -r _ _ tot1 < <(ops "$P_S3B")
  echo "{\"label\": \"replica\", \"name\": \"s3_requests_manifest_by_tag\", \"method\": \"$method\", \"total\": $((tot1-tot0))}" >>"$OUT"
done

python3 - "$OUT" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
best = {}
for r in rows:
    if "value" in r and r["name"].startswith(("push_16MiB", "pull_16MiB", "push_256MiB", "pull_256MiB")):
        best.setdefault((r["label"], r["name"]), []).append(r["value"])
print("MB/s (median of rounds; 64 blobs of 16 MiB over 8 streams; 4 blobs of 256 MiB one at a time,")
print("multipart on S3, pushed as BuildKit does, the digest named up front, so straight to its key):")
for name in ["push_16MiB_x8_MBps", "pull_16MiB_x8_MBps", "push_256MiB_MBps", "pull_256MiB_MBps"]:
    line = {l: statistics.median(best.get((l, name), [0])) for l in ["disk", "s3", "tiered", "direct"]}
    print(f"  {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in line.items()))
    print("    rounds: " + "; ".join(f"{l} " + "/".join(f"{v:.0f}" for v in best.get((l, name), [])) for l in ["disk", "s3", "tiered", "direct"]))
    d = line["direct"] or 1
    print(f"    hoard-on-S3 / S3 direct: {line['s3'] / d:.2f}   tiered / disk: {line['tiered'] / (line['disk'] or 1):.2f}")
for r in rows:
    if r.get("name") == "s3_requests_small_part":
        n = 500  # bench's small part at --scale 0.1
        print(f"  {r['label']}: {n} small blobs pushed, HEADed, pulled: {r['put']} PutObject, {r['get']} GetObject, {r['total']} S3 requests in all ({r['put'] / n:.2f} PUT per pushed blob, {r['get'] / n:.2f} GET per pulled blob)")
    if r.get("name") == "s3_requests_manifest_by_tag":
        print(f"  a second replica, 50 {r['method']}s of a manifest by tag: {r['total']} S3 requests ({r['total'] / 50:.2f} each)")
    if r.get("label", "").endswith("-small") and "value" in r:
        print(f"    {r['label']} {r['name']}: {r['value']} {r['unit']}")
PY
