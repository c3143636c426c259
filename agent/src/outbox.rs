//! Events waiting for a session to deliver them (job events, holdings, fetch reports):
//! shared by the job table and the data plane, drained by whichever session is current,
//! so attempts keep running and reporting while the coordinator is away.

use std::collections::VecDeque;
use std::sync::Mutex;

use fleetmesh_protocol::AgentMessage;
use tokio::sync::Notify;

/// Queued events kept while disconnected; output chunks are dropped first.
const MAX_OUTBOX: usize = 10_000;

/// Events waiting for a session to deliver them.
#[derive(Debug, Default)]
pub struct Outbox {
    q: Mutex<VecDeque<AgentMessage>>,
    pub notify: Notify,
}

impl Outbox {
    pub fn push(&self, m: AgentMessage) {
        if let Ok(mut q) = self.q.lock() {
            if q.len() >= MAX_OUTBOX && matches!(m, AgentMessage::JobOutput { .. }) {
                return;
            }
            q.push_back(m);
        }
        self.notify.notify_one();
    }
    pub fn drain(&self) -> Vec<AgentMessage> {
        self.q.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default()
    }
    /// Put messages back at the front (a write failed).
    pub fn requeue(&self, msgs: Vec<AgentMessage>) {
        if let Ok(mut q) = self.q.lock() {
            for m in msgs.into_iter().rev() {
                q.push_front(m);
            }
        }
    }
}
