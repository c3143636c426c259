//! Trust: the `Authority` actor (CA key, join tokens, enrollment, renewal, revocation,
//! audit trail) and the shared deny-list every port checks (`revocations.rs`).

pub mod authority;
pub mod revocations;
