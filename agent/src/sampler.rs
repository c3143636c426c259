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

/// What the node owner offers (reported in the inventory, used for placement).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeOffer {
    pub price_per_hour: f64,
    pub spot: bool,
    pub labels: Vec<(String, String)>,
    pub container_runtime: Option<String>,
    pub data_port: Option<u16>,
    /// CPUs and memory offered to jobs, when not the whole host's.
    pub cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    /// The address peers reach this node at, when not the one the coordinator sees.
    pub advertise_addr: Option<String>,
}

impl Default for NodeOffer {
    fn default() -> Self {
        Self {
            price_per_hour: 1.0,
            spot: false,
            labels: Vec::new(),
            container_runtime: None,
            data_port: None,
            cpus: None,
            memory_bytes: None,
            advertise_addr: None,
        }
    }
}

/// The node sampler: one GPU backend plus host figures.
pub struct NodeSampler {
    gpu: Box<dyn GpuBackend>,
    host: HostSource,
    pub offer: NodeOffer,
}

impl std::fmt::Debug for NodeSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSampler").field("gpu", &self.gpu.source()).finish_non_exhaustive()
    }
}

impl NodeSampler {
    /// Live host figures for the disk holding `data_dir`.
    pub fn new(gpu: Box<dyn GpuBackend>, data_dir: &Path) -> Self {
        Self {
            gpu,
            host: HostSource::Live(Box::new(HostCollector::new(data_dir))),
            offer: NodeOffer::default(),
        }
    }

    /// Fixed host figures (benchmarks).
    pub fn with_fixed_host(gpu: Box<dyn GpuBackend>, info: HostInfo, sample: HostSample) -> Self {
        Self { gpu, host: HostSource::Fixed(Box::new((info, sample))), offer: NodeOffer::default() }
    }
}

impl Sampler for NodeSampler {
    fn inventory(&mut self) -> Inventory {
        let (mut host, host_addrs) = match &self.host {
            HostSource::Live(h) => (h.info(), h.addresses()),
            HostSource::Fixed(f) => (f.0.clone(), Vec::new()),
        };
        // What is offered is what placement accounts against.
        host.cpu_count = self.offer.cpus.unwrap_or(host.cpu_count);
        host.memory_total_bytes = self.offer.memory_bytes.unwrap_or(host.memory_total_bytes);
        Inventory {
            host,
            gpu_source: self.gpu.source(),
            gpus: self.gpu.inventory(),
            price_per_hour: self.offer.price_per_hour,
            spot: self.offer.spot,
            labels: self.offer.labels.clone(),
            container_runtime: self.offer.container_runtime.clone(),
            data_port: self.offer.data_port,
            advertise_addr: self.offer.advertise_addr.clone(),
            host_addrs,
        }
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
