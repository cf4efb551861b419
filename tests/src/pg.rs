//! PostgreSQL for end-to-end tests: a server of the test's own in its
//! folder (`popupd_store::pg_test_server`: `initdb`, then `postgres` on
//! 127.0.0.1, as `nobody` when run as root), and the lines of a home's
//! config that put it on a database there.

use std::path::Path;

pub use popupd_store::pg_test_server::TestServer;

use crate::{Layout, skip};

/// A server for `test` in `dir/pg` (its log `dir/postgres.log`, shown with
/// the others when the test fails), or `None` when there can be none: the
/// test is then skipped, and says why, except under CI (`CI=true`), where
/// PostgreSQL is installed by the test command and a missing one fails.
pub fn server(dir: &Path, test: &str) -> Option<TestServer> {
    match TestServer::start(&dir.join("pg"), &dir.join("postgres.log")) {
        Ok(s) => Some(s),
        Err(why) if popupd_store::pg_test_server::required() => {
            panic!("{test}: needs PostgreSQL under CI: {why}")
        }
        Err(why) => {
            skip(test, &why);
            None
        }
    }
}

/// The `storage:` lines of a home's section that put it on a new
/// database `db` of `pg`.
pub fn storage_yaml(pg: &TestServer, db: &str) -> anyhow::Result<String> {
    let url = pg.create_db(db).map_err(anyhow::Error::msg)?;
    Ok(format!("  storage:\n    postgres: \"{url}\"\n"))
}

/// The default layout with the homes `on` (0: home A, 1: home B), and
/// the global server if `global`, on databases of their own on `pg`.
pub fn layout(pg: &TestServer, on: &[usize], global: bool) -> anyhow::Result<Layout> {
    let mut l = Layout::default();
    if global {
        l.global_yaml = storage_yaml(pg, "global")?;
    }
    for &i in on {
        l.homes[i].yaml = storage_yaml(pg, &format!("home{i}"))?;
    }
    Ok(l)
}
