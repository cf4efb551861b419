//! The D-Bus contract of the popupd agent: `org.popupd.Agent1`.
//!
//! The agent owns the well-known name [`BUS_NAME`] on the session bus and
//! serves [`OBJECT_PATH`]. The interface itself, with every argument named
//! and every member explained, is `ipc/org.popupd.Agent1.xml`, installed as
//! `/usr/share/dbus-1/interfaces/org.popupd.Agent1.xml`; a test holds the
//! running agent (`daemon/src/agent/dbus.rs`) and this crate's client side
//! (the [`Agent1Proxy`], and the types both sides share) to it. The `1` is
//! the version: members are only ever added, never changed or removed.
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
//! | `Messages(peer, limit) → entries` | `su → a(sssssxsss)` | as History, with `reply_to` last |
//! | `Status() → connected, home, since_ms` | `→ bsx` | the back connection |
//! | `Plugins() → entries` | `→ a(ssss)` | loaded plugins: name, version, state, file |
//! | `Message(id) → entry` | `s → (sssssxss)` | one message of history |
//! | property `Handle` | `s` | whose agent this is |
//! | property `Connected` | `b` | back connection up? (emits PropertiesChanged) |
//! | signal `MessageReceived(id, from, text, sent_at_ms, reply_to)` | `sssxs` | a new message, once per id |
//! | signal `MessageStatusChanged(id, status, reason)` | `sss` | queued → accepted → delivered → read, or failed |
//! | signal `ConnectionChanged(connected, home)` | `bs` | back connection went up or down |
//! | `Contacts() → entries` | `→ a(ssssx)` | handle, relation, state, text, since_ms |
//! | `AddContact(handle)` | `s` | ask `handle` to become a contact |
//! | `RemoveContact(handle)` | `s` | remove (both sides stop seeing presence) |
//! | `AnswerContactRequest(handle, accept)` | `sb` | accept or decline a request |
//! | `Block(handle)`, `Unblock(handle)` | `s` | a blocked handle sees no presence, and its messages fail "not accepted" |
//! | `SetPresence(state, text)` | `ss` | online, away, busy or offline; `online` returns to automatic away |
//! | property `Presence` | `(ss)` | this device's state and text (emits PropertiesChanged) |
//! | signal `PresenceChanged(handle, state, text)` | `sss` | a contact's presence; `unknown` while their home is unreachable |
//! | signal `ContactRequest(handle)` | `s` | someone asks to become a contact |
//! | signal `ContactsChanged()` | | the list itself changed (added, removed, answered) |

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

/// One entry of `Messages`: the fields of [`HistoryEntry`], then the id of
/// the message it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, zbus::Type)]
pub struct MessageEntry {
    pub id: String,
    pub direction: String,
    pub from: String,
    pub to: String,
    pub text: String,
    pub sent_at: i64,
    pub status: String,
    pub reason: String,
    /// The id of the message this answers, or "".
    pub reply_to: String,
}

/// One entry of `Contacts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, zbus::Type)]
pub struct ContactEntry {
    pub handle: String,
    /// `accepted`, `requested` (you asked), `pending` (they asked you) or
    /// `blocked`.
    pub relation: String,
    /// `online`, `busy`, `away`, `offline`, or `unknown` (not accepted, or
    /// their home is unreachable).
    pub state: String,
    /// Their status text, or "".
    pub text: String,
    /// When the state last changed, ms since the Unix epoch (0: never).
    pub since: i64,
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
    /// Like `history`, each entry with the id it answers.
    fn messages(&self, peer: &str, limit: u32) -> zbus::Result<Vec<MessageEntry>>;
    /// The back connection: connected?, home name, since (ms since epoch, 0 if never).
    fn status(&self) -> zbus::Result<(bool, String, i64)>;
    /// One message of history.
    fn message(&self, id: &str) -> zbus::Result<HistoryEntry>;
    /// Loaded plugins: (name, version, state, file); state is `starting`,
    /// `active`, `failed: why` or `disabled: why`.
    fn plugins(&self) -> zbus::Result<Vec<(String, String, String, String)>>;

    /// The contact list with presence.
    fn contacts(&self) -> zbus::Result<Vec<ContactEntry>>;
    /// Ask `handle` to become a contact.
    fn add_contact(&self, handle: &str) -> zbus::Result<()>;
    /// Remove `handle` from the contacts.
    fn remove_contact(&self, handle: &str) -> zbus::Result<()>;
    /// Accept or decline `handle`'s request.
    fn answer_contact_request(&self, handle: &str, accept: bool) -> zbus::Result<()>;
    /// Block `handle`.
    fn block(&self, handle: &str) -> zbus::Result<()>;
    /// Unblock `handle`.
    fn unblock(&self, handle: &str) -> zbus::Result<()>;
    /// Set this person's presence by hand.
    fn set_presence(&self, state: &str, text: &str) -> zbus::Result<()>;

    /// Whose agent this is.
    #[zbus(property)]
    fn handle(&self) -> zbus::Result<String>;
    /// This device's presence: (state, text).
    #[zbus(property)]
    fn presence(&self) -> zbus::Result<(String, String)>;
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
    /// A contact's presence changed. (D-Bus name `PresenceChanged`; named
    /// apart here because the `Presence` property's change stream takes
    /// `receive_presence_changed`.)
    #[zbus(signal, name = "PresenceChanged")]
    fn contact_presence_changed(&self, handle: &str, state: &str, text: &str) -> zbus::Result<()>;
    /// Someone asks to become a contact.
    #[zbus(signal)]
    fn contact_request(&self, handle: &str) -> zbus::Result<()>;
    /// The contact list changed.
    #[zbus(signal)]
    fn contacts_changed(&self) -> zbus::Result<()>;
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
    /// The agent did not answer a call in time (10 s).
    pub const NO_ANSWER: i32 = 5;
}
