//! The runtime's seam to a guest agent: every call the sandbox lifecycle
//! makes, as a trait. [`AgentClient`] (the vsock client of
//! `capsid-protocol`) is the real implementation; `crate::fake` (feature `fake`) has one
//! that keeps its state in memory, so the lifecycle and the shim's state
//! machine are tested without a VM (Kata's runtime-rs has the same seam).
//!
//! Every call is bounded by the implementation's deadline except
//! [`Agent::wait_process`], which blocks until the process exits or the VM
//! is gone, on a connection of its own: other calls go on meanwhile.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use capsid_protocol::{
    AgentClient, ClientError, ContainerStats, CreateContainer, ExecProcess, ExitStatus,
    NetworkConfig, ProcessRef, Stream,
};
use oci_spec::runtime::LinuxResources;

/// A guest agent, as the runtime drives it.
pub trait Agent: Send + Sync + std::fmt::Debug {
    /// What the agent said it is (name and version).
    fn describe(&self) -> &str;
    /// Prepares a container and its init process (not started); the
    /// init's pid in the guest.
    fn create_container(&self, request: CreateContainer) -> Result<u32, ClientError>;
    /// Prepares a further process in a created container; its guest pid.
    fn exec_process(&self, request: ExecProcess) -> Result<u32, ClientError>;
    /// Lets a created process run its program.
    fn start_process(&self, process: &ProcessRef) -> Result<(), ClientError>;
    /// Blocks until the process has exited; an error when the VM went.
    fn wait_process(&self, process: &ProcessRef) -> Result<ExitStatus, ClientError>;
    /// Signals the process, or with `all` every process of its container.
    fn signal_process(
        &self,
        process: &ProcessRef,
        signal: i32,
        all: bool,
    ) -> Result<(), ClientError>;
    /// The process's terminal has a new size.
    fn resize_tty(&self, process: &ProcessRef, rows: u16, cols: u16) -> Result<(), ClientError>;
    /// The process's stdin gets EOF.
    fn close_stdin(&self, process: &ProcessRef) -> Result<(), ClientError>;
    /// The container's cgroup counters, as the guest measured them.
    fn stats(&self, container_id: &str) -> Result<ContainerStats, ClientError>;
    /// New cgroup limits for a running container.
    fn update_resources(
        &self,
        container_id: &str,
        resources: LinuxResources,
    ) -> Result<(), ClientError>;
    /// Freezes or thaws every process of the container.
    fn freeze(&self, container_id: &str, frozen: bool) -> Result<(), ClientError>;
    /// The guest pids of the container's processes.
    fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, ClientError>;
    /// Kills what is left of the container and removes it.
    fn remove_container(&self, container_id: &str) -> Result<(), ClientError>;
    /// Gives the guest's interfaces their addresses, MTUs and routes.
    fn configure_network(&self, config: &NetworkConfig) -> Result<(), ClientError>;
    /// Gives a guest restored from a template its own entropy and the time.
    fn refresh(&self, refresh: &capsid_protocol::Refresh) -> Result<(), ClientError>;
    /// Stops everything and reboots the guest (the VMM then exits).
    fn shutdown(&self) -> Result<(), ClientError>;
    /// One standard stream of a created process, as plain bytes; for
    /// stdin, `shutdown(Write)` is EOF.
    fn attach(&self, process: &ProcessRef, stream: Stream) -> Result<UnixStream, ClientError>;
    /// A tar stream of the directory `path` of a container's root file
    /// system, each read bounded by `idle`; its entries are the
    /// container's, to be checked (`capsid_images::output`).
    fn archive(
        &self,
        container_id: &str,
        path: &str,
        idle: Duration,
    ) -> Result<UnixStream, ClientError>;
}

impl Agent for AgentClient {
    fn describe(&self) -> &str {
        self.agent()
    }

    fn create_container(&self, request: CreateContainer) -> Result<u32, ClientError> {
        AgentClient::create_container(self, request)
    }

    fn exec_process(&self, request: ExecProcess) -> Result<u32, ClientError> {
        AgentClient::exec_process(self, request)
    }

    fn start_process(&self, process: &ProcessRef) -> Result<(), ClientError> {
        AgentClient::start_process(self, process)
    }

    fn wait_process(&self, process: &ProcessRef) -> Result<ExitStatus, ClientError> {
        AgentClient::wait_process(self, process)
    }

    fn signal_process(
        &self,
        process: &ProcessRef,
        signal: i32,
        all: bool,
    ) -> Result<(), ClientError> {
        AgentClient::signal_process(self, process, signal, all)
    }

    fn resize_tty(&self, process: &ProcessRef, rows: u16, cols: u16) -> Result<(), ClientError> {
        AgentClient::resize_tty(self, process, rows, cols)
    }

    fn close_stdin(&self, process: &ProcessRef) -> Result<(), ClientError> {
        AgentClient::close_stdin(self, process)
    }

    fn stats(&self, container_id: &str) -> Result<ContainerStats, ClientError> {
        AgentClient::stats(self, container_id)
    }

    fn update_resources(
        &self,
        container_id: &str,
        resources: LinuxResources,
    ) -> Result<(), ClientError> {
        AgentClient::update_resources(self, container_id, resources)
    }

    fn freeze(&self, container_id: &str, frozen: bool) -> Result<(), ClientError> {
        AgentClient::freeze(self, container_id, frozen)
    }

    fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, ClientError> {
        AgentClient::list_processes(self, container_id)
    }

    fn remove_container(&self, container_id: &str) -> Result<(), ClientError> {
        AgentClient::remove_container(self, container_id)
    }

    fn configure_network(&self, config: &NetworkConfig) -> Result<(), ClientError> {
        AgentClient::configure_network(self, config)
    }

    fn refresh(&self, refresh: &capsid_protocol::Refresh) -> Result<(), ClientError> {
        AgentClient::refresh(self, refresh)
    }

    fn shutdown(&self) -> Result<(), ClientError> {
        AgentClient::shutdown(self)
    }

    fn attach(&self, process: &ProcessRef, stream: Stream) -> Result<UnixStream, ClientError> {
        AgentClient::attach(self, process, stream)
    }

    fn archive(
        &self,
        container_id: &str,
        path: &str,
        idle: Duration,
    ) -> Result<UnixStream, ClientError> {
        AgentClient::archive(self, container_id, path, idle)
    }
}
