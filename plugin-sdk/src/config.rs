//! The plugin's settings: the `[config]` table of its sidecar file, which the operator
//! controls. Values are strings; [`get_parsed`] converts them.

use std::fmt::Display;
use std::str::FromStr;

use crate::__private::host;
use crate::HandlerError;

/// The setting `key`, if the sidecar sets it.
pub fn get(key: &str) -> Option<String> {
    host::config_get(key)
}

/// The setting `key` parsed with [`FromStr`], if the sidecar sets it.
///
/// A value that does not parse is a [`HandlerError::Reject`] naming the key and the value;
/// after the operator fixes the sidecar, the dead letters can be replayed.
pub fn get_parsed<T>(key: &str) -> Result<Option<T>, HandlerError>
where
    T: FromStr,
    T::Err: Display,
{
    get(key).map(|value| parse(key, &value)).transpose()
}

fn parse<T>(key: &str, value: &str) -> Result<T, HandlerError>
where
    T: FromStr,
    T::Err: Display,
{
    value
        .parse()
        .map_err(|e| HandlerError::Reject(format!("invalid config {key} = {value:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_key_and_value() {
        assert_eq!(parse::<u32>("n", "12"), Ok(12));
        let err = parse::<u32>("n", "twelve").unwrap_err();
        assert_eq!(
            err,
            HandlerError::Reject(
                "invalid config n = \"twelve\": invalid digit found in string".into()
            )
        );
    }
}
