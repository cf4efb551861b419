//! Test fixture: declares a future ABI version; the agent must refuse it
//! without calling anything but the entry.
#![allow(unsafe_code)]
use popupd_plugin_api::{ErrBuf, HostApi, MAGIC, PluginDecl};
use std::ffi::{c_char, c_void};

unsafe extern "C" fn init(
    _: *const HostApi,
    _: *const c_char,
    _: *mut *mut c_void,
    _: *mut ErrBuf,
) -> i32 {
    std::process::abort() // must never be called
}
unsafe extern "C" fn on_event(_: *mut c_void, _: *const c_char, _: *mut ErrBuf) -> i32 {
    std::process::abort()
}
unsafe extern "C" fn shutdown(_: *mut c_void) {}

static DECL: PluginDecl = PluginDecl {
    magic: MAGIC,
    abi_version: 99,
    size: std::mem::size_of::<PluginDecl>() as u32,
    name: c"fixture-bad-abi".as_ptr(),
    version: c"9.9.9".as_ptr(),
    init,
    on_event,
    reload: on_event,
    shutdown,
};

/// The entry the agent looks up.
#[unsafe(no_mangle)]
pub extern "C" fn popupd_plugin_entry() -> *const PluginDecl {
    &DECL
}
