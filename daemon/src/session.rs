//! One loop for every link session: the agent's back connection, a home's
//! side of it, and the links between homes.
//!
//! [`run`] reads frames and hands them to a [`Handler`], waits for the
//! store jobs the handler started ([`Jobs`], answered in the order they
//! were started) and for the handler's own wakes (queues, notifications),
//! keeps the link alive ([`Keepalive`]), and returns why it ended as an
//! [`End`]. Frames are queued, not written, while more work is ready, and
//! the link is flushed once nothing is: under load that makes one TLS
//! record and one write of many frames.
//!
//! A home holds thousands of these at once, mostly idle, so the loop keeps
//! what an idle session waits on small: each handler call is boxed while it
//! runs, and the waits on shared signals (shutdown) are made once, not per
//! turn.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use popupd_protocol::net::{Link, LinkError, Recv};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::task::{Shutdown, Ticker, on_grid};

/// How long a session that ends on an error frame reads on, so the other
/// side gets the error before the close (see `Link::linger`).
pub const LINGER: Duration = Duration::from_secs(1);

/// Store jobs a session started, answered in the order they were started.
pub type Jobs<D> = FuturesOrdered<Pin<Box<dyn Future<Output = D> + Send>>>;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum End {
    #[error("shutting down")]
    Shutdown,
    #[error("closed by the other side")]
    Closed,
    #[error("silent for {}; link is dead", humantime::format_duration(*.0))]
    Silent(Duration),
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("too many malformed frames")]
    BadFrames,
    #[error("frame too large")]
    TooLarge,
    #[error("storage failure: {0}")]
    Store(String),
    #[error("replaced by a newer connection, or revoked")]
    Replaced,
    /// The other side ended the session and said when to come back.
    #[error("{0}")]
    Bye(&'static str, Duration),
    #[error("{0}")]
    Other(String),
}

/// When to ping a quiet link, and when to give it up.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    /// Ping after this long with nothing heard.
    pub ping_after: Duration,
    /// Dead after this long with nothing heard (a ping went unanswered).
    pub dead_after: Duration,
    pub clock: Clock,
}

/// What the keepalive timer runs on.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// tokio's timer, its deadlines rounded up to a grid: the pings to
    /// every link that fell quiet in the same grid step go out in one
    /// wake-up (a home's thousands of agents).
    Grid(Duration),
    /// A timerfd on `CLOCK_BOOTTIME` ([`Ticker`]): one kernel wake-up per
    /// long wait, and the first after a suspend comes at once (an agent).
    Boottime,
}

/// The keepalive timer, moved only when it fires.
enum Timer {
    Grid(Pin<Box<tokio::time::Sleep>>, Duration),
    Boottime(Ticker),
}

impl Timer {
    fn new(clock: Clock, first: Duration) -> std::io::Result<Timer> {
        Ok(match clock {
            Clock::Grid(g) => Timer::Grid(
                Box::pin(tokio::time::sleep_until(on_grid(
                    tokio::time::Instant::now() + first,
                    g,
                ))),
                g,
            ),
            Clock::Boottime => {
                let mut t = Ticker::new(first)?;
                t.arm_in(first)?;
                Timer::Boottime(t)
            }
        })
    }

    fn set(&mut self, at: Instant) -> std::io::Result<()> {
        match self {
            Timer::Grid(s, g) => {
                s.as_mut().reset(on_grid(at.into(), *g));
                Ok(())
            }
            Timer::Boottime(t) => t.arm_in(at.saturating_duration_since(Instant::now())),
        }
    }

    async fn wait(&mut self) -> std::io::Result<()> {
        match self {
            Timer::Grid(s, _) => {
                s.as_mut().await;
                Ok(())
            }
            Timer::Boottime(t) => t.tick().await,
        }
    }
}

/// What a session does with what the loop hands it. `S` is the link's
/// stream.
pub trait Handler<S>: Send {
    /// The frames it reads.
    type In: DeserializeOwned + Send;
    /// What its store jobs answer.
    type Done: Send + 'static;
    /// Its own wakes (queues, notifications).
    type Wake: Send;

    /// Malformed frames tolerated before the link is closed (`None`: no
    /// limit).
    const MAX_BAD_FRAMES: Option<u32> = None;

    /// Store jobs one session may have pending. At the bound the loop
    /// stops reading the link until one is answered: TCP backpressure
    /// then slows that sender alone, and the store's queue holds at most
    /// this many of its jobs ahead of anyone else's.
    const MAX_JOBS: usize = usize::MAX;

    /// Until when the loop reads nothing from the link (a sender told to
    /// wait, who must not make the home read and refuse meanwhile).
    fn hold_reading(&self) -> Option<Instant> {
        None
    }

    /// Polls the handler's own wake sources. Must be cancel-safe: the loop
    /// may poll it and then act on another wake.
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Self::Wake>;

    fn frame(
        &mut self,
        link: &mut Link<S>,
        f: Self::In,
        jobs: &mut Jobs<Self::Done>,
    ) -> impl Future<Output = Result<(), End>> + Send;

    fn done(
        &mut self,
        link: &mut Link<S>,
        d: Self::Done,
        jobs: &mut Jobs<Self::Done>,
    ) -> impl Future<Output = Result<(), End>> + Send;

    fn wake(
        &mut self,
        link: &mut Link<S>,
        w: Self::Wake,
        jobs: &mut Jobs<Self::Done>,
    ) -> impl Future<Output = Result<(), End>> + Send;

    /// What to answer a frame that did not parse (a JSON frame), if
    /// anything.
    fn bad_frame(&self, why: &str) -> Option<String>;

    /// What to answer a frame over the size limit before closing, if
    /// anything.
    fn too_large(&self) -> Option<String> {
        None
    }

    /// Whether [`Handler::idle`] has work: it runs once nothing else is
    /// ready, before the flush.
    fn idle_due(&self) -> bool {
        false
    }

    /// Work best done once nothing else is ready (a cumulative ack).
    fn idle(&mut self, _link: &mut Link<S>) -> impl Future<Output = Result<(), End>> + Send {
        async { Ok(()) }
    }

    /// After each turn of the loop; `quiet` when that turn was only
    /// keepalive traffic.
    fn turned(&mut self, _quiet: bool) {}

    /// The process is stopping: answer what is pending, say goodbye.
    fn stopping(
        &mut self,
        _link: &mut Link<S>,
        _jobs: &mut Jobs<Self::Done>,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// What woke the loop.
enum Woke<In, D, W> {
    Stop,
    Done(D),
    Frame(Result<Recv<In>, LinkError>),
    Own(W),
    Tick(std::io::Result<()>),
    /// A hold on reading ended.
    Resume,
}

/// Serves `link` with `h` until it ends. Store jobs still pending then are
/// left in `jobs` for the caller.
pub async fn run<S, H>(
    link: &mut Link<S>,
    h: &mut H,
    jobs: &mut Jobs<H::Done>,
    ka: Keepalive,
    shutdown: &Shutdown,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: Handler<S>,
{
    let mut last_heard = Instant::now();
    let mut timer = match Timer::new(ka.clock, ka.ping_after) {
        Ok(t) => t,
        Err(e) => return End::Other(format!("cannot start the keepalive timer: {e}")),
    };
    let mut bad = 0u32;
    let stopping = shutdown.cancelled();
    tokio::pin!(stopping);
    loop {
        let woke = {
            let idle_due = link.needs_flush() || h.idle_due();
            // Boxed: most sessions are never held, and an idle one keeps
            // no room for the timer.
            let mut held = h
                .hold_reading()
                .filter(|t| *t > Instant::now())
                .map(|t| Box::pin(tokio::time::sleep_until(t.into())));
            let next = async {
                tokio::select! {
                    _ = &mut stopping => Woke::Stop,
                    Some(d) = jobs.next(), if !jobs.is_empty() => Woke::Done(d),
                    r = link.recv::<H::In>(), if jobs.len() < H::MAX_JOBS && held.is_none() => Woke::Frame(r),
                    () = async { if let Some(s) = held.as_mut() { s.await } }, if held.is_some() => Woke::Resume,
                    w = std::future::poll_fn(|cx| h.poll_wake(cx)) => Woke::Own(w),
                    t = timer.wait() => Woke::Tick(t),
                }
            };
            if idle_due {
                // Every branch above is cancel-safe.
                match futures_util::FutureExt::now_or_never(next) {
                    Some(w) => w,
                    None => {
                        if h.idle_due()
                            && let Err(e) = Box::pin(h.idle(link)).await
                        {
                            return e;
                        }
                        if link.needs_flush()
                            && let Err(e) = link.flush().await
                        {
                            return e.into();
                        }
                        continue;
                    }
                }
            } else {
                next.await
            }
        };
        let mut quiet = false;
        let step = match woke {
            Woke::Stop => {
                Box::pin(h.stopping(link, jobs)).await;
                return End::Shutdown;
            }
            Woke::Done(d) => Box::pin(h.done(link, d, jobs)).await,
            Woke::Own(w) => Box::pin(h.wake(link, w, jobs)).await,
            Woke::Frame(r) => {
                last_heard = Instant::now();
                // An agent's timer starts again with every frame heard, so
                // an idle agent wakes once a period, to answer the home's
                // ping. (A home's timers move only when they fire: a
                // syscall per frame would cost it.)
                if let (Clock::Boottime, Timer::Boottime(t)) = (ka.clock, &mut timer)
                    && let Err(e) = t.arm_in(ka.ping_after)
                {
                    return End::Other(format!("keepalive timer failed: {e}"));
                }
                match r {
                    Ok(Recv::Frame(f)) => Box::pin(h.frame(link, f, jobs)).await,
                    Ok(Recv::Bad(why)) => {
                        bad += 1;
                        let r = match h.bad_frame(&why) {
                            Some(answer) => link.send_text(answer).await.map_err(End::from),
                            None => Ok(()),
                        };
                        if H::MAX_BAD_FRAMES.is_some_and(|max| bad > max) {
                            link.linger(LINGER).await;
                            return End::BadFrames;
                        }
                        r
                    }
                    Ok(Recv::Alive) => {
                        quiet = true;
                        Ok(())
                    }
                    Ok(Recv::Closed) => return End::Closed,
                    Err(LinkError::TooLarge) => {
                        if let Some(answer) = h.too_large() {
                            let _ = link.send_text(answer).await;
                            link.linger(LINGER).await;
                        }
                        return End::TooLarge;
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Woke::Resume => Ok(()),
            Woke::Tick(t) => {
                quiet = true;
                if let Err(e) = t {
                    return End::Other(format!("keepalive timer failed: {e}"));
                }
                let now = Instant::now();
                let silent = now.saturating_duration_since(last_heard);
                if silent >= ka.dead_after {
                    return End::Silent(ka.dead_after);
                }
                // Quiet for about a ping interval (within a grid step, the
                // pong to the last ping came just after it): ping now, and
                // look again one interval on, or when the silence would
                // make the link dead.
                let grain = match ka.clock {
                    Clock::Grid(g) => g,
                    Clock::Boottime => Duration::ZERO,
                };
                let ping = silent + grain >= ka.ping_after;
                let next = if ping { now } else { last_heard } + ka.ping_after;
                if let Err(e) = timer.set(next.min(last_heard + ka.dead_after)) {
                    return End::Other(format!("keepalive timer failed: {e}"));
                }
                if ping {
                    link.ping().await.map_err(End::from)
                } else {
                    Ok(())
                }
            }
        };
        if let Err(e) = step {
            return e;
        }
        h.turned(quiet);
    }
}
