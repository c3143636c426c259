//! `Authority` actor: the coordinator's certificate authority. Owns the CA key (when the
//! coordinator is given `--ca-key`), join tokens, enrollment, renewal, revocation and the
//! audit trail, all persisted in the store.
//!
//! Tokens are stored hashed (SHA-256 of the secret) and consumed in the same transaction
//! that records the enrollment. Issued certificates take their name and attributes from
//! the token (enrollment) or from the current certificate (renewal), never from the CSR.
//! Revocation denies an identity (agent, operator or coordinator, by kind and name) and
//! every serial issued to it. The denied set is a shared [`Revocations`] that the
//! Listener (every connection) and the Api (every request) read.

use std::sync::Arc;
use std::time::Duration;

use fleetmesh_protocol::enroll::{sha256_hex, EnrollRequest, JoinString};
use fleetmesh_protocol::identity::validate_label;

use crate::autoscale::pools::POOL_LABEL;
use fleetmesh_protocol::pki::{Ca, IssueRequest};
use fleetmesh_protocol::{PeerIdentity, PeerKind};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::RngCore;
use tracing::{info, warn};

use crate::fleet::FleetMsg;
use crate::persist::store::{AuditRecord, ConsumeError, Store, TokenRecord};

pub use fleetmesh_protocol::api::TokenSpec;

pub use fleetmesh_api::trust::{TokenCreated, TokenView};

/// Result of an enrollment.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub name: String,
    pub cert_pem: String,
}

pub use crate::trust::revocations::Revocations;

/// Why the Authority refused or failed. Shown to API callers and enrolling agents as is.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthorityError {
    #[error("this coordinator has no CA key (start it with --ca-key): enrollment and renewal are disabled")]
    NoCaKey,
    /// The request itself is wrong (a name, a label, a duration, a version).
    #[error("{0}")]
    Invalid(String),
    #[error("no join token {0}")]
    NoToken(String),
    #[error("no coordinator address to put in the join string: pass one, or start the coordinator with --advertise")]
    NoAdvertisedAddress,
    /// The identity is revoked (the reason names it).
    #[error("{0}")]
    Revoked(String),
    #[error("{0}")]
    Token(#[from] crate::persist::store::TokenRefusal),
    #[error("store: {0}")]
    Store(String),
    #[error("certificate: {0}")]
    Pki(String),
    /// The Authority did not answer (the coordinator is stopping or overloaded).
    #[error("authority unavailable: {0}")]
    Unavailable(String),
}

impl From<crate::persist::store::StoreError> for AuthorityError {
    fn from(e: crate::persist::store::StoreError) -> Self {
        AuthorityError::Store(e.to_string())
    }
}

impl From<fleetmesh_protocol::pki::PkiError> for AuthorityError {
    fn from(e: fleetmesh_protocol::pki::PkiError) -> Self {
        AuthorityError::Pki(e.to_string())
    }
}

/// What an Authority call answers.
pub type AuthorityResult<T> = Result<T, AuthorityError>;

/// Authority messages.
pub enum AuthorityMsg {
    CreateToken(TokenSpec, RpcReplyPort<AuthorityResult<TokenCreated>>),
    ListTokens(RpcReplyPort<AuthorityResult<Vec<TokenView>>>),
    RevokeToken(String, RpcReplyPort<AuthorityResult<()>>),
    Enroll(Box<EnrollRequest>, RpcReplyPort<AuthorityResult<Enrolled>>),
    Renew {
        identity: PeerIdentity,
        csr_pem: String,
        reply: RpcReplyPort<AuthorityResult<String>>,
    },
    /// Deny an identity on every port from now on; `actor` is who asked.
    Revoke {
        kind: PeerKind,
        name: String,
        reason: String,
        actor: Option<String>,
        reply: RpcReplyPort<AuthorityResult<()>>,
    },
    /// Append to the audit trail (the Api records every change it makes); answered once
    /// stored.
    Record(Box<AuditRecord>, RpcReplyPort<AuthorityResult<()>>),
    /// `Some(reason)` when this identity must not connect.
    CheckRevoked(PeerIdentity, RpcReplyPort<Option<String>>),
    Audit(RpcReplyPort<AuthorityResult<Vec<AuditRecord>>>),
}

/// Authority start-up arguments.
pub struct AuthorityArgs {
    /// Names of the configured pools (their nodes' tokens are refused once a pool goes).
    pub pools: std::collections::BTreeSet<String>,
    pub ca: Option<Ca>,
    pub ca_pem: String,
    pub store: Arc<Store>,
    pub cert_ttl: Duration,
    pub advertise: Vec<String>,
    pub fleet: ActorRef<FleetMsg>,
    pub revocations: Arc<Revocations>,
}

/// Authority state.
pub struct AuthorityState {
    ca: Option<Ca>,
    ca_fingerprint: String,
    store: Arc<Store>,
    cert_ttl: Duration,
    advertise: Vec<String>,
    fleet: ActorRef<FleetMsg>,
    revocations: Arc<Revocations>,
    pools: std::collections::BTreeSet<String>,
}

/// The Authority actor.
pub struct Authority;

/// Default token lifetime.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

use fleetmesh_data::now_unix_ms as now_ms;

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn audit(
    event: &str,
    agent: Option<&str>,
    token: Option<&str>,
    detail: impl Into<String>,
) -> AuditRecord {
    AuditRecord {
        at_unix_ms: now_ms(),
        event: event.into(),
        agent: agent.map(str::to_string),
        token_id: token.map(str::to_string),
        serial: None,
        not_after_unix: None,
        detail: detail.into(),
        actor: None,
    }
}

fn serial_of(cert_pem: &str) -> (Option<String>, Option<i64>) {
    use rustls::pki_types::pem::PemObject;
    let id = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .ok()
        .and_then(|d| fleetmesh_protocol::identity::identity_from_der(&d).ok());
    (id.as_ref().map(|i| i.serial.clone()), id.map(|i| i.not_after_unix))
}

impl AuthorityState {
    fn ca(&self) -> AuthorityResult<&Ca> {
        self.ca.as_ref().ok_or(AuthorityError::NoCaKey)
    }

    fn create_token(&self, spec: TokenSpec) -> AuthorityResult<TokenCreated> {
        self.ca()?;
        let attributes = spec.checked_attributes().map_err(AuthorityError::Invalid)?;
        let ttl = match &spec.ttl {
            Some(t) => humantime::parse_duration(t)
                .map_err(|e| AuthorityError::Invalid(format!("ttl {t:?}: {e}")))?,
            None => DEFAULT_TOKEN_TTL,
        };
        let uses = spec.uses.unwrap_or(1);
        let coordinators =
            if spec.coordinators.is_empty() { self.advertise.clone() } else { spec.coordinators };
        if coordinators.is_empty() {
            return Err(AuthorityError::NoAdvertisedAddress);
        }
        let id = random_hex(8);
        let secret = random_hex(16);
        let now = now_ms();
        let rec = TokenRecord {
            id: id.clone(),
            secret_sha256: sha256_hex(secret.as_bytes()),
            created_unix_ms: now,
            expires_unix_ms: now + ttl.as_millis() as u64,
            max_uses: uses,
            uses: 0,
            revoked: false,
            name: spec.name,
            attributes,
            labels: spec.labels,
        };
        self.store.put_token(
            &rec,
            &audit(
                "token-created",
                None,
                Some(&id),
                format!("uses={uses} ttl={}", humantime::format_duration(ttl)),
            ),
        )?;
        let join = JoinString {
            coordinators,
            token_id: id.clone(),
            secret,
            ca_fingerprint: self.ca_fingerprint.clone(),
        };
        info!(token = %id, uses, "join token created");
        Ok(TokenCreated {
            id,
            join: join.to_string(),
            expires: crate::fleet::views::rfc3339_ms(rec.expires_unix_ms),
            uses,
        })
    }

    fn enroll(&mut self, req: &EnrollRequest) -> AuthorityResult<Enrolled> {
        let ca = self.ca()?;
        if req.protocol_version != fleetmesh_protocol::PROTOCOL_VERSION {
            return Err(AuthorityError::Invalid(format!(
                "protocol version mismatch: agent speaks {}, coordinator speaks {}",
                req.protocol_version,
                fleetmesh_protocol::PROTOCOL_VERSION
            )));
        }
        // Validate what we can before using the token up.
        let tokens = self.store.tokens()?;
        let presented = tokens.iter().find(|t| t.id == req.token_id);
        let fixed = presented.and_then(|t| t.name.clone());
        let name = fixed.unwrap_or_else(|| req.requested_name.clone());
        // A pool's token is only good while the pool is configured.
        let pool = presented.and_then(|t| {
            t.attributes.labels.get(POOL_LABEL).or_else(|| t.labels.get(POOL_LABEL)).cloned()
        });
        if let Some(pool) = pool.filter(|p| !self.pools.contains(p)) {
            return Err(AuthorityError::Invalid(format!(
                "the token is for pool {pool}, which is no longer configured"
            )));
        }
        validate_label("name", &name).map_err(|e| AuthorityError::Invalid(e.to_string()))?;
        if self.revocations.name_revoked(&name) {
            return Err(AuthorityError::Revoked(format!("agent {name} is revoked")));
        }
        rcgen_check(&req.csr_pem)?;
        let token = self
            .store
            .consume_token(
                &req.token_id,
                &sha256_hex(req.token_secret.as_bytes()),
                now_ms(),
                &audit("enrolled", Some(&name), Some(&req.token_id), "join token used"),
            )
            .map_err(|e| match e {
                ConsumeError::Refused(r) => AuthorityError::Token(r),
                ConsumeError::Store(s) => AuthorityError::from(s),
            })?;
        let mut ireq = IssueRequest::new(PeerKind::Agent, name.clone(), self.cert_ttl);
        ireq.attributes = token.attributes.clone();
        // Tokens stored before labels were attributes keep them in `labels` only.
        ireq.attributes.labels.extend(token.labels.clone());
        let cert_pem = ca.issue_from_csr(&ireq, &req.csr_pem)?;
        let (serial, not_after) = serial_of(&cert_pem);
        let mut rec =
            audit("issued", Some(&name), Some(&token.id), "certificate issued at enrollment");
        rec.serial = serial.clone();
        rec.not_after_unix = not_after;
        if let Err(e) = self.store.append_audit(&rec) {
            warn!(error = %e, "could not record issued certificate");
        }
        info!(agent_id = %name, token = %token.id, serial = ?serial, "agent enrolled");
        Ok(Enrolled { name, cert_pem })
    }

    fn renew(&mut self, id: &PeerIdentity, csr_pem: &str) -> AuthorityResult<String> {
        let ca = self.ca()?;
        if let Some(why) = self.check_revoked(id) {
            return Err(AuthorityError::Revoked(why));
        }
        let mut ireq = IssueRequest::new(PeerKind::Agent, id.name.clone(), self.cert_ttl);
        ireq.attributes = id.attributes.clone();
        let cert_pem = ca.issue_from_csr(&ireq, csr_pem)?;
        let (serial, not_after) = serial_of(&cert_pem);
        let mut rec =
            audit("renewed", Some(&id.name), None, format!("replaces serial {}", id.serial));
        rec.serial = serial;
        rec.not_after_unix = not_after;
        self.store.append_audit(&rec)?;
        info!(agent_id = %id.name, "certificate renewed");
        Ok(cert_pem)
    }

    fn check_revoked(&self, id: &PeerIdentity) -> Option<String> {
        self.revocations.check(id)
    }

    fn revoke(
        &mut self,
        kind: PeerKind,
        name: &str,
        reason: &str,
        actor: Option<String>,
    ) -> AuthorityResult<()> {
        validate_label("name", name).map_err(|e| AuthorityError::Invalid(e.to_string()))?;
        // Serials are known for the certificates this Authority issued (to agents).
        let serials: Vec<String> = if kind == PeerKind::Agent {
            let audit_log = self.store.audit()?;
            audit_log
                .iter()
                .filter(|a| a.agent.as_deref() == Some(name))
                .filter_map(|a| a.serial.clone())
                .collect()
        } else {
            Vec::new()
        };
        let key = Revocations::key(kind, name);
        let mut record = audit(&format!("{kind}-revoked"), Some(name), None, reason);
        record.actor = actor;
        self.store.revoke_agent(&key, &serials, &record)?;
        self.revocations.add([key], serials);
        if kind == PeerKind::Agent {
            let _ = self
                .fleet
                .cast(FleetMsg::Revoked { name: name.to_string(), reason: reason.to_string() });
        }
        warn!(kind = %kind, name = %name, %reason, "identity revoked");
        Ok(())
    }
}

/// Certificate requests longer than this are not looked at.
const MAX_CSR_BYTES: usize = 16 * 1024;

fn rcgen_check(csr_pem: &str) -> AuthorityResult<()> {
    if csr_pem.len() > MAX_CSR_BYTES || !csr_pem.contains("BEGIN CERTIFICATE REQUEST") {
        return Err(AuthorityError::Invalid("malformed certificate request".into()));
    }
    Ok(())
}

impl Actor for Authority {
    type Msg = AuthorityMsg;
    type State = AuthorityState;
    type Arguments = AuthorityArgs;

    async fn pre_start(
        &self,
        _m: ActorRef<AuthorityMsg>,
        a: AuthorityArgs,
    ) -> Result<AuthorityState, ActorProcessingErr> {
        let (names, serials) = a.store.revoked()?;
        let ca_fingerprint =
            fleetmesh_protocol::pki::fingerprint_pem(&a.ca_pem).unwrap_or_default();
        if a.ca.is_none() {
            info!("no CA key configured: join tokens, enrollment and renewal are disabled");
        }
        Ok(AuthorityState {
            ca: a.ca,
            ca_fingerprint,
            store: a.store,
            cert_ttl: a.cert_ttl,
            advertise: a.advertise,
            fleet: a.fleet,
            pools: a.pools,
            revocations: {
                a.revocations.add(names, serials);
                a.revocations
            },
        })
    }

    async fn handle(
        &self,
        _m: ActorRef<AuthorityMsg>,
        msg: AuthorityMsg,
        st: &mut AuthorityState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AuthorityMsg::CreateToken(spec, reply) => {
                crate::answer(reply, st.create_token(spec));
            }
            AuthorityMsg::ListTokens(reply) => {
                let now = now_ms();
                let r = st.store.tokens().map_err(AuthorityError::from).map(|ts| {
                    ts.into_iter()
                        .map(|t| TokenView {
                            status: if t.revoked {
                                "revoked"
                            } else if now >= t.expires_unix_ms {
                                "expired"
                            } else if t.uses >= t.max_uses {
                                "used"
                            } else {
                                "active"
                            }
                            .into(),
                            id: t.id,
                            name: t.name,
                            region: t.attributes.region,
                            jurisdiction: t.attributes.jurisdiction,
                            provider: t.attributes.provider,
                            labels: t.labels,
                            uses: t.uses,
                            max_uses: t.max_uses,
                            expires: crate::fleet::views::rfc3339_ms(t.expires_unix_ms),
                        })
                        .collect()
                });
                crate::answer(reply, r);
            }
            AuthorityMsg::RevokeToken(id, reply) => {
                let r = match st
                    .store
                    .revoke_token(&id, &audit("token-revoked", None, Some(&id), ""))
                {
                    Ok(true) => {
                        info!(token = %id, "join token revoked");
                        Ok(())
                    }
                    Ok(false) => Err(AuthorityError::NoToken(id.clone())),
                    Err(e) => Err(e.into()),
                };
                crate::answer(reply, r);
            }
            AuthorityMsg::Enroll(req, reply) => {
                let r = st.enroll(&req);
                if let Err(why) = &r {
                    warn!(token = %req.token_id, requested_name = %req.requested_name, reason = %why, "enrollment refused");
                    let rec = audit(
                        "enroll-refused",
                        Some(&req.requested_name),
                        Some(&req.token_id),
                        why.to_string(),
                    );
                    let _ = st.store.append_audit(&rec);
                }
                crate::answer(reply, r);
            }
            AuthorityMsg::Renew { identity, csr_pem, reply } => {
                let r = st.renew(&identity, &csr_pem);
                if let Err(why) = &r {
                    warn!(agent_id = %identity.name, reason = %why, "renewal refused");
                }
                crate::answer(reply, r);
            }
            AuthorityMsg::Revoke { kind, name, reason, actor, reply } => {
                crate::answer(reply, st.revoke(kind, &name, &reason, actor));
            }
            AuthorityMsg::Record(record, reply) => {
                crate::answer(reply, st.store.append_audit(&record).map_err(AuthorityError::from));
            }
            AuthorityMsg::CheckRevoked(id, reply) => {
                crate::answer(reply, st.check_revoked(&id));
            }
            AuthorityMsg::Audit(reply) => {
                crate::answer(reply, st.store.audit().map_err(AuthorityError::from));
            }
        }
        Ok(())
    }
}
