//! Benchmark programs. Each prints one JSON line with its figures, plus a baseline measured
//! in the same run and the ratio against it.
//!
//! `fleetmesh-bench telemetry --agents N --gpus-per-agent 8 --seconds S`
//!   N agents in this process, each with its own certificate and its own QUIC connection
//!   (own UDP socket), stream simulated telemetry to a real `fleetmesh-coordinator`
//!   process. Reports how many reports were applied by the Fleet actor, the
//!   sample-to-apply latency, the coordinator's CPU and RSS, and the footprint of one real
//!   `fleetmesh-agent` process at 1 Hz. Baseline: the same reports cast straight into an
//!   in-process Fleet actor (no network, no TLS, no codec).
//!
//! `fleetmesh-bench transfer --size 1GiB --sources K`
//!   A dataset of SIZE random bytes held by K holders (each its own certificate, chunk
//!   store and xfer endpoint on loopback) is fetched by another peer with the real
//!   multi-source fetcher: tickets checked, every chunk hashed and stored durably.
//!   Baselines in the same run: one plain quinn stream with the same mutual TLS moving
//!   the same number of bytes from memory to nowhere, and a plain TCP socket.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "bench/burst.rs"]
mod burst;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fleetmesh_agent::gpu::simulated::SimulatedBackend;
use fleetmesh_agent::sampler::{NodeSampler, Sampler};
use fleetmesh_agent::session::{run_forever, AgentStats, ConnectOptions};
use fleetmesh_api::jobs::{JobRecord, JobState, WorkflowState, WorkflowSummary};
use fleetmesh_coordinator::fleet::views::IngestStats;
use fleetmesh_coordinator::fleet::{Fleet, FleetArgs, FleetConfig, FleetMsg};
use fleetmesh_coordinator::net::agent_link::ToSession;
use fleetmesh_coordinator::persist::store::Store;
use fleetmesh_integration::{AgentProc, CoordinatorProc, Pki};
use fleetmesh_protocol::pki::IssueRequest;
use fleetmesh_protocol::tls::TlsIdentity;
use fleetmesh_protocol::{Attributes, HostInfo, HostSample, PeerKind};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::json;
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "fleetmesh-bench", about = "Fleetmesh benchmark programs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Placement: N bidding agents over real QUIC, M one-GPU jobs, and failover.
    Placement {
        #[arg(long, default_value_t = 100)]
        agents: usize,
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        #[arg(long, default_value_t = 8)]
        gpus_per_agent: u32,
        /// Failover measurements (real agent processes killed with SIGKILL).
        #[arg(long, default_value_t = 5)]
        failovers: usize,
        /// Offer the jobs at this many per second (one workflow per 100 ms) instead of
        /// all at once: award latency below saturation rather than burst queueing.
        #[arg(long)]
        rate: Option<u32>,
        /// Processes the simulated agents are spread over (0: all inside the bench
        /// process). A real node runs one agent with a handful of file descriptors;
        /// one process holding 1,000 agents' sockets makes every job's fork/exec copy
        /// and close that whole descriptor table, which is the bench host's cost, not
        /// the coordinator's.
        #[arg(long, default_value_t = 8)]
        agent_procs: usize,
        /// How the agents run the jobs they win: `process` starts `true` as a real
        /// process; `simulated` completes the attempt after 1 ms without a process (the
        /// coordinator's side is identical; it takes the cost of 1,000 nodes' process
        /// starts off this one machine). Printed in the result as `job_exec`.
        #[arg(long, value_enum, default_value_t = JobExec::Process)]
        exec: JobExec,
        /// Then place the same number of jobs again as one array job (`parallel: N`) on
        /// the same agents, and print both figures with their ratio.
        #[arg(long)]
        array: bool,
    },
    /// Elastic capacity from zero: one `local` pool, no node, one array of N one-GPU jobs.
    Burst {
        #[arg(long, default_value_t = 500)]
        jobs: u32,
        #[arg(long, default_value_t = 8)]
        gpus_per_node: u32,
        /// How long each job runs.
        #[arg(long, default_value_t = 1.0)]
        job_seconds: f64,
    },
    /// Internal: host a shard of the placement bench's simulated agents (one process
    /// of `placement --agent-procs`). Prints `ready` once all are connected and runs
    /// until its stdin closes.
    #[command(hide = true)]
    Bidders {
        #[arg(long)]
        ca_dir: std::path::PathBuf,
        #[arg(long)]
        coordinator: std::net::SocketAddr,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        gpus_per_agent: u32,
        #[arg(long)]
        work: std::path::PathBuf,
        #[arg(long, value_enum)]
        exec: JobExec,
    },
    /// Data plane: an agent-to-agent fetch against raw QUIC and TCP baselines.
    Transfer {
        /// Dataset size, e.g. 1GiB.
        #[arg(long, default_value = "1GiB")]
        size: String,
        /// Holders the fetch pulls from at once.
        #[arg(long, default_value_t = 1)]
        sources: usize,
        /// Chunk size, e.g. 4MiB.
        #[arg(long, default_value = "4MiB")]
        chunk_size: String,
        /// Directory for the chunk stores [default: a temp dir].
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Telemetry ingest: N agents over real QUIC against a real coordinator.
    Telemetry {
        #[arg(long, default_value_t = 100)]
        agents: usize,
        #[arg(long, default_value_t = 8)]
        gpus_per_agent: u32,
        /// Measurement window (after all agents connected and a warm-up).
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// New connections per second while ramping up.
        #[arg(long, default_value_t = 400)]
        connect_rate: u32,
        /// Skip the in-memory baseline.
        #[arg(long)]
        no_baseline: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum JobExec {
    Process,
    Simulated,
}

/// USER_HZ is 100 on every Linux ABI we run on.
const CLK_TCK: f64 = 100.0;

fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after ")" start at field 3 (state); utime=14, stime=15 → indexes 11, 12.
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / CLK_TCK)
}

fn rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 =
        s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn host() -> (HostInfo, HostSample) {
    (
        HostInfo {
            hostname: "bench".into(),
            os: "bench".into(),
            kernel: "bench".into(),
            agent_version: fleetmesh_protocol::SOFTWARE_VERSION.into(),
            cpu_count: 64,
            memory_total_bytes: 512 << 30,
        },
        HostSample {
            cpu_utilization_percent: 12.5,
            load_1: 1.0,
            load_5: 1.0,
            load_15: 1.0,
            memory_total_bytes: 512 << 30,
            memory_used_bytes: 100 << 30,
            data_disk_total_bytes: Some(2 << 40),
            data_disk_available_bytes: Some(1 << 40),
            net_rx_bytes_per_s: 1 << 20,
            net_tx_bytes_per_s: 1 << 20,
            uptime_s: 1000,
        },
    )
}

fn sampler(name: &str, gpus: u32) -> Result<NodeSampler> {
    let (info, sample) = host();
    let gpu = SimulatedBackend::new(&format!("{gpus}xH100-80GB"), name)?;
    Ok(NodeSampler::with_fixed_host(Box::new(gpu), info, sample))
}

/// Connect options for an in-process agent with a fresh certificate of its own.
fn agent_options(
    ca: &fleetmesh_protocol::pki::Ca,
    ca_pem: &[u8],
    name: &str,
    coordinator: std::net::SocketAddr,
) -> Result<ConnectOptions> {
    let issued = ca.issue(&IssueRequest::new(PeerKind::Agent, name, Duration::from_secs(3600)))?;
    let p = std::path::Path::new("memory");
    let tls = TlsIdentity::from_pem(
        p,
        ca_pem,
        p,
        issued.cert_pem.as_bytes(),
        p,
        issued.key_pem.as_bytes(),
    )?;
    Ok(ConnectOptions::new(coordinator.to_string(), tls))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn telemetry(
    agents: usize,
    gpus: u32,
    seconds: u64,
    connect_rate: u32,
    no_baseline: bool,
) -> Result<()> {
    let pki = Pki::new("bench.local")?;
    let work = tempfile::tempdir()?;
    let coord =
        CoordinatorProc::start(&pki, &work.path().join("coord"), &["--history", "30"]).await?;
    let cpid = coord.pid().context("coordinator pid")?;
    let client = coord.client(&pki)?;
    eprintln!("coordinator up (pid {cpid}); issuing {agents} certificates");

    let ca_pem = std::fs::read(pki.ca_pem())?;
    let stats = Arc::new(AgentStats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let ramp = Instant::now();
    let mut tasks = Vec::with_capacity(agents);
    for i in 0..agents {
        let name = format!("bench-{i:05}");
        let opts = agent_options(&pki.ca, &ca_pem, &name, coord.control)?;
        let mut s = sampler(&name, gpus)?;
        let stats = stats.clone();
        let rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move { run_forever(opts, &mut s, stats, rx).await }));
        if connect_rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(1.0 / f64::from(connect_rate))).await;
        }
    }
    if let Err(e) = wait_connected(&stats, agents).await {
        let tail = coord.log_text().lines().rev().take(20).collect::<Vec<_>>().join("\n");
        bail!("{e}; coordinator log tail:\n{tail}");
    }
    let connect_s = ramp.elapsed().as_secs_f64();
    eprintln!("{agents} agents connected in {connect_s:.1} s; starting a real agent process for its footprint");

    pki.issue(PeerKind::Agent, "footprint", Attributes::default())?;
    let probe_agent = AgentProc::start(
        &pki,
        coord.control,
        "footprint",
        Attributes::default(),
        Some(&format!("{gpus}xH100-80GB")),
        work.path(),
    )?;
    let apid = probe_agent.pid().context("agent pid")?;
    tokio::time::sleep(Duration::from_secs(3)).await; // warm-up

    let t0 = unix_ms();
    let w0 = Instant::now();
    let sent0 = stats.reports_sent.load(Ordering::Relaxed);
    let failures0 = stats.connect_failures.load(Ordering::Relaxed);
    let applied0 = client.get_json::<IngestStats>("/api/v1/stats/ingest").await?.reports_applied;
    let ccpu0 = cpu_seconds(cpid).unwrap_or(0.0);
    let acpu0 = cpu_seconds(apid).unwrap_or(0.0);
    let bcpu0 = cpu_seconds(std::process::id()).unwrap_or(0.0);
    eprintln!("measuring for {seconds} s");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let sent1 = stats.reports_sent.load(Ordering::Relaxed);
    let wall = w0.elapsed().as_secs_f64();
    let ccpu1 = cpu_seconds(cpid).unwrap_or(0.0);
    let acpu1 = cpu_seconds(apid).unwrap_or(0.0);
    let bcpu1 = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let crss = rss_mb(cpid).unwrap_or(0.0);
    let arss = rss_mb(apid).unwrap_or(0.0);
    let failures = stats.connect_failures.load(Ordering::Relaxed) - failures0;
    // Stop sending, let in-flight reports land, then read what was applied. The footprint
    // agent's own reports (1/s) are included in `applied` but not in `sent`: subtract them.
    let _ = stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ingest =
        client.get_json::<IngestStats>(&format!("/api/v1/stats/ingest?since_unix_ms={t0}")).await?;
    let footprint_reports = (wall.floor() as u64).saturating_add(1);
    let applied = ingest.reports_applied.saturating_sub(applied0).saturating_sub(footprint_reports);
    let sent = sent1 - sent0;
    for t in tasks {
        t.abort();
    }
    drop(probe_agent);
    drop(coord);

    let mut out = json!({
        "bench": "telemetry",
        "agents": agents,
        "gpus_per_agent": gpus,
        "seconds": seconds,
        "connect_all_s": (connect_s * 10.0).round() / 10.0,
        "reports_sent": sent,
        "reports_applied": applied,
        "applied_ratio": if sent > 0 { ((applied as f64 / sent as f64).min(1.0) * 10000.0).round() / 10000.0 } else { 0.0 },
        "session_failures": failures,
        "ingest_p50_ms": ingest.ingest_p50_ms,
        "ingest_p99_ms": ingest.ingest_p99_ms,
        "ingest_max_ms": ingest.ingest_max_ms,
        "coordinator_cpu_cores": ((ccpu1 - ccpu0) / wall * 100.0).round() / 100.0,
        "coordinator_rss_mb": crss.round(),
        "bench_process_cpu_cores": ((bcpu1 - bcpu0) / wall * 100.0).round() / 100.0,
        "agent_process_cpu_percent": ((acpu1 - acpu0) / wall * 1000.0).round() / 10.0,
        "agent_process_rss_mb": (arss * 10.0).round() / 10.0,
    });
    eprintln!("{out}");
    if !no_baseline {
        let base = inmemory_baseline(agents, gpus, seconds.min(10)).await?;
        out["baseline_inmemory_p50_ms"] = json!(base.ingest_p50_ms);
        out["baseline_inmemory_p99_ms"] = json!(base.ingest_p99_ms);
        out["p99_ratio_vs_inmemory"] = json!(if base.ingest_p99_ms > 0.0 {
            (ingest.ingest_p99_ms / base.ingest_p99_ms * 100.0).round() / 100.0
        } else {
            f64::NAN
        });
    }
    println!("{out}");
    Ok(())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Wait (up to 2 minutes) until `n` agent sessions are established.
async fn wait_connected(stats: &AgentStats, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while stats.sessions_established.load(Ordering::Relaxed) < n as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} agents connected",
                stats.sessions_established.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

/// Start `count` simulated bidding agents named `bidder-{first..}`, each with its own
/// certificate, QUIC connection and work dir, running the jobs they win as real processes.
#[allow(clippy::too_many_arguments)]
async fn start_bidders(
    ca: &fleetmesh_protocol::pki::Ca,
    ca_pem: &[u8],
    coordinator: std::net::SocketAddr,
    first: usize,
    count: usize,
    gpus: u32,
    work: &std::path::Path,
    stats: &Arc<AgentStats>,
    stop_rx: &watch::Receiver<bool>,
    exec: JobExec,
) -> Result<Vec<tokio::task::JoinHandle<fleetmesh_agent::session::RunEnd>>> {
    let mut tasks = Vec::new();
    for i in first..first + count {
        let name = format!("bidder-{i:05}");
        let mut opts = agent_options(ca, ca_pem, &name, coordinator)?;
        // Prices spread so the auction has something to choose.
        let jobs = fleetmesh_agent::jobs::Jobs::new(
            &work.join(&name),
            1.0 + (i % 7) as f64 * 0.25,
            false,
            None,
        );
        if exec == JobExec::Simulated {
            jobs.simulate_execution(Duration::from_millis(1));
        }
        opts.jobs = Some(jobs);
        let mut s = sampler(&name, gpus)?;
        s.offer.price_per_hour = 1.0 + (i % 7) as f64 * 0.25;
        let stats = stats.clone();
        let rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move { run_forever(opts, &mut s, stats, rx).await }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(tasks)
}

/// One shard of the placement bench's agents in its own process.
async fn bidders(
    ca_dir: &std::path::Path,
    coordinator: std::net::SocketAddr,
    first: usize,
    count: usize,
    gpus: u32,
    work: &std::path::Path,
    exec: JobExec,
) -> Result<()> {
    let ca = fleetmesh_protocol::pki::Ca::load_dir(ca_dir)?;
    let ca_pem = std::fs::read(ca_dir.join("ca.pem"))?;
    let stats = Arc::new(AgentStats::default());
    let (_stop_tx, stop_rx) = watch::channel(false);
    let _tasks =
        start_bidders(&ca, &ca_pem, coordinator, first, count, gpus, work, &stats, &stop_rx, exec)
            .await?;
    wait_connected(&stats, count).await?;
    println!("ready");
    // Run until the bench closes our stdin (or dies).
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
    })
    .await;
    Ok(())
}

/// What the placement bench places: agents, jobs, GPUs per agent, the offered rate,
/// and whether an array round follows.
struct PlacementShape {
    agents: usize,
    jobs: usize,
    gpus: u32,
    rate: Option<u32>,
    array: bool,
}

async fn placement(
    shape: PlacementShape,
    failovers: usize,
    agent_procs: usize,
    exec: JobExec,
) -> Result<()> {
    let PlacementShape { agents, jobs, gpus, rate, array } = shape;
    let pki = Pki::new("bench.local")?;
    let work = tempfile::tempdir()?;
    let coord =
        CoordinatorProc::start(&pki, &work.path().join("coord"), &["--history", "5"]).await?;
    let client = coord.client(&pki)?;
    let ca_pem = std::fs::read(pki.ca_pem())?;
    // The simulated agents' work dirs (a dir and two log files per attempt, ~40,000 files
    // at M = 10,000) go to tmpfs when there is one: on one machine's ext4 the inode
    // allocation for them cost more CPU than the coordinator did. On a real fleet each
    // node creates only its own. The coordinator's store stays on disk.
    let shm = std::path::Path::new("/dev/shm");
    let agent_work = if shm.is_dir() { tempfile::tempdir_in(shm)? } else { tempfile::tempdir()? };
    eprintln!("agent work dirs under {}", agent_work.path().display());
    let stats = Arc::new(AgentStats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut shards = Vec::new();
    eprintln!(
        "starting {agents} bidding agents with {gpus} simulated GPUs each in {} process(es)",
        agent_procs.max(1)
    );
    if agent_procs == 0 {
        tasks = start_bidders(
            &pki.ca,
            &ca_pem,
            coord.control,
            0,
            agents,
            gpus,
            agent_work.path(),
            &stats,
            &stop_rx,
            exec,
        )
        .await?;
        wait_connected(&stats, agents).await?;
    } else {
        let per = agents.div_ceil(agent_procs);
        let mut first = 0;
        while first < agents {
            let count = per.min(agents - first);
            let mut child = tokio::process::Command::new(std::env::current_exe()?)
                .arg("bidders")
                .arg("--ca-dir")
                .arg(pki.path())
                .arg("--coordinator")
                .arg(coord.control.to_string())
                .arg("--first")
                .arg(first.to_string())
                .arg("--count")
                .arg(count.to_string())
                .arg("--gpus-per-agent")
                .arg(gpus.to_string())
                .arg("--work")
                .arg(agent_work.path())
                .arg("--exec")
                .arg(if exec == JobExec::Simulated { "simulated" } else { "process" })
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let out = child.stdout.take().context("bidders stdout")?;
            shards.push((child, tokio::io::BufReader::new(out)));
            first += count;
        }
        for (child, out) in &mut shards {
            use tokio::io::AsyncBufReadExt;
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(120), out.read_line(&mut line));
            if !matches!(read.await, Ok(Ok(n)) if n > 0) || line.trim() != "ready" {
                bail!("a bidders process (pid {:?}) did not get its agents connected", child.id());
            }
        }
    }
    // Let every agent send inventory and a first telemetry sample (GPU view for bidding).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // All jobs in one workflow, or (with --rate) one workflow of rate/10 jobs every 100 ms.
    let batch = rate.map(|r| (r as usize / 10).max(1)).unwrap_or(jobs);
    let workflow = |first: usize, n: usize| {
        let mut yaml = String::from("name: bench\nobjective: cheapest\njobs:\n");
        for i in first..first + n {
            yaml.push_str(&format!(
                "  j{i}:\n    command: [\"true\"]\n    resources: {{ gpus: 1 }}\n"
            ));
        }
        yaml
    };
    eprintln!("submitting {jobs} jobs in workflows of {batch}");
    let files: Vec<String> =
        (0..jobs).step_by(batch).map(|first| workflow(first, batch.min(jobs - first))).collect();
    let separate = round(&client, files, |_| String::new()).await?;
    let array_round = if array {
        eprintln!("submitting one array job of {jobs} members");
        let yaml = format!(
            "name: bench-array\nobjective: cheapest\njobs:\n  a:\n    command: [\"true\"]\n    resources: {{ gpus: 1 }}\n    parallel: {jobs}\n"
        );
        Some(round(&client, vec![yaml], |wf| format!("array={wf}.a")).await?)
    } else {
        None
    };
    let _ = stop_tx.send(true);
    for t in tasks {
        t.abort();
    }
    for (mut child, _) in shards {
        let _ = child.kill().await;
    }

    // Failover with real agent processes: kill -9 the one running a long job.
    eprintln!("measuring failover {failovers} times");
    let mut failover_ms = Vec::new();
    let mut procs = Vec::new();
    for n in ["fo-a", "fo-b", "fo-c"] {
        procs.push(AgentProc::start(
            &pki,
            coord.control,
            n,
            Attributes::default(),
            Some("1xH100-80GB"),
            work.path(),
        )?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for round in 0..failovers {
        let r: fleetmesh_api::answers::Submitted = client
            .post_raw("/api/v1/workflows", format!("name: fo{round}\njobs:\n  long:\n    command: [sleep, \"120\"]\n    resources: {{ gpus: 1 }}\n").into_bytes())
            .await?;
        let id = format!("{}.long", r.id);
        let running = loop {
            let j: JobRecord = client.get_json(&format!("/api/v1/jobs/{id}")).await?;
            if j.state == JobState::Running {
                break j;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let victim = running.attempts[0].agents[0].clone();
        let Some(p) = procs.iter_mut().find(|p| p.name == victim) else {
            bail!("unknown victim {victim}")
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = Instant::now();
        p.kill9();
        loop {
            let j: JobRecord = client.get_json(&format!("/api/v1/jobs/{id}")).await?;
            if j.state == JobState::Running && j.attempts.len() == 2 {
                break;
            }
            if killed.elapsed() > Duration::from_secs(20) {
                bail!("job {id} not re-placed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        failover_ms.push(killed.elapsed().as_secs_f64() * 1000.0);
        let _: fleetmesh_api::answers::Cancelled =
            client.post_json(&format!("/api/v1/jobs/{id}/cancel"), &json!({})).await?;
        p.spawn()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let mut out = json!({
        "bench": "placement",
        "agents": agents,
        "jobs": jobs,
        "gpus_per_agent": gpus,
        "offered_jobs_per_s": rate,
        "job_exec": if exec == JobExec::Simulated { "simulated" } else { "process" },
        "agent_procs": agent_procs,
        "failover_ms": (pct(&mut failover_ms.clone(), 0.5)).round(),
        "failover_all_ms": failover_ms.iter().map(|f| f.round()).collect::<Vec<_>>(),
    });
    merge(&mut out, separate.figures());
    if let Some(a) = &array_round {
        let ratio = a.placements_per_s() / separate.placements_per_s().max(f64::MIN_POSITIVE);
        out["array"] = a.figures();
        out["array_vs_separate_placements_per_s"] = json!((ratio * 100.0).round() / 100.0);
    }
    println!("{out}");
    Ok(())
}

/// One round of placements: the jobs' summaries once every workflow has finished.
struct Round {
    jobs: Vec<fleetmesh_api::jobs::JobSummary>,
    total_s: f64,
    busy_answers: u32,
}

/// Submit `files` one per 100 ms (all at once when there is one), wait until every
/// workflow has finished, then list their jobs once (`listing(workflow)` is the query;
/// empty for top-level jobs): listing 10,000 jobs every poll would load the scheduler
/// under test.
async fn round(
    client: &fleetmesh_coordinator::client::ApiClient,
    files: Vec<String>,
    listing: impl Fn(&str) -> String,
) -> Result<Round> {
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for (n, yaml) in files.into_iter().enumerate() {
        let slot = t0 + Duration::from_millis(100 * n as u64);
        tokio::time::sleep_until(slot.into()).await;
        let r: fleetmesh_api::answers::Submitted =
            client.post_raw("/api/v1/workflows", yaml.into_bytes()).await?;
        ids.push(r.id);
    }
    let done_by = Instant::now() + Duration::from_secs(600);
    let mut busy_answers = 0u32;
    loop {
        match client.get_json::<Vec<WorkflowSummary>>("/api/v1/workflows").await {
            Ok(wfs) => {
                let ours = wfs.iter().filter(|w| ids.contains(&w.id));
                if ours.clone().all(|w| w.state != WorkflowState::Running)
                    || Instant::now() > done_by
                {
                    break;
                }
            }
            Err(e) => {
                // The scheduler answers late while saturated: count it, poll again.
                busy_answers += 1;
                eprintln!("status poll failed ({e}); retrying");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut jobs = Vec::new();
    for id in &ids {
        let filter = listing(id);
        let filter = if filter.is_empty() { format!("workflow={id}") } else { filter };
        let page = fleetmesh_integration::work::jobs(client, &filter).await;
        jobs.extend(page.ok_or_else(|| anyhow::anyhow!("the job listing did not answer"))?);
    }
    Ok(Round { jobs, total_s: t0.elapsed().as_secs_f64(), busy_answers })
}

impl Round {
    /// First submission to last award, in seconds.
    fn award_span_s(&self) -> f64 {
        let first = self.jobs.iter().map(|j| j.submitted_unix_ms).min().unwrap_or(0);
        let last = self.jobs.iter().filter_map(|j| j.awarded_unix_ms).max().unwrap_or(first);
        last.saturating_sub(first) as f64 / 1000.0
    }

    fn placements_per_s(&self) -> f64 {
        let awarded = self.jobs.iter().filter(|j| j.awarded_unix_ms.is_some()).count();
        let span = self.award_span_s();
        if span > 0.0 {
            (awarded as f64 / span * 10.0).round() / 10.0
        } else {
            0.0
        }
    }

    /// The round's figures, as the bench prints them.
    fn figures(&self) -> serde_json::Value {
        let since_submit = |t: fn(&fleetmesh_api::jobs::JobSummary) -> Option<u64>| -> Vec<f64> {
            self.jobs
                .iter()
                .filter_map(|j| t(j).map(|x| x.saturating_sub(j.submitted_unix_ms) as f64))
                .collect()
        };
        let award_ms = since_submit(|j| j.awarded_unix_ms);
        let mut start_ms = since_submit(|j| j.started_unix_ms);
        json!({
            "succeeded": self.jobs.iter().filter(|j| j.state == JobState::Succeeded).count(),
            "placements_per_s": self.placements_per_s(),
            "all_awarded_s": (self.award_span_s() * 10.0).round() / 10.0,
            "all_done_s": (self.total_s * 10.0).round() / 10.0,
            "award_p50_ms": pct(&mut award_ms.clone(), 0.5),
            "award_p99_ms": pct(&mut award_ms.clone(), 0.99),
            // Jobs whose first award did not stick (refused, not answered in time, or
            // lost): their award time is that of a later attempt.
            "jobs_with_several_attempts": self.jobs.iter().filter(|j| j.attempts > 1).count(),
            "awards_over_500ms": award_ms.iter().filter(|&&x| x > 500.0).count(),
            "start_p50_ms": pct(&mut start_ms.clone(), 0.5),
            "start_p99_ms": pct(&mut start_ms, 0.99),
            "api_busy_answers": self.busy_answers,
        })
    }
}

/// `extra`'s fields added to the object `out`.
fn merge(out: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(o), serde_json::Value::Object(e)) = (out.as_object_mut(), extra) {
        o.extend(e);
    }
}

/// A session stand-in for the in-memory baseline (the Fleet only ever sends `Close`).
struct NullSession;

impl Actor for NullSession {
    type Msg = ToSession;
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _m: ActorRef<ToSession>, _a: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

/// The same reports, same rate, cast straight into an in-process Fleet actor.
async fn inmemory_baseline(agents: usize, gpus: u32, seconds: u64) -> Result<IngestStats> {
    eprintln!("baseline: {agents} agents' reports cast into an in-process Fleet for {seconds} s");
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(dir.path())?);
    let cfg = FleetConfig { history_len: 30, ..FleetConfig::default() };
    let (revocations, link) = (Default::default(), Default::default());
    let (fleet, _h) =
        Actor::spawn(None, Fleet, FleetArgs { cfg, store, revocations, link }).await?;
    let (null, _nh) = Actor::spawn(None, NullSession, ()).await?;
    let mut samplers = Vec::with_capacity(agents);
    for i in 0..agents {
        let name = format!("base-{i:05}");
        let identity = fleetmesh_protocol::PeerIdentity {
            trust_domain: "bench.local".into(),
            kind: PeerKind::Agent,
            name: name.clone(),
            attributes: Attributes::default(),
            serial: "00".into(),
            not_before_unix: 0,
            not_after_unix: i64::MAX,
        };
        ractor::call_t!(
            fleet,
            |reply| FleetMsg::Register {
                identity,
                session_id: 1,
                session: null.get_derived(),
                remote_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                reply
            },
            5000
        )?;
        samplers.push((name, sampler(&format!("base-{i:05}"), gpus)?));
    }
    let t0 = unix_ms();
    let start = Instant::now();
    let mut seq = 0;
    // Same pacing as the agents: every agent reports once per second, spread evenly over
    // the second in 1 ms steps (real agents' phases are spread by their connect times).
    let per_tick = agents.div_ceil(1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut idx = 0usize;
    while start.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        if idx % agents < per_tick {
            seq += 1;
        }
        for _ in 0..per_tick {
            let (name, s) = &mut samplers[idx % agents];
            idx += 1;
            let report = Box::new(s.sample(seq));
            fleet.cast(FleetMsg::Telemetry { name: name.clone(), session_id: 1, report })?;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = ractor::call_t!(fleet, FleetMsg::Ingest, 60_000, t0)?;
    fleet.stop(None);
    null.stop(None);
    Ok(stats)
}

/// Plain quinn: one stream, same mutual TLS and socket settings, `size` bytes from memory.
async fn quic_raw(pki: &Pki, size: u64) -> Result<f64> {
    use fleetmesh_protocol::data::ALPN_XFER;
    let server_tls = pki.identity(PeerKind::Agent, "h0")?;
    let client_tls = pki.identity(PeerKind::Agent, "fetcher")?;
    let server = fleetmesh_data::xfer::endpoint("127.0.0.1:0".parse()?, &server_tls, true)?;
    let addr = server.local_addr()?;
    let client = fleetmesh_data::xfer::endpoint("127.0.0.1:0".parse()?, &client_tls, false)?;
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (mut send, _recv) = conn.accept_bi().await?;
        let buf = vec![0x5au8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            send.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        send.finish()?;
        let _ = send.stopped().await;
        anyhow::Ok(())
    });
    let cfg = client_tls.peer_client_config(&[ALPN_XFER], PeerKind::Agent, "h0")?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?;
    let conn = client.connect_with(quinn::ClientConfig::new(Arc::new(quic)), addr, "peer")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let start = Instant::now();
    send.write_all(b"go").await?;
    let mut got = 0u64;
    while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
        got += chunk.bytes.len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    srv.await??;
    if got != size {
        bail!("quic baseline moved {got} of {size} bytes");
    }
    Ok(size as f64 / (1 << 20) as f64 / secs)
}

async fn tcp_raw(size: u64) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let srv = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        let buf = vec![0x5au8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        anyhow::Ok(())
    });
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    let start = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = c.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    srv.await??;
    if got != size {
        bail!("tcp baseline moved {got} of {size} bytes");
    }
    Ok(size as f64 / (1 << 20) as f64 / secs)
}

async fn transfer(
    size: &str,
    sources: usize,
    chunk_size: &str,
    dir: Option<std::path::PathBuf>,
) -> Result<()> {
    use fleetmesh_data::{dataset, LocalDataset, Store, XferServer};
    use fleetmesh_protocol::data::{FetchPlan, Holder, Ticket, TicketSigner};
    let size = fleetmesh_protocol::workflow::parse_size(size).map_err(anyhow::Error::msg)?;
    let chunk = fleetmesh_protocol::workflow::parse_size(chunk_size).map_err(anyhow::Error::msg)?;
    if sources == 0 {
        bail!("--sources must be at least 1");
    }
    let pki = Pki::new("bench.test")?;
    let tmp = tempfile::tempdir_in(dir.unwrap_or_else(std::env::temp_dir))?;
    for i in 0..sources {
        pki.issue(PeerKind::Agent, &format!("h{i}"), Attributes::default())?;
    }
    pki.issue(PeerKind::Agent, "fetcher", Attributes::default())?;
    // The dataset, written once into h0's store; the other holders get hard links.
    let src = tmp.path().join("src.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src)?);
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut block = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n])?;
            left -= n as u64;
        }
        f.flush()?;
    }
    let key = TicketSigner::generate_pkcs8()?;
    let signer = TicketSigner::from_pkcs8(&key)?;
    let h0 = Store::open(&tmp.path().join("h0"), u64::MAX)?;
    let manifest = dataset::import(&h0, &src, chunk as u32, |_| {})?;
    let id = manifest.id();
    let rec = LocalDataset {
        id: id.clone(),
        name: "bench".into(),
        jurisdictions: vec![],
        manifest: manifest.clone(),
    };
    h0.add_dataset(rec.clone())?;
    drop(h0);
    let mut holders = Vec::new();
    let mut servers = Vec::new();
    for i in 0..sources {
        let name = format!("h{i}");
        let root = tmp.path().join(&name);
        if i > 0 {
            let h0_chunks = tmp.path().join("h0/chunks");
            for sub in std::fs::read_dir(&h0_chunks)? {
                let sub = sub?;
                let dest = root.join("chunks").join(sub.file_name());
                std::fs::create_dir_all(&dest)?;
                for f in std::fs::read_dir(sub.path())? {
                    let f = f?;
                    std::fs::hard_link(f.path(), dest.join(f.file_name()))?;
                }
            }
        }
        let store = Arc::new(Store::open(&root, u64::MAX)?);
        store.add_dataset(rec.clone())?;
        let tls = pki.identity(PeerKind::Agent, &name)?;
        let ep = fleetmesh_data::xfer::endpoint("127.0.0.1:0".parse()?, &tls, true)?;
        let server = XferServer::new(store, &name, "bench.test", Some(signer.public_key()), None);
        server.spawn_accept_loop(ep.clone());
        holders.push(Holder {
            name: name.clone(),
            kind: PeerKind::Agent,
            addr: ep.local_addr()?.to_string(),
            ticket: signer.sign(Ticket {
                dataset: id.clone(),
                requester: "fetcher".into(),
                requester_kind: PeerKind::Agent,
                holder: name,
                jurisdictions: vec![],
                expires_unix_ms: fleetmesh_data::now_unix_ms() + 3_600_000,
            }),
        });
        servers.push((server, ep));
    }
    let plan = FetchPlan {
        dataset: id.clone(),
        name: "bench".into(),
        jurisdictions: vec![],
        bytes: size,
        holders,
    };
    let tls = pki.identity(PeerKind::Agent, "fetcher")?;
    let fetch_store = Arc::new(Store::open(&tmp.path().join("fetcher"), u64::MAX)?);
    let ep = fleetmesh_data::xfer::endpoint("127.0.0.1:0".parse()?, &tls, false)?;
    let me = std::process::id();
    eprintln!("fetching {size} bytes from {sources} holder(s)");
    let cpu0 = cpu_seconds(me).unwrap_or(0.0);
    let start = Instant::now();
    let report =
        fleetmesh_data::fetch(&ep, &tls, fetch_store.clone(), &plan, Arc::new(|_| {})).await?;
    let secs = start.elapsed().as_secs_f64();
    let fetch_cores = (cpu_seconds(me).unwrap_or(0.0) - cpu0) / secs;
    if !fetch_store.complete(&id) {
        bail!("fetch reported success but the dataset is incomplete");
    }
    let mib_per_s = size as f64 / (1 << 20) as f64 / secs;
    eprintln!("baselines: one quinn stream, one TCP socket");
    let cpu1 = cpu_seconds(me).unwrap_or(0.0);
    let t1 = Instant::now();
    let quic = quic_raw(&pki, size).await?;
    let quic_cores = (cpu_seconds(me).unwrap_or(0.0) - cpu1) / t1.elapsed().as_secs_f64();
    let tcp = tcp_raw(size).await?;
    println!(
        "{}",
        json!({
            "bench": "transfer",
            "size_bytes": size,
            "chunk_bytes": chunk,
            "sources": sources,
            "seconds": secs,
            "mib_per_s": mib_per_s,
            "chunks": report.fetched_chunks,
            "per_holder": report.per_holder,
            "quic_raw_mib_per_s": quic,
            "tcp_raw_mib_per_s": tcp,
            "ratio_vs_quic_raw": mib_per_s / quic,
            "cpu_cores_busy_fetch": (fetch_cores * 100.0).round() / 100.0,
            "cpu_cores_busy_quic_raw": (quic_cores * 100.0).round() / 100.0,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "udp_rmem_max": std::fs::read_to_string("/proc/sys/net/core/rmem_max").ok().map(|s| s.trim().to_string()),
        })
    );
    Ok(())
}

fn main() -> Result<()> {
    // Bidder shards host agents whose attempts are supervised by this program.
    fleetmesh_agent::shim::run_if_requested();
    let cli = Cli::parse();
    fleetmesh_protocol::tls::install_default_provider();
    // A bidders shard is one of several processes sharing the cores: one worker each.
    let workers = if matches!(cli.cmd, Cmd::Bidders { .. }) { 1 } else { num_cpus() };
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Telemetry { agents, gpus_per_agent, seconds, connect_rate, no_baseline } => {
                telemetry(agents, gpus_per_agent, seconds, connect_rate, no_baseline).await
            }
            Cmd::Placement {
                agents,
                jobs,
                gpus_per_agent,
                failovers,
                rate,
                agent_procs,
                exec,
                array,
            } => {
                let shape = PlacementShape { agents, jobs, gpus: gpus_per_agent, rate, array };
                placement(shape, failovers, agent_procs, exec).await
            }
            Cmd::Bidders { ca_dir, coordinator, first, count, gpus_per_agent, work, exec } => {
                bidders(&ca_dir, coordinator, first, count, gpus_per_agent, &work, exec).await
            }
            Cmd::Burst { jobs, gpus_per_node, job_seconds } => {
                burst::burst(jobs, gpus_per_node, job_seconds).await
            }
            Cmd::Transfer { size, sources, chunk_size, dir } => {
                transfer(&size, sources, &chunk_size, dir).await
            }
        }
    })
}
