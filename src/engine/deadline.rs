//! The wall-clock and CPU-time deadlines of a call, checked at every epoch tick.
//!
//! One ticker thread per engine advances the epoch. At each tick a running guest
//! enters the store's epoch callback, which either yields to the async runtime
//! (so one busy guest cannot hold a worker thread) or, past a deadline, stops
//! the guest with [`DeadlineExceeded`] or [`CpuTimeExceeded`]. A guest blocked inside a host call never
//! reaches a tick; the outer `tokio::time::timeout` in `call.rs` covers that.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// The error a guest is stopped with when its wall-clock budget has run out.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("wall-clock deadline passed")]
pub(crate) struct DeadlineExceeded;

/// The error a guest is stopped with when its CPU-time budget has run out.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("CPU-time budget used up")]
pub(crate) struct CpuTimeExceeded;

/// Advances an engine's epoch every `tick` until dropped.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engine: wasmtime::Engine, tick: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("epoch-ticker".into()).spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            }
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
