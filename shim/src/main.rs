//! `containerd-shim-capsid-v2`: containerd's runtime v2 shim for capsid.
//!
//! containerd runs this binary three ways (the `-namespace`, `-id`,
//! `-address`, `-bundle` flags come first, the action last):
//!
//! ```text
//!  start   ─▶ pick the shim for this container (one per pod: CRI's sandbox id),
//!             spawn `serve` if it is not running, print its ttrpc address
//!  (serve) ─▶ the ttrpc Task service (service.rs) until Shutdown
//!  delete  ─▶ after a shim died: kill what it left (VMM, scratch dir), print
//!             a DeleteResponse
//! ```
//!
//! Bootstrap is ours rather than `containerd_shim::run`: that one answers
//! only containerd 2's task API v3 and start reply, while Debian's containerd
//! (1.6) speaks v2 and reads a bare address. The service is registered under
//! both names, and the crate's protos, publisher, flags and logger are used.

mod container;
mod rootfs;
mod service;
mod stdio;
mod trans;

use std::io::Write;
use std::os::fd::IntoRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::shim_ttrpc::create_task;
use containerd_shim::protos::ttrpc::Server;
use containerd_shim::{Flags, api};
use oci_spec::runtime::Spec;

/// The runtime name containerd knows us by.
const RUNTIME_ID: &str = "io.containerd.capsid.v2";
/// The ttrpc service name of each task API version containerd may call.
const TASK_SERVICES: [&str; 2] = ["containerd.task.v2.Task", "containerd.task.v3.Task"];

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if flags.version {
        println!("{RUNTIME_ID} (capsid {})", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let result = match flags.action.as_str() {
        "start" => start(&flags),
        "delete" => delete(&flags),
        "" => serve(&flags),
        other => Err(anyhow::anyhow!("unknown action {other:?}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            eprintln!("{RUNTIME_ID}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bundle_dir(flags: &Flags) -> PathBuf {
    if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_default()
    } else {
        PathBuf::from(&flags.bundle)
    }
}

/// The shim that serves this container: the pod's, for a CRI container.
fn grouping(flags: &Flags) -> String {
    let spec = Spec::load(bundle_dir(flags).join("config.json")).ok();
    match spec.as_ref().map(capsid_runtime::Role::of) {
        Some(capsid_runtime::Role::PodMember { sandbox_id }) => sandbox_id,
        _ => flags.id.clone(),
    }
}

fn socket_path(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

fn start(flags: &Flags) -> anyhow::Result<()> {
    let address =
        containerd_shim::socket_address(&flags.address, &flags.namespace, &grouping(flags));
    let path = socket_path(&address);
    if UnixStream::connect(path).is_err() {
        let me = std::env::current_exe().context("cannot find my own binary")?;
        let mut command = Command::new(me);
        command
            .args(["-namespace", &flags.namespace, "-id", &flags.id])
            .args(["-address", &flags.address, "-socket", &address])
            .current_dir(bundle_dir(flags))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if flags.debug {
            command.arg("-debug");
        }
        // Its own session: containerd's signals to this short-lived `start`
        // process must not reach the long-lived shim.
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = command.spawn().context("cannot start the shim")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(path).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("the shim exited ({status}) before it listened on {address}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the shim did not listen on {address} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    write_address(&bundle_dir(flags), &address)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(address.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Writes the shim's address to `BUNDLE/address`, whole or not at all: a
/// containerd before 1.7 finds a running shim there when it restarts, and
/// takes a task whose bundle has none for dead (and cleans it up).
fn write_address(bundle: &Path, address: &str) -> anyhow::Result<()> {
    let path = bundle.join("address");
    let partial = bundle.join("address.partial");
    std::fs::write(&partial, address)
        .and_then(|()| std::fs::rename(&partial, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// containerd's cleanup after a shim died: whatever that shim left for this
/// container goes (container::cleanup_leftovers says what).
fn delete(flags: &Flags) -> anyhow::Result<()> {
    container::cleanup_leftovers(&bundle_dir(flags), &flags.id);
    // A shim that died could not remove its socket; a live one (serving
    // the rest of a pod) still answers on it and keeps it.
    let address =
        containerd_shim::socket_address(&flags.address, &flags.namespace, &grouping(flags));
    let path = socket_path(&address);
    if path.exists() && UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let response = api::DeleteResponse {
        exit_status: 128 + 9,
        exited_at: containerd_shim::util::timestamp().ok().into(),
        ..Default::default()
    };
    let mut stdout = std::io::stdout().lock();
    response.write_to_writer(&mut stdout)?;
    stdout.flush()?;
    Ok(())
}

fn serve(flags: &Flags) -> anyhow::Result<()> {
    if flags.socket.is_empty() {
        bail!("no -socket: the shim is started by containerd (action `start`)");
    }
    let config = capsid_runtime::Config::load().context("bad capsid configuration")?;
    if let Err(e) =
        containerd_shim::logger::init(flags.debug, &config.log_level, &flags.namespace, &flags.id)
    {
        eprintln!("{RUNTIME_ID}: no log FIFO, logging to stderr: {e}");
    }
    let ttrpc_address =
        std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set (containerd sets it)")?;
    let publisher = containerd_shim::publisher::RemotePublisher::new(&ttrpc_address)
        .with_context(|| format!("cannot connect to containerd's events at {ttrpc_address}"))?;
    let service = Arc::new(service::Service::new(
        flags.namespace.clone(),
        config,
        ttrpc_address,
        publisher,
    ));

    let path = socket_path(&flags.socket).to_owned();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let mut server = Server::new().add_listener(listener.into_raw_fd())?;
    for name in TASK_SERVICES {
        let task: Arc<dyn containerd_shim::Task + Send + Sync> = service.clone();
        let methods = create_task(task)
            .into_iter()
            .map(|(method, handler)| {
                let method = method.replacen("containerd.task.v3.Task", name, 1);
                (method, handler)
            })
            .collect();
        server = server.register_service(methods);
    }
    server.start()?;
    log::info!("serving {} on {}", flags.id, path.display());

    // SIGTERM/SIGINT: containerd (or an operator) wants us gone; take every
    // VM down first so nothing outlives the shim.
    let on_signal = Arc::clone(&service);
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            log::warn!("signal {signal}: stopping every micro-VM");
            on_signal.shutdown_all();
        }
    });
    service.wait_for_shutdown();
    // Not server.shutdown(): it waits for calls in flight, and one may be
    // stuck on a VM that is gone. Exiting closes every connection.
    drop(server);
    let _ = std::fs::remove_file(&path);
    log::info!("shim exits");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_left_in_the_bundle_for_a_restarted_containerd() {
        let bundle = tempfile::tempdir().unwrap();
        write_address(bundle.path(), "unix:///run/containerd/s/abc").unwrap();
        assert_eq!(
            std::fs::read_to_string(bundle.path().join("address")).unwrap(),
            "unix:///run/containerd/s/abc"
        );
        assert!(!bundle.path().join("address.partial").exists());
        assert!(write_address(&bundle.path().join("gone"), "x").is_err());
    }
}
