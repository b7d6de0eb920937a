//! Test plugin that tries to open a TCP connection (`127.0.0.1:9`) on every event.
//!
//! It always rejects: with `connected` if the connection opened (a sandbox escape), or with
//! `denied: <error>` if it did not. Because it uses `std::net`, the component imports
//! `wasi:sockets`, which a host that grants no network may refuse to load at all.

use switchyard_sdk::{Delivery, Event, HandlerError, handler};

/// Tries to connect to the discard port on loopback and reports how it went.
#[handler(subscribe = [">"])]
fn handle(_event: Event, _delivery: Delivery) -> Result<(), HandlerError> {
    match std::net::TcpStream::connect("127.0.0.1:9") {
        Ok(_) => Err(HandlerError::reject("connected")),
        Err(e) => Err(HandlerError::reject(format!("denied: {e}"))),
    }
}
