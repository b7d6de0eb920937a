//! Backup and restore with the real binary: `switchyard backup` copies a serving host's
//! embedded log while producers go on, and `switchyard restore` puts it in place for a
//! host that then carries on from it. On NATS JetStream the server's tools back up, and
//! the command says so.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::json;

use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};

const COUNTER: &str =
    "subscribe = [\"backup.>\"]\nconcurrency = 4\n[config]\nbehaviour = \"hostile.count\"\n";

fn switchyard(args: &[&str], paths: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .args(paths)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// The ids and sequences of a log, in order.
fn ids_of(log: &[serde_json::Value]) -> Vec<(u64, String)> {
    log.iter()
        .map(|e| {
            (
                e["sequence"].as_u64().unwrap(),
                e["event"]["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn a_backup_taken_while_serving_restores_a_consistent_log(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin("counter", Guest::Hostile, Some(COUNTER));
    host.start();
    for n in 0..40 {
        let status = host.send("backup.tick", &format!("b-{n}"), json!({})).await;
        assert_eq!(status, 202);
    }
    host.wait_caught_up("counter", Duration::from_secs(60))
        .await;
    let files = tempfile::tempdir().unwrap();
    let copy = files.path().join("log.backup");
    let url = host.url("");

    // Producers go on while the copy is taken.
    let producer = {
        let (http, url) = (host.http.clone(), host.url("/v1/events/backup.tick"));
        tokio::spawn(async move {
            for n in 40..240 {
                let sent = http
                    .post(&url)
                    .header("ce-id", format!("b-{n}"))
                    .json(&json!({}));
                assert_eq!(sent.send().await.unwrap().status(), 202);
            }
        })
    };
    let backup = tokio::task::spawn_blocking({
        let (url, copy) = (url.clone(), copy.clone());
        move || switchyard(&["backup", "--url", &url, "-o"], &[&copy])
    })
    .await
    .unwrap();
    producer.await.unwrap();
    let stderr = String::from_utf8_lossy(&backup.stderr);
    if let Backend::Nats(_) = backend {
        assert_eq!(backup.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("409") && stderr.contains("nats account backup"),
            "{stderr}"
        );
        assert!(!copy.exists());
        let head = host.http.head(host.url("/v1/backup")).send().await.unwrap();
        assert_eq!(head.status(), 409);
        return;
    }
    assert!(backup.status.success(), "{stderr}");
    let said = String::from_utf8_lossy(&backup.stdout);
    assert!(said.starts_with("backed up "), "{said}");
    // A second backup never overwrites the first.
    let again = switchyard(&["backup", "--url", &url, "-o"], &[&copy]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // The serving host's log cannot be replaced under it.
    let refused = switchyard(
        &["restore"],
        &[&copy, Path::new("--data"), &host.data_dir()],
    );
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("is in use by another process"), "{stderr}");

    // The data directory comes from the host's config file, as `serve` reads it.
    let mut restored = Host::on(&backend);
    restored.plugin("counter", Guest::Hostile, Some(COUNTER));
    let config = files.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n",
            restored.data_dir().display().to_string()
        ),
    )
    .unwrap();
    let done = switchyard(&["restore"], &[&copy, Path::new("--config"), &config]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    restored.start();
    restored
        .wait_caught_up("counter", Duration::from_secs(60))
        .await;

    // One point in time: the backup is the start of the original log, event for event,
    // and holds at least what was there before the copy began. (The restored host then
    // appends what its plugin emits for the ticks it had not handled yet.)
    let copied: usize = said
        .trim_start_matches("backed up ")
        .split(' ')
        .next()
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no event count in {said:?}"));
    assert!(copied >= 80, "{copied} events backed up");
    let original = ids_of(&host.log().await);
    let log = restored.log().await;
    let kept = ids_of(&log);
    assert_eq!(kept[..copied], original[..copied]);

    // The plugin goes on from its restored position: every tick handled, none twice.
    let ticks: BTreeSet<&str> = log
        .iter()
        .filter(|e| e["event"]["type"] == "backup.tick")
        .map(|e| e["event"]["id"].as_str().unwrap())
        .collect();
    let counted = crate::support::counted_ids(&log);
    let distinct: BTreeSet<&str> = counted.iter().copied().collect();
    assert_eq!(counted.len(), distinct.len(), "an event was handled twice");
    assert_eq!(distinct, ticks);
    // Its read-modify-write counters came along too: a tick handled again after the
    // restore would be counted twice.
    let mut total = 0;
    for shard in 0..16 {
        if let Some(count) = restored.kv("counter", &format!("total/{shard}")).await {
            total += count.parse::<usize>().unwrap();
        }
    }
    assert_eq!(total, ticks.len());
}

crate::on_both_backends!(a_backup_taken_while_serving_restores_a_consistent_log);

/// A file that is not a whole log is refused by `restore`, and the data directory keeps
/// what it had.
#[tokio::test]
async fn restore_refuses_a_file_that_is_not_a_log() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.db");
    std::fs::write(&bogus, b"not a database at all").unwrap();
    let data = dir.path().join("data");
    let output = switchyard(&["restore"], &[&bogus, Path::new("--data"), &data]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not a backup of a Switchyard log"),
        "{stderr}"
    );
    assert!(!data.join("switchyard.db").exists());
}

/// A restore that cannot copy the backup leaves the log it was to replace where it was;
/// and a WAL file without its log is refused rather than applied to the restored one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_leaves_the_log_in_place() {
    let mut host = Host::new();
    host.start();
    assert_eq!(host.send("backup.one", "b-1", json!({})).await, 202);
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    let url = host.url("");
    let taken = switchyard(
        &["backup", "--url", url.trim_end_matches('/'), "-o"],
        &[&copy],
    );
    assert!(taken.status.success(), "{taken:?}");
    host.stop();

    let data = host.data_dir();
    let log = data.join("switchyard.db");
    let before = std::fs::read(&log).unwrap();
    // The copy's place is taken, so the copy fails.
    std::fs::create_dir(data.join("switchyard.db.restoring")).unwrap();
    let failed = switchyard(
        &["restore", "--replace"],
        &[&copy, Path::new("--data"), &data],
    );
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot copy the backup"), "{stderr}");
    assert_eq!(
        std::fs::read(&log).unwrap(),
        before,
        "the log stays as it was"
    );
    std::fs::remove_dir(data.join("switchyard.db.restoring")).unwrap();

    std::fs::rename(&log, dir.path().join("elsewhere.db")).unwrap();
    std::fs::write(data.join("switchyard.db-wal"), b"frames of another log").unwrap();
    let refused = switchyard(&["restore"], &[&copy, Path::new("--data"), &data]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("without its log"), "{stderr}");
    assert!(!log.exists());
}
