//! Zero-touch enrollment: join tokens, short-lived certificates, renewal, revocation.
//! Real coordinator and agent processes (plus in-process enrollment calls where the test
//! needs to forge a request), per-test CA, loopback only.

use std::time::{Duration, Instant};

use fleetmesh_agent::enroll::{enroll, EnrollFailure};
use fleetmesh_api::answers::Revoked;
use fleetmesh_api::trust::{AuditRecord, TokenCreated, TokenView};
use fleetmesh_coordinator::client::ApiClient;
use fleetmesh_coordinator::fleet::liveness::AgentState;
use fleetmesh_integration::{agents, wait_for, AgentProc, CoordinatorProc, Pki};
use fleetmesh_protocol::enroll::{generate_key_pem, JoinString};
use fleetmesh_protocol::{Attributes, PeerKind};
use serde_json::{json, Value};

async fn coordinator(
    pki: &Pki,
    work: &std::path::Path,
    cert_ttl: &str,
) -> anyhow::Result<CoordinatorProc> {
    let key = pki.path().join("ca.key").display().to_string();
    CoordinatorProc::start(pki, &work.join("coord"), &["--ca-key", &key, "--cert-ttl", cert_ttl])
        .await
}

async fn token(client: &ApiClient, spec: Value) -> anyhow::Result<JoinString> {
    let created: TokenCreated = client.post_json("/api/v1/tokens", &spec).await?;
    Ok(created.join.parse()?)
}

async fn audit_events(client: &ApiClient, event: &str) -> usize {
    let log: Vec<AuditRecord> = client.get_json("/api/v1/audit").await.unwrap_or_default();
    log.iter().filter(|a| a.event == event).count()
}

fn join_agent(name: &str, join: &JoinString, work: &std::path::Path) -> anyhow::Result<AgentProc> {
    let data = work.join(format!("agent-{name}"));
    AgentProc::start_args(
        name,
        vec![
            "--join".into(),
            join.to_string(),
            "--name".into(),
            name.into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--simulate-gpus".into(),
            "1xH100-80GB".into(),
        ],
        work,
    )
}

async fn state_of(client: &ApiClient, name: &str) -> Option<AgentState> {
    agents(client).await.into_iter().find(|a| a.name == name).map(|a| a.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_string_alone_enrolls_with_token_attributes_and_survives_restarts(
) -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let mut coord = coordinator(&pki, work.path(), "1h").await?;
    let client = coord.client(&pki)?;
    let join = token(
        &client,
        json!({"region": "eu-west-1", "jurisdiction": "EU", "provider": "hetzner", "uses": 1}),
    )
    .await?;

    let mut a = join_agent("worker-1", &join, work.path())?;
    let up = wait_for(Duration::from_secs(10), || async {
        agents(&client)
            .await
            .into_iter()
            .find(|a| a.name == "worker-1" && a.state == AgentState::Connected)
    })
    .await
    .unwrap_or_else(|| panic!("agent did not enroll; agent log:\n{}", a.log_text()));
    assert_eq!(up.region.as_deref(), Some("eu-west-1"));
    assert_eq!(up.jurisdiction.as_deref(), Some("EU"));
    assert_eq!(up.provider.as_deref(), Some("hetzner"));
    assert_eq!(up.spiffe_id, "spiffe://mesh.test/agent/worker-1");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = work.path().join("agent-worker-1/identity/agent.key");
        assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
    }

    // Agent restart: the token has no uses left, so this only works with the stored cert.
    a.kill9();
    // What the restarted process logs comes after this point (the killed one may have
    // been connected on the coordinator's side before it logged its own session).
    let before = a.log_text().len();
    a.spawn()?;
    // The coordinator may still show the killed process's session as connected: wait for
    // the new process to have used its stored certificate, then for its session.
    wait_for(Duration::from_secs(10), || async {
        a.log_text().contains("using the stored certificate").then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!("restarted agent did not use its stored certificate:\n{}", a.log_text())
    });
    wait_for(Duration::from_secs(10), || async {
        let s = state_of(&client, "worker-1").await?;
        let restarted = a.log_text().get(before..).unwrap_or_default().to_string();
        (s == AgentState::Connected && restarted.contains("session established")).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("agent did not come back after restart:\n{}", a.log_text()));

    // Coordinator restart (kill -9): the agent reconnects by itself.
    coord.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    coord.restart(&pki).await?;
    let back = wait_for(Duration::from_secs(10), || async {
        (state_of(&client, "worker-1").await? == AgentState::Connected).then_some(())
    })
    .await;
    assert!(back.is_some(), "agent did not reconnect after coordinator restart");
    assert_eq!(
        audit_events(&client, "enrolled").await,
        1,
        "the token must have been used exactly once"
    );
    let tokens: Vec<TokenView> = client.get_json("/api/v1/tokens").await?;
    assert_eq!(tokens[0].uses, 1);
    assert_eq!(tokens[0].status, "used");
    assert!(
        !serde_json::to_string(&tokens)?.contains(&join.secret),
        "token secret leaked by the API"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_wrong_ca_are_refused_with_clear_messages() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = coordinator(&pki, work.path(), "1h").await?;
    let client = coord.client(&pki)?;
    let key = generate_key_pem()?;
    let none = Attributes::default();
    let refused = |r: Result<_, EnrollFailure>| match r {
        Err(EnrollFailure::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };

    let expired = token(&client, json!({"ttl": "1s"})).await?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let why = refused(enroll(&expired, &key, "n1", &none).await);
    assert!(why.contains("has expired"), "{why}");

    let once = token(&client, json!({"uses": 1})).await?;
    enroll(&once, &key, "n2", &none).await?;
    let why = refused(enroll(&once, &key, "n3", &none).await);
    assert!(why.contains("has no uses left"), "{why}");

    let revoked = token(&client, json!({})).await?;
    let _: serde::de::IgnoredAny = client
        .post_json(&format!("/api/v1/tokens/{}/revoke", revoked.token_id), &json!({}))
        .await?;
    let why = refused(enroll(&revoked, &key, "n4", &none).await);
    assert!(why.contains("has been revoked"), "{why}");

    let mut wrong = token(&client, json!({})).await?;
    wrong.secret = "0".repeat(32);
    let why = refused(enroll(&wrong, &key, "n5", &none).await);
    assert!(why.contains("wrong secret"), "{why}");

    // A join string pinning another CA: the agent refuses the coordinator before sending
    // the token.
    let other = Pki::new("mesh.test")?;
    let mut pinned_elsewhere = token(&client, json!({})).await?;
    pinned_elsewhere.ca_fingerprint = other.ca.fingerprint();
    match enroll(&pinned_elsewhere, &key, "n6", &none).await {
        Err(EnrollFailure::CaMismatch(msg)) => assert!(msg.contains("fingerprint"), "{msg}"),
        other => panic!("expected a CA mismatch, got {other:?}"),
    }

    // The coordinator logged each refusal with its reason.
    let log = coord.log_text();
    for reason in ["has expired", "has no uses left", "has been revoked", "wrong secret"] {
        assert!(
            log.lines().any(|l| l.contains("enrollment refused") && l.contains(reason)),
            "no logged refusal for {reason:?}:\n{log}"
        );
    }

    // The agent binary itself: a refused token ends it with a clear message, exit code 2.
    let mut a = join_agent("n7", &wrong, work.path())?;
    let status = wait_for(Duration::from_secs(10), || {
        let st = a.exited();
        async move { st }
    })
    .await
    .expect("agent with a bad token must exit");
    assert_eq!(status.code(), Some(2));
    assert!(
        a.log_text().contains("enrollment refused by the coordinator: wrong secret"),
        "{}",
        a.log_text()
    );
    assert!(agents(&client).await.iter().all(|x| x.name != "n7"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_claims_of_name_and_region_are_replaced_by_the_tokens() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = coordinator(&pki, work.path(), "1h").await?;
    let client = coord.client(&pki)?;
    let join =
        token(&client, json!({"name": "granted-7", "region": "eu-west-1", "jurisdiction": "EU", "labels": {"tier": "gold"}}))
            .await?;
    let key = generate_key_pem()?;
    let wish = Attributes {
        region: Some("us-east-1".into()),
        jurisdiction: Some("US".into()),
        provider: Some("evil".into()),
        labels: [("tier".to_string(), "free".to_string())].into(),
    };
    let got = enroll(&join, &key, "someone-else", &wish).await?;
    assert_eq!(got.name, "granted-7");
    let p = std::path::Path::new("x");
    let id = fleetmesh_protocol::tls::TlsIdentity::from_pem(
        p,
        got.ca_pem.as_bytes(),
        p,
        got.cert_pem.as_bytes(),
        p,
        key.as_bytes(),
    )?;
    assert_eq!(id.identity.name, "granted-7");
    assert_eq!(id.identity.kind, PeerKind::Agent);
    assert_eq!(id.identity.attributes.region.as_deref(), Some("eu-west-1"));
    assert_eq!(id.identity.attributes.jurisdiction.as_deref(), Some("EU"));
    assert_eq!(id.identity.attributes.provider, None);
    // Labels are granted by the token too, not claimed.
    assert_eq!(id.identity.attributes.labels.get("tier").map(String::as_str), Some("gold"));
    // Short-lived by default (24 h), not years.
    assert!(id.identity.not_after_unix - id.identity.not_before_unix <= 24 * 3600);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_are_renewed_without_dropping_the_session() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = coordinator(&pki, work.path(), "3s").await?;
    let client = coord.client(&pki)?;
    let join = token(&client, json!({})).await?;
    let a = join_agent("renewer", &join, work.path())?;
    wait_for(Duration::from_secs(10), || async {
        (state_of(&client, "renewer").await? == AgentState::Connected).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("not enrolled:\n{}", a.log_text()));
    // Watch for 10 s (more than three lifetimes): always connected, several renewals.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            state_of(&client, "renewer").await,
            Some(AgentState::Connected),
            "session dropped:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let renewals = audit_events(&client, "renewed").await;
    assert!(
        renewals >= 3,
        "only {renewals} renewals in 10 s with a 3 s lifetime:\n{}",
        a.log_text()
    );
    assert_eq!(
        a.log_text().matches("session established").count(),
        1,
        "the agent reconnected:\n{}",
        a.log_text()
    );
    assert!(a.log_text().matches("certificate renewed").count() >= 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_is_cut_off_within_1s_and_cannot_reconnect() -> anyhow::Result<()> {
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = coordinator(&pki, work.path(), "1h").await?;
    let client = coord.client(&pki)?;
    let join = token(&client, json!({})).await?;
    let a = join_agent("doomed", &join, work.path())?;
    wait_for(Duration::from_secs(10), || async {
        (state_of(&client, "doomed").await? == AgentState::Connected).then_some(())
    })
    .await
    .expect("enrolled");

    let t0 = Instant::now();
    let _: Revoked =
        client.post_json("/api/v1/agents/doomed/revoke", &json!({"reason": "compromised"})).await?;
    let cut = wait_for(Duration::from_secs(3), || async {
        a.log_text()
            .contains("coordinator refused the session: certificate revoked")
            .then(|| t0.elapsed())
    })
    .await
    .unwrap_or_else(|| panic!("agent not disconnected:\n{}", a.log_text()));
    eprintln!("agent saw its session closed {cut:?} after the revoke call");
    assert!(cut < Duration::from_secs(1), "{cut:?}");
    assert_eq!(state_of(&client, "doomed").await, Some(AgentState::Revoked));

    // It keeps trying and is refused every time; it never gets a session again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(coord.log_text().contains("certificate of spiffe://mesh.test/agent/doomed is revoked"));
    assert_eq!(a.log_text().matches("session established").count(), 1);
    assert_eq!(state_of(&client, "doomed").await, Some(AgentState::Revoked));
    assert!(audit_events(&client, "agent-revoked").await == 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_replaced_by_re_enrolling_with_the_join_string() -> anyhow::Result<()>
{
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = coordinator(&pki, work.path(), "2s").await?;
    let client = coord.client(&pki)?;
    let join = token(&client, json!({"uses": 2})).await?;
    let mut a = join_agent("phoenix", &join, work.path())?;
    wait_for(Duration::from_secs(10), || async {
        (state_of(&client, "phoenix").await? == AgentState::Connected).then_some(())
    })
    .await
    .expect("enrolled");
    // Down for longer than the certificate lives: no renewal possible meanwhile.
    a.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    a.spawn()?;
    let again = wait_for(Duration::from_secs(10), || async {
        (a.log_text().contains("re-enrolling")
            && state_of(&client, "phoenix").await? == AgentState::Connected)
            .then_some(())
    })
    .await;
    assert!(again.is_some(), "agent did not re-enroll:\n{}", a.log_text());
    assert_eq!(audit_events(&client, "enrolled").await, 2);
    Ok(())
}
