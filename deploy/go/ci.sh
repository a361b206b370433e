#!/usr/bin/env bash
# A plain CI job (no Docker) with hoard's Go caches. HOARD is the hoard URL; KEY names the
# cache, e.g. per OS/arch and branch. Restore keys fall back to the newest snapshot of the
# default branch.
set -euo pipefail
HOARD=${HOARD:-http://hoard:5000}
OSARCH="$(go env GOOS)-$(go env GOARCH)"
BRANCH=${CI_BRANCH:-main}
export GOPROXY="$HOARD/gomod,https://proxy.golang.org"
export GOFLAGS=-modcacherw
export GOCACHEPROG="hoard gocacheprog --url $HOARD"

# Modules: restore the last snapshot for this branch (else main's), download what is new.
hoard snapshot restore --url "$HOARD" --key "gomod-$OSARCH-$BRANCH" \
  --restore-key "gomod-$OSARCH-main" "$(go env GOMODCACHE)"
go mod download

# Build and test: compiled packages and test results come from the farm's build cache.
go build ./...
go test ./...

# Save the module cache for the next job (only what hoard lacks is uploaded).
hoard snapshot save --url "$HOARD" --key "gomod-$OSARCH-$BRANCH" "$(go env GOMODCACHE)"
