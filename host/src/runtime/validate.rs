//! Load-time checks that a file is a Switchyard plugin the host may run.
//!
//! A plugin must be a component (not a core module) that exports
//! `switchyard:plugin/handler` at a contract version this host serves, and imports
//! nothing beyond the contract's `host` and `types` interfaces and WASI 0.2. Every
//! import is listed with what the host gives it ([`Import`]); all imports the host
//! does not provide are named together in one refusal, before any code runs.

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

/// What the host gives each WASI interface a plugin may import, by interface family.
/// Every WASI 0.2 interface a stock toolchain imports is linked; the ones that reach
/// outside the sandbox are answered by the host (see `sandbox`).
const GRANTED_WASI: &[(&str, &str)] = &[
    ("wasi:io/", "linked"),
    ("wasi:clocks/", "linked"),
    ("wasi:random/", "linked, seeded per instance"),
    (
        "wasi:cli/environment",
        "linked, no variables and no arguments",
    ),
    ("wasi:cli/exit", "linked, exiting traps the call"),
    ("wasi:cli/stdin", "linked, empty"),
    ("wasi:cli/stdout", "linked, lines go to the host's log"),
    (
        "wasi:cli/stderr",
        "linked, lines go to the host's log and to trap reports",
    ),
    ("wasi:cli/terminal-", "linked, not a terminal"),
    (
        "wasi:filesystem/",
        "linked, no directories: `/` is empty and every open is refused",
    ),
    (
        "wasi:sockets/",
        "linked, every socket and name lookup is refused",
    ),
    ("wasi:http/types", "linked"),
    (
        "wasi:http/outgoing-handler",
        "linked, every request is refused",
    ),
];

/// What the host gives an import, or `None` if it provides nothing under that name.
fn grant(name: &str) -> Option<&'static str> {
    let (base, version) = split_version(name);
    if is_contract(base) {
        return Some("the contract");
    }
    if !version.is_some_and(|v| v.starts_with("0.2.")) {
        return None;
    }
    GRANTED_WASI
        .iter()
        .find(|(family, _)| base.starts_with(family))
        .map(|(_, grant)| *grant)
}

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct World {
    pub(crate) contract: ContractVersion,
    /// Whether it exports the batch handler too.
    pub(crate) batch: bool,
    /// Every import, with what the host gives it.
    pub(crate) imports: Vec<Import>,
}

/// One import of a plugin and what the host gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// The import's full name, such as `wasi:filesystem/types@0.2.9`.
    pub name: String,
    /// What the host gives it, such as `linked, every request is refused`.
    pub grant: &'static str,
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

    let mut imports = Vec::new();
    let mut missing = Vec::new();
    for (name, _) in ty.imports(engine) {
        let (base, version) = split_version(name);
        if is_contract(base) && check_contract_version(version)? != contract {
            return Err(LoadErrorReason::UnsupportedVersion {
                found: format!(
                    "{} (imports `{name}` but exports the handler of {})",
                    version.unwrap_or("(unversioned)"),
                    contract.as_str()
                ),
            });
        }
        match grant(name) {
            Some(grant) => imports.push(Import {
                name: name.to_owned(),
                grant,
            }),
            None => missing.push(name.to_owned()),
        }
    }
    if !missing.is_empty() {
        return Err(LoadErrorReason::UnknownImports(missing));
    }
    let batch = exports.iter().any(|name| {
        let (base, version) = split_version(name);
        base == BATCH_HANDLER_EXPORT && version == Some(contract.as_str())
    }) && contract != ContractVersion::V0_1;
    Ok(World {
        contract,
        batch,
        imports,
    })
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

    #[test]
    fn grants() {
        assert_eq!(grant("switchyard:plugin/host@0.2.0"), Some("the contract"));
        assert!(grant("wasi:filesystem/types@0.2.9").is_some_and(|g| g.contains("no directories")));
        assert!(grant("wasi:http/outgoing-handler@0.2.10").is_some_and(|g| g.contains("refused")));
        assert!(grant("wasi:sockets/tcp@0.2.0").is_some_and(|g| g.contains("refused")));
        assert!(grant("wasi:cli/terminal-stdout@0.2.3").is_some());
        assert_eq!(grant("wasi:filesystem/types@0.3.0"), None);
        assert_eq!(grant("wasi:keyvalue/store@0.2.0"), None);
        assert_eq!(grant("acme:secrets/vault@1.0.0"), None);
    }
}
