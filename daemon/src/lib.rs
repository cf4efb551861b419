//! popupd: immediate popup messaging for Linux desktops.
//!
//! One daemon, three roles chosen by its config (see `ARCHITECTURE.md`):
//!
//! - [`agent`] on each desktop: the back connection, the D-Bus service,
//!   local history.
//! - [`home`] server: accounts, devices, who is online, the durable queue.
//! - [`global`] server: the directory of homes and handles.
//!
//! Beside the roles sit the shared parts: [`storage`] (each role's store),
//! [`config`], [`ca`], and [`task`] (shutdown and timers). Below them are
//! two crates: `popupd-protocol` (every wire type, the limits, and the
//! links) and `popupd-store` (SQLite with group commit). Neither knows the
//! roles, and Cargo keeps it so.

pub mod accept;
pub mod agent;
pub mod ca;
pub mod config;
pub mod global;
pub mod home;
pub mod metrics;
pub mod session;
pub mod status;
pub mod storage;
pub mod task;
