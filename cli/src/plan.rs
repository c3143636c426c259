//! `fleetmesh plan FILE`: a dry run of a workflow, like `nomad job plan`. It validates
//! the file, then shows for each job where it would go, at what price and ETA, what its
//! inputs move and from where, and why anything would wait. Nothing is submitted or
//! reserved. Exit codes: 0 all placeable now, 2 something would wait, 1 invalid file.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use fleetmesh_api::plan::{JobPlan, Plan};

use crate::conn::ConnArgs;
use crate::output::{human_bytes, list, print_json, table, Output};

/// The plan's verdict when something would wait (exit code 2).
#[derive(Debug)]
pub struct WouldWait(pub usize);

impl std::fmt::Display for WouldWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} job(s) would wait", self.0)
    }
}

impl std::error::Error for WouldWait {}

pub async fn plan(conn: &ConnArgs, out: Output, file: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    fleetmesh_protocol::workflow::parse(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let p: Plan = conn.client()?.post_raw("/api/v1/plan", text.into_bytes()).await?;
    if out == Output::Json {
        print_json(&p)?;
    } else {
        print_plan(&p);
    }
    let waiting = p.jobs.iter().filter(|j| !j.waits.is_empty()).count();
    if waiting > 0 {
        return Err(WouldWait(waiting).into());
    }
    Ok(())
}

fn print_plan(p: &Plan) {
    outln!(
        "workflow {} (objective {}): expected cost {:.4}",
        p.workflow,
        p.objective,
        p.expected_cost
    );
    let row = |j: &JobPlan| {
        let best = j.offers.first();
        vec![
            j.job.clone(),
            j.members.to_string(),
            list(&j.placement),
            best.map_or("-".into(), |o| format!("{:.4}", o.price)),
            best.map_or("-".into(), |o| format!("{}ms", o.eta_ms)),
            format!("{:.4}", j.expected_cost),
            if j.waits.is_empty() { "now".into() } else { "waits".into() },
        ]
    };
    table(
        &["JOB", "MEMBERS", "PLACEMENT", "PRICE", "ETA", "COST", "STARTS"],
        p.jobs.iter().map(row).collect(),
    );
    for j in &p.jobs {
        print_job(j);
    }
}

fn print_job(j: &JobPlan) {
    outln!("\n{}:", j.job);
    if !j.residency.is_empty() {
        outln!("  residency: may run only in {}", j.residency.join(", "));
    }
    for i in &j.inputs {
        let bytes = i.bytes.map_or("size known once produced".into(), human_bytes);
        let shard = if i.sharded { " (one shard per member)" } else { "" };
        outln!("  input {} <- {}: {bytes}{shard} from {}", i.mount, i.from, list(&i.holders));
    }
    for o in &j.offers {
        outln!(
            "  offer {}: price {:.4}, eta {}ms, holds {} of the inputs, load {:.0}%, room for {}",
            o.agent,
            o.price,
            o.eta_ms,
            human_bytes(o.local_bytes),
            o.load * 100.0,
            o.room
        );
    }
    if !j.also_eligible.is_empty() {
        outln!("  also eligible (not asked): {}", j.also_eligible.join(", "));
    }
    for r in &j.refused {
        outln!("  not {r}");
    }
    for w in &j.waits {
        outln!("  WAITS: {w}");
    }
}
