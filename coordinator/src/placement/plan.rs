//! The pure core of `fleetmesh plan`: a workflow against the fleet as it is now, with
//! nothing changed. [`draft`] resolves each job's inputs and residency, rules agents out
//! with their reasons and builds dry-run calls for bids (agents answer them without
//! reserving anything); [`finish`] turns the answers into the [`Plan`]: offers ranked
//! as an auction would rank them, the placement, the room for an array's members, the
//! expected cost and the reasons a job would wait.

use std::collections::BTreeMap;

use fleetmesh_api::plan::{InputPlan, JobPlan, Plan, PlanOffer};
use fleetmesh_protocol::data::{intersect_residency, residency_allows, Shard};
use fleetmesh_protocol::workflow::{InputRef, JobSpec, Workflow};
use fleetmesh_protocol::{CallForBids, InputSummary};

use super::auction::{self, AuctionOutcome, BidView, Candidate, OpenAuction};
use crate::data::broker::DatasetRecord;
use crate::scheduler::core::{AUCTION_WINDOW_MS, DEFAULT_EXPECTED_MS, LEASE_MS};

/// Agents asked per job at most: enough to show the alternatives, few enough that a
/// plan of many jobs does not flood the fleet with calls.
pub const MAX_ASKED_PER_JOB: usize = 16;

/// A plan in the making: the jobs so far and the dry-run auctions to run.
pub struct Draft {
    workflow: String,
    objective: fleetmesh_protocol::workflow::Objective,
    jobs: Vec<(JobPlan, Option<String>)>,
    /// Per job: the residency its outputs get (for the jobs that read them).
    output_residency: BTreeMap<String, Vec<String>>,
}

/// Resolve, filter and build the dry-run auctions for `wf` on `candidates`.
/// `resolve` finds a dataset by name or id; auction ids start with `prefix`.
pub fn draft(
    wf: &Workflow,
    candidates: &[Candidate],
    resolve: &dyn Fn(&str) -> Option<DatasetRecord>,
    prefix: &str,
    now: u64,
) -> (Draft, Vec<OpenAuction>) {
    let mut d = Draft {
        workflow: wf.name.clone(),
        objective: wf.objective,
        jobs: Vec::new(),
        output_residency: BTreeMap::new(),
    };
    let mut sorted = candidates.to_vec();
    auction::sort_candidates(&mut sorted);
    let mut auctions = Vec::new();
    for name in wf.topological_order() {
        let Some(spec) = wf.jobs.get(name) else { continue };
        let mut jp = job_plan(name, spec);
        jp.inputs = inputs(spec, wf, &d, resolve, &mut jp.waits);
        let known = jp.inputs.iter().filter(|i| i.dataset.is_some() || i.bytes.is_none());
        match intersect_residency(known.map(|i| &i.jurisdictions[..])) {
            Some(r) => jp.residency = r,
            None => jp.waits.push("inputs have no jurisdiction in common".into()),
        }
        let declared = spec.output_jurisdictions.clone().unwrap_or_default();
        let out = intersect_residency([&jp.residency[..], &declared[..]]).unwrap_or_default();
        d.output_residency.insert(name.to_string(), out);
        let auction =
            jp.waits.is_empty().then(|| call(spec, &mut jp, &sorted, (prefix, wf.objective), now));
        let id = auction.flatten().map(|open| {
            let id = open.id.clone();
            auctions.push(open);
            id
        });
        d.jobs.push((jp, id));
    }
    (d, auctions)
}

fn job_plan(name: &str, spec: &JobSpec) -> JobPlan {
    JobPlan {
        job: name.to_string(),
        members: spec.array.as_ref().map_or(1, |a| a.count),
        nodes: spec.nodes,
        needs: spec.needs.clone(),
        ..Default::default()
    }
}

/// Each input with its bytes, holders and residency; unresolvable ones become reasons.
fn inputs(
    spec: &JobSpec,
    wf: &Workflow,
    d: &Draft,
    resolve: &dyn Fn(&str) -> Option<DatasetRecord>,
    waits: &mut Vec<String>,
) -> Vec<InputPlan> {
    let members = u64::from(spec.array.as_ref().map_or(1, |a| a.count));
    let mut out = Vec::new();
    for (mount, r) in spec.input_refs(&wf.jobs) {
        let sharded = spec.sharded(&mount, &wf.jobs);
        let ip = match r {
            InputRef::Dataset(n) => match resolve(&n) {
                Some(ds) => InputPlan {
                    mount,
                    from: n,
                    dataset: Some(ds.id.clone()),
                    bytes: Some(if sharded { largest_shard(&ds, members) } else { ds.bytes }),
                    holders: ds
                        .holders
                        .iter()
                        .filter(|(_, h)| h.complete)
                        .map(|(a, _)| a.clone())
                        .collect(),
                    jurisdictions: ds.jurisdictions.clone(),
                    sharded,
                },
                None => {
                    waits.push(format!("input {n}: no dataset with that name or id"));
                    continue;
                }
            },
            InputRef::JobOutput { job, output } => {
                let holders = d
                    .jobs
                    .iter()
                    .find(|(j, _)| j.job == job)
                    .map(|(j, _)| j.placement.clone())
                    .unwrap_or_default();
                InputPlan {
                    mount,
                    from: format!("{job}.{output}"),
                    dataset: None,
                    bytes: None,
                    holders,
                    jurisdictions: d.output_residency.get(&job).cloned().unwrap_or_default(),
                    sharded,
                }
            }
        };
        out.push(ip);
    }
    out
}

/// Bytes of the largest of `members` shards of a dataset (what one member moves at most).
fn largest_shard(ds: &DatasetRecord, members: u64) -> u64 {
    let count = u32::try_from(members).unwrap_or(u32::MAX).max(1);
    let sizes: Vec<u64> = ds.manifest.files.iter().map(|f| f.size).collect();
    (0..count)
        .map(|index| sizes[Shard { index, count }.range(sizes.len())].iter().sum::<u64>())
        .max()
        .unwrap_or(0)
}

/// The dry-run auction for a job, or `None` with the reasons recorded.
fn call(
    spec: &JobSpec,
    jp: &mut JobPlan,
    sorted: &[Candidate],
    (prefix, objective): (&str, fleetmesh_protocol::workflow::Objective),
    now: u64,
) -> Option<OpenAuction> {
    let allowed = |c: &&Candidate| residency_allows(&jp.residency, c.jurisdiction.as_deref());
    for c in sorted.iter().filter(|c| !allowed(c)) {
        let here = c.jurisdiction.as_deref().unwrap_or("no jurisdiction");
        jp.refused.push(format!(
            "{}: residency: inputs may only live in {:?}, agent is in {here}",
            c.agent, jp.residency
        ));
    }
    let within: Vec<Candidate> = sorted.iter().filter(allowed).cloned().collect();
    let (mut invite, refused) = auction::prefilter(spec, &within, usize::MAX);
    jp.refused.extend(refused.iter().map(|(a, why)| format!("{a}: {why}")));
    jp.also_eligible = invite.split_off(invite.len().min(MAX_ASKED_PER_JOB));
    if (invite.len() as u32) < spec.nodes {
        jp.waits.push(if spec.nodes > 1 {
            format!(
                "gang of {} needs {} eligible agents, {} found",
                spec.nodes,
                spec.nodes,
                invite.len()
            )
        } else {
            "no eligible agent".to_string()
        });
        return None;
    }
    let id = format!("{prefix}.{}", jp.job);
    let known: Vec<InputSummary> = jp
        .inputs
        .iter()
        .filter_map(|i| {
            Some(InputSummary {
                dataset: i.dataset.clone()?,
                bytes: i.bytes?,
                holder_sites: Vec::new(),
            })
        })
        .collect();
    let r = &spec.resources;
    let call = CallForBids {
        auction: id.clone(),
        job: jp.job.clone(),
        gpus: r.gpus,
        gpu_model: r.gpu_model.clone(),
        gpu_memory_bytes: r.gpu_memory_bytes,
        cpus: r.cpus,
        memory_bytes: r.memory_bytes,
        needs_container: spec.image.is_some(),
        expected_duration_ms: spec.timeout_ms.unwrap_or(DEFAULT_EXPECTED_MS),
        lease_ms: LEASE_MS,
        inputs: known,
        dry_run: true,
    };
    Some(OpenAuction {
        id,
        job: jp.job.clone(),
        attempt: 0,
        objective,
        nodes: spec.nodes,
        invite,
        call,
        deadline_unix_ms: now + AUCTION_WINDOW_MS,
        inputs: Vec::new(),
        residency: jp.residency.clone(),
    })
}

/// The plan, from the draft, the dry-run auctions' outcomes and the specs.
pub fn finish(
    d: Draft,
    outcomes: Vec<AuctionOutcome>,
    wf: &Workflow,
    candidates: &[Candidate],
) -> Plan {
    let by_id: BTreeMap<String, AuctionOutcome> =
        outcomes.into_iter().map(|o| (o.id.clone(), o)).collect();
    let mut jobs: Vec<JobPlan> = Vec::new();
    for (mut jp, auction) in d.jobs {
        // An output of an earlier job will be held where that job goes.
        for i in jp.inputs.iter_mut().filter(|i| i.dataset.is_none()) {
            let producer = i.from.split_once('.').map(|(j, _)| j).unwrap_or_default();
            if let Some(p) = jobs.iter().find(|p| p.job == producer) {
                i.holders = p.placement.clone();
            }
        }
        if let (Some(o), Some(spec)) = (auction.and_then(|a| by_id.get(&a)), wf.jobs.get(&jp.job)) {
            settle(&mut jp, o, spec, d.objective, candidates);
        }
        jobs.push(jp);
    }
    Plan {
        workflow: d.workflow,
        objective: format!("{:?}", d.objective).to_lowercase(),
        expected_cost: jobs.iter().map(|j| j.expected_cost).sum(),
        all_placeable_now: jobs.iter().all(|j| j.waits.is_empty()),
        jobs,
    }
}

/// Offers ranked, placement, room, cost and waits from one dry-run auction.
fn settle(
    jp: &mut JobPlan,
    o: &AuctionOutcome,
    spec: &JobSpec,
    objective: fleetmesh_protocol::workflow::Objective,
    candidates: &[Candidate],
) {
    jp.refused.extend(o.declines.iter().cloned());
    let cheapest = o.bids.iter().map(|b| b.price).fold(f64::INFINITY, f64::min);
    let mut bids: Vec<&BidView> = o.bids.iter().collect();
    bids.sort_by(|a, b| {
        auction::score(objective, a, cheapest)
            .total_cmp(&auction::score(objective, b, cheapest))
            .then(a.agent.cmp(&b.agent))
    });
    jp.offers = bids.iter().map(|b| offer(b, spec, candidates)).collect();
    let Some(winners) = auction::select(objective, &o.bids, spec.nodes) else {
        jp.waits.push(format!("{} offers for {} nodes", o.bids.len(), spec.nodes));
        return;
    };
    jp.placement = winners.iter().map(|w| w.agent.clone()).collect();
    let per_member: f64 = winners.iter().map(|w| w.price).sum();
    jp.expected_cost = per_member * f64::from(jp.members);
    let idle_room = |agent: &String| {
        let c = candidates.iter().find(|c| &c.agent == agent);
        let idle_load =
            c.filter(|c| c.cpus > 0).map_or(0.0, |c| spec.resources.cpus / f64::from(c.cpus));
        c.map_or(0, |c| room(spec, c, idle_load))
    };
    let asked: u32 = jp.offers.iter().map(|o| o.room).sum();
    let others: u32 = jp.also_eligible.iter().map(idle_room).sum();
    let room = asked.saturating_add(others) / spec.nodes.max(1);
    jp.start_now = room.min(jp.members);
    if jp.start_now < jp.members {
        let rest = jp.members - jp.start_now;
        jp.waits.push(format!(
            "{} of {} members can start now; {rest} wait for room",
            jp.start_now, jp.members
        ));
    }
}

/// A bid as the plan shows it, with how many of the job the agent has room for.
fn offer(b: &BidView, spec: &JobSpec, candidates: &[Candidate]) -> PlanOffer {
    let c = candidates.iter().find(|c| c.agent == b.agent);
    PlanOffer {
        agent: b.agent.clone(),
        price: b.price,
        eta_ms: b.eta_ms,
        gpus: b.gpus.clone(),
        local_bytes: b.local_bytes,
        load: b.load,
        room: c.map_or(1, |c| room(spec, c, b.load)),
    }
}

/// Copies of `spec` that fit on `c` at once. The bid's load says how much of the CPUs
/// the job and everything already there take (`load = (used + cpus) / total`).
fn room(spec: &JobSpec, c: &Candidate, load: f64) -> u32 {
    let r = &spec.resources;
    let mut n = u32::MAX;
    if c.cpus > 0 && r.cpus > 0.0 {
        let total = f64::from(c.cpus);
        let free = total * (1.0 - load) + r.cpus;
        n = n.min((free / r.cpus + auction::CPU_EPSILON).floor() as u32);
    }
    if c.memory_bytes > 0 && r.memory_bytes > 0 {
        n = n.min((c.memory_bytes / r.memory_bytes) as u32);
    }
    if let Some(fit) = (c.free_gpus.len() as u32).checked_div(r.gpus) {
        n = n.min(fit);
    }
    n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::broker::HolderState;
    use fleetmesh_protocol::workflow::parse;

    fn cand(agent: &str, price: f64, cpus: u32, jurisdiction: &str) -> Candidate {
        Candidate {
            agent: agent.into(),
            connected: true,
            draining: false,
            region: None,
            jurisdiction: Some(jurisdiction.into()),
            provider: None,
            labels: Default::default(),
            spot: false,
            price_per_hour: price,
            free_gpus: vec![],
            gpu_uuids: vec![],
            addr: None,
            data_addr: None,
            cpus,
            memory_bytes: 0,
            used_cpus: 0.0,
            used_memory_bytes: 0,
            hostname: None,
            host_addrs: vec![],
        }
    }

    fn dataset(name: &str, bytes: u64, jurisdiction: &str, holder: &str) -> DatasetRecord {
        let mut holders = BTreeMap::new();
        holders.insert(
            holder.to_string(),
            HolderState { complete: true, bytes_present: bytes, updated_unix_ms: 0 },
        );
        DatasetRecord {
            id: format!("ds-{name}"),
            name: name.into(),
            jurisdictions: vec![jurisdiction.into()],
            bytes,
            files: 1,
            chunks: 1,
            holders,
            producer: None,
            created_unix_ms: 0,
            manifest: std::sync::Arc::new(fleetmesh_protocol::data::Manifest {
                chunk_size: 1 << 20,
                files: (0..10)
                    .map(|i| fleetmesh_protocol::data::FileEntry {
                        path: format!("f{i}"),
                        size: bytes / 10,
                        mode: 0o644,
                        chunks: vec![],
                    })
                    .collect(),
            }),
            fetches: BTreeMap::new(),
            pending: Default::default(),
            version: 1,
        }
    }

    fn bid(agent: &str, price: f64, load: f64) -> BidView {
        BidView {
            agent: agent.into(),
            price,
            eta_ms: 0,
            gpus: vec![],
            local_bytes: 0,
            health: vec![],
            load,
        }
    }

    fn answered(open: &OpenAuction, bids: Vec<BidView>) -> AuctionOutcome {
        AuctionOutcome {
            id: open.id.clone(),
            job: open.job.clone(),
            attempt: 0,
            invited: open.invite.clone(),
            bids,
            declines: vec![],
            winners: None,
            backup: None,
            inputs: vec![],
            residency: open.residency.clone(),
        }
    }

    const WF: &str = "name: p\njobs:\n  map:\n    command: [x]\n    parallel: 10\n    resources: { cpus: 1 }\n    inputs: [{from: reads, shard: true}]\n    outputs: [part]\n  reduce:\n    needs: [map]\n    command: [x]\n    inputs: [{from: map.part, as: parts}]\n  lost:\n    command: [x]\n    constraints: { labels: { gpu: none-such } }\n";

    #[test]
    fn a_plan_ranks_offers_places_jobs_counts_room_and_says_what_would_wait() {
        let wf = parse(WF).unwrap();
        let fleet = [
            cand("eu-cheap", 1.0, 4, "EU"),
            cand("eu-dear", 3.0, 4, "EU"),
            cand("us", 0.5, 64, "US"),
        ];
        let reads = dataset("reads", 1000, "EU", "eu-dear");
        let resolve = |n: &str| (n == "reads").then(|| reads.clone());
        let (d, auctions) = draft(&wf, &fleet, &resolve, "plan-1", 0);
        // `lost` matches no agent: no call for it. map and reduce are asked of the EU agents.
        let ids: Vec<&str> = auctions.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["plan-1.map", "plan-1.reduce"]);
        assert_eq!(auctions[0].invite, ["eu-cheap", "eu-dear"], "us is ruled out by residency");
        assert!(auctions.iter().all(|a| a.call.dry_run), "nothing is reserved");
        assert_eq!(auctions[0].call.inputs[0].bytes, 100, "a tenth of the files per member");
        let outcomes = vec![
            answered(&auctions[0], vec![bid("eu-dear", 3.0, 0.25), bid("eu-cheap", 1.0, 0.25)]),
            answered(&auctions[1], vec![bid("eu-cheap", 1.0, 0.25)]),
        ];
        let p = finish(d, outcomes, &wf, &fleet);
        let job = |n: &str| p.jobs.iter().find(|j| j.job == n).unwrap();
        let map = job("map");
        assert_eq!(map.placement, ["eu-cheap"]);
        assert_eq!(
            map.offers.iter().map(|o| o.agent.as_str()).collect::<Vec<_>>(),
            ["eu-cheap", "eu-dear"]
        );
        assert_eq!(map.offers[0].room, 4, "4 one-CPU members fit on 4 idle CPUs");
        assert_eq!(map.start_now, 8);
        assert_eq!(map.waits, ["8 of 10 members can start now; 2 wait for room"]);
        assert!((map.expected_cost - 10.0).abs() < 1e-9);
        assert!(map.refused.iter().any(|r| r.starts_with("us: residency")), "{:?}", map.refused);
        assert_eq!(map.inputs[0].holders, ["eu-dear"]);
        // reduce reads map's output: held where map goes, residency inherited.
        let reduce = job("reduce");
        assert_eq!(reduce.inputs[0].holders, ["eu-cheap"]);
        assert_eq!(reduce.inputs[0].jurisdictions, ["EU"]);
        assert_eq!(reduce.inputs[0].bytes, None, "not produced yet");
        assert!(reduce.waits.is_empty());
        let lost = job("lost");
        assert_eq!(lost.waits, ["no eligible agent"]);
        assert!(lost.refused.iter().all(|r| r.contains("label gpu=none")), "{:?}", lost.refused);
        assert!(!p.all_placeable_now);
        assert!((p.expected_cost - 11.0).abs() < 1e-9);
    }

    #[test]
    fn room_counts_the_eligible_agents_beyond_those_asked() {
        let wf = parse("name: r\njobs:\n  m:\n    command: [x]\n    parallel: 100\n    resources: { cpus: 1 }\n").unwrap();
        let fleet: Vec<Candidate> =
            (0..20).map(|i| cand(&format!("n{i:02}"), 1.0, 4, "EU")).collect();
        let (d, auctions) = draft(&wf, &fleet, &|_| None, "p", 0);
        assert_eq!(auctions[0].invite.len(), MAX_ASKED_PER_JOB);
        let bids = auctions[0].invite.iter().map(|a| bid(a, 1.0, 0.25)).collect();
        let p = finish(d, vec![answered(&auctions[0], bids)], &wf, &fleet);
        let m = &p.jobs[0];
        assert_eq!(m.also_eligible.len(), 4);
        assert_eq!(m.start_now, 80, "4 members on each of 20 idle 4-CPU agents");
        assert_eq!(m.waits, ["80 of 100 members can start now; 20 wait for room"]);
    }

    #[test]
    fn missing_inputs_and_conflicting_residency_are_reasons_not_calls() {
        let wf = parse("name: q\njobs:\n  j:\n    command: [x]\n    inputs: [nope]\n  k:\n    command: [x]\n    inputs: [eu, us]\n").unwrap();
        let eu = dataset("eu", 1, "EU", "a");
        let us = dataset("us", 1, "US", "b");
        let resolve = |n: &str| match n {
            "eu" => Some(eu.clone()),
            "us" => Some(us.clone()),
            _ => None,
        };
        let (d, auctions) = draft(&wf, &[cand("a", 1.0, 1, "EU")], &resolve, "x", 0);
        assert!(auctions.is_empty());
        let p = finish(d, vec![], &wf, &[]);
        assert_eq!(p.jobs[0].waits, ["input nope: no dataset with that name or id"]);
        assert_eq!(p.jobs[1].waits, ["inputs have no jurisdiction in common"]);
    }
}
