//! `popupd-bench offline`: a backlog for offline people, then everyone logs in.
//!
//! 100 senders store `--messages` messages (default 20,000) for 1,000
//! recipients who are all offline, as fast as the home accepts them (each
//! accepted is on disk). Then all 1,000 recipients log in at once and read
//! their mailboxes, acking as a real agent does. Prints the store rate, the
//! drain rate and the time until every mailbox is empty, and fails if any
//! recipient got a message twice or missed one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use popupd_e2e::{HOME_A, Network, TestDir};
use popupd_protocol::net::Recv;
use popupd_protocol::{AgentFrame, Event, HomeFrame, new_id};

use super::{Args, Logins, report};

const SENDERS: usize = 100;
const RECIPIENTS: usize = 1000;
/// Each phase ends by itself after this long.
const DEADLINE: Duration = Duration::from_secs(300);

/// Makes `n` accounts named PREFIX0.. on home 0; returns a login list.
fn accounts(net: &Network, dir: &TestDir, prefix: &str, n: usize) -> anyhow::Result<Logins> {
    let creds = super::add_many(net, dir, 0, prefix, n)?;
    let args: Vec<String> = vec![
        net.home_addrs[0].clone(),
        HOME_A.into(),
        dir.path.join("pki/ca.crt").display().to_string(),
        creds.display().to_string(),
        "0".into(),
        n.to_string(),
        "127.0.0.1".into(),
    ];
    Logins::parse(&args)
}

pub(crate) async fn run(a: &Args) -> anyhow::Result<()> {
    let total = a.messages - a.messages % RECIPIENTS;
    let per_recipient = total / RECIPIENTS;
    let dir = TestDir::new("bench-offline");
    let net = Network::start_with(&dir.path, "10s").await?;
    let senders = Arc::new(accounts(&net, &dir, "s", SENDERS)?);
    let recips = Arc::new(accounts(&net, &dir, "o", RECIPIENTS)?);
    let home = &net.homes[0];

    // Store: every recipient offline.
    let cpu0 = home.cpu_time();
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..SENDERS {
        let senders = senders.clone();
        let n = total / SENDERS + usize::from(i < total % SENDERS);
        tasks.spawn(async move {
            let mut link = senders.login(i).await?;
            let (mut sent, mut accepted) = (0usize, 0usize);
            const WINDOW: usize = 256;
            while accepted < n {
                anyhow::ensure!(t0.elapsed() < DEADLINE, "store phase timed out");
                while sent < n && sent - accepted < WINDOW {
                    // Message k of sender i goes to recipient (i + k × SENDERS) mod R:
                    // every recipient gets the same number.
                    let to = format!("o{}", (i + sent * SENDERS) % RECIPIENTS);
                    link.feed(&AgentFrame::Send {
                        id: new_id(),
                        from: None,
                        to,
                        text: "x".repeat(100),
                        reply_to: None,
                    })
                    .await?;
                    sent += 1;
                }
                link.flush().await?;
                match link.recv::<HomeFrame>().await? {
                    Recv::Frame(HomeFrame::Accepted { .. }) => accepted += 1,
                    Recv::Frame(HomeFrame::Error { message, .. }) => bail!("refused: {message}"),
                    Recv::Closed => bail!("home closed the link"),
                    _ => {}
                }
            }
            anyhow::Ok(accepted)
        });
    }
    let mut stored = 0;
    while let Some(r) = tasks.join_next().await {
        stored += r??;
    }
    let t_store = t0.elapsed();
    let cpu_store = home.cpu_time().saturating_sub(cpu0);

    // Drain: everyone logs in at once and reads until the mailbox is empty.
    let cpu1 = home.cpu_time();
    let t1 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..RECIPIENTS {
        let recips = recips.clone();
        tasks.spawn(async move {
            let mut link = recips.login(i).await?;
            let mut ids = HashSet::with_capacity(per_recipient);
            let mut dup = 0usize;
            while ids.len() < per_recipient {
                let left = DEADLINE.saturating_sub(t1.elapsed());
                let r = tokio::time::timeout(left, link.recv::<HomeFrame>())
                    .await
                    .context("drain phase timed out")??;
                // Take what is ready, then one cumulative ack, like the agent.
                let mut next = Some(r);
                let mut last = None;
                while let Some(r) = next.take() {
                    if let Recv::Frame(HomeFrame::Event { seq, event }) = r {
                        if let Event::Message(m) = event
                            && !ids.insert(m.id)
                        {
                            dup += 1;
                        }
                        last = Some(seq);
                    }
                    next = futures_util::FutureExt::now_or_never(link.recv::<HomeFrame>())
                        .and_then(Result::ok);
                }
                if let Some(seq) = last {
                    link.send(&AgentFrame::Ack { seq }).await?;
                }
            }
            anyhow::Ok((ids.len(), dup))
        });
    }
    let (mut got, mut dups) = (0usize, 0usize);
    while let Some(r) = tasks.join_next().await {
        let (n, d) = r??;
        got += n;
        dups += d;
    }
    let t_drain = t1.elapsed();
    let cpu_drain = home.cpu_time().saturating_sub(cpu1);

    let mut r = report::Table::new(
        "offline",
        &format!(
            "offline backlog: {SENDERS} senders → {RECIPIENTS} offline recipients on {HOME_A}, {total} messages of 100 bytes, fsync'd; then all log in"
        ),
    );
    r.row(
        "messages stored",
        stored as f64,
        "",
        &format!("{stored} of {total}"),
    );
    r.row(
        "store rate (accepted, on disk)",
        stored as f64 / t_store.as_secs_f64(),
        "msg/s",
        &format!("{:.0} msg/s", stored as f64 / t_store.as_secs_f64()),
    );
    r.row(
        "home CPU per stored message",
        cpu_store.as_micros() as f64 / stored.max(1) as f64,
        "µs",
        &format!(
            "{:.1} µs",
            cpu_store.as_micros() as f64 / stored.max(1) as f64
        ),
    );
    r.row(
        "time to empty every mailbox (1,000 logins included)",
        t_drain.as_secs_f64(),
        "s",
        &format!("{:.2} s", t_drain.as_secs_f64()),
    );
    r.row(
        "drain rate (delivered and acked)",
        got as f64 / t_drain.as_secs_f64(),
        "msg/s",
        &format!("{:.0} msg/s", got as f64 / t_drain.as_secs_f64()),
    );
    r.row(
        "home CPU per delivered message",
        cpu_drain.as_micros() as f64 / got.max(1) as f64,
        "µs",
        &format!("{:.1} µs", cpu_drain.as_micros() as f64 / got.max(1) as f64),
    );
    r.row(
        "lost / doubled",
        (total - got.min(total) + dups) as f64,
        "",
        &format!("{} / {dups}", total - got.min(total)),
    );
    r.finish()?;
    if got != total || dups != 0 {
        bail!("{total} stored but {got} delivered once and {dups} twice");
    }
    Ok(())
}
