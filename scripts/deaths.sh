#!/usr/bin/env bash
# The death-rate harness (`make deaths [BOOTS=100] [AT_ONCE="1 2 4"]`): boots
# our kernel and agent initramfs BOOTS times, K at once, under capsid-vmm
# and under QEMU microvm (the same kernel, initramfs and command line) in
# the same test host, taking turns round by round (so both meet the host
# in the same state), and counts the guests that died before running
# /init, with where each died (scripts/deaths-in-host.sh). In nested mode
# each batch of 100 boots per VMM gets a fresh test host (its own kernel
# crashes now and then); a test host that dies cuts its batch short, and
# the report says so. DEATHS_VMMS lists the series [default: "capsid
# qemu"; "qemu-kirq" is QEMU with its interrupt controllers and PIT in the
# kernel, as capsid-vmm has them by default; "capsid-split" is capsid-vmm
# with --irqchip split, its IOAPIC in the VMM and no PIC or PIT;
# "capsid-kirq" is capsid-vmm with --irqchip kernel spelled out;
# "qemu-noxsave" is QEMU's default with the guest's XSAVE hidden]. DEATHS_VMM_FLAGS adds flags to
# capsid-vmm's and DEATHS_QEMU_FLAGS to QEMU's (the experiments:
# DEATHS_VMM_FLAGS="--seccomp none"; DEATHS_QEMU_FLAGS="-sandbox on",
# QEMU's own seccomp filter).
# Writes target/deaths/deaths.txt and the end of each dead guest's
# console to target/deaths/consoles.txt; docs/reliability.md has figures.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
. scripts/artifacts.sh
boots=${1:-100}
at_once=${2:-1 2 4}
mkdir -p target/deaths
rm -f target/deaths/batch-*.log
batch_no=0
# Adds the guest kernel's function to each "at 0x<address>" of stdin
# ("at 0xffffffff81a2b3c4 (default_idle)"), from the kernel's symbols.
name_addresses() {
    awk -v kernel="$CAPSID_KERNEL" '
        BEGIN {
            n = 0
            # Sorted by address; fixed-width hex compares as strings.
            nm = "nm -n " kernel " 2>/dev/null"
            while ((nm | getline line) > 0) {
                split(line, f, " ")
                if (f[2] ~ /^[tTwW]$/) { addr[n] = f[1]; name[n] = f[3]; n++ }
            }
        }
        {
            out = ""
            rest = $0
            while (match(rest, /at 0x[0-9a-f]+/)) {
                a = substr(rest, RSTART + 5, RLENGTH - 5)
                while (length(a) < 16) a = "0" a
                found = ""
                for (i = 0; i < n && addr[i] <= a; i++) found = name[i]
                out = out substr(rest, 1, RSTART + RLENGTH - 1) (found == "" ? "" : " (" found ")")
                rest = substr(rest, RSTART + RLENGTH)
            }
            print out rest
        }'
}
for k in $at_once; do
    left=$boots
    while [ "$left" -gt 0 ]; do
        batch=$(( left < 100 ? left : 100 ))
        rounds=$(( (batch + k - 1) / k ))
        batch_no=$((batch_no + 1))
        out=target/deaths/batch-$batch_no.log
        log "==> $((rounds * k)) boots per VMM, $k at once ($out)"
        run_with_kvm --with "$PWD/scripts/deaths-in-host.sh" -- \
            sh "$PWD/scripts/deaths-in-host.sh" "${DEATHS_VMMS:-capsid qemu}" "$rounds" "$k" "${DEATHS_VMM_FLAGS:-}" "${DEATHS_QEMU_FLAGS:-}" \
            > "$out" 2> "$out.stderr" || log "    the test host failed (its console: $out.stderr); what it counted is kept"
        grep -E '^(DEATH|RESULT) ' "$out" >&2 || true
        left=$(( left - batch ))
    done
done
# Per batch and VMM, the last count: a series cut short by the test host's
# death counts what it booted, and is named.
# A batch's log holds one attempt per test host (the testbed runs the
# command again on a fresh one when its test host dies): each attempt's
# last count per VMM counts, the cut-short ones too.
summary=$(for out in target/deaths/batch-*.log; do
    awk -v batch="$out" '
        function flush(v) {
            for (v in last) { print last[v]; if (!(v in done)) print "CUT " v " " batch }
            split("", last); split("", done)
        }
        /^CAPSID-TESTBED-READY/ { flush() }
        $1 == "COUNT" { last[$2] = $0 }
        $1 == "RESULT" { done[$2] = 1 }
        END { flush() }' "$out"
done)
{
    echo "deaths before /init per 100 boots ($(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F))"
    printf '%-10s %-4s %7s %7s %9s\n' VMM K boots deaths per-100
    printf '%s\n' "$summary" | awk '$1 == "COUNT" { boots[$2" "$3] += $4; deaths[$2" "$3] += $5 }
         END { for (key in boots) { split(key, p, " ");
             printf "%-10s %-4s %7d %7d %9.1f\n", p[1], p[2], boots[key], deaths[key], 100 * deaths[key] / boots[key] } }' \
        | sort -k2n -k1
    printf '%s\n' "$summary" | awk '$1 == "CUT" { print "the test host died during the " $2 " series of " $3 " (see its .stderr)" }'
    echo
    echo "where each died (the console's last line, and where a hung guest's vCPUs were;"
    echo "target/deaths/consoles.txt has the last 40 console lines):"
    cat target/deaths/batch-*.log | grep '^DEATH ' | sed 's/^DEATH /  /' | name_addresses \
        || echo "  (none)"
} | tee target/deaths/deaths.txt
grep -h '^CONSOLE ' target/deaths/batch-*.log | sed 's/^CONSOLE //' > target/deaths/consoles.txt || true
