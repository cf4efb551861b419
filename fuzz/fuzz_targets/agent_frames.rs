//! The back connection, both ways: what a home parses from an agent
//! (`AgentFrame`, in `home/sessions.rs` through `Link::recv`) and what an
//! agent parses from its home (`HomeFrame`, in `agent/link.rs`). Each input
//! is one WebSocket text message, read as both. A frame that parses must
//! round-trip through its JSON; the field checks the home applies next
//! (`valid_handle`, `valid_id`) must not panic on what parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popupd_fuzz::{frame_text, parse_frame};
use popupd_protocol::{AgentFrame, Event, HomeFrame, valid_handle, valid_id};

fuzz_target!(|data: &[u8]| {
    let Some(text) = frame_text(data) else {
        return;
    };
    if let Some(f) = parse_frame::<AgentFrame>(text) {
        match &f {
            AgentFrame::Hello { handle, .. }
            | AgentFrame::Contact { handle, .. }
            | AgentFrame::PresenceOf { handle } => {
                valid_handle(handle);
            }
            AgentFrame::Send {
                id, to, reply_to, ..
            } => {
                valid_id(id);
                valid_handle(to);
                if let Some(r) = reply_to {
                    valid_id(r);
                }
            }
            AgentFrame::Read { id, .. } => {
                valid_id(id);
            }
            AgentFrame::Ack { .. } | AgentFrame::SetPresence { .. } => {}
        }
    }
    if let Some(HomeFrame::Event { event, .. }) = parse_frame::<HomeFrame>(text) {
        match &event {
            Event::Message(m) => {
                valid_id(&m.id);
                valid_handle(&m.from);
            }
            Event::Status { id, .. } => {
                valid_id(id);
            }
            Event::ContactRequest { from } => {
                valid_handle(from);
            }
        }
    }
});
