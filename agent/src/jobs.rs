//! Job execution on the agent: bidding state, running attempts, and an outbox of job
//! events that survives reconnects (attempts keep running while the coordinator is away;
//! their events are delivered by the next session).
//!
//! Each attempt runs in `<data-dir>/work/<job>/<attempt>/` under its own supervisor
//! ([`crate::shim`]), which leads the attempt's process group and outlives the agent, with
//! the job's env plus `CUDA_VISIBLE_DEVICES` (awarded GPU UUIDs), `FLEETMESH_JOB`,
//! `FLEETMESH_ATTEMPT`, and for gangs `FLEETMESH_RANK`, `FLEETMESH_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`. The supervisor writes stdout/stderr to
//! `stdout.log`/`stderr.log` (capped); the agent tails them to the coordinator. Stop =
//! SIGTERM to the group, SIGKILL after the grace.
//!
//! Running attempts and unacknowledged exits are kept in the durable
//! [`crate::attempts::AttemptTable`]: a restarted agent re-adopts the attempts still
//! alive ([`Jobs::recover`]), reports the ones that ended while it was down, and kills
//! process groups it cannot vouch for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetmesh_protocol::{AgentMessage, Award, CallForBids, JobOutcome};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::attempts::{AttemptRecord, AttemptTable};
use crate::bidding::{self, LocalState};
use crate::shim::{self, ExitRecord};

pub use crate::shim::MAX_LOG_BYTES;
/// How often an attempt's logs are read for streaming, and an adopted attempt checked.
const ATTEMPT_POLL: Duration = Duration::from_millis(100);
/// Most log bytes streamed per stream and poll (bounds one JobOutput message).
const LOG_READ_MAX: usize = 256 << 10;
/// How often the time the coordinator was last heard from is written for supervisors.
const FENCE_FILE_EVERY: Duration = Duration::from_millis(200);
/// Grace given to running attempts when the agent shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
pub use crate::outbox::Outbox;

/// Why an attempt could not be started (reported as `FailedToStart`).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("job needs a container image; no docker or podman here")]
    NoRuntime,
    #[error("{0}")]
    Image(String),
    #[error("empty command")]
    EmptyCommand,
    #[error("cannot find the agent program to supervise the attempt")]
    NoSupervisor,
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("systemd unit {unit}: {why}")]
    Unit { unit: String, why: String },
}

/// A container runtime that does not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("{program}: {why}")]
    Spawn { program: String, why: String },
    #[error("`{program} info` failed ({status})")]
    Failed { program: String, status: String },
    #[error("`{program} info` did not answer in {secs} s")]
    Silent { program: String, secs: u64 },
}

/// How long `RUNTIME info` may take before the runtime counts as not answering.
const RUNTIME_INFO_TIMEOUT: Duration = Duration::from_secs(15);
const RUNTIME_INFO_POLL: Duration = Duration::from_millis(50);

/// Why an award is refused (told to the coordinator, which gives it to the runner-up or
/// auctions the job again).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwardRefused {
    #[error("this agent does not run jobs")]
    NoJobs,
    #[error("agent state poisoned")]
    Poisoned,
    #[error("attempt {attempt} of {job} is stale or already running here")]
    Stale { job: String, attempt: u64 },
    #[error("award cannot be taken: {0}")]
    Gpus(#[from] crate::bidding::GpuTaken),
    #[error("all {0} job uids are in use by running attempts")]
    NoFreeUid(usize),
}

struct RunningAttempt {
    gpus: Vec<String>,
    stop: Option<oneshot::Sender<(JobOutcome, Duration)>>,
    /// The uid it runs as, when attempts get their own (`--job-uids`).
    uid: Option<u32>,
}

/// Running attempts by (job, attempt).
type Running = BTreeMap<(String, u64), RunningAttempt>;

/// All job state of one agent.
pub struct Jobs {
    state: Mutex<(LocalState, Running)>,
    /// Exits not yet acknowledged by the coordinator: re-sent on every new session, so an
    /// exit written into a connection that died is never lost.
    unacked_exits: Mutex<Vec<AgentMessage>>,
    pub outbox: Arc<Outbox>,
    work_root: PathBuf,
    container_runtime: Option<String>,
    data: std::sync::OnceLock<Arc<crate::data::DataPlane>>,
    /// (provider, region) of this node, for transfer pricing.
    site: std::sync::OnceLock<(Option<String>, Option<String>)>,
    /// SIMULATED execution (benchmarks only, set explicitly with
    /// [`Jobs::simulate_execution`]): attempts "run" for this long without a process.
    simulated_run: std::sync::OnceLock<Duration>,
    /// When the coordinator was last heard from (any packet on the session), ms since
    /// the epoch; read by the self-fencing watchdog ([`Jobs::fence_after_disconnect`]).
    last_heard_ms: std::sync::atomic::AtomicU64,
    /// The durable attempt table (`None` if the data dir cannot hold it: attempts then
    /// do not survive an agent restart, which is logged).
    table: Option<AttemptTable>,
    /// The program started as each attempt's supervisor (this binary).
    shim_program: Option<PathBuf>,
    /// With self-fencing: (after, file) handed to supervisors, which stop their job
    /// when the file's time is older than `after`, even while the agent is down.
    fence: std::sync::OnceLock<(Duration, PathBuf)>,
    /// The unprivileged user attempts run as (see [`crate::sandbox`]).
    job_user: std::sync::OnceLock<crate::sandbox::JobUser>,
    /// With a uid pool (`--job-accounts`, `--job-uids`): each running attempt takes the
    /// first free uid of it,
    /// so concurrent attempts cannot read each other's work dirs or processes.
    job_uids: std::sync::OnceLock<Vec<u32>>,
    /// How attempts are started ([`JobLauncher::Direct`] unless set).
    launcher: std::sync::OnceLock<JobLauncher>,
}

pub use crate::config::JobLauncher;

impl JobLauncher {
    /// How to run `program` where jobs run: itself (direct), or through
    /// `systemd-run --wait --pipe` so a rootful runtime's `info`, `stop` and `rm` are not
    /// confined by the agent's own service sandbox (read-only /var/lib/containers, /run).
    pub fn outside(self, program: &str) -> (&str, Vec<&str>) {
        match self {
            JobLauncher::Direct => (program, Vec::new()),
            JobLauncher::SystemdRun => {
                ("systemd-run", vec!["--quiet", "--collect", "--wait", "--pipe", "--", program])
            }
        }
    }
}

/// The transient unit of an attempt.
/// What an awarded attempt holds on this node.
fn hold_of(a: &Award) -> bidding::Hold {
    bidding::Hold { gpus: a.gpus.clone(), cpus: a.cpus, memory_bytes: a.memory_bytes }
}

/// Uids of `pool` that neither a running attempt nor one of `reserved` bids (each may
/// become an attempt) will take.
fn uids_left(
    pool: &[u32],
    running: &BTreeMap<(String, u64), RunningAttempt>,
    reserved: usize,
) -> usize {
    let taken = running.values().filter(|r| r.uid.is_some_and(|u| pool.contains(&u))).count();
    pool.len().saturating_sub(taken + reserved)
}

/// A running attempt's supervisor, as [`Jobs::watch`] follows it.
struct Supervised<'a> {
    dir: &'a Path,
    /// The supervisor's pid (the attempt's process group).
    pid: u32,
    /// (runtime, container name) of an image job.
    container: Option<&'a (String, String)>,
    /// The supervisor, when this agent started it (an adopted one has none).
    child: Option<tokio::process::Child>,
    /// Re-adopted after an agent restart: its logs stream from where they are now.
    adopted: bool,
}

/// The environment every attempt gets: its award's env, the GPUs, where it runs, and for
/// a gang its rank and rendezvous.
fn attempt_env(a: &Award, dir: &Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = a.exec.env.clone();
    env.push(("CUDA_VISIBLE_DEVICES".into(), a.gpus.join(",")));
    env.push(("FLEETMESH_JOB".into(), a.job.clone()));
    env.push(("FLEETMESH_ATTEMPT".into(), a.attempt.to_string()));
    env.push(("FLEETMESH_WORK_DIR".into(), dir.display().to_string()));
    if a.world_size > 1 {
        env.extend(gang_env(a));
    }
    env
}

/// A gang member's rendezvous, under the names `torch.distributed` (`env://`) and
/// torchrun read: each member is one process on its own node, so its node rank is its
/// rank and it is local rank 0 of 1. The `PET_*` names are torchrun's defaults for
/// `--nnodes`, `--node-rank`, `--master-addr` and `--master-port`, so a member can run
/// `torchrun --nproc-per-node=N train.py` with no further arguments.
fn gang_env(a: &Award) -> Vec<(String, String)> {
    let (rank, world) = (a.rank.to_string(), a.world_size.to_string());
    let port = a.master_port.to_string();
    let pairs: [(&str, &str); 16] = [
        ("FLEETMESH_RANK", &rank),
        ("FLEETMESH_WORLD_SIZE", &world),
        ("RANK", &rank),
        ("WORLD_SIZE", &world),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "1"),
        ("NODE_RANK", &rank),
        ("GROUP_RANK", &rank),
        ("GROUP_WORLD_SIZE", &world),
        ("MASTER_ADDR", &a.master_addr),
        ("MASTER_PORT", &port),
        ("PET_NNODES", &world),
        ("PET_NODE_RANK", &rank),
        ("PET_MASTER_ADDR", &a.master_addr),
        ("PET_MASTER_PORT", &port),
        ("TORCHELASTIC_RUN_ID", &a.job),
    ];
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn unit_name(job: &str, attempt: u64) -> String {
    let h =
        fleetmesh_protocol::data::hash_hex(&fleetmesh_protocol::data::hash_bytes(job.as_bytes()));
    format!("fleetmesh-attempt-{}-{attempt}", &h[..16])
}

/// How long systemd may take to start an attempt's unit and its supervisor to lock:
/// under the coordinator's 5 s start timeout, so a unit that cannot start is reported as
/// such before the coordinator gives up on the attempt and places it again.
const UNIT_START_TIMEOUT: Duration = Duration::from_secs(4);

/// Start the supervisor in transient unit `unit` and return its pid (which leads the
/// attempt's process group). The job's environment travels in a file in the attempt dir.
async fn launch_unit(
    unit: &str,
    shim_program: &Path,
    mut shim_args: Vec<std::ffi::OsString>,
    argv: &[String],
    env: &[(String, String)],
    dir: &Path,
    run_as: Option<&crate::sandbox::JobUser>,
) -> Result<u32, LaunchError> {
    // The job's words go in a file: systemd expands `$` in a unit's command line.
    let launch_file = dir.join(shim::LAUNCH_FILE);
    let launch = shim::LaunchFile {
        argv: argv.to_vec(),
        env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    let bytes = serde_json::to_vec(&launch).map_err(|e| LaunchError::Io {
        path: launch_file.clone(),
        source: std::io::Error::other(e),
    })?;
    let at = |source: std::io::Error| LaunchError::Io { path: launch_file.clone(), source };
    std::fs::write(&launch_file, bytes).map_err(at)?;
    if let Some(u) = run_as {
        crate::sandbox::give(&launch_file, u).map_err(at)?;
    }
    shim_args.extend(["--launch-file".into(), launch_file.into_os_string()]);
    let mut cmd = tokio::process::Command::new("systemd-run");
    cmd.arg(format!("--unit={unit}"))
        .args(["--collect", "--quiet", "--property=KillMode=control-group"])
        .arg(format!("--working-directory={}", dir.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(u) = run_as {
        cmd.arg(format!("--uid={}", u.uid)).arg(format!("--gid={}", u.gid));
    }
    cmd.arg("--").arg(shim_program).args(&shim_args);
    let out = tokio::time::timeout(UNIT_START_TIMEOUT, cmd.output())
        .await
        .map_err(|_| LaunchError::Unit {
            unit: unit.into(),
            why: "systemd-run did not answer in time".into(),
        })?
        .map_err(|e| LaunchError::Unit { unit: unit.into(), why: format!("systemd-run: {e}") })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(LaunchError::Unit { unit: unit.into(), why });
    }
    let deadline = Instant::now() + UNIT_START_TIMEOUT;
    loop {
        if let Some(pid) = shim::lock_holder(dir) {
            return Ok(pid);
        }
        if shim::read_exit(dir).is_some() {
            // It ran and ended already (or could not start the job): the exit file says.
            return Ok(0);
        }
        if Instant::now() > deadline {
            let why = "it started, but its supervisor never took the attempt's lock".into();
            return Err(LaunchError::Unit { unit: unit.into(), why });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").field("work_root", &self.work_root).finish_non_exhaustive()
    }
}

use fleetmesh_data::now_unix_ms as now_ms;

/// Whether `program info` succeeds within 15 s: a docker client whose daemon is not
/// running is on the PATH but cannot run anything.
pub fn runtime_answers(program: &str, launcher: JobLauncher) -> Result<(), RuntimeError> {
    let spawn = |why: String| RuntimeError::Spawn { program: program.to_string(), why };
    let (prog, prefix) = launcher.outside(program);
    let mut child = std::process::Command::new(prog)
        .args(prefix)
        .arg("info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| spawn(e.to_string()))?;
    let deadline = Instant::now() + RUNTIME_INFO_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => {
                let status = st.to_string();
                return Err(RuntimeError::Failed { program: program.to_string(), status });
            }
            Ok(None) if Instant::now() > deadline => {
                // Best effort: a client that hangs is abandoned either way.
                let _ = child.kill();
                let _ = child.wait();
                let secs = RUNTIME_INFO_TIMEOUT.as_secs();
                return Err(RuntimeError::Silent { program: program.to_string(), secs });
            }
            Ok(None) => std::thread::sleep(RUNTIME_INFO_POLL),
            Err(e) => return Err(spawn(e.to_string())),
        }
    }
}

/// The container runtime image jobs use: `docker` or `podman` from the PATH if one
/// answers `info` (auto), none, or the configured program (which must answer).
pub fn find_container_runtime(
    choice: &crate::config::ContainerRuntime,
    launcher: JobLauncher,
) -> Result<Option<String>, RuntimeError> {
    use crate::config::ContainerRuntime;
    match choice {
        ContainerRuntime::None => Ok(None),
        ContainerRuntime::Program(p) => runtime_answers(p, launcher).map(|()| Some(p.clone())),
        ContainerRuntime::Auto => {
            let Some(path) = std::env::var_os("PATH") else { return Ok(None) };
            for rt in ["docker", "podman"] {
                if !std::env::split_paths(&path).any(|d| d.join(rt).is_file()) {
                    continue;
                }
                match runtime_answers(rt, launcher) {
                    Ok(()) => return Ok(Some(rt.to_string())),
                    Err(e) => {
                        warn!(runtime = rt, error = %e, "container runtime on the PATH is not usable; image jobs will be declined unless another one is")
                    }
                }
            }
            Ok(None)
        }
    }
}

impl Jobs {
    /// `container_runtime`: the program that runs image jobs (see
    /// [`find_container_runtime`]); `None` declines them.
    pub fn new(
        data_dir: &std::path::Path,
        price_per_hour: f64,
        spot: bool,
        container_runtime: Option<String>,
    ) -> Arc<Self> {
        let local = LocalState {
            price_per_hour,
            spot,
            has_container_runtime: container_runtime.is_some(),
            ..Default::default()
        };
        let table = AttemptTable::open(data_dir)
            .map_err(|e| {
                warn!(error = %e, "no durable attempt table: running attempts will not survive an agent restart")
            })
            .ok();
        let shim_program = std::env::current_exe()
            .map_err(|e| warn!(error = %e, "cannot find this program to supervise attempts"))
            .ok();
        Arc::new(Self {
            state: Mutex::new((local, BTreeMap::new())),
            unacked_exits: Mutex::new(Vec::new()),
            outbox: Arc::new(Outbox::default()),
            work_root: data_dir.join("work"),
            container_runtime,
            data: Default::default(),
            site: Default::default(),
            simulated_run: Default::default(),
            last_heard_ms: std::sync::atomic::AtomicU64::new(now_ms()),
            table,
            shim_program,
            fence: Default::default(),
            job_user: Default::default(),
            job_uids: Default::default(),
            launcher: Default::default(),
        })
    }

    /// Start attempts this way from now on.
    pub fn set_launcher(&self, l: JobLauncher) {
        let _ = self.launcher.set(l);
    }

    fn launcher(&self) -> JobLauncher {
        self.launcher.get().copied().unwrap_or_default()
    }

    /// Run attempts as this user from now on; with `uids`, each as its own uid of that
    /// pool (with the job user's group).
    pub fn set_job_user(&self, u: crate::sandbox::JobUser, uids: Option<Vec<u32>>) {
        let _ = self.job_user.set(u);
        if let Some(r) = uids {
            let _ = self.job_uids.set(r);
        }
    }

    /// The session received something from the coordinator.
    pub fn heard_from_coordinator(&self) {
        self.last_heard_ms.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Self-fencing: from now on, every running attempt is stopped (SIGTERM, SIGKILL
    /// after 500 ms) once the coordinator has not been heard from for `after`. The exit
    /// is reported as [`JobOutcome::Abandoned`] when the session is back, and the
    /// coordinator places the job again without using a retry.
    pub fn fence_after_disconnect(self: &Arc<Self>, after: Duration) {
        let me = Arc::downgrade(self);
        info!(
            after_ms = after.as_millis() as u64,
            "running jobs stop when the coordinator is silent that long"
        );
        let file = self.work_root.with_file_name("coordinator-heard-ms");
        let _ = self.fence.set((after, file.clone()));
        let heard = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut written = 0;
            loop {
                let Some(me) = heard.upgrade() else { return };
                let t = me.last_heard_ms.load(std::sync::atomic::Ordering::Relaxed);
                drop(me);
                if t != written {
                    let f = file.clone();
                    let ok = tokio::task::spawn_blocking(move || {
                        crate::attempts::write_durably(&f, t.to_string().as_bytes())
                    })
                    .await;
                    if matches!(ok, Ok(Ok(()))) {
                        written = t;
                    }
                }
                tokio::time::sleep(FENCE_FILE_EVERY).await;
            }
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { return };
                let silent = now_ms()
                    .saturating_sub(me.last_heard_ms.load(std::sync::atomic::Ordering::Relaxed));
                if silent < after.as_millis() as u64 {
                    continue;
                }
                for (job, attempt) in me.running() {
                    let reason = format!("no word from the coordinator for {silent} ms");
                    let grace = Duration::from_millis(500);
                    if me.stop(&job, attempt, JobOutcome::Abandoned { reason }, grace) {
                        warn!(job_id = %job, attempt, silent_ms = silent, "no word from the coordinator: attempt stopped");
                    }
                }
            }
        });
    }

    /// Attach the data plane (once, when the first identity is known).
    pub fn set_data(&self, d: Arc<crate::data::DataPlane>, site: (Option<String>, Option<String>)) {
        let _ = self.data.set(d);
        let _ = self.site.set(site);
    }

    pub fn data(&self) -> Option<&Arc<crate::data::DataPlane>> {
        self.data.get()
    }

    pub fn container_runtime(&self) -> Option<String> {
        self.container_runtime.clone()
    }

    /// Refresh the bidding view from an inventory and a telemetry report, remembering
    /// the last fatal (XID / double-bit ECC) event per GPU.
    pub fn observe(
        &self,
        inv: &[fleetmesh_protocol::GpuInfo],
        report: &fleetmesh_protocol::TelemetryReport,
    ) {
        use fleetmesh_protocol::GpuEventKind;
        let Ok(mut s) = self.state.lock() else { return };
        let mut fatal: BTreeMap<String, u64> =
            s.0.gpus
                .iter()
                .filter_map(|g| g.last_fatal_event_ms.map(|t| (g.uuid.clone(), t)))
                .collect();
        for e in &report.events {
            if matches!(e.kind, GpuEventKind::Xid(_) | GpuEventKind::DoubleBitEcc) {
                fatal.insert(e.uuid.clone(), e.at_unix_ms);
            }
        }
        s.0.gpus = report
            .gpus
            .iter()
            .map(|g| {
                let info = inv.iter().find(|i| i.uuid == g.uuid);
                bidding::GpuState {
                    uuid: g.uuid.clone(),
                    name: info.map(|i| i.name.clone()).unwrap_or_default(),
                    memory_total_bytes: g
                        .memory_total_bytes
                        .or(info.map(|i| i.memory_total_bytes))
                        .unwrap_or(0),
                    memory_free_bytes: g.memory_free_bytes,
                    temperature_c: g.temperature_c,
                    ecc_uncorrected_volatile: g.ecc_uncorrected_volatile,
                    last_fatal_event_ms: fatal.get(&g.uuid).copied(),
                }
            })
            .collect();
    }

    /// The CPUs and memory jobs may use here (as the inventory reports them).
    pub fn set_capacity(&self, cpus: u32, memory_bytes: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.0.cpus = f64::from(cpus);
            s.0.memory_bytes = memory_bytes;
        }
    }

    /// Attempts currently running.
    pub fn running(&self) -> Vec<(String, u64)> {
        self.state.lock().map(|s| s.1.keys().cloned().collect()).unwrap_or_default()
    }

    /// Answer a call for bids.
    pub fn bid(&self, c: &CallForBids) -> AgentMessage {
        let call = bidding::CallForBids {
            auction: c.auction.clone(),
            gpus: c.gpus,
            gpu_model: c.gpu_model.clone(),
            gpu_memory_bytes: c.gpu_memory_bytes,
            cpus: c.cpus,
            memory_bytes: c.memory_bytes,
            needs_container: c.needs_container,
            expected_duration_ms: c.expected_duration_ms,
            lease_ms: c.lease_ms,
        };
        let r = match self.state.lock() {
            Ok(mut s) => {
                let now = now_ms();
                s.0.expire(now);
                let pool = self.job_uids.get();
                if let Some(pool) = pool.filter(|p| uids_left(p, &s.1, s.0.reservations.len()) == 0)
                {
                    return AgentMessage::Decline {
                        auction: c.auction.clone(),
                        reason: format!(
                            "all {} job uids are taken by running or awarded attempts",
                            pool.len()
                        ),
                    };
                }
                let offer = s.0.bid(&call, now);
                if c.dry_run {
                    // A plan asks what would be offered; nothing is held for it.
                    s.0.release(&c.auction);
                }
                offer
            }
            Err(_) => {
                return AgentMessage::Decline {
                    auction: c.auction.clone(),
                    reason: "agent state poisoned".into(),
                }
            }
        };
        match r {
            Ok(o) => {
                // Data already here is cheaper and sooner than data to fetch.
                let (local_bytes, eta, price) = match self.data() {
                    Some(d) if !c.inputs.is_empty() => {
                        let site = self.site.get().cloned().unwrap_or_default();
                        d.bid_terms(&c.inputs, (site.0.as_deref(), site.1.as_deref()))
                    }
                    _ => (0, 0, 0.0),
                };
                AgentMessage::Bid {
                    auction: c.auction.clone(),
                    gpus: o.gpus,
                    price: o.price + price,
                    eta_ms: o.eta_ms + eta,
                    local_bytes,
                    health: o.health,
                    load: o.load,
                }
            }
            Err(d) => AgentMessage::Decline { auction: c.auction.clone(), reason: d.to_string() },
        }
    }

    pub fn release(&self, auction: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.0.release(auction);
        }
    }

    /// Start an awarded attempt. Refused if the attempt (or a newer one of the job) is
    /// already running here, or if the awarded GPUs are not the reserved ones.
    pub fn start(self: &Arc<Self>, a: &Award) -> Result<(), AwardRefused> {
        let key = (a.job.clone(), a.attempt);
        {
            let mut s = self.state.lock().map_err(|_| AwardRefused::Poisoned)?;
            if s.1.keys().any(|(j, n)| *j == a.job && *n >= a.attempt) {
                return Err(AwardRefused::Stale { job: a.job.clone(), attempt: a.attempt });
            }
            s.0.take_for_award(&a.auction, &hold_of(a), now_ms())?;
            // Older attempts of the same job must not survive a newer award.
            let stale: Vec<(String, u64)> =
                s.1.keys().filter(|(j, _)| *j == a.job).cloned().collect();
            for k in stale {
                if let Some(mut r) = s.1.remove(&k) {
                    if let Some(tx) = r.stop.take() {
                        // An attempt that already ended needs no stop.
                        let _ = tx.send((JobOutcome::Cancelled, Duration::from_millis(0)));
                    }
                }
            }
            let uid = match self.job_uids.get() {
                Some(pool) => {
                    let taken: std::collections::HashSet<u32> =
                        s.1.values().filter_map(|r| r.uid).collect();
                    let free = pool.iter().copied().find(|u| !taken.contains(u));
                    Some(free.ok_or(AwardRefused::NoFreeUid(pool.len()))?)
                }
                None => None,
            };
            s.0.running.push((format!("{}/{}", a.job, a.attempt), hold_of(a)));
            let (tx, rx) = oneshot::channel();
            s.1.insert(key, RunningAttempt { gpus: a.gpus.clone(), stop: Some(tx), uid });
            let me = self.clone();
            let award = a.clone();
            tokio::spawn(async move { me.run_attempt(award, rx, uid).await });
        }
        Ok(())
    }

    /// Stop an attempt (SIGTERM, SIGKILL after `grace`). Unknown attempts are ignored.
    /// Whether this call asked it to stop (false: unknown, or already stopping).
    pub fn stop(&self, job: &str, attempt: u64, outcome: JobOutcome, grace: Duration) -> bool {
        if let Ok(mut s) = self.state.lock() {
            if let Some(r) = s.1.get_mut(&(job.to_string(), attempt)) {
                if let Some(tx) = r.stop.take() {
                    return tx.send((outcome, grace)).is_ok();
                }
            }
        }
        false
    }

    /// Queue every unacknowledged exit again (a new session starts).
    pub fn resend_unacked(&self) {
        let exits = self.unacked_exits.lock().map(|u| u.clone()).unwrap_or_default();
        for e in exits {
            self.outbox.push(e);
        }
    }

    /// The coordinator recorded this exit.
    pub fn exit_recorded(&self, job: &str, attempt: u64) {
        if let Some(t) = &self.table {
            t.forget_exit(job, attempt);
        }
        if let Ok(mut u) = self.unacked_exits.lock() {
            u.retain(|m| !matches!(m, AgentMessage::JobExited { job: j, attempt: n, .. } if j == job && *n == attempt));
        }
    }

    /// Stop every running attempt not in `keep` (coordinator reconciliation).
    pub fn keep_only(&self, keep: &[(String, u64)]) {
        for (job, attempt) in self.running() {
            if !keep.iter().any(|(j, n)| *j == job && *n == attempt) {
                warn!(job_id = %job, attempt, "coordinator does not know this attempt: stopping it");
                self.stop(&job, attempt, JobOutcome::Cancelled, Duration::from_secs(2));
            }
        }
    }

    fn finish(&self, job: &str, attempt: u64) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(r) = s.1.remove(&(job.to_string(), attempt)) {
                let tag = format!("{job}/{attempt}");
                s.0.running.retain(|(t, h)| !(*t == tag && h.gpus == r.gpus));
            }
        }
    }

    async fn run_attempt(
        self: Arc<Self>,
        a: Award,
        mut stop: oneshot::Receiver<(JobOutcome, Duration)>,
        uid: Option<u32>,
    ) {
        let started = Instant::now();
        let dir = self.work_root.join(sanitize(&a.job)).join(a.attempt.to_string());
        let outcome = self.run_inner(&a, &mut stop, uid).await;
        self.complete(&a, &dir, outcome, started.elapsed()).await;
    }

    /// An attempt ended: collect its outputs, forget it, and record its exit durably
    /// before it is sent (it is sent again on every new session until acknowledged).
    async fn complete(&self, a: &Award, dir: &Path, mut outcome: JobOutcome, took: Duration) {
        let mut outputs = Vec::new();
        if let Some(d) = self.data() {
            d.release_inputs(&format!("{}/{}", a.job, a.attempt));
            if outcome.succeeded() && !a.outputs.is_empty() {
                match d.collect(&a.outputs, dir).await {
                    Ok(o) => outputs = o,
                    Err(reason) => {
                        outcome = JobOutcome::OutputFailed { reason: reason.to_string() }
                    }
                }
            }
        }
        if self.job_user.get().is_some() {
            let d = dir.to_path_buf();
            if let Ok(Err(e)) =
                tokio::task::spawn_blocking(move || crate::sandbox::seal_attempt_dir(&d)).await
            {
                warn!(job_id = %a.job, attempt = a.attempt, error = %e, "attempt dir not handed back to the agent");
            }
        }
        info!(job_id = %a.job, attempt = a.attempt, %outcome, "attempt ended");
        self.finish(&a.job, a.attempt);
        let exit = AgentMessage::JobExited {
            job: a.job.clone(),
            attempt: a.attempt,
            outcome,
            duration_ms: took.as_millis() as u64,
            outputs,
        };
        if let Some(t) = self.table.clone().filter(|_| self.simulated_run.get().is_none()) {
            let e = exit.clone();
            match tokio::task::spawn_blocking(move || t.save_exit(&e)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(job_id = %a.job, attempt = a.attempt, error = %e, "exit not recorded on disk: it is lost if the agent dies before the coordinator has it")
                }
                Err(e) => warn!(job_id = %a.job, error = %e, "exit recording task failed"),
            }
        }
        if let Ok(mut u) = self.unacked_exits.lock() {
            u.push(exit.clone());
            // Bound what a long-disconnected agent remembers.
            let excess = u.len().saturating_sub(10_000);
            u.drain(..excess);
        }
        self.outbox.push(exit);
    }

    /// Re-adopt what a previous run of this agent left (call once, before the first
    /// session): exits not yet acknowledged are queued again; attempts whose supervisor
    /// still lives are watched again (their GPUs stay taken); attempts that ended while
    /// the agent was down are reported from their exit status; supervised process groups
    /// that no record vouches for are killed.
    pub fn recover(self: &Arc<Self>) {
        let Some(table) = &self.table else { return };
        let loaded = table.load();
        for (path, why) in &loaded.unreadable {
            warn!(path = %path.display(), why, "unreadable attempt-table entry ignored");
        }
        if let Ok(mut u) = self.unacked_exits.lock() {
            u.extend(loaded.exits.iter().cloned());
        }
        let mut vouched = std::collections::BTreeSet::new();
        for rec in loaded.attempts {
            vouched.insert(rec.dir.clone());
            match shim::lock_holder(&rec.dir) {
                Some(pid) => self.adopt(rec, pid),
                None => {
                    // The supervisor is gone; whatever is left of its group is not a job
                    // anyone will account for.
                    kill_leftover_group(rec.pid);
                    let outcome = match shim::read_exit(&rec.dir) {
                        Some(r) => exit_outcome(r),
                        None => JobOutcome::Abandoned {
                            reason: "the attempt's supervisor ended without an exit status while the agent was down".into(),
                        },
                    };
                    let took = Duration::from_millis(now_ms().saturating_sub(rec.started_unix_ms));
                    info!(job_id = %rec.award.job, attempt = rec.award.attempt, %outcome, "attempt ended while the agent was down");
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.complete(&rec.award, &rec.dir, outcome, took).await;
                    });
                }
            }
        }
        self.kill_unvouched(&vouched);
    }

    /// Supervised attempt dirs whose supervisor lives but which no record names: the
    /// agent died between starting it and recording it. Killed.
    fn kill_unvouched(&self, vouched: &std::collections::BTreeSet<PathBuf>) {
        let Ok(jobs) = std::fs::read_dir(&self.work_root) else { return };
        for job in jobs.flatten() {
            let Ok(attempts) = std::fs::read_dir(job.path()) else { continue };
            for at in attempts.flatten() {
                let dir = at.path();
                if vouched.contains(&dir) {
                    continue;
                }
                if let Some(pid) = shim::lock_holder(&dir) {
                    warn!(dir = %dir.display(), pid, "a supervised attempt no record vouches for: killing its process group");
                    shim::signal_group(pid, "KILL");
                }
            }
        }
    }

    /// Watch an attempt started by a previous run of the agent, as if started now.
    fn adopt(self: &Arc<Self>, rec: AttemptRecord, pid: u32) {
        let a = rec.award.clone();
        let key = (a.job.clone(), a.attempt);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut s) = self.state.lock() {
            s.0.running.push((format!("{}/{}", a.job, a.attempt), hold_of(&a)));
            s.1.insert(key, RunningAttempt { gpus: a.gpus.clone(), stop: Some(tx), uid: rec.uid });
        }
        info!(job_id = %a.job, attempt = a.attempt, pid, gpus = ?a.gpus, "attempt re-adopted after an agent restart");
        let me = self.clone();
        tokio::spawn(async move {
            let mut stop = rx;
            let elapsed = now_ms().saturating_sub(rec.started_unix_ms);
            let deadline =
                a.exec.timeout_ms.map(|t| Duration::from_millis(t.saturating_sub(elapsed)));
            let outcome = me
                .watch(
                    &a,
                    Supervised {
                        dir: &rec.dir,
                        pid,
                        container: rec.container.as_ref(),
                        child: None,
                        adopted: true,
                    },
                    &mut stop,
                    deadline,
                )
                .await;
            let took = Duration::from_millis(now_ms().saturating_sub(rec.started_unix_ms));
            me.complete(&a, &rec.dir, outcome, took).await;
        });
    }

    /// The agent is shutting down on purpose (it told the coordinator it is leaving, and
    /// the coordinator places its jobs elsewhere): stop every attempt and wait for them.
    pub async fn shutdown(&self) {
        let running = self.running();
        for (job, attempt) in &running {
            self.stop(job, *attempt, JobOutcome::Cancelled, SHUTDOWN_GRACE);
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE + Duration::from_secs(2);
        while !self.running().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIMULATED execution, for benchmarks that host many agents on one machine: every
    /// attempt is accepted, staged and reported like a real one, but instead of starting
    /// a process it completes with exit code 0 after `run`. Never used by the agent binary.
    pub fn simulate_execution(&self, run: Duration) {
        let _ = self.simulated_run.set(run);
    }

    async fn run_inner(
        &self,
        a: &Award,
        stop: &mut oneshot::Receiver<(JobOutcome, Duration)>,
        uid: Option<u32>,
    ) -> JobOutcome {
        let (dir, user) = match self.prepare_dir(a, uid) {
            Ok(d) => d,
            Err(outcome) => return outcome,
        };
        let user = user.as_ref();
        let mut env = attempt_env(a, &dir);
        if !a.inputs.is_empty() || !a.outputs.is_empty() {
            if let Err(outcome) = self.stage(a, &dir, user, stop).await {
                return outcome;
            }
            env.push(("FLEETMESH_INPUTS".into(), dir.join("inputs").display().to_string()));
            env.push(("FLEETMESH_OUTPUTS".into(), dir.join("outputs").display().to_string()));
        }
        let (argv, container) = match self.command_line(a, &dir, user, &env) {
            Ok(c) => c,
            Err(reason) => return JobOutcome::FailedToStart { reason: reason.to_string() },
        };
        if let Some(run) = self.simulated_run.get() {
            info!(job_id = %a.job, attempt = a.attempt, "attempt started (simulated: no process)");
            self.outbox.push(AgentMessage::JobStarted {
                job: a.job.clone(),
                attempt: a.attempt,
                pid: 0,
            });
            return tokio::select! {
                _ = tokio::time::sleep(*run) => JobOutcome::Exited { code: 0 },
                req = stop => req.map(|(o, _)| o).unwrap_or(JobOutcome::Cancelled),
            };
        }
        // Host jobs run as the job user; an image job's runtime client as the agent.
        let run_as = user.filter(|_| container.is_none());
        if let Some(u) = run_as {
            env.push(("HOME".into(), dir.display().to_string()));
            env.push(("USER".into(), u.name.clone()));
            env.push(("LOGNAME".into(), u.name.clone()));
        }
        let unit =
            (self.launcher() == JobLauncher::SystemdRun).then(|| unit_name(&a.job, a.attempt));
        let (pid, child) = match self.launch(&dir, &argv, &env, run_as, unit.as_deref()).await {
            Ok(p) => p,
            Err(reason) => return JobOutcome::FailedToStart { reason: reason.to_string() },
        };
        self.record_attempt(a, &dir, pid, &container, &unit, uid).await;
        info!(job_id = %a.job, attempt = a.attempt, pid, gpus = ?a.gpus, "attempt started");
        self.outbox.push(AgentMessage::JobStarted { job: a.job.clone(), attempt: a.attempt, pid });
        let timeout = a.exec.timeout_ms.map(Duration::from_millis);
        let s = Supervised { dir: &dir, pid, container: container.as_ref(), child, adopted: false };
        self.watch(a, s, stop, timeout).await
    }

    /// The attempt's work dir, made and (with a job user) handed to the user this attempt
    /// runs as (its own uid when attempts get one each).
    fn prepare_dir(
        &self,
        a: &Award,
        uid: Option<u32>,
    ) -> Result<(PathBuf, Option<crate::sandbox::JobUser>), JobOutcome> {
        let dir = self.work_root.join(sanitize(&a.job)).join(a.attempt.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| JobOutcome::FailedToStart {
            reason: format!("work dir {}: {e}", dir.display()),
        })?;
        let user = self
            .job_user
            .get()
            .map(|u| crate::sandbox::JobUser { uid: uid.unwrap_or(u.uid), ..u.clone() });
        if let Some(u) = &user {
            crate::sandbox::give_attempt_dir(&dir, u).map_err(|e| JobOutcome::FailedToStart {
                reason: format!("work dir {} for job user {}: {e}", dir.display(), u.name),
            })?;
        }
        Ok((dir, user))
    }

    /// Fetch the inputs into the work dir (unless stopped meanwhile) and make the
    /// output dirs, the job user's.
    async fn stage(
        &self,
        a: &Award,
        dir: &Path,
        user: Option<&crate::sandbox::JobUser>,
        stop: &mut oneshot::Receiver<(JobOutcome, Duration)>,
    ) -> Result<(), JobOutcome> {
        let Some(d) = self.data() else {
            return Err(JobOutcome::FailedToStart {
                reason: "this agent has no data plane".into(),
            });
        };
        let key = format!("{}/{}", a.job, a.attempt);
        let staging = tokio::select! {
            r = d.stage(&a.inputs, dir, &a.job, &key) => r,
            req = &mut *stop => {
                let (outcome, _) = req.unwrap_or((JobOutcome::Cancelled, Duration::ZERO));
                return Err(outcome);
            }
        };
        staging.map_err(|reason| JobOutcome::StagingFailed { reason: reason.to_string() })?;
        for o in &a.outputs {
            let p = dir.join("outputs").join(o.output.as_str());
            let made = std::fs::create_dir_all(&p).and_then(|()| match user {
                Some(u) => crate::sandbox::give(&p, u)
                    .and_then(|()| crate::sandbox::give(&dir.join("outputs"), u)),
                None => Ok(()),
            });
            made.map_err(|e| JobOutcome::FailedToStart {
                reason: format!("{}: {e}", p.display()),
            })?;
        }
        Ok(())
    }

    /// What the supervisor runs, and the container (runtime, name) for an image job.
    /// Image jobs run in a named container, so a stop reaches the container itself:
    /// signalling the runtime's client is not enough (podman's container lives on under
    /// conmon after its client is killed; a PID 1 ignores SIGTERM).
    #[allow(clippy::type_complexity)]
    fn command_line(
        &self,
        a: &Award,
        dir: &Path,
        user: Option<&crate::sandbox::JobUser>,
        env: &[(String, String)],
    ) -> Result<(Vec<String>, Option<(String, String)>), LaunchError> {
        let argv = match (&a.exec.image, &self.container_runtime) {
            (None, _) => (a.exec.argv.clone(), None),
            (Some(_), None) => return Err(LaunchError::NoRuntime),
            (Some(image), Some(rt)) => {
                // Checked at submission too; here because the image must never be read
                // by the runtime as one of its options.
                fleetmesh_protocol::workflow::validate_image_reference(image)
                    .map_err(LaunchError::Image)?;
                let name = format!("fleetmesh-{}-{}", sanitize(&a.job), a.attempt);
                let mut v = vec![rt.clone(), "run".into(), "--rm".into(), "-v".into()];
                v.push(format!("{}:/work", dir.display()));
                v.extend(["-w".into(), "/work".into(), "--name".into(), name.clone()]);
                if let Some(u) = user {
                    // The runtime client runs as the agent; the container as the job user.
                    v.extend(["--user".into(), format!("{}:{}", u.uid, u.gid)]);
                }
                for (k, val) in env {
                    v.extend(["-e".into(), format!("{k}={val}")]);
                }
                v.extend(["-e".into(), format!("NVIDIA_VISIBLE_DEVICES={}", a.gpus.join(","))]);
                v.push(image.clone());
                v.extend(a.exec.argv.iter().cloned());
                (v, Some((rt.clone(), name)))
            }
        };
        if argv.0.is_empty() {
            return Err(LaunchError::EmptyCommand);
        }
        Ok(argv)
    }

    /// Start the attempt's supervisor, directly or in its own systemd unit; its pid (the
    /// process group) and, when started directly, the child.
    async fn launch(
        &self,
        dir: &Path,
        argv: &[String],
        env: &[(String, String)],
        run_as: Option<&crate::sandbox::JobUser>,
        unit: Option<&str>,
    ) -> Result<(u32, Option<tokio::process::Child>), LaunchError> {
        let shim_program = self.shim_program.as_ref().ok_or(LaunchError::NoSupervisor)?;
        let mut shim_args: Vec<std::ffi::OsString> =
            vec![shim::SHIM_ARG.into(), dir.to_path_buf().into()];
        if let Some((after, file)) = self.fence.get() {
            shim_args.extend([
                "--fence-after".into(),
                after.as_millis().to_string().into(),
                file.clone().into(),
            ]);
        }
        if let Some(unit) = unit {
            let pid = launch_unit(unit, shim_program, shim_args, argv, env, dir, run_as).await?;
            return Ok((pid, None));
        }
        shim_args.push("--".into());
        shim_args.extend(argv.iter().map(Into::into));
        let mut cmd = tokio::process::Command::new(shim_program);
        cmd.args(&shim_args)
            .current_dir(dir)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // The supervisor leads the attempt's process group, outliving the agent.
            .process_group(0)
            .kill_on_drop(false);
        if let Some(u) = run_as {
            // std drops the supplementary groups when it switches uid.
            cmd.uid(u.uid).gid(u.gid);
        }
        let c =
            cmd.spawn().map_err(|source| LaunchError::Io { path: shim_program.clone(), source })?;
        Ok((c.id().unwrap_or(0), Some(c)))
    }

    /// Write the running attempt to the durable table (a restarted agent re-adopts it).
    async fn record_attempt(
        &self,
        a: &Award,
        dir: &Path,
        pid: u32,
        container: &Option<(String, String)>,
        unit: &Option<String>,
        uid: Option<u32>,
    ) {
        let Some(t) = self.table.clone() else { return };
        let rec = AttemptRecord {
            award: a.clone(),
            dir: dir.to_path_buf(),
            pid,
            proc_start_ticks: crate::attempts::proc_start_ticks(pid),
            started_unix_ms: now_ms(),
            container: container.clone(),
            unit: unit.clone(),
            uid,
        };
        match tokio::task::spawn_blocking(move || t.save_attempt(&rec)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(job_id = %a.job, attempt = a.attempt, error = %e, "attempt not recorded on disk: it will not survive an agent restart")
            }
            Err(e) => warn!(job_id = %a.job, error = %e, "attempt recording task failed"),
        }
    }

    /// Stream an attempt's logs until it ends, and stop it when asked or at its timeout.
    /// `child` is the supervisor when this agent started it; an adopted attempt (no
    /// child) is known to have ended when its supervisor releases its lock. The outcome
    /// is the job's own status as the supervisor recorded it.
    async fn watch(
        &self,
        a: &Award,
        s: Supervised<'_>,
        stop: &mut oneshot::Receiver<(JobOutcome, Duration)>,
        timeout: Option<Duration>,
    ) -> JobOutcome {
        let Supervised { dir, pid, container, mut child, adopted } = s;
        let mut logs = LogTail::new(dir, adopted);
        let deadline = tokio::time::Instant::now() + timeout.unwrap_or(Duration::MAX / 4);
        let mut tick = tokio::time::interval(ATTEMPT_POLL);
        let outcome = loop {
            tokio::select! {
                st = wait_child(&mut child) => {
                    break match (shim::read_exit(dir), st) {
                        (Some(r), _) => exit_outcome(r),
                        (None, Ok(s)) => status_outcome(s),
                        (None, Err(e)) => JobOutcome::FailedToStart { reason: e.to_string() },
                    };
                }
                _ = tick.tick() => {
                    logs.stream(&a.job, a.attempt, &self.outbox);
                    if child.is_none() && shim::lock_holder(dir).is_none() {
                        break shim::read_exit(dir).map(exit_outcome).unwrap_or_else(|| {
                            JobOutcome::Abandoned { reason: "the attempt's supervisor ended without an exit status".into() }
                        });
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    terminate(&mut child, dir, pid, container, Duration::from_secs(5), self.launcher()).await;
                    break JobOutcome::TimedOut;
                }
                req = &mut *stop => {
                    let (outcome, grace) = req.unwrap_or((JobOutcome::Cancelled, Duration::from_secs(5)));
                    terminate(&mut child, dir, pid, container, grace, self.launcher()).await;
                    break outcome;
                }
            }
        };
        // Everything the attempt wrote, not just one more read's worth.
        while logs.stream(&a.job, a.attempt, &self.outbox) {}
        outcome
    }
}

/// Wait for the supervisor if this agent started it; never resolves otherwise.
async fn wait_child(
    child: &mut Option<tokio::process::Child>,
) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

/// The outcome a supervisor recorded.
fn exit_outcome(r: ExitRecord) -> JobOutcome {
    match r {
        ExitRecord::Exited { code } => JobOutcome::Exited { code },
        ExitRecord::Signaled { signal } => JobOutcome::Signaled { signal },
        ExitRecord::FailedToStart { reason } => JobOutcome::FailedToStart { reason },
        ExitRecord::Fenced { silent_ms } => JobOutcome::Abandoned {
            reason: format!("no word from the coordinator for {silent_ms} ms (stopped by the attempt's supervisor)"),
        },
    }
}

/// Kill what is left of process group `pgid` after its supervisor is gone (a group
/// whose leader died keeps its id while any member lives, so this reaches only it).
fn kill_leftover_group(pgid: u32) {
    if pgid != 0 && !crate::attempts::group_members(pgid).is_empty() {
        warn!(pgid, "processes of an attempt outlived its supervisor: killing them");
        shim::signal_group(pgid, "KILL");
    }
}

/// Reads what the supervisor appended to an attempt's logs since the last look.
struct LogTail {
    streams: [(u8, PathBuf, u64); 2],
}

impl LogTail {
    /// `from_end`: an adopted attempt streams from what is there now (what it printed
    /// while the agent was down stays in the files).
    fn new(dir: &Path, from_end: bool) -> Self {
        let at = |f: &str| {
            let p = dir.join(f);
            let len =
                if from_end { std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) } else { 0 };
            (p, len)
        };
        let (out, out_at) = at("stdout.log");
        let (err, err_at) = at("stderr.log");
        Self { streams: [(1, out, out_at), (2, err, err_at)] }
    }

    /// Send what was appended since the last call (at most [`LOG_READ_MAX`] per
    /// stream); whether anything was.
    fn stream(&mut self, job: &str, attempt: u64, outbox: &Outbox) -> bool {
        use std::io::{Read, Seek};
        let mut any = false;
        for (stream, path, offset) in &mut self.streams {
            let Ok(mut f) = std::fs::File::open(&*path) else { continue };
            if f.seek(std::io::SeekFrom::Start(*offset)).is_err() {
                continue;
            }
            let mut buf = Vec::new();
            let Ok(n) = f.take(LOG_READ_MAX as u64).read_to_end(&mut buf) else { continue };
            if n > 0 {
                any = true;
                *offset += n as u64;
                outbox.push(AgentMessage::JobOutput {
                    job: job.to_string(),
                    attempt,
                    stream: *stream,
                    data: buf,
                });
            }
        }
        any
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect()
}

fn status_outcome(s: std::process::ExitStatus) -> JobOutcome {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(code), _) => JobOutcome::Exited { code },
        (None, Some(signal)) => JobOutcome::Signaled { signal },
        (None, None) => JobOutcome::Exited { code: -1 },
    }
}

/// Stop an attempt: SIGTERM to its process group, SIGKILL after `grace`. For an image
/// job, `container` is (runtime, container name): the runtime is asked to stop the
/// container with the same grace, and to remove it whatever happened.
async fn terminate(
    child: &mut Option<tokio::process::Child>,
    dir: &Path,
    pid: u32,
    container: Option<&(String, String)>,
    grace: Duration,
    launcher: JobLauncher,
) {
    if pid != 0 {
        shim::signal_group(pid, "TERM");
    }
    if let Some((rt, name)) = container {
        let secs = grace.as_secs().to_string();
        runtime_cmd(rt, &["stop", "-t", &secs, name], grace + Duration::from_secs(20), launcher)
            .await;
    }
    let ended = async {
        match child {
            Some(c) => {
                let _ = c.wait().await;
            }
            None => {
                while shim::lock_holder(dir).is_some() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
    if tokio::time::timeout(grace, ended).await.is_err() && pid != 0 {
        shim::signal_group(pid, "KILL");
        if let Some(c) = child {
            let _ = c.wait().await;
        }
    }
    if let Some((rt, name)) = container {
        runtime_cmd(rt, &["rm", "-f", name], Duration::from_secs(20), launcher).await;
    }
}

/// Run a container runtime command; failures are logged (the container may be gone).
async fn runtime_cmd(rt: &str, args: &[&str], limit: Duration, launcher: JobLauncher) {
    let (prog, prefix) = launcher.outside(rt);
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(prefix)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(limit, cmd.status()).await {
        Ok(Ok(st)) if st.success() => {}
        Ok(Ok(st)) => info!(runtime = rt, ?args, %st, "container runtime command failed"),
        Ok(Err(e)) => warn!(runtime = rt, ?args, error = %e, "container runtime did not start"),
        Err(_) => warn!(runtime = rt, ?args, "container runtime command timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_uid_pool_leaves_nothing_to_bid_with() {
        let attempt = |uid| RunningAttempt { gpus: vec![], stop: None, uid };
        let mut running = BTreeMap::new();
        assert_eq!(uids_left(&[7, 8], &running, 0), 2);
        running.insert(("a".to_string(), 1), attempt(Some(7)));
        running.insert(("b".to_string(), 1), attempt(None));
        assert_eq!(uids_left(&[7, 8], &running, 0), 1);
        assert_eq!(uids_left(&[7, 8], &running, 1), 0, "a pending bid holds the last uid");
        assert_eq!(uids_left(&[7, 8], &running, 5), 0);
    }
}
