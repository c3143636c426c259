//! Feed arbitrary bytes, split at arbitrary points, into the frame decoder for both
//! control-plane directions and both data-plane (xfer) directions; a decoded manifest is
//! also validated (its paths and sizes come from a peer). It must never panic, never allocate past the frame limit, and
//! every message it yields must survive encode -> decode -> encode byte for byte
//! (compared as bytes: a decoded NaN is a valid f64 but never equal to itself).
#![no_main]

use fleetmesh_protocol::data::{XferReply, XferRequest};
use fleetmesh_protocol::{encode_frame, AgentMessage, CoordinatorMessage, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fn drive<T>(data: &[u8], split: usize)
where
    T: serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut dec = FrameDecoder::new();
    let (a, b) = data.split_at(split.min(data.len()));
    for part in [a, b] {
        dec.push(part);
        loop {
            match dec.next_message::<T>() {
                Ok(Some(m)) => {
                    let frame = encode_frame(&m).expect("re-encode");
                    let mut again = FrameDecoder::new();
                    again.push(&frame);
                    let back = again.next_message::<T>().expect("decode re-encoded").expect("complete");
                    assert_eq!(encode_frame(&back).expect("re-encode again"), frame);
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let split = data.first().copied().unwrap_or(0) as usize;
    drive::<AgentMessage>(data, split);
    drive::<CoordinatorMessage>(data, split);
    drive::<XferRequest>(data, split);
    drive::<XferReply>(data, split);
    let mut dec = FrameDecoder::new();
    dec.push(data);
    if let Ok(Some(XferReply::Manifest(m))) = dec.next_message::<XferReply>() {
        let _ = m.validate();
        let _ = m.id();
        let _ = m.unique_chunks();
    }
});
