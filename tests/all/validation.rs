//! Files that are not plugins the host may run are refused at load time with a typed
//! error that names the file and the reason.

use std::path::PathBuf;

use switchyard_host::runtime::{Access, LoadError, LoadErrorReason, PluginSettings, Runtime};

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
async fn a_component_that_imports_what_the_host_does_not_provide_names_every_import() {
    let missing = [
        "acme:secrets/vault@1.0.0",
        "wasi:keyvalue/store@0.2.0-draft",
        "wasi:filesystem/types@0.3.0",
    ];
    let (text, reason) = refusal(&component(&format!(
        r#"(component
            (import "wasi:clocks/wall-clock@0.2.3" (instance))
            (import "{}" (instance))
            (import "{}" (instance))
            (import "{}" (instance))
            (instance $i)
            (export "switchyard:plugin/handler@0.1.0" (instance $i)))"#,
        missing[0], missing[1], missing[2]
    )))
    .await;
    assert!(
        matches!(&reason, LoadErrorReason::UnknownImports(names) if names == &missing),
        "{text}"
    );
    for name in missing {
        assert!(text.contains(&format!("`{name}`")), "{text}");
    }
    assert!(!text.contains("wall-clock"), "{text}");
}

#[tokio::test]
async fn a_component_whose_handler_has_the_wrong_shape() {
    let (text, reason) = refusal(&component(
        r#"(component (instance $i) (export "switchyard:plugin/handler@0.1.0" (instance $i)))"#,
    ))
    .await;
    assert!(matches!(reason, LoadErrorReason::Link(_)), "{text}");
}

/// Plugins built with the standard library's files and sockets load, since the host
/// links those interfaces, and meet an empty filesystem and refused sockets.
#[tokio::test]
async fn real_plugins_that_reach_for_files_or_sockets_load_and_are_refused() {
    let runtime = runtime();
    for (guest, access, import, grant) in [
        (
            Guest::FsReader,
            Access::File,
            "wasi:filesystem/preopens",
            "no directories",
        ),
        (
            Guest::TcpConnect,
            Access::Socket,
            "wasi:sockets/tcp-create-socket",
            "refused",
        ),
    ] {
        let plugin = crate::support::load(&runtime, guest, PluginSettings::default()).await;
        let linked = plugin
            .info()
            .imports
            .iter()
            .find(|i| i.name.starts_with(import))
            .unwrap_or_else(|| panic!("{guest:?} imports {import}"));
        assert!(linked.grant.contains(grant), "{linked:?}");
        let outcome = crate::support::invoke(
            &plugin,
            &crate::support::event("probe", serde_json::json!({})),
        )
        .await;
        let (kind, message) = crate::support::failure(&outcome);
        assert_eq!(kind, "reject", "{message}");
        assert!(message.starts_with("denied: "), "{guest:?}: {message}");
        let refused: Vec<(Access, u64)> = plugin.refusals().counts().to_vec();
        for (counted, count) in refused {
            assert_eq!(
                count,
                u64::from(counted == access),
                "{guest:?}: {counted:?}"
            );
        }
    }
}
