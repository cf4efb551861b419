//! `popupd`: the daemon (`popupd run`) and its admin commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use popupd::config::Config;
use popupd::home::admin;
use popupd::task::Shutdown;
use tracing_subscriber::filter::Targets;

mod demo;

/// Immediate popup messaging for Linux desktops: agent, home and global
/// server in one daemon, chosen by the config.
#[derive(Parser)]
#[command(name = "popupd", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the roles the config names, until SIGTERM.
    Run {
        /// Config file.
        #[arg(
            short,
            long,
            env = "POPUPD_CONFIG",
            default_value = "/etc/popupd/popupd.yaml"
        )]
        config: PathBuf,
    },
    /// Check a config file and exit: 0 if it is good, 1 with the reason if
    /// not (its last line is the file, line and what is wrong). Under
    /// systemd it also checks that each server's `data_dir` lies in the
    /// unit's state folder (`$STATE_DIRECTORY`), the only place it may write;
    /// by hand, for /etc/popupd/NAME.yaml, it warns of a `data_dir` outside
    /// /var/lib/popupd/NAME, which popupd@NAME would refuse.
    CheckConfig {
        /// Config file.
        file: PathBuf,
    },
    /// Ask the running home or global server(s) of a config how they are:
    /// uptime, connections, peer links and their queues, the store's
    /// health, certificate expiry. Asks on each server's admin socket
    /// (DATA_DIR/admin.sock: root and the popupd group may); exits 1 if a
    /// server does not answer.
    Status {
        /// Config file of the running server.
        #[arg(
            short,
            long,
            env = "POPUPD_CONFIG",
            default_value = "/etc/popupd/popupd.yaml"
        )]
        config: PathBuf,
        /// Print JSON (docs/status.md describes it).
        #[arg(long)]
        json: bool,
    },
    /// Manage the network's certificate authority.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Manage the accounts of a home.
    #[command(subcommand)]
    User(UserCmd),
    /// Manage the devices of an account.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Manage contact lists (bulk provisioning).
    #[command(subcommand)]
    Contact(ContactCmd),
    /// Bring up a whole network on loopback (CA, global, two homes, agents
    /// for alice and bob) and print what to type to use it.
    Demo {
        /// Work in this directory instead of a fresh temporary one (kept).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the popupd(8) man page (roff), or with --dir write it and one
    /// page per subcommand (popupd-user-add.8, ...) there; for packaging.
    #[command(hide = true)]
    Manpage {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Make a new CA: ca.crt (give to every server and agent) and ca.key (keep secret).
    Init {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Issue a certificate for a home or the global server: NAME.crt and NAME.key.
    Issue {
        /// DNS name of the server, e.g. home-a.example.org.
        name: String,
        /// Directory of the CA.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Where to write the certificate and key (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke a home (or the global server) by name: add it to the CA's
    /// `revoked` list. Copy that file beside `ca.crt` on every server (or
    /// where its config's `revoked` points) and reload them: the name is
    /// refused from then on and its links close.
    Revoke {
        /// The name in the certificate, e.g. home-b.example.org.
        name: String,
        /// Directory of the CA.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct HomeArgs {
    /// The home's config file.
    #[arg(
        short,
        long,
        env = "POPUPD_CONFIG",
        default_value = "/etc/popupd/popupd.yaml"
    )]
    config: PathBuf,
    /// Which home, if the config runs several.
    #[arg(long)]
    home: Option<String>,
}

#[derive(clap::Args)]
struct NewDeviceArgs {
    /// Name of the device.
    #[arg(long, default_value = "desktop")]
    device: String,
    /// Write the agent config here (mode 0600) instead of printing it, with
    /// a copy of the network CA certificate beside it (`ca.crt`, unless
    /// --ca is given). Folders are made as needed, and the files and new
    /// folders go to the owner of the nearest folder that existed: as root,
    /// `--agent-config /home/alice/.config/popupd/agent.yaml` gives alice a
    /// config her agent can use as it stands.
    #[arg(long)]
    agent_config: Option<PathBuf>,
    /// CA certificate path to put in the agent config, as the agent will
    /// read it (default: `ca.crt`, beside the config).
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create an account with one device, and print its agent config.
    Add {
        handle: String,
        #[command(flatten)]
        home: HomeArgs,
        #[command(flatten)]
        dev: NewDeviceArgs,
    },
    /// Create many accounts at once (PREFIX0, PREFIX1, ...), one device
    /// each; prints `handle<TAB>device<TAB>secret` lines (keep them private).
    AddMany {
        prefix: String,
        count: usize,
        #[command(flatten)]
        home: HomeArgs,
        /// Name of each account's device.
        #[arg(long, default_value = "desktop")]
        device: String,
    },
    /// List accounts and their devices.
    List {
        #[command(flatten)]
        home: HomeArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an account, its devices and queued messages.
    Remove {
        handle: String,
        #[command(flatten)]
        home: HomeArgs,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Add a device to an account, and print its agent config.
    Add {
        handle: String,
        #[command(flatten)]
        home: HomeArgs,
        #[command(flatten)]
        dev: NewDeviceArgs,
    },
    /// Revoke a device: a running home closes its connection within 10 s and refuses it after.
    Revoke {
        handle: String,
        device: String,
        #[command(flatten)]
        home: HomeArgs,
    },
}

#[derive(Subcommand)]
enum ContactCmd {
    /// Make pairs accepted contacts without a request, from FILE (`-` for
    /// stdin): one `OWNER PEER [PEER_HOME]` per line, OWNER a user of this
    /// home. Both sides of a pair on this home are linked at once; for a
    /// PEER on another home, give its home and run the reverse lines there.
    Import {
        file: PathBuf,
        #[command(flatten)]
        home: HomeArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    popupd_protocol::net::tls::install_default_provider();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("popupd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("popupd: {e:#}");
            if e.downcast_ref::<BadConfig>().is_some() {
                ExitCode::from(BadConfig::EXIT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `popupd run` refused its config. It exits with [`BadConfig::EXIT`] so
/// the units can tell a config to fix from a failure worth a restart
/// (`RestartPreventExitStatus=`).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct BadConfig(anyhow::Error);

impl BadConfig {
    /// EX_CONFIG of sysexits.h.
    const EXIT: u8 = 78;
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Run { config } => run(&config).await,
        Cmd::CheckConfig { file } => {
            let cfg = Config::load(&file)
                .and_then(|c| in_state_directory(&c).map(|()| c))
                .map_err(reason_last)?;
            let roles: Vec<String> = cfg
                .roles()
                .iter()
                .map(|r| format!("{r:?}").to_lowercase())
                .collect();
            for w in cfg.warnings().into_iter().chain(unit_would_refuse(&cfg)) {
                eprintln!("warning: {w}");
            }
            println!("{}: ok ({})", file.display(), roles.join(", "));
            Ok(())
        }
        Cmd::Status { config, json } => status(&config, json).await,
        Cmd::Ca(CaCmd::Init { dir }) => {
            let (crt, key) = popupd::ca::init(&dir)?;
            println!(
                "CA certificate: {}\nCA key:         {} (keep it secret)",
                crt.display(),
                key.display()
            );
            Ok(())
        }
        Cmd::Ca(CaCmd::Revoke { name, dir }) => {
            let list = popupd::ca::revoke(&dir, &name)?;
            println!(
                "{name} revoked in {}; copy it to every server beside ca.crt and reload them (systemctl reload popupd@NAME)",
                list.display()
            );
            Ok(())
        }
        Cmd::Ca(CaCmd::Issue { name, dir, out }) => {
            let out = out.unwrap_or_else(|| dir.clone());
            let (crt, key) = popupd::ca::issue(&dir, &name, &out)?;
            println!(
                "certificate: {}\nkey:         {}",
                crt.display(),
                key.display()
            );
            Ok(())
        }
        Cmd::User(UserCmd::Add { handle, home, dev }) => {
            let cfg = Config::load(&home.config)?;
            let h = admin::select_home(&cfg, home.home.as_deref())?;
            let ca = agent_ca(&dev);
            let nd = admin::add_user(h, &handle, &dev.device, &ca).await?;
            output_device(&nd, &dev, h)
        }
        Cmd::Device(DeviceCmd::Add { handle, home, dev }) => {
            let cfg = Config::load(&home.config)?;
            let h = admin::select_home(&cfg, home.home.as_deref())?;
            let ca = agent_ca(&dev);
            let nd = admin::add_device(h, &handle, &dev.device, &ca)?;
            output_device(&nd, &dev, h)
        }
        Cmd::User(UserCmd::AddMany {
            prefix,
            count,
            home,
            device,
        }) => {
            let cfg = Config::load(&home.config)?;
            let h = admin::select_home(&cfg, home.home.as_deref())?;
            let t = std::time::Instant::now();
            let creds = admin::add_many(h, &prefix, count, &device).await?;
            let mut out = String::with_capacity(creds.len() * 100);
            for (handle, secret) in &creds {
                out.push_str(&format!("{handle}\t{device}\t{secret}\n"));
            }
            print!("{out}");
            eprintln!(
                "created {} accounts on {} in {:.1} s",
                creds.len(),
                h.name,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::User(UserCmd::List { home, json }) => {
            let cfg = Config::load(&home.config)?;
            let h = admin::select_home(&cfg, home.home.as_deref())?;
            let users = admin::list_users(h)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&users)?);
            } else {
                println!("{:<24} DEVICES", "HANDLE");
                for u in users {
                    println!("{:<24} {}", u.handle, u.devices.join(", "));
                }
            }
            Ok(())
        }
        Cmd::User(UserCmd::Remove { handle, home }) => {
            let cfg = Config::load(&home.config)?;
            let h = admin::select_home(&cfg, home.home.as_deref())?;
            admin::remove_user(h, &handle).await?;
            println!("removed {handle} from {}", h.name);
            Ok(())
        }
        Cmd::Device(DeviceCmd::Revoke {
            handle,
            device,
            home,
        }) => {
            let cfg = Config::load(&home.config)?;
            let h = admin::select_home(&cfg, home.home.as_deref())?;
            admin::revoke_device(h, &handle, &device).await?;
            println!("revoked device {device} of {handle}");
            Ok(())
        }
        Cmd::Contact(ContactCmd::Import { file, home }) => {
            let cfg = Config::load(&home.config)?;
            let h = admin::select_home(&cfg, home.home.as_deref())?;
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let t = std::time::Instant::now();
            let n = admin::import_contacts(h, &text)?;
            eprintln!(
                "linked {n} contact pairs on {} in {:.1} s",
                h.name,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Demo { dir } => demo::run(dir).await,
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "popupd", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Manpage { dir } => {
            use clap::CommandFactory;
            let cmd = Cli::command().disable_help_subcommand(true);
            match dir {
                Some(dir) => write_manpages(cmd, "8", &dir)?,
                None => clap_mangen::Man::new(cmd)
                    .section("8")
                    .render(&mut std::io::stdout())?,
            }
            Ok(())
        }
    }
}

/// `popupd status`: asks each server of the config on its admin socket.
async fn status(config: &Path, json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config).map_err(reason_last)?;
    let dirs: Vec<(String, PathBuf)> = cfg
        .global
        .iter()
        .map(|g| (format!("global {}", g.name), g.data_dir.clone()))
        .chain(
            cfg.homes
                .iter()
                .map(|h| (format!("home {}", h.name), h.data_dir.clone())),
        )
        .collect();
    if dirs.is_empty() {
        anyhow::bail!(
            "{}: runs no home or global server; `popupd status` asks servers (an agent answers `popupctl`)",
            config.display()
        );
    }
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    for (server, dir) in dirs {
        match popupd::status::ask(&popupd::status::socket_path(&dir)).await {
            Ok(r) => reports.push(r),
            Err(e) => failed.push(format!("{server}: {e}")),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "servers": reports }))?
        );
    } else {
        for r in &reports {
            print!("{}", popupd::status::human(r));
        }
    }
    match failed.len() {
        0 => Ok(()),
        _ => anyhow::bail!("{}", failed.join("\npopupd: ")),
    }
}

/// The CA path the new agent config names: --ca, else `ca.crt` beside the
/// config (a copy [`output_device`] makes, or, printed, the person puts
/// there): the home's own path is one the person cannot read.
fn agent_ca(dev: &NewDeviceArgs) -> PathBuf {
    dev.ca.clone().unwrap_or_else(|| PathBuf::from("ca.crt"))
}

fn output_device(
    nd: &admin::NewDevice,
    dev: &NewDeviceArgs,
    h: &popupd::config::HomeConfig,
) -> anyhow::Result<()> {
    let Some(p) = dev.agent_config.as_deref() else {
        eprintln!(
            "created {} (device {}); agent config follows: put it in ~/.config/popupd/agent.yaml{}",
            nd.handle,
            nd.device,
            if dev.ca.is_none() {
                format!(
                    ", with a copy of {} as ca.crt beside it",
                    h.ca_path.display()
                )
            } else {
                String::new()
            }
        );
        print!("{}", nd.agent_yaml);
        return Ok(());
    };
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Whoever owns the nearest folder that exists gets what is made below it.
    let existing = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    let owner =
        std::fs::metadata(existing).with_context(|| format!("reading {}", existing.display()))?;
    let mut made: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|a| !a.exists())
        .map(Path::to_path_buf)
        .collect();
    made.reverse();
    admin::write_private(p, &nd.agent_yaml)?;
    made.push(p.to_path_buf());
    let mut copied = None;
    if dev.ca.is_none() {
        let to = dir.join("ca.crt");
        let ca = std::fs::read(&h.ca_path)
            .with_context(|| format!("reading the CA certificate {}", h.ca_path.display()))?;
        // Already there (the same file, or a copy made before): leave it.
        if std::fs::read(&to).ok().as_ref() != Some(&ca) {
            std::fs::write(&to, &ca)
                .with_context(|| format!("copying the CA certificate to {}", to.display()))?;
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
            made.push(to.clone());
        }
        copied = Some(to);
    }
    hand_to(&made, &owner)?;
    eprintln!(
        "created {} (device {}); agent config written to {}{}",
        nd.handle,
        nd.device,
        p.display(),
        copied
            .map(|c| format!(", the CA certificate to {}", c.display()))
            .unwrap_or_default()
    );
    Ok(())
}

/// Gives `paths` to the owner of `like`, when that is someone else: root
/// making a user's agent config. Not root, it is the caller's own already.
fn hand_to(paths: &[PathBuf], like: &std::fs::Metadata) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for path in paths {
        let m = std::fs::metadata(path)?;
        if (m.uid(), m.gid()) != (like.uid(), like.gid()) {
            std::os::unix::fs::chown(path, Some(like.uid()), Some(like.gid())).with_context(
                || {
                    format!(
                        "giving {} to uid {} (the owner of its folder)",
                        path.display(),
                        like.uid()
                    )
                },
            )?;
        }
    }
    Ok(())
}

/// Under systemd (`$STATE_DIRECTORY` set by `StateDirectory=`), a server's
/// `data_dir` must lie in the unit's state folder: the sandbox lets it
/// write nowhere else, and the failure would otherwise come later, as
/// "Read-only file system".
fn in_state_directory(cfg: &Config) -> Result<(), popupd::config::ConfigError> {
    let Some(allowed) = std::env::var_os("STATE_DIRECTORY") else {
        return Ok(());
    };
    let allowed: Vec<PathBuf> = std::env::split_paths(&allowed).collect();
    let dirs = cfg
        .global
        .iter()
        .map(|g| ("global.data_dir".to_string(), &g.data_dir))
        .chain(
            cfg.homes
                .iter()
                .map(|h| ("home.data_dir".to_string(), &h.data_dir)),
        );
    for (field, dir) in dirs {
        if allowed.iter().any(|a| dir.starts_with(a)) {
            continue;
        }
        let shown: Vec<String> = allowed.iter().map(|a| a.display().to_string()).collect();
        return Err(popupd::config::ConfigError {
            file: cfg.source.display().to_string(),
            line: 0,
            column: 0,
            field,
            message: format!(
                "{} is outside this service's state folder {}, the only place it may write",
                dir.display(),
                shown.join(", ")
            ),
            snippet: "".into(),
            hint: "popupd@NAME runs /etc/popupd/NAME.yaml and writes only /var/lib/popupd/NAME: set data_dir to that folder, or rename the file after it".into(),
        });
    }
    Ok(())
}

/// Checked by hand (no `$STATE_DIRECTORY`), a config in /etc/popupd: what
/// [`in_state_directory`] will refuse when `popupd@NAME` runs it.
fn unit_would_refuse(cfg: &Config) -> Option<String> {
    let path = std::path::absolute(&cfg.source).ok()?;
    if std::env::var_os("STATE_DIRECTORY").is_some()
        || path.parent() != Some(Path::new("/etc/popupd"))
        || path.extension()? != "yaml"
    {
        return None;
    }
    let name = path.file_stem()?.to_string_lossy().to_string();
    let state = Path::new("/var/lib/popupd").join(&name);
    let elsewhere: Vec<String> = cfg
        .global
        .iter()
        .map(|g| &g.data_dir)
        .chain(cfg.homes.iter().map(|h| &h.data_dir))
        .filter(|d| !d.starts_with(&state))
        .map(|d| d.display().to_string())
        .collect();
    (!elsewhere.is_empty()).then(|| {
        format!(
            "popupd@{name} may write only {}, and will refuse data_dir {}: set data_dir to it, or rename the file",
            state.display(),
            elsewhere.join(", ")
        )
    })
}

/// A config error with its reason on the last line, where `systemctl
/// status` (which shows a unit's last journal lines) still has it: the
/// offending lines and the hint go first.
fn reason_last(e: popupd::config::ConfigError) -> anyhow::Error {
    for l in e.snippet.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("{l}");
    }
    if !e.hint.is_empty() {
        eprintln!("  hint: {}", e.hint);
    }
    let at = match (e.line, e.column) {
        (0, _) => String::new(),
        (l, c) => format!(":{l}:{c}"),
    };
    let field = if e.field.is_empty() {
        String::new()
    } else {
        format!("field `{}`: ", e.field)
    };
    anyhow::anyhow!("{}{at}: {field}{}", e.file, e.message)
}

/// Writes the man page of `cmd` and one per visible subcommand, all levels
/// (NAME-SUB-SUB.SECTION, the names the pages refer to each other by).
fn write_manpages(cmd: clap::Command, section: &str, dir: &Path) -> anyhow::Result<()> {
    fn each(cmd: clap::Command, section: &str, dir: &Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            each(sub, section, dir)?;
        }
        clap_mangen::Man::new(cmd)
            .section(section)
            .generate_to(dir)?;
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    each(cmd, section, dir).with_context(|| format!("writing man pages to {}", dir.display()))
}

type LogHandle = tracing_subscriber::reload::Handle<Targets, tracing_subscriber::Registry>;

/// The log filter: `RUST_LOG` if set and valid, else the config's level
/// (checked when the config was read) with the chatty libraries at warn.
///
/// `Targets` rather than `EnvFilter`: the same `target=level` syntax
/// without span and field filters, which popupd does not use, and without
/// the regex engine they bring (code every agent would map).
fn filter(level: &str) -> Targets {
    if let Ok(env) = std::env::var("RUST_LOG") {
        match env.parse() {
            Ok(t) => return t,
            Err(e) => eprintln!("popupd: RUST_LOG={env:?} is not a log filter ({e}); ignoring it"),
        }
    }
    format!("{level},zbus=warn,tungstenite=warn")
        .parse()
        .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
}

/// Logs to the journal (natively, with fields) when stderr is the journal,
/// else as text to stderr. Returns a handle to change the level on reload.
fn init_logging(level: &str) -> LogHandle {
    use tracing_subscriber::prelude::*;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter(level));
    let journald = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(|| tracing_journald::layer().ok())
        .flatten();
    let reg = tracing_subscriber::registry().with(filter);
    match journald {
        Some(j) => reg.with(j).init(),
        None => reg
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_target(false),
            )
            .init(),
    }
    handle
}

type Ready = Box<dyn FnOnce() + Send>;
type RoleFuture = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Where a reloaded config goes.
#[derive(Default)]
struct Reloaders {
    global: Option<tokio::sync::watch::Sender<popupd::config::GlobalConfig>>,
    homes:
        std::collections::HashMap<String, tokio::sync::watch::Sender<popupd::config::HomeConfig>>,
    agent: Option<tokio::sync::watch::Sender<popupd::config::AgentConfig>>,
}

/// SIGHUP: read the config again; refuse a bad one and keep running with
/// the old; hand a good one to the roles (they apply what they can live).
fn reload(path: &Path, log: &LogHandle, to: &Reloaders) {
    use sd_notify::NotifyState;
    let mut reloading = vec![NotifyState::Reloading];
    if let Ok(t) = NotifyState::monotonic_usec_now() {
        reloading.push(t);
    }
    let _ = sd_notify::notify(&reloading);
    match Config::load(path) {
        Err(e) => {
            tracing::error!("reload refused, the running config stays: {e}");
            let _ = sd_notify::notify(&[
                NotifyState::Ready,
                NotifyState::Status("reload refused: bad config (see the journal)"),
            ]);
            return;
        }
        Ok(new) => {
            if let Err(e) = log.reload(filter(&new.log.level)) {
                tracing::warn!("reload: log level: {e}");
            }
            match (new.global, &to.global) {
                (Some(g), Some(tx)) => drop(tx.send(g)),
                (None, None) => {}
                _ => tracing::warn!(
                    "reload: the global section was added or removed; restart to apply"
                ),
            }
            for h in new.homes {
                match to.homes.get(&h.name) {
                    Some(tx) => drop(tx.send(h)),
                    None => tracing::warn!("reload: home {} is new; restart to start it", h.name),
                }
            }
            match (new.agent, &to.agent) {
                (Some(a), Some(tx)) => {
                    tracing::info!(
                        "reload: plugin settings applied; other agent settings take effect after a restart"
                    );
                    drop(tx.send(a));
                }
                (None, None) => {}
                _ => tracing::warn!(
                    "reload: the agent section was added or removed; restart to apply"
                ),
            }
            tracing::info!("config reloaded from {}", path.display());
        }
    }
    let _ = sd_notify::notify(&[
        NotifyState::Ready,
        NotifyState::Status("running (config reloaded)"),
    ]);
}

async fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)
        .and_then(|c| in_state_directory(&c).map(|()| c))
        .map_err(|e| BadConfig(reason_last(e)))?;
    let log = init_logging(&cfg.log.level);
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    let shutdown = Shutdown::new();
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int, mut hup) = (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        );
        // true: stop; false: reload.
        tokio::spawn(async move {
            loop {
                let stop = tokio::select! {
                    _ = term.recv() => true,
                    _ = int.recv() => true,
                    _ = hup.recv() => false,
                };
                if sig_tx.send(stop).is_err() || stop {
                    return;
                }
            }
        });
    }

    let roles = cfg.roles().len();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut set = tokio::task::JoinSet::new();
    let mut reloaders = Reloaders::default();
    // Each role runs under its own child token and says when it is ready.
    let mut start = |name: String, role: Box<dyn FnOnce(Shutdown, Ready) -> RoleFuture + Send>| {
        let (s, r) = (shutdown.child_token(), ready_tx.clone());
        set.spawn(async move {
            role(
                s,
                Box::new(move || {
                    let _ = r.send(());
                }),
            )
            .await
            .with_context(|| name)
        });
    };
    if let Some(g) = cfg.global {
        let (tx, rx) = tokio::sync::watch::channel(g.clone());
        reloaders.global = Some(tx);
        start(
            "global".into(),
            Box::new(|s, ready| Box::pin(popupd::global::run(g, s, ready, rx))),
        );
    }
    for h in cfg.homes {
        let (tx, rx) = tokio::sync::watch::channel(h.clone());
        reloaders.homes.insert(h.name.clone(), tx);
        start(
            format!("home {}", h.name),
            Box::new(|s, ready| Box::pin(popupd::home::run(h, s, ready, rx))),
        );
    }
    if let Some(a) = cfg.agent {
        let (tx, rx) = tokio::sync::watch::channel(a.clone());
        reloaders.agent = Some(tx);
        start(
            "agent".into(),
            Box::new(|s, ready| Box::pin(popupd::agent::run(a, s, ready, rx))),
        );
    }
    drop(ready_tx);

    // Watchdog pings come from this loop, so a wedged runtime stops them.
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut dog = tokio::time::interval(watchdog.unwrap_or(std::time::Duration::from_secs(3600)));
    let mut ready = 0;
    let mut result = Ok(());
    loop {
        tokio::select! {
            Some(()) = ready_rx.recv() => {
                ready += 1;
                if ready == roles {
                    // The roles write their own STATUS= lines.
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                    tracing::info!("ready");
                }
            }
            Some(stop) = sig_rx.recv() => {
                if stop {
                    tracing::info!("stopping");
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                    shutdown.cancel();
                } else {
                    reload(path, &log, &reloaders);
                }
            }
            _ = dog.tick(), if watchdog.is_some() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            done = set.join_next() => match done {
                None => break,
                Some(r) => {
                    let r = r.map_err(anyhow::Error::from).and_then(|r| r);
                    if !shutdown.is_cancelled() {
                        // A role stopped on its own: stop the others too.
                        if let Err(e) = &r {
                            tracing::error!("{e:#}");
                        }
                        shutdown.cancel();
                    }
                    if result.is_ok() {
                        result = r;
                    }
                }
            },
        }
    }
    result
}
