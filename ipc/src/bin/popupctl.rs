//! `popupctl`: the person's command line for popupd. Only a D-Bus client of
//! the agent (`org.popupd.Agent1`); it keeps no state of its own.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use popupd_ipc::{Agent1Proxy, HistoryEntry, exit};
use serde_json::json;

/// Send and receive popup messages through the local popupd agent.
///
/// Exit codes: 0 done; 1 refused by the agent (bad argument, unknown id) or
/// not connected (status); 2 bad command line; 3 no agent on the bus;
/// 4 --wait: failed or timed out; 5 the agent did not answer in time.
#[derive(Parser)]
#[command(name = "popupctl", version)]
struct Cli {
    /// Print JSON (one object per line for `watch`).
    #[arg(long, global = true)]
    json: bool,
    /// D-Bus address of the agent's bus (default: the session bus).
    #[arg(long, global = true, env = "POPUPCTL_BUS")]
    bus: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send a message; prints its id.
    Send {
        to: String,
        /// The text (several words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
        /// Wait until the message is accepted, delivered or read.
        #[arg(long, value_parser = ["accepted", "delivered", "read"])]
        wait: Option<String>,
        /// How long --wait waits.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Answer a received message; prints the reply's id.
    Reply {
        id: String,
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Mark a received message read (its sender is told).
    Read { id: String },
    /// Print messages and status changes as they happen, until Ctrl-C.
    Watch,
    /// Print recent messages, oldest first.
    History {
        /// Only messages with this handle.
        peer: Option<String>,
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: u32,
    },
    /// Is the agent connected to its home, and since when?
    ///
    /// An agent that has not connected since it started (D-Bus may start
    /// it for this very call) is given up to 3 s to connect first. Exit
    /// code 0 when connected.
    Status,
    /// The agent's plugins: name, version, state.
    Plugins,
    /// Your contacts and their presence, like a buddy list; or change the
    /// list (add sends a request the other person accepts or declines).
    Contacts {
        #[command(subcommand)]
        op: Option<ContactCmd>,
    },
    /// Show your presence, or set it: online (automatic: away when the
    /// desktop is idle), away, busy or offline (appear offline), with an
    /// optional status text.
    Presence {
        #[arg(value_parser = ["online", "away", "busy", "offline"])]
        state: Option<String>,
        /// Status text (several words are joined with spaces).
        text: Vec<String>,
    },
    /// A small window to write a message or a reply (zenity); what the
    /// popup's Reply opens. The text survives an error: the window comes
    /// back with the reason.
    Compose {
        /// Recipient (asked for when missing, unless replying).
        to: Option<String>,
        /// Answer this received message (the popup sets POPUPD_ID).
        #[arg(long, env = "POPUPD_ID")]
        reply: Option<String>,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the popupctl(1) man page (roff), or with --dir write it and one
    /// page per subcommand (popupctl-send.1, ...) there; for packaging.
    #[command(hide = true)]
    Manpage {
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum ContactCmd {
    /// Ask HANDLE to become a contact.
    Add { handle: String },
    /// Remove HANDLE (neither sees the other's presence any more).
    Remove { handle: String },
    /// Accept HANDLE's contact request.
    Accept { handle: String },
    /// Decline HANDLE's contact request.
    Decline { handle: String },
    /// Block HANDLE: no presence, no messages, no requests.
    Block { handle: String },
    /// Unblock HANDLE.
    Unblock { handle: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "popupctl",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Cmd::Manpage { dir } => {
            use clap::CommandFactory;
            let cmd = Cli::command().disable_help_subcommand(true);
            let ok = match dir {
                Some(dir) => write_manpages(cmd, dir).is_ok(),
                None => clap_mangen::Man::new(cmd)
                    .render(&mut std::io::stdout())
                    .is_ok(),
            };
            return if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        _ => {}
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("popupctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            let (code, msg) = explain(&e);
            eprintln!("popupctl: {msg}");
            ExitCode::from(code as u8)
        }
    }
}

/// Writes popupctl.1 and one page per visible subcommand (popupctl-send.1,
/// ...: the names popupctl.1 refers to them by) into `dir`.
fn write_manpages(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
    fn each(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            each(sub, dir)?;
        }
        clap_mangen::Man::new(cmd).generate_to(dir)?;
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    each(cmd, dir)
}

/// How long any one call to the agent may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `status` waits for an agent that has not connected since it
/// started (D-Bus may have started it for this call) to connect.
const FIRST_CONNECTION: Duration = Duration::from_secs(3);

fn explain(e: &anyhow::Error) -> (i32, String) {
    if let Some(n) = e.downcast_ref::<NotStarted>() {
        return (exit::NO_AGENT, n.to_string());
    }
    let timed_out = match e.downcast_ref::<zbus::Error>() {
        Some(zbus::Error::InputOutput(io)) => io.kind() == std::io::ErrorKind::TimedOut,
        _ => e.downcast_ref::<tokio::time::error::Elapsed>().is_some(),
    };
    if timed_out {
        return (
            exit::NO_ANSWER,
            format!(
                "the agent did not answer within {}: it may be stuck (see `journalctl --user -u popupd-agent`)",
                humantime::format_duration(CALL_TIMEOUT)
            ),
        );
    }
    if let Some(zbus::Error::MethodError(name, msg, _)) = e.downcast_ref::<zbus::Error>() {
        let name = name.as_str();
        if name == "org.freedesktop.DBus.Error.ServiceUnknown"
            || name == "org.freedesktop.DBus.Error.NameHasNoOwner"
        {
            return (
                exit::NO_AGENT,
                "no popupd agent on this bus; start it with `systemctl --user start popupd-agent` (or `popupd run -c ~/.config/popupd/agent.yaml`) (or check --bus / DBUS_SESSION_BUS_ADDRESS)".into(),
            );
        }
        let msg = msg.as_deref().unwrap_or("");
        if name == popupd_ipc::errors::FAILED {
            return (
                exit::REFUSED,
                format!("the agent failed: {msg} (see `journalctl --user -u popupd-agent`)"),
            );
        }
        let short = name.rsplit('.').next().unwrap_or(name);
        return (exit::REFUSED, format!("{short}: {msg}"));
    }
    if e.downcast_ref::<zbus::Error>().is_some() {
        return (
            exit::NO_AGENT,
            format!("cannot reach the session bus: {e:#}"),
        );
    }
    (exit::REFUSED, format!("{e:#}"))
}

/// Connects to the bus. Every call made on the connection fails after
/// [`CALL_TIMEOUT`] rather than wait for an agent that does not answer.
async fn connect(bus: Option<&str>) -> anyhow::Result<zbus::Connection> {
    let builder = match bus {
        Some(a) => zbus::connection::Builder::address(a),
        None => zbus::connection::Builder::session(),
    };
    let conn =
        tokio::time::timeout(CALL_TIMEOUT, builder.method_timeout(CALL_TIMEOUT).build()).await??;
    Ok(conn)
}

/// The agent's user unit, which D-Bus activation starts.
const AGENT_UNIT: &str = "popupd-agent.service";

/// The agent's unit failed to start; the reason, said at once.
#[derive(Debug)]
struct NotStarted(String);

impl std::fmt::Display for NotStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotStarted {}

/// When the agent is not on the bus and the bus has a systemd user
/// manager, starts its unit through systemd and waits for the start job, so a start that
/// fails (no config, a broken one) is said at once. D-Bus activation alone
/// would wait out the bus's activation timeout: systemd tells the bus only
/// about starts it cannot even queue. Without a systemd user manager (a
/// private bus, `popupd demo`), the first call activates the agent as before.
async fn ensure_agent(conn: &zbus::Connection) -> anyhow::Result<()> {
    use zbus::names::BusName;
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    if dbus
        .name_has_owner(BusName::try_from(popupd_ipc::BUS_NAME)?)
        .await?
    {
        return Ok(());
    }
    let systemd = zbus::Proxy::new(
        conn,
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
    )
    .await?;
    // Listen before asking, or the job could end unheard.
    let mut removed = systemd.receive_signal("JobRemoved").await?;
    // The user manager joins a bus it did not start a moment after the
    // bus starts; this call waits for it (D-Bus activation). No systemd on
    // this bus: leave the agent to D-Bus activation.
    if let Err(e) = systemd.call::<_, _, ()>("Subscribe", &()).await {
        return match e {
            zbus::Error::MethodError(name, _, _)
                if name.as_str().starts_with("org.freedesktop.DBus.Error.") =>
            {
                Ok(())
            }
            e => Err(e.into()),
        };
    }
    let job: zbus::OwnedObjectPath = match systemd.call("StartUnit", &(AGENT_UNIT, "replace")).await
    {
        Ok(j) => j,
        // Not installed as a user unit, or masked: leave it to D-Bus.
        Err(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit"
                || name.as_str() == "org.freedesktop.systemd1.UnitMasked" =>
        {
            return Ok(());
        }
        Err(zbus::Error::MethodError(_, msg, _)) => {
            return Err(NotStarted(format!(
                "the popupd agent cannot start: {}; see `systemctl --user status popupd-agent`",
                msg.unwrap_or_default()
            ))
            .into());
        }
        Err(e) => return Err(e.into()),
    };
    let result = tokio::time::timeout(CALL_TIMEOUT, async {
        while let Some(m) = removed.next().await {
            if let Ok((_, path, _, result)) = m
                .body()
                .deserialize::<(u32, zbus::OwnedObjectPath, String, String)>()
                && path == job
            {
                return Some(result);
            }
        }
        None
    })
    .await?;
    match result.as_deref() {
        Some("done") | None => Ok(()),
        Some(result) => {
            // 78 (EX_CONFIG): the agent refused its config, or found none.
            let why = if agent_exit_status(conn).await == Some(78) {
                "~/.config/popupd/agent.yaml is missing or refused (your admin makes it with `popupd user add`)".to_string()
            } else {
                format!("its start {result}")
            };
            Err(NotStarted(format!(
                "the popupd agent did not start: {why}; `systemctl --user status popupd-agent` shows the reason"
            ))
            .into())
        }
    }
}

/// The exit status of the agent unit's last main process, if systemd says.
async fn agent_exit_status(conn: &zbus::Connection) -> Option<i32> {
    let systemd = zbus::Proxy::new(
        conn,
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
    )
    .await
    .ok()?;
    let unit: zbus::OwnedObjectPath = systemd.call("GetUnit", &(AGENT_UNIT,)).await.ok()?;
    let service = zbus::Proxy::new(
        conn,
        "org.freedesktop.systemd1",
        unit,
        "org.freedesktop.systemd1.Service",
    )
    .await
    .ok()?;
    service.get_property::<i32>("ExecMainStatus").await.ok()
}

fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let conn = connect(cli.bus.as_deref()).await?;
    ensure_agent(&conn).await?;
    // No property cache: it would subscribe to changes nobody reads.
    let agent = Agent1Proxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let json = cli.json;
    match cli.cmd {
        Cmd::Send {
            to,
            text,
            wait,
            timeout,
        } => {
            let id = agent.send(&to, &text.join(" ")).await?;
            if json {
                println!("{}", json!({ "id": id }));
            } else {
                println!("{id}");
            }
            let Some(want) = wait else {
                return Ok(exit::OK);
            };
            let rank = |s: &str| {
                ["queued", "accepted", "delivered", "read"]
                    .iter()
                    .position(|x| *x == s)
            };
            let want_rank = rank(&want);
            // Only this message's changes (the bus filters them), and then
            // what it has reached already: nothing is missed, and a burst
            // of other messages' signals cannot fill the connection's queue.
            let mut changes = agent
                .receive_message_status_changed_with_args(&[(0, id.as_str())])
                .await?;
            let now = agent.message(&id).await?;
            let reached = |status: &str, reason: &str| {
                if status == "failed" {
                    eprintln!("popupctl: {id} failed: {reason}");
                    Some(exit::NOT_DELIVERED)
                } else if rank(status) >= want_rank {
                    Some(exit::OK)
                } else {
                    None
                }
            };
            if let Some(code) = reached(&now.status, &now.reason) {
                return Ok(code);
            }
            let waited = tokio::time::timeout(timeout, async {
                while let Some(sig) = changes.next().await {
                    let Ok(a) = sig.args() else { continue };
                    if a.id != id {
                        continue;
                    }
                    if let Some(code) = reached(a.status, a.reason) {
                        return code;
                    }
                }
                exit::NOT_DELIVERED
            })
            .await;
            Ok(waited.unwrap_or_else(|_| {
                eprintln!(
                    "popupctl: {id} not {want} within {}",
                    humantime::format_duration(timeout)
                );
                exit::NOT_DELIVERED
            }))
        }
        Cmd::Reply { id, text } => {
            let new = agent.reply(&id, &text.join(" ")).await?;
            if json {
                println!("{}", json!({ "id": new }));
            } else {
                println!("{new}");
            }
            Ok(exit::OK)
        }
        Cmd::Read { id } => {
            agent.mark_read(&id).await?;
            Ok(exit::OK)
        }
        Cmd::Watch => watch(&agent, json).await,
        Cmd::History { peer, limit } => {
            let entries = agent.history(peer.as_deref().unwrap_or(""), limit).await?;
            for e in entries {
                print_entry(&e, json);
            }
            Ok(exit::OK)
        }
        Cmd::Status => {
            let (mut connected, home, mut since) = agent.status().await?;
            if !connected && since == 0 {
                // Never connected since it started: most often an agent
                // D-Bus has just started for this very call. Give its first
                // connection a moment rather than say "not connected".
                let mut changed = agent.receive_connection_changed().await?;
                (connected, _, since) = agent.status().await?;
                let until = tokio::time::Instant::now() + FIRST_CONNECTION;
                while !connected {
                    match tokio::time::timeout_at(until, changed.next()).await {
                        Ok(Some(_)) => (connected, _, since) = agent.status().await?,
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            let handle = agent.handle().await?;
            if json {
                println!(
                    "{}",
                    json!({ "handle": handle, "connected": connected, "home": home, "since": since })
                );
            } else {
                let state = if connected {
                    "connected to"
                } else {
                    "not connected to"
                };
                let when = if since > 0 {
                    format!(" since {}", time(since))
                } else {
                    String::new()
                };
                println!("{handle}: {state} {home}{when}");
            }
            Ok(if connected { exit::OK } else { exit::REFUSED })
        }
        Cmd::Plugins => {
            let list = agent.plugins().await?;
            if json {
                for (name, version, state, file) in list {
                    println!(
                        "{}",
                        json!({"name": name, "version": version, "state": state, "file": file})
                    );
                }
            } else if list.is_empty() {
                println!("no plugins loaded");
            } else {
                println!("{:<12} {:<10} {:<40} FILE", "NAME", "VERSION", "STATE");
                for (name, version, state, file) in list {
                    println!("{name:<12} {version:<10} {state:<40} {file}");
                }
            }
            Ok(exit::OK)
        }
        Cmd::Compose { to, reply } => compose(&agent, to, reply).await,
        Cmd::Contacts { op: None } => {
            let list = agent.contacts().await?;
            if json {
                for c in list {
                    println!("{}", serde_json::to_string(&c).unwrap_or_default());
                }
            } else if list.is_empty() {
                println!("no contacts yet; add one with `popupctl contacts add HANDLE`");
            } else {
                println!("{:<20} {:<9} {:<20} STATUS", "CONTACT", "STATE", "SINCE");
                for c in list {
                    let (state, since) = match c.relation.as_str() {
                        "accepted" => (
                            c.state.clone(),
                            if c.since > 0 {
                                time(c.since)
                            } else {
                                String::new()
                            },
                        ),
                        "requested" => ("-".into(), "request sent".into()),
                        "pending" => ("-".into(), "asks you (accept?)".into()),
                        _ => ("-".into(), c.relation.clone()),
                    };
                    println!("{:<20} {:<9} {:<20} {}", c.handle, state, since, c.text);
                }
                if !agent.status().await?.0 {
                    eprintln!("(not connected to the home: this is the last known presence)");
                }
            }
            Ok(exit::OK)
        }
        Cmd::Contacts { op: Some(op) } => {
            let (done, handle) = match op {
                ContactCmd::Add { handle } => {
                    agent.add_contact(&handle).await?;
                    ("asked", handle)
                }
                ContactCmd::Remove { handle } => {
                    agent.remove_contact(&handle).await?;
                    ("removed", handle)
                }
                ContactCmd::Accept { handle } => {
                    agent.answer_contact_request(&handle, true).await?;
                    ("accepted", handle)
                }
                ContactCmd::Decline { handle } => {
                    agent.answer_contact_request(&handle, false).await?;
                    ("declined", handle)
                }
                ContactCmd::Block { handle } => {
                    agent.block(&handle).await?;
                    ("blocked", handle)
                }
                ContactCmd::Unblock { handle } => {
                    agent.unblock(&handle).await?;
                    ("unblocked", handle)
                }
            };
            if json {
                println!("{}", json!({ "handle": handle, "done": done }));
            } else {
                println!("{done} {handle}");
            }
            Ok(exit::OK)
        }
        Cmd::Presence { state: None, .. } => {
            let (state, text) = agent.presence().await?;
            if json {
                println!("{}", json!({ "state": state, "text": text }));
            } else if text.is_empty() {
                println!("{state}");
            } else {
                println!("{state}: {text}");
            }
            Ok(exit::OK)
        }
        Cmd::Presence {
            state: Some(state),
            text,
        } => {
            agent.set_presence(&state, &text.join(" ")).await?;
            Ok(exit::OK)
        }
        Cmd::Completions { .. } | Cmd::Manpage { .. } => Ok(exit::OK),
    }
}

fn print_entry(e: &HistoryEntry, json: bool) {
    if json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
        return;
    }
    let arrow = if e.direction == "in" {
        format!("{} →", e.from)
    } else {
        format!("→ {}", e.to)
    };
    let reason = if e.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", e.reason)
    };
    println!(
        "{} {arrow} {}  [{}{reason}] {}",
        time(e.sent_at),
        e.text,
        e.status,
        e.id
    );
}

async fn watch(agent: &Agent1Proxy<'_>, json: bool) -> anyhow::Result<i32> {
    let mut received = agent.receive_message_received().await?;
    let mut status = agent.receive_message_status_changed().await?;
    let mut conn = agent.receive_connection_changed().await?;
    let mut presence = agent.receive_contact_presence_changed().await?;
    let mut requests = agent.receive_contact_request().await?;
    if !json {
        let (c, home, _) = agent.status().await?;
        eprintln!(
            "watching {} ({} {home}); Ctrl-C to stop",
            agent.handle().await?,
            if c {
                "connected to"
            } else {
                "not connected to"
            }
        );
    }
    use std::io::Write;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(exit::OK),
            Some(s) = received.next() => {
                let Ok(a) = s.args() else { continue };
                if json {
                    println!("{}", json!({"event": "message", "id": a.id, "from": a.from, "text": a.text,
                        "sent_at": a.sent_at, "reply_to": a.reply_to}));
                } else {
                    println!("{} {}: {}  ({})", time(a.sent_at), a.from, a.text, a.id);
                }
            }
            Some(s) = status.next() => {
                let Ok(a) = s.args() else { continue };
                if json {
                    println!("{}", json!({"event": "status", "id": a.id, "status": a.status, "reason": a.reason}));
                } else {
                    let reason = if a.reason.is_empty() { String::new() } else { format!(": {}", a.reason) };
                    println!("  {} is {}{reason}", a.id, a.status);
                }
            }
            Some(s) = presence.next() => {
                let Ok(a) = s.args() else { continue };
                if json {
                    println!("{}", json!({"event": "presence", "handle": a.handle, "state": a.state, "text": a.text}));
                } else {
                    let text = if a.text.is_empty() { String::new() } else { format!(": {}", a.text) };
                    println!("  {} is {}{text}", a.handle, a.state);
                }
            }
            Some(s) = requests.next() => {
                let Ok(a) = s.args() else { continue };
                if json {
                    println!("{}", json!({"event": "contact_request", "handle": a.handle}));
                } else {
                    println!("  {} asks to be your contact (popupctl contacts accept|decline {})", a.handle, a.handle);
                }
            }
            Some(s) = conn.next() => {
                let Ok(a) = s.args() else { continue };
                if json {
                    println!("{}", json!({"event": "connection", "connected": a.connected, "home": a.home}));
                } else {
                    println!("  {} {}", if a.connected { "connected to" } else { "disconnected from" }, a.home);
                }
            }
            else => return Ok(exit::OK),
        }
        let _ = std::io::stdout().flush();
    }
}

/// Asks with a zenity entry window; `None` when the person cancels (Esc).
fn ask(title: &str, prompt: &str, prefill: &str) -> anyhow::Result<Option<String>> {
    let out = std::process::Command::new("zenity")
        .args([
            "--entry",
            "--width=420",
            "--title",
            title,
            "--text",
            prompt,
            "--entry-text",
            prefill,
        ])
        .output()
        .map_err(|e| {
            anyhow::anyhow!("the compose window needs zenity ({e}): apt install zenity")
        })?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_string(),
    ))
}

/// The compose window: zenity (GTK, in Debian) rather than a GTK binding of
/// our own, so the agent's build stays free of GTK; it shows what is being
/// answered, sends on Enter, cancels on Esc.
async fn compose(
    agent: &Agent1Proxy<'_>,
    to: Option<String>,
    reply: Option<String>,
) -> anyhow::Result<i32> {
    let original = match &reply {
        Some(id) => Some(agent.message(id).await?),
        None => None,
    };
    let to = match (&original, to) {
        (Some(m), _) => m.from.clone(),
        (None, Some(t)) => t,
        (None, None) => match ask("New message — popupd", "To (handle):", "")? {
            Some(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => return Ok(exit::OK),
        },
    };
    let title = match &original {
        Some(m) => format!("Reply to {} — popupd", m.from),
        None => format!("Message to {to} — popupd"),
    };
    let mut prompt = match &original {
        Some(m) => format!("{}: {}", m.from, m.text),
        None => format!("To {to}:"),
    };
    let mut text = String::new();
    loop {
        let Some(t) = ask(&title, &prompt, &text)? else {
            return Ok(exit::OK);
        };
        text = t;
        if text.trim().is_empty() {
            continue;
        }
        let sent = match &reply {
            Some(id) => agent.reply(id, &text).await,
            None => agent.send(&to, &text).await,
        };
        match sent {
            Ok(id) => {
                println!("{id}");
                return Ok(exit::OK);
            }
            // Keep the text; show why, and let the person try again.
            Err(e) => {
                let (_, why) = explain(&anyhow::Error::from(e));
                prompt = format!("Not sent: {why}\n\n{prompt}");
            }
        }
    }
}
