//! `switchyard status`: one table of a running host's plugins — state, version, lag,
//! rates, breaker and dead letters — from `GET /v1/plugins` and each plugin's last
//! minute of `GET /v1/stats`.

use std::process::ExitCode;

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::Value;

use super::ClientArgs;

/// Stats read at once.
const STATS_READS: usize = 8;

async fn get(client: &ClientArgs, path: &str) -> anyhow::Result<Value> {
    let (url, builder) = client.request(reqwest::Method::GET, path);
    let response = builder
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("{url}: {status}: the answer broke off"))?;
    // An error from something in between (a proxy's 502 page) is not JSON: its status
    // is still the news.
    let body: Option<Value> = serde_json::from_str(&text).ok();
    if !status.is_success() {
        let message = body
            .as_ref()
            .and_then(|body| body["error"]["message"].as_str())
            .unwrap_or(text.trim());
        anyhow::bail!("{url}: {status}: {message}");
    }
    body.with_context(|| format!("{url} did not answer JSON"))
}

/// The mean of the last minute's points of a per-second series.
fn per_second(series: &Value) -> Option<f64> {
    let points: Vec<f64> = series
        .as_array()?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let recent = &points[points.len().saturating_sub(12)..];
    (!recent.is_empty()).then(|| recent.iter().sum::<f64>() / recent.len() as f64)
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Prints the table.
pub(super) async fn status(client: &ClientArgs) -> anyhow::Result<ExitCode> {
    let list = get(client, "/v1/plugins").await?;
    let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
    let rates: Vec<(Option<f64>, Option<f64>)> = futures_util::stream::iter(&plugins)
        .map(|plugin| async move {
            let name = plugin["name"].as_str().unwrap_or_default();
            match get(client, &format!("/v1/stats?window=1m&plugin={name}")).await {
                Ok(stats) => (
                    per_second(&stats["plugin"]["handled_per_s"]),
                    per_second(&stats["plugin"]["failed_per_s"]),
                ),
                Err(_) => (None, None),
            }
        })
        .buffered(STATS_READS)
        .collect()
        .await;
    let mut rows = vec![
        [
            "PLUGIN",
            "STATE",
            "VERSION",
            "LAG",
            "HANDLED/S",
            "FAILED/S",
            "BREAKER",
            "RETRIES",
            "DLQ",
        ]
        .map(str::to_owned),
    ];
    for (plugin, (handled, failed)) in plugins.iter().zip(rates) {
        let state = if plugin["status"] == "failed" {
            "failed".to_owned()
        } else {
            text(&plugin["delivery"]["state"])
        };
        let rate = |rate: Option<f64>| rate.map_or("-".to_owned(), |r| format!("{r:.1}"));
        rows.push([
            text(&plugin["name"]),
            state,
            text(&plugin["version"]),
            text(&plugin["lag"]),
            rate(handled),
            rate(failed),
            text(&plugin["delivery"]["breaker"]["state"]),
            text(&plugin["pending_retries"]),
            text(&plugin["dead_letters"]),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(ExitCode::SUCCESS)
}
