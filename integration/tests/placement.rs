//! Work placement and execution on a real local mesh: dependencies, logs and costs,
//! constraints and queued reasons, no double-booked GPU under concurrent auctions,
//! failover after `kill -9` of the agent running a job, gang placement.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleetmesh_api::answers::{Cancelled, Drained};
use fleetmesh_coordinator::client::ApiClient;
use fleetmesh_integration::work::{self, logs, AttemptState, JobRecord, JobState, WorkflowState};
use fleetmesh_integration::{agents, attrs, wait_for, AgentProc, CoordinatorProc, Netns, Pki};

async fn submit(client: &ApiClient, yaml: &str) -> anyhow::Result<String> {
    work::submit(client, yaml).await
}

async fn job(client: &ApiClient, id: &str) -> JobRecord {
    work::job(client, id).await.unwrap_or_else(|| panic!("no job {id}"))
}

async fn wait_state(client: &ApiClient, id: &str, state: JobState, secs: u64) -> JobRecord {
    work::wait_job(client, id, state, Duration::from_secs(secs)).await
}

async fn mesh_up(client: &ApiClient, n: usize) {
    wait_for(Duration::from_secs(10), || async {
        let a = agents(client).await;
        (a.len() >= n && a.iter().all(|a| a.host.is_some())).then_some(())
    })
    .await
    .expect("agents up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_job_workflow_runs_in_order_with_logs_and_costs() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _a = AgentProc::start_extra(
        &pki,
        coord.control,
        "a",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &["--price-per-hour", "2"],
        work.path(),
    )?;
    let _b = AgentProc::start_extra(
        &pki,
        coord.control,
        "b",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &["--price-per-hour", "3"],
        work.path(),
    )?;
    mesh_up(&client, 2).await;
    let wf = submit(
        &client,
        r#"
name: three
objective: cheapest
jobs:
  fetch:
    command: ["sh", "-c", "echo fetched-$FLEETMESH_JOB; sleep 0.3"]
  train:
    needs: [fetch]
    script: |
      echo "training attempt $FLEETMESH_ATTEMPT on [$CUDA_VISIBLE_DEVICES]"
      echo "to stderr" >&2
      sleep 0.3
    resources: { gpus: 1 }
  report:
    needs: [train]
    command: ["sh", "-c", "echo report-done"]
"#,
    )
    .await?;
    let report = wait_state(&client, &format!("{wf}.report"), JobState::Succeeded, 20).await;
    let fetch = job(&client, &format!("{wf}.fetch")).await;
    let train = job(&client, &format!("{wf}.train")).await;
    // Order: each job started after the one it needs ended.
    let ended = |j: &JobRecord| j.attempts[0].ended_unix_ms.expect("ended");
    let started = |j: &JobRecord| j.attempts[0].started_unix_ms.expect("started");
    assert!(ended(&fetch) <= started(&train), "train started before fetch ended");
    assert!(ended(&train) <= started(&report), "report started before train ended");
    // Logs through the coordinator.
    assert_eq!(logs(&client, &format!("{wf}.fetch")).await.trim(), format!("fetched-{wf}.fetch"));
    let tl = logs(&client, &format!("{wf}.train")).await;
    assert!(tl.contains("training attempt 1 on [GPU-"), "{tl}");
    assert!(tl.contains("to stderr"), "{tl}");
    assert_eq!(logs(&client, &format!("{wf}.report")).await.trim(), "report-done");
    // Costs: price x duration on the cheapest agent.
    for j in [&fetch, &train, &report] {
        assert_eq!(j.attempts[0].agents[0], "a", "objective cheapest should pick a: {j:?}");
        assert!(j.cost > 0.0, "no cost recorded: {j:?}");
    }
    // The cost is the agent's price x the run time it measured: at least the 0.3 s the
    // job slept, at most the span the coordinator saw (plus slack for clock steps).
    let fetch_cost = fetch.cost;
    let fetch_ms = (ended(&fetch) - started(&fetch)) as f64;
    assert!(
        fetch_cost >= 2.0 * 300.0 / 3.6e6 && fetch_cost <= 2.0 * (fetch_ms + 100.0) / 3.6e6,
        "cost {fetch_cost} for a 0.3 s job seen as {fetch_ms} ms at 2/h"
    );
    let finished =
        wait_for(Duration::from_secs(5), || async { work::finished(&client, &wf).await }).await;
    assert_eq!(finished, Some(WorkflowState::Succeeded));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraints_place_jobs_only_where_allowed_and_impossible_jobs_wait_with_reasons(
) -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _eu = AgentProc::start_extra(
        &pki,
        coord.control,
        "eu-h100",
        attrs("eu-west-1", "EU", "aws"),
        Some("2xH100-80GB"),
        &[],
        work.path(),
    )?;
    let _us = AgentProc::start_extra(
        &pki,
        coord.control,
        "us-l4",
        attrs("us-east-1", "US", "gcp"),
        Some("2xL4-24GB"),
        &["--spot"],
        work.path(),
    )?;
    mesh_up(&client, 2).await;
    let wf = submit(
        &client,
        r#"
name: constrained
jobs:
  eu-only:
    command: [true]
    constraints: { jurisdictions: [EU] }
  l4:
    command: [true]
    resources: { gpus: 1, gpu_model: "*L4*" }
  spot-only:
    command: [true]
    constraints: { spot: only }
  no-spot:
    command: [true]
    resources: { gpus: 1 }
    constraints: { spot: forbidden }
  big-memory:
    command: [true]
    resources: { gpus: 1, gpu_memory: 60GiB }
  india:
    command: ["sh", "-c", "echo finally"]
    constraints: { regions: [ap-south-1] }
"#,
    )
    .await?;
    for (j, agent) in [
        ("eu-only", "eu-h100"),
        ("l4", "us-l4"),
        ("spot-only", "us-l4"),
        ("no-spot", "eu-h100"),
        ("big-memory", "eu-h100"),
    ] {
        let done = wait_state(&client, &format!("{wf}.{j}"), JobState::Succeeded, 15).await;
        assert_eq!(done.attempts[0].agents[0], agent, "{j:?} ran on the wrong agent: {done:?}");
    }
    let india = job(&client, &format!("{wf}.india")).await;
    assert_eq!(india.state, JobState::Queued);
    let reasons = india.queued_reasons.join("; ");
    assert!(
        reasons.contains("region eu-west-1 not in") && reasons.contains("region us-east-1 not in"),
        "{reasons}"
    );
    // A matching agent joins: the job runs.
    let _ap = AgentProc::start_extra(
        &pki,
        coord.control,
        "ap-1",
        attrs("ap-south-1", "IN", "local"),
        None,
        &[],
        work.path(),
    )?;
    let done = wait_state(&client, &format!("{wf}.india"), JobState::Succeeded, 15).await;
    assert_eq!(done.attempts[0].agents[0], "ap-1");
    assert_eq!(logs(&client, &format!("{wf}.india")).await.trim(), "finally");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_auctions_never_double_book_a_gpu() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _a = AgentProc::start_extra(
        &pki,
        coord.control,
        "a",
        attrs("r", "EU", "p"),
        Some("2xH100-80GB"),
        &[],
        work.path(),
    )?;
    let _b = AgentProc::start_extra(
        &pki,
        coord.control,
        "b",
        attrs("r", "EU", "p"),
        Some("2xH100-80GB"),
        &[],
        work.path(),
    )?;
    mesh_up(&client, 2).await;
    let record = work.path().join("gpu-usage.log");
    let mut yaml = String::from("name: crowd\njobs:\n");
    for i in 0..16 {
        yaml.push_str(&format!(
            "  j{i}:\n    script: |\n      echo \"$CUDA_VISIBLE_DEVICES start $(date +%s%N)\" >> {rec}\n      sleep 0.4\n      echo \"$CUDA_VISIBLE_DEVICES end $(date +%s%N)\" >> {rec}\n    resources: {{ gpus: 1 }}\n",
            rec = record.display()
        ));
    }
    let wf = submit(&client, &yaml).await?;
    let done = wait_for(Duration::from_secs(40), || async { work::finished(&client, &wf).await })
        .await
        .expect("workflow finished");
    assert_eq!(done, WorkflowState::Succeeded);
    // Agent-side records: per GPU, intervals never overlap.
    let text = std::fs::read_to_string(&record)?;
    let mut spans: BTreeMap<String, Vec<(u128, char)>> = BTreeMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [gpu, what, t] = parts.as_slice() else { panic!("bad record {line:?}") };
        spans
            .entry(gpu.to_string())
            .or_default()
            .push((t.parse()?, if *what == "start" { 's' } else { 'e' }));
    }
    assert_eq!(text.lines().count(), 32, "16 jobs x start/end");
    assert_eq!(spans.len(), 4, "all four GPUs were used: {spans:?}");
    for (gpu, mut evs) in spans {
        evs.sort();
        let mut open = 0;
        for (_, k) in evs {
            open += if k == 's' { 1 } else { -1 };
            assert!(open <= 1, "GPU {gpu} ran two jobs at once");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_job_runs_elsewhere_within_3s() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let mut procs: BTreeMap<String, AgentProc> = BTreeMap::new();
    for n in ["x", "y"] {
        procs.insert(
            n.into(),
            AgentProc::start_extra(
                &pki,
                coord.control,
                n,
                attrs("r", "EU", "p"),
                Some("1xH100-80GB"),
                &[],
                work.path(),
            )?,
        );
    }
    mesh_up(&client, 2).await;
    let wf = submit(
        &client,
        "name: long\njobs:\n  sleeper:\n    command: [sleep, \"60\"]\n    resources: { gpus: 1 }\n",
    )
    .await?;
    let id = format!("{wf}.sleeper");
    let running = wait_state(&client, &id, JobState::Running, 10).await;
    let victim = running.attempts[0].agents[0].clone();
    // `jobs show` lists the bids with the health facts of the GPUs they offered.
    let bid = running.attempts[0].bids.iter().find(|b| b.agent == victim).expect("its bid");
    assert_eq!(bid.health[0].uuid, running.attempts[0].gpus[0][0], "{running:?}");
    assert!(bid.health[0].temperature_c.is_some(), "{running:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    if let Some(p) = procs.get_mut(&victim) {
        p.kill9();
    }
    let moved = wait_for(Duration::from_secs(6), || async {
        let j = work::job(&client, &id).await?;
        (j.state == JobState::Running && Some(j.attempts.len()) == Some(2))
            .then(|| (killed.elapsed(), j))
    })
    .await;
    let (after, j) = moved.unwrap_or_else(|| panic!("job not re-placed"));
    eprintln!("job running elsewhere {after:?} after kill -9 of {victim}");
    assert!(after < Duration::from_secs(3), "failover took {after:?}");
    assert_ne!(j.attempts[1].agents[0], victim.as_str());
    assert_eq!(j.attempts[0].state, AttemptState::Lost);
    // The killed agent comes back: the coordinator tells it its attempt is stale (the
    // process died with it here, but a partitioned agent would be told to stop it).
    if let Some(p) = procs.get_mut(&victim) {
        p.spawn()?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let j = job(&client, &id).await;
    assert_eq!(j.state, JobState::Running);
    assert_eq!(Some(j.attempts.len()), Some(2), "no third attempt");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gang_job_starts_on_two_agents_with_rank_env_or_waits() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _a = AgentProc::start_extra(
        &pki,
        coord.control,
        "g1",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &[],
        work.path(),
    )?;
    mesh_up(&client, 1).await;
    let wf = submit(
        &client,
        "name: gang\njobs:\n  ddp:\n    nodes: 2\n    script: |\n      echo \"rank=$FLEETMESH_RANK world=$FLEETMESH_WORLD_SIZE master=$MASTER_ADDR:$MASTER_PORT\"\n    resources: { gpus: 1 }\n",
    )
    .await?;
    let id = format!("{wf}.ddp");
    // One agent: not all nodes can be placed, so none is.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let j = job(&client, &id).await;
    assert_eq!(j.state, JobState::Queued, "{j:?}");
    assert!(j.attempts.is_empty());
    assert!(j.queued_reasons.join("; ").contains("gang of 2 needs 2 eligible agents"), "{j:?}");
    let _b = AgentProc::start_extra(
        &pki,
        coord.control,
        "g2",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &[],
        work.path(),
    )?;
    let done = wait_state(&client, &id, JobState::Succeeded, 15).await;
    let ranks = Some(done.attempts[0].agents.len());
    assert_eq!(ranks, Some(2));
    let out = logs(&client, &id).await;
    assert!(out.contains("rank=0 world=2 master="), "{out}");
    assert!(out.contains("rank=1 world=2 master="), "{out}");
    assert!(out.contains("master=127.0.0.1:29500"), "{out}");
    Ok(())
}

/// What a gang member runs: rank 0 listens on `MASTER_ADDR:MASTER_PORT`, the others
/// connect to it (retrying while it starts) and each side learns the other's rank, as a
/// `torch.distributed` rendezvous would (torch itself is too heavy to install here).
const RENDEZVOUS: &str = r#"import os, socket, time
env = {k: os.environ[k] for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "PET_NNODES", "PET_NODE_RANK"]}
print("env", sorted(env.items()))
rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
addr = (env["MASTER_ADDR"], int(env["MASTER_PORT"]))
if rank == 0:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", addr[1]))
    s.listen()
    peers = []
    for _ in range(world - 1):
        c, _ = s.accept()
        peers.append(int(c.recv(16)))
        c.sendall(b"0")
    print("rank 0 met ranks", sorted(peers))
else:
    for _ in range(200):
        try:
            c = socket.create_connection(addr, timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    c.sendall(str(rank).encode())
    print("rank", rank, "met rank", c.recv(16).decode())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gang_members_meet_at_master_addr_with_the_names_torch_reads() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let mut agents = Vec::new();
    for name in ["t1", "t2"] {
        agents.push(AgentProc::start_extra(
            &pki,
            coord.control,
            name,
            attrs("r", "EU", "p"),
            Some("1xH100-80GB"),
            &[],
            work.path(),
        )?);
    }
    mesh_up(&client, 2).await;
    let script: String = RENDEZVOUS.lines().map(|l| format!("        {l}\n")).collect();
    let yaml = format!(
        "name: ddp\njobs:\n  meet:\n    nodes: 2\n    resources: {{ gpus: 1 }}\n    timeout: 30s\n    command:\n      - python3\n      - -c\n      - |\n{script}"
    );
    let wf = submit(&client, &yaml).await?;
    let id = format!("{wf}.meet");
    let done = wait_state(&client, &id, JobState::Succeeded, 30).await;
    assert_eq!(done.attempts[0].agents.len(), 2);
    let out = logs(&client, &id).await;
    println!("{out}");
    assert!(out.contains("rank 0 met ranks [1]"), "{out}");
    assert!(out.contains("rank 1 met rank 0"), "{out}");
    for want in [
        "('LOCAL_RANK', '0')",
        "('LOCAL_WORLD_SIZE', '1')",
        "('NODE_RANK', '1')",
        "('GROUP_RANK', '1')",
        "('PET_NNODES', '2')",
        "('WORLD_SIZE', '2')",
        "('MASTER_ADDR', '127.0.0.1')",
        "('MASTER_PORT', '29500')",
    ] {
        assert!(out.contains(want), "{want} missing: {out}");
    }
    Ok(())
}

/// Parse `<tag> <ns>` lines written by jobs into per-tag sorted timestamps.
/// `secs` after the partition healed, attempt 1 (the stale copy) has stopped writing
/// heartbeats and attempt 2 (the current one) still writes them.
fn assert_only_current_copy_runs(rec: &std::path::Path, healed_ns: u128, secs: u128) {
    let b = beats(rec);
    let after = healed_ns + secs * 1_000_000_000;
    let count = |a: &str| b.get(a).map(|v| v.iter().filter(|t| **t > after).count()).unwrap_or(0);
    assert_eq!(count("a1"), 0, "the stale copy still ran {secs} s after the partition healed");
    assert!(count("a2") > 5, "the current copy should still be running");
}

fn beats(path: &std::path::Path) -> BTreeMap<String, Vec<u128>> {
    let mut m: BTreeMap<String, Vec<u128>> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        if let Some((tag, t)) = line.split_once(' ') {
            if let Ok(t) = t.trim().parse() {
                m.entry(tag.to_string()).or_default().push(t);
            }
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_kill9_mid_workflow_loses_nothing_and_runs_nothing_twice() -> anyhow::Result<()>
{
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let mut coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _a = AgentProc::start_extra(
        &pki,
        coord.control,
        "a",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &[],
        work.path(),
    )?;
    let _b = AgentProc::start_extra(
        &pki,
        coord.control,
        "b",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &[],
        work.path(),
    )?;
    mesh_up(&client, 2).await;
    let rec = work.path().join("runs.log");
    // step1 is running when the coordinator dies; step2 must still follow it exactly once.
    let yaml = format!(
        "name: durable\njobs:\n  step1:\n    script: |\n      echo \"step1-$FLEETMESH_ATTEMPT start\" >> {r}\n      sleep 8\n      echo \"step1-$FLEETMESH_ATTEMPT end\" >> {r}\n  step2:\n    needs: [step1]\n    script: |\n      echo \"step2-$FLEETMESH_ATTEMPT start\" >> {r}\n",
        r = rec.display()
    );
    let wf = submit(&client, &yaml).await?;
    wait_state(&client, &format!("{wf}.step1"), JobState::Running, 10).await;
    coord.kill9();
    tokio::time::sleep(Duration::from_millis(800)).await;
    coord.restart(&pki).await?;
    let done = wait_for(Duration::from_secs(20), || async { work::finished(&client, &wf).await })
        .await
        .unwrap_or_else(|| panic!("workflow did not finish after the restart"));
    let step1 = job(&client, &format!("{wf}.step1")).await;
    let step2 = job(&client, &format!("{wf}.step2")).await;
    assert_eq!(done, WorkflowState::Succeeded, "{step1:?}\n{step2:?}\n{}", coord.log_text());
    let log = std::fs::read_to_string(&rec)?;
    assert_eq!(
        log.matches("step1-").count(),
        2,
        "step1 ran more than once:\n{log}\n{}",
        coord.log_text()
    );
    assert_eq!(log.matches("step2-1 start").count(), 1, "step2 not exactly once:\n{log}");
    let step1 = job(&client, &format!("{wf}.step1")).await;
    assert_eq!(Some(step1.attempts.len()), Some(1), "step1 was re-placed: {step1:?}");
    assert!(coord.log_text().contains("attempt re-adopted"), "{}", coord.log_text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_agent_that_comes_back_does_not_leave_two_copies_running() -> anyhow::Result<()>
{
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let mut procs: BTreeMap<String, AgentProc> = BTreeMap::new();
    for n in ["p", "q"] {
        procs.insert(
            n.into(),
            AgentProc::start_extra(
                &pki,
                coord.control,
                n,
                attrs("r", "EU", "p"),
                Some("1xH100-80GB"),
                &[],
                work.path(),
            )?,
        );
    }
    mesh_up(&client, 2).await;
    let rec = work.path().join("beats.log");
    // Every copy writes a heartbeat tagged with its attempt ten times a second.
    let yaml = format!(
        "name: part\njobs:\n  svc:\n    script: |\n      while true; do echo \"a$FLEETMESH_ATTEMPT $(date +%s%N)\" >> {r}; sleep 0.1; done\n    resources: {{ gpus: 1 }}\n",
        r = rec.display()
    );
    let wf = submit(&client, &yaml).await?;
    let id = format!("{wf}.svc");
    let first = wait_state(&client, &id, JobState::Running, 10).await;
    let cut = first.attempts[0].agents[0].clone();
    let pid = procs.get(&cut).and_then(|p| p.pid()).expect("pid");
    // Cut the agent off (its job keeps running: it is in its own process group).
    std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status()?;
    wait_for(Duration::from_secs(8), || async {
        let j = work::job(&client, &id).await?;
        (j.state == JobState::Running && Some(j.attempts.len()) == Some(2)).then_some(())
    })
    .await
    .expect("job re-placed while its agent was cut off");
    // Heal the partition.
    std::process::Command::new("kill").args(["-CONT", &pid.to_string()]).status()?;
    let healed_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_only_current_copy_runs(&rec, healed_ns, 3);
    let j = job(&client, &id).await;
    assert_eq!(j.state, JobState::Running);
    assert_eq!(Some(j.attempts.len()), Some(2));
    // Clean up the long-running job.
    let _: Cancelled =
        client.post_json(&format!("/api/v1/jobs/{id}/cancel"), &serde_json::json!({})).await?;
    wait_state(&client, &id, JobState::Cancelled, 5).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_streams_output_live_and_ends_with_the_job() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _a = AgentProc::start(&pki, coord.control, "a", attrs("r", "EU", "p"), None, work.path())?;
    mesh_up(&client, 1).await;
    let wf = submit(
        &client,
        "name: follow\njobs:\n  talk:\n    script: |\n      for i in 1 2 3 4; do echo line$i; sleep 1; done\n",
    )
    .await?;
    let id = format!("{wf}.talk");
    wait_state(&client, &id, JobState::Running, 10).await;
    let mut child = coord
        .cli_command(&pki, &["logs", "-f", &id])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    // The first line arrives while the job is still running.
    let first = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await??;
    assert_eq!(first.as_deref(), Some("line1"));
    assert_eq!(
        job(&client, &id).await.state,
        JobState::Running,
        "streamed live, not after the end"
    );
    let mut rest = Vec::new();
    while let Some(l) = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await?? {
        rest.push(l);
    }
    assert_eq!(rest, ["line2", "line3", "line4"]);
    // It ends by itself once the job has ended.
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await??;
    assert!(status.success());
    assert_eq!(job(&client, &id).await.state, JobState::Succeeded);
    Ok(())
}

/// A real network partition: the agent runs in its own network namespace, joined to the
/// coordinator by a veth pair that the test takes down and brings back up.
/// Agent "p" inside a network namespace, running a job whose every copy writes a
/// heartbeat tagged with its attempt (`a1 <ns>`) to `rec`, and agent "q" outside, ready
/// to take it over. `None` (after saying so) where namespaces cannot be made (not root).
struct PartitionMesh {
    // Fields drop in order: the agents before the coordinator, the work dir and the netns.
    _q: AgentProc,
    p: AgentProc,
    client: ApiClient,
    _coord: CoordinatorProc,
    id: String,
    rec: std::path::PathBuf,
    _work: tempfile::TempDir,
    net: Netns,
}

async fn partition_mesh(wf_name: &str, p_extra: &[&str]) -> anyhow::Result<Option<PartitionMesh>> {
    let net = match Netns::create() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIPPED: cannot create a network namespace here ({e}); run as root");
            return Ok(None);
        }
    };
    let pki = Pki::new("mesh.test")?;
    // The coordinator's certificate names the address the namespaced agent dials.
    let mut req = fleetmesh_protocol::pki::IssueRequest::new(
        fleetmesh_protocol::PeerKind::Coordinator,
        "main",
        Duration::from_secs(3600),
    );
    req.dns_names = vec!["localhost".into()];
    req.ips = vec![[127, 0, 0, 1].into(), net.root_ip.into()];
    pki.issue_req(&req)?;
    pki.issue(fleetmesh_protocol::PeerKind::Operator, "harness", Default::default())?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start_listening(
        &pki,
        &work.path().join("coord"),
        [0, 0, 0, 0].into(),
        &[],
    )
    .await?;
    let client = coord.client(&pki)?;
    let remote = std::net::SocketAddr::new(net.root_ip.into(), coord.control.port());
    let p = AgentProc::start_in_netns(
        &pki,
        &net.name,
        remote,
        "p",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        p_extra,
        work.path(),
    )?;
    mesh_up(&client, 1).await;
    let rec = work.path().join("beats.log");
    let yaml = format!(
        "name: {wf_name}\njobs:\n  svc:\n    script: |\n      while true; do echo \"a$FLEETMESH_ATTEMPT $(date +%s%N)\" >> {r}; sleep 0.1; done\n    resources: {{ gpus: 1 }}\n",
        r = rec.display()
    );
    let wf = submit(&client, &yaml).await?;
    let id = format!("{wf}.svc");
    let first = wait_state(&client, &id, JobState::Running, 10).await;
    assert_eq!(first.attempts[0].agents[0], "p");
    let q = AgentProc::start_extra(
        &pki,
        coord.control,
        "q",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &[],
        work.path(),
    )?;
    mesh_up(&client, 2).await;
    Ok(Some(PartitionMesh { _q: q, p, client, _coord: coord, id, rec, _work: work, net }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_partition_re_places_the_job_and_the_healed_agent_stops_its_copy(
) -> anyhow::Result<()> {
    let Some(m) = partition_mesh("netpart", &[]).await? else { return Ok(()) };
    let (net, client, id, rec) = (&m.net, &m.client, m.id.as_str(), &m.rec);
    // Partition.
    net.set_link(false)?;
    let cut = Instant::now();
    wait_for(Duration::from_secs(8), || async {
        let j = work::job(client, id).await?;
        (j.state == JobState::Running
            && Some(j.attempts.len()) == Some(2)
            && j.attempts.get(1).is_some_and(|a| a.agents[0] == "q"))
        .then_some(())
    })
    .await
    .expect("job re-placed on q while p was cut off");
    let replaced_after = cut.elapsed();
    assert!(replaced_after < Duration::from_secs(4), "re-placed after {replaced_after:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Heal: p reconnects, reports its attempt, and is told to stop it.
    net.set_link(true)?;
    let healed_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_only_current_copy_runs(rec, healed_ns, 8);
    let j = job(client, id).await;
    assert_eq!(j.state, JobState::Running);
    assert_eq!(Some(j.attempts.len()), Some(2), "no third attempt");
    let plog = std::fs::read_to_string(&m.p.log)?;
    assert!(plog.matches("session established").count() >= 2, "p reconnected:\n{plog}");
    let _: Cancelled =
        client.post_json(&format!("/api/v1/jobs/{id}/cancel"), &serde_json::json!({})).await?;
    wait_state(client, id, JobState::Cancelled, 5).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_skips_timeouts_and_cancellation() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _a = AgentProc::start_extra(
        &pki,
        coord.control,
        "a",
        attrs("r", "EU", "p"),
        None,
        &[],
        work.path(),
    )?;
    mesh_up(&client, 1).await;
    let marker = work.path().join("flaky.marker");
    let pidfile = work.path().join("victim.pid");
    let yaml = format!(
        r#"
name: lifecycle
jobs:
  flaky:
    script: |
      if [ -f {m} ]; then echo second-try; exit 0; fi
      touch {m}; echo first-try-fails; exit 3
    retries: {{ limit: 2, backoff: 200ms }}
  broken:
    command: ["sh", "-c", "exit 7"]
    retries: {{ limit: 1, backoff: 100ms }}
  after-broken:
    needs: [broken]
    command: ["true"]
  slow:
    command: ["sleep", "30"]
    timeout: 1s
  victim:
    script: |
      echo $$ > {p}
      exec sleep 60
"#,
        m = marker.display(),
        p = pidfile.display()
    );
    let wf = submit(&client, &yaml).await?;
    let flaky = wait_state(&client, &format!("{wf}.flaky"), JobState::Succeeded, 15).await;
    assert_eq!(Some(flaky.attempts.len()), Some(2), "{flaky:?}");
    assert_eq!(flaky.failures, 1);
    assert_eq!(flaky.attempts[0].outcomes[0].as_deref(), Some("exited with code 3"));
    let broken = wait_state(&client, &format!("{wf}.broken"), JobState::Failed, 15).await;
    assert_eq!(Some(broken.attempts.len()), Some(2), "one retry, then failed: {broken:?}");
    let skipped = wait_state(&client, &format!("{wf}.after-broken"), JobState::Skipped, 5).await;
    assert!(format!("{:?}", skipped.history).contains("dependency broken failed"), "{skipped:?}");
    let slow = wait_state(&client, &format!("{wf}.slow"), JobState::Failed, 15).await;
    assert_eq!(slow.attempts[0].outcomes[0].as_deref(), Some("timed out"));
    // Cancel: SIGTERM reaches the process, which is gone afterwards.
    wait_state(&client, &format!("{wf}.victim"), JobState::Running, 10).await;
    let pid = wait_for(Duration::from_secs(5), || async {
        std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse::<u32>().ok())
    })
    .await
    .expect("victim pid");
    let r: Cancelled = client
        .post_json(&format!("/api/v1/jobs/{wf}.victim/cancel"), &serde_json::json!({}))
        .await?;
    assert_eq!(r.cancelled_jobs, 1);
    let gone = wait_for(Duration::from_secs(10), || async {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })
    .await;
    assert!(gone.is_some(), "cancelled process {pid} still running");
    let v = job(&client, &format!("{wf}.victim")).await;
    assert_eq!(v.state, JobState::Cancelled);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_agent_gets_no_new_jobs_but_finishes_running_ones() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _a = AgentProc::start_extra(
        &pki,
        coord.control,
        "only",
        attrs("r", "EU", "p"),
        None,
        &[],
        work.path(),
    )?;
    mesh_up(&client, 1).await;
    let wf = submit(&client, "name: d1\njobs:\n  running:\n    command: [sleep, \"2\"]\n").await?;
    wait_state(&client, &format!("{wf}.running"), JobState::Running, 10).await;
    let _: Drained = client.post_json("/api/v1/agents/only/drain", &serde_json::json!({})).await?;
    let wf2 = submit(&client, "name: d2\njobs:\n  later:\n    command: [\"true\"]\n").await?;
    // The running job finishes on the drained agent; the new one waits with the reason.
    wait_state(&client, &format!("{wf}.running"), JobState::Succeeded, 10).await;
    let later = job(&client, &format!("{wf2}.later")).await;
    assert_eq!(later.state, JobState::Queued);
    assert!(later.queued_reasons.join("; ").contains("only: draining"), "{later:?}");
    let _: Drained = client
        .post_json("/api/v1/agents/only/drain", &serde_json::json!({ "draining": false }))
        .await?;
    wait_state(&client, &format!("{wf2}.later"), JobState::Succeeded, 10).await;
    Ok(())
}

/// A SIMULATED docker-compatible runtime (there is no container engine or registry on
/// the test machines): answers `info`, and for `run` records its argv, then runs the
/// command after the image in the `-v` host dir with the `-e` variables, like a
/// container with that mount as its work dir would.
const FAKE_DOCKER: &str = r#"#!/bin/sh
set -e
[ "$1" = info ] && exit 0
[ "$1" = run ] || { echo "fake-docker: unsupported $1" >&2; exit 125; }
echo "$@" >> "$(dirname "$0")/fake-docker-calls"
shift
dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rm) shift ;;
    -v) dir="${2%%:*}"; shift 2 ;;
    -w|--name) shift 2 ;;
    -e) export "$2"; shift 2 ;;
    *) break ;;
  esac
done
shift   # the image
cd "$dir"
exec "$@"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_jobs_run_through_the_container_runtime_and_nodes_without_one_decline(
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    // A runtime that does not answer `info` (a docker client without its daemon) is
    // refused at startup when configured explicitly, with the reason.
    let mut broken = AgentProc::start_extra(
        &pki,
        coord.control,
        "broken-rt",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &["--container-runtime", "/bin/false"],
        work.path(),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let exited = loop {
        match broken.exited() {
            Some(st) => break Some(st),
            None if Instant::now() > deadline => break None,
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert!(exited.is_some_and(|s| !s.success()), "agent with a broken runtime kept running");
    let log = broken.log_text();
    assert!(log.contains("container-runtime") && log.contains("/bin/false info"), "{log}");
    // No runtime: image jobs are declined with the reason and wait.
    let _plain = AgentProc::start_extra(
        &pki,
        coord.control,
        "plain",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &["--container-runtime", "none"],
        work.path(),
    )?;
    mesh_up(&client, 1).await;
    let wf = submit(
        &client,
        r#"
name: ctr
jobs:
  train:
    image: registry.example.com/cuda:12.4
    command: ["sh", "-c", "echo gpus=$NVIDIA_VISIBLE_DEVICES job=$FLEETMESH_JOB; ls"]
    env: { MODE: container }
    resources: { gpus: 1 }
"#,
    )
    .await?;
    let id = format!("{wf}.train");
    let queued = wait_for(Duration::from_secs(10), || async {
        let j = work::job(&client, &id).await?;
        let r = j.queued_reasons.join("; ");
        (j.state == JobState::Queued && r.contains("no docker or podman")).then_some(j)
    })
    .await;
    assert!(queued.is_some(), "no decline reason: {:?}", job(&client, &id).await);
    // A node with a runtime joins: the job runs through it, in the attempt's work dir.
    let rt_dir = work.path().join("rt");
    std::fs::create_dir_all(&rt_dir)?;
    let fake = rt_dir.join("fake-docker");
    std::fs::write(&fake, FAKE_DOCKER)?;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))?;
    let fake_s = fake.display().to_string();
    let _ctr = AgentProc::start_extra(
        &pki,
        coord.control,
        "ctr",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &["--container-runtime", &fake_s],
        work.path(),
    )?;
    let done = wait_state(&client, &id, JobState::Succeeded, 20).await;
    assert_eq!(done.attempts[0].agents[0], "ctr", "{done:?}");
    let gpu = done.attempts[0].gpus[0][0].clone();
    assert!(gpu.starts_with("GPU-"), "{done:?}");
    let out = logs(&client, &id).await;
    assert!(out.contains(&format!("gpus={gpu} job={id}")), "{out}");
    let calls = std::fs::read_to_string(rt_dir.join("fake-docker-calls"))?;
    assert_eq!(calls.lines().count(), 1, "{calls}");
    for want in [
        "run --rm -v ".to_string(),
        ":/work -w /work ".to_string(),
        format!("--name fleetmesh-{id}-1 "),
        "-e MODE=container".to_string(),
        format!("-e CUDA_VISIBLE_DEVICES={gpu}"),
        format!("-e NVIDIA_VISIBLE_DEVICES={gpu}"),
        " registry.example.com/cuda:12.4 sh -c ".to_string(),
    ] {
        assert!(calls.contains(&want), "missing {want:?} in {calls}");
    }
    // The mount is the attempt's own work dir on the agent (its log files are there).
    assert!(out.contains("stdout.log"), "{out}");
    Ok(())
}

/// A real podman (with runc) whose storage and configuration live in `dir`, and a
/// one-binary image built from the host's static busybox (no registry here).
/// `None` (with the reason) where podman, runc or busybox are missing or we are not
/// root: `scripts/test.sh` installs them when it runs as root with apt-get.
fn real_podman(dir: &std::path::Path) -> anyhow::Result<Result<String, String>> {
    use std::process::Command;
    let ok = |prog: &str, arg: &str| {
        Command::new(prog).arg(arg).output().map(|o| o.status.success()).unwrap_or(false)
    };
    if !ok("podman", "--version") || !ok("runc", "--version") {
        return Ok(Err("podman and runc are not installed".into()));
    }
    let uid = Command::new("id").arg("-u").output()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Ok(Err("not root (rootless podman is not set up here)".into()));
    }
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
    else {
        return Ok(Err("no static busybox to build the test image from".into()));
    };
    // Storage and settings of our own: the host's images and containers are untouched.
    // runc with cgroupfs, and explicit ulimits, work on hybrid-cgroup VMs like this one.
    std::fs::create_dir_all(dir)?;
    let storage = dir.join("storage.conf");
    std::fs::write(
        &storage,
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n",
            dir.display()
        ),
    )?;
    let conf = dir.join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
         [engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nevents_logger = \"file\"\n",
    )?;
    // Inherited by the agents this test starts, and by the podman it runs itself.
    std::env::set_var("CONTAINERS_STORAGE_CONF", &storage);
    std::env::set_var("CONTAINERS_CONF", &conf);
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy(busybox, rootfs.join("bin/busybox"))?;
    for applet in ["sh", "echo", "ls", "cat", "sleep", "test"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    let image = "localhost/fleetmesh-test-busybox:1";
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("tar -C '{}' -c . | podman import - {image}", rootfs.display()))
        .output()?;
    anyhow::ensure!(st.status.success(), "podman import: {}", String::from_utf8_lossy(&st.stderr));
    Ok(Ok(image.to_string()))
}

fn podman_containers() -> String {
    let o = std::process::Command::new("podman")
        .args(["ps", "-a", "--format", "{{.Names}} {{.Command}}"])
        .output();
    o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_jobs_run_in_a_real_podman_container_and_cancel_removes_it() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let image = match real_podman(&work.path().join("podman"))? {
        Ok(i) => i,
        Err(why) => {
            eprintln!("SKIPPED: no real container runtime: {why}");
            return Ok(());
        }
    };
    // Whatever happens below, no container of this test outlives it.
    struct RemoveContainers;
    impl Drop for RemoveContainers {
        fn drop(&mut self) {
            let _ = std::process::Command::new("podman").args(["rm", "-af", "-t", "0"]).output();
            std::env::remove_var("CONTAINERS_STORAGE_CONF");
            std::env::remove_var("CONTAINERS_CONF");
        }
    }
    let _cleanup = RemoveContainers;
    let pki = Pki::new("mesh.test")?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _ctr = AgentProc::start_extra(
        &pki,
        coord.control,
        "podman-node",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &["--container-runtime", "podman"],
        work.path(),
    )?;
    mesh_up(&client, 1).await;
    // The job sees its env and the attempt's work dir at /work, inside the image's own
    // root file system (the host's /usr is not there).
    let wf = submit(
        &client,
        &format!(
            r#"
name: real-ctr
jobs:
  hello:
    image: {image}
    command: ["sh", "-c", "echo in-container gpus=$NVIDIA_VISIBLE_DEVICES job=$FLEETMESH_JOB mode=$MODE; test -e /usr && echo host-root || echo own-root; echo made-inside > /work/made-inside.txt; ls /work"]
    env: {{ MODE: real }}
    resources: {{ gpus: 1 }}
"#
        ),
    )
    .await?;
    let id = format!("{wf}.hello");
    let done = wait_state(&client, &id, JobState::Succeeded, 60).await;
    let gpu = done.attempts[0].gpus[0][0].clone();
    assert!(gpu.starts_with("GPU-"), "{done:?}");
    let out = logs(&client, &id).await;
    assert!(out.contains(&format!("in-container gpus={gpu} job={id} mode=real")), "{out}");
    assert!(out.contains("own-root") && !out.contains("host-root"), "{out}");
    assert!(out.contains("made-inside.txt") && out.contains("stdout.log"), "{out}");
    // `--rm`: nothing is left behind by a finished job.
    assert!(!podman_containers().contains("fleetmesh-"), "{}", podman_containers());

    // Cancel a container whose PID 1 ignores SIGTERM (a shell's PID 1 does): the
    // container itself must go, not only the podman client the agent started.
    let wf = submit(
        &client,
        &format!(
            r#"
name: real-ctr-long
jobs:
  long:
    image: {image}
    command: ["sleep", "300"]
    resources: {{ gpus: 1 }}
"#
        ),
    )
    .await?;
    let id = format!("{wf}.long");
    wait_state(&client, &id, JobState::Running, 60).await;
    let up = wait_for(Duration::from_secs(30), || async {
        let ps = podman_containers();
        ps.contains("fleetmesh-").then_some(ps)
    })
    .await;
    assert!(up.is_some_and(|ps| ps.contains("sleep 300")), "{}", podman_containers());
    let _: Cancelled =
        client.post_json(&format!("/api/v1/jobs/{id}/cancel"), &serde_json::json!({})).await?;
    wait_state(&client, &id, JobState::Cancelled, 5).await;
    // Default grace 5 s, then SIGKILL; the container is removed.
    let gone = wait_for(Duration::from_secs(30), || async {
        (!podman_containers().contains("fleetmesh-")).then_some(())
    })
    .await;
    assert!(gone.is_some(), "container left running after cancel: {}", podman_containers());
    // The GPU is free again: another job gets it.
    let wf = submit(
        &client,
        &format!(
            "name: after\njobs:\n  again:\n    image: {image}\n    command: [\"echo\", \"again\"]\n    resources: {{ gpus: 1 }}\n"
        ),
    )
    .await?;
    wait_state(&client, &format!("{wf}.again"), JobState::Succeeded, 60).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_fencing_agent_stops_its_copy_before_the_job_runs_elsewhere() -> anyhow::Result<()> {
    // 800 ms (+ up to 0.5 s until the next heartbeat notices, + 0.5 s kill grace) is
    // below the coordinator's default lost timeout of 2 s.
    let p_extra = ["--stop-jobs-after-disconnect", "800ms"];
    let Some(m) = partition_mesh("fence", &p_extra).await? else { return Ok(()) };
    let (net, client, id, rec) = (&m.net, &m.client, m.id.as_str(), &m.rec);
    // A healthy session never trips the fence: p has been connected for a while.
    let j = job(client, id).await;
    assert_eq!(Some(j.attempts.len()), Some(1), "fenced while connected: {j:?}");
    // Partition.
    net.set_link(false)?;
    let cut = Instant::now();
    wait_for(Duration::from_secs(8), || async {
        let j = work::job(client, id).await?;
        (j.state == JobState::Running && j.attempts.get(1).is_some_and(|a| a.agents[0] == "q"))
            .then_some(())
    })
    .await
    .expect("job re-placed on q while p was cut off");
    let replaced_after = cut.elapsed();
    assert!(replaced_after < Duration::from_secs(3), "re-placed after {replaced_after:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Never two copies at once, not even during the partition: the cut-off copy's last
    // heartbeat came before the new copy's first.
    let b = beats(rec);
    let last_old = b.get("a1").and_then(|v| v.iter().max().copied()).expect("a1 beats");
    let first_new = b.get("a2").and_then(|v| v.iter().min().copied()).expect("a2 beats");
    assert!(
        last_old < first_new,
        "copies overlapped by {} ms during the partition",
        (last_old - first_new) / 1_000_000
    );
    eprintln!("gap between the copies: {} ms", (first_new - last_old) / 1_000_000);
    // Heal: p reports how its attempt ended; the job stays where it is.
    net.set_link(true)?;
    let reported = wait_for(Duration::from_secs(15), || async {
        let j = work::job(client, id).await?;
        let o = j.attempts[0].outcomes[0].clone().unwrap_or_default();
        o.contains("stopped by its agent").then_some(j)
    })
    .await;
    let j = reported.unwrap_or(job(client, id).await);
    assert!(
        j.attempts[0].outcomes[0].as_deref().unwrap_or_default().contains("coordinator"),
        "{j:?}"
    );
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.failures, 0, "a fenced attempt must not use a retry: {j:?}");
    assert_eq!(Some(j.attempts.len()), Some(2), "no third attempt: {j:?}");
    let _: Cancelled =
        client.post_json(&format!("/api/v1/jobs/{id}/cancel"), &serde_json::json!({})).await?;
    wait_state(client, id, JobState::Cancelled, 5).await;
    Ok(())
}
