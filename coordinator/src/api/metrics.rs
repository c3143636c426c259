//! `/metrics` in Prometheus/OpenMetrics text format, rendered from a Fleet snapshot at
//! scrape time (agents come and go, so a fresh registry per scrape never exports series
//! of agents that no longer report).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use fleetmesh_api::jobs::WorkflowSummary;
use fleetmesh_api::pools::{NodeState, PoolView};

use crate::fleet::liveness::AgentState;
use crate::fleet::views::{AgentView, IngestStats};

type Labels = Vec<(String, String)>;
type GaugeF = Gauge<f64, AtomicU64>;

/// Render the metrics text for the given agents and pools.
pub fn render(
    agents: &[AgentView],
    ingest: &IngestStats,
    pools: &[PoolView],
    workflows: &[WorkflowSummary],
) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("fleetmesh");
    register_pools(&mut reg, pools);
    let spend = Family::<Labels, Counter<f64, AtomicU64>>::default();
    for w in workflows {
        spend.get_or_create(&vec![("workflow".into(), w.id.clone())]).inc_by(w.cost);
    }
    reg.register("workflow_spend", "What a workflow's attempts have cost", spend);

    let agents_by_state = Family::<Labels, Gauge>::default();
    for s in AgentState::ALL {
        let n = agents.iter().filter(|a| a.state == s).count() as i64;
        agents_by_state.get_or_create(&vec![("state".into(), s.as_str().into())]).set(n);
    }
    reg.register("agents", "Agents known to the coordinator, by liveness state", agents_by_state);

    let util = Family::<Labels, GaugeF>::default();
    let mem_used = Family::<Labels, GaugeF>::default();
    let mem_total = Family::<Labels, GaugeF>::default();
    let temp = Family::<Labels, GaugeF>::default();
    let power = Family::<Labels, GaugeF>::default();
    let power_limit = Family::<Labels, GaugeF>::default();
    let mut gpus = 0i64;
    let mut total_mem = 0f64;
    let mut used_mem = 0f64;
    let mut util_sum = 0f64;
    let mut util_n = 0u32;
    for a in
        agents.iter().filter(|a| matches!(a.state, AgentState::Connected | AgentState::Suspect))
    {
        for g in &a.gpus {
            let labels: Labels = vec![
                ("agent".into(), a.name.clone()),
                ("gpu".into(), g.index.to_string()),
                ("uuid".into(), g.uuid.clone()),
                ("model".into(), g.name.clone()),
                ("simulated".into(), g.simulated.to_string()),
            ];
            gpus += 1;
            total_mem += g.memory_total_bytes as f64;
            mem_total.get_or_create(&labels).set(g.memory_total_bytes as f64);
            if let Some(u) = g.utilization_gpu {
                util.get_or_create(&labels).set(f64::from(u));
                util_sum += f64::from(u);
                util_n += 1;
            }
            if let Some(m) = g.memory_used_bytes {
                mem_used.get_or_create(&labels).set(m as f64);
                used_mem += m as f64;
            }
            if let Some(t) = g.temperature_c {
                temp.get_or_create(&labels).set(f64::from(t));
            }
            if let Some(p) = g.power_w {
                power.get_or_create(&labels).set(p);
            }
            if let Some(p) = g.power_limit_w {
                power_limit.get_or_create(&labels).set(p);
            }
        }
    }
    reg.register("gpu_utilization_percent", "GPU utilisation", util);
    reg.register("gpu_memory_used_bytes", "GPU memory in use", mem_used);
    reg.register("gpu_memory_total_bytes", "GPU memory installed", mem_total);
    reg.register("gpu_temperature_celsius", "GPU temperature", temp);
    reg.register("gpu_power_watts", "GPU power draw", power);
    reg.register("gpu_power_limit_watts", "GPU enforced power limit", power_limit);

    let g = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    g.set(gpus);
    reg.register("fleet_gpus", "GPUs on connected or suspect agents", g);
    let g = GaugeF::default();
    g.set(total_mem);
    reg.register("fleet_gpu_memory_total_bytes", "GPU memory on connected or suspect agents", g);
    let g = GaugeF::default();
    g.set(used_mem);
    reg.register("fleet_gpu_memory_used_bytes", "GPU memory in use fleet-wide", g);
    let g = GaugeF::default();
    g.set(if util_n > 0 { util_sum / f64::from(util_n) } else { 0.0 });
    reg.register("fleet_gpu_utilization_mean_percent", "Mean GPU utilisation fleet-wide", g);

    let c = Counter::<u64>::default();
    c.inc_by(ingest.reports_applied);
    reg.register("telemetry_reports_applied", "Telemetry reports applied by the Fleet", c);
    let c = Counter::<u64>::default();
    c.inc_by(ingest.reports_ignored_stale);
    reg.register("telemetry_frames_stale", "Frames ignored because their session was replaced", c);

    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

/// Pool nodes by state, launches, failures, terminations, back-off, idle time and cost.
fn register_pools(reg: &mut Registry, pools: &[PoolView]) {
    const STATES: [(NodeState, &str); 5] = [
        (NodeState::Launching, "launching"),
        (NodeState::Booting, "booting"),
        (NodeState::Joined, "joined"),
        (NodeState::Draining, "draining"),
        (NodeState::Terminating, "terminating"),
    ];
    let nodes = Family::<Labels, Gauge>::default();
    let launches = Family::<Labels, Counter<u64>>::default();
    let failures = Family::<Labels, Counter<u64>>::default();
    let terminations = Family::<Labels, Counter<u64>>::default();
    let backing_off = Family::<Labels, Gauge>::default();
    let idle_hours = Family::<Labels, Counter<f64, AtomicU64>>::default();
    let idle_cost = Family::<Labels, Counter<f64, AtomicU64>>::default();
    let spend = Family::<Labels, Counter<f64, AtomicU64>>::default();
    for p in pools {
        let pool: Labels = vec![("pool".into(), p.spec.name.clone())];
        for (state, name) in STATES {
            let mut l = pool.clone();
            l.push(("state".into(), name.into()));
            nodes.get_or_create(&l).set(p.nodes.iter().filter(|n| n.state == state).count() as i64);
        }
        launches.get_or_create(&pool).inc_by(p.history.launches);
        failures.get_or_create(&pool).inc_by(p.history.launch_failures);
        terminations.get_or_create(&pool).inc_by(p.history.terminations);
        backing_off.get_or_create(&pool).set(i64::from(p.backing_off));
        idle_hours.get_or_create(&pool).inc_by(p.history.idle_gpu_hours);
        idle_cost.get_or_create(&pool).inc_by(p.history.idle_cost);
        spend.get_or_create(&pool).inc_by(p.spend);
    }
    reg.register("pool_nodes", "Pool nodes by state", nodes);
    reg.register("pool_launches", "Nodes a pool's launch program was run for", launches);
    reg.register("pool_launch_failures", "Launches that failed (the pool backed off)", failures);
    reg.register("pool_terminations", "Pool nodes terminated", terminations);
    reg.register("pool_backing_off", "1 while a pool waits after failures", backing_off);
    reg.register("pool_idle_gpu_hours", "GPU-hours pool nodes spent joined and idle", idle_hours);
    reg.register("pool_idle_cost", "What the idle GPU-hours cost at the pool's price", idle_cost);
    reg.register("pool_spend", "What attempts cost on the pool's nodes", spend);
}
