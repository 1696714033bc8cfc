//! The built-in interpreter tools, `python` and `javascript`: components
//! built from `interpreters/` by `scripts/build-interpreters` into
//! `target/interpreters/`. The server registers them when it starts and
//! `imagentx-sandbox run python` runs them by name; they are never part of
//! the binary (17–26 MB each, and built by Python and npm tooling).

use std::path::{Path, PathBuf};

/// The built-in tools, by registry name; each is `<name>.wasm` in the
/// interpreters directory.
pub const NAMES: [&str; 2] = ["python", "javascript"];

/// The built-in native tool: the host's Python with numpy, pandas and
/// matplotlib, in the jail (`scripts/build-interpreters python-data` builds
/// `python-data/` in the interpreters directory: `runner.py`, `site/`, `BUILD`).
pub const PYTHON_DATA: &str = "python-data";

/// Where `python-data/` is bound inside the jail.
pub const PYTHON_DATA_INSIDE: &str = "/opt/imagentx/python-data";

/// The Python the jail runs `python-data` with (the one its wheels are for).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// The variable that overrides where the built components are looked for.
pub const DIR_VAR: &str = "IMAGENTX_INTERPRETERS";

/// Where the built components are looked for when nothing says otherwise:
/// `$IMAGENTX_INTERPRETERS`, else `interpreters/` beside the directory of
/// this executable (`target/release/..` is `target/`, where
/// `scripts/build-interpreters` writes them).
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(DIR_VAR) {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(Path::parent).map(|dir| dir.join("interpreters")))
        .unwrap_or_else(|| PathBuf::from("target/interpreters"))
}

/// Whether `name` is one of the built-in tools (WASM or native).
pub fn is_builtin(name: &str) -> bool {
    NAMES.contains(&name) || name == PYTHON_DATA
}

/// The built component of `name` in `dir`, when `name` is a built-in.
pub fn component(dir: &Path, name: &str) -> Option<PathBuf> {
    NAMES.contains(&name).then(|| dir.join(format!("{name}.wasm")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_built_ins_have_a_component() {
        let dir = Path::new("/x");
        assert_eq!(component(dir, "python"), Some(PathBuf::from("/x/python.wasm")));
        assert_eq!(component(dir, "javascript"), Some(PathBuf::from("/x/javascript.wasm")));
        assert_eq!(component(dir, "../etc/passwd"), None);
        assert_eq!(component(dir, "ruby"), None);
    }
}
