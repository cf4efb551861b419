//! The wire protocol of popupd: every type that crosses a network link, the
//! limits, and [`net`], the links that carry them (JSON frames over
//! WebSocket over TLS 1.3, dialed or accepted, through an HTTP proxy if
//! need be).
//!
//! This crate is the lowest layer: it knows nothing of roles or storage,
//! so the daemon, its tests and its benchmark all speak the protocol
//! through it.
//!
//! **Only this crate defines wire types.** Each link is a WebSocket over TLS
//! 1.3 carrying one JSON object per text frame, tagged by its `"t"` field.
//! `docs/protocol.md` says the same for people outside the code; keep the two
//! in step.
//!
//! # Protocol flow
//!
//! Agent ↔ home (the back connection, path [`AGENT_PATH`]):
//! 1. The agent opens TLS to its home, upgrades to WebSocket, and sends
//!    [`AgentFrame::Hello`] with its device credential.
//! 2. The home answers [`HomeFrame::Welcome`] (or an [`HomeFrame::Error`] and
//!    closes), then replays every mailbox event the device has not acked.
//! 3. The agent sends [`AgentFrame::Send`] for each message in its outbox; the
//!    home stores it durably and answers [`HomeFrame::Accepted`]. A retry with
//!    the same id is answered `Accepted` again and stored once.
//! 4. The home pushes [`HomeFrame::Event`] (a message or a status change),
//!    each with a per-user sequence number; the agent stores the event, then
//!    answers [`AgentFrame::Ack`] with that number (cumulative).
//! 5. WebSocket pings keep NAT state alive; a peer silent for three intervals
//!    is dead and the agent reconnects with capped, jittered backoff.
//!
//! Home ↔ home (path [`PEER_PATH`], mutual TLS under the network CA): the
//! dialing home sends [`PeerFrame::Hello`] naming itself (its client
//! certificate must be valid for that name); then each side sends
//! [`PeerFrame::Deliver`] and [`PeerFrame::Receipt`] items from its durable
//! forward queue, and the other side answers [`PeerFrame::Ack`] once the item is
//! on its own disk.
//!
//! Home ↔ global (path [`GLOBAL_PATH`], mutual TLS): the home sends
//! [`GlobalRequest::Hello`] with its public address, then requests; the
//! global server answers each with the same `req` number, and pushes
//! [`GlobalReply::Invalidate`] when a handle is released (removed from its
//! home, so it may be claimed again elsewhere).

use serde::{Deserialize, Serialize};

pub mod net;

/// Version of this protocol. Carried in every `Hello`; a peer speaking
/// another version is refused with [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest frame any side accepts, in bytes. Larger frames are refused with
/// [`ErrorCode::TooLarge`] and the connection is closed. Room for a
/// [`MAX_TEXT`] text even if every byte needs a 6-byte JSON escape.
pub const MAX_FRAME: usize = 128 * 1024;

/// Largest message text, in bytes of UTF-8.
pub const MAX_TEXT: usize = 16 * 1024;

/// Longest handle, in bytes.
pub const MAX_HANDLE: usize = 64;

/// Longest presence status text, in bytes of UTF-8.
pub const MAX_STATUS_TEXT: usize = 200;

/// Why a message failed when its recipient does not take it. The same
/// words whether the recipient blocked the sender or does not exist, so a
/// blocked sender cannot learn whether the person is there.
pub const NOT_ACCEPTED: &str = "not accepted: no such user, or they do not accept your messages";

/// Why a message failed when its recipient's mailbox is full.
pub const MAILBOX_FULL: &str = "not delivered: the recipient's mailbox is full";

/// WebSocket path of the agents' back connections.
pub const AGENT_PATH: &str = "/v1/agent";
/// WebSocket path of home-to-home links.
pub const PEER_PATH: &str = "/v1/peer";
/// WebSocket path of home-to-global links.
pub const GLOBAL_PATH: &str = "/v1/global";

/// A message id, chosen by the sender (a UUIDv7 in canonical text form).
pub type MsgId = String;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Frames an agent sends to its home.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentFrame {
    /// First frame: who this device is.
    Hello {
        v: u32,
        handle: String,
        device: String,
        secret: String,
        /// This device's presence as it connects (online if absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        presence: Option<PresenceReport>,
    },
    /// Send a message. Idempotent by `id`. The sender is the authenticated
    /// handle; a `from` naming anyone else is refused as spoofed.
    Send {
        id: MsgId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        to: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<MsgId>,
    },
    /// Every event up to and including `seq` is stored by the agent.
    Ack { seq: u64 },
    /// The person has read message `id` (one they received). The home
    /// answers [`HomeFrame::Done`] with `req` once the mark is on its disk;
    /// until then the agent sends it again on every connection.
    Read { id: MsgId, req: u64 },
    /// This device's presence changed.
    SetPresence {
        state: PresenceState,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        text: String,
    },
    /// Change the contact list. The home answers [`HomeFrame::Done`] with
    /// `req` once the change is on its disk (and sends the new
    /// [`HomeFrame::Contacts`]), or an [`HomeFrame::Error`] with `req` if it
    /// refuses it; until then the agent sends it again on every connection.
    Contact {
        op: ContactOp,
        handle: String,
        req: u64,
    },
    /// What is `handle`'s presence? Answered with [`HomeFrame::Presence`],
    /// or refused with [`ErrorCode::NotAccepted`] unless `handle` is an
    /// accepted contact.
    PresenceOf { handle: String },
}

/// A device's own presence, as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceReport {
    pub state: PresenceState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
}

/// How available a person is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceState {
    Online,
    /// Do not disturb: at the desk, but not to be interrupted.
    Busy,
    Away,
    Offline,
    /// The home cannot tell (the link to the contact's home is down).
    /// Never sent by an agent.
    Unknown,
}

impl PresenceState {
    /// The name used on the wire, on D-Bus and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceState::Online => "online",
            PresenceState::Busy => "busy",
            PresenceState::Away => "away",
            PresenceState::Offline => "offline",
            PresenceState::Unknown => "unknown",
        }
    }

    /// Inverse of [`PresenceState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "online" => PresenceState::Online,
            "busy" => PresenceState::Busy,
            "away" => PresenceState::Away,
            "offline" => PresenceState::Offline,
            "unknown" => PresenceState::Unknown,
            _ => return None,
        })
    }

    /// How available: a person with several devices shows the state of the
    /// most available one. Busy ranks above away: a busy person is at a
    /// device, an away one is not.
    pub fn rank(self) -> u8 {
        match self {
            PresenceState::Online => 4,
            PresenceState::Busy => 3,
            PresenceState::Away => 2,
            PresenceState::Offline => 1,
            PresenceState::Unknown => 0,
        }
    }
}

/// A change to a contact list. Across homes only `add` (a request),
/// `accept`, `decline` and `remove` travel; a block travels as `remove`, so
/// nobody learns they were blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactOp {
    Add,
    Remove,
    Accept,
    Decline,
    Block,
    Unblock,
}

/// Where a contact stands with the list's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// Both agreed: each sees the other's presence.
    Accepted,
    /// The owner asked; no answer yet.
    Requested,
    /// The contact asked; the owner has not answered.
    Pending,
    /// The owner blocked them: no presence, no messages.
    Blocked,
}

impl Relation {
    pub fn as_str(self) -> &'static str {
        match self {
            Relation::Accepted => "accepted",
            Relation::Requested => "requested",
            Relation::Pending => "pending",
            Relation::Blocked => "blocked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "accepted" => Relation::Accepted,
            "requested" => Relation::Requested,
            "pending" => Relation::Pending,
            "blocked" => Relation::Blocked,
            _ => return None,
        })
    }
}

/// One entry of a contact list. Presence is filled in for accepted
/// contacts only (`unknown` otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    pub handle: String,
    pub relation: Relation,
    pub state: PresenceState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    /// When the state last changed, ms since the epoch (0: never seen).
    pub since: Millis,
}

/// Frames a home sends to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum HomeFrame {
    /// Answer to `Hello`: the device is authenticated.
    Welcome {
        v: u32,
        handle: String,
        home: String,
    },
    /// Message `id` is on the home's disk and will be routed.
    Accepted { id: MsgId },
    /// The agent's request `req` (a read mark or a contact change) is on
    /// the home's disk.
    Done { req: u64 },
    /// A mailbox event; ack it with [`AgentFrame::Ack`].
    Event { seq: u64, event: Event },
    /// Something was wrong. `id` names the message concerned, if any, and
    /// `req` the request; `retry_after_ms` (with `rate_limited`) when to
    /// send it again.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<MsgId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// The home ends the session (it is shutting down, or its storage
    /// failed); reconnect after the given delay and send again what it
    /// did not confirm.
    Bye { reconnect_after_ms: u64 },
    /// The whole contact list, with presence: after `Welcome`, after every
    /// change to the list, and after the link lagged.
    Contacts { contacts: Vec<Contact> },
    /// A contact's presence changed (or the answer to `PresenceOf`).
    Presence {
        handle: String,
        state: PresenceState,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        text: String,
        since: Millis,
    },
}

/// What happens in a person's mailbox: a message for them, or news about a
/// message they sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    Message(Message),
    Status {
        id: MsgId,
        state: Delivery,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// `from` asks to become a contact; answer with
    /// [`AgentFrame::Contact`] `accept` or `decline`.
    ContactRequest {
        from: String,
    },
}

/// A message as it travels between homes and down to agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub id: MsgId,
    pub from: String,
    pub to: String,
    pub text: String,
    pub sent_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MsgId>,
}

/// Where a sent message has got to. Only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Waiting in the sender's own outbox (agent side only).
    Queued,
    /// On the sender's home's disk.
    Accepted,
    /// Stored by at least one device of the recipient.
    Delivered,
    /// The recipient opened it.
    Read,
    /// It will never arrive; the reason says why.
    Failed,
}

impl Delivery {
    /// The name used on D-Bus, in the CLI and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Queued => "queued",
            Delivery::Accepted => "accepted",
            Delivery::Delivered => "delivered",
            Delivery::Read => "read",
            Delivery::Failed => "failed",
        }
    }

    /// Inverse of [`Delivery::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Delivery::Queued,
            "accepted" => Delivery::Accepted,
            "delivered" => Delivery::Delivered,
            "read" => Delivery::Read,
            "failed" => Delivery::Failed,
            _ => return None,
        })
    }
}

/// Machine-readable error codes, shared by all links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Not valid JSON, or not a frame this side understands.
    BadFrame,
    /// Larger than [`MAX_FRAME`]; the connection is closed.
    TooLarge,
    /// The `Hello` carried another protocol version.
    UnsupportedVersion,
    /// Wrong handle, device or secret; or a certificate that does not match.
    AuthFailed,
    /// A frame other than `Hello` before authentication.
    NotAuthenticated,
    /// The claimed sender is not the authenticated party.
    SpoofedSender,
    /// The recipient handle exists nowhere in this network.
    NoSuchUser,
    /// A field is out of bounds (text too long, empty handle, ...).
    Invalid,
    /// The handle is owned by another home (global server only).
    HandleTaken,
    /// The recipient does not take this from the sender: blocked, not a
    /// contact, or no such user (deliberately not told apart).
    NotAccepted,
    /// The server failed (its storage, most often; the message says
    /// why); try again later.
    Internal,
    /// The server is at one of its limits (connections); try again later.
    Busy,
    /// Sent faster than the home takes from one person; `retry_after_ms`
    /// says when to send it again. Until then the home refuses the rest
    /// of this connection's messages (or requests) the same way, so their
    /// order holds when they come again.
    RateLimited,
    /// The recipient's mailbox holds as much as their home allows.
    MailboxFull,
}

/// Frames between two homes, both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum PeerFrame {
    /// First frame of the dialing home; `home` must match its certificate.
    Hello { v: u32, home: String },
    /// Answer to `Hello`.
    Welcome { v: u32, home: String },
    /// A message from a user of the sending home to a user of the receiver.
    /// `n` is the sender's queue number, echoed in the `Ack`.
    Deliver { n: u64, msg: Message },
    /// News about message `id`, sent by `to` (a user of the receiver).
    Receipt {
        n: u64,
        id: MsgId,
        to: String,
        state: Delivery,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Item `n` is stored (or refused, with the reason, for good).
    Ack {
        n: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<Refusal>,
    },
    /// A contact-list change from user `from` (of the sending home) for
    /// `to` (of the receiver); acked like `Deliver`.
    Contact {
        n: u64,
        from: String,
        to: String,
        op: ContactOp,
    },
    /// Send me the presence of these users of yours, now and on every
    /// change. Users who accepted none of the sender's users are ignored.
    Subscribe { users: Vec<String> },
    /// Stop sending the presence of these users.
    Unsubscribe { users: Vec<String> },
    /// A subscribed user's presence.
    Presence {
        handle: String,
        state: PresenceState,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        text: String,
        since: Millis,
    },
    /// A frame could not be understood.
    Error { code: ErrorCode, message: String },
}

/// Why a peer will never take an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

/// Requests a home sends to the global server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum GlobalRequest {
    /// First frame. `home` must match the client certificate; `address` is
    /// where other homes reach it (`host:port`).
    Hello {
        v: u32,
        home: String,
        address: String,
    },
    /// Claim `handle` for this home.
    Register { req: u64, handle: String },
    /// Give `handle` up.
    Unregister { req: u64, handle: String },
    /// Where does `handle` live?
    Lookup { req: u64, handle: String },
    /// Where is home `home` reached?
    LookupHome { req: u64, home: String },
}

/// Frames the global server sends to a home.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum GlobalReply {
    Welcome {
        v: u32,
    },
    /// The request succeeded.
    Done {
        req: u64,
    },
    /// Answer to `Lookup` and `LookupHome`; `None` when unknown.
    Route {
        req: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        route: Option<Route>,
    },
    /// The request failed.
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<u64>,
        code: ErrorCode,
        message: String,
    },
    /// Forget any cached route of `handle`.
    Invalidate {
        handle: String,
    },
}

/// Where a handle lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The home's name (also the DNS name in its certificate).
    pub home: String,
    /// `host:port` where homes reach it.
    pub address: String,
}

/// Checks a handle: 1..=64 bytes of lowercase ASCII letters, digits, `.`,
/// `-`, `_`, starting with a letter or digit.
pub fn valid_handle(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HANDLE
        && h.as_bytes()[0].is_ascii_alphanumeric()
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// A fresh, time-ordered message id.
pub fn new_id() -> MsgId {
    uuid::Uuid::now_v7().to_string()
}

/// Checks a message id as sent by a client: a UUID in canonical form.
pub fn valid_id(id: &str) -> bool {
    id.len() == 36 && uuid::Uuid::try_parse(id).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_as_documented() {
        let f = AgentFrame::Send {
            id: "0190f5c2-0000-7000-8000-000000000000".into(),
            from: None,
            to: "bob".into(),
            text: "lunch?".into(),
            reply_to: None,
        };
        let s = serde_json::to_string(&f).unwrap();
        assert_eq!(
            s,
            r#"{"t":"send","id":"0190f5c2-0000-7000-8000-000000000000","to":"bob","text":"lunch?"}"#
        );
        assert_eq!(serde_json::from_str::<AgentFrame>(&s).unwrap(), f);

        let e = HomeFrame::Event {
            seq: 7,
            event: Event::Status {
                id: "x".into(),
                state: Delivery::Read,
                reason: None,
            },
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"t":"event","seq":7,"event":{"kind":"status","id":"x","state":"read"}}"#
        );
    }

    #[test]
    fn unknown_fields_and_tags_are_refused() {
        assert!(serde_json::from_str::<AgentFrame>(r#"{"t":"ack","seq":1,"x":2}"#).is_err());
        assert!(serde_json::from_str::<AgentFrame>(r#"{"t":"launch"}"#).is_err());
    }

    #[test]
    fn handles() {
        for ok in ["alice", "bob.smith", "a1", "x_y-z"] {
            assert!(valid_handle(ok), "{ok}");
        }
        for bad in ["", "Alice", "-a", "a b", "ä", &"a".repeat(65)] {
            assert!(!valid_handle(bad), "{bad}");
        }
    }

    #[test]
    fn delivery_names_round_trip() {
        for d in [
            Delivery::Queued,
            Delivery::Accepted,
            Delivery::Delivered,
            Delivery::Read,
            Delivery::Failed,
        ] {
            assert_eq!(Delivery::parse(d.as_str()), Some(d));
        }
    }
}
