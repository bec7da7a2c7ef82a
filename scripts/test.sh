#!/usr/bin/env bash
# The test command (`make test`, `.ci/run`): builds everything the tests need
# and runs the whole suite — lints, unit tests, and the end-to-end tests on a
# real guest kernel, natively or inside the nested test host.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
started=$(date +%s)

# Build dependencies first: clippy compiles everything (libseccomp for the
# agent, protoc for the e2e tests' CRI client).
ensure_packages build-essential libseccomp-dev erofs-utils e2fsprogs protobuf-compiler

log "==> cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)

log "==> cargo clippy -D warnings"
cargo clippy --quiet --workspace --all-targets --locked -- -D warnings

. scripts/artifacts.sh

log "==> unit and integration tests"
CAPSID_E2E_REQUIRED=1 cargo test --workspace --exclude capsid-e2e --locked

log "==> every fuzz target for a few seconds, so none rots (make fuzz runs them longer)"
bash scripts/fuzz.sh 5

e2e=$(e2e_test_binary)
[ -x "$e2e" ] || die "could not build the e2e tests"
mkdir -p target/e2e
: > target/e2e/e2e.log
# In two test hosts, each run well under 20 minutes (a test host's own
# kernel has crashed in longer ones): the VMM, agent, boot, fault and
# security tests; then capsid run, containerd, CRI and networking.
second_half=(cli:: containerd:: cri:: network::)
skips=()
for filter in "${second_half[@]}"; do skips+=(--skip "$filter"); done
# The failed tests of an e2e log ($1), one a line, each followed by "died"
# if a guest of its died as the nested test host's guests do: a triple
# fault reported at the reset vector with no word from the guest kernel
# first (docs/reliability.md, "Guests that die or stall after they booted").
failed_tests() {
    awk '
        /^test [^ ]+ \.\.\./ { current = $2 }
        /triple-faulted \(rip=0xfff0 / && current != "" { died[current] = 1 }
        /^failures:$/ { listing = 1; delete failed; next }
        listing && /^    [^ ]+$/ { failed[$1] = 1 }
        END { for (name in failed) print name, (name in died ? "died" : "failed") }
    ' "$1"
}
# Runs the e2e tests ARGS in a test host. A failed test whose guest died as
# the test host's do is run once more, alone, in a fresh test host, loudly
# (E2E-TEST-RETRY, counted below); any other failure fails at once, and so
# does a second death.
e2e_part() {
    local out=target/e2e/part.log
    if run_with_kvm --with "$e2e" -- "$e2e" --test-threads=1 --nocapture "$@" 2>&1 | tee "$out"; then
        cat "$out" >> target/e2e/e2e.log
        return 0
    fi
    cat "$out" >> target/e2e/e2e.log
    local failed again=()
    failed=$(failed_tests "$out")
    [ -n "$failed" ] || die "the end-to-end tests failed (above)"
    while read -r name how; do
        [ "$how" = died ] || die "the end-to-end test $name failed (above)"
        again+=("$name")
        echo "E2E-TEST-RETRY $name: a guest of it died as the nested test host's guests do (a triple fault at the reset vector, no word from its kernel; docs/reliability.md); running it again" \
            | tee -a target/e2e/e2e.log
    done <<< "$failed"
    run_with_kvm --with "$e2e" -- "$e2e" --test-threads=1 --nocapture --exact "${again[@]}" 2>&1 \
        | tee -a target/e2e/e2e.log
}
log "==> end-to-end tests, part 1 of 2 (VMM, agent, boot, faults, security)"
e2e_part "${skips[@]}"
log "==> end-to-end tests, part 2 of 2 (capsid run, containerd, CRI, networking)"
e2e_part "${second_half[@]}"
# A test boots a guest that crashed before it booted once more, loudly, and
# runs a test whose guest died as the test host's do once more
# (docs/reliability.md): say how many did.
retries=$(grep -c '^E2E-BOOT-RETRY ' target/e2e/e2e.log || true)
log "    guests booted again after crashing at boot: $retries (each is in target/e2e/e2e.log)"
reruns=$(grep -c '^E2E-TEST-RETRY ' target/e2e/e2e.log || true)
log "    tests run again after a guest of theirs died as the test host's do: $reruns"

# Each in a fresh test host: its own kernel has crashed in runs over ~20 minutes.
log "==> a short soak: 40 capsid run and 10 ctr run --rm cycles, a leak check every 10 (make soak runs 1,200)"
soak=$(soak_binary)
run_with_kvm --with "$soak" -- "$soak" --runs 40 --ctr-runs 10 --check-every 10

log "==> a benchmark smoke run (every scenario, 2 runs) so it cannot rot"
bench=$(bench_binary)
CAPSID_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export CAPSID_COMMIT
run_with_kvm --with "$bench" -- \
    "$bench" --runs 2 --concurrency 1,2 --density-cap 2 --clones 2 --stdout-bytes 4194304 --out /tmp/capsid-bench-smoke

log "==> all tests passed in $(( $(date +%s) - started )) s"
