//! The small answers of mutating API calls, and the error body of every non-2xx answer.

use serde::{Deserialize, Serialize};

/// Error body of every non-2xx API answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: String,
}

/// `POST /api/v1/workflows`: the new workflow's id (its jobs are `ID.JOB`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    pub id: String,
}

/// `POST /api/v1/{jobs,workflows}/ID/cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelled {
    pub cancelled_jobs: usize,
}

/// `POST /api/v1/agents/NAME/drain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drained {
    pub agent: String,
    pub draining: bool,
}

/// `POST /api/v1/identities/KIND/NAME/revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub revoked: String,
    pub kind: fleetmesh_protocol::PeerKind,
}

/// `POST /api/v1/data/ID/place`: the agent was asked to fetch the dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub dataset: String,
    pub agent: String,
}

/// `POST /api/v1/data/ID/rm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub removed: String,
    /// The holders asked to drop their copy.
    pub holders_told: Vec<String>,
}
