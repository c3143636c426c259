//! Arbitrary bytes as a dataset manifest, decoded as the data plane does (bincode with the
//! frame limit) and as the API does (JSON): validation must never panic, and an accepted
//! manifest has only safe relative paths, permission bits only, and no path that is both a
//! file and a directory.
#![no_main]

use fleetmesh_protocol::data::{check_rel_path, Manifest, PERMISSION_BITS};
use libfuzzer_sys::fuzz_target;

fn check(m: &Manifest) {
    if m.validate().is_ok() {
        let mut files = std::collections::HashSet::new();
        for f in &m.files {
            assert!(check_rel_path(&f.path).is_ok(), "{:?}", f.path);
            assert_eq!(f.mode & !PERMISSION_BITS, 0, "{:o}", f.mode);
            files.insert(f.path.as_str());
        }
        for f in &m.files {
            for (i, _) in f.path.match_indices('/') {
                assert!(!files.contains(&f.path[..i]), "{:?} is a file and a directory", &f.path[..i]);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let cfg = bincode::config::standard()
        .with_big_endian()
        .with_limit::<{ fleetmesh_protocol::codec::MAX_FRAME_LEN }>();
    if let Ok((m, _)) = bincode::serde::decode_from_slice::<Manifest, _>(data, cfg) {
        check(&m);
    }
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        check(&m);
    }
});
