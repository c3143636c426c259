//! The Scheduler's decision core: workflows, jobs, attempts and fences, with no I/O and
//! no clock. Every input (a submission, an agent's event, an auction's outcome, a tick)
//! comes with `now`; what the core decides comes back as [`Effect`]s, in the order they
//! must happen, which the actor shell ([`super::Scheduler`]) runs through its writer. An
//! [`Effect::Commit`] always precedes the sends that depend on it, so "commit, then send"
//! is decided here once and carried out in one place.
//!
//! The pieces, in the manner of Nomad's scheduler:
//! - `tick.rs`: timers (dependencies, re-adoption deadlines, award answers, starts) and
//!   which queued jobs are auctioned, with per-tick capacity claims;
//! - `award.rs`: feasibility per auction (residency, constraints; every refused agent
//!   records why), the auction's outcome turned into a fenced award, runner-ups;
//! - `exit.rs`: what an attempt's end means (retry, re-place, gang failure);
//! - this file: state, submission, agent events, cancellation, queries.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use fleetmesh_protocol::data::{FetchPlan, Manifest};
use fleetmesh_protocol::workflow::{InputRef, Workflow};
use fleetmesh_protocol::CoordinatorMessage;
use tracing::{info, warn};

use super::records::{
    AttemptState, HistoryEntry, JobRecord, JobState, SharedSpec, WorkflowRecord, WorkflowState,
    WorkflowSummary,
};
use crate::data::broker::{BrokerError, DataBroker, DatasetRecord, Requester};
use crate::persist::writer::Work;
use crate::placement::auction::{BidView, Candidate, OpenAuction};

/// Auctions started per tick: bounds the tick's work (prefilter is O(agents) per job) so
/// a burst of thousands of jobs never stalls the actor.
pub const MAX_AUCTIONS_PER_TICK: usize = 500;
/// Auctions open at once. Admission control: a burst that invites agents faster than
/// they can answer would otherwise see its auctions close unanswered after the window
/// and be retried in waves (measured: 10,000 jobs at once sometimes took 40 s instead of
/// 10). At ~1,000 placements/s and a few tens of ms per auction, ~50 are open on average.
pub const MAX_OPEN_AUCTIONS: usize = 256;
/// Agents asked per auction by default: enough competition to pick a good offer, few
/// enough that concurrent auctions do not all hold reservations on the same agents.
pub const DEFAULT_TOP_K: usize = 3;
/// Longest an auction waits for bids (it closes earlier when everyone answered).
pub const AUCTION_WINDOW_MS: u64 = 500;
/// Reservation lease asked of bidders (longer than the window plus the award trip).
pub const LEASE_MS: u64 = 3000;
/// A runner-up's offer is trusted until this long before its lease ends, so an award
/// passed on to it arrives while it still holds the GPUs it offered.
pub const BACKUP_MARGIN_MS: u64 = 500;
/// An award must be started within this time, or the job is placed again.
pub const START_TIMEOUT_MS: u64 = 5000;
/// An award not accepted within this time goes to the auction's runner-up, if any.
pub const AWARD_ANSWER_MS: u64 = 1500;
/// Queued jobs with no feasible bid are re-auctioned this often (and on fleet changes).
pub const REQUEUE_MS: u64 = 1000;
/// Expected duration used for pricing when a job has no timeout.
pub const DEFAULT_EXPECTED_MS: u64 = 3_600_000;
/// First wait before placing again a job whose inputs could not be staged; it doubles
/// with each staging failure of the job...
pub const STAGING_BACKOFF_FIRST_MS: u64 = 500;
/// ...up to this.
pub const STAGING_BACKOFF_MAX_MS: u64 = 60_000;
/// Doublings of a retry's backoff, at most (`backoff_ms * 2^10` is already ~17 min for
/// a 1 s base): beyond it the shift would overflow, and nobody waits longer.
pub const MAX_BACKOFF_DOUBLINGS: u32 = 10;
/// SIGTERM-to-SIGKILL grace for cancellations and re-placements.
pub const CANCEL_GRACE_MS: u64 = 5000;
/// After a coordinator restart, attempts that were running wait this long for their
/// agent to report them before they are placed again: longer than the Fleet's restart
/// grace plus its lost timeout, so a reconnecting agent is never raced.
pub const READOPT_GRACE_MS: u64 = 12_000;
/// An agent that reconnects without reporting an attempt placed on it: its exit event
/// gets this long to arrive before the attempt counts as lost.
pub const UNREPORTED_GRACE_MS: u64 = 3000;
/// Milliseconds in an hour (prices are per hour).
pub const MS_PER_HOUR: f64 = 3_600_000.0;
/// The gang rendezvous port given to rank 0 (`MASTER_PORT`, PyTorch's default).
pub const MASTER_PORT: u16 = 29500;

/// Something the core decided, for the shell to carry out in order.
#[derive(Debug)]
pub enum Effect {
    /// Commit these records; everything after waits until they are durable.
    Commit(Work),
    /// Deliver to an agent (after every commit before it).
    Send { agent: String, msg: CoordinatorMessage },
    /// Have the Auctioneer run this auction.
    OpenAuction(Box<OpenAuction>),
    /// The job's attempt is over: its output can leave memory.
    LogsFinished { job: String },
}

/// The dataset catalogue the core reads inputs from and registers outputs in (the
/// coordinator's [`DataBroker`]; a plain map in tests).
pub trait Catalog: Send + Sync {
    /// A dataset by id, `NAME@VERSION` or name (the newest version).
    fn resolve(&self, name_or_id: &str) -> Option<DatasetRecord>;
    /// A fetch plan for `requester` to fetch dataset `id`, with tickets valid from `now`.
    fn plan(
        &self,
        id: &str,
        requester: &Requester,
        candidates: &[Candidate],
        now: u64,
    ) -> Result<FetchPlan, BrokerError>;
    /// Record an output held by `holder` (created at `now` if new).
    fn register(
        &self,
        manifest: Manifest,
        name: &str,
        jurisdictions: Vec<String>,
        holder: &str,
        producer: Option<String>,
        now: u64,
    ) -> DatasetRecord;
}

impl Catalog for DataBroker {
    fn resolve(&self, name_or_id: &str) -> Option<DatasetRecord> {
        DataBroker::resolve(self, name_or_id)
    }
    fn plan(
        &self,
        id: &str,
        requester: &Requester,
        candidates: &[Candidate],
        now: u64,
    ) -> Result<FetchPlan, BrokerError> {
        self.plan_at(id, requester, candidates, now)
    }
    fn register(
        &self,
        manifest: Manifest,
        name: &str,
        jurisdictions: Vec<String>,
        holder: &str,
        producer: Option<String>,
        now: u64,
    ) -> DatasetRecord {
        self.register_at(manifest, name, jurisdictions, holder, producer, now)
    }
}

/// The runner-up of an auction, remembered until the winner accepts the award.
pub(super) struct Backup {
    pub(super) auction: String,
    pub(super) bid: BidView,
    pub(super) bids: Vec<BidView>,
    pub(super) inputs: Vec<(String, String)>,
    pub(super) residency: Vec<String>,
    /// Its offer is considered too old after this.
    pub(super) until_unix_ms: u64,
}

/// What the Scheduler's current attempts (awarded or running) hold on one agent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Held {
    pub attempts: usize,
    pub gpus: usize,
    pub cpus: f64,
    pub memory_bytes: u64,
}

/// How an agent is reached: its address (advertised, or where its connection comes
/// from), its host's name and the host's own addresses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reach {
    pub addr: Option<String>,
    pub hostname: Option<String>,
    pub host_addrs: Vec<String>,
}

/// Where a gang's members meet (`MASTER_ADDR`): rank 0's address as the others can
/// reach it. A loopback address serves only when every member is on rank 0's host;
/// otherwise rank 0's first own address is used. `None`: nothing is known of rank 0.
pub fn rendezvous_addr(rank0: Option<&Reach>, members: &[Option<&Reach>]) -> Option<String> {
    let r = rank0?;
    let addr = r.addr.clone();
    let loopback = addr
        .as_deref()
        .and_then(|a| a.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback());
    let same_host = |m: &Option<&Reach>| {
        m.and_then(|m| m.hostname.as_deref()).is_some_and(|h| Some(h) == r.hostname.as_deref())
    };
    let reachable_as_is = !loopback || members.iter().all(same_host);
    if addr.is_some() && reachable_as_is {
        return addr;
    }
    r.host_addrs.first().cloned().or(addr)
}

/// A cancellation named neither a job nor a workflow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no job or workflow {0}")]
pub struct UnknownId(pub String);

/// Makes the random part of workflow and auction ids (a counter in tests).
pub type IdSource = Box<dyn FnMut() -> String + Send>;

/// Random hex suffixes for ids.
pub fn random_ids() -> IdSource {
    Box::new(|| {
        use rand::RngCore;
        let mut b = [0u8; 3];
        rand::rng().fill_bytes(&mut b);
        hex::encode(b)
    })
}

/// The Scheduler's state and decisions.
pub struct SchedulerCore {
    pub(super) workflows: BTreeMap<String, WorkflowRecord>,
    pub(super) jobs: BTreeMap<String, JobRecord>,
    /// Open auctions (run by the Auctioneer): auction id -> job.
    pub(super) auctions: HashMap<String, String>,
    /// Attempts not yet confirmed by their agent (after a restart or a reconnect): lost
    /// at the time given.
    pub(super) verify: BTreeMap<(String, u64), u64>,
    pub(super) dirty_w: Vec<String>,
    pub(super) dirty_j: BTreeSet<String>,
    /// Awards decided and exits recorded: sent only after the state they depend on is
    /// committed (one commit for all of them).
    pub(super) outgoing: Vec<(String, CoordinatorMessage)>,
    /// How each agent is reached, from the last candidate list (gang rendezvous).
    pub(super) reach: BTreeMap<String, Reach>,
    pub(super) top_k: usize,
    /// Runner-up bids of awarded single-node attempts not yet accepted.
    pub(super) backups: HashMap<(String, u64), Backup>,
    /// Workflows whose completion must be re-checked (a job of theirs changed).
    pub(super) wf_check: BTreeSet<String>,
    /// Arrays whose completion must be re-checked (a member changed).
    pub(super) array_check: BTreeSet<String>,
    /// An attempt ended since the last tick: jobs that waited for room try again now
    /// rather than after [`REQUEUE_MS`].
    pub(super) room_freed: bool,
    /// What the autoscaler says each waiting job waits for (a booting pool node); shown
    /// with the job, not stored.
    pub(super) booting_for: BTreeMap<String, String>,
    /// What attempts have cost on each agent (recomputed from the records on restore).
    pub(super) spend_by_agent: BTreeMap<String, f64>,
    pub(super) catalog: Arc<dyn Catalog>,
    /// The last fleet view (holders' data addresses and jurisdictions for fetch plans).
    pub(super) last_candidates: Arc<Vec<Candidate>>,
    pub(super) ids: IdSource,
    pub(super) effects: Vec<Effect>,
}

impl SchedulerCore {
    /// A core holding the stored records (a restart: attempts that were placed wait
    /// [`READOPT_GRACE_MS`] for their agents to report them).
    pub fn restore(
        workflows: BTreeMap<String, WorkflowRecord>,
        mut jobs: BTreeMap<String, JobRecord>,
        catalog: Arc<dyn Catalog>,
        top_k: usize,
        ids: IdSource,
        now: u64,
    ) -> Self {
        Self::link_members(&mut jobs);
        let mut spend_by_agent: BTreeMap<String, f64> = BTreeMap::new();
        for a in jobs.values().flat_map(|j| &j.attempts) {
            // A gang's cost is split evenly among its ranks' agents.
            let share = a.cost / a.agents.len().max(1) as f64;
            for agent in &a.agents {
                *spend_by_agent.entry(agent.clone()).or_default() += share;
            }
        }
        let verify = jobs
            .values()
            .filter(|j| matches!(j.state, JobState::Starting | JobState::Running))
            .filter_map(|j| j.current().map(|a| ((j.id.clone(), a.n), now + READOPT_GRACE_MS)))
            .collect();
        let wf_check = workflows.keys().cloned().collect();
        // An array whose last member ended just before a restart is decided on the first
        // tick, as a workflow is.
        let array_check = jobs
            .values()
            .filter(|j| j.is_array() && j.state == JobState::Running)
            .map(|j| j.id.clone())
            .collect();
        Self {
            workflows,
            jobs,
            auctions: HashMap::new(),
            verify,
            dirty_w: Vec::new(),
            dirty_j: BTreeSet::new(),
            outgoing: Vec::new(),
            reach: BTreeMap::new(),
            top_k: top_k.max(1),
            backups: HashMap::new(),
            wf_check,
            array_check,
            room_freed: false,
            booting_for: BTreeMap::new(),
            spend_by_agent,
            catalog,
            last_candidates: Arc::new(Vec::new()),
            ids,
            effects: Vec::new(),
        }
    }

    /// What was decided since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    pub fn job(&self, id: &str) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    pub fn workflow(&self, id: &str) -> Option<&WorkflowRecord> {
        self.workflows.get(id)
    }

    /// Whether output of `attempt` of `job` is still wanted (it is the running attempt).
    pub fn is_live(&self, job: &str, attempt: u64) -> bool {
        self.jobs.get(job).is_some_and(|j| {
            matches!(j.state, JobState::Starting | JobState::Running)
                && j.current().is_some_and(|a| a.n == attempt)
        })
    }

    pub(super) fn touch_job(&mut self, id: &str) {
        self.dirty_j.insert(id.to_string());
        let Some(j) = self.jobs.get(id) else { return };
        match &j.member {
            Some(m) => self.array_check.insert(m.array.clone()),
            None => self.wf_check.insert(j.workflow.clone()),
        };
    }

    /// A job as the API shows it (a member with its array's spec written out, and the
    /// pool node it waits for first among its reasons).
    pub fn show_job(&self, id: &str) -> Option<JobRecord> {
        let mut j = self.jobs.get(id)?.clone();
        j.spec = j.spec.shown();
        if let Some(note) = self.booting_for.get(id).filter(|_| j.state == JobState::Queued) {
            j.queued_reasons.insert(0, note.clone());
        }
        Some(j)
    }

    /// The autoscaler's word on what the waiting jobs wait for (replaces the last).
    pub fn waits_for(&mut self, notes: BTreeMap<String, String>) {
        self.booting_for = notes;
    }

    /// Commit what changed (nothing when nothing did).
    pub(super) fn persist(&mut self) {
        let workflows: Vec<(String, Vec<u8>)> = std::mem::take(&mut self.dirty_w)
            .into_iter()
            .filter_map(|id| {
                self.workflows.get(&id).and_then(|w| serde_json::to_vec(w).ok()).map(|v| (id, v))
            })
            .collect();
        let jobs: Vec<(String, Vec<u8>)> = std::mem::take(&mut self.dirty_j)
            .into_iter()
            .filter_map(|id| {
                self.jobs.get(&id).and_then(|j| serde_json::to_vec(j).ok()).map(|v| (id, v))
            })
            .collect();
        if !(workflows.is_empty() && jobs.is_empty()) {
            self.effects.push(Effect::Commit(Work { workflows, jobs }));
        }
    }

    /// Send to an agent, in order with everything else decided (after the commits
    /// before it).
    pub(super) fn send(&mut self, agent: &str, msg: CoordinatorMessage) {
        self.effects.push(Effect::Send { agent: agent.to_string(), msg });
    }

    /// Commit the pending state, then send what waited for it (awards, exit acks).
    pub(super) fn flush(&mut self) {
        self.persist();
        for (agent, msg) in std::mem::take(&mut self.outgoing) {
            self.send(&agent, msg);
        }
    }

    /// Accept a workflow; its id. The caller acknowledges it after the commit that
    /// follows in the effects.
    pub fn submit(&mut self, wf: Workflow, now: u64) -> String {
        let id = format!("{}-{}", wf.name, (self.ids)());
        let mut job_ids = Vec::new();
        for (name, spec) in &wf.jobs {
            let jid = format!("{id}.{name}");
            job_ids.push(jid.clone());
            let spec = SharedSpec::own(Arc::new(spec.clone()));
            let rec = new_job(&jid, &id, name, spec, wf.objective, now);
            for m in Self::member_records(&rec) {
                self.dirty_j.insert(m.id.clone());
                self.jobs.insert(m.id.clone(), m);
            }
            self.jobs.insert(jid.clone(), rec);
            self.dirty_j.insert(jid);
        }
        let pinned = self.pin_at_submission(&wf);
        self.workflows.insert(
            id.clone(),
            WorkflowRecord {
                id: id.clone(),
                name: wf.name.clone(),
                spec: wf,
                jobs: job_ids,
                state: WorkflowState::Running,
                submitted_unix_ms: now,
                pinned,
            },
        );
        self.dirty_w.push(id.clone());
        self.persist();
        info!(workflow = %id, "workflow submitted");
        id
    }

    /// The dataset versions a workflow's inputs name now, each name resolved once
    /// (thousands of jobs usually read a handful of datasets).
    fn pin_at_submission(&self, wf: &Workflow) -> BTreeMap<String, String> {
        let names: BTreeSet<String> = wf
            .jobs
            .values()
            .flat_map(|j| j.input_refs(&wf.jobs))
            .filter_map(|(_, r)| match r {
                InputRef::Dataset(n) => Some(n),
                InputRef::JobOutput { .. } => None,
            })
            .collect();
        names.into_iter().filter_map(|n| self.catalog.resolve(&n).map(|d| (n, d.id))).collect()
    }

    /// An agent answered an award.
    pub fn award_answer(
        &mut self,
        agent: &str,
        job: &str,
        attempt: u64,
        accepted: bool,
        reason: &str,
        now: u64,
    ) {
        if accepted {
            self.backups.remove(&(job.to_string(), attempt));
            return;
        }
        warn!(job_id = %job, attempt, agent_id = %agent, %reason, "award refused");
        let why = format!("{agent} refused the award: {reason}");
        if self.award_backup(job, attempt, &why, now) {
            self.flush();
        } else {
            self.stop_attempt(job, attempt, "another rank refused the award");
            self.attempt_lost(job, attempt, &why, now);
        }
    }

    /// An agent started `attempt` of `job` (committed with the next tick: after a
    /// restart, a job still recorded as starting is re-adopted when its agent reports it).
    pub fn job_started(&mut self, agent: &str, job: &str, attempt: u64, now: u64) {
        let current = self.jobs.get(job).and_then(|j| j.current()).map(|a| a.n);
        if current != Some(attempt) {
            warn!(job_id = %job, attempt, agent_id = %agent, "stale attempt started: stopping it");
            let reason = "stale attempt".into();
            let msg = CoordinatorMessage::Stop { job: job.into(), attempt, grace_ms: 0, reason };
            self.send(agent, msg);
            return;
        }
        if let Some(j) = self.jobs.get_mut(job) {
            mark_running(j, now);
            if j.state == JobState::Starting {
                j.set(now, JobState::Running, format!("attempt {attempt} running on {agent}"));
            }
        }
        self.touch_job(job);
    }

    /// An agent (re)connected and reports what it runs: the current attempts placed on
    /// it are kept (re-adopted), the agent is told to stop every other, and attempts
    /// placed there that it did not report are lost unless their exit arrives soon.
    pub fn agent_running(&mut self, agent: &str, attempts: &[(String, u64)], now: u64) {
        let mut keep = Vec::new();
        for (job, n) in attempts {
            let ours = self.jobs.get(job).is_some_and(|j| {
                !j.state.terminal()
                    && j.current().is_some_and(|a| a.n == *n && a.agents.iter().any(|x| x == agent))
            });
            if !ours {
                continue;
            }
            self.verify.remove(&(job.clone(), *n));
            keep.push((job.clone(), *n));
            info!(job_id = %job, attempt = n, agent_id = %agent, "attempt re-adopted");
            if let Some(j) = self.jobs.get_mut(job).filter(|j| j.state == JobState::Starting) {
                mark_running(j, now);
                j.set(now, JobState::Running, format!("attempt {n} re-adopted on {agent}"));
            }
            self.touch_job(job);
        }
        for j in self.jobs.values() {
            if !matches!(j.state, JobState::Starting | JobState::Running) {
                continue;
            }
            if let Some(a) = j.current().filter(|a| a.agents.iter().any(|x| x == agent)) {
                if !attempts.iter().any(|(x, n)| *x == j.id && *n == a.n) {
                    self.verify.insert((j.id.clone(), a.n), now + UNREPORTED_GRACE_MS);
                }
            }
        }
        self.send(agent, CoordinatorMessage::Keep { attempts: keep });
    }

    /// A spot interruption notice on `agent`: each attempt there gets SIGTERM with the
    /// notice's grace (to checkpoint) and its job is placed again at once, without using
    /// a retry, on capacity that is not spot where the job allows both.
    pub fn interrupted(&mut self, agent: &str, grace_ms: u64, reason: &str, now: u64) {
        let hit: Vec<(String, u64, Vec<String>)> = self
            .jobs
            .values()
            .filter(|j| matches!(j.state, JobState::Starting | JobState::Running))
            .filter_map(|j| {
                let a = j.current().filter(|a| a.agents.iter().any(|x| x == agent))?;
                Some((j.id.clone(), a.n, a.agents.clone()))
            })
            .collect();
        for (job, n, agents) in hit {
            for a in &agents {
                let msg = CoordinatorMessage::Stop {
                    job: job.clone(),
                    attempt: n,
                    grace_ms,
                    reason: format!("{agent} is being interrupted: {reason}"),
                };
                self.send(a, msg);
            }
            self.attempt_lost(&job, n, &format!("{agent} interrupted ({reason})"), now);
            if let Some(j) = self.jobs.get_mut(&job) {
                j.avoid_spot = true;
            }
            self.touch_job(&job);
        }
        self.persist();
    }

    /// An agent can take work: jobs waiting for room are considered at the next tick.
    pub fn capacity_added(&mut self) {
        self.room_freed = true;
    }

    /// An agent is lost: its attempts are stopped (should it come back) and placed again.
    pub fn agent_gone(&mut self, agent: &str, now: u64) {
        let hit: Vec<(String, u64)> = self
            .jobs
            .values()
            .filter(|j| matches!(j.state, JobState::Starting | JobState::Running))
            .filter_map(|j| {
                j.current()
                    .filter(|a| a.agents.iter().any(|x| x == agent))
                    .map(|a| (j.id.clone(), a.n))
            })
            .collect();
        for (job, n) in hit {
            self.stop_attempt(&job, n, "agent lost; the job is placed elsewhere");
            self.attempt_lost(&job, n, &format!("agent {agent} lost"), now);
        }
        self.persist();
    }

    /// Cancel a job, or every job of a workflow; how many were cancelled. The caller
    /// acknowledges after the commit that follows in the effects.
    pub fn cancel(&mut self, id: &str, now: u64) -> Result<usize, UnknownId> {
        let top: Vec<String> = match self.workflows.get(id) {
            Some(w) => w.jobs.clone(),
            None if self.jobs.contains_key(id) => vec![id.to_string()],
            None => return Err(UnknownId(id.to_string())),
        };
        // An array is cancelled with its members (a member alone leaves the rest).
        let targets: Vec<String> =
            top.into_iter().flat_map(|t| self.member_ids(&t).into_iter().chain([t])).collect();
        let mut n = 0;
        for jid in targets {
            let Some(j) = self.jobs.get_mut(&jid) else { continue };
            if j.state.terminal() {
                continue;
            }
            let running = matches!(j.state, JobState::Starting | JobState::Running);
            let attempt = j.current().map(|a| a.n);
            j.set(now, JobState::Cancelled, "cancelled by a user");
            n += 1;
            if let (true, Some(a)) = (running, attempt) {
                self.stop_attempt(&jid, a, "cancelled");
                self.room_freed = true;
            }
            self.effects.push(Effect::LogsFinished { job: jid.clone() });
            self.touch_job(&jid);
        }
        self.persist();
        Ok(n)
    }

    /// Tell the agents of `attempt` of `job` to stop it.
    pub(super) fn stop_attempt(&mut self, job: &str, attempt: u64, reason: &str) {
        let agents = self
            .jobs
            .get(job)
            .and_then(|j| j.attempts.iter().find(|a| a.n == attempt))
            .map(|a| a.agents.clone())
            .unwrap_or_default();
        self.send_stop(&agents, job, attempt, reason);
    }

    /// Tell `agents` to stop `attempt` of `job` (SIGTERM, SIGKILL after the grace).
    pub(super) fn send_stop(&mut self, agents: &[String], job: &str, attempt: u64, reason: &str) {
        for agent in agents {
            let msg = CoordinatorMessage::Stop {
                job: job.to_string(),
                attempt,
                grace_ms: CANCEL_GRACE_MS,
                reason: reason.to_string(),
            };
            self.send(agent, msg);
        }
    }

    /// The current attempt is gone without a verdict: place the job again (no retry used).
    pub(super) fn attempt_lost(&mut self, job: &str, attempt: u64, why: &str, now: u64) {
        let Some(j) = self.jobs.get_mut(job) else { return };
        if j.current().map(|a| a.n) != Some(attempt)
            || !matches!(j.state, JobState::Starting | JobState::Running)
        {
            return;
        }
        if let Some(a) = j.current_mut() {
            a.state = AttemptState::Lost;
            a.ended_unix_ms = Some(now);
        }
        self.room_freed = true;
        j.next_try_unix_ms = 0;
        j.set(now, JobState::Queued, format!("attempt {attempt} lost: {why}; placing again"));
        self.touch_job(job);
    }

    pub fn list_workflows(&self) -> Vec<WorkflowSummary> {
        self.workflows
            .values()
            .map(|w| WorkflowSummary {
                cost: self.workflow_cost(&w.id),
                id: w.id.clone(),
                name: w.name.clone(),
                objective: format!("{:?}", w.spec.objective).to_lowercase(),
                state: w.state,
                jobs: w.jobs.len(),
                submitted_unix_ms: w.submitted_unix_ms,
            })
            .collect()
    }
}

impl SchedulerCore {
    /// The GPUs the current attempts hold (the fleet view may not show them busy yet),
    /// and what they hold per agent.
    pub(super) fn attempt_holds(&self) -> (HashSet<&str>, HashMap<&str, Held>) {
        let mut gpus = HashSet::new();
        let mut per_agent: HashMap<&str, Held> = HashMap::new();
        let current = self
            .jobs
            .values()
            .filter(|j| matches!(j.state, JobState::Starting | JobState::Running));
        for j in current {
            let Some(a) = j.current() else { continue };
            gpus.extend(a.gpus.iter().flatten().map(String::as_str));
            for (rank, agent) in a.agents.iter().enumerate() {
                let h = per_agent.entry(agent.as_str()).or_default();
                h.attempts += 1;
                h.gpus += a.gpus.get(rank).map_or(0, Vec::len);
                h.cpus += j.spec.resources.cpus;
                h.memory_bytes = h.memory_bytes.saturating_add(j.spec.resources.memory_bytes);
            }
        }
        (gpus, per_agent)
    }

    /// What a workflow's attempts have cost so far (an array's members counted once).
    fn workflow_cost(&self, id: &str) -> f64 {
        let prefix = format!("{id}.");
        self.jobs
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(_, j)| j.workflow == id && !j.is_array())
            .map(|(_, j)| j.cost)
            .sum()
    }
}

/// A new job record, waiting for its dependencies.
fn new_job(
    id: &str,
    workflow: &str,
    name: &str,
    spec: SharedSpec,
    objective: fleetmesh_protocol::workflow::Objective,
    now: u64,
) -> JobRecord {
    JobRecord {
        id: id.to_string(),
        workflow: workflow.to_string(),
        name: name.to_string(),
        spec,
        member: None,
        objective,
        state: JobState::Waiting,
        attempts: Vec::new(),
        failures: 0,
        history: vec![HistoryEntry {
            at_unix_ms: now,
            state: JobState::Waiting,
            detail: "submitted".into(),
        }],
        queued_reasons: Vec::new(),
        next_try_unix_ms: 0,
        cost: 0.0,
        submitted_unix_ms: now,
        outputs: BTreeMap::new(),
        output_residency: Vec::new(),
        avoid_spot: false,
    }
}

/// The current attempt runs (from now, unless it was seen running before).
fn mark_running(j: &mut JobRecord, now: u64) {
    if let Some(a) = j.current_mut() {
        a.started_unix_ms.get_or_insert(now);
        a.state = AttemptState::Running;
    }
}
