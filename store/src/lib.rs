//! popupd's storage machinery: SQLite on disk (or PostgreSQL, [`pg`])
//! with group commit. The
//! stores themselves (the agent's, the home's, the global server's) live
//! with the daemon and are built on this; this crate knows nothing of
//! messages or roles.
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
//! Not every caller needs to wait for the disk. A job says when its
//! caller hears of it ([`Batcher::submit`] and its siblings):
//!
//! - *on disk* (the default): after the commit is durable;
//! - *lazy*: after the commit, and no fsync is asked for (an agent's ack: if
//!   a power cut undoes it, the events are sent again and dropped as repeats).
//!
//! A job may also leave work for the moment its batch commits
//! ([`Batcher::submit_then`], [`Batcher::lazy_then`]): the store thread does
//! it right after the commit, in commit order, before the disk has the batch
//! and before any caller hears. A home hands a new message to its recipient
//! that way and tells the sender "accepted" only once it is on disk. A power
//! cut in between loses the message only at the home: the sender, never
//! told, sends it again under the same id, and the recipient's agent drops
//! the repeat. Doing it on the store thread, not in the caller's task, saves
//! a hand-off per message and keeps each user's events in order.
//!
//! A store whose commits are durable by themselves (the agent's, the global
//! server's) treats both alike. A process crash loses nothing in any
//! case: a commit is in the kernel's page cache.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::task::{Context, Poll};

use tokio::sync::oneshot;

pub mod pg;
#[cfg(feature = "test-server")]
pub mod pg_test_server;
mod stats;
pub use stats::{Health, Observer};

/// Storage errors.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Db(String),
    /// The disk (or the file system's quota) has no room for the change.
    #[error("database: the disk is full: {0}")]
    Full(String),
    /// The database cannot be reached (a database server that is down
    /// or restarting); the same change may work once it is back.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("storage thread has stopped")]
    Closed,
    /// Not run: an earlier job of the same [`Chain`] failed.
    #[error("not stored: an earlier change on this connection failed")]
    Aborted,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// The recipient does not take this from the sender.
    #[error("not accepted by the recipient")]
    NotAccepted,
    /// A limit of the recipient's is reached (the message says which).
    #[error("{0}")]
    Quota(String),
}

impl StoreError {
    /// Whether the store failed (and the same change may work later), as
    /// opposed to answering that the change is wrong.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            StoreError::Db(_)
                | StoreError::Full(_)
                | StoreError::Unavailable(_)
                | StoreError::Closed
                | StoreError::Aborted
        )
    }

    /// What a client may be told of a failure: the cause in a few words,
    /// without the database's own text.
    pub fn client_reason(&self) -> &'static str {
        match self {
            StoreError::Full(_) => "its disk is full",
            StoreError::Unavailable(_) => "its database is temporarily unavailable",
            StoreError::Closed => "it is shutting down",
            _ => "its storage failed",
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full(e.to_string()),
            _ => StoreError::Db(e.to_string()),
        }
    }
}

/// Jobs that must take effect in the order they were submitted, or not at
/// all: once one fails for want of the store ([`StoreError::is_failure`]),
/// the store refuses every later job of the chain unrun, with
/// [`StoreError::Aborted`]. Without it, a job that fails (a full disk) and
/// a later one that succeeds (space came back) would commit out of order
/// once the first is sent again. One chain per connection: the connection
/// ends after a failure and the other side resends, in order, on a new one.
#[derive(Clone, Default)]
pub struct Chain(Arc<AtomicBool>);

impl Chain {
    /// Whether a job of this chain failed.
    pub fn is_broken(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
    fn break_it(&self) {
        self.0.store(true, Ordering::Release)
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
    /// For a store whose commits do not wait for the disk by themselves: a
    /// function, run on a thread of its own, that makes every commit so far
    /// durable. The default, `None`, is for stores whose commits do.
    fn syncer(&mut self) -> Result<Option<Syncer>, StoreError> {
        Ok(None)
    }
    /// Called when no job waits, before the thread sleeps: the time for
    /// upkeep that would stall a batch. Returns how soon to be called
    /// again if no job comes meanwhile (`None`: not until after the next
    /// batch), for upkeep done a step at a time.
    fn idle(&mut self) -> Option<std::time::Duration> {
        None
    }
    /// Most jobs in one transaction ([`MAX_BATCH`] unless the store says
    /// fewer).
    fn max_batch(&self) -> usize {
        MAX_BATCH
    }
}

/// See [`Batchable::syncer`].
pub type Syncer = Box<dyn FnMut() -> Result<(), StoreError> + Send>;

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
    fn syncer(&mut self) -> Result<Option<Syncer>, StoreError> {
        (**self).syncer()
    }
    fn idle(&mut self) -> Option<std::time::Duration> {
        (**self).idle()
    }
    fn max_batch(&self) -> usize {
        (**self).max_batch()
    }
}

/// When a job's caller hears of it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum When {
    Lazy,
    OnDisk,
}

/// Called with the commit's (or the sync's) outcome.
type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Work a job leaves for the moment its batch commits.
type Then = Box<dyn FnOnce() + Send>;

struct Job<S> {
    when: When,
    chain: Option<Chain>,
    /// Runs the job; with `false` (its chain is broken) it only reports
    /// [`StoreError::Aborted`].
    run: Run<S>,
}

/// A job's body, as the store thread calls it.
type Run<S> = Box<dyn FnOnce(&mut S, bool) -> Ran + Send>;

/// A job that has run, its batch not yet committed.
struct Ran {
    ok: bool,
    /// It failed for want of the store ([`StoreError::is_failure`]).
    failed: bool,
    then: Option<Then>,
    done: Completion,
}

/// Most jobs in one transaction, by default.
pub const MAX_BATCH: usize = 2048;

/// A handle to a store's thread. Cheap to clone.
pub struct Batcher<S> {
    tx: mpsc::Sender<Job<S>>,
    health: Arc<Health>,
}

impl<S> Clone for Batcher<S> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
            health: self.health.clone(),
        }
    }
}

impl<S: Batchable + 'static> Batcher<S> {
    /// Moves `store` onto its own thread. The thread ends when the last
    /// handle is dropped.
    ///
    /// Called inside a Tokio runtime, the thread runs in its context, so the
    /// work jobs leave for their commit may spawn tasks.
    pub fn spawn(name: &str, store: S) -> std::io::Result<Self> {
        Self::spawn_observed(name, store, Arc::new(stats::Nobody))
    }

    /// Like [`spawn`](Self::spawn), telling `obs` of every batch and sync.
    pub fn spawn_observed(name: &str, store: S, obs: Arc<dyn Observer>) -> std::io::Result<Self> {
        Self::spawn_with(name, store, obs, || {})
    }

    /// Like [`spawn_observed`](Self::spawn_observed), calling `after_batch`
    /// on the store thread once each batch's commit work has run. Commit
    /// work that hands results to another thread can gather them and let
    /// `after_batch` hand them on at once: one wake-up of the receiver per
    /// batch, not one per job (each of which would preempt the store
    /// thread on a busy machine).
    pub fn spawn_with(
        name: &str,
        mut store: S,
        obs: Arc<dyn Observer>,
        mut after_batch: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Self> {
        let health = Arc::new(Health::default());
        let (tx, rx) = mpsc::channel::<Job<S>>();
        let syncer = store.syncer().map_err(std::io::Error::other)?;
        // With a syncer, fsyncs run on their own thread: the next batch
        // commits while the last one's sync is under way, and one fsync
        // serves every batch that finished before it started.
        let to_sync = match syncer {
            Some(mut sync) => {
                let obs = obs.clone();
                let (sync_tx, sync_rx) = mpsc::channel::<Vec<Completion>>();
                std::thread::Builder::new()
                    .name(format!("sync-{name}"))
                    .spawn(move || {
                        while let Ok(mut waiting) = sync_rx.recv() {
                            while let Ok(more) = sync_rx.try_recv() {
                                waiting.extend(more);
                            }
                            let t = std::time::Instant::now();
                            let r = sync();
                            obs.synced(t.elapsed());
                            if let Err(e) = &r {
                                tracing::error!("storage: sync failed: {e}");
                            }
                            for c in waiting {
                                c(r.clone());
                            }
                        }
                    })?;
                Some(sync_tx)
            }
            None => None,
        };
        let rt = tokio::runtime::Handle::try_current().ok();
        let watch = health.clone();
        std::thread::Builder::new()
            .name(format!("store-{name}"))
            .spawn(move || {
                let _rt = rt.as_ref().map(|h| h.enter());
                loop {
                    let first = match rx.try_recv() {
                        Ok(j) => j,
                        Err(mpsc::TryRecvError::Empty) => {
                            // Upkeep, a step at a time, while no job comes.
                            let mut next = store.idle();
                            let job = loop {
                                match next {
                                    None => break rx.recv().ok(),
                                    Some(after) => match rx.recv_timeout(after) {
                                        Ok(j) => break Some(j),
                                        Err(mpsc::RecvTimeoutError::Timeout) => next = store.idle(),
                                        Err(mpsc::RecvTimeoutError::Disconnected) => break None,
                                    },
                                }
                            };
                            match job {
                                Some(j) => j,
                                None => break,
                            }
                        }
                        Err(mpsc::TryRecvError::Disconnected) => break,
                    };
                    let mut batch = vec![first];
                    let max = store.max_batch();
                    while batch.len() < max {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    let needs_sync = batch.iter().any(|j| j.when != When::Lazy);
                    let (jobs, t) = (batch.len(), std::time::Instant::now());
                    let (commit, thens, done) = run_batch(&mut store, batch);
                    obs.batch(jobs, t.elapsed());
                    watch.taken(jobs, commit.is_ok());
                    if commit.is_ok() {
                        for then in thens {
                            then();
                        }
                        after_batch();
                    }
                    let Some(to_sync) = &to_sync else {
                        // Committed is durable here.
                        for (_, c) in done {
                            c(commit.clone());
                        }
                        continue;
                    };
                    let mut after_sync = Vec::new();
                    for (when, c) in done {
                        if when == When::OnDisk && commit.is_ok() {
                            after_sync.push(c);
                        } else {
                            c(commit.clone());
                        }
                    }
                    if needs_sync && commit.is_ok() && to_sync.send(after_sync).is_err() {
                        tracing::error!("storage: the sync thread has stopped");
                    }
                }
            })?;
        Ok(Batcher { tx, health })
    }

    /// How the store is doing: jobs waiting, the last commit.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Queues `f` now (so submission order is commit order) and returns a
    /// future of its result, ready once committed and on disk.
    pub fn submit<R, F>(&self, f: F) -> Pending<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> Result<R, StoreError> + Send + 'static,
    {
        self.queue(When::OnDisk, None, move |s| f(s).map(|r| (r, None)))
    }

    /// Like [`submit`](Self::submit), but `f` also returns work for the
    /// moment its batch commits, which the store thread does then: before
    /// the disk has the batch, and before this future is ready.
    pub fn submit_then<R, T, F>(&self, f: F) -> Pending<R>
    where
        R: Send + 'static,
        T: FnOnce() + Send + 'static,
        F: FnOnce(&mut S) -> Result<(R, T), StoreError> + Send + 'static,
    {
        self.queue(When::OnDisk, None, move |s| {
            f(s).map(|(r, then)| (r, Some(Box::new(then) as Then)))
        })
    }

    /// Like [`submit_then`](Self::submit_then), as a link of `chain`: not
    /// run if an earlier job of the chain failed.
    pub fn chain_then<R, T, F>(&self, chain: &Chain, f: F) -> Pending<R>
    where
        R: Send + 'static,
        T: FnOnce() + Send + 'static,
        F: FnOnce(&mut S) -> Result<(R, T), StoreError> + Send + 'static,
    {
        self.queue(When::OnDisk, Some(chain.clone()), move |s| {
            f(s).map(|(r, then)| (r, Some(Box::new(then) as Then)))
        })
    }

    /// Like [`submit`](Self::submit), for a job that a power cut may undo
    /// because repeating it is harmless: ready once committed, and no sync
    /// is asked for.
    pub fn submit_lazy<R, F>(&self, f: F) -> Pending<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> Result<R, StoreError> + Send + 'static,
    {
        self.queue(When::Lazy, None, move |s| f(s).map(|r| (r, None)))
    }

    /// Queues `f`, lazy as with [`submit_lazy`](Self::submit_lazy), and
    /// does the work it returns on the store thread once its batch commits.
    /// The future is ready once that work is done; a caller that does not
    /// wait drops it, and `f` reports its own errors.
    pub fn lazy_then<T, F>(&self, f: F) -> Pending<()>
    where
        T: FnOnce() + Send + 'static,
        F: FnOnce(&mut S) -> Result<T, StoreError> + Send + 'static,
    {
        self.queue(When::Lazy, None, move |s| {
            f(s).map(|then| ((), Some(Box::new(then) as Then)))
        })
    }

    /// Runs `f`, which only reads, and waits for it: ready once its batch
    /// commits, and no sync is asked for. It may see commits of other jobs
    /// that are not on disk yet, as every reader of the store may; a reply
    /// that waits for the disk is [`run`](Self::run)'s.
    pub async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> Result<R, StoreError> + Send + 'static,
    {
        self.submit_lazy(f).await
    }

    fn queue<R, F>(&self, when: When, chain: Option<Chain>, f: F) -> Pending<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> Result<(R, Option<Then>), StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let run = Box::new(move |s: &mut S, go: bool| {
            let ran = if go { f(s) } else { Err(StoreError::Aborted) };
            let (r, then) = match ran {
                Ok((r, then)) => (Ok(r), then),
                Err(e) => (Err(e), None),
            };
            let ok = r.is_ok();
            let failed = r.as_ref().is_err_and(StoreError::is_failure);
            let done: Completion = Box::new(move |commit| {
                let _ = tx.send(commit.and(r));
            });
            Ran {
                ok,
                failed,
                then,
                done,
            }
        });
        let job = Job { when, chain, run };
        // If the thread is gone, the job (and its sender) is dropped and the
        // receiver reports Closed.
        self.health.queued();
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

/// What a batch left: the commit's outcome, the work its jobs left for the
/// commit, and each job's completion, none of them done yet.
type Batch = (Result<(), StoreError>, Vec<Then>, Vec<(When, Completion)>);

/// Runs a batch in one transaction.
fn run_batch<S: Batchable>(store: &mut S, batch: Vec<Job<S>>) -> Batch {
    if let Err(e) = store.begin() {
        // Run nothing: every job hears the error, and its chain breaks.
        tracing::error!("storage: cannot begin a transaction: {e}");
        let done = batch
            .into_iter()
            .map(|job| {
                if let Some(c) = &job.chain {
                    c.break_it();
                }
                (job.when, (job.run)(store, false).done)
            })
            .collect();
        return (Err(e), Vec::new(), done);
    }
    let mut thens = Vec::new();
    let mut done = Vec::with_capacity(batch.len());
    let mut chains = Vec::new();
    for job in batch {
        let go = !job.chain.as_ref().is_some_and(Chain::is_broken);
        if let Err(e) = store.job_begin() {
            tracing::error!("storage: savepoint: {e}");
        }
        let ran = (job.run)(store, go);
        // A job that said Ok may still have been undone (a statement of it
        // failed on a server that then needs the rollback): its caller
        // hears why, and its commit work is not done.
        let mut undone = None;
        if let Err(e) = store.job_end(ran.ok) {
            tracing::error!("storage: ending a job: {e}");
            if ran.ok {
                undone = Some(e);
            }
        }
        if let Some(c) = job.chain {
            if ran.failed || undone.as_ref().is_some_and(StoreError::is_failure) {
                c.break_it();
            }
            chains.push(c);
        }
        let done_job = ran.done;
        match undone {
            None => {
                thens.extend(ran.then);
                done.push((job.when, done_job));
            }
            Some(e) => {
                let c: Completion = Box::new(move |commit| done_job(commit.and(Err(e))));
                done.push((job.when, c));
            }
        }
    }
    let commit = store.commit();
    if let Err(e) = &commit {
        tracing::error!("storage: commit failed: {e}");
        store.rollback();
        // Before the next batch runs: a later job of these chains must
        // not commit where this one did not.
        for c in chains {
            c.break_it();
        }
    }
    (commit, thens, done)
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
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        // Folders it makes are the owner's alone; existing ones are left
        // as the administrator made them.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StoreError::Db(format!("cannot create {}: {e}", dir.display())))?;
    }
    let c = rusqlite::Connection::open(path)
        .map_err(|e| StoreError::Db(format!("cannot open {}: {e}", path.display())))?;
    // The owner's alone (messages, secrets' hashes), before its log and
    // shared-memory files exist: SQLite gives them the database's mode.
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        if let Ok(m) = std::fs::metadata(&p)
            && m.permissions().mode() & 0o077 != 0
        {
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
        }
    }
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    // Every statement on the hot paths is prepared once and kept: rusqlite's
    // default of 16 is fewer than the home's message path uses, and an
    // evicted statement is parsed again on its next use.
    c.set_prepared_statement_cache_capacity(64);
    // `temp_store = MEMORY` (below) also keeps each job's savepoint journal
    // in memory; past 64 KiB SQLite would spill it to a temp file and write
    // every saved page with its own pwrite, a large share of the CPU in a
    // flood.
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

/// One step of a store's schema: brings a database from the version before
/// it to its own. Step `i` of a list (from 0) makes version `i + 1`.
pub type Step = fn(&rusqlite::Connection) -> Result<(), StoreError>;

/// Brings the database `conn` (the file `path`) up to the last of `steps`,
/// using SQLite's `user_version` as the schema version. Each step runs in a
/// transaction of its own with the version it makes, so a crash midway
/// leaves a database a restart upgrades. Databases made before versions were
/// kept have version 0, and the first step of each store creates its tables
/// only if they do not exist. A database from a newer popupd is refused.
pub fn migrate(
    conn: &rusqlite::Connection,
    path: &std::path::Path,
    steps: &[Step],
) -> Result<(), StoreError> {
    let have: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let want = steps.len() as i64;
    if have > want {
        return Err(StoreError::Db(format!(
            "{} has schema version {have}, newer than this popupd knows ({want}): run the popupd that made it, or a newer one",
            path.display()
        )));
    }
    for (i, step) in steps.iter().enumerate().skip(have as usize) {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = step(conn).and_then(|()| {
            conn.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
            Ok(conn.execute_batch("COMMIT")?)
        });
        if let Err(e) = r {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(StoreError::Db(format!(
                "upgrading {} to schema version {}: {e}",
                path.display(),
                i + 1
            )));
        }
        if have > 0 || i > 0 {
            tracing::info!(file = %path.display(), version = i + 1, "database schema upgraded");
        }
    }
    Ok(())
}

/// A [`Syncer`] for a WAL database whose commits do not wait for the disk
/// (`synchronous = NORMAL`): it fsyncs the log, which holds every commit
/// not yet checkpointed (a checkpoint syncs the log before it copies).
pub fn wal_syncer(db: &std::path::Path) -> Result<Syncer, StoreError> {
    let mut path = db.as_os_str().to_owned();
    path.push("-wal");
    let path = std::path::PathBuf::from(path);
    // SQLite keeps the log file while a connection is open, so one handle
    // serves for good.
    let wal = std::fs::File::open(&path)
        .map_err(|e| StoreError::Db(format!("cannot open {}: {e}", path.display())))?;
    Ok(Box::new(move || {
        wal.sync_data()
            .map_err(|e| StoreError::Db(format!("fsync {}: {e}", path.display())))
    }))
}

/// Moves a busy WAL database's checkpoints off its storage thread.
///
/// SQLite checkpoints inside the commit that crosses 1,000 log pages: it
/// copies the log into the database and fsyncs it, and every job queued
/// behind that commit waits. The owner turns automatic
/// checkpoints off and calls [`Checkpointer::committed`] after each commit;
/// every so many commits this thread runs a passive checkpoint on its own
/// connection, which never blocks the writer.
///
/// A passive checkpoint copies the log as far as it was when it began, and
/// the writer starts the log over only once all of it is copied. Under
/// steady load new commits always arrive meanwhile, so the log would never
/// start over and would grow with every message. So when this
/// thread finds the log past [`TAIL_AFTER`], the owner copies the few pages
/// committed since, on its own connection between two batches (a small copy
/// and two fsyncs), and its next transaction starts the log over. It
/// does so when no job waits ([`Checkpointer::idle`]), so that the stall
/// holds up only jobs that come during it, or after [`TAIL_PATIENCE`]
/// commits if the queue is never empty.
pub struct Checkpointer {
    tx: mpsc::SyncSender<()>,
    commits: u32,
    every: u32,
    /// Set by the thread after a checkpoint that found the log past
    /// [`TAIL_AFTER`]: the owner finishes it.
    tail_due: Arc<AtomicBool>,
    /// Commits since the owner saw `tail_due` set.
    tail_waited: u32,
}

/// Commits between checkpoints: about the 1,000 pages SQLite would wait for.
const CHECKPOINT_EVERY: u32 = 100;

impl Checkpointer {
    /// Opens a second connection to `path`; `conn` (the writer's) stops
    /// checkpointing by itself.
    pub fn spawn(conn: &rusqlite::Connection, path: &std::path::Path) -> Result<Self, StoreError> {
        Self::spawn_with(conn, path, CHECKPOINT_EVERY, TAIL_AFTER)
    }

    fn spawn_with(
        conn: &rusqlite::Connection,
        path: &std::path::Path,
        every: u32,
        tail_after: u64,
    ) -> Result<Self, StoreError> {
        let ckpt = open_sqlite(path)?;
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
        ckpt.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let tail_due = Arc::new(AtomicBool::new(false));
        let due = tail_due.clone();
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    match passive_checkpoint(&ckpt) {
                        // The log did not start over since the last
                        // checkpoints: the writer finishes this one.
                        Ok(log) if log > tail_after => due.store(true, Ordering::Release),
                        Ok(_) => {}
                        Err(e) => tracing::warn!("storage: checkpoint failed (will retry): {e}"),
                    }
                }
            })
            .map_err(|e| StoreError::Db(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer {
            tx,
            commits: 0,
            every,
            tail_due,
            tail_waited: 0,
        })
    }

    /// Called by the owner after each commit, outside any transaction.
    pub fn committed(&mut self, conn: &rusqlite::Connection) {
        if self.tail_due.load(Ordering::Acquire) {
            self.tail_waited += 1;
            if self.tail_waited >= TAIL_PATIENCE {
                self.finish_tail(conn);
            }
        }
        self.commits += 1;
        if self.commits >= self.every {
            self.commits = 0;
            // Full means one is already due: nothing more to ask.
            let _ = self.tx.try_send(());
        }
    }

    /// Called by the owner when no job waits, outside any transaction.
    pub fn idle(&mut self, conn: &rusqlite::Connection) {
        if self.tail_due.load(Ordering::Acquire) {
            self.finish_tail(conn);
        }
    }

    fn finish_tail(&mut self, conn: &rusqlite::Connection) {
        self.tail_due.store(false, Ordering::Release);
        self.tail_waited = 0;
        let t0 = std::time::Instant::now();
        let r = passive_checkpoint(conn);
        tracing::debug!(
            "storage: the writer finished a checkpoint in {:?}",
            t0.elapsed()
        );
        if let Err(e) = r {
            tracing::warn!("storage: checkpoint failed (will retry): {e}");
        }
    }
}

/// Commits the owner waits for a moment with no job waiting, once the log
/// is due to start over, before it stalls a batch for it.
const TAIL_PATIENCE: u32 = 64;

/// Log pages past which the writer finishes a checkpoint itself: 64 MiB.
/// Each time stalls the writer for two fsyncs and a small copy, so not
/// often.
const TAIL_AFTER: u64 = 16384;

/// Runs a passive checkpoint; returns the size of the log, in pages.
fn passive_checkpoint(c: &rusqlite::Connection) -> Result<u64, rusqlite::Error> {
    c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
        .map(|n| n.max(0) as u64)
}

/// Runs a statement without parameters from the statement cache: the batch
/// machinery runs these thousands of times a second.
fn run_cached(c: &rusqlite::Connection, sql: &str) -> Result<(), rusqlite::Error> {
    c.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// [`Batchable`] for a plain SQLite connection.
pub fn sqlite_begin(c: &rusqlite::Connection) -> Result<(), StoreError> {
    run_cached(c, "BEGIN IMMEDIATE")?;
    Ok(())
}
pub fn sqlite_commit(c: &rusqlite::Connection) -> Result<(), StoreError> {
    run_cached(c, "COMMIT")?;
    Ok(())
}
pub fn sqlite_rollback(c: &rusqlite::Connection) {
    let _ = c.execute_batch("ROLLBACK");
}
pub fn sqlite_job_begin(c: &rusqlite::Connection) -> Result<(), StoreError> {
    run_cached(c, "SAVEPOINT job")?;
    Ok(())
}
pub fn sqlite_job_end(c: &rusqlite::Connection, ok: bool) -> Result<(), StoreError> {
    if ok {
        run_cached(c, "RELEASE job")?;
    } else {
        c.execute_batch("ROLLBACK TO job; RELEASE job")?;
    }
    Ok(())
}

/// Implements [`Batchable`] for a struct with a `conn: rusqlite::Connection`.
#[macro_export]
macro_rules! sqlite_batchable {
    ($t:ty) => {
        impl $crate::Batchable for $t {
            fn begin(&mut self) -> Result<(), $crate::StoreError> {
                $crate::sqlite_begin(&self.conn)
            }
            fn commit(&mut self) -> Result<(), $crate::StoreError> {
                $crate::sqlite_commit(&self.conn)
            }
            fn rollback(&mut self) {
                $crate::sqlite_rollback(&self.conn)
            }
            fn job_begin(&mut self) -> Result<(), $crate::StoreError> {
                $crate::sqlite_job_begin(&self.conn)
            }
            fn job_end(&mut self, ok: bool) -> Result<(), $crate::StoreError> {
                $crate::sqlite_job_end(&self.conn, ok)
            }
        }
    };
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

    #[test]
    fn the_log_starts_over_under_steady_load() {
        // A writer that never pauses (its queue is never empty) and one
        // that is idle now and then.
        for idle_every in [None, Some(7)] {
            log_starts_over(idle_every);
        }
    }

    fn log_starts_over(idle_every: Option<usize>) {
        // A passive checkpoint alone never finds the moment to let the log
        // start over.
        let dir =
            std::env::temp_dir().join(format!("popupd-ckpt-{}-{idle_every:?}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.sqlite");
        let conn = open_sqlite(&path).unwrap();
        conn.execute_batch("CREATE TABLE t(x BLOB)").unwrap();
        let mut ck = Checkpointer::spawn_with(&conn, &path, 10, 256).unwrap();
        for i in 0..3000 {
            sqlite_begin(&conn).unwrap();
            conn.execute("INSERT INTO t VALUES (zeroblob(3000))", [])
                .unwrap();
            sqlite_commit(&conn).unwrap();
            ck.committed(&conn);
            if idle_every.is_some_and(|n| i % n == 0) {
                ck.idle(&conn);
            }
        }
        let wal = std::fs::metadata(dir.join("t.sqlite-wal")).unwrap().len();
        std::fs::remove_dir_all(&dir).unwrap();
        // 3,000 commits: 37 MB of log when it never started over; 256
        // pages plus what came during a checkpoint when it does (more on a
        // busy machine, where the checkpoint thread waits for a core).
        assert!(wal < 8 << 20, "the log grew to {wal} bytes");
    }

    /// A store whose commits wait for a syncer that the test holds back.
    struct Gated {
        syncs: Arc<std::sync::atomic::AtomicUsize>,
        gate: Arc<std::sync::Mutex<()>>,
    }

    impl Batchable for Gated {
        fn begin(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn commit(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn rollback(&mut self) {}
        fn job_begin(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn job_end(&mut self, _: bool) -> Result<(), StoreError> {
            Ok(())
        }
        fn syncer(&mut self) -> Result<Option<Syncer>, StoreError> {
            let (syncs, gate) = (self.syncs.clone(), self.gate.clone());
            Ok(Some(Box::new(move || {
                let _held = gate.lock().unwrap_or_else(|e| e.into_inner());
                syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })))
        }
    }

    use std::sync::Arc;

    async fn wait<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(5), f)
            .await
            .expect("timed out")
    }

    #[tokio::test]
    // The guard is the held-back disk; the sync thread is what waits on it.
    #[allow(clippy::await_holding_lock)]
    async fn commit_work_and_reads_come_before_the_sync_on_disk_after_lazy_never_waits() {
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gate = Arc::new(std::sync::Mutex::new(()));
        let b = Batcher::spawn(
            "gated",
            Gated {
                syncs: syncs.clone(),
                gate: gate.clone(),
            },
        )
        .unwrap();
        // Lazy: answered, and no sync asked for.
        wait(b.submit_lazy(|_| Ok(1))).await.unwrap();
        assert_eq!(syncs.load(std::sync::atomic::Ordering::SeqCst), 0);
        // With the disk held back, a job's commit work is done, but neither
        // its answer nor a plain durable job's comes.
        let held = gate.lock().unwrap();
        let (did_tx, did) = std::sync::mpsc::channel();
        let mut then = Box::pin(b.submit_then(move |_| Ok((2, move || did_tx.send(()).unwrap()))));
        let mut durable = Box::pin(b.submit(|_| Ok(3)));
        // A read is answered although a sync is held back behind it.
        assert_eq!(wait(b.read(|_| Ok(4))).await.unwrap(), 4);
        did.recv_timeout(std::time::Duration::from_secs(5))
            .expect("commit work done before the sync");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(futures_util::FutureExt::now_or_never(&mut then).is_none());
        assert!(futures_util::FutureExt::now_or_never(&mut durable).is_none());
        drop(held);
        assert_eq!(wait(then).await.unwrap(), 2);
        assert_eq!(wait(durable).await.unwrap(), 3);
        assert!(syncs.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }

    /// A store whose commits fail while `full` is set.
    struct Flaky {
        full: Arc<AtomicBool>,
    }

    impl Batchable for Flaky {
        fn begin(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn commit(&mut self) -> Result<(), StoreError> {
            if self.full.load(Ordering::SeqCst) {
                Err(StoreError::Full("no room".into()))
            } else {
                Ok(())
            }
        }
        fn rollback(&mut self) {}
        fn job_begin(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn job_end(&mut self, _: bool) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn after_a_failure_the_rest_of_a_chain_is_refused_unrun() {
        let full = Arc::new(AtomicBool::new(false));
        let b = Batcher::spawn("chain", Flaky { full: full.clone() }).unwrap();
        let chain = Chain::default();
        let other = Chain::default();
        // A job's own failure breaks its chain; an answer (a refusal) does not.
        let refused = b.chain_then(&chain, |_| Err::<((), fn()), _>(StoreError::NotAccepted));
        assert_eq!(wait(refused).await, Err(StoreError::NotAccepted));
        assert!(!chain.is_broken());
        let failed = b.chain_then(&chain, |_| {
            Err::<((), fn()), _>(StoreError::Db("io".into()))
        });
        let (ran_tx, ran) = std::sync::mpsc::channel();
        let after = b.chain_then(&chain, move |_| {
            ran_tx.send(()).unwrap();
            Ok(((), || {}))
        });
        assert!(wait(failed).await.is_err());
        assert_eq!(wait(after).await, Err(StoreError::Aborted));
        assert!(ran.try_recv().is_err(), "refused unrun");
        // A failed commit breaks the chains of every job in it, before the
        // next batch runs, even if that one would commit.
        full.store(true, Ordering::SeqCst);
        let lost = b.chain_then(&other, |_| Ok(((), || {})));
        assert!(matches!(wait(lost).await, Err(StoreError::Full(_))));
        full.store(false, Ordering::SeqCst);
        let later = b.chain_then(&other, |_| Ok(((), || {})));
        assert_eq!(wait(later).await, Err(StoreError::Aborted));
        // Other jobs are not held up.
        assert_eq!(wait(b.submit(|_| Ok(5))).await, Ok(5));
    }

    #[tokio::test]
    async fn a_failed_job_leaves_no_work_and_the_rest_is_done_in_commit_order() {
        let (tx, rx) = std::sync::mpsc::channel();
        let b = Batcher::spawn(
            "order",
            Gated {
                syncs: Default::default(),
                gate: Default::default(),
            },
        )
        .unwrap();
        for i in 0..5 {
            let tx = tx.clone();
            b.lazy_then(move |_| {
                if i == 2 {
                    return Err(StoreError::Conflict("no".into()));
                }
                Ok(move || tx.send(i).unwrap())
            });
        }
        wait(b.read(|_| Ok(()))).await.unwrap();
        drop(tx);
        assert_eq!(rx.iter().collect::<Vec<_>>(), [0, 1, 3, 4]);
    }
}
