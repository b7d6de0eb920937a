//! Compiled plugins on disk, mapped into memory rather than read into it.
//!
//! A plugin is compiled once per file contents and engine settings into
//! `<cache>/<engine fingerprint>/<sha256>.cwasm`; every load after that maps the file.
//! Mapped code is backed by the page cache: only the pages a plugin runs are resident,
//! and the kernel can drop them again, so a host with many large plugins (an interpreter
//! such as Python's is tens of megabytes of code) stays small.
//!
//! Compiling a large component takes hundreds of megabytes at its peak, which the
//! allocator keeps once it is freed. With a [`Compiler`] configured the compile therefore
//! runs in a child process (`switchyard compile-plugin`), whose memory goes back to the
//! system when it exits; without one (tests, embedders) it runs in this process.
//!
//! Invariant: an artifact file appears only whole (written beside it, then renamed), and a
//! file that does not deserialize is removed and compiled again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::Engine;
use wasmtime::component::Component;

use super::{CacheStats, LoadErrorReason, RuntimeConfig};

/// The program that compiles a plugin in a child process: `PROGRAM compile-plugin
/// --max-instances N --max-memory-bytes B IN OUT`, with the engine settings of `config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiler {
    /// The `switchyard` binary (usually the running one).
    pub program: PathBuf,
}

#[derive(Debug)]
pub(crate) struct Artifacts {
    dir: PathBuf,
    compiler: Option<Compiler>,
    max_instances: u32,
    max_memory_bytes: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Artifacts {
    pub(crate) fn new(
        engine: &Engine,
        cache: &Path,
        config: &RuntimeConfig,
    ) -> std::io::Result<Self> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = cache.join(format!("{:016x}", hasher.finish()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            compiler: config.compiler.clone(),
            max_instances: config.max_instances,
            max_memory_bytes: config.max_memory_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// The compiled component of `bytes` (whose hash is `sha256`), from the cache or
    /// compiled into it.
    pub(crate) fn load(
        &self,
        engine: &Engine,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<Component, LoadErrorReason> {
        let path = self.dir.join(format!("{sha256}.cwasm"));
        if path.is_file() {
            match map(engine, &path) {
                Ok(component) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(component);
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), "compiled plugin unusable, compiling again: {error:#}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let partial = self.dir.join(format!(
            ".{sha256}.{}.{:?}.part",
            std::process::id(),
            std::thread::current().id()
        ));
        let compiled = match &self.compiler {
            Some(compiler) => self.compile_in_child(compiler, bytes, &partial),
            None => compile_to_file(engine, bytes, &partial),
        };
        let stored = compiled.and_then(|()| {
            std::fs::rename(&partial, &path)
                .map_err(|e| LoadErrorReason::Invalid(format!("storing the compiled plugin: {e}")))
        });
        if let Err(error) = stored {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
        map(engine, &path).map_err(|e| LoadErrorReason::Invalid(format!("{e:#}")))
    }

    fn compile_in_child(
        &self,
        compiler: &Compiler,
        bytes: &[u8],
        out: &Path,
    ) -> Result<(), LoadErrorReason> {
        let input = out.with_extension("wasm");
        std::fs::write(&input, bytes).map_err(|e| {
            LoadErrorReason::Invalid(format!("staging the plugin for its compile: {e}"))
        })?;
        let output = Command::new(&compiler.program)
            .arg("compile-plugin")
            .arg("--max-instances")
            .arg(self.max_instances.to_string())
            .arg("--max-memory-bytes")
            .arg(self.max_memory_bytes.to_string())
            .arg(&input)
            .arg(out)
            .output();
        let _ = std::fs::remove_file(&input);
        let output = output.map_err(|e| {
            LoadErrorReason::Invalid(format!(
                "cannot start the compiler {}: {e}",
                compiler.program.display()
            ))
        })?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr
            .trim()
            .strip_prefix("error: ")
            .unwrap_or(stderr.trim());
        Err(LoadErrorReason::Invalid(
            reason
                .strip_prefix("invalid component: ")
                .unwrap_or(reason)
                .to_owned(),
        ))
    }
}

/// Compiles `bytes` for `engine` into the file `out`.
pub(crate) fn compile_to_file(
    engine: &Engine,
    bytes: &[u8],
    out: &Path,
) -> Result<(), LoadErrorReason> {
    let compiled = engine
        .precompile_component(bytes)
        .map_err(|e| LoadErrorReason::Invalid(format!("{e:#}")))?;
    std::fs::write(out, compiled)
        .map_err(|e| LoadErrorReason::Invalid(format!("storing the compiled plugin: {e}")))
}

/// Maps a compiled component.
#[allow(unsafe_code)]
fn map(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: the file is one this host's binary compiled, from a component it was given,
    // into the host's own data directory, and renamed into place only once whole; wasmtime
    // checks its header and that it was compiled for an engine like this one. Whoever
    // could change it could already change the host itself.
    unsafe { Component::deserialize_file(engine, path) }
}
