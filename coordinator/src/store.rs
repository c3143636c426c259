//! Embedded transactional store (redb) in the coordinator's data dir.
//!
//! Table `agents`: agent name -> JSON [`AgentRecord`]. JSON (not bincode) so records
//! stay readable and new fields can be added with `#[serde(default)]` without a
//! migration. Every write is one redb transaction committed with immediate durability,
//! so an acknowledged change survives `kill -9`.

use std::path::{Path, PathBuf};

use fleetmesh_protocol::Attributes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::liveness::AgentState;

const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {msg}")]
    Open { path: PathBuf, msg: String },
    #[error("store: {0}")]
    Db(String),
    #[error("store record {key:?} is corrupt: {msg}")]
    Corrupt { key: String, msg: String },
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// What the registry remembers about an agent across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: String,
    pub spiffe_id: String,
    pub attributes: Attributes,
    pub state: AgentState,
    pub first_seen_unix_ms: u64,
    pub last_seen_unix_ms: u64,
    #[serde(default)]
    pub cert_serial: String,
    #[serde(default)]
    pub hostname: Option<String>,
}

/// The coordinator's store.
pub struct Store {
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Open (or create) `DATA_DIR/fleetmesh.redb`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("fleetmesh.redb");
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::Open { path: path.clone(), msg: e.to_string() })?;
        let db = Database::create(&path)
            .map_err(|e| StoreError::Open { path: path.clone(), msg: e.to_string() })?;
        let tx = db.begin_write().map_err(db_err(&path))?;
        tx.open_table(AGENTS).map_err(db_err(&path))?;
        tx.commit().map_err(db_err(&path))?;
        Ok(Self { db })
    }

    /// Insert or replace agent records in one transaction.
    pub fn put_agents(&self, records: &[AgentRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut t = tx.open_table(AGENTS).map_err(db)?;
            for r in records {
                let v = serde_json::to_vec(r).map_err(db)?;
                t.insert(r.name.as_str(), v.as_slice()).map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    /// Every agent record.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(AGENTS).map_err(db)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db)? {
            let (k, v) = item.map_err(db)?;
            let rec: AgentRecord = serde_json::from_slice(v.value()).map_err(|e| {
                StoreError::Corrupt { key: k.value().to_string(), msg: e.to_string() }
            })?;
            out.push(rec);
        }
        Ok(out)
    }
}

fn db_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> StoreError + '_ {
    move |e| StoreError::Open { path: path.to_path_buf(), msg: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let rec = AgentRecord {
            name: "a1".into(),
            spiffe_id: "spiffe://t/agent/a1".into(),
            attributes: Attributes { region: Some("eu".into()), ..Default::default() },
            state: AgentState::Connected,
            first_seen_unix_ms: 1,
            last_seen_unix_ms: 2,
            cert_serial: "ab".into(),
            hostname: None,
        };
        {
            let s = Store::open(dir.path()).unwrap();
            s.put_agents(std::slice::from_ref(&rec)).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.agents().unwrap(), vec![rec]);
    }
}
