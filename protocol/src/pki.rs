//! Mesh PKI: create a CA, issue identity certificates, write key material safely.
//!
//! The CA certificate carries the trust domain as a URI SAN `spiffe://<domain>`, so tools
//! that load a CA directory know which domain they issue for. Leaf certificates get:
//! the SPIFFE ID URI SAN, attribute URI SANs (see [`crate::identity`]), optional DNS/IP
//! SANs (for servers), and extended key usages for their role. Private keys are ECDSA
//! P-256, written with mode 0600 and never overwritten silently.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::identity::{self, Attributes, PeerKind};

/// Allowance for clock skew between issuer and verifier on `not_before`.
const NOT_BEFORE_SKEW: Duration = Duration::from_secs(300);
/// CA lifetime: ten years; the CA key is an offline-ish root kept by the platform team.
const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// PKI errors.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} already exists; refusing to overwrite key material (remove it first)")]
    AlreadyExists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("CA certificate {0} does not carry a spiffe://<trust-domain> URI SAN")]
    NoTrustDomain(PathBuf),
    #[error("no PEM certificate found in {0}")]
    NoCertificate(PathBuf),
    #[error("invalid PEM in {path}: {msg}")]
    Pem { path: PathBuf, msg: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

/// Write a file readable only by its owner (0600), creating parent dirs. Refuses to
/// overwrite unless `overwrite` is set.
pub fn write_private(path: &Path, contents: &[u8], overwrite: bool) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::AlreadyExists(path.to_path_buf())
        } else {
            PkiError::Io { path: path.to_path_buf(), source: e }
        }
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    }
    f.write_all(contents).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn write_public(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    fs::write(path, contents).map_err(io_err(path))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // no leading zero byte, fixed length
    SerialNumber::from_slice(&bytes)
}

/// SHA-256 fingerprint (lower-case hex) of the first certificate in a PEM string.
pub fn fingerprint_pem(pem: &str) -> Option<String> {
    let der = first_cert_der(pem)?;
    Some(hex::encode(Sha256::digest(&der)))
}

fn first_cert_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(|r| r.ok())
        .map(|c| c.to_vec())
}

/// A loaded certificate authority.
pub struct Ca {
    pub trust_domain: String,
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub kind: PeerKind,
    pub name: String,
    pub attributes: Attributes,
    pub ttl: Duration,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Explicit validity window (tests use this to make expired certificates).
    pub validity: Option<(OffsetDateTime, OffsetDateTime)>,
}

impl IssueRequest {
    pub fn new(kind: PeerKind, name: impl Into<String>, ttl: Duration) -> Self {
        Self {
            kind,
            name: name.into(),
            attributes: Attributes::default(),
            ttl,
            dns_names: Vec::new(),
            ips: Vec::new(),
            validity: None,
        }
    }
}

/// A freshly issued certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl Ca {
    /// Create a new CA in memory.
    pub fn generate(trust_domain: &str) -> Result<Ca, PkiError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Fleetmesh CA {trust_domain}"));
        dn.push(DnType::OrganizationName, "Fleetmesh");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - NOT_BEFORE_SKEW;
        params.not_after = now + CA_TTL;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// `init`: create a CA and write `DIR/ca.pem` and `DIR/ca.key` (0600).
    pub fn init_dir(dir: &Path, trust_domain: &str) -> Result<Ca, PkiError> {
        let key_path = dir.join("ca.key");
        if key_path.exists() {
            return Err(PkiError::AlreadyExists(key_path));
        }
        let ca = Ca::generate(trust_domain)?;
        write_private(&key_path, ca.issuer.key().serialize_pem().as_bytes(), false)?;
        write_public(&dir.join("ca.pem"), ca.cert_pem.as_bytes())?;
        Ok(ca)
    }

    /// Load `DIR/ca.pem` and `DIR/ca.key`.
    pub fn load_dir(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let trust_domain =
            ca_trust_domain(&cert_pem).ok_or_else(|| PkiError::NoTrustDomain(cert_path.clone()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Ca { trust_domain, cert_pem, issuer })
    }

    /// Load a CA from explicit certificate and key paths (the coordinator's `--ca-key`).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let trust_domain = ca_trust_domain(&cert_pem)
            .ok_or_else(|| PkiError::NoTrustDomain(cert_path.to_path_buf()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Ca { trust_domain, cert_pem, issuer })
    }

    /// Issue a certificate for the key in a PEM CSR. The CSR's signature is verified; its
    /// subject and SANs are ignored: name and attributes come from `req` only.
    pub fn issue_from_csr(&self, req: &IssueRequest, csr_pem: &str) -> Result<String, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        self.issue_for_key(req, &csr.public_key)
    }

    /// SHA-256 fingerprint of the CA certificate (hex).
    pub fn fingerprint(&self) -> String {
        fingerprint_pem(&self.cert_pem).unwrap_or_default()
    }

    /// Issue a leaf certificate with a fresh key pair.
    pub fn issue(&self, req: &IssueRequest) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let cert_pem = self.issue_for_key(req, &key)?;
        Ok(Issued { cert_pem, key_pem: key.serialize_pem() })
    }

    /// Issue a leaf certificate for an existing public key.
    pub fn issue_for_key(
        &self,
        req: &IssueRequest,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<String, PkiError> {
        identity::validate_label("name", &req.name)?;
        req.attributes.validate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{}/{}", req.kind, req.name));
        dn.push(DnType::OrganizationName, "Fleetmesh");
        params.distinguished_name = dn;
        let mut sans = vec![SanType::URI(
            identity::spiffe_id(&self.trust_domain, req.kind, &req.name).try_into()?,
        )];
        for uri in req.attributes.to_uris() {
            sans.push(SanType::URI(uri.try_into()?));
        }
        for dns in &req.dns_names {
            sans.push(SanType::DnsName(dns.clone().try_into()?));
        }
        for ip in &req.ips {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match req.kind {
            PeerKind::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
            // Agents serve the data plane to peers, coordinators also dial out: both roles.
            PeerKind::Agent | PeerKind::Coordinator => {
                vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth]
            }
        };
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let (nb, na) = req.validity.unwrap_or_else(|| {
            let now = OffsetDateTime::now_utc();
            // Back-date for clock skew, but never by more than a tenth of the lifetime, so
            // "two thirds of the lifetime" stays close to two thirds after issuance.
            (now - NOT_BEFORE_SKEW.min(req.ttl / 10), now + req.ttl)
        });
        params.not_before = nb;
        params.not_after = na;
        Ok(params.signed_by(public_key, &self.issuer)?.pem())
    }

    /// `issue`: write `DIR/<kind>-<name>.pem` and `DIR/<kind>-<name>.key` (0600).
    pub fn issue_to_dir(
        &self,
        dir: &Path,
        req: &IssueRequest,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        let base = format!("{}-{}", req.kind, req.name);
        let cert_path = dir.join(format!("{base}.pem"));
        let key_path = dir.join(format!("{base}.key"));
        if key_path.exists() {
            return Err(PkiError::AlreadyExists(key_path));
        }
        let issued = self.issue(req)?;
        write_private(&key_path, issued.key_pem.as_bytes(), false)?;
        write_public(&cert_path, issued.cert_pem.as_bytes())?;
        Ok((cert_path, key_path))
    }
}

fn validate_trust_domain(d: &str) -> Result<(), PkiError> {
    let ok = !d.is_empty()
        && d.len() <= 255
        && d.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(identity::IdentityError::BadName { what: "trust domain", value: d.to_string() }.into())
    }
}

/// Trust domain recorded in a CA certificate (its `spiffe://<domain>` URI SAN).
pub fn ca_trust_domain(ca_pem: &str) -> Option<String> {
    use x509_parser::prelude::*;
    let der = first_cert_der(ca_pem)?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|gn| match gn {
        GeneralName::URI(u) => {
            u.strip_prefix("spiffe://").filter(|d| !d.contains('/')).map(str::to_string)
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::identity_from_der;

    #[test]
    fn issue_and_read_back_identity() {
        let ca = Ca::generate("mesh.test").unwrap();
        let mut req = IssueRequest::new(PeerKind::Agent, "gpu-01", Duration::from_secs(3600));
        req.attributes.region = Some("eu-west-1".into());
        req.attributes.jurisdiction = Some("EU".into());
        req.attributes.provider = Some("aws".into());
        req.attributes.labels.insert("tier".into(), "gold".into());
        let issued = ca.issue(&req).unwrap();
        let der = first_cert_der(&issued.cert_pem).unwrap();
        let id = identity_from_der(&der).unwrap();
        assert_eq!(id.kind, PeerKind::Agent);
        assert_eq!(id.name, "gpu-01");
        assert_eq!(id.trust_domain, "mesh.test");
        assert_eq!(id.attributes.region.as_deref(), Some("eu-west-1"));
        assert_eq!(id.attributes.jurisdiction.as_deref(), Some("EU"));
        assert_eq!(id.attributes.provider.as_deref(), Some("aws"));
        assert_eq!(id.attributes.labels.get("tier").map(String::as_str), Some("gold"));
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!(id.not_after_unix > now + 3500 && id.not_after_unix <= now + 3601);
    }

    #[test]
    fn init_load_issue_files_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init_dir(dir.path(), "mesh.test").unwrap();
        assert!(matches!(Ca::init_dir(dir.path(), "mesh.test"), Err(PkiError::AlreadyExists(_))));
        let loaded = Ca::load_dir(dir.path()).unwrap();
        assert_eq!(loaded.trust_domain, "mesh.test");
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        let req = IssueRequest::new(PeerKind::Operator, "alice", Duration::from_secs(60));
        let (cert, key) = loaded.issue_to_dir(dir.path(), &req).unwrap();
        assert!(cert.ends_with("operator-alice.pem"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for k in [key, dir.path().join("ca.key")] {
                assert_eq!(fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o600);
            }
        }
    }

    #[test]
    fn csr_claims_are_ignored() {
        let ca = Ca::generate("mesh.test").unwrap();
        let key = crate::enroll::generate_key_pem().unwrap();
        let wanted = Attributes { region: Some("us-evil".into()), ..Default::default() };
        let csr = crate::enroll::make_csr(&key, "someone-else", &wanted).unwrap();
        let mut req = IssueRequest::new(PeerKind::Agent, "granted", Duration::from_secs(60));
        req.attributes.region = Some("eu-west-1".into());
        let pem = ca.issue_from_csr(&req, &csr).unwrap();
        let id = identity_from_der(&first_cert_der(&pem).unwrap()).unwrap();
        assert_eq!(id.name, "granted");
        assert_eq!(id.attributes.region.as_deref(), Some("eu-west-1"));
        assert!(ca
            .issue_from_csr(
                &req,
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            )
            .is_err());
    }

    #[test]
    fn rejects_bad_names() {
        let ca = Ca::generate("mesh.test").unwrap();
        let req = IssueRequest::new(PeerKind::Agent, "../evil", Duration::from_secs(60));
        assert!(ca.issue(&req).is_err());
        assert!(Ca::generate("Bad Domain").is_err());
    }
}
