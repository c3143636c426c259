//! Workflows for real pipelines on a real local mesh: an array fanned out over three
//! agents (each member run once, CPUs never oversubscribed, the work spread), its
//! outputs fanned in to one job, a dataset split into shards among an array's members,
//! and the CLI's folded listings of it all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use fleetmesh_coordinator::client::ApiClient;
use fleetmesh_integration::work::{self, JobState, WorkflowState};
use fleetmesh_integration::{agents, attrs, wait_for, AgentProc, CoordinatorProc, Pki};

/// CPUs each agent offers to jobs: what the packing check holds the records against.
const AGENT_CPUS: &str = "2";
const MEMBERS: usize = 200;

async fn mesh_up(client: &ApiClient, n: usize) {
    wait_for(Duration::from_secs(20), || async {
        let a = agents(client).await;
        let up = a
            .iter()
            .filter(|a| {
                a.host.is_some()
                    && a.state == fleetmesh_coordinator::fleet::liveness::AgentState::Connected
            })
            .count();
        (up >= n).then_some(())
    })
    .await
    .expect("agents up");
}

async fn cli_ok(coord: &CoordinatorProc, pki: &Pki, args: &[&str]) -> String {
    let out = coord.cli(pki, args).await.expect("cli runs");
    assert!(
        out.status.success(),
        "fleetmesh {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Three agents offering two CPUs each.
fn three_agents(pki: &Pki, coord: &CoordinatorProc, work: &Path) -> Vec<AgentProc> {
    ["a", "b", "c"]
        .iter()
        .map(|n| {
            let extra = ["--cpus", AGENT_CPUS];
            AgentProc::start_extra(pki, coord.control, n, attrs("r", "EU", "p"), None, &extra, work)
                .expect("agent starts")
        })
        .collect()
}

/// One record a member wrote: the agent it ran on (from its work dir) and when.
struct Record {
    agent: String,
    start_ns: u128,
    end_ns: u128,
}

/// `index -> records` from the files `INDEX.ATTEMPT` holding `WORKDIR START END`.
fn read_records(dir: &Path) -> BTreeMap<usize, Vec<Record>> {
    let mut out: BTreeMap<usize, Vec<Record>> = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("records dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let index: usize = name.split('.').next().and_then(|i| i.parse().ok()).expect("INDEX.N");
        let text = std::fs::read_to_string(e.path()).expect("record");
        let f: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(f.len(), 3, "record {name}: {text:?}");
        let agent = Path::new(f[0])
            .components()
            .filter_map(|c| c.as_os_str().to_str())
            .find_map(|c| c.strip_prefix("agent-"))
            .unwrap_or_else(|| panic!("no agent in work dir {}", f[0]))
            .to_string();
        let (start_ns, end_ns) = (f[1].parse().expect("start"), f[2].parse().expect("end"));
        out.entry(index).or_default().push(Record { agent, start_ns, end_ns });
    }
    out
}

/// The most records of one agent that overlap in time.
fn peak_concurrency(records: &[&Record]) -> usize {
    let mut edges: Vec<(u128, i32)> =
        records.iter().flat_map(|r| [(r.start_ns, 1), (r.end_ns, -1)]).collect();
    // An end before a start at the same instant: touching intervals do not overlap.
    edges.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    peak as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_of_200_runs_each_member_once_packed_and_spread_and_fans_in() -> anyhow::Result<()>
{
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _agents = three_agents(&pki, &coord, work.path());
    mesh_up(&client, 3).await;
    let records = work.path().join("records");
    std::fs::create_dir_all(&records)?;
    let yaml = format!(
        r#"
name: scatter
jobs:
  map:
    parallel: {MEMBERS}
    resources: {{ cpus: 1 }}
    outputs: [part]
    env: {{ RECORDS: "{records}" }}
    script: |
      start=$(date +%s%N)
      echo "$FLEETMESH_INDEX of $FLEETMESH_COUNT" > "$FLEETMESH_OUTPUTS/part/n.txt"
      sleep 0.2
      echo "$FLEETMESH_WORK_DIR $start $(date +%s%N)" > "$RECORDS/$FLEETMESH_INDEX.$FLEETMESH_ATTEMPT"
  reduce:
    needs: [map]
    inputs: [{{ from: map.part, as: parts }}]
    script: |
      n=0
      for d in "$FLEETMESH_INPUTS"/parts/*; do
        i=$(basename "$d")
        [ "$(cat "$d/n.txt")" = "$i of {MEMBERS}" ] || {{ echo "part $i holds $(cat "$d/n.txt")"; exit 1; }}
        n=$((n + 1))
      done
      echo "reduced $n parts"
"#,
        records = records.display()
    );
    let wf = work::submit(&client, &yaml).await?;
    let state = wait_for(Duration::from_secs(240), || work::finished(&client, &wf)).await;
    let reduce = format!("{wf}.reduce");
    assert_eq!(state, Some(WorkflowState::Succeeded), "{:#?}", work::job(&client, &reduce).await);
    assert!(work::logs(&client, &reduce).await.contains(&format!("reduced {MEMBERS} parts")));

    // Each member ran exactly once (one attempt, one record).
    let by_index = read_records(&records);
    let indexes: Vec<usize> = by_index.keys().copied().collect();
    assert_eq!(indexes, (0..MEMBERS).collect::<Vec<_>>(), "a record per member");
    let twice: Vec<&usize> =
        by_index.iter().filter(|(_, r)| r.len() != 1).map(|(i, _)| i).collect();
    assert!(twice.is_empty(), "members run more than once: {twice:?}");
    // No agent ever ran more one-CPU members at once than it has CPUs, and all took work.
    let all: Vec<&Record> = by_index.values().flatten().collect();
    for agent in ["a", "b", "c"] {
        let mine: Vec<&Record> = all.iter().copied().filter(|r| r.agent == agent).collect();
        let peak = peak_concurrency(&mine);
        eprintln!("agent {agent}: {} members, at most {peak} at once", mine.len());
        assert!(peak <= 2, "agent {agent} ran {peak} one-CPU members at once on 2 CPUs");
        assert!(mine.len() >= MEMBERS / 10, "agent {agent} ran only {} members", mine.len());
    }

    // The CLI folds the array into one line with its members per state...
    let listing = cli_ok(&coord, &pki, &["jobs", "--workflow", &wf]).await;
    let map_line = listing.lines().find(|l| l.contains(".map ")).unwrap_or_default();
    assert!(map_line.contains(&format!("succeeded {MEMBERS}")), "{listing}");
    assert_eq!(listing.lines().count(), 3, "header, map, reduce:\n{listing}");
    // ...lists the members on request, and shows one by its bracketed name.
    let members =
        cli_ok(&coord, &pki, &["jobs", "--array", &format!("{wf}.map"), "-o", "json"]).await;
    let members: Vec<serde_json::Value> = serde_json::from_str(&members)?;
    assert_eq!(members.len(), MEMBERS);
    let shown = cli_ok(&coord, &pki, &["jobs", "show", &format!("{wf}.map[7]")]).await;
    assert!(shown.contains("state:    succeeded"), "{shown}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_take_their_shard_of_a_dataset_and_each_file_goes_to_one() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _agents = three_agents(&pki, &coord, work.path());
    mesh_up(&client, 3).await;
    let src = work.path().join("reads");
    std::fs::create_dir_all(&src)?;
    for i in 0..10 {
        std::fs::write(src.join(format!("r{i:02}.fq")), format!("read file {i}\n"))?;
    }
    let put = ["data", "put", src.to_str().unwrap_or_default(), "--name", "reads"];
    cli_ok(&coord, &pki, &[&put[..], &["--jurisdiction", "EU"]].concat()).await;
    let yaml = r#"
name: shards
jobs:
  count:
    parallel: 4
    resources: { cpus: 0.5 }
    inputs: [{ from: reads, shard: true }]
    outputs: [list]
    script: |
      ls "$FLEETMESH_INPUTS/reads" > "$FLEETMESH_OUTPUTS/list/files.txt"
  gather:
    needs: [count]
    inputs: [{ from: count.list, as: lists }]
    script: |
      for i in 0 1 2 3; do echo "$i: $(tr '\n' ' ' < "$FLEETMESH_INPUTS/lists/$i/files.txt")"; done
"#;
    let wf = work::submit(&client, yaml).await?;
    let state = wait_for(Duration::from_secs(120), || work::finished(&client, &wf)).await;
    let gather = format!("{wf}.gather");
    assert_eq!(state, Some(WorkflowState::Succeeded), "{:#?}", work::job(&client, &gather).await);
    let out = work::logs(&client, &gather).await;
    // 10 files over 4 members in path order: 2, 3, 2, 3 (contiguous, none twice).
    let shard = |i: usize| -> Vec<String> {
        let line = out.lines().find(|l| l.starts_with(&format!("{i}: "))).unwrap_or_default();
        line.split_whitespace().skip(1).map(str::to_string).collect()
    };
    let want = [(0..2), (2..5), (5..7), (7..10)];
    let mut seen = BTreeSet::new();
    for (i, range) in want.into_iter().enumerate() {
        let files: Vec<String> = range.map(|n| format!("r{n:02}.fq")).collect();
        assert_eq!(shard(i), files, "member {i}:\n{out}");
        seen.extend(files);
    }
    assert_eq!(seen.len(), 10);
    // Nothing in the whole listing is left behind as running or queued.
    let jobs = work::jobs(&client, &format!("array={wf}.count")).await.expect("listing");
    assert!(jobs.iter().all(|j| j.state == JobState::Succeeded), "{jobs:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_shows_where_jobs_would_go_changes_nothing_and_matches_where_they_go(
) -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let mut agents = Vec::new();
    for (name, price, role) in [("a", "1.0", "x"), ("b", "2.0", "y"), ("c", "3.0", "y")] {
        let extra =
            ["--cpus", AGENT_CPUS, "--price-per-hour", price, "--labels", &format!("role={role}")];
        let attrs = attrs("r", "EU", "p");
        agents.push(AgentProc::start_extra(
            &pki,
            coord.control,
            name,
            attrs,
            None,
            &extra,
            work.path(),
        )?);
    }
    mesh_up(&client, 3).await;
    let placeable = "name: where\njobs:\n  cheap:\n    command: [\"true\"]\n  labelled:\n    command: [\"true\"]\n    constraints: { labels: { role: y } }\n  wide:\n    command: [\"true\"]\n    parallel: 3\n";
    let waiting = format!("{placeable}  lost:\n    command: [\"true\"]\n    constraints: {{ labels: {{ role: z }} }}\n");
    let file = |name: &str, text: &str| {
        let p = work.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let (ok_file, wait_file) = (file("ok.yaml", placeable), file("wait.yaml", &waiting));
    let bad_file = file("bad.yaml", "name: w\njobs:\n  a:\n    command: [x]\n    parallel: 0\n");

    // Something would wait: exit 2, with the reason per agent.
    let out = coord.cli(&pki, &["plan", &wait_file]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("WAITS: no eligible agent"), "{text}");
    assert!(text.contains("not a: label role=x (wanted z)"), "{text}");
    // An invalid file: exit 1, naming the job and field.
    let out = coord.cli(&pki, &["plan", &bad_file]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("job `a`, field `parallel`"));
    // Everything placeable: exit 0, and the JSON says where each job would go.
    let json = cli_ok(&coord, &pki, &["plan", &ok_file, "-o", "json"]).await;
    let plan: fleetmesh_api::plan::Plan = serde_json::from_str(&json)?;
    assert!(plan.all_placeable_now, "{json}");
    let planned = |job: &str| -> Vec<String> {
        plan.jobs.iter().find(|j| j.job == job).map(|j| j.placement.clone()).unwrap_or_default()
    };
    assert_eq!(planned("cheap"), ["a"], "the cheapest agent");
    assert_eq!(planned("labelled"), ["b"], "the cheaper of the two with the label");
    let cheap = plan.jobs.iter().find(|j| j.job == "cheap").expect("cheap");
    assert_eq!(cheap.offers.len(), 3, "every agent offered");
    let wide = plan.jobs.iter().find(|j| j.job == "wide").expect("wide");
    assert_eq!((wide.members, wide.start_now), (3, 3));
    // Nothing was submitted, nothing is held on the agents.
    let wfs: Vec<work::WorkflowSummary> = client.get_json("/api/v1/workflows").await?;
    assert!(wfs.is_empty());

    // Submitted now, the jobs go where the plan said.
    let wf = work::submit(&client, placeable).await?;
    let state = wait_for(Duration::from_secs(60), || work::finished(&client, &wf)).await;
    assert_eq!(state, Some(WorkflowState::Succeeded));
    for job in ["cheap", "labelled"] {
        let j = work::job(&client, &format!("{wf}.{job}")).await.expect("job");
        assert_eq!(j.attempts[0].agents, planned(job), "{job} went elsewhere than planned");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10000_member_array_is_stored_listed_in_pages_and_folded() -> anyhow::Result<()> {
    const BIG: usize = 10_000;
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let mut coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    // No agent: the members stay queued, and nothing else changes while we look.
    let yaml = format!("name: big\njobs:\n  m:\n    command: [\"true\"]\n    parallel: {BIG}\n");
    let wf = work::submit(&client, &yaml).await?;
    let too_big = "name: huge\njobs:\n  m:\n    command: [\"true\"]\n    parallel: 10001\n";
    let refused = client.post_raw::<serde_json::Value>("/api/v1/workflows", too_big.into()).await;
    let refused = format!("{:?}", refused.expect_err("over the limit"));
    assert!(refused.contains("job `m`, field `parallel`: 10001 members; an array has 1 to 10000"));
    // Stored: a kill -9 and a restart later it is all there.
    coord.restart(&pki).await?;
    let client = coord.client(&pki)?;
    let array = format!("{wf}.m");
    let queued = wait_for(Duration::from_secs(30), || async {
        let top = work::jobs(&client, &format!("workflow={wf}")).await?;
        let counts = top.first()?.members.clone()?;
        (counts.get(&JobState::Queued) == Some(&BIG)).then_some(top)
    })
    .await
    .expect("the restarted coordinator lists the array with every member queued");
    assert_eq!(queued.len(), 1, "one folded line");
    // Pages of at most 5,000, however many are asked for.
    let page: fleetmesh_api::jobs::JobPage =
        client.get_json(&format!("/api/v1/jobs?array={array}&limit=100000")).await?;
    assert_eq!(page.jobs.len(), fleetmesh_api::jobs::MAX_PAGE_JOBS);
    assert_eq!(page.next.as_deref(), Some(format!("{array}[4999]").as_str()));
    let members = work::jobs(&client, &format!("array={array}")).await.expect("members");
    assert_eq!(members.len(), BIG);
    assert_eq!(members[BIG - 1].id, format!("{array}[9999]"));
    let reason = members[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("no agents in the fleet"), "{reason}");
    // The CLI's listing stays one line for the array, and cancelling it cancels all.
    let listing = cli_ok(&coord, &pki, &["jobs", "--workflow", &wf]).await;
    assert!(listing.contains(&format!("queued {BIG}")), "{listing}");
    let out = cli_ok(&coord, &pki, &["cancel", &array]).await;
    assert!(out.contains(&format!("cancelled {} job(s)", BIG + 1)), "{out}");
    let state = wait_for(Duration::from_secs(10), || work::finished(&client, &wf)).await;
    assert_eq!(state, Some(WorkflowState::Failed));
    Ok(())
}
