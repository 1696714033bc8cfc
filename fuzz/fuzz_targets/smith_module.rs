//! Valid core modules from wasm-smith that import WASI preview 1 functions
//! and export `_start` and `memory`, so that they load as commands and run:
//! whatever they compute and whatever they ask of the host, the call ends by
//! its deadline and within its limits, and the process lives on.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

#[path = "harness.rs"]
mod harness;

/// The host functions a generated module may import: the ones that touch
/// files, time, memory and output.
const IMPORTS: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_seek" (func (param i32 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_filestat_set_size" (func (param i32 i64) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_create_directory" (func (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_unlink_file" (func (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sched_yield" (func (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
)"#;

/// What a command exports.
const EXPORTS: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

fn config() -> wasm_smith::Config {
    static SHAPE: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    let (imports, exports) = SHAPE
        .get_or_init(|| (wat::parse_str(IMPORTS).expect("the imports"), wat::parse_str(EXPORTS).expect("the exports")));
    wasm_smith::Config {
        available_imports: Some(imports.clone()),
        exports: Some(exports.clone()),
        max_memories: 2,
        max_memory32_bytes: 64 << 20,
        memory64_enabled: false,
        threads_enabled: false,
        gc_enabled: false,
        custom_page_sizes_enabled: false,
        ..wasm_smith::Config::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(module) = wasm_smith::Module::new(config(), &mut u) else { return };
    harness::load_and_run(&module.to_bytes());
});
