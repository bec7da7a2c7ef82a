//! `ctr`: `ctr run --rm` through our shim, against containerd's runc shim.
use super::*;

impl Bench {
    pub(crate) fn ctr(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "ctr",
            "`ctr run --rm IMAGE ID echo hi` through one private containerd, with our shim and with runc's (io.containerd.runc.v2)",
        );
        let containerd = Containerd::start();
        let mut first = Pair::new(
            "ctr run (capsid): → first byte",
            "ctr run (runc): → first byte",
            "ms",
        );
        let mut exit = Pair::new(
            "ctr run --rm (capsid): → exit",
            "ctr run --rm (runc): → exit",
            "ms",
        );
        self.rounds(self.args.runs, "ctr", |ours, counted| {
            let id = self.unique("ctr");
            let mut args = vec!["run", "--rm", "--snapshotter", "native"];
            args.extend(self.ctr_runtime(ours));
            args.extend([BUSYBOX, id.as_str(), "echo", "hi"]);
            let t = timed(&mut containerd.ctr_command(&args));
            if self.ok(&format!("ctr {}", args.join(" ")), &t, Some(3)) && counted {
                first.of(ours).samples.push(ms(t.to_output()));
                exit.of(ours).samples.push(ms(t.exit));
            }
        });
        containerd.assert_no_leftovers();
        first.into(&mut scenario, "→ first byte");
        exit.into(&mut scenario, "→ exit");
        scenario
    }
}
