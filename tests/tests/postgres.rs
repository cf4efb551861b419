//! End to end with homes on PostgreSQL (`storage: postgres:`): each test
//! starts its own PostgreSQL on 127.0.0.1 in its folder (as `nobody` when
//! run as root), a global server and two homes, and talks to them as
//! users do. Without PostgreSQL the tests say "skipped" and why; under CI
//! (`CI=true`) they fail instead.
//!
//! - a message across and back, with its receipts and the reply;
//! - an offline recipient gets what waited, in order, once;
//! - `kill -9` of a home on PostgreSQL under a counted stream;
//! - PostgreSQL stopped: sends wait in the sender's outbox and say why,
//!   and go through, in order, once it is back;
//! - a bad `storage:` section is refused with its file, line and field.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use popupd_e2e::faults::{Cast, Counts, Victim, kill_round};
use popupd_e2e::{TestDir, pg, popupd, two_people_on};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_crosses_between_postgres_homes_and_its_receipts_and_reply_come_back() {
    // The global server is on PostgreSQL too: the handles claimed by
    // `user add` and the lookups of both homes go through it.
    const NAME: &str =
        "a_message_crosses_between_postgres_homes_and_its_receipts_and_reply_come_back";
    let dir = TestDir::new("pg-reply");
    let Some(server) = pg::server(&dir.path, NAME) else {
        return;
    };
    let layout = pg::layout(&server, &[0, 1], true).unwrap();
    let (net, alice, bob) = two_people_on(&dir.path, layout, "", "").await;

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
    let o = bob.popupctl(&["read", &id]);
    assert!(o.status.success(), "{o:?}");
    let o = bob.popupctl(&["reply", &id, "12:30?"]);
    assert!(o.status.success(), "{o:?}");
    let reply_id = String::from_utf8_lossy(&o.stdout).trim().to_string();
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
    assert_eq!(statuses, ["accepted", "delivered", "read"]);
    bob.wait_status(&reply_id, "delivered", T).await.unwrap();

    // The homes and the global server kept it all in PostgreSQL, and
    // nothing in SQLite.
    for (name, file) in [
        (popupd_e2e::HOME_A, "home.sqlite"),
        (popupd_e2e::HOME_B, "home.sqlite"),
        ("global", "global.sqlite"),
    ] {
        let file = net.dir.join("data").join(name).join(file);
        assert!(!file.exists(), "{} was made", file.display());
    }
    let users = popupd(&["user", "list", "-c", net.home_config(0).to_str().unwrap()]);
    assert!(
        users.status.success() && String::from_utf8_lossy(&users.stdout).contains("alice"),
        "user list on the PostgreSQL home: {users:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_recipient_on_postgres_gets_what_waited_in_order_once() {
    const NAME: &str = "an_offline_recipient_on_postgres_gets_what_waited_in_order_once";
    let dir = TestDir::new("pg-offline");
    let Some(server) = pg::server(&dir.path, NAME) else {
        return;
    };
    let layout = pg::layout(&server, &[0, 1], false).unwrap();
    let (_net, alice, mut bob) = two_people_on(&dir.path, layout, "", "").await;
    bob.proc.stop();
    let p = alice.proxy().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..80 {
        ids.push(p.send("bob", &format!("msg {i}")).await.unwrap());
    }
    alice
        .wait_for("all accepted", T, |s| {
            ids.iter().all(|id| s.reached(id, "accepted"))
        })
        .await
        .unwrap();
    bob.restart().await.unwrap();
    bob.wait_for("80 messages", T, |s| s.received.len() >= 80)
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
    assert_eq!(got, ids, "all 80, in order, once each");
    alice
        .wait_for("all delivered", T, |s| {
            ids.iter().all(|id| s.reached(id, "delivered"))
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_postgres_home_under_a_counted_stream_loses_doubles_and_reorders_nothing() {
    const NAME: &str =
        "kill9_of_a_postgres_home_under_a_counted_stream_loses_doubles_and_reorders_nothing";
    let dir = TestDir::new("pg-kill9");
    let Some(server) = pg::server(&dir.path, NAME) else {
        return;
    };
    let layout = pg::layout(&server, &[0, 1], false).unwrap();
    let mut cast = Cast::start_on(&dir.path, layout).await;
    let mut total = Counts::default();
    for round in 0..2 {
        for v in [Victim::HomeA, Victim::HomeB] {
            let tag = format!("{v:?}-{round}");
            let c = kill_round(&mut cast, v, &tag, 120, Duration::from_secs(60))
                .await
                .unwrap();
            println!("{:<7} round {round}: {c:?}", v.name());
            assert!(c.held(), "{} round {round}: {c:?}", v.name());
            total.add(&c);
        }
    }
    println!("total: {total:?}");
    assert_eq!(total.sent, 480);
}

/// PostgreSQL stops under home A: alice's sends stay in her outbox,
/// queued, and say the home's database is unavailable; once it is back
/// they all reach bob, in order, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_holds_sends_in_the_outbox_with_the_reason_until_it_is_back() {
    const NAME: &str =
        "postgres_stopped_holds_sends_in_the_outbox_with_the_reason_until_it_is_back";
    let dir = TestDir::new("pg-down");
    let Some(mut server) = pg::server(&dir.path, NAME) else {
        return;
    };
    let layout = pg::layout(&server, &[0], false).unwrap();
    let (_net, alice, bob) = two_people_on(&dir.path, layout, "", "").await;
    let ap = alice.proxy().await.unwrap();
    let first = ap.send("bob", "before").await.unwrap();
    alice.wait_status(&first, "delivered", T).await.unwrap();

    server.stop();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(ap.send("bob", &format!("while down {i}")).await.unwrap());
    }
    let deadline = Instant::now() + T;
    loop {
        let m = ap.message(&ids[0]).await.unwrap();
        if m.status == "queued" && m.reason.contains("temporarily unavailable") {
            println!("while down: {} {:?}", m.status, m.reason);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reason shown while the database is down: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        bob.seen
            .lock()
            .unwrap()
            .received
            .iter()
            .all(|r| !ids.contains(&r.0)),
        "nothing was accepted while the database was down"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.start_again().unwrap();
    let back = Instant::now();
    bob.wait_for("every message", T, |s| {
        ids.iter().all(|id| s.received.iter().any(|r| &r.0 == id))
    })
    .await
    .unwrap();
    println!(
        "all delivered {:?} after the database came back",
        back.elapsed()
    );
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
    alice
        .wait_for("all delivered", T, |s| {
            ids.iter().all(|id| s.reached(id, "delivered"))
        })
        .await
        .unwrap();
    let m = ap.message(&ids[0]).await.unwrap();
    assert!(
        m.reason.is_empty(),
        "the reason is gone once accepted: {m:?}"
    );
}

#[test]
fn a_bad_storage_section_is_refused_with_its_file_line_and_field() {
    let dir = TestDir::new("pg-config");
    let pki = dir.path.join("pki");
    let pki_s = pki.to_str().unwrap();
    assert!(popupd(&["ca", "init", "--dir", pki_s]).status.success());
    assert!(
        popupd(&["ca", "issue", "h.test", "--dir", pki_s])
            .status
            .success()
    );
    let f = dir.path.join("home.yaml");
    let home = "home:\n  name: h.test\n  listen: 127.0.0.1:1\n  cert: pki/h.test.crt\n  key: pki/h.test.key\n  ca: pki/ca.crt\n  data_dir: d\n  global: { name: g.test, address: \"g:1\" }\n";
    for (storage, line, says) in [
        (
            "  storage:\n    postgres: \"postgresql://popupd@db.test:notaport/home\"\n",
            10,
            "not a PostgreSQL connection string",
        ),
        (
            "  storage:\n    postgres: \"postgresql://popupd@db.test/\"\n",
            10,
            "does not name a database",
        ),
        (
            "  storage:\n    postgres: \"postgresql://popupd@db.test/home\"\n    ca: pki/none.crt\n",
            11,
            "none.crt",
        ),
    ] {
        std::fs::write(&f, format!("{home}{storage}")).unwrap();
        let o = popupd(&["check-config", f.to_str().unwrap()]);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains(&format!("home.yaml:{line}:"))
                && e.contains("home.storage.")
                && e.contains(says),
            "file, line, field and what is wrong: {e}"
        );
    }
    std::fs::write(
        &f,
        format!("{home}  storage:\n    postgres: \"postgresql://popupd@db.test/home\"\n"),
    )
    .unwrap();
    let o = popupd(&["check-config", f.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "a good one passes: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Home A reaches its database over TLS (`sslmode=require`), verified
/// under the CA its `storage.ca` names; a server whose certificate that CA
/// did not sign is refused, and the home says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_reaches_postgres_over_verified_tls_only() {
    const NAME: &str = "a_home_reaches_postgres_over_verified_tls_only";
    let dir = TestDir::new("pg-tls");
    let Some(mut server) = pg::server(&dir.path, NAME) else {
        return;
    };
    // The database server's certificate, for the name the homes dial.
    let db_pki = dir.path.join("db-pki");
    let s = db_pki.to_str().unwrap();
    assert!(popupd(&["ca", "init", "--dir", s]).status.success());
    assert!(
        popupd(&["ca", "issue", "localhost", "--dir", s])
            .status
            .success()
    );
    server
        .enable_tls(&db_pki.join("localhost.crt"), &db_pki.join("localhost.key"))
        .unwrap();
    server.create_db("home0").unwrap();
    let url = format!(
        "postgresql://popupd@localhost:{}/home0?sslmode=require",
        server.port
    );
    let mut layout = popupd_e2e::Layout::default();
    layout.homes[0].yaml = format!(
        "  storage:\n    postgres: \"{url}\"\n    ca: {}\n",
        db_pki.join("ca.crt").display()
    );
    let (net, alice, bob) = two_people_on(&dir.path, layout, "", "").await;
    let id = alice
        .proxy()
        .await
        .unwrap()
        .send("bob", "over TLS")
        .await
        .unwrap();
    bob.wait_for("the message", T, |s| s.received.iter().any(|r| r.0 == id))
        .await
        .unwrap();
    alice.wait_status(&id, "delivered", T).await.unwrap();
    // The server says the home's connection is encrypted.
    let admin = server.url("home0");
    let tls: Vec<bool> = popupd_store::pg::off_runtime(move || {
        let mut c = popupd_store::pg::connect_plain(&admin).unwrap();
        c.query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
             WHERE a.application_name = 'popupd home'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    });
    assert_eq!(tls, [true], "the home's connection");

    // Under another CA (the network's), the same server is refused.
    let home = net.home_config(0);
    let yaml = std::fs::read_to_string(&home).unwrap().replace(
        &db_pki.join("ca.crt").display().to_string(),
        &net.dir.join("pki/ca.crt").display().to_string(),
    );
    let other = dir.path.join("home-wrong-ca.yaml");
    std::fs::write(&other, yaml).unwrap();
    let o = popupd(&["user", "list", "-c", other.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("localhost") && e.to_lowercase().contains("certificate"),
        "refused, saying why: {e}"
    );
    println!("with the wrong CA: {e}");
}
