//! `popupd-bench`: figures for the messaging core, printed as a table.
//!
//! Starts a real network (global server and two homes as separate `popupd`
//! processes, durable SQLite storage) on loopback and measures:
//!
//! 1. `throughput`: senders on home A, recipients on home B, speaking the
//!    real agent protocol over TLS WebSockets (no D-Bus): messages/s
//!    accepted and delivered end to end, server CPU per message, and
//!    latency from send to the recipient's receipt.
//! 2. `latency`: two real agents with private D-Bus buses; `Send` over D-Bus
//!    at a fixed rate, timed to the recipient agent's `MessageReceived`.
//!
//! 3. `agent`: one real agent with its plugins: memory, and time to popup.
//! 4. `idle`: idle back connections on one home (memory, login rate, CPU).
//! 5. `presence`: users over two homes, all contacts online, presence
//!    changes at a fixed rate: latency to every watcher, server-to-server
//!    frames and CPU per change.
//!
//! Every phase is bounded in count and time and stops by itself. Build
//! with `--release`: `cargo build --release --workspace && target/release/popupd-bench`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use popupd_e2e::{Agent, HOME_A, HOME_B, Network, TestDir, secret_of};
use popupd_protocol::net::{self, Dial, Recv, tls};
use popupd_protocol::{AGENT_PATH, AgentFrame, Event, HomeFrame, PROTOCOL_VERSION, new_id};

mod abuse;
mod faults;
mod offline;
mod presence;
mod report;
mod storm;

struct Args {
    /// Recipients on the senders' home instead of the other one.
    one_home: bool,
    /// Home A on PostgreSQL.
    postgres: bool,
    /// Home A on this many nodes (PostgreSQL and NATS); 0: one process.
    nodes: usize,
    /// Idle-connection sizes, cumulative.
    sizes: Vec<usize>,
    senders: usize,
    recipients: usize,
    messages: usize,
    rate: u64,
    /// `--rate` was given (presence defaults to 1000 changes/s otherwise).
    rate_set: bool,
    seconds: u64,
    /// Presence: users over both homes, and contacts each.
    users: usize,
    contacts: usize,
    only: Option<String>,
    /// `--messages` was given (offline defaults to 20,000 otherwise).
    messages_set: bool,
    /// Fault rounds per process.
    rounds: usize,
    json: Option<std::path::PathBuf>,
}

/// Figures for the messaging core, printed as tables; see the module docs
/// and docs/performance.md.
#[derive(clap::Parser)]
#[command(name = "popupd-bench")]
struct Cli {
    /// The scenario (default: throughput, latency and agent).
    #[arg(value_enum)]
    scenario: Option<Scenario>,
    /// Recipients on the senders' home instead of the other one.
    #[arg(long)]
    one_home: bool,
    /// Home A keeps its records in a PostgreSQL server of the bench's own
    /// (throughput), whose CPU per message is shown beside the home's.
    #[arg(long)]
    postgres: bool,
    /// Home A runs as this many nodes over one PostgreSQL and a NATS server
    /// of the bench's own (throughput, storm); each node's CPU per message
    /// is shown, and PostgreSQL's and NATS's (and without --one-home, home
    /// B's, on SQLite, in the same run). Implies --postgres.
    #[arg(long, default_value_t = 0)]
    nodes: usize,
    /// Idle connections held (idle), cumulative sizes.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    connections: Vec<usize>,
    /// Sending agents (throughput).
    #[arg(long, default_value_t = 10)]
    senders: usize,
    /// Receiving agents (throughput).
    #[arg(long, default_value_t = 10)]
    recipients: usize,
    /// Messages (throughput: 50000; offline: 20000; faults: per round, 100).
    #[arg(long)]
    messages: Option<usize>,
    /// Messages (or presence changes) a second, offered evenly.
    #[arg(long)]
    rate: Option<u64>,
    /// How long a paced run lasts.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Presence: users over both homes; storm: agents held.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Presence: contacts each (half on the other home).
    #[arg(long, default_value_t = 50)]
    contacts: usize,
    /// Faults: rounds per process.
    #[arg(long, default_value_t = 100)]
    rounds: usize,
    /// Writes every figure as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Draws SVG charts here (latency distribution, RSS against connections).
    #[arg(long)]
    plots: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Scenario {
    Throughput,
    Latency,
    Agent,
    Idle,
    Presence,
    Offline,
    Storm,
    Faults,
    Abuse,
}

fn parse_args() -> anyhow::Result<Args> {
    use clap::{Parser, ValueEnum};
    let c = Cli::parse();
    if let Some(dir) = c.plots {
        report::set_plots(dir);
    }
    Ok(Args {
        one_home: c.one_home,
        postgres: c.postgres || c.nodes > 0,
        nodes: c.nodes,
        sizes: c.connections,
        senders: c.senders,
        recipients: c.recipients,
        messages: c.messages.unwrap_or(50_000),
        messages_set: c.messages.is_some(),
        rate: c.rate.unwrap_or(100),
        rate_set: c.rate.is_some(),
        seconds: c.seconds,
        users: c.users,
        contacts: c.contacts,
        rounds: c.rounds,
        only: c
            .scenario
            .and_then(|s| s.to_possible_value())
            .map(|v| v.get_name().to_owned()),
        json: c.json,
    })
}

/// The clock the simulated agents' send times (`t=MICROS`) count from.
pub(crate) static BASE: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

pub(crate) fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Logs in at `address` (a home, or one node of it).
async fn login_at(
    address: &str,
    name: &str,
    handle: &str,
    secret: &str,
    ca: &std::path::Path,
) -> anyhow::Result<net::Link<net::ClientTls>> {
    let mut link = net::dial(&Dial {
        address: address.to_owned(),
        name: name.into(),
        path: AGENT_PATH,
        tls: tls::client_config(tls::roots_from(ca)?, None)?,
        proxy: None,
    })
    .await?;
    link.send(&AgentFrame::Hello {
        v: PROTOCOL_VERSION,
        handle: handle.into(),
        device: "desktop".into(),
        secret: secret.into(),
        presence: None,
    })
    .await?;
    match link.recv::<HomeFrame>().await? {
        Recv::Frame(HomeFrame::Welcome { .. }) => Ok(link),
        other => bail!("login {handle}: {other:?}"),
    }
}

async fn throughput(a: &Args) -> anyhow::Result<()> {
    let dir = TestDir::new("bench-throughput");
    let mut layout = popupd_e2e::Layout {
        idle_timeout: "10s".into(),
        home_yaml: popupd_e2e::LOAD_LIMITS.into(),
        ..Default::default()
    };
    let mut cluster = None;
    let mut pg = None;
    let mut single = None;
    if a.nodes > 0 {
        cluster = Some(
            popupd_e2e::cluster::Cluster::start_laid_out(&dir.path, "bench", a.nodes, layout)
                .await
                .context("--nodes needs PostgreSQL and nats-server")?,
        );
    } else {
        if a.postgres {
            let s = popupd_e2e::pg::TestServer::start(
                &dir.path.join("pg"),
                &dir.path.join("postgres.log"),
            )
            .map_err(|e| anyhow::anyhow!("--postgres: {e}"))?;
            layout.homes[0].yaml = popupd_e2e::pg::storage_yaml(&s, "home0")?;
            pg = Some(s);
        }
        single = Some(Network::start_laid_out(&dir.path, layout).await?);
    }
    let net: &Network = match (&cluster, &single) {
        (Some(c), _) => &c.net,
        (None, Some(n)) => n,
        (None, None) => unreachable!("one of the two was started"),
    };
    let pg = pg.as_ref().or(cluster.as_ref().map(|c| &c.pg));
    // Where each agent logs in: home A's nodes in turn (a recipient one
    // node on from its sender, so that most messages cross nodes), or the
    // home's one address.
    let node_addrs: Vec<String> = match &cluster {
        Some(c) => c.addrs.clone(),
        None => Vec::new(),
    };
    let at = |home: usize, k: usize| -> String {
        if home != 0 || node_addrs.is_empty() {
            net.home_addrs[home].clone()
        } else {
            node_addrs[k % node_addrs.len()].clone()
        }
    };
    let ca = dir.path.join("pki/ca.crt");
    let rhome = if a.one_home { 0 } else { 1 };
    let mut senders = Vec::new();
    for i in 0..a.senders {
        senders.push((
            format!("s{i}"),
            secret_of(&net.add_user(0, &format!("s{i}"))?)?,
        ));
    }
    let mut recips = Vec::new();
    for i in 0..a.recipients {
        recips.push((
            format!("r{i}"),
            secret_of(&net.add_user(rhome, &format!("r{i}"))?)?,
        ));
    }
    // With --rate the senders together offer that many messages a second
    // (for --seconds), by the clock; without it, as fast as home A accepts.
    let paced = a
        .rate_set
        .then(|| Duration::from_secs_f64(a.senders.max(1) as f64 / a.rate.max(1) as f64));
    let messages = if a.rate_set {
        (a.rate * a.seconds) as usize
    } else {
        a.messages
    };
    let per_sender = messages / a.senders.max(1);
    let total = per_sender * a.senders;
    let base = Instant::now();
    let deadline = Duration::from_secs(120);
    let lat = Arc::new(Mutex::new(Vec::with_capacity(total)));
    // Send → `accepted` (on disk at home A), per message.
    let acc_lat = Arc::new(Mutex::new(Vec::with_capacity(total)));

    // Recipients: store nothing, ack everything, note latencies.
    let mut rtasks = Vec::new();
    for (j, (h, s)) in recips.iter().enumerate() {
        let mut link = login_at(&at(rhome, j + 1), [HOME_A, HOME_B][rhome], h, s, &ca).await?;
        let lat = lat.clone();
        rtasks.push(tokio::spawn(async move {
            let mut got = 0usize;
            while let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(20), link.recv::<HomeFrame>()).await
            {
                // Like the agent: take what is ready, then one cumulative ack.
                let mut next = Some(r);
                let mut last = None;
                while let Some(r) = next.take() {
                    if let Recv::Frame(HomeFrame::Event { seq, event }) = r {
                        if let Event::Message(m) = event {
                            if let Some(t) = m
                                .text
                                .strip_prefix("t=")
                                .and_then(|x| x.parse::<u64>().ok())
                            {
                                let now = base.elapsed().as_micros() as u64;
                                lat.lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(Duration::from_micros(now.saturating_sub(t)));
                            }
                            got += 1;
                        }
                        last = Some(seq);
                    }
                    next = futures_util::FutureExt::now_or_never(link.recv::<HomeFrame>())
                        .and_then(Result::ok);
                }
                if let Some(seq) = last
                    && link.send(&AgentFrame::Ack { seq }).await.is_err()
                {
                    break;
                }
            }
            got
        }));
    }

    // Every sender logs in before the clock starts: one that came later
    // would owe the messages due meanwhile and send them in a burst.
    let mut links = Vec::with_capacity(senders.len());
    for (i, (h, s)) in senders.iter().enumerate() {
        links.push(login_at(&at(0, i), HOME_A, h, s, &ca).await?);
    }
    let nodes_cpu = |c: &popupd_e2e::cluster::Cluster| -> Vec<Duration> {
        c.more.iter().map(|p| p.cpu_time()).collect()
    };
    let cpu0: Vec<Duration> = net.homes.iter().map(|h| h.cpu_time()).collect();
    let more0 = cluster.as_ref().map(nodes_cpu).unwrap_or_default();
    let nats0 = cluster.as_ref().map(|c| c.nats.proc.cpu_time());
    let pg_cpu0 = pg.map(|s| s.cpu_time());
    let t0 = Instant::now();
    let mut stasks = Vec::new();
    for (i, mut link) in links.into_iter().enumerate() {
        let n = a.recipients.max(1);
        let senders_n = a.senders.max(1);
        let acc_lat = acc_lat.clone();
        stasks.push(tokio::spawn(async move {
            // Answers come in the order sent.
            let mut in_flight = std::collections::VecDeque::with_capacity(WINDOW);
            let mut acc = Vec::with_capacity(per_sender);
            let mut sent = 0usize;
            let mut accepted = 0usize;
            const WINDOW: usize = 512;
            // Message k of sender i is due at t0 + (k + i/senders) × interval:
            // the senders take turns, so the home sees an even stream rather
            // than every sender's message in the same instant.
            let mut ack = None;
            let phase = i as f64 / senders_n as f64;
            let due = |k: usize| paced.map(|iv| t0 + iv.mul_f64(k as f64 + phase));
            'run: while accepted < per_sender && t0.elapsed() < deadline {
                while sent < per_sender
                    && sent - accepted < WINDOW
                    && due(sent).is_none_or(|d| Instant::now() >= d)
                {
                    let to = format!("r{}", (i + sent) % n);
                    let text = format!("t={}", base.elapsed().as_micros());
                    if link
                        .feed(&AgentFrame::Send {
                            id: new_id(),
                            from: None,
                            to,
                            text,
                            reply_to: None,
                        })
                        .await
                        .is_err()
                    {
                        break 'run;
                    }
                    in_flight.push_back(Instant::now());
                    sent += 1;
                }
                // Like an agent, it acks the status receipts it is pushed.
                if let Some(seq) = ack.take()
                    && link.feed(&AgentFrame::Ack { seq }).await.is_err()
                {
                    break 'run;
                }
                if link.flush().await.is_err() {
                    break 'run;
                }
                let next = due(sent).filter(|_| sent < per_sender && sent - accepted < WINDOW);
                if sent == accepted {
                    // Nothing in flight: wait for the next one to be due.
                    if let Some(d) = next {
                        tokio::time::sleep_until(d.into()).await;
                    }
                    continue;
                }
                tokio::select! {
                    r = tokio::time::timeout(Duration::from_secs(20), link.recv::<HomeFrame>()) => match r {
                        Ok(Ok(Recv::Frame(HomeFrame::Accepted { .. }))) => {
                            accepted += 1;
                            if let Some(t) = in_flight.pop_front() {
                                acc.push(t.elapsed());
                            }
                        }
                        Ok(Ok(Recv::Frame(HomeFrame::Event { seq, .. }))) => ack = Some(seq),
                        Ok(Ok(_)) => {}
                        _ => break 'run,
                    },
                    _ = tokio::time::sleep_until(next.unwrap_or(t0 + deadline).into()), if next.is_some() => {}
                }
            }
            acc_lat.lock().unwrap_or_else(|e| e.into_inner()).extend(acc);
            accepted
        }));
    }
    let mut accepted = 0;
    for t in stasks {
        accepted += t.await?;
    }
    let t_acc = t0.elapsed();
    // Wait for delivery of everything accepted (bounded).
    while lat.lock().unwrap_or_else(|e| e.into_inner()).len() < accepted && t0.elapsed() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t_del = t0.elapsed();
    let cpu: Vec<Duration> = net
        .homes
        .iter()
        .zip(&cpu0)
        .map(|(h, c)| h.cpu_time().saturating_sub(*c))
        .collect();
    let pg_cpu = pg.zip(pg_cpu0).map(|(s, c)| s.cpu_time().saturating_sub(c));
    let more: Vec<Duration> = cluster
        .as_ref()
        .map(nodes_cpu)
        .unwrap_or_default()
        .iter()
        .zip(&more0)
        .map(|(n, c)| n.saturating_sub(*c))
        .collect();
    let nats_cpu = cluster
        .as_ref()
        .zip(nats0)
        .map(|(c, n0)| c.nats.proc.cpu_time().saturating_sub(n0));
    let mut acc = acc_lat.lock().unwrap_or_else(|e| e.into_inner()).clone();
    acc.sort();
    let mut l = lat.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let delivered = l.len();
    l.sort();
    for t in rtasks {
        t.abort();
    }
    let mut scenario = match (a.one_home, a.rate_set) {
        (true, true) => format!("throughput-one-home-{}", a.rate),
        (true, false) => "throughput-one-home".to_string(),
        (false, true) => format!("throughput-{}", a.rate),
        (false, false) => "throughput".to_string(),
    };
    if a.nodes > 0 {
        scenario.push_str(&format!("-{}-nodes", a.nodes));
    } else if a.postgres {
        scenario.push_str("-postgres");
    }
    let mut t = report::Table::new(
        &scenario,
        &format!(
            "throughput: {} senders on {HOME_A} → {} recipients on {}, 100-byte-ish messages, fsync'd group commit, {HOME_A} on {}",
            a.senders,
            a.recipients,
            [HOME_A, HOME_B][rhome],
            if a.nodes > 0 {
                format!(
                    "{} nodes over PostgreSQL and NATS ({})",
                    a.nodes,
                    if a.one_home {
                        "each recipient on the node after its sender's"
                    } else {
                        "the senders spread over them; home B one process on SQLite"
                    }
                )
            } else if a.postgres {
                "PostgreSQL".into()
            } else {
                "SQLite".into()
            },
        ),
    );
    t.text("messages accepted", &format!("{accepted} of {total}"));
    let per_s = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let per_msg = |c: Duration, n: usize| c.as_micros() as f64 / n.max(1) as f64;
    t.row(
        "accepted/s (home A, durable)",
        per_s(accepted, t_acc),
        "msg/s",
        &format!("{:.0}", per_s(accepted, t_acc)),
    );
    t.row(
        "delivered/s end to end",
        per_s(delivered, t_del),
        "msg/s",
        &format!("{:.0}", per_s(delivered, t_del)),
    );
    if a.nodes > 0 {
        let nodes: Vec<Duration> = [cpu[0]].into_iter().chain(more.iter().copied()).collect();
        for (k, c) in nodes.iter().enumerate() {
            t.row(
                &format!("node n{} CPU per message", k + 1),
                per_msg(*c, accepted),
                "µs",
                &format!("{:.1} µs", per_msg(*c, accepted)),
            );
        }
        let all: Duration = nodes.iter().sum();
        t.row(
            "home A CPU per message, all nodes",
            per_msg(all, accepted),
            "µs",
            &format!("{:.1} µs", per_msg(all, accepted)),
        );
    } else {
        t.row(
            "home A CPU per message",
            per_msg(cpu[0], accepted),
            "µs",
            &format!("{:.1} µs", per_msg(cpu[0], accepted)),
        );
    }
    if let Some(c) = nats_cpu {
        t.row(
            "NATS CPU per message",
            per_msg(c, accepted),
            "µs",
            &format!("{:.1} µs", per_msg(c, accepted)),
        );
    }
    if let Some(c) = pg_cpu {
        t.row(
            "PostgreSQL CPU per message (home A's)",
            per_msg(c, accepted),
            "µs",
            &format!("{:.1} µs", per_msg(c, accepted)),
        );
    }
    if !a.one_home {
        t.row(
            "home B CPU per message",
            per_msg(cpu[1], delivered),
            "µs",
            &format!("{:.1} µs", per_msg(cpu[1], delivered)),
        );
    }
    let offered = if a.rate_set {
        format!("{} msg/s offered", a.rate)
    } else {
        "at saturation".to_string()
    };
    for (what, l) in [("send → receive", &l), ("send → accepted (on disk)", &acc)] {
        t.text(
            &format!("{what} latency p50 / p99 / p999 / max ({offered})"),
            &format!(
                "{} / {} / {} / {}",
                ms(pct(l, 0.5)),
                ms(pct(l, 0.99)),
                ms(pct(l, 0.999)),
                ms(pct(l, 1.0))
            ),
        );
        for (name, p) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            report::record(
                &scenario,
                &format!("{what} latency {name}"),
                pct(l, p).as_secs_f64() * 1000.0,
                "ms",
            );
        }
    }
    t.finish()?;
    // The latency distribution: share of messages at or under each latency.
    let cdf = |l: &[Duration]| -> Vec<(f64, f64)> {
        (0..=200)
            .map(|i| {
                let q = i as f64 / 200.0;
                (pct(l, q).as_secs_f64() * 1000.0, q * 100.0)
            })
            .collect()
    };
    report::plot(
        &format!("latency-{scenario}"),
        &format!("Latency distribution, {offered}"),
        "latency (ms)",
        "% of messages at or under",
        &[
            report::Series {
                name: "send → recipient has it".into(),
                points: cdf(&l),
            },
            report::Series {
                name: "send → accepted (on disk)".into(),
                points: cdf(&acc),
            },
        ],
    )?;
    if delivered != accepted {
        bail!("{accepted} accepted but {delivered} delivered");
    }
    Ok(())
}

async fn latency(a: &Args) -> anyhow::Result<()> {
    let dir = TestDir::new("bench-latency");
    let (_net, alice, bob) = popupd_e2e::two_people(&dir.path, "", "").await;
    let got = arrivals(&bob, |id, _| id.to_string()).await?;
    let p = alice.proxy().await?;
    // Warm up the route and the peer link.
    p.send("bob", "warm-up").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = (a.rate * a.seconds) as usize;
    let mut sent = Vec::with_capacity(n);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / a.rate.max(1)));
    for i in 0..n {
        tick.tick().await;
        let t = Instant::now();
        let id = p.send("bob", &format!("ping {i}")).await?;
        sent.push((id, t));
    }
    let end = Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap_or_else(|e| e.into_inner()).len() < n + 1 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let g = got.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut l: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, t)| g.get(id).map(|r| r.duration_since(*t)))
        .collect();
    l.sort();
    println!(
        "\n## latency: D-Bus Send on alice's agent → MessageReceived on bob's agent, {} msg/s for {} s, across two homes",
        a.rate, a.seconds
    );
    println!("| figure | value |\n|---|---|");
    println!("| messages | {} sent, {} received |", n, l.len());
    println!(
        "| p50 / p99 / max | {} / {} / {} |",
        ms(pct(&l, 0.5)),
        ms(pct(&l, 0.99)),
        ms(pct(&l, 1.0))
    );
    if l.len() != n {
        bail!("{} of {n} messages arrived", l.len());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    popupd_protocol::net::tls::install_default_provider();
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return worker().await;
    }
    if std::env::args().nth(1).as_deref() == Some("presence-worker") {
        return presence::worker().await;
    }
    if std::env::args().nth(1).as_deref() == Some("silent-worker") {
        return abuse::silent_worker().await;
    }
    let a = parse_args()?;
    // Measure daemons as installed: a home logs at info by default, while
    // the tests' debug level writes a line per message. The presence
    // scenario reads the counters the hub logs at debug.
    popupd_e2e::set_log_filter("info,zbus=warn,popupd::home::counters=debug");
    println!(
        "popupd-bench on {} cores, commit {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    );
    if a.only.is_none() || a.only.as_deref() == Some("throughput") {
        throughput(&a).await?;
    }
    if a.only.is_none() || a.only.as_deref() == Some("latency") {
        latency(&a).await?;
    }
    if a.only.is_none() || a.only.as_deref() == Some("agent") {
        agent_cost().await?;
    }
    if a.only.as_deref() == Some("idle") {
        idle(&a).await?;
    }
    if a.only.as_deref() == Some("presence") {
        presence::run(&a).await?;
    }
    if a.only.as_deref() == Some("storm") {
        storm::run(&a).await?;
    }
    if a.only.as_deref() == Some("abuse") {
        abuse::run(&a).await?;
    }
    if a.only.as_deref() == Some("faults") {
        faults::run(&a).await?;
    }
    if a.only.as_deref() == Some("offline") {
        let mut a = a;
        if !a.messages_set {
            a.messages = 20_000;
        }
        offline::run(&a).await?;
        if let Some(j) = &a.json {
            report::write_json(j)?;
        }
        return Ok(());
    }
    if let Some(j) = &a.json {
        report::write_json(j)?;
    }
    Ok(())
}

/// When each `MessageReceived` of `agent` was seen, by `key(id, text)`.
async fn arrivals(
    agent: &Agent,
    key: fn(&str, &str) -> String,
) -> anyhow::Result<Arc<Mutex<HashMap<String, Instant>>>> {
    let got: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut rx = agent.proxy().await?.receive_message_received().await?;
    let g = got.clone();
    tokio::spawn(async move {
        while let Some(s) = rx.next().await {
            if let Ok(a) = s.args() {
                g.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key(a.id, a.text), Instant::now());
            }
        }
    });
    Ok(got)
}

/// A notification server that notes when each popup was asked for.
struct Stopwatch {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl Stopwatch {
    fn get_capabilities(&self) -> Vec<String> {
        vec!["body".into(), "actions".into()]
    }
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        _app: String,
        _replaces: u32,
        _icon: String,
        _summary: String,
        body: String,
        _actions: Vec<String>,
        _hints: HashMap<String, zbus::wire::OwnedVariant>,
        _timeout: i32,
    ) -> u32 {
        let now = Instant::now();
        let last = body.lines().last().unwrap_or_default().to_string();
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(last, now);
        1
    }
    fn close_notification(&self, _id: u32) {}
}

/// A `/proc/PID/status` figure in KiB (`VmRSS`, `RssAnon`, `RssFile`).
fn status_kib(pid: u32, field: &str) -> u64 {
    status_field(format!("/proc/{pid}/status"), field)
}

/// The number after `FIELD:` in a `/proc` status file, 0 if absent.
fn status_field(path: impl AsRef<std::path::Path>, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Makes accounts PREFIX0.. PREFIX{n-1} on home `home` with `popupd user
/// add-many`; returns the file of their credentials (handle, device,
/// secret per line, as the load workers read them).
pub(crate) fn add_many(
    net: &Network,
    dir: &TestDir,
    home: usize,
    prefix: &str,
    n: usize,
) -> anyhow::Result<std::path::PathBuf> {
    let out = std::process::Command::new(popupd_e2e::bin("popupd"))
        .args(["user", "add-many", prefix, &n.to_string(), "-c"])
        .arg(net.home_config(home))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "add-many: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let creds = dir.path.join(format!("creds-{prefix}.tsv"));
    std::fs::write(&creds, &out.stdout)?;
    Ok(creds)
}

/// Context switches of every thread of `pid` so far: how often it woke.
fn wakeups(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|t| {
            let st = t.path().join("status");
            status_field(&st, "voluntary_ctxt_switches")
                + status_field(&st, "nonvoluntary_ctxt_switches")
        })
        .sum()
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// One agent with its plugins: resident memory idle, and the time from the
/// agent's `MessageReceived` (the message is stored) to the popup's `Notify`.
async fn agent_cost() -> anyhow::Result<()> {
    let dir = TestDir::new("bench-agent");
    let pd = dir.path.join("plugins");
    std::fs::create_dir_all(&pd)?;
    for lib in [
        "libpopupd_notify.so",
        "libpopupd_exec.so",
        "libpopupd_autoreply.so",
    ] {
        std::fs::copy(popupd_e2e::bin(lib), pd.join(lib))?;
    }
    let extra = format!(
        "  plugin_dirs: [{}]\n  plugins:\n    exec: {{ rules: [ {{ from: nobody, command: [\"true\"] }} ] }}\n    autoreply: {{ text: \"away\" }}\n",
        pd.display()
    );
    let (_net, alice, bob) = popupd_e2e::two_people(&dir.path, "", &extra).await;
    // Carol: an agent as installed (no plugins, the default 25 s keepalive),
    // left alone for a minute, on a network whose homes wait 90 s before
    // calling a link dead (the test default, 10 s, is shorter than her
    // keepalive).
    let idle_dir = TestDir::new("bench-agent-idle");
    let idle_net = Network::start_with(&idle_dir.path, "90s").await?;
    let c = idle_net.add_user(0, "carol")?;
    let keepalive = format!("  keepalive: {}s\n", KEEPALIVE.as_secs());
    let carol = Agent::start(&idle_dir.path, "carol", &c, &keepalive, &[]).await?;
    carol.wait_connected(true, Duration::from_secs(20)).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpid = carol.proc.pid().context("carol's pid")?;
    // Before her first quiet keepalive period, start-up's code is still
    // mapped (agent::memory).
    let c_start = rss_kib(cpid);
    let (w0, t0) = (wakeups(cpid), Instant::now());
    tokio::time::sleep(Duration::from_secs(60)).await;
    let per_period =
        (wakeups(cpid) - w0) as f64 / (t0.elapsed().as_secs_f64() / KEEPALIVE.as_secs_f64());
    let (c_rss, c_anon) = (rss_kib(cpid), status_kib(cpid, "RssAnon"));
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let _server = zbus::connection::Builder::address(bob.bus.address.as_str())
        .name("org.freedesktop.Notifications")
        .serve_at(
            "/org/freedesktop/Notifications",
            Stopwatch { seen: seen.clone() },
        )
        .build()
        .await?;
    let got = arrivals(&bob, |_, text| text.to_string()).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let pid = bob.proc.pid().context("agent pid")?;
    let idle = rss_kib(pid);
    let (anon, file) = (status_kib(pid, "RssAnon"), status_kib(pid, "RssFile"));
    let p = alice.proxy().await?;
    let n = 200;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for i in 0..n {
        tick.tick().await;
        p.send("bob", &format!("m{i}")).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = rss_kib(pid);
    // The test homes ping a link quiet for 2.5 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let quiet_again = rss_kib(pid);
    let (g, s) = (
        got.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        seen.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    );
    let mut l: Vec<Duration> = (0..n)
        .filter_map(|i| {
            let k = format!("m{i}");
            Some(s.get(&k)?.saturating_duration_since(*g.get(&k)?))
        })
        .collect();
    l.sort();
    println!(
        "\n## agent: one agent with the notify, exec and autoreply plugins loaded; one without"
    );
    println!("| figure | value |\n|---|---|");
    println!(
        "| agent without plugins, 5 s after connecting (start-up code still mapped) | {:.1} MiB |",
        c_start as f64 / 1024.0
    );
    println!(
        "| agent without plugins, idle a minute: resident memory | {:.1} MiB ({:.1} MiB anonymous) |",
        c_rss as f64 / 1024.0,
        c_anon as f64 / 1024.0
    );
    println!(
        "| same: wake-ups (context switches, all threads) per 25 s keepalive period | {per_period:.1} |"
    );
    report::record("agent", "idle agent RSS", c_rss as f64 / 1024.0, "MiB");
    report::record(
        "agent",
        "idle agent wake-ups per keepalive period",
        per_period,
        "",
    );
    println!(
        "| resident memory, idle 10 s after connecting (quiet periods of 2.5 s here) | {:.1} MiB ({:.1} MiB anonymous, {:.1} MiB file-backed: mapped code) |",
        idle as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0
    );
    println!(
        "| resident memory after {n} messages; quiet again 5 s later | {:.1} MiB; {:.1} MiB |",
        busy as f64 / 1024.0,
        quiet_again as f64 / 1024.0
    );
    report::record(
        "agent",
        "agent with plugins RSS",
        idle as f64 / 1024.0,
        "MiB",
    );
    println!(
        "| MessageReceived → Notify, p50 / p99 / max ({} of {n} measured) | {} / {} / {} |",
        l.len(),
        ms(pct(&l, 0.5)),
        ms(pct(&l, 0.99)),
        ms(pct(&l, 1.0))
    );
    Ok(())
}

/// Most connections one load-generator process holds (the open-file limit
/// here is 20,000 per process).
pub(crate) const PER_WORKER: usize = 9000;

/// What both kinds of load worker share: accounts to log in (lines
/// FIRST.. of CREDS) to one home, from one source address.
pub(crate) struct Logins {
    pub(crate) creds: Vec<(String, String, String)>,
    source: std::net::IpAddr,
    /// The home's address, or its nodes' (tried in random order).
    targets: Vec<std::net::SocketAddr>,
    dial: Dial,
    /// Handshakes at once.
    gate: tokio::sync::Semaphore,
}

impl Logins {
    /// From the arguments `ADDR NAME CA CREDS FIRST COUNT SOURCE_IP`.
    pub(crate) fn parse(v: &[String]) -> anyhow::Result<Logins> {
        anyhow::ensure!(v.len() >= 7, "ADDR NAME CA CREDS FIRST COUNT SOURCE_IP");
        let creds = std::fs::read_to_string(&v[3])?
            .lines()
            .skip(v[4].parse()?)
            .take(v[5].parse()?)
            .filter_map(|l| {
                let mut f = l.split('\t');
                Some((
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                ))
            })
            .collect();
        Ok(Logins {
            creds,
            source: v[6].parse()?,
            targets: net::address_list(&v[0])
                .map(str::parse)
                .collect::<Result<_, _>>()?,
            dial: Dial {
                address: v[0].clone(),
                name: v[1].clone(),
                path: AGENT_PATH,
                tls: tls::client_config(tls::roots_from(std::path::Path::new(&v[2]))?, None)?,
                proxy: None,
            },
            gate: tokio::sync::Semaphore::new(128),
        })
    }

    /// Logs account `i` in, as an agent without presence.
    pub(crate) async fn login(&self, i: usize) -> anyhow::Result<net::Link<net::ClientTls>> {
        let _permit = self.gate.acquire().await?;
        let (handle, device, secret) = self.creds[i].clone();
        // Like the agent: the nodes in random order, until one answers.
        let mut order = self.targets.clone();
        fastrand::shuffle(&mut order);
        let mut tcp = None;
        let mut last = None;
        for t in order {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(std::net::SocketAddr::new(self.source, 0))?;
            match sock.connect(t).await {
                Ok(c) => {
                    tcp = Some(c);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(tcp) = tcp else {
            return Err(last.map_or_else(|| anyhow::anyhow!("no address"), Into::into));
        };
        let mut link = net::dial_over(tcp, &self.dial).await?;
        link.send(&AgentFrame::Hello {
            v: PROTOCOL_VERSION,
            handle,
            device,
            secret,
            presence: None,
        })
        .await?;
        match link.recv::<HomeFrame>().await? {
            Recv::Frame(HomeFrame::Welcome { .. }) => Ok(link),
            other => Err(anyhow::anyhow!("{other:?}")),
        }
    }
}

/// A load worker's output, a line at a time.
pub(crate) type WorkerLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// What a load worker and [`Logins::parse`] read: `ADDR NAME CA CREDS FIRST
/// COUNT SOURCE_IP`, for lines FIRST.. of CREDS on home A of `net`.
pub(crate) fn login_args(
    net: &Network,
    ca: &std::path::Path,
    creds: &std::path::Path,
    first: usize,
    count: usize,
    ip: &str,
) -> Vec<String> {
    login_args_at(&net.home_addrs[0], ca, creds, first, count, ip)
}

/// [`login_args`] for home A at `addr` (its nodes, comma-separated).
pub(crate) fn login_args_at(
    addr: &str,
    ca: &std::path::Path,
    creds: &std::path::Path,
    first: usize,
    count: usize,
    ip: &str,
) -> Vec<String> {
    vec![
        addr.to_owned(),
        HOME_A.into(),
        ca.display().to_string(),
        creds.display().to_string(),
        first.to_string(),
        count.to_string(),
        ip.into(),
    ]
}

/// Starts this program again as a load worker for `logins` (from
/// [`login_args`]), held by its stdin; with `reconnect` it dials again
/// after a drop.
pub(crate) fn spawn_worker(
    logins: &[String],
    reconnect: bool,
) -> anyhow::Result<(tokio::process::Child, WorkerLines)> {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("worker")
        .args(logins)
        .args(reconnect.then_some("reconnect"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("worker stdout")?;
    Ok((child, tokio::io::BufReader::new(stdout).lines()))
}

/// Reads each worker's `ready OK FAILED SECS` line; the sum of FAILED.
pub(crate) async fn logins_failed(readers: &mut [WorkerLines]) -> anyhow::Result<usize> {
    let mut failed = 0usize;
    for r in readers {
        let line = tokio::time::timeout(Duration::from_secs(300), r.next_line())
            .await??
            .unwrap_or_default();
        let f: Vec<&str> = line.split_whitespace().collect();
        failed += f.get(2).and_then(|x| x.parse::<usize>().ok()).unwrap_or(0);
    }
    Ok(failed)
}

/// Waits for a line (or the end) on stdin: the driver's signal.
pub(crate) async fn stdin_line() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut buf = String::new();
        std::io::stdin().read_line(&mut buf)
    })
    .await;
}

/// A simulated agent's keepalive: it pings a link quiet for this long, as
/// an agent with the default config does.
const KEEPALIVE: Duration = Duration::from_secs(25);

/// `popupd-bench worker ADDR NAME CA CREDS FIRST COUNT SOURCE_IP [reconnect]`:
/// holds COUNT authenticated back connections (lines FIRST.. of CREDS),
/// pinging a link quiet for [`KEEPALIVE`] like an agent, until stdin closes.
/// Prints `ready N
/// FAILED SECS`. With `reconnect`, a dropped connection dials again with the
/// agent's own jittered backoff, and `back N` is printed once every
/// connection has come back after a drop.
async fn worker() -> anyhow::Result<()> {
    let v: Vec<String> = std::env::args().skip(2).collect();
    anyhow::ensure!(
        v.len() == 7 || v.len() == 8,
        "worker ADDR NAME CA CREDS FIRST COUNT SOURCE_IP [reconnect]"
    );
    let reconnect = v.get(7).is_some_and(|x| x == "reconnect");
    let logins = Arc::new(Logins::parse(&v)?);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // (connection, logged in?) for every login attempt that ends, and
    // (connection, false) when a live one drops.
    let (up_tx, mut up_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, bool)>();
    for i in 0..logins.creds.len() {
        let (logins, up) = (logins.clone(), up_tx.clone());
        tasks.spawn(async move {
            let mut backoff =
                popupd_protocol::net::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
            let mut first = true;
            loop {
                match logins.login(i).await {
                    Ok(mut link) => {
                        let _ = up.send((i, true));
                        backoff.reset();
                        loop {
                            // Like an agent: ping only a link quiet
                            // for a whole keepalive period (the home
                            // pings its agents sooner).
                            tokio::select! {
                                _ = tokio::time::sleep(KEEPALIVE) => if link.ping().await.is_err() { break },
                                r = link.recv::<HomeFrame>() => if !matches!(r, Ok(Recv::Alive) | Ok(Recv::Frame(_))) { break },
                            }
                        }
                        if reconnect {
                            let _ = up.send((i, false));
                        }
                    }
                    Err(_) if first => {
                        let _ = up.send((i, false));
                    }
                    Err(_) => {}
                }
                first = false;
                if !reconnect {
                    return;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        });
    }
    drop(up_tx);
    let (mut ok, mut failed) = (0usize, 0usize);
    while ok + failed < logins.creds.len() {
        match up_rx.recv().await {
            Some((_, true)) => ok += 1,
            Some((_, false)) => failed += 1,
            None => break,
        }
    }
    println!("ready {ok} {failed} {:.3}", t0.elapsed().as_secs_f64());
    if reconnect {
        // `back N` once every connection came back after a drop, and
        // `live N` (connections up) when that changed, at most every 20 ms.
        tokio::spawn(async move {
            let mut back = std::collections::HashSet::new();
            let mut live = ok;
            let mut said = live;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    e = up_rx.recv() => {
                        let Some((i, up)) = e else { break };
                        if up {
                            live += 1;
                            if back.insert(i) && back.len() == logins.creds.len() {
                                println!("back {}", back.len());
                            }
                        } else {
                            live = live.saturating_sub(1);
                        }
                    }
                    _ = tick.tick() => if live != said {
                        said = live;
                        println!("live {live}");
                    }
                }
            }
        });
    }
    // Hold until the driver closes stdin.
    stdin_line().await;
    tasks.abort_all();
    Ok(())
}

/// Idle back connections on one home: memory per connection, login rate,
/// CPU while idle.
async fn idle(a: &Args) -> anyhow::Result<()> {
    let dir = TestDir::new("bench-idle");
    let net = Network::start_with(&dir.path, "90s").await?;
    let max = a.sizes.iter().copied().max().unwrap_or(1000);
    let t = Instant::now();
    let creds = add_many(&net, &dir, 0, "u", max)?;
    let made = t.elapsed();
    let ca = dir.path.join("pki/ca.crt");
    let home = &net.homes[0];
    let pid = home.pid().context("home pid")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = rss_kib(pid);
    println!(
        "\n## idle back connections on one home ({max} accounts made with `popupd user add-many` in {:.1} s)",
        made.as_secs_f64()
    );
    println!(
        "| connections | home RSS | bytes per connection | logins/s (TLS + auth) | home CPU idle, one 25 s keepalive period (each connection pinged once) |\n|---|---|---|---|---|"
    );
    let mut workers: Vec<tokio::process::Child> = Vec::new();
    let mut held = 0usize;
    let mut points = vec![(0.0, base as f64 / 1024.0)];
    for &size in &a.sizes {
        let t0 = Instant::now();
        let login_cpu0 = home.cpu_time();
        let mut readers = Vec::new();
        while held < size {
            let n = (size - held).min(PER_WORKER);
            let ip = format!("127.0.0.{}", 10 + workers.len());
            let (child, lines) = spawn_worker(&login_args(&net, &ca, &creds, held, n, &ip), false)?;
            readers.push(lines);
            workers.push(child);
            held += n;
        }
        let failed = logins_failed(&mut readers).await?;
        let secs = t0.elapsed().as_secs_f64();
        // The home's own CPU per login: what it could do with the load
        // generator off its cores.
        let login_cpu = home.cpu_time().saturating_sub(login_cpu0);
        let added = size
            - a.sizes
                .iter()
                .copied()
                .filter(|s| *s < size)
                .max()
                .unwrap_or(0);
        // The home pings a link quiet for idle_timeout / 4 (22.5 s here),
        // and workers ping one quiet for 25 s: wait until the newest
        // connections have been pinged once, then measure one whole
        // keepalive period, in which every connection is pinged once.
        tokio::time::sleep(KEEPALIVE).await;
        let rss = rss_kib(pid);
        let c0 = home.cpu_time();
        tokio::time::sleep(KEEPALIVE).await;
        let cpu = home.cpu_time().saturating_sub(c0);
        let per_conn = (rss.saturating_sub(base)) as f64 / size as f64;
        let idle_cpu = cpu.as_secs_f64() / KEEPALIVE.as_secs_f64() * 100.0;
        let sc = format!("idle-{size}");
        report::record(&sc, "home RSS", rss as f64 / 1024.0, "MiB");
        report::record(&sc, "bytes per connection", per_conn, "KiB");
        report::record(&sc, "logins/s", added as f64 / secs, "1/s");
        let per_login = login_cpu.as_secs_f64() * 1e6 / added.max(1) as f64;
        report::record(&sc, "home CPU per login", per_login, "µs");
        report::record(&sc, "home CPU idle", idle_cpu, "% of a core");
        points.push((size as f64, rss as f64 / 1024.0));
        println!(
            "| {size}{} | {:.1} MiB | {:.1} KiB | {:.0} ({per_login:.0} µs of home CPU each) | {:.2} % of a core |",
            if failed > 0 {
                format!(" ({failed} failed)")
            } else {
                String::new()
            },
            rss as f64 / 1024.0,
            per_conn,
            added as f64 / secs,
            idle_cpu
        );
    }
    drop(workers);
    report::plot(
        "idle-rss",
        "Home RSS against idle back connections",
        "authenticated TLS WebSocket connections",
        "home RSS (MiB)",
        &[report::Series {
            name: "home RSS".into(),
            points,
        }],
    )?;
    Ok(())
}
