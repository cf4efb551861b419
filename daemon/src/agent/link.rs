//! The back connection: the agent dials its home (through a proxy if one is
//! set), authenticates with its device credential, and keeps the link open
//! with pings. When it drops, the agent dials again with capped, jittered
//! backoff and resumes: the outbox is sent again (the home drops ids it
//! already has) and the home replays every event not yet acked.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::mpsc;

use super::dbus::AgentIface;
use super::signals::{self, Signal};
use super::{Agent, Request, Up, memory};
use crate::session::{self, Clock, End, Handler, Jobs, Keepalive};
use crate::task::sleep_or_shutdown;
use popupd_protocol::net::{self, Backoff, ClientTls, Dial, Link, LinkError, Recv, tls};
use popupd_protocol::{
    AGENT_PATH, AgentFrame, Delivery, ErrorCode, Event, HomeFrame, PROTOCOL_VERSION, now_ms,
};
use popupd_store::StoreError;

/// A link silent for this many keepalive intervals is dead: the agent pings
/// after one quiet interval, and gives up if the next brings no answer.
/// Each write must also finish within this many intervals.
const DEAD_AFTER: u32 = 2;

/// Longest wait between two tries to reach the home.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Keeps the back connection up until shutdown.
pub async fn run(agent: Arc<Agent>, mut up: mpsc::UnboundedReceiver<Up>) {
    let tls = match tls::client_config(agent.cfg.roots.clone(), None) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("TLS setup: {e}");
            return;
        }
    };
    let dial = Dial {
        address: agent.cfg.home.address.clone(),
        name: agent.cfg.home.name.clone(),
        path: AGENT_PATH,
        tls,
        proxy: agent.cfg.proxy.clone(),
    };
    let mut backoff = Backoff::new(Duration::from_millis(250), MAX_BACKOFF);
    // While the home cannot store what it is sent, each session ends at the
    // first failure; these sessions come further apart, up to a limit
    // short enough that sending resumes soon after the home recovers.
    let mut failing = Backoff::new(Duration::from_secs(1), MAX_BACKOFF);
    loop {
        let delay = match connect(&agent, &dial).await {
            Ok(mut link) => {
                backoff.reset();
                link.set_write_timeout(agent.cfg.keepalive * DEAD_AFTER);
                set_connected(&agent, true).await;
                let out = session(&agent, &mut link, &mut up).await;
                set_connected(&agent, false).await;
                match &out.end {
                    // Our own stop, or the home's (it said goodbye): planned.
                    End::Shutdown | End::Bye(..) => tracing::info!(home = %dial.name,
                        "back connection to {} closed: {}", dial.name, out.end),
                    end => tracing::warn!(home = %dial.name,
                        "back connection to {} lost: {end}", dial.name),
                }
                link.close().await;
                if out.stored_any {
                    failing.reset();
                }
                let delay = match out.end {
                    End::Bye(_, later) => later,
                    _ => backoff.next_delay(),
                };
                if out.store_failed {
                    delay.max(failing.next_delay())
                } else {
                    delay
                }
            }
            Err(e) => {
                tracing::warn!(home = %dial.name, address = %dial.address,
                    via = ?dial.proxy.as_ref().map(|p| &p.address),
                    "cannot connect to the home {} at {}: {e}", dial.name, dial.address);
                backoff.next_delay()
            }
        };
        if sleep_or_shutdown(delay, &agent.shutdown).await {
            return;
        }
    }
}

async fn connect(agent: &Agent, dial: &Dial) -> Result<Link<ClientTls>, String> {
    let mut link = tokio::select! {
        _ = agent.shutdown.cancelled() => return Err("shutting down".into()),
        r = net::dial(dial) => r.map_err(|e| e.to_string())?,
    };
    link.send(&AgentFrame::Hello {
        v: PROTOCOL_VERSION,
        handle: agent.cfg.handle.clone(),
        device: agent.cfg.device.clone(),
        secret: agent.cfg.secret.0.clone(),
        presence: Some(agent.own_presence()),
    })
    .await
    .map_err(|e| e.to_string())?;
    match tokio::time::timeout(net::HANDSHAKE_TIMEOUT, link.recv::<HomeFrame>()).await {
        Ok(Ok(Recv::Frame(HomeFrame::Welcome { .. }))) => {
            tracing::info!(home = %dial.name, "back connection up: {}", dial.name);
            Ok(link)
        }
        Ok(Ok(Recv::Frame(HomeFrame::Error { code, message, .. }))) => {
            if code == ErrorCode::AuthFailed {
                tracing::error!("the home refused this device: {message}");
            }
            Err(format!("refused ({code:?}): {message}"))
        }
        Ok(other) => Err(format!("unexpected answer: {other:?}")),
        Err(_) => Err("no welcome in time".into()),
    }
}

async fn set_connected(agent: &Agent, up: bool) {
    agent
        .plugins
        .dispatch(&super::plugins::Event::ConnectionChanged {
            connected: up,
            home: agent.cfg.home.name.clone(),
        });
    let line = format!(
        "{} {}: {} {}",
        agent.cfg.handle,
        agent.cfg.device,
        if up { "connected to" } else { "connecting to" },
        agent.cfg.home.name
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
    {
        let mut st = agent.link.lock().unwrap_or_else(|e| e.into_inner());
        st.connected = up;
        st.since = now_ms();
    }
    if let Some(i) = agent.iface() {
        let em = i.signal_emitter();
        let _ = AgentIface::connection_changed(em, up, &agent.cfg.home.name).await;
        let _ = i.get().await.connected_changed(em).await;
    }
}

/// A store job's answer.
enum Done {
    /// An event is stored (with its signal, if any): ack `seq`.
    Event(u64, Result<bool, StoreError>),
    /// Bookkeeping that is not an event (a status the home answered).
    Status(Result<bool, StoreError>),
}

/// How a session went, for the reconnect that follows.
struct Outcome {
    end: End,
    /// The home said it could not store something.
    store_failed: bool,
    /// The home confirmed a message or request.
    stored_any: bool,
}

/// One connected session, as the session loop sees it.
struct Session<'a> {
    agent: &'a Arc<Agent>,
    up: &'a mut mpsc::UnboundedReceiver<Up>,
    outbox: Pin<Box<OwnedNotified>>,
    requests: Pin<Box<OwnedNotified>>,
    /// Messages sent on this link and not yet answered.
    inflight: HashSet<String>,
    /// Requests sent on this link and not yet answered.
    asked: HashSet<u64>,
    store_failed: bool,
    stored_any: bool,
    /// Highest event stored, and the last one acked / to ack.
    last_seq: u64,
    acked: u64,
    unacked: Option<u64>,
    /// Whether anything but keepalives went by since the agent last gave
    /// back its idle code pages (agent::memory); start-up counts.
    traffic: bool,
    /// The home said "too fast": when to send the outbox (and the
    /// requests) again; nothing of them goes out before.
    outbox_retry: Option<Pin<Box<tokio::time::Sleep>>>,
    requests_retry: Option<Pin<Box<tokio::time::Sleep>>>,
    /// After "too fast", nothing is sent again until every message (or
    /// request) sent before is answered: the home reads those first, and
    /// one sent again ahead of one still unanswered could overtake it.
    outbox_draining: bool,
    requests_draining: bool,
}

/// What, besides the link, wakes a session.
enum Wake {
    Outbox,
    Requests,
    Up(Up),
}

/// A retry timer `ms` from now, unless one is set already.
fn retry_in(t: &mut Option<Pin<Box<tokio::time::Sleep>>>, ms: Option<u64>) {
    if t.is_none() {
        let d = Duration::from_millis(ms.unwrap_or(1000).clamp(1, 600_000));
        *t = Some(Box::pin(tokio::time::sleep(d)));
    }
}

/// Serves one connected link until it ends.
async fn session(
    agent: &Arc<Agent>,
    link: &mut Link<ClientTls>,
    up: &mut mpsc::UnboundedReceiver<Up>,
) -> Outcome {
    let last_seq = agent.store.read(|s| s.last_seq()).await.unwrap_or(0);
    let mut s = Session {
        agent,
        up,
        outbox: Box::pin(agent.outbox.clone().notified_owned()),
        requests: Box::pin(agent.requests.clone().notified_owned()),
        inflight: HashSet::new(),
        asked: HashSet::new(),
        store_failed: false,
        stored_any: false,
        last_seq,
        acked: last_seq,
        unacked: None,
        traffic: true,
        outbox_retry: None,
        outbox_draining: false,
        requests_draining: false,
        requests_retry: None,
    };
    let mut jobs = Jobs::new();
    let end = match s.start(link).await {
        Err(e) => e.into(),
        Ok(()) => {
            let k = agent.cfg.keepalive;
            let ka = Keepalive {
                ping_after: k,
                dead_after: k * DEAD_AFTER,
                clock: Clock::Boottime,
            };
            session::run(link, &mut s, &mut jobs, ka, &agent.shutdown).await
        }
    };
    // What was committed is signalled even though the link is gone: its
    // signal is in the store, and the emitter only needs waking.
    while jobs.next().await.is_some() {}
    agent.signals.notify_one();
    Outcome {
        end,
        store_failed: s.store_failed,
        stored_any: s.stored_any,
    }
}

impl Session<'_> {
    /// Sends what waits: the outbox, then the requests.
    async fn start(&mut self, link: &mut Link<ClientTls>) -> Result<(), LinkError> {
        send_outbox(self.agent, link, &mut self.inflight).await?;
        send_requests(self.agent, link, &mut self.asked).await
    }

    /// After "too fast": once the retry time passed and everything sent
    /// before is answered, sends again, in order.
    async fn resume(&mut self, link: &mut Link<ClientTls>) -> Result<(), LinkError> {
        if self.outbox_draining && self.outbox_retry.is_none() && self.inflight.is_empty() {
            self.outbox_draining = false;
            send_outbox(self.agent, link, &mut self.inflight).await?;
        }
        if self.requests_draining && self.requests_retry.is_none() && self.asked.is_empty() {
            self.requests_draining = false;
            send_requests(self.agent, link, &mut self.asked).await?;
        }
        Ok(())
    }
}

impl Handler<ClientTls> for Session<'_> {
    type In = HomeFrame;
    type Done = Done;
    type Wake = Wake;

    fn poll_wake(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Wake> {
        use std::task::Poll;
        if let Some(t) = &mut self.outbox_retry
            && t.as_mut().poll(cx).is_ready()
        {
            self.outbox_retry = None;
            return Poll::Ready(Wake::Outbox);
        }
        if let Some(t) = &mut self.requests_retry
            && t.as_mut().poll(cx).is_ready()
        {
            self.requests_retry = None;
            return Poll::Ready(Wake::Requests);
        }
        if self.outbox.as_mut().poll(cx).is_ready() {
            self.outbox.set(self.agent.outbox.clone().notified_owned());
            return Poll::Ready(Wake::Outbox);
        }
        if self.requests.as_mut().poll(cx).is_ready() {
            self.requests
                .set(self.agent.requests.clone().notified_owned());
            return Poll::Ready(Wake::Requests);
        }
        match self.up.poll_recv(cx) {
            Poll::Ready(Some(u)) => Poll::Ready(Wake::Up(u)),
            // The agent holds the sender for as long as it runs.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    async fn frame(
        &mut self,
        link: &mut Link<ClientTls>,
        f: HomeFrame,
        jobs: &mut Jobs<Done>,
    ) -> Result<(), End> {
        let _ = link;
        match f {
            HomeFrame::Bye { reconnect_after_ms } => {
                let why = if self.store_failed {
                    "the home could not store what it was sent"
                } else {
                    "home is restarting"
                };
                return Err(End::Bye(why, Duration::from_millis(reconnect_after_ms)));
            }
            HomeFrame::Contacts { contacts } => self.agent.on_contacts(contacts).await,
            HomeFrame::Presence {
                handle,
                state,
                text,
                since,
            } => self.agent.on_presence(&handle, state, &text, since).await,
            f => on_frame(self.agent, f, self.last_seq, self, jobs),
        }
        self.resume(link).await?;
        Ok(())
    }

    async fn done(
        &mut self,
        link: &mut Link<ClientTls>,
        d: Done,
        _: &mut Jobs<Done>,
    ) -> Result<(), End> {
        match d {
            Done::Event(seq, Ok(signalled)) => {
                if signalled {
                    self.agent.signals.notify_one();
                }
                self.last_seq = self.last_seq.max(seq);
                // Acks are cumulative: one for a burst (sent once nothing
                // else is ready), or every 256 events in a long one.
                if seq >= self.acked + 256 {
                    self.acked = seq;
                    self.unacked = None;
                    link.send(&AgentFrame::Ack { seq }).await?;
                } else {
                    self.unacked = Some(seq);
                }
                Ok(())
            }
            Done::Status(Ok(signalled)) => {
                if signalled {
                    self.agent.signals.notify_one();
                }
                Ok(())
            }
            Done::Event(_, Err(e)) | Done::Status(Err(e)) => {
                // Not acked: the home sends it again after reconnect.
                tracing::error!("storage: {e}");
                Err(End::Store(e.to_string()))
            }
        }
    }

    async fn wake(
        &mut self,
        link: &mut Link<ClientTls>,
        w: Wake,
        _: &mut Jobs<Done>,
    ) -> Result<(), End> {
        match w {
            // While the home says "too fast", new messages wait with the
            // rest for the retry.
            Wake::Outbox if self.outbox_retry.is_some() => {}
            Wake::Requests if self.requests_retry.is_some() => {}
            Wake::Outbox if self.outbox_draining => self.resume(link).await?,
            Wake::Requests if self.requests_draining => self.resume(link).await?,
            Wake::Outbox => send_outbox(self.agent, link, &mut self.inflight).await?,
            Wake::Requests => send_requests(self.agent, link, &mut self.asked).await?,
            Wake::Up(Up::Presence(p)) => {
                link.send(&AgentFrame::SetPresence {
                    state: p.state,
                    text: p.text,
                })
                .await?
            }
        }
        Ok(())
    }

    fn bad_frame(&self, why: &str) -> Option<String> {
        tracing::warn!("malformed frame from home: {why}");
        None
    }

    fn idle_due(&self) -> bool {
        self.unacked.is_some()
    }

    async fn idle(&mut self, link: &mut Link<ClientTls>) -> Result<(), End> {
        if let Some(seq) = self.unacked.take() {
            self.acked = seq;
            link.feed(&AgentFrame::Ack { seq }).await?;
        }
        Ok(())
    }

    fn turned(&mut self, quiet: bool) {
        if !quiet {
            self.traffic = true;
        } else if std::mem::take(&mut self.traffic) {
            match memory::release_code_pages() {
                Ok(n) => tracing::debug!("quiet: released {} KiB of mapped code", n / 1024),
                Err(e) => tracing::debug!("quiet: cannot read /proc/self/smaps: {e}"),
            }
        }
    }
}

fn on_frame(
    agent: &Arc<Agent>,
    f: HomeFrame,
    last_seq: u64,
    st: &mut Session<'_>,
    pending: &mut Jobs<Done>,
) {
    let store = &agent.store;
    match f {
        HomeFrame::Event { seq, event } if seq <= last_seq => {
            // Stored before a drop; ack again.
            let _ = event;
            pending.push_back(Box::pin(async move { Done::Event(seq, Ok(false)) }));
        }
        HomeFrame::Event { seq, event } => {
            // The event, its signal and the mailbox position in one commit.
            let p = store.submit(move |s| {
                let sig = match event {
                    Event::Message(m) => s.receive(&m)?.then_some(Signal::Received(m)),
                    Event::Status { id, state, reason } => {
                        let reason = reason.unwrap_or_default();
                        s.set_status(&id, state, &reason)?
                            .then_some(Signal::Status { id, state, reason })
                    }
                    Event::ContactRequest { from } => Some(Signal::ContactRequest(from)),
                };
                if let Some(sig) = &sig {
                    signals::queue(s, sig)?;
                }
                s.set_last_seq(seq)?;
                Ok(sig.is_some())
            });
            pending.push_back(Box::pin(async move { Done::Event(seq, p.await) }));
        }
        HomeFrame::Accepted { id } => {
            st.inflight.remove(&id);
            st.stored_any = true;
            pending.push_back(status(store, id, Delivery::Accepted, String::new()));
        }
        HomeFrame::Done { req } => {
            st.asked.remove(&req);
            st.stored_any = true;
            // Lazy: if a power cut undoes it, the home takes it again.
            store.submit_lazy(move |s| s.request_done(req));
        }
        HomeFrame::Error {
            code: ErrorCode::RateLimited,
            message,
            req: Some(req),
            retry_after_ms,
            ..
        } => {
            // Kept, and sent again (with the ones after it) when the home
            // said.
            st.asked.remove(&req);
            if st.requests_retry.is_none() {
                tracing::info!(req, "the home asks to slow down: {message}");
            }
            retry_in(&mut st.requests_retry, retry_after_ms);
            st.requests_draining = true;
        }
        HomeFrame::Error {
            code: ErrorCode::RateLimited,
            message,
            id: Some(id),
            retry_after_ms,
            ..
        } => {
            // Still queued, and sent again (with the ones after it) when
            // the home said; the first says why it waits.
            st.inflight.remove(&id);
            if st.outbox_retry.is_none() {
                tracing::info!(msg_id = %id, "the home asks to slow down: {message}");
                let p = store.submit(move |s| {
                    let changed = s.set_queued_reason(&id, &message)?;
                    if changed {
                        let sig = Signal::Status {
                            id,
                            state: Delivery::Queued,
                            reason: message,
                        };
                        signals::queue(s, &sig)?;
                    }
                    Ok(changed)
                });
                pending.push_back(Box::pin(async move { Done::Status(p.await) }));
            }
            retry_in(&mut st.outbox_retry, retry_after_ms);
            st.outbox_draining = true;
        }
        HomeFrame::Error {
            code,
            message,
            req: Some(req),
            ..
        } => {
            st.asked.remove(&req);
            if code == ErrorCode::Internal {
                // Kept: sent again on the next connection.
                st.store_failed = true;
                tracing::warn!(req, "the home could not store a request: {message}");
            } else {
                tracing::warn!(req, ?code, "the home refused a request: {message}");
                store.submit_lazy(move |s| s.request_done(req));
            }
        }
        HomeFrame::Error {
            code,
            message,
            id: Some(id),
            ..
        } => {
            st.inflight.remove(&id);
            if code == ErrorCode::Internal {
                // Still queued, sent again on the next connection (the home
                // ends this one); the person sees why it waits.
                st.store_failed = true;
                tracing::warn!(msg_id = %id, "the home could not store a message: {message}");
                let p = store.submit(move |s| {
                    let changed = s.set_queued_reason(&id, &message)?;
                    let sig = Signal::Status {
                        id,
                        state: Delivery::Queued,
                        reason: message,
                    };
                    if changed {
                        signals::queue(s, &sig)?;
                    }
                    Ok(changed)
                });
                pending.push_back(Box::pin(async move { Done::Status(p.await) }));
            } else {
                // Will never be taken: tell the person.
                tracing::warn!(msg_id = %id, ?code, "home refused a message: {message}");
                pending.push_back(status(store, id, Delivery::Failed, message));
            }
        }
        HomeFrame::Error { code, message, .. } => {
            tracing::warn!(?code, "home reports: {message}");
        }
        HomeFrame::Welcome { .. }
        | HomeFrame::Bye { .. }
        | HomeFrame::Contacts { .. }
        | HomeFrame::Presence { .. } => {}
    }
}

fn status(
    store: &popupd_store::Batcher<crate::storage::agent::AgentStore>,
    id: String,
    state: Delivery,
    reason: String,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>> {
    let p = store.submit(move |s| {
        let changed = s.set_status(&id, state, &reason)?;
        if changed {
            signals::queue(s, &Signal::Status { id, state, reason })?;
        }
        Ok(changed)
    });
    Box::pin(async move { Done::Status(p.await) })
}

/// Sends every queued message not already sent on this link.
async fn send_outbox(
    agent: &Agent,
    link: &mut Link<ClientTls>,
    inflight: &mut HashSet<String>,
) -> Result<(), LinkError> {
    let queued = agent
        .store
        .read(|s| s.outbox())
        .await
        .map_err(|e| LinkError::Io(std::io::Error::other(e)))?;
    let mut any = false;
    for m in queued {
        if !inflight.insert(m.id.clone()) {
            continue;
        }
        any = true;
        link.feed(&AgentFrame::Send {
            id: m.id,
            from: None,
            to: m.to,
            text: m.text,
            reply_to: m.reply_to,
        })
        .await?;
    }
    if any {
        link.flush().await?;
    }
    Ok(())
}

/// Sends every stored request not already sent on this link.
async fn send_requests(
    agent: &Agent,
    link: &mut Link<ClientTls>,
    asked: &mut HashSet<u64>,
) -> Result<(), LinkError> {
    let stored = agent
        .store
        .read(|s| s.requests())
        .await
        .map_err(|e| LinkError::Io(std::io::Error::other(e)))?;
    let mut any = false;
    for (req, json) in stored {
        if !asked.insert(req) {
            continue;
        }
        let frame = match serde_json::from_str::<Request>(&json) {
            Ok(Request::Read(id)) => AgentFrame::Read { id, req },
            Ok(Request::Contact { op, handle }) => AgentFrame::Contact { op, handle, req },
            Err(e) => {
                tracing::error!(req, "unreadable stored request dropped: {e}");
                agent.store.submit_lazy(move |s| s.request_done(req));
                continue;
            }
        };
        any = true;
        link.feed(&frame).await?;
    }
    if any {
        link.flush().await?;
    }
    Ok(())
}
