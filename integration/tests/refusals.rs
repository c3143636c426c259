//! Nothing connects without a valid agent certificate from the mesh CA, and bad input is
//! refused with a named reason on both sides while the coordinator keeps serving.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleetmesh_agent::gpu::NoGpus;
use fleetmesh_agent::sampler::NodeSampler;
use fleetmesh_agent::session::{
    client_endpoint, run_session, AgentStats, ConnectOptions, SessionError,
};
use fleetmesh_coordinator::client::{ApiClient, ClientError};
use fleetmesh_coordinator::fleet::liveness::AgentState;
use fleetmesh_integration::{agents, wait_for, AgentProc, CoordinatorProc, Pki};
use fleetmesh_protocol::pki::IssueRequest;
use fleetmesh_protocol::tls::TlsIdentity;
use fleetmesh_protocol::{
    encode_frame, AgentMessage, Attributes, Hello, HostInfo, HostSample, PeerKind, PROTOCOL_VERSION,
};
use tokio::sync::watch;

fn sampler() -> NodeSampler {
    let info = HostInfo {
        hostname: "test".into(),
        os: "test".into(),
        kernel: "test".into(),
        agent_version: "test".into(),
        cpu_count: 1,
        memory_total_bytes: 1,
    };
    let sample = HostSample {
        cpu_utilization_percent: 0.0,
        load_1: 0.0,
        load_5: 0.0,
        load_15: 0.0,
        memory_total_bytes: 1,
        memory_used_bytes: 0,
        data_disk_total_bytes: None,
        data_disk_available_bytes: None,
        net_rx_bytes_per_s: 0,
        net_tx_bytes_per_s: 0,
        uptime_s: 0,
    };
    NodeSampler::with_fixed_host(Box::new(NoGpus), info, sample)
}

/// One in-process session attempt with `tls`; returns how it ended.
async fn attempt(
    addr: SocketAddr,
    tls: TlsIdentity,
    tweak: impl FnOnce(&mut ConnectOptions),
) -> Result<(), SessionError> {
    let mut opts = ConnectOptions::new(addr.to_string(), tls);
    tweak(&mut opts);
    let ep = client_endpoint(&opts, addr)?;
    let (_tx, mut rx) = watch::channel(false);
    let mut s = sampler();
    let stats = AgentStats::default();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        run_session(&ep, addr, "127.0.0.1", &opts, &mut s, &stats, &mut rx),
    )
    .await
    .expect("session attempt hung");
    r.map(|_| ())
}

async fn log_contains(coord: &CoordinatorProc, needle: &str) -> bool {
    wait_for(Duration::from_secs(3), || async { coord.log_text().contains(needle).then_some(()) })
        .await
        .is_some()
}

async fn setup() -> anyhow::Result<(Pki, tempfile::TempDir, CoordinatorProc, ApiClient)> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;
    Ok((pki, work, coord, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let (pki, work, coord, client) = setup().await?;
    // Same trust domain, same name pattern: only the CA differs.
    let rogue = Pki::new("mesh.test")?;
    let (cert, key) = rogue.issue(PeerKind::Agent, "intruder", Attributes::default())?;
    let a = AgentProc::start_with(&pki, coord.control, "intruder", &cert, &key, None, work.path())?;
    assert!(
        log_contains(&coord, "connection refused").await,
        "no refusal logged:\n{}",
        coord.log_text()
    );
    let log = coord.log_text();
    // The rogue CA has the same subject name, so rustls finds an "issuer" whose key did
    // not sign the certificate.
    assert!(
        log.contains("invalid peer certificate: BadSignature")
            || log.contains("invalid peer certificate: UnknownIssuer"),
        "refusal reason should say the certificate is not from the mesh CA:\n{log}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(agents(&client).await.is_empty(), "rogue agent appeared in the registry");
    assert!(
        wait_for(Duration::from_secs(3), || async {
            a.log_text().contains("session").then_some(())
        })
        .await
        .is_some(),
        "agent did not log its failure:\n{}",
        a.log_text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_agent_certificate_is_refused() -> anyhow::Result<()> {
    let (pki, work, coord, client) = setup().await?;
    let now = time::OffsetDateTime::now_utc();
    let mut req = IssueRequest::new(PeerKind::Agent, "stale", Duration::from_secs(1));
    req.validity = Some((now - time::Duration::days(2), now - time::Duration::days(1)));
    let (cert, key) = pki.issue_req(&req)?;
    // The coordinator refuses an expired certificate that is presented anyway.
    let tls = TlsIdentity::load(&pki.ca_pem(), &cert, &key)?;
    let err = attempt(coord.control, tls, |_| {}).await.expect_err("expired cert must be refused");
    eprintln!("agent side: {err}");
    assert!(log_contains(&coord, "connection refused").await);
    let log = coord.log_text();
    assert!(
        log.contains("invalid peer certificate: certificate expired"),
        "refusal reason should say the certificate expired:\n{log}"
    );
    // The agent binary notices by itself and says so instead of dialing in vain.
    let a = AgentProc::start_with(&pki, coord.control, "stale", &cert, &key, None, work.path())?;
    let said = wait_for(Duration::from_secs(5), || async {
        a.log_text().contains("pre-issued certificate has expired").then_some(())
    })
    .await;
    assert!(said.is_some(), "agent log:\n{}", a.log_text());
    assert!(agents(&client).await.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_coordinator_certificates_are_refused_on_the_agent_port() -> anyhow::Result<()>
{
    let (pki, _work, coord, client) = setup().await?;
    for (kind, name) in [(PeerKind::Operator, "harness"), (PeerKind::Coordinator, "main")] {
        let tls = pki.identity(kind, name)?;
        let err = attempt(coord.control, tls, |_| {}).await.expect_err("must be refused");
        let msg = err.to_string();
        assert!(
            msg.contains("requires an agent certificate"),
            "{kind}: agent-side error was {msg:?}"
        );
        assert!(msg.contains(&format!("{kind} certificate")), "{msg}");
        assert!(
            log_contains(&coord, &format!("presented a {kind} certificate")).await,
            "{}",
            coord.log_text()
        );
    }
    assert!(agents(&client).await.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_claiming_another_name_is_refused() -> anyhow::Result<()> {
    let (pki, _work, coord, client) = setup().await?;
    pki.issue(PeerKind::Agent, "honest", Attributes::default())?;
    let tls = pki.identity(PeerKind::Agent, "honest")?;
    let err = attempt(coord.control, tls, |o| o.claimed_name = "gpu-big".into())
        .await
        .expect_err("refused");
    let msg = err.to_string();
    assert!(matches!(err, SessionError::Rejected(_)), "{err:?}");
    assert!(msg.contains("claims the name \"gpu-big\"") && msg.contains("\"honest\""), "{msg}");
    assert!(log_contains(&coord, "claims the name").await);
    assert!(agents(&client).await.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_version_mismatch_names_both_versions_on_both_sides() -> anyhow::Result<()> {
    let (pki, _work, coord, client) = setup().await?;
    pki.issue(PeerKind::Agent, "future", Attributes::default())?;
    let tls = pki.identity(PeerKind::Agent, "future")?;
    let err = attempt(coord.control, tls, |o| o.protocol_version = 999).await.expect_err("refused");
    let expected = format!(
        "protocol version mismatch: agent speaks 999, coordinator speaks {PROTOCOL_VERSION}"
    );
    assert!(err.to_string().contains(&expected), "agent side: {err}");
    assert!(log_contains(&coord, &expected).await, "coordinator side:\n{}", coord.log_text());
    assert!(agents(&client).await.is_empty());
    Ok(())
}

/// Connect with a valid agent identity and return the raw connection and control stream.
async fn raw(
    addr: SocketAddr,
    tls: TlsIdentity,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let opts = ConnectOptions::new(addr.to_string(), tls);
    let ep = client_endpoint(&opts, addr)?;
    let conn = ep.connect(addr, "127.0.0.1")?.await?;
    let (send, recv) = conn.open_bi().await?;
    Ok((ep, conn, send, recv))
}

async fn expect_closed_for_size(conn: &quinn::Connection) {
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("connection not closed");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let text = String::from_utf8_lossy(&c.reason).to_string();
            assert_eq!(c.error_code, quinn::VarInt::from_u32(3), "{text}");
            assert!(text.contains("exceeds the limit"), "close reason: {text}");
        }
        other => panic!("unexpected close: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_close_the_connection_and_the_coordinator_keeps_serving(
) -> anyhow::Result<()> {
    let (pki, work, coord, client) = setup().await?;
    pki.issue(PeerKind::Agent, "noisy", Attributes::default())?;

    // Before hello: a header announcing 4 GiB, and no payload at all.
    let (_ep, conn, mut send, _recv) =
        raw(coord.control, pki.identity(PeerKind::Agent, "noisy")?).await?;
    send.write_all(&u32::MAX.to_be_bytes()).await?;
    expect_closed_for_size(&conn).await;

    // After a valid hello, on an established session.
    let (_ep2, conn, mut send, mut recv) =
        raw(coord.control, pki.identity(PeerKind::Agent, "noisy")?).await?;
    let hello = AgentMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_name: "noisy".into(),
        software_version: "test".into(),
    });
    send.write_all(&encode_frame(&hello)?).await?;
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await?;
    let mut welcome = vec![0u8; u32::from_be_bytes(header) as usize];
    recv.read_exact(&mut welcome).await?;
    send.write_all(&(2u32 * 1024 * 1024).to_be_bytes()).await?;
    expect_closed_for_size(&conn).await;
    assert!(log_contains(&coord, "exceeds the limit").await);

    // Still serving: a well-behaved agent joins.
    let _good = AgentProc::start(
        &pki,
        coord.control,
        "good",
        Default::default(),
        Some("1xH100"),
        work.path(),
    )?;
    let ok = wait_for(Duration::from_secs(5), || async {
        agents(&client)
            .await
            .iter()
            .any(|a| a.name == "good" && a.state == AgentState::Connected)
            .then_some(())
    })
    .await;
    assert!(ok.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_identity_replaces_the_old_session() -> anyhow::Result<()> {
    let (pki, _work, coord, client) = setup().await?;
    pki.issue(PeerKind::Agent, "twin", Attributes::default())?;
    let addr = coord.control;
    let t1 = pki.identity(PeerKind::Agent, "twin")?;
    let first = tokio::spawn(async move { attempt(addr, t1, |_| {}).await });
    wait_for(Duration::from_secs(5), || async {
        (agents(&client).await.first()?.state == AgentState::Connected).then_some(())
    })
    .await
    .expect("first session up");
    let started = Instant::now();
    let t2 = pki.identity(PeerKind::Agent, "twin")?;
    let second = tokio::spawn(async move { attempt(addr, t2, |_| {}).await });
    let first_end = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("old session not closed")?;
    let err = first_end.expect_err("old session must end");
    assert!(err.to_string().contains("replaced by a newer session"), "{err}");
    eprintln!("old session closed {:?} after the new one connected", started.elapsed());
    // The new session keeps reporting; one registry entry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let list = agents(&client).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].state, AgentState::Connected);
    assert!(!second.is_finished(), "new session ended: {:?}", second.await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_an_operator_certificate_from_the_mesh_ca() -> anyhow::Result<()> {
    let (pki, _work, coord, _client) = setup().await?;
    let url = format!("https://127.0.0.1:{}", coord.api.port());
    pki.issue(PeerKind::Agent, "sneaky", Attributes::default())?;
    let as_agent = ApiClient::new(&url, &pki.identity(PeerKind::Agent, "sneaky")?)?;
    match as_agent
        .get_json::<Vec<fleetmesh_coordinator::fleet::views::AgentView>>("/api/v1/agents")
        .await
    {
        Err(ClientError::Api { status: 403, message }) => {
            assert!(message.contains("operator certificate"), "{message}")
        }
        other => panic!("agent cert on the API: {other:?}"),
    }
    // An operator certificate from another CA does not get through TLS.
    let rogue = Pki::new("mesh.test")?;
    let (cert, key) = rogue.issue(PeerKind::Operator, "mallory", Attributes::default())?;
    let tls = TlsIdentity::load(&pki.ca_pem(), &cert, &key)?;
    let r = ApiClient::new(&url, &tls)?
        .get_json::<Vec<fleetmesh_coordinator::fleet::views::AgentView>>("/api/v1/agents")
        .await;
    assert!(r.is_err(), "rogue operator got an answer: {r:?}");
    Ok(())
}
