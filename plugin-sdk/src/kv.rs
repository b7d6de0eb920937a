//! The plugin's own key-value store.
//!
//! Every plugin has a private store that survives restarts and upgrades of the plugin.
//! Writes ([`set`], [`delete`], [`set_json`]) are buffered during the call and committed
//! only if the handler returns `Ok(())`; reads see the call's own buffered writes. The host
//! bounds the size of keys and values: going past a bound stops the call.
//!
//! The store is transactional per call: the host commits a call's writes only if what it
//! read ([`get`], [`keys`]) is still unchanged. When another call of the same plugin
//! changed it first, the host runs the handler again on the new state, so a
//! read-modify-write such as a counter never loses an update — and a handler may run
//! more than once for one event, with only the last run's effects committed.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::__private::host;
use crate::HandlerError;

/// The value stored under `key`, if any.
pub fn get(key: &str) -> Option<Vec<u8>> {
    host::kv_get(key)
}

/// Stores `value` under `key`, replacing any earlier value.
pub fn set(key: &str, value: &[u8]) {
    host::kv_set(key, value)
}

/// Removes `key`; removing a missing key is not an error.
pub fn delete(key: &str) {
    host::kv_delete(key)
}

/// The keys that start with `prefix`, in ascending order (`""` lists every key).
pub fn keys(prefix: &str) -> Vec<String> {
    host::kv_keys(prefix)
}

/// The JSON value stored under `key`, decoded into `T`, if the key exists.
///
/// A stored value that does not decode is a [`HandlerError::Reject`]: retrying would not
/// change it.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, HandlerError> {
    get(key).map(|bytes| decode(key, &bytes)).transpose()
}

/// Stores `value` as JSON under `key`.
///
/// A value that cannot be serialised is a [`HandlerError::Reject`].
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), HandlerError> {
    let bytes = serde_json::to_vec(value).map_err(|e| {
        HandlerError::Reject(format!("cannot serialise the value for key {key:?}: {e}"))
    })?;
    set(key, &bytes);
    Ok(())
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, HandlerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| HandlerError::Reject(format!("invalid JSON stored at key {key:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_stored_json_is_a_reject_naming_the_key() {
        let err = decode::<u32>("count", b"x").unwrap_err();
        assert!(!err.is_retry());
        assert!(
            err.message()
                .starts_with("invalid JSON stored at key \"count\": ")
        );
        assert_eq!(decode::<u32>("count", b"3"), Ok(3));
    }
}
