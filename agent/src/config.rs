//! Agent configuration: a TOML file with the same keys as the command-line flags; flags
//! override the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::AgentError;

/// Keys accepted in the agent's TOML config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub coordinator: Option<String>,
    /// Join string from `fleetmesh tokens create` (enroll instead of pre-issued certs).
    pub join: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub name: Option<String>,
    pub simulate_gpus: Option<String>,
    pub telemetry_interval: Option<String>,
    pub reconnect_max: Option<String>,
    /// Price per GPU-hour (per hour for CPU-only jobs) this node asks.
    pub price_per_hour: Option<f64>,
    /// This node is spot/preemptible capacity.
    pub spot: Option<bool>,
    /// CPUs jobs may use together (default: every CPU of the host).
    pub cpus: Option<u32>,
    /// Memory jobs may use together, e.g. `64GiB` (default: the host's).
    pub memory: Option<String>,
    /// IP address peers and gang members reach this node at (default: the address its
    /// coordinator connection comes from).
    pub advertise_addr: Option<String>,
    /// Spot interruption notice to poll: an `http://` metadata URL...
    pub interruption_notice_url: Option<String>,
    /// ...or a file whose appearance is the notice.
    pub interruption_notice_file: Option<PathBuf>,
    /// Node labels `k=v` used by placement constraints.
    pub labels: Option<Vec<String>>,
    /// UDP address of the data-plane (xfer) endpoint.
    pub data_listen: Option<String>,
    /// Size limit of the chunk store, e.g. `100GiB`.
    pub store_limit: Option<String>,
    /// Cap on bytes served to peers per second, e.g. `200MiB`.
    pub serve_rate: Option<String>,
    /// Price added per GB of input fetched across providers/regions.
    pub transfer_cost_per_gb: Option<f64>,
    /// Bandwidth assumed for fetching inputs when estimating a bid's ETA, e.g. `100MiB`.
    pub fetch_bandwidth: Option<String>,
    /// `auto`, `none`, or the path of a docker-compatible program.
    pub container_runtime: Option<String>,
    /// Stop running attempts after this long without hearing from the coordinator.
    pub stop_jobs_after_disconnect: Option<String>,
    /// Unprivileged user jobs run as (the agent must run as root).
    pub job_user: Option<String>,
    /// `direct` or `systemd-run`: how attempts are started.
    pub job_launcher: Option<String>,
    /// `START-END`: each running attempt gets its own uid from this range.
    pub job_uids: Option<String>,
    /// `PREFIX`: each running attempt runs as its own account `PREFIX0`, `PREFIX1`, ...
    pub job_accounts: Option<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))
    }
}

/// Fully resolved agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `HOST:PORT`; from the join string when not given.
    pub coordinator: Option<String>,
    pub join: Option<fleetmesh_protocol::enroll::JoinString>,
    pub data_dir: PathBuf,
    /// Pre-issued identity (all three, or none when enrolling).
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub name: Option<String>,
    pub simulate_gpus: Option<String>,
    pub telemetry_interval: Duration,
    pub reconnect_max: Duration,
    pub price_per_hour: f64,
    pub spot: bool,
    /// CPUs and memory offered to jobs (none: the host's).
    pub cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub advertise_addr: Option<std::net::IpAddr>,
    /// Where a spot interruption notice would appear.
    pub interruption_notice: Option<crate::interruption::NoticeSource>,
    pub labels: Vec<(String, String)>,
    pub data: DataConfig,
    pub container_runtime: ContainerRuntime,
    /// Self-fencing: running attempts are stopped once the coordinator has not been heard
    /// from for this long (none: they keep running, and are re-adopted on reconnect).
    pub stop_jobs_after_disconnect: Option<Duration>,
    /// Jobs run as this user, which cannot read the agent's identity, chunk store or
    /// other attempts' work dirs (none: as the agent's own user).
    pub job_user: Option<String>,
    pub job_launcher: JobLauncher,
    /// Uids that running attempts take one each (from `job-accounts` or `job-uids`;
    /// none: every attempt runs as the job user).
    pub job_uid_pool: Option<Vec<u32>>,
}

/// The uids attempts take one each, from `job-uids` or `job-accounts` (not both).
fn job_uid_pool(
    uids: Option<&str>,
    accounts: Option<&str>,
    have_job_user: bool,
    launcher: JobLauncher,
) -> Result<Option<Vec<u32>>, AgentError> {
    let refuse = |m: String| Err(AgentError::Config(m));
    match (uids, accounts) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => refuse("give job-uids or job-accounts, not both".into()),
        (Some(r), None) | (None, Some(r)) if !have_job_user => {
            refuse(format!("job-uids/job-accounts {r}: needs job-user too"))
        }
        (Some(r), None) if launcher == JobLauncher::SystemdRun => refuse(format!(
            "job-uids {r}: systemd-run cannot start a unit as a uid without an account; use job-accounts (install-agent.sh creates fleetmesh-job-0..63)"
        )),
        (Some(r), None) => {
            let range = crate::sandbox::parse_uid_range(r)?;
            Ok(Some(range.collect()))
        }
        (None, Some(prefix)) => {
            Ok(Some(crate::sandbox::pool_accounts(prefix)?))
        }
    }
}

/// How an attempt's supervisor is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobLauncher {
    /// As a child of the agent, in its own process group (it inherits the agent's
    /// sandbox, if the agent has one).
    #[default]
    Direct,
    /// In a transient systemd unit of its own (`systemd-run`): outside the agent's
    /// service sandbox, in its own cgroup; what a systemd-installed agent uses.
    SystemdRun,
}

/// Which program runs jobs that name an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerRuntime {
    /// docker or podman from the PATH, whichever answers `info`.
    Auto,
    /// Never: image jobs are declined.
    None,
    /// This program (docker-compatible CLI); it must answer `info`.
    Program(String),
}

/// Data-plane settings.
#[derive(Debug, Clone)]
pub struct DataConfig {
    pub listen: std::net::SocketAddr,
    pub store_limit: u64,
    pub serve_rate: Option<u64>,
    pub transfer_cost_per_gb: f64,
    pub fetch_bandwidth: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            listen: (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            store_limit: DEFAULT_STORE_LIMIT,
            serve_rate: None,
            transfer_cost_per_gb: DEFAULT_TRANSFER_COST_PER_GB,
            fetch_bandwidth: DEFAULT_FETCH_BANDWIDTH,
        }
    }
}

/// Default chunk store size limit.
pub const DEFAULT_STORE_LIMIT: u64 = 100 << 30;
/// Default cross-site transfer price per GB (typical cloud egress).
pub const DEFAULT_TRANSFER_COST_PER_GB: f64 = 0.09;
/// Bandwidth assumed for input fetches when estimating ETAs (bytes/s).
pub const DEFAULT_FETCH_BANDWIDTH: u64 = 100 << 20;

fn size(what: &str, s: &str) -> Result<u64, AgentError> {
    fleetmesh_protocol::workflow::parse_size(s)
        .map_err(|e| AgentError::Config(format!("{what}: {e}")))
}

/// Default coordinator control port.
pub const DEFAULT_PORT: u16 = 7400;

/// Parse a human duration such as `1s`, `250ms`, `5m`.
pub fn parse_duration(what: &str, s: &str) -> Result<Duration, AgentError> {
    let d = humantime::parse_duration(s)
        .map_err(|e| AgentError::Config(format!("{what}: invalid duration {s:?}: {e}")))?;
    if d.is_zero() {
        return Err(AgentError::Config(format!("{what}: must be greater than zero")));
    }
    Ok(d)
}

impl FileConfig {
    /// These settings, with `other`'s where these have none.
    fn or(self, other: Self) -> Self {
        Self {
            coordinator: self.coordinator.or(other.coordinator),
            join: self.join.or(other.join),
            data_dir: self.data_dir.or(other.data_dir),
            ca: self.ca.or(other.ca),
            cert: self.cert.or(other.cert),
            key: self.key.or(other.key),
            name: self.name.or(other.name),
            simulate_gpus: self.simulate_gpus.or(other.simulate_gpus),
            telemetry_interval: self.telemetry_interval.or(other.telemetry_interval),
            reconnect_max: self.reconnect_max.or(other.reconnect_max),
            price_per_hour: self.price_per_hour.or(other.price_per_hour),
            spot: self.spot.or(other.spot),
            cpus: self.cpus.or(other.cpus),
            memory: self.memory.or(other.memory),
            advertise_addr: self.advertise_addr.or(other.advertise_addr),
            interruption_notice_url: self.interruption_notice_url.or(other.interruption_notice_url),
            interruption_notice_file: self
                .interruption_notice_file
                .or(other.interruption_notice_file),
            labels: self.labels.or(other.labels),
            data_listen: self.data_listen.or(other.data_listen),
            store_limit: self.store_limit.or(other.store_limit),
            serve_rate: self.serve_rate.or(other.serve_rate),
            transfer_cost_per_gb: self.transfer_cost_per_gb.or(other.transfer_cost_per_gb),
            fetch_bandwidth: self.fetch_bandwidth.or(other.fetch_bandwidth),
            container_runtime: self.container_runtime.or(other.container_runtime),
            stop_jobs_after_disconnect: self
                .stop_jobs_after_disconnect
                .or(other.stop_jobs_after_disconnect),
            job_user: self.job_user.or(other.job_user),
            job_launcher: self.job_launcher.or(other.job_launcher),
            job_uids: self.job_uids.or(other.job_uids),
            job_accounts: self.job_accounts.or(other.job_accounts),
        }
    }
}

/// Where the agent keeps its identity, store and attempts unless told otherwise.
const DEFAULT_DATA_DIR: &str = "/var/lib/fleetmesh-agent";
/// How often telemetry is reported unless told otherwise.
const DEFAULT_TELEMETRY_INTERVAL: Duration = Duration::from_secs(1);
/// The longest wait between reconnection attempts unless told otherwise.
const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A join string, or all three pre-issued identity files.
fn check_identity_files(c: &FileConfig, joining: bool) -> Result<(), AgentError> {
    let given = [c.ca.is_some(), c.cert.is_some(), c.key.is_some()];
    if !joining && given.contains(&false) {
        return Err(AgentError::Config(
            "pass --join JOIN_STRING, or all of --ca, --cert and --key (pre-issued certificates)"
                .into(),
        ));
    }
    if given.contains(&true) && given.contains(&false) {
        return Err(AgentError::Config("--ca, --cert and --key go together".into()));
    }
    Ok(())
}

fn duration_or(key: &str, value: Option<&str>, default: Duration) -> Result<Duration, AgentError> {
    value.map_or(Ok(default), |s| parse_duration(key, s))
}

/// The interruption notice's URL or file (not both; the URL plain `http://`).
fn notice_source(c: &FileConfig) -> Result<Option<crate::interruption::NoticeSource>, AgentError> {
    use crate::interruption::NoticeSource;
    match (&c.interruption_notice_url, &c.interruption_notice_file) {
        (Some(_), Some(_)) => Err(AgentError::Config(
            "give interruption-notice-url or interruption-notice-file, not both".into(),
        )),
        (Some(u), None) if !u.starts_with("http://") => Err(AgentError::Config(format!(
            "interruption-notice-url {u:?}: metadata services are plain http:// URLs"
        ))),
        (Some(u), None) => Ok(Some(NoticeSource::Url(u.clone()))),
        (None, Some(f)) => Ok(Some(NoticeSource::File(f.clone()))),
        (None, None) => Ok(None),
    }
}

/// CPUs offered to jobs: at least one.
fn offered_cpus(cpus: Option<u32>) -> Result<Option<u32>, AgentError> {
    match cpus {
        Some(0) => Err(AgentError::Config("cpus must be at least 1".into())),
        other => Ok(other),
    }
}

/// `k=v` labels.
fn labels(raw: Vec<String>) -> Result<Vec<(String, String)>, AgentError> {
    raw.iter()
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| AgentError::Config(format!("label {l:?} is not key=value")))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The data plane's settings.
fn data_config(c: &FileConfig) -> Result<DataConfig, AgentError> {
    let mut data = DataConfig::default();
    if let Some(l) = &c.data_listen {
        data.listen = l
            .parse()
            .map_err(|_| AgentError::Config(format!("data-listen: {l:?} is not IP:PORT")))?;
    }
    if let Some(l) = &c.store_limit {
        data.store_limit = size("store-limit", l)?;
    }
    if let Some(r) = &c.serve_rate {
        data.serve_rate = Some(size("serve-rate", r.trim_end_matches("/s"))?);
    }
    if let Some(cost) = c.transfer_cost_per_gb {
        if !(cost >= 0.0 && cost.is_finite()) {
            return Err(AgentError::Config("transfer-cost-per-gb must be >= 0".into()));
        }
        data.transfer_cost_per_gb = cost;
    }
    if let Some(b) = &c.fetch_bandwidth {
        data.fetch_bandwidth = size("fetch-bandwidth", b.trim_end_matches("/s"))?.max(1);
    }
    Ok(data)
}

fn container_runtime(v: Option<&str>) -> Result<ContainerRuntime, AgentError> {
    match v {
        None | Some("auto") => Ok(ContainerRuntime::Auto),
        Some("none") => Ok(ContainerRuntime::None),
        Some("") => Err(AgentError::Config("container-runtime is empty".into())),
        Some(p) => Ok(ContainerRuntime::Program(p.to_string())),
    }
}

fn job_launcher(v: Option<&str>) -> Result<JobLauncher, AgentError> {
    match v {
        None | Some("direct") => Ok(JobLauncher::Direct),
        Some("systemd-run") => Ok(JobLauncher::SystemdRun),
        Some(other) => {
            Err(AgentError::Config(format!("job-launcher {other:?}: use direct or systemd-run")))
        }
    }
}

impl AgentConfig {
    /// Merge the file config (if any) with flag overrides (`flags` wins).
    pub fn resolve(file: FileConfig, flags: FileConfig) -> Result<Self, AgentError> {
        let c = flags.or(file);
        let join = match &c.join {
            Some(j) => Some(
                j.parse::<fleetmesh_protocol::enroll::JoinString>()
                    .map_err(|e| AgentError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let coordinator = c.coordinator.clone().map(|c| {
            if c.contains(':') {
                c
            } else {
                format!("{c}:{DEFAULT_PORT}")
            }
        });
        if coordinator.is_none() && join.is_none() {
            return Err(AgentError::Config(
                "--coordinator is required (flag or config file)".into(),
            ));
        }
        check_identity_files(&c, join.is_some())?;
        let price_per_hour = c.price_per_hour.unwrap_or(1.0);
        if !(price_per_hour >= 0.0 && price_per_hour.is_finite()) {
            return Err(AgentError::Config("price-per-hour must be a non-negative number".into()));
        }
        let job_user = c.job_user.clone().filter(|u| !u.is_empty());
        let job_launcher = job_launcher(c.job_launcher.as_deref())?;
        let job_uid_pool = job_uid_pool(
            c.job_uids.as_deref().filter(|r| !r.is_empty()),
            c.job_accounts.as_deref().filter(|r| !r.is_empty()),
            job_user.is_some(),
            job_launcher,
        )?;
        let interruption_notice = notice_source(&c)?;
        Ok(Self {
            interruption_notice,
            job_uid_pool,
            job_launcher,
            data: data_config(&c)?,
            container_runtime: container_runtime(c.container_runtime.as_deref())?,
            stop_jobs_after_disconnect: c
                .stop_jobs_after_disconnect
                .as_deref()
                .map(|s| parse_duration("stop-jobs-after-disconnect", s))
                .transpose()?,
            job_user,
            coordinator,
            data_dir: c.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            join,
            ca: c.ca,
            cert: c.cert,
            key: c.key,
            name: c.name,
            simulate_gpus: c.simulate_gpus,
            telemetry_interval: duration_or(
                "telemetry-interval",
                c.telemetry_interval.as_deref(),
                DEFAULT_TELEMETRY_INTERVAL,
            )?,
            reconnect_max: duration_or(
                "reconnect-max",
                c.reconnect_max.as_deref(),
                DEFAULT_RECONNECT_MAX,
            )?,
            price_per_hour,
            spot: c.spot.unwrap_or(false),
            cpus: offered_cpus(c.cpus)?,
            advertise_addr: c
                .advertise_addr
                .as_deref()
                .map(|a| {
                    a.parse().map_err(|_| {
                        AgentError::Config(format!("advertise-addr {a:?} is not an IP address"))
                    })
                })
                .transpose()?,
            memory_bytes: c.memory.as_deref().map(|m| size("memory", m)).transpose()?,
            labels: labels(c.labels.unwrap_or_default())?,
        })
    }
}

/// Settings for `probe`.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub data_dir: PathBuf,
    pub simulate_gpus: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_are_kebab_case_and_flags_win() {
        let file: FileConfig = toml::from_str(
            r#"
            coordinator = "coord.example.com"
            data-dir = "/var/lib/x"
            ca = "/etc/fm/ca.pem"
            cert = "/etc/fm/agent.pem"
            key = "/etc/fm/agent.key"
            telemetry-interval = "2s"
            stop-jobs-after-disconnect = "1s"
            "#,
        )
        .unwrap();
        let flags = FileConfig { telemetry_interval: Some("250ms".into()), ..Default::default() };
        let c = AgentConfig::resolve(file, flags).unwrap();
        assert_eq!(c.stop_jobs_after_disconnect, Some(Duration::from_secs(1)));
        assert_eq!(
            c.coordinator.as_deref(),
            Some("coord.example.com:7400"),
            "default port appended"
        );
        assert_eq!(c.telemetry_interval, Duration::from_millis(250), "flag overrides file");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(c.reconnect_max, Duration::from_secs(5));
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let unknown = toml::from_str::<FileConfig>("coordinater = \"x\"").unwrap_err().to_string();
        assert!(unknown.contains("coordinater"), "{unknown}");
        let missing =
            AgentConfig::resolve(FileConfig::default(), FileConfig::default()).unwrap_err();
        assert!(missing.to_string().contains("--coordinator is required"), "{missing}");
        let flags = FileConfig {
            coordinator: Some("c:1".into()),
            ca: Some("a".into()),
            cert: Some("b".into()),
            key: Some("c".into()),
            telemetry_interval: Some("soon".into()),
            ..Default::default()
        };
        let bad = AgentConfig::resolve(FileConfig::default(), flags).unwrap_err().to_string();
        assert!(bad.contains("telemetry-interval") && bad.contains("soon"), "{bad}");
        let flags = FileConfig {
            coordinator: Some("c:1".into()),
            ca: Some("a".into()),
            cert: Some("b".into()),
            key: Some("c".into()),
            stop_jobs_after_disconnect: Some("later".into()),
            ..Default::default()
        };
        let bad = AgentConfig::resolve(FileConfig::default(), flags).unwrap_err().to_string();
        assert!(bad.contains("stop-jobs-after-disconnect") && bad.contains("later"), "{bad}");
    }

    #[test]
    fn uid_pools_need_a_job_user_and_an_account_under_systemd() {
        let pool = |uids: Option<&str>, accounts: Option<&str>, user, launcher| {
            job_uid_pool(uids, accounts, user, launcher).map_err(|e| e.to_string())
        };
        use JobLauncher::{Direct, SystemdRun};
        assert_eq!(pool(None, None, true, SystemdRun), Ok(None));
        assert_eq!(
            pool(Some("200000-200002"), None, true, Direct),
            Ok(Some(vec![200000, 200001, 200002]))
        );
        let e = pool(Some("200000-200002"), None, true, SystemdRun).unwrap_err();
        assert!(e.contains("use job-accounts"), "{e}");
        let e = pool(Some("200000-200002"), Some("fleetmesh-job-"), true, Direct).unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = pool(None, Some("fleetmesh-job-"), false, Direct).unwrap_err();
        assert!(e.contains("needs job-user"), "{e}");
        let e = pool(None, Some("no-such-prefix-"), true, SystemdRun).unwrap_err();
        assert!(e.contains("no account no-such-prefix-0"), "{e}");
    }
}
