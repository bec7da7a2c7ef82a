#!/usr/bin/env bash
# The soak (`make soak [SOAK_RUNS=1000] [SOAK_CTR_RUNS=200]`): capsid-soak's
# start-stop cycles with a leak check every 100, `capsid run -- true` then
# `ctr run --rm`, where guests boot. In nested mode every batch of at most
# 100 cycles gets a fresh test host (its own kernel has crashed in runs of
# more than about 20 minutes); the leak checks are within each batch. Sums
# the batches up, keeps each batch's report in target/soak/, writes
# target/soak/soak.txt, and fails if a cycle failed or something leaked.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
. scripts/artifacts.sh
runs=${1:-1000}
ctr_runs=${2:-200}
batch=${3:-100}
soak=$(soak_binary)
mkdir -p target/soak
rm -f target/soak/batch-*.log
n=0
failed=0
one_batch() { # RUNS CTR_RUNS
    n=$((n + 1))
    local out=target/soak/batch-$n.log
    log "==> soak batch $n: $1 capsid run, $2 ctr run ($out)"
    if ! run_with_kvm --with "$soak" -- "$soak" --runs "$1" --ctr-runs "$2" --check-every "$batch" \
        > "$out" 2> "$out.stderr"; then
        failed=1
        log "    batch $n failed (its report: $out; what it printed: $out.stderr)"
    fi
    grep -v '^SOAK-PHASE' "$out" >&2 || true
}
left=$runs
while [ "$left" -gt 0 ]; do
    this=$(( left < batch ? left : batch ))
    one_batch "$this" 0
    left=$(( left - this ))
done
left=$ctr_runs
while [ "$left" -gt 0 ]; do
    this=$(( left < batch ? left : batch ))
    one_batch 0 "$this"
    left=$(( left - this ))
done
{
    echo "soak ($(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F)): $n batches of at most $batch cycles, each in a fresh test host"
    cat target/soak/batch-*.log | awk -F'\t' '$1 == "SOAK-PHASE" {
            cycles[$2] += $3; fails[$2] += $4; retries[$2] += $5; leaks[$2] += $6; host[$2] += $9
            if (!($2 in first)) first[$2] = $7 " / " $8
            last[$2] = $7 " / " $8
        }
        END { for (p in cycles) printf "%-22s cycles %5d  failed %3d  lost to the test host'"'"'s guest deaths %2d  booted again %3d  leak checks failed %2d  p50/p99 ms: first batch %s, last batch %s\n",
            p, cycles[p], fails[p], host[p], retries[p], leaks[p], first[p], last[p] }' | sort
    echo
    echo "each batch:"
    grep -hv '^SOAK-PHASE' target/soak/batch-*.log | sed 's/^/  /'
} | tee target/soak/soak.txt
[ "$failed" = 0 ] || die "the soak found failed cycles or leaks (target/soak/)"
