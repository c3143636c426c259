//! Zero-touch enrollment: join strings, the enrollment exchange, CSRs, and CA pinning.
//!
//! A node that has only a join string connects to the coordinator with ALPN
//! `fleetmesh/enroll/1`, **without** a client certificate, and authenticates the server by
//! the CA fingerprint in the join string ([`PinnedCaVerifier`]): the coordinator serves its
//! chain with the CA certificate included, the verifier finds the certificate whose
//! SHA-256 equals the pin and verifies the leaf against it. The agent sends a CSR for a
//! key it generated locally plus the token; the coordinator answers with a short-lived
//! certificate whose name and attributes come from the token, never from the CSR.
//!
//! Join string: `fleetmesh-join:v1/<host:port>[,<host:port>...]/<token-id>.<secret>/<ca-sha256-hex>`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::Attributes;

/// ALPN of the enrollment endpoint (same UDP port as the control plane).
pub const ALPN_ENROLL: &[u8] = b"fleetmesh/enroll/1";

const JOIN_PREFIX: &str = "fleetmesh-join:v1/";

/// Enrollment and join-string errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnrollError {
    #[error("invalid join string: {0} (expected fleetmesh-join:v1/<host:port>/<token-id>.<secret>/<ca-sha256>)")]
    BadJoin(&'static str),
    #[error("could not make a certificate request: {0}")]
    Csr(String),
}

/// A parsed join string.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinString {
    pub coordinators: Vec<String>,
    pub token_id: String,
    pub secret: String,
    /// SHA-256 of the mesh CA certificate (DER), lower-case hex.
    pub ca_fingerprint: String,
}

impl std::fmt::Debug for JoinString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinString")
            .field("coordinators", &self.coordinators)
            .field("token_id", &self.token_id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit())
}

impl std::fmt::Display for JoinString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{JOIN_PREFIX}{}/{}.{}/{}",
            self.coordinators.join(","),
            self.token_id,
            self.secret,
            self.ca_fingerprint
        )
    }
}

impl std::str::FromStr for JoinString {
    type Err = EnrollError;
    fn from_str(s: &str) -> Result<Self, EnrollError> {
        let rest =
            s.trim().strip_prefix(JOIN_PREFIX).ok_or(EnrollError::BadJoin("wrong prefix"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [addrs, token, fp] = parts.as_slice() else {
            return Err(EnrollError::BadJoin("wrong number of parts"));
        };
        let coordinators: Vec<String> =
            addrs.split(',').filter(|a| !a.is_empty()).map(str::to_string).collect();
        if coordinators.is_empty() || coordinators.iter().any(|a| !a.contains(':')) {
            return Err(EnrollError::BadJoin("coordinator addresses must be host:port"));
        }
        let (id, secret) =
            token.split_once('.').ok_or(EnrollError::BadJoin("token must be <id>.<secret>"))?;
        if !is_hex(id) || !is_hex(secret) {
            return Err(EnrollError::BadJoin("token id and secret must be hex"));
        }
        if fp.len() != 64 || !is_hex(fp) {
            return Err(EnrollError::BadJoin("CA fingerprint must be 64 hex digits"));
        }
        Ok(Self {
            coordinators,
            token_id: id.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
            ca_fingerprint: fp.to_ascii_lowercase(),
        })
    }
}

/// Agent -> coordinator on the enrollment endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EnrollMessage {
    Enroll(EnrollRequest),
}

/// An enrollment request.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub protocol_version: u32,
    pub token_id: String,
    pub token_secret: String,
    /// Name the node would like (used only when the token does not fix one).
    pub requested_name: String,
    /// PEM CSR for the key the agent generated. Its subject and SANs are ignored.
    pub csr_pem: String,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("token_id", &self.token_id)
            .field("requested_name", &self.requested_name)
            .finish_non_exhaustive()
    }
}

/// Coordinator -> agent on the enrollment endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EnrollReply {
    Issued { name: String, cert_pem: String, ca_pem: String },
    Refused { reason: String },
}

/// SHA-256 of DER bytes, lower-case hex.
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// A PEM CSR for `key_pem`, asking for `name` and (to show they are ignored) `attributes`.
pub fn make_csr(key_pem: &str, name: &str, attributes: &Attributes) -> Result<String, EnrollError> {
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| EnrollError::Csr(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, name);
    params.distinguished_name = dn;
    for uri in attributes.to_uris() {
        let ia5 = uri.try_into().map_err(|e: rcgen::Error| EnrollError::Csr(e.to_string()))?;
        params.subject_alt_names.push(rcgen::SanType::URI(ia5));
    }
    params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| EnrollError::Csr(e.to_string()))
}

/// Generate a new ECDSA P-256 private key (PEM).
pub fn generate_key_pem() -> Result<String, EnrollError> {
    rcgen::KeyPair::generate()
        .map(|k| k.serialize_pem())
        .map_err(|e| EnrollError::Csr(e.to_string()))
}

/// Server verifier that trusts exactly the CA whose certificate has the pinned SHA-256,
/// taken from the chain the server presents.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCaVerifier {
    pub fn new(pin_hex: &str) -> Self {
        Self { pin: pin_hex.to_ascii_lowercase(), provider: crate::tls::provider() }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|c| sha256_hex(c) == self.pin).ok_or_else(|| {
            rustls::Error::General(format!(
                "CA fingerprint mismatch: the coordinator's CA is not sha256:{} from the join string",
                self.pin
            ))
        })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS 1.3 client config for enrollment: no client certificate, CA pinned.
pub fn enroll_client_config(pin_hex: &str) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(pin_hex)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_round_trip_and_errors() {
        let j = JoinString {
            coordinators: vec!["coord.example.com:7400".into(), "[::1]:7400".into()],
            token_id: "0a1b".into(),
            secret: "ff00".into(),
            ca_fingerprint: "ab".repeat(32),
        };
        let s = j.to_string();
        assert!(s.starts_with("fleetmesh-join:v1/coord.example.com:7400,[::1]:7400/0a1b.ff00/"));
        assert_eq!(s.parse::<JoinString>().unwrap(), j);
        for bad in [
            "fleetmesh-join:v2/a:1/aa.bb/".to_string() + &"ab".repeat(32),
            "fleetmesh-join:v1/a:1/aabb/".to_string() + &"ab".repeat(32),
            "fleetmesh-join:v1/a/aa.bb/".to_string() + &"ab".repeat(32),
            "fleetmesh-join:v1/a:1/aa.bb/abcd".to_string(),
            "fleetmesh-join:v1/a:1/zz.bb/".to_string() + &"ab".repeat(32),
        ] {
            assert!(bad.parse::<JoinString>().is_err(), "{bad}");
        }
        // The secret never shows in Debug output.
        assert!(!format!("{j:?}").contains("ff00"));
    }

    #[test]
    fn csr_carries_the_key() {
        let key = generate_key_pem().unwrap();
        let csr =
            make_csr(&key, "n1", &Attributes { region: Some("x".into()), ..Default::default() })
                .unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let kp = rcgen::KeyPair::from_pem(&key).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(parsed.public_key.der_bytes(), kp.der_bytes());
    }
}
