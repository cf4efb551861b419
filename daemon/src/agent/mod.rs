//! The desktop agent: keeps the back connection to its home, serves
//! `org.popupd.Agent1` on the session bus, keeps local history.
//!
//! - [`link`]: the back connection (dial, resume, keepalive, reconnect).
//! - [`dbus`]: the D-Bus interface; each method only stores and wakes the
//!   link, so a slow network never blocks a D-Bus caller.
//! - [`presence`]: this device's presence (by hand, or away when idle, from
//!   [`idle`]) and the contact list with their presence.
//! - [`plugins`]: the plugin host.
//! - [`signals`]: D-Bus signals and plugin events, emitted from the store.
//! - [`memory`]: gives back the pages of code an idle agent no longer runs.
//!
//! **Architecture Invariant:** a received message is acked to the home only
//! after it is committed to local history, together with its signal, and
//! signalled only the first time it is stored, so a crash or a redelivery
//! never loses or doubles a popup (see [`signals`] for the one instant a
//! crash repeats one).
//!
//! **Architecture Invariant:** what the person does goes to the store
//! before the D-Bus call returns, and stays there until the home confirms
//! it: messages in the outbox (`accepted`), read marks and contact changes
//! in `requests` (`done`). Presence is a state, not a change: the next
//! `hello` carries it.

pub mod dbus;
pub mod idle;
pub mod link;
pub mod memory;
pub mod plugins;
pub mod presence;
pub mod signals;

use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context as _;
use tokio::sync::{Notify, mpsc};
use zbus::object_server::InterfaceRef;

use serde::{Deserialize, Serialize};

use crate::config::{AgentConfig, Bus};
use crate::storage::agent::{AgentStore, IN};
use crate::task::Shutdown;
use popupd_protocol::{ContactOp, MAX_TEXT, Message, new_id, now_ms, valid_handle};
use popupd_store::{Batcher, StoreError};

/// State of the back connection, as `Status()` reports it.
#[derive(Debug, Clone, Default)]
pub struct LinkState {
    pub connected: bool,
    /// When it last went up or down, ms since the epoch.
    pub since: i64,
}

/// Work for the link that is neither in the outbox nor a request.
#[derive(Debug)]
pub enum Up {
    /// This device's presence changed.
    Presence(popupd_protocol::PresenceReport),
}

/// A change the home must confirm, kept in the store until it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// The person read the received message `id`.
    Read(String),
    /// Change the contact list.
    Contact { op: ContactOp, handle: String },
}

impl Request {
    fn json(&self) -> Result<String, StoreError> {
        serde_json::to_string(self).map_err(|e| StoreError::Db(e.to_string()))
    }
}

/// Shared state of one running agent.
pub struct Agent {
    pub cfg: AgentConfig,
    pub store: Batcher<AgentStore>,
    pub link: Mutex<LinkState>,
    /// Wakes the link when the outbox grew.
    pub outbox: Arc<Notify>,
    /// Wakes the link when a request was stored.
    pub requests: Arc<Notify>,
    /// Wakes the signal emitter when a signal was stored.
    pub signals: Notify,
    pub up: mpsc::UnboundedSender<Up>,
    iface: OnceLock<InterfaceRef<dbus::AgentIface>>,
    /// Loaded plugins, and the events they get.
    pub plugins: plugins::Plugins,
    /// Own presence and the contacts' presence.
    pub presence: presence::Presence,
    pub shutdown: Shutdown,
}

/// Why an action (send, reply, mark read) was refused.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    UnknownMessage(String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
}

impl Agent {
    /// The D-Bus interface, for emitting signals.
    pub fn iface(&self) -> Option<&InterfaceRef<dbus::AgentIface>> {
        self.iface.get()
    }

    /// Queues a message in the outbox and wakes the link; returns its id.
    pub async fn send(
        &self,
        to: &str,
        text: String,
        reply_to: Option<String>,
    ) -> Result<String, ActionError> {
        let to = to.trim().to_owned();
        if !valid_handle(&to) {
            return Err(ActionError::Invalid(format!(
                "{to:?} is not a handle (1-64 lowercase letters, digits, '.', '-' or '_')"
            )));
        }
        if text.trim().is_empty() {
            return Err(ActionError::Invalid("the text is empty".into()));
        }
        if text.len() > MAX_TEXT {
            return Err(ActionError::Invalid(format!(
                "the text is {} bytes; the limit is {MAX_TEXT}",
                text.len()
            )));
        }
        let msg = Message {
            id: new_id(),
            from: self.cfg.handle.clone(),
            to,
            text,
            sent_at: now_ms(),
            reply_to,
        };
        let (id, to, text) = (msg.id.clone(), msg.to.clone(), msg.text.clone());
        self.store.run(move |s| s.queue(&msg)).await?;
        self.outbox.notify_one();
        self.plugins.dispatch(&plugins::Event::MessageSent {
            id: id.clone(),
            to,
            text,
        });
        Ok(id)
    }

    /// Answers the received message `id`.
    pub async fn reply(&self, id: &str, text: String) -> Result<String, ActionError> {
        let i = id.to_owned();
        match self.store.read(move |s| s.get(&i)).await? {
            Some(m) if m.direction == IN => self.send(&m.from, text, Some(id.to_owned())).await,
            Some(_) => Err(ActionError::Invalid(format!(
                "{id} is a message you sent; reply to one you received"
            ))),
            None => Err(ActionError::UnknownMessage(format!(
                "no message {id} in history"
            ))),
        }
    }

    /// Marks the received message `id` read; its sender is told.
    pub async fn mark_read(&self, id: &str) -> Result<(), ActionError> {
        let i = id.to_owned();
        match self.store.read(move |s| s.get(&i)).await? {
            Some(m) if m.direction == IN => {
                let req = Request::Read(id.to_owned()).json()?;
                let i = id.to_owned();
                let queued = self
                    .store
                    .run(move |s| {
                        let new = s.mark_read(&i)?;
                        if new {
                            s.request(&req)?;
                        }
                        Ok(new)
                    })
                    .await?;
                if queued {
                    self.requests.notify_one();
                }
                Ok(())
            }
            Some(_) => Err(ActionError::Invalid(format!("{id} is a message you sent"))),
            None => Err(ActionError::UnknownMessage(format!(
                "no message {id} in history"
            ))),
        }
    }
}

/// Runs an agent until `shutdown`. Calls `ready` once it owns its bus name;
/// a config sent on `reload` goes to the plugins.
pub async fn run(
    cfg: AgentConfig,
    shutdown: Shutdown,
    ready: impl FnOnce(),
    mut reload: tokio::sync::watch::Receiver<AgentConfig>,
) -> anyhow::Result<()> {
    let path = cfg.data_dir.join(format!("{}.sqlite", cfg.handle));
    let store = AgentStore::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let (up, up_rx) = mpsc::unbounded_channel();
    let agent = Arc::new(Agent {
        store: Batcher::spawn(&cfg.handle, store)?,
        link: Mutex::new(LinkState::default()),
        outbox: Arc::default(),
        requests: Arc::default(),
        signals: Notify::new(),
        up,
        iface: OnceLock::new(),
        plugins: plugins::Plugins::default(),
        presence: presence::Presence::default(),
        shutdown: shutdown.clone(),
        cfg,
    });
    agent.load_presence().await;
    agent.plugins.load(&agent);
    let own = agent.own_presence();
    agent.plugins.dispatch(&plugins::Event::PresenceSet {
        state: own.state.as_str().into(),
        text: own.text,
    });
    let builder = match &agent.cfg.bus {
        Bus::Session => zbus::connection::Builder::session(),
        Bus::Address(a) => zbus::connection::Builder::address(a.as_str()),
    };
    let conn = builder
        .name(popupd_ipc::BUS_NAME)
        .serve_at(popupd_ipc::OBJECT_PATH, dbus::AgentIface::new(agent.clone()))
        .build()
        .await
        .map_err(|e| match e {
            zbus::Error::NameTaken => anyhow::anyhow!(
                "another agent already owns {} on this bus; stop that agent first",
                popupd_ipc::BUS_NAME
            ),
            e => anyhow::anyhow!(
                "cannot serve on D-Bus ({}): {e}; is a session bus running? (DBUS_SESSION_BUS_ADDRESS)",
                match &agent.cfg.bus { Bus::Session => "session bus".to_string(), Bus::Address(a) => a.clone() }
            ),
        })?;
    let iface = conn
        .object_server()
        .interface::<_, dbus::AgentIface>(popupd_ipc::OBJECT_PATH)
        .await?;
    let _ = agent.iface.set(iface);
    tracing::info!(handle = %agent.cfg.handle, home = %agent.cfg.home.name, "agent of {} (home {}) serving {}", agent.cfg.handle, agent.cfg.home.name, popupd_ipc::BUS_NAME);
    ready();
    let reloads = {
        let agent = agent.clone();
        async move {
            while reload.changed().await.is_ok() {
                let new = reload.borrow_and_update().clone();
                agent.plugins.reload(&new.plugins);
            }
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        _ = link::run(agent.clone(), up_rx) => {}
        _ = signals::run(agent.clone()) => {}
        _ = reloads => {}
        _ = async {
            presence::auto_away(agent.clone(), conn.clone()).await;
            std::future::pending::<()>().await
        } => {}
    }
    agent.plugins.stop();
    drop(conn);
    Ok(())
}
