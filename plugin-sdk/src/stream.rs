//! Subject streams: every event with a `subject` belongs to that subject's stream, numbered
//! 1, 2, 3 … in the order the host stored them (the event's `streamversion` extension,
//! [`Event::stream_version`](crate::Event::stream_version)). Streams are shared by all
//! plugins and producers: they are the natural home of an event-sourced aggregate.
//!
//! Reading a stream joins the call's optimistic check: if the stream grows before the
//! call commits, the host discards the call's effects and runs the handler again on the
//! new state. Together with [`Emit::expected_version`](crate::Emit::expected_version) this
//! makes "decide on the current state, then append" safe under concurrency:
//!
//! ```no_run
//! # fn f() -> Result<(), switchyard_sdk::HandlerError> {
//! use switchyard_sdk::{stream, Emit};
//!
//! let history = stream::read_all("show-42")?;
//! let reserved: u64 = history
//!     .events
//!     .iter()
//!     .filter(|e| e.type_ == "seat.reserved")
//!     .count() as u64;
//! if reserved >= 100 {
//!     return Err(switchyard_sdk::HandlerError::reject("sold out"));
//! }
//! Emit::new("seat.reserved")
//!     .subject("show-42")
//!     .expected_version(history.version)
//!     .json(&serde_json::json!({"seat": reserved + 1}))?
//!     .send();
//! # Ok(()) }
//! ```

use crate::__private::host;
use crate::{HandlerError, StreamPage};

/// Most events one read returns; the host may return fewer.
pub const MAX_PAGE: u32 = 1000;

/// Up to `limit` events of `subject`'s stream with a version above `after`, oldest
/// first, and the stream's current version (`0` for a subject with no event). The call's
/// own emitted events with this subject count as part of the stream.
pub fn read(subject: &str, after: u64, limit: u32) -> StreamPage {
    host::read_stream(subject, after, limit)
}

/// The stream's current version, without its events.
pub fn version(subject: &str) -> u64 {
    host::read_stream(subject, u64::MAX, 0).version
}

/// The whole stream, read page by page, at most `max_events` events (a longer stream is
/// a [`HandlerError::Retry`]: the plugin should keep a snapshot instead).
pub fn read_at_most(subject: &str, max_events: usize) -> Result<StreamPage, HandlerError> {
    let too_long = || {
        HandlerError::retry(format!(
            "the stream of `{subject}` holds more than {max_events} events"
        ))
    };
    let mut whole = host::read_stream(subject, 0, MAX_PAGE);
    if whole.events.len() > max_events {
        return Err(too_long());
    }
    while whole.events.len() < usize::try_from(whole.version).unwrap_or(usize::MAX) {
        let after = whole
            .events
            .last()
            .and_then(|e| e.stream_version())
            .unwrap_or(0);
        let page = host::read_stream(subject, after, MAX_PAGE);
        if page.events.is_empty() {
            // Retention deleted the oldest events: the stream starts later.
            break;
        }
        whole.version = page.version;
        whole.events.extend(page.events);
        if whole.events.len() > max_events {
            return Err(too_long());
        }
    }
    Ok(whole)
}

/// The whole stream, up to 100,000 events (see [`read_at_most`]).
pub fn read_all(subject: &str) -> Result<StreamPage, HandlerError> {
    read_at_most(subject, 100_000)
}
