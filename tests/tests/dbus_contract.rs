//! The D-Bus contract, `org.popupd.Agent1`, is written down once: in
//! `ipc/org.popupd.Agent1.xml`, which the package installs in
//! `/usr/share/dbus-1/interfaces/`. The running agent's introspection must
//! say exactly that, and the client side (`popupd_ipc::Agent1Proxy`, what
//! `popupctl` uses) must be able to call every member of it.
//!
//! After a deliberate change to the interface, write the file anew with
//! `POPUPD_WRITE_INTERFACE=1 cargo test -p popupd-e2e --test dbus_contract`.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use popupd_e2e::{TestDir, two_people};

const T: Duration = Duration::from_secs(20);

/// The `<interface name="org.popupd.Agent1">` element of an introspection.
fn interface_of(xml: &str) -> Option<String> {
    let start = xml.find(r#"<interface name="org.popupd.Agent1">"#)?;
    let end = xml[start..].find("</interface>")? + start + "</interface>".len();
    Some(xml[start..end].to_string())
}

/// Lines with their leading blanks gone: indentation is not the contract.
fn normal(xml: &str) -> String {
    xml.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_agent_says_what_the_published_interface_says() {
    let dir = TestDir::new("dbus-contract");
    let (_net, alice, bob) = two_people(&dir.path, "", "").await;
    let intro = zbus::fdo::IntrospectableProxy::builder(&alice.conn)
        .destination(popupd_ipc::BUS_NAME)
        .path(popupd_ipc::OBJECT_PATH)
        .build()
        .await
        .unwrap();
    let live = interface_of(&intro.introspect().await.unwrap())
        .expect("the agent serves org.popupd.Agent1");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ipc/org.popupd.Agent1.xml");
    let published = format!(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<!-- org.popupd.Agent1: the D-Bus interface of the popupd agent, on the\n     session bus at /org/popupd/Agent1 under the name org.popupd.Agent1.\n     Members are only ever added. -->\n<node>\n  {live}\n</node>\n"
    );
    if std::env::var_os("POPUPD_WRITE_INTERFACE").is_some() {
        std::fs::write(&file, &published).unwrap();
    }
    let on_disk = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        normal(&interface_of(&on_disk).unwrap()),
        normal(&live),
        "the agent's interface differs from {}; if the change is meant, write the file anew (see this test's docs)",
        file.display()
    );
    // Every output is named, and every member says what it is.
    for line in live.lines().map(str::trim) {
        if line.starts_with("<arg") {
            assert!(line.contains("name=\""), "an unnamed argument: {line}");
        }
    }
    for member in ["<method", "<signal", "<property"] {
        let mut prev = "";
        for l in live.lines().map(str::trim) {
            if l.starts_with(member) {
                assert!(prev.ends_with("-->"), "no doc text before {l}");
            }
            prev = l;
        }
    }

    // The client side calls every member.
    let (ap, bp) = (alice.proxy().await.unwrap(), bob.proxy().await.unwrap());
    assert_eq!(ap.handle().await.unwrap(), "alice");
    assert!(ap.connected().await.unwrap());
    assert_eq!(ap.presence().await.unwrap().0, "online");
    let (connected, home, since) = ap.status().await.unwrap();
    assert!(connected && home == popupd_e2e::HOME_A && since > 0);
    ap.plugins().await.unwrap();
    let id = ap.send("bob", "hello").await.unwrap();
    bob.wait_for("the message", T, |s| s.received.iter().any(|r| r.0 == id))
        .await
        .unwrap();
    let reply = bp.reply(&id, "hi").await.unwrap();
    bp.mark_read(&id).await.unwrap();
    assert_eq!(bp.message(&id).await.unwrap().status, "read");
    let threaded = bp.messages("alice", 10).await.unwrap();
    let r = threaded.iter().find(|m| m.id == reply).unwrap();
    assert_eq!(r.reply_to, id, "Messages carries reply_to");
    assert_eq!(bp.history("alice", 10).await.unwrap().len(), 2);
    ap.add_contact("bob").await.unwrap();
    bob.wait_for("the request", T, |s| {
        s.requests.iter().any(|h| h == "alice")
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + T;
    while !bp
        .contacts()
        .await
        .unwrap()
        .iter()
        .any(|c| c.handle == "alice")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never reached the list"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bp.answer_contact_request("alice", true).await.unwrap();
    bp.set_presence("busy", "in a meeting").await.unwrap();
    ap.block("carol").await.unwrap();
    ap.unblock("carol").await.unwrap();
    ap.remove_contact("bob").await.unwrap();
    // Errors carry the names the contract gives.
    let e = ap.send("Not A Handle", "x").await.unwrap_err();
    assert!(
        matches!(&e, zbus::Error::MethodError(n, _, _) if n.as_str() == popupd_ipc::errors::INVALID),
        "{e:?}"
    );
    let e = ap
        .message("00000000-0000-7000-8000-000000000000")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, zbus::Error::MethodError(n, _, _) if n.as_str() == popupd_ipc::errors::UNKNOWN_MESSAGE),
        "{e:?}"
    );
}
