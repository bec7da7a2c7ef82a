#!/usr/bin/env bash
# The test command (`make test`, `.ci/run`): builds everything the tests need
# and runs the whole suite — lints, unit tests, and the end-to-end tests on a
# real guest kernel, natively or inside the nested test host.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
started=$(date +%s)

# Build dependencies first: clippy compiles everything (libseccomp for the agent).
ensure_packages build-essential libseccomp-dev erofs-utils e2fsprogs

log "==> cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)

log "==> cargo clippy -D warnings"
cargo clippy --quiet --workspace --all-targets --locked -- -D warnings

. scripts/artifacts.sh

log "==> unit and integration tests"
CAPSID_E2E_REQUIRED=1 cargo test --workspace --exclude capsid-e2e --locked
# The e2e crate's own unit tests (the benchmark's report) need no guest.
cargo test -p capsid-e2e --lib --locked

log "==> every fuzz target for a few seconds, so none rots (make fuzz runs them longer)"
bash scripts/fuzz.sh 5

log "==> end-to-end tests, then a benchmark smoke run (every scenario, 2 runs) so it cannot rot"
e2e=$(e2e_test_binary)
[ -x "$e2e" ] || die "could not build the e2e tests"
bench=$(bench_binary)
CAPSID_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export CAPSID_COMMIT
# shellcheck disable=SC2046 # bench_peers prints --with options, one word each
run_with_kvm --with "$e2e" --with "$bench" $(bench_peers) -- \
    sh -c '"$1" --test-threads=1 --nocapture && "$2" --runs 2 --concurrency 1,2 --density-cap 2 --stdout-bytes 4194304 --out /tmp/capsid-bench-smoke' \
    sh "$e2e" "$bench"

log "==> all tests passed in $(( $(date +%s) - started )) s"
