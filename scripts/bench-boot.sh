#!/usr/bin/env bash
# The boot benchmark (`make bench-boot [BOOTS=20]`): cocoon-vmm against QEMU's
# microvm machine booting the same kernel and initramfs under the same KVM,
# nested when this machine's KVM cannot boot Linux. Prints a table and saves
# it, with the raw samples as JSON, under target/bench/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
. scripts/artifacts.sh
boots=${1:-20}
bench=$(boot_bench_binary)
mkdir -p target/bench
log "==> boot benchmark: $boots boots of each"
run_with_kvm --with "$bench" -- "$bench" "$boots" | tee target/bench/boot.txt
grep '^BENCH-JSON ' target/bench/boot.txt | sed 's/^BENCH-JSON //' > target/bench/boot.json
log "==> saved target/bench/boot.txt and target/bench/boot.json"
