//! A micro-VM and the containers in it: a container's own VM, or a pod's VM
//! that the pod's sandbox (pause) container boots and the pod's other
//! containers join. CRI's annotations say which a container is.
//!
//! ```text
//!  plain container   ─▶ boot a VM; its rootfs image is the VM's first disk
//!  pod sandbox       ─▶ boot a VM with `pod_containers` spare disk slots
//!  pod container     ─▶ attach its rootfs image to a spare slot (VMM API);
//!                       the agent finds the disk by serial and mounts it
//!  a container goes  ─▶ the agent removes it, its disk is detached
//!  the last one goes ─▶ agent Shutdown, the VMM killed, scratch removed
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use capsid_images::rootfs::RootfsImage;
use capsid_protocol::{AgentClient, Rootfs};
use capsid_runtime::config::VmSize;
use capsid_runtime::vm::VmApi;
use capsid_runtime::{Config, MicroVm, VmSpec, rootfs_disk};
use oci_spec::runtime::Spec;

use crate::container::{AGENT_IO_TIMEOUT, ContainerError};

/// CRI's annotations: what a container is in its pod, and the pod's id
/// (the id of its sandbox container).
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Where a container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not in a pod: a VM of its own.
    Alone,
    /// A pod's sandbox container: boots the pod's VM.
    PodSandbox,
    /// Another container of pod `sandbox_id`: joins the pod's VM.
    PodMember { sandbox_id: String },
}

impl Role {
    pub fn of(spec: &Spec) -> Self {
        let Some(annotations) = spec.annotations() else {
            return Role::Alone;
        };
        match (
            annotations.get(CRI_CONTAINER_TYPE).map(String::as_str),
            annotations.get(CRI_SANDBOX_ID),
        ) {
            (Some("sandbox"), _) => Role::PodSandbox,
            (Some("container"), Some(sandbox_id)) => Role::PodMember {
                sandbox_id: sandbox_id.clone(),
            },
            _ => Role::Alone,
        }
    }
}

/// One running micro-VM and who is in it.
#[derive(Debug)]
pub struct Sandbox {
    pub client: AgentClient,
    pub vmm_pid: u32,
    /// Shared with the agent client's timeout hook, which kills the VM.
    vm: Arc<Mutex<MicroVm>>,
    /// The VMM's API, used without the VM's lock.
    api: VmApi,
    scratch: PathBuf,
    members: Mutex<HashSet<String>>,
    next_disk: AtomicU32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sandbox {
    /// Boots a VM for container `id`, with its rootfs image as the first
    /// disk and `spare_disks` slots for containers joining later; `record`
    /// hears of the VM's scratch directory before its VMM starts. On an
    /// error, nothing it made is left.
    pub fn boot(
        config: &Config,
        id: &str,
        size: VmSize,
        image: &RootfsImage,
        spare_disks: u8,
        record: &dyn Fn(&Path),
    ) -> Result<(Self, Rootfs), ContainerError> {
        std::fs::create_dir_all(&config.run_dir)
            .map_err(|e| ContainerError::Scratch(config.run_dir.clone(), e))?;
        let scratch = tempfile::Builder::new()
            .prefix("vm-")
            .tempdir_in(&config.run_dir)
            .map_err(|e| ContainerError::Scratch(config.run_dir.clone(), e))?;
        record(scratch.path());
        let (disk, rootfs) = rootfs_disk(image);
        let (vm, client) = MicroVm::boot(
            &VmSpec {
                boot: config.boot_files()?,
                vcpus: size.vcpus,
                memory_mib: size.memory_mib,
                disks: vec![disk],
                spare_disks,
                dir: scratch.path().to_owned(),
                log_level: "warn".into(),
                confinement: config.confinement(),
                // The shim launches from a pool thread that may end first;
                // containerd's `shim delete` cleans up after a killed shim.
                die_with_owner: false,
            },
            &config.boot_policy(AGENT_IO_TIMEOUT, &|| false, &|why| {
                log::warn!("{id}: {why}");
            }),
        )?;
        // On an error from here, `vm` is killed and `scratch` removed as they drop.
        log::info!(
            "{id}: micro-VM {} ({} vCPUs, {} MiB, {spare_disks} spare disk slots) booted with {}",
            vm.pid(),
            size.vcpus,
            size.memory_mib,
            image.path.display()
        );
        let vmm_pid = vm.pid();
        let api = vm.api();
        let vm = Arc::new(Mutex::new(vm));
        // An agent that misses a call's deadline may miss them all: the VM
        // goes, and the processes in it are reported dead (255).
        let weak = Arc::downgrade(&vm);
        let name = id.to_owned();
        client.on_timeout(Box::new(move |call| {
            log::error!(
                "{name}: the agent missed the deadline of {call}; killing micro-VM {vmm_pid}"
            );
            if let Some(vm) = weak.upgrade() {
                lock(&vm).kill();
            }
        }));
        Ok((
            Self {
                client,
                vmm_pid,
                vm,
                api,
                scratch: scratch.keep(),
                members: Mutex::new(HashSet::from([id.to_owned()])),
                next_disk: AtomicU32::new(1),
            },
            rootfs,
        ))
    }

    /// Adds container `id` to the running VM, its rootfs image on a spare
    /// disk slot. Returns the disk's id and how the agent mounts it.
    pub fn join(&self, id: &str, image: &RootfsImage) -> Result<(String, Rootfs), ContainerError> {
        let disk = format!("ctr-{}", self.next_disk.fetch_add(1, Ordering::Relaxed));
        let rootfs = self.api.attach(image, &disk)?;
        lock(&self.members).insert(id.to_owned());
        log::info!("{id}: joins micro-VM {} on disk {disk}", self.vmm_pid);
        Ok((disk, rootfs))
    }

    /// The hybrid-vsock socket of the VM.
    pub fn uds(&self) -> PathBuf {
        lock(&self.vm).uds().to_owned()
    }

    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// Why the VM is gone, with the VMM's log and the end of the guest
    /// console, for the shim's log when the agent connection broke; or that
    /// the VM still runs.
    pub fn post_mortem(&self) -> String {
        if !self.wait_exit(Duration::from_millis(500)) {
            return "the micro-VM still runs".into();
        }
        let mut vm = lock(&self.vm);
        match vm.exit_report(Duration::ZERO) {
            Some(report) => report + &vm.diagnostics(),
            None => "the micro-VM still runs".into(),
        }
    }

    /// Waits up to `timeout` for the VMM to exit, taking the VM's lock only
    /// for each brief look (never across the wait). Whether it exited.
    fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if !matches!(lock(&self.vm).try_wait(), Ok(None)) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn running(&self) -> bool {
        matches!(lock(&self.vm).try_wait(), Ok(None))
    }

    /// Container `id` is gone from the VM (the agent removed it): detach
    /// its disk, if it joined with one. When it was the last container,
    /// take the VM down.
    pub fn leave(&self, id: &str, disk: Option<&str>) {
        if let Some(disk) = disk
            && self.running()
            && let Err(e) = self.api.detach(disk)
        {
            log::warn!("{id}: {}", capsid_protocol::error_chain(&e));
        }
        let mut members = lock(&self.members);
        members.remove(id);
        if members.is_empty() {
            self.shut_down();
        }
    }

    /// Asks the agent to shut the guest down, kills the VMM if it has not
    /// gone within 5 s, and removes the scratch directory. The VM's lock is
    /// never held while the agent answers or the VMM exits: a guest that
    /// stalls the shutdown cannot keep the kill from coming.
    fn shut_down(&self) {
        let running = matches!(lock(&self.vm).try_wait(), Ok(None));
        if running && self.client.shutdown().is_ok() {
            self.wait_exit(Duration::from_secs(5));
        }
        lock(&self.vm).kill();
        if let Err(e) = std::fs::remove_dir_all(&self.scratch)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log::warn!("cannot remove {}: {e}", self.scratch.display());
        }
    }
}

impl Drop for Sandbox {
    /// A sandbox dropped with containers still in it (a failed create):
    /// nothing may outlive it.
    fn drop(&mut self) {
        self.shut_down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotations: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","annotations":{{{annotations}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn cri_annotations_say_where_a_container_runs() {
        assert_eq!(Role::of(&spec("")), Role::Alone);
        assert_eq!(
            Role::of(&spec(
                r#""io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"p1""#
            )),
            Role::PodSandbox
        );
        assert_eq!(
            Role::of(&spec(
                r#""io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"p1""#
            )),
            Role::PodMember {
                sandbox_id: "p1".into()
            }
        );
        // A container that names no pod runs alone.
        assert_eq!(
            Role::of(&spec(r#""io.kubernetes.cri.container-type":"container""#)),
            Role::Alone
        );
    }
}
