//! The agent's side of the data plane: its chunk store, the xfer endpoint peers fetch
//! from, fetches the coordinator asks for, staging job inputs and collecting outputs.

use std::path::Path;
use std::sync::{Arc, RwLock};

use fleetmesh_data::{dataset, xfer, LocalDataset, Store, XferServer};
use fleetmesh_protocol::data::{check_rel_path, short, FetchPlan, Shard, DEFAULT_CHUNK_SIZE};
use fleetmesh_protocol::tls::TlsIdentity;
use fleetmesh_protocol::{
    AgentMessage, AwardInput, AwardOutput, FetchReport, Holding, InputSummary, OutputDataset,
};
use tracing::{info, warn};

use crate::config::DataConfig;
use crate::outbox::Outbox;

/// Why the agent's data plane could not do something.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("this agent has no identity to fetch with")]
    NoIdentity,
    #[error("input {0} vanished from the store")]
    Vanished(String),
    #[error("input mount {0:?} refused: {1}")]
    BadMount(String, String),
    #[error("{what}: {source}")]
    Io { what: String, source: fleetmesh_data::StoreError },
    #[error(transparent)]
    Store(#[from] fleetmesh_data::StoreError),
    #[error(transparent)]
    Fetch(#[from] fleetmesh_data::xfer::FetchError),
    #[error("worker task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Data-plane state of one agent.
pub struct DataPlane {
    pub store: Arc<Store>,
    pub server: Arc<XferServer>,
    endpoint: quinn::Endpoint,
    tls: RwLock<TlsIdentity>,
    outbox: Arc<Outbox>,
    cfg: DataConfig,
    /// Datasets being fetched (a second request for one waits for nothing: it is skipped).
    fetching: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Datasets pinned per running attempt (`job/attempt`).
    pinned: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane").field("store", &self.store.root()).finish_non_exhaustive()
    }
}

impl DataPlane {
    /// Open the store under `<data_dir>/store` and start serving on `cfg.listen`.
    pub fn start(
        data_dir: &Path,
        cfg: &DataConfig,
        tls: &TlsIdentity,
        outbox: Arc<Outbox>,
    ) -> Result<Arc<Self>, DataError> {
        let store = Arc::new(Store::open(&data_dir.join("store"), cfg.store_limit)?);
        let endpoint = xfer::endpoint(cfg.listen, tls, true)?;
        let server = XferServer::new(
            store.clone(),
            &tls.identity.name,
            &tls.identity.trust_domain,
            None,
            cfg.serve_rate,
        );
        server.spawn_accept_loop(endpoint.clone());
        info!(
            agent_id = %tls.identity.name,
            addr = ?endpoint.local_addr().ok(),
            "data plane listening"
        );
        Ok(Arc::new(Self {
            store,
            server,
            endpoint,
            tls: RwLock::new(tls.clone()),
            outbox,
            cfg: cfg.clone(),
            fetching: Default::default(),
            pinned: Default::default(),
        }))
    }

    pub fn port(&self) -> Option<u16> {
        self.endpoint.local_addr().ok().map(|a| a.port())
    }

    /// A renewed certificate: serve and dial with it from now on.
    pub fn update_tls(&self, tls: &TlsIdentity) {
        if let Ok(cfg) = tls.server_config(&[fleetmesh_protocol::data::ALPN_XFER], true) {
            if let Ok(quic) = quinn::crypto::rustls::QuicServerConfig::try_from(cfg) {
                self.endpoint
                    .set_server_config(Some(quinn::ServerConfig::with_crypto(Arc::new(quic))));
            }
        }
        if let Ok(mut t) = self.tls.write() {
            *t = tls.clone();
        }
    }

    fn tls(&self) -> Option<TlsIdentity> {
        self.tls.read().ok().map(|t| t.clone())
    }

    /// What this store holds, for the coordinator's index.
    pub fn holdings(&self) -> AgentMessage {
        AgentMessage::Holdings {
            datasets: self
                .store
                .holdings()
                .into_iter()
                .map(|(d, complete, bytes_present)| Holding {
                    dataset: d.id,
                    complete,
                    bytes_present,
                })
                .collect(),
        }
    }

    async fn fetch(&self, plan: &FetchPlan) -> Result<FetchReport, DataError> {
        self.fetch_part(plan, None).await
    }

    /// Fetch only `shard`'s files of the plan's dataset (all of it without one).
    async fn fetch_part(
        &self,
        plan: &FetchPlan,
        shard: Option<Shard>,
    ) -> Result<FetchReport, DataError> {
        let tls = self.tls().ok_or(DataError::NoIdentity)?;
        let store = self.store.clone();
        Ok(xfer::fetch_part(&self.endpoint, &tls, store, plan, shard, Arc::new(|_| {})).await?)
    }

    /// Whether every chunk of `shard`'s files of dataset `id` is here.
    fn has_part(&self, id: &str, shard: Option<Shard>) -> bool {
        match (shard, self.store.dataset(id)) {
            (None, _) => self.store.complete(id),
            (Some(s), Some(d)) => {
                d.manifest.shard(Some(s)).unique_chunks().iter().all(|(h, _)| self.store.has(h))
            }
            (Some(_), None) => false,
        }
    }

    /// A fetch the coordinator asked for: report the result and the new holdings.
    pub fn fetch_for_coordinator(self: &Arc<Self>, plan: FetchPlan) {
        if self.store.complete(&plan.dataset) {
            self.outbox.push(AgentMessage::FetchDone(FetchReport::without_transfer(
                plan.dataset.clone(),
                true,
                "already held".into(),
            )));
            self.outbox.push(self.holdings());
            return;
        }
        if let Ok(mut f) = self.fetching.lock() {
            if !f.insert(plan.dataset.clone()) {
                return;
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            let report = match me.fetch(&plan).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(dataset = %short(&plan.dataset), error = %e, "fetch failed");
                    FetchReport::without_transfer(plan.dataset.clone(), false, e.to_string())
                }
            };
            if let Ok(mut f) = me.fetching.lock() {
                f.remove(&plan.dataset);
            }
            me.outbox.push(AgentMessage::FetchDone(report));
            me.outbox.push(me.holdings());
        });
    }

    /// Forget a dataset (its chunks go unless another dataset uses them).
    pub fn drop_dataset(&self, id: &str) {
        if self.store.remove_dataset(id) {
            info!(dataset = %short(id), "dataset removed from the local store");
        }
        self.outbox.push(self.holdings());
    }

    /// What a bid adds for `inputs`: (input bytes already held here, extra ETA ms, extra
    /// price), reading the local store once per input.
    pub fn bid_terms(
        &self,
        inputs: &[InputSummary],
        own_site: (Option<&str>, Option<&str>),
    ) -> (u64, u64, f64) {
        let present: std::collections::HashMap<&str, u64> = inputs
            .iter()
            .map(|i| (i.dataset.as_str(), self.store.present_bytes(&i.dataset).min(i.bytes)))
            .collect();
        let local = present.values().sum();
        let get = |id: &str| present.get(id).copied().unwrap_or(0);
        let (eta, price) = fetch_cost(inputs, get, own_site, &self.cfg);
        (local, eta, price)
    }

    /// Fetch (as needed) and materialise every input under `<dir>/inputs/<mount>`,
    /// pinning their chunks for attempt `key` until [`DataPlane::release_inputs`] (only
    /// what was actually pinned is released, whatever point staging reached).
    pub async fn stage(
        &self,
        inputs: &[AwardInput],
        dir: &Path,
        job: &str,
        key: &str,
    ) -> Result<(), DataError> {
        for i in inputs {
            // The mount comes from the network: a relative path that stays inside inputs/.
            check_rel_path(&i.mount).map_err(|why| DataError::BadMount(i.mount.clone(), why))?;
            if !self.has_part(&i.plan.dataset, i.shard) {
                info!(job_id = %job, dataset = %short(&i.plan.dataset), input = %i.mount, shard = ?i.shard, "fetching input");
                let r = self.fetch_part(&i.plan, i.shard).await?;
                self.outbox.push(self.holdings());
                info!(job_id = %job, input = %i.mount, fetched = r.fetched_chunks, reused = r.reused_chunks, "input fetched");
            }
            self.store.pin(&i.plan.dataset);
            if let Ok(mut p) = self.pinned.lock() {
                p.entry(key.to_string()).or_default().push(i.plan.dataset.clone());
            }
            let d = self
                .store
                .dataset(&i.plan.dataset)
                .ok_or_else(|| DataError::Vanished(i.mount.clone()))?;
            let dest = dir.join("inputs").join(&i.mount);
            let store = self.store.clone();
            let part = d.manifest.shard(i.shard);
            tokio::task::spawn_blocking(move || dataset::materialize(&store, &part, &dest))
                .await?
                .map_err(|source| DataError::Io { what: format!("input {}", i.mount), source })?;
        }
        Ok(())
    }

    /// Unpin what staging pinned for attempt `key`.
    pub fn release_inputs(&self, key: &str) {
        let ids = self.pinned.lock().ok().and_then(|mut p| p.remove(key)).unwrap_or_default();
        for id in ids {
            self.store.unpin(&id);
        }
    }

    /// Chunk each `<dir>/outputs/<name>` into the store as a dataset.
    pub async fn collect(
        &self,
        outputs: &[AwardOutput],
        dir: &Path,
    ) -> Result<Vec<OutputDataset>, DataError> {
        let mut out = Vec::new();
        for o in outputs {
            let src = dir.join("outputs").join(&o.output);
            let store = self.store.clone();
            let m = tokio::task::spawn_blocking(move || {
                dataset::import_output(&store, &src, DEFAULT_CHUNK_SIZE)
            })
            .await?
            .map_err(|source| DataError::Io { what: format!("output {}", o.output), source })?;
            let id = m.id();
            self.store.add_dataset(LocalDataset {
                id: id.clone(),
                name: o.dataset_name.clone(),
                jurisdictions: o.jurisdictions.clone(),
                manifest: m.clone(),
            })?;
            info!(dataset = %short(&id), name = %o.dataset_name, bytes = m.total_bytes(), "output stored");
            out.push(OutputDataset { output: o.output.clone(), manifest: m });
        }
        if !outputs.is_empty() {
            self.outbox.push(self.holdings());
        }
        Ok(out)
    }
}

/// What fetching the missing part of `inputs` adds to a bid: the time at the configured
/// fetch bandwidth, and the transfer price per GB when no holder of an input is on this
/// node's provider and region (pure; `present(id)` says how many bytes are here).
pub fn fetch_cost(
    inputs: &[InputSummary],
    present: impl Fn(&str) -> u64,
    own_site: (Option<&str>, Option<&str>),
    cfg: &DataConfig,
) -> (u64, f64) {
    let mut eta_ms = 0u64;
    let mut price = 0.0;
    for i in inputs {
        let missing = i.bytes.saturating_sub(present(&i.dataset).min(i.bytes));
        eta_ms += missing.saturating_mul(1000) / cfg.fetch_bandwidth.max(1);
        let same_site = i
            .holder_sites
            .iter()
            .any(|(p, r)| p.as_deref() == own_site.0 && r.as_deref() == own_site.1);
        if !same_site {
            price += missing as f64 / 1e9 * cfg.transfer_cost_per_gb;
        }
    }
    (eta_ms, price)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(id: &str, gb: u64, sites: &[(&str, &str)]) -> InputSummary {
        InputSummary {
            dataset: id.into(),
            bytes: gb * 1_000_000_000,
            holder_sites: sites
                .iter()
                .map(|(p, r)| (Some(p.to_string()), Some(r.to_string())))
                .collect(),
        }
    }

    #[test]
    fn data_already_here_is_free_and_immediate_data_elsewhere_costs_time_and_egress() {
        let cfg = DataConfig {
            fetch_bandwidth: 1_000_000_000, // 1 GB/s
            transfer_cost_per_gb: 0.1,
            ..Default::default()
        };
        let here = (Some("aws"), Some("eu-west-1"));
        let ins = [input("a", 10, &[("aws", "eu-west-1")]), input("b", 4, &[("gcp", "us-east1")])];
        // Nothing held: 14 s to fetch; only b crosses sites (4 GB x 0.1).
        let (eta, price) = fetch_cost(&ins, |_| 0, here, &cfg);
        assert_eq!(eta, 14_000);
        assert!((price - 0.4).abs() < 1e-9, "{price}");
        // Everything held: nothing to add.
        let all = |id: &str| if id == "a" { 10_000_000_000 } else { 4_000_000_000 };
        assert_eq!(fetch_cost(&ins, all, here, &cfg), (0, 0.0));
        // Half of b held: half the time and half the egress for b.
        let half_b = |id: &str| if id == "b" { 2_000_000_000 } else { 0 };
        let (eta, price) = fetch_cost(&ins, half_b, here, &cfg);
        assert_eq!(eta, 12_000);
        assert!((price - 0.2).abs() < 1e-9, "{price}");
        // In another region of the same provider, a crosses sites too.
        let (_, price) = fetch_cost(&ins, |_| 0, (Some("aws"), Some("us-east-1")), &cfg);
        assert!((price - 1.4).abs() < 1e-9, "{price}");
    }
}
