//! Datasets as the API shows them: content-addressed, versioned by name, held (completely
//! or partly) by agents and the coordinator, with their residency.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetmesh_protocol::data::Manifest;
use fleetmesh_protocol::FetchReport;
use serde::{Deserialize, Serialize};

/// One holder of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HolderState {
    pub complete: bool,
    pub bytes_present: u64,
    pub updated_unix_ms: u64,
}

/// A dataset in the index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    pub id: String,
    pub name: String,
    /// Allowed jurisdictions (empty = anywhere).
    pub jurisdictions: Vec<String>,
    pub bytes: u64,
    pub files: usize,
    pub chunks: usize,
    /// Holder name -> state. The coordinator's own store appears under its name.
    pub holders: BTreeMap<String, HolderState>,
    /// The job that produced it, for outputs.
    pub producer: Option<String>,
    pub created_unix_ms: u64,
    /// Shared: records are cloned for every lookup, the manifest need not be.
    pub manifest: Arc<Manifest>,
    /// Last fetch result per agent (`data put --on`, replication).
    #[serde(default)]
    pub fetches: BTreeMap<String, FetchReport>,
    /// Agents asked to fetch it that have not reported yet: asked again when they
    /// reconnect (a fetch interrupted by a restart resumes).
    #[serde(default)]
    pub pending: std::collections::BTreeSet<String>,
    /// Version of `name`: a put of new content under an existing name makes the next
    /// version (`NAME@N`); the name alone means the newest.
    #[serde(default = "first_version")]
    pub version: u32,
}

fn first_version() -> u32 {
    1
}

/// Compact listing line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub id: String,
    pub name: String,
    #[serde(default = "first_version")]
    pub version: u32,
    pub jurisdictions: Vec<String>,
    pub bytes: u64,
    pub files: usize,
    pub complete_holders: Vec<String>,
    pub partial_holders: Vec<String>,
    pub created_unix_ms: u64,
}

impl DatasetRecord {
    pub fn summary(&self) -> DatasetSummary {
        DatasetSummary {
            id: self.id.clone(),
            name: self.name.clone(),
            version: self.version,
            jurisdictions: self.jurisdictions.clone(),
            bytes: self.bytes,
            files: self.files,
            complete_holders: self
                .holders
                .iter()
                .filter(|(_, h)| h.complete)
                .map(|(n, _)| n.clone())
                .collect(),
            partial_holders: self
                .holders
                .iter()
                .filter(|(_, h)| !h.complete)
                .map(|(n, _)| n.clone())
                .collect(),
            created_unix_ms: self.created_unix_ms,
        }
    }
}
