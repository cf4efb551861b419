//! The home's link to the global directory: one long-lived mutual-TLS link
//! that asks where handles live and where homes are reached, and claims
//! this home's handles. The answers about handles are the router's to keep
//! (`home::router`): the global server pushes an `invalidate` when a handle
//! moves or is removed, and the router drops it at once. With the global
//! server down, cached routes keep working.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Home;
use crate::config::{HomeConfig, Remote};
use crate::session::{self, Clock, End, Handler, Jobs, Keepalive};
use crate::task::sleep_or_shutdown;
use popupd_protocol::net::Backoff;
use popupd_protocol::net::{self, ClientTls, Dial, Link, LinkError, Recv};
use popupd_protocol::{
    ErrorCode, GLOBAL_PATH, GlobalReply, GlobalRequest, PROTOCOL_VERSION, Route,
};

/// How long a caller waits for the global server.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// The home pings its link to the global server after this long quiet.
const PING: Duration = Duration::from_secs(20);
/// And gives it up after this long with nothing heard.
const SILENT: Duration = Duration::from_secs(60);

/// Directory errors.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DirError {
    #[error("global server unavailable: {0}")]
    Unavailable(String),
    #[error("global server refused: {1}")]
    Refused(ErrorCode, String),
}

/// A request, without its number.
#[derive(Debug, Clone)]
enum Ask {
    Lookup(String),
    LookupHome(String),
    Register(String),
    Unregister(String),
}

impl Ask {
    fn frame(&self, req: u64) -> GlobalRequest {
        match self.clone() {
            Ask::Lookup(handle) => GlobalRequest::Lookup { req, handle },
            Ask::LookupHome(home) => GlobalRequest::LookupHome { req, home },
            Ask::Register(handle) => GlobalRequest::Register { req, handle },
            Ask::Unregister(handle) => GlobalRequest::Unregister { req, handle },
        }
    }
}

type Reply = oneshot::Sender<Result<GlobalReply, DirError>>;

/// Route cache plus the queue of questions for the global server.
pub struct Directory {
    homes: Mutex<HashMap<String, String>>,
    tx: mpsc::Sender<(Ask, Reply)>,
    rx: Mutex<Option<mpsc::Receiver<(Ask, Reply)>>>,
    global: Remote,
}

impl Directory {
    pub fn new(cfg: &HomeConfig) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        Directory {
            homes: Mutex::default(),
            tx,
            rx: Mutex::new(Some(rx)),
            global: cfg.global.clone(),
        }
    }

    async fn ask(&self, a: Ask) -> Result<GlobalReply, DirError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((a, tx))
            .await
            .map_err(|_| DirError::Unavailable("directory stopped".into()))?;
        match tokio::time::timeout(ASK_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(DirError::Unavailable("link dropped".into())),
            Err(_) => Err(DirError::Unavailable("no answer in time".into())),
        }
    }

    /// Where `handle` lives, as the global server says (the router keeps
    /// the answers); learns that home's address on the way.
    pub async fn lookup(&self, handle: &str) -> Result<Option<Route>, DirError> {
        match self.ask(Ask::Lookup(handle.to_owned())).await? {
            GlobalReply::Route { route, .. } => {
                if let Some(r) = &route {
                    self.learn(r);
                }
                Ok(route)
            }
            GlobalReply::Error { code, message, .. } => Err(DirError::Refused(code, message)),
            other => Err(DirError::Unavailable(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Where home `home` is reached.
    pub async fn home_address(&self, home: &str) -> Result<Option<String>, DirError> {
        if let Some(a) = self
            .homes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(home)
        {
            return Ok(Some(a.clone()));
        }
        match self.ask(Ask::LookupHome(home.to_owned())).await? {
            GlobalReply::Route { route: Some(r), .. } => {
                self.homes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(r.home.clone(), r.address.clone());
                Ok(Some(r.address))
            }
            GlobalReply::Route { route: None, .. } => Ok(None),
            GlobalReply::Error { code, message, .. } => Err(DirError::Refused(code, message)),
            other => Err(DirError::Unavailable(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Claims `handle` for this home.
    pub async fn register(&self, handle: &str) -> Result<(), DirError> {
        expect_done(self.ask(Ask::Register(handle.to_owned())).await?)
    }

    fn learn(&self, r: &Route) {
        self.homes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(r.home.clone(), r.address.clone());
    }
}

fn expect_done(r: GlobalReply) -> Result<(), DirError> {
    match r {
        GlobalReply::Done { .. } => Ok(()),
        GlobalReply::Error { code, message, .. } => Err(DirError::Refused(code, message)),
        other => Err(DirError::Unavailable(format!(
            "unexpected answer {other:?}"
        ))),
    }
}

fn global_dial(g: &Remote, tls: Arc<rustls::ClientConfig>) -> Dial {
    Dial {
        address: g.address.clone(),
        name: g.name.clone(),
        path: GLOBAL_PATH,
        tls,
        proxy: None,
    }
}

/// Opens a link to the global server and introduces this home.
async fn connect(dial: &Dial, cfg: &HomeConfig) -> Result<Link<ClientTls>, LinkError> {
    let mut link = net::dial(dial).await?;
    link.send(&GlobalRequest::Hello {
        v: PROTOCOL_VERSION,
        home: cfg.name.clone(),
        address: cfg.public_address.clone(),
    })
    .await?;
    let answer = tokio::time::timeout(
        popupd_protocol::net::HANDSHAKE_TIMEOUT,
        link.recv::<GlobalReply>(),
    )
    .await
    .map_err(|_| LinkError::Timeout)??;
    match answer {
        Recv::Frame(GlobalReply::Welcome { .. }) => Ok(link),
        Recv::Frame(GlobalReply::Error { message, .. }) => Err(LinkError::Proxy(message)),
        other => Err(LinkError::Proxy(format!("unexpected answer {other:?}"))),
    }
}

/// One question on a fresh link, for admin commands run beside the daemon.
pub async fn ask_once(cfg: &HomeConfig, register: bool, handle: &str) -> Result<(), DirError> {
    ask_many(cfg, register, &[handle.to_owned()]).await
}

/// Claims (or releases) many handles on one link, pipelined: for bulk
/// account creation. Fails with the first refusal.
pub async fn ask_many(
    cfg: &HomeConfig,
    register: bool,
    handles: &[String],
) -> Result<(), DirError> {
    let tls = popupd_protocol::net::tls::client_config(cfg.ca.clone(), Some(&cfg.identity))
        .map_err(|e| DirError::Unavailable(e.to_string()))?;
    let dial = global_dial(&cfg.global, tls);
    let mut link = connect(&dial, cfg).await.map_err(|e| {
        DirError::Unavailable(format!("{} ({}): {e}", cfg.global.name, cfg.global.address))
    })?;
    let io = |e: LinkError| DirError::Unavailable(e.to_string());
    // Keep a bounded number of questions in flight.
    const WINDOW: usize = 256;
    let (mut sent, mut answered) = (0usize, 0usize);
    while answered < handles.len() {
        while sent < handles.len() && sent - answered < WINDOW {
            let h = handles[sent].clone();
            let a = if register {
                Ask::Register(h)
            } else {
                Ask::Unregister(h)
            };
            link.feed(&a.frame(sent as u64 + 1)).await.map_err(io)?;
            sent += 1;
        }
        link.flush().await.map_err(io)?;
        match link.recv::<GlobalReply>().await.map_err(io)? {
            Recv::Frame(GlobalReply::Invalidate { .. }) | Recv::Alive => continue,
            Recv::Frame(r) => {
                expect_done(r)?;
                answered += 1;
            }
            other => {
                return Err(DirError::Unavailable(format!(
                    "unexpected answer {other:?}"
                )));
            }
        }
    }
    link.close().await;
    Ok(())
}

/// Keeps the link to the global server up and answers the home's questions.
pub async fn run(home: Arc<Home>) {
    let Some(mut rx) = home.dir.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    let shutdown = home.shutdown.clone();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let dial = global_dial(&home.dir.global, home.client_tls.load());
        let link = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = connect(&dial, &home.cfg) => r,
        };
        match link {
            Ok(link) => {
                backoff.reset();
                tracing::info!(global = %dial.name, "linked to the global server {}", dial.name);
                match serve(&home, link, &mut rx).await {
                    End::Shutdown => return,
                    // It said goodbye, or closed the WebSocket cleanly: it
                    // stops or restarts, as planned.
                    why @ (End::Bye(..) | End::Closed) => tracing::info!(global = %dial.name,
                        "the global server {} closed the link ({why}); linking again", dial.name),
                    why => tracing::warn!(global = %dial.name,
                        "link to the global server {} lost: {why}", dial.name),
                }
            }
            Err(e) => {
                tracing::warn!(global = %dial.name, address = %dial.address,
                    "cannot reach the global server {} at {}: {e}", dial.name, dial.address);
            }
        }
        // While down, answer at once: callers use routes still fresh in
        // their cache, and retry the rest later.
        let wait = tokio::time::sleep(backoff.next_delay());
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut wait => break,
                Some((_, reply)) = rx.recv() => {
                    let _ = reply.send(Err(DirError::Unavailable("not linked".into())));
                }
            }
        }
        if sleep_or_shutdown(Duration::ZERO, &shutdown).await {
            return;
        }
    }
}

async fn serve(
    home: &Arc<Home>,
    mut link: Link<ClientTls>,
    rx: &mut mpsc::Receiver<(Ask, Reply)>,
) -> End {
    let mut s = GlobalLink {
        home,
        rx,
        pending: HashMap::new(),
        next_req: 1,
        registering: 0,
    };
    // Claim every local handle again, in case the directory lost them.
    let handles = home
        .store
        .read(|s| s.all_handles())
        .await
        .unwrap_or_default();
    let mut end = None;
    for h in handles {
        let req = s.next_req;
        s.next_req += 1;
        if let Err(e) = link.feed(&Ask::Register(h).frame(req)).await {
            end = Some(End::from(e));
            break;
        }
    }
    s.registering = s.next_req;
    let end = match end {
        Some(e) => e,
        None => {
            let ka = Keepalive {
                ping_after: PING,
                dead_after: SILENT,
                clock: Clock::Grid(Duration::from_secs(1)),
            };
            let mut jobs = Jobs::new();
            session::run(&mut link, &mut s, &mut jobs, ka, &home.shutdown).await
        }
    };
    let why = end.to_string();
    for (_, reply) in s.pending.drain() {
        let _ = reply.send(Err(DirError::Unavailable(why.clone())));
    }
    link.close().await;
    end
}

/// The link to the global server, as the session loop sees it.
struct GlobalLink<'a> {
    home: &'a Arc<Home>,
    /// The home's questions.
    rx: &'a mut mpsc::Receiver<(Ask, Reply)>,
    /// Asked and not yet answered.
    pending: HashMap<u64, Reply>,
    next_req: u64,
    /// Requests below this one are the handles claimed again at link-up.
    registering: u64,
}

impl Handler<ClientTls> for GlobalLink<'_> {
    type In = GlobalReply;
    type Done = ();
    type Wake = (Ask, Reply);

    fn poll_wake(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<(Ask, Reply)> {
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(q)) => std::task::Poll::Ready(q),
            // The directory holds the sender for as long as the home runs.
            _ => std::task::Poll::Pending,
        }
    }

    async fn frame(
        &mut self,
        _: &mut Link<ClientTls>,
        f: GlobalReply,
        _: &mut Jobs<()>,
    ) -> Result<(), End> {
        if let GlobalReply::Invalidate { handle } = &f {
            tracing::debug!(%handle, "route invalidated");
            self.home.router.forget(handle);
            return Ok(());
        }
        let req = match &f {
            GlobalReply::Done { req } | GlobalReply::Route { req, .. } => Some(*req),
            GlobalReply::Error { req, .. } => *req,
            _ => None,
        };
        match req.and_then(|r| self.pending.remove(&r)) {
            Some(reply) => {
                let _ = reply.send(Ok(f));
            }
            None if req.is_some_and(|r| r < self.registering) => {
                if let GlobalReply::Error { message, .. } = f {
                    tracing::error!("the global server refused a handle of this home: {message}");
                }
            }
            None => tracing::debug!(?f, "unsolicited answer from the global server"),
        }
        Ok(())
    }

    async fn done(&mut self, _: &mut Link<ClientTls>, _: (), _: &mut Jobs<()>) -> Result<(), End> {
        Ok(())
    }

    async fn wake(
        &mut self,
        link: &mut Link<ClientTls>,
        (ask, reply): (Ask, Reply),
        _: &mut Jobs<()>,
    ) -> Result<(), End> {
        let req = self.next_req;
        self.next_req += 1;
        tracing::debug!(?ask, "asking the global server");
        if let Err(e) = link.feed(&ask.frame(req)).await {
            let _ = reply.send(Err(DirError::Unavailable(e.to_string())));
            return Err(e.into());
        }
        self.pending.insert(req, reply);
        Ok(())
    }

    fn bad_frame(&self, why: &str) -> Option<String> {
        tracing::warn!("bad frame from the global server: {why}");
        None
    }
}
