//! Real GPUs through NVML.
//!
//! `Device<'a>` borrows `Nvml`, so the backend keeps an `Arc<Nvml>` and looks devices up
//! on every poll. XID and ECC events come from an NVML event set whose `wait` blocks and
//! is not `Sync`: it runs on a dedicated OS thread and hands events over via a mutex.
//! Every query that fails (most often `NotSupported`) yields `None` for that field.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fleetmesh_protocol::{GpuEvent, GpuEventKind, GpuInfo, GpuProcess, GpuSample, GpuSource};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor,
};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use super::{unix_ms_now, GpuBackend};

/// Milliseconds the event thread blocks in one `wait` before checking for shutdown.
const EVENT_WAIT_MS: u32 = 500;
/// Bound on buffered events between two telemetry reports.
const MAX_BUFFERED_EVENTS: usize = 1024;

/// NVML-backed GPU source.
pub struct NvmlBackend {
    nvml: Arc<Nvml>,
    count: u32,
    events: Arc<Mutex<Vec<GpuEvent>>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend").field("count", &self.count).finish_non_exhaustive()
    }
}

impl Drop for NvmlBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn opt<T>(r: Result<T, NvmlError>) -> Option<T> {
    r.ok()
}

impl NvmlBackend {
    /// Initialise NVML; fails cleanly when the driver library is absent.
    pub fn init() -> Result<Self, NvmlError> {
        let nvml = Arc::new(Nvml::init()?);
        let count = nvml.device_count()?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let nvml = nvml.clone();
            let events = events.clone();
            let stop = stop.clone();
            let spawned = std::thread::Builder::new()
                .name("nvml-events".into())
                .spawn(move || event_thread(&nvml, count, &events, &stop));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start the NVML event thread; XID/ECC events will not be reported");
            }
        }
        tracing::info!(gpus = count, driver = ?nvml.sys_driver_version().ok(), "NVML initialised");
        Ok(Self { nvml, count, events, stop })
    }

    fn devices(&self) -> impl Iterator<Item = (u32, Device<'_>)> {
        (0..self.count).filter_map(move |i| match self.nvml.device_by_index(i) {
            Ok(d) => Some((i, d)),
            Err(e) => {
                tracing::warn!(index = i, error = %e, "GPU lookup failed");
                None
            }
        })
    }
}

fn event_thread(nvml: &Nvml, count: u32, out: &Mutex<Vec<GpuEvent>>, stop: &AtomicBool) {
    let wanted = EventTypes::CRITICAL_XID_ERROR
        | EventTypes::DOUBLE_BIT_ECC_ERROR
        | EventTypes::SINGLE_BIT_ECC_ERROR;
    let mut set = match nvml.create_event_set() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "NVML event set unavailable; XID/ECC events will not be reported");
            return;
        }
    };
    let mut registered = 0;
    for i in 0..count {
        let Ok(dev) = nvml.device_by_index(i) else { continue };
        let supported = dev.supported_event_types().unwrap_or(EventTypes::empty());
        let types = wanted & supported;
        if types.is_empty() {
            tracing::info!(index = i, "GPU supports none of the XID/ECC events");
            continue;
        }
        match dev.register_events(types, set) {
            Ok(s) => {
                set = s;
                registered += 1;
            }
            Err(e) => {
                tracing::warn!(index = i, error = %e, "could not register GPU events");
                // The set was released by the failed call: start a new one.
                match nvml.create_event_set() {
                    Ok(s) => set = s,
                    Err(_) => return,
                }
            }
        }
    }
    if registered == 0 {
        return;
    }
    tracing::info!(gpus = registered, "watching XID/ECC events");
    while !stop.load(Ordering::Relaxed) {
        match set.wait(EVENT_WAIT_MS) {
            Ok(ev) => {
                let uuid = ev.device.uuid().unwrap_or_default();
                let kind = if ev.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                    GpuEventKind::Xid(match ev.event_data {
                        Some(XidError::Value(v)) => Some(v),
                        _ => None,
                    })
                } else if ev.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                    GpuEventKind::DoubleBitEcc
                } else {
                    GpuEventKind::SingleBitEcc
                };
                tracing::warn!(gpu = %uuid, ?kind, "GPU health event");
                if let Ok(mut v) = out.lock() {
                    if v.len() < MAX_BUFFERED_EVENTS {
                        v.push(GpuEvent { uuid, at_unix_ms: unix_ms_now(), kind });
                    }
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::warn!(error = %e, "NVML event wait failed; stopping event watch");
                return;
            }
        }
    }
}

impl GpuBackend for NvmlBackend {
    fn source(&self) -> GpuSource {
        GpuSource::Nvml {
            driver_version: self.nvml.sys_driver_version().ok(),
            nvml_version: self.nvml.sys_nvml_version().ok(),
        }
    }

    fn inventory(&mut self) -> Vec<GpuInfo> {
        self.devices()
            .map(|(i, d)| GpuInfo {
                index: d.index().unwrap_or(i),
                uuid: d.uuid().unwrap_or_else(|_| format!("unknown-{i}")),
                name: d.name().unwrap_or_else(|_| "unknown".into()),
                simulated: false,
                memory_total_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
                pci_bus_id: d.pci_info().ok().map(|p| p.bus_id),
            })
            .collect()
    }

    fn sample(&mut self) -> Vec<GpuSample> {
        self.devices()
            .map(|(i, d)| {
                let mem = opt(d.memory_info());
                let util = opt(d.utilization_rates());
                let throttle = opt(d.current_throttle_reasons());
                GpuSample {
                    index: d.index().unwrap_or(i),
                    uuid: d.uuid().unwrap_or_else(|_| format!("unknown-{i}")),
                    memory_total_bytes: mem.as_ref().map(|m| m.total),
                    memory_used_bytes: mem.as_ref().map(|m| m.used),
                    memory_free_bytes: mem.as_ref().map(|m| m.free),
                    utilization_gpu_percent: util.as_ref().map(|u| u.gpu),
                    utilization_memory_percent: util.as_ref().map(|u| u.memory),
                    temperature_c: opt(d.temperature(TemperatureSensor::Gpu)),
                    power_w: opt(d.power_usage()).map(|mw| f64::from(mw) / 1000.0),
                    power_limit_w: opt(d.enforced_power_limit()).map(|mw| f64::from(mw) / 1000.0),
                    energy_mj: opt(d.total_energy_consumption()),
                    sm_clock_mhz: opt(d.clock_info(Clock::SM)),
                    memory_clock_mhz: opt(d.clock_info(Clock::Memory)),
                    throttle_reasons: throttle
                        .map(|r| r.iter_names().map(|(n, _)| n.to_string()).collect()),
                    throttle_reasons_mask: throttle.map(|r| r.bits()),
                    ecc_corrected_volatile: opt(
                        d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
                    ),
                    ecc_uncorrected_volatile: opt(
                        d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                    ),
                    pcie_rx_kib_per_s: opt(d.pcie_throughput(PcieUtilCounter::Receive)),
                    pcie_tx_kib_per_s: opt(d.pcie_throughput(PcieUtilCounter::Send)),
                    mig_enabled: opt(d.mig_mode()).map(|m| m.current == 1),
                    processes: opt(d.running_compute_processes()).map(|ps| {
                        ps.into_iter()
                            .map(|p| GpuProcess {
                                pid: p.pid,
                                used_memory_bytes: match p.used_gpu_memory {
                                    UsedGpuMemory::Used(b) => Some(b),
                                    UsedGpuMemory::Unavailable => None,
                                },
                            })
                            .collect()
                    }),
                }
            })
            .collect()
    }

    fn drain_events(&mut self) -> Vec<GpuEvent> {
        self.events.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default()
    }
}
