//! `Scheduler` actor: workflows and jobs. It plays the brief's `Workflow` (DAG progress)
//! and `JobSupervisor` (lifecycle, retries, re-placement on loss) roles. The decisions
//! live in a pure core ([`core::SchedulerCore`], with [`tick`], [`award`] and [`exit`]):
//! it takes each input with `now` and returns [`core::Effect`]s. This actor is the shell:
//! it turns messages into inputs, asks the Fleet for candidates when the core wants them,
//! and carries the effects out in order through its [`crate::persist::writer::Writer`] (commit,
//! then send), the Auctioneer and the log buffers. So a restarted coordinator continues
//! where it stopped and re-adopts attempts that agents report as running.
//!
//! Fencing: every award carries the job's attempt number. Events from any other attempt
//! are ignored; an agent that reports running a non-current attempt is told to stop it.

pub mod arrays;
pub mod award;
pub mod core;
pub mod exit;
pub mod logbuf;
pub mod logbuf_file;
pub mod records;
#[cfg(test)]
mod tests;
pub mod tick;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleetmesh_protocol::workflow::Workflow;
use fleetmesh_protocol::{JobOutcome, OutputDataset};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::warn;

use crate::data::broker::DataBroker;
use crate::fleet::FleetMsg;
use crate::persist::store::Store;
use crate::placement::auctioneer::AuctioneerMsg;

pub use self::core::{Effect, SchedulerCore, DEFAULT_TOP_K};
pub use self::records::*;

/// How often the core's timers run and queued jobs are auctioned.
const TICK_INTERVAL: Duration = Duration::from_millis(100);
/// A periodic tick this soon after the last one (run for a submission) is skipped: it
/// has nothing to add yet, and would hold up auction outcomes behind a Fleet query.
const MIN_TICK_GAP: Duration = Duration::from_millis(60);
/// How long a tick waits for the Fleet's candidates before leaving auctions to the next.
const FLEET_VIEW_TIMEOUT_MS: u64 = 2000;
/// Output kept per running job (its current attempt's tail) for `fleetmesh logs`.
const MAX_LOG_BUFFER: usize = 1 << 20;
/// Output kept in memory for all running jobs together; finished jobs' output is on disk.
const MAX_LOG_MEMORY: usize = 32 << 20;

use fleetmesh_data::now_unix_ms as now_ms;

/// Scheduler messages.
pub enum SchedulerMsg {
    /// Answered with the workflow's id once it is durable.
    Submit(Box<Workflow>, RpcReplyPort<String>),
    /// The store writer cannot commit any more: the Scheduler fails with this reason.
    StoreBroken(String),
    Tick,
    /// The Auctioneer closed an auction (losers already released).
    AuctionClosed(Box<crate::placement::auctioneer::AuctionOutcome>),
    AwardAnswer {
        agent: String,
        job: String,
        attempt: u64,
        accepted: bool,
        reason: String,
    },
    JobStarted {
        agent: String,
        job: String,
        attempt: u64,
    },
    JobOutput {
        agent: String,
        job: String,
        attempt: u64,
        data: Vec<u8>,
    },
    JobExited {
        agent: String,
        job: String,
        attempt: u64,
        outcome: JobOutcome,
        duration_ms: u64,
        outputs: Vec<OutputDataset>,
    },
    /// An agent (re)connected and says what it runs.
    Running {
        agent: String,
        attempts: Vec<(String, u64)>,
    },
    AgentGone {
        agent: String,
    },
    /// An agent can take work now (it joined, or came back).
    AgentReady {
        agent: String,
    },
    /// An agent will be taken away (spot interruption): its attempts move, with grace.
    Interrupted {
        agent: String,
        grace_ms: u64,
        reason: String,
    },
    Cancel(String, RpcReplyPort<Result<usize, core::UnknownId>>),
    ListWorkflows(RpcReplyPort<Vec<WorkflowSummary>>),
    ListJobs(arrays::JobListing, RpcReplyPort<JobPage>),
    ShowJob(String, RpcReplyPort<Option<JobRecord>>),
    /// What waits for capacity (the autoscaler asks).
    Demand(RpcReplyPort<arrays::Demand>),
    /// Job -> the booting pool node it waits for, in words (the autoscaler tells).
    WaitsFor(std::collections::BTreeMap<String, String>),
    Logs {
        job: String,
        offset: usize,
        reply: RpcReplyPort<Option<LogChunk>>,
    },
}

impl From<crate::fleet::FleetEvent> for SchedulerMsg {
    fn from(e: crate::fleet::FleetEvent) -> Self {
        match e {
            crate::fleet::FleetEvent::AgentGone { agent } => SchedulerMsg::AgentGone { agent },
            crate::fleet::FleetEvent::AgentReady { agent } => SchedulerMsg::AgentReady { agent },
        }
    }
}

/// For ractor's narrow handle: only the Fleet's events convert back.
impl TryFrom<SchedulerMsg> for crate::fleet::FleetEvent {
    type Error = &'static str;
    fn try_from(m: SchedulerMsg) -> Result<Self, Self::Error> {
        match m {
            SchedulerMsg::AgentGone { agent } => Ok(Self::AgentGone { agent }),
            SchedulerMsg::AgentReady { agent } => Ok(Self::AgentReady { agent }),
            _ => Err("not a Fleet event"),
        }
    }
}

impl From<crate::placement::auction::AuctionOutcome> for SchedulerMsg {
    fn from(o: crate::placement::auction::AuctionOutcome) -> Self {
        SchedulerMsg::AuctionClosed(Box::new(o))
    }
}

/// For ractor's narrow handle: only auction outcomes convert back.
impl TryFrom<SchedulerMsg> for crate::placement::auction::AuctionOutcome {
    type Error = &'static str;
    fn try_from(m: SchedulerMsg) -> Result<Self, Self::Error> {
        match m {
            SchedulerMsg::AuctionClosed(o) => Ok(*o),
            _ => Err("not an auction outcome"),
        }
    }
}

/// The Scheduler actor.
pub struct Scheduler;

/// Start-up arguments.
pub struct SchedulerArgs {
    pub store: Arc<Store>,
    pub fleet: ActorRef<FleetMsg>,
    pub auctioneer: ActorRef<AuctioneerMsg>,
    pub top_k: usize,
    pub broker: Arc<DataBroker>,
    /// Finished jobs' output goes here.
    pub log_dir: std::path::PathBuf,
    /// Delivers to agents (through the writer, after the commits queued before).
    pub link: Arc<crate::net::agent_link::AgentLink>,
}

/// The shell's state: the core, and what carries out its effects.
pub struct SchedulerState {
    core: SchedulerCore,
    fleet: ActorRef<FleetMsg>,
    auctioneer: ActorRef<AuctioneerMsg>,
    /// Commits records and then delivers what waited for them, in order, off the actor.
    writer: crate::persist::writer::Writer<crate::persist::writer::Work>,
    /// Output of running jobs; finished jobs' output is in `log_dir`.
    logs: crate::scheduler::logbuf::LogBuffers,
    log_dir: std::path::PathBuf,
    /// When the last tick started (periodic or for a submission).
    last_tick: std::time::Instant,
    ticker: Option<ractor::concurrency::JoinHandle<()>>,
}

impl SchedulerState {
    /// Carry out what the core decided, in order.
    fn run_effects(&mut self) {
        for e in self.core.take_effects() {
            match e {
                Effect::Commit(work) => self.writer.commit(work),
                Effect::Send { agent, msg } => self.writer.send(&agent, msg),
                Effect::OpenAuction(open) => {
                    let id = open.id.clone();
                    if self.auctioneer.cast(AuctioneerMsg::Open(open)).is_err() {
                        self.core.auction_not_opened(&id);
                    }
                }
                Effect::LogsFinished { job } => self.spill_logs(&job),
            }
        }
    }

    /// The job's attempt is over: its output leaves memory for `<data-dir>/logs`.
    fn spill_logs(&mut self, job: &str) {
        if let Some(buf) = self.logs.take(job) {
            // At most MAX_LOG_BUFFER into the page cache, not synced: written here so a
            // `logs --follow` reading right after the exit finds the whole tail.
            if let Err(e) = crate::scheduler::logbuf_file::write(&self.log_dir, job, &buf) {
                warn!(job_id = %job, error = %e, "finished job's output not kept on disk");
            }
        }
    }

    /// Timers, then (when a queued job is due) auctions on a fresh fleet view.
    async fn tick(&mut self) {
        self.last_tick = std::time::Instant::now();
        let now = now_ms();
        self.core.tick_timers(now);
        self.run_effects();
        let due = self.core.due_jobs(now);
        // A Fleet too busy to answer is not an empty fleet: no view, and the auctions
        // wait for the next tick rather than mark every queued job "no agents".
        let view = if due.is_empty() {
            None
        } else {
            match ractor::call_t!(self.fleet, FleetMsg::Candidates, FLEET_VIEW_TIMEOUT_MS) {
                Ok(c) => Some(c),
                Err(e) => {
                    warn!(error = %e, "fleet view unavailable; auctions wait for the next tick");
                    None
                }
            }
        };
        if let Some(v) = view {
            let mut p = self.core.begin_placement(due, v);
            // Each auction opens as soon as it is decided.
            while self.core.place_next(&mut p, now) {
                self.run_effects();
            }
            self.core.end_placement(p);
        }
        self.core.finish_tick(now);
        self.run_effects();
    }

    fn logs(&self, job: &str, offset: usize) -> Option<LogChunk> {
        let j = self.core.job(job)?;
        let finished = j.state.terminal() || j.state == JobState::Queued;
        let kept = match self.logs.get(job) {
            Some(b) => Some(b.clone()),
            None => crate::scheduler::logbuf_file::read(&self.log_dir, job),
        };
        Some(match kept {
            Some(b) => {
                let start = offset.saturating_sub(b.dropped).min(b.data.len());
                let data: Vec<u8> = b.data.iter().skip(start).copied().collect();
                LogChunk {
                    job: job.to_string(),
                    attempt: b.attempt,
                    data: String::from_utf8_lossy(&data).into_owned(),
                    next_offset: b.dropped + b.data.len(),
                    finished,
                }
            }
            None => LogChunk {
                job: job.to_string(),
                attempt: j.current().map_or(0, |a| a.n),
                data: String::new(),
                next_offset: offset,
                finished,
            },
        })
    }
}

/// Stored records, skipping (and logging) any that no longer parse.
fn load<T: serde::de::DeserializeOwned>(
    kind: &str,
    rows: Vec<(String, Vec<u8>)>,
) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    for (k, v) in rows {
        match serde_json::from_slice::<T>(&v) {
            Ok(r) => {
                out.insert(k, r);
            }
            Err(e) => warn!(record = %k, kind, error = %e, "unreadable record skipped"),
        }
    }
    out
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SchedulerMsg>,
        a: SchedulerArgs,
    ) -> Result<SchedulerState, ActorProcessingErr> {
        let (ws, js) = a.store.work()?;
        let workflows: BTreeMap<String, WorkflowRecord> = load("workflow", ws);
        let jobs: BTreeMap<String, JobRecord> = load("job", js);
        tracing::info!(workflows = workflows.len(), jobs = jobs.len(), "scheduler state loaded");
        let catalog: Arc<dyn core::Catalog> = a.broker.clone();
        let core =
            SchedulerCore::restore(workflows, jobs, catalog, a.top_k, core::random_ids(), now_ms());
        // Late binding until the senders hold narrow handles: dropped if they are gone,
        // in which case the coordinator is stopping anyway.
        let _ = a.fleet.cast(FleetMsg::SetScheduler(myself.get_derived()));
        let _ = a.auctioneer.cast(AuctioneerMsg::SetScheduler(myself.get_derived()));
        let ticker = myself.send_interval(TICK_INTERVAL, || SchedulerMsg::Tick);
        let writer = crate::persist::writer::Writer::spawn(
            "scheduler-writer",
            a.store.clone(),
            a.link.clone(),
            {
                let me = myself.clone();
                Box::new(move |why| {
                    // The actor fails with the reason, which stops the coordinator; if it
                    // is already gone there is nobody left to tell.
                    let _ = me.cast(SchedulerMsg::StoreBroken(why));
                })
            },
        )?;
        Ok(SchedulerState {
            core,
            fleet: a.fleet,
            auctioneer: a.auctioneer,
            writer,
            logs: crate::scheduler::logbuf::LogBuffers::new(MAX_LOG_BUFFER, MAX_LOG_MEMORY),
            log_dir: a.log_dir,
            last_tick: std::time::Instant::now(),
            ticker: Some(ticker),
        })
    }

    async fn post_stop(
        &self,
        _m: ActorRef<SchedulerMsg>,
        st: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = st.ticker.take() {
            t.abort();
        }
        st.core.persist();
        st.run_effects();
        // Best effort at shutdown: a failure here was already reported by the writer.
        let _ = st.writer.barrier().await;
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<SchedulerMsg>,
        msg: SchedulerMsg,
        st: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        let now = now_ms();
        match msg {
            SchedulerMsg::Submit(wf, reply) => {
                let id = st.core.submit(*wf, now);
                st.run_effects();
                // Acknowledged once durable; a caller that gave up does not mind.
                st.writer.after(move || {
                    crate::answer(reply, id);
                });
                // Place the new jobs now rather than at the next periodic tick (up to
                // 100 ms away), and not behind the bids already in the mailbox: award
                // latency does not depend on when in the tick a workflow arrives.
                st.tick().await;
            }
            SchedulerMsg::StoreBroken(why) => return Err(why.into()),
            SchedulerMsg::Tick => {
                if st.last_tick.elapsed() >= MIN_TICK_GAP {
                    st.tick().await;
                }
            }
            SchedulerMsg::AuctionClosed(outcome) => st.core.auction_closed(*outcome, now),
            SchedulerMsg::AwardAnswer { agent, job, attempt, accepted, reason } => {
                st.core.award_answer(&agent, &job, attempt, accepted, &reason, now);
            }
            SchedulerMsg::JobStarted { agent, job, attempt } => {
                st.core.job_started(&agent, &job, attempt, now);
            }
            SchedulerMsg::JobOutput { job, attempt, data, .. } => {
                if st.core.is_live(&job, attempt) {
                    st.logs.append(&job, attempt, &data);
                }
            }
            SchedulerMsg::JobExited { agent, job, attempt, outcome, duration_ms, outputs } => {
                let exit = exit::Exit { agent, job, attempt, outcome, duration_ms, outputs };
                st.core.job_exited(exit, now);
            }
            SchedulerMsg::Running { agent, attempts } => {
                st.core.agent_running(&agent, &attempts, now);
            }
            SchedulerMsg::AgentGone { agent } => st.core.agent_gone(&agent, now),
            SchedulerMsg::AgentReady { .. } => st.core.capacity_added(),
            SchedulerMsg::Interrupted { agent, grace_ms, reason } => {
                st.core.interrupted(&agent, grace_ms, &reason, now);
            }
            SchedulerMsg::Cancel(id, reply) => {
                let r = st.core.cancel(&id, now);
                st.run_effects();
                // A caller that gave up does not mind.
                st.writer.after(move || {
                    crate::answer(reply, r);
                });
            }
            SchedulerMsg::ListWorkflows(reply) => {
                crate::answer(reply, st.core.list_workflows());
            }
            SchedulerMsg::ListJobs(q, reply) => {
                crate::answer(reply, st.core.list_jobs(&q));
            }
            SchedulerMsg::ShowJob(id, reply) => {
                crate::answer(reply, st.core.show_job(&id));
            }
            SchedulerMsg::Demand(reply) => crate::answer(reply, st.core.demand()),
            SchedulerMsg::WaitsFor(notes) => st.core.waits_for(notes),
            SchedulerMsg::Logs { job, offset, reply } => {
                crate::answer(reply, st.logs(&job, offset));
            }
        }
        st.run_effects();
        Ok(())
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn attempt_and_workflow_states_keep_their_stored_names() {
        // Records written by earlier builds (states as strings) must still load.
        for (state, name) in [
            (AttemptState::Awarded, "awarded"),
            (AttemptState::Running, "running"),
            (AttemptState::Succeeded, "succeeded"),
            (AttemptState::Failed, "failed"),
            (AttemptState::Lost, "lost"),
            (AttemptState::StagingFailed, "staging-failed"),
        ] {
            let json = format!("\"{name}\"");
            assert_eq!(serde_json::to_string(&state).unwrap(), json);
            assert_eq!(serde_json::from_str::<AttemptState>(&json).unwrap(), state);
        }
        for w in [WorkflowState::Running, WorkflowState::Succeeded, WorkflowState::Failed] {
            let json = format!("\"{}\"", w.as_str());
            assert_eq!(serde_json::to_string(&w).unwrap(), json);
            assert_eq!(serde_json::from_str::<WorkflowState>(&json).unwrap(), w);
        }
    }

    #[test]
    fn history_entries_keep_their_stored_shape() {
        // Earlier builds stored history as [ms, state, detail] arrays.
        let json = r#"[1700000000000,"queued","dependencies succeeded"]"#;
        let e: HistoryEntry = serde_json::from_str(json).unwrap();
        assert_eq!(
            (e.at_unix_ms, e.state, e.detail.as_str()),
            (1_700_000_000_000, JobState::Queued, "dependencies succeeded")
        );
        assert_eq!(serde_json::to_string(&e).unwrap(), json);
    }
}
