//! `Api` actor: the HTTPS JSON API and `/metrics`, served by axum over rustls.
//!
//! Every connection must present a client certificate from the mesh CA (rustls verifies
//! chain and validity); every request additionally requires the certificate to be an
//! *operator* identity of this mesh's trust domain that is not revoked, otherwise it gets
//! `403` with a JSON error naming what was presented. Every change made through the API
//! is recorded in the audit trail with the caller's SPIFFE id before it is answered.
//! Endpoints:
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
//! | POST   | `/api/v1/identities/{kind}/{name}/revoke` | deny any identity (agent, operator, coordinator) |
//! | GET    | `/api/v1/audit`        | `[AuditRecord]`                |
//! | GET    | `/healthz`             | `ok`                           |
//! | GET    | `/api/v1/data`         | `[DatasetSummary]`             |
//! | POST   | `/api/v1/data`         | register an uploaded dataset (`PutBody`), optionally place it |
//! | GET    | `/api/v1/data/{ref}`   | `DatasetRecord` (by id, id prefix or name) |
//! | POST   | `/api/v1/data/{ref}/place` | have an agent fetch it (`{"agent": ..}`) |
//! | POST   | `/api/v1/data/{ref}/stage` | bring it into the coordinator's store (for download) |
//! | POST   | `/api/v1/data/{ref}/rm` | forget it everywhere          |
//! | POST   | `/api/v1/data/missing` | which of these chunk hashes the coordinator lacks |
//! | PUT/GET | `/api/v1/data/chunks/{hash}` | upload / download one chunk (verified) |

pub mod metrics;

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

use crate::autoscale::AutoscalerMsg;
use crate::data::broker::{DataBroker, Requester};
use crate::fleet::views::ApiErrorBody;
use crate::fleet::FleetMsg;
use crate::placement::auctioneer::AuctioneerMsg;
use crate::placement::plan;
use crate::scheduler::arrays::JobListing;
use crate::scheduler::{SchedulerMsg, DEFAULT_PAGE_JOBS};
use crate::trust::authority::{AuthorityMsg, Revocations};
use fleetmesh_api::answers::{Cancelled, Drained, Placed, Removed, Revoked, Submitted};
use fleetmesh_protocol::api::{DrainBody, PlaceBody, PutBody, RevokeBody, TokenSpec};

/// Longest a client may take for its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection may wait before its request headers are complete. Connections
/// carry one request each (no keep-alive), so this also bounds idle connections.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; beyond this, new ones are closed as they are accepted.
const MAX_CONNECTIONS: usize = 512;
/// TLS handshakes in progress at once (before anyone is identified).
const MAX_HANDSHAKES: usize = 64;
/// Connections at once per identity: operators use the API; other kinds only ever get a
/// 403, so a handful is plenty for them.
const MAX_PER_OPERATOR: usize = 64;
const MAX_PER_OTHER_IDENTITY: usize = 4;
/// At most one warning per this interval for each kind of connection failure; the rest
/// are counted and reported with the next one.
const WARN_EVERY: Duration = Duration::from_secs(1);
/// Longest the API waits for the Fleet to answer.
const FLEET_CALL_MS: u64 = 5000;
/// Longest a plan waits for its dry-run auctions (each closes within its window).
const PLAN_CALL_MS: u64 = crate::scheduler::core::AUCTION_WINDOW_MS * 4;

#[derive(Clone)]
struct Peer(Option<PeerIdentity>);

#[derive(Clone)]
struct AppState {
    fleet: ActorRef<FleetMsg>,
    authority: ActorRef<AuthorityMsg>,
    scheduler: ActorRef<SchedulerMsg>,
    auctioneer: ActorRef<AuctioneerMsg>,
    autoscaler: ActorRef<AutoscalerMsg>,
    broker: Arc<DataBroker>,
    tls: Arc<TlsIdentity>,
    revocations: Arc<Revocations>,
    link: Arc<crate::net::agent_link::AgentLink>,
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
    let id = sched_call!(st, SchedulerMsg::Submit, Box::new(wf));
    (StatusCode::CREATED, Json(Submitted { id })).into_response()
}

/// Body: a workflow file (YAML). A dry run on the fleet as it is now: nothing is
/// stored, and the agents asked answer without reserving anything.
async fn plan_workflow(State(st): State<AppState>, body: String) -> Response {
    let wf = match fleetmesh_protocol::workflow::parse(&body) {
        Ok(w) => w,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let candidates = match ractor::call_t!(st.fleet, FleetMsg::Candidates, FLEET_CALL_MS) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("fleet unavailable: {e}")),
    };
    let now = fleetmesh_data::now_unix_ms();
    let resolve = |n: &str| st.broker.resolve(n);
    let prefix = format!("plan-{now}-{}", wf.name);
    let (draft, auctions) = plan::draft(&wf, &candidates, &resolve, &prefix, now);
    let outcomes =
        match ractor::call_t!(st.auctioneer, AuctioneerMsg::Probe, PLAN_CALL_MS, auctions) {
            Ok(o) => o,
            Err(e) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("auctioneer unavailable: {e}"),
                )
            }
        };
    Json(plan::finish(draft, outcomes, &wf, &candidates)).into_response()
}

async fn list_pools(State(st): State<AppState>) -> Response {
    match ractor::call_t!(st.autoscaler, AutoscalerMsg::List, FLEET_CALL_MS) {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("autoscaler unavailable: {e}")),
    }
}

async fn list_workflows(State(st): State<AppState>) -> Response {
    Json(sched_call!(st, SchedulerMsg::ListWorkflows)).into_response()
}

/// `?workflow=W` (its jobs), `?array=J` (an array's members), `?after=ID&limit=N`
/// (pages; the answer's `next` is the following page's `after`).
#[derive(serde::Deserialize)]
struct JobsQuery {
    workflow: Option<String>,
    array: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn list_jobs(State(st): State<AppState>, Query(q): Query<JobsQuery>) -> Response {
    let listing = JobListing {
        workflow: q.workflow,
        array: q.array,
        after: q.after,
        limit: q.limit.unwrap_or(DEFAULT_PAGE_JOBS),
    };
    Json(sched_call!(st, SchedulerMsg::ListJobs, listing)).into_response()
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
        Ok(n) => Json(Cancelled { cancelled_jobs: n }).into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
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
        Ok(true) => Json(Drained { agent: name, draining }).into_response(),
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

async fn revoke_agent(
    State(st): State<AppState>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Option<Json<RevokeBody>>,
) -> Response {
    revoke(&st, &peer, PeerKind::Agent, name, body).await
}

async fn revoke_identity(
    State(st): State<AppState>,
    Extension(peer): Extension<Peer>,
    Path((kind, name)): Path<(String, String)>,
    body: Option<Json<RevokeBody>>,
) -> Response {
    match kind.parse::<PeerKind>() {
        Ok(kind) => revoke(&st, &peer, kind, name, body).await,
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn revoke(
    st: &AppState,
    peer: &Peer,
    kind: PeerKind,
    name: String,
    body: Option<Json<RevokeBody>>,
) -> Response {
    let reason = body.and_then(|b| b.0.reason).unwrap_or_else(|| "revoked by an operator".into());
    let actor = peer.0.as_ref().map(|p| p.spiffe_id());
    match ractor::call_t!(
        st.authority,
        |reply| AuthorityMsg::Revoke { kind, name: name.clone(), reason, actor, reply },
        FLEET_CALL_MS
    ) {
        Ok(Ok(())) => Json(Revoked { revoked: name, kind }).into_response(),
        Ok(Err(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("authority unavailable: {e}")),
    }
}

async fn audit_log(State(st): State<AppState>) -> Response {
    authority_call!(st, AuthorityMsg::Audit)
}

fn error(status: StatusCode, msg: impl ToString) -> Response {
    (status, Json(ApiErrorBody { error: msg.to_string() })).into_response()
}

/// Requests that change nothing the audit trail tracks: reads, a query sent as POST,
/// and content-addressed chunk uploads (the dataset registration that uses them is
/// recorded).
fn audited(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    !(matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        || path == "/api/v1/data/missing"
        || path.starts_with("/api/v1/data/chunks/"))
}

/// Who may call the API: an operator certificate of this mesh's trust domain that is not
/// revoked. Changes are recorded with the caller's identity before the answer goes out.
async fn require_operator(
    State(st): State<AppState>,
    Extension(peer): Extension<Peer>,
    req: Request,
    next: Next,
) -> Response {
    let id = match &peer.0 {
        Some(id) if id.kind == PeerKind::Operator => id,
        Some(id) => {
            return error(
                StatusCode::FORBIDDEN,
                format!(
                    "the API requires an operator certificate; {} is a {} certificate",
                    id.spiffe_id(),
                    id.kind
                ),
            )
        }
        None => {
            return error(
                StatusCode::FORBIDDEN,
                "the API requires an operator certificate from the mesh CA",
            )
        }
    };
    let domain = &st.tls.identity.trust_domain;
    if &id.trust_domain != domain {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "{} is for trust domain {}; this mesh is {domain}",
                id.spiffe_id(),
                id.trust_domain
            ),
        );
    }
    if let Some(why) = st.revocations.check(id) {
        return error(StatusCode::FORBIDDEN, why);
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let response = next.run(req).await;
    if audited(&method, &path) {
        let record = crate::persist::store::AuditRecord {
            at_unix_ms: fleetmesh_data::now_unix_ms(),
            event: "api".into(),
            agent: None,
            token_id: None,
            serial: Some(id.serial.clone()),
            not_after_unix: None,
            detail: format!("{method} {path} -> {}", response.status().as_u16()),
            actor: Some(id.spiffe_id()),
        };
        record_audit(&st, record).await;
    }
    response
}

/// Append to the audit trail. The change is made either way; a record that could not be
/// stored is said so in the log rather than hidden.
async fn record_audit(st: &AppState, record: crate::persist::store::AuditRecord) {
    let (actor, detail) = (record.actor.clone(), record.detail.clone());
    let stored =
        ractor::call_t!(st.authority, AuthorityMsg::Record, FLEET_CALL_MS, Box::new(record));
    if !matches!(stored, Ok(Ok(()))) {
        warn!(actor = ?actor, %detail, result = ?stored, "audit record not stored");
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
    // Without the autoscaler's or the Scheduler's answer the fleet's figures are still
    // served.
    let pools =
        ractor::call_t!(st.autoscaler, AutoscalerMsg::List, FLEET_CALL_MS).unwrap_or_default();
    let workflows = ractor::call_t!(st.scheduler, SchedulerMsg::ListWorkflows, FLEET_CALL_MS)
        .unwrap_or_default();
    match crate::api::metrics::render(&agents, &stats, &pools, &workflows) {
        Ok(text) => (
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Largest chunk upload accepted (the largest chunk size plus slack).
const MAX_CHUNK_BODY: usize = fleetmesh_protocol::data::MAX_CHUNK_SIZE as usize + 1024;

/// Largest `POST /api/v1/data` body (a manifest in JSON).
const MAX_MANIFEST_BODY: usize = 64 << 20;

async fn candidates(st: &AppState) -> Result<Vec<crate::placement::auction::Candidate>, Response> {
    ractor::call_t!(st.fleet, FleetMsg::Candidates, FLEET_CALL_MS)
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, format!("fleet unavailable: {e}")))
}

/// Ask `agent` to fetch dataset `id` (residency and holders checked by the broker).
async fn place_on(st: &AppState, id: &str, agent: &str) -> Result<(), Response> {
    let cands = candidates(st).await?;
    let Some(c) = cands.iter().find(|c| c.agent == agent) else {
        return Err(error(StatusCode::NOT_FOUND, format!("no agent {agent:?}")));
    };
    if !c.connected {
        return Err(error(StatusCode::CONFLICT, format!("agent {agent} is not connected")));
    }
    let me = Requester {
        kind: PeerKind::Agent,
        name: agent.to_string(),
        jurisdiction: c.jurisdiction.clone(),
    };
    let plan = st.broker.plan(id, &me, &cands).map_err(|why| error(StatusCode::CONFLICT, why))?;
    st.broker.fetch_started(id, agent);
    // Connected a moment ago; if it just went away, it is asked again when it reconnects
    // (the broker keeps the fetch pending).
    st.link.send(agent, fleetmesh_protocol::CoordinatorMessage::Fetch(Box::new(plan)));
    Ok(())
}

async fn data_list(State(st): State<AppState>) -> Response {
    Json(st.broker.list()).into_response()
}

async fn data_show(State(st): State<AppState>, Path(r): Path<String>) -> Response {
    match st.broker.resolve(&r) {
        Some(d) => Json(d).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no dataset {r:?}")),
    }
}

async fn data_put(
    State(st): State<AppState>,
    Extension(peer): Extension<Peer>,
    Json(b): Json<PutBody>,
) -> Response {
    if let Err(e) = b.validate() {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let broker = st.broker.clone();
    let (m, name, js, loosen) =
        (b.manifest, b.name.clone(), b.jurisdictions.clone(), b.loosen_residency);
    let put = tokio::task::spawn_blocking(move || broker.put_local(m, &name, js, loosen)).await;
    let rec = match put {
        Ok(Ok((rec, loosened))) => {
            if let Some(old) = loosened {
                let record = crate::persist::store::AuditRecord {
                    at_unix_ms: fleetmesh_data::now_unix_ms(),
                    event: "residency-loosened".into(),
                    agent: None,
                    token_id: None,
                    serial: None,
                    not_after_unix: None,
                    detail: format!(
                        "dataset {}@{}: from {old:?} to {:?}",
                        rec.name, rec.version, rec.jurisdictions
                    ),
                    actor: peer.0.as_ref().map(|p| p.spiffe_id()),
                };
                record_audit(&st, record).await;
            }
            rec
        }
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if let Some(agent) = &b.on {
        if let Err(r) = place_on(&st, &rec.id, agent).await {
            return r;
        }
    }
    (StatusCode::CREATED, Json(rec.summary())).into_response()
}

async fn data_place(
    State(st): State<AppState>,
    Path(r): Path<String>,
    Json(b): Json<PlaceBody>,
) -> Response {
    let Some(d) = st.broker.resolve(&r) else {
        return error(StatusCode::NOT_FOUND, format!("no dataset {r:?}"));
    };
    match place_on(&st, &d.id, &b.agent).await {
        Ok(()) => Json(Placed { dataset: d.id, agent: b.agent }).into_response(),
        Err(r) => r,
    }
}

async fn data_stage(State(st): State<AppState>, Path(r): Path<String>) -> Response {
    let Some(d) = st.broker.resolve(&r) else {
        return error(StatusCode::NOT_FOUND, format!("no dataset {r:?}"));
    };
    let cands = match candidates(&st).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match st.broker.stage_local(&d.id, &cands, &st.tls).await {
        Ok(()) => Json(d).into_response(),
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

async fn data_rm(State(st): State<AppState>, Path(r): Path<String>) -> Response {
    let Some(d) = st.broker.resolve(&r) else {
        return error(StatusCode::NOT_FOUND, format!("no dataset {r:?}"));
    };
    let holders = st.broker.remove(&d.id);
    for agent in &holders {
        // An agent away now keeps its copy until it is told again; the index no longer
        // lists it, so it is never offered.
        st.link.send(
            agent,
            fleetmesh_protocol::CoordinatorMessage::DropDataset { dataset: d.id.clone() },
        );
    }
    Json(Removed { removed: d.id, holders_told: holders }).into_response()
}

async fn data_missing(State(st): State<AppState>, Json(hashes): Json<Vec<String>>) -> Response {
    let missing: Vec<String> = hashes
        .into_iter()
        .filter(|h| {
            fleetmesh_protocol::data::parse_hash(h).is_none_or(|x| !st.broker.local.has(&x))
        })
        .collect();
    Json(missing).into_response()
}

async fn chunk_put(
    State(st): State<AppState>,
    Path(h): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(hash) = fleetmesh_protocol::data::parse_hash(&h) else {
        return error(StatusCode::BAD_REQUEST, format!("{h:?} is not a BLAKE3 hash"));
    };
    let store = st.broker.local.clone();
    match tokio::task::spawn_blocking(move || store.write(&hash, &body)).await {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e @ fleetmesh_data::StoreError::Corrupt { .. })) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn chunk_get(State(st): State<AppState>, Path(h): Path<String>) -> Response {
    let Some(hash) = fleetmesh_protocol::data::parse_hash(&h) else {
        return error(StatusCode::BAD_REQUEST, format!("{h:?} is not a BLAKE3 hash"));
    };
    let store = st.broker.local.clone();
    match tokio::task::spawn_blocking(move || store.read(&hash)).await {
        Ok(Ok(b)) => ([(header::CONTENT_TYPE, "application/octet-stream")], b).into_response(),
        Ok(Err(e)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn router(state: AppState) -> Router {
    use axum::routing::post;
    Router::new()
        // Manifests of large datasets are large (one hash per chunk).
        .route(
            "/api/v1/data",
            get(data_list)
                .post(data_put)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_MANIFEST_BODY)),
        )
        .route("/api/v1/data/missing", post(data_missing))
        .route(
            "/api/v1/data/chunks/{hash}",
            get(chunk_get)
                .put(chunk_put)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_CHUNK_BODY)),
        )
        .route("/api/v1/data/{r}", get(data_show))
        .route("/api/v1/data/{r}/place", post(data_place))
        .route("/api/v1/data/{r}/stage", post(data_stage))
        .route("/api/v1/data/{r}/rm", post(data_rm))
        .route("/api/v1/workflows", get(list_workflows).post(submit_workflow))
        .route("/api/v1/plan", axum::routing::post(plan_workflow))
        .route("/api/v1/pools", get(list_pools))
        .route("/api/v1/workflows/{id}/cancel", axum::routing::post(cancel))
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{id}", get(show_job))
        .route("/api/v1/jobs/{id}/logs", get(job_logs))
        .route("/api/v1/jobs/{id}/cancel", axum::routing::post(cancel))
        .route("/api/v1/agents/{name}/drain", axum::routing::post(drain))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}/revoke", axum::routing::post(revoke_token))
        .route("/api/v1/agents/{name}/revoke", axum::routing::post(revoke_agent))
        .route("/api/v1/identities/{kind}/{name}/revoke", axum::routing::post(revoke_identity))
        .route("/api/v1/audit", get(audit_log))
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/agents/{name}", get(show_agent))
        .route("/api/v1/gpus", get(list_gpus))
        .route("/api/v1/stats/ingest", get(ingest))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .layer(middleware::from_fn_with_state(state.clone(), require_operator))
        .with_state(state)
}

/// Open connections per identity, and the guard that gives a slot back.
#[derive(Default)]
struct ConnectionCounts(std::sync::Mutex<std::collections::HashMap<String, usize>>);

struct ConnectionSlot {
    counts: Arc<ConnectionCounts>,
    key: String,
}

impl ConnectionCounts {
    /// A slot for `key` if it has fewer than `max` connections open.
    fn take(self: &Arc<Self>, key: &str, max: usize) -> Option<ConnectionSlot> {
        let mut m = self.0.lock().ok()?;
        let n = m.entry(key.to_string()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot { counts: self.clone(), key: key.to_string() })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.counts.0.lock() {
            if let Some(n) = m.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

/// A warning that is logged at most once per [`WARN_EVERY`], with how many were held back.
struct RateLimitedWarn {
    what: &'static str,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimitedWarn {
    const fn new(what: &'static str) -> Self {
        Self { what, state: std::sync::Mutex::new((None, 0)) }
    }

    fn warn(&self, detail: &dyn std::fmt::Display) {
        let Ok(mut s) = self.state.lock() else { return };
        let now = std::time::Instant::now();
        if s.0.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            s.1 += 1;
            return;
        }
        let suppressed = std::mem::take(&mut s.1);
        s.0 = Some(now);
        warn!(error = %detail, suppressed, "{}", self.what);
    }
}

static ACCEPT_FAILED: RateLimitedWarn = RateLimitedWarn::new("API accept failed");
static HANDSHAKE_FAILED: RateLimitedWarn = RateLimitedWarn::new("API connection refused");
static OVER_LIMIT: RateLimitedWarn = RateLimitedWarn::new("API connection over its limit closed");

/// Accept loop: caps on connections in total, handshakes in flight and connections per
/// identity keep one client (or many idle ones) from starving the rest.
async fn serve(listener: TcpListener, acceptor: TlsAcceptor, app: Router) {
    let total = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let counts = Arc::new(ConnectionCounts::default());
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors, typically: wait for connections to end.
                ACCEPT_FAILED.warn(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (Ok(conn_permit), Ok(hs_permit)) =
            (total.clone().try_acquire_owned(), handshakes.clone().try_acquire_owned())
        else {
            OVER_LIMIT.warn(&format!("{remote}: too many connections or handshakes at once"));
            drop(tcp);
            continue;
        };
        let (acceptor, app, counts) = (acceptor.clone(), app.clone(), counts.clone());
        tokio::spawn(async move {
            let _conn_permit = conn_permit;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    HANDSHAKE_FAILED.warn(&format!("{remote}: {e}"));
                    return;
                }
                Err(_) => {
                    debug!(%remote, "API TLS handshake timed out");
                    return;
                }
            };
            drop(hs_permit);
            let peer = peer_identity(tls.get_ref().1.peer_certificates()).ok();
            let (key, max) = match &peer {
                Some(p) if p.kind == PeerKind::Operator => (p.spiffe_id(), MAX_PER_OPERATOR),
                Some(p) => (p.spiffe_id(), MAX_PER_OTHER_IDENTITY),
                None => ("anonymous".to_string(), MAX_PER_OTHER_IDENTITY),
            };
            let Some(_slot) = counts.take(&key, max) else {
                OVER_LIMIT.warn(&format!("{remote}: {key} has {max} connections open"));
                too_many(tls, &key, max).await;
                return;
            };
            let svc = TowerToHyperService::new(app.layer(Extension(Peer(peer))));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                debug!(%remote, error = %e, "API connection ended with an error");
            }
        });
    }
}

/// Answer a connection over its identity's limit with a 429 that says so, and close it.
async fn too_many(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    who: &str,
    max: usize,
) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::json!({
        "error": format!("{who} already has {max} API connections open; close some and retry")
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body.as_bytes()).await?;
        tls.shutdown().await
    };
    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, write).await;
}

/// Api start-up arguments.
pub struct ApiArgs {
    pub listen: SocketAddr,
    pub tls: Arc<TlsIdentity>,
    pub fleet: ActorRef<FleetMsg>,
    pub authority: ActorRef<AuthorityMsg>,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub auctioneer: ActorRef<AuctioneerMsg>,
    pub autoscaler: ActorRef<AutoscalerMsg>,
    pub broker: Arc<DataBroker>,
    pub revocations: Arc<Revocations>,
    pub link: Arc<crate::net::agent_link::AgentLink>,
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
            // Whoever asked for the address may have stopped waiting.
            let _ = tx.send(local);
        }
        let app = router(AppState {
            fleet: args.fleet,
            authority: args.authority,
            scheduler: args.scheduler,
            auctioneer: args.auctioneer,
            autoscaler: args.autoscaler,
            broker: args.broker,
            tls: args.tls.clone(),
            revocations: args.revocations,
            link: args.link,
        });
        let task = tokio::spawn(serve(listener, acceptor, app));
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
