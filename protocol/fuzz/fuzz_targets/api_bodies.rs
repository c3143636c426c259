//! Arbitrary bytes as each JSON body the coordinator's API accepts, then the checks the
//! API runs before acting on one: never a panic, and an accepted dataset registration has
//! a valid manifest.
#![no_main]

use fleetmesh_protocol::api::{DrainBody, PlaceBody, PutBody, RevokeBody, TokenSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = serde_json::from_slice::<PutBody>(data) {
        if b.validate().is_ok() {
            assert!(b.manifest.validate().is_ok());
        }
    }
    if let Ok(t) = serde_json::from_slice::<TokenSpec>(data) {
        let _ = t.checked_attributes();
    }
    let _ = serde_json::from_slice::<PlaceBody>(data);
    let _ = serde_json::from_slice::<DrainBody>(data);
    let _ = serde_json::from_slice::<RevokeBody>(data);
    let _ = serde_json::from_slice::<Vec<String>>(data);
});
