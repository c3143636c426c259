//! Revoked identities, shared by everyone who checks a peer: the Api on every request,
//! the Listener at hello, the Fleet (which tells agents' data ports), the Authority
//! (which changes it and stores it). Not an actor: checked synchronously on hot paths.

use std::collections::HashSet;

use fleetmesh_protocol::{CoordinatorMessage, PeerIdentity, PeerKind};

/// Revoked identities and serials, written by the Authority and read by every port.
#[derive(Debug, Default)]
pub struct Revocations {
    inner: std::sync::RwLock<(HashSet<String>, HashSet<String>)>,
}

impl Revocations {
    /// The key an identity is revoked under: agents by name (as stored since the first
    /// release), every other kind as `KIND/NAME`.
    pub fn key(kind: PeerKind, name: &str) -> String {
        match kind {
            PeerKind::Agent => name.to_string(),
            other => format!("{other}/{name}"),
        }
    }

    /// `Some(reason)` when this identity must be refused.
    pub fn check(&self, id: &PeerIdentity) -> Option<String> {
        let g = self.inner.read().ok()?;
        (g.1.contains(&id.serial) || g.0.contains(&Self::key(id.kind, &id.name)))
            .then(|| format!("certificate of {} is revoked", id.spiffe_id()))
    }

    /// What data-plane holders must refuse: revoked agent names and every revoked serial.
    pub fn denied(&self) -> CoordinatorMessage {
        let (agents, serials) = self
            .inner
            .read()
            .map(|g| {
                (
                    g.0.iter().filter(|k| !k.contains('/')).cloned().collect(),
                    g.1.iter().cloned().collect(),
                )
            })
            .unwrap_or_default();
        CoordinatorMessage::Denied { agents, serials }
    }

    /// Nothing revoked yet.
    pub fn is_empty(&self) -> bool {
        self.inner.read().is_ok_and(|g| g.0.is_empty() && g.1.is_empty())
    }

    pub(crate) fn name_revoked(&self, key: &str) -> bool {
        self.inner.read().map(|g| g.0.contains(key)).unwrap_or(true)
    }

    pub(crate) fn add(
        &self,
        names: impl IntoIterator<Item = String>,
        serials: impl IntoIterator<Item = String>,
    ) {
        if let Ok(mut g) = self.inner.write() {
            g.0.extend(names);
            g.1.extend(serials);
        }
    }
}
