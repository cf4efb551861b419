//! Network namespaces that a test makes for itself: a second host joined
//! to this one by a veth pair, and a switch to cut the wire silently
//! (nftables drops packets; nothing answers, nothing resets). Root only.

use std::process::Command;

/// Runs a command; its stderr is the error.
pub fn sh(args: &[&str]) -> Result<(), String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("{args:?}: {}", String::from_utf8_lossy(&o.stderr)))
    }
}

/// Runs `nft -f` on `rules` inside namespace `ns`.
fn nft(ns: &str, rules: &str) -> Result<(), String> {
    let f = std::env::temp_dir().join(format!("popupd-e2e-{ns}-{}.nft", fastrand::u32(..)));
    std::fs::write(&f, rules).map_err(|e| e.to_string())?;
    let r = sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "-f",
        f.to_str().unwrap_or_default(),
    ]);
    let _ = std::fs::remove_file(&f);
    r
}

/// A namespace `popupd-e2e-N` with the pair `pvhN` (here, 10.231.M.1) and
/// `pvnN` (inside, 10.231.M.2), M = N mod 250. Removed when dropped.
pub struct Netns {
    pub name: String,
    veth: String,
    /// This host's end of the pair.
    pub host_ip: String,
    /// The namespace's end.
    pub inner_ip: String,
}

impl Netns {
    /// Makes the namespace. `n` must be unique among the tests running at once.
    pub fn create(n: u32) -> Result<Netns, String> {
        let name = format!("popupd-e2e-{n}");
        let veth = format!("pvh{n}");
        let peer = format!("pvn{n}");
        // Left over from a run that was killed.
        let _ = sh(&["ip", "link", "del", &veth]);
        let _ = sh(&["ip", "netns", "del", &name]);
        let ns = Netns {
            name: name.clone(),
            veth: veth.clone(),
            host_ip: format!("10.231.{}.1", n % 250),
            inner_ip: format!("10.231.{}.2", n % 250),
        };
        sh(&["ip", "netns", "add", &name])?;
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer,
        ])?;
        sh(&["ip", "link", "set", &peer, "netns", &name])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &veth,
        ])?;
        sh(&["ip", "link", "set", &veth, "up"])?;
        sh(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            &format!("{}/30", ns.inner_ip),
            "dev",
            &peer,
        ])?;
        sh(&["ip", "-n", &name, "link", "set", &peer, "up"])?;
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The prefix that runs a command inside.
    pub fn prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// A firewall inside: nothing new comes in (established connections
    /// and loopback only).
    pub fn firewall_inbound(&self) -> Result<(), String> {
        nft(
            &self.name,
            "table inet fw {\n chain input {\n  type filter hook input priority 0; policy drop;\n  ct state established,related accept\n  iif lo accept\n }\n}\n",
        )
    }

    /// Cuts the wire silently: every packet between the namespace and this
    /// host is dropped, except TCP to or from `keep_port` on this host.
    pub fn cut(&self, keep_port: Option<u16>) -> Result<(), String> {
        let h = &self.host_ip;
        let keep = |dir: &str| match keep_port {
            Some(p) => format!(
                "  ip {dir} {h} tcp {} {p} accept\n",
                if dir == "saddr" { "sport" } else { "dport" }
            ),
            None => String::new(),
        };
        let rules = format!(
            "table inet cut {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n{}  ip saddr {h} drop\n }}\n chain output {{\n  type filter hook output priority 0; policy accept;\n{}  ip daddr {h} drop\n }}\n}}\n",
            keep("saddr"),
            keep("daddr"),
        );
        nft(&self.name, &rules)
    }

    /// Mends what [`Netns::cut`] cut.
    pub fn heal(&self) -> Result<(), String> {
        nft(&self.name, "delete table inet cut\n")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "link", "del", &self.veth]);
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// Whether namespaces can be made here: root, with `ip` and `nft`. The
/// error says why not, for a "skipped" line.
pub fn available() -> Result<(), String> {
    if !crate::is_root() {
        return Err("needs root to create a network namespace (CI runs it as root)".into());
    }
    for tool in ["ip", "nft"] {
        if !crate::have(tool) {
            return Err(format!(
                "`{tool}` is not installed (apt install iproute2 nftables)"
            ));
        }
    }
    Ok(())
}
