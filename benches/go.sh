#!/usr/bin/env bash
# Go through hoard, in one run, alternating the order each round:
#  - a program importing a good part of the standard library (net/http, crypto/tls,
#    encoding/json, …) built on a "second machine" (empty GOCACHE) with GOCACHEPROG through a
#    hoard a first machine filled, against the same build with a warm local GOCACHE and a cold
#    one (empty GOCACHE, no GOCACHEPROG);
#  - `go mod download` of a fixture set of modules (60 modules, 2 versions each) through a warm
#    hoard, against go reading the same files straight from a file:// proxy.
# Prints each median and the ratios the targets name (second machine ≤ 1.5× warm local and
# ≤ 0.3× cold; warm hoard GOPROXY ≤ 1.2× the file proxy).
#   usage: benches/go.sh [ROUNDS]      (default 3)
#   needs go 1.24+: target/peers/bin/go (scripts/test-all.sh links it) or go on PATH
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
GO=target/peers/bin/go
[ -x "$GO" ] || GO=$(command -v go) || { echo "no go: run scripts/test-all.sh once, or install go 1.24+" >&2; exit 1; }
GO=$(realpath "$GO")
cargo build --release --quiet
HOARD=$(realpath target/release/hoard)
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/hoard-go-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  chmod -R u+w "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done; echo "not ready: $1" >&2; exit 1; }
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# The module fixture, in the GOPROXY layout, and an upstream serving it over HTTP.
FIX="$WORK/proxy"
python3 - "$FIX" <<'EOF'
import io, json, os, sys, zipfile, random
root = sys.argv[1]
rnd = random.Random(7)
for m in range(60):
    path = f"example.com/bench/mod{m:02d}"
    d = os.path.join(root, path, "@v")
    os.makedirs(d, exist_ok=True)
    vers = ["v1.0.0", "v1.1.0"]
    for v in vers:
        gomod = f"module {path}\n\ngo 1.22\n"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"{path}@{v}/go.mod", gomod)
            for f in range(20):
                body = "".join(f"// {rnd.random()}\n" for _ in range(200))
                z.writestr(f"{path}@{v}/f{f}.go", f"package mod{m:02d}\n{body}")
        open(os.path.join(d, v + ".zip"), "wb").write(buf.getvalue())
        open(os.path.join(d, v + ".mod"), "w").write(gomod)
        json.dump({"Version": v, "Time": "2024-01-01T00:00:00Z"}, open(os.path.join(d, v + ".info"), "w"))
    open(os.path.join(d, "list"), "w").write("\n".join(vers) + "\n")
EOF
APP="$WORK/app"
mkdir -p "$APP"
{
  echo "module example.com/benchapp"; echo; echo "go 1.22"; echo; echo "require ("
  for m in $(seq -w 0 59); do echo "	example.com/bench/mod$m v1.1.0"; done
  echo ")"
} >"$APP/go.mod"
UPORT=$(free_port)
python3 -m http.server "$UPORT" --bind 127.0.0.1 --directory "$FIX" >/dev/null 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$UPORT/"

HPORT=$(free_port)
HOARD_GOMOD_UPSTREAMS="http://127.0.0.1:$UPORT" HOARD_GOMOD_SUMDB=off HOARD_ACCESS_LOG=false \
  "$HOARD" serve --listen "127.0.0.1:$HPORT" --data-dir "$WORK/hoard" >"$WORK/hoard.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$HPORT/readyz"
H="http://127.0.0.1:$HPORT"

goenv() { # home
  echo env -i PATH="$PATH" HOME="$1" GOTOOLCHAIN=local GOSUMDB=off GOFLAGS=-modcacherw \
    GOMODCACHE="$1/mod" GOPATH="$1/gopath" CGO_ENABLED=0
}

# go mod download: warm hoard against the file proxy.
$(goenv "$WORK/warm") GOPROXY="$H/gomod" GOCACHE="$WORK/warm/cache" "$GO" -C "$APP" mod download >/dev/null
gomod_run() { # label proxy
  local home="$WORK/gm-$1-$RANDOM"
  local t0; t0=$(now)
  $(goenv "$home") GOPROXY="$2" GOCACHE="$home/cache" "$GO" -C "$APP" mod download >/dev/null
  echo "$(now) - $t0" | bc >>"$WORK/t-gomod-$1"
  # (kept until the end, as the builds below keep theirs)
}
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then gomod_run hoard "$H/gomod"; gomod_run file "file://$FIX"
  else gomod_run file "file://$FIX"; gomod_run hoard "$H/gomod"; fi
done

# The build.
SRC="$WORK/src"
mkdir -p "$SRC"
cat >"$SRC/go.mod" <<'EOF'
module example.com/stdapp

go 1.22
EOF
cat >"$SRC/main.go" <<'EOF'
package main

import (
	"archive/zip"
	"compress/gzip"
	"crypto/tls"
	"database/sql"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"go/parser"
	"html/template"
	"image/png"
	"net/http"
	"net/http/httptest"
	"net/smtp"
	"os/exec"
	"regexp"
	"text/tabwriter"
)

func main() {
	fmt.Println(zip.Store, gzip.BestSpeed, tls.VersionTLS13, sql.ErrNoRows, json.Valid(nil), xml.Header,
		parser.ParseComments, template.HTML(""), png.DefaultCompression, http.StatusOK, httptest.DefaultRemoteAddr,
		smtp.PlainAuth, exec.ErrNotFound, regexp.MustCompile("x"), tabwriter.AlignRight)
}
EOF
prog() { echo "$HOARD gocacheprog --url $H --dir $1/prog"; }
# The first machine fills hoard.
$(goenv "$WORK/m1") GOCACHE="$WORK/m1/cache" GOCACHEPROG="$(prog "$WORK/m1")" GOPROXY=off "$GO" -C "$SRC" build -o "$WORK/m1/app" .
# A warm local cache.
$(goenv "$WORK/local") GOCACHE="$WORK/local/cache" GOPROXY=off "$GO" -C "$SRC" build -o "$WORK/local/app" .
build_run() { # label
  local home="$WORK/b-$1-$RANDOM"
  local t0
  case $1 in
    second) t0=$(now); $(goenv "$home") GOCACHE="$home/cache" GOCACHEPROG="$(prog "$home")" GOPROXY=off "$GO" -C "$SRC" build -o "$home/app" . ;;
    warm)   rm -f "$WORK/local/app"; t0=$(now); $(goenv "$WORK/local") GOCACHE="$WORK/local/cache" GOPROXY=off "$GO" -C "$SRC" build -o "$WORK/local/app" . ;;
    cold)   t0=$(now); $(goenv "$home") GOCACHE="$home/cache" GOPROXY=off "$GO" -C "$SRC" build -o "$home/app" . ;;
  esac
  echo "$(now) - $t0" | bc >>"$WORK/t-build-$1"
  # Homes stay until the end: a second machine starts on a disk that did not just delete a
  # thousand files (ext4 then spends its time looking past the recently freed inodes).
}
for r in $(seq "$ROUNDS"); do
  order=(second warm cold)
  [ $((r % 2)) -eq 0 ] && order=(cold warm second)
  for who in "${order[@]}"; do build_run "$who"; done
done

m() { median <"$WORK/t-$1"; }
SEC=$(m build-second); WARM=$(m build-warm); COLD=$(m build-cold)
GH=$(m gomod-hoard); GF=$(m gomod-file)
printf 'go build, median of %s (s): second machine through hoard %.2f, warm local GOCACHE %.2f, cold %.2f\n' "$ROUNDS" "$SEC" "$WARM" "$COLD"
printf '  second / warm local = %.2f (target <= 1.5)   second / cold = %.2f (target <= 0.3)\n' \
  "$(echo "$SEC / $WARM" | bc -l)" "$(echo "$SEC / $COLD" | bc -l)"
printf 'go mod download of 60 modules, median (s): warm hoard %.2f, file:// proxy %.2f\n' "$GH" "$GF"
printf '  hoard / file proxy = %.2f (target <= 1.2)\n' "$(echo "$GH / $GF" | bc -l)"
