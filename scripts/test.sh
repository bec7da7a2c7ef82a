#!/usr/bin/env bash
# The test command (`make test`, `.ci/run`): builds everything the tests need
# and runs the whole suite — lints, unit tests, and the end-to-end tests on a
# real guest kernel, natively or inside the nested test host.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
started=$(date +%s)

log "==> cargo fmt --check"
cargo fmt --all -- --check

log "==> cargo clippy -D warnings"
cargo clippy --quiet --workspace --all-targets --locked -- -D warnings

. scripts/artifacts.sh

log "==> unit and integration tests"
COCOON_E2E_REQUIRED=1 cargo test --workspace --exclude cocoon-e2e --locked

log "==> end-to-end tests"
run_e2e --test-threads=1 --nocapture

log "==> all tests passed in $(( $(date +%s) - started )) s"
