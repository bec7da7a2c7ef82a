//! The host's side of the protocol: whatever a hostile guest answers, the
//! client's calls end with a value they checked or an error — no panic
//! (a byte-index cut of a multi-byte reply once could), no hang (each call
//! has a deadline), no unbounded allocation.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use capsid_protocol::{
    AgentClient, CreateContainer, ExecProcess, Filesystem, ProcessRef, Rootfs, StdioRequest,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (ours, mut agent) = UnixStream::pair().unwrap();
    // The input is everything the agent says; it then hangs up.
    let _ = agent.write_all(data);
    drop(agent);
    let client = AgentClient::on_stream(ours, Duration::from_millis(200));
    let init = ProcessRef::init("c");
    let _ = client.create_container(CreateContainer {
        id: "c".into(),
        rootfs: Rootfs {
            disk_id: "rootfs".into(),
            filesystem: Filesystem::Erofs,
            overlay: true,
            upper_disk: None,
        },
        spec: Default::default(),
        stdio: StdioRequest::default(),
        files: Vec::new(),
        share: None,
    });
    let _ = client.exec_process(ExecProcess {
        process: ProcessRef::exec("c", "e"),
        spec: Default::default(),
        stdio: StdioRequest::default(),
    });
    let _ = client.start_process(&init);
    let _ = client.stats("c");
    let _ = client.list_processes("c");
    let _ = client.signal_process(&init, 9, false);
    let _ = client.remove_container("c");
});
