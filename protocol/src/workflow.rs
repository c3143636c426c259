//! Workflow files: the YAML a researcher writes, and its validation.
//!
//! Parsing is two-step: the YAML is deserialised into `Raw*` types that reject unknown
//! fields, then [`validate`] checks everything else (references, cycles, sizes,
//! durations, impossible resources) and produces a [`Workflow`] in canonical units.
//! Every problem found is reported, each naming the job and the field.
//!
//! ```yaml
//! name: train-eval
//! objective: balanced            # cheapest | fastest | balanced
//! jobs:
//!   prepare:
//!     command: ["sh", "-c", "echo preparing"]
//!   train:
//!     needs: [prepare]
//!     script: |
//!       python train.py --epochs 3
//!     image: pytorch/pytorch:2.5  # optional; docker or podman on the node
//!     env: { EPOCHS: "3" }
//!     resources: { cpus: 4, memory: 16GiB, gpus: 2, gpu_memory: 40GiB, gpu_model: "H100*" }
//!     constraints:
//!       regions: [eu-west-1]
//!       jurisdictions: [EU]
//!       providers: [aws, onprem]
//!       labels: { tier: gold }
//!       spot: allowed             # allowed | forbidden | only
//!       max_price_per_hour: 12.5
//!     retries: { limit: 2, backoff: 10s }
//!     timeout: 2h
//!     nodes: 1                    # > 1 = gang: all placed together or none
//!     priority: 10
//!     inputs: [imagenet-subset, prepare.shards]   # datasets, or JOB.OUTPUT of a needed job
//!     outputs: [checkpoints]                       # $FLEETMESH_OUTPUTS/checkpoints
//!     output_jurisdictions: [EU]                   # default: most restrictive of the inputs
//!   align:                       # an array: one member per value, `align[0]`..`align[N-1]`
//!     needs: [train]
//!     command: [sh, -c, "align --ref $FLEETMESH_MATRIX_REF $FLEETMESH_INPUTS/reads/*"]
//!     matrix: { ref: [hg19, hg38] }   # or `parallel: 100`
//!     success: 95%                    # the job succeeds when this share of members does
//!     inputs: [{ from: reads, shard: true }]  # each member mounts its share of the files
//!     outputs: [bam]                  # registered per member: WORKFLOW.align[i].bam
//!   merge:
//!     needs: [align]
//!     inputs: [{ from: align.bam, as: bams }]  # every member's output, under bams/<index>/
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::identity::validate_label;

/// Upper bounds above which a request is impossible on any node we know of.
const MAX_GPUS_PER_NODE: u32 = 64;
const MAX_CPUS_PER_NODE: f64 = 1024.0;
const MAX_MEMORY: u64 = 64 << 40; // 64 TiB
const MAX_GPU_MEMORY: u64 = 1 << 40; // 1 TiB per GPU
const MAX_NODES: u32 = 1024;
const MAX_RETRIES: u32 = 100;

/// Largest workflow file accepted, in bytes (the API's body limit is the same).
pub const MAX_WORKFLOW_FILE_BYTES: usize = 2 << 20;
/// Largest a workflow may become once YAML aliases are expanded: what is stored and
/// handed to the scheduler. An anchored scalar referenced many times is measured here,
/// before anything is allocated for it.
pub const MAX_EXPANDED_BYTES: u64 = 4 << 20;
/// Jobs in one workflow file.
pub const MAX_JOBS_PER_WORKFLOW: usize = 10_000;
/// Bytes of `script`, or of all `command` arguments together, per job. With the env
/// and input caps below, an award always fits one control frame.
pub const MAX_RUN_BYTES: usize = 256 << 10;
/// Bytes of `env` (names plus values) per job.
pub const MAX_ENV_BYTES: usize = 64 << 10;
/// Inputs, and outputs, per job.
pub const MAX_INPUTS_PER_JOB: usize = 64;
pub const MAX_OUTPUTS_PER_JOB: usize = 64;
/// Members of one array job (`parallel: N`, or the product of a `matrix`).
pub const MAX_ARRAY_MEMBERS: u32 = 10_000;
/// Jobs and array members of one workflow together: the records it is stored as.
pub const MAX_MEMBERS_PER_WORKFLOW: u64 = 20_000;
/// Values of one matrix axis.
pub const MAX_MATRIX_VALUES: usize = 10_000;
/// Bytes of one matrix value (it becomes an environment variable).
pub const MAX_MATRIX_VALUE_BYTES: usize = 1024;
/// Share of an array's members that must succeed, when the file does not say.
pub const DEFAULT_SUCCESS_PERCENT: f64 = 100.0;
/// Prefix of the variables a matrix's values are given in (`FLEETMESH_MATRIX_REF`).
pub const MATRIX_ENV_PREFIX: &str = "FLEETMESH_MATRIX_";

/// How bids are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    Cheapest,
    Fastest,
    #[default]
    Balanced,
}

/// Spot capacity policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpotPolicy {
    #[default]
    Allowed,
    Forbidden,
    Only,
}

// ---------- raw YAML shapes ----------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: String,
    #[serde(default)]
    objective: Option<Objective>,
    jobs: BTreeMap<String, RawJob>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    command: Option<Vec<String>>,
    script: Option<String>,
    image: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    resources: RawResources,
    #[serde(default)]
    constraints: RawConstraints,
    #[serde(default)]
    needs: Vec<String>,
    retries: Option<RawRetries>,
    timeout: Option<String>,
    nodes: Option<u32>,
    priority: Option<i32>,
    #[serde(default)]
    inputs: Vec<InputSpec>,
    #[serde(default)]
    outputs: Vec<String>,
    output_jurisdictions: Option<Vec<String>>,
    parallel: Option<u32>,
    matrix: Option<BTreeMap<String, Vec<MatrixValue>>>,
    success: Option<MatrixValue>,
}

/// A matrix value as written: a string, number or boolean, given to the job as text.
#[derive(Debug, Clone)]
struct MatrixValue(String);

impl<'de> Deserialize<'de> for MatrixValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MatrixValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MatrixValue, E> {
                Ok(MatrixValue(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MatrixValue, E> {
                Ok(MatrixValue(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MatrixValue, E> {
                Ok(MatrixValue(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<MatrixValue, E> {
                Ok(MatrixValue(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<MatrixValue, E> {
                Ok(MatrixValue(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    cpus: Option<f64>,
    memory: Option<String>,
    gpus: Option<u32>,
    gpu_memory: Option<String>,
    gpu_model: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConstraints {
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default)]
    jurisdictions: Vec<String>,
    #[serde(default)]
    providers: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    spot: Option<SpotPolicy>,
    max_price_per_hour: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetries {
    limit: u32,
    backoff: Option<String>,
}

// ---------- validated shapes ----------

/// What a job runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Run {
    Command(Vec<String>),
    Script(String),
}

/// Resources one node must provide for the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: f64,
    pub memory_bytes: u64,
    pub gpus: u32,
    /// Free memory needed on each GPU.
    pub gpu_memory_bytes: Option<u64>,
    /// Case-insensitive glob on the GPU name, e.g. `*H100*`.
    pub gpu_model: Option<String>,
}

/// Hard placement constraints.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Constraints {
    pub regions: Vec<String>,
    pub jurisdictions: Vec<String>,
    pub providers: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub spot: SpotPolicy,
    pub max_price_per_hour: Option<f64>,
}

/// Retry policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retries {
    pub limit: u32,
    pub backoff_ms: u64,
}

/// A validated job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub run: Run,
    pub image: Option<String>,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub constraints: Constraints,
    pub needs: Vec<String>,
    pub retries: Retries,
    pub timeout_ms: Option<u64>,
    pub nodes: u32,
    pub priority: i32,
    /// Datasets (names or ids) and outputs of needed jobs (`JOB.OUTPUT`), staged
    /// read-only under `$FLEETMESH_INPUTS/<NAME, OUTPUT or the name given with as>`.
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    /// Directories under `$FLEETMESH_OUTPUTS` registered as datasets
    /// `WORKFLOW.JOB.OUTPUT` after success.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Residency of the outputs; by default the most restrictive of the inputs'.
    #[serde(default)]
    pub output_jurisdictions: Option<Vec<String>>,
    /// Run as an array of members, each placed, retried and cancelled on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<ArraySpec>,
}

/// An input as written: `NAME` (a dataset, or `JOB.OUTPUT`), or
/// `{from: NAME, as: MOUNT, shard: true}`. Stored the same way, as a plain string when
/// it is only a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    /// A dataset name or id, or `JOB.OUTPUT` of a needed job.
    pub from: String,
    /// The directory name under `$FLEETMESH_INPUTS` (default: the dataset or output name).
    pub mount: Option<String>,
    /// Each array member mounts only its share of the files.
    pub shard: bool,
}

impl From<&str> for InputSpec {
    fn from(from: &str) -> Self {
        InputSpec { from: from.to_string(), mount: None, shard: false }
    }
}

impl Serialize for InputSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if self.mount.is_none() && !self.shard {
            return s.serialize_str(&self.from);
        }
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("from", &self.from)?;
        if let Some(a) = &self.mount {
            m.serialize_entry("as", a)?;
        }
        if self.shard {
            m.serialize_entry("shard", &true)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for InputSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Long {
            from: String,
            #[serde(rename = "as")]
            mount: Option<String>,
            #[serde(default)]
            shard: bool,
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = InputSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a dataset name, JOB.OUTPUT, or {from, as, shard}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<InputSpec, E> {
                Ok(InputSpec::from(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<InputSpec, A::Error> {
                let l = Long::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(InputSpec { from: l.from, mount: l.mount, shard: l.shard })
            }
        }
        d.deserialize_any(V)
    }
}

/// How a job fans out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArraySpec {
    /// Members: `parallel`, or the product of the matrix's axes.
    pub count: u32,
    /// Matrix axes in name order (empty for `parallel`); the last varies fastest.
    #[serde(default)]
    pub matrix: Vec<MatrixAxis>,
    /// Share of members, in percent, that must succeed for the job to succeed.
    pub success_percent: f64,
}

impl ArraySpec {
    /// The variables member `index` runs with: its index, the count, and its matrix
    /// values (`FLEETMESH_MATRIX_<AXIS>`, the axis name upper-cased).
    pub fn member_env(&self, index: u32) -> Vec<(String, String)> {
        let mut env = vec![
            ("FLEETMESH_INDEX".to_string(), index.to_string()),
            ("FLEETMESH_COUNT".to_string(), self.count.to_string()),
        ];
        let mut rest = index as usize;
        let mut values = Vec::with_capacity(self.matrix.len());
        for (axis, vals) in self.matrix.iter().rev() {
            let n = vals.len().max(1);
            let v = vals.get(rest % n).cloned().unwrap_or_default();
            values.push((format!("{MATRIX_ENV_PREFIX}{}", axis.to_ascii_uppercase()), v));
            rest /= n;
        }
        env.extend(values.into_iter().rev());
        env
    }

    /// Members that must succeed for the job to succeed.
    pub fn required(&self) -> u32 {
        let exact = f64::from(self.count) * self.success_percent / 100.0;
        // A share that lands on a whole member (95% of 200 = 190) must not round up
        // through floating-point noise.
        (exact - 1e-9).ceil().clamp(0.0, f64::from(self.count)) as u32
    }
}

/// One axis of a matrix: its name and values.
pub type MatrixAxis = (String, Vec<String>);

/// How array member `index` of job `job` is named (`align[3]`).
pub fn member_name(job: &str, index: u32) -> String {
    format!("{job}[{index}]")
}

/// How a job input is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputRef {
    /// A dataset by name or id.
    Dataset(String),
    /// Output `output` of job `job` (which the job `needs`).
    JobOutput { job: String, output: String },
}

impl JobSpec {
    /// Each input with its mount name under `$FLEETMESH_INPUTS`.
    pub fn input_refs(&self, jobs: &BTreeMap<String, JobSpec>) -> Vec<(String, InputRef)> {
        self.inputs.iter().map(|i| input_ref(i, |j| jobs.contains_key(j))).collect()
    }

    /// Whether the input mounted as `mount` is split among the array's members.
    pub fn sharded(&self, mount: &str, jobs: &BTreeMap<String, JobSpec>) -> bool {
        self.inputs.iter().any(|i| i.shard && input_ref(i, |j| jobs.contains_key(j)).0 == mount)
    }
}

fn input_ref(i: &InputSpec, is_job: impl Fn(&str) -> bool) -> (String, InputRef) {
    let (name, r) = match i.from.split_once('.') {
        Some((job, output)) if !output.contains('.') && is_job(job) => (
            output.to_string(),
            InputRef::JobOutput { job: job.to_string(), output: output.to_string() },
        ),
        _ => (i.from.clone(), InputRef::Dataset(i.from.clone())),
    };
    (i.mount.clone().unwrap_or(name), r)
}

/// A validated workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workflow {
    pub name: String,
    pub objective: Objective,
    pub jobs: BTreeMap<String, JobSpec>,
}

/// One problem in a workflow file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub job: Option<String>,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.job {
            Some(j) => write!(f, "job `{j}`, field `{}`: {}", self.field, self.message),
            None => write!(f, "field `{}`: {}", self.field, self.message),
        }
    }
}

/// Why a workflow file was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkflowError {
    #[error("invalid workflow file{}: {message}", job.as_ref().map(|j| format!(" (in job `{j}`)")).unwrap_or_default())]
    Syntax { job: Option<String>, message: String },
    #[error("invalid workflow: {}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
}

/// Parse a size such as `16GiB`, `512MiB`, `1.5GB`, `100M`, or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid size {s:?} (e.g. 16GiB, 512MiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024f64.powi(2),
        "gi" | "gib" => 1024f64.powi(3),
        "ti" | "tib" => 1024f64.powi(4),
        _ => {
            return Err(format!(
                "invalid size unit in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(v as u64)
}

fn parse_duration_ms(s: &str) -> Result<u64, String> {
    humantime_like(s).ok_or_else(|| format!("invalid duration {s:?} (e.g. 30s, 10m, 2h)"))
}

/// Durations: `<number><unit>` pairs, units ms, s, m, h, d (e.g. `1h30m`).
fn humantime_like(s: &str) -> Option<u64> {
    let mut total: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let ms = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(ms)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Case-insensitive glob with `*` and `?`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    let (mut pi, mut ti, mut star, mut mark) = (0usize, 0usize, None::<usize>, 0usize);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Find which job a YAML line belongs to (for syntax errors), assuming the usual layout
/// `jobs:` followed by one indented key per job.
fn job_at_line(yaml: &str, line: u64) -> Option<String> {
    let mut in_jobs = false;
    let mut job_indent = None;
    let mut current = None;
    for (i, l) in yaml.lines().enumerate() {
        if i as u64 + 1 > line {
            break;
        }
        let indent = l.len() - l.trim_start().len();
        let trimmed = l.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if indent == 0 {
            in_jobs = trimmed.starts_with("jobs:");
            current = None;
            job_indent = None;
            continue;
        }
        if in_jobs {
            let ji = *job_indent.get_or_insert(indent);
            if indent == ji {
                current = trimmed.split(':').next().map(|k| k.trim().trim_matches('"').to_string());
            }
        }
    }
    current
}

/// Parse and validate a workflow file.
pub fn parse(yaml: &str) -> Result<Workflow, WorkflowError> {
    if yaml.len() > MAX_WORKFLOW_FILE_BYTES {
        return Err(WorkflowError::Syntax {
            job: None,
            message: format!(
                "the file is {} bytes; the limit is {MAX_WORKFLOW_FILE_BYTES}",
                yaml.len()
            ),
        });
    }
    // Measure first: deserialising an alias bomb into `RawWorkflow` would allocate it.
    serde_saphyr::from_str::<ExpandedSize>(yaml).map_err(|e| {
        let job = e.location().and_then(|l| job_at_line(yaml, l.line()));
        WorkflowError::Syntax { job, message: e.to_string() }
    })?;
    let raw: RawWorkflow = serde_saphyr::from_str(yaml).map_err(|e| {
        let job = e.location().and_then(|l| job_at_line(yaml, l.line()));
        WorkflowError::Syntax { job, message: e.to_string() }
    })?;
    validate(raw)
}

fn validate(raw: RawWorkflow) -> Result<Workflow, WorkflowError> {
    let mut problems = Vec::new();
    let mut push = |job: Option<&str>, field: &str, message: String| {
        problems.push(Problem { job: job.map(str::to_string), field: field.to_string(), message })
    };
    if let Err(e) = validate_label("workflow name", &raw.name) {
        push(None, "name", e.to_string());
    }
    if raw.jobs.is_empty() {
        push(None, "jobs", "a workflow needs at least one job".into());
    }
    if raw.jobs.len() > MAX_JOBS_PER_WORKFLOW {
        push(
            None,
            "jobs",
            format!("{} jobs; at most {MAX_JOBS_PER_WORKFLOW} per workflow", raw.jobs.len()),
        );
    }
    let mut jobs = BTreeMap::new();
    let mut members: u64 = 0;
    for (name, j) in &raw.jobs {
        let jn = Some(name.as_str());
        if let Err(e) = validate_label("job name", name) {
            push(jn, "name", e.to_string());
        }
        let run = match (&j.command, &j.script) {
            (Some(c), None) if !c.is_empty() && !c[0].is_empty() => Some(Run::Command(c.clone())),
            (Some(_), None) => {
                push(jn, "command", "must be a non-empty list (argv)".into());
                None
            }
            (None, Some(s)) if !s.trim().is_empty() => Some(Run::Script(s.clone())),
            (None, Some(_)) => {
                push(jn, "script", "must not be empty".into());
                None
            }
            (Some(_), Some(_)) => {
                push(jn, "command", "give either `command` or `script`, not both".into());
                None
            }
            (None, None) => {
                push(jn, "command", "every job needs a `command` (argv list) or a `script`".into());
                None
            }
        };
        let run_bytes = match &run {
            Some(Run::Command(argv)) => argv.iter().map(String::len).sum(),
            Some(Run::Script(text)) => text.len(),
            None => 0,
        };
        if run_bytes > MAX_RUN_BYTES {
            let field = if j.script.is_some() { "script" } else { "command" };
            push(jn, field, format!("{run_bytes} bytes; the limit is {MAX_RUN_BYTES}"));
        }
        let env_bytes: usize = j.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        if env_bytes > MAX_ENV_BYTES {
            push(jn, "env", format!("{env_bytes} bytes; the limit is {MAX_ENV_BYTES}"));
        }
        if j.inputs.len() > MAX_INPUTS_PER_JOB {
            push(jn, "inputs", format!("{} inputs; at most {MAX_INPUTS_PER_JOB}", j.inputs.len()));
        }
        if j.outputs.len() > MAX_OUTPUTS_PER_JOB {
            let n = j.outputs.len();
            push(jn, "outputs", format!("{n} outputs; at most {MAX_OUTPUTS_PER_JOB}"));
        }
        if let Some(image) = &j.image {
            if let Err(e) = validate_image_reference(image) {
                push(jn, "image", e);
            }
        }
        for n in &j.needs {
            if n == name {
                push(jn, "needs", "a job cannot need itself".into());
            } else if !raw.jobs.contains_key(n) {
                push(jn, "needs", format!("no job named `{n}` in this workflow"));
            }
        }
        let r = &j.resources;
        let cpus = r.cpus.unwrap_or(1.0);
        if !(cpus > 0.0 && cpus <= MAX_CPUS_PER_NODE) {
            push(jn, "resources.cpus", format!("must be > 0 and <= {MAX_CPUS_PER_NODE}"));
        }
        let memory_bytes = match r.memory.as_deref().map(parse_size).transpose() {
            Ok(m) => m.unwrap_or(0),
            Err(e) => {
                push(jn, "resources.memory", e);
                0
            }
        };
        if memory_bytes > MAX_MEMORY {
            push(jn, "resources.memory", "more memory than any node can have (64 TiB)".into());
        }
        let gpus = r.gpus.unwrap_or(0);
        if gpus > MAX_GPUS_PER_NODE {
            push(jn, "resources.gpus", format!("at most {MAX_GPUS_PER_NODE} GPUs per node"));
        }
        let gpu_memory_bytes = match r.gpu_memory.as_deref().map(parse_size).transpose() {
            Ok(m) => m,
            Err(e) => {
                push(jn, "resources.gpu_memory", e);
                None
            }
        };
        if gpu_memory_bytes.is_some_and(|m| m > MAX_GPU_MEMORY) {
            push(jn, "resources.gpu_memory", "more than any GPU has (1 TiB)".into());
        }
        if gpus == 0 && (gpu_memory_bytes.is_some() || r.gpu_model.is_some()) {
            push(jn, "resources.gpus", "gpu_memory/gpu_model need gpus > 0".into());
        }
        if r.gpu_model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            push(jn, "resources.gpu_model", "must not be empty".into());
        }
        let c = &j.constraints;
        if c.max_price_per_hour.is_some_and(|p| !(p >= 0.0 && p.is_finite())) {
            push(jn, "constraints.max_price_per_hour", "must be a non-negative number".into());
        }
        let retries = match &j.retries {
            None => Retries { limit: 0, backoff_ms: 5000 },
            Some(rr) => {
                if rr.limit > MAX_RETRIES {
                    push(jn, "retries.limit", format!("at most {MAX_RETRIES}"));
                }
                let backoff_ms = match rr.backoff.as_deref().map(parse_duration_ms).transpose() {
                    Ok(b) => b.unwrap_or(5000),
                    Err(e) => {
                        push(jn, "retries.backoff", e);
                        0
                    }
                };
                Retries { limit: rr.limit, backoff_ms }
            }
        };
        let timeout_ms = match j.timeout.as_deref().map(parse_duration_ms).transpose() {
            Ok(Some(0)) => {
                push(jn, "timeout", "must be greater than zero".into());
                None
            }
            Ok(t) => t,
            Err(e) => {
                push(jn, "timeout", e);
                None
            }
        };
        let nodes = j.nodes.unwrap_or(1);
        if nodes == 0 || nodes > MAX_NODES {
            push(jn, "nodes", format!("must be between 1 and {MAX_NODES}"));
        }
        let array = validate_array(j, &mut |field, m| push(jn, field, m));
        members = members.saturating_add(array.as_ref().map_or(1, |a| u64::from(a.count)));
        let mut mounts = std::collections::BTreeSet::new();
        for spec in &j.inputs {
            let i = &spec.from;
            let (mount, r) = input_ref(spec, |n| raw.jobs.contains_key(n));
            if spec.shard && array.is_none() {
                push(jn, "inputs", format!("`{i}`: shard needs `parallel` or `matrix`"));
            }
            if let (true, InputRef::JobOutput { job, .. }) = (spec.shard, &r) {
                if raw.jobs.get(job).is_some_and(is_array) {
                    push(jn, "inputs", format!("`{i}`: an array's outputs cannot be sharded"));
                }
            }
            if let InputRef::JobOutput { job, output } = &r {
                if job == name {
                    push(jn, "inputs", format!("`{i}`: a job cannot read its own output"));
                } else if !j.needs.contains(job) {
                    push(jn, "inputs", format!("`{i}` reads job `{job}`, which is not in `needs`"));
                } else if !raw.jobs.get(job).is_some_and(|d| d.outputs.contains(output)) {
                    push(jn, "inputs", format!("job `{job}` has no output `{output}`"));
                }
            }
            if spec.mount.as_deref().is_some_and(|m| validate_label("mount name", m).is_err()) {
                push(jn, "inputs", format!("`{i}`: `as: {mount}` is not a valid directory name"));
            } else if mount.is_empty() || mount.contains('/') || mount.starts_with('.') {
                push(jn, "inputs", format!("`{i}` is not a dataset name, id or JOB.OUTPUT"));
            } else if !mounts.insert(mount.clone()) {
                push(jn, "inputs", format!("two inputs would both appear as `{mount}`"));
            }
        }
        let mut outs = std::collections::BTreeSet::new();
        for o in &j.outputs {
            if let Err(e) = validate_label("output name", o) {
                push(jn, "outputs", e.to_string());
            } else if o.contains('.') {
                push(jn, "outputs", format!("output name `{o}` must not contain `.`"));
            } else if !outs.insert(o) {
                push(jn, "outputs", format!("output `{o}` listed twice"));
            }
        }
        if j.output_jurisdictions.is_some() && j.outputs.is_empty() {
            push(jn, "output_jurisdictions", "set without any `outputs`".into());
        }
        for x in j.output_jurisdictions.iter().flatten() {
            if let Err(e) = validate_label("jurisdiction", x) {
                push(jn, "output_jurisdictions", e.to_string());
            }
        }
        for k in j.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                push(jn, "env", format!("invalid variable name {k:?}"));
            }
        }
        if let Some(run) = run {
            jobs.insert(
                name.clone(),
                JobSpec {
                    name: name.clone(),
                    run,
                    image: j.image.clone(),
                    env: j.env.clone(),
                    resources: Resources {
                        cpus,
                        memory_bytes,
                        gpus,
                        gpu_memory_bytes,
                        gpu_model: r.gpu_model.clone(),
                    },
                    constraints: Constraints {
                        regions: c.regions.clone(),
                        jurisdictions: c.jurisdictions.clone(),
                        providers: c.providers.clone(),
                        labels: c.labels.clone(),
                        spot: c.spot.unwrap_or_default(),
                        max_price_per_hour: c.max_price_per_hour,
                    },
                    needs: j.needs.clone(),
                    retries,
                    timeout_ms,
                    nodes,
                    priority: j.priority.unwrap_or(0),
                    inputs: j.inputs.clone(),
                    outputs: j.outputs.clone(),
                    output_jurisdictions: j.output_jurisdictions.clone(),
                    array,
                },
            );
        }
    }
    if members > MAX_MEMBERS_PER_WORKFLOW {
        push(
            None,
            "jobs",
            format!(
                "{members} jobs and array members; at most {MAX_MEMBERS_PER_WORKFLOW} per workflow"
            ),
        );
    }
    if let Some(cycle) = find_cycle(&raw.jobs) {
        push(Some(&cycle[0]), "needs", format!("dependency cycle: {}", cycle.join(" -> ")));
    }
    if !problems.is_empty() {
        return Err(WorkflowError::Invalid(problems));
    }
    Ok(Workflow { name: raw.name, objective: raw.objective.unwrap_or_default(), jobs })
}

fn is_array(j: &RawJob) -> bool {
    j.parallel.is_some() || j.matrix.is_some()
}

/// The array a job fans out to (`parallel`, `matrix`, `success`), with every problem
/// reported through `push(field, message)`.
fn validate_array(j: &RawJob, push: &mut impl FnMut(&str, String)) -> Option<ArraySpec> {
    let success_percent = match j.success.as_ref().map(|v| parse_percent(&v.0)).transpose() {
        Ok(p) => p.unwrap_or(DEFAULT_SUCCESS_PERCENT),
        Err(e) => {
            push("success", e);
            DEFAULT_SUCCESS_PERCENT
        }
    };
    let (count, matrix) = match (j.parallel, &j.matrix) {
        (None, None) => {
            if j.success.is_some() {
                push("success", "set without `parallel` or `matrix`".into());
            }
            return None;
        }
        (Some(_), Some(_)) => {
            push("parallel", "give either `parallel` or `matrix`, not both".into());
            return None;
        }
        (Some(n), None) => (u64::from(n), Vec::new()),
        (None, Some(m)) => validate_matrix(m, push)?,
    };
    if count == 0 || count > u64::from(MAX_ARRAY_MEMBERS) {
        let field = if matrix.is_empty() { "parallel" } else { "matrix" };
        let what = if matrix.is_empty() { "members" } else { "members (the product of its axes)" };
        push(field, format!("{count} {what}; an array has 1 to {MAX_ARRAY_MEMBERS} members"));
        return None;
    }
    Some(ArraySpec { count: count as u32, matrix, success_percent })
}

/// A matrix's axes and its member count (the product of the axes' lengths, saturating).
fn validate_matrix(
    m: &BTreeMap<String, Vec<MatrixValue>>,
    push: &mut impl FnMut(&str, String),
) -> Option<(u64, Vec<MatrixAxis>)> {
    if m.is_empty() {
        push("matrix", "needs at least one axis".into());
        return None;
    }
    let mut ok = true;
    let mut count: u64 = 1;
    let mut axes = Vec::new();
    for (axis, values) in m {
        let field = format!("matrix.{axis}");
        let name_ok = axis.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && axis.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok {
            push(&field, "axis names are letters, digits and _ (they name a variable)".into());
            ok = false;
        }
        if values.is_empty() || values.len() > MAX_MATRIX_VALUES {
            push(&field, format!("needs 1 to {MAX_MATRIX_VALUES} values"));
            ok = false;
        }
        if let Some(v) =
            values.iter().find(|v| v.0.len() > MAX_MATRIX_VALUE_BYTES || v.0.contains('\0'))
        {
            let n = v.0.len();
            push(
                &field,
                format!("a value of {n} bytes or with NUL; at most {MAX_MATRIX_VALUE_BYTES}"),
            );
            ok = false;
        }
        count = count.saturating_mul(values.len() as u64);
        axes.push((axis.clone(), values.iter().map(|v| v.0.clone()).collect()));
    }
    ok.then_some((count, axes))
}

/// `95%`, `95` or `99.5%`: a share above 0 and at most 100.
fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let n: f64 = t
        .strip_suffix('%')
        .unwrap_or(t)
        .trim()
        .parse()
        .map_err(|_| format!("invalid share {s:?} (e.g. 95%)"))?;
    if n > 0.0 && n <= 100.0 {
        Ok(n)
    } else {
        Err(format!("{s:?}: the share must be above 0% and at most 100%"))
    }
}

/// A dependency cycle, if there is one: iterative depth-first search (a chain of
/// thousands of jobs must not overflow a worker's stack).
fn find_cycle(jobs: &BTreeMap<String, RawJob>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        OnPath,
        Done,
    }
    let mut mark: BTreeMap<&str, Mark> = BTreeMap::new();
    for root in jobs.keys() {
        if mark.contains_key(root.as_str()) {
            continue;
        }
        // The current path: each job with the index of the next `needs` entry to visit.
        let mut path: Vec<(&str, usize)> = vec![(root.as_str(), 0)];
        mark.insert(root, Mark::OnPath);
        while let Some((node, next)) = path.last_mut() {
            let needs = jobs.get(*node).map(|j| j.needs.as_slice()).unwrap_or_default();
            let Some(dep) = needs.get(*next) else {
                mark.insert(node, Mark::Done);
                path.pop();
                continue;
            };
            *next += 1;
            if dep == node || !jobs.contains_key(dep) {
                continue; // reported on their own
            }
            match mark.get(dep.as_str()) {
                Some(Mark::Done) => {}
                Some(Mark::OnPath) => {
                    let start = path.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        path[start..].iter().map(|(n, _)| n.to_string()).collect();
                    cycle.push(dep.clone());
                    return Some(cycle);
                }
                None => {
                    mark.insert(dep, Mark::OnPath);
                    path.push((dep.as_str(), 0));
                }
            }
        }
    }
    None
}

/// Check an image against the OCI distribution reference grammar:
/// `[HOST[:PORT]/]PATH[:TAG][@ALGO:HEX]`, path components in lower case. The image is
/// passed to the container runtime as one argument; a reference that could be read as an
/// option (`--privileged`) or carries anything else is refused.
pub fn validate_image_reference(image: &str) -> Result<(), String> {
    const MAX_NAME: usize = 255;
    const MAX_TAG: usize = 128;
    let bad = |why: &str| Err(format!("{image:?} is not an image reference ({why})"));
    if image.is_empty() {
        return bad("empty");
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let Some((algo, hex)) = d.split_once(':') else { return bad("digest needs ALGO:HEX") };
        let algo_ok = !algo.is_empty()
            && algo.split(['+', '.', '_', '-']).all(|p| {
                !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        let hex_ok = hex.len() >= 32
            && hex.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
        if !algo_ok || !hex_ok {
            return bad("malformed digest");
        }
    }
    // A tag follows the last ':' that comes after the last '/' (a ':' before it is a port).
    let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let first_ok = t.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        let rest_ok =
            t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || t.len() > MAX_TAG {
            return bad("malformed tag");
        }
    }
    if name.is_empty() || name.len() > MAX_NAME {
        return bad("name must be 1 to 255 characters");
    }
    let mut components: Vec<&str> = name.split('/').collect();
    let first = components[0];
    let is_domain = components.len() > 1
        && (first.contains('.')
            || first.contains(':')
            || first == "localhost"
            || first.bytes().any(|b| b.is_ascii_uppercase()));
    if is_domain {
        let (host, port) = match first.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (first, None),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !host.split('.').all(label_ok)
            || port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
        {
            return bad("malformed registry host");
        }
        components.remove(0);
    }
    for c in components {
        if !path_component_ok(c) {
            return bad("path components are lower-case letters and digits joined by . _ __ or -");
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn path_component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let sep_start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[sep_start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// Walks a YAML document, with aliases expanded as the deserialiser replays them, and
/// counts the bytes of its scalars without keeping them; fails past
/// [`MAX_EXPANDED_BYTES`].
struct ExpandedSize;

impl<'de> Deserialize<'de> for ExpandedSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let total = std::cell::Cell::new(0u64);
        d.deserialize_any(Measure(&total))?;
        Ok(ExpandedSize)
    }
}

/// One node of the walk; shares the running total.
#[derive(Clone, Copy)]
struct Measure<'a>(&'a std::cell::Cell<u64>);

/// What a non-string node is charged (its bookkeeping, not its text).
const NODE_COST: u64 = 8;

impl Measure<'_> {
    fn charge<E: serde::de::Error>(self, bytes: u64) -> Result<(), E> {
        let t = self.0.get().saturating_add(bytes);
        self.0.set(t);
        if t > MAX_EXPANDED_BYTES {
            return Err(E::custom(format!(
                "the workflow expands (YAML aliases included) to more than {MAX_EXPANDED_BYTES} bytes"
            )));
        }
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Measure<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Measure<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.charge(NODE_COST)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.charge(NODE_COST)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.charge(NODE_COST)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.charge(NODE_COST)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.charge(v.len() as u64 + NODE_COST)
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<(), E> {
        self.charge(v.len() as u64 + NODE_COST)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.charge(NODE_COST)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.charge(NODE_COST)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.charge(NODE_COST)?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.charge(NODE_COST)?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use serde::de::VariantAccess;
        let ((), v) = data.variant_seed(self)?;
        v.newtype_variant_seed(self)
    }
}

impl Workflow {
    /// Jobs in an order where every job comes after the jobs it needs (Kahn's
    /// algorithm, linear in jobs plus edges; names break ties, so the order is stable).
    pub fn topological_order(&self) -> Vec<&str> {
        let mut waiting_on: BTreeMap<&str, usize> = BTreeMap::new();
        let mut needed_by: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (n, j) in &self.jobs {
            let deps: std::collections::BTreeSet<&str> =
                j.needs.iter().map(String::as_str).filter(|d| self.jobs.contains_key(*d)).collect();
            waiting_on.insert(n, deps.len());
            for d in deps {
                needed_by.entry(d).or_default().push(n);
            }
        }
        let mut ready: std::collections::BTreeSet<&str> =
            waiting_on.iter().filter(|(_, c)| **c == 0).map(|(n, _)| *n).collect();
        let mut order = Vec::with_capacity(self.jobs.len());
        while let Some(n) = ready.pop_first() {
            order.push(n);
            for m in needed_by.get(n).into_iter().flatten() {
                if let Some(c) = waiting_on.get_mut(m) {
                    *c -= 1;
                    if *c == 0 {
                        ready.insert(m);
                    }
                }
            }
        }
        order // cycles are rejected by validation; a job on one is left out, never looped on
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: train-eval
objective: cheapest
jobs:
  prepare:
    command: ["sh", "-c", "echo prep"]
    resources: { cpus: 0.5, memory: 512MiB }
  train:
    needs: [prepare]
    script: |
      echo training
    env: { EPOCHS: "3" }
    resources: { gpus: 2, gpu_memory: 40GiB, gpu_model: "*H100*" }
    constraints:
      regions: [eu-west-1]
      jurisdictions: [EU]
      spot: forbidden
      max_price_per_hour: 12.5
    retries: { limit: 2, backoff: 10s }
    timeout: 1h30m
    nodes: 2
    priority: 5
  eval:
    needs: [train]
    command: [python3, eval.py]
"#;

    #[test]
    fn parses_a_full_workflow() {
        let w = parse(GOOD).unwrap();
        assert_eq!(w.objective, Objective::Cheapest);
        let t = &w.jobs["train"];
        assert_eq!(t.resources.gpus, 2);
        assert_eq!(t.resources.gpu_memory_bytes, Some(40 << 30));
        assert_eq!(t.constraints.spot, SpotPolicy::Forbidden);
        assert_eq!(t.retries, Retries { limit: 2, backoff_ms: 10_000 });
        assert_eq!(t.timeout_ms, Some(5_400_000));
        assert_eq!(t.nodes, 2);
        assert_eq!(w.jobs["prepare"].resources.memory_bytes, 512 << 20);
        assert_eq!(w.topological_order(), ["prepare", "train", "eval"]);
    }

    fn problems(yaml: &str) -> String {
        parse(yaml).unwrap_err().to_string()
    }

    #[test]
    fn inputs_and_outputs_are_checked() {
        let ok = parse(
            "name: w\njobs:\n  a:\n    command: [x]\n    inputs: [raw, 0123abcd]\n    outputs: [out]\n  b:\n    command: [x]\n    needs: [a]\n    inputs: [a.out, other.wf.x]\n",
        )
        .unwrap();
        let refs = ok.jobs["b"].input_refs(&ok.jobs);
        assert_eq!(
            refs[0],
            ("out".into(), InputRef::JobOutput { job: "a".into(), output: "out".into() })
        );
        assert_eq!(refs[1], ("other.wf.x".into(), InputRef::Dataset("other.wf.x".into())));
        let e = problems("name: w\njobs:\n  a:\n    command: [x]\n    outputs: [out]\n  b:\n    command: [x]\n    inputs: [a.out]\n");
        assert!(
            e.contains("job `b`, field `inputs`: `a.out` reads job `a`, which is not in `needs`"),
            "{e}"
        );
        let e = problems("name: w\njobs:\n  a:\n    command: [x]\n  b:\n    command: [x]\n    needs: [a]\n    inputs: [a.nope]\n");
        assert!(e.contains("job `a` has no output `nope`"), "{e}");
        let e = problems("name: w\njobs:\n  a:\n    command: [x]\n    inputs: [d, d]\n    outputs: [o, o, 'x/y']\n");
        assert!(e.contains("both appear as `d`"), "{e}");
        assert!(e.contains("output `o` listed twice"), "{e}");
        assert!(e.contains("field `outputs`: invalid output name"), "{e}");
    }

    #[test]
    fn unknown_fields_name_the_field_and_the_job() {
        let e = problems("name: w\njobs:\n  a:\n    command: [x]\n  b:\n    comand: [y]\n");
        assert!(e.contains("comand") && e.contains("job `b`"), "{e}");
        let e = problems("name: w\njobs:\n  a:\n    command: [x]\n    resources: { gpu: 1 }\n");
        assert!(e.contains("gpu") && e.contains("job `a`"), "{e}");
    }

    #[test]
    fn references_and_cycles() {
        let e = problems("name: w\njobs:\n  a:\n    command: [x]\n    needs: [ghost]\n");
        assert!(e.contains("job `a`, field `needs`: no job named `ghost`"), "{e}");
        let e = problems(
            "name: w\njobs:\n  a:\n    command: [x]\n    needs: [c]\n  b:\n    command: [x]\n    needs: [a]\n  c:\n    command: [x]\n    needs: [b]\n",
        );
        assert!(e.contains("dependency cycle: a -> c -> b -> a"), "{e}");
        let e = problems("name: w\njobs:\n  a:\n    command: [x]\n    needs: [a]\n");
        assert!(e.contains("cannot need itself"), "{e}");
    }

    #[test]
    fn impossible_resources_bad_sizes_and_durations() {
        let e = problems(
            "name: w\njobs:\n  a:\n    command: [x]\n    resources: { gpus: 65, memory: 10XB }\n    timeout: soon\n    retries: { limit: 1, backoff: 5 parsecs }\n",
        );
        for want in [
            "job `a`, field `resources.gpus`",
            "job `a`, field `resources.memory`: invalid size unit",
            "job `a`, field `timeout`: invalid duration \"soon\"",
            "job `a`, field `retries.backoff`",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        let e = problems(
            "name: w\njobs:\n  a:\n    command: [x]\n    resources: { gpu_model: H100 }\n",
        );
        assert!(e.contains("need gpus > 0"), "{e}");
        let e = problems("name: w\njobs:\n  a:\n    command: [x]\n    nodes: 0\n");
        assert!(e.contains("field `nodes`"), "{e}");
    }

    #[test]
    fn command_or_script_exactly_one() {
        assert!(problems("name: w\njobs:\n  a:\n    image: x\n").contains("needs a `command`"));
        assert!(problems("name: w\njobs:\n  a:\n    command: [x]\n    script: y\n")
            .contains("not both"));
        assert!(problems("name: w\njobs:\n  a:\n    command: []\n").contains("non-empty"));
        assert!(problems("name: w\njobs: {}\n").contains("at least one job"));
        assert!(problems("name: \"bad name\"\njobs:\n  a:\n    command: [x]\n")
            .contains("field `name`"));
    }

    #[test]
    fn malformed_yaml_is_an_error_not_a_panic() {
        for bad in
            ["", "[", "name: [\n", "jobs: 3", "\u{0}\u{1}", "name: w\njobs:\n  a: {command: [x]\n"]
        {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    /// A chain of `n` jobs, each needing the one before.
    fn chain(n: usize) -> String {
        let mut y = String::from("name: w\njobs:\n");
        for i in 0..n {
            y.push_str(&format!("  j{i}:\n    command: [x]\n"));
            if i > 0 {
                y.push_str(&format!("    needs: [j{}]\n", i - 1));
            }
        }
        y
    }

    #[test]
    fn long_chains_do_not_overflow_the_stack() {
        // 20,000 used to abort the coordinator in the recursive cycle search; run it on a
        // stack smaller than a tokio worker's to show the walk is iterative.
        let over = chain(20_000);
        let at_limit = chain(MAX_JOBS_PER_WORKFLOW);
        let t = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let e = parse(&over).unwrap_err().to_string();
                assert!(e.contains("20000 jobs; at most 10000 per workflow"), "{e}");
                let w = parse(&at_limit).unwrap();
                let order = w.topological_order();
                assert_eq!(order.len(), MAX_JOBS_PER_WORKFLOW);
                assert_eq!((order[0], order[order.len() - 1]), ("j0", "j9999"));
            })
            .unwrap();
        t.join().unwrap();
        // A long cycle is still found and named.
        let mut cyc = chain(5_000);
        cyc = cyc.replacen(
            "  j0:\n    command: [x]\n",
            "  j0:\n    command: [x]\n    needs: [j4999]\n",
            1,
        );
        let e = problems(&cyc);
        assert!(e.contains("dependency cycle: j0 -> j4999 -> j4998"), "{}", &e[..200.min(e.len())]);
    }

    #[test]
    fn alias_amplification_is_refused_before_it_is_built() {
        // One 100 KB anchored scalar used 60 times: 6 MB once expanded, from a 100 KB file.
        let big = "x".repeat(100_000);
        let mut y = format!("name: w\njobs:\n  a0:\n    script: &s \"{big}\"\n");
        for i in 1..60 {
            y.push_str(&format!("  a{i}:\n    script: *s\n"));
        }
        let e = problems(&y);
        assert!(e.contains("expands (YAML aliases included) to more than 4194304 bytes"), "{e}");
        // Aliases within the limit still work.
        let ok = "name: w\njobs:\n  a:\n    command: &c [echo, hi]\n  b:\n    command: *c\n";
        assert_eq!(
            parse(ok).unwrap().jobs["b"].run,
            Run::Command(vec!["echo".into(), "hi".into()])
        );
        let huge = format!("name: w\njobs:\n  a:\n    script: \"{}\"\n", "y".repeat(3 << 20));
        assert!(problems(&huge).contains("the limit is 2097152"));
    }

    #[test]
    fn script_env_inputs_and_outputs_are_bounded() {
        let script = "s".repeat(MAX_RUN_BYTES + 1);
        let e = problems(&format!("name: w\njobs:\n  a:\n    script: \"{script}\"\n"));
        assert!(e.contains("job `a`, field `script`: 262145 bytes; the limit is 262144"), "{e}");
        let arg = "c".repeat(MAX_RUN_BYTES / 2 + 1);
        let e = problems(&format!("name: w\njobs:\n  a:\n    command: [\"{arg}\", \"{arg}\"]\n"));
        assert!(e.contains("job `a`, field `command`: 262146 bytes"), "{e}");
        let v = "v".repeat(MAX_ENV_BYTES);
        let e = problems(&format!(
            "name: w\njobs:\n  a:\n    command: [x]\n    env: {{ K: \"{v}\" }}\n"
        ));
        assert!(e.contains("job `a`, field `env`: 65537 bytes; the limit is 65536"), "{e}");
        let ins: Vec<String> = (0..65).map(|i| format!("d{i}")).collect();
        let e = problems(&format!(
            "name: w\njobs:\n  a:\n    command: [x]\n    inputs: [{}]\n",
            ins.join(", ")
        ));
        assert!(e.contains("65 inputs; at most 64"), "{e}");
    }

    #[test]
    fn images_follow_the_oci_reference_grammar() {
        for good in [
            "busybox",
            "busybox:1.36",
            "library/busybox:latest",
            "docker.io/library/busybox",
            "localhost:5000/team/img:v1.2-rc_3",
            "ghcr.io/org/my-image__x.y:tag",
            "registry.example.com/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "pytorch/pytorch:2.5",
        ] {
            assert_eq!(validate_image_reference(good), Ok(()), "{good}");
        }
        for bad in [
            "--privileged",
            "-v",
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "bad image",
            "a//b",
            "img@sha256:short",
            "host:port/x",
            "x;rm -rf /",
            "-e=FOO",
        ] {
            assert!(validate_image_reference(bad).is_err(), "{bad:?} accepted");
        }
        let e = problems("name: w\njobs:\n  a:\n    image: \"--privileged\"\n    command: [-v, /:/host, busybox]\n");
        assert!(
            e.contains("job `a`, field `image`: \"--privileged\" is not an image reference"),
            "{e}"
        );
    }

    #[test]
    fn arrays_fan_out_by_count_or_matrix() {
        let w = parse(
            "name: w\njobs:\n  prep:\n    command: [x]\n    outputs: [o]\n  map:\n    needs: [prep]\n    command: [x]\n    parallel: 200\n    success: 95%\n    inputs: [{from: reads, shard: true}, prep.o]\n    outputs: [bam]\n  grid:\n    command: [x]\n    matrix: { lr: [0.1, 0.01], model: [small, large, xl], fp16: [true] }\n  merge:\n    needs: [map]\n    command: [x]\n    inputs: [{from: map.bam, as: bams}]\n",
        )
        .unwrap();
        let map = w.jobs["map"].array.as_ref().unwrap();
        assert_eq!((map.count, map.required()), (200, 190));
        assert!(w.jobs["map"].sharded("reads", &w.jobs));
        assert!(!w.jobs["map"].sharded("o", &w.jobs));
        let grid = w.jobs["grid"].array.as_ref().unwrap();
        assert_eq!((grid.count, grid.required()), (6, 6));
        // Axes in name order (fp16, lr, model); the last varies fastest.
        let env = |i| grid.member_env(i).into_iter().collect::<BTreeMap<_, _>>();
        let m4 = env(4);
        assert_eq!(m4["FLEETMESH_INDEX"], "4");
        assert_eq!(m4["FLEETMESH_COUNT"], "6");
        assert_eq!(m4["FLEETMESH_MATRIX_LR"], "0.01");
        assert_eq!(m4["FLEETMESH_MATRIX_MODEL"], "large");
        assert_eq!(m4["FLEETMESH_MATRIX_FP16"], "true");
        let all: std::collections::BTreeSet<_> = (0..6)
            .map(|i| {
                (env(i)["FLEETMESH_MATRIX_LR"].clone(), env(i)["FLEETMESH_MATRIX_MODEL"].clone())
            })
            .collect();
        assert_eq!(all.len(), 6, "every combination once");
        let refs = w.jobs["merge"].input_refs(&w.jobs);
        assert_eq!(
            refs,
            [("bams".to_string(), InputRef::JobOutput { job: "map".into(), output: "bam".into() })]
        );
        assert_eq!(member_name("map", 7), "map[7]");
        // Stored and read back (inputs stored as written: names stay plain strings).
        let json = serde_json::to_string(&w).unwrap();
        assert!(json.contains(r#""inputs":[{"from":"reads","shard":true},"prep.o"]"#), "{json}");
        assert_eq!(serde_json::from_str::<Workflow>(&json).unwrap(), w);
    }

    #[test]
    fn array_limits_and_mistakes_name_the_job_the_field_and_the_limit() {
        let e = problems("name: w\njobs:\n  a:\n    command: [x]\n    parallel: 10001\n");
        assert!(
            e.contains("job `a`, field `parallel`: 10001 members; an array has 1 to 10000 members"),
            "{e}"
        );
        let vals: Vec<String> = (0..101).map(|i| i.to_string()).collect();
        let e = problems(&format!(
            "name: w\njobs:\n  a:\n    command: [x]\n    matrix: {{ x: [{v}], y: [{v}] }}\n",
            v = vals.join(",")
        ));
        assert!(e.contains("job `a`, field `matrix`: 10201 members (the product of its axes); an array has 1 to 10000"), "{e}");
        for (yaml, want) in [
            ("parallel: 0", "field `parallel`: 0 members"),
            ("parallel: 2\n    matrix: {x: [1]}", "not both"),
            ("matrix: {}", "field `matrix`: needs at least one axis"),
            ("matrix: {x: []}", "field `matrix.x`: needs 1 to 10000 values"),
            ("matrix: {\"a-b\": [1]}", "field `matrix.a-b`: axis names"),
            ("success: 90%", "field `success`: set without `parallel` or `matrix`"),
            ("parallel: 3\n    success: 0%", "the share must be above 0%"),
            ("parallel: 3\n    success: lots", "invalid share \"lots\""),
            ("inputs: [{from: d, shard: true}]", "`d`: shard needs `parallel` or `matrix`"),
            ("inputs: [{from: d, as: \"../x\"}]", "is not a valid directory name"),
            ("inputs: [{from: d, mount: x}]", "unknown field `mount`"),
            ("inputs: [d, {from: e, as: d}]", "two inputs would both appear as `d`"),
        ] {
            let e = problems(&format!("name: w\njobs:\n  a:\n    command: [x]\n    {yaml}\n"));
            assert!(e.contains(want), "{yaml}: missing {want:?} in {e}");
            if !want.contains("unknown field") {
                assert!(e.contains("job `a`"), "{yaml}: {e}");
            }
        }
        let e = problems("name: w\njobs:\n  a:\n    command: [x]\n    parallel: 2\n    outputs: [o]\n  b:\n    command: [x]\n    needs: [a]\n    parallel: 2\n    inputs: [{from: a.o, shard: true}]\n");
        assert!(
            e.contains("job `b`, field `inputs`: `a.o`: an array's outputs cannot be sharded"),
            "{e}"
        );
        // Members count against the workflow's records: three arrays at the limit are too many.
        let e = problems("name: w\njobs:\n  a:\n    command: [x]\n    parallel: 10000\n  b:\n    command: [x]\n    parallel: 10000\n  c:\n    command: [x]\n    parallel: 10000\n");
        assert!(e.contains("30000 jobs and array members; at most 20000 per workflow"), "{e}");
        // An array at the limit is accepted.
        let w = parse("name: w\njobs:\n  a:\n    command: [x]\n    parallel: 10000\n").unwrap();
        assert_eq!(w.jobs["a"].array.as_ref().map(|a| a.count), Some(10_000));
    }

    #[test]
    fn sizes_and_globs() {
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("-1G").is_err());
        assert!(glob_match("*H100*", "NVIDIA H100 80GB HBM3"));
        assert!(glob_match("a100", "A100"));
        assert!(!glob_match("*A100*", "NVIDIA H100"));
        assert!(glob_match("NVIDIA ?100*", "nvidia h100 80gb"));
    }
}

#[cfg(test)]
mod examples {
    /// Every workflow shipped in `examples/` must validate.
    #[test]
    fn shipped_examples_validate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let w = super::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!w.jobs.is_empty());
                n += 1;
            }
        }
        assert!(n >= 3, "expected the example workflows in {}", dir.display());
    }
}
