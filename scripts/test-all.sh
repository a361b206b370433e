#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the real peers the tests talk to
# (skopeo, buildah, containerd + ctr, Debian's docker-registry for the benchmark, faketime),
# then checks formatting and lints and runs every test against the release binary.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in skopeo:skopeo buildah:buildah containerd:containerd ctr:containerd docker-registry:docker-registry faketime:faketime; do
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

cargo fmt --check
cargo clippy --release --all-targets --quiet -- -D warnings
cargo test --release --all-targets 2>&1 | tee "${TMPDIR:-/tmp}/hoard-test.log"
