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

use crate::fleet::liveness::AgentState;

const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Audit trail, keyed by a strictly increasing sequence (µs since the epoch, bumped on
/// collision).
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const REVOKED_SERIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked_serials");
const REVOKED_AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked_agents");
/// Workflows and jobs (JSON; the scheduler owns their shape).
const WORKFLOWS: TableDefinition<&str, &[u8]> = TableDefinition::new("workflows");
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Dataset index (DataBroker): id -> JSON record.
const DATASETS: TableDefinition<&str, &[u8]> = TableDefinition::new("datasets");
/// The autoscaler's pools: their nodes and history, one record under [`POOLS_KEY`].
const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pools");
const POOLS_KEY: &str = "state";

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
    /// No new awards; running jobs finish.
    #[serde(default)]
    pub draining: bool,
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
        tx.open_table(TOKENS).map_err(db_err(&path))?;
        tx.open_table(AUDIT).map_err(db_err(&path))?;
        tx.open_table(REVOKED_SERIALS).map_err(db_err(&path))?;
        tx.open_table(REVOKED_AGENTS).map_err(db_err(&path))?;
        tx.open_table(WORKFLOWS).map_err(db_err(&path))?;
        tx.open_table(JOBS).map_err(db_err(&path))?;
        tx.open_table(DATASETS).map_err(db_err(&path))?;
        tx.open_table(POOLS).map_err(db_err(&path))?;
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

/// A join token as stored (the secret only as its SHA-256).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    pub max_uses: u32,
    pub uses: u32,
    pub revoked: bool,
    /// Name the enrolled agent gets; `None` = the name the node asks for.
    pub name: Option<String>,
    pub attributes: Attributes,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

pub use fleetmesh_api::trust::AuditRecord;

/// Why a token could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("unknown join token {0}")]
    Unknown(String),
    #[error("join token {0} has expired")]
    Expired(String),
    #[error("join token {0} has no uses left")]
    UsedUp(String),
    #[error("join token {0} has been revoked")]
    Revoked(String),
    #[error("wrong secret for join token {0}")]
    WrongSecret(String),
}

/// Errors of [`Store::consume_token`].
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Refused(#[from] TokenRefusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(db)
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v)
        .map_err(|e| StoreError::Corrupt { key: key.to_string(), msg: e.to_string() })
}

impl Store {
    pub fn put_token(&self, t: &TokenRecord, audit: &AuditRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut tt = tx.open_table(TOKENS).map_err(db)?;
            tt.insert(t.id.as_str(), json(t)?.as_slice()).map_err(db)?;
            append_audit(&tx, audit)?;
        }
        tx.commit().map_err(db)
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(TOKENS).map_err(db)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db)? {
            let (k, v) = item.map_err(db)?;
            out.push(parse(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Check a token and use it once, atomically, recording `audit` in the same
    /// transaction. Nothing is written when the token is refused.
    pub fn consume_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now_unix_ms: u64,
        audit: &AuditRecord,
    ) -> Result<TokenRecord, ConsumeError> {
        let tx = self.db.begin_write().map_err(db)?;
        let token = {
            let mut tt = tx.open_table(TOKENS).map_err(db)?;
            let mut token: TokenRecord = match tt.get(id).map_err(db)? {
                Some(v) => parse(id, v.value())?,
                None => return Err(TokenRefusal::Unknown(id.to_string()).into()),
            };
            if !ct_eq(token.secret_sha256.as_bytes(), secret_sha256.as_bytes()) {
                return Err(TokenRefusal::WrongSecret(id.to_string()).into());
            }
            if token.revoked {
                return Err(TokenRefusal::Revoked(id.to_string()).into());
            }
            if now_unix_ms >= token.expires_unix_ms {
                return Err(TokenRefusal::Expired(id.to_string()).into());
            }
            if token.uses >= token.max_uses {
                return Err(TokenRefusal::UsedUp(id.to_string()).into());
            }
            token.uses += 1;
            tt.insert(id, json(&token)?.as_slice()).map_err(db)?;
            token
        };
        append_audit(&tx, audit)?;
        tx.commit().map_err(db)?;
        Ok(token)
    }

    /// Mark a token revoked. `Ok(false)` if there is no such token.
    pub fn revoke_token(&self, id: &str, audit: &AuditRecord) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut tt = tx.open_table(TOKENS).map_err(db)?;
            let mut token: TokenRecord = match tt.get(id).map_err(db)? {
                Some(v) => parse(id, v.value())?,
                None => return Ok(false),
            };
            token.revoked = true;
            tt.insert(id, json(&token)?.as_slice()).map_err(db)?;
            append_audit(&tx, audit)?;
        }
        tx.commit().map_err(db)?;
        Ok(true)
    }

    pub fn append_audit(&self, audit: &AuditRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        append_audit(&tx, audit)?;
        tx.commit().map_err(db)
    }

    pub fn audit(&self) -> Result<Vec<AuditRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(AUDIT).map_err(db)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db)? {
            let (k, v) = item.map_err(db)?;
            out.push(parse(&k.value().to_string(), v.value())?);
        }
        Ok(out)
    }

    /// Deny an agent name and certificate serials, with an audit record, atomically.
    pub fn revoke_agent(
        &self,
        name: &str,
        serials: &[String],
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut ra = tx.open_table(REVOKED_AGENTS).map_err(db)?;
            ra.insert(name, json(audit)?.as_slice()).map_err(db)?;
            let mut rs = tx.open_table(REVOKED_SERIALS).map_err(db)?;
            for s in serials {
                rs.insert(s.as_str(), json(audit)?.as_slice()).map_err(db)?;
            }
            append_audit(&tx, audit)?;
        }
        tx.commit().map_err(db)
    }

    /// Revoked agent names and serials.
    pub fn revoked(&self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let mut names = Vec::new();
        for item in tx.open_table(REVOKED_AGENTS).map_err(db)?.iter().map_err(db)? {
            names.push(item.map_err(db)?.0.value().to_string());
        }
        let mut serials = Vec::new();
        for item in tx.open_table(REVOKED_SERIALS).map_err(db)?.iter().map_err(db)? {
            serials.push(item.map_err(db)?.0.value().to_string());
        }
        Ok((names, serials))
    }
}

impl Store {
    /// Write workflow and job records (already serialised) in one transaction.
    pub fn put_work(
        &self,
        workflows: &[(String, Vec<u8>)],
        jobs: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        if workflows.is_empty() && jobs.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut w = tx.open_table(WORKFLOWS).map_err(db)?;
            for (k, v) in workflows {
                w.insert(k.as_str(), v.as_slice()).map_err(db)?;
            }
            let mut j = tx.open_table(JOBS).map_err(db)?;
            for (k, v) in jobs {
                j.insert(k.as_str(), v.as_slice()).map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    /// All workflow and job records.
    #[allow(clippy::type_complexity)]
    pub fn work(&self) -> Result<(Vec<(String, Vec<u8>)>, Vec<(String, Vec<u8>)>), StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let mut ws = Vec::new();
        for item in tx.open_table(WORKFLOWS).map_err(db)?.iter().map_err(db)? {
            let (k, v) = item.map_err(db)?;
            ws.push((k.value().to_string(), v.value().to_vec()));
        }
        let mut js = Vec::new();
        for item in tx.open_table(JOBS).map_err(db)?.iter().map_err(db)? {
            let (k, v) = item.map_err(db)?;
            js.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok((ws, js))
    }
}

impl Store {
    /// Insert or replace dataset records, and delete others, in one transaction.
    pub fn put_datasets(
        &self,
        put: &[(String, Vec<u8>)],
        delete: &[String],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut t = tx.open_table(DATASETS).map_err(db)?;
            for (k, v) in put {
                t.insert(k.as_str(), v.as_slice()).map_err(db)?;
            }
            for k in delete {
                t.remove(k.as_str()).map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    /// Replace the autoscaler's record (durable when this returns).
    pub fn put_pools(&self, record: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        tx.open_table(POOLS).map_err(db)?.insert(POOLS_KEY, record).map_err(db)?;
        tx.commit().map_err(db)
    }

    /// The autoscaler's record, if one was stored.
    pub fn pools(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(POOLS).map_err(db)?;
        Ok(t.get(POOLS_KEY).map_err(db)?.map(|v| v.value().to_vec()))
    }

    /// Every dataset record.
    pub fn datasets(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let mut out = Vec::new();
        for item in tx.open_table(DATASETS).map_err(db)?.iter().map_err(db)? {
            out.push(item.map_err(db)?.1.value().to_vec());
        }
        Ok(out)
    }
}

fn append_audit(tx: &redb::WriteTransaction, audit: &AuditRecord) -> Result<(), StoreError> {
    let mut t = tx.open_table(AUDIT).map_err(db)?;
    let mut key = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    if let Some(last) = t.last().map_err(db)? {
        key = key.max(last.0.value() + 1);
    }
    t.insert(key, json(audit)?.as_slice()).map_err(db)?;
    Ok(())
}

fn db_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> StoreError + '_ {
    move |e| StoreError::Open { path: path.to_path_buf(), msg: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str, max_uses: u32, expires: u64) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            secret_sha256: "s".repeat(64),
            created_unix_ms: 0,
            expires_unix_ms: expires,
            max_uses,
            uses: 0,
            revoked: false,
            name: None,
            attributes: Attributes::default(),
            labels: Default::default(),
        }
    }

    fn audit(event: &str) -> AuditRecord {
        AuditRecord {
            at_unix_ms: 1,
            event: event.into(),
            agent: None,
            token_id: None,
            serial: None,
            not_after_unix: None,
            detail: String::new(),
            actor: None,
        }
    }

    #[test]
    fn tokens_are_consumed_atomically_and_refusals_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put_token(&token("t1", 1, 1000), &audit("token-created")).unwrap();
        let ok = "s".repeat(64);
        let e = s.consume_token("t1", &"x".repeat(64), 10, &audit("enrolled")).unwrap_err();
        assert!(matches!(e, ConsumeError::Refused(TokenRefusal::WrongSecret(_))));
        let e = s.consume_token("t1", &ok, 1000, &audit("enrolled")).unwrap_err();
        assert!(matches!(e, ConsumeError::Refused(TokenRefusal::Expired(_))));
        assert_eq!(s.consume_token("t1", &ok, 10, &audit("enrolled")).unwrap().uses, 1);
        let e = s.consume_token("t1", &ok, 10, &audit("enrolled")).unwrap_err();
        assert!(matches!(e, ConsumeError::Refused(TokenRefusal::UsedUp(_))));
        s.put_token(&token("t2", 5, 1000), &audit("token-created")).unwrap();
        assert!(s.revoke_token("t2", &audit("token-revoked")).unwrap());
        let e = s.consume_token("t2", &ok, 10, &audit("enrolled")).unwrap_err();
        assert!(matches!(e, ConsumeError::Refused(TokenRefusal::Revoked(_))));
        assert!(matches!(
            s.consume_token("nope", &ok, 10, &audit("enrolled")),
            Err(ConsumeError::Refused(TokenRefusal::Unknown(_)))
        ));
        let events: Vec<String> = s.audit().unwrap().into_iter().map(|a| a.event).collect();
        assert_eq!(events, ["token-created", "enrolled", "token-created", "token-revoked"]);
    }

    #[test]
    fn revocations_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.revoke_agent("a1", &["0abc".into()], &audit("agent-revoked")).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.revoked().unwrap(), (vec!["a1".to_string()], vec!["0abc".to_string()]));
    }

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
            draining: false,
        };
        {
            let s = Store::open(dir.path()).unwrap();
            s.put_agents(std::slice::from_ref(&rec)).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.agents().unwrap(), vec![rec]);
    }
}
