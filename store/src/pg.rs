//! PostgreSQL, beside SQLite: connecting (TLS through rustls on aws-lc-rs),
//! what its errors mean to a caller, schema versions, and the savepoints a
//! [`Batcher`](crate::Batcher) batch needs.
//!
//! The client is tokio-postgres, driven synchronously ([`PgConn`]): a
//! current-thread runtime of its own per connection, which runs only while
//! a call waits. A store runs on one [`Batcher`](crate::Batcher) thread that
//! takes every job waiting, runs them in one transaction (a savepoint each)
//! and answers after the one commit: that thread needs one connection it
//! can call synchronously, not a pool of connections shared by tasks. A
//! pool would split a batch over connections and lose the group commit
//! (one WAL flush for the batch). Readers off the store thread (an
//! operator's scrape) open a connection of their own.
//!
//! Each statement waited for is a round trip to the server, so writes
//! whose answer the caller does not need are sent without waiting
//! ([`PgConn::send`]): tokio-postgres pipelines them ahead of the next
//! statement on the connection, and the server runs them in order. A
//! failure among them aborts the transaction, which the next statement
//! waited for (at the latest the job's end, [`PgBatch::job_end`]) finds.
//!
//! A connection must be made, used and dropped where no Tokio runtime
//! drives the thread (its own runtime would be nested): the store thread,
//! a blocking task, or [`off_runtime`].
//!
//! **Durability:** a commit returns once PostgreSQL has flushed its WAL
//! (`synchronous_commit = on`, which [`connect`] sets for the session), so
//! a store on PostgreSQL needs no syncer: "accepted" means on disk.

use std::sync::Arc;

pub use tokio_postgres as postgres;

use crate::StoreError;

/// Where a store's database is, and how to reach it.
#[derive(Clone)]
pub struct PgTarget {
    /// Parsed from a `postgresql://` URL or a `key=value` string; its
    /// `Debug` hides the password.
    pub config: postgres::Config,
    /// TLS for `sslmode=prefer` (the default) and `require`.
    pub tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// How the target is named in messages: user, host(s), port(s) and
    /// database, never the password.
    pub fn describe(&self) -> String {
        let c = &self.config;
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = c.get_ports().iter().map(|p| p.to_string()).collect();
        format!(
            "postgresql://{}@{}:{}/{}",
            c.get_user().unwrap_or(""),
            hosts.join(","),
            ports.join(","),
            c.get_dbname().unwrap_or("")
        )
    }
}

/// Runs `f` on a thread no Tokio runtime drives, and waits for it: a
/// synchronous client called from async code.
pub fn off_runtime<R: Send, F: FnOnce() -> R + Send>(f: F) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// How long to wait for the database before a connection attempt fails.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Unacknowledged data older than this ends the connection (a silent cut),
/// rather than holding the store thread for the kernel's 15 minutes.
const TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Opens a connection for `application_name` `app`.
pub fn connect(t: &PgTarget, app: &str) -> Result<PgConn, StoreError> {
    let mut cfg = t.config.clone();
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name(app);
    }
    let mut c = PgConn::start(&cfg, MakeRustls(t.tls.clone())).map_err(|e| unavailable(t, e))?;
    c.batch_execute("SET synchronous_commit = on")?;
    Ok(c)
}

/// Opens a connection without TLS, from a URL: for a server on loopback
/// (tests).
pub fn connect_plain(url: &str) -> Result<PgConn, StoreError> {
    let cfg: postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Db(format!("{url}: {e}")))?;
    PgConn::start(&cfg, postgres::NoTls)
}

/// One connection, called synchronously (see the module's docs).
pub struct PgConn {
    rt: tokio::runtime::Runtime,
    client: postgres::Client,
    /// Statements prepared on this connection, by their text.
    prepared: std::collections::HashMap<&'static str, postgres::Statement>,
    /// Writes were sent that nothing waited for since.
    unsynced: bool,
}

impl PgConn {
    /// Connects without TLS (a test server on loopback), or with the
    /// given TLS.
    pub fn start<T>(cfg: &postgres::Config, tls: T) -> Result<PgConn, StoreError>
    where
        T: postgres::tls::MakeTlsConnect<postgres::Socket> + 'static + Send,
        T::TlsConnect: Send,
        T::Stream: Send,
        <T::TlsConnect as postgres::tls::TlsConnect<postgres::Socket>>::Future: Send,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Db(format!("cannot start a database client: {e}")))?;
        let (client, conn) = rt.block_on(cfg.connect(tls))?;
        rt.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("database connection ended: {e}");
            }
        });
        Ok(PgConn {
            rt,
            client,
            prepared: Default::default(),
            unsynced: false,
        })
    }

    /// Whether the connection is gone (the server closed it, or it broke).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    fn statement(&mut self, sql: &'static str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.rt.block_on(self.client.prepare(sql))?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }

    /// Runs a prepared statement and returns its rows.
    pub fn query(
        &mut self,
        sql: &'static str,
        p: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let st = self.statement(sql)?;
        self.unsynced = false;
        self.rt.block_on(self.client.query(&st, p))
    }

    /// Runs a prepared statement and returns its row, if any.
    pub fn query_opt(
        &mut self,
        sql: &'static str,
        p: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Option<postgres::Row>, postgres::Error> {
        let st = self.statement(sql)?;
        self.unsynced = false;
        self.rt.block_on(self.client.query_opt(&st, p))
    }

    /// Runs a prepared statement and returns how many rows it changed.
    pub fn execute(
        &mut self,
        sql: &'static str,
        p: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let st = self.statement(sql)?;
        self.unsynced = false;
        self.rt.block_on(self.client.execute(&st, p))
    }

    /// Sends a prepared statement and does not wait for its answer: it
    /// runs before whatever is sent next, and if it fails, the next
    /// statement waited for fails too (the transaction is aborted).
    pub fn send(
        &mut self,
        sql: &'static str,
        p: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<(), postgres::Error> {
        let st = self.statement(sql)?;
        // The first poll encodes the statement and queues it on the
        // connection; the answer is read, and dropped, by the connection
        // task at the next call that waits.
        let fut = self.client.execute(&st, p);
        let mut fut = std::pin::pin!(fut);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(Err(e)) = fut.as_mut().poll(&mut cx) {
            return Err(e);
        }
        self.unsynced = true;
        Ok(())
    }

    /// Whether writes were sent that nothing waited for since.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Runs SQL without parameters (several statements, simple protocol).
    pub fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.unsynced = false;
        self.rt.block_on(self.client.batch_execute(sql))
    }
}

use std::future::Future as _;

/// The size of the target's database, on a connection of its own.
pub fn database_bytes(t: &PgTarget) -> Result<u64, StoreError> {
    let mut c = connect(t, "popupd status")?;
    let r = c.query_opt("SELECT pg_database_size(current_database())", &[])?;
    Ok(r.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
}

fn unavailable(t: &PgTarget, e: StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => {
            StoreError::Unavailable(format!("connecting to {}: {m}", t.describe()))
        }
        other => other,
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        let text = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => {
                // The cause ("Connection refused") is in the source chain.
                let mut t = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    let more = c.to_string();
                    if !t.contains(&more) {
                        t = format!("{t}: {more}");
                    }
                    cause = c.source();
                }
                t
            }
        };
        match e.code().map(|c| c.code()) {
            // disk_full, out_of_memory... (class 53: insufficient resources)
            Some("53100") => StoreError::Full(text),
            // Connection exceptions, and a server shutting down or starting.
            Some(c) if c.starts_with("08") || c.starts_with("57P") || c.starts_with("53") => {
                StoreError::Unavailable(text)
            }
            // Another transaction held what this one needed (a deadlock
            // undone, a serialization failure): the same change may work at
            // once.
            Some("55P03" | "40P01" | "40001") => StoreError::Unavailable(text),
            Some(_) => StoreError::Db(text),
            // No answer from the server at all: the connection is down.
            None => StoreError::Unavailable(text),
        }
    }
}

/// Most jobs in one PostgreSQL transaction. Each job's savepoint that
/// writes is a subtransaction, and past 64 of them in one transaction
/// (`PGPROC_MAX_CACHED_SUBXIDS`) every snapshot taken meanwhile must look
/// them up in `pg_subtrans`: the server's CPU per change grows with the
/// batch. More commits of at most this many cost less.
pub const MAX_BATCH: usize = 64;

/// One step of a PostgreSQL schema: SQL run in the transaction that
/// records the version it makes. Step `i` (from 0) makes version `i + 1`.
pub type PgStep = &'static str;

/// Brings `store`'s tables in the database up to the last of `steps`,
/// recording versions in `popupd_schema` (one row per store, which also
/// names the server that owns them: two homes never share tables).
/// Nodes that start at once take turns (an advisory lock), each step is
/// one transaction with its version, and a database of a newer popupd, or
/// of another server, is refused.
pub fn pg_migrate(
    c: &mut PgConn,
    target: &PgTarget,
    store: &str,
    owner: &str,
    steps: &[PgStep],
) -> Result<(), StoreError> {
    c.batch_execute("BEGIN")?;
    let r = migrate_in(c, target, store, owner, steps);
    match r {
        Ok(()) => Ok(c.batch_execute("COMMIT")?),
        Err(e) => {
            let _ = c.batch_execute("ROLLBACK");
            Err(e)
        }
    }
}

fn migrate_in(
    c: &mut PgConn,
    target: &PgTarget,
    store: &str,
    owner: &str,
    steps: &[PgStep],
) -> Result<(), StoreError> {
    let at = target.describe();
    let fail = |what: String| StoreError::Db(format!("{at}: {what}"));
    // One key for every popupd schema change in this database.
    c.batch_execute(
        "SELECT pg_advisory_xact_lock(7034117);
         CREATE TABLE IF NOT EXISTS popupd_schema(
            store TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            version INTEGER NOT NULL
         )",
    )?;
    let row = c.query_opt(
        "SELECT owner, version FROM popupd_schema WHERE store = $1",
        &[&store],
    )?;
    let want = steps.len() as i32;
    let have = match row {
        Some(r) => {
            let (o, v): (String, i32) = (r.get(0), r.get(1));
            if o != owner {
                return Err(fail(format!(
                    "the {store} tables here belong to {o}, not {owner}: give each {store} a database of its own"
                )));
            }
            v
        }
        None => {
            c.execute(
                "INSERT INTO popupd_schema(store, owner, version) VALUES ($1, $2, 0)",
                &[&store, &owner],
            )?;
            0
        }
    };
    if have > want {
        return Err(fail(format!(
            "the {store} schema has version {have}, newer than this popupd knows ({want}): run the popupd that made it, or a newer one"
        )));
    }
    for (i, step) in steps.iter().enumerate().skip(have as usize) {
        let v = i as i32 + 1;
        c.batch_execute(step)
            .and_then(|()| {
                c.execute(
                    "UPDATE popupd_schema SET version = $2 WHERE store = $1",
                    &[&store, &v],
                )
            })
            .map_err(|e| fail(format!("upgrading the {store} schema to version {v}: {e}")))?;
        if have > 0 || i > 0 {
            tracing::info!(database = %at, store, version = v, "database schema upgraded");
        }
    }
    Ok(())
}

/// The transaction and savepoints of a batch on one connection, for a
/// [`Batchable`](crate::Batchable) store.
///
/// Each round trip to the server costs the store thread a wait, so the
/// statements of the machinery travel together where they can: a job's
/// `RELEASE` goes with the next job's `SAVEPOINT`; a job that sent writes
/// without waiting ends with that pair, which also finds whether they all
/// succeeded. A statement that failed aborts PostgreSQL's transaction until
/// its savepoint is rolled back, so a job whose statement failed is rolled
/// back even if it went on to succeed, and [`job_end`](Self::job_end) says
/// so.
#[derive(Default)]
pub struct PgBatch {
    /// The savepoint of a finished job is open and may be released.
    open_job: bool,
    /// A fresh savepoint is open for the next job already.
    ready: bool,
    /// A statement of the current job failed.
    poisoned: bool,
}

impl PgBatch {
    /// Begins a batch's transaction; with `lock`, holding that advisory
    /// lock (`pg_advisory_xact_lock`) until it ends.
    pub fn begin(&mut self, c: &mut PgConn, lock: Option<i64>) -> Result<(), StoreError> {
        *self = PgBatch::default();
        match lock {
            None => c.batch_execute("BEGIN")?,
            // The number is ours, not the client's: no injection.
            Some(k) => c.batch_execute(&format!("BEGIN; SELECT pg_advisory_xact_lock({k})"))?,
        }
        Ok(())
    }
    pub fn commit(&mut self, c: &mut PgConn) -> Result<(), StoreError> {
        if c.unsynced() {
            // Writes sent outside a job (an admin command's): COMMIT of an
            // aborted transaction is a silent rollback, so look first.
            c.batch_execute("SELECT 1")?;
        }
        *self = PgBatch::default();
        c.batch_execute("COMMIT")?;
        Ok(())
    }
    pub fn rollback(&mut self, c: &mut PgConn) {
        *self = PgBatch::default();
        if !c.is_closed() {
            let _ = c.batch_execute("ROLLBACK");
        }
    }
    pub fn job_begin(&mut self, c: &mut PgConn) -> Result<(), StoreError> {
        self.poisoned = false;
        if std::mem::take(&mut self.ready) {
            return Ok(());
        }
        if std::mem::take(&mut self.open_job) {
            c.batch_execute("RELEASE job; SAVEPOINT job")?;
        } else {
            c.batch_execute("SAVEPOINT job")?;
        }
        Ok(())
    }
    /// Ends the job; `Err` if it said `ok` but one of its statements
    /// failed, so its changes were rolled back after all.
    pub fn job_end(&mut self, c: &mut PgConn, ok: bool) -> Result<(), StoreError> {
        let mut poisoned = std::mem::take(&mut self.poisoned);
        if ok && !poisoned {
            if !c.unsynced() {
                self.open_job = true;
                return Ok(());
            }
            // Its writes were sent without waiting: this pair finds
            // whether they took, and opens the next job's savepoint.
            match c.batch_execute("RELEASE job; SAVEPOINT job") {
                Ok(()) => {
                    self.ready = true;
                    return Ok(());
                }
                Err(_) => poisoned = true,
            }
        }
        self.open_job = false;
        self.ready = false;
        c.batch_execute("ROLLBACK TO job; RELEASE job")?;
        if ok && poisoned {
            return Err(StoreError::Db(
                "a statement of this change failed, so none of it was kept".into(),
            ));
        }
        Ok(())
    }
    /// Called with a statement's result: remembers a failure.
    pub fn watch<T>(&mut self, r: Result<T, postgres::Error>) -> Result<T, StoreError> {
        r.map_err(|e| {
            self.poisoned = true;
            StoreError::from(e)
        })
    }
    /// After connecting again: the old connection's transaction is gone.
    pub fn reset(&mut self) {
        *self = PgBatch::default();
    }
}

// TLS to the database through the process's rustls on aws-lc-rs. A small
// connector of our own rather than tokio-postgres-rustls: that crate
// builds ring for its channel-binding digests, a second crypto library.
// SCRAM runs without channel binding here (`ChannelBinding::none`): the
// server's certificate is verified by rustls, which is what binding would
// add to a password exchange.

struct MakeRustls(Arc<rustls::ClientConfig>);

impl<S> postgres::tls::MakeTlsConnect<S> for MakeRustls
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            config: self.0.clone(),
            name: rustls::pki_types::ServerName::try_from(domain.to_owned())?,
        })
    }
}

struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

type TlsFuture<S> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<RustlsStream<S>>> + Send>>;

impl<S> postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future = TlsFuture<S>;

    fn connect(self, stream: S) -> Self::Future {
        let c = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move { Ok(RustlsStream(c.connect(self.name, stream).await?)) })
    }
}

struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> postgres::tls::TlsStream for RustlsStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn channel_binding(&self) -> postgres::tls::ChannelBinding {
        postgres::tls::ChannelBinding::none()
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead
    for RustlsStream<S>
{
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for RustlsStream<S>
{
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
