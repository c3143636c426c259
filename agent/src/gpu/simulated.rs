//! Simulated GPUs for development and tests (never selected implicitly).
//!
//! Spec syntax: `[COUNT x]MODEL[-MEMGB]`, e.g. `4xH100-80GB`, `A100-40GB`, `2xL4-24GB`.
//! Utilisation follows a slow wave with a per-GPU phase; power follows utilisation and
//! memory use wanders between 1 and 5 % (so the GPU stays free for placement), so
//! figures visibly change over time. UUIDs are stable per agent name and
//! index and carry the marker `sim` so they can never be mistaken for real ones.

use std::time::Instant;

use fleetmesh_protocol::{GpuEvent, GpuInfo, GpuSample, GpuSource};

use super::GpuBackend;

/// Invalid `--simulate-gpus` spec.
#[derive(Debug, thiserror::Error)]
#[error("invalid simulated GPU spec {spec:?}: {msg} (expected e.g. 4xH100-80GB)")]
pub struct SpecError {
    spec: String,
    msg: String,
}

/// Parsed spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimSpec {
    pub count: u32,
    pub model: String,
    pub memory_gb: u64,
}

/// Largest count accepted; more than any real node carries.
const MAX_SIM_GPUS: u32 = 64;

impl SimSpec {
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        let err = |msg: &str| SpecError { spec: spec.to_string(), msg: msg.to_string() };
        let s = spec.trim();
        let (count, rest) = match s.split_once(['x', 'X']) {
            Some((n, rest)) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => {
                (n.parse::<u32>().map_err(|_| err("bad count"))?, rest)
            }
            _ => (1, s),
        };
        if count == 0 || count > MAX_SIM_GPUS {
            return Err(err(&format!("count must be 1..={MAX_SIM_GPUS}")));
        }
        let (model, memory_gb) = match rest.rsplit_once('-') {
            Some((m, mem)) if mem.to_ascii_uppercase().ends_with("GB") => {
                let n = &mem[..mem.len() - 2];
                (m, n.parse::<u64>().map_err(|_| err("bad memory size"))?)
            }
            _ => (rest, 80),
        };
        if model.is_empty() || !model.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(err("bad model name"));
        }
        if memory_gb == 0 || memory_gb > 1024 {
            return Err(err("memory must be 1..=1024 GB"));
        }
        Ok(Self { count, model: model.to_string(), memory_gb })
    }
}

/// The simulated backend.
#[derive(Debug)]
pub struct SimulatedBackend {
    spec_text: String,
    spec: SimSpec,
    uuids: Vec<String>,
    started: Instant,
    phase: f64,
    energy_mj: Vec<u64>,
    last_sample: Instant,
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl SimulatedBackend {
    pub fn new(spec_text: &str, agent_name: &str) -> Result<Self, SpecError> {
        let spec = SimSpec::parse(spec_text)?;
        let uuids = (0..spec.count)
            .map(|i| {
                let a = fnv1a(format!("{agent_name}/{i}").as_bytes());
                let b = fnv1a(format!("{i}/{agent_name}").as_bytes());
                format!(
                    "GPU-{:08x}-{:04x}-{:04x}-5173-{:012x}",
                    (a >> 32) as u32,
                    (a >> 16) as u16,
                    a as u16,
                    b & 0xffff_ffff_ffff
                )
            })
            .collect();
        let phase = (fnv1a(agent_name.as_bytes()) % 1000) as f64 / 1000.0 * std::f64::consts::TAU;
        Ok(Self {
            spec_text: spec_text.to_string(),
            energy_mj: vec![0; spec.count as usize],
            spec,
            uuids,
            started: Instant::now(),
            phase,
            last_sample: Instant::now(),
        })
    }

    fn mem_total(&self) -> u64 {
        self.spec.memory_gb * 1024 * 1024 * 1024
    }
}

impl GpuBackend for SimulatedBackend {
    fn source(&self) -> GpuSource {
        GpuSource::Simulated { spec: self.spec_text.clone() }
    }

    fn inventory(&mut self) -> Vec<GpuInfo> {
        (0..self.spec.count)
            .map(|i| GpuInfo {
                index: i,
                uuid: self.uuids[i as usize].clone(),
                name: format!("Simulated {} {}GB", self.spec.model, self.spec.memory_gb),
                simulated: true,
                memory_total_bytes: self.mem_total(),
                pci_bus_id: None,
            })
            .collect()
    }

    fn sample(&mut self) -> Vec<GpuSample> {
        let t = self.started.elapsed().as_secs_f64();
        let dt_ms = self.last_sample.elapsed().as_millis() as u64;
        self.last_sample = Instant::now();
        let total = self.mem_total();
        (0..self.spec.count)
            .map(|i| {
                let p = self.phase + f64::from(i) * 0.9;
                // Two waves (periods ~20 s and ~7 s) so consecutive samples differ.
                let w = 0.5 + 0.35 * (t / 3.2 + p).sin() + 0.15 * (t / 1.1 + 2.0 * p).sin();
                let util = (w.clamp(0.0, 1.0) * 100.0).round() as u32;
                // Background memory use of an idle GPU (driver, monitoring): 1-5 %. It
                // changes over time but leaves the GPU free for jobs to be placed on.
                let used = (total as f64 * (0.01 + 0.04 * w.clamp(0.0, 1.0))) as u64;
                let power_w = 70.0 + 6.3 * f64::from(util);
                let e = &mut self.energy_mj[i as usize];
                *e += (power_w * dt_ms as f64) as u64;
                GpuSample {
                    index: i,
                    uuid: self.uuids[i as usize].clone(),
                    memory_total_bytes: Some(total),
                    memory_used_bytes: Some(used),
                    memory_free_bytes: Some(total - used),
                    utilization_gpu_percent: Some(util),
                    utilization_memory_percent: Some(util * 3 / 4),
                    temperature_c: Some(32 + util / 2),
                    power_w: Some(power_w),
                    power_limit_w: Some(700.0),
                    energy_mj: Some(*e),
                    sm_clock_mhz: Some(1100 + util * 8),
                    memory_clock_mhz: Some(2619),
                    throttle_reasons: Some(if util < 5 { vec!["GPU_IDLE".into()] } else { vec![] }),
                    throttle_reasons_mask: Some(u64::from(util < 5)),
                    ecc_corrected_volatile: Some(0),
                    ecc_uncorrected_volatile: Some(0),
                    pcie_rx_kib_per_s: Some(util * 1000),
                    pcie_tx_kib_per_s: Some(util * 400),
                    mig_enabled: Some(false),
                    processes: Some(Vec::new()),
                }
            })
            .collect()
    }

    fn drain_events(&mut self) -> Vec<GpuEvent> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            SimSpec::parse("4xH100-80GB").unwrap(),
            SimSpec { count: 4, model: "H100".into(), memory_gb: 80 }
        );
        assert_eq!(SimSpec::parse("A100-40GB").unwrap().count, 1);
        assert_eq!(SimSpec::parse("2xL4").unwrap().memory_gb, 80);
        for bad in ["0xH100", "100xH100", "4x", "4xH100-GB", "4xH 100-80GB", ""] {
            assert!(SimSpec::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn simulated_is_marked_and_changes() {
        let mut b = SimulatedBackend::new("2xH100-80GB", "n1").unwrap();
        let inv = b.inventory();
        assert_eq!(inv.len(), 2);
        assert!(inv.iter().all(|g| g.simulated && g.name.contains("Simulated")));
        assert_ne!(inv[0].uuid, inv[1].uuid);
        let a = b.sample();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let c = b.sample();
        assert_ne!(a[0].memory_used_bytes, c[0].memory_used_bytes);
        // Stable identity across restarts of the same agent.
        let mut again = SimulatedBackend::new("2xH100-80GB", "n1").unwrap();
        assert_eq!(again.inventory()[1].uuid, inv[1].uuid);
    }
}
