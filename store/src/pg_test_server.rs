//! A PostgreSQL server of its own, for tests: `initdb` in a folder, then
//! `postgres` on 127.0.0.1 and a socket in that folder, as an unprivileged
//! user when run as root (PostgreSQL refuses root), stopped when dropped.
//! Built only with the `test-server` feature.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) test server.
pub struct TestServer {
    dir: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    /// `setpriv` arguments that run a command as the server's user.
    as_user: Vec<String>,
    pub port: u16,
    child: Option<Child>,
    /// Serves TLS with `server.crt` and `server.key` in `dir`.
    tls: bool,
}

/// The user a server started by root runs as.
const USER: &str = "nobody";
const GROUP: &str = "nogroup";

/// The folder of PostgreSQL's programs: `POPUPD_PG_BIN`, else Debian's
/// `/usr/lib/postgresql/15/bin`, else the newest there.
pub fn pg_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("POPUPD_PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let base = Path::new("/usr/lib/postgresql");
    let fifteen = base.join("15/bin");
    if fifteen.join("postgres").exists() {
        return Ok(fifteen);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(base)
        .map_err(|_| {
            "PostgreSQL is not installed (apt install postgresql; scripts/test.sh does)".to_owned()
        })?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|f| f.1)
        .ok_or_else(|| format!("no PostgreSQL server under {}", base.display()))
}

fn is_root() -> bool {
    euid() == 0
}

/// The effective user id, from /proc (no libc binding needed).
fn euid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

impl TestServer {
    /// Makes a cluster in `dir` (created) and starts it; its log goes to
    /// `log`. The error says why there is none.
    pub fn start(dir: &Path, log: &Path) -> Result<TestServer, String> {
        let bin = pg_bin()?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // The server dies with the thread that started it, whatever
        // happens to the test.
        let mut as_user = vec!["setpriv".to_owned(), "--pdeathsig=KILL".to_owned()];
        if is_root() {
            as_user.extend([
                format!("--reuid={USER}"),
                format!("--regid={GROUP}"),
                "--clear-groups".to_owned(),
            ]);
            let ok = Command::new("chown")
                .args(["-R", &format!("{USER}:{GROUP}")])
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err(format!("cannot give {} to {USER}", dir.display()));
            }
        }
        let data = dir.join("data");
        let out = Command::new(&as_user[0])
            .args(&as_user[1..])
            .arg(bin.join("initdb"))
            .args([
                "-U",
                "popupd",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut s = TestServer {
            dir: dir.to_owned(),
            log: log.to_owned(),
            bin,
            as_user,
            port: free_port()?,
            child: None,
            tls: false,
        };
        s.start_again()?;
        Ok(s)
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port.
    pub fn start_again(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.as_user[0])
            .args(&self.as_user[1..])
            .arg(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=40", "-c", "shared_buffers=32MB"])
            .args(if self.tls {
                &[
                    "-c",
                    "ssl=on",
                    "-c",
                    "ssl_cert_file=server.crt",
                    "-c",
                    "ssl_key_file=server.key",
                ][..]
            } else {
                &[]
            })
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting postgres: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The client is dropped where it was made, off any runtime.
            let up = crate::pg::off_runtime(|| {
                crate::pg::connect_plain(&self.url("postgres")).map(drop)
            });
            match up {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "postgres did not come up in 30 s ({e}); see {}",
                        self.log.display()
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "postgres exited ({status}); see {}",
                    self.log.display()
                ));
            }
        }
    }

    /// Restarts the server serving TLS (beside plain connections) with
    /// the certificate chain and key of these PEM files.
    pub fn enable_tls(&mut self, cert: &Path, key: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        self.stop();
        let data = self.dir.join("data");
        for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
            let to = data.join(to);
            std::fs::copy(from, &to).map_err(|e| format!("{}: {e}", from.display()))?;
            // PostgreSQL wants its key private to its own user.
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| e.to_string())?;
            if is_root() {
                let ok = Command::new("chown")
                    .arg(format!("{USER}:{GROUP}"))
                    .arg(&to)
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    return Err(format!("cannot give {} to {USER}", to.display()));
                }
            }
        }
        self.tls = true;
        self.start_again()
    }

    /// CPU time the server has used so far (user + system): its postmaster
    /// with the children it waited for, and the children running now
    /// (connections, the WAL writer, the checkpointer), from /proc.
    pub fn cpu_time(&self) -> Duration {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return Duration::ZERO;
        };
        // Fields after the command name (which may hold spaces) start at ')'.
        let stat = |p: &str| -> Option<Vec<u64>> {
            let s = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let rest = s.rsplit_once(')')?.1;
            Some(
                rest.split_whitespace()
                    .map(|x| x.parse().unwrap_or(0))
                    .collect(),
            )
        };
        // After ')': ppid is field 1, utime 11, stime 12, cutime 13, cstime 14.
        let mut ticks = stat(&pid.to_string())
            .map(|f| f[11..15].iter().sum::<u64>())
            .unwrap_or(0);
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(p) = name
                    .to_str()
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                else {
                    continue;
                };
                if let Some(f) = stat(p).filter(|f| f.len() > 12 && f[1] == u64::from(pid)) {
                    ticks += f[11] + f[12];
                }
            }
        }
        Duration::from_millis(ticks * 10)
    }

    /// Stops the server (a fast shutdown: clients are cut off).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The URL of database `db` (without TLS: a loopback test server).
    pub fn url(&self, db: &str) -> String {
        ServerInfo { port: self.port }.url(db)
    }

    /// Creates database `db` and returns its URL.
    pub fn create_db(&self, db: &str) -> Result<String, String> {
        ServerInfo { port: self.port }.create_db(db)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a test that cannot get a server must fail rather than skip:
/// under CI (`CI=true`), where PostgreSQL is installed by the test command.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// One server for a whole test process, in a folder of the temp dir, on a
/// thread that lives as long as the process (the server dies with it).
/// The error says why there is none.
pub fn shared() -> Result<&'static ServerInfo, String> {
    static SHARED: std::sync::OnceLock<Result<ServerInfo, String>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("test-postgres".into())
                .spawn(move || {
                    remove_stale();
                    let dir = std::env::temp_dir()
                        .join(format!("popupd-test-postgres-{}", std::process::id()));
                    let _ = std::fs::remove_dir_all(&dir);
                    let started = TestServer::start(&dir.join("pg"), &dir.join("postgres.log"));
                    match started {
                        Ok(s) => {
                            let _ = tx.send(Ok(ServerInfo { port: s.port }));
                            // Kept running until the process ends.
                            loop {
                                std::thread::park();
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            match spawned {
                Ok(_) => rx
                    .recv()
                    .unwrap_or_else(|_| Err("the server thread ended".into())),
                Err(e) => Err(format!("cannot start a thread: {e}")),
            }
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Removes the folders of shared servers whose test process is gone.
fn remove_stale() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("popupd-test-postgres-"))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Where the [`shared`] server listens.
pub struct ServerInfo {
    pub port: u16,
}

impl ServerInfo {
    /// A new database of its own, named after `name` (unique within the
    /// process), and its URL.
    pub fn create_db(&self, name: &str) -> Result<String, String> {
        let admin = self.url("postgres");
        crate::pg::off_runtime(|| {
            let mut c = crate::pg::connect_plain(&admin)
                .map_err(|e| format!("connecting to the test server: {e}"))?;
            c.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\"; "))
                .and_then(|()| c.batch_execute(&format!("CREATE DATABASE \"{name}\"")))
                .map_err(|e| format!("creating database {name}: {e}"))
        })?;
        Ok(self.url(name))
    }

    /// The URL of database `db` (without TLS: a loopback test server).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://popupd@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }
}
