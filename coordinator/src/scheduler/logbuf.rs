//! Job output kept in the coordinator for `fleetmesh logs`, in bounded memory (pure).
//!
//! Each running job keeps the tail of its current attempt's output, at most
//! `per_job` bytes; all buffers together hold at most `total` bytes, the largest buffer
//! giving up its oldest bytes first. A finished job's buffer is taken out
//! ([`LogBuffers::take`]) and written to disk by the Scheduler, so finished jobs cost no
//! memory however many there are.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// The kept output of one attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBuf {
    pub attempt: u64,
    pub data: VecDeque<u8>,
    /// Bytes of this attempt's output dropped from the front (offsets count them).
    pub dropped: usize,
}

impl LogBuf {
    fn trim_front(&mut self, n: usize) -> usize {
        let n = n.min(self.data.len());
        self.data.drain(..n);
        self.dropped += n;
        n
    }
}

/// All running jobs' buffers.
#[derive(Debug)]
pub struct LogBuffers {
    per_job: usize,
    total_cap: usize,
    total: usize,
    bufs: BTreeMap<String, LogBuf>,
}

impl LogBuffers {
    pub fn new(per_job: usize, total_cap: usize) -> Self {
        Self { per_job, total_cap, total: 0, bufs: BTreeMap::new() }
    }

    /// Append output of `attempt` (a newer attempt starts a new buffer).
    pub fn append(&mut self, job: &str, attempt: u64, data: &[u8]) {
        let b = self.bufs.entry(job.to_string()).or_default();
        if b.attempt != attempt {
            self.total -= b.data.len();
            *b = LogBuf { attempt, ..Default::default() };
        }
        b.data.extend(data);
        self.total += data.len();
        let over = b.data.len().saturating_sub(self.per_job);
        self.total -= b.trim_front(over);
        while self.total > self.total_cap {
            let excess = self.total - self.total_cap;
            let Some(largest) = self.bufs.values_mut().max_by_key(|b| b.data.len()) else { break };
            let freed = largest.trim_front(excess);
            if freed == 0 {
                break;
            }
            self.total -= freed;
        }
    }

    pub fn get(&self, job: &str) -> Option<&LogBuf> {
        self.bufs.get(job)
    }

    /// Remove a job's buffer (it finished: the caller keeps it elsewhere).
    pub fn take(&mut self, job: &str) -> Option<LogBuf> {
        let b = self.bufs.remove(job)?;
        self.total -= b.data.len();
        Some(b)
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_job_and_total_caps_hold_and_offsets_count_what_was_dropped() {
        let mut l = LogBuffers::new(10, 25);
        l.append("a", 1, b"0123456789abc");
        let a = l.get("a").cloned().unwrap_or_default();
        assert_eq!((a.data.len(), a.dropped), (10, 3));
        assert_eq!(a.data.iter().copied().collect::<Vec<u8>>(), b"3456789abc");
        l.append("b", 1, b"0123456789");
        l.append("c", 1, b"01234567");
        // 28 bytes > 25: the largest buffer gives up its oldest bytes.
        assert_eq!(l.bytes(), 25);
        assert!(l.get("a").is_some_and(|b| b.data.len() + b.dropped == 13));
        // A new attempt starts over; taking a finished job frees its bytes.
        l.append("c", 2, b"x");
        assert_eq!(l.get("c").map(|b| (b.attempt, b.data.len(), b.dropped)), Some((2, 1, 0)));
        let before = l.bytes();
        let b = l.take("b").unwrap_or_default();
        assert_eq!(l.bytes(), before - b.data.len());
        assert!(l.get("b").is_none());
    }

    #[test]
    fn many_jobs_never_exceed_the_total() {
        let mut l = LogBuffers::new(1 << 20, 4 << 20);
        for i in 0..100 {
            l.append(&format!("j{i}"), 1, &vec![b'x'; 1 << 20]);
            assert!(l.bytes() <= 4 << 20);
        }
    }
}
