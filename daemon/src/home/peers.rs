//! Links to other homes, and the router that decides where queued items go.
//!
//! A link is mutual TLS under the network CA: the dialing home names itself
//! in `hello` and its certificate must be valid for that name. Either home may
//! dial; whichever link exists between two homes carries items both ways, so
//! one link serves a pair of homes and is reused for every message. Each side
//! keeps its items in its durable forward queue until the other side acks
//! them, so a link (or a home) can die at any moment without losing one; the
//! receiver drops duplicates by message id.
//!
//! **Architecture Invariant:** a message from `alice` is accepted from a peer
//! only if the directory says `alice` lives on that peer.
//!
//! **Architecture Invariant:** items reach a peer in queue order, so each
//! sender's messages arrive in the order they were sent. Three rules make it
//! so: items are woken at commit, on the store thread (so in queue order);
//! each link sends the items it was woken for in increasing order; and when
//! two links to one peer are up (both homes dialed at once, or a new link
//! while a dying one lingers), only the newest carries items, starting with
//! everything still unacked. The receiver keeps the first copy of each
//! message and processes each link in order, so a later item can never be
//! stored before an earlier one.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc};

use super::Home;
use super::rules::{self, Effects, OutItem};
use crate::accept::Accepted;
use crate::session::{self, Clock, End, Handler, Jobs, Keepalive};
use crate::task::{Shutdown, sleep_or_shutdown};
use popupd_protocol::net::Backoff;
use popupd_protocol::net::{self, Dial, HANDSHAKE_TIMEOUT, Link, LinkError, Recv};
use popupd_protocol::{
    ErrorCode, MAX_TEXT, NOT_ACCEPTED, PEER_PATH, PROTOCOL_VERSION, PeerFrame, Refusal, now_ms,
    valid_handle, valid_id,
};
use popupd_store::{Chain, StoreError};

/// A peer link silent this long is dead; a write that blocks this long
/// ends it too.
const PEER_IDLE: Duration = Duration::from_secs(15);
/// Ping interval on peer links.
const PEER_PING: Duration = Duration::from_secs(5);
/// Longest wait between two dials of a peer that items or presence wait
/// for: short, so that delivery resumes within seconds of a network
/// healing (a dial also gives up after `net::CONNECT_TIMEOUT`).
const REDIAL_MAX: Duration = Duration::from_secs(2);
/// How far ahead of this home's clock a peer's `sent_at` may be.
const SKEW: i64 = 10 * 60 * 1000;
/// Malformed frames tolerated on one peer link before it is closed.
const MAX_BAD_FRAMES: u32 = 16;
/// Store jobs one peer link may have pending before the home stops
/// reading it (see `Handler::MAX_JOBS`); higher than an agent's, as a
/// link carries many people's messages.
const MAX_IN_FLIGHT: usize = 2048;
/// Items one link may have sent and not yet had acked. Well under the
/// peer's `MAX_IN_FLIGHT`, so that a peer's acks of our items and its
/// items to us together never make either side stop reading: two homes
/// that both stopped reading while both wrote would wait on each other
/// until the write timeout.
const WINDOW: usize = 1024;
/// How often every queued item is looked at again, whatever the wakes said.
const SWEEP: Duration = Duration::from_secs(30);

/// What a link should send next: the items it was told about, or (after a
/// restart or reconnect) everything queued for its peer. Telling the link
/// which items are new keeps a busy link from re-reading its whole queue.
#[derive(Default)]
struct Kick {
    notify: Arc<Notify>,
    wanted: Mutex<Wanted>,
}

#[derive(Default)]
struct Wanted {
    all: bool,
    ns: Vec<u64>,
}

impl Wanted {
    fn all() -> Wanted {
        Wanted {
            all: true,
            ns: Vec::new(),
        }
    }
}

impl Kick {
    fn add(&self, n: Option<u64>) {
        {
            let mut w = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
            match n {
                Some(n) => w.ns.push(n),
                None => w.all = true,
            }
        }
        self.notify.notify_one();
    }

    fn take(&self) -> Wanted {
        std::mem::take(&mut *self.wanted.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[derive(Default)]
struct Slot {
    /// Links up with this peer, oldest first. The last one carries our
    /// items; each has its own wake, so a wake meant for the carrier never
    /// reaches a link that no longer carries.
    links: Vec<(u64, Arc<Kick>, Shutdown)>,
    /// A dialer runs for this peer.
    dialing: bool,
}

impl Slot {
    fn carrier(&self) -> Option<&Arc<Kick>> {
        self.links.last().map(|(_, w, _)| w)
    }
}

/// The links to other homes, by home name.
#[derive(Default)]
pub struct Peers {
    slots: Mutex<HashMap<String, Slot>>,
    next_link: std::sync::atomic::AtomicU64,
}

impl Peers {
    /// Number of peer homes with a live link or dialer.
    pub fn active(&self) -> usize {
        let s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.values()
            .filter(|s| s.dialing || !s.links.is_empty())
            .count()
    }

    /// Each peer home known, with its links up and whether a dialer runs
    /// (for `popupd status`).
    pub fn states(&self) -> Vec<(String, usize, bool)> {
        let s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.iter()
            .map(|(h, s)| (h.clone(), s.links.len(), s.dialing))
            .collect()
    }
}

/// Item `n` (or, for `None`, every item) waits for `dest`: wake the link
/// that carries items to it, or start dialing it; on a node of several,
/// the node that carries items to `dest` is told instead, if it is not
/// this one.
pub fn kick(home: &Arc<Home>, dest: &str, n: Option<u64>) {
    if let Some(c) = &home.cluster
        && !c.carries(dest)
    {
        return c.kick(dest, n);
    }
    kick_here(home, dest, n)
}

/// [`kick`] on this node, whichever carries.
pub fn kick_here(home: &Arc<Home>, dest: &str, n: Option<u64>) {
    let mut slots = home.peers.slots.lock().unwrap_or_else(|e| e.into_inner());
    let slot = slots.entry(dest.to_owned()).or_default();
    match slot.carrier() {
        Some(w) => w.add(n),
        // A link that comes up sends everything queued.
        None => start_dialer(home, slot, dest),
    }
}

/// Makes sure a link to `dest` is up or being dialed (for presence
/// subscriptions; queued items use [`kick`]).
pub fn ensure_link(home: &Arc<Home>, dest: &str) {
    let mut slots = home.peers.slots.lock().unwrap_or_else(|e| e.into_inner());
    let slot = slots.entry(dest.to_owned()).or_default();
    if slot.links.is_empty() {
        start_dialer(home, slot, dest);
    }
}

fn start_dialer(home: &Arc<Home>, slot: &mut Slot, dest: &str) {
    if !slot.dialing {
        slot.dialing = true;
        tokio::spawn(dialer(home.clone(), dest.to_owned()));
    }
}

/// Registers a link with `peer`, which from now on carries our items
/// (the one before stops); returns its id, its wake, and what stops it.
fn enter(home: &Home, peer: &str) -> (u64, Arc<Kick>, Shutdown) {
    let id = home
        .peers
        .next_link
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let wake = Arc::new(Kick::default());
    let stop = home.shutdown.child_token();
    let mut slots = home.peers.slots.lock().unwrap_or_else(|e| e.into_inner());
    slots
        .entry(peer.to_owned())
        .or_default()
        .links
        .push((id, wake.clone(), stop.clone()));
    (id, wake, stop)
}

/// Closes every link with `peer` (it was revoked).
pub fn close_links(home: &Home, peer: &str) -> usize {
    let slots = home.peers.slots.lock().unwrap_or_else(|e| e.into_inner());
    slots.get(peer).map_or(0, |s| {
        for (_, _, stop) in &s.links {
            stop.cancel();
        }
        s.links.len()
    })
}

/// Link `id` with `peer` is down. If it carried items and another link is
/// up, that one carries them now, starting with everything queued; if none
/// is up and items or presence wait, dial.
async fn leave(home: &Arc<Home>, peer: &str, id: u64) {
    {
        let mut slots = home.peers.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get_mut(peer) {
            let was_carrier = s.links.last().is_some_and(|(i, _, _)| *i == id);
            s.links.retain(|(i, _, _)| *i != id);
            if let Some(w) = s.carrier() {
                if was_carrier {
                    w.add(None);
                }
                return;
            }
            if s.dialing {
                return;
            }
        }
    }
    if home.shutdown.is_cancelled() {
        return;
    }
    if home.hub.wants_home(peer) {
        return ensure_link(home, peer);
    }
    let p = peer.to_owned();
    let waiting = home.store.read(move |s| s.waiting_for(&p)).await;
    if waiting.is_ok_and(|w| w) {
        kick(home, peer, None);
    }
}

/// Dials `dest` until a link is up, serves it, and redials while items
/// or presence wait for it and no other link is up.
async fn dialer(home: Arc<Home>, dest: String) {
    let shutdown = home.shutdown.clone();
    let mut backoff = Backoff::new(Duration::from_millis(100), REDIAL_MAX);
    loop {
        if home.is_revoked(&dest) {
            tracing::warn!(peer = %dest, "not dialing a revoked home: {dest}");
            break;
        }
        match connect(&home, &dest).await {
            Ok(mut link) => {
                backoff.reset();
                tracing::info!(peer = %dest, "peer link up (dialed): {dest}");
                let why = serve_link(&home, &mut link, &dest).await;
                tracing::info!(peer = %dest, "peer link down: {dest}: {why}");
                link.close().await;
            }
            Err(e) => tracing::warn!(peer = %dest, "cannot link to home {dest}: {e}"),
        }
        if sleep_or_shutdown(backoff.next_delay(), &shutdown).await {
            break;
        }
        let linked = {
            let slots = home.peers.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.get(&dest).is_some_and(|s| !s.links.is_empty())
        };
        if linked {
            // The peer dialed us meanwhile; that link serves.
            break;
        }
        if home.hub.wants_home(&dest) {
            continue;
        }
        let d = dest.clone();
        if let Ok(false) = home.store.read(move |s| s.waiting_for(&d)).await {
            break;
        }
    }
    {
        let mut slots = home.peers.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get_mut(&dest) {
            s.dialing = false;
        }
    }
    // Items queued while the last try failed would wait for the sweep.
    if !shutdown.is_cancelled() {
        let d = dest.clone();
        if let Ok(true) = home.store.read(move |s| s.waiting_for(&d)).await {
            kick(&home, &dest, None);
        }
    }
}

async fn connect(home: &Arc<Home>, dest: &str) -> Result<Link<net::ClientTls>, String> {
    let address = home
        .dir
        .home_address(dest)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("the global server knows no home {dest}"))?;
    let dial = Dial {
        address,
        name: dest.to_owned(),
        path: PEER_PATH,
        tls: home.client_tls.load(),
        proxy: None,
    };
    let mut link = net::dial(&dial).await.map_err(|e| e.to_string())?;
    link.send(&PeerFrame::Hello {
        v: PROTOCOL_VERSION,
        home: home.cfg.name.clone(),
    })
    .await
    .map_err(|e| e.to_string())?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, link.recv::<PeerFrame>())
        .await
        .map_err(|_| "no welcome in time".to_string())?
    {
        Ok(Recv::Frame(PeerFrame::Welcome { home: h, .. })) if h == dest => Ok(link),
        Ok(Recv::Frame(PeerFrame::Error { message, .. })) => Err(format!("refused: {message}")),
        other => Err(format!("unexpected answer: {other:?}")),
    }
}

/// Serves a link another home dialed.
pub async fn serve_inbound(home: Arc<Home>, accepted: Accepted) {
    let Accepted {
        mut link,
        addr,
        ticket,
        ..
    } = accepted;
    let first = tokio::time::timeout_at(ticket.deadline, link.recv::<PeerFrame>()).await;
    let Ok(Ok(Recv::Frame(PeerFrame::Hello { v, home: name }))) = first else {
        let _ = link
            .send(&PeerFrame::Error {
                code: ErrorCode::NotAuthenticated,
                message: "send hello first".into(),
            })
            .await;
        return link.close().await;
    };
    let refusal = match net::check_dialer(&link, v, &name) {
        Err(r) => Some(r),
        Ok(()) if name == home.cfg.name => Some((
            ErrorCode::AuthFailed,
            "a home does not link to itself".to_string(),
        )),
        Ok(()) if home.is_revoked(&name) => Some((
            ErrorCode::AuthFailed,
            "this home's name is revoked in the network".to_string(),
        )),
        Ok(()) => None,
    };
    if let Some((code, message)) = refusal {
        tracing::warn!(%addr, claimed = %name, "peer home refused: {name} ({addr}): {message}");
        let _ = link.send(&PeerFrame::Error { code, message }).await;
        return link.close().await;
    }
    // Logged in: from the pending pool to a slot of the peers' own.
    drop(ticket);
    let Some(_slot) = home.peer_slots.admit() else {
        tracing::warn!(%addr, peer = %name, limit = home.peer_slots.size,
            "peer home refused: {name} ({addr}): as many peer links as this home takes (limits.peer_links)");
        let _ = link
            .send(&PeerFrame::Error {
                code: ErrorCode::Busy,
                message: "this home holds as many peer links as it takes; try again later".into(),
            })
            .await;
        return link.close().await;
    };
    if link
        .send(&PeerFrame::Welcome {
            v: PROTOCOL_VERSION,
            home: home.cfg.name.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    tracing::info!(peer = %name, %addr, "peer link up (accepted): {name} from {addr}");
    let why = serve_link(&home, &mut link, &name).await;
    tracing::info!(peer = %name, "peer link down: {name}: {why}");
    link.close().await;
}

/// A store job's answer. What the job caused (events for our users,
/// forward-queue wakes) is done by then, on the store thread at commit.
enum Done {
    /// Stored (or refused for good): answer the peer.
    Ack(u64, Result<(), StoreError>),
    /// Our own bookkeeping.
    Applied(Result<(), StoreError>),
    /// The users a `subscribe` may see.
    Subscribe(Result<Vec<String>, StoreError>),
}

/// Runs one link both ways until it drops.
async fn serve_link<S: AsyncRead + AsyncWrite + Unpin + Send>(
    home: &Arc<Home>,
    link: &mut Link<S>,
    peer: &str,
) -> End {
    link.set_write_timeout(PEER_IDLE);
    let (link_id, kick, stop) = enter(home, peer);
    let why = serve_link_as(home, link, peer, &kick, &stop).await;
    leave(home, peer, link_id).await;
    why
}

async fn serve_link_as<S: AsyncRead + AsyncWrite + Unpin + Send>(
    home: &Arc<Home>,
    link: &mut Link<S>,
    peer: &str,
    kick: &Arc<Kick>,
    stop: &Shutdown,
) -> End {
    let (id, presence, first) = home.hub.link_up(peer);
    let end = match first {
        Some(f) => link.send_text(f).await.err().map(End::from),
        None => None,
    };
    let end = match end {
        Some(e) => e,
        None => {
            let mut jobs = Jobs::new();
            let mut s = PeerSession {
                home,
                peer,
                link_id: id,
                presence,
                kicked: Box::pin(kick.notify.clone().notified_owned()),
                kick: kick.clone(),
                out: Outgoing::default(),
                chain: Chain::default(),
                hold: None,
                taken: Vec::new(),
            };
            // A new link sends everything queued; later wakes name new items.
            kick.take();
            let end = match send_queued(home, link, peer, &mut s.out, Wanted::all()).await {
                Err(e) => e.into(),
                Ok(()) => {
                    let ka = Keepalive {
                        ping_after: PEER_PING,
                        dead_after: PEER_IDLE,
                        clock: Clock::Grid(Duration::from_secs(1)),
                    };
                    session::run(link, &mut s, &mut jobs, ka, stop).await
                }
            };
            // Jobs still pending have their effects all the same: the
            // store thread applies them at commit.
            s.drop_taken();
            end
        }
    };
    home.hub.link_down(&home.registry, id);
    end
}

/// One link with a peer home, as the session loop sees it.
struct PeerSession<'a> {
    home: &'a Arc<Home>,
    peer: &'a str,
    /// This link's id in the presence hub.
    link_id: u64,
    /// Presence frames (and subscription changes) to send.
    presence: mpsc::UnboundedReceiver<String>,
    kick: Arc<Kick>,
    kicked: Pin<Box<tokio::sync::futures::OwnedNotified>>,
    /// Our items: sent and not yet acked, and waiting for room.
    out: Outgoing,
    /// What the peer sends is stored in the order it came, or the link
    /// ends at the first failure.
    chain: Chain,
    /// Past its rate, nothing more is read from the peer until then.
    hold: Option<std::time::Instant>,
    /// Items the peer took, to drop from the queue in one store job once
    /// nothing else is ready (one job per message cost the store a
    /// savepoint and a hand-off each).
    taken: Vec<u64>,
}

impl PeerSession<'_> {
    /// Drops the items the peer took from the forward queue. Lazy, and no
    /// one waits: an item a power cut brings back is forwarded again, and
    /// the peer drops it by id.
    fn drop_taken(&mut self) {
        if self.taken.is_empty() {
            return;
        }
        let (peer, ns) = (self.peer.to_owned(), std::mem::take(&mut self.taken));
        self.home.store.submit_lazy(move |s| {
            for n in ns {
                s.remove(n).inspect_err(|e| {
                    tracing::error!(peer, n, "storing a peer's ack failed: {e}")
                })?;
            }
            Ok(())
        });
    }
}

enum PeerWake {
    /// Items to send.
    Kick(Wanted),
    /// A presence frame to send.
    Presence(String),
}

impl PeerSession<'_> {
    /// What the peer sent: items to store (acked once on disk), presence,
    /// acks of our items.
    async fn on_frame<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        link: &mut Link<S>,
        f: PeerFrame,
        pending: &mut Jobs<Done>,
    ) -> Result<(), LinkError> {
        let (home, peer, link_id) = (self.home, self.peer, self.link_id);
        let (out, kick, chain) = (&mut self.out, &self.kick, &self.chain);
        let store = &home.store;
        match f {
            PeerFrame::Contact { n, from, to, op } => {
                if !valid_handle(&from) || !valid_handle(&to) {
                    return refuse(link, n, ErrorCode::Invalid, "bad handle").await;
                }
                if !check_sender(home, link, peer, n, &from).await? {
                    return Ok(());
                }
                let (from_home, feed) = (peer.to_owned(), home.feed());
                let p = store.chain_then(chain, move |s| {
                    let mut fx = Effects::default();
                    rules::contact_from_peer(&mut **s, &from_home, &from, &to, op, &mut fx)?;
                    Ok(((), feed.at_commit(fx)))
                });
                pending.push_back(Box::pin(async move { Done::Ack(n, p.await) }));
            }
            PeerFrame::Subscribe { users } => {
                let users: Vec<String> = users.into_iter().filter(|u| valid_handle(u)).collect();
                let from_home = peer.to_owned();
                // Only reads.
                let p = store.submit_lazy(move |s| s.visible_to_home(&from_home, &users));
                pending.push_back(Box::pin(async move { Done::Subscribe(p.await) }));
            }
            PeerFrame::Unsubscribe { users } => home.hub.unsubscribe(link_id, &users),
            PeerFrame::Presence {
                handle,
                state,
                text,
                since,
            } => {
                // The limit counts bytes: cut at the last whole character
                // within it.
                let mut text = text;
                if text.len() > popupd_protocol::MAX_STATUS_TEXT {
                    let mut end = popupd_protocol::MAX_STATUS_TEXT;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                }
                let shown = super::presence::Shown { state, text, since };
                home.hub
                    .remote_presence(&home.registry, link_id, &handle, shown);
            }
            PeerFrame::Deliver { n, msg } => {
                if !valid_handle(&msg.from) || !valid_handle(&msg.to) {
                    return refuse(link, n, ErrorCode::Invalid, "bad handle").await;
                }
                if !valid_id(&msg.id) || msg.text.is_empty() || msg.text.len() > MAX_TEXT {
                    return refuse(link, n, ErrorCode::Invalid, "bad id or text length").await;
                }
                // The same checks as a message from an agent: a reply names
                // a message, and the sender's home stamped it with a time
                // that has been.
                if msg.reply_to.as_deref().is_some_and(|r| !valid_id(r)) {
                    return refuse(link, n, ErrorCode::Invalid, "reply_to must be a message id")
                        .await;
                }
                if msg.sent_at <= 0 || msg.sent_at > now_ms() + SKEW {
                    return refuse(
                        link,
                        n,
                        ErrorCode::Invalid,
                        "sent_at is not a time that has been",
                    )
                    .await;
                }
                if !check_sender(home, link, peer, n, &msg.from).await? {
                    return Ok(());
                }
                // The recipient gets it at commit; the peer's ack waits for
                // the disk.
                let (from, feed, cap) = (peer.to_owned(), home.feed(), home.mailbox_cap());
                let p = store.chain_then(chain, move |s| {
                    let mut fx = Effects::default();
                    rules::accept_remote(&mut **s, &from, &msg, cap, &mut fx)?;
                    Ok(((), feed.at_commit(fx)))
                });
                pending.push_back(Box::pin(async move { Done::Ack(n, p.await) }));
            }
            PeerFrame::Receipt {
                n,
                id,
                to,
                state,
                reason,
            } => {
                let (from, feed) = (peer.to_owned(), home.feed());
                let p = store.chain_then(chain, move |s| {
                    let mut fx = Effects::default();
                    rules::apply_receipt(
                        &mut **s,
                        &id,
                        &to,
                        Some(&from),
                        state,
                        reason.as_deref(),
                        &mut fx,
                    )?;
                    Ok(((), feed.at_commit(fx)))
                });
                pending.push_back(Box::pin(async move { Done::Ack(n, p.await) }));
            }
            PeerFrame::Ack { n, refused } => {
                out.inflight.remove(&n);
                // Room again for a good share of the window: send more.
                if !out.waiting.is_empty() && out.inflight.len() <= WINDOW / 2 {
                    kick.notify.notify_one();
                }
                match refused {
                    None => self.taken.push(n),
                    Some(r) => {
                        tracing::warn!(peer, n, "peer refused an item: {}", r.message);
                        let reason = match r.code {
                            ErrorCode::NoSuchUser | ErrorCode::NotAccepted => {
                                NOT_ACCEPTED.to_string()
                            }
                            _ => r.message,
                        };
                        let gone = r.code == ErrorCode::NoSuchUser;
                        let feed = home.feed();
                        let p = store.submit_then(move |s| {
                            let mut fx = Effects::default();
                            if let Some(item) = rules::fail_item(&mut **s, n, &reason, &mut fx)?
                                && gone
                            {
                                // The user left that home: ask the directory afresh next time.
                                fx.forget.push(item.dest_handle().to_owned());
                            }
                            Ok(((), feed.at_commit(fx)))
                        });
                        pending.push_back(Box::pin(async move { Done::Applied(p.await) }));
                    }
                }
            }
            PeerFrame::Error { code, message } => {
                tracing::warn!(peer, ?code, "peer reports: {message}");
            }
            PeerFrame::Hello { .. } | PeerFrame::Welcome { .. } => {
                link.send(&PeerFrame::Error {
                    code: ErrorCode::BadFrame,
                    message: "already introduced".into(),
                })
                .await?;
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Handler<S> for PeerSession<'_> {
    type In = PeerFrame;
    type Done = Done;
    type Wake = PeerWake;
    const MAX_BAD_FRAMES: Option<u32> = Some(MAX_BAD_FRAMES);
    const MAX_JOBS: usize = MAX_IN_FLIGHT;

    fn hold_reading(&self) -> Option<std::time::Instant> {
        self.hold
    }

    fn idle_due(&self) -> bool {
        !self.taken.is_empty()
    }

    async fn idle(&mut self, _: &mut Link<S>) -> Result<(), End> {
        self.drop_taken();
        Ok(())
    }

    fn poll_wake(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<PeerWake> {
        use std::task::Poll;
        if self.kicked.as_mut().poll(cx).is_ready() {
            self.kicked.set(self.kick.notify.clone().notified_owned());
            return Poll::Ready(PeerWake::Kick(self.kick.take()));
        }
        match self.presence.poll_recv(cx) {
            Poll::Ready(Some(f)) => Poll::Ready(PeerWake::Presence(f)),
            // The hub keeps the sender while the link is registered.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    async fn frame(
        &mut self,
        link: &mut Link<S>,
        f: PeerFrame,
        jobs: &mut Jobs<Done>,
    ) -> Result<(), End> {
        // Past its rate, a peer waits: this link reads nothing meanwhile
        // (the loop still answers it), and TCP slows the sender down.
        if let Err(wait) = self.home.peer_rate.take(self.peer) {
            self.home.metrics.rate_limited_peer.inc();
            self.hold = Some(std::time::Instant::now() + wait);
        }
        Ok(self.on_frame(link, f, jobs).await?)
    }

    async fn done(&mut self, link: &mut Link<S>, d: Done, _: &mut Jobs<Done>) -> Result<(), End> {
        let peer = self.peer;
        // Acks are fed, not sent: the session loop flushes once nothing
        // else is ready, so a batch's acks leave in a few TLS records
        // rather than one write each.
        match d {
            Done::Ack(n, Ok(())) => link.feed(&PeerFrame::Ack { n, refused: None }).await?,
            Done::Ack(n, Err(StoreError::NotFound(m))) => {
                let refused = Some(Refusal {
                    code: ErrorCode::NoSuchUser,
                    message: m,
                });
                link.feed(&PeerFrame::Ack { n, refused }).await?
            }
            Done::Ack(n, Err(StoreError::Quota(m))) => {
                let refused = Some(Refusal {
                    code: ErrorCode::MailboxFull,
                    message: m,
                });
                link.feed(&PeerFrame::Ack { n, refused }).await?
            }
            Done::Ack(n, Err(StoreError::NotAccepted)) => {
                let refused = Some(Refusal {
                    code: ErrorCode::NotAccepted,
                    message: popupd_protocol::NOT_ACCEPTED.into(),
                });
                link.feed(&PeerFrame::Ack { n, refused }).await?
            }
            Done::Subscribe(Ok(users)) => self.home.hub.subscribe(self.link_id, &users),
            Done::Subscribe(Err(e)) => {
                tracing::error!(peer, "checking a presence subscription: {e}");
            }
            Done::Ack(_, Err(e)) | Done::Applied(Err(e)) => {
                // Not acked: the peer sends it again on the next link.
                tracing::error!(peer, "storage failure: {e}");
                return Err(End::Store(e.to_string()));
            }
            Done::Applied(Ok(())) => {}
        }
        Ok(())
    }

    async fn wake(
        &mut self,
        link: &mut Link<S>,
        w: PeerWake,
        _: &mut Jobs<Done>,
    ) -> Result<(), End> {
        match w {
            PeerWake::Kick(wanted) => {
                send_queued(self.home, link, self.peer, &mut self.out, wanted).await?
            }
            PeerWake::Presence(f) => link.feed_text(f).await?,
        }
        Ok(())
    }

    fn bad_frame(&self, why: &str) -> Option<String> {
        tracing::warn!(
            peer = self.peer,
            "malformed frame from peer {}: {why}",
            self.peer
        );
        let e = PeerFrame::Error {
            code: ErrorCode::BadFrame,
            message: why.to_owned(),
        };
        serde_json::to_string(&e).ok()
    }
}

/// The sender of item `n` must live on the home this link belongs to.
/// `Ok(false)`: they do not, and the item is refused; `Err`: the directory
/// could not say (drop the link; the peer sends the item again).
async fn check_sender<S: AsyncRead + AsyncWrite + Unpin>(
    home: &Arc<Home>,
    link: &mut Link<S>,
    peer: &str,
    n: u64,
    from: &str,
) -> Result<bool, LinkError> {
    match home.router.home_of(home, from).await {
        Ok(Some(r)) if r.home == peer => Ok(true),
        Ok(_) => {
            tracing::warn!(peer, claimed = %from,
                "spoofed sender refused: the directory does not place this user on that home");
            let why = "sender does not live on your home";
            refuse(link, n, ErrorCode::SpoofedSender, why).await?;
            Ok(false)
        }
        Err(e) => Err(LinkError::Io(std::io::Error::other(format!(
            "cannot check the sender's home: {e}"
        )))),
    }
}

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut Link<S>,
    n: u64,
    code: ErrorCode,
    message: &str,
) -> Result<(), LinkError> {
    link.send(&PeerFrame::Ack {
        n,
        refused: Some(Refusal {
            code,
            message: message.to_owned(),
        }),
    })
    .await
}

/// Our items on one link.
#[derive(Default)]
struct Outgoing {
    /// Sent and not yet acked.
    inflight: HashSet<u64>,
    /// Wanted but not yet sent, for want of room in the [`WINDOW`]. They
    /// go in increasing order, before any item woken later.
    waiting: BTreeSet<u64>,
}

impl Outgoing {
    /// Items `ns` wait for room, unless already sent.
    fn wait_for(&mut self, ns: impl IntoIterator<Item = u64>) {
        for n in ns {
            if !self.inflight.contains(&n) {
                self.waiting.insert(n);
            }
        }
    }
}

/// Adds the wanted items for `peer` to what waits on this link, and sends
/// the first of them as far as the [`WINDOW`] allows.
async fn send_queued<S: AsyncRead + AsyncWrite + Unpin>(
    home: &Arc<Home>,
    link: &mut Link<S>,
    peer: &str,
    out: &mut Outgoing,
    wanted: Wanted,
) -> Result<(), LinkError> {
    if let Some(c) = &home.cluster
        && !c.carries(peer)
    {
        // Another node carries them; it was told (`kick`).
        return Ok(());
    }
    if wanted.all {
        let p = peer.to_owned();
        let all = home
            .store
            .read(move |s| s.queued_ns(&p))
            .await
            .map_err(|e| LinkError::Io(std::io::Error::other(e)))?;
        out.wait_for(all);
    } else {
        out.wait_for(wanted.ns);
    }
    let Outgoing { inflight, waiting } = out;
    let room = WINDOW.saturating_sub(inflight.len());
    if room == 0 || waiting.is_empty() {
        return Ok(());
    }
    let ns: Vec<u64> = waiting.iter().take(room).copied().collect();
    for n in &ns {
        waiting.remove(n);
    }
    let p = peer.to_owned();
    // Those no longer queued (acked, expired) are left out.
    let items = home
        .store
        .read(move |s| rules::queued_items(&mut **s, &p, &ns))
        .await
        .map_err(|e| LinkError::Io(std::io::Error::other(e)))?;
    let mut any = false;
    for (n, item) in items {
        if !inflight.insert(n) {
            continue;
        }
        any = true;
        let frame = match item {
            OutItem::Deliver(msg) => PeerFrame::Deliver { n, msg },
            OutItem::Receipt {
                id,
                to,
                state,
                reason,
            } => PeerFrame::Receipt {
                n,
                id,
                to,
                state,
                reason,
            },
            OutItem::Contact { from, to, op } => PeerFrame::Contact { n, from, to, op },
        };
        link.feed(&frame).await?;
    }
    if any {
        link.flush().await?;
    }
    Ok(())
}

/// At start, and every [`SWEEP`] after: wake the links of every home with
/// items still queued. Wakes are normally precise (each new item names its
/// link); the sweep is the safety net that makes a lost wake cost a delay,
/// never a message.
pub async fn resume_queued(home: Arc<Home>) {
    loop {
        expire_queued(&home).await;
        kick_queued(home.clone()).await;
        home.router.kick();
        if sleep_or_shutdown(SWEEP, &home.shutdown).await {
            return;
        }
    }
}

/// Wakes the links of every home with items queued (on a node of several,
/// the node that carries them).
pub async fn kick_queued(home: Arc<Home>) {
    match home.store.read(|s| s.queued_dests()).await {
        Ok(dests) => {
            for d in dests {
                kick(&home, &d, None);
            }
        }
        Err(e) => tracing::error!("reading the forward queue: {e}"),
    }
}

/// Fails what waited longer than `limits.item_expiry` for a home that
/// never took it: its sender sees `failed`, with the reason.
async fn expire_queued(home: &Arc<Home>) {
    let expiry = home.cfg.limits.item_expiry;
    let before = now_ms() - expiry.as_millis() as i64;
    let waited = humantime::format_duration(expiry).to_string();
    loop {
        let (feed, w) = (home.feed(), waited.clone());
        let r = home
            .store
            .submit_then(move |s| {
                let mut fx = Effects::default();
                let why = |dest: Option<&str>| {
                    format!(
                        "not delivered: {} took nothing for {w}",
                        dest.unwrap_or("no home")
                    )
                };
                let n = rules::expire(&mut **s, before, 1000, why, &mut fx)?;
                Ok((n, feed.at_commit(fx)))
            })
            .await;
        match r {
            Ok(0) => return,
            Ok(n) => tracing::warn!(items = n, "dropped items no home took for {waited}"),
            Err(e) => return tracing::error!("expiring the forward queue: {e}"),
        }
    }
}
