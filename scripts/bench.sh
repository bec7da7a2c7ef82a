#!/usr/bin/env bash
# The benchmark (`make bench [RUNS=20]`, extra options in BENCH_ARGS): every
# scenario of cocoon-bench, ours against a peer in the same run, where guests
# boot (nested when this machine's KVM cannot boot Linux). Prints the table
# and writes target/bench/bench.{txt,json,svg}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
. scripts/artifacts.sh
runs=${1:-20}
bench=$(bench_binary)
COCOON_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export COCOON_COMMIT
mkdir -p target/bench
log "==> cocoon bench: $runs runs of each series"
# shellcheck disable=SC2046,SC2086 # bench_peers prints --with options; BENCH_ARGS are words
run_with_kvm --with "$bench" $(bench_peers) -- "$bench" --runs "$runs" --out /tmp/cocoon-bench ${BENCH_ARGS:-} \
    | tee target/bench/bench.txt
grep '^BENCH-JSON ' target/bench/bench.txt | sed 's/^BENCH-JSON //' > target/bench/bench.json
"$bench" render target/bench/bench.json --out target/bench > /dev/null
log "==> saved target/bench/bench.txt, bench.json and bench.svg"
