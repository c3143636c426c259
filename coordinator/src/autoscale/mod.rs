//! `Autoscaler` actor: elastic capacity from the pools in the coordinator's config.
//! `pools.rs` reads and checks them; `core.rs` decides (pure, `now` passed in); this
//! shell asks the Scheduler what waits and the Fleet what runs, stores the pools' state
//! before acting on it, and runs the pools' programs (`program.rs`): a launch gets a
//! single-use join token carrying the pool's attributes and valid for its boot timeout.
//! Every launch and terminate is in the audit trail.

pub mod core;
pub mod pools;
pub mod program;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleetmesh_api::pools::PoolView;
use fleetmesh_api::trust::AuditRecord;
use fleetmesh_protocol::api::TokenSpec;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use self::core::{Action, AutoscalerCore, FleetNode, PoolHistory, PoolNode, PoolSpec};
use crate::fleet::FleetMsg;
use crate::persist::store::Store;
use crate::scheduler::SchedulerMsg;
use crate::trust::authority::AuthorityMsg;
use fleetmesh_data::now_unix_ms as now_ms;

/// How often the autoscaler decides.
const TICK: Duration = Duration::from_millis(500);
/// Longest it waits for the Scheduler's or the Fleet's answer.
const ASK_MS: u64 = 2000;
/// Longest a launch waits for its join token, or a record for the audit trail: the
/// Authority may be busy enrolling the nodes of a burst (these waits run off the actor).
const AUTHORITY_MS: u64 = 15_000;

pub enum AutoscalerMsg {
    Tick,
    Launched { node: String, instance: String },
    LaunchFailed { node: String, reason: String },
    Terminated { node: String },
    TerminateFailed { node: String, reason: String },
    List(RpcReplyPort<Vec<PoolView>>),
}

pub struct AutoscalerArgs {
    pub pools: Vec<PoolSpec>,
    pub store: Arc<Store>,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub fleet: ActorRef<FleetMsg>,
    pub authority: ActorRef<AuthorityMsg>,
}

pub struct AutoscalerState {
    core: AutoscalerCore,
    store: Arc<Store>,
    scheduler: ActorRef<SchedulerMsg>,
    fleet: ActorRef<FleetMsg>,
    authority: ActorRef<AuthorityMsg>,
    myself: ActorRef<AutoscalerMsg>,
}

/// What is stored: every pool's history and nodes.
#[derive(Serialize, Deserialize, Default)]
struct Stored {
    history: BTreeMap<String, PoolHistory>,
    nodes: Vec<PoolNode>,
}

pub struct Autoscaler;

impl Actor for Autoscaler {
    type Msg = AutoscalerMsg;
    type State = AutoscalerState;
    type Arguments = AutoscalerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AutoscalerMsg>,
        a: AutoscalerArgs,
    ) -> Result<AutoscalerState, ActorProcessingErr> {
        let stored: Stored = match a.store.pools()? {
            Some(bytes) => serde_json::from_slice(&bytes)?,
            None => Stored::default(),
        };
        if !a.pools.is_empty() || !stored.nodes.is_empty() {
            myself.send_interval(TICK, || AutoscalerMsg::Tick);
        }
        let core = AutoscalerCore::new(a.pools, stored.history, stored.nodes);
        Ok(AutoscalerState {
            core,
            store: a.store,
            scheduler: a.scheduler,
            fleet: a.fleet,
            authority: a.authority,
            myself,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<AutoscalerMsg>,
        msg: AutoscalerMsg,
        st: &mut AutoscalerState,
    ) -> Result<(), ActorProcessingErr> {
        let now = now_ms();
        match msg {
            AutoscalerMsg::Tick => return st.tick(now).await,
            AutoscalerMsg::Launched { node, instance } => {
                info!(agent_id = %node, %instance, "pool node launched");
                st.core.launched(&node, instance);
            }
            AutoscalerMsg::LaunchFailed { node, reason } => {
                warn!(agent_id = %node, %reason, "pool launch failed");
                st.core.launch_failed(&node, &reason, now);
            }
            AutoscalerMsg::Terminated { node } => {
                info!(agent_id = %node, "pool node terminated");
                st.core.terminated(&node);
            }
            AutoscalerMsg::TerminateFailed { node, reason } => {
                warn!(agent_id = %node, %reason, "pool terminate failed; retrying");
                st.core.terminate_failed(&node, &reason);
            }
            AutoscalerMsg::List(reply) => {
                crate::answer(reply, st.core.view(now));
                return Ok(());
            }
        }
        st.store()
    }
}

impl AutoscalerState {
    /// Ask what waits and what runs, decide, store the decision, then act on it.
    async fn tick(&mut self, now: u64) -> Result<(), ActorProcessingErr> {
        let demand = ractor::call_t!(self.scheduler, SchedulerMsg::Demand, ASK_MS);
        let candidates = ractor::call_t!(self.fleet, FleetMsg::Candidates, ASK_MS);
        let (Ok(demand), Ok(candidates)) = (demand, candidates) else {
            return Ok(()); // busy: decide next tick, never on a partial view
        };
        let mut fleet = BTreeMap::new();
        for c in candidates.iter().filter(|c| self.core.nodes.contains_key(&c.agent)) {
            let held = demand.held.get(&c.agent).copied().unwrap_or_default();
            let node = FleetNode {
                connected: c.connected,
                busy: held.attempts > 0,
                free_gpus: c.gpu_uuids.len().saturating_sub(held.gpus) as u32,
                free_cpus: (f64::from(c.cpus) - held.cpus).max(0.0),
                free_memory_bytes: c.memory_bytes.saturating_sub(held.memory_bytes),
                spend: demand.spend.get(&c.agent).copied().unwrap_or(0.0),
            };
            fleet.insert(c.agent.clone(), node);
        }
        let actions = self.core.decide(&demand.waiting, &fleet, now);
        let notes = self
            .core
            .waits_for
            .iter()
            .filter_map(|(job, node)| {
                let n = self.core.nodes.get(node)?;
                let since = fleetmesh_api::rfc3339_ms(n.launched_unix_ms);
                Some((
                    job.clone(),
                    format!("waits for {node} of pool {} to boot (launched {since})", n.pool),
                ))
            })
            .collect();
        // A Scheduler that is gone is stopping the coordinator anyway.
        let _ = self.scheduler.cast(SchedulerMsg::WaitsFor(notes));
        // Stored before acting: a restart neither forgets a launch nor repeats it.
        self.store()?;
        for a in actions {
            self.act(a);
        }
        Ok(())
    }

    fn store(&self) -> Result<(), ActorProcessingErr> {
        let stored = Stored {
            history: self.core.history.clone(),
            nodes: self.core.nodes.values().cloned().collect(),
        };
        self.store.put_pools(&serde_json::to_vec(&stored)?)?;
        Ok(())
    }

    fn act(&self, a: Action) {
        let (me, authority) = (self.myself.clone(), self.authority.clone());
        match a {
            Action::Launch { pool, node } => {
                let Some(p) = self.core.pools.iter().find(|p| p.name == pool).cloned() else {
                    return;
                };
                tokio::spawn(async move {
                    let msg = match launch(&p, &node, &authority).await {
                        Ok(instance) => AutoscalerMsg::Launched { node, instance },
                        Err(reason) => AutoscalerMsg::LaunchFailed { node, reason },
                    };
                    let _ = me.cast(msg);
                });
            }
            Action::Drain { node } => {
                let fleet = self.fleet.clone();
                tokio::spawn(async move {
                    let drain =
                        |reply| FleetMsg::Drain { name: node.clone(), draining: true, reply };
                    if let Err(e) = ractor::call_t!(fleet, drain, ASK_MS) {
                        warn!(agent_id = %node, error = %e, "could not drain the idle pool node");
                    }
                });
            }
            Action::Terminate { pool, node, instance, why } => {
                let argv =
                    self.core.pools.iter().find(|p| p.name == pool).map(|p| p.terminate.clone());
                tokio::spawn(async move {
                    let msg = match terminate(argv, &pool, &node, instance, &why, &authority).await
                    {
                        Ok(()) => AutoscalerMsg::Terminated { node },
                        Err(reason) => AutoscalerMsg::TerminateFailed { node, reason },
                    };
                    let _ = me.cast(msg);
                });
            }
        }
    }
}

/// A join token for `node` (single use, the pool's attributes, valid for its boot
/// timeout), then the launch program; the instance id it printed.
async fn launch(
    p: &PoolSpec,
    node: &str,
    authority: &ActorRef<AuthorityMsg>,
) -> Result<String, String> {
    let mut labels = p.labels.clone();
    labels.insert(pools::POOL_LABEL.to_string(), p.name.clone());
    let spec = TokenSpec {
        region: p.region.clone(),
        jurisdiction: p.jurisdiction.clone(),
        provider: p.provider.clone(),
        labels,
        name: Some(node.to_string()),
        uses: Some(1),
        ttl: Some(format!("{}ms", p.boot_timeout_ms.max(1))),
        coordinators: Vec::new(),
    };
    let token = match ractor::call_t!(authority, AuthorityMsg::CreateToken, AUTHORITY_MS, spec) {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(format!("no join token: {e}")),
        Err(e) => return Err(format!("no join token: authority unavailable: {e}")),
    };
    let input = serde_json::json!({
        "pool": p.name,
        "node": node,
        "join": token.join,
        "provider": p.provider,
        "region": p.region,
        "gpus": p.gpus,
        "gpu_model": p.gpu_model,
        "gpu_memory_bytes": p.gpu_memory_bytes,
        "cpus": p.cpus,
        "memory_bytes": p.memory_bytes,
        "spot": p.spot,
        "price_per_hour": p.price_per_hour,
    });
    let result = program::run(&p.launch, &input, program::PROGRAM_TIMEOUT).await;
    let outcome = result.map_err(|e| e.to_string()).and_then(|out| {
        out.get("instance")
            .and_then(|i| i.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("{} printed no \"instance\": {out:?}", p.launch[0]))
    });
    let detail = match &outcome {
        Ok(i) => format!("pool {} launched {node} as {i}", p.name),
        Err(e) => format!("pool {} failed to launch {node}: {e}", p.name),
    };
    audit(authority, "pool-launch", node, detail).await;
    outcome
}

/// The terminate program for `node` (told its instance id).
async fn terminate(
    argv: Option<Vec<String>>,
    pool: &str,
    node: &str,
    instance: Option<String>,
    why: &str,
    authority: &ActorRef<AuthorityMsg>,
) -> Result<(), String> {
    let Some(argv) = argv else {
        // Its pool is gone from the config: nothing to run it with.
        audit(authority, "pool-terminate", node, format!("pool {pool} is gone; forgetting {node}"))
            .await;
        return Ok(());
    };
    let input =
        serde_json::json!({ "pool": pool, "node": node, "instance": instance, "reason": why });
    let outcome = program::run(&argv, &input, program::PROGRAM_TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let detail = match &outcome {
        Ok(()) => format!("pool {pool} terminated {node} ({why})"),
        Err(e) => format!("pool {pool} failed to terminate {node}: {e}"),
    };
    audit(authority, "pool-terminate", node, detail).await;
    outcome
}

async fn audit(authority: &ActorRef<AuthorityMsg>, event: &str, node: &str, detail: String) {
    let rec = AuditRecord {
        at_unix_ms: now_ms(),
        event: event.to_string(),
        agent: Some(node.to_string()),
        token_id: None,
        serial: None,
        not_after_unix: None,
        detail,
        actor: None,
    };
    if let Err(e) = ractor::call_t!(authority, AuthorityMsg::Record, AUTHORITY_MS, Box::new(rec)) {
        warn!(agent_id = %node, error = %e, "pool change not recorded in the audit trail");
    }
}
