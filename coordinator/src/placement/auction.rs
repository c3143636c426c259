//! Pure auction logic (no I/O, time passed in): prefilter candidates on hard constraints,
//! score bids by the workflow's objective, and pick winners (N for a gang, all or none).
//!
//! The `Auctioneer` actor is a thin shell around these functions: the Scheduler's core
//! prefilters [`Candidate`]s and opens an [`OpenAuction`]; the Auctioneer sends the calls
//! for bids, collects [`BidView`]s until the deadline, calls [`select`] and hands back an
//! [`AuctionOutcome`].

use fleetmesh_protocol::workflow::{glob_match, JobSpec, Objective, SpotPolicy};
use fleetmesh_protocol::CallForBids;
use serde::{Deserialize, Serialize};

/// An auction the Scheduler wants run.
#[derive(Debug)]
pub struct OpenAuction {
    pub id: String,
    pub job: String,
    pub attempt: u64,
    pub objective: Objective,
    /// Winners wanted (> 1 for a gang).
    pub nodes: u32,
    pub invite: Vec<String>,
    pub call: CallForBids,
    pub deadline_unix_ms: u64,
    /// (mount, dataset id) of the job's inputs, and the residency they impose.
    pub inputs: Vec<(String, String)>,
    pub residency: Vec<String>,
}

/// What came of an auction.
#[derive(Debug)]
pub struct AuctionOutcome {
    pub id: String,
    pub job: String,
    pub attempt: u64,
    pub invited: Vec<String>,
    pub bids: Vec<BidView>,
    /// `agent: reason` for every decline, and for every invitee that did not answer.
    pub declines: Vec<String>,
    /// The best bids (one per node), or `None` when there are too few.
    pub winners: Option<Vec<BidView>>,
    /// For a single-node job, the runner-up: an award the winner refuses or does not
    /// accept in time goes to it. Every losing bid, this one included, is released at
    /// once; the runner-up takes the award if its offered GPUs are still free.
    pub backup: Option<BidView>,
    pub inputs: Vec<(String, String)>,
    pub residency: Vec<String>,
}

/// What the Fleet knows about an agent, as far as placement is concerned.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub agent: String,
    pub connected: bool,
    pub draining: bool,
    pub region: Option<String>,
    pub jurisdiction: Option<String>,
    pub provider: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub spot: bool,
    pub price_per_hour: f64,
    /// GPUs with their name and free memory (per NVML), minus any the scheduler knows
    /// to be busy with its own attempts.
    pub free_gpus: Vec<(String, u64)>,
    /// UUIDs in the same order as `free_gpus` (used to subtract busy GPUs).
    pub gpu_uuids: Vec<String>,
    /// The agent's address: the one it advertises, else where its coordinator
    /// connection comes from (gang rendezvous).
    pub addr: Option<String>,
    /// Its host's name and own addresses (loopback excluded), as it reports them.
    pub hostname: Option<String>,
    pub host_addrs: Vec<String>,
    /// `IP:PORT` of its data-plane endpoint.
    pub data_addr: Option<String>,
    /// The node's CPUs and memory (from its inventory; 0 = not reported yet).
    pub cpus: u32,
    pub memory_bytes: u64,
    /// CPUs and memory held there by the scheduler's attempts and this tick's claims.
    pub used_cpus: f64,
    pub used_memory_bytes: u64,
}

/// Slack in CPU sums, so that ten jobs of 0.1 CPU fit one CPU despite rounding.
pub const CPU_EPSILON: f64 = 1e-9;
/// A fully loaded bidder counts as this many hours of extra wait: with otherwise equal
/// offers jobs spread over nodes, while input held locally (hours of fetching saved for
/// big inputs, tens of seconds per GB at 100 MiB/s) still wins over an idle node.
pub const FULL_LOAD_AS_WAIT_HOURS: f64 = 0.01;

/// Why an agent cannot take a job. Shown to users (`jobs show`), so the text matters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Ineligible {
    NotConnected,
    Draining,
    Region {
        wanted: Vec<String>,
        has: Option<String>,
    },
    Jurisdiction {
        wanted: Vec<String>,
        has: Option<String>,
    },
    Provider {
        wanted: Vec<String>,
        has: Option<String>,
    },
    Label {
        key: String,
        wanted: String,
        has: Option<String>,
    },
    SpotForbidden,
    SpotOnly,
    TooExpensive {
        max: String,
        price: String,
    },
    NotEnoughGpus {
        wanted: u32,
        matching: u32,
    },
    NotEnoughCpus {
        wanted: String,
        has: u32,
    },
    NotEnoughMemory {
        wanted: u64,
        has: u64,
    },
    /// Taken by running or awarded attempts (the job waits for them).
    CpusBusy {
        wanted: String,
        free: String,
        has: u32,
    },
    MemoryBusy {
        wanted: u64,
        free: u64,
        has: u64,
    },
}

impl std::fmt::Display for Ineligible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_none = |h: &Option<String>| h.clone().unwrap_or_else(|| "none".into());
        match self {
            Ineligible::NotConnected => write!(f, "not connected"),
            Ineligible::Draining => write!(f, "draining"),
            Ineligible::Region { wanted, has } => {
                write!(f, "region {} not in {wanted:?}", or_none(has))
            }
            Ineligible::Jurisdiction { wanted, has } => {
                write!(f, "jurisdiction {} not in {wanted:?}", or_none(has))
            }
            Ineligible::Provider { wanted, has } => {
                write!(f, "provider {} not in {wanted:?}", or_none(has))
            }
            Ineligible::Label { key, wanted, has } => {
                write!(f, "label {key}={} (wanted {wanted})", or_none(has))
            }
            Ineligible::SpotForbidden => write!(f, "spot capacity, job forbids spot"),
            Ineligible::SpotOnly => write!(f, "on-demand capacity, job wants spot only"),
            Ineligible::TooExpensive { max, price } => {
                write!(f, "price {price}/h above the job's max {max}/h")
            }
            Ineligible::NotEnoughGpus { wanted, matching } => {
                write!(f, "{matching} free matching GPU(s), job needs {wanted}")
            }
            Ineligible::NotEnoughCpus { wanted, has } => {
                write!(f, "{has} CPUs on the node, job needs {wanted}")
            }
            Ineligible::NotEnoughMemory { wanted, has } => {
                write!(f, "{has} bytes of memory on the node, job needs {wanted}")
            }
            Ineligible::CpusBusy { wanted, free, has } => {
                write!(f, "{free} of {has} CPUs free (the rest run other jobs), job needs {wanted}")
            }
            Ineligible::MemoryBusy { wanted, free, has } => write!(
                f,
                "{free} of {has} bytes of memory free (the rest run other jobs), job needs {wanted}"
            ),
        }
    }
}

fn one_of(wanted: &[String], has: &Option<String>) -> bool {
    wanted.is_empty() || has.as_ref().is_some_and(|h| wanted.iter().any(|w| w == h))
}

/// Check the job's hard constraints against one agent.
pub fn eligible(job: &JobSpec, c: &Candidate) -> Result<(), Ineligible> {
    let k = &job.constraints;
    if !c.connected {
        return Err(Ineligible::NotConnected);
    }
    if c.draining {
        return Err(Ineligible::Draining);
    }
    if !one_of(&k.regions, &c.region) {
        return Err(Ineligible::Region { wanted: k.regions.clone(), has: c.region.clone() });
    }
    if !one_of(&k.jurisdictions, &c.jurisdiction) {
        return Err(Ineligible::Jurisdiction {
            wanted: k.jurisdictions.clone(),
            has: c.jurisdiction.clone(),
        });
    }
    if !one_of(&k.providers, &c.provider) {
        return Err(Ineligible::Provider { wanted: k.providers.clone(), has: c.provider.clone() });
    }
    for (key, wanted) in &k.labels {
        if c.labels.get(key) != Some(wanted) {
            return Err(Ineligible::Label {
                key: key.clone(),
                wanted: wanted.clone(),
                has: c.labels.get(key).cloned(),
            });
        }
    }
    match (k.spot, c.spot) {
        (SpotPolicy::Forbidden, true) => return Err(Ineligible::SpotForbidden),
        (SpotPolicy::Only, false) => return Err(Ineligible::SpotOnly),
        _ => {}
    }
    if let Some(max) = k.max_price_per_hour {
        if c.price_per_hour > max {
            return Err(Ineligible::TooExpensive {
                max: format!("{max:.2}"),
                price: format!("{:.2}", c.price_per_hour),
            });
        }
    }
    let r = &job.resources;
    // The node's size (a node that has not reported it yet is not turned away for it).
    if c.cpus > 0 && r.cpus > f64::from(c.cpus) {
        return Err(Ineligible::NotEnoughCpus { wanted: format!("{}", r.cpus), has: c.cpus });
    }
    if c.memory_bytes > 0 && r.memory_bytes > c.memory_bytes {
        return Err(Ineligible::NotEnoughMemory { wanted: r.memory_bytes, has: c.memory_bytes });
    }
    // What is left beside the attempts already there.
    let free_cpus = (f64::from(c.cpus) - c.used_cpus).max(0.0);
    if c.cpus > 0 && r.cpus > free_cpus + CPU_EPSILON {
        return Err(Ineligible::CpusBusy {
            wanted: format!("{}", r.cpus),
            free: format!("{free_cpus:.2}"),
            has: c.cpus,
        });
    }
    let free_memory = c.memory_bytes.saturating_sub(c.used_memory_bytes);
    if c.memory_bytes > 0 && r.memory_bytes > free_memory {
        return Err(Ineligible::MemoryBusy {
            wanted: r.memory_bytes,
            free: free_memory,
            has: c.memory_bytes,
        });
    }
    if r.gpus > 0 {
        let matching = c
            .free_gpus
            .iter()
            .filter(|(name, free)| {
                r.gpu_model.as_deref().is_none_or(|p| glob_match(p, name))
                    && r.gpu_memory_bytes.is_none_or(|m| *free >= m)
            })
            .count() as u32;
        if matching < r.gpus {
            return Err(Ineligible::NotEnoughGpus { wanted: r.gpus, matching });
        }
    }
    Ok(())
}

/// Order candidates cheapest first (ties by name): do this once, then [`prefilter`].
pub fn sort_candidates(candidates: &mut [Candidate]) {
    candidates.sort_by(|a, b| {
        a.price_per_hour.total_cmp(&b.price_per_hour).then_with(|| a.agent.cmp(&b.agent))
    });
}

/// The first `k` eligible candidates in the given order (sort with [`sort_candidates`]
/// for cheapest first), and the refusals. Stops as soon as `k` are found; the refusals
/// are returned only when fewer than `k` are eligible (which is when they are shown),
/// and are then complete.
pub fn prefilter(
    job: &JobSpec,
    candidates: &[Candidate],
    k: usize,
) -> (Vec<String>, Vec<(String, Ineligible)>) {
    // First pass without recording refusals (most auctions find k quickly, past many
    // full agents); they are collected only when fewer than k are eligible.
    let mut ok: Vec<String> = Vec::new();
    for c in candidates {
        if ok.len() >= k {
            return (ok, Vec::new());
        }
        if eligible(job, c).is_ok() {
            ok.push(c.agent.clone());
        }
    }
    if ok.len() >= k {
        return (ok, Vec::new());
    }
    let no = candidates
        .iter()
        .filter_map(|c| eligible(job, c).err().map(|why| (c.agent.clone(), why)))
        .collect();
    (ok, no)
}

pub use fleetmesh_api::jobs::BidView;

/// Lower is better. `balanced` weighs one hour of waiting like doubling the price. A
/// bidder's load after the job counts as extra wait ([`FULL_LOAD_AS_WAIT_HOURS`]).
pub fn score(objective: Objective, bid: &BidView, cheapest_price: f64) -> f64 {
    let load = if bid.load.is_finite() { bid.load.clamp(0.0, 1.0) } else { 1.0 };
    let eta_h = bid.eta_ms as f64 / 3_600_000.0 + load * FULL_LOAD_AS_WAIT_HOURS;
    match objective {
        Objective::Cheapest => bid.price + eta_h * 1e-6,
        Objective::Fastest => eta_h + bid.price * 1e-9,
        Objective::Balanced => {
            let base = cheapest_price.max(0.01);
            bid.price / base + eta_h
        }
    }
}

/// The winners: the `nodes` best bids from distinct agents, or `None` when there are fewer
/// (a gang is placed all together or not at all).
pub fn select(objective: Objective, bids: &[BidView], nodes: u32) -> Option<Vec<BidView>> {
    let cheapest = bids.iter().map(|b| b.price).fold(f64::INFINITY, f64::min);
    let mut ranked: Vec<&BidView> = bids.iter().collect();
    ranked.sort_by(|a, b| {
        score(objective, a, cheapest)
            .total_cmp(&score(objective, b, cheapest))
            .then(a.agent.cmp(&b.agent))
    });
    let mut chosen: Vec<BidView> = Vec::new();
    for b in ranked {
        if !chosen.iter().any(|c| c.agent == b.agent) {
            chosen.push(b.clone());
        }
        if chosen.len() as u32 == nodes {
            return Some(chosen);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetmesh_protocol::workflow::parse;

    fn job(extra: &str) -> JobSpec {
        let y = format!("name: w\njobs:\n  j:\n    command: [x]\n{extra}");
        parse(&y).unwrap().jobs.remove("j").unwrap()
    }

    fn cand(agent: &str, region: &str, jur: &str, gpus: &[(&str, u64)]) -> Candidate {
        Candidate {
            agent: agent.into(),
            connected: true,
            draining: false,
            region: Some(region.into()),
            jurisdiction: Some(jur.into()),
            provider: Some("aws".into()),
            labels: Default::default(),
            spot: false,
            price_per_hour: 2.0,
            free_gpus: gpus.iter().map(|(n, m)| (n.to_string(), *m)).collect(),
            gpu_uuids: Vec::new(),
            addr: None,
            data_addr: None,
            cpus: 0,
            memory_bytes: 0,
            used_cpus: 0.0,
            used_memory_bytes: 0,
            hostname: None,
            host_addrs: vec![],
        }
    }

    const H100: (&str, u64) = ("NVIDIA H100 80GB HBM3", 80 << 30);
    const L4: (&str, u64) = ("NVIDIA L4", 24 << 30);

    #[test]
    fn constraints_filter_with_reasons() {
        let j = job("    resources: { gpus: 2, gpu_model: \"*H100*\", gpu_memory: 40GiB }\n    constraints: { jurisdictions: [EU], spot: forbidden }\n");
        let mut spot = cand("eu-spot", "eu-west-1", "EU", &[H100, H100]);
        spot.spot = true;
        let mut draining = cand("eu-drain", "eu-west-1", "EU", &[H100, H100]);
        draining.draining = true;
        let cs = vec![
            cand("eu-ok", "eu-west-1", "EU", &[H100, H100]),
            cand("us", "us-east-1", "US", &[H100, H100]),
            cand("eu-l4", "eu-west-1", "EU", &[L4, L4]),
            cand("eu-one", "eu-west-1", "EU", &[H100]),
            spot,
            draining,
        ];
        let (ok, no) = prefilter(&j, &cs, 10);
        assert_eq!(ok, ["eu-ok"]);
        let why: std::collections::BTreeMap<_, _> = no.into_iter().collect();
        assert!(matches!(why["us"], Ineligible::Jurisdiction { .. }));
        assert_eq!(why["eu-l4"], Ineligible::NotEnoughGpus { wanted: 2, matching: 0 });
        assert_eq!(why["eu-one"], Ineligible::NotEnoughGpus { wanted: 2, matching: 1 });
        assert_eq!(why["eu-spot"], Ineligible::SpotForbidden);
        assert_eq!(why["eu-drain"], Ineligible::Draining);
        assert_eq!(why["us"].to_string(), "jurisdiction US not in [\"EU\"]");
    }

    #[test]
    fn cpus_and_memory_must_fit_the_node() {
        let mut c = cand("a", "r", "EU", &[("NVIDIA H100", 80 << 30)]);
        c.cpus = 8;
        c.memory_bytes = 32 << 30;
        let fits = job("    resources: { cpus: 8, memory: 32GiB, gpus: 1 }\n");
        assert_eq!(eligible(&fits, &c), Ok(()));
        let cpus = job("    resources: { cpus: 16, gpus: 1 }\n");
        let e = eligible(&cpus, &c).unwrap_err();
        assert_eq!(e.to_string(), "8 CPUs on the node, job needs 16");
        let mem = job("    resources: { memory: 64GiB, gpus: 1 }\n");
        assert!(matches!(eligible(&mem, &c), Err(Ineligible::NotEnoughMemory { .. })));
        // What other attempts hold there is not free: the job waits, saying so.
        c.used_cpus = 7.5;
        let e = eligible(&fits, &c).unwrap_err();
        assert_eq!(e.to_string(), "0.50 of 8 CPUs free (the rest run other jobs), job needs 8");
        c.used_cpus = 0.0;
        c.used_memory_bytes = 1;
        assert!(matches!(eligible(&fits, &c), Err(Ineligible::MemoryBusy { .. })));
        // A node that has not reported its size yet is not turned away for it.
        c.cpus = 0;
        c.memory_bytes = 0;
        assert_eq!(eligible(&cpus, &c), Ok(()));
    }

    #[test]
    fn price_cap_labels_and_top_k() {
        let j = job("    constraints: { max_price_per_hour: 3, labels: { tier: gold } }\n");
        let mut a = cand("a", "r", "EU", &[]);
        a.labels.insert("tier".into(), "gold".into());
        a.price_per_hour = 2.5;
        let mut b = a.clone();
        b.agent = "b".into();
        b.price_per_hour = 1.0;
        let mut c = a.clone();
        c.agent = "c".into();
        c.price_per_hour = 4.0;
        let mut d = a.clone();
        d.agent = "d".into();
        d.labels.clear();
        let mut cs = vec![a, b, c, d];
        sort_candidates(&mut cs);
        let (ok, no) = prefilter(&j, &cs, 1);
        assert_eq!(ok, ["b"], "cheapest first, top 1");
        assert_eq!(no.len(), 0, "stops at the first eligible (cheapest) agent");
        let (all, no) = prefilter(&j, &cs, 10);
        assert_eq!(all, ["b", "a"]);
        assert_eq!(no.len(), 2, "c too expensive, d lacks the label");
    }

    fn bid(agent: &str, price: f64, eta_ms: u64) -> BidView {
        BidView {
            agent: agent.into(),
            price,
            eta_ms,
            gpus: vec![],
            local_bytes: 0,
            health: vec![],
            load: 0.0,
        }
    }

    #[test]
    fn objectives_pick_different_winners() {
        let bids = [bid("cheap-slow", 1.0, 3_600_000), bid("dear-fast", 3.0, 0)];
        assert_eq!(select(Objective::Cheapest, &bids, 1).unwrap()[0].agent, "cheap-slow");
        assert_eq!(select(Objective::Fastest, &bids, 1).unwrap()[0].agent, "dear-fast");
        // balanced: 1.0/1.0 + 1h = 2.0 vs 3.0/1.0 + 0 = 3.0
        assert_eq!(select(Objective::Balanced, &bids, 1).unwrap()[0].agent, "cheap-slow");
    }

    #[test]
    fn equal_offers_go_to_the_less_loaded_node_but_local_data_still_wins() {
        let mut busy = bid("busy", 1.0, 0);
        busy.load = 0.75;
        let idle = bid("idle", 1.0, 0);
        for o in [Objective::Cheapest, Objective::Fastest, Objective::Balanced] {
            let w = select(o, &[busy.clone(), idle.clone()], 1).unwrap();
            assert_eq!(w[0].agent, "idle", "{o:?}");
        }
        // The idle node must fetch 10 GB first (100 s at 100 MB/s): the busy one holds it.
        let far = bid("idle", 1.0, 100_000);
        let w = select(Objective::Balanced, &[busy.clone(), far], 1).unwrap();
        assert_eq!(w[0].agent, "busy");
        // A nonsense load counts as full.
        let mut odd = bid("odd", 1.0, 0);
        odd.load = f64::NAN;
        assert_eq!(select(Objective::Balanced, &[odd, busy], 1).unwrap()[0].agent, "busy");
    }

    #[test]
    fn gangs_are_all_or_nothing_on_distinct_agents() {
        let bids = [bid("a", 1.0, 0), bid("a", 1.0, 0), bid("b", 2.0, 0)];
        let two = select(Objective::Cheapest, &bids, 2).unwrap();
        assert_eq!(two.iter().map(|b| b.agent.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(select(Objective::Cheapest, &bids, 3).is_none());
        assert!(select(Objective::Cheapest, &[], 1).is_none());
    }
}
