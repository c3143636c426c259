//! `fleetmesh-agent`: the node daemon. Thin shell: parse flags, init tracing, load
//! config, call `fleetmesh_agent::run`, map errors to exit codes.

#![warn(clippy::too_many_lines, clippy::too_many_arguments)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleetmesh_agent::config::{AgentConfig, FileConfig, ProbeConfig};

#[derive(Parser, Debug)]
#[command(name = "fleetmesh-agent", version, about = "Fleetmesh node agent")]
struct Cli {
    /// TOML config file (same keys as the flags; flags override it).
    #[arg(long, env = "FLEETMESH_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Coordinator control endpoint HOST:PORT (default port 7400; from the join string
    /// when enrolling).
    #[arg(long)]
    coordinator: Option<String>,
    /// Join string from `fleetmesh tokens create`: enroll, then keep the certificate in
    /// the data dir and renew it automatically.
    #[arg(long, env = "FLEETMESH_JOIN")]
    join: Option<String>,
    /// Agent data directory.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Mesh CA certificate (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// This agent's certificate (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Name to claim in the hello (must equal the certificate's name; default: from it).
    #[arg(long)]
    name: Option<String>,
    /// Use SIMULATED GPUs (development/test only), e.g. 4xH100-80GB.
    #[arg(long, global = true)]
    simulate_gpus: Option<String>,
    /// Telemetry interval, e.g. 1s, 500ms.
    #[arg(long)]
    telemetry_interval: Option<String>,
    /// Longest wait between reconnect attempts, e.g. 5s.
    #[arg(long)]
    reconnect_max: Option<String>,
    /// Price per GPU-hour (per hour for CPU-only jobs) this node asks [default: 1.0].
    #[arg(long)]
    price_per_hour: Option<f64>,
    /// This node is spot/preemptible capacity.
    #[arg(long)]
    spot: bool,
    /// CPUs jobs may use together [default: every CPU of the host].
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory jobs may use together, e.g. 64GiB [default: the host's].
    #[arg(long)]
    memory: Option<String>,
    /// IP address peers and gang members reach this node at [default: the address the
    /// coordinator sees its connection come from].
    #[arg(long)]
    advertise_addr: Option<String>,
    /// Poll this http:// URL for a spot interruption notice (AWS:
    /// http://169.254.169.254/latest/meta-data/spot/instance-action; GCP:
    /// http://metadata.google.internal/computeMetadata/v1/instance/preempted).
    #[arg(long)]
    interruption_notice_url: Option<String>,
    /// Treat this file appearing as a spot interruption notice.
    #[arg(long)]
    interruption_notice_file: Option<PathBuf>,
    /// Node labels for placement constraints, e.g. rack=a7,tier=gold.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// UDP address of the data-plane endpoint (peers fetch datasets here) [default: 0.0.0.0:0].
    #[arg(long)]
    data_listen: Option<String>,
    /// Size limit of the chunk store; least recently used unpinned chunks are evicted [default: 100GiB].
    #[arg(long)]
    store_limit: Option<String>,
    /// Cap on bytes served to peers per second, e.g. 200MiB [default: none].
    #[arg(long)]
    serve_rate: Option<String>,
    /// Price added to a bid per GB of input fetched from another provider/region [default: 0.09].
    #[arg(long)]
    transfer_cost_per_gb: Option<f64>,
    /// Bandwidth assumed for input fetches in a bid's ETA [default: 100MiB].
    #[arg(long)]
    fetch_bandwidth: Option<String>,
    /// Container runtime for jobs with an `image`: `auto` (docker or podman, whichever
    /// answers `info`), `none`, or a program path [default: auto].
    #[arg(long)]
    container_runtime: Option<String>,
    /// Stop this node's running jobs after this long without hearing from the
    /// coordinator, e.g. 1s. With it (and DURATION + 1s below the coordinator's lost
    /// timeout, 2s by default) a job cut off by a network partition is stopped before the
    /// coordinator places it elsewhere, so it never runs twice even during the partition.
    /// The price: a coordinator outage longer than DURATION stops the jobs too (they are
    /// placed again, without using a retry) instead of being re-adopted [default: off].
    #[arg(long)]
    stop_jobs_after_disconnect: Option<String>,
    /// Run jobs as this unprivileged user (created by scripts/install-agent.sh as
    /// fleetmesh-job); it cannot read the agent's key, chunk store or other attempts'
    /// work dirs. Needs the agent to run as root [default: jobs run as the agent's user].
    #[arg(long)]
    job_user: Option<String>,
    /// How attempts are started: `direct` (children of the agent) or `systemd-run` (each
    /// in a transient unit of its own, outside the agent's service sandbox; what the
    /// systemd install uses) [default: direct].
    #[arg(long)]
    job_launcher: Option<String>,
    /// With --job-user: give each running attempt its own uid from START-END (uids no
    /// account uses), so attempts running side by side cannot read each other's work
    /// dirs either [default: all attempts run as the job user].
    #[arg(long)]
    job_uids: Option<String>,
    /// With --job-user: run each running attempt as its own account PREFIX0, PREFIX1, ...
    /// (install-agent.sh creates fleetmesh-job-0..63); unlike --job-uids this works under
    /// --job-launcher systemd-run.
    #[arg(long, value_name = "PREFIX")]
    job_accounts: Option<String>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print what this node reports (inventory + one telemetry sample), without connecting.
    Probe {
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    // An attempt's supervisor is this same program (see `fleetmesh_agent::shim`).
    fleetmesh_agent::shim::run_if_requested();
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    fleetmesh_protocol::tls::install_default_provider();
    let file = match &cli.config {
        Some(p) => match FileConfig::load(p) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("fleetmesh-agent: {e}");
                return ExitCode::from(2);
            }
        },
        None => FileConfig::default(),
    };
    if let Some(Command::Probe { json }) = cli.command {
        let cfg = ProbeConfig {
            data_dir: cli.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(".")),
            simulate_gpus: cli.simulate_gpus.or(file.simulate_gpus),
        };
        return probe(&cfg, json);
    }
    let flags = FileConfig {
        coordinator: cli.coordinator,
        join: cli.join,
        data_dir: cli.data_dir,
        ca: cli.ca,
        cert: cli.cert,
        key: cli.key,
        name: cli.name,
        simulate_gpus: cli.simulate_gpus,
        telemetry_interval: cli.telemetry_interval,
        reconnect_max: cli.reconnect_max,
        price_per_hour: cli.price_per_hour,
        spot: cli.spot.then_some(true),
        cpus: cli.cpus,
        memory: cli.memory,
        advertise_addr: cli.advertise_addr,
        interruption_notice_url: cli.interruption_notice_url,
        interruption_notice_file: cli.interruption_notice_file,
        labels: (!cli.labels.is_empty()).then_some(cli.labels),
        data_listen: cli.data_listen,
        store_limit: cli.store_limit,
        serve_rate: cli.serve_rate,
        transfer_cost_per_gb: cli.transfer_cost_per_gb,
        fetch_bandwidth: cli.fetch_bandwidth,
        container_runtime: cli.container_runtime,
        stop_jobs_after_disconnect: cli.stop_jobs_after_disconnect,
        job_user: cli.job_user,
        job_launcher: cli.job_launcher,
        job_uids: cli.job_uids,
        job_accounts: cli.job_accounts,
    };
    let config = match AgentConfig::resolve(file, flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleetmesh-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let rt =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("fleetmesh-agent: cannot start runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    let result = rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            // The agent may have stopped on its own already.
            let _ = tx.send(true);
        });
        fleetmesh_agent::run(config, rx).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            eprintln!("fleetmesh-agent: {e}");
            ExitCode::from(2)
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `fleetmesh-agent probe`: what this node would report, printed.
fn probe(cfg: &ProbeConfig, json: bool) -> ExitCode {
    let out = match fleetmesh_agent::probe(cfg) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("fleetmesh-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !json {
        print_probe(&out);
        return ExitCode::SUCCESS;
    }
    match serde_json::to_string_pretty(&out) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetmesh-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_probe(out: &fleetmesh_agent::ProbeOutput) {
    let inv = &out.inventory;
    println!("host:       {} ({}, kernel {})", inv.host.hostname, inv.host.os, inv.host.kernel);
    println!("agent:      {}", inv.host.agent_version);
    println!(
        "cpus:       {}  memory: {} MiB",
        inv.host.cpu_count,
        inv.host.memory_total_bytes >> 20
    );
    println!("gpu source: {:?}", inv.gpu_source);
    println!("addresses:  {}", inv.host_addrs.join(", "));
    let h = &out.telemetry.host;
    println!(
        "cpu util:   {:.1}%  load: {:.2} {:.2} {:.2}  mem used: {} MiB",
        h.cpu_utilization_percent,
        h.load_1,
        h.load_5,
        h.load_15,
        h.memory_used_bytes >> 20
    );
    for g in &out.telemetry.gpus {
        let name =
            inv.gpus.iter().find(|i| i.uuid == g.uuid).map(|i| i.name.as_str()).unwrap_or("?");
        println!(
            "gpu {}: {} {} util={:?}% mem={:?}/{:?} MiB temp={:?}C power={:?}W",
            g.index,
            name,
            g.uuid,
            g.utilization_gpu_percent,
            g.memory_used_bytes.map(|b| b >> 20),
            g.memory_total_bytes.map(|b| b >> 20),
            g.temperature_c,
            g.power_w
        );
    }
}
