//! `fleetmesh pools [show NAME]`: capacity pools, their nodes, launches, failures and
//! idle time.

use anyhow::{anyhow, Result};
use clap::Subcommand;
use fleetmesh_api::pools::{PoolSpec, PoolView};
use fleetmesh_api::rfc3339_ms;

use crate::conn::ConnArgs;
use crate::output::{dash, human_bytes, print_json, table, Output};

#[derive(Subcommand, Debug)]
pub enum PoolsCmd {
    /// One pool: its shape, nodes, launches and failures with their reasons.
    Show { name: String },
}

pub async fn run(conn: &ConnArgs, out: Output, cmd: Option<PoolsCmd>) -> Result<()> {
    let pools: Vec<PoolView> = conn.client()?.get_json("/api/v1/pools").await?;
    match cmd {
        None if out == Output::Json => print_json(&pools),
        None => {
            list(&pools);
            Ok(())
        }
        Some(PoolsCmd::Show { name }) => {
            let p = pools.into_iter().find(|p| p.spec.name == name);
            let p = p.ok_or_else(|| anyhow!("no pool {name:?}"))?;
            if out == Output::Json {
                return print_json(&p);
            }
            show(&p);
            Ok(())
        }
    }
}

/// `8 x H100-80GB`, or `CPU only`.
fn shape(s: &PoolSpec) -> String {
    match &s.gpu_model {
        Some(m) if s.gpus > 0 => format!("{} x {m}-{}", s.gpus, human_bytes(s.gpu_memory_bytes)),
        _ => "CPU only".into(),
    }
}

fn count(p: &PoolView, state: &str) -> usize {
    p.nodes.iter().filter(|n| format!("{:?}", n.state).to_lowercase() == state).count()
}

fn list(pools: &[PoolView]) {
    let row = |p: &PoolView| {
        let s = &p.spec;
        vec![
            s.name.clone(),
            format!("{}/{}", dash(&s.provider), dash(&s.region)),
            dash(&s.jurisdiction),
            shape(s),
            format!("{:.2}{}", s.price_per_hour, if s.spot { " spot" } else { "" }),
            format!("{}..{}", s.min_nodes, s.max_nodes),
            format!(
                "{} joined, {} booting",
                count(p, "joined") + count(p, "draining"),
                count(p, "booting") + count(p, "launching")
            ),
            format!("{} ({} failed)", p.history.launches, p.history.launch_failures),
            format!("{:.3}", p.history.idle_gpu_hours),
            format!("{:.4}", p.spend),
            if p.backing_off {
                format!("backing off: {}", dash(&p.history.last_failure))
            } else {
                "-".into()
            },
        ]
    };
    table(
        &[
            "POOL",
            "WHERE",
            "JURISDICTION",
            "NODE",
            "PRICE/H",
            "NODES",
            "NOW",
            "LAUNCHES",
            "IDLE GPU-H",
            "SPEND",
            "STATUS",
        ],
        pools.iter().map(row).collect(),
    );
}

fn show(p: &PoolView) {
    let s = &p.spec;
    outln!("pool:        {}", s.name);
    outln!("where:       {} {} ({})", dash(&s.provider), dash(&s.region), dash(&s.jurisdiction));
    outln!("node:        {}, {} CPUs, {}", shape(s), s.cpus, human_bytes(s.memory_bytes));
    outln!("price:       {:.4}/h{}", s.price_per_hour, if s.spot { ", spot" } else { "" });
    outln!(
        "nodes:       {} to {}; boot within {} s; idle after {} s",
        s.min_nodes,
        s.max_nodes,
        s.boot_timeout_ms / 1000,
        s.idle_timeout_ms / 1000
    );
    let h = &p.history;
    outln!(
        "launches:    {} ({} failed), {} terminated",
        h.launches,
        h.launch_failures,
        h.terminations
    );
    outln!("idle:        {:.4} GPU-hours, cost {:.4}", h.idle_gpu_hours, h.idle_cost);
    outln!("spend:       {:.4} (what attempts cost on its nodes)", p.spend);
    if let Some(f) = &h.last_failure {
        outln!(
            "last failure: {f}{}",
            if p.backing_off {
                format!(" (backing off until {})", rfc3339_ms(h.backoff_until_unix_ms))
            } else {
                String::new()
            }
        );
    }
    let row = |n: &fleetmesh_api::pools::PoolNode| {
        vec![
            n.name.clone(),
            format!("{:?}", n.state).to_lowercase(),
            dash(&n.instance),
            rfc3339_ms(n.launched_unix_ms),
            n.joined_unix_ms.map_or("-".into(), rfc3339_ms),
        ]
    };
    table(&["NODE", "STATE", "INSTANCE", "LAUNCHED", "JOINED"], p.nodes.iter().map(row).collect());
}
