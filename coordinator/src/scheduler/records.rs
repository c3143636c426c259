//! The Scheduler's records are the API's job types, defined once in `fleetmesh-api`.

pub use fleetmesh_api::jobs::*;
