//! Finished jobs' output on disk: `<data-dir>/logs/<hash of job id>.log`, a JSON header
//! line (attempt, bytes dropped from the front) followed by the kept bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::scheduler::logbuf::LogBuf;

#[derive(Serialize, Deserialize)]
struct Header {
    job: String,
    attempt: u64,
    dropped: usize,
}

fn path(dir: &Path, job: &str) -> PathBuf {
    let h =
        fleetmesh_protocol::data::hash_hex(&fleetmesh_protocol::data::hash_bytes(job.as_bytes()));
    dir.join(format!("{}.log", &h[..32]))
}

/// Keep a finished job's output (replacing an earlier attempt's).
pub fn write(dir: &Path, job: &str, b: &LogBuf) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let header =
        serde_json::to_string(&Header { job: job.into(), attempt: b.attempt, dropped: b.dropped })
            .map_err(std::io::Error::other)?;
    let tmp = path(dir, job).with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(header.as_bytes())?;
    f.write_all(b"\n")?;
    let (a, c) = b.data.as_slices();
    f.write_all(a)?;
    f.write_all(c)?;
    std::fs::rename(&tmp, path(dir, job))
}

/// A finished job's output, if kept.
pub fn read(dir: &Path, job: &str) -> Option<LogBuf> {
    let bytes = std::fs::read(path(dir, job)).ok()?;
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let h: Header = serde_json::from_slice(&bytes[..nl]).ok()?;
    (h.job == job).then(|| LogBuf {
        attempt: h.attempt,
        dropped: h.dropped,
        data: bytes[nl + 1..].iter().copied().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let d = tempfile::tempdir().expect("tempdir");
        let b = LogBuf { attempt: 3, dropped: 7, data: b"hello\nworld".iter().copied().collect() };
        write(d.path(), "wf.j", &b).expect("write");
        assert_eq!(read(d.path(), "wf.j"), Some(b));
        assert_eq!(read(d.path(), "other"), None);
    }
}
