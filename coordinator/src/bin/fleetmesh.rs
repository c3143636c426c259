//! `fleetmesh`: the operator/user CLI.
//!
//! API address and credentials come from flags, then `FLEETMESH_API`, `FLEETMESH_CA`,
//! `FLEETMESH_CERT`, `FLEETMESH_KEY`, then `<config dir>/fleetmesh/config.toml`
//! (keys `api`, `ca`, `cert`, `key`), or the file given with `--config`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;

/// `println!` that ends the process quietly when stdout is closed (e.g. `| head`).
macro_rules! outln {
    ($($t:tt)*) => {{
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}
use clap::{Args, Parser, Subcommand, ValueEnum};
use fleetmesh_coordinator::client::ApiClient;
use fleetmesh_coordinator::views::{AgentDetail, AgentView, GpuView};
use fleetmesh_protocol::pki::{Ca, IssueRequest};
use fleetmesh_protocol::tls::TlsIdentity;
use fleetmesh_protocol::{Attributes, PeerKind};
use serde::Deserialize;

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

#[derive(Args, Debug)]
struct ConnArgs {
    /// Coordinator API, e.g. https://127.0.0.1:7401.
    #[arg(long, global = true, env = "FLEETMESH_API")]
    api: Option<String>,
    /// Mesh CA certificate.
    #[arg(long, global = true, env = "FLEETMESH_CA")]
    ca: Option<PathBuf>,
    /// Operator certificate.
    #[arg(long, global = true, env = "FLEETMESH_CERT")]
    cert: Option<PathBuf>,
    /// Operator private key.
    #[arg(long, global = true, env = "FLEETMESH_KEY")]
    key: Option<PathBuf>,
    /// CLI config file [default: <config dir>/fleetmesh/config.toml].
    #[arg(long, global = true, env = "FLEETMESH_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a mesh CA and issue certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// List agents, or show one.
    Agents {
        #[command(subcommand)]
        cmd: Option<AgentsCmd>,
    },
    /// List every GPU in the fleet.
    Gpus,
    /// Print the coordinator's Prometheus metrics.
    Metrics,
    /// Join tokens for zero-touch enrollment.
    Tokens {
        #[command(subcommand)]
        cmd: TokensCmd,
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
    Submit { file: PathBuf },
    /// Submit a one-job workflow: `fleetmesh run [--gpus N] -- CMD ARGS...`.
    Run {
        #[arg(long, default_value_t = 0)]
        gpus: u32,
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// List workflows.
    Workflows,
    /// List jobs, or show one.
    Jobs {
        #[arg(long)]
        workflow: Option<String>,
        #[command(subcommand)]
        cmd: Option<JobsCmd>,
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
        cmd: DataCmd,
    },
}

#[derive(Subcommand, Debug)]
enum DataCmd {
    /// Chunk a file or directory and store it (in the coordinator's store, and on an
    /// agent with --on).
    Put {
        path: PathBuf,
        /// Dataset name [default: the file or directory name].
        #[arg(long)]
        name: Option<String>,
        /// Jurisdictions the data may live in (repeat for several) [default: anywhere].
        #[arg(long = "jurisdiction")]
        jurisdictions: Vec<String>,
        /// Also have this agent fetch it.
        #[arg(long)]
        on: Option<String>,
        /// Chunk size, e.g. 4MiB.
        #[arg(long, default_value = "4MiB")]
        chunk_size: String,
        /// Allow this new version to live in more places than the newest version of the
        /// same name (recorded in the audit trail).
        #[arg(long)]
        loosen_residency: bool,
    },
    /// List datasets.
    Ls,
    /// Size, holders, residency and recent fetches of a dataset (id, id prefix, NAME@VERSION
    /// or name: its newest version).
    Show { dataset: String },
    /// Download a dataset into DEST (a directory), verifying every chunk.
    Get { dataset: String, dest: PathBuf },
    /// Have an agent fetch a dataset from its holders.
    Place { dataset: String, agent: String },
    /// Remove a dataset from the index and from every holder.
    Rm { dataset: String },
}

#[derive(Subcommand, Debug)]
enum JobsCmd {
    /// State history, attempts, agents, bids and cost of one job.
    Show { id: String },
}

#[derive(Subcommand, Debug)]
enum TokensCmd {
    /// Create a join token and print its join string (shown once).
    Create {
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        jurisdiction: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        /// Labels, e.g. rack=a7,tier=spot.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// Fix the enrolled agent's name (default: the node's own name).
        #[arg(long)]
        name: Option<String>,
        /// How many enrollments the token allows.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Token lifetime.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Coordinator address(es) for the join string [default: the coordinator's --advertise].
        #[arg(long = "coordinator")]
        coordinators: Vec<String>,
    },
    /// List join tokens (never their secrets).
    Ls,
    /// Revoke a join token.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
enum AgentsCmd {
    /// One agent with its GPUs and recent history.
    Show { name: String },
    /// Stop new awards to an agent; running jobs finish.
    Drain {
        name: String,
        /// Undo a drain.
        #[arg(long)]
        undo: bool,
    },
    /// Cut an agent off: its session ends now, it cannot renew or reconnect.
    Revoke {
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Create a CA: writes DIR/ca.pem and DIR/ca.key (0600).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        trust_domain: String,
    },
    /// Issue a certificate: writes DIR/<kind>-<name>.pem and .key (0600).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        kind: PeerKind,
        #[arg(long)]
        name: String,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        jurisdiction: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        /// Lifetime, e.g. 24h, 30d [default: 30d].
        #[arg(long, default_value = "30d")]
        ttl: String,
        /// DNS SAN (servers); repeatable. Coordinators default to localhost.
        #[arg(long)]
        dns: Vec<String>,
        /// IP SAN (servers); repeatable. Coordinators default to 127.0.0.1 and ::1.
        #[arg(long)]
        ip: Vec<IpAddr>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CliConfigFile {
    api: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

fn client(conn: &ConnArgs) -> Result<ApiClient> {
    let path = conn
        .config
        .clone()
        .or_else(|| dirs::config_dir().map(|d| d.join("fleetmesh").join("config.toml")));
    let file = match &path {
        Some(p) if p.exists() => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str::<CliConfigFile>(&text)
                .with_context(|| format!("parsing {}", p.display()))?
        }
        Some(p) if conn.config.is_some() => bail!("config file {} does not exist", p.display()),
        _ => CliConfigFile::default(),
    };
    let need = |what: &str, env: &str| {
        anyhow!("no {what}: pass --{what}, set {env}, or put `{what} = ...` in the CLI config file")
    };
    let api = conn.api.clone().or(file.api).ok_or_else(|| need("api", "FLEETMESH_API"))?;
    let ca = conn.ca.clone().or(file.ca).ok_or_else(|| need("ca", "FLEETMESH_CA"))?;
    let cert = conn.cert.clone().or(file.cert).ok_or_else(|| need("cert", "FLEETMESH_CERT"))?;
    let key = conn.key.clone().or(file.key).ok_or_else(|| need("key", "FLEETMESH_KEY"))?;
    let tls = TlsIdentity::load(&ca, &cert, &key)?;
    Ok(ApiClient::new(&api, &tls)?)
}

fn ago(unix_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let s = now.saturating_sub(unix_ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn gib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 30) as f64)
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> =
            cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        outln!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn dash(o: &Option<String>) -> String {
    o.clone().unwrap_or_else(|| "-".into())
}

fn agent_row(a: &AgentView) -> Vec<String> {
    let utils: Vec<u32> = a.gpus.iter().filter_map(|g| g.utilization_gpu).collect();
    let util = if utils.is_empty() {
        "-".into()
    } else {
        format!("{:.0}%", utils.iter().sum::<u32>() as f64 / utils.len() as f64)
    };
    let used: u64 = a.gpus.iter().filter_map(|g| g.memory_used_bytes).sum();
    let total: u64 = a.gpus.iter().map(|g| g.memory_total_bytes).sum();
    let gpus = if a.gpu_source == "simulated" {
        format!("{} (simulated)", a.gpus.len())
    } else {
        a.gpus.len().to_string()
    };
    vec![
        a.name.clone(),
        a.state.as_str().into(),
        dash(&a.region),
        dash(&a.provider),
        gpus,
        util,
        if total > 0 { format!("{}/{} GiB", gib(used), gib(total)) } else { "-".into() },
        ago(a.last_seen_unix_ms),
    ]
}

fn gpu_rows(gpus: &[GpuView]) -> Vec<Vec<String>> {
    gpus.iter()
        .map(|g| {
            vec![
                g.agent.clone(),
                g.index.to_string(),
                if g.simulated { format!("{} [simulated]", g.name) } else { g.name.clone() },
                g.uuid.clone(),
                g.utilization_gpu.map(|u| format!("{u}%")).unwrap_or_else(|| "-".into()),
                format!(
                    "{}/{} GiB",
                    g.memory_used_bytes.map(gib).unwrap_or_else(|| "-".into()),
                    gib(g.memory_total_bytes)
                ),
                g.temperature_c.map(|t| format!("{t}C")).unwrap_or_else(|| "-".into()),
                g.power_w.map(|p| format!("{p:.0}W")).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect()
}

const GPU_HEADERS: [&str; 8] = ["AGENT", "IDX", "NAME", "UUID", "UTIL", "MEMORY", "TEMP", "POWER"];

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Certs { cmd } => certs(cmd),
        Command::Agents { cmd: None } => {
            let agents: Vec<AgentView> = client(&cli.conn)?.get_json("/api/v1/agents").await?;
            if cli.output == Output::Json {
                return print_json(&agents);
            }
            table(
                &[
                    "NAME",
                    "STATE",
                    "REGION",
                    "PROVIDER",
                    "GPUS",
                    "GPU UTIL",
                    "GPU MEM",
                    "LAST SEEN",
                ],
                agents.iter().map(agent_row).collect(),
            );
            Ok(())
        }
        Command::Agents { cmd: Some(AgentsCmd::Show { name }) } => {
            let d: AgentDetail =
                client(&cli.conn)?.get_json(&format!("/api/v1/agents/{name}")).await?;
            if cli.output == Output::Json {
                return print_json(&d);
            }
            let a = &d.agent;
            outln!("name:         {}", a.name);
            outln!("identity:     {}", a.spiffe_id);
            outln!("state:        {}", a.state.as_str());
            outln!("region:       {}", dash(&a.region));
            outln!("jurisdiction: {}", dash(&a.jurisdiction));
            outln!("provider:     {}", dash(&a.provider));
            outln!(
                "host:         {} ({}, kernel {})",
                dash(&a.hostname),
                dash(&a.os),
                dash(&a.kernel)
            );
            outln!("agent:        {}  gpu source: {}", dash(&a.agent_version), a.gpu_source);
            outln!("first seen:   {}", a.first_seen);
            outln!("last seen:    {} ({})", a.last_seen, ago(a.last_seen_unix_ms));
            outln!("cert serial:  {}", d.cert_serial);
            if let Some(h) = &a.host {
                outln!(
                    "cpu:          {:.1}%  load {:.2} {:.2} {:.2}  mem {}/{} GiB",
                    h.cpu_utilization_percent,
                    h.load_1,
                    h.load_5,
                    h.load_15,
                    gib(h.memory_used_bytes),
                    gib(h.memory_total_bytes)
                );
            }
            outln!("history:      {} points", d.history.len());
            outln!("");
            table(&GPU_HEADERS, gpu_rows(&a.gpus));
            if !d.recent_events.is_empty() {
                outln!("\nrecent GPU events:");
                for e in &d.recent_events {
                    outln!(
                        "  {} {} {:?}",
                        fleetmesh_coordinator::views::rfc3339_ms(e.at_unix_ms),
                        e.uuid,
                        e.kind
                    );
                }
            }
            Ok(())
        }
        Command::Gpus => {
            let gpus: Vec<GpuView> = client(&cli.conn)?.get_json("/api/v1/gpus").await?;
            if cli.output == Output::Json {
                return print_json(&gpus);
            }
            table(&GPU_HEADERS, gpu_rows(&gpus));
            Ok(())
        }
        Command::Agents { cmd: Some(AgentsCmd::Revoke { name, reason }) } => {
            revoke(&cli.conn, "agent", &name, reason).await
        }
        Command::Agents { cmd: Some(AgentsCmd::Drain { name, undo }) } => {
            let _: serde_json::Value = client(&cli.conn)?
                .post_json(
                    &format!("/api/v1/agents/{name}/drain"),
                    &serde_json::json!({ "draining": !undo }),
                )
                .await?;
            outln!(
                "{name}: {}",
                if undo {
                    "accepting new jobs again"
                } else {
                    "draining (no new jobs; running jobs finish)"
                }
            );
            Ok(())
        }
        Command::Submit { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Validate locally first for a fast, precise error; the coordinator validates again.
            fleetmesh_protocol::workflow::parse(&text)
                .map_err(|e| anyhow!("{}: {e}", file.display()))?;
            let r: serde_json::Value =
                client(&cli.conn)?.post_raw("/api/v1/workflows", text.into_bytes()).await?;
            if cli.output == Output::Json {
                return print_json(&r);
            }
            outln!("{}", r["id"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Run { gpus, command } => {
            let argv: Vec<String> =
                command.iter().map(|a| serde_json::Value::String(a.clone()).to_string()).collect();
            let yaml = format!(
                "name: run\njobs:\n  main:\n    command: [{}]\n    resources: {{ gpus: {gpus} }}\n",
                argv.join(", ")
            );
            let r: serde_json::Value =
                client(&cli.conn)?.post_raw("/api/v1/workflows", yaml.into_bytes()).await?;
            let id = r["id"].as_str().unwrap_or_default();
            if cli.output == Output::Json {
                return print_json(
                    &serde_json::json!({ "workflow": id, "job": format!("{id}.main") }),
                );
            }
            outln!("{id}.main");
            Ok(())
        }
        Command::Workflows => {
            let list: Vec<serde_json::Value> =
                client(&cli.conn)?.get_json("/api/v1/workflows").await?;
            if cli.output == Output::Json {
                return print_json(&list);
            }
            let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("-").to_string();
            table(
                &["ID", "STATE", "JOBS", "SUBMITTED"],
                list.iter()
                    .map(|w| {
                        vec![
                            s(w, "id"),
                            s(w, "state"),
                            w["jobs"].as_u64().unwrap_or(0).to_string(),
                            fleetmesh_coordinator::views::rfc3339_ms(
                                w["submitted_unix_ms"].as_u64().unwrap_or(0),
                            ),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        Command::Jobs { workflow, cmd: None } => {
            let path = match &workflow {
                Some(w) => format!("/api/v1/jobs?workflow={w}"),
                None => "/api/v1/jobs".into(),
            };
            let list: Vec<serde_json::Value> = client(&cli.conn)?.get_json(&path).await?;
            if cli.output == Output::Json {
                return print_json(&list);
            }
            let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("-").to_string();
            table(
                &["JOB", "STATE", "ATTEMPTS", "AGENTS", "COST", "LAST EVENT"],
                list.iter()
                    .map(|j| {
                        let agents: Vec<&str> = j["agents"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                            .unwrap_or_default();
                        vec![
                            s(j, "id"),
                            s(j, "state"),
                            j["attempts"].to_string(),
                            if agents.is_empty() { "-".into() } else { agents.join(",") },
                            format!("{:.4}", j["cost"].as_f64().unwrap_or(0.0)),
                            s(j, "reason"),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        Command::Jobs { cmd: Some(JobsCmd::Show { id }), .. } => {
            let j: serde_json::Value =
                client(&cli.conn)?.get_json(&format!("/api/v1/jobs/{id}")).await?;
            if cli.output == Output::Json {
                return print_json(&j);
            }
            outln!("job:      {}", j["id"].as_str().unwrap_or_default());
            outln!("state:    {}", j["state"].as_str().unwrap_or_default());
            outln!("cost:     {:.6}", j["cost"].as_f64().unwrap_or(0.0));
            if let Some(rs) = j["queued_reasons"].as_array().filter(|r| !r.is_empty()) {
                outln!("not placed because:");
                for r in rs {
                    outln!("  {}", r.as_str().unwrap_or_default());
                }
            }
            outln!("history:");
            for h in j["history"].as_array().cloned().unwrap_or_default() {
                outln!(
                    "  {}  {:<10} {}",
                    fleetmesh_coordinator::views::rfc3339_ms(h[0].as_u64().unwrap_or(0)),
                    h[1].as_str().unwrap_or_default(),
                    h[2].as_str().unwrap_or_default()
                );
            }
            outln!("attempts:");
            for a in j["attempts"].as_array().cloned().unwrap_or_default() {
                outln!(
                    "  #{} {} on {} gpus={} cost={:.6} outcome={} bids={}",
                    a["n"],
                    a["state"].as_str().unwrap_or_default(),
                    a["agents"],
                    a["gpus"],
                    a["cost"].as_f64().unwrap_or(0.0),
                    a["outcomes"],
                    a["bids"].as_array().map(|b| b.len()).unwrap_or(0)
                );
            }
            Ok(())
        }
        Command::Logs { job, follow } => {
            let c = client(&cli.conn)?;
            let mut offset = 0usize;
            loop {
                let chunk: serde_json::Value =
                    c.get_json(&format!("/api/v1/jobs/{job}/logs?offset={offset}")).await?;
                let data = chunk["data"].as_str().unwrap_or_default();
                if !data.is_empty() && std::io::stdout().write_all(data.as_bytes()).is_err() {
                    std::process::exit(0);
                }
                offset = chunk["next_offset"].as_u64().unwrap_or(offset as u64) as usize;
                if !follow || chunk["finished"].as_bool().unwrap_or(true) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Command::Cancel { id } => {
            let path = if id.contains('.') {
                format!("/api/v1/jobs/{id}/cancel")
            } else {
                format!("/api/v1/workflows/{id}/cancel")
            };
            let r: serde_json::Value =
                client(&cli.conn)?.post_json(&path, &serde_json::json!({})).await?;
            outln!("cancelled {} job(s)", r["cancelled_jobs"]);
            Ok(())
        }
        Command::Tokens { cmd } => tokens(&cli.conn, cli.output, cmd).await,
        Command::Revoke { kind, name, reason } => revoke(&cli.conn, &kind, &name, reason).await,
        Command::Data { cmd } => data(&cli.conn, cli.output, cmd).await,
        Command::Audit => {
            let log: Vec<serde_json::Value> = client(&cli.conn)?.get_json("/api/v1/audit").await?;
            if cli.output == Output::Json {
                return print_json(&log);
            }
            let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("-").to_string();
            table(
                &["TIME", "EVENT", "ACTOR", "AGENT", "TOKEN", "SERIAL", "DETAIL"],
                log.iter()
                    .map(|a| {
                        vec![
                            fleetmesh_coordinator::views::rfc3339_ms(
                                a["at_unix_ms"].as_u64().unwrap_or(0),
                            ),
                            s(a, "event"),
                            s(a, "actor"),
                            s(a, "agent"),
                            s(a, "token_id"),
                            s(a, "serial"),
                            s(a, "detail"),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        Command::Metrics => {
            let text = client(&cli.conn)?.get_text("/metrics").await?;
            if std::io::stdout().write_all(text.as_bytes()).is_err() {
                std::process::exit(0);
            }
            Ok(())
        }
    }
}

/// Deny an identity of `kind` on every port (`agents revoke` and `revoke` both land here).
async fn revoke(conn: &ConnArgs, kind: &str, name: &str, reason: Option<String>) -> Result<()> {
    let body = serde_json::json!({ "reason": reason });
    let _: serde_json::Value =
        client(conn)?.post_json(&format!("/api/v1/identities/{kind}/{name}/revoke"), &body).await?;
    if kind == "agent" {
        outln!("revoked agent {name}: its session is closed and its certificates are denied");
    } else {
        outln!("revoked {kind} {name}: its certificates are denied on every port");
    }
    Ok(())
}

async fn tokens(conn: &ConnArgs, output: Output, cmd: TokensCmd) -> Result<()> {
    let c = client(conn)?;
    match cmd {
        TokensCmd::Create {
            region,
            jurisdiction,
            provider,
            labels,
            name,
            uses,
            ttl,
            coordinators,
        } => {
            let mut map = serde_json::Map::new();
            for l in labels {
                let (k, v) =
                    l.split_once('=').ok_or_else(|| anyhow!("label {l:?} is not key=value"))?;
                map.insert(k.to_string(), serde_json::Value::String(v.to_string()));
            }
            let spec = serde_json::json!({
                "region": region, "jurisdiction": jurisdiction, "provider": provider,
                "labels": map, "name": name, "uses": uses, "ttl": ttl, "coordinators": coordinators,
            });
            let created: serde_json::Value = c.post_json("/api/v1/tokens", &spec).await?;
            if output == Output::Json {
                return print_json(&created);
            }
            outln!("{}", created["join"].as_str().unwrap_or_default());
            eprintln!(
                "token {} allows {} enrollment(s) until {}; on a node: fleetmesh-agent --join '<the line above>'",
                created["id"].as_str().unwrap_or("?"),
                created["uses"],
                created["expires"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        TokensCmd::Ls => {
            let list: Vec<serde_json::Value> = c.get_json("/api/v1/tokens").await?;
            if output == Output::Json {
                return print_json(&list);
            }
            let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("-").to_string();
            table(
                &["ID", "STATUS", "USES", "NAME", "REGION", "JURISDICTION", "PROVIDER", "EXPIRES"],
                list.iter()
                    .map(|t| {
                        vec![
                            s(t, "id"),
                            s(t, "status"),
                            format!("{}/{}", t["uses"], t["max_uses"]),
                            s(t, "name"),
                            s(t, "region"),
                            s(t, "jurisdiction"),
                            s(t, "provider"),
                            s(t, "expires"),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        TokensCmd::Revoke { id } => {
            let _: serde_json::Value =
                c.post_json(&format!("/api/v1/tokens/{id}/revoke"), &serde_json::json!({})).await?;
            outln!("revoked token {id}");
            Ok(())
        }
    }
}

fn certs(cmd: CertsCmd) -> Result<()> {
    match cmd {
        CertsCmd::Init { dir, trust_domain } => {
            let ca = Ca::init_dir(&dir, &trust_domain)?;
            outln!("created CA for trust domain {trust_domain}");
            outln!("  {}", dir.join("ca.pem").display());
            outln!("  {} (private, 0600: keep it off the nodes)", dir.join("ca.key").display());
            outln!("  sha256 fingerprint: {}", ca.fingerprint());
            Ok(())
        }
        CertsCmd::Issue {
            dir,
            kind,
            name,
            region,
            jurisdiction,
            provider,
            ttl,
            mut dns,
            mut ip,
        } => {
            let ttl: Duration =
                humantime::parse_duration(&ttl).with_context(|| format!("--ttl {ttl:?}"))?;
            let ca = Ca::load_dir(&dir)?;
            if kind == PeerKind::Coordinator && dns.is_empty() && ip.is_empty() {
                dns.push("localhost".into());
                ip.push(IpAddr::from([127, 0, 0, 1]));
                ip.push("::1".parse()?);
            }
            let mut req = IssueRequest::new(kind, name, ttl);
            req.attributes = Attributes { region, jurisdiction, provider, ..Default::default() };
            req.dns_names = dns;
            req.ips = ip;
            let (cert, key) = ca.issue_to_dir(&dir, &req)?;
            outln!(
                "issued spiffe://{}/{}/{} (valid {})",
                ca.trust_domain,
                kind,
                req.name,
                humantime::format_duration(ttl)
            );
            outln!("  {}", cert.display());
            outln!("  {} (private, 0600)", key.display());
            Ok(())
        }
    }
}

fn bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

/// Wait until `agent` reports how its fetch of `id` ended.
async fn wait_fetch(c: &ApiClient, id: &str, agent: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let d: serde_json::Value = c.get_json(&format!("/api/v1/data/{id}")).await?;
        if let Some(f) = d["fetches"].get(agent) {
            if f["ok"].as_bool() == Some(true) {
                outln!(
                    "{agent} holds {} ({} chunk(s) fetched, {} already there)",
                    fleetmesh_protocol::data::short(id),
                    f["fetched_chunks"],
                    f["reused_chunks"]
                );
                return Ok(());
            }
            bail!("{agent} could not fetch it: {}", f["detail"].as_str().unwrap_or("?"));
        }
        if std::time::Instant::now() > deadline {
            bail!("{agent} has not reported its fetch after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn data(conn: &ConnArgs, output: Output, cmd: DataCmd) -> Result<()> {
    let c = client(conn)?;
    match cmd {
        DataCmd::Put { path, name, jurisdictions, on, chunk_size, loosen_residency } => {
            let chunk_size = fleetmesh_protocol::workflow::parse_size(&chunk_size)
                .map_err(|e| anyhow!("--chunk-size: {e}"))?;
            if chunk_size == 0 || chunk_size > u64::from(fleetmesh_protocol::data::MAX_CHUNK_SIZE) {
                bail!("--chunk-size must be between 1 byte and 64MiB");
            }
            std::fs::symlink_metadata(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let name = match name {
                Some(n) => n,
                None => path
                    .canonicalize()
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .ok_or_else(|| anyhow!("give the dataset a --name"))?,
            };
            let total: u64 = fleetmesh_data::dataset::list_files(&path)?
                .iter()
                .filter_map(|(_, p)| std::fs::metadata(p).ok().map(|m| m.len()))
                .sum();
            let pb = bar(total, "hashing");
            let p2 = path.clone();
            let pbc = pb.clone();
            let manifest = tokio::task::spawn_blocking(move || {
                fleetmesh_data::dataset::scan(&p2, chunk_size as u32, |n| pbc.inc(n))
            })
            .await??;
            pb.finish_and_clear();
            let all: Vec<String> = manifest
                .unique_chunks()
                .iter()
                .map(|(h, _)| fleetmesh_protocol::data::hash_hex(h))
                .collect();
            let missing: Vec<String> = c.post_json("/api/v1/data/missing", &all).await?;
            let missing: std::collections::HashSet<String> = missing.into_iter().collect();
            let pb = bar(total, "uploading");
            // Read chunks on a blocking thread, upload them from here.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Vec<u8>)>(4);
            let (p2, m2) = (path.clone(), manifest.clone());
            let reader = tokio::task::spawn_blocking(move || {
                fleetmesh_data::dataset::for_each_chunk(&p2, &m2, |h, b| {
                    tx.blocking_send((fleetmesh_protocol::data::hash_hex(h), b.to_vec()))
                        .map_err(|_| fleetmesh_data::StoreError::Other("upload stopped".into()))
                })
            });
            let mut sent = std::collections::HashSet::new();
            while let Some((h, bytes)) = rx.recv().await {
                let n = bytes.len() as u64;
                if missing.contains(&h) && sent.insert(h.clone()) {
                    let (status, body) =
                        c.request("PUT", &format!("/api/v1/data/chunks/{h}"), Some(bytes)).await?;
                    if !(200..300).contains(&status) {
                        bail!(
                            "upload of chunk {h} refused ({status}): {}",
                            String::from_utf8_lossy(&body)
                        );
                    }
                }
                pb.inc(n);
            }
            reader.await??;
            pb.finish_and_clear();
            let rec: serde_json::Value = c
                .post_json(
                    "/api/v1/data",
                    &serde_json::json!({
                        "name": name, "jurisdictions": jurisdictions,
                        "manifest": manifest, "on": on, "loosen_residency": loosen_residency,
                    }),
                )
                .await?;
            let id = rec["id"].as_str().unwrap_or_default().to_string();
            if output == Output::Json {
                print_json(&rec)?;
            } else {
                outln!(
                    "dataset {name}@{} {id}: {} in {} file(s), {} chunk(s) uploaded, {} already stored",
                    rec["version"],
                    human_bytes(total),
                    manifest.files.len(),
                    sent.len(),
                    all.len() - sent.len()
                );
            }
            if let Some(agent) = on {
                wait_fetch(&c, &id, &agent).await?;
            }
            Ok(())
        }
        DataCmd::Ls => {
            let list: Vec<serde_json::Value> = c.get_json("/api/v1/data").await?;
            if output == Output::Json {
                return print_json(&list);
            }
            let s = |v: &serde_json::Value| {
                v.as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                    .filter(|x| !x.is_empty())
                    .unwrap_or_else(|| "-".into())
            };
            table(
                &["NAME", "VERSION", "ID", "SIZE", "FILES", "RESIDENCY", "HOLDERS", "PARTIAL"],
                list.iter()
                    .map(|d| {
                        let id = d["id"].as_str().unwrap_or_default();
                        vec![
                            d["name"].as_str().unwrap_or_default().to_string(),
                            d["version"].to_string(),
                            fleetmesh_protocol::data::short(id).to_string(),
                            human_bytes(d["bytes"].as_u64().unwrap_or(0)),
                            d["files"].to_string(),
                            s(&d["jurisdictions"]),
                            s(&d["complete_holders"]),
                            s(&d["partial_holders"]),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        DataCmd::Show { dataset } => {
            let mut d: serde_json::Value = c.get_json(&format!("/api/v1/data/{dataset}")).await?;
            if output == Output::Json {
                return print_json(&d);
            }
            if let Some(o) = d.as_object_mut() {
                o.remove("manifest");
            }
            outln!("name:        {}", d["name"].as_str().unwrap_or_default());
            outln!("id:          {}", d["id"].as_str().unwrap_or_default());
            outln!(
                "size:        {} in {} file(s), {} chunk(s)",
                human_bytes(d["bytes"].as_u64().unwrap_or(0)),
                d["files"],
                d["chunks"]
            );
            let res = d["jurisdictions"].as_array().map(|a| a.len()).unwrap_or(0);
            outln!(
                "residency:   {}",
                if res == 0 { "anywhere".to_string() } else { d["jurisdictions"].to_string() }
            );
            if let Some(p) = d["producer"].as_str() {
                outln!("produced by: {p}");
            }
            outln!("holders:");
            if let Some(h) = d["holders"].as_object() {
                for (name, st) in h {
                    outln!(
                        "  {name:<24} {} {}",
                        if st["complete"].as_bool() == Some(true) {
                            "complete"
                        } else {
                            "partial "
                        },
                        human_bytes(st["bytes_present"].as_u64().unwrap_or(0))
                    );
                }
            }
            if let Some(f) = d["fetches"].as_object().filter(|f| !f.is_empty()) {
                outln!("fetches:");
                for (agent, r) in f {
                    outln!(
                        "  {agent:<24} {} fetched={} reused={} {}",
                        if r["ok"].as_bool() == Some(true) { "ok" } else { "FAILED" },
                        r["fetched_chunks"],
                        r["reused_chunks"],
                        r["detail"].as_str().unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        DataCmd::Get { dataset, dest } => {
            // The coordinator brings the dataset into its own store first (from agents).
            let d: serde_json::Value = c
                .post_json(&format!("/api/v1/data/{dataset}/stage"), &serde_json::json!({}))
                .await?;
            let manifest: fleetmesh_protocol::data::Manifest =
                serde_json::from_value(d["manifest"].clone())
                    .context("coordinator sent an unreadable manifest")?;
            let id = d["id"].as_str().unwrap_or_default();
            if manifest.id() != id {
                bail!("manifest does not match dataset id {id}");
            }
            manifest.validate()?;
            let pb = bar(manifest.total_bytes(), "downloading");
            for f in &manifest.files {
                let p = dest.join(&f.path);
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
                let mut out = std::fs::File::create(&p)
                    .with_context(|| format!("creating {}", p.display()))?;
                for h in &f.chunks {
                    let hex = fleetmesh_protocol::data::hash_hex(h);
                    let (status, body) = c.get(&format!("/api/v1/data/chunks/{hex}")).await?;
                    if status != 200 {
                        bail!("chunk {hex}: {}", String::from_utf8_lossy(&body));
                    }
                    if &fleetmesh_protocol::data::hash_bytes(&body) != h {
                        bail!("chunk {hex} failed verification");
                    }
                    out.write_all(&body).with_context(|| format!("writing {}", p.display()))?;
                    pb.inc(body.len() as u64);
                }
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(
                    &p,
                    std::fs::Permissions::from_mode(
                        f.mode & fleetmesh_protocol::data::PERMISSION_BITS,
                    ),
                );
            }
            pb.finish_and_clear();
            outln!(
                "{} ({}) -> {}: {} in {} file(s), every chunk verified",
                d["name"].as_str().unwrap_or_default(),
                fleetmesh_protocol::data::short(id),
                dest.display(),
                human_bytes(manifest.total_bytes()),
                manifest.files.len()
            );
            Ok(())
        }
        DataCmd::Place { dataset, agent } => {
            let r: serde_json::Value = c
                .post_json(
                    &format!("/api/v1/data/{dataset}/place"),
                    &serde_json::json!({ "agent": agent }),
                )
                .await?;
            let id = r["dataset"].as_str().unwrap_or_default().to_string();
            wait_fetch(&c, &id, &agent).await
        }
        DataCmd::Rm { dataset } => {
            let r: serde_json::Value =
                c.post_json(&format!("/api/v1/data/{dataset}/rm"), &serde_json::json!({})).await?;
            outln!("removed {} (holders told: {})", r["removed"], r["holders_told"]);
            Ok(())
        }
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
        Err(e) => {
            eprintln!("fleetmesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}
