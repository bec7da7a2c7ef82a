//! `ctr`: `ctr run --rm` through our shim, against containerd's runc shim
//! running runc, and running gVisor's runsc (`--runc-binary`, as Docker
//! runs it).
use super::*;

impl Bench {
    pub(crate) fn ctr(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "ctr",
            "`ctr run --rm IMAGE ID echo hi` through one private containerd, with our shim and with runc's (io.containerd.runc.v2) running runc, and running gVisor's runsc",
        );
        let containerd = Containerd::start();
        let runtimes = self.runtimes();
        let mut first = Among::new(
            &runtimes,
            |r| format!("ctr run ({}): → first byte", r.name()),
            "ms",
        );
        let mut exit = Among::new(
            &runtimes,
            |r| format!("ctr run --rm ({}): → exit", r.name()),
            "ms",
        );
        self.rounds_among(&runtimes, self.args.runs, "ctr", |runtime, counted| {
            let id = self.unique("ctr");
            let mut args: Vec<String> = ["run", "--rm", "--snapshotter", "native"]
                .map(String::from)
                .into();
            args.extend(self.ctr_runtime_of(runtime));
            args.extend([BUSYBOX, id.as_str(), "echo", "hi"].map(String::from));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let t = timed(&mut containerd.ctr_command(&args));
            if self.ok(&format!("ctr {}", args.join(" ")), &t, Some(3)) && counted {
                first.of(runtime).samples.push(ms(t.to_output()));
                exit.of(runtime).samples.push(ms(t.exit));
            }
        });
        containerd.assert_no_leftovers();
        first.into(&mut scenario, "→ first byte");
        exit.into(&mut scenario, "→ exit");
        scenario
    }
}
