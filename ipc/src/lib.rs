//! The D-Bus contract of the popupd agent: `org.popupd.Agent1`.
//!
//! The agent owns the well-known name [`BUS_NAME`] on the session bus and
//! serves [`OBJECT_PATH`]. This crate holds the client side (the [`Agent1Proxy`])
//! and the types both sides share; the daemon implements the interface with
//! exactly these signatures. The `1` is the version: members are only ever
//! added, never changed or removed.
//!
//! Any language can use it. From a shell:
//!
//! ```text
//! busctl --user call org.popupd.Agent1 /org/popupd/Agent1 org.popupd.Agent1 Send ss bob "lunch?"
//! gdbus monitor --session --dest org.popupd.Agent1
//! ```
//!
//! | member | signature | meaning |
//! |---|---|---|
//! | `Send(to, text) → id` | `ss → s` | queue a message; returns its id at once |
//! | `Reply(id, text) → id` | `ss → s` | answer a received message (to its sender) |
//! | `MarkRead(id)` | `s` | tell the sender you read it |
//! | `History(peer, limit) → entries` | `su → a(sssssxss)` | newest last; `peer` "" for all |
//! | `Status() → (connected, home, since_ms)` | `→ (bsx)` | the back connection |
//! | `Plugins() → entries` | `→ a(ssss)` | loaded plugins: name, version, state, file |
//! | `Message(id) → entry` | `s → (sssssxss)` | one message of history |
//! | property `Handle` | `s` | whose agent this is |
//! | property `Connected` | `b` | back connection up? (emits PropertiesChanged) |
//! | signal `MessageReceived(id, from, text, sent_at_ms, reply_to)` | `sssxs` | a new message, once per id |
//! | signal `MessageStatusChanged(id, status, reason)` | `sss` | queued → accepted → delivered → read, or failed |
//! | signal `ConnectionChanged(connected, home)` | `bs` | back connection went up or down |

use serde::{Deserialize, Serialize};

/// Well-known bus name the agent owns.
pub const BUS_NAME: &str = "org.popupd.Agent1";
/// Object path of the agent.
pub const OBJECT_PATH: &str = "/org/popupd/Agent1";
/// Interface name.
pub const INTERFACE: &str = "org.popupd.Agent1";

/// D-Bus error names the agent returns.
pub mod errors {
    /// An argument is out of bounds (bad handle, empty or too long text).
    pub const INVALID: &str = "org.popupd.Agent1.Error.Invalid";
    /// No such message id in history.
    pub const UNKNOWN_MESSAGE: &str = "org.popupd.Agent1.Error.UnknownMessage";
    /// The agent failed internally (storage); see its log.
    pub const FAILED: &str = "org.popupd.Agent1.Error.Failed";
}

/// One entry of `History`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, zbus::Type)]
pub struct HistoryEntry {
    /// Message id.
    pub id: String,
    /// `in` (received) or `out` (sent).
    pub direction: String,
    /// Handle of the sender.
    pub from: String,
    /// Handle of the recipient.
    pub to: String,
    pub text: String,
    /// When the sender sent it, ms since the Unix epoch.
    pub sent_at: i64,
    /// queued, accepted, delivered, read or failed (sent); received or read
    /// (received).
    pub status: String,
    /// Why it failed, or "".
    pub reason: String,
}

/// Client side of `org.popupd.Agent1`.
#[zbus::proxy(
    interface = "org.popupd.Agent1",
    default_service = "org.popupd.Agent1",
    default_path = "/org/popupd/Agent1"
)]
pub trait Agent1 {
    /// Queue a message to `to`; returns its id at once. Status signals follow.
    fn send(&self, to: &str, text: &str) -> zbus::Result<String>;
    /// Answer the received message `id`.
    fn reply(&self, id: &str, text: &str) -> zbus::Result<String>;
    /// Mark the received message `id` read (its sender is told).
    fn mark_read(&self, id: &str) -> zbus::Result<()>;
    /// Up to `limit` newest entries with `peer` ("" for everyone), oldest first.
    fn history(&self, peer: &str, limit: u32) -> zbus::Result<Vec<HistoryEntry>>;
    /// The back connection: connected?, home name, since (ms since epoch, 0 if never).
    fn status(&self) -> zbus::Result<(bool, String, i64)>;
    /// One message of history.
    fn message(&self, id: &str) -> zbus::Result<HistoryEntry>;
    /// Loaded plugins: (name, version, state, file); state is `starting`,
    /// `active`, `failed: why` or `disabled: why`.
    fn plugins(&self) -> zbus::Result<Vec<(String, String, String, String)>>;

    /// Whose agent this is.
    #[zbus(property)]
    fn handle(&self) -> zbus::Result<String>;
    /// Whether the back connection is up.
    #[zbus(property)]
    fn connected(&self) -> zbus::Result<bool>;

    /// A new message arrived (emitted once per message id).
    #[zbus(signal)]
    fn message_received(
        &self,
        id: &str,
        from: &str,
        text: &str,
        sent_at: i64,
        reply_to: &str,
    ) -> zbus::Result<()>;
    /// A message's status changed.
    #[zbus(signal)]
    fn message_status_changed(&self, id: &str, status: &str, reason: &str) -> zbus::Result<()>;
    /// The back connection went up or down.
    #[zbus(signal)]
    fn connection_changed(&self, connected: bool, home: &str) -> zbus::Result<()>;
}

/// Exit codes of `popupctl`, so scripts can tell failures apart.
pub mod exit {
    /// Done.
    pub const OK: i32 = 0;
    /// The agent answered with an error (bad argument, unknown message).
    pub const REFUSED: i32 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: i32 = 2;
    /// No agent on the bus: not running, or another bus.
    pub const NO_AGENT: i32 = 3;
    /// `--wait` gave up: the message failed or did not reach the state in time.
    pub const NOT_DELIVERED: i32 = 4;
}
