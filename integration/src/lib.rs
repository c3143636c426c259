//! Cluster harness for integration tests and benchmarks: a per-test CA made with rcgen,
//! real `fleetmesh-coordinator` / `fleetmesh-agent` processes on loopback, and an
//! operator API client. Every child process is killed when its handle is dropped.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fleetmesh_coordinator::client::ApiClient;
use fleetmesh_coordinator::fleet::views::AgentView;
use fleetmesh_protocol::pki::{Ca, IssueRequest};
use fleetmesh_protocol::tls::TlsIdentity;
use fleetmesh_protocol::{Attributes, PeerKind};

/// Path of a workspace binary next to the running test/bench executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace binaries first (`cargo build --workspace --bins`; scripts/test.sh does this)",
        p.display()
    );
    p
}

/// A free loopback UDP port (best effort: released before use).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("udp port")
}

/// A free loopback TCP port (best effort: released before use).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("tcp port")
}

/// A throwaway PKI in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new(trust_domain: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::init_dir(dir.path(), trust_domain)?;
        Ok(Self { dir, ca })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.path().join("ca.pem")
    }

    /// Issue `<kind>-<name>.pem/.key` (coordinators get localhost/127.0.0.1 SANs).
    pub fn issue(
        &self,
        kind: PeerKind,
        name: &str,
        attrs: Attributes,
    ) -> Result<(PathBuf, PathBuf)> {
        let mut req = IssueRequest::new(kind, name, Duration::from_secs(24 * 3600));
        req.attributes = attrs;
        if kind == PeerKind::Coordinator {
            req.dns_names = vec!["localhost".into()];
            req.ips = vec![[127, 0, 0, 1].into()];
        }
        Ok(self.ca.issue_to_dir(self.path(), &req)?)
    }

    /// Issue with an explicit request (e.g. an expired validity window).
    pub fn issue_req(&self, req: &IssueRequest) -> Result<(PathBuf, PathBuf)> {
        Ok(self.ca.issue_to_dir(self.path(), req)?)
    }

    /// TLS identity for `<kind>-<name>` trusting this CA.
    pub fn identity(&self, kind: PeerKind, name: &str) -> Result<TlsIdentity> {
        let base = self.path().join(format!("{kind}-{name}"));
        Ok(TlsIdentity::load(
            &self.ca_pem(),
            &base.with_extension("pem"),
            &base.with_extension("key"),
        )?)
    }
}

/// Log level for child processes.
const CHILD_LOG: &str = "info,quinn=warn,rustls=warn";

/// Start a workspace binary with `args`, appending its stderr (logs) to `log`.
fn spawn_logged(name: &str, args: &[String], log: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    Command::new(bin(name))
        .args(args)
        .env("RUST_LOG", CHILD_LOG)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawning {name}"))
}

/// A coordinator process.
pub struct CoordinatorProc {
    child: Option<Child>,
    pub control: SocketAddr,
    pub api: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    restarts: u32,
}

impl CoordinatorProc {
    /// Issue a coordinator cert (if missing), start on fresh ports, wait until the API answers.
    pub async fn start(pki: &Pki, data_dir: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_listening(pki, data_dir, [127, 0, 0, 1].into(), extra).await
    }

    /// Like [`CoordinatorProc::start`], with the control endpoint bound to `listen_ip`
    /// (e.g. 0.0.0.0 so agents in a test network namespace reach it too); `control`
    /// stays the loopback address.
    pub async fn start_listening(
        pki: &Pki,
        data_dir: &Path,
        listen_ip: std::net::IpAddr,
        extra: &[&str],
    ) -> Result<Self> {
        if !pki.path().join("coordinator-main.pem").exists() {
            pki.issue(PeerKind::Coordinator, "main", Attributes::default())?;
            pki.issue(PeerKind::Operator, "harness", Attributes::default())?;
        }
        let control: SocketAddr = ([127, 0, 0, 1], free_udp_port()).into();
        let api: SocketAddr = ([127, 0, 0, 1], free_tcp_port()).into();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            SocketAddr::new(listen_ip, control.port()).to_string(),
            "--api-listen".into(),
            api.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--ca".into(),
            pki.ca_pem().display().to_string(),
            "--cert".into(),
            pki.path().join("coordinator-main.pem").display().to_string(),
            "--key".into(),
            pki.path().join("coordinator-main.key").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut me = Self {
            child: None,
            control,
            api,
            data_dir: data_dir.to_path_buf(),
            log: data_dir.with_extension("coordinator.log"),
            args,
            restarts: 0,
        };
        me.spawn()?;
        me.wait_ready(pki).await?;
        Ok(me)
    }

    fn spawn(&mut self) -> Result<()> {
        self.child = Some(spawn_logged("fleetmesh-coordinator", &self.args, &self.log)?);
        Ok(())
    }

    async fn wait_ready(&mut self, pki: &Pki) -> Result<()> {
        let client = self.client(pki)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("coordinator exited with {status}; log:\n{}", self.log_text());
                }
            }
            if client.get_text("/healthz").await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("coordinator API not ready; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Operator API client.
    pub fn client(&self, pki: &Pki) -> Result<ApiClient> {
        let tls = pki.identity(PeerKind::Operator, "harness")?;
        Ok(ApiClient::new(&format!("https://127.0.0.1:{}", self.api.port()), &tls)?)
    }

    /// The `fleetmesh` CLI with `args`, pointed at this coordinator as the harness operator.
    pub fn cli_command(&self, pki: &Pki, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(bin("fleetmesh"));
        c.args(args)
            .arg("--api")
            .arg(format!("https://127.0.0.1:{}", self.api.port()))
            .arg("--ca")
            .arg(pki.ca_pem())
            .arg("--cert")
            .arg(pki.path().join("operator-harness.pem"))
            .arg("--key")
            .arg(pki.path().join("operator-harness.key"));
        c
    }

    /// Run the `fleetmesh` CLI to completion.
    pub async fn cli(&self, pki: &Pki, args: &[&str]) -> Result<std::process::Output> {
        Ok(self.cli_command(pki, args).output().await?)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again with the same ports and data dir.
    pub async fn restart(&mut self, pki: &Pki) -> Result<()> {
        self.kill9();
        self.restarts += 1;
        self.spawn()?;
        self.wait_ready(pki).await
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An agent process.
pub struct AgentProc {
    child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
    args: Vec<String>,
    /// Started through `ip netns exec` (`args` are then `ip`'s).
    in_netns: bool,
}

impl AgentProc {
    /// Start `fleetmesh-agent` with the given cert/key and simulated GPUs.
    pub fn start_with(
        pki: &Pki,
        coordinator: SocketAddr,
        name: &str,
        cert: &Path,
        key: &Path,
        simulate: Option<&str>,
        work: &Path,
    ) -> Result<Self> {
        let args = agent_args(pki, coordinator, name, cert, key, simulate, work)?;
        Self::launch(name, with_extra(args, &[]), work, false)
    }

    fn launch(name: &str, args: Vec<String>, work: &Path, in_netns: bool) -> Result<Self> {
        let log = work.join(format!("agent-{name}.log"));
        let mut me = Self { child: None, name: name.into(), log, args, in_netns };
        me.spawn()?;
        Ok(me)
    }

    /// Issue an agent cert (if missing) and start it with extra flags (price, spot, labels).
    pub fn start_extra(
        pki: &Pki,
        coordinator: SocketAddr,
        name: &str,
        attrs: Attributes,
        simulate: Option<&str>,
        extra: &[&str],
        work: &Path,
    ) -> Result<Self> {
        let base = agent_cert(pki, name, attrs)?;
        let (cert, key) = (base.with_extension("pem"), base.with_extension("key"));
        let args = agent_args(pki, coordinator, name, &cert, &key, simulate, work)?;
        Self::launch(name, with_extra(args, extra), work, false)
    }

    /// Issue an agent cert (if missing) and start it.
    pub fn start(
        pki: &Pki,
        coordinator: SocketAddr,
        name: &str,
        attrs: Attributes,
        simulate: Option<&str>,
        work: &Path,
    ) -> Result<Self> {
        let base = agent_cert(pki, name, attrs)?;
        Self::start_with(
            pki,
            coordinator,
            name,
            &base.with_extension("pem"),
            &base.with_extension("key"),
            simulate,
            work,
        )
    }

    /// Start inside network namespace `netns` (`ip netns exec`), dialling `coordinator`.
    #[allow(clippy::too_many_arguments)]
    pub fn start_in_netns(
        pki: &Pki,
        netns: &str,
        coordinator: SocketAddr,
        name: &str,
        attrs: Attributes,
        simulate: Option<&str>,
        extra: &[&str],
        work: &Path,
    ) -> Result<Self> {
        let base = agent_cert(pki, name, attrs)?;
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            netns.into(),
            bin("fleetmesh-agent").display().to_string(),
        ];
        let (cert, key) = (base.with_extension("pem"), base.with_extension("key"));
        let agent = agent_args(pki, coordinator, name, &cert, &key, simulate, work)?;
        args.extend(with_extra(agent, extra));
        Self::launch(name, args, work, true)
    }

    /// Start with explicit arguments (e.g. `--join`); `--reconnect-max 1s` and
    /// `--container-runtime none` (as for every harness agent) are added.
    pub fn start_args(name: &str, mut args: Vec<String>, work: &Path) -> Result<Self> {
        args.extend(["--reconnect-max", "1s"].map(String::from));
        Self::launch(name, with_extra(args, &[]), work, false)
    }

    /// Exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn spawn(&mut self) -> Result<()> {
        self.child = Some(if self.in_netns {
            // `ip netns exec` execs the agent, so the child's pid is the agent's.
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
            Command::new("ip")
                .args(&self.args)
                .env("RUST_LOG", CHILD_LOG)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("spawning ip netns exec")?
        } else {
            spawn_logged("fleetmesh-agent", &self.args, &self.log)?
        });
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit (up to 10 s). Returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
        self.kill_attempts();
    }
}

impl AgentProc {
    /// The agent's data dir (from its `--data-dir` argument).
    pub fn data_dir(&self) -> Option<PathBuf> {
        let i = self.args.iter().position(|a| a == "--data-dir")?;
        self.args.get(i + 1).map(PathBuf::from)
    }

    /// Kill every attempt this agent's supervisors still run: attempts outlive a killed
    /// agent by design, but not the test that started them.
    pub fn kill_attempts(&self) {
        let Some(work) = self.data_dir().map(|d| d.join("work")) else { return };
        for job in std::fs::read_dir(work).into_iter().flatten().flatten() {
            for at in std::fs::read_dir(job.path()).into_iter().flatten().flatten() {
                if let Some(pid) = fleetmesh_agent::shim::lock_holder(&at.path()) {
                    fleetmesh_agent::shim::signal_group(pid, "KILL");
                }
            }
        }
    }
}

/// Poll `f` every 50 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Agents as the API lists them (empty on error).
pub async fn agents(client: &ApiClient) -> Vec<AgentView> {
    client.get_json("/api/v1/agents").await.unwrap_or_default()
}

/// Attributes helper.
pub fn attrs(region: &str, jurisdiction: &str, provider: &str) -> Attributes {
    Attributes {
        region: Some(region.into()),
        jurisdiction: Some(jurisdiction.into()),
        provider: Some(provider.into()),
        ..Default::default()
    }
}

/// Issue `agent-<name>.pem/.key` unless present; returns the path without extension.
fn agent_cert(pki: &Pki, name: &str, attrs: Attributes) -> Result<PathBuf> {
    let base = pki.path().join(format!("agent-{name}"));
    if !base.with_extension("pem").exists() {
        pki.issue(PeerKind::Agent, name, attrs)?;
    }
    Ok(base)
}

/// `fleetmesh-agent` flags for a test agent with its data dir under `work`.
fn agent_args(
    pki: &Pki,
    coordinator: SocketAddr,
    name: &str,
    cert: &Path,
    key: &Path,
    simulate: Option<&str>,
    work: &Path,
) -> Result<Vec<String>> {
    let data_dir = work.join(format!("agent-{name}"));
    std::fs::create_dir_all(&data_dir)?;
    let mut args: Vec<String> = vec![
        "--coordinator".into(),
        coordinator.to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--ca".into(),
        pki.ca_pem().display().to_string(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        "--reconnect-max".into(),
        "1s".into(),
    ];
    if let Some(s) = simulate {
        args.extend(["--simulate-gpus".to_string(), s.to_string()]);
    }
    Ok(args)
}

/// `args` plus the harness's defaults that `extra` does not set, then `extra`.
/// Tests choose their container runtime explicitly: what happens to be installed on the
/// machine must not change which nodes bid for image jobs.
fn with_extra(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    if !extra.contains(&"--container-runtime") {
        args.extend(["--container-runtime", "none"].map(String::from));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A network namespace joined to the root namespace by a veth pair, for partition
/// tests: root side `10.213.<n>.1/30`, namespace side `10.213.<n>.2/30`. Removed (with
/// its veth pair) on drop, whatever the test's outcome.
pub struct Netns {
    pub name: String,
    /// The root-namespace end of the veth pair (set it down to partition).
    pub veth: String,
    pub root_ip: std::net::Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Netns {
    /// Create it; `Err` when namespaces cannot be made here (not root): callers skip.
    pub fn create() -> Result<Self> {
        let n = (std::process::id() % 250) as u8 + 1;
        let name = format!("fmtest{}", std::process::id());
        let veth = format!("fmv{}", std::process::id());
        let peer = format!("{veth}p");
        let root_ip = std::net::Ipv4Addr::new(10, 213, n, 1);
        ip(&["netns", "add", &name])?;
        let me = Self { name: name.clone(), veth: veth.clone(), root_ip };
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &name])?;
        ip(&["addr", "add", &format!("{root_ip}/30"), "dev", &veth])?;
        ip(&["link", "set", &veth, "up"])?;
        let ns_ip = format!("10.213.{n}.2/30");
        ip(&["netns", "exec", &name, "ip", "addr", "add", &ns_ip, "dev", &peer])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", &peer, "up"])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        Ok(me)
    }

    /// Cut (`false`) or restore (`true`) the link.
    pub fn set_link(&self, up: bool) -> Result<()> {
        ip(&["link", "set", &self.veth, if up { "up" } else { "down" }])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Two attempts running side by side: `holder` keeps a secret in its dir while `peeker`
/// tries to read it, through the path and through the holder's `/proc` entry. Each prints
/// its uid (`id -u`) first.
pub mod side_by_side {
    pub const WORKFLOW: &str = "name: side\njobs:\n  holder:\n    resources: { cpus: 0.1 }\n    script: |\n      id -u\n      echo holder-secret > mine.txt\n      sleep 4\n  peeker:\n    resources: { cpus: 0.1 }\n    script: |\n      id -u\n      sleep 1.5\n      W=$FLEETMESH_WORK_DIR; J=$(basename $(dirname $W))\n      cat $(dirname $(dirname $W))/${J%.peeker}.holder/1/mine.txt 2>&1 || true\n      for p in /proc/[0-9]*; do cat $p/cwd/mine.txt 2>/dev/null; done\n      echo peeked\n";

    /// The uids the two ran as, after checking that they differ and that the peeker was
    /// refused and saw nothing.
    pub fn check(holder_log: &str, peeker_log: &str) -> Result<(u32, u32), String> {
        let uid = |t: &str| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok());
        let (Some(h), Some(p)) = (uid(holder_log), uid(peeker_log)) else {
            return Err(format!("no uid printed:\n{holder_log}\n{peeker_log}"));
        };
        if h == p {
            return Err(format!("side-by-side attempts shared uid {h}"));
        }
        if peeker_log.contains("holder-secret") {
            return Err(format!("the peeker read a running attempt's dir: {peeker_log}"));
        }
        if !(peeker_log.contains("Permission denied") && peeker_log.contains("peeked")) {
            return Err(format!("the peeker was not refused: {peeker_log}"));
        }
        Ok((h, p))
    }
}

/// Workflows and jobs through the API, read as the API's own types.
pub mod work {
    use std::time::Duration;

    use fleetmesh_api::client::segment;
    pub use fleetmesh_api::data::DatasetRecord;
    pub use fleetmesh_api::jobs::{
        AttemptState, JobPage, JobRecord, JobState, JobSummary, LogChunk, WorkflowState,
        WorkflowSummary,
    };
    use fleetmesh_coordinator::client::ApiClient;

    /// Every job a listing names (`workflow=W`, `array=J`, or "" for all top-level jobs),
    /// page by page; `None` when the coordinator does not answer.
    pub async fn jobs(client: &ApiClient, filter: &str) -> Option<Vec<JobSummary>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let cursor = after.as_ref().map(|a| format!("&after={}", segment(a)));
            let path = format!("/api/v1/jobs?{filter}{}", cursor.unwrap_or_default());
            let page: JobPage = client.get_json(&path).await.ok()?;
            out.extend(page.jobs);
            match page.next {
                Some(n) => after = Some(n),
                None => return Some(out),
            }
        }
    }

    /// Submit a workflow file; the workflow's id.
    pub async fn submit(client: &ApiClient, yaml: &str) -> anyhow::Result<String> {
        let r: fleetmesh_api::answers::Submitted =
            client.post_raw("/api/v1/workflows", yaml.as_bytes().to_vec()).await?;
        Ok(r.id)
    }

    /// A job's record, if the coordinator answers.
    pub async fn job(client: &ApiClient, id: &str) -> Option<JobRecord> {
        client.get_json(&format!("/api/v1/jobs/{}", segment(id))).await.ok()
    }

    /// Wait until `id` is in `state`; its record then. Panics with the last record seen.
    pub async fn wait_job(
        client: &ApiClient,
        id: &str,
        state: JobState,
        within: Duration,
    ) -> JobRecord {
        let j = crate::wait_for(within, || async {
            job(client, id).await.filter(|j| j.state == state)
        })
        .await;
        match j {
            Some(j) => j,
            None => panic!("job {id} never reached {state:?}: {:#?}", job(client, id).await),
        }
    }

    /// A job's kept output.
    pub async fn logs(client: &ApiClient, id: &str) -> String {
        let c: Option<LogChunk> =
            client.get_json(&format!("/api/v1/jobs/{}/logs", segment(id))).await.ok();
        c.map(|c| c.data).unwrap_or_default()
    }

    /// The state of workflow `id`, once it finished (`None` while it runs or is unknown).
    pub async fn finished(client: &ApiClient, id: &str) -> Option<WorkflowState> {
        let wfs: Vec<WorkflowSummary> = client.get_json("/api/v1/workflows").await.ok()?;
        wfs.into_iter()
            .find(|w| w.id == id)
            .map(|w| w.state)
            .filter(|s| *s != WorkflowState::Running)
    }

    /// A dataset's record (id, `NAME@VERSION` or name).
    pub async fn dataset(client: &ApiClient, r: &str) -> Option<DatasetRecord> {
        client.get_json(&format!("/api/v1/data/{r}")).await.ok()
    }
}
