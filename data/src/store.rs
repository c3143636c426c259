//! Content-addressed chunk store.
//!
//! Layout under the store root:
//! - `chunks/<2 hex>/<64 hex>`: one file per chunk, named by its BLAKE3 hash. A chunk is
//!   written to `tmp/`, its hash checked, fsynced, then renamed into place, so a crash
//!   never leaves a partial or corrupt file under a hash name (leftover temp files are
//!   removed at open).
//! - `datasets/<id>.json`: datasets this store knows (manifest, name, residency). A
//!   dataset is *complete* when every chunk of its manifest is present.
//!
//! The store has a size limit: after a write pushes it over, the least recently used
//! chunks not pinned by a running job are removed.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fleetmesh_protocol::data::{hash_bytes, hash_hex, parse_hash, Hash, Manifest};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("chunk {expected} failed verification (content hashes to {actual})")]
    Corrupt { expected: String, actual: String },
    #[error("chunk {0} is not in the store")]
    Missing(String),
    #[error("{0}")]
    Other(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// A dataset known to this store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalDataset {
    pub id: String,
    pub name: String,
    /// Where the dataset may live (empty = anywhere).
    pub jurisdictions: Vec<String>,
    pub manifest: Manifest,
}

#[derive(Debug)]
struct ChunkMeta {
    len: u64,
    last_used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    chunks: HashMap<Hash, ChunkMeta>,
    total: u64,
    clock: u64,
    pins: HashMap<Hash, u32>,
    datasets: BTreeMap<String, LocalDataset>,
    /// Chunk hashes of each dataset, to answer "does D contain chunk C" quickly.
    members: HashMap<String, std::collections::HashSet<Hash>>,
}

/// The chunk store of one agent (or of the coordinator).
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    limit: u64,
    inner: Mutex<Inner>,
    tmp_seq: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Open (creating) the store at `root` with a size limit in bytes.
    pub fn open(root: &Path, limit: u64) -> Result<Self, StoreError> {
        for d in ["chunks", "datasets", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        // Temp files are writes that never finished: never valid chunks.
        let tmp = root.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(io(&tmp))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let mut inner = Inner::default();
        let mut found: Vec<(Hash, u64, std::time::SystemTime)> = Vec::new();
        let chunks = root.join("chunks");
        for sub in std::fs::read_dir(&chunks).map_err(io(&chunks))?.flatten() {
            let Ok(rd) = std::fs::read_dir(sub.path()) else { continue };
            for f in rd.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let (Some(h), Ok(md)) = (parse_hash(&name), f.metadata()) else { continue };
                found.push((h, md.len(), md.modified().unwrap_or(std::time::UNIX_EPOCH)));
            }
        }
        // Oldest first, so the LRU order survives a restart approximately.
        found.sort_by_key(|(_, _, t)| *t);
        for (h, len, _) in found {
            inner.clock += 1;
            inner.total += len;
            inner.chunks.insert(h, ChunkMeta { len, last_used: inner.clock });
        }
        let dsd = root.join("datasets");
        for e in std::fs::read_dir(&dsd).map_err(io(&dsd))?.flatten() {
            let p = e.path();
            let parsed = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<LocalDataset>(&b).ok());
            match parsed {
                Some(d) if d.manifest.id() == d.id => {
                    inner.members.insert(d.id.clone(), member_set(&d.manifest));
                    inner.datasets.insert(d.id.clone(), d);
                }
                _ => warn!(path = %p.display(), "ignoring unreadable dataset record"),
            }
        }
        info!(
            root = %root.display(),
            chunks = inner.chunks.len(),
            bytes = inner.total,
            datasets = inner.datasets.len(),
            "chunk store opened"
        );
        Ok(Self {
            root: root.to_path_buf(),
            limit,
            inner: Mutex::new(inner),
            tmp_seq: Default::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Path of a chunk file.
    pub fn chunk_path(&self, h: &Hash) -> PathBuf {
        let hex = hash_hex(h);
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    pub fn has(&self, h: &Hash) -> bool {
        self.lock().chunks.contains_key(h)
    }

    /// Bytes stored.
    pub fn used_bytes(&self) -> u64 {
        self.lock().total
    }

    /// Read a chunk (marks it recently used). The content is not re-hashed here:
    /// readers that received it over the network verify it.
    pub fn read(&self, h: &Hash) -> Result<Vec<u8>, StoreError> {
        {
            let mut g = self.lock();
            g.clock += 1;
            let c = g.clock;
            match g.chunks.get_mut(h) {
                Some(m) => m.last_used = c,
                None => return Err(StoreError::Missing(hash_hex(h))),
            }
        }
        let p = self.chunk_path(h);
        match std::fs::read(&p) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(h);
                Err(StoreError::Missing(hash_hex(h)))
            }
            Err(e) => Err(StoreError::Io { path: p, source: e }),
        }
    }

    fn forget(&self, h: &Hash) {
        let mut g = self.lock();
        if let Some(m) = g.chunks.remove(h) {
            g.total -= m.len;
        }
    }

    /// Remove a chunk found to be bad (e.g. it no longer matches its hash).
    pub fn discard(&self, h: &Hash) {
        let _ = std::fs::remove_file(self.chunk_path(h));
        self.forget(h);
    }

    /// Verify `bytes` hash to `h`, then store them durably under `h`.
    pub fn write(&self, h: &Hash, bytes: &[u8]) -> Result<(), StoreError> {
        let actual = hash_bytes(bytes);
        if &actual != h {
            return Err(StoreError::Corrupt { expected: hash_hex(h), actual: hash_hex(&actual) });
        }
        self.write_verified(h, bytes)
    }

    fn write_verified(&self, h: &Hash, bytes: &[u8]) -> Result<(), StoreError> {
        if self.has(h) {
            self.touch(h);
            return Ok(());
        }
        let seq = self.tmp_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp =
            self.root.join("tmp").join(format!("{}.{}.{seq}", hash_hex(h), std::process::id()));
        let dest = self.chunk_path(h);
        let res = (|| {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(bytes).map_err(io(&tmp))?;
            f.sync_data().map_err(io(&tmp))?;
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::rename(&tmp, &dest).map_err(io(&dest))
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res?;
        {
            let mut g = self.lock();
            g.clock += 1;
            let c = g.clock;
            if g.chunks.insert(*h, ChunkMeta { len: bytes.len() as u64, last_used: c }).is_none() {
                g.total += bytes.len() as u64;
            }
        }
        self.evict();
        Ok(())
    }

    fn touch(&self, h: &Hash) {
        let mut g = self.lock();
        g.clock += 1;
        let c = g.clock;
        if let Some(m) = g.chunks.get_mut(h) {
            m.last_used = c;
        }
    }

    /// Remove least recently used, unpinned chunks until the store fits its limit.
    fn evict(&self) {
        let victims: Vec<(Hash, u64)> = {
            let g = self.lock();
            if g.total <= self.limit {
                return;
            }
            let mut cands: Vec<(&Hash, &ChunkMeta)> =
                g.chunks.iter().filter(|(h, _)| !g.pins.contains_key(*h)).collect();
            cands.sort_by_key(|(_, m)| m.last_used);
            let mut over = g.total - self.limit;
            let mut v = Vec::new();
            for (h, m) in cands {
                if over == 0 {
                    break;
                }
                v.push((*h, m.len));
                over = over.saturating_sub(m.len);
            }
            v
        };
        if !victims.is_empty() {
            debug!(chunks = victims.len(), "evicting least recently used chunks");
        }
        for (h, _) in victims {
            self.discard(&h);
        }
    }

    /// Pin every chunk of a dataset (a running job uses it): never evicted while pinned.
    pub fn pin(&self, id: &str) {
        let mut g = self.lock();
        let hs: Vec<Hash> =
            g.members.get(id).map(|m| m.iter().copied().collect()).unwrap_or_default();
        for h in hs {
            *g.pins.entry(h).or_default() += 1;
        }
    }

    pub fn unpin(&self, id: &str) {
        let mut g = self.lock();
        let hs: Vec<Hash> =
            g.members.get(id).map(|m| m.iter().copied().collect()).unwrap_or_default();
        for h in hs {
            if let Some(n) = g.pins.get_mut(&h) {
                *n -= 1;
                if *n == 0 {
                    g.pins.remove(&h);
                }
            }
        }
    }

    /// Record a dataset (its manifest must hash to its id).
    pub fn add_dataset(&self, d: LocalDataset) -> Result<(), StoreError> {
        if d.manifest.id() != d.id {
            return Err(StoreError::Other(format!(
                "manifest does not hash to dataset id {}",
                d.id
            )));
        }
        let p = self.root.join("datasets").join(format!("{}.json", d.id));
        let tmp = self.root.join("tmp").join(format!("{}.json", d.id));
        let bytes = serde_json::to_vec(&d).map_err(|e| StoreError::Other(e.to_string()))?;
        std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io(&p))?;
        let mut g = self.lock();
        g.members.insert(d.id.clone(), member_set(&d.manifest));
        g.datasets.insert(d.id.clone(), d);
        Ok(())
    }

    pub fn dataset(&self, id: &str) -> Option<LocalDataset> {
        self.lock().datasets.get(id).cloned()
    }

    /// Whether chunk `h` belongs to dataset `id`.
    pub fn contains(&self, id: &str, h: &Hash) -> bool {
        self.lock().members.get(id).is_some_and(|m| m.contains(h))
    }

    /// Remove chunks that no dataset refers to, no job has pinned, and that were written
    /// before `cutoff` (an upload or fetch in progress writes its chunks before its
    /// dataset is recorded: the caller's grace period covers it). Returns (chunks, bytes)
    /// removed.
    pub fn collect_orphans(&self, cutoff: std::time::SystemTime) -> (usize, u64) {
        let candidates: Vec<(Hash, u64)> = {
            let g = self.lock();
            g.chunks
                .iter()
                .filter(|(h, _)| !g.pins.contains_key(*h))
                .filter(|(h, _)| !g.members.values().any(|m| m.contains(*h)))
                .map(|(h, m)| (*h, m.len))
                .collect()
        };
        let mut removed = (0, 0);
        for (h, len) in candidates {
            let old = std::fs::metadata(self.chunk_path(&h))
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < cutoff);
            // Checked again under the lock: a dataset may have claimed it meanwhile.
            let still_orphan = {
                let g = self.lock();
                !g.pins.contains_key(&h) && !g.members.values().any(|m| m.contains(&h))
            };
            if old && still_orphan {
                self.discard(&h);
                removed.0 += 1;
                removed.1 += len;
            }
        }
        if removed.0 > 0 {
            info!(chunks = removed.0, bytes = removed.1, "orphan chunks removed");
        }
        removed
    }

    /// Remove a dataset record and the chunks no other dataset uses.
    pub fn remove_dataset(&self, id: &str) -> bool {
        let (existed, orphans) = {
            let mut g = self.lock();
            let existed = g.datasets.remove(id).is_some();
            let mine = g.members.remove(id).unwrap_or_default();
            let orphans: Vec<Hash> = mine
                .into_iter()
                .filter(|h| !g.members.values().any(|m| m.contains(h)) && !g.pins.contains_key(h))
                .collect();
            (existed, orphans)
        };
        let _ = std::fs::remove_file(self.root.join("datasets").join(format!("{id}.json")));
        for h in orphans {
            self.discard(&h);
        }
        existed
    }

    /// Every known dataset with (complete, bytes present).
    pub fn holdings(&self) -> Vec<(LocalDataset, bool, u64)> {
        let g = self.lock();
        g.datasets
            .values()
            .map(|d| {
                let chunks = d.manifest.unique_chunks();
                let present: u64 = chunks
                    .iter()
                    .filter(|(h, _)| g.chunks.contains_key(h))
                    .map(|(_, l)| u64::from(*l))
                    .sum();
                let complete = chunks.iter().all(|(h, _)| g.chunks.contains_key(h));
                (d.clone(), complete, present)
            })
            .collect()
    }

    /// Bytes of `id` present locally (0 if the dataset is unknown here).
    pub fn present_bytes(&self, id: &str) -> u64 {
        let g = self.lock();
        let Some(d) = g.datasets.get(id) else { return 0 };
        d.manifest
            .unique_chunks()
            .iter()
            .filter(|(h, _)| g.chunks.contains_key(h))
            .map(|(_, l)| u64::from(*l))
            .sum()
    }

    /// Whether every chunk of `id` is present.
    pub fn complete(&self, id: &str) -> bool {
        let g = self.lock();
        g.datasets.get(id).is_some_and(|d| {
            d.manifest.files.iter().flat_map(|f| f.chunks.iter()).all(|h| g.chunks.contains_key(h))
        })
    }
}

fn member_set(m: &Manifest) -> std::collections::HashSet<Hash> {
    m.files.iter().flat_map(|f| f.chunks.iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetmesh_protocol::data::FileEntry;

    #[test]
    fn verified_writes_eviction_pins_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 10).unwrap();
        let a = b"aaaa".to_vec();
        let ha = hash_bytes(&a);
        // Wrong content under a hash is refused and leaves nothing behind.
        let e = s.write(&ha, b"bbbb").unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(!s.has(&ha));
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        s.write(&ha, &a).unwrap();
        assert_eq!(s.read(&ha).unwrap(), a);
        // A dataset pinning `a`.
        let m = Manifest {
            chunk_size: 4,
            files: vec![FileEntry { path: "f".into(), size: 4, mode: 0o644, chunks: vec![ha] }],
        };
        let d = LocalDataset { id: m.id(), name: "d".into(), jurisdictions: vec![], manifest: m };
        s.add_dataset(d.clone()).unwrap();
        s.pin(&d.id);
        let hb = hash_bytes(b"bbbb");
        let hc = hash_bytes(b"cccc");
        s.write(&hb, b"bbbb").unwrap();
        s.write(&hc, b"cccc").unwrap(); // 12 bytes > 10: evict the LRU unpinned (b).
        assert!(s.has(&ha), "pinned chunk survived");
        assert!(!s.has(&hb), "least recently used unpinned chunk evicted");
        assert!(s.has(&hc));
        assert!(s.complete(&d.id));
        s.unpin(&d.id);
        drop(s);
        // Reopen: chunks and datasets come back; a stray temp file is removed.
        std::fs::write(dir.path().join("tmp").join("junk"), b"x").unwrap();
        let s = Store::open(dir.path(), 10).unwrap();
        assert!(s.has(&ha) && s.has(&hc));
        assert_eq!(s.holdings().len(), 1);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(s.remove_dataset(&d.id));
        assert!(!s.has(&ha), "orphaned chunk removed with its dataset");
    }

    #[test]
    fn orphan_chunks_go_after_their_grace_and_referenced_ones_stay() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), u64::MAX).unwrap();
        let (kept, orphan) = (hash_bytes(b"kept"), hash_bytes(b"orphan"));
        s.write(&kept, b"kept").unwrap();
        s.write(&orphan, b"orphan").unwrap();
        let m = Manifest {
            chunk_size: 16,
            files: vec![FileEntry { path: "f".into(), size: 4, mode: 0o644, chunks: vec![kept] }],
        };
        s.add_dataset(LocalDataset {
            id: m.id(),
            name: "d".into(),
            jurisdictions: vec![],
            manifest: m,
        })
        .unwrap();
        // Within the grace period (written after the cutoff): nothing goes.
        let before = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        assert_eq!(s.collect_orphans(before), (0, 0));
        assert!(s.has(&orphan));
        let after = std::time::SystemTime::now() + std::time::Duration::from_secs(1);
        assert_eq!(s.collect_orphans(after), (1, 6));
        assert!(!s.has(&orphan) && s.has(&kept));
        assert!(!s.chunk_path(&orphan).exists());
    }
}
