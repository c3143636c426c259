//! `fleetmesh data`: datasets, content-addressed, held by agents, moved peer to peer.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use fleetmesh_api::answers::{Placed, Removed};
use fleetmesh_api::client::ApiClient;
use fleetmesh_api::data::{DatasetRecord, DatasetSummary};
use fleetmesh_protocol::data::{
    hash_bytes, hash_hex, short, Manifest, MAX_CHUNK_SIZE, PERMISSION_BITS,
};

use crate::conn::ConnArgs;
use crate::output::{bar, human_bytes, list, print_json, table, Output};

/// How long `--on` / `place` wait for the agent to report its fetch.
const FETCH_WAIT: Duration = Duration::from_secs(600);
const FETCH_POLL: Duration = Duration::from_millis(200);
/// Chunks read ahead of the upload.
const UPLOAD_QUEUE: usize = 4;

#[derive(Subcommand, Debug)]
pub enum DataCmd {
    /// Chunk a file or directory and store it (in the coordinator's store, and on an
    /// agent with --on).
    Put {
        path: PathBuf,
        /// Dataset name [default: the file or directory name].
        #[arg(long)]
        name: Option<String>,
        /// Jurisdictions the data may live in (repeat for several) [default: anywhere].
        #[arg(long = "jurisdiction")]
        jurisdictions: Vec<String>,
        /// Also have this agent fetch it.
        #[arg(long)]
        on: Option<String>,
        /// Chunk size, e.g. 4MiB.
        #[arg(long, default_value = "4MiB")]
        chunk_size: String,
        /// Allow this new version to live in more places than the newest version of the
        /// same name (recorded in the audit trail).
        #[arg(long)]
        loosen_residency: bool,
    },
    /// List datasets.
    Ls,
    /// Size, holders, residency and recent fetches of a dataset (id, id prefix, NAME@VERSION
    /// or name: its newest version).
    Show { dataset: String },
    /// Download a dataset into DEST (a directory), verifying every chunk.
    Get { dataset: String, dest: PathBuf },
    /// Have an agent fetch a dataset from its holders.
    Place { dataset: String, agent: String },
    /// Remove a dataset from the index and from every holder.
    Rm { dataset: String },
}

pub async fn run(conn: &ConnArgs, output: Output, cmd: DataCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        DataCmd::Put { path, name, jurisdictions, on, chunk_size, loosen_residency } => {
            let chunk_size = fleetmesh_protocol::workflow::parse_size(&chunk_size)
                .map_err(|e| anyhow!("--chunk-size: {e}"))?;
            if chunk_size == 0 || chunk_size > u64::from(MAX_CHUNK_SIZE) {
                bail!("--chunk-size must be between 1 byte and 64MiB");
            }
            let put = Put {
                path,
                name,
                jurisdictions,
                on,
                chunk_size: chunk_size as u32,
                loosen_residency,
            };
            put.run(&c, output).await
        }
        DataCmd::Ls => ls(&c, output).await,
        DataCmd::Show { dataset } => show(&c, output, &dataset).await,
        DataCmd::Get { dataset, dest } => get(&c, &dataset, &dest).await,
        DataCmd::Place { dataset, agent } => {
            let body = serde_json::json!({ "agent": agent });
            let r: Placed = c.post_json(&format!("/api/v1/data/{dataset}/place"), &body).await?;
            wait_fetch(&c, &r.dataset, &r.agent).await
        }
        DataCmd::Rm { dataset } => {
            let r: Removed =
                c.post_json(&format!("/api/v1/data/{dataset}/rm"), &serde_json::json!({})).await?;
            outln!("removed {} (holders told: {})", r.removed, list(&r.holders_told));
            Ok(())
        }
    }
}

/// `data put`: hash, upload what the coordinator lacks, register, optionally place.
struct Put {
    path: PathBuf,
    name: Option<String>,
    jurisdictions: Vec<String>,
    on: Option<String>,
    chunk_size: u32,
    loosen_residency: bool,
}

impl Put {
    async fn run(self, c: &ApiClient, output: Output) -> Result<()> {
        std::fs::symlink_metadata(&self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let name = match &self.name {
            Some(n) => n.clone(),
            None => self
                .path
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .ok_or_else(|| anyhow!("give the dataset a --name"))?,
        };
        let total: u64 = fleetmesh_data::dataset::list_files(&self.path)?
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok().map(|m| m.len()))
            .sum();
        let manifest = self.scan(total).await?;
        let all: Vec<String> = manifest.unique_chunks().iter().map(|(h, _)| hash_hex(h)).collect();
        let missing: Vec<String> = c.post_json("/api/v1/data/missing", &all).await?;
        let sent = self.upload(c, &manifest, missing.into_iter().collect(), total).await?;
        let body = serde_json::json!({
            "name": name, "jurisdictions": self.jurisdictions,
            "manifest": manifest, "on": self.on, "loosen_residency": self.loosen_residency,
        });
        let rec: DatasetSummary = c.post_json("/api/v1/data", &body).await?;
        if output == Output::Json {
            print_json(&rec)?;
        } else {
            outln!(
                "dataset {name}@{} {}: {} in {} file(s), {sent} chunk(s) uploaded, {} already stored",
                rec.version,
                rec.id,
                human_bytes(total),
                manifest.files.len(),
                all.len() - sent
            );
        }
        if let Some(agent) = &self.on {
            wait_fetch(c, &rec.id, agent).await?;
        }
        Ok(())
    }

    /// The manifest, hashed on a blocking thread with a progress bar.
    async fn scan(&self, total: u64) -> Result<Manifest> {
        let pb = bar(total, "hashing");
        let (path, pbc, chunk_size) = (self.path.clone(), pb.clone(), self.chunk_size);
        let manifest = tokio::task::spawn_blocking(move || {
            fleetmesh_data::dataset::scan(&path, chunk_size, |n| pbc.inc(n))
        })
        .await??;
        pb.finish_and_clear();
        Ok(manifest)
    }

    /// Upload the `missing` chunks (read on a blocking thread); how many were sent.
    async fn upload(
        &self,
        c: &ApiClient,
        manifest: &Manifest,
        missing: HashSet<String>,
        total: u64,
    ) -> Result<usize> {
        let pb = bar(total, "uploading");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Vec<u8>)>(UPLOAD_QUEUE);
        let (path, m) = (self.path.clone(), manifest.clone());
        let reader = tokio::task::spawn_blocking(move || {
            fleetmesh_data::dataset::for_each_chunk(&path, &m, |h, b| {
                tx.blocking_send((hash_hex(h), b.to_vec()))
                    .map_err(|_| fleetmesh_data::StoreError::Other("upload stopped".into()))
            })
        });
        let mut sent = HashSet::new();
        while let Some((h, bytes)) = rx.recv().await {
            let n = bytes.len() as u64;
            if missing.contains(&h) && sent.insert(h.clone()) {
                let (status, body) =
                    c.request("PUT", &format!("/api/v1/data/chunks/{h}"), Some(bytes)).await?;
                if !(200..300).contains(&status) {
                    bail!(
                        "upload of chunk {h} refused ({status}): {}",
                        String::from_utf8_lossy(&body)
                    );
                }
            }
            pb.inc(n);
        }
        reader.await??;
        pb.finish_and_clear();
        Ok(sent.len())
    }
}

async fn ls(c: &ApiClient, output: Output) -> Result<()> {
    let datasets: Vec<DatasetSummary> = c.get_json("/api/v1/data").await?;
    if output == Output::Json {
        return print_json(&datasets);
    }
    let row = |d: &DatasetSummary| {
        vec![
            d.name.clone(),
            d.version.to_string(),
            short(&d.id).to_string(),
            human_bytes(d.bytes),
            d.files.to_string(),
            list(&d.jurisdictions),
            list(&d.complete_holders),
            list(&d.partial_holders),
        ]
    };
    table(
        &["NAME", "VERSION", "ID", "SIZE", "FILES", "RESIDENCY", "HOLDERS", "PARTIAL"],
        datasets.iter().map(row).collect(),
    );
    Ok(())
}

async fn show(c: &ApiClient, output: Output, dataset: &str) -> Result<()> {
    let d: DatasetRecord = c.get_json(&format!("/api/v1/data/{dataset}")).await?;
    if output == Output::Json {
        return print_json(&d);
    }
    outln!("name:        {}", d.name);
    outln!("id:          {}", d.id);
    outln!("size:        {} in {} file(s), {} chunk(s)", human_bytes(d.bytes), d.files, d.chunks);
    let residency = if d.jurisdictions.is_empty() {
        "anywhere".to_string()
    } else {
        format!("{:?}", d.jurisdictions)
    };
    outln!("residency:   {residency}");
    if let Some(p) = &d.producer {
        outln!("produced by: {p}");
    }
    outln!("holders:");
    for (name, st) in &d.holders {
        let state = if st.complete { "complete" } else { "partial " };
        outln!("  {name:<24} {state} {}", human_bytes(st.bytes_present));
    }
    if !d.fetches.is_empty() {
        outln!("fetches:");
        for (agent, r) in &d.fetches {
            outln!(
                "  {agent:<24} {} fetched={} reused={} {}",
                if r.ok { "ok" } else { "FAILED" },
                r.fetched_chunks,
                r.reused_chunks,
                r.detail
            );
        }
    }
    Ok(())
}

/// `data get`: the coordinator stages the dataset into its own store (from agents), then
/// every chunk is downloaded and verified.
async fn get(c: &ApiClient, dataset: &str, dest: &Path) -> Result<()> {
    let d: DatasetRecord =
        c.post_json(&format!("/api/v1/data/{dataset}/stage"), &serde_json::json!({})).await?;
    let manifest = d.manifest.as_ref();
    if manifest.id() != d.id {
        bail!("manifest does not match dataset id {}", d.id);
    }
    manifest.validate()?;
    let pb = bar(manifest.total_bytes(), "downloading");
    for f in &manifest.files {
        let p = dest.join(&f.path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut out =
            std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        for h in &f.chunks {
            let hex = hash_hex(h);
            let (status, body) = c.get(&format!("/api/v1/data/chunks/{hex}")).await?;
            if status != 200 {
                bail!("chunk {hex}: {}", String::from_utf8_lossy(&body));
            }
            if &hash_bytes(&body) != h {
                bail!("chunk {hex} failed verification");
            }
            out.write_all(&body).with_context(|| format!("writing {}", p.display()))?;
            pb.inc(body.len() as u64);
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(f.mode & PERMISSION_BITS);
        std::fs::set_permissions(&p, mode).with_context(|| format!("chmod {}", p.display()))?;
    }
    pb.finish_and_clear();
    outln!(
        "{} ({}) -> {}: {} in {} file(s), every chunk verified",
        d.name,
        short(&d.id),
        dest.display(),
        human_bytes(manifest.total_bytes()),
        manifest.files.len()
    );
    Ok(())
}

/// Wait until `agent` reports how its fetch of `id` ended.
async fn wait_fetch(c: &ApiClient, id: &str, agent: &str) -> Result<()> {
    let deadline = Instant::now() + FETCH_WAIT;
    loop {
        let d: DatasetRecord = c.get_json(&format!("/api/v1/data/{id}")).await?;
        if let Some(f) = d.fetches.get(agent) {
            if f.ok {
                outln!(
                    "{agent} holds {} ({} chunk(s) fetched, {} already there)",
                    short(id),
                    f.fetched_chunks,
                    f.reused_chunks
                );
                return Ok(());
            }
            bail!("{agent} could not fetch it: {}", f.detail);
        }
        if Instant::now() > deadline {
            bail!("{agent} has not reported its fetch after {} minutes", FETCH_WAIT.as_secs() / 60);
        }
        tokio::time::sleep(FETCH_POLL).await;
    }
}
