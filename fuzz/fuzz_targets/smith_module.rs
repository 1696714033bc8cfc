//! Valid core modules from wasm-smith, run as tools in both shapes a
//! module can take:
//! - a WASI preview 1 command: the module imports preview 1 functions and
//!   exports `_start` and `memory`;
//! - the same kind of module inside a component that exports
//!   `wasi:cli/run`, its `run` lifted from the module's `run`, so that the
//!   component path (instantiation, the canonical ABI's result, the
//!   command's stdio, which the module itself cannot reach: it imports
//!   nothing) runs whatever the module computes. (wasm-smith's own
//!   component generator is off by default and behind the component model:
//!   its components rarely export anything a host can call.)
//!
//! Whatever they compute and whatever they ask of the host, the call ends
//! by its deadline and within its limits, and the process lives on.

#![no_main]

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use arbitrary::Unstructured;
use imagentx_sandbox::engine::ToolKind;
use imagentx_sandbox::report::Status;
use libfuzzer_sys::fuzz_target;

#[path = "harness.rs"]
mod harness;

/// The host functions a generated command may import: the ones that touch
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
const COMMAND_EXPORTS: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

/// What the module inside a component exports: `run`, whose `i32` is the
/// discriminant of `wasi:cli/run`'s `result` (0 ok, 1 error, anything else
/// a trap the host must survive).
const COMPONENT_EXPORTS: &str =
    r#"(module (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))"#;

/// How a module is run.
#[derive(Clone, Copy)]
enum Shape {
    Command,
    InComponent,
}

fn config(shape: Shape) -> wasm_smith::Config {
    static SHAPES: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    let [imports, command, component] = SHAPES.get_or_init(|| {
        [IMPORTS, COMMAND_EXPORTS, COMPONENT_EXPORTS].map(|text| wat::parse_str(text).expect("a module shape"))
    });
    let base = wasm_smith::Config {
        max_memories: 2,
        max_memory32_bytes: 64 << 20,
        memory64_enabled: false,
        threads_enabled: false,
        gc_enabled: false,
        custom_page_sizes_enabled: false,
        // The engine is built without exceptions: such modules would only
        // ever be refused (load_bytes covers refusals).
        exceptions_enabled: false,
        ..wasm_smith::Config::default()
    };
    match shape {
        Shape::Command => {
            wasm_smith::Config { available_imports: Some(imports.clone()), exports: Some(command.clone()), ..base }
        }
        // A component instantiates the module with nothing to import.
        Shape::InComponent => wasm_smith::Config { max_imports: 0, exports: Some(component.clone()), ..base },
    }
}

/// The component that exports `wasi:cli/run` (the version real guests built
/// for wasm32-wasip2 export) with the module's `run` behind it; `masked`:
/// through a module that keeps the low bit of what `run` answers, so that
/// the call ends ok or in error rather than trapping on a bad discriminant.
fn component_around(module: &[u8], masked: bool) -> Option<Vec<u8>> {
    let text = wasmprinter::print_bytes(module).ok()?;
    let body = text.trim_start().strip_prefix("(module")?;
    let (mask, from) = if masked {
        (
            "(core module $mask
               (import \"m\" \"run\" (func $run (result i32)))
               (func (export \"run\") (result i32) (i32.and (call $run) (i32.const 1))))
             (core instance $j (instantiate $mask (with \"m\" (instance $i))))",
            "$j",
        )
    } else {
        ("", "$i")
    };
    let component = format!(
        "(component
           (core module $m {body}
           (core instance $i (instantiate $m))
           {mask}
           (func $run (result (result)) (canon lift (core func {from} \"run\")))
           (instance $cli (export \"run\" (func $run)))
           (export \"wasi:cli/run@0.2.0\" (instance $cli)))"
    );
    Some(wat::parse_str(&component).expect("a valid module makes a valid component"))
}

/// How the components made so far ended, printed now and then: a target
/// whose components never load or never run would test nothing, and say so.
fn tally(ended: Option<Status>) {
    static TALLY: Mutex<(u64, BTreeMap<String, u64>)> = Mutex::new((0, BTreeMap::new()));
    let mut tally = TALLY.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    tally.0 += 1;
    let key = ended.map_or_else(|| "not loaded".to_owned(), |status| format!("{status:?}"));
    *tally.1.entry(key).or_default() += 1;
    if tally.0.is_power_of_two() {
        eprintln!("smith_module: {} components, ended: {:?}", tally.0, tally.1);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(shape_byte) = u.arbitrary::<u8>() else { return };
    // Half commands; of the components, three in four masked.
    let (shape, masked) = match shape_byte % 8 {
        0..4 => (Shape::Command, false),
        4 => (Shape::InComponent, false),
        _ => (Shape::InComponent, true),
    };
    let Ok(module) = wasm_smith::Module::new(config(shape), &mut u) else { return };
    let module = module.to_bytes();
    match shape {
        Shape::Command => {
            harness::load_and_run(&module);
        }
        Shape::InComponent => {
            let Some(component) = component_around(&module, masked) else { return };
            let ran = harness::load_and_run(&component);
            if let Some((kind, _)) = ran {
                assert_eq!(kind, ToolKind::WasiCommand, "the component loaded as another kind");
            }
            tally(ran.map(|(_, status)| status));
        }
    }
});
