//! Agents own their attempts across their own restarts: real agents are `kill -9`'d
//! (and the coordinator once) while jobs run, and no job may run twice or overlap.
//!
//! Every job appends `JOB PID start|beat|end MS` lines to one shared file, a beat every
//! 100 ms. A run is the span from its first to its last line; two runs of one job overlap
//! when their spans intersect.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use fleetmesh_api::answers::Submitted;
use fleetmesh_coordinator::client::ApiClient;
use fleetmesh_integration::work::{self, JobState};
use fleetmesh_integration::{attrs, wait_for, AgentProc, CoordinatorProc, Pki};

/// Jobs in the kill-loop workflow, and how long each runs.
const JOBS: usize = 30;
const BEATS: usize = 40;
/// Agents, each with two simulated GPUs; every job takes one.
const AGENTS: usize = 3;
/// Agent kills, one every `KILL_EVERY`; the coordinator is killed once, half-way.
const AGENT_KILLS: usize = 10;
const KILL_EVERY: Duration = Duration::from_millis(2500);

/// One run of a job, from its log lines.
#[derive(Debug, Default, Clone)]
struct Run {
    first_ms: u64,
    last_ms: u64,
    ended: bool,
}

fn runs(log: &Path) -> BTreeMap<String, BTreeMap<String, Run>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out: BTreeMap<String, BTreeMap<String, Run>> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [job, pid, what, ms] = f[..] else { continue };
        let Ok(ms) = ms.parse::<u64>() else { continue };
        let r = out.entry(job.to_string()).or_default().entry(pid.to_string()).or_default();
        if r.first_ms == 0 {
            r.first_ms = ms;
        }
        r.last_ms = r.last_ms.max(ms);
        r.ended |= what == "end";
    }
    out
}

fn workflow(log: &Path) -> String {
    let mut y = String::from("name: killloop\njobs:\n");
    for i in 0..JOBS {
        y.push_str(&format!(
            "  j{i:02}:\n    resources: {{ gpus: 1 }}\n    retries: {{ limit: 3, backoff: 1s }}\n    script: |\n      L={log}\n      echo \"$FLEETMESH_JOB $$ start $(date +%s%3N)\" >> $L\n      i=0; while [ $i -lt {BEATS} ]; do echo \"$FLEETMESH_JOB $$ beat $(date +%s%3N)\" >> $L; sleep 0.1; i=$((i+1)); done\n      echo \"$FLEETMESH_JOB $$ end $(date +%s%3N)\" >> $L\n",
            log = log.display()
        ));
    }
    y
}

/// (job, state, attempts) of every job of `wf` (none while the API does not answer).
async fn job_states(client: &ApiClient, wf: &str) -> Vec<(String, JobState, usize)> {
    let jobs = fleetmesh_integration::work::jobs(client, &format!("workflow={wf}"))
        .await
        .unwrap_or_default();
    jobs.into_iter().map(|j| (j.id, j.state, j.attempts)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_loop_never_runs_a_job_twice() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    // A killed agent is back within a second; the lost timeout leaves room for a slow
    // restart on a loaded 2-core machine, so a re-placement means a lost attempt.
    let mut coord = CoordinatorProc::start(
        &pki,
        &work.path().join("coord"),
        &["--suspect-after", "3s", "--lost-after", "6s"],
    )
    .await?;
    let client = coord.client(&pki)?;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(AgentProc::start(
            &pki,
            coord.control,
            &format!("k{i}"),
            attrs("r", "EU", "p"),
            Some("2xH100-80GB"),
            work.path(),
        )?);
    }
    wait_for(Duration::from_secs(20), || async {
        let a = fleetmesh_integration::agents(&client).await;
        (a.iter().filter(|a| a.gpus.len() == 2).count() == AGENTS).then_some(())
    })
    .await
    .expect("agents up with their GPUs");
    let log = work.path().join("runs.log");
    let r: Submitted = client.post_raw("/api/v1/workflows", workflow(&log).into_bytes()).await?;
    let wf = r.id;

    let started = Instant::now();
    for k in 0..AGENT_KILLS {
        tokio::time::sleep(KILL_EVERY).await;
        let a = &mut agents[k % AGENTS];
        a.kill9();
        a.spawn()?;
        if k == AGENT_KILLS / 2 {
            coord.kill9();
            coord.restart(&pki).await?;
        }
    }
    let kill_phase = started.elapsed();
    let client = coord.client(&pki)?;
    let done = wait_for(Duration::from_secs(120), || async {
        let s = job_states(&client, &wf).await;
        (s.len() == JOBS && s.iter().all(|(_, st, _)| *st == JobState::Succeeded)).then_some(s)
    })
    .await;
    let states = job_states(&client, &wf).await;
    let all = runs(&log);
    let per_job: Vec<usize> = all.values().map(|r| r.len()).collect();
    println!(
        "kill loop: {AGENT_KILLS} agent kills and 1 coordinator kill in {:.1} s; {JOBS} jobs; runs per job {:?}; attempts per job {:?}",
        kill_phase.as_secs_f64(),
        per_job,
        states.iter().map(|(_, _, n)| *n).collect::<Vec<_>>()
    );
    assert!(done.is_some(), "not every job succeeded: {states:?}");
    assert_eq!(all.len(), JOBS, "every job ran");
    for (job, rs) in &all {
        let mut spans: Vec<&Run> = rs.values().collect();
        spans.sort_by_key(|r| r.first_ms);
        for w in spans.windows(2) {
            assert!(
                w[0].last_ms < w[1].first_ms,
                "two runs of {job} overlap: {:?} and {:?}",
                w[0],
                w[1]
            );
        }
        // No attempt really failed (every run that started was meant to finish), so
        // every job ran exactly once, to its end.
        assert_eq!(rs.len(), 1, "{job} ran {} times: {rs:?}", rs.len());
        assert!(spans[0].ended, "{job}'s one run did not finish: {rs:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_while_the_agent_is_down_is_delivered_and_leftovers_are_killed(
) -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(
        &pki,
        &work.path().join("coord"),
        &["--suspect-after", "3s", "--lost-after", "20s"],
    )
    .await?;
    let client = coord.client(&pki)?;
    let mut a = AgentProc::start(
        &pki,
        coord.control,
        "solo",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        work.path(),
    )?;
    wait_for(Duration::from_secs(20), || async {
        let a = fleetmesh_integration::agents(&client).await;
        (a.iter().any(|a| a.gpus.len() == 1)).then_some(())
    })
    .await
    .expect("agent up");
    let marker = work.path().join("finished");
    let yaml = format!(
        "name: quick\njobs:\n  q:\n    resources: {{ gpus: 1 }}\n    script: |\n      sleep 2\n      echo done-while-away\n      touch {}\n",
        marker.display()
    );
    let r: Submitted = client.post_raw("/api/v1/workflows", yaml.into_bytes()).await?;
    let wf = r.id;
    let job = format!("{wf}.q");
    wait_for(Duration::from_secs(20), || async {
        work::job(&client, &job).await.filter(|j| j.state == JobState::Running).map(|_| ())
    })
    .await
    .expect("job running");
    // The agent dies; the job finishes while it is down; the agent comes back later.
    a.kill9();
    wait_for(Duration::from_secs(10), || async { marker.exists().then_some(()) })
        .await
        .expect("the job ran on without its agent");
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.spawn()?;
    let j = wait_for(Duration::from_secs(20), || async {
        work::job(&client, &job).await.filter(|j| j.state == JobState::Succeeded)
    })
    .await;
    let Some(j) = j else { panic!("exit not delivered: {}", a.log_text()) };
    assert_eq!(j.attempts.len(), 1, "{j:#?}");
    assert!(a.log_text().contains("attempt ended while the agent was down"));

    // A supervised group that no record vouches for (the record is lost) is killed
    // when the agent restarts.
    let yaml =
        "name: orphan\njobs:\n  o:\n    resources: { gpus: 1 }\n    command: [sleep, \"60\"]\n";
    let r: Submitted = client.post_raw("/api/v1/workflows", yaml.as_bytes().to_vec()).await?;
    let job = format!("{}.o", r.id);
    wait_for(Duration::from_secs(20), || async {
        work::job(&client, &job).await.filter(|j| j.state == JobState::Running).map(|_| ())
    })
    .await
    .expect("second job running");
    a.kill9();
    let data = a.data_dir().expect("data dir");
    let holders = |data: &Path| -> Vec<u32> {
        let mut v = Vec::new();
        for j in std::fs::read_dir(data.join("work")).into_iter().flatten().flatten() {
            for at in std::fs::read_dir(j.path()).into_iter().flatten().flatten() {
                v.extend(fleetmesh_agent::shim::lock_holder(&at.path()));
            }
        }
        v
    };
    assert_eq!(holders(&data).len(), 1, "the sleep outlives its killed agent");
    for e in std::fs::read_dir(data.join("attempts"))?.flatten() {
        std::fs::remove_file(e.path())?;
    }
    a.spawn()?;
    let gone =
        wait_for(Duration::from_secs(10), || async { holders(&data).is_empty().then_some(()) })
            .await;
    assert!(gone.is_some(), "leftover not killed: {}", a.log_text());
    assert!(a.log_text().contains("no record vouches for"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_fencing_holds_while_the_agent_is_dead() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let mut a = AgentProc::start_extra(
        &pki,
        coord.control,
        "fenced",
        attrs("r", "EU", "p"),
        Some("1xH100-80GB"),
        &["--stop-jobs-after-disconnect", "1s"],
        work.path(),
    )?;
    wait_for(Duration::from_secs(20), || async {
        let a = fleetmesh_integration::agents(&client).await;
        a.iter().any(|a| a.gpus.len() == 1).then_some(())
    })
    .await
    .expect("agent up");
    let marker = work.path().join("still-running");
    let yaml = format!(
        "name: fence\njobs:\n  f:\n    resources: {{ gpus: 1 }}\n    script: while true; do date +%s%N > {}; sleep 0.1; done\n",
        marker.display()
    );
    let r: Submitted = client.post_raw("/api/v1/workflows", yaml.into_bytes()).await?;
    let job = format!("{}.f", r.id);
    wait_for(Duration::from_secs(20), || async { marker.exists().then_some(()) })
        .await
        .expect("job running");
    // The agent dies: its own watchdog is gone, the supervisor's fence is not.
    a.kill9();
    let killed = Instant::now();
    let beat = || std::fs::metadata(&marker).and_then(|m| m.modified()).ok();
    let stopped = wait_for(Duration::from_secs(10), || async {
        let last = beat()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        (beat()? == last).then_some(())
    })
    .await;
    assert!(stopped.is_some(), "the job kept running with its agent dead");
    println!("job stopped {:?} after its agent died", killed.elapsed());
    assert!(killed.elapsed() < Duration::from_secs(5));
    // Back, the agent reports it as abandoned (no retry used) and the job runs again.
    a.spawn()?;
    let j = wait_for(Duration::from_secs(20), || async {
        work::job(&client, &job).await.filter(|j| j.attempts.len() >= 2)
    })
    .await
    .expect("placed again");
    let outcome = j.attempts[0].outcomes[0].clone().unwrap_or_default();
    assert!(outcome.contains("stopped by the attempt's supervisor"), "{j:#?}");
    Ok(())
}
