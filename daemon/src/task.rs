//! Tasks, shutdown and retries.
//!
//! **Architecture Invariant:** every task stops on shutdown. One
//! [`Shutdown`] token is created in `main` and cancelled on SIGTERM/SIGINT;
//! each role runs under a child token, which all its tasks watch (the
//! role's own background tasks sit in a `JoinSet` it shuts down; connection
//! and dialer tasks stop when they see the token). When a role ends on its
//! own, `main` cancels the root, so one failed role stops the process.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use tokio::io::unix::AsyncFd;

pub use tokio_util::sync::CancellationToken as Shutdown;

/// Waits `d`, or less if `shutdown` fires; true if shut down.
pub async fn sleep_or_shutdown(d: Duration, shutdown: &Shutdown) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// `t` rounded up to the next multiple of `grain` since the process began.
///
/// Timers that only need to fire "about then" go on this grid, so that
/// many of them fire in one wake-up of the runtime: a home pinging 19,000
/// quiet agents wakes once a second for all that are due, not 800 times.
pub fn on_grid(t: tokio::time::Instant, grain: Duration) -> tokio::time::Instant {
    static START: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(tokio::time::Instant::now);
    let grain_ns = grain.as_nanos().max(1);
    let since = t.saturating_duration_since(start).as_nanos();
    let slots = since.div_ceil(grain_ns);
    start + Duration::from_nanos(u64::try_from(slots * grain_ns).unwrap_or(u64::MAX))
}

/// A periodic timer on a Linux timerfd, for an idle agent's keepalive.
///
/// tokio's hierarchical timer wheel wakes its thread once per wheel level
/// on the way down to a long deadline: a 25 s period costs three wake-ups,
/// not one. An idle agent does nothing but keep its link alive, so that
/// one long periodic timer is a timerfd, and the kernel wakes the runtime
/// once, at the deadline. It counts `CLOCK_BOOTTIME`, so the first tick
/// after a suspend comes at once and a link that died while the lid was
/// shut is found quickly.
#[derive(Debug)]
pub struct Ticker {
    fd: AsyncFd<OwnedFd>,
    period: Duration,
}

impl Ticker {
    /// Ticks every `period` (at least a millisecond), the first time one
    /// period from now.
    pub fn new(period: Duration) -> io::Result<Ticker> {
        let period = period.max(Duration::from_millis(1));
        let fd = timerfd_create(
            TimerfdClockId::Boottime,
            TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
        )?;
        arm(&fd, period)?;
        // SAFETY: the AsyncFd owns the descriptor and neither closes nor
        // replaces it while registered; it is dropped with the AsyncFd.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(Ticker { fd, period })
    }

    /// Starts the period again from now: the next tick is one period away.
    pub fn reset(&mut self) -> io::Result<()> {
        arm(self.fd.get_ref(), self.period)
    }

    /// One tick `d` from now, and none after until armed again.
    pub fn arm_in(&mut self, d: Duration) -> io::Result<()> {
        let d = d.max(Duration::from_millis(1));
        let at = Timespec {
            tv_sec: d.as_secs() as _,
            tv_nsec: d.subsec_nanos() as _,
        };
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        timerfd_settime(
            self.fd.get_ref(),
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: zero,
                it_value: at,
            },
        )?;
        Ok(())
    }

    /// Waits for the next tick. Ticks missed meanwhile count as one.
    pub async fn tick(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut expirations)?)) {
                Ok(r) => return r.map(drop),
                Err(_would_block) => continue,
            }
        }
    }
}

fn arm(fd: &OwnedFd, period: Duration) -> io::Result<()> {
    let every = Timespec {
        tv_sec: period.as_secs() as _,
        tv_nsec: period.subsec_nanos() as _,
    };
    let spec = Itimerspec {
        it_interval: every,
        it_value: every,
    };
    timerfd_settime(fd, TimerfdTimerFlags::empty(), &spec)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticker_ticks_once_per_period_and_merges_missed_ticks() {
        let period = Duration::from_millis(100);
        let start = std::time::Instant::now();
        let mut t = Ticker::new(period).expect("timerfd");
        t.tick().await.expect("tick");
        let first = start.elapsed();
        assert!(first >= period, "not before one period: {first:?}");
        // Miss three periods: the next tick is at once, and only one.
        std::thread::sleep(period * 3 + Duration::from_millis(5));
        let late = std::time::Instant::now();
        t.tick().await.expect("tick");
        assert!(late.elapsed() < period / 2, "missed ticks fire at once");
        let next = std::time::Instant::now();
        t.tick().await.expect("tick");
        assert!(
            next.elapsed() >= period / 2,
            "missed ticks merged into one: {:?}",
            next.elapsed()
        );
    }

    #[tokio::test]
    async fn timers_on_a_grid_fire_together() {
        let grain = Duration::from_millis(500);
        let now = tokio::time::Instant::now();
        let line = on_grid(now, grain);
        assert!(
            line >= now && line - now <= grain,
            "never early, at most one grain late"
        );
        assert_eq!(on_grid(line, grain), line, "a grid instant stays put");
        let ms = Duration::from_millis;
        // Deadlines within one grain fire at its end, together.
        assert_eq!(on_grid(line + ms(10), grain), line + grain);
        assert_eq!(on_grid(line + ms(400), grain), line + grain);
        assert_eq!(on_grid(line + ms(510), grain), line + grain * 2);
    }
}
