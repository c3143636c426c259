//! Fleetmesh node agent.
//!
//! The agent reads GPU telemetry (NVML, or an explicitly selected simulated source) and
//! host telemetry (sysinfo), connects to the coordinator over mutual-TLS QUIC, says hello,
//! sends its inventory and then telemetry at a fixed interval, and reconnects forever with
//! backoff. `main.rs` is a thin shell around [`run`] and [`probe`].

pub mod backoff;
pub mod config;
pub mod gpu;
pub mod host;
pub mod sampler;
pub mod session;

use std::sync::Arc;

use fleetmesh_protocol::tls::TlsIdentity;
use fleetmesh_protocol::{Inventory, TelemetryReport};
use serde::Serialize;
use tokio::sync::watch;

pub use config::AgentConfig;
pub use session::{AgentStats, ConnectOptions};

/// Agent failures that stop it (configuration problems only: a down coordinator never
/// stops the agent).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] fleetmesh_protocol::tls::TlsError),
    #[error(transparent)]
    Spec(#[from] gpu::simulated::SpecError),
    #[error("data dir {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
}

/// Run the agent until `shutdown` becomes true.
pub async fn run(config: AgentConfig, shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| AgentError::DataDir { path: config.data_dir.clone(), source })?;
    let tls = TlsIdentity::load(&config.ca, &config.cert, &config.key)?;
    if tls.identity.kind != fleetmesh_protocol::PeerKind::Agent {
        return Err(AgentError::Config(format!(
            "{} is a {} certificate; the agent needs an agent certificate",
            config.cert.display(),
            tls.identity.kind
        )));
    }
    let mut opts = ConnectOptions::new(config.coordinator.clone(), tls);
    if let Some(name) = &config.name {
        opts.claimed_name = name.clone();
    }
    opts.telemetry_interval = config.telemetry_interval;
    opts.backoff.max = config.reconnect_max;
    let gpu = gpu::select_backend(config.simulate_gpus.as_deref(), &opts.claimed_name)?;
    let mut sampler = sampler::NodeSampler::new(gpu, &config.data_dir);
    tracing::info!(
        agent_id = %opts.claimed_name,
        coordinator = %config.coordinator,
        spiffe_id = %opts.tls.identity.spiffe_id(),
        "agent starting"
    );
    session::run_forever(opts, &mut sampler, Arc::new(AgentStats::default()), shutdown).await;
    Ok(())
}

/// What `fleetmesh-agent probe` prints.
#[derive(Debug, Serialize)]
pub struct ProbeOutput {
    pub inventory: Inventory,
    pub telemetry: TelemetryReport,
}

/// Read inventory and one telemetry sample without connecting anywhere.
pub fn probe(config: &config::ProbeConfig) -> Result<ProbeOutput, AgentError> {
    let name = sysinfo::System::host_name().unwrap_or_else(|_| "probe".into());
    let gpu = gpu::select_backend(config.simulate_gpus.as_deref(), &name)?;
    let mut s = sampler::NodeSampler::new(gpu, &config.data_dir);
    let inventory = sampler::Sampler::inventory(&mut s);
    // CPU utilisation needs two readings some time apart.
    std::thread::sleep(std::time::Duration::from_millis(250));
    let telemetry = sampler::Sampler::sample(&mut s, 1);
    Ok(ProbeOutput { inventory, telemetry })
}
