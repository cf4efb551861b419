//! Contacts and presence, end to end: real homes and agents, private buses.
//!
//! - alice (home A) adds bob (home B), bob accepts; both see each other
//!   online; bob's "busy: in a meeting" reaches alice; a reconnect inside the
//!   grace period changes nothing; a stopped agent goes offline after the
//!   grace period, not before.
//! - Privacy: a non-contact's presence query is refused by the home; after
//!   alice blocks carol, carol's messages fail exactly as for a user who
//!   does not exist.
//! - Link loss between homes: alice sees bob as unknown while home B is
//!   down, and correct again after, without her agent reconnecting.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use popupd_e2e::{
    Agent, Network, PRESENCE_GRACE_S, TestDir, have, raw_agent, skip, start_xvfb, two_people,
    wait_port,
};
use popupd_protocol::{AgentFrame, ErrorCode, HomeFrame};

const T: Duration = Duration::from_secs(20);
const GRACE: Duration = Duration::from_secs(PRESENCE_GRACE_S);

fn ok(o: std::process::Output) -> String {
    assert!(
        o.status.success(),
        "popupctl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits until `agent` saw `handle` in `state` (and `text`, if given).
async fn wait_presence(
    agent: &Agent,
    handle: &str,
    state: &str,
    text: Option<&str>,
    within: Duration,
) {
    let what = format!("{handle} {state} {text:?}");
    agent
        .wait_for(&what, within, |s| {
            s.presence_of(handle)
                .is_some_and(|(st, tx)| st == state && text.is_none_or(|t| t == tx))
        })
        .await
        .unwrap();
}

/// alice and bob on two homes, contacts of each other.
async fn contacts(dir: &std::path::Path) -> (Network, Agent, Agent) {
    let (net, alice, bob) = two_people(dir, "", "").await;
    befriend(&alice, &bob).await;
    (net, alice, bob)
}

/// alice asks bob, bob accepts; each then sees the other's presence.
async fn befriend(alice: &Agent, bob: &Agent) {
    assert_eq!(
        ok(alice.popupctl(&["contacts", "add", "bob"])).trim(),
        "asked bob"
    );
    bob.wait_for("alice's request", T, |s| {
        s.requests.contains(&"alice".to_string())
    })
    .await
    .unwrap();
    let table = ok(bob.popupctl(&["contacts"]));
    assert!(
        table.contains("alice") && table.contains("asks you"),
        "{table}"
    );
    let table = ok(alice.popupctl(&["contacts"]));
    assert!(
        table.contains("bob") && table.contains("request sent"),
        "{table}"
    );
    ok(bob.popupctl(&["contacts", "accept", "alice"]));
    alice
        .wait_for("bob's presence", T, |s| s.presence_of("bob").is_some())
        .await
        .unwrap();
    bob.wait_for("alice's presence", T, |s| s.presence_of("alice").is_some())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_see_each_others_presence_across_homes() {
    let dir = TestDir::new("presence");
    let (_net, alice, mut bob) = contacts(&dir.path).await;
    wait_presence(&alice, "bob", "online", None, T).await;
    wait_presence(&bob, "alice", "online", None, T).await;
    let table = ok(alice.popupctl(&["contacts"]));
    let row = table
        .lines()
        .find(|l| l.starts_with("bob"))
        .unwrap_or_default();
    assert!(row.contains("online"), "{table}");

    // Busy with a text, set by hand: alice sees both.
    ok(bob.popupctl(&["presence", "busy", "in", "a", "meeting"]));
    assert_eq!(ok(bob.popupctl(&["presence"])).trim(), "busy: in a meeting");
    wait_presence(&alice, "bob", "busy", Some("in a meeting"), T).await;

    // A reconnect inside the grace period changes nothing for alice (the
    // state set by hand survives the restart, too).
    let before = alice.seen.lock().unwrap().presence.len();
    bob.proc.kill9();
    bob.restart().await.unwrap();
    bob.wait_connected(true, T).await.unwrap();
    assert_eq!(ok(bob.popupctl(&["presence"])).trim(), "busy: in a meeting");
    tokio::time::sleep(GRACE + Duration::from_secs(2)).await;
    let after: Vec<_> = alice.seen.lock().unwrap().presence[before..]
        .iter()
        .map(|p| (p.1.clone(), p.2.clone()))
        .collect();
    assert!(after.is_empty(), "a quick reconnect showed as {after:?}");

    // Stopped for good: offline after the grace period, not before.
    let stopped = Instant::now();
    bob.proc.stop();
    tokio::time::sleep(GRACE / 2).await;
    assert_eq!(
        alice.seen.lock().unwrap().presence_of("bob"),
        Some(("busy", "in a meeting")),
        "offline before the grace period ended"
    );
    wait_presence(&alice, "bob", "offline", None, GRACE + T).await;
    let seen_at = alice
        .seen
        .lock()
        .unwrap()
        .presence
        .iter()
        .rev()
        .find(|p| p.1 == "bob")
        .map(|p| p.0)
        .unwrap();
    assert!(
        seen_at.duration_since(stopped) >= GRACE - Duration::from_millis(200),
        "offline after {:?}, grace is {GRACE:?}",
        seen_at.duration_since(stopped)
    );

    // Writing to a contact who is offline: `Send` returns at once, the
    // message waits (queued, then accepted), it does not fail.
    let p = alice.proxy().await.unwrap();
    let t = Instant::now();
    let id = p.send("bob", "still there?").await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "Send took {:?}",
        t.elapsed()
    );
    let status = p.message(&id).await.unwrap().status;
    assert!(
        ["queued", "accepted"].contains(&status.as_str()),
        "{status}"
    );
    alice.wait_status(&id, "accepted", T).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        p.message(&id).await.unwrap().status,
        "accepted",
        "bob is offline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_see_nothing_and_the_blocked_cannot_tell_who_exists() {
    let dir = TestDir::new("privacy");
    let (net, alice, _bob) = contacts(&dir.path).await;
    let carol_cfg = net.add_user(1, "carol").unwrap();

    // carol, no contact of alice, asks the home for her presence the way a
    // modified client would: refused.
    {
        let mut link = raw_agent(&net, 1, "carol", &carol_cfg).await.unwrap();
        link.send(&AgentFrame::PresenceOf {
            handle: "alice".into(),
        })
        .await
        .unwrap();
        let answer = loop {
            match tokio::time::timeout(T, link.recv::<HomeFrame>())
                .await
                .unwrap()
                .unwrap()
            {
                popupd_protocol::net::Recv::Frame(HomeFrame::Contacts { contacts }) => {
                    assert!(contacts.is_empty(), "{contacts:?}")
                }
                popupd_protocol::net::Recv::Frame(f) => break f,
                _ => {}
            }
        };
        match answer {
            HomeFrame::Error { code, .. } => assert_eq!(code, ErrorCode::NotAccepted),
            f => panic!("carol learned {f:?}"),
        }
        link.close().await;
    }

    let carol = Agent::start(&dir.path, "carol", &carol_cfg, "", &[])
        .await
        .unwrap();
    carol.wait_connected(true, T).await.unwrap();
    ok(carol.popupctl(&["contacts", "add", "alice"]));
    alice
        .wait_for("carol's request", T, |s| {
            s.requests.contains(&"carol".to_string())
        })
        .await
        .unwrap();
    ok(alice.popupctl(&["contacts", "block", "carol"]));
    let deadline = Instant::now() + T;
    loop {
        let t = ok(alice.popupctl(&["contacts"]));
        if t.lines()
            .any(|l| l.starts_with("carol") && l.contains("blocked"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "carol never showed as blocked: {t}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // carol's request is gone from her side, as after a decline.
    let deadline = Instant::now() + T;
    while ok(carol.popupctl(&["contacts"])).contains("alice") {
        assert!(Instant::now() < deadline, "carol still lists alice");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Messages from carol fail, with the same words as to nobody at all.
    let p = carol.proxy().await.unwrap();
    let to_alice = p.send("alice", "hello?").await.unwrap();
    let to_nobody = p.send("nobody", "hello?").await.unwrap();
    for id in [&to_alice, &to_nobody] {
        carol.wait_status(id, "failed", T).await.unwrap();
    }
    let reason = |id: &str| {
        let h = ok(carol.popupctl(&["history", "-n", "10", "--json"]));
        h.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["id"] == id)
            .map(|v| v["reason"].as_str().unwrap_or_default().to_string())
            .unwrap()
    };
    let (r1, r2) = (reason(&to_alice), reason(&to_nobody));
    assert!(r1.contains("not accepted"), "{r1}");
    assert_eq!(r1, r2, "carol can tell a block from a missing user");
    assert!(
        alice.seen.lock().unwrap().received.is_empty(),
        "a blocked message reached alice"
    );
    // carol never saw alice's presence.
    assert!(carol.seen.lock().unwrap().presence_of("alice").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_recovers_after_the_link_between_homes_drops() {
    let dir = TestDir::new("presence-link");
    let (mut net, alice, bob) = contacts(&dir.path).await;
    wait_presence(&alice, "bob", "online", None, T).await;
    let connected_before = alice.seen.lock().unwrap().connection.len();

    net.homes[1].stop();
    wait_presence(&alice, "bob", "unknown", None, T).await;
    net.homes[1].restart().unwrap();
    wait_port(&net.home_addrs[1]).await.unwrap();
    bob.wait_connected(true, Duration::from_secs(40))
        .await
        .unwrap();
    wait_presence(&alice, "bob", "online", None, Duration::from_secs(40)).await;
    // And changes flow again.
    ok(bob.popupctl(&["presence", "away", "lunch"]));
    wait_presence(&alice, "bob", "away", Some("lunch"), T).await;
    assert_eq!(
        alice.seen.lock().unwrap().connection.len(),
        connected_before,
        "alice's agent reconnected"
    );
}

/// Moves the pointer on `display`: input, as far as the X server knows.
fn touch(display: &str, x: u32) {
    let st = std::process::Command::new("xdotool")
        .args(["mousemove", &x.to_string(), "100"])
        .env("DISPLAY", display)
        .status()
        .unwrap();
    assert!(st.success(), "xdotool failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_desktop_turns_away_and_input_brings_it_back() {
    const NAME: &str = "idle_desktop_turns_away_and_input_brings_it_back";
    for tool in ["Xvfb", "xdotool"] {
        if !have(tool) {
            return skip(
                NAME,
                &format!("`{tool}` is not installed (apt install xvfb xdotool)"),
            );
        }
    }
    let dir = TestDir::new("auto-away");
    // The idle time comes from the X server's screen saver extension, as in
    // any X11 session.
    let (_x, display) = start_xvfb(&dir.path, 120).await;
    touch(&display, 10);
    let net = Network::start(&dir.path).await.unwrap();
    let a = net.add_user(0, "alice").unwrap();
    let b = net.add_user(1, "bob").unwrap();
    let alice = Agent::start(&dir.path, "alice", &a, "", &[]).await.unwrap();
    let env = format!("DISPLAY={display}");
    let bob = Agent::start(
        &dir.path,
        "bob",
        &b,
        "  away_after: 2s\n  idle_source: x11\n",
        &["env", &env],
    )
    .await
    .unwrap();
    alice.wait_connected(true, T).await.unwrap();
    bob.wait_connected(true, T).await.unwrap();
    befriend(&alice, &bob).await;

    // Nobody touches bob's desktop: away, for him and for alice.
    wait_presence(&alice, "bob", "away", None, T).await;
    assert_eq!(ok(bob.popupctl(&["presence"])).trim(), "away");
    assert!(
        bob.proc.log_text().contains("source=\"x11\"")
            || bob.proc.log_text().contains("source=x11"),
        "bob's agent did not use the X11 idle source"
    );

    // Input: back online within the poll interval.
    touch(&display, 200);
    wait_presence(&alice, "bob", "online", None, Duration::from_secs(6)).await;

    // A state set by hand is not overridden by idleness or input.
    ok(bob.popupctl(&["presence", "busy"]));
    wait_presence(&alice, "bob", "busy", None, T).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    touch(&display, 300);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        alice.seen.lock().unwrap().presence_of("bob"),
        Some(("busy", ""))
    );
    // `online` returns to automatic.
    ok(bob.popupctl(&["presence", "online"]));
    wait_presence(&alice, "bob", "away", None, T).await;
}
