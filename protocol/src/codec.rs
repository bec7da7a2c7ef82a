//! Length-prefixed JSON frames.
//!
//! ```text
//!  ┌──────────────┬─────────────────────────────┐
//!  │ len: u32 BE  │ JSON body, len bytes         │   len ≤ MAX_FRAME_BYTES
//!  └──────────────┴─────────────────────────────┘
//! ```
//!
//! Why not ttrpc: the agent is a static PID 1 that we want small and quick to
//! start, the calls are few, and JSON over a checked length is simple to fuzz
//! and to read in a packet dump. Both ends are ours, versioned by
//! [`crate::PROTOCOL_VERSION`] in the first frame.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::MAX_FRAME_BYTES;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// A length prefix above [`MAX_FRAME_BYTES`]; nothing was allocated.
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME_BYTES}")]
    TooLarge(u64),
    /// The frame is not the JSON of the expected message.
    #[error("malformed frame")]
    Malformed(#[source] serde_json::Error),
    /// The socket failed (a timeout included).
    #[error("i/o error")]
    Io(#[source] io::Error),
}

/// Writes one frame holding `message`.
pub fn write_frame<W: Write, T: Serialize>(writer: &mut W, message: &T) -> Result<(), CodecError> {
    let body = serde_json::to_vec(message).map_err(CodecError::Malformed)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&len| len <= MAX_FRAME_BYTES)
        .ok_or(CodecError::TooLarge(body.len() as u64))?;
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    writer.write_all(&frame).map_err(CodecError::Io)?;
    writer.flush().map_err(CodecError::Io)
}

/// Reads one frame and decodes it. A clean end of stream before the first
/// byte is [`CodecError::Closed`]; a length over the limit is refused before
/// anything is allocated for it.
pub fn read_frame<R: Read, T: DeserializeOwned>(reader: &mut R) -> Result<T, CodecError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match reader.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(CodecError::Closed),
            Ok(0) => return Err(CodecError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CodecError::Io(e)),
        }
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge(len.into()));
    }
    let mut body = vec![0; len as usize];
    reader.read_exact(&mut body).map_err(CodecError::Io)?;
    serde_json::from_slice(&body).map_err(CodecError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Hello, Request, Response};

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Request::Shutdown).unwrap();
        write_frame(&mut wire, &Hello::Control { version: 1 }).unwrap();
        let mut reader = wire.as_slice();
        assert!(matches!(
            read_frame(&mut reader).unwrap(),
            Request::Shutdown
        ));
        assert!(matches!(
            read_frame(&mut reader).unwrap(),
            Hello::Control { version: 1 }
        ));
        assert!(matches!(
            read_frame::<_, Request>(&mut reader),
            Err(CodecError::Closed)
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let wire = u32::MAX.to_be_bytes();
        let err = read_frame::<_, Request>(&mut wire.as_slice()).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge(n) if n == u64::from(u32::MAX)));
    }

    #[test]
    fn truncated_frames_are_errors() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Request::Shutdown).unwrap();
        for cut in 1..wire.len() {
            let err = read_frame::<_, Request>(&mut &wire[..cut]).unwrap_err();
            assert!(matches!(err, CodecError::Io(_)), "cut at {cut}: {err:?}");
        }
    }

    #[test]
    fn oversized_messages_are_not_sent() {
        let big = Response::Error {
            code: crate::ErrorCode::Internal,
            message: "x".repeat(MAX_FRAME_BYTES as usize),
        };
        assert!(matches!(
            write_frame(&mut Vec::new(), &big),
            Err(CodecError::TooLarge(_))
        ));
    }

    /// A small deterministic fuzzer: random bytes, random mutations of valid
    /// frames, random lengths. Every outcome must be a value or an error.
    #[test]
    #[allow(clippy::cast_possible_truncation)] // a test PRNG's bytes
    fn fuzzed_frames_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut valid = Vec::new();
        for request in crate::messages::tests::sample_requests() {
            let mut frame = Vec::new();
            write_frame(&mut frame, &request).unwrap();
            valid.push(frame);
        }
        for round in 0..20_000 {
            let mut frame = if round % 4 == 0 {
                let len = (next() % 64) as usize;
                let mut f: Vec<u8> = (0..len + 4).map(|_| next() as u8).collect();
                f[..4].copy_from_slice(&(len as u32).to_be_bytes());
                f
            } else {
                valid[(next() % valid.len() as u64) as usize].clone()
            };
            for _ in 0..(next() % 4) {
                let at = (next() % frame.len() as u64) as usize;
                frame[at] = next() as u8;
            }
            if next() % 8 == 0 {
                frame.truncate((next() % frame.len() as u64) as usize);
            }
            let _ = read_frame::<_, Request>(&mut frame.as_slice());
            let _ = read_frame::<_, Response>(&mut frame.as_slice());
            let _ = read_frame::<_, Hello>(&mut frame.as_slice());
        }
    }
}
