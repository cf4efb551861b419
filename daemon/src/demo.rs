//! `popupd demo`: a whole network on loopback, in one command.
//!
//! Makes a CA and certificates, starts one process with the global server
//! and two homes, creates alice (home A) and bob (home B), and starts an
//! agent for each on a private D-Bus (bob's on the desktop's own session bus
//! when there is one and no agent owns the name yet). Then it prints what to
//! type and waits for Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use popupd::config::Config;
use popupd::home::admin;

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.start_kill();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::File::create(log)?;
    cmd.stdout(Stdio::null())
        .stderr(f)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.as_std().get_program()))
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on 127.0.0.1:{port} after 10 s; see the logs")
}

/// Starts a private session bus; returns its address.
async fn private_bus(dir: &Path, name: &str, procs: &mut Procs) -> anyhow::Result<String> {
    let sock = dir.join(format!("{name}.bus"));
    let address = format!("unix:path={}", sock.display());
    let child = spawn_logged(
        Command::new("dbus-daemon")
            .arg("--session")
            .arg("--nofork")
            .arg(format!("--address={address}")),
        &dir.join(format!("{name}-dbus.log")),
    )
    .map_err(|e| anyhow::anyhow!("{e:#}\n  the demo needs dbus-daemon: sudo apt install dbus"))?;
    procs.0.push(child);
    for _ in 0..100 {
        if sock.exists() {
            return Ok(address);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!(
        "dbus-daemon did not start; see {}",
        dir.join(format!("{name}-dbus.log")).display()
    )
}

/// Whether an agent already owns the name on the desktop's session bus.
async fn session_bus_free() -> Option<String> {
    let addr = std::env::var("DBUS_SESSION_BUS_ADDRESS").ok()?;
    let conn = zbus::connection::Builder::address(addr.as_str())
        .build()
        .await
        .ok()?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.ok()?;
    let name = zbus::names::BusName::try_from(popupd_ipc::BUS_NAME).ok()?;
    match dbus.name_has_owner(name).await {
        Ok(false) => Some(addr),
        _ => None,
    }
}

pub(crate) async fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let keep = dir.is_some();
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("popupd-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let exe = std::env::current_exe()?;
    let popupctl = exe.with_file_name("popupctl");
    let mut procs = Procs(Vec::new());
    // Ctrl-C (in `network`), `kill` (SIGTERM) and a closed terminal
    // (SIGHUP) all stop the network, even while it starts: dropping `procs`
    // kills every process it started.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut hup) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::hangup())?,
    );
    let result = tokio::select! {
        r = network(&dir, &exe, &popupctl, &mut procs) => r,
        _ = term.recv() => {
            println!("SIGTERM: stopping the demo network");
            Ok(())
        }
        _ = hup.recv() => {
            println!("SIGHUP: stopping the demo network");
            Ok(())
        }
    };
    drop(procs);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn network(dir: &Path, exe: &Path, popupctl: &Path, procs: &mut Procs) -> anyhow::Result<()> {
    // 1. Trust: a CA and a certificate per server.
    let pki = dir.join("pki");
    if !pki.join("ca.crt").exists() {
        popupd::ca::init(&pki)?;
        for n in ["global.demo", "home-a.demo", "home-b.demo"] {
            popupd::ca::issue(&pki, n, &pki)?;
        }
    }
    // 2. One process runs the global server and both homes.
    let (pg, pa, pb) = (free_port()?, free_port()?, free_port()?);
    let net_yaml = dir.join("network.yaml");
    let home = |name: &str, port: u16| {
        format!(
            "  - name: {name}\n    listen: 127.0.0.1:{port}\n    cert: pki/{name}.crt\n    key: pki/{name}.key\n    ca: pki/ca.crt\n    data_dir: data/{name}\n    global: {{ name: global.demo, address: \"127.0.0.1:{pg}\" }}\n"
        )
    };
    std::fs::write(
        &net_yaml,
        format!(
            "# The demo network: global server and two homes in one process.\n\
             global:\n  name: global.demo\n  listen: 127.0.0.1:{pg}\n  cert: pki/global.demo.crt\n  key: pki/global.demo.key\n  ca: pki/ca.crt\n  data_dir: data/global\n\
             homes:\n{}{}",
            home("home-a.demo", pa),
            home("home-b.demo", pb)
        ),
    )?;
    let cfg = Config::load(&net_yaml)?;
    procs.0.push(spawn_logged(
        Command::new(exe).arg("run").arg("--config").arg(&net_yaml),
        &dir.join("network.log"),
    )?);
    for p in [pg, pa, pb] {
        wait_port(p).await?;
    }
    // 3. Accounts.
    let mut agents = Vec::new();
    for (handle, home_name) in [("alice", "home-a.demo"), ("bob", "home-b.demo")] {
        let h = admin::select_home(&cfg, Some(home_name))?;
        let cfg_path = dir.join(format!("{handle}.yaml"));
        if !cfg_path.exists() {
            let nd = admin::add_user(h, handle, "demo", &pki.join("ca.crt")).await?;
            agents.push((handle, cfg_path, nd.agent_yaml));
        } else {
            agents.push((handle, cfg_path.clone(), String::new()));
        }
    }
    // 4. Agents, each on its own bus (bob on the desktop's, if free).
    let desktop = session_bus_free().await;
    let mut buses = Vec::new();
    for (handle, cfg_path, yaml) in agents {
        let bus = match (&desktop, handle) {
            (Some(addr), "bob") => addr.clone(),
            _ => private_bus(dir, handle, procs).await?,
        };
        if !yaml.is_empty() {
            admin::write_private(
                &cfg_path,
                &format!(
                    "{yaml}  bus: \"{bus}\"\n  data_dir: data/{handle}\n  proxy: none\n  keepalive: 20s\n"
                ),
            )?;
        }
        procs.0.push(spawn_logged(
            Command::new(exe).arg("run").arg("--config").arg(&cfg_path),
            &dir.join(format!("{handle}.log")),
        )?);
        buses.push((handle, bus));
    }
    // Wait until both agents are connected.
    for (handle, bus) in &buses {
        wait_connected(bus).await.with_context(|| {
            format!(
                "{handle}'s agent did not connect; see {}",
                dir.join(format!("{handle}.log")).display()
            )
        })?;
    }
    let ctl = popupctl.display();
    let (alice_bus, bob_bus) = (&buses[0].1, &buses[1].1);
    let bob_env = if desktop.is_some() {
        "(your own session bus)".to_string()
    } else {
        format!("DBUS_SESSION_BUS_ADDRESS='{bob_bus}'")
    };
    println!(
        "\npopupd demo: a global server, two homes and two agents are up on loopback.\n\
         Files and logs: {dir}\n\n\
         In a second terminal, be bob and watch:\n  {bob_env_cmd}{ctl} watch\n\n\
         In a third, be alice and send:\n  DBUS_SESSION_BUS_ADDRESS='{alice_bus}' {ctl} send bob \"lunch?\"\n\n\
         bob replies to the last message alice sent him (its id is in his watch):\n  {bob_env_cmd}{ctl} reply ID \"12:30?\"\n\n\
         alice sees it and the status of her message:\n  DBUS_SESSION_BUS_ADDRESS='{alice_bus}' {ctl} history bob\n\n\
         Presence: alice asks bob to be a contact, bob accepts, and each sees the other:\n  DBUS_SESSION_BUS_ADDRESS='{alice_bus}' {ctl} contacts add bob\n  {bob_env_cmd}{ctl} contacts accept alice\n  {bob_env_cmd}{ctl} presence busy \"in a meeting\"\n  DBUS_SESSION_BUS_ADDRESS='{alice_bus}' {ctl} contacts\n\n\
         Or straight over D-Bus:\n  DBUS_SESSION_BUS_ADDRESS='{alice_bus}' busctl --user call {n} {p} {n} Send ss bob hi\n\n\
         Press Ctrl-C to stop everything.",
        dir = dir.display(),
        bob_env_cmd = if desktop.is_some() {
            String::new()
        } else {
            format!("{bob_env} ")
        },
        n = popupd_ipc::BUS_NAME,
        p = popupd_ipc::OBJECT_PATH,
    );
    if desktop.is_some() {
        println!("(bob's agent joined your desktop session bus: plain `popupctl` talks to it.)");
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => println!("\nstopping the demo network"),
        _ = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                for c in procs.0.iter_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        return st;
                    }
                }
            }
        } => eprintln!("a demo process exited; see the logs in {}", dir.display()),
    }
    Ok(())
}

async fn wait_connected(bus: &str) -> anyhow::Result<()> {
    let conn = zbus::connection::Builder::address(bus).build().await?;
    for _ in 0..200 {
        if let Ok(p) = popupd_ipc::Agent1Proxy::new(&conn).await
            && let Ok((true, _, _)) = p.status().await
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("not connected after 10 s")
}
