//! The global server's directory: every home, and which home owns each handle.

use rusqlite::{OptionalExtension, params};

use popupd_protocol::{Route, now_ms};
use popupd_store::{Step, StoreError, migrate, open_sqlite, sqlite_batchable};

/// The directory on SQLite.
pub struct GlobalStore {
    conn: rusqlite::Connection,
}
sqlite_batchable!(GlobalStore);

/// The directory's schema, one step per version.
const STEPS: &[Step] = &[
    |c| {
        Ok(c.execute_batch(
            "CREATE TABLE IF NOT EXISTS homes(
                name TEXT PRIMARY KEY,
                address TEXT NOT NULL,
                seen_at INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS handles(
                handle TEXT PRIMARY KEY,
                home TEXT NOT NULL,
                registered_at INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )?)
    },
    // Each home's count of handles, for its quota.
    |c| {
        Ok(c.execute_batch(
            "ALTER TABLE homes ADD COLUMN handles INTEGER NOT NULL DEFAULT 0;
             UPDATE homes SET handles = (SELECT count(*) FROM handles WHERE handles.home = homes.name);",
        )?)
    },
];

impl GlobalStore {
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let conn = open_sqlite(path)?;
        migrate(&conn, path, STEPS)?;
        Ok(GlobalStore { conn })
    }

    /// Records a home and where it is reached.
    pub fn upsert_home(&mut self, name: &str, address: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO homes(name, address, seen_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET address = excluded.address, seen_at = excluded.seen_at",
            params![name, address, now_ms()],
        )?;
        Ok(())
    }

    /// Claims `handle` for `home`. Idempotent for the owner; `Conflict` if
    /// another home owns it, `Quota` if `home` holds `quota` handles.
    pub fn register(&mut self, handle: &str, home: &str, quota: u64) -> Result<(), StoreError> {
        let owner: Option<String> = self
            .conn
            .query_row(
                "SELECT home FROM handles WHERE handle = ?1",
                [handle],
                |r| r.get(0),
            )
            .optional()?;
        match owner {
            Some(o) if o == home => Ok(()),
            Some(o) => Err(StoreError::Conflict(format!(
                "handle {handle} belongs to home {o}; pick another handle"
            ))),
            None => {
                let held: Option<i64> = self
                    .conn
                    .query_row("SELECT handles FROM homes WHERE name = ?1", [home], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if held.unwrap_or(0) as u64 >= quota {
                    return Err(StoreError::Quota(format!(
                        "home {home} holds {quota} handles, as many as this network allows one home (limits.handles_per_home)"
                    )));
                }
                self.conn.execute(
                    "INSERT INTO handles(handle, home, registered_at) VALUES (?1, ?2, ?3)",
                    params![handle, home, now_ms()],
                )?;
                self.conn.execute(
                    "UPDATE homes SET handles = handles + 1 WHERE name = ?1",
                    [home],
                )?;
                Ok(())
            }
        }
    }

    /// Releases `handle` if `home` owns it.
    pub fn unregister(&mut self, handle: &str, home: &str) -> Result<bool, StoreError> {
        let gone = self.conn.execute(
            "DELETE FROM handles WHERE handle = ?1 AND home = ?2",
            params![handle, home],
        )? == 1;
        if gone {
            self.conn.execute(
                "UPDATE homes SET handles = handles - 1 WHERE name = ?1",
                [home],
            )?;
        }
        Ok(gone)
    }

    /// Where home `name` is reached.
    pub fn home_address(&mut self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT address FROM homes WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Where `handle` lives.
    pub fn lookup(&mut self, handle: &str) -> Result<Option<Route>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT h.name, h.address FROM handles u JOIN homes h ON h.name = u.home
                 WHERE u.handle = ?1",
            )?
            .query_row([handle], |r| {
                Ok(Route {
                    home: r.get(0)?,
                    address: r.get(1)?,
                })
            })
            .optional()?)
    }
}
