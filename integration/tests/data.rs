//! The data plane on a real local mesh: datasets put through the CLI, staged into jobs,
//! outputs registered and fetched agent to agent, multi-source fetches surviving a dead
//! holder and a corrupt chunk, residency enforced on every path, resumed fetches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetmesh_api::answers::{Placed, Submitted};
use fleetmesh_coordinator::client::ApiClient;
use fleetmesh_integration::work::{self, AttemptState, DatasetRecord, JobRecord, JobState};
use fleetmesh_integration::{
    agents, attrs, free_udp_port, wait_for, AgentProc, CoordinatorProc, Pki,
};
use fleetmesh_protocol::data::{hash_bytes, hash_hex, FetchPlan, Holder, Ticket, TicketSigner};
use fleetmesh_protocol::PeerKind;

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: incompressible enough, reproducible.
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Relative path -> BLAKE3 of every file under `root`.
fn tree_hashes(root: &Path) -> BTreeMap<String, String> {
    fleetmesh_data::dataset::list_files(root)
        .expect("list")
        .into_iter()
        .map(|(rel, p)| (rel, hash_hex(&hash_bytes(&std::fs::read(p).expect("read")))))
        .collect()
}

async fn mesh_up(client: &ApiClient, n: usize) {
    wait_for(Duration::from_secs(15), || async {
        let a = agents(client).await;
        (a.len() >= n
            && a.iter()
                .filter(|a| {
                    a.host.is_some()
                        && a.state == fleetmesh_coordinator::fleet::liveness::AgentState::Connected
                })
                .count()
                >= n)
            .then_some(())
    })
    .await
    .expect("agents up");
}

async fn cli_ok(coord: &CoordinatorProc, pki: &Pki, args: &[&str]) -> String {
    let out = coord.cli(pki, args).await.expect("cli runs");
    assert!(
        out.status.success(),
        "fleetmesh {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn dataset(client: &ApiClient, r: &str) -> DatasetRecord {
    work::dataset(client, r).await.unwrap_or_else(|| panic!("no dataset {r}"))
}

async fn wait_job(client: &ApiClient, id: &str, state: JobState, secs: u64) -> JobRecord {
    work::wait_job(client, id, state, Duration::from_secs(secs)).await
}

/// An agent certified for jurisdiction EU (region `r`, provider `p`), no GPUs.
fn eu_agent(
    pki: &Pki,
    coord: &CoordinatorProc,
    name: &str,
    extra: &[&str],
    work: &Path,
) -> anyhow::Result<AgentProc> {
    AgentProc::start_extra(pki, coord.control, name, attrs("r", "EU", "p"), None, extra, work)
}

fn chunk_files(store: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(store.join("chunks")) {
        for sub in rd.flatten() {
            if let Ok(rd2) = std::fs::read_dir(sub.path()) {
                out.extend(rd2.flatten().map(|e| e.path()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_two_job_workflow_with_outputs_then_get_is_byte_identical() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let _a = AgentProc::start_extra(
        &pki,
        coord.control,
        "a",
        attrs("eu-west", "EU", "aws"),
        None,
        &["--labels", "role=a"],
        work.path(),
    )?;
    let _b = AgentProc::start_extra(
        &pki,
        coord.control,
        "b",
        attrs("eu-west", "EU", "aws"),
        None,
        &["--labels", "role=b"],
        work.path(),
    )?;
    mesh_up(&client, 2).await;
    // A directory with a multi-chunk file, a small file and a nested one.
    let src = work.path().join("raw");
    std::fs::create_dir_all(src.join("nested/deeper"))?;
    std::fs::write(src.join("big.bin"), random_bytes(9 << 20, 7))?;
    std::fs::write(src.join("readme.txt"), b"fleetmesh data plane\n")?;
    std::fs::write(src.join("nested/deeper/x.bin"), random_bytes(1000, 3))?;
    let out = cli_ok(
        &coord,
        &pki,
        &["data", "put", src.to_str().unwrap_or_default(), "--name", "raw", "--jurisdiction", "EU"],
    )
    .await;
    assert!(out.contains("dataset raw"), "{out}");

    let yaml = r#"
name: roundtrip
jobs:
  first:
    inputs: [raw]
    outputs: [out]
    constraints: { labels: { role: a } }
    script: |
      cp -r "$FLEETMESH_INPUTS/raw/." "$FLEETMESH_OUTPUTS/out/"
      chmod -R u+w "$FLEETMESH_OUTPUTS/out"
      echo "added by first" > "$FLEETMESH_OUTPUTS/out/added.txt"
  second:
    needs: [first]
    inputs: [first.out]
    outputs: [final]
    constraints: { labels: { role: b } }
    script: |
      cp -r "$FLEETMESH_INPUTS/out/." "$FLEETMESH_OUTPUTS/final/"
"#;
    let wf = work::submit(&client, yaml).await?;
    let second = wait_job(&client, &format!("{wf}.second"), JobState::Succeeded, 60).await;
    assert_eq!(second.attempts[0].agents[0], "b");
    let first = work::job(&client, &format!("{wf}.first")).await.expect("first");
    assert_eq!(first.attempts[0].agents[0], "a");

    // first's output: held by a (and now b), named WORKFLOW.JOB.OUTPUT, EU residency inherited.
    let out_ds = dataset(&client, "roundtrip.first.out").await;
    assert_eq!(out_ds.jurisdictions, ["EU"], "{out_ds:#?}");
    assert_eq!(out_ds.producer, Some(format!("{wf}.first")));
    assert!(out_ds.holders.get("a").is_some_and(|h| h.complete), "{out_ds:#?}");
    // b fetched it straight from a: the coordinator was not on the path.
    let b_log = std::fs::read_to_string(work.path().join("agent-b.log"))?;
    let fetch_line = b_log
        .lines()
        .find(|l| l.contains("fetch complete") && l.contains(&out_ds.id[..12]))
        .unwrap_or_else(|| panic!("no fetch by b in its log:\n{b_log}"));
    assert!(fetch_line.contains("(\"a\","), "{fetch_line}");
    assert!(!fetch_line.contains("\"main\""), "{fetch_line}");

    // get: the final output, downloaded through the coordinator, equals the input plus
    // the file the first job added, byte for byte.
    let dest = work.path().join("got");
    let out = cli_ok(
        &coord,
        &pki,
        &["data", "get", "roundtrip.second.final", dest.to_str().unwrap_or_default()],
    )
    .await;
    assert!(out.contains("every chunk verified"), "{out}");
    let mut want = tree_hashes(&src);
    want.insert("added.txt".into(), hash_hex(&hash_bytes(b"added by first\n")));
    assert_eq!(tree_hashes(&dest), want);
    // Listing shows all three datasets with their holders.
    let ls = cli_ok(&coord, &pki, &["data", "ls"]).await;
    for n in ["raw", "roundtrip.first.out", "roundtrip.second.final"] {
        assert!(ls.contains(n), "{ls}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_source_fetch_survives_a_dead_holder_and_a_corrupt_chunk() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    // Holders serve at a capped rate so a transfer lasts long enough to interfere with;
    // f1 too, since it holds the dataset by the time f2 fetches (unthrottled, it served
    // most of f2's chunks before h3's kill landed, once, on a loaded machine).
    let slow = ["--serve-rate", "12MiB"];
    let _h1 = eu_agent(&pki, &coord, "h1", &slow, work.path())?;
    let _h2 = eu_agent(&pki, &coord, "h2", &slow, work.path())?;
    let mut h3 = eu_agent(&pki, &coord, "h3", &slow, work.path())?;
    let _f1 = eu_agent(&pki, &coord, "f1", &slow, work.path())?;
    let _f2 = eu_agent(&pki, &coord, "f2", &[], work.path())?;
    mesh_up(&client, 5).await;
    let src = work.path().join("blob.bin");
    let content = random_bytes(48 << 20, 11);
    std::fs::write(&src, &content)?;
    cli_ok(
        &coord,
        &pki,
        &[
            "data",
            "put",
            src.to_str().unwrap_or_default(),
            "--name",
            "blob",
            "--chunk-size",
            "1MiB",
            "--on",
            "h1",
        ],
    )
    .await;
    cli_ok(&coord, &pki, &["data", "place", "blob", "h2"]).await;
    cli_ok(&coord, &pki, &["data", "place", "blob", "h3"]).await;

    // 1. f1 fetches with chunks served by all three holders.
    cli_ok(&coord, &pki, &["data", "place", "blob", "f1"]).await;
    let d = dataset(&client, "blob").await;
    let rep = d.fetches.get("f1").expect("f1 reported");
    assert!(rep.ok, "{d:#?}");
    assert_eq!(rep.fetched_chunks, 48, "{rep:?}");
    let per: BTreeMap<String, u64> = rep.per_holder.iter().cloned().collect();
    assert_eq!(per.keys().collect::<Vec<_>>(), ["h1", "h2", "h3"], "{rep:?}");
    assert!(per.values().all(|n| *n > 0), "every holder served chunks: {per:?}");

    // 2. Every chunk file at h1 is corrupted on disk, and h3 is killed mid-transfer: f2
    //    still gets every chunk, each verified, from the holders that remain.
    let h1_chunks = chunk_files(&work.path().join("agent-h1/store"));
    assert_eq!(h1_chunks.len(), 48);
    for c in &h1_chunks {
        let mut b = std::fs::read(c)?;
        b[0] ^= 0xff;
        std::fs::write(c, b)?;
    }
    let place = coord.cli(&pki, &["data", "place", "blob", "f2"]);
    // Killed once f2's fetch is under way (a fixed delay was sometimes too late on a
    // loaded machine: the fetch had finished).
    let f2_log_path = work.path().join("agent-f2.log");
    let killer = async {
        wait_for(Duration::from_secs(10), || async {
            let log = std::fs::read_to_string(&f2_log_path).unwrap_or_default();
            log.contains("fetch started").then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        h3.kill9();
    };
    let (out, ()) = tokio::join!(place, killer);
    let out = out?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d = dataset(&client, "blob").await;
    let rep = d.fetches.get("f2").expect("f2 reported");
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.fetched_chunks, 48, "{rep:?}");
    let f2_log = std::fs::read_to_string(work.path().join("agent-f2.log"))?;
    assert!(
        f2_log.contains("chunk failed hash verification") && f2_log.contains("holder=h1"),
        "corruption at h1 detected:\n{f2_log}"
    );
    assert!(
        f2_log.contains("holder failed") && f2_log.contains("holder=h3"),
        "h3's death noticed:\n{f2_log}"
    );
    // What f2 stored is exactly the content: every chunk file hashes to its name.
    let f2_chunks = chunk_files(&work.path().join("agent-f2/store"));
    assert_eq!(f2_chunks.len(), 48);
    for c in &f2_chunks {
        let name = c.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        assert_eq!(hash_hex(&hash_bytes(&std::fs::read(c)?)), name);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eu_dataset_never_reaches_a_us_agent() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let eu_port = free_udp_port();
    let listen = format!("127.0.0.1:{eu_port}");
    let _eu = AgentProc::start_extra(
        &pki,
        coord.control,
        "eu",
        attrs("eu-west", "EU", "p"),
        None,
        &["--labels", "site=eu", "--data-listen", &listen],
        work.path(),
    )?;
    let _us = AgentProc::start_extra(
        &pki,
        coord.control,
        "us",
        attrs("us-east", "US", "p"),
        None,
        &["--labels", "site=us"],
        work.path(),
    )?;
    mesh_up(&client, 2).await;
    let src = work.path().join("patients.csv");
    std::fs::write(&src, random_bytes(3 << 20, 5))?;
    cli_ok(
        &coord,
        &pki,
        &[
            "data",
            "put",
            src.to_str().unwrap_or_default(),
            "--name",
            "patients",
            "--jurisdiction",
            "EU",
            "--on",
            "eu",
        ],
    )
    .await;
    let id = dataset(&client, "patients").await.id;

    // (b) DataBroker: no plan, no ticket for the US agent.
    let out = coord.cli(&pki, &["data", "place", "patients", "us"]).await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("residency") && err.contains("us is in US"), "{err}");

    // (a) Auction: a job reading it that may only run on the US agent stays queued with
    //     the reason; one that may run anywhere runs in the EU.
    let yaml = r#"
name: residency
jobs:
  pinned-us:
    inputs: [patients]
    constraints: { labels: { site: us } }
    command: ["true"]
  anywhere:
    inputs: [patients]
    command: ["sh", "-c", "test -s $FLEETMESH_INPUTS/patients/patients.csv"]
"#;
    let wf = work::submit(&client, yaml).await?;
    let ok = wait_job(&client, &format!("{wf}.anywhere"), JobState::Succeeded, 30).await;
    assert_eq!(ok.attempts[0].agents[0], "eu");
    let pinned = wait_for(Duration::from_secs(10), || async {
        let j = work::job(&client, &format!("{wf}.pinned-us")).await?;
        j.queued_reasons.iter().any(|r| r.contains("residency")).then_some(j)
    })
    .await
    .expect("residency reason shown");
    assert_eq!(pinned.state, JobState::Queued);
    assert!(pinned.attempts.is_empty());

    // (c) The serving agent, asked directly by the US agent's certificate.
    let us_tls = pki.identity(PeerKind::Agent, "us")?;
    let key = std::fs::read(work.path().join("coord/ticket-signing.key"))?;
    let coord_signer = TicketSigner::from_pkcs8(&key)?;
    let forger = TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8()?)?;
    let now = fleetmesh_data::now_unix_ms();
    let ticket = |requester: &str, expires: u64| Ticket {
        dataset: id.clone(),
        requester: requester.into(),
        requester_kind: PeerKind::Agent,
        holder: "eu".into(),
        jurisdictions: vec![],
        expires_unix_ms: expires,
    };
    let cases = [
        ("forged", forger.sign(ticket("us", now + 60_000)), "signature"),
        ("expired", coord_signer.sign(ticket("us", now - 1000)), "expired"),
        ("someone else's", coord_signer.sign(ticket("eu", now + 60_000)), "issued to"),
        ("valid but US", coord_signer.sign(ticket("us", now + 60_000)), "residency"),
    ];
    let store_dir = tempfile::tempdir()?;
    let store = std::sync::Arc::new(fleetmesh_data::Store::open(store_dir.path(), u64::MAX)?);
    let ep = fleetmesh_data::xfer::endpoint("127.0.0.1:0".parse()?, &us_tls, false)?;
    for (what, t, expect) in cases {
        let plan = FetchPlan {
            dataset: id.clone(),
            name: "patients".into(),
            jurisdictions: vec![],
            bytes: 0,
            holders: vec![Holder {
                name: "eu".into(),
                kind: PeerKind::Agent,
                addr: listen.clone(),
                ticket: t,
            }],
        };
        let e =
            fleetmesh_data::fetch(&ep, &us_tls, store.clone(), &plan, std::sync::Arc::new(|_| {}))
                .await
                .expect_err(what);
        assert!(e.to_string().contains(expect), "{what}: {e}");
    }
    assert!(chunk_files(store_dir.path()).is_empty(), "not a byte reached the US store");
    assert!(chunk_files(&work.path().join("agent-us/store")).is_empty());
    let eu_log = std::fs::read_to_string(work.path().join("agent-eu.log"))?;
    assert_eq!(eu_log.matches("xfer request refused").count(), 4, "{eu_log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_fetcher_resumes_without_refetching_verified_chunks() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let slow = ["--serve-rate", "8MiB"];
    let _h1 = eu_agent(&pki, &coord, "h1", &slow, work.path())?;
    let _h2 = eu_agent(&pki, &coord, "h2", &slow, work.path())?;
    let mut f = eu_agent(&pki, &coord, "f", &[], work.path())?;
    mesh_up(&client, 3).await;
    let src = work.path().join("ckpt.bin");
    std::fs::write(&src, random_bytes(40 << 20, 13))?;
    cli_ok(
        &coord,
        &pki,
        &[
            "data",
            "put",
            src.to_str().unwrap_or_default(),
            "--name",
            "ckpt",
            "--chunk-size",
            "1MiB",
            "--on",
            "h1",
        ],
    )
    .await;
    cli_ok(&coord, &pki, &["data", "place", "ckpt", "h2"]).await;

    // Start the fetch, kill the fetcher once some chunks are in.
    let r: Placed =
        client.post_json("/api/v1/data/ckpt/place", &serde_json::json!({ "agent": "f" })).await?;
    assert_eq!(r.agent, "f");
    let f_store = work.path().join("agent-f/store");
    wait_for(Duration::from_secs(20), || async {
        (chunk_files(&f_store).len() >= 8).then_some(())
    })
    .await
    .expect("fetch under way");
    f.kill9();
    let had = chunk_files(&f_store).len();
    assert!(had < 40, "killed mid-fetch ({had} of 40)");
    f.spawn()?;
    // The coordinator asks the restarted agent again (it reports a partial copy), and
    // the fetch resumes from what is on disk.
    let rep = wait_for(Duration::from_secs(60), || async {
        work::dataset(&client, "ckpt").await?.fetches.get("f").cloned()
    })
    .await
    .expect("the restarted fetcher reports its fetch");
    assert!(rep.ok, "{rep:?}");
    let (fetched, reused) = (rep.fetched_chunks, rep.reused_chunks);
    assert_eq!(fetched + reused, 40, "{rep:?}");
    assert!(reused >= had as u64, "every verified chunk kept: had {had}, reused {reused}");
    assert_eq!(chunk_files(&f_store).len(), 40);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_job_goes_to_the_free_agent_that_holds_its_input() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    // Same price, same site: only the data differs.
    let _p =
        AgentProc::start(&pki, coord.control, "p", attrs("r", "EU", "aws"), None, work.path())?;
    let _q =
        AgentProc::start(&pki, coord.control, "q", attrs("r", "EU", "aws"), None, work.path())?;
    let _s =
        AgentProc::start(&pki, coord.control, "s", attrs("r", "EU", "aws"), None, work.path())?;
    mesh_up(&client, 3).await;
    let src = work.path().join("features.bin");
    std::fs::write(&src, random_bytes(16 << 20, 17))?;
    cli_ok(
        &coord,
        &pki,
        &["data", "put", src.to_str().unwrap_or_default(), "--name", "features", "--on", "q"],
    )
    .await;
    for round in 0..3 {
        let yaml = format!(
            "name: local-{round}\nobjective: balanced\njobs:\n  use:\n    inputs: [features]\n    command: [\"true\"]\n"
        );
        let wf = work::submit(&client, &yaml).await?;
        let j = wait_job(&client, &format!("{wf}.use"), JobState::Succeeded, 30).await;
        let a = &j.attempts[0];
        assert_eq!(a.agents[0], "q", "round {round}: {a:#?}");
        // Every agent bid; only q said it holds the 16 MiB already, and its ETA is shorter.
        assert_eq!(a.bids.len(), 3, "{a:#?}");
        for b in &a.bids {
            let want = if b.agent == "q" { 16 << 20 } else { 0 };
            assert_eq!(b.local_bytes, want, "{b:?}");
        }
    }
    // Nobody else fetched it.
    let d = dataset(&client, "features").await;
    assert!(!d.holders.contains_key("p") && !d.holders.contains_key("s"), "{d:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstageable_input_places_the_job_again_without_using_a_retry() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let mut h = eu_agent(&pki, &coord, "h", &["--labels", "role=h"], work.path())?;
    let _w = eu_agent(&pki, &coord, "w", &["--labels", "role=w"], work.path())?;
    mesh_up(&client, 2).await;
    // An output held only by h.
    let r: Submitted = client
        .post_raw(
            "/api/v1/workflows",
            b"name: make\njobs:\n  gen:\n    outputs: [o]\n    constraints: { labels: { role: h } }\n    script: head -c 3000000 /dev/urandom > $FLEETMESH_OUTPUTS/o/blob\n".to_vec(),
        )
        .await?;
    let wf = r.id;
    wait_job(&client, &format!("{wf}.gen"), JobState::Succeeded, 30).await;
    // h loses the chunks on disk (kept aside to put back later).
    let store = work.path().join("agent-h/store");
    let aside = work.path().join("aside");
    std::fs::create_dir_all(&aside)?;
    let chunks = chunk_files(&store);
    assert!(!chunks.is_empty());
    for c in &chunks {
        std::fs::rename(c, aside.join(c.file_name().unwrap_or_default()))?;
    }
    let r: Submitted = client
        .post_raw(
            "/api/v1/workflows",
            b"name: use\njobs:\n  read:\n    inputs: [make.gen.o]\n    constraints: { labels: { role: w } }\n    command: [\"test\", \"-s\", \"inputs/make.gen.o/blob\"]\n".to_vec(),
        )
        .await?;
    let id = format!("{}.read", r.id);
    let j = wait_for(Duration::from_secs(20), || async {
        let j = work::job(&client, &id).await?;
        j.attempts.first().is_some_and(|a| a.state == AttemptState::StagingFailed).then_some(j)
    })
    .await
    .expect("staging failed on w");
    assert_eq!(j.failures, 0, "no retry used: {j:#?}");
    assert_ne!(j.state, JobState::Failed, "{j:#?}");
    assert!(
        j.attempts[0].outcomes[0].as_deref().unwrap_or_default().contains("inputs not staged"),
        "{j:#?}"
    );
    // The data comes back (h restarts with its chunks): the job runs.
    for c in &chunks {
        std::fs::rename(aside.join(c.file_name().unwrap_or_default()), c)?;
    }
    h.kill9();
    h.spawn()?;
    let j = wait_job(&client, &id, JobState::Succeeded, 60).await;
    assert_eq!(j.failures, 0);
    assert_eq!(j.attempts.last().map(|a| a.state), Some(AttemptState::Succeeded), "{j:#?}");
    Ok(())
}
