//! placeholder
pub mod manifest;
