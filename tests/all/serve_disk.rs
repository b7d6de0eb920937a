//! Disk trouble under the real binary: the data directory lives on a small tmpfs that is
//! filled up while the host runs, and remounted read-only while it is stopped. Ingest must
//! answer `503` with a clear error, keep serving everything else, lose nothing it
//! acknowledged, and recover by itself once space returns. A backup on the full disk fails
//! with that cause and leaves no partial copy behind.
//!
//! Mounting needs root (CAP_SYS_ADMIN); without it each test says so and returns.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::guests::Guest;
use crate::support::host::Host;

const COUNTER: &str =
    "subscribe = [\"disk.>\"]\nconcurrency = 4\n[config]\nbehaviour = \"hostile.count\"\n";

/// A tmpfs of a fixed size mounted for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (such as `48m`) on `path`, or `None` when not permitted.
    fn mount(path: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !mounted {
            eprintln!("skipped: mounting a tmpfs needs root");
        }
        mounted.then(|| Self(path.to_owned()))
    }

    fn remount(&self, mode: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {mode}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes a file until the filesystem refuses with "no space left"; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5Au8; 64 * 1024];
    loop {
        match file.write_all(&chunk).and_then(|()| file.sync_all()) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(28) => return path, // ENOSPC
            Err(error) => panic!("filling the disk: {error}"),
        }
    }
}

/// POSTs one event with a 2 KiB payload; returns the status and the body.
async fn post(host: &Host, id: &str) -> (u16, serde_json::Value, Option<String>) {
    let response = host
        .http
        .post(host.url("/v1/events/disk.write"))
        .header("ce-id", id)
        .json(&json!({"id": id, "padding": "x".repeat(2048)}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, body, retry_after)
}

#[tokio::test]
async fn a_full_disk_answers_503_loses_nothing_and_recovers_by_itself() {
    let mut host = Host::new();
    let Some(disk) = Tmpfs::mount(&host.data_dir(), "48m") else {
        return;
    };
    host.plugin("counter", Guest::Hostile, Some(COUNTER));
    host.start();
    let mut acked = BTreeSet::new();
    for n in 0..20 {
        let id = format!("before-{n}");
        assert_eq!(post(&host, &id).await.0, 202);
        acked.insert(id);
    }

    let filler = fill(&disk.0);
    // What SQLite already holds of its write-ahead log may take a few more events; the
    // disk must refuse within a bounded number.
    let mut refusal = None;
    for n in 0..5000 {
        let id = format!("full-{n}");
        let (status, body, retry_after) = post(&host, &id).await;
        match status {
            202 => {
                acked.insert(id);
            }
            503 => {
                refusal = Some((body, retry_after));
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let (body, retry_after) = refusal.expect("a full disk is refused with 503");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("full"),
        "the error says the disk is full: {message}"
    );
    assert!(retry_after.is_some(), "503 carries Retry-After");
    // Everything else keeps answering while the disk is full.
    assert!(host.status("counter").await.is_some());
    assert!(host.metric("switchyard_events_ingested_total").await >= 20.0);
    for n in 0..5 {
        assert_eq!(post(&host, &format!("still-full-{n}")).await.0, 503);
    }

    std::fs::remove_file(filler).unwrap();
    let id = host
        .wait_for("ingest to recover", Duration::from_secs(30), || async {
            let id = format!("after-{}", acked.len());
            (post(&host, &id).await.0 == 202).then_some(id)
        })
        .await;
    acked.insert(id);
    for n in 0..20 {
        let id = format!("recovered-{n}");
        assert_eq!(post(&host, &id).await.0, 202);
        acked.insert(id);
    }

    // Every acknowledged event is handled once, and nothing refused was stored.
    host.wait_caught_up("counter", Duration::from_secs(60))
        .await;
    let log = host.log().await;
    let stored: BTreeSet<String> = log
        .iter()
        .filter(|e| e["event"]["type"] == "disk.write")
        .map(|e| e["event"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        stored, acked,
        "the log holds exactly the acknowledged events"
    );
    let counted = crate::support::counted_ids(&log);
    let distinct: BTreeSet<&str> = counted.iter().copied().collect();
    assert_eq!(
        counted.len(),
        distinct.len(),
        "an effect was committed twice"
    );
    assert_eq!(
        distinct.len(),
        acked.len(),
        "an acknowledged event was not handled"
    );
    host.stop();
}

#[tokio::test]
async fn a_read_only_data_directory_is_refused_at_start_with_a_clear_error() {
    let mut host = Host::new();
    let Some(disk) = Tmpfs::mount(&host.data_dir(), "16m") else {
        return;
    };
    host.start();
    host.stop();
    disk.remount("ro");
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--plugins"])
        .arg(host.plugins_dir())
        .arg("--data")
        .arg(host.data_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(output.stdout.is_empty(), "it never listened: {stderr}");
    assert!(stderr.contains("read-only"), "{stderr}");
    disk.remount("rw");
    host.start();
    assert_eq!(host.send("disk.write", "after-rw", json!({})).await, 202);
}

#[tokio::test]
async fn a_backup_on_a_full_disk_is_refused_with_the_cause_and_leaves_nothing_behind() {
    let mut host = Host::new();
    let Some(_disk) = Tmpfs::mount(&host.data_dir(), "16m") else {
        return;
    };
    host.start();
    for n in 0..20 {
        assert_eq!(post(&host, &format!("copy-{n}")).await.0, 202);
    }
    let filler = fill(&host.data_dir());
    // Refused before it starts: the copy would fill the disk under the producers too.
    let response = host.http.get(host.url("/v1/backup")).send().await.unwrap();
    assert_eq!(response.status(), 507);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_storage", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("bytes free beside the log"), "{message}");
    // HEAD asks the same question, and gets the same answer.
    let response = host.http.head(host.url("/v1/backup")).send().await.unwrap();
    assert_eq!(response.status(), 507);
    let left: Vec<String> = std::fs::read_dir(host.data_dir())
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".backup-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    std::fs::remove_file(filler).unwrap();
    let response = host.http.get(host.url("/v1/backup")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.unwrap();
    assert!(bytes.starts_with(b"SQLite format 3\0"));
}
