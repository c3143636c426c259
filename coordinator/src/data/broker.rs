//! `DataBroker`: the dataset index (who holds what, complete or partial), residency,
//! fetch plans and the tickets that authorise them.
//!
//! It is a shared service object rather than an actor: the Scheduler asks it for plans
//! while deciding an award and the Api for listings, both synchronously and cheaply (an
//! in-memory index behind a mutex, written through to the redb `datasets` table).
//! The decisions ([`plan_for`]) are pure functions of the index, the candidates and `now`.
//!
//! The coordinator's own chunk store (filled by `fleetmesh data put`) is a holder like an
//! agent, served on the control port under ALPN `fleetmesh/xfer/1`. Plans prefer agent
//! holders: the coordinator serves data only when no connected agent holds a complete copy.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fleetmesh_data::{LocalDataset, XferServer};
use fleetmesh_protocol::data::{
    residency_allows, short, FetchPlan, Holder, Manifest, Ticket, TicketSigner,
};
use fleetmesh_protocol::{FetchReport, Holding, PeerKind};
use tracing::{info, warn};

use crate::persist::store::Store;
use crate::placement::auction::Candidate;

/// How long a ticket stays valid: long enough for a large fetch to start from every
/// holder, short enough that a leaked ticket is soon useless.
pub const TICKET_TTL_MS: u64 = 10 * 60 * 1000;

pub use fleetmesh_api::data::{DatasetRecord, DatasetSummary, HolderState};

use fleetmesh_data::now_unix_ms as now_ms;

/// Uploaded chunks no dataset refers to are kept this long: an upload takes at most this
/// long between its first chunk and its registration.
const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);
/// How often the coordinator's store is swept for orphan chunks.
const ORPHAN_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// The newest version of `name` in the index.
fn newest<'a>(idx: &'a BTreeMap<String, DatasetRecord>, name: &str) -> Option<&'a DatasetRecord> {
    idx.values().filter(|d| d.name == name).max_by_key(|d| (d.version, d.created_unix_ms))
}

/// Whether residency `new` allows a place that `old` does not (empty = anywhere).
fn is_looser(new: &[String], old: &[String]) -> bool {
    !old.is_empty() && (new.is_empty() || new.iter().any(|j| !old.contains(j)))
}

/// Who asks for a plan.
#[derive(Debug, Clone)]
pub struct Requester {
    pub kind: PeerKind,
    pub name: String,
    pub jurisdiction: Option<String>,
}

/// Why the broker refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// Residency forbids the requester (the message names both sides).
    #[error("{0}")]
    Residency(String),
    #[error("no connected holder has a complete copy of {name} ({id})")]
    NoHolder { name: String, id: String },
    #[error("no dataset {0}")]
    NoDataset(String),
    #[error("dataset {name} may only live in {old:?}; a new version allowed in {new} would loosen that: pass --loosen-residency to do it on purpose")]
    WouldLoosen { name: String, old: Vec<String>, new: String },
    #[error("{0} chunk(s) of the manifest were not uploaded")]
    NotUploaded(usize),
    #[error("invalid manifest: {0}")]
    Manifest(String),
    #[error("ticket signing key {path}: {msg}")]
    SigningKey { path: String, msg: String },
    /// The coordinator's own chunk store or its redb index.
    #[error("store: {0}")]
    Store(String),
    /// Fetching into the coordinator's own store failed.
    #[error("fetch: {0}")]
    Fetch(String),
}

/// Choose holders for `requester` and sign a ticket for each (pure; `now` injected).
/// Refuses with the reason when residency forbids the requester.
pub fn plan_for(
    d: &DatasetRecord,
    requester: &Requester,
    candidates: &[Candidate],
    coordinator: Option<(&str, &str)>,
    signer: &TicketSigner,
    now: u64,
) -> Result<FetchPlan, BrokerError> {
    if requester.kind == PeerKind::Agent
        && !residency_allows(&d.jurisdictions, requester.jurisdiction.as_deref())
    {
        return Err(BrokerError::Residency(format!(
            "residency: dataset {} ({}) may only live in {:?}; agent {} is in {}",
            d.name,
            short(&d.id),
            d.jurisdictions,
            requester.name,
            requester.jurisdiction.as_deref().unwrap_or("no jurisdiction")
        )));
    }
    let ticket = |holder: &str| {
        signer.sign(Ticket {
            dataset: d.id.clone(),
            requester: requester.name.clone(),
            requester_kind: requester.kind,
            holder: holder.to_string(),
            jurisdictions: d.jurisdictions.clone(),
            expires_unix_ms: now + TICKET_TTL_MS,
        })
    };
    let mut holders: Vec<Holder> = candidates
        .iter()
        .filter(|c| c.connected && c.agent != requester.name)
        .filter(|c| d.holders.get(&c.agent).is_some_and(|h| h.complete))
        .filter_map(|c| {
            c.data_addr.as_ref().map(|addr| Holder {
                name: c.agent.clone(),
                kind: PeerKind::Agent,
                addr: addr.clone(),
                ticket: ticket(&c.agent),
            })
        })
        .collect();
    if holders.is_empty() {
        if let Some((name, addr)) = coordinator {
            if d.holders.get(name).is_some_and(|h| h.complete) && requester.name != name {
                holders.push(Holder {
                    name: name.to_string(),
                    kind: PeerKind::Coordinator,
                    addr: addr.to_string(),
                    ticket: ticket(name),
                });
            }
        }
    }
    // A requester that already holds a complete copy needs nobody (an empty plan).
    let has_it = d.holders.get(&requester.name).is_some_and(|h| h.complete);
    if holders.is_empty() && !has_it {
        return Err(BrokerError::NoHolder { name: d.name.clone(), id: short(&d.id).to_string() });
    }
    Ok(FetchPlan {
        dataset: d.id.clone(),
        name: d.name.clone(),
        jurisdictions: d.jurisdictions.clone(),
        bytes: d.bytes,
        holders,
    })
}

/// The dataset index and ticket authority.
pub struct DataBroker {
    store: Arc<Store>,
    signer: TicketSigner,
    /// The coordinator's own chunk store and its xfer server.
    pub local: Arc<fleetmesh_data::Store>,
    pub server: Arc<XferServer>,
    /// Our certificate name (as a holder) and the address agents reach us at.
    name: String,
    addr: Mutex<Option<String>>,
    index: Mutex<BTreeMap<String, DatasetRecord>>,
}

impl std::fmt::Debug for DataBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataBroker").field("name", &self.name).finish_non_exhaustive()
    }
}

impl DataBroker {
    /// Load (or create) the signing key `<data>/ticket-signing.key` and the index.
    pub fn open(
        data_dir: &std::path::Path,
        store: Arc<Store>,
        name: &str,
        trust_domain: &str,
        store_limit: u64,
    ) -> Result<Arc<Self>, BrokerError> {
        let key_path = data_dir.join("ticket-signing.key");
        let key_err =
            |msg: String| BrokerError::SigningKey { path: key_path.display().to_string(), msg };
        let der = match std::fs::read(&key_path) {
            Ok(d) => d,
            Err(_) => {
                let d = TicketSigner::generate_pkcs8().map_err(|e| key_err(e.to_string()))?;
                fleetmesh_protocol::pki::write_private(&key_path, &d, false)
                    .map_err(|e| key_err(e.to_string()))?;
                d
            }
        };
        let signer = TicketSigner::from_pkcs8(&der).map_err(|e| key_err(e.to_string()))?;
        let local = Arc::new(
            fleetmesh_data::Store::open(&data_dir.join("datastore"), store_limit)
                .map_err(|e| BrokerError::Store(e.to_string()))?,
        );
        let server =
            XferServer::new(local.clone(), name, trust_domain, Some(signer.public_key()), None);
        let mut index = BTreeMap::new();
        for raw in store.datasets().map_err(|e| BrokerError::Store(e.to_string()))? {
            match serde_json::from_slice::<DatasetRecord>(&raw) {
                Ok(r) => {
                    index.insert(r.id.clone(), r);
                }
                Err(e) => warn!(error = %e, "unreadable dataset record skipped"),
            }
        }
        Ok(Arc::new(Self {
            store,
            signer,
            local,
            server,
            name: name.to_string(),
            addr: Mutex::new(None),
            index: Mutex::new(index),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ticket_key(&self) -> Vec<u8> {
        self.signer.public_key()
    }

    /// Where agents reach the coordinator's store.
    pub fn set_addr(&self, addr: String) {
        if let Ok(mut a) = self.addr.lock() {
            *a = Some(addr);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DatasetRecord>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, recs: &[&DatasetRecord], delete: &[String]) {
        let put: Vec<(String, Vec<u8>)> = recs
            .iter()
            .filter_map(|r| serde_json::to_vec(r).ok().map(|v| (r.id.clone(), v)))
            .collect();
        if let Err(e) = self.store.put_datasets(&put, delete) {
            warn!(error = %e, "dataset index not persisted");
        }
    }

    /// A dataset by id, unique id prefix (8+ hex digits), `NAME@VERSION`, or name (its
    /// newest version).
    pub fn resolve(&self, r: &str) -> Option<DatasetRecord> {
        let idx = self.lock();
        if let Some(d) = idx.get(r) {
            return Some(d.clone());
        }
        if let Some((name, v)) = r.rsplit_once('@') {
            let v: u32 = v.parse().ok()?;
            return idx.values().find(|d| d.name == name && d.version == v).cloned();
        }
        if let Some(d) = newest(&idx, r) {
            return Some(d.clone());
        }
        if r.len() >= 8 && r.chars().all(|c| c.is_ascii_hexdigit()) {
            let mut m = idx.range(r.to_string()..).take_while(|(k, _)| k.starts_with(r));
            if let (Some((_, d)), None) = (m.next(), m.next()) {
                return Some(d.clone());
            }
        }
        None
    }

    pub fn list(&self) -> Vec<DatasetSummary> {
        let mut v: Vec<DatasetSummary> = self.lock().values().map(|d| d.summary()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.created_unix_ms.cmp(&b.created_unix_ms)));
        v
    }

    /// Record a dataset (or a new holder of a known one).
    pub fn register(
        &self,
        manifest: Manifest,
        name: &str,
        jurisdictions: Vec<String>,
        holder: &str,
        producer: Option<String>,
    ) -> DatasetRecord {
        self.register_at(manifest, name, jurisdictions, holder, producer, now_ms())
    }

    /// [`Self::register`], created at `now` if new.
    pub fn register_at(
        &self,
        manifest: Manifest,
        name: &str,
        jurisdictions: Vec<String>,
        holder: &str,
        producer: Option<String>,
        now: u64,
    ) -> DatasetRecord {
        let id = manifest.id();
        let mut idx = self.lock();
        let next_version = newest(&idx, name).filter(|d| d.id != id).map_or(1, |d| d.version + 1);
        let rec = idx.entry(id.clone()).or_insert_with(|| DatasetRecord {
            id: id.clone(),
            name: name.to_string(),
            jurisdictions: jurisdictions.clone(),
            bytes: manifest.total_bytes(),
            files: manifest.files.len(),
            chunks: manifest.unique_chunks().len(),
            holders: BTreeMap::new(),
            producer: producer.clone(),
            created_unix_ms: now,
            manifest: Arc::new(manifest),
            fetches: BTreeMap::new(),
            pending: Default::default(),
            version: next_version,
        });
        // The same content put again under another name takes that name (as its next
        // version); residency can only become stricter.
        if rec.name != name {
            rec.name = name.to_string();
            rec.version = next_version;
        }
        if let Some(j) = fleetmesh_protocol::data::intersect_residency([
            &rec.jurisdictions[..],
            &jurisdictions[..],
        ]) {
            rec.jurisdictions = j;
        }
        if producer.is_some() {
            rec.producer = producer;
        }
        rec.holders.insert(
            holder.to_string(),
            HolderState { complete: true, bytes_present: rec.bytes, updated_unix_ms: now },
        );
        let out = rec.clone();
        drop(idx);
        self.persist(&[&out], &[]);
        info!(dataset = %short(&out.id), name = %out.name, holder, bytes = out.bytes, "dataset registered");
        out
    }

    /// An agent's full list of holdings (after every hello, and on changes). Returns the
    /// datasets it was asked to fetch and does not hold completely yet.
    pub fn holdings(&self, agent: &str, list: &[Holding]) -> Vec<String> {
        let now = now_ms();
        let mut changed = Vec::new();
        let mut idx = self.lock();
        for (id, d) in idx.iter_mut() {
            let h = list.iter().find(|h| &h.dataset == id);
            let before = d.holders.get(agent).cloned();
            match h {
                Some(h) => {
                    let new = HolderState {
                        complete: h.complete,
                        bytes_present: h.bytes_present,
                        updated_unix_ms: now,
                    };
                    if before.as_ref().map(|b| (b.complete, b.bytes_present))
                        != Some((new.complete, new.bytes_present))
                    {
                        d.holders.insert(agent.to_string(), new);
                        changed.push(id.clone());
                    }
                }
                None => {
                    if before.is_some() {
                        d.holders.remove(agent);
                        changed.push(id.clone());
                    }
                }
            }
        }
        let redo: Vec<String> = idx
            .values()
            .filter(|d| d.pending.contains(agent))
            .filter(|d| !list.iter().any(|h| h.dataset == d.id && h.complete))
            .map(|d| d.id.clone())
            .collect();
        let recs: Vec<DatasetRecord> =
            changed.iter().filter_map(|id| idx.get(id).cloned()).collect();
        drop(idx);
        if !recs.is_empty() {
            self.persist(&recs.iter().collect::<Vec<_>>(), &[]);
        }
        redo
    }

    /// Remember how an agent's fetch ended (shown by `data show`).
    pub fn fetch_done(&self, agent: &str, r: FetchReport) {
        let mut idx = self.lock();
        let Some(d) = idx.get_mut(&r.dataset) else { return };
        d.pending.remove(agent);
        d.fetches.insert(agent.to_string(), r);
        let rec = d.clone();
        drop(idx);
        self.persist(&[&rec], &[]);
    }

    /// A new fetch by `agent` is starting: forget how the last one ended.
    pub fn fetch_started(&self, id: &str, agent: &str) {
        let mut idx = self.lock();
        if let Some(d) = idx.get_mut(id) {
            d.fetches.remove(agent);
            d.pending.insert(agent.to_string());
            let rec = d.clone();
            drop(idx);
            self.persist(&[&rec], &[]);
        }
    }

    /// Remove a dataset from the index (and the coordinator's store); returns the agents
    /// that hold it, to be told to drop it.
    pub fn remove(&self, id: &str) -> Vec<String> {
        let rec = self.lock().remove(id);
        self.persist(&[], &[id.to_string()]);
        self.local.remove_dataset(id);
        rec.map(|r| r.holders.into_keys().filter(|h| *h != self.name).collect()).unwrap_or_default()
    }

    /// A plan (with tickets) for `requester` to fetch `id`.
    pub fn plan(
        &self,
        id: &str,
        requester: &Requester,
        candidates: &[Candidate],
    ) -> Result<FetchPlan, BrokerError> {
        self.plan_at(id, requester, candidates, now_ms())
    }

    /// [`Self::plan`], with tickets valid from `now`.
    pub fn plan_at(
        &self,
        id: &str,
        requester: &Requester,
        candidates: &[Candidate],
        now: u64,
    ) -> Result<FetchPlan, BrokerError> {
        let addr = self.addr.lock().ok().and_then(|a| a.clone());
        let idx = self.lock();
        let d = idx.get(id).ok_or_else(|| BrokerError::NoDataset(short(id).to_string()))?;
        let r = plan_for(
            d,
            requester,
            candidates,
            addr.as_deref().map(|a| (self.name.as_str(), a)),
            &self.signer,
            now,
        );
        if let Err(why) = &r {
            warn!(dataset = %short(id), requester = %requester.name, reason = %why, "no fetch plan");
        }
        r
    }

    /// Store an uploaded dataset in the coordinator's own store and index it, as the
    /// next version of `name` when the name exists. A version may not be less restricted
    /// than the newest one unless `loosen_residency` says so explicitly; the second value
    /// is the residency that was loosened, for the audit trail.
    pub fn put_local(
        &self,
        manifest: Manifest,
        name: &str,
        jurisdictions: Vec<String>,
        loosen_residency: bool,
    ) -> Result<(DatasetRecord, Option<Vec<String>>), BrokerError> {
        manifest.validate().map_err(|e| BrokerError::Manifest(e.to_string()))?;
        let loosened = {
            let idx = self.lock();
            // Content already known keeps its residency (register only narrows it).
            match idx.get(&manifest.id()) {
                Some(_) => None,
                None => newest(&idx, name).map(|d| d.jurisdictions.clone()),
            }
        }
        .filter(|old| is_looser(&jurisdictions, old));
        if let (Some(old), false) = (&loosened, loosen_residency) {
            let new = if jurisdictions.is_empty() {
                "any jurisdiction".to_string()
            } else {
                format!("{jurisdictions:?}")
            };
            return Err(BrokerError::WouldLoosen { name: name.to_string(), old: old.clone(), new });
        }
        let missing = manifest.unique_chunks().iter().filter(|(h, _)| !self.local.has(h)).count();
        if missing > 0 {
            return Err(BrokerError::NotUploaded(missing));
        }
        let id = manifest.id();
        self.local
            .add_dataset(LocalDataset {
                id,
                name: name.to_string(),
                jurisdictions: jurisdictions.clone(),
                manifest: manifest.clone(),
            })
            .map_err(|e| BrokerError::Store(e.to_string()))?;
        let name_owned = self.name.clone();
        Ok((self.register(manifest, name, jurisdictions, &name_owned, None), loosened))
    }

    /// Remove chunks of the coordinator's store that no dataset refers to, once they are
    /// older than [`ORPHAN_GRACE`] (an upload whose registration was refused leaves its
    /// chunks behind; one in progress is younger than the grace), every
    /// [`ORPHAN_SWEEP_EVERY`].
    pub fn sweep_orphans_periodically(self: Arc<Self>) {
        let me = Arc::downgrade(&self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ORPHAN_SWEEP_EVERY);
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { return };
                let cutoff = std::time::SystemTime::now() - ORPHAN_GRACE;
                let _ = tokio::task::spawn_blocking(move || me.local.collect_orphans(cutoff)).await;
            }
        });
    }

    /// Make sure the coordinator's store holds `id` completely (for `data get`), fetching
    /// it from agent holders when needed.
    pub async fn stage_local(
        &self,
        id: &str,
        candidates: &[Candidate],
        tls: &fleetmesh_protocol::tls::TlsIdentity,
    ) -> Result<(), BrokerError> {
        if self.local.complete(id) {
            return Ok(());
        }
        let me =
            Requester { kind: PeerKind::Coordinator, name: self.name.clone(), jurisdiction: None };
        let plan = self.plan(id, &me, candidates)?;
        let ep =
            fleetmesh_data::xfer::endpoint((std::net::Ipv4Addr::UNSPECIFIED, 0).into(), tls, false)
                .map_err(|e| BrokerError::Fetch(e.to_string()))?;
        let r = fleetmesh_data::fetch(&ep, tls, self.local.clone(), &plan, Arc::new(|_| {})).await;
        ep.close(fleetmesh_protocol::codec::close_code::DONE.into(), b"done");
        let r = r.map_err(|e| BrokerError::Fetch(e.to_string()))?;
        info!(dataset = %short(id), fetched = r.fetched_chunks, "staged in the coordinator store for download");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetmesh_protocol::data::{verify_ticket, FileEntry};

    fn cand(name: &str, j: &str, connected: bool) -> Candidate {
        Candidate {
            agent: name.into(),
            connected,
            draining: false,
            region: None,
            jurisdiction: Some(j.into()),
            provider: None,
            labels: Default::default(),
            spot: false,
            price_per_hour: 1.0,
            free_gpus: vec![],
            gpu_uuids: vec![],
            addr: Some("127.0.0.1".into()),
            data_addr: Some(format!("127.0.0.1:{}", name.len())),
            cpus: 0,
            memory_bytes: 0,
            used_cpus: 0.0,
            used_memory_bytes: 0,
            hostname: None,
            host_addrs: vec![],
        }
    }

    fn record(holders: &[(&str, bool)]) -> DatasetRecord {
        let manifest = Manifest {
            chunk_size: 4,
            files: vec![FileEntry {
                path: "f".into(),
                size: 1,
                mode: 0o644,
                chunks: vec![[7; 32]],
            }],
        };
        DatasetRecord {
            id: manifest.id(),
            name: "ds".into(),
            jurisdictions: vec!["EU".into()],
            bytes: 1,
            files: 1,
            chunks: 1,
            holders: holders
                .iter()
                .map(|(n, c)| {
                    (
                        n.to_string(),
                        HolderState { complete: *c, bytes_present: 1, updated_unix_ms: 0 },
                    )
                })
                .collect(),
            producer: None,
            created_unix_ms: 0,
            manifest: Arc::new(manifest),
            fetches: Default::default(),
            pending: Default::default(),
            version: 1,
        }
    }

    #[test]
    fn plans_respect_residency_and_prefer_agents() {
        let signer = TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().unwrap()).unwrap();
        let d = record(&[("eu-1", true), ("eu-2", false), ("coord", true), ("eu-3", true)]);
        let cands = [cand("eu-1", "EU", true), cand("eu-2", "EU", true), cand("eu-3", "EU", false)];
        let eu = Requester {
            kind: PeerKind::Agent,
            name: "eu-9".into(),
            jurisdiction: Some("EU".into()),
        };
        let p =
            plan_for(&d, &eu, &cands, Some(("coord", "127.0.0.1:7400")), &signer, 1000).unwrap();
        // Only complete, connected agent holders; the coordinator is not on the path.
        let names: Vec<&str> = p.holders.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["eu-1"]);
        let t = &p.holders[0].ticket;
        let eu9 = fleetmesh_protocol::PeerIdentity {
            trust_domain: "t".into(),
            kind: PeerKind::Agent,
            name: "eu-9".into(),
            attributes: fleetmesh_protocol::Attributes {
                jurisdiction: Some("EU".into()),
                ..Default::default()
            },
            serial: "01".into(),
            not_before_unix: 0,
            not_after_unix: i64::MAX,
        };
        assert!(verify_ticket(&signer.public_key(), t, &d.id, "eu-1", &eu9, 2000).is_ok());
        assert_eq!(t.ticket.expires_unix_ms, 1000 + TICKET_TTL_MS);
        // No agent holder connected: the coordinator's copy serves.
        let p = plan_for(&d, &eu, &cands[1..], Some(("coord", "127.0.0.1:7400")), &signer, 1000)
            .unwrap();
        assert_eq!(p.holders[0].kind, PeerKind::Coordinator);
        // Residency: a US agent gets no plan and no ticket.
        let us = Requester {
            kind: PeerKind::Agent,
            name: "us-1".into(),
            jurisdiction: Some("US".into()),
        };
        let e = plan_for(&d, &us, &cands, Some(("coord", "x")), &signer, 1000).unwrap_err();
        assert!(matches!(e, BrokerError::Residency(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.starts_with("residency:") && e.contains("us-1 is in US"), "{e}");
        let none = Requester { kind: PeerKind::Agent, name: "x".into(), jurisdiction: None };
        assert!(plan_for(&d, &none, &cands, None, &signer, 1000).is_err());
        // The requester itself is the only holder: nothing to fetch, an empty plan.
        let only = Requester {
            kind: PeerKind::Agent,
            name: "eu-1".into(),
            jurisdiction: Some("EU".into()),
        };
        let p = plan_for(&d, &only, &cands[..1], None, &signer, 1000).unwrap();
        assert!(p.holders.is_empty());
        // Nobody holds it completely.
        let d2 = record(&[("eu-2", false)]);
        assert!(plan_for(&d2, &eu, &cands, None, &signer, 1000)
            .unwrap_err()
            .to_string()
            .contains("no connected holder"));
    }

    /// A one-file manifest of `content`, its chunk stored in `b`'s local store.
    fn uploaded(b: &DataBroker, content: &[u8]) -> Manifest {
        let h = fleetmesh_protocol::data::hash_bytes(content);
        b.local.write(&h, content).expect("chunk");
        Manifest {
            chunk_size: 1 << 20,
            files: vec![FileEntry {
                path: "f".into(),
                size: content.len() as u64,
                mode: 0o644,
                chunks: vec![h],
            }],
        }
    }

    #[test]
    fn a_put_under_an_existing_name_is_a_new_version_and_cannot_loosen_residency_silently() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        let b =
            DataBroker::open(dir.path(), store, "coord", "mesh.test", u64::MAX).expect("broker");
        let eu = vec!["EU".to_string()];
        let (v1, loosened) =
            b.put_local(uploaded(&b, b"one"), "raw", eu.clone(), false).expect("v1");
        assert_eq!((v1.version, loosened), (1, None));
        // No residency at all, under the EU name: refused unless asked for explicitly.
        let e = b.put_local(uploaded(&b, b"two"), "raw", vec![], false).unwrap_err();
        assert!(matches!(e, BrokerError::WouldLoosen { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("dataset raw may only live in [\"EU\"]") && e.contains("--loosen-residency"),
            "{e}"
        );
        let e = b.put_local(uploaded(&b, b"two"), "raw", vec!["EU".into(), "US".into()], false);
        assert!(e.is_err(), "adding US loosens EU");
        assert_eq!(b.resolve("raw").map(|d| d.id), Some(v1.id.clone()), "name not re-pointed");
        // Narrower or equal is fine, and makes version 2.
        let (v2, loosened) =
            b.put_local(uploaded(&b, b"two"), "raw", eu.clone(), false).expect("v2");
        assert_eq!((v2.version, loosened), (2, None));
        let (v3, loosened) = b.put_local(uploaded(&b, b"three"), "raw", vec![], true).expect("v3");
        assert_eq!((v3.version, loosened), (3, Some(eu.clone())));
        assert_eq!(b.resolve("raw").map(|d| d.version), Some(3), "the name means the newest");
        assert_eq!(b.resolve("raw@1").map(|d| d.id), Some(v1.id.clone()));
        assert_eq!(b.resolve("raw@2").map(|d| d.id), Some(v2.id));
        assert!(b.resolve("raw@9").is_none());
        // The same content put again is the same version, not a new one.
        let (again, _) = b.put_local(uploaded(&b, b"one"), "raw", eu, false).expect("again");
        assert_eq!((again.id, again.version), (v1.id, 1));
    }
}
