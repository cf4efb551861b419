//! The agent's local store: history of everything sent and received, the
//! outbox (sent messages not yet accepted by the home), and the mailbox
//! position.

use popupd_ipc::HistoryEntry;
use rusqlite::{OptionalExtension, params};

use super::{StoreError, open_sqlite, sqlite_batchable};
use crate::protocol::{Delivery, Message};

/// History and outbox on SQLite.
pub struct AgentStore {
    conn: rusqlite::Connection,
}
sqlite_batchable!(AgentStore);

/// `in` for received messages, `out` for sent ones.
pub const IN: &str = "in";
pub const OUT: &str = "out";

impl AgentStore {
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let conn = open_sqlite(path)?;
        conn.execute_batch(
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
        )?;
        Ok(AgentStore { conn })
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

    /// Messages not yet accepted by the home, oldest first.
    pub fn outbox(&mut self) -> Result<Vec<Message>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, sender, recipient, text, sent_at, reply_to FROM messages
             WHERE status = 'queued' ORDER BY sent_at, rowid",
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

    /// Marks a received message read; false if unknown or already read.
    pub fn mark_read(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "UPDATE messages SET status = 'read' WHERE id = ?1 AND direction = 'in' AND status != 'read'",
            [id],
        )? == 1)
    }

    /// Received messages marked read whose receipt has not been sent.
    pub fn unsent_reads(&mut self) -> Result<Vec<String>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id FROM messages WHERE direction = 'in' AND status = 'read' AND read_sent = 0",
        )?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The read receipts of `ids` went to the home.
    pub fn reads_sent(&mut self, ids: &[String]) -> Result<(), StoreError> {
        let mut st = self
            .conn
            .prepare_cached("UPDATE messages SET read_sent = 1 WHERE id = ?1")?;
        for id in ids {
            st.execute([id])?;
        }
        Ok(())
    }

    /// One message.
    pub fn get(&mut self, id: &str) -> Result<Option<HistoryEntry>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(&format!("{SELECT} WHERE id = ?1"))?
            .query_row([id], entry)
            .optional()?)
    }

    /// Up to `limit` newest messages with `peer` ("" for all), oldest first.
    pub fn history(&mut self, peer: &str, limit: u32) -> Result<Vec<HistoryEntry>, StoreError> {
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

const SELECT: &str =
    "SELECT id, direction, sender, recipient, text, sent_at, status, reason, rowid FROM messages";

fn entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<HistoryEntry> {
    Ok(HistoryEntry {
        id: r.get(0)?,
        direction: r.get(1)?,
        from: r.get(2)?,
        to: r.get(3)?,
        text: r.get(4)?,
        sent_at: r.get(5)?,
        status: r.get(6)?,
        reason: r.get(7)?,
    })
}
