//! What crosses the plugin ABI (`daemon/src/agent/plugins.rs`,
//! `plugins/api`, docs/plugins.md), each input read every way:
//!
//! - daemon to plugin, an event: the JSON text `on_event` gets, through the
//!   real shim every Rust plugin is built with (`shim::on_event`: C string,
//!   `serde_json::Value`, then `Event`). It must never panic (the shim
//!   would catch it and the agent count a failure); an event that parses
//!   must round-trip through its JSON.
//! - daemon to plugin, a config: the JSON of the plugin's section of the
//!   agent config, through `shim::init` and `shim::reload` of the real
//!   `autoreply` plugin (its config parser has no side effect). Only one
//!   plugin crate links into a binary (each exports `popupd_plugin_entry`);
//!   `exec`'s parser is much the same serde shape, and `notify` starts a
//!   D-Bus thread in `init`.
//! - plugin to daemon: the C strings a plugin hands the host table
//!   (`send`'s recipient, `mark_read`'s id, `set_presence`'s state), read
//!   as the host's `text()` does and checked with the same public checks
//!   the agent then applies (`valid_handle`, `valid_id`,
//!   `PresenceState::parse`), and the error buffer a plugin fills
//!   (`ErrBuf::message`, with any length it claims).
#![no_main]

use std::ffi::{CStr, CString, c_void};

use libfuzzer_sys::fuzz_target;
use popupd_autoreply::Autoreply;
use popupd_fuzz::round_trip;
use popupd_plugin_api::{ERR_FAILED, ErrBuf, Event, Host, OK, Plugin, shim};
use popupd_protocol::{PresenceState, valid_handle, valid_id};

/// A plugin that keeps the last event its shim parsed.
struct Recorder(Option<Event>);

impl Plugin for Recorder {
    fn init(_host: Host, _config: serde_json::Value) -> Result<Self, String> {
        Ok(Recorder(None))
    }

    fn on_event(&mut self, event: &Event) -> Result<(), String> {
        self.0 = Some(event.clone());
        Ok(())
    }
}

/// What a plugin callback answered: OK, or a refusal with a message; never
/// a panic caught at the boundary.
fn check(what: &str, rc: i32, err: &ErrBuf) {
    assert!(
        rc == OK || rc == ERR_FAILED,
        "{what} returned {rc}: {}",
        err.message()
    );
}

/// Config through a real plugin's init, reload and shutdown.
fn config<P: Plugin>(name: &str, json: &CStr) {
    let mut state: *mut c_void = std::ptr::null_mut();
    let mut err = ErrBuf::default();
    // SAFETY: the plugin's init only parses its config (it keeps the host
    // pointer for later events, and none is sent); `state` and `err` are
    // valid out-pointers, as the agent passes them.
    let rc = unsafe { shim::init::<P>(std::ptr::null(), json.as_ptr(), &mut state, &mut err) };
    check(&format!("{name}: init"), rc, &err);
    if rc != OK {
        return;
    }
    let mut err = ErrBuf::default();
    // SAFETY: `state` came from this plugin's init.
    let rc = unsafe { shim::reload::<P>(state, json.as_ptr(), &mut err) };
    check(&format!("{name}: reload"), rc, &err);
    // SAFETY: the last call on `state`.
    unsafe { shim::shutdown::<P>(state) };
}

fuzz_target!(|data: &[u8]| {
    // Everything crosses the ABI as a C string: the bytes up to a NUL.
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let c = CString::new(&data[..end]).expect("no NUL before `end`");

    // An event, as `on_event` gets it.
    let mut rec = Recorder(None);
    let mut err = ErrBuf::default();
    // SAFETY: `rec` is a live Recorder, the string is NUL-terminated.
    let rc = unsafe {
        shim::on_event::<Recorder>((&raw mut rec).cast::<c_void>(), c.as_ptr(), &mut err)
    };
    check("on_event", rc, &err);
    if let Some(e) = &rec.0 {
        round_trip(e);
    }

    // A config section, as `init` and `reload` get it.
    config::<Autoreply>("autoreply", &c);

    // The host's side of a call: `text()` reads a plugin's strings lossily,
    // then the agent checks them (`Agent::send`, `mark_read`,
    // `set_presence`).
    let s = c.to_string_lossy();
    valid_handle(s.trim());
    valid_id(&s);
    if let Some(st) = PresenceState::parse(&s) {
        assert_eq!(PresenceState::parse(st.as_str()), Some(st));
    }

    // The error buffer a plugin fills: any bytes, any length it claims.
    let mut eb = ErrBuf::default();
    let n = data.len().min(eb.buf.len());
    eb.buf[..n].copy_from_slice(&data[..n]);
    eb.len = data
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(data.len(), usize::from_le_bytes);
    let _ = eb.message();
    let mut eb = ErrBuf::default();
    eb.set(&s);
    assert!(eb.len <= eb.buf.len());
});
