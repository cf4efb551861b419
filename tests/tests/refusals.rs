//! Bad input gets a clear error and breaks nothing: wrong credentials, a
//! certificate from another CA, garbage and oversized frames, a spoofed
//! sender, a config with an unknown key.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use popupd_e2e::{Agent, HOME_A, HOME_B, Network, TestDir, popupd, secret_of};
use popupd_protocol::net::{self, Dial, Link, Recv, tls};
use popupd_protocol::{
    AGENT_PATH, AgentFrame, ErrorCode, HomeFrame, Message, PEER_PATH, PROTOCOL_VERSION, PeerFrame,
    new_id,
};

const T: Duration = Duration::from_secs(20);

fn agent_dial(net: &Network, ca: &std::path::Path) -> Dial {
    Dial {
        address: net.home_addrs[0].clone(),
        name: HOME_A.into(),
        path: AGENT_PATH,
        tls: tls::client_config(tls::roots_from(ca).unwrap(), None).unwrap(),
        proxy: None,
    }
}

async fn next_home(link: &mut Link<net::ClientTls>) -> HomeFrame {
    loop {
        match tokio::time::timeout(T, link.recv::<HomeFrame>())
            .await
            .expect("answer in time")
            .unwrap()
        {
            // The contact list follows every welcome; these tests are not about it.
            Recv::Frame(HomeFrame::Contacts { .. }) | Recv::Alive => continue,
            Recv::Frame(f) => return f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_breaks_nothing() {
    popupd_protocol::net::tls::install_default_provider();
    let dir = TestDir::new("refusals");
    let net = Network::start(&dir.path).await.unwrap();
    let ca = dir.path.join("pki/ca.crt");
    let a_cfg = net.add_user(0, "alice").unwrap();
    let b_cfg = net.add_user(1, "bob").unwrap();

    // A handle is unique in the network.
    let o = popupd(&[
        "user",
        "add",
        "alice",
        "-c",
        net.home_config(1).to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("belongs to home home-a.test"), "{e}");

    // 1. Wrong device credential.
    let mut link = net::dial(&agent_dial(&net, &ca)).await.unwrap();
    link.send(&AgentFrame::Hello {
        v: PROTOCOL_VERSION,
        handle: "alice".into(),
        device: "desktop".into(),
        secret: "wrong".into(),
        presence: None,
    })
    .await
    .unwrap();
    match next_home(&mut link).await {
        HomeFrame::Error {
            code: ErrorCode::AuthFailed,
            message,
            ..
        } => assert!(message.contains("popupd user add"), "{message}"),
        f => panic!("expected auth_failed, got {f:?}"),
    }

    // 2. Garbage and a spoofed sender on an authenticated link: error frames, link stays up.
    let mut link = net::dial(&agent_dial(&net, &ca)).await.unwrap();
    link.send(&AgentFrame::Hello {
        v: PROTOCOL_VERSION,
        handle: "alice".into(),
        device: "desktop".into(),
        secret: secret_of(&a_cfg).unwrap(),
        presence: None,
    })
    .await
    .unwrap();
    assert!(matches!(
        next_home(&mut link).await,
        HomeFrame::Welcome { .. }
    ));
    link.send_text("{this is not json".into()).await.unwrap();
    assert!(matches!(
        next_home(&mut link).await,
        HomeFrame::Error {
            code: ErrorCode::BadFrame,
            ..
        }
    ));
    link.send_text(r#"{"t":"launch_missiles"}"#.into())
        .await
        .unwrap();
    assert!(matches!(
        next_home(&mut link).await,
        HomeFrame::Error {
            code: ErrorCode::BadFrame,
            ..
        }
    ));
    let spoof = new_id();
    link.send(&AgentFrame::Send {
        id: spoof.clone(),
        from: Some("bob".into()),
        to: "bob".into(),
        text: "I am bob".into(),
        reply_to: None,
    })
    .await
    .unwrap();
    match next_home(&mut link).await {
        HomeFrame::Error {
            code: ErrorCode::SpoofedSender,
            id,
            ..
        } => assert_eq!(id.as_deref(), Some(spoof.as_str())),
        f => panic!("expected spoofed_sender, got {f:?}"),
    }
    let ok = new_id();
    link.send(&AgentFrame::Send {
        id: ok.clone(),
        from: None,
        to: "bob".into(),
        text: "still here".into(),
        reply_to: None,
    })
    .await
    .unwrap();
    loop {
        match next_home(&mut link).await {
            HomeFrame::Accepted { id } if id == ok => break,
            HomeFrame::Event { .. } => continue,
            f => panic!("expected accepted, got {f:?}"),
        }
    }
    // 3. An oversized frame: an error frame, then the home closes the link.
    // The home stops reading at the frame's header, so the rest of our
    // write may meet a closed socket (and a reset may swallow the error
    // frame); what must never happen is another answer or a crash, which
    // step 6 checks.
    let _ = link.send_text("x".repeat(200 * 1024)).await;
    match tokio::time::timeout(T, link.recv::<HomeFrame>())
        .await
        .expect("an answer or a close in time")
    {
        Ok(Recv::Frame(HomeFrame::Error { code, .. })) => assert_eq!(code, ErrorCode::TooLarge),
        Ok(Recv::Frame(f)) => panic!("expected too_large, got {f:?}"),
        Ok(_) | Err(_) => println!("the link was closed before the error frame could be read"),
    }

    // 4. A certificate from another CA: the home refuses the TLS handshake.
    let other = dir.path.join("other-ca");
    let other_s = other.to_str().unwrap();
    assert!(popupd(&["ca", "init", "--dir", other_s]).status.success());
    assert!(
        popupd(&["ca", "issue", HOME_B, "--dir", other_s])
            .status
            .success()
    );
    let rogue = tls::Identity::load(
        &other.join(format!("{HOME_B}.crt")),
        &other.join(format!("{HOME_B}.key")),
    )
    .unwrap();
    let dial = Dial {
        address: net.home_addrs[0].clone(),
        name: HOME_A.into(),
        path: PEER_PATH,
        tls: tls::client_config(tls::roots_from(&ca).unwrap(), Some(&rogue)).unwrap(),
        proxy: None,
    };
    let r = net::dial(&dial).await;
    let refused = match r {
        Err(_) => true,
        Ok(mut l) => {
            let _ = l
                .send(&PeerFrame::Hello {
                    v: PROTOCOL_VERSION,
                    home: HOME_B.into(),
                })
                .await;
            !matches!(
                l.recv::<PeerFrame>().await,
                Ok(Recv::Frame(PeerFrame::Welcome { .. }))
            )
        }
    };
    assert!(
        refused,
        "a home with a certificate from another CA must be refused"
    );
    // And an agent that trusts another CA refuses the home.
    assert!(
        net::dial(&agent_dial(&net, &other.join("ca.crt")))
            .await
            .is_err()
    );

    // 5. A real home claiming a user of another home: refused as spoofed.
    let b_id = tls::Identity::load(
        &dir.path.join(format!("pki/{HOME_B}.crt")),
        &dir.path.join(format!("pki/{HOME_B}.key")),
    )
    .unwrap();
    let mut peer = net::dial(&Dial {
        address: net.home_addrs[0].clone(),
        name: HOME_A.into(),
        path: PEER_PATH,
        tls: tls::client_config(tls::roots_from(&ca).unwrap(), Some(&b_id)).unwrap(),
        proxy: None,
    })
    .await
    .unwrap();
    peer.send(&PeerFrame::Hello {
        v: PROTOCOL_VERSION,
        home: HOME_B.into(),
    })
    .await
    .unwrap();
    assert!(matches!(
        peer.recv::<PeerFrame>().await.unwrap(),
        Recv::Frame(PeerFrame::Welcome { .. })
    ));
    let forged = Message {
        id: new_id(),
        from: "alice".into(),
        to: "alice".into(),
        text: "forged".into(),
        sent_at: popupd_protocol::now_ms(),
        reply_to: None,
    };
    peer.send(&PeerFrame::Deliver { n: 1, msg: forged })
        .await
        .unwrap();
    loop {
        match peer.recv::<PeerFrame>().await.unwrap() {
            Recv::Frame(PeerFrame::Ack {
                n: 1,
                refused: Some(r),
            }) => {
                assert_eq!(r.code, ErrorCode::SpoofedSender);
                break;
            }
            Recv::Alive => continue,
            f => panic!("expected a refusal, got {f:?}"),
        }
    }
    let home_a_log = net.homes[0].log_text();
    assert!(
        home_a_log.contains("spoofed sender refused"),
        "the refusal is logged"
    );

    // The fake home-b link goes away (home A would otherwise keep sending
    // home-b's items on it until its 60 s silence timeout).
    peer.close().await;

    // 6. Nothing crashed: a normal message still flows end to end.
    let alice = Agent::start(&dir.path, "alice", &a_cfg, "", &[])
        .await
        .unwrap();
    let bob = Agent::start(&dir.path, "bob", &b_cfg, "", &[])
        .await
        .unwrap();
    alice.wait_connected(true, T).await.unwrap();
    let id = alice
        .proxy()
        .await
        .unwrap()
        .send("bob", "after all that")
        .await
        .unwrap();
    bob.wait_for("the message", T, |s| s.received.iter().any(|r| r.0 == id))
        .await
        .unwrap();
    // The earlier "still here" came too (sent on the raw link as alice).
    bob.wait_for("the raw-link message", T, |s| {
        s.received.iter().any(|r| r.0 == ok)
    })
    .await
    .unwrap();
}

#[test]
fn config_errors_name_file_line_and_field() {
    let dir = TestDir::new("config");
    let f = dir.path.join("bad.yaml");
    std::fs::write(
        &f,
        "global:\n  name: g.test\n  listen: 127.0.0.1:1\n  colour: blue\n",
    )
    .unwrap();
    let o = popupd(&["check-config", f.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bad.yaml:4:"), "names file and line: {e}");
    assert!(e.contains("colour"), "names the key: {e}");
    assert!(e.contains("hint:"), "gives a hint: {e}");
    // `systemctl status` shows a unit's last journal lines: the reason is
    // the last line, after the offending lines and the hint.
    let last = e.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.contains("bad.yaml:4:") && last.contains("colour"),
        "the reason is the last line: {e}"
    );
    // `run` refuses it with EX_CONFIG, which the units do not restart.
    let o = popupd(&["run", "--config", f.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(78),
        "run with a bad config: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    std::fs::write(&f, "home:\n  name: h.test\n  listen: nowhere\n  cert: a\n  key: b\n  ca: c\n  data_dir: d\n  global: { name: g.test, address: \"g:1\" }\n").unwrap();
    let e =
        String::from_utf8_lossy(&popupd(&["check-config", f.to_str().unwrap()]).stderr).to_string();
    assert!(
        e.contains(":3:") && e.contains("home.listen"),
        "bad address: {e}"
    );

    std::fs::write(&f, "global:\n  name: g.test\n  listen: 127.0.0.1:1\n  cert: /nonexistent.crt\n  key: k\n  ca: c\n  data_dir: d\n").unwrap();
    let e =
        String::from_utf8_lossy(&popupd(&["check-config", f.to_str().unwrap()]).stderr).to_string();
    assert!(
        e.contains(":4:") && e.contains("global.cert") && e.contains("/nonexistent.crt"),
        "unreadable cert: {e}"
    );

    let o = popupd(&["check-config", "/nonexistent/popupd.yaml"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/popupd.yaml"));
}

/// Under systemd a server may write only its unit's state folder
/// (`StateDirectory=`, passed as `$STATE_DIRECTORY`): a `data_dir`
/// elsewhere is a config error, said before the service starts, rather
/// than "Read-only file system" once it runs.
#[test]
fn data_dir_outside_the_units_state_folder_is_refused() {
    let dir = TestDir::new("statedir");
    let d = dir.path.to_str().unwrap();
    assert!(popupd(&["ca", "init", "--dir", d]).status.success());
    assert!(
        popupd(&["ca", "issue", "g.test", "--dir", d])
            .status
            .success()
    );
    let f = dir.path.join("g.yaml");
    std::fs::write(
        &f,
        format!(
            "global:\n  name: g.test\n  listen: 127.0.0.1:1\n  cert: g.test.crt\n  key: g.test.key\n  ca: ca.crt\n  data_dir: {d}/home-a\n"
        ),
    )
    .unwrap();
    let check = |state: &str| {
        std::process::Command::new(popupd_e2e::bin("popupd"))
            .args(["check-config", f.to_str().unwrap()])
            .env("STATE_DIRECTORY", dir.path.join(state))
            .output()
            .unwrap()
    };
    let o = check("home");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "data_dir outside: {e}");
    let last = e.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.contains("data_dir") && last.contains("home-a") && last.contains("state folder"),
        "says which folder and why: {e}"
    );
    assert!(e.contains("/var/lib/popupd/NAME"), "says what to do: {e}");
    assert!(check("home-a").status.success());
    // Outside systemd there is no such folder to check.
    assert!(
        popupd(&["check-config", f.to_str().unwrap()])
            .status
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_cut_off_without_a_restart() {
    let dir = TestDir::new("revoke");
    let net = Network::start(&dir.path).await.unwrap();
    let a = net.add_user(0, "alice").unwrap();
    let alice = Agent::start(&dir.path, "alice", &a, "", &[]).await.unwrap();
    alice.wait_connected(true, T).await.unwrap();
    let o = popupd(&[
        "device",
        "revoke",
        "alice",
        "desktop",
        "-c",
        net.home_config(0).to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The live connection is closed within the home's check interval, and
    // the agent's reconnects are refused.
    alice
        .wait_connected(false, Duration::from_secs(30))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (connected, _, _) = alice.proxy().await.unwrap().status().await.unwrap();
    assert!(!connected, "a revoked device stays out");
    assert!(
        alice
            .proc
            .log_text()
            .contains("the home refused this device")
    );
}
