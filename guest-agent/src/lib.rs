//! `capsid-agent`, the library behind the binary: PID 1 of a capsid guest
//! (see `main.rs` for the order it starts in). A library so that its
//! parsers and planners are fuzzed and tested from outside.

pub mod cgroup;
pub mod config;
pub mod container;
pub mod devices;
pub mod init;
pub mod process;
pub mod reaper;
pub mod rootfs;
pub mod rpc;
pub mod seccomp;
pub mod stdio;
pub mod syscall;
pub mod vsock;
