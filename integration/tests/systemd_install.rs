//! `scripts/install-agent.sh` into a real systemd: a Debian tree (built by scripts/test.sh
//! with debootstrap) booted with `systemd-nspawn`, sharing the host's network so the
//! installed agent reaches a coordinator on loopback. A host job and an image job run
//! through the installed agent: the unit's sandbox (ProtectSystem=strict, ProtectHome,
//! NoNewPrivileges) is the agent's own, and jobs run in transient units of their own as
//! the unprivileged job user, where the host and a rootful runtime actually work.
//! Attempts running side by side run as different accounts of the installer's pool.
//!
//! The container runtime in the tree is SIMULATED (a docker-compatible script that, like
//! rootful podman, writes under /var/lib/containers and /run and runs the command as the
//! `--user` it is given): there is no registry here and nested containers under nspawn
//! would test nspawn, not the agent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetmesh_integration::work::{self, JobRecord, JobState};
use fleetmesh_integration::{attrs, bin, wait_for, CoordinatorProc, Pki};
use fleetmesh_protocol::PeerKind;

/// Where scripts/test.sh keeps the booted tree (debootstrap takes ~50 s; it is reused).
const ROOTFS: &str = "/var/cache/fleetmesh-test/rootfs";
/// Where the test's files appear inside the container.
const INSIDE: &str = "/opt/fm";
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The SIMULATED docker-compatible runtime installed in the tree.
const FAKE_RUNTIME: &str = r#"#!/bin/sh
# SIMULATED container runtime (tests only): like a rootful runtime, every command writes
# under /var/lib/containers (and `run` under /run too), which fails inside the agent's
# sandbox; `run` then runs the command in the -v source as --user.
case "$1" in
  info|stop|rm) mkdir -p /var/lib/containers/fake && touch "/var/lib/containers/fake/.$1" || exit 3; exit 0 ;;
  run) shift ;;
  *) echo "fake runtime: unsupported $1" >&2; exit 2 ;;
esac
src=/ user= name=x
while [ $# -gt 0 ]; do
  case "$1" in
    --rm) shift ;;
    -v) src=${2%%:*}; shift 2 ;;
    -w|-e) shift 2 ;;
    --name) name=$2; shift 2 ;;
    --user) user=$2; shift 2 ;;
    -*) echo "fake runtime: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
image=$1; shift
mkdir -p /var/lib/containers/fake && echo "$image" > "/var/lib/containers/fake/$name" || exit 3
echo "$image" > "/run/fake-$name" || exit 3
cd "$src" || exit 4
exec setpriv --reuid "${user%%:*}" --regid "${user##*:}" --clear-groups "$@"
"#;

fn root() -> bool {
    fleetmesh_agent::sandbox::agent_uid() == 0
}

/// A booted container; stopped (SIGTERM, then SIGKILL) when dropped.
struct Booted {
    nspawn: Child,
    leader: u32,
}

impl Booted {
    fn boot(bind: &Path, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log)?;
        let nspawn = Command::new("systemd-nspawn")
            .args(["-D", ROOTFS, "--volatile=overlay", "--register=no", "--keep-unit", "-b"])
            .arg(format!("--bind-ro={}:{INSIDE}", bind.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let pid = nspawn.id();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let leader = loop {
            // nspawn's child is the container's PID 1 (systemd).
            if let Some(p) = fleetmesh_agent::attempts::children(pid).into_iter().find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            }) {
                break p;
            }
            anyhow::ensure!(Instant::now() < deadline, "the container's systemd never started");
            std::thread::sleep(Duration::from_millis(100));
        };
        let me = Self { nspawn, leader };
        loop {
            let state = me.sh("systemctl is-system-running 2>/dev/null || true")?;
            if state.contains("running") || state.contains("degraded") {
                return Ok(me);
            }
            anyhow::ensure!(Instant::now() < deadline, "container did not boot: {state}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Run a shell command inside the container; its stdout and stderr.
    fn sh(&self, script: &str) -> anyhow::Result<String> {
        let out = Command::new("nsenter")
            .args([
                "--target",
                &self.leader.to_string(),
                "--mount",
                "--uts",
                "--ipc",
                "--pid",
                "--cgroup",
            ])
            .args([
                "--",
                "/usr/bin/env",
                "-i",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ])
            .args(["/bin/sh", "-c", script])
            .output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.nspawn.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The job once it succeeded or failed.
async fn wait_job(
    client: &fleetmesh_coordinator::client::ApiClient,
    job: &str,
) -> Option<JobRecord> {
    wait_for(Duration::from_secs(60), || async {
        let j = work::job(client, job).await?;
        matches!(j.state, JobState::Succeeded | JobState::Failed).then_some(j)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_agent_runs_host_and_image_jobs_outside_its_own_sandbox() -> anyhow::Result<()> {
    if !root() {
        eprintln!("SKIPPED: booting a systemd container needs root");
        return Ok(());
    }
    let have = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("systemd-nspawn")
        || !have("nsenter")
        || !Path::new(ROOTFS).join("usr/lib/systemd/systemd").exists()
    {
        eprintln!("SKIPPED: needs systemd-nspawn, nsenter and the Debian tree {ROOTFS} (scripts/test.sh installs and builds them as root)");
        return Ok(());
    }
    let pki = Pki::new("mesh.test")?;
    let work = tempfile::tempdir()?;
    let coord = CoordinatorProc::start(&pki, &work.path().join("coord"), &[]).await?;
    let client = coord.client(&pki)?;

    // What the container sees under /opt/fm: the agent binary, the installer and its unit,
    // the agent's certificate, and the simulated runtime.
    let bind = work.path().join("fm");
    std::fs::create_dir_all(&bind)?;
    let (cert, key) = pki.issue(PeerKind::Agent, "box", attrs("eu-west-1", "EU", "onprem"))?;
    let scripts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts");
    for (from, to) in [
        (bin("fleetmesh-agent"), "fleetmesh-agent"),
        (scripts.join("install-agent.sh"), "install-agent.sh"),
        (scripts.join("fleetmesh-agent.service"), "fleetmesh-agent.service"),
        (pki.ca_pem(), "ca.pem"),
        (cert, "agent.pem"),
        (key, "agent.key"),
    ] {
        std::fs::copy(&from, bind.join(to))?;
    }
    std::fs::write(bind.join("fake-runtime"), FAKE_RUNTIME)?;
    Command::new("chmod").args(["0755"]).arg(bind.join("fake-runtime")).status()?;
    // The container's root reads the bind mount; nothing else must.
    let booted = Booted::boot(&bind, &work.path().join("nspawn.log"))?;

    let install = booted.sh(&format!(
        "{INSIDE}/install-agent.sh --binary {INSIDE}/fleetmesh-agent --coordinator {} --ca {INSIDE}/ca.pem --cert {INSIDE}/agent.pem --key {INSIDE}/agent.key --extra 'simulate-gpus = \"1xH100-80GB\"' --extra 'container-runtime = \"{INSIDE}/fake-runtime\"' 2>&1; echo exit=$?",
        coord.control
    ))?;
    assert!(install.contains("exit=0"), "install-agent.sh failed:\n{install}");
    let up = wait_for(Duration::from_secs(30), || async {
        let a = fleetmesh_integration::agents(&client).await;
        a.iter().any(|a| a.name == "box" && a.host.is_some()).then_some(())
    })
    .await;
    assert!(
        up.is_some(),
        "installed agent never connected:\n{}",
        booted.sh("systemctl status fleetmesh-agent --no-pager; journalctl -u fleetmesh-agent --no-pager | tail -30")?
    );
    // The unit is well formed, and its exposure score is printed for the README.
    let verify = booted.sh(
        "systemd-analyze verify /etc/systemd/system/fleetmesh-agent.service 2>&1; echo exit=$?",
    )?;
    assert!(verify.trim_end().ends_with("exit=0"), "systemd-analyze verify: {verify}");
    let security =
        booted.sh("systemd-analyze security fleetmesh-agent --no-pager 2>&1 | tail -1")?;
    println!("systemd-analyze security: {}", security.trim());
    // The agent itself is hardened.
    let props = booted
        .sh("systemctl show fleetmesh-agent -p ProtectSystem -p ProtectHome -p NoNewPrivileges")?;
    for want in ["ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes"] {
        assert!(props.contains(want), "{want} missing: {props}");
    }

    let yaml = "name: installed\njobs:\n  host:\n    script: |\n      id -un\n      cat /proc/self/cgroup\n      touch /var/tmp/fm-host-job && echo wrote-var-tmp\n      test -d /home && echo sees-home\n      V=dollars-kept.x; echo \"${V%.x}\"\n  image:\n    image: docker.io/library/busybox:1.36\n    command: [sh, -c, \"id -un; echo in-image\"]\n";
    let wf = work::submit(&client, yaml).await?;
    for job in ["host", "image"] {
        let j = wait_job(&client, &format!("{wf}.{job}")).await;
        let text = work::logs(&client, &format!("{wf}.{job}")).await;
        println!("--- {job} job output:\n{text}");
        assert_eq!(
            j.as_ref().map(|j| j.state),
            Some(JobState::Succeeded),
            "{job}: {j:#?}\n{text}\n{}",
            booted.sh("journalctl -u fleetmesh-agent --no-pager | tail -40")?
        );
        // An account of the installer's pool, in the job user's group.
        assert!(text.starts_with("fleetmesh-job-"), "{job} did not run as a pool account: {text}");
        if job == "host" {
            assert!(text.contains("fleetmesh-attempt-"), "not in its own unit: {text}");
            assert!(text.contains("wrote-var-tmp") && text.contains("sees-home"), "{text}");
            // systemd expands `${...}` in a unit's command line; the script is not on it.
            assert!(text.contains("\ndollars-kept\n"), "the script was rewritten: {text}");
        } else {
            assert!(text.contains("in-image"), "{text}");
        }
    }
    // The rootful runtime could write where the agent's sandbox could not.
    let wrote = booted.sh("ls /var/lib/containers/fake/ /run/ | grep -c fleetmesh-")?;
    println!("{props}runtime wrote {} files under /var/lib/containers and /run", wrote.trim());
    assert_eq!(wrote.trim(), "2", "runtime writes: {wrote}");

    // Attempts running side by side run as different accounts and cannot read each
    // other's dirs or processes.
    let wf = work::submit(&client, fleetmesh_integration::side_by_side::WORKFLOW).await?;
    let mut logs = Vec::new();
    for job in ["holder", "peeker"] {
        let j = wait_job(&client, &format!("{wf}.{job}")).await;
        let text = work::logs(&client, &format!("{wf}.{job}")).await;
        println!("--- {job} job output:\n{text}");
        assert_eq!(j.as_ref().map(|j| j.state), Some(JobState::Succeeded), "{job}: {j:#?}\n{text}");
        logs.push(text);
    }
    let (h, p) = fleetmesh_integration::side_by_side::check(&logs[0], &logs[1])
        .map_err(anyhow::Error::msg)?;
    for uid in [h, p] {
        let name = booted.sh(&format!("getent passwd {uid} | cut -d: -f1"))?;
        assert!(name.starts_with("fleetmesh-job-"), "uid {uid} is not a pool account: {name}");
    }
    Ok(())
}
