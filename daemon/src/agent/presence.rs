//! Presence on the agent: this device's own state, the contact list the
//! home sent (with their presence), and automatic away.
//!
//! The person's state is either set by hand (`busy`, `away`, `offline`),
//! which nothing automatic overrides, or automatic: `online`, turning
//! `away` after the desktop has been idle for `away_after` and back on
//! input. Setting `online` by hand returns to automatic. The choice and the
//! status text survive a restart (they live in the agent's store).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::dbus::AgentIface;
use super::idle::IdleProbe;
use super::plugins::Event as PluginEvent;
use super::{ActionError, Agent, Up};
use popupd_protocol::{
    Contact, ContactOp, MAX_STATUS_TEXT, PresenceReport, PresenceState, Relation, valid_handle,
};
use popupd_store::StoreError;

/// This device's presence as the person and the idle watcher left it.
#[derive(Debug, Clone, Default)]
pub struct Own {
    /// Set by hand: busy, away or offline. `None`: automatic.
    pub manual: Option<PresenceState>,
    pub text: String,
    /// The desktop is idle past `away_after`.
    pub idle: bool,
}

impl Own {
    /// What this device reports.
    pub fn effective(&self) -> PresenceReport {
        let state = match (self.manual, self.idle) {
            (Some(s), _) => s,
            (None, true) => PresenceState::Away,
            (None, false) => PresenceState::Online,
        };
        PresenceReport {
            state,
            text: self.text.clone(),
        }
    }
}

/// Presence state of one running agent.
#[derive(Default)]
pub struct Presence {
    pub own: Mutex<Own>,
    /// The contact list as the home last sent it.
    pub contacts: Mutex<BTreeMap<String, Contact>>,
}

const MANUAL_KEY: &str = "presence.manual";
const TEXT_KEY: &str = "presence.text";

impl Agent {
    /// Restores the state set by hand before the last stop.
    pub async fn load_presence(&self) {
        let r = self
            .store
            .run(|s| Ok((s.setting(MANUAL_KEY)?, s.setting(TEXT_KEY)?)))
            .await;
        if let Ok((manual, text)) = r {
            let mut own = self.presence.own.lock().unwrap_or_else(|e| e.into_inner());
            own.manual = manual.as_deref().and_then(PresenceState::parse);
            own.text = text.unwrap_or_default();
        }
    }

    /// What this device reports now.
    pub fn own_presence(&self) -> PresenceReport {
        self.presence
            .own
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .effective()
    }

    /// The person sets their presence by hand. `online` returns to
    /// automatic (away when idle).
    pub async fn set_presence(&self, state: &str, text: &str) -> Result<(), ActionError> {
        let st = match PresenceState::parse(state) {
            Some(s) if s != PresenceState::Unknown => s,
            _ => {
                return Err(ActionError::Invalid(format!(
                    "{state:?} is not a presence; use online, away, busy or offline"
                )));
            }
        };
        let text = text.trim().to_owned();
        if text.len() > MAX_STATUS_TEXT {
            return Err(ActionError::Invalid(format!(
                "the status text is {} bytes; the limit is {MAX_STATUS_TEXT}",
                text.len()
            )));
        }
        let manual = (st != PresenceState::Online).then_some(st);
        let (m, t) = (manual.map(|s| s.as_str().to_owned()), text.clone());
        self.store
            .run(move |s| {
                s.set_setting(MANUAL_KEY, m.as_deref())?;
                s.set_setting(TEXT_KEY, Some(&t))
            })
            .await?;
        self.change_own(|o| {
            o.manual = manual;
            o.text = text;
        })
        .await;
        Ok(())
    }

    /// Applies `f` to the own state; if what this device reports changed,
    /// tells the home, D-Bus and plugins.
    pub async fn change_own(&self, f: impl FnOnce(&mut Own)) {
        let (before, after) = {
            let mut own = self.presence.own.lock().unwrap_or_else(|e| e.into_inner());
            let before = own.effective();
            f(&mut own);
            (before, own.effective())
        };
        if before == after {
            return;
        }
        tracing::info!(
            state = after.state.as_str(),
            text = %after.text,
            "presence set"
        );
        let _ = self.up.send(Up::Presence(after.clone()));
        self.plugins.dispatch(&PluginEvent::PresenceSet {
            state: after.state.as_str().into(),
            text: after.text.clone(),
        });
        if let Some(i) = self.iface() {
            let _ = i.get().await.presence_changed(i.signal_emitter()).await;
        }
    }

    /// Asks the home to change the contact list: stored, and sent when
    /// connected until the home confirms it.
    pub async fn contact(&self, op: ContactOp, handle: &str) -> Result<(), ActionError> {
        let handle = handle.trim();
        if !valid_handle(handle) {
            return Err(ActionError::Invalid(format!(
                "{handle:?} is not a handle (1-64 lowercase letters, digits, '.', '-' or '_')"
            )));
        }
        if handle == self.cfg.handle {
            return Err(ActionError::Invalid("that is you".into()));
        }
        if matches!(op, ContactOp::Accept | ContactOp::Decline) {
            let c = self
                .presence
                .contacts
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if c.get(handle).map(|c| c.relation) != Some(Relation::Pending) {
                return Err(ActionError::Invalid(format!(
                    "no contact request from {handle}"
                )));
            }
        }
        let req = super::Request::Contact {
            op,
            handle: handle.to_owned(),
        };
        let json = serde_json::to_string(&req).map_err(|e| StoreError::Db(e.to_string()))?;
        self.store.run(move |s| s.request(&json)).await?;
        self.requests.notify_one();
        Ok(())
    }

    /// The home sent the whole list: keep it, and signal what changed.
    pub async fn on_contacts(&self, list: Vec<Contact>) {
        let (changed, list_changed) = {
            let mut c = self
                .presence
                .contacts
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut changed = Vec::new();
            let mut list_changed = list.len() != c.len();
            for n in &list {
                match c.get(&n.handle) {
                    Some(o) => {
                        if o.relation != n.relation {
                            list_changed = true;
                        }
                        if n.relation == Relation::Accepted
                            && (o.state != n.state || o.text != n.text)
                        {
                            changed.push(n.clone());
                        }
                    }
                    None => {
                        list_changed = true;
                        if n.relation == Relation::Accepted {
                            changed.push(n.clone());
                        }
                    }
                }
            }
            *c = list.into_iter().map(|n| (n.handle.clone(), n)).collect();
            (changed, list_changed)
        };
        for n in changed {
            self.emit_presence(&n.handle, n.state, &n.text).await;
        }
        if let (true, Some(i)) = (list_changed, self.iface()) {
            let _ = AgentIface::contacts_changed(i.signal_emitter()).await;
        }
    }

    /// A contact's presence changed.
    pub async fn on_presence(&self, handle: &str, state: PresenceState, text: &str, since: i64) {
        {
            let mut c = self
                .presence
                .contacts
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let Some(e) = c.get_mut(handle) else {
                return;
            };
            if e.state == state && e.text == text {
                return;
            }
            e.state = state;
            e.text = text.to_owned();
            e.since = since;
        }
        self.emit_presence(handle, state, text).await;
    }

    async fn emit_presence(&self, handle: &str, state: PresenceState, text: &str) {
        tracing::debug!(%handle, state = state.as_str(), "contact presence");
        self.plugins.dispatch(&PluginEvent::PresenceChanged {
            handle: handle.to_owned(),
            state: state.as_str().into(),
            text: text.to_owned(),
        });
        if let Some(i) = self.iface() {
            let em = i.signal_emitter();
            let _ = AgentIface::contact_presence_changed(em, handle, state.as_str(), text).await;
        }
    }
}

/// Longest wait between idle checks while active; also how long an idle
/// source that failed is left alone before it is tried again.
const ACTIVE_RECHECK: Duration = Duration::from_secs(60);
/// How often input is looked for while away. Sources tell idle time only
/// when asked, so coming back is noticed within this.
const AWAY_POLL: Duration = Duration::from_secs(2);

/// Sets away after `away_after` of desktop idle time and back to online on
/// input, until the agent stops. Asks the idle source only when the answer
/// can matter: once when `away_after` could next be reached, and every
/// [`AWAY_POLL`] while away.
pub async fn auto_away(agent: Arc<Agent>, bus: zbus::Connection) {
    let Some(away_after) = agent.cfg.away_after else {
        return;
    };
    let Some(mut probe) = IdleProbe::open(&bus, agent.cfg.idle_source).await else {
        tracing::info!(
            "automatic away is off: no idle source answers (X11 screen saver extension, org.freedesktop.ScreenSaver, Mutter or logind)"
        );
        return;
    };
    tracing::info!(source = probe.source().name(), after = %humantime::format_duration(away_after), "automatic away on");
    loop {
        let wait = match probe.idle().await {
            Ok(idle) => {
                let is_idle = idle >= away_after;
                agent.change_own(|o| o.idle = is_idle).await;
                if is_idle {
                    AWAY_POLL
                } else {
                    (away_after - idle).clamp(Duration::from_millis(200), ACTIVE_RECHECK)
                }
            }
            Err(e) => {
                tracing::warn!(source = probe.source().name(), "idle time: {e}");
                ACTIVE_RECHECK
            }
        };
        if crate::task::sleep_or_shutdown(wait, &agent.shutdown).await {
            return;
        }
    }
}
