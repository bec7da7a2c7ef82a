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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    fn notify_is_refused_with_a_reason() {
        let profile: LinuxSeccomp =
            serde_json::from_str(r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#).unwrap();
        let err = compile(&profile).unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
    }
}
