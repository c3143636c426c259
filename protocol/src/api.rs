//! Request bodies of the coordinator's HTTPS JSON API, with the checks that need no
//! state. The coordinator deserialises them from untrusted clients, the CLI builds them;
//! the fuzz target `api_bodies` feeds them arbitrary JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::Manifest;
use crate::identity::{validate_label, Attributes};

/// `POST /api/v1/tokens`: what an operator asks for when creating a join token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    pub region: Option<String>,
    pub jurisdiction: Option<String>,
    pub provider: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Fixed agent name; absent = the name the node asks for.
    pub name: Option<String>,
    /// Enrollments allowed [default 1].
    pub uses: Option<u32>,
    /// Lifetime, e.g. `1h` [default 1h].
    pub ttl: Option<String>,
    /// Coordinator addresses to put in the join string [default: the coordinator's
    /// advertised addresses].
    #[serde(default)]
    pub coordinators: Vec<String>,
}

impl TokenSpec {
    /// The attributes the token binds, checked; names, labels and uses checked too.
    pub fn checked_attributes(&self) -> Result<Attributes, String> {
        let attributes = Attributes {
            region: self.region.clone(),
            jurisdiction: self.jurisdiction.clone(),
            provider: self.provider.clone(),
            labels: self.labels.clone(),
        };
        attributes.validate().map_err(|e| e.to_string())?;
        if let Some(n) = &self.name {
            validate_label("name", n).map_err(|e| e.to_string())?;
        }
        for (k, v) in &self.labels {
            validate_label("label key", k).map_err(|e| e.to_string())?;
            validate_label("label value", v).map_err(|e| e.to_string())?;
        }
        if self.uses == Some(0) {
            return Err("uses must be at least 1".into());
        }
        Ok(attributes)
    }
}

/// `POST /api/v1/data`: register a dataset whose chunks were uploaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PutBody {
    pub name: String,
    #[serde(default)]
    pub jurisdictions: Vec<String>,
    pub manifest: Manifest,
    /// Also place it on this agent.
    pub on: Option<String>,
    /// Allow this version to live in more places than the newest one of its name.
    #[serde(default)]
    pub loosen_residency: bool,
}

impl PutBody {
    /// Name, jurisdictions and manifest are well formed.
    pub fn validate(&self) -> Result<(), String> {
        validate_label("dataset name", &self.name).map_err(|e| e.to_string())?;
        for j in &self.jurisdictions {
            validate_label("jurisdiction", j).map_err(|e| e.to_string())?;
        }
        if let Some(a) = &self.on {
            validate_label("agent name", a).map_err(|e| e.to_string())?;
        }
        self.manifest.validate().map_err(|e| e.to_string())
    }
}

/// `POST /api/v1/data/{ref}/place`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaceBody {
    pub agent: String,
}

/// `POST /api/v1/agents/{name}/drain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainBody {
    #[serde(default = "yes")]
    pub draining: bool,
}

fn yes() -> bool {
    true
}

/// `POST /api/v1/.../revoke`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RevokeBody {
    #[serde(default)]
    pub reason: Option<String>,
}
