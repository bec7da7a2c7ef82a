//! `throughput`: guest stdout → host, and a cold virtio-blk read, against
//! runc's stdout and QEMU's virtio-blk.
use super::*;

impl Bench {
    pub(crate) fn throughput(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "throughput",
            "guest stdout → host (`head -c N /dev/zero`, first byte to end of stream); a cold read of a 64 MiB virtio-blk disk in the guest (1 MiB reads)",
        );
        let bytes = self.args.stdout_bytes.to_string();
        let mut stdout = Pair::new("capsid run: stdout", "runc run: stdout", "MB/s");
        // Fewer rounds: each moves the whole stream.
        let rounds = self.args.runs.clamp(1, 5);
        self.rounds(rounds, "throughput", |ours, counted| {
            let t = timed(&mut self.sandbox(ours, &["head", "-c", bytes.as_str(), "/dev/zero"]));
            let what = format!("{} head -c", who(ours));
            if self.ok(&what, &t, Some(self.args.stdout_bytes)) && counted {
                let rate = t.bytes as f64 / t.streaming.as_secs_f64().max(1e-9) / 1e6;
                stdout.of(ours).samples.push(rate);
            }
        });
        stdout.into(&mut scenario, "stdout MB/s (higher is better)");

        let disk = self.scratch.join("bench-disk.img");
        let data: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&disk, data).expect("write the disk image");
        let guest = TestInitGuest::new(&self.scratch, "blk", "blk-speed:/dev/vda,hang");
        let mut blk = Pair::new(
            "capsid-vmm: virtio-blk cold read",
            "QEMU microvm: virtio-blk cold read",
            "MB/s",
        );
        self.rounds(rounds, "throughput", |ours, counted| {
            let line = if ours {
                let mut run = guest.vmm(&self.scratch, Some(&disk));
                match run.try_wait_for_line("step blk-speed", TIMEOUT) {
                    Ok((line, _)) => line,
                    Err(e) => {
                        self.failed(format!("capsid-vmm blk-speed: {}", first_line(&e)));
                        return;
                    }
                }
            } else {
                match guest.qemu(&self.scratch, Some(&disk), "step blk-speed") {
                    Ok(boot) => boot.line,
                    Err(e) => {
                        self.failed(format!("QEMU blk-speed: {e}"));
                        return;
                    }
                }
            };
            let Some(rate) = blk_rate(&line) else {
                let failure = format!("{} blk-speed: {line}", who(ours));
                eprintln!("capsid-bench: FAILED {failure}");
                self.failures.borrow_mut().push(failure);
                return;
            };
            if counted {
                blk.of(ours).samples.push(rate);
            }
        });
        blk.into(&mut scenario, "virtio-blk MB/s (higher is better)");
        scenario
    }
}

/// `… blk-speed:/dev/vda ok bytes=N us=T` → MB/s.
pub(crate) fn blk_rate(line: &str) -> Option<f64> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some(field("bytes=")? / field("us=")?.max(1.0))
}
