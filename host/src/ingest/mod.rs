//! placeholder
pub mod cloudevents;
pub mod error;
