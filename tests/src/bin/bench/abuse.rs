//! `popupd-bench abuse`: what a hostile user or address costs everyone
//! else on one home.
//!
//! A victim pair (v0 → v1) sends at `--rate` (default 1,000 msg/s) for
//! `--seconds`, timed from send to the recipient's receipt:
//!
//! 1. alone;
//! 2. while a flooder (f0 → f1, 1 KB messages) sends as fast as the home
//!    lets it. The send rate limit is raised for this scenario (the victim
//!    itself sends above the default), so what holds the flooder back is
//!    the per-connection bound on work in flight and TCP backpressure;
//! 3. while 1,000 sockets from 127.0.0.3 connect and say nothing, and
//!    connect again 100 ms after the home closes them (from a process of
//!    their own, as an attacker's are).
//!
//! Then logins/s of 2,000 honest agents (50 from each of 40 addresses),
//! alone and while one address
//! (127.0.0.4) guesses secrets as fast as it can; and the disk: 120,000
//! messages of 1 KB to one offline user, who then logs in, reads and acks
//! them all — the home's files, sampled each second until back under
//! 50 MB (at most 90 s).
//!
//! Every simulated agent acks what the home pushes it, its own status
//! receipts included, as a real agent does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use popupd_e2e::{HOME_A, Layout, Network, TestDir};
use popupd_protocol::net::{ClientTls, Link, Recv};
use popupd_protocol::{AgentFrame, ErrorCode, Event, HomeFrame, PROTOCOL_VERSION, new_id};

use super::{Args, Logins, ms, pct, report, rss_kib};

/// The second home: no send rate to speak of, and a mailbox that takes the
/// disk phase's backlog; every limit on connections and logins at its
/// default.
const UNLIMITED: &str = "  limits:\n    send_rate: 1000000\n    send_burst: 1000000\n    mailbox_messages: 200000\n    mailbox_bytes: 1000000000\n";
const SILENT: usize = 1000;
const HONEST: usize = 2000;
const DISK_MESSAGES: usize = 120_000;
const DISK_GOAL: u64 = 50 << 20;

pub(crate) async fn run(a: &Args) -> anyhow::Result<()> {
    let rate = if a.rate_set { a.rate } else { 1000 };
    let mut t = report::Table::new(
        "abuse",
        &format!(
            "abuse: a victim pair at {rate} msg/s for {} s on {HOME_A}, alone and beside each attack",
            a.seconds
        ),
    );
    // The home's send rate set to what the victim needs, which holds the
    // flooder to it too.
    let rated = format!("  limits:\n    send_rate: {rate}\n    send_burst: {rate}\n");
    let (dir, net) = start("bench-abuse", &rated).await?;
    victims(
        a,
        &net,
        &dir,
        rate,
        &["alone", "flooder", "silent sockets"],
        "",
        &mut t,
    )
    .await?;
    honest_logins(&net, &dir, &mut t).await?;
    drop(net);
    // Unlimited: what holds the flooder back is the bound on a
    // connection's work in flight.
    let (dir, net) = start("bench-abuse-unlimited", UNLIMITED).await?;
    victims(
        a,
        &net,
        &dir,
        rate,
        &["alone", "flooder"],
        "send rate unlimited, ",
        &mut t,
    )
    .await?;
    drop(net);
    // A home of its own: the flood above leaves its messages behind.
    let (dir, net) = start("bench-abuse-disk", UNLIMITED).await?;
    disk(&net, &dir, &mut t).await?;
    t.finish()
}

async fn start(name: &str, limits: &str) -> anyhow::Result<(TestDir, Network)> {
    let dir = TestDir::new(name);
    let net = Network::start_laid_out(
        &dir.path,
        Layout {
            idle_timeout: "30s".into(),
            home_yaml: limits.into(),
            ..Layout::default()
        },
    )
    .await?;
    Ok((dir, net))
}

/// Makes accounts PREFIX0.. on home A, logged in from `ip`.
fn accounts(
    net: &Network,
    dir: &TestDir,
    prefix: &str,
    n: usize,
    ip: &str,
) -> anyhow::Result<Logins> {
    let creds = super::add_many(net, dir, 0, prefix, n)?;
    let ca = dir.path.join("pki/ca.crt");
    Logins::parse(&super::login_args(net, &ca, &creds, 0, n, ip))
}

/// The victim pair at `rate` for `--seconds`, in each of `phases`.
async fn victims(
    a: &Args,
    net: &Network,
    dir: &TestDir,
    rate: u64,
    phases: &[&str],
    label: &str,
    t: &mut report::Table,
) -> anyhow::Result<()> {
    let pairs = Arc::new(accounts(net, dir, "p", 4, "127.0.0.1")?);
    let home = &net.homes[0];
    let pid = home.pid().context("home pid")?;
    let secs = Duration::from_secs(a.seconds);
    let mut alone_p99 = Duration::ZERO;
    for &phase in phases {
        let end = Instant::now() + secs;
        let rss = Sampler::start(pid);
        let cpu0 = home.cpu_time();
        let mut attack = tokio::task::JoinSet::new();
        let flooded = Arc::new(AtomicU64::new(0));
        let flood_refused = Arc::new(AtomicU64::new(0));
        let flood_end = Arc::new(std::sync::Mutex::new(String::new()));
        let connects = Arc::new(AtomicU64::new(0));
        match phase {
            "flooder" => {
                let (pairs, n, r) = (pairs.clone(), flooded.clone(), flood_refused.clone());
                let mut rx = pairs.login(3).await?;
                attack.spawn(async move {
                    receive(&mut rx, end + Duration::from_secs(5))
                        .await
                        .map(|_| ())
                });
                let mut tx = pairs.login(2).await?;
                let why = flood_end.clone();
                attack.spawn(async move {
                    // The home may stop reading a flooder for good: its
                    // writes then block, and it is done at the phase's end.
                    let mut s = Sent::default();
                    let out = tokio::time::timeout_at(
                        (end + Duration::from_secs(2)).into(),
                        send(&mut tx, "p3", None, 1000, usize::MAX, end, &mut s),
                    )
                    .await;
                    n.store(s.accepted as u64, Ordering::Relaxed);
                    r.store(s.refused as u64, Ordering::Relaxed);
                    let said = match out {
                        Ok(Ok(())) => String::new(),
                        Ok(Err(e)) => format!("; its link ended: {e}"),
                        Err(_) => "; its writes were blocked at the end".into(),
                    };
                    *why.lock().unwrap_or_else(|e| e.into_inner()) = said;
                    Ok(())
                });
            }
            "silent sockets" => {
                // In a process of its own, as an attacker is: its 1,000
                // tasks must not stall the victim's in this runtime.
                let mut child = tokio::process::Command::new("nice")
                    .args(["-n", "19"])
                    .arg(std::env::current_exe()?)
                    .args(["silent-worker", &net.home_addrs[0], "127.0.0.3"])
                    .arg(SILENT.to_string())
                    .arg(format!(
                        "{}",
                        end.saturating_duration_since(Instant::now()).as_millis()
                    ))
                    .stdout(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()?;
                let connects = connects.clone();
                attack.spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut out = String::new();
                    if let Some(mut o) = child.stdout.take() {
                        o.read_to_string(&mut out).await?;
                    }
                    child.wait().await?;
                    let n = out
                        .trim()
                        .parse()
                        .context("the silent-socket worker's count")?;
                    connects.store(n, Ordering::Relaxed);
                    Ok(())
                });
                // Let the pending pool fill first.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => {}
        }
        let mut rx = pairs.login(1).await?;
        let recv =
            tokio::spawn(async move { receive(&mut rx, end + Duration::from_secs(10)).await });
        let mut tx = pairs.login(0).await?;
        let pace = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
        let mut sent = Sent::default();
        send(&mut tx, "p1", Some(pace), 100, usize::MAX, end, &mut sent).await?;
        let mut lat = tokio::time::timeout(Duration::from_secs(15), recv)
            .await
            .context("the victim's recipient did not finish")???;
        let cpu = home.cpu_time().saturating_sub(cpu0);
        while let Some(r) = attack.join_next().await {
            r??;
        }
        let peak = rss.stop().await;
        lat.sort();
        let p99 = pct(&lat, 0.99);
        if phase.ends_with("alone") {
            alone_p99 = p99;
        }
        let key = format!("{label}{phase}").replace([' ', ','], "-");
        let phase = format!("{label}{phase}");
        t.row(
            &format!("{phase}: victim p50"),
            pct(&lat, 0.5).as_secs_f64() * 1e3,
            "ms",
            &ms(pct(&lat, 0.5)),
        );
        let times = if phase.ends_with("alone") || alone_p99.is_zero() {
            String::new()
        } else {
            format!(
                " ({:.1}× alone)",
                p99.as_secs_f64() / alone_p99.as_secs_f64()
            )
        };
        t.row(
            &format!("{phase}: victim p99"),
            p99.as_secs_f64() * 1e3,
            "ms",
            &format!("{}{times}", ms(p99)),
        );
        t.text(
            &format!("{phase}: victim messages"),
            &format!(
                "{} accepted of {} sent, {} received",
                sent.accepted,
                sent.sent,
                lat.len()
            ),
        );
        t.row(
            &format!("{phase}: home RSS, peak"),
            peak as f64 / 1024.0,
            "MiB",
            &format!("{:.1} MiB", peak as f64 / 1024.0),
        );
        t.row(
            &format!("{phase}: home CPU"),
            cpu.as_secs_f64() / secs.as_secs_f64() * 100.0,
            "%",
            &format!(
                "{:.0} % of a core",
                cpu.as_secs_f64() / secs.as_secs_f64() * 100.0
            ),
        );
        match phase.strip_prefix(label).unwrap_or_default() {
            "flooder" => {
                let n = flooded.load(Ordering::Relaxed) as f64 / secs.as_secs_f64();
                let refused = flood_refused.load(Ordering::Relaxed);
                t.row(
                    &format!("{label}flooder: its messages accepted"),
                    n,
                    "msg/s",
                    &format!(
                        "{n:.0} msg/s ({refused} more refused: rate_limited{})",
                        flood_end.lock().unwrap_or_else(|e| e.into_inner())
                    ),
                );
            }
            "silent sockets" => {
                let n = connects.load(Ordering::Relaxed);
                t.text(
                    "silent sockets: connections made",
                    &format!("{n} from 127.0.0.3"),
                );
            }
            _ => {}
        }
        report::record(
            "abuse",
            &format!("{key}-p99"),
            p99.as_secs_f64() * 1e3,
            "ms",
        );
    }

    Ok(())
}

/// Logins/s of honest agents, alone and while one address guesses.
async fn honest_logins(net: &Network, dir: &TestDir, t: &mut report::Table) -> anyhow::Result<()> {
    let ca = dir.path.join("pki/ca.crt");
    // Honest agents come from many addresses, 50 from each.
    let creds = super::add_many(net, dir, 0, "h", HONEST)?;
    let honest: Vec<Arc<Logins>> = (0..HONEST / 50)
        .map(|k| {
            let ip = format!("127.0.1.{}", k + 1);
            Logins::parse(&super::login_args(net, &ca, &creds, k * 50, 50, &ip)).map(Arc::new)
        })
        .collect::<anyhow::Result<_>>()?;
    for guessing in [false, true] {
        let stop = Arc::new(tokio::sync::Notify::new());
        let guesses = Arc::new(AtomicU64::new(0));
        let mut guesser = tokio::task::JoinSet::new();
        let guessing_since = Instant::now();
        if guessing {
            let target: std::net::SocketAddr = net.home_addrs[0].parse()?;
            for k in 0..32 {
                let (stop, guesses, ca) = (stop.clone(), guesses.clone(), ca.clone());
                guesser.spawn(async move {
                    let dial = popupd_protocol::net::Dial {
                        address: target.to_string(),
                        name: HOME_A.into(),
                        path: popupd_protocol::AGENT_PATH,
                        tls: popupd_protocol::net::tls::client_config(
                            popupd_protocol::net::tls::roots_from(&ca)?,
                            None,
                        )?,
                        proxy: None,
                    };
                    let mut i = k;
                    loop {
                        let handle = format!("h{}", i % HONEST);
                        i += 32;
                        tokio::select! {
                            _ = stop.notified() => return anyhow::Ok(()),
                            _ = guess(target, &dial, handle) => { guesses.fetch_add(1, Ordering::Relaxed); }
                        }
                    }
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let t0 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..HONEST {
            let honest = honest[i / 50].clone();
            set.spawn(async move {
                let link = honest.login(i % 50).await?;
                link.close().await;
                anyhow::Ok(())
            });
        }
        let (mut ok, mut failed) = (0usize, 0usize);
        while let Some(r) = set.join_next().await {
            match r? {
                Ok(()) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        stop.notify_waiters();
        guesser.abort_all();
        let label = if guessing {
            "while one address guesses"
        } else {
            "alone"
        };
        t.row(
            &format!("honest logins/s, {label}"),
            ok as f64 / secs,
            "1/s",
            &format!(
                "{:.0} ({ok} of {HONEST} logged in, {failed} refused)",
                ok as f64 / secs
            ),
        );
        if guessing {
            let n = guesses.load(Ordering::Relaxed);
            let over = guessing_since.elapsed().as_secs_f64();
            t.text(
                "guesses meanwhile (32 at once, 127.0.0.4)",
                &format!("{n} in {over:.1} s ({:.0}/s)", n as f64 / over),
            );
        }
        // Each login replaced nothing; let the closes settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    Ok(())
}

/// A backlog for one offline user, read and acked: the home's files.
async fn disk(net: &Network, dir: &TestDir, t: &mut report::Table) -> anyhow::Result<()> {
    let disk = accounts(net, dir, "d", 2, "127.0.0.1")?;
    let data = dir.path.join(format!("data/{HOME_A}"));
    let before = disk_use(&data);
    let mut tx = disk.login(1).await?;
    let t0 = Instant::now();
    let mut stored = Sent::default();
    send(
        &mut tx,
        "d0",
        None,
        1000,
        DISK_MESSAGES,
        t0 + Duration::from_secs(600),
        &mut stored,
    )
    .await?;
    anyhow::ensure!(
        stored.accepted == DISK_MESSAGES,
        "{} of {DISK_MESSAGES} accepted",
        stored.accepted
    );
    let full = disk_use(&data);
    let mut rx = disk.login(0).await?;
    // The sender stays online to take (and ack) its status receipts.
    let status = tokio::spawn(async move {
        let mut tx = tx;
        let _ = receive(&mut tx, Instant::now() + Duration::from_secs(120)).await;
    });
    let got = receive_n(&mut rx, DISK_MESSAGES, Duration::from_secs(300)).await?;
    let read_at = t0.elapsed();
    let after_ack = disk_use(&data);
    let t_acked = Instant::now();
    let mut back_in = None;
    while t_acked.elapsed() < Duration::from_secs(90) {
        if disk_use(&data) < DISK_GOAL {
            back_in = Some(t_acked.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    status.abort();
    let last = disk_use(&data);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    t.text(
        "disk: 120,000 messages of 1 KB to one offline user",
        &format!(
            "{got} read and acked {:.0} s after the first was sent",
            read_at.as_secs_f64()
        ),
    );
    t.row(
        "disk: home files before",
        mib(before),
        "MiB",
        &format!("{:.1} MiB", mib(before)),
    );
    t.row(
        "disk: home files, backlog stored",
        mib(full),
        "MiB",
        &format!("{:.1} MiB", mib(full)),
    );
    t.row(
        "disk: home files, just after the last ack",
        mib(after_ack),
        "MiB",
        &format!("{:.1} MiB", mib(after_ack)),
    );
    match back_in {
        Some(d) => t.row(
            "disk: back under 50 MB",
            d.as_secs_f64(),
            "s",
            &format!(
                "{:.0} s after the last ack ({:.1} MiB)",
                d.as_secs_f64(),
                mib(last)
            ),
        ),
        None => t.text(
            "disk: back under 50 MB",
            &format!("not within 90 s ({:.1} MiB: {})", mib(last), files(&data)),
        ),
    }
    Ok(())
}

/// What one sender got done.
#[derive(Default)]
struct Sent {
    sent: usize,
    accepted: usize,
    /// Refused as over the send rate.
    refused: usize,
}

/// Sends to `to` until `end` or `count` messages: every `pace`, or as fast as the home
/// answers (up to 4,096 in flight); texts of `len` bytes that begin with
/// the send time. Acks the status receipts it is pushed. Then waits (at
/// most 10 s) for the answers still due.
async fn send(
    link: &mut Link<ClientTls>,
    to: &str,
    pace: Option<Duration>,
    len: usize,
    count: usize,
    end: Instant,
    out: &mut Sent,
) -> anyhow::Result<()> {
    const WINDOW: usize = 4096;
    let t0 = Instant::now();
    let (mut sent, mut accepted, mut refused) = (0usize, 0usize, 0usize);
    let mut ack = None;
    let pad = "x".repeat(len.saturating_sub(24));
    let due = |k: usize| pace.map(|p| t0 + p.mul_f64(k as f64));
    let drain_until = end + Duration::from_secs(10);
    loop {
        // Kept up to date: a link that fails leaves the counts so far.
        *out = Sent {
            sent,
            accepted,
            refused,
        };
        let now = Instant::now();
        let open = now < end && sent < count;
        if !open && sent == accepted + refused {
            break;
        }
        anyhow::ensure!(
            now < drain_until,
            "answers missing: {} sent, {accepted} accepted",
            sent
        );
        while open
            && sent - accepted - refused < WINDOW
            && due(sent).is_none_or(|d| Instant::now() >= d)
        {
            let text = format!("t={} {pad}", super::BASE.elapsed().as_micros());
            link.feed(&AgentFrame::Send {
                id: new_id(),
                from: None,
                to: to.into(),
                text,
                reply_to: None,
            })
            .await?;
            sent += 1;
            if pace.is_none() && sent % 64 == 0 {
                break;
            }
        }
        if let Some(seq) = ack.take() {
            link.feed(&AgentFrame::Ack { seq }).await?;
        }
        link.flush().await?;
        let wake = if open { due(sent) } else { None }.unwrap_or(now + Duration::from_millis(50));
        tokio::select! {
            r = link.recv::<HomeFrame>() => match r? {
                Recv::Frame(HomeFrame::Accepted { .. }) => accepted += 1,
                Recv::Frame(HomeFrame::Event { seq, .. }) => ack = Some(seq),
                Recv::Frame(HomeFrame::Error { code: ErrorCode::RateLimited, .. }) => refused += 1,
                Recv::Frame(HomeFrame::Error { code, message, .. }) => bail!("{code:?}: {message}"),
                Recv::Closed => bail!("the home closed the link"),
                _ => {}
            },
            _ = tokio::time::sleep_until(wake.into()), if pace.is_some() || !open => {}
        }
        // Take what else is ready before writing again.
        while let Some(r) = futures_util::FutureExt::now_or_never(link.recv::<HomeFrame>()) {
            match r? {
                Recv::Frame(HomeFrame::Accepted { .. }) => accepted += 1,
                Recv::Frame(HomeFrame::Event { seq, .. }) => ack = Some(seq),
                Recv::Frame(HomeFrame::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }) => refused += 1,
                Recv::Frame(HomeFrame::Error { code, message, .. }) => bail!("{code:?}: {message}"),
                Recv::Closed => bail!("the home closed the link"),
                _ => {}
            }
        }
    }
    *out = Sent {
        sent,
        accepted,
        refused,
    };
    Ok(())
}

/// Takes what the home pushes until `end`, acking as an agent does (once
/// nothing more is ready); returns the send → receipt times of the
/// messages that carry a send time.
async fn receive(link: &mut Link<ClientTls>, end: Instant) -> anyhow::Result<Vec<Duration>> {
    let mut lat = Vec::new();
    while let Ok(r) = tokio::time::timeout_at(end.into(), link.recv::<HomeFrame>()).await {
        let mut next = Some(r?);
        let mut last = None;
        while let Some(r) = next.take() {
            if let Recv::Frame(HomeFrame::Event { seq, event }) = r {
                if let Event::Message(m) = event
                    && let Some(t) = m
                        .text
                        .strip_prefix("t=")
                        .and_then(|x| x.split(' ').next())
                        .and_then(|x| x.parse::<u64>().ok())
                {
                    let now = super::BASE.elapsed().as_micros() as u64;
                    lat.push(Duration::from_micros(now.saturating_sub(t)));
                }
                last = Some(seq);
            } else if let Recv::Closed = r {
                return Ok(lat);
            }
            next = futures_util::FutureExt::now_or_never(link.recv::<HomeFrame>()).transpose()?;
        }
        if let Some(seq) = last {
            link.send(&AgentFrame::Ack { seq }).await?;
        }
    }
    Ok(lat)
}

/// Reads and acks until `n` messages came (or `within` passed).
async fn receive_n(
    link: &mut Link<ClientTls>,
    n: usize,
    within: Duration,
) -> anyhow::Result<usize> {
    let end = Instant::now() + within;
    let mut got = 0usize;
    while got < n {
        let r = tokio::time::timeout_at(end.into(), link.recv::<HomeFrame>())
            .await
            .with_context(|| format!("{got} of {n} messages came"))??;
        let mut next = Some(r);
        let mut last = None;
        while let Some(r) = next.take() {
            if let Recv::Frame(HomeFrame::Event { seq, event }) = r {
                if matches!(event, Event::Message(_)) {
                    got += 1;
                }
                last = Some(seq);
            }
            next = futures_util::FutureExt::now_or_never(link.recv::<HomeFrame>()).transpose()?;
        }
        if let Some(seq) = last {
            link.send(&AgentFrame::Ack { seq }).await?;
        }
    }
    Ok(got)
}

/// `popupd-bench silent-worker TARGET SOURCE_IP COUNT MILLIS`: COUNT
/// silent sockets from SOURCE_IP against TARGET for MILLIS ms; prints how
/// many connections were made.
pub(crate) async fn silent_worker() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let [target, source, count, millis] = args.as_slice() else {
        bail!("usage: popupd-bench silent-worker TARGET SOURCE_IP COUNT MILLIS");
    };
    let target: std::net::SocketAddr = target.parse()?;
    let end = Instant::now() + Duration::from_millis(millis.parse()?);
    let connects = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count.parse::<usize>()? {
        let (connects, source) = (connects.clone(), source.clone());
        tasks.spawn(async move { silent(target, &source, end, &connects).await });
    }
    while tasks.join_next().await.is_some() {}
    println!("{}", connects.load(Ordering::Relaxed));
    Ok(())
}

/// One silent socket from `source`: connects, says nothing, and when the
/// home closes it connects again 100 ms later, until `end`.
async fn silent(target: std::net::SocketAddr, source: &str, end: Instant, connects: &AtomicU64) {
    let Ok(ip) = source.parse::<std::net::IpAddr>() else {
        return;
    };
    while Instant::now() < end {
        let Ok(s) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        if s.bind(std::net::SocketAddr::new(ip, 0)).is_err() {
            return;
        }
        if let Ok(Ok(mut c)) = tokio::time::timeout_at(end.into(), s.connect(target)).await {
            connects.fetch_add(1, Ordering::Relaxed);
            let mut b = [0u8; 64];
            let _ =
                tokio::time::timeout_at(end.into(), tokio::io::AsyncReadExt::read(&mut c, &mut b))
                    .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One wrong secret for `handle`, from 127.0.0.4.
async fn guess(target: std::net::SocketAddr, dial: &popupd_protocol::net::Dial, handle: String) {
    let attempt = async {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind("127.0.0.4:0".parse()?)?;
        let tcp = s.connect(target).await?;
        let mut link = popupd_protocol::net::dial_over(tcp, dial).await?;
        link.send(&AgentFrame::Hello {
            v: PROTOCOL_VERSION,
            handle,
            device: "desktop".into(),
            secret: "not-the-secret".into(),
            presence: None,
        })
        .await?;
        let _ = link.recv::<HomeFrame>().await;
        anyhow::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), attempt).await;
}

/// The size on disk of the files in `dir`.
fn disk_use(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Each file of a folder with its size on disk, for a figure that missed.
fn files(dir: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| Some((e.file_name(), e.metadata().ok()?)))
                .filter(|(_, m)| m.is_file())
                .map(|(n, m)| {
                    let mib = (m.blocks() * 512) as f64 / (1 << 20) as f64;
                    format!("{} {mib:.1} MiB", n.to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.join(", ")
}

/// The peak of a process's resident memory, sampled every 100 ms.
struct Sampler {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<u64>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(tokio::sync::Notify::new());
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = rss_kib(pid);
            loop {
                tokio::select! {
                    _ = s.notified() => return peak,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => peak = peak.max(rss_kib(pid)),
                }
            }
        });
        Sampler { stop, task }
    }

    /// The peak in KiB.
    async fn stop(self) -> u64 {
        self.stop.notify_one();
        self.task.await.unwrap_or(0)
    }
}
