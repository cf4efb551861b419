//! The fault harness: counted streams of messages from alice (home A) to
//! bob (home B) while a process is killed with `kill -9` and started again,
//! and the counts that say whether the promise held: nothing lost, nothing
//! shown twice, everything in order, every message signalled and every
//! status back. Used by `tests/faults.rs` (a few rounds) and by
//! `popupd-bench faults` (many).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{Agent, Layout, Network, two_people_on};

/// What a round kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Victim {
    HomeA,
    HomeB,
    Global,
    AliceAgent,
    BobAgent,
}

impl Victim {
    pub const ALL: [Victim; 5] = [
        Victim::HomeA,
        Victim::HomeB,
        Victim::Global,
        Victim::AliceAgent,
        Victim::BobAgent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Victim::HomeA => "home A",
            Victim::HomeB => "home B",
            Victim::Global => "global",
            Victim::AliceAgent => "alice's agent",
            Victim::BobAgent => "bob's agent",
        }
    }
}

/// A network with alice on home A and bob on home B.
pub struct Cast {
    pub net: Network,
    pub alice: Agent,
    pub bob: Agent,
}

impl Cast {
    pub async fn start(dir: &Path) -> Cast {
        Cast::start_on(dir, Layout::default()).await
    }

    /// On a network laid out as `layout` says.
    pub async fn start_on(dir: &Path, layout: Layout) -> Cast {
        let (net, alice, bob) = two_people_on(dir, layout, "", "").await;
        Cast { net, alice, bob }
    }

    fn kill(&mut self, v: Victim) {
        match v {
            Victim::HomeA => self.net.homes[0].kill9(),
            Victim::HomeB => self.net.homes[1].kill9(),
            Victim::Global => self.net.global.kill9(),
            Victim::AliceAgent => self.alice.proc.kill9(),
            Victim::BobAgent => self.bob.proc.kill9(),
        }
    }

    async fn start_again(&mut self, v: Victim) -> anyhow::Result<()> {
        match v {
            Victim::HomeA => self.net.homes[0].restart(),
            Victim::HomeB => self.net.homes[1].restart(),
            Victim::Global => self.net.global.restart(),
            Victim::AliceAgent => self.alice.restart().await,
            Victim::BobAgent => self.bob.restart().await,
        }
    }
}

/// What a round found. All but `sent` and `repeated` should be 0.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub rounds: usize,
    pub sent: usize,
    /// Accepted by alice's agent, never stored by bob's.
    pub lost: usize,
    /// Shown (`MessageReceived`) more than once: the extra signals.
    pub doubled: usize,
    /// Pairs shown in the other order than sent.
    pub reordered: usize,
    /// Stored by bob's agent but never signalled.
    pub unsignalled: usize,
    /// Whose sender never saw `delivered`.
    pub no_receipt: usize,
    /// Kills of bob's agent: each may repeat one signal (the instant
    /// between emitting it and storing that it went out).
    pub repeatable: usize,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.rounds += o.rounds;
        self.sent += o.sent;
        self.lost += o.lost;
        self.doubled += o.doubled;
        self.reordered += o.reordered;
        self.unsignalled += o.unsignalled;
        self.no_receipt += o.no_receipt;
        self.repeatable += o.repeatable;
    }

    /// Whether the promise held: nothing lost, reordered, unsignalled or
    /// without its receipt, and no more repeats than kills of bob's agent.
    pub fn held(&self) -> bool {
        self.lost == 0
            && self.reordered == 0
            && self.unsignalled == 0
            && self.no_receipt == 0
            && self.doubled <= self.repeatable
    }
}

/// One round: alice sends `n` messages to bob, tagged `tag`, one every few
/// milliseconds; at a random point `victim` is killed with `kill -9`, and
/// started again after a random 0.2-1.5 s (an agent before the next send,
/// as the sender is the test itself). Then waits (at most `settle`) for
/// every message to be shown and delivered, and counts.
pub async fn kill_round(
    cast: &mut Cast,
    victim: Victim,
    tag: &str,
    n: usize,
    settle: Duration,
) -> anyhow::Result<Counts> {
    let at = fastrand::usize(n / 5..n * 4 / 5);
    let down = Duration::from_millis(fastrand::u64(200..1500));
    let mut killed: Option<Instant> = None;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        if i == at {
            cast.kill(victim);
            killed = Some(Instant::now());
            if victim == Victim::AliceAgent {
                tokio::time::sleep(down).await;
            }
        }
        if killed.is_some_and(|k| k.elapsed() >= down) {
            killed = None;
            cast.start_again(victim).await?;
        }
        ids.push(send(&cast.alice, &format!("{tag}-{i}")).await?);
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    if let Some(k) = killed {
        tokio::time::sleep(down.saturating_sub(k.elapsed())).await;
        cast.start_again(victim).await?;
    }
    settle_and_count(
        &cast.alice,
        &cast.bob,
        &ids,
        settle,
        usize::from(victim == Victim::BobAgent),
    )
    .await
}

/// Waits (at most `settle`) until bob has shown every message of `ids` and
/// alice has seen each delivered, then counts. `repeatable`: kills of bob's
/// agent in the round.
pub async fn settle_and_count(
    alice: &Agent,
    bob: &Agent,
    ids: &[String],
    settle: Duration,
    repeatable: usize,
) -> anyhow::Result<Counts> {
    let n = ids.len();
    // Every message shown, and its receipt back (or the time is up).
    let deadline = Instant::now() + settle;
    loop {
        let shown = {
            let seen = bob.seen.lock().unwrap_or_else(|e| e.into_inner());
            let got: std::collections::HashSet<&String> =
                seen.received.iter().map(|r| &r.0).collect();
            ids.iter().filter(|i| got.contains(i)).count()
        };
        let delivered = {
            let seen = alice.seen.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter().filter(|i| seen.reached(i, "delivered")).count()
        };
        if (shown == n && delivered == n) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Late repeats would show now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    count(alice, bob, ids, repeatable).await
}

/// Sends one message from alice to bob, trying again while her agent is
/// away (killed, or not yet on the bus).
pub async fn send(alice: &Agent, text: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = async {
            alice
                .proxy()
                .await?
                .send("bob", text)
                .await
                .map_err(anyhow::Error::from)
        }
        .await;
        match r {
            Ok(id) => return Ok(id),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn count(
    alice: &Agent,
    bob: &Agent,
    ids: &[String],
    repeatable: usize,
) -> anyhow::Result<Counts> {
    let pos: HashMap<&String, usize> = ids.iter().enumerate().map(|(i, id)| (id, i)).collect();
    let (order, doubled) = {
        let seen = bob.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut first = Vec::new();
        let mut times: HashMap<&String, usize> = HashMap::new();
        for (id, _, _) in &seen.received {
            if let Some(&p) = pos.get(id) {
                let t = times.entry(&ids[p]).or_default();
                if *t == 0 {
                    first.push(p);
                }
                *t += 1;
            }
        }
        let doubled: usize = times.values().map(|t| t - 1).sum();
        (first, doubled)
    };
    let mut reordered = 0;
    for (i, a) in order.iter().enumerate() {
        reordered += order[i + 1..].iter().filter(|b| *b < a).count();
    }
    let shown: std::collections::HashSet<usize> = order.iter().copied().collect();
    let bob_p = bob.proxy().await?;
    let (mut lost, mut unsignalled) = (0, 0);
    for (i, id) in ids.iter().enumerate() {
        let stored = bob_p.message(id).await.is_ok();
        match (stored, shown.contains(&i)) {
            (false, _) => lost += 1,
            (true, false) => unsignalled += 1,
            (true, true) => {}
        }
    }
    let no_receipt = {
        let seen = alice.seen.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter().filter(|i| !seen.reached(i, "delivered")).count()
    };
    Ok(Counts {
        rounds: 1,
        sent: ids.len(),
        lost,
        doubled,
        reordered,
        unsignalled,
        no_receipt,
        repeatable,
    })
}

/// What a cut of the wire between the two homes cost.
#[derive(Clone, Debug)]
pub struct CutTimes {
    /// From healing to the first message sent during the cut shown.
    pub first: Duration,
    /// From healing to every message sent during the cut shown.
    pub all: Duration,
    /// Shown in the order sent, each once.
    pub in_order: bool,
    /// From healing to alice seeing `read` for the message bob read
    /// during the cut.
    pub read_back: Duration,
    /// From healing to alice getting the contact request bob made during
    /// the cut.
    pub request: Duration,
}

/// Cuts the wire between home A (here) and home B (in namespace `ns`, with
/// bob's agent) silently for `cut`, while alice sends `n` messages (one
/// every 100 ms from the start of the cut), and bob reads her last message
/// from before and asks her to be a contact; then mends it and times the
/// delivery of all that. The global server stays reachable from both.
pub async fn cut_between_homes(
    dir: &Path,
    ns: &crate::netns::Netns,
    cut: Duration,
    n: usize,
) -> anyhow::Result<CutTimes> {
    use crate::{HomeLayout, Layout};
    const T: Duration = Duration::from_secs(30);
    let mut layout = Layout {
        global_ip: "0.0.0.0".into(),
        ..Layout::default()
    };
    layout.homes[0] = HomeLayout {
        listen_ip: "0.0.0.0".into(),
        public_ip: ns.host_ip.clone(),
        ..HomeLayout::default()
    };
    layout.homes[1] = HomeLayout {
        listen_ip: ns.inner_ip.clone(),
        public_ip: ns.inner_ip.clone(),
        global_ip: ns.host_ip.clone(),
        prefix: ns.prefix(),
        ..HomeLayout::default()
    };
    let net = Network::start_laid_out(dir, layout).await?;
    let global_port: u16 = net
        .global_addr
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .parse()?;
    let a = net.add_user(0, "alice")?;
    let b = net.add_user(1, "bob")?;
    let alice = Agent::start(dir, "alice", &a, "", &[]).await?;
    let prefix = ns.prefix();
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let bob = Agent::start(dir, "bob", &b, "", &prefix).await?;
    alice.wait_connected(true, T).await?;
    bob.wait_connected(true, T).await?;
    let ap = alice.proxy().await?;
    let before = ap.send("bob", "before").await?;
    alice.wait_status(&before, "delivered", T).await?;

    ns.cut(Some(global_port)).map_err(anyhow::Error::msg)?;
    let cut_at = Instant::now();
    let bp = bob.proxy().await?;
    bp.mark_read(&before).await?;
    bp.add_contact("alice").await?;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(ap.send("bob", &format!("during {i}")).await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(cut.saturating_sub(cut_at.elapsed())).await;
    ns.heal().map_err(anyhow::Error::msg)?;
    let healed = Instant::now();
    bob.wait_for("the first message of the cut", T, |s| {
        s.received.iter().any(|r| r.0 == ids[0])
    })
    .await?;
    let first = healed.elapsed();
    bob.wait_for("every message of the cut", T, |s| {
        ids.iter().all(|id| s.received.iter().any(|r| &r.0 == id))
    })
    .await?;
    let all = healed.elapsed();
    alice.wait_status(&before, "read", T).await?;
    let read_back = healed.elapsed();
    alice
        .wait_for("bob's contact request", T, |s| {
            s.requests.iter().any(|h| h == "bob")
        })
        .await?;
    let request = healed.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = bob.seen.lock().unwrap_or_else(|e| e.into_inner());
    let got: Vec<&String> = seen
        .received
        .iter()
        .map(|r| &r.0)
        .filter(|id| ids.contains(id))
        .collect();
    Ok(CutTimes {
        first,
        all,
        in_order: got == ids.iter().collect::<Vec<_>>(),
        read_back,
        request,
    })
}
