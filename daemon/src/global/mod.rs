//! The global server: the directory of every home of the network and of the
//! handle of every user on each.
//!
//! Homes dial it over mutual TLS under the network CA; a home is known by
//! the name its certificate is valid for. It answers `register`,
//! `unregister`, `lookup` and `lookup_home`, and pushes `invalidate` to every
//! linked home when a handle is released, so their route caches stay true.
//! (A user moves by being removed from one home and added to another.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::accept::{self, Pool};
use crate::config::GlobalConfig;
use crate::session::{self, Clock, End, Handler, Jobs, Keepalive};
use crate::storage::global::{GlobalStore, PgGlobal, SqliteGlobal};
use crate::task::Shutdown;
use popupd_protocol::net::{self, Link, Recv, ServerTls, tls};
use popupd_protocol::{
    ErrorCode, GLOBAL_PATH, GlobalReply, GlobalRequest, PROTOCOL_VERSION, Route, valid_handle,
};
use popupd_store::{Batcher, StoreError};

/// A linked home.
struct Linked {
    home: String,
    /// Invalidations to push.
    tx: mpsc::UnboundedSender<GlobalReply>,
    stop: Shutdown,
}

struct Global {
    store: Batcher<Box<dyn GlobalStore>>,
    /// Slots of linked homes (`limits.peer_links`).
    slots: Pool,
    /// Handles one home may hold (`limits.handles_per_home`).
    handles_per_home: u64,
    /// Linked homes, to push invalidations to.
    linked: Mutex<HashMap<u64, Linked>>,
    /// Revoked homes: refused, their handles found nowhere; a reload may
    /// add some.
    revoked: Mutex<Arc<std::collections::HashSet<String>>>,
    next_id: AtomicU64,
    /// Lookups answered since start.
    lookups: AtomicU64,
    shutdown: Shutdown,
    /// Counters and levels for Prometheus (served if `metrics:` is set).
    metrics: Arc<crate::metrics::Metrics>,
    started: std::time::Instant,
    cfg: GlobalConfig,
}

/// The directory's SQLite file in the data folder.
const DB_FILE: &str = "global.sqlite";

/// Opens the directory where the config says (`storage:`). A client of
/// PostgreSQL is made off the Tokio runtime and lives on the store thread.
fn open_store(cfg: &GlobalConfig) -> anyhow::Result<Box<dyn GlobalStore>> {
    crate::storage::open_records::<dyn GlobalStore>(
        &cfg.storage,
        &cfg.data_dir,
        DB_FILE,
        |path| Ok(Box::new(SqliteGlobal::open(path)?)),
        |target| Ok(Box::new(PgGlobal::open(target, &cfg.name)?)),
    )
}

/// Runs the global server until `shutdown`. Calls `ready` once listening;
/// a config sent on `reload` replaces its certificates for new connections.
pub async fn run(
    cfg: GlobalConfig,
    shutdown: Shutdown,
    ready: impl FnOnce(),
    mut reload: tokio::sync::watch::Receiver<GlobalConfig>,
) -> anyhow::Result<()> {
    let store = open_store(&cfg)?;
    let server_tls = tls::server_config(&cfg.identity, cfg.ca.clone(), tls::ClientAuth::Required)?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("global {}: cannot listen on {}", cfg.name, cfg.listen))?;
    let scrapes = match cfg.metrics {
        Some(addr) => Some(crate::metrics::bind(addr, &format!("global {}", cfg.name)).await?),
        None => None,
    };
    tracing::info!(global = %cfg.name, listen = %cfg.listen, "global server {} listening on {}", cfg.name, cfg.listen);
    let metrics = crate::metrics::Metrics::new(crate::metrics::Of::Global);
    let g = Arc::new(Global {
        store: Batcher::spawn_observed("global", store, Arc::new(metrics.store.clone()))?,
        slots: Pool::new(cfg.limits.peer_links),
        handles_per_home: cfg.limits.handles_per_home as u64,
        linked: Mutex::default(),
        revoked: Mutex::new(cfg.revoked.clone()),
        next_id: AtomicU64::new(0),
        lookups: AtomicU64::new(0),
        shutdown: shutdown.clone(),
        metrics,
        started: std::time::Instant::now(),
        cfg: cfg.clone(),
    });
    let mut side = tokio::task::JoinSet::new();
    if let Some(l) = scrapes {
        tracing::info!(global = %cfg.name, "global {}: metrics on http://{}/metrics", cfg.name, l.local_addr()?);
        let g2 = g.clone();
        side.spawn(crate::metrics::serve(
            l,
            g.metrics.clone(),
            move || refresh(g2.clone()),
            shutdown.clone(),
        ));
    }
    match crate::status::listen(&cfg.data_dir).await {
        Ok(admin) => {
            let g2 = g.clone();
            side.spawn(crate::status::serve(
                admin,
                move || report(g2.clone()),
                shutdown.clone(),
            ));
        }
        Err(e) => {
            tracing::error!(global = %cfg.name, "global {}: {e:#}; `popupd status` will not answer", cfg.name)
        }
    }
    side.spawn(crate::status::warn_of_expiry(
        format!("global {}", cfg.name),
        cfg.cert_path.clone(),
        cfg.ca_path.clone(),
        shutdown.clone(),
    ));
    ready();
    tokio::spawn(report_status(g.clone(), cfg.name.clone()));
    let acceptor = Arc::new(std::sync::Mutex::new(tokio_rustls::TlsAcceptor::from(
        server_tls,
    )));
    let reloads = {
        let (acceptor, g) = (acceptor.clone(), g.clone());
        async move {
            while reload.changed().await.is_ok() {
                let new = reload.borrow_and_update().clone();
                *g.revoked.lock().unwrap_or_else(|e| e.into_inner()) = new.revoked.clone();
                for l in g.linked.lock().unwrap_or_else(|e| e.into_inner()).values() {
                    if new.revoked.contains(&l.home) {
                        tracing::warn!(home = %l.home, "closed the link of a revoked home: {}", l.home);
                        l.stop.cancel();
                    }
                }
                match tls::server_config(&new.identity, new.ca.clone(), tls::ClientAuth::Required) {
                    Ok(t) => {
                        *acceptor.lock().unwrap_or_else(|e| e.into_inner()) =
                            tokio_rustls::TlsAcceptor::from(t);
                        tracing::info!("reloaded certificates and CA");
                    }
                    Err(e) => tracing::error!("reload: keeping the old certificates: {e}"),
                }
                if new.listen != cfg.listen
                    || new.data_dir != cfg.data_dir
                    || new.name != cfg.name
                    || new.metrics != cfg.metrics
                    || new.storage.label() != cfg.storage.label()
                {
                    tracing::warn!(
                        "reload: name, listen, data_dir, storage or metrics changed; restart the service to apply"
                    );
                }
            }
            std::future::pending::<()>().await
        }
    };
    let accepting = accept::serve(
        listener,
        || acceptor.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        &[GLOBAL_PATH],
        &cfg.limits,
        &shutdown,
        &g.metrics.accepts,
        {
            let g = g.clone();
            move |a: accept::Accepted| -> accept::Served { Box::pin(serve(g.clone(), a)) }
        },
    );
    tokio::select! {
        _ = accepting => {}
        _ = reloads => {}
    }
    tracing::info!(
        lookups = g.lookups.load(Ordering::Relaxed),
        "global server stopping"
    );
    side.shutdown().await;
    Ok(())
}

/// Sets the levels of the metrics from how the server is now.
async fn refresh(g: Arc<Global>) {
    let m = &g.metrics;
    let l = &m.levels;
    let linked = g.linked.lock().unwrap_or_else(|e| e.into_inner()).len();
    for (kind, n) in [
        ("agent", 0),
        ("peer", linked as i64),
        ("pending", m.accepts.pending.get()),
    ] {
        l.connections
            .get_or_create(&[("kind", kind.to_owned())])
            .set(n);
    }
    let at = crate::status::StoreAt::of(&g.cfg.data_dir, DB_FILE, &g.cfg.storage).await;
    m.store_levels(
        g.store.health(),
        &[("db", at.database_bytes), ("wal", at.log_bytes)],
    );
    for c in crate::status::certificates(&g.cfg.cert_path, &g.cfg.ca_path) {
        l.cert_expiry
            .get_or_create(&[("file", c.file)])
            .set(c.not_after_unix);
    }
}

/// How the server is, for `popupd status`.
async fn report(g: Arc<Global>) -> crate::status::Report {
    use crate::status::{self, Connections, PeerLink};
    let mut homes: Vec<String> = g
        .linked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|l| l.home.clone())
        .collect();
    homes.sort();
    let mut peers: Vec<PeerLink> = Vec::new();
    for h in homes {
        match peers.last_mut() {
            Some(p) if p.home == h => p.links += 1,
            _ => peers.push(PeerLink {
                home: h,
                state: "linked".into(),
                links: 1,
                queued: 0,
            }),
        }
    }
    let server = status::Server {
        role: "global",
        name: &g.cfg.name,
        started: g.started,
        cert_path: &g.cfg.cert_path,
        ca_path: &g.cfg.ca_path,
        db: status::StoreAt::of(&g.cfg.data_dir, DB_FILE, &g.cfg.storage).await,
        health: g.store.health(),
    };
    let connections = Connections {
        agents: 0,
        peers: peers.iter().map(|p| p.links).sum(),
        pending: g.metrics.accepts.pending.get().max(0) as u64,
    };
    status::Report::new(server, connections, peers, 0)
}

/// Tells systemd (when run by it) what the directory is doing.
async fn report_status(g: Arc<Global>, name: String) {
    loop {
        let linked = g.linked.lock().unwrap_or_else(|e| e.into_inner()).len();
        let line = format!(
            "global {name}: {linked} homes linked, {} lookups answered{}",
            g.lookups.load(Ordering::Relaxed),
            crate::status::expiry_note(&g.cfg.cert_path, &g.cfg.ca_path),
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
        if crate::task::sleep_or_shutdown(std::time::Duration::from_secs(5), &g.shutdown).await {
            return;
        }
    }
}

async fn serve(g: Arc<Global>, accepted: accept::Accepted) {
    let accept::Accepted {
        mut link,
        addr,
        ticket,
        ..
    } = accepted;
    let first = tokio::time::timeout_at(ticket.deadline, link.recv::<GlobalRequest>()).await;
    let Ok(Ok(Recv::Frame(GlobalRequest::Hello { v, home, address }))) = first else {
        let _ = link
            .send(&GlobalReply::Error {
                req: None,
                code: ErrorCode::NotAuthenticated,
                message: "send hello first".into(),
            })
            .await;
        return link.close().await;
    };
    let refusal = net::check_dialer(&link, v, &home).err().or_else(|| {
        g.is_revoked(&home).then(|| {
            (
                ErrorCode::AuthFailed,
                "this home's name is revoked in the network".to_string(),
            )
        })
    });
    if let Some((code, message)) = refusal {
        tracing::warn!(%addr, claimed = %home, "home {home} refused ({addr}): {message}");
        let _ = link
            .send(&GlobalReply::Error {
                req: None,
                code,
                message,
            })
            .await;
        return link.close().await;
    }
    drop(ticket);
    let Some(_slot) = g.slots.admit() else {
        tracing::warn!(%addr, %home, limit = g.slots.size,
            "home {home} refused ({addr}): as many homes linked as this server takes (limits.peer_links)");
        let _ = link
            .send(&GlobalReply::Error {
                req: None,
                code: ErrorCode::Busy,
                message: "this server holds as many home links as it takes; try again later".into(),
            })
            .await;
        return link.close().await;
    };
    let (h, a) = (home.clone(), address.clone());
    if let Err(e) = g.store.run(move |s| s.upsert_home(&h, &a)).await {
        tracing::error!("storing home: {e}");
        return link.close().await;
    }
    if link
        .send(&GlobalReply::Welcome {
            v: PROTOCOL_VERSION,
        })
        .await
        .is_err()
    {
        return;
    }
    tracing::info!(%home, %address, "home linked: {home} from {address}");
    let id = g.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, pushes) = mpsc::unbounded_channel();
    let stop = g.shutdown.child_token();
    g.linked.lock().unwrap_or_else(|e| e.into_inner()).insert(
        id,
        Linked {
            home: home.clone(),
            tx,
            stop: stop.clone(),
        },
    );
    let mut s = HomeLink {
        g: g.clone(),
        home: home.clone(),
        pushes,
    };
    let mut jobs = Jobs::new();
    // The home pings a quiet link (every 20 s); this side only listens.
    let ka = Keepalive {
        ping_after: Duration::from_secs(30),
        dead_after: Duration::from_secs(60),
        clock: Clock::Grid(Duration::from_secs(1)),
    };
    let end = session::run(&mut link, &mut s, &mut jobs, ka, &stop).await;
    g.linked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    tracing::info!(%home, "home unlinked: {home}: {end}");
    link.close().await;
}

/// A home's link, as the session loop sees it.
struct HomeLink {
    g: Arc<Global>,
    home: String,
    /// Invalidations to push.
    pushes: mpsc::UnboundedReceiver<GlobalReply>,
}

impl Handler<ServerTls> for HomeLink {
    type In = GlobalRequest;
    type Done = GlobalReply;
    type Wake = GlobalReply;
    const MAX_BAD_FRAMES: Option<u32> = Some(16);
    /// A home's lookups wait for one another past this many.
    const MAX_JOBS: usize = 256;

    fn poll_wake(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<GlobalReply> {
        match self.pushes.poll_recv(cx) {
            std::task::Poll::Ready(Some(p)) => std::task::Poll::Ready(p),
            _ => std::task::Poll::Pending,
        }
    }

    async fn frame(
        &mut self,
        _: &mut Link<ServerTls>,
        req: GlobalRequest,
        jobs: &mut Jobs<GlobalReply>,
    ) -> Result<(), End> {
        // Answered in the order asked.
        let (g, home) = (self.g.clone(), self.home.clone());
        jobs.push_back(Box::pin(async move { answer(&g, &home, req).await }));
        Ok(())
    }

    async fn done(
        &mut self,
        link: &mut Link<ServerTls>,
        reply: GlobalReply,
        _: &mut Jobs<GlobalReply>,
    ) -> Result<(), End> {
        Ok(link.feed(&reply).await?)
    }

    async fn wake(
        &mut self,
        link: &mut Link<ServerTls>,
        push: GlobalReply,
        _: &mut Jobs<GlobalReply>,
    ) -> Result<(), End> {
        Ok(link.feed(&push).await?)
    }

    fn bad_frame(&self, why: &str) -> Option<String> {
        serde_json::to_string(&GlobalReply::Error {
            req: None,
            code: ErrorCode::BadFrame,
            message: why.to_owned(),
        })
        .ok()
    }
}

async fn answer(g: &Arc<Global>, home: &str, req: GlobalRequest) -> GlobalReply {
    let err = |req, code, message: String| GlobalReply::Error {
        req: Some(req),
        code,
        message,
    };
    let home = home.to_owned();
    match req {
        GlobalRequest::Hello { .. } => GlobalReply::Error {
            req: None,
            code: ErrorCode::BadFrame,
            message: "already introduced".into(),
        },
        GlobalRequest::Register { req, handle } | GlobalRequest::Unregister { req, handle }
            if !valid_handle(&handle) =>
        {
            err(
                req,
                ErrorCode::Invalid,
                format!("{handle:?} is not a handle"),
            )
        }
        GlobalRequest::Register { req, handle } => {
            let h = handle.clone();
            let quota = g.handles_per_home;
            match g.store.run(move |s| s.register(&h, &home, quota)).await {
                Ok(()) => GlobalReply::Done { req },
                Err(StoreError::Conflict(m)) => err(req, ErrorCode::HandleTaken, m),
                Err(StoreError::Quota(m)) => err(req, ErrorCode::Busy, m),
                Err(e) => err(req, ErrorCode::Internal, e.to_string()),
            }
        }
        GlobalRequest::Unregister { req, handle } => {
            let h = handle.clone();
            match g.store.run(move |s| s.unregister(&h, &home)).await {
                Ok(released) => {
                    if released {
                        tracing::info!(%handle, "handle released: {handle}");
                        broadcast(g, GlobalReply::Invalidate { handle });
                    }
                    GlobalReply::Done { req }
                }
                Err(e) => err(req, ErrorCode::Internal, e.to_string()),
            }
        }
        GlobalRequest::Lookup { req, handle } => {
            let n = g.lookups.fetch_add(1, Ordering::Relaxed) + 1;
            g.metrics.lookups.inc();
            tracing::info!(%handle, from = %home, lookups = n, "lookup: {handle} for {home}");
            let h = handle.clone();
            match g.store.read(move |s| s.lookup(&h)).await {
                // A revoked home's users are found nowhere.
                Ok(route) => GlobalReply::Route {
                    req,
                    route: route.filter(|r| !g.is_revoked(&r.home)),
                },
                Err(e) => err(req, ErrorCode::Internal, e.to_string()),
            }
        }
        GlobalRequest::LookupHome { req, home: name } => {
            let n = name.clone();
            match g.store.read(move |s| s.home_address(&n)).await {
                Ok(_) if g.is_revoked(&name) => GlobalReply::Route { req, route: None },
                Ok(address) => GlobalReply::Route {
                    req,
                    route: address.map(|address| Route {
                        home: name,
                        address,
                    }),
                },
                Err(e) => err(req, ErrorCode::Internal, e.to_string()),
            }
        }
    }
}

fn broadcast(g: &Global, push: GlobalReply) {
    let linked = g.linked.lock().unwrap_or_else(|e| e.into_inner());
    for l in linked.values() {
        let _ = l.tx.send(push.clone());
    }
}

impl Global {
    fn is_revoked(&self, home: &str) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(home)
    }
}
