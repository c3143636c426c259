//! The attempt supervisor ("shim"): a small process between the agent and a job that
//! outlives the agent.
//!
//! The agent starts `<agent binary> __fleetmesh-attempt-shim DIR -- PROGRAM ARGS...` as the
//! leader of a new process group. The shim:
//! - holds an exclusive lock on `DIR/attempt.lock` (with its pid written in it) for as
//!   long as it lives: a restarted agent tells a live attempt from a dead one by trying
//!   that lock, which no reused pid can fake;
//! - starts the job in its own group, copies its stdout and stderr into `DIR/stdout.log`
//!   and `DIR/stderr.log` (capped at [`MAX_LOG_BYTES`]), from which the agent streams them;
//! - ignores SIGTERM/SIGINT/SIGHUP (the job gets them through the group) and writes the
//!   job's exit status durably to `DIR/exit.json` before it exits;
//! - with `--fence-after MS FILE`, stops the job by itself once `FILE` (the last time the
//!   agent heard from the coordinator, in ms since the epoch) is older than `MS`: the
//!   self-fencing of `--stop-jobs-after-disconnect` holds even while the agent is down.
//!
//! So a job's process tree, its logs and its exit status do not depend on the agent
//! process: `kill -9` of the agent loses none of them.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// First argument that turns a binary hosting the agent into a shim.
pub const SHIM_ARG: &str = "__fleetmesh-attempt-shim";
/// Held by the shim while it lives; holds its pid.
pub const LOCK_FILE: &str = "attempt.lock";
/// The job's exit status, written by the shim.
pub const EXIT_FILE: &str = "exit.json";
/// Bytes of each stream kept on disk per attempt.
pub const MAX_LOG_BYTES: u64 = 64 << 20;
/// What ends a log that reached the cap.
pub const TRUNCATION_NOTE: &[u8] = b"\n[fleetmesh: log truncated at the size cap]\n";
/// How long the shim waits for the job's pipes to drain after it exited (a daemonised
/// grandchild may keep them open forever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How often the fence file is read.
const FENCE_POLL: Duration = Duration::from_millis(100);
/// Between SIGTERM and SIGKILL when the shim fences the job itself.
const FENCE_GRACE: Duration = Duration::from_millis(500);
/// Exit codes of the shim itself (the job's status is in the exit file).
const SHIM_USAGE: i32 = 124;
const SHIM_LOCKED: i32 = 125;

/// How the job ended, as the shim saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitRecord {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
    },
    FailedToStart {
        reason: String,
    },
    /// The shim stopped the job because the coordinator was silent too long.
    Fenced {
        silent_ms: u64,
    },
}

/// Run as a shim and exit if this process was started as one; return otherwise. Call it
/// first in `main` of every binary that hosts [`crate::jobs::Jobs`].
pub fn run_if_requested() {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == SHIM_ARG) {
        std::process::exit(shim_main(args.collect()));
    }
}

struct ShimArgs {
    dir: PathBuf,
    fence: Option<(u64, PathBuf)>,
    /// The job's command and environment as a [`LaunchFile`] (when started through
    /// systemd-run, which expands `$VAR` and `${...}` in a unit's command line, so a
    /// job's own words must never be on it).
    launch_file: Option<PathBuf>,
    argv: Vec<OsString>,
}

/// Name of the launch file the agent writes into an attempt dir for [`SHIM_ARG`].
pub const LAUNCH_FILE: &str = "launch.json";

/// What the supervisor runs, read from [`LAUNCH_FILE`].
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LaunchFile {
    pub argv: Vec<String>,
    pub env: std::collections::BTreeMap<String, String>,
}

fn parse_args(args: Vec<OsString>) -> Option<ShimArgs> {
    let mut it = args.into_iter();
    let dir = PathBuf::from(it.next()?);
    let (mut fence, mut launch_file) = (None, None);
    let mut program_follows = false;
    while let Some(a) = it.next() {
        if a == "--" {
            program_follows = true;
            break;
        }
        if a == "--fence-after" {
            let ms = it.next()?.to_str()?.parse().ok()?;
            fence = Some((ms, PathBuf::from(it.next()?)));
        } else if a == "--launch-file" {
            launch_file = Some(PathBuf::from(it.next()?));
        } else {
            return None;
        }
    }
    let argv: Vec<OsString> = it.collect();
    // The program comes after `--` or from the launch file, never both.
    let from_file = launch_file.is_some() && !program_follows;
    (from_file || (launch_file.is_none() && !argv.is_empty())).then_some(ShimArgs {
        dir,
        fence,
        launch_file,
        argv,
    })
}

fn shim_main(args: Vec<OsString>) -> i32 {
    let Some(args) = parse_args(args) else {
        eprintln!(
            "usage: {SHIM_ARG} DIR [--fence-after MS FILE] (--launch-file FILE | -- PROGRAM ARGS...)"
        );
        return SHIM_USAGE;
    };
    let lock = match take_lock(&args.dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{SHIM_ARG}: {}: {e}", args.dir.display());
            return SHIM_LOCKED;
        }
    };
    let record = supervise(&args);
    if let Err(e) = write_exit(&args.dir, &record) {
        eprintln!("{SHIM_ARG}: writing the exit status: {e}");
    }
    drop(lock);
    0
}

/// Lock `DIR/attempt.lock` and write our pid into it.
fn take_lock(dir: &Path) -> std::io::Result<std::fs::File> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.join(LOCK_FILE))?;
    f.try_lock().map_err(|e| std::io::Error::other(format!("attempt already supervised: {e}")))?;
    f.set_len(0)?;
    write!(f, "{}", std::process::id())?;
    f.sync_all()?;
    Ok(f)
}

/// Whether a shim holds the lock in `dir`, and its pid. `None` when nobody does.
pub fn lock_holder(dir: &Path) -> Option<u32> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(dir.join(LOCK_FILE)).ok()?;
    match f.try_lock() {
        Ok(()) => None, // free: the shim is gone (the lock goes when we drop `f`)
        Err(_) => {
            let mut s = String::new();
            (&f).read_to_string(&mut s).ok()?;
            s.trim().parse().ok()
        }
    }
}

/// The exit status a shim left in `dir`, if it finished.
pub fn read_exit(dir: &Path) -> Option<ExitRecord> {
    serde_json::from_slice(&std::fs::read(dir.join(EXIT_FILE)).ok()?).ok()
}

fn write_exit(dir: &Path, r: &ExitRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    crate::attempts::write_durably(&dir.join(EXIT_FILE), &bytes)
}

fn supervise(args: &ShimArgs) -> ExitRecord {
    use std::process::{Command, Stdio};
    let launch = match &args.launch_file {
        None => LaunchFile {
            argv: args.argv.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
            env: Default::default(),
        },
        Some(f) => match std::fs::read(f)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<LaunchFile>(&b).map_err(|e| e.to_string()))
        {
            Ok(l) if !l.argv.is_empty() => {
                // Read once; it need not stay in the job's dir.
                let _ = std::fs::remove_file(f);
                l
            }
            Ok(_) => {
                return ExitRecord::FailedToStart { reason: format!("{}: no program", f.display()) }
            }
            Err(e) => return ExitRecord::FailedToStart { reason: format!("{}: {e}", f.display()) },
        },
    };
    let mut child = match Command::new(&launch.argv[0])
        .args(&launch.argv[1..])
        .envs(launch.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return ExitRecord::FailedToStart { reason: format!("{}: {e}", launch.argv[0]) },
    };
    // After the spawn, so the job does not inherit the ignored dispositions.
    ignore_stop_signals();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let pipes: [(Option<Box<dyn Read + Send>>, &str); 2] = [
        (child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>), "stdout.log"),
        (child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>), "stderr.log"),
    ];
    let mut pumps = 0;
    for (reader, file) in pipes {
        if let Some(r) = reader {
            let (path, tx) = (args.dir.join(file), done_tx.clone());
            pumps += 1;
            std::thread::spawn(move || {
                copy_capped(r, &path);
                // The supervisor may have stopped waiting for this pump.
                let _ = tx.send(());
            });
        }
    }
    let status = match &args.fence {
        None => child.wait(),
        Some((after_ms, file)) => loop {
            match child.try_wait() {
                Ok(Some(st)) => break Ok(st),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            if let Some(silent_ms) = silence_ms(file).filter(|s| s >= after_ms) {
                fence(&mut child, silent_ms, &args.dir);
            }
            std::thread::sleep(FENCE_POLL);
        },
    };
    let deadline = std::time::Instant::now() + DRAIN_AFTER_EXIT;
    for _ in 0..pumps {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(code), _) => ExitRecord::Exited { code },
            (None, Some(signal)) => ExitRecord::Signaled { signal },
            (None, None) => ExitRecord::Exited { code: -1 },
        },
        Err(e) => ExitRecord::FailedToStart { reason: format!("waiting for the job: {e}") },
    }
}

/// How long ago the agent last heard from the coordinator, per the fence file.
fn silence_ms(file: &Path) -> Option<u64> {
    let heard: u64 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    Some(fleetmesh_data::now_unix_ms().saturating_sub(heard))
}

/// Stop the job (SIGTERM to the group, SIGKILL after the grace), record why, and end
/// the group (this process included).
fn fence(child: &mut std::process::Child, silent_ms: u64, dir: &Path) -> ! {
    let pgid = std::process::id();
    signal_group(pgid, "TERM");
    let deadline = std::time::Instant::now() + FENCE_GRACE;
    while std::time::Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = write_exit(dir, &ExitRecord::Fenced { silent_ms });
    signal_group(pgid, "KILL");
    std::process::exit(0)
}

/// Signal a whole process group (through kill(1): no unsafe code here).
pub fn signal_group(pgid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

fn copy_capped(mut r: Box<dyn Read + Send>, path: &Path) {
    let mut f = std::fs::File::create(path).ok();
    let mut written: u64 = 0;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if written >= MAX_LOG_BYTES {
            continue; // keep draining so the job never blocks on a full pipe
        }
        let take = (n as u64).min(MAX_LOG_BYTES - written) as usize;
        if let Some(f) = f.as_mut() {
            let _ = f.write_all(&buf[..take]);
            written += take as u64;
            if written >= MAX_LOG_BYTES {
                let _ = f.write_all(TRUNCATION_NOTE);
            }
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP reach the job through its process group; the shim itself
/// must live on to record how the job ended.
#[allow(unsafe_code)]
fn ignore_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler and
        // touches no memory; the process has no other threads yet that rely on it.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_parsed_and_checked() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let p = parse_args(a(&["/w", "--fence-after", "500", "/f", "--", "sh", "-c", "x"]))
            .expect("valid");
        assert_eq!(p.dir, PathBuf::from("/w"));
        assert_eq!(p.fence, Some((500, PathBuf::from("/f"))));
        assert_eq!(p.launch_file, None);
        let e = parse_args(a(&["/w", "--launch-file", "/w/launch.json"])).expect("valid");
        assert_eq!(e.launch_file, Some(PathBuf::from("/w/launch.json")));
        assert!(e.argv.is_empty());
        assert!(
            parse_args(a(&["/w", "--launch-file", "/w/l", "--", "x"])).is_none(),
            "a program twice"
        );
        assert_eq!(p.argv, a(&["sh", "-c", "x"]));
        assert!(parse_args(a(&["/w", "--"])).is_none(), "no program");
        assert!(parse_args(a(&["/w", "--bogus", "--", "x"])).is_none());
        assert!(parse_args(a(&["/w", "sh"])).is_none(), "no --");
    }

    #[test]
    fn the_lock_tells_a_live_shim_from_a_dead_one() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(lock_holder(d.path()), None, "no lock file yet");
        let held = take_lock(d.path()).expect("lock");
        assert_eq!(lock_holder(d.path()), Some(std::process::id()));
        assert!(take_lock(d.path()).is_err(), "a second shim is refused");
        drop(held);
        assert_eq!(lock_holder(d.path()), None, "released with its holder");
    }
}
