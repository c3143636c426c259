//! Data-plane wire types: dataset manifests, coordinator-signed transfer tickets, fetch
//! plans, and the request/reply frames of ALPN `fleetmesh/xfer/1`.
//!
//! A dataset is a [`Manifest`] of files over fixed-size chunks named by their BLAKE3
//! hash; the dataset id is the BLAKE3 hash of the manifest's canonical encoding (files
//! sorted by path, bincode with the codec's fixed configuration). Anyone holding the
//! manifest can verify every chunk and the id itself, so holders need not be trusted for
//! integrity, only for availability.
//!
//! Authorisation is a [`SignedTicket`]: the coordinator signs (ed25519) "requester R may
//! read dataset D from holder H until T, and D may live in jurisdictions J". A serving
//! peer checks the signature with the coordinator's public key, that R is the name in the
//! requester's verified certificate, that H is itself, that T has not passed, and that
//! the certificate's jurisdiction is allowed, all without asking the coordinator.

use serde::{Deserialize, Serialize};

use crate::identity::PeerKind;

/// ALPN of agent <-> agent (and agent <-> coordinator store) chunk transfers.
pub const ALPN_XFER: &[u8] = b"fleetmesh/xfer/1";
/// Default chunk size: large enough that per-chunk overhead (a request, a hash lookup, a
/// file) is negligible, small enough to spread one dataset over several sources.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Largest chunk size accepted from a manifest (bounds what one read may allocate).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// The only mode bits a manifest may carry: read, write and execute for user, group and
/// other. setuid, setgid and sticky never travel with data.
pub const PERMISSION_BITS: u32 = 0o777;
/// Domain separation for ticket signatures.
const TICKET_CONTEXT: &[u8] = b"fleetmesh-ticket-v1\0";

/// A BLAKE3 hash (chunk name or dataset id).
pub type Hash = [u8; 32];

/// Lower-case hex of a hash.
pub fn hash_hex(h: &Hash) -> String {
    hex::encode(h)
}

/// Parse a 64-character hex hash.
pub fn parse_hash(s: &str) -> Option<Hash> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

/// BLAKE3 of some bytes.
pub fn hash_bytes(b: &[u8]) -> Hash {
    *blake3::hash(b).as_bytes()
}

/// Data-plane errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("invalid manifest: {0}")]
    BadManifest(String),
    #[error("ticket refused: {0}")]
    Ticket(String),
    #[error("residency: {0}")]
    Residency(String),
}

/// One file of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path with `/` separators; never absolute, never `..`.
    pub path: String,
    pub size: u64,
    /// Unix permission bits, at most [`PERMISSION_BITS`] (setuid, setgid and sticky are
    /// refused); the materialised copy is made read-only regardless.
    pub mode: u32,
    /// Chunk hashes in order; every chunk but the last is `chunk_size` long.
    pub chunks: Vec<Hash>,
}

/// One member's share of a dataset's files, for array jobs: the files in path order are
/// split into `count` contiguous runs whose sizes differ by at most one file, and member
/// `index` takes run `index` (deterministic: the same manifest always splits the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// The range of file positions this shard takes out of `files`.
    pub fn range(self, files: usize) -> std::ops::Range<usize> {
        let count = u64::from(self.count.max(1));
        let index = u64::from(self.index.min(self.count.saturating_sub(1)));
        let at = |i: u64| (i * files as u64 / count) as usize;
        at(index)..at(index + 1)
    }
}

/// The content of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub chunk_size: u32,
    /// Sorted by path, no duplicates.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Canonical bytes: the encoding the id is computed over.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, crate::codec::config()).unwrap_or_default()
    }

    /// The dataset id (hex BLAKE3 of the canonical bytes).
    pub fn id(&self) -> String {
        hash_hex(&hash_bytes(&self.canonical_bytes()))
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Length of chunk `i` of file `f`.
    pub fn chunk_len(&self, f: &FileEntry, i: usize) -> u32 {
        let start = i as u64 * u64::from(self.chunk_size);
        (f.size.saturating_sub(start)).min(u64::from(self.chunk_size)) as u32
    }

    /// The part of this manifest a shard takes (all of it without a shard).
    pub fn shard(&self, shard: Option<Shard>) -> Manifest {
        match shard {
            None => self.clone(),
            Some(s) => Manifest {
                chunk_size: self.chunk_size,
                files: self.files[s.range(self.files.len())].to_vec(),
            },
        }
    }

    /// Every distinct chunk with its length, in manifest order.
    pub fn unique_chunks(&self) -> Vec<(Hash, u32)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for f in &self.files {
            for (i, h) in f.chunks.iter().enumerate() {
                if seen.insert(*h) {
                    out.push((*h, self.chunk_len(f, i)));
                }
            }
        }
        out
    }

    /// Check a manifest that came from a peer: sane chunk size, safe relative paths in
    /// canonical order, chunk counts matching sizes.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |m: String| Err(DataError::BadManifest(m));
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return bad(format!("chunk size {} out of range", self.chunk_size));
        }
        let mut prev: Option<&str> = None;
        let mut paths = std::collections::HashSet::new();
        for f in &self.files {
            check_rel_path(&f.path).map_err(DataError::BadManifest)?;
            if prev.is_some_and(|p| p >= f.path.as_str()) {
                return bad(format!("files not sorted or duplicated at {:?}", f.path));
            }
            prev = Some(&f.path);
            // Sorted order puts `x` before `x/y`: a file that is also a directory shows
            // as an earlier path equal to one of this path's parents.
            let parents = f.path.match_indices('/').map(|(i, _)| &f.path[..i]);
            if let Some(p) = parents.into_iter().find(|p| paths.contains(p)) {
                return bad(format!("{p:?} is both a file and the directory of {:?}", f.path));
            }
            paths.insert(f.path.as_str());
            if f.mode & !PERMISSION_BITS != 0 {
                return bad(format!(
                    "{:?}: mode {:#o} has bits beyond the permissions {PERMISSION_BITS:#o} (setuid, setgid or sticky)",
                    f.path, f.mode
                ));
            }
            let want = f.size.div_ceil(u64::from(self.chunk_size));
            if f.chunks.len() as u64 != want {
                return bad(format!(
                    "{:?}: {} bytes need {want} chunks, manifest lists {}",
                    f.path,
                    f.size,
                    f.chunks.len()
                ));
            }
        }
        Ok(())
    }
}

/// A relative path that stays inside the directory it is joined to.
pub fn check_rel_path(p: &str) -> Result<(), String> {
    if p.is_empty() || p.starts_with('/') || p.contains('\0') || p.contains('\\') {
        return Err(format!("unsafe path {p:?}"));
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("unsafe path {p:?}"));
    }
    Ok(())
}

/// Whether a peer in `jurisdiction` may hold a dataset allowed in `allowed` (empty =
/// unrestricted). A peer whose certificate carries no jurisdiction only gets unrestricted
/// data.
pub fn residency_allows(allowed: &[String], jurisdiction: Option<&str>) -> bool {
    allowed.is_empty() || jurisdiction.is_some_and(|j| allowed.iter().any(|a| a == j))
}

/// The most restrictive combination of several residency sets (empty = unrestricted).
/// `None` when the sets have nothing in common (no place may hold the result).
pub fn intersect_residency<'a>(
    sets: impl IntoIterator<Item = &'a [String]>,
) -> Option<Vec<String>> {
    let mut acc: Option<Vec<String>> = None;
    for s in sets {
        if s.is_empty() {
            continue;
        }
        acc = Some(match acc {
            None => s.to_vec(),
            Some(a) => a.into_iter().filter(|x| s.contains(x)).collect(),
        });
        if acc.as_ref().is_some_and(|a| a.is_empty()) {
            return None;
        }
    }
    Some(acc.unwrap_or_default())
}

/// What a ticket allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// Dataset id (hex).
    pub dataset: String,
    /// Name in the requester's certificate.
    pub requester: String,
    pub requester_kind: PeerKind,
    /// Name of the serving peer this ticket is for.
    pub holder: String,
    /// Where the dataset may live (empty = anywhere).
    pub jurisdictions: Vec<String>,
    pub expires_unix_ms: u64,
}

/// A ticket with the coordinator's ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTicket {
    pub ticket: Ticket,
    pub signature: Vec<u8>,
}

fn ticket_message(t: &Ticket) -> Vec<u8> {
    let mut m = TICKET_CONTEXT.to_vec();
    m.extend(bincode::serde::encode_to_vec(t, crate::codec::config()).unwrap_or_default());
    m
}

/// Signs tickets (held by the coordinator).
pub struct TicketSigner {
    key: ring::signature::Ed25519KeyPair,
}

impl std::fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketSigner").finish_non_exhaustive()
    }
}

impl TicketSigner {
    /// A new random key, as PKCS#8 DER (to be stored 0600).
    pub fn generate_pkcs8() -> Result<Vec<u8>, DataError> {
        let rng = ring::rand::SystemRandom::new();
        ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| DataError::Ticket("cannot generate a signing key".into()))
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, DataError> {
        ring::signature::Ed25519KeyPair::from_pkcs8(der)
            .map(|key| Self { key })
            .map_err(|e| DataError::Ticket(format!("bad signing key: {e}")))
    }

    /// The public key agents verify tickets with.
    pub fn public_key(&self) -> Vec<u8> {
        use ring::signature::KeyPair;
        self.key.public_key().as_ref().to_vec()
    }

    pub fn sign(&self, ticket: Ticket) -> SignedTicket {
        let signature = self.key.sign(&ticket_message(&ticket)).as_ref().to_vec();
        SignedTicket { ticket, signature }
    }
}

/// Check a ticket presented to `holder` for `dataset` by the peer whose verified
/// certificate identity is `requester`.
pub fn verify_ticket(
    public_key: &[u8],
    t: &SignedTicket,
    dataset: &str,
    holder: &str,
    requester: &crate::identity::PeerIdentity,
    now_unix_ms: u64,
) -> Result<(), DataError> {
    let (requester_kind, requester_name) = (requester.kind, requester.name.as_str());
    let requester_jurisdiction = requester.attributes.jurisdiction.as_deref();
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key);
    key.verify(&ticket_message(&t.ticket), &t.signature)
        .map_err(|_| DataError::Ticket("signature is not the coordinator's".into()))?;
    let k = &t.ticket;
    if k.dataset != dataset {
        return Err(DataError::Ticket(format!("ticket is for dataset {}", short(&k.dataset))));
    }
    if k.holder != holder {
        return Err(DataError::Ticket(format!("ticket is for holder {}, not {holder}", k.holder)));
    }
    if k.requester != requester_name || k.requester_kind != requester_kind {
        return Err(DataError::Ticket(format!(
            "ticket was issued to {} {}, presented by {requester_kind} {requester_name}",
            k.requester_kind, k.requester
        )));
    }
    if k.expires_unix_ms <= now_unix_ms {
        return Err(DataError::Ticket(format!(
            "ticket expired {} ms ago",
            now_unix_ms - k.expires_unix_ms
        )));
    }
    if requester_kind == PeerKind::Agent
        && !residency_allows(&k.jurisdictions, requester_jurisdiction)
    {
        return Err(DataError::Residency(format!(
            "dataset may only live in {:?}; requester certificate's jurisdiction is {}",
            k.jurisdictions,
            requester_jurisdiction.unwrap_or("none")
        )));
    }
    Ok(())
}

/// First 12 hex digits of an id, for messages.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// One peer a dataset can be fetched from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub name: String,
    pub kind: PeerKind,
    /// `HOST:PORT` of its xfer endpoint.
    pub addr: String,
    pub ticket: SignedTicket,
}

/// How to get a dataset: from whom, with which tickets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchPlan {
    pub dataset: String,
    pub name: String,
    pub jurisdictions: Vec<String>,
    pub bytes: u64,
    pub holders: Vec<Holder>,
}

/// One request on an xfer stream (one request per stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum XferRequest {
    Manifest {
        ticket: SignedTicket,
    },
    /// Chunks of the ticket's dataset, answered in order on the same stream.
    Chunks {
        ticket: SignedTicket,
        hashes: Vec<Hash>,
    },
}

/// A reply frame; `Chunk` is followed by `len` raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum XferReply {
    Manifest(Manifest),
    Chunk { hash: Hash, len: u32 },
    Missing { hash: Hash },
    Refused { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            chunk_size: 4,
            files: vec![
                FileEntry {
                    path: "a".into(),
                    size: 5,
                    mode: 0o644,
                    chunks: vec![[1; 32], [2; 32]],
                },
                FileEntry { path: "d/b".into(), size: 4, mode: 0o600, chunks: vec![[1; 32]] },
            ],
        }
    }

    #[test]
    fn id_is_stable_and_content_dependent() {
        let m = manifest();
        assert_eq!(m.id(), manifest().id());
        assert_eq!(m.id().len(), 64);
        let mut n = manifest();
        n.files[1].mode = 0o644;
        assert_ne!(m.id(), n.id());
        assert_eq!(m.total_bytes(), 9);
        assert_eq!(m.unique_chunks(), vec![([1; 32], 4), ([2; 32], 1)]);
    }

    #[test]
    fn validation_rejects_unsafe_or_inconsistent_manifests() {
        assert!(manifest().validate().is_ok());
        for p in ["/etc/passwd", "../x", "a/../../x", "a//b", "", "./a"] {
            let mut m = manifest();
            m.files[0].path = p.into();
            assert!(m.validate().is_err(), "{p}");
        }
        let mut m = manifest();
        m.files[0].chunks.pop();
        assert!(m.validate().unwrap_err().to_string().contains("need 2 chunks"));
        let mut m = manifest();
        m.files.swap(0, 1);
        assert!(m.validate().is_err());
        let mut m = manifest();
        m.chunk_size = 0;
        assert!(m.validate().is_err());
    }

    #[test]
    fn setuid_setgid_and_sticky_modes_are_refused() {
        for mode in [0o4755, 0o2755, 0o1777, 0o6777, 0o100644] {
            let mut m = manifest();
            m.files[0].mode = mode;
            let e = m.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("mode {mode:#o} has bits beyond the permissions")), "{e}");
        }
    }

    #[test]
    fn a_path_cannot_be_both_a_file_and_a_directory() {
        let f = |path: &str| FileEntry { path: path.into(), size: 0, mode: 0o644, chunks: vec![] };
        let m = Manifest { chunk_size: 4, files: vec![f("x"), f("x-a"), f("x/y")] };
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("\"x\" is both a file and the directory of \"x/y\""), "{e}");
        let deep = Manifest { chunk_size: 4, files: vec![f("a/b"), f("a/b/c/d")] };
        assert!(deep.validate().is_err());
        let fine = Manifest { chunk_size: 4, files: vec![f("x/y"), f("x/z"), f("xy")] };
        assert!(fine.validate().is_ok());
    }

    #[test]
    fn shards_split_files_evenly_contiguously_and_cover_each_file_once() {
        for (files, count) in [(10usize, 3u32), (3, 5), (0, 4), (7, 1), (10_000, 10_000)] {
            let ranges: Vec<_> =
                (0..count).map(|index| Shard { index, count }.range(files)).collect();
            let mut next = 0;
            for r in &ranges {
                assert_eq!(r.start, next, "{files} files in {count}: gaps or overlaps");
                let (lo, hi) = (files / count as usize, files.div_ceil(count as usize));
                assert!((lo..=hi).contains(&r.len()), "{files}/{count}: uneven {r:?}");
                next = r.end;
            }
            assert_eq!(next, files);
        }
    }

    #[test]
    fn residency_sets() {
        let eu = vec!["EU".to_string()];
        assert!(residency_allows(&[], None));
        assert!(residency_allows(&eu, Some("EU")));
        assert!(!residency_allows(&eu, Some("US")));
        assert!(!residency_allows(&eu, None));
        let eu_ch = ["EU".to_string(), "CH".to_string()];
        assert_eq!(intersect_residency([&eu_ch[..], &[][..], &eu[..]]), Some(eu.clone()));
        assert_eq!(intersect_residency([&[][..]]), Some(vec![]));
        assert_eq!(intersect_residency([&eu[..], &["US".to_string()][..]]), None);
    }

    /// A verified US agent identity named `name`.
    pub(crate) fn us_peer(name: &str) -> crate::identity::PeerIdentity {
        crate::identity::PeerIdentity {
            trust_domain: "t".into(),
            kind: PeerKind::Agent,
            name: name.into(),
            attributes: crate::identity::Attributes {
                jurisdiction: Some("US".into()),
                ..Default::default()
            },
            serial: "01".into(),
            not_before_unix: 0,
            not_after_unix: i64::MAX,
        }
    }

    fn ticket(exp: u64) -> Ticket {
        Ticket {
            dataset: "d1".into(),
            requester: "us-1".into(),
            requester_kind: PeerKind::Agent,
            holder: "eu-1".into(),
            jurisdictions: vec!["EU".into()],
            expires_unix_ms: exp,
        }
    }

    #[test]
    fn tickets_are_checked_for_every_field() {
        let signer = TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().unwrap()).unwrap();
        let pk = signer.public_key();
        let mut t = ticket(2000);
        t.jurisdictions.clear();
        let ok = signer.sign(t);
        let v = |t: &SignedTicket, ds, holder, name: &str, now| {
            verify_ticket(&pk, t, ds, holder, &us_peer(name), now)
        };
        assert!(v(&ok, "d1", "eu-1", "us-1", 1000).is_ok());
        assert!(v(&ok, "d2", "eu-1", "us-1", 1000).unwrap_err().to_string().contains("dataset"));
        assert!(v(&ok, "d1", "eu-2", "us-1", 1000).unwrap_err().to_string().contains("holder"));
        assert!(v(&ok, "d1", "eu-1", "us-2", 1000).unwrap_err().to_string().contains("issued to"));
        assert!(v(&ok, "d1", "eu-1", "us-1", 2000).unwrap_err().to_string().contains("expired"));
        // Tampering with any field breaks the signature.
        let mut forged = ok.clone();
        forged.ticket.expires_unix_ms = u64::MAX;
        assert!(v(&forged, "d1", "eu-1", "us-1", 1000)
            .unwrap_err()
            .to_string()
            .contains("signature"));
        // A ticket signed by another key.
        let other = TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().unwrap()).unwrap();
        let foreign = other.sign(ok.ticket.clone());
        assert!(v(&foreign, "d1", "eu-1", "us-1", 1000).is_err());
        // Residency: an EU dataset is not served to a US certificate, even with a ticket.
        let eu = signer.sign(ticket(2000));
        let e = v(&eu, "d1", "eu-1", "us-1", 1000).unwrap_err();
        assert!(matches!(e, DataError::Residency(_)), "{e}");
    }
}
