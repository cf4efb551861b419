//! A home on the open internet holds its ground: a flooding user is slowed
//! alone and loses nothing; silent sockets cannot lock others out; a full
//! mailbox, guessed secrets, a revoked home, a plugin anyone could have
//! changed and a frame too large are each refused, and whoever hits the
//! limit is told why.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use popupd_e2e::{
    Agent, HOME_A, Layout, Network, TestDir, bin, http_get, metric_sample, popupd, raw_agent,
    secret_of,
};
use popupd_protocol::net::{self, Dial, Recv, tls};
use popupd_protocol::{AGENT_PATH, AgentFrame, ErrorCode, HomeFrame, PROTOCOL_VERSION, new_id};

const T: Duration = Duration::from_secs(30);

/// A network whose homes have these lines under `limits:`.
async fn network_with(dir: &std::path::Path, limits: &str) -> Network {
    let layout = Layout {
        home_yaml: format!("  limits:\n{limits}"),
        ..Layout::default()
    };
    Network::start_laid_out(dir, layout).await.unwrap()
}

/// alice floods bob far past her send rate; carol keeps writing to dave
/// meanwhile. alice is told to slow down, her messages still all arrive,
/// once each and in order, and carol's arrive at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_user_is_slowed_alone_and_loses_nothing() {
    let dir = TestDir::new("flood");
    let net = network_with(&dir.path, "    send_rate: 40\n    send_burst: 40\n").await;
    let mut agents = Vec::new();
    for (i, h) in [(0, "alice"), (1, "bob"), (0, "carol"), (1, "dave")] {
        let cfg = net.add_user(i, h).unwrap();
        agents.push(Agent::start(&dir.path, h, &cfg, "", &[]).await.unwrap());
    }
    for a in &agents {
        a.wait_connected(true, T).await.unwrap();
    }
    let (alice, bob, carol, dave) = (&agents[0], &agents[1], &agents[2], &agents[3]);
    let ap = alice.proxy().await.unwrap();
    let mut flood = Vec::new();
    for i in 0..240 {
        flood.push(ap.send("bob", &format!("flood {i}")).await.unwrap());
    }
    // While alice's backlog drains at 40 a second, carol's messages go
    // through at once.
    let cp = carol.proxy().await.unwrap();
    let mut worst = Duration::ZERO;
    for i in 0..5 {
        let t0 = Instant::now();
        let id = cp.send("dave", &format!("meanwhile {i}")).await.unwrap();
        dave.wait_for("carol's message", T, |s| {
            s.received.iter().any(|r| r.0 == id)
        })
        .await
        .unwrap();
        worst = worst.max(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("carol to dave during the flood: at worst {worst:?}");
    assert!(worst < Duration::from_secs(2), "carol waited {worst:?}");
    // alice was told why hers wait.
    alice
        .wait_for("a reason to wait", T, |s| {
            flood.iter().any(|id| {
                s.status
                    .get(id)
                    .is_some_and(|v| v.iter().any(|x| x == "queued"))
            })
        })
        .await
        .unwrap();
    bob.wait_for("the whole flood", Duration::from_secs(60), |s| {
        flood.iter().all(|id| s.received.iter().any(|r| &r.0 == id))
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
        .filter(|id| flood.contains(id))
        .collect();
    assert_eq!(got, flood, "in order, once each");
    assert!(
        net.homes[0].log_text().contains("rate_limited")
            || alice.proc.log_text().contains("slow down"),
        "the limit was hit"
    );
}

/// A thousand sockets from one address that never log in take only that
/// address's share of the pending pool, and are closed after
/// `login_timeout`; an agent from another address logs in meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_from_one_address_lock_nobody_out() {
    let dir = TestDir::new("silent");
    let net = network_with(
        &dir.path,
        "    pending_per_address: 64\n    login_timeout: 3s\n",
    )
    .await;
    let addr: std::net::SocketAddr = net.home_addrs[0].parse().unwrap();
    let mut socks = Vec::new();
    for _ in 0..1000 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.3:0".parse().unwrap()).unwrap();
        match s.connect(addr).await {
            Ok(c) => socks.push(c),
            Err(_) => break,
        }
    }
    println!("{} silent sockets open from 127.0.0.3", socks.len());
    assert!(socks.len() >= 900, "the kernel took the connections");
    // alice's agent dials from 127.0.0.1.
    let a = net.add_user(0, "alice").unwrap();
    let t0 = Instant::now();
    let alice = Agent::start(&dir.path, "alice", &a, "", &[]).await.unwrap();
    alice
        .wait_connected(true, Duration::from_secs(10))
        .await
        .unwrap();
    println!("alice logged in {:?} after starting", t0.elapsed());
    // The silent ones are gone after the login deadline: a read ends.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut open = 0;
    for s in &mut socks {
        let mut b = [0u8; 1];
        if let Ok(Err(_) | Ok(0)) = tokio::time::timeout(
            Duration::from_millis(20),
            tokio::io::AsyncReadExt::read(s, &mut b),
        )
        .await
        {
            continue;
        }
        open += 1;
    }
    assert_eq!(open, 0, "every silent socket was closed");
    let log = net.homes[0].log_text();
    assert!(
        log.contains("too many from one address"),
        "the refusals are logged once: {}",
        log.lines().filter(|l| l.contains("127.0.0.3")).count()
    );
}

/// An agent that acks without end costs the store a job per burst of
/// acks, not one per ack: what one connection can make the store do stays
/// bounded (acks are cumulative, so nothing is lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_without_end_cost_the_store_little() {
    let dir = TestDir::new("acks");
    let layout = Layout {
        metrics: true,
        ..Layout::default()
    };
    let net = Network::start_laid_out(&dir.path, layout).await.unwrap();
    let cfg = net.add_user(0, "alice").unwrap();
    net.add_user(0, "bob").unwrap();
    let mut link = raw_agent(&net, 0, "alice", &cfg).await.unwrap();
    let jobs = || {
        let (_, _, m) = http_get(&net.metrics_addrs[1], "/metrics", None);
        metric_sample(&m, "popupd_store_batch_jobs_sum").unwrap()
    };
    let before = jobs();
    for seq in 1..=20_000u64 {
        link.feed(&AgentFrame::Ack { seq }).await.unwrap();
    }
    // A message after them: its answer comes once the home has read them.
    let id = new_id();
    link.send(&AgentFrame::Send {
        id: id.clone(),
        from: None,
        to: "bob".into(),
        text: "after the acks".into(),
        reply_to: None,
    })
    .await
    .unwrap();
    let deadline = Instant::now() + T;
    loop {
        assert!(Instant::now() < deadline, "no answer to the message");
        match tokio::time::timeout(T, link.recv::<HomeFrame>()).await {
            Ok(Ok(Recv::Frame(HomeFrame::Accepted { id: got, .. }))) if got == id => break,
            Ok(Ok(Recv::Frame(HomeFrame::Error { message, .. }))) => panic!("{message}"),
            Ok(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ran = jobs() - before;
    println!("20,000 acks and a message: {ran} store jobs");
    assert!(ran < 2_000.0, "{ran} store jobs for 20,000 acks");
}

/// bob's mailbox holds 5; alice's sixth message fails, and she is told his
/// mailbox is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_fails_the_message_with_its_reason() {
    let dir = TestDir::new("mailbox-full");
    let net = network_with(&dir.path, "    mailbox_messages: 5\n").await;
    let a = net.add_user(0, "alice").unwrap();
    net.add_user(1, "bob").unwrap();
    net.add_user(0, "carol").unwrap();
    let alice = Agent::start(&dir.path, "alice", &a, "", &[]).await.unwrap();
    alice.wait_connected(true, T).await.unwrap();
    let ap = alice.proxy().await.unwrap();
    // bob (another home) and carol (this one) are offline.
    for to in ["bob", "carol"] {
        let mut ids = Vec::new();
        for i in 0..7 {
            ids.push(ap.send(to, &format!("{to} {i}")).await.unwrap());
        }
        let (kept, over) = ids.split_at(5);
        for id in over {
            alice.wait_status(id, "failed", T).await.unwrap();
            let m = ap.message(id).await.unwrap();
            assert!(m.reason.contains("mailbox is full"), "{to}: {m:?}");
        }
        for id in kept {
            alice.wait_status(id, "accepted", T).await.unwrap();
            assert_ne!(ap.message(id).await.unwrap().status, "failed");
        }
    }
}

/// Guessing secrets: after a few failures each try waits, however right it
/// is, and the log says so once, not once per guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_back_off_and_are_logged_once() {
    popupd_protocol::net::tls::install_default_provider();
    let dir = TestDir::new("guess");
    let net = network_with(&dir.path, "    login_failures: 3\n").await;
    let a = net.add_user(0, "alice").unwrap();
    let ca = dir.path.join("pki/ca.crt");
    let device = std::fs::read_to_string(&a)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("device: ").map(str::to_owned))
        .unwrap();
    let try_login = |secret: String| {
        let (addr, ca, device) = (net.home_addrs[0].clone(), ca.clone(), device.clone());
        async move {
            let mut link = net::dial(&Dial {
                address: addr,
                name: HOME_A.into(),
                path: AGENT_PATH,
                tls: tls::client_config(tls::roots_from(&ca).unwrap(), None).unwrap(),
                proxy: None,
            })
            .await
            .unwrap();
            link.send(&AgentFrame::Hello {
                v: PROTOCOL_VERSION,
                handle: "alice".into(),
                device,
                secret,
                presence: None,
            })
            .await
            .unwrap();
            match link.recv::<HomeFrame>().await.unwrap() {
                Recv::Frame(HomeFrame::Welcome { .. }) => Ok(()),
                Recv::Frame(HomeFrame::Error { code, message, .. }) => Err((code, message)),
                other => panic!("{other:?}"),
            }
        }
    };
    let mut waits = 0;
    for _ in 0..8 {
        let (code, message) = try_login("0".repeat(64)).await.unwrap_err();
        assert_eq!(code, ErrorCode::AuthFailed);
        waits += usize::from(message.contains("too many failed logins"));
    }
    assert!(
        waits >= 4,
        "guesses past the third wait ({waits} of 8 told so)"
    );
    // The right secret too, while it waits.
    let (_, message) = try_login(secret_of(&a).unwrap()).await.unwrap_err();
    assert!(message.contains("too many failed logins"), "{message}");
    let said = net.homes[0]
        .log_text()
        .matches("agent authentication failed")
        .count();
    assert_eq!(said, 1, "one log line for the address, not one per guess");
}

/// The administrator revokes home B: home A and the global server, once
/// reloaded, cut it off; its users are found nowhere, and what waited for
/// it fails with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_home_is_cut_off_on_reload() {
    let dir = TestDir::new("revoke");
    let net = Network::start(&dir.path).await.unwrap();
    let a = net.add_user(0, "alice").unwrap();
    let b = net.add_user(1, "bob").unwrap();
    let alice = Agent::start(&dir.path, "alice", &a, "", &[]).await.unwrap();
    let bob = Agent::start(&dir.path, "bob", &b, "", &[]).await.unwrap();
    alice.wait_connected(true, T).await.unwrap();
    bob.wait_connected(true, T).await.unwrap();
    let ap = alice.proxy().await.unwrap();
    let first = ap.send("bob", "before").await.unwrap();
    alice.wait_status(&first, "delivered", T).await.unwrap();

    let pki = dir.path.join("pki");
    let o = popupd(&[
        "ca",
        "revoke",
        "home-b.test",
        "--dir",
        pki.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for p in [&net.global, &net.homes[0]] {
        let pid = p.pid().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
    }
    let deadline = Instant::now() + T;
    while !net.homes[0]
        .log_text()
        .contains("closed the links of a revoked home")
    {
        assert!(
            Instant::now() < deadline,
            "home A never cut home B off:\n{}",
            net.homes[0].log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // bob is nowhere now.
    let after = ap.send("bob", "after").await.unwrap();
    alice.wait_status(&after, "failed", T).await.unwrap();
    assert!(
        !bob.seen
            .lock()
            .unwrap()
            .received
            .iter()
            .any(|r| r.0 == after),
        "nothing reaches a revoked home"
    );
    // And home B's own tries to link are refused, by the global server
    // and by home A when bob answers.
    let back = bob
        .proxy()
        .await
        .unwrap()
        .send("alice", "from a revoked home")
        .await
        .unwrap();
    let deadline = Instant::now() + T;
    while !(net.global.log_text().contains("revoked in the network")
        && net.homes[0].log_text().contains("revoked in the network"))
    {
        assert!(Instant::now() < deadline, "home B was never refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !alice
            .seen
            .lock()
            .unwrap()
            .received
            .iter()
            .any(|r| r.0 == back),
        "nothing comes from a revoked home"
    );
}

/// A plugin anyone could have changed, or another user's, is refused
/// before any of its code runs, with a log line naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_others_could_change_is_refused() {
    const NAME: &str = "a_plugin_others_could_change_is_refused";
    let dir = TestDir::new("plugin-owner");
    let lib = bin("examples/libhello.so");
    if !lib.exists() {
        return popupd_e2e::skip(NAME, "the hello example plugin was not built");
    }
    use std::os::unix::fs::PermissionsExt;
    let plugins = dir.path.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o755)).unwrap();
    let so = plugins.join("hello.so");
    std::fs::copy(&lib, &so).unwrap();
    std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o666)).unwrap();
    let net = Network::start(&dir.path).await.unwrap();
    let a = net.add_user(0, "alice").unwrap();
    let extra = format!("  plugin_dirs: [\"{}\"]\n", plugins.display());
    let alice = Agent::start(&dir.path, "alice", &a, &extra, &[])
        .await
        .unwrap();
    alice.wait_connected(true, T).await.unwrap();
    assert!(
        alice
            .proxy()
            .await
            .unwrap()
            .plugins()
            .await
            .unwrap()
            .is_empty()
    );
    let log = alice.proc.log_text();
    assert!(
        log.contains("plugin refused") && log.contains("hello.so") && log.contains("chmod go-w"),
        "{log}"
    );
}

/// A client that keeps writing after a frame too large still reads why it
/// is closed: the home reads on a moment before it closes, so no reset
/// destroys the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_reaches_a_client_that_keeps_writing() {
    let dir = TestDir::new("too-large");
    let net = Network::start(&dir.path).await.unwrap();
    let a = net.add_user(0, "alice").unwrap();
    let mut link = raw_agent(&net, 0, "alice", &a).await.unwrap();
    let big = format!(
        "{{\"t\":\"presence_of\",\"handle\":\"{}\"}}",
        "x".repeat(200 * 1024)
    );
    link.send_text(big).await.unwrap();
    for _ in 0..50 {
        if link.send(&AgentFrame::Ack { seq: 0 }).await.is_err() {
            break;
        }
    }
    let mut codes = Vec::new();
    while let Ok(Ok(r)) = tokio::time::timeout(T, link.recv::<HomeFrame>()).await {
        match r {
            Recv::Frame(HomeFrame::Error { code, .. }) => {
                codes.push(code);
            }
            Recv::Closed => break,
            _ => {}
        }
    }
    assert!(codes.contains(&ErrorCode::TooLarge), "got {codes:?}");
}

/// bob reads nothing while 4,000 large messages come in, so his queue in
/// the home overflows and he must be fed from disk; then he reads. He gets
/// every message once and in order, and the home goes quiet afterwards (a
/// connection that lagged once used to spin on it for good, burning a core
/// and holding up the idle upkeep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_fell_behind_gets_everything_and_the_home_rests() {
    use popupd_protocol::{Event, new_id};
    const N: usize = 4000;
    let dir = TestDir::new("lagged");
    let net = network_with(&dir.path, "    send_rate: 100000\n    send_burst: 100000\n").await;
    let a = net.add_user(0, "alice").unwrap();
    let b = net.add_user(0, "bob").unwrap();
    let mut bob = raw_agent(&net, 0, "bob", &b).await.unwrap();
    let mut alice = raw_agent(&net, 0, "alice", &a).await.unwrap();
    // 4,000 of 15 KB: more than the sockets between home and bob hold
    // (loopback buffers here grow to 32 MB).
    let text = "x".repeat(15_000);
    let mut ids = Vec::new();
    for _ in 0..N {
        let id = new_id();
        alice
            .feed(&AgentFrame::Send {
                id: id.clone(),
                from: None,
                to: "bob".into(),
                text: text.clone(),
                reply_to: None,
            })
            .await
            .unwrap();
        ids.push(id);
    }
    alice.flush().await.unwrap();
    // alice's receipts are read as they come, so that only bob lags.
    let reader = tokio::spawn(async move {
        while let Ok(Ok(Recv::Frame(_) | Recv::Alive)) =
            tokio::time::timeout(T, alice.recv::<HomeFrame>()).await
        {}
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::new();
    while got.len() < N {
        match tokio::time::timeout(T, bob.recv::<HomeFrame>()).await {
            Ok(Ok(Recv::Frame(HomeFrame::Event { seq, event }))) => {
                if let Event::Message(m) = event {
                    got.push(m.id);
                }
                bob.send(&AgentFrame::Ack { seq }).await.unwrap();
            }
            Ok(Ok(Recv::Frame(_) | Recv::Alive)) => {}
            other => panic!("bob, after {} messages: {other:?}", got.len()),
        }
    }
    assert_eq!(got, ids, "every message once, in order");
    // The case this is about happened: bob's queue overflowed.
    assert!(
        net.homes[0].log_text().contains("fell behind"),
        "bob's queue never overflowed: nothing was tried"
    );
    // Everything is read and acked: the home has nothing left to do.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = net.homes[0].cpu_time();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let busy = net.homes[0].cpu_time() - cpu;
    reader.abort();
    assert!(
        busy < Duration::from_millis(500),
        "the home used {busy:?} of CPU in 3 s with nothing to do"
    );
}
