//! `capsid-agent`, the library behind the binary: PID 1 of a capsid guest
//! (see `main.rs` for the order it starts in). A library so that its
//! parsers and planners are fuzzed and tested from outside.
//!
//! Only what `main.rs`, the fuzz targets and `tests/` use is public (and
//! documented); the cgroup, reaper, seccomp, stdio and `Syscall` modules
//! are the agent's own.

#![warn(missing_docs)]

pub mod archive;
mod cgroup;
pub mod config;
pub mod container;
pub mod devices;
pub mod identity;
pub mod init;
pub mod network;
pub mod process;
mod reaper;
pub mod rootfs;
pub mod rpc;
mod seccomp;
mod stdio;
mod syscall;
pub mod vsock;
