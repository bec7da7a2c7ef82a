//! `run`: `capsid run -- true` and `-- echo hi`, against `runc run` on the
//! same rootfs.
use super::*;

impl Bench {
    pub(crate) fn run(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "run",
            "`capsid run --rootfs DIR -- CMD` (a fresh micro-VM each time) against `runc run` of a bundle over the same rootfs",
        );
        let mut exit_true = Pair::new(
            "capsid run -- true: → exit",
            "runc run -- true: → exit",
            "ms",
        );
        let mut first_hi = Pair::new(
            "capsid run -- echo hi: → first byte",
            "runc run -- echo hi: → first byte",
            "ms",
        );
        let mut exit_hi = Pair::new(
            "capsid run -- echo hi: → exit",
            "runc run -- echo hi: → exit",
            "ms",
        );
        self.rounds(self.args.runs, "run", |ours, counted| {
            let t = timed(&mut self.sandbox(ours, &["true"]));
            let h = timed(&mut self.sandbox(ours, &["echo", "hi"]));
            let ok = self.ok(&format!("{} true", who(ours)), &t, None)
                & self.ok(&format!("{} echo hi", who(ours)), &h, Some(3));
            if ok && counted {
                exit_true.of(ours).samples.push(ms(t.exit));
                first_hi.of(ours).samples.push(ms(h.to_output()));
                exit_hi.of(ours).samples.push(ms(h.exit));
            }
        });
        exit_true.into(&mut scenario, "true → exit");
        first_hi.into(&mut scenario, "echo hi → first byte");
        exit_hi.into(&mut scenario, "echo hi → exit");
        scenario
    }
}
