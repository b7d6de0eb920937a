//! Test plugin that misbehaves on purpose; the event type picks the misbehaviour.
//!
//! Subscribes to `hostile.>`. The integration tests use it to check that the host contains
//! runaway, crashing and greedy handlers and keeps its transactional promises. See
//! [`handle`] for the list of behaviours.
//!
//! Two sidecar `[config]` keys let a test aim one behaviour at any event type:
//! `behaviour` replaces the event type when picking the behaviour, and `sleep_ms` makes
//! every call sleep that long first (a slow but healthy plugin).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use switchyard_sdk::{Delivery, Emit, Event, HandlerError, config, emit_json, handler, kv};

const MIB: usize = 1024 * 1024;

/// Does what the event type asks:
///
/// | type | behaviour |
/// |---|---|
/// | `hostile.ok` | `Ok(())` |
/// | `hostile.loop` | spins forever |
/// | `hostile.memory` | allocates and touches 1 MiB blocks forever |
/// | `hostile.panic` | panics (a trap) |
/// | `hostile.sleep` | sleeps for an hour |
/// | `hostile.env` | rejects with `environment is empty` unless it sees environment variables |
/// | `hostile.emit-flood` | emits 100 000 events |
/// | `hostile.emit-huge` | emits one event with 1.5 MiB of data |
/// | `hostile.kv-huge` | writes a 1.5 MiB KV value |
/// | `hostile.emit-wide` | emits three events of empty data, each with a 512 KiB extension |
/// | `hostile.kv-many` | writes twenty 1 MiB KV values |
/// | `hostile.read-many` | reads 10 001 distinct KV keys |
/// | `hostile.emit-aliased` | emits an event whose four extension values are one 1 MiB string of its memory (the host would copy it four times) |
/// | `hostile.retry` / `hostile.reject` | returns that error |
/// | `hostile.effects-then-retry` | emits and writes KV, then asks for a retry |
/// | `hostile.effects-then-trap` | emits and writes KV, then panics |
/// | `hostile.kv-read-own-write` | checks that KV reads see the call's own writes |
/// | `hostile.config` | rejects with `greeting=<config value of greeting as {:?}>` |
/// | `hostile.instance-calls` | rejects with `calls=<n>`, the calls this instance has handled, this one included (a counter in linear memory) |
/// | `hostile.stdout` | prints a line to stdout and one to stderr |
/// | `hostile.fail-until` | asks for a retry on attempts 1 and 2; from attempt 3 records `recovered/<id>` = the attempt in KV and emits `hostile.recovered` |
/// | `hostile.needs-fix` | asks for a retry unless config `fixed` is `true`; then records `fixed/<id>` in KV |
/// | `hostile.count` | records `seen/<id>` = config `tag` (default `1`) in KV, adds one to the counter `total/<0-15>` and emits `hostile.counted` with the id and tag |
/// | `hostile.kv-pair` | writes `a/<id>` and `b/<id>` in KV, reading nothing; nothing when config `writes` is `off` |
/// | `hostile.kv-delete` | deletes `a/<id>` from KV, the id without a `del-` prefix (the pair of `hostile.kv-pair`'s event `<id>`) |
/// | `hostile.echo` | emits an event of the type it is handling: an endless causation chain |
/// | `hostile.sequence` | appends the data's `n` to the list at `order/<partitionkey>`; asks for one retry first when the data has `"fail_once": true` |
/// | `hostile.kv-and-stream` | writes `mixed/<id>` in KV and appends `hostile.appended` to the stream `ledger` at the version it reads |
/// | `hostile.slow-read` | reads `hot`, sleeps config `read_ms` (default 100) ms, then records `seen/<id>` = what it read: it conflicts while `hostile.bump` events commit |
/// | `hostile.bump` | writes its id to `hot`, reading nothing (so bumps never conflict with each other) |
/// | `hostile.emit-traceparent` | emits `hostile.traced` with the extension `traceparent` set to the data (a JSON string) |
/// | `hostile.mirror` | emits `hostile.mirrored` whose JSON data holds every field of the event it received (`data` as an array of bytes, `extensions` as name/value pairs) and its delivery |
/// | `hostile.wasi-resources` | makes the data's `n` (a JSON number) WASI timers and never drops them, each an entry of the host's resource table, then succeeds |
/// | `hostile.burn` | counts to the data's `n` (a JSON number), burning fuel in proportion, then succeeds |
/// | `hostile.cancel-slowly` | reads `hot`, cancels the scheduled event whose id is the data (a JSON string), sleeps config `cancel_ms` (default 0) ms, then records `cancel/<that id>` = `cancelled` or, if the cancel found nothing pending, `too-late` |
/// | `hostile.schedule-cancel` | schedules `hostile.later` an hour ahead and cancels it, then emits `hostile.after-cancel`; rejects if the cancel found nothing or the new emit got the cancelled one's id |
/// Calls this instance has handled; a fresh instance starts from zero.
static INSTANCE_CALLS: AtomicU64 = AtomicU64::new(0);

#[handler(subscribe = ["hostile.>"])]
fn handle(event: Event, delivery: Delivery) -> Result<(), HandlerError> {
    if let Some(ms) = config::get_parsed::<u64>("sleep_ms")? {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let behaviour = config::get("behaviour").unwrap_or_else(|| event.type_.clone());
    match behaviour.as_str() {
        "hostile.ok" => Ok(()),
        "hostile.loop" => spin(),
        "hostile.burn" => {
            let n: u64 = event.json()?;
            let mut counter = 0u64;
            for _ in 0..n {
                counter = black_box(counter.wrapping_add(1));
            }
            black_box(counter);
            Ok(())
        }
        "hostile.wasi-resources" => {
            let n: u64 = event.json()?;
            for _ in 0..n {
                std::mem::forget(wasip2::clocks::monotonic_clock::subscribe_duration(
                    3_600_000_000_000,
                ));
            }
            Ok(())
        }
        "hostile.memory" => hoard(),
        "hostile.panic" => crash("hostile plugin panicked on purpose"),
        "hostile.sleep" => {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(())
        }
        "hostile.env" => Err(environment()),
        "hostile.emit-flood" => {
            for n in 0..100_000u32 {
                emit_json("hostile.flood", &json!({ "n": n }))?;
            }
            Ok(())
        }
        "hostile.mirror" => {
            emit_json(
                "hostile.mirrored",
                &json!({
                    "id": event.id,
                    "source": event.source,
                    "type": event.type_,
                    "subject": event.subject,
                    "time": event.time,
                    "datacontenttype": event.datacontenttype,
                    "dataschema": event.dataschema,
                    "data": event.data,
                    "extensions": event.extensions,
                    "attempt": delivery.attempt,
                    "max_attempts": delivery.max_attempts,
                    "sequence": delivery.sequence,
                }),
            )?;
            Ok(())
        }
        "hostile.emit-traceparent" => {
            let traceparent: String = event.json()?;
            Emit::new("hostile.traced")
                .extension("traceparent", traceparent)
                .send();
            Ok(())
        }
        "hostile.emit-huge" => {
            Emit::new("hostile.huge")
                .bytes("application/octet-stream", vec![b'x'; MIB + MIB / 2])
                .send();
            Ok(())
        }
        "hostile.kv-huge" => {
            kv::set("big", &vec![7u8; MIB + MIB / 2]);
            Ok(())
        }
        "hostile.emit-wide" => {
            for n in 0..3 {
                Emit::new("hostile.wide")
                    .extension("padding", "p".repeat(MIB / 2))
                    .json(&json!({ "n": n }))?
                    .send();
            }
            Ok(())
        }
        "hostile.kv-many" => {
            for n in 0..20 {
                kv::set(&format!("many/{n}"), &vec![1u8; MIB]);
            }
            Ok(())
        }
        "hostile.read-many" => {
            for n in 0..10_001 {
                black_box(kv::get(&format!("absent/{n}")));
            }
            Ok(())
        }
        "hostile.emit-aliased" => emit_aliased(),
        "hostile.retry" => Err(HandlerError::retry("try again later")),
        "hostile.reject" => Err(HandlerError::reject("bad event")),
        // A rejection whose message is larger than the bus's largest message.
        "hostile.reject-loud" => Err(HandlerError::reject("!".repeat(2 << 20))),
        "hostile.effects-then-retry" => {
            effects()?;
            Err(HandlerError::retry("failed after effects"))
        }
        "hostile.effects-then-trap" => {
            effects()?;
            crash("trap after effects")
        }
        "hostile.kv-read-own-write" => kv_read_own_write(),
        "hostile.instance-calls" => {
            let calls = INSTANCE_CALLS.fetch_add(1, Ordering::Relaxed) + 1;
            Err(HandlerError::reject(format!("calls={calls}")))
        }
        "hostile.config" => Err(HandlerError::reject(format!(
            "greeting={:?}",
            config::get("greeting")
        ))),
        "hostile.stdout" => {
            println!("hello from stdout");
            eprintln!("hello from stderr");
            Ok(())
        }
        "hostile.fail-until" => {
            if delivery.attempt < 3 {
                return Err(HandlerError::retry(format!(
                    "attempt {} fails",
                    delivery.attempt
                )));
            }
            kv::set(
                &format!("recovered/{}", event.id),
                delivery.attempt.to_string().as_bytes(),
            );
            emit_json("hostile.recovered", &json!({ "id": event.id }))?;
            Ok(())
        }
        "hostile.needs-fix" => {
            if config::get("fixed").as_deref() != Some("true") {
                return Err(HandlerError::retry("not fixed yet"));
            }
            kv::set(&format!("fixed/{}", event.id), b"yes");
            Ok(())
        }
        "hostile.sequence" => sequence(&event, &delivery),
        "hostile.count" => count(&event),
        "hostile.kv-pair" => {
            if config::get("writes").as_deref() != Some("off") {
                kv::set(&format!("a/{}", event.id), b"1");
                kv::set(&format!("b/{}", event.id), b"1");
            }
            Ok(())
        }
        "hostile.kv-delete" => {
            let pair = event.id.strip_prefix("del-").unwrap_or(&event.id);
            kv::delete(&format!("a/{pair}"));
            Ok(())
        }
        "hostile.fold" => {
            let page = switchyard_sdk::stream::read_at_most("ledger", 2)?;
            kv::set(
                &format!("folded/{}", event.id),
                page.events.len().to_string().as_bytes(),
            );
            Ok(())
        }
        "hostile.kv-and-stream" => {
            kv::set(&format!("mixed/{}", event.id), b"1");
            Emit::new("hostile.appended")
                .subject("ledger")
                .expected_version(switchyard_sdk::stream::version("ledger"))
                .json(&json!({ "id": event.id }))?
                .send();
            Ok(())
        }
        // Appends to `ledger` expecting the version the event's data names (as a
        // command carrying its client's version would), whatever the stream is at.
        "hostile.append-expecting" => {
            let data: serde_json::Value = event.json()?;
            Emit::new("hostile.appended")
                .subject("ledger")
                .expected_version(data["expected"].as_u64().unwrap_or(0))
                .json(&json!({ "id": event.id }))?
                .send();
            Ok(())
        }
        "hostile.slow-read" => {
            let hot = kv::get("hot").unwrap_or_else(|| b"0".to_vec());
            let read_ms = config::get_parsed::<u64>("read_ms")?.unwrap_or(100);
            std::thread::sleep(Duration::from_millis(read_ms));
            kv::set(&format!("seen/{}", event.id), &hot);
            Ok(())
        }
        "hostile.bump" => {
            kv::set("hot", event.id.as_bytes());
            Ok(())
        }
        "hostile.cancel-slowly" => {
            let _ = kv::get("hot");
            let timer: String = event.json()?;
            let cancelled = switchyard_sdk::cancel_scheduled(&timer);
            let cancel_ms = config::get_parsed::<u64>("cancel_ms")?.unwrap_or(0);
            std::thread::sleep(Duration::from_millis(cancel_ms));
            let outcome = if cancelled { "cancelled" } else { "too-late" };
            kv::set(&format!("cancel/{timer}"), outcome.as_bytes());
            Ok(())
        }
        "hostile.schedule-cancel" => {
            let later = Emit::new("hostile.later")
                .delay(Duration::from_secs(3600))
                .send();
            if !switchyard_sdk::cancel_scheduled(&later) {
                return Err(HandlerError::reject(
                    "cancelling the call's own schedule found nothing",
                ));
            }
            let after = emit_json("hostile.after-cancel", &json!({}))?;
            if after == later {
                return Err(HandlerError::reject(
                    "the cancelled schedule's id was handed out again",
                ));
            }
            Ok(())
        }
        "hostile.echo" => {
            emit_json(&event.type_, &json!({ "echo": true }))?;
            Ok(())
        }
        other => Err(HandlerError::reject(format!(
            "unknown hostile behaviour: {other}"
        ))),
    }
}

/// Appends `n` to the per-key list, by read-modify-write: only correct when the host
/// keeps one event per key in flight.
fn sequence(event: &Event, delivery: &Delivery) -> Result<(), HandlerError> {
    let data: serde_json::Value = event.json()?;
    if data["fail_once"] == json!(true) && delivery.attempt == 1 {
        return Err(HandlerError::retry("failing the first attempt on purpose"));
    }
    let key = format!("order/{}", event.partition_key().unwrap_or("none"));
    let mut list: Vec<u64> = kv::get_json(&key)?.unwrap_or_default();
    list.push(data["n"].as_u64().unwrap_or(u64::MAX));
    kv::set_json(&key, &list)
}

/// Records the event once per successful attempt: an idempotent marker, a counter that
/// would show a second commit, and a follow-up event naming the plugin version's tag.
fn count(event: &Event) -> Result<(), HandlerError> {
    let tag = config::get("tag").unwrap_or_else(|| "1".to_owned());
    kv::set(&format!("seen/{}", event.id), tag.as_bytes());
    let shard = event
        .id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % 16;
    let key = format!("total/{shard}");
    let total: u64 = kv::get_json(&key)?.unwrap_or(0);
    kv::set_json(&key, &(total + 1))?;
    emit_json("hostile.counted", &json!({ "id": event.id, "tag": tag }))?;
    Ok(())
}

/// Emits an event whose extension values all point at one string of the guest's memory,
/// which the host copies once per entry. The host refuses the call before it returns, so
/// the aliases are never dropped.
#[allow(unsafe_code)]
fn emit_aliased() -> Result<(), HandlerError> {
    let mut shared = std::mem::ManuallyDrop::new("a".repeat(MIB));
    let (ptr, len, capacity) = (shared.as_mut_ptr(), shared.len(), shared.capacity());
    let mut emit = Emit::new("hostile.aliased");
    for n in 0..4 {
        // SAFETY: none of these strings is ever dropped or written: the host stops the call
        // inside `send`.
        let alias = unsafe { String::from_raw_parts(ptr, len, capacity) };
        emit = emit.extension(format!("alias{n}"), alias);
    }
    emit.send();
    Err(HandlerError::reject(
        "the host took an emit of four aliased 1 MiB strings",
    ))
}

/// Loops forever in a way the optimiser cannot remove.
fn spin() -> ! {
    let mut counter = 0u64;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Allocates 1 MiB blocks, writes every byte of each, and never frees them.
fn hoard() -> ! {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = Vec::with_capacity(MIB);
        block.resize(MIB, black_box(0xA5u8));
        blocks.push(black_box(block));
    }
}

/// Traps the component with a panic.
#[allow(clippy::panic)]
fn crash(message: &str) -> ! {
    panic!("{message}")
}

/// Says whether any environment variable is visible.
fn environment() -> HandlerError {
    let home = std::env::var("HOME");
    let count = std::env::vars().count();
    if home.is_ok() || count > 0 {
        HandlerError::reject(format!(
            "saw environment: HOME={home:?}, {count} variable(s)"
        ))
    } else {
        HandlerError::reject("environment is empty")
    }
}

/// Buffers one emitted event and one KV write.
fn effects() -> Result<(), HandlerError> {
    emit_json("hostile.emitted", &json!({ "n": 1 }))?;
    kv::set("written", b"yes");
    Ok(())
}

/// Checks that KV reads see the call's own buffered writes and deletes; leaves `k` = `v2`.
fn kv_read_own_write() -> Result<(), HandlerError> {
    let fail = |what: &str| Err(HandlerError::reject(format!("kv check failed: {what}")));
    kv::set("k", b"v1");
    if kv::get("k").as_deref() != Some(b"v1".as_slice()) {
        return fail("get after set did not return v1");
    }
    if !kv::keys("").iter().any(|key| key == "k") {
        return fail("keys(\"\") after set did not list k");
    }
    kv::delete("k");
    if kv::get("k").is_some() {
        return fail("get after delete still returned a value");
    }
    if kv::keys("").iter().any(|key| key == "k") {
        return fail("keys(\"\") after delete still listed k");
    }
    kv::set("k", b"v2");
    Ok(())
}
