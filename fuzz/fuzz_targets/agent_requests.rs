//! The agent's side of the protocol: frames as a host (or anything that
//! reached the agent's port) would send them, decoded, and every request
//! taken through the checks and plans the agent makes before it acts —
//! ids, the process spec, seccomp, mounts, devices, sysctls, the network
//! description. Nothing may panic or allocate without bound.
#![no_main]

use capsid_agent::container::{with_disks, with_files};
use capsid_agent::devices;
use capsid_agent::process::ProcessPlan;
use capsid_agent::rootfs::RootfsPlan;
use capsid_protocol::{Hello, Request, read_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    let _ = read_frame::<_, Hello>(&mut reader);
    for _ in 0..8 {
        let Ok(request) = read_frame::<_, Request>(&mut reader) else {
            break;
        };
        match request {
            Request::CreateContainer(create) => {
                let spec = &create.spec;
                let linux = spec.linux().as_ref();
                let seccomp = linux.and_then(|l| l.seccomp().as_ref());
                if let Some(process) = spec.process() {
                    let _ = ProcessPlan::from_oci(process, seccomp);
                }
                let mounts = spec.mounts().clone().unwrap_or_default();
                let dir = std::path::Path::new("/run/capsid/c");
                if let Ok((mounts, _trees)) =
                    with_disks(&mounts).and_then(|m| with_files(&m, &create.files, dir))
                {
                    let _ = RootfsPlan::new(dir.join("rootfs"), &mounts, linux, None, false);
                }
                let rules = linux
                    .and_then(|l| l.resources().as_ref())
                    .and_then(|r| r.devices().as_deref())
                    .unwrap_or_default();
                if let Ok(rules) = devices::rules(rules) {
                    let _ = devices::program(&rules);
                }
                let _ = capsid_protocol::validate_id("container", &create.id);
            }
            Request::ExecProcess(exec) => {
                let _ = exec.process.validate();
                let _ = ProcessPlan::from_oci(&exec.spec, None);
            }
            Request::StartProcess(process)
            | Request::WaitProcess(process)
            | Request::CloseStdin(process) => {
                let _ = process.validate();
            }
            Request::SignalProcess { process, .. } | Request::ResizeTty { process, .. } => {
                let _ = process.validate();
            }
            // Checked only: applying it would change the fuzzing host's network.
            Request::ConfigureNetwork(config) => {
                let _ = capsid_agent::network::check(&config);
            }
            _ => {}
        }
    }
});
