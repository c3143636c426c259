//! Persistence: the embedded redb store (`store.rs`) and the writers that commit an
//! actor's records and only then deliver what waited for them (`writer.rs`).

pub mod store;
pub mod writer;
