//! The plugin ABI of the popupd agent.
//!
//! A plugin is a shared library (`cdylib`) that exports one C function,
//! [`ENTRY_SYMBOL`] (`popupd_plugin_entry`), returning a pointer to a static
//! [`PluginDecl`]: a magic number, the ABI version, the struct's size, the
//! plugin's name and version, and a table of callbacks — the way PostgreSQL
//! extensions declare `Pg_magic_func`. The agent checks magic, version and
//! size before it calls anything else, and refuses a mismatch.
//!
//! Everything that crosses the boundary is `#[repr(C)]` or a NUL-terminated
//! UTF-8 string; events and config travel as JSON text ([`Event`]), so new
//! event fields never change the ABI. Callbacks return [`OK`] or a negative
//! error code; a Rust plugin written with [`declare_plugin!`] never unwinds
//! across the boundary (every callback runs under `catch_unwind`; since Rust
//! 1.81 an unwind out of `extern "C"` aborts the process).
//!
//! The agent calls a plugin from one thread of its own, never from its async
//! executor, and gives it a [`HostApi`] to act back (send, reply, mark read,
//! log), callable from any thread.
//!
//! ```text
//! struct Hello;
//! impl popupd_plugin_api::Plugin for Hello {
//!     fn init(host: Host, config: serde_json::Value) -> Result<Self, String> { Ok(Hello) }
//!     fn on_event(&mut self, host: &Host, event: &Event) -> Result<(), String> { Ok(()) }
//! }
//! popupd_plugin_api::declare_plugin!(Hello, "hello", "0.1.0");
//! ```
#![allow(unsafe_code)] // This crate is the FFI boundary; each unsafe block says why it holds.

use std::ffi::{CStr, CString, c_char, c_void};

use serde::{Deserialize, Serialize};

/// `b"PPDP"`: marks a popupd plugin declaration.
pub const MAGIC: u32 = 0x5050_4450;
/// The ABI version this crate speaks. Bumped on any change to the C types.
pub const ABI_VERSION: u32 = 1;
/// The symbol every plugin exports.
pub const ENTRY_SYMBOL: &[u8] = b"popupd_plugin_entry";

/// Success.
pub const OK: i32 = 0;
/// The plugin refused (bad config, failed action); the error buffer says why.
pub const ERR_FAILED: i32 = -1;
/// The plugin panicked; it was caught at the boundary.
pub const ERR_PANIC: i32 = -2;
/// The host does not offer this action (yet).
pub const ERR_UNSUPPORTED: i32 = -3;

/// What `popupd_plugin_entry` points at.
#[repr(C)]
pub struct PluginDecl {
    pub magic: u32,
    pub abi_version: u32,
    /// `size_of::<PluginDecl>()` as the plugin was built.
    pub size: u32,
    /// NUL-terminated, static.
    pub name: *const c_char,
    /// NUL-terminated, static.
    pub version: *const c_char,
    /// Makes the plugin's state from its config (JSON object). On error,
    /// writes a message into `err` and returns non-zero.
    pub init: unsafe extern "C" fn(
        host: *const HostApi,
        config_json: *const c_char,
        state: *mut *mut c_void,
        err: *mut ErrBuf,
    ) -> i32,
    /// One event (JSON of [`Event`]).
    pub on_event: unsafe extern "C" fn(
        state: *mut c_void,
        event_json: *const c_char,
        err: *mut ErrBuf,
    ) -> i32,
    /// New config after SIGHUP.
    pub reload: unsafe extern "C" fn(
        state: *mut c_void,
        config_json: *const c_char,
        err: *mut ErrBuf,
    ) -> i32,
    /// Frees the state; no call follows.
    pub shutdown: unsafe extern "C" fn(state: *mut c_void),
}

// SAFETY: a declaration is immutable static data (pointers to static strings
// and functions).
unsafe impl Sync for PluginDecl {}

/// A buffer the plugin writes an error message into.
#[repr(C)]
pub struct ErrBuf {
    pub buf: [u8; 512],
    pub len: usize,
}

impl Default for ErrBuf {
    fn default() -> Self {
        ErrBuf {
            buf: [0; 512],
            len: 0,
        }
    }
}

impl ErrBuf {
    pub fn set(&mut self, msg: &str) {
        let b = msg.as_bytes();
        let n = b.len().min(self.buf.len());
        self.buf[..n].copy_from_slice(&b[..n]);
        self.len = n;
    }

    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.buf[..self.len.min(self.buf.len())]).into_owned()
    }
}

/// What the agent offers a plugin. Every function may be called from any
/// thread; the table stays valid for the life of the process (so threads a
/// plugin starts may keep a copy of its [`Host`]).
#[repr(C)]
pub struct HostApi {
    /// `size_of::<HostApi>()` as the host was built; fields past it are absent.
    pub size: u32,
    /// Passed back as the first argument of every function.
    pub ctx: *mut c_void,
    /// Sends `text` to `to`; `reply_to` may be null. Writes the new message
    /// id (36 bytes + NUL) into `id_out`.
    pub send: unsafe extern "C" fn(
        ctx: *mut c_void,
        to: *const c_char,
        text: *const c_char,
        reply_to: *const c_char,
        id_out: *mut c_char,
        err: *mut ErrBuf,
    ) -> i32,
    /// Marks the received message `id` read.
    pub mark_read:
        unsafe extern "C" fn(ctx: *mut c_void, id: *const c_char, err: *mut ErrBuf) -> i32,
    /// Sets presence (`online`, `away`, `busy`) with a text; may be unsupported.
    pub set_presence: unsafe extern "C" fn(
        ctx: *mut c_void,
        state: *const c_char,
        text: *const c_char,
        err: *mut ErrBuf,
    ) -> i32,
    /// Logs through the agent's log, under the plugin's name. Levels: 1 error,
    /// 2 warn, 3 info, 4 debug.
    pub log: unsafe extern "C" fn(ctx: *mut c_void, level: u32, msg: *const c_char),
    /// The D-Bus address the agent serves on (NUL-terminated); empty for the
    /// session bus of `DBUS_SESSION_BUS_ADDRESS`. Plugins that talk D-Bus
    /// (the desktop popup) use the same bus.
    pub bus_address: *const c_char,
}

// SAFETY: the host promises its functions are thread-safe (documented above).
unsafe impl Send for HostApi {}
unsafe impl Sync for HostApi {}

/// An event, as the JSON the agent passes to `on_event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A new message for this person (once per message).
    MessageReceived {
        id: String,
        from: String,
        text: String,
        sent_at: i64,
        #[serde(default)]
        reply_to: Option<String>,
        /// `normal` today; `urgent` and `low` are reserved.
        #[serde(default = "normal")]
        priority: String,
    },
    /// A message's status changed (sent or received).
    MessageStatusChanged {
        id: String,
        status: String,
        reason: String,
    },
    /// This person sent a message (from any app).
    MessageSent {
        id: String,
        to: String,
        text: String,
    },
    /// A contact's presence changed (`online`, `away`, `busy`, `offline`,
    /// or `unknown` while their home cannot be reached).
    PresenceChanged {
        handle: String,
        state: String,
        text: String,
    },
    /// This person's own presence: once at start, then on every change (by
    /// hand, or automatic away).
    PresenceSet { state: String, text: String },
    /// Someone asks to become a contact (answer on D-Bus with
    /// `AnswerContactRequest`).
    ContactRequest { from: String },
    /// The back connection went up or down.
    ConnectionChanged { connected: bool, home: String },
    /// The agent reloaded its config; the plugin got `reload` first.
    ConfigReloaded,
}

fn normal() -> String {
    "normal".into()
}

/// The host API, for Rust plugins. Cheap to copy; valid for the life of
/// the process.
#[derive(Clone, Copy)]
pub struct Host {
    api: *const HostApi,
}

// SAFETY: HostApi is thread-safe by contract, and outlives the plugin state.
unsafe impl Send for Host {}
unsafe impl Sync for Host {}

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| "text holds a NUL byte".to_string())
}

impl Host {
    /// Wraps the table the agent passed to `init`.
    ///
    /// # Safety
    /// `api` must be the pointer the agent passed to `init`.
    pub unsafe fn from_raw(api: *const HostApi) -> Host {
        Host { api }
    }

    fn api(&self) -> &HostApi {
        // SAFETY: the agent keeps the table alive for the life of the process.
        unsafe { &*self.api }
    }

    /// Sends a message; returns its id.
    pub fn send(&self, to: &str, text: &str, reply_to: Option<&str>) -> Result<String, String> {
        let (to, text) = (cstring(to)?, cstring(text)?);
        let reply = reply_to.map(cstring).transpose()?;
        let mut id = [0 as c_char; 64];
        let mut err = ErrBuf::default();
        let a = self.api();
        // SAFETY: all pointers are valid NUL-terminated strings or null for
        // `reply_to`; `id` has room for 36 bytes and a NUL.
        let rc = unsafe {
            (a.send)(
                a.ctx,
                to.as_ptr(),
                text.as_ptr(),
                reply.as_ref().map_or(std::ptr::null(), |r| r.as_ptr()),
                id.as_mut_ptr(),
                &mut err,
            )
        };
        if rc != OK {
            return Err(err.message());
        }
        // SAFETY: the host wrote a NUL-terminated id.
        Ok(unsafe { CStr::from_ptr(id.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    /// Replies to a received message.
    pub fn reply(&self, to: &str, id: &str, text: &str) -> Result<String, String> {
        self.send(to, text, Some(id))
    }

    /// Marks a received message read.
    pub fn mark_read(&self, id: &str) -> Result<(), String> {
        let id = cstring(id)?;
        let mut err = ErrBuf::default();
        let a = self.api();
        // SAFETY: valid string and error buffer.
        match unsafe { (a.mark_read)(a.ctx, id.as_ptr(), &mut err) } {
            OK => Ok(()),
            _ => Err(err.message()),
        }
    }

    /// Sets this person's presence by hand (`online`, `away`, `busy`,
    /// `offline`) with a status text.
    pub fn set_presence(&self, state: &str, text: &str) -> Result<(), String> {
        let (s, t) = (cstring(state)?, cstring(text)?);
        let mut err = ErrBuf::default();
        let a = self.api();
        // SAFETY: valid strings and error buffer.
        match unsafe { (a.set_presence)(a.ctx, s.as_ptr(), t.as_ptr(), &mut err) } {
            OK => Ok(()),
            _ => Err(err.message()),
        }
    }

    /// Logs through the agent.
    pub fn log(&self, level: u32, msg: &str) {
        if let Ok(m) = cstring(&msg.replace('\0', " ")) {
            let a = self.api();
            // SAFETY: valid string.
            unsafe { (a.log)(a.ctx, level, m.as_ptr()) }
        }
    }
    /// The D-Bus address the agent serves on; `None` for the session bus.
    pub fn bus_address(&self) -> Option<String> {
        let a = self.api();
        if a.bus_address.is_null() {
            return None;
        }
        // SAFETY: a static NUL-terminated string.
        let s = unsafe { CStr::from_ptr(a.bus_address) }
            .to_string_lossy()
            .into_owned();
        (!s.is_empty()).then_some(s)
    }

    pub fn info(&self, msg: &str) {
        self.log(3, msg)
    }
    pub fn warn(&self, msg: &str) {
        self.log(2, msg)
    }
}

/// A plugin, in Rust. [`declare_plugin!`] turns it into the C ABI.
pub trait Plugin: Sized + Send + 'static {
    /// Checks `config` (the plugin's section of the agent config, `{}` if
    /// absent) and starts. An error names the field that is wrong.
    fn init(host: Host, config: serde_json::Value) -> Result<Self, String>;
    /// Handles one event.
    fn on_event(&mut self, event: &Event) -> Result<(), String>;
    /// Takes a new config (after SIGHUP). The default keeps the old one.
    fn reload(&mut self, config: serde_json::Value) -> Result<(), String> {
        let _ = config;
        Ok(())
    }
}

#[doc(hidden)]
pub mod shim {
    //! The `extern "C"` functions [`declare_plugin!`](crate::declare_plugin) generates call these.
    use super::*;
    use std::panic::{AssertUnwindSafe, catch_unwind};

    fn json(p: *const c_char) -> Result<serde_json::Value, String> {
        if p.is_null() {
            return Ok(serde_json::Value::Object(Default::default()));
        }
        // SAFETY: the host passes NUL-terminated UTF-8.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy();
        serde_json::from_str(&s).map_err(|e| format!("bad JSON from the host: {e}"))
    }

    fn fail(err: *mut ErrBuf, code: i32, msg: &str) -> i32 {
        if !err.is_null() {
            // SAFETY: the host passes a valid buffer.
            unsafe { (*err).set(msg) };
        }
        code
    }

    fn guard(err: *mut ErrBuf, f: impl FnOnce() -> Result<(), String>) -> i32 {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(())) => OK,
            Ok(Err(m)) => fail(err, ERR_FAILED, &m),
            Err(p) => {
                let m = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                fail(err, ERR_PANIC, &format!("panicked: {m}"))
            }
        }
    }

    /// # Safety
    /// Called by the host with the pointers the ABI describes.
    pub unsafe fn init<P: Plugin>(
        host: *const HostApi,
        config: *const c_char,
        state: *mut *mut c_void,
        err: *mut ErrBuf,
    ) -> i32 {
        guard(err, || {
            let cfg = json(config)?;
            // SAFETY: the host passed its table.
            let p = P::init(unsafe { Host::from_raw(host) }, cfg)?;
            // SAFETY: `state` is a valid out-pointer.
            unsafe { *state = Box::into_raw(Box::new(p)).cast() };
            Ok(())
        })
    }

    /// # Safety
    /// `state` came from `init::<P>`.
    pub unsafe fn on_event<P: Plugin>(
        state: *mut c_void,
        event: *const c_char,
        err: *mut ErrBuf,
    ) -> i32 {
        guard(err, || {
            // SAFETY: state is a live `P` made by `init`.
            let p = unsafe { &mut *state.cast::<P>() };
            let v = json(event)?;
            match serde_json::from_value::<Event>(v) {
                Ok(e) => p.on_event(&e),
                // An event this plugin was built before: skip it.
                Err(_) => Ok(()),
            }
        })
    }

    /// # Safety
    /// `state` came from `init::<P>`.
    pub unsafe fn reload<P: Plugin>(
        state: *mut c_void,
        config: *const c_char,
        err: *mut ErrBuf,
    ) -> i32 {
        guard(err, || {
            // SAFETY: state is a live `P`.
            let p = unsafe { &mut *state.cast::<P>() };
            p.reload(json(config)?)
        })
    }

    /// # Safety
    /// `state` came from `init::<P>` and is not used again.
    pub unsafe fn shutdown<P: Plugin>(state: *mut c_void) {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: state is a live `P`, dropped once.
            drop(unsafe { Box::from_raw(state.cast::<P>()) });
        }));
    }
}

/// Exports a [`Plugin`] type as a popupd plugin:
/// `declare_plugin!(MyPlugin, "name", "version");`
#[macro_export]
macro_rules! declare_plugin {
    ($ty:ty, $name:literal, $version:literal) => {
        // The C side of the plugin; `unsafe` is confined to these shims.
        #[allow(unsafe_code)]
        const _: () = {
            unsafe extern "C" fn init(
                host: *const $crate::HostApi,
                config: *const ::std::ffi::c_char,
                state: *mut *mut ::std::ffi::c_void,
                err: *mut $crate::ErrBuf,
            ) -> i32 {
                unsafe { $crate::shim::init::<$ty>(host, config, state, err) }
            }
            unsafe extern "C" fn on_event(
                state: *mut ::std::ffi::c_void,
                event: *const ::std::ffi::c_char,
                err: *mut $crate::ErrBuf,
            ) -> i32 {
                unsafe { $crate::shim::on_event::<$ty>(state, event, err) }
            }
            unsafe extern "C" fn reload(
                state: *mut ::std::ffi::c_void,
                config: *const ::std::ffi::c_char,
                err: *mut $crate::ErrBuf,
            ) -> i32 {
                unsafe { $crate::shim::reload::<$ty>(state, config, err) }
            }
            unsafe extern "C" fn shutdown(state: *mut ::std::ffi::c_void) {
                unsafe { $crate::shim::shutdown::<$ty>(state) }
            }
            static DECL: $crate::PluginDecl = $crate::PluginDecl {
                magic: $crate::MAGIC,
                abi_version: $crate::ABI_VERSION,
                size: ::std::mem::size_of::<$crate::PluginDecl>() as u32,
                name: concat!($name, "\0").as_ptr().cast(),
                version: concat!($version, "\0").as_ptr().cast(),
                init,
                on_event,
                reload,
                shutdown,
            };
            /// The entry the agent looks up.
            #[unsafe(no_mangle)]
            pub extern "C" fn popupd_plugin_entry() -> *const $crate::PluginDecl {
                &DECL
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_tagged_by_event() {
        let e = Event::MessageReceived {
            id: "i".into(),
            from: "bob".into(),
            text: "hi".into(),
            sent_at: 1,
            reply_to: None,
            priority: "normal".into(),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.starts_with(r#"{"event":"message_received""#), "{s}");
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
    }

    #[test]
    fn err_buf_truncates() {
        let mut b = ErrBuf::default();
        b.set(&"x".repeat(1000));
        assert_eq!(b.message().len(), 512);
    }
}
