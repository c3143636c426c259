//! Coordinator configuration: TOML file with the same keys as the flags; flags win.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::fleet::liveness::LivenessConfig;

/// Keys of the coordinator's TOML config file (kebab-case, like the flags).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub api_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub suspect_after: Option<String>,
    pub lost_after: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub history: Option<usize>,
    /// CA private key: enables join tokens, enrollment and renewal.
    pub ca_key: Option<PathBuf>,
    /// Lifetime of certificates issued by enrollment/renewal [default 24h].
    pub cert_ttl: Option<String>,
    /// Addresses agents should dial, put into join strings (HOST:PORT, comma-separated).
    pub advertise: Option<String>,
    /// Agents asked for a bid per auction.
    pub auction_top_k: Option<usize>,
    /// Size limit of the coordinator's own chunk store (`data put`), e.g. `100GiB`.
    pub store_limit: Option<String>,
    /// Capacity pools (`[[pool]]` tables; config file only).
    pub pool: Option<Vec<crate::autoscale::pools::RawPool>>,
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }
}

/// Resolved coordinator configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub liveness: LivenessConfig,
    pub heartbeat_interval: Duration,
    pub history: usize,
    pub ca_key: Option<PathBuf>,
    pub cert_ttl: Duration,
    pub advertise: Vec<String>,
    pub auction_top_k: usize,
    pub store_limit: u64,
    pub pools: Vec<crate::autoscale::pools::PoolSpec>,
}

fn dur(what: &str, s: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match s {
        None => Ok(default),
        Some(s) => humantime::parse_duration(&s)
            .map_err(|e| ConfigError(format!("{what}: invalid duration {s:?}: {e}"))),
    }
}

impl CoordinatorConfig {
    pub fn resolve(file: FileConfig, flags: FileConfig) -> Result<Self, ConfigError> {
        let missing = |k: &str| ConfigError(format!("--{k} is required (flag or config file)"));
        let defaults = LivenessConfig::default();
        let liveness = LivenessConfig {
            suspect_after: dur(
                "suspect-after",
                flags.suspect_after.or(file.suspect_after),
                defaults.suspect_after,
            )?,
            lost_after: dur(
                "lost-after",
                flags.lost_after.or(file.lost_after),
                defaults.lost_after,
            )?,
            tick: defaults.tick,
        };
        if liveness.suspect_after >= liveness.lost_after {
            return Err(ConfigError("suspect-after must be shorter than lost-after".into()));
        }
        let heartbeat_interval = dur(
            "heartbeat-interval",
            flags.heartbeat_interval.or(file.heartbeat_interval),
            Duration::from_millis(500),
        )?;
        if heartbeat_interval * 2 > liveness.suspect_after {
            return Err(ConfigError(
                "heartbeat-interval must be at most half of suspect-after".into(),
            ));
        }
        let cert_ttl =
            dur("cert-ttl", flags.cert_ttl.or(file.cert_ttl), Duration::from_secs(24 * 3600))?;
        if cert_ttl < Duration::from_secs(2) {
            return Err(ConfigError("cert-ttl must be at least 2s".into()));
        }
        let listen = flags.listen.or(file.listen).unwrap_or_else(|| ([0, 0, 0, 0], 7400).into());
        let advertise: Vec<String> = match flags.advertise.or(file.advertise) {
            Some(a) => {
                a.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
            }
            None if !listen.ip().is_unspecified() => vec![listen.to_string()],
            None => Vec::new(),
        };
        Ok(Self {
            listen: flags.listen.or(file.listen).unwrap_or_else(|| ([0, 0, 0, 0], 7400).into()),
            api_listen: flags
                .api_listen
                .or(file.api_listen)
                .unwrap_or_else(|| ([127, 0, 0, 1], 7401).into()),
            data_dir: flags
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/fleetmesh")),
            ca: flags.ca.or(file.ca).ok_or_else(|| missing("ca"))?,
            cert: flags.cert.or(file.cert).ok_or_else(|| missing("cert"))?,
            key: flags.key.or(file.key).ok_or_else(|| missing("key"))?,
            liveness,
            heartbeat_interval,
            history: flags.history.or(file.history).unwrap_or(120),
            ca_key: flags.ca_key.or(file.ca_key),
            cert_ttl,
            advertise,
            auction_top_k: flags
                .auction_top_k
                .or(file.auction_top_k)
                .unwrap_or(crate::scheduler::DEFAULT_TOP_K),
            pools: crate::autoscale::pools::validate(&file.pool.unwrap_or_default())
                .map_err(ConfigError)?,
            store_limit: match flags.store_limit.or(file.store_limit) {
                Some(s) => fleetmesh_protocol::workflow::parse_size(&s)
                    .map_err(|e| ConfigError(format!("store-limit: {e}")))?,
                None => 100 << 30,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> FileConfig {
        FileConfig {
            ca: Some("ca.pem".into()),
            cert: Some("c.pem".into()),
            key: Some("c.key".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_match_the_documented_ports_and_timeouts() {
        let c = CoordinatorConfig::resolve(FileConfig::default(), creds()).unwrap();
        assert_eq!(c.listen.port(), 7400);
        assert_eq!(c.api_listen, "127.0.0.1:7401".parse().unwrap());
        assert_eq!(c.liveness, LivenessConfig::default());
        assert_eq!(c.heartbeat_interval, Duration::from_millis(500));
    }

    #[test]
    fn toml_file_is_read_and_inconsistent_timeouts_rejected() {
        let file: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\napi-listen = \"127.0.0.1:9001\"\nlost-after = \"5s\"\n",
        )
        .unwrap();
        let c = CoordinatorConfig::resolve(file, creds()).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.liveness.lost_after, Duration::from_secs(5));
        let flags = FileConfig {
            suspect_after: Some("3s".into()),
            lost_after: Some("2s".into()),
            ..creds()
        };
        let e = CoordinatorConfig::resolve(FileConfig::default(), flags).unwrap_err().to_string();
        assert!(e.contains("suspect-after must be shorter than lost-after"), "{e}");
        assert!(toml::from_str::<FileConfig>("listen = \"nonsense\"").is_err());
    }
}
