//! `exec`: runs a command for each matching message, for scripts and
//! integrations. The message goes to the command as environment variables
//! (`POPUPD_ID`, `POPUPD_FROM`, `POPUPD_TEXT`, `POPUPD_SENT_AT`) and as one
//! JSON object on stdin; a command still running after its timeout is
//! killed.
//!
//! ```yaml
//! plugins:
//!   exec:
//!     rules:
//!       - from: bob              # optional: only messages from bob
//!         contains: deploy       # optional: only texts containing this
//!         command: [notify-send, "deploy request"]
//!         timeout: 10            # seconds, default 10
//! ```

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use popupd_plugin_api::{Event, Host, Plugin, declare_plugin};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    contains: Option<String>,
    command: Vec<String>,
    #[serde(default = "ten")]
    timeout: u64,
}

fn ten() -> u64 {
    10
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    rules: Vec<Rule>,
}

fn parse(config: serde_json::Value) -> Result<Config, String> {
    let c: Config = serde_json::from_value(config).map_err(|e| format!("plugins.exec: {e}"))?;
    for (i, r) in c.rules.iter().enumerate() {
        if r.command.is_empty() {
            return Err(format!(
                "plugins.exec.rules[{i}].command: give the program and its arguments"
            ));
        }
    }
    Ok(c)
}

/// The plugin.
pub struct Exec {
    host: Host,
    cfg: Config,
}

impl Plugin for Exec {
    fn init(host: Host, config: serde_json::Value) -> Result<Self, String> {
        Ok(Exec {
            host,
            cfg: parse(config)?,
        })
    }

    fn on_event(&mut self, event: &Event) -> Result<(), String> {
        let Event::MessageReceived {
            id,
            from,
            text,
            sent_at,
            ..
        } = event
        else {
            return Ok(());
        };
        for r in &self.cfg.rules {
            if r.from.as_ref().is_some_and(|f| f != from)
                || r.contains
                    .as_ref()
                    .is_some_and(|c| !text.contains(c.as_str()))
            {
                continue;
            }
            let json = serde_json::to_string(event).unwrap_or_default();
            let mut cmd = Command::new(&r.command[0]);
            cmd.args(&r.command[1..])
                .env("POPUPD_ID", id)
                .env("POPUPD_FROM", from)
                .env("POPUPD_TEXT", text)
                .env("POPUPD_SENT_AT", sent_at.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::null());
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot run {:?}: {e}", r.command[0]))?;
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(json.as_bytes());
            }
            // Wait on a thread of its own: the plugin's thread stays free.
            let (timeout, name) = (Duration::from_secs(r.timeout), r.command[0].clone());
            let host_log = format!("{name} timed out after {}s and was killed", r.timeout);
            let host = self.host;
            std::thread::spawn(move || {
                let start = Instant::now();
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) | Err(_) => return,
                        Ok(None) if start.elapsed() > timeout => {
                            let _ = child.kill();
                            let _ = child.wait();
                            host.warn(&host_log);
                            return;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        Ok(())
    }

    fn reload(&mut self, config: serde_json::Value) -> Result<(), String> {
        self.cfg = parse(config)?;
        Ok(())
    }
}

declare_plugin!(Exec, "exec", "0.1.0");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_field() {
        assert!(
            parse(serde_json::json!({"rules": [{"command": []}]}))
                .unwrap_err()
                .contains("rules[0].command")
        );
        assert!(
            parse(serde_json::json!({"rulez": []}))
                .unwrap_err()
                .contains("plugins.exec")
        );
        assert_eq!(parse(serde_json::json!({})).unwrap().rules.len(), 0);
    }
}
