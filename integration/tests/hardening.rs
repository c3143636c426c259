//! Hostile input through the API, and the identities allowed to give it: a submitter's
//! workflow cannot crash or flood the coordinator, a job cannot widen its data's
//! residency or smuggle the agent's key out, and a revoked or foreign operator
//! certificate gets nothing. Every change is audited with who made it.

use std::path::Path;
use std::time::Duration;

use fleetmesh_api::answers::{Cancelled, Submitted};
use fleetmesh_api::fleet::AgentView;
use fleetmesh_api::trust::AuditRecord;
use fleetmesh_coordinator::client::{ApiClient, ClientError};
use fleetmesh_integration::work::{self, DatasetRecord, JobRecord, JobState, LogChunk};
use fleetmesh_integration::{attrs, wait_for, AgentProc, CoordinatorProc, Pki};
use fleetmesh_protocol::tls::TlsIdentity;
use fleetmesh_protocol::{Attributes, PeerKind};

/// The API's answer to a submission: Ok(id) or Err((status, message)).
async fn submit(client: &ApiClient, yaml: String) -> Result<String, (u16, String)> {
    match client.post_raw::<Submitted>("/api/v1/workflows", yaml.into_bytes()).await {
        Ok(v) => Ok(v.id),
        Err(ClientError::Api { status, message }) => Err((status, message)),
        Err(e) => Err((0, e.to_string())),
    }
}

/// A coordinator and one EU agent `name` (with `extra` flags), up and reporting.
async fn mesh_with_agent(
    name: &str,
    extra: &[&str],
) -> anyhow::Result<(Pki, tempfile::TempDir, CoordinatorProc, ApiClient, AgentProc)> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    // Passable, so a job user can reach its own work dir under the agent's data dir.
    std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let a = AgentProc::start_extra(
        &pki,
        coord.control,
        name,
        attrs("r", "EU", "p"),
        None,
        extra,
        work.path(),
    )?;
    let up = wait_for(Duration::from_secs(20), || async {
        let all = fleetmesh_integration::agents(&client).await;
        all.iter().any(|x| x.name == name && x.host.is_some()).then_some(())
    })
    .await;
    anyhow::ensure!(up.is_some(), "agent {name} not up: {}", a.log_text());
    Ok((pki, work, coord, client, a))
}

async fn wait_state(client: &ApiClient, job: &str, state: JobState) -> JobRecord {
    work::wait_job(client, job, state, Duration::from_secs(30)).await
}

/// A job's kept output.
async fn logs_of(client: &ApiClient, job: &str) -> anyhow::Result<String> {
    let l: LogChunk = client.get_json(&format!("/api/v1/jobs/{job}/logs")).await?;
    Ok(l.data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_workflows_are_refused_with_the_limit_they_break() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;

    // 20,000 jobs in one chain (~860 KB): this aborted the coordinator.
    let mut chain = String::from("name: chain\njobs:\n");
    for i in 0..20_000 {
        chain.push_str(&format!("  j{i}:\n    command: [x]\n"));
        if i > 0 {
            chain.push_str(&format!("    needs: [j{}]\n", i - 1));
        }
    }
    let (status, msg) = submit(&client, chain).await.expect_err("refused");
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("20000 jobs; at most 10000 per workflow"), "{msg}");

    // One anchored 1 MB scalar referenced 40 times.
    let mut bomb =
        format!("name: bomb\njobs:\n  a0:\n    script: &s \"{}\"\n", "x".repeat(1 << 20));
    for i in 1..40 {
        bomb.push_str(&format!("  a{i}:\n    script: *s\n"));
    }
    let (status, msg) = submit(&client, bomb).await.expect_err("refused");
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("expands (YAML aliases included) to more than"), "{msg}");

    // A 1.2 MB script used to loop forever: its award never fit one frame.
    let big = format!("name: big\njobs:\n  a:\n    script: \"{}\"\n", "e".repeat(1_200_000));
    let (status, msg) = submit(&client, big).await.expect_err("refused");
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("job `a`, field `script`: 1200000 bytes; the limit is 262144"), "{msg}");

    // Runtime options smuggled in as the image.
    let opt = "name: opt\njobs:\n  a:\n    image: \"--privileged\"\n    command: [-v, \"/:/host\", busybox, cat, /host/etc/shadow]\n";
    let (status, msg) = submit(&client, opt.to_string()).await.expect_err("refused");
    assert_eq!(status, 400, "{msg}");
    assert!(
        msg.contains("job `a`, field `image`: \"--privileged\" is not an image reference"),
        "{msg}"
    );

    // The coordinator is still up and serving.
    let ok = submit(&client, "name: fine\njobs:\n  a:\n    command: [\"true\"]\n".into()).await;
    assert!(ok.is_ok(), "{ok:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_foreign_operators_get_nothing_and_changes_name_their_actor(
) -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let admin = coord.client(&pki)?;
    let url = format!("https://127.0.0.1:{}", coord.api.port());

    pki.issue(PeerKind::Operator, "bob", Attributes::default())?;
    let bob = ApiClient::new(&url, &pki.identity(PeerKind::Operator, "bob")?)?;
    let bobs = submit(&bob, "name: bobs\njobs:\n  a:\n    command: [\"true\"]\n".into()).await;
    assert!(bobs.is_ok(), "{bobs:?}");

    // Signed by the mesh CA, but for another trust domain.
    let mut evil = fleetmesh_protocol::pki::Ca::load_dir(pki.path())?;
    evil.trust_domain = "evil.test".into();
    let other = tempfile::tempdir()?;
    let req = fleetmesh_protocol::pki::IssueRequest::new(
        PeerKind::Operator,
        "eve",
        Duration::from_secs(3600),
    );
    let (cert, key) = evil.issue_to_dir(other.path(), &req)?;
    let eve = ApiClient::new(&url, &TlsIdentity::load(&pki.ca_pem(), &cert, &key)?)?;
    match eve.get_json::<Vec<AgentView>>("/api/v1/agents").await {
        Err(ClientError::Api { status: 403, message }) => assert!(
            message.contains("is for trust domain evil.test; this mesh is mesh.test"),
            "{message}"
        ),
        other => panic!("foreign trust domain: {other:?}"),
    }

    // Revoking bob (an operator) denies him at once, on reads too.
    let out = coord.cli(&pki, &["revoke", "operator", "bob", "--reason", "left the team"]).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    match bob.get_json::<Vec<AgentView>>("/api/v1/agents").await {
        Err(ClientError::Api { status: 403, message }) => assert!(
            message.contains("certificate of spiffe://mesh.test/operator/bob is revoked"),
            "{message}"
        ),
        other => panic!("revoked operator: {other:?}"),
    }
    // Revocation survives a restart.
    let mut coord = coord;
    coord.kill9();
    coord.restart(&pki).await?;
    let bob = ApiClient::new(
        &format!("https://127.0.0.1:{}", coord.api.port()),
        &pki.identity(PeerKind::Operator, "bob")?,
    )?;
    assert!(matches!(
        bob.get_json::<Vec<AgentView>>("/api/v1/agents").await,
        Err(ClientError::Api { status: 403, .. })
    ));

    // Every change names who made it: bob's submission, the revocation, a cancel.
    let admin = coord.client(&pki).unwrap_or(admin);
    let id = submit(&admin, "name: c\njobs:\n  a:\n    command: [sleep, \"30\"]\n".into())
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let _: Cancelled = admin.post_json(&format!("/api/v1/workflows/{id}/cancel"), &()).await?;
    let audit: Vec<AuditRecord> = admin.get_json("/api/v1/audit").await?;
    let by = |actor: &str, what: &str| {
        audit.iter().any(|a| {
            a.actor.as_deref().is_some_and(|x| x.ends_with(actor)) && a.detail.contains(what)
        })
    };
    assert!(by("/operator/bob", "POST /api/v1/workflows -> 201"), "{audit:#?}");
    assert!(
        by("/operator/harness", "POST /api/v1/identities/operator/bob/revoke -> 200"),
        "{audit:#?}"
    );
    assert!(
        by("/operator/harness", &format!("POST /api/v1/workflows/{id}/cancel -> 200")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|a| a.event == "operator-revoked" && a.detail == "left the team"),
        "{audit:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_keep_their_inputs_residency_and_never_carry_the_agents_key() -> anyhow::Result<()>
{
    let (pki, work, coord, client, _eu) = mesh_with_agent("eu1", &[]).await?;
    let src = work.path().join("raw");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("records.csv"), b"eu,personal,data\n")?;
    let out = coord
        .cli(
            &pki,
            &[
                "data",
                "put",
                src.to_str().unwrap_or_default(),
                "--name",
                "raw",
                "--jurisdiction",
                "EU",
            ],
        )
        .await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // An EU input copied into an output declared US: refused, not moved.
    let wf = submit(
        &client,
        "name: widen\njobs:\n  copy:\n    inputs: [raw]\n    outputs: [o]\n    output_jurisdictions: [US]\n    script: cp -r \"$FLEETMESH_INPUTS/raw/.\" \"$FLEETMESH_OUTPUTS/o/\"\n".into(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let j = wait_state(&client, &format!("{wf}.copy"), JobState::Failed).await;
    let why = j.history.last().map(|h| h.detail.clone()).unwrap_or_default();
    assert!(why.contains("has nothing in common with the residency of its inputs"), "{j:#?}");

    // Declaring [EU, US] narrows to EU: an output is never less restricted than its input.
    let wf = submit(
        &client,
        "name: narrow\njobs:\n  copy:\n    inputs: [raw]\n    outputs: [o]\n    output_jurisdictions: [EU, US]\n    script: cp -r \"$FLEETMESH_INPUTS/raw/.\" \"$FLEETMESH_OUTPUTS/o/\"\n".into(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    wait_state(&client, &format!("{wf}.copy"), JobState::Succeeded).await;
    let d: DatasetRecord = client.get_json("/api/v1/data/narrow.copy.o").await?;
    assert_eq!(d.jurisdictions, ["EU"], "{d:#?}");

    // A job that knows where the agent's key is hard-links it into an output.
    let key = pki.path().join("agent-eu1.key");
    let wf = submit(
        &client,
        format!(
            "name: steal\njobs:\n  s:\n    outputs: [loot]\n    command: [ln, \"{}\", outputs/loot/key]\n",
            key.display()
        ),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let j = wait_state(&client, &format!("{wf}.s"), JobState::Failed).await;
    assert!(format!("{j:?}").contains("is a hard link to a file outside the outputs"), "{j:#?}");
    let r = client.get_json::<DatasetRecord>("/api/v1/data/steal.s.loot").await;
    assert!(r.is_err(), "the loot was registered: {r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_starve_the_api() -> anyhow::Result<()> {
    use std::sync::Arc;
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    // As in the report: the coordinator may hold 256 descriptors.
    let pid = coord.pid().expect("coordinator pid").to_string();
    let st =
        std::process::Command::new("prlimit").args(["--pid", &pid, "--nofile=256:256"]).status()?;
    assert!(st.success(), "prlimit failed");

    // 400 TLS connections with an agent certificate, opened and left idle.
    pki.issue(PeerKind::Agent, "flood", Attributes::default())?;
    let cfg = pki.identity(PeerKind::Agent, "flood")?.client_config(&[b"http/1.1"], false)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let before = coord.log_text().lines().filter(|l| l.contains("WARN")).count();
    let mut idle = Vec::new();
    for _ in 0..400 {
        let Ok(tcp) = tokio::net::TcpStream::connect(coord.api).await else { continue };
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        if let Ok(Ok(t)) =
            tokio::time::timeout(Duration::from_secs(2), connector.connect(name, tcp)).await
        {
            idle.push(t);
        }
    }
    // An operator still gets through, promptly.
    let t0 = std::time::Instant::now();
    let agents: Vec<AgentView> = client.get_json("/api/v1/agents").await?;
    assert!(agents.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(2), "operator waited {:?}", t0.elapsed());
    // And the flood is not a flood of warnings: at most one per second per kind.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let warns = coord.log_text().lines().filter(|l| l.contains("WARN")).count() - before;
    assert!(warns <= 8, "{warns} warnings:\n{}", coord.log_text());
    // A connection that never sends its request is closed by the header timeout.
    drop(idle);
    let mut silent = tokio::net::TcpStream::connect(coord.api).await?;
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "silent connection still open: {r:?}");
    assert!(t0.elapsed() < Duration::from_secs(7), "closed after {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_never_re_pointed_silently_and_workflows_read_what_they_pinned(
) -> anyhow::Result<()> {
    let (pki, work, coord, client, _eu) = mesh_with_agent("eu1", &[]).await?;
    let put = |content: &'static str, extra: &'static [&'static str]| {
        let dir = work.path().join(format!("src-{}", content.len()));
        let coord = &coord;
        let pki = &pki;
        async move {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("data.txt"), content)?;
            let mut args = vec!["data", "put", dir.to_str().unwrap_or_default(), "--name", "raw"];
            args.extend_from_slice(extra);
            anyhow::Ok(coord.cli(pki, &args).await?)
        }
    };
    let out = put("version one", &["--jurisdiction", "EU"]).await?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("dataset raw@1"), "{out:?}");
    // b reads raw only after a has run: after the name has a second version.
    let wf = submit(
        &client,
        "name: pin\njobs:\n  a:\n    command: [sleep, \"3\"]\n  b:\n    needs: [a]\n    inputs: [raw]\n    outputs: [o]\n    script: cp \"$FLEETMESH_INPUTS/raw/data.txt\" \"$FLEETMESH_OUTPUTS/o/\"\n".into(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // A put with no residency under the EU name is refused...
    let out = put("version two, anywhere", &[]).await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dataset raw may only live in [\"EU\"]"), "{err}");
    // ...unless asked for explicitly, which is audited with who did it.
    let out = put("version two, anywhere", &["--loosen-residency"]).await?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("dataset raw@2"), "{out:?}");
    let audit: Vec<AuditRecord> = client.get_json("/api/v1/audit").await?;
    assert!(
        audit.iter().any(|a| a.event == "residency-loosened"
            && a.actor.as_deref().is_some_and(|x| x.ends_with("/operator/harness"))
            && a.detail.contains("raw@2: from [\"EU\"] to []")),
        "{audit:#?}"
    );
    // The workflow reads the version it pinned at submission.
    wait_state(&client, &format!("{wf}.b"), JobState::Succeeded).await;
    let dest = work.path().join("got");
    let out =
        coord.cli(&pki, &["data", "get", "pin.b.o", dest.to_str().unwrap_or_default()]).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(dest.join("data.txt"))?, "version one");
    let d: DatasetRecord = client.get_json("/api/v1/data/pin.b.o").await?;
    assert_eq!(d.jurisdictions, ["EU"], "{d:#?}");
    Ok(())
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_output_leaves_the_coordinators_memory() -> anyhow::Result<()> {
    const JOBS: usize = 80;
    const MIB: u64 = 1 << 20;
    let (_pki, _work, coord, client, _a) = mesh_with_agent("chatty", &[]).await?;
    let pid = coord.pid().expect("pid");
    let before = rss_bytes(pid);
    let mut y = String::from("name: chatty\njobs:\n");
    for i in 0..JOBS {
        y.push_str(&format!(
            "  p{i:02}:\n    resources: {{ cpus: 0.01 }}\n    script: head -c {MIB} /dev/zero | tr '\\0' x\n"
        ));
    }
    let wf = submit(&client, y).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let done = wait_for(Duration::from_secs(120), || async {
        let a = fleetmesh_integration::work::jobs(&client, &format!("workflow={wf}")).await?;
        (a.len() == JOBS && a.iter().all(|j| j.state == JobState::Succeeded)).then_some(())
    })
    .await;
    assert!(done.is_some(), "jobs did not all succeed");
    let grown = rss_bytes(pid).saturating_sub(before);
    println!("{JOBS} jobs x 1 MiB of output: coordinator RSS grew {} MiB", grown / MIB);
    assert!(
        grown < 48 * MIB,
        "coordinator grew {} MiB for {JOBS} MiB of finished output",
        grown / MIB
    );
    // The output is still there, from disk. While 80 jobs print at once the total cap
    // may have dropped the front of some; what was dropped is counted in the offset.
    let l: LogChunk = client.get_json(&format!("/api/v1/jobs/{wf}.p00/logs")).await?;
    assert_eq!(l.next_offset as u64, MIB, "{}", &l.data[..l.data.len().min(200)]);
    assert!(!l.data.is_empty() && l.data.bytes().all(|b| b == b'x'));
    assert!(l.finished);
    // A job printing alone keeps its whole tail (up to the per-job cap) on disk.
    let alone =
        format!("name: alone\njobs:\n  p:\n    script: head -c {MIB} /dev/zero | tr '\\0' x\n");
    let wf = submit(&client, alone).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    wait_state(&client, &format!("{wf}.p"), JobState::Succeeded).await;
    let l = logs_of(&client, &format!("{wf}.p")).await?;
    assert_eq!(l.len(), MIB as usize, "{}", &l[..l.len().min(200)]);
    Ok(())
}

/// The job user the tests run jobs as (created here if missing; needs root).
const TEST_JOB_USER: &str = "fleetmesh-job";

/// `false` (with a message) when not root; creates [`TEST_JOB_USER`] if missing.
fn ensure_job_user() -> anyhow::Result<bool> {
    if fleetmesh_agent::sandbox::agent_uid() != 0 {
        eprintln!("SKIPPED: switching jobs to another user needs root");
        return Ok(false);
    }
    if fleetmesh_agent::sandbox::lookup(TEST_JOB_USER).is_err() {
        let st = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_JOB_USER])
            .status()?;
        anyhow::ensure!(st.success(), "useradd {TEST_JOB_USER} failed");
    }
    Ok(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_as_the_job_user_and_cannot_read_the_agents_files() -> anyhow::Result<()> {
    if !ensure_job_user()? {
        return Ok(());
    }
    let (pki, work, coord, client, a) =
        mesh_with_agent("jailed", &["--job-user", TEST_JOB_USER]).await?;
    let user = fleetmesh_agent::sandbox::lookup(TEST_JOB_USER).map_err(anyhow::Error::msg)?;
    let data = a.data_dir().expect("data dir");
    // Something in the chunk store, so there is something to try to read.
    let src = work.path().join("raw");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("x"), b"secret data")?;
    let out = coord
        .cli(
            &pki,
            &["data", "put", src.to_str().unwrap_or_default(), "--name", "raw", "--on", "jailed"],
        )
        .await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = pki.path().join("agent-jailed.key");
    let yaml = format!(
        "name: jail\njobs:\n  first:\n    outputs: [o]\n    script: echo first-secret > mine.txt; echo ok > \"$FLEETMESH_OUTPUTS/o/r\"\n  probe:\n    needs: [first]\n    script: |\n      id -u\n      cat {data}/store/chunks/*/* 2>&1 || true\n      ls {data}/store 2>&1 || true\n      cat {data}/attempts/* 2>&1 || true\n      ls {data} 2>&1 || true\n      W=$FLEETMESH_WORK_DIR; J=$(basename $(dirname $W))\n      cat $(dirname $(dirname $W))/${{J%.probe}}.first/1/mine.txt 2>&1 || true\n      cat {key} 2>&1 || true\n",
        data = data.display(),
        key = key.display(),
    );
    let wf = submit(&client, yaml).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let first = wait_state(&client, &format!("{wf}.first"), JobState::Succeeded).await;
    assert_eq!(first.state, JobState::Succeeded);
    wait_state(&client, &format!("{wf}.probe"), JobState::Succeeded).await;
    let text = logs_of(&client, &format!("{wf}.probe")).await?;
    println!("{text}");
    assert!(text.starts_with(&format!("{}\n", user.uid)), "not run as {TEST_JOB_USER}: {text}");
    assert!(!text.contains("secret data"), "read the chunk store: {text}");
    assert!(!text.contains("first-secret"), "read another attempt's work dir: {text}");
    assert!(!text.contains("PRIVATE KEY"), "read a private key: {text}");
    let denied = text.matches("Permission denied").count();
    assert!(
        denied >= 5,
        "expected EACCES for store, attempts, data dir listing, other attempt, key: {text}"
    );
    // The first job's output was still collected (by the agent, from its own dir).
    let d: DatasetRecord = client.get_json("/api/v1/data/jail.first.o").await?;
    assert_eq!(d.files, 1, "{d:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_refused_on_its_peers_data_ports_despite_its_ticket(
) -> anyhow::Result<()> {
    use fleetmesh_protocol::data::{FetchPlan, Holder, Ticket, TicketSigner};
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    let port = fleetmesh_integration::free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let holder = AgentProc::start_extra(
        &pki,
        coord.control,
        "holder",
        attrs("r", "EU", "p"),
        None,
        &["--data-listen", &listen],
        work.path(),
    )?;
    pki.issue(PeerKind::Agent, "thief", attrs("r", "EU", "p"))?;
    wait_for(Duration::from_secs(20), || async {
        let a = fleetmesh_integration::agents(&client).await;
        a.iter().any(|a| a.name == "holder" && a.host.is_some()).then_some(())
    })
    .await
    .expect("holder up");
    let src = work.path().join("raw");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("x"), b"data the thief wants")?;
    let out = coord
        .cli(
            &pki,
            &["data", "put", src.to_str().unwrap_or_default(), "--name", "raw", "--on", "holder"],
        )
        .await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d: DatasetRecord = client.get_json("/api/v1/data/raw").await?;
    let id = d.id.clone();
    wait_for(Duration::from_secs(10), || async {
        let d = work::dataset(&client, "raw").await?;
        d.holders.get("holder").is_some_and(|h| h.complete).then_some(())
    })
    .await
    .expect("holder has it");
    // A ticket the coordinator issued to "thief" (valid for 10 minutes)...
    let key = std::fs::read(work.path().join("coord/ticket-signing.key"))?;
    let ticket = TicketSigner::from_pkcs8(&key)?.sign(Ticket {
        dataset: id.clone(),
        requester: "thief".into(),
        requester_kind: PeerKind::Agent,
        holder: "holder".into(),
        jurisdictions: vec![],
        expires_unix_ms: fleetmesh_data::now_unix_ms() + 600_000,
    });
    let plan = FetchPlan {
        dataset: id.clone(),
        name: "raw".into(),
        jurisdictions: vec![],
        bytes: 0,
        holders: vec![Holder {
            name: "holder".into(),
            kind: PeerKind::Agent,
            addr: listen,
            ticket,
        }],
    };
    let thief = pki.identity(PeerKind::Agent, "thief")?;
    let fetch = |dir: &Path| {
        let store = std::sync::Arc::new(fleetmesh_data::Store::open(dir, u64::MAX).expect("store"));
        let (plan, thief) = (plan.clone(), thief.clone());
        async move {
            let ep = fleetmesh_data::xfer::endpoint("127.0.0.1:0".parse()?, &thief, false)?;
            let r =
                fleetmesh_data::fetch(&ep, &thief, store, &plan, std::sync::Arc::new(|_| {})).await;
            anyhow::Ok(r.map(|_| ()).map_err(|e| e.to_string()))
        }
    };
    let before = tempfile::tempdir()?;
    assert_eq!(fetch(before.path()).await?, Ok(()), "the ticket works before the revocation");
    // ...is worthless once the thief is revoked: the holder refuses its certificate.
    let out = coord.cli(&pki, &["agents", "revoke", "thief"]).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let refused = wait_for(Duration::from_secs(5), || async {
        holder.log_text().contains("revoked identities denied on the data port").then_some(())
    })
    .await;
    assert!(refused.is_some(), "holder never got the list: {}", holder.log_text());
    let after = tempfile::tempdir()?;
    let r = fetch(after.path()).await?;
    assert!(r.as_ref().is_err_and(|e| e.contains("revoked")), "{r:?}");
    assert!(holder.log_text().contains("revoked identity refused on the data port"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_running_side_by_side_get_their_own_uids() -> anyhow::Result<()> {
    if !ensure_job_user()? {
        return Ok(());
    }
    let (_pki, _work, _coord, client, _a) =
        mesh_with_agent("pool", &["--job-user", TEST_JOB_USER, "--job-uids", "200000-200009"])
            .await?;
    let wf = submit(&client, fleetmesh_integration::side_by_side::WORKFLOW.into())
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    wait_state(&client, &format!("{wf}.peeker"), JobState::Succeeded).await;
    wait_state(&client, &format!("{wf}.holder"), JobState::Succeeded).await;
    let logs = |job: &'static str| {
        let client = &client;
        let wf = wf.clone();
        async move { logs_of(client, &format!("{wf}.{job}")).await }
    };
    let (h, p) = (logs("holder").await?, logs("peeker").await?);
    println!("holder:\n{h}peeker:\n{p}");
    let (hu, pu) =
        fleetmesh_integration::side_by_side::check(&h, &p).map_err(anyhow::Error::msg)?;
    assert!((200000..=200009).contains(&hu) && (200000..=200009).contains(&pu), "{hu} {pu}");
    Ok(())
}
