//! Chunking files into the store, and materialising datasets back into files.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fleetmesh_protocol::data::{check_rel_path, hash_bytes, FileEntry, Hash, Manifest};

use crate::store::{Store, StoreError};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Every regular file under `root` (or `root` itself if it is a file) with its relative
/// path, sorted. Symlinks are not followed (a dataset is content, not references).
pub fn list_files(root: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let md = std::fs::symlink_metadata(root).map_err(io(root))?;
    if md.is_file() {
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| StoreError::Other(format!("{}: no file name", root.display())))?;
        return Ok(vec![(name, root.to_path_buf())]);
    }
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), root.to_path_buf())];
    while let Some((rel, dir)) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let ft = e.file_type().map_err(io(&e.path()))?;
            if ft.is_dir() {
                stack.push((r, e.path()));
            } else if ft.is_file() {
                check_rel_path(&r).map_err(StoreError::Other)?;
                out.push((r, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// [`list_files`] for what a job left in an output directory, which the job controls: a
/// hard link whose other names are not all inside `root` is refused, because the job may
/// have linked a file it could read but not have made (the agent's key, another job's
/// data). Links among the outputs' own files are fine. Special files are never listed.
pub fn list_output_files(root: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let files = list_files(root)?;
    let mut names_inside: std::collections::HashMap<(u64, u64), (u64, u64, &str)> =
        Default::default();
    for (rel, path) in &files {
        let md = std::fs::symlink_metadata(path).map_err(io(path))?;
        if md.nlink() > 1 {
            let e = names_inside.entry((md.dev(), md.ino())).or_insert((md.nlink(), 0, rel));
            e.1 += 1;
        }
    }
    if let Some((links, inside, rel)) = names_inside.values().find(|(n, i, _)| i < n) {
        return Err(StoreError::Other(format!(
            "{rel} is a hard link to a file outside the outputs ({links} links, {inside} of them in the outputs); copy the file instead"
        )));
    }
    Ok(files)
}

/// Chunk a job's output directory into `store` (see [`list_output_files`]).
pub fn import_output(store: &Store, root: &Path, chunk_size: u32) -> Result<Manifest, StoreError> {
    let files = list_output_files(root)?;
    chunk_files(files, chunk_size, |_| {}, |h, b| store.write(h, b))
}

/// Chunk a file or directory into `store`, calling `progress(bytes)` as it goes. Returns
/// the manifest (its id is the dataset id).
pub fn import(
    store: &Store,
    root: &Path,
    chunk_size: u32,
    progress: impl FnMut(u64),
) -> Result<Manifest, StoreError> {
    chunk_tree(root, chunk_size, progress, |h, b| store.write(h, b))
}

/// Hash a file or directory into a manifest without storing anything (a client that
/// uploads only the chunks the other side lacks).
pub fn scan(
    root: &Path,
    chunk_size: u32,
    progress: impl FnMut(u64),
) -> Result<Manifest, StoreError> {
    chunk_tree(root, chunk_size, progress, |_, _| Ok(()))
}

/// Split every file under `root` into chunks, hand each (hash, bytes) to `sink`, and
/// build the manifest.
fn chunk_tree(
    root: &Path,
    chunk_size: u32,
    progress: impl FnMut(u64),
    sink: impl FnMut(&Hash, &[u8]) -> Result<(), StoreError>,
) -> Result<Manifest, StoreError> {
    chunk_files(list_files(root)?, chunk_size, progress, sink)
}

fn chunk_files(
    listed: Vec<(String, PathBuf)>,
    chunk_size: u32,
    mut progress: impl FnMut(u64),
    mut sink: impl FnMut(&Hash, &[u8]) -> Result<(), StoreError>,
) -> Result<Manifest, StoreError> {
    use fleetmesh_protocol::data::PERMISSION_BITS;
    use std::os::unix::fs::PermissionsExt;
    let mut files = Vec::new();
    let mut buf = vec![0u8; chunk_size as usize];
    for (rel, path) in listed {
        let mut f = std::fs::File::open(&path).map_err(io(&path))?;
        let mode = f.metadata().map_err(io(&path))?.permissions().mode() & PERMISSION_BITS;
        let (mut size, mut chunks) = (0u64, Vec::new());
        loop {
            let n = read_full(&mut f, &mut buf).map_err(io(&path))?;
            if n == 0 {
                break;
            }
            let h = hash_bytes(&buf[..n]);
            sink(&h, &buf[..n])?;
            chunks.push(h);
            size += n as u64;
            progress(n as u64);
            if n < buf.len() {
                break;
            }
        }
        files.push(FileEntry { path: rel, size, mode, chunks });
    }
    Ok(Manifest { chunk_size, files })
}

/// Call `f(hash, bytes)` for every chunk of the files under `root` in manifest order
/// (re-reading them; a file changed since [`scan`] shows up as a hash mismatch).
pub fn for_each_chunk(
    root: &Path,
    m: &Manifest,
    mut f: impl FnMut(&Hash, &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let files = list_files(root)?;
    let mut buf = vec![0u8; m.chunk_size as usize];
    for entry in &m.files {
        let Some((_, path)) = files.iter().find(|(r, _)| *r == entry.path) else {
            return Err(StoreError::Other(format!("{} disappeared", entry.path)));
        };
        let mut file = std::fs::File::open(path).map_err(io(path))?;
        for h in &entry.chunks {
            let n = read_full(&mut file, &mut buf).map_err(io(path))?;
            if &hash_bytes(&buf[..n]) != h {
                return Err(StoreError::Other(format!("{} changed while being read", entry.path)));
            }
            f(h, &buf[..n])?;
        }
    }
    Ok(())
}

fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Write the files of `m` under `dest` from chunks in `store`, verifying every chunk,
/// and make them read-only (files 0444 or 0555, directories 0555).
pub fn materialize(store: &Store, m: &Manifest, dest: &Path) -> Result<u64, StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    let mut dirs = vec![dest.to_path_buf()];
    let mut written = 0;
    for f in &m.files {
        check_rel_path(&f.path).map_err(StoreError::Other)?;
        let p = dest.join(&f.path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
            let mut d = parent.to_path_buf();
            while d.starts_with(dest) && d != dest {
                dirs.push(d.clone());
                if !d.pop() {
                    break;
                }
            }
        }
        let mut out = std::fs::File::create(&p).map_err(io(&p))?;
        for h in &f.chunks {
            let b = store.read(h)?;
            let actual = hash_bytes(&b);
            if &actual != h {
                store.discard(h);
                return Err(StoreError::Corrupt {
                    expected: fleetmesh_protocol::data::hash_hex(h),
                    actual: fleetmesh_protocol::data::hash_hex(&actual),
                });
            }
            out.write_all(&b).map_err(io(&p))?;
            written += b.len() as u64;
        }
        out.flush().map_err(io(&p))?;
        let ro = if f.mode & 0o111 != 0 { 0o555 } else { 0o444 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(ro)).map_err(io(&p))?;
    }
    dirs.sort();
    dirs.dedup();
    for d in dirs.iter().rev() {
        let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o555));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_then_materialize_round_trips_bytes_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("sub/deeper")).unwrap();
        let big: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(src.path().join("sub/deeper/big.bin"), &big).unwrap();
        std::fs::write(src.path().join("a.txt"), b"hello").unwrap();
        std::fs::write(src.path().join("empty"), b"").unwrap();
        std::fs::set_permissions(src.path().join("a.txt"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let st = tempfile::tempdir().unwrap();
        let store = Store::open(st.path(), u64::MAX).unwrap();
        let mut seen = 0;
        let m = import(&store, src.path(), 4096, |n| seen += n).unwrap();
        assert_eq!(seen, 10_005);
        assert!(m.validate().is_ok());
        let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a.txt", "empty", "sub/deeper/big.bin"]);
        assert_eq!(m.files[2].chunks.len(), 3);
        // Same content, same id.
        let again = import(&store, src.path(), 4096, |_| {}).unwrap();
        assert_eq!(m.id(), again.id());
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("in");
        assert_eq!(materialize(&store, &m, &dest).unwrap(), 10_005);
        assert_eq!(std::fs::read(dest.join("sub/deeper/big.bin")).unwrap(), big);
        assert_eq!(std::fs::read(dest.join("a.txt")).unwrap(), b"hello");
        let mode = |p: &str| std::fs::metadata(dest.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("a.txt"), 0o555);
        assert_eq!(mode("sub/deeper/big.bin"), 0o444);
        assert_eq!(mode("sub"), 0o555);
        // A chunk corrupted on disk is detected, not materialised.
        let h = m.files[2].chunks[0];
        std::fs::write(store.chunk_path(&h), vec![0u8; 4096]).unwrap();
        let dest2 = out.path().join("in2");
        let e = materialize(&store, &m, &dest2).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(!store.has(&h), "corrupt chunk dropped so it is fetched again");
        // Let the temp dirs be removed.
        for d in [&dest, &dest2] {
            let _ = std::process::Command::new("chmod").args(["-R", "u+w"]).arg(d).status();
        }
    }

    #[test]
    fn outputs_refuse_hard_links_to_files_outside_them() {
        let secret_dir = tempfile::tempdir().unwrap();
        let secret = secret_dir.path().join("agent.key");
        std::fs::write(&secret, b"PRIVATE KEY").unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join("result.txt"), b"ok").unwrap();
        // Links among the outputs' own files are fine.
        std::fs::hard_link(out.path().join("result.txt"), out.path().join("copy.txt")).unwrap();
        let st = tempfile::tempdir().unwrap();
        let store = Store::open(st.path(), u64::MAX).unwrap();
        let m = import_output(&store, out.path(), 4096).unwrap();
        assert_eq!(m.files.len(), 2);
        std::fs::hard_link(&secret, out.path().join("stolen")).unwrap();
        let e = import_output(&store, out.path(), 4096).unwrap_err().to_string();
        assert!(e.contains("stolen is a hard link to a file outside the outputs"), "{e}");
        // A FIFO (a special file) is never part of a dataset.
        std::fs::remove_file(out.path().join("stolen")).unwrap();
        let fifo = out.path().join("pipe");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let m = import_output(&store, out.path(), 4096).unwrap();
        assert!(m.files.iter().all(|f| f.path != "pipe"));
    }
}
