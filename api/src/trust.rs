//! Join tokens (never their secrets) and the audit trail, as the API shows them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A created token; `join` is shown once and never stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    pub id: String,
    pub join: String,
    pub expires: String,
    pub uses: u32,
}

/// A token as listed (never the secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub name: Option<String>,
    pub region: Option<String>,
    pub jurisdiction: Option<String>,
    pub provider: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub uses: u32,
    pub max_uses: u32,
    pub expires: String,
    /// `active`, `expired`, `used` or `revoked`.
    pub status: String,
}

/// One audit-trail entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_unix_ms: u64,
    /// `token-created`, `token-revoked`, `enrolled`, `enroll-refused`, `renewed`,
    /// `KIND-revoked`, or `api` (a change made through the API; `detail` says which).
    pub event: String,
    pub agent: Option<String>,
    pub token_id: Option<String>,
    pub serial: Option<String>,
    pub not_after_unix: Option<i64>,
    pub detail: String,
    /// Who made the change (SPIFFE id of the API caller); `None` for the mesh's own
    /// events (enrollments, renewals) and records from before this field.
    #[serde(default)]
    pub actor: Option<String>,
}
