//! The bare baselines: what the same work costs with nothing of Switchyard around it.
//!
//! - a wasmtime loop that instantiates and calls the component exactly as the runtime does
//!   (pooling allocator, a WASI context per instance, async calls), without fuel, epochs,
//!   limits, effect buffers or a dispatcher;
//! - a SQLite insert loop with the log's durability settings (WAL, `synchronous = FULL`);
//! - an axum route that reads the body and answers `202`, run as a separate process like
//!   the host.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// The flag that turns this binary into the bare HTTP server.
pub const SERVER_FLAG: &str = "--bare-http-server";

mod world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "switchyard:plugin/plugin",
        exports: { default: async },
    });
}

use world::switchyard::plugin::types;

struct BareState {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for BareState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Calls per second of a bare loop over `calls` calls of the component at `path`: a fresh
/// store and instance per call (`fresh = true`) or one instance for every call.
pub async fn wasmtime_loop(path: &Path, calls: u32, fresh: bool) -> anyhow::Result<f64> {
    bare_wasmtime_loop(path, calls, fresh)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

async fn bare_wasmtime_loop(path: &Path, calls: u32, fresh: bool) -> wasmtime::Result<f64> {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(64)
        .total_core_instances(256)
        .total_memories(128)
        .total_tables(256)
        .total_stacks(64)
        .max_memory_size(64 << 20);
    // Slots are cleaned for reuse the way the host cleans them.
    switchyard_host::runtime::pool_reuse(&mut pool);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&config)?;
    let component = Component::from_file(&engine, path)?;
    let mut linker = Linker::<BareState>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    // The trivial plugin never calls the Switchyard host interface.
    linker.define_unknown_imports_as_traps(&component)?;
    let pre = world::PluginPre::new(linker.instantiate_pre(&component)?)?;
    let event = types::Event {
        id: "e".into(),
        source: "/bench".into(),
        type_: "bench.tick".into(),
        subject: None,
        time: None,
        datacontenttype: Some("application/json".into()),
        dataschema: None,
        data: b"{}".to_vec(),
        extensions: Vec::new(),
    };
    let new_store = || {
        let wasi = WasiCtxBuilder::new()
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        Store::new(
            &engine,
            BareState {
                wasi,
                table: ResourceTable::new(),
            },
        )
    };
    let mut store = new_store();
    let mut instance = pre.instantiate_async(&mut store).await?;
    let started = Instant::now();
    for n in 0..calls {
        if fresh {
            store = new_store();
            instance = pre.instantiate_async(&mut store).await?;
        }
        let delivery = types::Delivery {
            attempt: 1,
            max_attempts: 1,
            sequence: u64::from(n),
        };
        instance
            .switchyard_plugin_handler()
            .call_handle(&mut store, &event, delivery)
            .await?
            .map_err(|e| wasmtime::Error::msg(format!("the plugin failed: {e:?}")))?;
    }
    Ok(f64::from(calls) / started.elapsed().as_secs_f64())
}

/// Rows per second of a bare insert loop with the log's durability: `rows` rows of
/// `payload` bytes, committed `per_commit` at a time, stopping early at `deadline`.
pub fn sqlite_loop(
    dir: &Path,
    rows: usize,
    per_commit: usize,
    payload: &[u8],
    deadline: Duration,
) -> anyhow::Result<f64> {
    let conn = rusqlite::Connection::open(dir.join("bare.db"))?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, data BLOB NOT NULL)",
    )?;
    let started = Instant::now();
    let mut written = 0;
    while written < rows && started.elapsed() < deadline {
        let tx = conn.unchecked_transaction()?;
        {
            let mut insert = tx.prepare_cached("INSERT INTO events (id, data) VALUES (?1, ?2)")?;
            for _ in 0..per_commit {
                insert.execute(rusqlite::params![format!("e{written}"), payload])?;
                written += 1;
            }
        }
        tx.commit()?;
    }
    Ok(written as f64 / started.elapsed().as_secs_f64())
}

/// Runs the bare HTTP server: prints `listening on ADDR`, then answers `202` to every
/// POST under `/v1/events` after reading its body, until killed.
pub fn serve_http() -> anyhow::Result<()> {
    use axum::Router;
    use axum::body::Bytes;
    use axum::http::StatusCode;
    use axum::routing::post;

    async fn accept(body: Bytes) -> (StatusCode, &'static str) {
        std::hint::black_box(body);
        (StatusCode::ACCEPTED, "{\"accepted\":[]}")
    }

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let app = Router::new()
            .route("/v1/events", post(accept))
            .route("/v1/events/{type}", post(accept));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening on {}", listener.local_addr()?);
        axum::serve(listener, app).await.context("serving")
    })
}
