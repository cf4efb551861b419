//! The home's persistence: accounts and devices, each user's mailbox, the
//! records of messages sent and received, the forward queue, and contact
//! lists. Each is a small trait of plain reads and writes, and
//! [`SqliteHome`] implements them all on one SQLite database. What a
//! message, an ack, a receipt or a contact change *means* is not here: the
//! home's rules are `home::rules`, written against these traits, so that
//! another backend is a translation of this file, not of the rules.
//!
//! Each user has a **mailbox**: a numbered sequence of events (messages for
//! them, status news about messages they sent). Each device remembers the
//! highest number it has stored (`acked_seq`); events every device has are
//! deleted. The **forward queue** (`outq`) holds what must go to another
//! home, with the handle it is for and, once known, that person's home.
//! **Contacts** are kept per local user (`owner`), one row per other person
//! (`peer`) with the relation as the owner sees it; `peer_home` remembers
//! which home the peer spoke from.
//!
//! Methods run inside the batcher's transaction; they must not commit.

use popupd_protocol::{Delivery, Relation, now_ms};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use popupd_store::{
    Batchable, Checkpointer, Step, StoreError, Syncer, migrate, open_sqlite, sqlite_begin,
    sqlite_commit, sqlite_job_begin, sqlite_job_end, sqlite_rollback, wal_syncer,
};

/// A row of a contact list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRow {
    pub peer: String,
    pub relation: Relation,
    /// The peer's home, if not this one (and known).
    pub peer_home: Option<String>,
}

/// A user, as `popupd user list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserInfo {
    pub handle: String,
    pub devices: Vec<String>,
    pub created_at: i64,
}

/// The most one user's mailbox may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxCap {
    pub events: u64,
    pub bytes: u64,
}

/// A message one of our users sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRow {
    pub sender: String,
    pub state: Delivery,
    /// The home it was forwarded to, once known.
    pub dest_home: Option<String>,
}

/// A message one of our users received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRow {
    pub sender: String,
    pub recipient: String,
    /// The sender's home, if not this one.
    pub from_home: Option<String>,
    pub delivered: bool,
    pub read: bool,
}

/// Users and their devices.
pub trait Accounts {
    fn user_exists(&mut self, handle: &str) -> Result<bool, StoreError>;
    /// `Conflict` if the handle is taken here.
    fn add_user(&mut self, handle: &str) -> Result<(), StoreError>;
    /// Removes a user with their devices, mailbox and contact rows; false
    /// if there was none.
    fn remove_user(&mut self, handle: &str) -> Result<bool, StoreError>;
    fn list_users(&mut self) -> Result<Vec<UserInfo>, StoreError>;
    fn all_handles(&mut self) -> Result<Vec<String>, StoreError>;
    /// A new device; it starts after the mailbox's events so far.
    /// `NotFound` without the user, `Conflict` if the device exists.
    fn add_device(
        &mut self,
        handle: &str,
        device: &str,
        secret_hash: &str,
    ) -> Result<(), StoreError>;
    fn revoke_device(&mut self, handle: &str, device: &str) -> Result<bool, StoreError>;
    /// The device's acked number if the credential matches.
    fn check_device(
        &mut self,
        handle: &str,
        device: &str,
        secret_hash: &str,
    ) -> Result<Option<u64>, StoreError>;
    /// Every (handle, device) that may log in.
    fn all_devices(&mut self) -> Result<Vec<(String, String)>, StoreError>;
    /// The highest event a device stored; `None` for no such device.
    fn device_acked(&mut self, handle: &str, device: &str) -> Result<Option<u64>, StoreError>;
    fn set_device_acked(&mut self, handle: &str, device: &str, seq: u64) -> Result<(), StoreError>;
}

/// Each user's numbered events.
pub trait Mailbox {
    /// Appends an event (JSON) and returns its number; with a `cap`, only
    /// if the mailbox holds fewer events and bytes than it says (`None`
    /// when it is full).
    fn append(
        &mut self,
        handle: &str,
        msg_id: Option<&str>,
        event_json: &str,
        cap: Option<MailboxCap>,
    ) -> Result<Option<u64>, StoreError>;
    /// The number of the last event given (0: none yet).
    fn last_seq(&mut self, handle: &str) -> Result<u64, StoreError>;
    /// [`Mailbox::last_seq`] of each of `handles` that exists.
    fn last_seqs(&mut self, handles: &[String]) -> Result<Vec<(String, u64)>, StoreError> {
        let mut v = Vec::with_capacity(handles.len());
        for h in handles {
            match self.last_seq(h) {
                Ok(n) => v.push((h.clone(), n)),
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(v)
    }
    /// Up to `limit` events after `after`, oldest first.
    fn mailbox_after(
        &mut self,
        handle: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError>;
    /// The message ids of the events numbered in `(after, upto]`.
    fn message_ids(
        &mut self,
        handle: &str,
        after: u64,
        upto: u64,
    ) -> Result<Vec<String>, StoreError>;
    /// Deletes the events every device of the user has stored.
    fn forget_stored(&mut self, handle: &str) -> Result<(), StoreError>;
}

/// What our users sent: dedup of retries, their state, where they went.
pub trait SentLog {
    fn sent(&mut self, id: &str) -> Result<Option<SentRow>, StoreError>;
    fn record_sent(
        &mut self,
        id: &str,
        sender: &str,
        recipient: &str,
        dest_home: Option<&str>,
    ) -> Result<(), StoreError>;
    fn set_sent_state(&mut self, id: &str, state: Delivery) -> Result<(), StoreError>;
    fn set_sent_home(&mut self, id: &str, dest_home: &str) -> Result<(), StoreError>;
}

/// What our users received: dedup, and who to send receipts to.
pub trait ReceivedLog {
    /// Records a received message; false if its id was known.
    fn record_received(
        &mut self,
        id: &str,
        sender: &str,
        recipient: &str,
        from_home: Option<&str>,
    ) -> Result<bool, StoreError>;
    fn received(&mut self, id: &str) -> Result<Option<ReceivedRow>, StoreError>;
    /// Forgets a received message (it was not kept after all).
    fn forget_received(&mut self, id: &str) -> Result<(), StoreError>;
    fn set_delivered(&mut self, id: &str) -> Result<(), StoreError>;
    /// Read, and so delivered too.
    fn set_read(&mut self, id: &str) -> Result<(), StoreError>;
}

/// What must go to other homes, as JSON items, each with the handle it is
/// for and, once routed, that person's home.
pub trait ForwardQueue {
    /// Queues an item and returns its number.
    fn enqueue(
        &mut self,
        dest: Option<&str>,
        handle: &str,
        item_json: &str,
    ) -> Result<u64, StoreError>;
    /// The items for `handle` that wait for a route, oldest first.
    fn unrouted_for(&mut self, handle: &str) -> Result<Vec<u64>, StoreError>;
    /// Items for `dest` (None: not yet routed), oldest first.
    fn queued(&mut self, dest: Option<&str>) -> Result<Vec<(u64, String)>, StoreError>;
    /// The numbers of the items for `dest`, oldest first.
    fn queued_ns(&mut self, dest: &str) -> Result<Vec<u64>, StoreError>;
    /// Those of items `ns` that go to `dest`, in the order asked.
    fn queued_items(&mut self, dest: &str, ns: &[u64]) -> Result<Vec<(u64, String)>, StoreError>;
    /// Routes item `n`; returns it (None if it is gone).
    fn route(&mut self, n: u64, dest: &str) -> Result<Option<String>, StoreError>;
    /// Homes that have items waiting.
    fn queued_dests(&mut self) -> Result<Vec<String>, StoreError>;
    /// Whether items wait for `dest`.
    fn waiting_for(&mut self, dest: &str) -> Result<bool, StoreError>;
    /// Of the `limit` oldest items, those queued before `before` (ms since
    /// the epoch), oldest first: (n, their home if routed).
    fn queued_before(
        &mut self,
        before: i64,
        limit: usize,
    ) -> Result<Vec<(u64, Option<String>)>, StoreError>;
    /// Removes item `n`; returns it (None if it was gone).
    fn dequeue(&mut self, n: u64) -> Result<Option<String>, StoreError>;
    /// Drops item `n` (the peer took it); false if it was gone.
    fn remove(&mut self, n: u64) -> Result<bool, StoreError>;
}

/// Our users' contact lists.
pub trait ContactBook {
    /// `owner`'s relation with `peer`, and the peer's home if known.
    fn contact(
        &mut self,
        owner: &str,
        peer: &str,
    ) -> Result<Option<(Relation, Option<String>)>, StoreError>;
    /// Sets `owner`'s relation with `peer`; a `peer_home` of `None` keeps
    /// the one on record.
    fn set_contact(
        &mut self,
        owner: &str,
        peer: &str,
        relation: Relation,
        peer_home: Option<&str>,
    ) -> Result<(), StoreError>;
    fn delete_contact(&mut self, owner: &str, peer: &str) -> Result<(), StoreError>;
    /// `owner`'s list.
    fn contacts(&mut self, owner: &str) -> Result<Vec<ContactRow>, StoreError>;
    /// Of `users` (ours), those that accepted at least one user of `home`:
    /// the ones whose presence `home` may see.
    fn visible_to_home(&mut self, home: &str, users: &[String]) -> Result<Vec<String>, StoreError>;
}

/// Everything a home keeps, on one store with group commit.
pub trait HomeStore:
    Batchable + Accounts + Mailbox + SentLog + ReceivedLog + ForwardQueue + ContactBook
{
    /// Forgets sent and received records older than `before` (ms since the
    /// epoch); returns how many went.
    fn prune(&mut self, before: i64) -> Result<usize, StoreError>;

    // Reads the rules make together, in one go. On SQLite a read is a
    // function call and these are the plain reads in turn; on a database
    // server each read is a round trip, which is most of what a message
    // costs there, so it answers them in one statement.

    /// What a new message `id` from `from` to `to` finds: the id's sent
    /// record, and whether `to` is a user here (`None` if not) with their
    /// relation to `from`.
    fn send_check(
        &mut self,
        id: &str,
        from: &str,
        to: &str,
    ) -> Result<(Option<SentRow>, Option<Option<Relation>>), StoreError> {
        let prior = self.sent(id)?;
        let to_here = if self.user_exists(to)? {
            Some(self.contact(to, from)?.map(|c| c.0))
        } else {
            None
        };
        Ok((prior, to_here))
    }

    /// For an ack of `handle`'s `device`: what it had acked, and the
    /// number of the mailbox's last event (`None` without the device).
    fn ack_start(&mut self, handle: &str, device: &str) -> Result<Option<(u64, u64)>, StoreError> {
        let Some(acked) = self.device_acked(handle, device)? else {
            return Ok(None);
        };
        Ok(Some((acked, self.last_seq(handle)?)))
    }

    /// Records a received message whose id is new for certain (its sender
    /// is ours, and the id's sent record was just written), without
    /// waiting to hear so.
    fn record_received_new(
        &mut self,
        id: &str,
        sender: &str,
        recipient: &str,
    ) -> Result<(), StoreError> {
        self.record_received(id, sender, recipient, None)?;
        Ok(())
    }

    /// The messages numbered in `(after, upto]` of `handle`'s mailbox, in
    /// order, that this home received: each with its received record and,
    /// if it is not yet delivered and its sender is ours, its sent record
    /// and whether the sender is still a user here.
    fn acked_messages(
        &mut self,
        handle: &str,
        after: u64,
        upto: u64,
    ) -> Result<Vec<AckedMessage>, StoreError> {
        let mut v = Vec::new();
        for id in self.message_ids(handle, after, upto)? {
            let Some(received) = self.received(&id)? else {
                continue;
            };
            let (sent, sender_here) = if !received.delivered && received.from_home.is_none() {
                (self.sent(&id)?, self.user_exists(&received.sender)?)
            } else {
                (None, false)
            };
            v.push(AckedMessage {
                id,
                received,
                sent,
                sender_here,
            });
        }
        Ok(v)
    }
}

/// A message an ack covers (see [`HomeStore::acked_messages`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedMessage {
    pub id: String,
    pub received: ReceivedRow,
    /// Read only for a message not yet delivered, from one of our users.
    pub sent: Option<SentRow>,
    pub sender_here: bool,
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
    /// Pages were given back since the last full checkpoint.
    shrunk: bool,
    /// Since when no batch committed (set by the first idle call after one).
    quiet_since: Option<std::time::Instant>,
}

impl Batchable for SqliteHome {
    fn begin(&mut self) -> Result<(), StoreError> {
        sqlite_begin(&self.conn)
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        sqlite_commit(&self.conn)?;
        self.checkpoints.committed(&self.conn);
        self.quiet_since = None;
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
    fn idle(&mut self) -> Option<std::time::Duration> {
        self.checkpoints.idle(&self.conn);
        self.reclaim()
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
            // Every kind of item names its recipient in `to`.
            let item: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
            if let Some(to) = item.get("to").and_then(|t| t.as_str()) {
                st.execute(params![n, to])?;
            }
        }
        Ok(())
    },
    // Mailbox sizes kept with each user, for the quota; when each queued
    // item was queued, for its expiry (items already queued count from
    // now).
    |c| {
        c.execute_batch(
            "ALTER TABLE users ADD COLUMN mailbox_count INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE users ADD COLUMN mailbox_bytes INTEGER NOT NULL DEFAULT 0;
             UPDATE users SET
                mailbox_count = (SELECT count(*) FROM mailbox WHERE mailbox.handle = users.handle),
                mailbox_bytes = (SELECT coalesce(sum(length(CAST(event AS BLOB))), 0) FROM mailbox WHERE mailbox.handle = users.handle);
             ALTER TABLE outq ADD COLUMN at INTEGER NOT NULL DEFAULT 0;
             CREATE INDEX outq_at ON outq(at);",
        )?;
        c.execute("UPDATE outq SET at = ?1", [now_ms()])?;
        Ok(())
    },
    // The items still waiting for the router, by recipient: every new item
    // with a known route first looks for earlier ones for the same person
    // (`ForwardQueue::unrouted_for`). Through `outq_dest` that look read
    // every unrouted item, for each new one: a quarter of the store
    // thread's time while the router lagged in a flood to another home.
    |c| Ok(c.execute_batch("CREATE INDEX outq_unrouted ON outq(handle, n) WHERE dest IS NULL;")?),
    // Expiry reads the oldest items by number, which is queue order (see
    // `queued_before`): an index by time cost every item an insert and a
    // delete more, a sixth of the forward queue's writes.
    |c| Ok(c.execute_batch("DROP INDEX IF EXISTS outq_at;")?),
];

/// Free pages (16 MB of 4 KB pages) past which the writer gives space back
/// to the file system, when no job waits; steady traffic frees far fewer.
const RECLAIM_FROM: i64 = 4096;
/// Pages given back in one step (8 MB), and the pause between steps: a job
/// that comes meanwhile waits for one step at most.
const RECLAIM_STEP: u32 = 2048;
const RECLAIM_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);
/// How long the home must have been quiet before the truncating checkpoint.
const RECLAIM_QUIET: std::time::Duration = std::time::Duration::from_secs(1);

impl SqliteHome {
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let conn = open_sqlite(path)?;
        migrate(&conn, path, STEPS)?;
        // Pages freed by delivered messages go back to the file system
        // (`Batchable::idle` below); a database made before needs one
        // VACUUM to allow that.
        let av: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        if av != 2 {
            tracing::info!(file = %path.display(), "making the database give space back (one VACUUM)");
            conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
        }
        // No `journal_size_limit`: cutting the log back after every
        // checkpoint costs the writer a truncate and a regrow under steady
        // load (docs/performance.md, "Why it is fast", item 19); the idle
        // upkeep's truncating checkpoint empties it once all is quiet.
        conn.execute_batch("PRAGMA synchronous = NORMAL;")?;
        let checkpoints = Checkpointer::spawn(&conn, path)?;
        Ok(SqliteHome {
            conn,
            checkpoints,
            path: path.to_owned(),
            shrunk: false,
            quiet_since: None,
        })
    }

    /// Gives free pages back to the file system once many are free (a
    /// backlog was read), one step of [`RECLAIM_STEP`] pages when no job
    /// waits, and says how soon to take the next. After the last step, and
    /// once the home has been quiet for [`RECLAIM_QUIET`], one full
    /// checkpoint truncates the database file and the log. The pages that
    /// steady traffic frees are left alone: new messages take them again.
    fn reclaim(&mut self) -> Option<std::time::Duration> {
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .unwrap_or(0);
        if free > RECLAIM_FROM {
            // The pragma gives back one page per step of its statement, so
            // it is stepped to the end (`execute_batch` steps it once).
            let r = self
                .conn
                .prepare_cached(&format!("PRAGMA incremental_vacuum({RECLAIM_STEP})"))
                .and_then(|mut st| {
                    let mut rows = st.query([])?;
                    while rows.next()?.is_some() {}
                    Ok(())
                });
            self.checkpoints.committed(&self.conn);
            if let Err(e) = r {
                tracing::warn!("giving free space back: {e}");
                return None;
            }
            self.shrunk = true;
            self.quiet_since = None;
            return Some(RECLAIM_PAUSE);
        }
        if !self.shrunk {
            return None;
        }
        // The file shrinks only once the whole log is copied into it, which
        // holds up the jobs that come meanwhile: only when all is quiet.
        let quiet = self
            .quiet_since
            .get_or_insert_with(std::time::Instant::now)
            .elapsed();
        if quiet < RECLAIM_QUIET {
            return Some(RECLAIM_QUIET - quiet);
        }
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            }) {
            Ok(0) => self.shrunk = false,
            // The checkpoint thread was at it: again in a moment.
            Ok(_) => return Some(RECLAIM_QUIET),
            Err(e) => {
                self.shrunk = false;
                tracing::warn!("giving free space back (checkpoint): {e}");
            }
        }
        None
    }
}

impl Accounts for SqliteHome {
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

    fn all_devices(&mut self) -> Result<Vec<(String, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT handle, device FROM devices")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn device_acked(&mut self, handle: &str, device: &str) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = self
            .conn
            .prepare_cached("SELECT acked_seq FROM devices WHERE handle = ?1 AND device = ?2")?
            .query_row(params![handle, device], |r| r.get(0))
            .optional()?;
        Ok(v.map(|v| v as u64))
    }

    fn set_device_acked(&mut self, handle: &str, device: &str, seq: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE devices SET acked_seq = ?3 WHERE handle = ?1 AND device = ?2")?
            .execute(params![handle, device, seq as i64])?;
        Ok(())
    }
}

impl Mailbox for SqliteHome {
    fn append(
        &mut self,
        handle: &str,
        msg_id: Option<&str>,
        event_json: &str,
        cap: Option<MailboxCap>,
    ) -> Result<Option<u64>, StoreError> {
        // No RETURNING or `IN (SELECT …)` on the message path: SQLite
        // builds those in an ephemeral table, a fresh page cache each time,
        // and the malloc/trim/page-fault churn that causes costs much of the
        // home's CPU under load (docs/performance.md).
        let (seq, count, bytes): (i64, i64, i64) = self
            .conn
            .prepare_cached(
                "SELECT next_seq, mailbox_count, mailbox_bytes FROM users WHERE handle = ?1",
            )?
            .query_row([handle], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let size = event_json.len() as i64;
        if let Some(cap) = cap
            && (count as u64 >= cap.events || (bytes + size) as u64 > cap.bytes)
        {
            return Ok(None);
        }
        self.conn
            .prepare_cached(
                "UPDATE users SET next_seq = ?2, mailbox_count = mailbox_count + 1,
                    mailbox_bytes = mailbox_bytes + ?3 WHERE handle = ?1",
            )?
            .execute(params![handle, seq + 1, size])?;
        self.conn
            .prepare_cached(
                "INSERT INTO mailbox(handle, seq, msg_id, event) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![handle, seq, msg_id, event_json])?;
        Ok(Some(seq as u64))
    }

    fn last_seq(&mut self, handle: &str) -> Result<u64, StoreError> {
        let next: i64 = self
            .conn
            .prepare_cached("SELECT next_seq FROM users WHERE handle = ?1")?
            .query_row([handle], |r| r.get(0))?;
        Ok((next - 1) as u64)
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

    fn message_ids(
        &mut self,
        handle: &str,
        after: u64,
        upto: u64,
    ) -> Result<Vec<String>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT msg_id FROM mailbox
             WHERE handle = ?1 AND seq > ?2 AND seq <= ?3 AND msg_id IS NOT NULL",
        )?;
        let rows = st.query_map(params![handle, after as i64, upto as i64], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn forget_stored(&mut self, handle: &str) -> Result<(), StoreError> {
        let Some(upto): Option<i64> = self
            .conn
            .prepare_cached("SELECT min(acked_seq) FROM devices WHERE handle = ?1")?
            .query_row([handle], |r| r.get(0))?
        else {
            return Ok(());
        };
        // What goes is counted on its way out and the counters move by that
        // much: counting what is left would read a whole backlog per ack.
        let (n, bytes): (i64, i64) = self
            .conn
            .prepare_cached(
                "SELECT count(*), coalesce(sum(length(CAST(event AS BLOB))), 0)
                 FROM mailbox WHERE handle = ?1 AND seq <= ?2",
            )?
            .query_row(params![handle, upto], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if n == 0 {
            return Ok(());
        }
        self.conn
            .prepare_cached("DELETE FROM mailbox WHERE handle = ?1 AND seq <= ?2")?
            .execute(params![handle, upto])?;
        self.conn
            .prepare_cached(
                "UPDATE users SET mailbox_count = max(mailbox_count - ?2, 0),
                    mailbox_bytes = max(mailbox_bytes - ?3, 0)
                 WHERE handle = ?1",
            )?
            .execute(params![handle, n, bytes])?;
        Ok(())
    }
}

impl SentLog for SqliteHome {
    fn sent(&mut self, id: &str) -> Result<Option<SentRow>, StoreError> {
        let row: Option<(String, String, Option<String>)> = self
            .conn
            .prepare_cached("SELECT sender, state, dest_home FROM sent WHERE id = ?1")?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        Ok(row.and_then(|(sender, state, dest_home)| {
            Some(SentRow {
                sender,
                state: Delivery::parse(&state)?,
                dest_home,
            })
        }))
    }

    fn record_sent(
        &mut self,
        id: &str,
        sender: &str,
        recipient: &str,
        dest_home: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO sent(id, sender, recipient, state, at, dest_home)
                 VALUES (?1, ?2, ?3, 'accepted', ?4, ?5)",
            )?
            .execute(params![id, sender, recipient, now_ms(), dest_home])?;
        Ok(())
    }

    fn set_sent_state(&mut self, id: &str, state: Delivery) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE sent SET state = ?2 WHERE id = ?1")?
            .execute(params![id, state.as_str()])?;
        Ok(())
    }

    fn set_sent_home(&mut self, id: &str, dest_home: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE sent SET dest_home = ?2 WHERE id = ?1")?
            .execute(params![id, dest_home])?;
        Ok(())
    }
}

impl ReceivedLog for SqliteHome {
    fn record_received(
        &mut self,
        id: &str,
        sender: &str,
        recipient: &str,
        from_home: Option<&str>,
    ) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO received(id, sender, recipient, from_home, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![id, sender, recipient, from_home, now_ms()])?
            == 1)
    }

    fn received(&mut self, id: &str) -> Result<Option<ReceivedRow>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT sender, recipient, from_home, delivered, read FROM received WHERE id = ?1",
            )?
            .query_row([id], |r| {
                Ok(ReceivedRow {
                    sender: r.get(0)?,
                    recipient: r.get(1)?,
                    from_home: r.get(2)?,
                    delivered: r.get(3)?,
                    read: r.get(4)?,
                })
            })
            .optional()?)
    }

    fn forget_received(&mut self, id: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM received WHERE id = ?1")?
            .execute([id])?;
        Ok(())
    }

    fn set_delivered(&mut self, id: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE received SET delivered = 1 WHERE id = ?1")?
            .execute([id])?;
        Ok(())
    }

    fn set_read(&mut self, id: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE received SET read = 1, delivered = 1 WHERE id = ?1")?
            .execute([id])?;
        Ok(())
    }
}

impl ForwardQueue for SqliteHome {
    fn enqueue(
        &mut self,
        dest: Option<&str>,
        handle: &str,
        item_json: &str,
    ) -> Result<u64, StoreError> {
        self.conn
            .prepare_cached("INSERT INTO outq(dest, handle, item, at) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![dest, handle, item_json, now_ms()])?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn queued_before(
        &mut self,
        before: i64,
        limit: usize,
    ) -> Result<Vec<(u64, Option<String>)>, StoreError> {
        // Items are numbered as they are queued, each stamped with the
        // time then, so the oldest by number are the oldest: the first
        // `limit` by number, of which those old enough. (After the clock
        // went back, an item waits until the ones before it are due.)
        let mut st = self.conn.prepare_cached(
            "SELECT n, dest FROM (SELECT n, dest, at FROM outq ORDER BY n LIMIT ?2) WHERE at < ?1",
        )?;
        let rows = st.query_map(params![before, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn unrouted_for(&mut self, handle: &str) -> Result<Vec<u64>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT n FROM outq WHERE dest IS NULL AND handle = ?1 ORDER BY n")?;
        let rows = st.query_map([handle], |r| Ok(r.get::<_, i64>(0)? as u64))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn queued(&mut self, dest: Option<&str>) -> Result<Vec<(u64, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT n, item FROM outq WHERE dest IS ?1 ORDER BY n")?;
        let rows = st.query_map([dest], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn queued_ns(&mut self, dest: &str) -> Result<Vec<u64>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT n FROM outq WHERE dest = ?1 ORDER BY n")?;
        let rows = st.query_map([dest], |r| Ok(r.get::<_, i64>(0)? as u64))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn queued_items(&mut self, dest: &str, ns: &[u64]) -> Result<Vec<(u64, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT item FROM outq WHERE n = ?1 AND dest = ?2")?;
        let mut out = Vec::with_capacity(ns.len());
        for &n in ns {
            if let Some(json) = st
                .query_row(params![n as i64, dest], |r| r.get(0))
                .optional()?
            {
                out.push((n, json));
            }
        }
        Ok(out)
    }

    fn route(&mut self, n: u64, dest: &str) -> Result<Option<String>, StoreError> {
        let item: Option<String> = self
            .conn
            .prepare_cached("SELECT item FROM outq WHERE n = ?1")?
            .query_row([n as i64], |r| r.get(0))
            .optional()?;
        self.conn
            .prepare_cached("UPDATE outq SET dest = ?2 WHERE n = ?1")?
            .execute(params![n as i64, dest])?;
        Ok(item)
    }

    fn queued_dests(&mut self) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT DISTINCT dest FROM outq WHERE dest IS NOT NULL")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn waiting_for(&mut self, dest: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM outq WHERE dest = ?1 LIMIT 1")?
            .exists([dest])?)
    }

    fn dequeue(&mut self, n: u64) -> Result<Option<String>, StoreError> {
        let item: Option<String> = self
            .conn
            .prepare_cached("SELECT item FROM outq WHERE n = ?1")?
            .query_row([n as i64], |r| r.get(0))
            .optional()?;
        if item.is_some() {
            self.conn
                .prepare_cached("DELETE FROM outq WHERE n = ?1")?
                .execute([n as i64])?;
        }
        Ok(item)
    }

    fn remove(&mut self, n: u64) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("DELETE FROM outq WHERE n = ?1")?
            .execute([n as i64])?
            > 0)
    }
}

impl ContactBook for SqliteHome {
    fn contact(
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

    fn set_contact(
        &mut self,
        owner: &str,
        peer: &str,
        relation: Relation,
        peer_home: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO contacts(owner, peer, relation, peer_home, at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(owner, peer) DO UPDATE SET relation = ?3,
                    peer_home = coalesce(?4, peer_home), at = ?5",
            )?
            .execute(params![owner, peer, relation.as_str(), peer_home, now_ms()])?;
        Ok(())
    }

    fn delete_contact(&mut self, owner: &str, peer: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM contacts WHERE owner = ?1 AND peer = ?2")?
            .execute(params![owner, peer])?;
        Ok(())
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
}

impl HomeStore for SqliteHome {
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
            let item =
                r#"{"kind":"deliver","id":"m1","from":"alice","to":"bob","text":"hi","sent_at":1}"#;
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
        assert_eq!(s.queued(None).unwrap().len(), 1);
        assert_eq!(s.queued(Some("home-b")).unwrap().len(), 1);
        assert_eq!(
            s.unrouted_for("bob").unwrap().len(),
            1,
            "each item names its recipient"
        );
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Every new item with a known route asks for the earlier unrouted
    /// ones for its recipient: the answer must come from an index of those
    /// alone, not from a walk through every unrouted item.
    #[test]
    fn unrouted_items_of_one_person_are_found_by_index() {
        let dir = std::env::temp_dir().join(format!("popupd-home-unrouted-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = SqliteHome::open(&dir.join("home.sqlite")).unwrap();
        let plan: String = s
            .conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT n FROM outq WHERE dest IS NULL AND handle = ?1 ORDER BY n",
                ["bob"],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("outq_unrouted"), "query plan: {plan}");
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Expiry takes the oldest items first, only those old enough, at
    /// most `limit`, and the index by time is gone.
    #[test]
    fn expiry_takes_the_oldest_items_old_enough() {
        let dir = std::env::temp_dir().join(format!("popupd-home-expiry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = SqliteHome::open(&dir.join("home.sqlite")).unwrap();
        s.begin().unwrap();
        let ns: Vec<u64> = (0..5)
            .map(|i| {
                s.enqueue((i % 2 == 0).then_some("home-b"), "bob", "{}")
                    .unwrap()
            })
            .collect();
        // Queued at 1000, 2000, ... 5000 ms.
        for (i, n) in ns.iter().enumerate() {
            s.conn
                .execute(
                    "UPDATE outq SET at = ?2 WHERE n = ?1",
                    params![*n as i64, (i as i64 + 1) * 1000],
                )
                .unwrap();
        }
        s.commit().unwrap();
        let old = s.queued_before(3500, 10).unwrap();
        assert_eq!(
            old,
            [
                (ns[0], Some("home-b".into())),
                (ns[1], None),
                (ns[2], Some("home-b".into()))
            ]
        );
        assert_eq!(
            s.queued_before(3500, 2).unwrap().len(),
            2,
            "at most the limit"
        );
        assert!(
            s.queued_before(500, 10).unwrap().is_empty(),
            "none old enough"
        );
        let indexes: i64 = s
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'outq_at'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 0);
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn device_credentials() {
        let dir = std::env::temp_dir().join(format!("popupd-home-dev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = SqliteHome::open(&dir.join("home.sqlite")).unwrap();
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

    /// 60 MB of acked mail: the idle upkeep gives it back to the file
    /// system, the database and its log both, in steps, and then rests.
    #[test]
    fn acked_mail_gives_its_disk_space_back() {
        let dir = std::env::temp_dir().join(format!("popupd-home-reclaim-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("home.sqlite");
        let mut s = SqliteHome::open(&path).unwrap();
        let size = || -> u64 {
            ["", "-wal"]
                .iter()
                .map(|x| {
                    let mut p = path.clone().into_os_string();
                    p.push(x);
                    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
                })
                .sum()
        };
        s.begin().unwrap();
        s.add_user("bob").unwrap();
        s.add_device("bob", "d", "secret").unwrap();
        s.commit().unwrap();
        let event = format!("{{\"text\":\"{}\"}}", "x".repeat(15_000));
        for _ in 0..40 {
            s.begin().unwrap();
            for _ in 0..100 {
                s.append("bob", None, &event, None).unwrap();
            }
            s.commit().unwrap();
        }
        let full = size();
        assert!(full > 60 << 20, "{full} bytes stored");
        s.begin().unwrap();
        s.set_device_acked("bob", "d", 4000).unwrap();
        s.forget_stored("bob").unwrap();
        s.commit().unwrap();
        // Steps until the upkeep says it is done; each at most a few.
        let mut steps = 0;
        while let Some(after) = s.idle() {
            steps += 1;
            assert!(steps < 1000, "the upkeep never ends");
            std::thread::sleep(after);
        }
        let left = size();
        assert!(left < 20 << 20, "{left} bytes left of {full}");
        assert!(steps > 1, "given back in one go ({steps} steps)");
        assert_eq!(s.idle(), None, "it rests once done");
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
