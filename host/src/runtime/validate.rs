//! Load-time checks that a file is a Switchyard plugin the host may run.
//!
//! A plugin must be a component (not a core module) that exports
//! `switchyard:plugin/handler` at a contract version this host serves, and imports
//! nothing beyond the contract's `host` and `types` interfaces and the WASI interfaces
//! the host grants: I/O streams, clocks, random and the CLI basics (stdio, an empty
//! environment, exit). Filesystem, sockets and HTTP are refused here, before any code runs.

use wasmtime::Engine;
use wasmtime::component::Component;

use super::LoadErrorReason;
use super::bindings::ContractVersion;

/// The contract package this host serves.
pub const CONTRACT_PACKAGE: &str = "switchyard:plugin";
/// The contract versions this host serves, oldest first.
pub const CONTRACT_VERSIONS: &[&str] = &["0.1.0", "0.2.0"];
/// The export every plugin must provide, without its version.
const HANDLER_EXPORT: &str = "switchyard:plugin/handler";
/// The export a plugin may add to take several events in one call (`0.2.0` on).
const BATCH_HANDLER_EXPORT: &str = "switchyard:plugin/batch-handler";

/// WASI interfaces granted to plugins. Clocks and random are harmless; stdio goes to the
/// host's log; the environment and arguments are empty.
const GRANTED_WASI: &[&str] = &[
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
];

/// Interface families refused outright, with the reason given to the operator.
const REFUSED_WASI: &[(&str, &str)] = &[
    ("wasi:filesystem/", "plugins have no filesystem access"),
    ("wasi:sockets/", "plugins have no network access"),
    ("wasi:http/", "plugins have no network access"),
];

/// Checks the raw bytes before compiling: present, WebAssembly, and a component.
pub(crate) fn check_header(bytes: &[u8]) -> Result<(), LoadErrorReason> {
    if bytes.is_empty() {
        return Err(LoadErrorReason::Empty);
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadErrorReason::NotWasm);
    }
    // Bytes 4..8 hold the version and layer: layer 0 is a core module, 1 a component.
    match bytes[6..8] {
        [0, 0] => Err(LoadErrorReason::CoreModule),
        [1, 0] => Ok(()),
        _ => Err(LoadErrorReason::NotWasm),
    }
}

/// Splits `ns:pkg/iface@1.2.3` into the unversioned name and the version.
fn split_version(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((base, version)) => (base, Some(version)),
        None => (name, None),
    }
}

fn is_contract(base: &str) -> bool {
    base.strip_prefix(CONTRACT_PACKAGE)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// What a valid plugin component is built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct World {
    pub(crate) contract: ContractVersion,
    /// Whether it exports the batch handler too.
    pub(crate) batch: bool,
}

/// Checks what the compiled component imports and exports, and returns the contract
/// version it was built against.
pub(crate) fn check_world(
    engine: &Engine,
    component: &Component,
) -> Result<World, LoadErrorReason> {
    let ty = component.component_type();

    let exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_owned())
        .collect();
    let handler = exports.iter().find_map(|name| {
        let (base, version) = split_version(name);
        (base == HANDLER_EXPORT).then_some(version)
    });
    let contract = match handler {
        None => {
            return Err(LoadErrorReason::WrongWorld {
                exports: if exports.is_empty() {
                    "nothing".to_owned()
                } else {
                    exports.join(", ")
                },
            });
        }
        Some(version) => check_contract_version(version)?,
    };

    for (name, _) in ty.imports(engine) {
        let (base, version) = split_version(name);
        if is_contract(base) {
            if check_contract_version(version)? != contract {
                return Err(LoadErrorReason::UnsupportedVersion {
                    found: format!(
                        "{} (imports `{name}` but exports the handler of {})",
                        version.unwrap_or("(unversioned)"),
                        contract.as_str()
                    ),
                });
            }
            continue;
        }
        if let Some((_, why)) = REFUSED_WASI
            .iter()
            .find(|(prefix, _)| base.starts_with(prefix))
        {
            return Err(LoadErrorReason::RefusedImport {
                import: name.to_owned(),
                why,
            });
        }
        let wasi_02 = version.is_some_and(|v| v.starts_with("0.2."));
        if !(GRANTED_WASI.contains(&base) && wasi_02) {
            return Err(LoadErrorReason::UnknownImport(name.to_owned()));
        }
    }
    let batch = exports.iter().any(|name| {
        let (base, version) = split_version(name);
        base == BATCH_HANDLER_EXPORT && version == Some(contract.as_str())
    }) && contract != ContractVersion::V0_1;
    Ok(World { contract, batch })
}

fn check_contract_version(version: Option<&str>) -> Result<ContractVersion, LoadErrorReason> {
    version
        .and_then(ContractVersion::parse)
        .ok_or_else(|| LoadErrorReason::UnsupportedVersion {
            found: version.unwrap_or("(unversioned)").to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert!(matches!(check_header(b""), Err(LoadErrorReason::Empty)));
        assert!(matches!(
            check_header(b"hello world"),
            Err(LoadErrorReason::NotWasm)
        ));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0"),
            Err(LoadErrorReason::CoreModule)
        ));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }

    #[test]
    fn versions() {
        assert_eq!(
            split_version("switchyard:plugin/host@0.1.0"),
            ("switchyard:plugin/host", Some("0.1.0"))
        );
        assert!(is_contract("switchyard:plugin/host"));
        assert!(!is_contract("switchyard:pluginx/host"));
        assert_eq!(
            check_contract_version(Some("0.1.0")).ok(),
            Some(ContractVersion::V0_1)
        );
        assert_eq!(
            check_contract_version(Some("0.2.0")).ok(),
            Some(ContractVersion::V0_2)
        );
        assert!(check_contract_version(Some("0.3.0")).is_err());
        for version in CONTRACT_VERSIONS {
            assert!(check_contract_version(Some(version)).is_ok());
        }
        assert!(check_contract_version(None).is_err());
    }
}
