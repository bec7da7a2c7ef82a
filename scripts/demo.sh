#!/usr/bin/env bash
# The demo command (`make demo`): builds what is needed and boots cocoon's
# guest kernel in a cocoon-vmm micro-VM whose test init uses every device
# (boot marker, vsock both ways, virtio-blk read, read-only and write),
# printing what the guest reports and the VMM's exit status.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
. scripts/artifacts.sh
log "==> booting the cocoon guest kernel in a cocoon-vmm micro-VM"
run_e2e --exact vmm::vmm_runs_a_guest_that_uses_every_device --nocapture
