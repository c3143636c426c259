//! Combines a GPU backend and host figures into inventory and telemetry reports.

use std::path::Path;

use fleetmesh_protocol::{HostInfo, HostSample, Inventory, TelemetryReport};

use crate::gpu::{unix_us_now, GpuBackend};
use crate::host::HostCollector;

/// Produces what the agent reports.
pub trait Sampler: Send {
    fn inventory(&mut self) -> Inventory;
    fn sample(&mut self, seq: u64) -> TelemetryReport;
}

enum HostSource {
    Live(Box<HostCollector>),
    /// Fixed host figures: used by the in-process benchmark, where thousands of agents
    /// share one host and reading /proc for each would measure the wrong thing.
    Fixed(Box<(HostInfo, HostSample)>),
}

/// The node sampler: one GPU backend plus host figures.
pub struct NodeSampler {
    gpu: Box<dyn GpuBackend>,
    host: HostSource,
}

impl std::fmt::Debug for NodeSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSampler").field("gpu", &self.gpu.source()).finish_non_exhaustive()
    }
}

impl NodeSampler {
    /// Live host figures for the disk holding `data_dir`.
    pub fn new(gpu: Box<dyn GpuBackend>, data_dir: &Path) -> Self {
        Self { gpu, host: HostSource::Live(Box::new(HostCollector::new(data_dir))) }
    }

    /// Fixed host figures (benchmarks).
    pub fn with_fixed_host(gpu: Box<dyn GpuBackend>, info: HostInfo, sample: HostSample) -> Self {
        Self { gpu, host: HostSource::Fixed(Box::new((info, sample))) }
    }
}

impl Sampler for NodeSampler {
    fn inventory(&mut self) -> Inventory {
        let host = match &self.host {
            HostSource::Live(h) => h.info(),
            HostSource::Fixed(f) => f.0.clone(),
        };
        Inventory { host, gpu_source: self.gpu.source(), gpus: self.gpu.inventory() }
    }

    fn sample(&mut self, seq: u64) -> TelemetryReport {
        let host = match &mut self.host {
            HostSource::Live(h) => h.sample(),
            HostSource::Fixed(f) => f.1.clone(),
        };
        TelemetryReport {
            seq,
            sampled_at_unix_us: unix_us_now(),
            host,
            gpus: self.gpu.sample(),
            events: self.gpu.drain_events(),
        }
    }
}
