//! `presence`: users split over two homes, every one online with the same
//! number of contacts (half on their own home, half on the other), change
//! their presence at a fixed total rate. Measured: the time from a
//! `SetPresence` frame leaving a simulated agent to each watching contact's
//! agent receiving the change (p50, p99, max), whether every watcher got
//! every change, the server-to-server presence frames per change (one per
//! interested remote home is the goal), and the homes' CPU per change.
//!
//! Simulated agents speak the real protocol over TLS, spread over worker
//! processes (at most [`PER_WORKER`] connections each, from 127.0.0.x
//! source addresses). The status text of each change carries its send time,
//! so latency needs no bookkeeping between processes.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use popupd_e2e::{HOME_A, HOME_B, Network, TestDir};
use popupd_protocol::net::Recv;
use popupd_protocol::{AgentFrame, HomeFrame, PresenceState};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::{Args, Logins, PER_WORKER, ms, pct, stdin_line};

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `OWNER PEER [PEER_HOME]` lines for `popupd contact import` on each home:
/// user i's local contacts are its ring neighbours (±1, ±2, … and, for an
/// odd count, the user opposite), its remote ones users i..i+remote of the
/// other home. Every relation is symmetric.
fn contact_lines(per_home: usize, local: usize, remote: usize) -> [String; 2] {
    let mut out = [String::new(), String::new()];
    for (h, (me, other, other_home)) in [("a", "b", HOME_B), ("b", "a", HOME_A)]
        .into_iter()
        .enumerate()
    {
        let s = &mut out[h];
        for i in 0..per_home {
            let mut near: Vec<usize> = (1..=local / 2).map(|k| (i + k) % per_home).collect();
            if local % 2 == 1 {
                near.push((i + per_home / 2) % per_home);
            }
            for j in near {
                s.push_str(&format!("{me}{i} {me}{j}\n"));
            }
            for k in 0..remote {
                // a_i ↔ b_(i+k); seen from b_j that is a_(j-k).
                let j = if h == 0 {
                    (i + k) % per_home
                } else {
                    (i + per_home - k) % per_home
                };
                s.push_str(&format!("{me}{i} {other}{j} {other_home}\n"));
            }
        }
    }
    out
}

/// The last `presence counters` figures (changes, to agents, to peers) a
/// home logged (at debug level, every 5 s while they change).
fn counters(log: &str) -> (u64, u64, u64) {
    let field = |l: &str, k: &str| -> u64 {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    log.lines()
        .rev()
        .find(|l| l.contains("presence counters"))
        .map(|l| {
            (
                field(l, "presence_changes="),
                field(l, "presence_to_agents="),
                field(l, "presence_to_peers="),
            )
        })
        .unwrap_or_default()
}

pub(crate) async fn run(a: &Args) -> anyhow::Result<()> {
    let rate = if a.rate_set { a.rate } else { 1000 };
    let per_home = a.users / 2;
    let local = a.contacts / 2;
    let remote = a.contacts - local;
    anyhow::ensure!(
        per_home.is_multiple_of(2) && local / 2 < per_home / 2 && remote <= per_home,
        "--users must be a multiple of 4 and well above --contacts"
    );
    let dir = TestDir::new("bench-presence");
    let mut net = Network::start_with(&dir.path, "90s").await?;
    let ca = dir.path.join("pki/ca.crt");

    let t = Instant::now();
    let mut creds: Vec<PathBuf> = Vec::new();
    for (i, prefix) in ["a", "b"].into_iter().enumerate() {
        creds.push(super::add_many(&net, &dir, i, prefix, per_home)?);
    }
    let accounts = t.elapsed();
    let t = Instant::now();
    for (i, lines) in contact_lines(per_home, local, remote).iter().enumerate() {
        let f = dir.path.join(format!("contacts-{i}.txt"));
        std::fs::write(&f, lines)?;
        let out = std::process::Command::new(popupd_e2e::bin("popupd"))
            .args(["contact", "import"])
            .arg(&f)
            .arg("-c")
            .arg(net.home_config(i))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "contact import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let linked = t.elapsed();

    // Workers: each holds part of one home's users and changes their
    // presence at its share of the rate.
    let mut plan = Vec::new();
    for (h, home) in [HOME_A, HOME_B].into_iter().enumerate() {
        let mut first = 0;
        while first < per_home {
            let n = (per_home - first).min(PER_WORKER);
            plan.push((h, home, first, n));
            first += n;
        }
    }
    let share = rate as f64 * 1.0 / plan.len() as f64;
    let t = Instant::now();
    let mut workers = Vec::new();
    for (w, (h, home, first, n)) in plan.iter().enumerate() {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["presence-worker", &net.home_addrs[*h], home])
            .arg(&ca)
            .arg(&creds[*h])
            .args([
                first.to_string(),
                n.to_string(),
                format!("127.0.0.{}", 20 + w),
                format!("{share}"),
                a.seconds.to_string(),
            ])
            .arg(dir.path.join(format!("latency-{w}.txt")))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        workers.push((child, tokio::io::BufReader::new(stdout).lines(), stdin));
    }
    let mut failed = 0usize;
    for (_, lines, _) in workers.iter_mut() {
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await??
            .unwrap_or_default();
        let f: Vec<&str> = line.split_whitespace().collect();
        anyhow::ensure!(f.first() == Some(&"ready"), "worker said {line:?}");
        failed += f.get(2).and_then(|x| x.parse::<usize>().ok()).unwrap_or(0);
    }
    let logged_in = t.elapsed();
    anyhow::ensure!(failed == 0, "{failed} simulated agents could not log in");
    // Let the login-time presence settle, so the counters hold still.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let before: Vec<(u64, u64, u64)> = net.homes.iter().map(|h| counters(&h.log_text())).collect();
    let cpu0: Vec<Duration> = net.homes.iter().map(|h| h.cpu_time()).collect();

    for (_, _, stdin) in workers.iter_mut() {
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
    }
    let (mut sent, mut received) = (0u64, 0u64);
    for (_, lines, _) in workers.iter_mut() {
        let line = tokio::time::timeout(Duration::from_secs(a.seconds + 120), lines.next_line())
            .await??
            .unwrap_or_default();
        let f: Vec<&str> = line.split_whitespace().collect();
        anyhow::ensure!(f.first() == Some(&"done"), "worker said {line:?}");
        sent += f.get(1).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        received += f.get(2).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    }
    let cpu: Duration = net
        .homes
        .iter()
        .zip(&cpu0)
        .map(|(h, c)| h.cpu_time().saturating_sub(*c))
        .sum();
    // The homes log their counters every 5 s while they move.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after: Vec<(u64, u64, u64)> = net.homes.iter().map(|h| counters(&h.log_text())).collect();
    drop(workers);
    for h in net.homes.iter_mut() {
        h.stop();
    }
    let diff = |f: fn(&(u64, u64, u64)) -> u64| -> u64 {
        after
            .iter()
            .zip(&before)
            .map(|(x, y)| f(x).saturating_sub(f(y)))
            .sum()
    };
    let (changes, to_agents, to_peers) = (diff(|c| c.0), diff(|c| c.1), diff(|c| c.2));

    let mut lat: Vec<Duration> = Vec::new();
    for w in 0..plan.len() {
        let text = std::fs::read_to_string(dir.path.join(format!("latency-{w}.txt")))?;
        lat.extend(
            text.lines()
                .filter_map(|l| l.parse::<u64>().ok())
                .map(Duration::from_micros),
        );
    }
    lat.sort();
    let expected = sent * a.contacts as u64;
    println!(
        "\n## presence: {} users over two homes, {} contacts each ({local} on their home, {remote} on the other), all online",
        per_home * 2,
        a.contacts
    );
    println!(
        "(setup: accounts {:.1} s, {} contact pairs imported {:.1} s, {} logins {:.1} s)",
        accounts.as_secs_f64(),
        per_home * 2 * a.contacts / 2,
        linked.as_secs_f64(),
        per_home * 2,
        logged_in.as_secs_f64()
    );
    println!("| figure | value |\n|---|---|");
    println!(
        "| changes sent ({rate}/s offered for {} s) | {sent} ({:.0}/s) |",
        a.seconds,
        sent as f64 / a.seconds as f64
    );
    println!("| changes counted by the homes | {changes} |");
    println!(
        "| watchers told (expected {expected} = changes × {}) | {received}{} |",
        a.contacts,
        if received == expected {
            ""
        } else {
            " **(mismatch)**"
        }
    );
    println!(
        "| SetPresence → watcher's agent, p50 / p99 / max | {} / {} / {} |",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(pct(&lat, 1.0))
    );
    println!(
        "| server-to-server presence frames per change | {:.2} ({to_peers} in all) |",
        to_peers as f64 / changes.max(1) as f64
    );
    println!(
        "| frames to agents per change | {:.1} |",
        to_agents as f64 / changes.max(1) as f64
    );
    println!(
        "| homes' CPU per change (both homes) | {:.1} µs ({:.0}% of a core at this rate) |",
        cpu.as_secs_f64() * 1e6 / changes.max(1) as f64,
        cpu.as_secs_f64() / a.seconds as f64 * 100.0
    );
    anyhow::ensure!(
        received == expected && changes == sent,
        "{sent} changes sent, {changes} counted, {received} of {expected} watchers told"
    );
    Ok(())
}

/// `popupd-bench presence-worker ADDR NAME CA CREDS FIRST COUNT SOURCE_IP
/// RATE SECONDS OUT`: logs in COUNT users (lines FIRST.. of CREDS), prints
/// `ready OK FAILED SECS`, waits for `go` on stdin, then changes the
/// presence of random users of its own at RATE per second for SECONDS,
/// recording the latency (µs) of every change it sees as a watcher into
/// OUT; prints `done SENT RECEIVED` and holds until stdin closes.
pub(crate) async fn worker() -> anyhow::Result<()> {
    let v: Vec<String> = std::env::args().skip(2).collect();
    anyhow::ensure!(
        v.len() == 10,
        "presence-worker ADDR NAME CA CREDS FIRST COUNT SOURCE_IP RATE SECONDS OUT"
    );
    let logins = Arc::new(Logins::parse(&v)?);
    let rate: f64 = v[7].parse()?;
    let seconds: u64 = v[8].parse()?;
    let out = PathBuf::from(&v[9]);
    let lat: Arc<Mutex<Vec<u32>>> = Arc::default();
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let (up_tx, mut up_rx) =
        tokio::sync::mpsc::unbounded_channel::<Option<tokio::sync::mpsc::UnboundedSender<()>>>();
    for i in 0..logins.creds.len() {
        let (logins, up, lat) = (logins.clone(), up_tx.clone(), lat.clone());
        tasks.spawn(async move {
            let Ok(mut link) = logins.login(i).await else {
                let _ = up.send(None);
                return;
            };
            let (cmd_tx, mut cmd) = tokio::sync::mpsc::unbounded_channel::<()>();
            let _ = up.send(Some(cmd_tx));
            let mut away = false;
            loop {
                tokio::select! {
                    Some(()) = cmd.recv() => {
                        away = !away;
                        let state = if away { PresenceState::Away } else { PresenceState::Online };
                        let f = AgentFrame::SetPresence { state, text: format!("t{}", now_us()) };
                        if link.send(&f).await.is_err() { return }
                    }
                    r = link.recv::<HomeFrame>() => match r {
                        Ok(Recv::Frame(HomeFrame::Presence { text, .. })) => {
                            if let Some(t) = text.strip_prefix('t').and_then(|t| t.parse::<u64>().ok()) {
                                let us = now_us().saturating_sub(t).min(u32::MAX as u64) as u32;
                                lat.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                            }
                        }
                        Ok(Recv::Frame(_)) | Ok(Recv::Alive) => {}
                        _ => return,
                    },
                    _ = tokio::time::sleep(Duration::from_secs(20)) => {
                        if link.ping().await.is_err() { return }
                    }
                }
            }
        });
    }
    drop(up_tx);
    let mut links = Vec::new();
    let mut failed = 0usize;
    while links.len() + failed < logins.creds.len() {
        match up_rx.recv().await {
            Some(Some(tx)) => links.push(tx),
            Some(None) => failed += 1,
            None => break,
        }
    }
    println!(
        "ready {} {failed} {:.3}",
        links.len(),
        t0.elapsed().as_secs_f64()
    );
    stdin_line().await;

    // Changes at the given rate, by the clock (a late tick sends the ones
    // it owes), bounded by count and time.
    let total = (rate * seconds as f64).round() as u64;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut rng = fastrand::Rng::new();
    while sent < total && start.elapsed() < Duration::from_secs(seconds + 5) && !links.is_empty() {
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        while sent < due {
            let _ = links[rng.usize(..links.len())].send(());
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Let the last changes arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lat = std::mem::take(&mut *lat.lock().unwrap_or_else(|e| e.into_inner()));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&out)?);
    for l in &lat {
        writeln!(f, "{l}")?;
    }
    f.flush()?;
    println!("done {sent} {}", lat.len());
    stdin_line().await;
    tasks.abort_all();
    Ok(())
}
