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

/// Why a renewed certificate cannot be used (the current one stays in use).
#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    #[error(transparent)]
    Tls(#[from] fleetmesh_protocol::tls::TlsError),
    #[error("renewed certificate is for {got}, not agent {want}")]
    WrongIdentity { got: String, want: String },
    #[error(transparent)]
    Files(#[from] crate::enroll::EnrollFailure),
}

fn apply_renewal(
    r: &Renewal,
    ca_pem: &str,
    current: &str,
    cert_pem: &str,
) -> Result<TlsIdentity, RenewalError> {
    let p = std::path::Path::new("renewed");
    let id = TlsIdentity::from_pem(
        p,
        ca_pem.as_bytes(),
        p,
        cert_pem.as_bytes(),
        p,
        r.key_pem.as_bytes(),
    )?;
    if id.identity.name != current || id.identity.kind != PeerKind::Agent {
        return Err(RenewalError::WrongIdentity {
            got: id.identity.spiffe_id(),
            want: current.to_string(),
        });
    }
    crate::enroll::IdentityFiles::write_atomic(&r.files.cert(), cert_pem)?;
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
    let conn = connect_to_coordinator(endpoint, remote, server_name, opts).await?;
    let (mut send, recv, welcome) = handshake(&conn, opts).await?;
    stats.sessions_established.fetch_add(1, Ordering::Relaxed);
    info!(agent_id = %opts.claimed_name, session = welcome.session_id, coordinator = %addr, "session established");
    let inv_gpus = announce(&mut send, opts, sampler).await?;
    let (mut rx, _reader) = spawn_reader(recv);
    let mut live = Live::new(conn, send, opts, &welcome);
    loop {
        let renew_at = live.renew_at;
        tokio::select! {
            _ = tokio::time::sleep_until(renew_at), if opts.renewal.is_some() && !live.renew_pending => {
                live.request_renewal().await?;
            }
            _ = live.telemetry.tick() => {
                live.seq += 1;
                let report = sampler.sample(live.seq);
                if let Some(jobs) = &opts.jobs {
                    jobs.observe(&inv_gpus, &report);
                }
                write_msg(&mut live.send, &AgentMessage::Telemetry(report)).await?;
                stats.reports_sent.fetch_add(1, Ordering::Relaxed);
            }
            _ = live.outbox.notify.notified() => live.deliver_outbox().await?,
            _ = live.heartbeat.tick() => live.heartbeat().await?,
            msg = rx.recv() => match msg {
                Some(Ok(m)) => live.on_message(m).await?,
                Some(Err(e)) => return Err(live.closed_because(e)),
                None => return Err(SessionError::ConnectionLost("reader stopped".into())),
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    live.leave().await;
                    return Ok(SessionEnd::Shutdown);
                }
            }
        }
    }
}

/// Connect, and make sure the peer is the coordinator of our trust domain.
async fn connect_to_coordinator(
    endpoint: &quinn::Endpoint,
    remote: SocketAddr,
    server_name: &str,
    opts: &ConnectOptions,
) -> Result<quinn::Connection, SessionError> {
    let addr = remote.to_string();
    let connect_err = |msg: String| SessionError::Connect { addr: addr.clone(), msg };
    let connecting =
        endpoint.connect(remote, server_name).map_err(|e| connect_err(e.to_string()))?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| connect_err("timed out".into()))?
        .map_err(|e| connect_err(e.to_string()))?;
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
    Ok(conn)
}

/// The reason the coordinator closed `conn` with, when it did; else `e`. A refusal often
/// arrives as the close reason, even before the hello is written (the certificate is
/// checked as soon as the handshake ends).
fn refused_or(conn: &quinn::Connection, e: SessionError) -> SessionError {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            SessionError::Rejected(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => e,
    }
}

/// Hello, then the coordinator's welcome (or its reason for refusing us).
async fn handshake(
    conn: &quinn::Connection,
    opts: &ConnectOptions,
) -> Result<(quinn::SendStream, quinn::RecvStream, fleetmesh_protocol::Welcome), SessionError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| refused_or(conn, SessionError::ConnectionLost(e.to_string())))?;
    let hello = Hello {
        protocol_version: opts.protocol_version,
        agent_name: opts.claimed_name.clone(),
        software_version: SOFTWARE_VERSION.to_string(),
    };
    write_msg(&mut send, &AgentMessage::Hello(hello)).await.map_err(|e| refused_or(conn, e))?;
    let welcome = match tokio::time::timeout(HELLO_TIMEOUT, read_msg(&mut recv)).await {
        Err(_) => return Err(SessionError::HelloTimeout(HELLO_TIMEOUT)),
        Ok(Err(e)) => return Err(refused_or(conn, e)),
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
    Ok((send, recv, welcome))
}

/// Tell a new session what this node is and runs: inventory, running attempts, the
/// exits not yet acknowledged, held datasets. The GPUs of the inventory.
async fn announce(
    send: &mut quinn::SendStream,
    opts: &ConnectOptions,
    sampler: &mut dyn Sampler,
) -> Result<Vec<fleetmesh_protocol::GpuInfo>, SessionError> {
    let inventory = sampler.inventory();
    let gpus = inventory.gpus.clone();
    if let Some(jobs) = &opts.jobs {
        jobs.set_capacity(inventory.host.cpu_count, inventory.host.memory_total_bytes);
    }
    write_msg(send, &AgentMessage::Inventory(inventory)).await?;
    if let Some(jobs) = &opts.jobs {
        write_msg(send, &AgentMessage::Running { attempts: jobs.running() }).await?;
        jobs.resend_unacked();
        if let Some(d) = jobs.data() {
            write_msg(send, &d.holdings()).await?;
        }
    }
    Ok(gpus)
}

/// Aborts its task when dropped (the session's reader ends with the session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the coordinator sends, one message (or the error that ended the stream) at a time.
type Incoming = mpsc::Receiver<Result<CoordinatorMessage, SessionError>>;

/// Messages read ahead of the session loop.
const READ_AHEAD: usize = 16;

/// Read the coordinator's stream on a task of its own.
fn spawn_reader(mut recv: quinn::RecvStream) -> (Incoming, AbortOnDrop) {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
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
    (rx, AbortOnDrop(reader))
}

/// Heartbeat intervals the coordinator may ask for, at most and at least.
const HEARTBEAT_BOUNDS_MS: (u64, u64) = (50, 60_000);

/// An established session: its stream, timers and certificate state.
struct Live<'a> {
    conn: quinn::Connection,
    send: quinn::SendStream,
    opts: &'a ConnectOptions,
    outbox: std::sync::Arc<crate::outbox::Outbox>,
    telemetry: tokio::time::Interval,
    heartbeat: tokio::time::Interval,
    seq: u64,
    hb_seq: u64,
    /// Datagrams received so far (any of them shows the coordinator still hears us).
    rx_seen: u64,
    /// The certificate in use (renewed in place).
    current: fleetmesh_protocol::PeerIdentity,
    renew_at: tokio::time::Instant,
    renew_pending: bool,
}

impl<'a> Live<'a> {
    fn new(
        conn: quinn::Connection,
        send: quinn::SendStream,
        opts: &'a ConnectOptions,
        welcome: &fleetmesh_protocol::Welcome,
    ) -> Self {
        let (lo, hi) = HEARTBEAT_BOUNDS_MS;
        let hb_every = Duration::from_millis(welcome.heartbeat_interval_ms.clamp(lo, hi));
        let mut telemetry = tokio::time::interval(opts.telemetry_interval);
        telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(hb_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outbox = opts.jobs.as_ref().map(|j| j.outbox.clone()).unwrap_or_default();
        // Deliver whatever queued up while we were disconnected.
        outbox.notify.notify_one();
        if let Some(jobs) = &opts.jobs {
            jobs.heard_from_coordinator();
        }
        let current = opts.tls.identity.clone();
        let renew_at = tokio::time::Instant::now() + renew_delay(&current);
        let rx_seen = conn.stats().udp_rx.datagrams;
        Self {
            conn,
            send,
            opts,
            outbox,
            telemetry,
            heartbeat,
            seq: 0,
            hb_seq: 0,
            rx_seen,
            current,
            renew_at,
            renew_pending: false,
        }
    }

    fn jobs(&self) -> Option<&std::sync::Arc<crate::jobs::Jobs>> {
        self.opts.jobs.as_ref()
    }

    fn data(&self) -> Option<&std::sync::Arc<crate::data::DataPlane>> {
        self.jobs().and_then(|j| j.data())
    }

    /// Ask for a renewed certificate (a CSR for our own key).
    async fn request_renewal(&mut self) -> Result<(), SessionError> {
        let Some(r) = &self.opts.renewal else { return Ok(()) };
        let name = self.current.name.clone();
        match fleetmesh_protocol::enroll::make_csr(&r.key_pem, &name, &Default::default()) {
            Ok(csr_pem) => {
                info!(agent_id = %name, "requesting certificate renewal");
                write_msg(&mut self.send, &AgentMessage::Renew { csr_pem }).await?;
                self.renew_pending = true;
            }
            Err(e) => {
                warn!(agent_id = %name, error = %e, "cannot build a renewal request");
                self.renew_at = tokio::time::Instant::now() + renew_retry(&self.current);
            }
        }
        Ok(())
    }

    /// The coordinator's answer to a renewal: use the new certificate from now on.
    fn renewed(&mut self, cert_pem: &str) {
        self.renew_pending = false;
        let Some(r) = &self.opts.renewal else { return };
        match apply_renewal(r, &self.opts.tls.ca_pem, &self.current.name, cert_pem) {
            Ok(id) => {
                self.current = id.identity.clone();
                info!(agent_id = %self.current.name, serial = %self.current.serial, not_after = self.current.not_after_unix, "certificate renewed");
                if let Some(d) = self.data() {
                    d.update_tls(&id);
                }
                if let Ok(mut slot) = r.updated.lock() {
                    *slot = Some(id);
                }
                self.renew_at = tokio::time::Instant::now() + renew_delay(&self.current);
            }
            Err(e) => {
                warn!(agent_id = %self.current.name, error = %e, "renewed certificate unusable");
                self.renew_at = tokio::time::Instant::now() + renew_retry(&self.current);
            }
        }
    }

    /// Send what the jobs queued; what cannot be written is queued again.
    async fn deliver_outbox(&mut self) -> Result<(), SessionError> {
        let msgs = self.outbox.drain();
        for (i, m) in msgs.iter().enumerate() {
            if let Err(e) = write_msg(&mut self.send, m).await {
                self.outbox.requeue(msgs[i..].to_vec());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Any packet from the coordinator (acks of our heartbeats and keep-alives included)
    /// shows it still hears us: the self-fencing clock restarts. Then our heartbeat.
    async fn heartbeat(&mut self) -> Result<(), SessionError> {
        let rx_now = self.conn.stats().udp_rx.datagrams;
        if rx_now != self.rx_seen {
            self.rx_seen = rx_now;
            if let Some(jobs) = self.jobs() {
                jobs.heard_from_coordinator();
            }
        }
        self.hb_seq += 1;
        write_msg(&mut self.send, &AgentMessage::Heartbeat { seq: self.hb_seq }).await
    }

    async fn on_message(&mut self, msg: CoordinatorMessage) -> Result<(), SessionError> {
        match msg {
            CoordinatorMessage::Reject { reason } => return Err(SessionError::Rejected(reason)),
            CoordinatorMessage::Renewed { cert_pem } => self.renewed(&cert_pem),
            CoordinatorMessage::RenewRefused { reason } => {
                self.renew_pending = false;
                warn!(agent_id = %self.current.name, %reason, "certificate renewal refused");
                self.renew_at = tokio::time::Instant::now() + renew_retry(&self.current);
            }
            CoordinatorMessage::CallForBids(c) => {
                let answer = match self.jobs() {
                    Some(jobs) => jobs.bid(&c),
                    None => AgentMessage::Decline {
                        auction: c.auction.clone(),
                        reason: "this agent does not run jobs".into(),
                    },
                };
                write_msg(&mut self.send, &answer).await?;
            }
            CoordinatorMessage::Award(a) => self.award(&a).await?,
            CoordinatorMessage::DataPlane { .. }
            | CoordinatorMessage::Fetch(_)
            | CoordinatorMessage::DropDataset { .. }
            | CoordinatorMessage::Denied { .. } => self.on_data_message(msg),
            other => self.on_job_message(other),
        }
        Ok(())
    }

    /// Start an award (or say why not).
    async fn award(&mut self, a: &fleetmesh_protocol::Award) -> Result<(), SessionError> {
        let r = match self.jobs() {
            Some(jobs) => jobs.start(a),
            None => Err(crate::jobs::AwardRefused::NoJobs),
        };
        if let Err(why) = &r {
            warn!(job_id = %a.job, attempt = a.attempt, reason = %why, "award refused");
        }
        let answer = AgentMessage::AwardAnswer {
            job: a.job.clone(),
            attempt: a.attempt,
            accepted: r.is_ok(),
            reason: r.err().map(|e| e.to_string()).unwrap_or_default(),
        };
        write_msg(&mut self.send, &answer).await
    }

    /// Releases, stops, acknowledgements and reconciliation of running attempts.
    fn on_job_message(&self, msg: CoordinatorMessage) {
        let Some(jobs) = self.jobs() else {
            debug!(?msg, "ignoring coordinator message: this agent runs no jobs");
            return;
        };
        match msg {
            CoordinatorMessage::Release { auction } => jobs.release(&auction),
            CoordinatorMessage::Stop { job, attempt, grace_ms, reason } => {
                info!(job_id = %job, attempt, %reason, "stop requested");
                let grace = Duration::from_millis(grace_ms);
                jobs.stop(&job, attempt, fleetmesh_protocol::JobOutcome::Cancelled, grace);
            }
            CoordinatorMessage::ExitRecorded { job, attempt } => jobs.exit_recorded(&job, attempt),
            CoordinatorMessage::Keep { attempts } => jobs.keep_only(&attempts),
            other => debug!(?other, "ignoring coordinator message"),
        }
    }

    /// The data plane's instructions: ticket key, fetches, drops, the deny-list.
    fn on_data_message(&self, msg: CoordinatorMessage) {
        let Some(d) = self.data() else {
            if matches!(msg, CoordinatorMessage::Fetch(_)) {
                warn!("fetch requested, but this agent has no data plane");
            }
            return;
        };
        match msg {
            CoordinatorMessage::DataPlane { ticket_key } => d.server.set_ticket_key(ticket_key),
            CoordinatorMessage::Fetch(plan) => {
                info!(dataset = %fleetmesh_protocol::data::short(&plan.dataset), holders = plan.holders.len(), "fetch requested");
                d.fetch_for_coordinator(*plan);
            }
            CoordinatorMessage::DropDataset { dataset } => d.drop_dataset(&dataset),
            CoordinatorMessage::Denied { agents, serials } => {
                info!(
                    agents = agents.len(),
                    serials = serials.len(),
                    "revoked identities denied on the data port"
                );
                d.server.set_denied(agents, serials);
            }
            other => debug!(?other, "ignoring coordinator message"),
        }
    }

    /// The stream failed with `e`: the coordinator's close reason says more, if any.
    fn closed_because(&self, e: SessionError) -> SessionError {
        match self.conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                SessionError::Rejected(String::from_utf8_lossy(&c.reason).into_owned())
            }
            Some(other) => SessionError::ConnectionLost(other.to_string()),
            None => e,
        }
    }

    /// Say goodbye (best effort: we are leaving either way) and close.
    async fn leave(mut self) {
        let bye = AgentMessage::Leaving { reason: "agent shutting down".into() };
        let _ = write_msg(&mut self.send, &bye).await;
        let _ = self.send.finish();
        // Give the coordinator a moment to read the goodbye and close.
        let _ = tokio::time::timeout(LEAVE_LINGER, self.conn.closed()).await;
        self.conn.close(close_code::DONE.into(), b"agent leaving");
    }
}

/// How long a leaving agent waits for the coordinator to read its goodbye.
const LEAVE_LINGER: Duration = Duration::from_secs(1);

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
