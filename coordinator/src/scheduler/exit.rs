//! What the end of a rank means for its job: a stale attempt's exit is only noted; a
//! rank that fenced itself off or could not stage its inputs sends the job back to the
//! queue without using a retry; otherwise the attempt ends when every rank has, and the
//! job succeeds, is retried with backoff, or fails. A failed rank stops the gang.

use fleetmesh_protocol::{CoordinatorMessage, JobOutcome, OutputDataset};
use tracing::warn;

use super::core::{
    Effect, SchedulerCore, MAX_BACKOFF_DOUBLINGS, MS_PER_HOUR, STAGING_BACKOFF_FIRST_MS,
    STAGING_BACKOFF_MAX_MS,
};
use super::records::{AttemptState, JobRecord, JobState};

/// How long a job waits before being placed again after its `previous` staging failures.
pub fn staging_backoff_ms(previous: usize) -> u64 {
    // Seven doublings of the first wait already pass the cap.
    const MAX_DOUBLINGS: usize = 7;
    (STAGING_BACKOFF_FIRST_MS << previous.min(MAX_DOUBLINGS)).min(STAGING_BACKOFF_MAX_MS)
}

/// The wait before retry number `failures` (1-based) of a job whose first retry waits
/// `base_ms`.
pub fn retry_backoff_ms(base_ms: u64, failures: u32) -> u64 {
    base_ms.saturating_mul(1u64 << failures.saturating_sub(1).min(MAX_BACKOFF_DOUBLINGS))
}

/// A rank's exit, as the agent reported it.
pub struct Exit {
    pub agent: String,
    pub job: String,
    pub attempt: u64,
    pub outcome: JobOutcome,
    pub duration_ms: u64,
    pub outputs: Vec<OutputDataset>,
}

impl SchedulerCore {
    /// A rank of an attempt exited. The exit is acknowledged to the agent after the
    /// commit that records it.
    pub fn job_exited(&mut self, exit: Exit, now: u64) {
        let (agent, job, attempt) = (exit.agent.clone(), exit.job.clone(), exit.attempt);
        self.verify.remove(&(job.clone(), attempt));
        self.exited(exit, now);
        self.room_freed = true;
        let over = self
            .jobs
            .get(&job)
            .is_none_or(|j| !matches!(j.state, JobState::Starting | JobState::Running));
        if over {
            self.effects.push(Effect::LogsFinished { job: job.clone() });
        }
        self.outgoing.push((agent, CoordinatorMessage::ExitRecorded { job, attempt }));
        self.flush();
    }

    fn exited(&mut self, exit: Exit, now: u64) {
        let Some(j) = self.jobs.get_mut(&exit.job) else { return };
        if j.attempts.last().map(|a| a.n) != Some(exit.attempt) {
            if note_stale_exit(j, &exit) {
                self.touch_job(&exit.job);
            }
            return;
        }
        let Some(a) = j.attempts.last_mut() else { return };
        let Some(rank) = a.agents.iter().position(|x| *x == exit.agent) else { return };
        if a.outcomes[rank].is_some() {
            return;
        }
        a.outcomes[rank] = Some(exit.outcome.to_string());
        if matches!(a.state, AttemptState::Lost | AttemptState::StagingFailed) {
            // Already given up on (and placed again): recorded how it ended, nothing more.
            self.touch_job(&exit.job);
            return;
        }
        match &exit.outcome {
            JobOutcome::Abandoned { reason } => {
                // The agent fenced itself off after losing us (we may not have noticed,
                // e.g. across our own restart): placed again, no retry used.
                let others = a.unfinished_agents();
                let why =
                    format!("{} stopped it after losing the coordinator: {reason}", exit.agent);
                self.send_stop(
                    &others,
                    &exit.job,
                    exit.attempt,
                    "another rank lost the coordinator",
                );
                self.attempt_lost(&exit.job, exit.attempt, &why, now);
                self.touch_job(&exit.job);
            }
            JobOutcome::StagingFailed { reason } => {
                let reason = reason.clone();
                self.staging_failed(&exit, &reason, now);
            }
            _ => self.rank_ended(exit, rank, now),
        }
    }

    /// Not the job's fault: place it again (other ranks stopped), no retry used, backing
    /// off while its inputs stay unreachable.
    fn staging_failed(&mut self, exit: &Exit, reason: &str, now: u64) {
        let Some(j) = self.jobs.get_mut(&exit.job) else { return };
        let previous = j.attempts.iter().filter(|a| a.state == AttemptState::StagingFailed).count();
        let Some(a) = j.attempts.last_mut() else { return };
        a.state = AttemptState::StagingFailed;
        a.ended_unix_ms = Some(now);
        let others = a.unfinished_agents();
        if j.state != JobState::Cancelled {
            let backoff = staging_backoff_ms(previous);
            j.next_try_unix_ms = now + backoff;
            j.set(
                now,
                JobState::Queued,
                format!(
                    "attempt {}: inputs not staged on {}: {reason}; placing again in {backoff} ms",
                    exit.attempt, exit.agent
                ),
            );
        }
        self.send_stop(&others, &exit.job, exit.attempt, "another rank could not stage its inputs");
        self.touch_job(&exit.job);
    }

    /// A rank ran and ended: register its outputs, add its cost, stop the gang if it
    /// failed, and decide the job once every rank has ended.
    fn rank_ended(&mut self, exit: Exit, rank: usize, now: u64) {
        let Some(j) = self.jobs.get(&exit.job) else { return };
        let wf_name = self.workflows.get(&j.workflow).map(|w| w.name.clone()).unwrap_or_default();
        let succeeded = exit.outcome.succeeded();
        let mut registered = Vec::new();
        if succeeded {
            // Outputs become datasets held by this agent, named WORKFLOW.JOB.OUTPUT, with
            // the residency the award gave them.
            for o in exit.outputs {
                let name = format!("{wf_name}.{}.{}", j.name, o.output);
                let rec = self.catalog.register(
                    o.manifest,
                    &name,
                    j.output_residency.clone(),
                    &exit.agent,
                    Some(exit.job.clone()),
                    now,
                );
                registered.push((o.output, rec.id));
            }
        }
        let Some(j) = self.jobs.get_mut(&exit.job) else { return };
        j.outputs.extend(registered);
        let units = f64::from(j.spec.resources.gpus.max(1));
        let Some(a) = j.attempts.last_mut() else { return };
        a.succeeded[rank] = succeeded;
        let cost = a.price_per_hour.get(rank).copied().unwrap_or(0.0)
            * (exit.duration_ms as f64 / MS_PER_HOUR)
            * units;
        a.cost += cost;
        j.cost += cost;
        *self.spend_by_agent.entry(exit.agent.clone()).or_default() += cost;
        let all_done = a.outcomes.iter().all(Option::is_some);
        let any_failed = a.outcomes.iter().zip(&a.succeeded).any(|(o, s)| o.is_some() && !s);
        if any_failed && !all_done {
            let others = a.unfinished_agents();
            self.send_stop(&others, &exit.job, exit.attempt, "another rank failed");
        }
        if all_done {
            if let Some(j) = self.jobs.get_mut(&exit.job) {
                decide(j, exit.attempt, now);
            }
        }
        self.touch_job(&exit.job);
    }
}

/// An earlier attempt, placed again meanwhile: only note how it ended (shown by
/// `jobs show`); it changes nothing else. Whether anything was noted.
fn note_stale_exit(j: &mut JobRecord, exit: &Exit) -> bool {
    warn!(job_id = %exit.job, attempt = exit.attempt, agent_id = %exit.agent, outcome = %exit.outcome, "exit of a stale attempt: noted, nothing else");
    let Some(old) = j.attempts.iter_mut().find(|a| a.n == exit.attempt) else { return false };
    let Some(rank) = old.agents.iter().position(|x| *x == exit.agent) else { return false };
    if old.outcomes[rank].is_some() {
        return false;
    }
    old.outcomes[rank] = Some(exit.outcome.to_string());
    true
}

/// Every rank of the current attempt ended: the job succeeds, is retried, or fails (a
/// cancelled job stays cancelled).
fn decide(j: &mut JobRecord, attempt: u64, now: u64) {
    let Some(a) = j.attempts.last_mut() else { return };
    a.ended_unix_ms = Some(now);
    let ok = a.succeeded.iter().all(|s| *s);
    a.state = if ok { AttemptState::Succeeded } else { AttemptState::Failed };
    let summary = a.outcomes.iter().flatten().cloned().collect::<Vec<_>>().join("; ");
    if j.state == JobState::Cancelled {
        return;
    }
    if ok {
        j.set(now, JobState::Succeeded, format!("attempt {attempt}: {summary}"));
    } else if j.failures < j.spec.retries.limit {
        j.failures += 1;
        let backoff = retry_backoff_ms(j.spec.retries.backoff_ms, j.failures);
        j.next_try_unix_ms = now + backoff;
        let (n, limit) = (j.failures, j.spec.retries.limit);
        j.set(
            now,
            JobState::Queued,
            format!("attempt {attempt}: {summary}; retry {n} of {limit} in {backoff} ms"),
        );
    } else {
        j.set(now, JobState::Failed, format!("attempt {attempt}: {summary}; no retries left"));
    }
}
