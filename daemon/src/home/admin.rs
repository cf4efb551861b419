//! `popupd user ...` and `popupd device ...`: account administration, run on
//! the home's machine beside the live daemon (SQLite's WAL lets both write;
//! PostgreSQL serves both).
//!
//! A handle is claimed at the global server before the account is created,
//! so handles stay unique in the network.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};

use super::directory::{DirError, ask_many, ask_once};
use crate::config::{Config, HomeConfig, Storage};
use crate::storage::home::{HomeStore, UserInfo};
use crate::storage::{new_secret, secret_hash};
use popupd_protocol::{ErrorCode, valid_handle};
use popupd_store::StoreError;

/// Picks the home a command is about.
pub fn select_home<'a>(cfg: &'a Config, name: Option<&str>) -> anyhow::Result<&'a HomeConfig> {
    match (name, cfg.homes.as_slice()) {
        (_, []) => bail!("{} has no home section", cfg.source.display()),
        (None, [one]) => Ok(one),
        (None, _) => bail!(
            "{} runs several homes; say which with --home NAME",
            cfg.source.display()
        ),
        (Some(n), homes) => homes
            .iter()
            .find(|h| h.name == n)
            .with_context(|| format!("no home named {n} in {}", cfg.source.display())),
    }
}

/// Runs `f` on the home's records in one committed transaction (rolled
/// back if it fails), on a thread of its own: a PostgreSQL client must not
/// run on the Tokio runtime.
fn with_store<R: Send>(
    home: &HomeConfig,
    f: impl FnOnce(&mut dyn HomeStore) -> anyhow::Result<R> + Send,
) -> anyhow::Result<R> {
    let r = popupd_store::pg::off_runtime(|| {
        let mut s = super::open_records(home)?;
        tx(&mut *s, f)
    });
    if matches!(home.storage, Storage::Sqlite) {
        give_to_dir_owner(&home.data_dir);
    }
    r
}

/// Run as root beside a service that runs as its own user (the package's
/// `popupd`), an admin command must not leave database files the service
/// cannot write: hand them to whoever owns the data folder.
fn give_to_dir_owner(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    for name in ["home.sqlite", "home.sqlite-wal", "home.sqlite-shm"] {
        let p = dir.join(name);
        if let Ok(m) = std::fs::metadata(&p)
            && (m.uid() != meta.uid() || m.gid() != meta.gid())
        {
            let _ = std::os::unix::fs::chown(&p, Some(meta.uid()), Some(meta.gid()));
        }
    }
}

/// Runs `f` in one committed transaction.
fn tx<R>(
    s: &mut dyn HomeStore,
    f: impl FnOnce(&mut dyn HomeStore) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    s.begin()?;
    match f(s) {
        Ok(r) => {
            s.commit()?;
            Ok(r)
        }
        Err(e) => {
            s.rollback();
            Err(e)
        }
    }
}

/// What `user add` made.
pub struct NewDevice {
    pub handle: String,
    pub device: String,
    /// A ready agent config.
    pub agent_yaml: String,
}

/// Creates `handle` (claiming it at the global server) with one device.
pub async fn add_user(
    home: &HomeConfig,
    handle: &str,
    device: &str,
    ca_for_agent: &Path,
) -> anyhow::Result<NewDevice> {
    if !valid_handle(handle) {
        bail!("{handle:?} is not a handle: use 1-64 lowercase letters, digits, '.', '-' or '_'");
    }
    check_device_name(device)?;
    if with_store(home, |s| Ok(s.user_exists(handle)?))? {
        bail!(
            "{handle} already exists on {}; add a device with `popupd device add {handle}`",
            home.name
        );
    }
    match ask_once(home, true, handle).await {
        Ok(()) => {}
        Err(DirError::Refused(ErrorCode::HandleTaken, m)) => bail!("{m}"),
        Err(e) => bail!(
            "{e}\n  handles must be registered with the global server to stay unique; start it (or check {}'s `global:` section) and try again",
            home.name
        ),
    }
    let secret = new_secret();
    with_store(home, |s| {
        s.add_user(handle)?;
        s.add_device(handle, device, &secret_hash(&secret))?;
        Ok(())
    })?;
    Ok(NewDevice {
        handle: handle.to_owned(),
        device: device.to_owned(),
        agent_yaml: agent_yaml(home, handle, device, &secret, ca_for_agent),
    })
}

/// Creates `PREFIX0` .. `PREFIX{count-1}`, one device each, in one
/// transaction, after claiming every handle at the global server on one
/// link; returns (handle, device, secret) lines. For load tests and bulk
/// provisioning: 20,000 accounts take seconds.
pub async fn add_many(
    home: &HomeConfig,
    prefix: &str,
    count: usize,
    device: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    check_device_name(device)?;
    let handles: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    if let Some(bad) = handles.iter().find(|h| !valid_handle(h)) {
        bail!(
            "{bad:?} is not a handle: the prefix must be lowercase letters, digits, '.', '-' or '_'"
        );
    }
    let taken = with_store(home, |s| {
        for h in &handles {
            if s.user_exists(h)? {
                return Ok(Some(h.clone()));
            }
        }
        Ok(None)
    })?;
    if let Some(h) = taken {
        bail!("{h} already exists on {}", home.name);
    }
    ask_many(home, true, &handles)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let creds: Vec<(String, String)> = handles.into_iter().map(|h| (h, new_secret())).collect();
    with_store(home, |s| {
        for (h, secret) in &creds {
            s.add_user(h)?;
            s.add_device(h, device, &secret_hash(secret))?;
        }
        Ok(())
    })?;
    Ok(creds)
}

/// Links contact pairs from `OWNER PEER [PEER_HOME]` lines in one
/// transaction; returns how many. A line that names no user of this home,
/// or is malformed, stops the import with its line number.
pub fn import_contacts(home: &HomeConfig, text: &str) -> anyhow::Result<usize> {
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let ok =
            matches!(f.len(), 2 | 3) && valid_handle(f[0]) && valid_handle(f[1]) && f[0] != f[1];
        if !ok {
            bail!(
                "line {}: expected `OWNER PEER [PEER_HOME]` with two different handles, got {line:?}",
                i + 1
            );
        }
        let peer_home = f.get(2).filter(|h| **h != home.name).map(|h| h.to_string());
        pairs.push((i + 1, f[0].to_owned(), f[1].to_owned(), peer_home));
    }
    with_store(home, |s| {
        for (line, owner, peer, peer_home) in &pairs {
            super::rules::link_contacts(s, owner, peer, peer_home.as_deref())
                .map_err(|e| StoreError::NotFound(format!("line {line}: {e}")))?;
        }
        Ok(())
    })?;
    Ok(pairs.len())
}

/// Adds another device to an existing user.
pub fn add_device(
    home: &HomeConfig,
    handle: &str,
    device: &str,
    ca_for_agent: &Path,
) -> anyhow::Result<NewDevice> {
    check_device_name(device)?;
    let secret = new_secret();
    with_store(home, |s| {
        Ok(s.add_device(handle, device, &secret_hash(&secret))?)
    })?;
    Ok(NewDevice {
        handle: handle.to_owned(),
        device: device.to_owned(),
        agent_yaml: agent_yaml(home, handle, device, &secret, ca_for_agent),
    })
}

fn check_device_name(d: &str) -> anyhow::Result<()> {
    if d.is_empty()
        || d.len() > 64
        || !d
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        bail!("{d:?} is not a device name: use 1-64 letters, digits, '.', '-' or '_'");
    }
    Ok(())
}

/// Lists users and their devices.
pub fn list_users(home: &HomeConfig) -> anyhow::Result<Vec<UserInfo>> {
    with_store(home, |s| Ok(s.list_users()?))
}

/// Removes a user, their devices and mailbox, and releases the handle.
pub async fn remove_user(home: &HomeConfig, handle: &str) -> anyhow::Result<()> {
    if !with_store(home, |s| Ok(s.remove_user(handle)?))? {
        bail!("no user {handle} on {}", home.name);
    }
    tell_nodes(home).await;
    if let Err(e) = ask_once(home, false, handle).await {
        eprintln!(
            "warning: {handle} is removed here, but the global server was not told ({e}); the home tells it again on its next start"
        );
    }
    Ok(())
}

/// Revokes one device; a running home closes its connection within 10 s
/// (`home::REVOKE_CHECK`; on a home of several nodes, at once) and refuses
/// it from then on.
pub async fn revoke_device(home: &HomeConfig, handle: &str, device: &str) -> anyhow::Result<()> {
    if !with_store(home, |s| Ok(s.revoke_device(handle, device)?))? {
        bail!("{handle} has no device {device} on {}", home.name);
    }
    tell_nodes(home).await;
    Ok(())
}

/// On a home of several nodes, asks them to drop what is no longer allowed
/// now; if NATS does not answer, says so (their own checks still come
/// within 10 s).
async fn tell_nodes(home: &HomeConfig) {
    if let Some(c) = &home.cluster
        && let Err(e) = crate::home::cluster::ask_nodes_to_check_devices(&home.name, c).await
    {
        eprintln!("warning: the nodes were not told at once ({e}); each checks within 10 s");
    }
}

fn agent_yaml(home: &HomeConfig, handle: &str, device: &str, secret: &str, ca: &Path) -> String {
    format!(
        "# popupd agent config for {handle} (device {device}) on {home_name}.\n\
         # Keep it private: it holds the device's secret. On the desktop, put it\n\
         # at ~/.config/popupd/agent.yaml, copy the network CA certificate there\n\
         # too, and point `ca:` at the copy (a relative path is read from this\n\
         # file's folder).\n\
         agent:\n  handle: {handle}\n  device: {device}\n  secret: {secret}\n  home: {home_name}\n  address: \"{addr}\"\n  ca: {ca}\n",
        home_name = home.name,
        addr = home.public_address,
        ca = ca.display(),
    )
}

/// Writes an agent config readable only by its owner.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
