//! Configuration: one YAML file per daemon instance.
//!
//! Two layers, as in rathole: [`file`] holds the serde types that mirror the
//! YAML (`deny_unknown_fields`, a doc comment on every field, positions kept
//! with `Spanned`), and this module turns them into the runtime [`Config`],
//! checking what spans fields: addresses parse, certificates load, durations
//! make sense. Every error names the file, line, column and field, and says
//! what to do.
//!
//! The YAML is read with serde-saphyr: `serde_yaml` is archived and the
//! libyaml port under it is flagged unmaintained, while serde-saphyr keeps the
//! same serde model, forbids `unsafe`, is fuzzed, and reports line, column
//! and a snippet for every error.

pub mod file;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use serde_saphyr::Spanned;

use popupd_protocol::net::proxy::Proxy;
use popupd_protocol::net::tls::{self, Identity};
use popupd_protocol::valid_handle;

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{file}{at}: {field}{message}{snippet}{hint}",
    at = match (line, column) { (0, _) => String::new(), (l, c) => format!(":{l}:{c}") },
    field = if field.is_empty() { String::new() } else { format!("field `{field}`: ") },
    hint = if hint.is_empty() { String::new() } else { format!("\n  hint: {hint}") })]
pub struct ConfigError {
    pub file: String,
    pub line: u32,
    pub column: u32,
    /// Dotted path of the field, e.g. `home.listen`; empty when unknown.
    pub field: String,
    pub message: String,
    /// The offending lines, when the parser gave them (indented, one per line).
    pub snippet: Box<str>,
    pub hint: String,
}

/// The whole runtime configuration of one process.
#[derive(Debug)]
pub struct Config {
    /// The file it came from.
    pub source: PathBuf,
    pub log: LogConfig,
    pub global: Option<GlobalConfig>,
    pub homes: Vec<HomeConfig>,
    pub agent: Option<AgentConfig>,
}

impl Config {
    /// What is not an error but should be said: an agent config (it holds
    /// the device's secret) that others may read.
    pub fn warnings(&self) -> Vec<String> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        if self.agent.is_some()
            && let Ok(m) = std::fs::metadata(&self.source)
            && m.mode() & 0o077 != 0
        {
            let shown = self.source.display();
            out.push(format!(
                "{shown} holds this device's secret and others may read it (mode {:04o}); run `chmod 600 {shown}`",
                m.mode() & 0o777
            ));
        }
        out
    }
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `popupd=debug`.
    pub level: String,
}

/// The global directory server.
#[derive(Debug, Clone)]
pub struct GlobalConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub identity: Identity,
    /// Path of the certificate chain (`popupd status` names it).
    pub cert_path: PathBuf,
    pub ca: Arc<RootCertStore>,
    /// Path of the CA certificate.
    pub ca_path: PathBuf,
    pub data_dir: PathBuf,
    /// Where the directory lives.
    pub storage: Storage,
    pub limits: Limits,
    /// Names of revoked homes: refused, their links closed.
    pub revoked: Arc<std::collections::HashSet<String>>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
}

/// Where a server keeps its records (`storage:`).
#[derive(Debug, Clone)]
pub enum Storage {
    /// SQLite, in the server's `data_dir`.
    Sqlite,
    /// A PostgreSQL database.
    Postgres(Box<popupd_store::pg::PgTarget>),
}

impl Storage {
    /// Which database, in words (never a password): `sqlite`, or the
    /// PostgreSQL target.
    pub fn label(&self) -> String {
        match self {
            Storage::Sqlite => "sqlite".into(),
            Storage::Postgres(t) => t.describe(),
        }
    }
}

/// What a server's open port takes (`limits:`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections accepted but not logged in yet, at most.
    pub pending: usize,
    /// Of those, from one IP address.
    pub pending_per_address: usize,
    /// From TCP accept to a valid `hello`.
    pub login_timeout: Duration,
    /// Links from other homes (global: homes) held at once.
    pub peer_links: usize,
    /// Messages a second one user may send, sustained, and at once.
    pub send_rate: usize,
    pub send_burst: usize,
    /// Contact changes a minute one user may make.
    pub contact_rate: usize,
    /// Least time between two presence changes of one device.
    pub presence_interval: Duration,
    /// Events and bytes one user's mailbox holds at most.
    pub mailbox_messages: usize,
    pub mailbox_bytes: usize,
    /// Failed logins in a row before the next try waits.
    pub login_failures: usize,
    /// Frames a second one peer home may send.
    pub peer_rate: usize,
    /// How long an item waits for a home that never takes it.
    pub item_expiry: Duration,
    /// Handles one home may claim (global server).
    pub handles_per_home: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pending: 1024,
            pending_per_address: 64,
            login_timeout: Duration::from_secs(10),
            peer_links: 1000,
            send_rate: 30,
            send_burst: 300,
            contact_rate: 60,
            presence_interval: Duration::from_secs(1),
            mailbox_messages: 10_000,
            mailbox_bytes: 64 << 20,
            login_failures: 5,
            peer_rate: 5000,
            item_expiry: Duration::from_secs(7 * 24 * 3600),
            handles_per_home: 100_000,
        }
    }
}

/// A home server.
#[derive(Debug, Clone)]
pub struct HomeConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Where other homes (and agents) reach this home.
    pub public_address: String,
    pub identity: Identity,
    /// Path of the certificate chain (`popupd status` names it).
    pub cert_path: PathBuf,
    pub ca: Arc<RootCertStore>,
    /// Path of the CA certificate (written into agent configs).
    pub ca_path: PathBuf,
    pub data_dir: PathBuf,
    /// Where the home's records live.
    pub storage: Storage,
    pub global: Remote,
    /// An agent silent this long is dropped.
    pub idle_timeout: Duration,
    /// How long a route learned from the global server is trusted.
    pub route_ttl: Duration,
    /// Most agent connections held at once (logged in).
    pub max_connections: usize,
    pub limits: Limits,
    /// Names of revoked homes: refused, their links closed.
    pub revoked: Arc<std::collections::HashSet<String>>,
    /// A user whose last device dropped shows their presence this much
    /// longer, so a quick reconnect does not flap it.
    pub presence_grace: Duration,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// If this is one node of several (`cluster:`).
    pub cluster: Option<Cluster>,
}

/// One node of a home that runs on several.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// This node's name, unique among the home's nodes.
    pub node: String,
    /// The NATS servers, as `async-nats` takes them.
    pub nats: String,
}

/// A server this one dials.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Its name, as in its certificate.
    pub name: String,
    /// `host:port`.
    pub address: String,
}

/// Where an agent learns how long the desktop has been idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleSource {
    X11,
    ScreenSaver,
    Mutter,
    Logind,
}

impl IdleSource {
    /// A short lowercase name, for logs and configuration.
    pub fn name(self) -> &'static str {
        match self {
            IdleSource::X11 => "x11",
            IdleSource::ScreenSaver => "screensaver",
            IdleSource::Mutter => "mutter",
            IdleSource::Logind => "logind",
        }
    }
}

/// A desktop agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub handle: String,
    pub device: String,
    pub secret: file::Secret,
    pub home: Remote,
    /// Roots that verify the home's certificate.
    pub roots: Arc<RootCertStore>,
    /// The proxy to tunnel through (config, else `HTTPS_PROXY`).
    pub proxy: Option<Proxy>,
    pub keepalive: Duration,
    pub data_dir: PathBuf,
    pub bus: Bus,
    /// Where plugins are loaded from, in order.
    pub plugin_dirs: Vec<PathBuf>,
    /// Longest a plugin call may take before the plugin is disabled.
    pub plugin_deadline: Duration,
    /// Each plugin's settings (JSON), by name; `false` disables it.
    pub plugins: std::collections::BTreeMap<String, serde_json::Value>,
    /// Idle time after which presence turns to away (None: never).
    pub away_after: Option<Duration>,
    /// The one idle source to use (None: the first that works).
    pub idle_source: Option<IdleSource>,
}

/// Which D-Bus the agent serves on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    /// `DBUS_SESSION_BUS_ADDRESS`.
    Session,
    /// An explicit address (tests and the demo use private buses).
    Address(String),
}

/// A role this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Global,
    Home,
    Agent,
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: shown.clone(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read: {e}"),
            snippet: "".into(),
            hint: "give the path of a YAML config; examples are in /usr/share/doc/popupd/examples/"
                .into(),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks config text; `path` names it in errors and anchors
    /// relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let f: file::ConfigFile = serde_saphyr::from_str(text).map_err(|e| {
            let full = e.to_string();
            let (line, column) = e
                .location()
                .map(|l| (clip(l.line()), clip(l.column())))
                .or_else(|| duplicate_at(text, &full))
                .unwrap_or((0, 0));
            let mut lines = full.lines();
            // The position is already in front of the message; drop the
            // parser's own copy of it.
            let message = strip_position(lines.next().unwrap_or_default());
            let snippet: String = lines
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!("\n    {l}"))
                .collect();
            ConfigError {
                file: shown.clone(),
                line,
                column,
                field: String::new(),
                hint: syntax_hint(&message),
                message,
                snippet: snippet.into(),
            }
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let cx = Cx { file: shown, base };
        cx.build(f, path)
    }

    /// The roles this config runs, in start order.
    pub fn roles(&self) -> Vec<Role> {
        roles(
            self.global.is_some(),
            self.homes.len(),
            self.agent.is_some(),
        )
    }
}

/// Where a key named twice is named the second time, for the one error of
/// the YAML layer that comes without a position: "duplicate field `x`",
/// which serde gives when the parser did not see the keys as equal (one of
/// them carries a tag, as in `!t log:`).
fn duplicate_at(text: &str, message: &str) -> Option<(u32, u32)> {
    let name = message
        .strip_prefix("duplicate field `")?
        .split('`')
        .next()?;
    let mut found = None;
    // YAML breaks lines at CR too, alone or before LF.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    for (i, line) in text.split('\n').enumerate() {
        let body = line.trim_start();
        let indent = line.len() - body.len();
        // A tag in front of the key: `!tag key:`.
        let key = match body.strip_prefix('!') {
            Some(rest) => rest
                .split_once(char::is_whitespace)
                .map_or("", |(_, k)| k.trim_start()),
            None => body,
        };
        if key
            .strip_prefix(name)
            .is_some_and(|r| r.trim_start().starts_with(':'))
        {
            let column = indent + (body.len() - key.len());
            found = Some((clip(i as u64 + 1), clip(column as u64 + 1)));
        }
    }
    found
}

/// The role choice, a pure function of which sections are present: the
/// global server first (homes dial it), then homes, then the agent.
pub fn roles(global: bool, homes: usize, agent: bool) -> Vec<Role> {
    let mut r = Vec::new();
    if global {
        r.push(Role::Global);
    }
    r.extend(std::iter::repeat_n(Role::Home, homes));
    if agent {
        r.push(Role::Agent);
    }
    r
}

/// `error: line 4 column 3: unknown field` → `unknown field`.
fn strip_position(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix("error: ").unwrap_or(s);
    match s.split_once(": ") {
        Some((pos, rest)) if pos.starts_with("line ") && pos.contains(" column ") => {
            rest.to_owned()
        }
        _ => s.to_owned(),
    }
}

fn syntax_hint(msg: &str) -> String {
    if msg.contains("unknown field") {
        "remove or correct the key; /usr/share/doc/popupd/config.md lists what each section accepts, /usr/share/doc/popupd/examples/ has complete files".into()
    } else if msg.contains("missing field") {
        "add the field; see /usr/share/doc/popupd/examples/ for a complete file".into()
    } else {
        "check the YAML at that position".into()
    }
}

/// Context for checking one file.
struct Cx {
    file: String,
    base: PathBuf,
}

impl Cx {
    fn err<T>(&self, s: &Spanned<T>, field: &str, message: String, hint: &str) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: clip(s.referenced.line()),
            column: clip(s.referenced.column()),
            field: field.into(),
            message,
            snippet: "".into(),
            hint: hint.into(),
        }
    }

    fn whole(&self, message: &str, hint: &str) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: 0,
            column: 0,
            field: String::new(),
            message: message.into(),
            snippet: "".into(),
            hint: hint.into(),
        }
    }

    fn build(&self, f: file::ConfigFile, path: &Path) -> Result<Config, ConfigError> {
        let global = f.global.map(|g| self.global(g)).transpose()?;
        let mut homes = Vec::new();
        if let Some(h) = f.home {
            homes.push(self.home(h, "home")?);
        }
        for (i, h) in f.homes.into_iter().enumerate() {
            homes.push(self.home(h, &format!("homes[{i}]"))?);
        }
        let agent = f.agent.map(|a| self.agent(a)).transpose()?;
        if global.is_none() && homes.is_empty() && agent.is_none() {
            return Err(self.whole(
                "no role configured",
                "add a `global:`, `home:` (or `homes:`) or `agent:` section",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for h in &homes {
            if !names.insert(h.name.clone()) {
                return Err(self.whole(
                    &format!("two homes are named {:?}", h.name),
                    "give each home its own name",
                ));
            }
        }
        let level = match f.log.and_then(|l| l.level) {
            None => "info".to_string(),
            Some(l) => match l.value.parse::<tracing_subscriber::filter::Targets>() {
                Ok(_) => l.value,
                Err(e) => {
                    return Err(self.err(
                        &l,
                        "log.level",
                        format!("{:?} is not a log filter: {e}", l.value),
                        "write a level (error, warn, info, debug, trace), optionally \
                         followed by TARGET=LEVEL pairs, e.g. info,popupd=debug",
                    ));
                }
            },
        };
        Ok(Config {
            source: path.to_path_buf(),
            log: LogConfig { level },
            global,
            homes,
            agent,
        })
    }

    fn path(&self, p: &Spanned<PathBuf>) -> PathBuf {
        let v = expand_home(&p.value);
        if v.is_absolute() {
            v
        } else {
            self.base.join(v)
        }
    }

    fn listen(&self, s: &Spanned<String>, field: &str) -> Result<SocketAddr, ConfigError> {
        s.value.parse().map_err(|e| {
            self.err(
                s,
                field,
                format!("{:?} is not an address to listen on: {e}", s.value),
                "write IP:PORT, e.g. 0.0.0.0:443 or [::]:443",
            )
        })
    }

    /// `HOST:PORT`, or several comma-separated (the nodes of one server).
    fn host_port(&self, s: &Spanned<String>, field: &str) -> Result<String, ConfigError> {
        let one = |a: &str| {
            a.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
        };
        let mut list = popupd_protocol::net::address_list(&s.value).peekable();
        let bad = match list.peek() {
            None => Some(s.value.as_str()),
            Some(_) => list.find(|a| !one(a)),
        };
        if let Some(bad) = bad {
            return Err(self.err(
                s,
                field,
                format!("{bad:?} is not a host:port address"),
                "write HOST:PORT, e.g. home.example.org:443 or 127.0.0.1:4431, or several comma-separated (the nodes of one home)",
            ));
        }
        Ok(s.value.clone())
    }

    fn name(&self, s: &Spanned<String>, field: &str) -> Result<String, ConfigError> {
        tls::server_name(&s.value).map_err(|_| {
            self.err(
                s,
                field,
                format!("{:?} is not a DNS name", s.value),
                "use the name in the server's certificate, e.g. home-a.example.org",
            )
        })?;
        Ok(s.value.clone())
    }

    fn duration(
        &self,
        s: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
        min: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(s) = s else { return Ok(default) };
        let d = humantime::parse_duration(&s.value).map_err(|e| {
            self.err(
                s,
                field,
                format!("{:?} is not a duration: {e}", s.value),
                "write e.g. 25s, 2m or 1h",
            )
        })?;
        if d < min {
            return Err(self.err(
                s,
                field,
                format!("{:?} is too short", s.value),
                &format!("use at least {}", humantime::format_duration(min)),
            ));
        }
        Ok(d)
    }

    fn identity(
        &self,
        cert: &Spanned<PathBuf>,
        key: &Spanned<PathBuf>,
        section: &str,
    ) -> Result<Identity, ConfigError> {
        let hint = "make one with `popupd ca issue NAME` and check the file is readable by the daemon's user";
        let chain = tls::load_certs(&self.path(cert))
            .map_err(|e| self.err(cert, &format!("{section}.cert"), e.to_string(), hint))?;
        let key_path = self.path(key);
        let key_field = format!("{section}.key");
        let key_v =
            tls::load_key(&key_path).map_err(|e| self.err(key, &key_field, e.to_string(), hint))?;
        if let Err((why, fix)) = private_enough(&key_path) {
            return Err(self.err(key, &key_field, why, &fix));
        }
        tls::check_pair(&chain, &key_v).map_err(|e| {
            self.err(
                key,
                &key_field,
                format!(
                    "{} and {}: {e}",
                    key_path.display(),
                    self.path(cert).display()
                ),
                "give the certificate and key `popupd ca issue NAME` made together",
            )
        })?;
        Ok(Identity { chain, key: key_v })
    }

    fn ca(&self, ca: &Spanned<PathBuf>, field: &str) -> Result<Arc<RootCertStore>, ConfigError> {
        tls::roots_from(&self.path(ca)).map_err(|e| {
            self.err(
                ca,
                field,
                e.to_string(),
                "point it at the network CA certificate made by `popupd ca init` (ca.crt)",
            )
        })
    }

    fn global(&self, g: file::GlobalFile) -> Result<GlobalConfig, ConfigError> {
        Ok(GlobalConfig {
            name: self.name(&g.name, "global.name")?,
            listen: self.listen(&g.listen, "global.listen")?,
            identity: self.identity(&g.cert, &g.key, "global")?,
            cert_path: self.path(&g.cert),
            ca: self.ca(&g.ca, "global.ca")?,
            ca_path: self.path(&g.ca),
            data_dir: self.path(&g.data_dir),
            storage: self.storage(g.storage.as_ref(), "global")?,
            limits: self.limits(g.limits.as_ref(), "global")?,
            revoked: self.revoked(g.revoked.as_ref(), &g.ca, "global.revoked")?,
            metrics: g
                .metrics
                .as_ref()
                .map(|m| self.listen(m, "global.metrics"))
                .transpose()?,
        })
    }

    /// The revocation list `revoked` names, or the CA's `revoked` beside
    /// `ca` if there is one.
    fn revoked(
        &self,
        list: Option<&Spanned<PathBuf>>,
        ca: &Spanned<PathBuf>,
        field: &str,
    ) -> Result<Arc<std::collections::HashSet<String>>, ConfigError> {
        let path = match list {
            Some(p) => self.path(p),
            None => self
                .path(ca)
                .parent()
                .map(crate::ca::revoked_path)
                .unwrap_or_default(),
        };
        match crate::ca::read_revoked(&path) {
            Ok(names) => Ok(Arc::new(names)),
            Err(e) => Err(self.err(
                list.unwrap_or(ca),
                field,
                format!("cannot read the revocation list {}: {e}", path.display()),
                "make it readable by the daemon's user, or point `revoked` elsewhere",
            )),
        }
    }

    fn limits(&self, l: Option<&file::LimitsFile>, sec: &str) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let Some(l) = l else { return Ok(d) };
        Ok(Limits {
            pending: self.count(
                &l.pending_connections,
                &format!("{sec}.limits.pending_connections"),
                d.pending,
            )?,
            pending_per_address: self.count(
                &l.pending_per_address,
                &format!("{sec}.limits.pending_per_address"),
                d.pending_per_address,
            )?,
            login_timeout: self.duration(
                &l.login_timeout,
                &format!("{sec}.limits.login_timeout"),
                d.login_timeout,
                Duration::from_millis(500),
            )?,
            peer_links: self.count(
                &l.peer_links,
                &format!("{sec}.limits.peer_links"),
                d.peer_links,
            )?,
            send_rate: self.count(
                &l.send_rate,
                &format!("{sec}.limits.send_rate"),
                d.send_rate,
            )?,
            send_burst: self.count(
                &l.send_burst,
                &format!("{sec}.limits.send_burst"),
                d.send_burst,
            )?,
            contact_rate: self.count(
                &l.contact_rate,
                &format!("{sec}.limits.contact_rate"),
                d.contact_rate,
            )?,
            presence_interval: self.duration(
                &l.presence_interval,
                &format!("{sec}.limits.presence_interval"),
                d.presence_interval,
                Duration::ZERO,
            )?,
            mailbox_messages: self.count(
                &l.mailbox_messages,
                &format!("{sec}.limits.mailbox_messages"),
                d.mailbox_messages,
            )?,
            mailbox_bytes: self.count(
                &l.mailbox_bytes,
                &format!("{sec}.limits.mailbox_bytes"),
                d.mailbox_bytes,
            )?,
            login_failures: self.count(
                &l.login_failures,
                &format!("{sec}.limits.login_failures"),
                d.login_failures,
            )?,
            peer_rate: self.count(
                &l.peer_rate,
                &format!("{sec}.limits.peer_rate"),
                d.peer_rate,
            )?,
            item_expiry: self.duration(
                &l.item_expiry,
                &format!("{sec}.limits.item_expiry"),
                d.item_expiry,
                Duration::from_secs(60),
            )?,
            handles_per_home: self.count(
                &l.handles_per_home,
                &format!("{sec}.limits.handles_per_home"),
                d.handles_per_home,
            )?,
        })
    }

    /// A count of at least 1.
    fn count(
        &self,
        v: &Option<Spanned<usize>>,
        field: &str,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(m) if m.value == 0 => Err(self.err(
                m,
                field,
                "must be at least 1".into(),
                &format!("give a positive number, or leave it out for the default ({default})"),
            )),
            Some(m) => Ok(m.value),
        }
    }

    fn storage(&self, s: Option<&file::StorageFile>, sec: &str) -> Result<Storage, ConfigError> {
        let Some(s) = s else {
            return Ok(Storage::Sqlite);
        };
        let field = format!("{sec}.storage.postgres");
        let hint = "write postgresql://USER:PASSWORD@HOST:PORT/DATABASE (add ?sslmode=require to insist on TLS), or libpq's key=value pairs";
        let config: popupd_store::pg::postgres::Config = s.postgres.value.parse().map_err(|e| {
            self.err(
                &s.postgres,
                &field,
                format!("not a PostgreSQL connection string: {e}"),
                hint,
            )
        })?;
        let missing = if config.get_hosts().is_empty() {
            Some("a host")
        } else if config.get_user().is_none() {
            Some("a user")
        } else if config.get_dbname().is_none() {
            Some("a database")
        } else {
            None
        };
        if let Some(what) = missing {
            return Err(self.err(&s.postgres, &field, format!("does not name {what}"), hint));
        }
        let roots = match &s.ca {
            Some(ca) => self.ca(ca, &format!("{sec}.storage.ca"))?,
            None => tls::system_roots(),
        };
        let tls = tls::client_config(roots, None)
            .map_err(|e| self.err(&s.postgres, &field, format!("TLS setup: {e}"), ""))?;
        Ok(Storage::Postgres(Box::new(popupd_store::pg::PgTarget {
            config,
            tls,
        })))
    }

    fn home(&self, h: file::HomeFile, sec: &str) -> Result<HomeConfig, ConfigError> {
        let listen = self.listen(&h.listen, &format!("{sec}.listen"))?;
        let public_address = match &h.public_address {
            Some(a) => self.host_port(a, &format!("{sec}.public_address"))?,
            None => listen.to_string(),
        };
        let max_connections = self.count(
            &h.max_connections,
            &format!("{sec}.max_connections"),
            100_000,
        )?;
        let limits = self.limits(h.limits.as_ref(), sec)?;
        Ok(HomeConfig {
            name: self.name(&h.name, &format!("{sec}.name"))?,
            listen,
            public_address,
            identity: self.identity(&h.cert, &h.key, sec)?,
            cert_path: self.path(&h.cert),
            ca: self.ca(&h.ca, &format!("{sec}.ca"))?,
            ca_path: self.path(&h.ca),
            data_dir: self.path(&h.data_dir),
            storage: self.storage(h.storage.as_ref(), sec)?,
            global: Remote {
                name: self.name(&h.global.name, &format!("{sec}.global.name"))?,
                address: self.host_port(&h.global.address, &format!("{sec}.global.address"))?,
            },
            idle_timeout: self.duration(
                &h.idle_timeout,
                &format!("{sec}.idle_timeout"),
                Duration::from_secs(90),
                Duration::from_secs(2),
            )?,
            route_ttl: self.duration(
                &h.route_cache_ttl,
                &format!("{sec}.route_cache_ttl"),
                Duration::from_secs(3600),
                Duration::from_secs(1),
            )?,
            max_connections,
            limits,
            revoked: self.revoked(h.revoked.as_ref(), &h.ca, &format!("{sec}.revoked"))?,
            presence_grace: self.duration(
                &h.presence_grace,
                &format!("{sec}.presence_grace"),
                Duration::from_secs(10),
                Duration::ZERO,
            )?,
            metrics: h
                .metrics
                .as_ref()
                .map(|m| self.listen(m, &format!("{sec}.metrics")))
                .transpose()?,
            cluster: self.cluster(&h, sec)?,
        })
    }

    fn cluster(&self, h: &file::HomeFile, sec: &str) -> Result<Option<Cluster>, ConfigError> {
        let Some(c) = &h.cluster else { return Ok(None) };
        if h.storage.is_none() {
            return Err(self.err(
                &c.node,
                &format!("{sec}.cluster"),
                "the nodes of a home share its records, and SQLite is one machine's".into(),
                "put the home on PostgreSQL (`storage: postgres: URL`), the same database for every node",
            ));
        }
        let node = &c.node.value;
        if node.is_empty()
            || node.len() > 64
            || !node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(self.err(
                &c.node,
                &format!("{sec}.cluster.node"),
                format!("{node:?} is not a node name"),
                "1-64 letters, digits, '-' or '_', unique among the home's nodes",
            ));
        }
        let nats = &c.nats.value;
        let bad = popupd_protocol::net::address_list(nats).find(|a| {
            let rest = a
                .strip_prefix("nats://")
                .or_else(|| a.strip_prefix("tls://"))
                .unwrap_or(a);
            let host = rest.rsplit_once('@').map_or(rest, |x| x.1);
            !host
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
        });
        if bad.is_some() || nats.trim().is_empty() {
            return Err(self.err(
                &c.nats,
                &format!("{sec}.cluster.nats"),
                format!("{nats:?} is not a NATS server address"),
                "write nats://HOST:PORT (tls://HOST:PORT for TLS), or several comma-separated",
            ));
        }
        Ok(Some(Cluster {
            node: node.clone(),
            nats: nats.clone(),
        }))
    }

    fn agent(&self, a: file::AgentFile) -> Result<AgentConfig, ConfigError> {
        if !valid_handle(&a.handle.value) {
            return Err(self.err(
                &a.handle,
                "agent.handle",
                format!("{:?} is not a handle", a.handle.value),
                "handles are 1-64 lowercase letters, digits, '.', '-' or '_'",
            ));
        }
        let home_name = self.name(&a.home, "agent.home")?;
        let address = match &a.address {
            Some(s) => self.host_port(s, "agent.address")?,
            None => format!("{home_name}:443"),
        };
        let roots = match &a.ca {
            Some(ca) => self.ca(ca, "agent.ca")?,
            None => tls::system_roots(),
        };
        let proxy =
            match &a.proxy {
                Some(p) if p.value == "none" => None,
                Some(p) => Some(Proxy::parse(&p.value).map_err(|e| {
                    self.err(p, "agent.proxy", e, "write http://HOST:PORT, or `none`")
                })?),
                None => match Proxy::from_env(address.rsplit_once(':').map_or("", |x| x.0)) {
                    Some(Ok(p)) => Some(p),
                    Some(Err(e)) => {
                        return Err(self.whole(
                            &format!("HTTPS_PROXY: {e}"),
                            "fix the variable, or set `proxy: none` in the agent section",
                        ));
                    }
                    None => None,
                },
            };
        let data_dir = match &a.data_dir {
            Some(d) => self.path(d),
            None => default_data_dir(),
        };
        let bus = match a.bus.as_ref().map(|b| b.value.as_str()) {
            None | Some("session") => Bus::Session,
            Some(addr) => Bus::Address(addr.to_owned()),
        };
        Ok(AgentConfig {
            handle: a.handle.value,
            device: a.device.value,
            secret: a.secret,
            home: Remote {
                name: home_name,
                address,
            },
            roots,
            proxy,
            keepalive: self.duration(
                &a.keepalive,
                "agent.keepalive",
                Duration::from_secs(25),
                Duration::from_millis(200),
            )?,
            data_dir,
            bus,
            plugin_dirs: match &a.plugin_dirs {
                Some(d) => d.iter().map(|p| self.path(p)).collect(),
                None => vec![
                    PathBuf::from("/usr/lib/popupd/plugins"),
                    expand_home(Path::new("~/.local/lib/popupd/plugins")),
                ],
            },
            plugin_deadline: self.duration(
                &a.plugin_deadline,
                "agent.plugin_deadline",
                Duration::from_secs(5),
                Duration::from_millis(100),
            )?,
            plugins: a.plugins,
            away_after: match &a.away_after {
                Some(s) if s.value == "off" => None,
                other => Some(self.duration(
                    other,
                    "agent.away_after",
                    Duration::from_secs(300),
                    Duration::from_secs(1),
                )?),
            },
            idle_source: match &a.idle_source {
                None => None,
                Some(s) => match s.value.as_str() {
                    "auto" => None,
                    "x11" => Some(IdleSource::X11),
                    "screensaver" => Some(IdleSource::ScreenSaver),
                    "mutter" => Some(IdleSource::Mutter),
                    "logind" => Some(IdleSource::Logind),
                    other => {
                        return Err(self.err(
                            s,
                            "agent.idle_source",
                            format!("{other:?} is not an idle source"),
                            "write auto, x11, screensaver, mutter or logind",
                        ));
                    }
                },
            },
        })
    }
}

/// `~/x` → `$HOME/x`.
fn expand_home(p: &Path) -> PathBuf {
    match (p.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => p.to_path_buf(),
    }
}

/// `$XDG_DATA_HOME/popupd`, else `~/.local/share/popupd`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("popupd");
    }
    expand_home(Path::new("~/.local/share/popupd"))
}

/// Whether a private key file is private: only its owner may read it, or,
/// owned by root, its group too (a service's group), as PostgreSQL and
/// OpenSSH ask. Otherwise the reason and the fix.
fn private_enough(path: &Path) -> Result<(), (String, String)> {
    use std::os::unix::fs::MetadataExt;
    // Unreadable files are reported when the key is read.
    let Ok(m) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = m.mode() & 0o777;
    let open_to = if m.uid() == 0 { 0o037 } else { 0o077 };
    if mode & open_to == 0 {
        return Ok(());
    }
    let shown = path.display();
    Err((
        format!("the private key {shown} is readable by others (mode {mode:04o}); it is refused"),
        if m.uid() == 0 {
            format!(
                "run `chmod 640 {shown}` (group-readable by the service's group) or `chmod 600 {shown}`"
            )
        } else {
            format!("run `chmod 600 {shown}`")
        },
    ))
}

/// A position the parser gives, as [`ConfigError`] keeps it (a config
/// file has far fewer than 4 billion lines).
fn clip(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_position_is_not_repeated() {
        assert_eq!(
            strip_position("error: line 4 column 3: unknown field `x`"),
            "unknown field `x`"
        );
        assert_eq!(strip_position("something else: y"), "something else: y");
    }

    #[test]
    fn a_duplicate_is_found_behind_a_tag_and_after_a_bare_cr() {
        let m = "duplicate field `agent`";
        assert_eq!(duplicate_at("!t agent:\nagent:\n", m), Some((2, 1)));
        assert_eq!(
            duplicate_at("agent:\n  x: 1\n!t  agent: {}\n", m),
            Some((3, 5))
        );
        // CR alone breaks a line in YAML (found by fuzzing).
        assert_eq!(duplicate_at("#0\ragent:\r\n !h agent:\n", m), Some((3, 5)));
        assert_eq!(duplicate_at("global:\n", m), None);
        assert_eq!(duplicate_at("agent:\n", "unknown field `agent`"), None);
    }

    #[test]
    fn role_choice_table() {
        let table: &[(bool, usize, bool, &[Role])] = &[
            (true, 0, false, &[Role::Global]),
            (false, 1, false, &[Role::Home]),
            (false, 0, true, &[Role::Agent]),
            (true, 2, false, &[Role::Global, Role::Home, Role::Home]),
            (true, 1, true, &[Role::Global, Role::Home, Role::Agent]),
            (false, 0, false, &[]),
        ];
        for (g, h, a, want) in table {
            assert_eq!(roles(*g, *h, *a), *want, "global={g} homes={h} agent={a}");
        }
    }
}
