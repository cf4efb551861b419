//! `popupd-bench faults`: the fault rounds of `tests/faults.rs`, many of
//! them. For each process (both homes, the global server, both agents),
//! `--rounds` rounds (default 100) of `--messages` messages (default 100)
//! from alice to bob, each killing that process with `kill -9` at a random
//! point and starting it again; then counts of lost, doubled, reordered,
//! unsignalled messages and missing receipts. As root, also times delivery
//! after silent cuts of 30 s and 75 s between the two homes (network
//! namespaces and nftables).

use std::time::Duration;

use popupd_e2e::TestDir;
use popupd_e2e::faults::{Cast, Counts, Victim, cut_between_homes, kill_round};
use popupd_e2e::netns::{self, Netns};

use super::{Args, report};

pub(crate) async fn run(a: &Args) -> anyhow::Result<()> {
    let rounds = a.rounds;
    let n = if a.messages_set { a.messages } else { 100 };
    let mut t = report::Table::new(
        "faults",
        &format!("kill -9 during a stream: {rounds} rounds of {n} messages per process"),
    );
    let mut all = Counts::default();
    for v in Victim::ALL {
        // A fresh network per process keeps each history small.
        let slug: String = v
            .name()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let dir = TestDir::new(&format!("bench-faults-{slug}"));
        let mut cast = Cast::start(&dir.path).await;
        let mut c = Counts::default();
        for r in 0..rounds {
            let one =
                kill_round(&mut cast, v, &format!("r{r}"), n, Duration::from_secs(90)).await?;
            if !one.held() {
                eprintln!("{} round {r}: {one:?}", v.name());
            }
            c.add(&one);
        }
        let line = format!(
            "{} sent: {} lost, {} doubled ({} kills that may repeat one), {} reordered, {} unsignalled, {} without receipt",
            c.sent, c.lost, c.doubled, c.repeatable, c.reordered, c.unsignalled, c.no_receipt
        );
        // Now, too: the table comes at the end of a long run.
        println!("{}: {line}", v.name());
        t.text(v.name(), &line);
        for (what, v2) in [
            ("lost", c.lost),
            ("doubled", c.doubled),
            ("reordered", c.reordered),
            ("unsignalled", c.unsignalled),
            ("no receipt", c.no_receipt),
        ] {
            report::record(
                "faults",
                &format!("{} {what}", v.name()),
                v2 as f64,
                "messages",
            );
        }
        all.add(&c);
    }
    t.text(
        "all",
        &format!(
            "{} rounds, {} messages: the promise {}",
            all.rounds,
            all.sent,
            if all.held() { "held" } else { "BROKE" }
        ),
    );
    t.finish()?;

    let mut t = report::Table::new("cuts", "silent cut between the homes, then mended");
    match netns::available() {
        Err(why) => t.text("cuts", &format!("skipped: {why}")),
        Ok(()) => {
            for secs in [30, 75] {
                let ns = Netns::create(if secs == 30 { 240 } else { 241 })
                    .map_err(anyhow::Error::msg)?;
                let dir = TestDir::new(&format!("bench-cut-{secs}"));
                let c = cut_between_homes(&dir.path, &ns, Duration::from_secs(secs), 20).await?;
                t.row(
                    &format!("{secs} s cut: healed to first delivery"),
                    c.first.as_secs_f64(),
                    "s",
                    &format!(
                        "{:.1} s (all 20: {:.1} s, {})",
                        c.first.as_secs_f64(),
                        c.all.as_secs_f64(),
                        if c.in_order {
                            "in order"
                        } else {
                            "OUT OF ORDER"
                        }
                    ),
                );
            }
        }
    }
    t.finish()
}
