//! Fuzzes the host config (`switchyard.toml`): `Config::parse` on any UTF-8 text, then
//! `Config::validate`.
//!
//! An input is the config file's text. Besides never panicking, every config `parse`
//! accepts must pass `validate` again, and one that listens beyond loopback must carry
//! both token lists, as `switchyard_host::config` promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_host::config::Config;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(config) = Config::parse(text) else {
        return;
    };
    if let Err(e) = config.validate() {
        panic!("Config::parse accepted a config that does not validate: {e}");
    }
    if config.requires_tokens() {
        assert!(!config.auth.ingest_tokens.is_empty() && !config.auth.admin_tokens.is_empty());
    }
    let _ = config.runtime.runtime_config();
    let _ = config.plugin_defaults.isolation();
});
