//! What a home tells its operator: the levels its metrics read at each
//! scrape, and its `popupd status` report. Both read, off the message path.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::Home;
use crate::config::Storage;
use crate::status::{self, Connections, PeerLink, Report};

/// Items in the forward queue, by destination home, and those with none
/// yet, read on a connection of its own (read only, beside the store
/// thread's), so a scrape never waits behind the store's jobs.
fn queue_depths(db: &Path) -> Result<(HashMap<String, u64>, u64), rusqlite::Error> {
    use rusqlite::OpenFlags;
    let c = rusqlite::Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(std::time::Duration::from_secs(2))?;
    let mut by_dest = HashMap::new();
    let mut unrouted = 0;
    let mut q = c.prepare("SELECT dest, count(*) FROM outq GROUP BY dest")?;
    let rows = q.query_map([], |r| {
        Ok((r.get::<_, Option<String>>(0)?, r.get::<_, i64>(1)?))
    })?;
    for row in rows {
        match row? {
            (Some(d), n) => {
                by_dest.insert(d, n as u64);
            }
            (None, n) => unrouted = n as u64,
        }
    }
    Ok((by_dest, unrouted))
}

/// Links up with other homes, dialed or accepted.
fn links_up(home: &Home) -> u64 {
    home.peers.states().iter().map(|s| s.1 as u64).sum()
}

fn db_path(home: &Home) -> std::path::PathBuf {
    home.cfg.data_dir.join("home.sqlite")
}

async fn store_at(home: &Home) -> status::StoreAt {
    status::StoreAt::of(&home.cfg.data_dir, "home.sqlite", &home.cfg.storage).await
}

async fn depths(home: &Home) -> (HashMap<String, u64>, u64) {
    let storage = home.cfg.storage.clone();
    let db = db_path(home);
    let read = move || match storage {
        Storage::Sqlite => queue_depths(&db).map_err(|e| e.to_string()),
        Storage::Postgres(t) => {
            crate::storage::home_pg::queue_depths(&t).map_err(|e| e.to_string())
        }
    };
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            tracing::warn!(home = %home.cfg.name, "reading the forward queue's depth: {e}");
            Default::default()
        }
        Err(_) => Default::default(),
    }
}

/// Sets the levels of `home.metrics` from how it is now.
pub async fn refresh(home: Arc<Home>) {
    let m = &home.metrics;
    let l = &m.levels;
    let conns = [
        ("agent", home.agent_slots.used() as i64),
        ("peer", links_up(&home) as i64),
        ("pending", m.accepts.pending.get()),
    ];
    for (kind, n) in conns {
        l.connections
            .get_or_create(&[("kind", kind.to_owned())])
            .set(n);
    }
    let (users, devices) = home.registry.online();
    l.users_online.set(users as i64);
    l.devices_online.set(devices as i64);
    l.peer_links.set(home.peers.active() as i64);
    let (by_dest, unrouted) = depths(&home).await;
    l.queue.clear();
    for (dest, n) in &by_dest {
        l.queue
            .get_or_create(&[("peer", dest.clone())])
            .set(*n as i64);
    }
    l.unrouted.set(unrouted as i64);
    let at = store_at(&home).await;
    m.store_levels(
        home.store.health(),
        &[("db", at.database_bytes), ("wal", at.log_bytes)],
    );
    for c in status::certificates(&home.cfg.cert_path, &home.cfg.ca_path) {
        l.cert_expiry
            .get_or_create(&[("file", c.file)])
            .set(c.not_after_unix);
    }
}

/// How the home is, for `popupd status`.
pub async fn report(home: Arc<Home>) -> Report {
    let (by_dest, unrouted) = depths(&home).await;
    let mut peers: Vec<PeerLink> = home
        .peers
        .states()
        .into_iter()
        .map(|(name, links, dialing)| PeerLink {
            queued: by_dest.get(&name).copied().unwrap_or(0),
            state: if links > 0 {
                "linked"
            } else if dialing {
                "dialing"
            } else {
                "idle"
            }
            .into(),
            links: links as u64,
            home: name,
        })
        .collect();
    // Items for a home no link or dialer knows yet are shown too.
    for (dest, n) in by_dest {
        if !peers.iter().any(|p| p.home == dest) {
            peers.push(PeerLink {
                home: dest,
                state: "idle".into(),
                links: 0,
                queued: n,
            });
        }
    }
    peers.sort_by(|a, b| a.home.cmp(&b.home));
    let server = status::Server {
        role: "home",
        name: &home.cfg.name,
        started: home.started,
        cert_path: &home.cfg.cert_path,
        ca_path: &home.cfg.ca_path,
        db: store_at(&home).await,
        health: home.store.health(),
    };
    let connections = Connections {
        agents: home.agent_slots.used() as u64,
        peers: links_up(&home),
        pending: home.metrics.accepts.pending.get().max(0) as u64,
    };
    let mut r = Report::new(server, connections, peers, unrouted);
    if let Some(c) = &home.cluster {
        let (node, nodes) = c.nodes();
        if !c.connected() {
            r.warnings.push(format!(
                "NATS is not connected ({}): the other nodes' news is read from the store every 2 s",
                home.cfg.cluster.as_ref().map_or("", |c| c.nats.as_str())
            ));
        }
        r.cluster = Some(status::ClusterState {
            node,
            nats_connected: c.connected(),
            nodes,
        });
    }
    r
}
