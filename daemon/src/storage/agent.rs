//! The agent's local store: history of everything sent and received, the
//! outbox (sent messages not yet accepted by the home), the requests not
//! yet confirmed by the home (read marks, contact changes), the signals not
//! yet emitted, and the mailbox position.
//!
//! Commits do not wait for the disk by themselves (`synchronous = NORMAL`);
//! a job that must be durable before its caller hears (`submit`, `run`)
//! waits for the log's fsync, and the marks that a signal went out
//! (`submit_lazy`) do not. A process crash loses no commit either way.

use rusqlite::{OptionalExtension, params};

use popupd_protocol::{Delivery, Message};
use popupd_store::{Batchable, Step, StoreError, Syncer, migrate, open_sqlite, wal_syncer};

/// History and outbox on SQLite.
pub struct AgentStore {
    conn: rusqlite::Connection,
    path: std::path::PathBuf,
}

impl Batchable for AgentStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        popupd_store::sqlite_begin(&self.conn)
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        popupd_store::sqlite_commit(&self.conn)
    }
    fn rollback(&mut self) {
        popupd_store::sqlite_rollback(&self.conn)
    }
    fn job_begin(&mut self) -> Result<(), StoreError> {
        popupd_store::sqlite_job_begin(&self.conn)
    }
    fn job_end(&mut self, ok: bool) -> Result<(), StoreError> {
        popupd_store::sqlite_job_end(&self.conn, ok)
    }
    fn syncer(&mut self) -> Result<Option<Syncer>, StoreError> {
        Ok(Some(wal_syncer(&self.path)?))
    }
}

/// A message in history, sent or received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    /// [`IN`] or [`OUT`].
    pub direction: String,
    pub from: String,
    pub to: String,
    pub text: String,
    /// When its sender's home accepted it (ms since the epoch).
    pub sent_at: i64,
    /// Sent: queued, accepted, delivered, read or failed; received:
    /// received or read.
    pub status: String,
    /// Why it failed, or why it is still queued; "" otherwise.
    pub reason: String,
    /// The message it answers.
    pub reply_to: Option<String>,
}

/// `in` for received messages, `out` for sent ones.
pub const IN: &str = "in";
pub const OUT: &str = "out";

/// The agent's schema, one step per version.
const STEPS: &[Step] = &[
    |c| {
        Ok(c.execute_batch(
            "CREATE TABLE IF NOT EXISTS messages(
                id TEXT PRIMARY KEY,
                direction TEXT NOT NULL,
                sender TEXT NOT NULL,
                recipient TEXT NOT NULL,
                text TEXT NOT NULL,
                sent_at INTEGER NOT NULL,
                reply_to TEXT,
                status TEXT NOT NULL,
                reason TEXT NOT NULL DEFAULT '',
                read_sent INTEGER NOT NULL DEFAULT 0
             );
             CREATE INDEX IF NOT EXISTS messages_time ON messages(sent_at);
             CREATE INDEX IF NOT EXISTS messages_queued ON messages(status) WHERE status = 'queued';
             CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS settings(k TEXT PRIMARY KEY, v TEXT NOT NULL);",
        )?)
    },
    // Signals are emitted from a table, so a crash between storing an
    // event and signalling it cannot lose the signal; read marks (and
    // contact changes) wait in `requests` until the home confirms them.
    // Read marks that version 1 sent but the home never confirmed are sent
    // again: the home takes each once.
    |c| {
        Ok(c.execute_batch(
            "CREATE TABLE signals(
                n INTEGER PRIMARY KEY AUTOINCREMENT,
                signal TEXT NOT NULL,
                bus INTEGER NOT NULL DEFAULT 0,
                plugins INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE requests(
                req INTEGER PRIMARY KEY AUTOINCREMENT,
                request TEXT NOT NULL
             );
             INSERT INTO requests(request)
                SELECT '{\"read\":\"' || id || '\"}' FROM messages
                WHERE direction = 'in' AND status = 'read' AND read_sent = 0 ORDER BY rowid;",
        )?)
    },
];

impl AgentStore {
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let conn = open_sqlite(path)?;
        migrate(&conn, path, STEPS)?;
        conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        Ok(AgentStore {
            conn,
            path: path.to_owned(),
        })
    }

    /// A setting the agent keeps across restarts (own presence).
    pub fn setting(&mut self, k: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT v FROM settings WHERE k = ?1")?
            .query_row([k], |r| r.get(0))
            .optional()?)
    }

    /// Sets (or with `None` clears) a setting.
    pub fn set_setting(&mut self, k: &str, v: Option<&str>) -> Result<(), StoreError> {
        match v {
            Some(v) => self.conn.execute(
                "INSERT INTO settings(k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = ?2",
                params![k, v],
            )?,
            None => self
                .conn
                .execute("DELETE FROM settings WHERE k = ?1", [k])?,
        };
        Ok(())
    }

    /// Puts a message of ours in the outbox.
    pub fn queue(&mut self, m: &Message) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO messages(id, direction, sender, recipient, text, sent_at, reply_to, status)
                 VALUES (?1, 'out', ?2, ?3, ?4, ?5, ?6, 'queued')",
            )?
            .execute(params![m.id, m.from, m.to, m.text, m.sent_at, m.reply_to])?;
        Ok(())
    }

    /// Messages not yet accepted by the home, in the order they were queued.
    pub fn outbox(&mut self) -> Result<Vec<Message>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, sender, recipient, text, sent_at, reply_to FROM messages
             WHERE status = 'queued' ORDER BY rowid",
        )?;
        let rows = st.query_map([], |r| {
            Ok(Message {
                id: r.get(0)?,
                from: r.get(1)?,
                to: r.get(2)?,
                text: r.get(3)?,
                sent_at: r.get(4)?,
                reply_to: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores a received message; false if it was already there.
    pub fn receive(&mut self, m: &Message) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO messages(id, direction, sender, recipient, text, sent_at, reply_to, status)
                 VALUES (?1, 'in', ?2, ?3, ?4, ?5, ?6, 'received')",
            )?
            .execute(params![m.id, m.from, m.to, m.text, m.sent_at, m.reply_to])?
            == 1)
    }

    /// Moves a sent message's status forward; false if it did not move.
    pub fn set_status(
        &mut self,
        id: &str,
        state: Delivery,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let cur: Option<String> = self
            .conn
            .prepare_cached("SELECT status FROM messages WHERE id = ?1 AND direction = 'out'")?
            .query_row([id], |r| r.get(0))
            .optional()?;
        let Some(cur) = cur.and_then(|c| Delivery::parse(&c)) else {
            return Ok(false);
        };
        if state <= cur || cur == Delivery::Failed {
            return Ok(false);
        }
        self.conn
            .prepare_cached("UPDATE messages SET status = ?2, reason = ?3 WHERE id = ?1")?
            .execute(params![id, state.as_str(), reason])?;
        Ok(true)
    }

    /// Says why a message is still queued (or with "" that it no longer
    /// waits for a reason); false if it is not queued or the reason is the
    /// same.
    pub fn set_queued_reason(&mut self, id: &str, reason: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "UPDATE messages SET reason = ?2
                 WHERE id = ?1 AND direction = 'out' AND status = 'queued' AND reason != ?2",
            )?
            .execute(params![id, reason])?
            == 1)
    }

    /// Marks a received message read; false if unknown or already read.
    pub fn mark_read(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "UPDATE messages SET status = 'read' WHERE id = ?1 AND direction = 'in' AND status != 'read'",
            [id],
        )? == 1)
    }

    /// Keeps a request for the home (JSON) until it confirms it; returns
    /// its number.
    pub fn request(&mut self, json: &str) -> Result<u64, StoreError> {
        self.conn
            .prepare_cached("INSERT INTO requests(request) VALUES (?1)")?
            .execute([json])?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    /// Requests the home has not confirmed, oldest first.
    pub fn requests(&mut self) -> Result<Vec<(u64, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT req, request FROM requests ORDER BY req")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The home confirmed (or refused for good) request `req`.
    pub fn request_done(&mut self, req: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM requests WHERE req = ?1")?
            .execute([req as i64])?;
        Ok(())
    }

    /// Keeps a signal (JSON) to emit; returns its number.
    pub fn queue_signal(&mut self, json: &str) -> Result<u64, StoreError> {
        self.conn
            .prepare_cached("INSERT INTO signals(signal) VALUES (?1)")?
            .execute([json])?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    /// Up to `limit` signals after `after` not yet emitted on D-Bus or not
    /// yet handled by the plugins: (n, JSON, emitted on D-Bus, handled by
    /// the plugins).
    pub fn signals_after(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String, bool, bool)>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT n, signal, bus, plugins FROM signals WHERE n > ?1 ORDER BY n LIMIT ?2",
        )?;
        let rows = st.query_map(params![after as i64, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Signal `n` went out on D-Bus (`bus`) or every plugin handled it
    /// (`plugins`); a signal done both ways is forgotten.
    pub fn signal_done(&mut self, n: u64, bus: bool, plugins: bool) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE signals SET bus = bus OR ?2, plugins = plugins OR ?3 WHERE n = ?1",
            )?
            .execute(params![n as i64, bus, plugins])?;
        self.conn
            .prepare_cached("DELETE FROM signals WHERE n = ?1 AND bus AND plugins")?
            .execute([n as i64])?;
        Ok(())
    }

    /// One message.
    pub fn get(&mut self, id: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(&format!("{SELECT} WHERE id = ?1"))?
            .query_row([id], entry)
            .optional()?)
    }

    /// Up to `limit` newest messages with `peer` ("" for all), oldest first.
    pub fn history(&mut self, peer: &str, limit: u32) -> Result<Vec<Entry>, StoreError> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT * FROM ({SELECT} WHERE ?1 = '' OR sender = ?1 OR recipient = ?1
               ORDER BY sent_at DESC, rowid DESC LIMIT ?2) ORDER BY sent_at, rowid"
        ))?;
        let rows = st.query_map(params![peer, limit], entry)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Highest mailbox event stored.
    pub fn last_seq(&mut self) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT v FROM meta WHERE k = 'last_seq'", [], |r| r.get(0))
            .optional()?;
        Ok(v.unwrap_or(0) as u64)
    }

    pub fn set_last_seq(&mut self, seq: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO meta(k, v) VALUES ('last_seq', ?1)
                 ON CONFLICT(k) DO UPDATE SET v = max(v, excluded.v)",
            )?
            .execute([seq as i64])?;
        Ok(())
    }
}

const SELECT: &str = "SELECT id, direction, sender, recipient, text, sent_at, status, reason, reply_to, rowid FROM messages";

fn entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        id: r.get(0)?,
        direction: r.get(1)?,
        from: r.get(2)?,
        to: r.get(3)?,
        text: r.get(4)?,
        sent_at: r.get(5)?,
        status: r.get(6)?,
        reason: r.get(7)?,
        reply_to: r.get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("popupd-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_database_of_the_first_schema_is_upgraded_without_loss() {
        let d = dir("upgrade");
        let path = d.join("a.sqlite");
        {
            // As popupd made it before schema versions: version 0.
            let c = rusqlite::Connection::open(&path).unwrap();
            STEPS[0](&c).unwrap();
            c.execute_batch(
                "INSERT INTO messages(id, direction, sender, recipient, text, sent_at, status, read_sent)
                 VALUES ('m1', 'in', 'bob', 'alice', 'hi', 1, 'read', 0),
                        ('m2', 'in', 'bob', 'alice', 'hey', 2, 'read', 1),
                        ('m3', 'out', 'alice', 'bob', 'yo', 3, 'queued', 0);
                 INSERT INTO meta(k, v) VALUES ('last_seq', 7);",
            )
            .unwrap();
        }
        let mut s = AgentStore::open(&path).unwrap();
        assert_eq!(s.last_seq().unwrap(), 7);
        assert_eq!(s.history("", 10).unwrap().len(), 3);
        assert_eq!(s.outbox().unwrap()[0].id, "m3");
        // The read mark the home never confirmed is sent again; the
        // confirmed one is not.
        let reqs = s.requests().unwrap();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].1, r#"{"read":"m1"}"#);
        let v: i64 = s
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, STEPS.len() as i64);
        drop(s);
        // Opening again changes nothing.
        let mut s = AgentStore::open(&path).unwrap();
        assert_eq!(s.requests().unwrap().len(), 1);
        drop(s);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn signals_stay_until_done_both_ways_and_requests_until_confirmed() {
        let d = dir("signals");
        let mut s = AgentStore::open(&d.join("a.sqlite")).unwrap();
        let n1 = s.queue_signal("one").unwrap();
        let n2 = s.queue_signal("two").unwrap();
        assert!(n2 > n1);
        s.signal_done(n1, true, false).unwrap();
        let left = s.signals_after(0, 10).unwrap();
        assert_eq!(
            left,
            vec![
                (n1, "one".into(), true, false),
                (n2, "two".into(), false, false)
            ]
        );
        s.signal_done(n1, false, true).unwrap();
        assert_eq!(
            s.signals_after(0, 10).unwrap().len(),
            1,
            "done both ways: gone"
        );
        assert!(s.signals_after(n2, 10).unwrap().is_empty());

        let r1 = s.request("a").unwrap();
        let r2 = s.request("b").unwrap();
        s.request_done(r1).unwrap();
        assert_eq!(s.requests().unwrap(), vec![(r2, "b".to_string())]);
        drop(s);
        std::fs::remove_dir_all(d).unwrap();
    }
}
