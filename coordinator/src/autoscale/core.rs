//! The autoscaler's decisions, with no I/O and no clock: from the jobs that wait (with
//! their specs and the residency of their inputs), the pool nodes the fleet shows, and
//! each pool's state, it decides which nodes to launch, drain and terminate. The actor
//! shell ([`super::Autoscaler`]) runs the programs and reports back.
//!
//! Scale-up packs the waiting jobs onto nodes of the pools that fit them (shape and
//! attributes checked as placement checks agents, residency included), in the order
//! the job's objective wants (cheapest price, or shortest observed boot), counting the
//! room on nodes that are booting or joined first: 100 waiting one-GPU jobs and 8-GPU
//! nodes are 13 nodes. A pool whose launch failed, or whose node did not join within
//! its boot timeout, backs off (doubling) and its demand goes to the next pool. Placement
//! still goes through bids: a new node joins, bids and wins like any other.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetmesh_protocol::data::residency_allows;
use fleetmesh_protocol::workflow::{JobSpec, Objective};

use super::pools::POOL_LABEL;
use crate::placement::auction::{self, Candidate};
pub use fleetmesh_api::pools::{NodeState, PoolHistory, PoolNode, PoolSpec};

/// First back-off after a failed launch; it doubles with each failure in a row...
pub const BACKOFF_FIRST_MS: u64 = 5_000;
/// ...up to this.
pub const BACKOFF_MAX_MS: u64 = 10 * 60_000;
/// A drained node must stay idle this long before it is terminated: an award sent just
/// before the drain has had time to arrive and be started.
pub const DRAIN_SETTLE_MS: u64 = 3_000;
/// Boot times remembered per pool (for the `fastest` objective).
const BOOT_SAMPLES: usize = 16;

/// A job that waits, as the autoscaler sees it.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub job: String,
    pub spec: Arc<JobSpec>,
    /// Jurisdictions its inputs allow (empty: anywhere).
    pub residency: Vec<String>,
    pub objective: Objective,
}

/// A pool node as the fleet shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetNode {
    pub connected: bool,
    /// Running or awarded attempts there.
    pub busy: bool,
    /// What those attempts leave free.
    pub free_gpus: u32,
    pub free_cpus: f64,
    pub free_memory_bytes: u64,
    /// What attempts have cost there so far.
    pub spend: f64,
}

/// What the autoscaler decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Issue a join token for `node` and run the pool's launch program.
    Launch { pool: String, node: String },
    /// No new awards for `node`.
    Drain { node: String },
    /// Run the pool's terminate program for `node` (its instance, if one was returned).
    Terminate { pool: String, node: String, instance: Option<String>, why: String },
}

/// Pools, their nodes and their history.
#[derive(Debug, Clone, Default)]
pub struct AutoscalerCore {
    pub pools: Vec<PoolSpec>,
    pub history: BTreeMap<String, PoolHistory>,
    pub nodes: BTreeMap<String, PoolNode>,
    /// Idle accounting is integrated between decisions.
    last_decision_unix_ms: Option<u64>,
    /// Terminations that failed, retried at the next decision (nothing is leaked).
    retry_terminate: Vec<(String, String)>,
    /// From the last decision: waiting job -> the booting (or just launched) node it
    /// was counted on.
    pub waits_for: BTreeMap<String, String>,
}

/// Room left on one node (existing or planned) while packing demand.
struct Bin {
    pool: usize,
    gpus: u32,
    cpus: f64,
    memory: u64,
    /// The node it is (none: one this decision launches).
    node: Option<String>,
    /// Not joined yet: a job packed here waits for it to boot.
    booting: bool,
}

impl AutoscalerCore {
    /// Pools from the config, with what was stored (nodes of pools no longer
    /// configured are kept, to be terminated).
    pub fn new(
        pools: Vec<PoolSpec>,
        history: BTreeMap<String, PoolHistory>,
        nodes: Vec<PoolNode>,
    ) -> Self {
        let nodes: BTreeMap<String, PoolNode> =
            nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        // Terminations a restart interrupted are run again.
        let retry_terminate = nodes
            .values()
            .filter(|n: &&PoolNode| n.state == NodeState::Terminating)
            .map(|n| (n.name.clone(), "terminating when the coordinator restarted".to_string()))
            .collect();
        Self {
            pools,
            history,
            nodes,
            last_decision_unix_ms: None,
            retry_terminate,
            waits_for: BTreeMap::new(),
        }
    }

    fn pool(&self, name: &str) -> Option<&PoolSpec> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// One decision: joins and idleness from `fleet`, boot timeouts, scale-down, then
    /// scale-up for `waiting` and `min_nodes`.
    pub fn decide(
        &mut self,
        waiting: &[Waiting],
        fleet: &BTreeMap<String, FleetNode>,
        now: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        for (node, why) in std::mem::take(&mut self.retry_terminate) {
            if let Some(n) = self.nodes.get(&node) {
                let (pool, instance) = (n.pool.clone(), n.instance.clone());
                actions.push(Action::Terminate { pool, node, instance, why });
            }
        }
        self.observe(fleet, now);
        self.time_out_boots(now, &mut actions);
        self.scale_down(fleet, now, &mut actions);
        self.scale_up(waiting, fleet, now, &mut actions);
        self.last_decision_unix_ms = Some(now);
        actions
    }

    /// Nodes that connected have joined; joined nodes' idleness and its cost.
    fn observe(&mut self, fleet: &BTreeMap<String, FleetNode>, now: u64) {
        let elapsed_h =
            self.last_decision_unix_ms.map_or(0.0, |t| now.saturating_sub(t) as f64 / 3.6e6);
        for n in self.nodes.values_mut() {
            let seen = fleet.get(&n.name);
            if let Some(f) = seen {
                n.spend = n.spend.max(f.spend);
            }
            let connected = seen.is_some_and(|f| f.connected);
            if connected && matches!(n.state, NodeState::Launching | NodeState::Booting) {
                n.state = NodeState::Joined;
                n.joined_unix_ms = Some(now);
                let h = self.history.entry(n.pool.clone()).or_default();
                h.failures = 0;
                h.boot_ms.push(now.saturating_sub(n.launched_unix_ms));
                if h.boot_ms.len() > BOOT_SAMPLES {
                    h.boot_ms.remove(0);
                }
            }
            if !matches!(n.state, NodeState::Joined | NodeState::Draining) {
                continue;
            }
            let busy = seen.is_some_and(|f| f.busy);
            if busy {
                n.idle_since_unix_ms = None;
            } else {
                let was_idle = n.idle_since_unix_ms.is_some();
                n.idle_since_unix_ms.get_or_insert(now);
                if let (true, Some(p)) = (was_idle, self.pools.iter().find(|p| p.name == n.pool)) {
                    let gpu_h = elapsed_h * f64::from(p.gpus.max(1));
                    let h = self.history.entry(n.pool.clone()).or_default();
                    h.idle_gpu_hours += gpu_h;
                    h.idle_cost += gpu_h * p.price_per_hour;
                }
            }
        }
    }

    /// Nodes that did not join within their pool's boot timeout are terminated, and the
    /// pool backs off.
    fn time_out_boots(&mut self, now: u64, actions: &mut Vec<Action>) {
        let late: Vec<(String, u64)> = self
            .nodes
            .values()
            .filter(|n| matches!(n.state, NodeState::Launching | NodeState::Booting))
            .filter_map(|n| {
                let timeout = self.pool(&n.pool).map_or(0, |p| p.boot_timeout_ms);
                (now >= n.launched_unix_ms + timeout).then(|| (n.name.clone(), timeout))
            })
            .collect();
        for (name, timeout) in late {
            let why = format!("{name} did not join within {} s", timeout / 1000);
            let Some(n) = self.nodes.get_mut(&name) else { continue };
            n.state = NodeState::Terminating;
            let (pool, instance) = (n.pool.clone(), n.instance.clone());
            self.back_off(&pool, &why, now);
            actions.push(Action::Terminate { pool, node: name, instance, why });
        }
    }

    /// Joined nodes idle past their pool's timeout are drained (down to `min_nodes`),
    /// and terminated once they stayed idle through the drain.
    fn scale_down(
        &mut self,
        fleet: &BTreeMap<String, FleetNode>,
        now: u64,
        actions: &mut Vec<Action>,
    ) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let Some(n) = self.nodes.get(&name) else { continue };
            let Some(p) = self.pool(&n.pool).cloned() else {
                // Its pool was removed from the config: it goes.
                if matches!(n.state, NodeState::Joined | NodeState::Booting) {
                    let why = format!("pool {} is no longer configured", n.pool);
                    actions.push(self.terminate(&name, why));
                }
                continue;
            };
            let idle_for = n.idle_since_unix_ms.map(|t| now.saturating_sub(t));
            match n.state {
                NodeState::Joined
                    if idle_for.is_some_and(|d| d >= p.idle_timeout_ms)
                        && self.live_nodes(&p.name) > p.min_nodes as usize =>
                {
                    if let Some(n) = self.nodes.get_mut(&name) {
                        n.state = NodeState::Draining;
                        n.drained_unix_ms = Some(now);
                    }
                    actions.push(Action::Drain { node: name });
                }
                NodeState::Draining => {
                    let busy = fleet.get(&name).is_some_and(|f| f.busy);
                    let settled = n.drained_unix_ms.is_some_and(|t| now >= t + DRAIN_SETTLE_MS);
                    if !busy && settled && idle_for.is_some_and(|d| d >= DRAIN_SETTLE_MS) {
                        let why = format!("idle for {} s", idle_for.unwrap_or(0) / 1000);
                        actions.push(self.terminate(&name, why));
                    }
                }
                _ => {}
            }
        }
    }

    fn terminate(&mut self, name: &str, why: String) -> Action {
        let n = self.nodes.get_mut(name);
        let (pool, instance) = n
            .map(|n| {
                n.state = NodeState::Terminating;
                (n.pool.clone(), n.instance.clone())
            })
            .unwrap_or_default();
        Action::Terminate { pool, node: name.to_string(), instance, why }
    }

    /// Nodes of a pool that count against its size (not being terminated).
    fn live_nodes(&self, pool: &str) -> usize {
        self.nodes.values().filter(|n| n.pool == pool && n.state != NodeState::Terminating).count()
    }

    /// Launch what the waiting jobs need beyond the room pool nodes already have, and
    /// what `min_nodes` asks for.
    fn scale_up(
        &mut self,
        waiting: &[Waiting],
        fleet: &BTreeMap<String, FleetNode>,
        now: u64,
        actions: &mut Vec<Action>,
    ) {
        let mut bins = self.existing_bins(fleet);
        let mut planned = vec![0usize; self.pools.len()];
        let mut first_rank: Vec<(String, usize)> = Vec::new();
        for w in waiting {
            let order = self.pools_for(w, now);
            // A gang's ranks go to distinct nodes.
            let mut mine: Vec<usize> = Vec::new();
            'ranks: for _ in 0..w.spec.nodes.max(1) {
                for &pi in &order {
                    let free = (0..bins.len()).find(|i| {
                        !mine.contains(i) && bins[*i].pool == pi && fits_in(&bins[*i], &w.spec)
                    });
                    if let Some(i) = free {
                        take(&mut bins[i], &w.spec);
                        mine.push(i);
                        continue 'ranks;
                    }
                    let p = &self.pools[pi];
                    if self.live_nodes(&p.name) + planned[pi] < p.max_nodes as usize {
                        planned[pi] += 1;
                        let mut b = Bin {
                            pool: pi,
                            gpus: p.gpus,
                            cpus: f64::from(p.cpus),
                            memory: p.memory_bytes,
                            node: None,
                            booting: true,
                        };
                        take(&mut b, &w.spec);
                        mine.push(bins.len());
                        bins.push(b);
                        continue 'ranks;
                    }
                }
                break; // no pool has room for this job: the rest of its ranks neither
            }
            if let Some(&b) = mine.first() {
                first_rank.push((w.job.clone(), b));
            }
        }
        for (pi, p) in self.pools.iter().enumerate() {
            let short = (p.min_nodes as usize).saturating_sub(self.live_nodes(&p.name));
            planned[pi] = planned[pi].max(short);
        }
        for (pi, n) in planned.into_iter().enumerate() {
            // The bins planned for this pool get the names of the nodes launched now.
            let mut unnamed: Vec<usize> =
                (0..bins.len()).filter(|&i| bins[i].pool == pi && bins[i].node.is_none()).collect();
            unnamed.reverse();
            for _ in 0..n {
                let launch = self.new_node(pi, now);
                if let (Action::Launch { node, .. }, Some(i)) = (&launch, unnamed.pop()) {
                    bins[i].node = Some(node.clone());
                }
                actions.push(launch);
            }
        }
        self.waits_for = first_rank
            .into_iter()
            .filter(|(_, b)| bins[*b].booting)
            .filter_map(|(job, b)| Some((job, bins[b].node.clone()?)))
            .collect();
    }

    /// Room on pool nodes that are booting (all of it) or joined (what the fleet shows
    /// free), so demand is not launched twice while nodes come up.
    fn existing_bins(&self, fleet: &BTreeMap<String, FleetNode>) -> Vec<Bin> {
        let mut bins = Vec::new();
        for n in self.nodes.values() {
            let Some(pi) = self.pools.iter().position(|p| p.name == n.pool) else { continue };
            let p = &self.pools[pi];
            let full = Bin {
                pool: pi,
                gpus: p.gpus,
                cpus: f64::from(p.cpus),
                memory: p.memory_bytes,
                node: Some(n.name.clone()),
                booting: true,
            };
            match n.state {
                NodeState::Launching | NodeState::Booting => bins.push(full),
                NodeState::Joined => {
                    let f = fleet.get(&n.name).cloned().unwrap_or_default();
                    bins.push(Bin {
                        gpus: f.free_gpus.min(p.gpus),
                        cpus: f.free_cpus.min(full.cpus),
                        memory: f.free_memory_bytes.min(full.memory),
                        booting: false,
                        ..full
                    });
                }
                NodeState::Draining | NodeState::Terminating => {}
            }
        }
        bins
    }

    /// Pools that fit `w` and are not backing off, best first for its objective.
    fn pools_for(&self, w: &Waiting, now: u64) -> Vec<usize> {
        let mut fit: Vec<usize> = (0..self.pools.len())
            .filter(|&i| fits_pool(&self.pools[i], w))
            .filter(|&i| {
                self.history.get(&self.pools[i].name).is_none_or(|h| now >= h.backoff_until_unix_ms)
            })
            .collect();
        let boot = |i: &usize| self.expected_boot_ms(&self.pools[*i]);
        match w.objective {
            Objective::Fastest => fit.sort_by_key(|i| (boot(i), self.pools[*i].name.clone())),
            Objective::Cheapest | Objective::Balanced => fit.sort_by(|a, b| {
                let (pa, pb) = (&self.pools[*a], &self.pools[*b]);
                pa.price_per_hour
                    .total_cmp(&pb.price_per_hour)
                    .then(boot(a).cmp(&boot(b)))
                    .then(pa.name.cmp(&pb.name))
            }),
        }
        fit
    }

    /// Median observed boot time; half the boot timeout before any was seen.
    fn expected_boot_ms(&self, p: &PoolSpec) -> u64 {
        let mut seen = self.history.get(&p.name).map(|h| h.boot_ms.clone()).unwrap_or_default();
        if seen.is_empty() {
            return p.boot_timeout_ms / 2;
        }
        seen.sort_unstable();
        seen[seen.len() / 2]
    }

    fn new_node(&mut self, pi: usize, now: u64) -> Action {
        let pool = self.pools[pi].name.clone();
        let h = self.history.entry(pool.clone()).or_default();
        h.next_node += 1;
        h.launches += 1;
        let name = format!("{pool}-{}", h.next_node);
        self.nodes.insert(
            name.clone(),
            PoolNode {
                name: name.clone(),
                pool: pool.clone(),
                instance: None,
                state: NodeState::Launching,
                launched_unix_ms: now,
                joined_unix_ms: None,
                idle_since_unix_ms: None,
                drained_unix_ms: None,
                spend: 0.0,
            },
        );
        Action::Launch { pool, node: name }
    }

    /// The launch program returned `instance` for `node`.
    pub fn launched(&mut self, node: &str, instance: String) {
        let Some(n) = self.nodes.get_mut(node) else { return };
        // The node may have joined before its program returned: the id is kept anyway,
        // or the node could not be terminated.
        n.instance.get_or_insert(instance);
        if n.state == NodeState::Launching {
            n.state = NodeState::Booting;
        }
    }

    /// The launch program failed for `node`: it is forgotten and its pool backs off.
    pub fn launch_failed(&mut self, node: &str, reason: &str, now: u64) {
        if let Some(n) = self.nodes.remove(node) {
            self.back_off(&n.pool, reason, now);
            self.history.entry(n.pool).or_default().launch_failures += 1;
        }
    }

    /// The terminate program failed for `node`: it is run again next time.
    pub fn terminate_failed(&mut self, node: &str, reason: &str) {
        if let Some(n) = self.nodes.get(node) {
            let why = format!("retrying after: {reason}");
            self.history.entry(n.pool.clone()).or_default().last_failure = Some(why.clone());
            self.retry_terminate.push((node.to_string(), why));
        }
    }

    /// The pools as the API shows them.
    pub fn view(&self, now: u64) -> Vec<fleetmesh_api::pools::PoolView> {
        self.pools
            .iter()
            .map(|p| {
                let history = self.history.get(&p.name).cloned().unwrap_or_default();
                let nodes: Vec<PoolNode> =
                    self.nodes.values().filter(|n| n.pool == p.name).cloned().collect();
                fleetmesh_api::pools::PoolView {
                    spec: p.clone(),
                    backing_off: now < history.backoff_until_unix_ms,
                    spend: history.spend_of_terminated + nodes.iter().map(|n| n.spend).sum::<f64>(),
                    history,
                    nodes,
                }
            })
            .collect()
    }

    /// The terminate program succeeded for `node`.
    pub fn terminated(&mut self, node: &str) {
        if let Some(n) = self.nodes.remove(node) {
            let h = self.history.entry(n.pool).or_default();
            h.terminations += 1;
            h.spend_of_terminated += n.spend;
        }
    }

    fn back_off(&mut self, pool: &str, why: &str, now: u64) {
        let h = self.history.entry(pool.to_string()).or_default();
        h.failures += 1;
        let shift = (h.failures - 1).min(16);
        let wait = BACKOFF_FIRST_MS.saturating_mul(1 << shift).min(BACKOFF_MAX_MS);
        h.backoff_until_unix_ms = now + wait;
        h.last_failure = Some(why.to_string());
    }
}

/// Whether one node of pool `p` could take job `w`: the shape and attributes checked as
/// placement checks an agent, and the residency of its inputs.
pub fn fits_pool(p: &PoolSpec, w: &Waiting) -> bool {
    let mut labels = p.labels.clone();
    labels.insert(POOL_LABEL.to_string(), p.name.clone());
    let model = p.gpu_model.clone().unwrap_or_default();
    let shape = Candidate {
        agent: p.name.clone(),
        connected: true,
        draining: false,
        region: p.region.clone(),
        jurisdiction: p.jurisdiction.clone(),
        provider: p.provider.clone(),
        labels,
        spot: p.spot,
        price_per_hour: p.price_per_hour,
        free_gpus: (0..p.gpus).map(|_| (model.clone(), p.gpu_memory_bytes)).collect(),
        gpu_uuids: Vec::new(),
        addr: None,
        data_addr: None,
        cpus: p.cpus,
        memory_bytes: p.memory_bytes,
        used_cpus: 0.0,
        used_memory_bytes: 0,
        hostname: None,
        host_addrs: Vec::new(),
    };
    auction::eligible(&w.spec, &shape).is_ok()
        && residency_allows(&w.residency, p.jurisdiction.as_deref())
}

fn fits_in(b: &Bin, spec: &JobSpec) -> bool {
    let r = &spec.resources;
    b.gpus >= r.gpus && b.cpus + auction::CPU_EPSILON >= r.cpus && b.memory >= r.memory_bytes
}

fn take(b: &mut Bin, spec: &JobSpec) {
    let r = &spec.resources;
    b.gpus -= r.gpus.min(b.gpus);
    b.cpus = (b.cpus - r.cpus).max(0.0);
    b.memory = b.memory.saturating_sub(r.memory_bytes);
}
