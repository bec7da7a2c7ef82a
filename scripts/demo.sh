#!/usr/bin/env bash
# The demo command (`make demo`): builds what is needed and runs a busybox
# command in a cocoon micro-VM (our kernel, cocoon-agent as PID 1, the test
# image on an erofs disk), printing its output and exit code. The demo's
# command exits 7 on purpose; the demo succeeds when it sees exactly that.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
. scripts/artifacts.sh
cargo build --quiet -p cocoon-e2e --bin cocoon-agent-demo
log "==> a busybox command in a cocoon micro-VM"
status=0
run_with_kvm --with "$PWD/target/debug/cocoon-agent-demo" -- "$PWD/target/debug/cocoon-agent-demo" || status=$?
[ "$status" = 7 ] || die "the demo's command should have exited 7, got $status"
log "==> demo done: the command's exit code 7 came back from the micro-VM"
