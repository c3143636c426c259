//! The agent's durable attempt table, in its data dir, so that it owns its attempts
//! across its own restarts:
//! - `attempts/KEY.json`: a running attempt (its award, the supervisor's pid, which leads
//!   the attempt's process group, the process start time and the fence), written once the
//!   supervisor ([`crate::shim`]) is started and removed when its exit is recorded below;
//! - `exits/KEY.json`: an exit the coordinator has not acknowledged yet, written before it
//!   is sent and removed on `ExitRecorded`.
//!
//! A restarted agent reads both ([`AttemptTable::load`]): exits are delivered again,
//! attempts whose supervisor still holds its lock are re-adopted, and finished ones are
//! reported from the status their supervisor left.

use std::io::Write;
use std::path::{Path, PathBuf};

use fleetmesh_protocol::{AgentMessage, Award};
use serde::{Deserialize, Serialize};

/// Write `bytes` to `path` so that after a crash it holds either the old content or all
/// of the new: temporary file, fsync, rename, fsync of the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// One running attempt, as recorded on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The award (job, attempt number = fence, GPUs, outputs to collect, timeout).
    pub award: Award,
    /// The attempt's work dir.
    pub dir: PathBuf,
    /// The supervisor's pid; it leads the attempt's process group (pgid = pid).
    pub pid: u32,
    /// The supervisor's start time in clock ticks after boot (`/proc/PID/stat` field 22),
    /// telling it from a later process that reuses the pid.
    pub proc_start_ticks: Option<u64>,
    pub started_unix_ms: u64,
    /// (runtime, container name) for an image job.
    pub container: Option<(String, String)>,
    /// The transient systemd unit it runs in, when started through systemd-run.
    #[serde(default)]
    pub unit: Option<String>,
    /// Its own uid, when attempts get one each (`--job-uids`).
    #[serde(default)]
    pub uid: Option<u32>,
}

/// The table, in `<data-dir>/attempts` and `<data-dir>/exits`.
#[derive(Debug, Clone)]
pub struct AttemptTable {
    attempts: PathBuf,
    exits: PathBuf,
}

/// What a restarted agent finds.
#[derive(Debug, Default)]
pub struct Loaded {
    pub attempts: Vec<AttemptRecord>,
    pub exits: Vec<AgentMessage>,
    /// Files that could not be read (kept for inspection, logged).
    pub unreadable: Vec<(PathBuf, String)>,
}

/// A file name for (job, attempt): job names are user text.
fn key(job: &str, attempt: u64) -> String {
    let h =
        fleetmesh_protocol::data::hash_hex(&fleetmesh_protocol::data::hash_bytes(job.as_bytes()));
    format!("{}-{attempt}.json", &h[..32])
}

impl AttemptTable {
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let t = Self { attempts: data_dir.join("attempts"), exits: data_dir.join("exits") };
        std::fs::create_dir_all(&t.attempts)?;
        std::fs::create_dir_all(&t.exits)?;
        Ok(t)
    }

    pub fn save_attempt(&self, r: &AttemptRecord) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        write_durably(&self.attempts.join(key(&r.award.job, r.award.attempt)), &bytes)
    }

    /// Record an exit (durably) and forget the attempt it ends.
    pub fn save_exit(&self, exit: &AgentMessage) -> std::io::Result<()> {
        let AgentMessage::JobExited { job, attempt, .. } = exit else {
            return Err(std::io::Error::other("not an exit"));
        };
        let bytes = serde_json::to_vec(exit).map_err(std::io::Error::other)?;
        write_durably(&self.exits.join(key(job, *attempt)), &bytes)?;
        // No fsync needed: a record that comes back after a crash is superseded by the exit.
        let _ = std::fs::remove_file(self.attempts.join(key(job, *attempt)));
        Ok(())
    }

    /// The coordinator recorded the exit.
    pub fn forget_exit(&self, job: &str, attempt: u64) {
        let _ = std::fs::remove_file(self.exits.join(key(job, attempt)));
        let _ = std::fs::remove_file(self.attempts.join(key(job, attempt)));
    }

    /// Everything on disk. An attempt that also has an exit is finished: only the exit is
    /// returned, and the stale record is removed.
    pub fn load(&self) -> Loaded {
        let mut out = Loaded::default();
        for (path, bytes) in read_dir_files(&self.exits, &mut out.unreadable) {
            match serde_json::from_slice::<AgentMessage>(&bytes) {
                Ok(m @ AgentMessage::JobExited { .. }) => out.exits.push(m),
                Ok(_) => out.unreadable.push((path, "not an exit".into())),
                Err(e) => out.unreadable.push((path, e.to_string())),
            }
        }
        for (path, bytes) in read_dir_files(&self.attempts, &mut out.unreadable) {
            match serde_json::from_slice::<AttemptRecord>(&bytes) {
                Ok(r) => {
                    let done = out.exits.iter().any(|e| {
                        matches!(e, AgentMessage::JobExited { job, attempt, .. }
                            if *job == r.award.job && *attempt == r.award.attempt)
                    });
                    if done {
                        let _ = std::fs::remove_file(&path);
                    } else {
                        out.attempts.push(r);
                    }
                }
                Err(e) => out.unreadable.push((path, e.to_string())),
            }
        }
        out
    }
}

fn read_dir_files(dir: &Path, bad: &mut Vec<(PathBuf, String)>) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            match std::fs::read(&p) {
                Ok(b) => out.push((p, b)),
                Err(e) => bad.push((p, e.to_string())),
            }
        } else if p.extension().is_some_and(|x| x == "tmp") {
            let _ = std::fs::remove_file(&p); // a write that never completed
        }
    }
    out
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat`, from field 3 on. The command
/// name (field 2) may hold spaces and parentheses, so fields are counted after the last ')'.
pub fn proc_stat_field(pid: u32, n: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// proc(5) fields used here.
const STAT_PPID: usize = 4;
const STAT_PGRP: usize = 5;
const STAT_STARTTIME: usize = 22;

/// Start time of process `pid` in clock ticks after boot.
pub fn proc_start_ticks(pid: u32) -> Option<u64> {
    proc_stat_field(pid, STAT_STARTTIME)
}

/// Live processes whose stat field `n` equals `value`.
fn processes_with(n: usize, value: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_stat_field(*pid, n) == Some(u64::from(value)))
        .collect()
}

/// Pids of live processes in process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    processes_with(STAT_PGRP, pgid)
}

/// Pids of the live children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    processes_with(STAT_PPID, pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetmesh_protocol::{ExecSpec, JobOutcome};

    fn award(job: &str, attempt: u64) -> Award {
        Award {
            auction: "au".into(),
            job: job.into(),
            attempt,
            gpus: vec!["GPU-1".into()],
            cpus: 1.0,
            memory_bytes: 0,
            exec: ExecSpec {
                argv: vec!["true".into()],
                env: vec![],
                image: None,
                timeout_ms: None,
            },
            rank: 0,
            world_size: 1,
            master_addr: String::new(),
            master_port: 0,
            inputs: vec![],
            outputs: vec![],
        }
    }

    fn exit(job: &str, attempt: u64) -> AgentMessage {
        AgentMessage::JobExited {
            job: job.into(),
            attempt,
            outcome: JobOutcome::Exited { code: 0 },
            duration_ms: 5,
            outputs: vec![],
        }
    }

    #[test]
    fn records_and_exits_survive_a_reopen_and_an_exit_supersedes_its_attempt() {
        let d = tempfile::tempdir().expect("tempdir");
        let t = AttemptTable::open(d.path()).expect("open");
        let rec = |job: &str, n| AttemptRecord {
            award: award(job, n),
            dir: d.path().join(job),
            pid: 42,
            proc_start_ticks: Some(7),
            started_unix_ms: 1,
            container: None,
            unit: None,
            uid: None,
        };
        t.save_attempt(&rec("wf.a", 1)).expect("save");
        t.save_attempt(&rec("wf.b", 2)).expect("save");
        t.save_exit(&exit("wf.b", 2)).expect("exit");
        std::fs::write(d.path().join("attempts/garbage.json"), b"{not json").expect("write");
        let again = AttemptTable::open(d.path()).expect("reopen").load();
        assert_eq!(again.attempts, vec![rec("wf.a", 1)]);
        assert_eq!(again.exits, vec![exit("wf.b", 2)]);
        assert_eq!(again.unreadable.len(), 1);
        t.forget_exit("wf.b", 2);
        assert!(t.load().exits.is_empty());
    }

    #[test]
    fn proc_start_ticks_and_group_members_read_proc() {
        use std::os::unix::process::CommandExt;
        let me = std::process::id();
        assert!(proc_start_ticks(me).is_some());
        let mut child =
            std::process::Command::new("sleep").arg("5").process_group(0).spawn().expect("sleep");
        let pid = child.id();
        assert_eq!(group_members(pid), vec![pid]);
        assert_eq!(children(me), vec![pid]);
        let _ = child.kill();
        let _ = child.wait();
        assert!(group_members(pid).is_empty());
    }
}
