//! The status page (`/ui`) in a real headless Chromium against the real binary: what an
//! operator sees and clicks. Each test writes screenshots at desktop and phone widths to
//! `target/ui-screenshots/`.

use std::time::Duration;

use serde_json::json;

use crate::on_both_backends;
use crate::scheduled::{count_in_log, schedule, scheduled_ids};
use crate::support::browser::{Browser, DESKTOP, PHONE};
use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};
use crate::support::nats::NatsServer;

fn example_host() -> Host {
    let audit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../plugins/audit-trail/sidecar.toml"
    ))
    .unwrap();
    let mut host = Host::new();
    host.plugin("ticketing", Guest::Ticketing, None)
        .plugin("notifier", Guest::Notifier, None)
        .plugin("audit-trail", Guest::AuditTrail, Some(&audit));
    host.start();
    host
}

async fn pay(host: &Host, order: &str) {
    let status = host
        .send(
            "payment.completed",
            &format!("pay-{order}"),
            json!({"order_id": order, "amount_cents": 4500, "email": "fan@example.com", "quantity": 2}),
        )
        .await;
    assert_eq!(status, 202);
}

/// Both widths of the current page.
async fn screenshots(browser: &Browser, name: &str) {
    // The page redraws its plots at the new width a moment after a resize.
    let settle = Duration::from_millis(600);
    browser.resize(DESKTOP).await;
    tokio::time::sleep(settle).await;
    browser.screenshot(&format!("{name}-desktop")).await;
    browser.resize(PHONE).await;
    tokio::time::sleep(settle).await;
    browser.screenshot(&format!("{name}-phone")).await;
    browser.resize(DESKTOP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_shows_the_example_plugins_and_their_counts_and_links_cause_to_effect() {
    let host = example_host();
    for order in ["A-1", "A-2", "A-3"] {
        pay(&host, order).await;
    }
    host.wait_caught_up("notifier", Duration::from_secs(30))
        .await;

    let browser = Browser::start(DESKTOP).await;
    browser.goto(&host.url("/ui")).await;
    let handled = |plugin: &str| format!("tr[data-plugin='{plugin}'] td[data-col='handled']");
    browser.wait_text(&handled("ticketing"), |t| t == "3").await;
    // The audit trail sees the payments and the tickets they caused.
    browser
        .wait_text(&handled("audit-trail"), |t| t == "6")
        .await;
    browser.wait_text(&handled("notifier"), |t| t == "3").await;
    let row = browser.text("tr[data-plugin='ticketing']").await.unwrap();
    assert!(
        row.contains("running") && row.contains("payment.completed"),
        "{row}"
    );
    // The plots draw once the history has two points: a second for the host-wide ones,
    // five for each plugin's.
    browser.wait_for("#plot-ingest canvas").await;
    browser.wait_for("#plot-lag canvas").await;
    let timing = browser
        .script(
            "const n = performance.getEntriesByType('navigation')[0];
             return {load: n.loadEventEnd, data: Number(document.getElementById('main').dataset.loaded) - performance.timeOrigin};",
        )
        .await;
    eprintln!("status page timing (ms since navigation): {timing}");
    screenshots(&browser, "overview").await;

    // A plugin's page: its policy, plots, KV and the load of its file.
    browser
        .click_until("tr[data-plugin='ticketing'] a", "#history-table", |t| {
            t.contains("serving")
        })
        .await;
    let info = browser.text("#plugin-info").await.unwrap();
    assert!(
        info.contains("concurrency") && info.contains("5,000 ms"),
        "{info}"
    );
    browser
        .wait_text("#kv-keys", |t| t.contains("order/A-2"))
        .await;
    browser
        .click_until("#kv-keys a[data-key='order/A-2']", "#kv-value", |t| {
            t.starts_with("order/A-2 = ")
        })
        .await;
    browser.wait_for("#plot-throughput canvas").await;
    screenshots(&browser, "plugin").await;

    // The log, and from a payment to what it caused.
    browser
        .goto(&host.url("/ui#/events?type=payment.completed"))
        .await;
    browser
        .wait_for("#events-table tr[data-id='pay-A-1']")
        .await;
    let caused = browser
        .click_until(
            "#events-table tr[data-id='pay-A-1'] a",
            "#events-table",
            |t| t.contains("tickets.generated"),
        )
        .await;
    assert!(!caused.contains("payment.completed"), "{caused}");
    assert_eq!(caused.matches("tickets.generated").count(), 1, "{caused}");
    screenshots(&browser, "events").await;
    browser.close().await;
}

async fn a_dead_letter_is_replayed_from_the_page_once_its_plugin_is_fixed(backend: Backend) {
    let broken =
        "subscribe = [\"hostile.needs-fix\", \"hostile.reject\"]\n[retry]\nmax_attempts = 1\n";
    let mut host = Host::on(&backend);
    host.plugin("mender", Guest::Hostile, Some(broken));
    host.start();
    // Numbers a browser cannot hold exactly, shown as stored.
    let posted = host
        .http
        .post(host.url("/v1/events/hostile.needs-fix"))
        .header("ce-id", "job-1")
        .header("content-type", "application/json")
        .body(r#"{"order": 9007199254740993, "huge": 1e400}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 202);
    assert_eq!(host.send("hostile.reject", "junk-1", json!({})).await, 202);

    // "Delete all" on a page filtered by kind deletes that kind only.
    let browser = Browser::start(DESKTOP).await;
    browser
        .goto(&host.url("/ui#/dlq?plugin=mender&reason=rejected"))
        .await;
    browser
        .wait_text("#dlq-table tr[data-id]", |t| t.contains("junk-1"))
        .await;
    confirm(
        &browser,
        "#delete-all",
        "Delete all of mender's rejected dead letters",
    )
    .await;
    browser
        .wait_text("#flash-text", |t| {
            t.contains("Deleted 1 of mender's rejected dead letters")
        })
        .await;
    browser.wait_for("#dlq-empty").await;

    browser
        .goto(&host.url("/ui#/dlq?plugin=mender&reason=exhausted"))
        .await;
    let row = browser
        .wait_text("#dlq-table tr[data-id]", |t| t.contains("exhausted"))
        .await;
    assert!(
        row.contains("mender") && row.contains("hostile.needs-fix"),
        "{row}"
    );
    browser.click("#dlq-table details summary").await;
    browser
        .wait_text("#dlq-table details ol", |t| {
            t.contains("retry: not fixed yet")
        })
        .await;
    let shown = browser.text("#dlq-table details pre").await.unwrap();
    assert!(
        shown.contains("\"order\": 9007199254740993") && shown.contains("\"huge\": 1e400"),
        "{shown}"
    );
    if matches!(backend, Backend::Embedded) {
        screenshots(&browser, "dead-letters").await;
    }

    // The fix: a new sidecar dropped in, which the host loads as a new version.
    host.sidecar(
        "mender",
        Some(&format!("{broken}[config]\nfixed = \"true\"\n")),
    );
    host.wait_for("the fixed version", Duration::from_secs(30), || async {
        let status = host.status("mender").await?;
        (status["history"].as_array()?.len() >= 2).then_some(())
    })
    .await;

    browser.click("#dlq-table button.replay").await;
    browser
        .wait_text("#modal-text", |t| t.contains("Replay dead letter"))
        .await;
    browser.click("#modal-ok").await;
    browser
        .wait_text("#flash-text", |t| t.contains("replayed to mender"))
        .await;
    browser.wait_for("#dlq-empty").await;
    let fixed = host
        .wait_for("the replayed job", Duration::from_secs(30), || async {
            host.kv("mender", "fixed/job-1").await
        })
        .await;
    assert_eq!(fixed, "yes");
    // The overview shows it handled and no dead letter left.
    browser.goto(&host.url("/ui")).await;
    browser
        .wait_text("tr[data-plugin='mender'] td[data-col='handled']", |t| {
            t == "1"
        })
        .await;
    browser
        .wait_text(
            "tr[data-plugin='mender'] td[data-col='dead_letters']",
            |t| t == "0",
        )
        .await;
    browser.close().await;
}

/// Clicks `button` and confirms the dialog that asks `question`.
async fn confirm(browser: &Browser, button: &str, question: &str) {
    browser
        .click_until(button, "#modal-text", |t| t.contains(question))
        .await;
    browser.click("#modal-ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_shows_and_a_plugin_is_paused_and_resumed_from_its_page() {
    let mut host = Host::new();
    host.plugin(
        "mender",
        Guest::Hostile,
        Some(
            "subscribe = [\"hostile.needs-fix\"]\nconcurrency = 1\n\
             [retry]\nmax_attempts = 10\ninitial = \"50ms\"\njitter = false\n\
             [breaker]\nfailures = 2\ncooldown = \"1h\"\n",
        ),
    )
    .plugin(
        "counter",
        Guest::Hostile,
        Some("subscribe = [\"hostile.count\"]\n"),
    );
    host.start();
    for id in ["job-1", "job-2"] {
        assert_eq!(host.send("hostile.needs-fix", id, json!({})).await, 202);
    }

    let browser = Browser::start(DESKTOP).await;
    browser.goto(&host.url("/ui")).await;
    let state = |plugin: &str| format!("tr[data-plugin='{plugin}'] td[data-col='state']");
    browser
        .wait_text(&state("mender"), |t| t == "breaker-open")
        .await;
    browser
        .wait_text(&state("counter"), |t| t == "running")
        .await;
    browser.goto(&host.url("/ui#/plugins/mender")).await;
    let info = browser
        .wait_text("#plugin-info", |t| t.contains("next probe"))
        .await;
    assert!(
        info.contains("2 failed attempts in a row") && info.contains("cooldown 1h"),
        "{info}"
    );

    // A refresh that makes the facts again leaves the keyboard's focus where it was.
    browser.goto(&host.url("/ui#/plugins/counter")).await;
    browser.wait_for("#pause").await;
    browser
        .script("document.getElementById('pause').focus(); return true;")
        .await;
    assert_eq!(host.send("hostile.count", "seen-1", json!({})).await, 202);
    browser
        .wait_text("#plugin-info", |t| {
            let words: Vec<&str> = t.split_whitespace().collect();
            words.join(" ").contains("(this host) 1 / 0")
        })
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let focused = browser.script("return document.activeElement.id;").await;
    assert_eq!(focused, "pause");

    // Pause `counter` from its page: its events wait in the log.
    confirm(&browser, "#pause", "Pause counter on every host?").await;
    browser
        .wait_text("#delivery-state", |t| {
            t.contains("paused") && t.contains("paused from the status page")
        })
        .await;
    assert_eq!(host.send("hostile.count", "held-1", json!({})).await, 202);
    screenshots(&browser, "plugin-paused").await;
    assert_eq!(host.kv("counter", "seen/held-1").await, None);
    browser.goto(&host.url("/ui")).await;
    browser
        .wait_text(&state("counter"), |t| t == "paused")
        .await;
    screenshots(&browser, "overview-paused").await;

    // Resume: the waiting event is handled.
    browser.goto(&host.url("/ui#/plugins/counter")).await;
    confirm(&browser, "#resume", "Resume counter?").await;
    browser
        .wait_text("#delivery-state", |t| t.contains("running"))
        .await;
    host.wait_for("the held event", Duration::from_secs(20), || async {
        host.kv("counter", "seen/held-1").await
    })
    .await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_plugin_with_kept_state_is_listed_and_forgotten_from_the_overview() {
    let mut host = Host::new();
    host.plugin(
        "gone",
        Guest::Hostile,
        Some("subscribe = [\"hostile.reject\"]\n"),
    )
    .plugin(
        "counter",
        Guest::Hostile,
        Some("subscribe = [\"hostile.count\"]\n"),
    );
    host.start();
    assert_eq!(host.send("hostile.reject", "junk-1", json!({})).await, 202);
    let letters = || async {
        let page = host.get_json("/v1/dlq?plugin=gone").await;
        page["dead_letters"].as_array().map(Vec::len)
    };
    host.wait_for("its dead letter", Duration::from_secs(20), || async {
        (letters().await? == 1).then_some(())
    })
    .await;

    let browser = Browser::start(DESKTOP).await;
    browser.goto(&host.url("/ui")).await;
    browser
        .wait_text("tr[data-plugin='gone'] td[data-col='state']", |t| {
            t == "running"
        })
        .await;
    assert_eq!(
        browser.text("#absent-table").await,
        None,
        "nothing absent yet"
    );

    // The file goes: the plugin leaves the table and shows among those with kept state.
    std::fs::remove_file(host.plugins_dir().join("gone.wasm")).unwrap();
    let row = browser
        .wait_text("#absent-table tr[data-absent='gone']", |t| !t.is_empty())
        .await;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells.first(), Some(&"gone"), "{row}");
    assert_eq!(
        cells.get(cells.len() - 2),
        Some(&"1"),
        "one dead letter: {row}"
    );
    let summary = browser.text("#absent-summary").await.unwrap();
    assert!(summary.contains("1 plugin that no file"), "{summary}");
    assert_eq!(browser.find("tr[data-plugin='gone']").await, None);
    screenshots(&browser, "overview-absent").await;

    confirm(
        &browser,
        "tr[data-absent='gone'] button",
        "Forget gone? Its place in the log, pending retries, dead letters and KV",
    )
    .await;
    browser
        .wait_text("#flash-text", |t| t == "Plugin gone forgotten.")
        .await;
    host.wait_for("the section to go", Duration::from_secs(10), || async {
        browser.find("#absent-table").await.is_none().then_some(())
    })
    .await;
    assert_eq!(letters().await, Some(0));
    assert_eq!(
        host.get_json("/v1/plugins").await["absent_total"],
        0,
        "forgotten"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_dropped_broken_file_shows_its_load_error_while_the_old_version_serves() {
    let mut host = Host::new();
    host.plugin("mender", Guest::Hostile, None);
    host.start();
    host.deploy("mender.wasm", b"\0asm this is not a component");
    host.wait_for("the failed load", Duration::from_secs(30), || async {
        host.status("mender").await?["load_error"]
            .as_str()
            .map(|_| ())
    })
    .await;

    let browser = Browser::start(DESKTOP).await;
    browser.goto(&host.url("/ui")).await;
    let row = browser
        .wait_text("tr[data-plugin='mender']", |t| t.contains("load error"))
        .await;
    assert!(
        row.contains("running"),
        "the old version keeps serving: {row}"
    );
    browser.goto(&host.url("/ui#/plugins/mender")).await;
    let error = browser.wait_text("#load-error", |t| !t.is_empty()).await;
    assert!(error.contains("mender.wasm"), "{error}");
    browser
        .wait_text("#history-table", |t| {
            t.contains("failed:") && t.contains("serving")
        })
        .await;
    browser.close().await;
}

/// NATS only: the embedded log is in the host's own process and cannot be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_says_once_that_the_host_lost_its_nats_server_and_recovers_with_it() {
    let mut server = NatsServer::start();
    let mut host = Host::on(&Backend::Nats(server.url()));
    host.plugin("sink", Guest::Noop, None);
    host.start();
    let browser = Browser::start(DESKTOP).await;
    browser.goto(&host.url("/ui")).await;
    browser.wait_for("tr[data-plugin='sink']").await;
    assert_eq!(browser.text("#live").await.as_deref(), Some("live"));

    server.kill();
    let banner = browser
        .wait_text("#trouble", |t| {
            t.contains("not connected to the NATS server")
        })
        .await;
    assert!(banner.starts_with("503: "), "{banner}");
    assert_eq!(browser.text("#live").await.as_deref(), Some("not updating"));
    // Refreshes go on failing every 2 s: still one notice, not one per refresh.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let notices = browser
        .script("return document.querySelectorAll('.notice.bad').length;")
        .await;
    assert_eq!(notices, 1);
    screenshots(&browser, "bus-lost").await;
    // A view first opened while the server is out of reach has its filters to use, and
    // the overview opened then fills once the server is back.
    browser.goto(&host.url("/ui#/dlq")).await;
    browser
        .wait_text("#trouble", |t| {
            t.contains("not connected to the NATS server")
        })
        .await;
    assert!(browser.find("#dlq-plugin").await.is_some());
    browser.goto(&host.url("/ui#/")).await;
    browser
        .wait_text("#trouble", |t| {
            t.contains("not connected to the NATS server")
        })
        .await;

    server.restart();
    browser.wait_text("#live", |t| t == "live").await;
    let hidden = browser
        .script("return document.getElementById('trouble').hidden;")
        .await;
    assert_eq!(hidden, true);
    browser
        .wait_text("tr[data-plugin='sink']", |t| t.contains("running"))
        .await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_admin_tokens_the_page_shows_nothing_until_a_token_is_entered() {
    let mut host = Host::new();
    host.config("[auth]\ningest_tokens = [\"in\"]\nadmin_tokens = [\"admin-secret\"]\n");
    host.plugin("mender", Guest::Hostile, None);
    host.start();

    let browser = Browser::start(DESKTOP).await;
    browser.goto(&host.url("/ui")).await;
    browser.wait_for("#token").await;
    assert!(browser.find("#plugins-table").await.is_none());
    screenshots(&browser, "token").await;
    // An ingest token is not an admin token: the form comes back saying so.
    browser.type_into("#token", "in\u{E007}").await;
    browser
        .wait_text("#token-refused", |t| t.contains("refused"))
        .await;
    assert!(browser.find("#plugins-table").await.is_none());
    // The token never goes into the URL.
    browser.type_into("#token", "admin-secret").await;
    let typed = browser
        .script("return document.getElementById('token').value;")
        .await;
    assert_eq!(typed, "admin-secret");
    browser.click(".login button[type='submit']").await;
    browser
        .wait_text("tr[data-plugin='mender']", |t| t.contains("running"))
        .await;
    let url = browser.script("return location.href;").await;
    assert!(!url.as_str().unwrap().contains("secret"), "{url}");
    browser.close().await;
}

async fn scheduled_events_are_listed_live_and_one_is_cancelled_from_the_page(backend: Backend) {
    let mut host = Host::on(&backend);
    host.start();
    for (id, delay) in [("soon", "10s"), ("reminder-1", "1h"), ("reminder-2", "2h")] {
        let (status, body) = schedule(&host, id, Some(delay), None).await;
        assert_eq!(status, 202, "{body}");
    }
    let invoice = host
        .http
        .post(host.url("/v1/events/invoice.due?delay=3h"))
        .header("ce-id", "invoice-1")
        .json(&json!({"invoice": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(invoice.status(), 202);

    let browser = Browser::start(DESKTOP).await;
    browser.goto(&host.url("/ui#/scheduled")).await;
    browser
        .wait_text("#scheduled-summary", |t| t.starts_with("4 pending"))
        .await;
    let table = browser.text("#scheduled-table tbody").await.unwrap();
    let order: Vec<usize> = ["soon", "reminder-1", "reminder-2", "invoice-1"]
        .iter()
        .map(|id| table.find(id).unwrap())
        .collect();
    assert!(order.is_sorted(), "soonest first: {table}");
    if matches!(backend, Backend::Embedded) {
        screenshots(&browser, "scheduled").await;
    }

    // The page is live: the due event leaves the list once it fires, and is appended to
    // the log (on NATS, by the host that takes the server's due message, just after).
    browser
        .wait_text("#scheduled-summary", |t| t.starts_with("3 pending"))
        .await;
    assert!(
        browser
            .find("#scheduled-table tr[data-id='soon']")
            .await
            .is_none()
    );
    host.wait_for(
        "the due event in the log",
        Duration::from_secs(10),
        || async { (count_in_log(&host, "soon").await == 1).then_some(()) },
    )
    .await;

    // Cancelled from the page: gone from the list and from the host.
    confirm(
        &browser,
        "#scheduled-table tr[data-id='reminder-2'] button.cancel",
        "Cancel scheduled event reminder-2?",
    )
    .await;
    browser
        .wait_text("#flash-text", |t| t.contains("reminder-2 cancelled"))
        .await;
    browser
        .wait_text("#scheduled-summary", |t| t.starts_with("2 pending"))
        .await;
    let listed = host.get_json("/v1/scheduled").await;
    assert_eq!(
        scheduled_ids(&listed),
        ["reminder-1", "invoice-1"],
        "{listed}"
    );

    // Filtered by type.
    browser
        .type_into("#scheduled-type", "invoice.due\u{E007}")
        .await;
    browser
        .wait_text("#scheduled-table tbody", |t| {
            t.contains("invoice-1") && !t.contains("reminder-1")
        })
        .await;
    browser.close().await;
}

on_both_backends!(multi_thread: a_dead_letter_is_replayed_from_the_page_once_its_plugin_is_fixed);
on_both_backends!(multi_thread: scheduled_events_are_listed_live_and_one_is_cancelled_from_the_page);
