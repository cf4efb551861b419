//! End-to-end: what an operator sees. A home's and the global server's
//! Prometheus metrics (scraped over HTTP, checked with promtool and by a
//! real Prometheus where they are installed), the example alert rules and
//! dashboard, and `popupd status` against running servers.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use popupd_e2e::{
    HOME_A, HOME_B, Layout, Proc, TestDir, have, http_get, metric_sample, popupd, skip,
    two_people_on,
};

const T: Duration = Duration::from_secs(20);

/// The metric families a scrape names (`# TYPE` lines).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `popupd_…` name in `text`, as a metric family (without the
/// suffixes a histogram's series add).
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("popupd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        if base.len() > "popupd_".len() {
            out.insert(base.to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_a_message_crossing_homes() {
    let dir = TestDir::new("metrics");
    let layout = Layout {
        metrics: true,
        ..Layout::default()
    };
    let (net, alice, bob) = two_people_on(&dir.path, layout, "", "").await;
    let [global, home_a, home_b] = [0, 1, 2].map(|i| net.metrics_addrs[i].clone());

    // Before: nothing sent.
    let (code, head, before) = http_get(&home_a, "/metrics", None);
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert_eq!(
        metric_sample(&before, "popupd_messages_accepted_total"),
        Some(0.0)
    );

    let id = alice
        .proxy()
        .await
        .unwrap()
        .send("bob", "metrics?")
        .await
        .unwrap();
    alice.wait_status(&id, "delivered", T).await.unwrap();
    drop(bob);
    // One to nobody fails, and says why.
    let lost = alice
        .proxy()
        .await
        .unwrap()
        .send("nobody", "hello?")
        .await
        .unwrap();
    alice.wait_status(&lost, "failed", T).await.unwrap();

    // Home A took both messages, heard the first was delivered and failed
    // the second (no such user); the login counted; the store committed
    // batches.
    let (_, _, a) = http_get(&home_a, "/metrics", None);
    assert_eq!(
        metric_sample(&a, "popupd_messages_accepted_total"),
        Some(2.0),
        "{a}"
    );
    assert_eq!(
        metric_sample(&a, "popupd_messages_delivered_total"),
        Some(1.0),
        "{a}"
    );
    assert_eq!(
        metric_sample(&a, r#"popupd_messages_failed_total{reason="not_accepted"}"#),
        Some(1.0),
        "{a}"
    );
    assert_eq!(
        metric_sample(&a, r#"popupd_messages_failed_total{reason="mailbox_full"}"#),
        Some(0.0)
    );
    assert!(
        metric_sample(&a, r#"popupd_logins_total{outcome="ok"}"#) >= Some(1.0),
        "{a}"
    );
    assert!(
        metric_sample(&a, "popupd_store_batch_jobs_count") > Some(0.0),
        "{a}"
    );
    assert!(
        metric_sample(&a, "popupd_store_sync_seconds_count") > Some(0.0),
        "{a}"
    );
    assert_eq!(
        metric_sample(&a, r#"popupd_connections{kind="agent"}"#),
        Some(1.0),
        "{a}"
    );
    assert!(
        metric_sample(&a, "popupd_connections_accepted_total") >= Some(1.0),
        "{a}"
    );
    // alice came online: a presence change of one of home A's users.
    assert!(
        metric_sample(&a, r#"popupd_presence_events_total{kind="changes"}"#) >= Some(1.0),
        "{a}"
    );
    let expiry = format!(
        r#"popupd_certificate_expiry_timestamp_seconds{{file="{}"}}"#,
        net.dir.join("pki").join(format!("{HOME_A}.crt")).display()
    );
    assert!(metric_sample(&a, &expiry) > Some(1.7e9), "{expiry} in {a}");
    // Home B: a login, nothing sent by its users.
    let (_, _, b) = http_get(&home_b, "/metrics", None);
    assert!(
        metric_sample(&b, r#"popupd_logins_total{outcome="ok"}"#) >= Some(1.0),
        "{b}"
    );
    assert_eq!(
        metric_sample(&b, "popupd_messages_accepted_total"),
        Some(0.0),
        "{b}"
    );
    // The global server answered the homes' lookups.
    let (_, _, g) = http_get(&global, "/metrics", None);
    assert!(
        metric_sample(&g, "popupd_global_lookups_total") >= Some(1.0),
        "{g}"
    );
    assert_eq!(
        metric_sample(&g, r#"popupd_connections{kind="peer"}"#),
        Some(2.0),
        "{g}"
    );

    // OpenMetrics, when asked for.
    let (code, head, om) = http_get(
        &home_a,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert_eq!(code, 200);
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(
        om.contains("# TYPE popupd_messages_accepted counter"),
        "{om}"
    );
    assert!(om.contains("popupd_messages_accepted_total 2"), "{om}");
    // Anything else is refused.
    assert_eq!(http_get(&home_a, "/", None).0, 404);

    // The docs, the alerts and the dashboard name only metrics that exist.
    let seen: BTreeSet<String> = families(&a).union(&families(&g)).cloned().collect();
    let docs = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    for f in &seen {
        assert!(
            docs.contains(&format!("`{f}`")),
            "docs/metrics.md lacks {f}"
        );
    }
    for file in [
        "docs/metrics.md",
        "packaging/examples/popupd-alerts.yml",
        "packaging/examples/popupd-dashboard.json",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let named = names_in(&text);
        assert!(!named.is_empty(), "{file} names no metric");
        for n in named {
            // A family with a series per peer home has none while nothing
            // waits, and is then not in a scrape.
            let may_be_empty = n == "popupd_forward_queue_items";
            assert!(
                seen.contains(&n) || may_be_empty,
                "{file} names {n}, which no server serves"
            );
        }
    }

    // promtool reads the scrapes without a complaint.
    if have("promtool") {
        for (who, text) in [("home", &a), ("global", &g)] {
            let mut p = Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let o = p.wait_with_output().unwrap();
            assert!(
                o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
                "promtool check metrics ({who}): {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    } else {
        skip(
            "promtool check metrics",
            "promtool is not installed (apt install prometheus)",
        );
    }

    // A real Prometheus scrapes home A and has the sample.
    if have("prometheus") {
        real_prometheus_scrapes(&dir.path, &home_a).await;
    } else {
        skip(
            "real Prometheus scrape",
            "prometheus is not installed (apt install prometheus)",
        );
    }
}

async fn real_prometheus_scrapes(dir: &Path, target: &str) {
    let port = popupd_e2e::free_port();
    let web = format!("127.0.0.1:{port}");
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: popupd\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let _prom = Proc::spawn(
        &[
            "prometheus".into(),
            format!("--config.file={}", cfg.display()),
            format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
            format!("--web.listen-address={web}"),
        ],
        &dir.join("prometheus.log"),
    )
    .unwrap();
    popupd_e2e::wait_port(&web).await.unwrap();
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(&web) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let q = "/api/v1/query?query=popupd_messages_accepted_total";
            if write!(
                s,
                "GET {q} HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n"
            )
            .is_ok()
            {
                last.clear();
                let _ = s.read_to_string(&mut last);
                if last.contains("\"status\":\"success\"") && last.contains("\"value\":[") {
                    assert!(
                        last.contains(",\"2\"]"),
                        "Prometheus has another value: {last}"
                    );
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus had no sample of popupd_messages_accepted_total within 60 s: {last}\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[test]
fn example_alert_rules_check() {
    let rules = repo().join("packaging/examples/popupd-alerts.yml");
    assert!(rules.exists());
    let dash =
        std::fs::read_to_string(repo().join("packaging/examples/popupd-dashboard.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&dash).expect("the dashboard is JSON");
    assert!(
        v["panels"].as_array().is_some_and(|p| !p.is_empty()),
        "the dashboard has panels"
    );
    if !have("promtool") {
        return skip(
            "promtool check rules",
            "promtool is not installed (apt install prometheus)",
        );
    }
    let o = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn text(o: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_how_home_and_global_are() {
    let dir = TestDir::new("status");
    let (mut net, alice, _bob) = two_people_on(&dir.path, Layout::default(), "", "").await;
    let id = alice
        .proxy()
        .await
        .unwrap()
        .send("bob", "status?")
        .await
        .unwrap();
    alice.wait_status(&id, "delivered", T).await.unwrap();
    let home_cfg = net.home_config(0);
    let home = home_cfg.to_str().unwrap();

    // Human: the home, its agent, its link to home B.
    let o = popupd(&["status", "-c", home]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.starts_with(&format!("home {HOME_A}: running")), "{out}");
    assert!(out.contains("1 agents"), "{out}");
    assert!(out.contains(HOME_B) && out.contains("linked"), "{out}");
    assert!(
        out.contains("server cert:") && out.contains("days)"),
        "{out}"
    );
    assert!(!out.contains("warning"), "{out}");

    // JSON: the documented fields.
    let o = popupd(&["status", "-c", home, "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &v["servers"][0];
    assert_eq!(s["role"], "home");
    assert_eq!(s["name"], HOME_A);
    assert_eq!(s["pid"], net.homes[0].pid().unwrap());
    assert_eq!(s["connections"]["agents"], 1);
    let peers = s["peers"].as_array().unwrap();
    let b = peers
        .iter()
        .find(|p| p["home"] == HOME_B)
        .expect("home B in peers");
    assert_eq!(b["state"], "linked");
    assert_eq!(b["queued"], 0);
    assert!(s["store"]["last_commit_age_seconds"].as_f64().unwrap() >= 0.0);
    assert!(s["store"]["database_bytes"].as_u64().unwrap() > 0);
    let certs = s["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{certs:?}");
    assert!(
        certs.iter().all(|c| c["days_left"].as_i64().unwrap() > 300),
        "{certs:?}"
    );
    assert_eq!(s["warnings"].as_array().unwrap().len(), 0);

    // The global server: both homes linked.
    let gcfg = net.global_config();
    let o = popupd(&["status", "-c", gcfg.to_str().unwrap(), "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let g = &v["servers"][0];
    assert_eq!(g["role"], "global");
    assert_eq!(g["name"], "global.test");
    assert_eq!(g["connections"]["peers"], 2, "{g}");
    let o = popupd(&["status", "-c", gcfg.to_str().unwrap()]);
    let (out, _) = text(&o);
    assert!(
        out.starts_with("global global.test: running") && out.contains("2 homes linked"),
        "{out}"
    );

    // The admin socket is for root and the data folder's group.
    let sock = net.dir.join(format!("data/{HOME_A}/admin.sock"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660, "{}", sock.display());

    // Stopped: a clear refusal that names the socket, and exit 1.
    net.homes[0].stop();
    let o = popupd(&["status", "-c", home]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(err.contains("not running"), "{err}");
    assert!(err.contains("systemctl start popupd@"), "{err}");

    // Killed, it leaves its socket, which nobody answers on.
    net.homes[1].kill9();
    let b_cfg = net.home_config(1);
    let o = popupd(&["status", "-c", b_cfg.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("admin.sock: nobody answers: the server is not running"),
        "{err}"
    );
}
