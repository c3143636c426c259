//! Zero-touch enrollment on the agent: generate a key locally, send a CSR with the join
//! token to the coordinator (server authenticated by the pinned CA fingerprint, no client
//! certificate), store the issued certificate next to the key in the data dir.
//!
//! Files (in `<data-dir>/identity/`): `agent.key` (0600, never leaves the node),
//! `agent.pem` (replaced atomically on renewal), `ca.pem` (checked against the pin).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetmesh_protocol::enroll::{
    enroll_client_config, sha256_hex, EnrollMessage, EnrollReply, EnrollRequest, JoinString,
};
use fleetmesh_protocol::tls::TlsIdentity;
use fleetmesh_protocol::{Attributes, PROTOCOL_VERSION};

/// How long one enrollment attempt may take.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollFailure {
    /// The coordinator said no (token expired, used up, revoked, wrong secret, ...).
    #[error("enrollment refused by the coordinator: {0}")]
    Refused(String),
    /// The server is not the mesh the join string names.
    #[error("{0}")]
    CaMismatch(String),
    /// Could not reach any coordinator (worth retrying).
    #[error("cannot reach a coordinator to enroll: {0}")]
    Unreachable(String),
    #[error("enrollment answer unusable: {0}")]
    BadAnswer(String),
    #[error("identity files: {0}")]
    Files(String),
}

impl EnrollFailure {
    /// Whether trying again later can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, EnrollFailure::Unreachable(_))
    }
}

/// What enrollment produced.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub name: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

/// Paths of the agent's own identity.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub dir: PathBuf,
}

impl IdentityFiles {
    pub fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.join("identity") }
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("agent.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("agent.pem")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn complete(&self) -> bool {
        self.key().exists() && self.cert().exists() && self.ca().exists()
    }

    /// The stored key, or a new one (written 0600) if there is none.
    pub fn key_pem(&self) -> Result<String, EnrollFailure> {
        if self.key().exists() {
            return std::fs::read_to_string(self.key())
                .map_err(|e| EnrollFailure::Files(format!("{}: {e}", self.key().display())));
        }
        let pem = fleetmesh_protocol::enroll::generate_key_pem()
            .map_err(|e| EnrollFailure::Files(e.to_string()))?;
        fleetmesh_protocol::pki::write_private(&self.key(), pem.as_bytes(), false)
            .map_err(|e| EnrollFailure::Files(e.to_string()))?;
        Ok(pem)
    }

    /// Replace a file atomically (write a temp file, fsync, rename).
    pub fn write_atomic(path: &Path, contents: &str) -> Result<(), EnrollFailure> {
        let tmp = path.with_extension("tmp");
        let err = |e: std::io::Error| EnrollFailure::Files(format!("{}: {e}", path.display()));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(contents.as_bytes()).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)
    }

    pub fn save(&self, enrolled: &Enrolled) -> Result<(), EnrollFailure> {
        std::fs::create_dir_all(&self.dir).map_err(|e| EnrollFailure::Files(e.to_string()))?;
        Self::write_atomic(&self.ca(), &enrolled.ca_pem)?;
        Self::write_atomic(&self.cert(), &enrolled.cert_pem)
    }

    pub fn load(&self) -> Result<TlsIdentity, EnrollFailure> {
        TlsIdentity::load(&self.ca(), &self.cert(), &self.key())
            .map_err(|e| EnrollFailure::Files(e.to_string()))
    }
}

/// The coordinator's answer could not be read.
#[derive(Debug, thiserror::Error)]
enum ReplyError {
    #[error("the coordinator closed the stream before answering")]
    Closed,
    #[error(transparent)]
    Frame(#[from] fleetmesh_data::framing::FrameError),
}

async fn read_reply(recv: &mut quinn::RecvStream) -> Result<EnrollReply, ReplyError> {
    fleetmesh_data::framing::read_frame(recv).await?.ok_or(ReplyError::Closed)
}

fn classify(msg: String) -> EnrollFailure {
    if msg.contains("CA fingerprint mismatch") {
        EnrollFailure::CaMismatch(format!(
            "the coordinator's CA does not match the fingerprint in the join string (wrong mesh, or someone in the middle): {msg}"
        ))
    } else {
        EnrollFailure::Unreachable(msg)
    }
}

/// What the coordinator's closing of an enrollment connection means: a refusal (of the
/// token, the name, the version) is final; anything else, such as a busy coordinator
/// that did not see the request in time, is worth another try.
fn closed_by_coordinator(c: &quinn::ApplicationClose) -> EnrollFailure {
    use fleetmesh_protocol::codec::close_code::{REFUSED, VERSION_MISMATCH};
    let reason = String::from_utf8_lossy(&c.reason).into_owned();
    match u64::from(c.error_code) {
        code if code == u64::from(REFUSED) || code == u64::from(VERSION_MISMATCH) => {
            EnrollFailure::Refused(reason)
        }
        _ => EnrollFailure::Unreachable(format!("the coordinator closed the connection: {reason}")),
    }
}

/// Enroll once against the coordinators of `join` (first that answers wins).
pub async fn enroll(
    join: &JoinString,
    key_pem: &str,
    requested_name: &str,
    requested: &Attributes,
) -> Result<Enrolled, EnrollFailure> {
    let csr_pem = fleetmesh_protocol::enroll::make_csr(key_pem, requested_name, requested)
        .map_err(|e| EnrollFailure::Files(e.to_string()))?;
    let cfg = enroll_client_config(&join.ca_fingerprint)
        .map_err(|e| EnrollFailure::Files(e.to_string()))?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| EnrollFailure::Files(e.to_string()))?;
    let client_cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut last = EnrollFailure::Unreachable("no coordinator address".into());
    for target in &join.coordinators {
        let attempt = async {
            let host = target
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                .unwrap_or(target);
            let addr = tokio::net::lookup_host(target.as_str())
                .await
                .map_err(|e| EnrollFailure::Unreachable(format!("{target}: {e}")))?
                .next()
                .ok_or_else(|| EnrollFailure::Unreachable(format!("{target}: no address")))?;
            let bind: std::net::SocketAddr = if addr.is_ipv6() {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let mut ep = quinn::Endpoint::client(bind)
                .map_err(|e| EnrollFailure::Unreachable(e.to_string()))?;
            ep.set_default_client_config(client_cfg.clone());
            let conn = ep
                .connect(addr, host)
                .map_err(|e| EnrollFailure::Unreachable(e.to_string()))?
                .await
                .map_err(|e| classify(format!("{target}: {e}")))?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| classify(e.to_string()))?;
            let req = EnrollRequest {
                protocol_version: PROTOCOL_VERSION,
                token_id: join.token_id.clone(),
                token_secret: join.secret.clone(),
                requested_name: requested_name.to_string(),
                csr_pem: csr_pem.clone(),
            };
            fleetmesh_data::framing::write_frame(&mut send, &EnrollMessage::Enroll(req), None)
                .await
                .map_err(|e| classify(e.to_string()))?;
            let _ = send.finish();
            let reply = read_reply(&mut recv).await.map_err(|e| match conn.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(c)) => closed_by_coordinator(&c),
                _ => classify(e.to_string()),
            })?;
            conn.close(fleetmesh_protocol::codec::close_code::DONE.into(), b"done");
            match reply {
                EnrollReply::Issued { name, cert_pem, ca_pem } => {
                    let ca_der =
                        fleetmesh_protocol::tls::certs_from_pem(Path::new("ca"), ca_pem.as_bytes())
                            .map_err(|e| EnrollFailure::BadAnswer(e.to_string()))?;
                    if ca_der.first().map(|c| sha256_hex(c)) != Some(join.ca_fingerprint.clone()) {
                        return Err(EnrollFailure::CaMismatch(
                            "issued CA does not match the join string's fingerprint".into(),
                        ));
                    }
                    let p = Path::new("issued");
                    let id = TlsIdentity::from_pem(
                        p,
                        ca_pem.as_bytes(),
                        p,
                        cert_pem.as_bytes(),
                        p,
                        key_pem.as_bytes(),
                    )
                    .map_err(|e| EnrollFailure::BadAnswer(e.to_string()))?;
                    if id.identity.name != name {
                        return Err(EnrollFailure::BadAnswer(format!(
                            "certificate is for {}, not {name}",
                            id.identity.name
                        )));
                    }
                    Ok(Enrolled { name, cert_pem, ca_pem })
                }
                EnrollReply::Refused { reason } => Err(EnrollFailure::Refused(reason)),
                other => Err(EnrollFailure::BadAnswer(format!("{other:?}"))),
            }
        };
        match tokio::time::timeout(ENROLL_TIMEOUT, attempt).await {
            Ok(Ok(e)) => return Ok(e),
            Ok(Err(e)) if !e.is_transient() => return Err(e),
            Ok(Err(e)) => last = e,
            Err(_) => last = EnrollFailure::Unreachable(format!("{target}: timed out")),
        }
    }
    Err(last)
}
