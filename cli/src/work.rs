//! `fleetmesh submit|run|workflows|jobs|logs|cancel`: workflows and their jobs.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use fleetmesh_api::answers::{Cancelled, Submitted};
use fleetmesh_api::client::segment;
use fleetmesh_api::jobs::{JobPage, JobRecord, JobSummary, LogChunk, WorkflowSummary};
use fleetmesh_api::rfc3339_ms;

use crate::conn::ConnArgs;
use crate::output::{list, print_json, print_raw, table, Output};

/// How often `logs --follow` asks for more.
const FOLLOW_POLL: Duration = Duration::from_millis(300);

/// Which jobs `fleetmesh jobs` lists.
#[derive(Args, Debug)]
pub struct JobsFilter {
    /// Only this workflow's jobs.
    #[arg(long)]
    pub workflow: Option<String>,
    /// The members of this array job (`WORKFLOW.JOB`) instead of the top-level jobs.
    #[arg(long)]
    pub array: Option<String>,
    /// Show at most this many (the API is read page by page).
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum JobsCmd {
    /// State history, attempts, agents, bids and cost of one job.
    Show { id: String },
}

pub async fn submit(conn: &ConnArgs, out: Output, file: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    // Validate locally first for a fast, precise error; the coordinator validates again.
    fleetmesh_protocol::workflow::parse(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let r: Submitted = conn.client()?.post_raw("/api/v1/workflows", text.into_bytes()).await?;
    if out == Output::Json {
        return print_json(&r);
    }
    outln!("{}", r.id);
    Ok(())
}

/// A one-job workflow running `command` (its job id is printed).
pub async fn run_one(conn: &ConnArgs, out: Output, gpus: u32, command: &[String]) -> Result<()> {
    let argv: Vec<String> =
        command.iter().map(|a| serde_json::Value::String(a.clone()).to_string()).collect();
    let yaml = format!(
        "name: run\njobs:\n  main:\n    command: [{}]\n    resources: {{ gpus: {gpus} }}\n",
        argv.join(", ")
    );
    let r: Submitted = conn.client()?.post_raw("/api/v1/workflows", yaml.into_bytes()).await?;
    if out == Output::Json {
        return print_json(
            &serde_json::json!({ "workflow": r.id, "job": format!("{}.main", r.id) }),
        );
    }
    outln!("{}.main", r.id);
    Ok(())
}

pub async fn workflows(conn: &ConnArgs, out: Output) -> Result<()> {
    let list: Vec<WorkflowSummary> = conn.client()?.get_json("/api/v1/workflows").await?;
    if out == Output::Json {
        return print_json(&list);
    }
    let row = |w: &WorkflowSummary| {
        vec![
            w.id.clone(),
            w.state.as_str().to_string(),
            w.jobs.to_string(),
            format!("{:.4}", w.cost),
            rfc3339_ms(w.submitted_unix_ms),
        ]
    };
    table(&["ID", "STATE", "JOBS", "COST", "SUBMITTED"], list.iter().map(row).collect());
    Ok(())
}

/// Every job the filter names, following the API's pages (up to `limit`).
async fn job_pages(conn: &ConnArgs, f: &JobsFilter) -> Result<Vec<JobSummary>> {
    let c = conn.client()?;
    let mut query: Vec<String> = Vec::new();
    if let Some(w) = &f.workflow {
        query.push(format!("workflow={}", segment(w)));
    }
    if let Some(a) = &f.array {
        query.push(format!("array={}", segment(a)));
    }
    let want = f.limit.unwrap_or(usize::MAX);
    let mut jobs = Vec::new();
    let mut after: Option<String> = None;
    while jobs.len() < want {
        let mut q = query.clone();
        q.extend(after.as_ref().map(|a| format!("after={}", segment(a))));
        let page: JobPage = c.get_json(&format!("/api/v1/jobs?{}", q.join("&"))).await?;
        jobs.extend(page.jobs);
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    jobs.truncate(want);
    Ok(jobs)
}

/// An array's members per state, e.g. `succeeded 190, failed 2, running 8`.
fn members_line(j: &JobSummary) -> String {
    let Some(m) = &j.members else { return "-".into() };
    let parts: Vec<String> = m.iter().map(|(s, n)| format!("{} {n}", s.as_str())).collect();
    parts.join(", ")
}

pub async fn jobs(conn: &ConnArgs, out: Output, filter: &JobsFilter) -> Result<()> {
    let jobs = job_pages(conn, filter).await?;
    if out == Output::Json {
        return print_json(&jobs);
    }
    let row = |j: &JobSummary| {
        vec![
            j.id.clone(),
            j.state.as_str().to_string(),
            j.attempts.to_string(),
            list(&j.agents),
            format!("{:.4}", j.cost),
            members_line(j),
            j.reason.clone().unwrap_or_else(|| "-".into()),
        ]
    };
    table(
        &["JOB", "STATE", "ATTEMPTS", "AGENTS", "COST", "MEMBERS", "LAST EVENT"],
        jobs.iter().map(row).collect(),
    );
    Ok(())
}

pub async fn show_job(conn: &ConnArgs, out: Output, id: &str) -> Result<()> {
    let j: JobRecord = conn.client()?.get_json(&format!("/api/v1/jobs/{}", segment(id))).await?;
    if out == Output::Json {
        return print_json(&j);
    }
    outln!("job:      {}", j.id);
    outln!("state:    {}", j.state.as_str());
    outln!("cost:     {:.6}", j.cost);
    if !j.queued_reasons.is_empty() {
        outln!("not placed because:");
        for r in &j.queued_reasons {
            outln!("  {r}");
        }
    }
    outln!("history:");
    for h in &j.history {
        outln!("  {}  {:<10} {}", rfc3339_ms(h.at_unix_ms), h.state.as_str(), h.detail);
    }
    outln!("attempts:");
    for a in &j.attempts {
        let outcomes: Vec<&str> =
            a.outcomes.iter().map(|o| o.as_deref().unwrap_or("running")).collect();
        outln!(
            "  #{} {} on {} gpus={:?} cost={:.6} outcome={} bids={}",
            a.n,
            a.state.as_str(),
            a.agents.join(","),
            a.gpus,
            a.cost,
            outcomes.join("; "),
            a.bids.len()
        );
    }
    Ok(())
}

pub async fn logs(conn: &ConnArgs, job: &str, follow: bool) -> Result<()> {
    let c = conn.client()?;
    let mut offset = 0usize;
    loop {
        let chunk: LogChunk =
            c.get_json(&format!("/api/v1/jobs/{}/logs?offset={offset}", segment(job))).await?;
        print_raw(&chunk.data);
        offset = chunk.next_offset;
        if !follow || chunk.finished {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

pub async fn cancel(conn: &ConnArgs, id: &str) -> Result<()> {
    // Job ids are WORKFLOW.JOB; workflow ids have no dot.
    let path = if id.contains('.') {
        format!("/api/v1/jobs/{}/cancel", segment(id))
    } else {
        format!("/api/v1/workflows/{}/cancel", segment(id))
    };
    let r: Cancelled = conn.client()?.post_json(&path, &serde_json::json!({})).await?;
    outln!("cancelled {} job(s)", r.cancelled_jobs);
    Ok(())
}
