//! The contract between `capsid-vmm` and the process that launches it (the
//! runtime): the VM's configuration ([`config`]), what goes over the VMM's
//! API socket, what its exit status means, and what it reports about the
//! host ([`host`], `capsid-vmm --probe`). Both ends use these types, so
//! there is one definition of each.
//!
//! The API socket (`--api-uds PATH`) takes one request per connection, one
//! JSON object on one line each way. An attach carries the image as an open
//! file descriptor (`SCM_RIGHTS` on the request's bytes): the VMM runs
//! confined and cannot open host paths itself.
//!
//! ```text
//! → {"op":"attach","id":"c1"} + fd   ← {"slot":0}
//! → {"op":"detach","id":"c1"}        ← {"slot":0}
//! → {"op":"snapshot"} + 2 fds        ← {"saved_ms":41}
//!                         a failure  ← {"error":"…"}
//! ```
//!
//! A snapshot request carries two files opened for writing, the state file
//! and the memory file, in that order (`capsid_vmm::snapshot`'s
//! `state.json` and `memory`). The VM is paused, saved into them, and ends:
//! the VMM exits with status 0 once the reply is sent. Templates are made
//! this way; a VM is never resumed after its snapshot.

#![warn(missing_docs)]

pub mod config;
pub mod host;

pub use config::{
    DiskConfig, Irqchip, MacAddr, NetConfig, SerialConfig, SyntaxError, VmConfig, VsockConfig,
};
use serde::{Deserialize, Serialize};

/// The guest kernel command line capsid-vmm boots with unless told
/// otherwise; the runtime appends a configuration's `kernel_params` to it.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// The longest request line, newline included.
pub const MAX_REQUEST: usize = 4096;

/// A request on the API socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ApiRequest {
    /// Attach the image whose descriptor comes with the request,
    /// read-only, to a free spare slot, with serial `id`.
    Attach {
        /// The disk's serial (1 to 20 letters, digits, '-', '_', '.').
        id: String,
    },
    /// Detach the image with serial `id`.
    Detach {
        /// The serial it was attached with.
        id: String,
    },
    /// Pause the VM, save it into the state and memory files that come
    /// with the request, and end it.
    Snapshot,
}

impl ApiRequest {
    /// How many descriptors the request carries.
    pub fn descriptors(&self) -> usize {
        match self {
            ApiRequest::Attach { .. } => 1,
            ApiRequest::Detach { .. } => 0,
            ApiRequest::Snapshot => 2,
        }
    }
}

/// The most descriptors a request carries (a snapshot's two files).
pub const MAX_DESCRIPTORS: usize = 2;

/// The answer to an [`ApiRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ApiResponse {
    /// Done: the slot that changed.
    Slot {
        /// Index among the spare slots.
        slot: usize,
    },
    /// The snapshot is written; the VM ends.
    Saved {
        /// How long the VM was paused for it, in milliseconds.
        saved_ms: u64,
    },
    /// Refused, and why.
    Error {
        /// A sentence for the operator.
        error: String,
    },
}

/// `capsid-vmm`'s exit status: the guest shut down or rebooted.
pub const EXIT_GUEST_SHUTDOWN: i32 = 0;
/// The VMM failed (bad configuration, KVM unavailable, runtime failure).
pub const EXIT_VMM_ERROR: i32 = 1;
/// Bad command-line arguments (clap's status).
pub const EXIT_USAGE: i32 = 2;
/// The guest crashed: triple fault, KVM internal or entry error.
pub const EXIT_GUEST_CRASH: i32 = 3;
/// Stopped by signal N: this plus N (SIGTERM: 143).
pub const EXIT_SIGNAL_BASE: i32 = 128;

/// What an exit status of `capsid-vmm` means, for a message.
pub fn exit_meaning(code: i32) -> Option<&'static str> {
    Some(match code {
        EXIT_GUEST_SHUTDOWN => {
            "the guest shut down or rebooted by itself, as a kernel panic does, or the VM was snapshotted"
        }
        EXIT_VMM_ERROR => "a VMM error",
        EXIT_USAGE => "bad command-line arguments",
        EXIT_GUEST_CRASH => "the guest crashed, a triple fault or a KVM error",
        c if c > EXIT_SIGNAL_BASE && c < EXIT_SIGNAL_BASE + 65 => "stopped by a signal",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_fields_are_refused() {
        let attach = ApiRequest::Attach { id: "c1".into() };
        let line = serde_json::to_string(&attach).unwrap();
        assert_eq!(line, r#"{"op":"attach","id":"c1"}"#);
        assert_eq!(serde_json::from_str::<ApiRequest>(&line).unwrap(), attach);
        assert!(
            serde_json::from_str::<ApiRequest>(r#"{"op":"attach","id":"c","path":"/x"}"#).is_err()
        );
        let reply: ApiResponse = serde_json::from_str(r#"{"slot":2}"#).unwrap();
        assert_eq!(reply, ApiResponse::Slot { slot: 2 });
        let snapshot = serde_json::to_string(&ApiRequest::Snapshot).unwrap();
        assert_eq!(snapshot, r#"{"op":"snapshot"}"#);
        let reply: ApiResponse = serde_json::from_str(r#"{"saved_ms":41}"#).unwrap();
        assert_eq!(reply, ApiResponse::Saved { saved_ms: 41 });
        assert!(serde_json::from_str::<ApiResponse>(r#"{"error":"no"}"#).is_ok());
    }

    #[test]
    fn exit_statuses_have_one_meaning() {
        assert_eq!(
            exit_meaning(3),
            Some("the guest crashed, a triple fault or a KVM error")
        );
        assert_eq!(exit_meaning(143), Some("stopped by a signal"));
        assert_eq!(exit_meaning(42), None);
    }
}
