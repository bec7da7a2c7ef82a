//! One connection from the host: its hello, then its requests in order.
//! Internal errors become protocol error codes here, and only here.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use cocoon_protocol::{
    CodecError, ErrorCode, Hello, PROTOCOL_VERSION, Request, Response, read_frame, write_frame,
};

use crate::container::{Sandbox, SandboxError};
use crate::process::{ProcessError, error_chain};
use crate::vsock::VsockStream;

/// How long a new connection may take to say what it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// After answering Shutdown, how long to wait for the host to hang up.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);

/// What the caller should do once the connection ends.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    Continue,
    Reboot,
}

fn code(error: &SandboxError) -> ErrorCode {
    match error {
        SandboxError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        SandboxError::NotFound(_) => ErrorCode::NotFound,
        SandboxError::AlreadyExists(_) => ErrorCode::AlreadyExists,
        SandboxError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
        SandboxError::Unsupported(_) => ErrorCode::Unsupported,
        SandboxError::Process(ProcessError::Invalid(_))
        | SandboxError::Process(ProcessError::Seccomp(_))
        | SandboxError::Rootfs(crate::rootfs::RootfsError::Invalid(_)) => {
            ErrorCode::InvalidArgument
        }
        // The spec was valid but the child could not apply it (no such
        // program, cwd missing, …): the caller's to fix.
        SandboxError::Process(ProcessError::Child(_)) => ErrorCode::FailedPrecondition,
        SandboxError::Stdio(crate::stdio::StdioError::NotAvailable(_))
        | SandboxError::Stdio(crate::stdio::StdioError::NoTerminal) => {
            ErrorCode::FailedPrecondition
        }
        _ => ErrorCode::Internal,
    }
}

fn error_response(error: &SandboxError) -> Response {
    Response::Error {
        code: code(error),
        message: error_chain(error),
    }
}

fn dispatch(sandbox: &Sandbox, request: Request) -> Result<Response, SandboxError> {
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
            stats: sandbox.stats(&container_id)?,
        },
        Request::ListProcesses { container_id } => Response::Processes {
            pids: sandbox.pids(&container_id)?,
        },
        Request::RemoveContainer { container_id } => {
            sandbox.remove(&container_id)?;
            Response::Ok
        }
        Request::Shutdown => {
            sandbox.remove_all();
            Response::Ok
        }
    })
}

/// Serves one connection until it closes.
pub fn serve(mut connection: VsockStream, sandbox: Arc<Sandbox>) -> After {
    match serve_inner(&mut connection, &sandbox) {
        Ok(after) => after,
        Err(CodecError::Closed) => After::Continue,
        Err(e) => {
            tracing::debug!("connection ended: {}", error_chain(&e));
            After::Continue
        }
    }
}

fn serve_inner(connection: &mut VsockStream, sandbox: &Sandbox) -> Result<After, CodecError> {
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
        Hello::Control { version } | Hello::Stdio { version, .. } => *version,
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
    format!("cocoon-agent {}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_one_code() {
        let cases = [
            (SandboxError::NotFound("x".into()), ErrorCode::NotFound),
            (
                SandboxError::Process(ProcessError::Invalid("x".into())),
                ErrorCode::InvalidArgument,
            ),
            (
                SandboxError::Process(ProcessError::Child("exec".into())),
                ErrorCode::FailedPrecondition,
            ),
            (
                SandboxError::Io {
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
