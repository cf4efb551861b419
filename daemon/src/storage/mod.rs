//! Durable storage: SQLite on disk, behind small interfaces, with group commit.
//!
//! Every store runs on its own thread behind a [`Batcher`]: callers submit
//! closures, the thread runs every closure waiting in its queue inside one
//! transaction, commits once (one fsync for the lot), and only then answers
//! each caller. That is what makes "accepted" mean "on disk" without one fsync
//! per message. Each closure runs inside a savepoint, so one that fails
//! leaves no trace while the rest of its batch commits.
//!
//! **Architecture Invariant:** callers see a result only after the commit
//! that holds it; submission order is commit order.
//!
//! Jobs whose loss in a power cut costs nothing but a repeat (an agent's
//! ack: the message is delivered again and the agent drops the duplicate)
//! are submitted *lazy*. A batch of only lazy jobs commits without waiting
//! for the disk; the next durable commit's fsync covers it too, because the
//! write-ahead log is written in order. A process crash loses nothing
//! either way: the commit is in the kernel's page cache.
//!
//! The home's store is a trait ([`home::HomeStore`]) so that a deployment that
//! outgrows one machine can put another engine behind the same methods.

pub mod agent;
pub mod global;
pub mod home;

use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

/// Storage errors.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Db(String),
    #[error("storage thread has stopped")]
    Closed,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// The recipient does not take this from the sender.
    #[error("{}", crate::protocol::NOT_ACCEPTED)]
    NotAccepted,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

/// What a store must offer for batching.
pub trait Batchable: Send {
    fn begin(&mut self) -> Result<(), StoreError>;
    fn commit(&mut self) -> Result<(), StoreError>;
    fn rollback(&mut self);
    /// Marks the start of one job inside the batch.
    fn job_begin(&mut self) -> Result<(), StoreError>;
    /// Ends the job: keep its writes (`ok`) or undo them.
    fn job_end(&mut self, ok: bool) -> Result<(), StoreError>;
    /// Whether the next commits wait for the disk (called between
    /// transactions, only when the answer changes).
    fn set_durable(&mut self, durable: bool) -> Result<(), StoreError>;
}

impl<T: Batchable + ?Sized> Batchable for Box<T> {
    fn begin(&mut self) -> Result<(), StoreError> {
        (**self).begin()
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        (**self).commit()
    }
    fn rollback(&mut self) {
        (**self).rollback()
    }
    fn job_begin(&mut self) -> Result<(), StoreError> {
        (**self).job_begin()
    }
    fn job_end(&mut self, ok: bool) -> Result<(), StoreError> {
        (**self).job_end(ok)
    }
    fn set_durable(&mut self, durable: bool) -> Result<(), StoreError> {
        (**self).set_durable(durable)
    }
}

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

struct Job<S> {
    /// Must be on disk before the caller hears of it.
    durable: bool,
    run: Box<dyn FnOnce(&mut S) -> (bool, Completion) + Send>,
}

/// Most jobs in one transaction.
const MAX_BATCH: usize = 2048;

/// A handle to a store's thread. Cheap to clone.
pub struct Batcher<S> {
    tx: mpsc::Sender<Job<S>>,
}

impl<S> Clone for Batcher<S> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<S: Batchable + 'static> Batcher<S> {
    /// Moves `store` onto its own thread. The thread ends when the last
    /// handle is dropped.
    pub fn spawn(name: &str, mut store: S) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job<S>>();
        std::thread::Builder::new()
            .name(format!("store-{name}"))
            .spawn(move || {
                let mut durable = None;
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    let want = batch.iter().any(|j| j.durable);
                    if durable != Some(want) {
                        match store.set_durable(want) {
                            Ok(()) => durable = Some(want),
                            // Stay on the safe side: durable until told otherwise.
                            Err(e) => tracing::error!("storage: cannot set durability: {e}"),
                        }
                    }
                    run_batch(&mut store, batch);
                }
            })?;
        Ok(Batcher { tx })
    }

    /// Queues `f` now (so submission order is commit order) and returns a
    /// future of its result, ready once committed and on disk.
    pub fn submit<R, F>(&self, f: F) -> Pending<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> Result<R, StoreError> + Send + 'static,
    {
        self.queue(true, f)
    }

    /// Like [`submit`](Self::submit), for a job that a power cut may undo
    /// because repeating it is harmless: ready once committed, possibly
    /// before the disk has it.
    pub fn submit_lazy<R, F>(&self, f: F) -> Pending<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> Result<R, StoreError> + Send + 'static,
    {
        self.queue(false, f)
    }

    fn queue<R, F>(&self, durable: bool, f: F) -> Pending<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let run = Box::new(move |s: &mut S| {
            let r = f(s);
            let ok = r.is_ok();
            let done: Completion = Box::new(move |commit| {
                let _ = tx.send(commit.and(r));
            });
            (ok, done)
        });
        let job = Job { durable, run };
        // If the thread is gone, the job (and its sender) is dropped and the
        // receiver reports Closed.
        let _ = self.tx.send(job);
        Pending { rx }
    }

    /// Submits and waits.
    pub async fn run<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> Result<R, StoreError> + Send + 'static,
    {
        self.submit(f).await
    }
}

fn run_batch<S: Batchable>(store: &mut S, batch: Vec<Job<S>>) {
    if let Err(e) = store.begin() {
        for job in batch {
            // Run nothing; tell everyone.
            drop(job);
            tracing::error!("storage: cannot begin a transaction: {e}");
        }
        return;
    }
    let mut done = Vec::with_capacity(batch.len());
    for job in batch {
        if let Err(e) = store.job_begin() {
            tracing::error!("storage: savepoint: {e}");
        }
        let (ok, c) = (job.run)(store);
        if let Err(e) = store.job_end(ok) {
            tracing::error!("storage: release savepoint: {e}");
        }
        done.push(c);
    }
    let commit = store.commit();
    if let Err(e) = &commit {
        tracing::error!("storage: commit failed: {e}");
        store.rollback();
    }
    for c in done {
        c(commit.clone());
    }
}

/// A submitted job's result, ready after its batch commits.
pub struct Pending<R> {
    rx: oneshot::Receiver<Result<R, StoreError>>,
}

impl<R> Future for Pending<R> {
    type Output = Result<R, StoreError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

/// Opens a SQLite database for durable use: WAL, fsync on every commit,
/// waits on locks held by admin commands.
pub fn open_sqlite(path: &std::path::Path) -> Result<rusqlite::Connection, StoreError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Db(format!("cannot create {}: {e}", dir.display())))?;
    }
    let c = rusqlite::Connection::open(path)
        .map_err(|e| StoreError::Db(format!("cannot open {}: {e}", path.display())))?;
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    // Every statement on the hot paths is prepared once and kept: rusqlite's
    // default of 16 is fewer than the home's message path uses, and an
    // evicted statement is parsed again on its next use.
    c.set_prepared_statement_cache_capacity(64);
    // `temp_store = MEMORY` (below) also keeps each job's savepoint journal
    // in memory; past 64 KiB SQLite would spill it to a temp file and write
    // every saved page with its own pwrite, a fifth of the CPU in a flood.
    // Keep each statement's plan for good: without this, SQLite re-plans a
    // statement on every new parameter value where the value could change
    // the plan (a LIMIT ?, a subquery), which on the ack path cost a full
    // parse per message.
    c.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    c.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA temp_store = MEMORY;
         PRAGMA foreign_keys = ON;",
    )?;
    Ok(c)
}

/// Moves a busy WAL database's checkpoints off its storage thread.
///
/// SQLite checkpoints inside the commit that crosses 1,000 log pages: it
/// copies the log into the database and fsyncs it, 3 to 7 ms here, and every
/// job queued behind that commit waits. The owner turns automatic
/// checkpoints off and calls [`Checkpointer::committed`] after each commit;
/// every so many commits this thread runs a passive checkpoint on its own
/// connection, which never blocks the writer.
pub(crate) struct Checkpointer {
    tx: mpsc::SyncSender<()>,
    commits: u32,
}

/// Commits between checkpoints: about the 1,000 pages SQLite would wait for.
const CHECKPOINT_EVERY: u32 = 100;

impl Checkpointer {
    /// Opens a second connection to `path`; `conn` (the writer's) stops
    /// checkpointing by itself.
    pub(crate) fn spawn(
        conn: &rusqlite::Connection,
        path: &std::path::Path,
    ) -> Result<Self, StoreError> {
        let ckpt = open_sqlite(path)?;
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
        ckpt.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let r = ckpt.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                    if let Err(e) = r {
                        tracing::warn!("storage: checkpoint failed (will retry): {e}");
                    }
                }
            })
            .map_err(|e| StoreError::Db(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer { tx, commits: 0 })
    }

    pub(crate) fn committed(&mut self) {
        self.commits += 1;
        if self.commits >= CHECKPOINT_EVERY {
            self.commits = 0;
            // Full means one is already due: nothing more to ask.
            let _ = self.tx.try_send(());
        }
    }
}

/// Runs a statement without parameters from the statement cache: the batch
/// machinery runs these thousands of times a second.
fn run_cached(c: &rusqlite::Connection, sql: &str) -> Result<(), rusqlite::Error> {
    c.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// In WAL mode `NORMAL` skips the fsync at commit; `FULL` does it, and it
/// covers every earlier commit in the log.
pub(crate) fn sqlite_set_durable(
    c: &rusqlite::Connection,
    durable: bool,
) -> Result<(), StoreError> {
    run_cached(
        c,
        if durable {
            "PRAGMA synchronous = FULL"
        } else {
            "PRAGMA synchronous = NORMAL"
        },
    )?;
    Ok(())
}

/// [`Batchable`] for a plain SQLite connection.
pub(crate) fn sqlite_begin(c: &rusqlite::Connection) -> Result<(), StoreError> {
    run_cached(c, "BEGIN IMMEDIATE")?;
    Ok(())
}
pub(crate) fn sqlite_commit(c: &rusqlite::Connection) -> Result<(), StoreError> {
    run_cached(c, "COMMIT")?;
    Ok(())
}
pub(crate) fn sqlite_rollback(c: &rusqlite::Connection) {
    let _ = c.execute_batch("ROLLBACK");
}
pub(crate) fn sqlite_job_begin(c: &rusqlite::Connection) -> Result<(), StoreError> {
    run_cached(c, "SAVEPOINT job")?;
    Ok(())
}
pub(crate) fn sqlite_job_end(c: &rusqlite::Connection, ok: bool) -> Result<(), StoreError> {
    if ok {
        run_cached(c, "RELEASE job")?;
    } else {
        c.execute_batch("ROLLBACK TO job; RELEASE job")?;
    }
    Ok(())
}

/// Implements [`Batchable`] for a struct with a `conn: rusqlite::Connection`.
macro_rules! sqlite_batchable {
    ($t:ty) => {
        impl $crate::storage::Batchable for $t {
            fn begin(&mut self) -> Result<(), $crate::storage::StoreError> {
                $crate::storage::sqlite_begin(&self.conn)
            }
            fn commit(&mut self) -> Result<(), $crate::storage::StoreError> {
                $crate::storage::sqlite_commit(&self.conn)
            }
            fn rollback(&mut self) {
                $crate::storage::sqlite_rollback(&self.conn)
            }
            fn job_begin(&mut self) -> Result<(), $crate::storage::StoreError> {
                $crate::storage::sqlite_job_begin(&self.conn)
            }
            fn job_end(&mut self, ok: bool) -> Result<(), $crate::storage::StoreError> {
                $crate::storage::sqlite_job_end(&self.conn, ok)
            }
            fn set_durable(&mut self, durable: bool) -> Result<(), $crate::storage::StoreError> {
                $crate::storage::sqlite_set_durable(&self.conn, durable)
            }
        }
    };
}
pub(crate) use sqlite_batchable;

/// Hex of SHA-256, for device secrets (high-entropy tokens need no slow hash).
pub fn secret_hash(secret: &str) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes()).as_ref())
}

/// A fresh 256-bit secret, hex.
pub fn new_secret() -> String {
    let mut b = [0u8; 32];
    // aws-lc's generator only fails if the OS has no randomness at all.
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        panic!("the operating system gave no random bytes");
    }
    hex(&b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter {
        conn: rusqlite::Connection,
    }
    sqlite_batchable!(Counter);

    #[tokio::test]
    async fn failed_job_leaves_no_trace_and_others_commit() {
        let dir = std::env::temp_dir().join(format!("popupd-batch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let conn = open_sqlite(&dir.join("t.sqlite")).unwrap();
        conn.execute_batch("CREATE TABLE t(x INTEGER)").unwrap();
        let b = Batcher::spawn("t", Counter { conn }).unwrap();
        let p1 = b.submit(|s| Ok(s.conn.execute("INSERT INTO t VALUES (1)", [])?));
        let p2 = b.submit(|s| {
            s.conn.execute("INSERT INTO t VALUES (2)", [])?;
            Err::<(), _>(StoreError::Conflict("no".into()))
        });
        let p3 = b.submit(|s| Ok(s.conn.execute("INSERT INTO t VALUES (3)", [])?));
        assert_eq!(p1.await, Ok(1));
        assert!(p2.await.is_err());
        assert_eq!(p3.await, Ok(1));
        let sum: i64 = b
            .run(|s| Ok(s.conn.query_row("SELECT sum(x) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(sum, 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
