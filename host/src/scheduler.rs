//! The scheduler task of `serve`: appends scheduled events to the log when they are due.
//!
//! It asks the bus to fire what is due ([`Schedules::fire_due`]) in batches, then sleeps
//! until the next due time, at most [`TICK`], so an event scheduled by another host or
//! another call is seen within a tick. The bus makes firing exact (once per event, also
//! with several hosts); the task only decides when to ask.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::bus::Bus;
use crate::clock::now_ms;
use crate::metrics::Metrics;

/// Longest sleep between two looks for due events.
const TICK: Duration = Duration::from_millis(200);
/// Most events appended by one call to the bus.
const FIRE_BATCH: usize = 1000;
/// How often the pending count is read for the metric.
const COUNT_EVERY: Duration = Duration::from_secs(5);
/// The wait after the bus failed, before trying again.
const AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Runs until `stop` turns true.
pub async fn run(bus: Arc<dyn Bus>, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let mut counted_at: Option<tokio::time::Instant> = None;
    let mut failing = false;
    loop {
        let sleep = match bus.fire_due(FIRE_BATCH).await {
            Ok(fired) => {
                if failing {
                    tracing::info!("the scheduler reaches the log again");
                    failing = false;
                }
                metrics.scheduled_fired(&fired.lags_ms);
                if !fired.lags_ms.is_empty() {
                    counted_at = None;
                }
                if fired.more {
                    Duration::ZERO
                } else {
                    fired.next_due_ms.map_or(TICK, |due| {
                        let wait = u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0);
                        Duration::from_millis(wait).min(TICK)
                    })
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "the scheduler cannot fire due events; retrying");
                    failing = true;
                }
                AFTER_FAILURE
            }
        };
        if counted_at.is_none_or(|at| at.elapsed() >= COUNT_EVERY) {
            if let Ok(pending) = bus.scheduled_count().await {
                metrics.scheduled_pending(pending);
            }
            counted_at = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
