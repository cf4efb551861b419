//! The plugin host: loads shared libraries that speak the ABI of the
//! `popupd-plugin-api` crate, and keeps them from hurting the agent.
//!
//! - Each plugin runs on a thread of its own, fed by a queue: a slow plugin
//!   never holds up the agent's executor or another plugin.
//! - The declaration (magic, ABI version, size) is checked before anything
//!   else in the library is called; a mismatch, a missing entry symbol or a
//!   file that is not a library is refused with a log line, and the agent
//!   goes on without it.
//! - A plugin that panics (caught at its boundary), fails ten times in a
//!   row, or takes longer than `plugin_deadline` in one call is disabled
//!   with a log line. The message stays in history and on D-Bus: plugins
//!   only see events after they are committed.
//! - A plugin that kills the process outright (a segfault) cannot be caught
//!   in-process. Before each call the host writes a marker file naming the
//!   plugin and removes it after; a marker found at start means that plugin
//!   crashed the agent, and it is skipped this time (systemd restarts the
//!   agent; nothing is lost since messages are acked only once stored).
//!
//! **Architecture Invariant:** libraries stay loaded for the life of the
//! process (a plugin thread may still be running code from them).
#![allow(unsafe_code)] // Calling into plugins is FFI; each block says why it holds.

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

pub use popupd_plugin_api::Event;
use popupd_plugin_api::{
    ABI_VERSION, ENTRY_SYMBOL, ERR_FAILED, ERR_PANIC, ErrBuf, HostApi, MAGIC, OK, PluginDecl,
};

use super::Agent;

/// Consecutive failures that disable a plugin.
const MAX_FAILURES: u32 = 10;

enum Call {
    /// An event, and who to tell once this plugin has handled it.
    Event(Arc<CString>, Option<Arc<Tracker>>),
    Reload(CString),
    Stop,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Starting,
    Active,
    /// Refused its config, or could not start.
    Failed(String),
    /// Panicked, hung or kept failing.
    Disabled(String),
}

struct Loaded {
    name: String,
    version: String,
    path: PathBuf,
    state: Mutex<State>,
    tx: Mutex<Option<mpsc::Sender<Call>>>,
    /// When the current call started, and which callback it is.
    busy: Mutex<Option<(Instant, &'static str)>>,
    /// Wakes the deadline watch when a call starts (shared by all plugins).
    calls: Arc<tokio::sync::Notify>,
}

impl Loaded {
    fn set(&self, s: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
    fn state(&self) -> State {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn disable(&self, why: String) {
        tracing::error!(plugin = %self.name, "plugin {} disabled: {why}", self.name);
        self.set(State::Disabled(why));
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Calls a function once every plugin an event went to has handled it
/// (returned from `on_event`, whatever it answered). A plugin disabled
/// before it got to the event never does: the event counts as not handled,
/// and a durable signal is handed to the plugins again at the next start.
pub struct Tracker {
    left: std::sync::atomic::AtomicUsize,
    then: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Tracker {
    fn handled(&self) {
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1
            && let Some(f) = self.then.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            f();
        }
    }
}

/// The agent's plugins.
#[derive(Default)]
pub struct Plugins {
    loaded: Mutex<Vec<Arc<Loaded>>>,
}

impl Plugins {
    /// Loads every plugin of the configured folders and starts each on its
    /// own thread. Never fails: a bad plugin is logged and left out.
    pub fn load(&self, agent: &Arc<Agent>) {
        let cfg = &agent.cfg;
        let crashed = crashed_last_time(&cfg.data_dir);
        let mut seen = std::collections::HashSet::new();
        let calls = Arc::new(tokio::sync::Notify::new());
        for dir in &cfg.plugin_dirs {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "so"))
                .collect();
            files.sort();
            for path in files {
                let Some((decl, name, version)) = open(&path) else {
                    continue;
                };
                if !seen.insert(name.clone()) {
                    tracing::warn!(plugin = %name, path = %path.display(), "plugin {name} skipped ({}): a plugin of that name is already loaded", path.display());
                    continue;
                }
                if crashed.contains(&name) {
                    tracing::error!(plugin = %name, path = %path.display(),
                        "plugin {name} skipped: it crashed the agent on its last run (restart the agent to try it again)");
                    continue;
                }
                let config = cfg
                    .plugins
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| serde_json::json!({}));
                if config == serde_json::Value::Bool(false) {
                    tracing::info!(plugin = %name, "plugin {name} disabled in the config");
                    continue;
                }
                let loaded = Arc::new(Loaded {
                    name,
                    version,
                    path,
                    state: Mutex::new(State::Starting),
                    tx: Mutex::new(None),
                    busy: Mutex::new(None),
                    calls: calls.clone(),
                });
                start(agent, decl, loaded.clone(), config);
                self.loaded
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(loaded);
            }
        }
        // The deadline watch. It sleeps until a call starts and checks every
        // 250 ms only while one runs: an idle agent does not wake for it.
        if self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return;
        }
        let (me, deadline) = (Arc::downgrade(agent), cfg.plugin_deadline);
        let shutdown = agent.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = calls.notified() => {}
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let Some(agent) = me.upgrade() else { return };
                    let mut any = false;
                    for p in agent
                        .plugins
                        .loaded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                    {
                        let busy = *p.busy.lock().unwrap_or_else(|e| e.into_inner());
                        // A disabled plugin's hung call is no longer watched.
                        if let Some((since, what)) = busy
                            && !matches!(p.state(), State::Disabled(_))
                        {
                            any = true;
                            if since.elapsed() > deadline {
                                p.disable(format!(
                                    "{what} did not return within {}",
                                    humantime::format_duration(deadline)
                                ));
                            }
                        }
                    }
                    if !any {
                        break;
                    }
                }
            }
        });
    }

    /// Hands an event to every running plugin (never blocks).
    pub fn dispatch(&self, event: &Event) {
        self.hand(event, None);
    }

    /// Hands an event to every running plugin and calls `then` once each
    /// has handled it (see [`Tracker`]). Returns false, and never calls
    /// `then`, if no plugin runs.
    pub fn dispatch_tracked(&self, event: &Event, then: impl FnOnce() + Send + 'static) -> bool {
        let t = Arc::new(Tracker {
            // One for this call, so `then` cannot run before every plugin
            // has the event.
            left: std::sync::atomic::AtomicUsize::new(1),
            then: Mutex::new(Some(Box::new(then))),
        });
        let handed = self.hand(event, Some(&t));
        if handed == 0 {
            t.then.lock().unwrap_or_else(|e| e.into_inner()).take();
            return false;
        }
        t.handled();
        true
    }

    /// Sends an event to every running plugin; returns to how many.
    fn hand(&self, event: &Event, tracker: Option<&Arc<Tracker>>) -> usize {
        let list = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if list.is_empty() {
            return 0;
        }
        let Ok(json) = serde_json::to_string(event).map(|j| CString::new(j).unwrap_or_default())
        else {
            return 0;
        };
        let json = Arc::new(json);
        let mut n = 0;
        for p in list.iter() {
            if let Some(tx) = p.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                if let Some(t) = tracker {
                    t.left.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
                if tx.send(Call::Event(json.clone(), tracker.cloned())).is_ok() {
                    n += 1;
                } else if let Some(t) = tracker {
                    t.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                }
            }
        }
        n
    }

    /// Gives every running plugin its new config, then `config_reloaded`.
    pub fn reload(&self, configs: &std::collections::BTreeMap<String, serde_json::Value>) {
        for p in self.loaded.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let cfg = configs
                .get(&p.name)
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}));
            if let (Some(tx), Ok(c)) = (
                p.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref(),
                CString::new(cfg.to_string()),
            ) {
                let _ = tx.send(Call::Reload(c));
            }
        }
        self.dispatch(&Event::ConfigReloaded);
    }

    /// Asks every plugin to shut down.
    pub fn stop(&self) {
        for p in self.loaded.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Some(tx) = p.tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(Call::Stop);
            }
        }
    }

    /// (name, version, state, file) of each plugin, for `popupctl plugins`.
    pub fn list(&self) -> Vec<(String, String, String, String)> {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|p| {
                let state = match p.state() {
                    State::Starting => "starting".to_string(),
                    State::Active => "active".to_string(),
                    State::Failed(m) => format!("failed: {m}"),
                    State::Disabled(m) => format!("disabled: {m}"),
                };
                (
                    p.name.clone(),
                    p.version.clone(),
                    state,
                    p.path.display().to_string(),
                )
            })
            .collect()
    }
}

/// Plugins whose marker says they were in a call when the agent died.
fn crashed_last_time(data_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(data_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(plugin) = name.strip_prefix("plugin-in-call.") {
                out.push(plugin.to_owned());
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    out
}

/// The folder the package installs plugins to. Only root can put a file
/// there.
const PACKAGED: &str = "/usr/lib/popupd/plugins";

/// Whether files of root show as the kernel's overflow uid here ("nobody"):
/// the agent runs in a user namespace that does not map root, as the user
/// unit's sandbox makes (`PrivateUsers=`, which a user manager needs for
/// the rest). Then the files of root and of every other user look alike.
fn root_hidden() -> Option<u32> {
    let map = std::fs::read_to_string("/proc/self/uid_map").ok()?;
    let maps_root = map.lines().any(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        matches!(f[..], [_, outside, count] if outside == 0 && count > 0)
    });
    if maps_root {
        return None;
    }
    std::fs::read_to_string("/proc/sys/kernel/overflowuid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether a plugin file and its folder are owned by root or this user and
/// writable by nobody else; otherwise why not, with the fix. Where root is
/// hidden (see [`root_hidden`]), the package's own folder, which only root
/// can fill, and the files in it count as root's.
fn trusted(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::getuid().as_raw();
    let dir = path.parent().unwrap_or(Path::new("/"));
    let hidden = root_hidden();
    for (what, p) in [("file", path), ("folder", dir)] {
        let m = std::fs::metadata(p).map_err(|e| format!("cannot read its {what}: {e}"))?;
        let packaged = dir == Path::new(PACKAGED);
        if m.uid() != 0 && m.uid() != me && !(packaged && Some(m.uid()) == hidden) {
            return Err(format!(
                "its {what} {} belongs to another user (uid {}); plugins must belong to root or to you",
                p.display(),
                m.uid()
            ));
        }
        if m.mode() & 0o022 != 0 {
            return Err(format!(
                "its {what} {} may be changed by others (mode {:04o}); run `chmod go-w {}`",
                p.display(),
                m.mode() & 0o777,
                p.display()
            ));
        }
    }
    Ok(())
}

/// Opens a library and checks its declaration. Logs why not, if not.
fn open(path: &Path) -> Option<(&'static PluginDecl, String, String)> {
    let shown = path.display();
    // Before any of its code runs (loading runs its initialisers): a
    // plugin runs as this user, so only root or this user may have put it
    // there or be able to change it.
    if let Err(why) = trusted(path) {
        tracing::error!(path = %shown, "plugin refused: {shown}: {why}");
        return None;
    }
    // SAFETY: loading runs the library's initialisers. Plugins are installed
    // by the administrator or the user themselves, like any program.
    let lib = match unsafe { libloading::Library::new(path) } {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %shown, "not a loadable library, skipped: {e}");
            return None;
        }
    };
    // SAFETY: the symbol, if present, has the signature the ABI fixes.
    let entry = match unsafe {
        lib.get::<unsafe extern "C" fn() -> *const PluginDecl>(ENTRY_SYMBOL)
    } {
        Ok(f) => *f,
        Err(_) => {
            tracing::warn!(path = %shown, "not a popupd plugin (no popupd_plugin_entry), skipped");
            return None;
        }
    };
    // SAFETY: the entry takes nothing and returns a pointer to static data.
    let decl = unsafe { entry() };
    if decl.is_null() {
        tracing::warn!(path = %shown, "plugin declaration is null, skipped");
        return None;
    }
    // Read the three leading u32s first: they are the same in every ABI version.
    // SAFETY: every version of PluginDecl starts with magic, abi_version, size.
    let (magic, abi, size) = unsafe {
        let p = decl.cast::<u32>();
        (*p, *p.add(1), *p.add(2))
    };
    if magic != MAGIC {
        tracing::warn!(path = %shown, "not a popupd plugin (bad magic), skipped");
        return None;
    }
    if abi != ABI_VERSION || (size as usize) < std::mem::size_of::<PluginDecl>() {
        tracing::warn!(path = %shown, "{shown}: plugin built for plugin ABI {abi}; this agent speaks ABI {ABI_VERSION}: rebuild it against popupd-plugin-api, skipped");
        return None;
    }
    // SAFETY: magic, version and size match this build's PluginDecl.
    let d: &'static PluginDecl = unsafe { &*decl };
    // SAFETY: name and version are static NUL-terminated strings.
    let (name, version) = unsafe {
        (
            CStr::from_ptr(d.name).to_string_lossy().into_owned(),
            CStr::from_ptr(d.version).to_string_lossy().into_owned(),
        )
    };
    // Kept loaded for the life of the process (see the module docs).
    std::mem::forget(lib);
    Some((d, name, version))
}

/// What a plugin's host functions reach.
struct HostCtx {
    agent: Weak<Agent>,
    rt: tokio::runtime::Handle,
    name: String,
}

fn start(agent: &Arc<Agent>, decl: &'static PluginDecl, p: Arc<Loaded>, config: serde_json::Value) {
    let (tx, rx) = mpsc::channel();
    *p.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    // The context and table live as long as the process, like the library.
    let ctx: &'static HostCtx = Box::leak(Box::new(HostCtx {
        agent: Arc::downgrade(agent),
        rt: tokio::runtime::Handle::current(),
        name: p.name.clone(),
    }));
    let api: &'static HostApi = Box::leak(Box::new(HostApi {
        size: std::mem::size_of::<HostApi>() as u32,
        ctx: (ctx as *const HostCtx).cast_mut().cast(),
        send: host_send,
        mark_read: host_mark_read,
        set_presence: host_set_presence,
        log: host_log,
        bus_address: bus_address(agent),
    }));
    let marker = agent
        .cfg
        .data_dir
        .join(format!("plugin-in-call.{}", p.name));
    let spawned = std::thread::Builder::new()
        .name(format!("plugin-{}", p.name))
        .spawn(move || run_plugin(decl, api, &p, config, rx, &marker));
    if let Err(e) = spawned {
        tracing::error!("cannot start a plugin thread: {e}");
    }
}

/// The agent's bus address, as a string that lives for the process.
fn bus_address(agent: &Agent) -> *const c_char {
    let a = match &agent.cfg.bus {
        crate::config::Bus::Session => String::new(),
        crate::config::Bus::Address(a) => a.clone(),
    };
    Box::leak(CString::new(a).unwrap_or_default().into_boxed_c_str()).as_ptr()
}

/// Calls `f` with the busy mark and the crash marker around it.
fn call(
    p: &Loaded,
    marker: &Path,
    what: &'static str,
    f: impl FnOnce(&mut ErrBuf) -> i32,
) -> (i32, String) {
    *p.busy.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), what));
    p.calls.notify_one();
    let _ = std::fs::write(marker, what);
    let mut err = ErrBuf::default();
    let rc = f(&mut err);
    let _ = std::fs::remove_file(marker);
    *p.busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
    (rc, err.message())
}

fn run_plugin(
    d: &'static PluginDecl,
    api: &'static HostApi,
    p: &Loaded,
    config: serde_json::Value,
    rx: mpsc::Receiver<Call>,
    marker: &Path,
) {
    let Ok(cfg) = CString::new(config.to_string()) else {
        return p.set(State::Failed("config holds a NUL byte".into()));
    };
    let mut state: *mut c_void = std::ptr::null_mut();
    // SAFETY: the ABI was checked in `open`; all pointers are valid.
    let (rc, msg) = call(p, marker, "init", |err| unsafe {
        (d.init)(api, cfg.as_ptr(), &mut state, err)
    });
    if rc != OK {
        tracing::warn!(plugin = %p.name, "plugin {} did not start: {msg} (check its section `plugins.{}` of the agent config)", p.name, p.name);
        p.set(State::Failed(msg));
        p.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        return;
    }
    if matches!(p.state(), State::Disabled(_)) {
        return;
    }
    p.set(State::Active);
    tracing::info!(plugin = %p.name, version = %p.version, path = %p.path.display(), "plugin loaded: {} {} from {}", p.name, p.version, p.path.display());
    let mut failures = 0;
    while let Ok(c) = rx.recv() {
        let (rc, msg) = match &c {
            // SAFETY: `state` came from this plugin's init; strings are valid.
            Call::Event(json, _) => call(p, marker, "on_event", |err| unsafe {
                (d.on_event)(state, json.as_ptr(), err)
            }),
            // SAFETY: as above.
            Call::Reload(json) => call(p, marker, "reload", |err| unsafe {
                (d.reload)(state, json.as_ptr(), err)
            }),
            Call::Stop => {
                // SAFETY: last call on this state.
                unsafe { (d.shutdown)(state) };
                return;
            }
        };
        // Handled, even if badly: an event a plugin fails on, panics on or
        // hangs in is not handed to it again.
        if let Call::Event(_, Some(t)) = &c {
            t.handled();
        }
        if matches!(p.state(), State::Disabled(_)) {
            // Disabled while in the call (deadline): leave its state alone.
            return;
        }
        match rc {
            OK => failures = 0,
            ERR_PANIC => return p.disable(msg),
            _ => {
                failures += 1;
                tracing::warn!(plugin = %p.name, "plugin {} call failed: {msg}", p.name);
                if failures >= MAX_FAILURES {
                    return p.disable(format!("{failures} failures in a row; last: {msg}"));
                }
            }
        }
    }
}

fn text(p: *const c_char) -> Option<String> {
    // SAFETY: plugins pass NUL-terminated strings (or null).
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn set_err(err: *mut ErrBuf, msg: &str) {
    if !err.is_null() {
        // SAFETY: the plugin passes a valid buffer.
        unsafe { (*err).set(msg) }
    }
}

/// Runs an agent action for a plugin, on the agent's runtime, and waits.
fn on_agent<T: Send + 'static>(
    ctx: *mut c_void,
    f: impl FnOnce(
        Arc<Agent>,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send>>
    + Send
    + 'static,
) -> Result<T, String> {
    // SAFETY: ctx is the leaked HostCtx of this plugin.
    let c = unsafe { &*ctx.cast::<HostCtx>() };
    let agent = c.agent.upgrade().ok_or("the agent is stopping")?;
    let (tx, rx) = mpsc::channel();
    c.rt.spawn(async move {
        let _ = tx.send(f(agent).await);
    });
    rx.recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the agent did not answer in time".to_string())?
}

fn guarded(err: *mut ErrBuf, f: impl FnOnce() -> Result<(), String>) -> i32 {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => OK,
        Ok(Err(m)) => {
            set_err(err, &m);
            ERR_FAILED
        }
        Err(_) => {
            set_err(err, "the host failed");
            ERR_FAILED
        }
    }
}

unsafe extern "C" fn host_send(
    ctx: *mut c_void,
    to: *const c_char,
    body: *const c_char,
    reply_to: *const c_char,
    id_out: *mut c_char,
    err: *mut ErrBuf,
) -> i32 {
    guarded(err, || {
        let (to, body) = (
            text(to).ok_or("no recipient")?,
            text(body).ok_or("no text")?,
        );
        let reply_to = text(reply_to);
        let id = on_agent(ctx, move |a| {
            Box::pin(async move { a.send(&to, body, reply_to).await.map_err(|e| e.to_string()) })
        })?;
        if !id_out.is_null() {
            let bytes = id.as_bytes();
            // SAFETY: the ABI promises room for 36 bytes and a NUL.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    id_out.cast::<u8>(),
                    bytes.len().min(36),
                );
                *id_out.add(bytes.len().min(36)) = 0;
            }
        }
        Ok(())
    })
}

unsafe extern "C" fn host_mark_read(ctx: *mut c_void, id: *const c_char, err: *mut ErrBuf) -> i32 {
    guarded(err, || {
        let id = text(id).ok_or("no id")?;
        on_agent(ctx, move |a| {
            Box::pin(async move { a.mark_read(&id).await.map_err(|e| e.to_string()) })
        })
    })
}

unsafe extern "C" fn host_set_presence(
    ctx: *mut c_void,
    state: *const c_char,
    body: *const c_char,
    err: *mut ErrBuf,
) -> i32 {
    guarded(err, || {
        let state = text(state).ok_or("no state")?;
        let body = text(body).unwrap_or_default();
        on_agent(ctx, move |a| {
            Box::pin(async move {
                a.set_presence(&state, &body)
                    .await
                    .map_err(|e| e.to_string())
            })
        })
    })
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: u32, msg: *const c_char) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: ctx is the leaked HostCtx of this plugin.
        let c = unsafe { &*ctx.cast::<HostCtx>() };
        let m = text(msg).unwrap_or_default();
        match level {
            1 => tracing::error!(plugin = %c.name, "plugin {}: {m}", c.name),
            2 => tracing::warn!(plugin = %c.name, "plugin {}: {m}", c.name),
            3 => tracing::info!(plugin = %c.name, "plugin {}: {m}", c.name),
            _ => tracing::debug!(plugin = %c.name, "plugin {}: {m}", c.name),
        }
    });
}
