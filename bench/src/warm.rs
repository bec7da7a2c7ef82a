//! `warm`: a micro-VM restored from its template against one booted, both
//! with the agent initramfs and the same devices: spawn → the agent
//! answers; and host memory per sandbox with several of each running at
//! once (PSS: the template's clean pages, shared by its clones through the
//! page cache, count once among them).
use super::footprint::{below, parents};
use super::*;
use capsid_runtime::template::{self, TemplateSpec};
use capsid_runtime::{BootPolicy, VmSize};

impl Bench {
    pub(crate) fn warm(&self) -> Scenario {
        let clones = self.args.clones.max(1);
        let mut scenario = Scenario::new(
            "warm",
            &format!(
                "capsid-vmm restored from a template (a guest booted once to \"agent ready\", {MEM_MIB} MiB, 1 vCPU) against the same VM booted: spawn → the agent answers; host PSS per sandbox (VMM and its keeper, guest RAM included) with {clones} of each running at once"
            ),
        );
        let template = match self.template() {
            Ok(dir) => dir,
            Err(e) => {
                self.failed(format!("warm: no template: {e}"));
                return scenario;
            }
        };
        let mut answers = Pair::new(
            "capsid-vmm restored: spawn → agent answers",
            "capsid-vmm booted: spawn → agent answers",
            "ms",
        );
        self.rounds(self.args.runs, "warm", |ours, counted| {
            let vm = agent_vm(ours.then_some(template.as_path()));
            if counted {
                answers.of(ours).samples.push(ms(vm.ready_after));
            }
            vm.shutdown();
        });
        answers.into(
            &mut scenario,
            "spawn → agent answers, restored against booted",
        );

        let mut pss = Pair::new(
            format!("capsid-vmm restored: PSS per sandbox, {clones} running"),
            format!("capsid-vmm booted: PSS per sandbox, {clones} running"),
            "MiB",
        );
        for ours in [true, false] {
            let vms: Vec<AgentVm> = (0..clones)
                .map(|_| agent_vm(ours.then_some(template.as_path())))
                .collect();
            // Let the guests settle before measuring them.
            std::thread::sleep(Duration::from_secs(2));
            let table = parents();
            let total: u64 = vms
                .iter()
                .flat_map(|vm| below(&table, vm.vm.pid()))
                .filter_map(pss_kib)
                .sum();
            pss.of(ours).samples.push(mib(total) / clones as f64);
            for vm in vms {
                vm.shutdown();
            }
        }
        pss.into(&mut scenario, "PSS per sandbox, restored against booted");
        scenario
    }

    /// The template of the `warm` scenario's VMs, made in the bench's
    /// scratch directory (so that the measured ones restore a fresh one).
    fn template(&self) -> Result<PathBuf, String> {
        let scratch = ScratchDir::new("capsid-bench-template").map_err(|e| e.to_string())?;
        let spec = AgentVm::vm_spec(&scratch, 1, MEM_MIB);
        let on_retry = |why: &str| eprintln!("capsid-bench: template: {why}");
        let policy = BootPolicy {
            wait: TIMEOUT,
            io_timeout: TIMEOUT,
            retries: 1,
            interrupted: &|| false,
            on_retry: &on_retry,
        };
        template::ensure(
            &self.scratch.join("templates"),
            &self.scratch.join("template-run"),
            &TemplateSpec {
                boot: &spec.boot,
                size: VmSize {
                    vcpus: 1,
                    memory_mib: MEM_MIB,
                },
                slots: 1,
                confinement: spec.confinement.clone(),
            },
            &policy,
        )
        .map_err(|e| capsid_base::error_chain(&e))
    }
}

/// An agent VM with one spare slot and no disk: restored from `template`,
/// or booted.
fn agent_vm(template: Option<&Path>) -> AgentVm {
    let scratch = ScratchDir::new("capsid-bench-warm").expect("scratch dir");
    let mut spec = AgentVm::vm_spec(&scratch, 1, MEM_MIB);
    spec.disks.clear();
    spec.spare_disks = 1;
    spec.restore = template.map(Path::to_owned);
    let name = if template.is_some() {
        "restored"
    } else {
        "booted"
    };
    AgentVm::launch(name, &spec, scratch)
}
