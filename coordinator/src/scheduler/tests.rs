//! The Scheduler core, driven deterministically: a clock the test advances, a fleet view
//! the test writes, auction outcomes and agents' answers the test plays, and a catalogue
//! in memory. No actor, no sleep, no disk.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fleetmesh_protocol::data::{FetchPlan, Manifest};
use fleetmesh_protocol::{CoordinatorMessage, JobOutcome, OutputDataset};

use super::core::*;
use super::exit::{retry_backoff_ms, staging_backoff_ms, Exit};
use super::records::*;
use crate::data::broker::{BrokerError, DatasetRecord, HolderState, Requester};
use crate::placement::auction::{AuctionOutcome, BidView, Candidate, OpenAuction};

/// Datasets by id and by name; registrations are kept.
#[derive(Default)]
struct MemCatalog {
    datasets: Mutex<BTreeMap<String, DatasetRecord>>,
}

impl MemCatalog {
    fn add(&self, name: &str, jurisdictions: &[&str], holder: &str) -> String {
        let id = format!("ds-{name}");
        let mut holders = BTreeMap::new();
        let state = HolderState { complete: true, bytes_present: 10, updated_unix_ms: 0 };
        holders.insert(holder.to_string(), state);
        let rec = DatasetRecord {
            id: id.clone(),
            name: name.into(),
            jurisdictions: jurisdictions.iter().map(|s| s.to_string()).collect(),
            bytes: 10,
            files: 1,
            chunks: 1,
            holders,
            producer: None,
            created_unix_ms: 0,
            manifest: Arc::new(Manifest { chunk_size: 1, files: vec![] }),
            fetches: BTreeMap::new(),
            pending: Default::default(),
            version: 1,
        };
        self.datasets.lock().unwrap().insert(id.clone(), rec);
        id
    }
}

impl Catalog for MemCatalog {
    fn resolve(&self, r: &str) -> Option<DatasetRecord> {
        let d = self.datasets.lock().unwrap();
        d.get(r).cloned().or_else(|| d.values().find(|x| x.name == r).cloned())
    }
    fn plan(
        &self,
        id: &str,
        _r: &Requester,
        _c: &[Candidate],
        _now: u64,
    ) -> Result<FetchPlan, BrokerError> {
        let d = self.resolve(id).ok_or_else(|| BrokerError::NoDataset(id.into()))?;
        Ok(FetchPlan {
            dataset: d.id,
            name: d.name,
            jurisdictions: d.jurisdictions,
            bytes: d.bytes,
            holders: vec![],
        })
    }
    fn register(
        &self,
        _m: Manifest,
        name: &str,
        jurisdictions: Vec<String>,
        holder: &str,
        _p: Option<String>,
        _now: u64,
    ) -> DatasetRecord {
        let j: Vec<&str> = jurisdictions.iter().map(String::as_str).collect();
        let id = self.add(name, &j, holder);
        self.resolve(&id).unwrap()
    }
}

/// A core, a clock and a fleet view.
struct Harness {
    core: SchedulerCore,
    catalog: Arc<MemCatalog>,
    now: u64,
    fleet: Vec<Candidate>,
    /// Effects not yet looked at.
    effects: Vec<Effect>,
}

const T0: u64 = 1_000_000;

fn agent(name: &str, gpus: usize, jurisdiction: Option<&str>) -> Candidate {
    Candidate {
        agent: name.into(),
        connected: true,
        draining: false,
        region: None,
        jurisdiction: jurisdiction.map(str::to_string),
        provider: None,
        labels: Default::default(),
        spot: false,
        price_per_hour: 1.0,
        free_gpus: (0..gpus).map(|_| ("H100".to_string(), 80 << 30)).collect(),
        gpu_uuids: (0..gpus).map(|i| format!("GPU-{name}-{i}")).collect(),
        addr: Some(format!("10.0.0.{}:7400", name.len())),
        data_addr: None,
        cpus: 64,
        memory_bytes: 1 << 40,
        used_cpus: 0.0,
        used_memory_bytes: 0,
        hostname: None,
        host_addrs: vec![],
    }
}

fn bid(agent: &str) -> BidView {
    BidView {
        agent: agent.into(),
        price: 1.0,
        eta_ms: 0,
        gpus: vec![format!("GPU-{agent}-0")],
        local_bytes: 0,
        health: vec![],
        load: 0.0,
    }
}

fn exited(code: i32) -> JobOutcome {
    JobOutcome::Exited { code }
}

impl Harness {
    fn new() -> Self {
        Self::restored(BTreeMap::new(), BTreeMap::new())
    }

    fn restored(
        workflows: BTreeMap<String, WorkflowRecord>,
        jobs: BTreeMap<String, JobRecord>,
    ) -> Self {
        let catalog = Arc::new(MemCatalog::default());
        let mut n = 0;
        let ids: IdSource = Box::new(move || {
            n += 1;
            format!("{n:04}")
        });
        let core = SchedulerCore::restore(workflows, jobs, catalog.clone(), 3, ids, T0);
        let fleet = vec![agent("a", 1, None), agent("b", 1, None)];
        Self { core, catalog, now: T0, fleet, effects: Vec::new() }
    }

    fn collect(&mut self) -> &mut Vec<Effect> {
        let e = self.core.take_effects();
        self.effects.extend(e);
        &mut self.effects
    }

    /// Submit a workflow file; its id. Panics on an invalid file.
    fn submit(&mut self, yaml: &str) -> String {
        let wf = fleetmesh_protocol::workflow::parse(yaml).expect("valid workflow");
        let id = self.core.submit(wf, self.now);
        self.collect();
        id
    }

    fn tick(&mut self) {
        self.core.tick(self.now, Some(self.fleet.clone()));
        self.collect();
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.tick();
    }

    /// Auctions opened since the last call.
    fn opened(&mut self) -> Vec<OpenAuction> {
        let (open, rest): (Vec<_>, Vec<_>) =
            self.collect().drain(..).partition(|e| matches!(e, Effect::OpenAuction(_)));
        self.effects = rest;
        open.into_iter()
            .filter_map(|e| match e {
                Effect::OpenAuction(o) => Some(*o),
                _ => None,
            })
            .collect()
    }

    /// The one auction opened for `job`.
    fn auction_for(&mut self, job: &str) -> OpenAuction {
        let mut all = self.opened();
        let i = all.iter().position(|o| o.job == job).unwrap_or_else(|| {
            panic!("no auction for {job}; {:?}", self.core.job(job).map(|j| &j.queued_reasons))
        });
        all.swap_remove(i)
    }

    /// Messages sent since the last call, in order.
    fn sent(&mut self) -> Vec<(String, CoordinatorMessage)> {
        let all: Vec<Effect> = self.collect().drain(..).collect();
        all.into_iter()
            .filter_map(|e| match e {
                Effect::Send { agent, msg } => Some((agent, msg)),
                _ => None,
            })
            .collect()
    }

    /// Everything since the last call, as short words: "commit", "award:a:2", ...
    fn trace(&mut self) -> Vec<String> {
        let all: Vec<Effect> = self.collect().drain(..).collect();
        all.iter()
            .map(|e| match e {
                Effect::Commit(_) => "commit".to_string(),
                Effect::OpenAuction(o) => format!("open:{}", o.attempt),
                Effect::LogsFinished { .. } => "logs".to_string(),
                Effect::Send { agent, msg } => match msg {
                    CoordinatorMessage::Award(a) => format!("award:{agent}:{}", a.attempt),
                    CoordinatorMessage::Stop { attempt, .. } => format!("stop:{agent}:{attempt}"),
                    CoordinatorMessage::Release { .. } => format!("release:{agent}"),
                    CoordinatorMessage::ExitRecorded { attempt, .. } => {
                        format!("ack:{agent}:{attempt}")
                    }
                    CoordinatorMessage::Keep { attempts } => format!("keep:{agent}:{attempts:?}"),
                    _ => format!("other:{agent}"),
                },
            })
            .collect()
    }

    /// Close `o` with these winners (in rank order) and runner-up.
    fn close(&mut self, o: &OpenAuction, winners: &[&str], backup: Option<&str>) {
        let winners: Vec<BidView> = winners.iter().map(|a| bid(a)).collect();
        let bids = winners.iter().cloned().chain(backup.map(bid)).collect();
        let outcome = AuctionOutcome {
            id: o.id.clone(),
            job: o.job.clone(),
            attempt: o.attempt,
            invited: o.invite.clone(),
            bids,
            declines: vec![],
            winners: (!winners.is_empty()).then_some(winners),
            backup: backup.map(bid),
            inputs: o.inputs.clone(),
            residency: o.residency.clone(),
        };
        self.core.auction_closed(outcome, self.now);
        self.collect();
    }

    fn exit(&mut self, agent: &str, job: &str, attempt: u64, outcome: JobOutcome) {
        let exit = Exit {
            agent: agent.into(),
            job: job.into(),
            attempt,
            outcome,
            duration_ms: 3_600_000,
            outputs: vec![],
        };
        self.core.job_exited(exit, self.now);
        self.collect();
    }

    fn started(&mut self, agent: &str, job: &str, attempt: u64) {
        self.core.job_started(agent, job, attempt, self.now);
        self.collect();
    }

    fn job(&self, id: &str) -> &JobRecord {
        self.core.job(id).expect("job exists")
    }

    fn state(&self, id: &str) -> JobState {
        self.job(id).state
    }

    /// Submit, queue and award `job` of `yaml` to `to` (attempt 1); the job id.
    fn placed(&mut self, yaml: &str, job: &str, to: &[&str], backup: Option<&str>) -> String {
        let wf = self.submit(yaml);
        let id = format!("{wf}.{job}");
        self.tick();
        let o = self.auction_for(&id);
        self.close(&o, to, backup);
        self.effects.clear();
        id
    }

    /// Like [`Self::placed`], and running.
    fn running(&mut self, yaml: &str, job: &str, to: &[&str]) -> String {
        let id = self.placed(yaml, job, to, None);
        for a in to {
            self.started(a, &id, 1);
        }
        self.effects.clear();
        id
    }
}

const ONE: &str = "name: w\njobs:\n  j:\n    command: [\"true\"]\n    resources: { gpus: 1 }\n";
const RETRY: &str =
    "name: w\njobs:\n  j:\n    command: [\"false\"]\n    retries: { limit: 2, backoff: 1s }\n";
const GANG: &str =
    "name: g\njobs:\n  j:\n    command: [\"true\"]\n    nodes: 2\n    resources: { gpus: 1 }\n";
const CHAIN: &str = "name: c\njobs:\n  a:\n    command: [\"true\"]\n  b:\n    needs: [a]\n    command: [\"true\"]\n";

// --- submission and dependencies ---

#[test]
fn a_submission_is_committed_and_its_ready_jobs_are_auctioned_on_the_next_tick() {
    let mut h = Harness::new();
    let wf = h.submit(ONE);
    assert_eq!(h.trace(), ["commit"], "acknowledged only after this commit");
    assert_eq!(h.state(&format!("{wf}.j")), JobState::Waiting);
    h.tick();
    let o = h.auction_for(&format!("{wf}.j"));
    assert_eq!((o.attempt, o.invite.clone()), (1, vec!["a".to_string(), "b".to_string()]));
    assert_eq!(o.deadline_unix_ms, T0 + AUCTION_WINDOW_MS);
    assert_eq!(o.call.lease_ms, LEASE_MS);
}

#[test]
fn a_dependent_job_waits_until_its_dependency_succeeded() {
    let mut h = Harness::new();
    let wf = h.submit(CHAIN);
    let (a, b) = (format!("{wf}.a"), format!("{wf}.b"));
    h.tick();
    assert_eq!(h.state(&b), JobState::Waiting);
    let o = h.auction_for(&a);
    h.close(&o, &["a"], None);
    h.started("a", &a, 1);
    h.exit("a", &a, 1, exited(0));
    assert_eq!(h.state(&a), JobState::Succeeded);
    h.advance(100);
    assert_eq!(h.state(&b), JobState::Queued);
    h.auction_for(&b);
}

#[test]
fn a_failed_dependency_skips_its_dependents_and_fails_the_workflow() {
    let mut h = Harness::new();
    let wf = h.submit(CHAIN);
    let a = format!("{wf}.a");
    h.tick();
    let o = h.auction_for(&a);
    h.close(&o, &["a"], None);
    h.exit("a", &a, 1, exited(3));
    assert_eq!(h.state(&a), JobState::Failed);
    h.advance(100);
    let b = h.job(&format!("{wf}.b"));
    assert_eq!(b.state, JobState::Skipped);
    assert_eq!(b.history.last().map(|e| e.detail.as_str()), Some("dependency a failed"));
    assert_eq!(h.core.workflow(&wf).map(|w| w.state), Some(WorkflowState::Failed));
}

#[test]
fn a_workflow_succeeds_when_every_job_did() {
    let mut h = Harness::new();
    let job = h.running(ONE, "j", &["a"]);
    h.exit("a", &job, 1, exited(0));
    h.tick();
    let wf = h.job(&job).workflow.clone();
    assert_eq!(h.core.workflow(&wf).map(|w| w.state), Some(WorkflowState::Succeeded));
}

// --- awards and fences ---

#[test]
fn an_award_leaves_only_after_the_commit_that_records_its_fence() {
    let mut h = Harness::new();
    let wf = h.submit(ONE);
    h.tick();
    let o = h.auction_for(&format!("{wf}.j"));
    h.effects.clear();
    h.close(&o, &["a"], None);
    assert_eq!(h.trace(), ["commit", "award:a:1"]);
    let j = h.job(&format!("{wf}.j"));
    assert_eq!((j.state, j.attempts.len()), (JobState::Starting, 1));
    assert_eq!(j.attempts[0].state, AttemptState::Awarded);
}

#[test]
fn a_gang_meets_at_an_address_every_member_can_reach() {
    let reach = |addr: &str, host: &str, own: &[&str]| Reach {
        addr: Some(addr.into()),
        hostname: Some(host.into()),
        host_addrs: own.iter().map(|a| a.to_string()).collect(),
    };
    let local0 = reach("127.0.0.1", "box", &["192.168.1.5"]);
    let local1 = reach("127.0.0.1", "box", &["192.168.1.5"]);
    let remote = reach("192.168.1.9", "other", &["192.168.1.9"]);
    // All on one host: loopback is fine.
    assert_eq!(
        rendezvous_addr(Some(&local0), &[Some(&local0), Some(&local1)]).unwrap(),
        "127.0.0.1"
    );
    // Rank 0 reaches the coordinator over loopback, a member is elsewhere: rank 0's own
    // address, never 127.0.0.1.
    assert_eq!(
        rendezvous_addr(Some(&local0), &[Some(&local0), Some(&remote)]).unwrap(),
        "192.168.1.5"
    );
    // A member whose host is unknown is not assumed to be on rank 0's.
    assert_eq!(rendezvous_addr(Some(&local0), &[Some(&local0), None]).unwrap(), "192.168.1.5");
    // A routable address (advertised, or where the connection comes from) is used as is.
    assert_eq!(
        rendezvous_addr(Some(&remote), &[Some(&remote), Some(&local0)]).unwrap(),
        "192.168.1.9"
    );
    // Nothing better known: what there is.
    let bare = reach("127.0.0.1", "box", &[]);
    assert_eq!(rendezvous_addr(Some(&bare), &[Some(&bare), Some(&remote)]).unwrap(), "127.0.0.1");
    assert_eq!(rendezvous_addr(None, &[]), None);
    // Through the core: two agents on different hosts, rank 0 seen over loopback.
    let mut h = Harness::new();
    for (c, host) in h.fleet.iter_mut().zip(["box", "other"]) {
        c.addr = Some("127.0.0.1".into());
        c.hostname = Some(host.into());
        c.host_addrs = vec![format!("10.1.0.{}", c.agent.len() + 1)];
    }
    let wf = h.submit(GANG);
    h.tick();
    let o = h.auction_for(&format!("{wf}.j"));
    h.close(&o, &["a", "b"], None);
    let masters: Vec<String> = h
        .sent()
        .into_iter()
        .filter_map(|(_, m)| match m {
            CoordinatorMessage::Award(a) => Some(a.master_addr),
            _ => None,
        })
        .collect();
    assert_eq!(masters, ["10.1.0.2", "10.1.0.2"], "rank 0's own address for both ranks");
}

#[test]
fn an_award_carries_the_command_the_rank_and_the_rendezvous() {
    let mut h = Harness::new();
    let wf = h.submit(GANG);
    h.tick();
    let o = h.auction_for(&format!("{wf}.j"));
    h.close(&o, &["a", "b"], None);
    let awards: Vec<_> = h
        .sent()
        .into_iter()
        .filter_map(|(to, m)| match m {
            CoordinatorMessage::Award(a) => Some((to, a)),
            _ => None,
        })
        .collect();
    assert_eq!(awards.len(), 2);
    for (rank, (to, a)) in awards.iter().enumerate() {
        assert_eq!((a.rank as usize, a.world_size), (rank, 2), "{to}");
        assert_eq!(a.master_addr, "10.0.0.1:7400", "rank 0's address");
        assert_eq!(a.master_port, MASTER_PORT);
        assert_eq!(a.exec.argv, ["true"]);
    }
}

#[test]
fn a_job_cancelled_during_its_auction_releases_the_winners() {
    let mut h = Harness::new();
    let wf = h.submit(ONE);
    h.tick();
    let o = h.auction_for(&format!("{wf}.j"));
    h.effects.clear();
    assert_eq!(h.core.cancel(&wf, h.now), Ok(1));
    assert_eq!(h.trace(), ["logs", "commit"], "nothing to stop yet");
    h.close(&o, &["a"], None);
    assert_eq!(h.trace(), ["release:a"]);
    assert_eq!(h.state(&format!("{wf}.j")), JobState::Cancelled);
}

#[test]
fn an_auction_without_winners_leaves_the_job_queued_with_the_declines() {
    let mut h = Harness::new();
    let wf = h.submit(ONE);
    let id = format!("{wf}.j");
    h.tick();
    let o = h.auction_for(&id);
    let outcome = AuctionOutcome {
        id: o.id.clone(),
        job: id.clone(),
        attempt: 1,
        invited: o.invite.clone(),
        bids: vec![],
        declines: vec!["a: not enough free GPUs".into(), "b: no answer".into()],
        winners: None,
        backup: None,
        inputs: vec![],
        residency: vec![],
    };
    h.core.auction_closed(outcome, h.now);
    let j = h.job(&id);
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.queued_reasons, ["a: not enough free GPUs", "b: no answer"]);
    assert_eq!(j.next_try_unix_ms, h.now + REQUEUE_MS);
    h.advance(REQUEUE_MS - 1);
    assert!(h.opened().is_empty(), "not before REQUEUE_MS");
    h.advance(1);
    assert_eq!(h.auction_for(&id).attempt, 1, "no attempt was used");
}

#[test]
fn an_award_too_large_for_a_frame_fails_the_job_instead_of_looping() {
    let mut h = Harness::new();
    let wf = h.submit(ONE);
    let id = format!("{wf}.j");
    // Beyond what validation lets through: as if the limits had been looser when stored.
    let big = "x".repeat(fleetmesh_protocol::codec::MAX_FRAME_LEN + 1);
    if let Some(j) = h.core.jobs.get_mut(&id) {
        let mut spec = (*j.spec).clone();
        spec.run = fleetmesh_protocol::workflow::Run::Script(big);
        j.spec = SharedSpec::own(Arc::new(spec));
    }
    h.tick();
    let o = h.auction_for(&id);
    h.effects.clear();
    h.close(&o, &["a"], None);
    let j = h.job(&id);
    assert_eq!(j.state, JobState::Failed);
    assert!(
        j.history.last().is_some_and(|e| e.detail.contains("cannot be sent")),
        "{:?}",
        j.history
    );
    assert_eq!(h.trace(), ["release:a", "commit"]);
}

// --- runner-up ---

#[test]
fn a_refused_award_goes_to_the_runner_up_with_a_new_fence() {
    let mut h = Harness::new();
    let job = h.placed(ONE, "j", &["a"], Some("b"));
    h.core.award_answer("a", &job, 1, false, "lease expired", h.now);
    assert_eq!(h.trace(), ["stop:a:1", "commit", "award:b:2"]);
    let j = h.job(&job);
    assert_eq!(j.attempts[0].state, AttemptState::Lost);
    assert_eq!(j.attempts[1].agents, ["b"]);
    assert_eq!((j.state, j.failures), (JobState::Starting, 0));
}

#[test]
fn an_unanswered_award_goes_to_the_runner_up_after_the_answer_deadline() {
    let mut h = Harness::new();
    let job = h.placed(ONE, "j", &["a"], Some("b"));
    h.advance(AWARD_ANSWER_MS);
    assert!(!h.trace().iter().any(|t| t.starts_with("award")), "not yet");
    h.advance(1);
    assert_eq!(h.trace(), ["stop:a:1", "commit", "award:b:2"]);
    assert!(h.job(&job).history.iter().any(|e| e.detail.contains("not accepted in time")));
}

#[test]
fn an_accepted_award_forgets_the_runner_up() {
    let mut h = Harness::new();
    let job = h.placed(ONE, "j", &["a"], Some("b"));
    h.core.award_answer("a", &job, 1, true, "", h.now);
    h.advance(AWARD_ANSWER_MS + 1);
    h.core.award_answer("a", &job, 1, false, "changed its mind", h.now);
    let t = h.trace();
    assert!(!t.iter().any(|x| x.starts_with("award")), "{t:?}");
    assert_eq!(h.state(&job), JobState::Queued, "refused with no runner-up: auctioned again");
}

#[test]
fn a_runner_up_whose_offer_is_too_old_is_not_used() {
    let mut h = Harness::new();
    let job = h.placed(ONE, "j", &["a"], Some("b"));
    h.now += LEASE_MS;
    h.core.award_answer("a", &job, 1, false, "busy", h.now);
    let t = h.trace();
    assert!(!t.iter().any(|x| x.starts_with("award")), "{t:?}");
    assert_eq!(h.state(&job), JobState::Queued);
    h.tick();
    assert_eq!(h.auction_for(&job).attempt, 2, "a fresh auction for the next attempt");
}

// --- start timeout ---

#[test]
fn an_award_never_started_is_stopped_and_placed_again() {
    let mut h = Harness::new();
    let job = h.placed(ONE, "j", &["a"], None);
    h.advance(START_TIMEOUT_MS);
    assert_eq!(h.state(&job), JobState::Starting);
    h.advance(1);
    let t = h.trace();
    assert_eq!(t[..2], ["stop:a:1", "open:2"], "stopped, and auctioned again in the same tick");
    assert_eq!(h.job(&job).attempts[0].state, AttemptState::Lost);
    assert_eq!(h.job(&job).failures, 0, "not the job's fault");
}

#[test]
fn a_started_attempt_is_not_timed_out() {
    let mut h = Harness::new();
    let job = h.running(ONE, "j", &["a"]);
    h.advance(START_TIMEOUT_MS * 10);
    assert_eq!(h.state(&job), JobState::Running);
    assert!(!h.trace().iter().any(|t| t.starts_with("stop")));
}

#[test]
fn a_start_report_of_another_attempt_is_stopped_at_once() {
    let mut h = Harness::new();
    let job = h.placed(ONE, "j", &["a"], None);
    h.core.job_started("b", &job, 7, h.now);
    let sent = h.sent();
    assert!(
        matches!(&sent[..], [(to, CoordinatorMessage::Stop { attempt: 7, grace_ms: 0, .. })] if to == "b"),
        "{sent:?}"
    );
    assert_eq!(h.state(&job), JobState::Starting);
}

// --- exits, retries, backoff ---

#[test]
fn an_exit_is_acknowledged_after_the_commit_that_records_it() {
    let mut h = Harness::new();
    let job = h.running(ONE, "j", &["a"]);
    h.exit("a", &job, 1, exited(0));
    assert_eq!(h.trace(), ["logs", "commit", "ack:a:1"]);
    assert_eq!(h.state(&job), JobState::Succeeded);
    assert!((h.job(&job).cost - 1.0).abs() < 1e-6, "one hour at the bid's rate");
}

#[test]
fn a_failed_attempt_is_retried_with_doubling_backoff_until_the_limit() {
    let mut h = Harness::new();
    let job = h.running(RETRY, "j", &["a"]);
    for (n, wait) in [(1u64, 1000u64), (2, 2000)] {
        h.exit("a", &job, n, exited(1));
        let j = h.job(&job);
        assert_eq!((j.state, j.failures as u64), (JobState::Queued, n));
        assert_eq!(j.next_try_unix_ms, h.now + wait);
        h.advance(wait - 1);
        assert!(h.opened().is_empty(), "retry {n} waits {wait} ms");
        h.advance(1);
        let o = h.auction_for(&job);
        assert_eq!(o.attempt, n + 1);
        h.close(&o, &["a"], None);
        h.started("a", &job, n + 1);
    }
    h.exit("a", &job, 3, exited(1));
    let j = h.job(&job);
    assert_eq!(j.state, JobState::Failed);
    assert!(j.history.last().is_some_and(|e| e.detail.ends_with("no retries left")));
}

#[test]
fn a_job_that_ran_past_its_timeout_uses_a_retry_like_any_failure() {
    let mut h = Harness::new();
    let job = h.running(RETRY, "j", &["a"]);
    h.exit("a", &job, 1, JobOutcome::TimedOut);
    let j = h.job(&job);
    assert_eq!((j.state, j.failures), (JobState::Queued, 1));
    assert_eq!(j.attempts[0].state, AttemptState::Failed);
    assert_eq!(j.attempts[0].outcomes[0].as_deref(), Some("timed out"));
}

#[test]
fn retry_backoff_doubles_and_never_overflows() {
    assert_eq!(retry_backoff_ms(1000, 1), 1000);
    assert_eq!(retry_backoff_ms(1000, 3), 4000);
    let capped = 1000u64 << MAX_BACKOFF_DOUBLINGS;
    assert_eq!(retry_backoff_ms(1000, 50), capped);
    assert_eq!(retry_backoff_ms(u64::MAX, 5), u64::MAX);
}

#[test]
fn staging_failure_requeues_without_a_retry_and_backs_off() {
    let mut h = Harness::new();
    let job = h.running(ONE, "j", &["a"]);
    for (n, wait) in [(1u64, STAGING_BACKOFF_FIRST_MS), (2, STAGING_BACKOFF_FIRST_MS * 2)] {
        let reason = "no reachable holder".to_string();
        h.exit("a", &job, n, JobOutcome::StagingFailed { reason });
        let j = h.job(&job);
        assert_eq!((j.state, j.failures), (JobState::Queued, 0));
        assert_eq!(j.attempts[n as usize - 1].state, AttemptState::StagingFailed);
        assert_eq!(j.next_try_unix_ms, h.now + wait);
        h.advance(wait);
        let o = h.auction_for(&job);
        h.close(&o, &["a"], None);
    }
}

#[test]
fn staging_backoff_is_capped() {
    assert_eq!(staging_backoff_ms(0), STAGING_BACKOFF_FIRST_MS);
    assert_eq!(staging_backoff_ms(3), STAGING_BACKOFF_FIRST_MS * 8);
    assert_eq!(staging_backoff_ms(100), STAGING_BACKOFF_MAX_MS);
}

#[test]
fn an_abandoned_attempt_is_placed_again_without_using_a_retry() {
    let mut h = Harness::new();
    let job = h.running(RETRY, "j", &["a"]);
    let reason = "coordinator silent for 10 s".to_string();
    h.exit("a", &job, 1, JobOutcome::Abandoned { reason });
    let j = h.job(&job);
    assert_eq!((j.state, j.failures), (JobState::Queued, 0));
    assert_eq!(j.attempts[0].state, AttemptState::Lost);
    h.advance(100);
    assert_eq!(h.auction_for(&job).attempt, 2);
}

#[test]
fn the_exit_of_a_stale_attempt_is_noted_and_changes_nothing() {
    let mut h = Harness::new();
    let job = h.running(ONE, "j", &["a"]);
    h.core.agent_gone("a", h.now);
    h.advance(100);
    let o = h.auction_for(&job);
    h.close(&o, &["b"], None);
    h.started("b", &job, 2);
    h.exit("a", &job, 1, exited(0));
    let j = h.job(&job);
    assert_eq!(j.state, JobState::Running, "attempt 2 decides");
    assert_eq!(j.attempts[0].outcomes[0].as_deref(), Some("exited with code 0"));
}

// --- gangs ---

#[test]
fn a_gang_is_not_auctioned_without_enough_eligible_agents() {
    let mut h = Harness::new();
    h.fleet = vec![agent("a", 1, None)];
    let wf = h.submit(GANG);
    h.tick();
    assert!(h.opened().is_empty());
    let j = h.job(&format!("{wf}.j"));
    assert_eq!(j.state, JobState::Queued);
    assert!(j.queued_reasons.iter().any(|r| r == "gang of 2 needs 2 eligible agents, 1 found"));
}

#[test]
fn a_failed_rank_stops_the_rest_of_the_gang() {
    let mut h = Harness::new();
    let job = h.running(GANG, "j", &["a", "b"]);
    h.exit("a", &job, 1, exited(2));
    let t = h.trace();
    assert!(t.contains(&"stop:b:1".to_string()), "{t:?}");
    assert_eq!(h.state(&job), JobState::Running, "decided when every rank ended");
    h.exit("b", &job, 1, JobOutcome::Signaled { signal: 15 });
    assert_eq!(h.state(&job), JobState::Failed);
    assert_eq!(h.job(&job).attempts[0].state, AttemptState::Failed);
}

#[test]
fn a_gang_succeeds_only_when_every_rank_did() {
    let mut h = Harness::new();
    let job = h.running(GANG, "j", &["a", "b"]);
    h.exit("b", &job, 1, exited(0));
    assert_eq!(h.state(&job), JobState::Running);
    h.exit("a", &job, 1, exited(0));
    assert_eq!(h.state(&job), JobState::Succeeded);
}

#[test]
fn a_rank_that_cannot_stage_sends_the_whole_gang_back_to_the_queue() {
    let mut h = Harness::new();
    let job = h.running(GANG, "j", &["a", "b"]);
    h.exit("b", &job, 1, JobOutcome::StagingFailed { reason: "disk full".into() });
    let t = h.trace();
    assert!(t.contains(&"stop:a:1".to_string()), "{t:?}");
    assert_eq!(h.state(&job), JobState::Queued);
    // The other rank's exit after that is noted only.
    h.exit("a", &job, 1, JobOutcome::Cancelled);
    assert_eq!(h.state(&job), JobState::Queued);
}

// --- agents lost, partitioned, reconnecting; coordinator restarts ---

#[test]
fn a_lost_agent_is_told_to_stop_and_its_job_is_placed_again_with_a_new_fence() {
    let mut h = Harness::new();
    let job = h.running(ONE, "j", &["a"]);
    h.core.agent_gone("a", h.now);
    assert_eq!(h.trace(), ["stop:a:1", "commit"]);
    h.fleet = vec![agent("b", 1, None)];
    h.advance(100);
    let o = h.auction_for(&job);
    assert_eq!((o.attempt, o.invite.clone()), (2, vec!["b".to_string()]));
    h.close(&o, &["b"], None);
    assert!(h.trace().contains(&"award:b:2".to_string()));
}

#[test]
fn a_returning_partitioned_agent_keeps_only_the_current_attempt() {
    let mut h = Harness::new();
    let job = h.running(ONE, "j", &["a"]);
    h.core.agent_gone("a", h.now);
    h.advance(100);
    let o = h.auction_for(&job);
    h.close(&o, &["b"], None);
    h.effects.clear();
    // `a` comes back still running attempt 1: it is not kept (the agent stops it).
    h.core.agent_running("a", &[(job.clone(), 1)], h.now);
    assert_eq!(h.trace(), ["keep:a:[]"]);
    h.core.agent_running("b", &[(job.clone(), 2)], h.now);
    assert_eq!(h.trace(), [format!("keep:b:[(\"{job}\", 2)]")]);
    assert_eq!(h.state(&job), JobState::Running, "re-adopted from its report");
}

#[test]
fn an_attempt_its_agent_does_not_report_is_lost_unless_its_exit_arrives_in_time() {
    let mut h = Harness::new();
    let job = h.running(ONE, "j", &["a"]);
    h.core.agent_running("a", &[], h.now);
    h.advance(UNREPORTED_GRACE_MS - 1);
    assert_eq!(h.state(&job), JobState::Running);
    h.advance(1);
    assert_eq!(h.state(&job), JobState::Queued);
    // With the exit in time instead, the job ends as the exit says.
    let job2 = h.running(ONE, "j", &["b"]);
    h.core.agent_running("b", &[], h.now);
    h.exit("b", &job2, 1, exited(0));
    h.advance(UNREPORTED_GRACE_MS);
    assert_eq!(h.state(&job2), JobState::Succeeded);
}

/// A core restarted from the records of `h`.
fn restart(h: &Harness) -> Harness {
    let ws = h
        .core
        .list_workflows()
        .iter()
        .map(|w| (w.id.clone(), h.core.workflow(&w.id).cloned().unwrap()))
        .collect();
    // Read back as stored: members come back without their spec and are linked again.
    let stored = |j: &JobRecord| serde_json::from_slice(&serde_json::to_vec(j).unwrap()).unwrap();
    let js = h.core.jobs.iter().map(|(id, j)| (id.clone(), stored(j))).collect();
    let mut r = Harness::restored(ws, js);
    r.now = h.now;
    r.core = SchedulerCore::restore(
        r.core.workflows.clone(),
        r.core.jobs.clone(),
        r.catalog.clone(),
        3,
        Box::new(|| "r".into()),
        h.now,
    );
    r
}

#[test]
fn after_a_restart_a_reported_attempt_is_re_adopted() {
    let mut h = Harness::new();
    let job = h.running(ONE, "j", &["a"]);
    let mut r = restart(&h);
    r.core.agent_running("a", &[(job.clone(), 1)], r.now);
    assert_eq!(r.trace(), [format!("keep:a:[(\"{job}\", 1)]")]);
    r.advance(READOPT_GRACE_MS + 1);
    assert_eq!(r.state(&job), JobState::Running);
    r.exit("a", &job, 1, exited(0));
    assert_eq!(r.state(&job), JobState::Succeeded);
}

#[test]
fn after_a_restart_an_attempt_nobody_reports_is_placed_again_after_the_grace() {
    let mut h = Harness::new();
    let job = h.placed(ONE, "j", &["a"], None);
    let mut r = restart(&h);
    r.advance(START_TIMEOUT_MS + 1);
    assert_eq!(r.state(&job), JobState::Starting, "the re-adoption grace, not the start timeout");
    r.advance(READOPT_GRACE_MS);
    assert_eq!(r.state(&job), JobState::Queued);
    r.advance(100);
    assert_eq!(r.auction_for(&job).attempt, 2);
}

// --- cancellation in each state ---

#[test]
fn cancelling_a_waiting_or_queued_job_sends_nothing() {
    let mut h = Harness::new();
    let wf = h.submit(CHAIN);
    h.tick();
    h.effects.clear();
    assert_eq!(h.core.cancel(&wf, h.now), Ok(2));
    assert_eq!(h.trace(), ["logs", "logs", "commit"]);
    assert_eq!(h.state(&format!("{wf}.a")), JobState::Cancelled);
    assert_eq!(h.state(&format!("{wf}.b")), JobState::Cancelled);
    assert_eq!(h.core.cancel(&wf, h.now), Ok(0), "nothing left to cancel");
}

#[test]
fn cancelling_a_starting_or_running_job_stops_it_and_it_stays_cancelled() {
    let mut h = Harness::new();
    let starting = h.placed(ONE, "j", &["a"], None);
    assert_eq!(h.core.cancel(&starting, h.now), Ok(1));
    assert!(h.trace().contains(&"stop:a:1".to_string()));
    let running = h.running(ONE, "j", &["b"]);
    assert_eq!(h.core.cancel(&running, h.now), Ok(1));
    assert!(h.trace().contains(&"stop:b:1".to_string()));
    h.exit("b", &running, 1, JobOutcome::Signaled { signal: 15 });
    assert_eq!(h.state(&running), JobState::Cancelled);
    assert_eq!(h.job(&running).failures, 0, "no retry for a cancelled job");
}

#[test]
fn cancelling_something_unknown_is_an_error() {
    let mut h = Harness::new();
    let e = h.core.cancel("nope", h.now).unwrap_err();
    assert_eq!(e.to_string(), "no job or workflow nope");
}

// --- admission, claims, priority, views ---

#[test]
fn a_burst_opens_at_most_the_admission_limit_of_auctions() {
    let mut h = Harness::new();
    h.fleet = (0..40).map(|i| agent(&format!("n{i}"), 8, None)).collect();
    let jobs: String = (0..600).map(|i| format!("  j{i}:\n    command: [\"true\"]\n")).collect();
    h.submit(&format!("name: burst\njobs:\n{jobs}"));
    h.tick();
    assert_eq!(h.opened().len(), MAX_OPEN_AUCTIONS);
    h.advance(100);
    assert!(h.opened().is_empty(), "no room until auctions close");
}

#[test]
fn gpus_invited_for_in_a_tick_are_claimed_from_later_auctions() {
    let mut h = Harness::new();
    h.fleet = vec![agent("a", 1, None)];
    let wf = h.submit("name: w\njobs:\n  x:\n    command: [\"true\"]\n    resources: { gpus: 1 }\n  y:\n    command: [\"true\"]\n    resources: { gpus: 1 }\n");
    h.tick();
    let opened = h.opened();
    assert_eq!(opened.len(), 1, "one GPU: one auction this tick");
    let other = if opened[0].job.ends_with(".x") { "y" } else { "x" };
    let j = h.job(&format!("{wf}.{other}"));
    assert!(
        j.queued_reasons.is_empty(),
        "busy this tick is not impossible: {:?}",
        j.queued_reasons
    );
}

#[test]
fn higher_priority_jobs_are_auctioned_first() {
    let mut h = Harness::new();
    h.fleet = vec![agent("a", 1, None)];
    let wf = h.submit("name: w\njobs:\n  low:\n    command: [\"true\"]\n    resources: { gpus: 1 }\n  high:\n    command: [\"true\"]\n    priority: 5\n    resources: { gpus: 1 }\n");
    h.tick();
    let opened = h.opened();
    assert_eq!(opened.iter().map(|o| o.job.clone()).collect::<Vec<_>>(), [format!("{wf}.high")]);
}

#[test]
fn with_no_agents_the_reason_says_so_and_without_a_view_nothing_changes() {
    let mut h = Harness::new();
    let wf = h.submit("name: cpu\njobs:\n  j:\n    command: [\"true\"]\n");
    let id = format!("{wf}.j");
    h.core.tick(h.now, None);
    assert!(h.opened().is_empty());
    assert!(h.job(&id).queued_reasons.is_empty(), "an unanswered view is not an empty fleet");
    h.fleet.clear();
    h.tick();
    assert_eq!(h.job(&id).queued_reasons, ["no agents in the fleet"]);
}

#[test]
fn gpus_of_running_attempts_are_not_offered_again_until_they_are_free() {
    let mut h = Harness::new();
    h.fleet = vec![agent("a", 1, None)];
    let first = h.running(ONE, "j", &["a"]);
    let wf = h.submit(ONE);
    let second = format!("{wf}.j");
    h.tick();
    assert!(h.opened().is_empty(), "the view still shows a's GPU free; the core knows better");
    assert_eq!(h.state(&second), JobState::Queued);
    h.exit("a", &first, 1, exited(0));
    h.advance(100);
    assert_eq!(h.auction_for(&second).invite, ["a"]);
}

// --- data: residency and pinning ---

#[test]
fn residency_rules_out_agents_elsewhere_and_says_why() {
    let mut h = Harness::new();
    h.catalog.add("corpus", &["EU"], "eu");
    h.fleet = vec![agent("us", 1, Some("US")), agent("eu", 1, Some("EU"))];
    let wf = h.submit("name: d\njobs:\n  j:\n    command: [\"true\"]\n    inputs: [corpus]\n");
    h.tick();
    let o = h.auction_for(&format!("{wf}.j"));
    assert_eq!(o.invite, ["eu"]);
    assert_eq!(o.residency, ["EU"]);
    h.fleet = vec![agent("us", 1, Some("US"))];
    let wf2 = h.submit("name: d\njobs:\n  j:\n    command: [\"true\"]\n    inputs: [corpus]\n");
    h.tick();
    let j = h.job(&format!("{wf2}.j"));
    assert!(
        j.queued_reasons.iter().any(|r| r.starts_with("us: residency: inputs may only live in")),
        "{:?}",
        j.queued_reasons
    );
}

#[test]
fn outputs_cannot_be_less_restricted_than_their_inputs() {
    let mut h = Harness::new();
    h.catalog.add("corpus", &["EU"], "eu");
    h.fleet = vec![agent("eu", 1, Some("EU"))];
    let wf = h.submit("name: d\njobs:\n  j:\n    command: [\"true\"]\n    inputs: [corpus]\n    outputs: [out]\n    output_jurisdictions: [US]\n");
    h.tick();
    let o = h.auction_for(&format!("{wf}.j"));
    h.close(&o, &["eu"], None);
    let j = h.job(&format!("{wf}.j"));
    assert_eq!(j.state, JobState::Failed);
    assert!(j.history.last().is_some_and(|e| e.detail.contains("cannot be less restricted")));
}

#[test]
fn a_workflow_reads_the_dataset_version_it_pinned_at_submission() {
    let mut h = Harness::new();
    let v1 = h.catalog.add("corpus", &[], "a");
    let wf = h.submit("name: d\njobs:\n  j:\n    command: [\"true\"]\n    inputs: [corpus]\n");
    // A new version under the same name after the submission.
    let mut v2 = h.catalog.resolve(&v1).unwrap();
    v2.id = "ds-corpus-v2".into();
    v2.version = 2;
    h.catalog.datasets.lock().unwrap().remove(&v1);
    h.catalog.datasets.lock().unwrap().insert(v2.id.clone(), v2);
    h.tick();
    let j = h.job(&format!("{wf}.j"));
    assert_eq!(j.queued_reasons.len(), 1, "{:?}", j.queued_reasons);
    assert!(
        j.queued_reasons[0].contains("pinned at submission (ds-corpus)"),
        "{:?}",
        j.queued_reasons
    );
}

#[test]
fn outputs_of_a_succeeded_job_become_inputs_of_its_dependents() {
    let mut h = Harness::new();
    let wf = h.submit("name: p\njobs:\n  make:\n    command: [\"true\"]\n    outputs: [out]\n  use:\n    needs: [make]\n    command: [\"true\"]\n    inputs: [make.out]\n");
    let make = format!("{wf}.make");
    h.tick();
    let o = h.auction_for(&make);
    h.close(&o, &["a"], None);
    let exit = Exit {
        agent: "a".into(),
        job: make.clone(),
        attempt: 1,
        outcome: exited(0),
        duration_ms: 1,
        outputs: vec![OutputDataset {
            output: "out".into(),
            manifest: Manifest { chunk_size: 1, files: vec![] },
        }],
    };
    h.core.job_exited(exit, h.now);
    assert_eq!(h.job(&make).outputs.get("out").map(String::as_str), Some("ds-p.make.out"));
    h.advance(100);
    let o = h.auction_for(&format!("{wf}.use"));
    assert_eq!(o.inputs, [("out".to_string(), "ds-p.make.out".to_string())]);
}

mod arrays;

#[test]
fn a_spot_interruption_moves_the_attempt_with_grace_without_a_retry_and_off_spot() {
    let mut h = Harness::new();
    h.fleet[0].spot = true; // a is spot, b on demand
    let id = h.running(RETRY, "j", &["a"]);
    h.core.interrupted("a", 20_000, "notice", h.now);
    let stops: Vec<(String, u64)> = h
        .sent()
        .into_iter()
        .filter_map(|(to, m)| match m {
            CoordinatorMessage::Stop { grace_ms, .. } => Some((to, grace_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(stops, [("a".to_string(), 20_000)], "SIGTERM with the notice's grace");
    let j = h.job(&id);
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.failures, 0, "no retry used");
    assert!(j.avoid_spot);
    h.advance(10);
    let o = h.auction_for(&id);
    assert_eq!(o.invite, ["b"], "placed off spot when the job allows both");
    // With no on-demand agent that fits, spot is still used.
    h.fleet.retain(|c| c.agent == "a");
    h.close(&o, &[], None);
    h.advance(1_100);
    let o = h.auction_for(&id);
    assert_eq!(o.invite, ["a"]);
}
