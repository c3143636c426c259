//! `fleetmesh-bench burst`: elastic capacity from zero. A coordinator with one `local`
//! pool (`scripts/pools/local`: each node a real `fleetmesh-agent` process with
//! SIMULATED GPUs, joining with its single-use string), no node to start with, and one
//! array of N one-GPU jobs. It reports the nodes launched against the fewest that fit
//! the work, submit -> first job running and -> all done, the pool's own boot time
//! (launch -> join, measured by the coordinator) so that Fleetmesh's overhead beyond it
//! shows, and how long the idle nodes took to go once the work was done.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use fleetmesh_api::pools::PoolView;
use fleetmesh_integration::work::{self, JobState, WorkflowState};
use fleetmesh_integration::{bin, wait_for, CoordinatorProc, Pki};
use serde_json::json;

/// Idle time after which the pool's nodes are drained (then terminated).
const IDLE_TIMEOUT_S: u64 = 5;

fn pool_config(gpus_per_node: u32, max_nodes: usize, work: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let prog = root.join("scripts/pools/local").display().to_string();
    let agent = bin("fleetmesh-agent").display().to_string();
    let nodes = work.join("nodes").display().to_string();
    format!(
        r#"
[[pool]]
name = "local"
provider = "local"
region = "here"
gpus = "{gpus_per_node} x H100-80GB"
cpus = {gpus_per_node}
memory = "64GiB"
max-nodes = {max_nodes}
boot-timeout = "120s"
idle-timeout = "{IDLE_TIMEOUT_S}s"
launch = ["{prog}", "launch", "--agent", "{agent}", "--work", "{nodes}"]
terminate = ["{prog}", "terminate"]
"#
    )
}

async fn pools(client: &fleetmesh_coordinator::client::ApiClient) -> Vec<PoolView> {
    client.get_json("/api/v1/pools").await.unwrap_or_default()
}

pub async fn burst(jobs: u32, gpus_per_node: u32, job_seconds: f64) -> Result<()> {
    let pki = Pki::new("bench.local")?;
    let work = tempfile::tempdir()?;
    let needed = jobs.div_ceil(gpus_per_node.max(1)) as usize;
    // Twice what is needed is allowed: surplus nodes would show.
    let config = work.path().join("coordinator.toml");
    std::fs::write(&config, pool_config(gpus_per_node, needed * 2, work.path()))?;
    let key = pki.path().join("ca.key").display().to_string();
    let args = ["--ca-key", &key, "--config", config.to_str().unwrap_or_default()];
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &args).await?;
    let client = coord.client(&pki)?;
    let yaml = format!(
        "name: burst\njobs:\n  j:\n    parallel: {jobs}\n    resources: {{ gpus: 1, cpus: 1 }}\n    command: [sleep, \"{job_seconds}\"]\n"
    );
    eprintln!("submitting {jobs} one-GPU jobs to 0 nodes; pool nodes of {gpus_per_node} GPUs");
    let t0 = Instant::now();
    let wf = work::submit(&client, &yaml).await?;
    let array = format!("{wf}.j");
    let first = wait_for(Duration::from_secs(300), || async {
        let members = work::jobs(&client, &format!("array={array}")).await?;
        members.iter().any(|j| j.started_unix_ms.is_some()).then_some(t0.elapsed())
    })
    .await;
    let Some(first) = first else { bail!("no job started: {:#?}", pools(&client).await) };
    let done = wait_for(Duration::from_secs(600), || work::finished(&client, &wf)).await;
    let all_done = t0.elapsed();
    if done != Some(WorkflowState::Succeeded) {
        bail!("the workflow did not succeed: {done:?}");
    }
    let members = work::jobs(&client, &format!("array={array}")).await.unwrap_or_default();
    let succeeded = members.iter().filter(|j| j.state == JobState::Succeeded).count();
    let p = pools(&client).await.into_iter().next().unwrap_or_else(|| unreachable!("one pool"));
    let mut boot = p.history.boot_ms.clone();
    boot.sort_unstable();
    let boot_p50 = boot.get(boot.len() / 2).copied().unwrap_or(0);
    let (boot_min, boot_max) =
        (boot.first().copied().unwrap_or(0), boot.last().copied().unwrap_or(0));
    let job_ms = (job_seconds * 1000.0) as u64;
    // Launches whose program failed started no node.
    let launched = p.history.launches - p.history.launch_failures;
    let idle_from = Instant::now();
    let gone = wait_for(Duration::from_secs(120), || async {
        pools(&client).await.first().is_some_and(|p| p.nodes.is_empty()).then_some(())
    })
    .await;
    let scale_down = idle_from.elapsed();
    let out = json!({
        "bench": "burst",
        "jobs": jobs,
        "gpus_per_node": gpus_per_node,
        "job_seconds": job_seconds,
        "succeeded": succeeded,
        "nodes_launched": launched,
        "launch_failures": p.history.launch_failures,
        "nodes_needed": needed,
        "surplus_nodes": launched as i64 - needed as i64,
        "first_running_ms": first.as_millis() as u64,
        "all_done_ms": all_done.as_millis() as u64,
        "local_boot_min_ms": boot_min,
        "local_boot_p50_ms": boot_p50,
        "local_boot_max_ms": boot_max,
        // The first job can start once the first node has joined; the last ones once the
        // last node has and one job's time has passed.
        "overhead_first_ms": (first.as_millis() as u64).saturating_sub(boot_min),
        "overhead_all_ms": (all_done.as_millis() as u64).saturating_sub(boot_max + job_ms),
        "idle_timeout_s": IDLE_TIMEOUT_S,
        "scale_down_after_done_ms": gone.map(|_| scale_down.as_millis() as u64),
        "idle_gpu_hours": p.history.idle_gpu_hours,
    });
    // Kept for a look when a figure is off.
    let _ = std::fs::write(
        std::env::temp_dir().join("fleetmesh-burst-coordinator.log"),
        coord.log_text(),
    );
    println!("{out}");
    Ok(())
}
