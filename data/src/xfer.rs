//! Peer-to-peer transfers over mutual-TLS QUIC (ALPN `fleetmesh/xfer/1`).
//!
//! One request per bidirectional stream: `Manifest { ticket }` is answered with the
//! manifest; `Chunks { ticket, hashes }` with one `Chunk { hash, len }` frame followed by
//! `len` raw bytes per hash (or `Missing`). Before anything is sent, the server checks,
//! with no call to the coordinator: the ticket's signature (coordinator key), that it
//! names this holder, the requester in the verified client certificate and the dataset,
//! that it has not expired, that the requester's certificate jurisdiction is allowed by
//! the ticket *and* by the residency recorded with the local copy, and that each chunk
//! asked for belongs to the dataset.
//!
//! The fetcher pulls from every holder in the plan at once (a few streams per holder,
//! a few chunks per request), verifies each chunk's hash before storing it, gives a chunk
//! that failed (bad hash, missing, holder gone) to another holder, and skips chunks
//! already in the local store, which is what makes a restarted fetch resume.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetmesh_protocol::codec::close_code;
use fleetmesh_protocol::data::{
    hash_hex, residency_allows, short, verify_ticket, FetchPlan, Hash, Holder, Manifest, Shard,
    SignedTicket, XferReply, XferRequest, ALPN_XFER,
};
use fleetmesh_protocol::tls::{peer_identity, TlsIdentity};
use fleetmesh_protocol::{FetchReport, PeerIdentity, PeerKind};
use tracing::{debug, info, warn};

use crate::store::{LocalDataset, Store, StoreError};

/// Concurrent requests per holder: enough to keep a path busy while the other side
/// reads/hashes/writes a chunk.
const STREAMS_PER_HOLDER: usize = 4;
/// Chunks asked for per request.
const CHUNKS_PER_REQUEST: usize = 4;
/// Time a peer has to send its request, and a holder to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// UDP socket buffers for data endpoints: quinn drops packets with the ~208 KiB default
/// even on loopback (STACK-NOTES); the kernel caps this at `net.core.rmem_max`.
const UDP_BUFFER: usize = 4 << 20;

/// Fetch errors.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no holder could provide the manifest of {dataset}: {reasons}")]
    NoManifest { dataset: String, reasons: String },
    #[error("fetch of {dataset} incomplete: {missing} chunk(s) missing ({reasons})")]
    Incomplete { dataset: String, missing: usize, reasons: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("setup: {0}")]
    Setup(String),
}

/// A QUIC endpoint for the data plane: serves `server` (when given) and dials peers.
pub fn endpoint(
    listen: SocketAddr,
    tls: &TlsIdentity,
    serve: bool,
) -> Result<quinn::Endpoint, FetchError> {
    let setup = |e: &dyn std::fmt::Display| FetchError::Setup(e.to_string());
    let domain = if listen.is_ipv6() { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(|e| setup(&e))?;
    let _ = sock.set_recv_buffer_size(UDP_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_BUFFER);
    sock.bind(&listen.into()).map_err(|e| setup(&format!("bind {listen}: {e}")))?;
    let server = if serve {
        let rustls_cfg = tls.server_config(&[ALPN_XFER], true).map_err(|e| setup(&e))?;
        let quic =
            quinn::crypto::rustls::QuicServerConfig::try_from(rustls_cfg).map_err(|e| setup(&e))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_uni_streams(0u32.into());
        transport.max_concurrent_bidi_streams(64u32.into());
        cfg.transport_config(Arc::new(transport));
        Some(cfg)
    } else {
        None
    };
    let runtime = quinn::default_runtime().ok_or_else(|| setup(&"no async runtime"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, sock.into(), runtime)
        .map_err(|e| setup(&e))
}

/// Why a peer of the data plane (a holder we fetch from, or a requester we serve) could
/// not be used. The fetch records it per holder and goes on with the others.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{addr}: {why}")]
    Address { addr: String, why: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("connect {addr}: {why}")]
    Connect { addr: SocketAddr, why: String },
    #[error("closed by the holder: {0}")]
    Closed(String),
    /// The holder refused (its reason).
    #[error("refused: {0}")]
    Refused(String),
    /// We refused the requester (the reason it was sent).
    #[error(transparent)]
    Refusal(#[from] Refusal),
    #[error(transparent)]
    Frame(#[from] crate::framing::FrameError),
    #[error("stream: {0}")]
    Stream(String),
    #[error("no answer in time")]
    Timeout,
    #[error("no request in time")]
    NoRequest,
    #[error("chunk body timed out")]
    BodyTimeout,
    #[error("unexpected reply")]
    Unexpected,
    #[error("unknown request")]
    UnknownRequest,
    #[error("sent chunk {got} ({got_len} bytes) instead of {want} ({want_len} bytes)")]
    WrongChunk { got: String, got_len: u32, want: String, want_len: u32 },
    #[error("stream ended early")]
    Ended,
    #[error("local store: {0}")]
    Local(String),
}

/// Why a holder refuses a request; sent to the requester as `Refused`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("this holder has no ticket key yet (not connected to the coordinator)")]
    NoTicketKey,
    #[error(transparent)]
    Ticket(#[from] fleetmesh_protocol::data::DataError),
    #[error("dataset {0} is not held here")]
    NotHeld(String),
    #[error("residency: dataset {id} may only live in {allowed:?}; requester certificate's jurisdiction is {requester}")]
    Residency { id: String, allowed: Vec<String>, requester: String },
    #[error("chunk {chunk} is not part of dataset {dataset}")]
    NotInDataset { chunk: String, dataset: String },
    #[error("bad request: {0}")]
    BadRequest(String),
}

async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, PeerError> {
    Ok(crate::framing::read_frame(recv).await?)
}

async fn write_frame<T: serde::Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), PeerError> {
    Ok(crate::framing::write_frame(send, msg, None).await?)
}

/// Paces outgoing bytes to a configured rate (an operator's cap on serving bandwidth).
#[derive(Debug)]
struct Pacer {
    bytes_per_s: u64,
    next: tokio::sync::Mutex<Instant>,
}

impl Pacer {
    async fn take(&self, n: u64) {
        let at = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let at = (*next).max(now);
            *next = at + Duration::from_secs_f64(n as f64 / self.bytes_per_s as f64);
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

/// The serving side of the data plane.
#[derive(Debug)]
pub struct XferServer {
    store: Arc<Store>,
    name: String,
    trust_domain: String,
    ticket_key: std::sync::RwLock<Option<Vec<u8>>>,
    pacer: Option<Pacer>,
    pub chunks_served: AtomicU64,
    pub bytes_served: AtomicU64,
    pub refusals: AtomicU64,
    /// Revoked agent names and certificate serials, from the coordinator.
    denied:
        std::sync::RwLock<(std::collections::HashSet<String>, std::collections::HashSet<String>)>,
}

impl XferServer {
    /// `name` is this holder's certificate name; `rate` caps bytes served per second.
    pub fn new(
        store: Arc<Store>,
        name: &str,
        trust_domain: &str,
        ticket_key: Option<Vec<u8>>,
        rate: Option<u64>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            name: name.to_string(),
            trust_domain: trust_domain.to_string(),
            ticket_key: std::sync::RwLock::new(ticket_key),
            pacer: rate
                .filter(|r| *r > 0)
                .map(|bytes_per_s| Pacer { bytes_per_s, next: Instant::now().into() }),
            chunks_served: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            denied: Default::default(),
        })
    }

    /// The coordinator's ticket-signing public key (sent after every hello).
    pub fn set_ticket_key(&self, key: Vec<u8>) {
        if let Ok(mut k) = self.ticket_key.write() {
            *k = Some(key);
        }
    }

    /// Accept connections on `endpoint` until it is closed.
    pub fn spawn_accept_loop(
        self: &Arc<Self>,
        endpoint: quinn::Endpoint,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => me.serve(conn).await,
                        Err(e) => warn!(error = %e, "xfer: handshake refused"),
                    }
                });
            }
        })
    }

    /// Replace the list of revoked agents and serials (from the coordinator).
    pub fn set_denied(&self, agents: Vec<String>, serials: Vec<String>) {
        if let Ok(mut d) = self.denied.write() {
            *d = (agents.into_iter().collect(), serials.into_iter().collect());
        }
    }

    fn is_denied(&self, p: &PeerIdentity) -> bool {
        self.denied.read().is_ok_and(|d| {
            d.1.contains(&p.serial) || (p.kind == PeerKind::Agent && d.0.contains(&p.name))
        })
    }

    /// Serve one authenticated connection.
    pub async fn serve(self: Arc<Self>, conn: quinn::Connection) {
        let chain = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok());
        let peer = match peer_identity(chain.as_deref().map(|v| v.as_slice())) {
            Ok(p) if self.is_denied(&p) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                warn!(requester = %p.spiffe_id(), "revoked identity refused on the data port");
                conn.close(
                    close_code::REFUSED.into(),
                    format!("certificate of {} is revoked", p.spiffe_id()).as_bytes(),
                );
                return;
            }
            Ok(p) if p.trust_domain == self.trust_domain => p,
            Ok(p) => {
                conn.close(
                    close_code::REFUSED.into(),
                    format!("foreign trust domain {}", p.trust_domain).as_bytes(),
                );
                return;
            }
            Err(e) => {
                conn.close(
                    close_code::REFUSED.into(),
                    format!("no usable certificate: {e}").as_bytes(),
                );
                return;
            }
        };
        while let Ok((send, recv)) = conn.accept_bi().await {
            let me = self.clone();
            let peer = peer.clone();
            tokio::spawn(async move {
                if let Err(e) = me.handle(&peer, send, recv).await {
                    debug!(requester = %peer.name, error = %e, "xfer stream ended");
                }
            });
        }
    }

    /// Check a request's ticket against the verified requester and the local copy.
    fn authorize(&self, peer: &PeerIdentity, t: &SignedTicket) -> Result<LocalDataset, Refusal> {
        let key = self.ticket_key.read().ok().and_then(|k| k.clone());
        let Some(key) = key else { return Err(Refusal::NoTicketKey) };
        let juris = peer.attributes.jurisdiction.as_deref();
        verify_ticket(&key, t, &t.ticket.dataset, &self.name, peer, crate::now_unix_ms())?;
        let local = self
            .store
            .dataset(&t.ticket.dataset)
            .ok_or_else(|| Refusal::NotHeld(short(&t.ticket.dataset).to_string()))?;
        // The residency recorded with our copy is checked as well as the ticket's.
        if peer.kind == PeerKind::Agent && !residency_allows(&local.jurisdictions, juris) {
            return Err(Refusal::Residency {
                id: short(&local.id).to_string(),
                allowed: local.jurisdictions.clone(),
                requester: juris.unwrap_or("none").to_string(),
            });
        }
        Ok(local)
    }

    async fn handle(
        &self,
        peer: &PeerIdentity,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), PeerError> {
        let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame::<XferRequest>(&mut recv))
            .await
        {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => {
                let reason = Refusal::BadRequest(e.to_string()).to_string();
                // The requester may be gone already: it learns nothing more either way.
                let _ = write_frame(&mut send, &XferReply::Refused { reason }).await;
                return Err(e);
            }
            Err(_) => return Err(PeerError::NoRequest),
        };
        let (ticket, hashes) = match &req {
            XferRequest::Manifest { ticket } => (ticket, None),
            XferRequest::Chunks { ticket, hashes } => (ticket, Some(hashes)),
            _ => return Err(PeerError::UnknownRequest),
        };
        let local = match self.authorize(peer, ticket) {
            Ok(l) => l,
            Err(reason) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                warn!(
                    requester = %peer.spiffe_id(),
                    dataset = %short(&ticket.ticket.dataset),
                    %reason,
                    "xfer request refused"
                );
                // Best effort: the requester may be gone already.
                let _ = write_frame(&mut send, &XferReply::Refused { reason: reason.to_string() })
                    .await;
                let _ = send.finish();
                return Err(reason.into());
            }
        };
        match hashes {
            None => {
                write_frame(&mut send, &XferReply::Manifest(local.manifest)).await?;
            }
            Some(hashes) => {
                for h in hashes {
                    if !self.store.contains(&local.id, h) {
                        let reason = Refusal::NotInDataset {
                            chunk: short(&hash_hex(h)).to_string(),
                            dataset: short(&local.id).to_string(),
                        };
                        warn!(requester = %peer.spiffe_id(), %reason, "xfer request refused");
                        self.refusals.fetch_add(1, Ordering::Relaxed);
                        let reason = reason.to_string();
                        write_frame(&mut send, &XferReply::Refused { reason }).await?;
                        break;
                    }
                    let store = self.store.clone();
                    let hh = *h;
                    let bytes = tokio::task::spawn_blocking(move || store.read(&hh))
                        .await
                        .map_err(|e| PeerError::Local(e.to_string()))?;
                    let Ok(bytes) = bytes else {
                        write_frame(&mut send, &XferReply::Missing { hash: *h }).await?;
                        continue;
                    };
                    if let Some(p) = &self.pacer {
                        p.take(bytes.len() as u64).await;
                    }
                    let len = bytes.len() as u64;
                    write_frame(&mut send, &XferReply::Chunk { hash: *h, len: len as u32 }).await?;
                    // Handed to quinn without another copy.
                    send.write_chunk(bytes.into())
                        .await
                        .map_err(|e| PeerError::Stream(e.to_string()))?;
                    self.chunks_served.fetch_add(1, Ordering::Relaxed);
                    self.bytes_served.fetch_add(len, Ordering::Relaxed);
                }
            }
        }
        let _ = send.finish();
        // Let the peer read everything before the stream is dropped.
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, send.stopped()).await;
        Ok(())
    }
}

/// One chunk still to fetch.
#[derive(Debug, Clone)]
struct Item {
    hash: Hash,
    len: u32,
    /// Holders (by index) that already failed to deliver it.
    tried: Vec<usize>,
}

#[derive(Debug, Default)]
struct Work {
    queue: VecDeque<Item>,
    in_flight: usize,
    alive: Vec<bool>,
    why_dead: Vec<String>,
    failed: Option<String>,
    fetched: u64,
    per_holder: Vec<u64>,
}

/// A connection to one holder, opened on first use.
async fn connect(
    endpoint: &quinn::Endpoint,
    tls: &TlsIdentity,
    h: &Holder,
) -> Result<quinn::Connection, PeerError> {
    let bad_addr = |why: String| PeerError::Address { addr: h.addr.clone(), why };
    let addr: SocketAddr = match h.addr.parse() {
        Ok(a) => a,
        Err(_) => tokio::net::lookup_host(&h.addr)
            .await
            .map_err(|e| bad_addr(e.to_string()))?
            .next()
            .ok_or_else(|| bad_addr("no address".into()))?,
    };
    let rustls_cfg = tls
        .peer_client_config(&[ALPN_XFER], h.kind, &h.name)
        .map_err(|e| PeerError::Tls(e.to_string()))?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(rustls_cfg)
        .map_err(|e| PeerError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(5)).ok());
    cfg.transport_config(Arc::new(transport));
    let connect_err = |why: String| PeerError::Connect { addr, why };
    let connecting = endpoint
        .connect_with(cfg, addr, "fleetmesh-peer")
        .map_err(|e| connect_err(e.to_string()))?;
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| connect_err("timed out".into()))?
        .map_err(|e| connect_err(e.to_string()))
}

/// The holder's own reason when it closed the connection (a refusal), else `e`.
fn with_close_reason(conn: &quinn::Connection, e: PeerError) -> PeerError {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            PeerError::Closed(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => e,
    }
}

async fn get_manifest(
    conn: &quinn::Connection,
    ticket: &SignedTicket,
) -> Result<Manifest, PeerError> {
    ask_manifest(conn, ticket).await.map_err(|e| with_close_reason(conn, e))
}

async fn ask_manifest(
    conn: &quinn::Connection,
    ticket: &SignedTicket,
) -> Result<Manifest, PeerError> {
    let (mut send, mut recv) =
        conn.open_bi().await.map_err(|e| PeerError::Stream(e.to_string()))?;
    write_frame(&mut send, &XferRequest::Manifest { ticket: ticket.clone() }).await?;
    // The request is written; a stream that cannot be finished shows in the answer.
    let _ = send.finish();
    match tokio::time::timeout(REQUEST_TIMEOUT, read_frame::<XferReply>(&mut recv)).await {
        Ok(Ok(Some(XferReply::Manifest(m)))) => Ok(m),
        Ok(Ok(Some(XferReply::Refused { reason }))) => Err(PeerError::Refused(reason)),
        Ok(Ok(_)) => Err(PeerError::Unexpected),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(PeerError::Timeout),
    }
}

/// Per-chunk result of one request.
enum Got {
    Bytes(Vec<u8>),
    Missing,
}

/// Ask one holder for a batch. `Err` = the holder is unusable (refused or gone).
async fn get_chunks(
    conn: &quinn::Connection,
    ticket: &SignedTicket,
    batch: &[Item],
) -> Result<Vec<Got>, PeerError> {
    let (mut send, mut recv) =
        conn.open_bi().await.map_err(|e| PeerError::Stream(e.to_string()))?;
    let hashes = batch.iter().map(|i| i.hash).collect();
    write_frame(&mut send, &XferRequest::Chunks { ticket: ticket.clone(), hashes }).await?;
    let _ = send.finish();
    let mut out = Vec::with_capacity(batch.len());
    for it in batch {
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, read_frame::<XferReply>(&mut recv))
            .await
            .map_err(|_| PeerError::Timeout)??;
        match reply {
            Some(XferReply::Chunk { hash, len }) if hash == it.hash && len == it.len => {
                let mut buf = vec![0u8; len as usize];
                tokio::time::timeout(REQUEST_TIMEOUT, recv.read_exact(&mut buf))
                    .await
                    .map_err(|_| PeerError::BodyTimeout)?
                    .map_err(|e| PeerError::Stream(e.to_string()))?;
                out.push(Got::Bytes(buf));
            }
            Some(XferReply::Chunk { hash, len }) => {
                return Err(PeerError::WrongChunk {
                    got: short(&hash_hex(&hash)).to_string(),
                    got_len: len,
                    want: short(&hash_hex(&it.hash)).to_string(),
                    want_len: it.len,
                })
            }
            Some(XferReply::Missing { .. }) => out.push(Got::Missing),
            Some(XferReply::Refused { reason }) => return Err(PeerError::Refused(reason)),
            Some(_) | None => return Err(PeerError::Ended),
        }
    }
    Ok(out)
}

/// Fetch `plan`'s dataset into `store` from its holders. Chunks already in the store are
/// not fetched again. `progress(bytes)` is called as verified chunks land.
pub async fn fetch(
    endpoint: &quinn::Endpoint,
    tls: &TlsIdentity,
    store: Arc<Store>,
    plan: &FetchPlan,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<FetchReport, FetchError> {
    fetch_part(endpoint, tls, store, plan, None, progress).await
}

/// Like [`fetch`], but only the chunks of `shard`'s files (all of them without one):
/// an array member fetches its share of a dataset, not the whole.
pub async fn fetch_part(
    endpoint: &quinn::Endpoint,
    tls: &TlsIdentity,
    store: Arc<Store>,
    plan: &FetchPlan,
    shard: Option<Shard>,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<FetchReport, FetchError> {
    let id = plan.dataset.clone();
    let connections = connect_all(endpoint, tls, &plan.holders).await;
    let manifest = manifest_for(&store, plan, &connections).await?;
    let all = manifest.shard(shard).unique_chunks();
    let missing: VecDeque<Item> = all
        .iter()
        .filter(|(h, _)| !store.has(h))
        .map(|(hash, len)| Item { hash: *hash, len: *len, tried: Vec::new() })
        .collect();
    let reused = (all.len() - missing.len()) as u64;
    info!(
        dataset = %short(&id),
        chunks = all.len(),
        already_present = reused,
        to_fetch = missing.len(),
        holders = plan.holders.len(),
        "fetch started"
    );
    let work = Arc::new(Mutex::new(Work {
        queue: missing,
        alive: connections.iter().map(|c| c.is_ok()).collect(),
        why_dead: connections
            .iter()
            .zip(&plan.holders)
            .map(|(c, h)| c.as_ref().err().map(|e| format!("{}: {e}", h.name)).unwrap_or_default())
            .collect(),
        per_holder: vec![0; plan.holders.len()],
        ..Default::default()
    }));
    let pull = Pull { work: work.clone(), store, notify: Default::default(), progress };
    let mut tasks = Vec::new();
    for (i, c) in connections.iter().enumerate() {
        let Ok(conn) = c else { continue };
        for _ in 0..STREAMS_PER_HOLDER {
            let (pull, holder, conn) = (pull.clone(), plan.holders[i].clone(), conn.clone());
            tasks.push(tokio::spawn(async move { pull.worker(i, holder, conn).await }));
        }
    }
    for t in tasks {
        // A worker that panicked left its chunks queued: the report says what is missing.
        let _ = t.await;
    }
    for c in connections.into_iter().flatten() {
        c.close(close_code::DONE.into(), b"done");
    }
    let w = work.lock().map_err(|_| FetchError::Setup("poisoned".into()))?;
    report(&w, plan, reused)
}

/// One connection per holder, opened concurrently.
async fn connect_all(
    endpoint: &quinn::Endpoint,
    tls: &TlsIdentity,
    holders: &[Holder],
) -> Vec<Result<quinn::Connection, PeerError>> {
    let tasks: Vec<_> = holders
        .iter()
        .map(|h| {
            let (endpoint, tls, h) = (endpoint.clone(), tls.clone(), h.clone());
            tokio::spawn(async move { connect(&endpoint, &tls, &h).await })
        })
        .collect();
    let mut connections = Vec::new();
    for c in tasks {
        connections.push(c.await.unwrap_or_else(|e| Err(PeerError::Stream(e.to_string()))));
    }
    connections
}

/// The manifest: known locally (a resumed fetch), or from the first holder that has a
/// valid one matching the dataset id (then recorded in the store).
async fn manifest_for(
    store: &Store,
    plan: &FetchPlan,
    connections: &[Result<quinn::Connection, PeerError>],
) -> Result<Manifest, FetchError> {
    if let Some(d) = store.dataset(&plan.dataset) {
        return Ok(d.manifest);
    }
    let mut reasons = Vec::new();
    for (h, c) in plan.holders.iter().zip(connections) {
        let m = match c {
            Ok(c) => get_manifest(c, &h.ticket).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match m {
            Ok(m) if m.id() == plan.dataset && m.validate().is_ok() => {
                store.add_dataset(LocalDataset {
                    id: plan.dataset.clone(),
                    name: plan.name.clone(),
                    jurisdictions: plan.jurisdictions.clone(),
                    manifest: m.clone(),
                })?;
                return Ok(m);
            }
            Ok(_) => reasons.push(format!("{}: manifest does not match the dataset id", h.name)),
            Err(e) => reasons.push(format!("{}: {e}", h.name)),
        }
    }
    Err(FetchError::NoManifest { dataset: plan.dataset.clone(), reasons: reasons.join("; ") })
}

/// How the fetch ended, from the shared work state.
fn report(w: &Work, plan: &FetchPlan, reused: u64) -> Result<FetchReport, FetchError> {
    let reasons: Vec<String> = w.why_dead.iter().filter(|r| !r.is_empty()).cloned().collect();
    if !w.queue.is_empty() || w.failed.is_some() {
        let mut why = reasons;
        why.extend(w.failed.clone());
        return Err(FetchError::Incomplete {
            dataset: plan.dataset.clone(),
            missing: w.queue.len(),
            reasons: if why.is_empty() { "no holder reachable".into() } else { why.join("; ") },
        });
    }
    let per_holder: Vec<(String, u64)> =
        plan.holders.iter().map(|h| h.name.clone()).zip(w.per_holder.iter().copied()).collect();
    info!(
        dataset = %short(&plan.dataset),
        fetched = w.fetched,
        reused,
        per_holder = ?per_holder,
        "fetch complete"
    );
    Ok(FetchReport {
        dataset: plan.dataset.clone(),
        ok: true,
        detail: reasons.join("; "),
        fetched_chunks: w.fetched,
        reused_chunks: reused,
        per_holder,
    })
}

/// What the workers of one fetch share.
#[derive(Clone)]
struct Pull {
    work: Arc<Mutex<Work>>,
    store: Arc<Store>,
    notify: Arc<tokio::sync::Notify>,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
}

/// What a worker does next.
enum Next {
    Fetch(Vec<Item>),
    /// Nothing it may take right now; other workers are busy.
    Wait,
    Done,
}

/// What came of one batch.
#[derive(Default)]
struct Landed {
    requeue: Vec<Item>,
    landed: u64,
    dead: Option<PeerError>,
}

/// How long an idle worker waits for others before looking at the queue again.
const IDLE_WAIT: Duration = Duration::from_millis(20);

impl Pull {
    /// Fetch batches from holder `me` until nothing is left that it may take.
    async fn worker(&self, me: usize, holder: Holder, conn: quinn::Connection) {
        loop {
            let batch = match self.next_batch(me) {
                Next::Done => return,
                Next::Wait => {
                    // Woken early when another worker finishes a batch.
                    let _ = tokio::time::timeout(IDLE_WAIT, self.notify.notified()).await;
                    continue;
                }
                Next::Fetch(b) => b,
            };
            let result = get_chunks(&conn, &holder.ticket, &batch).await;
            let landed = self.land(me, &holder, batch, result).await;
            let Ok(mut w) = self.work.lock() else { return };
            w.in_flight -= landed.requeue.len() + landed.landed as usize;
            w.fetched += landed.landed;
            w.per_holder[me] += landed.landed;
            w.queue.extend(landed.requeue);
            if let Some(e) = landed.dead {
                w.alive[me] = false;
                w.why_dead[me] = format!("{}: {e}", holder.name);
            }
            self.notify.notify_waiters();
        }
    }

    /// Take up to [`CHUNKS_PER_REQUEST`] chunks this holder has not failed yet.
    fn next_batch(&self, me: usize) -> Next {
        let Ok(mut w) = self.work.lock() else { return Next::Done };
        if w.failed.is_some() || !w.alive[me] {
            return Next::Done;
        }
        let mut batch = Vec::new();
        let mut rest = VecDeque::new();
        while let Some(it) = w.queue.pop_front() {
            if batch.len() < CHUNKS_PER_REQUEST && !it.tried.contains(&me) {
                batch.push(it);
            } else {
                rest.push_back(it);
            }
        }
        w.queue = rest;
        if !batch.is_empty() {
            w.in_flight += batch.len();
            return Next::Fetch(batch);
        }
        if w.queue.is_empty() && w.in_flight == 0 {
            self.notify.notify_waiters();
            return Next::Done;
        }
        // A chunk every live holder failed to deliver cannot be fetched.
        let alive: Vec<usize> = (0..w.alive.len()).filter(|i| w.alive[*i]).collect();
        if w.in_flight == 0 {
            if let Some(dead) = w.queue.iter().find(|it| alive.iter().all(|a| it.tried.contains(a)))
            {
                w.failed = Some(format!(
                    "chunk {} could not be fetched from any holder",
                    short(&hash_hex(&dead.hash))
                ));
                self.notify.notify_waiters();
                return Next::Done;
            }
        }
        Next::Wait
    }

    /// Store what a batch brought, verified; what failed goes back to the queue for
    /// the other holders.
    async fn land(
        &self,
        me: usize,
        holder: &Holder,
        batch: Vec<Item>,
        result: Result<Vec<Got>, PeerError>,
    ) -> Landed {
        let mut out = Landed::default();
        let got = match result {
            Ok(got) => got,
            Err(e) => {
                warn!(holder = %holder.name, error = %e, "holder failed; its chunks go to the others");
                out.dead = Some(e);
                for mut it in batch {
                    it.tried.push(me);
                    out.requeue.push(it);
                }
                return out;
            }
        };
        for (mut it, g) in batch.into_iter().zip(got) {
            let Got::Bytes(b) = g else {
                it.tried.push(me);
                out.requeue.push(it);
                continue;
            };
            let (st, h, len) = (self.store.clone(), it.hash, b.len() as u64);
            match tokio::task::spawn_blocking(move || st.write(&h, &b)).await {
                Ok(Ok(())) => {
                    out.landed += 1;
                    (self.progress)(len);
                }
                Ok(Err(StoreError::Corrupt { .. })) => {
                    warn!(
                        holder = %holder.name,
                        chunk = %short(&hash_hex(&it.hash)),
                        "chunk failed hash verification; fetching it from another holder"
                    );
                    it.tried.push(me);
                    out.requeue.push(it);
                }
                Ok(Err(e)) => self.fail_local(format!("local store: {e}"), it, &mut out),
                Err(e) => self.fail_local(format!("local store: {e}"), it, &mut out),
            }
        }
        out
    }

    /// A local store problem (disk full...) fails the whole fetch.
    fn fail_local(&self, why: String, it: Item, out: &mut Landed) {
        if let Ok(mut w) = self.work.lock() {
            w.failed = Some(why);
        }
        out.requeue.push(it);
    }
}
