//! `switchyard new NAME --lang rust|python|js`: a plugin project that builds with one
//! command and passes `switchyard check` and `switchyard invoke` as written.
//!
//! Python and JavaScript projects carry their own copy of the SDK and of the contract's
//! WIT, written from this binary, so they build anywhere the stock toolchain runs. A Rust
//! project depends on the SDK crate by path (`--sdk`, or the `plugin-sdk` folder of the
//! checkout this binary was built in).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// A plugin language `new` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust with `switchyard-sdk`, built by cargo for `wasm32-wasip2`.
    Rust,
    /// Python with the `switchyard` package, built by componentize-py.
    Python,
    /// JavaScript with `switchyard.js`, built by componentize-js.
    Js,
}

/// Pinned toolchain versions the projects are tested with; `scripts/setup.sh` installs
/// the same ones.
const COMPONENTIZE_PY: &str = "0.25.1";
const COMPONENTIZE_JS: &str = "0.23.0";

const WIT: [(&str, &str); 4] = [
    ("wit/world.wit", include_str!("../../../wit/world.wit")),
    ("wit/types.wit", include_str!("../../../wit/types.wit")),
    ("wit/handler.wit", include_str!("../../../wit/handler.wit")),
    ("wit/host.wit", include_str!("../../../wit/host.wit")),
];

const PYTHON_SDK: [(&str, &str); 5] = [
    (
        "switchyard/__init__.py",
        include_str!("../../../plugin-sdk/python/switchyard/__init__.py"),
    ),
    (
        "switchyard/kv.py",
        include_str!("../../../plugin-sdk/python/switchyard/kv.py"),
    ),
    (
        "switchyard/config.py",
        include_str!("../../../plugin-sdk/python/switchyard/config.py"),
    ),
    (
        "switchyard/log.py",
        include_str!("../../../plugin-sdk/python/switchyard/log.py"),
    ),
    (
        "switchyard/stream.py",
        include_str!("../../../plugin-sdk/python/switchyard/stream.py"),
    ),
];

const JS_SDK: [(&str, &str); 2] = [
    (
        "switchyard.js",
        include_str!("../../../plugin-sdk/js/switchyard.js"),
    ),
    // Its types, for editors and `tsc --checkJs`.
    (
        "switchyard.d.ts",
        include_str!("../../../plugin-sdk/js/switchyard.d.ts"),
    ),
];

const README: &str = include_str!("templates/README.md");

/// Writes the project `name` into `parent/name` and returns its path.
pub fn create(
    parent: &Path,
    name: &str,
    lang: Lang,
    sdk: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    check_name(name)?;
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let artifact = match lang {
        Lang::Rust => format!(
            "target/wasm32-wasip2/release/{}.wasm",
            name.replace('-', "_")
        ),
        Lang::Python | Lang::Js => format!("{name}.wasm"),
    };
    let mut files: Vec<(String, String)> = Vec::new();
    let (language, toolchain, build, notes) = match lang {
        Lang::Rust => {
            let sdk = rust_sdk(sdk)?;
            files.push((
                "Cargo.toml".to_owned(),
                include_str!("templates/Cargo.toml").replace("@@SDK@@", &toml_path(&sdk)),
            ));
            files.push((
                "src/lib.rs".to_owned(),
                include_str!("templates/lib.rs").to_owned(),
            ));
            (
                "Rust",
                "Needs the `wasm32-wasip2` target: `rustup target add wasm32-wasip2`.".to_owned(),
                "cargo build --target wasm32-wasip2 --release".to_owned(),
                "The SDK's documentation: `cargo doc --open -p switchyard-sdk`.".to_owned(),
            )
        }
        Lang::Python => {
            files.push((
                "app.py".to_owned(),
                include_str!("templates/app.py").to_owned(),
            ));
            for (path, text) in PYTHON_SDK {
                files.push((path.to_owned(), text.to_owned()));
            }
            for (path, text) in WIT {
                files.push((path.to_owned(), text.to_owned()));
            }
            (
                "Python",
                format!(
                    "Needs componentize-py {COMPONENTIZE_PY} on the `PATH` (`pip install componentize-py=={COMPONENTIZE_PY}`; in a Switchyard checkout, `scripts/setup.sh` installs it into `.tools/bin`)."
                ),
                format!("componentize-py -d wit -w batch-plugin componentize app -o {name}.wasm"),
                PYTHON_NOTES.to_owned(),
            )
        }
        Lang::Js => {
            files.push((
                "app.js".to_owned(),
                include_str!("templates/app.js").to_owned(),
            ));
            for (path, text) in JS_SDK {
                files.push((path.to_owned(), text.to_owned()));
            }
            for (path, text) in WIT {
                files.push((path.to_owned(), text.to_owned()));
            }
            (
                "JavaScript",
                format!(
                    "Needs componentize-js {COMPONENTIZE_JS} on the `PATH` (`npm install -g @bytecodealliance/componentize-js@{COMPONENTIZE_JS}`; in a Switchyard checkout, `scripts/setup.sh` installs it into `.tools/bin`)."
                ),
                format!("componentize-js app.js -w wit -n batch-plugin -o {name}.wasm"),
                JS_NOTES.to_owned(),
            )
        }
    };
    files.push((
        "README.md".to_owned(),
        README
            .replace("@@LANGUAGE@@", language)
            .replace("@@TOOLCHAIN@@", &toolchain)
            .replace("@@BUILD@@", &build)
            .replace("@@ARTIFACT@@", &artifact)
            .replace("@@NOTES@@", &notes),
    ));
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text.replace("@@NAME@@", name))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

const PYTHON_NOTES: &str = "## Good to know\n\n\
- The component holds the modules imported when it is built: import what the handler \
uses at the top of `app.py` (a module first imported inside the handler is not there).\n\
- `print` goes to the host's log. Files and sockets fail with an `OSError`.\n\
- Python spends far more fuel than Rust for the same work (a call with one KV update and \
one emit: about 0.4 M against 6 k). The default budget, 1 G fuel a call, fits ordinary \
work; give a busy handler more in its sidecar (`[limits] fuel = 4_000_000_000`), and \
consider `instance = \"reuse\"`, which skips the interpreter's start on every event.\n\
- An uncaught exception is retried as a `trap`; its traceback is in the host's log, the \
plugin's `last_error` and the dead letter. `raise Retry(...)` and `raise Reject(...)` are \
the handler's own decisions.\n";

const JS_NOTES: &str = "## Good to know\n\n\
- A handler is synchronous: a promise it starts is not awaited. `fetch` is refused by \
the host anyway, and files do not exist.\n\
- `console.log` goes to the host's log.\n\
- JavaScript spends far more fuel than Rust for the same work (a call with one KV update \
and one emit: about 2 M against 6 k). The default budget, 1 G fuel a call, fits ordinary \
work; give a busy handler more in its sidecar (`[limits] fuel = 4_000_000_000`), and \
consider `instance = \"reuse\"`, which skips the engine's start on every event.\n\
- An uncaught exception is retried as a `trap`; its name, message and stack are in the \
host's log, the plugin's `last_error` and the dead letter. `throw new Retry(...)` and \
`throw new Reject(...)` are the handler's own decisions.\n";

/// Plugin names become file names, crate names and host names: lowercase letters,
/// digits and dashes, starting with a letter.
fn check_name(name: &str) -> anyhow::Result<()> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && name.len() <= 64;
    if !valid {
        bail!(
            "`{name}` is not a plugin name: use lowercase letters, digits and dashes, starting with a letter"
        );
    }
    Ok(())
}

/// The SDK crate a Rust project depends on: `--sdk`, else the checkout's `plugin-sdk`
/// found beside this binary (`target/<profile>/switchyard`).
fn rust_sdk(sdk: Option<&Path>) -> anyhow::Result<PathBuf> {
    let found = match sdk {
        Some(path) => Some(path.to_path_buf()),
        None => std::env::current_exe().ok().and_then(|exe| {
            exe.ancestors()
                .map(|dir| dir.join("plugin-sdk"))
                .find(|dir| dir.join("Cargo.toml").is_file())
        }),
    };
    let Some(sdk) = found else {
        bail!("cannot find the Rust SDK beside this binary; pass --sdk PATH/TO/plugin-sdk");
    };
    if !sdk.join("Cargo.toml").is_file() {
        bail!("{} is not the SDK crate (no Cargo.toml)", sdk.display());
    }
    std::path::absolute(&sdk).with_context(|| format!("locating {}", sdk.display()))
}

fn toml_path(path: &Path) -> String {
    path.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The versions a new project is told to install are the ones the checkout installs
    /// and tests with.
    #[test]
    fn the_pinned_toolchains_are_the_ones_setup_installs() {
        let setup = include_str!("../../../scripts/setup.sh");
        assert!(
            setup.contains(&format!("\nCOMPONENTIZE_PY_VERSION={COMPONENTIZE_PY}\n")),
            "scripts/setup.sh pins another componentize-py"
        );
        let js_pins = include_str!("../../../scripts/componentize-js/package.json");
        assert!(
            js_pins.contains(&format!(
                "\"@bytecodealliance/componentize-js\": \"{COMPONENTIZE_JS}\""
            )),
            "scripts/componentize-js pins another componentize-js"
        );
    }

    #[test]
    fn names() {
        assert!(check_name("greeter").is_ok());
        assert!(check_name("order-audit2").is_ok());
        for bad in ["", "Greeter", "2fa", "a_b", "a/b", "../x", "trailing-"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_python_project_has_its_sdk_and_wit() {
        let dir = tempfile::tempdir().unwrap();
        let project = create(dir.path(), "greeter", Lang::Python, None).unwrap();
        for file in [
            "app.py",
            "README.md",
            "switchyard/__init__.py",
            "wit/world.wit",
        ] {
            assert!(project.join(file).is_file(), "{file}");
        }
        let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
        assert!(
            readme.contains(
                "componentize-py -d wit -w batch-plugin componentize app -o greeter.wasm"
            )
        );
        assert!(!readme.contains("@@"));
        assert!(
            create(dir.path(), "greeter", Lang::Js, None).is_err(),
            "exists"
        );
    }
}
