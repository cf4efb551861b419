//! Test fixture: kills the whole process on the first message (as a
//! segfault would), to test the crash marker.
use popupd_plugin_api::{Event, Host, Plugin, declare_plugin};
struct Abort;
impl Plugin for Abort {
    fn init(_: Host, _: serde_json::Value) -> Result<Self, String> {
        Ok(Abort)
    }
    fn on_event(&mut self, event: &Event) -> Result<(), String> {
        if matches!(event, Event::MessageReceived { .. }) {
            std::process::abort();
        }
        Ok(())
    }
}
declare_plugin!(Abort, "fixture-abort", "0.0.1");
