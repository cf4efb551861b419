//! The back connection works from behind a firewall that lets nothing in.
//!
//! alice's agent runs in its own network namespace, joined to the host by a
//! veth pair this test creates (addresses 10.231.N.0/30, which exist only on
//! that pair). nftables in the namespace drops every new inbound
//! connection; the namespace has no route anywhere, so its only way out is
//! an HTTP CONNECT proxy on the host end of the pair. Needs root, `ip` and
//! `nft`; elsewhere it says "skipped" and why.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use popupd_e2e::netns::{self, Netns};
use popupd_e2e::{Agent, Network, Proc, TestDir, bin, skip, wait_port};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_behind_inbound_firewall_and_proxy_sends_and_receives() {
    const NAME: &str = "agent_behind_inbound_firewall_and_proxy_sends_and_receives";
    if let Err(why) = netns::available() {
        return skip(NAME, &why);
    }
    let n = std::process::id() % 100;
    let ns = Netns::create(n).unwrap();
    ns.firewall_inbound().unwrap();
    let (host_ip, inner_ip) = (ns.host_ip.clone(), ns.inner_ip.clone());

    let dir = TestDir::new("firewall");
    let net = Network::start(&dir.path).await.unwrap();
    let port = popupd_e2e::free_port();
    let proxy_addr = format!("{host_ip}:{port}");
    let _proxy = Proc::spawn(
        &[
            bin("popupd-test-proxy").display().to_string(),
            proxy_addr.clone(),
        ],
        &dir.path.join("proxy.log"),
    )
    .unwrap();
    wait_port(&proxy_addr).await.unwrap();

    // Inside the namespace, the home is unreachable except through the proxy.
    let direct = Command::new("ip")
        .args(["netns", "exec", &ns.name, "timeout", "3", "bash", "-c"])
        .arg(format!(
            "exec 3<>/dev/tcp/{}",
            net.home_addrs[0].replace(':', "/")
        ))
        .output()
        .unwrap();
    assert!(
        !direct.status.success(),
        "the namespace must have no direct way to the home"
    );

    let a = net.add_user(0, "alice").unwrap();
    let b = net.add_user(1, "bob").unwrap();
    let alice = Agent::start(
        &dir.path,
        "alice",
        &a,
        &format!("  proxy: http://{proxy_addr}\n"),
        &["ip", "netns", "exec", &ns.name],
    )
    .await
    .unwrap();
    let bob = Agent::start(&dir.path, "bob", &b, "", &[]).await.unwrap();
    alice.wait_connected(true, T).await.unwrap();
    bob.wait_connected(true, T).await.unwrap();

    // Nothing gets in: a listener inside the namespace is unreachable from outside.
    let _listener = Proc::spawn(
        &[
            "ip".into(),
            "netns".into(),
            "exec".into(),
            ns.name.clone(),
            bin("popupd-test-proxy").display().to_string(),
            format!("{inner_ip}:9"),
        ],
        &dir.path.join("inner-listener.log"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let inside = Command::new("ip")
        .args(["netns", "exec", &ns.name, "timeout", "3", "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{inner_ip}/9"))
        .status()
        .unwrap();
    assert!(
        inside.success(),
        "control: the listener answers from inside the namespace"
    );
    let inbound = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(format!("{inner_ip}:9")),
    )
    .await;
    assert!(
        !matches!(inbound, Ok(Ok(_))),
        "an inbound connection into the namespace must fail"
    );

    // Yet alice sends, bob answers, and the answer comes down her back connection.
    let id = alice
        .proxy()
        .await
        .unwrap()
        .send("bob", "from behind the firewall")
        .await
        .unwrap();
    bob.wait_for("alice's message", T, |s| {
        s.received.iter().any(|r| r.0 == id)
    })
    .await
    .unwrap();
    let bp = bob.proxy().await.unwrap();
    bp.mark_read(&id).await.unwrap();
    let reply = bp.reply(&id, "got it").await.unwrap();
    alice
        .wait_for("bob's reply", T, |s| {
            s.received.iter().any(|r| r.0 == reply && r.2 == "got it")
        })
        .await
        .unwrap();
    alice
        .wait_for("delivered then read", T, |s| {
            s.status
                .get(&id)
                .is_some_and(|v| v.ends_with(&["delivered".into(), "read".into()]))
        })
        .await
        .unwrap();
}
