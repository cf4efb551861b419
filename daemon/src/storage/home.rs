//! The home's store: accounts, devices, mailboxes, and the forward queue.
//!
//! Each user has a **mailbox**: a numbered sequence of events (messages for
//! them, status news about messages they sent). Each device remembers the
//! highest number it has stored (`acked_seq`); on connect it gets everything
//! after that, so nothing is lost across drops and restarts, and the agent
//! drops duplicates by message id. Events every device has are deleted.
//!
//! The **forward queue** (`outq`) holds what must go to another home:
//! messages and receipts. An item stays until that home acks it; an item
//! whose destination is not known yet has `dest` NULL until the router asks
//! the global server.
//!
//! **Contacts** are kept per local user (`owner`), one row per other person
//! (`peer`) with the relation as the owner sees it. A pair on two homes has
//! a row on each, kept in step by `contact` items in the forward queue;
//! `peer_home` remembers which home the peer spoke from, which is what a
//! presence subscription from that home is checked against.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use popupd_protocol::{ContactOp, Delivery, Event, Message, MsgId, NOT_ACCEPTED, Relation, now_ms};
use popupd_store::{
    Batchable, Checkpointer, Step, StoreError, Syncer, migrate, open_sqlite, sqlite_begin,
    sqlite_commit, sqlite_job_begin, sqlite_job_end, sqlite_rollback, wal_syncer,
};

/// An item of the forward queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutItem {
    /// A message from one of our users.
    Deliver(Message),
    /// News about message `id` for `to`, who lives elsewhere.
    Receipt {
        id: MsgId,
        to: String,
        state: Delivery,
        reason: Option<String>,
    },
    /// A contact-list change from our user `from` for `to`, who lives
    /// elsewhere.
    Contact {
        from: String,
        to: String,
        op: ContactOp,
    },
}

impl OutItem {
    /// The handle whose home this item goes to.
    pub fn dest_handle(&self) -> &str {
        match self {
            OutItem::Deliver(m) => &m.to,
            OutItem::Receipt { to, .. } | OutItem::Contact { to, .. } => to,
        }
    }
}

/// A row of a contact list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRow {
    pub peer: String,
    pub relation: Relation,
    /// The peer's home, if not this one (and known).
    pub peer_home: Option<String>,
}

/// A new mailbox event to push to a user's connected devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub handle: String,
    pub seq: u64,
    /// The event as JSON (the `event` field of a `HomeFrame::Event`).
    pub event: String,
}

/// What a write caused, for the caller to act on after commit.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Effects {
    /// Events to push down back connections.
    pub pushes: Vec<Push>,
    /// New forward-queue items: (n, known destination home).
    pub queued: Vec<(u64, Option<String>)>,
    /// Local users whose contact list changed.
    pub contacts: Vec<String>,
}

/// Result of a `Send`.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// Stored now.
    Accepted,
    /// Already stored by an earlier try.
    Duplicate,
}

/// A user, as `popupd user list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserInfo {
    pub handle: String,
    pub devices: Vec<String>,
    pub created_at: i64,
}

/// The storage interface of a home. Methods run inside the batcher's
/// transaction; they must not commit.
pub trait HomeStore: Batchable {
    fn user_exists(&mut self, handle: &str) -> Result<bool, StoreError>;
    fn add_user(&mut self, handle: &str) -> Result<(), StoreError>;
    fn remove_user(&mut self, handle: &str) -> Result<bool, StoreError>;
    fn list_users(&mut self) -> Result<Vec<UserInfo>, StoreError>;
    fn all_handles(&mut self) -> Result<Vec<String>, StoreError>;
    fn add_device(
        &mut self,
        handle: &str,
        device: &str,
        secret_hash: &str,
    ) -> Result<(), StoreError>;
    fn revoke_device(&mut self, handle: &str, device: &str) -> Result<bool, StoreError>;
    /// The device's acked sequence number if the credential matches.
    fn check_device(
        &mut self,
        handle: &str,
        device: &str,
        secret_hash: &str,
    ) -> Result<Option<u64>, StoreError>;
    /// Mailbox events after `after`, oldest first.
    fn mailbox_after(
        &mut self,
        handle: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError>;
    /// Stores a message from a local sender: into the recipient's mailbox if
    /// local, else into the forward queue (routed to `dest` if the caller
    /// already knows the recipient's home).
    fn accept_send(
        &mut self,
        msg: &Message,
        dest: Option<&str>,
        fx: &mut Effects,
    ) -> Result<SendOutcome, StoreError>;
    /// A device stored everything up to `seq`.
    fn ack(
        &mut self,
        handle: &str,
        device: &str,
        seq: u64,
        fx: &mut Effects,
    ) -> Result<(), StoreError>;
    /// `handle` read message `id`.
    fn mark_read(&mut self, handle: &str, id: &str, fx: &mut Effects) -> Result<(), StoreError>;
    /// A message from `from_home` for a local user. `NotFound` if no such user.
    fn accept_remote(
        &mut self,
        from_home: &str,
        msg: &Message,
        fx: &mut Effects,
    ) -> Result<(), StoreError>;
    /// News about a message a local user sent. From a peer (`from_home`),
    /// it counts only if the message was forwarded to that home.
    fn apply_receipt(
        &mut self,
        id: &str,
        sender: &str,
        from_home: Option<&str>,
        state: Delivery,
        reason: Option<&str>,
        fx: &mut Effects,
    ) -> Result<(), StoreError>;
    /// Forward-queue items for `dest` (None: not yet routed), oldest first.
    fn outq(&mut self, dest: Option<&str>) -> Result<Vec<(u64, OutItem)>, StoreError>;
    /// The items `ns` that go to `dest`.
    fn outq_items(&mut self, dest: &str, ns: &[u64]) -> Result<Vec<(u64, OutItem)>, StoreError>;
    fn outq_route(&mut self, n: u64, dest: &str) -> Result<(), StoreError>;
    /// Homes that have items waiting.
    fn outq_dests(&mut self) -> Result<Vec<String>, StoreError>;
    fn outq_done(&mut self, n: u64) -> Result<(), StoreError>;
    /// Drops item `n` for good; a message becomes `failed` for its sender.
    fn outq_fail(
        &mut self,
        n: u64,
        reason: &str,
        fx: &mut Effects,
    ) -> Result<Option<OutItem>, StoreError>;
    /// Forgets dedup and receipt records older than `before` (ms since the
    /// epoch); returns how many went. A retry or redelivery older than that
    /// window would be taken as new.
    fn prune(&mut self, before: i64) -> Result<usize, StoreError>;
    /// Every (handle, device) that may log in.
    fn all_devices(&mut self) -> Result<Vec<(String, String)>, StoreError>;
    /// `owner`'s contact list.
    fn contacts(&mut self, owner: &str) -> Result<Vec<ContactRow>, StoreError>;
    /// A local user changes their contact list. `dest` is the peer's home
    /// if the caller knows it. `Conflict` or `NotFound` explain a refusal.
    fn contact_op(
        &mut self,
        owner: &str,
        peer: &str,
        op: ContactOp,
        dest: Option<&str>,
        fx: &mut Effects,
    ) -> Result<(), StoreError>;
    /// A user `from` of home `from_home` changes their relation with our
    /// user `to`. Silently ignored when `to` does not exist or blocked
    /// `from`, so the sender learns neither.
    fn contact_from_peer(
        &mut self,
        from_home: &str,
        from: &str,
        to: &str,
        op: ContactOp,
        fx: &mut Effects,
    ) -> Result<(), StoreError>;
    /// Of `users` (ours), those that accepted at least one user of `home`:
    /// the ones whose presence `home` may see.
    fn visible_to_home(&mut self, home: &str, users: &[String]) -> Result<Vec<String>, StoreError>;
    /// Makes `owner` and `peer` accepted contacts on this home's side at
    /// once (bulk setup for administrators and benchmarks); `peer_home` is
    /// the peer's home if not this one.
    fn link_contacts(
        &mut self,
        owner: &str,
        peer: &str,
        peer_home: Option<&str>,
    ) -> Result<(), StoreError>;
}

/// [`HomeStore`] on SQLite.
pub struct SqliteHome {
    conn: rusqlite::Connection,
    checkpoints: Checkpointer,
    /// The database file. Its write-ahead log is what the [`Syncer`]
    /// fsyncs: commits here do not wait for the disk themselves
    /// (`synchronous = NORMAL`), so that a new message can reach its
    /// recipient while the disk catches up.
    path: std::path::PathBuf,
}

impl Batchable for SqliteHome {
    fn begin(&mut self) -> Result<(), StoreError> {
        sqlite_begin(&self.conn)
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        sqlite_commit(&self.conn)?;
        self.checkpoints.committed(&self.conn);
        Ok(())
    }
    fn rollback(&mut self) {
        sqlite_rollback(&self.conn)
    }
    fn job_begin(&mut self) -> Result<(), StoreError> {
        sqlite_job_begin(&self.conn)
    }
    fn job_end(&mut self, ok: bool) -> Result<(), StoreError> {
        sqlite_job_end(&self.conn, ok)
    }
    fn idle(&mut self) {
        self.checkpoints.idle(&self.conn);
    }
    fn syncer(&mut self) -> Result<Option<Syncer>, StoreError> {
        Ok(Some(wal_syncer(&self.path)?))
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users(
    handle TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    next_seq INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS devices(
    handle TEXT NOT NULL REFERENCES users(handle) ON DELETE CASCADE,
    device TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    acked_seq INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY(handle, device)
);
CREATE TABLE IF NOT EXISTS mailbox(
    handle TEXT NOT NULL,
    seq INTEGER NOT NULL,
    msg_id TEXT,
    event TEXT NOT NULL,
    PRIMARY KEY(handle, seq)
) WITHOUT ROWID;
-- Messages our users sent: dedup of retries, and their status.
CREATE TABLE IF NOT EXISTS sent(
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    state TEXT NOT NULL,
    at INTEGER NOT NULL,
    -- The home it was forwarded to; receipts count only from there.
    dest_home TEXT
) WITHOUT ROWID;
-- Messages our users received: dedup, and receipts back to the sender.
CREATE TABLE IF NOT EXISTS received(
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    from_home TEXT,
    delivered INTEGER NOT NULL DEFAULT 0,
    read INTEGER NOT NULL DEFAULT 0,
    at INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outq(
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    dest TEXT,
    item TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outq_dest ON outq(dest, n);
CREATE TABLE IF NOT EXISTS contacts(
    owner TEXT NOT NULL REFERENCES users(handle) ON DELETE CASCADE,
    peer TEXT NOT NULL,
    relation TEXT NOT NULL,
    peer_home TEXT,
    at INTEGER NOT NULL,
    PRIMARY KEY(owner, peer)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS contacts_peer_home ON contacts(owner, peer_home, relation);
";

/// The home's schema, one step per version.
const STEPS: &[Step] = &[
    |c| Ok(c.execute_batch(SCHEMA)?),
    // The forward queue names each item's recipient, so a new item can
    // wait behind an unrouted one for the same person (per-sender order).
    |c| {
        c.execute_batch("ALTER TABLE outq ADD COLUMN handle TEXT")?;
        let items: Vec<(i64, String)> = c
            .prepare("SELECT n, item FROM outq")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut st = c.prepare("UPDATE outq SET handle = ?2 WHERE n = ?1")?;
        for (n, json) in items {
            if let Ok(item) = serde_json::from_str::<OutItem>(&json) {
                st.execute(params![n, item.dest_handle()])?;
            }
        }
        Ok(())
    },
];

impl SqliteHome {
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let conn = open_sqlite(path)?;
        migrate(&conn, path, STEPS)?;
        conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        let checkpoints = Checkpointer::spawn(&conn, path)?;
        Ok(SqliteHome {
            conn,
            checkpoints,
            path: path.to_owned(),
        })
    }

    fn push_event(
        &mut self,
        handle: &str,
        msg_id: Option<&str>,
        ev: &Event,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        // No RETURNING or `IN (SELECT …)` on the message path: SQLite
        // builds those in an ephemeral table, a fresh page cache each time,
        // and the malloc/trim/page-fault churn that causes costs much of the
        // home's CPU under load (docs/performance.md).
        let seq: i64 = self
            .conn
            .prepare_cached("SELECT next_seq FROM users WHERE handle = ?1")?
            .query_row([handle], |r| r.get(0))?;
        self.conn
            .prepare_cached("UPDATE users SET next_seq = ?2 WHERE handle = ?1")?
            .execute(params![handle, seq + 1])?;
        let json = serde_json::to_string(ev).map_err(|e| StoreError::Db(e.to_string()))?;
        self.conn
            .prepare_cached(
                "INSERT INTO mailbox(handle, seq, msg_id, event) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![handle, seq, msg_id, json])?;
        fx.pushes.push(Push {
            handle: handle.to_owned(),
            seq: seq as u64,
            event: json,
        });
        Ok(())
    }

    fn enqueue(
        &mut self,
        dest: Option<&str>,
        item: &OutItem,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(item).map_err(|e| StoreError::Db(e.to_string()))?;
        let handle = item.dest_handle();
        // Items for one person leave in the order they were queued: while
        // an earlier one waits for the router, a new one with a known
        // route waits too, and the router routes both in order.
        let dest = match dest {
            Some(d)
                if !self
                    .conn
                    .prepare_cached("SELECT 1 FROM outq WHERE dest IS NULL AND handle = ?1")?
                    .exists([handle])? =>
            {
                Some(d)
            }
            _ => None,
        };
        self.conn
            .prepare_cached("INSERT INTO outq(dest, handle, item) VALUES (?1, ?2, ?3)")?
            .execute(params![dest, handle, json])?;
        fx.queued.push((
            self.conn.last_insert_rowid() as u64,
            dest.map(str::to_owned),
        ));
        Ok(())
    }

    /// Tells `sender` (local or not) about message `id`.
    fn receipt(
        &mut self,
        id: &str,
        sender: &str,
        from_home: Option<&str>,
        state: Delivery,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        match from_home {
            None => self.apply_receipt(id, sender, None, state, None, fx),
            Some(home) => self.enqueue(
                Some(home),
                &OutItem::Receipt {
                    id: id.to_owned(),
                    to: sender.to_owned(),
                    state,
                    reason: None,
                },
                fx,
            ),
        }
    }

    /// `owner`'s relation with `peer`, and the peer's home if known.
    fn contact_row(
        &mut self,
        owner: &str,
        peer: &str,
    ) -> Result<Option<(Relation, Option<String>)>, StoreError> {
        let r: Option<(String, Option<String>)> = self
            .conn
            .prepare_cached(
                "SELECT relation, peer_home FROM contacts WHERE owner = ?1 AND peer = ?2",
            )?
            .query_row(params![owner, peer], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(r.and_then(|(rel, home)| Some((Relation::parse(&rel)?, home))))
    }

    fn relation(&mut self, owner: &str, peer: &str) -> Result<Option<Relation>, StoreError> {
        Ok(self.contact_row(owner, peer)?.map(|r| r.0))
    }

    /// Sets (or with `None` deletes) `owner`'s relation with `peer`. A
    /// `peer_home` of `None` keeps the one on record.
    fn set_relation(
        &mut self,
        owner: &str,
        peer: &str,
        rel: Option<Relation>,
        peer_home: Option<&str>,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        match rel {
            None => {
                self.conn
                    .prepare_cached("DELETE FROM contacts WHERE owner = ?1 AND peer = ?2")?
                    .execute(params![owner, peer])?;
            }
            Some(r) => {
                self.conn
                    .prepare_cached(
                        "INSERT INTO contacts(owner, peer, relation, peer_home, at) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT(owner, peer) DO UPDATE SET relation = ?3,
                            peer_home = coalesce(?4, peer_home), at = ?5",
                    )?
                    .execute(params![owner, peer, r.as_str(), peer_home, now_ms()])?;
            }
        }
        if !fx.contacts.iter().any(|c| c == owner) {
            fx.contacts.push(owner.to_owned());
        }
        Ok(())
    }

    /// Tells `peer` about `owner`'s change: directly when `peer` is ours,
    /// else through the forward queue.
    fn tell_peer(
        &mut self,
        owner: &str,
        peer: &str,
        op: ContactOp,
        dest: Option<&str>,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        if self.user_exists(peer)? {
            self.contact_local(owner, peer, op, fx)
        } else {
            let item = OutItem::Contact {
                from: owner.to_owned(),
                to: peer.to_owned(),
                op,
            };
            self.enqueue(dest, &item, fx)
        }
    }

    /// `from` (anywhere) did `op` towards our user `to`: update `to`'s side.
    /// Returns the answer `to`'s side owes `from`, if any.
    fn apply_incoming(
        &mut self,
        from: &str,
        from_home: Option<&str>,
        to: &str,
        op: ContactOp,
        fx: &mut Effects,
    ) -> Result<Option<ContactOp>, StoreError> {
        let cur = self.relation(to, from)?;
        if cur == Some(Relation::Blocked) {
            return Ok(None);
        }
        match (op, cur) {
            // Asked again by someone already accepted (their side was
            // lost or reset): confirm.
            (ContactOp::Add, Some(Relation::Accepted)) => {
                self.set_relation(to, from, Some(Relation::Accepted), from_home, fx)?;
                Ok(Some(ContactOp::Accept))
            }
            // Both asked each other: that is agreement.
            (ContactOp::Add, Some(Relation::Requested)) => {
                self.set_relation(to, from, Some(Relation::Accepted), from_home, fx)?;
                Ok(Some(ContactOp::Accept))
            }
            (ContactOp::Add, Some(Relation::Pending)) => Ok(None),
            (ContactOp::Add, _) => {
                self.set_relation(to, from, Some(Relation::Pending), from_home, fx)?;
                let ev = Event::ContactRequest {
                    from: from.to_owned(),
                };
                self.push_event(to, None, &ev, fx)?;
                Ok(None)
            }
            (ContactOp::Accept, Some(Relation::Requested | Relation::Accepted)) => {
                self.set_relation(to, from, Some(Relation::Accepted), from_home, fx)?;
                Ok(None)
            }
            (ContactOp::Decline, Some(Relation::Requested)) | (ContactOp::Remove, Some(_)) => {
                self.set_relation(to, from, None, None, fx)?;
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Both users are ours: `owner`'s change reaches `peer` in the same
    /// transaction.
    fn contact_local(
        &mut self,
        owner: &str,
        peer: &str,
        op: ContactOp,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        if let Some(answer) = self.apply_incoming(owner, None, peer, op, fx)? {
            // `peer` already agreed: the answer lands on `owner`'s side.
            self.apply_incoming(peer, None, owner, answer, fx)?;
        }
        Ok(())
    }

    fn store_incoming(
        &mut self,
        from_home: Option<&str>,
        msg: &Message,
        fx: &mut Effects,
    ) -> Result<bool, StoreError> {
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO received(id, sender, recipient, from_home, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![msg.id, msg.from, msg.to, from_home, now_ms()])?;
        if inserted == 1 {
            self.push_event(&msg.to, Some(&msg.id), &Event::Message(msg.clone()), fx)?;
        }
        Ok(inserted == 1)
    }
}

impl HomeStore for SqliteHome {
    fn user_exists(&mut self, handle: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM users WHERE handle = ?1")?
            .exists([handle])?)
    }

    fn add_user(&mut self, handle: &str) -> Result<(), StoreError> {
        if self.user_exists(handle)? {
            return Err(StoreError::Conflict(format!(
                "user {handle} already exists on this home"
            )));
        }
        self.conn.execute(
            "INSERT INTO users(handle, created_at) VALUES (?1, ?2)",
            params![handle, now_ms()],
        )?;
        Ok(())
    }

    fn remove_user(&mut self, handle: &str) -> Result<bool, StoreError> {
        self.conn
            .execute("DELETE FROM mailbox WHERE handle = ?1", [handle])?;
        self.conn.execute(
            "DELETE FROM contacts WHERE owner = ?1 OR peer = ?1",
            [handle],
        )?;
        Ok(self
            .conn
            .execute("DELETE FROM users WHERE handle = ?1", [handle])?
            == 1)
    }

    fn list_users(&mut self) -> Result<Vec<UserInfo>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT u.handle, u.created_at, group_concat(d.device, ' ')
             FROM users u LEFT JOIN devices d ON d.handle = u.handle
             GROUP BY u.handle ORDER BY u.handle",
        )?;
        let rows = st.query_map([], |r| {
            let devs: Option<String> = r.get(2)?;
            Ok(UserInfo {
                handle: r.get(0)?,
                created_at: r.get(1)?,
                devices: devs
                    .map(|d| d.split(' ').map(str::to_owned).collect())
                    .unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn all_handles(&mut self) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT handle FROM users ORDER BY handle")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn add_device(
        &mut self,
        handle: &str,
        device: &str,
        secret_hash: &str,
    ) -> Result<(), StoreError> {
        let next: Option<i64> = self
            .conn
            .query_row(
                "SELECT next_seq FROM users WHERE handle = ?1",
                [handle],
                |r| r.get(0),
            )
            .optional()?;
        let Some(next) = next else {
            return Err(StoreError::NotFound(format!(
                "no user {handle} on this home"
            )));
        };
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO devices(handle, device, secret_hash, acked_seq, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![handle, device, secret_hash, next - 1, now_ms()],
        )?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "{handle} already has a device {device}"
            )));
        }
        Ok(())
    }

    fn revoke_device(&mut self, handle: &str, device: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM devices WHERE handle = ?1 AND device = ?2",
            params![handle, device],
        )? == 1)
    }

    fn check_device(
        &mut self,
        handle: &str,
        device: &str,
        secret_hash: &str,
    ) -> Result<Option<u64>, StoreError> {
        let row: Option<(String, i64)> = self
            .conn
            .prepare_cached(
                "SELECT secret_hash, acked_seq FROM devices WHERE handle = ?1 AND device = ?2",
            )?
            .query_row(params![handle, device], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            // Both sides are hex digests of the same length; comparing them
            // leaks nothing about the secret itself.
            Some((h, acked)) if h == secret_hash => Some(acked as u64),
            _ => None,
        })
    }

    fn mailbox_after(
        &mut self,
        handle: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT seq, event FROM mailbox WHERE handle = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = st.query_map(params![handle, after as i64, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn accept_send(
        &mut self,
        msg: &Message,
        dest: Option<&str>,
        fx: &mut Effects,
    ) -> Result<SendOutcome, StoreError> {
        let prior: Option<String> = self
            .conn
            .prepare_cached("SELECT sender FROM sent WHERE id = ?1")?
            .query_row([&msg.id], |r| r.get(0))
            .optional()?;
        match prior {
            Some(s) if s == msg.from => return Ok(SendOutcome::Duplicate),
            Some(_) => {
                return Err(StoreError::Conflict(format!(
                    "message id {} is already used; choose a fresh UUIDv7",
                    msg.id
                )));
            }
            None => {}
        }
        self.conn
            .prepare_cached(
                "INSERT INTO sent(id, sender, recipient, state, at, dest_home)
                 VALUES (?1, ?2, ?3, 'accepted', ?4, ?5)",
            )?
            .execute(params![msg.id, msg.from, msg.to, now_ms(), dest])?;
        if self.user_exists(&msg.to)? {
            if self.relation(&msg.to, &msg.from)? == Some(Relation::Blocked) {
                let id = msg.id.clone();
                self.apply_receipt(
                    &id,
                    &msg.from,
                    None,
                    Delivery::Failed,
                    Some(NOT_ACCEPTED),
                    fx,
                )?;
                return Ok(SendOutcome::Accepted);
            }
            self.store_incoming(None, msg, fx)?;
        } else {
            self.enqueue(dest, &OutItem::Deliver(msg.clone()), fx)?;
        }
        Ok(SendOutcome::Accepted)
    }

    fn ack(
        &mut self,
        handle: &str,
        device: &str,
        seq: u64,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        let old: Option<i64> = self
            .conn
            .prepare_cached("SELECT acked_seq FROM devices WHERE handle = ?1 AND device = ?2")?
            .query_row(params![handle, device], |r| r.get(0))
            .optional()?;
        let Some(old) = old else { return Ok(()) };
        let next: i64 = self
            .conn
            .prepare_cached("SELECT next_seq FROM users WHERE handle = ?1")?
            .query_row([handle], |r| r.get(0))?;
        let new = (seq as i64).min(next - 1);
        if new <= old {
            return Ok(());
        }
        self.conn
            .prepare_cached("UPDATE devices SET acked_seq = ?3 WHERE handle = ?1 AND device = ?2")?
            .execute(params![handle, device, new])?;
        // First device to store a message makes it "delivered" for the sender.
        let ids: Vec<String> = {
            let mut st = self.conn.prepare_cached(
                "SELECT msg_id FROM mailbox
                 WHERE handle = ?1 AND seq > ?2 AND seq <= ?3 AND msg_id IS NOT NULL",
            )?;
            let rows = st.query_map(params![handle, old, new], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for id in ids {
            let row: Option<(String, Option<String>)> = self
                .conn
                .prepare_cached(
                    "SELECT sender, from_home FROM received WHERE id = ?1 AND delivered = 0",
                )?
                .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((sender, home)) = row else { continue };
            self.conn
                .prepare_cached("UPDATE received SET delivered = 1 WHERE id = ?1")?
                .execute([&id])?;
            self.receipt(&id, &sender, home.as_deref(), Delivery::Delivered, fx)?;
        }
        self.conn
            .prepare_cached(
                "DELETE FROM mailbox WHERE handle = ?1
                 AND seq <= (SELECT min(acked_seq) FROM devices WHERE handle = ?1)",
            )?
            .execute([handle])?;
        Ok(())
    }

    fn mark_read(&mut self, handle: &str, id: &str, fx: &mut Effects) -> Result<(), StoreError> {
        let row: Option<(String, Option<String>)> = self
            .conn
            .prepare_cached(
                "SELECT sender, from_home FROM received WHERE id = ?1 AND recipient = ?2 AND read = 0",
            )?
            .query_row(params![id, handle], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((sender, home)) = row {
            self.conn
                .prepare_cached("UPDATE received SET read = 1, delivered = 1 WHERE id = ?1")?
                .execute([id])?;
            self.receipt(id, &sender, home.as_deref(), Delivery::Read, fx)?;
        }
        Ok(())
    }

    fn accept_remote(
        &mut self,
        from_home: &str,
        msg: &Message,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        if !self.user_exists(&msg.to)? {
            return Err(StoreError::NotFound(format!(
                "no user {} on this home",
                msg.to
            )));
        }
        if self.relation(&msg.to, &msg.from)? == Some(Relation::Blocked) {
            return Err(StoreError::NotAccepted);
        }
        self.store_incoming(Some(from_home), msg, fx)?;
        Ok(())
    }

    fn apply_receipt(
        &mut self,
        id: &str,
        sender: &str,
        from_home: Option<&str>,
        state: Delivery,
        reason: Option<&str>,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        let row: Option<(String, Option<String>)> = self
            .conn
            .prepare_cached("SELECT state, dest_home FROM sent WHERE id = ?1 AND sender = ?2")?
            .query_row(params![id, sender], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((cur, dest_home)) = row else {
            return Ok(());
        };
        if from_home.is_some() && from_home != dest_home.as_deref() {
            tracing::warn!(msg_id = id, from = ?from_home, "receipt refused: the message did not go to that home");
            return Ok(());
        }
        let Some(cur) = Delivery::parse(&cur) else {
            return Ok(());
        };
        if state <= cur || cur == Delivery::Failed {
            return Ok(());
        }
        self.conn
            .prepare_cached("UPDATE sent SET state = ?2 WHERE id = ?1")?
            .execute(params![id, state.as_str()])?;
        if self.user_exists(sender)? {
            let ev = Event::Status {
                id: id.to_owned(),
                state,
                reason: reason.map(str::to_owned),
            };
            self.push_event(sender, None, &ev, fx)?;
        }
        Ok(())
    }

    fn outq(&mut self, dest: Option<&str>) -> Result<Vec<(u64, OutItem)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT n, item FROM outq WHERE dest IS ?1 ORDER BY n")?;
        let rows = st.query_map([dest], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (n, json) = row?;
            match serde_json::from_str(&json) {
                Ok(item) => out.push((n, item)),
                Err(e) => tracing::error!(n, "unreadable forward-queue item skipped: {e}"),
            }
        }
        Ok(out)
    }

    fn outq_items(&mut self, dest: &str, ns: &[u64]) -> Result<Vec<(u64, OutItem)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT item FROM outq WHERE n = ?1 AND dest = ?2")?;
        let mut out = Vec::with_capacity(ns.len());
        for &n in ns {
            let json: Option<String> = st
                .query_row(params![n as i64, dest], |r| r.get(0))
                .optional()?;
            match json.map(|j| serde_json::from_str(&j)) {
                Some(Ok(item)) => out.push((n, item)),
                Some(Err(e)) => tracing::error!(n, "unreadable forward-queue item skipped: {e}"),
                None => {}
            }
        }
        Ok(out)
    }

    fn outq_route(&mut self, n: u64, dest: &str) -> Result<(), StoreError> {
        let item: Option<String> = self
            .conn
            .prepare_cached("SELECT item FROM outq WHERE n = ?1")?
            .query_row([n as i64], |r| r.get(0))
            .optional()?;
        self.conn
            .prepare_cached("UPDATE outq SET dest = ?2 WHERE n = ?1")?
            .execute(params![n as i64, dest])?;
        if let Some(Ok(OutItem::Deliver(m))) = item.map(|j| serde_json::from_str(&j)) {
            self.conn
                .prepare_cached("UPDATE sent SET dest_home = ?2 WHERE id = ?1")?
                .execute(params![m.id, dest])?;
        }
        Ok(())
    }

    fn outq_dests(&mut self) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT DISTINCT dest FROM outq WHERE dest IS NOT NULL")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn outq_done(&mut self, n: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM outq WHERE n = ?1")?
            .execute([n as i64])?;
        Ok(())
    }

    fn outq_fail(
        &mut self,
        n: u64,
        reason: &str,
        fx: &mut Effects,
    ) -> Result<Option<OutItem>, StoreError> {
        let item: Option<String> = self
            .conn
            .query_row(
                "DELETE FROM outq WHERE n = ?1 RETURNING item",
                [n as i64],
                |r| r.get(0),
            )
            .optional()?;
        let item: Option<OutItem> = item.and_then(|j| serde_json::from_str(&j).ok());
        if let Some(OutItem::Deliver(m)) = &item {
            self.apply_receipt(&m.id, &m.from, None, Delivery::Failed, Some(reason), fx)?;
        }
        Ok(item)
    }

    fn all_devices(&mut self) -> Result<Vec<(String, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT handle, device FROM devices")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn contacts(&mut self, owner: &str) -> Result<Vec<ContactRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT peer, relation, peer_home FROM contacts WHERE owner = ?1 ORDER BY peer",
        )?;
        let rows = st.query_map([owner], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (peer, rel, peer_home) = row?;
            if let Some(relation) = Relation::parse(&rel) {
                out.push(ContactRow {
                    peer,
                    relation,
                    peer_home,
                });
            }
        }
        Ok(out)
    }

    fn contact_op(
        &mut self,
        owner: &str,
        peer: &str,
        op: ContactOp,
        dest: Option<&str>,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        if owner == peer {
            return Err(StoreError::Conflict("that is you".into()));
        }
        let row = self.contact_row(owner, peer)?;
        let cur = row.as_ref().map(|r| r.0);
        let home = row.and_then(|r| r.1);
        let dest = home.as_deref().or(dest);
        match op {
            ContactOp::Add => match cur {
                Some(Relation::Accepted | Relation::Requested) => {}
                Some(Relation::Pending) => {
                    return self.contact_op(owner, peer, ContactOp::Accept, dest, fx);
                }
                None | Some(Relation::Blocked) => {
                    self.set_relation(owner, peer, Some(Relation::Requested), None, fx)?;
                    self.tell_peer(owner, peer, ContactOp::Add, dest, fx)?;
                }
            },
            ContactOp::Accept | ContactOp::Decline => {
                if cur != Some(Relation::Pending) {
                    return Err(StoreError::NotFound(format!(
                        "no contact request from {peer}"
                    )));
                }
                let rel = (op == ContactOp::Accept).then_some(Relation::Accepted);
                self.set_relation(owner, peer, rel, None, fx)?;
                self.tell_peer(owner, peer, op, dest, fx)?;
            }
            ContactOp::Remove => {
                if cur.is_none() {
                    return Err(StoreError::NotFound(format!(
                        "{peer} is not in your contacts"
                    )));
                }
                self.set_relation(owner, peer, None, None, fx)?;
                if cur != Some(Relation::Blocked) {
                    self.tell_peer(owner, peer, ContactOp::Remove, dest, fx)?;
                }
            }
            ContactOp::Block => {
                self.set_relation(owner, peer, Some(Relation::Blocked), None, fx)?;
                if cur.is_some() && cur != Some(Relation::Blocked) {
                    // Seen from the other side, a block is a removal.
                    self.tell_peer(owner, peer, ContactOp::Remove, dest, fx)?;
                }
            }
            ContactOp::Unblock => {
                if cur != Some(Relation::Blocked) {
                    return Err(StoreError::NotFound(format!("{peer} is not blocked")));
                }
                self.set_relation(owner, peer, None, None, fx)?;
            }
        }
        Ok(())
    }

    fn contact_from_peer(
        &mut self,
        from_home: &str,
        from: &str,
        to: &str,
        op: ContactOp,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        if !matches!(
            op,
            ContactOp::Add | ContactOp::Accept | ContactOp::Decline | ContactOp::Remove
        ) || !self.user_exists(to)?
        {
            return Ok(());
        }
        if let Some(answer) = self.apply_incoming(from, Some(from_home), to, op, fx)? {
            let item = OutItem::Contact {
                from: to.to_owned(),
                to: from.to_owned(),
                op: answer,
            };
            self.enqueue(Some(from_home), &item, fx)?;
        }
        Ok(())
    }

    fn visible_to_home(&mut self, home: &str, users: &[String]) -> Result<Vec<String>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT 1 FROM contacts WHERE owner = ?1 AND peer_home = ?2 AND relation = 'accepted' LIMIT 1",
        )?;
        let mut out = Vec::new();
        for u in users {
            if st.exists(params![u, home])? {
                out.push(u.clone());
            }
        }
        Ok(out)
    }

    fn link_contacts(
        &mut self,
        owner: &str,
        peer: &str,
        peer_home: Option<&str>,
    ) -> Result<(), StoreError> {
        if !self.user_exists(owner)? {
            return Err(StoreError::NotFound(format!(
                "no user {owner} on this home"
            )));
        }
        let mut fx = Effects::default();
        self.set_relation(owner, peer, Some(Relation::Accepted), peer_home, &mut fx)?;
        if peer_home.is_none() && self.user_exists(peer)? {
            self.set_relation(peer, owner, Some(Relation::Accepted), None, &mut fx)?;
        }
        Ok(())
    }

    fn prune(&mut self, before: i64) -> Result<usize, StoreError> {
        let sent = self
            .conn
            .execute("DELETE FROM sent WHERE at < ?1", [before])?;
        let received = self
            .conn
            .execute("DELETE FROM received WHERE at < ?1", [before])?;
        Ok(sent + received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use popupd_store::Batchable;

    fn store(name: &str) -> (SqliteHome, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("popupd-home-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = SqliteHome::open(&dir.join("home.sqlite")).unwrap();
        (s, dir)
    }

    fn msg(id: &str, from: &str, to: &str) -> Message {
        Message {
            id: id.into(),
            from: from.into(),
            to: to.into(),
            text: "hi".into(),
            sent_at: 1,
            reply_to: None,
        }
    }

    #[test]
    fn local_message_flows_to_mailbox_then_delivered_then_read() {
        let (mut s, dir) = store("flow");
        s.begin().unwrap();
        for u in ["alice", "bob"] {
            s.add_user(u).unwrap();
            s.add_device(u, "d1", "h").unwrap();
        }
        let mut fx = Effects::default();
        assert_eq!(
            s.accept_send(&msg("m1", "alice", "bob"), None, &mut fx)
                .unwrap(),
            SendOutcome::Accepted
        );
        assert_eq!(
            s.accept_send(&msg("m1", "alice", "bob"), None, &mut fx)
                .unwrap(),
            SendOutcome::Duplicate
        );
        assert!(
            s.accept_send(&msg("m1", "bob", "alice"), None, &mut fx)
                .is_err()
        );
        assert_eq!(fx.pushes.len(), 1);
        assert_eq!(fx.pushes[0].handle, "bob");
        assert_eq!(s.mailbox_after("bob", 0, 10).unwrap().len(), 1);

        let mut fx = Effects::default();
        s.ack("bob", "d1", 1, &mut fx).unwrap();
        assert_eq!(fx.pushes.len(), 1, "alice gets 'delivered'");
        assert_eq!(fx.pushes[0].handle, "alice");
        assert!(fx.pushes[0].event.contains("delivered"));
        assert!(
            s.mailbox_after("bob", 0, 10).unwrap().is_empty(),
            "acked events are pruned"
        );

        let mut fx = Effects::default();
        s.mark_read("bob", "m1", &mut fx).unwrap();
        s.mark_read("bob", "m1", &mut fx).unwrap();
        assert_eq!(fx.pushes.len(), 1, "read once");
        assert!(fx.pushes[0].event.contains("read"));
        s.commit().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn remote_recipient_goes_to_forward_queue_and_failure_reaches_sender() {
        let (mut s, dir) = store("fwd");
        s.begin().unwrap();
        s.add_user("alice").unwrap();
        s.add_device("alice", "d", "h").unwrap();
        let mut fx = Effects::default();
        s.accept_send(&msg("m2", "alice", "zed"), None, &mut fx)
            .unwrap();
        assert_eq!(fx.queued.len(), 1);
        let q = s.outq(None).unwrap();
        assert_eq!(q.len(), 1);
        let mut fx = Effects::default();
        s.outq_fail(q[0].0, "no such user", &mut fx).unwrap();
        assert!(s.outq(None).unwrap().is_empty());
        assert!(fx.pushes[0].event.contains("failed"));
        assert!(fx.pushes[0].event.contains("no such user"));
        s.commit().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_message_with_a_known_route_waits_behind_an_unrouted_one_for_the_same_person() {
        let (mut s, dir) = store("order");
        s.begin().unwrap();
        s.add_user("alice").unwrap();
        let mut fx = Effects::default();
        // The first waits for the router; the second's route is cached.
        s.accept_send(
            &msg("00000000-0000-7000-8000-000000000001", "alice", "bob"),
            None,
            &mut fx,
        )
        .unwrap();
        s.accept_send(
            &msg("00000000-0000-7000-8000-000000000002", "alice", "bob"),
            Some("home-b"),
            &mut fx,
        )
        .unwrap();
        // Another person's route is used at once.
        s.accept_send(
            &msg("00000000-0000-7000-8000-000000000003", "alice", "carol"),
            Some("home-b"),
            &mut fx,
        )
        .unwrap();
        let unrouted: Vec<u64> = s.outq(None).unwrap().into_iter().map(|i| i.0).collect();
        assert_eq!(unrouted.len(), 2, "bob's second message waits too");
        assert_eq!(s.outq(Some("home-b")).unwrap().len(), 1);
        assert_eq!(
            fx.queued.iter().map(|q| q.1.is_some()).collect::<Vec<_>>(),
            [false, false, true]
        );
        s.commit().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_database_of_the_first_schema_is_upgraded_without_loss() {
        let dir = std::env::temp_dir().join(format!("popupd-home-upgrade-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("home.sqlite");
        {
            // As popupd made it before schema versions: version 0.
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch("PRAGMA journal_mode = WAL").unwrap();
            STEPS[0](&c).unwrap();
            let item = serde_json::to_string(&OutItem::Deliver(msg("m1", "alice", "bob"))).unwrap();
            c.execute(
                "INSERT INTO outq(dest, item) VALUES (NULL, ?1), ('home-b', ?1)",
                [item],
            )
            .unwrap();
            c.execute_batch("INSERT INTO users(handle, created_at) VALUES ('alice', 1)")
                .unwrap();
        }
        let mut s = SqliteHome::open(&path).unwrap();
        assert_eq!(s.all_handles().unwrap(), ["alice"]);
        assert_eq!(s.outq(None).unwrap().len(), 1);
        assert_eq!(s.outq(Some("home-b")).unwrap().len(), 1);
        let handles: Vec<String> = s
            .conn
            .prepare("SELECT handle FROM outq ORDER BY n")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(handles, ["bob", "bob"], "each item names its recipient");
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn prune_forgets_old_records_only() {
        let (mut s, dir) = store("prune");
        s.begin().unwrap();
        for u in ["alice", "bob"] {
            s.add_user(u).unwrap();
        }
        let mut fx = Effects::default();
        s.accept_send(&msg("old", "alice", "bob"), None, &mut fx)
            .unwrap();
        assert_eq!(s.prune(0).unwrap(), 0, "nothing is older than the epoch");
        assert_eq!(
            s.prune(now_ms() + 1).unwrap(),
            2,
            "the sent and the received record"
        );
        // After the window, a retry of that id is new again.
        assert_eq!(
            s.accept_send(&msg("old", "alice", "bob"), None, &mut fx)
                .unwrap(),
            SendOutcome::Accepted
        );
        s.commit().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn device_credentials() {
        let (mut s, dir) = store("dev");
        s.begin().unwrap();
        s.add_user("alice").unwrap();
        s.add_device("alice", "d", "good").unwrap();
        assert_eq!(s.check_device("alice", "d", "good").unwrap(), Some(0));
        assert_eq!(s.check_device("alice", "d", "bad").unwrap(), None);
        assert!(s.revoke_device("alice", "d").unwrap());
        assert_eq!(s.check_device("alice", "d", "good").unwrap(), None);
        s.commit().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
