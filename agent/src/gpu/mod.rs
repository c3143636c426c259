//! GPU telemetry backends.
//!
//! - [`nvml::NvmlBackend`]: real NVIDIA GPUs through NVML (`libnvidia-ml.so.1`, loaded at
//!   run time). Fields a GPU does not support are `None`, never zero.
//! - [`simulated::SimulatedBackend`]: development/test only, selected explicitly with
//!   `--simulate-gpus`; every GPU it reports has `simulated: true`.
//! - [`NoGpus`]: the CPU-only fallback when NVML is absent.

pub mod nvml;
pub mod simulated;

use fleetmesh_protocol::{GpuEvent, GpuInfo, GpuSample, GpuSource};

/// A source of GPU inventory, samples and health events.
pub trait GpuBackend: Send {
    /// Where the figures come from.
    fn source(&self) -> GpuSource;
    /// Static facts of every GPU.
    fn inventory(&mut self) -> Vec<GpuInfo>;
    /// One sample of every GPU.
    fn sample(&mut self) -> Vec<GpuSample>;
    /// Events seen since the last call.
    fn drain_events(&mut self) -> Vec<GpuEvent>;
}

/// CPU-only node.
#[derive(Debug, Default)]
pub struct NoGpus;

impl GpuBackend for NoGpus {
    fn source(&self) -> GpuSource {
        GpuSource::None
    }
    fn inventory(&mut self) -> Vec<GpuInfo> {
        Vec::new()
    }
    fn sample(&mut self) -> Vec<GpuSample> {
        Vec::new()
    }
    fn drain_events(&mut self) -> Vec<GpuEvent> {
        Vec::new()
    }
}

/// Pick the backend: simulated if a spec is given, else NVML, else CPU-only (logged once).
pub fn select_backend(
    simulate: Option<&str>,
    agent_name: &str,
) -> Result<Box<dyn GpuBackend>, simulated::SpecError> {
    if let Some(spec) = simulate {
        let backend = simulated::SimulatedBackend::new(spec, agent_name)?;
        tracing::warn!(spec, "using SIMULATED GPUs (development/test only; not real hardware)");
        return Ok(Box::new(backend));
    }
    match nvml::NvmlBackend::init() {
        Ok(b) => Ok(Box::new(b)),
        Err(e) => {
            tracing::info!(error = %e, "NVML not available: running as a CPU-only node");
            Ok(Box::new(NoGpus))
        }
    }
}

pub(crate) fn unix_us_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub(crate) fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
