//! The one implementation of length-prefixed frames over quinn streams, used by the
//! coordinator's sessions and enrollment, the agent's session and enrollment, and the
//! data plane. Reading goes through [`FrameDecoder`]: the 4-byte header is checked
//! against the limit before the payload is read or allocated, and nothing past the frame
//! is read from the stream (a data-plane chunk body follows its header frame raw).

use std::time::Duration;

use fleetmesh_protocol::codec::HEADER_LEN;
use fleetmesh_protocol::{encode_frame, CodecError, FrameDecoder};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream or connection failed (or the peer reset it).
    #[error("{0}")]
    Transport(String),
    /// The bytes were not a valid frame (too large, malformed): close the connection.
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("write timed out after {0:?}")]
    WriteTimeout(Duration),
}

/// Read one frame; `Ok(None)` when the stream ended cleanly before a new frame.
pub async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, FrameError> {
    let mut dec = FrameDecoder::new();
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(FrameError::Transport(e.to_string())),
    }
    // Checked against the limit before the payload is allocated.
    let len = fleetmesh_protocol::codec::parse_header(header, fleetmesh_protocol::MAX_FRAME_LEN)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.map_err(|e| FrameError::Transport(e.to_string()))?;
    dec.push(&header);
    dec.push(&payload);
    dec.next_message::<T>()?
        .map(Some)
        .ok_or_else(|| FrameError::Transport("frame ended early".into()))
}

/// Write one frame, giving up after `timeout` when one is given.
pub async fn write_frame<T: serde::Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
    timeout: Option<Duration>,
) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    let write = send.write_all(&frame);
    let done = match timeout {
        Some(t) => tokio::time::timeout(t, write).await.map_err(|_| FrameError::WriteTimeout(t))?,
        None => write.await,
    };
    done.map_err(|e| FrameError::Transport(e.to_string()))
}
