//! The benchmark suite in quick mode: small sizes, a few seconds each. It
//! keeps `popupd-bench` working and checks correctness (every message and
//! every presence change arrives, once); it measures nothing. The figures
//! come from release runs, see docs/performance.md.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::process::Command;

use popupd_e2e::bin;

fn bench(args: &[&str]) -> String {
    let out = Command::new(bin("popupd-bench"))
        .args(args)
        .output()
        .expect("run popupd-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "popupd-bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn throughput_across_two_homes_and_on_one() {
    let o = bench(&[
        "throughput",
        "--senders",
        "4",
        "--recipients",
        "4",
        "--messages",
        "2000",
    ]);
    assert!(o.contains("| messages accepted | 2000 of 2000 |"), "{o}");
    let o = bench(&[
        "throughput",
        "--one-home",
        "--senders",
        "4",
        "--recipients",
        "4",
        "--messages",
        "2000",
    ]);
    assert!(o.contains("| messages accepted | 2000 of 2000 |"), "{o}");
}

#[test]
fn presence_reaches_every_watcher_once() {
    let o = bench(&[
        "presence",
        "--users",
        "200",
        "--contacts",
        "10",
        "--rate",
        "100",
        "--seconds",
        "2",
    ]);
    assert!(
        o.contains("| watchers told (expected 2000 = changes × 10) | 2000 |"),
        "{o}"
    );
    assert!(
        o.contains("| server-to-server presence frames per change | 1.00"),
        "{o}"
    );
}

/// A flood from one home to another flows without a stall. Two homes that
/// both stopped reading while both wrote (one its items, the other its
/// acks) used to wait on each other until the 15 s write timeout, in about
/// one run of four; a sender now keeps at most a window of items unacked,
/// well under what makes the receiver stop reading.
#[test]
fn a_flood_between_two_homes_never_stalls() {
    for _ in 0..3 {
        let o = bench(&["throughput", "--messages", "50000"]);
        assert!(o.contains("| messages accepted | 50000 of 50000 |"), "{o}");
        let line = o
            .lines()
            .find(|l| l.starts_with("| send → receive latency"))
            .unwrap_or_else(|| panic!("no latency line:\n{o}"));
        let max_ms: f64 = line
            .rsplit('/')
            .next()
            .and_then(|x| x.trim().trim_end_matches('|').trim().strip_suffix(" ms"))
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the max from {line}"));
        assert!(max_ms < 15_000.0, "a message took {max_ms} ms:\n{o}");
    }
}
