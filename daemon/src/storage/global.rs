//! The global server's directory: every home, and which home owns each
//! handle. [`GlobalStore`] is what the global server asks of it;
//! [`SqliteGlobal`] keeps it in SQLite, [`PgGlobal`] in PostgreSQL.

use rusqlite::{OptionalExtension, params};

use popupd_protocol::{Route, now_ms};
use popupd_store::pg::postgres::{Row, types::ToSql};
use popupd_store::pg::{PgBatch, PgConn, PgStep, PgTarget, connect, pg_migrate};
use popupd_store::{Batchable, Step, StoreError, migrate, open_sqlite, sqlite_batchable};

/// The directory, on one store with group commit. Methods run inside the
/// batcher's transaction; they must not commit.
pub trait GlobalStore: Batchable {
    /// Records a home and where it is reached.
    fn upsert_home(&mut self, name: &str, address: &str) -> Result<(), StoreError>;
    /// Claims `handle` for `home`. Idempotent for the owner; `Conflict` if
    /// another home owns it, `Quota` if `home` holds `quota` handles.
    fn register(&mut self, handle: &str, home: &str, quota: u64) -> Result<(), StoreError>;
    /// Releases `handle` if `home` owns it.
    fn unregister(&mut self, handle: &str, home: &str) -> Result<bool, StoreError>;
    /// Where home `name` is reached.
    fn home_address(&mut self, name: &str) -> Result<Option<String>, StoreError>;
    /// Where `handle` lives.
    fn lookup(&mut self, handle: &str) -> Result<Option<Route>, StoreError>;
}

fn taken(handle: &str, owner: &str) -> StoreError {
    StoreError::Conflict(format!(
        "handle {handle} belongs to home {owner}; pick another handle"
    ))
}

fn full(home: &str, quota: u64) -> StoreError {
    StoreError::Quota(format!(
        "home {home} holds {quota} handles, as many as this network allows one home (limits.handles_per_home)"
    ))
}

/// The directory on SQLite.
pub struct SqliteGlobal {
    conn: rusqlite::Connection,
}
sqlite_batchable!(SqliteGlobal);

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

impl SqliteGlobal {
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let conn = open_sqlite(path)?;
        migrate(&conn, path, STEPS)?;
        Ok(SqliteGlobal { conn })
    }
}

impl GlobalStore for SqliteGlobal {
    fn upsert_home(&mut self, name: &str, address: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO homes(name, address, seen_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET address = excluded.address, seen_at = excluded.seen_at",
            params![name, address, now_ms()],
        )?;
        Ok(())
    }

    fn register(&mut self, handle: &str, home: &str, quota: u64) -> Result<(), StoreError> {
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
            Some(o) => Err(taken(handle, &o)),
            None => {
                let held: Option<i64> = self
                    .conn
                    .query_row("SELECT handles FROM homes WHERE name = ?1", [home], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if held.unwrap_or(0) as u64 >= quota {
                    return Err(full(home, quota));
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

    fn unregister(&mut self, handle: &str, home: &str) -> Result<bool, StoreError> {
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

    fn home_address(&mut self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT address FROM homes WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn lookup(&mut self, handle: &str) -> Result<Option<Route>, StoreError> {
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

/// The directory's schema on PostgreSQL, one step per version.
const PG_STEPS: &[PgStep] = &["
CREATE TABLE homes(
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    seen_at BIGINT NOT NULL,
    handles BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE handles(
    handle TEXT PRIMARY KEY,
    home TEXT NOT NULL,
    registered_at BIGINT NOT NULL
);
"];

/// The directory on PostgreSQL. Make, use and drop it off any Tokio
/// runtime (the store thread, or [`popupd_store::pg::off_runtime`]).
pub struct PgGlobal {
    target: PgTarget,
    conn: PgConn,
    batch: PgBatch,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl PgGlobal {
    /// Connects and brings the schema up to date; the tables are global
    /// server `name`'s.
    pub fn open(target: &PgTarget, name: &str) -> Result<Self, StoreError> {
        let mut conn = connect(target, "popupd global")?;
        pg_migrate(&mut conn, target, "global", name, PG_STEPS)?;
        Ok(PgGlobal {
            target: target.clone(),
            conn,
            batch: PgBatch::default(),
        })
    }

    fn row(&mut self, sql: &'static str, p: Params<'_>) -> Result<Option<Row>, StoreError> {
        let r = self.conn.query_opt(sql, p);
        self.batch.watch(r)
    }

    fn exec(&mut self, sql: &'static str, p: Params<'_>) -> Result<u64, StoreError> {
        let r = self.conn.execute(sql, p);
        self.batch.watch(r)
    }
}

impl Batchable for PgGlobal {
    fn begin(&mut self) -> Result<(), StoreError> {
        if self.conn.is_closed() {
            self.conn = connect(&self.target, "popupd global")?;
            self.batch.reset();
        }
        match self.batch.begin(&mut self.conn, None) {
            // The connection died since the last batch: a new one may work.
            Err(_) if self.conn.is_closed() => {
                self.conn = connect(&self.target, "popupd global")?;
                self.batch.reset();
                self.batch.begin(&mut self.conn, None)
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
}

impl GlobalStore for PgGlobal {
    fn upsert_home(&mut self, name: &str, address: &str) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO homes(name, address, seen_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET address = excluded.address, seen_at = excluded.seen_at",
            &[&name, &address, &now_ms()],
        )?;
        Ok(())
    }

    fn register(&mut self, handle: &str, home: &str, quota: u64) -> Result<(), StoreError> {
        if let Some(r) = self.row("SELECT home FROM handles WHERE handle = $1", &[&handle])? {
            let owner: String = r.get(0);
            return if owner == home {
                Ok(())
            } else {
                Err(taken(handle, &owner))
            };
        }
        // The count is taken on the home's row, locked until the commit,
        // so two servers on one database cannot both pass the quota.
        let quota = quota.min(i64::MAX as u64) as i64;
        let counted = self.exec(
            "UPDATE homes SET handles = handles + 1 WHERE name = $1 AND handles < $2",
            &[&home, &quota],
        )?;
        if counted == 0
            && self
                .row("SELECT 1 FROM homes WHERE name = $1", &[&home])?
                .is_some()
        {
            return Err(full(home, quota as u64));
        }
        let n = self.exec(
            "INSERT INTO handles(handle, home, registered_at) VALUES ($1, $2, $3)
             ON CONFLICT (handle) DO NOTHING",
            &[&handle, &home, &now_ms()],
        )?;
        if n == 0 {
            // Another server took it meanwhile.
            let owner: String = self
                .row("SELECT home FROM handles WHERE handle = $1", &[&handle])?
                .map(|r| r.get(0))
                .unwrap_or_default();
            return Err(taken(handle, &owner));
        }
        Ok(())
    }

    fn unregister(&mut self, handle: &str, home: &str) -> Result<bool, StoreError> {
        let gone = self.exec(
            "DELETE FROM handles WHERE handle = $1 AND home = $2",
            &[&handle, &home],
        )? == 1;
        if gone {
            self.exec(
                "UPDATE homes SET handles = handles - 1 WHERE name = $1",
                &[&home],
            )?;
        }
        Ok(gone)
    }

    fn home_address(&mut self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .row("SELECT address FROM homes WHERE name = $1", &[&name])?
            .map(|r| r.get(0)))
    }

    fn lookup(&mut self, handle: &str) -> Result<Option<Route>, StoreError> {
        Ok(self
            .row(
                "SELECT h.name, h.address FROM handles u JOIN homes h ON h.name = u.home
                 WHERE u.handle = $1",
                &[&handle],
            )?
            .map(|r| Route {
                home: r.get(0),
                address: r.get(1),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory_rules(s: &mut dyn GlobalStore) {
        s.begin().unwrap();
        s.upsert_home("a.test", "127.0.0.1:1").unwrap();
        s.upsert_home("b.test", "127.0.0.1:2").unwrap();
        s.register("alice", "a.test", 2).unwrap();
        s.register("alice", "a.test", 2).unwrap();
        assert!(matches!(
            s.register("alice", "b.test", 2),
            Err(StoreError::Conflict(_))
        ));
        s.register("al", "a.test", 2).unwrap();
        assert!(matches!(
            s.register("alan", "a.test", 2),
            Err(StoreError::Quota(_))
        ));
        assert_eq!(
            s.lookup("alice").unwrap(),
            Some(Route {
                home: "a.test".into(),
                address: "127.0.0.1:1".into()
            })
        );
        assert!(!s.unregister("alice", "b.test").unwrap());
        assert!(s.unregister("alice", "a.test").unwrap());
        assert_eq!(s.lookup("alice").unwrap(), None);
        s.register("alan", "a.test", 2).unwrap();
        s.upsert_home("a.test", "127.0.0.1:9").unwrap();
        assert_eq!(
            s.home_address("a.test").unwrap().as_deref(),
            Some("127.0.0.1:9")
        );
        s.commit().unwrap();
    }

    #[test]
    fn handles_are_one_homes_within_its_quota_on_sqlite_and_postgres() {
        let dir = std::env::temp_dir().join(format!("popupd-global-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        directory_rules(&mut SqliteGlobal::open(&dir.join("global.sqlite")).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
        if let Some(t) = crate::storage::test_pg("global_rules") {
            directory_rules(&mut PgGlobal::open(&t, "global.test").unwrap());
        }
    }
}
