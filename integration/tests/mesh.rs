//! End-to-end mesh behaviour with real processes on loopback: agents appear with live
//! telemetry, a killed agent is marked lost within 3 s and comes back as itself, a
//! restarted coordinator keeps its registry and agents reconnect on their own.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleetmesh_coordinator::fleet::liveness::AgentState;
use fleetmesh_coordinator::fleet::views::AgentView;
use fleetmesh_integration::{agents, attrs, wait_for, AgentProc, CoordinatorProc, Pki};

fn by_name(v: Vec<AgentView>) -> BTreeMap<String, AgentView> {
    v.into_iter().map(|a| (a.name.clone(), a)).collect()
}

fn fully_reporting(a: &AgentView, gpus: usize) -> bool {
    a.state == AgentState::Connected
        && a.host.is_some()
        && a.gpus.len() == gpus
        && a.gpus.iter().all(|g| g.utilization_gpu.is_some() && g.memory_used_bytes.is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_report_live_telemetry_visible_in_cli_api_and_metrics() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;

    let started = Instant::now();
    let regions = [
        ("n1", "eu-west-1", "EU", "aws"),
        ("n2", "us-east-1", "US", "gcp"),
        ("n3", "eu-north-1", "EU", "onprem"),
    ];
    let mut procs = Vec::new();
    for (n, r, j, p) in regions {
        procs.push(AgentProc::start(
            &pki,
            coord.control,
            n,
            attrs(r, j, p),
            Some("4xH100-80GB"),
            work.path(),
        )?);
    }
    let first = wait_for(Duration::from_secs(2), || async {
        let m = by_name(agents(&client).await);
        (m.len() == 3 && m.values().all(|a| fully_reporting(a, 4))).then_some(m)
    })
    .await;
    let first = first.unwrap_or_else(|| {
        panic!("3 agents with telemetry within 2 s; log:\n{}", coord.log_text())
    });
    eprintln!("3 agents reporting after {:?}", started.elapsed());

    // Identity and attributes come from the certificates.
    for (n, r, j, p) in regions {
        let a = &first[n];
        assert_eq!(a.region.as_deref(), Some(r));
        assert_eq!(a.jurisdiction.as_deref(), Some(j));
        assert_eq!(a.provider.as_deref(), Some(p));
        assert_eq!(a.spiffe_id, format!("spiffe://mesh.test/agent/{n}"));
        assert_eq!(a.gpu_source, "simulated");
        assert!(a.gpus.iter().all(|g| g.simulated && g.memory_total_bytes == 80 << 30));
    }

    // Figures change over time.
    let changed = wait_for(Duration::from_secs(5), || async {
        let now = by_name(agents(&client).await);
        let differs = first.iter().all(|(n, a)| {
            now.get(n).is_some_and(|b| {
                b.last_seen_unix_ms > a.last_seen_unix_ms
                    && a.gpus
                        .iter()
                        .zip(&b.gpus)
                        .any(|(x, y)| x.memory_used_bytes != y.memory_used_bytes)
            })
        });
        differs.then_some(())
    })
    .await;
    assert!(changed.is_some(), "telemetry did not change over 5 s");

    // The CLI's JSON has the documented shape.
    let out = coord.cli(&pki, &["agents", "-o", "json"]).await?;
    assert!(out.status.success(), "cli failed: {}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let arr = json.as_array().expect("array");
    assert_eq!(arr.len(), 3);
    for a in arr {
        for k in ["name", "state", "region", "jurisdiction", "provider", "last_seen", "gpus"] {
            assert!(a.get(k).is_some(), "agent JSON lacks {k}: {a}");
        }
        assert_eq!(a["state"], "connected");
        for g in a["gpus"].as_array().expect("gpus") {
            for k in [
                "index",
                "uuid",
                "name",
                "simulated",
                "utilization_gpu",
                "memory_used_bytes",
                "memory_total_bytes",
                "temperature_c",
                "power_w",
            ] {
                assert!(g.get(k).is_some(), "gpu JSON lacks {k}: {g}");
            }
            assert_eq!(g["simulated"], true);
        }
    }

    // Show one agent with history; list GPUs fleet-wide.
    let detail: fleetmesh_coordinator::fleet::views::AgentDetail =
        client.get_json("/api/v1/agents/n2").await?;
    assert!(detail.history.len() >= 2, "history has {} points", detail.history.len());
    let gpus: Vec<fleetmesh_coordinator::fleet::views::GpuView> =
        client.get_json("/api/v1/gpus").await?;
    assert_eq!(gpus.len(), 12);
    let missing = client
        .get_json::<fleetmesh_coordinator::fleet::views::AgentDetail>("/api/v1/agents/nope")
        .await;
    assert!(matches!(
        missing,
        Err(fleetmesh_coordinator::client::ClientError::Api { status: 404, .. })
    ));

    // Prometheus metrics: per-GPU gauges with agent/gpu/uuid labels, fleet totals.
    let metrics = client.get_text("/metrics").await?;
    let uuid = &first["n1"].gpus[0].uuid;
    assert!(
        metrics.lines().any(|l| l.starts_with("fleetmesh_gpu_utilization_percent{")
            && l.contains("agent=\"n1\"")
            && l.contains("gpu=\"0\"")
            && l.contains(&format!("uuid=\"{uuid}\""))
            && l.contains("simulated=\"true\"")),
        "no per-GPU gauge in:\n{metrics}"
    );
    assert!(metrics.contains("fleetmesh_agents{state=\"connected\"} 3"), "{metrics}");
    assert!(metrics.contains("fleetmesh_fleet_gpus 12"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "fleetmesh_fleet_gpu_memory_total_bytes {}",
            12.0 * (80u64 << 30) as f64
        )),
        "{metrics}"
    );
    assert!(metrics.contains("fleetmesh_fleet_gpu_utilization_mean_percent"), "{metrics}");
    drop(procs);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_is_lost_within_3s_and_returns_as_same_identity() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let mut a = AgentProc::start(
        &pki,
        coord.control,
        "victim",
        attrs("r1", "EU", "aws"),
        Some("2xA100-40GB"),
        work.path(),
    )?;
    let _b = AgentProc::start(
        &pki,
        coord.control,
        "bystander",
        attrs("r1", "EU", "aws"),
        Some("1xL4-24GB"),
        work.path(),
    )?;
    let before = wait_for(Duration::from_secs(5), || async {
        let m = by_name(agents(&client).await);
        (m.len() == 2 && m.values().all(|a| fully_reporting(a, a.gpus.len().max(1)))).then_some(m)
    })
    .await
    .expect("agents up");
    // Let a few beats pass so the kill lands at a random point between them.
    tokio::time::sleep(Duration::from_millis(700)).await;

    let killed_at = Instant::now();
    a.kill9();
    let lost = wait_for(Duration::from_secs(5), || async {
        let m = by_name(agents(&client).await);
        (m.get("victim")?.state == AgentState::Lost).then(|| killed_at.elapsed())
    })
    .await
    .expect("victim never marked lost");
    eprintln!("marked lost {lost:?} after kill -9");
    assert!(lost < Duration::from_secs(3), "lost after {lost:?}");
    // The bystander is unaffected.
    assert_eq!(by_name(agents(&client).await)["bystander"].state, AgentState::Connected);

    a.spawn()?;
    let back = wait_for(Duration::from_secs(5), || async {
        let m = by_name(agents(&client).await);
        (m.get("victim")?.state == AgentState::Connected).then_some(m)
    })
    .await
    .expect("victim back");
    assert_eq!(back.len(), 2, "same identity, no duplicate entry");
    assert_eq!(back["victim"].first_seen, before["victim"].first_seen);
    assert_eq!(back["victim"].gpus.len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restart_keeps_registry_and_agents_reconnect() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let mut coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let mut procs = Vec::new();
    for n in ["a", "b", "c"] {
        procs.push(AgentProc::start(
            &pki,
            coord.control,
            n,
            attrs("r", "EU", "p"),
            Some("1xH100-80GB"),
            work.path(),
        )?);
    }
    wait_for(Duration::from_secs(5), || async {
        let m = agents(&client).await;
        (m.len() == 3 && m.iter().all(|a| a.state == AgentState::Connected)).then_some(())
    })
    .await
    .expect("agents up");

    // kill -9 after the registrations had a Fleet tick (100 ms) to be committed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    coord.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    coord.restart(&pki).await?;
    let right_after = by_name(client.get_json("/api/v1/agents").await?);
    let names: Vec<&str> = right_after.keys().map(String::as_str).collect();
    assert_eq!(names, ["a", "b", "c"], "registry lost agents across restart");
    for a in right_after.values() {
        assert_eq!(a.region.as_deref(), Some("r"));
        // Nobody has reconnected yet: known, but not claimed to be connected.
        assert_ne!(a.state, AgentState::Connected, "{} connected before reconnecting", a.name);
    }

    let reconnected = wait_for(Duration::from_secs(10), || async {
        let m = agents(&client).await;
        (m.len() == 3 && m.iter().all(|a| a.state == AgentState::Connected && a.host.is_some()))
            .then_some(())
    })
    .await;
    assert!(
        reconnected.is_some(),
        "agents did not reconnect by themselves; log:\n{}",
        coord.log_text()
    );
    for p in &procs {
        assert!(p.log_text().contains("reconnecting"), "agent {} log lacks a reconnect", p.name);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_makes_agent_leave_gracefully() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let mut a =
        AgentProc::start(&pki, coord.control, "polite", Default::default(), None, work.path())?;
    wait_for(Duration::from_secs(5), || async {
        (agents(&client).await.first()?.state == AgentState::Connected).then_some(())
    })
    .await
    .expect("agent up");
    let code = a.terminate();
    assert_eq!(code, Some(0), "agent exit code; log:\n{}", a.log_text());
    let state = agents(&client).await.first().map(|a| a.state);
    assert_eq!(state, Some(AgentState::Left), "left must be recorded before the agent exits");
    // On a machine without NVML the agent runs CPU-only and says so exactly once.
    if !a.log_text().contains("NVML initialised") {
        assert_eq!(a.log_text().matches("running as a CPU-only node").count(), 1);
    }
    // Left stays left (not lost) as time passes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(agents(&client).await.first().map(|a| a.state), Some(AgentState::Left));
    Ok(())
}
