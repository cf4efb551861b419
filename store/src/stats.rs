//! What a store's thread tells whoever watches it: plain atomics that the
//! thread sets as it works, and an [`Observer`] it calls once per batch and
//! once per sync (never per job), so watching costs the store nothing it
//! would notice.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Told of each batch and each sync, on the store's own threads. It must
/// not block: count, and return.
pub trait Observer: Send + Sync + 'static {
    /// A batch of `jobs` ran and committed (or failed to) in `took`: the
    /// jobs, and the commit.
    fn batch(&self, jobs: usize, took: Duration);
    /// A sync of the log (see [`crate::wal_syncer`]) took `took`.
    fn synced(&self, took: Duration);
}

/// An observer that ignores everything.
pub(crate) struct Nobody;

impl Observer for Nobody {
    fn batch(&self, _: usize, _: Duration) {}
    fn synced(&self, _: Duration) {}
}

/// How a store is doing, read at any time ([`crate::Batcher::health`]).
#[derive(Debug, Default)]
pub struct Health {
    /// Jobs submitted and not yet taken into a batch.
    waiting: AtomicU64,
    /// When the last commit succeeded, in ms since the Unix epoch (0: none yet).
    last_commit_ms: AtomicI64,
    /// Commits that failed since start.
    failed_commits: AtomicU64,
}

impl Health {
    /// Jobs waiting for the store thread.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// When the last commit succeeded (ms since the epoch), if one did.
    pub fn last_commit_ms(&self) -> Option<i64> {
        Some(self.last_commit_ms.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    /// Commits that failed since start.
    pub fn failed_commits(&self) -> u64 {
        self.failed_commits.load(Ordering::Relaxed)
    }

    pub(crate) fn queued(&self) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn taken(&self, jobs: usize, committed: bool) {
        self.waiting.fetch_sub(jobs as u64, Ordering::Relaxed);
        if committed {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            self.last_commit_ms.store(now, Ordering::Relaxed);
        } else {
            self.failed_commits.fetch_add(1, Ordering::Relaxed);
        }
    }
}
