//! `notify`: the desktop popup. Every incoming message becomes a
//! notification through `org.freedesktop.Notifications` on the agent's
//! session bus, with the sender as summary and the text as body, category
//! `im.received`, a `desktop-entry` hint, urgency by priority, an icon, and
//! the actions **Reply** and **Mark read**; clicking the popup marks it read.
//!
//! - Its own zbus connection, kept for the plugin's life: servers send
//!   `ActionInvoked` / `NotificationReplied` only to the connection that
//!   called `Notify` (notify-rust opens one per notification and misses
//!   them).
//! - Where the server has the `inline-reply` capability (KDE Plasma), the
//!   reply is typed in the popup and arrives as `NotificationReplied`.
//!   Elsewhere **Reply** runs `reply_command` (with `POPUPD_ID`,
//!   `POPUPD_FROM` and `POPUPD_TEXT` set), if configured.
//! - A burst from one sender updates one popup (`replaces_id`) instead of
//!   stacking dozens.
//! - A contact request pops up too, with **Accept** and **Decline**; the
//!   answer goes to the agent's `AnswerContactRequest` on D-Bus.
//! - With no notification server on the bus it logs once and keeps going.
//!
//! ```yaml
//! plugins:
//!   notify:
//!     app_icon: mail-message-new     # icon name or file
//!     desktop_entry: popupd           # the hint servers use to group popups
//!     timeout_ms: -1                  # -1: the server's default
//!     reply_command: [popupctl, compose]  # without inline reply (default)
//! ```

use std::collections::HashMap;

use futures_util::StreamExt;
use popupd_plugin_api::{Event, Host, Plugin, declare_plugin};
use serde::Deserialize;
use tokio::sync::mpsc;
use zbus::wire::Variant;

#[zbus::proxy(
    interface = "org.freedesktop.Notifications",
    default_service = "org.freedesktop.Notifications",
    default_path = "/org/freedesktop/Notifications"
)]
trait Notifications {
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        app_name: &str,
        replaces_id: u32,
        app_icon: &str,
        summary: &str,
        body: &str,
        actions: &[&str],
        hints: HashMap<&str, Variant<'_>>,
        expire_timeout: i32,
    ) -> zbus::Result<u32>;
    fn close_notification(&self, id: u32) -> zbus::Result<()>;
    fn get_capabilities(&self) -> zbus::Result<Vec<String>>;
    #[zbus(signal)]
    fn action_invoked(&self, id: u32, action_key: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn notification_closed(&self, id: u32, reason: u32) -> zbus::Result<()>;
    #[zbus(signal)]
    fn notification_replied(&self, id: u32, text: &str) -> zbus::Result<()>;
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "icon")]
    app_icon: String,
    #[serde(default = "entry")]
    desktop_entry: String,
    #[serde(default = "minus_one")]
    timeout_ms: i32,
    #[serde(default = "compose")]
    reply_command: Option<Vec<String>>,
}

fn compose() -> Option<Vec<String>> {
    Some(vec!["popupctl".into(), "compose".into()])
}

fn icon() -> String {
    "mail-message-new".into()
}
fn entry() -> String {
    "popupd".into()
}
fn minus_one() -> i32 {
    -1
}

fn parse(v: serde_json::Value) -> Result<Config, String> {
    let c: Config = serde_json::from_value(v).map_err(|e| format!("plugins.notify: {e}"))?;
    if c.reply_command.as_ref().is_some_and(Vec::is_empty) {
        return Err("plugins.notify.reply_command: give the program and its arguments".into());
    }
    Ok(c)
}

enum Work {
    Message {
        id: String,
        from: String,
        text: String,
        priority: String,
    },
    ContactRequest {
        from: String,
    },
    Config(Config),
}

/// The plugin: a thread with its own small runtime owns the D-Bus side.
pub struct Notify {
    tx: mpsc::UnboundedSender<Work>,
}

impl Plugin for Notify {
    fn init(host: Host, config: serde_json::Value) -> Result<Self, String> {
        let cfg = parse(config)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start: {e}"))?;
        std::thread::Builder::new()
            .name("notify-plugin".into())
            .spawn(move || rt.block_on(run(host, cfg, rx)))
            .map_err(|e| format!("cannot start: {e}"))?;
        Ok(Notify { tx })
    }

    fn on_event(&mut self, event: &Event) -> Result<(), String> {
        let work = match event {
            Event::MessageReceived {
                id,
                from,
                text,
                priority,
                ..
            } => Work::Message {
                id: id.clone(),
                from: from.clone(),
                text: text.clone(),
                priority: priority.clone(),
            },
            Event::ContactRequest { from } => Work::ContactRequest { from: from.clone() },
            _ => return Ok(()),
        };
        let _ = self.tx.send(work);
        Ok(())
    }

    fn reload(&mut self, config: serde_json::Value) -> Result<(), String> {
        let _ = self.tx.send(Work::Config(parse(config)?));
        Ok(())
    }
}

declare_plugin!(Notify, "notify", "0.1.0");

/// One popup on screen: whose, and which messages it shows.
struct Popup {
    from: String,
    ids: Vec<String>,
    lines: Vec<String>,
}

/// Escapes text for servers that read body markup.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn connect(host: &Host) -> zbus::Result<zbus::Connection> {
    match host.bus_address() {
        Some(a) => zbus::connection::Builder::address(a.as_str()).build().await,
        None => zbus::Connection::session().await,
    }
}

async fn run(host: Host, mut cfg: Config, mut rx: mpsc::UnboundedReceiver<Work>) {
    let conn = match connect(&host).await {
        Ok(c) => c,
        Err(e) => {
            host.warn(&format!("no session bus, so no popups: {e}"));
            while rx.recv().await.is_some() {}
            return;
        }
    };
    let Ok(proxy) = NotificationsProxy::new(&conn).await else {
        host.warn("cannot make a notifications proxy; no popups");
        return;
    };
    let (Ok(mut actions), Ok(mut closed), Ok(mut replied)) = (
        proxy.receive_action_invoked().await,
        proxy.receive_notification_closed().await,
        proxy.receive_notification_replied().await,
    ) else {
        host.warn("cannot subscribe to notification signals; no popups");
        return;
    };
    let mut open: HashMap<u32, Popup> = HashMap::new();
    // Contact requests on screen: notification id → who asks.
    let mut requests: HashMap<u32, String> = HashMap::new();
    let mut warned = false;
    loop {
        tokio::select! {
            w = rx.recv() => match w {
                None => return,
                Some(Work::Config(c)) => cfg = c,
                Some(Work::ContactRequest { from }) => {
                    let body = format!("{from} asks to be your contact: you would see each other's presence.");
                    let acts = ["accept", "Accept", "decline", "Decline"];
                    let hints = HashMap::from([
                        ("category", Variant::from("presence")),
                        ("desktop-entry", Variant::from(cfg.desktop_entry.as_str())),
                        ("urgency", Variant::from(1u8)),
                    ]);
                    match proxy.notify("popupd", 0, &cfg.app_icon, "Contact request", &body, &acts, hints, 0).await {
                        Ok(n) => { requests.insert(n, from); }
                        Err(e) => host.warn(&format!("cannot show {from}'s contact request ({e}); answer with `popupctl contacts accept|decline {from}`")),
                    }
                }
                Some(Work::Message { id, from, text, priority }) => {
                    let caps = proxy.get_capabilities().await.unwrap_or_default();
                    let markup = caps.iter().any(|c| c == "body-markup");
                    let inline = caps.iter().any(|c| c == "inline-reply");
                    // A popup of this sender still open: update it.
                    let replaces = open.iter().find(|(_, p)| p.from == from).map(|(n, _)| *n).unwrap_or(0);
                    let mut popup = open.remove(&replaces).unwrap_or(Popup { from: from.clone(), ids: Vec::new(), lines: Vec::new() });
                    popup.ids.push(id.clone());
                    popup.lines.push(if markup { escape(&text) } else { text.clone() });
                    let shown = popup.lines.iter().rev().take(3).rev().cloned().collect::<Vec<_>>().join("\n");
                    let more = popup.lines.len().saturating_sub(3);
                    let body = if more > 0 { format!("(+{more} earlier)\n{shown}") } else { shown };
                    let mut acts = vec!["default", "Open", "read", "Mark read"];
                    if inline {
                        acts.extend(["inline-reply", "Reply"]);
                    } else if cfg.reply_command.is_some() {
                        acts.extend(["reply", "Reply"]);
                    }
                    let urgency: u8 = match priority.as_str() { "low" => 0, "urgent" => 2, _ => 1 };
                    let hints = HashMap::from([
                        ("category", Variant::from("im.received")),
                        ("desktop-entry", Variant::from(cfg.desktop_entry.as_str())),
                        ("urgency", Variant::from(urgency)),
                    ]);
                    match proxy.notify("popupd", replaces, &cfg.app_icon, &from, &body, &acts, hints, cfg.timeout_ms).await {
                        Ok(n) => {
                            warned = false;
                            open.insert(n, popup);
                        }
                        Err(e) => {
                            if !warned {
                                host.warn(&format!("no notification server answers on the session bus ({e}); messages still arrive in history and on D-Bus"));
                                warned = true;
                            }
                        }
                    }
                }
            },
            Some(s) = actions.next() => {
                let Ok(a) = s.args() else { continue };
                if let Some(from) = requests.get(&a.id) {
                    let accept = match a.action_key {
                        "accept" => true,
                        "decline" => false,
                        _ => continue,
                    };
                    if let Err(e) = answer_request(&conn, from, accept).await {
                        host.warn(&format!("answering {from}'s contact request: {e}"));
                    }
                    let _ = proxy.close_notification(a.id).await;
                    requests.remove(&a.id);
                    continue;
                }
                let Some(p) = open.get(&a.id) else { continue };
                match a.action_key {
                    "default" | "read" => {
                        for id in &p.ids {
                            if let Err(e) = host.mark_read(id) {
                                host.warn(&format!("mark read: {e}"));
                            }
                        }
                        let _ = proxy.close_notification(a.id).await;
                        open.remove(&a.id);
                    }
                    "reply" => {
                        if let (Some(cmd), Some(last)) = (&cfg.reply_command, p.ids.last()) {
                            let mut c = std::process::Command::new(&cmd[0]);
                            if let Some(bus) = host.bus_address() {
                                // So `popupctl compose` talks to this agent.
                                c.env("POPUPCTL_BUS", bus);
                            }
                            let spawned = c
                                .args(&cmd[1..])
                                .env("POPUPD_ID", last)
                                .env("POPUPD_FROM", &p.from)
                                .env("POPUPD_TEXT", p.lines.last().map(String::as_str).unwrap_or(""))
                                .spawn();
                            match spawned {
                                // Answering it is reading it, as with an
                                // inline reply: the popup goes, and the
                                // sender is told it was read.
                                Ok(_) => {
                                    for id in &p.ids {
                                        if let Err(e) = host.mark_read(id) {
                                            host.warn(&format!("mark read: {e}"));
                                        }
                                    }
                                    let _ = proxy.close_notification(a.id).await;
                                    open.remove(&a.id);
                                }
                                Err(e) => host.warn(&format!("cannot run the reply command {:?}: {e}", cmd[0])),
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some(s) = replied.next() => {
                let Ok(a) = s.args() else { continue };
                if let Some(p) = open.remove(&a.id)
                    && let Some(last) = p.ids.last() {
                        match host.reply(&p.from, last, a.text) {
                            Ok(_) => {
                                for id in &p.ids {
                                    let _ = host.mark_read(id);
                                }
                            }
                            Err(e) => host.warn(&format!("reply: {e}")),
                        }
                    }
            }
            Some(s) = closed.next() => {
                if let Ok(a) = s.args() {
                    open.remove(&a.id);
                    requests.remove(&a.id);
                }
            }
        }
    }
}

/// Answers a contact request through the agent's D-Bus interface (the
/// plugin host API has no call for it; D-Bus is the agent's public face).
async fn answer_request(conn: &zbus::Connection, from: &str, accept: bool) -> zbus::Result<()> {
    conn.call_method(
        Some("org.popupd.Agent1"),
        "/org/popupd/Agent1",
        Some("org.popupd.Agent1"),
        "AnswerContactRequest",
        &(from, accept),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("<b>a & b</b>"), "&lt;b&gt;a &amp; b&lt;/b&gt;");
    }

    #[test]
    fn config_errors_name_the_field() {
        assert!(
            parse(serde_json::json!({"colour": 1}))
                .unwrap_err()
                .contains("plugins.notify")
        );
        assert!(
            parse(serde_json::json!({"reply_command": []}))
                .unwrap_err()
                .contains("reply_command")
        );
        assert_eq!(
            parse(serde_json::json!({})).unwrap().desktop_entry,
            "popupd"
        );
    }
}
