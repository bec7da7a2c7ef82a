//! The OCI seccomp profile compiled with libseccomp (the library runc, youki
//! and crun use). Compiled in the agent before the fork, so a bad profile is
//! an error of CreateContainer; loaded in the child just before exec.

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: {0}")]
    Unsupported(String),
    #[error("seccomp: {what}")]
    Library {
        what: String,
        #[source]
        source: libseccomp::error::SeccompError,
    },
}

fn library(
    what: impl Into<String>,
) -> impl FnOnce(libseccomp::error::SeccompError) -> SeccompError {
    let what = what.into();
    move |source| SeccompError::Library { what, source }
}

const EPERM: u32 = libc::EPERM as u32;

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, SeccompError> {
    let errno = i32::try_from(errno.unwrap_or(EPERM)).unwrap_or(libc::EPERM);
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(errno),
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(u16::try_from(errno).unwrap_or(0)),
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        other => {
            return Err(SeccompError::Unsupported(format!(
                "action {other:?} is not supported (no seccomp agent in the guest)"
            )));
        }
    })
}

fn compare(op: LinuxSeccompOperator, value: u64, value_two: Option<u64>) -> (ScmpCompareOp, u64) {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => (ScmpCompareOp::NotEqual, value),
        LinuxSeccompOperator::ScmpCmpLt => (ScmpCompareOp::Less, value),
        LinuxSeccompOperator::ScmpCmpLe => (ScmpCompareOp::LessOrEqual, value),
        LinuxSeccompOperator::ScmpCmpEq => (ScmpCompareOp::Equal, value),
        LinuxSeccompOperator::ScmpCmpGe => (ScmpCompareOp::GreaterEqual, value),
        LinuxSeccompOperator::ScmpCmpGt => (ScmpCompareOp::Greater, value),
        // (arg & value) == valueTwo
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            (ScmpCompareOp::MaskedEqual(value), value_two.unwrap_or(0))
        }
    }
}

/// A compiled filter: classic BPF instructions, 8 bytes each.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeccompProgram(Vec<u8>);

impl SeccompProgram {
    /// Installs the filter on the calling thread (one syscall, nothing
    /// allocated: safe in a forked child).
    pub fn load(&self) -> std::io::Result<()> {
        let filter = libc::sock_fprog {
            len: u16::try_from(self.0.len() / 8)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?,
            filter: self.0.as_ptr().cast_mut().cast(),
        };
        // SAFETY: `filter` points at `len` sock_filter instructions that
        // outlive the call; the kernel copies them.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &raw const filter,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Compiles `profile` to BPF.
pub fn compile(profile: &LinuxSeccomp) -> Result<SeccompProgram, SeccompError> {
    let filter = build(profile)?;
    let memfd = memfd().map_err(|e| SeccompError::Unsupported(format!("memfd: {e}")))?;
    filter
        .export_bpf(&memfd)
        .map_err(library("export the filter"))?;
    let mut bytes = Vec::new();
    use std::io::{Read, Seek};
    let mut file = std::fs::File::from(memfd);
    file.rewind()
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| SeccompError::Unsupported(format!("read the exported filter: {e}")))?;
    if bytes.is_empty() || bytes.len() % 8 != 0 {
        return Err(SeccompError::Unsupported(
            "libseccomp exported no program".into(),
        ));
    }
    Ok(SeccompProgram(bytes))
}

/// Programs compiled before, newest last, at most
/// [`capsid_protocol::MAX_PREPARED_PROFILES`]: what a template VM's agent
/// compiled (`Request::Prepare`) is there for every guest restored from it.
/// The profiles come from the host, never from a container.
#[derive(Debug, Default)]
pub struct Compiled(std::sync::Mutex<Vec<(LinuxSeccomp, SeccompProgram)>>);

impl Compiled {
    /// The program for `profile`: kept, or compiled and kept.
    pub fn program(&self, profile: &LinuxSeccomp) -> Result<SeccompProgram, SeccompError> {
        if let Some((_, program)) = capsid_base::lock(&self.0)
            .iter()
            .find(|(kept, _)| kept == profile)
        {
            return Ok(program.clone());
        }
        let program = compile(profile)?;
        let mut kept = capsid_base::lock(&self.0);
        if kept.len() >= capsid_protocol::MAX_PREPARED_PROFILES {
            kept.remove(0);
        }
        kept.push((profile.clone(), program.clone()));
        Ok(program)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        capsid_base::lock(&self.0).len()
    }
}

/// The agent's compiled programs.
pub static COMPILED: std::sync::LazyLock<Compiled> = std::sync::LazyLock::new(Compiled::default);

fn memfd() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Builds the libseccomp filter for `profile`. Syscall names this libseccomp does not know are
/// skipped, as runc does (profiles list syscalls of newer kernels).
fn build(profile: &LinuxSeccomp) -> Result<ScmpFilterContext, SeccompError> {
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut filter = ScmpFilterContext::new(default).map_err(library("create the filter"))?;
    // The agent sets no_new_privs itself, as the spec asks.
    filter
        .set_ctl_nnp(false)
        .map_err(library("leave no_new_privs to the process spec"))?;
    for arch in profile.architectures().iter().flatten() {
        let arch = match arch {
            Arch::ScmpArchX86_64 => ScmpArch::X8664,
            Arch::ScmpArchX86 => ScmpArch::X86,
            Arch::ScmpArchX32 => ScmpArch::X32,
            // Other architectures cannot run in an x86_64 guest.
            _ => continue,
        };
        if arch != ScmpArch::native() {
            filter
                .add_arch(arch)
                .map_err(library(format!("add architecture {arch:?}")))?;
        }
    }
    for rule in profile.syscalls().iter().flatten() {
        let rule_action = action(rule.action(), rule.errno_ret())?;
        if rule_action == default {
            continue;
        }
        let conditions: Vec<ScmpArgCompare> = rule
            .args()
            .iter()
            .flatten()
            .map(|arg| {
                let (op, datum) = compare(arg.op(), arg.value(), arg.value_two());
                ScmpArgCompare::new(u32::try_from(arg.index()).unwrap_or(u32::MAX), op, datum)
            })
            .collect();
        for name in rule.names() {
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                tracing::debug!(name, "seccomp: unknown syscall skipped");
                continue;
            };
            filter
                .add_rule_conditional(rule_action, syscall, &conditions)
                .map_err(library(format!("rule for {name}")))?;
        }
    }
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_docker_style_profile_compiles() {
        let profile: LinuxSeccomp = serde_json::from_str(
            r#"{
              "defaultAction": "SCMP_ACT_ERRNO",
              "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
              "syscalls": [
                {"names": ["read", "write", "exit_group", "no_such_call"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
              ]
            }"#,
        )
        .unwrap();
        compile(&profile).unwrap();
    }

    #[test]
    fn a_profile_is_compiled_once_and_few_are_kept() {
        let compiled = Compiled::default();
        let profile = |errno: u32| -> LinuxSeccomp {
            serde_json::from_value(serde_json::json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno}]
            }))
            .unwrap()
        };
        let first = compiled.program(&profile(1)).unwrap();
        assert_eq!(compiled.program(&profile(1)).unwrap(), first);
        assert_eq!(compiled.len(), 1);
        assert_ne!(compiled.program(&profile(2)).unwrap(), first);
        for errno in 3..10 {
            compiled.program(&profile(errno)).unwrap();
        }
        assert_eq!(compiled.len(), capsid_protocol::MAX_PREPARED_PROFILES);
        // A bad profile is an error, and nothing is kept of it.
        let bad: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_NOTIFY"
        }))
        .unwrap();
        assert!(compiled.program(&bad).is_err());
    }

    /// Runs `checks` in a forked child under `program` and returns its
    /// exit status: each bit a check that held. The child makes only raw
    /// syscalls (no allocation, no lock) between fork and exit.
    fn in_child_under(program: &SeccompProgram, checks: fn() -> i32) -> i32 {
        // SAFETY: fork; the child below calls only async-signal-safe code.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: prctl with plain integers; then one seccomp syscall
            // (load), raw syscalls and _exit.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if program.load().is_err() {
                    libc::_exit(255);
                }
                libc::_exit(checks());
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` is written.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "the child died: {status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// The errno of a raw syscall that failed, or 0 if it did not.
    fn errno_of(result: libc::c_long) -> i32 {
        if result == -1 {
            // SAFETY: errno is thread-local and always readable.
            unsafe { *libc::__errno_location() }
        } else {
            0
        }
    }

    #[test]
    fn the_filter_allows_refuses_and_sets_errno_as_the_profile_says() {
        // Before: only that it compiled was checked; a filter that
        // allowed everything (or nothing) passed.
        let profile: LinuxSeccomp = serde_json::from_str(
            r#"{
              "defaultAction": "SCMP_ACT_ERRNO",
              "defaultErrnoRet": 38,
              "architectures": ["SCMP_ARCH_X86_64"],
              "syscalls": [
                {"names": ["write", "exit_group", "exit", "getpid"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 4294967295, "op": "SCMP_CMP_EQ"}]}
              ]
            }"#,
        )
        .unwrap();
        let program = compile(&profile).unwrap();
        let held = in_child_under(&program, || {
            let mut held = 0;
            // SAFETY: each call is a raw syscall with plain integer arguments
            // or a static NUL-terminated path; nothing is written to memory.
            unsafe {
                // Allowed: reaches the kernel, which refuses the bad fd.
                if errno_of(libc::syscall(libc::SYS_write, -1, c"x".as_ptr(), 1)) == libc::EBADF {
                    held |= 1;
                }
                if errno_of(libc::syscall(libc::SYS_getpid)) == 0 {
                    held |= 2;
                }
                // Its own errno.
                if errno_of(libc::syscall(
                    libc::SYS_mkdir,
                    c"/nonexistent/x".as_ptr(),
                    0o755,
                )) == libc::EACCES
                {
                    held |= 4;
                }
                // Not listed: the default action's errno.
                if errno_of(libc::syscall(libc::SYS_getppid)) == libc::ENOSYS {
                    held |= 8;
                }
                // Allowed only with the argument the rule names.
                if errno_of(libc::syscall(libc::SYS_personality, 0xffff_ffff_u64)) == 0 {
                    held |= 16;
                }
                if errno_of(libc::syscall(libc::SYS_personality, 0)) == libc::ENOSYS {
                    held |= 32;
                }
            }
            held
        });
        assert_eq!(held, 63, "checks that held: {held:#b} of 0b111111");
    }

    #[test]
    fn notify_is_refused_with_a_reason() {
        let profile: LinuxSeccomp =
            serde_json::from_str(r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#).unwrap();
        let err = compile(&profile).unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
    }
}
