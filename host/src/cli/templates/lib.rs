//! @@NAME@@: a Switchyard plugin in Rust.

use serde::{Deserialize, Serialize};
use switchyard_sdk::{Delivery, Emit, Event, HandlerError, handler, kv};

#[derive(Deserialize)]
struct Request {
    name: String,
}

#[derive(Serialize)]
struct Greeting {
    text: String,
    count: u64,
}

#[handler(subscribe = ["greeting.requested"])]
fn handle(event: Event, _delivery: Delivery) -> Result<(), HandlerError> {
    let request: Request = event.json()?;
    if request.name.is_empty() {
        return Err(HandlerError::reject("a greeting needs a name"));
    }
    let key = format!("greeted/{}", request.name);
    let count = kv::get_json::<u64>(&key)?.unwrap_or(0) + 1;
    kv::set_json(&key, &count)?;
    Emit::new("greeting.sent")
        .subject(request.name.as_str())
        .json(&Greeting {
            text: format!("Hello, {}!", request.name),
            count,
        })?
        .send();
    Ok(())
}
