//! What the fuzz targets share: reading one wire frame the way a link does.

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The text of one WebSocket text message, as `Link::recv` sees it: the
/// WebSocket layer refuses messages over `MAX_FRAME` bytes (`ws_config`)
/// and text that is not UTF-8, so those never reach the JSON parser.
pub fn frame_text(data: &[u8]) -> Option<&str> {
    if data.len() > popupd_protocol::MAX_FRAME {
        return None;
    }
    std::str::from_utf8(data).ok()
}

/// Parses `text` as a `T` exactly as `Link::recv` does
/// (`serde_json::from_str`, and the error's text for `Recv::Bad`). A frame
/// that parses must serialize, and parse back to an equal frame.
pub fn parse_frame<T>(text: &str) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    match serde_json::from_str::<T>(text) {
        Ok(f) => {
            round_trip(&f);
            Some(f)
        }
        Err(e) => {
            // What the link answers with (`Recv::Bad`), in a `bad_frame` error.
            let _ = e.to_string();
            None
        }
    }
}

/// Serializes `v`, parses the JSON back and checks nothing changed.
pub fn round_trip<T>(v: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let json = serde_json::to_string(v).expect("a parsed value serializes");
    match serde_json::from_str::<T>(&json) {
        Ok(back) => assert_eq!(&back, v, "round trip changed the value; JSON: {json}"),
        Err(e) => panic!("a value's own JSON does not parse back: {e}; JSON: {json}"),
    }
}
