//! The back connection: the agent dials its home (through a proxy if one is
//! set), authenticates with its device credential, and keeps the link open
//! with pings. When it drops, the agent dials again with capped, jittered
//! backoff and resumes: the outbox is sent again (the home drops ids it
//! already has) and the home replays every event not yet acked.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::mpsc;

use super::dbus::AgentIface;
use super::{Agent, Up, memory};
use crate::net::{self, ClientTls, Dial, Link, LinkError, Recv, tls};
use crate::protocol::{
    AGENT_PATH, AgentFrame, Delivery, ErrorCode, Event, HomeFrame, Message, PROTOCOL_VERSION,
    now_ms,
};
use crate::storage::StoreError;
use crate::task::{Backoff, Ticker, sleep_or_shutdown};

/// A link silent for this many keepalive intervals is dead.
const DEAD_AFTER: u32 = 3;

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
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        let delay = match connect(&agent, &dial).await {
            Ok(mut link) => {
                backoff.reset();
                set_connected(&agent, true).await;
                let (why, later) = session(&agent, &mut link, &mut up).await;
                set_connected(&agent, false).await;
                tracing::warn!(home = %dial.name, "back connection closed: {why}");
                link.close().await;
                later.unwrap_or_else(|| backoff.next_delay())
            }
            Err(e) => {
                tracing::warn!(home = %dial.name, address = %dial.address,
                    via = ?dial.proxy.as_ref().map(|p| &p.address), "cannot connect: {e}");
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
            tracing::info!(home = %dial.name, "back connection up");
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

enum Done {
    /// An event is stored: signal what is new, then ack `seq`.
    Event(u64, Result<Option<Signal>, StoreError>),
    /// Bookkeeping that is not an event.
    Status(Result<Option<Signal>, StoreError>),
}
type Pending = Pin<Box<dyn Future<Output = Done> + Send>>;

enum Signal {
    Received(Message),
    Status(String, Delivery, String),
    ContactRequest(String),
}

/// Serves one connected link. Returns why it ended and, if the home said
/// so, when to come back.
async fn session(
    agent: &Arc<Agent>,
    link: &mut Link<ClientTls>,
    up: &mut mpsc::UnboundedReceiver<Up>,
) -> (String, Option<Duration>) {
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let ended = session_loop(agent, link, up, &mut pending).await;
    // What was committed is signalled even though the link is gone: the
    // home redelivers it (it was not acked) and the store then says "not
    // new", so this is the only chance to show it.
    while let Some(d) = pending.next().await {
        if let Done::Event(_, Ok(sig)) | Done::Status(Ok(sig)) = d {
            emit(agent, sig).await;
        }
    }
    ended
}

async fn session_loop(
    agent: &Arc<Agent>,
    link: &mut Link<ClientTls>,
    up: &mut mpsc::UnboundedReceiver<Up>,
    pending: &mut FuturesOrdered<Pending>,
) -> (String, Option<Duration>) {
    let mut inflight: HashSet<String> = HashSet::new();
    let keepalive = agent.cfg.keepalive;
    let mut ping = match Ticker::new(keepalive) {
        Ok(t) => t,
        Err(e) => return (format!("cannot start the keepalive timer: {e}"), None),
    };
    let mut last_heard = Instant::now();
    let mut last_seq = agent.store.run(|s| s.last_seq()).await.unwrap_or(0);
    let mut unacked: Option<u64> = None;
    let mut acked = last_seq;

    if let Err(e) = send_outbox(agent, link, &mut inflight).await {
        return (e.to_string(), None);
    }
    if let Err(e) = send_reads(agent, link).await {
        return (e.to_string(), None);
    }
    // Whether anything but keepalives went by since the agent last gave
    // back its idle code pages (agent::memory); start-up counts.
    let mut traffic = true;
    loop {
        // Set by the two keepalive arms: a ping or pong heard, or our own
        // ping due. Either means the link was quiet for a whole period.
        let mut quiet = false;
        let step: Result<(), LinkError> = tokio::select! {
            biased;
            _ = agent.shutdown.cancelled() => return ("agent stopping".into(), None),
            _ = agent.outbox.notified() => send_outbox(agent, link, &mut inflight).await,
            Some(u) = up.recv() => match u {
                Up::Read(id) => {
                    let r = link.send(&AgentFrame::Read { id: id.clone() }).await;
                    if r.is_ok() {
                        let _ = agent.store.run(move |s| s.reads_sent(&[id])).await;
                    }
                    r
                }
                Up::Presence(p) => link.send(&AgentFrame::SetPresence { state: p.state, text: p.text }).await,
                Up::Contact(op, handle) => link.send(&AgentFrame::Contact { op, handle }).await,
            },
            Some(d) = pending.next(), if !pending.is_empty() => match d {
                Done::Event(seq, Ok(sig)) => {
                    emit(agent, sig).await;
                    last_seq = last_seq.max(seq);
                    // Acks are cumulative: one for a burst (sent below,
                    // once nothing else is ready), or every 256 events in a
                    // long one.
                    if seq >= acked + 256 {
                        acked = seq;
                        unacked = None;
                        link.send(&AgentFrame::Ack { seq }).await
                    } else {
                        unacked = Some(seq);
                        Ok(())
                    }
                }
                Done::Status(Ok(sig)) => { emit(agent, sig).await; Ok(()) }
                Done::Event(_, Err(e)) | Done::Status(Err(e)) => {
                    // Not acked: the home sends it again after reconnect.
                    tracing::error!("storage: {e}");
                    return (format!("storage failure: {e}"), None);
                }
            },
            r = link.recv::<HomeFrame>() => {
                last_heard = Instant::now();
                // The keepalive pings a quiet link only: the home pings
                // its agents itself (docs/protocol.md, keepalive), so an
                // idle agent wakes once per period, to answer.
                if let Err(e) = ping.reset() {
                    return (format!("keepalive timer failed: {e}"), None);
                }
                match r {
                    Ok(Recv::Frame(HomeFrame::Bye { reconnect_after_ms })) => {
                        return ("home is restarting".into(), Some(Duration::from_millis(reconnect_after_ms)));
                    }
                    Ok(Recv::Frame(HomeFrame::Contacts { contacts })) => {
                        agent.on_contacts(contacts).await;
                        Ok(())
                    }
                    Ok(Recv::Frame(HomeFrame::Presence { handle, state, text, since })) => {
                        agent.on_presence(&handle, state, &text, since).await;
                        Ok(())
                    }
                    Ok(Recv::Frame(f)) => {
                        on_frame(agent, f, last_seq, &mut inflight, pending);
                        Ok(())
                    }
                    Ok(Recv::Bad(e)) => { tracing::warn!("malformed frame from home: {e}"); Ok(()) }
                    Ok(Recv::Alive) => { quiet = true; Ok(()) }
                    Ok(Recv::Closed) => return ("closed by home".into(), None),
                    Err(e) => Err(e),
                }
            }
            t = ping.tick() => {
                quiet = true;
                if let Err(e) = t {
                    return (format!("keepalive timer failed: {e}"), None);
                }
                if last_heard.elapsed() > keepalive * DEAD_AFTER {
                    return (format!("no answer for {}; link is dead",
                        humantime::format_duration(keepalive * DEAD_AFTER)), None);
                }
                link.ping().await
            }
            // Last, so it runs only when nothing above is ready.
            _ = std::future::ready(()), if unacked.is_some() => {
                let seq = unacked.take().unwrap_or_default();
                acked = seq;
                link.send(&AgentFrame::Ack { seq }).await
            }
        };
        if let Err(e) = step {
            return (e.to_string(), None);
        }
        if !quiet {
            traffic = true;
        } else if std::mem::take(&mut traffic) {
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
    inflight: &mut HashSet<String>,
    pending: &mut FuturesOrdered<Pending>,
) {
    let store = &agent.store;
    match f {
        HomeFrame::Event { seq, event } if seq <= last_seq => {
            // Stored before a drop; ack again.
            let _ = event;
            pending.push_back(Box::pin(async move { Done::Event(seq, Ok(None)) }));
        }
        HomeFrame::Event {
            seq,
            event: Event::Message(m),
        } => {
            let p = store.submit(move |s| {
                let new = s.receive(&m)?;
                s.set_last_seq(seq)?;
                Ok(new.then_some(Signal::Received(m)))
            });
            pending.push_back(Box::pin(async move { Done::Event(seq, p.await) }));
        }
        HomeFrame::Event {
            seq,
            event: Event::Status { id, state, reason },
        } => {
            let p = store.submit(move |s| {
                let reason = reason.unwrap_or_default();
                let changed = s.set_status(&id, state, &reason)?;
                s.set_last_seq(seq)?;
                Ok(changed.then_some(Signal::Status(id, state, reason)))
            });
            pending.push_back(Box::pin(async move { Done::Event(seq, p.await) }));
        }
        HomeFrame::Event {
            seq,
            event: Event::ContactRequest { from },
        } => {
            let p = store.submit(move |s| {
                s.set_last_seq(seq)?;
                Ok(Some(Signal::ContactRequest(from)))
            });
            pending.push_back(Box::pin(async move { Done::Event(seq, p.await) }));
        }
        HomeFrame::Accepted { id } => {
            inflight.remove(&id);
            pending.push_back(status(store, id, Delivery::Accepted, String::new()));
        }
        HomeFrame::Error {
            code,
            message,
            id: Some(id),
        } => {
            inflight.remove(&id);
            tracing::warn!(msg_id = %id, ?code, "home refused a message: {message}");
            if code != ErrorCode::Internal {
                // Will never be taken: tell the person. (Internal errors are
                // retried with the outbox on the next connection.)
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
    store: &crate::storage::Batcher<crate::storage::agent::AgentStore>,
    id: String,
    state: Delivery,
    reason: String,
) -> Pending {
    let p = store.submit(move |s| {
        let changed = s.set_status(&id, state, &reason)?;
        Ok(changed.then_some(Signal::Status(id, state, reason)))
    });
    Box::pin(async move { Done::Status(p.await) })
}

async fn emit(agent: &Agent, sig: Option<Signal>) {
    let (Some(sig), Some(i)) = (sig, agent.iface()) else {
        return;
    };
    let em = i.signal_emitter();
    let r = match sig {
        Signal::Received(m) => {
            tracing::info!(msg_id = %m.id, from = %m.from, "message received");
            agent
                .plugins
                .dispatch(&super::plugins::Event::MessageReceived {
                    id: m.id.clone(),
                    from: m.from.clone(),
                    text: m.text.clone(),
                    sent_at: m.sent_at,
                    reply_to: m.reply_to.clone(),
                    priority: "normal".into(),
                });
            AgentIface::message_received(
                em,
                &m.id,
                &m.from,
                &m.text,
                m.sent_at,
                m.reply_to.as_deref().unwrap_or(""),
            )
            .await
        }
        Signal::Status(id, state, reason) => {
            tracing::debug!(msg_id = %id, status = state.as_str(), "status changed");
            agent
                .plugins
                .dispatch(&super::plugins::Event::MessageStatusChanged {
                    id: id.clone(),
                    status: state.as_str().into(),
                    reason: reason.clone(),
                });
            AgentIface::message_status_changed(em, &id, state.as_str(), &reason).await
        }
        Signal::ContactRequest(from) => {
            tracing::info!(%from, "contact request");
            agent
                .plugins
                .dispatch(&super::plugins::Event::ContactRequest { from: from.clone() });
            AgentIface::contact_request(em, &from).await
        }
    };
    if let Err(e) = r {
        tracing::warn!("emitting a D-Bus signal: {e}");
    }
}

/// Sends every queued message not already sent on this link.
async fn send_outbox(
    agent: &Agent,
    link: &mut Link<ClientTls>,
    inflight: &mut HashSet<String>,
) -> Result<(), LinkError> {
    let queued = agent
        .store
        .run(|s| s.outbox())
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

/// Sends read receipts that did not reach the home yet.
async fn send_reads(agent: &Agent, link: &mut Link<ClientTls>) -> Result<(), LinkError> {
    let ids = agent
        .store
        .run(|s| s.unsent_reads())
        .await
        .map_err(|e| LinkError::Io(std::io::Error::other(e)))?;
    if ids.is_empty() {
        return Ok(());
    }
    for id in &ids {
        link.feed(&AgentFrame::Read { id: id.clone() }).await?;
    }
    link.flush().await?;
    let _ = agent.store.run(move |s| s.reads_sent(&ids)).await;
    Ok(())
}
