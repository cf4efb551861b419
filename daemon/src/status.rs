//! `popupd status`: a running home or global server answers how it is on
//! its admin socket, `admin.sock` in its `data_dir` (mode 0660, the group
//! of `data_dir`: root and the popupd group may ask). The client writes
//! `status` and a newline; the server answers one [`Report`] as JSON and
//! closes. docs/status.md describes the JSON, which only grows.
//!
//! Also here: when a certificate expires, and the warning for one that
//! expires within [`WARN_DAYS`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::task::Shutdown;

/// The socket's file name in `data_dir`.
pub const SOCKET: &str = "admin.sock";

/// A certificate that expires within this many days is warned of.
pub const WARN_DAYS: i64 = 30;

/// How long `popupd status` waits for an answer, and a server for the
/// question.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// The admin socket of a server whose data lives in `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// How one server is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `home` or `global`.
    pub role: String,
    pub name: String,
    /// popupd's version.
    pub version: String,
    pub pid: u32,
    /// When it started (RFC 3339, UTC).
    pub started: String,
    pub uptime_seconds: u64,
    pub connections: Connections,
    /// Peer homes: a home's links to other homes; the global server's
    /// linked homes.
    pub peers: Vec<PeerLink>,
    /// Items in the forward queue waiting for a route (homes; 0 on global).
    pub unrouted: u64,
    /// A node of a home on several: which, and what it knows of the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterState>,
    pub store: StoreHealth,
    pub certificates: Vec<Certificate>,
    /// What needs an operator, in words (empty when all is well).
    pub warnings: Vec<String>,
}

/// What a server of either role says alike: who it is, since when, its
/// store and certificates, and the warnings they call for.
pub struct Server<'a> {
    pub role: &'a str,
    pub name: &'a str,
    pub started: std::time::Instant,
    pub cert_path: &'a Path,
    pub ca_path: &'a Path,
    pub db: StoreAt,
    pub health: &'a popupd_store::Health,
}

/// Where a server's store is, and how big.
pub struct StoreAt {
    /// The SQLite file, or the PostgreSQL database in words.
    pub path: String,
    pub database_bytes: u64,
    /// SQLite's write-ahead log; 0 on PostgreSQL (its WAL is the server's).
    pub log_bytes: u64,
}

impl StoreAt {
    /// The store of a server whose SQLite file would be `data_dir/file`,
    /// on `storage`. PostgreSQL is asked for the database's size, on a
    /// connection of its own off the runtime (0 if it does not answer).
    pub async fn of(data_dir: &Path, file: &str, storage: &crate::config::Storage) -> StoreAt {
        use crate::config::Storage;
        match storage {
            Storage::Sqlite => {
                let db = data_dir.join(file);
                let (database_bytes, log_bytes) = db_sizes(&db);
                StoreAt {
                    path: db.display().to_string(),
                    database_bytes,
                    log_bytes,
                }
            }
            Storage::Postgres(t) => {
                let t2 = t.clone();
                let size =
                    tokio::task::spawn_blocking(move || popupd_store::pg::database_bytes(&t2))
                        .await;
                let database_bytes = match size {
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => {
                        tracing::debug!("database size: {e}");
                        0
                    }
                    Err(_) => 0,
                };
                StoreAt {
                    path: t.describe(),
                    database_bytes,
                    log_bytes: 0,
                }
            }
        }
    }
}

impl Report {
    /// A report of `server` with its role's own parts.
    pub fn new(
        server: Server<'_>,
        connections: Connections,
        peers: Vec<PeerLink>,
        unrouted: u64,
    ) -> Report {
        let certificates = certificates(server.cert_path, server.ca_path);
        let now = now_secs();
        let mut warnings: Vec<String> =
            certificates.iter().filter_map(|c| c.warning(now)).collect();
        let store = store_health(server.db, server.health);
        if store.failed_commits > 0 {
            warnings.push(format!(
                "{} store commits failed since start (see the log)",
                store.failed_commits
            ));
        }
        let up = server.started.elapsed();
        Report {
            role: server.role.into(),
            name: server.name.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            started: humantime::format_rfc3339_seconds(std::time::SystemTime::now() - up)
                .to_string(),
            uptime_seconds: up.as_secs(),
            connections,
            peers,
            unrouted,
            cluster: None,
            store,
            certificates,
            warnings,
        }
    }
}

/// A node of a home on several (`cluster:`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    /// This node's name.
    pub node: String,
    /// Whether its NATS connection is up.
    pub nats_connected: bool,
    /// The other nodes it hears from.
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Connections {
    /// Agents logged in (homes).
    pub agents: u64,
    /// Peer homes logged in (on the global server: linked homes).
    pub peers: u64,
    /// Connections accepted and not logged in yet.
    pub pending: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerLink {
    pub home: String,
    /// `linked` (a link is up), `dialing` (none is; a dialer tries), or
    /// `idle` (neither: nothing to send).
    pub state: String,
    /// Links up with it.
    pub links: u64,
    /// Items waiting in the forward queue for it.
    pub queued: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreHealth {
    /// The database file.
    pub path: String,
    /// Seconds since the last commit (`null` before the first).
    pub last_commit_age_seconds: Option<f64>,
    /// Jobs waiting for the store thread.
    pub waiting_jobs: u64,
    /// Commits that failed since start.
    pub failed_commits: u64,
    pub database_bytes: u64,
    /// The write-ahead log.
    pub log_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Certificate {
    /// What it is: `server` or `ca`.
    pub kind: String,
    pub file: String,
    /// When it expires (RFC 3339, UTC).
    pub not_after: String,
    /// Seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// Whole days left (negative once expired).
    pub days_left: i64,
}

impl Certificate {
    /// The certificate in `der`, read from `file`, if its validity parses.
    pub fn of(kind: &str, file: &Path, der: &[u8]) -> Option<Certificate> {
        let t = not_after(der)?;
        let at = std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        Some(Certificate {
            kind: kind.to_owned(),
            file: file.display().to_string(),
            not_after: humantime::format_rfc3339_seconds(at).to_string(),
            not_after_unix: t,
            days_left: (t - now_secs()).div_euclid(86_400),
        })
    }

    /// A warning if it expires within [`WARN_DAYS`] of `now` (Unix
    /// seconds), or has expired.
    pub fn warning(&self, now: i64) -> Option<String> {
        expiry_warning(&self.kind, &self.file, self.not_after_unix, now)
    }
}

/// The warning for a `kind` certificate in `file` that expires at
/// `not_after` (Unix seconds), if that is within [`WARN_DAYS`] of `now`.
pub fn expiry_warning(kind: &str, file: &str, not_after: i64, now: i64) -> Option<String> {
    let left = not_after - now;
    if left >= WARN_DAYS * 86_400 {
        return None;
    }
    let what = if kind == "ca" {
        "the CA certificate"
    } else {
        "the certificate"
    };
    let fix = if kind == "ca" {
        "make a new CA and issue new certificates before then"
    } else {
        "issue a new one (popupd ca issue NAME) and reload"
    };
    Some(if left <= 0 {
        format!(
            "{what} {file} has expired ({} days ago): {fix}",
            (-left).div_euclid(86_400)
        )
    } else {
        format!(
            "{what} {file} expires in {} days: {fix}",
            left.div_euclid(86_400)
        )
    })
}

/// Certificates of a server, read from their files now (a reload may have
/// replaced them): its own (the first of its chain) and the CA's.
pub fn certificates(cert_path: &Path, ca_path: &Path) -> Vec<Certificate> {
    [("server", cert_path), ("ca", ca_path)]
        .into_iter()
        .filter_map(|(kind, path)| {
            let certs = popupd_protocol::net::tls::load_certs(path).ok()?;
            Certificate::of(kind, path, certs.first()?)
        })
        .collect()
}

/// Warns in the log of each certificate near its end: at once, then daily.
pub async fn warn_of_expiry(server: String, cert: PathBuf, ca: PathBuf, shutdown: Shutdown) {
    loop {
        for w in certificates(&cert, &ca)
            .iter()
            .filter_map(|c| c.warning(now_secs()))
        {
            tracing::warn!("{server}: {w}");
        }
        if crate::task::sleep_or_shutdown(Duration::from_secs(86_400), &shutdown).await {
            return;
        }
    }
}

/// The first expiry warning of these certificates, for a systemd
/// `STATUS=` line.
pub fn expiry_note(cert: &Path, ca: &Path) -> String {
    certificates(cert, ca)
        .iter()
        .find_map(|c| c.warning(now_secs()))
        .map(|w| format!("; WARNING: {w}"))
        .unwrap_or_default()
}

/// Now, in seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    popupd_protocol::now_ms().div_euclid(1000)
}

/// The file sizes of a SQLite database and its log.
pub fn db_sizes(db: &Path) -> (u64, u64) {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    (size(db), size(Path::new(&wal)))
}

/// A store's health now.
pub fn store_health(db: StoreAt, h: &popupd_store::Health) -> StoreHealth {
    let StoreAt {
        path,
        database_bytes,
        log_bytes,
    } = db;
    StoreHealth {
        path,
        last_commit_age_seconds: h
            .last_commit_ms()
            .map(|t| (popupd_protocol::now_ms() - t).max(0) as f64 / 1000.0),
        waiting_jobs: h.waiting(),
        failed_commits: h.failed_commits(),
        database_bytes,
        log_bytes,
    }
}

/// Makes the admin socket of a server whose data lives in `data_dir`:
/// mode 0660, with the group of `data_dir`. A socket left by a server that
/// died is replaced; one a live server answers on is not.
pub async fn listen(data_dir: &Path) -> anyhow::Result<(UnixListener, PathBuf)> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
    let path = socket_path(data_dir);
    // A socket left by a server that died: nobody answers on it.
    if let Ok(m) = std::fs::symlink_metadata(&path)
        && m.file_type().is_socket()
        && UnixStream::connect(&path).await.is_err()
    {
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot make the admin socket {}: {e} (is another popupd running on this data_dir?)",
            path.display()
        )
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
    if let Ok(d) = std::fs::metadata(data_dir) {
        // Only root may give it a group it is not in; otherwise it has
        // the group the process runs as.
        let _ = std::os::unix::fs::chown(&path, None, Some(d.gid()));
    }
    Ok((listener, path))
}

/// Answers `status` on `listener` (made by [`listen`] at `path`) until
/// `shutdown`, with what `report` says; removes the socket at the end.
pub async fn serve<F, Fut>((listener, path): (UnixListener, PathBuf), report: F, shutdown: Shutdown)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Report> + Send,
{
    loop {
        let mut conn = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((c, _)) => c,
                Err(e) => {
                    tracing::warn!("admin socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // One question at a time: an admin asks now and then.
        let answered = tokio::time::timeout(ASK_TIMEOUT, async {
            let mut line = String::new();
            let mut r = BufReader::new((&mut conn).take(256));
            r.read_line(&mut line).await?;
            let answer = match line.trim() {
                "status" => serde_json::to_string(&report().await)?,
                other => serde_json::json!({ "error": format!("unknown request {other:?}; ask `status`") })
                    .to_string(),
            };
            conn.write_all(answer.as_bytes()).await?;
            conn.write_all(b"\n").await?;
            conn.shutdown().await?;
            anyhow::Ok(())
        })
        .await;
        if let Ok(Err(e)) = answered {
            tracing::debug!("admin socket: {e}");
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Why `popupd status` got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error(
        "{0}: no admin socket: the server is not running (or runs another config); start it (systemctl start popupd@NAME) and try again"
    )]
    NotRunning(String),
    #[error(
        "{0}: nobody answers: the server is not running (the socket is left from an earlier run); start it (systemctl start popupd@NAME)"
    )]
    Refused(String),
    #[error(
        "{0}: permission denied: run `popupd status` as root or as a member of the socket's group ({1})"
    )]
    Denied(String, String),
    #[error("{0}: no answer within {1} s: the server is stuck or overloaded")]
    Timeout(String, u64),
    #[error("{0}: {1}")]
    Other(String, String),
}

/// Asks the server whose admin socket is `path`.
pub async fn ask(path: &Path) -> Result<Report, AskError> {
    let shown = path.display().to_string();
    let answer = tokio::time::timeout(ASK_TIMEOUT, async {
        let mut s = UnixStream::connect(path).await?;
        s.write_all(b"status\n").await?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line)
    })
    .await
    .map_err(|_| AskError::Timeout(shown.clone(), ASK_TIMEOUT.as_secs()))?;
    let line = answer.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => AskError::NotRunning(shown.clone()),
        std::io::ErrorKind::ConnectionRefused => AskError::Refused(shown.clone()),
        std::io::ErrorKind::PermissionDenied => {
            use std::os::unix::fs::MetadataExt as _;
            let group = std::fs::metadata(path)
                .map(|m| group_name(m.gid()))
                .unwrap_or_else(|_| "popupd".into());
            AskError::Denied(shown.clone(), group)
        }
        _ => AskError::Other(shown.clone(), e.to_string()),
    })?;
    serde_json::from_str(&line)
        .map_err(|e| AskError::Other(shown, format!("an answer that does not parse: {e}")))
}

/// The name of group `gid` in /etc/group, else `gid N`.
fn group_name(gid: u32) -> String {
    std::fs::read_to_string("/etc/group")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)?.parse::<u32>().ok()? == gid).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| format!("gid {gid}"))
}

/// The report as people read it.
pub fn human(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} {}: running (popupd {}, pid {})",
        r.role, r.name, r.version, r.pid
    );
    let _ = writeln!(
        o,
        "  up:           {} (since {})",
        span(r.uptime_seconds),
        r.started
    );
    let c = &r.connections;
    let _ = if r.role == "home" {
        writeln!(
            o,
            "  connections:  {} agents, {} peer homes, {} pending",
            c.agents, c.peers, c.pending
        )
    } else {
        writeln!(
            o,
            "  connections:  {} homes linked, {} pending",
            c.peers, c.pending
        )
    };
    if r.peers.is_empty() {
        let _ = writeln!(o, "  peers:        none");
    } else {
        let _ = writeln!(o, "  peers:");
        for p in &r.peers {
            let _ = if r.role == "home" {
                writeln!(o, "    {:<32} {:<8} {} queued", p.home, p.state, p.queued)
            } else {
                writeln!(o, "    {:<32} {}", p.home, p.state)
            };
        }
    }
    if r.role == "home" && r.unrouted > 0 {
        let _ = writeln!(o, "  unrouted:     {} items wait for a route", r.unrouted);
    }
    if let Some(c) = &r.cluster {
        let others = if c.nodes.is_empty() {
            "no other node heard".to_string()
        } else {
            format!("with {}", c.nodes.join(", "))
        };
        let _ = writeln!(
            o,
            "  cluster:      node {}, {others}; NATS {}",
            c.node,
            if c.nats_connected {
                "connected"
            } else {
                "not connected"
            }
        );
    }
    let s = &r.store;
    let _ = writeln!(
        o,
        "  store:        {}: last commit {}, {} jobs waiting, {} failed commits",
        s.path,
        s.last_commit_age_seconds
            .map_or("none yet".into(), |a| format!("{a:.1} s ago")),
        s.waiting_jobs,
        s.failed_commits
    );
    let _ = writeln!(
        o,
        "                database {}, log {}",
        bytes(s.database_bytes),
        bytes(s.log_bytes)
    );
    for c in &r.certificates {
        let _ = writeln!(
            o,
            "  {:<13} {} expires {} ({} days)",
            format!("{} cert:", c.kind),
            c.file,
            c.not_after,
            c.days_left
        );
    }
    for w in &r.warnings {
        let _ = writeln!(o, "  warning:      {w}");
    }
    o
}

fn span(s: u64) -> String {
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b} B"),
        1024..1_048_576 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => format!("{:.1} MiB", b as f64 / 1_048_576.0),
    }
}

/// When the certificate in `der` expires (its `notAfter`), in seconds since
/// the Unix epoch. Reads only as much DER as it takes: Certificate →
/// TBSCertificate → [version], serial, signature, issuer, validity.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (cert, _) = tlv(der, 0x30)?;
    let (mut tbs, _) = tlv(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs, 0xa0)?.1;
    }
    let rest = tlv(tbs, 0x02)?.1; // serial
    let rest = tlv(rest, 0x30)?.1; // signature algorithm
    let rest = tlv(rest, 0x30)?.1; // issuer
    let (validity, _) = tlv(rest, 0x30)?;
    let after = match validity.first()? {
        0x17 => tlv(validity, 0x17)?.1,
        _ => tlv(validity, 0x18)?.1,
    };
    let (tag, text) = match after.first()? {
        t @ (0x17 | 0x18) => (*t, tlv(after, *t)?.0),
        _ => return None,
    };
    parse_time(tag, std::str::from_utf8(text).ok()?)
}

/// One DER element of tag `tag` at the start of `b`: (its content, what
/// follows).
fn tlv(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *b.first()? != tag {
        return None;
    }
    let first = *b.get(1)? as usize;
    let (len, head) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let len = b
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |a, &x| (a << 8) | x as usize);
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    Some((b.get(head..end)?, b.get(end..)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`, 0x17) or GeneralizedTime (`YYYYMMDDHHMMSSZ`,
/// 0x18) to Unix seconds.
fn parse_time(tag: u8, s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (year, rest) = if tag == 0x17 {
        let yy: i64 = s.get(0..2)?.parse().ok()?;
        (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
    } else {
        (s.get(0..4)?.parse().ok()?, s.get(4..)?)
    };
    let n = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (mo, d, h, mi, se) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    Some(days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_expiring(y: i32, m: u8, d: u8) -> (Vec<u8>, i64) {
        let mut p = rcgen::CertificateParams::new(vec!["home-a.example.org".into()]).unwrap();
        p.not_after = rcgen::date_time_ymd(y, m, d);
        let key = rcgen::KeyPair::generate().unwrap();
        let c = p.self_signed(&key).unwrap();
        (c.der().to_vec(), p.not_after.unix_timestamp())
    }

    #[test]
    fn reads_not_after_of_utc_and_generalized_times() {
        // Before 2050 DER has UTCTime, from 2050 GeneralizedTime.
        for (y, m, d) in [(2027, 3, 1), (2049, 12, 31), (2051, 6, 15)] {
            let (der, want) = cert_expiring(y, m, d);
            assert_eq!(not_after(&der), Some(want), "{y}-{m}-{d}");
        }
        assert_eq!(not_after(b"not a certificate"), None);
    }

    #[test]
    fn warns_within_thirty_days_and_after() {
        let now = 1_800_000_000;
        let day = 86_400;
        let f = "/etc/popupd/home.crt";
        assert_eq!(expiry_warning("server", f, now + 31 * day, now), None);
        assert_eq!(expiry_warning("server", f, now + 30 * day, now), None);
        let w = expiry_warning("server", f, now + 30 * day - 1, now).unwrap();
        assert!(w.contains("expires in 29 days"), "{w}");
        assert!(w.contains(f) && w.contains("popupd ca issue"), "{w}");
        let w = expiry_warning("server", f, now + 5 * day + 10, now).unwrap();
        assert!(w.contains("expires in 5 days"), "{w}");
        let w = expiry_warning("ca", "/etc/popupd/ca.crt", now - 2 * day, now).unwrap();
        assert!(
            w.contains("the CA certificate") && w.contains("has expired (2 days ago)"),
            "{w}"
        );
        // Through a certificate: ten days left is a warning, a year none.
        let (der, _) = cert_expiring(2026, 1, 1);
        let c = Certificate::of("server", Path::new(f), &der).unwrap();
        let t = c.not_after_unix;
        assert!(c.warning(t - 10 * day).is_some());
        assert!(c.warning(t - 365 * day).is_none());
    }
}
