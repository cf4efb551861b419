//! The agent's HTTP CONNECT client (`protocol/src/net/proxy.rs`):
//!
//! - `check_answer`: the proxy's answer head, from the network. Each input
//!   is one head as `Proxy::connect` reads it (at most 8 KiB and a bit,
//!   ending at the first blank line). `Ok` only for an `HTTP/x 200` status
//!   line; otherwise the error is that status line.
//! - `Proxy::parse`: a proxy URL, from the agent config's `proxy` or from
//!   `HTTPS_PROXY`/`ALL_PROXY`. What parses has an address with a port.
//! - `Proxy::from_env`: with `HTTPS_PROXY`, `NO_PROXY` and the home's host
//!   taken from the input (split at NUL bytes), which runs the `NO_PROXY`
//!   matching.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popupd_protocol::net::proxy::{Proxy, check_answer};

/// `Proxy::connect` stops reading past this many bytes of head.
const HEAD_MAX: usize = 8192 + 1;

fuzz_target!(|data: &[u8]| {
    // The answer head: what `connect` collected, up to its first blank line.
    let head = match data.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &data[..i + 4],
        None => data,
    };
    if head.len() <= HEAD_MAX {
        match check_answer(head) {
            Ok(()) => {
                let text = String::from_utf8_lossy(head);
                let line = text.lines().next().unwrap_or_default();
                let mut w = line.split_whitespace();
                assert!(w.next().is_some_and(|v| v.starts_with("HTTP/")));
                assert_eq!(w.next(), Some("200"));
            }
            Err(status_line) => {
                assert!(!status_line.contains('\n'), "{status_line:?}");
            }
        }
    }

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let url = parts.next().unwrap_or_default();
    if let Ok(p) = Proxy::parse(url) {
        let port = p.address.rsplit_once(':').map(|(_, port)| port);
        assert!(
            port.is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())),
            "{url:?} gave an address without a port: {p:?}"
        );
        assert!(!p.address.contains('/'), "{url:?} gave {p:?}");
    }

    // With the environment: HTTPS_PROXY \0 NO_PROXY \0 host.
    let (Some(no_proxy), Some(host)) = (parts.next(), parts.next()) else {
        return;
    };
    if url.is_empty() {
        return;
    }
    // SAFETY: libFuzzer runs inputs on one thread, the only one of this
    // process; the values hold no NUL (split at them).
    unsafe {
        std::env::set_var("HTTPS_PROXY", url);
        std::env::set_var("NO_PROXY", no_proxy);
    }
    match Proxy::from_env(host) {
        None => assert!(!no_proxy.is_empty(), "no proxy though NO_PROXY is empty"),
        Some(r) => assert_eq!(r, Proxy::parse(url), "HTTPS_PROXY read differently"),
    }
});
