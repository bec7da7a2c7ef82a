//! `footprint`: the shim's and the VMM's memory per sandbox and how many
//! fit, against runc's shim and container, and gVisor's shim and sandbox
//! (its sentry and gofer).
use super::*;

impl Bench {
    pub(crate) fn footprint(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "footprint",
            "host memory per running sandbox (`ctr run -d … sleep`), 64 MiB guests: shim + VMM (its keeper and the VMM in its jail) PSS outside guest RAM, VMM RSS, guest RAM touched; runc's shim + container, and gVisor's shim + sandbox (sentry and gofer), as the peers; then how many 64 MiB sandboxes start before one fails",
        );
        let containerd = Containerd::start();
        let runtimes = self.runtimes();
        let mut pss = Among::new(
            &runtimes,
            |r| match r {
                Runtime::Capsid => "capsid: shim + VMM PSS, guest RAM included".to_owned(),
                Runtime::Runc => "runc: shim + container PSS".to_owned(),
                Runtime::Gvisor => "gVisor: shim + sandbox PSS".to_owned(),
            },
            "MiB",
        );
        let mut ours_outside =
            Series::new("capsid: shim + VMM PSS outside guest RAM", "MiB", Who::Ours);
        let mut vmm_rss = Series::new("capsid-vmm RSS outside guest RAM", "MiB", Who::Ours);
        let mut guest = Series::new("guest RAM touched", "MiB", Who::Ours);
        let mem = format!("io.capsid.memory={DENSITY_MIB}M");
        let start = |id: &str, runtime: Runtime| {
            let mut args: Vec<String> =
                ["run", "-d", "--snapshotter", "native", "--annotation", &mem]
                    .map(String::from)
                    .into();
            args.extend(self.ctr_runtime_of(runtime));
            args.extend([BUSYBOX, id, "sleep", "1000"].map(String::from));
            containerd.ctr(&args.iter().map(String::as_str).collect::<Vec<_>>())
        };
        // Fewer rounds: each sandbox is measured after it settled.
        let rounds = self.args.runs.clamp(1, 5);
        self.rounds_among(&runtimes, rounds, "footprint", |runtime, counted| {
            let id = self.unique("fp");
            let out = start(&id, runtime);
            if !out.status.success() {
                let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                let failure = format!("{} ctr run -d: {why}", runtime.name());
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
            // Everything the shim started: our VMM's keeper and the VMM
            // itself (in its jail), runc's container, or gVisor's sentry
            // and gofer. (Taking the first process named capsid-vmm, as
            // before, measured the keeper, without guest RAM.)
            let shims = pids_with("containerd-shim", &id);
            let table = parents();
            let below: Vec<u32> = shims.iter().flat_map(|&p| below(&table, p)).collect();
            let shim_kib: u64 = shims.iter().filter_map(|&p| pss_kib(p)).sum();
            let below_kib: u64 = below.iter().filter_map(|&p| pss_kib(p)).sum();
            if runtime == Runtime::Capsid {
                let guest_kib = u64::from(DENSITY_MIB) << 10;
                let (rss, outside) = below
                    .iter()
                    .map(|&p| memory_outside_guest(p, guest_kib))
                    .fold((0, 0), |(r, o), (rss, pss)| (r + rss, o + pss));
                let touched = below_kib.saturating_sub(outside);
                if touched == 0 {
                    self.failed(format!(
                        "capsid footprint: none of the {} processes below the shim holds guest RAM",
                        below.len()
                    ));
                } else if counted {
                    pss.ours.samples.push(mib(shim_kib + below_kib));
                    ours_outside.samples.push(mib(shim_kib + outside));
                    vmm_rss.samples.push(mib(rss));
                    guest.samples.push(mib(touched));
                }
            } else if below.is_empty() {
                self.failed(format!(
                    "{} footprint: no process below the shim",
                    runtime.name()
                ));
            } else if counted {
                pss.of(runtime).samples.push(mib(shim_kib + below_kib));
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
            let out = start(&id, Runtime::Capsid);
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

/// Every process's parent: (pid, parent pid).
pub(crate) fn parents() -> Vec<(u32, u32)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // After the command name in parentheses: the state, then the parent.
            let parent = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, parent))
        })
        .collect()
}

/// Every process below `root` in `table` (its children, theirs, …).
pub(crate) fn below(table: &[(u32, u32)], root: u32) -> Vec<u32> {
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            table
                .iter()
                .filter(|&&(pid, p)| p == parent && !found.contains(&pid))
                .map(|&(pid, _)| pid)
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    found.remove(0);
    found
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_a_shim_are_the_vmms_keeper_the_vmm_and_nothing_else() {
        // shim 10 → keeper 11 → VMM 12 (in its jail); 20 is another shim's
        // keeper, 30 an unrelated process. The VMM, which holds guest RAM,
        // is not the first capsid-vmm by pid order when another sandbox's
        // keeper has a lower pid; it is found by ancestry.
        let table = [(20, 1), (10, 1), (11, 10), (12, 11), (21, 20), (30, 1)];
        let mut found = below(&table, 10);
        found.sort_unstable();
        assert_eq!(found, [11, 12]);
        assert!(below(&table, 12).is_empty());
    }

    #[test]
    fn a_cycle_in_a_torn_read_of_proc_does_not_loop() {
        // /proc is read entry by entry, so pids can be reused mid-read.
        let table = [(11, 10), (10, 11)];
        assert_eq!(below(&table, 10), [11]);
    }
}
