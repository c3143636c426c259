//! The Fleetmesh coordinator's HTTP API as its clients see it, defined once: the answer
//! types the server serves and the CLI, the tests and the benchmarks read, and an HTTPS
//! client that authenticates with an operator certificate. No server code lives here, so
//! the CLI links neither the actor system nor the store nor the HTTP server.

pub mod answers;
pub mod client;
pub mod data;
pub mod fleet;
pub mod jobs;
pub mod plan;
pub mod pools;
pub mod trust;

/// Format ms since the epoch as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(t).to_string()
}
