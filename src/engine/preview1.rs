//! WASI preview 1 modules, run as components.
//!
//! wasmtime's preview 1 host writes to files directly, where nothing can
//! charge the writes or count the descriptors (see [`super::fs`]). So a
//! preview 1 command (Zig, C with wasi-sdk, Rust's `wasm32-wasip1`) is
//! made a component when it is loaded: wasmtime's own preview 1 adapter, linked
//! in by `wit-component`, implements preview 1's functions on WASI 0.2's
//! interfaces, which the sandbox charges like any component's.
//!
//! Two things the module is changed in before it is adapted (see
//! [`prepare`]):
//! - `proc_exit` with a code other than 0 would reach the host as 1 through the
//!   adapter (`wasi:cli/exit`'s `exit` carries only success or failure). To
//!   keep the code, as wasmtime's own preview 1 host reports it, the module's
//!   `proc_exit` import is renamed to [`EXIT_INTERFACE`]'s `proc-exit`, which
//!   the host implements for adapted modules only ([`add_exit_to_linker`]).
//! - The adapter takes a few pages of the module's memory for its stack and
//!   state (`memory.grow`): a memory whose maximum is its size would trap at
//!   the first call, so the maximum is raised by [`ADAPTER_PAGES`]. The tier's
//!   memory limit still holds the whole.
//!
//! TinyGo's preview 1 output is known not to live with the adapter (its heap
//! takes memory the adapter grows: fastly/Viceroy#491); TinyGo builds
//! components itself (`-target=wasip2`), which run as they are.

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
/// module the adapter cannot take (it imports anything but preview 1, imports
/// its memory, has several) is refused: the error says why.
pub(crate) fn adapt(module: &[u8]) -> wasmtime::Result<Vec<u8>> {
    use wasi_preview1_component_adapter_provider::{
        WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
    };
    let encoded = prepare(module).and_then(|module| {
        wit_component::ComponentEncoder::default()
            .module(&module)?
            .adapter(WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER)?
            .validate(true)
            .encode()
    });
    encoded.map_err(|e| wasmtime::format_err!("{e:#}"))
}

/// Pages by which a memory's maximum is raised for the adapter's stack and state.
pub(crate) const ADAPTER_PAGES: u64 = 8;

/// `module` with its `proc_exit` import (if any) taken from [`EXIT_INTERFACE`]
/// and the component-type section that declares that interface, and its
/// memory's maximum (if any) raised by [`ADAPTER_PAGES`]. A module with
/// neither is returned as it is.
fn prepare(module: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (mut exits, mut capped) = (false, false);
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        match payload? {
            wasmparser::Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    let import = import?;
                    exits |= import.module == PREVIEW1 && import.name == "proc_exit";
                }
            }
            wasmparser::Payload::MemorySection(memories) => {
                for memory in memories {
                    capped |= memory?.maximum.is_some();
                }
            }
            _ => {}
        }
    }
    if !exits && !capped {
        return Ok(module.to_vec());
    }
    let mut prepared = Module::new();
    Prepare.parse_core_module(&mut prepared, wasmparser::Parser::new(0), module).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut bytes = prepared.finish();
    if exits {
        let mut resolve = wit_parser::Resolve::default();
        let package = resolve.push_str("preview1-exit.wit", EXIT_WIT)?;
        let world = resolve.select_world(&[package], Some("module"))?;
        wit_component::embed_component_metadata(&mut bytes, &resolve, world, wit_component::StringEncoding::UTF8)?;
    }
    Ok(bytes)
}

/// Re-encodes a module as it is but for the import of `proc_exit` and the
/// maximum of its memories.
struct Prepare;

impl Prepare {
    fn import(
        &mut self,
        section: &mut ImportSection,
        module: &str,
        name: &str,
        ty: wasmparser::TypeRef,
    ) -> Result<(), ReencodeError<Infallible>> {
        let ty = self.entity_type(ty)?;
        if module == PREVIEW1 && name == "proc_exit" {
            section.import(EXIT_INTERFACE, "proc-exit", ty);
        } else {
            section.import(module, name, ty);
        }
        Ok(())
    }
}

impl Reencode for Prepare {
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

    fn memory_type(
        &mut self,
        memory: wasmparser::MemoryType,
    ) -> Result<wasm_encoder::MemoryType, ReencodeError<Infallible>> {
        let mut ty = wasm_encoder::reencode::utils::memory_type(self, memory);
        let pages = if ty.memory64 { u64::MAX } else { 1 << 16 };
        ty.maximum = ty.maximum.map(|max| max.saturating_add(ADAPTER_PAGES).min(pages));
        Ok(ty)
    }
}

/// Implements [`EXIT_INTERFACE`]: the program ends with its exact code.
pub(crate) fn add_exit_to_linker<T: 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.instance(EXIT_INTERFACE)?.func_wrap("proc-exit", |_, (code,): (u32,)| -> wasmtime::Result<()> {
        // wasmtime's preview 1 host's rule: codes of 126 and up (the shell's
        // for "not run" and signals) are not a program's to give.
        match i32::try_from(code) {
            Ok(code) if code < 126 => Err(I32Exit(code).into()),
            _ => Err(wasmtime::format_err!("exit with invalid exit status outside of [0..126)")),
        }
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
        let renamed = prepare(&module).unwrap();
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
        assert_eq!(prepare(&without).unwrap(), without);
        let capped = wat::parse_str(r#"(module (memory (export "memory") 1 1) (func (export "_start")))"#).unwrap();
        let maxima: Vec<Option<u64>> = wasmparser::Parser::new(0)
            .parse_all(&prepare(&capped).unwrap())
            .filter_map(|p| match p.unwrap() {
                wasmparser::Payload::MemorySection(s) => Some(s),
                _ => None,
            })
            .flat_map(|s| s.into_iter().map(|m| m.unwrap().maximum))
            .collect();
        assert_eq!(maxima, [Some(1 + ADAPTER_PAGES)]);
    }
}
