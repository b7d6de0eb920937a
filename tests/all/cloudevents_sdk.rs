//! CloudEvents conformance seen from an independent producer: the CloudEvents Python SDK
//! (installed into `.tools/python` by `scripts/setup.sh`) sends events in binary,
//! structured and batched mode to a real host, then parses what the log shows with its
//! own JSON format. The checks are in `cloudevents_sdk.py`, one line each.

use std::path::Path;
use std::process::Command;

use crate::support::host::Host;

#[tokio::test]
async fn the_cloudevents_python_sdk_round_trips_every_mode_through_ingest_and_the_log() {
    let mut host = Host::new();
    host.start();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("tests/all/cloudevents_sdk.py");
    let base = host.url("");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(base)
            .env("PYTHONPATH", root.join(".tools/python"))
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs (scripts/setup.sh installs the CloudEvents SDK)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK's checks failed:\n{stdout}\n{stderr}"
    );
    // At least a check per event sent and one per event read back, none failed.
    let passed = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(
        stdout.lines().all(|l| l.starts_with("ok ")) && passed >= 12 * 2,
        "{stdout}"
    );
}
