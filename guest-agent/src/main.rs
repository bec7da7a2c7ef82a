//! `capsid-agent`: PID 1 of a capsid guest. Prepares the VM, then serves
//! the host over vsock: each connection on its own thread (see `rpc`),
//! one reaper thread for every child (see `reaper`). Run as `capsid-init`
//! (its `argv[0]`), it is a container process being set up (see `process`).

use std::sync::Arc;
use std::thread;
use std::time::Instant;

use capsid_agent::config::AgentConfig;
use capsid_agent::container::Containers;
use capsid_agent::{init, process, rpc, vsock};

fn main() {
    // A container process being set up: the agent executed again by a
    // forked child (see `process`). Nothing of the agent's runs there.
    if std::env::args_os().next().as_deref() == Some(std::ffi::OsStr::new(process::INIT_NAME)) {
        process::init_main();
    }
    let started = Instant::now();
    let pid1 = std::process::id() == 1;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if pid1 {
        // /proc is not there yet: the kernel passes the command line's
        // unknown words as our environment instead, and we read
        // /proc/cmdline properly below once it is mounted.
        if let Err(e) = init::move_root_to_tmpfs().and_then(|()| init::mount_kernel_filesystems()) {
            eprintln!("capsid-agent: cannot prepare the guest: {e}");
            init::reboot();
        }
    }
    let cmdline = if cmdline.is_empty() {
        std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
    } else {
        cmdline
    };
    let (config, problems) = AgentConfig::from_cmdline(&cmdline);
    tracing_subscriber::fmt()
        .with_max_level(config.log_level)
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .with_writer(std::io::stderr)
        .init();
    for problem in problems {
        tracing::warn!("kernel command line: {problem}");
    }
    if let Err(e) = serve(&config, started) {
        tracing::error!("{e}");
    }
    if pid1 {
        init::reboot();
    }
    std::process::exit(1);
}

fn serve(config: &AgentConfig, started: Instant) -> Result<(), String> {
    let sandbox = Arc::new(Containers::default());
    let reaper = sandbox.reaper();
    thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reaper.run())
        .map_err(|e| format!("cannot start the reaper: {e}"))?;
    if let Err(e) = capsid_agent::network::loopback_up() {
        tracing::warn!(
            "cannot bring the loopback interface up: {}",
            capsid_base::error_chain(&e)
        );
    }
    let listener = vsock::VsockListener::bind(config.port)
        .map_err(|e| format!("cannot listen on vsock port {}: {e}", config.port))?;
    init::boot_marker();
    tracing::info!(
        port = config.port,
        startup_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "capsid-agent ready"
    );
    let admission: &'static vsock::Admission =
        Box::leak(Box::new(vsock::Admission::new(vsock::MAX_CONNECTIONS)));
    loop {
        let (connection, cid) = listener
            .accept()
            .map_err(|e| format!("accept on vsock port {}: {e}", config.port))?;
        let ticket = match admission.admit(cid) {
            Ok(ticket) => ticket,
            Err(refusal) => {
                tracing::warn!("{refusal}");
                continue;
            }
        };
        let sandbox = Arc::clone(&sandbox);
        let spawned = thread::Builder::new()
            .name("connection".into())
            .spawn(move || {
                let _ticket = ticket;
                if rpc::serve(connection, sandbox) == rpc::After::Reboot {
                    tracing::info!("shutdown: rebooting");
                    init::reboot();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot serve a connection: {e}");
        }
    }
}
