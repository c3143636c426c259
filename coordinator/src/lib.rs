//! Fleetmesh coordinator.
//!
//! Supervision tree (ractor):
//!
//! ```text
//! Coordinator (root supervisor; a child that dies stops the coordinator)
//! ├── Fleet          registry, telemetry cache + history, liveness (fleet/)
//! ├── Authority      CA key, join tokens, enrollment, renewal, revocation (trust/)
//! ├── Auctioneer     calls for bids, bids, scoring, releases (placement/)
//! ├── Scheduler      workflows, jobs, awards, fences, retries (scheduler/)
//! ├── Listener       QUIC endpoint: one handler per ALPN (net/listener.rs)
//! │   └── AgentSession*  one per connected agent (net/session.rs)
//! └── Api            HTTPS JSON API + /metrics (api/)
//! ```
//!
//! Modules are grouped by plane (`net`, `fleet`, `placement`, `scheduler`, `trust`,
//! `data`, `persist`, `api`). Decisions live in I/O-free modules that take `now` as an
//! argument ([`fleet::liveness`], [`placement::auction`], the Scheduler's core); actors are
//! thin shells around them. State that must survive a restart lives in the embedded
//! redb [`persist::store`].

#![warn(clippy::too_many_lines, clippy::too_many_arguments)]

pub mod api;
pub mod autoscale;
pub use fleetmesh_api::client;
pub mod config;
pub mod data;
pub mod fleet;
pub mod net;
pub mod persist;
pub mod placement;
pub mod scheduler;
pub mod trust;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetmesh_protocol::tls::TlsIdentity;
use fleetmesh_protocol::PeerKind;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::{oneshot, watch};
use tracing::{error, info};

pub use config::CoordinatorConfig;

/// Answer an actor call. A caller that gave up waiting (its call timed out) no longer
/// listens, and nothing is lost by dropping the answer: that is the only way `send` fails.
pub(crate) fn answer<T: ractor::Message>(reply: ractor::RpcReplyPort<T>, value: T) {
    let _ = reply.send(value);
}

/// Coordinator failures.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Tls(#[from] fleetmesh_protocol::tls::TlsError),
    #[error(transparent)]
    Store(#[from] persist::store::StoreError),
    #[error("{0}")]
    Startup(String),
    #[error("coordinator stopped: {0}")]
    Failed(String),
}

struct RootArgs {
    config: CoordinatorConfig,
    tls: Arc<TlsIdentity>,
    store: Arc<persist::store::Store>,
    broker: Arc<data::broker::DataBroker>,
    control_bound: oneshot::Sender<SocketAddr>,
    api_bound: oneshot::Sender<SocketAddr>,
    failure: Arc<Mutex<Option<String>>>,
}

struct RootState {
    fleet: ActorCell,
    authority: ActorCell,
    scheduler: ActorCell,
    listener: ActorCell,
    api: ActorCell,
    stopping: bool,
    failure: Arc<Mutex<Option<String>>>,
}

/// The Authority, with the CA key when enrollment is enabled (`--ca-key`).
async fn spawn_authority(
    a: &RootArgs,
    fleet: &ActorRef<fleet::FleetMsg>,
    revocations: &Arc<trust::revocations::Revocations>,
    root: ActorCell,
) -> Result<ActorRef<trust::authority::AuthorityMsg>, ActorProcessingErr> {
    let ca = match &a.config.ca_key {
        Some(key) => Some(
            fleetmesh_protocol::pki::Ca::load(&a.config.ca, key)
                .map_err(|e| format!("loading the CA for enrollment: {e}"))?,
        ),
        None => None,
    };
    let args = trust::authority::AuthorityArgs {
        pools: a.config.pools.iter().map(|p| p.name.clone()).collect(),
        ca,
        ca_pem: a.tls.ca_pem.clone(),
        store: a.store.clone(),
        cert_ttl: a.config.cert_ttl,
        advertise: a.config.advertise.clone(),
        fleet: fleet.clone(),
        revocations: revocations.clone(),
    };
    let (authority, _) = Actor::spawn_linked(None, trust::authority::Authority, args, root).await?;
    Ok(authority)
}

/// Root supervisor.
struct Coordinator;

/// Messages of the root actor.
enum RootMsg {
    Shutdown,
}

impl Actor for Coordinator {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RootMsg>,
        a: RootArgs,
    ) -> Result<RootState, ActorProcessingErr> {
        let fleet_cfg =
            fleet::FleetConfig { liveness: a.config.liveness, history_len: a.config.history };
        let revocations = Arc::new(trust::revocations::Revocations::default());
        let link = Arc::new(net::agent_link::AgentLink::default());
        let (fleet, _) = Actor::spawn_linked(
            None,
            fleet::Fleet,
            fleet::FleetArgs {
                cfg: fleet_cfg,
                store: a.store.clone(),
                revocations: revocations.clone(),
                link: link.clone(),
            },
            myself.get_cell(),
        )
        .await?;
        let authority = spawn_authority(&a, &fleet, &revocations, myself.get_cell()).await?;
        let (auctioneer, _) = Actor::spawn_linked(
            None,
            placement::auctioneer::Auctioneer,
            placement::auctioneer::AuctioneerArgs { link: link.clone() },
            myself.get_cell(),
        )
        .await?;
        let (scheduler, _) = Actor::spawn_linked(
            None,
            scheduler::Scheduler,
            scheduler::SchedulerArgs {
                store: a.store.clone(),
                fleet: fleet.clone(),
                auctioneer: auctioneer.clone(),
                top_k: a.config.auction_top_k,
                broker: a.broker.clone(),
                log_dir: a.config.data_dir.join("logs"),
                link: link.clone(),
            },
            myself.get_cell(),
        )
        .await?;
        let listener_args = net::listener::ListenerArgs {
            listen: a.config.listen,
            tls: a.tls.clone(),
            fleet: fleet.clone(),
            authority: authority.clone(),
            scheduler: scheduler.clone(),
            auctioneer: auctioneer.clone(),
            heartbeat_interval: a.config.heartbeat_interval,
            broker: a.broker.clone(),
            bound: Some(a.control_bound),
        };
        let (listener, _) =
            Actor::spawn_linked(None, net::listener::Listener, listener_args, myself.get_cell())
                .await?;
        let (autoscaler, _) = Actor::spawn_linked(
            None,
            autoscale::Autoscaler,
            autoscale::AutoscalerArgs {
                pools: a.config.pools.clone(),
                store: a.store.clone(),
                scheduler: scheduler.clone(),
                fleet: fleet.clone(),
                authority: authority.clone(),
            },
            myself.get_cell(),
        )
        .await?;
        let api_args = api::ApiArgs {
            autoscaler,
            authority: authority.clone(),
            scheduler: scheduler.clone(),
            auctioneer: auctioneer.clone(),
            listen: a.config.api_listen,
            tls: a.tls,
            fleet: fleet.clone(),
            broker: a.broker.clone(),
            revocations,
            link,
            bound: Some(a.api_bound),
        };
        let (api, _) = Actor::spawn_linked(None, api::Api, api_args, myself.get_cell()).await?;
        Ok(RootState {
            fleet: fleet.get_cell(),
            authority: authority.get_cell(),
            scheduler: scheduler.get_cell(),
            listener: listener.get_cell(),
            api: api.get_cell(),
            stopping: false,
            failure: a.failure,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<RootMsg>,
        msg: RootMsg,
        st: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Shutdown => {
                st.stopping = true;
                // Stop intake first, then the Fleet (which persists the registry).
                let wait = Some(Duration::from_secs(5));
                let _ = st.listener.stop_and_wait(Some("shutdown".into()), wait).await;
                let _ = st.api.stop_and_wait(Some("shutdown".into()), wait).await;
                let _ = st.scheduler.stop_and_wait(Some("shutdown".into()), wait).await;
                let _ = st.authority.stop_and_wait(Some("shutdown".into()), wait).await;
                let _ = st.fleet.stop_and_wait(Some("shutdown".into()), wait).await;
                myself.stop(None);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RootMsg>,
        evt: SupervisionEvent,
        st: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        if st.stopping {
            return Ok(());
        }
        let why = match evt {
            SupervisionEvent::ActorTerminated(who, _, reason) => {
                format!("actor {} terminated: {}", who.get_id(), reason.unwrap_or_default())
            }
            SupervisionEvent::ActorFailed(who, err) => {
                format!("actor {} failed: {err}", who.get_id())
            }
            _ => return Ok(()),
        };
        error!(reason = %why, "a core actor stopped; shutting the coordinator down");
        if let Ok(mut f) = st.failure.lock() {
            f.get_or_insert(why);
        }
        st.stopping = true;
        st.listener.stop(None);
        st.api.stop(None);
        st.scheduler.stop(None);
        st.authority.stop(None);
        st.fleet.stop(None);
        myself.stop(None);
        Ok(())
    }
}

/// A started coordinator.
pub struct Running {
    pub control_addr: SocketAddr,
    pub api_addr: SocketAddr,
    root: ActorRef<RootMsg>,
    handle: ractor::concurrency::JoinHandle<()>,
    failure: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("control_addr", &self.control_addr)
            .field("api_addr", &self.api_addr)
            .finish()
    }
}

impl Running {
    /// Stop gracefully and wait.
    pub async fn shutdown(self) -> Result<(), CoordinatorError> {
        // Already stopping when the root is gone.
        let _ = self.root.cast(RootMsg::Shutdown);
        self.wait().await
    }

    /// Wait until the coordinator stops by itself (a core actor died).
    pub async fn wait(self) -> Result<(), CoordinatorError> {
        let _ = self.handle.await;
        match self.failure.lock().ok().and_then(|mut f| f.take()) {
            Some(why) => Err(CoordinatorError::Failed(why)),
            None => Ok(()),
        }
    }
}

/// Start the coordinator: load TLS material, open the store, spawn the actor tree.
pub async fn start(config: CoordinatorConfig) -> Result<Running, CoordinatorError> {
    let tls = TlsIdentity::load(&config.ca, &config.cert, &config.key)?;
    if tls.identity.kind != PeerKind::Coordinator {
        return Err(CoordinatorError::Startup(format!(
            "{} is a {} certificate; the coordinator needs a coordinator certificate",
            config.cert.display(),
            tls.identity.kind
        )));
    }
    let store = Arc::new(persist::store::Store::open(&config.data_dir)?);
    let broker = data::broker::DataBroker::open(
        &config.data_dir,
        store.clone(),
        &tls.identity.name,
        &tls.identity.trust_domain,
        config.store_limit,
    )
    .map_err(|e| CoordinatorError::Startup(e.to_string()))?;
    broker.clone().sweep_orphans_periodically();
    let advertise = config.advertise.first().cloned();
    let (ctl_tx, ctl_rx) = oneshot::channel();
    let (api_tx, api_rx) = oneshot::channel();
    let failure = Arc::new(Mutex::new(None));
    info!(
        spiffe_id = %tls.identity.spiffe_id(),
        data_dir = %config.data_dir.display(),
        "coordinator starting"
    );
    let (root, handle) = Actor::spawn(
        None,
        Coordinator,
        RootArgs {
            config,
            tls: Arc::new(tls),
            store,
            broker: broker.clone(),
            control_bound: ctl_tx,
            api_bound: api_tx,
            failure: failure.clone(),
        },
    )
    .await
    .map_err(|e| CoordinatorError::Startup(e.to_string()))?;
    let control_addr = ctl_rx
        .await
        .map_err(|_| CoordinatorError::Startup("control listener did not start".into()))?;
    // Where agents reach the coordinator's own store: the advertised control address, or
    // the bound one (loopback when bound to all addresses).
    broker.set_addr(advertise.unwrap_or_else(|| {
        let mut a = control_addr;
        if a.ip().is_unspecified() {
            a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        a.to_string()
    }));
    let api_addr =
        api_rx.await.map_err(|_| CoordinatorError::Startup("API did not start".into()))?;
    Ok(Running { control_addr, api_addr, root, handle, failure })
}

/// Run until `shutdown` becomes true or a core actor dies.
pub async fn run(
    config: CoordinatorConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    let running = start(config).await?;
    let root = running.root.clone();
    let wait = running.wait();
    tokio::pin!(wait);
    tokio::select! {
        r = &mut wait => r,
        _ = async { while shutdown.changed().await.is_ok() { if *shutdown.borrow() { break; } } } => {
            info!("shutting down");
            // Already stopping when the root is gone.
            let _ = root.cast(RootMsg::Shutdown);
            wait.await
        }
    }
}
