//! Capacity pools as the coordinator's config declares them (`[[pool]]` tables), and
//! their validation: every problem names the pool and the field.
//!
//! ```toml
//! [[pool]]
//! name = "aws-eu-spot"
//! provider = "aws"
//! region = "eu-west-1"
//! jurisdiction = "EU"
//! labels = { tier = "burst" }
//! gpus = "8 x H100-80GB"          # N x MODEL-MEM; "0" for CPU-only nodes
//! cpus = 96
//! memory = "1TiB"
//! price-per-hour = 12.5            # per GPU-hour, as agents price
//! spot = true
//! min-nodes = 0
//! max-nodes = 16
//! boot-timeout = "10m"
//! idle-timeout = "15m"
//! launch = ["/usr/lib/fleetmesh/pools/aws-ec2", "launch"]
//! terminate = ["/usr/lib/fleetmesh/pools/aws-ec2", "terminate"]
//! ```

use std::collections::BTreeMap;

use fleetmesh_protocol::identity::validate_label;
use serde::Deserialize;

pub use fleetmesh_api::pools::PoolSpec;

/// The label a pool node's certificate carries: which pool it came from.
pub const POOL_LABEL: &str = "fleetmesh.pool";
/// Most nodes one pool may have.
pub const MAX_POOL_NODES: u32 = 10_000;
/// Most GPUs one node shape may have.
const MAX_NODE_GPUS: u32 = 64;

/// A `[[pool]]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawPool {
    pub name: String,
    pub provider: Option<String>,
    pub region: Option<String>,
    pub jurisdiction: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub gpus: Option<String>,
    pub cpus: Option<u32>,
    pub memory: Option<String>,
    pub price_per_hour: Option<f64>,
    #[serde(default)]
    pub spot: bool,
    pub min_nodes: Option<u32>,
    pub max_nodes: Option<u32>,
    pub boot_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    #[serde(default)]
    pub launch: Vec<String>,
    #[serde(default)]
    pub terminate: Vec<String>,
}

/// Defaults for what a pool leaves out.
const DEFAULT_BOOT_TIMEOUT_MS: u64 = 10 * 60_000;
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 15 * 60_000;
const DEFAULT_CPUS: u32 = 8;
const DEFAULT_MEMORY: u64 = 32 << 30;

/// Parse `N x MODEL-MEM` (`8 x H100-80GB`, `8xH100-80GB`, `0`).
pub fn parse_gpus(s: &str) -> Result<(u32, Option<String>, u64), String> {
    let t = s.trim();
    if t == "0" {
        return Ok((0, None, 0));
    }
    let bad = || format!("{s:?} is not N x MODEL-MEM (e.g. 8 x H100-80GB, or 0)");
    let (n, shape) = t.split_once(['x', 'X']).ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    let (model, mem) = shape.trim().rsplit_once('-').ok_or_else(bad)?;
    let mem = fleetmesh_protocol::workflow::parse_size(mem)?;
    if n == 0 || n > MAX_NODE_GPUS || model.trim().is_empty() {
        return Err(bad());
    }
    Ok((n, Some(model.trim().to_string()), mem))
}

fn duration_ms(s: &Option<String>, default: u64) -> Result<u64, String> {
    match s {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s)
            .map(|d| d.as_millis() as u64)
            .map_err(|e| format!("invalid duration {s:?}: {e}")),
    }
}

/// Validate every pool; all problems, each as `pool NAME, field FIELD: why`.
pub fn validate(raw: &[RawPool]) -> Result<Vec<PoolSpec>, String> {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for r in raw {
        let mut bad = |field: &str, why: String| {
            problems.push(format!("pool {:?}, field `{field}`: {why}", r.name));
        };
        if validate_label("pool name", &r.name).is_err() {
            bad("name", "letters, digits, `.`, `_` and `-`, at most 63".into());
        } else if !names.insert(r.name.clone()) {
            bad("name", "two pools have this name".into());
        }
        for (k, v) in &r.labels {
            if validate_label("label", k).is_err() || validate_label("label", v).is_err() {
                bad("labels", format!("{k}={v} is not a valid label"));
            }
        }
        let (gpus, gpu_model, gpu_memory_bytes) = parse_gpus(r.gpus.as_deref().unwrap_or("0"))
            .unwrap_or_else(|e| {
                bad("gpus", e);
                (0, None, 0)
            });
        let memory_bytes = match r.memory.as_deref().map(fleetmesh_protocol::workflow::parse_size) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                bad("memory", e);
                0
            }
            None => DEFAULT_MEMORY,
        };
        let price = r.price_per_hour.unwrap_or(1.0);
        if !(price >= 0.0 && price.is_finite()) {
            bad("price-per-hour", "must be a non-negative number".into());
        }
        let (min_nodes, max_nodes) = (r.min_nodes.unwrap_or(0), r.max_nodes.unwrap_or(1));
        if max_nodes == 0 || max_nodes > MAX_POOL_NODES {
            bad("max-nodes", format!("must be 1 to {MAX_POOL_NODES}"));
        }
        if min_nodes > max_nodes {
            bad("min-nodes", format!("{min_nodes} is more than max-nodes {max_nodes}"));
        }
        let boot = duration_ms(&r.boot_timeout, DEFAULT_BOOT_TIMEOUT_MS).unwrap_or_else(|e| {
            bad("boot-timeout", e);
            0
        });
        let idle = duration_ms(&r.idle_timeout, DEFAULT_IDLE_TIMEOUT_MS).unwrap_or_else(|e| {
            bad("idle-timeout", e);
            0
        });
        if r.launch.is_empty() || r.launch[0].is_empty() {
            bad("launch", "the launch program's argv, e.g. [\"/path/prog\", \"launch\"]".into());
        }
        if r.terminate.is_empty() || r.terminate[0].is_empty() {
            bad("terminate", "the terminate program's argv".into());
        }
        out.push(PoolSpec {
            name: r.name.clone(),
            provider: r.provider.clone(),
            region: r.region.clone(),
            jurisdiction: r.jurisdiction.clone(),
            labels: r.labels.clone(),
            gpus,
            gpu_model,
            gpu_memory_bytes,
            cpus: r.cpus.unwrap_or(DEFAULT_CPUS).max(1),
            memory_bytes,
            price_per_hour: price,
            spot: r.spot,
            min_nodes,
            max_nodes,
            boot_timeout_ms: boot,
            idle_timeout_ms: idle,
            launch: r.launch.clone(),
            terminate: r.terminate.clone(),
        });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(toml_text: &str) -> Vec<RawPool> {
        #[derive(Deserialize)]
        struct F {
            pool: Vec<RawPool>,
        }
        toml::from_str::<F>(toml_text).unwrap().pool
    }

    #[test]
    fn a_full_pool_is_read_in_canonical_units() {
        let p = validate(&raw(r#"
            [[pool]]
            name = "aws-eu"
            provider = "aws"
            region = "eu-west-1"
            jurisdiction = "EU"
            labels = { tier = "burst" }
            gpus = "8 x H100-80GB"
            cpus = 96
            memory = "1TiB"
            price-per-hour = 12.5
            spot = true
            max-nodes = 16
            boot-timeout = "90s"
            idle-timeout = "5m"
            launch = ["/bin/prog", "launch"]
            terminate = ["/bin/prog", "terminate"]
            "#))
        .unwrap();
        let p = &p[0];
        assert_eq!(
            (p.gpus, p.gpu_model.as_deref(), p.gpu_memory_bytes),
            (8, Some("H100"), 80_000_000_000)
        );
        assert_eq!((p.cpus, p.memory_bytes, p.max_nodes), (96, 1 << 40, 16));
        assert_eq!((p.boot_timeout_ms, p.idle_timeout_ms), (90_000, 300_000));
        assert!(p.spot);
        assert_eq!(parse_gpus("2xA100-40GiB").unwrap(), (2, Some("A100".into()), 40 << 30));
        assert_eq!(parse_gpus("0").unwrap(), (0, None, 0));
    }

    #[test]
    fn every_bad_field_is_named_with_its_pool() {
        let e = validate(&raw(r#"
            [[pool]]
            name = "a"
            gpus = "lots"
            memory = "10XB"
            min-nodes = 5
            max-nodes = 2
            boot-timeout = "soon"
            [[pool]]
            name = "a"
            launch = ["x"]
            terminate = ["y"]
            price-per-hour = -1.0
            "#))
        .unwrap_err();
        for want in [
            "pool \"a\", field `gpus`: \"lots\" is not N x MODEL-MEM",
            "pool \"a\", field `memory`",
            "pool \"a\", field `min-nodes`: 5 is more than max-nodes 2",
            "pool \"a\", field `boot-timeout`: invalid duration \"soon\"",
            "pool \"a\", field `launch`",
            "pool \"a\", field `name`: two pools have this name",
            "pool \"a\", field `price-per-hour`",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct F {
            pool: Vec<RawPool>,
        }
        let e = toml::from_str::<F>("[[pool]]\nname = \"a\"\nmax-nodez = 3\n").unwrap_err();
        assert!(e.to_string().contains("max-nodez"), "{e}");
    }
}
