#!/usr/bin/env bash
# The kill -9 loop, longer than the test suite runs it: starts hoard, pushes cache images from
# three clients, kills the daemon with SIGKILL at a varying moment (uploads, manifest puts and,
# on every other iteration, eviction under a 3 MiB bound in flight), restarts it, re-pulls every
# acknowledged tag whole and runs verification. Prints the iteration count and losses (must be 0).
#
#   bash scripts/crash-loop.sh [ITERATIONS]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
HOARD_CRASH_ITERATIONS=${1:-60} cargo test --release --test lifecycle \
  kill9_in_a_loop_loses_nothing_acknowledged -- --nocapture 2>&1 | grep -E "crash loop|test result|panicked"
