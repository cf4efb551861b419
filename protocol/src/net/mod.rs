//! Links: JSON frames over WebSocket over TLS 1.3, dialed (optionally through
//! an HTTP CONNECT proxy) or accepted.

pub mod proxy;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage, protocol::WebSocketConfig};

use crate::{ErrorCode, MAX_FRAME};

/// TLS stream a server accepted.
pub type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;
/// TLS stream a client dialed.
pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// How long a TLS + WebSocket handshake may take, either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a dialer waits for TCP to connect. Short, so that a dial begun
/// while the network was cut gives way soon to a fresh one once it heals
/// (the kernel's own retries of a connection attempt come ever further
/// apart: 1, 2, 4 s...).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one write may block, unless a link says otherwise: a peer that
/// takes nothing for that long is gone, whatever its keepalive would say.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors on a link.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("frame larger than {MAX_FRAME} bytes")]
    TooLarge,
    #[error("connection closed")]
    Closed,
    #[error("websocket: {0}")]
    Ws(tungstenite::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("a write did not finish within {}: the other side takes nothing", humantime::format_duration(*.0))]
    WriteTimeout(Duration),
    #[error("proxy: {0}")]
    Proxy(String),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

impl From<tungstenite::Error> for LinkError {
    fn from(e: tungstenite::Error) -> Self {
        use tungstenite::Error as E;
        match e {
            E::Capacity(_) => LinkError::TooLarge,
            E::ConnectionClosed | E::AlreadyClosed => LinkError::Closed,
            E::Io(io) => LinkError::Io(io),
            other => LinkError::Ws(other),
        }
    }
}

/// WebSocket settings for every link. The read buffer is small (1 KiB; a
/// larger frame grows it while it is read) because a home holds thousands
/// of mostly idle connections; tungstenite's default (128 KiB, allocated up
/// front) would cost that much per connection.
/// Fed frames are gathered up to 8 KiB before they are written, so a busy
/// link sends one TLS record for many frames; the buffer grows only when
/// used.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(4 * MAX_FRAME)
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
}

/// What [`Link::recv`] got.
#[derive(Debug)]
pub enum Recv<T> {
    /// A frame that decoded.
    Frame(T),
    /// A text frame that is not a valid frame: answer with an error frame.
    Bad(String),
    /// A ping, pong or other control traffic: the link is alive.
    Alive,
    /// The other side closed.
    Closed,
}

/// A WebSocket carrying JSON frames.
pub struct Link<S> {
    ws: WebSocketStream<S>,
    /// Frames were fed since the last flush.
    unflushed: bool,
    /// Longest a write may block (see [`Link::set_write_timeout`]).
    write_timeout: Duration,
}

impl<S> Link<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Link {
            ws,
            unflushed: false,
            write_timeout: WRITE_TIMEOUT,
        }
    }

    /// Bounds every write: one that cannot finish within `d` (the other
    /// side reads nothing, or the network dropped it silently) fails with
    /// [`LinkError::Timeout`]. A link whose writer is stuck is found dead
    /// this way even though its keepalive cannot run meanwhile.
    pub fn set_write_timeout(&mut self, d: Duration) {
        self.write_timeout = d;
    }

    async fn bounded<T>(
        &mut self,
        f: impl AsyncFnOnce(&mut WebSocketStream<S>) -> Result<T, tungstenite::Error>,
    ) -> Result<T, LinkError> {
        match tokio::time::timeout(self.write_timeout, f(&mut self.ws)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(LinkError::WriteTimeout(self.write_timeout)),
        }
    }

    /// Queues a frame without flushing; call [`Link::flush`] after a batch.
    pub async fn feed<T: Serialize>(&mut self, frame: &T) -> Result<(), LinkError> {
        let text = serde_json::to_string(frame).map_err(std::io::Error::other)?;
        self.feed_text(text).await
    }

    /// Sends one frame now.
    pub async fn send<T: Serialize>(&mut self, frame: &T) -> Result<(), LinkError> {
        self.feed(frame).await?;
        self.flush().await
    }

    pub async fn flush(&mut self) -> Result<(), LinkError> {
        self.bounded(async |ws| ws.flush().await).await?;
        self.unflushed = false;
        Ok(())
    }

    /// Whether fed frames wait for a [`Link::flush`].
    pub fn needs_flush(&self) -> bool {
        self.unflushed
    }

    /// Queues a frame already in JSON.
    pub async fn feed_text(&mut self, text: String) -> Result<(), LinkError> {
        self.bounded(async |ws| ws.feed(WsMessage::text(text)).await)
            .await?;
        self.unflushed = true;
        Ok(())
    }

    /// Sends a frame already in JSON (or raw text, in tests of bad input).
    pub async fn send_text(&mut self, text: String) -> Result<(), LinkError> {
        self.feed_text(text).await?;
        self.flush().await
    }

    pub async fn ping(&mut self) -> Result<(), LinkError> {
        self.bounded(async |ws| ws.send(WsMessage::Ping(Default::default())).await)
            .await?;
        self.unflushed = false;
        Ok(())
    }

    /// Receives the next frame. Cancel-safe: nothing is lost if the future is
    /// dropped before it completes.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Recv<T>, LinkError> {
        match self.ws.next().await {
            None => Ok(Recv::Closed),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(WsMessage::Text(t))) => Ok(match serde_json::from_str::<T>(t.as_str()) {
                Ok(f) => Recv::Frame(f),
                Err(e) => Recv::Bad(e.to_string()),
            }),
            Some(Ok(WsMessage::Binary(_))) => Ok(Recv::Bad(
                "binary frames are not used; send JSON text frames".into(),
            )),
            Some(Ok(WsMessage::Close(_))) => Ok(Recv::Closed),
            Some(Ok(_)) => Ok(Recv::Alive),
        }
    }

    /// After a last frame that says why the link ends: reads and drops
    /// whatever the other side still sends, until it closes or `d` passes.
    /// Closing at once with unread input would make the kernel send a
    /// reset, which can destroy the last frames before they are read.
    pub async fn linger(&mut self, d: Duration) {
        use tokio::io::AsyncReadExt as _;
        let _ = tokio::time::timeout(d, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(m)) if !m.is_close() => {}
                    Some(Ok(_)) => return,
                    // After an error the WebSocket layer reads no more.
                    Some(Err(_)) | None => break,
                }
            }
            // The WebSocket layer gave up on the input (a frame too large:
            // its rest is still unread). Closing now would make the kernel
            // answer with a reset, which can swallow the error just sent,
            // so the raw bytes are read and dropped until the other side
            // stops or the time is up.
            // On the heap: an array here would sit in the state of every
            // session future that can linger, idle or not (16 KiB a
            // connection).
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = self.ws.get_mut().read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        })
        .await;
    }

    /// Closes the WebSocket cleanly (best effort, bounded in time).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
    }

    /// The underlying stream (for TLS details such as peer certificates).
    pub fn stream(&self) -> &S {
        self.ws.get_ref()
    }
}

/// Accepts TLS then a WebSocket upgrade on one of `paths`. Returns the link
/// and the path the client asked for.
pub async fn accept(
    tcp: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    paths: &'static [&'static str],
) -> Result<(Link<ServerTls>, &'static str), LinkError> {
    let work = async {
        let tls = acceptor.accept(tcp).await?;
        let mut chosen: Option<&'static str> = None;
        // tungstenite's callback type: its error is the HTTP answer.
        #[allow(clippy::result_large_err)]
        let cb = |req: &tungstenite::handshake::server::Request,
                  resp: tungstenite::handshake::server::Response| {
            match paths.iter().find(|p| **p == req.uri().path()) {
                Some(p) => {
                    chosen = Some(p);
                    Ok(resp)
                }
                None => {
                    let mut r = tungstenite::handshake::server::ErrorResponse::new(Some(
                        "unknown path; popupd serves /v1/agent, /v1/peer and /v1/global".into(),
                    ));
                    *r.status_mut() = tungstenite::http::StatusCode::NOT_FOUND;
                    Err(r)
                }
            }
        };
        let ws =
            tokio_tungstenite::accept_hdr_async_with_config(tls, cb, Some(ws_config())).await?;
        let path = chosen.ok_or(LinkError::Closed)?;
        Ok::<_, LinkError>((Link::new(ws), path))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| LinkError::Timeout)?
}

/// Checks the `hello` of a server that dialed us (a home, on a peer or
/// global link): the protocol version, and a client certificate (verified
/// under the network CA during the handshake) valid for the name it claims.
pub fn check_dialer(
    link: &Link<ServerTls>,
    v: u32,
    claimed: &str,
) -> Result<(), (ErrorCode, String)> {
    use crate::PROTOCOL_VERSION;
    if v != PROTOCOL_VERSION {
        return Err((
            ErrorCode::UnsupportedVersion,
            format!("this server speaks protocol {PROTOCOL_VERSION}, not {v}; upgrade popupd"),
        ));
    }
    let leaf = link
        .stream()
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first());
    if !leaf.is_some_and(|c| tls::cert_is_for(c, claimed)) {
        return Err((
            ErrorCode::AuthFailed,
            "present a certificate from the network CA issued for the name you claim".into(),
        ));
    }
    Ok(())
}

/// Capped exponential backoff with jitter, for reconnects.
#[derive(Debug, Clone)]
pub struct Backoff {
    cur: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { cur: min, min, max }
    }

    /// The next delay: uniformly random in [d/2, d], then d doubles up to
    /// the cap. Jitter spreads a crowd of agents reconnecting after a
    /// home restart.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        let half = d / 2;
        half + Duration::from_micros(fastrand::u64(0..=half.as_micros() as u64))
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

/// Where and how to dial.
#[derive(Clone, Debug)]
pub struct Dial {
    /// `host:port` to connect to, or several, comma-separated (the nodes
    /// of one server): tried in random order until one answers. A host
    /// name with several addresses counts as several.
    pub address: String,
    /// The server's name, checked against its certificate.
    pub name: String,
    /// WebSocket path.
    pub path: &'static str,
    pub tls: Arc<rustls::ClientConfig>,
    /// HTTP proxy to tunnel through, if any.
    pub proxy: Option<proxy::Proxy>,
}

/// The `host:port` entries of a comma-separated address list.
pub fn address_list(address: &str) -> impl Iterator<Item = &str> {
    address.split(',').map(str::trim).filter(|a| !a.is_empty())
}

/// Dials TCP (through the proxy if set), TLS and the WebSocket upgrade.
///
/// Every address `d.address` names or resolves to is tried in random
/// order, each under [`HANDSHAKE_TIMEOUT`], so that a crowd of agents
/// spreads over the nodes of a home and moves on from a node that is gone.
/// Fails with the last address's error.
pub async fn dial(d: &Dial) -> Result<Link<ClientTls>, LinkError> {
    let mut targets: Vec<Target> = Vec::new();
    let mut last = None;
    for a in address_list(&d.address) {
        if let Some(p) = &d.proxy {
            // The proxy resolves the name.
            targets.push(Target::Proxied(p, a.to_owned()));
            continue;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(a)).await {
            Ok(Ok(found)) => targets.extend(found.map(|s| Target::Addr(a.to_owned(), s))),
            Ok(Err(e)) => last = Some(LinkError::Io(e)),
            Err(_) => {
                last = Some(LinkError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("cannot resolve {a}"),
                )))
            }
        }
    }
    fastrand::shuffle(&mut targets);
    for t in &targets {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, dial_one(t, d)).await {
            Ok(Ok(link)) => return Ok(link),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(LinkError::Timeout),
        }
    }
    Err(last.unwrap_or_else(|| {
        LinkError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{:?} names no address", d.address),
        ))
    }))
}

/// One address to try.
enum Target<'a> {
    /// As named, through the proxy.
    Proxied(&'a proxy::Proxy, String),
    /// As named, and as resolved.
    Addr(String, std::net::SocketAddr),
}

async fn dial_one(t: &Target<'_>, d: &Dial) -> Result<Link<ClientTls>, LinkError> {
    let tcp = match t {
        Target::Proxied(p, a) => p.connect(a).await?,
        Target::Addr(a, s) => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(s))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no TCP answer from {a} ({s}) within {}",
                        humantime::format_duration(CONNECT_TIMEOUT)
                    ),
                )
            })??,
    };
    handshake(tcp, d).await
}

/// TLS and the WebSocket upgrade over a connected socket (load generators
/// bind their own source addresses).
pub async fn dial_over(tcp: TcpStream, d: &Dial) -> Result<Link<ClientTls>, LinkError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, d))
        .await
        .map_err(|_| LinkError::Timeout)?
}

async fn handshake(tcp: TcpStream, d: &Dial) -> Result<Link<ClientTls>, LinkError> {
    {
        tcp.set_nodelay(true)?;
        let name = tls::server_name(&d.name)?;
        let tls = tokio_rustls::TlsConnector::from(d.tls.clone())
            .connect(name, tcp)
            .await?;
        let url = format!("wss://{}{}", d.name, d.path);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url, tls, Some(ws_config())).await?;
        Ok::<_, LinkError>(Link::new(ws))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = b.next_delay();
            assert!(last <= Duration::from_secs(5));
        }
        assert!(
            last >= Duration::from_millis(2500),
            "reaches the cap's half at least"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
