//! The autoscaler's decisions, driven deterministically: pools, waiting jobs and a
//! fleet the test writes, a clock it advances.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetmesh_protocol::workflow::{parse, JobSpec, Objective};

use super::core::*;
use super::pools::PoolSpec;

fn pool(name: &str, gpus: u32, price: f64, max: u32) -> PoolSpec {
    PoolSpec {
        name: name.into(),
        provider: Some("aws".into()),
        region: Some("eu-west-1".into()),
        jurisdiction: Some("EU".into()),
        labels: BTreeMap::new(),
        gpus,
        gpu_model: Some("H100".into()),
        gpu_memory_bytes: 80 << 30,
        cpus: 64,
        memory_bytes: 512 << 30,
        price_per_hour: price,
        spot: false,
        min_nodes: 0,
        max_nodes: max,
        boot_timeout_ms: 60_000,
        idle_timeout_ms: 30_000,
        launch: vec!["launch".into()],
        terminate: vec!["terminate".into()],
    }
}

fn spec(extra: &str) -> Arc<JobSpec> {
    let y = format!("name: w\njobs:\n  j:\n    command: [x]\n{extra}");
    Arc::new(parse(&y).unwrap().jobs.remove("j").unwrap())
}

fn waiting(n: usize, extra: &str) -> Vec<Waiting> {
    let s = spec(extra);
    (0..n)
        .map(|i| Waiting {
            job: format!("w.j{i}"),
            spec: s.clone(),
            residency: vec![],
            objective: Objective::Cheapest,
        })
        .collect()
}

fn launches(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Launch { pool, node } => Some((pool.clone(), node.clone())),
            _ => None,
        })
        .collect()
}

const GPU1: &str = "    resources: { gpus: 1 }\n";

#[test]
fn a_hundred_one_gpu_jobs_on_eight_gpu_nodes_launch_thirteen() {
    let mut a = AutoscalerCore::new(vec![pool("p", 8, 1.0, 50)], BTreeMap::new(), vec![]);
    let acts = a.decide(&waiting(100, GPU1), &BTreeMap::new(), 0);
    let l = launches(&acts);
    assert_eq!(l.len(), 13);
    assert_eq!(l[0], ("p".to_string(), "p-1".to_string()));
    // Each job is told which booting node it was counted on: 8 per node.
    assert_eq!(a.waits_for.len(), 100);
    assert_eq!(a.waits_for["w.j0"], "p-1");
    assert_eq!(a.waits_for["w.j99"], "p-13");
    // The next decision counts the booting nodes' room: nothing more.
    for (_, node) in &l {
        a.launched(node, format!("i-{node}"));
    }
    assert!(launches(&a.decide(&waiting(100, GPU1), &BTreeMap::new(), 1_000)).is_empty());
    // Capped by max_nodes.
    let mut small = AutoscalerCore::new(vec![pool("p", 8, 1.0, 4)], BTreeMap::new(), vec![]);
    assert_eq!(launches(&small.decide(&waiting(100, GPU1), &BTreeMap::new(), 0)).len(), 4);
}

#[test]
fn only_pools_that_fit_are_used_cheapest_first_and_residency_counts() {
    let mut us = pool("us-cheap", 8, 0.5, 10);
    us.jurisdiction = Some("US".into());
    us.region = Some("us-east-1".into());
    let pools = vec![pool("eu-dear", 8, 2.0, 10), us, pool("eu-ok", 8, 1.0, 10)];
    let mut a = AutoscalerCore::new(pools, BTreeMap::new(), vec![]);
    let mut w = waiting(1, GPU1);
    w[0].residency = vec!["EU".into()];
    assert_eq!(launches(&a.decide(&w, &BTreeMap::new(), 0))[0].0, "eu-ok");
    // A job no pool's shape can take launches nothing.
    let mut b = AutoscalerCore::new(vec![pool("p", 8, 1.0, 10)], BTreeMap::new(), vec![]);
    let big = waiting(1, "    resources: { gpus: 16 }\n");
    assert!(b.decide(&big, &BTreeMap::new(), 0).is_empty());
    let l4 = waiting(1, "    resources: { gpus: 1, gpu_model: \"*L4*\" }\n");
    assert!(b.decide(&l4, &BTreeMap::new(), 0).is_empty());
    let labelled = waiting(1, "    constraints: { labels: { fleetmesh.pool: p } }\n");
    assert_eq!(launches(&b.decide(&labelled, &BTreeMap::new(), 0)).len(), 1);
}

#[test]
fn a_failed_launch_backs_the_pool_off_and_moves_the_demand_to_the_next_pool() {
    let pools = vec![pool("a", 8, 1.0, 10), pool("b", 8, 2.0, 10)];
    let mut s = AutoscalerCore::new(pools, BTreeMap::new(), vec![]);
    let w = waiting(1, GPU1);
    let l = launches(&s.decide(&w, &BTreeMap::new(), 0));
    assert_eq!(l, [("a".to_string(), "a-1".to_string())]);
    s.launch_failed("a-1", "InsufficientInstanceCapacity", 100);
    let h = &s.history["a"];
    assert_eq!((h.failures, h.backoff_until_unix_ms), (1, 100 + BACKOFF_FIRST_MS));
    assert_eq!(h.last_failure.as_deref(), Some("InsufficientInstanceCapacity"));
    let l = launches(&s.decide(&w, &BTreeMap::new(), 200));
    assert_eq!(l, [("b".to_string(), "b-1".to_string())], "the demand moved to b");
    // b fails too; once a's back-off is over it is tried again, and a second failure
    // in a row doubles its back-off.
    s.launch_failed("b-1", "quota", 300);
    let again = 100 + BACKOFF_FIRST_MS;
    assert_eq!(launches(&s.decide(&w, &BTreeMap::new(), again))[0].1, "a-2");
    s.launch_failed("a-2", "InsufficientInstanceCapacity", again);
    assert_eq!(s.history["a"].backoff_until_unix_ms, again + 2 * BACKOFF_FIRST_MS);
    assert!(s.decide(&w, &BTreeMap::new(), again + 1).is_empty(), "both back off");
}

#[test]
fn a_node_that_does_not_join_in_time_is_terminated_and_one_that_joins_resets_the_pool() {
    let mut s = AutoscalerCore::new(vec![pool("p", 8, 1.0, 10)], BTreeMap::new(), vec![]);
    let w = waiting(1, GPU1);
    s.decide(&w, &BTreeMap::new(), 0);
    s.launched("p-1", "i-1".into());
    let acts = s.decide(&w, &BTreeMap::new(), 60_000);
    assert!(acts.contains(&Action::Terminate {
        pool: "p".into(),
        node: "p-1".into(),
        instance: Some("i-1".into()),
        why: "p-1 did not join within 60 s".into(),
    }));
    assert!(launches(&acts).is_empty(), "the pool backs off first");
    s.terminated("p-1");
    let l = launches(&s.decide(&w, &BTreeMap::new(), 60_000 + BACKOFF_FIRST_MS));
    assert_eq!(l[0].1, "p-2");
    s.launched("p-2", "i-2".into());
    let joined = BTreeMap::from([(
        "p-2".to_string(),
        FleetNode {
            connected: true,
            busy: false,
            free_gpus: 8,
            free_cpus: 64.0,
            free_memory_bytes: 512 << 30,
            spend: 0.0,
        },
    )]);
    s.decide(&[], &joined, 70_000);
    assert_eq!(s.nodes["p-2"].state, NodeState::Joined);
    assert_eq!(s.history["p"].failures, 0);
    assert_eq!(s.history["p"].boot_ms, [70_000 - (60_000 + BACKOFF_FIRST_MS)]);
}

#[test]
fn idle_nodes_are_drained_then_terminated_busy_ones_and_min_nodes_are_kept() {
    let mut p = pool("p", 8, 2.0, 10);
    p.min_nodes = 1;
    let mut s = AutoscalerCore::new(vec![p], BTreeMap::new(), vec![]);
    // min_nodes alone launches one.
    assert_eq!(launches(&s.decide(&[], &BTreeMap::new(), 0)).len(), 1);
    s.decide(&waiting(9, GPU1), &BTreeMap::new(), 0);
    for n in ["p-1", "p-2"] {
        s.launched(n, format!("i-{n}"));
    }
    let fleet = |busy2: bool| {
        BTreeMap::from([
            (
                "p-1".to_string(),
                FleetNode {
                    connected: true,
                    busy: false,
                    free_gpus: 8,
                    free_cpus: 64.0,
                    free_memory_bytes: 512 << 30,
                    spend: 0.0,
                },
            ),
            (
                "p-2".to_string(),
                FleetNode {
                    connected: true,
                    busy: busy2,
                    free_gpus: 8,
                    free_cpus: 64.0,
                    free_memory_bytes: 512 << 30,
                    spend: 0.0,
                },
            ),
        ])
    };
    s.decide(&[], &fleet(true), 1_000);
    // 30 s idle: p-1 goes down to min_nodes? No: p-2 is busy, p-1 idle, one node must stay.
    let acts = s.decide(&[], &fleet(true), 31_000);
    assert_eq!(acts, [Action::Drain { node: "p-1".into() }]);
    assert!(s.decide(&[], &fleet(true), 32_000).is_empty(), "settling");
    let acts = s.decide(&[], &fleet(true), 34_000);
    assert!(matches!(&acts[..], [Action::Terminate { node, .. }] if node == "p-1"), "{acts:?}");
    s.terminated("p-1");
    // p-2 goes idle, but it is the last node: min_nodes keeps it.
    s.decide(&[], &fleet(false), 40_000);
    assert!(s.decide(&[], &fleet(false), 100_000).is_empty());
    // Idle time was counted: p-1 for 30 s and more, 8 GPUs at 2.0/h.
    let h = &s.history["p"];
    assert!(h.idle_gpu_hours > 8.0 * 30.0 / 3600.0, "{}", h.idle_gpu_hours);
    assert!((h.idle_cost - h.idle_gpu_hours * 2.0).abs() < 1e-9);
}

#[test]
fn joined_room_is_counted_and_a_gang_needs_distinct_nodes() {
    let mut s = AutoscalerCore::new(vec![pool("p", 8, 1.0, 10)], BTreeMap::new(), vec![]);
    // A gang of 3 one-GPU ranks: three nodes, not one.
    let gang = waiting(1, "    resources: { gpus: 1 }\n    nodes: 3\n");
    assert_eq!(launches(&s.decide(&gang, &BTreeMap::new(), 0)).len(), 3);
    // A joined node's free GPUs are room too: 6 free take 6 waiting jobs, nothing launched.
    let mut j = AutoscalerCore::new(vec![pool("p", 8, 1.0, 10)], BTreeMap::new(), vec![]);
    j.decide(&waiting(1, GPU1), &BTreeMap::new(), 0);
    j.launched("p-1", "i".into());
    let fleet = BTreeMap::from([(
        "p-1".to_string(),
        FleetNode {
            connected: true,
            busy: true,
            free_gpus: 6,
            free_cpus: 62.0,
            free_memory_bytes: 1 << 30,
            spend: 0.0,
        },
    )]);
    let acts = j.decide(&waiting(6, GPU1), &fleet, 1_000);
    assert!(launches(&acts).is_empty(), "{acts:?}");
    let l = launches(&j.decide(&waiting(7, GPU1), &fleet, 2_000));
    assert_eq!(l, [("p".to_string(), "p-2".to_string())]);
    // Memory counts as well: 2 GiB does not fit the 1 GiB left on p-1, but p-2, still
    // booting, has room for it.
    let heavy = waiting(1, "    resources: { gpus: 1, memory: 2GiB }\n");
    assert!(launches(&j.decide(&heavy, &fleet, 3_000)).is_empty());
    let two_heavy = waiting(2, "    resources: { gpus: 8, memory: 2GiB }\n");
    assert_eq!(launches(&j.decide(&two_heavy, &fleet, 4_000)).len(), 1, "one fits p-2");
}

#[test]
fn a_node_that_joins_before_its_launch_program_returns_keeps_its_instance_id() {
    let mut s = AutoscalerCore::new(vec![pool("p", 8, 1.0, 10)], BTreeMap::new(), vec![]);
    s.decide(&waiting(1, GPU1), &BTreeMap::new(), 0);
    let joined = BTreeMap::from([(
        "p-1".to_string(),
        FleetNode {
            connected: true,
            busy: false,
            free_gpus: 8,
            free_cpus: 64.0,
            free_memory_bytes: 512 << 30,
            spend: 0.0,
        },
    )]);
    s.decide(&[], &joined, 100);
    assert_eq!(s.nodes["p-1"].state, NodeState::Joined);
    s.launched("p-1", "i-late".into());
    assert_eq!(s.nodes["p-1"].instance.as_deref(), Some("i-late"));
    assert_eq!(s.nodes["p-1"].state, NodeState::Joined);
}

#[test]
fn fastest_work_goes_to_the_pool_that_booted_quickest() {
    let mut slow = pool("cheap-slow", 8, 1.0, 10);
    slow.boot_timeout_ms = 600_000;
    let mut quick = pool("dear-quick", 8, 3.0, 10);
    quick.boot_timeout_ms = 600_000;
    let mut history = BTreeMap::new();
    history.insert(
        "cheap-slow".to_string(),
        PoolHistory { boot_ms: vec![240_000], ..Default::default() },
    );
    history.insert(
        "dear-quick".to_string(),
        PoolHistory { boot_ms: vec![30_000], ..Default::default() },
    );
    let mut s = AutoscalerCore::new(vec![slow, quick], history, vec![]);
    let mut w = waiting(1, GPU1);
    assert_eq!(launches(&s.decide(&w, &BTreeMap::new(), 0))[0].0, "cheap-slow", "cheapest first");
    let mut s2 = AutoscalerCore::new(s.pools.clone(), s.history.clone(), vec![]);
    w[0].objective = Objective::Fastest;
    assert_eq!(
        launches(&s2.decide(&w, &BTreeMap::new(), 0))[0].0,
        "dear-quick",
        "fastest boot first"
    );
}
