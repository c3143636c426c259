//! Store writers: a dedicated thread per actor that commits its records and then
//! delivers what waited for them (awards, exit acks, user acknowledgements). The
//! Scheduler's writer commits workflow and job records; the Fleet's, agent records.
//!
//! Why a thread: a redb commit ends in an fsync (a few ms, now and then hundreds). Done
//! on the Scheduler actor, it held up every auction outcome behind it and blocked one of
//! the runtime's worker threads. Here the Scheduler only serialises the changed records
//! and queues them; it goes on deciding while the disk works.
//!
//! Ordering is the whole contract: items are handled strictly in the order queued, and an
//! item queued after a commit is delivered only once that commit is durable. Every
//! message the Scheduler sends to an agent goes through this queue (not only awards), so
//! a `Stop` can never overtake the `Award` it is about. Commits waiting together are
//! merged into one transaction (group commit): the slower the disk, the larger the batch.
//!
//! The Fleet's registry commits (state changes, and every 5 s the `last_seen` of every
//! agent, a thousand records) went the same way for the same reason: the Scheduler asks
//! the Fleet for candidates on every tick, so a Fleet waiting on fsync held up placing.
//!
//! A commit that fails is retried after [`COMMIT_RETRY_DELAYS_MS`]; nothing queued after
//! it is delivered meanwhile. If it still fails, the writer delivers nothing more and
//! reports the reason to its owner, which stops the coordinator (agents reconnect to the
//! restarted process, which re-adopts what runs).

use std::sync::mpsc;
use std::sync::Arc;

use fleetmesh_protocol::CoordinatorMessage;
use tracing::warn;

use crate::net::agent_link::AgentLink;
use crate::persist::store::{AgentRecord, Store, StoreError};

/// Serialised records: (id, JSON).
pub type Records = Vec<(String, Vec<u8>)>;

/// What one writer commits. Batches queued together are appended into one transaction;
/// a later record for the same key overwrites an earlier one.
pub trait Batch: Default + Send + 'static {
    fn append(&mut self, later: &mut Self);
    fn is_empty(&self) -> bool;
    fn commit(&self, store: &Store) -> Result<(), StoreError>;
}

/// The Scheduler's records.
#[derive(Default, Debug)]
pub struct Work {
    pub workflows: Records,
    pub jobs: Records,
}

impl Batch for Work {
    fn append(&mut self, later: &mut Self) {
        self.workflows.append(&mut later.workflows);
        self.jobs.append(&mut later.jobs);
    }
    fn is_empty(&self) -> bool {
        self.workflows.is_empty() && self.jobs.is_empty()
    }
    fn commit(&self, store: &Store) -> Result<(), StoreError> {
        store.put_work(&self.workflows, &self.jobs)
    }
}

/// The Fleet's agent records.
#[derive(Default)]
pub struct Agents(pub Vec<AgentRecord>);

impl Batch for Agents {
    fn append(&mut self, later: &mut Self) {
        self.0.append(&mut later.0);
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn commit(&self, store: &Store) -> Result<(), StoreError> {
        store.put_agents(&self.0)
    }
}

/// One queued item.
pub enum Item<B> {
    /// Records to make durable.
    Commit(B),
    /// A message for an agent, through the agent link.
    Send { agent: String, msg: Box<CoordinatorMessage> },
    /// Run after every earlier commit (acknowledgements to users, barriers).
    After(Box<dyn FnOnce() + Send>),
}

/// Handle to a writer thread. Dropping it ends the thread once the queue is drained.
pub struct Writer<B> {
    tx: mpsc::Sender<Item<B>>,
}

/// Called once, from the writer thread, when the store cannot be written any more.
pub type OnBroken = Box<dyn FnOnce(String) + Send>;

/// Pauses before each retry of a failed commit (about 4 s in all: long enough for a
/// transient error such as a full disk being cleared by log rotation, short enough that
/// agents waiting on awards and acks are not left hanging).
const COMMIT_RETRY_DELAYS_MS: [u64; 5] = [10, 50, 200, 1_000, 3_000];

impl<B: Batch> Writer<B> {
    /// `link` delivers agent messages; `on_broken` is told why when a commit keeps
    /// failing (nothing queued after it is delivered).
    pub fn spawn(
        name: &str,
        store: Arc<Store>,
        link: Arc<AgentLink>,
        on_broken: OnBroken,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Item<B>>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(&store, &link, rx, on_broken))?;
        Ok(Writer { tx })
    }

    pub fn commit(&self, batch: B) {
        if !batch.is_empty() {
            self.push(Item::Commit(batch));
        }
    }

    pub fn send(&self, agent: &str, msg: CoordinatorMessage) {
        self.push(Item::Send { agent: agent.to_string(), msg: Box::new(msg) });
    }

    /// Run `f` once everything queued before it is durable and delivered.
    pub fn after(&self, f: impl FnOnce() + Send + 'static) {
        self.push(Item::After(Box::new(f)));
    }

    /// Resolves once everything queued before it is durable and delivered.
    pub fn barrier(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.after(move || {
            // A barrier nobody waits for any more is simply passed.
            let _ = tx.send(());
        });
        rx
    }

    fn push(&self, item: Item<B>) {
        // The thread only ends when this handle is dropped or it panicked; then there is
        // nobody left to deliver to either.
        if self.tx.send(item).is_err() {
            warn!("store writer is gone; item dropped");
        }
    }
}

/// Commits start at most this often. A commit costs CPU (page writes, fsync) whatever
/// its size: back to back at ~3 ms each they took CPU that a saturated 2-core host
/// needed for placing (measured: real-process placement ran 5-15 % slower than with the
/// Scheduler's former 5 ms batches). An item arriving after a quiet spell is not held.
const MIN_COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

/// Commit `records`, retrying after each of [`COMMIT_RETRY_DELAYS_MS`].
fn commit_with_retries<B: Batch>(records: &B, store: &Store) -> Result<(), StoreError> {
    let mut result = records.commit(store);
    for delay in COMMIT_RETRY_DELAYS_MS {
        let Err(e) = &result else { break };
        warn!(error = %e, retry_in_ms = delay, "could not persist state; nothing queued after it is delivered");
        std::thread::sleep(std::time::Duration::from_millis(delay));
        result = records.commit(store);
    }
    result
}

fn run<B: Batch>(
    store: &Store,
    link: &AgentLink,
    rx: mpsc::Receiver<Item<B>>,
    on_broken: OnBroken,
) {
    let mut last_commit: Option<std::time::Instant> = None;
    while let Ok(first) = rx.recv() {
        if let Some(t) = last_commit {
            if let Some(wait) = MIN_COMMIT_INTERVAL.checked_sub(t.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        // Everything queued meanwhile joins this batch.
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut records = B::default();
        for item in &mut batch {
            if let Item::Commit(b) = item {
                records.append(b);
            }
        }
        // Later records for the same key come later in the lists: the last write wins.
        if !records.is_empty() {
            last_commit = Some(std::time::Instant::now());
            if let Err(e) = commit_with_retries(&records, store) {
                // What waited for this commit must not leave without it.
                tracing::error!(error = %e, "the store cannot be written: stopping");
                on_broken(format!("the store cannot be written: {e}"));
                return;
            }
        }
        for item in batch {
            match item {
                Item::Commit(_) => {}
                Item::Send { agent, msg } => {
                    // Dropped (and counted) without a session: the agent reconciles when
                    // it reconnects.
                    link.send(&agent, *msg);
                }
                Item::After(f) => f(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc as tmpsc;

    /// A link that, for every message it is asked to deliver, looks in the store for the
    /// job record named by the message and reports (message, found) at that moment.
    fn probe(store: Arc<Store>) -> (Arc<AgentLink>, tmpsc::UnboundedReceiver<(String, bool)>) {
        let (tx, rx) = tmpsc::unbounded_channel();
        let link = AgentLink::calling(move |_agent, msg| {
            if let CoordinatorMessage::Release { auction } = msg {
                let found =
                    store.work().is_ok_and(|(_, jobs)| jobs.iter().any(|(k, _)| *k == auction));
                // Tests only: the recorder may be gone.
                let _ = tx.send((auction, found));
            }
        });
        (link, rx)
    }

    #[tokio::test]
    async fn messages_leave_in_order_and_only_after_the_commits_queued_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (link, mut rx) = probe(store.clone());
        let w = Writer::<Work>::spawn("t", store.clone(), link, Box::new(|_| {})).unwrap();
        // 200 rounds of "commit job-i, then send a message about job-i", queued far faster
        // than fsyncs complete, so most commits are merged into shared transactions.
        for i in 0..200 {
            let id = format!("job-{i}");
            let jobs = vec![(id.clone(), format!("{{\"n\":{i}}}").into_bytes())];
            w.commit(Work { workflows: Vec::new(), jobs });
            w.send("a", CoordinatorMessage::Release { auction: id });
        }
        w.barrier().await.unwrap();
        for i in 0..200 {
            let (id, found) = rx.recv().await.unwrap();
            assert_eq!(id, format!("job-{i}"), "messages delivered out of order");
            assert!(found, "{id} was delivered before its record was committed");
        }
        // The last write of a record wins within a merged transaction.
        w.commit(Work { workflows: Vec::new(), jobs: vec![("x".into(), b"1".to_vec())] });
        w.commit(Work { workflows: Vec::new(), jobs: vec![("x".into(), b"2".to_vec())] });
        w.barrier().await.unwrap();
        let (_, jobs) = store.work().unwrap();
        assert_eq!(jobs.iter().find(|(k, _)| k == "x").unwrap().1, b"2");
    }

    /// Fails its first `fails` commits (all of them with `u32::MAX`), then commits
    /// nothing; counts attempts.
    #[derive(Default)]
    struct Flaky {
        fails: u32,
        tries: Arc<std::sync::atomic::AtomicU32>,
        records: u32,
    }

    impl Batch for Flaky {
        fn append(&mut self, later: &mut Self) {
            self.records += std::mem::take(&mut later.records);
            if later.fails > 0 {
                self.fails = later.fails;
                self.tries = later.tries.clone();
            }
        }
        fn is_empty(&self) -> bool {
            self.records == 0
        }
        fn commit(&self, _store: &Store) -> Result<(), StoreError> {
            let n = self.tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n < self.fails {
                Err(StoreError::Db("injected commit failure".into()))
            } else {
                Ok(())
            }
        }
    }

    async fn flaky_writer(
        dir: &std::path::Path,
        fails: u32,
    ) -> (
        Writer<Flaky>,
        tmpsc::UnboundedReceiver<(String, bool)>,
        Arc<std::sync::atomic::AtomicU32>,
        tokio::sync::oneshot::Receiver<String>,
    ) {
        let store = Arc::new(Store::open(dir).unwrap());
        let (link, rx) = probe(store.clone());
        let (btx, brx) = tokio::sync::oneshot::channel();
        let w = Writer::<Flaky>::spawn(
            "t",
            store,
            link,
            Box::new(move |why| {
                // Tests only: the receiver may be gone.
                let _ = btx.send(why);
            }),
        )
        .unwrap();
        let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
        w.commit(Flaky { fails, tries: tries.clone(), records: 1 });
        w.send("a", CoordinatorMessage::Release { auction: "after".into() });
        (w, rx, tries, brx)
    }

    #[tokio::test]
    async fn a_failed_commit_is_retried_before_anything_queued_after_it_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (w, mut rx, tries, _broken) = flaky_writer(dir.path(), 2).await;
        w.barrier().await.unwrap();
        assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), 3, "two failures, one success");
        assert_eq!(rx.recv().await.map(|m| m.0), Some("after".to_string()));
    }

    #[tokio::test]
    async fn a_store_that_stays_broken_delivers_nothing_more_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let (w, mut rx, tries, broken) = flaky_writer(dir.path(), u32::MAX).await;
        let why = tokio::time::timeout(std::time::Duration::from_secs(10), broken)
            .await
            .expect("reported in time")
            .expect("reported");
        assert!(why.contains("injected commit failure"), "{why}");
        assert_eq!(
            tries.load(std::sync::atomic::Ordering::SeqCst),
            1 + COMMIT_RETRY_DELAYS_MS.len() as u32
        );
        // The message queued after the failed commit never left; nor does anything later.
        w.send("a", CoordinatorMessage::Release { auction: "later".into() });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "something was delivered after a failed commit");
    }
}
