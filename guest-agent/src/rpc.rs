//! One connection from the host: its hello, then its requests in order.
//! Internal errors become protocol error codes here, and only here.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use capsid_base::error_chain;
use capsid_protocol::{
    CodecError, ErrorCode, Hello, PROTOCOL_VERSION, Request, Response, read_frame, write_frame,
};

use crate::container::{ContainerError, Containers};
use crate::network::NetworkError;
use crate::process::ProcessError;
use crate::vsock::VsockStream;

/// How long a new connection may take to say what it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// After answering Shutdown, how long to wait for the host to hang up.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);

/// What the caller should do once the connection ends.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Serve the next connection.
    Continue,
    /// The host asked the guest to power off: reboot (the VMM ends on reset).
    Reboot,
}

fn code(error: &ContainerError) -> ErrorCode {
    match error {
        ContainerError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        ContainerError::NotFound(_) => ErrorCode::NotFound,
        ContainerError::AlreadyExists(_) => ErrorCode::AlreadyExists,
        ContainerError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
        ContainerError::Unsupported(_) => ErrorCode::Unsupported,
        ContainerError::Process(ProcessError::Invalid(_))
        | ContainerError::Process(ProcessError::Seccomp(_))
        | ContainerError::Rootfs(crate::rootfs::RootfsError::Invalid(_)) => {
            ErrorCode::InvalidArgument
        }
        // The spec was valid but the child could not apply it (no such
        // program, cwd missing, …): the caller's to fix.
        ContainerError::Process(ProcessError::Child(_)) => ErrorCode::FailedPrecondition,
        ContainerError::Process(ProcessError::ProgramNotFound(_)) => ErrorCode::ProgramNotFound,
        ContainerError::Process(ProcessError::ProgramNotExecutable(_)) => {
            ErrorCode::ProgramNotExecutable
        }
        ContainerError::Stdio(crate::stdio::StdioError::NotAvailable(_))
        | ContainerError::Stdio(crate::stdio::StdioError::NoTerminal) => {
            ErrorCode::FailedPrecondition
        }
        ContainerError::Network(NetworkError::Invalid(_)) => ErrorCode::InvalidArgument,
        ContainerError::Network(NetworkError::NoInterface(_)) => ErrorCode::NotFound,
        ContainerError::Network(NetworkError::Again) => ErrorCode::FailedPrecondition,
        ContainerError::Identity(
            crate::identity::IdentityError::Entropy(_) | crate::identity::IdentityError::Time(_),
        ) => ErrorCode::InvalidArgument,
        _ => ErrorCode::Internal,
    }
}

fn error_response(error: &ContainerError) -> Response {
    Response::Error {
        code: code(error),
        message: error_chain(error),
    }
}

fn dispatch(sandbox: &Containers, request: Request) -> Result<Response, ContainerError> {
    Ok(match request {
        Request::CreateContainer(create) => Response::Pid {
            pid: sandbox.create(*create)?,
        },
        Request::ExecProcess(exec) => Response::Pid {
            pid: sandbox.exec(*exec)?,
        },
        Request::StartProcess(process) => {
            sandbox.start(&process)?;
            Response::Ok
        }
        Request::WaitProcess(process) => Response::Exited {
            status: sandbox.wait(&process)?,
        },
        Request::SignalProcess {
            process,
            signal,
            all,
        } => {
            sandbox.signal(&process, signal, all)?;
            Response::Ok
        }
        Request::ResizeTty {
            process,
            rows,
            cols,
        } => {
            sandbox.resize(&process, rows, cols)?;
            Response::Ok
        }
        Request::CloseStdin(process) => {
            sandbox.close_stdin(&process)?;
            Response::Ok
        }
        Request::Stats { container_id } => Response::Stats {
            stats: Box::new(sandbox.stats(&container_id)?),
        },
        Request::UpdateResources {
            container_id,
            resources,
        } => {
            sandbox.update(&container_id, &resources)?;
            Response::Ok
        }
        Request::Freeze {
            container_id,
            frozen,
        } => {
            sandbox.freeze(&container_id, frozen)?;
            Response::Ok
        }
        Request::ListProcesses { container_id } => Response::Processes {
            pids: sandbox.pids(&container_id)?,
        },
        Request::RemoveContainer { container_id } => {
            sandbox.remove(&container_id)?;
            Response::Ok
        }
        Request::ConfigureNetwork(config) => {
            crate::network::configure(&config)?;
            Response::Ok
        }
        Request::Shutdown => {
            sandbox.remove_all();
            Response::Ok
        }
        Request::Prepare(prepare) => {
            if prepare.seccomp.len() > capsid_protocol::MAX_PREPARED_PROFILES {
                return Err(ContainerError::InvalidArgument(format!(
                    "{} seccomp profiles to prepare; at most {}",
                    prepare.seccomp.len(),
                    capsid_protocol::MAX_PREPARED_PROFILES
                )));
            }
            for profile in &prepare.seccomp {
                crate::seccomp::COMPILED
                    .program(profile)
                    .map_err(crate::process::ProcessError::from)?;
            }
            Response::Ok
        }
        Request::Refresh(refresh) => {
            crate::identity::refresh(&refresh)?;
            tracing::info!("restored: the RNG is reseeded and the clock set");
            Response::Ok
        }
    })
}

/// Serves one connection until it closes.
pub fn serve(mut connection: VsockStream, sandbox: Arc<Containers>) -> After {
    match serve_inner(&mut connection, &sandbox) {
        Ok(after) => after,
        Err(CodecError::Closed) => After::Continue,
        Err(e) => {
            tracing::debug!("connection ended: {}", error_chain(&e));
            After::Continue
        }
    }
}

fn serve_inner(connection: &mut VsockStream, sandbox: &Containers) -> Result<After, CodecError> {
    connection
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(CodecError::Io)?;
    let hello: Hello = match read_frame(connection) {
        Ok(hello) => hello,
        Err(e @ CodecError::Malformed(_)) | Err(e @ CodecError::TooLarge(_)) => {
            let _ = write_frame(
                connection,
                &Response::Error {
                    code: ErrorCode::InvalidArgument,
                    message: error_chain(&e),
                },
            );
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let version = match &hello {
        Hello::Control { version }
        | Hello::Stdio { version, .. }
        | Hello::Archive { version, .. } => *version,
    };
    if version != PROTOCOL_VERSION {
        // Answer in the shape the client understands, then hang up.
        let _ = write_frame(
            connection,
            &Response::Hello {
                version: PROTOCOL_VERSION,
                agent: agent_name(),
            },
        );
        return Ok(After::Continue);
    }
    match hello {
        Hello::Stdio {
            process, stream, ..
        } => {
            let clone = connection.try_clone().map_err(CodecError::Io)?;
            clone.set_read_timeout(None).map_err(CodecError::Io)?;
            let attached = sandbox.attach(&process, stream, clone, |c| {
                write_frame(c, &Response::Ok).map_err(|e| io::Error::other(e.to_string()))
            });
            if let Err(e) = attached {
                write_frame(connection, &error_response(&e))?;
            }
            Ok(After::Continue)
        }
        Hello::Archive {
            container_id, path, ..
        } => {
            let dir = match sandbox.archive_dir(&container_id, &path) {
                Ok(dir) => dir,
                Err(e) => {
                    write_frame(connection, &error_response(&e))?;
                    return Ok(After::Continue);
                }
            };
            write_frame(connection, &Response::Ok)?;
            connection.set_read_timeout(None).map_err(CodecError::Io)?;
            match crate::archive::write_tar(dir, &mut *connection) {
                Ok(sent) => tracing::info!(
                    "sent {path} of {container_id}: {} entries, {} bytes",
                    sent.entries,
                    sent.bytes
                ),
                Err(e) => tracing::info!("sending {path} of {container_id} stopped: {e}"),
            }
            let _ = connection.shutdown(std::net::Shutdown::Write);
            Ok(After::Continue)
        }
        Hello::Control { .. } => {
            write_frame(
                connection,
                &Response::Hello {
                    version: PROTOCOL_VERSION,
                    agent: agent_name(),
                },
            )?;
            connection.set_read_timeout(None).map_err(CodecError::Io)?;
            loop {
                let request: Request = match read_frame(connection) {
                    Ok(request) => request,
                    Err(e @ CodecError::Malformed(_)) | Err(e @ CodecError::TooLarge(_)) => {
                        // A frame we cannot read leaves the stream out of
                        // step: answer once, then hang up.
                        write_frame(
                            connection,
                            &Response::Error {
                                code: ErrorCode::InvalidArgument,
                                message: error_chain(&e),
                            },
                        )?;
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                };
                let shutdown = matches!(request, Request::Shutdown);
                tracing::debug!(?request, "request");
                let response = dispatch(sandbox, request).unwrap_or_else(|e| {
                    tracing::info!("request failed: {}", error_chain(&e));
                    error_response(&e)
                });
                write_frame(connection, &response)?;
                if shutdown {
                    // Let the answer reach the host before the reset.
                    let _ = connection.set_read_timeout(Some(SHUTDOWN_LINGER));
                    let mut rest = [0u8; 64];
                    while matches!(io::Read::read(connection, &mut rest), Ok(n) if n > 0) {}
                    return Ok(After::Reboot);
                }
            }
        }
    }
}

fn agent_name() -> String {
    format!("capsid-agent {}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// Feeds `input` to a served connection; returns what came back.
    fn serve_bytes(input: &[u8]) -> Vec<u8> {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let sandbox = Arc::new(Containers::default());
        let server = std::thread::spawn(move || {
            serve(VsockStream::from_fd(theirs.into()), sandbox);
        });
        let mut ours = ours;
        let _ = ours.write_all(input);
        let _ = ours.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = ours.read_to_end(&mut reply);
        server.join().unwrap();
        reply
    }

    fn frame<T: serde::Serialize>(message: &T) -> Vec<u8> {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, message).unwrap();
        bytes
    }

    #[test]
    fn hostile_frames_get_an_error_and_a_hang_up() {
        let hello = frame(&Hello::Control {
            version: PROTOCOL_VERSION,
        });
        let oversized = u32::MAX.to_be_bytes().to_vec();
        let garbage = b"\x00\x00\x00\x03{{{".to_vec();
        for bad in [oversized, garbage] {
            // As the first frame, and after a good hello.
            for input in [bad.clone(), [hello.clone(), bad.clone()].concat()] {
                let reply = serve_bytes(&input);
                let mut reader = reply.as_slice();
                let mut responses = Vec::new();
                while let Ok(r) = read_frame::<_, Response>(&mut reader) {
                    responses.push(r);
                }
                assert!(
                    matches!(
                        responses.last(),
                        Some(Response::Error {
                            code: ErrorCode::InvalidArgument,
                            ..
                        })
                    ),
                    "{responses:?}"
                );
            }
        }
    }

    #[test]
    fn requests_for_unknown_containers_are_not_found() {
        let input = [
            frame(&Hello::Control {
                version: PROTOCOL_VERSION,
            }),
            frame(&Request::Stats {
                container_id: "nope".into(),
            }),
            frame(&Request::RemoveContainer {
                container_id: "../x".into(),
            }),
        ]
        .concat();
        let reply = serve_bytes(&input);
        let mut reader = reply.as_slice();
        assert!(matches!(
            read_frame(&mut reader),
            Ok(Response::Hello { .. })
        ));
        assert!(matches!(
            read_frame(&mut reader),
            Ok(Response::Error {
                code: ErrorCode::NotFound,
                ..
            })
        ));
        assert!(matches!(
            read_frame(&mut reader),
            Ok(Response::Error {
                code: ErrorCode::InvalidArgument,
                ..
            })
        ));
    }

    #[test]
    fn fuzzed_connections_never_panic() {
        let mut seed = 0x1234_5678_9abc_def0_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let hello = frame(&Hello::Control {
            version: PROTOCOL_VERSION,
        });
        let request = frame(&Request::ListProcesses {
            container_id: "c".into(),
        });
        for _ in 0..300 {
            let mut input = [hello.clone(), request.clone()].concat();
            for _ in 0..(1 + next() % 4) {
                let at = usize::try_from(next() % input.len() as u64).unwrap();
                input[at] = next().to_le_bytes()[0];
            }
            let _ = serve_bytes(&input);
        }
    }

    #[test]
    fn every_error_has_one_code() {
        let cases = [
            (ContainerError::NotFound("x".into()), ErrorCode::NotFound),
            (
                ContainerError::Process(ProcessError::Invalid("x".into())),
                ErrorCode::InvalidArgument,
            ),
            (
                ContainerError::Process(ProcessError::Child("exec".into())),
                ErrorCode::FailedPrecondition,
            ),
            (
                ContainerError::Io {
                    what: "x".into(),
                    source: io::ErrorKind::Other.into(),
                },
                ErrorCode::Internal,
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(code(&error), expected, "{error}");
        }
    }
}
