//! `popupd demo`, the manual test, stopped the ways a person stops it.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use popupd_e2e::{TestDir, bin, have, skip};

/// The processes whose command line names `needle`.
fn naming(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

#[test]
fn demo_stopped_with_sigterm_leaves_nothing_running() {
    const NAME: &str = "demo_stopped_with_sigterm_leaves_nothing_running";
    if !have("dbus-daemon") {
        return skip(NAME, "`dbus-daemon` is not installed");
    }
    let dir = TestDir::new("demo");
    let d = dir.path.to_str().unwrap().to_string();
    let mut demo = Command::new(bin("popupd"))
        .args(["demo", "--dir", &d])
        // Not the desktop's bus: every agent on a bus of its own.
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The instructions show once the whole network is up.
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.contains("send bob") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = demo.kill();
        panic!("the demo did not come up in 60 s; its logs are in {d}");
    }
    // The demo itself, a server process, two agents and their buses.
    let before = naming(&d);
    assert!(before.len() >= 5, "the demo's processes: {before:#?}");

    let kill = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t = Instant::now();
    let status = loop {
        if let Some(st) = demo.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the demo did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the demo exits cleanly: {status}");
    let mut left = naming(&d);
    while !left.is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        left = naming(&d);
    }
    assert!(
        left.is_empty(),
        "still running after the demo stopped: {left:#?}"
    );
}
