//! popupd: immediate popup messaging for Linux desktops.
//!
//! One daemon, three roles chosen by its config (see `ARCHITECTURE.md`):
//!
//! - [`agent`] on each desktop: the back connection, the D-Bus service,
//!   local history.
//! - [`home`] server: accounts, devices, who is online, the durable queue.
//! - [`global`] server: the directory of homes and handles.
//!
//! Beside the roles sit the shared parts: [`protocol`] (every wire type),
//! [`net`] (TLS, WebSocket links, proxies), [`storage`] (SQLite with group
//! commit), [`config`], [`ca`], and [`task`] (shutdown and supervision).

pub mod agent;
pub mod ca;
pub mod config;
pub mod global;
pub mod home;
pub mod net;
pub mod protocol;
pub mod storage;
pub mod task;
