//! Elastic capacity: pools that launch nodes for work nothing connected can take and
//! terminate them when idle. `pools.rs` reads the config; `core.rs` decides; the actor
//! shell runs the pools' programs.

pub mod core;
pub mod pools;
#[cfg(test)]
mod tests;
