//! Array jobs in the Scheduler core: members placed, retried and cancelled one by one,
//! the array's verdict from its stated share, fan-in, shards, listings and restarts.

use super::*;
use crate::scheduler::arrays::JobListing;
use fleetmesh_protocol::data::Shard;

const MAP: &str = "name: p\njobs:\n  map:\n    command: [\"true\"]\n    parallel: 4\n    success: 75%\n    outputs: [out]\n  reduce:\n    needs: [map]\n    command: [\"true\"]\n    inputs: [{from: map.out, as: parts}]\n";

/// Place every queued member of `array` on agent `a` and start it.
fn run_members(h: &mut Harness, array: &str, count: u32) {
    h.tick();
    let opened = h.opened();
    assert_eq!(opened.len(), count as usize, "one auction per member");
    for o in &opened {
        assert!(o.job.starts_with(&format!("{array}[")), "{}", o.job);
        h.close(o, &["a"], None);
        h.started("a", &o.job, 1);
    }
}

/// Member `i` of `array` ends with `code`, registering output `out` when it succeeds.
fn member_exits(h: &mut Harness, array: &str, i: u32, code: i32) {
    let outputs = if code == 0 {
        vec![OutputDataset {
            output: "out".into(),
            manifest: Manifest { chunk_size: 1, files: vec![] },
        }]
    } else {
        vec![]
    };
    let exit = Exit {
        agent: "a".into(),
        job: format!("{array}[{i}]"),
        attempt: 1,
        outcome: exited(code),
        duration_ms: 1,
        outputs,
    };
    h.core.job_exited(exit, h.now);
    h.collect();
}

fn award_env(h: &mut Harness) -> BTreeMap<String, String> {
    let sent = h.sent();
    let award = sent
        .iter()
        .find_map(|(_, m)| match m {
            CoordinatorMessage::Award(a) => Some(a.clone()),
            _ => None,
        })
        .expect("an award");
    award.exec.env.into_iter().collect()
}

#[test]
fn members_are_placed_on_their_own_with_their_index_and_matrix_values() {
    let mut h = Harness::new();
    let wf = h.submit("name: g\njobs:\n  grid:\n    command: [\"true\"]\n    env: { BASE: x }\n    matrix: { lr: [\"0.1\", \"0.01\"], model: [s, l] }\n");
    let grid = format!("{wf}.grid");
    assert_eq!(h.state(&grid), JobState::Waiting);
    h.tick();
    assert_eq!(h.state(&grid), JobState::Running, "the array runs once its members are queued");
    let opened = h.opened();
    let jobs: Vec<&str> = opened.iter().map(|o| o.job.as_str()).collect();
    let want: Vec<String> = (0..4).map(|i| format!("{grid}[{i}]")).collect();
    assert_eq!(jobs, want, "one auction per member, none for the array");
    let third = opened.iter().find(|o| o.job.ends_with("[2]")).unwrap();
    h.effects.clear();
    h.close(third, &["b"], None);
    let env = award_env(&mut h);
    assert_eq!(env["FLEETMESH_INDEX"], "2");
    assert_eq!(env["FLEETMESH_COUNT"], "4");
    assert_eq!(env["FLEETMESH_MATRIX_LR"], "0.01");
    assert_eq!(env["FLEETMESH_MATRIX_MODEL"], "s");
    assert_eq!(env["BASE"], "x", "the job's own env is kept");
    assert_eq!(h.job(&format!("{grid}[2]")).name, "grid[2]");
}

#[test]
fn an_array_succeeds_when_its_share_does_and_only_then_releases_its_dependents() {
    let mut h = Harness::new();
    let wf = h.submit(MAP);
    let (map, reduce) = (format!("{wf}.map"), format!("{wf}.reduce"));
    run_members(&mut h, &map, 4);
    for i in 0..2 {
        member_exits(&mut h, &map, i, 0);
    }
    member_exits(&mut h, &map, 2, 1);
    h.advance(100);
    assert_eq!(h.state(&map), JobState::Running, "a member still runs");
    assert_eq!(h.state(&reduce), JobState::Waiting);
    member_exits(&mut h, &map, 3, 0);
    h.advance(100);
    assert_eq!(h.state(&map), JobState::Succeeded, "3 of 4 is the 75% asked for");
    let detail = &h.job(&map).history.last().unwrap().detail;
    assert!(detail.contains("3 of 4 members succeeded, 3 needed"), "{detail}");
    h.advance(100);
    // Fan-in: every member that succeeded is mounted under parts/<index>.
    let o = h.auction_for(&reduce);
    let mounts: Vec<(&str, &str)> =
        o.inputs.iter().map(|(m, d)| (m.as_str(), d.as_str())).collect();
    assert_eq!(
        mounts,
        [
            ("parts/0", "ds-p.map[0].out"),
            ("parts/1", "ds-p.map[1].out"),
            ("parts/3", "ds-p.map[3].out"),
        ]
    );
}

#[test]
fn an_array_below_its_share_fails_and_its_dependents_are_skipped() {
    let mut h = Harness::new();
    let wf = h.submit(MAP);
    let (map, reduce) = (format!("{wf}.map"), format!("{wf}.reduce"));
    run_members(&mut h, &map, 4);
    for (i, code) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
        member_exits(&mut h, &map, i, code);
    }
    h.advance(100);
    h.advance(100);
    assert_eq!(h.state(&map), JobState::Failed);
    assert_eq!(h.state(&reduce), JobState::Skipped);
    assert_eq!(h.core.workflow(&wf).unwrap().state, WorkflowState::Failed);
}

#[test]
fn a_failed_member_is_retried_on_its_own() {
    let mut h = Harness::new();
    let wf = h.submit("name: r\njobs:\n  m:\n    command: [\"true\"]\n    parallel: 2\n    retries: { limit: 1, backoff: 1s }\n");
    let m = format!("{wf}.m");
    run_members(&mut h, &m, 2);
    h.exit("a", &format!("{m}[1]"), 1, exited(3));
    assert_eq!(h.state(&format!("{m}[1]")), JobState::Queued, "retried");
    assert_eq!(h.state(&format!("{m}[0]")), JobState::Running, "the other is untouched");
    h.advance(1_100);
    let o = h.auction_for(&format!("{m}[1]"));
    assert_eq!(o.attempt, 2);
}

#[test]
fn cancelling_an_array_cancels_its_members_and_a_member_alone_only_itself() {
    let mut h = Harness::new();
    let wf = h.submit("name: c\njobs:\n  m:\n    command: [\"true\"]\n    parallel: 3\n");
    let m = format!("{wf}.m");
    run_members(&mut h, &m, 3);
    h.effects.clear();
    assert_eq!(h.core.cancel(&format!("{m}[0]"), h.now), Ok(1));
    let stops = h.trace().into_iter().filter(|t| t.starts_with("stop:")).count();
    assert_eq!(stops, 1);
    assert_eq!(h.state(&m), JobState::Running);
    assert_eq!(h.core.cancel(&m, h.now), Ok(3), "two members and the array");
    for i in 0..3 {
        assert_eq!(h.state(&format!("{m}[{i}]")), JobState::Cancelled);
    }
    assert_eq!(h.state(&m), JobState::Cancelled);
}

#[test]
fn each_member_is_given_its_shard_of_a_sharded_input() {
    let mut h = Harness::new();
    h.catalog.add("reads", &[], "a");
    let wf = h.submit("name: s\njobs:\n  m:\n    command: [\"true\"]\n    parallel: 3\n    inputs: [{from: reads, shard: true}, {from: reads, as: whole}]\n");
    h.tick();
    let o = h.opened().into_iter().find(|o| o.job.ends_with("[1]")).unwrap();
    assert!(o.job.starts_with(&wf));
    h.effects.clear();
    h.close(&o, &["a"], None);
    let award = h
        .sent()
        .into_iter()
        .find_map(|(_, m)| match m {
            CoordinatorMessage::Award(a) => Some(a),
            _ => None,
        })
        .unwrap();
    let shards: Vec<(&str, Option<Shard>)> =
        award.inputs.iter().map(|i| (i.mount.as_str(), i.shard)).collect();
    assert_eq!(shards, [("reads", Some(Shard { index: 1, count: 3 })), ("whole", None)]);
}

#[test]
fn listings_fold_arrays_and_come_in_pages() {
    let mut h = Harness::new();
    let wf = h.submit("name: l\njobs:\n  a:\n    command: [\"true\"]\n  big:\n    command: [\"true\"]\n    parallel: 2500\n");
    let big = format!("{wf}.big");
    let top = h.core.list_jobs(&JobListing {
        workflow: Some(wf.clone()),
        limit: 1000,
        ..Default::default()
    });
    let ids: Vec<&str> = top.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [format!("{wf}.a"), big.clone()], "members are folded into their array");
    assert_eq!(top.next, None);
    let folded = top.jobs[1].members.as_ref().expect("counts per state");
    assert_eq!(folded.get(&JobState::Waiting), Some(&2500));
    // The members, in index order, 1,000 a page.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let q = JobListing { array: Some(big.clone()), after, limit: 1000, ..Default::default() };
        let page = h.core.list_jobs(&q);
        assert!(page.jobs.len() <= 1000);
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let want: Vec<String> = (0..2500).map(|i| format!("{big}[{i}]")).collect();
    assert_eq!(seen, want);
    // A page of one, then the next.
    let first = h.core.list_jobs(&JobListing { limit: 1, ..Default::default() });
    assert_eq!(first.jobs.len(), 1);
    let second =
        h.core.list_jobs(&JobListing { after: first.next, limit: 1, ..Default::default() });
    assert_eq!(second.jobs[0].id, big);
}

#[test]
fn members_are_stored_without_the_spec_and_restored_with_their_arrays() {
    let mut h = Harness::new();
    let wf =
        h.submit("name: k\njobs:\n  m:\n    script: \"echo a long script\"\n    parallel: 3\n");
    let member = format!("{wf}.m[2]");
    let stored = serde_json::to_value(h.job(&member)).unwrap();
    assert_eq!(stored["spec"], serde_json::Value::Null, "the array holds the spec");
    assert_eq!(h.core.show_job(&member).unwrap().spec.run, h.job(&format!("{wf}.m")).spec.run);
    let mut r = restart(&h);
    let j = r.job(&member);
    assert_eq!(j.spec.run, fleetmesh_protocol::workflow::Run::Script("echo a long script".into()));
    assert!(Arc::ptr_eq(j.spec.arc(), r.job(&format!("{wf}.m")).spec.arc()), "shared again");
    r.tick();
    assert_eq!(r.opened().len(), 3, "restored members are placed");
}

#[test]
fn cpus_are_packed_per_node_and_jobs_wait_for_room_with_the_reason() {
    let mut h = Harness::new();
    let mut a = agent("a", 0, None);
    a.cpus = 2;
    let mut b = agent("b", 0, None);
    b.cpus = 2;
    h.fleet = vec![a, b];
    let wf = h.submit("name: k\njobs:\n  m:\n    command: [\"true\"]\n    parallel: 6\n    resources: { cpus: 1 }\n");
    let m = format!("{wf}.m");
    h.tick();
    // Four CPUs in the fleet; each auction charges half a CPU to each of its two
    // invitees, so the third leaves half a CPU on each: three this tick, never more
    // than there is room for.
    let mut opened = h.opened();
    assert_eq!(opened.len(), 3, "{:?}", opened.iter().map(|o| &o.invite).collect::<Vec<_>>());
    for (o, to) in opened.iter().zip(["a", "a", "b"]) {
        h.close(o, &[to], None);
        h.started(to, &o.job, 1);
    }
    // Next tick: a is full with the core's own attempts, b has one CPU left.
    h.advance(100);
    let last = h.opened();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].invite, ["b"], "a has no room left");
    h.close(&last[0], &["b"], None);
    h.started("b", &last[0].job, 1);
    opened.extend(last);
    // The nodes are full; the rest wait, saying why.
    h.advance(100);
    assert!(h.opened().is_empty());
    let waiting: Vec<String> =
        (0..6).map(|i| format!("{m}[{i}]")).filter(|id| h.state(id) == JobState::Queued).collect();
    assert_eq!(waiting.len(), 2);
    let reasons = &h.job(&waiting[0]).queued_reasons;
    assert!(
        reasons
            .iter()
            .any(|r| r == "a: 0.00 of 2 CPUs free (the rest run other jobs), job needs 1"),
        "{reasons:?}"
    );
    // One member ends: a waiting one is placed on the next tick, not a second later.
    let done = opened[3].job.clone();
    assert_eq!(h.job(&done).attempts[0].agents, ["b"]);
    h.exit("b", &done, 1, exited(0));
    h.advance(100);
    let next = h.opened();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].invite, ["b"], "only b has room");
}

#[test]
fn an_array_whose_members_all_ended_before_a_restart_is_decided_after_it() {
    let mut h = Harness::new();
    let wf = h.submit("name: z\njobs:\n  m:\n    command: [\"true\"]\n    parallel: 2\n");
    let m = format!("{wf}.m");
    run_members(&mut h, &m, 2);
    // Both members end, and the coordinator stops before the tick that decides the array.
    for i in 0..2 {
        member_exits(&mut h, &m, i, 0);
    }
    assert_eq!(h.state(&m), JobState::Running);
    let mut r = restart(&h);
    r.tick();
    assert_eq!(r.state(&m), JobState::Succeeded);
    assert_eq!(r.core.workflow(&wf).unwrap().state, WorkflowState::Succeeded);
}
