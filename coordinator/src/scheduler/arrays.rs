//! Array jobs (`parallel: N`, `matrix:`): an array is one record that is never placed,
//! and its members (`WORKFLOW.JOB[i]`) are ordinary jobs that share its spec. The
//! members are released with the array (when its dependencies succeed), placed,
//! retried and cancelled one by one; the array ends when every member has, succeeding
//! when its stated share did. Dependents and the workflow see only the array.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use fleetmesh_protocol::workflow::{member_name, JobSpec};
use tracing::{info, warn};

use super::core::SchedulerCore;
use super::records::{JobPage, JobRecord, JobState, JobSummary, MemberOf, SharedSpec};

/// Which jobs a listing wants, and which page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobListing {
    /// Only this workflow's jobs.
    pub workflow: Option<String>,
    /// The members of this array job, in index order (instead of top-level jobs).
    pub array: Option<String>,
    /// Start after this job id (a page's `next`).
    pub after: Option<String>,
    pub limit: usize,
}

/// How members end up, counted for an array's verdict.
#[derive(Default)]
struct Tally {
    succeeded: u32,
    unfinished: bool,
    cost: f64,
}

impl SchedulerCore {
    /// Link members read back from the store to their array's spec (they are stored
    /// without it).
    pub(super) fn link_members(jobs: &mut BTreeMap<String, JobRecord>) {
        let specs: HashMap<String, Arc<JobSpec>> = jobs
            .values()
            .filter(|j| j.is_array())
            .map(|j| (j.id.clone(), j.spec.arc().clone()))
            .collect();
        for j in jobs.values_mut() {
            let Some(m) = &j.member else { continue };
            match specs.get(&m.array) {
                Some(spec) => j.spec = SharedSpec::member(spec.clone()),
                None => warn!(job_id = %j.id, array = %m.array, "array member without its array"),
            }
        }
    }

    /// The members of array `id`, created with it at submission (waiting, like it).
    pub(super) fn member_records(parent: &JobRecord) -> Vec<JobRecord> {
        let count = parent.spec.array.as_ref().map_or(0, |a| a.count);
        (0..count)
            .map(|index| {
                let mut m = parent.clone();
                m.id = member_name(&parent.id, index);
                m.name = member_name(&parent.name, index);
                m.spec = SharedSpec::member(parent.spec.arc().clone());
                m.member = Some(MemberOf { array: parent.id.clone(), index });
                m
            })
            .collect()
    }

    /// The ids of array `id`'s members (none for a job that is not an array).
    pub(super) fn member_ids(&self, id: &str) -> Vec<String> {
        let count = self
            .jobs
            .get(id)
            .filter(|j| j.is_array())
            .map_or(0, |j| j.spec.array.as_ref().map_or(0, |a| a.count));
        (0..count).map(|i| member_name(id, i)).collect()
    }

    /// A waiting job's dependencies decided `state`: an array runs (its members are
    /// queued) or is skipped with them; any other job simply moves.
    pub(super) fn release_job(&mut self, id: &str, state: JobState, why: String, now: u64) {
        let members = self.member_ids(id);
        let Some(j) = self.jobs.get_mut(id) else { return };
        if members.is_empty() {
            j.set(now, state, why);
            self.touch_job(id);
            return;
        }
        let (own, detail) = match state {
            JobState::Queued => {
                (JobState::Running, format!("{why}; {} members queued", members.len()))
            }
            other => (other, why.clone()),
        };
        j.set(now, own, detail);
        self.touch_job(id);
        for m in members {
            if let Some(mj) = self.jobs.get_mut(&m).filter(|mj| mj.state == JobState::Waiting) {
                mj.set(now, state, why.clone());
                self.dirty_j.insert(m);
            }
        }
    }

    /// Arrays whose members changed: ended once every member has, succeeded when the
    /// stated share did. The array's cost is its members'.
    pub(super) fn finish_arrays(&mut self, now: u64) {
        for id in std::mem::take(&mut self.array_check) {
            let Some(a) = self.jobs.get(&id) else { continue };
            if a.state != JobState::Running {
                continue;
            }
            let Some(spec) = a.spec.array.clone() else { continue };
            let mut t = Tally::default();
            for m in self.member_ids(&id) {
                match self.jobs.get(&m) {
                    Some(mj) if !mj.state.terminal() => {
                        t.unfinished = true;
                        break;
                    }
                    Some(mj) => {
                        t.succeeded += u32::from(mj.state == JobState::Succeeded);
                        t.cost += mj.cost;
                    }
                    None => {}
                }
            }
            if t.unfinished {
                continue;
            }
            let (count, required) = (spec.count, spec.required());
            let (state, word) = if t.succeeded >= required {
                (JobState::Succeeded, "succeeded")
            } else {
                (JobState::Failed, "failed")
            };
            let detail = format!(
                "{} of {count} members succeeded, {required} needed: the array {word}",
                t.succeeded
            );
            info!(job_id = %id, succeeded = t.succeeded, count, required, "array finished");
            if let Some(a) = self.jobs.get_mut(&id) {
                a.cost = t.cost;
                a.set(now, state, detail);
            }
            self.touch_job(&id);
        }
    }

    /// A page of job summaries: top-level jobs (arrays folded, with their members per
    /// state), or one array's members in index order.
    pub fn list_jobs(&self, q: &JobListing) -> JobPage {
        let limit = q.limit.clamp(1, super::records::MAX_PAGE_JOBS);
        let mut jobs: Vec<&JobRecord> = match &q.array {
            Some(array) => self.members_after(array, q.after.as_deref(), limit + 1),
            None => self.top_level_after(q, limit + 1),
        };
        let next = (jobs.len() > limit).then(|| {
            jobs.truncate(limit);
            jobs.last().map(|j| j.id.clone()).unwrap_or_default()
        });
        JobPage { jobs: jobs.into_iter().map(|j| self.summary(j)).collect(), next }
    }

    fn members_after(&self, array: &str, after: Option<&str>, n: usize) -> Vec<&JobRecord> {
        let start = after
            .and_then(|a| self.jobs.get(a))
            .and_then(|j| j.member.as_ref())
            .filter(|m| m.array == array)
            .map_or(0, |m| m.index + 1);
        let ids = self.member_ids(array);
        ids.iter().skip(start as usize).filter_map(|id| self.jobs.get(id)).take(n).collect()
    }

    fn top_level_after(&self, q: &JobListing, n: usize) -> Vec<&JobRecord> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        // A workflow's jobs are the ids that start with `WORKFLOW.`.
        let prefix = q.workflow.as_ref().map(|w| format!("{w}."));
        let from = match (&q.after, &prefix) {
            (Some(a), _) => Excluded(a.clone()),
            (None, Some(p)) => Included(p.clone()),
            (None, None) => Unbounded,
        };
        self.jobs
            .range((from, Unbounded))
            .take_while(|(id, _)| prefix.as_ref().is_none_or(|p| id.starts_with(p)))
            .map(|(_, j)| j)
            .filter(|j| j.member.is_none())
            .filter(|j| q.workflow.as_ref().is_none_or(|w| &j.workflow == w))
            .take(n)
            .collect()
    }

    fn summary(&self, j: &JobRecord) -> JobSummary {
        let members = j.is_array().then(|| {
            let mut per_state: BTreeMap<JobState, usize> = BTreeMap::new();
            for m in self.member_ids(&j.id).iter().filter_map(|m| self.jobs.get(m)) {
                *per_state.entry(m.state).or_default() += 1;
            }
            per_state
        });
        JobSummary {
            id: j.id.clone(),
            workflow: j.workflow.clone(),
            name: j.name.clone(),
            state: j.state,
            attempts: j.attempts.len(),
            agents: j.current().map(|a| a.agents.clone()).unwrap_or_default(),
            cost: j.cost,
            reason: self
                .booting_for
                .get(&j.id)
                .filter(|_| j.state == JobState::Queued)
                .or(j.queued_reasons.first())
                .cloned()
                .or_else(|| j.history.last().map(|h| h.detail.clone())),
            submitted_unix_ms: j.submitted_unix_ms,
            awarded_unix_ms: j.current().map(|a| a.awarded_unix_ms),
            started_unix_ms: j.current().and_then(|a| a.started_unix_ms),
            members,
        }
    }
}

/// Jobs waiting for capacity, for the autoscaler, and what the Scheduler's own attempts
/// hold per agent.
#[derive(Debug, Clone, Default)]
pub struct Demand {
    pub waiting: Vec<crate::autoscale::core::Waiting>,
    /// What running or awarded attempts hold, per agent.
    pub held: BTreeMap<String, Held>,
    /// What attempts have cost on each agent, ever.
    pub spend: BTreeMap<String, f64>,
}

pub use super::core::Held;

/// Waiting jobs handed to the autoscaler per decision at most (the oldest first).
pub const MAX_DEMAND: usize = 10_000;

impl SchedulerCore {
    /// The queued jobs no agent took in their last auction (they have reasons), with
    /// the residency their inputs impose; and the per-agent holds.
    pub fn demand(&self) -> Demand {
        let mut waiting: Vec<&JobRecord> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued && !j.queued_reasons.is_empty())
            .collect();
        waiting.sort_by_key(|j| (std::cmp::Reverse(j.spec.priority), j.submitted_unix_ms));
        waiting.truncate(MAX_DEMAND);
        let waiting = waiting
            .into_iter()
            .filter_map(|j| {
                let residency = match j.spec.inputs.is_empty() {
                    true => Vec::new(),
                    false => self.resolve_inputs(j).ok()?.1,
                };
                Some(crate::autoscale::core::Waiting {
                    job: j.id.clone(),
                    spec: j.spec.arc().clone(),
                    residency,
                    objective: j.objective,
                })
            })
            .collect();
        let (_, holds) = self.attempt_holds();
        let held = holds.into_iter().map(|(agent, h)| (agent.to_string(), h)).collect();
        Demand { waiting, held, spend: self.spend_by_agent.clone() }
    }
}
