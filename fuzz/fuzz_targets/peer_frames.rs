//! Home to home (`/v1/peer`): every `PeerFrame` a home parses from another
//! home through `Link::recv` (`home/peers.rs`, both directions of a link).
//! A frame that parses must round-trip through its JSON; the checks
//! `serve_link` applies next (`valid_handle`, `valid_id`) must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popupd_fuzz::{frame_text, parse_frame};
use popupd_protocol::{PeerFrame, valid_handle, valid_id};

fuzz_target!(|data: &[u8]| {
    let Some(text) = frame_text(data) else {
        return;
    };
    let Some(f) = parse_frame::<PeerFrame>(text) else {
        return;
    };
    match &f {
        PeerFrame::Deliver { msg, .. } => {
            valid_handle(&msg.from);
            valid_handle(&msg.to);
            valid_id(&msg.id);
            if let Some(r) = &msg.reply_to {
                valid_id(r);
            }
        }
        PeerFrame::Receipt { id, to, .. } => {
            valid_id(id);
            valid_handle(to);
        }
        PeerFrame::Contact { from, to, .. } => {
            valid_handle(from);
            valid_handle(to);
        }
        PeerFrame::Subscribe { users } | PeerFrame::Unsubscribe { users } => {
            users.iter().for_each(|u| {
                valid_handle(u);
            });
        }
        PeerFrame::Presence { handle, .. } => {
            valid_handle(handle);
        }
        PeerFrame::Hello { .. }
        | PeerFrame::Welcome { .. }
        | PeerFrame::Ack { .. }
        | PeerFrame::Error { .. } => {}
    }
});
