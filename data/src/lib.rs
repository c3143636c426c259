//! Fleetmesh data plane.
//!
//! - [`store`]: a content-addressed chunk store in a data dir (verified writes, atomic
//!   renames, a size limit with LRU eviction of chunks no running job pins) plus the
//!   local dataset records (manifest, name, residency).
//! - [`dataset`]: chunking a file or directory into the store, and materialising a
//!   dataset back into files.
//! - [`xfer`]: the ALPN `fleetmesh/xfer/1` server (ticket and residency checks before a
//!   byte is sent) and the multi-source fetcher (parallel, verified, resumable).
//!
//! Agents and the coordinator both use this crate: the coordinator's own store is a peer
//! like any agent's.

#![warn(clippy::too_many_lines, clippy::too_many_arguments)]

pub mod dataset;
pub mod framing;
pub mod store;
pub mod xfer;

pub use store::{LocalDataset, Store, StoreError};
pub use xfer::{fetch, fetch_part, FetchError, XferServer};

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
