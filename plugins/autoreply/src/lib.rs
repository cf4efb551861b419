//! `autoreply`: while this person is away or busy, answers each sender
//! once per period with a configured text, as a reply to their message.
//!
//! ```yaml
//! plugins:
//!   autoreply:
//!     text: "I am away from my desk; I will answer when I am back."
//!     period: 1h              # at most one answer per sender in this time
//!     states: [away, busy]    # when to answer (default: both)
//! ```
//!
//! Without `text` it stays quiet: it ships in the package, and nobody
//! should answer automatically without choosing to.
//!
//! The state is the person's own presence as the agent reports it (set by
//! hand, or away when the desktop is idle). The answer goes out through the
//! agent like any message, so it is in history and the sender sees it as a
//! reply. Two people who both autoreply exchange at most one answer each
//! per period.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use popupd_plugin_api::{Event, Host, Plugin, declare_plugin};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    period: Option<String>,
    #[serde(default)]
    states: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
struct Config {
    /// `None`: not configured, so off.
    text: Option<String>,
    period: Duration,
    states: Vec<String>,
}

fn parse(v: serde_json::Value) -> Result<Config, String> {
    let f: File = serde_json::from_value(v).map_err(|e| format!("plugins.autoreply: {e}"))?;
    let text = f.text;
    if text.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err("plugins.autoreply.text: give the text to answer with".into());
    }
    let period = match f.period {
        None => Duration::from_secs(3600),
        Some(p) => humantime::parse_duration(&p).map_err(|e| {
            format!("plugins.autoreply.period: {p:?} is not a duration ({e}); write e.g. 30m or 1h")
        })?,
    };
    let states = f
        .states
        .unwrap_or_else(|| vec!["away".into(), "busy".into()]);
    for s in &states {
        if !["away", "busy", "offline"].contains(&s.as_str()) {
            return Err(format!(
                "plugins.autoreply.states: {s:?} is not a state to answer in; use away, busy or offline"
            ));
        }
    }
    Ok(Config {
        text,
        period,
        states,
    })
}

/// The plugin.
pub struct Autoreply {
    host: Host,
    cfg: Config,
    /// This person's presence, from `presence_set`.
    state: String,
    /// When each sender was last answered.
    answered: HashMap<String, Instant>,
}

impl Plugin for Autoreply {
    fn init(host: Host, config: serde_json::Value) -> Result<Self, String> {
        Ok(Autoreply {
            host,
            cfg: parse(config)?,
            state: "online".into(),
            answered: HashMap::new(),
        })
    }

    fn on_event(&mut self, event: &Event) -> Result<(), String> {
        match event {
            Event::PresenceSet { state, .. } => {
                if *state != self.state && state == "online" {
                    // Back: the next absence answers everyone afresh.
                    self.answered.clear();
                }
                self.state = state.clone();
            }
            Event::MessageReceived { id, from, .. } => {
                let Some(text) = &self.cfg.text else {
                    return Ok(());
                };
                if !self.cfg.states.contains(&self.state) {
                    return Ok(());
                }
                let now = Instant::now();
                if self
                    .answered
                    .get(from)
                    .is_some_and(|t| now.duration_since(*t) < self.cfg.period)
                {
                    return Ok(());
                }
                self.answered.insert(from.clone(), now);
                self.answered
                    .retain(|_, t| now.duration_since(*t) < self.cfg.period);
                self.host.send(from, text, Some(id))?;
                self.host
                    .info(&format!("answered {from} automatically ({})", self.state));
            }
            _ => {}
        }
        Ok(())
    }

    fn reload(&mut self, config: serde_json::Value) -> Result<(), String> {
        self.cfg = parse(config)?;
        Ok(())
    }
}

declare_plugin!(Autoreply, "autoreply", "0.1.0");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_errors_name_the_field() {
        let c = parse(serde_json::json!({})).unwrap();
        assert_eq!(c.text, None, "off unless configured");
        assert_eq!(c.period, Duration::from_secs(3600));
        assert_eq!(c.states, ["away", "busy"]);
        let e = parse(serde_json::json!({"period": "soon"})).unwrap_err();
        assert!(e.contains("plugins.autoreply.period"), "{e}");
        let e = parse(serde_json::json!({"states": ["online"]})).unwrap_err();
        assert!(e.contains("plugins.autoreply.states"), "{e}");
        let e = parse(serde_json::json!({"txt": "x"})).unwrap_err();
        assert!(e.contains("plugins.autoreply"), "{e}");
    }
}
