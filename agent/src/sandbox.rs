//! Jobs run as an unprivileged user (`--job-user`), apart from the agent's own files.
//!
//! With a job user the agent (root) lays its data dir out so that user can reach only its
//! own attempt's work dir:
//! - the data dir and `work/` are `0711`: passable, not listable;
//! - `store/` (chunks), `identity/` (key and certificate), `attempts/` and `exits/` are
//!   `0700`, owned by the agent: a job gets `EACCES`;
//! - each attempt's dir is `0700`, owned by the job user while it runs, and handed back
//!   to the agent (`0700`, owned by it) when it ends, so a later attempt cannot read it.
//!
//! Host jobs run as the job user (its uid and gid, supplementary groups dropped, `HOME`
//! the attempt dir). With a uid pool each running attempt gets a uid of its own, so
//! attempts running side by side cannot read each other's dirs or processes either (the
//! group stays the job user's):
//! - `--job-accounts PREFIX`: accounts `PREFIX0`, `PREFIX1`, ... (install-agent.sh creates
//!   `fleetmesh-job-0..63`); works under either launcher;
//! - `--job-uids START-END`: uids no account uses; the direct launcher only, since
//!   systemd does not start a unit as a uid without an account.
//!
//! Image jobs start the container runtime as the agent, with the container's process as
//! the job user (`--user UID:GID`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Why a job user or uid pool cannot be used. Each names the setting and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    #[error("/etc/passwd: {0}")]
    Passwd(String),
    #[error("job user {0:?} does not exist (scripts/install-agent.sh creates fleetmesh-job)")]
    NoSuchUser(String),
    #[error("job user {0:?} is root: jobs must run unprivileged")]
    Root(String),
    #[error(
        "--job-user {0} needs the agent to run as root (it switches each attempt to that user)"
    )]
    AgentNotRoot(String),
    /// A `--job-uids` range that is malformed, too large, or used by accounts or
    /// subordinate ids (the message says which).
    #[error("{0}")]
    UidRange(String),
    /// A `--job-accounts` prefix with no usable accounts (the message says why).
    #[error("{0}")]
    Accounts(String),
}

/// The user jobs run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Directories of the data dir only the agent may enter.
pub const PRIVATE_DIRS: [&str; 4] = ["store", "identity", "attempts", "exits"];
const PASSABLE: u32 = 0o711;
const PRIVATE: u32 = 0o700;

/// Find `name` in `/etc/passwd`; it must not be root, and the agent must be root to
/// switch to it.
pub fn lookup(name: &str) -> Result<JobUser, SandboxError> {
    let passwd =
        std::fs::read_to_string("/etc/passwd").map_err(|e| SandboxError::Passwd(e.to_string()))?;
    let user =
        parse_passwd(&passwd, name).ok_or_else(|| SandboxError::NoSuchUser(name.to_string()))?;
    if user.uid == 0 {
        return Err(SandboxError::Root(name.to_string()));
    }
    if agent_uid() != 0 {
        return Err(SandboxError::AgentNotRoot(name.to_string()));
    }
    Ok(user)
}

/// More uids than attempts a node could run side by side.
pub const MAX_POOL_UIDS: u32 = 65_536;

/// Parse `--job-uids START-END`: uids that no account in `/etc/passwd` uses, that no
/// subordinate range in `/etc/subuid` or `/etc/subgid` maps (rootless containers own
/// those), and never 0.
pub fn parse_uid_range(spec: &str) -> Result<std::ops::RangeInclusive<u32>, SandboxError> {
    uid_range(spec)
}

fn uid_range(spec: &str) -> Result<std::ops::RangeInclusive<u32>, SandboxError> {
    let bad =
        || SandboxError::UidRange(format!("job-uids {spec:?}: give START-END, e.g. 200000-200999"));
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (a, b): (u32, u32) =
        (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if a == 0 || b < a {
        return Err(bad());
    }
    if b - a >= MAX_POOL_UIDS {
        return Err(SandboxError::UidRange(format!(
            "job-uids {spec}: at most {MAX_POOL_UIDS} uids"
        )));
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let taken = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        let uid: u32 = f.get(2)?.parse().ok()?;
        (a..=b).contains(&uid).then(|| format!("{} ({uid})", f[0]))
    });
    if let Some(who) = taken {
        return Err(SandboxError::UidRange(format!(
            "job-uids {spec}: the range includes the account {who}"
        )));
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if let Some(line) = overlapping_subordinate(&text, a, b) {
            return Err(SandboxError::UidRange(format!(
                "job-uids {spec}: overlaps {file} entry {line:?}"
            )));
        }
    }
    Ok(a..=b)
}

/// Parse `--job-accounts PREFIX`: the uids of the accounts `PREFIX0`, `PREFIX1`, ... in
/// `/etc/passwd`, in index order. There must be at least one, and none may be root.
pub fn pool_accounts(prefix: &str) -> Result<Vec<u32>, SandboxError> {
    let passwd =
        std::fs::read_to_string("/etc/passwd").map_err(|e| SandboxError::Passwd(e.to_string()))?;
    accounts_with_prefix(&passwd, prefix)
}

fn accounts_with_prefix(passwd: &str, prefix: &str) -> Result<Vec<u32>, SandboxError> {
    if prefix.is_empty() {
        return Err(SandboxError::Accounts(
            "job-accounts: give the accounts' name prefix, e.g. fleetmesh-job-".into(),
        ));
    }
    let mut found: Vec<(u64, u32, String)> = Vec::new();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let Some(index) = f[0].strip_prefix(prefix) else { continue };
        let (Ok(index), Some(Ok(uid))) = (index.parse::<u64>(), f.get(2).map(|u| u.parse::<u32>()))
        else {
            continue;
        };
        if uid == 0 {
            return Err(SandboxError::Accounts(format!("job-accounts {prefix}: {} is root", f[0])));
        }
        found.push((index, uid, f[0].to_string()));
    }
    if found.is_empty() {
        return Err(SandboxError::Accounts(format!(
            "job-accounts {prefix}: no account {prefix}0, {prefix}1, ... exists (scripts/install-agent.sh creates fleetmesh-job-0..63)"
        )));
    }
    found.sort();
    let mut uids: Vec<u32> = found.iter().map(|(_, uid, _)| *uid).collect();
    uids.dedup();
    if uids.len() != found.len() {
        return Err(SandboxError::Accounts(format!(
            "job-accounts {prefix}: two accounts share a uid"
        )));
    }
    Ok(uids)
}

/// A `NAME:START:COUNT` line of a subordinate-id file whose range meets `a..=b`.
fn overlapping_subordinate(text: &str, a: u32, b: u32) -> Option<String> {
    text.lines()
        .find(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let (Some(Ok(start)), Some(Ok(count))) =
                (f.get(1).map(|x| x.parse::<u64>()), f.get(2).map(|x| x.parse::<u64>()))
            else {
                return false;
            };
            start <= u64::from(b) && u64::from(a) < start + count
        })
        .map(str::to_string)
}

fn parse_passwd(passwd: &str, name: &str) -> Option<JobUser> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == name).then(|| {
            Some(JobUser {
                name: name.to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        })?
    })
}

/// The agent's effective uid.
pub fn agent_uid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
}

fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

/// Lay out the data dir for jobs running as another user (before anything is in it
/// that a job must not read).
pub fn prepare_data_dir(data_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    set_mode(data_dir, PASSABLE)?;
    for d in PRIVATE_DIRS {
        let p = data_dir.join(d);
        std::fs::create_dir_all(&p)?;
        set_mode(&p, PRIVATE)?;
    }
    let work = data_dir.join("work");
    std::fs::create_dir_all(&work)?;
    set_mode(&work, PASSABLE)
}

/// Make an attempt's dir the job user's own (its parent, the job's dir, passable only).
pub fn give_attempt_dir(dir: &Path, user: &JobUser) -> std::io::Result<()> {
    if let Some(job_dir) = dir.parent() {
        set_mode(job_dir, PASSABLE)?;
    }
    std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid))?;
    set_mode(dir, PRIVATE)
}

/// Give a directory the agent made inside the attempt dir (an output) to the job user.
pub fn give(path: &Path, user: &JobUser) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
}

/// The attempt ended: everything in its dir goes back to the agent, so no later job run
/// by the same user can read it. Symlinks are changed themselves, never followed.
pub fn seal_attempt_dir(dir: &Path) -> std::io::Result<()> {
    let (uid, gid) = std::fs::metadata("/proc/self").map(|m| (m.uid(), m.gid()))?;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)?;
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))?;
        if md.is_dir() {
            for e in std::fs::read_dir(&p)?.flatten() {
                stack.push(e.path());
            }
        }
    }
    set_mode(dir, PRIVATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_entries_are_found_by_name() {
        let p = "root:x:0:0:root:/root:/bin/bash\nfleetmesh-job:x:998:997::/nonexistent:/usr/sbin/nologin\nbad:x:notanumber:1::/:/bin/sh\n";
        assert_eq!(
            parse_passwd(p, "fleetmesh-job"),
            Some(JobUser { name: "fleetmesh-job".into(), uid: 998, gid: 997 })
        );
        assert_eq!(parse_passwd(p, "bad"), None);
        assert_eq!(parse_passwd(p, "nobody-here"), None);
        assert_eq!(parse_passwd(p, "root").map(|u| u.uid), Some(0));
    }

    #[test]
    fn uid_ranges_are_checked() {
        assert_eq!(parse_uid_range("200000-200009"), Ok(200000..=200009));
        assert!(matches!(parse_uid_range("x"), Err(SandboxError::UidRange(_))));
        for bad in ["", "5", "0-10", "10-5", "a-b"] {
            assert!(parse_uid_range(bad).is_err(), "{bad}");
        }
        // Root's uid 0 is refused outright; a range over a real account is too.
        assert!(parse_uid_range("0-0").is_err());
        let e = parse_uid_range("1-1000").unwrap_err().to_string();
        assert!(e.contains("includes the account"), "{e}");
        let e = parse_uid_range("300000-4000000000").unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
        let sub = "alice:100000:65536\nbob:165536:65536\n";
        assert_eq!(
            overlapping_subordinate(sub, 200000, 200009).as_deref(),
            Some("bob:165536:65536")
        );
        assert_eq!(overlapping_subordinate(sub, 231072, 231100), None);
        assert_eq!(overlapping_subordinate(sub, 99999, 99999), None);
    }

    #[test]
    fn pool_accounts_are_found_by_prefix_in_index_order() {
        let p = "root:x:0:0::/root:/bin/bash\nfleetmesh-job:x:990:990::/:/bin/false\nfleetmesh-job-10:x:1010:990::/:/bin/false\nfleetmesh-job-2:x:1002:990::/:/bin/false\nfleetmesh-job-x:x:1:990::/:/bin/false\n";
        assert_eq!(accounts_with_prefix(p, "fleetmesh-job-"), Ok(vec![1002, 1010]));
        let none = accounts_with_prefix(p, "other-").unwrap_err().to_string();
        assert!(none.contains("no account other-0"), "{none}");
        assert!(accounts_with_prefix(p, "").is_err());
        let rooted = "evil-0:x:0:0::/:/bin/sh\n";
        assert!(accounts_with_prefix(rooted, "evil-").unwrap_err().to_string().contains("is root"));
        let shared = "a-0:x:5:5::/:/bin/sh\na-1:x:5:5::/:/bin/sh\n";
        assert!(accounts_with_prefix(shared, "a-")
            .unwrap_err()
            .to_string()
            .contains("share a uid"));
    }

    #[test]
    fn the_data_dir_layout_keeps_private_dirs_private() {
        let d = tempfile::tempdir().expect("tempdir");
        prepare_data_dir(d.path()).expect("prepare");
        let mode = |p: &Path| std::fs::metadata(p).map(|m| m.mode() & 0o777).unwrap_or(0);
        assert_eq!(mode(d.path()), 0o711);
        assert_eq!(mode(&d.path().join("work")), 0o711);
        for p in PRIVATE_DIRS {
            assert_eq!(mode(&d.path().join(p)), 0o700, "{p}");
        }
    }
}
