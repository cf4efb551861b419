//! `popupd-bench storm`: kill -9 a home under 10,000 connected agents.
//!
//! Worker processes hold `--users` back connections (default 10,000) to one
//! home and dial again with the agent's own jittered backoff when they drop.
//! Meanwhile one sender streams 500 messages a second to one recipient,
//! both reconnecting and the sender re-sending what was not yet accepted
//! under the same ids, as the agent's outbox does. The home is killed with
//! SIGKILL and started again. Prints the time until every agent is back and
//! counts messages accepted but never delivered (lost) and messages
//! delivered more than once (the agent drops such repeats by id).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use popupd_e2e::{HOME_A, Network, TestDir};
use popupd_protocol::net::Backoff;
use popupd_protocol::net::{self, Recv};
use popupd_protocol::{AgentFrame, Event, HomeFrame, new_id};

use super::{Args, Logins, PER_WORKER, report};

/// Messages a second from the one sender.
const RATE: u64 = 500;

/// Logs in account `i`, retrying with the agent's backoff until `deadline`.
async fn login_retrying(
    logins: &Logins,
    i: usize,
    deadline: Instant,
) -> anyhow::Result<net::Link<net::ClientTls>> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        match logins.login(i).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() > deadline => return Err(e.context("gave up logging in")),
            Err(_) => tokio::time::sleep(backoff.next_delay()).await,
        }
    }
}

/// Starts the load workers that hold agents `o2`.. `o{n+1}` (`args`
/// gives a worker's arguments for its first account, count and source
/// address), and waits until all are logged in; returns the workers,
/// their output and how many agents each holds.
async fn hold_agents(
    n: usize,
    args: &dyn Fn(usize, usize, &str) -> Vec<String>,
) -> anyhow::Result<(
    Vec<tokio::process::Child>,
    Vec<super::WorkerLines>,
    Vec<usize>,
)> {
    let mut workers = Vec::new();
    let mut readers = Vec::new();
    let mut counts = Vec::new();
    let mut held = 2usize;
    while held < n + 2 {
        let count = (n + 2 - held).min(PER_WORKER);
        let ip = format!("127.0.0.{}", 10 + workers.len());
        let (child, lines) = super::spawn_worker(&args(held, count, &ip), true)?;
        readers.push(lines);
        workers.push(child);
        counts.push(count);
        held += count;
    }
    let failed = super::logins_failed(&mut readers).await?;
    if failed > 0 {
        bail!("{failed} of {n} agents could not log in");
    }
    Ok((workers, readers, counts))
}

/// Keeps the stream going a little, then stops it and waits (at most 30 s)
/// for what was accepted to arrive: (accepted, lost, repeats).
async fn finish_stream(
    stop: Arc<AtomicBool>,
    stask: tokio::task::JoinHandle<anyhow::Result<Vec<String>>>,
    rtask: tokio::task::JoinHandle<()>,
    got: &Mutex<HashMap<String, u32>>,
) -> anyhow::Result<(Vec<String>, usize, u32)> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let accepted = stask.await??;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (lost, repeats) = loop {
        let (lost, repeats) = {
            let g = got.lock().unwrap_or_else(|e| e.into_inner());
            let lost = accepted.iter().filter(|id| !g.contains_key(*id)).count();
            let repeats: u32 = g.values().map(|c| c - 1).sum();
            (lost, repeats)
        };
        if lost == 0 || Instant::now() > deadline {
            break (lost, repeats);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    rtask.abort();
    Ok((accepted, lost, repeats))
}

/// Streams messages to `o1` until `stop`, then until all are accepted;
/// returns the accepted ids.
async fn sender(logins: Arc<Logins>, stop: Arc<AtomicBool>) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut outbox: VecDeque<String> = VecDeque::new();
    let mut accepted = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    loop {
        let mut link = login_retrying(&logins, 0, deadline).await?;
        // Everything not yet accepted goes again, under the same id.
        for id in &outbox {
            link.feed(&send_frame(id)).await?;
        }
        link.flush().await?;
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            if stopping && outbox.is_empty() {
                return Ok(accepted);
            }
            anyhow::ensure!(Instant::now() < deadline, "sender timed out");
            tokio::select! {
                _ = tick.tick(), if !stopping => {
                    let id = new_id();
                    let r = link.send(&send_frame(&id)).await;
                    outbox.push_back(id);
                    if r.is_err() { break }
                }
                r = link.recv::<HomeFrame>() => match r {
                    Ok(Recv::Frame(HomeFrame::Accepted { id })) => {
                        if let Some(p) = outbox.iter().position(|x| *x == id) {
                            outbox.remove(p);
                            accepted.push(id);
                        }
                    }
                    Ok(Recv::Frame(_) | Recv::Alive | Recv::Bad(_)) => {}
                    Ok(Recv::Closed) | Err(_) => break,
                },
                _ = tokio::time::sleep(Duration::from_millis(100)), if stopping => {}
            }
        }
    }
}

fn send_frame(id: &str) -> AgentFrame {
    AgentFrame::Send {
        id: id.to_string(),
        from: None,
        to: "o1".into(),
        text: "storm".into(),
        reply_to: None,
    }
}

/// Reads `o1`'s mailbox forever, counting deliveries per id.
async fn recipient(logins: Arc<Logins>, got: Arc<Mutex<HashMap<String, u32>>>) {
    let far = Instant::now() + Duration::from_secs(3600);
    loop {
        let Ok(mut link) = login_retrying(&logins, 1, far).await else {
            return;
        };
        while let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_secs(60), link.recv::<HomeFrame>()).await
        {
            match r {
                Recv::Frame(HomeFrame::Event { seq, event }) => {
                    if let Event::Message(m) = event {
                        *got.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(m.id)
                            .or_default() += 1;
                    }
                    if link.send(&AgentFrame::Ack { seq }).await.is_err() {
                        break;
                    }
                }
                Recv::Closed => break,
                _ => {}
            }
        }
    }
}

pub(crate) async fn run(a: &Args) -> anyhow::Result<()> {
    if a.nodes > 0 {
        return run_cluster(a).await;
    }
    let n = a.users;
    let dir = TestDir::new("bench-storm");
    let mut net = Network::start_with(&dir.path, "90s").await?;
    // n agents, then the sender and the recipient.
    // add-many names them o0, o1, …: the stream uses o0 → o1, the workers
    // the rest.
    let creds = super::add_many(&net, &dir, 0, "o", n + 2)?;
    let ca = dir.path.join("pki/ca.crt");
    let args = |first, count, ip: &str| super::login_args(&net, &ca, &creds, first, count, ip);
    let stream = Arc::new(Logins::parse(&args(0, 2, "127.0.0.2"))?);

    let (workers, mut readers, _) = hold_agents(n, &args).await?;

    let got: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let rtask = tokio::spawn(recipient(stream.clone(), got.clone()));
    let stask = tokio::spawn(sender(stream.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let t_kill = Instant::now();
    net.homes[0].restart()?;
    popupd_e2e::wait_port(&net.home_addrs[0]).await?;
    let t_listen = t_kill.elapsed();
    for r in &mut readers {
        loop {
            let left = Duration::from_secs(120).saturating_sub(t_kill.elapsed());
            let line = tokio::time::timeout(left, r.next_line())
                .await
                .context("agents did not all come back within 120 s")??
                .context("a worker ended")?;
            if line.starts_with("back") {
                break;
            }
            anyhow::ensure!(line.starts_with("live"), "worker said {line:?}");
        }
    }
    let t_back = t_kill.elapsed();

    let (accepted, lost, repeats) = finish_stream(stop, stask, rtask, &got).await?;
    drop(workers);

    let mut t = report::Table::new(
        "storm",
        &format!(
            "reconnect storm: {n} agents on {HOME_A}, which is killed with SIGKILL and started again; one sender streams {RATE} msg/s throughout"
        ),
    );
    t.row(
        "home listening again after the kill",
        t_listen.as_secs_f64(),
        "s",
        &format!("{:.2} s", t_listen.as_secs_f64()),
    );
    t.row(
        "every agent back (logged in again) after the kill",
        t_back.as_secs_f64(),
        "s",
        &format!("{:.2} s", t_back.as_secs_f64()),
    );
    t.row(
        "messages accepted across the restart",
        accepted.len() as f64,
        "",
        &accepted.len().to_string(),
    );
    t.row(
        "accepted but never delivered",
        lost as f64,
        "",
        &lost.to_string(),
    );
    t.row(
        "delivered again after the restart (the agent drops these by id)",
        repeats as f64,
        "",
        &repeats.to_string(),
    );
    t.finish()?;
    if lost > 0 {
        bail!("{lost} accepted messages were not delivered");
    }
    Ok(())
}

/// `storm --nodes N`: `--users` agents spread over home A's N nodes (each
/// dials the nodes in random order, as an agent given them all does); one
/// node is killed with SIGKILL and not started again. Prints how many
/// agents it held and the time until every one of them is served by
/// another node, while the stream goes on.
async fn run_cluster(a: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.nodes >= 2, "--nodes: a node must be left to move to");
    let n = a.users;
    let dir = TestDir::new("bench-storm");
    let layout = popupd_e2e::Layout {
        idle_timeout: "90s".into(),
        home_yaml: popupd_e2e::LOAD_LIMITS.into(),
        ..Default::default()
    };
    let mut c = popupd_e2e::cluster::Cluster::start_laid_out(&dir.path, "bench", a.nodes, layout)
        .await
        .context("--nodes needs PostgreSQL and nats-server")?;
    let creds = super::add_many(&c.net, &dir, 0, "o", n + 2)?;
    let ca = dir.path.join("pki/ca.crt");
    let all = c.addrs.join(",");
    let args = |first, count, ip: &str| super::login_args_at(&all, &ca, &creds, first, count, ip);
    let stream = Arc::new(Logins::parse(&args(0, 2, "127.0.0.2"))?);
    let (workers, readers, counts) = hold_agents(n, &args).await?;
    // Each worker's connections up, as it last said.
    let live: Arc<Vec<std::sync::atomic::AtomicUsize>> = Arc::new(
        readers
            .iter()
            .map(|_| std::sync::atomic::AtomicUsize::new(0))
            .collect(),
    );
    for (k, &cnt) in counts.iter().enumerate() {
        live[k].store(cnt, Ordering::Relaxed);
    }
    for (k, mut r) in readers.into_iter().enumerate() {
        let live = live.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = r.next_line().await {
                if let Some(x) = line.strip_prefix("live ").and_then(|x| x.parse().ok()) {
                    live[k].store(x, Ordering::Relaxed);
                }
            }
        });
    }
    let up = || {
        live.iter()
            .map(|x| x.load(Ordering::Relaxed))
            .sum::<usize>()
    };

    let got: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let rtask = tokio::spawn(recipient(stream.clone(), got.clone()));
    let stask = tokio::spawn(sender(stream.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let victim = 1;
    let t_kill = Instant::now();
    c.node(victim).kill9();
    let mut lowest = n;
    let t_back = loop {
        let u = up();
        lowest = lowest.min(u);
        if u == n && lowest < n {
            break t_kill.elapsed();
        }
        anyhow::ensure!(
            t_kill.elapsed() < Duration::from_secs(120),
            "agents did not all come back within 120 s ({u} of {n} up)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    let (accepted, lost, repeats) = finish_stream(stop, stask, rtask, &got).await?;
    drop(workers);

    let mut t = report::Table::new(
        &format!("storm-{}-nodes", a.nodes),
        &format!(
            "a node killed: {n} agents on {HOME_A}'s {} nodes (PostgreSQL, NATS), each dialing them in random order; node n{} is killed with SIGKILL and left dead; one sender streams {RATE} msg/s throughout",
            a.nodes,
            victim + 1
        ),
    );
    t.row(
        "agents the killed node held",
        (n - lowest) as f64,
        "",
        &(n - lowest).to_string(),
    );
    t.row(
        "every agent served again (by another node) after the kill",
        t_back.as_secs_f64(),
        "s",
        &format!("{:.2} s", t_back.as_secs_f64()),
    );
    t.row(
        "messages accepted across the kill",
        accepted.len() as f64,
        "",
        &accepted.len().to_string(),
    );
    t.row(
        "accepted but never delivered",
        lost as f64,
        "",
        &lost.to_string(),
    );
    t.row(
        "delivered again (the agent drops these by id)",
        repeats as f64,
        "",
        &repeats.to_string(),
    );
    t.finish()?;
    if lost > 0 {
        bail!("{lost} accepted messages were not delivered");
    }
    Ok(())
}
