//! Where things go: the one place that decides which home a handle lives
//! on. It keeps the route cache (answers of the global server, trusted for
//! `route_cache_ttl` and dropped when the global server pushes
//! `invalidate` or a peer says the person is not there), says where a new
//! item goes when the answer is at hand ([`Router::known_home`]), and
//! routes the items that wait for an answer ([`run`]).
//!
//! Whether a person is one of this home's own users is the store's to say,
//! in the same transaction as the message (`home::rules`); the router is
//! asked only about everyone else.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use popupd_protocol::net::Backoff;
use popupd_protocol::{NOT_ACCEPTED, Route};
use tokio::sync::Notify;

use super::Home;
use super::directory::DirError;
use super::rules::{self, Effects};

/// The route cache, and the wake of the routing task.
pub struct Router {
    ttl: Duration,
    routes: Mutex<HashMap<String, (Route, Instant)>>,
    /// Items wait for a route.
    kick: Notify,
}

impl Router {
    pub fn new(ttl: Duration) -> Router {
        Router {
            ttl,
            routes: Mutex::default(),
            kick: Notify::new(),
        }
    }

    /// The home of `handle` if the cache knows it and it is not `us`:
    /// where a new item for them goes without waiting for the router.
    pub fn known_home(&self, handle: &str, us: &str) -> Option<String> {
        self.cached(handle).map(|r| r.home).filter(|h| h != us)
    }

    /// The cached route of `handle`, if fresh; never asks.
    pub fn cached(&self, handle: &str) -> Option<Route> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes
            .get(handle)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(r, _)| r.clone())
    }

    /// Where `handle` lives: from the cache, else from the global server
    /// (and then cached). `None`: nowhere in this network.
    pub async fn home_of(&self, home: &Home, handle: &str) -> Result<Option<Route>, DirError> {
        if let Some(r) = self.cached(handle) {
            return Ok(Some(r));
        }
        let route = home.dir.lookup(handle).await?;
        if let Some(r) = &route {
            self.routes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(handle.to_owned(), (r.clone(), Instant::now()));
        }
        Ok(route)
    }

    /// Forgets every route to home `home` (it was revoked).
    pub fn forget_home(&self, home: &str) {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (r, _)| r.home != home);
    }

    /// Forgets the route of `handle` (it moved, or is gone).
    pub fn forget(&self, handle: &str) {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(handle);
    }

    /// Items wait for a route: wake the routing task.
    pub fn kick(&self) {
        self.kick.notify_one();
    }
}

/// Routes items whose destination home is not known yet, until shutdown.
pub async fn run(home: Arc<Home>) {
    let mut retry: Option<Duration> = None;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let r = &home.router;
    loop {
        if let Some(d) = retry.take() {
            tokio::select! {
                _ = home.shutdown.cancelled() => return,
                _ = r.kick.notified() => {}
                _ = tokio::time::sleep(d) => {}
            }
        }
        let items = match home.store.read(|s| rules::queued(&mut **s, None)).await {
            Ok(i) => i,
            Err(e) => {
                tracing::error!("router: {e}");
                retry = Some(backoff.next_delay());
                continue;
            }
        };
        // Resolve every item (cache first, then the global server), then
        // record all the routes in one commit, whose wakes go out at
        // commit, in queue order. An item that cannot be resolved yet holds
        // back the later items for the same person, not the others.
        let mut routed: Vec<(u64, String)> = Vec::new();
        let mut unknown: Vec<u64> = Vec::new();
        let mut held: HashSet<String> = HashSet::new();
        for (n, item) in items {
            let handle = item.dest_handle().to_owned();
            if held.contains(&handle) {
                continue;
            }
            match r.home_of(&home, &handle).await {
                Ok(Some(route)) if route.home != home.cfg.name && !home.is_revoked(&route.home) => {
                    routed.push((n, route.home))
                }
                Ok(_) => {
                    tracing::info!(%handle, "no such user in the network: {handle}");
                    unknown.push(n);
                }
                Err(e) => {
                    tracing::warn!(%handle, "cannot route to {handle} yet: {e}");
                    retry = Some(backoff.next_delay());
                    held.insert(handle);
                }
            }
        }
        if !routed.is_empty() || !unknown.is_empty() {
            let feed = home.feed();
            let done = home
                .store
                .submit_then(move |s| {
                    let mut fx = Effects::default();
                    for (n, dest) in &routed {
                        rules::route(&mut **s, *n, dest)?;
                        fx.queued.push((*n, Some(dest.clone())));
                    }
                    for n in unknown {
                        rules::fail_item(&mut **s, n, NOT_ACCEPTED, &mut fx)?;
                    }
                    Ok(((), feed.at_commit(fx)))
                })
                .await;
            if let Err(e) = done {
                tracing::error!("router: {e}");
                retry = Some(backoff.next_delay());
            }
        }
        if retry.is_none() {
            backoff.reset();
            tokio::select! {
                _ = home.shutdown.cancelled() => return,
                _ = r.kick.notified() => {}
            }
        }
    }
}
