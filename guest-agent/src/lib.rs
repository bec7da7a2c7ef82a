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

/// Locks `mutex`, also when a thread panicked holding it: PID 1 must go
/// on serving the other containers, and the data behind its locks stays
/// consistent between statements.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
