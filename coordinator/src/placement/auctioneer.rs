//! `Auctioneer` actor: runs the auctions the Scheduler opens, around the pure core in
//! [`crate::placement::auction`].
//!
//! The Scheduler decides *what* to auction and *whom* to invite (prefilter on the
//! Fleet's cached view, per-tick capacity claims, residency). The Auctioneer then:
//! - sends the calls for bids;
//! - collects bids and declines, straight from the agents' sessions;
//! - closes an auction when every invitee answered, or at its deadline;
//! - scores the bids by the workflow's objective and picks the winners (a gang all or
//!   nothing) with [`auction::select`];
//! - releases the losers at once, and hands the outcome to the Scheduler.
//!
//! The Scheduler owns jobs, fences and awards: it turns an outcome into an attempt, or
//! leaves the job queued with the reasons.

use std::collections::HashMap;
use std::time::Duration;

use fleetmesh_protocol::CoordinatorMessage;
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};
use tracing::debug;

use crate::placement::auction::{self, BidView};

/// How often deadlines are checked.
const DEADLINE_TICK: Duration = Duration::from_millis(50);

pub use crate::placement::auction::{AuctionOutcome, OpenAuction};

pub enum AuctioneerMsg {
    /// Where outcomes go (sent once by the Scheduler when it starts).
    SetScheduler(DerivedActorRef<AuctionOutcome>),
    Open(Box<OpenAuction>),
    Bid {
        auction: String,
        bid: BidView,
    },
    Decline {
        agent: String,
        auction: String,
        reason: String,
    },
    /// Close the auctions whose deadline passed.
    Tick,
    /// Run dry-run auctions (`fleetmesh plan`): the agents answer without reserving, and
    /// the outcomes come back here instead of going to the Scheduler.
    Probe(Vec<OpenAuction>, RpcReplyPort<Vec<AuctionOutcome>>),
}

struct Run {
    open: OpenAuction,
    bids: Vec<BidView>,
    declines: Vec<String>,
    /// The probe it belongs to (none: a real auction).
    probe: Option<u64>,
}

/// Dry-run auctions waiting to be answered together.
struct Probe {
    open: usize,
    outcomes: Vec<AuctionOutcome>,
    reply: RpcReplyPort<Vec<AuctionOutcome>>,
}

pub struct AuctioneerState {
    scheduler: Option<DerivedActorRef<AuctionOutcome>>,
    link: std::sync::Arc<crate::net::agent_link::AgentLink>,
    runs: HashMap<String, Run>,
    probes: HashMap<u64, Probe>,
    next_probe: u64,
}

impl AuctioneerState {
    fn send(&self, agent: &str, msg: CoordinatorMessage) {
        // Without a session the call goes unanswered and the auction closes at its deadline.
        self.link.send(agent, msg);
    }

    fn answered(run: &Run) -> bool {
        run.bids.len() + run.declines.len() >= run.open.invite.len()
    }

    /// Send the calls of `open` and wait for its answers.
    fn open(&mut self, open: OpenAuction, probe: Option<u64>) {
        for a in &open.invite {
            self.send(a, CoordinatorMessage::CallForBids(open.call.clone()));
        }
        let id = open.id.clone();
        self.runs.insert(id, Run { open, bids: Vec::new(), declines: Vec::new(), probe });
    }

    /// A dry run's outcome joins its probe, which answers once all have closed.
    fn close_probe(&mut self, probe: u64, outcome: AuctionOutcome) {
        let Some(p) = self.probes.get_mut(&probe) else { return };
        p.outcomes.push(outcome);
        p.open -= 1;
        if p.open == 0 {
            if let Some(p) = self.probes.remove(&probe) {
                crate::answer(p.reply, p.outcomes);
            }
        }
    }

    /// Score, release the losers, hand the outcome over.
    fn close(&mut self, id: &str) {
        let Some(run) = self.runs.remove(id) else { return };
        let Run { open, bids, mut declines, probe } = run;
        for a in &open.invite {
            let heard = bids.iter().any(|b| &b.agent == a)
                || declines.iter().any(|d| d.starts_with(&format!("{a}:")));
            if !heard {
                declines.push(format!("{a}: no answer in time"));
            }
        }
        let winners = auction::select(open.objective, &bids, open.nodes);
        // A dry run reserved nothing: no runner-up to keep, nothing to release.
        let backup = match &winners {
            Some(_) if open.nodes == 1 && probe.is_none() => {
                auction::select(open.objective, &bids, 2).and_then(|r| r.into_iter().nth(1))
            }
            _ => None,
        };
        if probe.is_none() {
            for b in &bids {
                let won = winners.as_ref().is_some_and(|w| w.iter().any(|w| w.agent == b.agent));
                if !won {
                    self.send(&b.agent, CoordinatorMessage::Release { auction: open.id.clone() });
                }
            }
        }
        debug!(job_id = %open.job, auction = %open.id, bids = bids.len(), won = winners.is_some(), "auction closed");
        let outcome = AuctionOutcome {
            id: open.id,
            job: open.job,
            attempt: open.attempt,
            invited: open.invite,
            bids,
            declines,
            winners,
            backup,
            inputs: open.inputs,
            residency: open.residency,
        };
        if let Some(probe) = probe {
            return self.close_probe(probe, outcome);
        }
        match &self.scheduler {
            Some(s) => {
                // A Scheduler that is gone is stopping the coordinator anyway.
                let _ = s.send_message(outcome);
            }
            None => {
                // No Scheduler to award: release what would have won.
                for b in outcome.winners.iter().flatten() {
                    self.send(
                        &b.agent,
                        CoordinatorMessage::Release { auction: outcome.id.clone() },
                    );
                }
            }
        }
    }
}

pub struct Auctioneer;

pub struct AuctioneerArgs {
    /// Delivers calls for bids and releases to agents.
    pub link: std::sync::Arc<crate::net::agent_link::AgentLink>,
}

use fleetmesh_data::now_unix_ms as now_ms;

impl Actor for Auctioneer {
    type Msg = AuctioneerMsg;
    type State = AuctioneerState;
    type Arguments = AuctioneerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AuctioneerMsg>,
        a: AuctioneerArgs,
    ) -> Result<AuctioneerState, ActorProcessingErr> {
        myself.send_interval(DEADLINE_TICK, || AuctioneerMsg::Tick);
        Ok(AuctioneerState {
            scheduler: None,
            link: a.link,
            runs: HashMap::new(),
            probes: HashMap::new(),
            next_probe: 0,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<AuctioneerMsg>,
        msg: AuctioneerMsg,
        st: &mut AuctioneerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AuctioneerMsg::SetScheduler(s) => st.scheduler = Some(s),
            AuctioneerMsg::Open(open) => st.open(*open, None),
            AuctioneerMsg::Probe(auctions, reply) => {
                if auctions.is_empty() {
                    crate::answer(reply, Vec::new());
                    return Ok(());
                }
                st.next_probe += 1;
                let probe = st.next_probe;
                let open = auctions.len();
                st.probes.insert(probe, Probe { open, outcomes: Vec::new(), reply });
                for a in auctions {
                    st.open(a, Some(probe));
                }
            }
            AuctioneerMsg::Bid { auction, bid } => {
                let complete = match st.runs.get_mut(&auction) {
                    Some(r) if r.open.invite.contains(&bid.agent) => {
                        r.bids.push(bid);
                        AuctioneerState::answered(r)
                    }
                    _ => {
                        // Closed or unknown: the bidder drops its reservation now.
                        st.send(&bid.agent, CoordinatorMessage::Release { auction });
                        return Ok(());
                    }
                };
                if complete {
                    st.close(&auction);
                }
            }
            AuctioneerMsg::Decline { agent, auction, reason } => {
                let complete = match st.runs.get_mut(&auction) {
                    Some(r) if r.open.invite.contains(&agent) => {
                        r.declines.push(format!("{agent}: {reason}"));
                        AuctioneerState::answered(r)
                    }
                    _ => false,
                };
                if complete {
                    st.close(&auction);
                }
            }
            AuctioneerMsg::Tick => {
                let now = now_ms();
                let due: Vec<String> = st
                    .runs
                    .iter()
                    .filter(|(_, r)| r.open.deadline_unix_ms <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for id in due {
                    st.close(&id);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetmesh_protocol::workflow::Objective;
    use fleetmesh_protocol::CallForBids;
    use tokio::sync::mpsc;

    /// Records what an actor of message type `M` receives.
    struct Recorder<M>(std::marker::PhantomData<fn() -> M>);

    impl<M: ractor::Message> Actor for Recorder<M> {
        type Msg = M;
        type State = mpsc::UnboundedSender<M>;
        type Arguments = mpsc::UnboundedSender<M>;
        async fn pre_start(
            &self,
            _m: ActorRef<M>,
            tx: mpsc::UnboundedSender<M>,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(tx)
        }
        async fn handle(
            &self,
            _m: ActorRef<M>,
            msg: M,
            tx: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            let _ = tx.send(msg);
            Ok(())
        }
    }

    async fn recorder<M: ractor::Message>() -> (ActorRef<M>, mpsc::UnboundedReceiver<M>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (r, _) = Actor::spawn(None, Recorder(std::marker::PhantomData), tx).await.unwrap();
        (r, rx)
    }

    fn open(id: &str, invite: &[&str], deadline_unix_ms: u64) -> Box<OpenAuction> {
        Box::new(OpenAuction {
            id: id.into(),
            job: "wf.j".into(),
            attempt: 1,
            objective: Objective::Cheapest,
            nodes: 1,
            invite: invite.iter().map(|s| s.to_string()).collect(),
            call: CallForBids {
                auction: id.into(),
                job: "wf.j".into(),
                gpus: 1,
                gpu_model: None,
                gpu_memory_bytes: None,
                cpus: 1.0,
                memory_bytes: 0,
                needs_container: false,
                expected_duration_ms: 1000,
                lease_ms: 3000,
                inputs: vec![],
                dry_run: false,
            },
            deadline_unix_ms,
            inputs: vec![],
            residency: vec![],
        })
    }

    fn bid(agent: &str, auction: &str, price: f64) -> AuctioneerMsg {
        AuctioneerMsg::Bid {
            auction: auction.into(),
            bid: BidView {
                agent: agent.into(),
                gpus: vec![format!("GPU-{agent}")],
                price,
                eta_ms: 0,
                local_bytes: 0,
                health: vec![],
                load: 0.0,
            },
        }
    }

    /// Messages the fleet was asked to deliver, as (agent, kind).
    fn sent(
        rx: &mut mpsc::UnboundedReceiver<(String, CoordinatorMessage)>,
    ) -> Vec<(String, String)> {
        let mut v = Vec::new();
        while let Ok((agent, msg)) = rx.try_recv() {
            let kind = match msg {
                CoordinatorMessage::CallForBids(_) => "call",
                CoordinatorMessage::Release { .. } => "release",
                _ => "other",
            };
            v.push((agent, kind.to_string()));
        }
        v
    }

    async fn outcome(rx: &mut mpsc::UnboundedReceiver<AuctionOutcome>) -> AuctionOutcome {
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        m.ok().flatten().expect("no outcome")
    }

    #[tokio::test]
    async fn closes_when_all_answered_picks_the_best_and_releases_the_losers_at_once() {
        let (link, mut fleet_rx) = crate::net::agent_link::AgentLink::recording();
        let (sched, mut sched_rx) = recorder::<AuctionOutcome>().await;
        let (a, _) = Actor::spawn(None, Auctioneer, AuctioneerArgs { link }).await.unwrap();
        a.cast(AuctioneerMsg::SetScheduler(sched.get_derived())).unwrap();
        // A deadline far away: only the answers can close it.
        a.cast(AuctioneerMsg::Open(open("x#1", &["a", "b", "c", "d"], now_ms() + 60_000))).unwrap();
        a.cast(bid("a", "x#1", 3.0)).unwrap();
        a.cast(bid("b", "x#1", 1.0)).unwrap();
        a.cast(bid("c", "x#1", 2.0)).unwrap();
        a.cast(AuctioneerMsg::Decline {
            agent: "d".into(),
            auction: "x#1".into(),
            reason: "no free GPU".into(),
        })
        .unwrap();
        let o = outcome(&mut sched_rx).await;
        let w = o.winners.expect("a winner");
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].agent, "b", "cheapest objective");
        assert_eq!(o.backup.map(|b| b.agent).as_deref(), Some("c"), "the runner-up is named");
        assert_eq!(o.bids.len(), 3);
        assert_eq!(o.declines, ["d: no free GPU"]);
        // A late bid for the closed auction is released too.
        a.cast(bid("z", "x#1", 0.5)).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = sent(&mut fleet_rx);
        let calls: Vec<&str> =
            s.iter().filter(|(_, k)| k == "call").map(|(a, _)| a.as_str()).collect();
        assert_eq!(calls, ["a", "b", "c", "d"]);
        let released: Vec<&str> =
            s.iter().filter(|(_, k)| k == "release").map(|(a, _)| a.as_str()).collect();
        assert_eq!(
            released,
            ["a", "c", "z"],
            "losers at once, then the late bidder; never the winner"
        );
    }

    #[tokio::test]
    async fn a_probe_answers_its_caller_releases_nothing_and_awards_nothing() {
        let (link, mut fleet_rx) = crate::net::agent_link::AgentLink::recording();
        let (sched, mut sched_rx) = recorder::<AuctionOutcome>().await;
        let (a, _) = Actor::spawn(None, Auctioneer, AuctioneerArgs { link }).await.unwrap();
        a.cast(AuctioneerMsg::SetScheduler(sched.get_derived())).unwrap();
        let far = now_ms() + 60_000;
        let probes = vec![*open("p.one", &["a", "b"], far), *open("p.two", &["a"], now_ms() + 100)];
        let a2 = a.clone();
        let bids =
            tokio::spawn(async move { ractor::call_t!(a2, AuctioneerMsg::Probe, 5000, probes) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.cast(bid("a", "p.one", 2.0)).unwrap();
        a.cast(bid("b", "p.one", 1.0)).unwrap();
        // p.two's invitee never answers: it closes at its deadline, and the probe with it.
        let mut outcomes = bids.await.unwrap().expect("the probe answers");
        outcomes.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(outcomes.len(), 2);
        assert_eq!(outcomes[0].winners.as_ref().map(|w| w[0].agent.as_str()), Some("b"));
        assert_eq!(outcomes[1].declines, ["a: no answer in time"]);
        let s = sent(&mut fleet_rx);
        assert!(s.iter().all(|(_, k)| k == "call"), "dry runs reserve nothing to release: {s:?}");
        assert!(sched_rx.try_recv().is_err(), "nothing goes to the Scheduler");
        // An empty probe answers at once.
        let none = ractor::call_t!(a, AuctioneerMsg::Probe, 5000, Vec::new()).unwrap();
        assert!(none.is_empty());
    }

    #[tokio::test]
    async fn deadline_closes_with_silent_invitees_named_and_a_gang_is_all_or_nothing() {
        let (link, mut fleet_rx) = crate::net::agent_link::AgentLink::recording();
        let (sched, mut sched_rx) = recorder::<AuctionOutcome>().await;
        let (a, _) = Actor::spawn(None, Auctioneer, AuctioneerArgs { link }).await.unwrap();
        a.cast(AuctioneerMsg::SetScheduler(sched.get_derived())).unwrap();
        let mut gang = open("g#1", &["a", "b", "c"], now_ms() + 200);
        gang.nodes = 2;
        a.cast(AuctioneerMsg::Open(gang)).unwrap();
        a.cast(bid("a", "g#1", 1.0)).unwrap();
        let o = outcome(&mut sched_rx).await;
        assert!(o.winners.is_none(), "one bid cannot make a gang of 2");
        assert!(o.backup.is_none());
        assert_eq!(o.declines, ["b: no answer in time", "c: no answer in time"]);
        let released: Vec<String> = sent(&mut fleet_rx)
            .into_iter()
            .filter(|(_, k)| k == "release")
            .map(|(a, _)| a)
            .collect();
        assert_eq!(released, ["a"], "an unplaced gang holds nothing");
    }
}
