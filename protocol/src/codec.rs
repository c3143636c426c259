//! Length-prefixed frame codec.
//!
//! A frame is a 4-byte big-endian payload length followed by the bincode (2.x, standard
//! config) encoding of one message. The length is checked against [`MAX_FRAME_LEN`]
//! *before* any buffer for the payload is allocated, so a hostile peer cannot make us
//! allocate by announcing a huge frame. The decoder is sans-IO: feed it bytes, pull
//! messages out.

use serde::{de::DeserializeOwned, Serialize};

/// Largest payload accepted, in bytes. An inventory plus a telemetry report for 16 GPUs
/// with a few hundred processes is well under 64 KiB; 1 MiB leaves room for growth while
/// bounding what one peer can make us buffer.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// QUIC application close codes, the same on both sides of every connection.
pub mod close_code {
    /// A normal end: the exchange is done, or the peer is leaving.
    pub const DONE: u32 = 0;
    /// Peer identity refused (wrong kind, wrong trust domain, name mismatch, revoked).
    pub const REFUSED: u32 = 1;
    /// Hello carried another protocol version.
    pub const VERSION_MISMATCH: u32 = 2;
    /// A frame was larger than the limit, or did not decode.
    pub const PROTOCOL_ERROR: u32 = 3;
    /// Replaced by a newer session, or closed by the coordinator.
    pub const CLOSED: u32 = 4;
    /// Coordinator shutting down.
    pub const SHUTDOWN: u32 = 5;
}

/// Codec failures. None of them panic; all mean "close this connection".
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { len: usize, limit: usize },
    #[error("malformed message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("message could not be encoded: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("message has {0} trailing bytes after its end")]
    TrailingBytes(usize),
}

pub(crate) fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_big_endian().with_limit::<MAX_FRAME_LEN>()
}

/// Encode `msg` as one frame (header + payload).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![0u8; HEADER_LEN];
    bincode::serde::encode_into_std_write(msg, &mut out, config())?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::FrameTooLarge { len, limit: MAX_FRAME_LEN });
    }
    let len32 =
        u32::try_from(len).map_err(|_| CodecError::FrameTooLarge { len, limit: MAX_FRAME_LEN })?;
    out[..HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
    Ok(out)
}

/// Parse a frame header, enforcing `limit`. Returns the payload length.
pub fn parse_header(header: [u8; HEADER_LEN], limit: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(CodecError::FrameTooLarge { len, limit });
    }
    Ok(len)
}

/// Decode one message from a complete payload (without header).
pub fn decode_message<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

/// Incremental decoder: push received bytes, pop complete messages.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    limit: Option<usize>,
}

impl FrameDecoder {
    /// A decoder with the default [`MAX_FRAME_LEN`] limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder with a smaller limit (never larger than [`MAX_FRAME_LEN`]).
    pub fn with_limit(limit: usize) -> Self {
        Self { buf: Vec::new(), limit: Some(limit.min(MAX_FRAME_LEN)) }
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Next complete message, `Ok(None)` if more bytes are needed. An oversized header is
    /// reported as soon as its 4 bytes are present, before the payload arrives.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, CodecError> {
        let Some(header) = self.buf.get(..HEADER_LEN) else { return Ok(None) };
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(header);
        let len = parse_header(h, self.limit.unwrap_or(MAX_FRAME_LEN))?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = decode_message(&self.buf[HEADER_LEN..HEADER_LEN + len]);
        self.buf.drain(..HEADER_LEN + len);
        msg.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;

    fn hello() -> AgentMessage {
        AgentMessage::Hello(Hello {
            protocol_version: 1,
            agent_name: "gpu-01".into(),
            software_version: "0.1.0".into(),
        })
    }

    /// Golden bytes: these pin the wire encoding. If this test fails, the wire format
    /// changed: bump `PROTOCOL_VERSION` and update the bytes deliberately.
    #[test]
    fn golden_hello() {
        let bytes = encode_frame(&hello()).unwrap();
        assert_eq!(hex::encode(&bytes), "0000000f0001066770752d303105302e312e30");
    }

    #[test]
    fn golden_heartbeat_and_reject() {
        let hb = encode_frame(&AgentMessage::Heartbeat { seq: 300 }).unwrap();
        assert_eq!(hex::encode(&hb), "0000000403fb012c");
        let rej = encode_frame(&CoordinatorMessage::Reject { reason: "no".into() }).unwrap();
        assert_eq!(hex::encode(&rej), "0000000401026e6f");
    }

    #[test]
    fn golden_welcome() {
        let w = CoordinatorMessage::Welcome(Welcome {
            protocol_version: 1,
            session_id: 7,
            heartbeat_interval_ms: 500,
        });
        assert_eq!(hex::encode(encode_frame(&w).unwrap()), "00000006000107fb01f4");
    }

    #[test]
    fn round_trip_through_decoder_in_pieces() {
        let msgs = vec![
            hello(),
            AgentMessage::Heartbeat { seq: 1 },
            AgentMessage::Leaving { reason: "bye".into() },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(encode_frame(m).unwrap());
        }
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        for b in wire.chunks(3) {
            dec.push(b);
            while let Some(m) = dec.next_message::<AgentMessage>().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversized_header_is_rejected_before_payload_arrives() {
        let mut dec = FrameDecoder::new();
        dec.push(&u32::MAX.to_be_bytes());
        match dec.next_message::<AgentMessage>() {
            Err(CodecError::FrameTooLarge { len, limit }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(limit, MAX_FRAME_LEN);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        // Nothing beyond the 4 header bytes was ever buffered.
        assert_eq!(dec.buffered(), 4);
    }

    #[test]
    fn garbage_payload_is_an_error_not_a_panic() {
        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(dec.next_message::<AgentMessage>(), Err(CodecError::Decode(_))));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut payload = encode_frame(&AgentMessage::Heartbeat { seq: 1 }).unwrap();
        payload.drain(..HEADER_LEN);
        payload.push(0);
        assert!(matches!(
            decode_message::<AgentMessage>(&payload),
            Err(CodecError::TrailingBytes(1))
        ));
    }

    #[test]
    fn huge_string_length_inside_small_frame_does_not_allocate() {
        // Variant 4 (Leaving) with a string length prefix claiming ~2^63 bytes.
        let payload = [0x04, 0xfd, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_message::<AgentMessage>(&payload).is_err());
    }
}
