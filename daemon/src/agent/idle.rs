//! How long the desktop session has been idle (no keyboard or pointer
//! input), for automatic "away" presence.
//!
//! There is no one interface for this on Linux, so [`IdleProbe::open`] tries
//! these sources in order and keeps the first that answers:
//!
//! 1. [`Source::X11`] asks the MIT-SCREEN-SAVER extension of the X server
//!    in `DISPLAY`. Works in any X11 session, whatever the desktop, and under
//!    Xvfb. Skipped when `WAYLAND_DISPLAY` is set too: Xwayland only sees
//!    input that goes to X11 windows, so its idle time would be wrong.
//! 2. [`Source::ScreenSaver`] calls
//!    `org.freedesktop.ScreenSaver.GetSessionIdleTime` on the session bus.
//!    KDE Plasma (X11 and Wayland); some other desktops own the name but
//!    refuse the method, which counts as unavailable.
//! 3. [`Source::Mutter`] calls `org.gnome.Mutter.IdleMonitor` on the
//!    session bus. GNOME, notably on Wayland where nothing else is exact.
//! 4. [`Source::Logind`] reads the `IdleHint` of the caller's logind session
//!    on the system bus. Anything whose desktop sets the hint (GNOME does),
//!    but coarse: the hint only flips after the desktop's own idle delay,
//!    and before that the idle time reads as zero.
//!
//! Every call is bounded by a one-second timeout, so a hung service costs
//! the caller a second, never a stuck task. Session-bus calls are sent with
//! `NO_AUTO_START`: asking for the idle time must not launch a screen saver.

use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use x11rb::connection::Connection as _;
use x11rb::protocol::screensaver::ConnectionExt as _;
use x11rb::protocol::xproto::Window;
use x11rb::rust_connection::RustConnection;
use zbus::proxy::{CacheProperties, MethodFlags};

/// How long any one question to a source may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

pub use crate::config::IdleSource as Source;

/// The order [`IdleProbe::open`] tries the sources in: exact ones first.
const ORDER: [Source; 4] = [
    Source::X11,
    Source::ScreenSaver,
    Source::Mutter,
    Source::Logind,
];

/// A probe opened once and asked repeatedly.
pub struct IdleProbe {
    source: Source,
    backend: Backend,
}

/// How an open probe gets its answer.
enum Backend {
    /// A thread of its own holding the X connection (see [`X11Worker`]).
    X11(X11Worker),
    /// One method call returning milliseconds: ScreenSaver (`u`) or Mutter
    /// (`t`), on the session bus.
    Call(zbus::Proxy<'static>),
    /// Properties of a logind session object, on the system bus.
    Logind(zbus::Proxy<'static>),
}

impl IdleProbe {
    /// Tries the sources in order (X11 when DISPLAY is set;
    /// org.freedesktop.ScreenSaver.GetSessionIdleTime on the session bus
    /// `bus`; org.gnome.Mutter.IdleMonitor GetIdletime on the session bus;
    /// logind IdleHint/IdleSinceHint of the caller's session on the system
    /// bus) and keeps the first that answers. `only` restricts to one source.
    /// Returns None when none works (log nothing; the caller logs).
    pub async fn open(bus: &zbus::Connection, only: Option<Source>) -> Option<IdleProbe> {
        for source in ORDER {
            if only.is_some_and(|o| o != source) {
                continue;
            }
            // The X11 guard for Wayland is a guess about the desktop; when
            // the user names the source, trust them.
            let Some(backend) = Backend::open(source, bus, only.is_some()).await else {
                continue;
            };
            let mut probe = IdleProbe { source, backend };
            // Opening only proves the name or socket is there; a source is
            // kept once it has really answered.
            if probe.idle().await.is_ok() {
                return Some(probe);
            }
        }
        None
    }

    pub fn source(&self) -> Source {
        self.source
    }

    /// Time since the last user input, or an error string if the source
    /// stopped answering.
    pub async fn idle(&mut self) -> Result<Duration, String> {
        let source = self.source;
        let asked = async {
            match &self.backend {
                Backend::X11(worker) => worker.idle().await,
                Backend::Call(proxy) => call_ms(source, proxy).await,
                Backend::Logind(session) => logind_idle(session).await,
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, asked)
            .await
            .map_err(|_| format!("{}: no answer within {CALL_TIMEOUT:?}", source.name()))?
            .map_err(|e| format!("{}: {e}", source.name()))
    }
}

impl Backend {
    /// Sets up `source` without asking it anything yet; None when it is
    /// plainly not there.
    async fn open(source: Source, bus: &zbus::Connection, forced: bool) -> Option<Backend> {
        match source {
            Source::X11 => {
                let display = std::env::var("DISPLAY").ok().filter(|d| !d.is_empty())?;
                let wayland = std::env::var_os("WAYLAND_DISPLAY").is_some_and(|w| !w.is_empty());
                if wayland && !forced {
                    return None;
                }
                Some(Backend::X11(X11Worker::spawn(display)))
            }
            Source::ScreenSaver => proxy(
                bus,
                "org.freedesktop.ScreenSaver",
                "/org/freedesktop/ScreenSaver",
                "org.freedesktop.ScreenSaver",
            )
            .await
            .map(Backend::Call),
            Source::Mutter => proxy(
                bus,
                "org.gnome.Mutter.IdleMonitor",
                "/org/gnome/Mutter/IdleMonitor/Core",
                "org.gnome.Mutter.IdleMonitor",
            )
            .await
            .map(Backend::Call),
            Source::Logind => {
                let session = tokio::time::timeout(CALL_TIMEOUT, logind_session())
                    .await
                    .ok()??;
                Some(Backend::Logind(session))
            }
        }
    }
}

/// A proxy without property caching: each question is a fresh call.
async fn proxy(
    conn: &zbus::Connection,
    destination: &'static str,
    path: impl TryInto<zbus::ObjectPath<'static>, Error: Into<zbus::Error>>,
    interface: &'static str,
) -> Option<zbus::Proxy<'static>> {
    zbus::proxy::Builder::<zbus::Proxy<'static>>::new(conn)
        .destination(destination)
        .path(path)
        .interface(interface)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .ok()
}

/// ScreenSaver's `GetSessionIdleTime` (`u`) or Mutter's `GetIdletime` (`t`),
/// both in milliseconds.
async fn call_ms(source: Source, proxy: &zbus::Proxy<'static>) -> Result<Duration, String> {
    let flags = MethodFlags::NO_AUTO_START;
    let ms = match source {
        Source::Mutter => {
            proxy
                .call_with_flags::<_, _, u64>("GetIdletime", flags, &())
                .await
        }
        _ => proxy
            .call_with_flags::<_, _, u32>("GetSessionIdleTime", flags, &())
            .await
            .map(|ms| ms.map(u64::from)),
    };
    match ms {
        Ok(Some(ms)) => Ok(Duration::from_millis(ms)),
        // Only a call sent with NO_REPLY_EXPECTED comes back without a reply.
        Ok(None) => Err("no reply".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The logind session this process belongs to, on a system-bus connection
/// of its own.
async fn logind_session() -> Option<zbus::Proxy<'static>> {
    let system = zbus::Connection::system().await.ok()?;
    // A process started by systemd --user belongs to no session; logind's
    // "auto" then stands for the user's graphical session.
    let path = match system
        .call_method(
            Some("org.freedesktop.login1"),
            "/org/freedesktop/login1",
            Some("org.freedesktop.login1.Manager"),
            "GetSessionByPID",
            &std::process::id(),
        )
        .await
        .and_then(|reply| reply.body().deserialize::<zbus::OwnedObjectPath>())
    {
        Ok(path) => path,
        Err(_) => zbus::OwnedObjectPath::try_from("/org/freedesktop/login1/session/auto").ok()?,
    };
    proxy(
        &system,
        "org.freedesktop.login1",
        path,
        "org.freedesktop.login1.Session",
    )
    .await
}

/// Idle time from the session's `IdleHint`: zero while it is false, else
/// the time since `IdleSinceHint`.
///
/// `IdleSinceHintMonotonic` would be immune to clock changes, but
/// CLOCK_MONOTONIC cannot be read without `unsafe` or another dependency;
/// the wall-clock twin is good enough for a presence that changes after
/// minutes. A hint in the future (clock stepped back) reads as zero.
async fn logind_idle(session: &zbus::Proxy<'static>) -> Result<Duration, String> {
    let idle: bool = session
        .get_property("IdleHint")
        .await
        .map_err(|e| e.to_string())?;
    if !idle {
        return Ok(Duration::ZERO);
    }
    let since_us: u64 = session
        .get_property("IdleSinceHint")
        .await
        .map_err(|e| e.to_string())?;
    if since_us == 0 {
        // Idle, but since when is unknown: claim nothing.
        return Ok(Duration::ZERO);
    }
    let since = UNIX_EPOCH + Duration::from_micros(since_us);
    Ok(SystemTime::now().duration_since(since).unwrap_or_default())
}

/// A request to the X11 thread, answered on the enclosed channel.
type X11Request = oneshot::Sender<Result<Duration, String>>;

/// The X11 connection, owned by a detached thread that answers one query at
/// a time.
///
/// x11rb's calls block. A thread of our own, rather than `spawn_blocking`,
/// means a connect to a `DISPLAY` that never answers (a dead TCP host) or a
/// hung X server can only ever hold up that thread, and never the tokio
/// runtime's shutdown, which waits for its blocking tasks. The request
/// queue holds one entry, so a hung server costs one parked thread, not one
/// per poll.
struct X11Worker {
    requests: mpsc::SyncSender<X11Request>,
}

impl X11Worker {
    fn spawn(display: String) -> X11Worker {
        let (requests, inbox) = mpsc::sync_channel::<X11Request>(1);
        // The thread connects first and serves the queued requests after; a
        // failure to start it shows as the first request going unanswered.
        let _ = std::thread::Builder::new()
            .name("idle-x11".into())
            .spawn(move || serve_x11(&display, &inbox));
        X11Worker { requests }
    }

    async fn idle(&self) -> Result<Duration, String> {
        let (reply, answer) = oneshot::channel();
        self.requests.try_send(reply).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => "X server is not answering".to_string(),
            mpsc::TrySendError::Disconnected(_) => "X11 connection is gone".to_string(),
        })?;
        answer
            .await
            .map_err(|_| "X11 connection is gone".to_string())?
    }
}

/// The X11 thread: connects, then answers requests until the probe is
/// dropped or the connection breaks.
fn serve_x11(display: &str, inbox: &mpsc::Receiver<X11Request>) {
    let x = X11Session::connect(display);
    for reply in inbox {
        let answer = match &x {
            Ok(x) => x.idle(),
            Err(e) => Err(e.clone()),
        };
        let broken = answer.is_err();
        // The asker may have timed out and gone; nothing to do about it.
        let _ = reply.send(answer);
        if broken {
            // A failed connect or a dead connection never recovers; ending
            // the thread makes later requests fail at once.
            return;
        }
    }
}

struct X11Session {
    conn: RustConnection,
    root: Window,
}

impl X11Session {
    fn connect(display: &str) -> Result<X11Session, String> {
        let (conn, screen) =
            RustConnection::connect(Some(display)).map_err(|e| format!("{display}: {e}"))?;
        let root = conn
            .setup()
            .roots
            .get(screen)
            .map(|s| s.root)
            .ok_or_else(|| format!("{display}: no screen {screen}"))?;
        Ok(X11Session { conn, root })
    }

    /// `ScreenSaverQueryInfo` on the root window; fails when the server
    /// lacks MIT-SCREEN-SAVER.
    fn idle(&self) -> Result<Duration, String> {
        let info = self
            .conn
            .screensaver_query_info(self.root)
            .map_err(|e| e.to_string())?
            .reply()
            .map_err(|e| e.to_string())?;
        Ok(Duration::from_millis(info.ms_since_user_input.into()))
    }
}
