//! The promise under faults: a message once sent pops up exactly once, in
//! order, and its receipts come back, whatever is killed or cut on the way.
//!
//! - `kill -9` of each process (both homes, the global server, both agents)
//!   at a random point of a counted stream, a few rounds each;
//! - a silent cut (nftables drops, nothing resets) of bob's back connection,
//!   and of the link between the homes, with read marks and contact
//!   changes made during it (root: network namespaces);
//! - home A's disk full, then freed (root: a small tmpfs);
//! - `popupctl send` during a burst of status signals.
//!
//! The same rounds, a hundred per process, are `popupd-bench faults`.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use popupd_e2e::faults::{Cast, Counts, Victim, cut_between_homes, kill_round};
use popupd_e2e::netns::{self, Netns};
use popupd_e2e::{Agent, HomeLayout, Layout, Network, TestDir, skip, two_people};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_any_process_loses_doubles_and_reorders_nothing() {
    let dir = TestDir::new("kill9");
    let mut cast = Cast::start(&dir.path).await;
    let mut total = Counts::default();
    for round in 0..2 {
        for v in Victim::ALL {
            let tag = format!("{v:?}-{round}");
            let c = kill_round(&mut cast, v, &tag, 120, Duration::from_secs(60))
                .await
                .unwrap();
            println!("{:<14} round {round}: {c:?}", v.name());
            assert!(c.held(), "{} round {round}: {c:?}", v.name());
            total.add(&c);
        }
    }
    println!("total: {total:?}");
}

/// A message and bob's read mark, contact answer and contact request made
/// while his back connection is cut silently: all of it arrives once the
/// wire is mended, and he notices the dead link within two keepalives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_cut_of_the_back_connection_loses_no_read_mark_or_contact_change() {
    const NAME: &str = "a_silent_cut_of_the_back_connection_loses_no_read_mark_or_contact_change";
    if let Err(why) = netns::available() {
        return skip(NAME, &why);
    }
    let ns = Netns::create(100 + std::process::id() % 100).unwrap();
    let dir = TestDir::new("cut-agent");
    // Home B is reached at this host's end of the pair; bob's agent runs
    // inside the namespace.
    let mut layout = Layout::default();
    layout.homes[1] = HomeLayout {
        listen_ip: "0.0.0.0".into(),
        public_ip: ns.host_ip.clone(),
        ..HomeLayout::default()
    };
    let net = Network::start_laid_out(&dir.path, layout).await.unwrap();
    let a = net.add_user(0, "alice").unwrap();
    let b = net.add_user(1, "bob").unwrap();
    let _carol = net.add_user(1, "carol").unwrap();
    let alice = Agent::start(&dir.path, "alice", &a, "", &[]).await.unwrap();
    let prefix = ns.prefix();
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let bob = Agent::start(&dir.path, "bob", &b, "", &prefix)
        .await
        .unwrap();
    alice.wait_connected(true, T).await.unwrap();
    bob.wait_connected(true, T).await.unwrap();
    let (ap, bp) = (alice.proxy().await.unwrap(), bob.proxy().await.unwrap());
    let first = ap.send("bob", "before the cut").await.unwrap();
    bob.wait_for("the first message", T, |s| {
        s.received.iter().any(|r| r.0 == first)
    })
    .await
    .unwrap();
    alice.wait_status(&first, "delivered", T).await.unwrap();
    ap.add_contact("bob").await.unwrap();
    bob.wait_for("alice's request", T, |s| {
        s.requests.iter().any(|h| h == "alice")
    })
    .await
    .unwrap();

    ns.cut(None).unwrap();
    let cut_at = Instant::now();
    // While the link is dead but not yet known to be: bob reads, accepts
    // alice, and asks carol (home B too); alice writes again.
    let out = bob.popupctl(&["read", &first]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bob.popupctl(&["contacts", "accept", "alice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bob.popupctl(&["contacts", "add", "carol"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = ap.send("bob", "during the cut").await.unwrap();
    bob.wait_connected(false, Duration::from_secs(10))
        .await
        .unwrap();
    let noticed = cut_at.elapsed();
    println!("bob's agent noticed the dead link after {noticed:?} (keepalive 1 s)");
    assert!(
        noticed <= Duration::from_millis(2500),
        "noticed after {noticed:?}; the promise is two keepalive periods (2 s here)"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    ns.heal().unwrap();
    let healed = Instant::now();
    bob.wait_for("the message sent during the cut", T, |s| {
        s.received.iter().any(|r| r.0 == second)
    })
    .await
    .unwrap();
    println!("delivered {:?} after the wire was mended", healed.elapsed());
    alice.wait_status(&first, "read", T).await.unwrap();
    let deadline = Instant::now() + T;
    loop {
        let mine = bp.contacts().await.unwrap();
        let theirs = ap.contacts().await.unwrap();
        let accepted = |l: &[popupd_ipc::ContactEntry], h: &str| {
            l.iter().any(|c| c.handle == h && c.relation == "accepted")
        };
        let asked = mine
            .iter()
            .any(|c| c.handle == "carol" && c.relation == "requested");
        if accepted(&mine, "alice") && accepted(&theirs, "bob") && asked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "contact changes lost: bob {mine:?}, alice {theirs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = bob.seen.lock().unwrap();
    assert_eq!(seen.received.iter().filter(|r| r.0 == second).count(), 1);
}

/// The link between the two homes is cut silently for longer than a
/// peer link may stay silent; what alice sends meanwhile arrives within
/// seconds of the wire being mended, in order, once, and so do bob's read
/// mark and contact request made during the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_cut_between_homes_delays_delivery_only_until_healed() {
    const NAME: &str = "a_silent_cut_between_homes_delays_delivery_only_until_healed";
    if let Err(why) = netns::available() {
        return skip(NAME, &why);
    }
    let ns = Netns::create(200 + std::process::id() % 30).unwrap();
    let dir = TestDir::new("cut-homes");
    // Longer than a peer link may stay silent (15 s), so both homes find
    // their link dead while the wire is cut.
    let t = cut_between_homes(&dir.path, &ns, Duration::from_secs(18), 20)
        .await
        .unwrap();
    println!("after an 18 s cut: {t:?}");
    assert!(t.in_order, "in order, once each");
    assert!(t.all <= Duration::from_secs(8), "{t:?}");
}

/// Home A's disk fills up: alice's messages stay queued, and she is told
/// why; once space is freed they all go out, once each and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_at_the_home_delays_messages_and_says_why() {
    const NAME: &str = "a_full_disk_at_the_home_delays_messages_and_says_why";
    if !popupd_e2e::is_root() {
        return skip(
            NAME,
            "needs root to mount a small tmpfs (CI runs it as root)",
        );
    }
    let dir = TestDir::new("disk-full");
    let mnt = dir.path.join("home-a-disk");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let mut layout = Layout::default();
    layout.homes[0].data_dir = Some(mnt.join("data"));
    let net = Network::start_laid_out(&dir.path, layout).await.unwrap();
    let a = net.add_user(0, "alice").unwrap();
    let b = net.add_user(1, "bob").unwrap();
    let alice = Agent::start(&dir.path, "alice", &a, "", &[]).await.unwrap();
    let bob = Agent::start(&dir.path, "bob", &b, "", &[]).await.unwrap();
    alice.wait_connected(true, T).await.unwrap();
    bob.wait_connected(true, T).await.unwrap();
    let ap = alice.proxy().await.unwrap();
    let first = ap.send("bob", "before").await.unwrap();
    alice.wait_status(&first, "delivered", T).await.unwrap();

    // Fill the disk.
    let filler = mnt.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            ap.send("bob", &format!("full {i} {}", "x".repeat(2000)))
                .await
                .unwrap(),
        );
    }
    // They wait, and say why.
    let deadline = Instant::now() + T;
    loop {
        let m = ap.message(&ids[0]).await.unwrap();
        if m.status == "queued" && m.reason.contains("disk is full") {
            println!("while full: {} {:?}", m.status, m.reason);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reason shown while the disk is full: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    alice
        .wait_for("the reason as a signal", T, |s| {
            s.status
                .get(&ids[0])
                .is_some_and(|v| v.iter().any(|x| x == "queued"))
        })
        .await
        .unwrap();
    assert!(
        bob.seen
            .lock()
            .unwrap()
            .received
            .iter()
            .all(|r| !ids.contains(&r.0)),
        "nothing was accepted while the disk was full"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    bob.wait_for("every message", T, |s| {
        ids.iter().all(|id| s.received.iter().any(|r| &r.0 == id))
    })
    .await
    .unwrap();
    println!("all delivered {:?} after space was freed", freed.elapsed());
    let got: Vec<String> = bob
        .seen
        .lock()
        .unwrap()
        .received
        .iter()
        .map(|r| r.0.clone())
        .filter(|id| ids.contains(id))
        .collect();
    assert_eq!(got, ids, "in order, once each");
    let m = ap.message(&ids[0]).await.unwrap();
    assert!(
        m.reason.is_empty(),
        "the reason is gone once accepted: {m:?}"
    );
}

/// 600 messages wait in alice's outbox while home A is down; when it comes
/// back, their status signals burst out. `popupctl send` started during
/// the burst returns at once (and with `--wait`, once its own message is
/// accepted). The 600 reach bob in order, although home A learns bob's
/// route while it takes them (the first waits for the router, later ones
/// find the route cached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn popupctl_send_returns_during_a_burst_of_status_signals() {
    let dir = TestDir::new("burst");
    let (mut net, alice, bob) = two_people(&dir.path, "", "").await;
    net.homes[0].kill9();
    alice.wait_connected(false, T).await.unwrap();
    let ap = alice.proxy().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..600 {
        ids.push(ap.send("bob", &format!("queued {i}")).await.unwrap());
    }
    net.homes[0].restart().unwrap();
    let mut runs = Vec::new();
    for i in 0..30 {
        let bus = alice.bus.address.clone();
        let wait = i % 3 == 0;
        runs.push(tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            // Bounded, so a hang fails the test rather than stalling it.
            let mut cmd = Command::new("timeout");
            cmd.arg("90").arg(popupd_e2e::bin("popupctl"));
            cmd.args(["--bus", &bus, "send"]);
            if wait {
                cmd.args(["--wait", "accepted", "--timeout", "60s"]);
            }
            let out = cmd.args(["bob", &format!("burst {i}")]).output().unwrap();
            (wait, out, t0.elapsed())
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in runs {
        let (wait, out, took) = r.await.unwrap();
        assert!(
            out.status.success(),
            "popupctl send (wait: {wait}) failed after {took:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let limit = if wait { T } else { Duration::from_secs(5) };
        assert!(took < limit, "popupctl send (wait: {wait}) took {took:?}");
    }
    bob.wait_for("the 600", Duration::from_secs(60), |s| {
        ids.iter().all(|id| s.received.iter().any(|r| &r.0 == id))
    })
    .await
    .unwrap();
    let seen = bob.seen.lock().unwrap();
    let got: Vec<&String> = seen
        .received
        .iter()
        .map(|r| &r.0)
        .filter(|id| ids.contains(id))
        .collect();
    assert_eq!(got, ids.iter().collect::<Vec<_>>(), "in order, once each");
}

/// SIGTERM under load: a home stops within 3 s (it answers what is in
/// hand, says `bye`, and gives its connections 2 s), and every message
/// alice saw accepted is kept; after a restart all arrive, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_stops_in_time_and_keeps_every_accepted_message() {
    let dir = TestDir::new("sigterm");
    let (mut net, alice, bob) = two_people(&dir.path, "", "").await;
    let ap = alice.proxy().await.unwrap();
    for (i, home) in [0usize, 1].into_iter().enumerate() {
        let mut ids = Vec::new();
        let mut took = None;
        for n in 0..600 {
            ids.push(ap.send("bob", &format!("{i}-{n}")).await.unwrap());
            if n == 300 {
                // The stream is in full flow: hundreds in flight.
                took = Some(
                    net.homes[home]
                        .stop_within(Duration::from_secs(10))
                        .unwrap(),
                );
            }
        }
        let took = took.unwrap();
        println!("home {home} stopped {took:?} after SIGTERM under load");
        assert!(took <= Duration::from_secs(3), "took {took:?}");
        let accepted: Vec<String> = {
            let seen = alice.seen.lock().unwrap();
            ids.iter()
                .filter(|id| seen.reached(id, "accepted"))
                .cloned()
                .collect()
        };
        net.homes[home].restart().unwrap();
        bob.wait_for("every message", Duration::from_secs(60), |s| {
            ids.iter().all(|id| s.received.iter().any(|r| &r.0 == id))
        })
        .await
        .unwrap();
        let got: Vec<String> = bob
            .seen
            .lock()
            .unwrap()
            .received
            .iter()
            .map(|r| r.0.clone())
            .filter(|id| ids.contains(id))
            .collect();
        assert_eq!(got, ids, "in order, once each");
        assert!(accepted.iter().all(|id| got.contains(id)));
    }
}
