//! `org.popupd.Agent1`: the D-Bus face of the agent. The contract (names,
//! signatures, docs) lives in the `popupd-ipc` crate; this is its server side.

use std::sync::Arc;

use popupd_ipc::{ContactEntry, HistoryEntry, MessageEntry};

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

/// The history fields `(sssssxss)`, in order: id, direction (`in` or
/// `out`), from, to, text, sent_at (ms since the Unix epoch, set by the
/// sender's home), status (sent: `queued`, `accepted`, `delivered`, `read`
/// or `failed`; received: `received` or `read`), reason (why it failed or
/// still waits; "" otherwise).
#[zbus::interface(name = "org.popupd.Agent1")]
impl AgentIface {
    /// Send: queue a message to the handle `to`. Returns its id at once,
    /// before anything is sent; MessageStatusChanged signals follow.
    /// Errors: org.popupd.Agent1.Error.Invalid (bad handle, empty or too
    /// long text: 16384 bytes of UTF-8 at most).
    #[zbus(out_args("id"))]
    async fn send(&self, to: String, text: String) -> Result<String, AgentError> {
        Ok(self.agent.send(&to, text, None).await?)
    }

    /// Reply: answer the received message `id`, to its sender. Returns the
    /// reply's id. Errors: Invalid (a message you sent), UnknownMessage.
    #[zbus(out_args("id"))]
    async fn reply(&self, id: String, text: String) -> Result<String, AgentError> {
        Ok(self.agent.reply(&id, text).await?)
    }

    /// MarkRead: the person read the received message `id`; its sender
    /// sees `read`. Kept and sent again until the home confirms it.
    async fn mark_read(&self, id: String) -> Result<(), AgentError> {
        Ok(self.agent.mark_read(&id).await?)
    }

    /// Message: one message of history, as the fields of History.
    /// Errors: UnknownMessage.
    #[zbus(out_args("entry"))]
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

    /// Plugins: the loaded plugins, each (name, version, state, file);
    /// state is `starting`, `active`, `failed: why` or `disabled: why`.
    #[zbus(out_args("plugins"))]
    async fn plugins(&self) -> Vec<(String, String, String, String)> {
        self.agent.plugins.list()
    }

    /// History: the newest `limit` (1 to 10000) messages with the handle
    /// `peer` ("" for everyone), oldest first; each entry
    /// (id, direction, from, to, text, sent_at, status, reason).
    #[zbus(out_args("entries"))]
    async fn history(&self, peer: String, limit: u32) -> Result<Vec<HistoryEntry>, AgentError> {
        let limit = limit.clamp(1, 10_000);
        self.agent
            .store
            .read(move |s| s.history(&peer, limit))
            .await
            .map(|v| v.into_iter().map(history_entry).collect())
            .map_err(|e| AgentError::Failed(e.to_string()))
    }

    /// Messages: like History, each entry with a ninth field, reply_to:
    /// the id of the message it answers, or "". For clients that thread
    /// replies.
    #[zbus(out_args("entries"))]
    async fn messages(&self, peer: String, limit: u32) -> Result<Vec<MessageEntry>, AgentError> {
        let limit = limit.clamp(1, 10_000);
        self.agent
            .store
            .read(move |s| s.history(&peer, limit))
            .await
            .map(|v| v.into_iter().map(message_entry).collect())
            .map_err(|e| AgentError::Failed(e.to_string()))
    }

    /// Contacts: the contact list with presence, each (handle, relation,
    /// state, text, since). relation: `accepted`, `requested` (you asked),
    /// `pending` (they asked you) or `blocked`; state: `online`, `busy`,
    /// `away`, `offline`, or `unknown` (not accepted, or their home cannot
    /// be reached); since: when the state last changed (ms since the Unix
    /// epoch, 0: never).
    #[zbus(out_args("contacts"))]
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

    /// AddContact: ask `handle` to become a contact; they accept or
    /// decline. Kept and sent again until the home confirms it.
    async fn add_contact(&self, handle: String) -> Result<(), AgentError> {
        Ok(self.agent.contact(ContactOp::Add, &handle).await?)
    }

    /// RemoveContact: remove `handle` from the contacts (neither sees the
    /// other's presence any more).
    async fn remove_contact(&self, handle: String) -> Result<(), AgentError> {
        Ok(self.agent.contact(ContactOp::Remove, &handle).await?)
    }

    /// AnswerContactRequest: accept (`accept` true) or decline `handle`'s
    /// request. Errors: Invalid (no request from them).
    async fn answer_contact_request(&self, handle: String, accept: bool) -> Result<(), AgentError> {
        let op = if accept {
            ContactOp::Accept
        } else {
            ContactOp::Decline
        };
        Ok(self.agent.contact(op, &handle).await?)
    }

    /// Block: `handle` sees no presence of yours, and their messages and
    /// requests fail (as if you did not exist).
    async fn block(&self, handle: String) -> Result<(), AgentError> {
        Ok(self.agent.contact(ContactOp::Block, &handle).await?)
    }

    /// Unblock: undo Block.
    async fn unblock(&self, handle: String) -> Result<(), AgentError> {
        Ok(self.agent.contact(ContactOp::Unblock, &handle).await?)
    }

    /// SetPresence: this person's presence, by hand: `online` (automatic:
    /// away when the desktop is idle), `away`, `busy` or `offline` (appear
    /// offline), with a status text of at most 200 bytes.
    async fn set_presence(&self, state: String, text: String) -> Result<(), AgentError> {
        Ok(self.agent.set_presence(&state, &text).await?)
    }

    /// Status: the back connection: connected, the home's name, and since
    /// when (ms since the Unix epoch; 0: never).
    #[zbus(out_args("connected", "home", "since"))]
    async fn status(&self) -> (bool, String, i64) {
        let st = self
            .agent
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (st.connected, self.agent.cfg.home.name.clone(), st.since)
    }

    /// Handle: whose agent this is.
    #[zbus(property)]
    async fn handle(&self) -> String {
        self.agent.cfg.handle.clone()
    }

    /// Presence: this device's presence, (state, text). Emits
    /// PropertiesChanged.
    #[zbus(property)]
    async fn presence(&self) -> (String, String) {
        let p = self.agent.own_presence();
        (p.state.as_str().into(), p.text)
    }

    /// Connected: whether the back connection is up. Emits
    /// PropertiesChanged.
    #[zbus(property)]
    async fn connected(&self) -> bool {
        self.agent
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connected
    }

    /// MessageReceived: a new message, once per id (a crash in the instant
    /// after this signal may repeat it once at the next start; clients
    /// that must not show it twice keep the ids). sent_at: ms since the
    /// Unix epoch; reply_to: the id it answers, or "".
    #[zbus(signal)]
    pub async fn message_received(
        emitter: &SignalEmitter<'_>,
        id: &str,
        from: &str,
        text: &str,
        sent_at: i64,
        reply_to: &str,
    ) -> zbus::Result<()>;

    /// MessageStatusChanged: a message you sent moved on: `accepted`,
    /// `delivered`, `read` or `failed` (with the reason), or is still
    /// `queued` with a reason that says why it waits.
    #[zbus(signal)]
    pub async fn message_status_changed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        status: &str,
        reason: &str,
    ) -> zbus::Result<()>;

    /// PresenceChanged: a contact's presence changed; state is `unknown`
    /// while their home cannot be reached.
    #[zbus(signal, name = "PresenceChanged")]
    pub async fn contact_presence_changed(
        emitter: &SignalEmitter<'_>,
        handle: &str,
        state: &str,
        text: &str,
    ) -> zbus::Result<()>;

    /// ContactRequest: `handle` asks to become a contact; answer with
    /// AnswerContactRequest.
    #[zbus(signal)]
    pub async fn contact_request(emitter: &SignalEmitter<'_>, handle: &str) -> zbus::Result<()>;

    /// ContactsChanged: the list itself changed (someone added, removed,
    /// accepted); call Contacts.
    #[zbus(signal)]
    pub async fn contacts_changed(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;

    /// ConnectionChanged: the back connection to the home went up or down.
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

fn message_entry(e: crate::storage::agent::Entry) -> MessageEntry {
    MessageEntry {
        id: e.id,
        direction: e.direction,
        from: e.from,
        to: e.to,
        text: e.text,
        sent_at: e.sent_at,
        status: e.status,
        reason: e.reason,
        reply_to: e.reply_to.unwrap_or_default(),
    }
}
