//! Boots guest kernels under QEMU's `microvm` machine, before capsid's own VMM
//! takes over: proves our kernel config and the test bed.

use std::time::Duration;

use std::path::Path;

use capsid_e2e::require_kvm;
use capsid_testbed::ScratchDir;
use capsid_testbed::microvm::{BootReport, MicrovmBoot, MicrovmError};
use capsid_testbed::procfs::qemu_children;
use capsid_testbed::retry::{BOOTS_PER_GUEST, announce_boot_retry};
use capsid_testbed::{artifact, initramfs_with_init};

const MARKER: &str = "CAPSID-TEST-INIT: ready";
/// `reboot=t` (triple fault): QEMU's microvm has no i8042, so `reboot=k` would
/// spin in the kernel's `kb_wait()` polling an absent controller — 1.3 million
/// port exits, about 70 s in nested mode — before falling back to a triple fault.
/// Our own VMM implements the i8042 reset and keeps `reboot=k`.
const CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet";

fn boot(kernel_var: &str, vcpus: u32, memory_mib: u32, scratch: &ScratchDir) -> MicrovmBoot {
    let initrd = initramfs_with_init(&artifact("CAPSID_TEST_INIT"), &scratch.join("init.cpio"));
    MicrovmBoot {
        kernel: artifact(kernel_var),
        initrd,
        cmdline: CMDLINE.into(),
        vcpus,
        memory_mib,
        marker: MARKER.into(),
        // Generous: a nested-mode boot of the cloud kernel takes about 15 s.
        timeout: Duration::from_secs(300),
    }
}

/// Boots `guest`, once more if it crashed before its marker: QEMU then
/// exits early (`reboot=t` makes the crash a reset, which ends QEMU), with
/// no kernel panic on the console (see [`BOOTS_PER_GUEST`]).
fn boot_to_marker(name: &str, guest: &MicrovmBoot, scratch: &Path) -> BootReport {
    let mut boots = 0;
    loop {
        boots += 1;
        match guest.boot(scratch) {
            Err(MicrovmError::ExitedEarly { console, .. })
                if !console.contains("Kernel panic") && boots < BOOTS_PER_GUEST =>
            {
                announce_boot_retry(name, &console);
            }
            other => return other.unwrap(),
        }
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Boots `kernel_var` `boots` times, checks each boot, prints the times.
fn boots_to_marker(name: &str, kernel_var: &str, expect_release: &str, boots: usize) {
    let scratch = ScratchDir::new("capsid-e2e").unwrap();
    let guest = boot(kernel_var, 1, 256, &scratch);
    let mut samples = Vec::new();
    for _ in 0..boots {
        let report = boot_to_marker(name, &guest, scratch.path());
        assert!(
            report.status.success(),
            "QEMU exited with {} after the guest rebooted",
            report.status
        );
        assert!(
            report
                .marker_line
                .contains(&format!("kernel={expect_release}")),
            "marker came from an unexpected kernel: {}",
            report.marker_line
        );
        println!(
            "{name}: {} (marker after {:.3} s, QEMU exit after {:.3} s)",
            report.marker_line,
            report.to_marker.as_secs_f64(),
            report.to_exit.as_secs_f64()
        );
        samples.push(report.to_marker);
    }
    println!(
        "{name}: boot to marker, median of {boots}: {:.3} s",
        median(samples).as_secs_f64()
    );
}

#[test]
fn our_kernel_boots_to_init_and_reboots_cleanly() {
    if !require_kvm("our_kernel_boots_to_init_and_reboots_cleanly") {
        return;
    }
    boots_to_marker("capsid kernel", "CAPSID_KERNEL", "6.12", 5);
}

#[test]
fn debian_cloud_kernel_boots_to_init_for_comparison() {
    if !require_kvm("debian_cloud_kernel_boots_to_init_for_comparison") {
        return;
    }
    boots_to_marker("debian cloud kernel", "CAPSID_CLOUD_KERNEL", "6.1", 3);
}

#[test]
fn our_kernel_sees_every_vcpu_and_its_memory() {
    if !require_kvm("our_kernel_sees_every_vcpu_and_its_memory") {
        return;
    }
    let scratch = ScratchDir::new("capsid-e2e").unwrap();
    let guest = boot("CAPSID_KERNEL", 2, 512, &scratch);
    let report = boot_to_marker("2 vCPUs, 512 MiB", &guest, scratch.path());
    let line = &report.marker_line;
    assert!(line.contains("cpus=2 "), "guest saw: {line}");
    let mem_mib: u32 = line
        .rsplit_once("mem_mib=")
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no mem_mib in {line}"));
    assert!(
        (400..=512).contains(&mem_mib),
        "guest of 512 MiB reports {mem_mib} MiB: {line}"
    );
}

#[test]
fn a_guest_that_never_reaches_the_marker_fails_and_leaves_no_qemu() {
    if !require_kvm("a_guest_that_never_reaches_the_marker_fails_and_leaves_no_qemu") {
        return;
    }
    let scratch = ScratchDir::new("capsid-e2e").unwrap();
    // No such init: the kernel panics and, with panic=0, waits forever.
    let mut guest = boot("CAPSID_KERNEL", 1, 128, &scratch);
    guest.cmdline = "console=ttyS0 rdinit=/no-such-init panic=0".into();
    guest.timeout = Duration::from_secs(60);
    match guest.boot(scratch.path()) {
        Err(MicrovmError::NoMarker { console, .. }) => {
            // What matters is the error and that no QEMU is left. The guest
            // normally gets to its panic; under nested TCG it has once
            // stalled in early boot for the whole minute, which is the same
            // failure to the caller.
            assert!(
                console.contains("Linux version"),
                "the guest did not even start:\n{console}"
            );
            if !console.contains("Kernel panic") {
                eprintln!(
                    "note: the guest stalled before its panic within {} s (nested mode is slow); \
                     the missing marker was still reported",
                    guest.timeout.as_secs()
                );
            }
        }
        other => panic!("expected NoMarker, got {other:?}"),
    }
    assert_eq!(qemu_children(), Vec::<u32>::new(), "QEMU left running");

    // A guest that boots but never prints the expected marker also fails.
    let mut guest = boot("CAPSID_KERNEL", 1, 128, &scratch);
    guest.marker = "A MARKER NOBODY PRINTS".into();
    match guest.boot(scratch.path()) {
        Err(MicrovmError::ExitedEarly { console, .. }) => {
            assert!(console.contains(MARKER), "the guest did boot: {console}");
        }
        other => panic!("expected ExitedEarly, got {other:?}"),
    }
    assert_eq!(qemu_children(), Vec::<u32>::new(), "QEMU left running");
}
