//! Files that are not plugins the host may run are refused at load time with a typed
//! error that names the file and the reason.

use std::path::PathBuf;

use switchyard_host::runtime::{LoadError, LoadErrorReason, PluginSettings, Runtime};

use crate::support::guests::{self, Guest};
use crate::support::runtime;

/// Writes `bytes` to a temporary file and loads it.
async fn load_bytes(runtime: &Runtime, bytes: &[u8]) -> (PathBuf, Result<(), LoadError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("candidate.wasm");
    std::fs::write(&path, bytes).unwrap();
    let result = runtime
        .load_file(&path, PluginSettings::default())
        .await
        .map(|_| ());
    (path, result)
}

async fn refusal(bytes: &[u8]) -> (String, LoadErrorReason) {
    let runtime = runtime();
    let (path, result) = load_bytes(&runtime, bytes).await;
    let error = result.expect_err("the file must be refused");
    let text = error.to_string();
    assert!(
        text.starts_with(&format!("{}: ", path.display())),
        "the error names the file: {text}"
    );
    (text, error.reason)
}

fn component(wat: &str) -> Vec<u8> {
    wat::parse_str(wat).unwrap()
}

#[tokio::test]
async fn an_empty_file() {
    let (text, reason) = refusal(b"").await;
    assert!(matches!(reason, LoadErrorReason::Empty), "{text}");
    assert!(text.ends_with("the file is empty"));
}

#[tokio::test]
async fn random_bytes() {
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (text, reason) = refusal(&bytes).await;
    assert!(matches!(reason, LoadErrorReason::NotWasm), "{text}");
}

#[tokio::test]
async fn a_truncated_component() {
    let bytes = std::fs::read(guests::path(Guest::Noop)).unwrap();
    let (text, reason) = refusal(&bytes[..bytes.len() / 2]).await;
    assert!(matches!(reason, LoadErrorReason::Invalid(_)), "{text}");
}

#[tokio::test]
async fn a_core_module() {
    let (text, reason) =
        refusal(&wat::parse_str("(module (func (export \"handle\")))").unwrap()).await;
    assert!(matches!(reason, LoadErrorReason::CoreModule), "{text}");
    assert!(text.contains("not a component"), "{text}");
}

#[tokio::test]
async fn a_component_of_another_world() {
    let (text, reason) = refusal(&component(
        r#"(component (instance $i) (export "wasi:http/incoming-handler@0.2.0" (instance $i)))"#,
    ))
    .await;
    assert!(
        matches!(reason, LoadErrorReason::WrongWorld { .. }),
        "{text}"
    );
    assert!(
        text.contains("exports wasi:http/incoming-handler@0.2.0"),
        "{text}"
    );
}

#[tokio::test]
async fn a_component_of_another_contract_version() {
    let (text, reason) = refusal(&component(
        r#"(component (instance $i) (export "switchyard:plugin/handler@0.3.0" (instance $i)))"#,
    ))
    .await;
    assert!(
        matches!(&reason, LoadErrorReason::UnsupportedVersion { found } if found == "0.3.0"),
        "{text}"
    );
    assert!(text.contains("this host serves 0.1.0, 0.2.0"), "{text}");
}

#[tokio::test]
async fn a_component_that_imports_sockets_or_unknown_interfaces() {
    for (import, expected) in [
        ("wasi:sockets/tcp@0.2.0", "plugins have no network access"),
        (
            "wasi:http/outgoing-handler@0.2.0",
            "plugins have no network access",
        ),
        (
            "wasi:filesystem/types@0.2.0",
            "plugins have no filesystem access",
        ),
        (
            "acme:secrets/vault@1.0.0",
            "which the host does not provide",
        ),
    ] {
        let (text, _) = refusal(&component(&format!(
            r#"(component
                (import "{import}" (instance))
                (instance $i)
                (export "switchyard:plugin/handler@0.1.0" (instance $i)))"#
        )))
        .await;
        assert!(text.contains(import) && text.contains(expected), "{text}");
    }
}

#[tokio::test]
async fn a_component_whose_handler_has_the_wrong_shape() {
    let (text, reason) = refusal(&component(
        r#"(component (instance $i) (export "switchyard:plugin/handler@0.1.0" (instance $i)))"#,
    ))
    .await;
    assert!(matches!(reason, LoadErrorReason::Link(_)), "{text}");
}

#[tokio::test]
async fn real_plugins_that_reach_for_files_or_sockets() {
    let runtime = runtime();
    for (guest, expected) in [
        (Guest::FsReader, "plugins have no filesystem access"),
        (Guest::TcpConnect, "plugins have no network access"),
    ] {
        let path = guests::path(guest);
        let error = runtime
            .load_file(&path, PluginSettings::default())
            .await
            .err()
            .unwrap_or_else(|| panic!("{guest:?} must be refused"));
        assert!(
            matches!(error.reason, LoadErrorReason::RefusedImport { .. }),
            "{error}"
        );
        assert!(error.to_string().contains(expected), "{error}");
    }
}
