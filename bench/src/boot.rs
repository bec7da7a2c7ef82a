//! `boot`: capsid-vmm spawn → the test init's ready line (and → the agent
//! answers), against QEMU `microvm` with the same kernel and initramfs.
use super::*;

impl Bench {
    pub(crate) fn boot(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "boot",
            "spawn → the test init's ready line on the console (same kernel, initramfs, 1 vCPU, 128 MiB); \
             the VMM's memory outside guest RAM once the guest idles; \
             capsid-vmm's own start → boot marker; spawn → the capsid agent answers on vsock",
        );
        let guest = TestInitGuest::new(&self.scratch, "boot", "marker,hang");
        let mut ready = Pair::new(
            "capsid-vmm: spawn → init ready",
            "QEMU microvm: spawn → init ready",
            "ms",
        );
        let mut marker = Series::new("capsid-vmm: process start → boot marker", "ms", Who::Ours);
        let mut vcpus = Series::new("capsid-vmm: process start → vCPUs running", "ms", Who::Ours);
        let mut agent = Series::new("capsid-vmm + agent: spawn → agent answers", "ms", Who::Ours);
        let mut vmm_rss = Pair::new(
            "capsid-vmm: RSS outside guest RAM",
            "QEMU microvm: RSS outside guest RAM",
            "MiB",
        );
        let mut vmm_pss = Pair::new(
            "capsid-vmm: PSS outside guest RAM",
            "QEMU microvm: PSS outside guest RAM",
            "MiB",
        );
        self.rounds(self.args.runs, "boot", |ours, counted| {
            if ours {
                let mut run = guest.vmm(&self.scratch, None);
                let waited = run
                    .try_wait_for_line(READY, TIMEOUT)
                    .and_then(|(_, to_ready)| {
                        Ok((to_ready, run.try_wait_for_line(IDLE, TIMEOUT)?))
                    });
                let to_ready = match waited {
                    Ok((to_ready, _)) => to_ready,
                    Err(e) => {
                        self.failed(format!("capsid-vmm boot: {}", first_line(&e)));
                        return;
                    }
                };
                let (rss, pss) = memory_outside_guest(run.pid(), u64::from(MEM_MIB) << 10);
                let times = parse_times(&run.log());
                drop(run);
                let vm = AgentVm::boot("bench-agent", 1, MEM_MIB);
                let to_agent = vm.ready_after;
                vm.shutdown();
                if counted {
                    ready.ours.samples.push(ms(to_ready));
                    marker
                        .samples
                        .push(times.marker_us.unwrap_or(0) as f64 / 1000.0);
                    vcpus
                        .samples
                        .push(times.ready_us.unwrap_or(0) as f64 / 1000.0);
                    agent.samples.push(ms(to_agent));
                    vmm_rss.ours.samples.push(mib(rss));
                    vmm_pss.ours.samples.push(mib(pss));
                }
            } else {
                // Until the same idle line, so both are measured settled.
                match guest.qemu(&self.scratch, None, IDLE) {
                    Ok(boot) if counted => {
                        ready.peer.samples.push(ms(boot.to_ready));
                        vmm_rss.peer.samples.push(mib(boot.rss_kib));
                        vmm_pss.peer.samples.push(mib(boot.pss_kib));
                    }
                    Ok(_) => {}
                    Err(e) => self.failed(format!("QEMU boot: {e}")),
                }
            }
        });
        ready.into(&mut scenario, "spawn → init ready");
        vmm_rss.into(&mut scenario, "VMM RSS outside guest RAM");
        vmm_pss.into(&mut scenario, "VMM PSS outside guest RAM");
        scenario.series.extend([marker, vcpus, agent]);
        scenario
    }
}
