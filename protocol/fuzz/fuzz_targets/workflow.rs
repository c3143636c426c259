//! Arbitrary text as a workflow file: parse + validate must never panic, never overflow
//! the stack and never blow up memory (alias bombs are measured before they are built);
//! an accepted workflow is within the limits and has a complete dependency order.
#![no_main]

use fleetmesh_protocol::workflow::{parse, MAX_JOBS_PER_WORKFLOW, MAX_RUN_BYTES};
use fleetmesh_protocol::workflow::Run;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(w) = parse(text) {
        assert!(w.jobs.len() <= MAX_JOBS_PER_WORKFLOW);
        assert_eq!(w.topological_order().len(), w.jobs.len(), "accepted with a cycle");
        for j in w.jobs.values() {
            let run = match &j.run {
                Run::Command(c) => c.iter().map(String::len).sum(),
                Run::Script(s) => s.len(),
            };
            assert!(run <= MAX_RUN_BYTES);
            if let Some(i) = &j.image {
                assert!(!i.starts_with('-'), "an option accepted as an image: {i:?}");
            }
        }
    }
});
