//! The coordinator's side of the data plane: the dataset index, residency, fetch plans
//! and tickets (`broker.rs`).

pub mod broker;
