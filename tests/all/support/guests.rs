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
    without_outer_build(&mut command);
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

/// Removes the flags and wrappers of the outer build, which are meant for the host
/// target, from a command that runs cargo for a guest.
pub fn without_outer_build(command: &mut Command) -> &mut Command {
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
    command
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

/// A guest written in Python or JavaScript, built with the pinned stock toolchains
/// (`scripts/componentize.sh`) into `target/guests/polyglot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polyglot {
    /// `tests/plugins/py-probe`: one behaviour per event type.
    PyProbe,
    /// `tests/plugins/js-probe`: the same in JavaScript.
    JsProbe,
    /// `plugins/loyalty`, the Python example.
    Loyalty,
    /// `plugins/receipts`, the JavaScript example.
    Receipts,
}

impl Polyglot {
    /// The plugin's directory, relative to the workspace.
    pub fn dir(self) -> &'static str {
        match self {
            Polyglot::PyProbe => "tests/plugins/py-probe",
            Polyglot::JsProbe => "tests/plugins/js-probe",
            Polyglot::Loyalty => "plugins/loyalty",
            Polyglot::Receipts => "plugins/receipts",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The path of a built Python or JavaScript guest, building it on first use (the script
/// skips a build that is up to date).
pub fn polyglot_path(guest: Polyglot) -> PathBuf {
    static BUILT: [OnceLock<Result<PathBuf, String>>; 4] = [
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
    ];
    let built = BUILT[guest.index()].get_or_init(|| {
        let root = workspace_root();
        let name = Path::new(guest.dir())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let out = target_dir().join("polyglot").join(format!("{name}.wasm"));
        let status = Command::new(root.join("scripts/componentize.sh"))
            .arg(root.join(guest.dir()))
            .arg(&out)
            .status()
            .map_err(|e| format!("cannot run scripts/componentize.sh: {e}"))?;
        if status.success() {
            Ok(out)
        } else {
            Err(format!(
                "building {} failed ({status}); scripts/setup.sh installs the toolchains",
                guest.dir()
            ))
        }
    });
    match built {
        Ok(path) => path.clone(),
        Err(error) => panic!("{error}"),
    }
}
