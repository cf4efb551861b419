//! The smallest useful plugin: logs every message it sees, and answers
//! "hello?" with "hello!". Build: `cargo build -p popupd-plugin-api --example hello`
//! gives `target/debug/examples/libhello.so`; copy it into
//! `~/.local/lib/popupd/plugins/` and restart the agent.

use popupd_plugin_api::{Event, Host, Plugin, declare_plugin};

struct Hello {
    host: Host,
    greeting: String,
}

impl Plugin for Hello {
    fn init(host: Host, config: serde_json::Value) -> Result<Self, String> {
        let greeting = match config.get("greeting") {
            None => "hello!".to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => return Err("plugins.hello.greeting: must be a string".into()),
        };
        Ok(Hello { host, greeting })
    }

    fn on_event(&mut self, event: &Event) -> Result<(), String> {
        if let Event::MessageReceived { id, from, text, .. } = event {
            self.host.info(&format!("{from} says {text:?}"));
            if text == "hello?" {
                self.host.reply(from, id, &self.greeting)?;
            }
        }
        Ok(())
    }
}

declare_plugin!(Hello, "hello", "0.1.0");
