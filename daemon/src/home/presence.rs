//! Presence: who is online, and who is told.
//!
//! The hub is in memory only; it is rebuilt from live connections after a
//! restart. It knows:
//! - each online user's devices and what each reported; the user shows the
//!   state of the most available one ([`PresenceState::rank`]). When the
//!   last device drops, the user keeps showing their state for the grace
//!   period, so a quick reconnect changes nothing for anyone;
//! - for every handle (ours or another home's), which of our online users
//!   watch it: their accepted contacts;
//! - the remote users we watch, with what their home last said, and the
//!   peer links that carry it. One subscription per remote user per home,
//!   however many of our users watch them;
//! - which homes subscribed to each of our users. A subscription belongs to
//!   a home, not a link: if two links to a home are up at once (both homes
//!   dialed), each change still goes down only one of them.
//!
//! **Architecture Invariant:** presence leaves this home only for users who
//! accepted someone on the receiving side: a local watcher must hold the
//! user as an accepted contact (it is in their list), and a peer's
//! subscription is checked against the store before it is recorded
//! ([`crate::storage::home::HomeStore::visible_to_home`]).
//!
//! Fan-out happens under the hub's lock but never blocks: agent queues are
//! bounded with `try_send` (a full one is told to lag and re-reads), peer
//! link queues are unbounded (a peer link that stops reading dies of its
//! idle timeout, taking its queue with it).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::sessions::Registry;
use crate::storage::home::ContactRow;
use popupd_protocol::{
    Contact, HomeFrame, Millis, PeerFrame, PresenceReport, PresenceState, Relation, now_ms,
};

/// What a user shows to the people who may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub state: PresenceState,
    pub text: String,
    pub since: Millis,
}

impl Shown {
    fn offline() -> Shown {
        Shown {
            state: PresenceState::Offline,
            text: String::new(),
            since: 0,
        }
    }

    fn unknown() -> Shown {
        Shown {
            state: PresenceState::Unknown,
            text: String::new(),
            since: now_ms(),
        }
    }

    fn same_as(&self, o: &Shown) -> bool {
        self.state == o.state && self.text == o.text
    }
}

struct Device {
    /// The live connection, or `None` inside the grace period.
    conn: Option<u64>,
    /// The latest connection, live or not: only the grace period of the
    /// latest drop may end the device.
    last: u64,
    report: PresenceReport,
    at: Millis,
}

struct Local {
    devices: HashMap<String, Device>,
    shown: Shown,
}

struct Remote {
    home: String,
    shown: Shown,
}

struct PeerLink {
    home: String,
    tx: mpsc::UnboundedSender<String>,
}

#[derive(Default)]
struct Inner {
    users: HashMap<String, Local>,
    /// Accepted contacts of each online user of ours: (handle, home if remote).
    lists: HashMap<String, Vec<(String, Option<String>)>>,
    /// handle → our online users who watch it.
    watchers: HashMap<String, HashSet<String>>,
    /// Remote users we watch.
    remote: HashMap<String, Remote>,
    links: HashMap<u64, PeerLink>,
    /// Our user → homes subscribed to them.
    subs: HashMap<String, HashSet<String>>,
    next_link: u64,
}

/// Counters, for the status line and benchmarks.
#[derive(Default)]
pub struct Stats {
    /// Changes of what one of our users shows.
    pub changes: AtomicU64,
    /// Presence frames sent to our agents.
    pub to_agents: AtomicU64,
    /// Presence frames sent to other homes.
    pub to_peers: AtomicU64,
}

impl Stats {
    /// (changes, to agents, to peers) now.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.changes.load(Ordering::Relaxed),
            self.to_agents.load(Ordering::Relaxed),
            self.to_peers.load(Ordering::Relaxed),
        )
    }
}

/// The presence hub of one home.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
    pub stats: Stats,
}

fn presence_frame(handle: &str, s: &Shown) -> String {
    let f = HomeFrame::Presence {
        handle: handle.to_owned(),
        state: s.state,
        text: s.text.clone(),
        since: s.since,
    };
    serde_json::to_string(&f).unwrap_or_default()
}

fn peer_presence_frame(handle: &str, s: &Shown) -> String {
    let f = PeerFrame::Presence {
        handle: handle.to_owned(),
        state: s.state,
        text: s.text.clone(),
        since: s.since,
    };
    serde_json::to_string(&f).unwrap_or_default()
}

fn peer_frame(f: &PeerFrame) -> String {
    serde_json::to_string(f).unwrap_or_default()
}

/// The state a user shows given their devices.
fn aggregate(devices: &HashMap<String, Device>) -> (PresenceState, String) {
    devices
        .values()
        .max_by_key(|d| (d.report.state.rank(), d.at))
        .map(|d| match d.report.state {
            // Appearing offline shows no text.
            PresenceState::Offline => (PresenceState::Offline, String::new()),
            s => (s, d.report.text.clone()),
        })
        .unwrap_or((PresenceState::Offline, String::new()))
}

impl Inner {
    fn shown_of(&self, handle: &str, home: Option<&str>) -> Shown {
        match home {
            None => self
                .users
                .get(handle)
                .map(|u| u.shown.clone())
                .unwrap_or_else(Shown::offline),
            Some(_) => self
                .remote
                .get(handle)
                .map(|r| r.shown.clone())
                .unwrap_or_else(Shown::unknown),
        }
    }

    /// Recomputes what `handle` shows; tells everyone who may see it.
    fn recompute(&mut self, reg: &Registry, stats: &Stats, handle: &str) {
        let Some(u) = self.users.get_mut(handle) else {
            return;
        };
        let (state, text) = aggregate(&u.devices);
        if u.shown.state == state && u.shown.text == text {
            return;
        }
        u.shown = Shown {
            state,
            text,
            since: now_ms(),
        };
        let shown = u.shown.clone();
        stats.changes.fetch_add(1, Ordering::Relaxed);
        self.fan_out(reg, stats, handle, &shown);
        if let Some(homes) = self.subs.get(handle) {
            let frame = peer_presence_frame(handle, &shown);
            for h in homes {
                if let Some(l) = self.links_to(h).next() {
                    let _ = l.tx.send(frame.clone());
                    stats.to_peers.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Tells our online watchers of `handle` what it shows now.
    fn fan_out(&self, reg: &Registry, stats: &Stats, handle: &str, shown: &Shown) {
        let Some(ws) = self.watchers.get(handle) else {
            return;
        };
        let frame: std::sync::Arc<str> = presence_frame(handle, shown).into();
        for w in ws {
            reg.send_frame(w, frame.clone());
            stats.to_agents.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Live links to `home`.
    fn links_to<'a>(&'a self, home: &'a str) -> impl Iterator<Item = &'a PeerLink> + 'a {
        self.links.values().filter(move |l| l.home == home)
    }

    /// Starts watching `handle` for `watcher`. Returns the home to link to
    /// when a new remote subscription needs a link that is not up.
    fn add_watch(&mut self, watcher: &str, handle: &str, home: Option<&str>) -> Option<String> {
        self.watchers
            .entry(handle.to_owned())
            .or_default()
            .insert(watcher.to_owned());
        let home = home?;
        match self.remote.entry(handle.to_owned()) {
            Entry::Occupied(_) => None,
            Entry::Vacant(v) => {
                v.insert(Remote {
                    home: home.to_owned(),
                    shown: Shown::unknown(),
                });
                let frame = peer_frame(&PeerFrame::Subscribe {
                    users: vec![handle.to_owned()],
                });
                let mut any = false;
                for l in self.links_to(home) {
                    let _ = l.tx.send(frame.clone());
                    any = true;
                }
                (!any).then(|| home.to_owned())
            }
        }
    }

    fn drop_watch(&mut self, watcher: &str, handle: &str) {
        let Entry::Occupied(mut e) = self.watchers.entry(handle.to_owned()) else {
            return;
        };
        e.get_mut().remove(watcher);
        if !e.get().is_empty() {
            return;
        }
        e.remove();
        if let Some(r) = self.remote.remove(handle) {
            let frame = peer_frame(&PeerFrame::Unsubscribe {
                users: vec![handle.to_owned()],
            });
            for l in self.links_to(&r.home) {
                let _ = l.tx.send(frame.clone());
            }
        }
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A device connected (connection `conn`) reporting `report`.
    pub fn device_up(
        &self,
        reg: &Registry,
        handle: &str,
        device: &str,
        conn: u64,
        report: PresenceReport,
    ) {
        let mut g = self.lock();
        let u = g.users.entry(handle.to_owned()).or_insert_with(|| Local {
            devices: HashMap::new(),
            shown: Shown::offline(),
        });
        u.devices.insert(
            device.to_owned(),
            Device {
                conn: Some(conn),
                last: conn,
                report,
                at: now_ms(),
            },
        );
        g.recompute(reg, &self.stats, handle);
    }

    /// A connected device reports a new presence.
    pub fn device_set(
        &self,
        reg: &Registry,
        handle: &str,
        device: &str,
        conn: u64,
        report: PresenceReport,
    ) {
        let mut g = self.lock();
        let Some(d) = g
            .users
            .get_mut(handle)
            .and_then(|u| u.devices.get_mut(device))
            .filter(|d| d.conn == Some(conn))
        else {
            return;
        };
        d.report = report;
        d.at = now_ms();
        g.recompute(reg, &self.stats, handle);
    }

    /// The devices connected to this node (not another's: their numbers
    /// have the high bit set), with what each reports.
    pub fn local_devices(&self) -> Vec<(String, String, u64, PresenceReport)> {
        let g = self.lock();
        let mut v = Vec::new();
        for (handle, u) in &g.users {
            for (device, d) in &u.devices {
                if let Some(c) = d.conn.filter(|c| c >> 63 == 0) {
                    v.push((handle.clone(), device.clone(), c, d.report.clone()));
                }
            }
        }
        v
    }

    /// Connection `conn` of a device closed. The device still counts until
    /// [`Hub::expire`] (after the grace period) unless it reconnects.
    pub fn device_down(&self, handle: &str, device: &str, conn: u64) {
        let mut g = self.lock();
        if let Some(d) = g
            .users
            .get_mut(handle)
            .and_then(|u| u.devices.get_mut(device))
            .filter(|d| d.conn == Some(conn))
        {
            d.conn = None;
        }
    }

    /// The grace period after connection `conn` of a device dropped is
    /// over: forget the device unless it came back since. When the user has
    /// no device left they go offline and stop watching their contacts.
    pub fn expire(&self, reg: &Registry, handle: &str, device: &str, conn: u64) {
        let mut g = self.lock();
        let Some(u) = g.users.get_mut(handle) else {
            return;
        };
        if u.devices
            .get(device)
            .is_some_and(|d| d.conn.is_none() && d.last == conn)
        {
            u.devices.remove(device);
        }
        let empty = u.devices.is_empty();
        g.recompute(reg, &self.stats, handle);
        if empty {
            g.users.remove(handle);
            for (c, _) in g.lists.remove(handle).unwrap_or_default() {
                g.drop_watch(handle, &c);
            }
        }
    }

    /// Installs `handle`'s contact list (just read from the store): starts
    /// and stops watching as it says, and sends the list, with presence, to
    /// the user's online devices. Returns the homes that need a link for new
    /// subscriptions. Does nothing for a user who is not online.
    ///
    /// The list goes out under the hub's lock, like every presence change:
    /// a change that comes after the list was drawn up then reaches the
    /// agents after the list, not before it (where the list's older state
    /// would overwrite it).
    pub fn watch(&self, reg: &Registry, handle: &str, rows: &[ContactRow]) -> Option<Vec<String>> {
        let mut g = self.lock();
        if !g.users.contains_key(handle) {
            return None;
        }
        let new: Vec<(String, Option<String>)> = rows
            .iter()
            .filter(|r| r.relation == Relation::Accepted)
            .map(|r| (r.peer.clone(), r.peer_home.clone()))
            .collect();
        let old = g
            .lists
            .insert(handle.to_owned(), new.clone())
            .unwrap_or_default();
        let keep: HashSet<&str> = new.iter().map(|(c, _)| c.as_str()).collect();
        for (c, _) in &old {
            if !keep.contains(c.as_str()) {
                g.drop_watch(handle, c);
            }
        }
        let mut homes = Vec::new();
        for (c, home) in &new {
            if let Some(h) = g.add_watch(handle, c, home.as_deref())
                && !homes.contains(&h)
            {
                homes.push(h);
            }
        }
        let list = rows
            .iter()
            .map(|r| {
                let shown = if r.relation == Relation::Accepted {
                    g.shown_of(&r.peer, r.peer_home.as_deref())
                } else {
                    Shown {
                        state: PresenceState::Unknown,
                        text: String::new(),
                        since: 0,
                    }
                };
                Contact {
                    handle: r.peer.clone(),
                    relation: r.relation,
                    state: shown.state,
                    text: shown.text,
                    since: shown.since,
                }
            })
            .collect();
        match serde_json::to_string(&HomeFrame::Contacts { contacts: list }) {
            Ok(f) => reg.send_frame(handle, f.into()),
            Err(e) => tracing::error!(%handle, "encoding the contact list of {handle}: {e}"),
        }
        Some(homes)
    }

    /// What `handle` shows to `asker`, if `asker` may see it (an accepted
    /// contact).
    pub fn presence_of(&self, asker: &str, handle: &str) -> Option<Shown> {
        let g = self.lock();
        let (_, home) = g.lists.get(asker)?.iter().find(|(c, _)| c == handle)?;
        Some(g.shown_of(handle, home.as_deref()))
    }

    /// Does any of our online users watch someone on `home`?
    pub fn wants_home(&self, home: &str) -> bool {
        self.lock().remote.values().any(|r| r.home == home)
    }

    /// A link to `home` is up. Returns its id, its queue, and the first
    /// frame to send (our subscriptions on that home), if any.
    pub fn link_up(&self, home: &str) -> (u64, mpsc::UnboundedReceiver<String>, Option<String>) {
        let mut g = self.lock();
        let id = g.next_link;
        g.next_link += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        g.links.insert(
            id,
            PeerLink {
                home: home.to_owned(),
                tx,
            },
        );
        let users: Vec<String> = g
            .remote
            .iter()
            .filter(|(_, r)| r.home == home)
            .map(|(h, _)| h.clone())
            .collect();
        let first = (!users.is_empty()).then(|| peer_frame(&PeerFrame::Subscribe { users }));
        (id, rx, first)
    }

    /// Link `id` is down. If it was the last to its home, the users we
    /// watch there become unknown until a link is back.
    pub fn link_down(&self, reg: &Registry, id: u64) {
        let mut g = self.lock();
        let Some(l) = g.links.remove(&id) else {
            return;
        };
        if g.links_to(&l.home).next().is_some() {
            return;
        }
        // No link to that home left: its subscriptions end (it subscribes
        // afresh on the next link), and what we watch there is unknown.
        g.subs.retain(|_, homes| {
            homes.remove(&l.home);
            !homes.is_empty()
        });
        let lost: Vec<String> = g
            .remote
            .iter()
            .filter(|(_, r)| r.home == l.home && r.shown.state != PresenceState::Unknown)
            .map(|(h, _)| h.clone())
            .collect();
        for h in lost {
            let shown = Shown::unknown();
            if let Some(r) = g.remote.get_mut(&h) {
                r.shown = shown.clone();
            }
            g.fan_out(reg, &self.stats, &h, &shown);
        }
    }

    /// The home of link `id` subscribed to `users` (already checked against
    /// the store): record it and send, on that link, what they show now.
    pub fn subscribe(&self, id: u64, users: &[String]) {
        let mut g = self.lock();
        let Some(home) = g.links.get(&id).map(|l| l.home.clone()) else {
            return;
        };
        let mut frames = Vec::with_capacity(users.len());
        for u in users {
            let shown = g.shown_of(u, None);
            frames.push(peer_presence_frame(u, &shown));
            g.subs.entry(u.clone()).or_default().insert(home.clone());
        }
        if let Some(l) = g.links.get(&id) {
            for f in frames {
                let _ = l.tx.send(f);
                self.stats.to_peers.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn unsubscribe(&self, id: u64, users: &[String]) {
        let mut g = self.lock();
        let Some(home) = g.links.get(&id).map(|l| l.home.clone()) else {
            return;
        };
        for u in users {
            if let Some(s) = g.subs.get_mut(u) {
                s.remove(&home);
                if s.is_empty() {
                    g.subs.remove(u);
                }
            }
        }
    }

    /// Homes subscribed to our user `handle` (to re-check after their
    /// contact list changed).
    pub fn subscriber_homes(&self, handle: &str) -> Vec<String> {
        let g = self.lock();
        g.subs
            .get(handle)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `home` may no longer see `handle`: drop its subscriptions and tell it
    /// the user is unknown.
    pub fn revoke(&self, handle: &str, home: &str) {
        let mut g = self.lock();
        let Some(s) = g.subs.get_mut(handle) else {
            return;
        };
        if !s.remove(home) {
            return;
        }
        if s.is_empty() {
            g.subs.remove(handle);
        }
        let frame = peer_presence_frame(handle, &Shown::unknown());
        if let Some(l) = g.links_to(home).next() {
            let _ = l.tx.send(frame);
        }
    }

    /// What link `id` (to the user's home) says about remote user `handle`.
    pub fn remote_presence(&self, reg: &Registry, id: u64, handle: &str, shown: Shown) {
        let mut g = self.lock();
        let Some(home) = g.links.get(&id).map(|l| l.home.clone()) else {
            return;
        };
        let Some(r) = g.remote.get_mut(handle) else {
            return;
        };
        // Two links to one home may briefly both carry changes: an older
        // one arriving late must not undo a newer one.
        let stale = r.shown.state != PresenceState::Unknown && shown.since < r.shown.since;
        if r.home != home || r.shown.same_as(&shown) || stale {
            return;
        }
        r.shown = shown.clone();
        g.fan_out(reg, &self.stats, handle, &shown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: PresenceState, text: &str) -> PresenceReport {
        PresenceReport {
            state,
            text: text.into(),
        }
    }

    #[test]
    fn the_most_available_device_wins() {
        let (hub, reg) = (Hub::default(), Registry::default());
        hub.device_up(
            &reg,
            "bob",
            "laptop",
            1,
            report(PresenceState::Away, "gone"),
        );
        hub.device_up(
            &reg,
            "bob",
            "desk",
            2,
            report(PresenceState::Busy, "meeting"),
        );
        let rows = vec![ContactRow {
            peer: "bob".into(),
            relation: Relation::Accepted,
            peer_home: None,
        }];
        hub.device_up(&reg, "alice", "desk", 3, report(PresenceState::Online, ""));
        hub.watch(&reg, "alice", &rows).unwrap();
        let s = hub.presence_of("alice", "bob").unwrap();
        assert_eq!((s.state, s.text.as_str()), (PresenceState::Busy, "meeting"));
        // The busy device drops: it still counts until the grace ends.
        hub.device_down("bob", "desk", 2);
        assert_eq!(
            hub.presence_of("alice", "bob").unwrap().state,
            PresenceState::Busy
        );
        hub.expire(&reg, "bob", "desk", 2);
        assert_eq!(
            hub.presence_of("alice", "bob").unwrap().state,
            PresenceState::Away
        );
        hub.device_down("bob", "laptop", 1);
        hub.expire(&reg, "bob", "laptop", 1);
        assert_eq!(
            hub.presence_of("alice", "bob").unwrap().state,
            PresenceState::Offline
        );
        // Back, gone again, and the first drop's grace ends: still shown,
        // the second drop has its own grace period.
        hub.device_up(&reg, "bob", "laptop", 4, report(PresenceState::Online, ""));
        hub.device_down("bob", "laptop", 4);
        hub.expire(&reg, "bob", "laptop", 1);
        assert_eq!(
            hub.presence_of("alice", "bob").unwrap().state,
            PresenceState::Online
        );
        hub.expire(&reg, "bob", "laptop", 4);
        assert_eq!(
            hub.presence_of("alice", "bob").unwrap().state,
            PresenceState::Offline
        );
        // Strangers see nothing.
        assert!(hub.presence_of("carol", "bob").is_none());
    }

    #[test]
    fn a_remote_contact_is_unknown_while_no_link_and_correct_after() {
        let (hub, reg) = (Hub::default(), Registry::default());
        hub.device_up(&reg, "alice", "desk", 1, report(PresenceState::Online, ""));
        let rows = vec![ContactRow {
            peer: "bob".into(),
            relation: Relation::Accepted,
            peer_home: Some("home-b".into()),
        }];
        let homes = hub.watch(&reg, "alice", &rows).unwrap();
        assert_eq!(homes, ["home-b"], "no link yet: dial one");
        let (id, mut rx, first) = hub.link_up("home-b");
        assert!(first.unwrap().contains("\"subscribe\""));
        let online_long_ago = Shown {
            state: PresenceState::Online,
            text: String::new(),
            since: 1,
        };
        hub.remote_presence(&reg, id, "bob", online_long_ago.clone());
        assert_eq!(
            hub.presence_of("alice", "bob").unwrap().state,
            PresenceState::Online
        );
        hub.link_down(&reg, id);
        assert_eq!(
            hub.presence_of("alice", "bob").unwrap().state,
            PresenceState::Unknown
        );
        // A new link's snapshot is older than the "unknown" it replaces,
        // and still counts.
        let (id, _rx2, _) = hub.link_up("home-b");
        hub.remote_presence(&reg, id, "bob", online_long_ago);
        assert_eq!(
            hub.presence_of("alice", "bob").unwrap().state,
            PresenceState::Online
        );
        // A stale change (older than what is shown) does not undo it.
        hub.remote_presence(
            &reg,
            id,
            "bob",
            Shown {
                state: PresenceState::Away,
                text: String::new(),
                since: 0,
            },
        );
        assert_eq!(
            hub.presence_of("alice", "bob").unwrap().state,
            PresenceState::Online
        );
        drop(rx.try_recv());
    }

    #[test]
    fn one_subscription_per_home_however_many_links() {
        let (hub, reg) = (Hub::default(), Registry::default());
        hub.device_up(&reg, "bob", "desk", 1, report(PresenceState::Online, ""));
        let (l1, mut rx1, _) = hub.link_up("home-a");
        let (l2, mut rx2, _) = hub.link_up("home-a");
        hub.subscribe(l1, &["bob".into()]);
        hub.subscribe(l2, &["bob".into()]);
        while rx1.try_recv().is_ok() {}
        while rx2.try_recv().is_ok() {}
        hub.device_set(&reg, "bob", "desk", 1, report(PresenceState::Away, ""));
        let n = std::iter::from_fn(|| rx1.try_recv().ok()).count()
            + std::iter::from_fn(|| rx2.try_recv().ok()).count();
        assert_eq!(n, 1, "one push per change per home");
        // One link goes: the other still carries the subscription.
        hub.link_down(&reg, l1);
        hub.device_set(&reg, "bob", "desk", 1, report(PresenceState::Online, ""));
        assert_eq!(std::iter::from_fn(|| rx2.try_recv().ok()).count(), 1);
    }
}
