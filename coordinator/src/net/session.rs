//! `AgentSession` actor: one per connected agent. Owns the QUIC connection and its control
//! stream. A reader task decodes agent frames and forwards them to the `Fleet` tagged with
//! this session's id (the Fleet ignores frames of sessions that are no longer current).
//! `Close` sends a `Reject` with the reason and closes the connection.

use std::time::Duration;

use fleetmesh_protocol::{
    AgentMessage, CoordinatorMessage, PeerIdentity, Welcome, PROTOCOL_VERSION,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{debug, info, warn};

use crate::fleet::FleetMsg;
use crate::placement::auction::BidView;
use crate::scheduler::SchedulerMsg;
use crate::trust::authority::AuthorityMsg;

pub use fleetmesh_protocol::codec::close_code;

/// How long the coordinator waits for a frame to be written before giving up on a peer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Messages of an AgentSession.
#[derive(Debug)]
pub enum SessionMsg {
    /// Close this session, telling the agent why.
    Close { reason: String },
    /// Write a message to the agent.
    Send(Box<CoordinatorMessage>),
    /// The agent asked for a renewed certificate.
    Renew { csr_pem: String },
    /// The reader saw the stream end or fail.
    StreamEnded { reason: String },
}

impl From<crate::net::agent_link::ToSession> for SessionMsg {
    fn from(m: crate::net::agent_link::ToSession) -> Self {
        match m {
            crate::net::agent_link::ToSession::Send(msg) => SessionMsg::Send(msg),
            crate::net::agent_link::ToSession::Close { reason } => SessionMsg::Close { reason },
        }
    }
}

/// For ractor's narrow handle: only the messages others may send convert back.
impl TryFrom<SessionMsg> for crate::net::agent_link::ToSession {
    type Error = &'static str;
    fn try_from(m: SessionMsg) -> Result<Self, Self::Error> {
        match m {
            SessionMsg::Send(msg) => Ok(Self::Send(msg)),
            SessionMsg::Close { reason } => Ok(Self::Close { reason }),
            _ => Err("not a message other actors send to a session"),
        }
    }
}

/// Everything a session needs, handed over by the Listener after a valid hello.
pub struct SessionArgs {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub identity: PeerIdentity,
    pub session_id: u64,
    pub fleet: ActorRef<FleetMsg>,
    pub authority: ActorRef<AuthorityMsg>,
    pub scheduler: ActorRef<SchedulerMsg>,
    /// Bids and declines go straight to the Auctioneer.
    pub auctioneer: ActorRef<crate::placement::auctioneer::AuctioneerMsg>,
    pub heartbeat_interval: Duration,
    pub broker: std::sync::Arc<crate::data::broker::DataBroker>,
}

/// Session state.
pub struct SessionState {
    conn: quinn::Connection,
    send: quinn::SendStream,
    name: String,
    session_id: u64,
    fleet: ActorRef<FleetMsg>,
    authority: ActorRef<AuthorityMsg>,
    identity: PeerIdentity,
    reader: Option<tokio::task::JoinHandle<()>>,
}

/// The AgentSession actor.
pub struct AgentSession;

pub(crate) use fleetmesh_data::framing::{read_frame, FrameError};

/// Write one frame to an agent, giving up after [`WRITE_TIMEOUT`].
pub(crate) async fn write_frame<T: serde::Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), FrameError> {
    fleetmesh_data::framing::write_frame(send, msg, Some(WRITE_TIMEOUT)).await
}

/// Ask a (re)connected agent again for fetches it never reported on, with fresh plans.
async fn resume_fetches(
    broker: &crate::data::broker::DataBroker,
    fleet: &ActorRef<FleetMsg>,
    myself: &ActorRef<SessionMsg>,
    name: &str,
    datasets: Vec<String>,
) {
    let Ok(cands) = ractor::call_t!(fleet, FleetMsg::Candidates, 5000) else { return };
    let me = crate::data::broker::Requester {
        kind: fleetmesh_protocol::PeerKind::Agent,
        name: name.to_string(),
        jurisdiction: cands.iter().find(|c| c.agent == name).and_then(|c| c.jurisdiction.clone()),
    };
    for id in datasets {
        match broker.plan(&id, &me, &cands) {
            Ok(plan) => {
                info!(agent_id = %name, dataset = %fleetmesh_protocol::data::short(&id), "resuming an interrupted fetch");
                let _ = myself
                    .cast(SessionMsg::Send(Box::new(CoordinatorMessage::Fetch(Box::new(plan)))));
            }
            Err(why) => broker.fetch_done(
                name,
                fleetmesh_protocol::FetchReport::without_transfer(id, false, why.to_string()),
            ),
        }
    }
}

/// Where a session's reader sends what its agent says (one struct instead of a long
/// argument list).
struct Routes {
    conn: quinn::Connection,
    name: String,
    session_id: u64,
    fleet: ActorRef<FleetMsg>,
    scheduler: ActorRef<SchedulerMsg>,
    auctioneer: ActorRef<crate::placement::auctioneer::AuctioneerMsg>,
    myself: ActorRef<SessionMsg>,
    broker: std::sync::Arc<crate::data::broker::DataBroker>,
}

/// Why the reader stops.
type Stop = String;

/// Longest an interruption waits for the Fleet to drain the agent.
const INTERRUPT_DRAIN_MS: u64 = 2000;

impl Routes {
    /// Hand one message to whoever handles it; `Err` ends the session with the reason.
    async fn dispatch(&self, msg: AgentMessage) -> Result<(), Stop> {
        match msg {
            AgentMessage::Telemetry(_)
            | AgentMessage::Heartbeat { .. }
            | AgentMessage::Inventory(_)
            | AgentMessage::Leaving { .. } => self.to_fleet(msg),
            AgentMessage::Bid { .. } | AgentMessage::Decline { .. } => {
                self.to_auctioneer(msg);
                Ok(())
            }
            AgentMessage::AwardAnswer { .. }
            | AgentMessage::JobStarted { .. }
            | AgentMessage::JobOutput { .. }
            | AgentMessage::JobExited { .. }
            | AgentMessage::Running { .. } => {
                self.to_scheduler(msg);
                Ok(())
            }
            AgentMessage::Holdings { datasets } => {
                let redo = self.broker.holdings(&self.name, &datasets);
                if !redo.is_empty() {
                    resume_fetches(&self.broker, &self.fleet, &self.myself, &self.name, redo).await;
                }
                Ok(())
            }
            AgentMessage::FetchDone(report) => {
                let ds = fleetmesh_protocol::data::short(&report.dataset).to_string();
                if report.ok {
                    info!(agent_id = %self.name, dataset = %ds, fetched = report.fetched_chunks, reused = report.reused_chunks, "fetch done");
                } else {
                    warn!(agent_id = %self.name, dataset = %ds, detail = %report.detail, "fetch failed");
                }
                self.broker.fetch_done(&self.name, report);
                Ok(())
            }
            AgentMessage::Interrupted { grace_ms, reason } => {
                warn!(agent_id = %self.name, grace_ms, %reason, "agent interrupted: draining it and moving its attempts");
                let name = self.name.clone();
                let drain = |reply| FleetMsg::Drain { name: name.clone(), draining: true, reply };
                if let Err(e) = ractor::call_t!(self.fleet, drain, INTERRUPT_DRAIN_MS) {
                    warn!(agent_id = %self.name, error = %e, "could not drain the interrupted agent");
                }
                let agent = self.name.clone();
                let _ = self.scheduler.cast(SchedulerMsg::Interrupted { agent, grace_ms, reason });
                Ok(())
            }
            AgentMessage::Renew { csr_pem } => self
                .myself
                .cast(SessionMsg::Renew { csr_pem })
                .map_err(|_| "session stopped".into()),
            AgentMessage::Hello(_) => {
                let why = "second hello on an established session";
                warn!(agent_id = %self.name, why, "protocol error; closing");
                self.conn.close(close_code::PROTOCOL_ERROR.into(), why.as_bytes());
                Err(why.into())
            }
            other => {
                debug!(agent_id = %self.name, ?other, "ignoring unknown agent message");
                Ok(())
            }
        }
    }

    /// Registry and telemetry. Without a Fleet the session is pointless: it ends.
    fn to_fleet(&self, msg: AgentMessage) -> Result<(), Stop> {
        let (name, session_id) = (self.name.clone(), self.session_id);
        let m = match msg {
            AgentMessage::Telemetry(report) => {
                FleetMsg::Telemetry { name, session_id, report: Box::new(report) }
            }
            AgentMessage::Heartbeat { .. } => FleetMsg::Heartbeat { name, session_id },
            AgentMessage::Inventory(inventory) => {
                FleetMsg::Inventory { name, session_id, inventory }
            }
            AgentMessage::Leaving { reason } => {
                info!(agent_id = %name, %reason, "agent is leaving");
                FleetMsg::Leaving { name, session_id, reason }
            }
            _ => return Ok(()),
        };
        self.fleet.cast(m).map_err(|_| "fleet unavailable".into())
    }

    /// Bids and declines. An Auctioneer that is gone stops the coordinator, and the
    /// agent reconnects to its successor: dropping the answer is right.
    fn to_auctioneer(&self, msg: AgentMessage) {
        use crate::placement::auctioneer::AuctioneerMsg;
        let agent = self.name.clone();
        let m = match msg {
            AgentMessage::Bid { auction, gpus, price, eta_ms, local_bytes, health, load } => {
                // A load outside 0..1 (or NaN) from a confused agent counts as fully loaded.
                let load = if (0.0..=1.0).contains(&load) { load } else { 1.0 };
                let bid = BidView { agent, price, eta_ms, gpus, local_bytes, health, load };
                AuctioneerMsg::Bid { auction, bid }
            }
            AgentMessage::Decline { auction, reason } => {
                AuctioneerMsg::Decline { agent, auction, reason }
            }
            _ => return,
        };
        let _ = self.auctioneer.cast(m);
    }

    /// Job events. A Scheduler that is gone stops the coordinator; the agent keeps its
    /// exits until a new one acknowledges them, so dropping here loses nothing.
    fn to_scheduler(&self, msg: AgentMessage) {
        let agent = self.name.clone();
        let m = match msg {
            AgentMessage::AwardAnswer { job, attempt, accepted, reason } => {
                SchedulerMsg::AwardAnswer { agent, job, attempt, accepted, reason }
            }
            AgentMessage::JobStarted { job, attempt, .. } => {
                SchedulerMsg::JobStarted { agent, job, attempt }
            }
            AgentMessage::JobOutput { job, attempt, data, .. } => {
                SchedulerMsg::JobOutput { agent, job, attempt, data }
            }
            AgentMessage::JobExited { job, attempt, outcome, duration_ms, outputs } => {
                SchedulerMsg::JobExited { agent, job, attempt, outcome, duration_ms, outputs }
            }
            AgentMessage::Running { attempts } => SchedulerMsg::Running { agent, attempts },
            _ => return,
        };
        let _ = self.scheduler.cast(m);
    }
}

/// Read frames until the stream ends or fails, dispatching each; then tell the session.
async fn reader_loop(mut recv: quinn::RecvStream, routes: Routes) {
    let reason = loop {
        match read_frame::<AgentMessage>(&mut recv).await {
            Ok(Some(msg)) => {
                if let Err(why) = routes.dispatch(msg).await {
                    break why;
                }
            }
            Ok(None) => break "agent closed its control stream".to_string(),
            Err(FrameError::Codec(e)) => {
                let why = format!("protocol error: {e}");
                warn!(agent_id = %routes.name, error = %e, "closing session on bad frame");
                routes.conn.close(close_code::PROTOCOL_ERROR.into(), why.as_bytes());
                break why;
            }
            Err(e) => break format!("connection lost: {e}"),
        }
    };
    // The session may be gone already (closed from our side): nothing to tell then.
    let _ = routes.myself.cast(SessionMsg::StreamEnded { reason });
}

impl Actor for AgentSession {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        let SessionArgs {
            conn,
            mut send,
            recv,
            identity,
            session_id,
            fleet,
            authority,
            scheduler,
            auctioneer,
            heartbeat_interval,
            broker,
        } = args;
        let name = identity.name.clone();
        let id_for_register = identity.clone();
        ractor::call_t!(
            fleet,
            |reply| FleetMsg::Register {
                identity: id_for_register,
                session_id,
                session: myself.get_derived(),
                remote_ip: conn.remote_address().ip(),
                reply
            },
            5000
        )?;
        let welcome = CoordinatorMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            session_id,
            heartbeat_interval_ms: heartbeat_interval.as_millis() as u64,
        });
        if let Err(e) = write_frame(&mut send, &welcome).await {
            // Without a Fleet the coordinator is stopping anyway.
            let _ = fleet.cast(FleetMsg::SessionClosed {
                name: name.clone(),
                session_id,
                reason: e.to_string(),
            });
            return Err(format!("could not send welcome to {name}: {e}").into());
        }
        let key = CoordinatorMessage::DataPlane { ticket_key: broker.ticket_key() };
        if let Err(e) = write_frame(&mut send, &key).await {
            return Err(format!("could not send the ticket key to {name}: {e}").into());
        }
        let routes = Routes {
            conn: conn.clone(),
            name: name.clone(),
            session_id,
            fleet: fleet.clone(),
            scheduler,
            auctioneer,
            myself,
            broker,
        };
        let reader = tokio::spawn(reader_loop(recv, routes));
        Ok(SessionState {
            conn,
            send,
            name,
            session_id,
            fleet,
            authority,
            identity,
            reader: Some(reader),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        st: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Close { reason } => {
                info!(agent_id = %st.name, session = st.session_id, %reason, "closing session");
                let _ = write_frame(
                    &mut st.send,
                    &CoordinatorMessage::Reject { reason: reason.clone() },
                )
                .await;
                let _ = st.send.finish();
                // Let the Reject frame reach the agent before the close discards it.
                let conn = st.conn.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
                    conn.close(close_code::CLOSED.into(), reason.as_bytes());
                });
                myself.stop(None);
            }
            SessionMsg::Send(msg) => {
                if let Err(e) = write_frame(&mut st.send, &*msg).await {
                    warn!(agent_id = %st.name, error = %e, "could not send to agent");
                }
            }
            SessionMsg::Renew { csr_pem } => {
                let identity = st.identity.clone();
                let answer = match ractor::call_t!(
                    st.authority,
                    |reply| AuthorityMsg::Renew { identity, csr_pem, reply },
                    10_000
                ) {
                    Ok(Ok(cert_pem)) => CoordinatorMessage::Renewed { cert_pem },
                    Ok(Err(reason)) => {
                        CoordinatorMessage::RenewRefused { reason: reason.to_string() }
                    }
                    Err(e) => CoordinatorMessage::RenewRefused {
                        reason: format!("authority unavailable: {e}"),
                    },
                };
                if let Err(e) = write_frame(&mut st.send, &answer).await {
                    warn!(agent_id = %st.name, error = %e, "could not deliver renewal answer");
                }
            }
            SessionMsg::StreamEnded { reason } => {
                // Without a Fleet the coordinator is stopping anyway.
                let _ = st.fleet.cast(FleetMsg::SessionClosed {
                    name: st.name.clone(),
                    session_id: st.session_id,
                    reason,
                });
                myself.stop(None);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SessionMsg>,
        st: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(r) = st.reader.take() {
            r.abort();
        }
        Ok(())
    }
}
