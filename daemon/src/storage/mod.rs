//! The daemon's stores, each behind the group commit of `popupd-store`:
//! [`agent`] (history, outbox, requests, signals) on SQLite, [`home`]
//! (accounts, devices, mailboxes, forward queue, contacts) on SQLite or,
//! in [`home_pg`], PostgreSQL, and [`global`] (the directory) on SQLite.

pub mod agent;
pub mod global;
pub mod home;
pub mod home_pg;

/// Opens a server's records where its config says: the SQLite file `file`
/// in `data_dir`, or PostgreSQL. A PostgreSQL client is made off the Tokio
/// runtime, and must be used and dropped off it too (on a store thread).
/// The data folder is made either way: it holds the admin socket.
pub fn open_records<T: ?Sized>(
    storage: &crate::config::Storage,
    data_dir: &std::path::Path,
    file: &str,
    sqlite: impl FnOnce(&std::path::Path) -> Result<Box<T>, popupd_store::StoreError>,
    postgres: impl FnOnce(&popupd_store::pg::PgTarget) -> Result<Box<T>, popupd_store::StoreError>
    + Send,
) -> anyhow::Result<Box<T>>
where
    Box<T>: Send,
{
    use anyhow::Context as _;
    match storage {
        crate::config::Storage::Sqlite => {
            let path = data_dir.join(file);
            sqlite(&path).with_context(|| format!("opening {}", path.display()))
        }
        crate::config::Storage::Postgres(target) => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            popupd_store::pg::off_runtime(|| postgres(target))
                .with_context(|| format!("opening the database {}", target.describe()))
        }
    }
}

/// Hex of SHA-256, for device secrets (high-entropy tokens need no slow hash).
pub fn secret_hash(secret: &str) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes()).as_ref())
}

/// A fresh 256-bit secret, hex.
pub fn new_secret() -> String {
    let mut b = [0u8; 32];
    // aws-lc's generator only fails if the OS has no randomness at all.
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        panic!("the operating system gave no random bytes");
    }
    hex(&b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
/// A fresh database `name` on the test process's own PostgreSQL, or
/// `None` when there is none: the test says "skipped" and why (and
/// fails instead under CI, where PostgreSQL is installed).
pub(crate) fn test_pg(name: &str) -> Option<popupd_store::pg::PgTarget> {
    match popupd_store::pg_test_server::shared().and_then(|s| s.create_db(name)) {
        Ok(url) => Some(popupd_store::pg::PgTarget {
            config: url.parse().expect("test URL"),
            tls: popupd_protocol::net::tls::client_config(
                popupd_protocol::net::tls::system_roots(),
                None,
            )
            .expect("TLS config"),
        }),
        Err(why) if popupd_store::pg_test_server::required() => {
            panic!("{name}: PostgreSQL is needed under CI: {why}")
        }
        Err(why) => {
            println!("skipped: {name}: {why}");
            eprintln!("skipped: {name}: {why}");
            None
        }
    }
}
