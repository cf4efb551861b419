//! Back connections: one actor per connected device, and the registry that
//! knows which devices are online.
//!
//! **Architecture Invariant:** an actor owns its link; everything else talks
//! to it through its bounded queue. If the queue is full the push is dropped
//! and the actor is told it lagged: it then re-reads its mailbox from disk,
//! so a slow device slows only itself and loses nothing. A connection that
//! is replaced (a newer one of the same device) or revoked loses its queue's
//! sender, and ends once it has drained it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::Home;
use super::rules::{self, Effects, Push, SendOutcome};
use crate::accept::Accepted;
use crate::session::{self, Clock, End, Handler, Jobs, Keepalive};
use crate::storage::secret_hash;
use popupd_protocol::net::{Link, LinkError, Recv, ServerTls};
use popupd_protocol::{
    AgentFrame, ErrorCode, HomeFrame, MAX_STATUS_TEXT, MAX_TEXT, Message, MsgId, PROTOCOL_VERSION,
    PresenceReport, PresenceState, now_ms, valid_handle, valid_id,
};
use popupd_store::{Chain, StoreError};

/// Pushes queued for one connection before it counts as lagging.
const QUEUE: usize = 512;
/// Mailbox events read from disk at a time.
const PAGE: usize = 256;
/// Malformed frames tolerated on one connection before it is closed.
const MAX_BAD_FRAMES: u32 = 16;
/// Store jobs one agent connection may have pending before the home stops
/// reading it (see `Handler::MAX_JOBS`): a sender past it waits for its
/// own commits, not everyone's. Well above what an honest agent pipelines
/// (`send_burst` lets 300 through by default), because a bound that binds
/// turns reading on and off and costs every sender throughput (figures in
/// docs/performance.md).
const MAX_IN_FLIGHT: usize = 1024;
/// The grid the keepalive timers of agent links fire on.
const GRID: std::time::Duration = std::time::Duration::from_secs(1);

/// What the registry hands a connection: a mailbox event (numbered, acked,
/// re-read from disk if lost) or a ready frame (presence, contact list)
/// that is sent as is.
pub enum Out {
    Event(Arc<Push>),
    Frame(Arc<str>),
    /// Events may have been missed (another node's news was lost): read
    /// the mailbox, and if `true` the contact list too.
    Reread(bool),
}

struct Conn {
    id: u64,
    device: String,
    tx: mpsc::Sender<Out>,
    /// Set when a push did not fit in the queue. The queue is full then,
    /// so the actor is awake and finds it once it has drained the queue.
    lag: Arc<AtomicBool>,
}

/// Which devices of which users are online, and a queue to each.
#[derive(Default)]
pub struct Registry {
    conns: Mutex<HashMap<String, Vec<Conn>>>,
    next_id: AtomicU64,
}

/// What the registry hands a new connection.
struct Registration {
    id: u64,
    rx: mpsc::Receiver<Out>,
    lag: Arc<AtomicBool>,
    /// The user had no device connected here before.
    first: bool,
}

impl Registry {
    fn register(&self, handle: &str, device: &str) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(QUEUE);
        let lag = Arc::new(AtomicBool::new(false));
        let mut map = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(handle.to_owned()).or_default();
        let first = list.is_empty();
        // The newest connection of a device wins; the older ones lose
        // their queue and end.
        list.retain(|c| c.device != device);
        list.push(Conn {
            id,
            device: device.to_owned(),
            tx,
            lag: lag.clone(),
        });
        Registration { id, rx, lag, first }
    }

    fn unregister(&self, handle: &str, id: u64) {
        let mut map = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = map.get_mut(handle) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                map.remove(handle);
            }
        }
    }

    /// Hands a new mailbox event to every online device of its user.
    pub fn push(&self, p: Push) {
        let map = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = map.get(&p.handle) else {
            return;
        };
        let p = Arc::new(p);
        for c in list {
            if c.tx.try_send(Out::Event(p.clone())).is_err() {
                c.lag.store(true, Ordering::Release);
            }
        }
    }

    /// Hands a ready frame to every online device of `handle`. A device
    /// whose queue is full is told it lagged; it then re-reads its mailbox
    /// and gets its contact list afresh, so nothing it needs is lost.
    pub fn send_frame(&self, handle: &str, frame: Arc<str>) {
        let map = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in map.get(handle).into_iter().flatten() {
            if c.tx.try_send(Out::Frame(frame.clone())).is_err() {
                c.lag.store(true, Ordering::Release);
            }
        }
    }

    /// Tells every connection to read its mailbox (and if `full` its
    /// contact list) again.
    pub fn reread_all(&self, full: bool) {
        let map = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in map.values().flatten() {
            if c.tx.try_send(Out::Reread(full)).is_err() {
                c.lag.store(true, Ordering::Release);
            }
        }
    }

    /// Tells every connection of `handle` to read its mailbox (and if
    /// `full` its contact list) again.
    pub fn reread(&self, handle: &str, full: bool) {
        let map = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in map.get(handle).into_iter().flatten() {
            if c.tx.try_send(Out::Reread(full)).is_err() {
                c.lag.store(true, Ordering::Release);
            }
        }
    }

    /// The users with a device connected here.
    pub fn online_handles(&self) -> Vec<String> {
        let map = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        map.keys().cloned().collect()
    }

    /// Whether a device of `handle` is connected here.
    pub fn is_online(&self, handle: &str) -> bool {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(handle)
    }

    /// A mark to pass to [`Registry::keep_only`]: connections made after it
    /// are left alone (their device may be newer than a list read after).
    pub fn mark(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// Closes the connections (made before `mark`) of devices not in
    /// `allowed` (revoked, or their user removed); returns how many.
    pub fn keep_only(
        &self,
        mark: u64,
        allowed: &std::collections::HashSet<(String, String)>,
    ) -> usize {
        let mut map = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for (handle, list) in map.iter_mut() {
            list.retain(|c| {
                let keep = c.id >= mark || allowed.contains(&(handle.clone(), c.device.clone()));
                n += usize::from(!keep);
                keep
            });
        }
        map.retain(|_, list| !list.is_empty());
        n
    }

    /// (users online, devices online).
    pub fn online(&self) -> (usize, usize) {
        let map = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        (map.len(), map.values().map(Vec::len).sum())
    }
}

/// A store job's answer, once on disk. What the job caused (the
/// recipient's event, a receipt, a forward-queue wake, new contact lists)
/// was done at commit, on the store thread: the agent sends each of these
/// again until it hears the answer, so a power cut that undoes the commit
/// loses nothing.
enum Done {
    /// The message is on disk (or storing it failed).
    Accepted(MsgId, Result<SendOutcome, StoreError>),
    /// A read mark (request `req`) is on disk.
    Read(u64, Result<(), StoreError>),
    /// A contact-list change (request `req`, about the handle); an error
    /// goes back to the agent.
    Contact(u64, String, Result<(), StoreError>),
}

/// What an agent connection's own queue woke it for.
enum Wake {
    Out(Out),
    /// Pushes were dropped: re-read the mailbox.
    Lag,
    /// A merged presence change is due.
    Presence,
    /// The queue's sender is gone: a newer connection of the device, or
    /// the device was revoked.
    Replaced,
}

/// Messages and requests refused in a row, past the time the agent was
/// told to wait, without the refused one coming again: an agent sends at
/// most its outbox so between two tries (what it sent before it heard),
/// a client that ignores `rate_limited` sends on without end. Past this
/// the home closes its link.
const IGNORED_MAX: u32 = 10_000;

/// Callers box this future: it holds the whole link, and a connection's
/// task would otherwise keep room for it at every place it may be called.
async fn refuse(mut link: Link<ServerTls>, code: ErrorCode, message: &str) {
    let _ = link
        .send(&HomeFrame::Error {
            code,
            message: message.to_owned(),
            id: None,
            req: None,
            retry_after_ms: None,
        })
        .await;
    link.linger(session::LINGER).await;
    link.close().await;
}

/// Serves one back connection until it closes.
///
/// A plain function around an `async move` block, not an `async fn`: an
/// `async fn` moves its arguments into locals and keeps room for both, and
/// the link is a large part of every idle connection. `Accepted` is taken
/// apart in the signature for the same reason: taken apart inside, its
/// link would have room twice.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn serve(
    home: Arc<Home>,
    Accepted {
        mut link,
        addr: peer,
        ticket,
        ..
    }: Accepted,
) -> impl Future<Output = ()> + Send {
    async move {
        let first = match Box::pin(tokio::time::timeout_at(
            ticket.deadline,
            link.recv::<AgentFrame>(),
        ))
        .await
        {
            Ok(Ok(Recv::Frame(f))) => f,
            Ok(Ok(Recv::Bad(e))) => {
                return Box::pin(refuse(
                    link,
                    ErrorCode::BadFrame,
                    &format!("expected hello: {e}"),
                ))
                .await;
            }
            Ok(Err(LinkError::TooLarge)) => {
                return Box::pin(refuse(link, ErrorCode::TooLarge, "frame too large")).await;
            }
            _ => return,
        };
        let AgentFrame::Hello {
            v,
            handle,
            device,
            secret,
            presence,
        } = first
        else {
            return Box::pin(refuse(
                link,
                ErrorCode::NotAuthenticated,
                "send hello first",
            ))
            .await;
        };
        if v != PROTOCOL_VERSION {
            let msg =
                format!("this home speaks protocol {PROTOCOL_VERSION}, not {v}; upgrade popupd");
            return Box::pin(refuse(link, ErrorCode::UnsupportedVersion, &msg)).await;
        }
        // After failed logins, from this address or for this handle, the
        // next try waits; one that comes sooner is refused unheard.
        let ip = peer.ip().to_canonical().to_string();
        let wait = home.logins.wait(&ip).max(home.logins.wait(&handle));
        if !wait.is_zero() {
            home.metrics.logins_throttled.inc();
            let msg = format!(
                "too many failed logins; try again in {} s",
                wait.as_secs().max(1)
            );
            return Box::pin(refuse(link, ErrorCode::AuthFailed, &msg)).await;
        }
        let hash = secret_hash(&secret);
        let (h, d) = (handle.clone(), device.clone());
        let acked = match Box::pin(home.store.read(move |s| s.check_device(&h, &d, &hash))).await {
            Ok(Some(a)) => {
                home.metrics.logins_ok.inc();
                home.logins.succeeded(&handle);
                a
            }
            Ok(None) => {
                home.metrics.logins_failed.inc();
                let (say, in_a_row) = home.logins.failed(&ip);
                home.logins.failed(&handle);
                // One line per address a minute, not one per guess.
                if say > 0 {
                    tracing::warn!(address = %ip, failed = say, in_a_row, last_handle = %handle, %device,
                        "agent authentication failed");
                }
                return Box::pin(refuse(
                link,
                ErrorCode::AuthFailed,
                "unknown handle, device or secret; ask the home's administrator for a new device (popupd user add)",
            ))
            .await;
            }
            Err(e) => {
                tracing::error!("checking device: {e}");
                return Box::pin(refuse(
                    link,
                    ErrorCode::Internal,
                    "storage failure; try again later",
                ))
                .await;
            }
        };
        // Logged in: from the pending pool to a slot of the agents' own.
        drop(ticket);
        let Some(_slot) = home.agent_slots.admit() else {
            home.metrics.logins_busy.inc();
            tracing::warn!(%peer, %handle, limit = home.agent_slots.size,
                "agent refused: {handle} from {peer}: the home holds as many agent connections as it takes (max_connections)");
            return Box::pin(refuse(
                link,
                ErrorCode::Busy,
                "this home holds as many connections as it takes; try again later",
            ))
            .await;
        };
        let welcome = HomeFrame::Welcome {
            v: PROTOCOL_VERSION,
            handle: handle.clone(),
            home: home.cfg.name.clone(),
        };
        if Box::pin(link.send(&welcome)).await.is_err() {
            return;
        }
        let reg = home.registry.register(&handle, &device);
        tracing::info!(%peer, %handle, %device, "agent online: {handle} ({device}) from {peer}");
        let report = presence.filter(valid_report).unwrap_or(PresenceReport {
            state: PresenceState::Online,
            text: String::new(),
        });
        if let Some(c) = &home.cluster {
            if reg.first {
                c.watch(&handle);
            }
            c.device_up(&handle, &device, reg.id, &report);
        }
        home.hub
            .device_up(&home.registry, &handle, &device, reg.id, report);
        Box::pin(super::send_contacts(&home, &handle)).await;
        let mut conn = AgentConn {
            home: home.clone(),
            handle: handle.clone(),
            device,
            conn: reg.id,
            sent: acked,
            peer,
            chain: Chain::default(),
            failure: None,
            rx: reg.rx,
            lag: reg.lag,
            send_limited: None,
            contact_limited: None,
            ignored: 0,
            presence_at: Some(Instant::now()),
            presence_pending: None,
            ack: None,
            presence_timer: None,
        };
        let why = Box::pin(conn.run(&mut link)).await;
        home.registry.unregister(&handle, reg.id);
        home.hub.device_down(&handle, &conn.device, reg.id);
        match &why {
            // The client broke the WebSocket rules (an unmasked frame, a
            // bad opcode): worth an administrator's eye.
            End::Link(LinkError::Ws(e)) => tracing::warn!(%peer, %handle, device = %conn.device,
                "agent offline: {handle} ({}) from {peer}: it broke the WebSocket protocol: {e}", conn.device),
            _ => {
                tracing::info!(%peer, %handle, device = %conn.device, "agent offline: {handle} ({}) from {peer}: {why}", conn.device)
            }
        }
        Box::pin(link.close()).await;
        // The person keeps showing their presence for the grace period, so a
        // quick reconnect changes nothing for their contacts.
        let grace = home.cfg.presence_grace;
        let (device, id) = (conn.device, reg.id);
        let h = home.clone();
        home.tasks.spawn(async move {
            if !crate::task::sleep_or_shutdown(grace, &h.shutdown).await {
                h.hub.expire(&h.registry, &handle, &device, id);
                if let Some(c) = &h.cluster {
                    c.device_gone(&handle, &device, id);
                }
            }
        });
    }
}

fn valid_report(r: &PresenceReport) -> bool {
    r.state != PresenceState::Unknown && r.text.len() <= MAX_STATUS_TEXT
}

struct AgentConn {
    home: Arc<Home>,
    handle: String,
    device: String,
    /// This connection's id in the registry (and the presence hub).
    conn: u64,
    /// Highest mailbox event sent down this link.
    sent: u64,
    peer: SocketAddr,
    /// The agent's changes (messages, read marks, contact changes) commit
    /// in the order they came, or stop at the first that fails.
    chain: Chain,
    /// Why the store failed, once it did: the session then ends, and the
    /// agent sends what it was not told is stored again, in order, on a
    /// new one.
    failure: Option<&'static str>,
    /// What the registry hands this connection.
    rx: mpsc::Receiver<Out>,
    /// Set when a push did not fit in `rx`.
    lag: Arc<AtomicBool>,
    /// Over the send rate: the first message refused, and until when. Every
    /// later message is refused too until that one comes again, so the
    /// agent's resend keeps their order.
    send_limited: Option<(MsgId, Instant)>,
    /// Likewise for contact changes (by request number).
    contact_limited: Option<(u64, Instant)>,
    /// Refused in a row past the time the agent was told (see
    /// [`IGNORED_MAX`]).
    ignored: u32,
    /// When this device's presence last changed, and the change waiting
    /// for `presence_interval` to pass.
    presence_at: Option<Instant>,
    presence_pending: Option<PresenceReport>,
    presence_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The highest ack heard and not yet stored: acks are cumulative, so
    /// one store job once nothing else is ready stands for every ack of a
    /// burst (a job per ack let an agent queue store work without bound).
    ack: Option<u64>,
}

impl AgentConn {
    /// Stores the highest ack heard, if any. Lazy: if a power cut undoes
    /// it, the events after the older ack are sent again and the agent
    /// drops what it has. Nothing comes back to this connection.
    fn store_ack(&mut self) {
        let Some(seq) = self.ack.take() else { return };
        let (h, d, feed) = (self.handle.clone(), self.device.clone(), self.home.feed());
        self.home.store.lazy_then(move |s| {
            let mut fx = Effects::default();
            rules::ack(&mut **s, &h, &d, seq, &mut fx)
                .inspect_err(|e| tracing::error!(handle = %h, "storing an ack failed: {e}"))?;
            Ok(feed.at_commit(fx))
        });
    }

    async fn run(&mut self, link: &mut Link<ServerTls>) -> End {
        if let Err(e) = Box::pin(self.replay(link)).await {
            return e.into();
        }
        let mut jobs = Jobs::new();
        // The home pings a link quiet for a quarter of `idle_timeout`, on a
        // one-second grid: the pings to every quiet agent due in the same
        // second go out in one wake-up, and their pongs come back together.
        let idle = self.home.cfg.idle_timeout;
        let ka = Keepalive {
            ping_after: idle / 4,
            dead_after: idle,
            clock: Clock::Grid(GRID),
        };
        let shutdown = self.home.shutdown.clone();
        let end = session::run(link, self, &mut jobs, ka, &shutdown).await;
        self.store_ack();
        // Jobs still pending when the link fails have their effects all the
        // same: at commit, on the store thread.
        while jobs.next().await.is_some() {}
        end
    }

    /// The store failed: answer what is pending (what came after the
    /// failure is refused unrun), say when to come back, and let the agent
    /// read all that before the link closes.
    async fn end_after_failure(
        &mut self,
        link: &mut Link<ServerTls>,
        jobs: &mut Jobs<Done>,
        why: &'static str,
    ) -> End {
        while let Some(d) = jobs.next().await {
            if Box::pin(self.finish(link, d)).await.is_err() {
                return End::Store(format!("{why}; link lost"));
            }
        }
        let bye = HomeFrame::Bye {
            reconnect_after_ms: 1000 + fastrand::u64(0..1000),
        };
        if link.send(&bye).await.is_ok() {
            link.linger(std::time::Duration::from_secs(2)).await;
        }
        End::Store(why.into())
    }

    async fn on_frame(
        &mut self,
        link: &mut Link<ServerTls>,
        f: AgentFrame,
        pending: &mut Jobs<Done>,
    ) -> Result<(), LinkError> {
        let home = self.home.clone();
        let store = &home.store;
        match f {
            AgentFrame::Send {
                id,
                from,
                to,
                text,
                reply_to,
            } => {
                if let Some(claimed) = from.filter(|f| *f != self.handle) {
                    tracing::warn!(peer = %self.peer, handle = %self.handle, %claimed, msg_id = %id,
                        "spoofed sender refused: {} claimed to be {claimed}", self.handle);
                    return self
                        .error(
                            link,
                            ErrorCode::SpoofedSender,
                            "you may only send as yourself",
                            Some(id),
                        )
                        .await;
                }
                let invalid = if !valid_id(&id) {
                    Some("id must be a UUID (v7) in canonical form".into())
                } else if !valid_handle(&to) {
                    Some("recipient is not a valid handle".into())
                } else if text.is_empty() || text.len() > MAX_TEXT {
                    Some(format!("text must be 1 to {MAX_TEXT} bytes"))
                } else if reply_to.as_deref().is_some_and(|r| !valid_id(r)) {
                    Some("reply_to must be a message id".into())
                } else {
                    None
                };
                if let Some(why) = invalid {
                    return self.error(link, ErrorCode::Invalid, &why, Some(id)).await;
                }
                if let Some(wait) = self.limited_send(&id) {
                    self.home.metrics.rate_limited_send.inc();
                    let why = format!(
                        "{} takes {} messages a second from one person; it is sent again in {} ms",
                        self.home.cfg.name,
                        self.home.cfg.limits.send_rate,
                        wait.as_millis()
                    );
                    return self.rate_limited(link, Some(id), None, wait, &why).await;
                }
                let msg = Message {
                    id: id.clone(),
                    from: self.handle.clone(),
                    to,
                    text,
                    sent_at: now_ms(),
                    reply_to,
                };
                // With the route cached, the message is queued straight for
                // its home; otherwise the router asks the global server.
                let dest = self.home.router.known_home(&msg.to, &self.home.cfg.name);
                // The recipient gets it at commit; the sender hears
                // "accepted" once it is on disk.
                let (feed, cap) = (self.home.feed(), self.home.mailbox_cap());
                let p = store.chain_then(&self.chain, move |s| {
                    let mut fx = Effects::default();
                    let o = rules::accept_send(&mut **s, &msg, dest.as_deref(), cap, &mut fx)?;
                    Ok((o, feed.at_commit(fx)))
                });
                pending.push_back(Box::pin(async move { Done::Accepted(id, p.await) }));
            }
            AgentFrame::Ack { seq } => self.ack = Some(self.ack.map_or(seq, |a| a.max(seq))),
            AgentFrame::Read { id, req } => {
                let (h, feed) = (self.handle.clone(), self.home.feed());
                let p = store.chain_then(&self.chain, move |s| {
                    let mut fx = Effects::default();
                    rules::mark_read(&mut **s, &h, &id, &mut fx)?;
                    Ok(((), feed.at_commit(fx)))
                });
                pending.push_back(Box::pin(async move { Done::Read(req, p.await) }));
            }
            AgentFrame::SetPresence { state, text } => {
                let report = PresenceReport { state, text };
                if !valid_report(&report) {
                    let why = format!(
                        "presence must be online, busy, away or offline, with at most {MAX_STATUS_TEXT} bytes of text"
                    );
                    return self.error(link, ErrorCode::Invalid, &why, None).await;
                }
                // Merged: at most one change per `presence_interval`, the
                // latest wins.
                let interval = self.home.cfg.limits.presence_interval;
                match self.presence_at {
                    Some(at) if at.elapsed() < interval => {
                        if self.presence_pending.replace(report).is_none() {
                            self.presence_timer =
                                Some(Box::pin(tokio::time::sleep_until((at + interval).into())));
                        }
                    }
                    _ => self.set_presence(report),
                }
            }
            AgentFrame::Contact { op, handle, req } => {
                if !valid_handle(&handle) {
                    let why = format!("{handle:?} is not a handle");
                    return self
                        .refuse_request(link, req, ErrorCode::Invalid, &why)
                        .await;
                }
                if let Some(wait) = self.limited_request(req) {
                    self.home.metrics.rate_limited_contact.inc();
                    let why = format!(
                        "{} takes {} contact changes a minute from one person; it is sent again in {} ms",
                        self.home.cfg.name,
                        self.home.cfg.limits.contact_rate,
                        wait.as_millis()
                    );
                    return self.rate_limited(link, None, Some(req), wait, &why).await;
                }
                let dest = self.home.router.known_home(&handle, &self.home.cfg.name);
                let (owner, peer, feed) = (self.handle.clone(), handle.clone(), self.home.feed());
                let p = store.chain_then(&self.chain, move |s| {
                    let mut fx = Effects::default();
                    rules::contact_op(&mut **s, &owner, &peer, op, dest.as_deref(), &mut fx)?;
                    Ok(((), feed.at_commit(fx)))
                });
                pending.push_back(Box::pin(async move { Done::Contact(req, handle, p.await) }));
            }
            AgentFrame::PresenceOf { handle } => {
                return match self.home.hub.presence_of(&self.handle, &handle) {
                    Some(s) => {
                        link.send(&HomeFrame::Presence {
                            handle,
                            state: s.state,
                            text: s.text,
                            since: s.since,
                        })
                        .await
                    }
                    None => {
                        tracing::info!(handle = %self.handle, asked = %handle, "presence query refused: {} asked for {handle}, not an accepted contact", self.handle);
                        self.error(
                            link,
                            ErrorCode::NotAccepted,
                            &format!("{handle} has not accepted you as a contact"),
                            None,
                        )
                        .await
                    }
                };
            }
            AgentFrame::Hello { .. } => {
                return self
                    .error(link, ErrorCode::BadFrame, "already authenticated", None)
                    .await;
            }
        }
        Ok(())
    }

    async fn finish(&mut self, link: &mut Link<ServerTls>, d: Done) -> Result<(), LinkError> {
        match d {
            Done::Accepted(id, Ok(outcome)) => {
                if outcome == SendOutcome::Accepted {
                    self.home.metrics.messages_accepted.inc();
                }
                tracing::debug!(handle = %self.handle, msg_id = %id, "accepted");
                link.feed(&HomeFrame::Accepted { id }).await
            }
            Done::Read(req, Ok(())) | Done::Contact(req, _, Ok(())) => {
                link.feed(&HomeFrame::Done { req }).await
            }
            Done::Accepted(id, Err(StoreError::Conflict(m))) => {
                self.error(link, ErrorCode::Invalid, &m, Some(id)).await
            }
            Done::Contact(req, peer, Err(StoreError::Conflict(m) | StoreError::NotFound(m))) => {
                let why = format!("{peer}: {m}");
                self.refuse_request(link, req, ErrorCode::Invalid, &why)
                    .await
            }
            Done::Accepted(id, Err(e)) => {
                let why = self.failed(&e);
                tracing::warn!(handle = %self.handle, msg_id = %id, "storing a message failed: {e}");
                self.error(link, ErrorCode::Internal, &why, Some(id)).await
            }
            Done::Read(req, Err(e)) | Done::Contact(req, _, Err(e)) => {
                let why = self.failed(&e);
                tracing::warn!(handle = %self.handle, req, "storing a request failed: {e}");
                self.refuse_request(link, req, ErrorCode::Internal, &why)
                    .await
            }
        }
    }

    /// Whether message `id` must wait (and how long): over the user's send
    /// rate, or behind a message refused for it.
    fn limited_send(&mut self, id: &str) -> Option<std::time::Duration> {
        limited(
            &mut self.send_limited,
            &mut self.ignored,
            id,
            &self.home.send_rate,
            &self.handle,
        )
    }

    /// Likewise for contact change `req`.
    fn limited_request(&mut self, req: u64) -> Option<std::time::Duration> {
        limited(
            &mut self.contact_limited,
            &mut self.ignored,
            &req,
            &self.home.contact_rate,
            &self.handle,
        )
    }

    /// While the agent is told to wait, the home does not read its link:
    /// it would only refuse what it read.
    fn hold(&self) -> Option<Instant> {
        let send = self.send_limited.as_ref().map(|l| l.1);
        let contact = self.contact_limited.map(|l| l.1);
        send.max(contact)
    }

    /// Closes the link of a client that sends on regardless of
    /// `rate_limited` ([`IGNORED_MAX`]).
    async fn close_ignoring(&self, link: &mut Link<ServerTls>) -> End {
        tracing::warn!(handle = %self.handle, device = %self.device, peer = %self.peer,
            "closing the link of {} ({}) that keeps sending while told to wait (rate_limited)", self.handle, self.device);
        let _ = link.flush().await;
        link.linger(session::LINGER).await;
        End::Other("it kept sending while told to wait".into())
    }

    async fn rate_limited(
        &self,
        link: &mut Link<ServerTls>,
        id: Option<MsgId>,
        req: Option<u64>,
        wait: std::time::Duration,
        why: &str,
    ) -> Result<(), LinkError> {
        link.feed(&HomeFrame::Error {
            code: ErrorCode::RateLimited,
            message: why.to_owned(),
            id,
            req,
            // At least a millisecond: zero would read as "now", again.
            retry_after_ms: Some((wait.as_millis() as u64).max(1)),
        })
        .await
    }

    fn set_presence(&mut self, report: PresenceReport) {
        self.presence_at = Some(Instant::now());
        let h = &self.home;
        if let Some(c) = &h.cluster {
            c.device_set(&self.handle, &self.device, self.conn, &report);
        }
        h.hub
            .device_set(&h.registry, &self.handle, &self.device, self.conn, report);
    }

    /// Notes a store failure (the first one ends the session) and says
    /// what the agent may tell the person.
    fn failed(&mut self, e: &StoreError) -> String {
        // Answers come in order, so a job refused because an earlier one
        // failed (`Aborted`) finds that one's cause here.
        let cause = *self.failure.get_or_insert(e.client_reason());
        format!(
            "{} cannot store it now: {cause}; it is sent again",
            self.home.cfg.name
        )
    }

    async fn error(
        &self,
        link: &mut Link<ServerTls>,
        code: ErrorCode,
        message: &str,
        id: Option<MsgId>,
    ) -> Result<(), LinkError> {
        link.send(&HomeFrame::Error {
            code,
            message: message.to_owned(),
            id,
            req: None,
            retry_after_ms: None,
        })
        .await
    }

    async fn refuse_request(
        &self,
        link: &mut Link<ServerTls>,
        req: u64,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), LinkError> {
        link.send(&HomeFrame::Error {
            code,
            message: message.to_owned(),
            id: None,
            req: Some(req),
            retry_after_ms: None,
        })
        .await
    }

    async fn on_push(&mut self, link: &mut Link<ServerTls>, p: &Push) -> Result<(), LinkError> {
        if p.seq <= self.sent {
            Ok(())
        } else if p.seq == self.sent + 1 {
            link.feed_text(event_frame(p.seq, &p.event)).await?;
            self.sent = p.seq;
            Ok(())
        } else {
            // A push was dropped or overtaken: read the gap from disk.
            self.replay(link).await
        }
    }

    /// Sends every stored event after `sent`.
    async fn replay(&mut self, link: &mut Link<ServerTls>) -> Result<(), LinkError> {
        loop {
            let (h, after) = (self.handle.clone(), self.sent);
            let page = self
                .home
                .store
                .read(move |s| s.mailbox_after(&h, after, PAGE))
                .await
                .map_err(|e| LinkError::Io(std::io::Error::other(e)))?;
            let n = page.len();
            for (seq, ev) in page {
                link.feed_text(event_frame(seq, &ev)).await?;
                self.sent = seq;
            }
            link.flush().await?;
            if n < PAGE {
                return Ok(());
            }
        }
    }
}

impl Handler<ServerTls> for AgentConn {
    type In = AgentFrame;
    type Done = Done;
    type Wake = Wake;
    const MAX_BAD_FRAMES: Option<u32> = Some(MAX_BAD_FRAMES);
    const MAX_JOBS: usize = MAX_IN_FLIGHT;

    fn idle_due(&self) -> bool {
        self.ack.is_some()
    }

    async fn idle(&mut self, _: &mut Link<ServerTls>) -> Result<(), End> {
        self.store_ack();
        Ok(())
    }

    fn hold_reading(&self) -> Option<Instant> {
        self.hold()
    }

    fn poll_wake(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Wake> {
        use std::task::Poll;
        if let Some(t) = &mut self.presence_timer
            && t.as_mut().poll(cx).is_ready()
        {
            self.presence_timer = None;
            return Poll::Ready(Wake::Presence);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(o)) => Poll::Ready(Wake::Out(o)),
            Poll::Ready(None) => Poll::Ready(Wake::Replaced),
            // The lag only once the queue is drained: the contact list it
            // sends goes through the queue, and into a full one it would
            // only lag again, round and round.
            Poll::Pending if self.lag.swap(false, Ordering::AcqRel) => Poll::Ready(Wake::Lag),
            Poll::Pending => Poll::Pending,
        }
    }

    async fn frame(
        &mut self,
        link: &mut Link<ServerTls>,
        f: AgentFrame,
        jobs: &mut Jobs<Done>,
    ) -> Result<(), End> {
        self.on_frame(link, f, jobs).await?;
        if self.ignored > IGNORED_MAX {
            return Err(Box::pin(self.close_ignoring(link)).await);
        }
        Ok(())
    }

    async fn done(
        &mut self,
        link: &mut Link<ServerTls>,
        d: Done,
        jobs: &mut Jobs<Done>,
    ) -> Result<(), End> {
        self.finish(link, d).await?;
        match self.failure {
            Some(why) => Err(self.end_after_failure(link, jobs, why).await),
            None => Ok(()),
        }
    }

    async fn wake(
        &mut self,
        link: &mut Link<ServerTls>,
        w: Wake,
        _: &mut Jobs<Done>,
    ) -> Result<(), End> {
        match w {
            Wake::Out(Out::Event(p)) => Ok(self.on_push(link, &p).await?),
            Wake::Out(Out::Frame(f)) => Ok(link.feed_text(f.to_string()).await?),
            Wake::Out(Out::Reread(full)) => {
                if full {
                    super::send_contacts(&self.home, &self.handle).await;
                }
                Ok(self.replay(link).await?)
            }
            Wake::Lag => {
                tracing::debug!(handle = %self.handle, "connection fell behind: reading its mailbox from disk");
                // Frames may have been dropped too: resend the list.
                super::send_contacts(&self.home, &self.handle).await;
                Ok(self.replay(link).await?)
            }
            Wake::Replaced => Err(End::Replaced),
            Wake::Presence => {
                if let Some(r) = self.presence_pending.take() {
                    self.set_presence(r);
                }
                Ok(())
            }
        }
    }

    fn bad_frame(&self, why: &str) -> Option<String> {
        tracing::info!(peer = %self.peer, handle = %self.handle, "malformed frame from {} ({}): {why}", self.handle, self.peer);
        serde_json::to_string(&HomeFrame::Error {
            code: ErrorCode::BadFrame,
            message: why.to_owned(),
            id: None,
            req: None,
            retry_after_ms: None,
        })
        .ok()
    }

    fn too_large(&self) -> Option<String> {
        serde_json::to_string(&HomeFrame::Error {
            code: ErrorCode::TooLarge,
            message: format!("frames are limited to {} bytes", popupd_protocol::MAX_FRAME),
            id: None,
            req: None,
            retry_after_ms: None,
        })
        .ok()
    }

    async fn stopping(&mut self, link: &mut Link<ServerTls>, jobs: &mut Jobs<Done>) {
        // Answer what is committed, then say when to come back.
        while let Some(d) = jobs.next().await {
            let _ = Box::pin(self.finish(link, d)).await;
        }
        let _ = link
            .send(&HomeFrame::Bye {
                reconnect_after_ms: 500 + fastrand::u64(0..1500),
            })
            .await;
    }
}

/// A `HomeFrame::Event` built around an event already in JSON.
fn event_frame(seq: u64, event_json: &str) -> String {
    format!("{{\"t\":\"event\",\"seq\":{seq},\"event\":{event_json}}}")
}

/// Whether item `key` must wait for `bucket`, the rate of `handle`. `told`
/// is the item the agent was last told to send again, and when: until that
/// one comes back, every other item waits too (and is counted in `ignored`
/// once that time has passed, for a client that sends on regardless); when
/// it comes, the wait is over and the bucket decides afresh.
fn limited<Q>(
    told: &mut Option<(Q::Owned, Instant)>,
    ignored: &mut u32,
    key: &Q,
    bucket: &super::limits::Buckets,
    handle: &str,
) -> Option<std::time::Duration>
where
    Q: ?Sized + PartialEq + ToOwned,
    Q::Owned: std::borrow::Borrow<Q>,
{
    use std::borrow::Borrow;
    if let Some((first, until)) = told {
        if (*first).borrow() != key {
            let now = Instant::now();
            if *until <= now {
                *ignored += 1;
            }
            return Some(until.saturating_duration_since(now));
        }
        *told = None;
        *ignored = 0;
    }
    let wait = bucket.take(handle).err()?;
    *told = Some((key.to_owned(), Instant::now() + wait));
    Some(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use popupd_protocol::{Event, HomeFrame};

    #[test]
    fn event_frame_is_a_valid_home_frame() {
        let ev = serde_json::to_string(&Event::Status {
            id: "x".into(),
            state: popupd_protocol::Delivery::Delivered,
            reason: None,
        })
        .unwrap();
        let f: HomeFrame = serde_json::from_str(&event_frame(3, &ev)).unwrap();
        assert!(matches!(f, HomeFrame::Event { seq: 3, .. }));
    }
}
