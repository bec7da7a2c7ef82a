#!/usr/bin/env bash
# The demo command (`make demo`): builds what is needed and runs a busybox
# command with `capsid run` in a micro-VM (our kernel, capsid-agent as PID 1,
# the test image converted to an erofs disk), printing its output and exit
# code. On a host whose KVM cannot boot Linux (like our build machines), the
# very same command runs inside the nested test host, and says so.
# The demo's command exits 7 on purpose; the demo succeeds when it sees that.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
. scripts/artifacts.sh
log "==> capsid run: a busybox command in a micro-VM"
status=0
run_with_kvm -- "$CAPSID_CLI" run --rootfs "$CAPSID_TEST_ROOTFS_DIR" -- \
    sh -c 'echo "hello from $(uname -sr) in a capsid micro-VM, as $(id -un)"; echo "this line goes to stderr" >&2; exit 7' \
    || status=$?
[ "$status" = 7 ] || die "the demo's command should have exited 7, got $status"
log "==> demo done: the command's exit code 7 came back from the micro-VM"
