//! The protocol between the host (shim, CLI, tests) and `capsid-agent`, PID 1
//! of the guest. One crate owns it so both sides agree by construction.
//!
//! Every connection is a hybrid-vsock stream to the agent's port. Its first
//! frame is a [`Hello`] that says what the connection is for:
//!
//! ```text
//!  host                                   agent (guest, vsock port capsid.port)
//!  ── control connection ──────────────────────────────────────────────────
//!  Hello::Control{version}           ──▶
//!                                    ◀──  Response::Hello{version, agent}
//!  Request (CreateContainer, …)      ──▶
//!                                    ◀──  Response (one per request, in order)
//!  ── stdio connection (one per stream of one process) ────────────────────
//!  Hello::Stdio{container, exec, stream} ──▶
//!                                    ◀──  Response::Ok        then plain bytes:
//!  stdin: host → process, host half-close = EOF for the process
//!  stdout/stderr: process → host, EOF when every writer has closed
//!  ── archive connection (capsid run --output) ────────────────────────────
//!  Hello::Archive{container_id, path} ──▶
//!                                    ◀──  Response::Ok        then a tar
//!                                         stream of that directory, EOF
//! ```
//!
//! Frames are a 4-byte big-endian length and a JSON body ([`codec`]), at most
//! [`MAX_FRAME_BYTES`]; both sides check the length before allocating.
//! Requests on one connection are served in order, so a call that blocks
//! (`WaitProcess`) goes on a connection of its own; stdio never travels in
//! frames, so its throughput is that of the vsock stream.

#![warn(missing_docs)]

pub mod client;
pub mod codec;
pub mod messages;

pub use client::{AgentClient, ClientError};
pub use codec::{CodecError, read_frame, write_frame};
pub use messages::*;

/// Bumped on any change a peer of the other version would misread.
pub const PROTOCOL_VERSION: u32 = 6;
/// The agent's vsock port unless `capsid.port=` says otherwise.
pub const DEFAULT_AGENT_PORT: u32 = 1024;
/// The largest frame either side sends or accepts: an OCI spec with a large
/// environment fits many times over.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;
