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
//!
//! Housekeeping ([`Artifacts::prune`]): every version of every plugin ever loaded, and
//! every engine the cache was used with, leaves a file, so a host that takes a new
//! version a day (or a developer running `switchyard check` on each build) would fill its
//! disk. A file's modification time is when it was last used: set when it is compiled,
//! mapped again, or found in use by a prune. A prune removes, over every engine's
//! directory (hosts of other versions may share the cache), the files of no plugin loaded
//! in this process ([`ArtifactLease`]) that went unused for `max_unused`, then the least
//! recently used of them while the cache is larger than `max_bytes`, and the leftovers
//! of compiles that died. A file in use is never removed; one removed while another
//! process has it mapped stays valid for that process (the mapping holds it), which
//! compiles it again only if it loads it again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use wasmtime::Engine;
use wasmtime::component::Component;

use super::{CacheStats, LoadErrorReason, RuntimeConfig};

/// How much the compile cache keeps of what no loaded plugin uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// A file unused for this long goes; `None`: no age limit.
    pub max_unused: Option<Duration>,
    /// Above this many bytes, the least recently used files go; `None`: no size limit.
    pub max_bytes: Option<u64>,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_unused: Some(Duration::from_secs(30 * 24 * 60 * 60)),
            max_bytes: Some(2 << 30),
        }
    }
}

/// What a prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Files removed.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes the cache holds after it.
    pub kept_bytes: u64,
}

/// How long a compile's staging files may be left before a prune takes them for a dead
/// compile's.
const STALE_STAGING: Duration = Duration::from_secs(60 * 60);

/// Files of the cache in use by plugins loaded in this process, by name, with how many
/// plugins use each.
type Live = Arc<Mutex<HashMap<String, usize>>>;

/// Keeps a compiled file from being pruned while the plugin loaded from it lives.
#[derive(Debug)]
pub(crate) struct ArtifactLease {
    live: Live,
    file: String,
}

impl Drop for ArtifactLease {
    fn drop(&mut self) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = live.get_mut(&self.file) {
            *count -= 1;
            if *count == 0 {
                live.remove(&self.file);
            }
        }
    }
}

/// The program that compiles a plugin in a child process: `PROGRAM compile-plugin
/// --max-instances N --max-memory-bytes B IN OUT`, with the engine settings of `config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiler {
    /// The `switchyard` binary (usually the running one).
    pub program: PathBuf,
}

#[derive(Debug)]
pub(crate) struct Artifacts {
    /// The cache: a directory per engine.
    root: PathBuf,
    /// This engine's directory.
    dir: PathBuf,
    limits: CacheLimits,
    live: Live,
    compiler: Option<Compiler>,
    max_instances: u32,
    max_memory_bytes: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// What the last prune kept.
    bytes: AtomicU64,
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
            root: cache.to_owned(),
            dir,
            limits: config.compile_cache_limits,
            live: Arc::default(),
            compiler: config.compiler.clone(),
            max_instances: config.max_instances,
            max_memory_bytes: config.max_memory_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    /// The compiled component of `bytes` (whose hash is `sha256`), from the cache or
    /// compiled into it, and the lease that keeps its file while it is in use.
    pub(crate) fn load(
        &self,
        engine: &Engine,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<(Component, ArtifactLease), LoadErrorReason> {
        let file = format!("{sha256}.cwasm");
        let path = self.dir.join(&file);
        let component = self.map_or_compile(engine, sha256, &path, bytes)?;
        *self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(file.clone())
            .or_default() += 1;
        Ok((
            component,
            ArtifactLease {
                live: Arc::clone(&self.live),
                file,
            },
        ))
    }

    fn map_or_compile(
        &self,
        engine: &Engine,
        sha256: &str,
        path: &Path,
        bytes: &[u8],
    ) -> Result<Component, LoadErrorReason> {
        if path.is_file() {
            match map(engine, path) {
                Ok(component) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    touch(path);
                    return Ok(component);
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), "compiled plugin unusable, compiling again: {error:#}");
                    let _ = std::fs::remove_file(path);
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
            std::fs::rename(&partial, path)
                .map_err(|e| LoadErrorReason::Invalid(format!("storing the compiled plugin: {e}")))
        });
        if let Err(error) = stored {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
        map(engine, path).map_err(|e| LoadErrorReason::Invalid(format!("{e:#}")))
    }

    /// Removes what the limits say may go (see the module's header); touches the files
    /// in use, so that other processes sharing the cache see them used.
    pub(crate) fn prune(&self) -> std::io::Result<Pruned> {
        let now = SystemTime::now();
        let live = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut unused = Vec::new();
        let mut others = Vec::new();
        let mut pruned = Pruned::default();
        for engine_dir in std::fs::read_dir(&self.root)? {
            let engine_dir = engine_dir?.path();
            if !engine_dir.is_dir() {
                continue;
            }
            let ours = engine_dir == self.dir;
            for entry in std::fs::read_dir(&engine_dir)? {
                let entry = entry?;
                let metadata = entry.metadata()?;
                if !metadata.is_file() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let age = now.duration_since(metadata.modified()?).unwrap_or_default();
                if ours && live.contains_key(&name) {
                    touch(&entry.path());
                    pruned.kept_bytes += metadata.len();
                } else if name.starts_with('.') {
                    // A compile's staging file: it goes once no compile can still be
                    // writing it.
                    if age > STALE_STAGING && remove(&entry.path()) {
                        pruned.files += 1;
                        pruned.bytes += metadata.len();
                    } else {
                        pruned.kept_bytes += metadata.len();
                    }
                } else {
                    unused.push((age, metadata.len(), entry.path()));
                }
            }
            if !ours {
                others.push(engine_dir);
            }
        }
        // Least recently used first.
        unused.sort_by_key(|(age, _, _)| std::cmp::Reverse(*age));
        let mut total = pruned.kept_bytes + unused.iter().map(|(_, bytes, _)| bytes).sum::<u64>();
        for (age, bytes, path) in unused {
            let too_old = self.limits.max_unused.is_some_and(|max| age > max);
            let too_big = self.limits.max_bytes.is_some_and(|max| total > max);
            if (too_old || too_big) && remove(&path) {
                pruned.files += 1;
                pruned.bytes += bytes;
                total -= bytes;
            }
        }
        pruned.kept_bytes = total;
        self.bytes.store(total, Ordering::Relaxed);
        for engine_dir in others {
            // Gone once empty; a directory with files left fails, and stays.
            let _ = std::fs::remove_dir(engine_dir);
        }
        Ok(pruned)
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

/// Marks a file used now; a file that cannot be touched is only pruned sooner.
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Removes a file of the cache; whether it went (another process may have been first).
fn remove(path: &Path) -> bool {
    std::fs::remove_file(path).is_ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    /// A cache under a temporary directory with these limits.
    fn cache(limits: CacheLimits) -> (tempfile::TempDir, Artifacts) {
        let root = tempfile::tempdir().unwrap();
        let config = RuntimeConfig {
            compile_cache_limits: limits,
            ..RuntimeConfig::default()
        };
        let artifacts = Artifacts::new(&Engine::default(), root.path(), &config).unwrap();
        (root, artifacts)
    }

    /// Writes `bytes` bytes to `path`, last used `age` ago.
    fn file(path: &Path, bytes: usize, age: Duration) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![0u8; bytes]).unwrap();
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    fn age(path: &Path) -> Duration {
        SystemTime::now()
            .duration_since(std::fs::metadata(path).unwrap().modified().unwrap())
            .unwrap_or_default()
    }

    /// Marks `name` in use, as a loaded plugin's lease does.
    fn lease(artifacts: &Artifacts, name: &str) -> ArtifactLease {
        *artifacts
            .live
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default() += 1;
        ArtifactLease {
            live: Arc::clone(&artifacts.live),
            file: name.to_owned(),
        }
    }

    #[test]
    fn a_prune_removes_what_went_unused_too_long_and_keeps_what_is_in_use() {
        let (root, artifacts) = cache(CacheLimits {
            max_unused: Some(30 * DAY),
            max_bytes: None,
        });
        let ours = artifacts.dir.clone();
        let other_engine = root.path().join("0123456789abcdef");
        file(&ours.join("loaded.cwasm"), 100, 60 * DAY);
        file(&ours.join("recent.cwasm"), 100, DAY);
        file(&ours.join("replaced.cwasm"), 100, 40 * DAY);
        file(
            &ours.join(".dead.1.ThreadId(2).part"),
            100,
            2 * STALE_STAGING,
        );
        file(&ours.join(".live.1.ThreadId(3).part"), 100, Duration::ZERO);
        file(&other_engine.join("old.cwasm"), 100, 40 * DAY);
        let _loaded = lease(&artifacts, "loaded.cwasm");

        let pruned = artifacts.prune().unwrap();
        assert_eq!((pruned.files, pruned.bytes), (3, 300));
        assert_eq!(pruned.kept_bytes, 300);
        let mut left: Vec<String> = std::fs::read_dir(&ours)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [".live.1.ThreadId(3).part", "loaded.cwasm", "recent.cwasm"]
        );
        assert!(!other_engine.exists(), "an emptied engine's directory goes");
        assert!(
            age(&ours.join("loaded.cwasm")) < DAY,
            "a file in use is marked used"
        );
    }

    #[test]
    fn above_its_size_the_least_recently_used_go_first_and_a_released_file_may_go() {
        let (_root, artifacts) = cache(CacheLimits {
            max_unused: None,
            max_bytes: Some(2_500),
        });
        let ours = artifacts.dir.clone();
        file(&ours.join("a.cwasm"), 1_000, 3 * DAY);
        file(&ours.join("b.cwasm"), 1_000, 2 * DAY);
        file(&ours.join("c.cwasm"), 1_000, DAY);
        file(&ours.join("in-use.cwasm"), 1_000, 5 * DAY);
        let in_use = lease(&artifacts, "in-use.cwasm");

        let pruned = artifacts.prune().unwrap();
        assert_eq!((pruned.files, pruned.kept_bytes), (2, 2_000));
        assert!(!ours.join("a.cwasm").exists() && !ours.join("b.cwasm").exists());
        assert!(ours.join("c.cwasm").exists() && ours.join("in-use.cwasm").exists());

        // The prune marked the file in use as used; released (its plugin replaced), it
        // goes by when it was last used, like any other.
        drop(in_use);
        assert!(artifacts.live.lock().unwrap().is_empty());
        file(&ours.join("d.cwasm"), 1_000, Duration::ZERO);
        file(&ours.join("e.cwasm"), 1_000, Duration::ZERO);
        let pruned = artifacts.prune().unwrap();
        assert_eq!((pruned.files, pruned.kept_bytes), (2, 2_000));
        assert!(!ours.join("c.cwasm").exists());
        assert!(!ours.join("in-use.cwasm").exists());
        assert!(ours.join("d.cwasm").exists() && ours.join("e.cwasm").exists());
    }
}
