//! Starting a container process: everything of the OCI process spec is
//! checked and converted before the fork ([`ProcessPlan`], `plan.rs`); the
//! forked child execs the agent again as `capsid-init` (`spawn.rs`), so the
//! set-up runs in a fresh single-threaded process with none of the agent's
//! memory, as runc re-executes itself as `runc init`; that process applies
//! the plan and stops before exec until the host says start (`child.rs`).
//! `fds.rs` passes descriptors around.
//!
//! ```text
//!  agent                                   child
//!  ─────                                   ─────
//!  plan (spec checked, seccomp compiled),
//!  written to a memfd
//!  thread: unshare/setns PID ns, fork ──▶  fds 0-2, 3 = status, 4 = start,
//!                                          5 = plan, 6 = init's pidfd (exec)
//!                                          execveat(the agent, "capsid-init")
//!                                          non-dumpable; read the plan;
//!                                          setsid, join cgroup, namespaces,
//!                                          rootfs (init only), pty opened in
//!                                          the container's /dev/pts
//!  read status ◀── "R" + pty master ───   wait on fd 4
//!              (or "E<why>")
//!  StartProcess: write fd 4 ──────────▶   rlimits, groups, gid, uid, caps,
//!                                          umask, cwd, no_new_privs, seccomp,
//!  read status to EOF ◀── EOF (or "E",   execve (fds 3-6 close on exec)
//!                     "N": no program, "X": not executable, + why)
//! ```

use std::io;

mod child;
mod fds;
mod plan;
mod spawn;

use child::INIT_NAME_C;
pub use child::{INIT_NAME, main as init_main};
pub use fds::{pidfd_signal, setns_pidfd};
pub use plan::ProcessPlan;
pub use spawn::{ChildPlan, Namespaces, Share, SpawnRequest, Spawned, StartGate, spawn};

/// Why a process could not be made or started.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The spec asks for something invalid.
    #[error("{0}")]
    Invalid(String),
    /// Its seccomp profile does not compile.
    #[error("{0}")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The child failed during set-up, in its words.
    #[error("container process setup failed: {0}")]
    Child(String),
    /// The program to execute is not there.
    #[error("{0}")]
    ProgramNotFound(String),
    /// The program is there but cannot be executed.
    #[error("{0}")]
    ProgramNotExecutable(String),
    /// A call of the agent's failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> ProcessError {
    move |source| ProcessError::Io { what, source }
}
