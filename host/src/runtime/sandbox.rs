//! What a plugin's reach outside its sandbox meets: an empty filesystem, no sockets, no
//! outgoing HTTP.
//!
//! Components from stock toolchains (componentize-py, componentize-js) import the whole
//! of WASI, so the host links every WASI interface it can make safe and answers the
//! dangerous calls itself:
//! - `wasi:filesystem`: the one preopened directory, `/`, is an empty directory that no
//!   longer has a path on the host (it is removed right after it is opened), and every
//!   `open-at` is refused with `access`. Nothing on the host is ever named.
//! - `wasi:sockets`: creating a TCP or UDP socket and resolving a name are refused with
//!   `access-denied` before any socket exists.
//! - `wasi:http/outgoing-handler`: every request is answered `HTTP-request-denied`
//!   without a connection.
//!
//! Each refused attempt fails inside the guest as a normal error (an `OSError` in Python,
//! a rejected `fetch` in JavaScript), is logged once with the plugin's name and counted
//! in [`Refusals`].

use std::collections::HashSet;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, Val};
use wasmtime_wasi::filesystem::{Descriptor, Dir};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    DescriptorFlags, ErrorCode as FsErrorCode, OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::bindings::sockets::network::{
    ErrorCode as SocketErrorCode, IpAddressFamily,
};
use wasmtime_wasi::p2::{TcpSocket, UdpSocket};
use wasmtime_wasi::{FsPerms, OpenMode};

use super::host::{HostState, truncate};

/// The WASI version whose names the shadowing definitions below use; the linker matches
/// them to any `0.2.x` import.
const WASI: &str = "0.2.12";

/// What a plugin tried to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Opening a file or directory.
    File,
    /// Creating a socket or resolving a host name.
    Socket,
    /// An outgoing HTTP request.
    Http,
}

impl Access {
    /// Every kind, in the order [`Refusals::counts`] reports them.
    pub const ALL: [Access; 3] = [Access::File, Access::Socket, Access::Http];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::File => "file",
            Access::Socket => "socket",
            Access::Http => "http",
        }
    }

    /// Its place in [`Access::ALL`].
    fn index(self) -> usize {
        self as usize
    }
}

/// How many attempts of each [`Access`] one plugin has had refused since it was loaded.
///
/// Each distinct attempt (kind and target) is logged once, up to [`LOGGED_TARGETS`] of
/// them, so that a plugin retrying in a loop cannot flood the log; all are counted.
#[derive(Debug, Default)]
pub struct Refusals {
    counts: [AtomicU64; 3],
    logged: Mutex<HashSet<(Access, String)>>,
}

/// Distinct refused attempts logged per plugin; the rest are only counted.
const LOGGED_TARGETS: usize = 64;
/// Longest target of a refused attempt kept and logged.
const MAX_TARGET_BYTES: usize = 256;

impl Refusals {
    /// The counts, in the order of [`Access::ALL`].
    pub fn counts(&self) -> [(Access, u64); 3] {
        Access::ALL.map(|access| (access, self.counts[access.index()].load(Ordering::Relaxed)))
    }

    /// Counts and logs one refused attempt of `plugin`.
    pub(crate) fn refuse(&self, plugin: &str, access: Access, what: &str) {
        self.counts[access.index()].fetch_add(1, Ordering::Relaxed);
        // The target is the plugin's string (a path, a host name): kept and logged cut.
        let what = truncate(what, MAX_TARGET_BYTES);
        {
            let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
            if logged.len() >= LOGGED_TARGETS || !logged.insert((access, what.to_owned())) {
                return;
            }
        }
        tracing::warn!(
            target: "switchyard::plugin",
            plugin,
            access = access.as_str(),
            "refused {what}: plugins have no {} access",
            match access {
                Access::File => "filesystem",
                Access::Socket | Access::Http => "network",
            }
        );
    }
}

/// The empty directory every plugin sees as `/`: opened once, then removed, so that it
/// has no path on the host and nothing can ever be created in it.
#[derive(Debug)]
pub(crate) struct EmptyRoot(File);

impl EmptyRoot {
    pub(crate) fn new() -> std::io::Result<Self> {
        let dir = fresh_dir()?;
        let file = File::open(&dir);
        std::fs::remove_dir(&dir)?;
        Ok(Self(file?))
    }

    fn descriptor(&self) -> std::io::Result<Descriptor> {
        Ok(Descriptor::Dir(Dir::new(
            self.0.try_clone()?,
            FsPerms::ReadOnly,
            OpenMode::READ,
            false,
        )))
    }
}

/// A new, empty directory under the system's temporary directory.
fn fresh_dir() -> std::io::Result<std::path::PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0u32..100 {
        let dir = base.join(format!(
            "switchyard-empty-root-{}-{}-{attempt}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("cannot create an empty directory"))
}

/// Replaces the WASI functions that reach outside with the refusals described above.
pub(crate) fn link(linker: &mut Linker<HostState>, root: Arc<EmptyRoot>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker
        .instance(&format!("wasi:filesystem/preopens@{WASI}"))?
        .func_wrap(
            "get-directories",
            move |mut store: StoreContextMut<'_, HostState>, (): ()| {
                let descriptor = root.descriptor()?;
                let handle = store.data_mut().table_mut().push(descriptor)?;
                Ok((vec![(handle, "/".to_owned())],))
            },
        )?;
    linker
        .instance(&format!("wasi:filesystem/types@{WASI}"))?
        .func_wrap(
            "[method]descriptor.open-at",
            |store: StoreContextMut<'_, HostState>,
             (_dir, _flags, path, _open, _descriptor): (
                Resource<Descriptor>,
                PathFlags,
                String,
                OpenFlags,
                DescriptorFlags,
            )| {
                store
                    .data()
                    .refuse(Access::File, &format!("opening `{path}`"));
                Ok((Err::<Resource<Descriptor>, _>(FsErrorCode::Access),))
            },
        )?;
    linker
        .instance(&format!("wasi:sockets/tcp-create-socket@{WASI}"))?
        .func_wrap(
            "create-tcp-socket",
            |store: StoreContextMut<'_, HostState>, (_family,): (IpAddressFamily,)| {
                store.data().refuse(Access::Socket, "a TCP socket");
                Ok((Err::<Resource<TcpSocket>, _>(SocketErrorCode::AccessDenied),))
            },
        )?;
    linker
        .instance(&format!("wasi:sockets/udp-create-socket@{WASI}"))?
        .func_wrap(
            "create-udp-socket",
            |store: StoreContextMut<'_, HostState>, (_family,): (IpAddressFamily,)| {
                store.data().refuse(Access::Socket, "a UDP socket");
                Ok((Err::<Resource<UdpSocket>, _>(SocketErrorCode::AccessDenied),))
            },
        )?;
    // The stream resource this returns is private to wasmtime-wasi, so the refusal is
    // defined with dynamic values.
    linker
        .instance(&format!("wasi:sockets/ip-name-lookup@{WASI}"))?
        .func_new_async(
            "resolve-addresses",
            |mut store: StoreContextMut<'_, HostState>,
             _ty,
             params: &[Val],
             results: &mut [Val]| {
                Box::new(async move {
                    // The network is lent for the call; a dynamic function gives it back.
                    if let Some(Val::Resource(network)) = params.first() {
                        network.resource_drop_async(&mut store).await?;
                    }
                    let name = match params.get(1) {
                        Some(Val::String(name)) => name.as_str(),
                        _ => "a host name",
                    };
                    store
                        .data()
                        .refuse(Access::Socket, &format!("resolving `{name}`"));
                    if let Some(result) = results.first_mut() {
                        *result =
                            Val::Result(Err(Some(Box::new(Val::Enum("access-denied".to_owned())))));
                    }
                    Ok(())
                })
            },
        )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_empty_root_has_no_path_and_no_entries() {
        use std::os::fd::AsRawFd;
        let root = EmptyRoot::new().unwrap();
        let link = format!("/proc/self/fd/{}", root.0.as_raw_fd());
        // The directory was removed once opened: no path on the host leads to it.
        let target = std::fs::read_link(&link).unwrap();
        assert!(
            target.to_string_lossy().ends_with(" (deleted)"),
            "{target:?}"
        );
        // It can still be listed through its descriptor, and it is empty.
        assert_eq!(std::fs::read_dir(&link).unwrap().count(), 0);
        assert!(root.descriptor().is_ok());
    }

    #[test]
    fn refusals_are_counted_every_time_and_logged_once_per_target() {
        let refusals = Refusals::default();
        for _ in 0..3 {
            refusals.refuse("p", Access::File, "opening `etc/passwd`");
        }
        refusals.refuse("p", Access::Http, "GET http://example.com/");
        assert_eq!(
            refusals.counts(),
            [(Access::File, 3), (Access::Socket, 0), (Access::Http, 1)]
        );
        let logged = refusals.logged.lock().unwrap().len();
        assert_eq!(logged, 2);
        for n in 0..100 {
            refusals.refuse("p", Access::Socket, &format!("resolving `host{n}`"));
        }
        assert_eq!(refusals.logged.lock().unwrap().len(), LOGGED_TARGETS);
        assert_eq!(refusals.counts()[1], (Access::Socket, 100));
    }
}
