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

/// Authority messages.
pub enum AuthorityMsg {
    CreateToken(TokenSpec, RpcReplyPort<Result<TokenCreated, String>>),
    ListTokens(RpcReplyPort<Result<Vec<TokenView>, String>>),
    RevokeToken(String, RpcReplyPort<Result<(), String>>),
    Enroll(Box<EnrollRequest>, RpcReplyPort<Result<Enrolled, String>>),
    Renew {
        identity: PeerIdentity,
        csr_pem: String,
        reply: RpcReplyPort<Result<String, String>>,
    },
    /// Deny an identity on every port from now on; `actor` is who asked.
    Revoke {
        kind: PeerKind,
        name: String,
        reason: String,
        actor: Option<String>,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Append to the audit trail (the Api records every change it makes); answered once
    /// stored.
    Record(Box<AuditRecord>, RpcReplyPort<Result<(), String>>),
    /// `Some(reason)` when this identity must not connect.
    CheckRevoked(PeerIdentity, RpcReplyPort<Option<String>>),
    Audit(RpcReplyPort<Result<Vec<AuditRecord>, String>>),
}

/// Authority start-up arguments.
pub struct AuthorityArgs {
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
    fn ca(&self) -> Result<&Ca, String> {
        self.ca.as_ref().ok_or_else(|| {
            "this coordinator has no CA key (start it with --ca-key): enrollment and renewal are disabled".into()
        })
    }

    fn create_token(&self, spec: TokenSpec) -> Result<TokenCreated, String> {
        self.ca()?;
        let attributes = spec.checked_attributes()?;
        let ttl = match &spec.ttl {
            Some(t) => humantime::parse_duration(t).map_err(|e| format!("ttl {t:?}: {e}"))?,
            None => DEFAULT_TOKEN_TTL,
        };
        let uses = spec.uses.unwrap_or(1);
        let coordinators =
            if spec.coordinators.is_empty() { self.advertise.clone() } else { spec.coordinators };
        if coordinators.is_empty() {
            return Err("no coordinator address to put in the join string: pass one, or start the coordinator with --advertise".into());
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
        self.store
            .put_token(
                &rec,
                &audit(
                    "token-created",
                    None,
                    Some(&id),
                    format!("uses={uses} ttl={}", humantime::format_duration(ttl)),
                ),
            )
            .map_err(|e| e.to_string())?;
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

    fn enroll(&mut self, req: &EnrollRequest) -> Result<Enrolled, String> {
        let ca = self.ca()?;
        if req.protocol_version != fleetmesh_protocol::PROTOCOL_VERSION {
            return Err(format!(
                "protocol version mismatch: agent speaks {}, coordinator speaks {}",
                req.protocol_version,
                fleetmesh_protocol::PROTOCOL_VERSION
            ));
        }
        // Validate what we can before using the token up.
        let tokens = self.store.tokens().map_err(|e| e.to_string())?;
        let fixed = tokens.iter().find(|t| t.id == req.token_id).and_then(|t| t.name.clone());
        let name = fixed.unwrap_or_else(|| req.requested_name.clone());
        validate_label("name", &name).map_err(|e| e.to_string())?;
        if self.revocations.name_revoked(&name) {
            return Err(format!("agent {name} is revoked"));
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
                ConsumeError::Refused(r) => r.to_string(),
                ConsumeError::Store(s) => s.to_string(),
            })?;
        let mut ireq = IssueRequest::new(PeerKind::Agent, name.clone(), self.cert_ttl);
        ireq.attributes = token.attributes.clone();
        // Tokens stored before labels were attributes keep them in `labels` only.
        ireq.attributes.labels.extend(token.labels.clone());
        let cert_pem = ca.issue_from_csr(&ireq, &req.csr_pem).map_err(|e| e.to_string())?;
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

    fn renew(&mut self, id: &PeerIdentity, csr_pem: &str) -> Result<String, String> {
        let ca = self.ca()?;
        if let Some(why) = self.check_revoked(id) {
            return Err(why);
        }
        let mut ireq = IssueRequest::new(PeerKind::Agent, id.name.clone(), self.cert_ttl);
        ireq.attributes = id.attributes.clone();
        let cert_pem = ca.issue_from_csr(&ireq, csr_pem).map_err(|e| e.to_string())?;
        let (serial, not_after) = serial_of(&cert_pem);
        let mut rec =
            audit("renewed", Some(&id.name), None, format!("replaces serial {}", id.serial));
        rec.serial = serial;
        rec.not_after_unix = not_after;
        self.store.append_audit(&rec).map_err(|e| e.to_string())?;
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
    ) -> Result<(), String> {
        validate_label("name", name).map_err(|e| e.to_string())?;
        // Serials are known for the certificates this Authority issued (to agents).
        let serials: Vec<String> = if kind == PeerKind::Agent {
            let audit_log = self.store.audit().map_err(|e| e.to_string())?;
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
        self.store.revoke_agent(&key, &serials, &record).map_err(|e| e.to_string())?;
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

fn rcgen_check(csr_pem: &str) -> Result<(), String> {
    if csr_pem.len() > 16 * 1024 || !csr_pem.contains("BEGIN CERTIFICATE REQUEST") {
        return Err("malformed certificate request".into());
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
                let r = st.store.tokens().map_err(|e| e.to_string()).map(|ts| {
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
                    Ok(false) => Err(format!("no join token {id}")),
                    Err(e) => Err(e.to_string()),
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
                        why.clone(),
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
                crate::answer(reply, st.store.append_audit(&record).map_err(|e| e.to_string()));
            }
            AuthorityMsg::CheckRevoked(id, reply) => {
                crate::answer(reply, st.check_revoked(&id));
            }
            AuthorityMsg::Audit(reply) => {
                crate::answer(reply, st.store.audit().map_err(|e| e.to_string()));
            }
        }
        Ok(())
    }
}
