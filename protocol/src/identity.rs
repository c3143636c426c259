//! Mesh identities: SPIFFE IDs and policy attributes carried in X.509 certificates.
//!
//! Every certificate of the mesh has exactly one SPIFFE URI SAN,
//! `spiffe://<trust-domain>/<kind>/<name>` with kind `agent`, `coordinator` or
//! `operator`. Attributes that placement and residency policy depend on are written by
//! the issuer as additional URI SANs of the form `urn:fleetmesh:<key>:<value>`
//! (keys `region`, `jurisdiction`, `provider`), and placement labels as
//! `urn:fleetmesh:label:<key>=<value>`. The coordinator reads identity and
//! attributes from the verified peer certificate only; nothing a peer says in a message
//! can change them.

use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

/// Prefix of attribute URI SANs.
pub const ATTR_URI_PREFIX: &str = "urn:fleetmesh:";

/// Identity errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate could not be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("certificate has more than one SPIFFE URI SAN")]
    MultipleSpiffeIds,
    #[error("malformed SPIFFE ID {0:?}: expected spiffe://<trust-domain>/<agent|coordinator|operator>/<name>")]
    BadSpiffeId(String),
    #[error("invalid {what} {value:?}: use 1-63 characters from [A-Za-z0-9._-], starting with a letter or digit")]
    BadName { what: &'static str, value: String },
    #[error("no peer certificate was presented")]
    NoCertificate,
}

/// Role of a mesh identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerKind {
    Agent,
    Coordinator,
    Operator,
}

impl PeerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerKind::Agent => "agent",
            PeerKind::Coordinator => "coordinator",
            PeerKind::Operator => "operator",
        }
    }
}

impl std::str::FromStr for PeerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "agent" => Ok(PeerKind::Agent),
            "coordinator" => Ok(PeerKind::Coordinator),
            "operator" => Ok(PeerKind::Operator),
            other => Err(format!("unknown kind {other:?} (agent, coordinator or operator)")),
        }
    }
}

impl std::fmt::Display for PeerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Policy attributes granted by the issuer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attributes {
    pub region: Option<String>,
    pub jurisdiction: Option<String>,
    pub provider: Option<String>,
    /// Placement labels granted by the issuer (`urn:fleetmesh:label:<key>=<value>`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Attributes {
    /// The attribute URI SANs for these attributes.
    pub fn to_uris(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in [
            ("region", &self.region),
            ("jurisdiction", &self.jurisdiction),
            ("provider", &self.provider),
        ] {
            if let Some(v) = v {
                out.push(format!("{ATTR_URI_PREFIX}{k}:{v}"));
            }
        }
        for (k, v) in &self.labels {
            out.push(format!("{ATTR_URI_PREFIX}label:{k}={v}"));
        }
        out
    }

    /// Validate every present attribute value.
    pub fn validate(&self) -> Result<(), IdentityError> {
        for (what, v) in [
            ("region", &self.region),
            ("jurisdiction", &self.jurisdiction),
            ("provider", &self.provider),
        ] {
            if let Some(v) = v {
                validate_label(what, v)?;
            }
        }
        for (k, v) in &self.labels {
            validate_label("label key", k)?;
            validate_label("label value", v)?;
        }
        Ok(())
    }
}

/// A verified peer as read from its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerIdentity {
    pub trust_domain: String,
    pub kind: PeerKind,
    pub name: String,
    pub attributes: Attributes,
    /// Certificate serial number, lower-case hex.
    pub serial: String,
    /// Certificate start of validity, seconds since the Unix epoch.
    pub not_before_unix: i64,
    /// Certificate expiry, seconds since the Unix epoch.
    pub not_after_unix: i64,
}

impl PeerIdentity {
    pub fn spiffe_id(&self) -> String {
        spiffe_id(&self.trust_domain, self.kind, &self.name)
    }
}

/// Check a name or attribute value: 1-63 chars of `[A-Za-z0-9._-]`, alphanumeric first.
pub fn validate_label(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadName { what, value: value.to_string() })
    }
}

/// Build a SPIFFE ID.
pub fn spiffe_id(trust_domain: &str, kind: PeerKind, name: &str) -> String {
    format!("spiffe://{trust_domain}/{}/{name}", kind.as_str())
}

/// Parse a SPIFFE ID into (trust domain, kind, name).
pub fn parse_spiffe_id(uri: &str) -> Result<(String, PeerKind, String), IdentityError> {
    let bad = || IdentityError::BadSpiffeId(uri.to_string());
    let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
    let mut parts = rest.split('/');
    let (Some(domain), Some(kind), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if domain.is_empty() {
        return Err(bad());
    }
    let kind: PeerKind = kind.parse().map_err(|_| bad())?;
    validate_label("name", name)?;
    Ok((domain.to_string(), kind, name.to_string()))
}

/// Read the mesh identity from a DER certificate. This does not verify the chain: call it
/// only on a certificate rustls has already verified.
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let mut spiffe = None;
    let mut attributes = Attributes::default();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let GeneralName::URI(uri) = gn {
                if uri.starts_with("spiffe://") {
                    if spiffe.is_some() {
                        return Err(IdentityError::MultipleSpiffeIds);
                    }
                    spiffe = Some(parse_spiffe_id(uri)?);
                } else if let Some(attr) = uri.strip_prefix(ATTR_URI_PREFIX) {
                    if let Some((k, v)) = attr.split_once(':') {
                        if k == "label" {
                            if let Some((lk, lv)) = v.split_once('=') {
                                attributes.labels.insert(lk.to_string(), lv.to_string());
                            }
                            continue;
                        }
                        let slot = match k {
                            "region" => &mut attributes.region,
                            "jurisdiction" => &mut attributes.jurisdiction,
                            "provider" => &mut attributes.provider,
                            _ => continue,
                        };
                        *slot = Some(v.to_string());
                    }
                }
            }
        }
    }
    let (trust_domain, kind, name) = spiffe.ok_or(IdentityError::NoSpiffeId)?;
    Ok(PeerIdentity {
        trust_domain,
        kind,
        name,
        attributes,
        serial: hex::encode(cert.raw_serial()),
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_round_trip() {
        let id = spiffe_id("mesh.example", PeerKind::Agent, "gpu-01");
        assert_eq!(id, "spiffe://mesh.example/agent/gpu-01");
        assert_eq!(
            parse_spiffe_id(&id).unwrap(),
            ("mesh.example".into(), PeerKind::Agent, "gpu-01".into())
        );
    }

    #[test]
    fn bad_spiffe_ids() {
        for s in [
            "https://x/agent/a",
            "spiffe:///agent/a",
            "spiffe://d/robot/a",
            "spiffe://d/agent/a/b",
            "spiffe://d/agent/",
            "spiffe://d/agent/../x",
        ] {
            assert!(parse_spiffe_id(s).is_err(), "{s} should be rejected");
        }
    }

    #[test]
    fn labels() {
        assert!(validate_label("name", "node-1.eu_west").is_ok());
        assert!(validate_label("name", "-x").is_err());
        assert!(validate_label("name", "a b").is_err());
        assert!(validate_label("name", &"a".repeat(64)).is_err());
    }
}
