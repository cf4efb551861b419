//! Test fixture: never returns from a message.
use popupd_plugin_api::{Event, Host, Plugin, declare_plugin};
struct Hang;
impl Plugin for Hang {
    fn init(_: Host, _: serde_json::Value) -> Result<Self, String> {
        Ok(Hang)
    }
    fn on_event(&mut self, event: &Event) -> Result<(), String> {
        if matches!(event, Event::MessageReceived { .. }) {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Ok(())
    }
}
declare_plugin!(Hang, "fixture-hang", "0.0.1");
