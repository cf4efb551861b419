//! `org.popupd.Agent1`: the D-Bus face of the agent. The contract (names,
//! signatures, docs) lives in the `popupd-ipc` crate; this is its server side.

use std::sync::Arc;

use popupd_ipc::HistoryEntry;
use zbus::object_server::SignalEmitter;

use super::{Agent, Up};
use crate::protocol::{MAX_TEXT, Message, new_id, now_ms, valid_handle};
use crate::storage::agent::IN;

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

impl From<crate::storage::StoreError> for AgentError {
    fn from(e: crate::storage::StoreError) -> Self {
        tracing::error!("storage: {e}");
        AgentError::Failed(e.to_string())
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

    async fn queue(
        &self,
        to: String,
        text: String,
        reply_to: Option<String>,
    ) -> Result<String, AgentError> {
        let to = to.trim().to_owned();
        if !valid_handle(&to) {
            return Err(AgentError::Invalid(format!(
                "{to:?} is not a handle (1-64 lowercase letters, digits, '.', '-' or '_')"
            )));
        }
        if text.trim().is_empty() {
            return Err(AgentError::Invalid("the text is empty".into()));
        }
        if text.len() > MAX_TEXT {
            return Err(AgentError::Invalid(format!(
                "the text is {} bytes; the limit is {MAX_TEXT}",
                text.len()
            )));
        }
        let msg = Message {
            id: new_id(),
            from: self.agent.cfg.handle.clone(),
            to,
            text,
            sent_at: now_ms(),
            reply_to,
        };
        let id = msg.id.clone();
        self.agent.store.run(move |s| s.queue(&msg)).await?;
        self.agent.outbox.notify_one();
        Ok(id)
    }
}

#[zbus::interface(name = "org.popupd.Agent1")]
impl AgentIface {
    /// Queues a message; returns its id at once.
    async fn send(&self, to: String, text: String) -> Result<String, AgentError> {
        self.queue(to, text, None).await
    }

    /// Answers a received message.
    async fn reply(&self, id: String, text: String) -> Result<String, AgentError> {
        let i = id.clone();
        let orig = self.agent.store.run(move |s| s.get(&i)).await?;
        match orig {
            Some(m) if m.direction == IN => self.queue(m.from, text, Some(id)).await,
            Some(_) => Err(AgentError::Invalid(format!(
                "{id} is a message you sent; reply to one you received"
            ))),
            None => Err(AgentError::UnknownMessage(format!(
                "no message {id} in history"
            ))),
        }
    }

    /// Marks a received message read; its sender is told.
    async fn mark_read(&self, id: String) -> Result<(), AgentError> {
        let i = id.clone();
        let entry = self.agent.store.run(move |s| s.get(&i)).await?;
        match entry {
            Some(m) if m.direction == IN => {
                let i = id.clone();
                if self.agent.store.run(move |s| s.mark_read(&i)).await? {
                    let _ = self.agent.up.send(Up::Read(id));
                }
                Ok(())
            }
            Some(_) => Err(AgentError::Invalid(format!("{id} is a message you sent"))),
            None => Err(AgentError::UnknownMessage(format!(
                "no message {id} in history"
            ))),
        }
    }

    /// Newest `limit` messages with `peer` ("" for all), oldest first.
    async fn history(&self, peer: String, limit: u32) -> Result<Vec<HistoryEntry>, AgentError> {
        let limit = limit.clamp(1, 10_000);
        Ok(self
            .agent
            .store
            .run(move |s| s.history(&peer, limit))
            .await?)
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

    #[zbus(signal)]
    pub async fn connection_changed(
        emitter: &SignalEmitter<'_>,
        connected: bool,
        home: &str,
    ) -> zbus::Result<()>;
}
