//! Test fixture: refuses its config unless it says `ok: true`, then fails
//! every event with a message.
use popupd_plugin_api::{Event, Host, Plugin, declare_plugin};
struct Fail;
impl Plugin for Fail {
    fn init(_: Host, config: serde_json::Value) -> Result<Self, String> {
        match config.get("ok") {
            Some(serde_json::Value::Bool(true)) => Ok(Fail),
            _ => Err("plugins.fixture-fail.ok: must be true".into()),
        }
    }
    fn on_event(&mut self, _: &Event) -> Result<(), String> {
        Err("fixture fails on purpose".into())
    }
}
declare_plugin!(Fail, "fixture-fail", "0.0.1");
