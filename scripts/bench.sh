#!/usr/bin/env bash
# The benchmark (`make bench [RUNS=20] [SCENARIOS="boot run"]`, extra options
# in BENCH_ARGS): each scenario of capsid-bench, ours against a peer in the
# same run, where guests boot. In nested mode each scenario gets a fresh test
# host: the test host's own kernel (nested SVM under QEMU TCG) has crashed
# in runs of more than about 20 minutes. Prints the table and writes
# target/bench/bench.{txt,json,svg} (bench.log: what each run printed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
. scripts/artifacts.sh
runs=${1:-20}
scenarios=${SCENARIOS:-boot run ctr concurrent footprint throughput net}
bench=$(bench_binary)
CAPSID_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export CAPSID_COMMIT
mkdir -p target/bench
: > target/bench/bench.log
for scenario in $scenarios; do
    log "==> capsid bench $scenario: $runs runs of each series"
    # shellcheck disable=SC2086 # BENCH_ARGS are words
    run_with_kvm --with "$bench" -- \
        "$bench" --runs "$runs" --scenarios "$scenario" --out /tmp/capsid-bench ${BENCH_ARGS:-} \
        | tee -a target/bench/bench.log
done
grep '^BENCH-JSON ' target/bench/bench.log | sed 's/^BENCH-JSON //' > target/bench/parts.jsonl
log "==> the whole report"
"$bench" render target/bench/parts.jsonl --out target/bench | tee target/bench/bench.txt
rm target/bench/parts.jsonl
log "==> saved target/bench/bench.txt, bench.json and bench.svg"
