//! CPU time of a guest call on an async runtime.
//!
//! A call may move between worker threads at every `.await`, so the process's
//! or one thread's clock would count other work. [`CpuTimed`] instead adds up
//! the calling thread's CPU clock across each `poll` of the call's future: the
//! guest runs only inside those polls.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// CPU time spent on one call so far, in nanoseconds: written by [`CpuTimed`]
/// after each poll, read by the epoch callback to enforce the CPU budget.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuSpent(Arc<AtomicU64>);

impl CpuSpent {
    pub(crate) fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }

    fn add(&self, d: Duration) {
        self.0.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// A future that measures the CPU time spent polling `inner`.
pub(crate) struct CpuTimed<F> {
    inner: Pin<Box<F>>,
    spent: CpuSpent,
    measurable: bool,
}

impl<F: Future> CpuTimed<F> {
    pub(crate) fn new(inner: F, spent: CpuSpent) -> Self {
        Self { inner: Box::pin(inner), spent, measurable: true }
    }
}

fn thread_cpu_now() -> Option<Duration> {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
    Some(Duration::new(u64::try_from(t.tv_sec()).ok()?, u32::try_from(t.tv_nsec()).ok()?))
}

impl<F: Future> Future for CpuTimed<F> {
    /// The inner output and the CPU time, or `None` if the clock was unreadable.
    type Output = (F::Output, Option<Duration>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let before = thread_cpu_now();
        let polled = self.inner.as_mut().poll(cx);
        match (before, thread_cpu_now()) {
            (Some(b), Some(a)) => self.spent.add(a.saturating_sub(b)),
            _ => self.measurable = false,
        }
        polled.map(|out| (out, self.measurable.then(|| self.spent.get())))
    }
}
