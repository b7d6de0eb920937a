//! The guest plugins, built once per test process for `wasm32-wasip2` into their own
//! target directory (`target/guests`), so the host's build is never blocked by them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Every guest the tests load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    AuditTrail,
    BoxOffice,
    Ticketing,
    Notifier,
    Hostile,
    FsReader,
    TcpConnect,
    Noop,
    Contract01,
}

impl Guest {
    /// All guests, in build order.
    pub const ALL: [Guest; 9] = [
        Guest::AuditTrail,
        Guest::BoxOffice,
        Guest::Ticketing,
        Guest::Notifier,
        Guest::Hostile,
        Guest::FsReader,
        Guest::TcpConnect,
        Guest::Noop,
        Guest::Contract01,
    ];

    /// The guest's crate name.
    pub fn crate_name(self) -> &'static str {
        match self {
            Guest::AuditTrail => "audit-trail",
            Guest::BoxOffice => "box-office",
            Guest::Ticketing => "ticketing",
            Guest::Notifier => "notifier",
            Guest::Hostile => "hostile",
            Guest::FsReader => "fs-reader",
            Guest::TcpConnect => "tcp-connect",
            Guest::Noop => "noop",
            Guest::Contract01 => "contract-0-1",
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the host crate sits in the workspace")
        .to_path_buf()
}

/// The directory the guests are built into.
pub fn target_dir() -> PathBuf {
    workspace_root().join("target").join("guests")
}

fn build_all() -> Result<(), String> {
    let mut command = Command::new(env!("CARGO"));
    command
        .current_dir(workspace_root())
        .args([
            "build",
            "--quiet",
            "--target",
            "wasm32-wasip2",
            "--profile",
            "guest",
        ])
        .arg("--target-dir")
        .arg(target_dir());
    for guest in Guest::ALL {
        command.args(["-p", guest.crate_name()]);
    }
    // Flags and wrappers of the outer build are meant for the host target.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "building the guest plugins for wasm32-wasip2 failed ({status}); scripts/setup.sh installs the target"
        ))
    }
}

/// The path of a built guest, building all guests on first use.
pub fn path(guest: Guest) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(error) = BUILT.get_or_init(build_all) {
        panic!("{error}");
    }
    target_dir()
        .join("wasm32-wasip2")
        .join("guest")
        .join(format!("{}.wasm", guest.crate_name().replace('-', "_")))
}
