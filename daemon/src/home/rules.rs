//! The home's rules: what a message, an ack, a read mark, a receipt or a
//! contact change does to the home's records, and what it causes. Plain
//! code over the persistence traits of `storage::home`, run inside one
//! store job (one savepoint), so every rule takes effect whole or not at
//! all. What a rule causes is gathered in [`Effects`], which the home acts
//! on once the job has committed.
//!
//! The tests at the end run every rule against a store in memory, and the
//! same tests against SQLite.

use popupd_protocol::{
    ContactOp, Delivery, Event, MAILBOX_FULL, Message, MsgId, NOT_ACCEPTED, Relation,
};
use serde::{Deserialize, Serialize};

use crate::storage::home::{HomeStore, MailboxCap, SentRow};
use popupd_store::StoreError;

/// An item of the forward queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutItem {
    /// A message from one of our users.
    Deliver(Message),
    /// News about message `id` for `to`, who lives elsewhere.
    Receipt {
        id: MsgId,
        to: String,
        state: Delivery,
        reason: Option<String>,
    },
    /// A contact-list change from our user `from` for `to`, who lives
    /// elsewhere.
    Contact {
        from: String,
        to: String,
        op: ContactOp,
    },
}

impl OutItem {
    /// The handle whose home this item goes to.
    pub fn dest_handle(&self) -> &str {
        match self {
            OutItem::Deliver(m) => &m.to,
            OutItem::Receipt { to, .. } | OutItem::Contact { to, .. } => to,
        }
    }
}

/// A new mailbox event to push to a user's connected devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub handle: String,
    pub seq: u64,
    /// The event as JSON (the `event` field of a `HomeFrame::Event`).
    pub event: String,
}

/// What a rule caused, for the home to act on after the commit.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Effects {
    /// Events to push down back connections.
    pub pushes: Vec<Push>,
    /// New forward-queue items: (n, known destination home).
    pub queued: Vec<(u64, Option<String>)>,
    /// Local users whose contact list changed.
    pub contacts: Vec<String>,
    /// Handles whose cached route is wrong (their home says they left).
    pub forget: Vec<String>,
    /// Sent messages that became delivered or failed (for the metrics).
    pub tally: crate::metrics::Tally,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.pushes.is_empty()
            && self.queued.is_empty()
            && self.contacts.is_empty()
            && self.forget.is_empty()
            && self.tally.is_empty()
    }
}

/// Result of a `Send`.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// Stored now.
    Accepted,
    /// Already stored by an earlier try.
    Duplicate,
}

fn json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Db(e.to_string()))
}

/// Appends an event to `handle`'s mailbox, to be pushed at commit.
fn push_event<S: HomeStore + ?Sized>(
    s: &mut S,
    handle: &str,
    msg_id: Option<&str>,
    ev: &Event,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let event = json(ev)?;
    let seq = s
        .append(handle, msg_id, &event, None)?
        .ok_or_else(|| StoreError::Db("mailbox refused an uncapped event".into()))?;
    fx.pushes.push(Push {
        handle: handle.to_owned(),
        seq,
        event,
    });
    Ok(())
}

/// Queues an item for another home. Items for one person leave in the
/// order they were queued: a new one with a known route first routes the
/// earlier ones still waiting for the router; one without waits for the
/// router too, which routes them in order.
fn enqueue<S: HomeStore + ?Sized>(
    s: &mut S,
    dest: Option<&str>,
    item: &OutItem,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let handle = item.dest_handle();
    if let Some(d) = dest {
        // Earlier items for this person still wait for the router, and
        // the route is known now: they take it first, in queue order, as
        // the router would, and this one follows them. (Queued behind
        // them unrouted instead, a flood to one person kept going through
        // the router for as long as it lagged.)
        for n in s.unrouted_for(handle)? {
            route(s, n, d)?;
            fx.queued.push((n, Some(d.to_owned())));
        }
    }
    let n = s.enqueue(dest, handle, &json(item)?)?;
    fx.queued.push((n, dest.map(str::to_owned)));
    Ok(())
}

/// Reads queue items, skipping (and logging) any that do not parse.
fn parse_items(rows: Vec<(u64, String)>) -> Vec<(u64, OutItem)> {
    rows.into_iter()
        .filter_map(|(n, j)| match serde_json::from_str(&j) {
            Ok(item) => Some((n, item)),
            Err(e) => {
                tracing::error!(n, "unreadable forward-queue item skipped: {e}");
                None
            }
        })
        .collect()
}

/// Forward-queue items for `dest` (None: not yet routed), oldest first.
pub fn queued<S: HomeStore + ?Sized>(
    s: &mut S,
    dest: Option<&str>,
) -> Result<Vec<(u64, OutItem)>, StoreError> {
    Ok(parse_items(s.queued(dest)?))
}

/// Those of items `ns` that go to `dest`.
pub fn queued_items<S: HomeStore + ?Sized>(
    s: &mut S,
    dest: &str,
    ns: &[u64],
) -> Result<Vec<(u64, OutItem)>, StoreError> {
    Ok(parse_items(s.queued_items(dest, ns)?))
}

/// Item `n` goes to home `dest`; a message remembers it, so that only
/// that home's receipts count.
pub fn route<S: HomeStore + ?Sized>(s: &mut S, n: u64, dest: &str) -> Result<(), StoreError> {
    if let Some(Ok(OutItem::Deliver(m))) = s.route(n, dest)?.map(|j| serde_json::from_str(&j)) {
        s.set_sent_home(&m.id, dest)?;
    }
    Ok(())
}

/// Fails the items queued before `before` (ms since the epoch) that no
/// home took, at most `limit` at a time; `why(dest)` says why. Returns how
/// many.
pub fn expire<S: HomeStore + ?Sized>(
    s: &mut S,
    before: i64,
    limit: usize,
    why: impl Fn(Option<&str>) -> String,
    fx: &mut Effects,
) -> Result<usize, StoreError> {
    let old = s.queued_before(before, limit)?;
    for (n, dest) in &old {
        fail_item(s, *n, &why(dest.as_deref()), fx)?;
    }
    Ok(old.len())
}

/// Fails every item queued for home `dest`, with `reason` (it was
/// revoked). Returns how many.
pub fn fail_home<S: HomeStore + ?Sized>(
    s: &mut S,
    dest: &str,
    reason: &str,
    fx: &mut Effects,
) -> Result<usize, StoreError> {
    let items = s.queued(Some(dest))?;
    for (n, _) in &items {
        fail_item(s, *n, reason, fx)?;
    }
    Ok(items.len())
}

/// Drops item `n` for good; a message becomes `failed` for its sender,
/// with `reason`. Returns the item, if it was there.
pub fn fail_item<S: HomeStore + ?Sized>(
    s: &mut S,
    n: u64,
    reason: &str,
    fx: &mut Effects,
) -> Result<Option<OutItem>, StoreError> {
    let item: Option<OutItem> = s.dequeue(n)?.and_then(|j| serde_json::from_str(&j).ok());
    if let Some(OutItem::Deliver(m)) = &item {
        apply_receipt(s, &m.id, &m.from, None, Delivery::Failed, Some(reason), fx)?;
    }
    Ok(item)
}

/// A message from a local sender: into the recipient's mailbox if they are
/// ours, else into the forward queue (routed to `dest` if the caller knows
/// the recipient's home). The same id again from its sender is a
/// duplicate; from anyone else, a conflict.
pub fn accept_send<S: HomeStore + ?Sized>(
    s: &mut S,
    msg: &Message,
    dest: Option<&str>,
    cap: MailboxCap,
    fx: &mut Effects,
) -> Result<SendOutcome, StoreError> {
    let (prior, to_here) = s.send_check(&msg.id, &msg.from, &msg.to)?;
    match prior {
        Some(prior) if prior.sender == msg.from => return Ok(SendOutcome::Duplicate),
        Some(_) => {
            return Err(StoreError::Conflict(format!(
                "message id {} is already used; choose a fresh UUIDv7",
                msg.id
            )));
        }
        None => {}
    }
    s.record_sent(&msg.id, &msg.from, &msg.to, dest)?;
    if let Some(relation) = to_here {
        if relation == Some(Relation::Blocked) {
            // Told apart from a missing user by nobody.
            apply_receipt(
                s,
                &msg.id,
                &msg.from,
                None,
                Delivery::Failed,
                Some(NOT_ACCEPTED),
                fx,
            )?;
        } else if !store_incoming(s, None, msg, true, cap, fx)? {
            apply_receipt(
                s,
                &msg.id,
                &msg.from,
                None,
                Delivery::Failed,
                Some(MAILBOX_FULL),
                fx,
            )?;
        }
    } else {
        enqueue(s, dest, &OutItem::Deliver(msg.clone()), fx)?;
    }
    Ok(SendOutcome::Accepted)
}

/// A message from another home (`from_home`) for a local user. `NotFound`
/// if there is no such user, `NotAccepted` if they blocked the sender,
/// `Quota` if their mailbox is full.
pub fn accept_remote<S: HomeStore + ?Sized>(
    s: &mut S,
    from_home: &str,
    msg: &Message,
    cap: MailboxCap,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    if !s.user_exists(&msg.to)? {
        return Err(StoreError::NotFound(format!(
            "no user {} on this home",
            msg.to
        )));
    }
    if blocked(s, &msg.to, &msg.from)? {
        return Err(StoreError::NotAccepted);
    }
    if store_incoming(s, Some(from_home), msg, false, cap, fx)? {
        Ok(())
    } else {
        Err(StoreError::Quota(MAILBOX_FULL.into()))
    }
}

fn blocked<S: HomeStore + ?Sized>(s: &mut S, owner: &str, peer: &str) -> Result<bool, StoreError> {
    Ok(s.contact(owner, peer)?.map(|c| c.0) == Some(Relation::Blocked))
}

/// Into the recipient's mailbox, once per id (`new`: the id is new for
/// certain); false if it is full.
fn store_incoming<S: HomeStore + ?Sized>(
    s: &mut S,
    from_home: Option<&str>,
    msg: &Message,
    new: bool,
    cap: MailboxCap,
    fx: &mut Effects,
) -> Result<bool, StoreError> {
    if new {
        s.record_received_new(&msg.id, &msg.from, &msg.to)?;
    } else if !s.record_received(&msg.id, &msg.from, &msg.to, from_home)? {
        return Ok(true);
    }
    let event = json(&Event::Message(msg.clone()))?;
    match s.append(&msg.to, Some(&msg.id), &event, Some(cap))? {
        Some(seq) => {
            fx.pushes.push(Push {
                handle: msg.to.clone(),
                seq,
                event,
            });
            Ok(true)
        }
        None => {
            // Not kept: the same message again later is new then.
            s.forget_received(&msg.id)?;
            Ok(false)
        }
    }
}

/// A device stored every event up to `seq`. The first device to store a
/// message makes it `delivered` for its sender; events every device has
/// stored are forgotten.
pub fn ack<S: HomeStore + ?Sized>(
    s: &mut S,
    handle: &str,
    device: &str,
    seq: u64,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let Some((old, last)) = s.ack_start(handle, device)? else {
        return Ok(());
    };
    // Never past the last event given, never backwards.
    let new = seq.min(last);
    if new <= old {
        return Ok(());
    }
    s.set_device_acked(handle, device, new)?;
    for m in s.acked_messages(handle, old, new)? {
        let r = &m.received;
        if r.delivered {
            continue;
        }
        s.set_delivered(&m.id)?;
        match r.from_home.as_deref() {
            None => receipt_known(
                s,
                &m.id,
                &r.sender,
                m.sent,
                m.sender_here,
                Delivery::Delivered,
                None,
                fx,
            )?,
            Some(_) => receipt(
                s,
                &m.id,
                &r.sender,
                r.from_home.as_deref(),
                Delivery::Delivered,
                fx,
            )?,
        }
    }
    s.forget_stored(handle)
}

/// `handle` read message `id` (one they received): its sender is told,
/// once.
pub fn mark_read<S: HomeStore + ?Sized>(
    s: &mut S,
    handle: &str,
    id: &str,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let Some(r) = s.received(id)? else {
        return Ok(());
    };
    if r.recipient != handle || r.read {
        return Ok(());
    }
    s.set_read(id)?;
    receipt(s, id, &r.sender, r.from_home.as_deref(), Delivery::Read, fx)
}

/// Tells `sender` (ours, or on `from_home`) about message `id`.
fn receipt<S: HomeStore + ?Sized>(
    s: &mut S,
    id: &str,
    sender: &str,
    from_home: Option<&str>,
    state: Delivery,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    match from_home {
        None => apply_receipt(s, id, sender, None, state, None, fx),
        Some(home) => enqueue(
            s,
            Some(home),
            &OutItem::Receipt {
                id: id.to_owned(),
                to: sender.to_owned(),
                state,
                reason: None,
            },
            fx,
        ),
    }
}

/// News about a message a local user sent. From a peer (`from_home`), it
/// counts only if the message was forwarded to that home. A state only
/// moves forward, and `failed` is final.
pub fn apply_receipt<S: HomeStore + ?Sized>(
    s: &mut S,
    id: &str,
    sender: &str,
    from_home: Option<&str>,
    state: Delivery,
    reason: Option<&str>,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let Some(row) = s.sent(id)?.filter(|r| r.sender == sender) else {
        return Ok(());
    };
    if from_home.is_some() && from_home != row.dest_home.as_deref() {
        tracing::warn!(msg_id = id, from = ?from_home, "receipt refused: the message did not go to that home");
        return Ok(());
    }
    if state <= row.state || row.state == Delivery::Failed {
        return Ok(());
    }
    let here = s.user_exists(sender)?;
    set_status(s, id, sender, here, state, reason, fx)
}

/// [`apply_receipt`] for one of our users' messages, with its sent record
/// and whether the sender is a user here already read.
#[allow(clippy::too_many_arguments)]
fn receipt_known<S: HomeStore + ?Sized>(
    s: &mut S,
    id: &str,
    sender: &str,
    row: Option<SentRow>,
    sender_here: bool,
    state: Delivery,
    reason: Option<&str>,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let Some(row) = row.filter(|r| r.sender == sender) else {
        return Ok(());
    };
    if state <= row.state || row.state == Delivery::Failed {
        return Ok(());
    }
    set_status(s, id, sender, sender_here, state, reason, fx)
}

/// Message `id` of `sender` is now in `state`: recorded, counted, and told
/// to the sender if they are a user here.
fn set_status<S: HomeStore + ?Sized>(
    s: &mut S,
    id: &str,
    sender: &str,
    sender_here: bool,
    state: Delivery,
    reason: Option<&str>,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    s.set_sent_state(id, state)?;
    fx.tally.status(state, reason);
    if sender_here {
        let ev = Event::Status {
            id: id.to_owned(),
            state,
            reason: reason.map(str::to_owned),
        };
        push_event(s, sender, None, &ev, fx)?;
    }
    Ok(())
}

/// Sets (or with `None` deletes) `owner`'s relation with `peer`; their
/// list is sent afresh after the commit.
fn set_relation<S: HomeStore + ?Sized>(
    s: &mut S,
    owner: &str,
    peer: &str,
    rel: Option<Relation>,
    peer_home: Option<&str>,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    match rel {
        None => s.delete_contact(owner, peer)?,
        Some(r) => s.set_contact(owner, peer, r, peer_home)?,
    }
    if !fx.contacts.iter().any(|c| c == owner) {
        fx.contacts.push(owner.to_owned());
    }
    Ok(())
}

/// A local user changes their contact list. `dest` is the peer's home if
/// the caller knows it. `Conflict` or `NotFound` explain a refusal.
pub fn contact_op<S: HomeStore + ?Sized>(
    s: &mut S,
    owner: &str,
    peer: &str,
    op: ContactOp,
    dest: Option<&str>,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    if owner == peer {
        return Err(StoreError::Conflict("that is you".into()));
    }
    let row = s.contact(owner, peer)?;
    let cur = row.as_ref().map(|r| r.0);
    let home = row.and_then(|r| r.1);
    let dest = home.as_deref().or(dest);
    match op {
        ContactOp::Add => match cur {
            Some(Relation::Accepted | Relation::Requested) => {}
            Some(Relation::Pending) => {
                return contact_op(s, owner, peer, ContactOp::Accept, dest, fx);
            }
            None | Some(Relation::Blocked) => {
                set_relation(s, owner, peer, Some(Relation::Requested), None, fx)?;
                tell_peer(s, owner, peer, ContactOp::Add, dest, fx)?;
            }
        },
        ContactOp::Accept | ContactOp::Decline => {
            if cur != Some(Relation::Pending) {
                return Err(StoreError::NotFound(format!(
                    "no contact request from {peer}"
                )));
            }
            let rel = (op == ContactOp::Accept).then_some(Relation::Accepted);
            set_relation(s, owner, peer, rel, None, fx)?;
            tell_peer(s, owner, peer, op, dest, fx)?;
        }
        ContactOp::Remove => {
            if cur.is_none() {
                return Err(StoreError::NotFound(format!(
                    "{peer} is not in your contacts"
                )));
            }
            set_relation(s, owner, peer, None, None, fx)?;
            if cur != Some(Relation::Blocked) {
                tell_peer(s, owner, peer, ContactOp::Remove, dest, fx)?;
            }
        }
        ContactOp::Block => {
            set_relation(s, owner, peer, Some(Relation::Blocked), None, fx)?;
            if cur.is_some() && cur != Some(Relation::Blocked) {
                // Seen from the other side, a block is a removal.
                tell_peer(s, owner, peer, ContactOp::Remove, dest, fx)?;
            }
        }
        ContactOp::Unblock => {
            if cur != Some(Relation::Blocked) {
                return Err(StoreError::NotFound(format!("{peer} is not blocked")));
            }
            set_relation(s, owner, peer, None, None, fx)?;
        }
    }
    Ok(())
}

/// Tells `peer` about `owner`'s change: directly when `peer` is ours,
/// else through the forward queue.
fn tell_peer<S: HomeStore + ?Sized>(
    s: &mut S,
    owner: &str,
    peer: &str,
    op: ContactOp,
    dest: Option<&str>,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    if s.user_exists(peer)? {
        // Both are ours: `owner`'s change reaches `peer` in the same
        // transaction, and an answer `peer` owes lands on `owner`'s side.
        if let Some(answer) = apply_incoming(s, owner, None, peer, op, fx)? {
            apply_incoming(s, peer, None, owner, answer, fx)?;
        }
        Ok(())
    } else {
        let item = OutItem::Contact {
            from: owner.to_owned(),
            to: peer.to_owned(),
            op,
        };
        enqueue(s, dest, &item, fx)
    }
}

/// A user `from` of home `from_home` changes their relation with our user
/// `to`. Silently ignored when `to` does not exist or blocked `from`, so
/// the sender learns neither. Across homes only add, accept, decline and
/// remove travel.
pub fn contact_from_peer<S: HomeStore + ?Sized>(
    s: &mut S,
    from_home: &str,
    from: &str,
    to: &str,
    op: ContactOp,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    if !matches!(
        op,
        ContactOp::Add | ContactOp::Accept | ContactOp::Decline | ContactOp::Remove
    ) || !s.user_exists(to)?
    {
        return Ok(());
    }
    if let Some(answer) = apply_incoming(s, from, Some(from_home), to, op, fx)? {
        let item = OutItem::Contact {
            from: to.to_owned(),
            to: from.to_owned(),
            op: answer,
        };
        enqueue(s, Some(from_home), &item, fx)?;
    }
    Ok(())
}

/// `from` (anywhere) did `op` towards our user `to`: update `to`'s side.
/// Returns the answer `to`'s side owes `from`, if any.
fn apply_incoming<S: HomeStore + ?Sized>(
    s: &mut S,
    from: &str,
    from_home: Option<&str>,
    to: &str,
    op: ContactOp,
    fx: &mut Effects,
) -> Result<Option<ContactOp>, StoreError> {
    let cur = s.contact(to, from)?.map(|c| c.0);
    if cur == Some(Relation::Blocked) {
        return Ok(None);
    }
    match (op, cur) {
        // Asked again by someone already accepted (their side was lost or
        // reset), or both asked each other: that is agreement.
        (ContactOp::Add, Some(Relation::Accepted | Relation::Requested)) => {
            set_relation(s, to, from, Some(Relation::Accepted), from_home, fx)?;
            Ok(Some(ContactOp::Accept))
        }
        (ContactOp::Add, Some(Relation::Pending)) => Ok(None),
        (ContactOp::Add, _) => {
            set_relation(s, to, from, Some(Relation::Pending), from_home, fx)?;
            let ev = Event::ContactRequest {
                from: from.to_owned(),
            };
            push_event(s, to, None, &ev, fx)?;
            Ok(None)
        }
        (ContactOp::Accept, Some(Relation::Requested | Relation::Accepted)) => {
            set_relation(s, to, from, Some(Relation::Accepted), from_home, fx)?;
            Ok(None)
        }
        (ContactOp::Decline, Some(Relation::Requested)) | (ContactOp::Remove, Some(_)) => {
            set_relation(s, to, from, None, None, fx)?;
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// Makes `owner` and `peer` accepted contacts on this home's side at once
/// (bulk setup for administrators and benchmarks); `peer_home` is the
/// peer's home if not this one.
pub fn link_contacts<S: HomeStore + ?Sized>(
    s: &mut S,
    owner: &str,
    peer: &str,
    peer_home: Option<&str>,
) -> Result<(), StoreError> {
    if !s.user_exists(owner)? {
        return Err(StoreError::NotFound(format!(
            "no user {owner} on this home"
        )));
    }
    let mut fx = Effects::default();
    set_relation(s, owner, peer, Some(Relation::Accepted), peer_home, &mut fx)?;
    if peer_home.is_none() && s.user_exists(peer)? {
        set_relation(s, peer, owner, Some(Relation::Accepted), None, &mut fx)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::storage::home::{
        Accounts, ContactBook, ContactRow, ForwardQueue, Mailbox, ReceivedLog, ReceivedRow,
        SentLog, SentRow, SqliteHome, UserInfo,
    };
    use popupd_store::Batchable;

    /// The home's records in memory: what the rules need, and no more.
    #[derive(Default)]
    struct Memory {
        /// handle -> next event number.
        users: BTreeMap<String, u64>,
        /// (handle, device) -> (secret hash, acked).
        devices: BTreeMap<(String, String), (String, u64)>,
        /// handle -> events (seq, msg id, JSON).
        mailbox: HashMap<String, Vec<(u64, Option<String>, String)>>,
        sent: HashMap<String, (SentRow, String)>,
        received: HashMap<String, ReceivedRow>,
        /// n -> (dest, handle, JSON).
        outq: BTreeMap<u64, (Option<String>, String, String)>,
        next_n: u64,
        contacts: BTreeMap<(String, String), (Relation, Option<String>)>,
    }

    impl Batchable for Memory {
        fn begin(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn commit(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn rollback(&mut self) {}
        fn job_begin(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn job_end(&mut self, _: bool) -> Result<(), StoreError> {
            Ok(())
        }
    }

    impl Accounts for Memory {
        fn user_exists(&mut self, h: &str) -> Result<bool, StoreError> {
            Ok(self.users.contains_key(h))
        }
        fn add_user(&mut self, h: &str) -> Result<(), StoreError> {
            self.users.insert(h.into(), 1);
            Ok(())
        }
        fn remove_user(&mut self, h: &str) -> Result<bool, StoreError> {
            Ok(self.users.remove(h).is_some())
        }
        fn list_users(&mut self) -> Result<Vec<UserInfo>, StoreError> {
            Ok(Vec::new())
        }
        fn all_handles(&mut self) -> Result<Vec<String>, StoreError> {
            Ok(self.users.keys().cloned().collect())
        }
        fn add_device(&mut self, h: &str, d: &str, secret: &str) -> Result<(), StoreError> {
            let next = self.users[h];
            self.devices
                .insert((h.into(), d.into()), (secret.into(), next - 1));
            Ok(())
        }
        fn revoke_device(&mut self, h: &str, d: &str) -> Result<bool, StoreError> {
            Ok(self.devices.remove(&(h.into(), d.into())).is_some())
        }
        fn check_device(&mut self, h: &str, d: &str, s: &str) -> Result<Option<u64>, StoreError> {
            Ok(self
                .devices
                .get(&(h.into(), d.into()))
                .filter(|v| v.0 == s)
                .map(|v| v.1))
        }
        fn all_devices(&mut self) -> Result<Vec<(String, String)>, StoreError> {
            Ok(self.devices.keys().cloned().collect())
        }
        fn device_acked(&mut self, h: &str, d: &str) -> Result<Option<u64>, StoreError> {
            Ok(self.devices.get(&(h.into(), d.into())).map(|v| v.1))
        }
        fn set_device_acked(&mut self, h: &str, d: &str, seq: u64) -> Result<(), StoreError> {
            if let Some(v) = self.devices.get_mut(&(h.into(), d.into())) {
                v.1 = seq;
            }
            Ok(())
        }
    }

    impl Mailbox for Memory {
        fn append(
            &mut self,
            h: &str,
            id: Option<&str>,
            ev: &str,
            cap: Option<MailboxCap>,
        ) -> Result<Option<u64>, StoreError> {
            let list = self.mailbox.entry(h.into()).or_default();
            let bytes: usize = list.iter().map(|e| e.2.len()).sum();
            if let Some(cap) = cap
                && (list.len() as u64 >= cap.events || (bytes + ev.len()) as u64 > cap.bytes)
            {
                return Ok(None);
            }
            let next = self
                .users
                .get_mut(h)
                .ok_or(StoreError::NotFound(h.into()))?;
            let seq = *next;
            *next += 1;
            list.push((seq, id.map(str::to_owned), ev.into()));
            Ok(Some(seq))
        }
        fn last_seq(&mut self, h: &str) -> Result<u64, StoreError> {
            Ok(self.users[h] - 1)
        }
        fn mailbox_after(
            &mut self,
            h: &str,
            after: u64,
            limit: usize,
        ) -> Result<Vec<(u64, String)>, StoreError> {
            Ok(self
                .mailbox
                .get(h)
                .into_iter()
                .flatten()
                .filter(|e| e.0 > after)
                .take(limit)
                .map(|e| (e.0, e.2.clone()))
                .collect())
        }
        fn message_ids(
            &mut self,
            h: &str,
            after: u64,
            upto: u64,
        ) -> Result<Vec<String>, StoreError> {
            Ok(self
                .mailbox
                .get(h)
                .into_iter()
                .flatten()
                .filter(|e| e.0 > after && e.0 <= upto)
                .filter_map(|e| e.1.clone())
                .collect())
        }
        fn forget_stored(&mut self, h: &str) -> Result<(), StoreError> {
            let min = self
                .devices
                .iter()
                .filter(|(k, _)| k.0 == h)
                .map(|(_, v)| v.1)
                .min();
            if let (Some(min), Some(list)) = (min, self.mailbox.get_mut(h)) {
                list.retain(|e| e.0 > min);
            }
            Ok(())
        }
    }

    impl SentLog for Memory {
        fn sent(&mut self, id: &str) -> Result<Option<SentRow>, StoreError> {
            Ok(self.sent.get(id).map(|v| v.0.clone()))
        }
        fn record_sent(
            &mut self,
            id: &str,
            sender: &str,
            recipient: &str,
            dest_home: Option<&str>,
        ) -> Result<(), StoreError> {
            let row = SentRow {
                sender: sender.into(),
                state: Delivery::Accepted,
                dest_home: dest_home.map(str::to_owned),
            };
            self.sent.insert(id.into(), (row, recipient.into()));
            Ok(())
        }
        fn set_sent_state(&mut self, id: &str, state: Delivery) -> Result<(), StoreError> {
            if let Some(v) = self.sent.get_mut(id) {
                v.0.state = state;
            }
            Ok(())
        }
        fn set_sent_home(&mut self, id: &str, dest: &str) -> Result<(), StoreError> {
            if let Some(v) = self.sent.get_mut(id) {
                v.0.dest_home = Some(dest.into());
            }
            Ok(())
        }
    }

    impl ReceivedLog for Memory {
        fn record_received(
            &mut self,
            id: &str,
            sender: &str,
            recipient: &str,
            from_home: Option<&str>,
        ) -> Result<bool, StoreError> {
            if self.received.contains_key(id) {
                return Ok(false);
            }
            let row = ReceivedRow {
                sender: sender.into(),
                recipient: recipient.into(),
                from_home: from_home.map(str::to_owned),
                delivered: false,
                read: false,
            };
            self.received.insert(id.into(), row);
            Ok(true)
        }
        fn received(&mut self, id: &str) -> Result<Option<ReceivedRow>, StoreError> {
            Ok(self.received.get(id).cloned())
        }
        fn forget_received(&mut self, id: &str) -> Result<(), StoreError> {
            self.received.remove(id);
            Ok(())
        }
        fn set_delivered(&mut self, id: &str) -> Result<(), StoreError> {
            if let Some(r) = self.received.get_mut(id) {
                r.delivered = true;
            }
            Ok(())
        }
        fn set_read(&mut self, id: &str) -> Result<(), StoreError> {
            if let Some(r) = self.received.get_mut(id) {
                r.delivered = true;
                r.read = true;
            }
            Ok(())
        }
    }

    impl ForwardQueue for Memory {
        fn enqueue(&mut self, dest: Option<&str>, h: &str, item: &str) -> Result<u64, StoreError> {
            self.next_n += 1;
            self.outq.insert(
                self.next_n,
                (dest.map(str::to_owned), h.into(), item.into()),
            );
            Ok(self.next_n)
        }
        fn unrouted_for(&mut self, h: &str) -> Result<Vec<u64>, StoreError> {
            Ok(self
                .outq
                .iter()
                .filter(|(_, v)| v.0.is_none() && v.1 == h)
                .map(|(n, _)| *n)
                .collect())
        }
        fn queued(&mut self, dest: Option<&str>) -> Result<Vec<(u64, String)>, StoreError> {
            Ok(self
                .outq
                .iter()
                .filter(|(_, v)| v.0.as_deref() == dest)
                .map(|(n, v)| (*n, v.2.clone()))
                .collect())
        }
        fn queued_ns(&mut self, dest: &str) -> Result<Vec<u64>, StoreError> {
            Ok(self
                .outq
                .iter()
                .filter(|(_, v)| v.0.as_deref() == Some(dest))
                .map(|(n, _)| *n)
                .collect())
        }
        fn queued_items(
            &mut self,
            dest: &str,
            ns: &[u64],
        ) -> Result<Vec<(u64, String)>, StoreError> {
            Ok(ns
                .iter()
                .filter_map(|n| {
                    let v = self.outq.get(n)?;
                    (v.0.as_deref() == Some(dest)).then(|| (*n, v.2.clone()))
                })
                .collect())
        }
        fn route(&mut self, n: u64, dest: &str) -> Result<Option<String>, StoreError> {
            Ok(self.outq.get_mut(&n).map(|v| {
                v.0 = Some(dest.into());
                v.2.clone()
            }))
        }
        fn queued_dests(&mut self) -> Result<Vec<String>, StoreError> {
            let mut d: Vec<String> = self.outq.values().filter_map(|v| v.0.clone()).collect();
            d.dedup();
            Ok(d)
        }
        fn waiting_for(&mut self, dest: &str) -> Result<bool, StoreError> {
            Ok(self.outq.values().any(|v| v.0.as_deref() == Some(dest)))
        }
        fn queued_before(
            &mut self,
            _: i64,
            limit: usize,
        ) -> Result<Vec<(u64, Option<String>)>, StoreError> {
            // In memory, everything queued counts as old.
            Ok(self
                .outq
                .iter()
                .take(limit)
                .map(|(n, v)| (*n, v.0.clone()))
                .collect())
        }
        fn dequeue(&mut self, n: u64) -> Result<Option<String>, StoreError> {
            Ok(self.outq.remove(&n).map(|v| v.2))
        }
        fn remove(&mut self, n: u64) -> Result<bool, StoreError> {
            Ok(self.outq.remove(&n).is_some())
        }
    }

    impl ContactBook for Memory {
        fn contact(
            &mut self,
            owner: &str,
            peer: &str,
        ) -> Result<Option<(Relation, Option<String>)>, StoreError> {
            Ok(self.contacts.get(&(owner.into(), peer.into())).cloned())
        }
        fn set_contact(
            &mut self,
            owner: &str,
            peer: &str,
            rel: Relation,
            home: Option<&str>,
        ) -> Result<(), StoreError> {
            let e = self
                .contacts
                .entry((owner.into(), peer.into()))
                .or_insert((rel, None));
            e.0 = rel;
            if let Some(h) = home {
                e.1 = Some(h.into());
            }
            Ok(())
        }
        fn delete_contact(&mut self, owner: &str, peer: &str) -> Result<(), StoreError> {
            self.contacts.remove(&(owner.into(), peer.into()));
            Ok(())
        }
        fn contacts(&mut self, owner: &str) -> Result<Vec<ContactRow>, StoreError> {
            Ok(self
                .contacts
                .iter()
                .filter(|(k, _)| k.0 == owner)
                .map(|(k, v)| ContactRow {
                    peer: k.1.clone(),
                    relation: v.0,
                    peer_home: v.1.clone(),
                })
                .collect())
        }
        fn visible_to_home(
            &mut self,
            home: &str,
            users: &[String],
        ) -> Result<Vec<String>, StoreError> {
            Ok(users
                .iter()
                .filter(|u| {
                    self.contacts.iter().any(|(k, v)| {
                        &k.0 == *u && v.0 == Relation::Accepted && v.1.as_deref() == Some(home)
                    })
                })
                .cloned()
                .collect())
        }
    }

    impl HomeStore for Memory {
        fn prune(&mut self, _: i64) -> Result<usize, StoreError> {
            Ok(0)
        }
    }

    const CAP: MailboxCap = MailboxCap {
        events: 100,
        bytes: 1 << 20,
    };

    fn msg(n: u8, from: &str, to: &str) -> Message {
        Message {
            id: format!("00000000-0000-7000-8000-0000000000{n:02}"),
            from: from.into(),
            to: to.into(),
            text: "hi".into(),
            sent_at: 1,
            reply_to: None,
        }
    }

    fn users(s: &mut dyn HomeStore, names: &[&str]) {
        for u in names {
            s.add_user(u).unwrap();
            s.add_device(u, "d", "h").unwrap();
        }
    }

    /// Each rule test, on every backend: in memory, on SQLite and on
    /// PostgreSQL (where the test process can start one).
    fn on_every_store(name: &str, test: fn(&mut dyn HomeStore)) {
        test(&mut Memory::default());
        if let Some(t) = crate::storage::test_pg(&format!("rules_{name}")) {
            let mut s = crate::storage::home_pg::PgHome::open(&t, "home-test", false).unwrap();
            s.begin().unwrap();
            s.job_begin().unwrap();
            test(&mut s);
            s.job_end(true).unwrap();
            s.commit().unwrap();
        }
        let dir = std::env::temp_dir().join(format!("popupd-rules-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = SqliteHome::open(&dir.join("home.sqlite")).unwrap();
        s.begin().unwrap();
        test(&mut s);
        s.commit().unwrap();
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_local_message_reaches_the_mailbox_then_is_delivered_then_read() {
        on_every_store("flow", |s| {
            users(s, &["alice", "bob"]);
            let mut fx = Effects::default();
            let m = msg(1, "alice", "bob");
            assert_eq!(
                accept_send(s, &m, None, CAP, &mut fx).unwrap(),
                SendOutcome::Accepted
            );
            assert_eq!(
                accept_send(s, &m, None, CAP, &mut fx).unwrap(),
                SendOutcome::Duplicate
            );
            assert!(
                accept_send(s, &msg(1, "bob", "alice"), None, CAP, &mut fx).is_err(),
                "an id is one sender's"
            );
            assert_eq!(fx.pushes.len(), 1);
            assert_eq!(fx.pushes[0].handle, "bob");
            assert_eq!(s.mailbox_after("bob", 0, 10).unwrap().len(), 1);

            let mut fx = Effects::default();
            ack(s, "bob", "d", 1, &mut fx).unwrap();
            assert_eq!(fx.pushes.len(), 1, "alice gets 'delivered'");
            assert_eq!(fx.pushes[0].handle, "alice");
            assert!(fx.pushes[0].event.contains("delivered"));
            assert!(
                s.mailbox_after("bob", 0, 10).unwrap().is_empty(),
                "stored by every device: gone"
            );
            ack(s, "bob", "d", 99, &mut fx).unwrap();
            assert_eq!(
                s.device_acked("bob", "d").unwrap(),
                Some(1),
                "never past the last event"
            );

            let mut fx = Effects::default();
            mark_read(s, "alice", &m.id, &mut fx).unwrap();
            assert!(fx.pushes.is_empty(), "only the recipient reads");
            mark_read(s, "bob", &m.id, &mut fx).unwrap();
            mark_read(s, "bob", &m.id, &mut fx).unwrap();
            assert_eq!(fx.pushes.len(), 1, "read once");
            assert!(fx.pushes[0].event.contains("read"));
        });
    }

    #[test]
    fn a_status_only_moves_forward_and_failed_is_final() {
        on_every_store("forward", |s| {
            users(s, &["alice", "bob"]);
            let mut fx = Effects::default();
            let m = msg(2, "alice", "zed");
            accept_send(s, &m, Some("home-z"), CAP, &mut fx).unwrap();
            let mut fx = Effects::default();
            // Only the home it went to may say.
            apply_receipt(
                s,
                &m.id,
                "alice",
                Some("home-x"),
                Delivery::Read,
                None,
                &mut fx,
            )
            .unwrap();
            assert!(fx.pushes.is_empty());
            apply_receipt(
                s,
                &m.id,
                "alice",
                Some("home-z"),
                Delivery::Read,
                None,
                &mut fx,
            )
            .unwrap();
            apply_receipt(
                s,
                &m.id,
                "alice",
                Some("home-z"),
                Delivery::Delivered,
                None,
                &mut fx,
            )
            .unwrap();
            assert_eq!(fx.pushes.len(), 1, "read, and delivered after it ignored");
            let f = msg(3, "alice", "zed");
            accept_send(s, &f, Some("home-z"), CAP, &mut fx).unwrap();
            let mut fx = Effects::default();
            apply_receipt(
                s,
                &f.id,
                "alice",
                None,
                Delivery::Failed,
                Some("why"),
                &mut fx,
            )
            .unwrap();
            apply_receipt(
                s,
                &f.id,
                "alice",
                Some("home-z"),
                Delivery::Read,
                None,
                &mut fx,
            )
            .unwrap();
            assert_eq!(fx.pushes.len(), 1);
            assert!(fx.pushes[0].event.contains("why"));
        });
    }

    #[test]
    fn a_block_fails_messages_as_if_nobody_were_there() {
        on_every_store("block", |s| {
            users(s, &["alice", "bob"]);
            let mut fx = Effects::default();
            contact_op(s, "bob", "alice", ContactOp::Block, None, &mut fx).unwrap();
            let mut fx = Effects::default();
            accept_send(s, &msg(4, "alice", "bob"), None, CAP, &mut fx).unwrap();
            assert_eq!(fx.pushes.len(), 1);
            assert_eq!(fx.pushes[0].handle, "alice");
            assert!(fx.pushes[0].event.contains(NOT_ACCEPTED));
            assert!(s.mailbox_after("bob", 0, 10).unwrap().is_empty());
            assert_eq!(
                accept_remote(s, "home-z", &msg(5, "alice", "bob"), CAP, &mut fx),
                Err(StoreError::NotAccepted)
            );
            assert!(matches!(
                accept_remote(s, "home-z", &msg(6, "zed", "nobody"), CAP, &mut fx),
                Err(StoreError::NotFound(_))
            ));
        });
    }

    #[test]
    fn a_remote_recipient_is_queued_and_a_refusal_fails_the_message() {
        on_every_store("fwd", |s| {
            users(s, &["alice"]);
            let mut fx = Effects::default();
            let m = msg(7, "alice", "zed");
            accept_send(s, &m, None, CAP, &mut fx).unwrap();
            assert_eq!(fx.queued.len(), 1);
            let q = queued(s, None).unwrap();
            assert_eq!(q.len(), 1);
            route(s, q[0].0, "home-z").unwrap();
            assert_eq!(queued_items(s, "home-z", &[q[0].0]).unwrap().len(), 1);
            assert_eq!(
                s.sent(&m.id).unwrap().unwrap().dest_home.as_deref(),
                Some("home-z")
            );
            let mut fx = Effects::default();
            fail_item(s, q[0].0, "no such user", &mut fx).unwrap();
            assert!(queued(s, Some("home-z")).unwrap().is_empty());
            assert!(fx.pushes[0].event.contains("failed"));
            assert!(fx.pushes[0].event.contains("no such user"));
        });
    }

    #[test]
    fn an_item_no_home_took_in_time_fails_with_the_reason() {
        on_every_store("expire", |s| {
            users(s, &["alice"]);
            let mut fx = Effects::default();
            let m = msg(12, "alice", "zed");
            accept_send(s, &m, Some("home-z"), CAP, &mut fx).unwrap();
            let mut fx = Effects::default();
            let why = |d: Option<&str>| format!("{} took nothing", d.unwrap_or("no home"));
            assert_eq!(expire(s, i64::MAX, 1000, why, &mut fx).unwrap(), 1);
            assert!(queued(s, Some("home-z")).unwrap().is_empty());
            assert_eq!(s.sent(&m.id).unwrap().unwrap().state, Delivery::Failed);
            assert!(
                fx.pushes[0].event.contains("home-z took nothing"),
                "{:?}",
                fx.pushes
            );
            let mut fx = Effects::default();
            assert_eq!(expire(s, i64::MAX, 1000, why, &mut fx).unwrap(), 0);
        });
    }

    #[test]
    fn a_message_with_a_known_route_never_overtakes_an_unrouted_one_for_the_same_person() {
        on_every_store("order", |s| {
            users(s, &["alice"]);
            let mut fx = Effects::default();
            // Two wait for the router; then bob's route is cached.
            accept_send(s, &msg(7, "alice", "bob"), None, CAP, &mut fx).unwrap();
            accept_send(s, &msg(8, "alice", "bob"), None, CAP, &mut fx).unwrap();
            accept_send(s, &msg(10, "alice", "carol"), None, CAP, &mut fx).unwrap();
            assert_eq!(queued(s, None).unwrap().len(), 3);
            accept_send(s, &msg(9, "alice", "bob"), Some("home-b"), CAP, &mut fx).unwrap();
            // bob's earlier two took the route first, then the new one;
            // carol's still waits for the router.
            let ids = |s: &mut dyn HomeStore, dest| -> Vec<String> {
                queued(s, dest)
                    .unwrap()
                    .into_iter()
                    .map(|(_, i)| match i {
                        OutItem::Deliver(m) => m.id,
                        other => panic!("{other:?}"),
                    })
                    .collect()
            };
            let id = |n| msg(n, "alice", "bob").id;
            assert_eq!(ids(s, Some("home-b")), [id(7), id(8), id(9)]);
            assert_eq!(ids(s, None), [id(10)]);
            // And the links are woken in that order.
            let woken: Vec<Option<String>> = fx.queued.iter().map(|q| q.1.clone()).collect();
            let b = Some("home-b".to_string());
            assert_eq!(woken, [None, None, None, b.clone(), b.clone(), b]);
            assert!(fx.queued[3].0 < fx.queued[4].0 && fx.queued[4].0 < fx.queued[5].0);
        });
    }

    #[test]
    fn receipts_for_a_remote_sender_go_back_through_the_queue() {
        on_every_store("remote-receipt", |s| {
            users(s, &["bob"]);
            let mut fx = Effects::default();
            let m = msg(11, "alice", "bob");
            accept_remote(s, "home-a", &m, CAP, &mut fx).unwrap();
            accept_remote(s, "home-a", &m, CAP, &mut fx).unwrap();
            assert_eq!(fx.pushes.len(), 1, "a repeat is dropped by id");
            let mut fx = Effects::default();
            ack(s, "bob", "d", 1, &mut fx).unwrap();
            mark_read(s, "bob", &m.id, &mut fx).unwrap();
            let q = queued(s, Some("home-a")).unwrap();
            let states: Vec<Delivery> = q
                .into_iter()
                .map(|(_, i)| match i {
                    OutItem::Receipt { state, to, .. } => {
                        assert_eq!(to, "alice");
                        state
                    }
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(states, [Delivery::Delivered, Delivery::Read]);
        });
    }

    #[test]
    fn contacts_ask_accept_and_remove_on_one_home_and_across() {
        on_every_store("contacts", |s| {
            users(s, &["alice", "bob"]);
            let mut fx = Effects::default();
            contact_op(s, "alice", "bob", ContactOp::Add, None, &mut fx).unwrap();
            assert_eq!(
                s.contact("alice", "bob").unwrap().unwrap().0,
                Relation::Requested
            );
            assert_eq!(
                s.contact("bob", "alice").unwrap().unwrap().0,
                Relation::Pending
            );
            assert!(
                fx.pushes
                    .iter()
                    .any(|p| p.handle == "bob" && p.event.contains("contact_request"))
            );
            assert!(
                matches!(
                    contact_op(s, "alice", "bob", ContactOp::Accept, None, &mut fx),
                    Err(StoreError::NotFound(_))
                ),
                "only the asked may accept"
            );
            contact_op(s, "bob", "alice", ContactOp::Accept, None, &mut fx).unwrap();
            assert_eq!(
                s.contact("alice", "bob").unwrap().unwrap().0,
                Relation::Accepted
            );
            assert_eq!(
                s.contact("bob", "alice").unwrap().unwrap().0,
                Relation::Accepted
            );
            assert_eq!(fx.contacts, ["alice", "bob"]);

            // Across homes: carol on home C asks alice, who accepts; the
            // answer goes back through the queue.
            let mut fx = Effects::default();
            contact_from_peer(s, "home-c", "carol", "alice", ContactOp::Add, &mut fx).unwrap();
            assert_eq!(
                s.contact("alice", "carol").unwrap(),
                Some((Relation::Pending, Some("home-c".into())))
            );
            contact_op(s, "alice", "carol", ContactOp::Accept, None, &mut fx).unwrap();
            let q = queued(s, Some("home-c")).unwrap();
            assert!(
                matches!(&q[0].1, OutItem::Contact { op: ContactOp::Accept, to, .. } if to == "carol")
            );
            assert_eq!(
                s.visible_to_home("home-c", &["alice".into(), "bob".into()])
                    .unwrap(),
                ["alice"]
            );
            // A block travels as a removal.
            contact_op(s, "alice", "carol", ContactOp::Block, None, &mut fx).unwrap();
            let q = queued(s, Some("home-c")).unwrap();
            assert!(matches!(
                &q[1].1,
                OutItem::Contact {
                    op: ContactOp::Remove,
                    ..
                }
            ));
            // And a request from the blocked is dropped without a word.
            let mut fx = Effects::default();
            contact_from_peer(s, "home-c", "carol", "alice", ContactOp::Add, &mut fx).unwrap();
            assert!(fx.pushes.is_empty() && fx.queued.is_empty());
            assert!(matches!(
                contact_op(s, "bob", "bob", ContactOp::Add, None, &mut fx),
                Err(StoreError::Conflict(_))
            ));
        });
    }
}
