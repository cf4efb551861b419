//! Home and global server (`/v1/global`): what the global server parses
//! from a home (`GlobalRequest`, `global/mod.rs`) and what a home parses
//! from the global server (`GlobalReply`, `home/directory.rs`), both
//! through `Link::recv`. Each input is read as both; a frame that parses
//! must round-trip through its JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popupd_fuzz::{frame_text, parse_frame};
use popupd_protocol::{GlobalReply, GlobalRequest, valid_handle};

fuzz_target!(|data: &[u8]| {
    let Some(text) = frame_text(data) else {
        return;
    };
    if let Some(
        GlobalRequest::Register { handle, .. }
        | GlobalRequest::Unregister { handle, .. }
        | GlobalRequest::Lookup { handle, .. },
    ) = parse_frame::<GlobalRequest>(text)
    {
        valid_handle(&handle);
    }
    if let Some(GlobalReply::Invalidate { handle }) = parse_frame::<GlobalReply>(text) {
        valid_handle(&handle);
    }
});
