//! Fleetmesh wire protocol and trust helpers.
//!
//! This crate owns every type that crosses a process boundary (control-plane messages,
//! telemetry, inventory), the length-prefixed frame codec, and the identity/PKI helpers
//! (SPIFFE IDs, certificate attributes, CA and certificate issuance, rustls configs).
//!
//! It deliberately depends on neither tokio nor quinn: the codec is sans-IO so it can be
//! fuzzed and unit-tested without a runtime, and both the agent and the coordinator drive
//! it from their own transports.

pub mod api;
pub mod codec;
pub mod data;
pub mod enroll;
pub mod identity;
pub mod messages;
pub mod pki;
pub mod tls;
pub mod workflow;

pub use codec::{decode_message, encode_frame, CodecError, FrameDecoder, MAX_FRAME_LEN};
pub use identity::{Attributes, IdentityError, PeerIdentity, PeerKind};
pub use messages::*;

/// Version of the control protocol carried in `Hello`/`Welcome`. Bump on any
/// incompatible change of the message enums; ALPN stays `fleetmesh/ctl/1` until the
/// framing itself changes.
pub const PROTOCOL_VERSION: u32 = 3;

/// ALPN for the agent <-> coordinator control plane.
pub const ALPN_CTL: &[u8] = b"fleetmesh/ctl/1";

/// Version of this software, reported by agents in their inventory.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
