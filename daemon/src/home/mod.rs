//! The home server: its users' accounts and devices, who is online, the
//! durable mailboxes and forward queue, and a cache of where other users
//! live.
//!
//! - [`sessions`]: one actor per back connection, and the registry that
//!   routes mailbox events to the online devices of a user.
//! - [`peers`]: links to other homes, and the router that finds where
//!   queued items go.
//! - [`presence`]: who is online, and who of their contacts is told.
//! - [`directory`]: the link to the global server.
//! - [`router`]: where a handle lives: the route cache, and the task that
//!   routes what waits for an answer.
//! - [`rules`]: what a message, an ack, a receipt or a contact change does
//!   to the home's records (plain code over `storage::home`).
//! - [`cluster`]: what the nodes of one home tell each other (`cluster:`).
//! - [`admin`]: `popupd user ...` commands, run beside a live home.
//! - [`ops`]: what the metrics read when scraped, and `popupd status`.

pub mod admin;
pub mod cluster;
pub mod directory;
pub mod limits;
pub mod ops;
pub mod peers;
pub mod presence;
pub mod router;
pub mod rules;
pub mod sessions;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::accept::{self, Pool};
use crate::config::HomeConfig;
use crate::storage::home::{HomeStore, SqliteHome};
use crate::storage::home_pg::PgHome;
use crate::task::Shutdown;
use popupd_protocol::net::tls;
use popupd_protocol::{AGENT_PATH, PEER_PATH};
use popupd_store::Batcher;
use rules::Effects;

/// The home's store handle.
pub type Store = Batcher<Box<dyn HomeStore>>;

/// Shared state of one running home.
pub struct Home {
    pub cfg: HomeConfig,
    pub store: Store,
    /// Online devices, by handle.
    pub registry: sessions::Registry,
    /// The link to the global server.
    pub dir: directory::Directory,
    /// Where handles live.
    pub router: router::Router,
    /// What commits caused, on its way from the store thread.
    feed: Feed,
    /// Links to other homes.
    pub peers: peers::Peers,
    /// Presence of our users and of the remote users they watch.
    pub hub: presence::Hub,
    /// The other nodes of this home, if it runs on several.
    pub cluster: Option<Arc<cluster::Cluster>>,
    /// TLS for connections we accept; a reload swaps it.
    pub server_tls: tls::Swap<rustls::ServerConfig>,
    /// TLS (with our client certificate) for links we dial.
    pub client_tls: tls::Swap<rustls::ClientConfig>,
    /// Slots of logged-in agents (`max_connections`) and peer homes
    /// (`limits.peer_links`).
    pub agent_slots: Pool,
    pub peer_slots: Pool,
    /// Tasks that are not connections (presence grace periods).
    pub tasks: TaskTracker,
    /// What one user may send, and change in their contacts, how fast.
    pub send_rate: limits::Buckets,
    pub contact_rate: limits::Buckets,
    /// What one peer home may send how fast.
    pub peer_rate: limits::Buckets,
    /// Failed logins, by address and by handle.
    pub logins: limits::LoginGuard,
    /// Revoked homes: refused, never dialed; a reload may add some.
    revoked: std::sync::Mutex<Arc<std::collections::HashSet<String>>>,
    pub shutdown: Shutdown,
    /// Counters and levels for Prometheus (served if `metrics:` is set).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// When it started.
    pub started: std::time::Instant,
}

/// What a commit caused, on its way from the store thread to the home.
enum Commit {
    Effects(Effects),
    /// A contact list as read, to install in the presence hub.
    Contacts {
        handle: String,
        rows: Vec<crate::storage::home::ContactRow>,
        installed: tokio::sync::oneshot::Sender<()>,
    },
}

/// Where store jobs leave what their commit caused. The store thread only
/// gathers it, in commit order, and hands a batch's worth on at once
/// ([`Feed::hand_on`]); [`apply_commits`] does the rest, so no role code
/// runs on the store thread.
#[derive(Clone, Default)]
pub struct Feed(Arc<std::sync::Mutex<Vec<Commit>>>);

impl Feed {
    fn push(&self, c: Commit) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }

    /// The work a store job leaves for its commit: hand `fx` on.
    pub fn at_commit(self, fx: Effects) -> impl FnOnce() + Send + 'static {
        move || {
            if !fx.is_empty() {
                self.push(Commit::Effects(fx));
            }
        }
    }

    /// Sends what the last batch caused to [`apply_commits`]: one wake-up
    /// per batch. (A send per job woke the receiver, and so preempted the
    /// store thread, up to once per job; docs/performance.md has the
    /// figures.)
    fn hand_on(&self, to: &mpsc::UnboundedSender<Vec<Commit>>) {
        let batch = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        if !batch.is_empty() {
            let _ = to.send(batch);
        }
    }
}

impl Home {
    /// A feed for a store job's commit.
    pub fn feed(&self) -> Feed {
        self.feed.clone()
    }

    /// Whether home `name` is revoked.
    pub fn is_revoked(&self, name: &str) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// The most one user's mailbox holds (`limits.mailbox_*`).
    pub fn mailbox_cap(&self) -> crate::storage::home::MailboxCap {
        crate::storage::home::MailboxCap {
            events: self.cfg.limits.mailbox_messages as u64,
            bytes: self.cfg.limits.mailbox_bytes as u64,
        }
    }

    /// Acts on what a committed write caused: pushes events to online
    /// devices and wakes whoever forwards queued items.
    fn apply(self: &Arc<Self>, fx: Effects) {
        self.metrics.count(&fx.tally);
        if let Some(c) = &self.cluster {
            c.pushes(&fx.pushes);
            for h in &fx.forget {
                c.forget(h);
            }
            if !fx.contacts.is_empty() {
                c.contacts(&fx.contacts);
            }
        }
        for p in fx.pushes {
            self.registry.push(p);
        }
        for (n, dest) in fx.queued {
            match dest {
                Some(home) => peers::kick(self, &home, Some(n)),
                None => self.router.kick(),
            }
        }
        for handle in fx.forget {
            self.router.forget(&handle);
        }
        if !fx.contacts.is_empty() {
            tokio::spawn(refresh_contacts(self.clone(), fx.contacts));
        }
    }
}

/// Acts on what commits caused, in commit order, until the store is gone.
async fn apply_commits(home: Arc<Home>, mut rx: mpsc::UnboundedReceiver<Vec<Commit>>) {
    while let Some(batch) = rx.recv().await {
        for c in batch {
            match c {
                Commit::Effects(fx) => home.apply(fx),
                Commit::Contacts {
                    handle,
                    rows,
                    installed,
                } => {
                    if let Some(homes) = home.hub.watch(&home.registry, &handle, &rows) {
                        for d in homes {
                            peers::ensure_link(&home, &d);
                        }
                    }
                    let _ = installed.send(());
                }
            }
        }
    }
}

/// After contact lists changed: each online user gets their new list (with
/// presence) and the hub watches what it says; homes that may no longer
/// see a user lose their subscription.
pub(crate) async fn refresh_contacts(home: Arc<Home>, users: Vec<String>) {
    for u in users {
        send_contacts(&home, &u).await;
        for h in home.hub.subscriber_homes(&u) {
            let (h2, u2) = (h.clone(), vec![u.clone()]);
            match home.store.read(move |s| s.visible_to_home(&h2, &u2)).await {
                Ok(v) if v.is_empty() => home.hub.revoke(&u, &h),
                Ok(_) => {}
                Err(e) => tracing::warn!(handle = %u, "re-checking presence subscriptions: {e}"),
            }
        }
    }
}

/// Reads `handle`'s contact list, installs it in the presence hub and sends
/// it to their online devices; ready once that is done. Does nothing for a
/// user who is offline.
///
/// The list goes through the commit feed, so lists are installed in the
/// order they were read: two refreshes for one user that each read, then
/// installed, could let the older list win.
pub async fn send_contacts(home: &Arc<Home>, handle: &str) {
    let (h, feed) = (handle.to_owned(), home.feed.clone());
    let (installed, done) = tokio::sync::oneshot::channel();
    let read = home.store.lazy_then(move |s| {
        let rows = s
            .contacts(&h)
            .inspect_err(|e| tracing::warn!(handle = %h, "reading contacts: {e}"))?;
        Ok(move || {
            feed.push(Commit::Contacts {
                handle: h,
                rows,
                installed,
            });
        })
    });
    // A failed read was reported above.
    if read.await.is_ok() {
        let _ = done.await;
    }
}

/// Tells systemd (when run by it) what the home is doing, every few seconds.
async fn report_status(home: Arc<Home>) {
    let mut last = (0, 0, 0);
    loop {
        // The rate buckets and login counts of the quiet go.
        home.send_rate.sweep();
        home.contact_rate.sweep();
        home.peer_rate.sweep();
        home.logins.sweep();
        let (users, devices) = home.registry.online();
        let counters = home.hub.stats.snapshot();
        let line = format!(
            "home {}: {users} users online ({devices} devices), {} peer homes linked; presence: {} changes, {} to agents, {} to peers{}",
            home.cfg.name,
            home.peers.active(),
            counters.0,
            counters.1,
            counters.2,
            crate::status::expiry_note(&home.cfg.cert_path, &home.cfg.ca_path),
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
        if counters != last {
            last = counters;
            tracing::debug!(
                target: "popupd::home::counters",
                presence_changes = counters.0,
                presence_to_agents = counters.1,
                presence_to_peers = counters.2,
                "presence counters"
            );
        }
        if crate::task::sleep_or_shutdown(std::time::Duration::from_secs(5), &home.shutdown).await {
            return;
        }
    }
}

/// How long a home remembers message ids (to drop retries and redeliveries)
/// and who to send receipts to.
const REMEMBER: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Forgets dedup and receipt records past [`REMEMBER`], hourly.
async fn prune(home: Arc<Home>) {
    loop {
        let before = popupd_protocol::now_ms() - REMEMBER.as_millis() as i64;
        match home.store.run(move |s| s.prune(before)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "forgot message records older than 30 days"),
            Err(e) => tracing::warn!("pruning: {e}"),
        }
        if crate::task::sleep_or_shutdown(std::time::Duration::from_secs(3600), &home.shutdown)
            .await
        {
            return;
        }
    }
}

/// How often live connections are checked against the accounts, so that
/// `popupd device revoke` and `user remove` (run beside the daemon) take
/// effect without a restart.
const REVOKE_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

async fn drop_revoked(home: Arc<Home>) {
    loop {
        if crate::task::sleep_or_shutdown(REVOKE_CHECK, &home.shutdown).await {
            return;
        }
        check_devices(&home).await;
    }
}

/// Closes the connections of devices revoked (or of users removed) since
/// they logged in. On a home of several nodes the admin commands also ask
/// every node to do it at once (`cluster::ask_nodes`).
pub(crate) async fn check_devices(home: &Arc<Home>) {
    let mark = home.registry.mark();
    match home.store.read(|s| s.all_devices()).await {
        Ok(list) => {
            let allowed: std::collections::HashSet<(String, String)> = list.into_iter().collect();
            let n = home.registry.keep_only(mark, &allowed);
            if n > 0 {
                tracing::info!(connections = n, "closed the connections of revoked devices");
            }
        }
        Err(e) => tracing::warn!("checking devices: {e}"),
    }
}

/// Opens the store of a home; what its commits cause goes through `feed`
/// to `commits`.
fn open_store(
    cfg: &HomeConfig,
    obs: Arc<dyn popupd_store::Observer>,
    feed: Feed,
    commits: mpsc::UnboundedSender<Vec<Commit>>,
) -> anyhow::Result<Store> {
    let s = open_records(cfg)?;
    Ok(Batcher::spawn_with(&cfg.name, s, obs, move || {
        feed.hand_on(&commits)
    })?)
}

/// Opens a home's records where its config says (`storage:`). A client
/// of PostgreSQL is made off the Tokio runtime, and must be used and
/// dropped off it too: on a store thread, or in [`admin`]'s.
pub fn open_records(cfg: &HomeConfig) -> anyhow::Result<Box<dyn HomeStore>> {
    crate::storage::open_records::<dyn HomeStore>(
        &cfg.storage,
        &cfg.data_dir,
        "home.sqlite",
        |path| Ok(Box::new(SqliteHome::open(path)?)),
        |target| {
            Ok(Box::new(PgHome::open(
                target,
                &cfg.name,
                cfg.cluster.is_some(),
            )?))
        },
    )
}

fn tls_configs(
    cfg: &HomeConfig,
) -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>), tls::TlsError> {
    Ok((
        tls::server_config(&cfg.identity, cfg.ca.clone(), tls::ClientAuth::Optional)?,
        tls::client_config(cfg.ca.clone(), Some(&cfg.identity))?,
    ))
}

/// Applies reloaded configs: certificates and CA take effect for new
/// connections at once (live ones keep theirs); other changes are named as
/// needing a restart.
async fn apply_reloads(home: Arc<Home>, mut reload: watch::Receiver<HomeConfig>) {
    while reload.changed().await.is_ok() {
        let new = reload.borrow_and_update().clone();
        match tls_configs(&new) {
            Ok((server, client)) => {
                home.server_tls.store(server);
                home.client_tls.store(client);
                tracing::info!(home = %home.cfg.name, "home {}: reloaded certificates and CA", home.cfg.name);
            }
            Err(e) => {
                tracing::error!(home = %home.cfg.name, "home {}: reload: keeping the old certificates: {e}", home.cfg.name)
            }
        }
        // Revoked homes are cut off at once.
        *home.revoked.lock().unwrap_or_else(|e| e.into_inner()) = new.revoked.clone();
        for name in new.revoked.iter() {
            let n = peers::close_links(&home, name);
            if n > 0 {
                tracing::warn!(peer = %name, links = n, "closed the links of a revoked home: {name}");
            }
            // Its users are nowhere now: what waits for it fails.
            home.router.forget_home(name);
            let (feed, dest) = (home.feed(), name.clone());
            let failed = home
                .store
                .submit_then(move |s| {
                    let mut fx = Effects::default();
                    let why = format!("not delivered: {dest} is revoked in the network");
                    let n = rules::fail_home(&mut **s, &dest, &why, &mut fx)?;
                    Ok((n, feed.at_commit(fx)))
                })
                .await;
            match failed {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(peer = %name, items = n, "failed what waited for a revoked home: {name}")
                }
                Err(e) => {
                    tracing::error!(peer = %name, "failing what waited for the revoked home {name}: {e}")
                }
            }
        }
        let old = &home.cfg;
        let changed = [
            ("listen", old.listen != new.listen),
            ("public_address", old.public_address != new.public_address),
            ("data_dir", old.data_dir != new.data_dir),
            ("storage", old.storage.label() != new.storage.label()),
            (
                "global",
                old.global.name != new.global.name || old.global.address != new.global.address,
            ),
            ("idle_timeout", old.idle_timeout != new.idle_timeout),
            ("route_cache_ttl", old.route_ttl != new.route_ttl),
            (
                "max_connections",
                old.max_connections != new.max_connections,
            ),
            ("metrics", old.metrics != new.metrics),
        ];
        for (field, _) in changed.iter().filter(|c| c.1) {
            tracing::warn!(home = %home.cfg.name, "home {}: reload: `{field}` changed; restart the service to apply it", home.cfg.name);
        }
    }
}

/// Runs a home until `shutdown`. Calls `ready` once it is listening; applies
/// what `reload` sends.
pub async fn run(
    cfg: HomeConfig,
    shutdown: Shutdown,
    ready: impl FnOnce(),
    reload: watch::Receiver<HomeConfig>,
) -> anyhow::Result<()> {
    let metrics = crate::metrics::Metrics::new(crate::metrics::Of::Home);
    let feed = Feed::default();
    let (to_apply, commits) = mpsc::unbounded_channel();
    let store = open_store(
        &cfg,
        Arc::new(metrics.store.clone()),
        feed.clone(),
        to_apply,
    )?;
    let (server_tls, client_tls) = tls_configs(&cfg)?;
    let cluster = match &cfg.cluster {
        Some(c) => Some(cluster::start(&cfg.name, c).await?),
        None => None,
    };
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("home {}: cannot listen on {}", cfg.name, cfg.listen))?;
    let scrapes = match cfg.metrics {
        Some(addr) => Some(crate::metrics::bind(addr, &format!("home {}", cfg.name)).await?),
        None => None,
    };
    let home = Arc::new(Home {
        dir: directory::Directory::new(&cfg),
        peers: peers::Peers::default(),
        hub: presence::Hub::default(),
        cluster: cluster.as_ref().map(|c| c.0.clone()),
        server_tls: tls::Swap::new(server_tls),
        client_tls: tls::Swap::new(client_tls),
        registry: sessions::Registry::default(),
        router: router::Router::new(cfg.route_ttl),
        feed,
        agent_slots: Pool::new(cfg.max_connections),
        peer_slots: Pool::new(cfg.limits.peer_links),
        tasks: TaskTracker::new(),
        send_rate: limits::Buckets::new(cfg.limits.send_rate as f64, cfg.limits.send_burst as f64),
        contact_rate: limits::Buckets::new(cfg.limits.contact_rate as f64 / 60.0, 20.0),
        peer_rate: limits::Buckets::new(
            cfg.limits.peer_rate as f64,
            cfg.limits.peer_rate as f64 * 4.0,
        ),
        revoked: std::sync::Mutex::new(cfg.revoked.clone()),
        logins: limits::LoginGuard::new(
            cfg.limits.login_failures as u32,
            std::time::Duration::from_secs(60),
        ),
        store,
        shutdown: shutdown.clone(),
        metrics,
        started: std::time::Instant::now(),
        cfg,
    });
    let hub = Arc::downgrade(&home);
    home.metrics
        .presence(move || hub.upgrade().map_or((0, 0, 0), |h| h.hub.stats.snapshot()));
    tracing::info!(home = %home.cfg.name, listen = %home.cfg.listen, "home listening: {} on {}", home.cfg.name, home.cfg.listen);

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(directory::run(home.clone()));
    tasks.spawn(apply_commits(home.clone(), commits));
    if let Some((_, starter)) = cluster {
        tasks.spawn(cluster::run(home.clone(), starter));
    }
    tasks.spawn(router::run(home.clone()));
    tasks.spawn(peers::resume_queued(home.clone()));
    tasks.spawn(report_status(home.clone()));
    tasks.spawn(prune(home.clone()));
    tasks.spawn(drop_revoked(home.clone()));
    tasks.spawn(apply_reloads(home.clone(), reload));
    if let Some(l) = scrapes {
        tracing::info!(home = %home.cfg.name, "home {}: metrics on http://{}/metrics", home.cfg.name, l.local_addr()?);
        let h = home.clone();
        tasks.spawn(crate::metrics::serve(
            l,
            home.metrics.clone(),
            move || ops::refresh(h.clone()),
            shutdown.clone(),
        ));
    }
    match crate::status::listen(&home.cfg.data_dir).await {
        Ok(admin) => {
            let h = home.clone();
            tasks.spawn(crate::status::serve(
                admin,
                move || ops::report(h.clone()),
                shutdown.clone(),
            ));
        }
        Err(e) => {
            tracing::error!(home = %home.cfg.name, "home {}: {e:#}; `popupd status` will not answer", home.cfg.name)
        }
    }
    tasks.spawn(crate::status::warn_of_expiry(
        format!("home {}", home.cfg.name),
        home.cfg.cert_path.clone(),
        home.cfg.ca_path.clone(),
        shutdown.clone(),
    ));
    ready();

    let h = home.clone();
    accept::serve(
        listener,
        || tokio_rustls::TlsAcceptor::from(h.server_tls.load()),
        &[AGENT_PATH, PEER_PATH],
        &home.cfg.limits,
        &shutdown,
        &home.metrics.accepts,
        {
            let home = home.clone();
            move |a: accept::Accepted| -> accept::Served {
                if a.path == AGENT_PATH {
                    Box::pin(sessions::serve(home.clone(), a))
                } else {
                    Box::pin(peers::serve_inbound(home.clone(), a))
                }
            }
        },
    )
    .await;
    let st = home.hub.stats.snapshot();
    tracing::info!(home = %home.cfg.name,
        presence_changes = st.0,
        presence_to_agents = st.1,
        presence_to_peers = st.2,
        "home stopping");
    home.tasks.close();
    home.tasks.wait().await;
    tasks.shutdown().await;
    Ok(())
}
