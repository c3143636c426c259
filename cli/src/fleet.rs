//! `fleetmesh agents|gpus|metrics|audit|revoke`: the fleet and who may be in it.

use anyhow::Result;
use clap::Subcommand;
use fleetmesh_api::answers::{Drained, Revoked};
use fleetmesh_api::fleet::{AgentDetail, AgentView, GpuView};
use fleetmesh_api::rfc3339_ms;
use fleetmesh_api::trust::AuditRecord;

use crate::conn::ConnArgs;
use crate::output::{ago, dash, gib, print_json, print_raw, table, Output};

#[derive(Subcommand, Debug)]
pub enum AgentsCmd {
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

const AGENT_HEADERS: [&str; 9] =
    ["NAME", "STATE", "REGION", "PROVIDER", "POOL", "GPUS", "GPU UTIL", "GPU MEM", "LAST SEEN"];
const GPU_HEADERS: [&str; 8] = ["AGENT", "IDX", "NAME", "UUID", "UTIL", "MEMORY", "TEMP", "POWER"];

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
        dash(&a.pool),
        gpus,
        util,
        if total > 0 { format!("{}/{} GiB", gib(used), gib(total)) } else { "-".into() },
        ago(a.last_seen_unix_ms),
    ]
}

fn gpu_row(g: &GpuView) -> Vec<String> {
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    vec![
        g.agent.clone(),
        g.index.to_string(),
        if g.simulated { format!("{} [simulated]", g.name) } else { g.name.clone() },
        g.uuid.clone(),
        or_dash(g.utilization_gpu.map(|u| format!("{u}%"))),
        format!("{}/{} GiB", or_dash(g.memory_used_bytes.map(gib)), gib(g.memory_total_bytes)),
        or_dash(g.temperature_c.map(|t| format!("{t}C"))),
        or_dash(g.power_w.map(|p| format!("{p:.0}W"))),
    ]
}

pub async fn agents(conn: &ConnArgs, out: Output, cmd: Option<AgentsCmd>) -> Result<()> {
    match cmd {
        None => {
            let agents: Vec<AgentView> = conn.client()?.get_json("/api/v1/agents").await?;
            if out == Output::Json {
                return print_json(&agents);
            }
            table(&AGENT_HEADERS, agents.iter().map(agent_row).collect());
            Ok(())
        }
        Some(AgentsCmd::Show { name }) => {
            let d: AgentDetail = conn.client()?.get_json(&format!("/api/v1/agents/{name}")).await?;
            if out == Output::Json {
                return print_json(&d);
            }
            show_agent(&d);
            Ok(())
        }
        Some(AgentsCmd::Revoke { name, reason }) => revoke(conn, "agent", &name, reason).await,
        Some(AgentsCmd::Drain { name, undo }) => {
            let body = serde_json::json!({ "draining": !undo });
            let d: Drained =
                conn.client()?.post_json(&format!("/api/v1/agents/{name}/drain"), &body).await?;
            let what = if d.draining {
                "draining (no new jobs; running jobs finish)"
            } else {
                "accepting new jobs again"
            };
            outln!("{}: {what}", d.agent);
            Ok(())
        }
    }
}

fn show_agent(d: &AgentDetail) {
    let a = &d.agent;
    outln!("name:         {}", a.name);
    outln!("identity:     {}", a.spiffe_id);
    outln!("state:        {}", a.state.as_str());
    outln!("region:       {}", dash(&a.region));
    outln!("jurisdiction: {}", dash(&a.jurisdiction));
    outln!("provider:     {}", dash(&a.provider));
    outln!("host:         {} ({}, kernel {})", dash(&a.hostname), dash(&a.os), dash(&a.kernel));
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
    table(&GPU_HEADERS, a.gpus.iter().map(gpu_row).collect());
    if !d.recent_events.is_empty() {
        outln!("\nrecent GPU events:");
        for e in &d.recent_events {
            outln!("  {} {} {:?}", rfc3339_ms(e.at_unix_ms), e.uuid, e.kind);
        }
    }
}

pub async fn gpus(conn: &ConnArgs, out: Output) -> Result<()> {
    let gpus: Vec<GpuView> = conn.client()?.get_json("/api/v1/gpus").await?;
    if out == Output::Json {
        return print_json(&gpus);
    }
    table(&GPU_HEADERS, gpus.iter().map(gpu_row).collect());
    Ok(())
}

pub async fn metrics(conn: &ConnArgs) -> Result<()> {
    print_raw(&conn.client()?.get_text("/metrics").await?);
    Ok(())
}

pub async fn audit(conn: &ConnArgs, out: Output) -> Result<()> {
    let log: Vec<AuditRecord> = conn.client()?.get_json("/api/v1/audit").await?;
    if out == Output::Json {
        return print_json(&log);
    }
    let row = |a: &AuditRecord| {
        vec![
            rfc3339_ms(a.at_unix_ms),
            a.event.clone(),
            dash(&a.actor),
            dash(&a.agent),
            dash(&a.token_id),
            dash(&a.serial),
            a.detail.clone(),
        ]
    };
    table(
        &["TIME", "EVENT", "ACTOR", "AGENT", "TOKEN", "SERIAL", "DETAIL"],
        log.iter().map(row).collect(),
    );
    Ok(())
}

/// Deny an identity of `kind` on every port (`agents revoke` and `revoke` both land here).
pub async fn revoke(conn: &ConnArgs, kind: &str, name: &str, reason: Option<String>) -> Result<()> {
    let body = serde_json::json!({ "reason": reason });
    let r: Revoked = conn
        .client()?
        .post_json(&format!("/api/v1/identities/{kind}/{name}/revoke"), &body)
        .await?;
    if r.kind == fleetmesh_protocol::PeerKind::Agent {
        outln!(
            "revoked agent {}: its session is closed and its certificates are denied",
            r.revoked
        );
    } else {
        outln!("revoked {} {}: its certificates are denied on every port", r.kind, r.revoked);
    }
    Ok(())
}
