//! Helpers for end-to-end tests: real `popupd` processes (a global server
//! and two homes, each its own process), a private `dbus-daemon` per agent,
//! and D-Bus / `popupctl` as the user's hands.
//!
//! Binaries come from the workspace's target directory: run
//! `cargo build --workspace` before `cargo test` (the README's test command
//! does).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

pub mod cluster;
pub mod faults;
pub mod netns;
pub mod pg;
use futures_util::StreamExt;
use popupd_ipc::Agent1Proxy;

/// Path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/e2e-HASH (a test) or target/release/popupd-bench (a
    // binary) -> that profile's directory.
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A scratch directory under `$TMPDIR/popupd-e2e`, removed when the test
/// passes and kept (with its logs printed) when it fails. With
/// `POPUPD_KEEP_DIRS` set it is kept either way, to read the logs and
/// databases of a passing test or a benchmark afterwards.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let path = std::env::temp_dir()
            .join("popupd-e2e")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test dir");
        TestDir { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; files kept in {}", self.path.display());
            if let Ok(rd) = std::fs::read_dir(&self.path) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "log") {
                        let text = std::fs::read_to_string(&p).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(40).collect();
                        eprintln!("==== {} (last lines)", p.display());
                        for l in tail.iter().rev() {
                            eprintln!("{l}");
                        }
                    }
                }
            }
        } else if std::env::var_os("POPUPD_KEEP_DIRS").is_some() {
            eprintln!("POPUPD_KEEP_DIRS: files kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A child process, killed when dropped; its stderr goes to a log file.
pub struct Proc {
    child: Option<Child>,
    argv: Vec<String>,
    pub log: PathBuf,
}

/// The log filter of the daemons this process starts.
static LOG_FILTER: OnceLock<&'static str> = OnceLock::new();

/// Sets the log filter of the daemons started from now on (once; the
/// default, for tests, logs popupd at debug).
pub fn set_log_filter(filter: &'static str) {
    let _ = LOG_FILTER.set(filter);
}

impl Proc {
    pub fn spawn(argv: &[String], log: &Path) -> anyhow::Result<Proc> {
        let mut p = Proc {
            child: None,
            argv: argv.to_vec(),
            log: log.to_path_buf(),
        };
        p.start()?;
        Ok(p)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .env(
                "RUST_LOG",
                LOG_FILTER.get().unwrap_or(&"info,popupd=debug,zbus=warn"),
            )
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {:?}", self.argv))?;
        self.child = Some(child);
        Ok(())
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(&mut self) {
        let _ = self.stop_within(Duration::from_secs(10));
    }

    /// SIGTERM, and how long the process took to exit with success; an
    /// error if it failed, or if it did not exit within `limit` (then it is
    /// killed).
    pub fn stop_within(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        let Some(mut c) = self.child.take() else {
            bail!("not running");
        };
        let t0 = Instant::now();
        let _ = Command::new("kill").arg(c.id().to_string()).status();
        while t0.elapsed() < limit {
            if let Ok(Some(status)) = c.try_wait() {
                anyhow::ensure!(status.success(), "exited with {status}");
                return Ok(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("still running {limit:?} after SIGTERM")
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU time used so far (user + system), from /proc.
    pub fn cpu_time(&self) -> Duration {
        let Some(pid) = self.pid() else {
            return Duration::ZERO;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at ')'.
        let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line: 11 and 12 after ')'.
        let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        let ticks = field(11) + field(12);
        Duration::from_millis(ticks * 10)
    }

    /// Starts it again with the same command line.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.start()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `popupd ARGS` to completion.
pub fn popupd(args: &[&str]) -> Output {
    Command::new(bin("popupd"))
        .args(args)
        .output()
        .expect("run popupd")
}

/// A TCP port free on 127.0.0.1 just now.
///
/// Never the same port twice in one process: the kernel may hand a port
/// just released to the next bind, and two tests running side by side
/// would then start servers on one port (and one would reach the other's).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until something accepts TCP on `addr`.
pub async fn wait_port(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("nothing listens on {addr}")
}

/// Home names of the test network.
pub const HOME_A: &str = "home-a.test";
pub const HOME_B: &str = "home-b.test";

/// A global server and two homes, each its own process.
/// The homes' `presence_grace` in test networks, in seconds.
pub const PRESENCE_GRACE_S: u64 = 3;

pub struct Network {
    pub dir: PathBuf,
    pub global: Proc,
    /// Home A, then home B.
    pub homes: Vec<Proc>,
    pub global_addr: String,
    pub home_addrs: Vec<String>,
    /// Where each server serves metrics (`Layout::metrics`): the global
    /// server's, then home A's and home B's.
    pub metrics_addrs: Vec<String>,
}

/// The homes' `limits:` for load generators: what thousands of simulated
/// agents on a few addresses do at once, and as fast as they can, stays
/// within them (the limits themselves are measured by `popupd-bench abuse`).
pub const LOAD_LIMITS: &str = "  limits:\n    pending_connections: 100000\n    pending_per_address: 100000\n    login_timeout: 60s\n    send_rate: 1000000\n    send_burst: 1000000\n    contact_rate: 1000000\n    presence_interval: 0s\n    mailbox_messages: 10000000\n    mailbox_bytes: 100000000000\n    peer_rate: 1000000\n";

/// Where the servers of a test network listen and how they reach each
/// other; the default puts everything on 127.0.0.1.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The homes' `idle_timeout`.
    pub idle_timeout: String,
    /// Lines added to each home's section (indented two spaces).
    pub home_yaml: String,
    /// The address the global server listens on.
    pub global_ip: String,
    /// Lines added to the global server's section (indented two spaces).
    pub global_yaml: String,
    /// Home A, then home B.
    pub homes: [HomeLayout; 2],
    /// Each server serves metrics on a port of its own on 127.0.0.1.
    pub metrics: bool,
    /// The global server's port (default: a free one).
    pub global_port: Option<u16>,
    /// What the homes dial for the global server (default: its address).
    pub global_address: Option<String>,
}

/// Where one home of a test network runs.
#[derive(Clone, Debug)]
pub struct HomeLayout {
    /// The address it listens on.
    pub listen_ip: String,
    /// The address others dial (its `public_address`).
    pub public_ip: String,
    /// The address at which it dials the global server.
    pub global_ip: String,
    /// A command its process runs under (e.g. `ip netns exec NS`).
    pub prefix: Vec<String>,
    /// Its data folder, if not under the network's folder.
    pub data_dir: Option<PathBuf>,
    /// Lines added to its section only (indented two spaces), after the
    /// network's `home_yaml`: e.g. [`pg::storage_yaml`].
    pub yaml: String,
    /// The port it listens on (default: a free one).
    pub port: Option<u16>,
    /// Its `public_address` (default: `public_ip` and its port).
    pub public_address: Option<String>,
}

impl Default for HomeLayout {
    fn default() -> Self {
        HomeLayout {
            listen_ip: "127.0.0.1".into(),
            public_ip: "127.0.0.1".into(),
            global_ip: "127.0.0.1".into(),
            prefix: Vec::new(),
            data_dir: None,
            yaml: String::new(),
            port: None,
            public_address: None,
        }
    }
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            idle_timeout: "10s".into(),
            home_yaml: String::new(),
            global_ip: "127.0.0.1".into(),
            global_yaml: String::new(),
            homes: Default::default(),
            metrics: false,
            global_port: None,
            global_address: None,
        }
    }
}

impl Network {
    pub async fn start(dir: &Path) -> anyhow::Result<Network> {
        Network::start_laid_out(dir, Layout::default()).await
    }

    /// For load generators: the homes' `idle_timeout` (benchmarks hold
    /// idle agents that ping at the agent's default 25 s), and limits on
    /// connections not yet logged in that thousands of logins at once from
    /// a few addresses stay within.
    pub async fn start_with(dir: &Path, idle_timeout: &str) -> anyhow::Result<Network> {
        Network::start_laid_out(
            dir,
            Layout {
                idle_timeout: idle_timeout.into(),
                home_yaml: LOAD_LIMITS.into(),
                ..Layout::default()
            },
        )
        .await
    }

    /// A network laid out as `layout` says.
    pub async fn start_laid_out(dir: &Path, layout: Layout) -> anyhow::Result<Network> {
        let pki = dir.join("pki");
        let pki_s = pki.to_str().context("utf-8 path")?;
        let out = popupd(&["ca", "init", "--dir", pki_s]);
        anyhow::ensure!(
            out.status.success(),
            "ca init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for n in ["global.test", HOME_A, HOME_B] {
            let out = popupd(&["ca", "issue", n, "--dir", pki_s]);
            anyhow::ensure!(
                out.status.success(),
                "ca issue: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let global_port = layout.global_port.unwrap_or_else(free_port);
        let global_addr = format!("127.0.0.1:{global_port}");
        let metrics_addrs: Vec<String> = if layout.metrics {
            (0..3)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect()
        } else {
            Vec::new()
        };
        let metrics_line = |i: usize| {
            metrics_addrs
                .get(i)
                .map(|a| format!("  metrics: {a}\n"))
                .unwrap_or_default()
        };
        std::fs::write(
            dir.join("global.yaml"),
            format!(
                "global:\n  name: global.test\n  listen: {}:{global_port}\n  cert: pki/global.test.crt\n  key: pki/global.test.key\n  ca: pki/ca.crt\n  data_dir: data/global\n{}{}",
                layout.global_ip,
                layout.global_yaml,
                metrics_line(0),
            ),
        )?;
        let global = Proc::spawn(
            &[
                bin("popupd").display().to_string(),
                "run".into(),
                "-c".into(),
                dir.join("global.yaml").display().to_string(),
            ],
            &dir.join("global.log"),
        )?;
        wait_port(&global_addr).await?;
        let mut homes = Vec::new();
        let mut home_addrs = Vec::new();
        for (i, name) in [HOME_A, HOME_B].iter().enumerate() {
            let h = &layout.homes[i];
            let port = h.port.unwrap_or_else(free_port);
            let file = dir.join(format!("home{i}.yaml"));
            let data_dir = h
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("data/{name}")));
            std::fs::write(
                &file,
                format!(
                    "home:\n  name: {name}\n  listen: {}:{port}\n  public_address: \"{}\"\n  cert: pki/{name}.crt\n  key: pki/{name}.key\n  ca: pki/ca.crt\n  data_dir: {}\n  idle_timeout: {}\n  presence_grace: {PRESENCE_GRACE_S}s\n  global:\n    name: global.test\n    address: \"{}\"\n{}{}{}",
                    h.listen_ip,
                    h.public_address
                        .clone()
                        .unwrap_or_else(|| format!("{}:{port}", h.public_ip)),
                    data_dir.display(),
                    layout.idle_timeout,
                    layout
                        .global_address
                        .clone()
                        .unwrap_or_else(|| format!("{}:{global_port}", h.global_ip)),
                    layout.home_yaml,
                    h.yaml,
                    metrics_line(i + 1),
                ),
            )?;
            let mut argv: Vec<String> = h.prefix.clone();
            argv.extend([
                bin("popupd").display().to_string(),
                "run".into(),
                "-c".into(),
                file.display().to_string(),
            ]);
            homes.push(Proc::spawn(&argv, &dir.join(format!("home{i}.log")))?);
            let addr = format!("{}:{port}", h.public_ip);
            wait_port(&addr).await?;
            home_addrs.push(addr);
        }
        Ok(Network {
            dir: dir.to_path_buf(),
            global,
            homes,
            global_addr,
            home_addrs,
            metrics_addrs,
        })
    }

    pub fn global_config(&self) -> PathBuf {
        self.dir.join("global.yaml")
    }

    pub fn home_config(&self, i: usize) -> PathBuf {
        self.dir.join(format!("home{i}.yaml"))
    }

    /// `popupd user add HANDLE` on home `i`; returns the agent config path.
    pub fn add_user(&self, i: usize, handle: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("{handle}.agent.yaml"));
        let out = popupd(&[
            "user",
            "add",
            handle,
            "-c",
            self.home_config(i).to_str().context("path")?,
            "--agent-config",
            path.to_str().context("path")?,
        ]);
        anyhow::ensure!(
            out.status.success(),
            "user add {handle}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(path)
    }
}

/// A field of an agent config written by `popupd user add`.
fn agent_field(cfg: &Path, field: &str) -> anyhow::Result<String> {
    let y = std::fs::read_to_string(cfg)?;
    let prefix = format!("{field}: ");
    y.lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .map(|s| s.trim_matches('"').to_string())
        .with_context(|| format!("no {field} in {}", cfg.display()))
}

/// The secret of an agent config written by `popupd user add`.
pub fn secret_of(cfg: &Path) -> anyhow::Result<String> {
    agent_field(cfg, "secret")
}

/// A raw back connection to home `i` as the user of agent config `cfg`,
/// authenticated: for tests that speak the protocol themselves, as a
/// modified client would.
pub async fn raw_agent(
    net: &Network,
    i: usize,
    handle: &str,
    cfg: &Path,
) -> anyhow::Result<popupd_protocol::net::Link<popupd_protocol::net::ClientTls>> {
    use popupd_protocol::net::{self, Dial, Recv, tls};
    use popupd_protocol::{AGENT_PATH, AgentFrame, HomeFrame, PROTOCOL_VERSION};
    popupd_protocol::net::tls::install_default_provider();
    let ca = net.dir.join("pki/ca.crt");
    let mut link = net::dial(&Dial {
        address: net.home_addrs[i].clone(),
        name: [HOME_A, HOME_B][i].into(),
        path: AGENT_PATH,
        tls: tls::client_config(tls::roots_from(&ca)?, None)?,
        proxy: None,
    })
    .await?;
    link.send(&AgentFrame::Hello {
        v: PROTOCOL_VERSION,
        handle: handle.into(),
        device: agent_field(cfg, "device")?,
        secret: secret_of(cfg)?,
        presence: None,
    })
    .await?;
    match link.recv::<HomeFrame>().await? {
        Recv::Frame(HomeFrame::Welcome { .. }) => Ok(link),
        other => bail!("login {handle}: {other:?}"),
    }
}

/// A private session bus.
pub struct Bus {
    _proc: Proc,
    pub address: String,
}

impl Bus {
    pub async fn start(dir: &Path, name: &str) -> anyhow::Result<Bus> {
        let sock = dir.join(format!("{name}.bus"));
        let address = format!("unix:path={}", sock.display());
        let p = Proc::spawn(
            &[
                "dbus-daemon".into(),
                "--session".into(),
                "--nofork".into(),
                format!("--address={address}"),
            ],
            &dir.join(format!("{name}-dbus.log")),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            anyhow::ensure!(Instant::now() < deadline, "dbus-daemon did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Bus { _proc: p, address })
    }
}

/// What an agent emitted, as seen by a D-Bus client.
#[derive(Default)]
pub struct Seen {
    /// MessageReceived: (id, from, text), in order.
    pub received: Vec<(String, String, String)>,
    /// MessageStatusChanged: id -> statuses in order.
    pub status: HashMap<String, Vec<String>>,
    /// PresenceChanged: (when, handle, state, text), in order.
    pub presence: Vec<(Instant, String, String, String)>,
    /// ContactRequest: handles, in order.
    pub requests: Vec<String>,
    /// ConnectionChanged: connected?, in order.
    pub connection: Vec<bool>,
}

impl Seen {
    /// Whether message `id` has reached `state` or a later one (a status
    /// signal said so). A status only moves forward, and a step can be
    /// skipped: the home hands a message on at commit and says "accepted"
    /// after the fsync, so "delivered" may come first, and then the agent
    /// never signals "accepted".
    pub fn reached(&self, id: &str, state: &str) -> bool {
        use popupd_protocol::Delivery;
        // `Delivery` is ordered the way a status moves; `failed` ends it
        // instead and is reached only by name.
        let later = |x: &str| match (Delivery::parse(x), Delivery::parse(state)) {
            (Some(a), Some(b)) => a != Delivery::Failed && a >= b,
            _ => false,
        };
        self.status
            .get(id)
            .is_some_and(|v| v.iter().any(|x| x == state || later(x)))
    }

    /// The last presence seen for `handle`: (state, text).
    pub fn presence_of(&self, handle: &str) -> Option<(&str, &str)> {
        self.presence
            .iter()
            .rev()
            .find(|p| p.1 == handle)
            .map(|p| (p.2.as_str(), p.3.as_str()))
    }
}

/// A running agent on its own private bus.
pub struct Agent {
    pub handle: String,
    pub proc: Proc,
    pub bus: Bus,
    pub conn: zbus::Connection,
    pub seen: Arc<Mutex<Seen>>,
    pub config: PathBuf,
}

impl Agent {
    /// Starts the agent of `config` (from `Network::add_user`), appending
    /// `extra` YAML lines to its section; `prefix` wraps the command (e.g.
    /// `ip netns exec NS`).
    pub async fn start(
        dir: &Path,
        handle: &str,
        config: &Path,
        extra: &str,
        prefix: &[&str],
    ) -> anyhow::Result<Agent> {
        let bus = Bus::start(dir, handle).await?;
        let mut yaml = std::fs::read_to_string(config)?;
        yaml.push_str(&format!(
            "  bus: \"{}\"\n  data_dir: {}\n{extra}",
            bus.address,
            dir.join("data").join(handle).display()
        ));
        if !extra.contains("keepalive") {
            // Quick failure detection in tests.
            yaml.push_str("  keepalive: 1s\n");
        }
        if !extra.contains("plugin_dirs") {
            // No plugins unless the test asks: the machine's own must not leak in.
            yaml.push_str("  plugin_dirs: []\n");
        }
        if !extra.contains("away_after") {
            // Nor the machine's idle time.
            yaml.push_str("  away_after: \"off\"\n");
        }
        let file = dir.join(format!("{handle}.run.yaml"));
        std::fs::write(&file, yaml)?;
        let mut argv: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        argv.extend([
            bin("popupd").display().to_string(),
            "run".into(),
            "-c".into(),
            file.display().to_string(),
        ]);
        let proc = Proc::spawn(&argv, &dir.join(format!("{handle}.log")))?;
        let conn = connect_bus(&bus.address).await?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let a = Agent {
            handle: handle.into(),
            proc,
            bus,
            conn,
            seen,
            config: file,
        };
        // Listen before the agent owns its name: it links to its home as
        // soon as it does, and a message queued there may be signalled at
        // once.
        a.record().await?;
        a.wait_name().await?;
        Ok(a)
    }

    async fn wait_name(&self) -> anyhow::Result<()> {
        let dbus = zbus::fdo::DBusProxy::new(&self.conn).await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let name = zbus::names::BusName::try_from(popupd_ipc::BUS_NAME)?;
            if dbus.name_has_owner(name).await? {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}'s agent never owned its bus name",
                self.handle
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Records every signal the agent emits into `seen`.
    async fn record(&self) -> anyhow::Result<()> {
        let p = self.proxy().await?;
        let mut rx = p.receive_message_received().await?;
        let mut st = p.receive_message_status_changed().await?;
        let mut pr = p.receive_contact_presence_changed().await?;
        let mut rq = p.receive_contact_request().await?;
        let mut cc = p.receive_connection_changed().await?;
        let seen = self.seen.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(s) = pr.next() => if let Ok(a) = s.args() {
                        seen.lock().unwrap_or_else(|e| e.into_inner()).presence.push((Instant::now(), a.handle.to_string(), a.state.to_string(), a.text.to_string()));
                    },
                    Some(s) = rq.next() => if let Ok(a) = s.args() {
                        seen.lock().unwrap_or_else(|e| e.into_inner()).requests.push(a.handle.to_string());
                    },
                    Some(s) = cc.next() => if let Ok(a) = s.args() {
                        seen.lock().unwrap_or_else(|e| e.into_inner()).connection.push(a.connected);
                    },
                    Some(s) = rx.next() => if let Ok(a) = s.args() {
                        seen.lock().unwrap_or_else(|e| e.into_inner()).received.push((a.id.to_string(), a.from.to_string(), a.text.to_string()));
                    },
                    Some(s) = st.next() => if let Ok(a) = s.args() {
                        seen.lock().unwrap_or_else(|e| e.into_inner()).status.entry(a.id.to_string()).or_default().push(a.status.to_string());
                    },
                    else => break,
                }
            }
        });
        Ok(())
    }

    pub async fn proxy(&self) -> anyhow::Result<Agent1Proxy<'static>> {
        Ok(Agent1Proxy::new(&self.conn).await?)
    }

    /// Restarts the agent process (same bus, same data).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.restart()?;
        self.wait_name().await
    }

    /// Waits until `Status()` says connected (or not).
    pub async fn wait_connected(&self, want: bool, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(p) = self.proxy().await
                && let Ok((c, _, _)) = p.status().await
                && c == want
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: connected != {want} after {within:?}",
                self.handle
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until `pred(seen)` holds.
    pub async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Seen) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if pred(&self.seen.lock().unwrap_or_else(|e| e.into_inner())) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: timed out waiting for {what}",
                self.handle
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until message `id` has reached `state`.
    pub async fn wait_status(&self, id: &str, state: &str, within: Duration) -> anyhow::Result<()> {
        self.wait_for(&format!("{id} {state}"), within, |s| s.reached(id, state))
            .await
    }

    /// Runs `popupctl --bus BUS ARGS`.
    pub fn popupctl(&self, args: &[&str]) -> Output {
        Command::new(bin("popupctl"))
            .arg("--bus")
            .arg(&self.bus.address)
            .args(args)
            .output()
            .expect("run popupctl")
    }
}

/// The usual cast: a network, alice on home A and bob on home B, both
/// agents connected. `*_extra` are YAML lines added to each agent section.
pub async fn two_people(dir: &Path, alice_extra: &str, bob_extra: &str) -> (Network, Agent, Agent) {
    two_people_on(dir, Layout::default(), alice_extra, bob_extra).await
}

/// [`two_people`] on a network laid out as `layout` says.
pub async fn two_people_on(
    dir: &Path,
    layout: Layout,
    alice_extra: &str,
    bob_extra: &str,
) -> (Network, Agent, Agent) {
    let within = Duration::from_secs(20);
    let net = Network::start_laid_out(dir, layout).await.expect("network");
    let a = net.add_user(0, "alice").expect("alice");
    let b = net.add_user(1, "bob").expect("bob");
    let alice = Agent::start(dir, "alice", &a, alice_extra, &[])
        .await
        .expect("alice's agent");
    let bob = Agent::start(dir, "bob", &b, bob_extra, &[])
        .await
        .expect("bob's agent");
    alice
        .wait_connected(true, within)
        .await
        .expect("alice connected");
    bob.wait_connected(true, within)
        .await
        .expect("bob connected");
    (net, alice, bob)
}

/// Connects to a bus by address. A bus just started may have its socket
/// file before it accepts, so a refusal is retried for a few seconds.
pub async fn connect_bus(address: &str) -> anyhow::Result<zbus::Connection> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match zbus::connection::Builder::address(address).build().await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A virtual X display, `:BASE+n` (each test its own base, as they run at
/// once); returns it once it accepts clients.
pub async fn start_xvfb(dir: &Path, base: u32) -> (Proc, String) {
    use std::os::unix::net::UnixStream;
    let sock_of = |n: u32| PathBuf::from(format!("/tmp/.X11-unix/X{n}"));
    // A display nobody answers on. A server killed with SIGKILL leaves its
    // socket and lock file behind; those are stale and go.
    let mut n = base + std::process::id() % 200;
    while UnixStream::connect(sock_of(n)).is_ok() {
        n += 1;
    }
    let _ = std::fs::remove_file(sock_of(n));
    let _ = std::fs::remove_file(format!("/tmp/.X{n}-lock"));
    let display = format!(":{n}");
    let x = Proc::spawn(
        &[
            "Xvfb".into(),
            display.clone(),
            "-screen".into(),
            "0".into(),
            "800x600x24".into(),
            "-nolisten".into(),
            "tcp".into(),
        ],
        &dir.join("xvfb.log"),
    )
    .expect("start Xvfb");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock_of(n)).is_err() {
        assert!(Instant::now() < deadline, "Xvfb did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (x, display)
}

/// Says why a test is skipped, in the form the README documents.
pub fn skip(test: &str, why: &str) {
    eprintln!("skipped: {test}: {why}");
    println!("skipped: {test}: {why}");
}

/// Whether we run as root (network namespaces need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A GET on loopback (a metrics endpoint): (status code, headers, body).
/// Panics (fails the test) if the server does not answer HTTP.
pub fn http_get(addr: &str, path: &str, accept: Option<&str>) -> (u16, String, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, head.to_string(), body.to_string())
}

/// The value of the sample `series` (name and labels as printed) in a
/// Prometheus text scrape.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
