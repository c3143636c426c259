//! `fleetmesh`: the operator/user CLI, a client of the coordinator's API (it links the
//! API types and client, not the server).
//!
//! API address and credentials come from flags, then `FLEETMESH_API`, `FLEETMESH_CA`,
//! `FLEETMESH_CERT`, `FLEETMESH_KEY`, then `<config dir>/fleetmesh/config.toml`
//! (keys `api`, `ca`, `cert`, `key`), or the file given with `--config`.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// `println!` that ends the process quietly when stdout is closed (e.g. `| head`).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}

mod certs;
mod conn;
mod data;
mod fleet;
mod output;
mod plan;
mod pools;
mod tokens;
mod work;

use conn::ConnArgs;
use output::Output;

#[derive(Parser, Debug)]
#[command(name = "fleetmesh", version, about = "Fleetmesh command-line interface")]
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a mesh CA and issue certificates.
    Certs {
        #[command(subcommand)]
        cmd: certs::CertsCmd,
    },
    /// List agents, or show one.
    Agents {
        #[command(subcommand)]
        cmd: Option<fleet::AgentsCmd>,
    },
    /// List every GPU in the fleet.
    Gpus,
    /// Print the coordinator's Prometheus metrics.
    Metrics,
    /// Join tokens for zero-touch enrollment.
    Tokens {
        #[command(subcommand)]
        cmd: tokens::TokensCmd,
    },
    /// The audit trail: enrollments, renewals, revocations, and every change made
    /// through the API with who made it.
    Audit,
    /// Deny an identity of any kind on every port (its certificates stop working now):
    /// `fleetmesh revoke operator bob`.
    Revoke {
        /// agent, operator or coordinator.
        kind: String,
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Submit a workflow file (validated before anything is stored).
    Submit { file: std::path::PathBuf },
    /// Submit a one-job workflow: `fleetmesh run [--gpus N] -- CMD ARGS...`.
    Run {
        #[arg(long, default_value_t = 0)]
        gpus: u32,
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// A dry run: where each job would go, at what price, what it would move, and why
    /// anything would wait. Nothing is submitted. Exit 0: all placeable now; 2: something
    /// would wait; 1: invalid file.
    Plan { file: std::path::PathBuf },
    /// Capacity pools: nodes, launches, failures, idle time (`show NAME` for one).
    Pools {
        #[command(subcommand)]
        cmd: Option<pools::PoolsCmd>,
    },
    /// List workflows.
    Workflows,
    /// List jobs (arrays folded, with their members per state), or show one.
    Jobs {
        #[command(flatten)]
        filter: work::JobsFilter,
        #[command(subcommand)]
        cmd: Option<work::JobsCmd>,
    },
    /// A job's output (`-f` follows it live).
    Logs {
        job: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel a job or a whole workflow (SIGTERM, then SIGKILL after a grace period).
    Cancel { id: String },
    /// Datasets: content-addressed, held by agents, moved peer to peer.
    Data {
        #[command(subcommand)]
        cmd: data::DataCmd,
    },
}

async fn run(cli: Cli) -> Result<()> {
    let (conn, out) = (&cli.conn, cli.output);
    match cli.command {
        Command::Certs { cmd } => certs::run(cmd),
        Command::Agents { cmd } => fleet::agents(conn, out, cmd).await,
        Command::Gpus => fleet::gpus(conn, out).await,
        Command::Metrics => fleet::metrics(conn).await,
        Command::Audit => fleet::audit(conn, out).await,
        Command::Revoke { kind, name, reason } => fleet::revoke(conn, &kind, &name, reason).await,
        Command::Tokens { cmd } => tokens::run(conn, out, cmd).await,
        Command::Submit { file } => work::submit(conn, out, &file).await,
        Command::Run { gpus, command } => work::run_one(conn, out, gpus, &command).await,
        Command::Plan { file } => plan::plan(conn, out, &file).await,
        Command::Pools { cmd } => pools::run(conn, out, cmd).await,
        Command::Workflows => work::workflows(conn, out).await,
        Command::Jobs { filter, cmd: None } => work::jobs(conn, out, &filter).await,
        Command::Jobs { cmd: Some(work::JobsCmd::Show { id }), .. } => {
            work::show_job(conn, out, &id).await
        }
        Command::Logs { job, follow } => work::logs(conn, &job, follow).await,
        Command::Cancel { id } => work::cancel(conn, &id).await,
        Command::Data { cmd } => data::run(conn, out, cmd).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fleetmesh_protocol::tls::install_default_provider();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetmesh: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<plan::WouldWait>().is_some() => {
            eprintln!("fleetmesh: {e:#}");
            ExitCode::from(PLAN_WOULD_WAIT)
        }
        Err(e) => {
            eprintln!("fleetmesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `fleetmesh plan`'s exit code when a job would wait (as `nomad job plan` uses 1 for
/// changes, 2 is distinct from the failure code 1 here).
const PLAN_WOULD_WAIT: u8 = 2;
