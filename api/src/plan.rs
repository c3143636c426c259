//! `fleetmesh plan FILE` (`POST /api/v1/plan`): what would happen to a workflow if it
//! were submitted now, changing nothing: per job, the agents that would bid with their
//! offers (asked for real, without reserving anything), those ruled out and why, the
//! inputs with their bytes and holders, the residency they impose, the expected cost,
//! and whether the job would wait.

use serde::{Deserialize, Serialize};

/// The dry run of one workflow.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    pub workflow: String,
    pub objective: String,
    /// In dependency order.
    pub jobs: Vec<JobPlan>,
    /// Sum of the jobs' expected costs (jobs that would wait count nothing).
    pub expected_cost: f64,
    /// Every job (every member of every array) could start on the fleet as it is now.
    pub all_placeable_now: bool,
}

/// The dry run of one job (an array is one entry for all its members).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobPlan {
    pub job: String,
    /// Array members (1 for a plain job).
    pub members: u32,
    /// Nodes per member (> 1 for a gang).
    pub nodes: u32,
    pub needs: Vec<String>,
    /// The offers of the agents asked, best first by the workflow's objective.
    pub offers: Vec<PlanOffer>,
    /// `agent: reason` for every agent ruled out or declining.
    pub refused: Vec<String>,
    /// Eligible agents beyond those asked (a plan asks at most 16 per job); their room
    /// for an array's members is counted as if they were idle.
    #[serde(default)]
    pub also_eligible: Vec<String>,
    pub inputs: Vec<InputPlan>,
    /// Jurisdictions the job may run in (empty: anywhere).
    pub residency: Vec<String>,
    /// The agents it would go to (one per node of the first member).
    pub placement: Vec<String>,
    /// Members that could start at once with the room the offering agents have now.
    pub start_now: u32,
    /// Price of the best offers times the members.
    pub expected_cost: f64,
    /// Why it would wait (empty: it would not).
    pub waits: Vec<String>,
}

/// An offer an agent made for the job, without reserving anything.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PlanOffer {
    pub agent: String,
    pub price: f64,
    pub eta_ms: u64,
    pub gpus: Vec<String>,
    /// Input bytes the agent already holds.
    pub local_bytes: u64,
    /// Share of the agent's CPUs taken once the job runs there.
    pub load: f64,
    /// How many members (of an array) the agent has room for at once.
    pub room: u32,
}

/// One input as the job would stage it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InputPlan {
    /// The directory under `$FLEETMESH_INPUTS`.
    pub mount: String,
    /// What it names (a dataset, or `JOB.OUTPUT`).
    pub from: String,
    /// The dataset it resolves to now (none for an output not produced yet).
    pub dataset: Option<String>,
    /// Bytes moved to a member (its share when sharded); none when not known yet.
    pub bytes: Option<u64>,
    /// Agents (or `coordinator`) that hold it completely now.
    pub holders: Vec<String>,
    pub jurisdictions: Vec<String>,
    pub sharded: bool,
}
