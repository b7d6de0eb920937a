//! A plugin built against the frozen contract `switchyard:plugin@0.1.0` with `wit-bindgen`
//! directly, as a plugin compiled before `0.2.0` shipped would be. It counts the events of
//! each subject in KV and emits `legacy.counted` for each, so a test sees every `0.1.0`
//! import work through the host's adapters.

#![allow(unsafe_code, missing_docs, unreachable_pub)]

wit_bindgen::generate!({
    path: "../../../wit/0.1.0",
    world: "switchyard:plugin/plugin@0.1.0",
});

use exports::switchyard::plugin::handler::Guest;
use switchyard::plugin::host;
use switchyard::plugin::types::{
    Delivery, Event, HandlerError, LogLevel, OutgoingEvent, PluginInfo,
};

struct Legacy;

impl Guest for Legacy {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "contract-0-1".into(),
            version: "0.1.0".into(),
            subscriptions: vec!["legacy.>".into()],
        }
    }

    fn handle(event: Event, _delivery: Delivery) -> Result<(), HandlerError> {
        let subject = event.subject.clone().unwrap_or_default();
        let key = format!("count/{subject}");
        let count = host::kv_get(&key)
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        host::kv_set(&key, count.to_string().as_bytes());
        host::log(LogLevel::Info, &format!("counted {count} for `{subject}`"));
        if event.type_ != "legacy.counted" {
            host::emit(&OutgoingEvent {
                type_: "legacy.counted".into(),
                subject: event.subject,
                datacontenttype: None,
                data: format!("{{\"count\":{count}}}").into_bytes(),
                extensions: Vec::new(),
            });
        }
        Ok(())
    }
}

export!(Legacy);
