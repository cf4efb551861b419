//! The daemon's stores, each behind the group commit of `popupd-store`:
//! [`agent`] (history, outbox, requests, signals) on SQLite, [`home`]
//! (accounts, devices, mailboxes, forward queue, contacts) on SQLite or,
//! in [`home_pg`], PostgreSQL, and [`global`] (the directory) on SQLite.

pub mod agent;
pub mod global;
pub mod home;
pub mod home_pg;

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
