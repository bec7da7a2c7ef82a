//! `concurrent`: K `capsid run` at once, against K `runc run` at once.
use super::*;

impl Bench {
    pub(crate) fn concurrent(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "concurrent",
            "K sandboxes started at once (`capsid run -- echo hi` against `runc run`): each one's time to its output, and the time until all had printed",
        );
        for &k in &self.args.concurrency {
            let mut each = Pair::new(
                format!("K={k} capsid: each → output"),
                format!("K={k} runc: each → output"),
                "ms",
            );
            let mut all = Pair::new(
                format!("K={k} capsid: all → output"),
                format!("K={k} runc: all → output"),
                "ms",
            );
            // Fewer rounds: each round is K sandboxes.
            // At least 2, so that one guest dying (rare, nested) cannot
            // leave the "all" series without a sample.
            let rounds = self.args.runs.div_ceil(k.max(1)).max(2);
            self.rounds(rounds, &format!("concurrent K={k}"), |ours, counted| {
                let threads: Vec<_> = (0..k)
                    .map(|_| {
                        let mut command = self.sandbox(ours, &["echo", "hi"]);
                        std::thread::spawn(move || timed(&mut command))
                    })
                    .collect();
                let results: Vec<Timed> = threads
                    .into_iter()
                    .map(|t| t.join().expect("thread"))
                    .collect();
                // A sandbox that failed under the load is counted and its
                // reason kept, not hidden and not fatal.
                let (ok, failed): (Vec<Timed>, Vec<Timed>) =
                    results.into_iter().partition(|t| t.code == Some(0));
                if let Some(first) = failed.first() {
                    self.failures.borrow_mut().push(format!(
                        "K={k}: {} of {k} {} sandboxes failed{}: {}",
                        failed.len(),
                        if ours { "capsid" } else { "runc" },
                        if counted { "" } else { " (warm-up)" },
                        first.stderr.lines().last().unwrap_or("").trim()
                    ));
                }
                if counted {
                    let firsts: Vec<f64> = ok.iter().map(|t| ms(t.to_output())).collect();
                    if failed.is_empty() {
                        all.of(ours)
                            .samples
                            .push(firsts.iter().copied().fold(0.0, f64::max));
                    }
                    each.of(ours).samples.extend(firsts);
                }
            });
            each.into(&mut scenario, &format!("K={k} each → output"));
            all.into(&mut scenario, &format!("K={k} all → output"));
        }
        scenario
    }
}
