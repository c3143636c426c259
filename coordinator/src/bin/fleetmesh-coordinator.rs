//! `fleetmesh-coordinator`: thin shell around `fleetmesh_coordinator::run`.

#![warn(clippy::too_many_lines, clippy::too_many_arguments)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fleetmesh_coordinator::config::{CoordinatorConfig, FileConfig};

#[derive(Parser, Debug)]
#[command(name = "fleetmesh-coordinator", version, about = "Fleetmesh coordinator")]
struct Cli {
    /// TOML config file (same keys as the flags; flags override it).
    #[arg(long, env = "FLEETMESH_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Control plane (QUIC/UDP) listen address [default: 0.0.0.0:7400].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTPS API listen address [default: 127.0.0.1:7401].
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// Data directory (embedded store) [default: /var/lib/fleetmesh].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Mesh CA certificate (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Coordinator certificate (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Coordinator private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Silence after which an agent is suspect [default: 1200ms].
    #[arg(long)]
    suspect_after: Option<String>,
    /// Silence after which an agent is lost [default: 2000ms].
    #[arg(long)]
    lost_after: Option<String>,
    /// Heartbeat interval asked of agents [default: 500ms].
    #[arg(long)]
    heartbeat_interval: Option<String>,
    /// Telemetry history points kept per agent [default: 120].
    #[arg(long)]
    history: Option<usize>,
    /// CA private key: enables join tokens, enrollment and certificate renewal.
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// Lifetime of certificates issued at enrollment/renewal [default: 24h].
    #[arg(long)]
    cert_ttl: Option<String>,
    /// Address(es) agents dial, written into join strings (HOST:PORT[,HOST:PORT]).
    #[arg(long)]
    advertise: Option<String>,
    /// Agents asked for a bid per auction [default: 3].
    #[arg(long)]
    auction_top_k: Option<usize>,
    /// Size limit of the coordinator's own chunk store (`fleetmesh data put`) [default: 100GiB].
    #[arg(long)]
    store_limit: Option<String>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    fleetmesh_protocol::tls::install_default_provider();
    let file = match &cli.config {
        Some(p) => match FileConfig::load(p) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("fleetmesh-coordinator: {e}");
                return ExitCode::from(2);
            }
        },
        None => FileConfig::default(),
    };
    let flags = FileConfig {
        listen: cli.listen,
        api_listen: cli.api_listen,
        data_dir: cli.data_dir,
        ca: cli.ca,
        cert: cli.cert,
        key: cli.key,
        suspect_after: cli.suspect_after,
        lost_after: cli.lost_after,
        heartbeat_interval: cli.heartbeat_interval,
        history: cli.history,
        ca_key: cli.ca_key,
        cert_ttl: cli.cert_ttl,
        advertise: cli.advertise,
        auction_top_k: cli.auction_top_k,
        store_limit: cli.store_limit,
        pool: None,
    };
    let config = match CoordinatorConfig::resolve(file, flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleetmesh-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetmesh-coordinator: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            if let (Ok(mut term), Ok(mut int)) =
                (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
            {
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
            // The coordinator may have stopped on its own already.
            let _ = tx.send(true);
        });
        fleetmesh_coordinator::run(config, rx).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "coordinator failed");
            eprintln!("fleetmesh-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}
