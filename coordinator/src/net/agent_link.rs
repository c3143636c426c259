//! `AgentLink`: the one directory that delivers messages to connected agents.
//!
//! It maps an agent's name to its current session (with the session's id). The Fleet
//! registers a session when it becomes the agent's current one and removes it when that
//! session ends, so the directory never keeps a dead session. Everyone else that talks to
//! agents (the Scheduler through its writer, the Auctioneer, the Fleet, the Api) sends
//! through it: no actor keeps a copy of its own, and nobody forwards `SessionUp`.
//!
//! A message for an agent with no current session is dropped and counted: whoever sent
//! it reconciles when the agent comes back (the Scheduler's `Running`/`Keep` exchange,
//! exits re-sent until acknowledged).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use fleetmesh_protocol::CoordinatorMessage;
use ractor::DerivedActorRef;

/// What other actors may ask of an agent's session (the session actor's own message
/// type stays with it; everyone else holds a [`SessionHandle`]).
#[derive(Debug)]
pub enum ToSession {
    /// Write a message to the agent.
    Send(Box<CoordinatorMessage>),
    /// Close the session, telling the agent why.
    Close { reason: String },
}

/// A narrow handle on a session actor.
pub type SessionHandle = DerivedActorRef<ToSession>;

/// Agent name -> (session id, session actor).
type Sessions = HashMap<String, (u64, SessionHandle)>;

/// Tests only: what receives every message instead of a session.
#[cfg(test)]
type Recorder = Box<dyn Fn(&str, CoordinatorMessage) + Send + Sync>;

/// The directory (shared as `Arc<AgentLink>`).
#[derive(Default)]
pub struct AgentLink {
    sessions: RwLock<Sessions>,
    /// Messages for agents without a session.
    pub undeliverable: AtomicU64,
    #[cfg(test)]
    recorder: Option<Recorder>,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink").finish_non_exhaustive()
    }
}

impl AgentLink {
    /// `session` (id `session_id`) is now `agent`'s current session.
    pub fn register(&self, agent: &str, session_id: u64, session: SessionHandle) {
        if let Ok(mut m) = self.sessions.write() {
            m.insert(agent.to_string(), (session_id, session));
        }
    }

    /// Session `session_id` of `agent` ended; a newer session stays.
    pub fn unregister(&self, agent: &str, session_id: u64) {
        if let Ok(mut m) = self.sessions.write() {
            if m.get(agent).is_some_and(|(sid, _)| *sid == session_id) {
                m.remove(agent);
            }
        }
    }

    /// Forget whatever session `agent` has (it was revoked or declared lost).
    pub fn remove(&self, agent: &str) -> Option<SessionHandle> {
        self.sessions.write().ok()?.remove(agent).map(|(_, s)| s)
    }

    /// Agents with a current session.
    pub fn connected(&self) -> Vec<String> {
        self.sessions.read().map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// Deliver `msg` to `agent`'s current session; false when it has none.
    pub fn send(&self, agent: &str, msg: CoordinatorMessage) -> bool {
        #[cfg(test)]
        if let Some(r) = &self.recorder {
            r(agent, msg);
            return true;
        }
        let session = self.sessions.read().ok().and_then(|m| m.get(agent).map(|(_, s)| s.clone()));
        // A session that stopped between the lookup and the cast drops the message like
        // a missing one would: the agent reconciles when it reconnects.
        let sent = session.is_some_and(|s| s.send_message(ToSession::Send(Box::new(msg))).is_ok());
        if !sent {
            self.undeliverable.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Tests: a link that records every message instead of delivering it.
    #[cfg(test)]
    pub fn recording(
    ) -> (std::sync::Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<(String, CoordinatorMessage)>)
    {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let link = Self::calling(move |agent, msg| {
            // A test that stopped reading has seen what it needed.
            let _ = tx.send((agent.to_string(), msg));
        });
        (link, rx)
    }

    /// Tests: a link that calls `f` with every message, at the moment it is delivered.
    #[cfg(test)]
    pub fn calling(
        f: impl Fn(&str, CoordinatorMessage) + Send + Sync + 'static,
    ) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self { recorder: Some(Box::new(f)), ..Default::default() })
    }
}
