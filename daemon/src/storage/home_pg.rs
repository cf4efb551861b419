//! [`HomeStore`] on PostgreSQL: the same records as [`super::home`]'s
//! `SqliteHome`, on the same [`Batcher`](popupd_store::Batcher) store
//! thread, so a batch of jobs is one PostgreSQL transaction (a savepoint
//! each) with one commit.
//!
//! Statements are written to stay right when several home nodes share the
//! database (issue 17's next step): a mailbox number is taken by one
//! `UPDATE … RETURNING` on the user's row, which PostgreSQL locks until
//! the commit, so each user's mailbox stays ordered whoever appends;
//! receipts and ids are deduplicated by primary keys (`ON CONFLICT DO
//! NOTHING`). Ordering by handle uses the "C" collation, as SQLite's
//! byte order does.

use std::collections::{HashMap, HashSet};

use popupd_protocol::{Delivery, Relation, now_ms};
use popupd_store::pg::postgres::Row;
use popupd_store::pg::postgres::types::ToSql;
use popupd_store::pg::{PgBatch, PgConn, PgStep, PgTarget, connect, pg_migrate};
use popupd_store::{Batchable, StoreError};

use super::home::{
    Accounts, AckedMessage, ContactBook, ContactRow, ForwardQueue, HomeStore, Mailbox, MailboxCap,
    ReceivedLog, ReceivedRow, SentLog, SentRow, UserInfo,
};

/// The home's schema on PostgreSQL, one step per version (never edit one:
/// add a step).
const STEPS: &[PgStep] = &["
CREATE TABLE users(
    handle TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    next_seq BIGINT NOT NULL DEFAULT 1,
    mailbox_count BIGINT NOT NULL DEFAULT 0,
    mailbox_bytes BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE devices(
    handle TEXT NOT NULL REFERENCES users(handle) ON DELETE CASCADE,
    device TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    acked_seq BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY(handle, device)
);
CREATE TABLE mailbox(
    handle TEXT NOT NULL,
    seq BIGINT NOT NULL,
    msg_id TEXT,
    event TEXT NOT NULL,
    PRIMARY KEY(handle, seq)
);
CREATE TABLE sent(
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    state TEXT NOT NULL,
    at BIGINT NOT NULL,
    dest_home TEXT
);
CREATE INDEX sent_at ON sent(at);
CREATE TABLE received(
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    from_home TEXT,
    delivered BOOLEAN NOT NULL DEFAULT false,
    read BOOLEAN NOT NULL DEFAULT false,
    at BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX received_at ON received(at);
CREATE TABLE outq(
    n BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dest TEXT,
    handle TEXT,
    item TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX outq_dest ON outq(dest, n);
CREATE INDEX outq_unrouted ON outq(handle, n) WHERE dest IS NULL;
CREATE TABLE contacts(
    owner TEXT NOT NULL REFERENCES users(handle) ON DELETE CASCADE,
    peer TEXT NOT NULL,
    relation TEXT NOT NULL,
    peer_home TEXT,
    at BIGINT NOT NULL,
    PRIMARY KEY(owner, peer)
);
CREATE INDEX contacts_peer_home ON contacts(owner, peer_home, relation);
"];

/// [`HomeStore`] on PostgreSQL. Make, use and drop it off any Tokio
/// runtime ([`popupd_store::pg::off_runtime`], or the store thread).
pub struct PgHome {
    target: PgTarget,
    conn: PgConn,
    batch: PgBatch,
    /// Other processes write the same rows (the nodes of one home): each
    /// batch takes the home's write lock first (see [`Batchable::begin`]).
    shared: bool,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl PgHome {
    /// Connects, and brings the schema up to date; the tables are home
    /// `name`'s (another home's database is refused).
    /// `shared`: other processes (the other nodes of this home) write the
    /// same database.
    pub fn open(target: &PgTarget, name: &str, shared: bool) -> Result<Self, StoreError> {
        let mut conn = connect(target, "popupd home")?;
        pg_migrate(&mut conn, target, "home", name, STEPS)?;
        Ok(PgHome {
            target: target.clone(),
            conn,
            batch: PgBatch::default(),
            shared,
        })
    }

    fn reconnect(&mut self) -> Result<(), StoreError> {
        self.conn = connect(&self.target, "popupd home")?;
        self.batch.reset();
        tracing::info!(database = %self.target.describe(), "storage: connected to the database again");
        Ok(())
    }

    fn rows(&mut self, sql: &'static str, p: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let r = self.conn.query(sql, p);
        self.batch.watch(r)
    }

    fn row(&mut self, sql: &'static str, p: Params<'_>) -> Result<Option<Row>, StoreError> {
        let r = self.conn.query_opt(sql, p);
        self.batch.watch(r)
    }

    /// A write whose answer nothing needs: sent without waiting (a
    /// failure shows at the next statement waited for, or the job's end).
    fn send(&mut self, sql: &'static str, p: Params<'_>) -> Result<(), StoreError> {
        let r = self.conn.send(sql, p);
        self.batch.watch(r)
    }

    fn exec(&mut self, sql: &'static str, p: Params<'_>) -> Result<u64, StoreError> {
        let r = self.conn.execute(sql, p);
        self.batch.watch(r)
    }
}

/// The advisory lock a node's batch holds (`pg_advisory_xact_lock`): its
/// number is "popupd" in ASCII.
const WRITE_LOCK: i64 = 0x706f_7075_7064;

fn no_user(handle: &str) -> StoreError {
    StoreError::Db(format!("no user {handle} on this home"))
}

impl Batchable for PgHome {
    /// On a home of several nodes, a batch first takes the home's write
    /// lock, so the nodes' batches run one at a time. A batch holds the
    /// rows of many users until it commits, taken in the order its jobs
    /// come; two nodes' batches that took two rows in opposite orders would
    /// each wait for the other until PostgreSQL's deadlock check (a second)
    /// undid one, and that job's sender would have to send it again. One at
    /// a time, no batch ever waits for a row. What it costs is little: the
    /// database does the batches' work one after the other either way (most
    /// of it on the same users' rows), and a node that waits gathers a
    /// bigger batch meanwhile. What the nodes share out is what is not the
    /// database's: TLS, sessions, and the fan-out.
    fn begin(&mut self) -> Result<(), StoreError> {
        if self.conn.is_closed() {
            self.reconnect()?;
        }
        let lock = self.shared.then_some(WRITE_LOCK);
        match self.batch.begin(&mut self.conn, lock) {
            // The server restarted (or the link dropped) since the last
            // batch: the old connection is gone, a new one may work.
            Err(StoreError::Unavailable(_)) | Err(StoreError::Db(_)) if self.conn.is_closed() => {
                self.reconnect()?;
                self.batch.begin(&mut self.conn, lock)
            }
            r => r,
        }
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        self.batch.commit(&mut self.conn)
    }
    fn rollback(&mut self) {
        self.batch.rollback(&mut self.conn)
    }
    fn job_begin(&mut self) -> Result<(), StoreError> {
        self.batch.job_begin(&mut self.conn)
    }
    fn job_end(&mut self, ok: bool) -> Result<(), StoreError> {
        self.batch.job_end(&mut self.conn, ok)
    }
    fn max_batch(&self) -> usize {
        popupd_store::pg::MAX_BATCH
    }
}

impl Accounts for PgHome {
    fn user_exists(&mut self, handle: &str) -> Result<bool, StoreError> {
        Ok(self
            .row("SELECT 1 FROM users WHERE handle = $1", &[&handle])?
            .is_some())
    }

    fn add_user(&mut self, handle: &str) -> Result<(), StoreError> {
        if self.user_exists(handle)? {
            return Err(StoreError::Conflict(format!(
                "user {handle} already exists on this home"
            )));
        }
        self.exec(
            "INSERT INTO users(handle, created_at) VALUES ($1, $2)",
            &[&handle, &now_ms()],
        )?;
        Ok(())
    }

    fn remove_user(&mut self, handle: &str) -> Result<bool, StoreError> {
        self.send("DELETE FROM mailbox WHERE handle = $1", &[&handle])?;
        self.send(
            "DELETE FROM contacts WHERE owner = $1 OR peer = $1",
            &[&handle],
        )?;
        Ok(self.exec("DELETE FROM users WHERE handle = $1", &[&handle])? == 1)
    }

    fn list_users(&mut self) -> Result<Vec<UserInfo>, StoreError> {
        let rows = self.rows(
            "SELECT u.handle, u.created_at, string_agg(d.device, ' ' ORDER BY d.device COLLATE \"C\")
             FROM users u LEFT JOIN devices d ON d.handle = u.handle
             GROUP BY u.handle, u.created_at ORDER BY u.handle COLLATE \"C\"",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| UserInfo {
                handle: r.get(0),
                created_at: r.get(1),
                devices: r
                    .get::<_, Option<String>>(2)
                    .map(|d| d.split(' ').map(str::to_owned).collect())
                    .unwrap_or_default(),
            })
            .collect())
    }

    fn all_handles(&mut self) -> Result<Vec<String>, StoreError> {
        let rows = self.rows(
            "SELECT handle FROM users ORDER BY handle COLLATE \"C\"",
            &[],
        )?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn add_device(
        &mut self,
        handle: &str,
        device: &str,
        secret_hash: &str,
    ) -> Result<(), StoreError> {
        let Some(next) = self.row("SELECT next_seq FROM users WHERE handle = $1", &[&handle])?
        else {
            return Err(StoreError::NotFound(format!(
                "no user {handle} on this home"
            )));
        };
        let acked: i64 = next.get::<_, i64>(0) - 1;
        let n = self.exec(
            "INSERT INTO devices(handle, device, secret_hash, acked_seq, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&handle, &device, &secret_hash, &acked, &now_ms()],
        )?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "{handle} already has a device {device}"
            )));
        }
        Ok(())
    }

    fn revoke_device(&mut self, handle: &str, device: &str) -> Result<bool, StoreError> {
        Ok(self.exec(
            "DELETE FROM devices WHERE handle = $1 AND device = $2",
            &[&handle, &device],
        )? == 1)
    }

    fn check_device(
        &mut self,
        handle: &str,
        device: &str,
        secret_hash: &str,
    ) -> Result<Option<u64>, StoreError> {
        let row = self.row(
            "SELECT secret_hash, acked_seq FROM devices WHERE handle = $1 AND device = $2",
            &[&handle, &device],
        )?;
        Ok(row.and_then(|r| {
            // Both sides are hex digests of the same length; comparing them
            // leaks nothing about the secret itself.
            (r.get::<_, &str>(0) == secret_hash).then(|| r.get::<_, i64>(1) as u64)
        }))
    }

    fn all_devices(&mut self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self.rows("SELECT handle, device FROM devices", &[])?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn device_acked(&mut self, handle: &str, device: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .row(
                "SELECT acked_seq FROM devices WHERE handle = $1 AND device = $2",
                &[&handle, &device],
            )?
            .map(|r| r.get::<_, i64>(0) as u64))
    }

    fn set_device_acked(&mut self, handle: &str, device: &str, seq: u64) -> Result<(), StoreError> {
        self.send(
            "UPDATE devices SET acked_seq = $3 WHERE handle = $1 AND device = $2",
            &[&handle, &device, &(seq as i64)],
        )?;
        Ok(())
    }
}

impl Mailbox for PgHome {
    fn append(
        &mut self,
        handle: &str,
        msg_id: Option<&str>,
        event_json: &str,
        cap: Option<MailboxCap>,
    ) -> Result<Option<u64>, StoreError> {
        let size = event_json.len() as i64;
        let (events, bytes) = match cap {
            Some(c) => (
                Some(c.events.min(i64::MAX as u64) as i64),
                Some(c.bytes.min(i64::MAX as u64) as i64),
            ),
            None => (None, None),
        };
        // The number is taken on the user's row, locked until the commit;
        // the event goes in with it, in the same statement.
        let taken = self.row(
            "WITH t AS (
                UPDATE users SET next_seq = next_seq + 1, mailbox_count = mailbox_count + 1,
                    mailbox_bytes = mailbox_bytes + $2
                WHERE handle = $1
                  AND ($3::BIGINT IS NULL OR (mailbox_count < $3 AND mailbox_bytes + $2 <= $4::BIGINT))
                RETURNING next_seq - 1 AS seq
             )
             INSERT INTO mailbox(handle, seq, msg_id, event) SELECT $1, seq, $5, $6 FROM t
             RETURNING seq",
            &[&handle, &size, &events, &bytes, &msg_id, &event_json],
        )?;
        let Some(taken) = taken else {
            // Full, or no such user.
            return if self.user_exists(handle)? {
                Ok(None)
            } else {
                Err(no_user(handle))
            };
        };
        let seq: i64 = taken.get(0);
        Ok(Some(seq as u64))
    }

    fn last_seq(&mut self, handle: &str) -> Result<u64, StoreError> {
        let row = self
            .row("SELECT next_seq FROM users WHERE handle = $1", &[&handle])?
            .ok_or_else(|| no_user(handle))?;
        Ok((row.get::<_, i64>(0) - 1) as u64)
    }

    fn last_seqs(&mut self, handles: &[String]) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self.rows(
            "SELECT handle, next_seq - 1 FROM users WHERE handle = ANY($1)",
            &[&handles],
        )?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    fn mailbox_after(
        &mut self,
        handle: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let rows = self.rows(
            "SELECT seq, event FROM mailbox WHERE handle = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            &[&handle, &(after as i64), &(limit as i64)],
        )?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
            .collect())
    }

    fn message_ids(
        &mut self,
        handle: &str,
        after: u64,
        upto: u64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = self.rows(
            "SELECT msg_id FROM mailbox
             WHERE handle = $1 AND seq > $2 AND seq <= $3 AND msg_id IS NOT NULL ORDER BY seq",
            &[&handle, &(after as i64), &(upto as i64)],
        )?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn forget_stored(&mut self, handle: &str) -> Result<(), StoreError> {
        // One round trip: what every device has goes, and the counters
        // move by what went.
        self.send(
            "WITH gone AS (
                DELETE FROM mailbox WHERE handle = $1
                  AND seq <= (SELECT min(acked_seq) FROM devices WHERE handle = $1)
                RETURNING octet_length(event) AS b
             )
             UPDATE users SET
                mailbox_count = greatest(mailbox_count - (SELECT count(*) FROM gone), 0),
                mailbox_bytes = greatest(mailbox_bytes - (SELECT coalesce(sum(b), 0) FROM gone), 0)
             WHERE handle = $1 AND EXISTS (SELECT 1 FROM gone)",
            &[&handle],
        )?;
        Ok(())
    }
}

impl SentLog for PgHome {
    fn sent(&mut self, id: &str) -> Result<Option<SentRow>, StoreError> {
        let row = self.row(
            "SELECT sender, state, dest_home FROM sent WHERE id = $1",
            &[&id],
        )?;
        Ok(row.and_then(|r| {
            Some(SentRow {
                sender: r.get(0),
                state: Delivery::parse(r.get(1))?,
                dest_home: r.get(2),
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
        self.send(
            "INSERT INTO sent(id, sender, recipient, state, at, dest_home)
             VALUES ($1, $2, $3, 'accepted', $4, $5)",
            &[&id, &sender, &recipient, &now_ms(), &dest_home],
        )?;
        Ok(())
    }

    fn set_sent_state(&mut self, id: &str, state: Delivery) -> Result<(), StoreError> {
        self.send(
            "UPDATE sent SET state = $2 WHERE id = $1",
            &[&id, &state.as_str()],
        )?;
        Ok(())
    }

    fn set_sent_home(&mut self, id: &str, dest_home: &str) -> Result<(), StoreError> {
        self.send(
            "UPDATE sent SET dest_home = $2 WHERE id = $1",
            &[&id, &dest_home],
        )?;
        Ok(())
    }
}

impl ReceivedLog for PgHome {
    fn record_received(
        &mut self,
        id: &str,
        sender: &str,
        recipient: &str,
        from_home: Option<&str>,
    ) -> Result<bool, StoreError> {
        Ok(self.exec(
            "INSERT INTO received(id, sender, recipient, from_home, at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO NOTHING",
            &[&id, &sender, &recipient, &from_home, &now_ms()],
        )? == 1)
    }

    fn received(&mut self, id: &str) -> Result<Option<ReceivedRow>, StoreError> {
        let row = self.row(
            "SELECT sender, recipient, from_home, delivered, read FROM received WHERE id = $1",
            &[&id],
        )?;
        Ok(row.map(|r| ReceivedRow {
            sender: r.get(0),
            recipient: r.get(1),
            from_home: r.get(2),
            delivered: r.get(3),
            read: r.get(4),
        }))
    }

    fn forget_received(&mut self, id: &str) -> Result<(), StoreError> {
        self.send("DELETE FROM received WHERE id = $1", &[&id])?;
        Ok(())
    }

    fn set_delivered(&mut self, id: &str) -> Result<(), StoreError> {
        self.send("UPDATE received SET delivered = true WHERE id = $1", &[&id])?;
        Ok(())
    }

    fn set_read(&mut self, id: &str) -> Result<(), StoreError> {
        self.send(
            "UPDATE received SET read = true, delivered = true WHERE id = $1",
            &[&id],
        )?;
        Ok(())
    }
}

impl ForwardQueue for PgHome {
    fn enqueue(
        &mut self,
        dest: Option<&str>,
        handle: &str,
        item_json: &str,
    ) -> Result<u64, StoreError> {
        let row = self
            .row(
                "INSERT INTO outq(dest, handle, item, at) VALUES ($1, $2, $3, $4) RETURNING n",
                &[&dest, &handle, &item_json, &now_ms()],
            )?
            .ok_or_else(|| StoreError::Db("INSERT … RETURNING gave no row".into()))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    fn unrouted_for(&mut self, handle: &str) -> Result<Vec<u64>, StoreError> {
        let rows = self.rows(
            "SELECT n FROM outq WHERE dest IS NULL AND handle = $1 ORDER BY n",
            &[&handle],
        )?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
    }

    fn queued(&mut self, dest: Option<&str>) -> Result<Vec<(u64, String)>, StoreError> {
        let rows = match dest {
            None => self.rows(
                "SELECT n, item FROM outq WHERE dest IS NULL ORDER BY n",
                &[],
            )?,
            Some(d) => self.rows("SELECT n, item FROM outq WHERE dest = $1 ORDER BY n", &[&d])?,
        };
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
            .collect())
    }

    fn queued_ns(&mut self, dest: &str) -> Result<Vec<u64>, StoreError> {
        let rows = self.rows("SELECT n FROM outq WHERE dest = $1 ORDER BY n", &[&dest])?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
    }

    fn queued_items(&mut self, dest: &str, ns: &[u64]) -> Result<Vec<(u64, String)>, StoreError> {
        let want: Vec<i64> = ns.iter().map(|&n| n as i64).collect();
        let rows = self.rows(
            "SELECT n, item FROM outq WHERE n = ANY($1) AND dest = $2",
            &[&want, &dest],
        )?;
        let mut found: HashMap<u64, String> = rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
            .collect();
        Ok(ns
            .iter()
            .filter_map(|n| found.remove(n).map(|item| (*n, item)))
            .collect())
    }

    fn route(&mut self, n: u64, dest: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .row(
                "UPDATE outq SET dest = $2 WHERE n = $1 RETURNING item",
                &[&(n as i64), &dest],
            )?
            .map(|r| r.get(0)))
    }

    fn queued_dests(&mut self) -> Result<Vec<String>, StoreError> {
        let rows = self.rows("SELECT DISTINCT dest FROM outq WHERE dest IS NOT NULL", &[])?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn waiting_for(&mut self, dest: &str) -> Result<bool, StoreError> {
        Ok(self
            .row("SELECT 1 FROM outq WHERE dest = $1 LIMIT 1", &[&dest])?
            .is_some())
    }

    fn queued_before(
        &mut self,
        before: i64,
        limit: usize,
    ) -> Result<Vec<(u64, Option<String>)>, StoreError> {
        // The oldest by number are the oldest, as on SQLite (see
        // `SqliteHome::queued_before`): no index by time to keep.
        let rows = self.rows(
            "SELECT n, dest FROM (SELECT n, dest, at FROM outq ORDER BY n LIMIT $2) q WHERE at < $1",
            &[&before, &(limit as i64)],
        )?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
            .collect())
    }

    fn dequeue(&mut self, n: u64) -> Result<Option<String>, StoreError> {
        Ok(self
            .row(
                "DELETE FROM outq WHERE n = $1 RETURNING item",
                &[&(n as i64)],
            )?
            .map(|r| r.get(0)))
    }

    fn remove(&mut self, n: u64) -> Result<bool, StoreError> {
        Ok(self.exec("DELETE FROM outq WHERE n = $1", &[&(n as i64)])? > 0)
    }
}

impl ContactBook for PgHome {
    fn contact(
        &mut self,
        owner: &str,
        peer: &str,
    ) -> Result<Option<(Relation, Option<String>)>, StoreError> {
        let row = self.row(
            "SELECT relation, peer_home FROM contacts WHERE owner = $1 AND peer = $2",
            &[&owner, &peer],
        )?;
        Ok(row.and_then(|r| Some((Relation::parse(r.get(0))?, r.get(1)))))
    }

    fn set_contact(
        &mut self,
        owner: &str,
        peer: &str,
        relation: Relation,
        peer_home: Option<&str>,
    ) -> Result<(), StoreError> {
        self.send(
            "INSERT INTO contacts(owner, peer, relation, peer_home, at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (owner, peer) DO UPDATE SET relation = $3,
                peer_home = coalesce($4, contacts.peer_home), at = $5",
            &[&owner, &peer, &relation.as_str(), &peer_home, &now_ms()],
        )?;
        Ok(())
    }

    fn delete_contact(&mut self, owner: &str, peer: &str) -> Result<(), StoreError> {
        self.send(
            "DELETE FROM contacts WHERE owner = $1 AND peer = $2",
            &[&owner, &peer],
        )?;
        Ok(())
    }

    fn contacts(&mut self, owner: &str) -> Result<Vec<ContactRow>, StoreError> {
        let rows = self.rows(
            "SELECT peer, relation, peer_home FROM contacts WHERE owner = $1 ORDER BY peer COLLATE \"C\"",
            &[&owner],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(ContactRow {
                    peer: r.get(0),
                    relation: Relation::parse(r.get(1))?,
                    peer_home: r.get(2),
                })
            })
            .collect())
    }

    fn visible_to_home(&mut self, home: &str, users: &[String]) -> Result<Vec<String>, StoreError> {
        let rows = self.rows(
            "SELECT DISTINCT owner FROM contacts
             WHERE owner = ANY($1) AND peer_home = $2 AND relation = 'accepted'",
            &[&users, &home],
        )?;
        let seen: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        Ok(users
            .iter()
            .filter(|u| seen.contains(*u))
            .cloned()
            .collect())
    }
}

impl HomeStore for PgHome {
    fn prune(&mut self, before: i64) -> Result<usize, StoreError> {
        let sent = self.exec("DELETE FROM sent WHERE at < $1", &[&before])?;
        let received = self.exec("DELETE FROM received WHERE at < $1", &[&before])?;
        Ok((sent + received) as usize)
    }

    // One statement each for what the rules read together: a round trip
    // to the server is most of what a message costs here.

    fn send_check(
        &mut self,
        id: &str,
        from: &str,
        to: &str,
    ) -> Result<(Option<SentRow>, Option<Option<Relation>>), StoreError> {
        let r = self
            .row(
                "SELECT s.sender, s.state, s.dest_home,
                        EXISTS(SELECT 1 FROM users WHERE handle = $2),
                        (SELECT relation FROM contacts WHERE owner = $2 AND peer = $3)
                 FROM (SELECT 1) AS one LEFT JOIN sent s ON s.id = $1",
                &[&id, &to, &from],
            )?
            .ok_or_else(|| StoreError::Db("send_check gave no row".into()))?;
        let prior = r.get::<_, Option<String>>(0).and_then(|sender| {
            Some(SentRow {
                sender,
                state: Delivery::parse(r.get(1))?,
                dest_home: r.get(2),
            })
        });
        let to_here = r
            .get::<_, bool>(3)
            .then(|| r.get::<_, Option<&str>>(4).and_then(Relation::parse));
        Ok((prior, to_here))
    }

    fn ack_start(&mut self, handle: &str, device: &str) -> Result<Option<(u64, u64)>, StoreError> {
        Ok(self
            .row(
                "SELECT d.acked_seq, u.next_seq - 1 FROM devices d JOIN users u ON u.handle = d.handle
                 WHERE d.handle = $1 AND d.device = $2",
                &[&handle, &device],
            )?
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64)))
    }

    fn record_received_new(
        &mut self,
        id: &str,
        sender: &str,
        recipient: &str,
    ) -> Result<(), StoreError> {
        self.send(
            "INSERT INTO received(id, sender, recipient, from_home, at) VALUES ($1, $2, $3, NULL, $4)
             ON CONFLICT (id) DO NOTHING",
            &[&id, &sender, &recipient, &now_ms()],
        )?;
        Ok(())
    }

    fn acked_messages(
        &mut self,
        handle: &str,
        after: u64,
        upto: u64,
    ) -> Result<Vec<AckedMessage>, StoreError> {
        let rows = self.rows(
            "SELECT m.msg_id, r.sender, r.recipient, r.from_home, r.delivered, r.read,
                    s.sender, s.state, s.dest_home,
                    NOT r.delivered AND r.from_home IS NULL
                        AND EXISTS(SELECT 1 FROM users u WHERE u.handle = r.sender)
             FROM mailbox m
             JOIN received r ON r.id = m.msg_id
             LEFT JOIN sent s ON s.id = m.msg_id AND NOT r.delivered AND r.from_home IS NULL
             WHERE m.handle = $1 AND m.seq > $2 AND m.seq <= $3 AND m.msg_id IS NOT NULL
             ORDER BY m.seq",
            &[&handle, &(after as i64), &(upto as i64)],
        )?;
        Ok(rows
            .iter()
            .map(|r| AckedMessage {
                id: r.get(0),
                received: ReceivedRow {
                    sender: r.get(1),
                    recipient: r.get(2),
                    from_home: r.get(3),
                    delivered: r.get(4),
                    read: r.get(5),
                },
                sent: r.get::<_, Option<String>>(6).and_then(|sender| {
                    Some(SentRow {
                        sender,
                        state: Delivery::parse(r.get(7))?,
                        dest_home: r.get(8),
                    })
                }),
                sender_here: r.get(9),
            })
            .collect())
    }
}

/// Items in the forward queue by destination home, and those with none
/// yet, on a connection of its own (an operator's scrape must not wait
/// behind the store thread). Call it off any Tokio runtime.
pub fn queue_depths(target: &PgTarget) -> Result<(HashMap<String, u64>, u64), StoreError> {
    let mut c = connect(target, "popupd home status")?;
    let mut by_dest = HashMap::new();
    let mut unrouted = 0;
    for r in c.query("SELECT dest, count(*) FROM outq GROUP BY dest", &[])? {
        match (r.get::<_, Option<String>>(0), r.get::<_, i64>(1) as u64) {
            (Some(d), n) => {
                by_dest.insert(d, n);
            }
            (None, n) => unrouted = n,
        }
    }
    Ok((by_dest, unrouted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::test_pg as target;
    use popupd_store::Batcher;
    use std::time::{Duration, Instant};

    fn version(t: &PgTarget) -> (String, i32) {
        let mut c = connect(t, "test").unwrap();
        let r = c
            .query_opt(
                "SELECT owner, version FROM popupd_schema WHERE store = 'home'",
                &[],
            )
            .unwrap()
            .unwrap();
        (r.get(0), r.get(1))
    }

    #[test]
    fn the_schema_is_made_once_and_a_database_of_another_home_or_a_newer_popupd_is_refused() {
        let Some(t) = target("pg_schema") else { return };
        let mut s = PgHome::open(&t, "home-a", false).unwrap();
        s.begin().unwrap();
        s.add_user("alice").unwrap();
        s.commit().unwrap();
        drop(s);
        assert_eq!(version(&t), ("home-a".into(), STEPS.len() as i32));
        // Opened again: nothing is made twice, nothing lost.
        let mut s = PgHome::open(&t, "home-a", false).unwrap();
        s.begin().unwrap();
        assert_eq!(s.all_handles().unwrap(), ["alice"]);
        s.commit().unwrap();
        drop(s);
        let Err(e) = PgHome::open(&t, "home-b", false) else {
            panic!("another home's tables were taken")
        };
        assert!(e.to_string().contains("belong to home-a"), "{e}");
        let mut c = connect(&t, "test").unwrap();
        c.execute(
            "UPDATE popupd_schema SET version = 99 WHERE store = 'home'",
            &[],
        )
        .unwrap();
        let Err(e) = PgHome::open(&t, "home-a", false) else {
            panic!("a newer schema was opened")
        };
        assert!(e.to_string().contains("newer than this popupd"), "{e}");
    }

    /// Two nodes' batches that touch two users' rows in opposite orders:
    /// the second waits for the first to commit, then goes through; neither
    /// fails, and nobody waits for PostgreSQL's deadlock check.
    #[test]
    fn two_nodes_batches_take_turns_and_neither_deadlocks() {
        let Some(t) = target("pg_cross") else { return };
        let mut s = PgHome::open(&t, "home-a", true).unwrap();
        s.begin().unwrap();
        s.add_user("bob").unwrap();
        s.add_user("carol").unwrap();
        s.commit().unwrap();
        drop(s);
        let (took, taken) = std::sync::mpsc::channel();
        let t2 = t.clone();
        let first = std::thread::spawn(move || {
            let mut a = PgHome::open(&t2, "home-a", true).unwrap();
            a.begin().unwrap();
            a.append("bob", None, "{}", None).unwrap();
            took.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            a.append("carol", None, "{}", None).unwrap();
            a.commit().unwrap();
        });
        let mut b = PgHome::open(&t, "home-a", true).unwrap();
        taken.recv().unwrap();
        let t0 = Instant::now();
        b.begin().unwrap();
        let waited = t0.elapsed();
        b.append("carol", None, "{}", None).unwrap();
        b.append("bob", None, "{}", None).unwrap();
        b.commit().unwrap();
        first.join().unwrap();
        assert!(
            waited > Duration::from_millis(200),
            "did not wait: {waited:?}"
        );
        assert!(
            t0.elapsed() < Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
        b.begin().unwrap();
        assert_eq!(
            (b.last_seq("bob").unwrap(), b.last_seq("carol").unwrap()),
            (2, 2)
        );
        b.commit().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_job_is_rolled_back_alone_and_the_rest_of_its_batch_commits() {
        let Some(t) = target("pg_savepoints") else {
            return;
        };
        let s = popupd_store::pg::off_runtime(|| PgHome::open(&t, "home-a", false)).unwrap();
        let b = Batcher::spawn("pg-test", Box::new(s) as Box<dyn HomeStore>).unwrap();
        b.run(|s| s.add_user("bob")).await.unwrap();
        // Queued together, so they share one transaction: a job whose
        // statement fails (an id stored twice), one that fails after
        // writing, one that swallows a failed statement, and good ones.
        let good1 = b.submit(|s| s.record_sent("m1", "bob", "x", None));
        let dup = b.submit(|s| {
            s.append("bob", Some("m2"), "{}", None)?;
            s.record_sent("m1", "bob", "x", None)
        });
        let refused = b.submit(|s| {
            s.append("bob", Some("m3"), "{}", None)?;
            Err::<(), _>(StoreError::Conflict("no".into()))
        });
        let swallowed = b.submit(|s| {
            s.append("bob", Some("m4"), "{}", None)?;
            let _ = s.record_sent("m1", "bob", "x", None);
            Ok(())
        });
        let good2 = b.submit(|s| s.append("bob", Some("m5"), "{}", None));
        assert_eq!(good1.await, Ok(()));
        assert!(dup.await.is_err(), "an id is stored once");
        assert!(refused.await.is_err());
        // Its writes did not stay, although it said Ok: its statement
        // failed, and PostgreSQL's transaction needed the rollback. Its
        // caller hears so.
        assert!(swallowed.await.is_err(), "told it was not kept");
        assert_eq!(good2.await, Ok(Some(1)));
        let (ids, last) = b
            .read(|s| Ok((s.message_ids("bob", 0, 100)?, s.last_seq("bob")?)))
            .await
            .unwrap();
        assert_eq!(ids, ["m5"], "only the good job's event stayed");
        assert_eq!(last, 1, "the rolled-back numbers were given back");
        assert!(b.read(|s| s.sent("m1")).await.unwrap().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_mailbox_is_numbered_in_commit_order_and_received_ids_are_kept_once() {
        let Some(t) = target("pg_mailbox") else {
            return;
        };
        let s = popupd_store::pg::off_runtime(|| PgHome::open(&t, "home-a", false)).unwrap();
        let b = Batcher::spawn("pg-test", Box::new(s) as Box<dyn HomeStore>).unwrap();
        b.run(|s| {
            s.add_user("bob")?;
            s.add_user("carol")?;
            s.add_device("bob", "d", "h")
        })
        .await
        .unwrap();
        let mut pending = Vec::new();
        for i in 0..200 {
            let who = if i % 3 == 0 { "carol" } else { "bob" };
            pending.push(b.submit(move |s| {
                let fresh = s.record_received(&format!("id{i}"), "x", who, None)?;
                let again = s.record_received(&format!("id{i}"), "x", who, None)?;
                assert!(fresh && !again);
                s.append(
                    who,
                    Some(&format!("id{i}")),
                    &format!("{{\"n\":{i}}}"),
                    None,
                )
            }));
        }
        for p in pending {
            p.await.unwrap();
        }
        let bob = b.read(|s| s.mailbox_after("bob", 0, 1000)).await.unwrap();
        let seqs: Vec<u64> = bob.iter().map(|e| e.0).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        let ns: Vec<u64> = bob
            .iter()
            .map(|e| {
                e.1.trim_start_matches("{\"n\":")
                    .trim_end_matches('}')
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "in submission order");
        assert!(
            !b.read(|s| s.record_received("id7", "x", "bob", None))
                .await
                .unwrap(),
            "an id is kept once across batches"
        );
        // A cap: full means not appended, and acked events make room.
        let cap = MailboxCap {
            events: seqs.len() as u64,
            bytes: u64::MAX,
        };
        assert_eq!(
            b.run(move |s| s.append("bob", None, "{}", Some(cap)))
                .await
                .unwrap(),
            None
        );
        let last = seqs.len() as u64;
        b.run(move |s| {
            s.set_device_acked("bob", "d", last)?;
            s.forget_stored("bob")
        })
        .await
        .unwrap();
        assert_eq!(
            b.run(move |s| s.append("bob", None, "{}", Some(cap)))
                .await
                .unwrap(),
            Some(last + 1)
        );
    }
}
