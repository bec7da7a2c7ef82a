//! The OCI process spec, checked and converted before the fork: what the
//! child applies, in a form it can take through a file ([`ProcessPlan`]
//! is serialised to the re-executed child).

use std::collections::HashSet;
use std::ffi::CString;
use std::path::PathBuf;
use std::str::FromStr;

use caps::Capability;
use oci_spec::runtime::Process;
use serde::{Deserialize, Serialize};

use super::ProcessError;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CapsPlan {
    pub(crate) bounding: HashSet<Capability>,
    pub(crate) effective: HashSet<Capability>,
    pub(crate) permitted: HashSet<Capability>,
    pub(crate) inheritable: HashSet<Capability>,
    pub(crate) ambient: HashSet<Capability>,
}

impl CapsPlan {
    /// No capability in any set.
    pub fn none() -> Self {
        Self {
            bounding: HashSet::new(),
            effective: HashSet::new(),
            permitted: HashSet::new(),
            inheritable: HashSet::new(),
            ambient: HashSet::new(),
        }
    }
}

/// The OCI process, checked and converted for the child.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessPlan {
    pub(crate) args: Vec<CString>,
    pub(crate) env: Vec<CString>,
    pub(crate) path: String,
    pub(crate) cwd: PathBuf,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) additional_gids: Vec<u32>,
    pub(crate) umask: Option<u32>,
    pub(crate) rlimits: Vec<(u32, u64, u64)>,
    pub(crate) caps: CapsPlan,
    pub(crate) no_new_privs: bool,
    pub(crate) seccomp: Option<crate::seccomp::SeccompProgram>,
    pub(crate) terminal: bool,
    /// `process.oomScoreAdj`, which the agent writes for the process
    /// before it execs (it inherits to the workload's children).
    pub(crate) oom_score_adj: Option<i32>,
}

fn cstrings(what: &str, items: &[String]) -> Result<Vec<CString>, ProcessError> {
    items
        .iter()
        .map(|s| {
            CString::new(s.as_bytes())
                .map_err(|_| ProcessError::Invalid(format!("{what} {s:?} contains a NUL byte")))
        })
        .collect()
}

fn capability_set(
    set: &Option<HashSet<oci_spec::runtime::Capability>>,
) -> Result<HashSet<Capability>, ProcessError> {
    set.iter()
        .flatten()
        .map(|cap| {
            let name = serde_json::to_value(cap)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            Capability::from_str(&name)
                .map_err(|_| ProcessError::Invalid(format!("unknown capability {name:?}")))
        })
        .collect()
}

fn rlimit_resource(name: &str) -> Option<u32> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

impl ProcessPlan {
    /// Checks an OCI `process` (and the container's seccomp profile) and
    /// turns it into what the child applies: every name resolved, every
    /// value checked, before anything is forked.
    pub fn from_oci(
        process: &Process,
        seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
    ) -> Result<Self, ProcessError> {
        let args = process.args().clone().unwrap_or_default();
        if args.is_empty() || args[0].is_empty() {
            return Err(ProcessError::Invalid("process.args is empty".into()));
        }
        let env = process.env().clone().unwrap_or_default();
        if let Some(bad) = env.iter().find(|e| !e.contains('=')) {
            return Err(ProcessError::Invalid(format!(
                "environment entry {bad:?} is not KEY=VALUE"
            )));
        }
        let path = env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_owned();
        let cwd = process.cwd().clone();
        if !cwd.is_absolute() {
            return Err(ProcessError::Invalid(format!(
                "process.cwd {} is not absolute",
                cwd.display()
            )));
        }
        let user = process.user();
        let mut rlimits = Vec::new();
        for rlimit in process.rlimits().iter().flatten() {
            let name = serde_json::to_value(rlimit.typ())
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let resource = rlimit_resource(&name)
                .ok_or_else(|| ProcessError::Invalid(format!("unknown rlimit {name:?}")))?;
            if rlimit.soft() > rlimit.hard() {
                return Err(ProcessError::Invalid(format!(
                    "{name}: soft limit {} is above hard limit {}",
                    rlimit.soft(),
                    rlimit.hard()
                )));
            }
            rlimits.push((resource, rlimit.soft(), rlimit.hard()));
        }
        // A spec that names no capabilities gets none (runc's rule): the
        // agent is root with every capability, and nothing of that may pass
        // to a process by omission.
        let caps = match process.capabilities() {
            Some(c) => CapsPlan {
                bounding: capability_set(c.bounding())?,
                effective: capability_set(c.effective())?,
                permitted: capability_set(c.permitted())?,
                inheritable: capability_set(c.inheritable())?,
                ambient: capability_set(c.ambient())?,
            },
            None => CapsPlan::none(),
        };
        if process
            .apparmor_profile()
            .as_deref()
            .is_some_and(|p| !p.is_empty())
            || process
                .selinux_label()
                .as_deref()
                .is_some_and(|p| !p.is_empty())
        {
            tracing::warn!("AppArmor and SELinux labels are ignored (the guest has neither)");
        }
        let oom_score_adj = process.oom_score_adj();
        if let Some(adj) = oom_score_adj
            && !(-1000..=1000).contains(&adj)
        {
            return Err(ProcessError::Invalid(format!(
                "process.oomScoreAdj {adj} is not within -1000 to 1000"
            )));
        }
        Ok(Self {
            args: cstrings("argument", &args)?,
            env: cstrings("environment entry", &env)?,
            path,
            cwd,
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            umask: user.umask(),
            rlimits,
            caps,
            no_new_privs: process.no_new_privileges().unwrap_or(false),
            seccomp: seccomp
                .map(|profile| crate::seccomp::COMPILED.program(profile))
                .transpose()?,
            terminal: process.terminal().unwrap_or(false),
            oom_score_adj,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(json: &str) -> Process {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_full_process_spec_converts() {
        let plan = ProcessPlan::from_oci(
            &process(
                r#"{"args": ["sh", "-c", "id"], "cwd": "/tmp", "terminal": true,
                    "env": ["A=1", "PATH=/bin:/usr/bin"],
                    "user": {"uid": 1000, "gid": 1000, "additionalGids": [2000], "umask": 63},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200}],
                    "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL"],
                                     "permitted": ["CAP_KILL"], "ambient": ["CAP_KILL"]},
                    "noNewPrivileges": true, "oomScoreAdj": -500}"#,
            ),
            None,
        )
        .unwrap();
        assert_eq!(plan.oom_score_adj, Some(-500));
        assert_eq!(plan.path, "/bin:/usr/bin");
        assert_eq!(
            (plan.uid, plan.gid, plan.additional_gids.clone()),
            (1000, 1000, vec![2000])
        );
        assert_eq!(plan.umask, Some(63));
        assert_eq!(plan.rlimits, vec![(libc::RLIMIT_NOFILE, 100, 200)]);
        let caps = &plan.caps;
        assert_eq!(caps.bounding.len(), 2);
        assert!(caps.ambient.contains(&Capability::CAP_KILL));
        assert!(plan.no_new_privs && plan.terminal);
    }

    #[test]
    fn a_process_without_capabilities_gets_none() {
        // Before the fix a spec that named no capabilities left the child
        // with the agent's full set: root in the container was root in the
        // guest.
        let plan = ProcessPlan::from_oci(
            &process(r#"{"args": ["id"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#),
            None,
        )
        .unwrap();
        let caps = &plan.caps;
        for set in [
            &caps.bounding,
            &caps.effective,
            &caps.permitted,
            &caps.inheritable,
            &caps.ambient,
        ] {
            assert!(set.is_empty(), "{caps:?}");
        }
    }

    #[test]
    fn bad_process_specs_are_refused_with_the_reason() {
        for (json, reason) in [
            (
                r#"{"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#,
                "args is empty",
            ),
            (
                r#"{"args": ["x"], "cwd": "rel", "user": {"uid": 0, "gid": 0}}"#,
                "not absolute",
            ),
            (
                r#"{"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["NOEQUALS"]}"#,
                "KEY=VALUE",
            ),
            (
                r#"{"args": ["x\u0000y"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#,
                "NUL",
            ),
            (
                r#"{"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 2, "hard": 1}]}"#,
                "above hard",
            ),
            (
                r#"{"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "oomScoreAdj": 1001}"#,
                "oomScoreAdj 1001 is not within -1000 to 1000",
            ),
        ] {
            let err = ProcessPlan::from_oci(&process(json), None).unwrap_err();
            assert!(err.to_string().contains(reason), "{json}: {err}");
        }
    }
}
