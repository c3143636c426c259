//! `Fleet` actor: the registry of agents, their inventory, latest telemetry, a bounded
//! telemetry history, and liveness.
//!
//! Sessions report frames here tagged with their session id; a frame from a session that
//! is no longer the agent's current one is ignored (fencing), and registering a new
//! session for a name tells the previous session to close. The registry part of each
//! agent (first/last seen, attributes, state) is persisted in the store on every state
//! change (batched: every record changed during a tick is committed in one transaction
//! at the end of that tick, so a thousand agents reconnecting at once cost one fsync, not
//! a thousand) and, for `last_seen` alone, in batches every [`PERSIST_EVERY`]. Commits
//! run on the Fleet's own writer thread ([`crate::persist::writer`]), in order, so the actor keeps
//! answering (the Scheduler asks it for candidates on every tick) while the disk works.

pub mod liveness;
pub mod views;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetmesh_protocol::{GpuEvent, Inventory, PeerIdentity, TelemetryReport};
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};
use tracing::{info, warn};

use self::liveness::{AgentState, LivenessConfig};
use self::views::{AgentDetail, AgentView, GpuPoint, GpuView, HistoryPoint, IngestStats};
use crate::net::agent_link::{SessionHandle, ToSession};
use crate::persist::store::{AgentRecord, Store};

/// After a coordinator restart, agents that were connected get this long to reconnect
/// before the normal liveness clock starts: more than the agents' reconnect backoff cap
/// (5 s) plus a connect timeout, so a restart alone never re-places running jobs.
const RESTART_GRACE: Duration = Duration::from_secs(8);
/// How often dirty `last_seen` values are written to the store.
const PERSIST_EVERY: Duration = Duration::from_secs(5);
/// Recent GPU events kept per agent.
const MAX_EVENTS: usize = 100;
/// Ingest-latency samples kept for percentiles (the most recent ones).
const LATENCY_WINDOW: usize = 100_000;

/// Fleet settings.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub liveness: LivenessConfig,
    /// Telemetry history points kept per agent (one per report).
    pub history_len: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        // 120 points = 2 minutes at the default 1 s interval: enough for live charts,
        // bounded so 2,000 agents x 8 GPUs stay in tens of MB.
        Self { liveness: LivenessConfig::default(), history_len: 120 }
    }
}

/// Messages of the Fleet actor.
/// What the Fleet tells whoever placed work on agents (the Scheduler), through a narrow
/// handle so that the Fleet does not name the Scheduler's messages.
#[derive(Debug)]
pub enum FleetEvent {
    /// The agent left, was lost or was revoked: what ran there must run elsewhere.
    AgentGone { agent: String },
    /// The agent reported its inventory: it can take work (jobs waiting for room may).
    AgentReady { agent: String },
}

pub enum FleetMsg {
    /// The store writer cannot commit any more: the Fleet fails with this reason.
    StoreBroken(String),
    /// A session passed hello; it becomes the agent's current session.
    Register {
        identity: PeerIdentity,
        session_id: u64,
        session: SessionHandle,
        /// Where the agent's connection comes from (its address for gang rendezvous).
        remote_ip: std::net::IpAddr,
        reply: RpcReplyPort<()>,
    },
    Inventory {
        name: String,
        session_id: u64,
        inventory: Inventory,
    },
    Telemetry {
        name: String,
        session_id: u64,
        report: Box<TelemetryReport>,
    },
    Heartbeat {
        name: String,
        session_id: u64,
    },
    Leaving {
        name: String,
        session_id: u64,
        reason: String,
    },
    SessionClosed {
        name: String,
        session_id: u64,
        reason: String,
    },
    /// The Authority revoked this agent: close its session now.
    Revoked {
        name: String,
        reason: String,
    },
    /// Who gets told when agents go away (the Scheduler).
    SetScheduler(DerivedActorRef<FleetEvent>),
    /// Placement view of every agent.
    Candidates(RpcReplyPort<Vec<crate::placement::auction::Candidate>>),
    /// Stop (or resume) new awards to an agent.
    Drain {
        name: String,
        draining: bool,
        reply: RpcReplyPort<bool>,
    },
    Tick,
    ListAgents(RpcReplyPort<Vec<AgentView>>),
    GetAgent(String, RpcReplyPort<Option<AgentDetail>>),
    ListGpus(RpcReplyPort<Vec<GpuView>>),
    /// Ingest statistics over reports applied at or after the given time (ms since epoch).
    Ingest(u64, RpcReplyPort<IngestStats>),
}

struct AgentEntry {
    record: AgentRecord,
    last_heard: Instant,
    session: Option<(u64, SessionHandle)>,
    inventory: Option<Inventory>,
    latest: Option<Box<TelemetryReport>>,
    history: VecDeque<HistoryPoint>,
    events: VecDeque<GpuEvent>,
    dirty: bool,
    remote_ip: Option<std::net::IpAddr>,
    /// (model, free memory) per GPU of the latest report, kept when a report or the
    /// inventory arrives rather than rebuilt for every auction tick.
    free_gpus: Vec<(String, u64)>,
}

impl AgentEntry {
    /// An entry with no session, inventory or telemetry yet.
    fn new(record: AgentRecord, last_heard: Instant) -> Self {
        Self {
            record,
            last_heard,
            session: None,
            inventory: None,
            latest: None,
            history: VecDeque::new(),
            events: VecDeque::new(),
            dirty: false,
            remote_ip: None,
            free_gpus: Vec::new(),
        }
    }
}

/// Actor state.
pub struct FleetState {
    cfg: FleetConfig,
    /// Commits agent records off the actor, in order.
    writer: crate::persist::writer::Writer<crate::persist::writer::Agents>,
    agents: BTreeMap<String, AgentEntry>,
    last_persist: Instant,
    /// Agents whose state/attributes changed and must be committed at the next tick.
    changed: std::collections::BTreeSet<String>,
    applied: u64,
    stale: u64,
    /// (applied at, ms since epoch; sample-to-apply latency, µs).
    latencies_us: VecDeque<(u64, u32)>,
    _ticker: Option<ractor::concurrency::JoinHandle<()>>,
    scheduler: Option<DerivedActorRef<FleetEvent>>,
    revocations: Arc<crate::trust::revocations::Revocations>,
    /// Kept in step with every agent's current session (`sync_link`).
    link: Arc<crate::net::agent_link::AgentLink>,
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

use fleetmesh_data::now_unix_ms as unix_ms;

impl FleetState {
    /// A session passed hello: it becomes the agent's current one. It learns the
    /// deny-list first (delivered after its welcome).
    fn on_register(
        &mut self,
        identity: PeerIdentity,
        session_id: u64,
        session: SessionHandle,
        remote_ip: std::net::IpAddr,
        now: Instant,
    ) {
        let name = identity.name.clone();
        if !self.revocations.is_empty() {
            // A session that is already gone needs no list.
            let _ = session.send_message(ToSession::Send(Box::new(self.revocations.denied())));
        }
        self.register(identity, session_id, session, now);
        self.sync_link(&name);
        if let Some(e) = self.agents.get_mut(&name) {
            e.remote_ip = Some(remote_ip);
        }
    }

    fn on_inventory(&mut self, name: &str, session_id: u64, inventory: Inventory, now: Instant) {
        if !self.heard(name, session_id, now) {
            return;
        }
        let Some(e) = self.agents.get_mut(name) else { return };
        info!(agent_id = %name, gpus = inventory.gpus.len(), source = inventory.gpu_source.label(), "inventory received");
        let host_changed = e.record.hostname.as_deref() != Some(inventory.host.hostname.as_str());
        e.record.hostname = Some(inventory.host.hostname.clone());
        e.inventory = Some(inventory);
        FleetState::refresh_free_gpus(e);
        if host_changed {
            self.changed.insert(name.to_string());
        }
        if let Some(s) = &self.scheduler {
            // A Scheduler that is gone is stopping the coordinator anyway.
            let _ = s.send_message(FleetEvent::AgentReady { agent: name.to_string() });
        }
    }

    /// The agent said goodbye on its current session.
    fn on_leaving(&mut self, name: &str, session_id: u64, reason: &str, now: Instant) {
        if self.current(name, session_id, now).is_none() {
            return;
        }
        if let Some(e) = self.agents.get_mut(name) {
            e.session = None;
        }
        self.sync_link(name);
        self.set_state(name, AgentState::Left, reason);
    }

    /// A session ended; liveness (not the transport) decides when the agent is lost.
    fn on_session_closed(&mut self, name: &str, session_id: u64, reason: &str) {
        if let Some(e) = self.agents.get_mut(name) {
            if e.session.as_ref().is_some_and(|(sid, _)| *sid == session_id) {
                e.session = None;
                info!(agent_id = %name, session = session_id, %reason, "session closed");
            }
        }
        self.sync_link(name);
    }

    /// The Authority revoked the agent: its session closes now, and every holder learns
    /// to refuse it (its tickets may outlive the revocation).
    fn on_revoked(&mut self, name: &str, reason: &str) {
        if let Some((_, session)) = self.agents.get_mut(name).and_then(|e| e.session.take()) {
            // Gone already is as good as closed.
            let _ = session.send_message(ToSession::Close {
                reason: format!("certificate revoked: {reason}"),
            });
        }
        self.sync_link(name);
        self.set_state(name, AgentState::Revoked, reason);
        self.flush_changed();
        let denied = self.revocations.denied();
        for (_, s) in self.agents.values().filter_map(|e| e.session.as_ref()) {
            // A session that is gone has no data port to protect.
            let _ = s.send_message(ToSession::Send(Box::new(denied.clone())));
        }
    }

    /// Stop (or resume) new awards to an agent; whether it exists.
    fn drain(&mut self, name: &str, draining: bool) -> bool {
        let Some(e) = self.agents.get_mut(name) else { return false };
        e.record.draining = draining;
        info!(agent_id = %name, draining, "drain changed");
        self.changed.insert(name.to_string());
        self.flush_changed();
        true
    }

    /// Make the agent link say what `name`'s entry says about its current session.
    fn sync_link(&self, name: &str) {
        match self.agents.get(name).and_then(|e| e.session.as_ref()) {
            Some((sid, s)) => self.link.register(name, *sid, s.clone()),
            None => {
                self.link.remove(name);
            }
        }
    }

    /// Queue these agents' records for commit (see [`crate::persist::writer`]).
    fn persist(&self, names: &[&str]) {
        let recs: Vec<AgentRecord> =
            names.iter().filter_map(|n| self.agents.get(*n)).map(|e| e.record.clone()).collect();
        self.writer.commit(crate::persist::writer::Agents(recs));
    }

    /// Commit every record changed since the last call (one transaction).
    fn flush_changed(&mut self) {
        if self.changed.is_empty() {
            return;
        }
        let names: Vec<String> = std::mem::take(&mut self.changed).into_iter().collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        self.persist(&refs);
    }

    fn set_state(&mut self, name: &str, state: AgentState, why: &str) {
        let Some(e) = self.agents.get_mut(name) else { return };
        if e.record.state == state {
            return;
        }
        let from = e.record.state;
        e.record.state = state;
        match state {
            AgentState::Lost => warn!(agent_id = %name, from = from.as_str(), why, "agent lost"),
            _ => {
                info!(agent_id = %name, from = from.as_str(), to = state.as_str(), why, "agent state changed")
            }
        }
        self.changed.insert(name.to_string());
        if state == AgentState::Lost {
            // A lost agent's jobs are placed elsewhere: if it was only cut off, it must
            // come back through a new session (hello, then reconciliation of what it runs)
            // rather than resume the old one.
            let taken = self.agents.get_mut(name).and_then(|e| e.session.take());
            self.sync_link(name);
            if let Some((_, s)) = taken {
                // A session that is gone is as good as closed.
                let _ = s.send_message(ToSession::Close {
                    reason: "declared lost after missing heartbeats".into(),
                });
            }
        }
        if matches!(state, AgentState::Lost | AgentState::Left | AgentState::Revoked) {
            if let Some(s) = &self.scheduler {
                // A Scheduler that is gone is stopping the coordinator anyway.
                let _ = s.send_message(FleetEvent::AgentGone { agent: name.to_string() });
            }
        }
    }

    /// The entry if `session_id` is the agent's current session; marks it heard.
    fn current(&mut self, name: &str, session_id: u64, now: Instant) -> Option<&mut AgentEntry> {
        let e = self.agents.get_mut(name)?;
        match &e.session {
            Some((sid, _)) if *sid == session_id => {
                e.last_heard = now;
                e.record.last_seen_unix_ms = unix_ms();
                e.dirty = true;
                Some(e)
            }
            _ => None,
        }
    }

    fn heard(&mut self, name: &str, session_id: u64, now: Instant) -> bool {
        let Some(e) = self.current(name, session_id, now) else {
            self.stale += 1;
            return false;
        };
        let next = liveness::on_heard(e.record.state);
        if next != e.record.state {
            self.set_state(name, next, "frame received");
        }
        true
    }

    fn register(
        &mut self,
        identity: PeerIdentity,
        session_id: u64,
        session: SessionHandle,
        now: Instant,
    ) {
        let name = identity.name.clone();
        let ms = unix_ms();
        let previous = self.agents.get(&name).map(|e| e.record.state.as_str()).unwrap_or("new");
        let entry = self.agents.entry(name.clone()).or_insert_with(|| {
            AgentEntry::new(
                AgentRecord {
                    name: name.clone(),
                    spiffe_id: identity.spiffe_id(),
                    attributes: identity.attributes.clone(),
                    state: AgentState::Connected,
                    first_seen_unix_ms: ms,
                    last_seen_unix_ms: ms,
                    cert_serial: identity.serial.clone(),
                    hostname: None,
                    draining: false,
                },
                now,
            )
        });
        if let Some((old_id, old)) = entry.session.take() {
            if old_id != session_id {
                info!(agent_id = %name, old_session = old_id, new_session = session_id, "replacing previous session");
                // A session that is gone is as good as closed.
                let _ = old.send_message(ToSession::Close {
                    reason: "replaced by a newer session of the same agent".into(),
                });
            }
        }
        // Attributes always come from the certificate of the newest session.
        entry.record.spiffe_id = identity.spiffe_id();
        entry.record.attributes = identity.attributes;
        entry.record.cert_serial = identity.serial;
        entry.record.last_seen_unix_ms = ms;
        entry.last_heard = now;
        entry.session = Some((session_id, session));
        entry.record.state = AgentState::Connected;
        info!(agent_id = %name, session = session_id, previous, "agent connected");
        self.changed.insert(name);
    }

    fn apply_telemetry(
        &mut self,
        name: &str,
        session_id: u64,
        report: Box<TelemetryReport>,
        now: Instant,
    ) {
        if !self.heard(name, session_id, now) {
            return;
        }
        let now_us = unix_us();
        let applied_at = now_us / 1000;
        let lat_us = now_us.saturating_sub(report.sampled_at_unix_us);
        self.applied += 1;
        if self.latencies_us.len() == LATENCY_WINDOW {
            self.latencies_us.pop_front();
        }
        self.latencies_us.push_back((applied_at, lat_us.min(u64::from(u32::MAX)) as u32));
        let history_len = self.cfg.history_len;
        let Some(e) = self.agents.get_mut(name) else { return };
        for ev in &report.events {
            warn!(agent_id = %name, gpu = %ev.uuid, kind = ?ev.kind, "GPU health event");
            if e.events.len() == MAX_EVENTS {
                e.events.pop_front();
            }
            e.events.push_back(ev.clone());
        }
        if e.history.len() >= history_len {
            e.history.pop_front();
        }
        if history_len > 0 {
            e.history.push_back(HistoryPoint {
                at_unix_ms: report.sampled_at_unix_us / 1000,
                cpu_utilization_percent: report.host.cpu_utilization_percent,
                memory_used_bytes: report.host.memory_used_bytes,
                gpus: report
                    .gpus
                    .iter()
                    .map(|g| GpuPoint {
                        index: g.index,
                        utilization_gpu: g.utilization_gpu_percent,
                        memory_used_bytes: g.memory_used_bytes,
                        temperature_c: g.temperature_c,
                        power_w: g.power_w.map(|p| p as f32),
                    })
                    .collect(),
            });
        }
        e.latest = Some(report);
        Self::refresh_free_gpus(e);
    }

    fn tick(&mut self, now: Instant) {
        let cfg = self.cfg.liveness;
        let changes: Vec<(String, AgentState)> = self
            .agents
            .iter()
            .filter_map(|(n, e)| {
                let next = liveness::next_state(e.record.state, e.last_heard, now, &cfg);
                (next != e.record.state).then(|| (n.clone(), next))
            })
            .collect();
        for (n, s) in changes {
            self.set_state(&n, s, "no frames from the agent");
        }
        self.flush_changed();
        if now.duration_since(self.last_persist) >= PERSIST_EVERY {
            self.last_persist = now;
            let dirty: Vec<String> =
                self.agents.iter().filter(|(_, e)| e.dirty).map(|(n, _)| n.clone()).collect();
            let names: Vec<&str> = dirty.iter().map(String::as_str).collect();
            self.persist(&names);
            for n in dirty {
                if let Some(e) = self.agents.get_mut(&n) {
                    e.dirty = false;
                }
            }
        }
    }

    fn gpu_views(name: &str, e: &AgentEntry) -> Vec<GpuView> {
        let Some(inv) = &e.inventory else { return Vec::new() };
        inv.gpus
            .iter()
            .map(|g| {
                let s = e.latest.as_ref().and_then(|r| r.gpus.iter().find(|s| s.uuid == g.uuid));
                GpuView {
                    agent: name.to_string(),
                    index: g.index,
                    uuid: g.uuid.clone(),
                    name: g.name.clone(),
                    simulated: g.simulated,
                    utilization_gpu: s.and_then(|s| s.utilization_gpu_percent),
                    utilization_memory: s.and_then(|s| s.utilization_memory_percent),
                    memory_used_bytes: s.and_then(|s| s.memory_used_bytes),
                    memory_total_bytes: s
                        .and_then(|s| s.memory_total_bytes)
                        .unwrap_or(g.memory_total_bytes),
                    memory_free_bytes: s.and_then(|s| s.memory_free_bytes),
                    temperature_c: s.and_then(|s| s.temperature_c),
                    power_w: s.and_then(|s| s.power_w),
                    power_limit_w: s.and_then(|s| s.power_limit_w),
                    energy_mj: s.and_then(|s| s.energy_mj),
                    sm_clock_mhz: s.and_then(|s| s.sm_clock_mhz),
                    memory_clock_mhz: s.and_then(|s| s.memory_clock_mhz),
                    throttle_reasons: s.and_then(|s| s.throttle_reasons.clone()),
                    throttle_reasons_mask: s.and_then(|s| s.throttle_reasons_mask),
                    ecc_corrected_volatile: s.and_then(|s| s.ecc_corrected_volatile),
                    ecc_uncorrected_volatile: s.and_then(|s| s.ecc_uncorrected_volatile),
                    pcie_rx_kib_per_s: s.and_then(|s| s.pcie_rx_kib_per_s),
                    pcie_tx_kib_per_s: s.and_then(|s| s.pcie_tx_kib_per_s),
                    mig_enabled: s.and_then(|s| s.mig_enabled),
                    processes: s.and_then(|s| s.processes.clone()),
                    pci_bus_id: g.pci_bus_id.clone(),
                }
            })
            .collect()
    }

    /// Recompute [`AgentEntry::free_gpus`] (after a report or an inventory).
    fn refresh_free_gpus(e: &mut AgentEntry) {
        e.free_gpus = match (&e.inventory, &e.latest) {
            (Some(inv), Some(r)) => r
                .gpus
                .iter()
                .map(|g| {
                    let name = inv
                        .gpus
                        .iter()
                        .find(|i| i.uuid == g.uuid)
                        .map(|i| i.name.clone())
                        .unwrap_or_default();
                    (name, g.memory_free_bytes.unwrap_or(0))
                })
                .collect(),
            _ => Vec::new(),
        };
    }

    fn candidate(name: &str, e: &AgentEntry) -> crate::placement::auction::Candidate {
        let inv = e.inventory.as_ref();
        // Where peers reach it: what it advertises, else where its connection comes from.
        let advertised = inv.and_then(|i| i.advertise_addr.as_deref()).and_then(|a| a.parse().ok());
        let reach_ip: Option<std::net::IpAddr> = advertised.or(e.remote_ip);
        crate::placement::auction::Candidate {
            agent: name.to_string(),
            connected: e.record.state == AgentState::Connected
                && e.session.is_some()
                && inv.is_some(),
            draining: e.record.draining,
            region: e.record.attributes.region.clone(),
            jurisdiction: e.record.attributes.jurisdiction.clone(),
            provider: e.record.attributes.provider.clone(),
            // Labels the node reports, overridden by labels granted in its certificate.
            labels: inv
                .map(|i| i.labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>())
                .unwrap_or_default()
                .into_iter()
                .chain(e.record.attributes.labels.clone())
                .collect(),
            spot: inv.is_some_and(|i| i.spot),
            price_per_hour: inv.map(|i| i.price_per_hour).unwrap_or(0.0),
            free_gpus: e.free_gpus.clone(),
            gpu_uuids: inv
                .map(|i| i.gpus.iter().map(|g| g.uuid.clone()).collect())
                .unwrap_or_default(),
            cpus: inv.map(|i| i.host.cpu_count).unwrap_or(0),
            memory_bytes: inv.map(|i| i.host.memory_total_bytes).unwrap_or(0),
            used_cpus: 0.0,
            used_memory_bytes: 0,
            addr: reach_ip.map(|ip| ip.to_string()),
            data_addr: match (reach_ip, inv.and_then(|i| i.data_port)) {
                (Some(ip), Some(port)) => Some(std::net::SocketAddr::new(ip, port).to_string()),
                _ => None,
            },
            hostname: inv.map(|i| i.host.hostname.clone()),
            host_addrs: inv.map(|i| i.host_addrs.clone()).unwrap_or_default(),
        }
    }

    fn agent_view(name: &str, e: &AgentEntry) -> AgentView {
        let r = &e.record;
        let inv = e.inventory.as_ref();
        AgentView {
            name: name.to_string(),
            spiffe_id: r.spiffe_id.clone(),
            state: r.state,
            region: r.attributes.region.clone(),
            jurisdiction: r.attributes.jurisdiction.clone(),
            provider: r.attributes.provider.clone(),
            first_seen: views::rfc3339_ms(r.first_seen_unix_ms),
            last_seen: views::rfc3339_ms(r.last_seen_unix_ms),
            last_seen_unix_ms: r.last_seen_unix_ms,
            gpu_source: inv
                .map(|i| i.gpu_source.label().to_string())
                .unwrap_or_else(|| "unknown".into()),
            hostname: inv.map(|i| i.host.hostname.clone()).or_else(|| r.hostname.clone()),
            os: inv.map(|i| i.host.os.clone()),
            kernel: inv.map(|i| i.host.kernel.clone()),
            agent_version: inv.map(|i| i.host.agent_version.clone()),
            cpu_count: inv.map(|i| i.host.cpu_count),
            host: e.latest.as_ref().map(|l| l.host.clone()),
            gpus: Self::gpu_views(name, e),
            pool: r.attributes.labels.get(crate::autoscale::pools::POOL_LABEL).cloned(),
        }
    }

    fn ingest_stats(&self, since_unix_ms: u64) -> IngestStats {
        let mut v: Vec<u32> = self
            .latencies_us
            .iter()
            .filter(|(at, _)| *at >= since_unix_ms)
            .map(|(_, l)| *l)
            .collect();
        v.sort_unstable();
        let pct = |p: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let i = ((v.len() as f64 - 1.0) * p).round() as usize;
            f64::from(v[i.min(v.len() - 1)]) / 1000.0
        };
        IngestStats {
            reports_applied: self.applied,
            reports_ignored_stale: self.stale,
            window: v.len() as u64,
            ingest_p50_ms: pct(0.50),
            ingest_p99_ms: pct(0.99),
            ingest_max_ms: v.last().map(|m| f64::from(*m) / 1000.0).unwrap_or(0.0),
        }
    }
}

/// The Fleet actor.
pub struct Fleet;

/// Start-up arguments.
pub struct FleetArgs {
    pub cfg: FleetConfig,
    pub store: Arc<Store>,
    /// Revoked identities, which every agent's data port must refuse.
    pub revocations: Arc<crate::trust::revocations::Revocations>,
    /// The directory everyone delivers to agents through; the Fleet keeps it current.
    pub link: Arc<crate::net::agent_link::AgentLink>,
}

impl Actor for Fleet {
    type Msg = FleetMsg;
    type State = FleetState;
    type Arguments = FleetArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<FleetMsg>,
        args: FleetArgs,
    ) -> Result<FleetState, ActorProcessingErr> {
        let now = Instant::now();
        let mut agents = BTreeMap::new();
        for mut record in args.store.agents()? {
            // After a coordinator restart nobody is connected yet: agents that were up get
            // the normal grace period to reconnect before they are declared lost.
            if matches!(record.state, AgentState::Connected) {
                record.state = AgentState::Suspect;
            }
            agents.insert(record.name.clone(), AgentEntry::new(record, now + RESTART_GRACE));
        }
        info!(agents = agents.len(), "agent registry loaded");
        let ticker = myself.send_interval(args.cfg.liveness.tick, || FleetMsg::Tick);
        Ok(FleetState {
            cfg: args.cfg,
            writer: crate::persist::writer::Writer::spawn(
                "fleet-writer",
                args.store,
                args.link.clone(),
                {
                    let me = myself.clone();
                    Box::new(move |why| {
                        // The actor fails with the reason, which stops the coordinator.
                        let _ = me.cast(FleetMsg::StoreBroken(why));
                    })
                },
            )?,
            agents,
            last_persist: now,
            changed: Default::default(),
            applied: 0,
            stale: 0,
            latencies_us: VecDeque::new(),
            _ticker: Some(ticker),
            scheduler: None,
            revocations: args.revocations,
            link: args.link,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<FleetMsg>,
        state: &mut FleetState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state._ticker.take() {
            t.abort();
        }
        let names: Vec<String> = state.agents.keys().cloned().collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        state.persist(&refs);
        let _ = state.writer.barrier().await;
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<FleetMsg>,
        msg: FleetMsg,
        st: &mut FleetState,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match msg {
            FleetMsg::StoreBroken(why) => return Err(why.into()),
            FleetMsg::Register { identity, session_id, session, remote_ip, reply } => {
                st.on_register(identity, session_id, session, remote_ip, now);
                // The session waits for this before its welcome; it may have given up.
                crate::answer(reply, ());
            }
            FleetMsg::Inventory { name, session_id, inventory } => {
                st.on_inventory(&name, session_id, inventory, now)
            }
            FleetMsg::Telemetry { name, session_id, report } => {
                st.apply_telemetry(&name, session_id, report, now)
            }
            FleetMsg::Heartbeat { name, session_id } => {
                st.heard(&name, session_id, now);
            }
            FleetMsg::Leaving { name, session_id, reason } => {
                st.on_leaving(&name, session_id, &reason, now)
            }
            FleetMsg::SessionClosed { name, session_id, reason } => {
                st.on_session_closed(&name, session_id, &reason)
            }
            FleetMsg::Revoked { name, reason } => st.on_revoked(&name, &reason),
            FleetMsg::SetScheduler(s) => st.scheduler = Some(s),
            FleetMsg::Candidates(reply) => {
                let v = st.agents.iter().map(|(n, e)| FleetState::candidate(n, e)).collect();
                crate::answer(reply, v);
            }
            FleetMsg::Drain { name, draining, reply } => {
                let found = st.drain(&name, draining);
                // Answered once durable, if the caller still waits.
                st.writer.after(move || {
                    crate::answer(reply, found);
                });
            }
            FleetMsg::Tick => st.tick(now),
            FleetMsg::ListAgents(reply) => {
                let v = st.agents.iter().map(|(n, e)| FleetState::agent_view(n, e)).collect();
                crate::answer(reply, v);
            }
            FleetMsg::GetAgent(name, reply) => {
                let d = st.agents.get(&name).map(|e| AgentDetail {
                    agent: FleetState::agent_view(&name, e),
                    cert_serial: e.record.cert_serial.clone(),
                    history: e.history.iter().cloned().collect(),
                    recent_events: e.events.iter().cloned().collect(),
                });
                crate::answer(reply, d);
            }
            FleetMsg::ListGpus(reply) => {
                let v = st.agents.iter().flat_map(|(n, e)| FleetState::gpu_views(n, e)).collect();
                crate::answer(reply, v);
            }
            FleetMsg::Ingest(since, reply) => {
                crate::answer(reply, st.ingest_stats(since));
            }
        }
        Ok(())
    }
}
