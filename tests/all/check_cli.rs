//! `switchyard check` and `switchyard invoke` on the real binary: each example plugin
//! passes `check` with its name, version and subscriptions; files that are not plugins
//! fail with a clear error; `invoke` prints a call's effects, or its failure by kind.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::guests::{self, Guest};

fn check(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check")
        .arg(path)
        .output()
        .expect("the switchyard binary runs")
}

#[test]
fn check_accepts_every_example_plugin() {
    for (guest, name, subscriptions) in [
        (Guest::AuditTrail, "audit-trail", ">"),
        (Guest::Ticketing, "ticketing", "payment.completed"),
        (Guest::Notifier, "notifier", "tickets.generated"),
    ] {
        let path = guests::path(guest);
        let output = check(&path);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.starts_with(&format!("{}: ok\n", path.display())),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("\n  name           {name}\n")),
            "{stdout}"
        );
        assert!(stdout.contains("\n  version        0.1.0\n"), "{stdout}");
        assert!(
            stdout.contains(&format!("\n  subscriptions  {subscriptions}\n")),
            "{stdout}"
        );
    }
}

#[test]
fn check_fails_cleanly_on_files_that_are_not_plugins() {
    let dir = tempfile::tempdir().unwrap();
    for (file, bytes, reason) in [
        ("empty.wasm", Vec::new(), "the file is empty"),
        (
            "random.wasm",
            b"\x13\x37 definitely not wasm".to_vec(),
            "not a WebAssembly file",
        ),
        (
            "core.wasm",
            b"\0asm\x01\0\0\0".to_vec(),
            "a core WebAssembly module, not a component",
        ),
    ] {
        let path = dir.path().join(file);
        std::fs::write(&path, bytes).unwrap();
        let output = check(&path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{file}: {stderr}");
        assert!(output.stdout.is_empty(), "{file}");
        assert!(
            stderr.starts_with(&format!("error: {}: {reason}", path.display())),
            "{file}: {stderr}"
        );
    }
}

#[test]
fn check_fails_on_a_missing_file() {
    let output = check(Path::new("no-such-plugin.wasm"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.contains("no-such-plugin.wasm: cannot read the file"),
        "{stderr}"
    );
}

fn invoke(path: &Path, ty: &str, data: &str) -> (Output, serde_json::Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("invoke")
        .arg(path)
        .args(["--type", ty, "--data", data])
        .output()
        .expect("the switchyard binary runs");
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "invoke prints JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output, report)
}

#[test]
fn invoke_prints_the_effects_of_a_successful_call() {
    let (output, report) = invoke(
        &guests::path(Guest::Ticketing),
        "payment.completed",
        r#"{"order_id": "A-1", "amount_cents": 9000, "email": "fan@example.com", "quantity": 2}"#,
    );
    assert!(output.status.success(), "{report}");
    assert_eq!(report["plugin"], "ticketing");
    assert_eq!(report["status"], "ok");
    let emits = report["result"]["emits"].as_array().unwrap();
    assert_eq!(emits.len(), 1, "{report}");
    assert_eq!(emits[0]["type"], "tickets.generated");
    assert_eq!(emits[0]["data"]["order_id"], "A-1");
    assert!(
        !report["result"]["kv_writes"]
            .as_object()
            .unwrap()
            .is_empty(),
        "{report}"
    );
    assert!(report["fuel_used"].as_u64().unwrap() > 0);
}

#[test]
fn invoke_reports_a_failed_call_by_kind_and_exits_1() {
    let (output, report) = invoke(&guests::path(Guest::Hostile), "hostile.panic", "{}");
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert_eq!(report["status"], "failed");
    assert_eq!(report["result"]["kind"], "trap");
    assert!(
        report["result"]["message"]
            .as_str()
            .unwrap()
            .contains("hostile plugin panicked on purpose"),
        "{report}"
    );
}
