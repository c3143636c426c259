//! rustls configuration for the mesh: mutual TLS against the mesh CA.
//!
//! All configs are built with an explicit `ring` provider (`builder_with_provider`) so a
//! second crypto provider elsewhere in the dependency tree can never make config
//! construction panic. QUIC configs are TLS 1.3 only (QUIC requires it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::identity::{identity_from_der, IdentityError, PeerIdentity};

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found ({msg})")]
    NoKey { path: PathBuf, msg: String },
    #[error("{path}: invalid PEM certificate: {msg}")]
    BadPem { path: PathBuf, msg: String },
    #[error("{path}: CA certificate rejected: {msg}")]
    BadCa { path: PathBuf, msg: String },
    #[error("own certificate {path}: {source}")]
    Identity { path: PathBuf, source: IdentityError },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The crypto provider used everywhere in Fleetmesh.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Install the ring provider as the process default. Safe to call more than once.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A loaded mesh identity: CA roots plus our own certificate chain and key.
#[derive(Debug)]
pub struct TlsIdentity {
    pub ca_pem: String,
    pub roots: Arc<RootCertStore>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Our own identity as read from our certificate.
    pub identity: PeerIdentity,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            ca_pem: self.ca_pem.clone(),
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io { path: path.to_path_buf(), source })
}

/// Parse all certificates in PEM bytes.
pub fn certs_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem { path: path.to_path_buf(), msg: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// Root store holding the CA certificate(s) in `pem`.
pub fn roots_from_pem(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(path, pem)? {
        roots
            .add(c)
            .map_err(|e| TlsError::BadCa { path: path.to_path_buf(), msg: e.to_string() })?;
    }
    Ok(roots)
}

impl TlsIdentity {
    /// Load CA, certificate and key files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let ca_bytes = read(ca)?;
        let cert_bytes = read(cert)?;
        let key_bytes = read(key)?;
        Self::from_pem(ca, &ca_bytes, cert, &cert_bytes, key, &key_bytes)
    }

    /// Build from PEM contents (paths are used for messages only).
    pub fn from_pem(
        ca_path: &Path,
        ca_pem: &[u8],
        cert_path: &Path,
        cert_pem: &[u8],
        key_path: &Path,
        key_pem: &[u8],
    ) -> Result<Self, TlsError> {
        let roots = roots_from_pem(ca_path, ca_pem)?;
        let chain = certs_from_pem(cert_path, cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TlsError::NoKey { path: key_path.to_path_buf(), msg: e.to_string() })?;
        let identity = identity_from_der(&chain[0])
            .map_err(|source| TlsError::Identity { path: cert_path.to_path_buf(), source })?;
        Ok(Self {
            ca_pem: String::from_utf8_lossy(ca_pem).into_owned(),
            roots: Arc::new(roots),
            chain,
            key,
            identity,
        })
    }

    /// Server config requiring a client certificate from the mesh CA.
    pub fn server_config(
        &self,
        alpn: &[&[u8]],
        tls13_only: bool,
    ) -> Result<ServerConfig, TlsError> {
        self.server_config_inner(alpn, tls13_only, false)
    }

    /// Server config where a client certificate is optional, but verified against the
    /// mesh CA when presented (the control port also serves unauthenticated enrollment;
    /// the listener requires a certificate on every other ALPN).
    pub fn server_config_optional_client(&self, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
        self.server_config_inner(alpn, true, true)
    }

    fn server_config_inner(
        &self,
        alpn: &[&[u8]],
        tls13_only: bool,
        optional_client: bool,
    ) -> Result<ServerConfig, TlsError> {
        let builder = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        let builder = if optional_client { builder.allow_unauthenticated() } else { builder };
        let verifier = builder.build().map_err(|e| TlsError::Verifier(e.to_string()))?;
        let builder = ServerConfig::builder_with_provider(provider());
        let builder = if tls13_only {
            builder.with_protocol_versions(&[&rustls::version::TLS13])?
        } else {
            builder.with_safe_default_protocol_versions()?
        };
        // Serve the CA certificate with our leaf: enrolling agents pin it by fingerprint.
        let mut chain = self.chain.clone();
        if let Ok(ca) = certs_from_pem(Path::new("ca"), self.ca_pem.as_bytes()) {
            for c in ca {
                if !chain.contains(&c) {
                    chain.push(c);
                }
            }
        }
        let mut cfg = builder
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, self.key.clone_key())?;
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(cfg)
    }

    /// Client config presenting our certificate and trusting only the mesh CA.
    pub fn client_config(
        &self,
        alpn: &[&[u8]],
        tls13_only: bool,
    ) -> Result<ClientConfig, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider());
        let builder = if tls13_only {
            builder.with_protocol_versions(&[&rustls::version::TLS13])?
        } else {
            builder.with_safe_default_protocol_versions()?
        };
        let mut cfg = builder
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(cfg)
    }
}

/// Identity of a verified peer from the certificate chain rustls verified.
pub fn peer_identity(chain: Option<&[CertificateDer<'_>]>) -> Result<PeerIdentity, IdentityError> {
    let leaf = chain.and_then(|c| c.first()).ok_or(IdentityError::NoCertificate)?;
    identity_from_der(leaf)
}

/// Server verifier for peer-to-peer connections (the data plane): the chain must verify
/// against the mesh CA as usual, but the peer is recognised by the SPIFFE identity in its
/// certificate rather than by a host name (peers are dialled by address, and an agent's
/// certificate does not name its addresses).
#[derive(Debug)]
pub struct PeerServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    kind: crate::identity::PeerKind,
    name: String,
}

impl PeerServerVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        kind: crate::identity::PeerKind,
        name: &str,
    ) -> Result<Self, TlsError> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Ok(Self { inner, kind, name: name.to_string() })
    }
}

impl rustls::client::danger::ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError as C;
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_) => {}
            // The chain verified; only the host name did not match, which is expected.
            Err(rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let id = identity_from_der(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        if id.kind != self.kind || id.name != self.name {
            return Err(rustls::Error::General(format!(
                "peer is {} {}, expected {} {}",
                id.kind, id.name, self.kind, self.name
            )));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    // Handshake signatures are checked exactly as the WebPKI verifier does.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl TlsIdentity {
    /// Client config for dialling a mesh peer known by identity (data plane).
    pub fn peer_client_config(
        &self,
        alpn: &[&[u8]],
        kind: crate::identity::PeerKind,
        name: &str,
    ) -> Result<ClientConfig, TlsError> {
        let verifier = PeerServerVerifier::new(self.roots.clone(), kind, name)?;
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(cfg)
    }
}
