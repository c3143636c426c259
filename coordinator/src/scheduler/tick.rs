//! The Scheduler core's periodic work: timers first ([`SchedulerCore::tick_timers`]),
//! then placement on a fresh fleet view ([`SchedulerCore::tick_place`]), then workflow
//! completion. The shell asks the Fleet for candidates only when
//! [`SchedulerCore::due_jobs`] has some queued job to auction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tracing::info;

use super::core::{
    Reach, SchedulerCore, AWARD_ANSWER_MS, MAX_AUCTIONS_PER_TICK, MAX_OPEN_AUCTIONS,
    START_TIMEOUT_MS,
};
use super::records::{AttemptState, JobRecord, JobState, WorkflowState};
use crate::placement::auction::{self, Candidate};

/// One tick's placement in progress: the due jobs left, the view with this tick's
/// claims (`candidates`) and without them (`unclaimed`), and the room left.
pub struct Placement {
    queued: std::collections::VecDeque<String>,
    candidates: Vec<Candidate>,
    unclaimed: Vec<Candidate>,
    index: HashMap<String, usize>,
    room: usize,
    free_gpus: usize,
    /// Free GPUs before this tick's claims.
    unclaimed_free_gpus: usize,
}

impl SchedulerCore {
    /// One whole tick (timers, placement on `view`, completion); what tests drive.
    pub fn tick(&mut self, now: u64, view: Option<Vec<Candidate>>) {
        self.tick_timers(now);
        self.tick_place(now, view);
    }

    /// Dependencies, and attempts whose deadlines passed.
    pub fn tick_timers(&mut self, now: u64) {
        self.wake_waiting_for_room(now);
        self.release_dependents(now);
        self.lose_unconfirmed(now);
        self.pass_on_unanswered_awards(now);
        self.time_out_starts(now);
    }

    /// Auctions for the due queued jobs on `view` (none: the Fleet did not answer, and
    /// the jobs wait for the next tick rather than be marked "no agents"), then commit
    /// and send what was decided, then workflow completion.
    pub fn tick_place(&mut self, now: u64, view: Option<Vec<Candidate>>) {
        let due = self.due_jobs(now);
        if let Some(v) = view.filter(|_| !due.is_empty()) {
            let mut p = self.begin_placement(due, v);
            while self.place_next(&mut p, now) {}
            self.end_placement(p);
        }
        self.finish_tick(now);
    }

    /// The awards (and their fences) and recorded exits in one commit, then the sends;
    /// then array and workflow completion.
    pub fn finish_tick(&mut self, now: u64) {
        self.flush();
        self.finish_arrays(now);
        self.finish_workflows();
        self.persist();
    }

    /// Waiting jobs whose dependencies all succeeded are queued (an array's members
    /// are); those with a failed, skipped or cancelled dependency are skipped.
    fn release_dependents(&mut self, now: u64) {
        let waiting: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Waiting && j.member.is_none())
            .map(|j| j.id.clone())
            .collect();
        for id in waiting {
            let Some(j) = self.jobs.get(&id) else { continue };
            let deps: Vec<(String, JobState)> = j
                .spec
                .needs
                .iter()
                .map(|d| {
                    let did = format!("{}.{d}", j.workflow);
                    (d.clone(), self.jobs.get(&did).map_or(JobState::Failed, |d| d.state))
                })
                .collect();
            let bad = deps.iter().find(|(_, s)| {
                matches!(s, JobState::Failed | JobState::Skipped | JobState::Cancelled)
            });
            let next = match bad {
                Some((d, s)) => Some((
                    JobState::Skipped,
                    format!("dependency {d} {}", format!("{s:?}").to_lowercase()),
                )),
                None if deps.iter().all(|(_, s)| *s == JobState::Succeeded) => {
                    Some((JobState::Queued, "dependencies succeeded".to_string()))
                }
                None => None,
            };
            if let Some((state, why)) = next {
                self.release_job(&id, state, why, now);
            }
        }
    }

    /// After an attempt ended, the jobs left queued for want of room (those with
    /// reasons; a retry's backoff has none) are considered again at once.
    fn wake_waiting_for_room(&mut self, now: u64) {
        if !std::mem::take(&mut self.room_freed) {
            return;
        }
        for j in self.jobs.values_mut() {
            if j.state == JobState::Queued
                && j.next_try_unix_ms > now
                && !j.queued_reasons.is_empty()
            {
                j.next_try_unix_ms = now;
            }
        }
    }

    /// Attempts an agent did not confirm after a restart or reconnect, in time.
    fn lose_unconfirmed(&mut self, now: u64) {
        let expired: Vec<(String, u64)> =
            self.verify.iter().filter(|(_, t)| **t <= now).map(|(k, _)| k.clone()).collect();
        for (job, attempt) in expired {
            self.verify.remove(&(job.clone(), attempt));
            self.attempt_lost(&job, attempt, "not running on its agent after reconnect", now);
        }
    }

    /// Awards not accepted in time go to the runner-up; unused runner-ups expire.
    fn pass_on_unanswered_awards(&mut self, now: u64) {
        let overdue: Vec<(String, u64)> = self
            .backups
            .keys()
            .filter(|(job, n)| {
                self.jobs.get(job).and_then(|j| j.current()).is_some_and(|a| {
                    a.n == *n
                        && a.state == AttemptState::Awarded
                        && now > a.awarded_unix_ms + AWARD_ANSWER_MS
                })
            })
            .cloned()
            .collect();
        for (job, n) in overdue {
            self.award_backup(&job, n, "the award was not accepted in time", now);
        }
        self.backups.retain(|_, b| now <= b.until_unix_ms);
    }

    /// Awards never accepted within [`START_TIMEOUT_MS`] are stopped and placed again.
    /// Accepted attempts may be staging inputs: the agent's loss, not a timer, ends those;
    /// attempts awaiting re-adoption have their own deadline.
    fn time_out_starts(&mut self, now: u64) {
        let stuck: Vec<(String, u64)> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Starting)
            .filter(|j| !self.verify.keys().any(|(id, _)| *id == j.id))
            .filter_map(|j| {
                j.current()
                    .filter(|a| {
                        a.state == AttemptState::Awarded
                            && now > a.awarded_unix_ms + START_TIMEOUT_MS
                    })
                    .map(|a| (j.id.clone(), a.n))
            })
            .collect();
        for (job, n) in stuck {
            self.stop_attempt(&job, n, "did not start in time");
            self.attempt_lost(&job, n, "did not start in time", now);
        }
    }

    /// The first [`MAX_AUCTIONS_PER_TICK`] queued jobs that are due and not in an
    /// auction, by priority, then submission. The sort is stable: among equals, job-id
    /// order, which measured faster than an unstable top-N selection (462 vs ~310
    /// placements/s).
    pub fn due_jobs(&self, now: u64) -> Vec<String> {
        let in_auction: HashSet<&str> = self.auctions.values().map(String::as_str).collect();
        let mut queued: Vec<&JobRecord> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued && j.next_try_unix_ms <= now)
            .filter(|j| !in_auction.contains(j.id.as_str()))
            .collect();
        queued.sort_by(|a, b| {
            b.spec
                .priority
                .cmp(&a.spec.priority)
                .then(a.submitted_unix_ms.cmp(&b.submitted_unix_ms))
        });
        queued.truncate(MAX_AUCTIONS_PER_TICK);
        queued.into_iter().map(|j| j.id.clone()).collect()
    }

    /// Start placing `queued` (this tick's [`Self::due_jobs`]) on `candidates`. GPUs
    /// invited for in this tick are claimed (taken out of a working copy), so concurrent
    /// auctions go to agents that still have room instead of all competing for the same
    /// GPUs.
    pub fn begin_placement(
        &mut self,
        queued: Vec<String>,
        mut candidates: Vec<Candidate>,
    ) -> Placement {
        for c in &candidates {
            let reach = Reach {
                addr: c.addr.clone(),
                hostname: c.hostname.clone(),
                host_addrs: c.host_addrs.clone(),
            };
            self.reach.insert(c.agent.clone(), reach);
        }
        let (busy, held) = self.attempt_holds();
        for c in &mut candidates {
            let h = held.get(c.agent.as_str()).copied().unwrap_or_default();
            c.used_cpus = h.cpus;
            c.used_memory_bytes = h.memory_bytes;
            let free: Vec<(String, u64)> = c
                .gpu_uuids
                .iter()
                .zip(c.free_gpus.iter())
                .filter(|(u, _)| !busy.contains(u.as_str()))
                .map(|(_, g)| g.clone())
                .collect();
            c.free_gpus = free;
        }
        auction::sort_candidates(&mut candidates);
        let unclaimed = candidates.clone();
        let index = unclaimed.iter().enumerate().map(|(i, c)| (c.agent.clone(), i)).collect();
        let room = MAX_AUCTIONS_PER_TICK.min(MAX_OPEN_AUCTIONS.saturating_sub(self.auctions.len()));
        let free_gpus = candidates.iter().map(|c| c.free_gpus.len()).sum();
        Placement {
            queued: queued.into(),
            candidates,
            unclaimed,
            index,
            room,
            free_gpus,
            unclaimed_free_gpus: free_gpus,
        }
    }

    /// Consider queued jobs until one auction opens; false when the tick's placement is
    /// over. The shell opens each auction as soon as it is decided, so the first agents
    /// are asked while later jobs are still being considered.
    pub fn place_next(&mut self, p: &mut Placement, now: u64) -> bool {
        while p.room > 0 {
            let Some(id) = p.queued.pop_front() else { return false };
            let Some(r) = self.jobs.get(&id).map(|j| j.spec.resources.clone()) else { continue };
            let gpus = r.gpus as usize;
            if gpus > 0 && p.free_gpus == 0 {
                if p.unclaimed_free_gpus == 0 {
                    // Not one free GPU in the fleet: the job waits, saying so (which is
                    // also what the autoscaler launches for).
                    let why = format!("no free GPU in the fleet ({gpus} wanted)");
                    self.keep_queued(&id, vec![why], now);
                }
                // Otherwise this tick's capacity is spoken for; try again next tick.
                continue;
            }
            let Some(invited) = self.start_auction(&id, &p.candidates, &p.unclaimed, now) else {
                continue;
            };
            p.room -= 1;
            // One invitee wins: each is charged its share of the CPUs and memory, so a
            // tick opens about as many auctions as the fleet has room for (the agents
            // themselves never offer more than is free).
            let share = 1.0 / invited.len().max(1) as f64;
            for a in invited {
                if let Some(c) = p.index.get(&a).and_then(|i| p.candidates.get_mut(*i)) {
                    let n = gpus.min(c.free_gpus.len());
                    c.free_gpus.drain(..n);
                    p.free_gpus = p.free_gpus.saturating_sub(n);
                    c.used_cpus += r.cpus * share;
                    let memory = (r.memory_bytes as f64 * share) as u64;
                    c.used_memory_bytes = c.used_memory_bytes.saturating_add(memory);
                }
            }
            return true;
        }
        false
    }

    /// This tick's placement is over; its view is kept for fetch plans.
    pub fn end_placement(&mut self, p: Placement) {
        self.last_candidates = Arc::new(p.unclaimed);
    }

    /// Workflows with a job that changed: finished once every job is.
    fn finish_workflows(&mut self) {
        for wid in std::mem::take(&mut self.wf_check) {
            let Some(w) = self.workflows.get(&wid) else { continue };
            if w.state != WorkflowState::Running {
                continue;
            }
            // From the back: later jobs finish later, so an unfinished workflow is
            // usually told after one lookup rather than one per job.
            let state = |j: &String| self.jobs.get(j).map(|j| j.state);
            if !w.jobs.iter().rev().filter_map(state).all(|s| s.terminal()) {
                continue;
            }
            let done = if w.jobs.iter().filter_map(state).all(|s| s == JobState::Succeeded) {
                WorkflowState::Succeeded
            } else {
                WorkflowState::Failed
            };
            if let Some(w) = self.workflows.get_mut(&wid) {
                w.state = done;
                info!(workflow = %wid, state = done.as_str(), "workflow finished");
            }
            self.dirty_w.push(wid);
        }
    }
}
