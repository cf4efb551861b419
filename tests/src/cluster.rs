//! A home on several nodes for end-to-end tests: a NATS server of the
//! test's own (`nats-server` on 127.0.0.1), PostgreSQL (see [`crate::pg`]),
//! and home A as nodes `n1`, `n2`, ... that share one database and one
//! `public_address` naming them all. Home B and the global server are as in
//! any test network.

use std::path::Path;
use std::time::Duration;

use crate::pg::{self, TestServer};
use crate::{Layout, Network, Proc, bin, free_port, have, skip, wait_port};

/// A `nats-server` of the test's own.
pub struct Nats {
    pub proc: Proc,
    pub url: String,
    addr: String,
    /// Its monitoring endpoint (`-m`).
    monitor: String,
}

impl Nats {
    /// Starts one in `dir` (its log `dir/nats.log`), or `None` when there
    /// is none to start: the test is then skipped, and says why, except
    /// under CI (`CI=true`), where the test command installs it.
    pub async fn start(dir: &Path, test: &str) -> Option<Nats> {
        let program = if have("nats-server") {
            "nats-server"
        } else {
            "/usr/sbin/nats-server"
        };
        if !Path::new(program).exists() && program != "nats-server" {
            let why = "nats-server is not installed (apt install nats-server)";
            if popupd_store::pg_test_server::required() {
                panic!("{test}: needs {why} under CI");
            }
            skip(test, why);
            return None;
        }
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mport = free_port();
        let argv: Vec<String> = [
            program,
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            &mport.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::spawn(&argv, &dir.join("nats.log")).expect("start nats-server");
        wait_port(&addr).await.expect("nats-server listening");
        Some(Nats {
            proc,
            url: format!("nats://{addr}"),
            addr,
            monitor: format!("127.0.0.1:{mport}"),
        })
    }

    /// How many subscriptions the server holds to `subject`, from its
    /// monitoring endpoint (`/subsz`).
    pub fn subscriptions(&self, subject: &str) -> usize {
        let (code, head, body) = crate::http_get(&self.monitor, "/subsz?subs=1&limit=100000", None);
        assert_eq!(code, 200, "{body}");
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(&body)
        } else {
            body
        };
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON from /subsz");
        v["subscriptions_list"]
            .as_array()
            .map_or(0, |l| l.iter().filter(|s| s["subject"] == subject).count())
    }

    /// Stops it (`kill -9`).
    pub fn stop(&mut self) {
        self.proc.kill9();
    }

    /// Starts it again on the same port (see [`Nats::wait_ready`]).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.proc.restart()
    }

    /// Waits until it listens.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        wait_port(&self.addr).await
    }
}

/// The body of a chunked HTTP answer.
fn dechunk(mut raw: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = raw.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        raw = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Home A on `nodes` nodes, home B and the global server.
pub struct Cluster {
    pub net: Network,
    /// Home A's nodes: `nodes[0]` is `net.homes[0]`; the others follow.
    pub more: Vec<Proc>,
    /// Each node's address, `n1` first.
    pub addrs: Vec<String>,
    pub pg: TestServer,
    pub nats: Nats,
}

impl Cluster {
    /// Starts PostgreSQL and NATS in `dir`, then the network with home A on
    /// `nodes` nodes (home B on SQLite); `None` if the test is skipped.
    pub async fn start(dir: &Path, test: &str, nodes: usize) -> Option<Cluster> {
        Cluster::start_laid_out(dir, test, nodes, Layout::default()).await
    }

    /// [`Cluster::start`] on `layout` (home A's port, address, storage and
    /// cluster lines are the cluster's).
    pub async fn start_laid_out(
        dir: &Path,
        test: &str,
        nodes: usize,
        mut layout: Layout,
    ) -> Option<Cluster> {
        let pg = pg::server(dir, test)?;
        let nats = Nats::start(dir, test).await?;
        let ports: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        layout.homes[0].port = Some(ports[0]);
        layout.homes[0].public_address = Some(addrs.join(", "));
        layout.homes[0].yaml = format!(
            "{}  cluster:\n    node: n1\n    nats: \"{}\"\n",
            pg::storage_yaml(&pg, "home0").expect("database"),
            nats.url
        );
        let net = Network::start_laid_out(dir, layout).await.expect("network");
        let mut c = Cluster {
            net,
            more: Vec::new(),
            addrs,
            pg,
            nats,
        };
        for (i, port) in ports.iter().enumerate().skip(1) {
            let p = c.start_node(i, *port).await.expect("node");
            c.more.push(p);
        }
        Some(c)
    }

    /// Writes node `i`'s config (node 1's, with its own port, data folder
    /// and name) and starts it.
    async fn start_node(&self, i: usize, port: u16) -> anyhow::Result<Proc> {
        let first = std::fs::read_to_string(self.net.home_config(0))?;
        let yaml: String = first
            .lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with("listen:") {
                    format!("  listen: 127.0.0.1:{port}")
                } else if t.starts_with("data_dir:") {
                    format!("  data_dir: data/{}-n{}", crate::HOME_A, i + 1)
                } else if t.starts_with("node:") {
                    format!("    node: n{}", i + 1)
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        let file = self.node_config(i);
        std::fs::write(&file, yaml)?;
        let argv = vec![
            bin("popupd").display().to_string(),
            "run".into(),
            "-c".into(),
            file.display().to_string(),
        ];
        let p = Proc::spawn(&argv, &self.net.dir.join(format!("home0-n{}.log", i + 1)))?;
        wait_port(&format!("127.0.0.1:{port}")).await?;
        Ok(p)
    }

    /// Node `i`'s config (0: `n1`).
    pub fn node_config(&self, i: usize) -> std::path::PathBuf {
        match i {
            0 => self.net.home_config(0),
            _ => self.net.dir.join(format!("home0-n{}.yaml", i + 1)),
        }
    }

    /// Node `i`'s process.
    pub fn node(&mut self, i: usize) -> &mut Proc {
        match i {
            0 => &mut self.net.homes[0],
            _ => &mut self.more[i - 1],
        }
    }

    /// Adds a user on home A whose agent dials only the nodes `on` (in
    /// random order among them); returns the agent config.
    pub fn add_user_on(&self, handle: &str, on: &[usize]) -> anyhow::Result<std::path::PathBuf> {
        let cfg = self.net.add_user(0, handle)?;
        let list: Vec<&str> = on.iter().map(|&i| self.addrs[i].as_str()).collect();
        let yaml = std::fs::read_to_string(&cfg)?;
        let yaml: String = yaml
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("address:") {
                    format!("  address: \"{}\"", list.join(", "))
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        std::fs::write(&cfg, yaml)?;
        Ok(cfg)
    }

    /// Which running node (0: `n1`) holds `handle`'s connection now, by
    /// their logs: the one whose last line about it says online.
    pub fn node_of(&mut self, handle: &str) -> Option<usize> {
        let online = format!("agent online: {handle} ");
        let offline = format!("agent offline: {handle} ");
        (0..self.addrs.len()).find(|&i| {
            let node = self.node(i);
            if node.pid().is_none() {
                return false;
            }
            let log = node.log_text();
            let on = log.rfind(&online);
            on.is_some() && on > log.rfind(&offline)
        })
    }

    /// Waits until `handle` is online at some node; returns which.
    pub async fn wait_node_of(&mut self, handle: &str, within: Duration) -> anyhow::Result<usize> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(i) = self.node_of(handle) {
                return Ok(i);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{handle} is online at no node after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
