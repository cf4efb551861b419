//! End-to-end: alice on home A, bob on home B, real processes, private
//! D-Bus buses, `popupctl` and D-Bus as the hands.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use popupd_e2e::{Agent, Network, TestDir, two_people};

const T: Duration = Duration::from_secs(20);

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_pops_up_across_homes_and_reply_comes_back() {
    let dir = TestDir::new("reply");
    let (_net, alice, bob) = two_people(&dir.path, "", "").await;

    // bob watches with popupctl, as a person would.
    let watch = std::process::Command::new(popupd_e2e::bin("popupctl"))
        .args(["--bus", &bob.bus.address, "--json", "watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let id = alice
        .proxy()
        .await
        .unwrap()
        .send("bob", "lunch?")
        .await
        .unwrap();
    bob.wait_for("MessageReceived", T, |s| {
        s.received
            .iter()
            .any(|(i, f, t)| *i == id && f == "alice" && t == "lunch?")
    })
    .await
    .unwrap();
    alice.wait_status(&id, "delivered", T).await.unwrap();

    // bob reads it and answers with popupctl.
    let o = bob.popupctl(&["read", &id]);
    assert!(o.status.success(), "{o:?}");
    let o = bob.popupctl(&["reply", &id, "12:30?"]);
    assert!(o.status.success(), "{o:?}");
    let reply_id = out(&o);
    alice
        .wait_for("the reply", T, |s| {
            s.received
                .iter()
                .any(|(i, f, t)| *i == reply_id && f == "bob" && t == "12:30?")
        })
        .await
        .unwrap();
    alice.wait_status(&id, "read", T).await.unwrap();
    let statuses = alice.seen.lock().unwrap().status[&id].clone();
    assert_eq!(
        statuses,
        ["accepted", "delivered", "read"],
        "status moves forward, once each"
    );

    // popupctl watch showed the message.
    let watch = watch;
    let _ = std::process::Command::new("kill")
        .args(["-INT", &watch.id().to_string()])
        .status();
    let o = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("\"text\":\"lunch?\"") && text.contains(&id),
        "watch printed: {text}"
    );

    // History on both sides.
    let h = out(&alice.popupctl(&["--json", "history", "bob"]));
    assert!(
        h.contains("\"status\":\"read\"") && h.contains("12:30?"),
        "{h}"
    );
    let st = alice.popupctl(&["status"]);
    assert!(
        st.status.success() && out(&st).contains("connected to home-a.test"),
        "{st:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_gets_everything_in_order_once() {
    let dir = TestDir::new("offline");
    let (_net, alice, mut bob) = two_people(&dir.path, "", "").await;
    bob.proc.stop();
    let p = alice.proxy().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(p.send("bob", &format!("msg {i}")).await.unwrap());
    }
    alice
        .wait_for("all accepted", T, |s| {
            ids.iter().all(|id| s.reached(id, "accepted"))
        })
        .await
        .unwrap();
    assert!(bob.seen.lock().unwrap().received.is_empty());
    bob.restart().await.unwrap();
    bob.wait_for("100 messages", T, |s| s.received.len() >= 100)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got: Vec<String> = bob
        .seen
        .lock()
        .unwrap()
        .received
        .iter()
        .map(|r| r.0.clone())
        .collect();
    assert_eq!(got, ids, "all 100, in order, once each");
    alice
        .wait_for("all delivered", T, |s| {
            ids.iter().all(|id| s.reached(id, "delivered"))
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_is_asked_once_and_cached_routes_survive_its_loss() {
    let dir = TestDir::new("global");
    let (mut net, alice, bob) = two_people(&dir.path, "", "").await;
    let p = alice.proxy().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(p.send("bob", &format!("m{i}")).await.unwrap());
    }
    bob.wait_for("5 messages", T, |s| s.received.len() == 5)
        .await
        .unwrap();
    let lookups = net.global.log_text().matches("lookup: bob for").count();
    assert_eq!(lookups, 1, "home A asked the global server once for bob");

    net.global.stop();
    let late = p.send("bob", "global is down").await.unwrap();
    bob.wait_for("message with global down", T, |s| {
        s.received.iter().any(|r| r.0 == late)
    })
    .await
    .unwrap();

    // An unknown handle fails clearly once the directory is back.
    net.global.restart().unwrap();
    popupd_e2e::wait_port(&net.global_addr).await.unwrap();
    let ghost = p.send("nobody", "hello?").await.unwrap();
    alice.wait_status(&ghost, "failed", T).await.unwrap();
    let h = String::from_utf8_lossy(&alice.popupctl(&["history", "nobody"]).stdout).to_string();
    assert!(h.contains("no such user"), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_home_loses_nothing_and_doubles_nothing() {
    let dir = TestDir::new("crash");
    let (mut net, alice, bob) = two_people(&dir.path, "", "").await;
    let p = alice.proxy().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..2000 {
        ids.push(p.send("bob", &format!("n{i}")).await.unwrap());
        if i == 700 {
            net.homes[1].kill9();
        }
        if i == 1400 {
            net.homes[1].restart().unwrap();
        }
    }
    alice
        .wait_for("2000 accepted", Duration::from_secs(60), |s| {
            ids.iter().all(|id| s.reached(id, "accepted"))
        })
        .await
        .unwrap();
    bob.wait_for("2000 messages", Duration::from_secs(90), |s| {
        s.received.len() >= 2000
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = bob.seen.lock().unwrap();
    let unique: HashSet<&String> = seen.received.iter().map(|r| &r.0).collect();
    assert_eq!(seen.received.len(), 2000, "no message shown twice");
    assert_eq!(unique.len(), 2000);
    assert!(
        ids.iter().all(|i| unique.contains(i)),
        "every accepted message arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_back_connection_resumes_without_loss_or_doubles() {
    let dir = TestDir::new("drop");
    // alice reaches home A only through a CONNECT proxy; killing it cuts her link.
    let net = Network::start(&dir.path).await.unwrap();
    let port = popupd_e2e::free_port();
    let proxy_addr = format!("127.0.0.1:{port}");
    let mut proxy = popupd_e2e::Proc::spawn(
        &[
            popupd_e2e::bin("popupd-test-proxy").display().to_string(),
            proxy_addr.clone(),
        ],
        &dir.path.join("proxy.log"),
    )
    .unwrap();
    popupd_e2e::wait_port(&proxy_addr).await.unwrap();
    let a = net.add_user(0, "alice").unwrap();
    let b = net.add_user(1, "bob").unwrap();
    let alice = Agent::start(
        &dir.path,
        "alice",
        &a,
        &format!("  proxy: http://{proxy_addr}\n"),
        &[],
    )
    .await
    .unwrap();
    let bob = Agent::start(&dir.path, "bob", &b, "", &[]).await.unwrap();
    alice.wait_connected(true, T).await.unwrap();
    bob.wait_connected(true, T).await.unwrap();

    let p = alice.proxy().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..600 {
        ids.push(p.send("bob", &format!("d{i}")).await.unwrap());
        if i == 200 {
            proxy.kill9();
        }
        if i == 400 {
            alice.wait_connected(false, T).await.unwrap();
            proxy.restart().unwrap();
        }
    }
    alice.wait_connected(true, T).await.unwrap();
    bob.wait_for("600 messages", Duration::from_secs(60), |s| {
        s.received.len() >= 600
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got: Vec<String> = bob
        .seen
        .lock()
        .unwrap()
        .received
        .iter()
        .map(|r| r.0.clone())
        .collect();
    assert_eq!(got.len(), 600, "nothing doubled");
    let set: HashSet<&String> = got.iter().collect();
    assert!(ids.iter().all(|i| set.contains(i)), "nothing lost");
}

/// An agent that never pings (its keepalive is an hour) stays connected
/// well past the home's `idle_timeout` (10 s here), because the home pings
/// a quiet link and the agent answers; a message then reaches it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_pings_a_quiet_agent_and_keeps_it() {
    let dir = TestDir::new("home-pings");
    let (net, alice, bob) = two_people(&dir.path, "", "  keepalive: 1h\n").await;
    tokio::time::sleep(Duration::from_secs(14)).await;
    let home_b = net.homes[1].log_text();
    assert!(
        !home_b.contains("silent for"),
        "home B dropped bob's quiet link:\n{home_b}"
    );
    let ups = bob.proc.log_text().matches("back connection up").count();
    assert_eq!(
        ups,
        1,
        "bob's link stayed up; log:\n{}",
        bob.proc.log_text()
    );
    let id = alice
        .proxy()
        .await
        .unwrap()
        .send("bob", "still there?")
        .await
        .unwrap();
    bob.wait_for("the message", Duration::from_secs(3), |s| {
        s.received.iter().any(|(i, _, _)| *i == id)
    })
    .await
    .unwrap();
}

/// `popupctl status` right after the agent started (as when D-Bus starts
/// it for that very call) waits for its first connection instead of
/// saying "not connected".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_fresh_agent_waits_for_its_first_connection() {
    let dir = TestDir::new("fresh-status");
    let (mut net, mut alice, _bob) = two_people(&dir.path, "", "").await;
    // Home A is down while alice's agent starts afresh: it cannot connect.
    net.homes[0].stop();
    alice.restart().await.unwrap();
    let bus = alice.bus.address.clone();
    let asked = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(popupd_e2e::bin("popupctl"))
            .args(["--bus", &bus, "status"])
            .output()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    net.homes[0].restart().unwrap();
    let st = status.await.unwrap();
    let said = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success() && said.contains("alice: connected to home-a.test"),
        "popupctl status {:?} after {:?}: {said}{}",
        st.status,
        asked.elapsed(),
        String::from_utf8_lossy(&st.stderr)
    );
}
