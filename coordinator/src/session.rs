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

use crate::authority::AuthorityMsg;
use crate::fleet::FleetMsg;
use crate::scheduler::SchedulerMsg;

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
    pub auctioneer: ActorRef<crate::auctioneer::AuctioneerMsg>,
    pub heartbeat_interval: Duration,
    pub broker: std::sync::Arc<crate::broker::DataBroker>,
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
    broker: &crate::broker::DataBroker,
    fleet: &ActorRef<FleetMsg>,
    myself: &ActorRef<SessionMsg>,
    name: &str,
    datasets: Vec<String>,
) {
    let Ok(cands) = ractor::call_t!(fleet, FleetMsg::Candidates, 5000) else { return };
    let me = crate::broker::Requester {
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
                fleetmesh_protocol::FetchReport::without_transfer(id, false, why),
            ),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn reader_loop(
    mut recv: quinn::RecvStream,
    conn: quinn::Connection,
    name: String,
    session_id: u64,
    fleet: ActorRef<FleetMsg>,
    scheduler: ActorRef<SchedulerMsg>,
    auctioneer: ActorRef<crate::auctioneer::AuctioneerMsg>,
    myself: ActorRef<SessionMsg>,
    broker: std::sync::Arc<crate::broker::DataBroker>,
) {
    let to_scheduler = |m: SchedulerMsg| scheduler.cast(m).map_err(|_| ());
    let reason = loop {
        match read_frame::<AgentMessage>(&mut recv).await {
            Ok(Some(msg)) => {
                let sent = match msg {
                    AgentMessage::Telemetry(report) => fleet.cast(FleetMsg::Telemetry {
                        name: name.clone(),
                        session_id,
                        report: Box::new(report),
                    }),
                    AgentMessage::Heartbeat { .. } => {
                        fleet.cast(FleetMsg::Heartbeat { name: name.clone(), session_id })
                    }
                    AgentMessage::Inventory(inventory) => fleet.cast(FleetMsg::Inventory {
                        name: name.clone(),
                        session_id,
                        inventory,
                    }),
                    AgentMessage::Bid { auction, gpus, price, eta_ms, local_bytes, health } => {
                        let _ = auctioneer.cast(crate::auctioneer::AuctioneerMsg::Bid {
                            agent: name.clone(),
                            auction,
                            gpus,
                            price,
                            eta_ms,
                            local_bytes,
                            health,
                        });
                        Ok(())
                    }
                    AgentMessage::Decline { auction, reason } => {
                        let _ = auctioneer.cast(crate::auctioneer::AuctioneerMsg::Decline {
                            agent: name.clone(),
                            auction,
                            reason,
                        });
                        Ok(())
                    }
                    AgentMessage::AwardAnswer { job, attempt, accepted, reason } => {
                        let _ = to_scheduler(SchedulerMsg::AwardAnswer {
                            agent: name.clone(),
                            job,
                            attempt,
                            accepted,
                            reason,
                        });
                        Ok(())
                    }
                    AgentMessage::JobStarted { job, attempt, .. } => {
                        let _ = to_scheduler(SchedulerMsg::JobStarted {
                            agent: name.clone(),
                            job,
                            attempt,
                        });
                        Ok(())
                    }
                    AgentMessage::JobOutput { job, attempt, data, .. } => {
                        let _ = to_scheduler(SchedulerMsg::JobOutput {
                            agent: name.clone(),
                            job,
                            attempt,
                            data,
                        });
                        Ok(())
                    }
                    AgentMessage::JobExited { job, attempt, outcome, duration_ms, outputs } => {
                        let _ = to_scheduler(SchedulerMsg::JobExited {
                            agent: name.clone(),
                            job,
                            attempt,
                            outcome,
                            duration_ms,
                            outputs,
                        });
                        Ok(())
                    }
                    AgentMessage::Holdings { datasets } => {
                        let redo = broker.holdings(&name, &datasets);
                        if !redo.is_empty() {
                            resume_fetches(&broker, &fleet, &myself, &name, redo).await;
                        }
                        Ok(())
                    }
                    AgentMessage::FetchDone(report) => {
                        if report.ok {
                            info!(agent_id = %name, dataset = %fleetmesh_protocol::data::short(&report.dataset), fetched = report.fetched_chunks, reused = report.reused_chunks, "fetch done");
                        } else {
                            warn!(agent_id = %name, dataset = %fleetmesh_protocol::data::short(&report.dataset), detail = %report.detail, "fetch failed");
                        }
                        broker.fetch_done(&name, report);
                        Ok(())
                    }
                    AgentMessage::Running { attempts } => {
                        let _ =
                            to_scheduler(SchedulerMsg::Running { agent: name.clone(), attempts });
                        Ok(())
                    }
                    AgentMessage::Renew { csr_pem } => {
                        if myself.cast(SessionMsg::Renew { csr_pem }).is_err() {
                            break "session stopped".to_string();
                        }
                        Ok(())
                    }
                    AgentMessage::Leaving { reason } => {
                        info!(agent_id = %name, %reason, "agent is leaving");
                        fleet.cast(FleetMsg::Leaving { name: name.clone(), session_id, reason })
                    }
                    AgentMessage::Hello(_) => {
                        let why = "second hello on an established session";
                        warn!(agent_id = %name, why, "protocol error; closing");
                        conn.close(close_code::PROTOCOL_ERROR.into(), why.as_bytes());
                        break why.to_string();
                    }
                    other => {
                        debug!(agent_id = %name, ?other, "ignoring unknown agent message");
                        Ok(())
                    }
                };
                if sent.is_err() {
                    break "fleet unavailable".to_string();
                }
            }
            Ok(None) => break "agent closed its control stream".to_string(),
            Err(FrameError::Codec(e)) => {
                let why = format!("protocol error: {e}");
                warn!(agent_id = %name, error = %e, "closing session on bad frame");
                conn.close(close_code::PROTOCOL_ERROR.into(), why.as_bytes());
                break why;
            }
            Err(e) => break format!("connection lost: {e}"),
        }
    };
    let _ = myself.cast(SessionMsg::StreamEnded { reason });
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
                session: myself.clone(),
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
        let reader = tokio::spawn(reader_loop(
            recv,
            conn.clone(),
            name.clone(),
            session_id,
            fleet.clone(),
            scheduler,
            auctioneer,
            myself,
            broker,
        ));
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
                    Ok(Err(reason)) => CoordinatorMessage::RenewRefused { reason },
                    Err(e) => CoordinatorMessage::RenewRefused {
                        reason: format!("authority unavailable: {e}"),
                    },
                };
                if let Err(e) = write_frame(&mut st.send, &answer).await {
                    warn!(agent_id = %st.name, error = %e, "could not deliver renewal answer");
                }
            }
            SessionMsg::StreamEnded { reason } => {
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
