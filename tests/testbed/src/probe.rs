//! Can this machine boot real guests? The test bed asks the capsid-vmm
//! under test (`capsid-vmm --probe`, `capsid_vmm_api::host`), so the
//! verdict comes from the code that will run the guests, and the test bed
//! does not link the VMM.
//!
//! `CAPSID_TESTBED_MODE=native|nested` overrides it.

use std::path::PathBuf;
use std::time::Duration;

pub use capsid_vmm_api::host::{Mode, Probe};

/// How long `capsid-vmm --probe` may take (its tiny guest gives up after
/// 10 s).
const DEADLINE: Duration = Duration::from_secs(30);

/// The capsid-vmm under test: `CAPSID_VMM` (what `scripts/artifacts.sh`
/// exports), else the release build in this program's target directory.
pub fn vmm_binary() -> PathBuf {
    if let Some(vmm) = std::env::var_os("CAPSID_VMM") {
        return vmm.into();
    }
    // target/{debug,release}[/deps]/this-program → target/release/capsid-vmm
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "target"))
        .map_or_else(
            || PathBuf::from("capsid-vmm"),
            |target| target.join("release/capsid-vmm"),
        )
}

/// Probes this machine. A VMM that cannot answer makes the verdict
/// nested, with the reason; the tests that need native KVM then fail on
/// it under `CAPSID_E2E_REQUIRED=1`.
pub fn probe() -> Probe {
    if let Some(forced) = Probe::forced() {
        return forced;
    }
    let vmm = vmm_binary();
    match capsid_vmm_api::host::ask(&vmm, DEADLINE) {
        Ok(report) => report.kvm,
        Err(e) => Probe {
            mode: Mode::Nested,
            reason: format!(
                "cannot ask {} --probe ({e}); build it with `cargo build --release \
                 -p capsid-vmm` or set CAPSID_VMM",
                vmm.display()
            ),
        },
    }
}
