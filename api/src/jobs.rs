//! Workflows, jobs and attempts: the Scheduler's records as it stores them and the API
//! shows them (`fleetmesh jobs show -o json`), with the bids each attempt was chosen from.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetmesh_protocol::workflow::{JobSpec, Run, Workflow};
use serde::{Deserialize, Serialize};
use tracing::info;

/// History entries kept per job (the oldest go first): enough for every retry and
/// re-placement of a long-lived job, bounded so a flapping job cannot grow its record.
const HISTORY_LIMIT: usize = 200;

/// Job states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for the jobs it needs.
    Waiting,
    /// Ready; being (or waiting to be) placed.
    Queued,
    /// Awarded; waiting for the process to start.
    Starting,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}

impl JobState {
    /// The name it is stored and shown under.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Queued => "queued",
            JobState::Starting => "starting",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Skipped => "skipped",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Skipped | JobState::Cancelled
        )
    }
}

/// One attempt (for a gang: all its ranks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub n: u64,
    /// rank -> agent
    pub agents: Vec<String>,
    pub gpus: Vec<Vec<String>>,
    pub price_per_hour: Vec<f64>,
    pub bids: Vec<BidView>,
    pub awarded_unix_ms: u64,
    pub started_unix_ms: Option<u64>,
    pub ended_unix_ms: Option<u64>,
    /// Per rank: `None` while running.
    pub outcomes: Vec<Option<String>>,
    pub succeeded: Vec<bool>,
    pub cost: f64,
    pub state: AttemptState,
}

/// Where an attempt is. Stored and shown as the kebab-case names (`staging-failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttemptState {
    /// Sent to its agents; not yet started.
    Awarded,
    Running,
    Succeeded,
    Failed,
    /// Its agent was lost, or it was not accepted or started in time.
    Lost,
    /// Its inputs could not be fetched: the process never ran (no retry used).
    StagingFailed,
}

impl AttemptState {
    /// The name it is stored and shown under.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptState::Awarded => "awarded",
            AttemptState::Running => "running",
            AttemptState::Succeeded => "succeeded",
            AttemptState::Failed => "failed",
            AttemptState::Lost => "lost",
            AttemptState::StagingFailed => "staging-failed",
        }
    }
}

/// Where a workflow is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkflowState {
    Running,
    Succeeded,
    /// Finished with at least one job not succeeded (failed, skipped or cancelled).
    Failed,
}

impl WorkflowState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowState::Running => "running",
            WorkflowState::Succeeded => "succeeded",
            WorkflowState::Failed => "failed",
        }
    }
}

/// A job's spec. The members of an array share their array's: one copy in memory, and
/// none stored with each member (a member's record is linked to it again when the
/// Scheduler restores; API answers carry it in full).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedSpec {
    spec: Arc<JobSpec>,
    /// Stored and served with the record that holds it.
    with_record: bool,
}

impl SharedSpec {
    /// A spec of the record's own.
    pub fn own(spec: Arc<JobSpec>) -> Self {
        Self { spec, with_record: true }
    }
    /// An array's spec, as one of its members holds it.
    pub fn member(spec: Arc<JobSpec>) -> Self {
        Self { spec, with_record: false }
    }
    pub fn arc(&self) -> &Arc<JobSpec> {
        &self.spec
    }
    /// Whether it is stored elsewhere (a member read back before being linked).
    pub fn is_shared(&self) -> bool {
        !self.with_record
    }
    /// The same spec, written out in full (for API answers).
    pub fn shown(&self) -> Self {
        Self { spec: self.spec.clone(), with_record: true }
    }
}

impl std::ops::Deref for SharedSpec {
    type Target = JobSpec;
    fn deref(&self) -> &JobSpec {
        &self.spec
    }
}

impl Serialize for SharedSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.with_record {
            self.spec.serialize(s)
        } else {
            s.serialize_none()
        }
    }
}

impl<'de> Deserialize<'de> for SharedSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<JobSpec>::deserialize(d)? {
            Some(spec) => Self::own(Arc::new(spec)),
            None => Self::member(Arc::new(placeholder_spec())),
        })
    }
}

/// What a member read back from the store holds until it is linked to its array's spec.
fn placeholder_spec() -> JobSpec {
    JobSpec {
        name: String::new(),
        run: Run::Command(Vec::new()),
        image: None,
        env: BTreeMap::new(),
        resources: fleetmesh_protocol::workflow::Resources {
            cpus: 0.0,
            memory_bytes: 0,
            gpus: 0,
            gpu_memory_bytes: None,
            gpu_model: None,
        },
        constraints: Default::default(),
        needs: Vec::new(),
        retries: fleetmesh_protocol::workflow::Retries { limit: 0, backoff_ms: 0 },
        timeout_ms: None,
        nodes: 1,
        priority: 0,
        inputs: Vec::new(),
        outputs: Vec::new(),
        output_jurisdictions: None,
        array: None,
    }
}

/// Which member of which array a job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberOf {
    /// The array job's id (`WORKFLOW.JOB`).
    pub array: String,
    pub index: u32,
}

/// A job and its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub workflow: String,
    pub name: String,
    pub spec: SharedSpec,
    /// Set for a member of an array job (`WORKFLOW.JOB[i]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<MemberOf>,
    pub objective: fleetmesh_protocol::workflow::Objective,
    pub state: JobState,
    pub attempts: Vec<Attempt>,
    /// Failed attempts that used up a retry.
    pub failures: u32,
    pub history: Vec<HistoryEntry>,
    /// Why the job is not placed yet (per agent), while queued.
    pub queued_reasons: Vec<String>,
    pub next_try_unix_ms: u64,
    pub cost: f64,
    pub submitted_unix_ms: u64,
    /// Output name -> dataset id, once the job succeeded.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// Residency given to the outputs (declared, or the most restrictive of the inputs').
    #[serde(default)]
    pub output_residency: Vec<String>,
    /// A spot interruption moved it: it goes to capacity that is not spot when any fits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub avoid_spot: bool,
}

/// A workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowRecord {
    pub id: String,
    pub name: String,
    pub spec: Workflow,
    pub jobs: Vec<String>,
    pub state: WorkflowState,
    pub submitted_unix_ms: u64,
    /// Dataset inputs as written -> the dataset id they named at submission: a later put
    /// under the same name (a new version) does not change what this workflow reads.
    /// Inputs that did not exist yet are pinned when first auctioned.
    #[serde(default)]
    pub pinned: BTreeMap<String, String>,
}

/// A compact workflow line for listings (the full spec is not copied per request).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkflowSummary {
    pub id: String,
    pub name: String,
    pub objective: String,
    pub state: WorkflowState,
    /// Number of jobs.
    pub jobs: usize,
    pub submitted_unix_ms: u64,
    /// What its attempts have cost so far.
    #[serde(default)]
    pub cost: f64,
}

/// A compact job line for listings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: String,
    pub workflow: String,
    pub name: String,
    pub state: JobState,
    pub attempts: usize,
    pub agents: Vec<String>,
    pub cost: f64,
    pub reason: Option<String>,
    pub submitted_unix_ms: u64,
    /// Award and start of the current attempt.
    pub awarded_unix_ms: Option<u64>,
    pub started_unix_ms: Option<u64>,
    /// For an array job: its members per state (the members are listed with `?array=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<BTreeMap<JobState, usize>>,
}

/// Jobs in listing order (by id), one page at a time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobPage {
    pub jobs: Vec<JobSummary>,
    /// Pass as `after=` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Jobs per page when the request does not say...
pub const DEFAULT_PAGE_JOBS: usize = 1000;
/// ...and at most.
pub const MAX_PAGE_JOBS: usize = 5000;

/// Output of an attempt, for `fleetmesh logs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogChunk {
    pub job: String,
    pub attempt: u64,
    pub data: String,
    pub next_offset: usize,
    pub finished: bool,
}

impl Attempt {
    /// The ranks' agents that have not reported an outcome yet.
    pub fn unfinished_agents(&self) -> Vec<String> {
        self.agents
            .iter()
            .zip(&self.outcomes)
            .filter(|(_, o)| o.is_none())
            .map(|(a, _)| a.clone())
            .collect()
    }
}

impl JobRecord {
    /// Move to `state` at `now`, with what happened for the history.
    pub fn set(&mut self, now: u64, state: JobState, detail: impl Into<String>) {
        let detail = detail.into();
        info!(job_id = %self.id, from = ?self.state, to = ?state, %detail, "job state");
        self.state = state;
        self.history.push(HistoryEntry { at_unix_ms: now, state, detail });
        if self.history.len() > HISTORY_LIMIT {
            self.history.remove(0);
        }
    }
    pub fn current(&self) -> Option<&Attempt> {
        self.attempts.last()
    }
    pub fn current_mut(&mut self) -> Option<&mut Attempt> {
        self.attempts.last_mut()
    }
    /// An array job itself (its members are the ones placed).
    pub fn is_array(&self) -> bool {
        self.spec.array.is_some() && self.member.is_none()
    }
}

/// A bid as the auctioneer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BidView {
    pub agent: String,
    /// Price for the expected run.
    pub price: f64,
    /// Expected time until the job can start, ms.
    pub eta_ms: u64,
    pub gpus: Vec<String>,
    /// Input bytes the bidder already holds.
    #[serde(default)]
    pub local_bytes: u64,
    /// Health facts of the offered GPUs, as the bidder read them (`jobs show`).
    #[serde(default)]
    pub health: Vec<fleetmesh_protocol::GpuHealth>,
    /// Share of the bidder's CPUs taken once the job runs there (0 to 1).
    #[serde(default)]
    pub load: f64,
}

/// One step of a job's history. Stored and served as `[at_unix_ms, state, detail]`, as
/// earlier builds wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "(u64, JobState, String)", into = "(u64, JobState, String)")]
pub struct HistoryEntry {
    pub at_unix_ms: u64,
    /// The state the job entered.
    pub state: JobState,
    /// What happened.
    pub detail: String,
}

impl From<(u64, JobState, String)> for HistoryEntry {
    fn from((at_unix_ms, state, detail): (u64, JobState, String)) -> Self {
        Self { at_unix_ms, state, detail }
    }
}

impl From<HistoryEntry> for (u64, JobState, String) {
    fn from(e: HistoryEntry) -> Self {
        (e.at_unix_ms, e.state, e.detail)
    }
}
