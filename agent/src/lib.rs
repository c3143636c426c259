//! Fleetmesh node agent.
//!
//! The agent reads GPU telemetry (NVML, or an explicitly selected simulated source) and
//! host telemetry (sysinfo), connects to the coordinator over mutual-TLS QUIC, says hello,
//! sends its inventory and then telemetry at a fixed interval, and reconnects forever with
//! backoff. `main.rs` is a thin shell around [`run`] and [`probe`].

#![warn(clippy::too_many_lines, clippy::too_many_arguments)]

pub mod attempts;
pub mod backoff;
pub mod bidding;
pub mod config;
pub mod data;
pub mod enroll;
pub mod gpu;
pub mod host;
pub mod interruption;
pub mod jobs;
pub mod outbox;
pub mod sampler;
pub mod sandbox;
pub mod session;
pub mod shim;

use std::path::PathBuf;
use std::sync::Arc;

use fleetmesh_protocol::tls::TlsIdentity;
use fleetmesh_protocol::{Inventory, TelemetryReport};
use serde::Serialize;
use tokio::sync::watch;

pub use config::AgentConfig;
pub use session::{AgentStats, ConnectOptions};

/// Agent failures that stop it (configuration problems only: a down coordinator never
/// stops the agent).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] fleetmesh_protocol::tls::TlsError),
    #[error(transparent)]
    Spec(#[from] gpu::simulated::SpecError),
    #[error(transparent)]
    Enroll(#[from] enroll::EnrollFailure),
    #[error("data dir {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("configuration: {0}")]
    Sandbox(#[from] sandbox::SandboxError),
}

/// Where the agent's identity comes from.
enum IdentitySource {
    /// Pre-issued certificate files (offline installs); no renewal.
    PreIssued { ca: PathBuf, cert: PathBuf, key: PathBuf },
    /// Enrolled identity in the data dir, renewed over the session.
    Enrolled(enroll::IdentityFiles),
}

fn default_node_name() -> String {
    let host = sysinfo::System::host_name().unwrap_or_else(|_| "node".into());
    let clean: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .take(63)
        .collect();
    if clean.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        clean
    } else {
        format!("node-{}", clean.trim_start_matches(|c: char| !c.is_ascii_alphanumeric()))
    }
}

/// Enroll with the join string, retrying while no coordinator answers. Refusals are final.
async fn enroll_with_retry(
    files: &enroll::IdentityFiles,
    join: &fleetmesh_protocol::enroll::JoinString,
    name: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<TlsIdentity>, AgentError> {
    let key_pem = files.key_pem()?;
    let backoff = backoff::Backoff::default();
    let mut attempt = 0;
    loop {
        tracing::info!(token = %join.token_id, coordinators = ?join.coordinators, "enrolling with the join token");
        match enroll::enroll(join, &key_pem, name, &fleetmesh_protocol::Attributes::default()).await
        {
            Ok(e) => {
                files.save(&e)?;
                let tls = files.load()?;
                tracing::info!(
                    agent_id = %e.name,
                    spiffe_id = %tls.identity.spiffe_id(),
                    region = ?tls.identity.attributes.region,
                    "enrolled"
                );
                return Ok(Some(tls));
            }
            Err(e) if e.is_transient() => {
                let delay = backoff.delay(attempt, rand::random::<f64>());
                attempt += 1;
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "enrollment failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return Ok(None);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "enrollment failed");
                return Err(e.into());
            }
        }
    }
}

/// Look for a spot interruption notice until one comes, and tell the coordinator once.
async fn watch_interruption(source: interruption::NoticeSource, outbox: Arc<outbox::Outbox>) {
    loop {
        tokio::time::sleep(interruption::NOTICE_POLL).await;
        let Some(text) = interruption::read(&source).await else { continue };
        let Some(grace_ms) = interruption::parse_notice(&text, fleetmesh_data::now_unix_ms())
        else {
            continue;
        };
        let reason =
            format!("interruption notice: {}", text.trim().chars().take(200).collect::<String>());
        tracing::warn!(grace_ms, %reason, "this node is being interrupted: no new work, attempts move elsewhere");
        outbox.push(fleetmesh_protocol::AgentMessage::Interrupted { grace_ms, reason });
        return;
    }
}

/// How long an agent with an expired pre-issued certificate waits before checking again.
const EXPIRED_CERT_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Run the agent until `shutdown` becomes true.
pub async fn run(
    config: AgentConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| AgentError::DataDir { path: config.data_dir.clone(), source })?;
    let source = match (&config.ca, &config.cert, &config.key) {
        (Some(ca), Some(cert), Some(key)) => {
            IdentitySource::PreIssued { ca: ca.clone(), cert: cert.clone(), key: key.clone() }
        }
        _ => IdentitySource::Enrolled(enroll::IdentityFiles::new(&config.data_dir)),
    };
    let requested_name = config.name.clone().unwrap_or_else(default_node_name);
    let mut gpu_and_sampler: Option<sampler::NodeSampler> = None;
    let stats = Arc::new(AgentStats::default());
    // Running attempts outlive sessions and certificate changes.
    let jobs = start_jobs(&config).await?;
    if let Some(source) = config.interruption_notice.clone() {
        tokio::spawn(watch_interruption(source, jobs.outbox.clone()));
    }
    loop {
        let Some(tls) = current_identity(&config, &source, &requested_name, &mut shutdown).await?
        else {
            return Ok(());
        };
        let coordinator = match (&config.coordinator, &config.join) {
            (Some(c), _) => c.clone(),
            (None, Some(j)) => j.coordinators.first().cloned().unwrap_or_default(),
            (None, None) => return Err(AgentError::Config("--coordinator is required".into())),
        };
        let opts = connect_options(&config, &source, &jobs, coordinator.clone(), tls)?;
        ensure_data_plane(&config, &jobs, &opts.tls)?;
        let sampler = match gpu_and_sampler.as_mut() {
            Some(s) => s,
            None => gpu_and_sampler.insert(node_sampler(&config, &jobs, &opts.claimed_name)?),
        };
        tracing::info!(
            agent_id = %opts.claimed_name,
            coordinator = %coordinator,
            spiffe_id = %opts.tls.identity.spiffe_id(),
            "agent starting"
        );
        match session::run_forever(opts, sampler, stats.clone(), shutdown.clone()).await {
            session::RunEnd::Shutdown => {
                jobs.shutdown().await;
                return Ok(());
            }
            session::RunEnd::CertificateExpired => {
                if matches!(source, IdentitySource::PreIssued { .. }) {
                    tracing::error!("the pre-issued certificate has expired; replace it (checking again in 30 s)");
                    tokio::select! {
                        _ = tokio::time::sleep(EXPIRED_CERT_RECHECK) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
            }
        }
    }
}

/// The job table, with the container runtime probed, the job user's sandbox laid out
/// and self-fencing set up.
async fn start_jobs(config: &AgentConfig) -> Result<Arc<jobs::Jobs>, AgentError> {
    // Probing runs `<runtime> info` (up to 15 s): off the async workers.
    let choice = config.container_runtime.clone();
    let launcher = config.job_launcher;
    let runtime =
        tokio::task::spawn_blocking(move || jobs::find_container_runtime(&choice, launcher))
            .await
            .map_err(|e| AgentError::Config(format!("container-runtime probe: {e}")))?
            .map_err(|e| AgentError::Config(format!("container-runtime: {e}")))?;
    tracing::info!(
        runtime = runtime.as_deref().unwrap_or("none"),
        "container runtime for image jobs"
    );
    // Before anything private is written: the job user must find no way in.
    let job_user = match &config.job_user {
        Some(name) => {
            let u = sandbox::lookup(name)?;
            sandbox::prepare_data_dir(&config.data_dir)
                .map_err(|source| AgentError::DataDir { path: config.data_dir.clone(), source })?;
            tracing::info!(user = %u.name, uid = u.uid, gid = u.gid, "jobs run as an unprivileged user");
            Some(u)
        }
        None => None,
    };
    let jobs = jobs::Jobs::new(&config.data_dir, config.price_per_hour, config.spot, runtime);
    if let Some(u) = job_user {
        jobs.set_job_user(u, config.job_uid_pool.clone());
    }
    jobs.set_launcher(config.job_launcher);
    if let Some(after) = config.stop_jobs_after_disconnect {
        jobs.fence_after_disconnect(after);
    }
    Ok(jobs)
}

/// An identity that is valid now: the pre-issued one, the stored one, or a new one by
/// enrolling with the join string. `None` when shut down while enrolling.
async fn current_identity(
    config: &AgentConfig,
    source: &IdentitySource,
    requested_name: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<TlsIdentity>, AgentError> {
    let tls = match source {
        IdentitySource::PreIssued { ca, cert, key } => TlsIdentity::load(ca, cert, key)?,
        IdentitySource::Enrolled(files) => {
            let stored = if files.complete() { Some(files.load()?) } else { None };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            match stored {
                Some(tls) if tls.identity.not_after_unix > now => {
                    tracing::info!(spiffe_id = %tls.identity.spiffe_id(), "using the stored certificate");
                    tls
                }
                stored => {
                    let Some(join) = &config.join else {
                        return Err(AgentError::Config(match stored {
                            Some(_) => "the stored certificate has expired and no --join string is configured to re-enroll".into(),
                            None => "no identity yet: pass --join JOIN_STRING (from `fleetmesh tokens create`)".into(),
                        }));
                    };
                    if stored.is_some() {
                        tracing::warn!("the stored certificate has expired: re-enrolling");
                    }
                    match enroll_with_retry(files, join, requested_name, shutdown).await? {
                        Some(tls) => tls,
                        None => return Ok(None),
                    }
                }
            }
        }
    };
    if tls.identity.kind != fleetmesh_protocol::PeerKind::Agent {
        return Err(AgentError::Config(format!(
            "the certificate is for a {}; the agent needs an agent certificate",
            tls.identity.kind
        )));
    }
    Ok(Some(tls))
}

/// How sessions run with this identity: name, intervals, jobs, renewal.
fn connect_options(
    config: &AgentConfig,
    source: &IdentitySource,
    jobs: &Arc<jobs::Jobs>,
    coordinator: String,
    tls: TlsIdentity,
) -> Result<ConnectOptions, AgentError> {
    let mut opts = ConnectOptions::new(coordinator, tls);
    if let Some(name) = &config.name {
        if matches!(source, IdentitySource::PreIssued { .. }) {
            opts.claimed_name = name.clone();
        }
    }
    opts.telemetry_interval = config.telemetry_interval;
    opts.backoff.max = config.reconnect_max;
    opts.jobs = Some(jobs.clone());
    if let IdentitySource::Enrolled(files) = source {
        opts.renewal = Some(session::Renewal {
            key_pem: files.key_pem()?,
            files: files.clone(),
            updated: Default::default(),
        });
    }
    Ok(opts)
}

/// Start the data plane the first time (then recover the attempts that survived us,
/// before the first session reports what runs here); later, give it the new identity.
fn ensure_data_plane(
    config: &AgentConfig,
    jobs: &Arc<jobs::Jobs>,
    tls: &TlsIdentity,
) -> Result<(), AgentError> {
    if let Some(d) = jobs.data() {
        d.update_tls(tls);
        return Ok(());
    }
    let d = data::DataPlane::start(&config.data_dir, &config.data, tls, jobs.outbox.clone())
        .map_err(|e| AgentError::Config(format!("data plane: {e}")))?;
    let a = &tls.identity.attributes;
    jobs.set_data(d, (a.provider.clone(), a.region.clone()));
    jobs.recover();
    Ok(())
}

/// The GPU backend and the sampler with what this node offers.
fn node_sampler(
    config: &AgentConfig,
    jobs: &Arc<jobs::Jobs>,
    name: &str,
) -> Result<sampler::NodeSampler, AgentError> {
    let gpu = gpu::select_backend(config.simulate_gpus.as_deref(), name)?;
    let mut s = sampler::NodeSampler::new(gpu, &config.data_dir);
    s.offer = sampler::NodeOffer {
        price_per_hour: config.price_per_hour,
        spot: config.spot,
        labels: config.labels.clone(),
        container_runtime: jobs.container_runtime(),
        data_port: jobs.data().and_then(|d| d.port()),
        cpus: config.cpus,
        memory_bytes: config.memory_bytes,
        advertise_addr: config.advertise_addr.map(|ip| ip.to_string()),
    };
    Ok(s)
}

/// What `fleetmesh-agent probe` prints.
#[derive(Debug, Serialize)]
pub struct ProbeOutput {
    pub inventory: Inventory,
    pub telemetry: TelemetryReport,
}

/// Read inventory and one telemetry sample without connecting anywhere.
pub fn probe(config: &config::ProbeConfig) -> Result<ProbeOutput, AgentError> {
    let name = sysinfo::System::host_name().unwrap_or_else(|_| "probe".into());
    let gpu = gpu::select_backend(config.simulate_gpus.as_deref(), &name)?;
    let mut s = sampler::NodeSampler::new(gpu, &config.data_dir);
    let inventory = sampler::Sampler::inventory(&mut s);
    // CPU utilisation needs two readings some time apart.
    std::thread::sleep(std::time::Duration::from_millis(250));
    let telemetry = sampler::Sampler::sample(&mut s, 1);
    Ok(ProbeOutput { inventory, telemetry })
}
