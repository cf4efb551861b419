//! The popup: a real notification server (dunst under Xvfb) shows bob the
//! message from alice with the right summary, body, actions and hints;
//! clicking it marks it read for alice; a screenshot is kept as an
//! artifact. And inline reply, with a small fake server that advertises
//! `inline-reply` (no KDE Plasma runs here): the reply typed in the popup
//! reaches alice.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use popupd_e2e::{Agent, Proc, TestDir, bin, have, skip, start_xvfb, two_people};
use zbus::object_server::SignalEmitter;

const T: Duration = Duration::from_secs(20);

fn notify_plugin(dir: &Path) -> PathBuf {
    let pd = dir.join("plugins");
    std::fs::create_dir_all(&pd).unwrap();
    std::fs::copy(bin("libpopupd_notify.so"), pd.join("libpopupd_notify.so")).unwrap();
    pd
}

/// Owns `org.freedesktop.Notifications` on `bus` with `server`, as a
/// desktop's notification daemon would.
async fn notification_server<I: zbus::object_server::Interface>(
    bus: &str,
    server: I,
) -> zbus::Connection {
    zbus::connection::Builder::address(bus)
        .name("org.freedesktop.Notifications")
        .serve_at("/org/freedesktop/Notifications", server)
        .build()
        .await
        .expect("owning org.freedesktop.Notifications")
}

/// Screenshot of the whole display into `target/test-artifacts/NAME`.
fn screenshot(display: &str, name: &str) -> std::io::Result<PathBuf> {
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let shot = artifacts.join(name);
    let o = Command::new("import")
        .args(["-display", display, "-window", "root"])
        .arg(&shot)
        .output()?;
    if !o.status.success() {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ));
    }
    Ok(shot)
}

async fn wait_file_contains(p: &Path, what: &str) -> String {
    let deadline = std::time::Instant::now() + T;
    loop {
        let t = std::fs::read_to_string(p).unwrap_or_default();
        if t.contains(what) {
            return t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never showed {what:?}:\n{t}",
            p.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// dunst on `agent`'s private bus and `display`; returns once it owns
/// org.freedesktop.Notifications. With `pick`, its context menu runs a
/// dmenu-style picker that records the menu in `DIR/menu.txt` and picks the
/// first entry containing `pick`, as a person would.
async fn start_dunst(dir: &Path, display: &str, agent: &Agent, pick: Option<&str>) -> Proc {
    let extra = match pick {
        None => String::new(),
        Some(label) => {
            let picker = dir.join("pick.sh");
            let menu = dir.join("menu.txt");
            std::fs::write(
                &picker,
                format!("#!/bin/sh\ntee {} | grep -m1 {label}\n", menu.display()),
            )
            .unwrap();
            let st = Command::new("chmod")
                .arg("+x")
                .arg(&picker)
                .status()
                .unwrap();
            assert!(st.success());
            format!("  dmenu = {}\n", picker.display())
        }
    };
    let rc = dir.join("dunstrc");
    std::fs::write(&rc, format!("[global]\n  font = Monospace 12\n  markup = full\n  width = 400\n  offset = 20x20\n{extra}[urgency_normal]\n  timeout = 0\n")).unwrap();
    let mut dunst_cmd = vec![
        "env".to_string(),
        format!("DISPLAY={display}"),
        format!("DBUS_SESSION_BUS_ADDRESS={}", agent.bus.address),
    ];
    dunst_cmd.extend(["dunst".into(), "-config".into(), rc.display().to_string()]);
    let dunst = Proc::spawn(&dunst_cmd, &dir.join("dunst.log")).unwrap();
    let dbus = zbus::fdo::DBusProxy::new(&agent.conn).await.unwrap();
    let deadline = std::time::Instant::now() + T;
    while !dbus
        .name_has_owner(zbus::names::BusName::try_from("org.freedesktop.Notifications").unwrap())
        .await
        .unwrap()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "dunst never owned org.freedesktop.Notifications"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    dunst
}

/// Waits until dunst shows `n` popups.
async fn wait_displayed(agent: &Agent, n: usize, what: &str) {
    let deadline = std::time::Instant::now() + T;
    while String::from_utf8_lossy(&dunstctl(agent, &["count", "displayed"]).stdout).trim()
        != n.to_string()
    {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `dunstctl ARGS` against the dunst on `agent`'s bus.
fn dunstctl(agent: &Agent, args: &[&str]) -> std::process::Output {
    Command::new("dunstctl")
        .args(args)
        .env("DBUS_SESSION_BUS_ADDRESS", &agent.bus.address)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_request_pops_up_and_accept_in_it_works() {
    const NAME: &str = "a_contact_request_pops_up_and_accept_in_it_works";
    for tool in ["Xvfb", "dunst", "dunstctl"] {
        if !have(tool) {
            return skip(
                NAME,
                &format!("`{tool}` is not installed (apt install xvfb dunst)"),
            );
        }
    }
    let dir = TestDir::new("dunst-request");
    let (_x, display) = start_xvfb(&dir.path, 180).await;
    let pd = notify_plugin(&dir.path);
    let (_net, alice, bob) = two_people(
        &dir.path,
        "",
        &format!("  plugin_dirs: [{}]\n", pd.display()),
    )
    .await;
    let menu = dir.path.join("menu.txt");
    let _dunst = start_dunst(&dir.path, &display, &bob, Some("Accept")).await;

    assert!(alice.popupctl(&["contacts", "add", "bob"]).status.success());
    wait_displayed(&bob, 1, "the request never popped up").await;
    if have("import") {
        let _ = screenshot(&display, "contact-request-dunst.png");
    }
    assert!(dunstctl(&bob, &["context"]).status.success());
    // Accepted from the popup: both now see each other.
    alice
        .wait_for("bob's presence", T, |s| {
            s.presence_of("bob") == Some(("online", ""))
        })
        .await
        .unwrap();
    let m = std::fs::read_to_string(&menu).unwrap_or_default();
    assert!(m.contains("Accept") && m.contains("Decline"), "menu: {m}");
    assert!(m.contains("Contact request"), "menu: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dunst_shows_the_popup_and_a_click_marks_it_read() {
    const NAME: &str = "dunst_shows_the_popup_and_a_click_marks_it_read";
    for tool in ["Xvfb", "dunst", "dunstctl", "dbus-monitor"] {
        if !have(tool) {
            return skip(
                NAME,
                &format!("`{tool}` is not installed (apt install xvfb dunst dbus)"),
            );
        }
    }
    let dir = TestDir::new("dunst");
    let (_x, display) = start_xvfb(&dir.path, 50).await;

    let pd = notify_plugin(&dir.path);
    let (_net, alice, bob) = two_people(
        &dir.path,
        "",
        &format!("  plugin_dirs: [{}]\n", pd.display()),
    )
    .await;

    let _dunst = start_dunst(&dir.path, &display, &bob, None).await;
    let monitor_out = dir.path.join("monitor.txt");
    let _monitor = Proc::spawn(
        &[
            "sh".into(),
            "-c".into(),
            format!(
                "exec dbus-monitor --address '{}' \"type='method_call',interface='org.freedesktop.Notifications',member='Notify'\" > {}",
                bob.bus.address,
                monitor_out.display()
            ),
        ],
        &dir.path.join("monitor.log"),
    )
    .unwrap();
    let id = alice
        .proxy()
        .await
        .unwrap()
        .send("bob", "lunch at <b>noon</b> & then?")
        .await
        .unwrap();
    let call = wait_file_contains(&monitor_out, "im.received").await;
    assert!(
        call.contains("string \"alice\""),
        "summary is the sender:\n{call}"
    );
    assert!(
        call.contains("lunch at &lt;b&gt;noon&lt;/b&gt; &amp; then?"),
        "body is the escaped text:\n{call}"
    );
    for action in ["\"default\"", "\"read\"", "\"Mark read\""] {
        assert!(call.contains(action), "action {action}:\n{call}");
    }
    assert!(
        call.contains("\"desktop-entry\"") && call.contains("\"popupd\""),
        "desktop-entry hint:\n{call}"
    );
    assert!(
        call.contains("\"urgency\"") && call.contains("byte 1"),
        "urgency hint:\n{call}"
    );

    // It is on screen.
    wait_displayed(&bob, 1, "dunst never displayed it").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    if have("import") {
        let shot = screenshot(&display, "popup-dunst.png").expect("screenshot");
        println!("screenshot of the popup: {}", shot.display());
    } else {
        println!("no screenshot: `import` (imagemagick) is not installed");
    }

    // The default action (with dunst's stock config a middle click, not a
    // left click, which only closes) marks it read, and alice is told.
    assert!(dunstctl(&bob, &["action", "0"]).status.success());
    alice.wait_status(&id, "read", T).await.unwrap();
}

/// A notification server that answers every popup with a reply typed
/// inside it, as KDE Plasma's inline reply does.
struct InlineServer {
    calls: Calls,
}

/// Each Notify: (summary, body, actions).
type Calls = Arc<Mutex<Vec<(String, String, Vec<String>)>>>;

/// A notification server that only records what it is asked to show.
struct QuietServer {
    /// (replaces_id, body) of each Notify.
    calls: Arc<Mutex<Vec<(u32, String)>>>,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl QuietServer {
    fn get_capabilities(&self) -> Vec<String> {
        vec!["body".into(), "actions".into()]
    }
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        _app_name: String,
        replaces_id: u32,
        _app_icon: String,
        _summary: String,
        body: String,
        _actions: Vec<String>,
        _hints: HashMap<String, zbus::wire::OwnedVariant>,
        _timeout: i32,
    ) -> u32 {
        let mut c = self.calls.lock().unwrap();
        c.push((replaces_id, body));
        if replaces_id != 0 {
            replaces_id
        } else {
            40 + c.len() as u32
        }
    }
    fn close_notification(&self, _id: u32) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_one_sender_updates_one_popup() {
    let dir = TestDir::new("burst");
    let pd = notify_plugin(&dir.path);
    let (_net, alice, bob) = two_people(
        &dir.path,
        "",
        &format!("  plugin_dirs: [{}]\n", pd.display()),
    )
    .await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let _server = notification_server(
        &bob.bus.address,
        QuietServer {
            calls: calls.clone(),
        },
    )
    .await;
    let p = alice.proxy().await.unwrap();
    for i in 0..5 {
        p.send("bob", &format!("burst {i}")).await.unwrap();
    }
    let deadline = std::time::Instant::now() + T;
    while calls.lock().unwrap().len() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "five popups were not shown: {:?}",
            calls.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = calls.lock().unwrap().clone();
    assert_eq!(c[0].0, 0, "the first is a new popup");
    assert!(
        c[1..].iter().all(|(r, _)| *r == 41),
        "the rest replace it: {c:?}"
    );
    assert!(
        c[4].1.contains("burst 4") && c[4].1.contains("(+2 earlier)"),
        "the last shows the latest lines: {c:?}"
    );
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl InlineServer {
    fn get_capabilities(&self) -> Vec<String> {
        ["body", "actions", "inline-reply"]
            .map(String::from)
            .to_vec()
    }

    #[allow(clippy::too_many_arguments)]
    async fn notify(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        _app_name: String,
        _replaces_id: u32,
        _app_icon: String,
        summary: String,
        body: String,
        actions: Vec<String>,
        _hints: HashMap<String, zbus::wire::OwnedVariant>,
        _timeout: i32,
    ) -> u32 {
        self.calls.lock().unwrap().push((summary, body, actions));
        let caller = hdr.sender().map(|s| s.to_owned());
        let conn = conn.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let em = SignalEmitter::new(&conn, "/org/freedesktop/Notifications").unwrap();
            let em = match caller {
                Some(c) => em.set_destination(zbus::names::BusName::Unique(c)),
                None => em,
            };
            InlineServer::notification_replied(&em, 7, "typed in the popup")
                .await
                .unwrap();
        });
        7
    }

    fn close_notification(&self, _id: u32) {}

    #[zbus(signal)]
    async fn notification_replied(
        emitter: &SignalEmitter<'_>,
        id: u32,
        text: &str,
    ) -> zbus::Result<()>;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_reply_in_the_popup_reaches_the_sender() {
    let dir = TestDir::new("inline");
    let pd = notify_plugin(&dir.path);
    let (_net, alice, bob) = two_people(
        &dir.path,
        "",
        &format!("  plugin_dirs: [{}]\n", pd.display()),
    )
    .await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let _server = notification_server(
        &bob.bus.address,
        InlineServer {
            calls: calls.clone(),
        },
    )
    .await;

    let id = alice
        .proxy()
        .await
        .unwrap()
        .send("bob", "coffee?")
        .await
        .unwrap();
    alice
        .wait_for("bob's inline reply", T, |s| {
            s.received
                .iter()
                .any(|r| r.1 == "bob" && r.2 == "typed in the popup")
        })
        .await
        .unwrap();
    alice.wait_status(&id, "read", T).await.unwrap();
    let c = calls.lock().unwrap().clone();
    assert_eq!(c[0].0, "alice");
    assert_eq!(c[0].1, "coffee?");
    assert!(
        c[0].2.contains(&"inline-reply".to_string()),
        "offers inline reply: {:?}",
        c[0].2
    );
    // The reply answers alice's message.
    let h =
        String::from_utf8_lossy(&alice.popupctl(&["--json", "history", "bob"]).stdout).to_string();
    assert!(h.contains("typed in the popup"), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_button_opens_the_compose_window_and_the_reply_arrives() {
    const NAME: &str = "reply_button_opens_the_compose_window_and_the_reply_arrives";
    for tool in ["Xvfb", "zenity", "xdotool", "dunst", "dunstctl"] {
        if !have(tool) {
            return skip(
                NAME,
                &format!("`{tool}` is not installed (apt install xvfb zenity xdotool dunst)"),
            );
        }
    }
    let dir = TestDir::new("compose");
    let (_x, display) = start_xvfb(&dir.path, 250).await;
    let pd = notify_plugin(&dir.path);
    let extra = format!(
        "  plugin_dirs: [{}]\n  plugins:\n    notify:\n      reply_command: [env, \"DISPLAY={display}\", \"{}\", compose]\n",
        pd.display(),
        bin("popupctl").display()
    );
    let (_net, alice, bob) = two_people(&dir.path, "", &extra).await;
    let _dunst = start_dunst(&dir.path, &display, &bob, Some("Reply")).await;

    let id = alice
        .proxy()
        .await
        .unwrap()
        .send("bob", "are you coming?")
        .await
        .unwrap();
    wait_displayed(&bob, 1, "the message never popped up").await;
    // bob opens the popup's menu and picks Reply: a compose window opens on
    // his display.
    let mut arrivals = alice
        .proxy()
        .await
        .unwrap()
        .receive_message_received()
        .await
        .unwrap();
    assert!(dunstctl(&bob, &["context"]).status.success());
    let xdo = |args: &[&str]| {
        Command::new("xdotool")
            .args(args)
            .env("DISPLAY", &display)
            .output()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + T;
    let win = loop {
        let o = xdo(&["search", "--name", "Reply to alice"]);
        let w = String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        if !w.is_empty() {
            break w;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no compose window appeared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    if have("import") {
        let _ = screenshot(&display, "compose-window.png");
    }
    assert!(xdo(&["windowfocus", "--sync", &win]).status.success());
    assert!(
        xdo(&["type", "--delay", "20", "on my way"])
            .status
            .success()
    );
    assert!(xdo(&["key", "Return"]).status.success());
    alice
        .wait_for("bob's reply from the compose window", T, |s| {
            s.received
                .iter()
                .any(|r| r.1 == "bob" && r.2 == "on my way")
        })
        .await
        .unwrap();
    // It answers alice's message.
    use futures_util::StreamExt;
    let sig = arrivals.next().await.unwrap();
    let a = sig.args().unwrap();
    assert_eq!((a.text, a.reply_to), ("on my way", id.as_str()));
    // Answering it was reading it, as with an inline reply: the popup is
    // gone and alice is told bob read her message.
    wait_displayed(&bob, 0, "the popup stayed open after Reply").await;
    alice.wait_status(&id, "read", T).await.unwrap();
}
