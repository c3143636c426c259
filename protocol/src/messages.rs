//! Control-plane messages exchanged between agents and the coordinator.
//!
//! Every enum is `#[non_exhaustive]` so adding a variant is not a breaking change for
//! code matching on it; the wire compatibility contract is the `PROTOCOL_VERSION`
//! checked in the hello exchange. Field order matters for bincode: append new fields
//! only together with a version bump. No `skip_serializing_if` / `untagged` (bincode is
//! not self-describing).

use serde::{Deserialize, Serialize};

/// Messages an agent sends to the coordinator on its control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AgentMessage {
    /// First frame on a new connection.
    Hello(Hello),
    /// Static description of the node; sent after `Welcome` and whenever it changes.
    Inventory(Inventory),
    /// A periodic telemetry sample.
    Telemetry(TelemetryReport),
    /// Liveness beat between telemetry samples.
    Heartbeat { seq: u64 },
    /// Graceful shutdown: the agent is leaving the mesh on purpose.
    Leaving { reason: String },
    /// Certificate renewal: a CSR for the agent's (unchanged) key.
    Renew { csr_pem: String },
    /// Answer to a call for bids: an offer with a tentative reservation.
    Bid {
        auction: String,
        gpus: Vec<String>,
        price: f64,
        eta_ms: u64,
        local_bytes: u64,
        /// One per offered GPU, in the order of `gpus`: what the agent saw when it bid.
        health: Vec<GpuHealth>,
        /// Share (0 to 1) of the node's CPUs that would be taken once this job runs:
        /// with equal offers, the less loaded node wins (jobs spread out).
        load: f64,
    },
    /// Answer to a call for bids: no.
    Decline { auction: String, reason: String },
    /// An award was accepted (the process is being started) or refused.
    AwardAnswer { job: String, attempt: u64, accepted: bool, reason: String },
    /// A job attempt's process started.
    JobStarted { job: String, attempt: u64, pid: u32 },
    /// Output of a running attempt (stream 1 = stdout, 2 = stderr).
    JobOutput { job: String, attempt: u64, stream: u8, data: Vec<u8> },
    /// A job attempt ended.
    JobExited {
        job: String,
        attempt: u64,
        outcome: JobOutcome,
        duration_ms: u64,
        /// Output datasets of a successful attempt (stored on this agent).
        outputs: Vec<OutputDataset>,
    },
    /// Attempts this agent is running (sent after every hello, for reconciliation).
    Running { attempts: Vec<(String, u64)> },
    /// Datasets in this agent's store (sent after every hello and when it changes).
    Holdings { datasets: Vec<Holding> },
    /// A fetch the coordinator asked for (`Fetch`) ended.
    FetchDone(FetchReport),
    /// The node will be taken away (a spot interruption notice): no new work, and its
    /// attempts have `grace_ms` to checkpoint before they must be elsewhere.
    Interrupted { grace_ms: u64, reason: String },
}

/// A dataset an agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub dataset: String,
    /// Every chunk is present and verified.
    pub complete: bool,
    pub bytes_present: u64,
}

/// An output a job attempt produced, chunked into this agent's store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputDataset {
    /// The output's name in the workflow (`outputs:` entry).
    pub output: String,
    pub manifest: crate::data::Manifest,
}

/// How a fetch ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchReport {
    pub dataset: String,
    pub ok: bool,
    pub detail: String,
    /// Chunks received over the network in this run.
    pub fetched_chunks: u64,
    /// Chunks already present and verified (earlier runs, other datasets).
    pub reused_chunks: u64,
    /// Chunks received per holder.
    pub per_holder: Vec<(String, u64)>,
}

impl FetchReport {
    /// A fetch that moved nothing: already held (`ok`), or refused/failed with `detail`.
    pub fn without_transfer(dataset: String, ok: bool, detail: String) -> Self {
        Self { dataset, ok, detail, fetched_chunks: 0, reused_chunks: 0, per_holder: Vec::new() }
    }
}

/// How a job attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum JobOutcome {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
    },
    TimedOut,
    Cancelled,
    FailedToStart {
        reason: String,
    },
    /// The process succeeded but its outputs could not be stored.
    OutputFailed {
        reason: String,
    },
    /// The inputs could not be fetched (no reachable holder, disk full): the process never
    /// ran. The coordinator places the job again without using a retry.
    StagingFailed {
        reason: String,
    },
    /// The agent stopped the attempt on its own: it had not heard from the coordinator
    /// for longer than its `--stop-jobs-after-disconnect`. Not the job's fault: the
    /// coordinator places it again without using a retry.
    Abandoned {
        reason: String,
    },
}

impl JobOutcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, JobOutcome::Exited { code: 0 })
    }
}

impl std::fmt::Display for JobOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobOutcome::Exited { code } => write!(f, "exited with code {code}"),
            JobOutcome::Signaled { signal } => write!(f, "killed by signal {signal}"),
            JobOutcome::TimedOut => write!(f, "timed out"),
            JobOutcome::Cancelled => write!(f, "cancelled"),
            JobOutcome::FailedToStart { reason } => write!(f, "failed to start: {reason}"),
            JobOutcome::OutputFailed { reason } => write!(f, "outputs not stored: {reason}"),
            JobOutcome::StagingFailed { reason } => write!(f, "inputs not staged: {reason}"),
            JobOutcome::Abandoned { reason } => write!(f, "stopped by its agent: {reason}"),
        }
    }
}

/// What an agent needs to run one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// argv; a workflow `script` arrives as `["sh", "-c", script]`.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub image: Option<String>,
    pub timeout_ms: Option<u64>,
}

/// A job's placement request, sent to candidate agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallForBids {
    pub auction: String,
    pub job: String,
    pub gpus: u32,
    pub gpu_model: Option<String>,
    pub gpu_memory_bytes: Option<u64>,
    /// CPUs and memory the job takes on the node while it runs.
    pub cpus: f64,
    pub memory_bytes: u64,
    pub needs_container: bool,
    pub expected_duration_ms: u64,
    pub lease_ms: u64,
    /// Input datasets, for bids that account for data already held.
    pub inputs: Vec<InputSummary>,
    /// Answer as for a real auction, but reserve nothing (`fleetmesh plan`).
    pub dry_run: bool,
}

/// An input of a job being auctioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSummary {
    pub dataset: String,
    pub bytes: u64,
    /// (provider, region) of the peers holding it.
    pub holder_sites: Vec<(Option<String>, Option<String>)>,
}

/// An input to stage before the process starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwardInput {
    /// Directory under `$FLEETMESH_INPUTS`: a name, or `NAME/INDEX` for one member's
    /// output of an array taken together (fan-in).
    pub mount: String,
    pub plan: crate::data::FetchPlan,
    /// Only this share of the dataset's files is fetched and mounted (array members).
    pub shard: Option<crate::data::Shard>,
}

/// An output to collect after the process succeeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwardOutput {
    /// Directory name under `$FLEETMESH_OUTPUTS`.
    pub output: String,
    /// Registered dataset name (`WORKFLOW.JOB.OUTPUT`).
    pub dataset_name: String,
    /// Residency the output inherits.
    pub jurisdictions: Vec<String>,
}

/// The coordinator awards an attempt (fenced by `attempt`) to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Award {
    pub auction: String,
    pub job: String,
    pub attempt: u64,
    pub gpus: Vec<String>,
    /// CPUs and memory the attempt holds on the node while it runs (attempt records
    /// written before these existed read as none).
    #[serde(default)]
    pub cpus: f64,
    #[serde(default)]
    pub memory_bytes: u64,
    pub exec: ExecSpec,
    pub rank: u32,
    pub world_size: u32,
    pub master_addr: String,
    pub master_port: u16,
    pub inputs: Vec<AwardInput>,
    pub outputs: Vec<AwardOutput>,
}

/// Messages the coordinator sends to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CoordinatorMessage {
    /// The hello was accepted.
    Welcome(Welcome),
    /// The hello (or the session) was refused; the connection is closed after this.
    Reject {
        reason: String,
    },
    /// A renewed certificate (same name and attributes, new validity and serial).
    Renewed {
        cert_pem: String,
    },
    /// Renewal refused; the current certificate stays valid until it expires.
    RenewRefused {
        reason: String,
    },
    CallForBids(CallForBids),
    Award(Box<Award>),
    /// The auction was decided for someone else: drop the reservation.
    Release {
        auction: String,
    },
    /// Stop an attempt: SIGTERM, then SIGKILL after `grace_ms`.
    Stop {
        job: String,
        attempt: u64,
        grace_ms: u64,
        reason: String,
    },
    /// Reconciliation after a (re)connect: these attempts may keep running; stop others.
    Keep {
        attempts: Vec<(String, u64)>,
    },
    /// A `JobExited` was recorded durably; the agent may forget it.
    ExitRecorded {
        job: String,
        attempt: u64,
    },
    /// Sent after `Welcome`: the key tickets are signed with.
    DataPlane {
        ticket_key: Vec<u8>,
    },
    /// Fetch a dataset into the local store (replication, `data put --on`).
    Fetch(Box<crate::data::FetchPlan>),
    /// Remove a dataset from the local store.
    DropDataset {
        dataset: String,
    },
    /// Revoked agents and certificate serials: a data-plane holder serves none of them,
    /// even with a ticket issued before the revocation. The whole list, sent after the
    /// welcome and again whenever it grows.
    Denied {
        agents: Vec<String>,
        serials: Vec<String>,
    },
}

/// Agent hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// `PROTOCOL_VERSION` of the agent.
    pub protocol_version: u32,
    /// The name the agent believes it has; must equal the name in its certificate.
    pub agent_name: String,
    /// Software version of the agent (informational).
    pub software_version: String,
}

/// Coordinator answer to a hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u32,
    /// Identifies this session; a later session of the same agent replaces it.
    pub session_id: u64,
    /// How often the coordinator wants heartbeats (milliseconds).
    pub heartbeat_interval_ms: u64,
}

/// Where the GPU figures of an agent come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GpuSource {
    /// Real NVIDIA GPUs read through NVML.
    Nvml { driver_version: Option<String>, nvml_version: Option<String> },
    /// Simulated GPUs for development and tests (never real hardware).
    Simulated { spec: String },
    /// No NVML on this node: CPU-only.
    None,
}

impl GpuSource {
    /// Short label used in CLI tables and metrics (`nvml`, `simulated`, `none`).
    pub fn label(&self) -> &'static str {
        match self {
            GpuSource::Nvml { .. } => "nvml",
            GpuSource::Simulated { .. } => "simulated",
            GpuSource::None => "none",
        }
    }
}

/// Static node description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub host: HostInfo,
    pub gpu_source: GpuSource,
    pub gpus: Vec<GpuInfo>,
    /// What the agent charges (configured by the node owner), per GPU-hour (per hour for
    /// CPU-only jobs).
    pub price_per_hour: f64,
    pub spot: bool,
    pub labels: Vec<(String, String)>,
    /// `docker` or `podman` when available.
    pub container_runtime: Option<String>,
    /// UDP port of the agent's data-plane (xfer) endpoint; `None` = not serving data.
    pub data_port: Option<u16>,
    /// The address peers reach this node at (`--advertise-addr`); none: the address
    /// its coordinator connection comes from.
    #[serde(default)]
    pub advertise_addr: Option<String>,
    /// The host's own addresses, loopback excluded: a gang's rendezvous when the
    /// coordinator sees this node over loopback but other members are on other hosts.
    #[serde(default)]
    pub host_addrs: Vec<String>,
}

/// Static host facts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub agent_version: String,
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
}

/// Health facts of an offered GPU, as the bidding agent read them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuHealth {
    pub uuid: String,
    pub temperature_c: Option<u32>,
    /// Uncorrectable ECC errors since the driver loaded.
    pub ecc_uncorrected_volatile: Option<u64>,
    /// Last XID / double-bit ECC event, ms since the epoch (none seen: `None`).
    pub last_fatal_event_ms: Option<u64>,
}

/// Static GPU facts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// True for GPUs from the simulated source; never true for NVML devices.
    pub simulated: bool,
    pub memory_total_bytes: u64,
    pub pci_bus_id: Option<String>,
}

/// One telemetry sample of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryReport {
    /// Monotonic per-connection sequence number.
    pub seq: u64,
    /// Agent wall clock when the sample was taken (µs since the Unix epoch).
    pub sampled_at_unix_us: u64,
    pub host: HostSample,
    pub gpus: Vec<GpuSample>,
    /// GPU events (XID, double-bit ECC) observed since the previous report.
    pub events: Vec<GpuEvent>,
}

/// Host figures at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSample {
    pub cpu_utilization_percent: f32,
    pub load_1: f64,
    pub load_5: f64,
    pub load_15: f64,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// Disk holding the agent's data dir.
    pub data_disk_total_bytes: Option<u64>,
    pub data_disk_available_bytes: Option<u64>,
    pub net_rx_bytes_per_s: u64,
    pub net_tx_bytes_per_s: u64,
    pub uptime_s: u64,
}

/// GPU figures at one instant. `None` means the GPU does not report that field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_free_bytes: Option<u64>,
    pub utilization_gpu_percent: Option<u32>,
    pub utilization_memory_percent: Option<u32>,
    pub temperature_c: Option<u32>,
    pub power_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    /// Total energy since driver load, millijoules.
    pub energy_mj: Option<u64>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// Names of active clock throttle reasons (empty = none active).
    pub throttle_reasons: Option<Vec<String>>,
    /// The same as NVML's bitmask (what `nvidia-smi` shows as
    /// `clocks_event_reasons.active`), limited to the bits this build knows.
    pub throttle_reasons_mask: Option<u64>,
    pub ecc_corrected_volatile: Option<u64>,
    pub ecc_uncorrected_volatile: Option<u64>,
    pub pcie_rx_kib_per_s: Option<u32>,
    pub pcie_tx_kib_per_s: Option<u32>,
    pub mig_enabled: Option<bool>,
    pub processes: Option<Vec<GpuProcess>>,
}

/// A compute process on a GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    pub used_memory_bytes: Option<u64>,
}

/// An asynchronous GPU health event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuEvent {
    pub uuid: String,
    pub at_unix_ms: u64,
    pub kind: GpuEventKind,
}

/// Kinds of GPU health events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GpuEventKind {
    /// Critical XID error; `None` when the driver did not report the code.
    Xid(Option<u64>),
    DoubleBitEcc,
    SingleBitEcc,
}
