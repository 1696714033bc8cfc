//! Loading a tool: recognise its kind, compile it (or load its artifact),
//! link it, and keep one pre-instantiated form for all its calls.

use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::component::{ComponentExportIndex, InstancePre};
use wasmtime_wasi::p2::bindings::CommandPre;

use super::wasi::{ComponentHost, ModuleHost};

/// The three kinds of WASM tool the sandbox runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ToolKind {
    /// A component exporting the `imagentx:tool` world (`describe`, `call`).
    Sdk,
    /// A component exporting `wasi:cli/run`: JSON on stdin, JSON on stdout.
    WasiCommand,
    /// A WASI preview 1 core module with `_start` (Zig, C/wasi-sdk, Rust's `wasm32-wasip1`...).
    WasiP1Module,
}

/// What a tool says about itself (SDK tools), or what the sandbox knows of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolInfo {
    pub name: String,
    pub version: Option<String>,
    pub description: Option<String>,
    /// JSON Schema of the input; `None` for tools that do not describe themselves.
    pub input_schema: Option<serde_json::Value>,
    /// JSON Schema of an SDK tool's output, when its output type has one
    /// (boxed: most tools have none, and a tool is held in every registry entry).
    pub output_schema: Option<Box<serde_json::Value>>,
    pub kind: ToolKind,
    pub sha256: String,
}

/// A loaded tool, ready to be called any number of times.
pub struct Tool {
    pub(crate) info: ToolInfo,
    pub(crate) entry: Entry,
    pub(crate) from_cache: bool,
}

impl Tool {
    pub fn info(&self) -> &ToolInfo {
        &self.info
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn sha256(&self) -> &str {
        &self.info.sha256
    }

    pub fn kind(&self) -> ToolKind {
        self.info.kind
    }

    /// Gives the tool the name it is registered under (reports carry it).
    pub fn rename(&mut self, name: &str) {
        name.clone_into(&mut self.info.name);
    }

    /// Whether the compiled code came from the on-disk artifact cache.
    pub fn loaded_from_cache(&self) -> bool {
        self.from_cache
    }
}

/// The pre-instantiated entry point of each kind.
pub(crate) enum Entry {
    Sdk { pre: InstancePre<ComponentHost>, call: ComponentExportIndex },
    Command(CommandPre<ComponentHost>),
    Module(wasmtime::InstancePre<ModuleHost>),
}

/// Why a tool could not be loaded. All but [`LoadError::Host`] are the tool's
/// fault and become `invalid_tool`.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("module is {size} bytes, over the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("not a WebAssembly module or component (nor WAT text): {0}")]
    NotWasm(String),
    #[error("module does not validate or compile: {0}")]
    Invalid(String),
    #[error("tool cannot be linked: {0}")]
    Link(String),
    #[error(
        "tool exports neither the imagentx:tool world (`describe`, `call`) nor `wasi:cli/run`, \
         and is not a WASI preview 1 module with `_start`"
    )]
    NoEntryPoint,
    #[error("tool's `describe` failed: {0}")]
    Describe(String),
    #[error("sandbox failed while loading the tool: {0}")]
    Host(String),
}

impl LoadError {
    /// Whether the host, not the tool, is at fault.
    pub fn is_host_failure(&self) -> bool {
        matches!(self, LoadError::Host(_))
    }
}

/// Binary kinds, read from the 8-byte preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binary {
    Component,
    CoreModule,
}

const CORE_PREAMBLE: [u8; 8] = *b"\0asm\x01\0\0\0";
pub(crate) const COMPONENT_PREAMBLE: [u8; 8] = *b"\0asm\x0d\0\x01\0";

/// Turns the uploaded bytes into a wasm binary and its kind. WAT text is accepted
/// and converted, so hand-written test tools need no toolchain.
pub(crate) fn to_binary(bytes: &[u8]) -> Result<(std::borrow::Cow<'_, [u8]>, Binary), LoadError> {
    let wasm: std::borrow::Cow<'_, [u8]> = if bytes.starts_with(b"\0asm") {
        bytes.into()
    } else {
        let text = std::str::from_utf8(bytes).map_err(|_| LoadError::NotWasm("bad magic number".into()))?;
        wat::parse_str(text).map_err(|e| LoadError::NotWasm(e.to_string()))?.into()
    };
    match wasm.get(..8) {
        Some(p) if p == CORE_PREAMBLE => Ok((wasm, Binary::CoreModule)),
        Some(p) if p == COMPONENT_PREAMBLE => Ok((wasm, Binary::Component)),
        Some(_) => Err(LoadError::NotWasm("unknown WebAssembly version or layer".into())),
        None => Err(LoadError::NotWasm("file ends inside the preamble".into())),
    }
}

/// The hex sha256 of a tool's binary: its identity in reports and caches.
pub fn sha256_hex(wasm: &[u8]) -> String {
    hex::encode(Sha256::digest(wasm))
}

/// A module's identity as a loaded tool has it: the SHA-256 of its binary
/// form (a text module, `.wat`, is converted first), without compiling it.
///
/// # Errors
///
/// [`LoadError::NotWasm`] for bytes that are neither.
pub fn module_sha256(bytes: &[u8]) -> Result<String, LoadError> {
    Ok(sha256_hex(&to_binary(bytes)?.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preambles_tell_modules_from_components() {
        assert_eq!(to_binary(b"\0asm\x01\0\0\0").unwrap().1, Binary::CoreModule);
        assert_eq!(to_binary(b"\0asm\x0d\0\x01\0").unwrap().1, Binary::Component);
        assert_eq!(to_binary(b"(module)").unwrap().1, Binary::CoreModule);
    }

    #[test]
    fn garbage_and_truncated_preambles_are_not_wasm() {
        for bytes in [&b"\0asm\x01"[..], b"hello", b"\xff\xfe", b"", b"\0asm\x02\0\0\0"] {
            assert!(matches!(to_binary(bytes), Err(LoadError::NotWasm(_))), "{bytes:?}");
        }
    }
}
