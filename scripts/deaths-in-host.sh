#!/bin/sh
# Part of scripts/deaths.sh, run where guests boot (the nested test host, or
# this machine on real KVM): boots our kernel and agent initramfs N times, K
# at once, under each VMM of the list VMMS (capsid: capsid-vmm; qemu:
# QEMU microvm, the same kernel, initramfs and command line, with QEMU's
# default split irqchip: its PIC, IOAPIC and PIT in QEMU; qemu-kirq: the
# same with them in the kernel, as capsid-vmm has them; capsid-split:
# capsid-vmm with --irqchip split, its IOAPIC in the VMM and no PIC or PIT;
# capsid-kirq: capsid-vmm with --irqchip kernel spelled out, KVM's PIC,
# IOAPIC and PIT (its default);
# qemu-noxsave: qemu with the guest's XSAVE hidden (-cpu host,-xsave), the
# experiment on the test host's XSAVE inconsistency (docs/reliability.md);
# "both" means "capsid qemu"), in turn each round, and counts the guests
# that died
# before the kernel ran /init.
# Prints "DEATH vmm i-k: <where>" for each
# (the console's last line), "COUNT vmm K boots deaths" after each round
# (what is left if the test host dies), and "RESULT vmm K boots deaths".
# A fourth argument adds flags to capsid-vmm's, a fifth to QEMU's.
# POSIX sh: the test host has no bash.
set -u
VMMS=$1 N=$2 K=$3
# More flags for capsid-vmm (an experiment: "--seccomp none").
VMM_FLAGS=${4:-}
# More flags for QEMU (the control: "-sandbox on", its own seccomp filter).
QEMU_FLAGS=${5:-}
out=$(mktemp -d /tmp/capsid-deaths.XXXXXX)
trap 'rm -rf "$out"' EXIT
# Verbose, with earlyprintk: the console says how far each guest got.
cmdline="console=ttyS0 reboot=k panic=-1 earlyprintk=serial,ttyS0 loglevel=8"
start() {
    dir=$1
    if [ "${VMM#capsid}" = "$VMM" ]; then
        irqchip=
        [ "$VMM" = qemu-kirq ] && irqchip="-machine ioapic2=off,kernel-irqchip=on"
        cpu=host
        [ "$VMM" = qemu-noxsave ] && cpu=host,-xsave
        qemu-system-x86_64 -M microvm,rtc=off -accel kvm -cpu $cpu -smp 1 -m 256 $irqchip \
            -nodefaults -no-user-config -display none -no-reboot \
            -L /usr/share/qemu -L /usr/share/seabios \
            -kernel "$CAPSID_KERNEL" -initrd "$CAPSID_AGENT_INITRAMFS" \
            -append "$cmdline reboot=t" -serial "file:$dir/console" $QEMU_FLAGS \
            > "$dir/log" 2>&1 < /dev/null &
    else
        irqchip=
        [ "$VMM" = capsid-split ] && irqchip="--irqchip split"
        [ "$VMM" = capsid-kirq ] && irqchip="--irqchip kernel"
        "$CAPSID_VMM" --kernel "$CAPSID_KERNEL" --initrd "$CAPSID_AGENT_INITRAMFS" \
            --vcpus 1 --mem-mib 256 --vsock-uds "$dir/vsock.sock" \
            --serial "file:$dir/console" --log-level info --cmdline "$cmdline" $irqchip $VMM_FLAGS \
            > "$dir/log" 2>&1 < /dev/null &
    fi
    echo $! > "$dir/pid"
}
reached() { grep -q "Run /init as init process" "$1/console" 2>/dev/null; }
# Until the guest ran /init, its VMM exited, or 90 s passed.
wait_for() {
    tries=0
    while [ $tries -lt 900 ]; do
        reached "$1" && return
        kill -0 "$(cat "$1/pid")" 2>/dev/null || return
        sleep 0.1
        tries=$((tries + 1))
    done
}
# The VMMs take turns round by round (capsid-vmm's K guests, then
# QEMU's), so all meet the test host in the same state.
vmms=$VMMS
[ "$VMMS" = both ] && vmms="capsid qemu"
# Each VMM's counters, in shell variables named after it.
var() { echo "$1" | tr -c 'a-z0-9\n' _; }
for VMM in $vmms; do eval "boots_$(var "$VMM")=0 deaths_$(var "$VMM")=0"; done
i=0
while [ $i -lt "$N" ]; do
    for VMM in $vmms; do
        for k in $(seq 1 "$K"); do mkdir -p "$out/$i-$k"; start "$out/$i-$k"; done
        for k in $(seq 1 "$K"); do wait_for "$out/$i-$k"; done
        died=0
        for k in $(seq 1 "$K"); do
            dir=$out/$i-$k
            if ! reached "$dir"; then
                died=$((died + 1))
                where=$(tr -d '\r' < "$dir/console" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-150)
                why=$(grep -o 'triple-faulted\|KVM_EXIT_[A-Z_]*\|exit status [0-9]*' "$dir/log" | head -n 1)
                if kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
                    why="hung for 90 s"
                    # Stopped so (SIGTERM), capsid-vmm logs where each vCPU
                    # was: "vCPU N at <address>" (deaths.sh names the
                    # function).
                    kill "$(cat "$dir/pid")" 2>/dev/null
                    t=0
                    while ! grep -q 'stopped from outside' "$dir/log" && [ $t -lt 50 ]; do
                        sleep 0.1
                        t=$((t + 1))
                    done
                    at=$(grep -o 'vCPU [0-9]*: rip=0x[0-9a-f]*' "$dir/log" | sed 's/: rip=/ at /' | tr '\n' ' ')
                    [ -n "$at" ] && why="$why; $at"
                fi
                echo "DEATH $VMM $i-$k: ${why:-exited} after: ${where:-no console output}"
                # The console's end, for target/deaths/consoles.txt.
                tr -d '\r' < "$dir/console" | grep -v '^[[:space:]]*$' | tail -n 40 \
                    | cut -c1-200 | sed "s/^/CONSOLE $VMM $i-$k| /"
            fi
            kill "$(cat "$dir/pid")" 2>/dev/null
        done
        wait
        rm -rf "${out:?}/$i-"*
        v=$(var "$VMM")
        eval "boots_$v=\$((boots_$v + K)) deaths_$v=\$((deaths_$v + died))"
        eval "echo \"COUNT $VMM $K \$boots_$v \$deaths_$v\""
    done
    i=$((i + 1))
done
for VMM in $vmms; do
    v=$(var "$VMM")
    eval "echo \"RESULT $VMM $K \$boots_$v \$deaths_$v\""
done
