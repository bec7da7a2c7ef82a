//! `footprint`: the shim's and the VMM's memory per sandbox and how many
//! fit, against runc's shim and container.
use super::*;

impl Bench {
    pub(crate) fn footprint(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "footprint",
            "host memory per running sandbox (`ctr run -d … sleep`), 64 MiB guests: shim + VMM PSS outside guest RAM, VMM RSS, guest RAM touched; runc's shim + container as the peer; then how many 64 MiB sandboxes start before one fails",
        );
        let containerd = Containerd::start();
        let mut pss = Pair::new(
            "capsid: shim + VMM PSS, guest RAM included",
            "runc: shim + container PSS",
            "MiB",
        );
        let mut ours_outside =
            Series::new("capsid: shim + VMM PSS outside guest RAM", "MiB", Who::Ours);
        let mut vmm_rss = Series::new("capsid-vmm RSS outside guest RAM", "MiB", Who::Ours);
        let mut guest = Series::new("guest RAM touched", "MiB", Who::Ours);
        let mem = format!("io.capsid.memory={DENSITY_MIB}M");
        let start = |id: &str, ours: bool| {
            let mut args = vec!["run", "-d", "--snapshotter", "native", "--annotation", &mem];
            args.extend(self.ctr_runtime(ours));
            args.extend([BUSYBOX, id, "sleep", "1000"]);
            containerd.ctr(&args)
        };
        // Fewer rounds: each sandbox is measured after it settled.
        self.rounds(self.args.runs.clamp(1, 5), "footprint", |ours, counted| {
            let id = self.unique("fp");
            let out = start(&id, ours);
            if !out.status.success() {
                let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                let failure = format!("{} ctr run -d: {why}", who(ours));
                eprintln!("capsid-bench: FAILED {failure}");
                self.failures.borrow_mut().push(failure);
                let _ = containerd.ctr(&["containers", "rm", &id]);
                return;
            }
            assert!(
                out.status.success(),
                "ctr run -d: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // Let the guest settle before measuring it.
            std::thread::sleep(Duration::from_secs(2));
            let shim_kib: u64 = pids_with("containerd-shim", &id)
                .iter()
                .filter_map(|&p| pss_kib(p))
                .sum();
            if ours {
                let vmm = pids_with("capsid-vmm", "");
                let (rss, outside) = vmm.first().map_or((0, 0), |&p| {
                    memory_outside_guest(p, u64::from(DENSITY_MIB) << 10)
                });
                let total = vmm.first().and_then(|&p| pss_kib(p)).unwrap_or(0);
                if counted {
                    pss.ours.samples.push(mib(shim_kib + total));
                    ours_outside.samples.push(mib(shim_kib + outside));
                    vmm_rss.samples.push(mib(rss));
                    guest.samples.push(mib(total.saturating_sub(outside)));
                }
            } else if counted {
                let task = containerd.ctr_ok(&["task", "ls"]);
                let pid = task
                    .lines()
                    .find(|l| l.starts_with(&id))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                pss.peer
                    .samples
                    .push(mib(shim_kib + pid.and_then(pss_kib).unwrap_or(0)));
            }
            remove(&containerd, std::slice::from_ref(&id));
        });
        pss.into(&mut scenario, "host PSS per sandbox, all of it");
        scenario.series.extend([ours_outside, vmm_rss, guest]);

        // Density: 64 MiB sandboxes, one after another, until one fails or the cap.
        let mut started = Vec::new();
        let mut failure = None;
        // Resolved in main (8 nested, 32 native).
        let cap = self.args.density_cap.unwrap_or(8);
        while started.len() < cap {
            let id = self.unique("dense");
            let out = start(&id, true);
            if !out.status.success() {
                failure = Some(String::from_utf8_lossy(&out.stderr).trim().to_owned());
                let _ = containerd.ctr(&["containers", "rm", &id]);
                break;
            }
            started.push(id);
            self.progress.step("density");
        }
        let fitted = started.len();
        scenario.notes.push(match &failure {
            Some(why) => format!("density: {fitted} sandboxes of {DENSITY_MIB} MiB ran at once; the next failed: {why}"),
            None => format!(
                "density: {fitted} sandboxes of {DENSITY_MIB} MiB ran at once, the cap (--density-cap); the host did not run out"
            ),
        });
        remove(&containerd, &started);
        containerd.assert_no_leftovers();
        scenario
    }
}

/// Pids whose program name starts with `name` and whose command line has `with`.
pub(crate) fn pids_with(name: &str, with: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (comm.trim().starts_with(name) && cmdline.contains(with))
                .then(|| e.file_name().to_str()?.parse().ok())
                .flatten()
        })
        .collect()
}

/// Kills, deletes and removes the containers `ids`.
pub(crate) fn remove(containerd: &Containerd, ids: &[String]) {
    for id in ids {
        let _ = containerd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    }
    for id in ids {
        containerd.wait_for_status(id, "STOPPED");
        containerd.ctr_ok(&["task", "delete", id]);
        containerd.ctr_ok(&["containers", "rm", id]);
    }
}
