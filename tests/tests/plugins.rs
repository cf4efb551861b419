//! Plugins, end to end: misbehaving plugins cannot hurt the agent or lose a
//! message; the exec plugin runs its command; a plugin that kills the agent
//! is skipped on the next start.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use popupd_e2e::{Agent, TestDir, bin, two_people};

const T: Duration = Duration::from_secs(20);

/// Copies built plugins (workspace cdylibs and test-fixture examples) into
/// a folder the agent loads from.
fn plugin_dir(dir: &Path, libs: &[&str]) -> PathBuf {
    let pd = dir.join("plugins");
    std::fs::create_dir_all(&pd).unwrap();
    for lib in libs {
        let src = bin(lib);
        let name = Path::new(lib).file_name().unwrap();
        std::fs::copy(&src, pd.join(name)).unwrap();
    }
    pd
}

fn plugins_of(a: &Agent) -> String {
    String::from_utf8_lossy(&a.popupctl(&["plugins"]).stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plugins_are_refused_or_disabled_and_lose_nothing() {
    let dir = TestDir::new("bad-plugins");
    let pd = plugin_dir(
        &dir.path,
        &[
            "examples/libfixture_panic.so",
            "examples/libfixture_hang.so",
            "examples/libfixture_fail.so",
            "examples/libfixture_bad_abi.so",
            "libpopupd_exec.so",
        ],
    );
    std::fs::write(pd.join("junk.so"), "this is not a library").unwrap();
    let extra = format!(
        "  plugin_dirs: [{}]\n  plugin_deadline: 1s\n  plugins:\n    fixture-fail: {{ ok: false }}\n    exec: {{ rules: [ {{ command: [\"true\"] }} ] }}\n",
        pd.display()
    );
    let (_net, alice, bob) = two_people(&dir.path, "", &extra).await;

    let p = alice.proxy().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(p.send("bob", &format!("plugin torture {i}")).await.unwrap());
    }
    bob.wait_for("all three messages", T, |s| s.received.len() == 3)
        .await
        .unwrap();
    alice
        .wait_for("all delivered", T, |s| {
            ids.iter().all(|i| s.reached(i, "delivered"))
        })
        .await
        .unwrap();
    // The hanging plugin is disabled after its deadline.
    let deadline = std::time::Instant::now() + T;
    loop {
        let list = plugins_of(&bob);
        if list.contains("fixture-hang")
            && list.contains("disabled: on_event did not return within 1s")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hang never disabled:\n{list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let list = plugins_of(&bob);
    assert!(
        list.contains("fixture-panic")
            && list.contains("disabled: panicked: fixture panics on purpose"),
        "{list}"
    );
    assert!(
        list.contains("fixture-fail")
            && list.contains("failed: plugins.fixture-fail.ok: must be true"),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("exec") && l.contains("active")),
        "{list}"
    );
    assert!(
        !list.contains("fixture-bad-abi"),
        "a plugin of another ABI is not loaded:\n{list}"
    );
    let log = bob.proc.log_text();
    assert!(
        log.contains("plugin built for plugin ABI 99; this agent speaks ABI 1"),
        "the ABI refusal is logged"
    );
    assert!(
        log.contains("not a loadable library") && log.contains("junk.so"),
        "junk is logged"
    );
    // The agent is alive and the messages are in history.
    let h = String::from_utf8_lossy(&bob.popupctl(&["history", "alice"]).stdout).to_string();
    assert_eq!(h.matches("plugin torture").count(), 3, "{h}");
    assert!(bob.popupctl(&["status"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_its_command_with_the_message() {
    let dir = TestDir::new("exec");
    let pd = plugin_dir(&dir.path, &["libpopupd_exec.so"]);
    let out = dir.path.join("exec-out");
    let extra = format!(
        "  plugin_dirs: [{}]\n  plugins:\n    exec:\n      rules:\n        - from: alice\n          contains: deploy\n          command: [sh, -c, 'cat > {out}.json; echo \"$POPUPD_FROM:$POPUPD_TEXT\" > {out}.env']\n",
        pd.display(),
        out = out.display()
    );
    let (_net, alice, _bob) = two_people(&dir.path, "", &extra).await;
    let p = alice.proxy().await.unwrap();
    p.send("bob", "no match here").await.unwrap();
    let id = p.send("bob", "please deploy now").await.unwrap();
    let env = out.with_extension("env");
    let deadline = std::time::Instant::now() + T;
    while !env.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the command never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        std::fs::read_to_string(&env).unwrap().trim(),
        "alice:please deploy now"
    );
    let json = std::fs::read_to_string(out.with_extension("json")).unwrap();
    assert!(
        json.contains(&id) && json.contains("\"event\":\"message_received\""),
        "{json}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_kills_the_agent_is_skipped_on_restart() {
    let dir = TestDir::new("abort");
    let pd = plugin_dir(&dir.path, &["examples/libfixture_abort.so"]);
    let extra = format!("  plugin_dirs: [{}]\n", pd.display());
    let (_net, alice, mut bob) = two_people(&dir.path, "", &extra).await;
    let p = alice.proxy().await.unwrap();
    let id = p.send("bob", "this kills the plugin host").await.unwrap();
    // The agent dies (as systemd would see it), then restarts.
    let deadline = std::time::Instant::now() + T;
    while !bob.proc.log_text().is_empty() && bob.proxy().await.unwrap().status().await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the fixture did not kill the agent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bob.restart().await.unwrap();
    bob.wait_connected(true, T).await.unwrap();
    let log = bob.proc.log_text();
    assert!(
        log.contains("crashed the agent on its last run"),
        "the skip is logged"
    );
    let id2 = p.send("bob", "after the restart").await.unwrap();
    let deadline = std::time::Instant::now() + T;
    loop {
        let h = String::from_utf8_lossy(&bob.popupctl(&["--json", "history", "alice"]).stdout)
            .to_string();
        if h.contains(&id2) {
            assert_eq!(
                h.matches(&id).count(),
                1,
                "the first message is in history once: {h}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "messages missing: {h}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !plugins_of(&bob).contains("fixture-abort"),
        "skipped this run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoreply_answers_each_sender_once_while_away() {
    let dir = TestDir::new("autoreply");
    let pd = plugin_dir(&dir.path, &["libpopupd_autoreply.so"]);
    let extra = format!(
        "  plugin_dirs: [{}]\n  plugins:\n    autoreply: {{ text: \"out to lunch\", period: 1h }}\n",
        pd.display()
    );
    let (_net, alice, bob) = two_people(&dir.path, "", &extra).await;
    let p = alice.proxy().await.unwrap();
    let autoreplies = |a: &Agent| {
        a.seen
            .lock()
            .unwrap()
            .received
            .iter()
            .filter(|r| r.1 == "bob" && r.2 == "out to lunch")
            .count()
    };

    // Online: no answer.
    p.send("bob", "are you there?").await.unwrap();
    bob.wait_for("the first message", T, |s| s.received.len() == 1)
        .await
        .unwrap();

    // Away: one answer, as a reply, however many messages arrive.
    let mut arrivals = p.receive_message_received().await.unwrap();
    let st = bob.popupctl(&["presence", "away"]);
    assert!(st.status.success());
    let first = p.send("bob", "hello?").await.unwrap();
    p.send("bob", "hello??").await.unwrap();
    bob.wait_for("three messages", T, |s| s.received.len() == 3)
        .await
        .unwrap();
    alice
        .wait_for("the autoreply", T, |s| {
            s.received.iter().any(|r| r.2 == "out to lunch")
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(autoreplies(&alice), 1, "one answer per sender per period");
    use futures_util::StreamExt;
    let sig = arrivals.next().await.unwrap();
    let a = sig.args().unwrap();
    assert_eq!((a.from, a.text), ("bob", "out to lunch"));
    assert_eq!(a.reply_to, first, "the answer replies to the first message");

    // Back online: no more answers.
    assert!(bob.popupctl(&["presence", "online"]).status.success());
    p.send("bob", "lunch over?").await.unwrap();
    bob.wait_for("four messages", T, |s| s.received.len() == 4)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(autoreplies(&alice), 1, "answered while online");
}
