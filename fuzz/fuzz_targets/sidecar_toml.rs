//! Fuzzes the plugin sidecar (`NAME.toml`): `Manifest::parse` on any UTF-8 text, then
//! `Manifest::resolve` over the default `[plugin_defaults]`.
//!
//! An input is the sidecar's text. Besides never panicking, every policy `resolve`
//! accepts must be valid, as `switchyard_host::plugins::manifest` promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_host::PluginDefaults;
use switchyard_host::plugins::manifest::Manifest;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(manifest) = Manifest::parse(text) else {
        return;
    };
    let Ok(policy) = manifest.resolve(&PluginDefaults::default()) else {
        return;
    };
    assert!(policy.concurrency >= 1);
    assert!(policy.retry.max_attempts >= 1);
    assert!(policy.retry.initial <= policy.retry.max);
    let limits = policy.settings.limits;
    assert!(limits.fuel >= 1 && limits.memory_bytes >= 1 && !limits.timeout.is_zero());
});
