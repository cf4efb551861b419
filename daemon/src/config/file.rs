//! The YAML file, as serde sees it. Positions are kept (`Spanned`) wherever a
//! later check may need to point at a value.

use std::path::PathBuf;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// A whole config file. Each section present runs one role.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Logging settings.
    #[serde(default)]
    pub log: Option<LogFile>,
    /// Run the global directory server.
    #[serde(default)]
    pub global: Option<GlobalFile>,
    /// Run one home server.
    #[serde(default)]
    pub home: Option<HomeFile>,
    /// Run several home servers in this process (a one-machine network).
    #[serde(default)]
    pub homes: Vec<HomeFile>,
    /// Run a desktop agent.
    #[serde(default)]
    pub agent: Option<AgentFile>,
}

/// `log:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// Tracing filter, e.g. `info`, `debug`, `popupd=debug,zbus=warn`.
    /// `RUST_LOG` overrides it.
    pub level: Option<Spanned<String>>,
}

/// `global:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalFile {
    /// DNS name in the global server's certificate.
    pub name: Spanned<String>,
    /// `IP:PORT` to listen on for homes.
    pub listen: Spanned<String>,
    /// PEM certificate chain (from `popupd ca issue`).
    pub cert: Spanned<PathBuf>,
    /// PEM private key.
    pub key: Spanned<PathBuf>,
    /// The network CA certificate; homes must present a certificate under it.
    pub ca: Spanned<PathBuf>,
    /// Where the directory database lives (with SQLite), and the admin
    /// socket.
    pub data_dir: Spanned<PathBuf>,
    /// The database: left out, SQLite in `data_dir`; `postgres:` for a
    /// PostgreSQL database.
    #[serde(default)]
    pub storage: Option<StorageFile>,
    /// Limits for what connects (see `LimitsFile`).
    #[serde(default)]
    pub limits: Option<LimitsFile>,
    /// Names of revoked homes, one a line (default: `revoked` beside `ca`).
    #[serde(default)]
    pub revoked: Option<Spanned<PathBuf>>,
    /// `IP:PORT` to serve Prometheus metrics on (`GET /metrics`); no
    /// metrics unless set.
    #[serde(default)]
    pub metrics: Option<Spanned<String>>,
}

/// `limits:` of a server: what an open port needs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Connections accepted but not logged in yet, at most (default 1024).
    #[serde(default)]
    pub pending_connections: Option<Spanned<usize>>,
    /// Of those, from one IP address (default 64).
    #[serde(default)]
    pub pending_per_address: Option<Spanned<usize>>,
    /// From TCP accept to a valid `hello` (default 10s).
    #[serde(default)]
    pub login_timeout: Option<Spanned<String>>,
    /// Links from other homes (on the global server: homes) held at once
    /// (default 1000).
    #[serde(default)]
    pub peer_links: Option<Spanned<usize>>,
    /// Messages a second one user may send, sustained (default 30).
    #[serde(default)]
    pub send_rate: Option<Spanned<usize>>,
    /// Messages one user may send at once above that (default 300).
    #[serde(default)]
    pub send_burst: Option<Spanned<usize>>,
    /// Contact changes a minute one user may make (default 60, 20 at once).
    #[serde(default)]
    pub contact_rate: Option<Spanned<usize>>,
    /// Least time between two presence changes of one device; changes in
    /// between are merged, the latest wins (default 1s).
    #[serde(default)]
    pub presence_interval: Option<Spanned<String>>,
    /// Events one user's mailbox holds at most (default 10000).
    #[serde(default)]
    pub mailbox_messages: Option<Spanned<usize>>,
    /// Bytes one user's mailbox holds at most (default 67108864, 64 MiB).
    #[serde(default)]
    pub mailbox_bytes: Option<Spanned<usize>>,
    /// Failed logins in a row (from one address, or for one handle) before
    /// each next try waits longer (default 5).
    #[serde(default)]
    pub login_failures: Option<Spanned<usize>>,
    /// Frames a second one peer home may send, sustained (default 5000).
    #[serde(default)]
    pub peer_rate: Option<Spanned<usize>>,
    /// How long an item waits for a home that never takes it before it
    /// fails (default 7d).
    #[serde(default)]
    pub item_expiry: Option<Spanned<String>>,
    /// Handles one home may claim (global server only; default 100000).
    #[serde(default)]
    pub handles_per_home: Option<Spanned<usize>>,
}

/// `home:` or an entry of `homes:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeFile {
    /// This home's name: the DNS name in its certificate, unique in the network.
    pub name: Spanned<String>,
    /// `IP:PORT` to listen on for agents and other homes.
    pub listen: Spanned<String>,
    /// `HOST:PORT` where other homes reach this one (default: `listen`).
    #[serde(default)]
    pub public_address: Option<Spanned<String>>,
    /// PEM certificate chain (from `popupd ca issue`).
    pub cert: Spanned<PathBuf>,
    /// PEM private key.
    pub key: Spanned<PathBuf>,
    /// The network CA certificate.
    pub ca: Spanned<PathBuf>,
    /// Where accounts and the message queue live (with SQLite), and the
    /// admin socket.
    pub data_dir: Spanned<PathBuf>,
    /// The database: left out, SQLite in `data_dir`; `postgres:` for a
    /// PostgreSQL database of this home's own.
    #[serde(default)]
    pub storage: Option<StorageFile>,
    /// The global directory server.
    pub global: RemoteFile,
    /// Drop an agent that sent nothing (not even a ping) for this long.
    #[serde(default)]
    pub idle_timeout: Option<Spanned<String>>,
    /// How long a route learned from the global server is trusted.
    #[serde(default)]
    pub route_cache_ttl: Option<Spanned<String>>,
    /// Most agent connections held at once (logged in).
    #[serde(default)]
    pub max_connections: Option<Spanned<usize>>,
    /// Limits for what connects (see `LimitsFile`).
    #[serde(default)]
    pub limits: Option<LimitsFile>,
    /// Names of revoked homes, one a line (default: `revoked` beside `ca`).
    #[serde(default)]
    pub revoked: Option<Spanned<PathBuf>>,
    /// How long a user whose last device dropped still shows their
    /// presence, so a quick reconnect does not flap it (default 10s).
    #[serde(default)]
    pub presence_grace: Option<Spanned<String>>,
    /// `IP:PORT` to serve Prometheus metrics on (`GET /metrics`); no
    /// metrics unless set.
    #[serde(default)]
    pub metrics: Option<Spanned<String>>,
    /// One node of a home that runs on several (needs `storage: postgres`).
    #[serde(default)]
    pub cluster: Option<ClusterFile>,
}

/// `cluster:` of a home: this node's name, and the NATS server that
/// carries what one node tells the others.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// Unique among the nodes of this home.
    pub node: Spanned<String>,
    /// `nats://HOST:PORT` (`tls://` for TLS), or several comma-separated.
    pub nats: Spanned<String>,
}

/// `storage:` of a server: a PostgreSQL database instead of SQLite.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageFile {
    /// `postgresql://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=require`, or
    /// `key=value` pairs (libpq's connection strings).
    pub postgres: Spanned<String>,
    /// CA certificate (PEM) that signs the database server's certificate
    /// (default: the system's trusted roots).
    #[serde(default)]
    pub ca: Option<Spanned<PathBuf>>,
}

/// A server to dial.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteFile {
    /// Its DNS name, as in its certificate.
    pub name: Spanned<String>,
    /// `HOST:PORT` to connect to.
    pub address: Spanned<String>,
}

/// `agent:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// The person's handle.
    pub handle: Spanned<String>,
    /// This device's id (from `popupd user add`).
    pub device: Spanned<String>,
    /// This device's secret (from `popupd user add`). Never logged.
    pub secret: Secret,
    /// The home server's name, as in its certificate.
    pub home: Spanned<String>,
    /// `HOST:PORT` of the home (default: `HOME:443`).
    #[serde(default)]
    pub address: Option<Spanned<String>>,
    /// CA certificate that signs the home's certificate (default: system roots).
    #[serde(default)]
    pub ca: Option<Spanned<PathBuf>>,
    /// `http://HOST:PORT` proxy to tunnel through, or `none` (default:
    /// `HTTPS_PROXY`).
    #[serde(default)]
    pub proxy: Option<Spanned<String>>,
    /// Go away after the desktop is idle this long (default 5m; `off`
    /// turns automatic away off).
    #[serde(default)]
    pub away_after: Option<Spanned<String>>,
    /// Where idle time comes from: `auto` (default), `x11`, `screensaver`,
    /// `mutter` or `logind`.
    #[serde(default)]
    pub idle_source: Option<Spanned<String>>,
    /// Interval of keepalive pings on the back connection (default 25s).
    #[serde(default)]
    pub keepalive: Option<Spanned<String>>,
    /// Where history and the outbox live (default `$XDG_DATA_HOME/popupd`).
    #[serde(default)]
    pub data_dir: Option<Spanned<PathBuf>>,
    /// `session` (default) or a D-Bus address to serve on.
    #[serde(default)]
    pub bus: Option<Spanned<String>>,
    /// Folders to load plugins from (default: `/usr/lib/popupd/plugins`
    /// and `~/.local/lib/popupd/plugins`).
    #[serde(default)]
    pub plugin_dirs: Option<Vec<Spanned<PathBuf>>>,
    /// A plugin call running longer than this disables the plugin (default 5s).
    #[serde(default)]
    pub plugin_deadline: Option<Spanned<String>>,
    /// Each plugin's own settings, by plugin name; `false` keeps it from loading.
    #[serde(default)]
    pub plugins: std::collections::BTreeMap<String, serde_json::Value>,
}

/// A secret that never reaches a log.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(****)")
    }
}
