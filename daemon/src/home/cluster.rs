//! The nodes of one home (`cluster:`): what one node tells the others,
//! over NATS core publish/subscribe.
//!
//! Every node serves the same home from the same PostgreSQL database, so
//! every record is already shared; what is not is what lives in one
//! process: which devices are connected where, and the moment a commit
//! happened. A node therefore tells the others:
//!
//! - on a subject per user (`popupd.<home>.u.<handle>`), which the nodes
//!   that hold a connection of that user subscribe to, the mailbox events
//!   its commits made (`Push`), so the node that holds the recipient's
//!   connection sends them at once, and only that node hears of them;
//!
//! and on one subject of the home's (`popupd.<home>.nodes`), heard by all:
//!
//! - contact lists that changed and routes found wrong;
//! - devices revoked and users removed (`popupd device revoke`, `user
//!   remove`, which tell the nodes themselves);
//! - its devices' presence: up, changed, gone (after the grace period),
//!   and all of them (`Roster`) when a node asks (`Hello`, on start and
//!   after NATS came back) and when its own NATS came back;
//! - a heartbeat every [`BEAT`], so that the devices of a node that died
//!   are dropped after [`DEAD_AFTER`].
//!
//! **Architecture Invariant:** NATS carries only news; the durable copy is
//! in PostgreSQL. A lost note costs a delay, never a message: a connection
//! that sees a gap in its mailbox numbers reads the mailbox; when a node
//! may have missed notes (NATS gone, or a slow consumer) every connection
//! of it reads its mailbox and contact list again, and while NATS is gone
//! those whose mailbox moved (one read of every connected user's mailbox
//! number every [`POLL`]); notes a node could not send are followed, once
//! it can, by a `Reread` of the users they were about.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Home;
use super::rules::Push;
use crate::config::Cluster as ClusterConfig;
use popupd_protocol::PresenceReport;

/// How often a node says it is alive.
const BEAT: Duration = Duration::from_secs(2);
/// A node not heard of this long is taken for dead: its devices go.
const DEAD_AFTER: Duration = Duration::from_secs(8);
/// While NATS is gone, how often connections read their mailboxes.
const POLL: Duration = Duration::from_secs(2);
/// Notes waiting for NATS, at most; past it they are dropped, and the other
/// nodes told whose they were once NATS takes notes again.
const QUEUE: usize = 65_536;
/// The longest a publish may wait for the NATS client's queue.
const PUBLISH_WAIT: Duration = Duration::from_secs(1);
/// Bytes of notes in one NATS message (NATS takes 1 MiB by default).
const MAX_MESSAGE: usize = 256 * 1024;

/// One piece of news from a node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Note {
    /// A committed mailbox event.
    Push {
        handle: String,
        seq: u64,
        event: String,
    },
    /// These users' contact lists changed.
    Contacts { users: Vec<String> },
    /// The cached route of `handle` is wrong.
    Forget { handle: String },
    /// A device connected (`conn` is the node's connection number).
    Up {
        handle: String,
        device: String,
        conn: u64,
        report: PresenceReport,
    },
    /// A connected device reported a new presence.
    Set {
        handle: String,
        device: String,
        conn: u64,
        report: PresenceReport,
    },
    /// A device's grace period after its connection ended is over.
    Gone {
        handle: String,
        device: String,
        conn: u64,
    },
    /// A node (re)joined: everyone, say your devices (`Roster`).
    Hello,
    /// Every device connected to the sending node now: the receiver drops
    /// the ones of that node it knew and are not listed (a `Gone` may have
    /// been lost).
    Roster { devices: Vec<RosterDevice> },
    /// Still here.
    Beat,
    /// Notes about these users' mailboxes (or, for `None`, anyone's) were
    /// lost: their connections read their mailboxes and contact lists.
    Reread { users: Option<Vec<String>> },
    /// Devices were revoked or users removed (by `popupd device revoke`
    /// or `user remove`): close their connections now.
    CheckDevices,
    /// Items wait for home `dest` (item `n`, or all): for node `to`, which
    /// carries items to it.
    Kick {
        to: String,
        dest: String,
        n: Option<u64>,
    },
}

/// One device in a [`Note::Roster`].
#[derive(Debug, Serialize, Deserialize)]
struct RosterDevice {
    handle: String,
    device: String,
    conn: u64,
    report: PresenceReport,
}

/// Users whose notes were lost on the way out.
#[derive(Default)]
struct Lost {
    users: std::collections::HashSet<String>,
    /// Too many to name, or not known whose: everyone.
    all: bool,
}

impl Lost {
    fn note(&mut self, n: &Note) {
        if self.all {
            return;
        }
        match n {
            Note::Push { handle, .. } => {
                self.users.insert(handle.clone());
            }
            Note::Contacts { users } => self.users.extend(users.iter().cloned()),
            Note::Reread { users: Some(u) } => self.users.extend(u.iter().cloned()),
            Note::Reread { users: None } => self.all = true,
            // Presence is said again in full (`Roster`) once NATS is back;
            // routes and items have their own sweeps.
            _ => {}
        }
        if self.users.len() > 10_000 {
            self.all = true;
            self.users.clear();
        }
    }
}

/// A NATS message: the notes of one node, in the order it made them.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The sending process: its node name (empty for an admin command, which
    /// is no node), and a number drawn at start (a restarted node is a new
    /// process, whose connection numbers start over).
    node: String,
    run: u64,
    notes: Vec<Note>,
}

/// This node's side of the cluster.
pub struct Cluster {
    cfg: ClusterConfig,
    run: u64,
    subject: String,
    /// `popupd.<home>.u.`, before a handle.
    user_prefix: String,
    tx: mpsc::Sender<Note>,
    /// Users to subscribe to (their first device connected here).
    watch_tx: mpsc::UnboundedSender<String>,
    /// Notes lost on the way out (the queue full, NATS away).
    lost: Mutex<Lost>,
    /// Other processes, with when each was last heard and its devices.
    others: Mutex<HashMap<u64, Other>>,
    /// Whether NATS is connected now.
    connected: AtomicBool,
    /// The last mailbox number this node heard of, by user: what a poll
    /// while NATS is away compares the database with.
    heard: Mutex<HashMap<String, u64>>,
}

struct Other {
    node: String,
    heard: Instant,
    /// (handle, device) → its connection number there.
    devices: HashMap<(String, String), u64>,
}

impl Cluster {
    /// Queues a note for the other nodes; never waits.
    fn tell(&self, n: Note) {
        if let Err(e) = self.tx.try_send(n) {
            let n = match e {
                mpsc::error::TrySendError::Full(n) | mpsc::error::TrySendError::Closed(n) => n,
            };
            self.lose(std::slice::from_ref(&n));
        }
    }

    /// Notes `ns` did not reach the other nodes.
    fn lose(&self, ns: &[Note]) {
        let mut l = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        for n in ns {
            l.note(n);
        }
    }

    /// This node's devices, for a [`Note::Roster`].
    fn roster(home: &Home) -> Note {
        Note::Roster {
            devices: home
                .hub
                .local_devices()
                .into_iter()
                .map(|(handle, device, conn, report)| RosterDevice {
                    handle,
                    device,
                    conn,
                    report,
                })
                .collect(),
        }
    }

    /// Notes that `handle`'s mailbox reached `seq`.
    fn heard_of(&self, handle: &str, seq: u64) {
        let mut g = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        match g.get_mut(handle) {
            Some(n) => *n = (*n).max(seq),
            None => {
                g.insert(handle.to_owned(), seq);
            }
        }
    }

    /// The first device of `handle` connected here: hear the events of
    /// their mailbox that other nodes commit.
    pub fn watch(&self, handle: &str) {
        let _ = self.watch_tx.send(handle.to_owned());
    }

    /// Mailbox events committed here.
    pub fn pushes(&self, pushes: &[Push]) {
        for p in pushes {
            self.heard_of(&p.handle, p.seq);
            self.tell(Note::Push {
                handle: p.handle.clone(),
                seq: p.seq,
                event: p.event.clone(),
            });
        }
    }

    pub fn contacts(&self, users: &[String]) {
        self.tell(Note::Contacts {
            users: users.to_vec(),
        });
    }

    pub fn forget(&self, handle: &str) {
        self.tell(Note::Forget {
            handle: handle.to_owned(),
        });
    }

    pub fn device_up(&self, handle: &str, device: &str, conn: u64, report: &PresenceReport) {
        self.tell(Note::Up {
            handle: handle.to_owned(),
            device: device.to_owned(),
            conn,
            report: report.clone(),
        });
    }

    pub fn device_set(&self, handle: &str, device: &str, conn: u64, report: &PresenceReport) {
        self.tell(Note::Set {
            handle: handle.to_owned(),
            device: device.to_owned(),
            conn,
            report: report.clone(),
        });
    }

    pub fn device_gone(&self, handle: &str, device: &str, conn: u64) {
        self.tell(Note::Gone {
            handle: handle.to_owned(),
            device: device.to_owned(),
            conn,
        });
    }

    /// Asks the node that carries items to `dest` to send item `n` (or
    /// all).
    pub fn kick(&self, dest: &str, n: Option<u64>) {
        self.tell(Note::Kick {
            to: self.carrier(dest),
            dest: dest.to_owned(),
            n,
        });
    }

    /// Whether this node carries the items queued for home `dest` (see
    /// [`Cluster::carrier`]).
    pub fn carries(&self, dest: &str) -> bool {
        self.carrier(dest) == self.cfg.node
    }

    /// The node that carries the items queued for home `dest`: of the
    /// nodes alive, the one that ranks first for `dest` (rendezvous
    /// hashing), so each peer's items are taken by one node, and another
    /// takes them on when it dies. Two nodes that briefly disagree both
    /// send; the peer keeps the first copy, and each sends in queue order.
    fn carrier(&self, dest: &str) -> String {
        let rank = |node: &str| {
            // FNV-1a: stable across processes and versions, unlike std's.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in node.bytes().chain([0]).chain(dest.bytes()) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            h
        };
        let g = self.others.lock().unwrap_or_else(|e| e.into_inner());
        g.values()
            .map(|o| &o.node)
            .chain([&self.cfg.node])
            .max_by_key(|n| (rank(n), *n))
            .cloned()
            .unwrap_or_default()
    }

    /// (this node's name, other nodes heard of and alive).
    pub fn nodes(&self) -> (String, Vec<String>) {
        let g = self.others.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> = g.values().map(|o| o.node.clone()).collect();
        v.sort();
        // A node started again is heard twice until its old self is dead.
        v.dedup();
        (self.cfg.node.clone(), v)
    }

    /// Whether NATS is connected.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
}

/// The number a device of another process has in this node's presence
/// hub: its high bit set, so it never equals one of this node's own
/// connection numbers (counted up from 0).
fn remote_conn(run: u64, conn: u64) -> u64 {
    (run ^ conn.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1 << 63
}

/// The NATS servers `cluster.nats` names.
fn nats_addrs(cfg: &ClusterConfig) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    popupd_protocol::net::address_list(&cfg.nats)
        .map(|a| a.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("cluster.nats {:?}: {e}", cfg.nats))
}

/// Connects to NATS (in the background: a node starts, and serves its own
/// connections, while NATS is away) and returns this node's side.
pub async fn start(
    home_name: &str,
    cfg: &ClusterConfig,
) -> anyhow::Result<(Arc<Cluster>, Starter)> {
    let (events_tx, events) = mpsc::unbounded_channel();
    let addrs = nats_addrs(cfg)?;
    let client = async_nats::ConnectOptions::new()
        .name(format!("popupd {home_name} {}", cfg.node))
        .no_echo()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|n| Duration::from_millis((n as u64 * 250).clamp(100, 2000)))
        .event_callback(move |e| {
            let tx = events_tx.clone();
            async move {
                let _ = tx.send(e);
            }
        })
        .connect(addrs)
        .await?;
    let subject = format!("popupd.{home_name}.nodes");
    let sub = client.subscribe(subject.clone()).await?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let (watch_tx, watch_rx) = mpsc::unbounded_channel();
    let c = Arc::new(Cluster {
        cfg: cfg.clone(),
        run: fastrand::u64(..),
        subject,
        user_prefix: format!("popupd.{home_name}.u."),
        tx,
        watch_tx,
        lost: Mutex::new(Lost::default()),
        others: Mutex::new(HashMap::new()),
        connected: AtomicBool::new(false),
        heard: Mutex::new(HashMap::new()),
    });
    Ok((
        c,
        Starter {
            client,
            sub,
            rx,
            events,
            watch_rx,
        },
    ))
}

/// What [`run`] takes once the home is built.
pub struct Starter {
    client: async_nats::Client,
    sub: async_nats::Subscriber,
    rx: mpsc::Receiver<Note>,
    events: mpsc::UnboundedReceiver<async_nats::Event>,
    watch_rx: mpsc::UnboundedReceiver<String>,
}

/// Runs this node's side: sends what it queued, acts on what the others
/// say, watches NATS come and go, drops the devices of dead nodes.
pub async fn run(home: Arc<Home>, s: Starter) {
    let Some(c) = home.cluster.clone() else {
        return;
    };
    let Starter {
        client,
        mut sub,
        mut rx,
        mut events,
        mut watch_rx,
    } = s;
    // The users this node hears the mailboxes of: a task each, reading
    // their subject (dropping it unsubscribes); they stop with this one.
    let mut watched = Watched::default();
    let watched = &mut watched.0;
    tracing::info!(home = %home.cfg.name, node = %c.cfg.node, nats = %c.cfg.nats,
        "home {}: node {} of a cluster, over NATS at {}", home.cfg.name, c.cfg.node, c.cfg.nats);
    let weak = Arc::downgrade(&home);
    let shutdown = home.shutdown.clone();
    drop(home);
    let mut beat = tokio::time::interval(BEAT);
    let mut poll = tokio::time::interval(POLL);
    let mut out: Vec<Note> = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            n = rx.recv() => {
                let Some(n) = n else { return };
                out.push(n);
                // What else is queued goes in the same message.
                while out.len() < 4096 {
                    match rx.try_recv() {
                        Ok(n) => out.push(n),
                        Err(_) => break,
                    }
                }
                if c.connected() {
                    publish(&client, &c, std::mem::take(&mut out)).await;
                } else {
                    // Held by the client, they would fill its queue and
                    // stop this loop (and its polls) until NATS is back.
                    // Whose they were is said once it is.
                    c.lose(&out);
                    out.clear();
                }
            }
            m = sub.next() => {
                let Some(m) = m else { return };
                let Some(home) = weak.upgrade() else { return };
                match serde_json::from_slice::<Envelope>(&m.payload) {
                    Ok(env) => receive(&home, &c, env),
                    Err(e) => tracing::warn!(home = %home.cfg.name, "a cluster note that is not one: {e}"),
                }
            }
            e = events.recv() => {
                let Some(e) = e else { return };
                let Some(home) = weak.upgrade() else { return };
                on_event(&home, &c, e);
            }
            h = watch_rx.recv() => {
                let Some(h) = h else { return };
                if watched.get(&h).is_some_and(|t| !t.is_finished()) {
                    continue;
                }
                match client.subscribe(format!("{}{h}", c.user_prefix)).await {
                    Ok(user_sub) => {
                        let task = tokio::spawn(hear_user(weak.clone(), c.clone(), user_sub));
                        watched.insert(h.clone(), task.abort_handle());
                        // What was committed before the subscription took
                        // effect is read from the store, once it has.
                        let (client, weak) = (client.clone(), weak.clone());
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(PUBLISH_WAIT, client.flush()).await;
                            if let Some(home) = weak.upgrade() {
                                home.registry.reread(&h, false);
                            }
                        });
                    }
                    Err(e) => tracing::warn!("subscribing to {h}'s mailbox events: {e}"),
                }
            }
            _ = beat.tick() => {
                let Some(home) = weak.upgrade() else { return };
                if c.connected() {
                    let lost = std::mem::take(&mut *c.lost.lock().unwrap_or_else(|e| e.into_inner()));
                    if lost.all {
                        c.tell(Note::Reread { users: None });
                    } else if !lost.users.is_empty() {
                        c.tell(Note::Reread { users: Some(lost.users.into_iter().collect()) });
                    }
                }
                c.tell(Note::Beat);
                bury_the_dead(&home, &c);
                // Users with no device here any more are not heard.
                watched.retain(|h, t| {
                    let keep = home.registry.is_online(h) && !t.is_finished();
                    if !keep {
                        t.abort();
                    }
                    keep
                });
            }
            _ = poll.tick() => {
                if !c.connected() {
                    let Some(home) = weak.upgrade() else { return };
                    poll_mailboxes(&home, &c).await;
                }
            }
        }
    }
}

/// For `popupd device revoke` and `user remove` on a home of several
/// nodes: asks every node to close the connections of devices no longer
/// allowed, now rather than at its next check (within 10 s). Gives up
/// after a few seconds: the nodes' own checks still come.
pub async fn ask_nodes_to_check_devices(
    home_name: &str,
    cfg: &ClusterConfig,
) -> anyhow::Result<()> {
    let addrs = nats_addrs(cfg)?;
    let work = async {
        let client = async_nats::ConnectOptions::new()
            .name(format!("popupd admin {home_name}"))
            .connect(addrs)
            .await?;
        let env = Envelope {
            node: String::new(),
            run: fastrand::u64(..),
            notes: vec![Note::CheckDevices],
        };
        client
            .publish(
                format!("popupd.{home_name}.nodes"),
                serde_json::to_vec(&env)?.into(),
            )
            .await?;
        client.flush().await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from NATS at {} within 5 s", cfg.nats))?
}

/// The tasks that hear users' subjects, stopped when dropped.
#[derive(Default)]
struct Watched(HashMap<String, tokio::task::AbortHandle>);

impl Drop for Watched {
    fn drop(&mut self) {
        for t in self.0.values() {
            t.abort();
        }
    }
}

/// Another node committed `handle`'s mailbox event `seq`: to their
/// connections here.
fn heard_push(home: &Home, c: &Cluster, handle: String, seq: u64, event: String) {
    c.heard_of(&handle, seq);
    home.registry.push(Push { handle, seq, event });
}

/// Hears one user's subject: the mailbox events other nodes committed.
async fn hear_user(home: std::sync::Weak<Home>, c: Arc<Cluster>, mut sub: async_nats::Subscriber) {
    while let Some(m) = sub.next().await {
        let Some(home) = home.upgrade() else { return };
        match serde_json::from_slice::<Envelope>(&m.payload) {
            Ok(env) => {
                for n in env.notes {
                    if let Note::Push { handle, seq, event } = n {
                        heard_push(&home, &c, handle, seq, event);
                    }
                }
            }
            Err(e) => tracing::warn!(home = %home.cfg.name, "a cluster note that is not one: {e}"),
        }
    }
}

/// Sends notes: mailbox events on their user's subject (an envelope per
/// user), the rest on the home's.
async fn publish(client: &async_nats::Client, c: &Cluster, notes: Vec<Note>) {
    let mut by_user: HashMap<String, Vec<Note>> = HashMap::new();
    let mut rest = Vec::new();
    for n in notes {
        match &n {
            Note::Push { handle, .. } => by_user.entry(handle.clone()).or_default().push(n),
            _ => rest.push(n),
        }
    }
    for (handle, pushes) in by_user {
        publish_on(client, c, format!("{}{handle}", c.user_prefix), pushes).await;
    }
    if !rest.is_empty() {
        publish_on(client, c, c.subject.clone(), rest).await;
    }
}

async fn publish_on(client: &async_nats::Client, c: &Cluster, subject: String, notes: Vec<Note>) {
    let mut chunk = Vec::new();
    let mut size = 0;
    let n = notes.len();
    for (i, note) in notes.into_iter().enumerate() {
        size += match &note {
            Note::Push { event, .. } => event.len() + 64,
            _ => 128,
        };
        chunk.push(note);
        if size >= MAX_MESSAGE || i + 1 == n {
            let env = Envelope {
                node: c.cfg.node.clone(),
                run: c.run,
                notes: std::mem::take(&mut chunk),
            };
            size = 0;
            let body = match serde_json::to_vec(&env) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("encoding cluster notes: {e}");
                    continue;
                }
            };
            // The client queues what it cannot send yet, and waits once its
            // queue is full: NATS went away since it was last seen.
            let sent =
                tokio::time::timeout(PUBLISH_WAIT, client.publish(subject.clone(), body.into()))
                    .await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!("publishing cluster notes: {sent:?}");
                c.lose(&env.notes);
            }
        }
    }
}

fn receive(home: &Arc<Home>, c: &Arc<Cluster>, env: Envelope) {
    let from = env.run;
    // An admin command's envelope (no node name) is no node's.
    let known = env.node.is_empty() || {
        let mut g = c.others.lock().unwrap_or_else(|e| e.into_inner());
        let known = g.contains_key(&from);
        let o = g.entry(from).or_insert_with(|| Other {
            node: env.node.clone(),
            heard: Instant::now(),
            devices: HashMap::new(),
        });
        o.heard = Instant::now();
        known
    };
    if !known && env.node == c.cfg.node {
        tracing::warn!(home = %home.cfg.name, node = %env.node,
            "home {}: another process is node {} too: give each node a name of its own (cluster.node)",
            home.cfg.name, env.node);
    }
    if !known {
        tracing::info!(home = %home.cfg.name, node = %env.node, "home {}: node {} joined", home.cfg.name, env.node);
        // It may hold devices we have not heard of, and carry items now.
        c.tell(Note::Hello);
        tokio::spawn(super::peers::kick_queued(home.clone()));
    }
    let mut contacts = Vec::new();
    for n in env.notes {
        match n {
            Note::Push { handle, seq, event } => heard_push(home, c, handle, seq, event),
            Note::Contacts { users } => contacts.extend(users),
            Note::Forget { handle } => home.router.forget(&handle),
            Note::Up {
                handle,
                device,
                conn,
                report,
            } => {
                let id = remote_conn(from, conn);
                remember(c, from, &handle, &device, Some(id));
                home.hub
                    .device_up(&home.registry, &handle, &device, id, report);
            }
            Note::Set {
                handle,
                device,
                conn,
                report,
            } => {
                let id = remote_conn(from, conn);
                home.hub
                    .device_set(&home.registry, &handle, &device, id, report);
            }
            Note::Gone {
                handle,
                device,
                conn,
            } => {
                let id = remote_conn(from, conn);
                remember(c, from, &handle, &device, None);
                home.hub.device_down(&handle, &device, id);
                home.hub.expire(&home.registry, &handle, &device, id);
            }
            Note::Hello => c.tell(Cluster::roster(home)),
            Note::Roster { devices } => roster(home, c, from, devices),
            Note::Beat => {}
            Note::Reread { users: None } => home.registry.reread_all(true),
            Note::Reread { users: Some(users) } => {
                for u in users {
                    home.registry.reread(&u, true);
                }
            }
            // Asked as the carrier: carry, even if this node does not
            // think so (yet), or the two would pass it back and forth.
            Note::Kick { to, dest, n } if to == c.cfg.node => {
                super::peers::kick_here(home, &dest, n)
            }
            Note::Kick { .. } => {}
            Note::CheckDevices => {
                tracing::info!(home = %home.cfg.name, "home {}: devices revoked or users removed: checking connections", home.cfg.name);
                let h = home.clone();
                tokio::spawn(async move { super::check_devices(&h).await });
            }
        }
    }
    if !contacts.is_empty() {
        contacts.sort();
        contacts.dedup();
        contacts.retain(|u| home.registry.is_online(u) || !home.hub.subscriber_homes(u).is_empty());
        if !contacts.is_empty() {
            tokio::spawn(super::refresh_contacts(home.clone(), contacts));
        }
    }
}

/// While NATS is away: one read of the mailbox numbers of the users
/// connected here, and the connections of those with events this node has
/// not heard of read their mailboxes. (A read per connection every
/// [`POLL`] would cost the database as much as the traffic itself.)
async fn poll_mailboxes(home: &Arc<Home>, c: &Arc<Cluster>) {
    let online = home.registry.online_handles();
    for chunk in online.chunks(10_000) {
        let handles = chunk.to_vec();
        let seqs = match home.store.read(move |s| s.last_seqs(&handles)).await {
            Ok(v) => v,
            Err(e) => return tracing::warn!(home = %home.cfg.name, "reading mailbox numbers: {e}"),
        };
        let mut heard = c.heard.lock().unwrap_or_else(|e| e.into_inner());
        for (h, seq) in seqs {
            let known = heard.entry(h.clone()).or_insert(0);
            if seq > *known {
                *known = seq;
                home.registry.reread(&h, false);
            }
        }
    }
    // Users gone from this node are forgotten (they are read afresh when
    // they come back: a login replays the mailbox anyway).
    let mut heard = c.heard.lock().unwrap_or_else(|e| e.into_inner());
    if heard.len() > online.len() * 2 + 1024 {
        let keep: std::collections::HashSet<&String> = online.iter().collect();
        heard.retain(|h, _| keep.contains(h));
    }
}

/// Node `from`'s devices are `devices`: the ones known of it and not
/// listed are gone, the listed ones are up.
fn roster(home: &Arc<Home>, c: &Cluster, from: u64, devices: Vec<RosterDevice>) {
    let listed: std::collections::HashSet<(String, String)> = devices
        .iter()
        .map(|d| (d.handle.clone(), d.device.clone()))
        .collect();
    let gone: Vec<((String, String), u64)> = {
        let g = c.others.lock().unwrap_or_else(|e| e.into_inner());
        g.get(&from)
            .map(|o| {
                o.devices
                    .iter()
                    .filter(|(k, _)| !listed.contains(*k))
                    .map(|(k, v)| (k.clone(), *v))
                    .collect()
            })
            .unwrap_or_default()
    };
    for ((handle, device), id) in gone {
        remember(c, from, &handle, &device, None);
        home.hub.device_down(&handle, &device, id);
        home.hub.expire(&home.registry, &handle, &device, id);
    }
    for d in devices {
        let id = remote_conn(from, d.conn);
        remember(c, from, &d.handle, &d.device, Some(id));
        home.hub
            .device_up(&home.registry, &d.handle, &d.device, id, d.report);
    }
}

fn remember(c: &Cluster, from: u64, handle: &str, device: &str, id: Option<u64>) {
    let mut g = c.others.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(o) = g.get_mut(&from) {
        let key = (handle.to_owned(), device.to_owned());
        match id {
            Some(id) => {
                o.devices.insert(key, id);
            }
            None => {
                o.devices.remove(&key);
            }
        }
    }
}

/// Drops the devices of processes not heard of for [`DEAD_AFTER`].
fn bury_the_dead(home: &Arc<Home>, c: &Cluster) {
    let dead: Vec<Other> = {
        let mut g = c.others.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<u64> = g
            .iter()
            .filter(|(_, o)| o.heard.elapsed() > DEAD_AFTER)
            .map(|(k, _)| *k)
            .collect();
        gone.into_iter().filter_map(|k| g.remove(&k)).collect()
    };
    if !dead.is_empty() {
        // What the dead carried is someone else's now.
        tokio::spawn(super::peers::kick_queued(home.clone()));
    }
    for o in dead {
        tracing::warn!(home = %home.cfg.name, node = %o.node, devices = o.devices.len(),
            "home {}: node {} not heard of for {}; its devices count as gone",
            home.cfg.name, o.node, humantime::format_duration(DEAD_AFTER));
        for ((handle, device), id) in o.devices {
            home.hub.device_down(&handle, &device, id);
            home.hub.expire(&home.registry, &handle, &device, id);
        }
    }
}

fn on_event(home: &Arc<Home>, c: &Cluster, e: async_nats::Event) {
    use async_nats::Event;
    match e {
        Event::Connected => {
            c.connected.store(true, Ordering::Release);
            tracing::info!(home = %home.cfg.name, "home {}: NATS connected", home.cfg.name);
            // Whatever was said while we were away is read from the store.
            home.registry.reread_all(true);
            c.tell(Note::Hello);
            c.tell(Cluster::roster(home));
        }
        Event::Disconnected => {
            c.connected.store(false, Ordering::Release);
            tracing::warn!(home = %home.cfg.name,
                "home {}: NATS is gone; the other nodes' news is read from the store every {} until it is back",
                home.cfg.name, humantime::format_duration(POLL));
        }
        Event::SlowConsumer(_) => {
            tracing::warn!(home = %home.cfg.name, "home {}: fell behind the other nodes' news; reading every mailbox again", home.cfg.name);
            home.registry.reread_all(true);
        }
        other => tracing::info!(home = %home.cfg.name, "home {}: NATS: {other}", home.cfg.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, others: &[&str]) -> Cluster {
        let (tx, _rx) = mpsc::channel(1);
        let c = Cluster {
            cfg: ClusterConfig {
                node: name.into(),
                nats: "nats://127.0.0.1:4222".into(),
            },
            run: fastrand::u64(..),
            subject: String::new(),
            user_prefix: String::new(),
            tx,
            watch_tx: mpsc::unbounded_channel().0,
            lost: Mutex::new(Lost::default()),
            others: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(true),
            heard: Mutex::new(HashMap::new()),
        };
        for (i, o) in others.iter().enumerate() {
            c.others.lock().unwrap_or_else(|e| e.into_inner()).insert(
                i as u64,
                Other {
                    node: (*o).into(),
                    heard: Instant::now(),
                    devices: HashMap::new(),
                },
            );
        }
        c
    }

    /// Every node names the same carrier for a peer home; the peers are
    /// spread over the nodes; when a node dies only its peers move.
    #[test]
    fn the_nodes_agree_on_one_carrier_per_peer_and_only_the_dead_ones_peers_move() {
        let all = ["n1", "n2", "n3"];
        let views: Vec<Cluster> = all
            .iter()
            .map(|n| {
                node(
                    n,
                    &all.iter().copied().filter(|o| o != n).collect::<Vec<_>>(),
                )
            })
            .collect();
        let peers: Vec<String> = (0..30).map(|i| format!("home-{i}.example.org")).collect();
        let carriers: Vec<String> = peers.iter().map(|p| views[0].carrier(p)).collect();
        for v in &views {
            for (p, want) in peers.iter().zip(&carriers) {
                assert_eq!(&v.carrier(p), want, "{} disagrees on {p}", v.cfg.node);
                assert_eq!(v.carries(p), v.cfg.node == *want);
            }
        }
        let used: std::collections::HashSet<&String> = carriers.iter().collect();
        assert_eq!(used.len(), 3, "every node carries some: {carriers:?}");
        // n2 dies: n1's view without it.
        let after = node("n1", &["n3"]);
        for (p, before) in peers.iter().zip(&carriers) {
            let now = after.carrier(p);
            if before == "n2" {
                assert_ne!(now, "n2");
            } else {
                assert_eq!(&now, before, "{p} moved although its carrier lives");
            }
        }
    }

    #[test]
    fn lost_notes_name_their_users_until_there_are_too_many() {
        let mut l = Lost::default();
        l.note(&Note::Push {
            handle: "bob".into(),
            seq: 1,
            event: "{}".into(),
        });
        l.note(&Note::Contacts {
            users: vec!["carol".into()],
        });
        l.note(&Note::Beat);
        let mut users: Vec<&String> = l.users.iter().collect();
        users.sort();
        assert_eq!(users, ["bob", "carol"]);
        assert!(!l.all);
        for i in 0..10_001 {
            l.note(&Note::Push {
                handle: format!("u{i}"),
                seq: 1,
                event: "{}".into(),
            });
        }
        assert!(l.all && l.users.is_empty());
    }
}
