//! HTTP CONNECT tunnelling, for agents whose only way out is a proxy.
//!
//! Written by hand because it is one request and one status line: the crates
//! that do it (hyper-util's tunnel) bring an HTTP stack the daemon does not
//! otherwise need.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::LinkError;

/// An HTTP proxy that accepts `CONNECT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the proxy.
    pub address: String,
    /// `user:password` for Basic authentication, if the URL carried one.
    auth: Option<String>,
}

impl Proxy {
    /// Parses `http://[user:pass@]host[:port][/]` or `host:port`.
    pub fn parse(url: &str) -> Result<Proxy, String> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| (!url.contains("://")).then_some(url))
            .ok_or_else(|| {
                format!("proxy {url:?}: only http:// proxies are supported (CONNECT is sent in clear to the proxy)")
            })?;
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a.to_owned()), h),
            None => (None, rest),
        };
        if hostport.is_empty() || hostport.contains('/') {
            return Err(format!("proxy {url:?}: expected http://host:port"));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if has_port(hostport) => {
                let port =
                    p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                        format!("proxy {url:?}: port {p} is not between 1 and 65535")
                    })?;
                (h, port)
            }
            _ => (hostport, 80),
        };
        if host.is_empty() {
            return Err(format!("proxy {url:?}: no host; expected http://host:port"));
        }
        Ok(Proxy {
            address: format!("{host}:{port}"),
            auth,
        })
    }

    /// The proxy from `HTTPS_PROXY`/`https_proxy` (then `ALL_PROXY`), unless
    /// `NO_PROXY` names `host`.
    pub fn from_env(host: &str) -> Option<Result<Proxy, String>> {
        let get = |k: &str| {
            std::env::var(k)
                .ok()
                .or_else(|| std::env::var(k.to_lowercase()).ok())
                .filter(|v| !v.is_empty())
        };
        let url = get("HTTPS_PROXY").or_else(|| get("ALL_PROXY"))?;
        if let Some(no) = get("NO_PROXY")
            && no_proxy_matches(&no, host)
        {
            return None;
        }
        Some(Proxy::parse(&url))
    }

    /// Opens a tunnel to `target` (`host:port`).
    pub async fn connect(&self, target: &str) -> Result<TcpStream, LinkError> {
        let mut tcp = TcpStream::connect(&self.address)
            .await
            .map_err(|e| LinkError::Proxy(format!("cannot reach proxy {}: {e}", self.address)))?;
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(a) = &self.auth {
            req.push_str(&format!(
                "Proxy-Authorization: Basic {}\r\n",
                base64(a.as_bytes())
            ));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await?;

        // Read the response head byte by byte so that nothing after it (the
        // server's first TLS bytes) is consumed here.
        let mut head = Vec::with_capacity(128);
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 8192 {
                return Err(LinkError::Proxy("response head too long".into()));
            }
            if tcp.read(&mut b).await? == 0 {
                return Err(LinkError::Proxy("proxy closed the connection".into()));
            }
            head.push(b[0]);
        }
        check_answer(&head).map_err(|status_line| {
            LinkError::Proxy(format!(
                "proxy {} refused CONNECT {target}: {status_line}",
                self.address
            ))
        })?;
        Ok(tcp)
    }
}

/// Whether a proxy's answer head says the tunnel is open (`200`); if not,
/// its status line.
pub fn check_answer(head: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(head);
    let status_line = text.lines().next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    match (words.next(), words.next()) {
        (Some(v), Some("200")) if v.starts_with("HTTP/") => Ok(()),
        _ => Err(status_line.to_owned()),
    }
}

fn has_port(hostport: &str) -> bool {
    match hostport.rsplit_once(':') {
        Some((h, p)) => !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':'),
        None => false,
    }
}

fn no_proxy_matches(list: &str, host: &str) -> bool {
    list.split(',').map(str::trim).any(|e| {
        e == "*"
            || (!e.is_empty()
                && (host == e.trim_start_matches('.')
                    || host.ends_with(&format!(".{}", e.trim_start_matches('.')))))
    })
}

/// Standard base64 with padding (RFC 4648), for one header.
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_urls() {
        let p = Proxy::parse("http://10.0.0.1:3128/").unwrap();
        assert_eq!(p.address, "10.0.0.1:3128");
        assert_eq!(Proxy::parse("proxy.lan").unwrap().address, "proxy.lan:80");
        let p = Proxy::parse("http://u:p@proxy:8080").unwrap();
        assert_eq!(p.auth.as_deref(), Some("u:p"));
        assert!(Proxy::parse("socks5://x:1").is_err());
        // Found while writing the fuzz targets: these passed check-config and failed only
        // when the agent dialled.
        for bad in [
            "http://:8080",
            "http://proxy:99999",
            "http://user@:1/",
            "http://proxy:0",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(
            base64(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn no_proxy() {
        assert!(no_proxy_matches(
            "localhost,.example.org",
            "home.example.org"
        ));
        assert!(no_proxy_matches("example.org", "example.org"));
        assert!(!no_proxy_matches("example.org", "badexample.org"));
        assert!(no_proxy_matches("*", "x"));
    }
}
