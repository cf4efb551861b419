//! The global server: the directory of every home of the network and of the
//! handle of every user on each.
//!
//! Homes dial it over mutual TLS under the network CA; a home is known by
//! the name its certificate is valid for. It answers `register`,
//! `unregister`, `lookup` and `lookup_home`, and pushes `invalidate` to every
//! linked home when a handle is released, so their route caches stay true.
//! (A user moves by being removed from one home and added to another.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::config::GlobalConfig;
use crate::storage::global::GlobalStore;
use crate::task::Shutdown;
use popupd_protocol::net::{self, HANDSHAKE_TIMEOUT, Link, Recv, ServerTls, tls};
use popupd_protocol::{
    ErrorCode, GLOBAL_PATH, GlobalReply, GlobalRequest, PROTOCOL_VERSION, Route, valid_handle,
};
use popupd_store::{Batcher, StoreError};

struct Global {
    store: Batcher<GlobalStore>,
    /// Linked homes, to push invalidations to.
    linked: Mutex<HashMap<u64, mpsc::UnboundedSender<GlobalReply>>>,
    next_id: AtomicU64,
    /// Lookups answered since start.
    lookups: AtomicU64,
    shutdown: Shutdown,
}

/// Runs the global server until `shutdown`. Calls `ready` once listening;
/// a config sent on `reload` replaces its certificates for new connections.
pub async fn run(
    cfg: GlobalConfig,
    shutdown: Shutdown,
    ready: impl FnOnce(),
    mut reload: tokio::sync::watch::Receiver<GlobalConfig>,
) -> anyhow::Result<()> {
    let path = cfg.data_dir.join("global.sqlite");
    let store = GlobalStore::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let server_tls = tls::server_config(&cfg.identity, cfg.ca.clone(), tls::ClientAuth::Required)?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("global {}: cannot listen on {}", cfg.name, cfg.listen))?;
    tracing::info!(global = %cfg.name, listen = %cfg.listen, "global server listening");
    let g = Arc::new(Global {
        store: Batcher::spawn("global", store)?,
        linked: Mutex::default(),
        next_id: AtomicU64::new(0),
        lookups: AtomicU64::new(0),
        shutdown: shutdown.clone(),
    });
    ready();
    tokio::spawn(report_status(g.clone(), cfg.name.clone()));
    let mut acceptor = tokio_rustls::TlsAcceptor::from(server_tls);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Ok(()) = reload.changed() => {
                let new = reload.borrow_and_update().clone();
                match tls::server_config(&new.identity, new.ca.clone(), tls::ClientAuth::Required) {
                    Ok(t) => {
                        acceptor = tokio_rustls::TlsAcceptor::from(t);
                        tracing::info!("reloaded certificates and CA");
                    }
                    Err(e) => tracing::error!("reload: keeping the old certificates: {e}"),
                }
                if new.listen != cfg.listen || new.data_dir != cfg.data_dir || new.name != cfg.name {
                    tracing::warn!("reload: name, listen or data_dir changed; restart the service to apply");
                }
                continue;
            }
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (g, acceptor) = (g.clone(), acceptor.clone());
        tokio::spawn(async move {
            match net::accept(tcp, &acceptor, &[GLOBAL_PATH]).await {
                Ok((link, _)) => serve(g, link, addr).await,
                Err(e) => tracing::info!(%addr, "refused: {e}"),
            }
        });
    }
    tracing::info!(
        lookups = g.lookups.load(Ordering::Relaxed),
        "global server stopping"
    );
    Ok(())
}

/// Tells systemd (when run by it) what the directory is doing.
async fn report_status(g: Arc<Global>, name: String) {
    loop {
        let linked = g.linked.lock().unwrap_or_else(|e| e.into_inner()).len();
        let line = format!(
            "global {name}: {linked} homes linked, {} lookups answered",
            g.lookups.load(Ordering::Relaxed)
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
        if crate::task::sleep_or_shutdown(std::time::Duration::from_secs(5), &g.shutdown).await {
            return;
        }
    }
}

async fn serve(g: Arc<Global>, mut link: Link<ServerTls>, addr: SocketAddr) {
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, link.recv::<GlobalRequest>()).await;
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
    let refusal = net::check_dialer(&link, v, &home).err();
    if let Some((code, message)) = refusal {
        tracing::warn!(%addr, claimed = %home, "home refused: {message}");
        let _ = link
            .send(&GlobalReply::Error {
                req: None,
                code,
                message,
            })
            .await;
        return link.close().await;
    }
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
    tracing::info!(%home, %address, "home linked");
    let id = g.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    g.linked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, tx);
    loop {
        tokio::select! {
            _ = g.shutdown.cancelled() => break,
            Some(push) = rx.recv() => {
                if link.send(&push).await.is_err() { break; }
            }
            r = link.recv::<GlobalRequest>() => match r {
                Ok(Recv::Frame(req)) => {
                    let reply = answer(&g, &home, req).await;
                    if link.send(&reply).await.is_err() { break; }
                }
                Ok(Recv::Bad(e)) => {
                    let bad = GlobalReply::Error { req: None, code: ErrorCode::BadFrame, message: e };
                    if link.send(&bad).await.is_err() { break; }
                }
                Ok(Recv::Alive) => {}
                Ok(Recv::Closed) | Err(_) => break,
            },
        }
    }
    g.linked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    tracing::info!(%home, "home unlinked");
    link.close().await;
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
            match g.store.run(move |s| s.register(&h, &home)).await {
                Ok(()) => GlobalReply::Done { req },
                Err(StoreError::Conflict(m)) => err(req, ErrorCode::HandleTaken, m),
                Err(e) => err(req, ErrorCode::Internal, e.to_string()),
            }
        }
        GlobalRequest::Unregister { req, handle } => {
            let h = handle.clone();
            match g.store.run(move |s| s.unregister(&h, &home)).await {
                Ok(released) => {
                    if released {
                        tracing::info!(%handle, "handle released");
                        broadcast(g, GlobalReply::Invalidate { handle });
                    }
                    GlobalReply::Done { req }
                }
                Err(e) => err(req, ErrorCode::Internal, e.to_string()),
            }
        }
        GlobalRequest::Lookup { req, handle } => {
            let n = g.lookups.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::info!(%handle, from = %home, lookups = n, "lookup");
            let h = handle.clone();
            match g.store.read(move |s| s.lookup(&h)).await {
                Ok(route) => GlobalReply::Route { req, route },
                Err(e) => err(req, ErrorCode::Internal, e.to_string()),
            }
        }
        GlobalRequest::LookupHome { req, home: name } => {
            let n = name.clone();
            match g.store.read(move |s| s.home_address(&n)).await {
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
    for tx in linked.values() {
        let _ = tx.send(push.clone());
    }
}
