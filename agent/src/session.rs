//! The agent's control-plane connection: connect, hello, inventory, telemetry, and the
//! reconnect loop around it.
//!
//! One session = one QUIC connection with one bidirectional control stream. The agent
//! writes `AgentMessage` frames; a reader task turns coordinator frames into channel
//! messages so the writer loop never does a non-cancel-safe read inside `select!`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetmesh_protocol::codec::close_code;
use fleetmesh_protocol::tls::{peer_identity, TlsIdentity};
use fleetmesh_protocol::{
    AgentMessage, CodecError, CoordinatorMessage, Hello, PeerKind, ALPN_CTL, PROTOCOL_VERSION,
    SOFTWARE_VERSION,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::sampler::Sampler;

/// QUIC keep-alive: well under the idle timeout so a quiet but healthy path stays open.
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// QUIC idle timeout: a dead path (or a coordinator killed without closing) is noticed by
/// the transport within this time; keep-alives every second keep a healthy one open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// How long one connection attempt may take. Without it a connect to a coordinator that
/// is down waits for the QUIC idle timeout, delaying the reconnect after it comes back.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for the coordinator's answer to a hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot resolve coordinator address {0:?}")]
    Resolve(String),
    #[error("cannot connect to coordinator {addr}: {msg}")]
    Connect { addr: String, msg: String },
    #[error("coordinator {addr} presented an unacceptable identity: {msg}")]
    ServerIdentity { addr: String, msg: String },
    #[error("coordinator refused the session: {0}")]
    Rejected(String),
    #[error("protocol version mismatch: agent speaks {agent}, coordinator speaks {coordinator}")]
    VersionMismatch { agent: u32, coordinator: u32 },
    #[error("no answer to hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    #[error("protocol error: {0}")]
    Protocol(#[from] CodecError),
    #[error("unexpected message from coordinator: {0}")]
    Unexpected(String),
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Settings for connecting to a coordinator.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `HOST:PORT` of the coordinator's control endpoint.
    pub coordinator: String,
    pub tls: TlsIdentity,
    /// Name sent in the hello; normally the name in our certificate.
    pub claimed_name: String,
    /// Protocol version sent in the hello (tests override it to check the mismatch path).
    pub protocol_version: u32,
    pub telemetry_interval: Duration,
    pub backoff: Backoff,
    /// Renew the certificate over the session (enrolled agents).
    pub renewal: Option<Renewal>,
    /// Job execution (bids, awards, running attempts); `None` = telemetry only.
    pub jobs: Option<Arc<crate::jobs::Jobs>>,
}

/// Certificate renewal over the control session: at two thirds of the certificate's
/// lifetime the agent sends a CSR for its (unchanged) key; the renewed certificate is
/// written to disk atomically and used for the next connection. The running session is
/// not interrupted.
#[derive(Clone)]
pub struct Renewal {
    pub key_pem: String,
    pub files: crate::enroll::IdentityFiles,
    /// A renewed identity waiting to be used by the next connection.
    pub updated: Arc<std::sync::Mutex<Option<TlsIdentity>>>,
}

impl std::fmt::Debug for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewal").field("files", &self.files).finish_non_exhaustive()
    }
}

fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Time until two thirds of the certificate's lifetime have passed (zero if already).
pub fn renew_delay(id: &fleetmesh_protocol::PeerIdentity) -> Duration {
    let (nb, na) = (id.not_before_unix as f64, id.not_after_unix as f64);
    let at = nb + (na - nb) * 2.0 / 3.0;
    Duration::from_secs_f64((at - unix_now_f64()).max(0.0))
}

/// Wait before asking again after a refused renewal.
fn renew_retry(id: &fleetmesh_protocol::PeerIdentity) -> Duration {
    let lifetime = (id.not_after_unix - id.not_before_unix).max(1) as f64;
    Duration::from_secs_f64((lifetime / 10.0).clamp(1.0, 30.0))
}

fn apply_renewal(
    r: &Renewal,
    ca_pem: &str,
    current: &str,
    cert_pem: &str,
) -> Result<TlsIdentity, String> {
    let p = std::path::Path::new("renewed");
    let id = TlsIdentity::from_pem(
        p,
        ca_pem.as_bytes(),
        p,
        cert_pem.as_bytes(),
        p,
        r.key_pem.as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    if id.identity.name != current || id.identity.kind != PeerKind::Agent {
        return Err(format!(
            "renewed certificate is for {}, not agent {current}",
            id.identity.spiffe_id()
        ));
    }
    crate::enroll::IdentityFiles::write_atomic(&r.files.cert(), cert_pem)
        .map_err(|e| e.to_string())?;
    Ok(id)
}

impl ConnectOptions {
    pub fn new(coordinator: String, tls: TlsIdentity) -> Self {
        let claimed_name = tls.identity.name.clone();
        Self {
            coordinator,
            tls,
            claimed_name,
            protocol_version: PROTOCOL_VERSION,
            telemetry_interval: Duration::from_secs(1),
            backoff: Backoff::default(),
            renewal: None,
            jobs: None,
        }
    }
}

/// Counters shared with whoever runs the agent (CLI logs, benchmarks, tests).
#[derive(Debug, Default)]
pub struct AgentStats {
    pub sessions_established: AtomicU64,
    pub reports_sent: AtomicU64,
    pub connect_failures: AtomicU64,
}

/// Build a client endpoint bound to an ephemeral port of the right address family.
pub fn client_endpoint(
    opts: &ConnectOptions,
    remote: SocketAddr,
) -> Result<quinn::Endpoint, SessionError> {
    let tls =
        opts.tls.client_config(&[ALPN_CTL], true).map_err(|e| SessionError::Tls(e.to_string()))?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| SessionError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    cfg.transport_config(Arc::new(transport));
    let bind: SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut ep = quinn::Endpoint::client(bind)
        .map_err(|e| SessionError::Connect { addr: remote.to_string(), msg: e.to_string() })?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

async fn resolve(target: &str) -> Result<(SocketAddr, String), SessionError> {
    let host = match target.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => return Err(SessionError::Resolve(target.to_string())),
    };
    let addr = tokio::net::lookup_host(target)
        .await
        .map_err(|_| SessionError::Resolve(target.to_string()))?
        .next()
        .ok_or_else(|| SessionError::Resolve(target.to_string()))?;
    Ok((addr, host))
}

async fn write_msg(send: &mut quinn::SendStream, msg: &AgentMessage) -> Result<(), SessionError> {
    fleetmesh_data::framing::write_frame(send, msg, None).await.map_err(SessionError::from)
}

/// Read one frame; `Ok(None)` on a clean end of stream.
async fn read_msg(
    recv: &mut quinn::RecvStream,
) -> Result<Option<CoordinatorMessage>, SessionError> {
    fleetmesh_data::framing::read_frame(recv).await.map_err(SessionError::from)
}

impl From<fleetmesh_data::framing::FrameError> for SessionError {
    fn from(e: fleetmesh_data::framing::FrameError) -> Self {
        match e {
            fleetmesh_data::framing::FrameError::Codec(c) => SessionError::from(c),
            other => SessionError::ConnectionLost(other.to_string()),
        }
    }
}

/// How a session ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// We were asked to shut down and told the coordinator we are leaving.
    Shutdown,
}

/// Run one session until it fails or `shutdown` becomes true.
pub async fn run_session(
    endpoint: &quinn::Endpoint,
    remote: SocketAddr,
    server_name: &str,
    opts: &ConnectOptions,
    sampler: &mut dyn Sampler,
    stats: &AgentStats,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<SessionEnd, SessionError> {
    let addr = remote.to_string();
    let connecting = endpoint
        .connect(remote, server_name)
        .map_err(|e| SessionError::Connect { addr: addr.clone(), msg: e.to_string() })?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| SessionError::Connect { addr: addr.clone(), msg: "timed out".into() })?
        .map_err(|e| SessionError::Connect { addr: addr.clone(), msg: e.to_string() })?;
    // The coordinator must be the mesh coordinator of our trust domain.
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok());
    let server = peer_identity(chain.as_deref().map(|v| v.as_slice()))
        .map_err(|e| SessionError::ServerIdentity { addr: addr.clone(), msg: e.to_string() })?;
    if server.kind != PeerKind::Coordinator || server.trust_domain != opts.tls.identity.trust_domain
    {
        conn.close(close_code::REFUSED.into(), b"not a coordinator");
        return Err(SessionError::ServerIdentity {
            addr,
            msg: format!(
                "expected a coordinator of {}, got {}",
                opts.tls.identity.trust_domain,
                server.spiffe_id()
            ),
        });
    }

    // A refusal often arrives as the connection close reason, and can come before the
    // hello is even written (the certificate is checked as soon as the handshake ends).
    let refused_or = |e: SessionError| match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            SessionError::Rejected(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => e,
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| refused_or(SessionError::ConnectionLost(e.to_string())))?;
    write_msg(
        &mut send,
        &AgentMessage::Hello(Hello {
            protocol_version: opts.protocol_version,
            agent_name: opts.claimed_name.clone(),
            software_version: SOFTWARE_VERSION.to_string(),
        }),
    )
    .await
    .map_err(refused_or)?;
    let welcome = match tokio::time::timeout(HELLO_TIMEOUT, read_msg(&mut recv)).await {
        Err(_) => return Err(SessionError::HelloTimeout(HELLO_TIMEOUT)),
        Ok(Err(e)) => return Err(refused_or(e)),
        Ok(Ok(None)) => {
            return Err(SessionError::ConnectionLost("stream closed before welcome".into()))
        }
        Ok(Ok(Some(CoordinatorMessage::Welcome(w)))) => w,
        Ok(Ok(Some(CoordinatorMessage::Reject { reason }))) => {
            return Err(SessionError::Rejected(reason))
        }
        Ok(Ok(Some(other))) => return Err(SessionError::Unexpected(format!("{other:?}"))),
    };
    if welcome.protocol_version != opts.protocol_version {
        conn.close(close_code::VERSION_MISMATCH.into(), b"protocol version mismatch");
        return Err(SessionError::VersionMismatch {
            agent: opts.protocol_version,
            coordinator: welcome.protocol_version,
        });
    }
    stats.sessions_established.fetch_add(1, Ordering::Relaxed);
    info!(agent_id = %opts.claimed_name, session = welcome.session_id, coordinator = %addr, "session established");

    let inventory = sampler.inventory();
    let inv_gpus = inventory.gpus.clone();
    write_msg(&mut send, &AgentMessage::Inventory(inventory)).await?;
    if let Some(jobs) = &opts.jobs {
        write_msg(&mut send, &AgentMessage::Running { attempts: jobs.running() }).await?;
        jobs.resend_unacked();
        if let Some(d) = jobs.data() {
            write_msg(&mut send, &d.holdings()).await?;
        }
    }
    let outbox = opts.jobs.as_ref().map(|j| j.outbox.clone()).unwrap_or_default();
    // Deliver whatever queued up while we were disconnected.
    outbox.notify.notify_one();

    // Reader task: coordinator -> channel.
    let (tx, mut rx) = mpsc::channel::<Result<CoordinatorMessage, SessionError>>(16);
    let reader = tokio::spawn(async move {
        loop {
            let r = read_msg(&mut recv).await;
            let end = !matches!(r, Ok(Some(_)));
            let item = match r {
                Ok(Some(m)) => Ok(m),
                Ok(None) => {
                    Err(SessionError::ConnectionLost("coordinator closed the stream".into()))
                }
                Err(e) => Err(e),
            };
            if tx.send(item).await.is_err() || end {
                return;
            }
        }
    });
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _reader = AbortOnDrop(reader);

    let hb_every = Duration::from_millis(welcome.heartbeat_interval_ms.clamp(50, 60_000));
    let mut telemetry = tokio::time::interval(opts.telemetry_interval);
    telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(hb_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut hb_seq = 0u64;
    let mut rx_seen = conn.stats().udp_rx.datagrams;
    if let Some(jobs) = &opts.jobs {
        jobs.heard_from_coordinator();
    }
    let mut current = opts.tls.identity.clone();
    let renew_sleep = tokio::time::sleep(renew_delay(&current));
    tokio::pin!(renew_sleep);
    let mut renew_pending = false;
    loop {
        tokio::select! {
            _ = &mut renew_sleep, if opts.renewal.is_some() && !renew_pending => {
                if let Some(r) = &opts.renewal {
                    match fleetmesh_protocol::enroll::make_csr(&r.key_pem, &current.name, &Default::default()) {
                        Ok(csr_pem) => {
                            info!(agent_id = %current.name, "requesting certificate renewal");
                            write_msg(&mut send, &AgentMessage::Renew { csr_pem }).await?;
                            renew_pending = true;
                        }
                        Err(e) => {
                            warn!(agent_id = %current.name, error = %e, "cannot build a renewal request");
                            renew_sleep.as_mut().reset(tokio::time::Instant::now() + renew_retry(&current));
                        }
                    }
                }
            }
            _ = telemetry.tick() => {
                seq += 1;
                let report = sampler.sample(seq);
                if let Some(jobs) = &opts.jobs {
                    jobs.observe(&inv_gpus, &report);
                }
                write_msg(&mut send, &AgentMessage::Telemetry(report)).await?;
                stats.reports_sent.fetch_add(1, Ordering::Relaxed);
            }
            _ = outbox.notify.notified() => {
                let msgs = outbox.drain();
                for (i, m) in msgs.iter().enumerate() {
                    if let Err(e) = write_msg(&mut send, m).await {
                        outbox.requeue(msgs[i..].to_vec());
                        return Err(e);
                    }
                }
            }
            _ = heartbeat.tick() => {
                // Any packet from the coordinator (acks of our heartbeats and keep-alives
                // included) shows it still hears us: the self-fencing clock restarts.
                let rx_now = conn.stats().udp_rx.datagrams;
                if rx_now != rx_seen {
                    rx_seen = rx_now;
                    if let Some(jobs) = &opts.jobs {
                        jobs.heard_from_coordinator();
                    }
                }
                hb_seq += 1;
                write_msg(&mut send, &AgentMessage::Heartbeat { seq: hb_seq }).await?;
            }
            msg = rx.recv() => match msg {
                Some(Ok(CoordinatorMessage::Reject { reason })) => {
                    return Err(SessionError::Rejected(reason));
                }
                Some(Ok(CoordinatorMessage::Renewed { cert_pem })) => {
                    renew_pending = false;
                    if let Some(r) = &opts.renewal {
                        match apply_renewal(r, &opts.tls.ca_pem, &current.name, &cert_pem) {
                            Ok(id) => {
                                current = id.identity.clone();
                                info!(agent_id = %current.name, serial = %current.serial, not_after = current.not_after_unix, "certificate renewed");
                                if let Some(d) = opts.jobs.as_ref().and_then(|j| j.data()) {
                                    d.update_tls(&id);
                                }
                                if let Ok(mut slot) = r.updated.lock() {
                                    *slot = Some(id);
                                }
                                renew_sleep.as_mut().reset(tokio::time::Instant::now() + renew_delay(&current));
                            }
                            Err(e) => {
                                warn!(agent_id = %current.name, error = %e, "renewed certificate unusable");
                                renew_sleep.as_mut().reset(tokio::time::Instant::now() + renew_retry(&current));
                            }
                        }
                    }
                }
                Some(Ok(CoordinatorMessage::CallForBids(c))) => {
                    let answer = match &opts.jobs {
                        Some(jobs) => jobs.bid(&c),
                        None => AgentMessage::Decline { auction: c.auction.clone(), reason: "this agent does not run jobs".into() },
                    };
                    write_msg(&mut send, &answer).await?;
                }
                Some(Ok(CoordinatorMessage::Award(a))) => {
                    let r = match &opts.jobs {
                        Some(jobs) => jobs.start(&a),
                        None => Err("this agent does not run jobs".into()),
                    };
                    if let Err(why) = &r {
                        warn!(job_id = %a.job, attempt = a.attempt, reason = %why, "award refused");
                    }
                    write_msg(&mut send, &AgentMessage::AwardAnswer {
                        job: a.job.clone(),
                        attempt: a.attempt,
                        accepted: r.is_ok(),
                        reason: r.err().unwrap_or_default(),
                    }).await?;
                }
                Some(Ok(CoordinatorMessage::Release { auction })) => {
                    if let Some(jobs) = &opts.jobs {
                        jobs.release(&auction);
                    }
                }
                Some(Ok(CoordinatorMessage::Stop { job, attempt, grace_ms, reason })) => {
                    info!(job_id = %job, attempt, %reason, "stop requested");
                    if let Some(jobs) = &opts.jobs {
                        jobs.stop(&job, attempt, fleetmesh_protocol::JobOutcome::Cancelled, Duration::from_millis(grace_ms));
                    }
                }
                Some(Ok(CoordinatorMessage::ExitRecorded { job, attempt })) => {
                    if let Some(jobs) = &opts.jobs {
                        jobs.exit_recorded(&job, attempt);
                    }
                }
                Some(Ok(CoordinatorMessage::Keep { attempts })) => {
                    if let Some(jobs) = &opts.jobs {
                        jobs.keep_only(&attempts);
                    }
                }
                Some(Ok(CoordinatorMessage::DataPlane { ticket_key })) => {
                    if let Some(d) = opts.jobs.as_ref().and_then(|j| j.data()) {
                        d.server.set_ticket_key(ticket_key);
                    }
                }
                Some(Ok(CoordinatorMessage::Fetch(plan))) => {
                    match opts.jobs.as_ref().and_then(|j| j.data()) {
                        Some(d) => {
                            info!(dataset = %fleetmesh_protocol::data::short(&plan.dataset), holders = plan.holders.len(), "fetch requested");
                            d.fetch_for_coordinator(*plan);
                        }
                        None => warn!("fetch requested, but this agent has no data plane"),
                    }
                }
                Some(Ok(CoordinatorMessage::DropDataset { dataset })) => {
                    if let Some(d) = opts.jobs.as_ref().and_then(|j| j.data()) {
                        d.drop_dataset(&dataset);
                    }
                }
                Some(Ok(CoordinatorMessage::Denied { agents, serials })) => {
                    if let Some(d) = opts.jobs.as_ref().and_then(|j| j.data()) {
                        info!(agents = agents.len(), serials = serials.len(), "revoked identities denied on the data port");
                        d.server.set_denied(agents, serials);
                    }
                }
                Some(Ok(CoordinatorMessage::RenewRefused { reason })) => {
                    renew_pending = false;
                    warn!(agent_id = %current.name, %reason, "certificate renewal refused");
                    renew_sleep.as_mut().reset(tokio::time::Instant::now() + renew_retry(&current));
                }
                Some(Ok(other)) => debug!(?other, "ignoring coordinator message"),
                Some(Err(e)) => {
                    return Err(match conn.close_reason() {
                        Some(quinn::ConnectionError::ApplicationClosed(c)) => SessionError::Rejected(
                            String::from_utf8_lossy(&c.reason).into_owned(),
                        ),
                        Some(other) => SessionError::ConnectionLost(other.to_string()),
                        None => e,
                    });
                }
                None => return Err(SessionError::ConnectionLost("reader stopped".into())),
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    let _ = write_msg(&mut send, &AgentMessage::Leaving { reason: "agent shutting down".into() }).await;
                    let _ = send.finish();
                    // Give the coordinator a moment to read the goodbye and close.
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
                    conn.close(close_code::DONE.into(), b"agent leaving");
                    return Ok(SessionEnd::Shutdown);
                }
            }
        }
    }
}

/// Why [`run_forever`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum RunEnd {
    Shutdown,
    /// Our certificate has expired: nothing can connect with it any more.
    CertificateExpired,
}

/// Connect, run sessions, and reconnect forever (with backoff and jitter) until shutdown.
/// Never returns because the coordinator is unreachable; returns when the certificate has
/// expired so the caller can re-enroll.
pub async fn run_forever(
    mut opts: ConnectOptions,
    sampler: &mut dyn Sampler,
    stats: Arc<AgentStats>,
    mut shutdown: watch::Receiver<bool>,
) -> RunEnd {
    let agent = opts.claimed_name.clone();
    let mut attempt: u32 = 0;
    let mut endpoint: Option<(SocketAddr, quinn::Endpoint)> = None;
    let end = loop {
        if *shutdown.borrow() {
            break RunEnd::Shutdown;
        }
        if let Some(r) = &opts.renewal {
            if let Some(new) = r.updated.lock().ok().and_then(|mut g| g.take()) {
                opts.tls = new;
                endpoint = None; // rebuild the client config with the renewed certificate
            }
        }
        if opts.tls.identity.not_after_unix as f64 <= unix_now_f64() {
            warn!(agent_id = %agent, "our certificate has expired");
            break RunEnd::CertificateExpired;
        }
        let result = async {
            let (remote, server_name) = resolve(&opts.coordinator).await?;
            let ep = match &endpoint {
                Some((r, ep)) if r.is_ipv6() == remote.is_ipv6() => ep.clone(),
                _ => {
                    let ep = client_endpoint(&opts, remote)?;
                    endpoint = Some((remote, ep.clone()));
                    ep
                }
            };
            run_session(&ep, remote, &server_name, &opts, sampler, &stats, &mut shutdown).await
        }
        .await;
        match result {
            Ok(SessionEnd::Shutdown) => break RunEnd::Shutdown,
            Err(e) => {
                stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                match &e {
                    SessionError::Rejected(_)
                    | SessionError::VersionMismatch { .. }
                    | SessionError::ServerIdentity { .. } => {
                        error!(agent_id = %agent, error = %e, "session refused")
                    }
                    _ => warn!(agent_id = %agent, error = %e, "session ended"),
                }
                // A session that got going resets the backoff.
                if matches!(e, SessionError::ConnectionLost(_)) {
                    attempt = 0;
                }
                let delay = opts.backoff.delay(attempt, rand::random::<f64>());
                attempt = attempt.saturating_add(1);
                info!(agent_id = %agent, retry_in_ms = delay.as_millis() as u64, "reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    };
    if let Some((_, ep)) = endpoint {
        let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
    }
    if end == RunEnd::Shutdown {
        info!(agent_id = %agent, "agent stopped");
    }
    end
}
