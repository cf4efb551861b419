//! The one accept loop of the servers (home and global): TCP, TLS and the
//! WebSocket upgrade, under limits an open port needs, with every
//! connection's task tracked so that a stop can wait for them.
//!
//! A connection is *pending* from the moment TCP accepts it until its
//! role logs it in (a valid `hello`): pending connections have a pool of
//! their own, a cap per source address, and one deadline for all of
//! TCP → TLS → upgrade → `hello` ([`Ticket::deadline`]). Logged-in agents
//! and peer homes then hold slots of pools of their own ([`Pool`]), so
//! sockets that never log in cannot lock them out.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use popupd_protocol::net::{self, Link, ServerTls};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::task::Shutdown;

/// How long a stopping server waits for its connections to say goodbye.
pub const DRAIN: Duration = Duration::from_secs(2);

/// A connection set up but not yet logged in.
pub struct Accepted {
    pub link: Link<ServerTls>,
    /// The WebSocket path it asked for.
    pub path: &'static str,
    pub addr: SocketAddr,
    pub ticket: Ticket,
}

/// A pending connection's place: a slot of the pending pool and of its
/// address's share, until it logs in or goes.
pub struct Ticket {
    _slot: OwnedSemaphorePermit,
    addr: IpAddr,
    /// The pending gauge, given back on drop.
    pending: prometheus_client::metrics::gauge::Gauge,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// By when `hello` must have come.
    pub deadline: tokio::time::Instant,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pending.dec();
        let mut m = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.addr);
            }
        }
    }
}

/// Slots for logged-in connections of one kind.
#[derive(Clone)]
pub struct Pool {
    slots: Arc<Semaphore>,
    pub size: usize,
}

impl Pool {
    pub fn new(size: usize) -> Pool {
        Pool {
            slots: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// A slot for a connection that logged in, if one is free; it is given
    /// back when the returned permit drops.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Slots in use.
    pub fn used(&self) -> usize {
        self.size - self.slots.available_permits()
    }
}

/// A connection's own future, boxed (see [`serve`]).
pub type Served = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Accepts on `listener` until `shutdown`, setting each connection up
/// (TLS from `tls()`, then the upgrade to one of `paths`) in a task of its
/// own that then runs `serve`. Returns once every connection task ended,
/// or [`DRAIN`] after `shutdown`, whichever comes first.
pub async fn serve<F>(
    listener: TcpListener,
    tls: impl Fn() -> tokio_rustls::TlsAcceptor,
    paths: &'static [&'static str],
    limits: &Limits,
    shutdown: &Shutdown,
    stats: &crate::metrics::Accepts,
    serve: F,
) where
    F: Fn(Accepted) -> Served + Clone + Send + 'static,
{
    let pending = Arc::new(Semaphore::new(limits.pending));
    let per_address: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let tasks = TaskTracker::new();
    let mut errors = 0u32;
    // Refusals by the per-address cap, logged once a minute at most.
    let mut over_cap = 0u64;
    let mut over_cap_said: Option<tokio::time::Instant> = None;
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = pending.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => { errors = 0; x }
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    errors = (errors + 1).min(10);
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10 << errors)).await;
                    continue;
                }
            },
        };
        stats.accepted.inc();
        let ip = addr.ip().to_canonical();
        {
            let mut m = per_address.lock().unwrap_or_else(|e| e.into_inner());
            let n = m.entry(ip).or_default();
            if *n >= limits.pending_per_address {
                // Dropped at once: this address already has its share of
                // connections that have not logged in.
                over_cap += 1;
                stats.over_address_cap.inc();
                if over_cap_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(
                        address = %ip,
                        refused = over_cap,
                        limit = limits.pending_per_address,
                        "connections refused: too many from one address not logged in yet (limits.pending_per_address)"
                    );
                    over_cap = 0;
                    over_cap_said = Some(tokio::time::Instant::now());
                }
                continue;
            }
            *n += 1;
        }
        let _ = tcp.set_nodelay(true);
        stats.pending.inc();
        let ticket = Ticket {
            _slot: slot,
            addr: ip,
            pending: stats.pending.clone(),
            per_address: per_address.clone(),
            deadline: tokio::time::Instant::now() + limits.login_timeout,
        };
        let acceptor = tls();
        let serve = serve.clone();
        tasks.spawn(async move {
            // The handshake is boxed and its result consumed in the match,
            // and `serve` hands back a box: the task of a long-lived idle
            // connection then keeps room neither for the (large, finished)
            // handshake state nor for the link it moved into the
            // connection's own future.
            let served = match Box::pin(tokio::time::timeout_at(
                ticket.deadline,
                net::accept(tcp, &acceptor, paths),
            ))
            .await
            {
                Ok(Ok((link, path))) => serve(Accepted {
                    link,
                    path,
                    addr,
                    ticket,
                }),
                Ok(Err(e)) => return tracing::debug!(%addr, "handshake failed: {e}"),
                Err(_) => return tracing::debug!(%addr, "handshake not done in time"),
            };
            served.await
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(DRAIN, tasks.wait()).await;
}
