//! Host telemetry through `sysinfo`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fleetmesh_protocol::{HostInfo, HostSample, SOFTWARE_VERSION};
use sysinfo::{Disks, Networks, System};

/// Samples CPU, memory, load, data-dir disk, network rates and uptime.
pub struct HostCollector {
    sys: Option<System>,
    networks: Option<Networks>,
    disks: Option<Disks>,
    data_dir: PathBuf,
    last_net: Instant,
}

impl std::fmt::Debug for HostCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCollector").field("data_dir", &self.data_dir).finish_non_exhaustive()
    }
}

impl HostCollector {
    pub fn new(data_dir: &Path) -> Self {
        let sys = match System::new() {
            Ok(mut s) => {
                s.refresh_cpu_usage();
                s.refresh_memory();
                Some(s)
            }
            Err(e) => {
                tracing::warn!(error = %e, "host CPU/memory figures unavailable");
                None
            }
        };
        let networks = Networks::new_with_refreshed_list().ok();
        let disks = Disks::new_with_refreshed_list().ok();
        let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        Self { sys, networks, disks, data_dir, last_net: Instant::now() }
    }

    /// Static host facts.
    pub fn info(&self) -> HostInfo {
        HostInfo {
            hostname: System::host_name().unwrap_or_else(|_| "unknown".into()),
            os: System::long_os_version().unwrap_or_else(|_| std::env::consts::OS.into()),
            kernel: System::kernel_version().unwrap_or_else(|_| "unknown".into()),
            agent_version: SOFTWARE_VERSION.to_string(),
            cpu_count: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            memory_total_bytes: self.sys.as_ref().map(|s| s.total_memory()).unwrap_or(0),
        }
    }

    /// The host's interface addresses other hosts may reach: loopback and IPv6
    /// link-local left out, IPv4 first.
    pub fn addresses(&self) -> Vec<String> {
        let Some(n) = self.networks.as_ref() else { return Vec::new() };
        let mut ips: Vec<std::net::IpAddr> = n
            .values()
            .flat_map(|data| data.ip_networks().iter().map(|net| net.addr))
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
            .filter(|ip| match ip {
                std::net::IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                std::net::IpAddr::V4(_) => true,
            })
            .collect();
        ips.sort_by_key(|ip| (ip.is_ipv6(), *ip));
        ips.dedup();
        ips.into_iter().map(|ip| ip.to_string()).collect()
    }

    /// One sample. CPU utilisation is measured since the previous call.
    pub fn sample(&mut self) -> HostSample {
        let (cpu, mem_total, mem_used) = match self.sys.as_mut() {
            Some(s) => {
                s.refresh_cpu_usage();
                s.refresh_memory();
                (s.global_cpu_usage(), s.total_memory(), s.used_memory())
            }
            None => (0.0, 0, 0),
        };
        let load = System::load_average().ok();
        let elapsed = self.last_net.elapsed().as_secs_f64().max(0.001);
        self.last_net = Instant::now();
        let (rx, tx) = match self.networks.as_mut() {
            Some(n) => {
                n.refresh(true);
                n.iter()
                    .fold((0u64, 0u64), |(r, t), (_, d)| (r + d.received(), t + d.transmitted()))
            }
            None => (0, 0),
        };
        let (disk_total, disk_avail) = self.data_disk();
        HostSample {
            cpu_utilization_percent: cpu,
            load_1: load.as_ref().map(|l| l.one).unwrap_or(0.0),
            load_5: load.as_ref().map(|l| l.five).unwrap_or(0.0),
            load_15: load.as_ref().map(|l| l.fifteen).unwrap_or(0.0),
            memory_total_bytes: mem_total,
            memory_used_bytes: mem_used,
            data_disk_total_bytes: disk_total,
            data_disk_available_bytes: disk_avail,
            net_rx_bytes_per_s: (rx as f64 / elapsed) as u64,
            net_tx_bytes_per_s: (tx as f64 / elapsed) as u64,
            uptime_s: System::uptime().unwrap_or(0),
        }
    }

    /// Disk whose mount point is the longest prefix of the data dir.
    fn data_disk(&mut self) -> (Option<u64>, Option<u64>) {
        let Some(disks) = self.disks.as_mut() else { return (None, None) };
        disks.refresh(true);
        let best = disks
            .iter()
            .filter(|d| self.data_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len());
        match best {
            Some(d) => (Some(d.total_space()), Some(d.available_space())),
            None => (None, None),
        }
    }
}
