//! Feed arbitrary bytes, split at arbitrary points, into the frame decoder for both
//! message directions. It must never panic, never allocate past the frame limit, and
//! every message it yields must re-encode to a frame that decodes to the same message.
#![no_main]

use fleetmesh_protocol::{encode_frame, AgentMessage, CoordinatorMessage, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fn drive<T>(data: &[u8], split: usize)
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
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
                    assert_eq!(back, m);
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
});
