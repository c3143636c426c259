//! The API's fleet views, defined once in `fleetmesh-api`.

pub use fleetmesh_api::answers::ApiErrorBody;
pub use fleetmesh_api::fleet::*;
pub use fleetmesh_api::rfc3339_ms;
