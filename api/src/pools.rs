//! Capacity pools as the API shows them (`fleetmesh pools`): each pool's shape and
//! limits, its nodes, and what it has done (launches, failures, back-off, idle time).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A validated pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub name: String,
    pub provider: Option<String>,
    pub region: Option<String>,
    pub jurisdiction: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// GPUs per node, their model and memory each.
    pub gpus: u32,
    pub gpu_model: Option<String>,
    pub gpu_memory_bytes: u64,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub price_per_hour: f64,
    pub spot: bool,
    pub min_nodes: u32,
    pub max_nodes: u32,
    pub boot_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    /// argv of the launch and terminate programs.
    pub launch: Vec<String>,
    pub terminate: Vec<String>,
}

/// Where a pool node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// The launch program runs.
    Launching,
    /// Launched; not joined yet.
    Booting,
    /// Connected as an agent.
    Joined,
    /// Idle past its timeout: no new awards, terminated once it stays idle.
    Draining,
    /// The terminate program runs (or is retried).
    Terminating,
}

/// A node a pool launched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolNode {
    /// Its agent name (fixed in its join token).
    pub name: String,
    pub pool: String,
    /// What the launch program printed; none while launching.
    pub instance: Option<String>,
    pub state: NodeState,
    pub launched_unix_ms: u64,
    pub joined_unix_ms: Option<u64>,
    /// Since when it has run nothing (while joined or draining).
    pub idle_since_unix_ms: Option<u64>,
    pub drained_unix_ms: Option<u64>,
    /// What attempts have cost on it so far.
    #[serde(default)]
    pub spend: f64,
}

/// What a pool has done, kept across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolHistory {
    /// Launch failures in a row (a node joining resets it).
    pub failures: u32,
    pub backoff_until_unix_ms: u64,
    pub last_failure: Option<String>,
    pub launches: u64,
    pub launch_failures: u64,
    pub terminations: u64,
    /// Recent boot times, launch to join.
    pub boot_ms: Vec<u64>,
    /// GPU-hours its nodes spent joined with nothing running, and what they cost.
    pub idle_gpu_hours: f64,
    pub idle_cost: f64,
    /// Names given so far (the next node is `POOL-N`).
    pub next_node: u64,
    /// What attempts cost on its nodes that are gone.
    #[serde(default)]
    pub spend_of_terminated: f64,
}

/// One pool as `GET /api/v1/pools` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolView {
    pub spec: PoolSpec,
    pub history: PoolHistory,
    pub nodes: Vec<PoolNode>,
    /// Launching is paused until `history.backoff_until_unix_ms`.
    pub backing_off: bool,
    /// What attempts have cost on its nodes, those gone included.
    #[serde(default)]
    pub spend: f64,
}
