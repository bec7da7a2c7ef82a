//! OCI hooks that run on the host, as runc runs them: each hook's program
//! with its arguments and environment, the container's state as JSON on
//! its stdin, within its timeout.
//!
//! ```text
//!  create: VM booted, container created ─▶ prestart, createRuntime
//!      (a failure fails create, which then leaves nothing)
//!  start: the init started                ─▶ poststart (a failure warns)
//!  delete: the VM gone                    ─▶ poststop (a failure warns)
//! ```
//!
//! `createContainer` and `startContainer` hooks run in the container's
//! namespaces, which are inside the guest, where a host program cannot
//! run: a spec with them is refused at create, with that reason.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Spec};

/// A hook's bound when it sets none (the spec's "no timeout" would let one
/// hook hold `create` forever).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of a hook's stderr an error quotes.
const STDERR_TAIL: u64 = 4096;

/// When hooks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Deprecated, at the same point as `createRuntime`, before it.
    Prestart,
    /// The container was created, before `create` returns.
    CreateRuntime,
    /// The init was started, before `start` returns.
    Poststart,
    /// The container was deleted.
    Poststop,
}

impl Phase {
    /// Its name in the spec's `hooks`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Prestart => "prestart",
            Self::CreateRuntime => "createRuntime",
            Self::Poststart => "poststart",
            Self::Poststop => "poststop",
        }
    }

    fn hooks(self, spec: &Spec) -> &[Hook] {
        let hooks = spec.hooks().as_ref();
        let list = match self {
            Self::Prestart => hooks.and_then(|h| h.prestart().as_ref()),
            Self::CreateRuntime => hooks.and_then(|h| h.create_runtime().as_ref()),
            Self::Poststart => hooks.and_then(|h| h.poststart().as_ref()),
            Self::Poststop => hooks.and_then(|h| h.poststop().as_ref()),
        };
        list.map(Vec::as_slice).unwrap_or_default()
    }
}

/// A hook that could not run, or failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// A hook capsid cannot run where the spec says it runs.
    #[error(
        "hooks.{0}: these hooks run in the container's namespaces, which are inside the \
         micro-VM, where a host program cannot run; remove them from the spec"
    )]
    InTheGuest(&'static str),
    /// The hook is malformed.
    #[error("hooks.{phase}[{index}]: {problem}")]
    Invalid {
        /// Its phase's name.
        phase: &'static str,
        /// Its place in the list.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// The program could not be started.
    #[error("hooks.{phase}[{index}] ({path}): cannot run it")]
    Spawn {
        /// Its phase's name.
        phase: &'static str,
        /// Its place in the list.
        index: usize,
        /// Its program.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited with an error, was killed, or ran past its timeout.
    #[error("hooks.{phase}[{index}] ({path}) {outcome}{stderr}")]
    Failed {
        /// Its phase's name.
        phase: &'static str,
        /// Its place in the list.
        index: usize,
        /// Its program.
        path: String,
        /// How it ended.
        outcome: String,
        /// The end of what it wrote on stderr, quoted, or empty.
        stderr: String,
    },
}

/// Refuses a spec with hooks capsid cannot run (`createContainer`,
/// `startContainer`): before anything is made.
pub fn check(spec: &Spec) -> Result<(), HookError> {
    let Some(hooks) = spec.hooks() else {
        return Ok(());
    };
    if hooks
        .create_container()
        .as_ref()
        .is_some_and(|h| !h.is_empty())
    {
        return Err(HookError::InTheGuest("createContainer"));
    }
    if hooks
        .start_container()
        .as_ref()
        .is_some_and(|h| !h.is_empty())
    {
        return Err(HookError::InTheGuest("startContainer"));
    }
    for phase in [
        Phase::Prestart,
        Phase::CreateRuntime,
        Phase::Poststart,
        Phase::Poststop,
    ] {
        for (index, hook) in phase.hooks(spec).iter().enumerate() {
            let invalid = |problem: &str| HookError::Invalid {
                phase: phase.name(),
                index,
                problem: problem.to_owned(),
            };
            if !hook.path().is_absolute() {
                return Err(invalid("path is not absolute"));
            }
            if hook.timeout().is_some_and(|t| t <= 0) {
                return Err(invalid("timeout is not above 0"));
            }
            if hook.env().iter().flatten().any(|e| !e.contains('=')) {
                return Err(invalid("an env entry is not KEY=VALUE"));
            }
        }
    }
    Ok(())
}

/// Runs the hooks of `phase` in order, each given `state` (the OCI state
/// of the container, as JSON) on its stdin; stops at the first that fails.
pub fn run(spec: &Spec, phase: Phase, state: &serde_json::Value) -> Result<(), HookError> {
    let state = state.to_string();
    for (index, hook) in phase.hooks(spec).iter().enumerate() {
        run_one(hook, phase.name(), index, state.as_bytes())?;
    }
    Ok(())
}

fn run_one(hook: &Hook, phase: &'static str, index: usize, state: &[u8]) -> Result<(), HookError> {
    let path = hook.path().display().to_string();
    let mut command = Command::new(hook.path());
    if let Some(args) = hook.args()
        && let Some((first, rest)) = args.split_first()
    {
        command.arg0(first).args(rest);
    }
    command.env_clear();
    for entry in hook.env().iter().flatten() {
        if let Some((key, value)) = entry.split_once('=') {
            command.env(key, value);
        }
    }
    let cannot_run = |source| HookError::Spawn {
        phase,
        index,
        path: path.clone(),
        source,
    };
    let stderr = tempfile::tempfile().map_err(cannot_run)?;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(stderr.try_clone().map_err(cannot_run)?)
        // Its own process group: a timeout kills what it started too.
        .process_group(0)
        .spawn()
        .map_err(cannot_run)?;
    // From a thread of its own: a hook that does not read its stdin must
    // not block us past its timeout (a state with large annotations fills
    // the pipe). The thread ends with the hook (a broken pipe).
    if let Some(mut stdin) = child.stdin.take() {
        let state = state.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&state);
        });
    }
    let timeout = hook
        .timeout()
        .and_then(|t| u64::try_from(t).ok())
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let deadline = Instant::now() + timeout;
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => break format!("failed: {status}"),
            Ok(None) if Instant::now() >= deadline => {
                if let Ok(group) = i32::try_from(child.id()) {
                    // SAFETY: kill(2) on the process group we made it lead.
                    unsafe { libc::kill(-group, libc::SIGKILL) };
                }
                let _ = child.wait();
                break format!("ran past its timeout of {timeout:?} and was killed");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(source) => return Err(cannot_run(source)),
        }
    };
    Err(HookError::Failed {
        phase,
        index,
        path,
        outcome,
        stderr: stderr_tail(stderr),
    })
}

/// The end of a hook's stderr, as `; it said: …`, or empty.
fn stderr_tail(mut file: std::fs::File) -> String {
    use std::io::Seek;
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(std::io::SeekFrom::Start(length.saturating_sub(STDERR_TAIL)));
    let mut bytes = Vec::new();
    let _ = file.take(STDERR_TAIL).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let text: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect();
    if text.is_empty() {
        String::new()
    } else {
        format!("; it said: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hooks: serde_json::Value) -> Spec {
        let mut spec = serde_json::to_value(Spec::default()).unwrap();
        spec["hooks"] = hooks;
        serde_json::from_value(spec).unwrap()
    }

    #[test]
    fn hooks_get_the_state_on_stdin_their_args_and_env_and_run_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // Writes its argv[0] (the hook's args[0]), $1, its environment's
        // GREETING and its stdin.
        let script = dir.path().join("hook.sh");
        std::fs::write(
            &script,
            format!(
                r#"printf '%s %s %s %s\n' "$(tr '\0' ' ' < /proc/$$/cmdline | cut -d' ' -f1)" "$1" "$GREETING" "$(cat)" >> {}"#,
                out.display()
            ),
        )
        .unwrap();
        let script = script.to_str().unwrap().to_owned();
        let hook = |name: &str| {
            serde_json::json!({"path": "/bin/sh", "args": [name, script, "x"],
                               "env": ["GREETING=hi"]})
        };
        let spec = spec(serde_json::json!({
            "prestart": [hook("first")],
            "createRuntime": [hook("second"), hook("third")],
        }));
        check(&spec).unwrap();
        let state = serde_json::json!({"id": "c1", "status": "created"});
        run(&spec, Phase::Prestart, &state).unwrap();
        run(&spec, Phase::CreateRuntime, &state).unwrap();
        run(&spec, Phase::Poststop, &state).unwrap();
        let written = std::fs::read_to_string(&out).unwrap();
        let expected: Vec<String> = ["first", "second", "third"]
            .iter()
            .map(|n| format!(r#"{n} x hi {{"id":"c1","status":"created"}}"#))
            .collect();
        assert_eq!(written.lines().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn a_failing_or_slow_hook_is_an_error_that_says_which_and_why() {
        let spec = spec(serde_json::json!({
            "createRuntime": [
                {"path": "/bin/true"},
                {"path": "/bin/sh", "args": ["sh", "-c", "echo no network >&2; exit 3"]}
            ],
            "poststart": [{"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}],
        }));
        let state = serde_json::json!({});
        let e = run(&spec, Phase::CreateRuntime, &state)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("hooks.createRuntime[1] (/bin/sh) failed: exit status: 3")
                && e.ends_with("; it said: no network"),
            "{e}"
        );
        let started = Instant::now();
        let e = run(&spec, Phase::Poststart, &state)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ran past its timeout of 1s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn hooks_capsid_cannot_run_or_malformed_ones_are_refused_up_front() {
        let e = check(&spec(
            serde_json::json!({"createContainer": [{"path": "/bin/true"}]}),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("hooks.createContainer: ") && e.contains("inside the micro-VM"));
        assert!(
            check(&spec(
                serde_json::json!({"startContainer": [{"path": "/x"}]})
            ))
            .is_err()
        );
        let e = check(&spec(serde_json::json!({"poststop": [{"path": "rel"}]})))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "hooks.poststop[0]: path is not absolute");
        let e = check(&spec(
            serde_json::json!({"prestart": [{"path": "/bin/true", "timeout": 0}]}),
        ))
        .unwrap_err()
        .to_string();
        assert_eq!(e, "hooks.prestart[0]: timeout is not above 0");
        assert!(check(&Spec::default()).is_ok());
    }
}
