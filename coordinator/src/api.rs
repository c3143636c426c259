//! `Api` actor: the HTTPS JSON API and `/metrics`, served by axum over rustls.
//!
//! Every connection must present a client certificate from the mesh CA (rustls verifies
//! chain and validity); every request additionally requires the certificate to be an
//! *operator* identity, otherwise it gets `403` with a JSON error naming what was
//! presented. Endpoints:
//!
//! | method | path                   | answer                         |
//! |--------|------------------------|--------------------------------|
//! | GET    | `/api/v1/agents`       | `[AgentView]`                  |
//! | GET    | `/api/v1/agents/{name}`| `AgentDetail` or 404           |
//! | GET    | `/api/v1/gpus`         | `[GpuView]`                    |
//! | GET    | `/api/v1/stats/ingest?since_unix_ms=T` | `IngestStats` |
//! | GET    | `/metrics`             | OpenMetrics text               |
//! | POST   | `/api/v1/tokens`       | create a join token (`TokenSpec`) |
//! | GET    | `/api/v1/tokens`       | `[TokenView]`                  |
//! | POST   | `/api/v1/tokens/{id}/revoke` | revoke a token           |
//! | POST   | `/api/v1/agents/{name}/revoke` | cut an agent off       |
//! | GET    | `/api/v1/audit`        | `[AuditRecord]`                |
//! | GET    | `/healthz`             | `ok`                           |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use fleetmesh_protocol::tls::{peer_identity, TlsIdentity};
use fleetmesh_protocol::{PeerIdentity, PeerKind};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::authority::{AuthorityMsg, TokenSpec};
use crate::fleet::FleetMsg;
use crate::scheduler::SchedulerMsg;
use crate::views::ApiErrorBody;

/// Longest a client may take for its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the API waits for the Fleet to answer.
const FLEET_CALL_MS: u64 = 5000;

#[derive(Clone)]
struct Peer(Option<PeerIdentity>);

#[derive(Clone)]
struct AppState {
    fleet: ActorRef<FleetMsg>,
    authority: ActorRef<AuthorityMsg>,
    scheduler: ActorRef<SchedulerMsg>,
}

macro_rules! sched_call {
    ($st:expr, $msg:expr $(, $arg:expr)*) => {
        match ractor::call_t!($st.scheduler, $msg, FLEET_CALL_MS $(, $arg)*) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("scheduler unavailable: {e}")),
        }
    };
}

/// Body: the workflow file (YAML). Validated before anything is stored.
async fn submit_workflow(State(st): State<AppState>, body: String) -> Response {
    let wf = match fleetmesh_protocol::workflow::parse(&body) {
        Ok(w) => w,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match sched_call!(st, SchedulerMsg::Submit, Box::new(wf)) {
        Ok(id) => (StatusCode::CREATED, Json(serde_json::json!({ "id": id }))).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn list_workflows(State(st): State<AppState>) -> Response {
    Json(sched_call!(st, SchedulerMsg::ListWorkflows)).into_response()
}

#[derive(serde::Deserialize)]
struct JobsQuery {
    workflow: Option<String>,
}

async fn list_jobs(State(st): State<AppState>, Query(q): Query<JobsQuery>) -> Response {
    Json(sched_call!(st, SchedulerMsg::ListJobs, q.workflow)).into_response()
}

async fn show_job(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    match sched_call!(st, SchedulerMsg::ShowJob, id.clone()) {
        Some(j) => Json(j).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no job {id:?}")),
    }
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    #[serde(default)]
    offset: usize,
}

async fn job_logs(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Response {
    let r = match ractor::call_t!(
        st.scheduler,
        |reply| SchedulerMsg::Logs { job: id.clone(), offset: q.offset, reply },
        FLEET_CALL_MS
    ) {
        Ok(v) => v,
        Err(e) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, format!("scheduler unavailable: {e}"))
        }
    };
    match r {
        Some(c) => Json(c).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no job {id:?}")),
    }
}

async fn cancel(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    match sched_call!(st, SchedulerMsg::Cancel, id) {
        Ok(n) => Json(serde_json::json!({ "cancelled_jobs": n })).into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

#[derive(serde::Deserialize, Default)]
struct DrainBody {
    #[serde(default = "yes")]
    draining: bool,
}

fn yes() -> bool {
    true
}

async fn drain(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Option<Json<DrainBody>>,
) -> Response {
    let draining = body.map(|b| b.0.draining).unwrap_or(true);
    match ractor::call_t!(
        st.fleet,
        |reply| FleetMsg::Drain { name: name.clone(), draining, reply },
        FLEET_CALL_MS
    ) {
        Ok(true) => {
            Json(serde_json::json!({ "agent": name, "draining": draining })).into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no agent named {name:?}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("fleet unavailable: {e}")),
    }
}

/// Answer an Authority call: `Ok` as JSON, `Err` as 400 with the reason.
macro_rules! authority_call {
    ($st:expr, $msg:expr $(, $arg:expr)*) => {
        match ractor::call_t!($st.authority, $msg, FLEET_CALL_MS $(, $arg)*) {
            Ok(Ok(v)) => Json(v).into_response(),
            Ok(Err(why)) => error(StatusCode::BAD_REQUEST, why),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("authority unavailable: {e}")),
        }
    };
}

async fn create_token(State(st): State<AppState>, Json(spec): Json<TokenSpec>) -> Response {
    authority_call!(st, AuthorityMsg::CreateToken, spec)
}

async fn list_tokens(State(st): State<AppState>) -> Response {
    authority_call!(st, AuthorityMsg::ListTokens)
}

async fn revoke_token(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    authority_call!(st, AuthorityMsg::RevokeToken, id)
}

#[derive(serde::Deserialize, Default)]
struct RevokeBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn revoke_agent(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Option<Json<RevokeBody>>,
) -> Response {
    let reason = body.and_then(|b| b.0.reason).unwrap_or_else(|| "revoked by an operator".into());
    match ractor::call_t!(
        st.authority,
        |reply| AuthorityMsg::RevokeAgent { name: name.clone(), reason, reply },
        FLEET_CALL_MS
    ) {
        Ok(Ok(())) => Json(serde_json::json!({ "revoked": name })).into_response(),
        Ok(Err(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("authority unavailable: {e}")),
    }
}

async fn audit_log(State(st): State<AppState>) -> Response {
    authority_call!(st, AuthorityMsg::Audit)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiErrorBody { error: msg.into() })).into_response()
}

async fn require_operator(Extension(peer): Extension<Peer>, req: Request, next: Next) -> Response {
    match &peer.0 {
        Some(id) if id.kind == PeerKind::Operator => next.run(req).await,
        Some(id) => error(
            StatusCode::FORBIDDEN,
            format!(
                "the API requires an operator certificate; {} is a {} certificate",
                id.spiffe_id(),
                id.kind
            ),
        ),
        None => error(
            StatusCode::FORBIDDEN,
            "the API requires an operator certificate from the mesh CA",
        ),
    }
}

macro_rules! fleet_call {
    ($fleet:expr, $msg:expr $(, $arg:expr)*) => {
        match ractor::call_t!($fleet, $msg, FLEET_CALL_MS $(, $arg)*) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("fleet unavailable: {e}")),
        }
    };
}

async fn list_agents(State(st): State<AppState>) -> Response {
    Json(fleet_call!(st.fleet, FleetMsg::ListAgents)).into_response()
}

async fn show_agent(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    match fleet_call!(st.fleet, FleetMsg::GetAgent, name.clone()) {
        Some(d) => Json(d).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no agent named {name:?}")),
    }
}

async fn list_gpus(State(st): State<AppState>) -> Response {
    Json(fleet_call!(st.fleet, FleetMsg::ListGpus)).into_response()
}

#[derive(serde::Deserialize)]
struct IngestQuery {
    #[serde(default)]
    since_unix_ms: u64,
}

async fn ingest(State(st): State<AppState>, Query(q): Query<IngestQuery>) -> Response {
    Json(fleet_call!(st.fleet, FleetMsg::Ingest, q.since_unix_ms)).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    let agents = fleet_call!(st.fleet, FleetMsg::ListAgents);
    let stats = fleet_call!(st.fleet, FleetMsg::Ingest, 0);
    match crate::metrics::render(&agents, &stats) {
        Ok(text) => (
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn router(
    fleet: ActorRef<FleetMsg>,
    authority: ActorRef<AuthorityMsg>,
    scheduler: ActorRef<SchedulerMsg>,
) -> Router {
    Router::new()
        .route("/api/v1/workflows", get(list_workflows).post(submit_workflow))
        .route("/api/v1/workflows/{id}/cancel", axum::routing::post(cancel))
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{id}", get(show_job))
        .route("/api/v1/jobs/{id}/logs", get(job_logs))
        .route("/api/v1/jobs/{id}/cancel", axum::routing::post(cancel))
        .route("/api/v1/agents/{name}/drain", axum::routing::post(drain))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}/revoke", axum::routing::post(revoke_token))
        .route("/api/v1/agents/{name}/revoke", axum::routing::post(revoke_agent))
        .route("/api/v1/audit", get(audit_log))
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/agents/{name}", get(show_agent))
        .route("/api/v1/gpus", get(list_gpus))
        .route("/api/v1/stats/ingest", get(ingest))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .layer(middleware::from_fn(require_operator))
        .with_state(AppState { fleet, authority, scheduler })
}

/// Api start-up arguments.
pub struct ApiArgs {
    pub listen: SocketAddr,
    pub tls: Arc<TlsIdentity>,
    pub fleet: ActorRef<FleetMsg>,
    pub authority: ActorRef<AuthorityMsg>,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub bound: Option<oneshot::Sender<SocketAddr>>,
}

/// Api state: the serving task.
pub struct ApiState {
    task: tokio::task::JoinHandle<()>,
}

/// The Api actor.
pub struct Api;

impl Actor for Api {
    type Msg = ();
    type State = ApiState;
    type Arguments = ApiArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        args: ApiArgs,
    ) -> Result<ApiState, ActorProcessingErr> {
        let tls_cfg = args.tls.server_config(&[b"http/1.1"], false)?;
        let acceptor = TlsAcceptor::from(Arc::new(tls_cfg));
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on TCP {}: {e}", args.listen))?;
        let local = listener.local_addr()?;
        info!(addr = %local, "HTTPS API listening (operator certificates required)");
        if let Some(tx) = args.bound {
            let _ = tx.send(local);
        }
        let app = router(args.fleet, args.authority, args.scheduler);
        let task = tokio::spawn(async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "API accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    let tls =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(t)) => t,
                            Ok(Err(e)) => {
                                warn!(%remote, error = %e, "API connection refused");
                                return;
                            }
                            Err(_) => {
                                debug!(%remote, "API TLS handshake timed out");
                                return;
                            }
                        };
                    let peer = peer_identity(tls.get_ref().1.peer_certificates()).ok();
                    let svc = TowerToHyperService::new(app.layer(Extension(Peer(peer))));
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await
                    {
                        debug!(%remote, error = %e, "API connection ended with an error");
                    }
                });
            }
        });
        Ok(ApiState { task })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<()>,
        st: &mut ApiState,
    ) -> Result<(), ActorProcessingErr> {
        st.task.abort();
        Ok(())
    }
}
