//! `Listener` actor: owns the QUIC endpoint of the control plane (ALPN `fleetmesh/ctl/1`).
//!
//! For every incoming connection an accept task runs the TLS handshake (the client must
//! present a certificate chaining to the mesh CA and valid now: rustls checks that),
//! checks the peer is an *agent* of *our* trust domain, reads the hello, checks the
//! protocol version and that the claimed name equals the certificate's name, and only
//! then asks the Listener to spawn an `AgentSession` (linked to the Listener). Every
//! refusal is logged with its reason and sent to the peer as the close reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetmesh_protocol::enroll::{EnrollMessage, EnrollReply, ALPN_ENROLL};
use fleetmesh_protocol::tls::{peer_identity, TlsIdentity};
use fleetmesh_protocol::{
    AgentMessage, CoordinatorMessage, Hello, PeerIdentity, PeerKind, ALPN_CTL, PROTOCOL_VERSION,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::fleet::FleetMsg;
use crate::net::session::{
    close_code, read_frame, write_frame, AgentSession, FrameError, SessionArgs,
};
use crate::trust::authority::AuthorityMsg;

/// Time a new connection has to complete the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// QUIC idle timeout on the coordinator side (agents keep-alive every second).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Listener settings.
pub struct ListenerArgs {
    pub listen: SocketAddr,
    pub tls: Arc<TlsIdentity>,
    pub fleet: ActorRef<FleetMsg>,
    pub authority: ActorRef<AuthorityMsg>,
    pub scheduler: ActorRef<crate::scheduler::SchedulerMsg>,
    pub auctioneer: ActorRef<crate::placement::auctioneer::AuctioneerMsg>,
    pub heartbeat_interval: Duration,
    pub broker: Arc<crate::data::broker::DataBroker>,
    /// Receives the bound address once listening.
    pub bound: Option<oneshot::Sender<SocketAddr>>,
}

/// A connection that passed authentication and hello.
pub struct Accepted {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    identity: PeerIdentity,
}

/// Listener messages.
pub enum ListenerMsg {
    Accepted(Box<Accepted>),
}

/// Listener state.
pub struct ListenerState {
    endpoint: quinn::Endpoint,
    fleet: ActorRef<FleetMsg>,
    authority: ActorRef<AuthorityMsg>,
    scheduler: ActorRef<crate::scheduler::SchedulerMsg>,
    auctioneer: ActorRef<crate::placement::auctioneer::AuctioneerMsg>,
    heartbeat_interval: Duration,
    broker: Arc<crate::data::broker::DataBroker>,
    next_session: u64,
    accept_task: tokio::task::JoinHandle<()>,
}

/// The Listener actor.
pub struct Listener;

fn server_config(tls: &TlsIdentity) -> Result<quinn::ServerConfig, ActorProcessingErr> {
    // Client certificates are optional at the TLS layer only so that enrollment (ALPN
    // fleetmesh/enroll/1) can run without one; `authenticate` requires a valid agent
    // certificate on the control ALPN. A presented certificate is always verified.
    let rustls_cfg = tls.server_config_optional_client(&[
        ALPN_CTL,
        ALPN_ENROLL,
        fleetmesh_protocol::data::ALPN_XFER,
    ])?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(rustls_cfg)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    transport.max_concurrent_uni_streams(0u32.into());
    // Control and enrollment use one stream; xfer (the coordinator's store serving
    // chunks) uses a few per fetching peer.
    transport.max_concurrent_bidi_streams(32u32.into());
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Why an incoming connection was not accepted (logged; the peer was told, where it
/// could be).
#[derive(Debug, thiserror::Error)]
pub enum NotAccepted {
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// Enrollment went wrong, or the Authority refused it (the reason).
    #[error("{0}")]
    Enrollment(String),
    /// The certificate does not admit the peer to the control port.
    #[error("{0}")]
    Identity(String),
    /// The hello exchange failed; `who` is the peer's SPIFFE id.
    #[error("{who}: {why}")]
    Hello { who: String, why: String },
}

fn refuse(conn: &quinn::Connection, code: u32, reason: &str) {
    conn.close(code.into(), reason.as_bytes());
}

/// Serve one enrollment: read the request, ask the Authority, answer, close.
async fn serve_enrollment(
    conn: quinn::Connection,
    authority: &ActorRef<AuthorityMsg>,
    ca_pem: &str,
) -> Result<String, NotAccepted> {
    let failed = |why: &str| NotAccepted::Enrollment(why.to_string());
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(failed(&format!("enrollment connection ended early: {e}"))),
        Err(_) => {
            refuse(&conn, close_code::PROTOCOL_ERROR, "no enrollment request in time");
            return Err(failed("no enrollment request in time"));
        }
    };
    let req =
        match tokio::time::timeout(HELLO_TIMEOUT, read_frame::<EnrollMessage>(&mut recv)).await {
            Ok(Ok(Some(EnrollMessage::Enroll(req)))) => req,
            Ok(Ok(_)) | Err(_) => {
                refuse(&conn, close_code::PROTOCOL_ERROR, "expected an enrollment request");
                return Err(failed("expected an enrollment request"));
            }
            Ok(Err(e)) => {
                let why = format!("protocol error: {e}");
                refuse(&conn, close_code::PROTOCOL_ERROR, &why);
                return Err(failed(&why));
            }
        };
    let result = match ractor::call_t!(authority, AuthorityMsg::Enroll, 10_000, Box::new(req)) {
        Ok(r) => r,
        Err(e) => Err(crate::trust::authority::AuthorityError::Unavailable(e.to_string())),
    };
    if let Err(crate::trust::authority::AuthorityError::Unavailable(why)) = &result {
        // Not a refusal: the agent tries again (it treats a closed connection so).
        let why = format!("the coordinator is busy, try again: {why}");
        refuse(&conn, close_code::CLOSED, &why);
        return Err(failed(&why));
    }
    let reply = match &result {
        Ok(e) => EnrollReply::Issued {
            name: e.name.clone(),
            cert_pem: e.cert_pem.clone(),
            ca_pem: ca_pem.to_string(),
        },
        Err(why) => EnrollReply::Refused { reason: why.to_string() },
    };
    let _ = write_frame(&mut send, &reply).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(close_code::DONE.into(), b"enrollment done");
    result.map(|e| e.name).map_err(|why| failed(&format!("enrollment refused: {why}")))
}

/// How long a refused agent gets to read the reason before the connection closes.
const REJECT_LINGER: Duration = Duration::from_millis(500);

/// What an accepted connection turned out to be.
enum Outcome {
    Session(Box<Accepted>),
    Enrolled(String),
    Xfer,
}

/// Route an incoming connection by ALPN: enrollment (no client certificate), the
/// coordinator's store as a data-plane peer, or a control session.
async fn authenticate(
    incoming: quinn::Incoming,
    trust_domain: &str,
    authority: &ActorRef<AuthorityMsg>,
    ca_pem: &str,
    broker: &Arc<crate::data::broker::DataBroker>,
) -> Result<Outcome, NotAccepted> {
    let conn = incoming.await.map_err(|e| NotAccepted::Handshake(e.to_string()))?;
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    if alpn.as_deref() == Some(ALPN_ENROLL) {
        return serve_enrollment(conn, authority, ca_pem).await.map(Outcome::Enrolled);
    }
    let identity = authorised_agent(&conn, trust_domain, authority).await?;
    if alpn.as_deref() == Some(fleetmesh_protocol::data::ALPN_XFER) {
        // The coordinator's own store as a data-plane peer, for agents that are not
        // revoked; tickets and residency are checked per request.
        broker.server.clone().serve(conn).await;
        return Ok(Outcome::Xfer);
    }
    control_session(conn, identity).await
}

/// The peer's identity if it is an agent of this mesh that is not revoked; otherwise
/// the connection is refused with the reason.
async fn authorised_agent(
    conn: &quinn::Connection,
    trust_domain: &str,
    authority: &ActorRef<AuthorityMsg>,
) -> Result<PeerIdentity, NotAccepted> {
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok());
    let refused = |why: String| {
        refuse(conn, close_code::REFUSED, &why);
        NotAccepted::Identity(why)
    };
    let identity = peer_identity(chain.as_deref().map(|v| v.as_slice()))
        .map_err(|e| refused(format!("certificate identity unusable: {e}")))?;
    if identity.trust_domain != trust_domain {
        return Err(refused(format!(
            "certificate is for trust domain {}, this mesh is {trust_domain}",
            identity.trust_domain
        )));
    }
    if identity.kind != PeerKind::Agent {
        return Err(refused(format!(
            "the agent port requires an agent certificate; {} presented a {} certificate",
            identity.spiffe_id(),
            identity.kind
        )));
    }
    let revoked = ractor::call_t!(authority, AuthorityMsg::CheckRevoked, 5000, identity.clone())
        .unwrap_or_else(|e| Some(format!("revocation status unavailable: {e}")));
    match revoked {
        Some(why) => Err(refused(why)),
        None => Ok(identity),
    }
}

/// Why a hello is refused (with the close code), or `None` when it is fine.
fn hello_refusal(hello: &Hello, identity: &PeerIdentity) -> Option<(u32, String)> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Some((
            close_code::VERSION_MISMATCH,
            format!(
                "protocol version mismatch: agent speaks {}, coordinator speaks {}",
                hello.protocol_version, PROTOCOL_VERSION
            ),
        ));
    }
    (hello.agent_name != identity.name).then(|| {
        (
            close_code::REFUSED,
            format!(
                "hello claims the name {:?} but the certificate is for agent {:?}",
                hello.agent_name, identity.name
            ),
        )
    })
}

/// ALPN `fleetmesh/ctl/1`: the control stream and its hello, checked.
async fn control_session(
    conn: quinn::Connection,
    identity: PeerIdentity,
) -> Result<Outcome, NotAccepted> {
    let who = identity.spiffe_id();
    let hello_failed = |why: String| NotAccepted::Hello { who: who.clone(), why };
    let protocol_error = |why: String| {
        refuse(&conn, close_code::PROTOCOL_ERROR, &why);
        hello_failed(why)
    };
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(hello_failed(format!("connection ended before hello: {e}"))),
        Err(_) => return Err(protocol_error("no control stream within the hello timeout".into())),
    };
    let first = tokio::time::timeout(HELLO_TIMEOUT, read_frame::<AgentMessage>(&mut recv)).await;
    let hello = match first {
        Ok(Ok(Some(AgentMessage::Hello(h)))) => h,
        Ok(Ok(Some(_))) => return Err(protocol_error("first frame was not a hello".into())),
        Ok(Ok(None)) => return Err(hello_failed("stream closed before hello".into())),
        Ok(Err(FrameError::Codec(e))) => {
            return Err(protocol_error(format!("protocol error: {e}")))
        }
        Ok(Err(e)) => return Err(hello_failed(e.to_string())),
        Err(_) => return Err(protocol_error("no hello within the hello timeout".into())),
    };
    if let Some((code, why)) = hello_refusal(&hello, &identity) {
        // The agent reads the reason before the close; it may be gone already.
        let _ = write_frame(&mut send, &CoordinatorMessage::Reject { reason: why.clone() }).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(REJECT_LINGER, conn.closed()).await;
        refuse(&conn, code, &why);
        return Err(hello_failed(why));
    }
    Ok(Outcome::Session(Box::new(Accepted { conn, send, recv, identity })))
}

impl Actor for Listener {
    type Msg = ListenerMsg;
    type State = ListenerState;
    type Arguments = ListenerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ListenerMsg>,
        args: ListenerArgs,
    ) -> Result<ListenerState, ActorProcessingErr> {
        let cfg = server_config(&args.tls)?;
        let endpoint = quinn::Endpoint::server(cfg, args.listen)
            .map_err(|e| format!("cannot listen on UDP {}: {e}", args.listen))?;
        let local = endpoint.local_addr()?;
        info!(addr = %local, "control plane listening (QUIC, ALPN fleetmesh/ctl/1)");
        if let Some(tx) = args.bound {
            // Whoever asked for the address may have stopped waiting.
            let _ = tx.send(local);
        }
        let ep = endpoint.clone();
        let domain = args.tls.identity.trust_domain.clone();
        let authority = args.authority.clone();
        let ca_pem = args.tls.ca_pem.clone();
        let broker = args.broker.clone();
        let accept_task = tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let remote = incoming.remote_address();
                let domain = domain.clone();
                let me = myself.clone();
                let authority = authority.clone();
                let ca_pem = ca_pem.clone();
                let broker = broker.clone();
                tokio::spawn(async move {
                    match authenticate(incoming, &domain, &authority, &ca_pem, &broker).await {
                        Ok(Outcome::Session(acc)) => {
                            // A stopped Listener means the coordinator is stopping: the agent reconnects.
                            let _ = me.cast(ListenerMsg::Accepted(acc));
                        }
                        Ok(Outcome::Enrolled(name)) => {
                            info!(%remote, agent_id = %name, "enrollment served")
                        }
                        Ok(Outcome::Xfer) => debug!(%remote, "xfer connection ended"),
                        Err(why) => warn!(%remote, reason = %why, "connection refused"),
                    }
                });
            }
        });
        let next_session = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Ok(ListenerState {
            endpoint,
            fleet: args.fleet,
            authority: args.authority,
            scheduler: args.scheduler,
            auctioneer: args.auctioneer,
            heartbeat_interval: args.heartbeat_interval,
            broker: args.broker,
            next_session,
            accept_task,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ListenerMsg>,
        msg: ListenerMsg,
        st: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ListenerMsg::Accepted(acc) => {
                let Accepted { conn, send, recv, identity } = *acc;
                st.next_session += 1;
                let session_id = st.next_session;
                let name = identity.name.clone();
                let remote = conn.remote_address();
                let args = SessionArgs {
                    conn: conn.clone(),
                    send,
                    recv,
                    identity,
                    session_id,
                    fleet: st.fleet.clone(),
                    authority: st.authority.clone(),
                    scheduler: st.scheduler.clone(),
                    auctioneer: st.auctioneer.clone(),
                    heartbeat_interval: st.heartbeat_interval,
                    broker: st.broker.clone(),
                };
                match Actor::spawn_linked(None, AgentSession, args, myself.get_cell()).await {
                    Ok(_) => {
                        debug!(agent_id = %name, %remote, session = session_id, "session started")
                    }
                    Err(e) => {
                        warn!(agent_id = %name, error = %e, "could not start session");
                        conn.close(close_code::CLOSED.into(), b"session could not start");
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<ListenerMsg>,
        evt: SupervisionEvent,
        _st: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        // A session ending (normally or not) affects only its agent.
        if let SupervisionEvent::ActorFailed(who, err) = evt {
            warn!(actor = %who.get_id(), error = %err, "agent session failed");
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ListenerMsg>,
        st: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        st.accept_task.abort();
        st.endpoint.close(close_code::SHUTDOWN.into(), b"coordinator shutting down");
        Ok(())
    }
}
