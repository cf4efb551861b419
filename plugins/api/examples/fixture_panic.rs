//! Test fixture: panics on every message.
use popupd_plugin_api::{Event, Host, Plugin, declare_plugin};
struct Panicky;
impl Plugin for Panicky {
    fn init(_: Host, _: serde_json::Value) -> Result<Self, String> {
        Ok(Panicky)
    }
    fn on_event(&mut self, event: &Event) -> Result<(), String> {
        if matches!(event, Event::MessageReceived { .. }) {
            panic!("fixture panics on purpose");
        }
        Ok(())
    }
}
declare_plugin!(Panicky, "fixture-panic", "0.0.1");
