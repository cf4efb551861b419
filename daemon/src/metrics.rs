//! Prometheus metrics of a home or the global server (`metrics:` in its
//! config section), served on a listener of their own; every metric is in
//! docs/metrics.md.
//!
//! On the message path a metric is one atomic add: each server holds its
//! counters as fields (prometheus-client's `Counter` is an `Arc` of an
//! atomic), labelled ones looked up once at start, so nothing there takes
//! a lock or allocates. Histograms (which do lock) are observed once per
//! store batch or sync, never per message. What is a level rather than a
//! count (connections, queue depths, store health) is read when scraped.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::task::Shutdown;

/// One label, `name="value"`.
pub type Label = [(&'static str, String); 1];

fn label(name: &'static str, value: &str) -> Label {
    [(name, value.to_owned())]
}

/// Why a message failed, as the `reason` label says it (a closed set, so
/// a label never grows without bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// The recipient does not take it (blocked, no such user, refused).
    NotAccepted,
    MailboxFull,
    /// Its home is revoked in the network.
    Revoked,
    /// No home took it within `limits.item_expiry`.
    Expired,
    Other,
}

impl FailReason {
    pub const ALL: [FailReason; 5] = [
        FailReason::NotAccepted,
        FailReason::MailboxFull,
        FailReason::Revoked,
        FailReason::Expired,
        FailReason::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FailReason::NotAccepted => "not_accepted",
            FailReason::MailboxFull => "mailbox_full",
            FailReason::Revoked => "revoked",
            FailReason::Expired => "expired",
            FailReason::Other => "other",
        }
    }

    /// The reason a sender is told, sorted. Runs only for failures.
    pub fn of(reason: Option<&str>) -> FailReason {
        let r = reason.unwrap_or("");
        if r == popupd_protocol::NOT_ACCEPTED || r.contains("no such user") {
            FailReason::NotAccepted
        } else if r == popupd_protocol::MAILBOX_FULL {
            FailReason::MailboxFull
        } else if r.contains("revoked") {
            FailReason::Revoked
        } else if r.contains("took nothing") || r.contains("expired") {
            FailReason::Expired
        } else {
            FailReason::Other
        }
    }
}

/// What one commit did to messages' states, counted in
/// `rules::Effects` on the store thread and added to the counters when
/// the commit's effects are applied: a job that rolls back counts nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub delivered: u32,
    pub failed: [u32; FailReason::ALL.len()],
}

impl Tally {
    /// A sent message's state moved to `state`.
    pub fn status(&mut self, state: popupd_protocol::Delivery, reason: Option<&str>) {
        match state {
            popupd_protocol::Delivery::Delivered => self.delivered += 1,
            popupd_protocol::Delivery::Failed => {
                let i = FailReason::ALL
                    .iter()
                    .position(|r| *r == FailReason::of(reason))
                    .unwrap_or(FailReason::ALL.len() - 1);
                self.failed[i] += 1;
            }
            _ => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Tally::default()
    }
}

/// The accept loop's counts (`accept::serve`), for home and global alike.
#[derive(Clone, Default)]
pub struct Accepts {
    /// TCP connections accepted.
    pub accepted: Counter,
    /// Refused at once: their address had `pending_per_address` already.
    pub over_address_cap: Counter,
    /// Accepted and not logged in yet.
    pub pending: Gauge,
}

/// The store thread's figures, as a `popupd_store::Observer`.
#[derive(Clone)]
pub struct StoreMetrics {
    batch_jobs: Histogram,
    batch_seconds: Histogram,
    sync_seconds: Histogram,
}

impl StoreMetrics {
    fn new() -> Self {
        StoreMetrics {
            // 1, 2, 4 … 2048 (MAX_BATCH).
            batch_jobs: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            // 100 µs to about 1.6 s.
            batch_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "store_batch_jobs",
            "Jobs committed together in one store transaction",
            self.batch_jobs.clone(),
        );
        r.register(
            "store_batch_seconds",
            "Time to run one batch of store jobs and commit it",
            self.batch_seconds.clone(),
        );
        r.register(
            "store_sync_seconds",
            "Time of one fsync of the store's write-ahead log (homes only)",
            self.sync_seconds.clone(),
        );
    }
}

impl popupd_store::Observer for StoreMetrics {
    fn batch(&self, jobs: usize, took: Duration) {
        self.batch_jobs.observe(jobs as f64);
        self.batch_seconds.observe(took.as_secs_f64());
    }
    fn synced(&self, took: Duration) {
        self.sync_seconds.observe(took.as_secs_f64());
    }
}

/// Levels read at each scrape.
#[derive(Default)]
pub struct Levels {
    /// Logged-in connections, by `kind` (`agent`, `peer`) and `pending`.
    pub connections: Family<Label, Gauge>,
    /// Items waiting in the forward queue, by `peer` home.
    pub queue: Family<Label, Gauge>,
    /// Items waiting for a route (no home known yet).
    pub unrouted: Gauge,
    /// Peer homes with a live link or a dialer.
    pub peer_links: Gauge,
    pub users_online: Gauge,
    pub devices_online: Gauge,
    pub store_waiting: Gauge,
    pub store_last_commit_age: Gauge<f64, AtomicU64>,
    pub store_failed_commits: Gauge,
    pub db_bytes: Family<Label, Gauge>,
    /// Expiry of each certificate, by `file`, in seconds since the epoch.
    pub cert_expiry: Family<Label, Gauge>,
}

/// Reads counts kept elsewhere as plain atomics, by label value.
type Read = Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// A labelled counter whose values live elsewhere (the presence hub's
/// atomics), read when scraped.
struct Pulled {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    read: Read,
}

impl std::fmt::Debug for Pulled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl prometheus_client::collector::Collector for Pulled {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let mut m = e.encode_descriptor(
            self.name,
            self.help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (value, n) in (self.read)() {
            let labels = [(self.label, value)];
            prometheus_client::metrics::counter::ConstCounter::new(n)
                .encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// A server's metrics. Home and global share it; the global server leaves
/// the home's counters at zero and does not register them.
pub struct Metrics {
    /// Locked only to add a collector and to scrape.
    registry: std::sync::Mutex<Registry>,
    pub accepts: Accepts,
    pub store: StoreMetrics,
    pub logins_ok: Counter,
    pub logins_failed: Counter,
    pub logins_throttled: Counter,
    pub logins_busy: Counter,
    pub messages_accepted: Counter,
    pub messages_delivered: Counter,
    messages_failed: [Counter; FailReason::ALL.len()],
    pub rate_limited_send: Counter,
    pub rate_limited_contact: Counter,
    pub rate_limited_peer: Counter,
    /// Lookups the global server answered.
    pub lookups: Counter,
    pub levels: Levels,
    start: Gauge,
}

/// Which server the metrics are of.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Of {
    Home,
    Global,
}

/// Labelled counters: the family, and each series (a clone shares its
/// atomic) for the code that counts.
fn counters<const N: usize>(
    name: &'static str,
    values: [&str; N],
) -> (Family<Label, Counter>, [Counter; N]) {
    let f = Family::<Label, Counter>::default();
    let series = values.map(|v| f.get_or_create(&label(name, v)).clone());
    (f, series)
}

impl Metrics {
    pub fn new(of: Of) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("popupd");
        let (logins, [logins_ok, logins_failed, logins_throttled, logins_busy]) =
            counters("outcome", ["ok", "auth_failed", "throttled", "busy"]);
        let (failed, messages_failed) = counters("reason", FailReason::ALL.map(FailReason::label));
        let (limited, [rate_limited_send, rate_limited_contact, rate_limited_peer]) =
            counters("limit", ["send", "contact", "peer"]);
        let m = Metrics {
            registry: Default::default(),
            accepts: Accepts::default(),
            store: StoreMetrics::new(),
            logins_ok,
            logins_failed,
            logins_throttled,
            logins_busy,
            messages_accepted: Counter::default(),
            messages_delivered: Counter::default(),
            messages_failed,
            rate_limited_send,
            rate_limited_contact,
            rate_limited_peer,
            lookups: Counter::default(),
            levels: Levels::default(),
            start: Gauge::default(),
        };
        m.start.set(popupd_protocol::now_ms() / 1000);
        // Labelled levels exist from the start, at zero.
        for kind in ["agent", "peer", "pending"] {
            let _ = m.levels.connections.get_or_create(&label("kind", kind));
        }
        let r = &mut registry;
        r.register(
            "start_time_seconds",
            "When this server started, in seconds since the Unix epoch",
            m.start.clone(),
        );
        r.register(
            "connections_accepted",
            "TCP connections accepted on the server's port",
            m.accepts.accepted.clone(),
        );
        r.register(
            "connections_refused_per_address",
            "Connections closed at once: their address had limits.pending_per_address not logged in yet",
            m.accepts.over_address_cap.clone(),
        );
        r.register(
            "connections",
            "Connections held now, by kind: agent and peer (logged in), pending (not logged in yet)",
            m.levels.connections.clone(),
        );
        m.store.register(r);
        r.register(
            "store_waiting_jobs",
            "Store jobs submitted and not yet taken into a batch",
            m.levels.store_waiting.clone(),
        );
        r.register(
            "store_last_commit_age_seconds",
            "Time since the store last committed (-1 before the first commit)",
            m.levels.store_last_commit_age.clone(),
        );
        r.register(
            "store_failed_commits",
            "Store commits that failed since start",
            m.levels.store_failed_commits.clone(),
        );
        r.register(
            "store_file_bytes",
            "Size of the database files, by file: db, wal",
            m.levels.db_bytes.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "When each certificate the server uses expires (seconds since the Unix epoch), by file",
            m.levels.cert_expiry.clone(),
        );
        match of {
            Of::Global => {
                r.register(
                    "global_lookups",
                    "Lookups the global server answered since start",
                    m.lookups.clone(),
                );
            }
            Of::Home => {
                r.register(
                    "logins",
                    "Agent logins, by outcome: ok, auth_failed (unknown handle, device or secret), throttled (refused unheard after failures), busy (max_connections)",
                    logins,
                );
                r.register(
                    "messages_failed",
                    "Messages of this home's users that failed, by reason: not_accepted, mailbox_full, revoked, expired, other",
                    failed,
                );
                r.register(
                    "rate_limited",
                    "Refusals and holds by a rate limit, by limit: send and contact (a message or contact change answered rate_limited), peer (a peer home's link held past peer_rate)",
                    limited,
                );
                m.register_home(r);
            }
        }
        Arc::new(Metrics {
            registry: std::sync::Mutex::new(registry),
            ..m
        })
    }

    fn register_home(&self, r: &mut Registry) {
        r.register(
            "messages_accepted",
            "Messages this home's users sent that it stored (accepted), repeats not counted",
            self.messages_accepted.clone(),
        );
        r.register(
            "messages_delivered",
            "Messages of this home's users that reached a device of their recipient",
            self.messages_delivered.clone(),
        );
        r.register(
            "forward_queue_items",
            "Items waiting in the forward queue for a peer home, by peer",
            self.levels.queue.clone(),
        );
        r.register(
            "forward_queue_unrouted_items",
            "Items in the forward queue waiting for the global server to say where their recipient lives",
            self.levels.unrouted.clone(),
        );
        r.register(
            "peer_links",
            "Peer homes with a live link or a dialer",
            self.levels.peer_links.clone(),
        );
        r.register(
            "users_online",
            "Users with at least one device connected",
            self.levels.users_online.clone(),
        );
        r.register(
            "devices_online",
            "Devices connected",
            self.levels.devices_online.clone(),
        );
    }

    /// Registers the presence fan-out counters, which `read` reads from
    /// the hub when scraped (changes, to agents, to peers).
    pub fn presence(&self, read: impl Fn() -> (u64, u64, u64) + Send + Sync + 'static) {
        let read: Read = Box::new(move || {
            let (c, a, p) = read();
            vec![("changes", c), ("to_agents", a), ("to_peers", p)]
        });
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_collector(Box::new(Pulled {
                name: "presence_events",
                help: "Presence fan-out since start, by kind: changes (of what a user shows), to_agents (frames sent to agents), to_peers (frames sent to other homes)",
                label: "kind",
                read,
            }));
    }

    /// Counts what a commit did to messages' states.
    pub fn count(&self, t: &Tally) {
        if t.delivered > 0 {
            self.messages_delivered.inc_by(t.delivered.into());
        }
        for (c, n) in self.messages_failed.iter().zip(t.failed) {
            if n > 0 {
                c.inc_by(n.into());
            }
        }
    }

    /// Sets the store's levels from its health and files.
    pub fn store_levels(&self, h: &popupd_store::Health, files: &[(&str, u64)]) {
        let l = &self.levels;
        l.store_waiting.set(h.waiting() as i64);
        l.store_failed_commits.set(h.failed_commits() as i64);
        l.store_last_commit_age
            .set(h.last_commit_ms().map_or(-1.0, |t| {
                (popupd_protocol::now_ms() - t).max(0) as f64 / 1000.0
            }));
        for (file, bytes) in files {
            l.db_bytes
                .get_or_create(&label("file", file))
                .set(*bytes as i64);
        }
    }

    /// The metrics as text: OpenMetrics, or (`openmetrics` false) the
    /// Prometheus text format 0.0.4, which names a counter's family with its
    /// `_total` and has no `# EOF` (what `promtool check metrics` and
    /// older scrapers read).
    pub fn render(&self, openmetrics: bool) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String does not fail.
        let _ = encode(
            &mut out,
            &self.registry.lock().unwrap_or_else(|e| e.into_inner()),
        );
        if openmetrics {
            return out;
        }
        to_text_004(&out)
    }
}

/// OpenMetrics text to Prometheus text 0.0.4: counters' `# HELP` and
/// `# TYPE` name the `_total` series, and `# UNIT` and `# EOF` go.
fn to_text_004(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 64);
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Most scrapes served at once; more wait in the kernel's backlog.
const SCRAPES: usize = 4;
/// A scrape's request must arrive, and its answer leave, within this.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head read.
const MAX_REQUEST: usize = 8192;

/// Binds `addr` for [`serve`]; an error names the field.
pub async fn bind(addr: SocketAddr, server: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("{server}: cannot listen on {addr} for metrics (field `metrics`): {e}")
    })
}

/// Serves `GET /metrics` on `listener` until `shutdown`; `refresh` sets
/// the levels before each scrape.
///
/// A GET-only HTTP/1.1 responder of its own, not hyper: hyper is not among
/// the dependencies, and a scrape is one request, one answer and a close,
/// which this does in a hundred lines where hyper would add a dozen crates
/// to a from-scratch build.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    refresh: F,
    shutdown: Shutdown,
) where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(SCRAPES));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
        };
        let (mut tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("metrics: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (metrics, refresh) = (metrics.clone(), refresh.clone());
        tasks.spawn(async move {
            let _slot = slot;
            let answered = tokio::time::timeout(SCRAPE_TIMEOUT, async {
                let answer = match read_head(&mut tcp).await {
                    Some(head) => respond(&head, &metrics, refresh).await,
                    None => reply(400, "text/plain", "bad request\n"),
                };
                tcp.write_all(&answer).await?;
                tcp.shutdown().await
            })
            .await;
            if let Ok(Err(e)) = answered {
                tracing::debug!(%addr, "metrics: {e}");
            }
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
}

/// The request head (up to the blank line), if it came whole.
async fn read_head(tcp: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while buf.len() < MAX_REQUEST {
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return String::from_utf8(buf).ok();
        }
    }
    None
}

async fn respond<F, Fut>(head: &str, metrics: &Metrics, refresh: F) -> Vec<u8>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return reply(405, "text/plain", "only GET\n");
    }
    if path != "/metrics" {
        return reply(404, "text/plain", "metrics are at /metrics\n");
    }
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    refresh().await;
    let body = metrics.render(openmetrics);
    let kind = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    let mut r = reply(200, kind, &body);
    if method == "HEAD" {
        let end = r
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(r.len(), |p| p + 4);
        r.truncate(end);
    }
    r
}

fn reply(status: u16, kind: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let mut r = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body.as_bytes());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_004_names_counters_with_total() {
        let m = Metrics::new(Of::Home);
        m.messages_accepted.inc();
        let om = m.render(true);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE popupd_messages_accepted counter"));
        let t = m.render(false);
        assert!(
            t.contains("# TYPE popupd_messages_accepted_total counter"),
            "{t}"
        );
        assert!(t.contains("# HELP popupd_messages_accepted_total "), "{t}");
        assert!(t.contains("popupd_messages_accepted_total 1"), "{t}");
        assert!(!t.contains("# EOF"));
    }

    #[test]
    fn a_tally_counts_by_reason() {
        let m = Metrics::new(Of::Home);
        let mut t = Tally::default();
        assert!(t.is_empty());
        t.status(popupd_protocol::Delivery::Delivered, None);
        t.status(
            popupd_protocol::Delivery::Failed,
            Some(popupd_protocol::MAILBOX_FULL),
        );
        t.status(
            popupd_protocol::Delivery::Failed,
            Some("not delivered: home-b.example.org is revoked in the network"),
        );
        m.count(&t);
        let text = m.render(false);
        assert!(text.contains("popupd_messages_delivered_total 1"), "{text}");
        assert!(
            text.contains(r#"popupd_messages_failed_total{reason="mailbox_full"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"popupd_messages_failed_total{reason="revoked"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"popupd_messages_failed_total{reason="expired"} 0"#),
            "{text}"
        );
    }
}
