//! The desktop agent: keeps the back connection to its home, serves
//! `org.popupd.Agent1` on the session bus, keeps local history.
//!
//! - [`link`]: the back connection (dial, resume, keepalive, reconnect).
//! - [`dbus`]: the D-Bus interface; each method only stores and wakes the
//!   link, so a slow network never blocks a D-Bus caller.
//!
//! **Architecture Invariant:** a received message is acked to the home only
//! after it is committed to local history, and signalled only the first
//! time it is stored, so a crash or a redelivery never loses or doubles a
//! popup.

pub mod dbus;
pub mod link;

use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context as _;
use tokio::sync::{Notify, mpsc};
use zbus::object_server::InterfaceRef;

use crate::config::{AgentConfig, Bus};
use crate::storage::Batcher;
use crate::storage::agent::AgentStore;
use crate::task::Shutdown;

/// State of the back connection, as `Status()` reports it.
#[derive(Debug, Clone, Default)]
pub struct LinkState {
    pub connected: bool,
    /// When it last went up or down, ms since the epoch.
    pub since: i64,
}

/// Work for the link that is not in the outbox.
#[derive(Debug)]
pub enum Up {
    /// Tell the home the person read message `id`.
    Read(String),
}

/// Shared state of one running agent.
pub struct Agent {
    pub cfg: AgentConfig,
    pub store: Batcher<AgentStore>,
    pub link: Mutex<LinkState>,
    /// Wakes the link when the outbox grew.
    pub outbox: Notify,
    pub up: mpsc::UnboundedSender<Up>,
    iface: OnceLock<InterfaceRef<dbus::AgentIface>>,
    pub shutdown: Shutdown,
}

impl Agent {
    /// The D-Bus interface, for emitting signals.
    pub fn iface(&self) -> Option<&InterfaceRef<dbus::AgentIface>> {
        self.iface.get()
    }
}

/// Runs an agent until `shutdown`. Calls `ready` once it owns its bus name.
pub async fn run(cfg: AgentConfig, shutdown: Shutdown, ready: impl FnOnce()) -> anyhow::Result<()> {
    let path = cfg.data_dir.join(format!("{}.sqlite", cfg.handle));
    let store = AgentStore::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let (up, up_rx) = mpsc::unbounded_channel();
    let agent = Arc::new(Agent {
        store: Batcher::spawn(&cfg.handle, store)?,
        link: Mutex::new(LinkState::default()),
        outbox: Notify::new(),
        up,
        iface: OnceLock::new(),
        shutdown: shutdown.clone(),
        cfg,
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
    tracing::info!(handle = %agent.cfg.handle, home = %agent.cfg.home.name, "agent serving {}", popupd_ipc::BUS_NAME);
    ready();
    link::run(agent.clone(), up_rx).await;
    drop(conn);
    Ok(())
}
