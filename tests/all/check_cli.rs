//! `switchyard check` and `switchyard invoke` on the real binary: each example plugin
//! passes `check` with its name, version and subscriptions; files that are not plugins
//! fail with a clear error; `invoke` prints a call's effects, or its failure by kind.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::guests::{self, Guest};

fn check(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .env(
            "SWITCHYARD_CACHE_DIR",
            guests::target_dir().join("compile-cache"),
        )
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
        // The host names a plugin after its file; the described name follows if it differs.
        let stem = path.file_stem().unwrap().to_string_lossy();
        let named = if stem == name {
            format!("\n  name           {name}\n")
        } else {
            format!("\n  name           {stem} (describes itself as `{name}`)\n")
        };
        assert!(stdout.contains(&named), "{stdout}");
        assert!(stdout.contains("\n  version        0.1.0\n"), "{stdout}");
        assert!(
            stdout.contains(&format!("\n  subscriptions  {subscriptions}\n")),
            "{stdout}"
        );
    }
}

/// `check` and `invoke` take a plugin as a host would: its file names it, and the
/// sidecar beside it sets its policy and configuration, or is refused as the host would.
#[test]
fn check_and_invoke_read_the_sidecar_and_refuse_what_a_host_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = std::fs::read(guests::path(Guest::Hostile)).unwrap();
    let plugin = dir.path().join("greeter.wasm");
    std::fs::write(&plugin, &hostile).unwrap();
    std::fs::write(
        dir.path().join("greeter.toml"),
        "[config]\ngreeting = \"hi\"\n",
    )
    .unwrap();
    let output = check(&plugin);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("\n  sidecar        "), "{stdout}");
    let (_, report) = invoke(&plugin, "hostile.config", "{}");
    assert_eq!(
        report["result"]["message"], "greeting=Some(\"hi\")",
        "{report}"
    );

    std::fs::write(dir.path().join("greeter.toml"), "concurency = 2\n").unwrap();
    let output = check(&plugin);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("greeter.toml") && stderr.contains("concurency"),
        "{stderr}"
    );

    let misnamed = dir.path().join("greeter.v2.wasm");
    std::fs::write(&misnamed, &hostile).unwrap();
    let output = check(&misnamed);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("a plugin name must be"), "{stderr}");
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
    invoke_with(path, ty, data, &[])
}

fn invoke_with(path: &Path, ty: &str, data: &str, extra: &[&str]) -> (Output, serde_json::Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .env(
            "SWITCHYARD_CACHE_DIR",
            guests::target_dir().join("compile-cache"),
        )
        .arg("invoke")
        .arg(path)
        .args(["--type", ty, "--data", data])
        .args(extra)
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

/// A handler is tried on the KV state it depends on, and on an event with a subject.
#[test]
fn invoke_seeds_kv_and_gives_the_event_a_subject() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = dir.path().join("kv.json");
    std::fs::write(
        &seeds,
        r#"{"count/order.created": "41", "count/order.paid": 6, "note": {"a": 1}}"#,
    )
    .unwrap();
    let audit = guests::path(Guest::AuditTrail);
    let seeded = ["--kv-file", seeds.to_str().unwrap()];
    let (output, report) = invoke_with(&audit, "order.created", "{}", &seeded);
    assert!(output.status.success(), "{report}");
    assert_eq!(report["result"]["kv_writes"]["count/order.created"], "42");
    let (_, report) = invoke_with(&audit, "order.paid", "{}", &seeded);
    assert_eq!(report["result"]["kv_writes"]["count/order.paid"], "7");
    // `--kv` wins over the file for a key in both.
    let both = [&seeded[..], &["--kv", "count/order.paid=99"]].concat();
    let (_, report) = invoke_with(&audit, "order.paid", "{}", &both);
    assert_eq!(report["result"]["kv_writes"]["count/order.paid"], "100");

    let (output, report) = invoke_with(
        &guests::path(Guest::Hostile),
        "hostile.mirror",
        "{}",
        &["--subject", "order/7"],
    );
    assert!(output.status.success(), "{report}");
    let mirrored = &report["result"]["emits"][0]["data"];
    assert_eq!(mirrored["subject"], "order/7", "{report}");

    for (extra, says) in [
        (&["--kv", "no-equals-sign"][..], "is not KEY=VALUE"),
        (&["--kv", "=empty key"][..], "a KV key cannot be empty"),
        (&["--kv-file", "no-such-file.json"][..], "reading --kv-file"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("invoke")
            .arg(&audit)
            .args(["--type", "order.created"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
    }
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

#[test]
fn invoke_reads_data_from_a_file_and_takes_a_fuel_budget() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payment.json");
    let payment = r#"{"order_id": "F-1", "amount_cents": 900, "email": "fan@example.com"}"#;
    std::fs::write(&file, payment).unwrap();
    let (output, report) = invoke(
        &guests::path(Guest::Ticketing),
        "payment.completed",
        &format!("@{}", file.display()),
    );
    assert!(output.status.success(), "{report}");
    assert_eq!(
        report["result"]["emits"][0]["data"]["order_id"], "F-1",
        "{report}"
    );

    let (output, report) = invoke_with(
        &guests::path(Guest::Hostile),
        "hostile.loop",
        "{}",
        &["--fuel", "1000000"],
    );
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert_eq!(report["result"]["kind"], "fuel", "{report}");
    assert_eq!(report["fuel_used"], 1_000_000, "{report}");
}

/// The code blocks of a README section, in order.
fn sh_blocks<'a>(readme: &'a str, heading: &str) -> Vec<&'a str> {
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("no section {heading}: {readme}"));
    section
        .split("```sh\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap())
        .collect()
}

/// `switchyard new` in each language writes a project whose README's build command
/// builds it, and whose `check` and `invoke` commands pass, exactly as written.
#[test]
fn new_projects_build_and_pass_check_and_invoke_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let tools = root.join(".tools/bin");
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cache = guests::target_dir().join("compile-cache");
    let parent = tempfile::tempdir().unwrap();
    for lang in ["python", "js", "rust"] {
        let name = format!("greeter-{lang}");
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["new", &name, "--lang", lang, "--dir"])
            .arg(parent.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let project = parent.path().join(&name);
        let readme = std::fs::read_to_string(project.join("README.md")).unwrap();

        let build = sh_blocks(&readme, "Build");
        assert_eq!(build.len(), 1, "one build command: {readme}");
        let mut command = Command::new("sh");
        command
            .args(["-ec", build[0]])
            .current_dir(&project)
            .env("PATH", &path);
        let built = guests::without_outer_build(&mut command).output().unwrap();
        assert!(
            built.status.success(),
            "{lang}: {}\n{}",
            build[0],
            String::from_utf8_lossy(&built.stderr)
        );

        let try_it = sh_blocks(&readme, "Try it");
        let lines: Vec<&str> = try_it[0].lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 3, "{readme}");
        for line in lines {
            let args = line.strip_prefix("switchyard ").unwrap();
            let output = Command::new("sh")
                .arg("-ec")
                .arg(format!("\"$SWITCHYARD\" {args}"))
                .current_dir(&project)
                .env("SWITCHYARD", env!("CARGO_BIN_EXE_switchyard"))
                .env("SWITCHYARD_CACHE_DIR", &cache)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "{lang}: {line}\n{stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
            if args.starts_with("check") {
                assert!(
                    stdout.contains(": ok\n") && stdout.contains(&name),
                    "{stdout}"
                );
            } else {
                let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
                assert_eq!(report["status"], "ok", "{report}");
                assert_eq!(
                    report["result"]["emits"][0]["type"], "greeting.sent",
                    "{report}"
                );
                assert_eq!(
                    report["result"]["emits"][0]["data"]["text"], "Hello, Ada!",
                    "{report}"
                );
                // The second invocation starts from the KV state it gives.
                let count = if args.contains("--kv greeted/Ada=2") {
                    "3"
                } else {
                    "1"
                };
                assert_eq!(
                    report["result"]["kv_writes"]["greeted/Ada"], count,
                    "{report}"
                );
                // Every language's template rejects a request without a name alike.
                let empty = line.replace(r#"{"name": "Ada"}"#, r#"{"name": ""}"#);
                let output = Command::new("sh")
                    .arg("-ec")
                    .arg(format!(
                        "\"$SWITCHYARD\" {}",
                        empty.strip_prefix("switchyard ").unwrap()
                    ))
                    .current_dir(&project)
                    .env("SWITCHYARD", env!("CARGO_BIN_EXE_switchyard"))
                    .env("SWITCHYARD_CACHE_DIR", &cache)
                    .output()
                    .unwrap();
                let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
                assert_eq!(report["status"], "failed", "{lang}: {report}");
                assert_eq!(report["result"]["kind"], "reject", "{lang}: {report}");
            }
        }
    }
}

/// `switchyard status` behind a proxy that answers with its own error page (not JSON)
/// reports the status and the page, and exits 1.
#[test]
fn status_reports_an_error_page_that_is_not_json() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let proxy = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request).unwrap();
        stream
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: 16\r\nconnection: close\r\n\r\nupstream is down")
            .unwrap();
    });
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["status", "--url", &url])
        .output()
        .unwrap();
    proxy.join().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("502 Bad Gateway: upstream is down"),
        "{stderr}"
    );
}
