//! What the agent tells the desktop about messages: `MessageReceived`,
//! `MessageStatusChanged` and `ContactRequest` on D-Bus, and the same
//! events to the plugins (the popup is one).
//!
//! A signal is written to the store in the same transaction as the event
//! that causes it, and emitted from there by one task, in the order of the
//! store. Once it is out on D-Bus, and once every plugin has handled it,
//! the store says so; at start the agent emits what the last run did not.
//! So a crash between storing a message and showing it loses nothing.
//!
//! **Architecture Invariant:** each stored signal is emitted on D-Bus and
//! handed to the plugins once. The one exception is a crash in the instant
//! between emitting a signal and storing that it went out (the next signal
//! waits for that mark): that signal is emitted once more at start, so a
//! crash repeats at most one D-Bus signal, and at most the event each
//! plugin was handling.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Agent;
use super::dbus::AgentIface;
use super::plugins::Event as PluginEvent;
use crate::storage::agent::AgentStore;
use popupd_protocol::{Delivery, Message};
use popupd_store::StoreError;

/// Signals read from the store at a time.
const PAGE: usize = 256;

/// A durable signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// A new message (signalled once per id).
    Received(Message),
    /// A sent message's status changed (or, still queued, its reason).
    Status {
        id: String,
        state: Delivery,
        reason: String,
    },
    /// Someone asks to become a contact.
    ContactRequest(String),
}

/// Stores `sig` to be emitted, inside the caller's store job. The caller
/// wakes the emitter ([`Agent::signals`]) once the job committed.
pub fn queue(s: &mut AgentStore, sig: &Signal) -> Result<(), StoreError> {
    let json = serde_json::to_string(sig).map_err(|e| StoreError::Db(e.to_string()))?;
    s.queue_signal(&json)?;
    Ok(())
}

/// Emits every stored signal, in order, until the agent stops: first what
/// an earlier run left, then each new one as the store wakes it.
pub async fn run(agent: Arc<Agent>) {
    // Signals up to here were read (and emitted, or handed to plugins
    // that have not finished with them) by this run.
    let mut cursor = 0u64;
    loop {
        let wake = agent.signals.notified();
        tokio::pin!(wake);
        // Registered before the read: a wake during it is not lost.
        wake.as_mut().enable();
        let after = cursor;
        let page = match agent
            .store
            .read(move |s| s.signals_after(after, PAGE))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("reading signals to emit: {e}");
                if crate::task::sleep_or_shutdown(
                    std::time::Duration::from_secs(1),
                    &agent.shutdown,
                )
                .await
                {
                    return;
                }
                continue;
            }
        };
        let full = page.len() == PAGE;
        for (n, json, bus_done, plugins_done) in page {
            cursor = n;
            let sig: Signal = match serde_json::from_str(&json) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(n, "unreadable stored signal dropped: {e}");
                    let _ = agent
                        .store
                        .submit_lazy(move |s| s.signal_done(n, true, true))
                        .await;
                    continue;
                }
            };
            // Plugins first (the popup), then D-Bus.
            let mut plugins_now = plugins_done;
            if !plugins_done {
                let store = agent.store.clone();
                let handed = agent
                    .plugins
                    .dispatch_tracked(&plugin_event(&sig), move || {
                        store.submit_lazy(move |s| s.signal_done(n, false, true));
                    });
                // No plugin took it: done with them now, in the same mark.
                plugins_now = !handed;
            }
            if !bus_done {
                emit(&agent, &sig).await;
            }
            // Before the next signal goes out, so a crash repeats one at most.
            if let Err(e) = agent
                .store
                .submit_lazy(move |s| s.signal_done(n, true, plugins_now))
                .await
            {
                tracing::error!(n, "storing that a signal went out: {e}");
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            _ = agent.shutdown.cancelled() => return,
            _ = wake => {}
        }
    }
}

fn plugin_event(sig: &Signal) -> PluginEvent {
    match sig.clone() {
        Signal::Received(m) => PluginEvent::MessageReceived {
            id: m.id,
            from: m.from,
            text: m.text,
            sent_at: m.sent_at,
            reply_to: m.reply_to,
            priority: "normal".into(),
        },
        Signal::Status { id, state, reason } => PluginEvent::MessageStatusChanged {
            id,
            status: state.as_str().into(),
            reason,
        },
        Signal::ContactRequest(from) => PluginEvent::ContactRequest { from },
    }
}

/// Emits one signal on D-Bus.
async fn emit(agent: &Agent, sig: &Signal) {
    let Some(i) = agent.iface() else {
        return;
    };
    let em = i.signal_emitter();
    let r = match sig {
        Signal::Received(m) => {
            tracing::info!(msg_id = %m.id, from = %m.from, "message received");
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
        Signal::Status { id, state, reason } => {
            tracing::debug!(msg_id = %id, status = state.as_str(), %reason, "status changed");
            AgentIface::message_status_changed(em, id, state.as_str(), reason).await
        }
        Signal::ContactRequest(from) => {
            tracing::info!(%from, "contact request");
            AgentIface::contact_request(em, from).await
        }
    };
    if let Err(e) = r {
        tracing::warn!("emitting a D-Bus signal: {e}");
    }
}
