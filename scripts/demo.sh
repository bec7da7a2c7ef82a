#!/usr/bin/env bash
# The demo command (`make demo`): builds what is needed and boots cocoon's
# guest kernel in a micro-VM, printing what the guest reports.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
. scripts/artifacts.sh
log "==> booting the cocoon guest kernel in a micro-VM"
run_e2e --exact our_kernel_boots_to_init_and_reboots_cleanly --nocapture
