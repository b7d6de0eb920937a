//! Logging through the host: each line is tagged with the plugin's name.

use crate::__private::host;
use crate::LogLevel;

/// Writes `message` to the host's log at `level`.
///
/// The [`trace!`](crate::trace), [`debug!`](crate::debug), [`info!`](crate::info),
/// [`warn!`](crate::warn) and [`error!`](crate::error) macros format and call this.
pub fn log(level: LogLevel, message: &str) {
    host::log(level, message)
}

/// Logs a formatted message at [`LogLevel::Trace`]: `trace!("x = {}", x)`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => {
        $crate::log($crate::LogLevel::Trace, &::std::format!($($arg)+))
    };
}

/// Logs a formatted message at [`LogLevel::Debug`]: `debug!("x = {}", x)`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => {
        $crate::log($crate::LogLevel::Debug, &::std::format!($($arg)+))
    };
}

/// Logs a formatted message at [`LogLevel::Info`]: `info!("order {} paid", id)`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => {
        $crate::log($crate::LogLevel::Info, &::std::format!($($arg)+))
    };
}

/// Logs a formatted message at [`LogLevel::Warn`]: `warn!("retrying {}", id)`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => {
        $crate::log($crate::LogLevel::Warn, &::std::format!($($arg)+))
    };
}

/// Logs a formatted message at [`LogLevel::Error`]: `error!("gave up on {}", id)`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => {
        $crate::log($crate::LogLevel::Error, &::std::format!($($arg)+))
    };
}
