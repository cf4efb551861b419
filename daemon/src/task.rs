//! Tasks, shutdown and retries.
//!
//! **Architecture Invariant:** every task stops on shutdown. One
//! [`Shutdown`] token is created in `main` and cancelled on SIGTERM/SIGINT;
//! each role runs under a child token, which all its tasks watch (the
//! role's own background tasks sit in a `JoinSet` it shuts down; connection
//! and dialer tasks stop when they see the token). When a role ends on its
//! own, `main` cancels the root, so one failed role stops the process.

use std::time::Duration;

pub use tokio_util::sync::CancellationToken as Shutdown;

/// Capped exponential backoff with jitter, for reconnects.
#[derive(Debug, Clone)]
pub struct Backoff {
    cur: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { cur: min, min, max }
    }

    /// The next delay: uniformly random in [d/2, d], then d doubles up to
    /// the cap. Jitter spreads a crowd of agents reconnecting after a
    /// home restart.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        let half = d / 2;
        half + Duration::from_micros(fastrand::u64(0..=half.as_micros() as u64))
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

/// Waits `d`, or less if `shutdown` fires; true if shut down.
pub async fn sleep_or_shutdown(d: Duration, shutdown: &Shutdown) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = b.next_delay();
            assert!(last <= Duration::from_secs(5));
        }
        assert!(
            last >= Duration::from_millis(2500),
            "reaches the cap's half at least"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
