//! Where the API is and who we are: flags, environment, then the CLI config file.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use fleetmesh_api::client::ApiClient;
use fleetmesh_protocol::tls::TlsIdentity;
use serde::Deserialize;

#[derive(Args, Debug)]
pub struct ConnArgs {
    /// Coordinator API, e.g. https://127.0.0.1:7401.
    #[arg(long, global = true, env = "FLEETMESH_API")]
    api: Option<String>,
    /// Mesh CA certificate.
    #[arg(long, global = true, env = "FLEETMESH_CA")]
    ca: Option<PathBuf>,
    /// Operator certificate.
    #[arg(long, global = true, env = "FLEETMESH_CERT")]
    cert: Option<PathBuf>,
    /// Operator private key.
    #[arg(long, global = true, env = "FLEETMESH_KEY")]
    key: Option<PathBuf>,
    /// CLI config file [default: <config dir>/fleetmesh/config.toml].
    #[arg(long, global = true, env = "FLEETMESH_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CliConfigFile {
    api: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl ConnArgs {
    /// The config file's settings (none when the default file does not exist).
    fn file(&self) -> Result<CliConfigFile> {
        let path = self
            .config
            .clone()
            .or_else(|| dirs::config_dir().map(|d| d.join("fleetmesh").join("config.toml")));
        match &path {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str::<CliConfigFile>(&text)
                    .with_context(|| format!("parsing {}", p.display()))
            }
            Some(p) if self.config.is_some() => {
                bail!("config file {} does not exist", p.display())
            }
            _ => Ok(CliConfigFile::default()),
        }
    }

    /// A client for the API, or which setting is missing.
    pub fn client(&self) -> Result<ApiClient> {
        let file = self.file()?;
        let need = |what: &str, env: &str| {
            anyhow!(
                "no {what}: pass --{what}, set {env}, or put `{what} = ...` in the CLI config file"
            )
        };
        let api = self.api.clone().or(file.api).ok_or_else(|| need("api", "FLEETMESH_API"))?;
        let ca = self.ca.clone().or(file.ca).ok_or_else(|| need("ca", "FLEETMESH_CA"))?;
        let cert = self.cert.clone().or(file.cert).ok_or_else(|| need("cert", "FLEETMESH_CERT"))?;
        let key = self.key.clone().or(file.key).ok_or_else(|| need("key", "FLEETMESH_KEY"))?;
        let tls = TlsIdentity::load(&ca, &cert, &key)?;
        Ok(ApiClient::new(&api, &tls)?)
    }
}
