//! From a queued job to a fenced award: feasibility for one auction (inputs resolved and
//! pinned, residency, the prefilter's constraints; every refused agent says why), the
//! call for bids, and the auction's outcome turned into a new attempt with its awards.
//! A refused or unanswered award goes to the auction's runner-up as the next attempt.

use std::collections::BTreeMap;

use fleetmesh_protocol::codec::encode_frame;
use fleetmesh_protocol::data::{intersect_residency, residency_allows, Shard};
use fleetmesh_protocol::workflow::{InputRef, JobSpec, Run};
use fleetmesh_protocol::{
    Award, AwardInput, AwardOutput, CallForBids, CoordinatorMessage, ExecSpec, InputSummary,
    PeerKind,
};
use tracing::{info, warn};

use super::core::{
    rendezvous_addr, Backup, Effect, SchedulerCore, AUCTION_WINDOW_MS, BACKUP_MARGIN_MS,
    DEFAULT_EXPECTED_MS, LEASE_MS, MASTER_PORT, MS_PER_HOUR, REQUEUE_MS,
};
use super::records::{Attempt, AttemptState, JobRecord, JobState};
use crate::data::broker::{DatasetRecord, Requester};
use crate::placement::auction::{self, AuctionOutcome, BidView, Candidate, OpenAuction};

/// A job's inputs as (mount, dataset) and the residency they impose together.
type ResolvedInputs = (Vec<(String, DatasetRecord)>, Vec<String>);

/// Floor of the priced GPU-hours a bid's price is divided by (a zero timeout must not
/// divide by zero).
const MIN_PRICED_GPU_HOURS: f64 = 1e-9;

/// The hours a job is priced for: its timeout, or [`DEFAULT_EXPECTED_MS`].
pub(super) fn priced_hours(spec: &JobSpec) -> f64 {
    spec.timeout_ms.unwrap_or(DEFAULT_EXPECTED_MS) as f64 / MS_PER_HOUR
}

impl SchedulerCore {
    /// A job's inputs, resolved to datasets (pinned versions first).
    pub(super) fn resolve_inputs(&self, j: &JobRecord) -> Result<ResolvedInputs, InputError> {
        let empty = BTreeMap::new();
        let wf = self.workflows.get(&j.workflow);
        let jobs = wf.map_or(&empty, |w| &w.spec.jobs);
        let mut out = Vec::new();
        for (mount, r) in j.spec.input_refs(jobs) {
            let rec = match r {
                InputRef::Dataset(n) => match wf.and_then(|w| w.pinned.get(&n)) {
                    Some(id) => self.catalog.resolve(id).ok_or_else(|| InputError::PinnedGone {
                        name: n.clone(),
                        id: id.clone(),
                    })?,
                    None => self.catalog.resolve(&n).ok_or(InputError::NoDataset(n))?,
                },
                InputRef::JobOutput { job, output } if self.is_array(&j.workflow, &job) => {
                    out.extend(self.fan_in(&j.workflow, &job, &output, &mount)?);
                    continue;
                }
                InputRef::JobOutput { job, output } => {
                    let producer = format!("{}.{job}", j.workflow);
                    let id =
                        self.jobs.get(&producer).and_then(|p| p.outputs.get(&output)).ok_or_else(
                            || InputError::NotRegistered {
                                job: job.clone(),
                                output: output.clone(),
                            },
                        )?;
                    self.catalog.resolve(id).ok_or_else(|| InputError::OutputGone {
                        job: job.clone(),
                        output: output.clone(),
                        id: id.clone(),
                    })?
                }
            };
            out.push((mount, rec));
        }
        let residency = intersect_residency(out.iter().map(|(_, d)| &d.jurisdictions[..]))
            .ok_or(InputError::NoCommonJurisdiction)?;
        Ok((out, residency))
    }

    fn is_array(&self, workflow: &str, job: &str) -> bool {
        self.jobs.get(&format!("{workflow}.{job}")).is_some_and(JobRecord::is_array)
    }

    /// Fan-in: output `output` of every member of array `job` that registered it,
    /// mounted as `MOUNT/INDEX` (members that did not succeed have none).
    fn fan_in(
        &self,
        workflow: &str,
        job: &str,
        output: &str,
        mount: &str,
    ) -> Result<Vec<(String, DatasetRecord)>, InputError> {
        let mut out = Vec::new();
        for m in self.member_ids(&format!("{workflow}.{job}")) {
            let Some(mj) = self.jobs.get(&m) else { continue };
            let (Some(id), Some(member)) = (mj.outputs.get(output), &mj.member) else { continue };
            let rec = self.catalog.resolve(id).ok_or_else(|| InputError::OutputGone {
                job: mj.name.clone(),
                output: output.to_string(),
                id: id.clone(),
            })?;
            out.push((format!("{mount}/{}", member.index), rec));
        }
        Ok(out)
    }

    /// Pin the dataset inputs of `job` that were not resolvable at submission to the
    /// version they resolve to now (`resolved` pairs mounts with datasets).
    fn pin_inputs(&mut self, job: &str, resolved: &[(String, DatasetRecord)]) {
        let Some(j) = self.jobs.get(job) else { return };
        let Some(w) = self.workflows.get_mut(&j.workflow) else { return };
        let mut changed = false;
        let refs: BTreeMap<String, InputRef> =
            j.spec.input_refs(&w.spec.jobs).into_iter().collect();
        for (mount, rec) in resolved {
            if let Some(InputRef::Dataset(n)) = refs.get(mount).cloned() {
                if let std::collections::btree_map::Entry::Vacant(e) = w.pinned.entry(n) {
                    e.insert(rec.id.clone());
                    changed = true;
                }
            }
        }
        if changed {
            self.dirty_w.push(w.id.clone());
        }
    }

    /// Open an auction for `id`; the invited agents. `candidates` has this tick's claims
    /// applied, `unclaimed` does not (to tell "busy right now" from "impossible").
    pub(super) fn start_auction(
        &mut self,
        id: &str,
        candidates: &[Candidate],
        unclaimed: &[Candidate],
        now: u64,
    ) -> Option<Vec<String>> {
        let data = match self.jobs.get(id) {
            Some(j) if !j.spec.inputs.is_empty() => Some(self.resolve_inputs(j)),
            _ => None,
        };
        let (inputs, residency) = match data {
            None => (Vec::new(), Vec::new()),
            Some(Err(why)) => {
                self.keep_queued(id, vec![why.to_string()], now);
                return None;
            }
            Some(Ok((ins, res))) => {
                self.pin_inputs(id, &ins);
                (ins, res)
            }
        };
        if residency.is_empty() {
            let invite = self.invitees(id, candidates, unclaimed, &inputs, Vec::new(), now)?;
            return self.open_auction(id, invite, inputs, residency, now);
        }
        // Residency narrows where the job may run; each agent it rules out says so.
        let allowed = |c: &&Candidate| residency_allows(&residency, c.jurisdiction.as_deref());
        let refusals: Vec<String> = candidates
            .iter()
            .filter(|c| !allowed(c))
            .map(|c| residency_refusal(c, &residency))
            .collect();
        let candidates: Vec<Candidate> = candidates.iter().filter(allowed).cloned().collect();
        let unclaimed: Vec<Candidate> = unclaimed.iter().filter(allowed).cloned().collect();
        let invite = self.invitees(id, &candidates, &unclaimed, &inputs, refusals, now)?;
        self.open_auction(id, invite, inputs, residency, now)
    }

    /// Whom to invite for `id`: the prefilter's best (the agents holding the most input
    /// bytes first), or `None` with the job kept queued and the reasons recorded.
    fn invitees(
        &mut self,
        id: &str,
        candidates: &[Candidate],
        unclaimed: &[Candidate],
        inputs: &[(String, DatasetRecord)],
        mut reasons: Vec<String>,
        now: u64,
    ) -> Option<Vec<String>> {
        let j = self.jobs.get_mut(id)?;
        let want = self.top_k.max(j.spec.nodes as usize * 2);
        // After a spot interruption: on-demand capacity first, spot only if nothing else fits.
        let on_demand: Vec<Candidate>;
        let candidates = if j.avoid_spot {
            on_demand = candidates.iter().filter(|c| !c.spot).cloned().collect();
            let (fits, _) = auction::prefilter(&j.spec, &on_demand, j.spec.nodes as usize);
            if fits.len() >= j.spec.nodes as usize {
                &on_demand[..]
            } else {
                candidates
            }
        } else {
            candidates
        };
        let (invite, refused) = if inputs.is_empty() {
            auction::prefilter(&j.spec, candidates, want)
        } else {
            let (mut all, refused) = auction::prefilter(&j.spec, candidates, usize::MAX);
            let held = |a: &str| -> u64 {
                inputs.iter().filter_map(|(_, d)| d.holders.get(a).map(|h| h.bytes_present)).sum()
            };
            all.sort_by_key(|a| std::cmp::Reverse(held(a)));
            all.truncate(want);
            (all, refused)
        };
        if invite.len() as u32 >= j.spec.nodes {
            return Some(invite);
        }
        let (without_claims, _) = auction::prefilter(&j.spec, unclaimed, usize::MAX);
        if without_claims.len() as u32 >= j.spec.nodes && without_claims.len() > invite.len() {
            // Only this tick's other auctions are in the way: try again next tick.
            j.next_try_unix_ms = now;
            return None;
        }
        reasons.extend(refused.iter().map(|(a, why)| format!("{a}: {why}")));
        if candidates.is_empty() && reasons.is_empty() {
            reasons.push("no agents in the fleet".into());
        }
        if j.spec.nodes > 1 {
            let n = j.spec.nodes;
            reasons.push(format!("gang of {n} needs {n} eligible agents, {} found", invite.len()));
        }
        self.keep_queued(id, reasons, now);
        None
    }

    /// Record and open the auction for the job's next attempt.
    fn open_auction(
        &mut self,
        id: &str,
        invite: Vec<String>,
        inputs: Vec<(String, DatasetRecord)>,
        residency: Vec<String>,
        now: u64,
    ) -> Option<Vec<String>> {
        let suffix = (self.ids)();
        let j = self.jobs.get(id)?;
        let attempt = j.attempts.len() as u64 + 1;
        let auction_id = format!("{id}#{attempt}-{suffix}");
        let call = CallForBids {
            auction: auction_id.clone(),
            job: id.to_string(),
            gpus: j.spec.resources.gpus,
            gpu_model: j.spec.resources.gpu_model.clone(),
            gpu_memory_bytes: j.spec.resources.gpu_memory_bytes,
            cpus: j.spec.resources.cpus,
            memory_bytes: j.spec.resources.memory_bytes,
            needs_container: j.spec.image.is_some(),
            expected_duration_ms: j.spec.timeout_ms.unwrap_or(DEFAULT_EXPECTED_MS),
            lease_ms: LEASE_MS,
            inputs: inputs.iter().map(|(_, d)| self.input_summary(d)).collect(),
            dry_run: false,
        };
        let open = OpenAuction {
            id: auction_id.clone(),
            job: id.to_string(),
            attempt,
            objective: j.objective,
            nodes: j.spec.nodes,
            invite: invite.clone(),
            call,
            deadline_unix_ms: now + AUCTION_WINDOW_MS,
            inputs: inputs.iter().map(|(m, d)| (m.clone(), d.id.clone())).collect(),
            residency,
        };
        self.auctions.insert(auction_id, id.to_string());
        self.effects.push(Effect::OpenAuction(Box::new(open)));
        Some(invite)
    }

    /// What bidders need to know of an input: its size and where its holders are.
    fn input_summary(&self, d: &DatasetRecord) -> InputSummary {
        let site = |h: &String| {
            let c = self.last_candidates.iter().find(|c| &c.agent == h);
            (c.and_then(|c| c.provider.clone()), c.and_then(|c| c.region.clone()))
        };
        InputSummary {
            dataset: d.id.clone(),
            bytes: d.bytes,
            holder_sites: d.holders.keys().map(site).collect(),
        }
    }

    /// The Auctioneer could not take the auction: forget it (the job stays queued).
    pub fn auction_not_opened(&mut self, auction: &str) {
        if let Some(job) = self.auctions.remove(auction) {
            warn!(job_id = %job, "auctioneer unavailable; the job stays queued");
        }
    }

    /// Leave a job queued with the reasons users see in `jobs show`; it is auctioned
    /// again after `REQUEUE_MS` (and stored again only when the reasons changed).
    pub(super) fn keep_queued(&mut self, id: &str, reasons: Vec<String>, now: u64) {
        let Some(j) = self.jobs.get_mut(id) else { return };
        if j.queued_reasons != reasons {
            info!(job_id = %id, reasons = ?reasons, "not placed; job stays queued");
            j.queued_reasons = reasons;
            self.dirty_j.insert(id.to_string());
        }
        j.next_try_unix_ms = now + REQUEUE_MS;
    }

    /// Tell these bidders to drop their reservations for the auction.
    fn release(&mut self, auction_id: &str, bids: &[BidView]) {
        for b in bids {
            self.send(&b.agent, CoordinatorMessage::Release { auction: auction_id.to_string() });
        }
    }

    /// An auction closed: award now. The awards leave once their attempt is committed
    /// (the commit precedes them in the effects).
    pub fn auction_closed(&mut self, outcome: AuctionOutcome, now: u64) {
        self.close_auction(outcome, now);
        self.flush();
    }

    /// Turn an auction's outcome into an award (a new fenced attempt), or leave the job
    /// queued with the reasons. The Auctioneer already released the losing bids; the
    /// winners are released here when the job cannot be awarded after all.
    fn close_auction(&mut self, mut run: AuctionOutcome, now: u64) {
        self.auctions.remove(&run.id);
        let winners = run.winners.take();
        let queued = self.jobs.get(&run.job).is_some_and(|j| j.state == JobState::Queued);
        let winners = match winners {
            Some(w) if queued => w,
            Some(w) => return self.release(&run.id, &w),
            None if queued => {
                let reasons = std::mem::take(&mut run.declines);
                return self.keep_queued(&run.job, reasons, now);
            }
            None => return,
        };
        match self.build_awards(&run, &winners, now) {
            Ok((attempt, awards)) => self.record_award(run, attempt, awards, now),
            Err(Refusal::Requeue(reasons)) => {
                self.keep_queued(&run.job, reasons, now);
                self.release(&run.id, &winners);
            }
            Err(Refusal::Fail(why)) => {
                warn!(job_id = %run.job, "{why}");
                if let Some(j) = self.jobs.get_mut(&run.job) {
                    j.set(now, JobState::Failed, why);
                }
                self.release(&run.id, &winners);
                self.touch_job(&run.job);
            }
        }
    }

    /// The attempt and one award per rank for `winners`, or why there is none.
    fn build_awards(
        &mut self,
        run: &AuctionOutcome,
        winners: &[BidView],
        now: u64,
    ) -> Result<(Attempt, Vec<(String, CoordinatorMessage)>), Refusal> {
        let j = self.jobs.get(&run.job).ok_or(Refusal::Requeue(Vec::new()))?;
        // Outputs are made from the inputs: they may narrow the inputs' residency, never
        // widen it.
        let declared = j.spec.output_jurisdictions.clone().unwrap_or_default();
        let output_residency = intersect_residency([&run.residency[..], &declared[..]])
            .ok_or_else(|| Refusal::Fail(format!(
                "output_jurisdictions {declared:?} has nothing in common with the residency of its inputs {:?}: an output cannot be less restricted than what it is made from",
                run.residency
            )))?;
        let plans = self.fetch_plans(run, winners, now)?;
        let wf_name = self.workflows.get(&j.workflow).map(|w| w.name.clone()).unwrap_or_default();
        let outputs: Vec<AwardOutput> = j
            .spec
            .outputs
            .iter()
            .map(|o| AwardOutput {
                output: o.clone(),
                dataset_name: format!("{wf_name}.{}.{o}", j.name),
                jurisdictions: output_residency.clone(),
            })
            .collect();
        let mut exec = exec_spec(&j.spec);
        if let (Some(m), Some(a)) = (&j.member, &j.spec.array) {
            exec.env.extend(a.member_env(m.index));
        }
        // Rank 0's address as the other members can reach it (its name if unknown).
        let members: Vec<_> = winners.iter().map(|w| self.reach.get(&w.agent)).collect();
        let master = winners
            .first()
            .map(|w| {
                rendezvous_addr(self.reach.get(&w.agent), &members)
                    .unwrap_or_else(|| w.agent.clone())
            })
            .unwrap_or_default();
        let awards: Vec<(String, CoordinatorMessage)> = winners
            .iter()
            .enumerate()
            .map(|(rank, w)| {
                let award = Award {
                    auction: run.id.clone(),
                    job: run.job.clone(),
                    attempt: run.attempt,
                    gpus: w.gpus.clone(),
                    cpus: j.spec.resources.cpus,
                    memory_bytes: j.spec.resources.memory_bytes,
                    exec: exec.clone(),
                    rank: rank as u32,
                    world_size: winners.len() as u32,
                    master_addr: master.clone(),
                    master_port: MASTER_PORT,
                    inputs: plans.get(rank).cloned().unwrap_or_default(),
                    outputs: outputs.clone(),
                };
                (w.agent.clone(), CoordinatorMessage::Award(Box::new(award)))
            })
            .collect();
        // An award that cannot be sent would be retried forever: the job fails instead.
        if let Some(e) = awards.iter().find_map(|(_, m)| encode_frame(m).err()) {
            return Err(Refusal::Fail(format!(
                "the award cannot be sent to an agent ({e}); make the job smaller"
            )));
        }
        let attempt = new_attempt(&j.spec, run, winners, now);
        if let Some(j) = self.jobs.get_mut(&run.job) {
            j.output_residency = output_residency;
        }
        Ok((attempt, awards))
    }

    /// Fetch plans (with tickets) for each winner's inputs, in rank order.
    fn fetch_plans(
        &self,
        run: &AuctionOutcome,
        winners: &[BidView],
        now: u64,
    ) -> Result<Vec<Vec<AwardInput>>, Refusal> {
        let mut plans = Vec::new();
        let j = self.jobs.get(&run.job);
        let empty = BTreeMap::new();
        let jobs = j.and_then(|j| self.workflows.get(&j.workflow)).map_or(&empty, |w| &w.spec.jobs);
        let shard = |mount: &str| {
            let j = j?;
            let (m, a) = (j.member.as_ref()?, j.spec.array.as_ref()?);
            j.spec.sharded(mount, jobs).then_some(Shard { index: m.index, count: a.count })
        };
        for w in winners.iter().filter(|_| !run.inputs.is_empty()) {
            let cand = self.last_candidates.iter().find(|c| c.agent == w.agent);
            let me = Requester {
                kind: PeerKind::Agent,
                name: w.agent.clone(),
                jurisdiction: cand.and_then(|c| c.jurisdiction.clone()),
            };
            let mut ins = Vec::new();
            for (mount, ds) in &run.inputs {
                let plan =
                    self.catalog.plan(ds, &me, &self.last_candidates, now).map_err(|why| {
                        Refusal::Requeue(vec![format!("{}: input {mount}: {why}", w.agent)])
                    })?;
                ins.push(AwardInput { mount: mount.clone(), plan, shard: shard(mount) });
            }
            plans.push(ins);
        }
        Ok(plans)
    }

    /// Record the new attempt (the job is starting), queue its awards behind the next
    /// commit, and remember the runner-up.
    fn record_award(
        &mut self,
        run: AuctionOutcome,
        attempt: Attempt,
        awards: Vec<(String, CoordinatorMessage)>,
        now: u64,
    ) {
        let Some(j) = self.jobs.get_mut(&run.job) else { return };
        let detail = format!("attempt {} awarded to {}", run.attempt, attempt.agents.join(", "));
        j.attempts.push(attempt);
        j.queued_reasons.clear();
        j.set(now, JobState::Starting, detail);
        self.touch_job(&run.job);
        self.outgoing.extend(awards);
        if let Some(bid) = run.backup {
            let backup = Backup {
                auction: run.id,
                bid,
                bids: run.bids,
                inputs: run.inputs,
                residency: run.residency,
                until_unix_ms: now + LEASE_MS.saturating_sub(BACKUP_MARGIN_MS),
            };
            self.backups.insert((run.job, run.attempt), backup);
        }
    }

    /// The award of `attempt` was refused or not accepted in time: give the job to the
    /// auction's runner-up as the next attempt (a new fence), while its offer is recent.
    /// The runner-up takes it if the GPUs it offered are still free, else refuses, and
    /// the job is auctioned again. Returns false when there is no usable runner-up.
    pub(super) fn award_backup(&mut self, job: &str, attempt: u64, why: &str, now: u64) -> bool {
        let Some(b) = self.backups.remove(&(job.to_string(), attempt)) else { return false };
        let current = self.jobs.get(job).and_then(|j| j.current()).map(|a| a.n);
        if now > b.until_unix_ms || current != Some(attempt) {
            return false;
        }
        info!(job_id = %job, attempt, next = %b.bid.agent, %why, "award goes to the next bid");
        self.stop_attempt(job, attempt, why);
        let lost = format!("{why}; awarding the next bid ({})", b.bid.agent);
        self.attempt_lost(job, attempt, &lost, now);
        let next = self.jobs.get(job).map_or(attempt + 1, |j| j.attempts.len() as u64 + 1);
        let outcome = AuctionOutcome {
            id: b.auction,
            job: job.to_string(),
            attempt: next,
            invited: vec![b.bid.agent.clone()],
            bids: b.bids,
            declines: Vec::new(),
            winners: Some(vec![b.bid]),
            backup: None,
            inputs: b.inputs,
            residency: b.residency,
        };
        self.close_auction(outcome, now);
        true
    }
}

/// Why a job's inputs cannot be resolved now (it stays queued with the reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("input {name}: the version pinned at submission ({id}) is gone")]
    PinnedGone { name: String, id: String },
    #[error("input {0}: no dataset with that name or id")]
    NoDataset(String),
    #[error("input {job}.{output}: not registered by {job}")]
    NotRegistered { job: String, output: String },
    #[error("input {job}.{output}: dataset {id} is gone")]
    OutputGone { job: String, output: String, id: String },
    #[error("inputs have no jurisdiction in common: no agent may hold all of them")]
    NoCommonJurisdiction,
}

/// Why an auction's winners get no award.
enum Refusal {
    /// The job stays queued, with these reasons.
    Requeue(Vec<String>),
    /// The job can never be awarded: it fails with this reason.
    Fail(String),
}

fn residency_refusal(c: &Candidate, residency: &[String]) -> String {
    format!(
        "{}: residency: inputs may only live in {residency:?}, agent is in {}",
        c.agent,
        c.jurisdiction.as_deref().unwrap_or("no jurisdiction")
    )
}

/// What each rank runs.
fn exec_spec(spec: &JobSpec) -> ExecSpec {
    ExecSpec {
        argv: match &spec.run {
            Run::Command(c) => c.clone(),
            Run::Script(s) => vec!["sh".into(), "-c".into(), s.clone()],
        },
        env: spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        image: spec.image.clone(),
        timeout_ms: spec.timeout_ms,
    }
}

/// A fresh attempt for `winners` (one rank each), awarded at `now`.
fn new_attempt(spec: &JobSpec, run: &AuctionOutcome, winners: &[BidView], now: u64) -> Attempt {
    let units = f64::from(spec.resources.gpus.max(1));
    // A bid prices the whole expected run; the attempt records the hourly rate.
    let per_hour = |w: &BidView| w.price / (priced_hours(spec) * units).max(MIN_PRICED_GPU_HOURS);
    Attempt {
        n: run.attempt,
        agents: winners.iter().map(|w| w.agent.clone()).collect(),
        gpus: winners.iter().map(|w| w.gpus.clone()).collect(),
        price_per_hour: winners.iter().map(per_hour).collect(),
        bids: run.bids.clone(),
        awarded_unix_ms: now,
        started_unix_ms: None,
        ended_unix_ms: None,
        outcomes: vec![None; winners.len()],
        succeeded: vec![false; winners.len()],
        cost: 0.0,
        state: AttemptState::Awarded,
    }
}
