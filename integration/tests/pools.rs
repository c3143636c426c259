//! Elastic capacity on a real local mesh: a coordinator with pools whose programs are
//! real processes (`scripts/pools/local` starts `fleetmesh-agent`s with SIMULATED GPUs
//! that join with the single-use string they are given). Burst from zero nodes, fail
//! over from a pool out of capacity, scale idle nodes away.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleetmesh_api::pools::PoolView;
use fleetmesh_coordinator::client::ApiClient;
use fleetmesh_integration::work::{self, JobState, WorkflowState};
use fleetmesh_integration::{agents, bin, wait_for, CoordinatorProc, Pki};

fn local_program() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("scripts/pools/local").display().to_string()
}

/// A `[[pool]]` table for the `local` program.
fn local_pool(name: &str, price: f64, max: u32, work: &Path) -> String {
    let agent = bin("fleetmesh-agent").display().to_string();
    let prog = local_program();
    let nodes = work.join("nodes").display().to_string();
    format!(
        r#"
[[pool]]
name = "{name}"
provider = "local"
region = "here"
jurisdiction = "EU"
labels = {{ tier = "burst" }}
gpus = "4 x H100-80GB"
cpus = 4
memory = "16GiB"
price-per-hour = {price}
max-nodes = {max}
boot-timeout = "30s"
idle-timeout = "3s"
launch = ["{prog}", "launch", "--agent", "{agent}", "--work", "{nodes}"]
terminate = ["{prog}", "terminate"]
"#
    )
}

async fn coordinator(pki: &Pki, work: &Path, pools: &str) -> anyhow::Result<CoordinatorProc> {
    let config = work.join("coordinator.toml");
    std::fs::write(&config, pools)?;
    let key = pki.path().join("ca.key").display().to_string();
    let args = ["--ca-key", &key, "--config", config.to_str().unwrap_or_default()];
    CoordinatorProc::start(pki, &work.join("coord"), &args).await
}

async fn pools(client: &ApiClient) -> Vec<PoolView> {
    client.get_json("/api/v1/pools").await.unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn pids(v: &[PoolView]) -> Vec<u32> {
    v.iter()
        .flat_map(|p| &p.nodes)
        .filter_map(|n| n.instance.as_deref()?.strip_prefix("local-")?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_launches_the_nodes_the_work_needs_and_idle_ones_are_terminated(
) -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = coordinator(&pki, work.path(), &local_pool("local-a", 1.0, 5, work.path())).await?;
    let client = coord.client(&pki)?;
    assert!(agents(&client).await.is_empty(), "no node to start with");
    // 10 one-GPU jobs on 4-GPU nodes: 3 nodes, not 10.
    let mut yaml = String::from("name: burst\njobs:\n");
    for i in 0..10 {
        yaml.push_str(&format!(
            "  j{i}:\n    command: [sleep, \"2\"]\n    resources: {{ gpus: 1, cpus: 0.5 }}\n"
        ));
    }
    let t0 = Instant::now();
    let wf = work::submit(&client, &yaml).await?;
    // While its node boots, a job says which node it waits for.
    let note = wait_for(Duration::from_secs(30), || async {
        let j = work::job(&client, &format!("{wf}.j9")).await?;
        let first = j.queued_reasons.first()?.clone();
        first.contains("to boot").then_some(first)
    })
    .await;
    let note = note.unwrap_or_default();
    assert!(note.starts_with("waits for local-a-") && note.contains("of pool local-a"), "{note:?}");
    let first = wait_for(Duration::from_secs(60), || async {
        let jobs = work::jobs(&client, &format!("workflow={wf}")).await?;
        jobs.iter().any(|j| j.state == JobState::Running).then_some(())
    })
    .await;
    let log = coord.log_text();
    let tail: String =
        log.lines().filter(|l| !l.contains("DEBUG")).rev().take(40).collect::<Vec<_>>().join("\n");
    assert!(first.is_some(), "nothing ran: {:#?}\n{tail}", pools(&client).await);
    eprintln!("submit -> first job running: {} ms", t0.elapsed().as_millis());
    let state = wait_for(Duration::from_secs(90), || work::finished(&client, &wf)).await;
    assert_eq!(state, Some(WorkflowState::Succeeded), "{:#?}", pools(&client).await);
    eprintln!("submit -> all done: {} ms", t0.elapsed().as_millis());
    let p = pools(&client).await;
    assert_eq!(p[0].history.launches, 3, "{:#?}", p[0]);
    let launched = pids(&p);
    assert_eq!(launched.len(), 3);
    // The nodes joined with the pool's attributes and are marked as its nodes.
    let fleet = agents(&client).await;
    for a in &fleet {
        assert!(a.name.starts_with("local-a-"), "{}", a.name);
        assert_eq!(a.pool.as_deref(), Some("local-a"), "marked as the pool's node");
        assert_eq!(a.jurisdiction.as_deref(), Some("EU"));
        assert_eq!(a.region.as_deref(), Some("here"));
    }
    let j = work::job(&client, &format!("{wf}.j0")).await.expect("job");
    assert!(j.attempts[0].agents[0].starts_with("local-a-"));
    // Idle for 3 s (then drained, then terminated): every node goes, every process exits.
    let gone = wait_for(Duration::from_secs(30), || async {
        let p = pools(&client).await;
        (p.first()?.nodes.is_empty()).then_some(p)
    })
    .await
    .expect("idle nodes terminated");
    assert_eq!(gone[0].history.terminations, 3);
    // Spend: 10 jobs of 2 s on one GPU at 1.0 per GPU-hour, counted on the pool and the
    // workflow alike.
    let expect = 10.0 * 2.0 / 3600.0;
    assert!((gone[0].spend - expect).abs() < expect * 0.5, "pool spend {}", gone[0].spend);
    let wfs: Vec<work::WorkflowSummary> = client.get_json("/api/v1/workflows").await?;
    assert!((wfs[0].cost - gone[0].spend).abs() < 1e-9, "{} vs {}", wfs[0].cost, gone[0].spend);
    assert!(gone[0].history.idle_gpu_hours > 0.0, "{:#?}", gone[0].history);
    let dead = wait_for(Duration::from_secs(10), || async {
        launched.iter().all(|p| !alive(*p)).then_some(())
    })
    .await;
    assert!(dead.is_some(), "a terminated node's agent still runs");
    // Every launch and terminate is in the audit trail.
    let audit: Vec<fleetmesh_api::trust::AuditRecord> = client.get_json("/api/v1/audit").await?;
    let count = |e: &str| audit.iter().filter(|r| r.event == e).count();
    assert_eq!((count("pool-launch"), count("pool-terminate")), (3, 3));
    let metrics = client.get_text("/metrics").await?;
    for series in [
        "fleetmesh_pool_launches_total{pool=\"local-a\"} 3",
        "fleetmesh_pool_terminations_total{pool=\"local-a\"} 3",
        "fleetmesh_pool_nodes{pool=\"local-a\",state=\"joined\"} 0",
        "fleetmesh_pool_launch_failures_total{pool=\"local-a\"} 0",
    ] {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
    assert!(metrics.contains("fleetmesh_pool_idle_gpu_hours_total{pool=\"local-a\"}"));
    assert!(metrics.contains("fleetmesh_pool_spend_total{pool=\"local-a\"}"));
    assert!(metrics.contains(&format!("fleetmesh_workflow_spend_total{{workflow=\"{wf}\"}}")));
    let listing = coord.cli(&pki, &["pools"]).await?;
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(text.contains("local-a") && text.contains("3 (0 failed)"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_out_of_capacity_backs_off_and_the_job_runs_on_the_next() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let full: PathBuf = work.path().join("no-capacity");
    std::fs::write(
        &full,
        "#!/bin/sh\necho 'InsufficientInstanceCapacity: no H100 in eu-west-1' >&2\nexit 1\n",
    )?;
    std::fs::set_permissions(&full, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let cheap = local_pool("cheap", 0.5, 2, work.path()).replace(
        &format!("launch = [\"{}\", \"launch\"", local_program()),
        &format!("launch = [\"{}\", \"launch\"", full.display()),
    );
    let config = format!("{cheap}{}", local_pool("backup", 2.0, 2, work.path()));
    let coord = coordinator(&pki, work.path(), &config).await?;
    let client = coord.client(&pki)?;
    let t0 = Instant::now();
    let wf = work::submit(
        &client,
        "name: one\njobs:\n  j:\n    command: [\"true\"]\n    resources: { gpus: 1 }\n",
    )
    .await?;
    let j =
        work::wait_job(&client, &format!("{wf}.j"), JobState::Succeeded, Duration::from_secs(60))
            .await;
    eprintln!(
        "submit -> running on the second pool: {} ms",
        j.attempts[0].started_unix_ms.unwrap_or(0).saturating_sub(j.submitted_unix_ms)
    );
    assert!(t0.elapsed() < Duration::from_secs(60));
    assert_eq!(j.attempts[0].agents, ["backup-1"]);
    let p = pools(&client).await;
    let cheap = p.iter().find(|p| p.spec.name == "cheap").expect("pool");
    assert!(cheap.history.launch_failures >= 1);
    let why = cheap.history.last_failure.clone().unwrap_or_default();
    assert!(why.contains("InsufficientInstanceCapacity"), "{why}");
    let backup = p.iter().find(|p| p.spec.name == "backup").expect("pool");
    // Its node may already be idle and on its way out: what it did is in its history.
    assert_eq!((backup.history.launches, backup.history.launch_failures), (1, 0));
    let shown = coord.cli(&pki, &["pools", "show", "cheap"]).await?;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("last failure:") && text.contains("InsufficientInstanceCapacity"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_token_is_refused_once_its_pool_is_no_longer_configured() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = coordinator(&pki, work.path(), &local_pool("here", 1.0, 1, work.path())).await?;
    let client = coord.client(&pki)?;
    let token = |pool: &str| serde_json::json!({ "labels": { "fleetmesh.pool": pool }, "name": format!("from-{pool}") });
    let gone: fleetmesh_api::trust::TokenCreated =
        client.post_json("/api/v1/tokens", &token("gone")).await?;
    let data = work.path().join("agent-gone");
    let agent = |join: &str, data: &Path| {
        std::process::Command::new(bin("fleetmesh-agent"))
            .args(["--join", join, "--data-dir", data.to_str().unwrap_or_default()])
            .output()
    };
    let out = agent(&gone.join, &data)?;
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("pool gone, which is no longer configured"), "{text}");
    assert!(agents(&client).await.is_empty());
    Ok(())
}

/// A metadata service on loopback: 404 until armed, then an AWS-style instance-action
/// notice giving the node `grace_s` seconds.
async fn notice_server(
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    grace_s: u64,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/latest/meta-data/spot/instance-action", l.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let reply = if armed.load(std::sync::atomic::Ordering::SeqCst) {
                let at = fleetmesh_data::now_unix_ms() + grace_s * 1000;
                let body = format!(
                    "{{\"action\": \"terminate\", \"time\": \"{}\"}}",
                    fleetmesh_api::rfc3339_ms(at)
                );
                format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())
            } else {
                "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
            };
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    Ok(url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_interruption_notice_moves_the_job_off_spot_with_grace_and_no_retry(
) -> anyhow::Result<()> {
    use fleetmesh_integration::AgentProc;
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = notice_server(armed.clone(), 30).await?;
    let attrs = fleetmesh_integration::attrs("r", "EU", "p");
    let spot = ["--spot", "--price-per-hour", "0.5", "--interruption-notice-url", &url];
    let gpu = Some("1xH100-80GB");
    let _spot = AgentProc::start_extra(
        &pki,
        coord.control,
        "spot",
        attrs.clone(),
        gpu,
        &spot,
        work.path(),
    )?;
    let steady = ["--price-per-hour", "2.0"];
    let _steady =
        AgentProc::start_extra(&pki, coord.control, "steady", attrs, gpu, &steady, work.path())?;
    wait_for(Duration::from_secs(20), || async {
        (agents(&client).await.len() == 2).then_some(())
    })
    .await
    .expect("agents up");
    tokio::time::sleep(Duration::from_millis(1500)).await; // a telemetry sample each
    let records = work.path().join("records");
    std::fs::create_dir_all(&records)?;
    let yaml = format!(
        "name: ckpt\njobs:\n  train:\n    resources: {{ gpus: 1 }}\n    env: {{ R: \"{}\" }}\n    script: |\n      trap 'echo checkpointed > \"$R/term-$FLEETMESH_ATTEMPT\"; exit 0' TERM\n      sleep 60 & wait\n",
        records.display()
    );
    let wf = work::submit(&client, &yaml).await?;
    let id = format!("{wf}.train");
    let j = work::wait_job(&client, &id, JobState::Running, Duration::from_secs(30)).await;
    assert_eq!(j.attempts[0].agents, ["spot"], "the cheaper spot node first");
    tokio::time::sleep(Duration::from_millis(500)).await;
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let moved = wait_for(Duration::from_secs(30), || async {
        let j = work::job(&client, &id).await?;
        (j.state == JobState::Running && j.attempts.len() == 2).then_some(j)
    })
    .await
    .expect("the job moved");
    assert_eq!(moved.attempts[1].agents, ["steady"], "off spot");
    assert_eq!(moved.failures, 0, "no retry used");
    // The first attempt got SIGTERM and could checkpoint.
    let term = wait_for(Duration::from_secs(10), || async {
        std::fs::read_to_string(records.join("term-1")).ok()
    })
    .await;
    assert_eq!(term.as_deref(), Some("checkpointed\n"));
    assert!(coord.log_text().contains("agent interrupted: draining it"), "no drain logged");
    Ok(())
}

/// The Python tools the AWS test needs (moto's EC2 server and the `aws` CLI), as
/// `scripts/test.sh` installs them.
fn test_venv() -> Option<PathBuf> {
    let v = std::env::var_os("FLEETMESH_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv"));
    (v.join("bin/moto_server").exists() && v.join("bin/aws").exists()).then_some(v)
}

/// `aws ec2 ARGS` against moto on `endpoint`.
fn aws(venv: &Path, endpoint: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(venv.join("bin/aws"))
        .args(["ec2", "--region", "eu-west-1", "--output", "json"])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_ENDPOINT_URL", endpoint)
        .output()?;
    anyhow::ensure!(out.status.success(), "aws {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_ec2_program_launches_an_instance_whose_user_data_joins_as_the_pool_node(
) -> anyhow::Result<()> {
    let Some(venv) = test_venv() else {
        eprintln!("SKIPPED: moto_server and aws not found in target/test-venv (scripts/test.sh installs them from PyPI)");
        return Ok(());
    };
    let port = fleetmesh_integration::free_tcp_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut moto = std::process::Command::new(venv.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let up = wait_for(Duration::from_secs(30), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    })
    .await;
    anyhow::ensure!(up.is_some(), "moto_server did not start");
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let prog = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/pools/aws-ec2")
        .display()
        .to_string();
    let env = format!(
        r#""env", "PATH={}:/usr/bin:/bin", "AWS_ACCESS_KEY_ID=test", "AWS_SECRET_ACCESS_KEY=test", "AWS_ENDPOINT_URL={endpoint}""#,
        venv.join("bin").display()
    );
    let pool = format!(
        r#"
[[pool]]
name = "aws-eu"
provider = "aws"
region = "eu-west-1"
jurisdiction = "EU"
labels = {{ tier = "burst" }}
gpus = "1 x H100-80GB"
cpus = 4
spot = true
max-nodes = 1
boot-timeout = "60s"
idle-timeout = "3s"
launch = [{env}, "{prog}", "launch", "--region", "eu-west-1", "--image-id", "ami-12c6146b", "--instance-type", "p4d.24xlarge"]
terminate = [{env}, "{prog}", "terminate", "--region", "eu-west-1"]
"#
    );
    let coord = coordinator(&pki, work.path(), &pool).await?;
    let client = coord.client(&pki)?;
    let wf = work::submit(
        &client,
        "name: cloud\njobs:\n  j:\n    command: [\"true\"]\n    resources: { gpus: 1 }\n",
    )
    .await?;
    // The launch made an EC2 instance, as spot, tagged with its pool and node.
    let instance = wait_for(Duration::from_secs(30), || async {
        pools(&client).await.first()?.nodes.first()?.instance.clone()
    })
    .await
    .expect("an instance was launched");
    let d = aws(&venv, &endpoint, &["describe-instances", "--instance-ids", &instance])?;
    let i = &d["Reservations"][0]["Instances"][0];
    assert_eq!(i["InstanceType"], "p4d.24xlarge");
    assert_eq!(i["InstanceLifecycle"], "spot");
    let tags: Vec<String> = i["Tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            format!("{}={}", t["Key"].as_str().unwrap_or(""), t["Value"].as_str().unwrap_or(""))
        })
        .collect();
    assert!(
        tags.contains(&"fleetmesh:pool=aws-eu".to_string())
            && tags.contains(&"fleetmesh:node=aws-eu-1".to_string()),
        "{tags:?}"
    );
    // Its user data joins with a single-use string: read it back and boot the node here.
    let ud = aws(
        &venv,
        &endpoint,
        &["describe-instance-attribute", "--instance-id", &instance, "--attribute", "userData"],
    )?;
    let script = String::from_utf8(base64_decode(ud["UserData"]["Value"].as_str().unwrap_or(""))?)?;
    assert!(script.contains("--interruption-notice-url http://169.254.169.254/latest/meta-data/spot/instance-action"), "{script}");
    let join = script
        .split_whitespace()
        .skip_while(|w| *w != "--join")
        .nth(1)
        .map(|w| w.trim_matches('\'').to_string())
        .unwrap_or_default();
    let parsed: fleetmesh_protocol::enroll::JoinString =
        join.parse().map_err(|e| anyhow::anyhow!("{e:?}: {join}"))?;
    assert!(!parsed.coordinators.is_empty());
    let data = work.path().join("instance");
    let mut node = fleetmesh_integration::AgentProc::start_args(
        "aws-eu-1",
        [
            "--join",
            join.as_str(),
            "--data-dir",
            data.to_str().unwrap_or_default(),
            "--simulate-gpus",
            "1xH100-80GB",
            "--spot",
        ]
        .map(String::from)
        .to_vec(),
        work.path(),
    )?;
    let j =
        work::wait_job(&client, &format!("{wf}.j"), JobState::Succeeded, Duration::from_secs(60))
            .await;
    assert_eq!(j.attempts[0].agents, ["aws-eu-1"]);
    let a = agents(&client).await.into_iter().find(|a| a.name == "aws-eu-1").expect("joined");
    assert_eq!(
        (a.region.as_deref(), a.jurisdiction.as_deref(), a.provider.as_deref()),
        (Some("eu-west-1"), Some("EU"), Some("aws"))
    );
    // Idle: terminated through the program, which EC2 shows.
    let state = wait_for(Duration::from_secs(30), || async {
        let d = aws(&venv, &endpoint, &["describe-instances", "--instance-ids", &instance]).ok()?;
        let s = d["Reservations"][0]["Instances"][0]["State"]["Name"].as_str()?.to_string();
        matches!(s.as_str(), "shutting-down" | "terminated").then_some(s)
    })
    .await;
    assert!(state.is_some(), "the instance was not terminated");
    node.kill9();
    let _ = moto.kill();
    let _ = moto.wait();
    Ok(())
}

fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    let out = std::process::Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().map(|mut i| i.write_all(s.as_bytes()));
            c.wait_with_output()
        })?;
    Ok(out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restart_keeps_a_booting_node_and_launches_nothing_twice(
) -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    // Nodes take 4 s to boot: the coordinator is killed while one does.
    let pool = local_pool("slow", 1.0, 3, work.path())
        .replace("\"launch\", \"--agent\"", "\"launch\", \"--boot-delay\", \"4\", \"--agent\"");
    let mut coord = coordinator(&pki, work.path(), &pool).await?;
    let client = coord.client(&pki)?;
    let wf = work::submit(
        &client,
        "name: r\njobs:\n  j:\n    command: [\"true\"]\n    resources: { gpus: 1 }\n",
    )
    .await?;
    let booting = wait_for(Duration::from_secs(20), || async {
        let n = pools(&client).await.first()?.nodes.first()?.clone();
        n.instance.is_some().then_some(n)
    })
    .await
    .expect("a node is booting");
    coord.restart(&pki).await?;
    let client = coord.client(&pki)?;
    let after = pools(&client).await;
    assert_eq!(after[0].nodes.len(), 1, "{:#?}", after[0]);
    assert_eq!(after[0].nodes[0].instance, booting.instance, "the same instance, remembered");
    let j =
        work::wait_job(&client, &format!("{wf}.j"), JobState::Succeeded, Duration::from_secs(60))
            .await;
    assert_eq!(j.attempts[0].agents, std::slice::from_ref(&booting.name));
    assert_eq!(pools(&client).await[0].history.launches, 1, "nothing launched twice");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_with_an_invalid_pool_refuses_to_start_naming_the_field() -> anyhow::Result<()>
{
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let config = work.path().join("bad.toml");
    std::fs::write(&config, "[[pool]]\nname = \"gpu\"\ngpus = \"eight H100\"\nmax-nodes = 2\nlaunch = [\"x\"]\nterminate = [\"y\"]\n")?;
    pki.issue(fleetmesh_protocol::PeerKind::Coordinator, "main", Default::default())?;
    let out = std::process::Command::new(bin("fleetmesh-coordinator"))
        .args(["--config", config.to_str().unwrap_or_default(), "--data-dir"])
        .arg(work.path().join("coord"))
        .args(["--ca", pki.ca_pem().to_str().unwrap_or_default()])
        .arg("--cert")
        .arg(pki.path().join("coordinator-main.pem"))
        .arg("--key")
        .arg(pki.path().join("coordinator-main.key"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("pool \"gpu\", field `gpus`: \"eight H100\" is not N x MODEL-MEM"),
        "{err}"
    );
    Ok(())
}
