//! `run`: `capsid run -- true` and `-- echo hi`, against `runc run` and
//! gVisor's `runsc run` on the same rootfs.
use super::*;

impl Bench {
    pub(crate) fn run(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "run",
            "`capsid run --rootfs DIR -- CMD` (a fresh micro-VM each time, restored from its template; and booted, --cold) against `runc run` and gVisor's `runsc --network=none run` of a bundle over the same rootfs",
        );
        let runtimes = self.runtimes();
        let program = |r: Runtime| match r {
            Runtime::Capsid => "capsid",
            Runtime::Runc => "runc",
            Runtime::Gvisor => "runsc",
        };
        let mut exit_true = Among::new(
            &runtimes,
            |r| format!("{} run -- true: → exit", program(r)),
            "ms",
        );
        let mut first_hi = Among::new(
            &runtimes,
            |r| format!("{} run -- echo hi: → first byte", program(r)),
            "ms",
        );
        let mut exit_hi = Among::new(
            &runtimes,
            |r| format!("{} run -- echo hi: → exit", program(r)),
            "ms",
        );
        // Ours boots cold too in each of its turns: warm start's gain,
        // measured in the same rounds.
        let mut cold_true = Series::new("capsid run --cold -- true: → exit", "ms", Who::Ours);
        self.rounds_among(&runtimes, self.args.runs, "run", |runtime, counted| {
            let t = timed(&mut self.sandbox_of(runtime, &["true"]));
            let h = timed(&mut self.sandbox_of(runtime, &["echo", "hi"]));
            let ok = self.ok(&format!("{} true", runtime.name()), &t, None)
                & self.ok(&format!("{} echo hi", runtime.name()), &h, Some(3));
            if ok && counted {
                exit_true.of(runtime).samples.push(ms(t.exit));
                first_hi.of(runtime).samples.push(ms(h.to_output()));
                exit_hi.of(runtime).samples.push(ms(h.exit));
            }
            if runtime == Runtime::Capsid {
                let cold = timed(&mut self.capsid_run_with(&["--cold".into()], &["true"]));
                if self.ok("capsid --cold true", &cold, None) && counted {
                    cold_true.samples.push(ms(cold.exit));
                }
            }
        });
        exit_true.into(&mut scenario, "true → exit");
        first_hi.into(&mut scenario, "echo hi → first byte");
        exit_hi.into(&mut scenario, "echo hi → exit");
        if let Some(warm) = scenario
            .series
            .iter()
            .find(|s| s.name == "capsid run -- true: → exit")
        {
            scenario.comparisons.push(Comparison {
                what: "true → exit, warm start against a cold boot".into(),
                ours: warm.name.clone(),
                peer: cold_true.name.clone(),
                ratio: warm.p(50) / cold_true.p(50),
            });
        }
        scenario.series.push(cold_true);
        scenario
    }
}
