//! `make demo`: a busybox command in a fresh micro-VM — our kernel, the
//! agent as PID 1, the test image as an erofs disk — with its output and
//! exit code, and how long each step took. (`cocoon run` replaces this with
//! issue 5.)

use std::process::ExitCode;
use std::time::Instant;

use cocoon_e2e::agent::AgentVm;

fn main() -> ExitCode {
    let command = [
        "sh",
        "-c",
        "echo \"hello from $(uname -s) $(uname -r) in a cocoon micro-VM, as $(id -un)\"; \
         echo 'this line goes to stderr' >&2; exit 7",
    ];
    let start = Instant::now();
    let vm = AgentVm::boot("demo", 1, 256);
    eprintln!(
        "demo: agent ready {:.2} s after cocoon-vmm started",
        vm.ready_after.as_secs_f64()
    );
    let run = Instant::now();
    let outcome = vm.run("demo", AgentVm::spec(&command), None);
    eprintln!("demo: $ {}", command.join(" "));
    print!("{}", outcome.stdout_text());
    eprint!("{}", outcome.stderr_text());
    eprintln!(
        "demo: exit code {} (container create → exit {:.2} s; {:.2} s in all)",
        outcome.status.shell_code(),
        run.elapsed().as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    vm.shutdown();
    ExitCode::from(u8::try_from(outcome.status.shell_code()).unwrap_or(1))
}
