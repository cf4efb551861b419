//! `org.popupd.Agent1`: the D-Bus face of the agent. The contract (names,
//! signatures, docs) lives in the `popupd-ipc` crate; this is its server side.

use std::sync::Arc;

use popupd_ipc::{ContactEntry, HistoryEntry};

use popupd_protocol::ContactOp;
use zbus::object_server::SignalEmitter;

use super::{ActionError, Agent};

/// Errors returned to D-Bus callers.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.popupd.Agent1.Error")]
pub enum AgentError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// An argument is out of bounds.
    Invalid(String),
    /// No such message in history.
    UnknownMessage(String),
    /// Storage failed; see the agent's log.
    Failed(String),
}

impl From<ActionError> for AgentError {
    fn from(e: ActionError) -> Self {
        match e {
            ActionError::Invalid(m) => AgentError::Invalid(m),
            ActionError::UnknownMessage(m) => AgentError::UnknownMessage(m),
            ActionError::Store(e) => AgentError::Failed(e.to_string()),
        }
    }
}

/// The served object.
pub struct AgentIface {
    agent: Arc<Agent>,
}

impl AgentIface {
    pub fn new(agent: Arc<Agent>) -> Self {
        AgentIface { agent }
    }
}

#[zbus::interface(name = "org.popupd.Agent1")]
impl AgentIface {
    /// Queues a message; returns its id at once.
    async fn send(&self, to: String, text: String) -> Result<String, AgentError> {
        Ok(self.agent.send(&to, text, None).await?)
    }

    /// Answers a received message.
    async fn reply(&self, id: String, text: String) -> Result<String, AgentError> {
        Ok(self.agent.reply(&id, text).await?)
    }

    /// Marks a received message read; its sender is told.
    async fn mark_read(&self, id: String) -> Result<(), AgentError> {
        Ok(self.agent.mark_read(&id).await?)
    }

    /// One message of history.
    async fn message(&self, id: String) -> Result<HistoryEntry, AgentError> {
        let i = id.clone();
        match self.agent.store.read(move |s| s.get(&i)).await {
            Ok(Some(m)) => Ok(history_entry(m)),
            Ok(None) => Err(AgentError::UnknownMessage(format!(
                "no message {id} in history"
            ))),
            Err(e) => Err(AgentError::Failed(e.to_string())),
        }
    }

    /// Loaded plugins: (name, version, state, file).
    async fn plugins(&self) -> Vec<(String, String, String, String)> {
        self.agent.plugins.list()
    }

    /// Newest `limit` messages with `peer` ("" for all), oldest first.
    async fn history(&self, peer: String, limit: u32) -> Result<Vec<HistoryEntry>, AgentError> {
        let limit = limit.clamp(1, 10_000);
        self.agent
            .store
            .read(move |s| s.history(&peer, limit))
            .await
            .map(|v| v.into_iter().map(history_entry).collect())
            .map_err(|e| AgentError::Failed(e.to_string()))
    }

    /// The contact list, with presence: handle, relation, state, text, since.
    async fn contacts(&self) -> Vec<ContactEntry> {
        let c = self
            .agent
            .presence
            .contacts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.values()
            .map(|c| ContactEntry {
                handle: c.handle.clone(),
                relation: c.relation.as_str().into(),
                state: c.state.as_str().into(),
                text: c.text.clone(),
                since: c.since,
            })
            .collect()
    }

    /// Asks `handle` to become a contact.
    async fn add_contact(&self, handle: String) -> Result<(), AgentError> {
        Ok(self.agent.contact(ContactOp::Add, &handle).await?)
    }

    /// Removes `handle` from the contacts (both sides stop seeing presence).
    async fn remove_contact(&self, handle: String) -> Result<(), AgentError> {
        Ok(self.agent.contact(ContactOp::Remove, &handle).await?)
    }

    /// Accepts or declines `handle`'s contact request.
    async fn answer_contact_request(&self, handle: String, accept: bool) -> Result<(), AgentError> {
        let op = if accept {
            ContactOp::Accept
        } else {
            ContactOp::Decline
        };
        Ok(self.agent.contact(op, &handle).await?)
    }

    /// Blocks `handle`: no presence, no messages, no requests.
    async fn block(&self, handle: String) -> Result<(), AgentError> {
        Ok(self.agent.contact(ContactOp::Block, &handle).await?)
    }

    async fn unblock(&self, handle: String) -> Result<(), AgentError> {
        Ok(self.agent.contact(ContactOp::Unblock, &handle).await?)
    }

    /// Sets this person's presence by hand (`online` returns to automatic).
    async fn set_presence(&self, state: String, text: String) -> Result<(), AgentError> {
        Ok(self.agent.set_presence(&state, &text).await?)
    }

    /// (connected, home, since ms).
    async fn status(&self) -> (bool, String, i64) {
        let st = self
            .agent
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (st.connected, self.agent.cfg.home.name.clone(), st.since)
    }

    #[zbus(property)]
    async fn handle(&self) -> String {
        self.agent.cfg.handle.clone()
    }

    /// This device's presence: (state, text).
    #[zbus(property)]
    async fn presence(&self) -> (String, String) {
        let p = self.agent.own_presence();
        (p.state.as_str().into(), p.text)
    }

    #[zbus(property)]
    async fn connected(&self) -> bool {
        self.agent
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connected
    }

    #[zbus(signal)]
    pub async fn message_received(
        emitter: &SignalEmitter<'_>,
        id: &str,
        from: &str,
        text: &str,
        sent_at: i64,
        reply_to: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn message_status_changed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        status: &str,
        reason: &str,
    ) -> zbus::Result<()>;

    /// `PresenceChanged`: a contact's presence (the Rust name differs
    /// because the `Presence` property's notifier is `presence_changed`).
    #[zbus(signal, name = "PresenceChanged")]
    pub async fn contact_presence_changed(
        emitter: &SignalEmitter<'_>,
        handle: &str,
        state: &str,
        text: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn contact_request(emitter: &SignalEmitter<'_>, handle: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn contacts_changed(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn connection_changed(
        emitter: &SignalEmitter<'_>,
        connected: bool,
        home: &str,
    ) -> zbus::Result<()>;
}

fn history_entry(e: crate::storage::agent::Entry) -> HistoryEntry {
    HistoryEntry {
        id: e.id,
        direction: e.direction,
        from: e.from,
        to: e.to,
        text: e.text,
        sent_at: e.sent_at,
        status: e.status,
        reason: e.reason,
    }
}
