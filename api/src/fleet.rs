//! The fleet as the API shows it: agents, their GPUs and recent history. These are the
//! stable, documented shapes of `fleetmesh agents|gpus ... -o json`.

use fleetmesh_protocol::{GpuEvent, GpuProcess, HostSample};
use serde::{Deserialize, Serialize};

/// Liveness state of an agent as the coordinator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Heard from recently.
    Connected,
    /// Not heard from for `suspect_after`; still placed nowhere new (later issues).
    Suspect,
    /// Not heard from for `lost_after`: treated as dead.
    Lost,
    /// Said goodbye (graceful shutdown).
    Left,
    /// Cut off by an operator; cannot reconnect with its certificates.
    Revoked,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Connected => "connected",
            AgentState::Suspect => "suspect",
            AgentState::Lost => "lost",
            AgentState::Left => "left",
            AgentState::Revoked => "revoked",
        }
    }

    pub const ALL: [AgentState; 5] = [
        AgentState::Connected,
        AgentState::Suspect,
        AgentState::Lost,
        AgentState::Left,
        AgentState::Revoked,
    ];
}

/// One GPU with its latest figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuView {
    pub agent: String,
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// True only for GPUs from the simulated source.
    pub simulated: bool,
    /// GPU utilisation in percent.
    pub utilization_gpu: Option<u32>,
    pub utilization_memory: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    pub energy_mj: Option<u64>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    pub throttle_reasons: Option<Vec<String>>,
    pub throttle_reasons_mask: Option<u64>,
    pub ecc_corrected_volatile: Option<u64>,
    pub ecc_uncorrected_volatile: Option<u64>,
    pub pcie_rx_kib_per_s: Option<u32>,
    pub pcie_tx_kib_per_s: Option<u32>,
    pub mig_enabled: Option<bool>,
    pub processes: Option<Vec<GpuProcess>>,
    pub pci_bus_id: Option<String>,
}

/// One agent as listed by `fleetmesh agents`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub name: String,
    pub spiffe_id: String,
    pub state: AgentState,
    pub region: Option<String>,
    pub jurisdiction: Option<String>,
    pub provider: Option<String>,
    /// RFC 3339 timestamp.
    pub first_seen: String,
    /// RFC 3339 timestamp of the last frame received.
    pub last_seen: String,
    pub last_seen_unix_ms: u64,
    /// `nvml`, `simulated`, `none`, or `unknown` before the inventory arrives.
    pub gpu_source: String,
    pub hostname: Option<String>,
    pub os: Option<String>,
    pub kernel: Option<String>,
    pub agent_version: Option<String>,
    pub cpu_count: Option<u32>,
    pub host: Option<HostSample>,
    pub gpus: Vec<GpuView>,
    /// The capacity pool that launched it (its certificate's `fleetmesh.pool` label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// A compact point of recent history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    pub at_unix_ms: u64,
    pub cpu_utilization_percent: f32,
    pub memory_used_bytes: u64,
    pub gpus: Vec<GpuPoint>,
}

/// Per-GPU figures in a history point (same order as the agent's GPUs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuPoint {
    pub index: u32,
    pub utilization_gpu: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_w: Option<f32>,
}

/// `fleetmesh agents show NAME`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentDetail {
    #[serde(flatten)]
    pub agent: AgentView,
    pub cert_serial: String,
    pub history: Vec<HistoryPoint>,
    pub recent_events: Vec<GpuEvent>,
}

/// Telemetry ingest statistics (used by the benchmark).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IngestStats {
    pub reports_applied: u64,
    pub reports_ignored_stale: u64,
    /// Latency from the agent's sample time to application in the Fleet actor, over the
    /// most recent reports kept in the window.
    pub window: u64,
    pub ingest_p50_ms: f64,
    pub ingest_p99_ms: f64,
    pub ingest_max_ms: f64,
}
