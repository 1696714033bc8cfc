//! WASI preview 1 modules, run as components.
//!
//! wasmtime's preview 1 host writes to files directly, where nothing can
//! charge the writes or count the descriptors (see [`super::fs`]). So a
//! preview 1 command (TinyGo, Zig, C with wasi-sdk, Rust's `wasm32-wasip1`) is
//! made a component when it is loaded: wasmtime's own preview 1 adapter, linked
//! in by `wit-component`, implements preview 1's functions on WASI 0.2's
//! interfaces, which the sandbox charges like any component's.
//!
//! One thing the adapter loses: `proc_exit` with a code other than 0 reaches
//! the host as 1 (`wasi:cli/exit`'s `exit` carries only success or failure). To
//! keep the code a preview 1 program exits with, as `wasmtime run` reports it,
//! the module's `proc_exit` import is renamed to [`EXIT_INTERFACE`]'s
//! `proc-exit`, which the host implements (see [`add_exit_to_linker`]).

use std::convert::Infallible;

use wasm_encoder::reencode::{Error as ReencodeError, Reencode};
use wasm_encoder::{ImportSection, Module};
use wasmparser::Imports;
use wasmtime::component::Linker;
use wasmtime_wasi::I32Exit;

/// The host interface that stands for preview 1's `proc_exit`.
pub(crate) const EXIT_INTERFACE: &str = "imagentx:preview1/exit@0.1.0";

const PREVIEW1: &str = "wasi_snapshot_preview1";

/// The interface, as the component-type section of a module declares it.
const EXIT_WIT: &str = "
package imagentx:preview1@0.1.0;

interface exit {
    /// Ends the program with `code`, as preview 1's `proc_exit` does.
    proc-exit: func(code: u32);
}

world module {
    import exit;
}
";

/// The component of a preview 1 command module: the module linked to the
/// adapter, exporting `wasi:cli/run` (which calls the module's `_start`). A
/// module that imports anything but preview 1, or does not export its memory,
/// cannot be adapted: the error says why.
pub(crate) fn adapt(module: &[u8]) -> wasmtime::Result<Vec<u8>> {
    use wasi_preview1_component_adapter_provider::{
        WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
    };
    let encoded = with_host_exit(module).and_then(|module| {
        wit_component::ComponentEncoder::default()
            .module(&module)?
            .adapter(WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER)?
            .validate(true)
            .encode()
    });
    encoded.map_err(|e| wasmtime::format_err!("{e:#}"))
}

/// `module` with its `proc_exit` import (if any) taken from [`EXIT_INTERFACE`]
/// instead, and the component-type section that declares that interface.
fn with_host_exit(module: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut renamed = Module::new();
    let mut rename = RenameProcExit { renamed: false };
    rename
        .parse_core_module(&mut renamed, wasmparser::Parser::new(0), module)
        .map_err(|e| anyhow::anyhow!("reading the module: {e}"))?;
    if !rename.renamed {
        return Ok(module.to_vec());
    }
    let mut bytes = renamed.finish();
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve.push_str("preview1-exit.wit", EXIT_WIT)?;
    let world = resolve.select_world(&[package], Some("module"))?;
    wit_component::embed_component_metadata(&mut bytes, &resolve, world, wit_component::StringEncoding::UTF8)?;
    Ok(bytes)
}

/// Re-encodes a module as it is but for the import of `proc_exit`.
struct RenameProcExit {
    renamed: bool,
}

impl RenameProcExit {
    fn import(
        &mut self,
        section: &mut ImportSection,
        module: &str,
        name: &str,
        ty: wasmparser::TypeRef,
    ) -> Result<(), ReencodeError<Infallible>> {
        let ty = self.entity_type(ty)?;
        if module == PREVIEW1 && name == "proc_exit" {
            self.renamed = true;
            section.import(EXIT_INTERFACE, "proc-exit", ty);
        } else {
            section.import(module, name, ty);
        }
        Ok(())
    }
}

impl Reencode for RenameProcExit {
    type Error = Infallible;

    fn parse_imports(
        &mut self,
        section: &mut ImportSection,
        imports: Imports<'_>,
    ) -> Result<(), ReencodeError<Infallible>> {
        match imports {
            Imports::Single(_, import) => self.import(section, import.module, import.name, import.ty),
            Imports::Compact1 { module, items } => items.into_iter().try_for_each(|item| {
                let item = item?;
                self.import(section, module, item.name, item.ty)
            }),
            Imports::Compact2 { module, ty, names } => names.into_iter().try_for_each(|name| {
                let name = name?;
                self.import(section, module, name, ty)
            }),
        }
    }
}

/// Implements [`EXIT_INTERFACE`]: the program ends with its exact code.
pub(crate) fn add_exit_to_linker<T: 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.instance(EXIT_INTERFACE)?.func_wrap("proc-exit", |_, (code,): (u32,)| -> wasmtime::Result<()> {
        // Preview 1's exit code is a u32; the report's is an i32, as
        // wasmtime's own preview 1 host makes it.
        Err(I32Exit(code.cast_signed()).into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_exit_is_renamed_and_the_rest_is_kept() {
        let module = wat::parse_str(
            r#"(module
                (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
                (memory (export "memory") 1)
                (func (export "_start")))"#,
        )
        .unwrap();
        let renamed = with_host_exit(&module).unwrap();
        let imports: Vec<(String, String)> = wasmparser::Parser::new(0)
            .parse_all(&renamed)
            .filter_map(|p| match p.unwrap() {
                wasmparser::Payload::ImportSection(s) => Some(s),
                _ => None,
            })
            .flat_map(|s| s.into_imports().map(|i| i.unwrap()).map(|i| (i.module.to_owned(), i.name.to_owned())))
            .collect();
        assert_eq!(
            imports,
            [(PREVIEW1.to_owned(), "fd_write".to_owned()), (EXIT_INTERFACE.to_owned(), "proc-exit".to_owned())]
        );
        let without = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#).unwrap();
        assert_eq!(with_host_exit(&without).unwrap(), without);
    }
}
